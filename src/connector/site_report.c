/* The connector's report to the site: POST /v1/connector/report to the site's feed
 * listener (the feed's address and TLS context: mutual TLS, the site's certificate
 * required), on a short connection of its own, one at a time. It carries this
 * connector's view of each tunnel (gateway instance, state, since, round trip,
 * reconnects) and the latest report of each gateway not yet taken by the site,
 * verbatim. Sent at most a second after a gateway's report came (batched) and every
 * report_interval. Nothing queues up: each tunnel keeps its gateway's latest report
 * only; a failure is logged once until it works again, and retried at the next tick. */
#include "connector/cn.h"
#include "core/log.h"
#include "site/reports.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REPORT_TIMEOUT_MS 10000
#define BATCH_MS 200                     /* gateways' reports that come together */
#define MAX_ANSWER 4096
/* Room kept in a POST for this connector's own part (its tunnels). */
#define OWN_PART (64 * 1024)

struct cmg_site_report {
    struct cmg_connector *cn;
    struct cmg_conn conn;
    bool busy;
    llhttp_t parser;
    int status;
    bool complete;
    struct cmg_buf answer;
    bool failing;                        /* logged once until it works again */
    bool again;                          /* gateways' reports came while one was on its way */
    struct cmg_timer tick, soon, timeout;
    /* the gateways' reports in the POST on its way: tunnel index -> seq */
    uint64_t carried[CMG_CN_MAX_GATEWAYS];
    char carried_boot[CMG_CN_MAX_GATEWAYS][17];
};

#define REPORT_OF(p, field) \
    ((struct cmg_site_report *)((char *)(p) - offsetof(struct cmg_site_report, field)))

static void post(struct cmg_site_report *r);

/* ---- a gateway's report ---- */

static void on_soon(struct cmg_timer *tm) { post(REPORT_OF(tm, soon)); }

static void post_soon(struct cmg_site_report *r)
{
    if (r->busy)
        r->again = true;
    else if (!cmg_timer_armed(&r->soon))
        cmg_timer_start(r->cn->loop, &r->soon, BATCH_MS, on_soon);
}

int cmg_site_report_gateway(struct cmg_cn_tunnel *t, const char *body, size_t len,
                            const char **why)
{
    static char reason[300];
    cJSON *doc = cmg_report_json(body, len);
    const cJSON *inst = cJSON_GetObjectItemCaseSensitive(doc, "instance");
    const cJSON *boot = cJSON_GetObjectItemCaseSensitive(doc, "boot");
    const cJSON *seq = cJSON_GetObjectItemCaseSensitive(doc, "seq");
    char *copy = NULL;
    int rc = -1;

    if (!cJSON_IsObject(doc))
        *why = "not a JSON object";
    else if (cmg_report_check_gateway(doc, reason, sizeof(reason)) < 0)
        *why = reason;   /* the site would refuse it, and the others sent with it */
    else if (!strcmp(t->gw_boot, boot->valuestring) && (uint64_t)seq->valuedouble <= t->gw_seq)
        rc = 0;   /* an older one than kept: nothing new */
    else if (!(copy = malloc(len + 1)))
        *why = "out of memory";
    else {
        memcpy(copy, body, len);
        copy[len] = 0;
        if (strcmp(t->instance, inst->valuestring))
            cmg_info("tunnel to gateway %s: instance %s", t->target, inst->valuestring);
        free(t->gw_report);
        t->gw_report = copy;
        t->gw_report_sent = false;
        snprintf(t->instance, sizeof(t->instance), "%s", inst->valuestring);
        snprintf(t->gw_boot, sizeof(t->gw_boot), "%s", boot->valuestring);
        t->gw_seq = (uint64_t)seq->valuedouble;
        if (t->cn->report)
            post_soon(t->cn->report);
        rc = 0;
    }
    cJSON_Delete(doc);
    return rc;
}

/* ---- the document ---- */

static const char *tunnel_state(const struct cmg_cn_tunnel *t)
{
    if (t->up)
        return cmg_cn_draining(t->cn) ? "draining" : "up";
    return t->active ? "connecting" : "down";
}

