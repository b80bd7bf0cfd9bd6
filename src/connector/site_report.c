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
    struct cmg_site_call call;
    bool failing;                        /* logged once until it works again */
    bool again;                          /* gateways' reports came while one was on its way */
    struct cmg_timer tick, soon;
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
    if (r->call.busy)
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

static void finish(struct cmg_site_report *r)
{
    cmg_buf_free(&r->call.answer);
    if (r->again) {   /* more came meanwhile */
        r->again = false;
        post_soon(r);
    }
}

static void failed(struct cmg_site_report *r, const char *why)
{
    if (!r->failing)
        cmg_warn("report to site %s failed: %s (kept; sent again in %u s, at the next report)",
                 cmg_site_call_authority(&r->call), why, r->cn->cfg.report_interval_s);
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

static void on_answer(struct cmg_site_call *c, int status, const char *why)
{
    struct cmg_site_report *r = REPORT_OF(c, call);
    char msg[MAX_ANSWER + 64];

    if (status == 204 || status == 200) {
        delivered(r);
        return;
    }
    if (status > 0) {
        snprintf(msg, sizeof(msg), "status %d %.*s", status, (int)c->answer.len,
                 c->answer.len ? cmg_buf_head(&c->answer) : "");
        why = msg;
    }
    failed(r, why);
}

static void post(struct cmg_site_report *r)
{
    struct cmg_buf body = {0};

    if (r->call.busy) {
        r->again = true;
        return;
    }
    if (!r->cn->feed)
        return;
    if (make_body(r, &body) < 0) {
        cmg_buf_free(&body);
        failed(r, "out of memory");
        return;
    }
    cmg_site_call_start(&r->call, "POST", "/v1/connector/report",
                        "Content-Type: application/json\r\n", cmg_buf_head(&body), body.len,
                        REPORT_TIMEOUT_MS);
    cmg_buf_free(&body);
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
    cmg_site_call_init(&r->call, cn, on_answer, MAX_ANSWER);
    r->call.cut_answer = true;
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
    cmg_site_call_free(&r->call);
    free(r);
    cn->report = NULL;
}
