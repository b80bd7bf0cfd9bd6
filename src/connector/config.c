/* connector.conf: see docs/configuration.md. */
#include "connector/cn.h"
#include "auth/policy.h"
#include "core/config.h"
#include "core/log.h"

#include <ini.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct load {
    struct cmg_cn_config *c;
    char dir[PATH_MAX];
    char err[512];
};

/* http[s]://host[:port][/base] */
static int parse_url(struct cmg_cn_mapping *m, const char *url, char *err, size_t errlen)
{
    const char *p, *hostend, *pathstart;
    size_t hl;

    if (!strncasecmp(url, "http://", 7)) {
        m->tls = false;
        m->port = 80;
        p = url + 7;
    } else if (!strncasecmp(url, "https://", 8)) {
        m->tls = true;
        m->port = 443;
        p = url + 8;
    } else {
        snprintf(err, errlen, "internal_url must start with http:// or https://");
        return -1;
    }
    pathstart = strchr(p, '/');
    if (!pathstart)
        pathstart = p + strlen(p);
    if (*p == '[') {
        hostend = memchr(p, ']', (size_t)(pathstart - p));
        if (!hostend) {
            snprintf(err, errlen, "internal_url: missing ']'");
            return -1;
        }
        hl = (size_t)(hostend - p - 1);
        memcpy(m->host, p + 1, hl < sizeof(m->host) ? hl : 0);
        m->host[hl < sizeof(m->host) ? hl : 0] = 0;
        hostend++;
    } else {
        hostend = memchr(p, ':', (size_t)(pathstart - p));
        if (!hostend)
            hostend = pathstart;
        hl = (size_t)(hostend - p);
        if (hl >= sizeof(m->host))
            hl = 0;
        memcpy(m->host, p, hl);
        m->host[hl] = 0;
    }
    if (!m->host[0]) {
        snprintf(err, errlen, "internal_url: no host");
        return -1;
    }
    if (*hostend == ':') {
        char *end;
        long port = strtol(hostend + 1, &end, 10);
        if (end != pathstart || port <= 0 || port > 65535) {
            snprintf(err, errlen, "internal_url: bad port");
            return -1;
        }
        m->port = (int)port;
    }
    snprintf(m->authority, sizeof(m->authority), "%.*s", (int)(pathstart - p), p);
    snprintf(m->base_path, sizeof(m->base_path), "%s", pathstart);
    hl = strlen(m->base_path);
    while (hl && m->base_path[hl - 1] == '/')
        m->base_path[--hl] = 0;
    if (strpbrk(m->base_path, "?# \t")) {
        snprintf(err, errlen, "internal_url: no query or fragment allowed");
        return -1;
    }
    return 0;
}

static int mapping_key(struct load *l, const char *role, const char *key, const char *value)
{
    struct cmg_cn_config *c = l->c;
    struct cmg_cn_mapping *m = cmg_cn_config_mapping(c, role, strlen(role));

    if (!m) {
        if (strlen(role) > CMG_ROLE_ID_MAX || !role[0] ||
            strspn(role, "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_") !=
                strlen(role)) {
            snprintf(l->err, sizeof(l->err), "bad role id '%s'", role);
            return 0;
        }
        m = realloc(c->mappings, (c->nmappings + 1) * sizeof(*m));
        if (!m)
            return 0;
        c->mappings = m;
        m = &c->mappings[c->nmappings++];
        memset(m, 0, sizeof(*m));
        snprintf(m->role, sizeof(m->role), "%s", role);
    }
    if (!strcmp(key, "internal_url")) {
        if (cmg_conf_str(m->internal_url, sizeof(m->internal_url), value) < 0 ||
            parse_url(m, value, l->err, sizeof(l->err)) < 0)
            return 0;
        return 1;
    }
    if (!strcmp(key, "ca") || !strcmp(key, "client_cert") || !strcmp(key, "client_key")) {
        char *dst = !strcmp(key, "ca") ? m->ca : !strcmp(key, "client_cert") ? m->client_cert
                                                                             : m->client_key;
        if (!value[0])
            return 1;
        if (cmg_conf_path(dst, PATH_MAX, l->dir, value) < 0) {
            snprintf(l->err, sizeof(l->err), "%s: path too long", key);
            return 0;
        }
        return 1;
    }
    snprintf(l->err, sizeof(l->err), "unknown key '%s' in [mapping]", key);
    return 0;
}

