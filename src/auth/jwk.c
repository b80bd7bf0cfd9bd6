/* JSON Web Keys (RFC 7517, RFC 7518 §6): public keys in, public keys out.
 * Each key is pinned to one algorithm by its type, decided here once, so that
 * nothing a token says can pick how it is verified. */
#include "auth/jwk.h"

#include "auth/b64url.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/param_build.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EC_COORD 32           /* P-256 coordinate, bytes */
#define RSA_MIN_BITS 2048
#define RSA_MAX_BYTES 1024    /* 8192 bits: larger moduli only make verification slow */
#define RSA_MAX_E_BYTES 8

/* The public values of a key as base64url strings, as a JWK holds them. */
struct pub_parts {
    enum cmg_jws_alg alg;
    char *a;                  /* EC: x; RSA: n */
    char *b;                  /* EC: y; RSA: e */
};

static void set_err(char *err, size_t errlen, const char *msg)
{
    if (err && errlen)
        snprintf(err, errlen, "%s", msg);
}

enum cmg_jws_alg cmg_jws_alg_parse(const char *s)
{
    if (s && !strcmp(s, "ES256"))
        return CMG_ALG_ES256;
    if (s && !strcmp(s, "RS256"))
        return CMG_ALG_RS256;
    return CMG_ALG_UNKNOWN;
}

const char *cmg_jws_alg_name(enum cmg_jws_alg a)
{
    switch (a) {
    case CMG_ALG_ES256:
        return "ES256";
    case CMG_ALG_RS256:
        return "RS256";
    default:
        return "unknown";
    }
}

static const char *member_str(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* A base64url member decoded into buf (at most cap bytes). */
static int member_bytes(const cJSON *o, const char *name, unsigned char *buf, size_t cap,
                        size_t *len)
{
    const char *s = member_str(o, name);
    return s ? cmg_b64url_decode(s, strlen(s), buf, cap, len) : -1;
}

bool cmg_jwk_is_p256(EVP_PKEY *pk)
{
    char group[32];
    return EVP_PKEY_is_a(pk, "EC") &&
           EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                          sizeof(group), NULL) &&
           !strcmp(group, "prime256v1");
}

static EVP_PKEY *pkey_fromdata(const char *type, OSSL_PARAM_BLD *bld)
{
    OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
    EVP_PKEY_CTX *ctx = params ? EVP_PKEY_CTX_new_from_name(NULL, type, NULL) : NULL;
    EVP_PKEY *pk = NULL;

    if (!ctx || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_PUBLIC_KEY, params) <= 0) {
        EVP_PKEY_free(pk);
        pk = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    return pk;
}

/* Full check of an EC point: on the curve, not infinity, in the group. */
static int ec_public_check(EVP_PKEY *pk)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pk, NULL);
    int ok = ctx && EVP_PKEY_public_check(ctx) == 1;

    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

static EVP_PKEY *jwk_ec(const cJSON *k)
{
    unsigned char pub[1 + 2 * EC_COORD];
    size_t xl = 0, yl = 0;
    OSSL_PARAM_BLD *bld = NULL;
    EVP_PKEY *pk = NULL;
    const char *crv = member_str(k, "crv");

    if (!crv || strcmp(crv, "P-256") ||
        member_bytes(k, "x", pub + 1, EC_COORD, &xl) < 0 || xl != EC_COORD ||
        member_bytes(k, "y", pub + 1 + EC_COORD, EC_COORD, &yl) < 0 || yl != EC_COORD)
        goto out;
    pub[0] = 0x04;   /* uncompressed point */
    bld = OSSL_PARAM_BLD_new();
    if (!bld ||
        !OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) ||
        !OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pub, sizeof(pub)))
        goto out;
    pk = pkey_fromdata("EC", bld);
    if (pk && ec_public_check(pk) < 0) {
        EVP_PKEY_free(pk);
        pk = NULL;
    }
out:
    OSSL_PARAM_BLD_free(bld);
    return pk;
}

/* OpenSSL's RSA public check runs a primality test on n; these cheap checks
 * are what matters for verifying signatures. */
static EVP_PKEY *jwk_rsa(const cJSON *k)
{
    unsigned char n[RSA_MAX_BYTES], e[RSA_MAX_E_BYTES];
    size_t nl = 0, el = 0;
    BIGNUM *bn = NULL, *be = NULL;
    OSSL_PARAM_BLD *bld = NULL;
    EVP_PKEY *pk = NULL;

    if (member_bytes(k, "n", n, sizeof(n), &nl) < 0 ||
        member_bytes(k, "e", e, sizeof(e), &el) < 0)
        goto out;
    bn = BN_bin2bn(n, (int)nl, NULL);
    be = BN_bin2bn(e, (int)el, NULL);
    if (!bn || !be || BN_num_bits(bn) < RSA_MIN_BITS || !BN_is_odd(bn) || !BN_is_odd(be) ||
        BN_is_one(be))
        goto out;
    bld = OSSL_PARAM_BLD_new();
    if (!bld || !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn) ||
        !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, be))
        goto out;
    pk = pkey_fromdata("RSA", bld);
