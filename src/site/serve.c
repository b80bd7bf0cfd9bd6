/* cmg site serve DIR: the on-premises site service. Three listeners on internal
 * addresses, all TLS with the site's certificate (site.crt: the site's own
 * extended key usage, which connectors require): the admin API (bearer admin
 * token), the connectors' policy feed and the device registration service that
 * connectors forward to (both mutual TLS: a connector certificate of the site CA,
 * not revoked). The store is polled for changes made by the admin commands; each
 * new policy version is signed once, with its routes, and handed to every
 * connector waiting on the feed. */
#include "site/serve.h"

#include "auth/policy.h"
#include "core/log.h"
#include "http/httpd.h"
#include "http/path.h"
#include "site/alerts.h"
#include "site/connectors.h"
#include "site/ctx.h"
#include "site/dashboard.h"
#include "site/notify.h"
#include "site/oidc_refresh.h"
#include "site/ops.h"
#include "site/pki.h"
#include "site/policy_build.h"
#include "site/register.h"
#include "site/reports.h"
#include "site/signing.h"
#include "site/status.h"
#include "tls/tls.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#define POLL_MS 250
#define FEED_WAIT_MS 25000
#define REFRESH_S CMG_POLICY_RESIGN_S
#define ROTATION_CHECK_MS (24u * 3600u * 1000u)

/* A connector's feed request held until there is news: the policy feed's or the
 * notify feed's (list says which; answer makes the answer when it is time). */
struct feed_waiter {
    struct cmg_site_server *srv;
    struct cmg_httpd_req *req;
    struct cmg_timer timer;
    int64_t after;
    char after_id[CMG_NOTIFY_ID_MAX];       /* the notify feed's after */
    struct feed_waiter **list;              /* &srv->waiters or &srv->notify_waiters */
    void (*answer)(struct feed_waiter *w);
    struct feed_waiter *prev, *next;
};

static void notify_changed(struct cmg_site_server *srv);

static const char usage[] =
    "usage: cmg site serve DIR [--admin ADDR] [--feed ADDR] [--service ADDR]\n"
    "\n"
    "Runs the site service of the site in DIR (made by 'cmg site init'), over TLS\n"
    "with DIR/site.crt (made if missing):\n"
    "  - the admin API, on --admin (default from DIR/site.conf, else\n"
    "    " CMG_SITE_DEFAULT_ADMIN "); callers present DIR/admin.token as a bearer token;\n"
    "    the web dashboard on the same address (https://ADDR/ui/), signed in with\n"
    "    DIR/admin.token;\n"
    "  - the connectors' policy feed, on --feed (default from site.conf, else\n"
    "    " CMG_SITE_DEFAULT_FEED "): mutual TLS, each connector with its own certificate\n"
    "    ('cmg site connector add'); the signed policy and the signed routes;\n"
    "  - the device registration service, on --service (default from site.conf, else\n"
    "    " CMG_SITE_DEFAULT_SERVICE "): mutual TLS with connector certificates too;\n"
    "    published to devices through the gateway as\n"
    "    /CCM_Proxy_ServerAuth/<site role>/register and .../renew.\n"
    "All should be internal addresses: nothing here is meant for the internet.\n"
    "SIGHUP (systemctl reload) reads site.conf, the site CA and site.crt/site.key\n"
    "again ('cmg site cert renew site'), all or nothing: new connections get the new\n"
    "certificate, live ones go on; listen addresses and names apply at the next start.\n"
    "Changes made with the admin commands ('cmg site mapping ...', 'token', 'device',\n"
    "'cert', 'oidc', 'connector') while it runs are signed into a new policy within\n"
    "a second and reach every gateway through the connectors.\n"
    "The OIDC issuer's keys ('cmg site oidc set --discovery URL' or '--jwks URL') are\n"
    "fetched again every oidc_refresh seconds of site.conf (default 3600; the\n"
    "provider's cache headers within 5 min..24 h), and at once when a gateway reports\n"
    "a token with an unknown key id; new keys are published at once.\n"
    "The signing key is rotated ('cmg site key rotate') when it is older than\n"
    "key_rotation of site.conf (default 180d; 0: never), checked at start and daily.\n"
    "Metrics and health: plain HTTP on metrics_listen of site.conf (default\n"
    "127.0.0.1:10181; off disables): /metrics (Prometheus), /healthz, and /readyz\n"
    "(200 while the store is open and the listeners serve).\n"
    "Reports: connectors POST /v1/connector/report to the feed listener (their own and\n"
    "the gateways' reports); traffic is kept in 5-minute buckets for report_retention\n"
    "of site.conf (default 31d), by day for 400 days and by month (docs/site.md).\n"
    "Notifications ('cmg site notify'): connectors poll GET /v1/connector/notify on the\n"
    "feed listener (held until there is a new one) and relay the gateways' notify\n"
    "reports to POST /v1/connector/notify-report (docs/site.md, \"Notifications\").\n"
    "\n"
    "options:\n"
    "  --admin ADDR     address of the admin API (host:port)\n"
    "  --feed ADDR      address of the connectors' policy feed (host:port)\n"
    "  --service ADDR   address of the registration service (host:port)\n"
    "  -h, --help       print this help\n";

