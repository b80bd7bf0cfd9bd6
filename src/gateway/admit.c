/* Admission: every request head from a device passes here once. The target must
 * be well-formed and covered by a published mapping, and the credential must be
 * the one the prefix demands; only then is anything forwarded. */
#include "core/log.h"
#include "gateway/gw.h"
#include "http/path.h"
#include "http/status.h"
#include "tls/tls.h"

#include <ctype.h>
#include <openssl/x509_vfy.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The most of a refused request's target its log line shows. */
#define REFUSED_PATH_MAX 256

/* Longest a client may cache the CRL (Cache-Control: max-age), so that a revocation
 * reaches those that cache it this soon; never past the CRL's nextUpdate. */
#define CRL_MAX_AGE_S 300

/* Header names go to HTTP/2 in lower case. */
static int add_lower(struct cmg_headers *h, const char *name, size_t nlen, const char *value,
                     size_t vlen)
{
    char lower[256];
    if (nlen >= sizeof(lower))
        return cmg_headers_add(h, name, nlen, value, vlen);
    for (size_t i = 0; i < nlen; i++)
        lower[i] = (char)tolower((unsigned char)name[i]);
    return cmg_headers_add(h, lower, nlen, value, vlen);
}

static int add_str(struct cmg_headers *h, const char *name, const char *value)
{
    return value[0] ? cmg_headers_add(h, name, strlen(name), value, strlen(value)) : 0;
}

/* What a device sent that goes on: never a field of one hop, never one the gateway
 * alone vouches for (identity, routing: in any spelling), and its credential only
 * where the mapping says the service needs it. */
static bool passed_on(const struct cmg_headers *in, uint32_t i, const struct cmg_policy_mapping *m)
{
    const char *name = cmg_headers_name(in, i);
    size_t nlen = in->v[i].name_len;

    if (cmg_header_not_forwarded(name, nlen) || cmg_header_gateway_only(name, nlen))
        return false;
    return m->forward_authorization || !cmg_header_is(in, i, "authorization");
}

static int build_headers(struct cmg_device *d, struct cmg_exchange *ex,
                         const struct cmg_headers *in, int64_t content_length,
                         const struct cmg_identity *id)
{
    char num[32], ip[64];
    const char *colon;
    int rc = 0;

    for (uint32_t i = 0; i < in->n; i++)
        if (passed_on(in, i, ex->mapping))
            rc |= add_lower(&ex->req, cmg_headers_name(in, i), in->v[i].name_len,
                            cmg_headers_value(in, i), in->v[i].value_len);
    if (content_length >= 0) {
        snprintf(num, sizeof(num), "%lld", (long long)content_length);
        rc |= cmg_headers_add(&ex->req, "content-length", 14, num, strlen(num));
    }
    /* Who the gateway established the device to be: only ever set here. */
    rc |= add_str(&ex->req, "cmg-client-auth", cmg_auth_method_name(id->method));
    rc |= add_str(&ex->req, "cmg-client-device-id", id->device_id);
    if (d->has_cert && id->method != CMG_ID_OIDC)
        rc |= cmg_headers_add(&ex->req, "cmg-client-cert-thumbprint", 26, d->thumbprint, 64);
    if (id->method == CMG_ID_CERT)
        rc |= add_str(&ex->req, "cmg-client-subject", d->subject);
    else if (id->method == CMG_ID_OIDC) {
        rc |= add_str(&ex->req, "cmg-client-user", id->subject);
        rc |= add_str(&ex->req, "cmg-client-tenant", id->tenant);
    }
    /* d->conn.peer is "ip:port" or "[ip6]:port" */
    snprintf(ip, sizeof(ip), "%s", d->conn.peer[0] == '[' ? d->conn.peer + 1 : d->conn.peer);
    colon = strrchr(ip, d->conn.peer[0] == '[' ? ']' : ':');
    if (colon)
        ip[colon - ip] = 0;
    rc |= cmg_headers_add(&ex->req, "x-forwarded-for", 15, ip, strlen(ip));
    rc |= cmg_headers_add(&ex->req, "x-forwarded-proto", 17, "https", 5);
    return rc ? -1 : 0;
}

struct cmg_answer cmg_answer_refusal(int status, const char *reason)
{
    return (struct cmg_answer){.status = status, .reason = reason, .max_age = -1};
}

void cmg_answer_release(struct cmg_answer *a)
{
    cmg_policy_unref(a->hold);
    a->hold = NULL;
    free(a->owned);
    a->owned = NULL;
}

