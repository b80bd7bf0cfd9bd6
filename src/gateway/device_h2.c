/* HTTP/2 from devices: an nghttp2 server session per connection; every stream
 * is admitted like an HTTP/1.1 request and relayed through its own exchange.
 *
 * What a hostile peer can cost is bounded: a stream answered here (refused) keeps
 * nothing of its request and is reset once its answer is out (unless it announced a
 * body, which is taken and dropped); a header list fails at the first field past
 * max_header_size (nghttp2 then decodes the rest of the block without handing it
 * over); a header block must be complete within header_timeout; a connection with
 * no request in progress closes after idle_timeout (header_timeout before its first
 * request), and only admitted requests count as activity, not PING, SETTINGS,
 * WINDOW_UPDATE or refused streams; more than CMG_H2_MAX_RESETS refused or reset
 * streams in a second end the connection with GOAWAY ENHANCE_YOUR_CALM. */
#include "core/log.h"
#include "http/h2.h"
#include "gateway/gw.h"
#include "gateway/notify.h"

#include <stdlib.h>
#include <string.h>

#define STREAM_WINDOW (256 * 1024)
#define CONNECTION_WINDOW (1 << 20)
#define MAX_STREAMS 100
/* Refused plus reset streams a connection may have in one second (rapid reset). */
#define CMG_H2_MAX_RESETS 100
/* The gateway drains: from the GOAWAY notice to the final GOAWAY, at most (the answer
 * to a PING sent with the notice ends it sooner: the device has seen the notice). */
#define NOTICE_MS 1000

struct cmg_h2dev {
    struct cmg_device *d;
    nghttp2_session *s;
    struct cmg_task send_task;
    struct h2stream *streams;   /* open streams, freed with the session */
    bool dead;
    bool check_channels;        /* notification streams to look at after a send */
    bool served;                /* a request was admitted: idle_timeout, not header_timeout */
    uint64_t quiet_since;       /* when the last admitted stream ended (or the start) */
    bool block_open;            /* a HEADERS block is being received ... */
    uint64_t block_start;       /* ... since then */
    uint64_t ending_since;      /* the session wants no more input (GOAWAY); 0 if not */
    bool draining;              /* the GOAWAY notice went out ... */
    uint64_t notice_since;      /* ... the final GOAWAY is due (0: sent) */
    uint64_t reset_window;      /* start of the second that resets counts */
    uint32_t resets;
};

struct h2stream {
    struct cmg_device *d;
    int32_t id;
    struct cmg_headers hdrs;
    char method[32];
    char *path;
    size_t head_bytes;
    int64_t content_length;
    struct cmg_exchange *ex;
    bool resp_submitted;
    bool admitted;             /* forwarded: the connection is busy while it is open */
    bool refused;              /* answered here */
    bool reset_after_answer;   /* and reset once the answer is out, if still open */
    bool reset_counted;        /* its reset is already counted by count_reset() */
    uint64_t body_since;       /* a request body is due: its last progress; 0 if none */
    struct cmg_h2_text text;   /* an answer made here: a refusal, or the CRL ... */
    struct cmg_policy *hold;   /* ... whose body this policy holds until the stream ends */
    unsigned char *owned;      /* ... or that is its own (the analyser's answer) */
    /* a notification channel (GET /CCM_Notify): its events not yet framed, its end */
    struct cmg_notify_channel *channel;
    struct cmg_buf sse;
    bool sse_stream, sse_end, end_sent;
    struct h2stream *prev, *next;
};

static ssize_t read_body(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *src, void *user);

static void h2_send(struct cmg_device *d);
static void schedule(struct cmg_device *d);
static void kick(struct cmg_device *d);

/* The final GOAWAY names the last stream taken: those finish, none is taken after. */
static void final_goaway(struct cmg_device *d)
{
    struct cmg_h2dev *h = d->h2;

    h->notice_since = 0;
    nghttp2_submit_goaway(h->s, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(h->s),
                          NGHTTP2_NO_ERROR, NULL, 0);
    kick(d);
}

static void on_send_task(struct cmg_task *t)
{
    struct cmg_h2dev *h = (struct cmg_h2dev *)((char *)t - offsetof(struct cmg_h2dev, send_task));
    h2_send(h->d);
}

