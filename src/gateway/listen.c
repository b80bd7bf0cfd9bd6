/* The gateway's listeners: devices and connectors are accepted within their limits
 * (in total, per source address, tunnel handshakes not yet authenticated), and when
 * descriptors run out every listener pauses rather than spin on a level-triggered
 * socket that stays readable.
 *
 * The device port is shared by the instances (SO_REUSEPORT). Its sockets are bound at
 * start (before the drop from root) but listen only once the instance can serve
 * (cmg_gw_listen_devices): a socket that is bound and not listening takes none of the
 * port's connections. At a drain they accept what is queued, then close. */
#include "core/log.h"
#include "gateway/gw.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define ACCEPT_BATCH 64
#define PAUSE_MS 100
/* Descriptors kept for what is not a device or a handshake: tunnels, listeners,
 * the policy cache, logs. */
#define FD_RESERVE 32

static struct cmg_log_limit refusals = {.what = "refused connections"};
static struct cmg_log_limit fd_warnings = {.what = "descriptor warnings"};

static void set_listening(struct cmg_gateway *gw, bool devices, bool tunnels)
{
    for (int i = 0; i < gw->nlisteners; i++) {
        struct cmg_listener *l = &gw->listeners[i];
        cmg_io_set(&l->io, (l->tunnel ? tunnels : devices) ? EPOLLIN : 0);   /* if listening */
    }
}

static bool devices_full(const struct cmg_gateway *gw) { return gw->ndevices >= gw->max_devices; }

/* The device listeners may take connections: room for them. */
static bool devices_open(const struct cmg_gateway *gw) { return !devices_full(gw); }

static void on_resume(struct cmg_timer *t)
{
    struct cmg_gateway *gw =
        (struct cmg_gateway *)((char *)t - offsetof(struct cmg_gateway, accept_timer));
    gw->accept_paused = false;
    set_listening(gw, devices_open(gw), true);
}

/* Out of descriptors: nothing can be accepted until some close. */
static void pause_all(struct cmg_gateway *gw, int err)
{
    cmg_log_limited(&fd_warnings, CMG_LOG_WARN,
                    "accept: %s (%u devices, %u tunnel handshakes): listeners paused for %d ms",
                    strerror(err), gw->ndevices, gw->nhandshakes, PAUSE_MS);
    gw->accept_paused = true;
    set_listening(gw, false, false);
    cmg_timer_start(gw->loop, &gw->accept_timer, PAUSE_MS, on_resume);
}

static void refuse(int fd, const struct sockaddr *sa, const char *what, uint32_t n,
                   const char *key)
{
    char peer[64], msg[64];

    cmg_addr_str(sa, peer, sizeof(peer));
    close(fd);
    snprintf(msg, sizeof(msg), "refused %s", what);
    {
        const struct cmg_log_field f[] = {
            CMG_F_STR("peer", peer), CMG_F_STR("reason", key), CMG_F_NUM("count", n)};
        cmg_log_kv_limited(&refusals, CMG_LOG_INFO, msg, f, CMG_LOG_NFIELDS(f));
    }
}

/* ---- handshake_rate: a token bucket of one second's worth, charged by the full TLS
 * handshakes. Accepting never waits for it (a connect and close costs no token, so a
 * flood of them cannot shut the port): the ClientHello decides. One that carries a
 * session ticket or a PSK is likely to resume and goes on at once, charged when its
 * handshake turns out full; any other takes a token, or waits in a FIFO, its handshake
 * suspended (SSL_CLIENT_HELLO_RETRY), until a token frees; handshake_timeout bounds the
 * wait. Resumed devices never wait behind full ones, unless forged tickets already ran
 * the bucket a second's worth into debt. */

#define RATE_MIN_WAIT_MS 10

