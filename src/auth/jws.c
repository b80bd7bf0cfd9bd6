/* JWS compact serialization (RFC 7515) and the JWT time and audience checks
 * (RFC 7519 §4.1). The algorithm comes from the key, never from the token. */
#include "auth/jws.h"

#include "auth/b64url.h"

#include <math.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/rsa.h>
#include <stdlib.h>
#include <string.h>

#define ES256_HALF 32                 /* bytes of r, and of s */
#define ES256_SIG (2 * ES256_HALF)    /* r||s on the wire (RFC 7518 §3.4) */
#define RSA_MIN_BITS 2048

/* A base64url segment that must decode to a JSON object and nothing else. */
static cJSON *decode_object(const char *b64, size_t n)
{
    size_t cap = n / 4 * 3 + 2, len = 0;
    unsigned char *buf = malloc(cap + 1);
    cJSON *o = NULL;

    if (!buf || cmg_b64url_decode(b64, n, buf, cap, &len) < 0 || len == 0 ||
        memchr(buf, 0, len))   /* a NUL would end the C strings cJSON hands out */
        goto out;
    buf[len] = 0;
    /* The length counts the NUL, so that trailing garbage fails the parse. */
    o = cJSON_ParseWithLengthOpts((const char *)buf, len + 1, NULL, 1);
    if (o && !cJSON_IsObject(o)) {
        cJSON_Delete(o);
        o = NULL;
    }
out:
    free(buf);
    return o;
}

static int decode_sig(const char *b64, size_t n, struct cmg_jws *j)
{
    size_t cap = n / 4 * 3 + 2;

    j->sig = malloc(cap);
    return j->sig ? cmg_b64url_decode(b64, n, j->sig, cap, &j->siglen) : -1;
}

static int copy_input(const char *token, size_t n, struct cmg_jws *j)
{
    j->signing_input = malloc(n + 1);
    if (!j->signing_input)
        return -1;
    memcpy(j->signing_input, token, n);
    j->signing_input[n] = 0;
    j->signing_input_len = n;
    return 0;
}

int cmg_jws_parse_limit(const char *token, size_t len, size_t max, struct cmg_jws *j)
{
    const char *d1 = NULL, *d2 = NULL, *end = token + len;
    int ret = -1;

    if (!j)
        return -1;
    memset(j, 0, sizeof(*j));
    if (!token || len == 0 || len > max)
        goto out;
    d1 = memchr(token, '.', len);
    d2 = d1 ? memchr(d1 + 1, '.', (size_t)(end - d1 - 1)) : NULL;
    if (!d2 || memchr(d2 + 1, '.', (size_t)(end - d2 - 1)))
        goto out;
    j->header = decode_object(token, (size_t)(d1 - token));
    /* crit names extensions that must be understood; we understand none. */
    if (!j->header || cJSON_GetObjectItemCaseSensitive(j->header, "crit"))
        goto out;
    j->payload = decode_object(d1 + 1, (size_t)(d2 - d1 - 1));
    if (!j->payload || decode_sig(d2 + 1, (size_t)(end - d2 - 1), j) < 0 ||
        copy_input(token, (size_t)(d2 - token), j) < 0)
        goto out;
    ret = 0;
out:
    if (ret < 0)
        cmg_jws_free(j);
    return ret;
}

int cmg_jws_parse(const char *token, size_t len, struct cmg_jws *j)
{
    return cmg_jws_parse_limit(token, len, CMG_JWS_MAX, j);
}

void cmg_jws_free(struct cmg_jws *j)
{
    if (!j)
        return;
    cJSON_Delete(j->header);
    cJSON_Delete(j->payload);
    free(j->sig);
    free(j->signing_input);
    memset(j, 0, sizeof(*j));
}

const char *cmg_jws_header_str(const struct cmg_jws *j, const char *name)
{
    const cJSON *v = j ? cJSON_GetObjectItemCaseSensitive(j->header, name) : NULL;
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* The key must be of the kind its alg pins, whoever filled in the struct. */
static int key_fits(const struct cmg_jwk *key)
{
    if (key->alg == CMG_ALG_ES256)
        return cmg_jwk_is_p256(key->pkey);
    if (key->alg == CMG_ALG_RS256)
        return EVP_PKEY_is_a(key->pkey, "RSA") && EVP_PKEY_get_bits(key->pkey) >= RSA_MIN_BITS;
    return 0;
}

static int digest_verify(EVP_PKEY *pk, int pkcs1, const unsigned char *sig, size_t siglen,
                         const char *data, size_t len)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    int ok = md && EVP_DigestVerifyInit(md, &pctx, EVP_sha256(), NULL, pk) == 1 &&
             (!pkcs1 || EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) > 0) &&
             EVP_DigestVerify(md, sig, siglen, (const unsigned char *)data, len) == 1;

    EVP_MD_CTX_free(md);
    return ok ? 0 : -1;
}