static void kick(struct cmg_device *d)
{
    if (d->h2 && !d->h2->dead)
        cmg_task_post(d->gw->loop, &d->h2->send_task, on_send_task);
}

static void check_channels(struct cmg_device *d);

static void h2_send(struct cmg_device *d)
{
    struct cmg_h2dev *h = d->h2;
    if (!h || h->dead)
        return;
    int rc = cmg_h2_send(h->s, &d->conn);
    if (rc < 0) {
        cmg_device_close(d, nghttp2_strerror(rc));
        return;
    }
    if (h->check_channels)
        check_channels(d);
    if (!cmg_h2_finished(h->s, &d->conn))
        return;
    /* After the drain's GOAWAY, the last responses may still be in the socket's buffer, and
     * the device sends WINDOW_UPDATEs as it reads them: a close now would reset them away.
     * The device closes once it has read the GOAWAY; the drain's deadline bounds the wait. */
    if (h->draining)
        cmg_device_linger(d, d->gw->cfg.drain_timeout_ms, "HTTP/2 session ended (drain)");
    else
        cmg_device_close(d, "HTTP/2 session ended");
}

/* ---- answers ---- */

/* Sends an answer made here (a refusal, or the gateway's own document) and keeps
 * what holds its body until the stream ends. */
static void answer(struct h2stream *st, struct cmg_answer *a)
{
    const char *body = a->content_type ? (const char *)a->body : a->reason;
    size_t len = a->content_type ? a->body_len : strlen(a->reason);

    st->resp_submitted = true;
    cmg_policy_unref(st->hold);
    st->hold = a->hold;
    a->hold = NULL;
    free(st->owned);
    st->owned = a->owned;
    a->owned = NULL;
    cmg_h2_submit_local(st->d->h2->s, st->id, a->status,
                        a->content_type ? a->content_type : "text/plain", body, len,
                        (long long)a->max_age, !strcmp(st->method, "HEAD"), &st->text);
    kick(st->d);
}

static void answer_refusal(struct h2stream *st, int status, const char *reason)
{
    struct cmg_answer a = cmg_answer_refusal(status, reason);
    answer(st, &a);
}

/* A refused or reset stream; past CMG_H2_MAX_RESETS in a second the connection is
 * told to go away (rapid reset: each costs us more than it costs the peer). */
static void count_reset(struct cmg_device *d)
{
    struct cmg_h2dev *h = d->h2;
    uint64_t now = cmg_loop_now(d->gw->loop);

    if (now - h->reset_window >= 1000) {
        h->reset_window = now;
        h->resets = 0;
    }
    if (++h->resets == CMG_H2_MAX_RESETS + 1) {
        cmg_info("device %s: more than %d refused or reset HTTP/2 streams in a second: "
                 "GOAWAY ENHANCE_YOUR_CALM", d->conn.peer, CMG_H2_MAX_RESETS);
        nghttp2_session_terminate_session(h->s, NGHTTP2_ENHANCE_YOUR_CALM);
        h->ending_since = now;
        kick(d);
    }
}

/* Drops what the stream's head holds: a refused stream keeps nothing while its
 * answer goes out. */
static void forget_head(struct h2stream *st)
{
    cmg_headers_free(&st->hdrs);
    free(st->path);
    st->path = NULL;
}

/* A stream answered here, not forwarded: a refusal (counted as a reset), or the
 * gateway's own document. */
static void answer_here(struct h2stream *st, struct cmg_answer *a)
{
    cmg_refusal_log(st->d, st->method[0] ? st->method : NULL, st->path,
                    st->path ? strlen(st->path) : 0, a, NULL);
    st->refused = true;
    /* A body the device announced may already be on its way: it is taken and dropped
     * rather than reset (most clients report a reset as an error, not the answer). */
    st->reset_after_answer = st->content_length <= 0;
    forget_head(st);
    if (!a->content_type)
        count_reset(st->d);
    answer(st, a);
}

static void refuse(struct h2stream *st, int status, const char *reason)
{
    struct cmg_answer a = cmg_answer_refusal(status, reason);
    answer_here(st, &a);
}

/* The device side lets go of the stream's exchange. Body bytes the tunnel has not
 * taken, or whose credit the budget held back, will never come back through
 * on_request_room: the connection window gets them now, or every later upload on
 * this connection would find less room. */
