/* Tunnels, gateway side. The connector dialled us and showed a certificate of the
 * site CA; over that TLS connection we are the HTTP/2 *client*: each device
 * request becomes a stream that we open. A control stream, opened first,
 * carries the connector's hello (its name and roles). */
#include "core/log.h"
#include "http/h2.h"
#include "gateway/gw.h"
#include "gateway/notify.h"
#include "tls/tls.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONTROL_LINE (CMG_POLICY_MAX + 65536)   /* a policy is one line */
#define MAX_RESPONSE_HEADERS (64 * 1024)

#define TUNNEL_OF(p, field) ((struct cmg_tunnel *)((char *)(p) - offsetof(struct cmg_tunnel, field)))

static void tunnel_fail(struct cmg_tunnel *t, const char *why);
static void watch_stall(struct cmg_tunnel *t);
static bool outstanding(const struct cmg_tunnel *t);

/* Inside nghttp2's callbacks the session must not be deleted: note why the
 * tunnel must go, and let the callback fail the session call that runs it. */
static int fail_later(struct cmg_tunnel *t, const char *why)
{
    if (!t->failure)
        t->failure = why;
    return NGHTTP2_ERR_CALLBACK_FAILURE;
}

static void free_roles(struct cmg_tunnel *t)
{
    for (size_t i = 0; i < t->nroles; i++)
        free(t->roles[i]);
    free(t->roles);
    t->roles = NULL;
    t->nroles = 0;
}

static void tunnel_free(void *p)
{
    struct cmg_tunnel *t = p;
    cmg_gw_report_tunnel_gone(t);
    free_roles(t);
    cmg_buf_free(&t->ctl_in);
    free(t);
}

/* ---- sending ---- */

static void tunnel_send(struct cmg_tunnel *t)
{
    if (t->dead)
        return;
    int rc = cmg_h2_send(t->h2, &t->conn);
    if (rc < 0) {
        tunnel_fail(t, t->failure ? t->failure : nghttp2_strerror(rc));
        return;
    }
    if (cmg_h2_finished(t->h2, &t->conn))
        tunnel_fail(t, "session ended");
}

static void on_send_task(struct cmg_task *task) { tunnel_send(TUNNEL_OF(task, send_task)); }

void cmg_tunnel_kick(struct cmg_tunnel *t)
{
    if (!t->dead)
        cmg_task_post(t->gw->loop, &t->send_task, on_send_task);
}

/* ---- the control stream ---- */

static bool serves(const struct cmg_tunnel *t, const char *role)
{
    for (size_t i = 0; i < t->nroles; i++)
        if (!strcmp(t->roles[i], role))
            return true;
    return false;
}

/* The roles a connector serves; which of them are published is the policy's call,
 * made per request, so a mapping added later finds its connectors. */
static int set_roles(struct cmg_tunnel *t, const cJSON *roles)
{
    const cJSON *r;
    size_t n = 0;

    free_roles(t);
    cJSON_ArrayForEach(r, roles) n++;
    if (n > CMG_TUNNEL_MAX_ROLES)
        n = CMG_TUNNEL_MAX_ROLES;
    if (!(t->roles = calloc(n ? n : 1, sizeof(*t->roles))))
        return -1;
    cJSON_ArrayForEach(r, roles) {
        const cJSON *id = cJSON_IsObject(r) ? cJSON_GetObjectItemCaseSensitive(r, "role") : r;
        if (t->nroles == n)
            break;
        if (!cJSON_IsString(id) || strlen(id->valuestring) > CMG_ROLE_ID_MAX)
            continue;
        if (!(t->roles[t->nroles] = strdup(id->valuestring)))
            return -1;
        t->nroles++;
    }
    return 0;
}

/* The certificate serial says which of a connector's certificates (after a renewal) it
 * dialled with. */
