#include "core/conn.h"
#include "core/log.h"

#include <errno.h>
#include <openssl/err.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define WRITE_CHUNK (256 * 1024)
/* Records are gathered up to this much before one send(2): a bulk transfer then
 * costs a system call (and a wakeup of the peer) per 256 KiB, not per 16 KiB record. */
#define TLS_BATCH (256 * 1024)
#define TLS_RECORD 16384   /* the most plaintext one record carries */

static void conn_io(struct cmg_io *io, uint32_t events);
static void conn_task(struct cmg_task *t);

static struct cmg_conn *conn_of_io(struct cmg_io *io)
{
    return (struct cmg_conn *)((char *)io - offsetof(struct cmg_conn, io));
}

/* ---- the TLS write side: records go into c->tls_out ---- */

static int wbio_write(BIO *b, const char *p, int n)
{
    struct cmg_conn *c = BIO_get_data(b);

    BIO_clear_retry_flags(b);
    if (n <= 0)
        return 0;
    return cmg_buf_append(&c->tls_out, p, (size_t)n) < 0 ? -1 : n;
}

static long wbio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    struct cmg_conn *c = BIO_get_data(b);

    (void)num;
    (void)ptr;
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;   /* the owner's flush writes tls_out; OpenSSL's need not wait for it */
    case BIO_CTRL_WPENDING:
        return (long)c->tls_out.len;
    default:
        return 0;
    }
}

/* One loop per process: made once, never freed. */
static BIO_METHOD *wbio_method(void)
{
    static BIO_METHOD *m;

    if (!m && (m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "cmg tls out"))) {
        BIO_meth_set_write(m, wbio_write);
        BIO_meth_set_ctrl(m, wbio_ctrl);
    }
    return m;
}

static int attach_bios(struct cmg_conn *c, int fd)
{
    BIO *r = BIO_new_socket(fd, BIO_NOCLOSE);
    BIO *w = wbio_method() ? BIO_new(wbio_method()) : NULL;

    if (!r || !w) {
        BIO_free(r);
        BIO_free(w);
        return -1;
    }
    BIO_set_data(w, c);
    BIO_set_init(w, 1);
    SSL_set_bio(c->ssl, r, w);
    return 0;
}

/* Sends what tls_out holds. 1: all of it; 0: the socket is full; -1: failed. */
static int push_tls(struct cmg_conn *c)
{
    while (c->tls_out.len) {
        ssize_t w = send(c->io.fd, cmg_buf_head(&c->tls_out), c->tls_out.len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            cmg_conn_fail(c, "write: %s", strerror(errno));
            return -1;
        }
        cmg_buf_consume(&c->tls_out, (size_t)w);
    }
    return 1;
}

static void update_events(struct cmg_conn *c)
{
    uint32_t ev = 0;

    switch (c->state) {
    case CMG_CONN_CLOSED:
        return;
    case CMG_CONN_CONNECTING:
        ev = EPOLLOUT;
        break;
    case CMG_CONN_HANDSHAKE:
        if (c->hello_paused)
            break;
        ev = c->tls_out.len ? EPOLLOUT : EPOLLIN;   /* our flight first, then theirs */
        break;
    case CMG_CONN_OPEN:
        if (c->failed)
            break;
        /* EPOLLIN stays on while the owner pauses, unless input actually arrives: most
         * pauses end before the peer sends anything, and then cost no epoll_ctl. */
        if (c->reading || c->write_wants_read || !c->in_paused)
            ev |= EPOLLIN;
        /* Output a task is about to write needs no EPOLLOUT yet. */
        if (c->tls_out.len || (c->out.len && !c->write_wants_read && !c->flush_later))
            ev |= EPOLLOUT;
        break;
    }
    cmg_io_set(&c->io, ev);
}

void cmg_conn_fail(struct cmg_conn *c, const char *fmt, ...)
{
    va_list ap;
    if (c->failed || c->state == CMG_CONN_CLOSED)
        return;
    c->failed = true;
    va_start(ap, fmt);
    vsnprintf(c->why, sizeof(c->why), fmt, ap);
    va_end(ap);
    ERR_clear_error();
    update_events(c);
    cmg_task_post(c->io.loop, &c->task, conn_task);
}

static void fail_ssl(struct cmg_conn *c, const char *what, int err)
{
    unsigned long e = ERR_peek_error();
    char detail[160] = "";

    long verify = c->ssl ? SSL_get_verify_result(c->ssl) : X509_V_OK;

    if (e && verify != X509_V_OK && !SSL_is_server(c->ssl))   /* say why, not just "failed" */
        snprintf(detail, sizeof(detail), "certificate verify failed: %s",
                 X509_verify_cert_error_string(verify));
    else if (e)
        ERR_error_string_n(e, detail, sizeof(detail));
    else if (err == SSL_ERROR_SYSCALL)
        snprintf(detail, sizeof(detail), "%s", errno ? strerror(errno) : "connection closed");
    cmg_conn_fail(c, "%s: %s", what, detail[0] ? detail : "TLS error");
}

