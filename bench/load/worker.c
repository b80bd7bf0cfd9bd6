/* A worker: one process, one epoll loop, its share of the connections. It
 * decides when each connection sends (as fast as it can, on a schedule, or once
 * per connection), keeps the measurement window (after the warm-up, until the
 * end) and records every response that completes inside it. */
#include "load.h"

#include <errno.h>
#include <openssl/err.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 512
#define RETRY_NS (20 * 1000000ull)
#define NS 1000000000ull

enum { MSG_ESTABLISHED = 1, MSG_FINAL = 2 };

static volatile sig_atomic_t interrupted;

static void on_signal(int sig) { interrupted = 1; }

static void note_error(struct load_worker *w, const char *why)
{
    w->st.errors++;
    if (!w->st.first_error[0])
        snprintf(w->st.first_error, sizeof(w->st.first_error), "%s", why);
}

static bool in_window(const struct load_worker *w, uint64_t now)
{
    if (w->o->mode == LOAD_IDLE)
        return true;   /* the one request of each connection: all of them count */
    return w->measuring && now <= w->t_end;
}

/* Whether one more request may start (the -n quota). */
static bool may_issue(struct load_worker *w)
{
    if (w->stopping)
        return false;
    return !w->quota || w->issued < w->quota;
}

static void issue(struct load_conn *c, uint64_t start)
{
    struct load_worker *w = c->w;
    if (!w->t_first)
        w->t_first = start;
    w->issued++;
    load_conn_issue(c, start);
}

/* Keep-alive mode: fill every free slot of the connection. */
static void feed(struct load_conn *c)
{
    struct load_worker *w = c->w;

    switch (w->o->mode) {
    case LOAD_KEEPALIVE:
        while (load_conn_can_issue(c) && may_issue(w))
            issue(c, load_now());
        break;
    case LOAD_RATE:
        /* A request that waited for a free slot counts from when it was due: the
         * wait is the server's (coordinated omission is not hidden). */
        while (c->queued && load_conn_can_issue(c) && !w->stopping) {
            issue(c, c->queue_due_ns);
            c->queued--;
            c->queue_due_ns += w->interval_ns;
        }
        break;
    case LOAD_NEWCONN:
        if (load_conn_can_issue(c) && c->served == 0 && !c->busy && may_issue(w))
            issue(c, c->connect_ns);   /* latency includes connect and handshake */
        break;
    case LOAD_IDLE:
        if (w->o->idle_request && !c->established && load_conn_can_issue(c) && c->served == 0)
            issue(c, load_now());
        break;
    }
}

static void idle_established(struct load_conn *c)
{
    struct load_worker *w = c->w;
    if (c->established)
        return;
    c->established = true;
    w->st.established++;
    w->connecting--;
}

void load_worker_opened(struct load_conn *c)
{
    struct load_worker *w = c->w;

    if (w->stopping) {
        load_conn_close(c);
        return;
    }
    if (w->o->mode == LOAD_IDLE && !w->o->idle_request) {
        idle_established(c);
        return;
    }
    feed(c);
}

void load_worker_body_out(struct load_conn *c, uint64_t n)
{
    struct load_worker *w = c->w;
    if (in_window(w, load_now()) || w->o->requests)
        w->st.bytes_out += n;
}

void load_worker_body_in(struct load_conn *c, uint64_t n)
{
    struct load_worker *w = c->w;
    if (in_window(w, load_now()) || w->o->requests)
        w->st.bytes_in += n;
}

