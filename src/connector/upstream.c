/* Upstream: HTTP/1.1 (plain or TLS) to an internal service, one request at a
 * time per connection, connections kept alive in a small pool per mapping. */
#include "connector/cn.h"
#include "core/log.h"
#include "tls/tls.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_CHUNK (64 * 1024)
#define MAX_IDLE 64
#define IDLE_MS 30000
#define MAX_RESPONSE_HEAD (64 * 1024)
#define MAX_RESPONSE_FIELDS 1000

static void release(struct cmg_upstream *u);

static void upstream_free(void *p)
{
    struct cmg_upstream *u = p;
    cmg_headers_free(&u->resp);
    free(u);
}

static void list_remove(struct cmg_upstream **head, struct cmg_upstream *u)
{
    if (u->prev)
        u->prev->next = u->next;
    else if (*head == u)
        *head = u->next;
    if (u->next)
        u->next->prev = u->prev;
    u->prev = u->next = NULL;
}

static void list_push(struct cmg_upstream **head, struct cmg_upstream *u)
{
    u->prev = NULL;
    u->next = *head;
    if (*head)
        (*head)->prev = u;
    *head = u;
}

/* Closes the connection and frees it after this loop round. */
static void destroy(struct cmg_upstream *u)
{
    if (u->st) {
        u->st->up = NULL;
        u->st = NULL;
        list_remove(&u->cn->busy, u);
    } else {
        list_remove(&u->m->idle, u);
        u->m->nidle--;
    }
    cmg_timer_stop(u->cn->loop, &u->timer);
    cmg_task_cancel(u->cn->loop, &u->body_task);
    cmg_conn_close(&u->conn);
    cmg_loop_free_later(u->cn->loop, u, upstream_free);
}

static void fail(struct cmg_upstream *u, int status, enum cmg_cn_failure cause, const char *why)
{
    struct cmg_cn_stream *st = u->st;
    struct cmg_connector *cn = u->cn;
    /* A kept-alive connection that the server had closed meanwhile: a request
     * without a body is safe to send again on a new one. */
    bool retry = st && u->reused && !u->got_bytes && !st->has_body && !st->resp_submitted;

    destroy(u);
    if (retry) {
        cmg_debug("kept-alive connection to %s was stale; retrying", st->m->internal_url);
        cmg_upstream_start(cn, st);   /* which fails the stream if it cannot */
        return;
    }
    if (st)
        cmg_cn_stream_fail(st, status, cause, why);
}

static void on_timeout(struct cmg_timer *t)
{
    struct cmg_upstream *u = (struct cmg_upstream *)((char *)t - offsetof(struct cmg_upstream, timer));
    if (u->st)
        fail(u, 504, CMG_CN_FAIL_TIMEOUT, "internal service timed out");
    else
        destroy(u);   /* idle too long */
}

static void arm(struct cmg_upstream *u)
{
    cmg_timer_start(u->cn->loop, &u->timer, u->cn->cfg.upstream_timeout_ms, on_timeout);
}

/* ---- response parsing ---- */

static struct cmg_upstream *upstream_of(llhttp_t *p)
{
    return (struct cmg_upstream *)((char *)p - offsetof(struct cmg_upstream, parser));
}

static int on_message_begin(llhttp_t *p)
{
    struct cmg_upstream *u = upstream_of(p);
    cmg_h1_head_begin(&u->resp_head);
    u->informational = false;
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    return cmg_h1_head_field(&upstream_of(p)->resp_head, at, n);
}

static int on_header_field_complete(llhttp_t *p)
{
    return cmg_h1_head_field_done(&upstream_of(p)->resp_head);
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    return cmg_h1_head_value(&upstream_of(p)->resp_head, at, n);
}

static int on_header_value_complete(llhttp_t *p)
{
    return cmg_h1_head_value_done(&upstream_of(p)->resp_head);
}

