/* Metrics and health; see metrics.h. */
#include "core/metrics.h"

#include "core/log.h"
#include "core/net.h"
#include "http/httpd.h"
#include "tls/tls.h"

#include <arpa/inet.h>
#include <openssl/asn1.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define METRICS_MAX_CONNS 64   /* scrapers and probes at once */

const char *const cmg_metrics_class_names[CMG_METRICS_CLASSES] = {"1xx", "2xx", "3xx",
                                                                  "4xx", "5xx", "other"};

/* Upper bounds of the duration buckets, in microseconds. */
static const uint64_t bucket_us[CMG_HISTOGRAM_BUCKETS] = {
    5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000,
    30000000};
static const char *const bucket_le[CMG_HISTOGRAM_BUCKETS] = {
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30"};

void cmg_metrics_conf_default(struct cmg_metrics_conf *c, const char *addr)
{
    snprintf(c->listen, sizeof(c->listen), "%s", addr);
    c->explicit_ = false;
}

int cmg_metrics_conf_set(struct cmg_metrics_conf *c, const char *value)
{
    struct cmg_addr a;
    char err[200];

    c->explicit_ = true;
    if (!strcmp(value, "off")) {
        c->listen[0] = 0;
        return 0;
    }
    if (strlen(value) >= sizeof(c->listen) || cmg_addr_parse(value, 0, &a, err, sizeof(err)) < 0)
        return -1;
    snprintf(c->listen, sizeof(c->listen), "%s", value);
    return 0;
}

unsigned cmg_metrics_status_class(int status)
{
    return status >= 100 && status < 600 ? (unsigned)(status / 100 - 1) : CMG_METRICS_CLASSES - 1;
}

void cmg_histogram_observe(struct cmg_histogram *h, uint64_t us)
{
    unsigned i = 0;

    while (i < CMG_HISTOGRAM_BUCKETS && us > bucket_us[i])
        i++;
    if (i < CMG_HISTOGRAM_BUCKETS)
        h->bucket[i]++;
    h->count++;
    h->sum_us += us;
}

uint64_t cmg_metrics_now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* ---- counters per role ---- */

static size_t role_hash(const char *s)
{
    size_t h = 2166136261u;

    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

/* The slot of role in a table of cap (a power of two) slots: its own, or a free one. */
static struct cmg_metrics_role *role_slot(struct cmg_metrics_role *t, size_t cap, const char *role)
{
    size_t i = role_hash(role) & (cap - 1);

    while (t[i].role[0] && strcmp(t[i].role, role))
        i = (i + 1) & (cap - 1);
    return &t[i];
}

/* Doubles the table (kept at most half full). */
static int roles_grow(struct cmg_metrics_roles *r)
{
    size_t cap = r->cap ? r->cap * 2 : 16;
    struct cmg_metrics_role *t = calloc(cap, sizeof(*t));

    if (!t)
        return -1;
    for (size_t i = 0; i < r->cap; i++)
        if (r->t[i].role[0])
            *role_slot(t, cap, r->t[i].role) = r->t[i];
    free(r->t);
    r->t = t;
    r->cap = cap;
    return 0;
}

struct cmg_metrics_role *cmg_metrics_role(struct cmg_metrics_roles *r, const char *role)
{
    struct cmg_metrics_role *s;

    if (r->cap) {
        s = role_slot(r->t, r->cap, role);
        if (s->role[0])
            return s;
        if (r->n >= CMG_METRICS_MAX_ROLES && strcmp(role, "other"))
            return cmg_metrics_role(r, "other");
    }
    if ((r->n + 1) * 2 > r->cap && roles_grow(r) < 0)
        return NULL;
    s = role_slot(r->t, r->cap, role);
    snprintf(s->role, sizeof(s->role), "%s", role);
    r->n++;
    return s;
}

void cmg_metrics_roles_free(struct cmg_metrics_roles *r)
{
    free(r->t);
    r->t = NULL;
    r->cap = r->n = 0;
}

/* ---- the text exposition ---- */

static void escaped(struct cmg_buf *b, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            cmg_buf_printf(b, "\\%c", *v);
        else if (*v == '\n')
            cmg_buf_appends(b, "\\n");
        else
            cmg_buf_append(b, v, 1);
    }
}

/* name{labels[,extra="value"]} */
static void series(struct cmg_buf *b, const char *name, const char *const *labels,
                   const char *extra, const char *extra_value)
{
    bool any = false;

    cmg_buf_appends(b, name);
    for (size_t i = 0; labels && labels[i] && labels[i + 1]; i += 2) {
        cmg_buf_printf(b, "%s%s=\"", any ? "," : "{", labels[i]);
        escaped(b, labels[i + 1]);
        cmg_buf_appends(b, "\"");
        any = true;
    }
    if (extra) {
        cmg_buf_printf(b, "%s%s=\"%s\"", any ? "," : "{", extra, extra_value);
        any = true;
    }
    if (any)
        cmg_buf_appends(b, "}");
}

void cmg_metrics_family(struct cmg_buf *b, const char *name, const char *type, const char *help)
{
    cmg_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void cmg_metrics_u64(struct cmg_buf *b, const char *name, const char *const *labels, uint64_t v)
{
    series(b, name, labels, NULL, NULL);
    cmg_buf_printf(b, " %llu\n", (unsigned long long)v);
}

void cmg_metrics_f64(struct cmg_buf *b, const char *name, const char *const *labels, double v)
{
    series(b, name, labels, NULL, NULL);
    cmg_buf_printf(b, " %.6f\n", v);
}

void cmg_metrics_histogram(struct cmg_buf *b, const char *name, const char *const *labels,
                           const struct cmg_histogram *h)
{
    char n[128];
    uint64_t sum = 0;

    snprintf(n, sizeof(n), "%s_bucket", name);
    for (unsigned i = 0; i < CMG_HISTOGRAM_BUCKETS; i++) {
        sum += h->bucket[i];
        series(b, n, labels, "le", bucket_le[i]);
        cmg_buf_printf(b, " %llu\n", (unsigned long long)sum);
    }
    series(b, n, labels, "le", "+Inf");
    cmg_buf_printf(b, " %llu\n", (unsigned long long)h->count);
    snprintf(n, sizeof(n), "%s_sum", name);
    cmg_metrics_f64(b, n, labels, (double)h->sum_us / 1e6);
    snprintf(n, sizeof(n), "%s_count", name);
    cmg_metrics_u64(b, n, labels, h->count);
}

void cmg_metrics_role_families(struct cmg_buf *b, const char *prefix,
                               const struct cmg_metrics_roles *r, const char *help_in,
                               const char *help_out, const char *help_duration)
{
    char in[96], out[96], dur[96];

    snprintf(in, sizeof(in), "%s_request_bytes_total", prefix);
    snprintf(out, sizeof(out), "%s_response_bytes_total", prefix);
    snprintf(dur, sizeof(dur), "%s_request_duration_seconds", prefix);
    cmg_metrics_family(b, in, "counter", help_in);
    for (size_t i = 0; i < r->cap; i++) {
        const char *l[] = {"role", r->t[i].role, NULL};
        if (r->t[i].role[0])
            cmg_metrics_u64(b, in, l, r->t[i].request_bytes);
    }
    cmg_metrics_family(b, out, "counter", help_out);
    for (size_t i = 0; i < r->cap; i++) {
        const char *l[] = {"role", r->t[i].role, NULL};
        if (r->t[i].role[0])
            cmg_metrics_u64(b, out, l, r->t[i].response_bytes);
    }
    cmg_metrics_family(b, dur, "histogram", help_duration);
    for (size_t i = 0; i < r->cap; i++) {
        const char *l[] = {"role", r->t[i].role, NULL};
        if (r->t[i].role[0])
            cmg_metrics_histogram(b, dur, l, &r->t[i].duration);
    }
}

void cmg_metrics_build_info(struct cmg_buf *b, const char *role)
{
    const char *labels[] = {"version", CMG_VERSION, "role", role, NULL};

    cmg_metrics_family(b, "cmg_build_info", "gauge", "The running build: always 1.");
    cmg_metrics_u64(b, "cmg_build_info", labels, 1);
}

void cmg_metrics_certificates(struct cmg_buf *b, const struct cmg_tls_watch *w)
{
    cmg_metrics_family(b, "cmg_certificate_not_after_seconds", "gauge",
                       "When each certificate this role uses (of a file of several, the one that "
                       "ends first) stops being valid, in seconds since the epoch.");
    for (size_t i = 0; i < w->n; i++) {
        const ASN1_TIME *t = w->certs[i].cert ? X509_get0_notAfter(w->certs[i].cert) : NULL;
        const char *labels[] = {"certificate", w->certs[i].what, NULL};
        struct tm tm;

        if (t && ASN1_TIME_to_tm(t, &tm) == 1)
            cmg_metrics_u64(b, "cmg_certificate_not_after_seconds", labels, (uint64_t)timegm(&tm));
    }
}

void cmg_metrics_policy(struct cmg_buf *b, int64_t version, int64_t issued_at)
{
    int64_t age = (int64_t)time(NULL) - issued_at;

    cmg_metrics_family(b, "cmg_policy_version", "gauge",
                       "Version of the policy in force (0: the local one, from the configuration).");
    cmg_metrics_u64(b, "cmg_policy_version", NULL, version > 0 ? (uint64_t)version : 0);
    if (issued_at > 0) {
        cmg_metrics_family(b, "cmg_policy_age_seconds", "gauge",
                           "Seconds since the site signed the policy in force.");
        cmg_metrics_u64(b, "cmg_policy_age_seconds", NULL, age > 0 ? (uint64_t)age : 0);
    }
}

/* ---- the listener ---- */

struct cmg_metrics_server {
    struct cmg_httpd *httpd;
    struct cmg_metrics_hooks hooks;
    struct cmg_buf out;   /* the last exposition: its room is kept for the next */
};

static void text(struct cmg_httpd_req *req, int status, const char *body)
{
    cmg_httpd_respond(req, status, "text/plain; charset=utf-8", body, strlen(body), NULL);
}

static void readyz(struct cmg_metrics_server *m, struct cmg_httpd_req *req)
{
    const char *why = "not ready";
    char body[300];

    if (m->hooks.ready(m->hooks.user, &why)) {
        text(req, 200, "ready\n");
        return;
    }
    snprintf(body, sizeof(body), "not ready: %s\n", why);
    text(req, 503, body);
}

static void on_request(void *user, struct cmg_httpd_req *req)
{
    struct cmg_metrics_server *m = user;
    char *q = strchr(req->target, '?');
    bool get = !strcmp(req->method, "GET") || !strcmp(req->method, "HEAD");

    if (q)
        *q = 0;   /* Prometheus may add parameters; none is used */
    if (!get) {
        cmg_httpd_respond(req, 405, "text/plain; charset=utf-8", "GET only\n", 9,
                          "Allow: GET, HEAD\r\n");
    } else if (!strcmp(req->target, "/metrics")) {
        cmg_buf_reset(&m->out);
        m->hooks.render(m->hooks.user, &m->out);
        cmg_httpd_respond(req, 200, CMG_METRICS_CONTENT_TYPE, cmg_buf_head(&m->out), m->out.len,
                          NULL);
    } else if (!strcmp(req->target, "/healthz")) {
        text(req, 200, "ok\n");
    } else if (!strcmp(req->target, "/readyz")) {
        readyz(m, req);
    } else {
        text(req, 404, "not found: /metrics, /healthz and /readyz are served here\n");
    }
}

/* addr with its port moved up by offset. */
static int offset_addr(const char *addr, unsigned offset, char *out, size_t outlen, char *err,
                       size_t errlen)
{
    struct cmg_addr a;
    unsigned port;

    if (cmg_addr_parse(addr, 0, &a, err, errlen) < 0)
        return -1;
    port = ntohs(((struct sockaddr_in *)&a.ss)->sin_port);   /* same offset in sockaddr_in6 */
    if (port + offset > 65535) {
        snprintf(err, errlen, "metrics_listen %s: port %u + instance %u is above 65535", addr,
                 port, offset);
        return -1;
    }
    ((struct sockaddr_in *)&a.ss)->sin_port = htons((uint16_t)(port + offset));
    cmg_addr_str((struct sockaddr *)&a.ss, out, outlen);
    return 0;
}

int cmg_metrics_start(struct cmg_loop *loop, const struct cmg_metrics_conf *conf,
                      unsigned port_offset, const struct cmg_metrics_hooks *hooks,
                      struct cmg_metrics_server **out, char *err, size_t errlen)
{
    struct cmg_metrics_server *m = NULL;
    char addr[320];
    int rc = -1;

    *out = NULL;
    if (!conf->listen[0])
        return 0;
    if (offset_addr(conf->listen, port_offset, addr, sizeof(addr), err, errlen) < 0)
        goto out;
    if (!(m = calloc(1, sizeof(*m)))) {
        snprintf(err, errlen, "metrics_listen: out of memory");
        goto out;
    }
    m->hooks = *hooks;
    if (cmg_httpd_listen(loop, addr, NULL, on_request, m, &m->httpd, err, errlen) < 0) {
        if (!conf->explicit_) {   /* e.g. another role on this host has the default */
            cmg_warn("metrics: cannot serve the default metrics_listen (%s); no metrics from "
                     "this process: set metrics_listen (or off) in its configuration", err);
            rc = 0;
        }
        goto out;
    }
    /* Scrapers and probes send no body and need few connections at once. */
    cmg_httpd_set_limits(m->httpd, METRICS_MAX_CONNS, 0);
    cmg_info("metrics and health checks served on http://%s", addr);
    *out = m;
    m = NULL;
    rc = 0;
out:
    free(m);
    return rc;
}

void cmg_metrics_free(struct cmg_metrics_server *m)
{
    if (!m)
        return;
    cmg_httpd_free(m->httpd);
    cmg_buf_free(&m->out);
    free(m);
}
