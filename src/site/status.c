/* The status document and the traffic series; see status.h. */
#include "site/status.h"

#include "core/metrics.h"
#include "site/ops.h"
#include "site/serve.h"

#include <ctype.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DAY_S 86400
#define BUCKET_S 300
#define DAY_BUCKETS 288   /* 24 h of 5-minute buckets */

/* One document in the making: what the read transaction gave so far. */
struct build {
    struct cmg_site_ctx *s;
    int64_t now;
    char day[16], month[16];   /* "YYYY-MM-DD", "YYYY-MM" (UTC) of now */
    cJSON *settings;           /* alert_settings rows */
    cJSON *gateway_rows;       /* gateways rows, tunnels and certificates parsed */
    cJSON *connector_rows;     /* every connector known, reports joined */
    bool failed;
};

/* A query's rows; an empty array (and the build failed) on a store error. */
static cJSON *rows(struct build *b, cJSON *r)
{
    if (!r) {
        b->failed = true;
        return cJSON_CreateArray();
    }
    return r;
}

static double num(const cJSON *o, const char *key, double def)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : def;
}

static const char *str(const cJSON *o, const char *key)
{
    const char *v = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, key));
    return v ? v : "";
}

/* A stored JSON column ("tunnels", "certificates") replaced by the array it holds. */
static void parse_column(cJSON *row, const char *key)
{
    cJSON *v = cJSON_Parse(str(row, key));

    if (!cJSON_IsArray(v)) {
        cJSON_Delete(v);
        v = cJSON_CreateArray();
    }
    if (!cJSON_ReplaceItemInObjectCaseSensitive(row, key, v))
        cJSON_AddItemToObject(row, key, v);   /* a row made here has no such column */
}

/* A number of alert_settings; def when absent or not a number. */
static double setting(const struct build *b, const char *name, double def)
{
    const cJSON *row;

    cJSON_ArrayForEach(row, b->settings) {
        if (!strcmp(str(row, "name"), name)) {
            char *end;
            double v = strtod(str(row, "value"), &end);
            return end != str(row, "value") && !*end && isfinite(v) && v >= 0 ? v : def;
        }
    }
    return def;
}

/* Stale: no report for more than 2 of its own intervals. */
static bool stale(int64_t age, double interval)
{
    return (double)age > 2 * (interval > 0 ? interval : CMG_REPORT_INTERVAL_DEFAULT);
}

static void add_null_or_number(cJSON *o, const char *key, const cJSON *v)
{
    if (cJSON_IsNumber(v))
        cJSON_AddNumberToObject(o, key, v->valuedouble);
    else
        cJSON_AddNullToObject(o, key);
}

/* ---- gateways and connectors ---- */

/* The array's items in cmp's order. */
static cJSON *sorted(cJSON *arr, int (*cmp)(const void *, const void *))
{
    int n = cJSON_GetArraySize(arr);
    cJSON **v = n > 1 ? calloc((size_t)n, sizeof(*v)) : NULL;

    if (!v)
        return arr;
    for (int i = 0; i < n; i++)
        v[i] = cJSON_DetachItemFromArray(arr, 0);
    qsort(v, (size_t)n, sizeof(*v), cmp);
    for (int i = 0; i < n; i++)
        cJSON_AddItemToArray(arr, v[i]);
    free(v);
    return arr;
}