static void tunnel_up_log(struct cmg_tunnel *t)
{
    X509 *cert = t->conn.ssl ? SSL_get0_peer_certificate(t->conn.ssl) : NULL;
    char serial[80] = "?";

    if (cert)
        cmg_tls_serial(cert, serial, sizeof(serial));
    cmg_info("tunnel up: connector=%s peer=%s roles=%zu serial=%s", t->name, t->conn.peer,
             t->nroles, serial);
    t->gw->metrics.tunnels_up++;
}

static void on_hello(struct cmg_tunnel *t, cJSON *msg)
{
    cJSON *name = cJSON_GetObjectItemCaseSensitive(msg, "name");
    cJSON *roles = cJSON_GetObjectItemCaseSensitive(msg, "roles");

    if (cJSON_IsString(name)) {
        size_t j = 0;
        for (const char *s = name->valuestring; *s && j < sizeof(t->name) - 1; s++)
            if ((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
                (*s >= '0' && *s <= '9') || *s == '-' || *s == '_' || *s == '.')
                t->name[j++] = *s;
        t->name[j] = 0;
    }
    if (!t->name[0])
        snprintf(t->name, sizeof(t->name), "%s", t->conn.peer);
    if (set_roles(t, roles) < 0) {
        fail_later(t, "out of memory");
        return;
    }
    t->ready = true;
    t->since = (int64_t)time(NULL);
    cmg_timer_stop(t->gw->loop, &t->hs_timer);
    tunnel_up_log(t);
    cmg_gw_ready_news(t->gw);
    cmg_gw_report_news(t->gw);
}

/* The connector drains (its control message, or HTTP/2's graceful GOAWAY, whichever
 * comes first): it is picked for no new request from now on; those in flight finish. */
static void connector_draining(struct cmg_tunnel *t)
{
    size_t n = 0;

    if (t->draining)
        return;
    t->draining = true;
    t->ready = false;
    t->since = (int64_t)time(NULL);
    cmg_gw_report_news(t->gw);
    for (const struct cmg_exchange *ex = t->exchanges; ex; ex = ex->tun_next)
        n++;
    cmg_info("connector=%s draining: no new requests; %zu in flight",
             t->name[0] ? t->name : t->conn.peer, n);
}

static void on_control_line(struct cmg_tunnel *t, const char *line, size_t len)
{
    cJSON *msg = cJSON_ParseWithLength(line, len);
    cJSON *type = cJSON_GetObjectItemCaseSensitive(msg, "type");

    if (!cJSON_IsString(type))
        cmg_warn("tunnel %s: unreadable control message", t->conn.peer);
    else if (!strcmp(type->valuestring, "hello") && !t->ready && !t->draining)
        on_hello(t, msg);
    else if (!strcmp(type->valuestring, "draining"))
        connector_draining(t);
    else if (!strcmp(type->valuestring, "roles") && t->ready) {
        if (set_roles(t, cJSON_GetObjectItemCaseSensitive(msg, "roles")) < 0)
            fail_later(t, "out of memory");
        else
            cmg_info("tunnel %s: connector=%s now serves %zu role(s)", t->conn.peer, t->name,
                     t->nroles);
    } else if (t->ready && cmg_notify_control(t->gw, type->valuestring, msg, t->name)) {
        /* notify-sync, notify: the notification hub's */
    } else if (!strcmp(type->valuestring, "policy") && t->ready) {
        const cJSON *jws = cJSON_GetObjectItemCaseSensitive(msg, "jws");
        if (cJSON_IsString(jws))
            cmg_gw_policy_offer(t->gw, jws->valuestring, strlen(jws->valuestring), t->name);
    }
    else
        cmg_debug("tunnel %s: control message '%s' ignored", t->conn.peer, type->valuestring);
    cJSON_Delete(msg);
}

static void on_control_data(struct cmg_tunnel *t, const uint8_t *data, size_t len)
{
    char *nl;
    if (cmg_buf_append(&t->ctl_in, data, len) < 0) {
        fail_later(t, "out of memory");
        return;
    }
    while (!t->failure && (nl = memchr(cmg_buf_head(&t->ctl_in), '\n', t->ctl_in.len))) {
        size_t n = (size_t)(nl - cmg_buf_head(&t->ctl_in));
        on_control_line(t, cmg_buf_head(&t->ctl_in), n);
        cmg_buf_consume(&t->ctl_in, n + 1);
    }
    if (t->ctl_in.len > MAX_CONTROL_LINE)
        fail_later(t, "control message too long");
}

/* ---- reports up the tunnel ---- */

void cmg_tunnel_report_unknown_kid(struct cmg_gateway *gw, const char *kid)
{
    uint64_t now = cmg_loop_now(gw->loop);
    nghttp2_nv nv[] = {
        {(uint8_t *)":method", (uint8_t *)"GET", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":scheme", (uint8_t *)"https", 7, 5, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":authority", (uint8_t *)"tunnel", 10, 6, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":path", (uint8_t *)CMG_UNKNOWN_KID_PATH, 5,
         sizeof(CMG_UNKNOWN_KID_PATH) - 1, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"cmg-kid", (uint8_t *)kid, 7, strlen(kid), NGHTTP2_NV_FLAG_NONE},
    };
    int n = 0;

    if (!cmg_jwk_kid_plain(kid) || (gw->kid_reported_ms && now - gw->kid_reported_ms < CMG_UNKNOWN_KID_GAP_MS))
        return;
    for (struct cmg_tunnel *t = gw->tunnels; t; t = t->next) {
        if (!t->ready || t->dead || !t->h2 ||
            nghttp2_submit_request(t->h2, NULL, nv, 5, NULL, NULL) < 0)
            continue;
        cmg_tunnel_kick(t);
        n++;
    }
    if (n > 0) {
        gw->kid_reported_ms = now;
        cmg_info("OIDC token signed with key id %s, which the policy lacks: reported to the "
                 "site through %d tunnel(s)", kid, n);
    }
}

/* ---- nghttp2 callbacks ---- */

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user)
{
    struct cmg_exchange *ex = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (!ex && frame->hd.type == NGHTTP2_HEADERS && namelen == 7 && !memcmp(name, ":status", 7)) {
        int st = 0;
        for (size_t i = 0; i < valuelen && i < 3; i++)
            st = st * 10 + (value[i] - '0');
        cmg_notify_report_status(user, frame->hd.stream_id, st);
    }
    if (!ex || frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    if (namelen == 7 && !memcmp(name, ":status", 7)) {
        int st = 0;
        for (size_t i = 0; i < valuelen && i < 3; i++)
            st = st * 10 + (value[i] - '0');
        ex->status = st;
        return 0;
    }
    if (namelen && name[0] == ':')
        return 0;
    if (ex->resp.arena.len + namelen + valuelen > MAX_RESPONSE_HEADERS)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    if (cmg_headers_add(&ex->resp, (const char *)name, namelen, (const char *)value, valuelen) < 0)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
    struct cmg_tunnel *t = user;
    struct cmg_exchange *ex;

    t->heard_ms = cmg_loop_now(t->gw->loop);
    switch (frame->hd.type) {
    case NGHTTP2_PING:
        if (frame->hd.flags & NGHTTP2_FLAG_ACK) {
            cmg_timer_stop(t->gw->loop, &t->pong_timer);
            if (t->ping_sent_us)   /* the round trip, for the metrics */
                t->rtt_us = cmg_metrics_now_us() - t->ping_sent_us;
            t->ping_sent_us = 0;
        }
        return 0;
    case NGHTTP2_GOAWAY:
        if (frame->goaway.error_code == NGHTTP2_NO_ERROR) {
            connector_draining(t);   /* no new streams; those in flight finish */
            return 0;
        }
        cmg_info("tunnel %s: connector is going away (%s%s%.*s)", t->name[0] ? t->name : t->conn.peer,
                 nghttp2_http2_strerror(frame->goaway.error_code),
                 frame->goaway.opaque_data_len ? ": " : "", (int)frame->goaway.opaque_data_len,
                 frame->goaway.opaque_data ? (const char *)frame->goaway.opaque_data : "");
        t->ready = false;   /* no new streams; those in flight finish */
        return 0;
    case NGHTTP2_HEADERS:
    case NGHTTP2_DATA:
        break;
    default:
        return 0;
    }
    ex = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (!ex)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && !ex->resp_headers &&
        ex->status >= 100 && ex->status < 200) {   /* informational: wait for the final */
        cmg_headers_reset(&ex->resp);
        return 0;
    }
    /* The end is marked first, and the device side told once: it may be done
     * with (and free) the exchange when the call returns. */
    if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
        ex->resp_eof = true;
    if (!ex->dev)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && !ex->resp_headers)
        ex->resp_headers = true;
    if (ex->resp_eof && ex->resp_headers)
        cmg_exchange_resp_news(ex);
    return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t stream_id,
                         const uint8_t *data, size_t len, void *user)
{
    struct cmg_tunnel *t = user;
    struct cmg_exchange *ex = nghttp2_session_get_stream_user_data(s, stream_id);

    t->heard_ms = cmg_loop_now(t->gw->loop);   /* a large frame is heard as it comes */
    if (stream_id == t->ctl_stream) {
        nghttp2_session_consume(s, stream_id, len);
        on_control_data(t, data, len);
        return t->failure ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
    }
    if (!ex || !ex->dev) {
        nghttp2_session_consume(s, stream_id, len);
        return 0;
    }
    /* Buffered until the device takes it; the stream window bounds how much. */
    if (cmg_exchange_resp_data(ex, data, len) < 0)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t stream_id, uint32_t error_code, void *user)
{
    struct cmg_tunnel *t = user;
    struct cmg_exchange *ex = nghttp2_session_get_stream_user_data(s, stream_id);

    if (stream_id == t->ctl_stream)
        return fail_later(t, "control stream closed");
    if (cmg_gw_report_stream_closed(t, stream_id) ||
        cmg_notify_report_closed_stream(t, stream_id, error_code) || !ex)
        return 0;
    ex->stream_closed = true;
    if (error_code == NGHTTP2_NO_ERROR && ex->resp_eof)
        return 0;   /* complete; stays attached while the device drains it */
    cmg_exchange_unlink(ex);
    /* REFUSED_STREAM: the connector did not start it (it drains, or the stream was past
     * its GOAWAY): nothing reached the internal service, so another tunnel may take it. */
    if (error_code == NGHTTP2_REFUSED_STREAM && cmg_exchange_retry(ex, t->name, true))
        return 0;
    if (ex->dev)
        ex->dev_ops->on_fail(ex, 502, error_code == NGHTTP2_NO_ERROR
                                          ? "response ended early"
                                          : nghttp2_http2_strerror(error_code));
    else
        cmg_exchange_free(ex);
    return 0;
}

