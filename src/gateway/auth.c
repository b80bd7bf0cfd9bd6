/* Credentials at the gateway (SPEC.md §4): a client certificate on MutualAuth
 * paths; on ServerAuth paths a bearer token — a site device token bound to the
 * connection's certificate, a bulk registration token (registration only), or an
 * Entra ID / OIDC token. Keys come from the signed policy only, each pinned to its
 * algorithm. Refusals carry a reason token for the device and the log. */
#include "auth/b64url.h"
#include "auth/jws.h"
#include "core/log.h"
#include "gateway/gw.h"
#include "tls/tls.h"

#include <openssl/x509_vfy.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

enum cmg_cert_state cmg_device_cert(struct cmg_device *d)
{
    struct cmg_policy *p = d->gw->policy;
    STACK_OF(X509) *chain;
    X509 *x;

    if (d->cert != CMG_CERT_UNKNOWN &&
        (d->cert_gen == d->gw->policy_gen ||
         (p->trust_digest && d->cert_trust == p->trust_digest))) {
        d->cert_gen = d->gw->policy_gen;   /* a new policy, the same trust: the same verdict */
        return d->cert;
    }
    x = d->conn.ssl ? SSL_get0_peer_certificate(d->conn.ssl) : NULL;
    d->cert_gen = d->gw->policy_gen;
    d->cert_trust = p->trust_digest;
    if (!x) {
        d->cert = CMG_CERT_NONE;
        return d->cert;
    }
    if (!d->has_cert) {
        unsigned char raw[32];
        d->has_cert = true;
        cmg_tls_thumbprint(x, d->thumbprint);
        cmg_tls_subject(x, d->subject, sizeof(d->subject));
        cmg_tls_issuer(x, d->issuer, sizeof(d->issuer));
        cmg_tls_serial(x, d->serial, sizeof(d->serial));
        for (int i = 0; i < 32; i++)
            sscanf(d->thumbprint + 2 * i, "%2hhx", &raw[i]);
        cmg_b64url_encode(raw, sizeof(raw), d->x5t, sizeof(d->x5t));
    }
    chain = cmg_tickets_peer_chain(d->conn.ssl);   /* a resumed session's: from its ticket */
    d->cert_error = cmg_policy_verify_cert(p, x, chain);
    sk_X509_pop_free(chain, X509_free);
    d->cert = d->cert_error == X509_V_OK ? CMG_CERT_OK : CMG_CERT_INVALID;
    return d->cert;
}

/* Every certificate device is refused while the CRL cannot be used: the operator must
 * hear of it, but once a minute is enough whatever the number of devices. */
static void warn_crl(struct cmg_device *d)
{
    static time_t last;
    static unsigned long quiet;
    time_t now = time(NULL);

    if (last && now - last < 60) {
        quiet++;
        return;
    }
    cmg_warn("client certificates refused: the CRL of policy version %lld cannot be used "
             "(%s); the site must publish a fresh one (%lu more refusal(s) since the last "
             "warning) subject=\"%s\"",
             (long long)d->gw->policy->version, X509_verify_cert_error_string(d->cert_error),
             quiet, d->subject);
    last = now;
    quiet = 0;
}

/* A refusal for the claim that failed: the status, with the claim (for the log line) and
 * the check in words (for the analyser) noted. */
static int refused(struct cmg_identity *id, const char *claim, const char *check, int status)
{
    id->failed_claim = claim;
    id->check = check;
    return status;
}

#define EXPIRY_CHECK "expiry: outside its validity (nbf/exp) with the clock skew allowed"

/* The time claim that cmg_jwt_check_time found wrong. */
static const char *time_claim(int verdict)
{
    return verdict == CMG_JWT_NOT_YET ? "nbf" : "exp";
}

const char *cmg_auth_method_name(enum cmg_auth_method m)
{
    static const char *const names[] = {
        [CMG_ID_CERT] = "cert", [CMG_ID_SITE_TOKEN] = "site-token",
        [CMG_ID_BULK_TOKEN] = "bulk-token", [CMG_ID_OIDC] = "oidc"};
    return (unsigned)m < sizeof(names) / sizeof(names[0]) ? names[m] : "-";
}

