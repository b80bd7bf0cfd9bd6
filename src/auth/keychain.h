/* The chain of site signing keys (docs/policy.md). A verifier pins one site key (the
 * root of trust, site_key in its configuration); when the site rotates its signing
 * key it signs an announcement of the next key with the current one. Every policy
 * and routes document carries the site's latest announcements in its protected
 * header; a verifier follows those that extend what it trusts (each one signed by
 * the newest key it trusts, naming a key it never saw) and then accepts a document
 * only when it is signed by the newest key it reached. A key that was never
 * announced, and a retired key once its successor is known, sign nothing it accepts. */
#ifndef CMG_KEYCHAIN_H
#define CMG_KEYCHAIN_H

#include "auth/jwk.h"
#include "auth/jws.h"

#include <cjson/cJSON.h>
#include <stdint.h>

#define CMG_KEY_ANNOUNCE_TYP "cmg-site-key+jwt"   /* never a policy's nor a routes' typ */
#define CMG_KEYCHAIN_HEADER "cmg_key_chain"       /* header parameter: announcements */
#define CMG_KEYCHAIN_MAX 16                       /* announcements a verifier follows */

struct cmg_keychain {
    struct cmg_jwk keys[CMG_KEYCHAIN_MAX + 1];    /* [0] the pinned key; [n-1] the newest */
    char *links[CMG_KEYCHAIN_MAX];                /* links[i] announced keys[i + 1] */
    size_t n;
};

/* Starts from the pinned key (its pkey is referenced, not taken). -1 if it has no kid. */
int cmg_keychain_init(struct cmg_keychain *kc, const struct cmg_jwk *pinned);
void cmg_keychain_free(struct cmg_keychain *kc);
const struct cmg_jwk *cmg_keychain_newest(const struct cmg_keychain *kc);
/* Follows the announcements of a JSON array (compact JWS strings, oldest first):
 * those that do not extend the chain are skipped. The number of keys learned, or -1
 * (reason in err) if the array is malformed or longer than CMG_KEYCHAIN_MAX. */
int cmg_keychain_follow(struct cmg_keychain *kc, const cJSON *links, char *err, size_t errlen);
/* Verifies a document: follows the announcements its header carries, then checks
 * that the newest key reached signed it. 0, or -1 with a reason naming the kid found
 * and the kids trusted. *learned (may be NULL) counts the keys learned. */
int cmg_keychain_verify(struct cmg_keychain *kc, const struct cmg_jws *j, int *learned,
                        char *err, size_t errlen);
/* The announcements followed, oldest first (a JSON array), to keep beside a cache. */
cJSON *cmg_keychain_links(const struct cmg_keychain *kc);
/* The kids trusted, "a, b, c" (newest last). */
void cmg_keychain_kids(const struct cmg_keychain *kc, char *out, size_t outlen);

/* The announcements a verifier learned are kept in "<policy cache>.keys" (a JSON
 * array), so that a restart reaches the newest key with no chain; read back, they
 * are followed from the pinned key like any others, never trusted as they lie.
 * Restores them (logging each key trusted so); a file that cannot be used is logged
 * and ignored. */
void cmg_keychain_restore(struct cmg_keychain *kc, const char *policy_cache);
/* Logs the keys learned since the chain held `before` and keeps them. */
void cmg_keychain_remember(const struct cmg_keychain *kc, size_t before,
                           const char *policy_cache);

/* The site's side: the announcement of next (kid next_kid) signed by current. */
char *cmg_keychain_announce(EVP_PKEY *current, const char *current_kid, EVP_PKEY *next,
                            const char *next_kid, int64_t now);

#endif