/* A retried request sends again first what its earlier stream took. */
static bool replaying(const struct cmg_exchange *ex)
{
    return ex->retried && ex->req_sent.len;
}

static ssize_t read_request_body(nghttp2_session *s, int32_t stream_id, uint8_t *buf,
                                 size_t length, uint32_t *flags, nghttp2_data_source *src,
                                 void *user)
{
    /* Not src->ptr: an exchange that the device abandoned is gone, and its
     * stream's user data says so, while a reset is still on its way out. */
    struct cmg_exchange *ex = nghttp2_session_get_stream_user_data(s, stream_id);

    if (!ex)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    if (replaying(ex))
        return cmg_h2_offer(&ex->req_sent, ex->req_eof && !ex->req_body.len, length, flags);
    return cmg_h2_offer(&ex->req_body, ex->req_eof, length, flags);
}

static int send_request_body(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd,
                             size_t length, nghttp2_data_source *src, void *user)
{
    struct cmg_tunnel *t = user;
    struct cmg_exchange *ex = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    int rc;

    if (!ex)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    if (replaying(ex)) {   /* the device was given room for these bytes once already */
        rc = cmg_h2_put_data(&t->conn, frame, framehd, length, &ex->req_sent);
        if (rc == 0)
            cmg_exchange_req_replayed(ex);
        return rc;
    }
    if (length <= ex->req_body.len)
        cmg_exchange_req_keep(ex, cmg_buf_head(&ex->req_body), length);
    rc = cmg_h2_put_data(&t->conn, frame, framehd, length, &ex->req_body);
    if (rc == 0)
        cmg_exchange_req_taken(ex, length);
    else   /* the bytes are both kept and still to send: a replay would send them twice */
        cmg_exchange_req_unkeep(ex);
    return rc;
}