static void release_exchange(struct h2stream *st)
{
    struct cmg_exchange *ex = st->ex;
    struct cmg_h2dev *h = st->d->h2;
    size_t owed = ex->req_body.len + ex->room_owed;

    st->ex = NULL;
    if (owed && h && !h->dead)
        nghttp2_session_consume_connection(h->s, owed);
    cmg_exchange_dev_done(ex);
}

static void h2_on_response(struct cmg_exchange *ex)
{
    struct h2stream *st = ex->dev;
    struct cmg_device *d = st->d;
    nghttp2_nv *nv = calloc(ex->resp.n + 1, sizeof(*nv));
    nghttp2_data_provider dp = {.source.ptr = st};
    char code[8];
    size_t k = 0;

    if (!nv) {
        nghttp2_submit_rst_stream(d->h2->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
        kick(d);
        return;
    }
    snprintf(code, sizeof(code), "%d", ex->status);
    nv[k++] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)code, 7, strlen(code), 0};
    for (uint32_t i = 0; i < ex->resp.n; i++) {
        const char *name = cmg_headers_name(&ex->resp, i);
        uint32_t nl = ex->resp.v[i].name_len;
        if (cmg_header_not_forwarded(name, nl) && !cmg_header_is(&ex->resp, i, "content-length"))
            continue;
        nv[k++] = (nghttp2_nv){(uint8_t *)name, (uint8_t *)cmg_headers_value(&ex->resp, i), nl,
                               ex->resp.v[i].value_len, 0};
    }
    dp.read_callback = read_body;
    st->resp_submitted = true;
    nghttp2_submit_response(d->h2->s, st->id, nv, k, &dp);
    free(nv);
    kick(d);
}

static ssize_t read_body(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct h2stream *st = src->ptr;
    struct cmg_exchange *ex = st->ex;

    if (!ex)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return cmg_h2_offer(&ex->resp_body, ex->resp_eof, length, flags);
}

static int send_body(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd,
                     size_t length, nghttp2_data_source *src, void *user)
{
    struct cmg_device *d = user;
    struct h2stream *st = src->ptr;
    struct cmg_exchange *ex = st->ex;
    int rc;

    if (!ex && st->sse_stream)
        return cmg_h2_put_data(&d->conn, frame, framehd, length, &st->sse);
    if (!ex)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    rc = cmg_h2_put_data(&d->conn, frame, framehd, length, &ex->resp_body);
    if (rc == 0) {
        ex->resp_bytes += length;
        cmg_exchange_resp_consumed(ex, length);
    }
    return rc;
}

static void h2_on_response_body(struct cmg_exchange *ex)
{
    struct h2stream *st = ex->dev;
    if (st->resp_submitted) {
        nghttp2_session_resume_data(st->d->h2->s, st->id);
        kick(st->d);
    }
}

static void h2_on_request_room(struct cmg_exchange *ex, size_t n)
{
    struct h2stream *st = ex->dev;
    if (st->body_since)   /* the tunnel took body: progress */
        st->body_since = cmg_loop_now(st->d->gw->loop);
    nghttp2_session_consume(st->d->h2->s, st->id, n);
    kick(st->d);
}

static void h2_on_fail(struct cmg_exchange *ex, int status, const char *why)
{
    struct h2stream *st = ex->dev;
    ex->status = status;
    cmg_exchange_log(ex, why);
    release_exchange(st);
    if (st->resp_submitted) {
        nghttp2_submit_rst_stream(st->d->h2->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
        kick(st->d);
    } else {
        answer_refusal(st, status, status == 504 ? "CMGService_Internal_Timeout"
                                                 : "CMGService_Connector_Error");
    }
}

static const struct cmg_exchange_dev_ops h2_ex_ops = {h2_on_response, h2_on_response_body,
                                                      h2_on_request_room, h2_on_fail};

/* ---- nghttp2 callbacks ---- */

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
    struct cmg_device *d = user;
    struct h2stream *st;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    st = calloc(1, sizeof(*st));
    if (!st)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    st->d = d;
    st->id = frame->hd.stream_id;
    st->content_length = -1;
    st->next = d->h2->streams;
    if (st->next)
        st->next->prev = st;
    d->h2->streams = st;
    nghttp2_session_set_stream_user_data(s, st->id, st);
    return 0;
}