static cJSON *own_part(struct cmg_connector *cn)
{
    cJSON *o = cJSON_CreateObject(), *tunnels = cJSON_AddArrayToObject(o, "tunnels");

    cJSON_AddStringToObject(o, "connector", cn->cfg.name);
    cJSON_AddNumberToObject(o, "time", (double)time(NULL));
    cJSON_AddNumberToObject(o, "interval", cn->cfg.report_interval_s);
    cJSON_AddBoolToObject(o, "draining", cmg_cn_draining(cn));
    cJSON_AddNumberToObject(o, "policy_version", (double)(cn->policy_version > 0 ? cn->policy_version : 0));
    for (int i = 0; i < cn->ntunnels; i++) {
        const struct cmg_cn_tunnel *t = &cn->tunnels[i];
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "gateway", t->target);
        cJSON_AddStringToObject(e, "instance", t->instance);
        cJSON_AddStringToObject(e, "state", tunnel_state(t));
        if (t->since > 0)
            cJSON_AddNumberToObject(e, "since", (double)t->since);
        else
            cJSON_AddNullToObject(e, "since");   /* never came up */
        if (t->up && t->rtt_us)
            cJSON_AddNumberToObject(e, "rtt_ms", (double)t->rtt_us / 1000.0);
        else
            cJSON_AddNullToObject(e, "rtt_ms");
        cJSON_AddNumberToObject(e, "reconnects", (double)(t->ups > 1 ? t->ups - 1 : 0));
        cJSON_AddItemToArray(tunnels, e);
    }
    return o;
}

/* The body: this connector's part, then the gateways' reports the site has not taken,
 * as many as fit (the rest go in the next one, soon). -1 if out of memory. */
static int make_body(struct cmg_site_report *r, struct cmg_buf *b)
{
    struct cmg_connector *cn = r->cn;
    cJSON *own = own_part(cn);
    char *text = cJSON_PrintUnformatted(own);
    size_t n = 0;

    cJSON_Delete(own);
    if (!text)
        return -1;
    cmg_buf_append(b, text, strlen(text) - 1);   /* without its closing brace */
    free(text);
    cmg_buf_appends(b, ",\"gateway_reports\":[");
    memset(r->carried, 0, sizeof(r->carried));
    for (int i = 0; i < cn->ntunnels; i++) {
        struct cmg_cn_tunnel *t = &cn->tunnels[i];
        size_t len = t->gw_report ? strlen(t->gw_report) : 0;
        if (!t->gw_report || t->gw_report_sent)
            continue;
        if (b->len + len + 4 > CMG_REPORT_MAX_BODY - OWN_PART && n > 0) {
            r->again = true;   /* no room: in the next one */
            continue;
        }
        if (n++)
            cmg_buf_append(b, ",", 1);
        cmg_buf_append(b, t->gw_report, len);
        r->carried[i] = t->gw_seq;
        memcpy(r->carried_boot[i], t->gw_boot, sizeof(t->gw_boot));
    }
    return cmg_buf_appends(b, "]}");
}

/* ---- the request ---- */

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_site_report *r = p->data;
    size_t room = MAX_ANSWER - r->answer.len;

    return cmg_buf_append(&r->answer, at, n < room ? n : room) < 0 ? -1 : 0;
}

static int on_headers_complete(llhttp_t *p)
{
    ((struct cmg_site_report *)p->data)->status = p->status_code;
    return 0;
}

static int on_complete(llhttp_t *p)
{
    ((struct cmg_site_report *)p->data)->complete = true;
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_body = on_body,
    .on_headers_complete = on_headers_complete,
    .on_message_complete = on_complete,
};

static void finish(struct cmg_site_report *r)
{
    cmg_timer_stop(r->cn->loop, &r->timeout);
    if (r->conn.state != CMG_CONN_CLOSED || r->conn.io.fd >= 0)
        cmg_conn_close(&r->conn);
    cmg_buf_free(&r->answer);
    r->busy = false;
    if (r->again) {   /* more came meanwhile */
        r->again = false;
        post_soon(r);
    }
}

static void failed(struct cmg_site_report *r, const char *why)
{
    const char *authority = "?", *host, *prefix;
    const struct cmg_addr *addr;
    SSL_CTX *tls;

    cmg_site_feed_target(r->cn, &addr, &tls, &host, &authority, &prefix);
    if (!r->failing)
        cmg_warn("report to site %s failed: %s (kept; sent again in %u s, at the next report)",
                 authority, why, r->cn->cfg.report_interval_s);
    r->failing = true;
    r->again = false;   /* not before the next tick */
    finish(r);
}

static void delivered(struct cmg_site_report *r)
{
    struct cmg_connector *cn = r->cn;
    unsigned n = 0;

    for (int i = 0; i < cn->ntunnels; i++) {
        struct cmg_cn_tunnel *t = &cn->tunnels[i];
        if (!r->carried[i])
            continue;
        n++;
        /* a newer one that came meanwhile is still to send */
        if (t->gw_seq == r->carried[i] && !strcmp(t->gw_boot, r->carried_boot[i]))
            t->gw_report_sent = true;
    }
    if (r->failing)
        cmg_info("report to the site delivered again");
    r->failing = false;
    cmg_debug("report to the site delivered with %u gateway report(s)", n);
    finish(r);
}