static int on_headers_complete(llhttp_t *p)
{
    struct cmg_upstream *u = (struct cmg_upstream *)((char *)p - offsetof(struct cmg_upstream, parser));
    int status = p->status_code;

    if (status >= 100 && status < 200) {
        if (status == 101)
            return -1;   /* no upgrades through the gateway */
        u->informational = true;
        return 0;
    }
    /* Lower-case names: they go on as HTTP/2. */
    for (uint32_t i = 0; i < u->resp.n; i++) {
        char *name = u->resp.arena.data + u->resp.v[i].name;
        for (uint32_t k = 0; k < u->resp.v[i].name_len; k++)
            if (name[k] >= 'A' && name[k] <= 'Z')
                name[k] = (char)(name[k] - 'A' + 'a');
    }
    u->headers_done = true;
    if (u->st)
        cmg_cn_stream_response(u->st, status, &u->resp);
    return u->head ? 1 : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_upstream *u = (struct cmg_upstream *)((char *)p - offsetof(struct cmg_upstream, parser));
    struct cmg_buf *b;

    if (!u->st)
        return -1;
    b = &u->st->resp_body;
    if (u->in_place) {
        /* Already in the buffer's spare room, at or after its tail: close the gap
         * that framing (chunk sizes) left, if any. Nothing takes from the buffer
         * while the parser runs: the tunnel sends from its own task. */
        if (at != cmg_buf_tail(b))
            memmove(cmg_buf_tail(b), at, n);
        cmg_buf_commit(b, n);
    } else if (cmg_buf_append(b, at, n) < 0) {
        return -1;
    }
    cmg_cn_stream_body(u->st);
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    struct cmg_upstream *u = (struct cmg_upstream *)((char *)p - offsetof(struct cmg_upstream, parser));
    if (u->informational) {
        u->informational = false;
        return 0;
    }
    u->msg_done = true;
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_message_begin = on_message_begin,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* The response is complete: hand the body's end on, and keep the connection. */
static void finished(struct cmg_upstream *u)
{
    struct cmg_cn_stream *st = u->st;
    bool reusable = llhttp_should_keep_alive(&u->parser) && st->req_end && cmg_conn_pending(&u->conn) == 0;

    st->resp_eof = true;
    cmg_cn_stream_body(st);
    if (reusable) {
        release(u);
    } else {
        destroy(u);
    }
}

static void on_read(struct cmg_conn *c)
{
    struct cmg_upstream *u = c->owner;
    char buf[READ_CHUNK];

    while (u->st && !u->msg_done) {
        struct cmg_buf *b = &u->st->resp_body;
        char *into = buf;
        ssize_t n;
        llhttp_errno_t err;
        if (b->len >= CMG_CN_BUFFER) {
            u->paused = true;   /* the tunnel is behind: wait, and do not time out */
            cmg_timer_stop(u->cn->loop, &u->timer);
            cmg_conn_want_read(c, false);
            return;
        }
        /* Body bytes are read straight into the buffer they are sent from. */
        u->in_place = u->headers_done && cmg_buf_reserve(b, READ_CHUNK) == 0;
        if (u->in_place)
            into = cmg_buf_tail(b);
        n = cmg_conn_read(c, into, READ_CHUNK);
        if (n <= 0)
            u->in_place = false;
        if (n == CMG_AGAIN)
            return;
        arm(u);
        if (n == 0) {
            if (u->headers_done && llhttp_finish(&u->parser) == HPE_OK && u->msg_done) {
                finished(u);   /* a body delimited by the end of the connection */
                return;
            }
            fail(u, 502, CMG_CN_FAIL_OTHER,
                 u->got_bytes ? "internal service closed the connection mid-response"
                              : "internal service closed the connection");
            return;
        }
        u->got_bytes = true;
        err = llhttp_execute(&u->parser, into, (size_t)n);
        u->in_place = false;
        if (err == HPE_PAUSED) {
            finished(u);
            return;
        }
        if (err != HPE_OK) {
            char why[200];
            snprintf(why, sizeof(why), "bad response from internal service: %s",
                     llhttp_get_error_reason(&u->parser));
            fail(u, 502, CMG_CN_FAIL_OTHER, why);
            return;
        }
    }
}

static void on_open(struct cmg_conn *c)
{
    struct cmg_upstream *u = c->owner;
    cmg_conn_flush(c);
    if (u->st && cmg_conn_pending(c) == 0)
        cmg_cn_stream_request_written(u->st);
}

static void on_drain(struct cmg_conn *c)
{
    struct cmg_upstream *u = c->owner;
    if (u->st)
        cmg_cn_stream_request_written(u->st);
}

/* What the connection was doing when it failed says why: dialling (refused, or
 * another network error) or its TLS handshake. */
static enum cmg_cn_failure cause_of(const struct cmg_conn *c, const char *why)
{
    char refused[64];

    if (c->state == CMG_CONN_HANDSHAKE)
        return CMG_CN_FAIL_TLS;
    snprintf(refused, sizeof(refused), "connect: %s", strerror(ECONNREFUSED));
    if (c->state == CMG_CONN_CONNECTING && !strcmp(why, refused))
        return CMG_CN_FAIL_REFUSED;
    return CMG_CN_FAIL_OTHER;
}

static void on_error(struct cmg_conn *c, const char *why)
{
    struct cmg_upstream *u = c->owner;
    char msg[1400];
    snprintf(msg, sizeof(msg), "%s (%s)", why, u->m->internal_url);
    fail(u, 502, cause_of(c, why), msg);
}

static const struct cmg_conn_ops upstream_ops = {on_open, on_read, on_drain, on_error};

/* ---- the pool ---- */

static void release(struct cmg_upstream *u)
{
    struct cmg_cn_mapping *m = u->m;
    if (u->st) {
        u->st->up = NULL;
        u->st = NULL;
    }
    list_remove(&u->cn->busy, u);
    if (m->nidle >= MAX_IDLE || m->retired) {
        list_push(&m->idle, u);
        m->nidle++;
        destroy(u);
        return;
    }
    list_push(&m->idle, u);
    m->nidle++;
    cmg_conn_idle(&u->conn);
    cmg_conn_want_read(&u->conn, false);
    cmg_timer_start(u->cn->loop, &u->timer, IDLE_MS, on_timeout);
}

/* An idle connection that the server has closed (or written to) is no good. */
static bool still_good(struct cmg_upstream *u)
{
    char b;
    ssize_t n = recv(u->conn.io.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

void cmg_cn_mapping_resolve(struct cmg_cn_mapping *m, uint64_t now_ms)
{
    char err[256];

    m->resolved_ms = now_ms;
    m->unresolved = cmg_addr_parse(m->authority, m->port, &m->addr, err, sizeof(err)) < 0;
    if (m->unresolved) {
        snprintf(m->resolve_error, sizeof(m->resolve_error), "cannot resolve %s: %s", m->host, err);
        cmg_warn("role %s: %s (internal_url %s); its requests fail with 502 until it resolves",
                 m->role, m->resolve_error, m->internal_url);
    }
}

/* A host that did not resolve is looked up again, off the loop, at most once per
 * CMG_CN_RESOLVE_RETRY_MS; this request fails meanwhile. */
static bool resolved(struct cmg_connector *cn, struct cmg_cn_mapping *m)
{
    if (m->unresolved && cmg_loop_now(cn->loop) - m->resolved_ms >= CMG_CN_RESOLVE_RETRY_MS)
        cmg_cn_lookup_start(cn->loop, m);
    return !m->unresolved;
}

/* Why no connection could be made: a cause, and words for the log. */
struct no_connection {
    enum cmg_cn_failure cause;
    char why[1400];
};

/* NULL with *no filled when no connection can be made. */
static struct cmg_upstream *connect_new(struct cmg_connector *cn, struct cmg_cn_mapping *m,
                                        struct no_connection *no)
{
    struct cmg_upstream *u;
    SSL *ssl = NULL;
    int fd;

    no->cause = CMG_CN_FAIL_OTHER;
    snprintf(no->why, sizeof(no->why), "out of memory");
    if (!resolved(cn, m)) {
        no->cause = CMG_CN_FAIL_DNS;
        snprintf(no->why, sizeof(no->why), "%s", m->resolve_error);
        return NULL;
    }
    if (!(u = calloc(1, sizeof(*u))))
        return NULL;
    u->cn = cn;
    u->m = m;
    fd = cmg_net_connect(&m->addr);
    if (fd < 0) {
        if (errno == ECONNREFUSED)
            no->cause = CMG_CN_FAIL_REFUSED;
        snprintf(no->why, sizeof(no->why), "cannot connect to %s: %s", m->internal_url,
                 strerror(errno));
        free(u);
        return NULL;
    }
    if (m->tls) {
        ssl = SSL_new(m->ctx);
        if (!ssl) {
            close(fd);
            free(u);
            return NULL;
        }
        SSL_set_connect_state(ssl);
        SSL_set_tlsext_host_name(ssl, m->host);
        SSL_set1_host(ssl, m->host);
    }
    if (cmg_conn_start(&u->conn, cn->loop, fd, ssl, true, &upstream_ops, u) < 0) {
        free(u);
        return NULL;
    }
    return u;
}

static struct cmg_upstream *acquire(struct cmg_connector *cn, struct cmg_cn_mapping *m,
                                    struct no_connection *no)
{
    struct cmg_upstream *u;
    while ((u = m->idle)) {
        list_remove(&m->idle, u);
        m->nidle--;
        cmg_timer_stop(cn->loop, &u->timer);
        if (still_good(u)) {
            u->reused = true;
            return u;
        }
        list_push(&m->idle, u);   /* so that destroy() finds it where it expects */
        m->nidle++;
        destroy(u);
    }
    return connect_new(cn, m, no);
}

static int write_head(struct cmg_upstream *u, struct cmg_cn_stream *st)
{
    struct cmg_buf *o = &u->conn.out;
    struct cmg_path p;
    const char *rest;
    size_t rest_len;
    int rc = 0;

    cmg_path_parse(st->path, strlen(st->path), &p);
    rest = p.rest;
    rest_len = p.rest_len;
    rc |= cmg_buf_printf(o, "%s %s", st->method, u->m->base_path);
    if (rest_len == 0 || rest[0] == '?')
        rc |= cmg_buf_append(o, "/", 1);
    rc |= cmg_buf_append(o, rest, rest_len);
    rc |= cmg_buf_printf(o, " HTTP/1.1\r\nHost: %s\r\n", u->m->authority);
    for (uint32_t i = 0; i < st->hdrs.n; i++) {
        const char *name = cmg_headers_name(&st->hdrs, i);
        if (cmg_header_not_forwarded(name, st->hdrs.v[i].name_len))
            continue;
        rc |= cmg_buf_append(o, name, st->hdrs.v[i].name_len);
        rc |= cmg_buf_append(o, ": ", 2);
        rc |= cmg_buf_append(o, cmg_headers_value(&st->hdrs, i), st->hdrs.v[i].value_len);
        rc |= cmg_buf_append(o, "\r\n", 2);
    }
    if (st->content_length >= 0)
        rc |= cmg_buf_printf(o, "Content-Length: %lld\r\n", (long long)st->content_length);
    else if (st->has_body) {
        st->req_chunked = true;
        rc |= cmg_buf_appends(o, "Transfer-Encoding: chunked\r\n");
    }
    rc |= cmg_buf_appends(o, "Connection: keep-alive\r\n\r\n");
    if (st->req_end && st->req_chunked)
        rc |= cmg_buf_appends(o, "0\r\n\r\n");
    return rc ? -1 : 0;
}

void cmg_upstream_start(struct cmg_connector *cn, struct cmg_cn_stream *st)
{
    struct no_connection no;
    struct cmg_upstream *u = acquire(cn, st->m, &no);

    if (!u) {
        cmg_cn_stream_fail(st, 502, no.cause, no.why);
        return;
    }
    u->st = st;
    st->up = u;
    u->head = !strcmp(st->method, "HEAD");
    u->headers_done = u->msg_done = u->got_bytes = u->paused = false;
    llhttp_init(&u->parser, HTTP_RESPONSE, &settings);
    cmg_h1_head_init(&u->resp_head, &u->resp, MAX_RESPONSE_HEAD, MAX_RESPONSE_FIELDS);
    list_push(&cn->busy, u);
    if (write_head(u, st) < 0) {
        fail(u, 502, CMG_CN_FAIL_OTHER, "out of memory");
        return;
    }
    cmg_conn_flush(&u->conn);
    cmg_conn_want_read(&u->conn, true);
    arm(u);
}

static void write_body(struct cmg_task *t)
{
    struct cmg_upstream *u = (struct cmg_upstream *)((char *)t - offsetof(struct cmg_upstream, body_task));

    cmg_conn_flush(&u->conn);
    if (u->st && cmg_conn_pending(&u->conn) == 0 && u->conn.state == CMG_CONN_OPEN)
        cmg_cn_stream_request_written(u->st);
}

void cmg_upstream_body(struct cmg_upstream *u, const uint8_t *p, size_t n)
{
    struct cmg_buf *o = &u->conn.out;
    if (u->st->req_chunked)
        cmg_buf_printf(o, "%zx\r\n", n);
    cmg_buf_append(o, p, n);
    if (u->st->req_chunked)
        cmg_buf_append(o, "\r\n", 2);
    /* Written at the end of the round: the pieces of one read from the tunnel leave
     * in one write, not one per DATA frame. */
    cmg_task_post(u->cn->loop, &u->body_task, write_body);
}

void cmg_upstream_body_end(struct cmg_upstream *u)
{
    if (u->st->req_chunked) {
        cmg_buf_appends(&u->conn.out, "0\r\n\r\n");
        cmg_conn_flush(&u->conn);
    }
}

void cmg_upstream_detach(struct cmg_upstream *u)
{
    /* The stream went away mid-request: the connection's state is unknown. */
    destroy(u);
}

void cmg_upstream_resume(struct cmg_upstream *u)
{
    if (u->paused && u->st && u->st->resp_body.len < CMG_CN_BUFFER / 2) {
        u->paused = false;
        arm(u);
        cmg_conn_want_read(&u->conn, true);
    }
}

void cmg_upstream_close_all(struct cmg_connector *cn)
{
    while (cn->busy)
        destroy(cn->busy);
    for (size_t i = 0; i < cn->cfg.nmappings; i++)
        while (cn->cfg.mappings[i].idle)
            destroy(cn->cfg.mappings[i].idle);
    for (struct cmg_cn_mapping *m = cn->routes; m; m = m->next)
        while (m->idle)
            destroy(m->idle);
}
