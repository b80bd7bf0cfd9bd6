/* gateway.conf: see docs/configuration.md. */
#ifndef CMG_GW_CONFIG_H
#define CMG_GW_CONFIG_H

#include "auth/policy.h"
#include "core/metrics.h"
#include "http/path.h"

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#define CMG_GW_MAX_LISTEN 8
/* The smallest max_buffer_memory: a few streams' windows. */
#define CMG_GW_MIN_BUFFER_MEMORY (16ull << 20)
#define CMG_GW_MAX_TICKET_ROTATE_S (30ull * 86400)
#define CMG_GW_MAX_HANDSHAKE_RATE 10000000u

struct cmg_gw_config {
    char file[PATH_MAX];
    char service_name[256];
    char listen[CMG_GW_MAX_LISTEN][300];
    int nlisten;
    char tunnel_listen[256];
    uint32_t tunnel_port;
    uint32_t instance;
    char cert[PATH_MAX], key[PATH_MAX], cert_password[256];
    char client_ca[PATH_MAX], connector_ca[PATH_MAX];
    char site_key[PATH_MAX], policy_cache[PATH_MAX];
    char user[64];   /* started as root: the user to go on as once listening */
    uint32_t ping_interval_ms, ping_timeout_ms;
    uint32_t stall_timeout_ms;   /* requests outstanding, nothing heard: PING; 0: off */
    uint32_t handshake_timeout_ms, header_timeout_ms, idle_timeout_ms;
    uint32_t max_policy_age_ms;   /* warn when the policy in force is older */
    /* SIGTERM: how long requests in flight may take to finish before they are cut */
    uint32_t drain_timeout_ms;
    /* at start: how long the device port waits for a tunnel (0: joined at once) */
    uint32_t ready_timeout_ms;
    uint32_t max_header_size, max_connections;
    /* per source address (IPv4, or IPv6 /64); tunnel handshakes not yet authenticated */
    uint32_t max_connections_per_source, max_tunnel_handshakes, max_tunnel_handshakes_per_source;
    /* buffering: the process-wide budget, and how long a device may take nothing */
    uint64_t max_buffer_memory;
    uint32_t send_timeout_ms;
    int log_level;
    int log_format;                 /* enum cmg_log_format */
    /* reports to the site (report_gw.c): how often, and the name they give this
     * instance ("": the host name + "/" + instance) */
    uint32_t report_interval_s;
    char instance_name[CMG_REPORT_MAX_STR + 1];
    struct cmg_metrics_conf metrics;   /* metrics_listen; its port + instance */
    /* TLS session tickets (tls/ticket.h): the key file the instances share, unless off
     * (each process its own key); how often a new key is added (0: never, here) */
    char ticket_key_file[PATH_MAX];
    bool ticket_keys_off;
    uint64_t ticket_key_rotate_s;
    /* full (not resumed) device TLS handshakes a second, then accepting pauses; 0: no limit */
    uint32_t handshake_rate;
    /* client notifications: heartbeat period, window (seqs), bytes a channel may have
     * queued, and the middle of the retry: hint */
    uint32_t notify_heartbeat_ms, notify_retry_ms, notify_window;
    uint64_t notify_buffer;
    struct cmg_policy_mapping *mappings;
    size_t nmappings;
};

/* Reads the file; on failure returns -1 with a message naming the line in err. */
int cmg_gw_config_load(struct cmg_gw_config *c, const char *file, char *err, size_t errlen);
void cmg_gw_config_free(struct cmg_gw_config *c);
struct cmg_policy_mapping *cmg_gw_config_mapping(struct cmg_gw_config *c, const char *role,
                                             size_t role_len);

#endif
