/* cmg gateway: listeners for devices and for connectors, and the loop. */
#include "core/config.h"
#include "core/log.h"
#include "core/privdrop.h"
#include "gateway/gateway.h"
#include "gateway/gw.h"
#include "gateway/notify.h"
#include "tls/tls.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char usage[] =
    "usage: cmg gateway -c FILE [--instance I]\n"
    "\n"
    "Runs one gateway instance, the internet-facing role. It serves devices on the\n"
    "'listen' addresses of FILE (HTTPS, HTTP/1.1 and HTTP/2; client certificate,\n"
    "site device token or OIDC token), forwards what a published mapping covers down\n"
    "a tunnel to a connector, and refuses the rest. It takes tunnels from connectors\n"
    "on tunnel_listen, port tunnel_port + I (10140 + I by default). Instances on one\n"
    "host share the device port (SO_REUSEPORT), up to 16 of them.\n"
    "Started as root, it binds its listeners, then goes on as the unprivileged 'user'\n"
    "of FILE (it refuses to go on as root when that user does not exist).\n"
    "The device port opens (listens) once a policy is in force and a connector's\n"
    "tunnel is up, or after ready_timeout (0: at once); the tunnel port at once.\n"
    "It logs to stderr. SIGTERM or SIGINT drains it: it leaves the device port to the\n"
    "other instances, HTTP/2 devices get GOAWAY and HTTP/1.1 devices Connection: close,\n"
    "requests in flight have drain_timeout to finish (then they are cut), and it exits\n"
    "0 once no connection is left. SIGQUIT, or a second SIGTERM, stops it at once.\n"
    "SIGHUP reloads FILE and the certificates it names, all or nothing, without\n"
    "touching live connections (refused during a drain).\n"
    "TLS sessions resume at every instance and after a restart: the ticket keys are\n"
    "shared through ticket_key_file (default ticket.keys beside policy_cache, mode 0600,\n"
    "a new key every ticket_key_rotate, re-read each minute and on SIGHUP). Full TLS\n"
    "handshakes beyond handshake_rate a second wait their turn; resumed ones do not.\n"
    "Metrics and health: plain HTTP on metrics_listen, port + I (127.0.0.1:10160 + I by\n"
    "default; off disables): /metrics (Prometheus), /healthz, and /readyz (200 once\n"
    "serving with a policy in force and a tunnel up; 503 while starting or draining).\n"
    "Reports: every report_interval of FILE (default 300 s), within a second of a\n"
    "tunnel's change and once when a drain starts, its counters and tunnels go up\n"
    "every tunnel to the connectors, which pass them to the site (instance_name of\n"
    "FILE names the instance; default: the host name, '/', I).\n"
    "\n"
    "options:\n"
    "  -c, --config FILE   gateway.conf (keys: docs/configuration.md, the man page)\n"
    "  -i, --instance I    instance number, 0..15 (default: 'instance' in FILE, or 0)\n"
    "  -h, --help          print this help\n"
    "\n"
    "Exit status: 0 stopped by a signal, 1 failed to start or run, 2 bad usage.\n";

/* The certificate devices see must be valid now and name service_name: a gateway
 * that cannot serve says so rather than report ready (or, on reload, keeps what it has). */
static int check_cert(SSL_CTX *dev, const struct cmg_gw_config *c)
{
    char err[1200];

    if (cmg_tls_check_server_cert(dev, c->cert, c->service_name, err, sizeof(err)) < 0) {
        cmg_error("%s", err);
        return -1;
    }
    return 0;
}

/* The certificate and the CAs are watched for their end. */
static void watch_certs(struct cmg_gateway *gw)
{
    struct cmg_gw_config *c = &gw->cfg;
    char err[1200];

    cmg_tls_watch_cert(&gw->cert_watch, "gateway certificate", c->cert,
                       SSL_CTX_get0_certificate(gw->device_ctx));
    if (c->client_ca[0] && cmg_tls_watch_file(&gw->cert_watch, "device CA", c->client_ca, err,
                                              sizeof(err)) < 0)
        cmg_warn("%s", err);
    if (c->connector_ca[0] && cmg_tls_watch_file(&gw->cert_watch, "connector CA",
                                                 c->connector_ca, err, sizeof(err)) < 0)
        cmg_warn("%s", err);
    cmg_tls_watch_start(&gw->cert_watch, gw->loop);
}