/* ---- streams ---- */

int cmg_tunnel_submit(struct cmg_tunnel *t, struct cmg_exchange *ex)
{
    nghttp2_nv *nv = calloc(ex->req.n + 4, sizeof(*nv));
    nghttp2_data_provider dp = {.read_callback = read_request_body};
    const char *sn = t->gw->cfg.service_name;
    size_t k = 0;
    int32_t id;

    if (!nv)
        return -1;
#define NV(n, nl, v, vl) nv[k++] = (nghttp2_nv){(uint8_t *)(n), (uint8_t *)(v), (nl), (vl), NGHTTP2_NV_FLAG_NONE}
    NV(":method", 7, ex->method, strlen(ex->method));
    NV(":scheme", 7, "https", 5);
    NV(":authority", 10, sn, strlen(sn));
    NV(":path", 5, ex->target, strlen(ex->target));
    for (uint32_t i = 0; i < ex->req.n; i++)
        NV(cmg_headers_name(&ex->req, i), ex->req.v[i].name_len, cmg_headers_value(&ex->req, i),
           ex->req.v[i].value_len);
#undef NV
    id = nghttp2_submit_request(t->h2, NULL, nv, k, ex->req_body_expected ? &dp : NULL, ex);
    free(nv);
    if (id < 0) {
        cmg_warn("tunnel %s: cannot open a stream: %s", t->name, nghttp2_strerror(id));
        return -1;
    }
    ex->stream_id = id;
    ex->tun = t;
    snprintf(ex->connector, sizeof(ex->connector), "%s", t->name);
    if (!t->exchanges)   /* after a quiet spell, silence counts from this request */
        t->heard_ms = cmg_loop_now(t->gw->loop);
    watch_stall(t);
    ex->tun_prev = NULL;
    ex->tun_next = t->exchanges;
    if (t->exchanges)
        t->exchanges->tun_prev = ex;
    t->exchanges = ex;
    cmg_tunnel_kick(t);
    return 0;
}