void load_worker_done(struct load_conn *c, uint64_t start_ns, int status, uint64_t body_bytes)
{
    struct load_worker *w = c->w;
    uint64_t now = load_now();

    w->completed++;
    w->t_last = now;
    if (status == 0) {
        note_error(w, "request reset or cut short");
    } else if (in_window(w, now)) {
        w->st.requests++;
        w->st.status[status / 100 <= 5 ? status / 100 : 0]++;
        if (status >= 400) {
            char why[64];
            snprintf(why, sizeof(why), "HTTP status %d", status);
            if (!w->st.first_error[0])
                snprintf(w->st.first_error, sizeof(w->st.first_error), "%s", why);
        }
        load_hist_record(w->hist, now > start_ns ? now - start_ns : 0);
    }
    if (w->quota && w->completed >= w->quota)
        w->stopping = true;
    switch (w->o->mode) {
    case LOAD_NEWCONN:
        /* One request per connection: part, and dial the next one. */
        load_conn_close(c);
        if (!w->stopping && may_issue(w))
            load_conn_dial(c);
        return;
    case LOAD_IDLE:
        if (c->state == LOAD_CS_OPEN) {
            idle_established(c);
        } else {   /* the server closed after its answer: nothing is held */
            w->connecting--;
            c->failed_for_good = true;
            note_error(w, "closed by the server after the first response");
        }
        return;
    default:
        if (c->state == LOAD_CS_OPEN)
            feed(c);
        else if (!w->stopping)
            load_conn_dial(c);   /* the server closed after its answer: go on anew */
        return;
    }
}

void load_worker_lost(struct load_conn *c, const char *why, unsigned pending)
{
    struct load_worker *w = c->w;

    if (w->stopping)
        return;
    /* Requests that were under way failed: they count as done (and as errors),
     * so that a fixed number of requests still comes to an end. */
    w->completed += pending;
    if (w->quota && w->completed >= w->quota)
        w->stopping = true;
    if (w->o->mode == LOAD_IDLE) {
        if (c->established) {
            if (w->holding)
                w->st.dropped++;
            c->established = false;
            w->st.established--;
        } else {
            w->connecting--;
        }
        note_error(w, why);
        c->failed_for_good = true;
        return;
    }
    note_error(w, why);
    if (!w->stopping)
        c->retry_ns = load_now() + RETRY_NS;
}

static int build_request(struct load_worker *w)
{
    const struct load_opts *o = w->o;
    size_t cap = strlen(o->path) + strlen(o->authority) + 8192;
    char *p = malloc(cap);
    int n;

    if (!p)
        return -1;
    n = snprintf(p, cap, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: cmg-load\r\n", o->method,
                 o->path, o->authority);
    if (o->bearer)
        n += snprintf(p + n, cap - (size_t)n, "Authorization: Bearer %s\r\n", o->bearer);
    for (int i = 0; i < o->nheaders; i++)
        n += snprintf(p + n, cap - (size_t)n, "%s\r\n", o->headers[i]);
    if (o->body_size || !strcmp(o->method, "POST") || !strcmp(o->method, "PUT"))
        n += snprintf(p + n, cap - (size_t)n, "Content-Length: %llu\r\n",
                      (unsigned long long)o->body_size);
    if (o->mode == LOAD_NEWCONN)
        n += snprintf(p + n, cap - (size_t)n, "Connection: close\r\n");
    n += snprintf(p + n, cap - (size_t)n, "\r\n");
    if ((size_t)n >= cap) {
        free(p);
        return -1;
    }
    w->req_head = p;
    w->req_head_len = (size_t)n;
    return 0;
}

