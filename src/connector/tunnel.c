/* Tunnels, connector side. We dial out to every gateway instance, show our
 * certificate, and then serve HTTP/2: the gateway opens a stream per device
 * request, which we forward to the internal service of the role it names. */
#include "connector/cn.h"
#include "core/log.h"
#include "http/h2.h"
#include "tls/tls.h"

#include <cjson/cJSON.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_STREAMS 4096
#define BACKOFF_MIN_MS 250
#define CONTROL_PATH "/.cmg/control"
#define UNKNOWN_KID_PATH "/.cmg/oidc-unknown-kid"   /* a gateway's report, for the site */
#define NOTIFY_REPORT_PATH "/.cmg/notify-report"     /* relayed to the site, never forwarded */
/* A notify report's body, at most what a POST carries less room for the rest. */
#define NOTIFY_REPORT_MAX (1024 * 1024 - 64 * 1024)
#define NOTIFY_RELAY_TIMEOUT_MS 10000
#define TUNNEL_ALPN "cmg-tunnel/1"
/* The PING sent with the drain's GOAWAY: its answer shows the gateway has seen it. */
static const uint8_t drain_ping[8] = "drain!!";

#define TUNNEL_OF(p, field) \
    ((struct cmg_cn_tunnel *)((char *)(p) - offsetof(struct cmg_cn_tunnel, field)))

static void tunnel_down(struct cmg_cn_tunnel *t, const char *why);
static void dial(struct cmg_cn_tunnel *t);
static void half_close(struct cmg_cn_tunnel *t);

/* ---- sending ---- */

static void tunnel_send(struct cmg_cn_tunnel *t)
{
    if (!t->h2)
        return;
    int rc = cmg_h2_send(t->h2, &t->conn);
    if (rc < 0) {
        tunnel_down(t, nghttp2_strerror(rc));
        return;
    }
    if (!cmg_h2_finished(t->h2, &t->conn))
        return;
    if (t->closing)
        half_close(t);
    else
        tunnel_down(t, "session ended");
}

static void on_send_task(struct cmg_task *task) { tunnel_send(TUNNEL_OF(task, send_task)); }

void cmg_cn_tunnel_kick(struct cmg_cn_tunnel *t)
{
    if (t->h2)
        cmg_task_post(t->cn->loop, &t->send_task, on_send_task);
}

/* ---- streams ---- */

static struct cmg_cn_stream *stream_new(struct cmg_cn_tunnel *t, int32_t id)
{
    struct cmg_cn_stream *st = calloc(1, sizeof(*st));
    if (!st)
        return NULL;
    st->t = t;
    st->id = id;
    st->content_length = -1;
    st->start_ms = cmg_loop_now(t->cn->loop);
    st->next = t->streams;
    if (st->next)
        st->next->prev = st;
    t->streams = st;
    return st;
}

static void stream_free(struct cmg_cn_stream *st)
{
    struct cmg_cn_tunnel *t = st->t;
    if (st->up)
        cmg_upstream_detach(st->up);
    st->up = NULL;
    if (st->prev)
        st->prev->next = st->next;
    else
        t->streams = st->next;
    if (st->next)
        st->next->prev = st->prev;
    cmg_headers_free(&st->hdrs);
    cmg_buf_free(&st->resp_body);
    cmg_buf_free(&st->report_in);
    if (st->relay) {
        cmg_site_call_free(st->relay);
        free(st->relay);
    }
    free(st->path);
    free(st);
}

/* An answer made here, not by the internal service. */
static void answer(struct cmg_cn_stream *st, int status, const char *body)
{
    st->resp_submitted = true;
    st->status = status;
    cmg_h2_submit_text(st->t->h2, st->id, status, body, &st->text);
    cmg_cn_tunnel_kick(st->t);
}

static ssize_t read_response_body(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length,
                                  uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct cmg_cn_stream *st = src->ptr;
    return cmg_h2_offer(&st->resp_body, st->resp_eof, length, flags);
}

static int send_response_body(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd,
                              size_t length, nghttp2_data_source *src, void *user)
{
    struct cmg_cn_tunnel *t = user;
    struct cmg_cn_stream *st = src->ptr;
    int rc = cmg_h2_put_data(&t->conn, frame, framehd, length, &st->resp_body);

    if (rc == 0)
        st->resp_bytes += length;
    if (rc == 0 && st->up)
        cmg_upstream_resume(st->up);
    return rc;
}

