/* The gateway's report to the site (docs/metrics.md, "Reports"): its cumulative
 * counters (read from the metrics, one copy) and its tunnels, as one JSON document
 * sent up every ready tunnel as POST /.cmg/report. Every report_interval, at most
 * 1 s after a tunnel comes up, goes down or drains (one unscheduled report a second
 * at most), and once when the instance starts draining. Connectors pass it to the
 * site, which keeps each (instance, boot, seq) once however many carried it. */
#include "core/log.h"
#include "gateway/gw.h"

#include <cjson/cJSON.h>
#include <openssl/asn1.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SOON_GAP_MS 1000      /* unscheduled reports: at most one a second */
#define SOON_BATCH_MS 100     /* changes that come together go in one report */

#define GW_OF(p, field) ((struct cmg_gateway *)((char *)(p) - offsetof(struct cmg_gateway, field)))

/* One tunnel's copy of the document, sent as its request body. */
struct cmg_gw_report_body {
    char *data;
    size_t len, off;
};

/* ---- the document ---- */

static const char *const state_names[] = {"starting", "serving", "draining"};

static void device_bytes(const struct cmg_device *d, uint64_t *in, uint64_t *out)
{
    if (!d->conn.ssl)
        return;
    *in += BIO_number_read(SSL_get_rbio(d->conn.ssl));
    *out += BIO_number_written(SSL_get_wbio(d->conn.ssl));
}

void cmg_gw_report_device_gone(struct cmg_gateway *gw, const struct cmg_device *d)
{
    device_bytes(d, &gw->report.closed_ingress, &gw->report.closed_egress);
}

static void add_u64(cJSON *o, const char *name, uint64_t v)
{
    cJSON_AddNumberToObject(o, name, (double)v);
}

