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

static bool count_ok(const cJSON *v)
{
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble >= 0 &&
           v->valuedouble <= MAX_COUNT && v->valuedouble == floor(v->valuedouble);
}

static bool str_ok(const cJSON *v, bool nonempty)
{
    size_t n = cJSON_IsString(v) ? strlen(v->valuestring) : 0;

    return cJSON_IsString(v) && n <= CMG_REPORT_MAX_STR && (n > 0 || !nonempty);
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

static const cJSON *get(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
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

static int check_role(const cJSON *r, const cJSON *seen_before_end, const cJSON *roles,
                      char *err, size_t errlen)
{
    static const char *const bytes[] = {"request_bytes", "response_bytes"};
    const cJSON *id = get(r, "role"), *req = get(r, "requests"), *o;
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
    for (o = roles->child; o && o != seen_before_end; o = o->next)
        if (!strcmp(get(o, "role")->valuestring, id->valuestring))
            return fail(err, errlen, "roles: role %s twice", id->valuestring);
    return 0;
}

int cmg_report_check_gateway(const cJSON *g, char *err, size_t errlen)
{
    static const char *const counts[] = {"seq", "started", "time", "interval", "policy_version",
                                         "device_connections", "devices_now", "egress_bytes",
                                         "ingress_bytes"};
    static const char *const tun_strs[] = {"connector", "peer", "state"};
    static const char *const cert_strs[] = {"name", "subject", "serial"};
    static const char *const since[] = {"since"}, *const not_after[] = {"not_after"};
    const cJSON *state = get(g, "state"), *roles = get(g, "roles"), *refusals = get(g, "refusals");
    const cJSON *e;
    const char *bad;

    if (!str_ok(get(g, "instance"), true))
        return fail(err, errlen, "gateway report: instance: a string of 1 to 256 bytes expected%s", "");
    if (!hex16(get(g, "boot")))
        return fail(err, errlen, "gateway report: boot: 16 hex digits expected%s", "");
    if ((bad = counts_ok(g, counts, N(counts))))
        return fail(err, errlen, "gateway report: %s: a whole number from 0 to 2^53 expected", bad);
    if (get(g, "seq")->valuedouble < 1)
        return fail(err, errlen, "gateway report: seq: 1 or more expected%s", "");
    if (!cJSON_IsString(state) || (strcmp(state->valuestring, "starting") &&
                                   strcmp(state->valuestring, "serving") &&
                                   strcmp(state->valuestring, "draining")))
        return fail(err, errlen, "gateway report: state: starting, serving or draining expected%s", "");
    if (!array_ok(roles, CMG_REPORT_MAX_ROLES))
        return fail(err, errlen, "gateway report: roles: an array of at most 4097 objects expected%s", "");
    cJSON_ArrayForEach(e, roles) if (check_role(e, e, roles, err, errlen) < 0) return -1;
    if (!cJSON_IsObject(refusals) || cJSON_GetArraySize(refusals) > CMG_REPORT_MAX_REFUSALS)
        return fail(err, errlen, "gateway report: refusals: an object of at most 65 counts expected%s", "");
    cJSON_ArrayForEach(e, refusals) if (!count_ok(e) || strlen(e->string) > CMG_REPORT_MAX_STR)
        return fail(err, errlen, "gateway report: refusals: counts by reason token expected%s", "");
    if (!array_ok(get(g, "tunnels"), CMG_REPORT_MAX_TUNNELS))
        return fail(err, errlen, "gateway report: tunnels: an array of at most 64 objects expected%s", "");
    cJSON_ArrayForEach(e, get(g, "tunnels"))
        if ((bad = strs_ok(e, tun_strs, N(tun_strs), false)) || (bad = counts_ok(e, since, 1)))
            return fail(err, errlen, "gateway report: tunnels: %s missing or malformed", bad);
    if (!array_ok(get(g, "certificates"), CMG_REPORT_MAX_CERTS))
        return fail(err, errlen, "gateway report: certificates: an array of at most 16 objects expected%s", "");
    cJSON_ArrayForEach(e, get(g, "certificates"))
        if ((bad = strs_ok(e, cert_strs, N(cert_strs), false)) || (bad = counts_ok(e, not_after, 1)))
            return fail(err, errlen, "gateway report: certificates: %s missing or malformed", bad);
    return 0;
}

static int check_connector_tunnel(const cJSON *t, char *err, size_t errlen)
{
    static const char *const strs[] = {"gateway", "instance", "state"};
    static const char *const counts[] = {"since", "reconnects"};
    const cJSON *rtt = get(t, "rtt_ms");
    const char *bad;

    if ((bad = strs_ok(t, strs, N(strs), false)) || (bad = counts_ok(t, counts, N(counts))))
        return fail(err, errlen, "tunnels: %s missing or malformed", bad);
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
        snprintf(err, errlen, "connector: a string of at most 256 bytes expected");
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

/* Stored counters: {"g": [GW_N], "r": {role: [ROLE_N]}}. */
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

/* ---- the store ---- */

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

static bool all_zero(const uint64_t *c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (c[i])
            return false;
    return true;
}

/* Adds role's growth (ROLE_N, or NULL) and the gateway's (GW_N, or NULL) to a row of
 * table, keyed by key (text) or bucket. */
static int add_traffic(sqlite3 *db, const char *table, const char *keycol, const char *key,
                       int64_t bucket, const char *instance, const char *role,
                       const uint64_t *rc, const uint64_t *gc)
{
    static const uint64_t zero[MAX_N];
    char sql[1200];
    sqlite3_stmt *st;
    uint64_t requests = 0;

    rc = rc ? rc : zero;
    gc = gc ? gc : zero;
    for (unsigned i = 0; i < CMG_METRICS_CLASSES; i++)
        requests += rc[i];
    snprintf(sql, sizeof(sql),
             "INSERT INTO %s (instance, role, %s, requests, r1xx, r2xx, r3xx, r4xx, r5xx, rother,"
             " request_bytes, response_bytes, device_connections, egress_bytes, ingress_bytes)"
             " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
             " ON CONFLICT (instance, role, %s) DO UPDATE SET requests = requests + excluded.requests,"
             " r1xx = r1xx + excluded.r1xx, r2xx = r2xx + excluded.r2xx,"
             " r3xx = r3xx + excluded.r3xx, r4xx = r4xx + excluded.r4xx,"
             " r5xx = r5xx + excluded.r5xx, rother = rother + excluded.rother,"
             " request_bytes = request_bytes + excluded.request_bytes,"
             " response_bytes = response_bytes + excluded.response_bytes,"
             " device_connections = device_connections + excluded.device_connections,"
             " egress_bytes = egress_bytes + excluded.egress_bytes,"
             " ingress_bytes = ingress_bytes + excluded.ingress_bytes",
             table, keycol, keycol);
    if (!(st = prepare(db, sql)))
        return -1;
    sqlite3_bind_text(st, 1, instance, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, role, -1, SQLITE_TRANSIENT);
    if (key)
        sqlite3_bind_text(st, 3, key, -1, SQLITE_TRANSIENT);
    else
        sqlite3_bind_int64(st, 3, bucket);
    sqlite3_bind_int64(st, 4, (int64_t)requests);
    for (int i = 0; i < ROLE_N; i++)
        sqlite3_bind_int64(st, 5 + i, (int64_t)rc[i]);
    for (int i = 0; i < GW_N; i++)
        sqlite3_bind_int64(st, 5 + ROLE_N + i, (int64_t)gc[i]);
    return done(st);
}

/* The growth into the report's 5-minute bucket, its day and its month (UTC). */
static int add_everywhere(sqlite3 *db, int64_t t, const char *instance, const char *role,
                          const uint64_t *rc, const uint64_t *gc)
{
    time_t tt = (time_t)t;
    struct tm tm;
    char day[16], month[16];

    if (!gmtime_r(&tt, &tm))
        return -1;
    strftime(day, sizeof(day), "%Y-%m-%d", &tm);
    strftime(month, sizeof(month), "%Y-%m", &tm);
    if (add_traffic(db, "traffic_5m", "bucket", NULL, t - t % CMG_REPORT_BUCKET_S, instance, role,
                    rc, gc) < 0 ||
        add_traffic(db, "traffic_day", "day", day, 0, instance, role, rc, gc) < 0 ||
        add_traffic(db, "traffic_month", "month", month, 0, instance, role, rc, gc) < 0)
        return -1;
    return 0;
}

/* The last seen seq and counters of (instance, boot): 1 found, 0 not, -1 error. */
static int last_seen(sqlite3 *db, const char *instance, const char *boot, uint64_t *seq,
                     cJSON **counters)
{
    sqlite3_stmt *st = prepare(db, "SELECT seq, counters FROM report_boots WHERE instance = ?"
                                   " AND boot = ?");
    int rc = -1, step;

    *counters = NULL;
    if (!st)
        return -1;
    sqlite3_bind_text(st, 1, instance, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, boot, -1, SQLITE_TRANSIENT);
    step = sqlite3_step(st);
    if (step == SQLITE_ROW) {
        *seq = (uint64_t)sqlite3_column_int64(st, 0);
        *counters = cJSON_Parse((const char *)sqlite3_column_text(st, 1));
        rc = 1;
    } else if (step == SQLITE_DONE) {
        rc = 0;
    }
    sqlite3_finalize(st);
    return rc;
}

static bool exists(sqlite3 *db, const char *sql, const char *key)
{
    sqlite3_stmt *st = prepare(db, sql);
    bool found;

    if (!st)
        return false;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_TRANSIENT);
    found = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    return found;
}

/* The counters' growth since the last report of this boot, added; *now_counters the
 * counters to keep. */
static int add_growth(sqlite3 *db, const cJSON *g, const cJSON *before, int64_t t,
                      cJSON *now_counters, size_t *down)
{
    const char *instance = get(g, "instance")->valuestring;
    const cJSON *roles = get(before, "r"), *r;
    uint64_t was[MAX_N], is[MAX_N];
    uint64_t delta[MAX_N];
    cJSON *kept_roles = cJSON_AddObjectToObject(now_counters, "r");

    for (int i = 0; i < GW_N; i++)
        is[i] = count_of(g, gw_names[i]);
    array_counts(get(before, "g"), was, GW_N);
    *down += cmg_report_delta(was, is, GW_N, delta);
    cJSON_AddItemToObject(now_counters, "g", counts_array(is, GW_N));
    if (!all_zero(delta, GW_N) && add_everywhere(db, t, instance, "", NULL, delta) < 0)
        return -1;
    cJSON_ArrayForEach(r, get(g, "roles")) {
        const char *role = get(r, "role")->valuestring;
        role_counts(r, is);
        array_counts(get(roles, role), was, ROLE_N);
        *down += cmg_report_delta(was, is, ROLE_N, delta);
        cJSON_AddItemToObject(kept_roles, role, counts_array(is, ROLE_N));
        if (!all_zero(delta, ROLE_N) && add_everywhere(db, t, instance, role, delta, NULL) < 0)
            return -1;
    }
    return 0;
}

static int keep_gateway(sqlite3 *db, const cJSON *g, const char *via, int64_t now)
{
    sqlite3_stmt *st = prepare(
        db, "INSERT INTO gateways (instance, boot, seq, state, policy_version, started,"
            " report_time, received, interval, devices_now, via, tunnels, certificates)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (instance) DO UPDATE SET"
            " boot = excluded.boot, seq = excluded.seq, state = excluded.state,"
            " policy_version = excluded.policy_version, started = excluded.started,"
            " report_time = excluded.report_time, received = excluded.received,"
            " interval = excluded.interval, devices_now = excluded.devices_now, via = excluded.via,"
            " tunnels = excluded.tunnels, certificates = excluded.certificates"
            " WHERE excluded.started > gateways.started OR (excluded.boot = gateways.boot AND"
            " excluded.seq > gateways.seq) OR (excluded.boot <> gateways.boot AND"
            " excluded.started = gateways.started)");
    char *tunnels = cJSON_PrintUnformatted(get(g, "tunnels"));
    char *certs = cJSON_PrintUnformatted(get(g, "certificates"));
    static const char *const ints[] = {"seq", "policy_version", "started", "time"};
    int rc = -1;

    if (!st || !tunnels || !certs) {
        sqlite3_finalize(st);
        goto out;
    }
    sqlite3_bind_text(st, 1, get(g, "instance")->valuestring, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, get(g, "boot")->valuestring, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 3, (int64_t)count_of(g, ints[0]));
    sqlite3_bind_text(st, 4, get(g, "state")->valuestring, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 5, (int64_t)count_of(g, ints[1]));
    sqlite3_bind_int64(st, 6, (int64_t)count_of(g, ints[2]));
    sqlite3_bind_int64(st, 7, (int64_t)count_of(g, ints[3]));
    sqlite3_bind_int64(st, 8, now);
    sqlite3_bind_int64(st, 9, (int64_t)count_of(g, "interval"));
    sqlite3_bind_int64(st, 10, (int64_t)count_of(g, "devices_now"));
    sqlite3_bind_text(st, 11, via, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 12, tunnels, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 13, certs, -1, SQLITE_TRANSIENT);
    rc = done(st);
out:
    free(tunnels);
    free(certs);
    return rc;
}

static int keep_boot(sqlite3 *db, const cJSON *g, const cJSON *counters, int64_t now)
{
    sqlite3_stmt *st = prepare(db, "INSERT OR REPLACE INTO report_boots (instance, boot, seq,"
                                   " counters, received) VALUES (?, ?, ?, ?, ?)");
    char *text = cJSON_PrintUnformatted(counters);
    int rc = -1;

    if (st && text) {
        sqlite3_bind_text(st, 1, get(g, "instance")->valuestring, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, get(g, "boot")->valuestring, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 3, (int64_t)count_of(g, "seq"));
        sqlite3_bind_text(st, 4, text, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 5, now);
        rc = done(st);
    } else {
        sqlite3_finalize(st);
    }
    free(text);
    return rc;
}

/* One gateway report: counted once per (instance, boot, seq). */
static int ingest_gateway(sqlite3 *db, const cJSON *g, const char *via, int64_t now)
{
    const char *instance = get(g, "instance")->valuestring, *boot = get(g, "boot")->valuestring;
    uint64_t seq = count_of(g, "seq"), last = 0;
    int64_t t = (int64_t)count_of(g, "time");
    cJSON *before = NULL, *counters = cJSON_CreateObject();
    size_t down = 0;
    int found, rc = -1;

    if ((found = last_seen(db, instance, boot, &last, &before)) < 0 || !counters)
        goto out;
    if (found && seq <= last) {
        cmg_debug("report of gateway %s boot %s seq %llu via %s: seen already", instance, boot,
                  (unsigned long long)seq, via);
        rc = 0;
        goto out;
    }
    if (!exists(db, "SELECT 1 FROM gateways WHERE instance = ?", instance))
        cmg_info("reports: new gateway instance %s (via connector %s)", instance, via);
    if (t > now || t <= 0)
        t = now;   /* a clock ahead: the site's */
    if (add_growth(db, g, before, t, counters, &down) < 0 || keep_boot(db, g, counters, now) < 0 ||
        keep_gateway(db, g, via, now) < 0)
        goto out;
    if (down)
        cmg_warn("report of gateway %s boot %s seq %llu: %zu counter(s) went down within a boot: "
                 "taken as a new baseline (nothing counted for them)", instance, boot,
                 (unsigned long long)seq, down);
    cmg_debug("report of gateway %s boot %s seq %llu via %s kept", instance, boot,
              (unsigned long long)seq, via);
    rc = 0;
out:
    cJSON_Delete(before);
    cJSON_Delete(counters);
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
    const cJSON *g;

    if (cmg_store_begin(s) < 0)
        goto fail;
    if (keep_connector(db, connector, doc, now) < 0)
        goto fail;
    cJSON_ArrayForEach(g, get(doc, "gateway_reports")) if (ingest_gateway(db, g, connector, now) < 0)
        goto fail;
    if (cmg_store_commit(s) < 0)
        goto fail;
    return 0;
fail:
    snprintf(err, errlen, "store: %s", sqlite3_errmsg(db));
    cmg_store_rollback(s);
    return -1;
}

int cmg_report_prune(struct cmg_store *s, int64_t now, int64_t retention_s)
{
    sqlite3 *db = cmg_store_db(s);
    time_t day_limit = (time_t)(now - CMG_REPORT_DAY_KEEP_S);
    struct tm tm;
    char day[16];
    sqlite3_stmt *st;
    int rc = -1;

    if (!gmtime_r(&day_limit, &tm))
        return -1;
    strftime(day, sizeof(day), "%Y-%m-%d", &tm);
    if (cmg_store_begin(s) < 0)
        return -1;
    if ((st = prepare(db, "DELETE FROM traffic_5m WHERE bucket < ?"))) {
        sqlite3_bind_int64(st, 1, now - retention_s);
        if (done(st) < 0)
            goto out;
    } else {
        goto out;
    }
    if ((st = prepare(db, "DELETE FROM report_boots WHERE received < ?"))) {
        sqlite3_bind_int64(st, 1, now - retention_s);
        if (done(st) < 0)
            goto out;
    } else {
        goto out;
    }
    if ((st = prepare(db, "DELETE FROM traffic_day WHERE day < ?"))) {
        sqlite3_bind_text(st, 1, day, -1, SQLITE_TRANSIENT);
        if (done(st) < 0)
            goto out;
    } else {
        goto out;
    }
    rc = cmg_store_commit(s);
out:
    if (rc < 0)
        cmg_store_rollback(s);
    return rc;
}
