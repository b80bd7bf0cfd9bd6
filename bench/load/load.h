/* cmg-load: the types shared by its parts. One process runs the options and
 * forks workers; each worker is one thread with one epoll loop that drives its
 * share of the connections (connect, TLS, HTTP/1.1 or HTTP/2) and records what
 * it saw in a struct load_stats and a latency histogram. */
#ifndef LOAD_H
#define LOAD_H

#include "h1resp.h"
#include "hist.h"

#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#define LOAD_MAX_STREAMS 256
#define LOAD_MAX_HEADERS 16
#define LOAD_MAX_BIND 256

enum load_mode {
    LOAD_KEEPALIVE,   /* every connection sends its next request as soon as it can */
    LOAD_RATE,        /* requests at a fixed total rate, latency from the scheduled time */
    LOAD_NEWCONN,     /* one request per connection: connect, handshake, request, close */
    LOAD_IDLE         /* open connections, optionally one request each, then hold them */
};

enum load_proto { LOAD_H1, LOAD_H2 };

struct load_opts {
    /* the target */
    bool tls;
    char host[256];                 /* Host / :authority without the port; SNI; name checked */
    char authority[300];            /* Host header value */
    char path[4096];
    char method[16];
    struct sockaddr_storage addr;   /* where to connect */
    socklen_t addrlen;
    /* credentials */
    const char *cacert, *cert, *key, *bearer;
    const char *headers[LOAD_MAX_HEADERS];
    int nheaders;
    /* the shape of the load */
    enum load_mode mode;
    enum load_proto proto;
    unsigned connections, streams, procs, concurrency;
    double duration_s, warmup_s, rate, hold_s, max_time_s;
    uint64_t requests;              /* stop after this many (0: run for duration_s) */
    uint64_t body_size;             /* request body bytes */
    bool idle_request;
    uint32_t src_first, src_last;   /* source addresses, host order; 0: the kernel's choice */
    bool quiet;
    /* --notify: SSE channels, one certificate each (notify.c) */
    bool notify;
    bool key_data;                  /* an event is known by its data, not its id */
    const char *mint_ca, *mint_ca_key, *cert_dir, *ids_out, *last_event_id;
    unsigned long device_offset;
    uint32_t bind[LOAD_MAX_BIND];   /* source addresses, host order, round-robin */
    unsigned nbind;
    double connect_rate;            /* dials per second (0: as fast as --concurrency allows) */
};

struct load_stats {
    uint64_t requests;              /* responses completed inside the measurement window */
    uint64_t status[6];             /* by class: [1] 1xx (unused) .. [5] 5xx, [0] other */
    uint64_t errors;                /* connections or requests that failed */
    uint64_t connects, handshakes;
    uint64_t bytes_in, bytes_out;   /* response / request body bytes in the window */
    uint64_t established, dropped;  /* idle mode */
    double window_s;
    double establish_s;
    double cpu_user_s, cpu_sys_s;
    uint32_t timed_out;
    char first_error[200];
};

struct load_worker;

/* One request of an HTTP/2 connection. */
struct load_stream {
    struct load_conn *c;
    bool used;
    int status;
    uint64_t start_ns;
    uint64_t body_left;             /* request body still to send */
};

enum load_conn_state { LOAD_CS_NONE, LOAD_CS_CONNECTING, LOAD_CS_HANDSHAKE, LOAD_CS_OPEN };

struct load_conn {
    struct load_worker *w;
    unsigned index;                 /* across all workers: picks the source address */
    enum load_conn_state state;
    int fd;
    SSL *ssl;
    bool rd, wr;                    /* edge-triggered readiness not yet used up */
    uint64_t connect_ns;            /* when the current connection was begun */
    uint64_t retry_ns;              /* when to dial again after a failure (0: not waiting) */
    bool established;               /* idle mode: counted */
    bool failed_for_good;           /* idle mode: not dialled again */
    /* output */
    char *wbuf;
    size_t woff, wlen, wcap;
    /* HTTP/1.1 */
    struct load_h1 rp;
    bool busy;
    uint64_t start_ns;
    uint64_t body_left;
    unsigned served;                /* requests completed on this connection */
    /* HTTP/2 */
    nghttp2_session *h2;
    unsigned inflight;
    struct load_stream *slots;
    /* fixed rate */
    uint64_t next_due_ns;           /* next scheduled request */
    uint64_t queued;                /* due requests that found no free slot */
    uint64_t queue_due_ns;          /* the oldest of them was due then */
};

struct load_worker {
    const struct load_opts *o;
    unsigned index;
    unsigned nconns, conn_base;
    double rate;                    /* this worker's share */
    uint64_t quota;                 /* this worker's share of requests (0: none) */
    uint64_t issued, completed;
    struct load_conn *conns;
    int ep;
    SSL_CTX *ctx;
    char *req_head;                 /* the HTTP/1.1 request head, built once */
    size_t req_head_len;
    uint64_t interval_ns;           /* per connection, fixed rate */
    uint64_t t_start, t_measure, t_end, t_deadline, t_first, t_last;
    bool measuring, stopping, holding;
    unsigned connecting;            /* idle: dials not yet resolved */
    unsigned next_dial;             /* idle: connections not yet dialled start here */
    struct load_stats st;
    struct load_hist *hist;
    char rbuf[65536];
};

/* Monotonic nanoseconds. */
uint64_t load_now(void);
/* The body of every request: a fixed pattern, sent as often as needed. */
extern const unsigned char load_pattern[65536];

/* ---- conn.c: one connection ---- */
int load_conn_dial(struct load_conn *c);
void load_conn_event(struct load_conn *c, uint32_t events);
/* Closes the socket; in-flight requests are abandoned (not counted). */
void load_conn_close(struct load_conn *c);
bool load_conn_can_issue(const struct load_conn *c);
/* Sends a request now; its latency counts from start_ns. */
void load_conn_issue(struct load_conn *c, uint64_t start_ns);
/* Writes what is queued (after issuing from outside an event). */
void load_conn_flush(struct load_conn *c);

/* ---- h2.c: HTTP/2 on a connection ---- */
int load_h2_start(struct load_conn *c);
int load_h2_recv(struct load_conn *c, const uint8_t *p, size_t n);
int load_h2_submit(struct load_conn *c, uint64_t start_ns);
/* Moves frames nghttp2 wants to send into c->wbuf; 0 or -1. */
int load_h2_fill(struct load_conn *c);
void load_h2_free(struct load_conn *c);

/* ---- worker.c: what the connections report ---- */
void load_worker_opened(struct load_conn *c);
void load_worker_done(struct load_conn *c, uint64_t start_ns, int status, uint64_t body_bytes);
/* The connection failed or ended (it is closed already), with 'pending' requests
 * under way that are now lost. */
void load_worker_lost(struct load_conn *c, const char *why, unsigned pending);
void load_worker_body_out(struct load_conn *c, uint64_t n);
void load_worker_body_in(struct load_conn *c, uint64_t n);
/* Runs the worker to the end; fd_msg: pipe to the parent; fd_go: pipe from it. */
int load_worker_run(struct load_worker *w, int fd_msg, int fd_go);
/* The client TLS context of every connection (certificate, CA, ALPN); NULL with err set. */
SSL_CTX *load_client_ctx(const struct load_opts *o, char *err, size_t errlen);

/* ---- notify.c: hold SSE channels, stamp every event (--notify) ---- */
int load_notify_run(const struct load_opts *o);

#endif
