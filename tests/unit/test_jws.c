/* JWS and JWK: what verifies, and what a hostile token or key set cannot get through. */
#include "auth/b64url.h"
#include "auth/jwk.h"
#include "auth/jws.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

static EVP_PKEY *ec1, *ec2, *rsa2048, *rsa1024;

/* Keys are made once: RSA generation is slow, more so under valgrind. */
static int keys_setup(void **state)
{
    ec1 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    ec2 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    rsa2048 = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    rsa1024 = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024);
    return ec1 && ec2 && rsa2048 && rsa1024 ? 0 : -1;
}

static int keys_teardown(void **state)
{
    EVP_PKEY_free(ec1);
    EVP_PKEY_free(ec2);
    EVP_PKEY_free(rsa2048);
    EVP_PKEY_free(rsa1024);
    return 0;
}

static char *b64s(const void *p, size_t n)
{
    char *s = malloc(CMG_B64URL_LEN(n));

    assert_non_null(s);
    cmg_b64url_encode(p, n, s, CMG_B64URL_LEN(n));
    return s;
}

static char *join3(const char *a, const char *b, const char *c)
{
    size_t n = strlen(a) + strlen(b) + strlen(c) + 3;
    char *t = malloc(n);

    assert_non_null(t);
    snprintf(t, n, "%s.%s.%s", a, b, c);
    return t;
}

/* A compact JWS from clear-text header and payload and a raw signature. */
static char *token3(const char *header, const char *payload, const void *sig, size_t siglen)
{
    char *h = b64s(header, strlen(header)), *p = b64s(payload, strlen(payload));
    char *s = b64s(sig, siglen), *t = join3(h, p, s);

    free(h);
    free(p);
    free(s);
    return t;
}

/* Signed with plain EVP_DigestSign, without the module's help: RS256 as an
 * identity provider makes it; with an EC key, the DER signature JOSE forbids. */
static char *sign_evp(EVP_PKEY *pk, const char *header, const char *body)
{
    char *t = token3(header, body, NULL, 0);   /* "h.p.": the input and a dot */
    unsigned char sig[512];
    size_t siglen = sizeof(sig);
    EVP_MD_CTX *md = EVP_MD_CTX_new();

    assert_non_null(md);
    assert_int_equal(EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, pk), 1);
    assert_int_equal(EVP_DigestSign(md, sig, &siglen, (unsigned char *)t, strlen(t) - 1), 1);
    EVP_MD_CTX_free(md);
    free(t);
    return token3(header, body, sig, siglen);
}

/* A JOSE-form ES256 signature (r||s) over any header, made without the module. */
static char *sign_raw_es256(EVP_PKEY *pk, const char *header, const char *body)
{
    char *t = sign_evp(pk, header, body), *sig = strrchr(t, '.') + 1;
    unsigned char der[128], raw[64];
    const unsigned char *p = der;
    size_t derlen = 0;
    const BIGNUM *r, *sv;
    ECDSA_SIG *es;

    assert_int_equal(cmg_b64url_decode(sig, strlen(sig), der, sizeof(der), &derlen), 0);
    es = d2i_ECDSA_SIG(NULL, &p, (long)derlen);
    assert_non_null(es);
    ECDSA_SIG_get0(es, &r, &sv);
    assert_int_equal(BN_bn2binpad(r, raw, 32), 32);
    assert_int_equal(BN_bn2binpad(sv, raw + 32, 32), 32);
    ECDSA_SIG_free(es);
    free(t);
    return token3(header, body, raw, sizeof(raw));
}

/* The key set holding pk's public JWK, through the module's own round trip. */
static void keyset(EVP_PKEY *pk, const char *kid, struct cmg_jwks *ks)
{
    cJSON *jwk = cmg_jwk_public(pk, kid);
    char *s, err[128];

    assert_non_null(jwk);
    s = cJSON_PrintUnformatted(jwk);
    assert_non_null(s);
    assert_int_equal(cmg_jwks_parse(s, strlen(s), ks, err, sizeof(err)), 0);
    assert_int_equal(ks->n, 1);
    cJSON_free(s);
    cJSON_Delete(jwk);
}

static int jwks_count(const char *json)
{
    struct cmg_jwks ks;
    char err[128];
    int n;

    if (cmg_jwks_parse(json, strlen(json), &ks, err, sizeof(err)) < 0) {
        assert_null(ks.keys);
        return 0;
    }
    n = (int)ks.n;
    cmg_jwks_free(&ks);
    return n;
}

/* -2 if the token does not parse, else what cmg_jws_verify says. */
static int check_n(const char *tok, size_t len, const struct cmg_jwk *key)
{
    struct cmg_jws j;
    int r;

    if (cmg_jws_parse(tok, len, &j) < 0) {
        assert_null(j.header);
        assert_null(j.sig);
        return -2;
    }
    r = cmg_jws_verify(&j, key);
    cmg_jws_free(&j);
    return r;
}

static int check(const char *tok, const struct cmg_jwk *key)
{
    return check_n(tok, strlen(tok), key);
}

static const char base_claims[] = "{\"iss\":\"site\",\"aud\":\"cmg\",\"exp\":2000000000}";

