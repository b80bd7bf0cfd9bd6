#include "gateway/config.h"
#include "core/config.h"
#include "core/log.h"

#include <ini.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct load {
    struct cmg_gw_config *c;
    char dir[PATH_MAX];
    char err[512];
};

static int mapping_key(struct load *l, const char *role, const char *key, const char *value)
{
    struct cmg_gw_config *c = l->c;
    struct cmg_policy_mapping *m = cmg_gw_config_mapping(c, role, strlen(role));
    struct cmg_path p;
    char probe[CMG_ROLE_ID_MAX + 32];

    if (!m) {
        snprintf(probe, sizeof(probe), "/CCM_Proxy_MutualAuth/%s", role);
        cmg_path_parse(probe, strlen(probe), &p);
        if (p.kind == CMG_PATH_OTHER || p.rest_len != 0) {
            snprintf(l->err, sizeof(l->err), "bad role id '%s' (letters, digits, - and _)", role);
            return 0;
        }
        m = realloc(c->mappings, (c->nmappings + 1) * sizeof(*m));
        if (!m)
            return 0;
        c->mappings = m;
        m = &c->mappings[c->nmappings++];
        memset(m, 0, sizeof(*m));
        snprintf(m->role, sizeof(m->role), "%s", role);
        snprintf(m->type, sizeof(m->type), "mp");
        m->auth = CMG_AUTH_CERT;
        m->max_body = 1024ull * 1024 * 1024;
    }
    if (!strcmp(key, "auth")) {
        if (strcmp(value, "cert") != 0) {
            snprintf(l->err, sizeof(l->err), "auth: '%s' is not supported (cert)", value);
            return 0;
        }
        m->auth = CMG_AUTH_CERT;
    } else if (!strcmp(key, "max_body")) {
        if (cmg_conf_uint(value, 0, UINT64_MAX / 2, &m->max_body) < 0) {
            snprintf(l->err, sizeof(l->err), "max_body: not a number of bytes");
            return 0;
        }
    } else {
        snprintf(l->err, sizeof(l->err), "unknown key '%s' in [mapping]", key);
        return 0;
    }
    return 1;
}

/* The keys of TLS session tickets and handshake admission: 1 taken, 0 bad value (l->err
 * says why), -1 not one of them. */
static int tls_key(struct load *l, const char *key, const char *value)
{
    struct cmg_gw_config *c = l->c;
    uint64_t n;

    if (!strcmp(key, "ticket_key_file")) {
        c->ticket_keys_off = !strcmp(value, "off");
        if (!value[0] || (!c->ticket_keys_off &&
                          cmg_conf_path(c->ticket_key_file, sizeof(c->ticket_key_file), l->dir,
                                        value) < 0)) {
            snprintf(l->err, sizeof(l->err), "ticket_key_file: expected a file name or off, "
                     "found '%s'", value);
            return 0;
        }
    } else if (!strcmp(key, "ticket_key_rotate")) {
        if (cmg_conf_duration(value, 0, CMG_GW_MAX_TICKET_ROTATE_S, &c->ticket_key_rotate_s) < 0) {
            snprintf(l->err, sizeof(l->err), "ticket_key_rotate: expected a duration up to 30d "
                     "(e.g. 12h; 0: never rotated here), found '%s'", value);
            return 0;
        }
    } else if (!strcmp(key, "handshake_rate")) {
        if (cmg_conf_uint(value, 0, CMG_GW_MAX_HANDSHAKE_RATE, &n) < 0) {
            snprintf(l->err, sizeof(l->err), "handshake_rate: expected full TLS handshakes a "
                     "second, 0..%u (0: no limit), found '%s'", CMG_GW_MAX_HANDSHAKE_RATE, value);
            return 0;
        }
        c->handshake_rate = (uint32_t)n;
    } else {
        return -1;
    }
    return 1;
}

/* ticket_key_file's default: ticket.keys beside the policy cache (or gateway.conf). */
static int default_ticket_file(struct load *l)
{
    struct cmg_gw_config *c = l->c;
    char dir[PATH_MAX];

    if (c->ticket_keys_off || c->ticket_key_file[0])
        return 0;
    if (c->policy_cache[0])
        cmg_conf_dir(c->policy_cache, dir, sizeof(dir));
    else
        snprintf(dir, sizeof(dir), "%s", l->dir);
    return cmg_conf_path(c->ticket_key_file, sizeof(c->ticket_key_file), dir, "ticket.keys");
}