static cJSON *gateways(struct build *b)
{
    cJSON *out = cJSON_CreateArray(), *row;

    b->gateway_rows = rows(b, cmg_store_query_json(b->s->store,
        "SELECT instance, state, policy_version, received, interval, devices_now, via, "
        "tunnels, certificates FROM gateways ORDER BY instance", ""));
    cJSON_ArrayForEach(row, b->gateway_rows) {
        cJSON *g = cJSON_CreateObject();
        int64_t age = b->now - (int64_t)num(row, "received", 0);
        bool is_stale = stale(age, num(row, "interval", 0));

        parse_column(row, "tunnels");
        parse_column(row, "certificates");
        cJSON_AddBoolToObject(row, "is_stale", is_stale);
        cJSON_AddStringToObject(g, "instance", str(row, "instance"));
        cJSON_AddStringToObject(g, "state", str(row, "state"));
        cJSON_AddNumberToObject(g, "policy_version", num(row, "policy_version", 0));
        cJSON_AddNumberToObject(g, "last_report", num(row, "received", 0));
        cJSON_AddNumberToObject(g, "last_report_age", (double)age);
        cJSON_AddBoolToObject(g, "stale", is_stale);
        cJSON_AddNumberToObject(g, "interval", num(row, "interval", 0));
        cJSON_AddNumberToObject(g, "devices_now", num(row, "devices_now", 0));
        cJSON_AddStringToObject(g, "via", str(row, "via"));
        cJSON_AddItemToArray(out, g);
    }
    return out;
}

static cJSON *row_named(cJSON *list, const char *key, const char *name)
{
    cJSON *row;

    cJSON_ArrayForEach(row, list)
        if (!strcmp(str(row, key), name))
            return row;
    return NULL;
}

/* Connectors the gateways list that the store has no row of (never registered here, or
 * named otherwise): known all the same, never reported. */
static void add_listed_connectors(struct build *b)
{
    const cJSON *g, *t;

    cJSON_ArrayForEach(g, b->gateway_rows) {
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(g, "tunnels")) {
            const char *name = str(t, "connector");
            cJSON *c;
            if (!*name || row_named(b->connector_rows, "name", name))
                continue;
            c = cJSON_CreateObject();
            cJSON_AddStringToObject(c, "name", name);
            cJSON_AddNullToObject(c, "revoked");
            cJSON_AddNullToObject(c, "received");
            cJSON_AddItemToArray(b->connector_rows, c);
        }
    }
}

static cJSON *connector_doc(struct build *b, cJSON *row)
{
    cJSON *c = cJSON_CreateObject();
    bool reported = cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(row, "received"));
    int64_t age = b->now - (int64_t)num(row, "received", 0);
    bool is_stale = !reported || stale(age, num(row, "interval", 0));

    parse_column(row, "tunnels");
    cJSON_AddBoolToObject(row, "reported", reported);
    cJSON_AddBoolToObject(row, "is_stale", is_stale);
    cJSON_AddStringToObject(c, "name", str(row, "name"));
    add_null_or_number(c, "last_report", cJSON_GetObjectItemCaseSensitive(row, "received"));
    if (reported)
        cJSON_AddNumberToObject(c, "last_report_age", (double)age);
    else
        cJSON_AddNullToObject(c, "last_report_age");
    cJSON_AddBoolToObject(c, "stale", is_stale);
    add_null_or_number(c, "interval", cJSON_GetObjectItemCaseSensitive(row, "interval"));
    cJSON_AddBoolToObject(c, "draining", num(row, "draining", 0) != 0);
    add_null_or_number(c, "policy_version",
                       cJSON_GetObjectItemCaseSensitive(row, "policy_version"));
    cJSON_AddBoolToObject(c, "revoked",
                          cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(row, "revoked")));
    return c;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(str(*(const cJSON *const *)a, "name"), str(*(const cJSON *const *)b, "name"));
}

/* Every connector registered here or reporting, reports joined; never-reported ones are
 * stale (no word from them). */
static cJSON *connectors(struct build *b)
{
    cJSON *out = cJSON_CreateArray(), *row;

    b->connector_rows = rows(b, cmg_store_query_json(b->s->store,
        "SELECT c.name AS name, c.revoked AS revoked, r.received AS received, "
        "r.interval AS interval, r.draining AS draining, r.policy_version AS policy_version, "
        "r.tunnels AS tunnels FROM connectors c LEFT JOIN connector_reports r "
        "ON r.connector = c.name UNION ALL "
        "SELECT connector, NULL, received, interval, draining, policy_version, tunnels "
        "FROM connector_reports WHERE connector NOT IN (SELECT name FROM connectors) "
        "ORDER BY name", ""));
    add_listed_connectors(b);
    sorted(b->connector_rows, by_name);
    cJSON_ArrayForEach(row, b->connector_rows)
        cJSON_AddItemToArray(out, connector_doc(b, row));
    return out;
}