struct cmg_tunnel *cmg_tunnel_pick(struct cmg_gateway *gw, struct cmg_policy_mapping *m)
{
    size_t n = 0, k;
    struct cmg_tunnel *t;

    for (t = gw->tunnels; t; t = t->next)
        if (t->ready && !t->dead && serves(t, m->role))
            n++;
    if (n == 0)
        return NULL;
    k = m->rr++ % n;
    for (t = gw->tunnels; t; t = t->next)
        if (t->ready && !t->dead && serves(t, m->role) && k-- == 0)
            return t;
    return NULL;
}

size_t cmg_tunnel_serving(struct cmg_gateway *gw, const struct cmg_policy_mapping *m)
{
    size_t n = 0;

    for (struct cmg_tunnel *t = gw->tunnels; t; t = t->next)
        if (t->ready && !t->dead && serves(t, m->role))
            n++;
    return n;
}

/* ---- life and death ---- */

static struct cmg_log_limit failed_handshakes = {.what = "failed tunnel handshakes"};

static void tunnel_fail(struct cmg_tunnel *t, const char *why)
{
    struct cmg_gateway *gw = t->gw;
    struct cmg_exchange *ex, *next;

    if (t->dead)
        return;
    t->dead = true;
    cmg_gw_handshake_over(gw, t);
    if (t->draining)
        cmg_log(outstanding(t) ? CMG_LOG_WARN : CMG_LOG_INFO,
                "tunnel down: connector=%s peer=%s reason=\"%s\" (it was draining: %s)", t->name,
                t->conn.peer, why, outstanding(t) ? "requests still in flight are cut" : "nothing cut");
    else if (t->ready || t->name[0])
        cmg_warn("tunnel down: connector=%s peer=%s reason=\"%s\"", t->name, t->conn.peer, why);
    else   /* anyone can cause this line: rate-limited */
        cmg_log_limited(&failed_handshakes, CMG_LOG_INFO, "tunnel from %s refused or failed: %s",
                        t->conn.peer, why);
    if (t->prev)
        t->prev->next = t->next;
    else
        gw->tunnels = t->next;
    if (t->next)
        t->next->prev = t->prev;
    if (t->ready || t->draining)
        cmg_gw_report_news(gw);
    cmg_notify_report_tunnel_gone(t);
    /* Requests in flight fail now, with 502, rather than wait for a timeout. */
    for (ex = t->exchanges; ex; ex = next) {
        next = ex->tun_next;
        ex->tun = NULL;
        ex->stream_closed = true;
        if (ex->resp_eof || cmg_exchange_retry(ex, t->name, false))
            continue;
        if (ex->dev)
            ex->dev_ops->on_fail(ex, 502, "tunnel lost");
        else
            cmg_exchange_free(ex);
    }
    t->exchanges = NULL;
    cmg_timer_stop(gw->loop, &t->hs_timer);
    cmg_timer_stop(gw->loop, &t->ping_timer);
    cmg_timer_stop(gw->loop, &t->pong_timer);
    cmg_timer_stop(gw->loop, &t->stall_timer);
    cmg_task_cancel(gw->loop, &t->send_task);
    if (t->h2)
        nghttp2_session_del(t->h2);
    t->h2 = NULL;
    cmg_conn_close(&t->conn);
    cmg_loop_free_later(gw->loop, t, tunnel_free);
}