/* r||s → DER ECDSA-Sig-Value, which is what OpenSSL verifies. */
static int es256_to_der(const unsigned char *raw, unsigned char **der, size_t *derlen)
{
    ECDSA_SIG *s = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, ES256_HALF, NULL);
    BIGNUM *sv = BN_bin2bn(raw + ES256_HALF, ES256_HALF, NULL);
    int n, ret = -1;

    if (!s || !r || !sv || !ECDSA_SIG_set0(s, r, sv))
        goto out;
    r = sv = NULL;   /* s owns them now */
    n = i2d_ECDSA_SIG(s, der);
    if (n <= 0)
        goto out;
    *derlen = (size_t)n;
    ret = 0;
out:
    BN_free(r);
    BN_free(sv);
    ECDSA_SIG_free(s);
    return ret;
}

static int verify_es256(const struct cmg_jws *j, EVP_PKEY *pk)
{
    unsigned char *der = NULL;
    size_t derlen = 0;
    int ret = -1;

    if (j->siglen == ES256_SIG && es256_to_der(j->sig, &der, &derlen) == 0)
        ret = digest_verify(pk, 0, der, derlen, j->signing_input, j->signing_input_len);
    OPENSSL_free(der);
    return ret;
}

int cmg_jws_verify(const struct cmg_jws *j, const struct cmg_jwk *key)
{
    const char *alg = cmg_jws_header_str(j, "alg");
    int ret = -1;

    if (!j || !j->signing_input || !j->sig || !key || !key->pkey || !alg ||
        key->alg == CMG_ALG_UNKNOWN || cmg_jws_alg_parse(alg) != key->alg || !key_fits(key))
        goto out;
    if (key->alg == CMG_ALG_ES256)
        ret = verify_es256(j, key->pkey);
    else
        ret = digest_verify(key->pkey, 1, j->sig, j->siglen, j->signing_input,
                            j->signing_input_len);
out:
    ERR_clear_error();   /* a bad token must not leave errors for the TLS code to find */
    return ret;
}

/* DER signature → r||s, each left-padded to 32 bytes. */
static int der_to_es256(const unsigned char *der, size_t derlen, unsigned char raw[ES256_SIG])
{
    const unsigned char *p = der;
    ECDSA_SIG *s = d2i_ECDSA_SIG(NULL, &p, (long)derlen);
    const BIGNUM *r = NULL, *sv = NULL;
    int ret = -1;

    if (!s)
        goto out;
    ECDSA_SIG_get0(s, &r, &sv);
    if (BN_bn2binpad(r, raw, ES256_HALF) == ES256_HALF &&
        BN_bn2binpad(sv, raw + ES256_HALF, ES256_HALF) == ES256_HALF)
        ret = 0;
out:
    ECDSA_SIG_free(s);
    return ret;
}

static int sign_es256_raw(EVP_PKEY *key, const char *data, size_t len,
                          unsigned char raw[ES256_SIG])
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned char der[128];   /* a P-256 DER signature is at most 72 bytes */
    size_t derlen = sizeof(der);
    int ok = md && EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, key) == 1 &&
             EVP_DigestSign(md, der, &derlen, (const unsigned char *)data, len) == 1 &&
             der_to_es256(der, derlen, raw) == 0;

    EVP_MD_CTX_free(md);
    return ok ? 0 : -1;
}

static char *header_json(const char *kid, const char *typ, const char *extra_name,
                         const cJSON *extra)
{
    cJSON *h = cJSON_CreateObject();
    char *s = NULL;

    if (h && cJSON_AddStringToObject(h, "alg", "ES256") &&
        (!typ || cJSON_AddStringToObject(h, "typ", typ)) &&
        (!kid || cJSON_AddStringToObject(h, "kid", kid)) &&
        (!extra || cJSON_AddItemToObject(h, extra_name, cJSON_Duplicate(extra, 1))))
        s = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    return s;
}