void cmg_cn_stream_response(struct cmg_cn_stream *st, int status, const struct cmg_headers *h)
{
    nghttp2_nv *nv = calloc(h->n + 1, sizeof(*nv));
    nghttp2_data_provider dp = {.source.ptr = st, .read_callback = read_response_body};
    char code[8];
    size_t k = 0;

    if (!nv) {
        cmg_cn_stream_fail(st, 502, CMG_CN_FAIL_OTHER, "out of memory");
        return;
    }
    snprintf(code, sizeof(code), "%d", status);
    st->status = status;
    nv[k++] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)code, 7, strlen(code), 0};
    for (uint32_t i = 0; i < h->n; i++) {
        const char *name = cmg_headers_name(h, i);
        uint32_t nl = h->v[i].name_len;
        if (cmg_header_not_forwarded(name, nl) && !cmg_header_is(h, i, "content-length"))
            continue;
        nv[k++] = (nghttp2_nv){(uint8_t *)name, (uint8_t *)cmg_headers_value(h, i), nl,
                               h->v[i].value_len, NGHTTP2_NV_FLAG_NONE};
    }
    st->resp_submitted = true;
    nghttp2_submit_response(st->t->h2, st->id, nv, k, &dp);
    free(nv);
    cmg_cn_tunnel_kick(st->t);
}

void cmg_cn_stream_body(struct cmg_cn_stream *st)
{
    if (st->resp_submitted) {
        nghttp2_session_resume_data(st->t->h2, st->id);
        cmg_cn_tunnel_kick(st->t);
    }
}

/* The reason token of each cause, and the body that carries it to the device. */
static const struct {
    const char *token, *body;
} failures[] = {
#define FAILURE(t) {t, t "\r\n"}
    [CMG_CN_FAIL_OTHER] = FAILURE("CMGService_Internal_Server_Error"),
    [CMG_CN_FAIL_REFUSED] = FAILURE("CMGConnector_Upstream_Refused"),
    [CMG_CN_FAIL_TLS] = FAILURE("CMGConnector_Upstream_TLS_Failed"),
    [CMG_CN_FAIL_DNS] = FAILURE("CMGConnector_Upstream_DNS_Failed"),
    [CMG_CN_FAIL_TIMEOUT] = FAILURE("CMGConnector_Upstream_Timeout"),
#undef FAILURE
};

/* The answer names its cause twice: in the body for the device, and in
 * CMG_REASON_HEADER for the gateway's access log (the gateway takes it off). */
