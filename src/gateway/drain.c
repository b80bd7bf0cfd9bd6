/* Readiness and drain: when an instance joins the shared device port, and how it
 * leaves it.
 *
 * Joining. The device port's sockets are bound at start and listen only once the
 * instance can serve: a policy in force and a ready tunnel, or after ready_timeout
 * (0: at once). Until then the kernel gives the port's connections to the instances
 * that listen, so a restarted instance never answers 503 for want of a tunnel while
 * another one serves.
 *
 * Leaving (SIGTERM, SIGINT). The device listeners accept what is queued, then close;
 * with net.ipv4.tcp_migrate_req = 1 the kernel moves what arrives meanwhile to another
 * listener of the port instead of resetting it. HTTP/2 devices get GOAWAY, HTTP/1.1
 * devices Connection: close; requests in flight have drain_timeout to finish, then what
 * is left is cut. Tunnels stay up until the end; the loop stops when no device
 * connection is left. */
#include "core/log.h"
#include "gateway/gw.h"
#include "gateway/notify.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define MIGRATE_SYSCTL "/proc/sys/net/ipv4/tcp_migrate_req"
#define MIGRATE_COST "connections queued at this instance when it drains may be reset"

#define GW_OF(p, field) ((struct cmg_gateway *)((char *)(p) - offsetof(struct cmg_gateway, field)))

/* ---- net.ipv4.tcp_migrate_req ---- */

