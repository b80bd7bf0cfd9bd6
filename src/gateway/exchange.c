/* An exchange relays one request from a device connection (HTTP/1.1 or a
 * stream of HTTP/2) to a stream of a tunnel, and the response back. Each side
 * detaches when it is finished; the last one frees it. */
#include "core/log.h"
#include "gateway/gw.h"

#include <stdlib.h>

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
    free(ex->target);
    cmg_policy_unref(ex->policy);
    cmg_headers_free(&ex->req);
    cmg_headers_free(&ex->resp);
    cmg_buf_free(&ex->req_body);
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
    return 0;
}

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
    resume_request(ex);
    return 0;
}

void cmg_exchange_req_end(struct cmg_exchange *ex)
{
    ex->req_eof = true;
    resume_request(ex);
}

void cmg_exchange_resp_consumed(struct cmg_exchange *ex, size_t n)
{
    if (!ex->tun || n == 0)
        return;
    /* Opens the tunnel's flow-control windows again: only now may more arrive. */
    nghttp2_session_consume(ex->tun->h2, ex->stream_id, n);
    cmg_tunnel_kick(ex->tun);
}

void cmg_exchange_unlink(struct cmg_exchange *ex)
{
    struct cmg_tunnel *t = ex->tun;
    /* What the device never took still counts against the connection window. */
    if (ex->resp_body.len)
        nghttp2_session_consume_connection(t->h2, ex->resp_body.len);
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
