/* An exchange relays one request from a device connection (HTTP/1.1 or a
 * stream of HTTP/2) to a stream of a tunnel, and the response back. Each side
 * detaches when it is finished; the last one frees it.
 *
 * Buffering. A response's bytes wait here until the device takes them; the tunnel's
 * stream window (re-opened only as the device takes) bounds what one stream holds,
 * while the connection window's credit goes back as soon as the bytes are buffered,
 * so a device that stops reading holds up its own stream and no other. Every
 * exchange's request and response bytes count against one process-wide budget,
 * max_buffer_memory: once it is spent, no window is re-opened (producers pause)
 * until the exchanges hold less than its low mark again. And a device that takes
 * nothing for send_timeout while bytes wait for it ends its exchange, whichever
 * protocol it speaks: both call cmg_exchange_resp_consumed. */
#include "core/log.h"
#include "gateway/gw.h"

#include <stdlib.h>
#include <string.h>

#define GW_OF_BUDGET(p) ((struct cmg_gateway *)((char *)(p) - offsetof(struct cmg_gateway, budget_task)))
#define BUDGET_WARN_MS 10000
#define EX_OF_TIMER(p) ((struct cmg_exchange *)((char *)(p) - offsetof(struct cmg_exchange, send_timer)))

/* ---- the buffer budget ---- */

/* Credit held back is paid once the exchanges hold less than 7/8 of the budget: a
 * budget at its edge does not walk every exchange for each frame. */
static uint64_t low_mark(const struct cmg_gateway *gw)
{
    return gw->cfg.max_buffer_memory - gw->cfg.max_buffer_memory / 8;
}

static void pay_back(struct cmg_exchange *ex)
{
    struct cmg_tunnel *t = ex->tun;

    if (ex->credit_owed && !ex->stream_closed)
        nghttp2_session_consume_stream(t->h2, ex->stream_id, ex->credit_owed);
    ex->credit_owed = 0;
    if ((ex->room_owed || ex->room_wanted) && ex->dev) {
        size_t n = ex->room_owed;
        ex->room_owed = 0;
        ex->room_wanted = false;
        ex->dev_ops->on_request_room(ex, n);
    }
}

/* Runs as a task, outside any session's callback: it re-opens windows on every tunnel. */
static void on_budget_task(struct cmg_task *task)
{
    struct cmg_gateway *gw = GW_OF_BUDGET(task);

    if (!gw->budget_spent || gw->buffered >= low_mark(gw))
        return;
    gw->budget_spent = false;
    if (gw->budget_logged)
        cmg_info("buffer budget: %llu bytes held, below the low mark again; tunnels and uploads "
                 "resume", (unsigned long long)gw->buffered);
    for (struct cmg_tunnel *t = gw->tunnels; t; t = t->next) {
        if (t->dead || !t->h2)
            continue;
        for (struct cmg_exchange *ex = t->exchanges; ex; ex = ex->tun_next)
            pay_back(ex);
        if (t->credit_owed)
            nghttp2_session_consume_connection(t->h2, t->credit_owed);
        t->credit_owed = 0;
        cmg_tunnel_kick(t);
    }
}

/* Keeps gw->buffered equal to what the exchanges hold. */
static void account(struct cmg_exchange *ex, size_t now_held)
{
    struct cmg_gateway *gw = ex->gw;

    gw->buffered = gw->buffered - ex->held + now_held;
    ex->held = now_held;
    if (gw->budget_spent && gw->buffered < low_mark(gw))
        cmg_task_post(gw->loop, &gw->budget_task, on_budget_task);
}

static void account_kept(struct cmg_exchange *ex, size_t now_kept)
{
    ex->gw->kept = ex->gw->kept - ex->kept + now_kept;
    ex->kept = now_kept;
}

static void account_buffers(struct cmg_exchange *ex)
{
    account_kept(ex, ex->req_sent.len);
    account(ex, ex->req_body.len + ex->req_sent.len + ex->resp_body.len);
}