void cmg_cn_stream_fail(struct cmg_cn_stream *st, int status, enum cmg_cn_failure cause,
                        const char *why)
{
    const struct cmg_log_field f[] = {
        CMG_F_STR("method", st->method), CMG_F_STR("path", st->path), CMG_F_NUM("status", status),
        CMG_F_STR("reason", failures[cause].token), CMG_F_STR("error", why)};

    cmg_log_kv(CMG_LOG_WARN, "request failed", f, CMG_LOG_NFIELDS(f));
    st->up = NULL;
    if (st->resp_submitted) {
        nghttp2_submit_rst_stream(st->t->h2, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
    } else {
        st->resp_submitted = true;
        st->status = status;
        cmg_h2_submit_reason(st->t->h2, st->id, status, failures[cause].body,
                             failures[cause].token, &st->text);
    }
    cmg_cn_tunnel_kick(st->t);
}

/* Request bytes were written to the internal service: open the window again. */
void cmg_cn_stream_request_written(struct cmg_cn_stream *st)
{
    if (!st->unconsumed)
        return;
    nghttp2_session_consume(st->t->h2, st->id, st->unconsumed);
    st->unconsumed = 0;
    cmg_cn_tunnel_kick(st->t);
}

/* ---- the control stream ---- */

static void queue_line(struct cmg_cn_tunnel *t, const char *line)
{
    cmg_buf_appends(&t->ctl_out, line);
    cmg_buf_append(&t->ctl_out, "\n", 1);
}

int cmg_cn_tunnel_control(struct cmg_cn_tunnel *t, const char *line, size_t len)
{
    if (!t->up || t->ctl_stream < 0 || !t->h2 || cmg_buf_append(&t->ctl_out, line, len) < 0 ||
        cmg_buf_append(&t->ctl_out, "\n", 1) < 0)
        return -1;
    cmg_cn_tunnel_control_more(t);
    return 0;
}

void cmg_cn_tunnel_control_more(struct cmg_cn_tunnel *t)
{
    if (!t->up || t->ctl_stream < 0 || !t->h2)
        return;
    nghttp2_session_resume_data(t->h2, t->ctl_stream);
    cmg_cn_tunnel_kick(t);
}

static void cmg_cn_tunnel_announce_policy(struct cmg_cn_tunnel *t)
{
    cJSON *msg = cJSON_CreateObject();
    char *text;

    cJSON_AddStringToObject(msg, "type", "policy");
    cJSON_AddStringToObject(msg, "jws", t->cn->policy);
    text = cJSON_PrintUnformatted(msg);
    cJSON_Delete(msg);
    if (text)
        queue_line(t, text);
    free(text);
}

void cmg_cn_tunnel_announce(struct cmg_cn_tunnel *t)
{
    cJSON *msg;
    char *text;

    if (!t->up || t->ctl_stream < 0 || !t->h2)
        return;   /* the hello of the next control stream says it all */
    msg = cJSON_CreateObject();
    cJSON_AddStringToObject(msg, "type", "roles");
    cJSON_AddItemToObject(msg, "roles", cmg_cn_roles_json(t->cn));
    text = cJSON_PrintUnformatted(msg);
    cJSON_Delete(msg);
    if (text)
        queue_line(t, text);
    free(text);
    if (t->cn->policy)
        cmg_cn_tunnel_announce_policy(t);
    nghttp2_session_resume_data(t->h2, t->ctl_stream);
    cmg_cn_tunnel_kick(t);
}

static ssize_t read_control(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length,
                            uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct cmg_cn_tunnel *t = user;
    size_t n;

    if (t->ctl_out.len == 0)
        cmg_notify_feed_fill(t);
    n = t->ctl_out.len < length ? t->ctl_out.len : length;
    if (n == 0)
        return NGHTTP2_ERR_DEFERRED;
    memcpy(buf, cmg_buf_head(&t->ctl_out), n);
    cmg_buf_consume(&t->ctl_out, n);
    return (ssize_t)n;
}

static void open_control(struct cmg_cn_tunnel *t, struct cmg_cn_stream *st)
{
    struct cmg_cn_config *c = &t->cn->cfg;
    nghttp2_nv nv[] = {{(uint8_t *)":status", (uint8_t *)"200", 7, 3, 0},
                       {(uint8_t *)"content-type", (uint8_t *)"application/x-ndjson", 12, 20, 0}};
    nghttp2_data_provider dp = {.read_callback = read_control};
    cJSON *hello = cJSON_CreateObject(), *roles = cmg_cn_roles_json(t->cn);
    char *text;
    int nroles = cJSON_GetArraySize(roles);

    cmg_buf_reset(&t->ctl_out);   /* what a previous control stream left is not for this one */
    t->notify_synced = false;
    cJSON_AddStringToObject(hello, "type", "hello");
    cJSON_AddStringToObject(hello, "name", c->name);
    cJSON_AddStringToObject(hello, "version", CMG_VERSION);
    cJSON_AddItemToObject(hello, "roles", roles);
    text = cJSON_PrintUnformatted(hello);
    cJSON_Delete(hello);
    if (text) {
        cmg_buf_appends(&t->ctl_out, text);
        cmg_buf_append(&t->ctl_out, "\n", 1);
        free(text);
    }
    if (t->cn->policy)
        cmg_cn_tunnel_announce_policy(t);
    t->ctl_stream = st->id;
    st->resp_submitted = true;
    nghttp2_submit_response(t->h2, st->id, nv, 2, &dp);
    if (!t->up) {
        t->up = true;
        t->since = (int64_t)time(NULL);
        t->ups++;
        t->failures = 0;
        t->backoff_ms = BACKOFF_MIN_MS;
        cmg_info("tunnel up: gateway=%s peer=%s roles=%d", t->target, t->conn.peer, nroles);
    }
    cmg_notify_feed_tunnel_ready(t);
}

/* ---- requests ---- */

/* A request the gateway opened before it learned that we drain: REFUSED_STREAM tells
 * it that nothing reached the internal service, so it sends it to another connector
 * whatever its method (RFC 9113, 8.7). */
static void refuse(struct cmg_cn_stream *st)
{
    cmg_debug("request %s %s refused: draining (gateway=%s)", st->method, st->path,
              st->t->target);
    st->refused = true;
    st->resp_submitted = true;
    nghttp2_submit_rst_stream(st->t->h2, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_REFUSED_STREAM);
    cmg_cn_tunnel_kick(st->t);
}

/* A gateway's report, answered here and never forwarded: 204 once kept, 400 if it is
 * not one. */
static void report_end(struct cmg_cn_stream *st)
{
    const char *why = "no body";

    if (st->resp_submitted)
        return;   /* answered already: too large */
    if (strcmp(st->method, "POST"))
        why = "POST expected";
    else if (st->report_in.len &&
             cmg_site_report_gateway(st->t, cmg_buf_head(&st->report_in), st->report_in.len,
                                     &why) == 0) {
        answer(st, 204, "");
        return;
    }
    cmg_warn("report from gateway %s refused: %s", st->t->target, why);
    answer(st, 400, "CMGService_Bad_Request\r\n");
}

/* Its body, kept up to what a POST to the site can carry with the connector's own part
 * (the gateway sends no more); past that the report is refused at once. */
static void report_data(struct cmg_cn_stream *st, const uint8_t *data, size_t len)
{
    if (st->resp_submitted)
        return;
    if (st->report_in.len + len > CMG_REPORT_MAX_GATEWAY_BODY) {
        cmg_warn("report from gateway %s refused: over %u bytes", st->t->target,
                 CMG_REPORT_MAX_GATEWAY_BODY);
        cmg_buf_free(&st->report_in);
        answer(st, 400, "CMGService_Bad_Request\r\n");
        return;
    }
    if (cmg_buf_append(&st->report_in, data, len) < 0) {
        cmg_buf_free(&st->report_in);
        answer(st, 503, "CMGService_Internal_Server_Error\r\n");
    }
}

/* One report on its way per tunnel, and one a second (a burst of REPORT_BURST, as when
 * a drain starts and ends at once): a gateway cannot make the connector hold more than
 * one report's bytes per tunnel, nor spend its time parsing them. */
#define REPORT_EVERY_MS 1000
#define REPORT_BURST 3

static void report_start(struct cmg_cn_tunnel *t, struct cmg_cn_stream *st)
{
    uint64_t now = cmg_loop_now(t->cn->loop);
    uint64_t due = t->report_ms > now ? t->report_ms : now;   /* the rate's schedule */
    bool busy = false;

    for (const struct cmg_cn_stream *o = t->streams; o; o = o->next)
        busy = busy || (o != st && o->report);
    if (busy || due > now + (REPORT_BURST - 1) * REPORT_EVERY_MS) {
        cmg_debug("report from gateway %s refused: %s", t->target,
                  busy ? "its previous one is still coming" : "more than one a second");
        answer(st, 429, "CMGService_Too_Many_Requests\r\n");
        return;
    }
    t->report_ms = due + REPORT_EVERY_MS;
    st->report = true;
    if (st->req_end)
        report_end(st);
}

/* ---- a gateway's notify report, relayed to the site ---- */

static void on_relayed(struct cmg_site_call *c, int status, const char *why)
{
    struct cmg_cn_stream *st = c->arg;   /* the relay ends before its stream */
    struct cmg_connector *cn = st->t->cn;

    if (status == 204 && cn->relay_failing)
        cmg_info("notify reports relayed to site %s again", cmg_site_call_authority(c));
    else if (status > 0 && status != 204)
        cmg_warn("notify report from gateway %s: the site %s answered %d %.*s", st->t->target,
                 cmg_site_call_authority(c), status,
                 (int)(c->answer.len > 300 ? 300 : c->answer.len), cmg_buf_head(&c->answer));
    else if (status <= 0 && !cn->relay_failing)   /* once until it works again */
        cmg_warn("notify report from gateway %s not relayed: site %s: %s (the gateway keeps "
                 "it and sends it again; logged once until a relay works)", st->t->target,
                 cmg_site_call_authority(c), why);
    cn->relay_failing = status <= 0;
    if (status > 0)
        answer(st, status, status == 204 ? "" : "CMGService_Site_Refused\r\n");
    else
        answer(st, status < 0 ? 504 : 502,
               status < 0 ? "CMGService_Site_Timeout\r\n" : "CMGService_Site_Unreachable\r\n");
}

/* Its body is all here: passed on as it came. */
static void notify_report_end(struct cmg_cn_stream *st)
{
    if (st->resp_submitted)
        return;   /* answered already: too large */
    if (strcmp(st->method, "POST")) {
        answer(st, 405, "CMGService_Method_Not_Allowed\r\n");
        return;
    }
    if (!(st->relay = malloc(sizeof(*st->relay)))) {
        answer(st, 503, "CMGService_Internal_Server_Error\r\n");
        return;
    }
    cmg_site_call_init(st->relay, st->t->cn, on_relayed, 4096);
    st->relay->cut_answer = true;
    st->relay->arg = st;
    cmg_site_call_start(st->relay, "POST", "/v1/connector/notify-report",
                        "Content-Type: application/json\r\n", cmg_buf_head(&st->report_in),
                        st->report_in.len, NOTIFY_RELAY_TIMEOUT_MS);
    cmg_buf_free(&st->report_in);
}

static void notify_report_data(struct cmg_cn_stream *st, const uint8_t *data, size_t len)
{
    if (st->resp_submitted)
        return;
    if (st->report_in.len + len > NOTIFY_REPORT_MAX) {
        cmg_warn("notify report from gateway %s refused: over %u bytes", st->t->target,
                 NOTIFY_REPORT_MAX);
        cmg_buf_free(&st->report_in);
        answer(st, 413, "CMGService_Request_Too_Large\r\n");
        return;
    }
    if (cmg_buf_append(&st->report_in, data, len) < 0) {
        cmg_buf_free(&st->report_in);
        answer(st, 503, "CMGService_Internal_Server_Error\r\n");
    }
}

/* One relay per tunnel at a time: a gateway cannot make the connector hold more than
 * one report's bytes per tunnel. */
static void notify_report_start(struct cmg_cn_tunnel *t, struct cmg_cn_stream *st)
{
    bool busy = false;

    for (const struct cmg_cn_stream *o = t->streams; o; o = o->next)
        busy = busy || (o != st && o->notify_report && !o->resp_submitted);
    if (busy) {
        cmg_debug("notify report from gateway %s refused: its previous one is still on its way",
                  t->target);
        answer(st, 429, "CMGService_Too_Many_Requests\r\n");
        return;
    }
    st->notify_report = true;
    if (st->content_length > NOTIFY_REPORT_MAX) {
        notify_report_data(st, NULL, (size_t)st->content_length);   /* refused at once */
        return;
    }
    if (st->req_end)
        notify_report_end(st);
}

static void start_request(struct cmg_cn_tunnel *t, struct cmg_cn_stream *st)
{
    struct cmg_path p;

    if (!st->path || !st->method[0]) {
        answer(st, 400, "CMGService_Bad_Request\r\n");
        return;
    }
    if (!strcmp(st->path, CONTROL_PATH)) {
        open_control(t, st);
        return;
    }
    if (!strcmp(st->path, UNKNOWN_KID_PATH)) {
        int i = cmg_headers_find(&st->hdrs, "cmg-kid");
        if (i >= 0)
            cmg_site_feed_unknown_kid(t->cn, cmg_headers_value(&st->hdrs, (uint32_t)i));
        answer(st, 204, "");
        return;
    }
    if (!strcmp(st->path, CMG_REPORT_PATH)) {   /* answered when its body is all here */
        report_start(t, st);
        return;
    }
    if (!strcmp(st->path, NOTIFY_REPORT_PATH)) {   /* relayed when its body is all here */
        notify_report_start(t, st);
        return;
    }
    if (cmg_cn_draining(t->cn)) {
        refuse(st);
        return;
    }
    /* The gateway checked the target; we check again rather than trust it. */
    cmg_path_parse(st->path, strlen(st->path), &p);
    st->m = p.kind == CMG_PATH_OTHER || cmg_path_check(st->path, strlen(st->path)) < 0
                ? NULL
                : cmg_cn_mapping_find(t->cn, p.role, p.role_len);
    if (!st->m) {
        answer(st, 404, "CMGService_No_Mapping\r\n");
        return;
    }
    cmg_upstream_start(t->cn, st);
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
    struct cmg_cn_tunnel *t = user;
    struct cmg_cn_stream *st;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    st = stream_new(t, frame->hd.stream_id);
    if (!st)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    nghttp2_session_set_stream_user_data(s, frame->hd.stream_id, st);
    return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user)
{
    struct cmg_cn_stream *st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (!st || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    st->head_bytes += namelen + valuelen;
    if (st->head_bytes > 256 * 1024)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    if (namelen == 7 && !memcmp(name, ":method", 7)) {
        snprintf(st->method, sizeof(st->method), "%.*s", (int)valuelen, value);
    } else if (namelen == 5 && !memcmp(name, ":path", 5)) {
        free(st->path);
        st->path = strndup((const char *)value, valuelen);
    } else if (namelen && name[0] != ':') {
        if (namelen == 14 && !memcmp(name, "content-length", 14)) {
            char *end;
            st->content_length = strtoll((const char *)value, &end, 10);
        }
        if (cmg_headers_add(&st->hdrs, (const char *)name, namelen, (const char *)value,
                            valuelen) < 0)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
    struct cmg_cn_tunnel *t = user;
    struct cmg_cn_stream *st;
    bool end = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;

    if (frame->hd.type == NGHTTP2_PING) {
        if (frame->hd.flags & NGHTTP2_FLAG_ACK) {
            cmg_timer_stop(t->cn->loop, &t->pong_timer);
            if (t->ping_sent_us)   /* the round trip, for the metrics */
                t->rtt_us = cmg_metrics_now_us() - t->ping_sent_us;
            t->ping_sent_us = 0;
        }
        if ((frame->hd.flags & NGHTTP2_FLAG_ACK) && cmg_cn_draining(t->cn) &&
            !memcmp(frame->ping.opaque_data, drain_ping, sizeof(drain_ping))) {
            t->drain_heard = true;
            cmg_cn_drain_check(t->cn);
        }
        return 0;
    }
    st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (!st)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        st->has_body = !end;
        st->req_end = end;
        start_request(t, st);
    } else if (frame->hd.type == NGHTTP2_DATA && end) {
        st->req_end = true;
        if (st->report)
            report_end(st);
        if (st->notify_report)
            notify_report_end(st);
        if (st->up)
            cmg_upstream_body_end(st->up);
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *user)
{
    struct cmg_cn_stream *st = nghttp2_session_get_stream_user_data(s, id);
    if (st)
        st->req_bytes += len;
    if (st && st->report)
        report_data(st, data, len);
    if (st && st->notify_report)
        notify_report_data(st, data, len);
    if (!st || !st->up) {
        nghttp2_session_consume(s, id, len);
        return 0;
    }
    st->unconsumed += len;
    cmg_upstream_body(st->up, data, len);
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t error_code, void *user)
{
    struct cmg_cn_tunnel *t = user;
    struct cmg_cn_stream *st = nghttp2_session_get_stream_user_data(s, id);
    bool ctl = id == t->ctl_stream;

    if (ctl)
        t->ctl_stream = -1;
    else if (st && !st->report && !st->notify_report && cmg_cn_draining(t->cn))   /* requests only */
        cmg_cn_drain_stream_ended(t->cn, st->refused ? CMG_CN_DRAIN_REFUSED
                                         : error_code == NGHTTP2_NO_ERROR ? CMG_CN_DRAIN_FINISHED
                                                                          : CMG_CN_DRAIN_RESET);
    if (st) {
        if (!ctl && st->m)   /* a request, not the control stream */
            cmg_cn_metrics_stream(t->cn, st);
        if (st->unconsumed)
            nghttp2_session_consume_connection(s, st->unconsumed);
        stream_free(st);
    }
    return 0;
}

/* ---- health ---- */

static void on_pong_timeout(struct cmg_timer *tm)
{
    tunnel_down(TUNNEL_OF(tm, pong_timer), "no answer to the health ping");
}

static void on_ping_timer(struct cmg_timer *tm)
{
    struct cmg_cn_tunnel *t = TUNNEL_OF(tm, ping_timer);
    struct cmg_cn_config *c = &t->cn->cfg;
    nghttp2_submit_ping(t->h2, NGHTTP2_FLAG_NONE, NULL);
    if (!t->ping_sent_us)
        t->ping_sent_us = cmg_metrics_now_us();
    cmg_cn_tunnel_kick(t);
    if (!cmg_timer_armed(&t->pong_timer))
        cmg_timer_start(t->cn->loop, &t->pong_timer, c->ping_timeout_ms, on_pong_timeout);
    cmg_timer_start(t->cn->loop, &t->ping_timer, c->ping_interval_ms, on_ping_timer);
}

static void on_hs_timeout(struct cmg_timer *tm)
{
    struct cmg_cn_tunnel *t = TUNNEL_OF(tm, hs_timer);
    if (!t->up)
        tunnel_down(t, "gateway did not open the tunnel in time");
}

/* ---- the connection ---- */

static int start_session(struct cmg_cn_tunnel *t)
{
    nghttp2_session_callbacks *cb;
    nghttp2_option *opt;
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, CMG_TUNNEL_STREAM_WINDOW},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, CMG_H2_MAX_FRAME},
    };
    int rc;

    if (nghttp2_session_callbacks_new(&cb) != 0)
        return -1;
    nghttp2_session_callbacks_set_send_data_callback(cb, send_response_body);
    cmg_h2_large_frames(cb);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cb);
        return -1;
    }
    /* Request bodies open the window only once written to the internal service. */
    nghttp2_option_set_no_auto_window_update(opt, 1);
    /* The gateway cancels a stream whenever a device goes away mid-answer; it is
     * an authenticated peer, so allow it far more resets than a stranger. */
    nghttp2_option_set_stream_reset_rate_limit(opt, 100000, 10000);
    rc = nghttp2_session_server_new2(&t->h2, cb, t, opt);
    nghttp2_session_callbacks_del(cb);
    nghttp2_option_del(opt);
    if (rc != 0)
        return -1;
    nghttp2_submit_settings(t->h2, NGHTTP2_FLAG_NONE, settings, sizeof(settings) / sizeof(settings[0]));
    nghttp2_session_set_local_window_size(t->h2, NGHTTP2_FLAG_NONE, 0, CMG_TUNNEL_CONNECTION_WINDOW);
    return 0;
}

