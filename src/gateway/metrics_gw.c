/* The gateway's metrics: counted on the loop where requests end, shown when scraped.
 * Labels are bounded: role ids (the policy's mappings), connector names (the site's
 * connectors), reason tokens (strings of the code); never a device. */
#include "gateway/gw.h"

#include "auth/policy.h"

#include <stdlib.h>
#include <string.h>

static const char *const auth_names[CMG_GW_AUTH_METHODS] = {"certificate", "site_token",
                                                            "bulk_token", "oidc"};

void cmg_gw_metrics_exchange(struct cmg_gateway *gw, const struct cmg_exchange *ex)
{
    struct cmg_metrics_role *s =
        ex->mapping ? cmg_metrics_role(&gw->metrics.roles, ex->mapping->role) : NULL;
    uint64_t ms = cmg_loop_now(gw->loop) - ex->start_ms;

    if (!s)
        return;
    s->requests[cmg_metrics_status_class(ex->status)][ex->auth_method % CMG_GW_AUTH_METHODS]++;
    s->request_bytes += ex->req_bytes;
    s->response_bytes += ex->resp_bytes;
    cmg_histogram_observe(&s->duration, ms * 1000);
}

void cmg_gw_metrics_refusal(struct cmg_gateway *gw, const char *reason)
{
    struct cmg_gw_metrics *m = &gw->metrics;
    size_t i;

    if (!reason)
        return;
    for (i = 0; i < m->nrefusals; i++)
        if (m->refusals[i].reason == reason || !strcmp(m->refusals[i].reason, reason))
            break;
    if (i == m->nrefusals) {
        if (i == CMG_GW_MAX_REASONS) {
            m->refusals_other++;
            return;
        }
        m->refusals[m->nrefusals++].reason = reason;
    }
    m->refusals[i].n++;
}

/* ---- the exposition ---- */

static void show_devices(struct cmg_gateway *gw, struct cmg_buf *b)
{
    static const char *const protocols[] = {"http1", "h2", "tls_handshake"};
    uint64_t open[3] = {0, 0, 0};

    for (struct cmg_device *d = gw->devices; d; d = d->next)
        open[d->h2 ? 1 : d->h1 ? 0 : 2]++;
    cmg_metrics_family(b, "cmg_gateway_device_connections_total", "counter",
                       "Device connections that set up TLS, by protocol (ALPN).");
    for (int i = 0; i < 2; i++) {
        const char *l[] = {"protocol", protocols[i], NULL};
        cmg_metrics_u64(b, "cmg_gateway_device_connections_total", l,
                        gw->metrics.device_connections[i]);
    }
    cmg_metrics_family(b, "cmg_gateway_device_connections", "gauge",
                       "Device connections open now, by protocol (tls_handshake: not yet set up).");
    for (int i = 0; i < 3; i++) {
        const char *l[] = {"protocol", protocols[i], NULL};
        cmg_metrics_u64(b, "cmg_gateway_device_connections", l, open[i]);
    }
}

static void show_roles(struct cmg_gateway *gw, struct cmg_buf *b)
{
    struct cmg_gw_metrics *m = &gw->metrics;

    cmg_metrics_family(b, "cmg_gateway_requests_total", "counter",
                       "Requests relayed to a connector, by role, status class of the answer and "
                       "authentication method of the device.");
    for (size_t i = 0; i < m->roles.cap; i++)
        for (unsigned c = 0; m->roles.t[i].role[0] && c < CMG_METRICS_CLASSES; c++)
            for (unsigned a = 0; a < CMG_GW_AUTH_METHODS; a++) {
                const struct cmg_metrics_role *r = &m->roles.t[i];
                const char *l[] = {"role", r->role, "code", cmg_metrics_class_names[c], "auth",
                                   auth_names[a], NULL};
                if (r->requests[c][a])
                    cmg_metrics_u64(b, "cmg_gateway_requests_total", l, r->requests[c][a]);
            }
    cmg_metrics_role_families(b, "cmg_gateway", &m->roles,
                              "Request body bytes taken from devices, by role (ingress).",
                              "Response body bytes sent to devices, by role (egress).",
                              "Time from a relayed request's head to the end of its answer, by "
                              "role.");
}