/* The first field past max_header_size fails the stream: 431 without a body, then
 * RST_STREAM (nghttp2 decodes the rest of the block, which keeps HPACK in step, and
 * hands none of it over). Trailers count against the same limit and are dropped. */
static int header_too_large(nghttp2_session *s, struct h2stream *st)
{
    nghttp2_nv status = {(uint8_t *)":status", (uint8_t *)"431", 7, 3, 0};
    struct cmg_answer a = cmg_answer_refusal(431, "CMGService_Headers_Too_Large");

    cmg_refusal_log(st->d, st->method[0] ? st->method : NULL, st->path,
                    st->path ? strlen(st->path) : 0, &a, NULL);
    forget_head(st);
    if (!st->resp_submitted && !st->ex) {
        st->resp_submitted = true;
        nghttp2_submit_response(s, st->id, &status, 1, NULL);
    }
    st->reset_counted = true;   /* now, not when the RST goes out: reading stops sooner */
    count_reset(st->d);
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user)
{
    struct cmg_device *d = user;
    struct h2stream *st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);

    if (!st || st->refused)
        return 0;
    st->head_bytes += namelen + valuelen + 32;
    if (st->head_bytes > d->gw->cfg.max_header_size)
        return header_too_large(s, st);
    if (st->ex || st->resp_submitted || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;   /* trailers: counted, not forwarded */
    if (namelen == 7 && !memcmp(name, ":method", 7)) {
        snprintf(st->method, sizeof(st->method), "%.*s", (int)valuelen, value);
    } else if (namelen == 5 && !memcmp(name, ":path", 5)) {
        free(st->path);
        st->path = strndup((const char *)value, valuelen);
    } else if (namelen == 10 && !memcmp(name, ":authority", 10)) {
        return cmg_headers_add(&st->hdrs, "host", 4, (const char *)value, valuelen) < 0
                   ? NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
                   : 0;
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

/* ---- notification channels ---- */

static ssize_t read_sse(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length,
                        uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct h2stream *st = src->ptr;
    ssize_t n = cmg_h2_offer(&st->sse, st->sse_end, length, flags);
    if (*flags & NGHTTP2_DATA_FLAG_EOF)
        st->end_sent = true;
    return n;
}

static int sink_write(void *sink, const char *framed, size_t flen, const char *sse, size_t slen)
{
    struct h2stream *st = sink;
    (void)framed;
    (void)flen;
    if (cmg_buf_append(&st->sse, sse, slen) < 0)
        return -1;
    nghttp2_session_resume_data(st->d->h2->s, st->id);
    st->d->h2->check_channels = true;
    kick(st->d);
    return 0;
}

/* This stream's bytes alone: other streams' downloads in the connection's output are
 * not the channel's. */
static size_t sink_pending(void *sink)
{
    return ((struct h2stream *)sink)->sse.len;
}

static void reset_channel_stream(struct h2stream *st)
{
    cmg_buf_free(&st->sse);
    st->sse_end = false;
    st->reset_counted = true;   /* our own reset */
    nghttp2_submit_rst_stream(st->d->h2->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_CANCEL);
}

/* After a send attempt: a channel with more than notify_buffer still unsent is closed
 * (overflow); one whose bytes all went on with its paused replay and keeps no buffer;
 * an ended one whose END_STREAM could not go out at once (flow control, a full socket)
 * is reset, so that replaced streams and drains never wait on a device. */
static void check_channels(struct cmg_device *d)
{
    struct cmg_h2dev *h = d->h2;
    size_t limit = d->gw->cfg.notify_buffer;
    bool again = false, reset = false;

    h->check_channels = false;
    for (struct h2stream *st = h->streams; st; st = st->next) {
        if (!st->sse_stream)
            continue;
        if (st->sse_end && !st->end_sent) {
            reset_channel_stream(st);
            reset = true;
        } else if (st->channel && st->sse.len > limit) {
            cmg_notify_overflow(st->channel);   /* resets the stream */
            reset = true;
        } else if (st->channel && st->sse.len == 0) {
            cmg_buf_release(&st->sse);
            cmg_notify_resume(st->channel);
        }
        again |= st->channel && st->sse.len;
    }
    if (cmg_conn_pending(&d->conn) == 0)
        cmg_conn_idle(&d->conn);   /* an idle channel keeps no buffer, as over HTTP/1.1 */
    else
        again = true;   /* released once the socket took it (on_drain sends again) */
    h->check_channels |= again;
    if (reset)
        kick(d);
}

/* Graceful: END_STREAM once what is queued is out; overflow: the stream is reset (the
 * connection's other streams go on). */
static void sink_end(void *sink, struct cmg_notify_channel *ch, bool graceful)
{
    struct h2stream *st = sink;

    if (st->channel == ch)
        st->channel = NULL;
    cmg_notify_gone(ch);
    if (graceful) {
        st->sse_end = true;
        st->d->h2->check_channels = true;   /* END_STREAM at the next send, or a reset */
        nghttp2_session_resume_data(st->d->h2->s, st->id);
    } else {
        reset_channel_stream(st);
    }
    kick(st->d);
}

static const struct cmg_notify_sink_ops h2_sink = {sink_write, sink_pending, sink_end, true};

/* GET /CCM_Notify on this stream: answered here, never forwarded. The stream stays
 * open (the connection busy: no idle_timeout) until the hub or the device ends it. */
static void notify_stream(struct h2stream *st, bool has_body)
{
    struct cmg_device *d = st->d;
    nghttp2_nv nv[] = {
        {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-type", (uint8_t *)CMG_NOTIFY_CONTENT_TYPE, 12,
         sizeof(CMG_NOTIFY_CONTENT_TYPE) - 1, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"cache-control", (uint8_t *)"no-store", 13, 8, NGHTTP2_NV_FLAG_NONE},
    };
    nghttp2_data_provider dp = {.source.ptr = st, .read_callback = read_sse};
    struct cmg_identity id;
    struct cmg_answer a;
    int64_t expires;

    if (cmg_notify_admit(d, st->method, &st->hdrs, has_body, &id, &expires, &a) != 0) {
        answer_here(st, &a);
        return;
    }
    if (!(st->channel = cmg_notify_open(d->gw, d, &id, expires, &st->hdrs, &h2_sink, st))) {
        refuse(st, 500, "CMGService_Out_Of_Memory");
        return;
    }
    forget_head(st);
    st->sse_stream = st->resp_submitted = st->admitted = true;
    d->h2->served = true;
    nghttp2_submit_response(d->h2->s, st->id, nv, sizeof(nv) / sizeof(nv[0]), &dp);
    cmg_notify_begin(st->channel);
    kick(d);
}

static void admit(struct h2stream *st, bool end_stream)
{
    struct cmg_device *d = st->d;
    struct cmg_answer a;
    int status;
    bool has_body = !end_stream;

    if (!st->path || !st->method[0]) {
        refuse(st, 400, "CMGService_Bad_Request");
        return;
    }
    if (!strcmp(st->method, "CONNECT")) {
        refuse(st, 400, "CMGService_Method_Not_Supported");
        return;
    }
    if (cmg_notify_names(st->path, strlen(st->path))) {
        notify_stream(st, has_body);
        return;
    }
    st->ex = cmg_admit(d, st->method, st->path, strlen(st->path), &st->hdrs,
                       st->content_length, has_body, &h2_ex_ops, st, &a);
    if (st->ex && (status = cmg_exchange_start(st->ex)) != 0) {
        a = cmg_answer_refusal(status, status == 503 ? "CMGService_No_Connector"
                                                     : "CMGService_Tunnel_Error");
        cmg_exchange_free(st->ex);
        st->ex = NULL;
    }
    if (!st->ex) {
        answer_here(st, &a);
        return;
    }
    st->admitted = true;
    d->h2->served = true;
    d->h2->quiet_since = cmg_loop_now(d->gw->loop);
    if (end_stream)
        cmg_exchange_req_end(st->ex);
}

static int on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd, void *user)
{
    struct cmg_device *d = user;

    /* CONTINUATION frames carry on the block; any other frame means it ended. */
    if (hd->type == NGHTTP2_HEADERS) {
        d->h2->block_open = true;
        d->h2->block_start = cmg_loop_now(d->gw->loop);
    } else if (hd->type != NGHTTP2_CONTINUATION) {
        d->h2->block_open = false;
    }
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
    struct cmg_device *d = user;
    struct h2stream *st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    bool end = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;

    if (frame->hd.type == NGHTTP2_HEADERS)
        d->h2->block_open = false;
    else if (frame->hd.type == NGHTTP2_RST_STREAM)
        count_reset(d);
    else if (frame->hd.type == NGHTTP2_PING && (frame->hd.flags & NGHTTP2_FLAG_ACK) &&
             d->h2->notice_since)
        final_goaway(d);
    if (!st)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST)
        st->body_since = end ? 0 : cmg_loop_now(d->gw->loop);
    else if ((frame->hd.type == NGHTTP2_DATA || frame->hd.type == NGHTTP2_HEADERS) && end)
        st->body_since = 0;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        if (!st->resp_submitted)
            admit(st, end);
    } else if ((frame->hd.type == NGHTTP2_DATA || frame->hd.type == NGHTTP2_HEADERS) && end &&
               st->ex) {
        cmg_exchange_req_end(st->ex);   /* the last DATA frame, or trailers */
    }
    return 0;
}

