/* Parsing and verifying the gateway policy; see policy.h. */
#include "auth/policy.h"

#include "auth/jws.h"
#include "auth/keychain.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_MAPPINGS 4096
#define MAX_LIST 1000000

struct cmg_policy *cmg_policy_new(void)
{
    struct cmg_policy *p = calloc(1, sizeof(*p));

    if (p)
        p->refs = 1;
    return p;
}

struct cmg_policy *cmg_policy_ref(struct cmg_policy *p)
{
    if (p)
        p->refs++;
    return p;
}

static void free_list(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

void cmg_policy_unref(struct cmg_policy *p)
{
    if (!p || --p->refs > 0)
        return;
    free(p->mappings);
    X509_STORE_free(p->trust);
    free(p->crl_der);
    cmg_jwks_free(&p->site_keys);
    cmg_jwks_free(&p->oidc_keys);
    free_list(p->oidc_audiences, p->noidc_audiences);
    free_list(p->blocked_devices, p->nblocked_devices);
    free_list(p->revoked_tokens, p->nrevoked_tokens);
    free_list(p->revoked_connectors, p->nrevoked_connectors);
    free(p);
}

int cmg_policy_load_site_key(const char *file, struct cmg_jwk *key, char *err, size_t errlen)
{
    FILE *f = fopen(file, "r");
    EVP_PKEY *pk = f ? PEM_read_PUBKEY(f, NULL, NULL, NULL) : NULL;
    char group[32] = "";

    if (f)
        fclose(f);
    memset(key, 0, sizeof(*key));
    if (!pk || !EVP_PKEY_is_a(pk, "EC") ||
        !EVP_PKEY_get_utf8_string_param(pk, "group", group, sizeof(group), NULL) ||
        strcmp(group, "prime256v1")) {
        snprintf(err, errlen, "%s: %s", file, pk ? "not an EC P-256 public key"
                                              : "cannot read a PEM public key");
        EVP_PKEY_free(pk);
        return -1;
    }
    key->pkey = pk;
    key->alg = CMG_ALG_ES256;
    if (cmg_jwk_thumbprint(pk, key->kid) < 0)
        key->kid[0] = 0;
    return 0;
}

struct cmg_policy_mapping *cmg_policy_mapping(struct cmg_policy *p, const char *role,
                                              size_t role_len)
{
    for (size_t i = 0; i < p->nmappings; i++)
        if (strlen(p->mappings[i].role) == role_len &&
            !memcmp(p->mappings[i].role, role, role_len))
            return &p->mappings[i];
    return NULL;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool in_sorted(char **v, size_t n, const char *s)
{
    return s && n && bsearch(&s, v, n, sizeof(*v), cmp_str) != NULL;
}

bool cmg_policy_device_blocked(const struct cmg_policy *p, const char *id)
{
    return in_sorted(p->blocked_devices, p->nblocked_devices, id);
}

bool cmg_policy_token_revoked(const struct cmg_policy *p, const char *jti)
{
    return in_sorted(p->revoked_tokens, p->nrevoked_tokens, jti);
}

bool cmg_policy_connector_revoked(const struct cmg_policy *p, const char *serial)
{
    return in_sorted(p->revoked_connectors, p->nrevoked_connectors, serial);
}

bool cmg_policy_audience(const struct cmg_policy *p, const char *aud)
{
    for (size_t i = 0; i < p->noidc_audiences; i++)
        if (!strcmp(p->oidc_audiences[i], aud))
            return true;
    return false;
}

/* The site signs its CRL at its own "now": a gateway whose clock is behind sees
 * a thisUpdate in the future. Up to the policy's clock skew that is not an error. */
static int crl_skew_tolerant(int ok, X509_STORE_CTX *ctx)
{
    const struct cmg_policy *p = X509_STORE_CTX_get_app_data(ctx);
    X509_CRL *crl = X509_STORE_CTX_get0_current_crl(ctx);
    time_t latest = time(NULL) + (time_t)(p ? p->clock_skew : 0);

    if (!ok && X509_STORE_CTX_get_error(ctx) == X509_V_ERR_CRL_NOT_YET_VALID && crl &&
        X509_cmp_time(X509_CRL_get0_lastUpdate(crl), &latest) < 0)
        return 1;
    return ok;
}

long cmg_policy_verify_cert(const struct cmg_policy *p, X509 *leaf, STACK_OF(X509) *chain)
{
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    long rc = X509_V_ERR_OUT_OF_MEM;

    if (!p->trust) {
        rc = X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY;
    } else if (ctx && X509_STORE_CTX_init(ctx, p->trust, leaf, chain)) {
        X509_VERIFY_PARAM *param = X509_STORE_CTX_get0_param(ctx);
        X509_VERIFY_PARAM_set_purpose(param, X509_PURPOSE_SSL_CLIENT);
        X509_VERIFY_PARAM_set_auth_level(param, 2);
        if (p->check_revocation) {
            X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_CRL_CHECK);
            X509_STORE_CTX_set_app_data(ctx, (void *)p);
            X509_STORE_CTX_set_verify_cb(ctx, crl_skew_tolerant);
        }
        rc = X509_verify_cert(ctx) == 1 ? X509_V_OK : X509_STORE_CTX_get_error(ctx);
    }
    X509_STORE_CTX_free(ctx);
    return rc;
}

bool cmg_policy_crl_error(long verify_error)
{
    switch (verify_error) {
    case X509_V_ERR_UNABLE_TO_GET_CRL:
    case X509_V_ERR_UNABLE_TO_DECRYPT_CRL_SIGNATURE:
    case X509_V_ERR_CRL_SIGNATURE_FAILURE:
    case X509_V_ERR_CRL_NOT_YET_VALID:
    case X509_V_ERR_CRL_HAS_EXPIRED:
    case X509_V_ERR_ERROR_IN_CRL_LAST_UPDATE_FIELD:
    case X509_V_ERR_ERROR_IN_CRL_NEXT_UPDATE_FIELD:
    case X509_V_ERR_UNABLE_TO_GET_CRL_ISSUER:
    case X509_V_ERR_KEYUSAGE_NO_CRL_SIGN:
    case X509_V_ERR_DIFFERENT_CRL_SCOPE:
    case X509_V_ERR_CRL_PATH_VALIDATION_ERROR:
        return true;
    default:
        return false;
    }
}

/* ---- parsing ---- */

static const char *str(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int copy_str(char *out, size_t len, const char *s)
{
    if (!s || strlen(s) >= len)
        return -1;
    memcpy(out, s, strlen(s) + 1);
    return 0;
}

static int parse_auth(const cJSON *arr, unsigned *auth)
{
    const cJSON *a;

    *auth = 0;
    cJSON_ArrayForEach(a, arr) {
        if (!cJSON_IsString(a))
            return -1;
        if (!strcmp(a->valuestring, "cert"))
            *auth |= CMG_AUTH_CERT;
        else if (!strcmp(a->valuestring, "token"))
            *auth |= CMG_AUTH_TOKEN;
        else if (!strcmp(a->valuestring, "oidc"))
            *auth |= CMG_AUTH_OIDC;
        /* modes of later versions are ignored: never granted */
    }
    return 0;
}

static bool role_ok(const char *r)
{
    size_t n = r ? strlen(r) : 0;
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((r[i] >= 'a' && r[i] <= 'z') || (r[i] >= 'A' && r[i] <= 'Z') ||
              (r[i] >= '0' && r[i] <= '9') || r[i] == '_' || r[i] == '-'))
            return false;
    return true;
}

static int parse_mappings(struct cmg_policy *p, const cJSON *arr, char *err, size_t errlen)
{
    const cJSON *m;
    size_t n = (size_t)cJSON_GetArraySize(arr);

    if (!cJSON_IsArray(arr) || n > MAX_MAPPINGS) {
        snprintf(err, errlen, "mappings: not an array of at most %d", MAX_MAPPINGS);
        return -1;
    }
    if (!(p->mappings = calloc(n ? n : 1, sizeof(*p->mappings))))
        return -1;
    cJSON_ArrayForEach(m, arr) {
        struct cmg_policy_mapping *pm = &p->mappings[p->nmappings];
        const cJSON *mb = cJSON_GetObjectItemCaseSensitive(m, "max_body");
        const char *role = str(m, "role"), *type = str(m, "type");
        if (!role_ok(role) || !type || copy_str(pm->type, sizeof(pm->type), type) < 0 ||
            !cJSON_IsNumber(mb) || mb->valuedouble < 0 || mb->valuedouble > 1e18 ||
            parse_auth(cJSON_GetObjectItemCaseSensitive(m, "auth"), &pm->auth) < 0) {
            snprintf(err, errlen, "mappings: entry %zu is malformed", p->nmappings + 1);
            return -1;
        }
        copy_str(pm->role, sizeof(pm->role), role);
        pm->max_body = (uint64_t)mb->valuedouble;
        pm->forward_authorization =
            cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "forward_authorization"));
        p->nmappings++;
    }
    return 0;
}