int cmg_device_cert_verdict(struct cmg_device *d, const char **reason, const char **check)
{
    if (cmg_device_cert(d) == CMG_CERT_OK)
        return 0;
    *check = d->cert == CMG_CERT_NONE ? "no client certificate presented"
                                      : X509_verify_cert_error_string(d->cert_error);
    if (d->cert == CMG_CERT_INVALID && d->cert_error == X509_V_ERR_CERT_REVOKED) {
        *reason = "CMGService_Client_Certificate_Revoked";
        return 403;
    }
    if (d->cert == CMG_CERT_INVALID && cmg_policy_crl_error(d->cert_error)) {
        warn_crl(d);
        *reason = "CMGService_CRL_Unavailable";
    } else
        *reason = "CMGService_Invalid_Client_Certificate";
    return 401;
}

static int cert_auth(struct cmg_device *d, struct cmg_policy_mapping *m,
                     struct cmg_identity *id, const char **reason)
{
    int rc;

    if (!(m->auth & CMG_AUTH_CERT)) {
        *reason = "CMGService_Auth_Mode_Not_Allowed";
        id->check = "the mapping does not allow client certificates";
        return 403;
    }
    if ((rc = cmg_device_cert_verdict(d, reason, &id->check)) != 0) {
        id->failed_cert = true;
        return rc;
    }
    id->method = CMG_ID_CERT;
    snprintf(id->subject, sizeof(id->subject), "%s", d->subject);
    snprintf(id->device_id, sizeof(id->device_id), "cert:%s", d->thumbprint);
    return 0;
}

/* The bearer token of the request, or NULL. */
static const char *bearer(const struct cmg_headers *in, size_t *len)
{
    int i = cmg_headers_find(in, "authorization");
    const char *v;
    size_t n;

    if (i < 0)
        return NULL;
    v = cmg_headers_value(in, (uint32_t)i);
    n = in->v[i].value_len;
    if (n < 8 || strncasecmp(v, "Bearer ", 7))
        return NULL;
    v += 7;
    n -= 7;
    while (n && *v == ' ')
        v++, n--;
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    *len = n;
    return n ? v : NULL;
}

static bool is_register(const struct cmg_path *path)
{
    size_t n = path->rest_len;
    const char *q = memchr(path->rest, '?', n);

    if (q)
        n = (size_t)(q - path->rest);
    return n == 9 && !memcmp(path->rest, "/register", 9);
}

static int site_token(struct cmg_device *d, struct cmg_policy *p, struct cmg_policy_mapping *m,
                      const struct cmg_path *path, const struct cmg_jws *j,
                      struct cmg_identity *id, const char **reason, int64_t now)
{
    const struct cmg_jwk *key = cmg_jwks_find(&p->site_keys, cmg_jws_header_str(j, "kid"));
    const char *use = cmg_jwt_str(j->payload, "cmg_use"), *jti = cmg_jwt_str(j->payload, "jti");
    const cJSON *cnf = cJSON_GetObjectItemCaseSensitive(j->payload, "cnf");
    const char *x5t = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cnf, "x5t#S256"));
    const char *sub = cmg_jwt_str(j->payload, "sub");
    int when;

    *reason = "CMGService_Invalid_Token";
    if (!key)
        return refused(id, "kid", "signature: no site key of the policy has the token's key id", 401);
    if (cmg_jws_verify(j, key) < 0)
        return refused(id, "signature", "signature", 401);
    if (!cmg_jwt_aud_has(j->payload, p->service_name))
        return refused(id, "aud", "audience: not the gateway's service name", 401);
    if (!use || !jti)
        return refused(id, use ? "jti" : "cmg_use", "claims: no cmg_use or jti", 401);
    if ((when = cmg_jwt_check_time(j->payload, now, p->clock_skew)) != CMG_JWT_TIME_OK) {
        *reason = "CMGService_Token_Expired";
        return refused(id, time_claim(when), EXPIRY_CHECK, 401);
    }
    if (cmg_policy_token_revoked(p, jti)) {
        *reason = "CMGService_Token_Blocked";
        return refused(id, "jti", "revocation: the token is blocked", 403);
    }
    snprintf(id->jti, sizeof(id->jti), "%s", jti);
    cmg_device_cert(d);   /* for the thumbprint of whatever was presented */
    if (!strcmp(use, "bulk")) {
        if (strcmp(m->type, "site") || !is_register(path)) {
            *reason = "CMGService_Bulk_Token_Registration_Only";
            return refused(id, "cmg_use", "use: a bulk token serves registration only", 403);
        }
        if (!d->has_cert) {
            *reason = "CMGService_Client_Certificate_Required";
            id->failed_cert = true;
            id->check = "binding: no client certificate presented";
            return 401;
        }
        id->method = CMG_ID_BULK_TOKEN;
        snprintf(id->subject, sizeof(id->subject), "bulk:%s", jti);
        return 0;
    }
    if (strcmp(use, "device") || !sub)
        return refused(id, sub ? "cmg_use" : "sub", "claims: not a device token, or no sub", 401);
    if (!(m->auth & CMG_AUTH_TOKEN)) {
        *reason = "CMGService_Auth_Mode_Not_Allowed";
        id->check = "the mapping does not allow device tokens";
        return 403;
    }
    /* RFC 8705: the token is good only on a connection holding its certificate. */
    if (!d->has_cert || !x5t || strcmp(x5t, d->x5t)) {
        *reason = "CMGService_Token_Certificate_Mismatch";
        id->failed_cert = true;
        return refused(id, "cnf", !d->has_cert ? "binding: no client certificate presented"
                                               : "binding: the token names another certificate (cnf)",
                       401);
    }
    if (cmg_policy_device_blocked(p, sub)) {
        *reason = "CMGService_Device_Blocked";
        return refused(id, "sub", "the device is blocked", 403);
    }
    id->method = CMG_ID_SITE_TOKEN;
    snprintf(id->device_id, sizeof(id->device_id), "%s", sub);
    snprintf(id->subject, sizeof(id->subject), "%s", sub);
    return 0;
}