static void b64url_encodes_without_padding(void **state)
{
    const char *in[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    const char *want[] = {"", "Zg", "Zm8", "Zm9v", "Zm9vYg", "Zm9vYmE", "Zm9vYmFy"};
    const unsigned char hi[] = {0xfb, 0xff, 0xfe};
    char out[16];

    for (size_t i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        assert_int_equal(cmg_b64url_encode(in[i], strlen(in[i]), out, sizeof(out)),
                         strlen(want[i]));
        assert_string_equal(out, want[i]);
    }
    assert_int_equal(cmg_b64url_encode(hi, 3, out, sizeof(out)), 4);
    assert_string_equal(out, "-__-");   /* the url alphabet, not + and / */
    memset(out, 'X', sizeof(out));
    assert_int_equal(cmg_b64url_encode("foo", 3, out, 4), 0);   /* needs 5 */
    assert_int_equal(out[0], 'X');
    assert_int_equal(cmg_b64url_encode("foo", 3, out, 5), 4);
    assert_true(CMG_B64URL_LEN(32) >= 44);
}

static void b64url_decodes_strictly(void **state)
{
    unsigned char out[16];
    size_t n = 99;
    const char *bad[] = {"Zg==", "Zm8=", "Z", "Zm9vY", "Zh", "Zm9", "Zm9v\n", " Zm9v", "+/8",
                         "Zm 9v", "Zm9v.", "Zg\0"};

    assert_int_equal(cmg_b64url_decode("", 0, out, 0, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(cmg_b64url_decode("Zm9vYmFy", 8, out, sizeof(out), &n), 0);
    assert_int_equal(n, 6);
    assert_memory_equal(out, "foobar", 6);
    assert_int_equal(cmg_b64url_decode("-__-", 4, out, sizeof(out), &n), 0);
    assert_memory_equal(out, "\xfb\xff\xfe", 3);
    assert_int_equal(cmg_b64url_decode("Zm8", 3, out, sizeof(out), &n), 0);
    assert_int_equal(n, 2);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        size_t len = strlen(bad[i]) + (i == 11);   /* the last one holds a NUL */
        assert_int_equal(cmg_b64url_decode(bad[i], len, out, sizeof(out), &n), -1);
    }
    /* "Zh" has non-zero trailing bits, so "Zg" is the one spelling of "f". */
    assert_int_equal(cmg_b64url_decode("Zm9vYmFy", 8, out, 5, &n), -1);   /* outcap */
    assert_int_equal(cmg_b64url_decode("Zm9vYmE", 7, out, 5, &n), 0);
}

static void es256_roundtrip(void **state)
{
    struct cmg_jwks ks;
    struct cmg_jws j;
    char *tok = cmg_jws_sign_es256(ec1, "k1", "JWT", base_claims);

    assert_non_null(tok);
    keyset(ec1, "k1", &ks);
    assert_int_equal(cmg_jws_parse(tok, strlen(tok), &j), 0);
    assert_string_equal(cmg_jws_header_str(&j, "alg"), "ES256");
    assert_string_equal(cmg_jws_header_str(&j, "kid"), "k1");
    assert_string_equal(cmg_jws_header_str(&j, "typ"), "JWT");
    assert_null(cmg_jws_header_str(&j, "cty"));
    assert_int_equal(j.siglen, 64);
    assert_ptr_equal(cmg_jwks_find(&ks, "k1"), &ks.keys[0]);
    assert_int_equal(cmg_jws_verify(&j, cmg_jwks_find(&ks, cmg_jws_header_str(&j, "kid"))), 0);
    assert_string_equal(cmg_jwt_str(j.payload, "iss"), "site");
    assert_int_equal(cmg_jwt_time(j.payload, "exp"), 2000000000);
    cmg_jws_free(&j);
    cmg_jws_free(&j);   /* idempotent */
    free(tok);

    tok = cmg_jws_sign_es256(ec1, NULL, NULL, "{}");   /* no typ, no kid */
    assert_non_null(tok);
    assert_int_equal(cmg_jws_parse(tok, strlen(tok), &j), 0);
    assert_null(cmg_jws_header_str(&j, "kid"));
    assert_null(cmg_jws_header_str(&j, "typ"));
    assert_int_equal(cmg_jws_verify(&j, &ks.keys[0]), 0);
    cmg_jws_free(&j);
    free(tok);
    cmg_jwks_free(&ks);

    /* Only what the parser would take back, and only with a P-256 key. */
    assert_null(cmg_jws_sign_es256(ec1, NULL, NULL, "[1]"));
    assert_null(cmg_jws_sign_es256(ec1, NULL, NULL, "{} x"));
    assert_null(cmg_jws_sign_es256(rsa2048, NULL, NULL, "{}"));
    assert_null(cmg_jws_sign_es256(NULL, NULL, NULL, "{}"));
}

static void rs256_verifies(void **state)
{
    struct cmg_jwks ks;
    char *tok = sign_evp(rsa2048, "{\"alg\":\"RS256\",\"kid\":\"r1\"}", base_claims);

    keyset(rsa2048, "r1", &ks);
    assert_int_equal(ks.keys[0].alg, CMG_ALG_RS256);
    assert_int_equal(check(tok, &ks.keys[0]), 0);
    free(tok);
    /* The same signature under another header is another signing input. */
    tok = sign_evp(rsa2048, "{\"alg\":\"RS256\"}", base_claims);
    assert_int_equal(check(tok, &ks.keys[0]), 0);
    free(tok);
    cmg_jwks_free(&ks);
}

static void algorithm_is_pinned_by_the_key(void **state)
{
    struct cmg_jwks eck, rsak;
    struct cmg_jwk forged;
    char *pem = NULL, *tok;
    unsigned char mac[32];
    size_t maclen = 0, pemlen;
    BIO *b = BIO_new(BIO_s_mem());

    keyset(ec1, "e", &eck);
    keyset(rsa2048, "r", &rsak);

    /* A genuine RS256 token offered to the EC key, and an ES256 one to the RSA key. */
    tok = sign_evp(rsa2048, "{\"alg\":\"RS256\"}", base_claims);
    assert_int_equal(check(tok, &eck.keys[0]), -1);
    free(tok);
    tok = cmg_jws_sign_es256(ec1, NULL, NULL, base_claims);
    assert_int_equal(check(tok, &rsak.keys[0]), -1);
    free(tok);
    /* Valid r||s signatures by the EC key, under headers that do not say ES256. */
    const char *headers[] = {"{\"alg\":\"RS256\"}", "{\"alg\":\"HS256\"}",
                             "{\"alg\":\"es256\"}", "{\"alg\":\"ES256 \"}",
                             "{\"alg\":[\"ES256\"]}", "{\"ALG\":\"ES256\"}"};
    for (size_t i = 0; i < sizeof(headers) / sizeof(headers[0]); i++) {
        tok = sign_raw_es256(ec1, headers[i], base_claims);
        assert_int_equal(check(tok, &eck.keys[0]), -1);
        free(tok);
    }
    tok = sign_raw_es256(ec1, "{\"alg\":\"ES256\"}", base_claims);   /* the control */
    assert_int_equal(check(tok, &eck.keys[0]), 0);
    free(tok);

    /* alg none with an empty signature parses, and verifies with nothing. */
    tok = token3("{\"alg\":\"none\"}", base_claims, NULL, 0);
    assert_int_equal(check(tok, &eck.keys[0]), -1);
    assert_int_equal(check(tok, &rsak.keys[0]), -1);
    free(tok);
    tok = token3("{}", base_claims, NULL, 0);   /* no alg at all */
    assert_int_equal(check(tok, &eck.keys[0]), -1);
    free(tok);

    /* HS256 keyed with the public key's PEM, the classic confusion. */
    assert_non_null(b);
    assert_int_equal(PEM_write_bio_PUBKEY(b, ec1), 1);
    pemlen = (size_t)BIO_get_mem_data(b, &pem);
    tok = token3("{\"alg\":\"HS256\"}", base_claims, NULL, 0);
    assert_non_null(EVP_Q_mac(NULL, "HMAC", NULL, "SHA256", NULL, pem, pemlen,
                              (unsigned char *)tok, strlen(tok) - 1, mac, sizeof(mac), &maclen));
    free(tok);
    tok = token3("{\"alg\":\"HS256\"}", base_claims, mac, maclen);
    assert_int_equal(check(tok, &eck.keys[0]), -1);
    free(tok);
    BIO_free(b);

    /* A key struct filled in by hand cannot pair RS256 with an EC key either. */
    tok = sign_evp(rsa2048, "{\"alg\":\"RS256\"}", base_claims);
    forged = (struct cmg_jwk){.alg = CMG_ALG_RS256, .pkey = ec1};
    assert_int_equal(check(tok, &forged), -1);
    forged = (struct cmg_jwk){.alg = CMG_ALG_UNKNOWN, .pkey = rsa2048};
    assert_int_equal(check(tok, &forged), -1);
    forged = (struct cmg_jwk){.alg = CMG_ALG_RS256, .pkey = rsa1024};
    free(tok);
    tok = sign_evp(rsa1024, "{\"alg\":\"RS256\"}", base_claims);
    assert_int_equal(check(tok, &forged), -1);   /* too short, even by hand */
    free(tok);
    assert_int_equal(cmg_jws_verify(NULL, &eck.keys[0]), -1);

    assert_int_equal(cmg_jws_alg_parse("ES256"), CMG_ALG_ES256);
    assert_int_equal(cmg_jws_alg_parse("RS256"), CMG_ALG_RS256);
    assert_int_equal(cmg_jws_alg_parse("none"), CMG_ALG_UNKNOWN);
    assert_int_equal(cmg_jws_alg_parse("HS256"), CMG_ALG_UNKNOWN);
    assert_int_equal(cmg_jws_alg_parse("es256"), CMG_ALG_UNKNOWN);
    assert_int_equal(cmg_jws_alg_parse(NULL), CMG_ALG_UNKNOWN);
    assert_string_equal(cmg_jws_alg_name(CMG_ALG_ES256), "ES256");
    assert_string_equal(cmg_jws_alg_name(CMG_ALG_RS256), "RS256");
    cmg_jwks_free(&eck);
    cmg_jwks_free(&rsak);
}

static void tampering_and_wrong_keys_fail(void **state)
{
    struct cmg_jwks k1, k2;
    char *tok = cmg_jws_sign_es256(ec1, NULL, NULL, base_claims), *other, *forged;
    const char *payload2 = "{\"iss\":\"site\",\"aud\":\"cmg\",\"exp\":2000000001}";
    char *p2 = b64s(payload2, strlen(payload2));
    size_t n = strlen(tok);
    struct cmg_jws j;
    unsigned char raw[72];

    keyset(ec1, NULL, &k1);
    keyset(ec2, NULL, &k2);
    assert_int_equal(check(tok, &k1.keys[0]), 0);
    assert_int_equal(check(tok, &k2.keys[0]), -1);   /* wrong key */

    /* Another payload under the original header and signature. */
    other = strchr(tok, '.');
    *other = 0;
    forged = join3(tok, p2, strrchr(other + 1, '.') + 1);
    *other = '.';
    assert_int_equal(check(forged, &k1.keys[0]), -1);
    free(forged);

    /* A flipped bit in the signature, or a signature of the wrong size. */
    assert_int_equal(cmg_jws_parse(tok, n, &j), 0);
    j.sig[5] ^= 1;
    assert_int_equal(cmg_jws_verify(&j, &k1.keys[0]), -1);
    j.sig[5] ^= 1;
    assert_int_equal(cmg_jws_verify(&j, &k1.keys[0]), 0);
    j.siglen = 63;
    assert_int_equal(cmg_jws_verify(&j, &k1.keys[0]), -1);
    memset(raw, 0, sizeof(raw));
    memcpy(j.sig, raw, 64);   /* r = s = 0 */
    j.siglen = 64;
    assert_int_equal(cmg_jws_verify(&j, &k1.keys[0]), -1);
    cmg_jws_free(&j);

    /* A valid DER signature where r||s belongs. */
    forged = sign_evp(ec1, "{\"alg\":\"ES256\"}", base_claims);
    assert_int_equal(check(forged, &k1.keys[0]), -1);
    free(forged);

    /* Every truncation either fails to parse or fails to verify. */
    for (size_t i = 0; i < n; i++)
        assert_true(check_n(tok, i, &k1.keys[0]) < 0);
    assert_int_equal(check_n(tok, n, &k1.keys[0]), 0);
    free(p2);
    free(tok);
    cmg_jwks_free(&k1);
    cmg_jwks_free(&k2);
}

static void malformed_tokens_do_not_parse(void **state)
{
    const char *h = "eyJhbGciOiJFUzI1NiJ9";   /* {"alg":"ES256"} */
    const char *p = "e30";                    /* {} */
    char buf[256];
    const char *objects[] = {"[1]", "\"x\"", "1", "null", "{} x", "{}}", "{", "", "{\"a\":1,}"};
    struct cmg_jws j;

    snprintf(buf, sizeof(buf), "%s.%s.AAAA", h, p);
    assert_int_equal(cmg_jws_parse(buf, strlen(buf), &j), 0);
    cmg_jws_free(&j);
    snprintf(buf, sizeof(buf), "%s.%s.", h, p);   /* empty signature parses */
    assert_int_equal(cmg_jws_parse(buf, strlen(buf), &j), 0);
    assert_int_equal(j.siglen, 0);
    cmg_jws_free(&j);

    const char *bad[] = {"", ".", "..", "...", "a.b", "eyJhbGciOiJFUzI1NiJ9.e30",
                         "eyJhbGciOiJFUzI1NiJ9.e30.AAAA.AAAA", "eyJhbGciOiJFUzI1NiJ9=.e30.AAAA",
                         "eyJhbGciOiJFUzI1NiJ9.e30=.AAAA", "eyJhbGciOiJFUzI1NiJ9.e30.AA==",
                         "eyJhbGciOiJFUzI1NiJ9.e30.A", "eyJhbGciOiJFUzI1NiJ9.e30.AB",
                         "eyJhbGciOiJFUzI1NiJ9.e31.AAAA", " eyJhbGciOiJFUzI1NiJ9.e30.AAAA",
                         "eyJhbGciOiJFUzI1NiJ9.e30.AAAA\n", "eyJhbGciOiJFUzI1NiJ9..AAAA",
                         ".e30.AAAA", "eyJhbGciOiJFUzI1NiJ9.e3+.AAAA"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(cmg_jws_parse(bad[i], strlen(bad[i]), &j), -1);
        assert_null(j.header);
        assert_null(j.payload);
        assert_null(j.signing_input);
    }
    assert_int_equal(cmg_jws_parse(NULL, 0, &j), -1);
    assert_int_equal(cmg_jws_parse(buf, strlen(buf), NULL), -1);

    /* Header and payload must each be one JSON object and nothing more. */
    for (size_t i = 0; i < sizeof(objects) / sizeof(objects[0]); i++) {
        char *t = token3(objects[i], "{}", "x", 1);
        assert_int_equal(cmg_jws_parse(t, strlen(t), &j), -1);
        free(t);
        t = token3("{\"alg\":\"ES256\"}", objects[i], "x", 1);
        assert_int_equal(cmg_jws_parse(t, strlen(t), &j), -1);
        free(t);
    }
    /* A NUL inside the JSON would cut its strings short. */
    char *nul = b64s("{\"alg\":\"ES256\"}\0", 16);
    snprintf(buf, sizeof(buf), "%s.%s.AAAA", nul, p);
    assert_int_equal(cmg_jws_parse(buf, strlen(buf), &j), -1);
    free(nul);
    /* Trailing JSON whitespace is still JSON. */
    char *t = token3("{\"alg\":\"ES256\"} \r\n", "{}\t", "x", 1);
    assert_int_equal(cmg_jws_parse(t, strlen(t), &j), 0);
    cmg_jws_free(&j);
    free(t);
    /* crit: an extension we would have to understand. */
    t = token3("{\"alg\":\"ES256\",\"crit\":[\"exp\"],\"exp\":1}", "{}", "x", 1);
    assert_int_equal(cmg_jws_parse(t, strlen(t), &j), -1);
    free(t);
}

static void size_is_bounded(void **state)
{
    size_t n = CMG_JWS_MAX;
    char *big = malloc(n + 32), *tok;
    struct cmg_jwks ks;
    struct cmg_jws j;

    assert_non_null(big);
    memcpy(big, "{\"x\":\"", 6);
    memset(big + 6, 'a', n - 6);
    memcpy(big + n, "\"}", 3);
    tok = cmg_jws_sign_es256(ec1, NULL, NULL, big);
    assert_non_null(tok);
    assert_true(strlen(tok) > CMG_JWS_MAX);
    keyset(ec1, NULL, &ks);
    assert_int_equal(cmg_jws_parse(tok, strlen(tok), &j), -1);
    assert_int_equal(cmg_jws_parse_limit(tok, strlen(tok), 4 * CMG_JWS_MAX, &j), 0);
    assert_int_equal(cmg_jws_verify(&j, &ks.keys[0]), 0);
    cmg_jws_free(&j);
    assert_int_equal(cmg_jws_parse_limit(tok, strlen(tok), strlen(tok) - 1, &j), -1);
    cmg_jwks_free(&ks);
    free(tok);
    free(big);
}

/* RFC 7515 Appendix A.3: the ES256 example, verbatim. */
static void rfc7515_a3_known_answer(void **state)
{
    const char *jwk = "{\"kty\":\"EC\",\"crv\":\"P-256\","
                      "\"x\":\"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU\","
                      "\"y\":\"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0\"}";
    const char *tok =
        "eyJhbGciOiJFUzI1NiJ9"
        ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxl"
        "LmNvbS9pc19yb290Ijp0cnVlfQ"
        ".DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";
    struct cmg_jwks ks;
    struct cmg_jws j;
    char err[128], tp[44];

    assert_int_equal(cmg_jwks_parse(jwk, strlen(jwk), &ks, err, sizeof(err)), 0);
    assert_int_equal(ks.n, 1);
    assert_int_equal(ks.keys[0].alg, CMG_ALG_ES256);
    assert_string_equal(ks.keys[0].kid, "");
    assert_ptr_equal(cmg_jwks_find(&ks, NULL), &ks.keys[0]);
    assert_int_equal(cmg_jws_parse(tok, strlen(tok), &j), 0);
    assert_int_equal(cmg_jws_verify(&j, &ks.keys[0]), 0);
    assert_string_equal(cmg_jwt_str(j.payload, "iss"), "joe");
    assert_int_equal(cmg_jwt_time(j.payload, "exp"), 1300819380);
    assert_int_equal(cmg_jwt_check_time(j.payload, 1300819379, 0), CMG_JWT_TIME_OK);
    assert_int_equal(cmg_jwt_check_time(j.payload, 1300819380, 0), CMG_JWT_EXPIRED);
    j.signing_input[j.signing_input_len - 1] ^= 1;
    assert_int_equal(cmg_jws_verify(&j, &ks.keys[0]), -1);
    cmg_jws_free(&j);
    /* Our export of the key is the RFC's, so its thumbprint is stable. */
    cJSON *pub = cmg_jwk_public(ks.keys[0].pkey, NULL);
    assert_string_equal(cJSON_GetObjectItem(pub, "x")->valuestring,
                        "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU");
    assert_string_equal(cJSON_GetObjectItem(pub, "y")->valuestring,
                        "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0");
    assert_null(cJSON_GetObjectItem(pub, "kid"));
    cJSON_Delete(pub);
    /* Computed apart: SHA-256 of {"crv":"P-256","kty":"EC","x":"f83O...","y":"x_FE..."}. */
    assert_int_equal(cmg_jwk_thumbprint(ks.keys[0].pkey, tp), 0);
    assert_string_equal(tp, "oKIywvGUpTVTyxMQ3bwIIeQUudfr_CkLMjCE19ECD-U");
    cmg_jwks_free(&ks);
}

/* RFC 7638 §3.1: the RSA example and its thumbprint. */
static void rfc7638_thumbprint(void **state)
{
    const char *jwk =
        "{\"kty\":\"RSA\",\"n\":\"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAt"
        "VT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt"
        "7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91"
        "CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kE"
        "gU8awapJzKnqDKgw\",\"e\":\"AQAB\",\"alg\":\"RS256\",\"kid\":\"2011-04-29\"}";
    struct cmg_jwks ks, again;
    char err[128], tp[44], tp2[44], *s;
    cJSON *pub;

    assert_int_equal(cmg_jwks_parse(jwk, strlen(jwk), &ks, err, sizeof(err)), 0);
    assert_string_equal(ks.keys[0].kid, "2011-04-29");
    assert_ptr_equal(cmg_jwks_find(&ks, "2011-04-29"), &ks.keys[0]);
    assert_null(cmg_jwks_find(&ks, "2011-04-30"));
    assert_int_equal(cmg_jwk_thumbprint(ks.keys[0].pkey, tp), 0);
    assert_string_equal(tp, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");

    /* Export and re-import keep the thumbprint: EC and RSA. */
    EVP_PKEY *keys[] = {ec1, rsa2048};
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(cmg_jwk_thumbprint(keys[i], tp), 0);
        assert_int_equal(strlen(tp), 43);
        pub = cmg_jwk_public(keys[i], tp);
        s = cJSON_PrintUnformatted(pub);
        assert_string_equal(cJSON_GetObjectItem(pub, "use")->valuestring, "sig");
        assert_string_equal(cJSON_GetObjectItem(pub, "alg")->valuestring,
                            i ? "RS256" : "ES256");
        assert_null(cJSON_GetObjectItem(pub, "d"));
        assert_int_equal(cmg_jwks_parse(s, strlen(s), &again, err, sizeof(err)), 0);
        assert_int_equal(cmg_jwk_thumbprint(again.keys[0].pkey, tp2), 0);
        assert_string_equal(tp, tp2);
        assert_string_equal(again.keys[0].kid, tp);
        cmg_jwks_free(&again);
        cJSON_free(s);
        cJSON_Delete(pub);
    }
    assert_int_equal(cmg_jwk_thumbprint(ec1, tp), 0);
    assert_int_equal(cmg_jwk_thumbprint(ec2, tp2), 0);
    assert_string_not_equal(tp, tp2);
    assert_int_equal(cmg_jwk_thumbprint(NULL, tp), -1);
    assert_null(cmg_jwk_public(NULL, NULL));
    assert_null(cmg_jwk_public(rsa1024, NULL));   /* one we would not accept back */
    cmg_jwks_free(&ks);
}

/* An RSA JWK by hand, so that what the module refuses can be written:
 * e replaced if e64 is set, n made even if even_n. */
static char *rsa_jwk_raw(EVP_PKEY *pk, const char *e64, int even_n, const char *extra)
{
    BIGNUM *n = NULL, *e = NULL;
    unsigned char buf[1024];
    size_t nl;
    char *ns, *es, *out = malloc(2048);

    assert_int_equal(EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_N, &n), 1);
    assert_int_equal(EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_E, &e), 1);
    nl = (size_t)BN_bn2bin(n, buf);
    if (even_n)
        buf[nl - 1] &= 0xfe;
    ns = b64s(buf, nl);
    es = e64 ? strdup(e64) : b64s(buf, (size_t)BN_bn2bin(e, buf));
    snprintf(out, 2048, "{\"kty\":\"RSA\",\"n\":\"%s\",\"e\":\"%s\"%s}", ns, es, extra);
    free(ns);
    free(es);
    BN_free(n);
    BN_free(e);
    return out;
}