SSL_CTX *load_client_ctx(const struct load_opts *o, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    unsigned char alpn_h2[] = "\x02h2", alpn_h1[] = "\x08http/1.1";

    if (!ctx)
        goto fail;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    /* Every connection is a full handshake: no session is ever resumed. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              (o->mode == LOAD_IDLE ? SSL_MODE_RELEASE_BUFFERS : 0));
    if (o->cacert) {
        if (SSL_CTX_load_verify_locations(ctx, o->cacert, NULL) != 1)
            goto fail;
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    }
    if (o->cert && (SSL_CTX_use_certificate_chain_file(ctx, o->cert) != 1 ||
                    SSL_CTX_use_PrivateKey_file(ctx, o->key ? o->key : o->cert,
                                                SSL_FILETYPE_PEM) != 1 ||
                    SSL_CTX_check_private_key(ctx) != 1))
        goto fail;
    if (o->proto == LOAD_H2 ? SSL_CTX_set_alpn_protos(ctx, alpn_h2, 3)
                            : SSL_CTX_set_alpn_protos(ctx, alpn_h1, 9))
        goto fail;
    return ctx;
fail:
    {
        unsigned long e = ERR_get_error();
        char detail[200] = "unknown error";
        if (e)
            ERR_error_string_n(e, detail, sizeof(detail));
        snprintf(err, errlen, "TLS setup (CA, certificate or key): %s", detail);
    }
    SSL_CTX_free(ctx);
    return NULL;
}

/* Fixed rate: requests that fell due go out, or wait for a free slot. */
static void schedule(struct load_worker *w, uint64_t now)
{
    for (unsigned i = 0; i < w->nconns; i++) {
        struct load_conn *c = &w->conns[i];
        while (c->next_due_ns <= now && !w->stopping) {
            if (!c->queued && load_conn_can_issue(c)) {
                issue(c, now);   /* on time: the client's own lateness is not the server's */
            } else {
                if (!c->queued)
                    c->queue_due_ns = c->next_due_ns;
                c->queued++;
            }
            c->next_due_ns += w->interval_ns;
        }
        if (c->state == LOAD_CS_OPEN)
            load_conn_flush(c);
    }
}

/* Idle mode: dial more while fewer than 'concurrency' handshakes are under way. */
static void dial_more(struct load_worker *w)
{
    while (w->next_dial < w->nconns && w->connecting < w->o->concurrency && !w->stopping) {
        struct load_conn *c = &w->conns[w->next_dial++];
        w->connecting++;
        load_conn_dial(c);
    }
}

static uint64_t next_wake(struct load_worker *w, uint64_t now)
{
    uint64_t t = w->t_deadline;

    if ((w->measuring || w->holding) && w->t_end < t)
        t = w->t_end;
    else if (!w->measuring && w->t_measure && w->t_measure < t)
        t = w->t_measure;
    for (unsigned i = 0; i < w->nconns; i++) {
        struct load_conn *c = &w->conns[i];
        if (c->retry_ns && c->retry_ns < t)
            t = c->retry_ns;
        if (w->o->mode == LOAD_RATE && c->next_due_ns < t)
            t = c->next_due_ns;
    }
    return t > now ? t - now : 0;
}

static int send_msg(int fd, int kind, const struct load_worker *w)
{
    const char *p;
    size_t left;
    int k = kind;

    if (write(fd, &k, sizeof(k)) != (ssize_t)sizeof(k))
        return -1;
    if (kind == MSG_ESTABLISHED)
        return write(fd, &w->st, sizeof(w->st)) == (ssize_t)sizeof(w->st) ? 0 : -1;
    for (int part = 0; part < 2; part++) {
        p = part ? (const char *)w->hist : (const char *)&w->st;
        left = part ? sizeof(*w->hist) : sizeof(w->st);
        while (left) {
            ssize_t n = write(fd, p, left);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                return -1;
            p += n;
            left -= (size_t)n;
        }
    }
    return 0;
}

static void finish_stats(struct load_worker *w)
{
    struct rusage ru;
    const struct load_opts *o = w->o;

    if (o->requests && o->mode != LOAD_IDLE) {
        /* A fixed number of requests: from the first sent to the last answered. */
        w->st.window_s = w->t_last > w->t_first ? (double)(w->t_last - w->t_first) / 1e9 : 0;
    } else if (o->mode != LOAD_IDLE) {
        uint64_t end = load_now();
        if (end > w->t_end)
            end = w->t_end;
        w->st.window_s = w->measuring && end > w->t_measure ? (double)(end - w->t_measure) / 1e9 : 0;
    }
    if (getrusage(RUSAGE_SELF, &ru) == 0) {
        w->st.cpu_user_s = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
        w->st.cpu_sys_s = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    }
}

int load_worker_run(struct load_worker *w, int fd_msg, int fd_go)
{
    const struct load_opts *o = w->o;
    struct epoll_event events[MAX_EVENTS];
    struct epoll_event gev = {.events = EPOLLIN, .data.ptr = NULL};
    char err[300];
    bool told = false;

    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    prctl(PR_SET_TIMERSLACK, 1UL);   /* wake on time for the schedule */
    if (!(w->hist = malloc(sizeof(*w->hist))))
        return 1;
    load_hist_reset(w->hist);
    if (o->tls && !(w->ctx = load_client_ctx(o, err, sizeof(err)))) {
        fprintf(stderr, "cmg-load: %s\n", err);
        return 1;
    }
    if (build_request(w) < 0 || (w->ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
        return 1;
    if (fd_go >= 0)
        epoll_ctl(w->ep, EPOLL_CTL_ADD, fd_go, &gev);
    if (!(w->conns = calloc(w->nconns ? w->nconns : 1, sizeof(*w->conns))))
        return 1;

    w->t_start = load_now();
    w->t_deadline = w->t_start + (uint64_t)(o->max_time_s * 1e9);
    if (o->mode != LOAD_IDLE && !o->requests) {
        w->t_measure = w->t_start + (uint64_t)(o->warmup_s * 1e9);
        w->t_end = w->t_measure + (uint64_t)(o->duration_s * 1e9);
    } else if (o->mode != LOAD_IDLE) {
        w->measuring = true;   /* count everything until the quota */
        w->t_measure = w->t_start;
        w->t_end = w->t_deadline;
    }
    if (w->rate > 0)
        w->interval_ns = (uint64_t)((double)w->nconns / w->rate * 1e9);
    for (unsigned i = 0; i < w->nconns; i++) {
        struct load_conn *c = &w->conns[i];
        c->w = w;
        c->index = w->conn_base + i;
        c->fd = -1;
        /* Spread the first requests of the schedule evenly over one interval. */
        c->next_due_ns = w->t_start + (uint64_t)(0.05 * NS) +
                         (w->interval_ns / (w->nconns ? w->nconns : 1)) * i;
    }
    if (o->mode == LOAD_IDLE)
        dial_more(w);
    else
        for (unsigned i = 0; i < w->nconns; i++)
            load_conn_dial(&w->conns[i]);

    while (!interrupted) {
        uint64_t now = load_now(), wait = next_wake(w, now);
        struct timespec ts = {.tv_sec = (time_t)(wait / NS), .tv_nsec = (long)(wait % NS)};
        int n = epoll_pwait2(w->ep, events, MAX_EVENTS, &ts, NULL);

        if (n < 0 && errno != EINTR)
            break;
        for (int i = 0; i < n; i++) {
            if (!events[i].data.ptr) {   /* the parent says: everyone is up, hold now */
                char b;
                if (read(fd_go, &b, 1) < 0 && errno == EINTR)
                    continue;
                w->holding = true;
                w->t_end = load_now() + (uint64_t)(o->hold_s * 1e9);
                w->t_deadline = w->t_end + 5 * NS;
                epoll_ctl(w->ep, EPOLL_CTL_DEL, fd_go, NULL);
                continue;
            }
            load_conn_event(events[i].data.ptr, events[i].events);
        }
        now = load_now();
        if (!w->measuring && w->t_measure && now >= w->t_measure) {
            /* The warm-up is over: what counts starts now. */
            memset(&w->st, 0, sizeof(w->st));
            load_hist_reset(w->hist);
            w->measuring = true;
        }
        if (o->mode != LOAD_IDLE && w->measuring && now >= w->t_end)
            break;
        if (now >= w->t_deadline) {
            if (!(o->mode == LOAD_IDLE && w->holding))
                w->st.timed_out = 1;
            break;
        }
        if (w->stopping && o->mode != LOAD_IDLE)
            break;
        for (unsigned i = 0; i < w->nconns; i++) {
            struct load_conn *c = &w->conns[i];
            if (c->retry_ns && now >= c->retry_ns && c->state == LOAD_CS_NONE && !w->stopping)
                load_conn_dial(c);
        }
        if (o->mode == LOAD_RATE)
            schedule(w, now);
        if (o->mode == LOAD_IDLE) {
            dial_more(w);
            if (!told && w->next_dial == w->nconns && w->connecting == 0) {
                told = true;
                w->st.establish_s = (double)(now - w->t_start) / 1e9;
                if (send_msg(fd_msg, MSG_ESTABLISHED, w) < 0)
                    break;
            }
            if (w->holding && now >= w->t_end)
                break;
        }
    }
    w->stopping = true;
    if (o->mode == LOAD_IDLE && !told) {   /* deadline: say how far we got */
        w->st.establish_s = (double)(load_now() - w->t_start) / 1e9;
        send_msg(fd_msg, MSG_ESTABLISHED, w);
    }
    for (unsigned i = 0; i < w->nconns; i++)
        load_conn_close(&w->conns[i]);
    finish_stats(w);
    return send_msg(fd_msg, MSG_FINAL, w) < 0 ? 1 : 0;
}
