/* The status document and the traffic series; see status.h. */
#include "site/status.h"

#include "core/log.h"
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
/* What one document holds at most: the most recent gateways, the soonest certificates
 * (the document says how many more there are). */
#define GATEWAYS_MAX 1024
#define CERTIFICATES_MAX 200

/* Rows of a JSON array by the string at one key, for lookups in O(log n). */
struct named {
    const char *name;
    const cJSON *row;
};

struct index {
    struct named *v;
    size_t n;
};

/* One document in the making: what the read transaction gave so far. */
struct build {
    struct cmg_site_ctx *s;
    int64_t now;
    char day[16], month[16];   /* "YYYY-MM-DD", "YYYY-MM" (UTC) of now */
    cJSON *settings;           /* alert_settings rows */
    cJSON *gateway_rows;       /* gateways rows, tunnels and certificates parsed */
    cJSON *connector_rows;     /* every connector known, reports joined */
    struct index gateway_index, connector_index;   /* of those, by instance, by name */
    bool failed;
    bool out_of_memory;        /* failed without the store's word */
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

/* A stored JSON column ("tunnels", "certificates") replaced by the array it holds. */
static void parse_column(cJSON *row, const char *key)
{
    cJSON *v = cJSON_Parse(cmg_json_str(row, key));

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
        if (!strcmp(cmg_json_str(row, "name"), name)) {
            char *end;
            double v = strtod(cmg_json_str(row, "value"), &end);
            return end != cmg_json_str(row, "value") && !*end && isfinite(v) && v >= 0 ? v : def;
        }
    }
    return def;
}

/* Stale: no report for more than 2 of its own intervals. */
static bool stale(int64_t age, double interval)
{
    return (double)age > 2 * (interval > 0 ? interval : CMG_REPORT_INTERVAL_DEFAULT);
}

static cJSON *number_or_null(const cJSON *v)
{
    return cJSON_IsNumber(v) ? cJSON_CreateNumber(v->valuedouble) : cJSON_CreateNull();
}

static void add_null_or_number(cJSON *o, const char *key, const cJSON *v)
{
    if (cJSON_IsNumber(v))
        cJSON_AddNumberToObject(o, key, v->valuedouble);
    else
        cJSON_AddNullToObject(o, key);
}

static int by_named(const void *a, const void *b)
{
    return strcmp(((const struct named *)a)->name, ((const struct named *)b)->name);
}

/* The index of list by the string at key (the build failed without memory for it). */
static struct index index_of(struct build *b, const cJSON *list, const char *key)
{
    struct index ix = {0};
    size_t n = (size_t)cJSON_GetArraySize(list);
    const cJSON *row;

    if (n && !(ix.v = calloc(n, sizeof(*ix.v)))) {
        b->failed = b->out_of_memory = true;
        return ix;
    }
    cJSON_ArrayForEach(row, list)
        ix.v[ix.n++] = (struct named){.name = cmg_json_str(row, key), .row = row};
    if (ix.n > 1)
        qsort(ix.v, ix.n, sizeof(*ix.v), by_named);
    return ix;
}

static const cJSON *lookup(const struct index *ix, const char *name)
{
    struct named want = {.name = name}, *hit;

    hit = ix->n ? bsearch(&want, ix->v, ix->n, sizeof(*ix->v), by_named) : NULL;
    return hit ? hit->row : NULL;
}

