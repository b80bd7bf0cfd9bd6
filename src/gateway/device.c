/* Device connections: accept, TLS handshake, then HTTP/1.1 or HTTP/2 by ALPN. */
#include "core/log.h"
#include "gateway/gw.h"
#include "tls/tls.h"

#include <errno.h>
#include <openssl/err.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void device_free(void *p)
{
    struct cmg_device *d = p;
    cmg_h1_free(d);
    cmg_h2dev_free(d);
    free(d->tok);
    free(d);
}

void cmg_device_close(struct cmg_device *d, const char *why)
{
    struct cmg_gateway *gw = d->gw;

    if (d->conn.state == CMG_CONN_CLOSED && d->conn.io.fd < 0)
        return;
    cmg_debug("device %s closed: %s", d->conn.peer, why);
    cmg_timer_stop(gw->loop, &d->timer);
    cmg_gw_admission_forget(gw, d);
    /* Protocol state goes first: it may still detach exchanges. */
    cmg_h1_free(d);
    cmg_h2dev_free(d);
    cmg_gw_report_device_gone(gw, d);
    cmg_conn_close(&d->conn);
    cmg_gw_device_gone(gw, &d->src);
    if (d->prev)
        d->prev->next = d->next;
    else
        gw->devices = d->next;
    if (d->next)
        d->next->prev = d->prev;
    cmg_loop_free_later(gw->loop, d, device_free);
}

/* ---- lingering close ---- */

/* What a lingering connection may still send before it is closed outright. */
#define LINGER_MAX_BYTES (4 * 1024 * 1024)

static void on_linger_timeout(struct cmg_timer *t)
{
    struct cmg_device *d = (struct cmg_device *)((char *)t - offsetof(struct cmg_device, timer));
    cmg_device_close(d, d->linger_why);
}

/* Reads and drops the device's input, straight from the socket (nothing of it is used,
 * not even decrypted): until it closes, or the bounds are reached. */
static void linger_read(struct cmg_device *d)
{
    if (cmg_conn_discard_input(&d->conn, &d->linger_bytes) < 0)
        cmg_device_close(d, d->linger_why);
    else if (d->linger_bytes > LINGER_MAX_BYTES)
        cmg_device_close(d, "closed while lingering: the device kept sending");
}

void cmg_device_linger(struct cmg_device *d, uint32_t ms, const char *why)
{
    if (d->lingering)
        return;
    d->linger_ms = ms;
    d->linger_why = why;
    if (d->conn.ssl && !d->close_notify_sent) {
        d->close_notify_sent = true;
        ERR_clear_error();
        SSL_shutdown(d->conn.ssl);   /* queued with the connection's output */
        ERR_clear_error();
        cmg_conn_flush(&d->conn);
    }
    d->linger_due = cmg_conn_pending(&d->conn) > 0;
    if (d->linger_due)
        return;                      /* on_drain comes back here */
    d->lingering = true;
    shutdown(d->conn.io.fd, SHUT_WR);
    cmg_timer_start(d->gw->loop, &d->timer, ms, on_linger_timeout);
    cmg_conn_want_read(&d->conn, true);
}

static void on_handshake_timeout(struct cmg_timer *t)
{
    struct cmg_device *d = (struct cmg_device *)((char *)t - offsetof(struct cmg_device, timer));
    cmg_debug("device %s: TLS handshake timed out", d->conn.peer);
    cmg_device_close(d, "handshake timeout");
}

static void on_open(struct cmg_conn *c)
{
    struct cmg_device *d = c->owner;
    bool h2;
    int rc;

    cmg_timer_stop(d->gw->loop, &d->timer);
    h2 = cmg_tls_alpn_is(c->ssl, "h2");
    cmg_gw_metrics_device(d->gw, h2);
    cmg_gw_handshake_done(d, SSL_session_reused(c->ssl) == 1);
    rc = h2 ? cmg_h2dev_start(d) : cmg_h1_start(d);
    if (rc < 0)
        cmg_device_close(d, "out of memory");
    else if (d->gw->state == CMG_GW_DRAINING)   /* accepted just before the drain */
        cmg_device_drain(d);
}

static void on_read(struct cmg_conn *c)
{
    struct cmg_device *d = c->owner;
    if (d->lingering)
        linger_read(d);
    else if (d->h2)
        cmg_h2dev_on_read(d);
    else if (d->h1)
        cmg_h1_on_read(d);
}

static void on_drain(struct cmg_conn *c)
{
    struct cmg_device *d = c->owner;
    if (d->linger_due)
        cmg_device_linger(d, d->linger_ms, d->linger_why);
    else if (d->lingering)
        return;
    else if (d->h2)
        cmg_h2dev_on_drain(d);
    else if (d->h1)
        cmg_h1_on_drain(d);
}

struct cmg_log_limit cmg_refused_requests = {.what = "refused requests", .burst = 100};

static struct cmg_log_limit failed_handshakes = {.what = "failed device handshakes"};

static void on_error(struct cmg_conn *c, const char *why)
{
    struct cmg_device *d = c->owner;
    if (c->state == CMG_CONN_HANDSHAKE)   /* anyone can cause this line: rate-limited */
        cmg_log_limited(&failed_handshakes, CMG_LOG_INFO, "device %s: %s", c->peer, why);
    cmg_device_close(d, why);
}

static const struct cmg_conn_ops device_ops = {on_open, on_read, on_drain, on_error};

void cmg_device_accept(struct cmg_gateway *gw, int fd, const struct cmg_addr_key *src)
{
    struct cmg_device *d = calloc(1, sizeof(*d));
    SSL *ssl = d ? SSL_new(gw->device_ctx) : NULL;

    if (!ssl) {
        cmg_warn("out of memory accepting a device connection");
        free(d);
        close(fd);
        cmg_addrcount_del(&gw->dev_sources, src);
        return;
    }
    d->gw = gw;
    d->src = *src;
    gw->ndevices++;   /* counted from here: cmg_gw_device_gone() uncounts */
    SSL_set_accept_state(ssl);
    SSL_set_app_data(ssl, d);   /* for handshake_rate's ClientHello callback */
    if (cmg_conn_start(&d->conn, gw->loop, fd, ssl, false, &device_ops, d) < 0) {
        free(d);
        cmg_gw_device_gone(gw, src);
        return;
    }
    d->next = gw->devices;
    if (d->next)
        d->next->prev = d;
    gw->devices = d;
    cmg_timer_start(gw->loop, &d->timer, gw->cfg.handshake_timeout_ms, on_handshake_timeout);
}

void cmg_device_drain(struct cmg_device *d)
{
    if (d->h2)
        cmg_h2dev_drain(d);
    else if (d->h1)
        cmg_h1_drain(d);
    /* still in its TLS handshake: on_open drains it */
}

void cmg_device_close_all(struct cmg_gateway *gw)
{
    while (gw->devices)
        cmg_device_close(gw->devices, "gateway stopping");
}