/* A peer that answers TLS but not with the tunnel protocol: most likely the device
 * port of a gateway (it offers h2 and http/1.1 only). */
static void wrong_protocol(struct cmg_cn_tunnel *t, SSL *ssl)
{
    const unsigned char *p = NULL;
    unsigned int n = 0;
    char why[300];

    SSL_get0_alpn_selected(ssl, &p, &n);
    snprintf(why, sizeof(why), "expected the tunnel protocol (ALPN %s), found %s%.*s%s: is this "
             "the gateway's device port? Connectors dial tunnel_port + instance (10140 + i)",
             TUNNEL_ALPN, n ? "ALPN " : "no ALPN agreed", (int)n, p ? (const char *)p : "",
             n ? "" : " (the peer does not speak it)");
    tunnel_down(t, why);
}

static void on_open(struct cmg_conn *c)
{
    struct cmg_cn_tunnel *t = c->owner;
    if (!cmg_tls_alpn_is(c->ssl, TUNNEL_ALPN)) {
        wrong_protocol(t, c->ssl);
        return;
    }
    if (start_session(t) < 0) {
        tunnel_down(t, "cannot start HTTP/2");
        return;
    }
    cmg_timer_start(t->cn->loop, &t->ping_timer, t->cn->cfg.ping_interval_ms, on_ping_timer);
    cmg_conn_want_read(c, true);
    tunnel_send(t);
}

