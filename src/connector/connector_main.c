/* cmg connector: dials every gateway instance and serves what comes down. */
#include "connector/cn.h"
#include "client/analyze.h"
#include "connector/connector.h"
#include "core/log.h"
#include "tls/tls.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: cmg connector -c FILE\n"
    "       cmg connector analyze -c FILE [--json]\n"
    "\n"
    "Runs a connector on the internal network. It dials out to every gateway\n"
    "instance named in FILE (one 'gateway =' line each), keeps those tunnels up,\n"
    "and forwards the requests that come down them to the internal services of\n"
    "the site routes to (with 'site =') or of its [mapping] sections. It carries\n"
    "the site's signed policy up to every gateway. It needs no inbound port.\n"
    "With 'site =' it follows the site's feed over mutual TLS (its own certificate,\n"
    "the site's required), acts only on a policy and routes that verify with\n"
    "'site_key', keeps the last good ones in 'policy_cache' and serves from there\n"
    "after a restart while the site is down.\n"
    "SIGHUP reloads FILE and the certificates, keys and CAs it names, all or nothing\n"
    "(systemctl reload): new tunnels and requests use them, live ones go on; the\n"
    "gateway lines, site, site_key and [mapping] sections apply at the next start.\n"
    "\n"
    "SIGTERM (or SIGINT) drains: every gateway is told to send no new requests,\n"
    "those in flight finish, then it exits 0; what is left after 'drain_timeout'\n"
    "(30 s) is cut. SIGQUIT, or a second SIGTERM, stops at once.\n"
    "\n"
    "'cmg connector analyze -c FILE' checks each gateway instance (DNS, TCP, TLS,\n"
    "the tunnel protocol), the site's feed and each route's internal URL, and says\n"
    "what to fix ('cmg connector analyze --help').\n"
    "Metrics and health: plain HTTP on metrics_listen (127.0.0.1:10180 by default;\n"
    "off disables): /metrics (Prometheus), /healthz, and /readyz (200 while a tunnel\n"
    "is up; 503 without one or while draining).\n"
    "Reports: the gateways' reports that come up the tunnels go to the site\n"
    "(POST /v1/connector/report on the feed's address) within a second, with this\n"
    "connector's view of each tunnel, and every report_interval (default 300 s).\n"
    "\n"
    "  -c, --config FILE   connector.conf (see docs/configuration.md)\n"
    "  -h, --help          this text\n";

static int setup(struct cmg_connector *cn)
{
    struct cmg_cn_config *c = &cn->cfg;
    char err[512];

    cn->tunnel_ctx = cmg_cn_tunnel_ctx(c, err, sizeof(err));
    if (!cn->tunnel_ctx) {
        cmg_error("tunnel TLS: %s", err);
        return -1;
    }
    cmg_cn_check_certs(cn);
    for (size_t i = 0; i < c->nmappings; i++) {
        struct cmg_cn_mapping *m = &c->mappings[i];
        if (!m->tls)
            continue;
        m->ctx = cmg_cn_mapping_ctx(m, err, sizeof(err));
        if (!m->ctx) {
            cmg_error("mapping %s (%s): %s", m->role, m->internal_url, err);
            return -1;
        }
    }
    for (int i = 0; i < c->ngateways; i++) {
        struct cmg_cn_tunnel *t = &cn->tunnels[i];
        if (cmg_addr_parse(c->gateways[i], 10140, &t->addr, err, sizeof(err)) < 0) {
            cmg_error("gateway %s: %s", c->gateways[i], err);
            return -1;
        }
        snprintf(t->target, sizeof(t->target), "%s", c->gateways[i]);
        cn->ntunnels++;
    }
    if (cmg_cn_metrics_start(cn) < 0)
        return -1;
    for (int i = 0; i < cn->ntunnels; i++)
        cmg_cn_tunnel_start(cn, &cn->tunnels[i]);
    if (cmg_site_feed_start(cn, err, sizeof(err)) < 0) {
        cmg_error("site: %s", err);
        return -1;
    }
    if (cmg_site_report_start(cn) < 0)
        return -1;
    return cmg_notify_feed_start(cn);
}

int cmg_connector_main(int argc, char **argv)
{
    static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    struct cmg_connector cn;
    const char *file = NULL;
    char err[600];
    int ch, rc = 1;

    if (argc > 1 && !strcmp(argv[1], "analyze"))
        return cmg_connector_analyze_main(argc - 1, argv + 1);
    memset(&cn, 0, sizeof(cn));
    cmg_log_init("connector");
    optind = 1;
    while ((ch = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'c':
            file = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            fputs(usage, stderr);
            return 2;
        }
    }
    if (!file || optind != argc) {
        fputs(usage, stderr);
        return 2;
    }
    if (cmg_cn_config_load(&cn.cfg, file, err, sizeof(err)) < 0) {
        fprintf(stderr, "cmg connector: %s\n", err);
        cmg_cn_config_free(&cn.cfg);
        return 1;
    }
    cmg_log_set_level(cn.cfg.log_level);
    cmg_log_set_format(cn.cfg.log_format);
    cn.loop = cmg_loop_new();
    if (cn.loop)
        cmg_loop_on_drain(cn.loop, cmg_cn_drain, &cn);
    if (cn.loop && setup(&cn) == 0) {
        cmg_loop_on_hup(cn.loop, cmg_cn_reload, &cn);
        cmg_info("connector %s started: %d gateway(s), %zu mapping(s)", cn.cfg.name, cn.ntunnels,
                 cn.cfg.nmappings);
        rc = cmg_loop_run(cn.loop) < 0 ? 1 : 0;
        cmg_info("connector stopped");
    }
    cmg_notify_feed_stop(&cn);
    cmg_site_report_stop(&cn);
    cmg_site_feed_stop(&cn);
    for (int i = 0; i < cn.ntunnels; i++)
        cmg_cn_tunnel_stop(&cn.tunnels[i]);
    cmg_upstream_close_all(&cn);
    cmg_cn_metrics_free(&cn);
    cmg_cn_routes_free(&cn);
    cmg_tls_watch_free(&cn.cert_watch);
    free(cn.policy);
    SSL_CTX_free(cn.tunnel_ctx);
    cmg_cn_config_free(&cn.cfg);
    cmg_loop_free(cn.loop);
    return rc;
}