static char *rsa_jwk_json(EVP_PKEY *pk, const char *extra)
{
    return rsa_jwk_raw(pk, NULL, 0, extra);
}

static char *ec_jwk_json(EVP_PKEY *pk, const char *field, const char *value)
{
    cJSON *o = cmg_jwk_public(pk, "ec");
    char *s, *out;

    assert_non_null(o);
    if (field) {
        cJSON_DeleteItemFromObjectCaseSensitive(o, field);
        if (value)
            cJSON_AddItemToObject(o, field, cJSON_Parse(value));
    }
    s = cJSON_PrintUnformatted(o);
    out = strdup(s);
    cJSON_free(s);
    cJSON_Delete(o);
    return out;
}

static void jwks_skips_keys_it_cannot_pin(void **state)
{
    char *small = rsa_jwk_json(rsa1024, ",\"kid\":\"small\"");
    char *big = rsa_jwk_json(rsa2048, ",\"kid\":\"big\"");
    char *ec = ec_jwk_json(ec1, NULL, NULL), buf[8192], *s;
    struct cmg_jwks ks;
    char err[128];
    const struct { const char *field, *value; } skip[] = {
        {"alg", "\"RS256\""}, {"alg", "\"none\""}, {"alg", "1"}, {"use", "\"enc\""},
        {"use", "null"}, {"crv", "\"P-384\""}, {"crv", NULL}, {"kty", "\"oct\""},
        {"kty", "\"ec\""}, {"kty", NULL}, {"x", "\"AAAA\""}, {"x", NULL}, {"y", "1"},
        {"x", "\"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEUAAAA\""},
        {"kid", "7"},
    };

    assert_int_equal(jwks_count(small), 0);   /* 1024 bits */
    snprintf(buf, sizeof(buf), "{\"keys\":[%s]}", small);
    assert_int_equal(jwks_count(buf), 0);
    assert_int_equal(cmg_jwks_parse(buf, strlen(buf), &ks, err, sizeof(err)), -1);
    assert_true(strlen(err) > 0);
    snprintf(buf, sizeof(buf), "{\"keys\":[%s,%s,%s]}", small, big, ec);
    assert_int_equal(cmg_jwks_parse(buf, strlen(buf), &ks, err, sizeof(err)), 0);
    assert_int_equal(ks.n, 2);
    assert_null(cmg_jwks_find(&ks, "small"));
    assert_int_equal(cmg_jwks_find(&ks, "big")->alg, CMG_ALG_RS256);
    assert_int_equal(cmg_jwks_find(&ks, "ec")->alg, CMG_ALG_ES256);
    assert_null(cmg_jwks_find(&ks, NULL));   /* two keys: a kid is needed */
    cmg_jwks_free(&ks);
    cmg_jwks_free(&ks);
    free(big);

    big = rsa_jwk_json(rsa2048, ",\"alg\":\"ES256\"");   /* RSA claiming ES256 */
    assert_int_equal(jwks_count(big), 0);
    free(big);
    big = rsa_jwk_json(rsa2048, ",\"alg\":\"RS256\",\"use\":\"sig\"");
    assert_int_equal(jwks_count(big), 1);
    free(big);
    /* Not an RSA public key at all: even modulus, or e of 1 or 2, or e missing. */
    const char *bad_e[] = {"AQ", "Ag", "", "AQAB=", "AAAAAAAAAAAAAQAB"};
    for (size_t i = 0; i < sizeof(bad_e) / sizeof(bad_e[0]); i++) {
        big = rsa_jwk_raw(rsa2048, bad_e[i], 0, "");
        assert_int_equal(jwks_count(big), 0);
        free(big);
    }
    big = rsa_jwk_raw(rsa2048, "Aw", 0, "");   /* e = 3 is odd and allowed */
    assert_int_equal(jwks_count(big), 1);
    free(big);
    big = rsa_jwk_raw(rsa2048, NULL, 1, "");
    assert_int_equal(jwks_count(big), 0);
    free(big);

    for (size_t i = 0; i < sizeof(skip) / sizeof(skip[0]); i++) {
        s = ec_jwk_json(ec1, skip[i].field, skip[i].value);
        snprintf(buf, sizeof(buf), "{\"keys\":[%s]}", s);
        assert_int_equal(jwks_count(buf), 0);
        free(s);
    }
    /* A point off the curve: one coordinate changed. */
    s = ec_jwk_json(ec1, NULL, NULL);
    char *y = strstr(s, "\"y\":\"") + 10;
    *y = *y == 'A' ? 'B' : 'A';
    assert_int_equal(jwks_count(s), 0);
    free(s);
    /* kid longer than the struct holds: skipped, not truncated into a match. */
    memset(buf, 'k', 200);
    buf[0] = buf[199] = '"';
    buf[200] = 0;
    s = ec_jwk_json(ec1, "kid", buf);
    assert_int_equal(jwks_count(s), 0);
    free(s);

    assert_int_equal(jwks_count(ec), 1);   /* a lone JWK is a set of one */
    const char *not_sets[] = {"", "[]", "{\"keys\":[]}", "{\"keys\":{}}", "{\"keys\":[1,\"a\"]}",
                              "null", "{}", "{\"keys\":[{}]}", "{\"keys\":[]} x"};
    for (size_t i = 0; i < sizeof(not_sets) / sizeof(not_sets[0]); i++)
        assert_int_equal(jwks_count(not_sets[i]), 0);
    snprintf(buf, sizeof(buf), "{\"keys\":[%s]} \n", ec);   /* trailing whitespace is fine */
    assert_int_equal(jwks_count(buf), 1);
    snprintf(buf, sizeof(buf), "{\"keys\":[%s]} x", ec);      /* trailing garbage is not */
    assert_int_equal(jwks_count(buf), 0);
    snprintf(buf, sizeof(buf), "{\"keys\":[%s]}", ec);
    assert_int_equal(cmg_jwks_parse(buf, strlen(buf) + 1, &ks, NULL, 0), -1);   /* NUL inside */
    assert_int_equal(cmg_jwks_from_json(NULL, &ks, NULL, 0), -1);
    assert_null(cmg_jwks_find(NULL, NULL));
    free(small);
    free(ec);
}