/* ---- publishing ---- */

static cJSON *feed_doc(struct cmg_site_server *srv)
{
    cJSON *o = cJSON_CreateObject();

    /* The version is a hint: connectors take it from the signed payloads only. */
    cJSON_AddNumberToObject(o, "version", (double)srv->version);
    cJSON_AddStringToObject(o, "policy", srv->policy ? srv->policy : "");
    cJSON_AddStringToObject(o, "routes", srv->routes ? srv->routes : "");
    return o;
}

static void waiter_free(struct feed_waiter *w)
{
    struct cmg_site_server *srv = w->srv;

    cmg_timer_stop(srv->loop, &w->timer);
    if (w->prev)
        w->prev->next = w->next;
    else
        *w->list = w->next;
    if (w->next)
        w->next->prev = w->prev;
    if (w->list == &srv->waiters)
        srv->nwaiters--;
    free(w);
}

static void waiter_answer(struct feed_waiter *w)
{
    w->req->on_abort = NULL;
    w->answer(w);   /* frees w */
}

static void policy_answer(struct feed_waiter *w)
{
    struct cmg_httpd_req *req = w->req;
    struct cmg_site_server *srv = w->srv;

    waiter_free(w);
    cmg_httpd_json(req, 200, feed_doc(srv));
}

static int publish(struct cmg_site_server *srv)
{
    char err[256];
    int64_t version;
    char *routes = NULL;
    char *jws = cmg_site_policy_build(srv->ctx, &version, &routes, err, sizeof(err));

    if (!jws) {
        cmg_error("cannot publish the policy: %s", err);
        return -1;
    }
    free(srv->policy);
    free(srv->routes);
    srv->policy = jws;
    srv->routes = routes;
    srv->version = version;
    srv->signed_at = time(NULL);
    cmg_info("policy version %lld signed with site key id %s", (long long)version,
             srv->ctx->sign_pub.kid);
    while (srv->waiters)
        waiter_answer(srv->waiters);
    return 0;
}

void cmg_site_server_changed(struct cmg_site_server *srv)
{
    int64_t v = cmg_store_policy_version(srv->ctx->store);

    if (v > srv->version)
        publish(srv);
    notify_changed(srv);
}

static void on_oidc_keys_changed(void *srv)
{
    cmg_site_server_changed(srv);
}

static void bump_version(struct cmg_site_server *srv)
{
    struct cmg_store *st = srv->ctx->store;

    if (cmg_store_begin(st) < 0 || cmg_store_bump(st) < 0 || cmg_store_commit(st) < 0) {
        cmg_store_rollback(st);
        cmg_warn("cannot renew the policy: %s", cmg_store_error(st));
    }
}

/* Hourly: reports past report_retention go. */
static void prune_reports(struct cmg_site_server *srv)
{
    time_t now = time(NULL);

    if (now - srv->reports_pruned < CMG_REPORT_PRUNE_S)
        return;
    srv->reports_pruned = now;
    if (cmg_report_prune(srv->ctx->store, (int64_t)now, srv->ctx->report_retention_s) < 0)
        cmg_warn("cannot prune old reports: %s (retried in an hour)",
                 cmg_store_error(srv->ctx->store));
    if (cmg_notify_prune(srv->ctx->store, (int64_t)now, CMG_NOTIFY_RETENTION_S) < 0)
        cmg_warn("cannot prune old notifications: %s (retried in an hour)",
                 cmg_store_error(srv->ctx->store));
}

static void on_poll(struct cmg_timer *t)
{
    struct cmg_site_server *srv =
        (struct cmg_site_server *)((char *)t - offsetof(struct cmg_site_server, poll));
    int64_t dv = cmg_store_data_version(srv->ctx->store);

    if (time(NULL) - srv->signed_at >= REFRESH_S)
        bump_version(srv);
    cmg_site_crl_freshness(srv->signed_at, time(NULL));
    prune_reports(srv);
    if (dv != srv->data_version)
        cmg_site_alerts_check(srv);   /* an admin command or a report changed the store */
    if (dv != srv->data_version || time(NULL) - srv->signed_at >= REFRESH_S) {
        srv->data_version = dv;
        cmg_site_server_changed(srv);
    }
    cmg_timer_start(srv->loop, &srv->poll, POLL_MS, on_poll);
}

/* Rotates the signing key once it is older than key_rotation (the next policy
 * announces it); true if it did. */
static bool rotate_if_due(struct cmg_site_server *srv)
{
    struct cmg_site_ctx *s = srv->ctx;
    int64_t now = (int64_t)time(NULL), age_days = (now - s->sign_created) / 86400;
    char old_kid[128], msg[512];
    cJSON *result = NULL;

    if (!cmg_site_key_rotation_due(s, now))
        return false;
    snprintf(old_kid, sizeof(old_kid), "%s", s->sign_pub.kid);
    cmg_info("signing key id %s is %lld day(s) old, key_rotation is %lld day(s): rotating",
             old_kid, (long long)age_days, (long long)(s->key_rotation_s / 86400));
    if (cmg_site_key_rotate(s, &result, msg, sizeof(msg)) != 0) {
        cmg_error("cannot rotate the signing key: %s (key id %s signs on; retried in a day)",
                  msg, old_kid);
        return false;
    }
    cmg_info("signing key rotated: key id %s, announced by key id %s; device tokens signed "
             "by %s stay valid until they expire", s->sign_pub.kid, old_kid, old_kid);
    cJSON_Delete(result);
    return true;
}