/* The canonical target names the CRL (a query, which caches add, is ignored). */
static bool names_crl(const char *canon, size_t len)
{
    size_t n = strlen(CMG_CRL_PATH);
    return len >= n && !memcmp(canon, CMG_CRL_PATH, n) && (len == n || canon[n] == '?');
}

/* The CRL of the policy in force, to anyone: it is public, and devices and TLS
 * scanners need it without reaching the internal network. Never forwarded. */
static struct cmg_answer crl_answer(struct cmg_gateway *gw, const char *method, bool has_body)
{
    struct cmg_policy *p = gw->policy;
    struct cmg_answer a;
    int64_t left = p->crl_next_update - (int64_t)time(NULL);

    if (strcmp(method, "GET") && strcmp(method, "HEAD"))
        return cmg_answer_refusal(405, "CMGService_Method_Not_Allowed");
    if (has_body)   /* nothing to upload here: refused, not read */
        return cmg_answer_refusal(413, "CMGService_Request_Too_Large");
    if (!p->crl_der)
        return cmg_answer_refusal(404, "CMGService_No_CRL");
    a = cmg_answer_refusal(200, NULL);
    a.content_type = "application/pkix-crl";
    a.body = p->crl_der;
    a.body_len = p->crl_der_len;
    a.max_age = left < 0 ? 0 : left < CRL_MAX_AGE_S ? left : CRL_MAX_AGE_S;
    a.hold = cmg_policy_ref(p);
    return a;
}

struct cmg_exchange *cmg_admit(struct cmg_device *d, const char *method, const char *target,
                               size_t target_len, const struct cmg_headers *in,
                               int64_t content_length, bool has_body,
                               const struct cmg_exchange_dev_ops *ops, void *owner,
                               struct cmg_answer *answer)
{
    struct cmg_gateway *gw = d->gw;
    struct cmg_policy_mapping *m;
    struct cmg_identity id;
    struct cmg_exchange *ex = NULL;
    struct cmg_path p;
    char *canon = malloc(target_len + 1);
    const char *why = NULL;   /* the device's refusal line says 400 and the reason token */
    size_t canon_len = 0;
    int status = 500, rc;
    const char *reason = "CMGService_Out_Of_Memory", *claim = NULL;
    bool cert = false;

    *answer = cmg_answer_refusal(500, reason);
    if (!canon)
        goto out;
    /* From here on only the canonical form exists: it is judged, and it is forwarded. */
    if (cmg_path_canonical(target, target_len, canon, &canon_len, &why) < 0) {
        status = 400;
        reason = "CMGService_Bad_Request_Path";
        goto out;
    }
    if (names_crl(canon, canon_len)) {
        *answer = crl_answer(gw, method, has_body);
        status = 0;
        goto out;
    }
    if (cmg_analyze_names(canon, canon_len)) {
        *answer = cmg_analyze_answer(d, method, canon, canon_len, in, has_body);
        status = 0;
        goto out;
    }
    cmg_path_parse(canon, canon_len, &p);
    m = p.kind == CMG_PATH_OTHER ? NULL : cmg_policy_mapping(gw->policy, p.role, p.role_len);
    if (!m) {
        status = 404;
        reason = "CMGService_No_Mapping";
        goto out;
    }
    if ((rc = cmg_authenticate(d, gw->policy, m, &p, in, &id, &reason)) != 0) {
        status = rc;
        claim = id.failed_claim;
        cert = id.failed_cert;
        goto out;
    }
    if (content_length >= 0 && (uint64_t)content_length > m->max_body) {
        status = 413;
        reason = "CMGService_Request_Too_Large";
        goto out;
    }
    status = 500;
    reason = "CMGService_Out_Of_Memory";
    if (!(ex = cmg_exchange_new(gw, ops, owner)))
        goto out;
    ex->target = canon;
    canon = NULL;
    ex->mapping = m;
    if (build_headers(d, ex, in, content_length, &id) < 0) {
        cmg_exchange_free(ex);
        ex = NULL;
        goto out;
    }
    snprintf(ex->method, sizeof(ex->method), "%s", method);
    ex->policy = cmg_policy_ref(gw->policy);
    ex->req_body_expected = has_body;
    ex->auth_method = (uint8_t)id.method;
    snprintf(ex->peer, sizeof(ex->peer), "%s", d->conn.peer);
    snprintf(ex->identity, sizeof(ex->identity), "%s:%.100s", cmg_auth_method_name(id.method),
             id.method == CMG_ID_CERT ? d->thumbprint : id.device_id[0] ? id.device_id : id.subject);
    snprintf(ex->device_id, sizeof(ex->device_id), "%s", id.device_id);
out:
    if (!ex && status) {
        *answer = cmg_answer_refusal(status, reason);
        answer->claim = claim;
        answer->cert = cert;
    }
    free(canon);
    return ex;
}