/* After our FIN: the gateway's input is dropped, undecrypted, until it closes. */
static void drop_input(struct cmg_cn_tunnel *t)
{
    size_t dropped = 0;

    if (cmg_conn_discard_input(&t->conn, &dropped) < 0)
        tunnel_down(t, errno ? strerror(errno) : "closed by the gateway");
}

static void on_read(struct cmg_conn *c)
{
    struct cmg_cn_tunnel *t = c->owner;
    int rc;

    if (t->half_closed) {
        drop_input(t);
        return;
    }
    if (!t->h2)
        return;
    rc = cmg_h2_read(t->h2, c, NULL);
    if (rc == CMG_H2_EOF) {
        tunnel_down(t, "connection closed by the gateway");
        return;
    }
    if (rc < 0) {
        tunnel_down(t, nghttp2_strerror(rc));
        return;
    }
    tunnel_send(t);
}

static void on_drain(struct cmg_conn *c) { tunnel_send(c->owner); }

static bool says(const char *why, const char *const *words)
{
    for (; *words; words++)
        if (strstr(why, *words))
            return true;
    return false;
}

/* Why a dial failed, with what was expected and what was found when the cause is a
 * setup mistake: a certificate the gateway refuses, a gateway certificate for another
 * name, a port that does not speak TLS. */
