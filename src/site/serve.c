/* cmg site serve DIR: the on-premises site service. Two listeners on internal
 * addresses: the admin API (with the connectors' policy feed) and the device
 * registration service that connectors forward to. The store is polled for
 * changes made by the admin commands; each new policy version is signed once and
 * handed to every connector waiting on the feed. */
#include "site/serve.h"

#include "core/log.h"
#include "http/httpd.h"
#include "site/ctx.h"
#include "site/ops.h"
#include "site/policy_build.h"
#include "site/register.h"

#include <getopt.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define POLL_MS 250
#define FEED_WAIT_MS 25000
#define REFRESH_S (24 * 3600)   /* re-sign daily, so the CRL in force never goes stale */

struct feed_waiter {
    struct cmg_site_server *srv;
    struct cmg_httpd_req *req;
    struct cmg_timer timer;
    int64_t after;
    struct feed_waiter *prev, *next;
};

static const char usage[] =
    "usage: cmg site serve DIR [--admin ADDR] [--service ADDR]\n"
    "\n"
    "Runs the site service of the site in DIR (made by 'cmg site init'):\n"
    "  - the admin API and the connectors' policy feed, on --admin (default from\n"
    "    DIR/site.conf, else " CMG_SITE_DEFAULT_ADMIN "); callers present DIR/admin.token\n"
    "    (admin) or DIR/connector.secret (connectors) as a bearer token;\n"
    "  - the device registration service, on --service (default from site.conf, else\n"
    "    " CMG_SITE_DEFAULT_SERVICE "): published to devices through the gateway as\n"
    "    /CCM_Proxy_ServerAuth/<site role>/register and .../renew.\n"
    "Both should be internal addresses: nothing here is meant for the internet.\n"
    "Changes made with the admin commands ('cmg site mapping ...', 'token', 'device',\n"
    "'cert', 'oidc') while it runs are signed into a new policy within a second and\n"
    "reach every gateway through the connectors.\n"
    "\n"
    "options:\n"
    "  --admin ADDR     address of the admin API (host:port)\n"
    "  --service ADDR   address of the registration service (host:port)\n"
    "  -h, --help       print this help\n";

/* ---- publishing ---- */

static cJSON *feed_doc(struct cmg_site_server *srv)
{
    cJSON *o = cJSON_CreateObject();

    cJSON_AddNumberToObject(o, "version", (double)srv->version);
    cJSON_AddStringToObject(o, "policy", srv->policy ? srv->policy : "");
    cJSON_AddItemToObject(o, "routes", cJSON_Duplicate(srv->routes, 1));
    return o;
}

static void waiter_free(struct feed_waiter *w)
{
    struct cmg_site_server *srv = w->srv;

    cmg_timer_stop(srv->loop, &w->timer);
    if (w->prev)
        w->prev->next = w->next;
    else
        srv->waiters = w->next;
    if (w->next)
        w->next->prev = w->prev;
    free(w);
}

static void waiter_answer(struct feed_waiter *w)
{
    struct cmg_httpd_req *req = w->req;
    struct cmg_site_server *srv = w->srv;

    req->on_abort = NULL;
    waiter_free(w);
    cmg_httpd_json(req, 200, feed_doc(srv));
}

static int publish(struct cmg_site_server *srv)
{
    char err[256];
    int64_t version;
    char *jws = cmg_site_policy_build(srv->ctx, &version, err, sizeof(err));
    cJSON *routes = cmg_site_routes(srv->ctx);

    if (!jws || !routes) {
        cmg_error("cannot publish the policy: %s", jws ? "cannot read the mappings" : err);
        free(jws);
        cJSON_Delete(routes);
        return -1;
    }
    free(srv->policy);
    cJSON_Delete(srv->routes);
    srv->policy = jws;
    srv->routes = routes;
    srv->version = version;
    srv->signed_at = time(NULL);
    cmg_info("policy version %lld signed", (long long)version);
    while (srv->waiters)
        waiter_answer(srv->waiters);
    return 0;
}