/* ---- the matrix: one row per (gateway instance, connector) either side knows ---- */

struct pair {
    const char *gateway, *connector;
    const cJSON *from_connector;   /* the connector's tunnel entry, or NULL */
    const cJSON *from_gateway;     /* the gateway's tunnel entry, or NULL */
};

struct pairs {
    struct pair *v;
    size_t n, cap;
};

static struct pair *pair_of(struct pairs *ps, const char *gateway, const char *connector)
{
    for (size_t i = 0; i < ps->n; i++)
        if (!strcmp(ps->v[i].gateway, gateway) && !strcmp(ps->v[i].connector, connector))
            return &ps->v[i];
    if (ps->n == ps->cap) {
        size_t cap = ps->cap ? ps->cap * 2 : 16;
        struct pair *v = realloc(ps->v, cap * sizeof(*v));
        if (!v)
            return NULL;
        ps->v = v;
        ps->cap = cap;
    }
    ps->v[ps->n] = (struct pair){.gateway = gateway, .connector = connector};
    return &ps->v[ps->n++];
}

static void collect_connector_views(struct build *b, struct pairs *ps)
{
    const cJSON *c, *t;

    cJSON_ArrayForEach(c, b->connector_rows) {
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(c, "tunnels")) {
            /* the instance is learned from the tunnel's first report: the address until then */
            const char *gw = *str(t, "instance") ? str(t, "instance") : str(t, "gateway");
            struct pair *p = *gw ? pair_of(ps, gw, str(c, "name")) : NULL;
            if (p)
                p->from_connector = t;
        }
    }
}

static void collect_gateway_views(struct build *b, struct pairs *ps)
{
    const cJSON *g, *t;

    cJSON_ArrayForEach(g, b->gateway_rows) {
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(g, "tunnels")) {
            struct pair *p = *str(t, "connector")
                                 ? pair_of(ps, str(g, "instance"), str(t, "connector")) : NULL;
            /* two tunnels of one connector: the one up tells */
            if (p && (!p->from_gateway || strcmp(str(p->from_gateway, "state"), "up")))
                p->from_gateway = t;
        }
    }
}

/* The connector's view of a pair: its tunnel's state; "stale" when its report is too old,
 * "none" when it never reported or does not list this gateway. */
static const char *connector_view(const cJSON *connector, const struct pair *p)
{
    if (!connector || !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(connector, "reported")))
        return "none";
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(connector, "is_stale")))
        return "stale";
    return p->from_connector && *str(p->from_connector, "state")
               ? str(p->from_connector, "state") : "none";
}

/* The row of a pair: the connector's view while it reports, else the gateway's while that
 * reports, else unknown. */