/* The TLS contexts for devices and for connectors, from c: both, or neither. */
static int make_contexts(const struct cmg_gw_config *c, SSL_CTX **dev_ctx, SSL_CTX **tun_ctx)
{
    char err[512];
    struct cmg_tls_server_opts dev = {
        .cert = c->cert, .key = c->key[0] ? c->key : NULL, .password = c->cert_password,
        .client_ca = c->client_ca, .client_auth = CMG_TLS_ASK_CLIENT_CERT, .alpn = "h2,http/1.1"};
    struct cmg_tls_server_opts tun = dev;

    *dev_ctx = *tun_ctx = NULL;
    if (!(*dev_ctx = cmg_tls_server_ctx(&dev, err, sizeof(err)))) {
        cmg_error("device TLS: %s", err);
        return -1;
    }
    if (check_cert(*dev_ctx, c) < 0)
        goto fail;
    tun.client_ca = c->connector_ca;
    tun.client_auth = CMG_TLS_REQUIRE_CLIENT_CERT;
    tun.alpn = CMG_TUNNEL_ALPN;
    tun.client_eku = CMG_OID_EKU_CONNECTOR;   /* a connector's certificate, no other */
    if (!(*tun_ctx = cmg_tls_server_ctx(&tun, err, sizeof(err)))) {
        cmg_error("tunnel TLS: %s", err);
        goto fail;
    }
    cmg_tls_tunnel_ciphers(*tun_ctx);
    return 0;
fail:
    SSL_CTX_free(*dev_ctx);
    *dev_ctx = NULL;
    return -1;
}

/* Device tickets are made and read with the keys of ticket_key_file (off: OpenSSL's
 * own key, one per context). */
static int share_tickets(struct cmg_gateway *gw, SSL_CTX *dev)
{
    if (cmg_tickets_keep_chain(dev) == 0 && cmg_gw_admission_attach(gw, dev) == 0 &&
        (gw->cfg.ticket_keys_off || cmg_tickets_attach(&gw->tickets, dev) == 0))
        return 0;
    cmg_error("device TLS: cannot set the session ticket keys of %s", gw->cfg.ticket_key_file);
    return -1;
}

/* After the drop from root, so that the file is the user's to rotate. */
static int start_tickets(struct cmg_gateway *gw)
{
    char err[PATH_MAX + 300];

    if (gw->cfg.ticket_keys_off) {
        cmg_info("ticket_key_file off: TLS session tickets of this process only (no resumption "
                 "at another instance or after a restart)");
        return 0;
    }
    if (cmg_tickets_start(&gw->tickets, gw->loop, gw->cfg.ticket_key_file,
                          gw->cfg.ticket_key_rotate_s, err, sizeof(err)) < 0) {
        cmg_error("%s", err);
        return -1;
    }
    return 0;
}

static int setup(struct cmg_gateway *gw)
{
    if (make_contexts(&gw->cfg, &gw->device_ctx, &gw->tunnel_ctx) < 0 ||
        share_tickets(gw, gw->device_ctx) < 0)
        return -1;
    watch_certs(gw);
    cmg_gw_migrate_setup(gw);   /* before the drop from root */
    return cmg_gw_listen(gw) < 0 || cmg_gw_metrics_start(gw) < 0 || cmg_gw_report_start(gw) < 0
               ? -1
               : cmg_notify_start(gw);
}

/* A key that only a restart applies keeps its running value; the log says so. */
static void keep_str(const char *key, char *next, const char *now, size_t size)
{
    if (strcmp(next, now) != 0) {
        cmg_warn("reload: %s changed (%s -> %s): it applies at the next start; kept %s", key,
                 now, next, now);
        snprintf(next, size, "%s", now);
    }
}

