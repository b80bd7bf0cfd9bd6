/* The site service's metrics: the policy it publishes, the connectors waiting on its
 * feed, its certificates. */
#include "site/serve.h"

#include "core/log.h"

static void render(void *user, struct cmg_buf *b)
{
    struct cmg_site_server *srv = user;

    cmg_metrics_build_info(b, "site");
    cmg_metrics_family(b, "cmg_site_feed_waiting", "gauge",
                       "Connectors waiting on the policy feed now (long polls).");
    cmg_metrics_u64(b, "cmg_site_feed_waiting", NULL, srv->nwaiters);
    cmg_metrics_policy(b, srv->version, (int64_t)srv->signed_at);
    cmg_metrics_certificates(b, &srv->cert_watch);
}

/* The store open and every listener serving. */
static bool ready(void *user, const char **why)
{
    struct cmg_site_server *srv = user;

    if (!srv->ctx->store || !srv->policy) {
        *why = !srv->ctx->store ? "the store is not open" : "no signed policy built yet";
        return false;
    }
    if (!srv->admin || !srv->feed || !srv->service) {
        *why = "not listening yet";
        return false;
    }
    return true;
}

int cmg_site_metrics_start(struct cmg_site_server *srv)
{
    struct cmg_metrics_hooks hooks = {render, ready, srv};
    char err[600];

    if (cmg_metrics_start(srv->loop, &srv->ctx->metrics, 0, &hooks, &srv->metrics, err,
                          sizeof(err)) < 0) {
        cmg_error("%s", err);
        return -1;
    }
    return 0;
}
