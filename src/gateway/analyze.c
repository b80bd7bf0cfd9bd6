/* The analyser's reserved path, CMG_ANALYZE_PATH: `cmg client analyze` asks the gateway
 * how it judged that very request's credential, and, for ?path=TARGET, whether a mapping
 * covers TARGET and how many connectors serve its role. The judgement is the one
 * admission makes (cmg_authenticate, cmg_device_cert), never a second copy of it.
 * The answer names reason tokens and failed checks, never a secret (no token, no key).
 * It is answered here, never forwarded, and logged and bounded like any refusal. */
#include "core/log.h"
#include "gateway/gw.h"
#include "http/path.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <openssl/x509_vfy.h>

#define ANALYZE_PATH_MAX 512    /* longest ?path= value judged (it is echoed) */

bool cmg_analyze_names(const char *canon, size_t len)
{
    size_t n = strlen(CMG_ANALYZE_PATH);
    return len >= n && !memcmp(canon, CMG_ANALYZE_PATH, n) && (len == n || canon[n] == '?');
}

/* The client certificate, judged against the policy's trust (chain to the CTL, EKU,
 * validity, revocation), whatever path it is for. */
static void add_certificate(cJSON *root, struct cmg_device *d)
{
    cJSON *c = cJSON_AddObjectToObject(root, "certificate");
    const char *reason = NULL, *check = NULL;
    int rc = cmg_device_cert_verdict(d, &reason, &check);

    cJSON_AddBoolToObject(c, "presented", d->has_cert);
    if (!d->has_cert)
        return;
    cJSON_AddStringToObject(c, "subject", d->subject);
    cJSON_AddStringToObject(c, "thumbprint", d->thumbprint);
    cJSON_AddStringToObject(c, "result", rc == 0 ? "pass" : "fail");
    if (rc != 0) {
        cJSON_AddStringToObject(c, "reason", reason);
        cJSON_AddStringToObject(c, "check", check);
    }
}

/* The credential judged for target as admission judges it, and its mapping and
 * connectors. */
static void add_target(cJSON *root, struct cmg_device *d, const char *target,
                       const struct cmg_headers *in)
{
    struct cmg_gateway *gw = d->gw;
    size_t len = strlen(target), canon_len = 0;
    char *canon = malloc(len + 1);
    const char *why = NULL, *reason = NULL;
    struct cmg_policy_mapping *m;
    struct cmg_identity id;
    struct cmg_path p;
    cJSON *map, *cred;
    int rc;

    cJSON_AddStringToObject(root, "path", target);
    map = cJSON_AddObjectToObject(root, "mapping");
    if (!canon || cmg_path_canonical(target, len, canon, &canon_len, &why) < 0) {
        cJSON_AddBoolToObject(map, "found", false);
        cJSON_AddStringToObject(map, "reason", "CMGService_Bad_Request_Path");
        cJSON_AddStringToObject(map, "check", why ? why : "out of memory");
        free(canon);
        return;
    }
    cmg_path_parse(canon, canon_len, &p);
    m = p.kind == CMG_PATH_OTHER ? NULL : cmg_policy_mapping(gw->policy, p.role, p.role_len);
    cJSON_AddBoolToObject(map, "found", m != NULL);
    if (!m) {
        cJSON_AddStringToObject(map, "reason", "CMGService_No_Mapping");
        cJSON_AddStringToObject(map, "check", p.kind == CMG_PATH_OTHER
                                                  ? "no /CCM_Proxy_MutualAuth/ or "
                                                    "/CCM_Proxy_ServerAuth/ prefix"
                                                  : "no mapping of the policy has this role");
        free(canon);
        return;
    }
    cJSON_AddStringToObject(map, "role", m->role);
    cJSON_AddStringToObject(map, "type", m->type);
    cJSON_AddStringToObject(map, "auth", p.kind == CMG_PATH_MUTUAL_AUTH ? "certificate"
                                                                        : "token");
    cred = cJSON_AddObjectToObject(root, "credential");
    rc = cmg_authenticate(d, gw->policy, m, &p, in, &id, &reason);
    cJSON_AddStringToObject(cred, "result", rc == 0 ? "pass" : "fail");
    if (rc == 0) {   /* connectors only to a credential the mapping takes, as a 503 does */
        cJSON_AddStringToObject(cred, "method", cmg_auth_method_name(id.method));
        cJSON_AddNumberToObject(root, "connectors", (double)cmg_tunnel_serving(gw, m));
    } else {
        cJSON_AddNumberToObject(cred, "status", rc);
        cJSON_AddStringToObject(cred, "reason", reason);
        if (id.check)
            cJSON_AddStringToObject(cred, "check", id.check);
    }
    free(canon);
}

