#include "http/h2.h"

#include <stdio.h>
#include <string.h>

int cmg_h2_send(nghttp2_session *s, struct cmg_conn *c)
{
    for (;;) {
        while (c->out.len < CMG_H2_OUT_HIGH) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(s, &data);
            if (n < 0)
                return (int)n;
            if (n == 0)
                break;
            if (cmg_buf_append(&c->out, data, (size_t)n) < 0)
                return NGHTTP2_ERR_NOMEM;
        }
        if (!c->out.len)
            return 0;
        cmg_conn_flush(c);
        /* Written at once: the session may have more. Otherwise on_drain resumes. */
        if (c->out.len || !cmg_conn_open(c) || !nghttp2_session_want_write(s))
            return 0;
    }
}

int cmg_h2_finished(nghttp2_session *s, const struct cmg_conn *c)
{
    return !nghttp2_session_want_read(s) && !nghttp2_session_want_write(s) && c->out.len == 0;
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

int cmg_h2_submit_text(nghttp2_session *s, int32_t stream_id, int status, const char *body,
                       struct cmg_h2_text *text)
{
    char code[8], len[24];
    nghttp2_data_provider dp = {.source.ptr = text, .read_callback = read_text};
    nghttp2_nv nv[3];

    snprintf(code, sizeof(code), "%d", status);
    text->p = body;
    text->left = strlen(body);
    snprintf(len, sizeof(len), "%zu", text->left);
    nv[0] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)code, 7, strlen(code), 0};
    nv[1] = (nghttp2_nv){(uint8_t *)"content-type", (uint8_t *)"text/plain", 12, 10, 0};
    nv[2] = (nghttp2_nv){(uint8_t *)"content-length", (uint8_t *)len, 14, strlen(len), 0};
    return nghttp2_submit_response(s, stream_id, nv, 3, &dp);
}