static cJSON *claims(const char *json)
{
    cJSON *o = cJSON_Parse(json);

    assert_non_null(o);
    return o;
}

static int time_of(const char *json, int64_t now, int64_t skew)
{
    cJSON *o = claims(json);
    int r = cmg_jwt_check_time(o, now, skew);

    cJSON_Delete(o);
    return r;
}

static int64_t claim_time(const char *json)
{
    cJSON *o = claims(json);
    int64_t t = cmg_jwt_time(o, "exp");

    cJSON_Delete(o);
    return t;
}

static void time_claims_with_skew(void **state)
{
    const int64_t now = 1700000000, skew = 60;
    const int ok = CMG_JWT_TIME_OK, expired = CMG_JWT_EXPIRED, not_yet = CMG_JWT_NOT_YET,
              no_exp = CMG_JWT_NO_EXP;

    assert_int_equal(time_of("{\"exp\":1700000100}", now, skew), ok);
    assert_int_equal(time_of("{\"exp\":1699999970}", now, skew), ok);   /* in skew */
    assert_int_equal(time_of("{\"exp\":1699999941}", now, skew), ok);
    assert_int_equal(time_of("{\"exp\":1699999940}", now, skew), expired);
    assert_int_equal(time_of("{\"exp\":1699990000}", now, skew), expired);
    assert_int_equal(time_of("{\"exp\":1700000000}", now, 0), expired);
    assert_int_equal(time_of("{\"exp\":1700000000}", now, -5), expired);
    assert_int_equal(time_of("{\"exp\":1700000100,\"nbf\":1700000030}", now, skew), ok);
    assert_int_equal(time_of("{\"exp\":1700000100,\"nbf\":1700000060}", now, skew), ok);
    assert_int_equal(time_of("{\"exp\":1700000100,\"nbf\":1700000061}", now, skew), not_yet);
    assert_int_equal(time_of("{\"exp\":1800000000,\"nbf\":1790000000}", now, skew), not_yet);
    assert_int_equal(time_of("{\"exp\":1800000000,\"nbf\":\"soon\"}", now, skew), not_yet);
    assert_int_equal(time_of("{\"exp\":1800000000,\"nbf\":1e300}", now, skew), not_yet);
    assert_int_equal(time_of("{\"exp\":1800000000,\"nbf\":-3}", now, skew), ok);
    assert_int_equal(time_of("{}", now, skew), no_exp);
    assert_int_equal(time_of("{\"nbf\":1}", now, skew), no_exp);
    assert_int_equal(time_of("{\"exp\":\"1800000000\"}", now, skew), no_exp);
    assert_int_equal(time_of("{\"exp\":null}", now, skew), no_exp);
    assert_int_equal(time_of("{\"exp\":1e300}", now, skew), no_exp);
    assert_int_equal(time_of("{\"exp\":-1700000100}", now, skew), no_exp);
    /* Extremes must not overflow into acceptance. */
    assert_int_equal(time_of("{\"exp\":9.2e18}", INT64_MAX, INT64_MAX), ok);
    assert_int_equal(time_of("{\"exp\":9.2e18}", INT64_MAX, 0), expired);
    assert_int_equal(time_of("{\"exp\":1}", INT64_MIN, INT64_MAX), ok);
    assert_int_equal(time_of("{\"exp\":1,\"nbf\":9.2e18}", INT64_MIN, INT64_MAX), not_yet);
    assert_int_equal(cmg_jwt_check_time(NULL, now, skew), no_exp);

    assert_int_equal(claim_time("{\"exp\":1700000000.9}"), 1700000000);   /* truncated */
    assert_int_equal(claim_time("{\"exp\":0.5}"), 0);
    assert_int_equal(claim_time("{\"exp\":-0.5}"), -1);
    assert_int_equal(claim_time("{\"exp\":-100}"), -1);
    assert_int_equal(claim_time("{\"exp\":9223372036854775807}"), -1);   /* 2^63 as a double */
    assert_int_equal(claim_time("{\"exp\":9.2e18}"), 9200000000000000000);
    assert_int_equal(claim_time("{\"exp\":1e999}"), -1);
    assert_int_equal(claim_time("{\"exp\":true}"), -1);
    assert_int_equal(claim_time("{\"exp\":[1]}"), -1);
    assert_int_equal(claim_time("{\"iat\":1}"), -1);
}

