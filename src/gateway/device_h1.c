/* HTTP/1.1 from devices: llhttp parses, with our own checks for what it lets
 * through (obs-fold, space before colon, a second Host); one request at a time,
 * pipelined input held until the response before it is done.
 *
 * Deadlines: from the handshake until the first byte of a request, and between
 * requests, the connection idles (header_timeout before the first request,
 * idle_timeout after one); the first byte of a request (a leading CR/LF counts)
 * starts header_timeout for its head, which nothing extends; a request body must
 * make progress within idle_timeout. A refused request is answered, then what the
 * device still sends is read and dropped for a bounded time and number of bytes
 * before the connection closes, so that the answer is not lost to a reset. */
#include "core/log.h"
#include "gateway/gw.h"
#include "gateway/notify.h"
#include "http/h1_head.h"
#include "http/status.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#define READ_CHUNK 16384
#define MAX_HEADERS 100
/* After the last answer: how long the device's input is dropped. */
#define LINGER_MS 2000
/* What a notification channel's device may send once it is open (nothing is expected). */
#define CHANNEL_INPUT_MAX 4096
/* Requests one connection may begin per loop round: a pipelined burst of requests
 * answered here (refusals) costs far more than its bytes, which cmg_conn_read counts. */
#define REQUESTS_PER_ROUND 16

enum h1_phase {
    H1_WAIT,       /* no byte of the next request yet */
    H1_HEAD,       /* a request head is arriving */
    H1_BODY,       /* its body is arriving */
    H1_RESPONSE,   /* the request is in: its answer is awaited or on its way */
    H1_CLOSING,    /* the last answer is being written */
    H1_LINGER,     /* written; the device's input is dropped until it closes */
    H1_CHANNEL,    /* a notification channel (GET /CCM_Notify): events until it ends */
};

struct cmg_h1 {
    llhttp_t parser;
    struct cmg_device *d;
    struct cmg_headers hdrs;
    struct cmg_h1_head head_fields;
    struct cmg_buf url;
    struct cmg_buf held;       /* input after a complete request, parsed later */
    enum h1_phase phase;
    const char *timer_why;     /* what the armed deadline ends */
    size_t blank_bytes;        /* CR/LF before the request line */
    bool out_blocked;          /* reading waits for answers the device has not taken */
    uint64_t round;            /* the loop round that round_requests counts */
    unsigned round_requests;
    struct cmg_task next_round;   /* goes on reading after the other connections */
    int error_status;
    const char *error_reason;
    /* the gateway's own document to answer with (the CRL); of a refusal, what failed
     * in the credential (claim, cert) for its log line */
    struct cmg_answer local;
    struct cmg_exchange *ex;
    bool in_message;           /* between message begin and complete */
    bool msg_complete;
    bool paused;
    bool keep_alive;
    bool served;               /* a response went out: between requests, it idles */
    bool head;
    bool resp_started, resp_chunked;
    int scan;                  /* where scan_head is in the request head */
    int64_t resp_remaining;    /* -1 when the length is not known */
    /* GET /CCM_Notify admitted: who, until the channel opens; then the channel */
    struct cmg_identity *notify_id;
    int64_t notify_expires;
    struct cmg_notify_channel *channel;
    size_t channel_input;       /* bytes the device sent once its channel was open */
};

/* States of scan_head() */
enum { SCAN_LINE, SCAN_LINE_START, SCAN_BLANK_CR, SCAN_DONE };

static void pump_response(struct cmg_device *d);
static void finish_request(struct cmg_device *d);
static bool ready_for_input(struct cmg_device *d);

static struct cmg_h1 *h1_of(llhttp_t *p) { return (struct cmg_h1 *)p; }

/* How long a connection with no request yet may still send one once a drain began. */
#define DRAIN_FIRST_REQUEST_MS 1000

/* ---- deadlines and closing ---- */

static void on_timeout(struct cmg_timer *t)
{
    struct cmg_device *d = (struct cmg_device *)((char *)t - offsetof(struct cmg_device, timer));
    cmg_device_close(d, d->h1->timer_why);
}

static void arm(struct cmg_device *d, uint32_t ms, const char *why)
{
    d->h1->timer_why = why;
    cmg_timer_start(d->gw->loop, &d->timer, ms, on_timeout);
}

/* The answer is written: the device's input is dropped until it closes (device.c). */
static void start_linger(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;

    if (h->phase == H1_LINGER)
        return;
    h->phase = H1_LINGER;
    cmg_device_linger(d, LINGER_MS, "closed after answer");
}