/* A refused stream whose answer is out is reset if the device has not finished
 * its request: a half-open stream would otherwise stay until the connection ends. */
static int on_frame_send(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
    struct cmg_device *d = user;
    struct h2stream *st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);

    if (frame->hd.type == NGHTTP2_RST_STREAM && frame->rst_stream.error_code != NGHTTP2_NO_ERROR &&
        !(st && st->reset_counted))
        count_reset(d);
    if (!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM) ||
        (frame->hd.type != NGHTTP2_DATA && frame->hd.type != NGHTTP2_HEADERS))
        return 0;
    if (st && st->reset_after_answer && !nghttp2_session_get_stream_remote_close(s, st->id))
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_NO_ERROR);
    return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *user)
{
    struct h2stream *st = nghttp2_session_get_stream_user_data(s, id);

    if (st && st->body_since)
        st->body_since = cmg_loop_now(st->d->gw->loop);
    if (!st || !st->ex) {
        nghttp2_session_consume(s, id, len);
        return 0;
    }
    if (st->ex->req_bytes + len > st->ex->mapping->max_body) {
        struct cmg_exchange *ex = st->ex;
        nghttp2_session_consume(s, id, len);
        ex->status = 413;
        cmg_exchange_log(ex, "request body over the mapping's limit");
        release_exchange(st);
        /* What the device still sends is taken and dropped (a reset would cut the
         * answer short at most clients); idle_timeout bounds how long. */
        st->admitted = false;
        st->d->h2->quiet_since = cmg_loop_now(st->d->gw->loop);
        if (!st->resp_submitted)
            answer_refusal(st, 413, "CMGService_Request_Too_Large");
        return 0;
    }
    /* Consumed (window opened) only once the tunnel has taken it. */
    if (cmg_exchange_req_write(st->ex, data, len) < 0)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
}