static void explain(struct cmg_cn_tunnel *t, struct cmg_conn *c, const char *why, char *out,
                    size_t len)
{
    static const char *const cert_refused[] = {"alert unsupported certificate", "alert bad certificate",
                                               "alert certificate required", "alert certificate unknown",
                                               "alert certificate revoked", "alert certificate expired", NULL};
    static const char *const not_tls[] = {"wrong version number", "packet length too long",
                                          "record layer failure", "unexpected eof", NULL};
    struct cmg_cn_config *cfg = &t->cn->cfg;
    X509 *own = SSL_CTX_get0_certificate(t->cn->tunnel_ctx);
    /* The chain the gateway sent is kept even when it failed verification; its first
     * certificate is the gateway's own. */
    STACK_OF(X509) *chain = c->ssl ? SSL_get_peer_cert_chain(c->ssl) : NULL;
    X509 *peer = sk_X509_num(chain) > 0 ? sk_X509_value(chain, 0) : NULL;
    char names[512] = "", usages[256] = "", subject[256] = "";

    if (says(why, cert_refused) && own) {
        cmg_tls_usages(own, usages, sizeof(usages));
        cmg_tls_subject(own, subject, sizeof(subject));
        snprintf(out, len, "the gateway refused this connector's certificate %.300s (%s; usages: "
                 "%s): expected a connector certificate of the gateway's connector_ca, with the "
                 "OpenCMG connector usage ('cmg site connector add'), not revoked (%s)",
                 cfg->cert, subject, usages, why);
    } else if (strstr(why, "hostname mismatch")) {
        if (peer)
            cmg_tls_cert_names(peer, names, sizeof(names));
        snprintf(out, len, "the gateway's certificate does not name the server_name of %.300s: "
                 "expected %s, found %s (%s)", cfg->file, cfg->server_name,
                 names[0] ? names : "(its certificate was not kept)", why);
    } else if (says(why, not_tls) && c->state == CMG_CONN_HANDSHAKE) {
        snprintf(out, len, "expected TLS from a gateway's tunnel port, found a peer that does not "
                 "speak TLS (plain HTTP?) (%s)", why);
    } else {
        snprintf(out, len, "%s", why);
    }
}