static int is_json_object(const char *s)
{
    cJSON *o = cJSON_ParseWithOpts(s, NULL, 1);
    int ok = cJSON_IsObject(o);

    cJSON_Delete(o);
    return ok;
}

char *cmg_jws_sign_es256(EVP_PKEY *key, const char *kid, const char *typ,
                         const char *payload_json)
{
    return cmg_jws_sign_es256_with(key, kid, typ, NULL, NULL, payload_json);
}

char *cmg_jws_sign_es256_with(EVP_PKEY *key, const char *kid, const char *typ,
                              const char *extra_name, const cJSON *extra,
                              const char *payload_json)
{
    char *hdr = NULL, *out = NULL;
    size_t hl, pl, cap, o;
    unsigned char raw[ES256_SIG];
    int ok = 0;

    /* Only sign what cmg_jws_parse would accept back. */
    if (!key || !payload_json || !cmg_jwk_is_p256(key) || !is_json_object(payload_json) ||
        !(hdr = header_json(kid, typ, extra_name, extra)))
        goto out;
    hl = strlen(hdr);
    pl = strlen(payload_json);
    cap = CMG_B64URL_LEN(hl) + CMG_B64URL_LEN(pl) + CMG_B64URL_LEN(ES256_SIG);
    if (!(out = malloc(cap)))
        goto out;
    o = cmg_b64url_encode(hdr, hl, out, cap);
    out[o++] = '.';
    o += cmg_b64url_encode(payload_json, pl, out + o, cap - o);
    if (sign_es256_raw(key, out, o, raw) < 0)
        goto out;
    out[o++] = '.';
    ok = cmg_b64url_encode(raw, sizeof(raw), out + o, cap - o) > 0;
out:
    if (!ok) {
        free(out);
        out = NULL;
        ERR_clear_error();
    }
    cJSON_free(hdr);
    return out;
}

const char *cmg_jwt_str(const cJSON *payload, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(payload, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* A NumericDate: 0 with *t set (-1 for a date before 1970, treated as absent),
 * or -1 if it is not a finite number that fits an int64_t. */
static int numeric_date(const cJSON *v, int64_t *t)
{
    double d;

    if (!cJSON_IsNumber(v))
        return -1;
    d = v->valuedouble;
    if (!isfinite(d) || d >= 9223372036854775808.0)   /* 2^63 */
        return -1;
    *t = d < 0 ? -1 : (int64_t)d;   /* the cast truncates the fraction */
    return 0;
}

int64_t cmg_jwt_time(const cJSON *payload, const char *name)
{
    int64_t t = -1;

    if (numeric_date(cJSON_GetObjectItemCaseSensitive(payload, name), &t) < 0)
        t = -1;
    return t;
}

bool cmg_jwt_aud_has(const cJSON *payload, const char *aud)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(payload, "aud"), *e;
    bool found = false;

    if (!aud || !*aud)   /* an unset audience must not match an empty claim */
        return false;
    if (cJSON_IsString(a))
        return !strcmp(a->valuestring, aud);
    if (cJSON_IsArray(a))
        cJSON_ArrayForEach(e, a) {
            if (cJSON_IsString(e) && !strcmp(e->valuestring, aud)) {
                found = true;
                break;
            }
        }
    return found;
}

int cmg_jwt_check_time(const cJSON *payload, int64_t now, int64_t skew)
{
    const cJSON *nbf_item = cJSON_GetObjectItemCaseSensitive(payload, "nbf");
    int64_t exp = cmg_jwt_time(payload, "exp"), nbf = -1;

    if (skew < 0)
        skew = 0;
    if (exp < 0)
        return CMG_JWT_NO_EXP;
    /* An nbf we cannot read could be any date: refuse rather than ignore it. */
    if (nbf_item && numeric_date(nbf_item, &nbf) < 0)
        return CMG_JWT_NOT_YET;
    /* Written so that neither side can overflow: exp, nbf >= 0 and skew >= 0. */
    if (now >= INT64_MIN + skew && now - skew >= exp)
        return CMG_JWT_EXPIRED;
    if (nbf >= 0 && nbf - skew > now)
        return CMG_JWT_NOT_YET;
    return CMG_JWT_TIME_OK;
}
