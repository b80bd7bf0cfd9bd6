/* One client connection: a non-blocking connect (from a chosen source address),
 * the TLS handshake, then HTTP/1.1 requests one at a time or an HTTP/2 session.
 * Sockets are edge-triggered: c->rd and c->wr remember readiness until a read or
 * a write says "again", so no epoll_ctl is needed after the first. */
#include "load.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define BODY_WRITE (64 * 1024)

static void lose(struct load_conn *c, const char *why)
{
    unsigned pending = c->h2 ? c->inflight : c->busy ? 1 : 0;
    load_conn_close(c);
    load_worker_lost(c, why, pending);
}

static void lose_ssl(struct load_conn *c, const char *what, int err)
{
    char why[200], detail[160] = "";
    unsigned long e = ERR_get_error();

    if (e)
        ERR_error_string_n(e, detail, sizeof(detail));
    else if (err == SSL_ERROR_SYSCALL && errno)
        snprintf(detail, sizeof(detail), "%s", strerror(errno));
    else if (err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL)
        snprintf(detail, sizeof(detail), "connection closed");
    snprintf(why, sizeof(why), "%s: %s", what, detail[0] ? detail : "TLS error");
    ERR_clear_error();
    lose(c, why);
}

int load_conn_dial(struct load_conn *c)
{
    const struct load_opts *o = c->w->o;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    int one = 1, fd;

    c->connect_ns = load_now();
    c->retry_ns = 0;
    c->rd = c->wr = false;
    c->woff = c->wlen = 0;
    c->busy = false;
    c->served = 0;
    c->inflight = 0;
    fd = socket(o->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (o->src_first && o->addr.ss_family == AF_INET) {
        /* Spread over source addresses, each with its own range of ports; the
         * port is picked at connect time, per destination. */
        struct sockaddr_in src = {.sin_family = AF_INET};
        uint32_t n = o->src_last - o->src_first + 1;
        src.sin_addr.s_addr = htonl(o->src_first + c->index % n);
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0)
            goto fail;
    }
    if (connect(fd, (struct sockaddr *)&o->addr, o->addrlen) < 0 && errno != EINPROGRESS)
        goto fail;
    if (epoll_ctl(c->w->ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        goto fail;
    c->fd = fd;
    c->state = LOAD_CS_CONNECTING;
    c->w->st.connects++;
    return 0;
fail:
    {
        char why[160];
        snprintf(why, sizeof(why), "connect: %s", strerror(errno));
        if (fd >= 0)
            close(fd);
        c->fd = -1;
        c->state = LOAD_CS_NONE;
        load_worker_lost(c, why, 0);
    }
    return -1;
}

void load_conn_close(struct load_conn *c)
{
    if (c->state == LOAD_CS_NONE)
        return;
    if (c->ssl) {
        if (c->state == LOAD_CS_OPEN)
            SSL_shutdown(c->ssl);   /* close_notify, best effort */
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    load_h2_free(c);
    close(c->fd);   /* also leaves the epoll set */
    c->fd = -1;
    c->state = LOAD_CS_NONE;
    c->busy = false;
    c->inflight = 0;
    c->woff = c->wlen = 0;
    ERR_clear_error();
}

bool load_conn_can_issue(const struct load_conn *c)
{
    if (c->state != LOAD_CS_OPEN)
        return false;
    if (c->h2)
        return c->inflight < c->w->o->streams;
    return !c->busy;
}

static int wbuf_append(struct load_conn *c, const void *p, size_t n)
{
    if (c->woff == c->wlen)
        c->woff = c->wlen = 0;
    if (c->wlen + n > c->wcap) {
        size_t cap = c->wcap ? c->wcap : 4096;
        char *nb;
        while (cap < c->wlen + n)
            cap *= 2;
        if (!(nb = realloc(c->wbuf, cap)))
            return -1;
        c->wbuf = nb;
        c->wcap = cap;
    }
    memcpy(c->wbuf + c->wlen, p, n);
    c->wlen += n;
    return 0;
}

int load_h2_append(struct load_conn *c, const void *p, size_t n);
int load_h2_append(struct load_conn *c, const void *p, size_t n) { return wbuf_append(c, p, n); }

void load_conn_issue(struct load_conn *c, uint64_t start_ns)
{
    struct load_worker *w = c->w;

    if (c->h2) {
        if (load_h2_submit(c, start_ns) < 0)
            lose(c, "HTTP/2: cannot submit a request");
        return;
    }
    if (wbuf_append(c, w->req_head, w->req_head_len) < 0) {
        lose(c, "out of memory");
        return;
    }
    c->busy = true;
    c->start_ns = start_ns;
    c->body_left = w->o->body_size;
    load_h1_reset(&c->rp, !strcmp(w->o->method, "HEAD"));
}

/* Writes until everything queued is out or the socket is full. 0, or -1 (lost). */
static int write_out(struct load_conn *c)
{
    for (;;) {
        const void *p;
        size_t want, n = 0;
        bool body = false;

        if (c->woff == c->wlen && c->h2) {
            if (load_h2_fill(c) < 0) {
                lose(c, "HTTP/2 session error");
                return -1;
            }
        }
        if (c->woff < c->wlen) {
            p = c->wbuf + c->woff;
            want = c->wlen - c->woff;
        } else if (!c->h2 && c->busy && c->body_left) {
            p = load_pattern;
            want = c->body_left < BODY_WRITE ? (size_t)c->body_left : BODY_WRITE;
            body = true;
        } else {
            return 0;
        }
        if (!c->wr)
            return 0;
        if (c->ssl) {
            int r;
            ERR_clear_error();
            r = SSL_write_ex(c->ssl, p, want, &n);
            if (r != 1) {
                int err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_WRITE) {
                    c->wr = false;
                    return 0;
                }
                if (err == SSL_ERROR_WANT_READ)
                    return 0;
                lose_ssl(c, "TLS write", err);
                return -1;
            }
        } else {
            ssize_t k = send(c->fd, p, want, MSG_NOSIGNAL);
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    c->wr = false;
                    return 0;
                }
                char why[120];
                snprintf(why, sizeof(why), "write: %s", strerror(errno));
                lose(c, why);
                return -1;
            }
            n = (size_t)k;
        }
        if (body) {
            c->body_left -= n;
            load_worker_body_out(c, n);
        } else {
            c->woff += n;
        }
    }
}

