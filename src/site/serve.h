/* cmg site serve: the running site service. */
#ifndef CMG_SITE_SERVE_H
#define CMG_SITE_SERVE_H

#include "core/loop.h"
#include "site/ctx.h"

#include <cjson/cJSON.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <time.h>

struct cmg_httpd;
struct feed_waiter;
struct cmg_oidc_refresher;

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
    struct feed_waiter *waiters;
    struct cmg_oidc_refresher *oidc;   /* keeps the OIDC keys in step with the provider */
};

/* argv[0] is "serve". Returns the exit status. */
int cmg_site_serve_main(int argc, char **argv);
/* The store may have changed: publish a new policy if its version went up. */
void cmg_site_server_changed(struct cmg_site_server *srv);

#endif