/* A budget at its edge may be spent many times a second: one warning per
 * BUDGET_WARN_MS, which counts the times in between. */
static void log_spent(struct cmg_gateway *gw)
{
    uint64_t now = cmg_loop_now(gw->loop);

    gw->budget_logged = gw->budget_warned_ms == 0 || now - gw->budget_warned_ms >= BUDGET_WARN_MS;
    if (!gw->budget_logged) {
        gw->budget_unlogged++;
        return;
    }
    cmg_warn("buffer budget spent: %llu bytes held for devices and connectors "
             "(max_buffer_memory = %llu); tunnels and uploads pause until devices take their data "
             "(%u more time(s) since the last warning)",
             (unsigned long long)gw->buffered, (unsigned long long)gw->cfg.max_buffer_memory,
             gw->budget_unlogged);
    gw->budget_warned_ms = now;
    gw->budget_unlogged = 0;
}

/* Whether window credit must be held back now. Once spent, the budget stays spent
 * until the low mark, so credit is paid back in the order it was held. */
static bool budget_spent(struct cmg_gateway *gw)
{
    if (gw->budget_spent)
        return true;
    if (gw->buffered < gw->cfg.max_buffer_memory)
        return false;
    gw->budget_spent = true;
    log_spent(gw);
    return true;
}

/* ---- send_timeout: a device that takes nothing ---- */

static void on_send_timeout(struct cmg_timer *tm)
{
    struct cmg_exchange *ex = EX_OF_TIMER(tm);
    uint64_t limit = ex->gw->cfg.send_timeout_ms;
    uint64_t still = cmg_loop_now(ex->gw->loop) - ex->progress_ms;

    if (!ex->dev || ex->resp_body.len == 0)
        return;   /* nothing waits for the device: armed again when something does */
    if (still < limit) {
        cmg_timer_start(ex->gw->loop, &ex->send_timer, limit - still, on_send_timeout);
        return;
    }
    cmg_warn("send timeout: device peer=%s client=%s took nothing for %llu s; path=%s "
             "sent=%llu bytes, %zu waiting; its stream is ended",
             ex->peer, ex->identity, (unsigned long long)(still / 1000),
             ex->target ? ex->target : "-", (unsigned long long)ex->resp_bytes, ex->resp_body.len);
    ex->dev_ops->on_fail(ex, ex->status ? ex->status : 504, "send timeout");
}

/* Progress is noted as a time stamp; the timer looks at it when it fires, so a
 * device that keeps reading costs no timer operation per write. */
static void watch_device(struct cmg_exchange *ex)
{
    if (ex->resp_body.len == 0 || cmg_timer_armed(&ex->send_timer))
        return;
    ex->progress_ms = cmg_loop_now(ex->gw->loop);
    cmg_timer_start(ex->gw->loop, &ex->send_timer, ex->gw->cfg.send_timeout_ms, on_send_timeout);
}

/* ---- life ---- */

struct cmg_exchange *cmg_exchange_new(struct cmg_gateway *gw, const struct cmg_exchange_dev_ops *ops,
                                      void *dev)
{
    struct cmg_exchange *ex = calloc(1, sizeof(*ex));
    if (!ex)
        return NULL;
    ex->gw = gw;
    ex->dev_ops = ops;
    ex->dev = dev;
    ex->stream_id = -1;
    ex->start_ms = cmg_loop_now(gw->loop);
    return ex;
}

void cmg_exchange_free(struct cmg_exchange *ex)
{
    if (!ex)
        return;
    cmg_timer_stop(ex->gw->loop, &ex->send_timer);
    account(ex, 0);
    if (ex->counted) {
        ex->gw->nexchanges--;
        ex->gw->drain_finished += ex->gw->state == CMG_GW_DRAINING;
    }
    account_kept(ex, 0);
    free(ex->target);
    cmg_policy_unref(ex->policy);
    cmg_headers_free(&ex->req);
    cmg_headers_free(&ex->resp);
    cmg_buf_free(&ex->req_body);
    cmg_buf_free(&ex->req_sent);
    cmg_buf_free(&ex->resp_body);
    free(ex);
}