static void on_rotation_check(struct cmg_timer *t)
{
    struct cmg_site_server *srv =
        (struct cmg_site_server *)((char *)t - offsetof(struct cmg_site_server, rotation));

    if (rotate_if_due(srv))
        cmg_site_server_changed(srv);
    cmg_timer_start(srv->loop, &srv->rotation, ROTATION_CHECK_MS, on_rotation_check);
}

/* ---- the connectors' channel ---- */

/* The connector behind a request on a mutual-TLS listener, if not revoked: its
 * name and serial for the logs. false (answered 403) if revoked. */
static bool connector_allowed(struct cmg_site_server *srv, struct cmg_httpd_req *req,
                              const char *what)
{
    char serial[80] = "", name[128] = "";

    if (req->peer_cert) {   /* always, on these listeners: the handshake required one */
        cmg_tls_serial(req->peer_cert, serial, sizeof(serial));
        cmg_tls_subject_entry(req->peer_cert, NID_commonName, name, sizeof(name));
    }
    if (!req->peer_cert || cmg_store_connector_revoked(srv->ctx->store, serial)) {
        char msg[80];
        const struct cmg_log_field f[] = {
            CMG_F_STR("reason", "connector_revoked"), CMG_F_STR("connector", name[0] ? name : NULL),
            CMG_F_STR("serial", serial), CMG_F_STR("peer", req->peer)};
        snprintf(msg, sizeof(msg), "%s refused: the connector's certificate is revoked", what);
        cmg_log_kv(CMG_LOG_WARN, msg, f, CMG_LOG_NFIELDS(f));
        cmg_httpd_error(req, 403, "this connector's certificate is revoked");
        return false;
    }
    return true;
}

/* ---- admin API ---- */

bool cmg_site_secret_is(const char *given, const char *secret)
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

/* Holds req on list until answer is called: at news, or after FEED_WAIT_MS. NULL if
 * out of memory (the caller answers at once). */
static struct feed_waiter *waiter_hold(struct cmg_site_server *srv, struct cmg_httpd_req *req,
                                       struct feed_waiter **list,
                                       void (*answer)(struct feed_waiter *w))
{
    struct feed_waiter *w = calloc(1, sizeof(*w));

    if (!w)
        return NULL;
    w->srv = srv;
    w->req = req;
    w->list = list;
    w->answer = answer;
    w->next = *list;
    if (*list)
        (*list)->prev = w;
    *list = w;
    if (list == &srv->waiters)
        srv->nwaiters++;
    req->hold = w;
    req->on_abort = on_waiter_abort;
    cmg_timer_start(srv->loop, &w->timer, FEED_WAIT_MS, on_waiter_timeout);
    return w;
}

/* GET /v1/connector/feed?after=N: answers at once if the policy is newer than N,
 * otherwise when it changes or after FEED_WAIT_MS. */
static void feed(struct cmg_site_server *srv, struct cmg_httpd_req *req)
{
    const char *q = strstr(req->target, "after=");
    int64_t after = q ? strtoll(q + 6, NULL, 10) : -1;
    struct feed_waiter *w;

    if (srv->version > after || !(w = waiter_hold(srv, req, &srv->waiters, policy_answer))) {
        cmg_httpd_json(req, 200, feed_doc(srv));
        return;
    }
    w->after = after;
}

/* ---- the notify feed ---- */

/* The notify feed's answer to after: what is new, or (may_hold) 1 when nothing is. */
static int notify_respond(struct cmg_site_server *srv, struct cmg_httpd_req *req,
                          const char *after, bool may_hold)
{
    char err[300], *body = NULL;
    size_t len = 0;
    int rc = cmg_notify_feed(srv->ctx->store, after, (int64_t)time(NULL), may_hold, &body, &len,
                             err, sizeof(err));

    if (rc == 0)
        cmg_httpd_respond(req, 200, "application/json", body, len, NULL);
    else if (rc != 1) {
        if (rc != 400)
            cmg_error("notify feed: %s", err);
        cmg_httpd_error(req, rc, err);
    }
    free(body);
    return rc;
}

static void notify_answer(struct feed_waiter *w)
{
    struct cmg_httpd_req *req = w->req;
    struct cmg_site_server *srv = w->srv;
    char after[CMG_NOTIFY_ID_MAX];

    snprintf(after, sizeof(after), "%s", w->after_id);
    waiter_free(w);
    notify_respond(srv, req, after, false);
}

/* after= of the query: 1 with its value, 0 absent or empty, -1 malformed. */
static int after_param(const char *target, char *out, size_t cap)
{
    const char *q = strchr(target, '?');
    size_t n = q ? strlen(++q) : 0;
    const char *at = q ? strstr(q, "after=") : NULL;

    *out = 0;
    if (at && (at == q || at[-1] == '&') && (at[6] == 0 || at[6] == '&'))
        return 0;   /* "after=": the first call */
    return q ? cmg_query_param(q, n, "after", out, cap) : 0;
}