/* Its value, or -1 (errno set) if it cannot be read. */
static int read_migrate_req(void)
{
    char v[8] = "";
    int fd = open(MIGRATE_SYSCTL, O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return -1;
    n = read(fd, v, sizeof(v) - 1);
    close(fd);
    return n > 0 ? v[0] - '0' : -1;
}

static int write_migrate_req(void)
{
    int fd = open(MIGRATE_SYSCTL, O_WRONLY | O_CLOEXEC), rc = -1, saved;

    if (fd < 0)
        return -1;
    if (write(fd, "1\n", 2) == 2)
        rc = 0;
    saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

void cmg_gw_migrate_setup(struct cmg_gateway *gw)
{
    int v = read_migrate_req();

    (void)gw;
    if (v < 0 && errno == ENOENT)
        cmg_warn("this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14 or later): %s",
                 MIGRATE_COST);
    else if (v == 1)
        cmg_info("net.ipv4.tcp_migrate_req is 1: connections queued at this instance when it "
                 "drains move to the other instances on the device port");
    else if (write_migrate_req() == 0)
        cmg_info("set net.ipv4.tcp_migrate_req = 1 (it was %d): connections queued at this "
                 "instance when it drains move to the other instances on the device port", v);
    else
        cmg_warn("cannot set net.ipv4.tcp_migrate_req = 1 (%m; it needs root, or the sysctl.d "
                 "file 60-opencmg.conf): %s (the devices retry them)", MIGRATE_COST);
}

/* ---- joining the device port ---- */

static unsigned ready_tunnels(const struct cmg_gateway *gw)
{
    unsigned n = 0;
    for (const struct cmg_tunnel *t = gw->tunnels; t; t = t->next)
        n += t->ready && !t->dead;
    return n;
}

/* Listens on the device port, then says why now (what a probe of the log may wait for). */
static void join(struct cmg_gateway *gw, enum cmg_log_level level, const char *why)
{
    cmg_timer_stop(gw->loop, &gw->ready_timer);
    cmg_task_cancel(gw->loop, &gw->join_task);
    gw->state = CMG_GW_SERVING;
    if (cmg_gw_listen_devices(gw) < 0) {
        cmg_error("the device port cannot be joined: stopping");
        gw->failed = true;
        cmg_loop_stop(gw->loop);
        return;
    }
    cmg_log(level, "joining the device port%s", why);
}

/* A signed policy (from a connector or the cache), or local mappings of gateway.conf: a
 * gateway with neither (a new pod, an emptied cache) would answer every device 404. */
static bool policy_in_force(const struct cmg_gateway *gw)
{
    return gw->policy && (gw->policy->issued_at > 0 || gw->policy->nmappings > 0);
}

static void on_join_task(struct cmg_task *task)
{
    struct cmg_gateway *gw = GW_OF(task, join_task);
    unsigned n = ready_tunnels(gw);
    char why[120];

    if (gw->state != CMG_GW_STARTING || !policy_in_force(gw) || n == 0)
        return;
    snprintf(why, sizeof(why), ": policy version %lld, %u tunnel%s",
             (long long)gw->policy->version, n, n == 1 ? "" : "s");
    join(gw, CMG_LOG_INFO, why);
}

static void on_ready_timeout(struct cmg_timer *t)
{
    struct cmg_gateway *gw = GW_OF(t, ready_timer);
    char why[240];

    if (gw->state != CMG_GW_STARTING)
        return;
    if (policy_in_force(gw))
        snprintf(why, sizeof(why), " without a tunnel after ready_timeout %g s: devices get "
                 "503 CMGService_No_Connector until one is up", gw->cfg.ready_timeout_ms / 1000.0);
    else
        snprintf(why, sizeof(why), " after ready_timeout %g s with no policy yet (no signed "
                 "one, no mappings in gateway.conf; %u tunnel(s) up): devices get 404 until a "
                 "connector brings one",
                 gw->cfg.ready_timeout_ms / 1000.0, ready_tunnels(gw));
    join(gw, CMG_LOG_WARN, why);
}

int cmg_gw_ready_start(struct cmg_gateway *gw)
{
    gw->state = CMG_GW_STARTING;
    if (gw->cfg.ready_timeout_ms == 0) {
        join(gw, CMG_LOG_INFO, " at once (ready_timeout 0): devices get 503 "
             "CMGService_No_Connector until a tunnel is up");
        return gw->failed ? -1 : 0;
    }
    cmg_info("the device port opens once a connector is up (or after ready_timeout %g s)",
             gw->cfg.ready_timeout_ms / 1000.0);
    cmg_timer_start(gw->loop, &gw->ready_timer, gw->cfg.ready_timeout_ms, on_ready_timeout);
    return 0;
}

void cmg_gw_ready_news(struct cmg_gateway *gw)
{
    /* A task: a tunnel's hello and its policy often come in one read. */
    if (gw->state == CMG_GW_STARTING)
        cmg_task_post(gw->loop, &gw->join_task, on_join_task);
}

bool cmg_gw_ready(const struct cmg_gateway *gw, const char **why)
{
    switch (gw->state) {
    case CMG_GW_SERVING:
        *why = NULL;
        return true;
    case CMG_GW_STARTING:
        *why = "starting: waiting for a policy and a tunnel (ready_timeout)";
        return false;
    default:
        *why = "draining";
        return false;
    }
}

/* ---- the drain ---- */

static double drain_seconds(const struct cmg_gateway *gw)
{
    return (double)(cmg_loop_now(gw->loop) - gw->drain_start_ms) / 1000.0;
}

static void drain_over(struct cmg_gateway *gw, uint64_t finished, uint32_t cut)
{
    uint64_t spent = cmg_loop_now(gw->loop) - gw->drain_start_ms;
    uint64_t left = gw->cfg.drain_timeout_ms > spent ? gw->cfg.drain_timeout_ms - spent : 0;

    cmg_timer_stop(gw->loop, &gw->drain_timer);
    cmg_task_cancel(gw->loop, &gw->drain_task);
    cmg_info("drain over in %.1f s: %llu request(s) finished, %u cut", drain_seconds(gw),
             (unsigned long long)finished, cut);
    /* the last report (what finished during the drain), within a second of what is left */
    cmg_gw_report_last(gw, left < 1000 ? left : 1000);
}

static void on_drain_task(struct cmg_task *task)
{
    struct cmg_gateway *gw = GW_OF(task, drain_task);

    if (gw->state == CMG_GW_DRAINING && gw->ndevices == 0 && !cmg_loop_stopping(gw->loop))
        drain_over(gw, gw->drain_finished, 0);
}

static void on_drain_timeout(struct cmg_timer *t)
{
    struct cmg_gateway *gw = GW_OF(t, drain_timer);
    uint32_t cut = gw->nexchanges, conns = gw->ndevices;
    uint64_t finished = gw->drain_finished;   /* what closing the rest ends is cut, not finished */

    cmg_warn("drain_timeout (%g s) reached: %u request(s) still in flight are cut, %u device "
             "connection(s) closed", gw->cfg.drain_timeout_ms / 1000.0, cut, conns);
    cmg_device_close_all(gw);
    drain_over(gw, finished, cut);
}

void cmg_gw_drain_news(struct cmg_gateway *gw)
{
    if (gw->state == CMG_GW_DRAINING && gw->ndevices == 0)
        cmg_task_post(gw->loop, &gw->drain_task, on_drain_task);
}

void cmg_gw_drain(void *gateway)
{
    struct cmg_gateway *gw = gateway;
    struct cmg_device *d, *next;
    unsigned queued;

    cmg_timer_stop(gw->loop, &gw->ready_timer);
    cmg_task_cancel(gw->loop, &gw->join_task);
    gw->drain_start_ms = cmg_loop_now(gw->loop);
    gw->state = CMG_GW_DRAINING;
    cmg_gw_report_drain(gw);
    queued = cmg_gw_listen_leave_devices(gw);
    cmg_info("draining: the device port is left to the other instances (%u queued connection(s) "
             "taken); %u device connection(s) and %u request(s) in flight have drain_timeout "
             "(%g s) to finish", queued, gw->ndevices, gw->nexchanges,
             gw->cfg.drain_timeout_ms / 1000.0);
    cmg_notify_drain(gw);   /* channels never hold a drain */
    for (d = gw->devices; d; d = next) {
        next = d->next;
        cmg_device_drain(d);
    }
    cmg_timer_start(gw->loop, &gw->drain_timer, gw->cfg.drain_timeout_ms, on_drain_timeout);
    cmg_task_post(gw->loop, &gw->drain_task, on_drain_task);
}