/* An array of strings, sorted, into *v. */
static int parse_list(const cJSON *arr, char ***v, size_t *n)
{
    const cJSON *s;
    size_t len = (size_t)cJSON_GetArraySize(arr);

    *v = NULL;
    *n = 0;
    if (!arr)
        return 0;
    if (!cJSON_IsArray(arr) || len > MAX_LIST || !(*v = calloc(len ? len : 1, sizeof(**v))))
        return -1;
    cJSON_ArrayForEach(s, arr) {
        if (!cJSON_IsString(s) || !((*v)[*n] = strdup(s->valuestring)))
            return -1;
        (*n)++;
    }
    qsort(*v, *n, sizeof(**v), cmp_str);
    return 0;
}

/* The site's CRL, in the form the gateway serves it (DER), with its nextUpdate. */
static void keep_crl(struct cmg_policy *p, X509_CRL *x)
{
    const ASN1_TIME *next = X509_CRL_get0_nextUpdate(x);
    unsigned char *der = NULL;
    int len = i2d_X509_CRL(x, &der);
    struct tm tm;

    if (len <= 0)
        return;
    p->crl_der = malloc((size_t)len);
    if (p->crl_der) {
        memcpy(p->crl_der, der, (size_t)len);
        p->crl_der_len = (size_t)len;
    }
    OPENSSL_free(der);
    if (next && ASN1_TIME_to_tm(next, &tm))
        p->crl_next_update = (int64_t)timegm(&tm);
}