/* GET /v1/connector/notify?after=EPOCH-SEQ: the notifications after that one, at once
 * if there are any, else when one is made or after FEED_WAIT_MS. */
static void notify_feed(struct cmg_site_server *srv, struct cmg_httpd_req *req)
{
    char after[CMG_NOTIFY_ID_MAX];
    struct feed_waiter *w;

    if (after_param(req->target, after, sizeof(after)) < 0) {
        cmg_httpd_error(req, 400, "after: EPOCH-SEQ expected (16 lowercase hex digits, '-', a "
                                  "decimal sequence number), or nothing");
        return;
    }
    if (notify_respond(srv, req, after, true) != 1)
        return;
    if (!(w = waiter_hold(srv, req, &srv->notify_waiters, notify_answer))) {
        notify_respond(srv, req, after, false);
        return;
    }
    snprintf(w->after_id, sizeof(w->after_id), "%s", after);
}

/* A new notification answers the held notify feed requests at once. */
static void notify_changed(struct cmg_site_server *srv)
{
    int64_t last = cmg_notify_last(srv->ctx->store);

    if (last <= srv->notify_last)
        return;
    srv->notify_last = last;
    while (srv->notify_waiters)
        waiter_answer(srv->notify_waiters);
}

/* POST /v1/connector/notify-report: a gateway's notify report as a connector relays it
 * (named by its certificate in the logs), checked whole, kept once. */
static void notify_report(struct cmg_site_server *srv, struct cmg_httpd_req *req)
{
    char name[128] = "", err[300];
    cJSON *doc;
    int rc;

    if (!connector_allowed(srv, req, "notify report"))
        return;
    cmg_tls_subject_entry(req->peer_cert, NID_commonName, name, sizeof(name));
    if (!(doc = cmg_notify_report_parse(req->body ? req->body : "", req->body_len, err,
                                        sizeof(err)))) {
        cmg_warn("notify report via connector %s refused: %s", name, err);
        cmg_httpd_error(req, 400, err);
        return;
    }
    rc = cmg_notify_report_ingest(srv->ctx->store, doc, (int64_t)time(NULL), err, sizeof(err));
    if (rc < 0) {
        cmg_error("notify report via connector %s not kept: %s", name, err);
        cmg_httpd_error(req, 500, "the report could not be kept");
    } else {
        cmg_debug("notify report of %s seq %.0f via connector %s %s",
                  cJSON_GetStringValue(cJSON_GetObjectItem(doc, "instance")),
                  cJSON_GetNumberValue(cJSON_GetObjectItem(doc, "seq")), name,
                  rc == 1 ? "ignored: kept already" : "kept");
        cmg_httpd_respond(req, 204, NULL, NULL, 0, NULL);
    }
    cJSON_Delete(doc);
}

/* An operation that changes nothing: status, traffic, and the *.list and *.show ones. */
static bool reads_only(const char *name)
{
    size_t n = strlen(name);

    return !strcmp(name, "status") || !strcmp(name, "traffic") ||
           !strcmp(name, "notify.status") ||
           (n > 5 && (!strcmp(name + n - 5, ".list") || !strcmp(name + n - 5, ".show")));
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
    /* a dashboard or 'site status --api' polls: what only reads is no news */
    if (reads_only(name))
        cmg_debug("admin %s from %s", name, req->peer);
    else
        cmg_info("admin %s from %s", name, req->peer);
    cmg_site_server_changed(srv);
    if (!strncmp(name, "alert.", 6) && !reads_only(name))
        cmg_site_alerts_check(srv);   /* new thresholds apply now */
    cmg_httpd_json(req, 200, result);
}

/* POST /v1/connector/report: a connector's report (reports.c), named by its
 * certificate, not by what it says. */
static void connector_report(struct cmg_site_server *srv, struct cmg_httpd_req *req)
{
    char name[128] = "", err[300];
    cJSON *doc;

    if (!connector_allowed(srv, req, "connector report"))
        return;
    cmg_tls_subject_entry(req->peer_cert, NID_commonName, name, sizeof(name));
    if (!(doc = cmg_report_parse(req->body ? req->body : "", req->body_len, err, sizeof(err)))) {
        const struct cmg_log_field f[] = {CMG_F_STR("connector", name), CMG_F_STR("error", err),
                                          CMG_F_STR("peer", req->peer)};
        cmg_log_kv(CMG_LOG_WARN, "connector report refused", f, CMG_LOG_NFIELDS(f));
        cmg_httpd_error(req, 400, err);
        return;
    }
    if (cmg_report_ingest(srv->ctx->store, name, doc, (int64_t)time(NULL), err, sizeof(err)) < 0) {
        cmg_error("connector %s's report not kept: %s", name, err);
        cmg_httpd_error(req, 500, "the report could not be kept");
    } else {
        cmg_debug("report of connector %s kept", name);
        cmg_site_alerts_check(srv);   /* a write of our own: the change poll does not see it */
        cmg_httpd_respond(req, 204, NULL, NULL, 0, NULL);
    }
    cJSON_Delete(doc);
}