/* Without ?path=, a bearer token is judged as a mapping that takes every kind of token
 * would judge it (signature, issuer, audience, tenant, expiry, binding, revocation). */
static void add_token(cJSON *root, struct cmg_device *d, const struct cmg_headers *in)
{
    struct cmg_policy_mapping any = {.type = "mp", .auth = CMG_AUTH_TOKEN | CMG_AUTH_OIDC};
    struct cmg_path path = {.kind = CMG_PATH_SERVER_AUTH, .role = "", .rest = ""};
    const char *reason = NULL;
    struct cmg_identity id;
    cJSON *tok = cJSON_AddObjectToObject(root, "token");
    int rc = cmg_authenticate(d, d->gw->policy, &any, &path, in, &id, &reason);

    cJSON_AddStringToObject(tok, "result", rc == 0 ? "pass" : "fail");
    if (rc == 0) {
        cJSON_AddStringToObject(tok, "method", cmg_auth_method_name(id.method));
    } else {
        cJSON_AddNumberToObject(tok, "status", rc);
        cJSON_AddStringToObject(tok, "reason", reason);
        if (id.check)
            cJSON_AddStringToObject(tok, "check", id.check);
    }
}

static struct cmg_answer analyze_document(struct cmg_device *d, const char *canon,
                                          size_t len, const struct cmg_headers *in)
{
    struct cmg_gateway *gw = d->gw;
    const char *q = memchr(canon, '?', len);
    char target[ANALYZE_PATH_MAX];
    struct cmg_answer a = cmg_answer_refusal(500, "CMGService_Out_Of_Memory");
    struct timeval tv;
    cJSON *root = cJSON_CreateObject();
    char *text;
    int has = q ? cmg_query_param(q + 1, len - (size_t)(q - canon) - 1, "path", target,
                                       sizeof(target)) : 0;

    if (has < 0) {
        cJSON_Delete(root);
        return cmg_answer_refusal(400, "CMGService_Bad_Request_Path");
    }
    if (!root)
        return a;
    gettimeofday(&tv, NULL);
    cJSON_AddNumberToObject(root, "time", (double)tv.tv_sec + tv.tv_usec / 1e6);
    cJSON_AddNumberToObject(root, "clock_skew", (double)gw->policy->clock_skew);
    cJSON_AddNumberToObject(root, "policy_version", (double)gw->policy->version);
    add_certificate(root, d);
    if (has > 0)
        add_target(root, d, target, in);
    else if (cmg_headers_find(in, "authorization") >= 0)
        add_token(root, d, in);
    text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!text)
        return a;
    a = cmg_answer_refusal(200, NULL);
    a.content_type = "application/json";
    a.owned = (unsigned char *)text;
    a.body = a.owned;
    a.body_len = strlen(text);
    return a;
}

struct cmg_answer cmg_analyze_answer(struct cmg_device *d, const char *method, const char *canon,
                                     size_t len, const struct cmg_headers *in, bool has_body)
{
    if (strcmp(method, "GET") && strcmp(method, "HEAD"))
        return cmg_answer_refusal(405, "CMGService_Method_Not_Allowed");
    if (has_body)   /* nothing to upload here: refused, not read */
        return cmg_answer_refusal(413, "CMGService_Request_Too_Large");
    return analyze_document(d, canon, len, in);
}