static int gateway_key(struct load *l, const char *key, const char *value)
{
    struct cmg_gw_config *c = l->c;
    uint64_t n;
    int rc = tls_key(l, key, value);

    if (rc >= 0)
        return rc;
    rc = 0;
#define PATHKEY(k, field)                                                          \
    if (!strcmp(key, k))                                                           \
        return cmg_conf_path(c->field, sizeof(c->field), l->dir, value) == 0       \
                   ? 1                                                             \
                   : (snprintf(l->err, sizeof(l->err), "%s: path too long", k), 0);
#define MSKEY(k, field)                                                            \
    if (!strcmp(key, k))                                                           \
        return cmg_conf_seconds(value, &c->field) == 0                             \
                   ? 1                                                             \
                   : (snprintf(l->err, sizeof(l->err), "%s: not a number of seconds", k), 0);

    PATHKEY("cert", cert)
    PATHKEY("key", key)
    PATHKEY("client_ca", client_ca)
    PATHKEY("connector_ca", connector_ca)
    PATHKEY("site_key", site_key)
    PATHKEY("policy_cache", policy_cache)
    MSKEY("ping_interval", ping_interval_ms)
    MSKEY("ping_timeout", ping_timeout_ms)
    MSKEY("stall_timeout", stall_timeout_ms)
    MSKEY("handshake_timeout", handshake_timeout_ms)
    MSKEY("header_timeout", header_timeout_ms)
    MSKEY("idle_timeout", idle_timeout_ms)
    MSKEY("max_policy_age", max_policy_age_ms)
    MSKEY("drain_timeout", drain_timeout_ms)
    MSKEY("ready_timeout", ready_timeout_ms)
#undef PATHKEY
#undef MSKEY
    if (!strcmp(key, "service_name"))
        rc = cmg_conf_str(c->service_name, sizeof(c->service_name), value);
    else if (!strcmp(key, "cert_password"))
        rc = cmg_conf_str(c->cert_password, sizeof(c->cert_password), value);
    else if (!strcmp(key, "user"))
        rc = cmg_conf_str(c->user, sizeof(c->user), value);
    else if (!strcmp(key, "instance_name"))
        rc = !value[0] || strlen(value) > CMG_REPORT_MAX_STR ? -1
             : cmg_conf_str(c->instance_name, sizeof(c->instance_name), value);
    else if (!strcmp(key, "report_interval")) {
        rc = cmg_conf_duration(value, 1, CMG_REPORT_MAX_INTERVAL, &n);
        c->report_interval_s = (uint32_t)n;
    }
    else if (!strcmp(key, "notify_heartbeat")) {
        rc = cmg_conf_duration(value, 1, 3600, &n);
        c->notify_heartbeat_ms = (uint32_t)n * 1000;
        if (rc < 0) {
            snprintf(l->err, sizeof(l->err), "notify_heartbeat: '%s' is not a duration from 1s to 1h",
                     value);
            return 0;
        }
    } else if (!strcmp(key, "notify_retry")) {
        rc = cmg_conf_duration(value, 1, 3600, &n);
        c->notify_retry_ms = (uint32_t)n * 1000;
        if (rc < 0) {
            snprintf(l->err, sizeof(l->err), "notify_retry: '%s' is not a duration from 1s to 1h",
                     value);
            return 0;
        }
    } else if (!strcmp(key, "notify_window")) {
        rc = cmg_conf_uint(value, 16, 100000, &n);
        c->notify_window = (uint32_t)n;
        if (rc < 0) {
            snprintf(l->err, sizeof(l->err), "notify_window: '%s' is not a count from 16 to 100000",
                     value);
            return 0;
        }
    } else if (!strcmp(key, "notify_buffer")) {
        if (cmg_conf_size(value, 4096, 16u << 20, &c->notify_buffer) < 0) {
            snprintf(l->err, sizeof(l->err), "notify_buffer: '%s' is not a size from 4KiB to 16MiB",
                     value);
            return 0;
        }
    }
    else if (!strcmp(key, "metrics_listen"))
        rc = cmg_metrics_conf_set(&c->metrics, value);
    else if (!strcmp(key, "tunnel_listen"))
        rc = cmg_conf_str(c->tunnel_listen, sizeof(c->tunnel_listen), value);
    else if (!strcmp(key, "listen")) {
        if (c->nlisten == CMG_GW_MAX_LISTEN) {
            snprintf(l->err, sizeof(l->err), "listen: at most %d addresses", CMG_GW_MAX_LISTEN);
            return 0;
        }
        rc = cmg_conf_str(c->listen[c->nlisten++], sizeof(c->listen[0]), value);
    } else if (!strcmp(key, "tunnel_port")) {
        rc = cmg_conf_uint(value, 1, 65535, &n);
        c->tunnel_port = (uint32_t)n;
    } else if (!strcmp(key, "instance")) {
        rc = cmg_conf_uint(value, 0, 15, &n);
        c->instance = (uint32_t)n;
    } else if (!strcmp(key, "max_header_size")) {
        rc = cmg_conf_uint(value, 1024, 1024 * 1024, &n);
        c->max_header_size = (uint32_t)n;
    } else if (!strcmp(key, "max_connections")) {
        rc = cmg_conf_uint(value, 1, 10000000, &n);
        c->max_connections = (uint32_t)n;
    } else if (!strcmp(key, "max_connections_per_source")) {
        rc = cmg_conf_uint(value, 1, 10000000, &n);
        c->max_connections_per_source = (uint32_t)n;
    } else if (!strcmp(key, "max_tunnel_handshakes")) {
        rc = cmg_conf_uint(value, 1, 100000, &n);
        c->max_tunnel_handshakes = (uint32_t)n;
    } else if (!strcmp(key, "max_tunnel_handshakes_per_source")) {
        rc = cmg_conf_uint(value, 1, 100000, &n);
        c->max_tunnel_handshakes_per_source = (uint32_t)n;
    } else if (!strcmp(key, "max_buffer_memory")) {
        if (cmg_conf_uint(value, CMG_GW_MIN_BUFFER_MEMORY, UINT64_MAX / 2, &c->max_buffer_memory) < 0) {
            snprintf(l->err, sizeof(l->err), "max_buffer_memory: '%s' is not a number of bytes "
                     "of at least %llu", value, (unsigned long long)CMG_GW_MIN_BUFFER_MEMORY);
            return 0;
        }
    } else if (!strcmp(key, "send_timeout")) {
        if (cmg_conf_seconds(value, &c->send_timeout_ms) < 0 || c->send_timeout_ms == 0) {
            snprintf(l->err, sizeof(l->err), "send_timeout: '%s' is not a number of seconds above 0",
                     value);
            return 0;
        }
    } else if (!strcmp(key, "log_level")) {
        c->log_level = cmg_log_parse_level(value);
        rc = c->log_level < 0 ? -1 : 0;
    } else if (!strcmp(key, "log_format")) {
        c->log_format = cmg_log_parse_format(value);
        rc = c->log_format < 0 ? -1 : 0;
    } else {
        snprintf(l->err, sizeof(l->err), "unknown key '%s' in [gateway]", key);
        return 0;
    }
    if (rc < 0)
        snprintf(l->err, sizeof(l->err), "%s: bad value '%s'", key, value);
    return rc == 0;
}