/* The reason token the connector gave for its own 502/504 (CMG_REASON_HEADER), or
 * NULL. Only a token's characters are taken: it goes into the log as it is. */
static const char *connector_reason(const struct cmg_exchange *ex, size_t *len)
{
    int i = ex->resp_headers && (ex->status == 502 || ex->status == 504)
                ? cmg_headers_find(&ex->resp, CMG_REASON_HEADER)
                : -1;
    const char *v;

    if (i < 0)
        return NULL;
    v = cmg_headers_value(&ex->resp, (uint32_t)i);
    *len = ex->resp.v[i].value_len;
    if (*len == 0 || *len > 64)
        return NULL;
    for (size_t k = 0; k < *len; k++)
        if (!isalnum((unsigned char)v[k]) && v[k] != '_')
            return NULL;
    return v;
}

void cmg_exchange_log(struct cmg_exchange *ex, const char *outcome)
{
    size_t rlen = 0;
    const char *reason = connector_reason(ex, &rlen);
    const struct cmg_log_field f[] = {
        CMG_F_STR("peer", ex->peer),
        CMG_F_STR("method", ex->method),
        CMG_F_STR("path", ex->target),
        CMG_F_NUM("status", ex->status),
        CMG_F_NUM("bytes_in", ex->req_bytes),
        CMG_F_NUM("bytes_out", ex->resp_bytes),
        CMG_F_NUM("duration_ms", cmg_loop_now(ex->gw->loop) - ex->start_ms),
        CMG_F_STR("connector", ex->connector[0] ? ex->connector : NULL),
        CMG_F_STR("client", ex->identity),
        CMG_F_STR("role_id", ex->mapping ? ex->mapping->role : NULL),
        CMG_F_STR("auth", cmg_auth_method_name(ex->auth_method)),
        CMG_F_OPT("device_id", ex->device_id[0] ? ex->device_id : NULL),
        CMG_F_OPTN("reason", reason, rlen),
        CMG_F_OPT("outcome", outcome),
    };

    cmg_gw_metrics_exchange(ex->gw, ex);
    cmg_log_kv(CMG_LOG_INFO, "request", f, CMG_LOG_NFIELDS(f));
}

/* What the refusal says of the certificate: "none" if none was presented; else its names
 * and serial, and why it failed verification if it did. */
static const char *cert_presented(const struct cmg_device *d, const struct cmg_answer *a)
{
    return a->cert && !d->has_cert ? "none" : NULL;
}

static const char *verify_error(const struct cmg_device *d, const struct cmg_answer *a)
{
    return a->cert && d->has_cert && d->cert == CMG_CERT_INVALID
               ? X509_verify_cert_error_string(d->cert_error)
               : NULL;
}

void cmg_refusal_log(struct cmg_device *d, const char *method, const char *target,
                     size_t target_len, const struct cmg_answer *a, const char *error)
{
    bool named = a->cert && d->has_cert;
    const struct cmg_log_field f[] = {
        CMG_F_STR("peer", d->conn.peer),
        CMG_F_STR("method", method),
        CMG_F_STRN("path", target ? target : "-",
                   !target ? 1 : target_len > REFUSED_PATH_MAX ? REFUSED_PATH_MAX : target_len),
        CMG_F_NUM("status", a->status),
        CMG_F_STR("reason", a->reason ? a->reason : a->content_type),
        CMG_F_OPT("claim", a->claim),
        CMG_F_OPT("cert", cert_presented(d, a)),
        CMG_F_OPT("subject", named ? d->subject : NULL),
        CMG_F_OPT("issuer", named ? d->issuer : NULL),
        CMG_F_OPT("serial", named ? d->serial : NULL),
        CMG_F_OPT("verify_error", verify_error(d, a)),
        CMG_F_OPT("error", error),
    };

    cmg_log_kv_limited(&cmg_refused_requests, CMG_LOG_INFO,
                       a->content_type ? "answered" : "refused", f, CMG_LOG_NFIELDS(f));
    if (!a->content_type)
        cmg_gw_metrics_refusal(d->gw, a->reason);
}