int cmg_exchange_start(struct cmg_exchange *ex)
{
    struct cmg_tunnel *t = cmg_tunnel_pick(ex->gw, ex->mapping);
    if (!t)
        return 503;
    if (cmg_tunnel_submit(t, ex) < 0)
        return 502;
    ex->counted = true;
    ex->gw->nexchanges++;
    return 0;
}

/* Whether a request whose tunnel failed, or whose stream the connector refused, may be
 * sent again: nothing of the response came back, every body byte received so far is
 * still here (not yet sent, or kept in req_sent), and sending it twice does no harm:
 * the connector never started it upstream (a refused stream), or its method is
 * idempotent (the first may have reached the internal service). */
static bool safe_to_retry(const struct cmg_exchange *ex, bool never_started)
{
    static const char *const idempotent[] = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"};
    bool method_ok = never_started;

    if (ex->retried || !ex->dev || ex->resp_told || ex->resp_body.len)
        return false;
    if (ex->req_body_expected && ex->req_body_lost)
        return false;
    for (size_t i = 0; i < sizeof(idempotent) / sizeof(idempotent[0]); i++)
        method_ok |= !strcmp(ex->method, idempotent[i]);
    return method_ok;
}

bool cmg_exchange_retry(struct cmg_exchange *ex, const char *failed, bool never_started)
{
    struct cmg_tunnel *t;

    if (!safe_to_retry(ex, never_started) || !(t = cmg_tunnel_pick(ex->gw, ex->mapping)))
        return false;
    /* What the dead tunnel left: a partial header block, credit owed to its session. */
    ex->retried = true;
    ex->tun = NULL;
    ex->stream_id = -1;
    ex->stream_closed = false;
    ex->status = 0;
    ex->resp_headers = false;
    ex->resp_eof = false;
    ex->credit_owed = 0;
    cmg_headers_reset(&ex->resp);
    if (cmg_tunnel_submit(t, ex) < 0)
        return false;
    if (never_started)
        cmg_info("%s %s retried on connector=%s: connector=%s refused it unstarted (draining)",
                 ex->method, ex->target ? ex->target : "-", t->name, failed);
    else
        cmg_info("%s %s retried on connector=%s after tunnel to %s failed", ex->method,
                 ex->target ? ex->target : "-", t->name, failed);
    return true;
}

/* ---- the request: device → connector ---- */

static void resume_request(struct cmg_exchange *ex)
{
    if (!ex->tun || ex->stream_closed || ex->stream_id < 0)
        return;
    nghttp2_session_resume_data(ex->tun->h2, ex->stream_id);
    cmg_tunnel_kick(ex->tun);
}

int cmg_exchange_req_write(struct cmg_exchange *ex, const void *p, size_t n)
{
    if (cmg_buf_append(&ex->req_body, p, n) < 0)
        return -1;
    ex->req_bytes += n;
    account_buffers(ex);
    resume_request(ex);
    return 0;
}

void cmg_exchange_req_end(struct cmg_exchange *ex)
{
    ex->req_eof = true;
    resume_request(ex);
}

bool cmg_exchange_req_full(struct cmg_exchange *ex)
{
    if (ex->req_body.len >= CMG_EX_BUFFER)
        return true;   /* on_request_room comes as the tunnel takes it */
    if (!budget_spent(ex->gw))
        return false;
    ex->room_wanted = true;   /* on_request_room comes when the budget is paid back */
    return true;
}

/* No more is kept: what was is freed, and the body can no longer be sent again. */
static void drop_kept(struct cmg_exchange *ex)
{
    ex->req_body_lost = true;
    cmg_buf_free(&ex->req_sent);
    account_buffers(ex);
}

