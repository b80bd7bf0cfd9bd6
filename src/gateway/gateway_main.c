/* cmg gateway: listeners for devices and for connectors, and the loop. */
#include "core/log.h"
#include "gateway/gateway.h"
#include "gateway/gw.h"
#include "tls/tls.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define ACCEPT_BATCH 64

static const char usage[] =
    "usage: cmg gateway -c FILE [--instance I]\n"
    "\n"
    "Runs one gateway instance: it serves devices on the 'listen' addresses of FILE\n"
    "and takes tunnels from connectors on port tunnel_port + I (10140 + I by default).\n"
    "Instances on one host share the device port (SO_REUSEPORT).\n"
    "\n"
    "  -c, --config FILE   gateway.conf (see docs/configuration.md)\n"
    "  -i, --instance I    instance number, 0..15 (default: 'instance' in FILE, or 0)\n"
    "  -h, --help          this text\n";

static void pause_accepting(struct cmg_gateway *gw, bool pause);

static void on_accept_timer(struct cmg_timer *t)
{
    struct cmg_gateway *gw =
        (struct cmg_gateway *)((char *)t - offsetof(struct cmg_gateway, accept_timer));
    pause_accepting(gw, false);
}

static void pause_accepting(struct cmg_gateway *gw, bool pause)
{
    for (int i = 0; i < gw->nlisteners; i++)
        if (!gw->listeners[i].tunnel)
            cmg_io_set(&gw->listeners[i].io, pause ? 0 : EPOLLIN);
    gw->accept_paused = pause;
    if (pause)
        cmg_timer_start(gw->loop, &gw->accept_timer, 100, on_accept_timer);
}

static void on_accept(struct cmg_io *io, uint32_t events)
{
    struct cmg_listener *l = (struct cmg_listener *)io;
    struct cmg_gateway *gw = l->gw;
    int one = 1;

    for (int i = 0; i < ACCEPT_BATCH; i++) {
        int fd = accept4(io->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                cmg_warn("out of file descriptors: accepting paused for 100 ms");
                pause_accepting(gw, true);
            }
            return;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (l->tunnel) {
            cmg_tunnel_accept(gw, fd);
            continue;
        }
        if (gw->ndevices >= gw->cfg.max_connections) {
            close(fd);
            if (!gw->accept_paused) {
                cmg_warn("max_connections (%u) reached: accepting paused", gw->cfg.max_connections);
                pause_accepting(gw, true);
            }
            return;
        }
        cmg_device_accept(gw, fd);
    }
}

static int add_listener(struct cmg_gateway *gw, const char *addr, int default_port, bool tunnel)
{
    struct cmg_listener *l = &gw->listeners[gw->nlisteners];
    struct cmg_addr a;
    char err[300];
    int fd;

    if (cmg_addr_parse(addr, default_port, &a, err, sizeof(err)) < 0) {
        cmg_error("listen %s: %s", addr, err);
        return -1;
    }
    fd = cmg_net_listen(&a, !tunnel, 4096);
    if (fd < 0) {
        if (a.ss.ss_family == AF_INET6 && (errno == EAFNOSUPPORT || errno == EADDRNOTAVAIL)) {
            cmg_warn("listen %s: no IPv6 here (%s); skipped", addr, strerror(errno));
            return 0;
        }
        cmg_error("listen %s: %s", addr, strerror(errno));
        return -1;
    }
    l->gw = gw;
    l->tunnel = tunnel;
    cmg_addr_str((struct sockaddr *)&a.ss, l->addr, sizeof(l->addr));
    if (cmg_io_start(gw->loop, &l->io, fd, EPOLLIN, on_accept) < 0) {
        close(fd);
        return -1;
    }
    gw->nlisteners++;
    cmg_info("listening for %s on %s", tunnel ? "connectors" : "devices", l->addr);
    return 0;
}

static int setup(struct cmg_gateway *gw)
{
    struct cmg_gw_config *c = &gw->cfg;
    char err[512], taddr[300];
    struct cmg_tls_server_opts dev = {
        .cert = c->cert, .key = c->key[0] ? c->key : NULL, .password = c->cert_password,
        .client_ca = c->client_ca, .client_auth = CMG_TLS_ASK_CLIENT_CERT, .alpn = "h2,http/1.1"};
    struct cmg_tls_server_opts tun = dev;

    gw->device_ctx = cmg_tls_server_ctx(&dev, err, sizeof(err));
    if (!gw->device_ctx) {
        cmg_error("device TLS: %s", err);
        return -1;
    }
    tun.client_ca = c->connector_ca;
    tun.client_auth = CMG_TLS_REQUIRE_CLIENT_CERT;
    tun.alpn = CMG_TUNNEL_ALPN;
    tun.client_eku = CMG_OID_EKU_CONNECTOR;   /* a connector's certificate, no other */
    gw->tunnel_ctx = cmg_tls_server_ctx(&tun, err, sizeof(err));
    if (!gw->tunnel_ctx) {
        cmg_error("tunnel TLS: %s", err);
        return -1;
    }
    cmg_tls_tunnel_ciphers(gw->tunnel_ctx);
    for (int i = 0; i < c->nlisten; i++)
        if (add_listener(gw, c->listen[i], 443, false) < 0)
            return -1;
    if (strchr(c->tunnel_listen, ':') && c->tunnel_listen[0] != '[')
        snprintf(taddr, sizeof(taddr), "[%s]:%u", c->tunnel_listen, c->tunnel_port + c->instance);
    else
        snprintf(taddr, sizeof(taddr), "%s:%u", c->tunnel_listen, c->tunnel_port + c->instance);
    return add_listener(gw, taddr, 0, true);
}

static void teardown(struct cmg_gateway *gw)
{
    cmg_device_close_all(gw);
    cmg_tunnel_close_all(gw);
    for (int i = 0; i < gw->nlisteners; i++) {
        int fd = gw->listeners[i].io.fd;
        cmg_io_stop(&gw->listeners[i].io);
        close(fd);
    }
    SSL_CTX_free(gw->device_ctx);
    SSL_CTX_free(gw->tunnel_ctx);
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
    gw.loop = cmg_loop_new();
    if (!gw.loop)
        goto out;
    if (cmg_gw_policy_init(&gw) < 0 || setup(&gw) < 0)
        goto out;
    cmg_info("gateway %s instance %u ready: policy version %lld, %zu mapping(s) published",
             gw.cfg.service_name, gw.cfg.instance, (long long)gw.policy->version,
             gw.policy->nmappings);
    rc = cmg_loop_run(gw.loop) < 0 ? 1 : 0;
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
