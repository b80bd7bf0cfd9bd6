/* cmg connector analyze -c connector.conf: the connector's way out, checked from the
 * inside, each step PASS, FAIL or SKIP with a fix and its time (client/analyze.h):
 *   gateway HOST:PORT  dns, tcp, tls (the gateway's chain and name, ALPN cmg-tunnel/1,
 *                      the connector's certificate), tunnel (the gateway's HTTP/2
 *                      preface and SETTINGS: it accepted the connector)
 *   site               dns, tcp, tls, feed (GET /v1/connector/feed answers 200)
 *   route ROLE         dns, tcp, tls (https only), http (any HTTP answer)
 * Every connection is cmg_fetch's, the client's one copy of TCP, TLS and HTTP/1.1. */
#include "client/analyze.h"
#include "client/fetch.h"
#include "connector/cn.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/x509_vfy.h>

#define H2_PREFACE "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#define H2_GREETING (sizeof(H2_PREFACE) - 1 + 9)   /* the preface and a frame header */
#define H2_SETTINGS 0x4
#define ROUTE_BODY_MAX 4096

static const char usage[] =
    "usage: cmg connector analyze -c FILE [--json] [--timeout SECONDS]\n"
    "\n"
    "Checks what the connector of FILE needs, each step PASS, FAIL or SKIP with the\n"
    "time it took and, for a failure, a one-line fix:\n"
    "  gateway HOST:PORT  for each 'gateway =': dns, tcp, tls (the gateway's chain\n"
    "                     and server_name, ALPN cmg-tunnel/1 with this connector's\n"
    "                     certificate), tunnel (the gateway's HTTP/2 greeting: it\n"
    "                     accepted the connector)\n"
    "  site               with 'site =': dns, tcp, tls, feed (the site's feed answers)\n"
    "  route ROLE         for each [mapping]: dns, tcp, tls (https only), http (the\n"
    "                     internal URL gives an HTTP answer, whatever its status)\n"
    "A gateway logs the analyser's tunnel as a failed tunnel handshake.\n"
    "\n"
    "  -c, --config FILE   connector.conf\n"
    "  --json              print a JSON array of steps {name, result, detail, fix, ms}\n"
    "  --timeout SECONDS   for connecting and each read (default 10)\n"
    "  -h, --help          this text\n"
    "\n"
    "Exit status: 0 when no step failed, 1 when one did, 2 bad usage or an unreadable\n"
    "FILE.\n";

struct target {
    const char *prefix;      /* "gateway 10.0.0.1:10140", "site", "route 7205..." */
    const char *fix_dns, *fix_tcp, *fix_tls;
};

/* The dns, tcp and tls steps of one connection, from its trace; true if all passed. */
static bool network_steps(struct cmg_analyze_steps *s, const struct target *t, bool tls,
                          const struct cmg_fetch_trace *tr, const char *err)
{
    char name[128];

    snprintf(name, sizeof(name), "%s dns", t->prefix);
    if (tr->stage <= CMG_FETCH_STAGE_RESOLVE) {
        cmg_analyze_step(s, name, CMG_STEP_FAIL, tr->resolve_ms,
                         tr->stage == CMG_FETCH_STAGE_SETUP ? "check the files FILE names "
                                                              "(cert, key, ca)"
                                                            : t->fix_dns, "%s", err);
        return false;
    }
    cmg_analyze_step(s, name, CMG_STEP_PASS, tr->resolve_ms, NULL, "resolved");
    snprintf(name, sizeof(name), "%s tcp", t->prefix);
    if (tr->stage == CMG_FETCH_STAGE_CONNECT) {
        cmg_analyze_step(s, name, CMG_STEP_FAIL, tr->connect_ms, t->fix_tcp, "%s", err);
        return false;
    }
    cmg_analyze_step(s, name, CMG_STEP_PASS, tr->connect_ms, NULL, "connected to %s",
                     tr->address);
    snprintf(name, sizeof(name), "%s tls", t->prefix);
    if (!tls) {
        cmg_analyze_step(s, name, CMG_STEP_SKIP, 0, NULL, "plain http");
        return true;
    }
    if (tr->stage == CMG_FETCH_STAGE_TLS) {
        cmg_analyze_step(s, name, CMG_STEP_FAIL, tr->tls_ms, t->fix_tls, "%s", err);
        return false;
    }
    cmg_analyze_step(s, name, CMG_STEP_PASS, tr->tls_ms, NULL, "%s, ALPN %s, certificate %s",
                     tr->tls_version, tr->alpn[0] ? tr->alpn : "(none)", tr->peer_subject);
    return true;
}