static void on_hs_timeout(struct cmg_timer *tm)
{
    tunnel_fail(TUNNEL_OF(tm, hs_timer), "no hello from the connector in time");
}

static void on_pong_timeout(struct cmg_timer *tm)
{
    tunnel_fail(TUNNEL_OF(tm, pong_timer), "no answer to the health ping");
}

/* A PING, answered within ping_timeout or the tunnel is dead. */
static void send_ping(struct cmg_tunnel *t)
{
    nghttp2_submit_ping(t->h2, NGHTTP2_FLAG_NONE, NULL);
    if (!t->ping_sent_us)
        t->ping_sent_us = cmg_metrics_now_us();
    cmg_tunnel_kick(t);
    if (!cmg_timer_armed(&t->pong_timer))
        cmg_timer_start(t->gw->loop, &t->pong_timer, t->gw->cfg.ping_timeout_ms, on_pong_timeout);
}

static void on_ping_timer(struct cmg_timer *tm)
{
    struct cmg_tunnel *t = TUNNEL_OF(tm, ping_timer);
    send_ping(t);
    cmg_timer_start(t->gw->loop, &t->ping_timer, t->gw->cfg.ping_interval_ms, on_ping_timer);
}

/* Requests still waiting for (more of) their response; one that is complete and
 * only waits for its device to drain it expects nothing more from the connector. */
static bool outstanding(const struct cmg_tunnel *t)
{
    for (const struct cmg_exchange *ex = t->exchanges; ex; ex = ex->tun_next)
        if (!ex->resp_eof)
            return true;
    return false;
}

/* stall_timeout: a tunnel that goes silent while requests wait on it is asked at
 * once, rather than at the next ping_interval, so a frozen connector is found dead
 * in stall_timeout + ping_timeout and its requests go elsewhere. */