static void on_error(struct cmg_conn *c, const char *why)
{
    char msg[1600];

    explain(c->owner, c, why, msg, sizeof(msg));
    tunnel_down(c->owner, msg);
}

static const struct cmg_conn_ops tunnel_ops = {on_open, on_read, on_drain, on_error};

static void on_retry(struct cmg_timer *tm) { dial(TUNNEL_OF(tm, retry_timer)); }

static void release(struct cmg_cn_tunnel *t)
{
    struct cmg_loop *loop = t->cn->loop;
    while (t->streams) {
        if (t->streams->id != t->ctl_stream && cmg_cn_draining(t->cn))
            cmg_cn_drain_stream_ended(t->cn, CMG_CN_DRAIN_RESET);   /* lost with the tunnel */
        stream_free(t->streams);
    }
    cmg_timer_stop(loop, &t->hs_timer);
    cmg_timer_stop(loop, &t->ping_timer);
    cmg_timer_stop(loop, &t->pong_timer);
    cmg_task_cancel(loop, &t->send_task);
    if (t->h2)
        nghttp2_session_del(t->h2);
    t->h2 = NULL;
    cmg_conn_close(&t->conn);
    cmg_buf_free(&t->ctl_out);
    t->ctl_stream = -1;
    t->notify_synced = false;
    t->ping_sent_us = t->rtt_us = 0;
    t->active = t->up = t->drain_heard = false;
    t->closing = t->close_notify_sent = t->half_closed = false;
}

static void tunnel_down(struct cmg_cn_tunnel *t, const char *why)
{
    uint32_t delay;
    unsigned char r[4];

    if (!t->active)
        return;
    if (cmg_cn_draining(t->cn)) {   /* no tunnel is dialled again */
        if (t->up)
            cmg_info("tunnel closed: gateway=%s (draining: %s)", t->target, why);
        release(t);
        cmg_cn_drain_check(t->cn);
        return;
    }
    if (t->up) {
        cmg_warn("tunnel down: gateway=%s reason=\"%s\"", t->target, why);
        t->since = (int64_t)time(NULL);
    }
    else if (t->failures++ == 0)
        cmg_warn("cannot reach gateway %s: %s (retrying)", t->target, why);
    else
        cmg_debug("cannot reach gateway %s: %s", t->target, why);
    release(t);
    /* Exponential back-off with jitter, so that connectors do not return in step. */
    RAND_bytes(r, sizeof(r));
    delay = t->backoff_ms / 2 + (uint32_t)(((uint64_t)(r[0] | r[1] << 8 | r[2] << 16) *
                                             (t->backoff_ms / 2 + 1)) >> 24);
    t->backoff_ms = t->backoff_ms * 2 > t->cn->cfg.reconnect_max_ms ? t->cn->cfg.reconnect_max_ms
                                                                    : t->backoff_ms * 2;
    if (t->backoff_ms < BACKOFF_MIN_MS)
        t->backoff_ms = BACKOFF_MIN_MS;
    cmg_timer_start(t->cn->loop, &t->retry_timer, delay, on_retry);
}

