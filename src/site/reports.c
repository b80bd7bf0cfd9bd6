/* Reports from the gateways, carried by the connectors; see reports.h. */
#include "site/reports.h"

#include "core/log.h"
#include "core/metrics.h"
#include "site/ops.h"

#include <math.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_COUNT 9007199254740992.0   /* 2^53: what a JSON number holds exactly */

/* Role counters: r1xx .. r5xx, rother, request_bytes, response_bytes. */
#define ROLE_N (CMG_METRICS_CLASSES + 2)
/* The whole gateway's: device_connections, egress_bytes, ingress_bytes. */
#define GW_N 3
#define MAX_N ROLE_N
static const char *const gw_names[GW_N] = {"device_connections", "egress_bytes", "ingress_bytes"};

/* ---- checking ---- */

static const cJSON *get(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

static bool count_ok(const cJSON *v)
{
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble >= 0 &&
           v->valuedouble <= MAX_COUNT && v->valuedouble == floor(v->valuedouble);
}

/* Printable ASCII (0x20..0x7e) only: what is kept is shown to operators and logged. */
static bool printable(const char *s, size_t max)
{
    size_t n = 0;

    for (; s[n]; n++)
        if (n == max || (unsigned char)s[n] < 0x20 || (unsigned char)s[n] > 0x7e)
            return false;
    return true;
}

static bool str_ok(const cJSON *v, bool nonempty)
{
    return cJSON_IsString(v) && printable(v->valuestring, CMG_REPORT_MAX_STR) &&
           (v->valuestring[0] || !nonempty);
}

/* v is one of the nul-terminated list of words. */
static bool one_of(const cJSON *v, const char *const *words)
{
    for (; cJSON_IsString(v) && *words; words++)
        if (!strcmp(v->valuestring, *words))
            return true;
    return false;
}

/* ---- a set of names, by hash: one lookup per role, not one scan of all of them ---- */

struct name_index {
    const cJSON **slot;      /* items by hash of their key (linear probing) */
    size_t mask;
};

static uint64_t hash_name(const char *s)
{
    uint64_t h = 1469598103934665603ULL;   /* FNV-1a */

    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

/* Room for n items, half full at most. 0 or -1. */
static int index_init(struct name_index *x, size_t n)
{
    size_t cap = 16;

    while (cap < 2 * n)
        cap *= 2;
    x->mask = cap - 1;
    return (x->slot = calloc(cap, sizeof(*x->slot))) ? 0 : -1;
}

static const char *key_of(const cJSON *item, const char *field)
{
    return field ? get(item, field)->valuestring : item->string;
}

/* The item named name (its member field, or its own key when field is NULL), or NULL;
 * with add, item goes in when there is none. */
static const cJSON *index_find(struct name_index *x, const char *name, const char *field,
                               const cJSON *add)
{
    size_t i = hash_name(name) & x->mask;

    for (; x->slot[i]; i = (i + 1) & x->mask)
        if (!strcmp(key_of(x->slot[i], field), name))
            return x->slot[i];
    if (add)
        x->slot[i] = add;
    return NULL;
}

static bool hex16(const cJSON *v)
{
    const char *s = cJSON_IsString(v) ? v->valuestring : "";
    size_t n = 0;

    for (; s[n]; n++)
        if (!((s[n] >= '0' && s[n] <= '9') || (s[n] >= 'a' && s[n] <= 'f')))
            return false;
    return n == 16;
}

/* Each of names a count in o; NULL, or the one that is not. */
static const char *counts_ok(const cJSON *o, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!count_ok(get(o, names[i])))
            return names[i];
    return NULL;
}

/* Each of names a string (of 1 byte at least if nonempty) in o; NULL, or the one not. */
static const char *strs_ok(const cJSON *o, const char *const *names, size_t n, bool nonempty)
{
    for (size_t i = 0; i < n; i++)
        if (!str_ok(get(o, names[i]), nonempty))
            return names[i];
    return NULL;
}

/* An array of at most max objects. */
static bool array_ok(const cJSON *a, int max)
{
    const cJSON *e;

    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) > max)
        return false;
    cJSON_ArrayForEach(e, a) if (!cJSON_IsObject(e)) return false;
    return true;
}

#define N(a) (sizeof(a) / sizeof((a)[0]))

static int fail(char *err, size_t errlen, const char *fmt, const char *what)
{
    snprintf(err, errlen, fmt, what);
    return -1;
}

#define MAX_SEQ 4294967296.0   /* 2^32: a report a second for 136 years; more is forged */