static cJSON *matrix_row(struct build *b, const struct pair *p)
{
    cJSON *row = cJSON_CreateObject();
    const cJSON *c = row_named(b->connector_rows, "name", p->connector);
    const cJSON *g = row_named(b->gateway_rows, "instance", p->gateway);
    const char *cv = connector_view(c, p);
    const char *gv = p->from_gateway && *str(p->from_gateway, "state")
                         ? str(p->from_gateway, "state") : "none";
    bool gateway_fresh = g && !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(g, "is_stale"));
    const cJSON *since = NULL;
    const char *state = "unknown";

    if (strcmp(cv, "none") && strcmp(cv, "stale")) {
        state = cv;
        since = cJSON_GetObjectItemCaseSensitive(p->from_connector, "since");
    } else if (gateway_fresh) {
        /* a gateway that reports and does not list the connector has no tunnel from it */
        state = strcmp(gv, "none") ? gv : "down";
        since = cJSON_GetObjectItemCaseSensitive(p->from_gateway, "since");
    }
    cJSON_AddStringToObject(row, "gateway", p->gateway);
    cJSON_AddStringToObject(row, "address", str(p->from_connector, "gateway"));
    cJSON_AddStringToObject(row, "connector", p->connector);
    cJSON_AddStringToObject(row, "state", state);
    add_null_or_number(row, "since", since);
    add_null_or_number(row, "rtt_ms", cJSON_GetObjectItemCaseSensitive(p->from_connector,
                                                                       "rtt_ms"));
    add_null_or_number(row, "reconnects",
                       cJSON_GetObjectItemCaseSensitive(p->from_connector, "reconnects"));
    cJSON_AddStringToObject(row, "gateway_view", gv);
    cJSON_AddStringToObject(row, "connector_view", cv);
    return row;
}

static int by_gateway_then_connector(const void *a, const void *b)
{
    const struct pair *x = a, *y = b;
    int c = strcmp(x->gateway, y->gateway);
    return c ? c : strcmp(x->connector, y->connector);
}

static cJSON *tunnels(struct build *b)
{
    struct pairs ps = {0};
    cJSON *matrix = cJSON_CreateArray();

    collect_connector_views(b, &ps);
    collect_gateway_views(b, &ps);
    if (ps.n)
        qsort(ps.v, ps.n, sizeof(*ps.v), by_gateway_then_connector);
    for (size_t i = 0; i < ps.n; i++)
        cJSON_AddItemToArray(matrix, matrix_row(b, &ps.v[i]));
    free(ps.v);
    return matrix;
}

/* ---- traffic and egress ---- */

#define ROLE_SUMS(table, period)                                                           \
    "SELECT role, SUM(requests) AS requests, SUM(r1xx) AS r1xx, SUM(r2xx) AS r2xx, "       \
    "SUM(r3xx) AS r3xx, SUM(r4xx) AS r4xx, SUM(r5xx) AS r5xx, SUM(rother) AS rother, "     \
    "SUM(request_bytes) AS request_bytes, SUM(response_bytes) AS response_bytes FROM "     \
    table " WHERE " period " = ? AND role != '' GROUP BY role ORDER BY role"

static cJSON *role_doc(const cJSON *row)
{
    static const char *const classes[][2] = {{"1xx", "r1xx"}, {"2xx", "r2xx"},
                                             {"3xx", "r3xx"}, {"4xx", "r4xx"},
                                             {"5xx", "r5xx"}, {"other", "rother"}};
    cJSON *r = cJSON_CreateObject(), *status = cJSON_CreateObject();

    cJSON_AddStringToObject(r, "role", str(row, "role"));
    cJSON_AddNumberToObject(r, "requests", num(row, "requests", 0));
    for (size_t i = 0; i < sizeof(classes) / sizeof(classes[0]); i++)
        cJSON_AddNumberToObject(status, classes[i][0], num(row, classes[i][1], 0));
    cJSON_AddItemToObject(r, "status", status);
    cJSON_AddNumberToObject(r, "request_bytes", num(row, "request_bytes", 0));
    cJSON_AddNumberToObject(r, "response_bytes", num(row, "response_bytes", 0));
    return r;
}

/* {requests, request_bytes, response_bytes, roles} of one day or month. */
static cJSON *period_traffic(cJSON *sums)
{
    cJSON *p = cJSON_CreateObject(), *roles = cJSON_CreateArray();
    double requests = 0, up = 0, down = 0;
    const cJSON *row;

    cJSON_ArrayForEach(row, sums) {
        requests += num(row, "requests", 0);
        up += num(row, "request_bytes", 0);
        down += num(row, "response_bytes", 0);
        cJSON_AddItemToArray(roles, role_doc(row));
    }
    cJSON_Delete(sums);
    cJSON_AddNumberToObject(p, "requests", requests);
    cJSON_AddNumberToObject(p, "request_bytes", up);
    cJSON_AddNumberToObject(p, "response_bytes", down);
    cJSON_AddItemToObject(p, "roles", roles);
    return p;
}

