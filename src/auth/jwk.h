/* JSON Web Keys (RFC 7517): the public keys that verify tokens. Every key is
 * pinned to one algorithm by its type, so a token's "alg" can only agree with
 * the key, never choose it: RSA (2048 bits or more) is RS256, EC P-256 is ES256. */
#ifndef CMG_JWK_H
#define CMG_JWK_H

#include <cjson/cJSON.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stddef.h>

enum cmg_jws_alg { CMG_ALG_UNKNOWN = 0, CMG_ALG_ES256, CMG_ALG_RS256 };

struct cmg_jwk {
    char kid[128];
    enum cmg_jws_alg alg;
    EVP_PKEY *pkey;
};

struct cmg_jwks {
    struct cmg_jwk *keys;
    size_t n;
};

/* "ES256" / "RS256" → the enum; anything else (none, HS256, ...) → CMG_ALG_UNKNOWN. */
enum cmg_jws_alg cmg_jws_alg_parse(const char *s);
const char *cmg_jws_alg_name(enum cmg_jws_alg a);

/* Parses a JWKS document {"keys":[...]} (or a single JWK object). Keys of an unknown
 * type, with "use" other than "sig", or whose "alg" disagrees with their type are
 * skipped; RSA keys under 2048 bits are skipped. -1 with a reason in err if the
 * document is not JSON or holds no usable key. */
int cmg_jwks_parse(const char *json, size_t len, struct cmg_jwks *out, char *err,
                   size_t errlen);
/* The same, from an already parsed document. */
int cmg_jwks_from_json(const cJSON *doc, struct cmg_jwks *out, char *err, size_t errlen);
void cmg_jwks_free(struct cmg_jwks *s);
/* The key with this kid; with kid NULL (or a set of one key without a kid), the only
 * key if there is exactly one. */
const struct cmg_jwk *cmg_jwks_find(const struct cmg_jwks *s, const char *kid);

/* The public JWK of an EC P-256 or RSA key, with "kid", "use":"sig" and "alg".
 * Returns a new cJSON object, or NULL. */
cJSON *cmg_jwk_public(EVP_PKEY *pkey, const char *kid);
/* RFC 7638 thumbprint of the public key, base64url: a stable kid for a key. */
int cmg_jwk_thumbprint(EVP_PKEY *pkey, char out[44]);
/* A key id fit to travel in a header and a log line (1..128 of letters, digits and
 * "-_.=+/:~", as base64url and base64 kids are). */
bool cmg_jwk_kid_plain(const char *kid);
/* An EC key on P-256, the only curve ES256 allows. */
bool cmg_jwk_is_p256(EVP_PKEY *pk);

#endif