out:
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn);
    BN_free(be);
    return pk;
}

/* "use", "alg" and "kid" are optional, but when present they must agree. */
static int members_agree(const cJSON *k, enum cmg_jws_alg a)
{
    const cJSON *use = cJSON_GetObjectItemCaseSensitive(k, "use");
    const cJSON *alg = cJSON_GetObjectItemCaseSensitive(k, "alg");
    const cJSON *kid = cJSON_GetObjectItemCaseSensitive(k, "kid");

    if (use && (!cJSON_IsString(use) || strcmp(use->valuestring, "sig")))
        return 0;
    if (alg && (!cJSON_IsString(alg) || cmg_jws_alg_parse(alg->valuestring) != a))
        return 0;
    return !kid || (cJSON_IsString(kid) &&
                    strlen(kid->valuestring) < sizeof(((struct cmg_jwk *)0)->kid));
}

/* One JWK; -1 if it is to be skipped. */
static int jwk_from_json(const cJSON *k, struct cmg_jwk *key)
{
    const char *kty = member_str(k, "kty"), *kid = member_str(k, "kid");
    enum cmg_jws_alg a = CMG_ALG_UNKNOWN;

    memset(key, 0, sizeof(*key));
    if (kty && !strcmp(kty, "EC"))
        a = CMG_ALG_ES256;
    else if (kty && !strcmp(kty, "RSA"))
        a = CMG_ALG_RS256;
    if (a == CMG_ALG_UNKNOWN || !members_agree(k, a))
        return -1;
    key->pkey = a == CMG_ALG_ES256 ? jwk_ec(k) : jwk_rsa(k);
    if (!key->pkey)
        return -1;
    key->alg = a;
    if (kid)
        strcpy(key->kid, kid);   /* members_agree checked the length */
    return 0;
}

int cmg_jwks_from_json(const cJSON *doc, struct cmg_jwks *out, char *err, size_t errlen)
{
    const cJSON *keys = cJSON_GetObjectItemCaseSensitive(doc, "keys"), *k;
    size_t cap;
    int ret = -1;

    if (!out)
        return -1;
    memset(out, 0, sizeof(*out));
    if (!cJSON_IsObject(doc) || (keys && !cJSON_IsArray(keys))) {
        set_err(err, errlen, "not a JWK set or a JWK");
        goto out;
    }
    cap = keys ? (size_t)cJSON_GetArraySize(keys) : 1;
    out->keys = cap ? calloc(cap, sizeof(*out->keys)) : NULL;
    if (cap && !out->keys) {
        set_err(err, errlen, "out of memory");
        goto out;
    }
    if (keys) {
        cJSON_ArrayForEach(k, keys) {
            if (out->n < cap && jwk_from_json(k, &out->keys[out->n]) == 0)
                out->n++;
        }
    } else if (jwk_from_json(doc, &out->keys[0]) == 0) {
        out->n = 1;
    }
    if (out->n == 0) {
        set_err(err, errlen, "no usable key (EC P-256 or RSA of 2048 bits or more, for sig)");
        goto out;
    }
    ret = 0;
out:
    ERR_clear_error();   /* skipped keys leave errors that would confuse TLS code later */
    if (ret < 0)
        cmg_jwks_free(out);
    return ret;
}

int cmg_jwks_parse(const char *json, size_t len, struct cmg_jwks *out, char *err, size_t errlen)
{
    char *buf = NULL;
    cJSON *doc = NULL;
    int ret = -1;

    if (!out)
        return -1;
    memset(out, 0, sizeof(*out));
    if (!json || len == 0 || memchr(json, 0, len) || !(buf = malloc(len + 1))) {
        set_err(err, errlen, "not JSON");
        goto out;
    }
    memcpy(buf, json, len);
    buf[len] = 0;
    /* The length counts the NUL, so that trailing garbage fails the parse. */
    doc = cJSON_ParseWithLengthOpts(buf, len + 1, NULL, 1);
    if (!doc) {
        set_err(err, errlen, "not JSON");
        goto out;
    }
    ret = cmg_jwks_from_json(doc, out, err, errlen);
out:
    cJSON_Delete(doc);
    free(buf);
    return ret;
}

void cmg_jwks_free(struct cmg_jwks *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->n; i++)
        EVP_PKEY_free(s->keys[i].pkey);
    free(s->keys);
    s->keys = NULL;
    s->n = 0;
}

const struct cmg_jwk *cmg_jwks_find(const struct cmg_jwks *s, const char *kid)
{
    if (!s || !s->keys)
        return NULL;
    if (!kid)
        return s->n == 1 ? &s->keys[0] : NULL;
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->keys[i].kid, kid))
            return &s->keys[i];
    /* A set of one key that has no kid is that key for every kid: the signature decides. */
    return s->n == 1 && !s->keys[0].kid[0] ? &s->keys[0] : NULL;
}

