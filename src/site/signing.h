/* The site's signing keys and their rotation (docs/policy.md). The current private
 * key is DIR/site-signing.key (its public half DIR/site-signing.pub, what gateways
 * and connectors pin); the store records every key the site signed with: its public
 * JWK, when it was made and retired, and the announcement of it signed by the key
 * before. A rotation makes the next key, announces it with the current one, and
 * forgets the current private key: it signs nothing again. */
#ifndef CMG_SITE_SIGNING_H
#define CMG_SITE_SIGNING_H

#include "auth/jws.h"
#include "site/ctx.h"

#include <cjson/cJSON.h>
#include <stdint.h>

#define CMG_SITE_SIGNING_NEXT "site-signing.key.next"   /* a rotation under way */
#define CMG_SITE_KEY_ROTATION_S (180 * 86400)           /* default site.conf key_rotation */

/* Loads the store's current signing key into s (sign_key, sign_pub, sign_created):
 * from DIR/site-signing.key, or from the key of a rotation that was committed but not
 * yet put in place, which it then puts in place. The key of a site made before
 * rotations is recorded as the first. -1 with a reason in err. */
int cmg_site_signing_load(struct cmg_site_ctx *s, char *err, size_t errlen);
/* The same when the store's current key is not the one s holds (another process
 * rotated it); 0 if nothing changed or it was loaded. */
int cmg_site_signing_reload(struct cmg_site_ctx *s, char *err, size_t errlen);
/* Rotates: a new key, announced by the current one, retires it (policy version + 1).
 * result: {"kid", "previous", "created"}. 0, or an HTTP status with msg. */
int cmg_site_key_rotate(struct cmg_site_ctx *s, cJSON **result, char *msg, size_t len);
/* Whether the current key is older than key_rotation (never when it is 0). */
bool cmg_site_key_rotation_due(const struct cmg_site_ctx *s, int64_t now);

/* The announcements every signed document carries, oldest first (the last
 * CMG_KEYCHAIN_MAX); NULL if the site never rotated. */
cJSON *cmg_site_signing_chain(struct cmg_site_ctx *s);
/* The keys that verify the site's tokens: the current one and those retired less
 * than the longest token lifetime ago (a {"keys": [...]} JWKS). */
cJSON *cmg_site_token_keys(struct cmg_site_ctx *s, int64_t now);
/* Verifies a token the site signed, with whichever of those keys its kid names. */
int cmg_site_token_verify(struct cmg_site_ctx *s, const struct cmg_jws *j, int64_t now);
/* Rows for 'cert list': each signing key with its kid, created and retired times. */
void cmg_site_signing_list(struct cmg_site_ctx *s, cJSON *list);

#endif