static void keep_restart_only(struct cmg_gw_config *next, const struct cmg_gw_config *now)
{
    bool listen_same = next->nlisten == now->nlisten;

    for (int i = 0; listen_same && i < now->nlisten; i++)
        listen_same = !strcmp(next->listen[i], now->listen[i]);
    if (!listen_same) {
        cmg_warn("reload: listen changed: it applies at the next start; kept the listeners");
        memcpy(next->listen, now->listen, sizeof(now->listen));
        next->nlisten = now->nlisten;
    }
    if (next->notify_window != now->notify_window) {
        cmg_warn("reload: notify_window changed (%u -> %u): it applies at the next start; kept %u",
                 now->notify_window, next->notify_window, now->notify_window);
        next->notify_window = now->notify_window;
    }
    if (next->tunnel_port != now->tunnel_port) {
        cmg_warn("reload: tunnel_port changed (%u -> %u): it applies at the next start; kept %u",
                 now->tunnel_port, next->tunnel_port, now->tunnel_port);
        next->tunnel_port = now->tunnel_port;
    }
    next->instance = now->instance;   /* --instance, or what the start read */
    keep_str("metrics_listen", next->metrics.listen, now->metrics.listen,
             sizeof(next->metrics.listen));
    keep_str("tunnel_listen", next->tunnel_listen, now->tunnel_listen, sizeof(next->tunnel_listen));
    keep_str("user", next->user, now->user, sizeof(next->user));
    /* the name the instance's reports carry, chosen at start */
    keep_str("instance_name", next->instance_name, now->instance_name, sizeof(next->instance_name));
    keep_str("policy_cache", next->policy_cache, now->policy_cache, sizeof(next->policy_cache));
    keep_str("site_key", next->site_key, now->site_key, sizeof(next->site_key));
    if (next->ticket_keys_off != now->ticket_keys_off ||
        strcmp(next->ticket_key_file, now->ticket_key_file) != 0) {
        cmg_warn("reload: ticket_key_file changed: it applies at the next start; kept %s",
                 now->ticket_keys_off ? "off" : now->ticket_key_file);
        next->ticket_keys_off = now->ticket_keys_off;
        snprintf(next->ticket_key_file, sizeof(next->ticket_key_file), "%s", now->ticket_key_file);
    }
    /* Policies are accepted for this name, and the local policy was made from this file's
     * mappings and client_ca at start. */
    keep_str("service_name", next->service_name, now->service_name, sizeof(next->service_name));
    keep_str("client_ca", next->client_ca, now->client_ca, sizeof(next->client_ca));
    if (next->nmappings != now->nmappings ||
        (now->nmappings &&
         memcmp(next->mappings, now->mappings, now->nmappings * sizeof(*now->mappings)) != 0))
        cmg_warn("reload: the [mapping] sections changed: the local policy they make applies at "
                 "the next start (the site's signed policy, once in force, decides anyway)");
}

/* SIGHUP: gateway.conf and every certificate and key it names are read again, and
 * applied all together or not at all. Connections and tunnels keep going with what
 * they started with; new ones get the new certificates and limits. */
static void reload(void *arg)
{
    struct cmg_gateway *gw = arg;
    struct cmg_gw_config next;
    SSL_CTX *dev, *tun;
    char err[600];

    if (gw->state == CMG_GW_DRAINING) {
        cmg_warn("SIGHUP refused: the gateway is draining (SIGTERM), %u request(s) in flight; "
                 "nothing reloaded", gw->nexchanges);
        return;
    }
    if (cmg_gw_config_load(&next, gw->cfg.file, err, sizeof(err)) < 0) {
        cmg_error("reload failed, nothing changed: %s", err);
        cmg_gw_config_free(&next);
        return;
    }
    keep_restart_only(&next, &gw->cfg);
    if (make_contexts(&next, &dev, &tun) < 0) {
        cmg_error("reload failed, nothing changed: %s names certificates the gateway cannot use "
                  "(the line above says why)", next.file);
        cmg_gw_config_free(&next);
        return;
    }
    if (share_tickets(gw, dev) < 0) {
        cmg_error("reload failed, nothing changed");
        SSL_CTX_free(dev);
        SSL_CTX_free(tun);
        cmg_gw_config_free(&next);
        return;
    }
    SSL_CTX_free(gw->device_ctx);   /* connections made with them hold their own reference */
    SSL_CTX_free(gw->tunnel_ctx);
    gw->device_ctx = dev;
    gw->tunnel_ctx = tun;
    /* The local mappings were copied into the policy at start; the site's policy decides. */
    cmg_gw_config_free(&gw->cfg);
    gw->cfg = next;
    cmg_log_set_level(gw->cfg.log_level);
    cmg_log_set_format(gw->cfg.log_format);
    cmg_gw_listen_refit(gw);
    cmg_tickets_reload(&gw->tickets, gw->cfg.ticket_key_rotate_s);
    cmg_tls_watch_free(&gw->cert_watch);
    watch_certs(gw);
    cmg_info("reloaded %s: certificates, keys and limits in force for new connections; %u "
             "device connection(s) and their requests go on", gw->cfg.file, gw->ndevices);
}

