/* JWS compact serialization (RFC 7515) and the JWT claims checks (RFC 7519)
 * that every token check shares. Tokens are hostile input: bounded in size,
 * parsed strictly, verified only with a key whose algorithm is pinned. */
#ifndef CMG_JWS_H
#define CMG_JWS_H

#include "auth/jwk.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>

#define CMG_JWS_MAX 16384   /* longest token accepted, bytes */

struct cmg_jws {
    cJSON *header;          /* JSON objects, both required */
    cJSON *payload;
    unsigned char *sig;
    size_t siglen;
    char *signing_input;    /* "<header>.<payload>" as received */
    size_t signing_input_len;
};

/* Parses "<b64url header>.<b64url payload>.<b64url signature>". -1 if longer than
 * CMG_JWS_MAX, not three parts, not base64url, header or payload not a JSON object,
 * or the header has "crit". On -1, *j holds nothing to free. */
int cmg_jws_parse(const char *token, size_t len, struct cmg_jws *j);
/* The same with another size limit (signed policies are larger than tokens);
 * cmg_jws_parse(t, n, j) is cmg_jws_parse_limit(t, n, CMG_JWS_MAX, j). */
int cmg_jws_parse_limit(const char *token, size_t len, size_t max, struct cmg_jws *j);
void cmg_jws_free(struct cmg_jws *j);
/* Header fields, or NULL if absent or not strings. */
const char *cmg_jws_header_str(const struct cmg_jws *j, const char *name);
/* Verifies the signature with key. The header's "alg" must name exactly key->alg
 * (so "none", HS256 or an RSA/EC swap fail). ES256 signatures are 64 bytes r||s.
 * 0 if valid, -1 otherwise. */
int cmg_jws_verify(const struct cmg_jws *j, const struct cmg_jwk *key);
/* Signs payload_json with an EC P-256 key: header {"alg":"ES256","typ":typ,"kid":kid}
 * (typ, kid omitted if NULL). Returns a new NUL-terminated compact JWS, or NULL. */
char *cmg_jws_sign_es256(EVP_PKEY *key, const char *kid, const char *typ,
                         const char *payload_json);
/* The same with one more header parameter, extra_name: extra (copied; none if NULL). */
char *cmg_jws_sign_es256_with(EVP_PKEY *key, const char *kid, const char *typ,
                              const char *extra_name, const cJSON *extra,
                              const char *payload_json);

/* Claims helpers. A string claim, or NULL. */
const char *cmg_jwt_str(const cJSON *payload, const char *name);
/* An integer NumericDate claim; -1 if absent or not a finite number. */
int64_t cmg_jwt_time(const cJSON *payload, const char *name);
/* True if "aud" is aud, or an array holding aud. */
bool cmg_jwt_aud_has(const cJSON *payload, const char *aud);
enum { CMG_JWT_TIME_OK = 0, CMG_JWT_EXPIRED = -1, CMG_JWT_NOT_YET = -2, CMG_JWT_NO_EXP = -3 };
/* exp is required; nbf optional; both judged with skew seconds of allowance. */
int cmg_jwt_check_time(const cJSON *payload, int64_t now, int64_t skew);

#endif