static void refill(struct cmg_gateway *gw)
{
    uint32_t rate = gw->cfg.handshake_rate;
    uint64_t now = cmg_loop_now(gw->loop);

    gw->hs_tokens += (double)(now - gw->hs_refilled_ms) * rate / 1000.0;
    gw->hs_refilled_ms = now;
    if (gw->hs_tokens >= rate) {
        gw->hs_tokens = rate;
        gw->rate_episode = false;   /* a full second's worth again: the next wait is news */
    }
}

static void unqueue(struct cmg_gateway *gw, struct cmg_device *d)
{
    if (d->hs_wait_prev)
        d->hs_wait_prev->hs_wait_next = d->hs_wait_next;
    else
        gw->hs_wait_head = d->hs_wait_next;
    if (d->hs_wait_next)
        d->hs_wait_next->hs_wait_prev = d->hs_wait_prev;
    else
        gw->hs_wait_tail = d->hs_wait_prev;
    d->hs_wait_prev = d->hs_wait_next = NULL;
    d->hs_waiting = false;
}

/* A waiting device that hung up (or whose socket the peer reset) costs no token: it
 * is closed instead. */
static bool hung_up(struct cmg_device *d)
{
    char byte;

    ssize_t n = recv(d->conn.io.fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);

    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static void on_rate_timer(struct cmg_timer *t);

/* Tokens to the waiting devices, first come first served; the timer for the rest. */
static void admit_waiting(struct cmg_gateway *gw)
{
    uint32_t rate = gw->cfg.handshake_rate;

    refill(gw);
    while (gw->hs_wait_head && (rate == 0 || gw->hs_tokens >= 1)) {
        struct cmg_device *d = gw->hs_wait_head;

        unqueue(gw, d);
        if (hung_up(d)) {
            cmg_device_close(d, "closed while its TLS handshake waited for handshake_rate");
            continue;
        }
        if (rate)
            gw->hs_tokens -= 1;
        d->hs_charged = true;
        cmg_conn_resume_handshake(&d->conn);
    }
    if (gw->hs_wait_head) {
        uint64_t ms = (uint64_t)((1 - gw->hs_tokens) * 1000 / rate) + 1;
        cmg_timer_start(gw->loop, &gw->rate_timer, ms < RATE_MIN_WAIT_MS ? RATE_MIN_WAIT_MS : ms,
                        on_rate_timer);
    }
}

static void on_rate_timer(struct cmg_timer *t)
{
    admit_waiting((struct cmg_gateway *)((char *)t - offsetof(struct cmg_gateway, rate_timer)));
}

static void wait_in_turn(struct cmg_gateway *gw, struct cmg_device *d)
{
    bool first = !gw->hs_wait_head;

    d->hs_waiting = true;
    d->hs_wait_prev = gw->hs_wait_tail;
    if (gw->hs_wait_tail)
        gw->hs_wait_tail->hs_wait_next = d;
    else
        gw->hs_wait_head = d;
    gw->hs_wait_tail = d;
    if (!first)
        return;
    gw->metrics.rate_pauses++;
    admit_waiting(gw);   /* arms the timer */
    if (!gw->rate_episode) {
        gw->rate_episode = true;
        cmg_info("handshake_rate reached: full TLS handshakes wait their turn (%u a second; "
                 "at most handshake_timeout, then closed; resumed sessions do not wait)",
                 gw->cfg.handshake_rate);
    }
}

/* Whether the ClientHello offers a session to resume: a TLS 1.2 ticket, a TLS 1.3 PSK. */
static bool offers_resumption(SSL *ssl)
{
    const unsigned char *ext;
    size_t len;

    return (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_session_ticket, &ext, &len) == 1 &&
            len > 0) ||
           SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_psk, &ext, &len) == 1;
}