/* 'cmg site device block' lists identities that are no registered device as
 * "cert:<thumbprint>" and "oidc:<id>". */
static bool blocked_as(const struct cmg_policy *p, const char *kind, const char *id)
{
    char key[300];

    return id[0] && p->nblocked_devices &&
           snprintf(key, sizeof(key), "%s%s", kind, id) < (int)sizeof(key) &&
           cmg_policy_device_blocked(p, key);
}

static int oidc_token(struct cmg_gateway *gw, struct cmg_policy *p, struct cmg_policy_mapping *m,
                      const struct cmg_jws *j, struct cmg_identity *id, const char **reason,
                      int64_t now)
{
    const char *kid = cmg_jws_header_str(j, "kid");
    const struct cmg_jwk *key = cmg_jwks_find(&p->oidc_keys, kid);
    const char *tid = cmg_jwt_str(j->payload, "tid"), *name;
    const cJSON *aud = cJSON_GetObjectItemCaseSensitive(j->payload, "aud"), *a;
    bool aud_ok = false;
    int when;

    *reason = "CMGService_Invalid_Token";
    if (!(m->auth & CMG_AUTH_OIDC)) {
        *reason = "CMGService_Auth_Mode_Not_Allowed";
        id->check = "the mapping does not allow OIDC tokens";
        return 403;
    }
    if (!key && kid)   /* the provider may have rotated its keys: the site refreshes them */
        cmg_tunnel_report_unknown_kid(gw, kid);
    if (!key)
        return refused(id, "kid", "signature: no key of the issuer has the token's key id", 401);
    if (cmg_jws_verify(j, key) < 0)
        return refused(id, "signature", "signature", 401);
    if (p->oidc_tenant[0] && (!tid || strcmp(tid, p->oidc_tenant))) {
        *reason = "CMGService_Wrong_Tenant";
        return refused(id, "tid", "tenant: tid is not the policy's tenant", 401);
    }
    if (cJSON_IsString(aud))
        aud_ok = cmg_policy_audience(p, aud->valuestring);
    else
        cJSON_ArrayForEach(a, aud) aud_ok |= cJSON_IsString(a) && cmg_policy_audience(p, a->valuestring);
    if (!aud_ok) {
        *reason = "CMGService_Wrong_Audience";
        return refused(id, "aud", "audience: none of the policy's audiences", 401);
    }
    if ((when = cmg_jwt_check_time(j->payload, now, p->clock_skew)) != CMG_JWT_TIME_OK) {
        *reason = "CMGService_Token_Expired";
        return refused(id, time_claim(when), EXPIRY_CHECK, 401);
    }
    id->method = CMG_ID_OIDC;
    name = cmg_jwt_str(j->payload, "upn");
    if (!name)
        name = cmg_jwt_str(j->payload, "preferred_username");
    if (!name)
        name = cmg_jwt_str(j->payload, "sub");
    snprintf(id->subject, sizeof(id->subject), "%s", name ? name : "");
    snprintf(id->tenant, sizeof(id->tenant), "%s", tid ? tid : "");
    name = cmg_jwt_str(j->payload, "deviceid");
    if (!name)
        name = cmg_jwt_str(j->payload, "oid");
    snprintf(id->device_id, sizeof(id->device_id), "%s", name ? name : "");
    name = cmg_jwt_str(j->payload, "jti");
    if (name && cmg_policy_token_revoked(p, name)) {
        *reason = "CMGService_Token_Blocked";
        return refused(id, "jti", "revocation: the token is blocked", 403);
    }
    if (blocked_as(p, "oidc:", id->device_id) || blocked_as(p, "oidc:", id->subject)) {
        *reason = "CMGService_Device_Blocked";
        return refused(id, blocked_as(p, "oidc:", id->device_id) ? "deviceid" : "upn",
                       "the device is blocked", 403);
    }
    return 0;
}