static int check_role(const cJSON *r, struct name_index *seen, char *err, size_t errlen)
{
    static const char *const bytes[] = {"request_bytes", "response_bytes"};
    const cJSON *id = get(r, "role"), *req = get(r, "requests");
    const char *bad = "1xx";

    if (!str_ok(id, true) || !cmg_site_role_valid(id->valuestring))
        return fail(err, errlen, "roles: a role id (letters, digits, '_', '-'; 1 to 64) "
                    "expected%s", "");
    if (!cJSON_IsObject(req) ||
        (bad = counts_ok(req, cmg_metrics_class_names, CMG_METRICS_CLASSES)))
        return fail(err, errlen, "roles: requests.%s: a whole number from 0 to 2^53 expected",
                    cJSON_IsObject(req) ? bad : "1xx");
    if ((bad = counts_ok(r, bytes, N(bytes))))
        return fail(err, errlen, "roles: %s: a whole number from 0 to 2^53 expected", bad);
    if (index_find(seen, id->valuestring, "role", r))
        return fail(err, errlen, "roles: role %s twice", id->valuestring);
    return 0;
}

static int check_roles(const cJSON *roles, char *err, size_t errlen)
{
    struct name_index seen;
    const cJSON *e;
    int rc = 0;

    if (index_init(&seen, (size_t)cJSON_GetArraySize(roles)) < 0)
        return fail(err, errlen, "roles: out of memory%s", "");
    cJSON_ArrayForEach(e, roles) if ((rc = check_role(e, &seen, err, errlen)) < 0) break;
    free(seen.slot);
    return rc;
}

int cmg_report_check_gateway(const cJSON *g, char *err, size_t errlen)
{
    static const char *const counts[] = {"seq", "started", "time", "interval", "policy_version",
                                         "device_connections", "devices_now", "egress_bytes",
                                         "ingress_bytes"};
    static const char *const tun_strs[] = {"connector", "peer"};
    static const char *const cert_strs[] = {"name", "subject", "serial"};
    static const char *const since[] = {"since"}, *const not_after[] = {"not_after"};
    static const char *const states[] = {"starting", "serving", "draining", NULL};
    static const char *const tunnel_states[] = {"up", "draining", NULL};
    const cJSON *roles = get(g, "roles"), *refusals = get(g, "refusals");
    const cJSON *e;
    const char *bad;

    if (!str_ok(get(g, "instance"), true))
        return fail(err, errlen, "gateway report: instance: 1 to 256 printable ASCII characters "
                    "expected%s", "");
    if (!hex16(get(g, "boot")))
        return fail(err, errlen, "gateway report: boot: 16 hex digits expected%s", "");
    if ((bad = counts_ok(g, counts, N(counts))))
        return fail(err, errlen, "gateway report: %s: a whole number from 0 to 2^53 expected", bad);
    if (get(g, "seq")->valuedouble < 1 || get(g, "seq")->valuedouble > MAX_SEQ)
        return fail(err, errlen, "gateway report: seq: 1 to 2^32 expected%s", "");
    if (!one_of(get(g, "state"), states))
        return fail(err, errlen, "gateway report: state: starting, serving or draining expected%s", "");
    if (!array_ok(roles, CMG_REPORT_MAX_ROLES))
        return fail(err, errlen, "gateway report: roles: an array of at most 4097 objects expected%s", "");
    if (check_roles(roles, err, errlen) < 0)
        return -1;
    if (!cJSON_IsObject(refusals) || cJSON_GetArraySize(refusals) > CMG_REPORT_MAX_REFUSALS)
        return fail(err, errlen, "gateway report: refusals: an object of at most 65 counts expected%s", "");
    cJSON_ArrayForEach(e, refusals) if (!count_ok(e) || !printable(e->string, CMG_REPORT_MAX_STR))
        return fail(err, errlen, "gateway report: refusals: counts by reason token expected%s", "");
    if (!array_ok(get(g, "tunnels"), CMG_REPORT_MAX_TUNNELS))
        return fail(err, errlen, "gateway report: tunnels: an array of at most 64 objects expected%s", "");
    cJSON_ArrayForEach(e, get(g, "tunnels")) {
        if ((bad = strs_ok(e, tun_strs, N(tun_strs), false)) || (bad = counts_ok(e, since, 1)))
            return fail(err, errlen, "gateway report: tunnels: %s missing or malformed", bad);
        if (!one_of(get(e, "state"), tunnel_states))
            return fail(err, errlen, "gateway report: tunnels: state: up or draining expected%s", "");
    }
    if (!array_ok(get(g, "certificates"), CMG_REPORT_MAX_CERTS))
        return fail(err, errlen, "gateway report: certificates: an array of at most 16 objects expected%s", "");
    cJSON_ArrayForEach(e, get(g, "certificates"))
        if ((bad = strs_ok(e, cert_strs, N(cert_strs), false)) || (bad = counts_ok(e, not_after, 1)))
            return fail(err, errlen, "gateway report: certificates: %s missing or malformed", bad);
    return 0;
}