/* Big-endian bytes of bn, left-padded to pad bytes if pad > 0, as base64url. */
static char *bn_b64(const BIGNUM *bn, int pad)
{
    int n = pad > 0 ? pad : BN_num_bytes(bn);
    unsigned char *raw = n > 0 ? malloc((size_t)n) : NULL;
    char *s = raw ? malloc(CMG_B64URL_LEN((size_t)n)) : NULL;

    if (!s || (pad > 0 ? BN_bn2binpad(bn, raw, pad) : BN_bn2bin(bn, raw)) != n ||
        cmg_b64url_encode(raw, (size_t)n, s, CMG_B64URL_LEN((size_t)n)) == 0) {
        free(s);
        s = NULL;
    }
    free(raw);
    return s;
}

static void pub_parts_free(struct pub_parts *p)
{
    free(p->a);
    free(p->b);
    memset(p, 0, sizeof(*p));
}

static int pub_parts(EVP_PKEY *pk, struct pub_parts *p)
{
    BIGNUM *a = NULL, *b = NULL;
    int ret = -1;

    memset(p, 0, sizeof(*p));
    if (pk && cmg_jwk_is_p256(pk)) {
        p->alg = CMG_ALG_ES256;
        if (EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_EC_PUB_X, &a) &&
            EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_EC_PUB_Y, &b)) {
            p->a = bn_b64(a, EC_COORD);
            p->b = bn_b64(b, EC_COORD);
        }
    } else if (pk && EVP_PKEY_is_a(pk, "RSA")) {
        p->alg = CMG_ALG_RS256;
        if (EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_N, &a) &&
            EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_E, &b)) {
            p->a = bn_b64(a, 0);
            p->b = bn_b64(b, 0);
        }
    }
    if (p->a && p->b)
        ret = 0;
    else
        pub_parts_free(p);
    BN_free(a);
    BN_free(b);
    return ret;
}

cJSON *cmg_jwk_public(EVP_PKEY *pkey, const char *kid)
{
    struct pub_parts p = {0};
    cJSON *o = NULL;
    int ok = 0;

    if (pub_parts(pkey, &p) < 0)
        goto out;
    /* Never publish a key that cmg_jwks_parse would skip. */
    if ((p.alg == CMG_ALG_RS256 &&
         (EVP_PKEY_get_bits(pkey) < RSA_MIN_BITS || EVP_PKEY_get_bits(pkey) > RSA_MAX_BYTES * 8)) ||
        (kid && strlen(kid) >= sizeof(((struct cmg_jwk *)0)->kid)))
        goto out;
    o = cJSON_CreateObject();
    if (p.alg == CMG_ALG_ES256)
        ok = o && cJSON_AddStringToObject(o, "kty", "EC") &&
             cJSON_AddStringToObject(o, "crv", "P-256") && cJSON_AddStringToObject(o, "x", p.a) &&
             cJSON_AddStringToObject(o, "y", p.b);
    else
        ok = o && cJSON_AddStringToObject(o, "kty", "RSA") &&
             cJSON_AddStringToObject(o, "n", p.a) && cJSON_AddStringToObject(o, "e", p.b);
    ok = ok && (!kid || cJSON_AddStringToObject(o, "kid", kid)) &&
         cJSON_AddStringToObject(o, "use", "sig") &&
         cJSON_AddStringToObject(o, "alg", cmg_jws_alg_name(p.alg));
out:
    if (!ok) {
        cJSON_Delete(o);
        o = NULL;
    }
    pub_parts_free(&p);
    return o;
}

int cmg_jwk_thumbprint(EVP_PKEY *pkey, char out[44])
{
    struct pub_parts p = {0};
    char *json = NULL;
    size_t cap = 0;
    int n = -1, ret = -1;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    if (!out || pub_parts(pkey, &p) < 0)
        goto out;
    /* RFC 7638 §3.2: required members only, in lexicographic order, no whitespace. */
    cap = strlen(p.a) + strlen(p.b) + 64;
    if (!(json = malloc(cap)))
        goto out;
    if (p.alg == CMG_ALG_ES256)
        n = snprintf(json, cap, "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}",
                     p.a, p.b);
    else
        n = snprintf(json, cap, "{\"e\":\"%s\",\"kty\":\"RSA\",\"n\":\"%s\"}", p.b, p.a);
    if (n < 0 || (size_t)n >= cap ||
        !EVP_Digest(json, (size_t)n, md, &mdlen, EVP_sha256(), NULL) || mdlen != 32 ||
        cmg_b64url_encode(md, mdlen, out, 44) != 43)
        goto out;
    ret = 0;
out:
    free(json);
    pub_parts_free(&p);
    return ret;
}

bool cmg_jwk_kid_plain(const char *kid)
{
    size_t n = strlen(kid);

    return n > 0 && n <= 128 &&
           strspn(kid, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                       "-_.=+/:~") == n;
}