/* Close once the queued output is written. */
static void close_after_output(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;

    d->closing = true;
    h->phase = H1_CLOSING;
    cmg_conn_want_read(&d->conn, false);
    arm(d, d->gw->cfg.idle_timeout_ms, "answer not taken");
    cmg_conn_flush(&d->conn);
    if (cmg_conn_pending(&d->conn) == 0)
        start_linger(d);
}

/* An answer made here: a refusal (its reason token as text) or the gateway's own
 * document; the answer to HEAD has its length and no body. */
static void write_answer(struct cmg_device *d, const struct cmg_answer *a, bool close)
{
    struct cmg_buf *o = &d->conn.out;
    bool doc = a->content_type != NULL;
    char date[64];

    cmg_http_date(date, sizeof(date));
    cmg_buf_printf(o, "HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n",
                   a->status, cmg_reason_phrase(a->status), date,
                   doc ? a->content_type : "text/plain", doc ? a->body_len : strlen(a->reason) + 2);
    if (a->max_age >= 0)
        cmg_buf_printf(o, "Cache-Control: max-age=%lld\r\n", (long long)a->max_age);
    cmg_buf_printf(o, "Connection: %s\r\n\r\n", close ? "close" : "keep-alive");
    if (d->h1->head)
        return;
    if (doc)
        cmg_buf_append(o, a->body, a->body_len);
    else
        cmg_buf_printf(o, "%s\r\n", a->reason);
}

static void write_error(struct cmg_device *d, int status, const char *reason, bool close)
{
    struct cmg_answer a = cmg_answer_refusal(status, reason);
    write_answer(d, &a, close);
}

/* A request answered here, not forwarded: logged (at a bounded rate), answered. */
static void answer_here(struct cmg_device *d, const struct cmg_answer *a, bool close)
{
    struct cmg_h1 *h = d->h1;
    cmg_refusal_log(d, h->in_message || h->url.len ? llhttp_method_name(h->parser.method) : NULL,
                    h->url.len ? cmg_buf_head(&h->url) : NULL, h->url.len, a, NULL);
    write_answer(d, a, close);
    if (close)
        close_after_output(d);
    else
        cmg_conn_flush(&d->conn);
}

/* The refusal chosen for this request, with what failed in its credential. */
static struct cmg_answer chosen_refusal(const struct cmg_h1 *h, int status, const char *reason)
{
    struct cmg_answer a = cmg_answer_refusal(status, reason);
    a.claim = h->local.claim;
    a.cert = h->local.cert;
    return a;
}

static void refuse(struct cmg_device *d, int status, const char *reason, bool close)
{
    struct cmg_answer a = chosen_refusal(d->h1, status, reason);
    answer_here(d, &a, close);
}

/* ---- parser callbacks ---- */

static void head_failed(struct cmg_h1 *h)
{
    switch (h->head_fields.error) {
    case CMG_H1_HEAD_TOO_LARGE:
        h->error_status = 431;
        h->error_reason = "CMGService_Headers_Too_Large";
        break;
    case CMG_H1_HEAD_BAD_NAME:
        h->error_status = 400;
        h->error_reason = "CMGService_Bad_Header_Name";
        break;
    case CMG_H1_HEAD_OBS_FOLD:
        h->error_status = 400;
        h->error_reason = "CMGService_Obsolete_Line_Folding";
        break;
    default:
        h->error_status = 500;
        h->error_reason = "CMGService_Out_Of_Memory";
        break;
    }
}

/* The collector's verdict as llhttp's: 0, or -1 with the answer chosen. */
static int head_rc(struct cmg_h1 *h, int rc)
{
    if (rc < 0)
        head_failed(h);
    return rc;
}

static int on_message_begin(llhttp_t *p)
{
    struct cmg_h1 *h = h1_of(p);
    h->in_message = true;
    h->head = false;
    cmg_h1_head_begin(&h->head_fields);
    cmg_buf_reset(&h->url);
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_h1 *h = h1_of(p);
    if (head_rc(h, cmg_h1_head_count(&h->head_fields, n)) < 0)
        return -1;
    return cmg_buf_append(&h->url, at, n);
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_h1 *h = h1_of(p);
    return head_rc(h, cmg_h1_head_field(&h->head_fields, at, n));
}

static int on_header_field_complete(llhttp_t *p)
{
    struct cmg_h1 *h = h1_of(p);
    return head_rc(h, cmg_h1_head_field_done(&h->head_fields));
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_h1 *h = h1_of(p);
    return head_rc(h, cmg_h1_head_value(&h->head_fields, at, n));
}