/* A device sends the same token with every request of a connection: the verdict
 * is kept for as long as nothing it depends on changes (the token, the policy, the
 * mapping, the path being the registration one), and the token has not expired. */
struct cmg_token_cache {
    uint64_t gen;
    const struct cmg_policy_mapping *m;
    bool reg;
    int64_t exp;
    struct cmg_identity id;
    size_t len;
    char token[];
};

static bool cached(const struct cmg_device *d, const char *tok, size_t len,
                   const struct cmg_policy_mapping *m, bool reg, int64_t now)
{
    const struct cmg_token_cache *c = d->tok;
    return c && c->gen == d->gw->policy_gen && c->m == m && c->reg == reg && c->len == len &&
           now < c->exp && !memcmp(c->token, tok, len);
}

static void remember(struct cmg_device *d, const char *tok, size_t len,
                     const struct cmg_policy_mapping *m, bool reg, int64_t exp,
                     const struct cmg_identity *id)
{
    struct cmg_token_cache *c = d->tok && d->tok->len >= len ? d->tok : NULL;

    if (!c) {
        free(d->tok);
        d->tok = c = malloc(sizeof(*c) + len);
        if (!c)
            return;
    }
    c->gen = d->gw->policy_gen;
    c->m = m;
    c->reg = reg;
    c->exp = exp;
    c->id = *id;
    c->len = len;
    memcpy(c->token, tok, len);
}

int64_t cmg_device_token_expiry(const struct cmg_device *d)
{
    return d->tok ? d->tok->exp : 0;
}

static int token_auth(struct cmg_device *d, struct cmg_policy *p, struct cmg_policy_mapping *m,
                      const struct cmg_path *path, const struct cmg_headers *in,
                      struct cmg_identity *id, const char **reason)
{
    size_t len = 0;
    const char *tok = bearer(in, &len), *iss;
    int64_t now = (int64_t)time(NULL), exp;
    bool reg = is_register(path);
    struct cmg_jws j;
    int rc = 401;

    *reason = "CMGService_Invalid_Token";
    if (!tok || len > CMG_JWS_MAX)
        return refused(id, tok ? "format" : "bearer",
                       !tok ? "no bearer token" : "token longer than accepted", 401);
    if (cached(d, tok, len, m, reg, now)) {
        *id = d->tok->id;
        return 0;
    }
    if (cmg_jws_parse(tok, len, &j) < 0)
        return refused(id, "format", "format: not a compact JWS", 401);
    iss = cmg_jwt_str(j.payload, "iss");
    if (iss && p->issuer[0] && !strcmp(iss, p->issuer))
        rc = site_token(d, p, m, path, &j, id, reason, now);
    else if (iss && p->oidc && !strcmp(iss, p->oidc_issuer))
        rc = oidc_token(d->gw, p, m, &j, id, reason, now);
    else   /* no issuer this gateway knows */
        rc = refused(id, "iss", "issuer: neither the site nor the policy's OIDC issuer", 401);
    exp = cmg_jwt_time(j.payload, "exp");
    if (rc == 0 && exp > 0)
        remember(d, tok, len, m, reg, exp + p->clock_skew, id);
    cmg_jws_free(&j);
    return rc;
}

int cmg_authenticate(struct cmg_device *d, struct cmg_policy *p, struct cmg_policy_mapping *m,
                     const struct cmg_path *path, const struct cmg_headers *in,
                     struct cmg_identity *id, const char **reason)
{
    int rc;

    memset(id, 0, sizeof(*id));
    rc = path->kind == CMG_PATH_MUTUAL_AUTH ? cert_auth(d, m, id, reason)
                                            : token_auth(d, p, m, path, in, id, reason);
    /* A blocked certificate is refused whatever credential rides on its connection. */
    if (rc == 0 && d->has_cert && blocked_as(p, "cert:", d->thumbprint)) {
        *reason = "CMGService_Device_Blocked";
        id->failed_cert = true;
        id->check = "the certificate is blocked";
        rc = 403;
    }
    return rc;
}
