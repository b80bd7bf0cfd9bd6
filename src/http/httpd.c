/* The site's small HTTP/1.1 server; see httpd.h. */
#include "http/httpd.h"

#include "core/conn.h"
#include "core/log.h"
#include "core/net.h"
#include "http/h1_head.h"
#include "http/status.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define HEAD_MAX 16384
#define HEAD_FIELDS 100
#define IDLE_MS 60000
#define MAX_CONNS 1024

struct cmg_httpd {
    struct cmg_loop *loop;
    struct cmg_io io;
    cmg_httpd_handler fn;
    void *user;
    SSL_CTX *tls;
    struct cmg_httpd_conn *conns;
    unsigned nconns, max_conns;
    size_t max_body;
};

struct cmg_httpd_conn {
    struct cmg_httpd *h;
    struct cmg_conn conn;
    llhttp_t parser;
    struct cmg_timer timer;
    struct cmg_httpd_req req;
    struct cmg_h1_head head;   /* collects req.headers */
    size_t body_cap;
    char *body;
    bool complete, busy, keep_alive, closing, gone;
    bool too_large;            /* the body went over max_body */
    struct cmg_httpd_conn *prev, *next;
};

static void conn_free(void *p)
{
    struct cmg_httpd_conn *c = p;

    cmg_headers_free(&c->req.headers);
    free(c->body);
    free(c);
}

static void conn_close(struct cmg_httpd_conn *c)
{
    if (c->gone)
        return;
    c->gone = true;
    if (c->busy && c->req.on_abort)
        c->req.on_abort(&c->req);
    c->busy = false;
    cmg_timer_stop(c->h->loop, &c->timer);
    cmg_conn_close(&c->conn);
    if (c->prev)
        c->prev->next = c->next;
    else
        c->h->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->h->nconns--;
    cmg_loop_free_later(c->h->loop, c, conn_free);
}

static void on_timer(struct cmg_timer *t)
{
    struct cmg_httpd_conn *c =
        (struct cmg_httpd_conn *)((char *)t - offsetof(struct cmg_httpd_conn, timer));
    if (!c->busy)
        conn_close(c);
}

static void arm_idle(struct cmg_httpd_conn *c)
{
    cmg_timer_start(c->h->loop, &c->timer, IDLE_MS, on_timer);
}

static void reset_request(struct cmg_httpd_conn *c)
{
    cmg_h1_head_begin(&c->head);
    c->req.method[0] = c->req.target[0] = 0;
    c->req.body_len = 0;
    c->req.on_abort = NULL;
    c->req.hold = NULL;
    c->complete = false;
    if (c->body)
        c->body[0] = 0;
}

/* ---- parsing ---- */

static struct cmg_httpd_conn *of(llhttp_t *p) { return p->data; }

static int on_method(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_httpd_conn *c = of(p);
    size_t len = strlen(c->req.method);
    if (len + n >= sizeof(c->req.method))
        return -1;
    memcpy(c->req.method + len, at, n);
    c->req.method[len + n] = 0;
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_httpd_conn *c = of(p);
    size_t len = strlen(c->req.target);
    if (len + n >= sizeof(c->req.target))
        return -1;
    memcpy(c->req.target + len, at, n);
    c->req.target[len + n] = 0;
    return 0;
}

static int on_field(llhttp_t *p, const char *at, size_t n)
{
    return cmg_h1_head_field(&of(p)->head, at, n);
}

static int on_field_done(llhttp_t *p)
{
    return cmg_h1_head_field_done(&of(p)->head);
}

static int on_value(llhttp_t *p, const char *at, size_t n)
{
    return cmg_h1_head_value(&of(p)->head, at, n);
}

static int on_value_done(llhttp_t *p)
{
    return cmg_h1_head_value_done(&of(p)->head);
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_httpd_conn *c = of(p);

    if (c->req.body_len + n > c->h->max_body) {
        c->too_large = true;
        return -1;
    }
    if (c->req.body_len + n + 1 > c->body_cap) {
        size_t cap = (c->req.body_len + n + 1) * 2;
        char *b = realloc(c->body, cap);
        if (!b)
            return -1;
        c->body = b;
        c->body_cap = cap;
        c->req.body = b;
    }
    memcpy(c->body + c->req.body_len, at, n);
    c->req.body_len += n;
    c->body[c->req.body_len] = 0;
    return 0;
}

