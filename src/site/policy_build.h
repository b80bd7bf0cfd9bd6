/* The signed gateway policy (ARCHITECTURE.md), built from the store, and the routes
 * (role → internal URL) that only connectors get. */
#ifndef CMG_SITE_POLICY_BUILD_H
#define CMG_SITE_POLICY_BUILD_H

#include "site/ctx.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

/* The current policy as a compact JWS (ES256, typ "cmg-policy+jwt"), with its version,
 * and in *routes the routes of the same version, signed too (typ "cmg-routes+jwt",
 * payload {"version": N, "iat": T, "routes": {"<role>": {"url", "type"}}}): connectors
 * act on nothing the site key did not sign. NULL with a reason in err. */
char *cmg_site_policy_build(struct cmg_site_ctx *s, int64_t *version, char **routes,
                            char *err, size_t errlen);
/* Whether gateways check client certificates against the CRL: the "check_revocation"
 * setting, on unless it was turned off. */
bool cmg_site_revocation_checked(struct cmg_site_ctx *s);
/* Warns (at most once an hour) when the CRL of the policy signed at signed_at has
 * less than half its life left: the site has not managed to re-sign for days, and
 * when it runs out gateways refuse every certificate device. */
void cmg_site_crl_freshness(time_t signed_at, time_t now);
/* The site CA's CRL, PEM, listing every revoked certificate of the store. */
char *cmg_site_crl_pem(struct cmg_site_ctx *s);

#endif
