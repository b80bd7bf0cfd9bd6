/* OIDC keys that follow the provider. The key set of the accepted issuer is fetched
 * from its JWKS URL, found through its discovery document
 * (.well-known/openid-configuration) when one was named; 'oidc set' does it once, and
 * the running site service again on a schedule: the configured interval (site.conf
 * oidc_refresh, default hourly), or what the provider's Cache-Control max-age /
 * Expires say within [5 min, 24 h], 30 s while the last fetch failed, and soon when a
 * gateway reports a token with a key id it does not know (at most once a minute). A
 * changed key set is stored and the policy republished at once.
 *
 * The fetch is a blocking HTTP client: the site service runs it in a child process
 * that it kills after CMG_OIDC_FETCH_DEADLINE_S, so a slow or hostile provider cannot
 * stall the admin API or the connectors' feed. */
#ifndef CMG_SITE_OIDC_REFRESH_H
#define CMG_SITE_OIDC_REFRESH_H

#include "core/loop.h"
#include "site/ctx.h"

#include <cjson/cJSON.h>
#include <stdint.h>

#define CMG_OIDC_DOC_MAX (1024 * 1024)      /* a discovery document or a key set */
#define CMG_OIDC_FETCH_DEADLINE_S 20

/* Where the keys come from: a discovery URL, else a JWKS URL; PEM roots of a private
 * provider or NULL for the system's; the issuer the discovery document must name, or
 * NULL to take it from there. */
struct cmg_oidc_source {
    const char *discovery, *jwks_uri, *ca_pem, *issuer;
};

struct cmg_oidc_fetched {
    char *issuer;        /* from the discovery document; NULL without one */
    char *jwks_uri;      /* where the keys came from */
    cJSON *jwks;         /* holds at least one usable key */
    int64_t max_age;     /* seconds the provider says they stay fresh; -1: it says nothing */
};

/* Fetches the key set (blocking; each wait bounded, each document at most
 * CMG_OIDC_DOC_MAX). -1 with a reason naming the URL in err. */
int cmg_oidc_fetch_keys(const struct cmg_oidc_source *src, struct cmg_oidc_fetched *out,
                        char *err, size_t errlen);
void cmg_oidc_fetched_free(struct cmg_oidc_fetched *f);

struct cmg_oidc_refresher;

/* Refreshes the keys of ctx's store on loop; changed(arg) runs after new keys were
 * stored. The first refresh comes a second after start. NULL when out of memory. */
struct cmg_oidc_refresher *cmg_oidc_refresher_new(struct cmg_loop *loop,
                                                  struct cmg_site_ctx *ctx,
                                                  void (*changed)(void *arg), void *arg);
/* A gateway saw a token of the issuer signed with key id kid, which the policy lacks. */
void cmg_oidc_refresher_unknown_kid(struct cmg_oidc_refresher *r, const char *kid);
/* For the admin API's status: {"fetching", "next_in" (s), "last_ok" (Unix time, 0:
 * never), "last_error" ("" unless the last fetch failed)}. */
cJSON *cmg_oidc_refresher_status(const struct cmg_oidc_refresher *r);
/* Stops a fetch in progress (its process is killed and reaped). */
void cmg_oidc_refresher_free(struct cmg_oidc_refresher *r);

#endif
