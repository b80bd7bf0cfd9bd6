/* Building the gateway policy; see policy_build.h and docs/policy.md. */
#include "site/policy_build.h"

#include "auth/jws.h"
#include "auth/keychain.h"
#include "core/log.h"
#include "auth/policy.h"
#include "site/signing.h"

#include <openssl/bn.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CRL_DAYS 7
#define CLOCK_SKEW 120

static char *bio_string(BIO *bio)
{
    char *data, *s;
    long len = BIO_get_mem_data(bio, &data);

    if (len < 0 || !(s = malloc((size_t)len + 1)))
        return NULL;
    memcpy(s, data, (size_t)len);
    s[len] = 0;
    return s;
}

static int crl_add(X509_CRL *crl, const char *serial_hex, int64_t when)
{
    X509_REVOKED *r = X509_REVOKED_new();
    ASN1_INTEGER *serial = NULL;
    ASN1_TIME *t = ASN1_TIME_set(NULL, (time_t)when);
    BIGNUM *bn = NULL;
    int ok = r && t && BN_hex2bn(&bn, serial_hex) > 0 &&
             (serial = BN_to_ASN1_INTEGER(bn, NULL)) && X509_REVOKED_set_serialNumber(r, serial) &&
             X509_REVOKED_set_revocationDate(r, t) && X509_CRL_add0_revoked(crl, r);

    if (!ok)
        X509_REVOKED_free(r);
    ASN1_INTEGER_free(serial);
    ASN1_TIME_free(t);
    BN_free(bn);
    return ok ? 0 : -1;
}

bool cmg_site_revocation_checked(struct cmg_site_ctx *s)
{
    char setting[16] = "on";

    cmg_store_get_setting(s->store, "check_revocation", setting, sizeof(setting));
    return strcmp(setting, "off") != 0;
}

void cmg_site_crl_freshness(time_t signed_at, time_t now)
{
    static time_t last_warning;
    time_t expires = signed_at + CRL_DAYS * 86400;
    char when[32];
    struct tm tm;

    if (!signed_at || expires - now > CRL_DAYS * 86400 / 2 ||
        (last_warning && now - last_warning < 3600))
        return;
    gmtime_r(&expires, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    cmg_warn("the CRL published to gateways expires at %s and the policy has not been "
             "re-signed for %lld hour(s): from then on gateways refuse every certificate "
             "device (CMGService_CRL_Unavailable); see why the site cannot publish",
             when, (long long)(now - signed_at) / 3600);
    last_warning = now;
}

char *cmg_site_crl_pem(struct cmg_site_ctx *s)
{
    cJSON *revoked = cmg_store_certs_json(s->store, true), *r;
    X509_CRL *crl = X509_CRL_new();
    ASN1_TIME *now = ASN1_TIME_set(NULL, time(NULL));
    ASN1_TIME *next = ASN1_TIME_adj(NULL, time(NULL), CRL_DAYS, 0);
    BIO *bio = BIO_new(BIO_s_mem());
    char *pem = NULL;
    int ok = revoked && crl && now && next && bio && X509_CRL_set_version(crl, X509_CRL_VERSION_2) &&
             X509_CRL_set_issuer_name(crl, X509_get_subject_name(s->ca_cert)) &&
             X509_CRL_set1_lastUpdate(crl, now) && X509_CRL_set1_nextUpdate(crl, next);

    cJSON_ArrayForEach(r, revoked) {
        const cJSON *serial = cJSON_GetObjectItemCaseSensitive(r, "serial");
        const cJSON *when = cJSON_GetObjectItemCaseSensitive(r, "revoked");
        if (ok && (!cJSON_IsString(serial) || !cJSON_IsNumber(when) ||
                   crl_add(crl, serial->valuestring, (int64_t)when->valuedouble) < 0))
            ok = 0;
    }
    if (ok && X509_CRL_sort(crl) && X509_CRL_sign(crl, s->ca_key, EVP_sha256()) > 0 &&
        PEM_write_bio_X509_CRL(bio, crl))
        pem = bio_string(bio);
    cJSON_Delete(revoked);
    X509_CRL_free(crl);
    ASN1_TIME_free(now);
    ASN1_TIME_free(next);
    BIO_free(bio);
    return pem;
}

static char *cert_pem(X509 *x)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *pem = bio && PEM_write_bio_X509(bio, x) ? bio_string(bio) : NULL;

    BIO_free(bio);
    return pem;
}