int cmg_conn_start(struct cmg_conn *c, struct cmg_loop *loop, int fd, SSL *ssl, bool connecting,
                   const struct cmg_conn_ops *ops, void *owner)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    memset(c, 0, sizeof(*c));
    c->ops = ops;
    c->owner = owner;
    c->ssl = ssl;
    c->io.fd = -1;
    if (getpeername(fd, (struct sockaddr *)&ss, &len) == 0)
        cmg_addr_str((struct sockaddr *)&ss, c->peer, sizeof(c->peer));
    if (ssl && attach_bios(c, fd) < 0)
        goto fail;
    c->state = connecting ? CMG_CONN_CONNECTING : ssl ? CMG_CONN_HANDSHAKE : CMG_CONN_OPEN;
    if (cmg_io_start(loop, &c->io, fd, 0, conn_io) < 0)
        goto fail;
    update_events(c);
    if (c->state == CMG_CONN_OPEN && ops->on_open) {
        c->pending_open = true;
        cmg_task_post(loop, &c->task, conn_task);   /* plain accepted: open at once */
    } else if (c->state == CMG_CONN_HANDSHAKE && !SSL_is_server(ssl))
        cmg_task_post(loop, &c->task, conn_task);   /* client speaks first */
    return 0;
fail:
    c->state = CMG_CONN_CLOSED;
    if (ssl)
        SSL_free(ssl);
    c->ssl = NULL;
    close(fd);
    return -1;
}

static void opened(struct cmg_conn *c)
{
    cmg_buf_release(&c->tls_out);   /* the handshake's flight, if written */
    c->state = CMG_CONN_OPEN;
    update_events(c);
    if (c->ops->on_open)
        c->ops->on_open(c);
}

static void do_handshake(struct cmg_conn *c)
{
    int r, err;

    ERR_clear_error();
    r = SSL_do_handshake(c->ssl);
    err = r == 1 ? SSL_ERROR_NONE : SSL_get_error(c->ssl, r);
    if (push_tls(c) < 0)
        return;
    if (r == 1) {
        opened(c);
        return;
    }
    c->hello_paused = err == SSL_ERROR_WANT_CLIENT_HELLO_CB;
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE || c->hello_paused) {
        update_events(c);
        return;
    }
    fail_ssl(c, "TLS handshake failed", err);   /* the alert goes out when it is closed */
}

