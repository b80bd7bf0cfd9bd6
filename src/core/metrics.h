/* Metrics and health: what every role serves on its metrics_listen address (plain
 * HTTP, loopback by default): /metrics in the Prometheus text format 0.0.4, /healthz
 * (the process runs) and /readyz (the role's own readiness). Counting is plain
 * integers on the event loop, in a struct of counters per role that a report can read
 * too; the text is made only when scraped. See docs/metrics.md. */
#ifndef CMG_METRICS_H
#define CMG_METRICS_H

#include "core/buf.h"
#include "core/loop.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CMG_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"
/* Reports to the site (issue 13, docs/metrics.md): a gateway's counters and tunnels,
 * sent up every tunnel as POST CMG_REPORT_PATH every report_interval; connectors pass
 * them on to the site with their own view of the tunnels. */
#define CMG_REPORT_PATH "/.cmg/report"
#define CMG_REPORT_INTERVAL_DEFAULT 300
#define CMG_REPORT_MAX_INTERVAL 86400
#define CMG_REPORT_MAX_BODY (1024 * 1024)
#define CMG_REPORT_MAX_STR 256       /* every string in a report, in bytes */
/* A gateway's report leaves room in the connector's POST (1 MiB) for the connector's own part */
#define CMG_REPORT_MAX_GATEWAY_BODY (CMG_REPORT_MAX_BODY - 64 * 1024)
#define CMG_REPORT_MAX_TUNNELS 64    /* in one connector's or one gateway's report */

/* metrics_listen defaults: a gateway adds its instance number (like tunnel_port) */
#define CMG_METRICS_GATEWAY_DEFAULT "127.0.0.1:10160"
#define CMG_METRICS_CONNECTOR_DEFAULT "127.0.0.1:10180"
#define CMG_METRICS_SITE_DEFAULT "127.0.0.1:10181"

/* A metrics_listen setting: "" when off. explicit: the file set it (a default that is
 * taken only warns; an address asked for must be had). */
struct cmg_metrics_conf {
    char listen[300];
    bool explicit_;
};
void cmg_metrics_conf_default(struct cmg_metrics_conf *c, const char *addr);
/* The value of metrics_listen: "off", or HOST:PORT. -1 if neither. */
int cmg_metrics_conf_set(struct cmg_metrics_conf *c, const char *value);

/* HTTP status classes, as the label code="1xx".."5xx" ("other": none sent). */
enum { CMG_METRICS_CLASSES = 6 };
unsigned cmg_metrics_status_class(int status);
extern const char *const cmg_metrics_class_names[CMG_METRICS_CLASSES];

/* A duration histogram, in seconds for the exposition. */
#define CMG_HISTOGRAM_BUCKETS 12
struct cmg_histogram {
    uint64_t bucket[CMG_HISTOGRAM_BUCKETS];   /* not cumulative: counted once, summed when shown */
    uint64_t count;
    uint64_t sum_us;
};
void cmg_histogram_observe(struct cmg_histogram *h, uint64_t us);

/* What a role (a published mapping) carried: requests by status class (and by the
 * device's authentication method where the role knows it, else [class][0]). */
#define CMG_METRICS_AUTHS 4
struct cmg_metrics_role {
    char role[65];                   /* "": a free slot */
    uint64_t requests[CMG_METRICS_CLASSES][CMG_METRICS_AUTHS];
    uint64_t request_bytes, response_bytes;   /* bodies, from and to devices */
    struct cmg_histogram duration;
};
/* Open addressing by role id; grows by doubling (at a new role's first request only).
 * Past CMG_METRICS_MAX_ROLES roles, new ones count as role "other". */
#define CMG_METRICS_MAX_ROLES 4096
struct cmg_metrics_roles {
    struct cmg_metrics_role *t;
    size_t cap, n;
};
/* role's counters; NULL only when out of memory (then nothing is counted). */
struct cmg_metrics_role *cmg_metrics_role(struct cmg_metrics_roles *r, const char *role);
void cmg_metrics_roles_free(struct cmg_metrics_roles *r);

/* ---- the text exposition ----
 * labels: NULL, or name, value, name, value, ..., NULL (values are escaped here). */
void cmg_metrics_family(struct cmg_buf *b, const char *name, const char *type, const char *help);
void cmg_metrics_u64(struct cmg_buf *b, const char *name, const char *const *labels, uint64_t v);
void cmg_metrics_f64(struct cmg_buf *b, const char *name, const char *const *labels, double v);
void cmg_metrics_histogram(struct cmg_buf *b, const char *name, const char *const *labels,
                           const struct cmg_histogram *h);
/* PREFIX_request_bytes_total, PREFIX_response_bytes_total and
 * PREFIX_request_duration_seconds by role, with their help texts. */
void cmg_metrics_role_families(struct cmg_buf *b, const char *prefix,
                               const struct cmg_metrics_roles *r, const char *help_in,
                               const char *help_out, const char *help_duration);
/* Families every role shows: cmg_build_info. */
void cmg_metrics_build_info(struct cmg_buf *b, const char *role);
struct cmg_tls_watch;
/* cmg_certificate_not_after_seconds of each watched certificate. */
void cmg_metrics_certificates(struct cmg_buf *b, const struct cmg_tls_watch *w);
/* cmg_policy_version and cmg_policy_age_seconds (issued_at 0: local, no age shown). */
void cmg_metrics_policy(struct cmg_buf *b, int64_t version, int64_t issued_at);

/* Microseconds on a monotonic clock (durations, round trips). */
uint64_t cmg_metrics_now_us(void);

/* ---- the listener ---- */

struct cmg_metrics_hooks {
    void (*render)(void *user, struct cmg_buf *out);
    /* true if ready; else *why says what the role waits for */
    bool (*ready)(void *user, const char **why);
    void *user;
};

struct cmg_metrics_server;
/* Serves conf->listen (port + port_offset) with hooks; *out NULL when off. A default
 * address that cannot be had is a warning; an explicit one an error (-1, err). */
int cmg_metrics_start(struct cmg_loop *loop, const struct cmg_metrics_conf *conf,
                      unsigned port_offset, const struct cmg_metrics_hooks *hooks,
                      struct cmg_metrics_server **out, char *err, size_t errlen);
void cmg_metrics_free(struct cmg_metrics_server *m);

#endif