/* A count of rows (the query names it n); 0 on a store error (and the build failed). */
static double count(struct build *b, cJSON *r)
{
    double n;

    r = rows(b, r);
    n = cmg_json_num(cJSON_GetArrayItem(r, 0), "n", 0);
    cJSON_Delete(r);
    return n;
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

/* The GATEWAYS_MAX instances that reported last, by name. */
static cJSON *gateways(struct build *b)
{
    cJSON *out = cJSON_CreateArray(), *row;

    b->gateway_rows = rows(b, cmg_store_query_json(b->s->store,
        "SELECT * FROM (SELECT instance, state, policy_version, received, interval, "
        "devices_now, via, tunnels, certificates FROM gateways "
        "ORDER BY received DESC, instance LIMIT ?1) ORDER BY instance", "i",
        (int64_t)GATEWAYS_MAX));
    cJSON_ArrayForEach(row, b->gateway_rows) {
        cJSON *g = cJSON_CreateObject();
        int64_t age = b->now - (int64_t)cmg_json_num(row, "received", 0);
        bool is_stale = stale(age, cmg_json_num(row, "interval", 0));

        parse_column(row, "tunnels");
        parse_column(row, "certificates");
        cJSON_AddBoolToObject(row, "is_stale", is_stale);
        cJSON_AddStringToObject(g, "instance", cmg_json_str(row, "instance"));
        cJSON_AddStringToObject(g, "state", cmg_json_str(row, "state"));
        cJSON_AddNumberToObject(g, "policy_version", cmg_json_num(row, "policy_version", 0));
        cJSON_AddNumberToObject(g, "last_report", cmg_json_num(row, "received", 0));
        cJSON_AddNumberToObject(g, "last_report_age", (double)age);
        cJSON_AddBoolToObject(g, "stale", is_stale);
        cJSON_AddNumberToObject(g, "interval", cmg_json_num(row, "interval", 0));
        cJSON_AddNumberToObject(g, "devices_now", cmg_json_num(row, "devices_now", 0));
        cJSON_AddStringToObject(g, "via", cmg_json_str(row, "via"));
        cJSON_AddItemToArray(out, g);
    }
    return out;
}

static int by_string(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The connector names the gateways' tunnels list, sorted (duplicates included). */
static const char **listed_names(struct build *b, size_t *n)
{
    const cJSON *g, *t;
    const char **v;
    size_t cap = 0;

    *n = 0;
    cJSON_ArrayForEach(g, b->gateway_rows)
        cap += (size_t)cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(g, "tunnels"));
    if (!cap)
        return NULL;
    if (!(v = calloc(cap, sizeof(*v)))) {
        b->failed = b->out_of_memory = true;
        return NULL;
    }
    cJSON_ArrayForEach(g, b->gateway_rows)
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(g, "tunnels"))
            if (*cmg_json_str(t, "connector"))
                v[(*n)++] = cmg_json_str(t, "connector");
    if (*n > 1)
        qsort(v, *n, sizeof(*v), by_string);
    return v;
}

/* Connectors the gateways list that the store has no row of (never registered here, or
 * named otherwise): known all the same, never reported. */
static void add_listed_connectors(struct build *b)
{
    size_t n;
    const char **names = listed_names(b, &n);
    struct index known = index_of(b, b->connector_rows, "name");

    for (size_t i = 0; i < n && !b->failed; i++) {
        cJSON *c;
        if ((i && !strcmp(names[i], names[i - 1])) || lookup(&known, names[i]))
            continue;
        c = cJSON_CreateObject();
        cJSON_AddStringToObject(c, "name", names[i]);
        cJSON_AddNullToObject(c, "revoked");
        cJSON_AddNullToObject(c, "received");
        cJSON_AddItemToArray(b->connector_rows, c);
    }
    free(known.v);
    free(names);
}

static cJSON *connector_doc(struct build *b, cJSON *row)
{
    cJSON *c = cJSON_CreateObject();
    bool reported = cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(row, "received"));
    int64_t age = b->now - (int64_t)cmg_json_num(row, "received", 0);
    bool is_stale = !reported || stale(age, cmg_json_num(row, "interval", 0));

    parse_column(row, "tunnels");
    cJSON_AddBoolToObject(row, "reported", reported);
    cJSON_AddBoolToObject(row, "is_stale", is_stale);
    cJSON_AddStringToObject(c, "name", cmg_json_str(row, "name"));
    add_null_or_number(c, "last_report", cJSON_GetObjectItemCaseSensitive(row, "received"));
    if (reported)
        cJSON_AddNumberToObject(c, "last_report_age", (double)age);
    else
        cJSON_AddNullToObject(c, "last_report_age");
    cJSON_AddBoolToObject(c, "stale", is_stale);
    add_null_or_number(c, "interval", cJSON_GetObjectItemCaseSensitive(row, "interval"));
    cJSON_AddBoolToObject(c, "draining", cmg_json_num(row, "draining", 0) != 0);
    add_null_or_number(c, "policy_version",
                       cJSON_GetObjectItemCaseSensitive(row, "policy_version"));
    cJSON_AddBoolToObject(c, "revoked",
                          cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(row, "revoked")));
    return c;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(cmg_json_str(*(const cJSON *const *)a, "name"),
                  cmg_json_str(*(const cJSON *const *)b, "name"));
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
    b->connector_index = index_of(b, b->connector_rows, "name");
    return out;
}