void cmg_site_server_changed(struct cmg_site_server *srv)
{
    int64_t v = cmg_store_policy_version(srv->ctx->store);

    if (v > srv->version)
        publish(srv);
}

static void bump_version(struct cmg_site_server *srv)
{
    struct cmg_store *st = srv->ctx->store;

    if (cmg_store_begin(st) < 0 || cmg_store_bump(st) < 0 || cmg_store_commit(st) < 0) {
        cmg_store_rollback(st);
        cmg_warn("cannot renew the policy: %s", cmg_store_error(st));
    }
}

static void on_poll(struct cmg_timer *t)
{
    struct cmg_site_server *srv =
        (struct cmg_site_server *)((char *)t - offsetof(struct cmg_site_server, poll));
    int64_t dv = cmg_store_data_version(srv->ctx->store);

    if (time(NULL) - srv->signed_at >= REFRESH_S)
        bump_version(srv);
    cmg_site_crl_freshness(srv->signed_at, time(NULL));
    if (dv != srv->data_version || time(NULL) - srv->signed_at >= REFRESH_S) {
        srv->data_version = dv;
        cmg_site_server_changed(srv);
    }
    cmg_timer_start(srv->loop, &srv->poll, POLL_MS, on_poll);
}

/* ---- admin API ---- */

static bool secret_is(const char *given, const char *secret)
{
    size_t n = strlen(secret);
    return given && strlen(given) == n && CRYPTO_memcmp(given, secret, n) == 0;
}

static void on_waiter_timeout(struct cmg_timer *t)
{
    waiter_answer((struct feed_waiter *)((char *)t - offsetof(struct feed_waiter, timer)));
}

static void on_waiter_abort(struct cmg_httpd_req *req)
{
    waiter_free(req->hold);
}

/* GET /v1/connector/feed?after=N: answers at once if the policy is newer than N,
 * otherwise when it changes or after FEED_WAIT_MS. */
static void feed(struct cmg_site_server *srv, struct cmg_httpd_req *req)
{
    const char *q = strstr(req->target, "after=");
    int64_t after = q ? strtoll(q + 6, NULL, 10) : -1;
    struct feed_waiter *w;

    if (srv->version > after || !(w = calloc(1, sizeof(*w)))) {
        cmg_httpd_json(req, 200, feed_doc(srv));
        return;
    }
    w->srv = srv;
    w->req = req;
    w->after = after;
    w->next = srv->waiters;
    if (srv->waiters)
        srv->waiters->prev = w;
    srv->waiters = w;
    req->hold = w;
    req->on_abort = on_waiter_abort;
    cmg_timer_start(srv->loop, &w->timer, FEED_WAIT_MS, on_waiter_timeout);
}

static void run_op(struct cmg_site_server *srv, struct cmg_httpd_req *req, const char *name)
{
    cJSON *args = req->body_len ? cJSON_ParseWithLength(req->body, req->body_len)
                                : cJSON_CreateObject();
    cJSON *result;
    char msg[512];
    int rc;

    if (!cJSON_IsObject(args)) {
        cJSON_Delete(args);
        cmg_httpd_error(req, 400, "the body must be a JSON object");
        return;
    }
    rc = cmg_site_op_run(srv->ctx, name, args, &result, msg, sizeof(msg));
    cJSON_Delete(args);
    if (rc != 0) {
        cmg_httpd_error(req, rc, msg);
        return;
    }
    cmg_info("admin %s from %s", name, req->peer);
    cmg_site_server_changed(srv);
    cmg_httpd_json(req, 200, result);
}