static int check_connector_tunnel(const cJSON *t, char *err, size_t errlen)
{
    static const char *const strs[] = {"gateway", "instance"};
    static const char *const counts[] = {"reconnects"};
    static const char *const states[] = {"up", "connecting", "down", "draining", NULL};
    const cJSON *rtt = get(t, "rtt_ms"), *since = get(t, "since");
    const char *bad;

    if ((bad = strs_ok(t, strs, N(strs), false)) || (bad = counts_ok(t, counts, N(counts))))
        return fail(err, errlen, "tunnels: %s missing or malformed", bad);
    if (!cJSON_IsNull(since) && !count_ok(since))   /* null: never came up */
        return fail(err, errlen, "tunnels: since: null or unix seconds expected%s", "");
    if (!one_of(get(t, "state"), states))
        return fail(err, errlen, "tunnels: state: up, connecting, down or draining expected%s", "");
    if (rtt && !cJSON_IsNull(rtt) &&
        !(cJSON_IsNumber(rtt) && isfinite(rtt->valuedouble) && rtt->valuedouble >= 0 &&
          rtt->valuedouble <= MAX_COUNT))
        return fail(err, errlen, "tunnels: rtt_ms: null or a number of milliseconds expected%s", "");
    return 0;
}

cJSON *cmg_report_json(const char *body, size_t len)
{
    const char *end = NULL;
    cJSON *doc = cJSON_ParseWithLengthOpts(body, len, &end, 0);

    while (doc && end < body + len && (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n'))
        end++;
    if (doc && end != body + len) {   /* something after the document */
        cJSON_Delete(doc);
        doc = NULL;
    }
    return doc;
}

cJSON *cmg_report_parse(const char *body, size_t len, char *err, size_t errlen)
{
    static const char *const counts[] = {"time", "interval", "policy_version"};
    cJSON *doc = len <= CMG_REPORT_MAX_BODY ? cmg_report_json(body, len) : NULL;
    const cJSON *e, *name;
    const char *bad;
    int rc = -1;

    if (!cJSON_IsObject(doc)) {
        snprintf(err, errlen, "a JSON object of at most %u bytes expected", CMG_REPORT_MAX_BODY);
        goto out;
    }
    name = get(doc, "connector");
    if (name && !str_ok(name, false)) {
        snprintf(err, errlen, "connector: at most 256 printable ASCII characters expected");
        goto out;
    }
    if ((bad = counts_ok(doc, counts, N(counts)))) {
        snprintf(err, errlen, "%s: a whole number from 0 to 2^53 expected", bad);
        goto out;
    }
    if (!cJSON_IsBool(get(doc, "draining"))) {
        snprintf(err, errlen, "draining: true or false expected");
        goto out;
    }
    if (!array_ok(get(doc, "tunnels"), CMG_REPORT_MAX_TUNNELS)) {
        snprintf(err, errlen, "tunnels: an array of at most %d objects expected",
                 CMG_REPORT_MAX_TUNNELS);
        goto out;
    }
    cJSON_ArrayForEach(e, get(doc, "tunnels")) if (check_connector_tunnel(e, err, errlen) < 0)
        goto out;
    if (!array_ok(get(doc, "gateway_reports"), CMG_REPORT_MAX_GATEWAYS)) {
        snprintf(err, errlen, "gateway_reports: an array of at most %d objects expected",
                 CMG_REPORT_MAX_GATEWAYS);
        goto out;
    }
    cJSON_ArrayForEach(e, get(doc, "gateway_reports")) if (cmg_report_check_gateway(e, err, errlen) < 0)
        goto out;
    rc = 0;
out:
    if (rc < 0) {
        cJSON_Delete(doc);
        doc = NULL;
    }
    return doc;
}

/* ---- counting ---- */

size_t cmg_report_delta(const uint64_t *before, const uint64_t *now, size_t n, uint64_t *delta)
{
    size_t down = 0;

    for (size_t i = 0; i < n; i++) {
        delta[i] = now[i] >= before[i] ? now[i] - before[i] : 0;
        down += now[i] < before[i];
    }
    return down;
}

static uint64_t count_of(const cJSON *o, const char *name)
{
    const cJSON *v = get(o, name);

    return count_ok(v) ? (uint64_t)v->valuedouble : 0;
}

static void role_counts(const cJSON *r, uint64_t *c)
{
    const cJSON *req = get(r, "requests");

    for (unsigned i = 0; i < CMG_METRICS_CLASSES; i++)
        c[i] = count_of(req, cmg_metrics_class_names[i]);
    c[CMG_METRICS_CLASSES] = count_of(r, "request_bytes");
    c[CMG_METRICS_CLASSES + 1] = count_of(r, "response_bytes");
}

/* Stored counters: {"t": report time, "g": [GW_N], "r": {role: [ROLE_N]}}. */
static void array_counts(const cJSON *a, uint64_t *c, size_t n)
{
    const cJSON *v;
    size_t i = 0;

    memset(c, 0, n * sizeof(*c));
    cJSON_ArrayForEach(v, a) {
        if (i == n)
            break;
        c[i++] = count_ok(v) ? (uint64_t)v->valuedouble : 0;
    }
}

static cJSON *counts_array(const uint64_t *c, size_t n)
{
    cJSON *a = cJSON_CreateArray();

    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber((double)c[i]));
    return a;
}

/* The most a counter can plausibly grow in dt seconds: 12.5 GB/s (100 Gbit/s) for bytes,
 * 10^7 a second for requests and connections. What is more is clamped (logged), so that
 * no sum in the store comes near 2^63 whatever a report says. */
#define MAX_BYTES_PER_S 12500000000ULL
#define MAX_EVENTS_PER_S 10000000ULL

static uint64_t clamp_growth(uint64_t *delta, size_t n, size_t first_bytes, uint64_t dt)
{
    uint64_t clamped = 0;

    for (size_t i = 0; i < n; i++) {
        uint64_t most = dt * (i >= first_bytes ? MAX_BYTES_PER_S : MAX_EVENTS_PER_S);
        if (delta[i] > most) {
            clamped++;
            delta[i] = most;
        }
    }
    return clamped;
}

/* ---- the store ---- */

/* What one connector's report may make the site keep: new boots (each new instance is
 * one) per connector per hour, and instances in all. */
#define NEW_BOOTS_PER_HOUR 64
#define MAX_INSTANCES 1024
#define QUOTA_CONNECTORS 256

struct quota {
    char connector[CMG_REPORT_MAX_STR + 1];
    int64_t hour;
    unsigned new_boots;
    bool told_boots, told_forged;
};

static struct quota quotas[QUOTA_CONNECTORS];   /* the site's loop is the only user */
static bool told_instances;

static struct quota *quota_of(const char *connector, int64_t now)
{
    struct quota *q = NULL;

    for (size_t i = 0; i < QUOTA_CONNECTORS && !q; i++)
        if (!strcmp(quotas[i].connector, connector))
            q = &quotas[i];
    for (size_t i = 0; i < QUOTA_CONNECTORS && !q; i++)   /* a free or a stale entry */
        if (!quotas[i].connector[0] || quotas[i].hour != now / 3600)
            q = &quotas[i];
    if (!q)
        q = &quotas[(size_t)hash_name(connector) % QUOTA_CONNECTORS];
    if (strcmp(q->connector, connector) || q->hour != now / 3600) {
        memset(q, 0, sizeof(*q));
        snprintf(q->connector, sizeof(q->connector), "%s", connector);
        q->hour = now / 3600;
    }
    return q;
}

/* One ingest's statements, prepared once (a report holds up to 4097 roles × 3 tables). */
enum { ADD_5M, ADD_DAY, ADD_MONTH, LAST_SEEN, KEEP_BOOT, KEEP_GATEWAY, INSTANCE_KNOWN,
       INSTANCES, NSTMT };

#define ADD_SQL(table, key)                                                                     \
    "INSERT INTO " table " (instance, role, " key ", requests, r1xx, r2xx, r3xx, r4xx, r5xx,"    \
    " rother, request_bytes, response_bytes, device_connections, egress_bytes, ingress_bytes)"  \
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"                                     \
    " ON CONFLICT (instance, role, " key ") DO UPDATE SET requests = requests + excluded.requests," \
    " r1xx = r1xx + excluded.r1xx, r2xx = r2xx + excluded.r2xx,"                                \
    " r3xx = r3xx + excluded.r3xx, r4xx = r4xx + excluded.r4xx,"                                \
    " r5xx = r5xx + excluded.r5xx, rother = rother + excluded.rother,"                          \
    " request_bytes = request_bytes + excluded.request_bytes,"                                  \
    " response_bytes = response_bytes + excluded.response_bytes,"                               \
    " device_connections = device_connections + excluded.device_connections,"                   \
    " egress_bytes = egress_bytes + excluded.egress_bytes,"                                     \
    " ingress_bytes = ingress_bytes + excluded.ingress_bytes"

static const char *const stmt_sql[NSTMT] = {
    [ADD_5M] = ADD_SQL("traffic_5m", "bucket"),
    [ADD_DAY] = ADD_SQL("traffic_day", "day"),
    [ADD_MONTH] = ADD_SQL("traffic_month", "month"),
    [LAST_SEEN] = "SELECT seq, counters FROM report_boots WHERE instance = ? AND boot = ?",
    [KEEP_BOOT] = "INSERT OR REPLACE INTO report_boots (instance, boot, seq, counters, received)"
                  " VALUES (?, ?, ?, ?, ?)",
    /* a new boot is the one the site heard of last (not the one that says it started
     * last: a gateway's clock may step back) */
    [KEEP_GATEWAY] =
        "INSERT INTO gateways (instance, boot, seq, state, policy_version, started,"
        " report_time, received, interval, devices_now, via, tunnels, certificates)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (instance) DO UPDATE SET"
        " boot = excluded.boot, seq = excluded.seq, state = excluded.state,"
        " policy_version = excluded.policy_version, started = excluded.started,"
        " report_time = excluded.report_time, received = excluded.received,"
        " interval = excluded.interval, devices_now = excluded.devices_now, via = excluded.via,"
        " tunnels = excluded.tunnels, certificates = excluded.certificates"
        " WHERE (excluded.boot = gateways.boot AND excluded.seq > gateways.seq) OR"
        " (excluded.boot <> gateways.boot AND ?14)",
    [INSTANCE_KNOWN] = "SELECT 1 FROM gateways WHERE instance = ?",
    [INSTANCES] = "SELECT count(*) FROM gateways",
};

struct ingest {
    sqlite3 *db;
    sqlite3_stmt *st[NSTMT];
    const char *via;         /* the connector's certificate name */
    int64_t now;
    struct quota *quota;
};

static int ingest_open(struct ingest *in, sqlite3 *db, const char *via, int64_t now)
{
    memset(in, 0, sizeof(*in));
    in->db = db;
    in->via = via;
    in->now = now;
    in->quota = quota_of(via, now);
    for (int i = 0; i < NSTMT; i++)
        if (sqlite3_prepare_v2(db, stmt_sql[i], -1, &in->st[i], NULL) != SQLITE_OK)
            return -1;
    return 0;
}

static void ingest_close(struct ingest *in)
{
    for (int i = 0; i < NSTMT; i++)
        sqlite3_finalize(in->st[i]);
}

/* The statement, ready to bind. */
static sqlite3_stmt *use(struct ingest *in, int which)
{
    sqlite3_reset(in->st[which]);
    sqlite3_clear_bindings(in->st[which]);
    return in->st[which];
}

static int run(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;

    sqlite3_reset(st);
    return rc;
}

static bool all_zero(const uint64_t *c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (c[i])
            return false;
    return true;
}

/* Adds role's growth (ROLE_N, or NULL) and the gateway's (GW_N, or NULL) to a row of
 * table which, keyed by key (text) or bucket. */
static int add_traffic(struct ingest *in, int which, const char *key, int64_t bucket,
                       const char *instance, const char *role, const uint64_t *rc,
                       const uint64_t *gc)
{
    static const uint64_t zero[MAX_N];
    sqlite3_stmt *st = use(in, which);
    uint64_t requests = 0;

    rc = rc ? rc : zero;
    gc = gc ? gc : zero;
    for (unsigned i = 0; i < CMG_METRICS_CLASSES; i++)
        requests += rc[i];
    sqlite3_bind_text(st, 1, instance, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, role, -1, SQLITE_STATIC);
    if (key)
        sqlite3_bind_text(st, 3, key, -1, SQLITE_STATIC);
    else
        sqlite3_bind_int64(st, 3, bucket);
    sqlite3_bind_int64(st, 4, (int64_t)requests);
    for (int i = 0; i < ROLE_N; i++)
        sqlite3_bind_int64(st, 5 + i, (int64_t)rc[i]);
    for (int i = 0; i < GW_N; i++)
        sqlite3_bind_int64(st, 5 + ROLE_N + i, (int64_t)gc[i]);
    return run(st);
}

/* The growth into the report's 5-minute bucket, its day and its month (UTC). */
static int add_everywhere(struct ingest *in, int64_t t, const char *instance, const char *role,
                          const uint64_t *rc, const uint64_t *gc)
{
    time_t tt = (time_t)t;
    struct tm tm;
    char day[16], month[16];

    if (!gmtime_r(&tt, &tm))
        return -1;
    strftime(day, sizeof(day), "%Y-%m-%d", &tm);
    strftime(month, sizeof(month), "%Y-%m", &tm);
    if (add_traffic(in, ADD_5M, NULL, t - t % CMG_REPORT_BUCKET_S, instance, role, rc, gc) < 0 ||
        add_traffic(in, ADD_DAY, day, 0, instance, role, rc, gc) < 0 ||
        add_traffic(in, ADD_MONTH, month, 0, instance, role, rc, gc) < 0)
        return -1;
    return 0;
}

/* The last seen seq and counters of (instance, boot): 1 found, 0 not, -1 error. */
static int last_seen(struct ingest *in, const char *instance, const char *boot, uint64_t *seq,
                     cJSON **counters)
{
    sqlite3_stmt *st = use(in, LAST_SEEN);
    int rc = -1, step;

    *counters = NULL;
    sqlite3_bind_text(st, 1, instance, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, boot, -1, SQLITE_STATIC);
    step = sqlite3_step(st);
    if (step == SQLITE_ROW) {
        *seq = (uint64_t)sqlite3_column_int64(st, 0);
        *counters = cJSON_Parse((const char *)sqlite3_column_text(st, 1));
        rc = 1;
    } else if (step == SQLITE_DONE) {
        rc = 0;
    }
    sqlite3_reset(st);
    return rc;
}

static int64_t count_query(struct ingest *in, int which, const char *key)
{
    sqlite3_stmt *st = use(in, which);
    int64_t n = -1;

    if (key)
        sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW)
        n = sqlite3_column_int64(st, 0);
    else
        n = 0;   /* no row */
    sqlite3_reset(st);
    return n;
}