/* ---- the matrix: one row per (gateway instance, connector) either side knows ---- */

struct pair {
    const char *gateway, *connector;
    const cJSON *from_connector;   /* the connector's tunnel entry, or NULL */
    const cJSON *from_gateway;     /* the gateway's tunnel entry, or NULL */
};

/* One tunnel entry of a report, keyed by its pair; sorted by pair, then in the order
 * read, so that the entries of one pair are neighbours. */
struct view {
    const char *gateway, *connector;
    const cJSON *tunnel;
    bool from_gateway;
    size_t seq;
};

struct views {
    struct view *v;
    size_t n, cap;
};

static void add_view(struct build *b, struct views *vs, const char *gateway,
                     const char *connector, const cJSON *tunnel, bool from_gateway)
{
    if (!*gateway || !*connector || b->failed)
        return;
    if (vs->n == vs->cap) {
        size_t cap = vs->cap ? vs->cap * 2 : 64;
        struct view *v = realloc(vs->v, cap * sizeof(*v));
        if (!v) {
            b->failed = b->out_of_memory = true;
            return;
        }
        vs->v = v;
        vs->cap = cap;
    }
    vs->v[vs->n] = (struct view){gateway, connector, tunnel, from_gateway, vs->n};
    vs->n++;
}

static void collect_views(struct build *b, struct views *vs)
{
    const cJSON *r, *t;

    cJSON_ArrayForEach(r, b->connector_rows)
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(r, "tunnels"))
        /* the instance is learned from the tunnel's first report: the address until then */
        add_view(b, vs,
                 *cmg_json_str(t, "instance") ? cmg_json_str(t, "instance")
                                              : cmg_json_str(t, "gateway"),
                 cmg_json_str(r, "name"), t, false);
    cJSON_ArrayForEach(r, b->gateway_rows)
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(r, "tunnels"))
            add_view(b, vs, cmg_json_str(r, "instance"), cmg_json_str(t, "connector"), t, true);
}

static int by_pair_then_seq(const void *a, const void *b)
{
    const struct view *x = a, *y = b;
    int c = strcmp(x->gateway, y->gateway);

    if (!c)
        c = strcmp(x->connector, y->connector);
    return c ? c : (x->seq > y->seq) - (x->seq < y->seq);
}

/* The pair of the views from v[0] on that share its key; *used: how many they are. The
 * connector's last entry tells; of two tunnels a gateway lists, the one up. */
static struct pair pair_of(const struct view *v, size_t left, size_t *used)
{
    struct pair p = {.gateway = v[0].gateway, .connector = v[0].connector};
    size_t i = 0;

    for (; i < left && !strcmp(v[i].gateway, p.gateway) &&
           !strcmp(v[i].connector, p.connector); i++) {
        if (!v[i].from_gateway)
            p.from_connector = v[i].tunnel;
        else if (!p.from_gateway || strcmp(cmg_json_str(p.from_gateway, "state"), "up"))
            p.from_gateway = v[i].tunnel;
    }
    *used = i;
    return p;
}

/* The connector's view of a pair: its tunnel's state; "stale" when its report is too old,
 * "none" when it never reported or does not list this gateway. */
static const char *connector_view(const cJSON *connector, const struct pair *p)
{
    if (!connector || !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(connector, "reported")))
        return "none";
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(connector, "is_stale")))
        return "stale";
    return p->from_connector && *cmg_json_str(p->from_connector, "state")
               ? cmg_json_str(p->from_connector, "state") : "none";
}