static void on_admin(void *user, struct cmg_httpd_req *req)
{
    struct cmg_site_server *srv = user;
    const char *bearer = cmg_httpd_bearer(req);
    bool get = !strcmp(req->method, "GET"), post = !strcmp(req->method, "POST");

    if (!strncmp(req->target, "/v1/connector/feed", 18) && get) {
        if (!secret_is(bearer, srv->ctx->connector_secret) &&
            !secret_is(bearer, srv->ctx->admin_token)) {
            cmg_warn("policy feed refused: wrong connector secret peer=%s", req->peer);
            cmg_httpd_error(req, 401, "a connector secret is required");
            return;
        }
        feed(srv, req);
        return;
    }
    if (!secret_is(bearer, srv->ctx->admin_token)) {
        cmg_warn("admin request refused: no or wrong admin token peer=%s path=%s", req->peer,
                 req->target);
        cmg_httpd_error(req, 401, "the admin token (DIR/admin.token) is required as bearer");
        return;
    }
    if (get && !strcmp(req->target, "/v1/policy")) {
        cmg_httpd_respond(req, 200, "application/jose", srv->policy, strlen(srv->policy), NULL);
    } else if (get && !strcmp(req->target, "/v1/status")) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "policy_version", (double)srv->version);
        cJSON_AddStringToObject(o, "site_role", srv->ctx->site_role);
        cJSON_AddStringToObject(o, "service_name", srv->ctx->service_name);
        int n = 0;
        for (struct feed_waiter *w = srv->waiters; w; w = w->next)
            n++;
        cJSON_AddNumberToObject(o, "connectors_waiting", n);
        cmg_httpd_json(req, 200, o);
    } else if (post && !strncmp(req->target, "/v1/ops/", 8)) {
        run_op(srv, req, req->target + 8);
    } else {
        cmg_httpd_error(req, 404, "no such endpoint: see docs/site.md");
    }
}

/* ---- lifecycle ---- */

static int parse_args(int argc, char **argv, const char **dir, const char **admin,
                      const char **service)
{
    static const struct option opts[] = {{"admin", required_argument, NULL, 'a'},
                                         {"service", required_argument, NULL, 's'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    int ch;

    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'a': *admin = optarg; break;
        case 's': *service = optarg; break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (optind != argc - 1) {
        fputs("cmg site serve: one site directory is needed\n\n", stderr);
        fputs(usage, stderr);
        return 2;
    }
    *dir = argv[optind];
    return -1;
}

int cmg_site_serve_main(int argc, char **argv)
{
    struct cmg_site_server srv;
    struct cmg_site_ctx ctx;
    const char *dir = NULL, *admin = NULL, *service = NULL;
    char err[600];
    int rc;

    memset(&srv, 0, sizeof(srv));
    if ((rc = parse_args(argc, argv, &dir, &admin, &service)) >= 0)
        return rc;
    cmg_log_init("site");
    if (cmg_site_open(dir, &ctx, err, sizeof(err)) < 0) {
        fprintf(stderr, "cmg site serve: %s\n", err);
        return 1;
    }
    cmg_log_set_level(ctx.log_level);
    rc = 1;
    srv.ctx = &ctx;
    if (!(srv.loop = cmg_loop_new()))
        goto out;
    srv.data_version = cmg_store_data_version(ctx.store);
    if (publish(&srv) < 0)
        goto out;
    if (cmg_httpd_listen(srv.loop, admin ? admin : ctx.admin_listen, on_admin, &srv,
                         &srv.admin, err, sizeof(err)) < 0 ||
        cmg_httpd_listen(srv.loop, service ? service : ctx.service_listen, cmg_site_on_register,
                         &srv, &srv.service, err, sizeof(err)) < 0) {
        cmg_error("%s", err);
        goto out;
    }
    cmg_timer_start(srv.loop, &srv.poll, POLL_MS, on_poll);
    cmg_info("site %s serving: admin API on %s, registration on %s, policy version %lld",
             ctx.service_name, admin ? admin : ctx.admin_listen,
             service ? service : ctx.service_listen, (long long)srv.version);
    rc = cmg_loop_run(srv.loop) < 0 ? 1 : 0;
    cmg_info("site stopped");
out:
    cmg_httpd_free(srv.admin);
    cmg_httpd_free(srv.service);
    while (srv.waiters)
        waiter_free(srv.waiters);
    if (srv.loop) {
        cmg_timer_stop(srv.loop, &srv.poll);
        cmg_loop_free(srv.loop);
    }
    free(srv.policy);
    cJSON_Delete(srv.routes);
    cmg_site_close(&ctx);
    return rc;
}