static int on_client_hello(SSL *ssl, int *alert, void *arg)
{
    struct cmg_device *d = SSL_get_app_data(ssl);
    struct cmg_gateway *gw = arg;
    uint32_t rate = gw->cfg.handshake_rate;

    (void)alert;
    if (!d || rate == 0 || d->hs_charged || d->hs_maybe_resumed)
        return SSL_CLIENT_HELLO_SUCCESS;
    if (d->hs_waiting)
        return SSL_CLIENT_HELLO_RETRY;
    refill(gw);
    if (offers_resumption(ssl) && gw->hs_tokens > -(double)rate) {
        /* Charged now (in debt if need be), so that one who hangs up after the server's
         * first flight pays too; cmg_gw_handshake_done gives it back if it resumed. */
        gw->hs_tokens -= 1;
        d->hs_charged = true;
        d->hs_maybe_resumed = true;
        return SSL_CLIENT_HELLO_SUCCESS;
    }
    if (!gw->hs_wait_head && gw->hs_tokens >= 1) {
        gw->hs_tokens -= 1;
        d->hs_charged = true;
        return SSL_CLIENT_HELLO_SUCCESS;
    }
    wait_in_turn(gw, d);
    return SSL_CLIENT_HELLO_RETRY;
}

int cmg_gw_admission_attach(struct cmg_gateway *gw, SSL_CTX *dev)
{
    SSL_CTX_set_client_hello_cb(dev, on_client_hello, gw);
    return 0;
}

void cmg_gw_admission_forget(struct cmg_gateway *gw, struct cmg_device *d)
{
    if (d->hs_waiting)
        unqueue(gw, d);
}

void cmg_gw_handshake_done(struct cmg_device *d, bool resumed)
{
    struct cmg_gateway *gw = d->gw;

    gw->metrics.handshakes[resumed]++;
    if (!gw->cfg.handshake_rate)
        return;
    if (!resumed && !d->hs_charged)
        gw->hs_tokens -= 1;           /* it offered a session that did not resume */
    else if (resumed && d->hs_charged && gw->hs_tokens + 1 <= gw->cfg.handshake_rate)
        gw->hs_tokens += 1;           /* its token back */
    if (resumed && d->hs_charged && gw->hs_wait_head)
        admit_waiting(gw);
}

static void accept_device(struct cmg_gateway *gw, int fd, const struct sockaddr *sa)
{
    struct cmg_addr_key k;
    uint32_t n;

    cmg_addr_key_of(sa, &k);
    n = cmg_addrcount_get(&gw->dev_sources, &k);
    if (n >= gw->cfg.max_connections_per_source) {
        refuse(fd, sa, "device connection", n, "max_connections_per_source");
        return;
    }
    if (cmg_addrcount_add(&gw->dev_sources, &k) < 0) {
        close(fd);
        cmg_warn("out of memory accepting a device connection");
        return;
    }
    cmg_device_accept(gw, fd, &k);
}

static void accept_tunnel(struct cmg_gateway *gw, int fd, const struct sockaddr *sa)
{
    struct cmg_addr_key k;
    uint32_t n;

    cmg_addr_key_of(sa, &k);
    if (gw->nhandshakes >= gw->cfg.max_tunnel_handshakes) {
        refuse(fd, sa, "tunnel connection", gw->nhandshakes, "max_tunnel_handshakes");
        return;
    }
    n = cmg_addrcount_get(&gw->hs_sources, &k);
    if (n >= gw->cfg.max_tunnel_handshakes_per_source) {
        refuse(fd, sa, "tunnel connection", n, "max_tunnel_handshakes_per_source");
        return;
    }
    if (cmg_addrcount_add(&gw->hs_sources, &k) < 0) {
        close(fd);
        cmg_warn("out of memory accepting a tunnel connection");
        return;
    }
    gw->nhandshakes++;
    if (cmg_tunnel_accept(gw, fd, &k) < 0) {
        gw->nhandshakes--;
        cmg_addrcount_del(&gw->hs_sources, &k);
        cmg_warn("out of memory accepting a tunnel connection");
    }
}

/* Accepts up to `batch` connections; false once the queue is empty, the devices are
 * full or the descriptors ran out. */