static bool is_up(const char *view) { return !strcmp(view, "up") || !strcmp(view, "draining"); }

/* Whether the gateway's report came in no earlier than the connector's: a connector that
 * died still reads "up" in its last report, while the gateways say at once that its
 * tunnels are gone (within a second), long before the connector counts as stale. */
static bool gateway_newer(const cJSON *gateway, const cJSON *connector)
{
    return cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(gateway, "tunnels")) &&
           cmg_json_num(gateway, "received", 0) >= cmg_json_num(connector, "received", 0);
}

/* The row of a pair: the connector's view while it reports (unless a gateway's newer
 * report says otherwise of the tunnel's being up), else the gateway's while that
 * reports, else unknown. */
static cJSON *matrix_row(struct build *b, const struct pair *p)
{
    cJSON *row = cJSON_CreateObject();
    const cJSON *c = lookup(&b->connector_index, p->connector);
    const cJSON *g = lookup(&b->gateway_index, p->gateway);
    const char *cv = connector_view(c, p);
    const char *gv = p->from_gateway && *cmg_json_str(p->from_gateway, "state")
                         ? cmg_json_str(p->from_gateway, "state") : "none";
    bool gateway_fresh = g && !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(g, "is_stale"));
    const cJSON *since = NULL;
    const char *state = "unknown";

    if (strcmp(cv, "none") && strcmp(cv, "stale") &&
        !(gateway_fresh && gateway_newer(g, c) && is_up(gv) != is_up(cv))) {
        state = cv;
        since = cJSON_GetObjectItemCaseSensitive(p->from_connector, "since");
    } else if (gateway_fresh) {
        /* a gateway that reports and does not list the connector has no tunnel from it */
        state = strcmp(gv, "none") ? gv : "down";
        since = cJSON_GetObjectItemCaseSensitive(p->from_gateway, "since");
    }
    /* rows by the ten thousand: keys are not copied */
    cJSON_AddItemToObjectCS(row, "gateway", cJSON_CreateString(p->gateway));
    cJSON_AddItemToObjectCS(row, "address",
                            cJSON_CreateString(cmg_json_str(p->from_connector, "gateway")));
    cJSON_AddItemToObjectCS(row, "connector", cJSON_CreateString(p->connector));
    cJSON_AddItemToObjectCS(row, "state", cJSON_CreateString(state));
    /* 0 (or less) is no time of this deployment: not known */
    cJSON_AddItemToObjectCS(row, "since", cJSON_IsNumber(since) && since->valuedouble > 0
                                              ? cJSON_CreateNumber(since->valuedouble)
                                              : cJSON_CreateNull());
    cJSON_AddItemToObjectCS(row, "rtt_ms", number_or_null(
        cJSON_GetObjectItemCaseSensitive(p->from_connector, "rtt_ms")));
    cJSON_AddItemToObjectCS(row, "reconnects", number_or_null(
        cJSON_GetObjectItemCaseSensitive(p->from_connector, "reconnects")));
    cJSON_AddItemToObjectCS(row, "gateway_view", cJSON_CreateString(gv));
    cJSON_AddItemToObjectCS(row, "connector_view", cJSON_CreateString(cv));
    return row;
}

/* The matrix, by instance then connector: O(n log n) in the tunnel entries reported. */
static cJSON *tunnels(struct build *b)
{
    struct views vs = {0};
    cJSON *matrix = cJSON_CreateArray();
    size_t used;

    b->gateway_index = index_of(b, b->gateway_rows, "instance");
    collect_views(b, &vs);
    if (vs.n > 1)
        qsort(vs.v, vs.n, sizeof(*vs.v), by_pair_then_seq);
    for (size_t i = 0; i < vs.n && !b->failed; i += used) {
        struct pair p = pair_of(vs.v + i, vs.n - i, &used);
        cJSON_AddItemToArray(matrix, matrix_row(b, &p));
    }
    free(vs.v);
    return matrix;
}

/* ---- traffic and egress ---- */