/* Adds a string to obj, taking ownership of s (which may be NULL: then it fails). */
static int add_owned(cJSON *obj, const char *name, char *s)
{
    cJSON *item = s ? cJSON_CreateString(s) : NULL;

    free(s);
    return item && cJSON_AddItemToObject(obj, name, item) ? 0 : -1;
}

static cJSON *mappings_json(struct cmg_site_ctx *s)
{
    struct cmg_site_mapping *v;
    cJSON *arr;
    size_t n;

    if (cmg_store_mappings(s->store, &v, &n) < 0)
        return NULL;
    arr = cJSON_CreateArray();
    for (size_t i = 0; arr && i < n; i++) {
        cJSON *o = cJSON_CreateObject(), *auth = cJSON_CreateArray();
        cJSON_AddItemToArray(arr, o);
        cJSON_AddStringToObject(o, "role", v[i].role);
        cJSON_AddStringToObject(o, "type", v[i].type);
        cJSON_AddItemToObject(o, "auth", auth);
        if (v[i].auth & CMG_MAP_AUTH_CERT)
            cJSON_AddItemToArray(auth, cJSON_CreateString("cert"));
        if (v[i].auth & CMG_MAP_AUTH_TOKEN)
            cJSON_AddItemToArray(auth, cJSON_CreateString("token"));
        if (v[i].auth & CMG_MAP_AUTH_OIDC)
            cJSON_AddItemToArray(auth, cJSON_CreateString("oidc"));
        cJSON_AddNumberToObject(o, "max_body", (double)v[i].max_body);
        cJSON_AddBoolToObject(o, "forward_authorization", v[i].forward_authorization);
    }
    free(v);
    return arr;
}

static int add_oidc(struct cmg_site_ctx *s, cJSON *p)
{
    struct cmg_oidc_conf o;
    cJSON *oidc, *aud, *jwks;
    int rc = cmg_store_oidc_get(s->store, &o);

    if (rc != 0)
        return rc < 0 ? -1 : 0;
    rc = -1;
    aud = cJSON_Parse(o.audiences);
    jwks = cJSON_Parse(o.jwks);
    if (!aud || !jwks || !(oidc = cJSON_AddObjectToObject(p, "oidc")) ||
        !cJSON_AddStringToObject(oidc, "issuer", o.issuer) ||
        !cJSON_AddStringToObject(oidc, "tenant", o.tenant ? o.tenant : ""))
        goto out;
    cJSON_AddItemToObject(oidc, "audiences", aud);
    cJSON_AddItemToObject(oidc, "jwks", jwks);
    aud = jwks = NULL;
    rc = 0;
out:
    cJSON_Delete(aud);
    cJSON_Delete(jwks);
    cmg_oidc_conf_free(&o);
    return rc;
}

static cJSON *routes_json(struct cmg_site_ctx *s)
{
    struct cmg_site_mapping *v;
    cJSON *o;
    size_t n;

    if (cmg_store_mappings(s->store, &v, &n) < 0)
        return NULL;
    o = cJSON_CreateObject();
    for (size_t i = 0; o && i < n; i++) {
        cJSON *r = cJSON_AddObjectToObject(o, v[i].role);
        cJSON_AddStringToObject(r, "url", v[i].url);
        cJSON_AddStringToObject(r, "type", v[i].type);
    }
    free(v);
    return o;
}

/* A document signed with the current key, carrying the announcements that lead to it. */
static char *sign_doc(struct cmg_site_ctx *s, const char *typ, const char *json)
{
    cJSON *chain = cmg_site_signing_chain(s);
    char *jws = cmg_jws_sign_es256_with(s->sign_key, s->sign_pub.kid, typ, CMG_KEYCHAIN_HEADER,
                                        chain, json);

    cJSON_Delete(chain);
    return jws;
}