static void finish_connect(struct cmg_conn *c)
{
    int soerr = 0;
    socklen_t len = sizeof(soerr);
    struct sockaddr_storage ss;
    socklen_t slen = sizeof(ss);

    if (getsockopt(c->io.fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
        soerr = errno;
    if (soerr) {
        cmg_conn_fail(c, "connect: %s", strerror(soerr));
        return;
    }
    if (getpeername(c->io.fd, (struct sockaddr *)&ss, &slen) == 0)
        cmg_addr_str((struct sockaddr *)&ss, c->peer, sizeof(c->peer));
    if (c->ssl) {
        c->state = CMG_CONN_HANDSHAKE;
        do_handshake(c);
    } else {
        opened(c);
    }
}

/* Counts n bytes read in this round; false once the round's budget is spent, after
 * asking for on_read again next round (the task of a later round: others go first). */
static bool within_budget(struct cmg_conn *c)
{
    uint64_t round = cmg_loop_round(c->io.loop);

    if (c->read_round != round) {
        c->read_round = round;
        c->read_bytes = 0;
    }
    if (c->read_bytes < CMG_CONN_READ_BUDGET)
        return true;
    c->kick_read = true;
    cmg_task_post(c->io.loop, &c->task, conn_task);
    return false;
}

static ssize_t counted(struct cmg_conn *c, ssize_t n)
{
    if (n > 0)
        c->read_bytes += (size_t)n;
    return n;
}

ssize_t cmg_conn_read(struct cmg_conn *c, void *buf, size_t len)
{
    if (c->state != CMG_CONN_OPEN || c->failed || !within_budget(c))
        return CMG_AGAIN;
    if (c->ssl) {
        size_t n = 0;
        int r, err;
        ERR_clear_error();
        r = SSL_read_ex(c->ssl, buf, len, &n);
        err = r == 1 ? SSL_ERROR_NONE : SSL_get_error(c->ssl, r);
        /* Reading may have made records to send: a key update, a ticket, an alert. */
        if (c->tls_out.len && push_tls(c) == 0)
            update_events(c);
        if (r == 1)
            return counted(c, (ssize_t)n);
        switch (err) {
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE:
            return CMG_AGAIN;
        case SSL_ERROR_ZERO_RETURN:
            return 0;
        default:
            fail_ssl(c, "TLS read", err);
            return CMG_AGAIN;
        }
    }
    for (;;) {
        ssize_t n = recv(c->io.fd, buf, len, 0);
        if (n >= 0)
            return counted(c, n);
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return CMG_AGAIN;
        cmg_conn_fail(c, "read: %s", strerror(errno));
        return CMG_AGAIN;
    }
}

/* Encrypts up to n bytes of p into c->tls_out (*done says how many). -1: failed. */
static int seal(struct cmg_conn *c, const char *p, size_t n, size_t *done)
{
    *done = 0;
    ERR_clear_error();
    if (n && SSL_write_ex(c->ssl, p, n, done) != 1) {
        int err = SSL_get_error(c->ssl, 0);
        *done = 0;
        if (err == SSL_ERROR_WANT_READ)
            c->write_wants_read = true;
        else if (err != SSL_ERROR_WANT_WRITE) {
            fail_ssl(c, "TLS write", err);
            return -1;
        }
    }
    return 0;
}

/* Encrypts c->out into records, TLS_BATCH at a time, and sends each batch at once. */
static void flush_tls(struct cmg_conn *c)
{
    for (;;) {
        if (c->tls_out.len && (c->tls_out.len >= TLS_BATCH || !c->out.len)) {
            int r = push_tls(c);
            if (r <= 0)
                return;
        }
        if (!c->out.len)
            return;
        size_t want = c->out.len < WRITE_CHUNK ? c->out.len : WRITE_CHUNK, n;
        if (seal(c, cmg_buf_head(&c->out), want, &n) < 0)
            return;
        if (n == 0) {   /* OpenSSL waits for the peer: send what it has made */
            push_tls(c);
            return;
        }
        cmg_buf_consume(&c->out, n);
    }
}

/* Idle connections keep no buffer: thousands of them wait for their next request. */
static void release_if_idle(struct cmg_conn *c)
{
    if (c->release_idle && !c->out.len && !c->tls_out.len) {
        cmg_buf_free(&c->out);
        cmg_buf_free(&c->tls_out);
        c->release_idle = false;
    }
}

int cmg_conn_write(struct cmg_conn *c, const void *p, size_t n)
{
    const char *s = p;
    size_t done = 0;

    if (!c->ssl || !cmg_conn_open(c) || c->write_wants_read || (c->out.len && n < TLS_RECORD))
        return cmg_buf_append(&c->out, p, n);
    if (c->out.len) {
        /* Queued output (a frame header, say) is topped up to a whole record with the
         * head of p and encrypted first; the rest is encrypted straight from p. */
        size_t top = TLS_RECORD - c->out.len % TLS_RECORD;
        if (cmg_buf_append(&c->out, s, top) < 0 || seal(c, cmg_buf_head(&c->out), c->out.len, &done) < 0)
            return -1;
        cmg_buf_consume(&c->out, done);
        s += top;
        n -= top;
        if (c->out.len)
            return cmg_buf_append(&c->out, s, n);
    }
    if (seal(c, s, n, &done) < 0)
        return -1;
    return cmg_buf_append(&c->out, s + done, n - done);
}

void cmg_conn_flush(struct cmg_conn *c)
{
    if (c->state != CMG_CONN_OPEN || c->failed)
        return;
    c->write_wants_read = false;
    if (c->ssl)
        flush_tls(c);
    while (!c->ssl && c->out.len) {
        size_t want = c->out.len < WRITE_CHUNK ? c->out.len : WRITE_CHUNK;
        ssize_t w = send(c->io.fd, cmg_buf_head(&c->out), want, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            cmg_conn_fail(c, "write: %s", strerror(errno));
            return;
        }
        cmg_buf_consume(&c->out, (size_t)w);
    }
    if (!c->failed) {
        c->drain_owed = cmg_conn_pending(c) > 0;
        release_if_idle(c);
        update_events(c);
    }
}

/* Flushes for the loop (an event, or the task), never from within an owner's call,
 * and tells the owner when output that had to wait (owed) is all written. */
static void flush_and_tell(struct cmg_conn *c, bool owed)
{
    cmg_conn_flush(c);
    if (owed && !cmg_conn_pending(c) && c->state == CMG_CONN_OPEN && !c->failed &&
        c->ops->on_drain)
        c->ops->on_drain(c);
}

void cmg_conn_want_read(struct cmg_conn *c, bool on)
{
    if (c->reading == on)
        return;
    c->reading = on;
    if (on)
        c->in_paused = false;
    if (c->state != CMG_CONN_OPEN)
        return;
    update_events(c);
    /* TLS may hold decrypted bytes that epoll cannot see: look from the loop. */
    if (on) {
        c->kick_read = true;
        cmg_task_post(c->io.loop, &c->task, conn_task);
    }
}

static void conn_task(struct cmg_task *t)
{
    struct cmg_conn *c = (struct cmg_conn *)((char *)t - offsetof(struct cmg_conn, task));

    if (c->state == CMG_CONN_CLOSED)
        return;
    if (c->failed) {
        if (!c->reported) {
            c->reported = true;
            c->ops->on_error(c, c->why);
        }
        return;
    }
    if (c->pending_open) {
        c->pending_open = false;
        c->ops->on_open(c);
        if (c->state == CMG_CONN_CLOSED || c->failed)
            return;
    }
    if (c->state == CMG_CONN_HANDSHAKE) {
        do_handshake(c);
        return;
    }
    if (c->flush_later) {
        /* The owner's own flush may have left output waiting meanwhile, with no
         * EPOLLOUT while this flush was due: it is told as after EPOLLOUT. */
        c->flush_later = false;
        flush_and_tell(c, c->drain_owed);
        if (c->state == CMG_CONN_CLOSED || c->failed)
            return;
    }
    if (c->kick_read) {
        c->kick_read = false;
        if (c->reading && c->state == CMG_CONN_OPEN)
            c->ops->on_read(c);
    }
}

void cmg_conn_flush_later(struct cmg_conn *c)
{
    if (c->state != CMG_CONN_OPEN || c->failed || c->flush_later)
        return;
    c->flush_later = true;
    cmg_task_post(c->io.loop, &c->task, conn_task);
}

void cmg_conn_resume_handshake(struct cmg_conn *c)
{
    if (c->state == CMG_CONN_HANDSHAKE && !c->failed)
        cmg_task_post(c->io.loop, &c->task, conn_task);
}

static void conn_io(struct cmg_io *io, uint32_t events)
{
    struct cmg_conn *c = conn_of_io(io);
    bool err = events & (EPOLLERR | EPOLLHUP);

    switch (c->state) {
    case CMG_CONN_CONNECTING:
        finish_connect(c);
        return;
    case CMG_CONN_HANDSHAKE:
        if (!c->hello_paused)
            do_handshake(c);
        else if (err)   /* reported even while unwatched */
            cmg_conn_fail(c, "TLS handshake failed: connection closed while it waited");
        return;
    case CMG_CONN_OPEN:
        break;
    default:
        return;
    }
    if (c->failed)
        return;
    if ((events & EPOLLOUT) || err || (c->write_wants_read && (events & EPOLLIN)))
        flush_and_tell(c, cmg_conn_pending(c) > 0);
    if (c->state != CMG_CONN_OPEN || c->failed)
        return;
    if (c->reading && ((events & EPOLLIN) || err))
        c->ops->on_read(c);
    else if ((events & EPOLLIN) && !c->reading)
        c->in_paused = true;
    if (c->state == CMG_CONN_OPEN)
        update_events(c);
}

void cmg_conn_close(struct cmg_conn *c)
{
    int fd = c->io.fd;

    if (c->state == CMG_CONN_CLOSED && fd < 0)
        return;
    if (c->io.loop)
        cmg_task_cancel(c->io.loop, &c->task);
    if (c->ssl) {
        if (c->state == CMG_CONN_OPEN && !c->failed) {
            ERR_clear_error();
            SSL_shutdown(c->ssl);   /* best effort close_notify; keeps the session resumable */
        }
        if (c->tls_out.len && fd >= 0)   /* close_notify or an alert: one try, no waiting */
            (void)!send(fd, cmg_buf_head(&c->tls_out), c->tls_out.len, MSG_NOSIGNAL | MSG_DONTWAIT);
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    cmg_io_stop(&c->io);
    if (fd >= 0)
        close(fd);
    c->state = CMG_CONN_CLOSED;
    cmg_buf_free(&c->out);
    cmg_buf_free(&c->tls_out);
    ERR_clear_error();
}

void cmg_conn_idle(struct cmg_conn *c)
{
    c->release_idle = true;
    release_if_idle(c);
}

int cmg_conn_discard_input(struct cmg_conn *c, size_t *dropped)
{
    char buf[16384];
    size_t round = 0;

    while (round < CMG_CONN_READ_BUDGET) {
        ssize_t n = recv(c->io.fd, buf, sizeof(buf), 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (n <= 0) {
            if (n == 0)
                errno = 0;
            return -1;
        }
        round += (size_t)n;
        *dropped += (size_t)n;
    }
    return 0;
}