/* Sums are TOTAL()s, floating point: SUM() of integers fails past 2^63 ("integer
 * overflow"), and one row that large would keep every document from being made. */

#define ROLE_SUMS(table, period)                                                           \
    "SELECT role, TOTAL(requests) AS requests, TOTAL(r1xx) AS r1xx, TOTAL(r2xx) AS r2xx, "   \
    "TOTAL(r3xx) AS r3xx, TOTAL(r4xx) AS r4xx, TOTAL(r5xx) AS r5xx, "                        \
    "TOTAL(rother) AS rother, TOTAL(request_bytes) AS request_bytes, "                       \
    "TOTAL(response_bytes) AS response_bytes FROM "                                          \
    table " WHERE " period " = ? AND role != '' GROUP BY role ORDER BY role"

static cJSON *role_doc(const cJSON *row)
{
    static const char *const classes[][2] = {{"1xx", "r1xx"}, {"2xx", "r2xx"},
                                             {"3xx", "r3xx"}, {"4xx", "r4xx"},
                                             {"5xx", "r5xx"}, {"other", "rother"}};
    cJSON *r = cJSON_CreateObject(), *status = cJSON_CreateObject();

    cJSON_AddStringToObject(r, "role", cmg_json_str(row, "role"));
    cJSON_AddNumberToObject(r, "requests", cmg_json_num(row, "requests", 0));
    for (size_t i = 0; i < sizeof(classes) / sizeof(classes[0]); i++)
        cJSON_AddNumberToObject(status, classes[i][0], cmg_json_num(row, classes[i][1], 0));
    cJSON_AddItemToObject(r, "status", status);
    cJSON_AddNumberToObject(r, "request_bytes", cmg_json_num(row, "request_bytes", 0));
    cJSON_AddNumberToObject(r, "response_bytes", cmg_json_num(row, "response_bytes", 0));
    return r;
}

