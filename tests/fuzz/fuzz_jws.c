/* Tokens and key sets from the network or a policy: cmg_jws_parse and
 * cmg_jwks_parse must never read out of bounds or leak, and whatever parses
 * must survive the claims helpers and a verification. */
#include "auth/jwk.h"
#include "auth/jws.h"
#include "auth/keychain.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* RFC 7515 A.3's key, so that ES256 inputs reach the signature conversion. */
static const char a3_jwk[] = "{\"kty\":\"EC\",\"crv\":\"P-256\","
                             "\"x\":\"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU\","
                             "\"y\":\"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0\"}";

static const struct cmg_jwk *verify_key(void)
{
    static struct cmg_jwks ks;   /* kept for the process: not a leak */
    static int loaded;

    if (!loaded)
        loaded = cmg_jwks_parse(a3_jwk, sizeof(a3_jwk) - 1, &ks, NULL, 0) == 0 ? 1 : -1;
    return loaded > 0 ? &ks.keys[0] : NULL;
}

/* The announcements a document carries, followed from the A.3 key as the pinned one. */
static void key_chain(const struct cmg_jws *j)
{
    struct cmg_jwk pinned = *verify_key();
    struct cmg_keychain kc;
    char err[1024];

    snprintf(pinned.kid, sizeof(pinned.kid), "a3");
    if (cmg_keychain_init(&kc, &pinned) < 0)
        return;
    (void)cmg_keychain_verify(&kc, j, NULL, err, sizeof(err));
    if (kc.n < 1 || kc.n > CMG_KEYCHAIN_MAX + 1)
        abort();
    cmg_keychain_free(&kc);
}

static void token(const char *p, size_t size)
{
    struct cmg_jws j;

    if (cmg_jws_parse(p, size, &j) < 0)
        return;
    if (!j.header || !j.payload || !j.signing_input || j.signing_input_len >= size)
        abort();
    (void)cmg_jwt_check_time(j.payload, 1700000000, 120);
    (void)cmg_jwt_aud_has(j.payload, "cmg");
    (void)cmg_jwt_time(j.payload, "iat");
    (void)cmg_jwt_str(j.payload, "sub");
    (void)cmg_jws_header_str(&j, "alg");
    (void)cmg_jws_header_str(&j, "kid");
    (void)cmg_jws_verify(&j, verify_key());
    key_chain(&j);
    cmg_jws_free(&j);
}

static void keyset(const char *p, size_t size)
{
    struct cmg_jwks ks;
    char err[128], tp[44];

    if (cmg_jwks_parse(p, size, &ks, err, sizeof(err)) < 0) {
        if (ks.keys || ks.n)
            abort();
        return;
    }
    for (size_t i = 0; i < ks.n; i++) {
        cJSON *pub = cmg_jwk_public(ks.keys[i].pkey, ks.keys[i].kid);
        if (!pub || cmg_jwk_thumbprint(ks.keys[i].pkey, tp) < 0 || strlen(tp) != 43)
            abort();   /* every key we accept, we can also export */
        cJSON_Delete(pub);
        (void)cmg_jwks_find(&ks, ks.keys[i].kid);
    }
    (void)cmg_jwks_find(&ks, NULL);
    cmg_jwks_free(&ks);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *p = malloc(size ? size : 1);   /* exact size, so overreads are caught */

    if (!p)
        return 0;
    memcpy(p, data, size);
    token(p, size);
    keyset(p, size);
    free(p);
    return 0;
}