static void show_refusals(struct cmg_gateway *gw, struct cmg_buf *b)
{
    struct cmg_gw_metrics *m = &gw->metrics;

    cmg_metrics_family(b, "cmg_gateway_refusals_total", "counter",
                       "Requests the gateway answered itself, not relayed, by reason token.");
    for (size_t i = 0; i < m->nrefusals; i++) {
        const char *l[] = {"reason", m->refusals[i].reason, NULL};
        cmg_metrics_u64(b, "cmg_gateway_refusals_total", l, m->refusals[i].n);
    }
    if (m->refusals_other) {
        const char *l[] = {"reason", "other", NULL};
        cmg_metrics_u64(b, "cmg_gateway_refusals_total", l, m->refusals_other);
    }
}

static const char *tunnel_state(const struct cmg_tunnel *t)
{
    return t->dead ? "closing" : t->handshaking ? "handshake" : t->draining ? "draining"
           : t->ready ? "ready" : "opening";
}

static const char *tunnel_name(const struct cmg_tunnel *t)
{
    return t->ready || t->draining ? t->name : "-";   /* unknown before its hello */
}

/* Whether an earlier tunnel has t's connector (and state, if same_state): shown with it. */
static bool seen_before(const struct cmg_gateway *gw, const struct cmg_tunnel *t, bool same_state)
{
    for (const struct cmg_tunnel *u = gw->tunnels; u != t; u = u->next)
        if (!strcmp(tunnel_name(u), tunnel_name(t)) &&
            (!same_state || !strcmp(tunnel_state(u), tunnel_state(t))))
            return true;
    return false;
}

static void show_tunnels(struct cmg_gateway *gw, struct cmg_buf *b)
{
    cmg_metrics_family(b, "cmg_gateway_tunnels", "gauge",
                       "Tunnels from connectors, by connector and state (connector \"-\": before "
                       "its hello).");
    for (const struct cmg_tunnel *t = gw->tunnels; t; t = t->next) {
        const char *l[] = {"connector", tunnel_name(t), "state", tunnel_state(t), NULL};
        uint64_t n = 0;
        if (seen_before(gw, t, true))
            continue;
        for (const struct cmg_tunnel *u = t; u; u = u->next)
            n += !strcmp(tunnel_name(u), tunnel_name(t)) && !strcmp(tunnel_state(u), l[3]);
        cmg_metrics_u64(b, "cmg_gateway_tunnels", l, n);
    }
    cmg_metrics_family(b, "cmg_gateway_tunnel_rtt_seconds", "gauge",
                       "Round trip of the last health ping answered, by connector (the longest "
                       "of its tunnels; absent until one is answered).");
    for (const struct cmg_tunnel *t = gw->tunnels; t; t = t->next) {
        const char *l[] = {"connector", tunnel_name(t), NULL};
        uint64_t us = 0;
        if (!t->ready || seen_before(gw, t, false))
            continue;
        for (const struct cmg_tunnel *u = t; u; u = u->next)
            if (u->ready && !strcmp(u->name, t->name) && u->rtt_us > us)
                us = u->rtt_us;
        if (us)   /* none answered a ping yet */
            cmg_metrics_f64(b, "cmg_gateway_tunnel_rtt_seconds", l, (double)us / 1e6);
    }
    cmg_metrics_family(b, "cmg_gateway_tunnels_up_total", "counter",
                       "Tunnels that came up (a connector's hello); more than its connectors "
                       "means reconnects.");
    cmg_metrics_u64(b, "cmg_gateway_tunnels_up_total", NULL, gw->metrics.tunnels_up);
}

static void show_handshakes(struct cmg_gateway *gw, struct cmg_buf *b)
{
    cmg_metrics_family(b, "cmg_handshakes_total", "counter",
                       "Device TLS handshakes done, by whether they resumed a session (a "
                       "ticket); full ones count against handshake_rate.");
    for (int resumed = 0; resumed < 2; resumed++) {
        const char *l[] = {"resumed", resumed ? "true" : "false", NULL};
        cmg_metrics_u64(b, "cmg_handshakes_total", l, gw->metrics.handshakes[resumed]);
    }
    cmg_metrics_family(b, "cmg_handshake_rate_pauses_total", "counter",
                       "Times handshake_rate made full TLS handshakes wait their turn.");
    cmg_metrics_u64(b, "cmg_handshake_rate_pauses_total", NULL, gw->metrics.rate_pauses);
}