static void stream_free(struct h2stream *st)
{
    struct cmg_h2dev *h = st->d->h2;
    if (st->prev)
        st->prev->next = st->next;
    else if (h)
        h->streams = st->next;
    if (st->next)
        st->next->prev = st->prev;
    if (st->ex) {
        struct cmg_exchange *ex = st->ex;
        if (!ex->resp_eof || ex->resp_body.len) {
            if (!ex->status)
                ex->status = 499;
            cmg_exchange_log(ex, "stream closed by device");
        } else {
            cmg_exchange_log(ex, NULL);
        }
        release_exchange(st);
    }
    if (st->channel) {
        struct cmg_notify_channel *ch = st->channel;
        st->channel = NULL;
        cmg_notify_gone(ch);
    }
    cmg_buf_free(&st->sse);
    forget_head(st);
    cmg_policy_unref(st->hold);
    free(st->owned);
    if (h && st->admitted)
        h->quiet_since = cmg_loop_now(st->d->gw->loop);
    if (h && !h->streams)
        cmg_conn_idle(&st->d->conn);   /* nothing in flight: keep no buffers */
    if (h && !h->dead)
        schedule(st->d);
    free(st);
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t error_code, void *user)
{
    struct h2stream *st = nghttp2_session_get_stream_user_data(s, id);
    if (st) {
        nghttp2_session_set_stream_user_data(s, id, NULL);
        stream_free(st);
    }
    return 0;
}