static cJSON *traffic(struct build *b)
{
    cJSON *t = cJSON_CreateObject();
    struct cmg_store *st = b->s->store;

    cJSON_AddItemToObject(t, "today", period_traffic(rows(b, cmg_store_query_json(st,
                          ROLE_SUMS("traffic_day", "day"), "s", b->day))));
    cJSON_AddItemToObject(t, "month", period_traffic(rows(b, cmg_store_query_json(st,
                          ROLE_SUMS("traffic_month", "month"), "s", b->month))));
    return t;
}

/* A limit of alert_settings: null when 0 or absent. */
static void add_limit(cJSON *o, const char *key, double limit)
{
    if (limit > 0)
        cJSON_AddNumberToObject(o, key, limit);
    else
        cJSON_AddNullToObject(o, key);
}

/* used * 100 / limit to one decimal, or null without a limit. */
static void add_pct(cJSON *o, const char *key, double used, double limit)
{
    if (limit > 0)
        cJSON_AddNumberToObject(o, key, round(used * 1000 / limit) / 10);
    else
        cJSON_AddNullToObject(o, key);
}

static cJSON *egress(struct build *b)
{
    cJSON *e = cJSON_CreateObject();
    cJSON *per = rows(b, cmg_store_query_json(b->s->store,
        "SELECT instance, SUM(CASE WHEN p = 'd' THEN bytes ELSE 0 END) AS today, "
        "SUM(CASE WHEN p = 'm' THEN bytes ELSE 0 END) AS month FROM ("
        "SELECT instance, 'd' AS p, egress_bytes AS bytes FROM traffic_day "
        "WHERE role = '' AND day = ? UNION ALL "
        "SELECT instance, 'm', egress_bytes FROM traffic_month WHERE role = '' AND month = ?) "
        "GROUP BY instance ORDER BY instance", "ss", b->day, b->month));
    double today = 0, month = 0, monthly = setting(b, "egress_monthly", 0);
    double daily = setting(b, "egress_daily", 0);
    const cJSON *row;

    cJSON_ArrayForEach(row, per) {
        today += num(row, "today", 0);
        month += num(row, "month", 0);
    }
    cJSON_AddNumberToObject(e, "today", today);
    cJSON_AddNumberToObject(e, "month", month);
    add_limit(e, "monthly_limit", monthly);
    add_limit(e, "daily_limit", daily);
    cJSON_AddNumberToObject(e, "warning_pct", setting(b, "warning_pct", 50));
    cJSON_AddNumberToObject(e, "critical_pct", setting(b, "critical_pct", 90));
    add_pct(e, "month_pct", month, monthly);
    add_pct(e, "today_pct", today, daily);
    cJSON_AddItemToObject(e, "by_gateway", per);
    return e;
}

/* ---- certificates ending within cert_expiry_days ---- */

/* A serial as one spelling: upper-case hex without ':' or leading zeros. */
static void serial_key(const char *in, char *out, size_t len)
{
    size_t n = 0;

    for (; *in && n + 1 < len; in++) {
        if (!isxdigit((unsigned char)*in) || (n == 0 && *in == '0'))
            continue;
        out[n++] = (char)toupper((unsigned char)*in);
    }
    out[n] = 0;
}

static bool listed(const cJSON *list, const char *serial)
{
    char want[128], have[128];
    const cJSON *c;

    serial_key(serial, want, sizeof(want));
    cJSON_ArrayForEach(c, list) {
        serial_key(str(c, "serial"), have, sizeof(have));
        if (*want && !strcmp(want, have))
            return true;
    }
    return false;
}