void load_conn_flush(struct load_conn *c)
{
    if (c->state == LOAD_CS_OPEN)
        write_out(c);
}

/* HTTP/1.1 response bytes. 0, or -1 when the connection is gone. */
static int h1_input(struct load_conn *c, const char *p, size_t n)
{
    while (n) {
        size_t used = 0;
        uint64_t before = c->rp.body_bytes;
        int r;

        if (!c->busy) {
            lose(c, "response bytes without a request");
            return -1;
        }
        r = load_h1_feed(&c->rp, p, n, &used);
        if (c->rp.body_bytes > before)
            load_worker_body_in(c, c->rp.body_bytes - before);
        if (r < 0) {
            char why[120];
            snprintf(why, sizeof(why), "HTTP/1.1: %s", c->rp.error);
            lose(c, why);
            return -1;
        }
        p += used;
        n -= used;
        if (r == 1) {
            bool close_after = c->rp.close;
            c->busy = false;
            c->served++;
            if (close_after) {
                /* Answer complete; the server closes: count it, then part. */
                load_conn_close(c);
                load_worker_done(c, c->start_ns, c->rp.status, c->rp.body_bytes);
                return -1;
            }
            load_worker_done(c, c->start_ns, c->rp.status, c->rp.body_bytes);
            if (c->state != LOAD_CS_OPEN)
                return -1;
        }
    }
    return 0;
}