static int on_header_value_complete(llhttp_t *p)
{
    struct cmg_h1 *h = h1_of(p);
    return head_rc(h, cmg_h1_head_value_done(&h->head_fields));
}

static const struct cmg_exchange_dev_ops h1_ex_ops;

/* GET /CCM_Notify: answered here, never forwarded. Admitted, the channel opens once the
 * request is complete (parse()); refused, it is answered as any refusal. */
static int notify_request(struct cmg_device *d, const char *method, bool has_body)
{
    struct cmg_h1 *h = d->h1;
    struct cmg_identity id;
    struct cmg_answer a = cmg_answer_refusal(500, "CMGService_Out_Of_Memory");

    if (h->parser.http_major == 1 && h->parser.http_minor == 0) {
        /* a channel is a chunked stream without end: HTTP/1.1 or HTTP/2 only */
        a = cmg_answer_refusal(505, "CMGService_Bad_Request");
    }
    if (a.status == 505 ||
        cmg_notify_admit(d, method, &h->hdrs, has_body, &id, &h->notify_expires, &a) != 0 ||
        !(h->notify_id = malloc(sizeof(id)))) {
        h->error_status = a.status;
        h->error_reason = a.reason;
        h->local.claim = a.claim;
        h->local.cert = a.cert;
        return has_body ? -1 : 0;
    }
    *h->notify_id = id;
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    struct cmg_h1 *h = h1_of(p);
    struct cmg_device *d = h->d;
    bool chunked = p->flags & F_CHUNKED;
    bool has_length = p->flags & F_CONTENT_LENGTH;
    bool has_body = chunked || (has_length && p->content_length > 0);
    int64_t cl = -1;
    int hosts = 0, status, expect = -1;
    struct cmg_answer a;
    const char *method = llhttp_method_name(p->method);

    /* The head is in: its deadline is over; the body's, if any, starts. */
    h->phase = has_body ? H1_BODY : H1_RESPONSE;
    if (has_body)
        arm(d, d->gw->cfg.idle_timeout_ms, "body timeout");
    else
        cmg_timer_stop(d->gw->loop, &d->timer);
    if (has_length && p->content_length > (uint64_t)INT64_MAX) {
        h->error_status = 400;
        h->error_reason = "CMGService_Bad_Content_Length";
        return -1;
    }
    if (has_length)
        cl = (int64_t)p->content_length;
    for (uint32_t i = 0; i < h->hdrs.n; i++) {
        if (cmg_header_is(&h->hdrs, i, "host"))
            hosts++;
        else if (cmg_header_is(&h->hdrs, i, "expect"))
            expect = (int)i;
    }
    h->keep_alive = llhttp_should_keep_alive(p) && d->gw->state != CMG_GW_DRAINING;
    h->head = p->method == HTTP_HEAD;
    if (p->http_major != 1) {
        h->error_status = 400;
        h->error_reason = "CMGService_Bad_Version";
        return -1;
    }
    if (hosts > 1 || (hosts == 0 && p->http_major == 1 && p->http_minor == 1)) {
        h->error_status = 400;
        h->error_reason = "CMGService_Bad_Host";
        return -1;
    }
    if (p->method == HTTP_CONNECT || p->upgrade) {
        h->error_status = 400;
        h->error_reason = "CMGService_Method_Not_Supported";
        return -1;
    }
    if (cmg_notify_names(cmg_buf_head(&h->url), h->url.len))
        return notify_request(d, method, has_body);
    h->ex = cmg_admit(d, method, cmg_buf_head(&h->url), h->url.len, &h->hdrs, cl, has_body,
                      &h1_ex_ops, d, &a);
    if (h->ex && (status = cmg_exchange_start(h->ex)) != 0) {
        a = cmg_answer_refusal(status, status == 503 ? "CMGService_No_Connector"
                                                     : "CMGService_Tunnel_Error");
        cmg_exchange_free(h->ex);
        h->ex = NULL;
    }
    if (!h->ex) {
        if (a.content_type) {   /* the gateway's own document: no body comes with it */
            h->local = a;
        } else {
            h->error_status = a.status;
            h->error_reason = a.reason;
            h->local.claim = a.claim;
            h->local.cert = a.cert;
        }
        /* Without a body the connection stays usable; with one, framing says
         * nothing we want to read: answer and close. */
        return has_body ? -1 : 0;
    }
    if (expect >= 0 && has_body) {
        if (strcasecmp(cmg_headers_value(&h->hdrs, (uint32_t)expect), "100-continue") != 0) {
            cmg_exchange_dev_done(h->ex);
            h->ex = NULL;
            h->error_status = 417;
            h->error_reason = "CMGService_Expectation_Failed";
            return -1;
        }
        cmg_buf_appends(&d->conn.out, "HTTP/1.1 100 Continue\r\n\r\n");
        cmg_conn_flush(&d->conn);
    }
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_h1 *h = h1_of(p);
    if (!h->ex)
        return 0;
    if (n > h->ex->mapping->max_body - h->ex->req_bytes) {
        h->error_status = 413;
        h->error_reason = "CMGService_Request_Too_Large";
        return -1;
    }
    arm(h->d, h->d->gw->cfg.idle_timeout_ms, "body timeout");   /* it makes progress */
    return cmg_exchange_req_write(h->ex, at, n);
}