/* After the drop, what the gateway still opens must be open to its user: the policy cache's
 * directory (a new policy is written beside it, then renamed), and what a reload re-reads. */
static void check_access_as_user(const struct cmg_gateway *gw)
{
    const struct cmg_gw_config *c = &gw->cfg;
    const char *reread[] = {c->file, c->cert, c->key, c->client_ca, c->connector_ca, c->site_key};
    char dir[PATH_MAX];

    if (gw->policy_cache[0]) {
        cmg_conf_dir(gw->policy_cache, dir, sizeof(dir));
        if (access(dir, W_OK | X_OK) != 0)
            cmg_warn("policy_cache %s: uid %lu cannot write in %s (%m): new policies apply but "
                     "are not kept for the next start", gw->policy_cache,
                     (unsigned long)geteuid(), dir);
    }
    for (size_t i = 0; i < sizeof(reread) / sizeof(reread[0]); i++)
        if (reread[i][0] && access(reread[i], R_OK) != 0)
            cmg_warn("%s: uid %lu cannot read it (%m): a reload would fail", reread[i],
                     (unsigned long)geteuid());
}

static int drop_root(struct cmg_gateway *gw)
{
    char err[400];

    if (cmg_drop_privileges(gw->cfg.user, err, sizeof(err)) < 0) {
        cmg_error("%s", err);
        return -1;
    }
    check_access_as_user(gw);
    return 0;
}

static void teardown(struct cmg_gateway *gw)
{
    cmg_device_close_all(gw);
    cmg_tunnel_close_all(gw);
    cmg_gw_listen_close(gw);
    cmg_gw_report_stop(gw);
    cmg_notify_stop(gw);
    cmg_gw_metrics_free(gw);
    cmg_tls_watch_free(&gw->cert_watch);
    SSL_CTX_free(gw->device_ctx);
    SSL_CTX_free(gw->tunnel_ctx);
    cmg_tickets_stop(&gw->tickets);
    cmg_gw_policy_free(gw);
    cmg_gw_config_free(&gw->cfg);
}

int cmg_gateway_main(int argc, char **argv)
{
    static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
                                         {"instance", required_argument, NULL, 'i'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    struct cmg_gateway gw;
    const char *file = NULL;
    long instance = -1;
    char err[600];
    int ch, rc = 1;

    memset(&gw, 0, sizeof(gw));
    cmg_log_init("gateway");
    optind = 1;
    while ((ch = getopt_long(argc, argv, "c:i:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'c':
            file = optarg;
            break;
        case 'i': {
            char *end;
            instance = strtol(optarg, &end, 10);
            if (*end || instance < 0 || instance > 15) {
                fprintf(stderr, "cmg gateway: --instance must be 0..15\n");
                return 2;
            }
            break;
        }
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
    if (cmg_gw_config_load(&gw.cfg, file, err, sizeof(err)) < 0) {
        fprintf(stderr, "cmg gateway: %s\n", err);
        cmg_gw_config_free(&gw.cfg);
        return 1;
    }
    if (instance >= 0)
        gw.cfg.instance = (uint32_t)instance;
    cmg_log_set_level(gw.cfg.log_level);
    cmg_log_set_format(gw.cfg.log_format);
    gw.loop = cmg_loop_new();
    if (!gw.loop)
        goto out;
    if (cmg_gw_policy_init(&gw) < 0 || setup(&gw) < 0 || drop_root(&gw) < 0 ||
        start_tickets(&gw) < 0)
        goto out;
    cmg_loop_on_hup(gw.loop, reload, &gw);
    cmg_loop_on_drain(gw.loop, cmg_gw_drain, &gw);
    cmg_info("gateway %s instance %u started: policy version %lld, %zu mapping(s) published",
             gw.cfg.service_name, gw.cfg.instance, (long long)gw.policy->version,
             gw.policy->nmappings);
    if (cmg_gw_ready_start(&gw) < 0)
        goto out;
    rc = cmg_loop_run(gw.loop) < 0 || gw.failed ? 1 : 0;
    cmg_info("gateway stopped");
out:
    if (gw.loop) {
        teardown(&gw);
        cmg_loop_free(gw.loop);
    } else {
        cmg_gw_config_free(&gw.cfg);
    }
    return rc;
}