/* What the counters grew by since the last report of this boot (a new boot: since it
 * started), added; now_counters the counters to keep. *down: how many went down,
 * *clamped: how many grew past what dt allows. */
static int add_growth(struct ingest *in, const cJSON *g, const cJSON *before, int64_t t,
                      cJSON *now_counters, size_t *down, uint64_t *clamped)
{
    const char *instance = get(g, "instance")->valuestring;
    int64_t since = before ? (int64_t)count_of(before, "t") : (int64_t)count_of(g, "started");
    int64_t span = t - since;
    uint64_t dt = span < 1 ? 1 : span > CMG_REPORT_DAY_KEEP_S ? CMG_REPORT_DAY_KEEP_S : (uint64_t)span;
    uint64_t was[MAX_N], is[MAX_N], delta[MAX_N];
    struct name_index stored = {0};
    const cJSON *r;
    cJSON *kept_roles;
    int rc = -1;

    cJSON_AddNumberToObject(now_counters, "t", (double)t);
    kept_roles = cJSON_AddObjectToObject(now_counters, "r");
    for (int i = 0; i < GW_N; i++)
        is[i] = count_of(g, gw_names[i]);
    array_counts(get(before, "g"), was, GW_N);
    *down += cmg_report_delta(was, is, GW_N, delta);
    *clamped += clamp_growth(delta, GW_N, 1, dt);
    cJSON_AddItemToObject(now_counters, "g", counts_array(is, GW_N));
    if (!all_zero(delta, GW_N) && add_everywhere(in, t, instance, "", NULL, delta) < 0)
        return -1;
    if (index_init(&stored, (size_t)cJSON_GetArraySize(get(before, "r"))) < 0)
        return -1;
    cJSON_ArrayForEach(r, get(before, "r")) if (r->string) index_find(&stored, r->string, NULL, r);
    cJSON_ArrayForEach(r, get(g, "roles")) {
        const char *role = get(r, "role")->valuestring;
        role_counts(r, is);
        array_counts(index_find(&stored, role, NULL, NULL), was, ROLE_N);
        *down += cmg_report_delta(was, is, ROLE_N, delta);
        *clamped += clamp_growth(delta, ROLE_N, CMG_METRICS_CLASSES, dt);
        cJSON_AddItemToObject(kept_roles, role, counts_array(is, ROLE_N));
        if (!all_zero(delta, ROLE_N) && add_everywhere(in, t, instance, role, delta, NULL) < 0)
            goto out;
    }
    rc = 0;
out:
    free(stored.slot);
    return rc;
}