static int parse_trust(struct cmg_policy *p, const cJSON *pl, char *err, size_t errlen)
{
    const cJSON *ctl = cJSON_GetObjectItemCaseSensitive(pl, "ctl"), *c;
    const char *crl = str(pl, "crl");
    int ncerts = 0;

    if (!(p->trust = X509_STORE_new()))
        return -1;
    cJSON_ArrayForEach(c, ctl) {
        BIO *b = cJSON_IsString(c) ? BIO_new_mem_buf(c->valuestring, -1) : NULL;
        X509 *x = b ? PEM_read_bio_X509(b, NULL, NULL, NULL) : NULL;
        int ok = x && X509_STORE_add_cert(p->trust, x);
        X509_free(x);
        BIO_free(b);
        if (!ok) {
            snprintf(err, errlen, "ctl: entry %d is not a PEM certificate", ncerts + 1);
            return -1;
        }
        ncerts++;
    }
    if (crl) {
        BIO *b = BIO_new_mem_buf(crl, -1);
        X509_CRL *x;
        while (b && (x = PEM_read_bio_X509_CRL(b, NULL, NULL, NULL))) {
            X509_STORE_add_crl(p->trust, x);
            if (!p->crl_der)
                keep_crl(p, x);
            X509_CRL_free(x);
        }
        BIO_free(b);
        ERR_clear_error();   /* the end of the PEM data */
    }
    return 0;
}

/* What a certificate's verdict depends on (the CTL, the CRL, whether it is checked, the
 * clock skew), as 64 bits: a new policy with the same value keeps the verdicts made under
 * the old one, so that publishing a policy does not verify every connected certificate
 * again. 0: none could be made (never equal to another). */
static uint64_t trust_digest(const struct cmg_policy *p, const cJSON *pl)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned char out[EVP_MAX_MD_SIZE];
    const cJSON *c;
    const char *crl = str(pl, "crl");
    int64_t flags[2] = {p->check_revocation, p->clock_skew};
    uint64_t d = 0;
    bool ok = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL);

    cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(pl, "ctl"))
        ok = ok && cJSON_IsString(c) &&
             EVP_DigestUpdate(md, c->valuestring, strlen(c->valuestring) + 1);
    ok = ok && EVP_DigestUpdate(md, "|", 1) && (!crl || EVP_DigestUpdate(md, crl, strlen(crl))) &&
         EVP_DigestUpdate(md, flags, sizeof(flags)) && EVP_DigestFinal_ex(md, out, NULL);
    if (ok) {
        memcpy(&d, out, sizeof(d));
        d |= 1;
    }
    EVP_MD_CTX_free(md);
    return d;
}

static int parse_oidc(struct cmg_policy *p, const cJSON *o, char *err, size_t errlen)
{
    char jerr[256];

    if (!o || cJSON_IsNull(o))
        return 0;
    if (copy_str(p->oidc_issuer, sizeof(p->oidc_issuer), str(o, "issuer")) < 0 ||
        copy_str(p->oidc_tenant, sizeof(p->oidc_tenant), str(o, "tenant") ? str(o, "tenant") : "") < 0 ||
        parse_list(cJSON_GetObjectItemCaseSensitive(o, "audiences"), &p->oidc_audiences,
                   &p->noidc_audiences) < 0 ||
        cmg_jwks_from_json(cJSON_GetObjectItemCaseSensitive(o, "jwks"), &p->oidc_keys, jerr,
                           sizeof(jerr)) < 0) {
        snprintf(err, errlen, "oidc: malformed");
        return -1;
    }
    p->oidc = p->oidc_issuer[0] && p->noidc_audiences > 0;
    return 0;
}