/* {requests, request_bytes, response_bytes, roles} of one day or month. */
static cJSON *period_traffic(cJSON *sums)
{
    cJSON *p = cJSON_CreateObject(), *roles = cJSON_CreateArray();
    double requests = 0, up = 0, down = 0;
    const cJSON *row;

    cJSON_ArrayForEach(row, sums) {
        requests += cmg_json_num(row, "requests", 0);
        up += cmg_json_num(row, "request_bytes", 0);
        down += cmg_json_num(row, "response_bytes", 0);
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
        "SELECT instance, TOTAL(CASE WHEN p = 'd' THEN bytes ELSE 0 END) AS today, "
        "TOTAL(CASE WHEN p = 'm' THEN bytes ELSE 0 END) AS month FROM ("
        "SELECT instance, 'd' AS p, egress_bytes AS bytes FROM traffic_day "
        "WHERE role = '' AND day = ? UNION ALL "
        "SELECT instance, 'm', egress_bytes FROM traffic_month WHERE role = '' AND month = ?) "
        "GROUP BY instance ORDER BY instance", "ss", b->day, b->month));
    double today = 0, month = 0, monthly = setting(b, "egress_monthly", 0);
    double daily = setting(b, "egress_daily", 0);
    const cJSON *row;

    cJSON_ArrayForEach(row, per) {
        today += cmg_json_num(row, "today", 0);
        month += cmg_json_num(row, "month", 0);
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

static cJSON *cert_doc(struct build *b, const char *kind, const char *name,
                       const char *serial, double not_after)
{
    cJSON *c = cJSON_CreateObject();

    cJSON_AddStringToObject(c, "kind", kind);
    cJSON_AddStringToObject(c, "name", name);
    cJSON_AddStringToObject(c, "serial", serial);
    cJSON_AddNumberToObject(c, "not_after", not_after);
    cJSON_AddNumberToObject(c, "days_left", floor((not_after - (double)b->now) / DAY_S));
    return c;
}

/* What the store holds in force (not revoked, not replaced by a renewal) and ending by
 * ?1, as 'cert list' names the kinds, in lower case. */
#define STORE_CERTS                                                                        \
    "SELECT CASE WHEN kind IS NULL THEN 'device' WHEN kind = 'CA' THEN 'ca' ELSE kind END " \
    "AS kind, name, serial, expires FROM certs WHERE revoked IS NULL AND replaced IS NULL "  \
    "AND expires > 0 AND expires <= ?1 AND (kind IS NULL OR kind IN ('CA', 'site', "        \
    "'gateway', 'connector', 'device')) UNION ALL SELECT 'connector', name, serial, "        \
    "expires FROM connectors WHERE revoked IS NULL AND expires > 0 AND expires <= ?1"

/* The certificate files of the site directory ('cert list' reads them the same way),
 * unless the store says they were revoked or replaced. */
static void file_certs(struct build *b, cJSON *list, int64_t horizon)
{
    cJSON *files = cJSON_CreateArray();
    const cJSON *c;
    char kind[16];

    cmg_site_cert_files(b->s, files);
    cJSON_ArrayForEach(c, files) {
        double end = cmg_json_num(c, "expires", 0);
        if (end <= 0 || end > (double)horizon ||
            count(b, cmg_store_query_json(b->s->store,
                "SELECT (SELECT count(*) FROM certs WHERE serial = ?1 AND (revoked IS NOT NULL "
                "OR replaced IS NOT NULL)) + (SELECT count(*) FROM connectors WHERE "
                "serial = ?1 AND revoked IS NOT NULL) AS n", "s", cmg_json_str(c, "serial"))) > 0)
            continue;
        snprintf(kind, sizeof(kind), "%s",
                 !strcmp(cmg_json_str(c, "kind"), "CA") ? "ca" : cmg_json_str(c, "kind"));
        cJSON_AddItemToArray(
            list, cert_doc(b, kind, cmg_json_str(c, "name"), cmg_json_str(c, "serial"), end));
    }
    cJSON_Delete(files);
}

/* The store's certificates ending by horizon: the CERTIFICATES_MAX soonest, read with
 * an ORDER BY and a LIMIT. Returns how many more there are. */
static double store_certs(struct build *b, cJSON *list, int64_t horizon)
{
    cJSON *r = rows(b, cmg_store_query_json(b->s->store,
        "SELECT * FROM (" STORE_CERTS ") ORDER BY expires, serial LIMIT ?2", "ii", horizon,
        (int64_t)CERTIFICATES_MAX));
    double all = count(b, cmg_store_query_json(b->s->store,
        "SELECT count(*) AS n FROM (" STORE_CERTS ")", "i", horizon));
    const cJSON *c;

    cJSON_ArrayForEach(c, r)
        cJSON_AddItemToArray(list, cert_doc(b, cmg_json_str(c, "kind"), cmg_json_str(c, "name"),
                                            cmg_json_str(c, "serial"),
                                            cmg_json_num(c, "expires", 0)));
    all -= cJSON_GetArraySize(r);
    cJSON_Delete(r);
    return all > 0 ? all : 0;
}

/* The certificates the gateways reported (their own, the CAs they trust), at most
 * CERTIFICATES_MAX of each. Returns how many more there are. */
static double reported_certs(struct build *b, cJSON *list, int64_t horizon)
{
    const cJSON *g, *c;
    double more = 0;

    cJSON_ArrayForEach(g, b->gateway_rows) {
        int n = 0;
        cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(g, "certificates")) {
            double end = cmg_json_num(c, "not_after", 0);
            cJSON *d;
            if (end <= 0 || end > (double)horizon)
                continue;
            if (n++ == CERTIFICATES_MAX) {
                more++;
                continue;
            }
            d = cert_doc(b, "reported", cmg_json_str(c, "name"), cmg_json_str(c, "serial"), end);
            cJSON_AddStringToObject(d, "instance", cmg_json_str(g, "instance"));
            cJSON_AddItemToArray(list, d);
        }
    }
    return more;
}

/* A certificate of list by its serial, as one spelling; rank: the order it came in. */
struct cert_key {
    char serial[80];
    size_t rank;
    cJSON *item;
};

