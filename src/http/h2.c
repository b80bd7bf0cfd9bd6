#include "http/h2.h"
#include "http/headers.h"

#include <stdio.h>
#include <string.h>

int cmg_h2_read(nghttp2_session *s, struct cmg_conn *c, const bool *stop)
{
    uint8_t buf[CMG_H2_READ_CHUNK];

    while (!(stop && *stop)) {
        ssize_t n;
        int rc;
        if (!nghttp2_session_want_read(s)) {
            cmg_conn_want_read(c, false);
            return 0;
        }
        n = cmg_conn_read(c, buf, sizeof(buf));
        if (n == CMG_AGAIN)
            return 0;
        if (n == 0)
            return CMG_H2_EOF;
        rc = cmg_h2_recv(s, buf, (size_t)n);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int cmg_h2_recv(nghttp2_session *s, const uint8_t *p, size_t n)
{
    ssize_t used = nghttp2_session_mem_recv(s, p, n);
    return used < 0 ? (int)used : 0;
}

int cmg_h2_send(nghttp2_session *s, struct cmg_conn *c)
{
    for (;;) {
        while (cmg_conn_pending(c) < CMG_H2_OUT_HIGH) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(s, &data);
            if (n < 0)
                return (int)n;
            if (n == 0)
                break;
            if (cmg_buf_append(&c->out, data, (size_t)n) < 0)
                return NGHTTP2_ERR_NOMEM;
        }
        if (!cmg_conn_pending(c))
            return 0;
        cmg_conn_flush(c);
        /* Written at once: the session may have more. Otherwise on_drain resumes. */
        if (cmg_conn_pending(c) || !cmg_conn_open(c) || !nghttp2_session_want_write(s))
            return 0;
    }
}

int cmg_h2_finished(nghttp2_session *s, const struct cmg_conn *c)
{
    return !nghttp2_session_want_read(s) && !nghttp2_session_want_write(s) && cmg_conn_pending(c) == 0;
}

ssize_t cmg_h2_offer(const struct cmg_buf *src, bool eof, size_t length, uint32_t *flags)
{
    size_t n = src->len < length ? src->len : length;

    if (eof && n == src->len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    else if (n == 0)
        return NGHTTP2_ERR_DEFERRED;
    if (n)
        *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
    return (ssize_t)n;
}

int cmg_h2_put_data(struct cmg_conn *c, const nghttp2_frame *frame, const uint8_t *framehd,
                    size_t length, struct cmg_buf *src)
{
    /* We never ask for padding; and src holds what cmg_h2_offer() saw, or more. */
    if (frame->data.padlen || length > src->len)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    if (cmg_buf_append(&c->out, framehd, 9) < 0 || cmg_conn_write(c, cmg_buf_head(src), length) < 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    cmg_buf_consume(src, length);
    return 0;
}

static ssize_t data_length(nghttp2_session *s, uint8_t type, int32_t id, int32_t session_window,
                           int32_t stream_window, uint32_t peer_max_frame, void *user)
{
    int32_t n = session_window < stream_window ? session_window : stream_window;

    (void)s;
    (void)type;
    (void)id;
    (void)user;
    if ((uint32_t)n > peer_max_frame)
        n = (int32_t)peer_max_frame;
    return n > CMG_H2_MAX_FRAME ? CMG_H2_MAX_FRAME : n;
}

void cmg_h2_large_frames(nghttp2_session_callbacks *cb)
{
    nghttp2_session_callbacks_set_data_source_read_length_callback(cb, data_length);
}

static ssize_t read_text(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct cmg_h2_text *t = src->ptr;
    size_t n = t->left < length ? t->left : length;
    memcpy(buf, t->p, n);
    t->p += n;
    t->left -= n;
    if (!t->left)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

/* One answer made here: a type, a body (or none), an optional cache lifetime and reason. */
static int submit(nghttp2_session *s, int32_t stream_id, int status, const char *type,
                  const void *body, size_t len, long long max_age, bool no_body,
                  const char *reason, struct cmg_h2_text *text)
{
    char code[8], clen[24], cache[32];
    nghttp2_data_provider dp = {.source.ptr = text, .read_callback = read_text};
    nghttp2_nv nv[5];
    size_t n = 0;

    snprintf(code, sizeof(code), "%d", status);
    snprintf(clen, sizeof(clen), "%zu", len);
    snprintf(cache, sizeof(cache), "max-age=%lld", max_age);
    text->p = body;
    text->left = len;
    nv[n++] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)code, 7, strlen(code), 0};
    nv[n++] = (nghttp2_nv){(uint8_t *)"content-type", (uint8_t *)type, 12, strlen(type), 0};
    nv[n++] = (nghttp2_nv){(uint8_t *)"content-length", (uint8_t *)clen, 14, strlen(clen), 0};
    if (max_age >= 0)
        nv[n++] = (nghttp2_nv){(uint8_t *)"cache-control", (uint8_t *)cache, 13, strlen(cache), 0};
    if (reason)
        nv[n++] = (nghttp2_nv){(uint8_t *)CMG_REASON_HEADER, (uint8_t *)reason,
                               sizeof(CMG_REASON_HEADER) - 1, strlen(reason), 0};
    return nghttp2_submit_response(s, stream_id, nv, n, no_body || !len ? NULL : &dp);
}

int cmg_h2_submit_local(nghttp2_session *s, int32_t stream_id, int status, const char *type,
                        const void *body, size_t len, long long max_age, bool no_body,
                        struct cmg_h2_text *text)
{
    return submit(s, stream_id, status, type, body, len, max_age, no_body, NULL, text);
}

int cmg_h2_submit_text(nghttp2_session *s, int32_t stream_id, int status, const char *body,
                       struct cmg_h2_text *text)
{
    return submit(s, stream_id, status, "text/plain", body, strlen(body), -1, false, NULL, text);
}

int cmg_h2_submit_reason(nghttp2_session *s, int32_t stream_id, int status, const char *body,
                         const char *reason, struct cmg_h2_text *text)
{
    return submit(s, stream_id, status, "text/plain", body, strlen(body), -1, false, reason, text);
}