/* The feed listener: every caller showed a connector certificate of the site CA. */
static void on_feed(void *user, struct cmg_httpd_req *req)
{
    struct cmg_site_server *srv = user;

    if (!strcmp(req->target, "/v1/connector/report") && !strcmp(req->method, "POST")) {
        connector_report(srv, req);
        return;
    }
    if (!strcmp(req->target, "/v1/connector/notify-report") && !strcmp(req->method, "POST")) {
        notify_report(srv, req);
        return;
    }
    if ((!strcmp(req->target, "/v1/connector/notify") ||
         !strncmp(req->target, "/v1/connector/notify?", 21)) && !strcmp(req->method, "GET")) {
        if (connector_allowed(srv, req, "notify feed"))
            notify_feed(srv, req);
        return;
    }
    if (strncmp(req->target, "/v1/connector/feed", 18) || strcmp(req->method, "GET")) {
        cmg_httpd_error(req, 404, "the feed answers GET /v1/connector/feed?after=N, GET "
                        "/v1/connector/notify?after=EPOCH-SEQ, POST /v1/connector/report and "
                        "POST /v1/connector/notify-report only");
        return;
    }
    if (!connector_allowed(srv, req, "policy feed"))
        return;
    if (cmg_httpd_header(req, "CMG-Unknown-Kid"))   /* a gateway's report, carried up */
        cmg_oidc_refresher_unknown_kid(srv->oidc, cmg_httpd_header(req, "CMG-Unknown-Kid"));
    feed(srv, req);
}

/* The registration service: its callers are connectors (mutual TLS), so the
 * CMG-Client-* headers it reads were set by a gateway and carried by one. */
static void on_service(void *user, struct cmg_httpd_req *req)
{
    if (connector_allowed(user, req, "registration request"))
        cmg_site_on_register(user, req);
}

/* GET /v1/status: the status document (status.c), with what only the running service
 * knows: the policy version it publishes, the connectors waiting on its feed, the OIDC
 * key refresh. */
static void status(struct cmg_site_server *srv, struct cmg_httpd_req *req)
{
    cJSON *o;
    char msg[512];
    int n = 0;

    if (cmg_site_status(srv->ctx, (int64_t)time(NULL), &o, msg, sizeof(msg)) != 0) {
        cmg_error("admin status: %s", msg);
        cmg_httpd_error(req, 500, msg);
        return;
    }
    for (struct feed_waiter *w = srv->waiters; w; w = w->next)
        n++;
    cJSON_ReplaceItemInObjectCaseSensitive(o, "policy_version",
                                           cJSON_CreateNumber((double)srv->version));
    cJSON_AddNumberToObject(o, "connectors_waiting", n);
    cJSON_AddItemToObject(o, "oidc_refresh", cmg_oidc_refresher_status(srv->oidc));
    cmg_httpd_json(req, 200, o);
}

/* GET /v1/traffic?range=day|month[&instance=I]: the traffic series (status.c). */
static void traffic(struct cmg_site_server *srv, struct cmg_httpd_req *req)
{
    const char *q = strchr(req->target, '?');
    size_t qn = q ? strlen(++q) : 0;
    char range[16] = "", instance[300] = "", msg[512];
    cJSON *o;
    int rc;

    if (q && (cmg_query_param(q, qn, "range", range, sizeof(range)) < 0 ||
              cmg_query_param(q, qn, "instance", instance, sizeof(instance)) < 0)) {
        cmg_httpd_error(req, 400, "expected ?range=day or ?range=month, and optionally "
                                  "&instance=NAME (at most 256 bytes, percent-encoded)");
        return;
    }
    rc = cmg_site_traffic(srv->ctx, (int64_t)time(NULL), *range ? range : NULL, instance, &o,
                          msg, sizeof(msg));
    if (rc != 0) {
        cmg_httpd_error(req, rc, msg);
        return;
    }
    cmg_httpd_json(req, 200, o);
}

static void on_admin(void *user, struct cmg_httpd_req *req)
{
    struct cmg_site_server *srv = user;
    const char *bearer = cmg_httpd_bearer(req);
    bool get = !strcmp(req->method, "GET"), post = !strcmp(req->method, "POST");

    if (cmg_dashboard_handle(srv->dashboard, req))
        return;
    if (bearer && !cmg_dashboard_may_guess(srv->dashboard, req)) {
        cmg_httpd_error(req, 429, "too many wrong admin tokens from this address: wait a minute");
        return;
    }
    if (!cmg_site_secret_is(bearer, srv->ctx->admin_token) &&
        !cmg_dashboard_admits(srv->dashboard, req)) {
        if (bearer)   /* a guess: counted as a failed sign-in */
            cmg_dashboard_guessed_wrong(srv->dashboard, req);
        const struct cmg_log_field f[] = {
            CMG_F_STR("reason", "admin_token"), CMG_F_STR("peer", req->peer),
            CMG_F_STR("method", req->method), CMG_F_STR("path", req->target)};
        cmg_log_kv(CMG_LOG_WARN, "admin request refused: no or wrong admin token", f,
                   CMG_LOG_NFIELDS(f));
        cmg_httpd_error(req, 401, "the admin token (DIR/admin.token) is required as bearer");
        return;
    }
    if (get && !strcmp(req->target, "/v1/policy")) {
        cmg_httpd_respond(req, 200, "application/jose", srv->policy, strlen(srv->policy), NULL);
    } else if (get && !strcmp(req->target, "/v1/status")) {
        status(srv, req);
    } else if (get && (!strcmp(req->target, "/v1/traffic") ||
                       !strncmp(req->target, "/v1/traffic?", 12))) {
        traffic(srv, req);
    } else if (post && !strncmp(req->target, "/v1/ops/", 8)) {
        run_op(srv, req, req->target + 8);
    } else {
        cmg_httpd_error(req, 404, "no such endpoint: see docs/site.md");
    }
}