static void on_stall_timer(struct cmg_timer *tm)
{
    struct cmg_tunnel *t = TUNNEL_OF(tm, stall_timer);
    uint64_t limit = t->gw->cfg.stall_timeout_ms;
    uint64_t quiet = cmg_loop_now(t->gw->loop) - t->heard_ms;

    if (!limit || !outstanding(t))
        return;   /* armed again by the next request */
    if (quiet < limit) {
        cmg_timer_start(t->gw->loop, &t->stall_timer, limit - quiet, on_stall_timer);
        return;
    }
    if (!cmg_timer_armed(&t->pong_timer)) {
        cmg_debug("tunnel %s: connector=%s silent for %llu ms with requests outstanding: ping",
                  t->conn.peer, t->name, (unsigned long long)quiet);
        send_ping(t);
    }
    cmg_timer_start(t->gw->loop, &t->stall_timer, limit, on_stall_timer);
}

static void watch_stall(struct cmg_tunnel *t)
{
    uint32_t limit = t->gw->cfg.stall_timeout_ms;
    if (limit && !cmg_timer_armed(&t->stall_timer))
        cmg_timer_start(t->gw->loop, &t->stall_timer, limit, on_stall_timer);
}

static int start_session(struct cmg_tunnel *t)
{
    nghttp2_session_callbacks *cb;
    nghttp2_option *opt;
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, CMG_TUNNEL_STREAM_WINDOW},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, CMG_H2_MAX_FRAME},
    };
    nghttp2_nv nv[] = {
        {(uint8_t *)":method", (uint8_t *)"GET", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":scheme", (uint8_t *)"https", 7, 5, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":authority", (uint8_t *)"tunnel", 10, 6, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":path", (uint8_t *)CMG_CONTROL_PATH, 5, sizeof(CMG_CONTROL_PATH) - 1,
         NGHTTP2_NV_FLAG_NONE},
    };
    int rc;

    if (nghttp2_session_callbacks_new(&cb) != 0)
        return -1;
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_session_callbacks_set_send_data_callback(cb, send_request_body);
    cmg_h2_large_frames(cb);
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cb);
        return -1;
    }
    /* Windows are opened by hand (exchange.c): a stream's as its device takes the
     * data, the connection's as the data is buffered, both within the buffer budget.
     * A slow device stalls its own stream, never the tunnel. */
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_peer_max_concurrent_streams(opt, 100);
    rc = nghttp2_session_client_new2(&t->h2, cb, t, opt);
    nghttp2_session_callbacks_del(cb);
    nghttp2_option_del(opt);
    if (rc != 0)
        return -1;
    nghttp2_submit_settings(t->h2, NGHTTP2_FLAG_NONE, settings, sizeof(settings) / sizeof(settings[0]));
    nghttp2_session_set_local_window_size(t->h2, NGHTTP2_FLAG_NONE, 0, CMG_GW_TUNNEL_WINDOW);
    t->ctl_stream = nghttp2_submit_request(t->h2, NULL, nv, 4, NULL, NULL);
    return t->ctl_stream < 0 ? -1 : 0;
}

static void on_open(struct cmg_conn *c)
{
    struct cmg_tunnel *t = c->owner;

    if (!cmg_tls_alpn_is(c->ssl, CMG_TUNNEL_ALPN)) {
        tunnel_fail(t, "the peer did not ask for the tunnel protocol (ALPN " CMG_TUNNEL_ALPN ")");
        return;
    }
    cmg_gw_handshake_over(t->gw, t);
    if (start_session(t) < 0) {
        tunnel_fail(t, "cannot start HTTP/2");
        return;
    }
    cmg_timer_start(t->gw->loop, &t->ping_timer, t->gw->cfg.ping_interval_ms, on_ping_timer);
    cmg_conn_want_read(c, true);
    tunnel_send(t);
}

static void on_read(struct cmg_conn *c)
{
    struct cmg_tunnel *t = c->owner;
    int rc = cmg_h2_read(t->h2, c, &t->dead);

    if (t->dead)
        return;
    if (rc == CMG_H2_EOF) {
        tunnel_fail(t, "connection closed by the connector");
        return;
    }
    if (rc < 0) {
        tunnel_fail(t, t->failure ? t->failure : nghttp2_strerror(rc));
        return;
    }
    tunnel_send(t);
}