static bool accept_some(struct cmg_listener *l, int batch)
{
    struct cmg_gateway *gw = l->gw;
    int one = 1;

    for (int i = 0; i < batch; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd;

        if (!l->tunnel && devices_full(gw)) {
            /* The kernel's queue holds the rest until a device goes. */
            cmg_log_limited(&refusals, CMG_LOG_WARN,
                            "max_connections (%u) reached: new devices wait", gw->max_devices);
            set_listening(gw, false, !gw->accept_paused);
            return false;
        }
        fd = accept4(l->io.fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                pause_all(gw, errno);
            return false;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (l->tunnel)
            accept_tunnel(gw, fd, (struct sockaddr *)&ss);
        else
            accept_device(gw, fd, (struct sockaddr *)&ss);
    }
    return true;
}

static void on_accept(struct cmg_io *io, uint32_t events)
{
    (void)events;
    accept_some((struct cmg_listener *)io, ACCEPT_BATCH);
}

void cmg_gw_device_gone(struct cmg_gateway *gw, const struct cmg_addr_key *src)
{
    bool was_full = devices_full(gw);

    gw->ndevices--;
    cmg_addrcount_del(&gw->dev_sources, src);
    if (was_full && !gw->accept_paused)
        set_listening(gw, devices_open(gw), true);
    cmg_gw_drain_news(gw);
}

void cmg_gw_handshake_over(struct cmg_gateway *gw, struct cmg_tunnel *t)
{
    if (!t->handshaking)
        return;
    t->handshaking = false;
    gw->nhandshakes--;
    cmg_addrcount_del(&gw->hs_sources, &t->src);
}

/* Raises the soft descriptor limit to the hard one, and fits the connection limits
 * into it: an accept that fails for want of a descriptor helps nobody. */
int cmg_gw_fit_limits(struct cmg_gateway *gw)
{
    struct cmg_gw_config *c = &gw->cfg;
    struct rlimit rl;
    uint64_t budget, want;

    gw->max_devices = c->max_connections;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return 0;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur == RLIM_INFINITY)
        return 0;
    if (rl.rlim_cur < FD_RESERVE + 16) {
        cmg_error("the descriptor limit (%llu) is too low: at least %d are needed (raise "
                  "LimitNOFILE or ulimit -n)", (unsigned long long)rl.rlim_cur, FD_RESERVE + 16);
        return -1;
    }
    budget = rl.rlim_cur - FD_RESERVE;
    want = (uint64_t)c->max_connections + c->max_tunnel_handshakes;
    if (want <= budget)
        return 0;
    if (c->max_tunnel_handshakes > budget / 8)
        c->max_tunnel_handshakes = (uint32_t)(budget / 8);
    if (budget - c->max_tunnel_handshakes < gw->max_devices)
        gw->max_devices = (uint32_t)(budget - c->max_tunnel_handshakes);
    cmg_warn("max_connections (%u) + max_tunnel_handshakes does not fit the descriptor limit "
             "(%llu, %d kept for tunnels and files): serving at most %u devices and %u tunnel "
             "handshakes; raise LimitNOFILE or ulimit -n for more", c->max_connections,
             (unsigned long long)rl.rlim_cur, FD_RESERVE, gw->max_devices,
             c->max_tunnel_handshakes);
    return 0;
}

/* Devices: the socket is bound, and listens at cmg_gw_listen_devices(). Connectors:
 * it listens at once. */
