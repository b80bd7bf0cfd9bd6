/* Drain (SIGTERM, SIGINT): every gateway is told that this connector drains and
 * sends it no new request; a request that was already on its way is refused
 * unstarted (the gateway sends it to another connector); those in flight finish;
 * then the tunnels close and the connector exits. What is still open after
 * drain_timeout is cut. No tunnel is dialled while draining; the site feed runs until
 * the exit. A second SIGTERM, or SIGQUIT, stops at once (core/loop.c). */
#include "connector/cn.h"
#include "core/log.h"

#define DRAIN_OF(p, field) \
    ((struct cmg_connector *)((char *)(p) - offsetof(struct cmg_connector, drain.field)))
/* The tunnels' last bytes get what is left of drain_timeout, and at least this long, to
 * reach the gateways (its close says it read them all: exiting before would reset the
 * connection with the end of a response still in the socket's buffer); a gateway that
 * reads nothing must not hold the exit for longer. */
#define CLOSE_GRACE_MS 2000

static unsigned requests_in_flight(const struct cmg_connector *cn)
{
    unsigned n = 0;
    for (int i = 0; i < cn->ntunnels; i++)
        n += cmg_cn_tunnel_requests(&cn->tunnels[i]);
    return n;
}

static int tunnels_up(const struct cmg_connector *cn)
{
    int n = 0;
    for (int i = 0; i < cn->ntunnels; i++)
        n += cn->tunnels[i].up;
    return n;
}

static bool tunnels_drained(const struct cmg_connector *cn)
{
    for (int i = 0; i < cn->ntunnels; i++)
        if (!cmg_cn_tunnel_drained(&cn->tunnels[i]))
            return false;
    return true;
}

static bool tunnels_closed(const struct cmg_connector *cn)
{
    for (int i = 0; i < cn->ntunnels; i++)
        if (cn->tunnels[i].active)
            return false;
    return true;
}

static void on_close_grace(struct cmg_timer *tm)
{
    struct cmg_connector *cn = DRAIN_OF(tm, close_timer);
    cmg_warn("drain: a gateway did not confirm it read the tunnel's last bytes (it did not "
             "close) in time; exiting: the end of a response still on its way may be lost");
    cmg_loop_stop(cn->loop);
}

static uint64_t close_grace_ms(const struct cmg_connector *cn)
{
    uint64_t spent = cmg_loop_now(cn->loop) - cn->drain.started_ms;
    uint64_t left = cn->cfg.drain_timeout_ms > spent ? cn->cfg.drain_timeout_ms - spent : 0;
    return left > CLOSE_GRACE_MS ? left : CLOSE_GRACE_MS;
}

/* The end, clean (nothing left) or at drain_timeout (what is left is cut). */
static void close_tunnels(struct cmg_connector *cn, bool timed_out)
{
    struct cmg_cn_drain *d = &cn->drain;
    uint64_t took = cmg_loop_now(cn->loop) - d->started_ms;
    unsigned cut = 0;

    d->closing = true;
    cmg_timer_stop(cn->loop, &d->timer);
    if (timed_out)
        cmg_warn("drain_timeout (%.1f s) reached with %u request(s) in flight: cutting them",
                 cn->cfg.drain_timeout_ms / 1000.0, requests_in_flight(cn));
    for (int i = 0; i < cn->ntunnels; i++)
        cut += cmg_cn_tunnel_close(&cn->tunnels[i]);
    cmg_log(cut ? CMG_LOG_WARN : CMG_LOG_INFO,
            "drain over after %.1f s: %u request(s) finished, %u cut, %u refused unstarted "
            "(gateways send those to another connector), %u reset or lost with their tunnel",
            took / 1000.0, d->finished, cut, d->refused, d->reset);
    cmg_timer_start(cn->loop, &d->close_timer, close_grace_ms(cn), on_close_grace);
    cmg_cn_drain_check(cn);
}

static void on_drain_timeout(struct cmg_timer *tm)
{
    close_tunnels(DRAIN_OF(tm, timer), true);
}

/* Runs after the events of a round, outside any session's callbacks. */
static void check(struct cmg_task *task)
{
    struct cmg_connector *cn = DRAIN_OF(task, check_task);

    if (!cn->drain.closing && tunnels_drained(cn))
        close_tunnels(cn, false);
    else if (cn->drain.closing && tunnels_closed(cn))
        cmg_loop_stop(cn->loop);
}

static void check_soon(struct cmg_connector *cn)
{
    cmg_task_post(cn->loop, &cn->drain.check_task, check);
}

void cmg_cn_drain(void *arg)
{
    struct cmg_connector *cn = arg;
    struct cmg_cn_drain *d = &cn->drain;

    d->started_ms = cmg_loop_now(cn->loop);
    cmg_info("draining: %d of %d tunnel(s) up, %u request(s) in flight; gateways are told to "
             "send no new requests; what is still in flight after drain_timeout (%.1f s) is cut",
             tunnels_up(cn), cn->ntunnels, requests_in_flight(cn),
             cn->cfg.drain_timeout_ms / 1000.0);
    for (int i = 0; i < cn->ntunnels; i++)
        cmg_cn_tunnel_drain(&cn->tunnels[i]);
    cmg_timer_start(cn->loop, &d->timer, cn->cfg.drain_timeout_ms, on_drain_timeout);
    check_soon(cn);
}

bool cmg_cn_draining(const struct cmg_connector *cn)
{
    return cmg_loop_draining(cn->loop);
}

void cmg_cn_drain_stream_ended(struct cmg_connector *cn, enum cmg_cn_drain_end how)
{
    struct cmg_cn_drain *d = &cn->drain;

    if (d->closing)
        return;   /* counted as cut */
    if (how == CMG_CN_DRAIN_FINISHED)
        d->finished++;
    else if (how == CMG_CN_DRAIN_REFUSED)
        d->refused++;
    else
        d->reset++;
    check_soon(cn);
}

void cmg_cn_drain_check(struct cmg_connector *cn)
{
    check_soon(cn);
}