static int parse_payload(struct cmg_policy *p, const cJSON *pl, char *err, size_t errlen)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(pl, "version");
    const cJSON *limits = cJSON_GetObjectItemCaseSensitive(pl, "limits");
    const cJSON *skew = cJSON_GetObjectItemCaseSensitive(limits, "clock_skew");
    char jerr[256];

    if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > 9e15) {
        snprintf(err, errlen, "no version");
        return -1;
    }
    p->version = (int64_t)v->valuedouble;
    if (copy_str(p->service_name, sizeof(p->service_name), str(pl, "service_name")) < 0 ||
        copy_str(p->issuer, sizeof(p->issuer), str(pl, "iss")) < 0 ||
        copy_str(p->site_role, sizeof(p->site_role), str(pl, "site_role")) < 0) {
        snprintf(err, errlen, "service_name, iss or site_role missing");
        return -1;
    }
    if (parse_mappings(p, cJSON_GetObjectItemCaseSensitive(pl, "mappings"), err, errlen) < 0 ||
        parse_trust(p, pl, err, errlen) < 0 || parse_oidc(p, cJSON_GetObjectItemCaseSensitive(pl, "oidc"), err, errlen) < 0)
        return -1;
    p->check_revocation = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pl, "check_revocation"));
    if (cmg_jwks_from_json(cJSON_GetObjectItemCaseSensitive(pl, "site_keys"), &p->site_keys,
                           jerr, sizeof(jerr)) < 0) {
        snprintf(err, errlen, "site_keys: %s", jerr);
        return -1;
    }
    if (parse_list(cJSON_GetObjectItemCaseSensitive(pl, "blocked_devices"), &p->blocked_devices,
                   &p->nblocked_devices) < 0 ||
        parse_list(cJSON_GetObjectItemCaseSensitive(pl, "revoked_tokens"), &p->revoked_tokens,
                   &p->nrevoked_tokens) < 0) {
        snprintf(err, errlen, "blocked_devices or revoked_tokens malformed");
        return -1;
    }
    if (parse_list(cJSON_GetObjectItemCaseSensitive(pl, "revoked_connectors"),
                   &p->revoked_connectors, &p->nrevoked_connectors) < 0) {
        snprintf(err, errlen, "revoked_connectors malformed");
        return -1;
    }
    {
        const cJSON *iat = cJSON_GetObjectItemCaseSensitive(pl, "iat");
        p->issued_at = cJSON_IsNumber(iat) && iat->valuedouble > 0 && iat->valuedouble < 1e11
                           ? (int64_t)iat->valuedouble : 0;
    }
    p->clock_skew = cJSON_IsNumber(skew) && skew->valuedouble >= 0 && skew->valuedouble <= 3600
                        ? (int64_t)skew->valuedouble : 120;
    p->trust_digest = trust_digest(p, pl);
    return 0;
}

int cmg_policy_from_json(const char *json, size_t len, struct cmg_policy **out, char *err,
                         size_t errlen)
{
    cJSON *doc = cJSON_ParseWithLength(json, len);
    struct cmg_policy *p = NULL;
    int rc = -1;

    *out = NULL;
    if (!cJSON_IsObject(doc))
        snprintf(err, errlen, "not a JSON object");
    else if ((p = cmg_policy_new()) && parse_payload(p, doc, err, errlen) == 0) {
        *out = p;
        p = NULL;
        rc = 0;
    }
    cmg_policy_unref(p);
    cJSON_Delete(doc);
    return rc;
}

int cmg_policy_from_jws(const char *jws, size_t len, struct cmg_keychain *site_keys,
                        struct cmg_policy **out, char *err, size_t errlen)
{
    struct cmg_policy *p = NULL;
    struct cmg_jws j;
    const char *typ;
    int rc = -1;

    *out = NULL;
    if (cmg_jws_parse_limit(jws, len, CMG_POLICY_MAX, &j) < 0) {
        snprintf(err, errlen, "not a signed policy (malformed JWS)");
        return -1;
    }
    typ = cmg_jws_header_str(&j, "typ");
    if (!typ || strcmp(typ, CMG_POLICY_TYP)) {
        snprintf(err, errlen, "not a policy (typ is not %s)", CMG_POLICY_TYP);
        goto out;
    }
    if (cmg_keychain_verify(site_keys, &j, NULL, err, errlen) < 0)
        goto out;
    if (!(p = cmg_policy_new()) || parse_payload(p, j.payload, err, errlen) < 0)
        goto out;
    *out = p;
    p = NULL;
    rc = 0;
out:
    cmg_policy_unref(p);
    cmg_jws_free(&j);
    return rc;
}