static int on_complete(llhttp_t *p)
{
    struct cmg_httpd_conn *c = of(p);
    c->complete = true;
    c->keep_alive = llhttp_should_keep_alive(p);
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_method = on_method,
    .on_url = on_url,
    .on_header_field = on_field,
    .on_header_field_complete = on_field_done,
    .on_header_value = on_value,
    .on_header_value_complete = on_value_done,
    .on_body = on_body,
    .on_message_complete = on_complete,
};

/* ---- responses ---- */

static void dispatch(struct cmg_httpd_conn *c);

void cmg_httpd_respond(struct cmg_httpd_req *req, int status, const char *content_type,
                       const char *body, size_t len, const char *extra)
{
    struct cmg_httpd_conn *c = req->conn;
    char head[2048];
    int n;

    if (c->gone || !c->busy)
        return;
    c->busy = false;
    req->on_abort = NULL;
    n = snprintf(head, sizeof(head),
                 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                 "Cache-Control: no-store\r\n%s%s\r\n",
                 status, cmg_reason_phrase(status), content_type ? content_type : "text/plain",
                 len, c->keep_alive ? "" : "Connection: close\r\n", extra ? extra : "");
    if (n < 0 || (size_t)n >= sizeof(head) ||   /* extra headers past the head's room */
        cmg_buf_append(&c->conn.out, head, (size_t)n) < 0 ||
        (len && strcmp(req->method, "HEAD") && cmg_buf_append(&c->conn.out, body, len) < 0)) {
        conn_close(c);
        return;
    }
    cmg_conn_flush(&c->conn);
    if (!c->keep_alive) {
        c->closing = true;
        if (cmg_conn_pending(&c->conn) == 0)
            conn_close(c);
        return;
    }
    reset_request(c);
    llhttp_resume(&c->parser);
    arm_idle(c);
    cmg_conn_want_read(&c->conn, true);   /* pipelined requests wait in the socket */
}

void cmg_httpd_error(struct cmg_httpd_req *req, int status, const char *reason)
{
    cJSON *o = cJSON_CreateObject();

    cJSON_AddStringToObject(o, "error", reason);
    cmg_httpd_json(req, status, o);
}

void cmg_httpd_json(struct cmg_httpd_req *req, int status, cJSON *doc)
{
    char *s = doc ? cJSON_PrintUnformatted(doc) : NULL;

    if (!s)
        cmg_httpd_respond(req, 500, "application/json", "{\"error\":\"out of memory\"}", 25,
                          NULL);
    else {
        size_t n = strlen(s);
        s[n] = '\n';   /* replaces the NUL: sent with its length */
        cmg_httpd_respond(req, status, "application/json", s, n + 1, NULL);
    }
    free(s);
    cJSON_Delete(doc);
}

const char *cmg_httpd_header(const struct cmg_httpd_req *req, const char *name)
{
    int i = cmg_headers_find(&req->headers, name);
    return i < 0 ? NULL : cmg_headers_value(&req->headers, (uint32_t)i);
}

const char *cmg_httpd_bearer(const struct cmg_httpd_req *req)
{
    const char *v = cmg_httpd_header(req, "authorization");

    if (!v || strncasecmp(v, "Bearer ", 7))
        return NULL;
    v += 7;
    while (*v == ' ')
        v++;
    return *v ? v : NULL;
}

/* ---- connection events ---- */

static void dispatch(struct cmg_httpd_conn *c)
{
    c->busy = true;
    c->req.body = c->body ? c->body : (char *)"";
    cmg_timer_stop(c->h->loop, &c->timer);
    cmg_conn_want_read(&c->conn, false);
    c->h->fn(c->h->user, &c->req);
}