static void add_cert(struct build *b, cJSON *list, const char *kind, const char *name,
                     const char *serial, double not_after)
{
    cJSON *c = cJSON_CreateObject();

    cJSON_AddStringToObject(c, "kind", kind);
    cJSON_AddStringToObject(c, "name", name);
    cJSON_AddStringToObject(c, "serial", serial);
    cJSON_AddNumberToObject(c, "not_after", not_after);
    cJSON_AddNumberToObject(c, "days_left", floor((not_after - (double)b->now) / DAY_S));
    cJSON_AddItemToArray(list, c);
}

/* What 'cert list' shows (the store's rows, the site directory's files), in force: not
 * revoked, not replaced by a renewal; the kinds it names in lower case. */
static void site_certs(struct build *b, cJSON *list, double horizon)
{
    static const char *const kinds[][2] = {{"CA", "ca"}, {"site", "site"},
                                           {"gateway", "gateway"}, {"connector", "connector"},
                                           {"device", "device"}};
    cJSON *all = NULL, *empty = cJSON_CreateObject();
    const cJSON *c;
    char msg[256];

    if (cmg_site_op_run(b->s, "cert.list", empty, &all, msg, sizeof(msg)) != 0)
        b->failed = true;
    cJSON_Delete(empty);
    cJSON_ArrayForEach(c, all) {
        double end = num(c, "expires", 0);
        if (!end || end > horizon ||
            !cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(c, "revoked")) ||
            cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(c, "replaced")) ||
            listed(list, str(c, "serial")))
            continue;
        for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++)
            if (!strcmp(str(c, "kind"), kinds[k][0]))
                add_cert(b, list, kinds[k][1], str(c, "name"), str(c, "serial"), end);
    }
    cJSON_Delete(all);
}

/* The certificates the gateways reported (their own, the CAs they trust), once each. */
static void reported_certs(struct build *b, cJSON *list, double horizon)
{
    const cJSON *g, *c;

    cJSON_ArrayForEach(g, b->gateway_rows) {
        cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(g, "certificates")) {
            double end = num(c, "not_after", 0);
            if (!end || end > horizon || listed(list, str(c, "serial")))
                continue;
            add_cert(b, list, "reported", str(c, "name"), str(c, "serial"), end);
            cJSON_AddStringToObject(cJSON_GetArrayItem(list, cJSON_GetArraySize(list) - 1),
                                    "instance", str(g, "instance"));
        }
    }
}

static int by_not_after(const void *a, const void *b)
{
    double x = num(*(const cJSON *const *)a, "not_after", 0);
    double y = num(*(const cJSON *const *)b, "not_after", 0);
    return x < y ? -1 : x > y;
}

static cJSON *certificates(struct build *b)
{
    cJSON *list = cJSON_CreateArray();
    double days = setting(b, "cert_expiry_days", CMG_CERT_EXPIRY_DAYS_DEFAULT);
    double horizon = (double)b->now + days * DAY_S;

    site_certs(b, list, horizon);
    reported_certs(b, list, horizon);
    return sorted(list, by_not_after);
}

static cJSON *open_alerts(struct build *b)
{
    return rows(b, cmg_store_query_json(b->s->store,
        "SELECT id, kind, subject, level, message, value, threshold, opened, updated "
        "FROM alerts WHERE resolved IS NULL "
        "ORDER BY level = 'critical' DESC, opened, id", ""));
}

/* ---- the document ---- */

static void utc_names(int64_t now, char day[16], char month[16])
{
    time_t t = (time_t)now;
    struct tm tm;

    gmtime_r(&t, &tm);
    strftime(day, 16, "%Y-%m-%d", &tm);
    strftime(month, 16, "%Y-%m", &tm);
}