static int connector_key(struct load *l, const char *key, const char *value)
{
    struct cmg_cn_config *c = l->c;
    int rc = 0;

    if (!strcmp(key, "cert") || !strcmp(key, "key") || !strcmp(key, "ca")) {
        char *dst = !strcmp(key, "cert") ? c->cert : !strcmp(key, "key") ? c->key : c->ca;
        rc = cmg_conf_path(dst, PATH_MAX, l->dir, value);
    } else if (!strcmp(key, "site")) {
        if (strncmp(value, "https://", 8)) {
            snprintf(l->err, sizeof(l->err), "site: an https:// URL of the site's feed "
                     "(feed_listen in site.conf) expected, found '%s'", value);
            return 0;
        }
        rc = cmg_conf_str(c->site, sizeof(c->site), value);
    } else if (!strcmp(key, "site_ca") || !strcmp(key, "site_key") ||
               !strcmp(key, "policy_cache")) {
        char *dst = !strcmp(key, "site_ca") ? c->site_ca
                    : !strcmp(key, "site_key") ? c->site_key : c->policy_cache;
        rc = cmg_conf_path(dst, PATH_MAX, l->dir, value);
    } else if (!strcmp(key, "max_policy_age")) {
        rc = cmg_conf_seconds(value, &c->max_policy_age_ms);
    } else if (!strcmp(key, "site_secret")) {
        snprintf(l->err, sizeof(l->err), "site_secret is no longer used: the connector shows "
                 "its certificate (cert, key) to the site; remove the line");
        return 0;
    } else if (!strcmp(key, "name")) {
        rc = cmg_conf_str(c->name, sizeof(c->name), value);
    } else if (!strcmp(key, "server_name")) {
        rc = cmg_conf_str(c->server_name, sizeof(c->server_name), value);
    } else if (!strcmp(key, "gateway")) {
        if (c->ngateways == CMG_CN_MAX_GATEWAYS) {
            snprintf(l->err, sizeof(l->err), "gateway: at most %d", CMG_CN_MAX_GATEWAYS);
            return 0;
        }
        rc = cmg_conf_str(c->gateways[c->ngateways++], sizeof(c->gateways[0]), value);
    } else if (!strcmp(key, "ping_interval")) {
        rc = cmg_conf_seconds(value, &c->ping_interval_ms);
    } else if (!strcmp(key, "ping_timeout")) {
        rc = cmg_conf_seconds(value, &c->ping_timeout_ms);
    } else if (!strcmp(key, "reconnect_max")) {
        rc = cmg_conf_seconds(value, &c->reconnect_max_ms);
    } else if (!strcmp(key, "upstream_timeout")) {
        rc = cmg_conf_seconds(value, &c->upstream_timeout_ms);
    } else if (!strcmp(key, "drain_timeout")) {
        rc = cmg_conf_seconds(value, &c->drain_timeout_ms);
    } else if (!strcmp(key, "report_interval")) {
        uint64_t s;
        rc = cmg_conf_duration(value, 1, CMG_REPORT_MAX_INTERVAL, &s);
        c->report_interval_s = (uint32_t)s;
    } else if (!strcmp(key, "metrics_listen")) {
        rc = cmg_metrics_conf_set(&c->metrics, value);
    } else if (!strcmp(key, "log_level")) {
        c->log_level = cmg_log_parse_level(value);
        rc = c->log_level < 0 ? -1 : 0;
    } else if (!strcmp(key, "log_format")) {
        c->log_format = cmg_log_parse_format(value);
        rc = c->log_format < 0 ? -1 : 0;
    } else {
        snprintf(l->err, sizeof(l->err), "unknown key '%s' in [connector]", key);
        return 0;
    }
    if (rc < 0)
        snprintf(l->err, sizeof(l->err), "%s: bad value '%s'", key, value);
    return rc == 0;
}

static int on_key(void *user, const char *section, const char *key, const char *value)
{
    struct load *l = user;
    if (!strcmp(section, "connector"))
        return connector_key(l, key, value);
    if (!strncmp(section, "mapping ", 8))
        return mapping_key(l, section + 8, key, value);
    snprintf(l->err, sizeof(l->err), "unknown section [%s]", section);
    return 0;
}