static int on_key(void *user, const char *section, const char *key, const char *value)
{
    struct load *l = user;
    if (!strcmp(section, "gateway"))
        return gateway_key(l, key, value);
    if (!strncmp(section, "mapping ", 8))
        return mapping_key(l, section + 8, key, value);
    snprintf(l->err, sizeof(l->err), "unknown section [%s]", section);
    return 0;
}

int cmg_gw_config_load(struct cmg_gw_config *c, const char *file, char *err, size_t errlen)
{
    struct load l;
    int line;

    memset(c, 0, sizeof(*c));
    snprintf(c->file, sizeof(c->file), "%s", file);
    c->tunnel_port = 10140;
    snprintf(c->tunnel_listen, sizeof(c->tunnel_listen), "0.0.0.0");
    c->ping_interval_ms = 60000;
    c->ping_timeout_ms = 15000;
    c->stall_timeout_ms = 5000;
    c->handshake_timeout_ms = 10000;
    c->header_timeout_ms = 30000;
    c->idle_timeout_ms = 120000;
    c->max_policy_age_ms = CMG_POLICY_MAX_AGE_MS;
    c->drain_timeout_ms = 30000;
    c->ready_timeout_ms = 30000;
    c->max_header_size = 16384;
    c->max_connections = 10000;
    c->max_connections_per_source = 2000;
    c->max_tunnel_handshakes = 128;
    c->max_tunnel_handshakes_per_source = 16;
    c->max_buffer_memory = 256ull << 20;
    c->send_timeout_ms = 60000;
    c->report_interval_s = CMG_REPORT_INTERVAL_DEFAULT;
    c->notify_heartbeat_ms = 45000;
    c->notify_retry_ms = 4000;
    c->notify_window = 1024;
    c->notify_buffer = 64 * 1024;
    c->log_level = CMG_LOG_INFO;
    c->log_format = CMG_LOG_TEXT;
    c->ticket_key_rotate_s = 12 * 3600;
    c->handshake_rate = 2000;
    cmg_metrics_conf_default(&c->metrics, CMG_METRICS_GATEWAY_DEFAULT);
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
    if (!c->service_name[0] || !c->cert[0] || !c->client_ca[0] || !c->connector_ca[0]) {
        snprintf(err, errlen, "%s: service_name, cert, client_ca and connector_ca are required",
                 file);
        return -1;
    }
    if (default_ticket_file(&l) < 0) {
        snprintf(err, errlen, "%s: ticket_key_file: the default path (ticket.keys beside "
                 "policy_cache) is too long", file);
        return -1;
    }
    if (!c->nlisten) {
        snprintf(c->listen[0], sizeof(c->listen[0]), "0.0.0.0:443");
        c->nlisten = 1;
    }
    return 0;
}

void cmg_gw_config_free(struct cmg_gw_config *c)
{
    free(c->mappings);
    c->mappings = NULL;
    c->nmappings = 0;
}

struct cmg_policy_mapping *cmg_gw_config_mapping(struct cmg_gw_config *c, const char *role,
                                             size_t role_len)
{
    for (size_t i = 0; i < c->nmappings; i++)
        if (strlen(c->mappings[i].role) == role_len &&
            memcmp(c->mappings[i].role, role, role_len) == 0)
            return &c->mappings[i];
    return NULL;
}
