/* Which internal service serves a role: the routes the site sends (kept current by
 * the site feed), else the [mapping] sections of connector.conf. A route that
 * changes is replaced by a new entry and the old one retired, never freed while
 * the connector runs: streams and pooled connections may still point at it. */
#include "connector/cn.h"
#include "core/log.h"
#include "tls/tls.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

struct cmg_cn_mapping *cmg_cn_mapping_find(struct cmg_connector *cn, const char *role,
                                           size_t len)
{
    for (struct cmg_cn_mapping *m = cn->routes; m; m = m->next)
        if (!m->retired && strlen(m->role) == len && !memcmp(m->role, role, len))
            return m;
    return cmg_cn_config_mapping(&cn->cfg, role, len);
}

cJSON *cmg_cn_roles_json(struct cmg_connector *cn)
{
    cJSON *roles = cJSON_CreateArray();

    for (struct cmg_cn_mapping *m = cn->routes; m; m = m->next)
        if (!m->retired)
            cJSON_AddItemToArray(roles, cJSON_CreateString(m->role));
    for (size_t i = 0; i < cn->cfg.nmappings; i++) {
        const char *r = cn->cfg.mappings[i].role;
        bool dup = false;
        for (struct cmg_cn_mapping *m = cn->routes; m && !dup; m = m->next)
            dup = !m->retired && !strcmp(m->role, r);
        if (!dup)
            cJSON_AddItemToArray(roles, cJSON_CreateString(r));
    }
    return roles;
}

SSL_CTX *cmg_cn_route_ctx(struct cmg_cn_config *c, const struct cmg_cn_mapping *m, char *err,
                          size_t errlen)
{
    struct cmg_cn_mapping *conf = cmg_cn_config_mapping(c, m->role, strlen(m->role));
    struct cmg_tls_client_opts up = {0};

    /* TLS settings of the same role in connector.conf apply; else system roots. */
    if (m->site_service) {
        /* The site's own service takes connectors only: this connector's certificate,
         * and the site's certificate (not any of its CA). */
        up.ca = c->site_ca;
        up.cert = c->cert;
        up.key = c->key;
        up.server_eku = CMG_OID_EKU_SITE;
    } else if (conf) {
        up.ca = conf->ca[0] ? conf->ca : NULL;
        up.cert = conf->client_cert[0] ? conf->client_cert : NULL;
        up.key = conf->client_key[0] ? conf->client_key : NULL;
    }
    return cmg_tls_client_ctx(&up, err, errlen);
}

static struct cmg_cn_mapping *new_route(struct cmg_connector *cn, const char *role,
                                        const char *url, bool site)
{
    struct cmg_cn_mapping *m = calloc(1, sizeof(*m));
    char err[512];

    if (!m)
        return NULL;
    snprintf(m->role, sizeof(m->role), "%s", role);
    m->site_service = site;
    if (cmg_cn_mapping_set_url(m, url, err, sizeof(err)) < 0) {
        cmg_warn("site route %s -> %s ignored: %s", role, url, err);
        free(m);
        return NULL;
    }
    if (m->tls && !(m->ctx = cmg_cn_route_ctx(&cn->cfg, m, err, sizeof(err)))) {
        cmg_warn("site route %s -> %s ignored: %s", role, url, err);
        free(m);
        return NULL;
    }
    return m;
}

/* Applies the site's routes {"role": {"url": ..., "type": ...}}; true if anything
 * changed. */
bool cmg_cn_routes_apply(struct cmg_connector *cn, const cJSON *routes)
{
    const cJSON *r;
    bool changed = false;

    for (struct cmg_cn_mapping *m = cn->routes; m; m = m->next) {
        const cJSON *now = cJSON_GetObjectItemCaseSensitive(routes, m->role);
        const char *url = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(now, "url"));
        if (!m->retired && (!url || strcmp(url, m->internal_url))) {
            m->retired = true;
            changed = true;
        }
    }
    cJSON_ArrayForEach(r, routes) {
        const char *url = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, "url"));
        struct cmg_cn_mapping *m = NULL;
        if (!url || !r->string || strlen(r->string) > CMG_ROLE_ID_MAX)
            continue;
        for (m = cn->routes; m; m = m->next)
            if (!m->retired && !strcmp(m->role, r->string))
                break;
        const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, "type"));
        if (m || !(m = new_route(cn, r->string, url, type && !strcmp(type, "site"))))
            continue;
        m->next = cn->routes;
        cn->routes = m;
        changed = true;
        cmg_info("route role=%s -> %s (from the site)", m->role, m->internal_url);
    }
    return changed;
}

void cmg_cn_routes_free(struct cmg_connector *cn)
{
    while (cn->routes) {
        struct cmg_cn_mapping *m = cn->routes;
        cn->routes = m->next;
        cmg_cn_lookup_cancel(m);
        SSL_CTX_free(m->ctx);
        free(m);
    }
}
