/* HTTP/2 on a load connection: an nghttp2 client session fed from and drained
 * into the connection's TLS stream. Each request is a stream with a slot of the
 * connection (no allocation per request); the response body is counted and
 * dropped; nghttp2 opens the windows again as it is consumed. */
#include "load.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STREAM_WINDOW (16 << 20)
#define CONNECTION_WINDOW (32 << 20)
#define FILL_HIGH (64 * 1024)

int load_h2_append(struct load_conn *c, const void *p, size_t n);   /* conn.c */

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user)
{
    struct load_stream *st;
    int status = 0;

    if (frame->hd.type != NGHTTP2_HEADERS || namelen != 7 || memcmp(name, ":status", 7) != 0)
        return 0;
    st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (!st)
        return 0;
    for (size_t i = 0; i < valuelen && i < 3; i++)
        status = status * 10 + (value[i] - '0');
    if (status >= 200)   /* interim answers (1xx) are not the response */
        st->status = status;
    return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t stream_id,
                         const uint8_t *data, size_t len, void *user)
{
    struct load_conn *c = user;
    load_worker_body_in(c, len);
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t stream_id, uint32_t error_code, void *user)
{
    struct load_conn *c = user;
    struct load_stream *st = nghttp2_session_get_stream_user_data(s, stream_id);
    int status;
    uint64_t start;

    if (!st)
        return 0;
    status = error_code == NGHTTP2_NO_ERROR ? st->status : 0;
    start = st->start_ns;
    st->used = false;
    c->inflight--;
    nghttp2_session_set_stream_user_data(s, stream_id, NULL);
    /* Status 0: reset or cut short; the worker counts it as an error. */
    load_worker_done(c, start, status, 0);
    return 0;
}

static ssize_t read_body(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct load_stream *st = src->ptr;
    size_t n = st->body_left < length ? (size_t)st->body_left : length;
    size_t off = 0;

    while (off < n) {
        size_t k = n - off < sizeof(load_pattern) ? n - off : sizeof(load_pattern);
        memcpy(buf + off, load_pattern, k);
        off += k;
    }
    st->body_left -= n;
    load_worker_body_out(st->c, n);
    if (!st->body_left)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

int load_h2_start(struct load_conn *c)
{
    nghttp2_session_callbacks *cb;
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW},
    };
    int rc;

    if (!c->slots && !(c->slots = calloc(c->w->o->streams, sizeof(*c->slots))))
        return -1;
    if (nghttp2_session_callbacks_new(&cb) != 0)
        return -1;
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    rc = nghttp2_session_client_new(&c->h2, cb, c);
    nghttp2_session_callbacks_del(cb);
    if (rc != 0)
        return -1;
    c->inflight = 0;
    for (unsigned i = 0; i < c->w->o->streams; i++)
        c->slots[i].used = false;
    if (nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, settings, 3) != 0 ||
        nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, CONNECTION_WINDOW) != 0)
        return -1;
    return 0;
}

int load_h2_submit(struct load_conn *c, uint64_t start_ns)
{
    const struct load_opts *o = c->w->o;
    struct load_stream *st = NULL;
    nghttp2_nv nv[8 + LOAD_MAX_HEADERS];
    nghttp2_data_provider dp = {.read_callback = read_body};
    char bearer[4096], length[24];
    size_t k = 0;
    int32_t id;

    for (unsigned i = 0; i < o->streams; i++)
        if (!c->slots[i].used) {
            st = &c->slots[i];
            break;
        }
    if (!st)
        return -1;
#define NV(n, nl, v, vl) nv[k++] = (nghttp2_nv){(uint8_t *)(n), (uint8_t *)(v), (nl), (vl), NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE}
    NV(":method", 7, o->method, strlen(o->method));
    NV(":scheme", 7, o->tls ? "https" : "http", o->tls ? 5 : 4);
    NV(":authority", 10, o->authority, strlen(o->authority));
    NV(":path", 5, o->path, strlen(o->path));
    NV("user-agent", 10, "cmg-load", 8);
#undef NV
    if (o->bearer) {
        int n = snprintf(bearer, sizeof(bearer), "Bearer %s", o->bearer);
        nv[k++] = (nghttp2_nv){(uint8_t *)"authorization", (uint8_t *)bearer, 13, (size_t)n,
                               NGHTTP2_NV_FLAG_NO_INDEX};
    }
    if (o->body_size) {
        int n = snprintf(length, sizeof(length), "%llu", (unsigned long long)o->body_size);
        nv[k++] = (nghttp2_nv){(uint8_t *)"content-length", (uint8_t *)length, 14, (size_t)n,
                               NGHTTP2_NV_FLAG_NONE};
    }
    for (int i = 0; i < o->nheaders; i++) {
        /* "Name: value"; HTTP/2 wants the name in lower case (checked at parse time). */
        const char *colon = strchr(o->headers[i], ':');
        const char *v = colon + 1;
        while (*v == ' ')
            v++;
        nv[k++] = (nghttp2_nv){(uint8_t *)o->headers[i], (uint8_t *)v,
                               (size_t)(colon - o->headers[i]), strlen(v), NGHTTP2_NV_FLAG_NONE};
    }
    st->c = c;
    st->status = 0;
    st->start_ns = start_ns;
    st->body_left = o->body_size;
    dp.source.ptr = st;
    id = nghttp2_submit_request(c->h2, NULL, nv, k, o->body_size ? &dp : NULL, st);
    if (id < 0)
        return -1;
    st->used = true;
    c->inflight++;
    return 0;
}

int load_h2_recv(struct load_conn *c, const uint8_t *p, size_t n)
{
    ssize_t used = nghttp2_session_mem_recv(c->h2, p, n);
    return used < 0 ? -1 : 0;
}

int load_h2_fill(struct load_conn *c)
{
    size_t queued = 0;
    while (queued < FILL_HIGH && c->h2) {
        const uint8_t *data;
        ssize_t n = nghttp2_session_mem_send(c->h2, &data);
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        if (load_h2_append(c, data, (size_t)n) < 0)
            return -1;
        queued += (size_t)n;
    }
    return 0;
}

void load_h2_free(struct load_conn *c)
{
    if (!c->h2)
        return;
    nghttp2_session_del(c->h2);
    c->h2 = NULL;
    c->inflight = 0;
}