/* The routes of this version, signed. */
static char *routes_build(struct cmg_site_ctx *s, int64_t version)
{
    cJSON *doc = cJSON_CreateObject(), *routes = routes_json(s);
    char *json = NULL, *jws = NULL;

    if (doc && routes && cJSON_AddNumberToObject(doc, "version", (double)version) &&
        cJSON_AddNumberToObject(doc, "iat", (double)time(NULL)) &&
        cJSON_AddItemToObject(doc, "routes", routes)) {
        routes = NULL;
        if ((json = cJSON_PrintUnformatted(doc)))
            jws = sign_doc(s, CMG_ROUTES_TYP, json);
    }
    cJSON_Delete(routes);
    cJSON_Delete(doc);
    free(json);
    return jws;
}

char *cmg_site_policy_build(struct cmg_site_ctx *s, int64_t *version, char **routes,
                            char *err, size_t errlen)
{
    cJSON *p = cJSON_CreateObject(), *keys, *limits;
    char *json = NULL, *jws = NULL;

    *version = 0;
    *routes = NULL;
    /* One consistent snapshot, signed with the key that is current in it. */
    if (cmg_store_begin_read(s->store) < 0) {
        snprintf(err, errlen, "store: %s", cmg_store_error(s->store));
        cJSON_Delete(p);
        return NULL;
    }
    if (cmg_site_signing_reload(s, err, errlen) < 0) {
        cmg_store_rollback(s->store);
        cJSON_Delete(p);
        return NULL;
    }
    *version = cmg_store_policy_version(s->store);
    keys = cmg_site_token_keys(s, (int64_t)time(NULL));
    if (!p || !keys || !cJSON_AddNumberToObject(p, "version", (double)*version) ||
        !cJSON_AddNumberToObject(p, "iat", (double)time(NULL)) ||
        !cJSON_AddStringToObject(p, "iss", s->issuer) ||
        !cJSON_AddStringToObject(p, "service_name", s->service_name) ||
        !cJSON_AddStringToObject(p, "site_role", s->site_role) ||
        !cJSON_AddItemToObject(p, "mappings", mappings_json(s)) ||
        !cJSON_AddItemToObject(p, "ctl", cJSON_CreateArray()) ||
        add_owned(p, "crl", cmg_site_crl_pem(s)) < 0 ||
        !cJSON_AddBoolToObject(p, "check_revocation", cmg_site_revocation_checked(s)) ||
        !cJSON_AddItemToObject(p, "site_keys", keys) ||
        add_oidc(s, p) < 0 ||
        !cJSON_AddItemToObject(p, "blocked_devices", cmg_store_blocked_devices(s->store)) ||
        !cJSON_AddItemToObject(p, "revoked_tokens", cmg_store_blocked_tokens(s->store)) ||
        !cJSON_AddItemToObject(p, "revoked_connectors",
                               cmg_store_revoked_connectors(s->store)) ||
        !(limits = cJSON_AddObjectToObject(p, "limits")) ||
        !cJSON_AddNumberToObject(limits, "clock_skew", CLOCK_SKEW)) {
        snprintf(err, errlen, "cannot build the policy (store: %s)", cmg_store_error(s->store));
        goto out;
    }
    {
        char *ca = cert_pem(s->ca_cert);
        cJSON *item = ca ? cJSON_CreateString(ca) : NULL;
        free(ca);
        if (!item || !cJSON_AddItemToArray(cJSON_GetObjectItem(p, "ctl"), item)) {
            snprintf(err, errlen, "cannot add the CTL");
            goto out;
        }
    }
    if (!(json = cJSON_PrintUnformatted(p)) ||
        !(jws = sign_doc(s, CMG_POLICY_TYP, json)) ||
        !(*routes = routes_build(s, *version))) {
        snprintf(err, errlen, "cannot sign the policy and the routes");
        free(jws);
        jws = NULL;
    }
out:
    cmg_store_rollback(s->store);
    cJSON_Delete(p);
    free(json);
    return jws;
}