/* ---- the connection ---- */

static bool busy(const struct cmg_h2dev *h)
{
    for (const struct h2stream *st = h->streams; st; st = st->next)
        if (st->admitted)
            return true;
    return false;
}

static struct cmg_log_limit stalled_bodies = {.what = "stalled HTTP/2 request bodies"};

/* A request body that makes no progress (nothing from the device, nothing taken by the
 * tunnel) for idle_timeout ends its stream, as over HTTP/1.1: a stream is not a way
 * to hold the connection open for free. */
static void end_stalled_bodies(struct cmg_device *d, uint64_t now)
{
    uint32_t idle = d->gw->cfg.idle_timeout_ms;

    for (struct h2stream *st = d->h2->streams; st; st = st->next) {
        if (!st->body_since || now - st->body_since < idle)
            continue;
        st->body_since = 0;
        cmg_log_limited(&stalled_bodies, CMG_LOG_INFO,
                        "device %s: HTTP/2 stream %d sent no request body for idle_timeout (%u s): "
                        "reset", d->conn.peer, st->id, idle / 1000);
        if (st->ex) {
            st->ex->status = 408;
            cmg_exchange_log(st->ex, "request body stalled");
            release_exchange(st);
        }
        st->reset_counted = true;   /* our own reset: not the device's rapid reset */
        nghttp2_submit_rst_stream(d->h2->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_CANCEL);
        kick(d);
    }
}

static void on_deadline(struct cmg_timer *t)
{
    struct cmg_device *d = (struct cmg_device *)((char *)t - offsetof(struct cmg_device, timer));
    struct cmg_h2dev *h = d->h2;
    const struct cmg_gw_config *cfg = &d->gw->cfg;
    uint64_t now = cmg_loop_now(d->gw->loop);

    if (!h || h->dead)
        return;
    if (h->notice_since && now - h->notice_since >= NOTICE_MS)
        final_goaway(d);
    end_stalled_bodies(d, now);
    if (h->ending_since && now - h->ending_since >= cfg->header_timeout_ms)
        cmg_device_close(d, "HTTP/2 GOAWAY not taken within header_timeout");
    else if (h->block_open && now - h->block_start >= cfg->header_timeout_ms)
        cmg_device_close(d, "HTTP/2 request headers not complete within header_timeout");
    else if (!busy(h) && !h->served && now - h->quiet_since >= cfg->header_timeout_ms)
        cmg_device_close(d, "no HTTP/2 request within header_timeout");
    else if (!busy(h) && h->served && now - h->quiet_since >= cfg->idle_timeout_ms)
        cmg_device_close(d, "idle timeout");
    else
        schedule(d);
}

static uint64_t earlier(uint64_t a, uint64_t b) { return a < b ? a : b; }

/* Arms the connection's timer for the nearest deadline. Only admitted requests move
 * quiet_since: PING, SETTINGS, WINDOW_UPDATE and refused streams keep nothing open. */
static void schedule(struct cmg_device *d)
{
    struct cmg_h2dev *h = d->h2;
    const struct cmg_gw_config *cfg = &d->gw->cfg;
    uint64_t now = cmg_loop_now(d->gw->loop), when = UINT64_MAX;

    if (!busy(h))
        when = h->quiet_since + (h->served ? cfg->idle_timeout_ms : cfg->header_timeout_ms);
    for (const struct h2stream *st = h->streams; st; st = st->next)
        if (st->body_since)
            when = earlier(when, st->body_since + cfg->idle_timeout_ms);
    if (h->block_open)
        when = earlier(when, h->block_start + cfg->header_timeout_ms);
    if (h->ending_since)
        when = earlier(when, h->ending_since + cfg->header_timeout_ms);
    if (h->notice_since)
        when = earlier(when, h->notice_since + NOTICE_MS);
    if (when == UINT64_MAX)
        cmg_timer_stop(d->gw->loop, &d->timer);
    else
        cmg_timer_start(d->gw->loop, &d->timer, when > now ? when - now : 0, on_deadline);
}