static cJSON *status_doc(struct build *b)
{
    struct cmg_site_ctx *s = b->s;
    cJSON *d = cJSON_CreateObject();

    b->settings = rows(b, cmg_store_query_json(s->store,
                                               "SELECT name, value FROM alert_settings", ""));
    cJSON_AddNumberToObject(d, "time", (double)b->now);
    cJSON_AddNumberToObject(d, "report_interval", s->report_interval_s);
    cJSON_AddNumberToObject(d, "policy_version", (double)cmg_store_policy_version(s->store));
    cJSON_AddStringToObject(d, "service_name", s->service_name);
    cJSON_AddStringToObject(d, "site_role", s->site_role);
    cJSON_AddBoolToObject(d, "site_serving", cmg_site_serve_running(s->dir));
    cJSON_AddItemToObject(d, "gateways", gateways(b));
    cJSON_AddItemToObject(d, "connectors", connectors(b));
    cJSON_AddItemToObject(d, "tunnels", tunnels(b));
    cJSON_AddItemToObject(d, "traffic", traffic(b));
    cJSON_AddItemToObject(d, "egress", egress(b));
    cJSON_AddNumberToObject(d, "cert_expiry_days",
                            setting(b, "cert_expiry_days", CMG_CERT_EXPIRY_DAYS_DEFAULT));
    cJSON_AddItemToObject(d, "certificates", certificates(b));
    cJSON_AddItemToObject(d, "alerts", open_alerts(b));
    return d;
}

int cmg_site_status(struct cmg_site_ctx *s, int64_t now, cJSON **out, char *msg, size_t len)
{
    struct build b = {.s = s, .now = now};
    cJSON *doc;

    *out = NULL;
    utc_names(now, b.day, b.month);
    if (cmg_store_begin_read(s->store) < 0) {
        snprintf(msg, len, "store: %s", cmg_store_error(s->store));
        return 500;
    }
    doc = status_doc(&b);
    if (b.failed)
        snprintf(msg, len, "store: %s", cmg_store_error(s->store));
    cmg_store_rollback(s->store);   /* read only: nothing to keep */
    cJSON_Delete(b.settings);
    cJSON_Delete(b.gateway_rows);
    cJSON_Delete(b.connector_rows);
    if (b.failed || !doc) {
        cJSON_Delete(doc);
        return 500;
    }
    *out = doc;
    return 0;
}

/* ---- the traffic series ---- */

/* [{role, points: [[t, requests, request_bytes, response_bytes], ...]}] of rows ordered by
 * role then t. */
static cJSON *series(cJSON *sums)
{
    cJSON *out = cJSON_CreateArray(), *points = NULL;
    const char *role = NULL;
    const cJSON *row;

    cJSON_ArrayForEach(row, sums) {
        double p[4] = {num(row, "t", 0), num(row, "requests", 0), num(row, "request_bytes", 0),
                       num(row, "response_bytes", 0)};
        if (!role || strcmp(role, str(row, "role"))) {
            cJSON *s = cJSON_CreateObject();
            role = str(row, "role");
            cJSON_AddStringToObject(s, "role", role);
            points = cJSON_AddArrayToObject(s, "points");
            cJSON_AddItemToArray(out, s);
        }
        cJSON_AddItemToArray(points, cJSON_CreateDoubleArray(p, 4));
    }
    return out;
}

static cJSON *egress_points(cJSON *sums)
{
    cJSON *out = cJSON_CreateArray();
    const cJSON *row;

    cJSON_ArrayForEach(row, sums) {
        double p[2] = {num(row, "t", 0), num(row, "egress_bytes", 0)};
        cJSON_AddItemToArray(out, cJSON_CreateDoubleArray(p, 2));
    }
    return out;
}

#define SERIES_SQL(t, table, where)                                                        \
    "SELECT role, " t " AS t, SUM(requests) AS requests, SUM(request_bytes) AS "           \
    "request_bytes, SUM(response_bytes) AS response_bytes FROM " table " WHERE " where     \
    " AND role != '' AND (?3 = '' OR instance = ?3) GROUP BY role, t HAVING "              \
    "SUM(requests) + SUM(request_bytes) + SUM(response_bytes) > 0 ORDER BY role, t"
