/* The connector's certificates, checked at start and on SIGHUP; the reload itself:
 * connector.conf and every certificate, key and CA it names read again, checked, and
 * applied all together or not at all. Tunnels, streams and the feed's long poll go on
 * with what they started with; new dials, new feed requests and new connections to
 * internal services use the new files. */
#include "connector/cn.h"
#include "core/log.h"
#include "tls/tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What a reload builds before it applies anything. */
struct next_tls {
    SSL_CTX *tunnel;                       /* gateways */
    SSL_CTX *feed;                         /* the site (NULL without 'site =') */
    SSL_CTX **mapping;                     /* per mapping of the running config */
    SSL_CTX **route;                       /* per route from the site, in list order */
    size_t nroutes;
};

SSL_CTX *cmg_cn_tunnel_ctx(const struct cmg_cn_config *c, char *err, size_t errlen)
{
    struct cmg_tls_client_opts tun = {.ca = c->ca, .cert = c->cert, .key = c->key,
                                      .alpn = "cmg-tunnel/1"};
    SSL_CTX *ctx = cmg_tls_client_ctx(&tun, err, errlen);

    if (ctx)
        cmg_tls_tunnel_ciphers(ctx);
    return ctx;
}

SSL_CTX *cmg_cn_mapping_ctx(const struct cmg_cn_mapping *m, char *err, size_t errlen)
{
    struct cmg_tls_client_opts up = {.ca = m->ca[0] ? m->ca : NULL,
                                     .cert = m->client_cert[0] ? m->client_cert : NULL,
                                     .key = m->client_key[0] ? m->client_key : NULL};

    return cmg_tls_client_ctx(&up, err, errlen);
}

void cmg_cn_check_certs(struct cmg_connector *cn)
{
    struct cmg_cn_config *c = &cn->cfg;
    X509 *own = SSL_CTX_get0_certificate(cn->tunnel_ctx);
    char err[PATH_MAX + 64], usages[256], subject[256];

    /* Gateways and the site refuse any other than a connector's: a device's shows at
     * start, named, rather than as a refused handshake. */
    if (own && !cmg_tls_has_eku(own, CMG_OID_EKU_CONNECTOR)) {
        cmg_tls_usages(own, usages, sizeof(usages));
        cmg_tls_subject(own, subject, sizeof(subject));
        cmg_error("%s is not a connector certificate: expected the OpenCMG connector usage "
                  "(made by 'cmg site connector add'), found %s (%s%s); gateways and the site "
                  "will refuse it", c->cert, usages, subject,
                  cmg_tls_has_eku(own, "1.3.6.1.5.5.7.3.2") ? ": a device certificate?" : "");
    }
    cmg_tls_watch_free(&cn->cert_watch);
    if (cmg_tls_watch_file(&cn->cert_watch, "connector certificate", c->cert, err,
                           sizeof(err)) < 0 ||
        cmg_tls_watch_file(&cn->cert_watch, "gateway CA", c->ca, err, sizeof(err)) < 0 ||
        (c->site[0] && cmg_tls_watch_file(&cn->cert_watch, "site CA", c->site_ca, err,
                                          sizeof(err)) < 0))
        cmg_warn("%s", err);
    cmg_tls_watch_start(&cn->cert_watch, cn->loop);
}

/* ---- reload ---- */

static void keep_str(const char *key, char *next, const char *now, size_t size)
{
    if (strcmp(next, now) != 0) {
        cmg_warn("reload: %s changed (%s -> %s): it applies at the next start; kept %s", key,
                 now, next, now);
        snprintf(next, size, "%s", now);
    }
}

static bool same_mapping(const struct cmg_cn_mapping *a, const struct cmg_cn_mapping *b)
{
    return !strcmp(a->role, b->role) && !strcmp(a->internal_url, b->internal_url) &&
           !strcmp(a->ca, b->ca) && !strcmp(a->client_cert, b->client_cert) &&
           !strcmp(a->client_key, b->client_key);
}

/* What only a restart applies keeps its running value, named in the log: the gateways
 * (one tunnel each, with its streams), the site's address and key, the [mapping]
 * sections (streams and kept-alive connections point into them). */
static void keep_restart_only(struct cmg_cn_config *next, const struct cmg_cn_config *now)
{
    bool same = next->ngateways == now->ngateways;

    for (int i = 0; same && i < now->ngateways; i++)
        same = !strcmp(next->gateways[i], now->gateways[i]);
    if (!same) {
        cmg_warn("reload: the gateway lines changed: they apply at the next start; kept the "
                 "%d tunnel(s) to the gateways named at start", now->ngateways);
        memcpy(next->gateways, now->gateways, sizeof(now->gateways));
        next->ngateways = now->ngateways;
    }
    keep_str("site", next->site, now->site, sizeof(next->site));
    keep_str("metrics_listen", next->metrics.listen, now->metrics.listen,
             sizeof(next->metrics.listen));
    keep_str("site_key", next->site_key, now->site_key, sizeof(next->site_key));
    same = next->nmappings == now->nmappings;
    for (size_t i = 0; same && i < now->nmappings; i++)
        same = same_mapping(&next->mappings[i], &now->mappings[i]);
    if (!same)
        cmg_warn("reload: the [mapping] sections changed: they apply at the next start; the "
                 "certificates the running ones name are read again");
}