/* What follows input, read from the connection or fed: rc as cmg_h2_read() says. */
static void after_input(struct cmg_device *d, int rc)
{
    struct cmg_h2dev *h = d->h2;

    if (rc == CMG_H2_EOF) {
        cmg_device_close(d, "closed by device");
        return;
    }
    if (rc < 0) {
        cmg_info("device %s: HTTP/2 error: %s", d->conn.peer, nghttp2_strerror(rc));
        cmg_device_close(d, "HTTP/2 protocol error");
        return;
    }
    if (!h->ending_since && !nghttp2_session_want_read(h->s))
        h->ending_since = cmg_loop_now(d->gw->loop);
    schedule(d);
    h2_send(d);
}

void cmg_h2dev_on_read(struct cmg_device *d)
{
    if (d->h2 && !d->h2->dead)
        after_input(d, cmg_h2_read(d->h2->s, &d->conn, &d->h2->dead));
}

void cmg_h2dev_feed(struct cmg_device *d, const uint8_t *p, size_t n)
{
    if (d->h2 && !d->h2->dead && nghttp2_session_want_read(d->h2->s))
        after_input(d, cmg_h2_recv(d->h2->s, p, n));
}

void cmg_h2dev_on_drain(struct cmg_device *d) { h2_send(d); }

int cmg_h2dev_start(struct cmg_device *d)
{
    struct cmg_h2dev *h = calloc(1, sizeof(*h));
    nghttp2_session_callbacks *cb = NULL;
    nghttp2_option *opt = NULL;
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, d->gw->cfg.max_header_size},
    };
    int rc = -1;

    if (!h || nghttp2_session_callbacks_new(&cb) != 0 || nghttp2_option_new(&opt) != 0)
        goto out;
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_session_callbacks_set_send_data_callback(cb, send_body);
    cmg_h2_large_frames(cb);
    nghttp2_option_set_no_auto_window_update(opt, 1);
    /* Closed streams are forgotten at once (we use no priorities); a header block
     * may span the CONTINUATION frames that max_header_size needs, no more;
     * nghttp2's own RST_STREAM limit stays as a backstop behind count_reset(). */
    nghttp2_option_set_no_closed_streams(opt, 1);
    nghttp2_option_set_max_continuations(opt, d->gw->cfg.max_header_size / 16384 + 2);
    if (nghttp2_session_server_new2(&h->s, cb, d, opt) != 0)
        goto out;
    h->d = d;
    d->h2 = h;
    nghttp2_submit_settings(h->s, NGHTTP2_FLAG_NONE, settings, 3);
    nghttp2_session_set_local_window_size(h->s, NGHTTP2_FLAG_NONE, 0, CONNECTION_WINDOW);
    h->quiet_since = h->reset_window = cmg_loop_now(d->gw->loop);
    schedule(d);
    cmg_conn_want_read(&d->conn, true);
    kick(d);
    rc = 0;
out:
    if (rc < 0)
        free(h);
    nghttp2_session_callbacks_del(cb);
    nghttp2_option_del(opt);
    return rc;
}

/* The gateway drains: a GOAWAY notice (streams the device opens meanwhile are still
 * taken), then the final GOAWAY with the last stream taken; the streams in flight finish,
 * then the session ends and the connection closes. */
void cmg_h2dev_drain(struct cmg_device *d)
{
    struct cmg_h2dev *h = d->h2;

    if (h->dead || h->draining)
        return;
    h2_send(d);   /* notification streams the drain ended: END_STREAM before the GOAWAY */
    if (d->h2 != h || h->dead)
        return;
    h->draining = true;
    if (nghttp2_submit_shutdown_notice(h->s) != 0) {
        kick(d);   /* a GOAWAY is out already (rapid reset) */
        return;
    }
    nghttp2_submit_ping(h->s, NGHTTP2_FLAG_NONE, NULL);
    h->notice_since = cmg_loop_now(d->gw->loop);
    schedule(d);
    kick(d);
}

void cmg_h2dev_free(struct cmg_device *d)
{
    struct cmg_h2dev *h = d->h2;
    if (!h)
        return;
    h->dead = true;
    cmg_task_cancel(d->gw->loop, &h->send_task);
    /* Deleting the session calls no stream-close callbacks: free the streams here. */
    while (h->streams)
        stream_free(h->streams);
    nghttp2_session_del(h->s);
    d->h2 = NULL;
    free(h);
}
