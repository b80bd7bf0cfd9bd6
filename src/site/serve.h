/* cmg site serve: the running site service. */
#ifndef CMG_SITE_SERVE_H
#define CMG_SITE_SERVE_H

#include "core/loop.h"
#include "site/ctx.h"
#include "tls/tls.h"

#include <cjson/cJSON.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

struct cmg_httpd;
struct feed_waiter;
struct cmg_oidc_refresher;
struct cmg_dashboard;
struct cmg_site_alerts;

struct cmg_site_server {
    struct cmg_site_ctx *ctx;
    struct cmg_loop *loop;
    struct cmg_httpd *admin, *feed, *service;
    SSL_CTX *admin_tls, *channel_tls;
    char *policy;               /* the signed policy in force */
    char *routes;               /* role -> internal URL, for connectors, signed */
    int64_t version;
    time_t signed_at;
    int64_t data_version;
    struct cmg_timer poll;
    struct cmg_timer rotation;  /* daily: is the signing key older than key_rotation? */
    struct feed_waiter *waiters;
    unsigned nwaiters;          /* in waiters: connectors waiting on the feed */
    struct feed_waiter *notify_waiters;   /* connectors waiting on the notify feed */
    int64_t notify_last;        /* the newest notification they were told of */
    struct cmg_tls_watch cert_watch;    /* the site CA and site.crt, for their end */
    struct cmg_oidc_refresher *oidc;   /* keeps the OIDC keys in step with the provider */
    struct cmg_metrics_server *metrics;   /* metrics_listen */
    struct cmg_dashboard *dashboard;      /* the web dashboard on the admin listener */
    time_t reports_pruned;      /* when reports past report_retention were last dropped */
    struct cmg_site_alerts *alerts;       /* thresholds evaluated (alerts.h) */
};

/* DIR/serve.lock: 'site serve' holds an exclusive flock on it while it runs (the
 * kernel lets go however the process ends); the admin commands test it to say whether
 * a change is published now. */
#define CMG_SITE_SERVE_LOCK "serve.lock"
/* Whether a 'site serve' holds the lock of the site directory dir. */
bool cmg_site_serve_running(const char *dir);

/* Whether given is the secret (compared in constant time); false for NULL. */
bool cmg_site_secret_is(const char *given, const char *secret);

/* metrics_site.c: serves metrics_listen; 0, or -1 (logged). */
int cmg_site_metrics_start(struct cmg_site_server *srv);

/* argv[0] is "serve". Returns the exit status. */
int cmg_site_serve_main(int argc, char **argv);
/* The store may have changed: publish a new policy if its version went up. */
void cmg_site_server_changed(struct cmg_site_server *srv);

#endif