static int keep_gateway(struct ingest *in, const cJSON *g, bool new_boot)
{
    sqlite3_stmt *st = use(in, KEEP_GATEWAY);
    char *tunnels = cJSON_PrintUnformatted(get(g, "tunnels"));
    char *certs = cJSON_PrintUnformatted(get(g, "certificates"));
    int rc = -1;

    if (tunnels && certs) {
        sqlite3_bind_text(st, 1, get(g, "instance")->valuestring, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, get(g, "boot")->valuestring, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, (int64_t)count_of(g, "seq"));
        sqlite3_bind_text(st, 4, get(g, "state")->valuestring, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (int64_t)count_of(g, "policy_version"));
        sqlite3_bind_int64(st, 6, (int64_t)count_of(g, "started"));
        sqlite3_bind_int64(st, 7, (int64_t)count_of(g, "time"));
        sqlite3_bind_int64(st, 8, in->now);
        sqlite3_bind_int64(st, 9, (int64_t)count_of(g, "interval"));
        sqlite3_bind_int64(st, 10, (int64_t)count_of(g, "devices_now"));
        sqlite3_bind_text(st, 11, in->via, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 12, tunnels, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 13, certs, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 14, new_boot);
        rc = run(st);
    }
    free(tunnels);
    free(certs);
    return rc;
}