/* Reads until the socket is empty. 0, or -1 when the connection is gone. */
static int read_in(struct load_conn *c)
{
    struct load_worker *w = c->w;

    while (c->rd) {
        size_t n = 0;
        if (c->ssl) {
            int r;
            ERR_clear_error();
            r = SSL_read_ex(c->ssl, w->rbuf, sizeof(w->rbuf), &n);
            if (r != 1) {
                int err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_READ) {
                    c->rd = false;
                    return 0;
                }
                if (err == SSL_ERROR_WANT_WRITE)
                    return 0;
                if (err == SSL_ERROR_ZERO_RETURN ||
                    (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)) {
                    n = 0;   /* end of stream */
                } else {
                    lose_ssl(c, "TLS read", err);
                    return -1;
                }
            }
        } else {
            ssize_t k = recv(c->fd, w->rbuf, sizeof(w->rbuf), 0);
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    c->rd = false;
                    return 0;
                }
                char why[120];
                snprintf(why, sizeof(why), "read: %s", strerror(errno));
                lose(c, why);
                return -1;
            }
            n = (size_t)k;
        }
        if (n == 0) {   /* the server closed */
            if (!c->h2 && c->busy && load_h1_eof(&c->rp) == 1) {
                load_conn_close(c);
                c->busy = false;
                load_worker_done(c, c->start_ns, c->rp.status, c->rp.body_bytes);
                return -1;
            }
            lose(c, c->busy || c->inflight ? "closed by the server during a request"
                                           : "closed by the server");
            return -1;
        }
        if (c->h2) {
            if (load_h2_recv(c, (const uint8_t *)w->rbuf, n) < 0) {
                if (c->state == LOAD_CS_OPEN)
                    lose(c, "HTTP/2 protocol error");
                return -1;
            }
        } else if (h1_input(c, w->rbuf, n) < 0) {
            return -1;
        }
        if (c->state != LOAD_CS_OPEN)
            return -1;
    }
    return 0;
}

static void handshake(struct load_conn *c)
{
    int r, err;

    ERR_clear_error();
    r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->state = LOAD_CS_OPEN;
        c->w->st.handshakes++;
        if (c->w->o->proto == LOAD_H2) {
            const unsigned char *alpn = NULL;
            unsigned len = 0;
            SSL_get0_alpn_selected(c->ssl, &alpn, &len);
            if (len != 2 || memcmp(alpn, "h2", 2) != 0) {
                lose(c, "the server did not agree to HTTP/2 (ALPN)");
                return;
            }
            if (load_h2_start(c) < 0) {
                lose(c, "cannot start HTTP/2");
                return;
            }
        }
        load_worker_opened(c);
        return;
    }
    err = SSL_get_error(c->ssl, r);
    if (err == SSL_ERROR_WANT_READ)
        c->rd = false;
    else if (err == SSL_ERROR_WANT_WRITE)
        c->wr = false;
    else
        lose_ssl(c, "TLS handshake", err);
}

static void connected(struct load_conn *c)
{
    const struct load_opts *o = c->w->o;
    int soerr = 0;
    socklen_t len = sizeof(soerr);

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
        soerr = errno;
    if (soerr) {
        char why[120];
        snprintf(why, sizeof(why), "connect: %s", strerror(soerr));
        lose(c, why);
        return;
    }
    if (!o->tls) {
        c->state = LOAD_CS_OPEN;
        if (o->proto == LOAD_H2 && load_h2_start(c) < 0) {
            lose(c, "cannot start HTTP/2");
            return;
        }
        load_worker_opened(c);
        return;
    }
    if (!(c->ssl = SSL_new(c->w->ctx)) || SSL_set_fd(c->ssl, c->fd) != 1) {
        lose(c, "cannot create a TLS connection");
        return;
    }
    SSL_set_connect_state(c->ssl);
    if (o->host[0] && !strchr(o->host, ':') && strspn(o->host, "0123456789.") != strlen(o->host))
        SSL_set_tlsext_host_name(c->ssl, o->host);
    if (o->cacert)
        SSL_set1_host(c->ssl, o->host);
    c->state = LOAD_CS_HANDSHAKE;
}

void load_conn_event(struct load_conn *c, uint32_t events)
{
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        c->rd = true;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        c->wr = true;
    if (c->state == LOAD_CS_CONNECTING) {
        if (!c->wr)
            return;
        connected(c);
    }
    if (c->state == LOAD_CS_HANDSHAKE) {
        handshake(c);
        if (c->state != LOAD_CS_OPEN)
            return;
    }
    if (c->state != LOAD_CS_OPEN)
        return;
    /* Out first (a new edge may have made room), then in until the socket is
     * empty; responses read may have queued requests: out again. */
    if (write_out(c) < 0 || read_in(c) < 0)
        return;
    write_out(c);
}