void cmg_exchange_req_keep(struct cmg_exchange *ex, const void *p, size_t n)
{
    if (ex->req_body_lost || ex->retried)
        return;   /* a retried request is not retried again: nothing to keep */
    if (ex->req_sent.len + n > CMG_EX_BUFFER || ex->gw->kept + n > ex->gw->cfg.max_buffer_memory / 8 ||
        budget_spent(ex->gw) || cmg_buf_append(&ex->req_sent, p, n) < 0) {
        drop_kept(ex);
        return;
    }
    account_buffers(ex);
}

void cmg_exchange_req_unkeep(struct cmg_exchange *ex)
{
    drop_kept(ex);
}

void cmg_exchange_req_replayed(struct cmg_exchange *ex)
{
    account_buffers(ex);
}

void cmg_exchange_req_taken(struct cmg_exchange *ex, size_t n)
{
    account_buffers(ex);
    if (!ex->dev)
        return;
    if (budget_spent(ex->gw))
        ex->room_owed += n;
    else
        ex->dev_ops->on_request_room(ex, n);
}

/* ---- the response: connector → device ---- */

int cmg_exchange_resp_data(struct cmg_exchange *ex, const uint8_t *data, size_t len)
{
    struct cmg_tunnel *t = ex->tun;

    if (!t || cmg_buf_append(&ex->resp_body, data, len) < 0)
        return -1;
    account_buffers(ex);
    /* The connection window opens again at once: these bytes are one stream's, held
     * within its own window, and must not hold up the tunnel's other streams. */
    if (budget_spent(ex->gw))
        t->credit_owed += len;
    else
        nghttp2_session_consume_connection(t->h2, len);
    watch_device(ex);
    cmg_exchange_resp_news(ex);
    return 0;
}

void cmg_exchange_resp_news(struct cmg_exchange *ex)
{
    if (ex->resp_told) {
        ex->dev_ops->on_response_body(ex);
        return;
    }
    ex->resp_told = true;
    if (!ex->retried)   /* no retry from here on; a retry's replay still goes out whole */
        drop_kept(ex);
    ex->dev_ops->on_response(ex);   /* takes what body there is, too */
}

void cmg_exchange_resp_consumed(struct cmg_exchange *ex, size_t n)
{
    if (n == 0)
        return;
    ex->progress_ms = cmg_loop_now(ex->gw->loop);
    account_buffers(ex);
    if (!ex->tun || ex->stream_closed)
        return;
    /* The stream's window opens only as its device takes the bytes. */
    if (budget_spent(ex->gw)) {
        ex->credit_owed += n;
        return;
    }
    nghttp2_session_consume_stream(ex->tun->h2, ex->stream_id, n);
    cmg_tunnel_kick(ex->tun);
}

/* ---- the end ---- */

void cmg_exchange_unlink(struct cmg_exchange *ex)
{
    struct cmg_tunnel *t = ex->tun;
    /* The connection window's credit for what the device never took went back when it
     * was buffered (or is held on the tunnel while the budget is spent). */
    if (ex->tun_prev)
        ex->tun_prev->tun_next = ex->tun_next;
    else
        t->exchanges = ex->tun_next;
    if (ex->tun_next)
        ex->tun_next->tun_prev = ex->tun_prev;
    ex->tun = NULL;
}

void cmg_exchange_dev_done(struct cmg_exchange *ex)
{
    struct cmg_tunnel *t = ex->tun;

    ex->dev = NULL;
    if (t) {
        /* A stream whose both ends are done closes by itself: a reset is only
         * for one cut short (the connector limits the rate of resets). */
        if (!ex->stream_closed) {
            nghttp2_session_set_stream_user_data(t->h2, ex->stream_id, NULL);
            if (!(ex->resp_eof && (ex->req_eof || !ex->req_body_expected)))
                nghttp2_submit_rst_stream(t->h2, NGHTTP2_FLAG_NONE, ex->stream_id, NGHTTP2_CANCEL);
        }
        cmg_exchange_unlink(ex);
        cmg_tunnel_kick(t);
    }
    cmg_exchange_free(ex);
}