static int keep_boot(struct ingest *in, const cJSON *g, const cJSON *counters)
{
    sqlite3_stmt *st = use(in, KEEP_BOOT);
    char *text = cJSON_PrintUnformatted(counters);
    int rc = -1;

    if (text) {
        sqlite3_bind_text(st, 1, get(g, "instance")->valuestring, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, get(g, "boot")->valuestring, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, (int64_t)count_of(g, "seq"));
        sqlite3_bind_text(st, 4, text, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, in->now);
        rc = run(st);
    }
    free(text);
    return rc;
}

/* The report lists the connector that carried it with a tunnel held: a connector is
 * trusted with the reports of the gateways it holds tunnels to, as with their traffic. */
static bool carried_by_its_connector(const cJSON *g, const char *via)
{
    const cJSON *t;

    cJSON_ArrayForEach(t, get(g, "tunnels")) if (!strcmp(get(t, "connector")->valuestring, via))
        return true;
    return false;
}

/* A report the site may take: 1 yes, 0 no (logged once per connector and hour), -1 error. */
static int admissible(struct ingest *in, const cJSON *g, bool new_boot)
{
    const char *instance = get(g, "instance")->valuestring;
    struct quota *q = in->quota;
    int64_t known, n;

    if (!carried_by_its_connector(g, in->via)) {
        if (!q->told_forged)
            cmg_warn("report of gateway %s via connector %s ignored: it lists no tunnel to %s "
                     "(a connector carries only the reports of gateways it holds a tunnel to)",
                     instance, in->via, in->via);
        q->told_forged = true;
        return 0;
    }
    if (!new_boot)
        return 1;
    if (q->new_boots >= NEW_BOOTS_PER_HOUR) {
        if (!q->told_boots)
            cmg_warn("reports via connector %s: more than %d new gateway boots this hour; "
                     "the reports of new ones are ignored until the next hour", in->via,
                     NEW_BOOTS_PER_HOUR);
        q->told_boots = true;
        return 0;
    }
    if ((known = count_query(in, INSTANCE_KNOWN, instance)) < 0 ||
        (n = count_query(in, INSTANCES, NULL)) < 0)
        return -1;
    if (!known && n >= MAX_INSTANCES) {
        if (!told_instances)
            cmg_warn("reports: the site keeps at most %d gateway instances; %s (via connector "
                     "%s) and any other new one ignored until one is pruned (report_retention)",
                     MAX_INSTANCES, instance, in->via);
        told_instances = true;
        return 0;
    }
    told_instances = told_instances && n >= MAX_INSTANCES;
    if (!known)
        cmg_info("reports: new gateway instance %s (via connector %s)", instance, in->via);
    q->new_boots++;
    return 1;
}

