#include "http/h2.h"

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