static void on_drain(struct cmg_conn *c) { tunnel_send(c->owner); }

static void on_error(struct cmg_conn *c, const char *why) { tunnel_fail(c->owner, why); }

static const struct cmg_conn_ops tunnel_ops = {on_open, on_read, on_drain, on_error};

/* The connector certificate's serial is revoked by the policy in force. */
static bool connector_revoked(const struct cmg_gateway *gw, X509 *x, char *name, size_t namelen,
                              char *serial, size_t seriallen)
{
    cmg_tls_serial(x, serial, seriallen);
    cmg_tls_subject_entry(x, NID_commonName, name, namelen);
    return cmg_policy_connector_revoked(gw->policy, serial);
}

/* During the handshake, after the chain verified (site CA, OpenCMG's connector
 * usage: the TLS context requires both): a connector the site revoked is refused. */
static int check_connector(void *arg, X509 *leaf)
{
    struct cmg_tunnel *t = arg;
    char name[128], serial[80], msg[400], subject[256], issuer[256];

    if (!connector_revoked(t->gw, leaf, name, sizeof(name), serial, sizeof(serial)))
        return X509_V_OK;
    snprintf(msg, sizeof(msg), "tunnel handshake from %s refused: connector %s (certificate "
             "serial %s) is revoked by the site", t->conn.peer, name[0] ? name : "?", serial);
    cmg_tls_subject(leaf, subject, sizeof(subject));
    cmg_tls_issuer(leaf, issuer, sizeof(issuer));
    {
        const struct cmg_log_field f[] = {
            CMG_F_STR("peer", t->conn.peer), CMG_F_STR("subject", subject),
            CMG_F_STR("issuer", issuer), CMG_F_STR("serial", serial),
            CMG_F_STR("verify_error", X509_verify_cert_error_string(X509_V_ERR_CERT_REVOKED))};
        cmg_log_kv(CMG_LOG_WARN, msg, f, CMG_LOG_NFIELDS(f));
    }
    return X509_V_ERR_CERT_REVOKED;
}

void cmg_tunnel_close_revoked(struct cmg_gateway *gw)
{
    char name[128], serial[80];

    for (struct cmg_tunnel *t = gw->tunnels; t; t = t->next) {
        X509 *x = t->dead || !t->conn.ssl ? NULL : SSL_get0_peer_certificate(t->conn.ssl);
        if (x && connector_revoked(gw, x, name, sizeof(name), serial, sizeof(serial)))
            /* from the loop: this may run inside a tunnel's own callbacks */
            cmg_conn_fail(&t->conn, "connector %s (certificate serial %s) revoked by the site",
                          name[0] ? name : "?", serial);
    }
}

int cmg_tunnel_accept(struct cmg_gateway *gw, int fd, const struct cmg_addr_key *src)
{
    struct cmg_tunnel *t = calloc(1, sizeof(*t));
    SSL *ssl = t ? SSL_new(gw->tunnel_ctx) : NULL;

    if (!ssl || cmg_tls_set_leaf_check(ssl, check_connector, t) < 0) {
        SSL_free(ssl);
        free(t);
        close(fd);
        return -1;
    }
    t->gw = gw;
    t->ctl_stream = -1;
    t->report_stream = -1;
    SSL_set_accept_state(ssl);
    if (cmg_conn_start(&t->conn, gw->loop, fd, ssl, false, &tunnel_ops, t) < 0) {
        free(t);
        return -1;
    }
    t->src = *src;
    t->handshaking = true;   /* the caller counted it: cmg_gw_handshake_over() uncounts */
    t->next = gw->tunnels;
    if (gw->tunnels)
        gw->tunnels->prev = t;
    gw->tunnels = t;
    cmg_timer_start(gw->loop, &t->hs_timer, gw->cfg.handshake_timeout_ms, on_hs_timeout);
    return 0;
}

void cmg_tunnel_close_all(struct cmg_gateway *gw)
{
    while (gw->tunnels)
        tunnel_fail(gw->tunnels, "gateway stopping");
}