/* One gateway report: counted once per (instance, boot, seq). */
static int ingest_gateway(struct ingest *in, const cJSON *g)
{
    const char *instance = get(g, "instance")->valuestring, *boot = get(g, "boot")->valuestring;
    uint64_t seq = count_of(g, "seq"), last = 0, clamped = 0;
    int64_t t = (int64_t)count_of(g, "time");
    cJSON *before = NULL, *counters = cJSON_CreateObject();
    size_t down = 0;
    int found, ok, rc = -1;

    if ((found = last_seen(in, instance, boot, &last, &before)) < 0 || !counters)
        goto out;
    if (found && seq <= last) {
        cmg_debug("report of gateway %s boot %s seq %llu via %s: seen already", instance, boot,
                  (unsigned long long)seq, in->via);
        rc = 0;
        goto out;
    }
    if ((ok = admissible(in, g, !found)) <= 0) {
        rc = ok;
        goto out;
    }
    if (t > in->now || t <= 0)
        t = in->now;   /* a clock ahead: the site's */
    if (add_growth(in, g, before, t, counters, &down, &clamped) < 0 ||
        keep_boot(in, g, counters) < 0 || keep_gateway(in, g, !found) < 0)
        goto out;
    if (down)
        cmg_warn("report of gateway %s boot %s seq %llu: %zu counter(s) went down within a boot: "
                 "taken as a new baseline (nothing counted for them)", instance, boot,
                 (unsigned long long)seq, down);
    if (clamped)
        cmg_warn("report of gateway %s boot %s seq %llu via %s: %llu counter(s) grew faster than "
                 "100 Gbit/s or 10^7 requests a second since the last report: counted as that",
                 instance, boot, (unsigned long long)seq, in->via, (unsigned long long)clamped);
    cmg_debug("report of gateway %s boot %s seq %llu via %s kept", instance, boot,
              (unsigned long long)seq, in->via);
    rc = 0;
out:
    cJSON_Delete(before);
    cJSON_Delete(counters);
    return rc;
}

static bool exists(sqlite3 *db, const char *sql, const char *key)
{
    sqlite3_stmt *st = NULL;
    bool found = false;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_text(st, 1, key, -1, SQLITE_TRANSIENT);
        found = sqlite3_step(st) == SQLITE_ROW;
    }
    sqlite3_finalize(st);
    return found;
}

static sqlite3_stmt *prepare(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st = NULL;

    return sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK ? st : NULL;
}