/* ---- lifecycle ---- */

static int parse_args(int argc, char **argv, const char **dir, const char **admin,
                      const char **service, const char **feed_addr)
{
    static const struct option opts[] = {{"admin", required_argument, NULL, 'a'},
                                         {"feed", required_argument, NULL, 'f'},
                                         {"service", required_argument, NULL, 's'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    int ch;

    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'a': *admin = optarg; break;
        case 's': *service = optarg; break;
        case 'f': *feed_addr = optarg; break;
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

/* "127.x.y.z:port", "[::1]:port", "localhost:port". */
static bool is_loopback(const char *addr)
{
    return !strncmp(addr, "127.", 4) || !strncmp(addr, "[::1]:", 6) ||
           !strncmp(addr, "localhost:", 10);
}

/* The TLS contexts from DIR/site.crt and .key: the admin API's (no client certificate)
 * and the connectors' channel's (a connector certificate of the site CA required); both
 * or neither. */
static int server_contexts(const char *dir, SSL_CTX **admin, SSL_CTX **channel, char *err,
                           size_t errlen)
{
    char crt[PATH_MAX], key[PATH_MAX], ca[PATH_MAX];
    struct cmg_tls_server_opts o = {.cert = crt, .key = key};

    *admin = *channel = NULL;
    if (snprintf(crt, sizeof(crt), "%s/%s", dir, CMG_SITE_CHANNEL_CERT) >= (int)sizeof(crt) ||
        snprintf(key, sizeof(key), "%s/%s", dir, CMG_SITE_CHANNEL_KEY) >= (int)sizeof(key) ||
        snprintf(ca, sizeof(ca), "%s/ca.crt", dir) >= (int)sizeof(ca)) {
        snprintf(err, errlen, "the site directory's path is too long");
        return -1;
    }
    if (!(*admin = cmg_tls_server_ctx(&o, err, errlen)))
        return -1;
    o.client_ca = ca;
    o.client_auth = CMG_TLS_REQUIRE_CLIENT_CERT;
    o.client_eku = CMG_OID_EKU_CONNECTOR;
    if ((*channel = cmg_tls_server_ctx(&o, err, errlen)) &&
        cmg_tls_check_own_cert(*channel, crt, ca, CMG_OID_EKU_SITE, err, errlen) == 0)
        return 0;
    SSL_CTX_free(*admin);
    SSL_CTX_free(*channel);
    *admin = *channel = NULL;
    return -1;
}

/* The site's certificate (made if missing or unfit) and the TLS contexts. */
static int channel_tls(struct cmg_site_server *srv, const char *const *listen, char *err,
                       size_t errlen)
{
    struct cmg_site_ctx *ctx = srv->ctx;
    char reach[300];
    const char *names[] = {listen[0], listen[1], listen[2], reach};

    /* Connectors on other hosts check the name they reach the site at. */
    cmg_site_reach(listen[1], ctx->connector_address, reach, sizeof(reach));
    if (cmg_site_channel_cert(ctx->dir, ctx->ca_cert, ctx->ca_key, NULL, names, 4, err,
                              errlen) < 0)
        return -1;
    return server_contexts(ctx->dir, &srv->admin_tls, &srv->channel_tls, err, errlen);
}

/* The site CA and the site's own certificate, watched for their end. */
static void watch_certs(struct cmg_site_server *srv)
{
    char path[PATH_MAX];

    cmg_tls_watch_free(&srv->cert_watch);   /* a reload watches the new ones */
    snprintf(path, sizeof(path), "%.*s/ca.crt", (int)sizeof(path) - 8, srv->ctx->dir);
    cmg_tls_watch_cert(&srv->cert_watch, "site CA", path, srv->ctx->ca_cert);
    snprintf(path, sizeof(path), "%.*s/site.crt", (int)sizeof(path) - 10, srv->ctx->dir);
    cmg_tls_watch_cert(&srv->cert_watch, "site certificate", path,
                       SSL_CTX_get0_certificate(srv->channel_tls));
    cmg_tls_watch_start(&srv->cert_watch, srv->loop);
}

/* ---- reload (SIGHUP) ---- */

static void keep_conf_str(const char *key, const char *next, const char *now)
{
    if (strcmp(next, now) != 0)
        cmg_warn("reload: %s changed (%s -> %s): it applies at the next start; kept %s", key,
                 now, next, now);
}

/* site.conf read again: log_level, log_format, oidc_refresh and key_rotation apply now;
 * the rest is named and kept. */
static int reload_conf(struct cmg_site_server *srv, struct cmg_site_ctx *next, char *err,
                       size_t errlen)
{
    struct cmg_site_ctx *now = srv->ctx;

    memset(next, 0, sizeof(*next));
    snprintf(next->dir, sizeof(next->dir), "%s", now->dir);
    if (cmg_site_read_conf(next, err, errlen) < 0)
        return -1;
    keep_conf_str("admin_listen", next->admin_listen, now->admin_listen);
    keep_conf_str("feed_listen", next->feed_listen, now->feed_listen);
    keep_conf_str("metrics_listen", next->metrics.listen, now->metrics.listen);
    keep_conf_str("service_listen", next->service_listen, now->service_listen);
    keep_conf_str("service_name", next->service_name, now->service_name);
    keep_conf_str("site_role", next->site_role, now->site_role);
    keep_conf_str("crl_url", next->crl_url, now->crl_url);
    keep_conf_str("connector_address", next->connector_address, now->connector_address);
    return 0;
}

/* DIR/ca.crt must still be the CA in force: a new site CA means new certificates for every
 * role, and a restart. */
static int same_ca(const struct cmg_site_ctx *ctx, char *err, size_t errlen)
{
    char path[PATH_MAX];
    X509 *ca;
    int rc = -1;

    snprintf(path, sizeof(path), "%.*s/ca.crt", (int)sizeof(path) - 8, ctx->dir);
    if (!(ca = cmg_pki_load_cert(path)))
        snprintf(err, errlen, "%.600s: cannot read the site CA", path);
    else if (X509_cmp(ca, ctx->ca_cert) != 0)
        snprintf(err, errlen, "%.600s is not the site CA in force: a new CA is taken at a restart "
                 "only (with new certificates for every role)", path);
    else
        rc = 0;
    X509_free(ca);
    return rc;
}

/* SIGHUP: site.conf, the site CA and site.crt/site.key read again and checked (the key
 * matches, valid now, from the site CA, the site usage), applied all or nothing. Live
 * connections and held feed requests keep theirs; new handshakes use the new pair. */
static void reload(void *arg)
{
    struct cmg_site_server *srv = arg;
    struct cmg_site_ctx next;
    SSL_CTX *admin, *channel;
    char err[1200], serial[80];

    if (reload_conf(srv, &next, err, sizeof(err)) < 0 || same_ca(srv->ctx, err, sizeof(err)) < 0 ||
        server_contexts(srv->ctx->dir, &admin, &channel, err, sizeof(err)) < 0) {
        cmg_error("reload failed, nothing changed: %s", err);
        return;
    }
    cmg_httpd_set_tls(srv->admin, admin);
    cmg_httpd_set_tls(srv->feed, channel);
    cmg_httpd_set_tls(srv->service, channel);
    SSL_CTX_free(srv->admin_tls);
    SSL_CTX_free(srv->channel_tls);
    srv->admin_tls = admin;
    srv->channel_tls = channel;
    srv->ctx->log_level = next.log_level;
    srv->ctx->log_format = next.log_format;
    srv->ctx->oidc_refresh_s = next.oidc_refresh_s;
    srv->ctx->key_rotation_s = next.key_rotation_s;   /* the daily check reads it */
    srv->ctx->report_interval_s = next.report_interval_s;
    srv->ctx->report_retention_s = next.report_retention_s;
    cmg_log_set_level(next.log_level);
    cmg_log_set_format(next.log_format);
    watch_certs(srv);
    cmg_tls_serial(SSL_CTX_get0_certificate(channel), serial, sizeof(serial));
    cmg_info("reloaded %s/site.conf and site.crt: certificate serial %s in force for new "
             "connections; live ones and held feed requests go on", srv->ctx->dir, serial);
}

bool cmg_site_serve_running(const char *dir)
{
    char path[PATH_MAX];
    int fd;
    bool held;

    if (snprintf(path, sizeof(path), "%s/%s", dir, CMG_SITE_SERVE_LOCK) >= (int)sizeof(path))
        return false;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;   /* no service ever ran here */
    held = flock(fd, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK;
    close(fd);          /* drops the shared lock if we took it */
    return held;
}

/* Takes the lock for the life of the process (the descriptor stays open); -1 if
 * another service holds it. */
static int hold_lock(const char *dir, char *err, size_t errlen)
{
    char path[PATH_MAX], pid[32];
    int fd;

    if (snprintf(path, sizeof(path), "%s/%s", dir, CMG_SITE_SERVE_LOCK) >= (int)sizeof(path)) {
        snprintf(err, errlen, "%s: path too long", dir);
        return -1;
    }
    fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open %.400s: %s", path, strerror(errno));
        return -1;
    }
    /* An admin command testing the lock holds it shared for a moment: wait that out. */
    for (int tries = 0; flock(fd, LOCK_EX | LOCK_NB) < 0 && errno == EWOULDBLOCK && tries < 50;
         tries++)
        usleep(10000);
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        int n = (int)read(fd, pid, sizeof(pid) - 1);
        pid[n > 0 ? n : 0] = 0;
        pid[strcspn(pid, "\n")] = 0;
        snprintf(err, errlen, "another 'cmg site serve' runs on %.200s (pid %s; it holds %s)", dir,
                 pid[0] ? pid : "unknown", CMG_SITE_SERVE_LOCK);
        close(fd);
        return -1;
    }
    snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) < 0 || write(fd, pid, strlen(pid)) < 0)
        cmg_warn("cannot write the pid into %s: %s", path, strerror(errno));
    return fd;
}