static int add_listener(struct cmg_gateway *gw, const char *addr, int default_port, bool tunnel)
{
    struct cmg_listener *l = &gw->listeners[gw->nlisteners];
    struct cmg_addr a;
    char err[300];
    int fd;

    if (cmg_addr_parse(addr, default_port, &a, err, sizeof(err)) < 0) {
        cmg_error("listen %s: %s", addr, err);
        return -1;
    }
    fd = tunnel ? cmg_net_listen(&a, false, 4096) : cmg_net_bind(&a, true);
    if (fd < 0) {
        if (a.ss.ss_family == AF_INET6 && (errno == EAFNOSUPPORT || errno == EADDRNOTAVAIL)) {
            cmg_warn("listen %s: no IPv6 here (%s); skipped", addr, strerror(errno));
            return 0;
        }
        cmg_error("listen %s: %s", addr, strerror(errno));
        return -1;
    }
    l->gw = gw;
    l->tunnel = tunnel;
    l->fd = fd;
    l->io.fd = -1;
    cmg_addr_str((struct sockaddr *)&a.ss, l->addr, sizeof(l->addr));
    gw->nlisteners++;
    if (!tunnel)
        return 0;
    if (cmg_io_start(gw->loop, &l->io, fd, EPOLLIN, on_accept) < 0)
        return -1;
    cmg_info("listening for connectors on %s", l->addr);
    return 0;
}

int cmg_gw_listen(struct cmg_gateway *gw)
{
    struct cmg_gw_config *c = &gw->cfg;
    char taddr[300];

    if (cmg_gw_fit_limits(gw) < 0)
        return -1;
    for (int i = 0; i < c->nlisten; i++)
        if (add_listener(gw, c->listen[i], 443, false) < 0)
            return -1;
    if (strchr(c->tunnel_listen, ':') && c->tunnel_listen[0] != '[')
        snprintf(taddr, sizeof(taddr), "[%s]:%u", c->tunnel_listen, c->tunnel_port + c->instance);
    else
        snprintf(taddr, sizeof(taddr), "%s:%u", c->tunnel_listen, c->tunnel_port + c->instance);
    return add_listener(gw, taddr, 0, true);
}

int cmg_gw_listen_devices(struct cmg_gateway *gw)
{
    for (int i = 0; i < gw->nlisteners; i++) {
        struct cmg_listener *l = &gw->listeners[i];

        if (l->tunnel || l->fd < 0 || l->io.fd >= 0)
            continue;
        if (listen(l->fd, 4096) < 0 || cmg_io_start(gw->loop, &l->io, l->fd, EPOLLIN, on_accept) < 0) {
            cmg_error("listen %s: %s", l->addr, strerror(errno));
            return -1;
        }
        cmg_info("listening for devices on %s", l->addr);
    }
    if (gw->accept_paused || !devices_open(gw))
        set_listening(gw, false, !gw->accept_paused);
    return 0;
}

static void close_listener(struct cmg_listener *l)
{
    cmg_io_stop(&l->io);
    if (l->fd >= 0)
        close(l->fd);
    l->fd = -1;
}

unsigned cmg_gw_listen_leave_devices(struct cmg_gateway *gw)
{
    unsigned before = gw->ndevices;

    for (int i = 0; i < gw->nlisteners; i++) {
        struct cmg_listener *l = &gw->listeners[i];

        if (l->tunnel || l->fd < 0)
            continue;
        if (l->io.fd >= 0)
            while (accept_some(l, ACCEPT_BATCH))   /* queued: taken */
                ;
        close_listener(l);
    }
    return gw->ndevices - before;
}

void cmg_gw_listen_refit(struct cmg_gateway *gw)
{
    cmg_gw_fit_limits(gw);
    if (gw->hs_wait_head)
        admit_waiting(gw);   /* handshake_rate may have changed */
    if (!gw->accept_paused)
        set_listening(gw, devices_open(gw), true);
}

void cmg_gw_listen_close(struct cmg_gateway *gw)
{
    cmg_timer_stop(gw->loop, &gw->accept_timer);
    cmg_timer_stop(gw->loop, &gw->rate_timer);
    for (int i = 0; i < gw->nlisteners; i++)
        close_listener(&gw->listeners[i]);
    gw->nlisteners = 0;
    cmg_addrcount_free(&gw->dev_sources);
    cmg_addrcount_free(&gw->hs_sources);
}