static void next_tls_free(struct next_tls *n, size_t nmappings)
{
    SSL_CTX_free(n->tunnel);
    SSL_CTX_free(n->feed);
    for (size_t i = 0; n->mapping && i < nmappings; i++)
        SSL_CTX_free(n->mapping[i]);
    for (size_t i = 0; n->route && i < n->nroutes; i++)
        SSL_CTX_free(n->route[i]);
    free(n->mapping);
    free(n->route);
    memset(n, 0, sizeof(*n));
}

/* The routes from the site in use take the new certificates too (the registration
 * service's shows this connector's own); a retired one serves no new request. */
static int build_routes(struct cmg_connector *cn, const struct cmg_cn_config *next,
                        struct next_tls *n, char *err, size_t errlen)
{
    struct cmg_cn_config view = *next;   /* next's files, the mappings in force */
    size_t i = 0;

    view.mappings = cn->cfg.mappings;
    view.nmappings = cn->cfg.nmappings;
    for (struct cmg_cn_mapping *m = cn->routes; m; m = m->next)
        n->nroutes++;
    if (n->nroutes && !(n->route = calloc(n->nroutes, sizeof(*n->route)))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (struct cmg_cn_mapping *m = cn->routes; m; m = m->next, i++) {
        char why[512];
        if (m->tls && !m->retired &&
            !(n->route[i] = cmg_cn_route_ctx(&view, m, why, sizeof(why)))) {
            snprintf(err, errlen, "route %s (%.300s): %.500s", m->role, m->internal_url, why);
            return -1;
        }
    }
    return 0;
}

/* Every context the new configuration needs, each of its files checked: 0, or -1 with
 * err naming the file and what is wrong. */
static int build(struct cmg_connector *cn, const struct cmg_cn_config *next,
                 struct next_tls *n, char *err, size_t errlen)
{
    const struct cmg_cn_config *now = &cn->cfg;
    const char *own_ca = next->site[0] ? next->site_ca : NULL;   /* the site CA, if known */

    if (!(n->tunnel = cmg_cn_tunnel_ctx(next, err, errlen)) ||
        cmg_tls_check_own_cert(n->tunnel, next->cert, own_ca, CMG_OID_EKU_CONNECTOR, err,
                               errlen) < 0)
        return -1;
    if (next->site[0] && !(n->feed = cmg_site_feed_tls(next, err, errlen)))
        return -1;
    if (now->nmappings && !(n->mapping = calloc(now->nmappings, sizeof(*n->mapping)))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < now->nmappings; i++) {
        const struct cmg_cn_mapping *m = &now->mappings[i];
        char why[512];
        if (m->tls && !(n->mapping[i] = cmg_cn_mapping_ctx(m, why, sizeof(why)))) {
            snprintf(err, errlen, "mapping %s (%.300s): %.500s", m->role, m->internal_url, why);
            return -1;
        }
    }
    return build_routes(cn, next, n, err, errlen);
}

/* Puts the new contexts and next in force; connections made with the old contexts hold
 * their own reference. The running mappings stay (streams and kept-alive connections
 * point into them): the ones just read go. */
static void apply(struct cmg_connector *cn, struct cmg_cn_config *next, struct next_tls *n)
{
    struct cmg_cn_mapping *fresh = next->mappings;
    size_t nfresh = next->nmappings, i = 0;

    SSL_CTX_free(cn->tunnel_ctx);
    cn->tunnel_ctx = n->tunnel;
    if (n->feed)
        cmg_site_feed_set_tls(cn, n->feed);
    for (size_t k = 0; k < cn->cfg.nmappings; k++) {
        if (!cn->cfg.mappings[k].tls)
            continue;
        SSL_CTX_free(cn->cfg.mappings[k].ctx);
        cn->cfg.mappings[k].ctx = n->mapping[k];
    }
    for (struct cmg_cn_mapping *m = cn->routes; m; m = m->next, i++) {
        if (!n->route[i])
            continue;
        SSL_CTX_free(m->ctx);
        m->ctx = n->route[i];
    }
    free(n->mapping);
    free(n->route);
    memset(n, 0, sizeof(*n));
    next->mappings = cn->cfg.mappings;
    next->nmappings = cn->cfg.nmappings;
    cn->cfg.mappings = fresh;
    cn->cfg.nmappings = nfresh;
    cmg_cn_config_free(&cn->cfg);
    cn->cfg = *next;
}

void cmg_cn_reload(void *arg)
{
    struct cmg_connector *cn = arg;
    struct cmg_cn_config next;
    struct next_tls n = {0};
    char err[2048], serial[80];
    int up = 0;

    if (cmg_cn_config_read(&next, cn->cfg.file, err, sizeof(err)) < 0) {
        cmg_error("reload failed, nothing changed: %s", err);
        cmg_cn_config_free(&next);
        return;
    }
    keep_restart_only(&next, &cn->cfg);
    if (build(cn, &next, &n, err, sizeof(err)) < 0) {
        cmg_error("reload failed, nothing changed: %s", err);
        next_tls_free(&n, cn->cfg.nmappings);
        cmg_cn_config_free(&next);
        return;
    }
    apply(cn, &next, &n);
    cmg_log_set_level(cn->cfg.log_level);
    cmg_log_set_format(cn->cfg.log_format);
    cmg_cn_check_certs(cn);
    for (int i = 0; i < cn->ntunnels; i++)
        up += cn->tunnels[i].up;
    cmg_tls_serial(SSL_CTX_get0_certificate(cn->tunnel_ctx), serial, sizeof(serial));
    cmg_info("reloaded %s: certificate %s (serial %s), its key, CAs and settings in force for "
             "new tunnels, feed requests and internal connections; %d tunnel(s) up go on with "
             "their requests", cn->cfg.file, cn->cfg.cert, serial, up);
}
