/* A non-blocking stream connection, plain TCP or TLS (OpenSSL), owned by one loop.
 * The owner reads with cmg_conn_read() when told the connection is readable, and
 * queues output in c->out then calls cmg_conn_flush(). Failures are reported once,
 * asynchronously, through ops->on_error, so that no owner code is re-entered. */
#ifndef CMG_CONN_H
#define CMG_CONN_H

#include "core/buf.h"
#include "core/loop.h"
#include "core/net.h"

#include <openssl/ssl.h>
#include <stdbool.h>
#include <sys/types.h>

#define CMG_AGAIN (-2)

struct cmg_conn;

struct cmg_conn_ops {
    void (*on_open)(struct cmg_conn *c);   /* connected, TLS handshake done */
    void (*on_read)(struct cmg_conn *c);   /* read until CMG_AGAIN (or stop reading) */
    void (*on_drain)(struct cmg_conn *c);  /* queued output that had to wait is written */
    void (*on_error)(struct cmg_conn *c, const char *why); /* the owner closes it */
};

enum cmg_conn_state { CMG_CONN_CLOSED, CMG_CONN_CONNECTING, CMG_CONN_HANDSHAKE, CMG_CONN_OPEN };

struct cmg_conn {
    struct cmg_io io;
    SSL *ssl;
    const struct cmg_conn_ops *ops;
    void *owner;
    struct cmg_buf out;
    struct cmg_buf tls_out;  /* TLS records made, not yet written to the socket */
    struct cmg_task task;
    enum cmg_conn_state state;
    bool reading;            /* the owner wants data */
    bool in_paused;          /* EPOLLIN off: input came while the owner did not want it */
    bool write_wants_read;   /* SSL_write needs the socket readable */
    bool kick_read;          /* deliver on_read from the task */
    bool flush_later;        /* write c->out from the task */
    bool drain_owed;         /* a flush left output waiting: on_drain once it is written */
    bool pending_open;       /* deliver on_open from the task */
    bool release_idle;       /* free the buffers once all output is written */
    bool failed, reported;
    bool hello_paused;       /* the ClientHello callback suspended the handshake */
    uint64_t read_round;     /* loop round that read_bytes counts */
    size_t read_bytes;       /* input taken in that round (fairness budget) */
    char peer[64];           /* "ip:port", for logs */
    char why[256];
};

/* Takes ownership of fd and ssl (NULL for plain TCP). The TLS role must be set on ssl. */
int cmg_conn_start(struct cmg_conn *c, struct cmg_loop *loop, int fd, SSL *ssl, bool connecting,
                   const struct cmg_conn_ops *ops, void *owner);
/* Input one connection may take per loop round: past it cmg_conn_read() says
 * CMG_AGAIN and on_read comes again next round, after the other connections. */
#define CMG_CONN_READ_BUDGET (256 * 1024)

/* > 0: bytes; 0: end of stream; CMG_AGAIN: nothing now, or this round's budget is
 * spent (on_read follows next round), or failed (on_error follows). */
ssize_t cmg_conn_read(struct cmg_conn *c, void *buf, size_t len);
/* Queues n bytes after what c->out holds. Over TLS they are encrypted at once from
 * p, a copy fewer (small writes after queued output are gathered into c->out
 * first); p is the caller's again on return.
 * 0, or -1 (out of memory, or failed: on_error follows). */
int cmg_conn_write(struct cmg_conn *c, const void *p, size_t n);
/* Bytes queued, plain or encrypted, and not yet taken by the socket. */
static inline size_t cmg_conn_pending(const struct cmg_conn *c) { return c->out.len + c->tls_out.len; }
/* Writes what it can of c->out now; the rest when the socket allows. */
void cmg_conn_flush(struct cmg_conn *c);
void cmg_conn_want_read(struct cmg_conn *c, bool on);
/* Writes c->out once the current batch of events is handled, so that everything
 * queued meanwhile (a response's head and body, several responses) goes out in one
 * write. No on_drain follows unless the write has to wait for the socket. */
void cmg_conn_flush_later(struct cmg_conn *c);
/* A handshake the ClientHello callback suspended (SSL_CLIENT_HELLO_RETRY) goes on from
 * the loop: until then the connection waits, its socket not watched. */
void cmg_conn_resume_handshake(struct cmg_conn *c);
/* Reports failure through on_error (once), from the loop, not from this call. */
void cmg_conn_fail(struct cmg_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Releases the socket and TLS state now; the struct stays the owner's. */
void cmg_conn_close(struct cmg_conn *c);
/* The connection idles: its buffers are freed as soon as all output is written. */
void cmg_conn_idle(struct cmg_conn *c);
/* After our side ended: reads and drops the peer's input straight from the socket (not
 * decrypted), at most CMG_CONN_READ_BUDGET bytes this round (level-triggered: the rest
 * next round). 0: nothing more for now; -1: the peer closed (errno 0) or failed (errno).
 * *dropped grows by what was read. */
int cmg_conn_discard_input(struct cmg_conn *c, size_t *dropped);
static inline bool cmg_conn_open(const struct cmg_conn *c) { return c->state == CMG_CONN_OPEN && !c->failed; }

#endif