int cmg_site_serve_main(int argc, char **argv)
{
    struct cmg_site_server srv;
    struct cmg_site_ctx ctx;
    const char *dir = NULL, *admin = NULL, *service = NULL, *feed_addr = NULL;
    const char *listen[3];
    char err[600];
    int rc, lock = -1;

    memset(&srv, 0, sizeof(srv));
    if ((rc = parse_args(argc, argv, &dir, &admin, &service, &feed_addr)) >= 0)
        return rc;
    cmg_log_init("site");
    if (cmg_site_open(dir, &ctx, err, sizeof(err)) < 0) {
        fprintf(stderr, "cmg site serve: %s\n", err);
        return 1;
    }
    cmg_log_set_level(ctx.log_level);
    cmg_log_set_format(ctx.log_format);
    if ((lock = hold_lock(dir, err, sizeof(err))) < 0) {
        fprintf(stderr, "cmg site serve: %s\n", err);
        cmg_site_close(&ctx);
        return 1;
    }
    ctx.confined = true;
    listen[0] = admin ? admin : ctx.admin_listen;
    listen[1] = feed_addr ? feed_addr : ctx.feed_listen;
    listen[2] = service ? service : ctx.service_listen;
    rc = 1;
    srv.ctx = &ctx;
    if (!(srv.loop = cmg_loop_new()))
        goto out;
    rotate_if_due(&srv);
    srv.data_version = cmg_store_data_version(ctx.store);
    srv.notify_last = cmg_notify_last(ctx.store);
    if (publish(&srv) < 0 || !(srv.dashboard = cmg_dashboard_new(&srv)))
        goto out;
    if (channel_tls(&srv, listen, err, sizeof(err)) < 0 ||
        cmg_httpd_listen(srv.loop, listen[0], srv.admin_tls, on_admin, &srv, &srv.admin, err,
                         sizeof(err)) < 0 ||
        cmg_httpd_listen(srv.loop, listen[1], srv.channel_tls, on_feed, &srv, &srv.feed, err,
                         sizeof(err)) < 0 ||
        cmg_httpd_listen(srv.loop, listen[2], srv.channel_tls, on_service, &srv, &srv.service,
                         err, sizeof(err)) < 0) {
        cmg_error("%s", err);
        goto out;
    }
    if (cmg_site_metrics_start(&srv) < 0)
        goto out;
    if (!is_loopback(listen[0]))
        cmg_warn("the admin API listens on %s, not on loopback: whoever reaches it with "
                 "admin.token administers the site", listen[0]);
    cmg_timer_start(srv.loop, &srv.poll, POLL_MS, on_poll);
    cmg_timer_start(srv.loop, &srv.rotation, ROTATION_CHECK_MS, on_rotation_check);
    watch_certs(&srv);
    cmg_loop_on_hup(srv.loop, reload, &srv);
    if (!(srv.oidc = cmg_oidc_refresher_new(srv.loop, &ctx, on_oidc_keys_changed, &srv)) ||
        !(srv.alerts = cmg_site_alerts_new(&srv)))
        goto out;
    cmg_info("site %s serving: admin API on https://%s, connector feed on https://%s, "
             "registration on https://%s, policy version %lld", ctx.service_name, listen[0],
             listen[1], listen[2], (long long)srv.version);
    rc = cmg_loop_run(srv.loop) < 0 ? 1 : 0;
    cmg_info("site stopped");
out:
    cmg_site_alerts_free(srv.alerts);
    cmg_oidc_refresher_free(srv.oidc);
    cmg_metrics_free(srv.metrics);
    cmg_httpd_free(srv.admin);
    cmg_dashboard_free(srv.dashboard);
    cmg_httpd_free(srv.feed);
    cmg_httpd_free(srv.service);
    while (srv.waiters)
        waiter_free(srv.waiters);
    while (srv.notify_waiters)
        waiter_free(srv.notify_waiters);
    cmg_tls_watch_free(&srv.cert_watch);
    if (srv.loop) {
        cmg_timer_stop(srv.loop, &srv.poll);
        cmg_timer_stop(srv.loop, &srv.rotation);
        cmg_loop_free(srv.loop);
    }
    SSL_CTX_free(srv.admin_tls);
    SSL_CTX_free(srv.channel_tls);
    free(srv.policy);
    free(srv.routes);
    cmg_site_close(&ctx);
    close(lock);
    return rc;
}