/* connector.conf -> connector-cache.json beside it: one cache per configuration. */
static int default_cache(struct cmg_cn_config *c, const char *dir)
{
    const char *base = strrchr(c->file, '/') ? strrchr(c->file, '/') + 1 : c->file;
    size_t n = strlen(base);
    char name[NAME_MAX + 1];

    if (n > 5 && !strcmp(base + n - 5, ".conf"))
        n -= 5;
    if (snprintf(name, sizeof(name), "%.*s-cache.json", (int)n, base) >= (int)sizeof(name))
        return -1;
    return cmg_conf_path(c->policy_cache, sizeof(c->policy_cache), dir, name);
}

int cmg_cn_config_read(struct cmg_cn_config *c, const char *file, char *err, size_t errlen)
{
    struct load l;
    int line;

    memset(c, 0, sizeof(*c));
    snprintf(c->file, sizeof(c->file), "%s", file);
    snprintf(c->name, sizeof(c->name), "connector");
    c->ping_interval_ms = 60000;
    c->ping_timeout_ms = 15000;
    c->reconnect_max_ms = 30000;
    c->upstream_timeout_ms = 60000;
    c->drain_timeout_ms = 30000;
    c->report_interval_s = CMG_REPORT_INTERVAL_DEFAULT;
    c->max_policy_age_ms = CMG_POLICY_MAX_AGE_MS;
    c->log_level = CMG_LOG_INFO;
    c->log_format = CMG_LOG_TEXT;
    cmg_metrics_conf_default(&c->metrics, CMG_METRICS_CONNECTOR_DEFAULT);
    memset(&l, 0, sizeof(l));
    l.c = c;
    cmg_conf_dir(file, l.dir, sizeof(l.dir));
    line = ini_parse(file, on_key, &l);
    if (line < 0) {
        snprintf(err, errlen, "%s: cannot open: %m", file);
        return -1;
    }
    if (line > 0) {
        snprintf(err, errlen, "%s:%d: %s", file, line, l.err[0] ? l.err : "syntax error");
        return -1;
    }
    if (!c->ngateways || !c->cert[0] || !c->key[0] || !c->ca[0] || !c->server_name[0]) {
        snprintf(err, errlen, "%s: gateway, server_name, cert, key and ca are required", file);
        return -1;
    }
    for (size_t i = 0; i < c->nmappings; i++) {
        struct cmg_cn_mapping *m = &c->mappings[i];
        if (!m->internal_url[0]) {
            snprintf(err, errlen, "%s: [mapping %s] has no internal_url", file, m->role);
            return -1;
        }
    }
    if (c->site[0] && !c->site_key[0]) {
        snprintf(err, errlen, "%s: site needs site_key (the site's site-signing.pub), which "
                 "verifies the policy and the routes", file);
        return -1;
    }
    if (!c->site_ca[0])
        snprintf(c->site_ca, sizeof(c->site_ca), "%s", c->ca);
    if (!c->policy_cache[0] && default_cache(c, l.dir) < 0) {
        snprintf(err, errlen, "%s: policy_cache: path too long", file);
        return -1;
    }
    return 0;
}

int cmg_cn_config_load(struct cmg_cn_config *c, const char *file, char *err, size_t errlen)
{
    if (cmg_cn_config_read(c, file, err, errlen) < 0)
        return -1;
    for (size_t i = 0; i < c->nmappings; i++)
        cmg_cn_mapping_resolve(&c->mappings[i], 0);
    return 0;
}

int cmg_cn_mapping_set_url(struct cmg_cn_mapping *m, const char *url, char *err, size_t errlen)
{
    if (cmg_conf_str(m->internal_url, sizeof(m->internal_url), url) < 0) {
        snprintf(err, errlen, "URL too long");
        return -1;
    }
    if (parse_url(m, url, err, errlen) < 0)
        return -1;
    cmg_cn_mapping_resolve(m, 0);
    return 0;
}

void cmg_cn_config_free(struct cmg_cn_config *c)
{
    for (size_t i = 0; i < c->nmappings; i++) {
        cmg_cn_lookup_cancel(&c->mappings[i]);
        SSL_CTX_free(c->mappings[i].ctx);
    }
    free(c->mappings);
    c->mappings = NULL;
    c->nmappings = 0;
}

struct cmg_cn_mapping *cmg_cn_config_mapping(struct cmg_cn_config *c, const char *role, size_t len)
{
    for (size_t i = 0; i < c->nmappings; i++)
        if (strlen(c->mappings[i].role) == len && !memcmp(c->mappings[i].role, role, len))
            return &c->mappings[i];
    return NULL;
}
