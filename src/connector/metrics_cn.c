/* The connector's metrics: requests by role as they end on the tunnels, and each
 * gateway instance's tunnel. Labels: role ids and the configured gateway addresses. */
#include "connector/cn.h"

#include "core/log.h"

#include <string.h>

void cmg_cn_metrics_stream(struct cmg_connector *cn, const struct cmg_cn_stream *st)
{
    struct cmg_metrics_role *r = cmg_metrics_role(&cn->metrics.roles, st->m->role);

    if (!r)
        return;
    r->requests[cmg_metrics_status_class(st->status)][0]++;
    r->request_bytes += st->req_bytes;
    r->response_bytes += st->resp_bytes;
    cmg_histogram_observe(&r->duration, (cmg_loop_now(cn->loop) - st->start_ms) * 1000);
}

static void show_requests(struct cmg_connector *cn, struct cmg_buf *b)
{
    const struct cmg_metrics_roles *m = &cn->metrics.roles;

    cmg_metrics_family(b, "cmg_connector_requests_total", "counter",
                       "Requests the gateways sent on the tunnels, by role and status class of "
                       "the answer (other: none sent, e.g. refused while draining).");
    for (size_t i = 0; i < m->cap; i++)
        for (unsigned c = 0; m->t[i].role[0] && c < CMG_METRICS_CLASSES; c++) {
            const char *l[] = {"role", m->t[i].role, "code", cmg_metrics_class_names[c], NULL};
            if (m->t[i].requests[c][0])
                cmg_metrics_u64(b, "cmg_connector_requests_total", l, m->t[i].requests[c][0]);
        }
    cmg_metrics_role_families(b, "cmg_connector", m,
                              "Request body bytes the gateways sent, by role.",
                              "Response body bytes sent to the gateways, by role.",
                              "Time from a request's head on the tunnel to the end of its answer, "
                              "by role.");
}

static const char *tunnel_state(const struct cmg_cn_tunnel *t)
{
    return t->up ? "up" : t->active ? "connecting" : "down";
}

static void show_tunnels(struct cmg_connector *cn, struct cmg_buf *b)
{
    static const char *const states[] = {"up", "connecting", "down"};

    cmg_metrics_family(b, "cmg_connector_tunnels", "gauge",
                       "1 for the state of the tunnel to each gateway instance: up, connecting or "
                       "down (waiting to dial again).");
    for (int i = 0; i < cn->ntunnels; i++)
        for (int s = 0; s < 3; s++) {
            const char *l[] = {"gateway", cn->tunnels[i].target, "state", states[s], NULL};
            cmg_metrics_u64(b, "cmg_connector_tunnels", l,
                            !strcmp(tunnel_state(&cn->tunnels[i]), states[s]));
        }
    cmg_metrics_family(b, "cmg_connector_tunnel_rtt_seconds", "gauge",
                       "Round trip of the last health ping answered on the tunnel, by gateway (absent "
                       "until one is answered).");
    for (int i = 0; i < cn->ntunnels; i++) {
        const char *l[] = {"gateway", cn->tunnels[i].target, NULL};
        if (cn->tunnels[i].up && cn->tunnels[i].rtt_us)   /* a ping was answered */
            cmg_metrics_f64(b, "cmg_connector_tunnel_rtt_seconds", l,
                            (double)cn->tunnels[i].rtt_us / 1e6);
    }
    cmg_metrics_family(b, "cmg_connector_tunnel_reconnects_total", "counter",
                       "Times the tunnel to each gateway came up again after it fell.");
    for (int i = 0; i < cn->ntunnels; i++) {
        const char *l[] = {"gateway", cn->tunnels[i].target, NULL};
        uint64_t ups = cn->tunnels[i].ups;
        cmg_metrics_u64(b, "cmg_connector_tunnel_reconnects_total", l, ups ? ups - 1 : 0);
    }
    cmg_metrics_family(b, "cmg_connector_draining", "gauge", "1 once SIGTERM started the drain.");
    cmg_metrics_u64(b, "cmg_connector_draining", NULL, cmg_cn_draining(cn));
}

static void render(void *user, struct cmg_buf *b)
{
    struct cmg_connector *cn = user;

    cmg_metrics_build_info(b, "connector");
    show_tunnels(cn, b);
    show_requests(cn, b);
    cmg_metrics_policy(b, cn->policy_version, cn->policy_iat);
    cmg_metrics_certificates(b, &cn->cert_watch);
}

/* At least one tunnel up, not draining. */
static bool ready(void *user, const char **why)
{
    struct cmg_connector *cn = user;

    if (cmg_cn_draining(cn)) {
        *why = "draining";
        return false;
    }
    for (int i = 0; i < cn->ntunnels; i++)
        if (cn->tunnels[i].up)
            return true;
    *why = "no tunnel up to any gateway instance";
    return false;
}

int cmg_cn_metrics_start(struct cmg_connector *cn)
{
    struct cmg_metrics_hooks hooks = {render, ready, cn};
    char err[600];

    if (cmg_metrics_start(cn->loop, &cn->cfg.metrics, 0, &hooks, &cn->metrics.server, err,
                          sizeof(err)) < 0) {
        cmg_error("%s", err);
        return -1;
    }
    return 0;
}

void cmg_cn_metrics_free(struct cmg_connector *cn)
{
    cmg_metrics_free(cn->metrics.server);
    cn->metrics.server = NULL;
    cmg_metrics_roles_free(&cn->metrics.roles);
}
