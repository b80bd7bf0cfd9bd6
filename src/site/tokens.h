/* Tokens the site issues (SPEC.md §4): bulk registration tokens and device tokens,
 * both JWTs signed ES256 with the site's signing key. */
#ifndef CMG_SITE_TOKENS_H
#define CMG_SITE_TOKENS_H

#include "site/ctx.h"

#include <cjson/cJSON.h>
#include <stdint.h>

/* A bulk registration token valid for lifetime seconds, recorded (GUID and lifetime
 * only) in the store. Returns a new string, or NULL. */
char *cmg_site_bulk_token(struct cmg_site_ctx *s, int64_t now, int64_t lifetime,
                          const char *description, char guid[64], int64_t *expires);
/* A device token bound to the certificate whose SHA-256 thumbprint is thumb_hex (64 hex
 * digits). Returns a new string, or NULL. */
char *cmg_site_device_token(struct cmg_site_ctx *s, const char *device_id,
                            const char *thumb_hex, int64_t now, char jti[64],
                            int64_t *expires);
/* Checks a token of this site: signature, iss, aud, cmg_use (bulk or device), time.
 * 0 with *payload set (the caller frees it), or an HTTP status with *reason. */
int cmg_site_token_check(struct cmg_site_ctx *s, const char *token, size_t len,
                         const char *use, int64_t now, cJSON **payload, const char **reason);
/* The x5t#S256 value (base64url of the 32 bytes) for a hex thumbprint; -1 if malformed. */
int cmg_thumb_hex_to_x5t(const char *hex, char out[44]);

#endif