static void on_read(struct cmg_conn *c)
{
    struct cmg_site_report *r = c->owner;
    char buf[4096];
    ssize_t n;

    while (r->busy && !r->complete) {
        n = cmg_conn_read(c, buf, sizeof(buf));
        if (n == CMG_AGAIN)
            return;
        if (n == 0) {
            if (llhttp_finish(&r->parser) != HPE_OK || !r->complete) {
                failed(r, "connection closed mid-answer");
                return;
            }
            break;
        }
        enum llhttp_errno e = llhttp_execute(&r->parser, buf, (size_t)n);
        if (e != HPE_OK && e != HPE_PAUSED) {
            failed(r, "malformed answer");
            return;
        }
    }
    if (!r->complete)
        return;
    if (r->status == 204 || r->status == 200) {
        delivered(r);
    } else {
        char why[MAX_ANSWER + 64];
        snprintf(why, sizeof(why), "status %d %.*s", r->status, (int)r->answer.len,
                 r->answer.len ? cmg_buf_head(&r->answer) : "");
        failed(r, why);
    }
}

static void on_error(struct cmg_conn *c, const char *why) { failed(c->owner, why); }

static void on_timeout(struct cmg_timer *tm) { failed(REPORT_OF(tm, timeout), "no answer in time"); }

static void on_open(struct cmg_conn *c)
{
    struct cmg_site_report *r = c->owner;
    const char *authority, *host, *prefix;
    const struct cmg_addr *addr;
    SSL_CTX *tls;
    struct cmg_buf body = {0};

    cmg_site_feed_target(r->cn, &addr, &tls, &host, &authority, &prefix);
    if (make_body(r, &body) < 0 ||
        cmg_buf_printf(&c->out,
                       "POST %s/v1/connector/report HTTP/1.1\r\nHost: %s\r\n"
                       "Content-Type: application/json\r\nContent-Length: %zu\r\n"
                       "Connection: close\r\n\r\n",
                       prefix, authority, body.len) < 0 ||
        cmg_buf_append(&c->out, cmg_buf_head(&body), body.len) < 0) {
        cmg_buf_free(&body);
        failed(r, "out of memory");
        return;
    }
    cmg_buf_free(&body);
    cmg_conn_flush(c);
    cmg_conn_want_read(c, true);
}

static const struct cmg_conn_ops report_ops = {on_open, on_read, NULL, on_error};

static void post(struct cmg_site_report *r)
{
    const char *authority, *host, *prefix;
    const struct cmg_addr *addr;
    SSL_CTX *tls;
    SSL *ssl;
    int fd;

    if (r->busy) {
        r->again = true;
        return;
    }
    if (!cmg_site_feed_target(r->cn, &addr, &tls, &host, &authority, &prefix))
        return;
    if ((fd = cmg_net_connect(addr)) < 0) {
        failed(r, strerror(errno));
        return;
    }
    if (!(ssl = SSL_new(tls))) {
        close(fd);
        failed(r, "out of memory");
        return;
    }
    SSL_set_connect_state(ssl);
    SSL_set_tlsext_host_name(ssl, host);
    r->busy = true;
    r->complete = false;
    r->status = 0;
    llhttp_init(&r->parser, HTTP_RESPONSE, &settings);
    r->parser.data = r;
    if (cmg_conn_start(&r->conn, r->cn->loop, fd, ssl, true, &report_ops, r) < 0) {
        failed(r, "cannot start the connection");
        return;
    }
    cmg_timer_start(r->cn->loop, &r->timeout, REPORT_TIMEOUT_MS, on_timeout);
}

static void on_tick(struct cmg_timer *tm)
{
    struct cmg_site_report *r = REPORT_OF(tm, tick);

    post(r);
    cmg_timer_start(r->cn->loop, &r->tick, r->cn->cfg.report_interval_s * 1000ull, on_tick);
}

int cmg_site_report_start(struct cmg_connector *cn)
{
    struct cmg_site_report *r;

    if (!cn->feed)
        return 0;
    if (!(r = calloc(1, sizeof(*r)))) {
        cmg_error("report: out of memory");
        return -1;
    }
    r->cn = cn;
    r->conn.io.fd = -1;
    r->conn.state = CMG_CONN_CLOSED;
    cn->report = r;
    cmg_timer_start(cn->loop, &r->tick, cn->cfg.report_interval_s * 1000ull, on_tick);
    return 0;
}

void cmg_site_report_stop(struct cmg_connector *cn)
{
    struct cmg_site_report *r = cn->report;

    for (int i = 0; i < cn->ntunnels; i++) {
        free(cn->tunnels[i].gw_report);
        cn->tunnels[i].gw_report = NULL;
    }
    if (!r)
        return;
    cmg_timer_stop(cn->loop, &r->tick);
    cmg_timer_stop(cn->loop, &r->soon);
    r->again = false;
    finish(r);
    free(r);
    cn->report = NULL;
}