static void check_gateway(struct cmg_analyze_steps *s, const struct cmg_cn_config *c,
                          const char *gw, int timeout_ms)
{
    char prefix[320], name[340], err[768], buf[H2_GREETING];
    struct target t = {
        prefix,
        "check the gateway's name in DNS, or the 'gateway =' line",
        "check that the gateway runs and that its tunnel_listen port is open to this "
        "connector (a firewall?)",
        "check 'ca' (the CA of the gateway's certificate), 'server_name', and that "
        "'cert'/'key' are this connector's, issued by the site and not revoked"};
    struct cmg_fetch_req req;
    struct cmg_fetch_trace tr;
    size_t got = 0;
    int rc;

    snprintf(prefix, sizeof(prefix), "gateway %s", gw);
    memset(&req, 0, sizeof(req));
    req.addr = gw;
    req.target = "/";
    req.tls = true;
    req.server_name = c->server_name[0] ? c->server_name : NULL;
    req.ca_file = c->ca[0] ? c->ca : NULL;
    req.cert_file = c->cert;
    req.key_file = c->key;
    req.alpn = "cmg-tunnel/1";
    req.timeout_ms = timeout_ms;
    req.trace = &tr;
    rc = cmg_fetch_greeting(&req, buf, sizeof(buf), &got, err, sizeof(err));
    if (!network_steps(s, &t, true, &tr, err))
        return;
    snprintf(name, sizeof(name), "%s tunnel", prefix);
    if (strcmp(tr.alpn, "cmg-tunnel/1"))
        cmg_analyze_step(s, name, CMG_STEP_FAIL, tr.exchange_ms,
                         "point 'gateway =' at the gateway's tunnel_listen port, not its "
                         "device port", "the gateway did not choose ALPN cmg-tunnel/1");
    else if (rc != CMG_FETCH_OK)
        cmg_analyze_step(s, name, CMG_STEP_FAIL, tr.exchange_ms,
                         "the gateway refused this connector: check that 'cert' is this "
                         "connector's, issued by the site and not revoked (the gateway's "
                         "log says why)", "%s", err);
    else if (memcmp(buf, H2_PREFACE, sizeof(H2_PREFACE) - 1) ||
             buf[sizeof(H2_PREFACE) - 1 + 3] != H2_SETTINGS)
        cmg_analyze_step(s, name, CMG_STEP_FAIL, tr.exchange_ms,
                         "point 'gateway =' at an OpenCMG gateway's tunnel port",
                         "the gateway did not start HTTP/2 (no preface and SETTINGS)");
    else
        cmg_analyze_step(s, name, CMG_STEP_PASS, tr.exchange_ms, NULL,
                         "HTTP/2 preface and SETTINGS from the gateway: it accepted the "
                         "connector");
}

static void check_site(struct cmg_analyze_steps *s, const struct cmg_cn_config *c,
                       int timeout_ms)
{
    char url[400], err[768];
    struct target t = {
        "site", "check the site's name in DNS, or the 'site =' line",
        "check that 'cmg site serve' runs and that its feed port is open to this connector",
        "check 'site_ca' (the CA of the site's certificate) and that 'cert'/'key' are this "
        "connector's"};
    struct cmg_fetch_req req;
    struct cmg_fetch_resp resp;
    struct cmg_fetch_trace tr;
    int rc;

    if (!c->site[0]) {
        cmg_analyze_step(s, "site", CMG_STEP_SKIP, 0, NULL, "no 'site =' in the configuration");
        return;
    }
    snprintf(url, sizeof(url), "%s/v1/connector/feed?after=0", c->site);
    memset(&req, 0, sizeof(req));
    req.url = url;
    req.ca_file = c->site_ca[0] ? c->site_ca : c->ca[0] ? c->ca : NULL;
    req.cert_file = c->cert;
    req.key_file = c->key;
    req.timeout_ms = timeout_ms;
    req.truncate_body = true;
    req.max_body = ROUTE_BODY_MAX;
    req.trace = &tr;
    rc = cmg_fetch(&req, &resp, err, sizeof(err));
    if (network_steps(s, &t, true, &tr, err)) {
        if (rc != CMG_FETCH_OK)
            cmg_analyze_step(s, "site feed", CMG_STEP_FAIL, tr.exchange_ms,
                             "the site refused this connector: check that it is registered "
                             "('cmg site connector add') and not revoked", "%s", err);
        else if (resp.status != 200)
            cmg_analyze_step(s, "site feed", CMG_STEP_FAIL, tr.exchange_ms,
                             "check that 'site =' names the site's feed_listen and that this "
                             "connector is registered", "GET %s: %d", url, resp.status);
        else
            cmg_analyze_step(s, "site feed", CMG_STEP_PASS, tr.exchange_ms, NULL,
                             "the feed answered 200");
    }
    cmg_fetch_resp_free(&resp);
}