static cJSON *roles_json(const struct cmg_metrics_roles *r)
{
    cJSON *a = cJSON_CreateArray();

    for (size_t i = 0; i < r->cap; i++) {
        const struct cmg_metrics_role *s = &r->t[i];
        cJSON *o, *req;
        if (!s->role[0])
            continue;
        o = cJSON_CreateObject();
        req = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "role", s->role);
        for (unsigned c = 0; c < CMG_METRICS_CLASSES; c++) {
            uint64_t n = 0;
            for (unsigned m = 0; m < CMG_METRICS_AUTHS; m++)
                n += s->requests[c][m];
            add_u64(req, cmg_metrics_class_names[c], n);
        }
        cJSON_AddItemToObject(o, "requests", req);
        add_u64(o, "request_bytes", s->request_bytes);
        add_u64(o, "response_bytes", s->response_bytes);
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

static cJSON *refusals_json(const struct cmg_gw_metrics *m)
{
    cJSON *o = cJSON_CreateObject();

    for (size_t i = 0; i < m->nrefusals; i++)
        add_u64(o, m->refusals[i].reason, m->refusals[i].n);
    if (m->refusals_other)
        add_u64(o, "other", m->refusals_other);
    return o;
}

static cJSON *tunnels_json(const struct cmg_gateway *gw)
{
    cJSON *a = cJSON_CreateArray();
    int n = 0;

    for (const struct cmg_tunnel *t = gw->tunnels; t; t = t->next) {
        X509 *cert = t->conn.ssl ? SSL_get0_peer_certificate(t->conn.ssl) : NULL;
        char cn[CMG_REPORT_MAX_STR] = "";
        cJSON *o;
        if (t->dead || !(t->ready || t->draining) || n >= CMG_REPORT_MAX_TUNNELS)
            continue;
        n++;
        /* the certificate's name: the one the site knows the connector by */
        if (cert)
            cmg_tls_subject_entry(cert, NID_commonName, cn, sizeof(cn));
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "connector", cn);
        cJSON_AddStringToObject(o, "name", t->name);
        cJSON_AddStringToObject(o, "peer", t->conn.peer);
        cJSON_AddStringToObject(o, "state", t->draining ? "draining" : "up");
        cJSON_AddNumberToObject(o, "since", (double)t->since);
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

static cJSON *certificates_json(const struct cmg_tls_watch *w)
{
    cJSON *a = cJSON_CreateArray();

    for (size_t i = 0; i < w->n; i++) {
        X509 *x = w->certs[i].cert;
        const char *slash = strrchr(w->certs[i].file, '/');
        char subject[CMG_REPORT_MAX_STR], serial[80];
        struct tm tm;
        cJSON *o;
        if (!x || ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm) != 1)
            continue;
        cmg_tls_subject(x, subject, sizeof(subject));
        cmg_tls_serial(x, serial, sizeof(serial));
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", slash ? slash + 1 : w->certs[i].file);
        cJSON_AddStringToObject(o, "subject", subject);
        cJSON_AddStringToObject(o, "serial", serial);
        cJSON_AddNumberToObject(o, "not_after", (double)timegm(&tm));
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

/* The document, as text (NULL if out of memory); seq is counted here. */
static char *make_report(struct cmg_gateway *gw)
{
    struct cmg_gw_report *r = &gw->report;
    uint64_t in = r->closed_ingress, out = r->closed_egress;
    cJSON *o = cJSON_CreateObject();
    char *text;

    for (const struct cmg_device *d = gw->devices; d; d = d->next)
        device_bytes(d, &in, &out);
    cJSON_AddStringToObject(o, "instance", r->instance);
    cJSON_AddStringToObject(o, "boot", r->boot);
    add_u64(o, "seq", ++r->seq);
    cJSON_AddNumberToObject(o, "started", (double)r->started);
    cJSON_AddNumberToObject(o, "time", (double)time(NULL));
    add_u64(o, "interval", gw->cfg.report_interval_s);
    cJSON_AddStringToObject(o, "state", state_names[gw->state]);
    cJSON_AddNumberToObject(o, "policy_version",
                            gw->policy && gw->policy->version > 0 ? (double)gw->policy->version : 0);
    add_u64(o, "device_connections",
            gw->metrics.device_connections[0] + gw->metrics.device_connections[1]);
    add_u64(o, "devices_now", gw->ndevices);
    add_u64(o, "egress_bytes", out);
    add_u64(o, "ingress_bytes", in);
    cJSON_AddItemToObject(o, "roles", roles_json(&gw->metrics.roles));
    cJSON_AddItemToObject(o, "refusals", refusals_json(&gw->metrics));
    cJSON_AddItemToObject(o, "tunnels", tunnels_json(gw));
    cJSON_AddItemToObject(o, "certificates", certificates_json(&gw->cert_watch));
    text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return text;
}

/* ---- sending ---- */

static void body_free(struct cmg_gw_report_body *b)
{
    if (b)
        free(b->data);
    free(b);
}

static ssize_t read_report(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t length,
                           uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct cmg_gw_report_body *b = src->ptr;
    size_t n = b->len - b->off < length ? b->len - b->off : length;

    memcpy(buf, b->data + b->off, n);
    b->off += n;
    if (b->off == b->len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

/* Sends text up t, unless its previous report is still on its way: then a fresh one
 * goes as soon as that one is gone. true if sent. */
static bool send_on(struct cmg_tunnel *t, const char *text, size_t len)
{
    char clen[24];
    nghttp2_nv nv[] = {
        {(uint8_t *)":method", (uint8_t *)"POST", 7, 4, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":scheme", (uint8_t *)"https", 7, 5, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":authority", (uint8_t *)"tunnel", 10, 6, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":path", (uint8_t *)CMG_REPORT_PATH, 5, sizeof(CMG_REPORT_PATH) - 1,
         NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-type", (uint8_t *)"application/json", 12, 16, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-length", (uint8_t *)clen, 14, 0, NGHTTP2_NV_FLAG_NONE},
    };
    struct cmg_gw_report_body *b;
    nghttp2_data_provider dp = {.read_callback = read_report};
    int32_t id;

    if (!t->ready || t->dead || !t->h2)
        return false;
    if (t->report_body) {   /* sent once that one is gone (the counters then, not now) */
        t->report_owed = true;
        return false;
    }
    if (!(b = calloc(1, sizeof(*b))) || !(b->data = malloc(len))) {
        body_free(b);
        return false;
    }
    memcpy(b->data, text, len);
    b->len = len;
    nv[5].valuelen = (size_t)snprintf(clen, sizeof(clen), "%zu", len);
    dp.source.ptr = b;
    id = nghttp2_submit_request(t->h2, NULL, nv, sizeof(nv) / sizeof(nv[0]), &dp, NULL);
    if (id < 0) {
        body_free(b);
        return false;
    }
    t->report_body = b;
    t->report_stream = id;
    cmg_tunnel_kick(t);
    return true;
}

static void send_report(struct cmg_gateway *gw, const char *why)
{
    char *text = make_report(gw);
    unsigned n = 0;

    if (!text) {
        cmg_warn("report: out of memory; the next one carries the same counters");
        return;
    }
    if (strlen(text) > CMG_REPORT_MAX_GATEWAY_BODY)
        cmg_warn("report of %zu bytes is over the %u bytes a connector can pass on: not sent",
                 strlen(text), CMG_REPORT_MAX_GATEWAY_BODY);
    else
        for (struct cmg_tunnel *t = gw->tunnels; t; t = t->next)
            n += send_on(t, text, strlen(text));
    cmg_debug("report seq %llu (%s) sent up %u tunnel(s)", (unsigned long long)gw->report.seq,
              why, n);
    free(text);
}

/* A report up t alone (one that was owed to it). */
static void send_owed(struct cmg_tunnel *t)
{
    char *text = make_report(t->gw);

    t->report_owed = false;
    if (text && strlen(text) <= CMG_REPORT_MAX_GATEWAY_BODY)
        send_on(t, text, strlen(text));
    free(text);
}

bool cmg_gw_report_stream_closed(struct cmg_tunnel *t, int32_t stream_id)
{
    if (!t->report_body || stream_id != t->report_stream)
        return false;
    body_free(t->report_body);
    t->report_body = NULL;
    t->report_stream = -1;
    if (t->report_owed)
        send_owed(t);
    return true;
}

void cmg_gw_report_tunnel_gone(struct cmg_tunnel *t)
{
    body_free(t->report_body);
    t->report_body = NULL;
}

/* ---- when ---- */

static void on_interval(struct cmg_timer *tm)
{
    struct cmg_gateway *gw = GW_OF(tm, report.timer);

    send_report(gw, "interval");
    cmg_timer_start(gw->loop, &gw->report.timer, gw->cfg.report_interval_s * 1000ull,
                    on_interval);
}

static void on_soon(struct cmg_timer *tm)
{
    struct cmg_gateway *gw = GW_OF(tm, report.soon_timer);

    gw->report.soon_ms = cmg_loop_now(gw->loop);
    send_report(gw, "tunnels changed");
}

void cmg_gw_report_news(struct cmg_gateway *gw)
{
    struct cmg_gw_report *r = &gw->report;
    uint64_t now = cmg_loop_now(gw->loop), due = now + SOON_BATCH_MS;

    if (!r->boot[0] || cmg_timer_armed(&r->soon_timer))
        return;
    if (r->soon_ms && r->soon_ms + SOON_GAP_MS > due)
        due = r->soon_ms + SOON_GAP_MS;
    cmg_timer_start(gw->loop, &r->soon_timer, due - now, on_soon);
}

void cmg_gw_report_drain(struct cmg_gateway *gw)
{
    if (!gw->report.boot[0])
        return;
    cmg_timer_stop(gw->loop, &gw->report.soon_timer);
    send_report(gw, "draining");
}

static bool reports_in_flight(const struct cmg_gateway *gw)
{
    for (const struct cmg_tunnel *t = gw->tunnels; t; t = t->next)
        if (t->report_body && !t->dead)
            return true;
    return false;
}

static void on_last_check(struct cmg_timer *tm)
{
    struct cmg_gateway *gw = GW_OF(tm, report.last_timer);
    uint64_t now = cmg_loop_now(gw->loop);

    if (reports_in_flight(gw) && now < gw->report.last_deadline_ms) {
        cmg_timer_start(gw->loop, tm, 10, on_last_check);
        return;
    }
    if (reports_in_flight(gw))
        cmg_warn("the last report was not taken within its time: the site misses what "
                 "finished during the drain");
    cmg_loop_stop(gw->loop);
}

void cmg_gw_report_last(struct cmg_gateway *gw, uint64_t wait_ms)
{
    if (cmg_timer_armed(&gw->report.last_timer))   /* on its way already */
        return;
    if (!gw->report.boot[0] || !wait_ms) {
        cmg_loop_stop(gw->loop);
        return;
    }
    cmg_gw_report_stop(gw);
    send_report(gw, "drain over");
    gw->report.last_deadline_ms = cmg_loop_now(gw->loop) + wait_ms;
    on_last_check(&gw->report.last_timer);
}

/* instance_name, else the host's name and the instance number. */
static void instance_name(const struct cmg_gw_config *c, char *out, size_t outlen)
{
    char host[128] = "";

    if (c->instance_name[0]) {
        snprintf(out, outlen, "%s", c->instance_name);
        return;
    }
    if (gethostname(host, sizeof(host) - 1) < 0 || !host[0])
        snprintf(host, sizeof(host), "gateway");
    snprintf(out, outlen, "%s/%u", host, c->instance);
}

int cmg_gw_report_start(struct cmg_gateway *gw)
{
    struct cmg_gw_report *r = &gw->report;
    unsigned char rnd[8];

    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        cmg_error("report: no random bytes for the boot id");
        return -1;
    }
    for (size_t i = 0; i < sizeof(rnd); i++)
        snprintf(r->boot + 2 * i, 3, "%02x", rnd[i]);
    instance_name(&gw->cfg, r->instance, sizeof(r->instance));
    r->started = (int64_t)time(NULL);
    cmg_timer_start(gw->loop, &r->timer, gw->cfg.report_interval_s * 1000ull, on_interval);
    cmg_info("reports to the site: instance %s, boot %s, every %u s", r->instance, r->boot,
             gw->cfg.report_interval_s);
    return 0;
}

void cmg_gw_report_stop(struct cmg_gateway *gw)
{
    cmg_timer_stop(gw->loop, &gw->report.timer);
    cmg_timer_stop(gw->loop, &gw->report.soon_timer);
    cmg_timer_stop(gw->loop, &gw->report.last_timer);
}