static int by_serial_then_rank(const void *a, const void *b)
{
    const struct cert_key *x = a, *y = b;
    int c = strcmp(x->serial, y->serial);

    return c ? c : (x->rank > y->rank) - (x->rank < y->rank);
}

/* Each serial once (the first that came: the site's own before the reported ones);
 * certificates without a serial all kept. */
static void dedupe(struct build *b, cJSON *list)
{
    size_t n = (size_t)cJSON_GetArraySize(list), i = 0;
    struct cert_key *k = n ? calloc(n, sizeof(*k)) : NULL;
    cJSON *c;

    if (n && !k) {
        b->failed = b->out_of_memory = true;
        return;
    }
    cJSON_ArrayForEach(c, list) {
        serial_key(cmg_json_str(c, "serial"), k[i].serial, sizeof(k[i].serial));
        k[i].rank = i;
        k[i++].item = c;
    }
    if (n > 1)
        qsort(k, n, sizeof(*k), by_serial_then_rank);
    for (i = 1; i < n; i++)
        if (*k[i].serial && !strcmp(k[i].serial, k[i - 1].serial))
            cJSON_Delete(cJSON_DetachItemViaPointer(list, k[i].item));
    free(k);
}

static int by_not_after(const void *a, const void *b)
{
    double x = cmg_json_num(*(const cJSON *const *)a, "not_after", 0);
    double y = cmg_json_num(*(const cJSON *const *)b, "not_after", 0);
    return x < y ? -1 : x > y;
}

/* Those ending within cert_expiry_days, soonest first, at most CERTIFICATES_MAX; *more:
 * how many more there are. Nothing here reads all the certificates the site issued. */
static cJSON *certificates(struct build *b, double *more)
{
    cJSON *list = cJSON_CreateArray(), *extra;
    double days = setting(b, "cert_expiry_days", CMG_CERT_EXPIRY_DAYS_DEFAULT);
    double end = (double)b->now + days * DAY_S;
    int64_t horizon = end < 4e18 ? (int64_t)end : INT64_MAX / 2;

    file_certs(b, list, horizon);
    *more = store_certs(b, list, horizon);
    *more += reported_certs(b, list, horizon);
    dedupe(b, list);
    sorted(list, by_not_after);
    for (extra = cJSON_GetArrayItem(list, CERTIFICATES_MAX); extra;) {
        cJSON *next = extra->next;
        cJSON_Delete(cJSON_DetachItemViaPointer(list, extra));
        (*more)++;
        extra = next;
    }
    return list;
}

static cJSON *open_alerts(struct build *b)
{
    return rows(b, cmg_store_query_json(b->s->store,
        "SELECT id, kind, subject, level, message, value, threshold, opened, updated "
        "FROM alerts WHERE resolved IS NULL "
        "ORDER BY level = 'critical' DESC, opened, id", ""));
}

/* ---- the document ---- */

/* The string of item with each byte that is no part of a UTF-8 character as U+FFFD. */
static void replace_invalid_utf8(cJSON *item)
{
    const unsigned char *p = (const unsigned char *)item->valuestring;
    size_t n = strlen(item->valuestring), bad = 0, o = 0;
    char *fixed;

    for (size_t i = 0, k; i < n; i += k ? k : 1)
        bad += (k = cmg_utf8_char(p + i, n - i)) == 0;
    if (!bad || !(fixed = malloc(n + 2 * bad + 1)))
        return;
    for (size_t i = 0, k; i < n; i += k ? k : 1) {
        k = cmg_utf8_char(p + i, n - i);
        memcpy(fixed + o, k ? (const char *)p + i : "\xEF\xBF\xBD", k ? k : 3);
        o += k ? k : 3;
    }
    fixed[o] = 0;
    cJSON_SetValuestring(item, fixed);
    free(fixed);
}

/* Every string of a document as valid UTF-8 (the store keeps what was reported): a JSON
 * client cannot read a document that is not, nor should a terminal get raw bytes. */