static int on_message_complete(llhttp_t *p)
{
    struct cmg_h1 *h = h1_of(p);
    h->in_message = false;
    h->msg_complete = true;
    h->phase = H1_RESPONSE;
    cmg_timer_stop(h->d->gw->loop, &h->d->timer);
    if (h->ex)
        cmg_exchange_req_end(h->ex);
    return HPE_PAUSED;   /* the next request waits for this response */
}

static const llhttp_settings_t settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- the response ---- */

static void h1_on_response(struct cmg_exchange *ex)
{
    struct cmg_device *d = ex->dev;
    struct cmg_h1 *h = d->h1;
    struct cmg_buf *o = &d->conn.out;
    bool no_body = h->head || ex->status == 204 || ex->status == 304 || ex->status < 200;
    int cl = cmg_headers_find(&ex->resp, "content-length");

    h->resp_started = true;
    h->resp_remaining = -1;
    if (!h->msg_complete)   /* answered before the request ended: cannot continue */
        h->keep_alive = false;
    cmg_buf_printf(o, "HTTP/1.1 %d %s\r\n", ex->status, cmg_reason_phrase(ex->status));
    for (uint32_t i = 0; i < ex->resp.n; i++) {
        const char *name = cmg_headers_name(&ex->resp, i);
        if (cmg_header_not_forwarded(name, ex->resp.v[i].name_len))
            continue;
        cmg_buf_append(o, name, ex->resp.v[i].name_len);
        cmg_buf_append(o, ": ", 2);
        cmg_buf_append(o, cmg_headers_value(&ex->resp, i), ex->resp.v[i].value_len);
        cmg_buf_append(o, "\r\n", 2);
    }
    if (cl >= 0) {   /* the connector passes on a length that it parsed itself */
        long long v = strtoll(cmg_headers_value(&ex->resp, (uint32_t)cl), NULL, 10);
        cmg_buf_printf(o, "Content-Length: %lld\r\n", v);
        h->resp_remaining = no_body ? 0 : v;
    } else if (!no_body) {
        if (h->parser.http_minor >= 1) {
            h->resp_chunked = true;
            cmg_buf_appends(o, "Transfer-Encoding: chunked\r\n");
        } else {
            h->keep_alive = false;   /* HTTP/1.0: the end of the connection ends the body */
        }
    }
    cmg_buf_appends(o, h->keep_alive ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n");
    if (no_body)
        h->resp_remaining = 0;
    pump_response(d);
}

static void response_done(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;
    struct cmg_exchange *ex = h->ex;

    cmg_exchange_log(ex, NULL);
    h->ex = NULL;
    cmg_exchange_dev_done(ex);
    if (!h->msg_complete || !h->keep_alive) {
        close_after_output(d);
        return;
    }
    finish_request(d);
}

/* Moves response body from the exchange to the connection while there is room. */
static void pump_response(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;
    struct cmg_exchange *ex = h->ex;
    struct cmg_buf *o = &d->conn.out;

    for (;;) {
        while (ex->resp_body.len && cmg_conn_pending(&d->conn) < CMG_OUT_HIGH) {
            size_t n = ex->resp_body.len < 65536 ? ex->resp_body.len : 65536;
            if (h->resp_remaining >= 0 && (uint64_t)n > (uint64_t)h->resp_remaining) {
                cmg_warn("connector sent more body than its Content-Length: %s", ex->target);
                cmg_device_close(d, "response longer than its length");
                return;
            }
            /* A chunk's size line rides in the first record of its data. */
            if (h->resp_chunked)
                cmg_buf_printf(o, "%zx\r\n", n);
            cmg_conn_write(&d->conn, cmg_buf_head(&ex->resp_body), n);
            if (h->resp_chunked)
                cmg_buf_append(o, "\r\n", 2);
            if (h->resp_remaining > 0)
                h->resp_remaining -= (int64_t)n;
            cmg_buf_consume(&ex->resp_body, n);
            ex->resp_bytes += n;
            cmg_exchange_resp_consumed(ex, n);
        }
        if (ex->resp_eof && ex->resp_body.len == 0) {
            if (h->resp_remaining > 0) {
                cmg_warn("response shorter than its Content-Length: %s", ex->target);
                cmg_device_close(d, "response shorter than its length");
                return;
            }
            if (h->resp_chunked)
                cmg_buf_appends(o, "0\r\n\r\n");
            cmg_conn_flush_later(&d->conn);
            response_done(d);
            return;
        }
        if (cmg_conn_pending(&d->conn) < CMG_OUT_HIGH) {
            /* All the body there is was taken: written with whatever else this round
             * queues; more body comes with on_response_body. */
            cmg_conn_flush_later(&d->conn);
            return;
        }
        cmg_conn_flush(&d->conn);
        /* All written at once: go on, or on_drain will call again. */
        if (cmg_conn_pending(&d->conn) || !ex->resp_body.len || !cmg_conn_open(&d->conn))
            return;
    }
}

static void h1_on_response_body(struct cmg_exchange *ex)
{
    struct cmg_device *d = ex->dev;
    if (d->h1->resp_started)
        pump_response(d);
}

static void h1_on_request_room(struct cmg_exchange *ex, size_t n)
{
    struct cmg_device *d = ex->dev;
    (void)n;
    if (d->h1->phase == H1_BODY)   /* the body moves on: its deadline too */
        arm(d, d->gw->cfg.idle_timeout_ms, "body timeout");
    if (!d->conn.reading && !d->h1->msg_complete && ex->req_body.len < CMG_EX_BUFFER / 2 &&
        ready_for_input(d))
        cmg_conn_want_read(&d->conn, true);
}

static void h1_on_fail(struct cmg_exchange *ex, int status, const char *why)
{
    struct cmg_device *d = ex->dev;
    struct cmg_h1 *h = d->h1;

    ex->status = status;
    cmg_exchange_log(ex, why);
    h->ex = NULL;
    cmg_exchange_dev_done(ex);
    if (h->resp_started) {   /* the device must not take a truncated body for whole */
        cmg_device_close(d, why);
        return;
    }
    write_error(d, status, status == 504 ? "CMGService_Internal_Timeout"
                                         : "CMGService_Connector_Error",
                !h->msg_complete || !h->keep_alive);
    if (!h->msg_complete || !h->keep_alive)
        close_after_output(d);
    else {
        cmg_conn_flush(&d->conn);
        finish_request(d);
    }
}

static const struct cmg_exchange_dev_ops h1_ex_ops = {h1_on_response, h1_on_response_body,
                                                      h1_on_request_room, h1_on_fail};

/* ---- notification channels ---- */

static int sink_write(void *sink, const char *framed, size_t flen, const char *sse, size_t slen)
{
    struct cmg_device *d = sink;
    (void)sse;
    (void)slen;
    if (cmg_conn_write(&d->conn, framed, flen) < 0)
        return -1;
    cmg_conn_flush(&d->conn);
    if (cmg_conn_pending(&d->conn) == 0)
        cmg_conn_idle(&d->conn);   /* an idle channel keeps no buffer */
    return 0;
}

static size_t sink_pending(void *sink)
{
    return cmg_conn_pending(&((struct cmg_device *)sink)->conn);
}

static void sink_end(void *sink, struct cmg_notify_channel *ch, bool graceful)
{
    struct cmg_device *d = sink;

    const char *why = !strcmp(cmg_notify_close_reason(ch), "overflow") ? "notify_buffer overflow"
                                                                       : "notify channel write failed";

    if (d->h1 && d->h1->channel == ch)
        d->h1->channel = NULL;
    cmg_notify_gone(ch);
    if (!graceful) {
        cmg_device_close(d, why);
        return;
    }
    cmg_buf_appends(&d->conn.out, "0\r\n\r\n");
    close_after_output(d);
}

static const struct cmg_notify_sink_ops h1_sink = {sink_write, sink_pending, sink_end, false};

/* The request of an admitted channel is complete: the head, then the hub's events. What
 * the request phase held is freed; of the token, the hub keeps the expiry alone. */
static void open_channel(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;
    struct cmg_identity *id = h->notify_id;
    char date[64];

    h->notify_id = NULL;
    h->phase = H1_CHANNEL;
    cmg_timer_stop(d->gw->loop, &d->timer);   /* neither idle_timeout nor send_timeout */
    cmg_http_date(date, sizeof(date));
    cmg_buf_printf(&d->conn.out, "HTTP/1.1 200 OK\r\nDate: %s\r\nContent-Type: "
                   CMG_NOTIFY_CONTENT_TYPE "\r\nCache-Control: no-store\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n", date);
    h->channel = cmg_notify_open(d->gw, d, id, h->notify_expires, &h->hdrs, &h1_sink, d);
    free(id);
    if (!h->channel) {
        cmg_device_close(d, "out of memory");
        return;
    }
    cmg_headers_free(&h->hdrs);
    cmg_buf_free(&h->url);
    cmg_buf_free(&h->held);
    free(d->tok);
    d->tok = NULL;
    cmg_notify_begin(h->channel);   /* may end it (and the connection) at once */
    if (d->h1 && d->h1->channel)
        cmg_conn_want_read(&d->conn, true);
}

/* A channel's device has nothing to say: a little is dropped (a stray CRLF), more
 * closes the channel (decrypting it would cost us without end), its close is noticed. */
static void channel_read(struct cmg_device *d)
{
    char buf[4096];
    ssize_t n;

    while ((n = cmg_conn_read(&d->conn, buf, sizeof(buf))) > 0) {
        d->h1->channel_input += (size_t)n;
        if (d->h1->channel_input > CHANNEL_INPUT_MAX) {
            cmg_device_close(d, "the device sent data on its notification channel");
            return;
        }
    }
    if (n == 0)
        cmg_device_close(d, "closed by device");
}

/* ---- reading ---- */

/* Waiting for the first byte of a request: for `ms`, with no buffer held. */
static void wait_request(struct cmg_device *d, uint32_t ms, const char *why)
{
    d->h1->phase = H1_WAIT;
    cmg_headers_free(&d->h1->hdrs);
    cmg_buf_free(&d->h1->url);
    cmg_conn_idle(&d->conn);
    arm(d, ms, why);
}

/* The response is out: ready for the next request. */
static void finish_request(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;
    h->served = true;
    h->msg_complete = false;
    h->resp_started = h->resp_chunked = false;
    h->error_status = 0;
    h->error_reason = NULL;
    h->paused = false;
    h->head = false;   /* a refusal before the next request's line must not take it for HEAD */
    cmg_headers_reset(&h->hdrs);
    cmg_buf_reset(&h->url);
    llhttp_resume(&h->parser);
    wait_request(d, d->gw->cfg.idle_timeout_ms, "idle timeout");
    cmg_conn_want_read(&d->conn, true);
}

/* llhttp accepts obs-fold (a header line starting with a space or tab), which
 * RFC 9112 lets a proxy reject: look at the raw head for it. */
static bool scan_head(struct cmg_h1 *h, const char *p, size_t n)
{
    for (size_t i = 0; i < n && h->scan != SCAN_DONE; i++) {
        char c = p[i];
        if (c == '\n')
            h->scan = h->scan == SCAN_LINE ? SCAN_LINE_START : SCAN_DONE;
        else if (h->scan == SCAN_LINE_START && c == '\r')
            h->scan = SCAN_BLANK_CR;
        else if (h->scan == SCAN_LINE_START && (c == ' ' || c == '\t'))
            return false;
        else
            h->scan = SCAN_LINE;
    }
    return true;
}

/* The first byte of a request (a CR/LF before its request line counts) starts the
 * head's deadline, once; the checks of the head start at its request line. */
static void start_head(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;
    h->round_requests++;
    h->phase = H1_HEAD;
    h->blank_bytes = 0;
    h->scan = SCAN_LINE;
    arm(d, d->gw->cfg.header_timeout_ms, "header timeout");
}

/* CR/LF before a request line (RFC 9112 2.2 lets a server ignore them): skipped
 * here, counted against max_header_size. Returns how many bytes were skipped. */
static size_t skip_blank_lines(struct cmg_h1 *h, const char *data, size_t len)
{
    size_t n = 0;
    while (n < len && (data[n] == '\r' || data[n] == '\n'))
        n++;
    h->blank_bytes += n;
    return n;
}

static void parse(struct cmg_device *d, const char *data, size_t len)
{
    struct cmg_h1 *h = d->h1;
    llhttp_errno_t err;
    int status;
    const char *reason;

    if (h->phase == H1_WAIT && len)
        start_head(d);
    if (h->phase == H1_HEAD && !h->in_message) {
        size_t blank = skip_blank_lines(h, data, len);
        if (h->blank_bytes > d->gw->cfg.max_header_size) {
            refuse(d, 400, "CMGService_Bad_Request", true);
            return;
        }
        data += blank;
        len -= blank;
        if (!len)
            return;
    }
    if (!scan_head(h, data, len)) {
        h->error_status = 400;
        h->error_reason = "CMGService_Obsolete_Line_Folding";
        err = HPE_USER;
    } else {
        err = llhttp_execute(&h->parser, data, len);
    }

    if (err == HPE_OK)
        return;
    if (err == HPE_PAUSED) {
        const char *pos = llhttp_get_error_pos(&h->parser);
        h->paused = true;
        cmg_conn_want_read(&d->conn, false);
        if (pos && pos < data + len)
            cmg_buf_append(&h->held, pos, (size_t)(data + len - pos));
        if (h->notify_id) {
            open_channel(d);
            return;
        }
        if (!h->ex) {   /* answered here: refused, or from the policy (the CRL) */
            struct cmg_answer a = h->local.content_type
                ? h->local
                : chosen_refusal(h, h->error_status ? h->error_status : 500,
                                 h->error_reason ? h->error_reason : "CMGService_Error");
            answer_here(d, &a, !h->keep_alive);
            cmg_answer_release(&h->local);
            h->local = (struct cmg_answer){0};
            if (h->keep_alive)
                finish_request(d);
        }
        return;
    }
    status = h->error_status ? h->error_status : 400;
    reason = h->error_reason ? h->error_reason : llhttp_get_error_reason(&h->parser);
    cmg_conn_want_read(&d->conn, false);
    if (h->ex) {   /* its access line logs and counts it: no refusal line as well */
        struct cmg_exchange *ex = h->ex;
        ex->status = status;
        cmg_exchange_log(ex, reason);
        h->ex = NULL;
        cmg_exchange_dev_done(ex);
        if (h->resp_started)
            cmg_device_close(d, reason);
        else {
            write_error(d, status, h->error_status ? reason : "CMGService_Bad_Request", true);
            close_after_output(d);
        }
        return;
    }
    if (h->error_status)
        refuse(d, status, reason, true);
    else {
        struct cmg_answer a = cmg_answer_refusal(400, "CMGService_Bad_Request");
        cmg_refusal_log(d, NULL, NULL, 0, &a, reason);   /* reason: what the parser found */
        write_error(d, 400, "CMGService_Bad_Request", true);
        close_after_output(d);
    }
}

static void on_next_round(struct cmg_task *t)
{
    struct cmg_h1 *h = (struct cmg_h1 *)((char *)t - offsetof(struct cmg_h1, next_round));
    cmg_h1_on_read(h->d);
}

/* May input be parsed now? Not while a response is awaited (pipelining waits), nor
 * while answers pile up that the device does not take, nor past this round's share. */
static bool ready_for_input(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;
    uint64_t round = cmg_loop_round(d->gw->loop);

    if (h->paused || h->phase == H1_CLOSING || h->phase == H1_LINGER)
        return false;
    if (h->round != round) {
        h->round = round;
        h->round_requests = 0;
    }
    if (h->round_requests >= REQUESTS_PER_ROUND && h->phase == H1_WAIT) {
        cmg_task_post(d->gw->loop, &h->next_round, on_next_round);   /* runs next round */
        return false;
    }
    if (cmg_conn_pending(&d->conn) >= CMG_OUT_HIGH) {
        h->out_blocked = true;   /* on_drain reads again */
        cmg_conn_want_read(&d->conn, false);
        return false;
    }
    return true;
}

/* Pipelined input held back while the request before it was served. */
static void parse_held(struct cmg_device *d)
{
    while (d->h1 && d->h1->held.len && ready_for_input(d)) {
        struct cmg_h1 *h = d->h1;
        struct cmg_buf held = h->held;
        memset(&h->held, 0, sizeof(h->held));
        parse(d, cmg_buf_head(&held), held.len);
        cmg_buf_free(&held);
    }
}

void cmg_h1_input(struct cmg_device *d, const char *data, size_t len)
{
    parse(d, data, len);
    parse_held(d);
}

/* The device ended its side of the connection. */
static void device_ended(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;

    if (h->ex && !h->msg_complete) {
        struct cmg_exchange *ex = h->ex;
        cmg_exchange_log(ex, "device closed during the request");
        h->ex = NULL;
        cmg_exchange_dev_done(ex);
    } else if (h->ex) {
        cmg_conn_want_read(&d->conn, false);
        return;   /* half-closed: still send the response */
    }
    cmg_device_close(d, "closed by device");
}

void cmg_h1_on_read(struct cmg_device *d)
{
    char buf[READ_CHUNK];
    ssize_t n;

    if (d->h1 && d->h1->phase == H1_LINGER)
        return;   /* device.c reads and drops */
    if (d->h1 && d->h1->phase == H1_CHANNEL) {
        channel_read(d);
        return;
    }
    parse_held(d);
    /* Each read is parsed before the next; cmg_conn_read bounds a round's input. */
    while (d->h1 && ready_for_input(d)) {
        struct cmg_h1 *h = d->h1;
        if (h->ex && !h->msg_complete && cmg_exchange_req_full(h->ex)) {
            cmg_conn_want_read(&d->conn, false);   /* the tunnel is behind: wait */
            return;
        }
        n = cmg_conn_read(&d->conn, buf, sizeof(buf));
        if (n == CMG_AGAIN)
            return;
        if (n == 0) {
            device_ended(d);
            return;
        }
        cmg_h1_input(d, buf, (size_t)n);
    }
}

void cmg_h1_on_drain(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;
    if (h->phase == H1_CLOSING) {
        if (cmg_conn_pending(&d->conn) == 0)
            start_linger(d);
        return;
    }
    if (h->phase == H1_CHANNEL) {
        if (h->channel)
            cmg_notify_resume(h->channel);   /* a replay paced by the socket goes on */
        if (d->h1 && cmg_conn_pending(&d->conn) == 0)
            cmg_conn_idle(&d->conn);
        return;
    }
    if (h->out_blocked && cmg_conn_pending(&d->conn) < CMG_OUT_HIGH) {
        h->out_blocked = false;
        cmg_conn_want_read(&d->conn, true);
    }
    if (h->ex && h->resp_started)
        pump_response(d);
}

int cmg_h1_start(struct cmg_device *d)
{
    struct cmg_h1 *h = calloc(1, sizeof(*h));
    if (!h)
        return -1;
    llhttp_init(&h->parser, HTTP_REQUEST, &settings);
    cmg_h1_head_init(&h->head_fields, &h->hdrs, d->gw->cfg.max_header_size, MAX_HEADERS);
    h->d = d;
    d->h1 = h;
    /* Until its first request, a connection has header_timeout, not idle_timeout. */
    wait_request(d, d->gw->cfg.header_timeout_ms, "no request");
    cmg_conn_want_read(&d->conn, true);
    return 0;
}

/* The gateway drains: the answer in progress, or the next one, is the last (Connection:
 * close); a connection idle between requests is closed now (a client sends a request
 * again on a new connection when a kept-alive one closed before any of its answer). A new
 * connection gets its first request answered if it comes within DRAIN_FIRST_REQUEST_MS. */
void cmg_h1_drain(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;

    h->keep_alive = false;
    if (h->phase == H1_WAIT && h->served && !h->held.len)
        close_after_output(d);
    else if (h->phase == H1_WAIT && !h->served)   /* a preconnect must not hold the drain */
        arm(d, d->gw->cfg.header_timeout_ms < DRAIN_FIRST_REQUEST_MS ? d->gw->cfg.header_timeout_ms
                                                                      : DRAIN_FIRST_REQUEST_MS,
            "no request while draining");
}

void cmg_h1_free(struct cmg_device *d)
{
    struct cmg_h1 *h = d->h1;
    if (!h)
        return;
    d->h1 = NULL;
    cmg_task_cancel(d->gw->loop, &h->next_round);
    if (h->ex) {
        struct cmg_exchange *ex = h->ex;
        if (!ex->status)
            ex->status = 499;
        cmg_exchange_log(ex, "device connection closed");
        cmg_exchange_dev_done(ex);
    }
    if (h->channel) {
        struct cmg_notify_channel *ch = h->channel;
        h->channel = NULL;
        cmg_notify_gone(ch);
    }
    free(h->notify_id);
    cmg_answer_release(&h->local);
    cmg_headers_free(&h->hdrs);
    cmg_buf_free(&h->url);
    cmg_buf_free(&h->held);
    free(h);
}