static void audience_string_or_array(void **state)
{
    cJSON *o = claims("{\"aud\":\"cmg\"}");

    assert_true(cmg_jwt_aud_has(o, "cmg"));
    assert_false(cmg_jwt_aud_has(o, "cm"));
    assert_false(cmg_jwt_aud_has(o, "CMG"));
    assert_false(cmg_jwt_aud_has(o, NULL));
    cJSON_Delete(o);
    o = claims("{\"aud\":[1,null,\"other\",\"cmg\"]}");
    assert_true(cmg_jwt_aud_has(o, "cmg"));
    assert_true(cmg_jwt_aud_has(o, "other"));
    assert_false(cmg_jwt_aud_has(o, "1"));
    cJSON_Delete(o);
    o = claims("{\"aud\":[]}");
    assert_false(cmg_jwt_aud_has(o, "cmg"));
    cJSON_Delete(o);
    o = claims("{\"aud\":\"\"}");
    assert_false(cmg_jwt_aud_has(o, ""));   /* an unset audience matches nothing */
    cJSON_Delete(o);
    o = claims("{\"aud\":{\"cmg\":1},\"sub\":7}");
    assert_false(cmg_jwt_aud_has(o, "cmg"));
    assert_null(cmg_jwt_str(o, "sub"));
    assert_null(cmg_jwt_str(o, "iss"));
    cJSON_Delete(o);
    o = claims("{}");
    assert_false(cmg_jwt_aud_has(o, "cmg"));
    cJSON_Delete(o);
    assert_false(cmg_jwt_aud_has(NULL, "cmg"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(b64url_encodes_without_padding),
        cmocka_unit_test(b64url_decodes_strictly),
        cmocka_unit_test(es256_roundtrip),
        cmocka_unit_test(rs256_verifies),
        cmocka_unit_test(algorithm_is_pinned_by_the_key),
        cmocka_unit_test(tampering_and_wrong_keys_fail),
        cmocka_unit_test(malformed_tokens_do_not_parse),
        cmocka_unit_test(size_is_bounded),
        cmocka_unit_test(rfc7515_a3_known_answer),
        cmocka_unit_test(rfc7638_thumbprint),
        cmocka_unit_test(jwks_skips_keys_it_cannot_pin),
        cmocka_unit_test(time_claims_with_skew),
        cmocka_unit_test(audience_string_or_array),
    };
    return cmocka_run_group_tests(tests, keys_setup, keys_teardown);
}