static void valid_utf8(cJSON *item)
{
    for (; item; item = item->next) {
        if (cJSON_IsString(item) && item->valuestring)
            replace_invalid_utf8(item);
        valid_utf8(item->child);
    }
}

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
    double more;

    b->settings = rows(b, cmg_store_query_json(s->store,
                                               "SELECT name, value FROM alert_settings", ""));
    cJSON_AddNumberToObject(d, "time", (double)b->now);
    cJSON_AddNumberToObject(d, "report_interval", s->report_interval_s);
    cJSON_AddNumberToObject(d, "policy_version", (double)cmg_store_policy_version(s->store));
    cJSON_AddStringToObject(d, "service_name", s->service_name);
    cJSON_AddStringToObject(d, "site_role", s->site_role);
    cJSON_AddBoolToObject(d, "site_serving", cmg_site_serve_running(s->dir));
    cJSON_AddItemToObject(d, "gateways", gateways(b));
    more = count(b, cmg_store_query_json(s->store, "SELECT count(*) AS n FROM gateways", ""));
    cJSON_AddNumberToObject(d, "gateways_more", more > GATEWAYS_MAX ? more - GATEWAYS_MAX : 0);
    cJSON_AddItemToObject(d, "connectors", connectors(b));
    cJSON_AddItemToObject(d, "tunnels", tunnels(b));
    cJSON_AddItemToObject(d, "traffic", traffic(b));
    cJSON_AddItemToObject(d, "egress", egress(b));
    cJSON_AddNumberToObject(d, "cert_expiry_days",
                            setting(b, "cert_expiry_days", CMG_CERT_EXPIRY_DAYS_DEFAULT));
    cJSON_AddItemToObject(d, "certificates", certificates(b, &more));
    cJSON_AddNumberToObject(d, "certificates_more", more);
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
    if (b.out_of_memory)
        snprintf(msg, len, "out of memory making the status document");
    else if (b.failed)
        snprintf(msg, len, "store: %s", cmg_store_error(s->store));
    cmg_store_rollback(s->store);   /* read only: nothing to keep */
    cJSON_Delete(b.settings);
    cJSON_Delete(b.gateway_rows);
    cJSON_Delete(b.connector_rows);
    free(b.gateway_index.v);
    free(b.connector_index.v);
    if (b.failed || !doc) {
        cJSON_Delete(doc);
        return 500;
    }
    valid_utf8(doc);
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
        double p[4] = {cmg_json_num(row, "t", 0), cmg_json_num(row, "requests", 0),
                       cmg_json_num(row, "request_bytes", 0),
                       cmg_json_num(row, "response_bytes", 0)};
        if (!role || strcmp(role, cmg_json_str(row, "role"))) {
            cJSON *s = cJSON_CreateObject();
            role = cmg_json_str(row, "role");
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
        double p[2] = {cmg_json_num(row, "t", 0), cmg_json_num(row, "egress_bytes", 0)};
        cJSON_AddItemToArray(out, cJSON_CreateDoubleArray(p, 2));
    }
    return out;
}

#define SERIES_SQL(t, table, where)                                                        \
    "SELECT role, " t " AS t, TOTAL(requests) AS requests, TOTAL(request_bytes) AS "       \
    "request_bytes, TOTAL(response_bytes) AS response_bytes FROM " table " WHERE " where  \
    " AND role != '' AND (?3 = '' OR instance = ?3) GROUP BY role, t HAVING "              \
    "TOTAL(requests) + TOTAL(request_bytes) + TOTAL(response_bytes) > 0 ORDER BY role, t"
#define EGRESS_SQL(t, table, where)                                                        \
    "SELECT " t " AS t, TOTAL(egress_bytes) AS egress_bytes FROM " table " WHERE " where  \
    " AND role = '' AND (?3 = '' OR instance = ?3) GROUP BY t "                            \
    "HAVING TOTAL(egress_bytes) > 0 ORDER BY t"
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
    bool month;
    int64_t from;
    cJSON *doc;

    *out = NULL;
    range = range ? range : "day";
    month = !strcmp(range, "month");
    if (strcmp(range, "day") && !month) {
        snprintf(msg, len, "range: expected day or month, found '%.64s'", range);
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
    valid_utf8(doc);
    *out = doc;
    return 0;
}