static void on_read(struct cmg_conn *conn)
{
    struct cmg_httpd_conn *c = conn->owner;
    char buf[16384];
    ssize_t n;

    while (!c->busy && !c->gone && !c->closing) {
        n = cmg_conn_read(conn, buf, sizeof(buf));
        if (n == CMG_AGAIN)
            return;
        if (n == 0) {
            conn_close(c);
            return;
        }
        enum llhttp_errno e = llhttp_execute(&c->parser, buf, (size_t)n);
        if (e == HPE_PAUSED) {
            /* Bytes after this request are a pipelined one: not supported here. */
            const char *stop = llhttp_get_error_pos(&c->parser);
            if (stop && stop < buf + n)
                c->keep_alive = false;
            dispatch(c);
            return;
        }
        if (e != HPE_OK) {
            static const char bad[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                      "Connection: close\r\n\r\n";
            static const char large[] = "HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n"
                                        "Connection: close\r\n\r\n";
            if (c->too_large)
                cmg_buf_append(&conn->out, large, sizeof(large) - 1);
            else
                cmg_buf_append(&conn->out, bad, sizeof(bad) - 1);
            cmg_conn_flush(conn);
            c->closing = true;
            if (cmg_conn_pending(conn) == 0)
                conn_close(c);
            return;
        }
    }
}

static void on_drain(struct cmg_conn *conn)
{
    struct cmg_httpd_conn *c = conn->owner;
    if (c->closing && cmg_conn_pending(conn) == 0)
        conn_close(c);
}

static void on_error(struct cmg_conn *conn, const char *why)
{
    conn_close(conn->owner);
}

/* TLS: the handshake is done (and the client's certificate verified). */
static void on_open(struct cmg_conn *conn)
{
    struct cmg_httpd_conn *c = conn->owner;

    c->req.peer_cert = conn->ssl ? SSL_get0_peer_certificate(conn->ssl) : NULL;
    cmg_conn_want_read(conn, true);
}

static const struct cmg_conn_ops conn_ops = {on_open, on_read, on_drain, on_error};

static void on_accept(struct cmg_io *io, uint32_t events)
{
    struct cmg_httpd *h = (struct cmg_httpd *)((char *)io - offsetof(struct cmg_httpd, io));

    for (int i = 0; i < 64; i++) {
        int fd = accept4(io->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        struct cmg_httpd_conn *c = NULL;
        SSL *ssl = NULL;
        if (fd < 0)
            return;
        if (h->nconns >= h->max_conns || !(c = calloc(1, sizeof(*c))) ||
            (h->tls && !(ssl = SSL_new(h->tls)))) {
            free(c);
            close(fd);
            continue;
        }
        if (ssl)
            SSL_set_accept_state(ssl);
        c->h = h;
        c->req.conn = c;
        llhttp_init(&c->parser, HTTP_REQUEST, &settings);
        c->parser.data = c;
        cmg_h1_head_init(&c->head, &c->req.headers, HEAD_MAX, HEAD_FIELDS);
        if (cmg_conn_start(&c->conn, h->loop, fd, ssl, false, &conn_ops, c) < 0) {
            free(c);
            continue;
        }
        snprintf(c->req.peer, sizeof(c->req.peer), "%s", c->conn.peer);
        c->next = h->conns;
        if (h->conns)
            h->conns->prev = c;
        h->conns = c;
        h->nconns++;
        arm_idle(c);   /* bounds the handshake too */
        if (!ssl)
            cmg_conn_want_read(&c->conn, true);
    }
}

void cmg_httpd_set_tls(struct cmg_httpd *h, SSL_CTX *tls)
{
    h->tls = tls;
}

void cmg_httpd_set_limits(struct cmg_httpd *h, unsigned max_conns, size_t max_body)
{
    h->max_conns = max_conns;
    h->max_body = max_body;
}

int cmg_httpd_listen(struct cmg_loop *loop, const char *addr, SSL_CTX *tls, cmg_httpd_handler fn,
                     void *user, struct cmg_httpd **out, char *err, size_t errlen)
{
    struct cmg_httpd *h = calloc(1, sizeof(*h));
    struct cmg_addr a;
    int fd;

    *out = NULL;
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (cmg_addr_parse(addr, 0, &a, err, errlen) < 0) {
        free(h);
        return -1;
    }
    if ((fd = cmg_net_listen(&a, false, 128)) < 0) {
        snprintf(err, errlen, "listen %s: %s", addr, strerror(errno));
        free(h);
        return -1;
    }
    h->loop = loop;
    h->fn = fn;
    h->max_conns = MAX_CONNS;
    h->max_body = CMG_HTTPD_MAX_BODY;
    h->user = user;
    h->tls = tls;
    if (cmg_io_start(loop, &h->io, fd, EPOLLIN, on_accept) < 0) {
        close(fd);
        free(h);
        snprintf(err, errlen, "listen %s: cannot watch the socket", addr);
        return -1;
    }
    *out = h;
    return 0;
}

void cmg_httpd_free(struct cmg_httpd *h)
{
    if (!h)
        return;
    while (h->conns)
        conn_close(h->conns);
    if (h->io.fd >= 0) {
        int fd = h->io.fd;
        cmg_io_stop(&h->io);
        close(fd);
    }
    free(h);
}