static void dial(struct cmg_cn_tunnel *t)
{
    struct cmg_connector *cn = t->cn;
    SSL *ssl;
    int fd;

    t->active = true;
    t->ctl_stream = -1;
    fd = cmg_net_connect(&t->addr);
    if (fd < 0) {
        memset(&t->conn, 0, sizeof(t->conn));
        t->conn.io.fd = -1;
        tunnel_down(t, "cannot create a socket");
        return;
    }
    ssl = SSL_new(cn->tunnel_ctx);
    if (!ssl) {
        close(fd);
        tunnel_down(t, "out of memory");
        return;
    }
    SSL_set_connect_state(ssl);
    SSL_set_tlsext_host_name(ssl, cn->cfg.server_name);
    SSL_set1_host(ssl, cn->cfg.server_name);   /* the gateway's certificate must name it */
    if (cmg_conn_start(&t->conn, cn->loop, fd, ssl, true, &tunnel_ops, t) < 0) {
        tunnel_down(t, "cannot watch the socket");
        return;
    }
    cmg_timer_start(cn->loop, &t->hs_timer, 10000, on_hs_timeout);
}

void cmg_cn_tunnel_start(struct cmg_connector *cn, struct cmg_cn_tunnel *t)
{
    t->cn = cn;
    t->backoff_ms = BACKOFF_MIN_MS;
    t->conn.io.fd = -1;
    dial(t);
}

void cmg_cn_tunnel_drain(struct cmg_cn_tunnel *t)
{
    if (!t->up) {   /* being dialled, or waiting to be: the gateway has nothing on it */
        cmg_cn_tunnel_stop(t);
        return;
    }
    if (t->ctl_stream >= 0) {
        queue_line(t, "{\"type\":\"draining\"}");
        nghttp2_session_resume_data(t->h2, t->ctl_stream);
    }
    /* GOAWAY with the largest stream id (RFC 9113, 6.8), then a PING: once it is
     * answered, every request the gateway sent before it saw the GOAWAY is here. */
    nghttp2_submit_shutdown_notice(t->h2);
    nghttp2_submit_ping(t->h2, NGHTTP2_FLAG_NONE, drain_ping);
    cmg_cn_tunnel_kick(t);
}

bool cmg_cn_tunnel_drained(const struct cmg_cn_tunnel *t)
{
    return !t->active || (t->drain_heard && cmg_cn_tunnel_requests(t) == 0);
}

unsigned cmg_cn_tunnel_requests(const struct cmg_cn_tunnel *t)
{
    unsigned n = 0;
    for (const struct cmg_cn_stream *st = t->streams; st; st = st->next)
        n += st->id != t->ctl_stream && !st->report && !st->notify_report;   /* a report holds no drain up */
    return n;
}

unsigned cmg_cn_tunnel_close(struct cmg_cn_tunnel *t)
{
    unsigned cut = 0;

    if (!t->up || !t->h2) {
        cmg_cn_tunnel_stop(t);
        return 0;
    }
    for (const struct cmg_cn_stream *st = t->streams; st; st = st->next) {
        if (st->id == t->ctl_stream || st->refused || st->report || st->notify_report)
            continue;
        cut++;
        cmg_warn("drain_timeout: cut %s %s (gateway=%s, response %s)", st->method,
                 st->path ? st->path : "-", t->target,
                 st->resp_submitted ? "under way" : "not begun");
    }
    /* The last GOAWAY names the last stream we took; the session ends once it is sent
     * (what else was queued is dropped), and the gateway fails (or retries) what it
     * still waited for when the connection closes. */
    nghttp2_session_terminate_session(t->h2, NGHTTP2_NO_ERROR);
    t->closing = true;
    cmg_cn_tunnel_kick(t);
    return cut;
}

/* The session is over and written: close_notify, then FIN, and wait for the gateway
 * to close (the drain's close_timer bounds the wait). */
static void half_close(struct cmg_cn_tunnel *t)
{
    if (t->half_closed)
        return;
    if (!t->close_notify_sent) {
        t->close_notify_sent = true;
        ERR_clear_error();
        SSL_shutdown(t->conn.ssl);   /* queued with the connection's output */
        ERR_clear_error();
        cmg_conn_flush(&t->conn);
        if (cmg_conn_pending(&t->conn))
            return;                  /* on_drain comes back here */
    }
    t->half_closed = true;
    shutdown(t->conn.io.fd, SHUT_WR);
    cmg_conn_want_read(&t->conn, true);
}

void cmg_cn_tunnel_stop(struct cmg_cn_tunnel *t)
{
    cmg_timer_stop(t->cn->loop, &t->retry_timer);
    if (t->active)
        release(t);
}