static void show_state(struct cmg_gateway *gw, struct cmg_buf *b)
{
    static const char *const states[] = {"starting", "serving", "draining"};

    cmg_metrics_family(b, "cmg_gateway_state", "gauge",
                       "1 for the instance's state: starting, serving or draining.");
    for (int i = 0; i < 3; i++) {
        const char *l[] = {"state", states[i], NULL};
        cmg_metrics_u64(b, "cmg_gateway_state", l, (int)gw->state == i);
    }
    cmg_metrics_family(b, "cmg_gateway_requests_in_flight", "gauge",
                       "Requests being relayed now.");
    cmg_metrics_u64(b, "cmg_gateway_requests_in_flight", NULL, gw->nexchanges);
    cmg_metrics_family(b, "cmg_gateway_buffer_bytes", "gauge",
                       "Bytes the buffer budget holds now (bodies in transit).");
    cmg_metrics_u64(b, "cmg_gateway_buffer_bytes", NULL, gw->buffered);
    cmg_metrics_family(b, "cmg_gateway_buffer_retry_bytes", "gauge",
                       "Of those, request bodies kept for a retry on another tunnel.");
    cmg_metrics_u64(b, "cmg_gateway_buffer_retry_bytes", NULL, gw->kept);
    cmg_metrics_family(b, "cmg_gateway_buffer_limit_bytes", "gauge",
                       "The buffer budget (max_buffer_memory).");
    cmg_metrics_u64(b, "cmg_gateway_buffer_limit_bytes", NULL, gw->cfg.max_buffer_memory);
    cmg_metrics_family(b, "cmg_gateway_buffer_spent", "gauge",
                       "1 while the budget is spent (window credit is held back).");
    cmg_metrics_u64(b, "cmg_gateway_buffer_spent", NULL, gw->budget_spent);
}

static void render(void *user, struct cmg_buf *b)
{
    struct cmg_gateway *gw = user;

    cmg_metrics_build_info(b, "gateway");
    show_state(gw, b);
    show_devices(gw, b);
    show_handshakes(gw, b);
    show_roles(gw, b);
    show_refusals(gw, b);
    show_tunnels(gw, b);
    cmg_notify_metrics(gw, b);
    cmg_metrics_policy(b, gw->policy->version, gw->policy->issued_at);
    cmg_metrics_certificates(b, &gw->cert_watch);
}

static unsigned ready_tunnels(const struct cmg_gateway *gw)
{
    unsigned n = 0;

    for (const struct cmg_tunnel *t = gw->tunnels; t; t = t->next)
        n += t->ready && !t->dead;
    return n;
}

/* Serving (a policy in force, the device port joined, not draining) with a tunnel up. */
static bool ready(void *user, const char **why)
{
    struct cmg_gateway *gw = user;

    if (!cmg_gw_ready(gw, why))
        return false;
    if (!gw->policy) {
        *why = "no policy in force";
        return false;
    }
    if (ready_tunnels(gw) == 0) {
        *why = "no tunnel up: devices get 503 CMGService_No_Connector";
        return false;
    }
    return true;
}

int cmg_gw_metrics_start(struct cmg_gateway *gw)
{
    struct cmg_metrics_hooks hooks = {render, ready, gw};
    char err[600];

    if (cmg_metrics_start(gw->loop, &gw->cfg.metrics, gw->cfg.instance, &hooks,
                          &gw->metrics.server, err, sizeof(err)) < 0) {
        cmg_error("%s", err);
        return -1;
    }
    return 0;
}

void cmg_gw_metrics_free(struct cmg_gateway *gw)
{
    cmg_metrics_free(gw->metrics.server);
    gw->metrics.server = NULL;
    cmg_metrics_roles_free(&gw->metrics.roles);
}