static void check_route(struct cmg_analyze_steps *s, const struct cmg_cn_mapping *m,
                        int timeout_ms)
{
    char prefix[128], name[160], why[768], err[2048];
    struct target t = {
        prefix, "check the internal URL's host name in the internal DNS",
        "start the internal service, or correct the route's internal_url",
        "check the route's 'ca' (the CA of the service's certificate) and its client "
        "certificate"};
    struct cmg_fetch_req req;
    struct cmg_fetch_resp resp;
    struct cmg_fetch_trace tr;
    int rc;

    snprintf(prefix, sizeof(prefix), "route %s", m->role);
    memset(&req, 0, sizeof(req));
    req.url = m->internal_url;
    req.ca_file = m->ca[0] ? m->ca : NULL;
    req.cert_file = m->client_cert[0] ? m->client_cert : NULL;
    req.key_file = m->client_key[0] ? m->client_key : NULL;
    req.timeout_ms = timeout_ms;
    req.truncate_body = true;
    req.max_body = ROUTE_BODY_MAX;
    req.trace = &tr;
    rc = cmg_fetch(&req, &resp, why, sizeof(why));
    snprintf(err, sizeof(err), "%s: %s", m->internal_url, why);
    if (network_steps(s, &t, m->tls, &tr, err)) {
        snprintf(name, sizeof(name), "%s http", prefix);
        if (rc != CMG_FETCH_OK)
            cmg_analyze_step(s, name, CMG_STEP_FAIL, tr.exchange_ms,
                             "check that internal_url names an HTTP service", "%s", err);
        else
            cmg_analyze_step(s, name, CMG_STEP_PASS, tr.exchange_ms, NULL,
                             "GET %s: %d", m->internal_url, resp.status);
    }
    cmg_fetch_resp_free(&resp);
}

int cmg_connector_analyze_main(int argc, char **argv)
{
    static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
                                         {"json", no_argument, NULL, 'j'},
                                         {"timeout", required_argument, NULL, 't'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    struct cmg_cn_config cfg;
    struct cmg_analyze_steps *steps = NULL;
    const char *file = NULL;
    char err[512];
    bool json = false;
    int opt, timeout_ms = 10000, ret = 2;
    double v;

    memset(&cfg, 0, sizeof(cfg));
    optind = 1;
    while ((opt = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        switch (opt) {
        case 'c': file = optarg; break;
        case 'j': json = true; break;
        case 't':
            v = atof(optarg);
            if (!(v > 0) || v > 3600) {
                fprintf(stderr, "cmg connector analyze: --timeout '%s': seconds expected\n",
                        optarg);
                return 2;
            }
            timeout_ms = (int)(v * 1000);
            break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (!file || optind < argc) {
        fputs(usage, stderr);
        return 2;
    }
    if (cmg_cn_config_read(&cfg, file, err, sizeof(err)) < 0) {
        fprintf(stderr, "cmg connector analyze: %s: %s\n", file, err);
        goto out;
    }
    steps = calloc(1, sizeof(*steps));
    if (!steps) {
        fputs("cmg connector analyze: out of memory\n", stderr);
        goto out;
    }
    for (int i = 0; i < cfg.ngateways; i++)
        check_gateway(steps, &cfg, cfg.gateways[i], timeout_ms);
    check_site(steps, &cfg, timeout_ms);
    for (size_t i = 0; i < cfg.nmappings; i++)
        check_route(steps, &cfg.mappings[i], timeout_ms);
    cmg_analyze_print(steps, json, stdout);
    ret = cmg_analyze_failed(steps) ? 1 : 0;
    cmg_analyze_steps_free(steps);
out:
    free(steps);
    cmg_cn_config_free(&cfg);
    return ret;
}