#define EGRESS_SQL(t, table, where)                                                        \
    "SELECT " t " AS t, SUM(egress_bytes) AS egress_bytes FROM " table " WHERE " where     \
    " AND role = '' AND (?3 = '' OR instance = ?3) GROUP BY t HAVING SUM(egress_bytes) > 0 " \
    "ORDER BY t"
#define DAY_T "CAST(strftime('%s', day) AS INTEGER)"
#define DAY_WHERE "day >= ?1 AND day <= ?2"

/* The series of [from, to]: buckets of 5 minutes, or the days of a month. */
static void fill_series(struct build *b, bool by_day, int64_t from, const char *instance,
                        cJSON *doc)
{
    struct cmg_store *st = b->s->store;
    cJSON *sums, *eg;

    if (by_day) {
        char first[24], last[16];
        snprintf(first, sizeof(first), "%s-01", b->month);
        snprintf(last, sizeof(last), "%s", b->day);
        sums = cmg_store_query_json(st, SERIES_SQL(DAY_T, "traffic_day", DAY_WHERE), "sss",
                                    first, last, instance);
        eg = cmg_store_query_json(st, EGRESS_SQL(DAY_T, "traffic_day", DAY_WHERE), "sss",
                                  first, last, instance);
    } else {
        sums = cmg_store_query_json(st, SERIES_SQL("bucket", "traffic_5m",
                                                   "bucket >= ?1 AND bucket <= ?2"),
                                    "iis", from, b->now, instance);
        eg = cmg_store_query_json(st, EGRESS_SQL("bucket", "traffic_5m",
                                                 "bucket >= ?1 AND bucket <= ?2"),
                                  "iis", from, b->now, instance);
    }
    sums = rows(b, sums);
    eg = rows(b, eg);
    cJSON_AddItemToObject(doc, "series", series(sums));
    cJSON_AddItemToObject(doc, "egress", egress_points(eg));
    cJSON_Delete(sums);
    cJSON_Delete(eg);
}

int cmg_site_traffic(struct cmg_site_ctx *s, int64_t now, const char *range,
                     const char *instance, cJSON **out, char *msg, size_t len)
{
    struct build b = {.s = s, .now = now};
    bool month = range && !strcmp(range, "month");
    int64_t from;
    cJSON *doc;

    *out = NULL;
    if (!range || (strcmp(range, "day") && !month)) {
        snprintf(msg, len, "range: expected day or month, found '%.64s'", range ? range : "");
        return 400;
    }
    if (instance && strlen(instance) > 256) {
        snprintf(msg, len, "instance: at most 256 bytes");
        return 400;
    }
    utc_names(now, b.day, b.month);
    from = month ? now - (now % DAY_S) - (int64_t)(atoi(b.day + 8) - 1) * DAY_S
                 : now - (now % BUCKET_S) - (DAY_BUCKETS - 1) * BUCKET_S;
    doc = cJSON_CreateObject();
    cJSON_AddStringToObject(doc, "range", month ? "month" : "day");
    cJSON_AddNumberToObject(doc, "step", month ? DAY_S : BUCKET_S);
    cJSON_AddNumberToObject(doc, "from", (double)from);
    cJSON_AddNumberToObject(doc, "to", (double)now);
    if (instance && *instance)
        cJSON_AddStringToObject(doc, "instance", instance);
    if (cmg_store_begin_read(s->store) < 0) {
        b.failed = true;
    } else {
        fill_series(&b, month, from, instance ? instance : "", doc);
        cmg_store_rollback(s->store);
    }
    if (b.failed) {
        snprintf(msg, len, "store: %s", cmg_store_error(s->store));
        cJSON_Delete(doc);
        return 500;
    }
    *out = doc;
    return 0;
}