static int done(sqlite3_stmt *st)
{
    int rc = st && sqlite3_step(st) == SQLITE_DONE ? 0 : -1;

    sqlite3_finalize(st);
    return rc;
}

static int keep_connector(sqlite3 *db, const char *connector, const cJSON *doc, int64_t now)
{
    sqlite3_stmt *st = prepare(db, "INSERT OR REPLACE INTO connector_reports (connector, received,"
                                   " report_time, interval, draining, policy_version, tunnels)"
                                   " VALUES (?, ?, ?, ?, ?, ?, ?)");
    char *tunnels = cJSON_PrintUnformatted(get(doc, "tunnels"));
    int rc = -1;

    if (!exists(db, "SELECT 1 FROM connector_reports WHERE connector = ?", connector))
        cmg_info("reports: first report of connector %s", connector);
    if (st && tunnels) {
        sqlite3_bind_text(st, 1, connector, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 2, now);
        sqlite3_bind_int64(st, 3, (int64_t)count_of(doc, "time"));
        sqlite3_bind_int64(st, 4, (int64_t)count_of(doc, "interval"));
        sqlite3_bind_int(st, 5, cJSON_IsTrue(get(doc, "draining")));
        sqlite3_bind_int64(st, 6, (int64_t)count_of(doc, "policy_version"));
        sqlite3_bind_text(st, 7, tunnels, -1, SQLITE_TRANSIENT);
        rc = done(st);
    } else {
        sqlite3_finalize(st);
    }
    free(tunnels);
    return rc;
}

int cmg_report_ingest(struct cmg_store *s, const char *connector, const cJSON *doc, int64_t now,
                      char *err, size_t errlen)
{
    sqlite3 *db = cmg_store_db(s);
    struct ingest in = {0};
    const cJSON *g;
    int rc = -1;

    if (cmg_store_begin(s) < 0)
        goto out;
    if (ingest_open(&in, db, connector, now) < 0 || keep_connector(db, connector, doc, now) < 0)
        goto out;
    cJSON_ArrayForEach(g, get(doc, "gateway_reports")) if (ingest_gateway(&in, g) < 0)
        goto out;
    rc = 0;
out:
    if (rc < 0)
        snprintf(err, errlen, "store: %s", sqlite3_errmsg(db));
    ingest_close(&in);
    if (rc == 0 && cmg_store_commit(s) < 0) {
        snprintf(err, errlen, "store: %s", sqlite3_errmsg(db));
        rc = -1;
    }
    if (rc < 0)
        cmg_store_rollback(s);
    return rc;
}

/* One statement of the prune, with its bound limits (text or integer). */
static int prune_step(sqlite3 *db, const char *sql, const char *text, int64_t a, int64_t b)
{
    sqlite3_stmt *st = prepare(db, sql);

    if (!st)
        return -1;
    if (text)
        sqlite3_bind_text(st, 1, text, -1, SQLITE_TRANSIENT);
    else
        sqlite3_bind_int64(st, 1, a);
    sqlite3_bind_int64(st, 2, b);
    return done(st);
}

int cmg_report_prune(struct cmg_store *s, int64_t now, int64_t retention_s)
{
    sqlite3 *db = cmg_store_db(s);
    time_t day_limit = (time_t)(now - CMG_REPORT_DAY_KEEP_S);
    int64_t old = now - retention_s, ancient = now - CMG_REPORT_DAY_KEEP_S;
    struct tm tm;
    char day[16];
    int rc = -1;

    if (!gmtime_r(&day_limit, &tm))
        return -1;
    strftime(day, sizeof(day), "%Y-%m-%d", &tm);
    if (cmg_store_begin(s) < 0)
        return -1;
    /* each instance's latest boot stays (400 days): a gateway silent for longer than
     * report_retention is not counted from zero when it comes back */
    if (prune_step(db, "DELETE FROM traffic_5m WHERE bucket < ?", NULL, old, 0) < 0 ||
        prune_step(db, "DELETE FROM report_boots WHERE received < ?1 AND (received < ?2 OR"
                       " received < (SELECT max(b.received) FROM report_boots b"
                       " WHERE b.instance = report_boots.instance))", NULL, old, ancient) < 0 ||
        prune_step(db, "DELETE FROM gateways WHERE received < ?1 AND ?2 = ?2", NULL, old, 0) < 0 ||
        prune_step(db, "DELETE FROM traffic_day WHERE day < ?1 AND ?2 = ?2", day, 0, 0) < 0 ||
        /* an instance gone for good (no boot left): its month roll-ups go too */
        prune_step(db, "DELETE FROM traffic_month WHERE ?1 = ?1 AND ?2 = ?2 AND instance NOT IN"
                       " (SELECT instance FROM report_boots)", NULL, 0, 0) < 0)
        goto out;
    rc = cmg_store_commit(s);
out:
    if (rc < 0)
        cmg_store_rollback(s);
    return rc;
}
