/* Alert evaluation in 'site serve'; see alerts.h. */
#include "site/alerts.h"

#include "core/log.h"
#include "site/serve.h"
#include "site/store_sql.h"
#include "tls/tls.h"

#include <math.h>
#include <openssl/asn1.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FIRST_CHECK_MS 1000
#define MAX_CONDITIONS 4096       /* what one pass considers: bounded whatever the tables hold */
#define MAX_WATCHED 4096          /* subjects remembered without a tunnel */

enum kind { K_EGRESS_MONTHLY, K_EGRESS_DAILY, K_CERT, K_NO_TUNNEL, K_CONNECTOR_SILENT,
            K_GATEWAY_SILENT, K_COUNT };
static const char *const kind_names[K_COUNT] = {"egress-monthly", "egress-daily", "cert-expiry",
                                                "no-tunnel", "connector-silent",
                                                "gateway-silent"};
enum level { L_WARNING = 1, L_CRITICAL = 2 };

/* A condition that holds now. */
struct condition {
    enum kind kind;
    enum level level;
    char subject[256];
    char message[512];
    double value, threshold;
};

/* A subject seen without a tunnel up, and since when (wall clock). */
struct watched {
    char key[300];
    int64_t since;
    bool seen;
};

struct cmg_site_alerts {
    struct cmg_site_server *srv;
    struct cmg_loop *loop;
    struct cmg_timer timer;
    uint64_t last_check_ms;
    bool checked;
    struct cmg_webhook *webhook;
    struct watched *watched;
    size_t nwatched;
};

/* One pass: what holds, which kinds were read in full, when to look again. */
struct pass {
    struct cmg_site_alerts *a;
    struct cmg_store *st;
    const struct cmg_alert_settings *set;
    int64_t now;
    struct condition *c;
    size_t n, cap;
    unsigned evaluated;       /* bit per kind: its open alerts may be resolved */
    int64_t next_due;         /* wall clock second a condition may start to hold, 0: none */
    bool full;                /* MAX_CONDITIONS reached: nothing is resolved this pass */
};

#define OF(type, member, p) ((type *)((char *)(p) - offsetof(type, member)))

/* The statement failed because a report table is not there (a store older than the
 * reports): nothing reported, rather than nothing known. */
static bool no_table(struct pass *p)
{
    return !strncmp(cmg_store_error(p->st), "no such table", 13);
}

static const char *level_name(enum level l)
{
    return l == L_CRITICAL ? "critical" : "warning";
}

static void due_at(struct pass *p, int64_t when)
{
    if (when > p->now && (!p->next_due || when < p->next_due))
        p->next_due = when;
}

/* A new condition; NULL if (kind, subject) holds already (the first one found stays: one
 * alert per key) or there are too many. */
static struct condition *add(struct pass *p, enum kind k, enum level l, const char *subject,
                             double value, double threshold)
{
    struct condition *c;

    for (size_t i = 0; i < p->n; i++)
        if (p->c[i].kind == k && !strncmp(p->c[i].subject, subject, sizeof(c->subject) - 1))
            return NULL;
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 16;
        if (cap > MAX_CONDITIONS || !(c = realloc(p->c, cap * sizeof(*c)))) {
            p->full = true;
            return NULL;
        }
        p->c = c;
        p->cap = cap;
    }
    c = &p->c[p->n++];
    memset(c, 0, sizeof(*c));
    c->kind = k;
    c->level = l;
    snprintf(c->subject, sizeof(c->subject), "%s", subject);
    c->value = value;
    c->threshold = threshold;
    return c;
}

/* v in the units the allowance was likely given in: powers of 1024 (KiB, MiB, ...) when it
 * is a multiple of 1024, else of 1000 (KB, MB, ...). */
static void human_bytes(double v, bool binary, char *out, size_t len)
{
    static const char *const bin[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    static const char *const dec[] = {"B", "KB", "MB", "GB", "TB", "PB"};
    double base = binary ? 1024 : 1000;
    size_t u = 0;

    while (v >= base && u + 1 < sizeof(bin) / sizeof(bin[0])) {
        v /= base;
        u++;
    }
    snprintf(out, len, u ? "%.1f %s" : "%.0f %s", v, binary ? bin[u] : dec[u]);
}

/* ---- egress ---- */

static int sum_egress(struct pass *p, const char *table, const char *col, const char *period,
                      double *out)
{
    char sql[200];
    sqlite3_stmt *q;
    int rc = -1;

    snprintf(sql, sizeof(sql), "SELECT COALESCE(SUM(egress_bytes), 0) FROM %s WHERE role = '' "
             "AND %s = ?", table, col);
    if (!(q = cmg_store_prepare(p->st, sql, "s", period))) {
        *out = 0;
        return no_table(p) ? 0 : -1;
    }
    if (sqlite3_step(q) == SQLITE_ROW) {
        *out = sqlite3_column_double(q, 0);
        rc = 0;
    }
    sqlite3_finalize(q);
    return rc;
}

static void egress(struct pass *p, enum kind k, uint64_t limit)
{
    bool monthly = k == K_EGRESS_MONTHLY;
    time_t now = (time_t)p->now;
    struct tm tm;
    char period[16], used[32], allowed[32];
    double bytes, pct;
    struct condition *c;
    enum level l;

    gmtime_r(&now, &tm);
    strftime(period, sizeof(period), monthly ? "%Y-%m" : "%Y-%m-%d", &tm);
    if (!limit) {
        p->evaluated |= 1u << k;   /* no threshold: what is open resolves */
        return;
    }
    if (sum_egress(p, monthly ? "traffic_month" : "traffic_day", monthly ? "month" : "day",
                   period, &bytes) < 0)
        return;
    p->evaluated |= 1u << k;
    pct = bytes * 100.0 / (double)limit;
    if (pct < p->set->warning_pct)
        return;
    l = pct >= p->set->critical_pct ? L_CRITICAL : L_WARNING;
    if (!(c = add(p, k, l, period, bytes,
                  (double)limit * (l == L_CRITICAL ? p->set->critical_pct : p->set->warning_pct) /
                      100.0)))
        return;
    human_bytes(bytes, limit % 1024 == 0, used, sizeof(used));
    human_bytes((double)limit, limit % 1024 == 0, allowed, sizeof(allowed));
    snprintf(c->message, sizeof(c->message), "egress %s %s is %s, %.0f %% of the %s allowance "
             "of %s (%s at %u %%)", monthly ? "in" : "on", period, used, floor(pct),
             monthly ? "monthly" : "daily", allowed, level_name(l),
             l == L_CRITICAL ? p->set->critical_pct : p->set->warning_pct);
}

/* ---- certificates ---- */

static void cert_condition(struct pass *p, const char *what, const char *serial, int64_t end,
                           const char *fix)
{
    double days = (double)(end - p->now) / 86400.0;
    enum level l = days < CMG_ALERTS_CERT_CRITICAL_DAYS ? L_CRITICAL : L_WARNING;
    char subject[256], when[32];
    time_t t = (time_t)end;
    struct tm tm;
    struct condition *c;

    snprintf(subject, sizeof(subject), "%s serial %s", what, serial);
    if (!(c = add(p, K_CERT, l, subject, floor(days),
                  l == L_CRITICAL ? CMG_ALERTS_CERT_CRITICAL_DAYS : p->set->cert_expiry_days)))
        return;
    gmtime_r(&t, &tm);
    strftime(when, sizeof(when), "%Y-%m-%d %H:%M UTC", &tm);
    if (end <= p->now)
        snprintf(c->message, sizeof(c->message), "%s (serial %s) expired on %s: %s", what,
                 serial, when, fix);
    else
        snprintf(c->message, sizeof(c->message), "%s (serial %s) expires in %.0f day(s), on %s: "
                 "%s", what, serial, floor(days), when, fix);
}

static int store_certs(struct pass *p, int64_t horizon)
{
    sqlite3_stmt *q = cmg_store_prepare(
        p->st, "SELECT name, serial, COALESCE(kind, ''), expires FROM certs WHERE revoked IS "
               "NULL AND replaced IS NULL AND expires < ? UNION ALL SELECT name, serial, "
               "'connector', expires FROM connectors WHERE revoked IS NULL AND expires < ?",
        "ii", horizon, horizon);
    int step;

    if (!q)
        return -1;
    while ((step = sqlite3_step(q)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(q, 0);
        const char *kind = (const char *)sqlite3_column_text(q, 2);
        char what[200], fix[200];
        snprintf(what, sizeof(what), "%s %s's certificate", *kind ? kind : "device", name);
        if (!strcmp(kind, "connector") || !strcmp(kind, "gateway") || !strcmp(kind, "site"))
            snprintf(fix, sizeof(fix), "renew it: cmg site cert renew %s%s%s", kind,
                     strcmp(kind, "site") ? " " : "", strcmp(kind, "site") ? name : "");
        else
            snprintf(fix, sizeof(fix), "issue a new one and revoke this one");
        cert_condition(p, what, (const char *)sqlite3_column_text(q, 1), sqlite3_column_int64(q, 3),
                       fix);
    }
    sqlite3_finalize(q);
    return step == SQLITE_DONE ? 0 : -1;
}

/* The certificates each gateway instance reported (gateways.certificates). */
static int reported_certs(struct pass *p, int64_t horizon)
{
    sqlite3_stmt *q = cmg_store_prepare(p->st, "SELECT instance, certificates FROM gateways",
                                        "");
    int step;

    if (!q)
        return no_table(p) ? 0 : -1;
    while ((step = sqlite3_step(q)) == SQLITE_ROW) {
        const char *instance = (const char *)sqlite3_column_text(q, 0);
        cJSON *list = cJSON_Parse((const char *)sqlite3_column_text(q, 1)), *x;
        cJSON_ArrayForEach(x, list) {
            const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(x, "name"));
            const char *serial =
                cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(x, "serial"));
            const cJSON *end = cJSON_GetObjectItemCaseSensitive(x, "not_after");
            char what[300];
            if (!cJSON_IsNumber(end) || end->valuedouble >= (double)horizon)
                continue;
            snprintf(what, sizeof(what), "gateway %.100s's %.100s", instance,
                     name ? name : "certificate");
            cert_condition(p, what, serial ? serial : "?", (int64_t)end->valuedouble,
                           "renew it (cmg site cert renew gateway) and reload the gateway");
        }
        cJSON_Delete(list);
    }
    sqlite3_finalize(q);
    return step == SQLITE_DONE ? 0 : -1;
}

static void site_ca(struct pass *p, int64_t horizon)
{
    X509 *ca = p->a->srv->ctx->ca_cert;
    const ASN1_TIME *end = X509_get0_notAfter(ca);
    char serial[80] = "?";
    struct tm tm;

    if (!end || ASN1_TIME_to_tm(end, &tm) != 1 || (int64_t)timegm(&tm) >= horizon)
        return;
    cmg_tls_serial(ca, serial, sizeof(serial));
    cert_condition(p, "the site CA (ca.crt)", serial, (int64_t)timegm(&tm),
                   "a new site CA means new certificates for every role");
}

static void certificates(struct pass *p)
{
    int64_t horizon = p->now + (int64_t)p->set->cert_expiry_days * 86400;

    if (p->set->cert_expiry_days == 0) {
        p->evaluated |= 1u << K_CERT;
        return;
    }
    site_ca(p, horizon);
    if (store_certs(p, horizon) == 0 && reported_certs(p, horizon) == 0)
        p->evaluated |= 1u << K_CERT;
}

/* ---- tunnels and silence ---- */

/* Since when key has had no tunnel up, as far as this process saw it. */
static int64_t watched_since(struct cmg_site_alerts *a, const char *key, int64_t now)
{
    struct watched *w;

    for (size_t i = 0; i < a->nwatched; i++)
        if (!strcmp(a->watched[i].key, key)) {
            a->watched[i].seen = true;
            return a->watched[i].since;
        }
    if (a->nwatched == MAX_WATCHED ||
        !(w = realloc(a->watched, (a->nwatched + 1) * sizeof(*w))))
        return now;
    a->watched = w;
    w = &a->watched[a->nwatched++];
    snprintf(w->key, sizeof(w->key), "%s", key);
    w->since = now;
    w->seen = true;
    return now;
}

/* Forgets the subjects not seen without a tunnel in this pass. */
static void watched_sweep(struct cmg_site_alerts *a)
{
    size_t kept = 0;

    for (size_t i = 0; i < a->nwatched; i++)
        if (a->watched[i].seen) {
            a->watched[kept] = a->watched[i];
            a->watched[kept++].seen = false;
        }
    a->nwatched = kept;
}

/* Whether a tunnel list (JSON, as reported) has one "up"; *latest gets the latest
 * "since" of the others. */
static bool any_up(const char *json, int64_t *latest)
{
    cJSON *list = cJSON_Parse(json ? json : "[]"), *t;
    bool up = false;

    *latest = 0;
    cJSON_ArrayForEach(t, list) {
        const char *state = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(t, "state"));
        const cJSON *since = cJSON_GetObjectItemCaseSensitive(t, "since");
        up = up || (state && !strcmp(state, "up"));
        if (cJSON_IsNumber(since) && since->valuedouble > (double)*latest)
            *latest = (int64_t)since->valuedouble;
    }
    cJSON_Delete(list);
    return up;
}

static void no_tunnel(struct pass *p, const char *who, const char *name, const char *tunnels)
{
    char key[300];
    int64_t latest, since;
    struct condition *c;

    if (!p->set->no_tunnel_s || any_up(tunnels, &latest))
        return;
    snprintf(key, sizeof(key), "%s %s", who, name);
    since = watched_since(p->a, key, p->now);
    if (latest && latest < since)
        since = latest;   /* the report knows better than this process's memory */
    if (p->now - since <= p->set->no_tunnel_s) {
        due_at(p, since + p->set->no_tunnel_s + 1);
        return;
    }
    if ((c = add(p, K_NO_TUNNEL, L_CRITICAL, name, (double)(p->now - since),
                 (double)p->set->no_tunnel_s)))
        snprintf(c->message, sizeof(c->message), "%s %s has had no tunnel up for %lld s "
                 "(no_tunnel is %lld s): %s", who, name, (long long)(p->now - since),
                 (long long)p->set->no_tunnel_s,
                 !strcmp(who, "connector") ? "can it reach the gateways?"
                                           : "is a connector dialling it?");
}

/* Silent: no report for longer than two of its intervals. true if so. */
static bool silent(struct pass *p, enum kind k, const char *who, const char *name,
                   int64_t received, int64_t interval)
{
    int64_t limit = 2 * (interval > 0 ? interval : 1), age = p->now - received;
    struct condition *c;

    if (age <= limit) {
        due_at(p, received + limit + 1);
        return false;
    }
    if ((c = add(p, k, L_CRITICAL, name, (double)age, (double)limit)))
        snprintf(c->message, sizeof(c->message), "%s %s last reported %lld s ago (it reports "
                 "every %lld s): %s", who, name, (long long)age, (long long)interval,
                 k == K_CONNECTOR_SILENT ? "is it running, can it reach the site's feed?"
                                         : "is it running, has it a tunnel to a connector?");
    return true;
}

/* A connector whose last report showed a tunnel up, while every gateway instance that
 * has reported since (fresh, not draining, in the same run as before it) lists no tunnel
 * from it: it died or lost its network. The gateways say so within a second; its own
 * silence shows only after two intervals. 1 if so, 0 if not or unknown, -1 on an error. */
static int gateways_lost(struct pass *p, const char *name, int64_t received, const char *tunnels)
{
    sqlite3_stmt *q;
    int verdict = 0;

    if (!tunnels || !strstr(tunnels, "\"state\":\"up\""))
        return 0;   /* no tunnel up by its own word: no-tunnel's matter */
    q = cmg_store_prepare(
        p->st, "SELECT count(*), coalesce(sum(EXISTS (SELECT 1 FROM json_each(g.tunnels) t "
               "WHERE json_extract(t.value, '$.connector') = ?1 AND "
               "json_extract(t.value, '$.state') IN ('up', 'draining'))), 0) FROM gateways g "
               "WHERE g.received >= ?2 AND g.started < ?2 AND g.state != 'draining' AND "
               "g.received >= ?3 - 2 * max(g.interval, 1)", "sii", name, received, p->now);
    if (!q)
        return -1;
    if (sqlite3_step(q) == SQLITE_ROW)
        verdict = sqlite3_column_int64(q, 0) > 0 && sqlite3_column_int64(q, 1) == 0;
    else
        verdict = -1;
    sqlite3_finalize(q);
    return verdict;
}

static void connector_lost(struct pass *p, const char *name, int64_t received)
{
    struct condition *c = add(p, K_CONNECTOR_SILENT, L_CRITICAL, name,
                              (double)(p->now - received), 0);

    if (c)
        snprintf(c->message, sizeof(c->message), "connector %s: every gateway instance that "
                 "reported since its last report (%lld s ago) has no tunnel from it: is it "
                 "running, can it reach the gateways?", name, (long long)(p->now - received));
}

static void connectors(struct pass *p)
{
    sqlite3_stmt *q = cmg_store_prepare(
        p->st, "SELECT r.connector, r.received, r.interval, r.draining, r.tunnels FROM "
               "connector_reports r WHERE NOT EXISTS (SELECT 1 FROM connectors k WHERE "
               "k.name = r.connector AND k.revoked IS NOT NULL)", "");
    int step;

    if (!q) {
        p->evaluated |= no_table(p) ? 1u << K_CONNECTOR_SILENT : 0;
        return;
    }
    while ((step = sqlite3_step(q)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(q, 0);
        if (sqlite3_column_int64(q, 3))
            continue;   /* draining: going away on purpose */
        int64_t received = sqlite3_column_int64(q, 1);
        const char *tunnels = (const char *)sqlite3_column_text(q, 4);
        if (silent(p, K_CONNECTOR_SILENT, "connector", name, received, sqlite3_column_int64(q, 2)))
            continue;
        if (gateways_lost(p, name, received, tunnels) == 1)
            connector_lost(p, name, received);
        else
            no_tunnel(p, "connector", name, tunnels);
    }
    sqlite3_finalize(q);
    if (step == SQLITE_DONE)
        p->evaluated |= 1u << K_CONNECTOR_SILENT;
}

static void gateways(struct pass *p)
{
    sqlite3_stmt *q = cmg_store_prepare(
        p->st, "SELECT instance, received, interval, state, tunnels FROM gateways", "");
    int step;

    if (!q) {
        p->evaluated |= no_table(p) ? 1u << K_GATEWAY_SILENT : 0;
        return;
    }
    while ((step = sqlite3_step(q)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(q, 0);
        if (!strcmp((const char *)sqlite3_column_text(q, 3), "draining"))
            continue;
        if (!silent(p, K_GATEWAY_SILENT, "gateway instance", name, sqlite3_column_int64(q, 1),
                    sqlite3_column_int64(q, 2)))
            no_tunnel(p, "gateway instance", name, (const char *)sqlite3_column_text(q, 4));
    }
    sqlite3_finalize(q);
    if (step == SQLITE_DONE)
        p->evaluated |= 1u << K_GATEWAY_SILENT;
}

static void evaluate(struct pass *p)
{
    egress(p, K_EGRESS_MONTHLY, p->set->egress_monthly);
    egress(p, K_EGRESS_DAILY, p->set->egress_daily);
    certificates(p);
    connectors(p);
    gateways(p);
    /* no-tunnel is read with the two above */
    if ((p->evaluated & (1u << K_CONNECTOR_SILENT)) && (p->evaluated & (1u << K_GATEWAY_SILENT)))
        p->evaluated |= 1u << K_NO_TUNNEL;
    watched_sweep(p->a);
}

/* ---- alerts: open, raise, lower, resolve ---- */

enum event { E_OPENED, E_RAISED, E_LOWERED, E_RESOLVED };
static const char *const event_names[] = {"opened", "raised", "lowered", "resolved"};

struct open_alert {
    int64_t id, opened;
    enum kind kind;
    enum level level;
    char subject[256];
    char message[512];
    double value, threshold;
    bool matched;
};

/* A change to make, then log and notify. */
struct change {
    enum event ev;
    const struct condition *c;   /* NULL when resolved */
    struct open_alert *o;        /* NULL when opened */
    int64_t id;
};

static int kind_of(const char *name)
{
    for (int k = 0; k < K_COUNT; k++)
        if (!strcmp(kind_names[k], name))
            return k;
    return -1;
}

static int load_open(struct cmg_store *st, struct open_alert **out, size_t *n)
{
    sqlite3_stmt *q = cmg_store_prepare(st, "SELECT id, kind, subject, level, message, value, "
                                            "threshold, opened FROM alerts WHERE resolved IS "
                                            "NULL LIMIT ?", "i", (int64_t)MAX_CONDITIONS);
    struct open_alert *v = NULL, *grown;
    size_t cap = 0;
    int step;

    *n = 0;
    if (!q)
        return -1;
    while ((step = sqlite3_step(q)) == SQLITE_ROW) {
        int k = kind_of((const char *)sqlite3_column_text(q, 1));
        if (k < 0)
            continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            if (!(grown = realloc(v, cap * sizeof(*v)))) {
                step = SQLITE_NOMEM;
                break;
            }
            v = grown;
        }
        struct open_alert *o = &v[(*n)++];
        memset(o, 0, sizeof(*o));
        o->id = sqlite3_column_int64(q, 0);
        o->kind = (enum kind)k;
        snprintf(o->subject, sizeof(o->subject), "%s", sqlite3_column_text(q, 2));
        o->level = !strcmp((const char *)sqlite3_column_text(q, 3), "critical") ? L_CRITICAL
                                                                                  : L_WARNING;
        snprintf(o->message, sizeof(o->message), "%s", sqlite3_column_text(q, 4));
        o->value = sqlite3_column_double(q, 5);
        o->threshold = sqlite3_column_double(q, 6);
        o->opened = sqlite3_column_int64(q, 7);
    }
    sqlite3_finalize(q);
    *out = v;
    return step == SQLITE_DONE ? 0 : -1;
}

static int write_change(struct cmg_store *st, struct change *ch, int64_t now, bool notify)
{
    const char *notified = notify ? event_names[ch->ev] : NULL;
    const struct condition *c = ch->c;
    sqlite3_stmt *q;
    int step;

    if (ch->ev == E_OPENED)
        q = cmg_store_prepare(st, "INSERT INTO alerts (kind, subject, level, message, value, "
                                  "threshold, opened, updated, notified) VALUES (?, ?, ?, ?, "
                                  "?, ?, ?, ?, ?)", "ssss", kind_names[c->kind], c->subject,
                              level_name(c->level), c->message);
    else if (ch->ev == E_RESOLVED)
        q = cmg_store_prepare(st, "UPDATE alerts SET resolved = ?, updated = ?, notified = ? "
                                  "WHERE id = ?", "ii", now, now);
    else
        q = cmg_store_prepare(st, "UPDATE alerts SET level = ?, message = ?, value = ?, "
                                  "threshold = ?, updated = ?, notified = COALESCE(?, notified)"
                                  " WHERE id = ?", "ss", level_name(c->level), c->message);
    if (!q)
        return -1;
    if (ch->ev == E_OPENED) {
        sqlite3_bind_double(q, 5, c->value);
        sqlite3_bind_double(q, 6, c->threshold);
        sqlite3_bind_int64(q, 7, now);
        sqlite3_bind_int64(q, 8, now);
        sqlite3_bind_text(q, 9, notified, -1, SQLITE_STATIC);
    } else if (ch->ev == E_RESOLVED) {
        sqlite3_bind_text(q, 3, notified, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 4, ch->id);
    } else {
        sqlite3_bind_double(q, 3, c->value);
        sqlite3_bind_double(q, 4, c->threshold);
        sqlite3_bind_int64(q, 5, now);
        sqlite3_bind_text(q, 6, ch->ev == E_RAISED ? notified : NULL, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 7, ch->id);
    }
    step = sqlite3_step(q);
    sqlite3_finalize(q);
    if (ch->ev == E_OPENED)
        ch->id = sqlite3_last_insert_rowid(cmg_store_db(st));
    return step == SQLITE_DONE ? 0 : -1;
}

static cJSON *alert_doc(const char *site, const struct change *ch, int64_t now)
{
    const struct condition *c = ch->c;
    const struct open_alert *o = ch->o;
    cJSON *doc = cJSON_CreateObject(), *a;

    cJSON_AddStringToObject(doc, "site", site);
    cJSON_AddStringToObject(doc, "event", event_names[ch->ev]);
    a = cJSON_AddObjectToObject(doc, "alert");
    cJSON_AddNumberToObject(a, "id", (double)ch->id);
    cJSON_AddStringToObject(a, "kind", kind_names[c ? c->kind : o->kind]);
    cJSON_AddStringToObject(a, "subject", c ? c->subject : o->subject);
    cJSON_AddStringToObject(a, "level", level_name(c ? c->level : o->level));
    cJSON_AddStringToObject(a, "message", c ? c->message : o->message);
    cJSON_AddNumberToObject(a, "value", c ? c->value : o->value);
    cJSON_AddNumberToObject(a, "threshold", c ? c->threshold : o->threshold);
    cJSON_AddNumberToObject(a, "opened", (double)(o ? o->opened : now));
    cJSON_AddNumberToObject(a, "updated", (double)now);
    if (ch->ev == E_RESOLVED)
        cJSON_AddNumberToObject(a, "resolved", (double)now);
    else
        cJSON_AddNullToObject(a, "resolved");
    return doc;
}

static void log_change(const struct change *ch)
{
    static const char *const what[] = {"alert opened", "alert raised", "alert lowered",
                                       "alert resolved"};
    const struct condition *c = ch->c;
    const struct open_alert *o = ch->o;
    enum level l = c ? c->level : o->level;
    enum cmg_log_level lv = ch->ev == E_RESOLVED || ch->ev == E_LOWERED ? CMG_LOG_INFO
                            : l == L_CRITICAL                          ? CMG_LOG_ERROR
                                                                       : CMG_LOG_WARN;
    const struct cmg_log_field f[] = {
        CMG_F_NUM("id", ch->id),
        CMG_F_STR("kind", kind_names[c ? c->kind : o->kind]),
        CMG_F_STR("subject", c ? c->subject : o->subject),
        CMG_F_STR("level", level_name(l)),
        CMG_F_NUM("value", llround(c ? c->value : o->value)),
        CMG_F_NUM("threshold", llround(c ? c->threshold : o->threshold)),
        CMG_F_STR("message", c ? c->message : o->message)};

    cmg_log_kv(lv, what[ch->ev], f, CMG_LOG_NFIELDS(f));
}

/* The changes that make the alerts table say what holds now. */
static size_t plan(struct pass *p, struct open_alert *open, size_t nopen, struct change *out)
{
    size_t n = 0;

    for (size_t i = 0; i < p->n; i++) {
        struct condition *c = &p->c[i];
        struct open_alert *o = NULL;
        for (size_t j = 0; j < nopen && !o; j++)
            if (!open[j].matched && open[j].kind == c->kind && !strcmp(open[j].subject, c->subject))
                o = &open[j];
        if (o)
            o->matched = true;
        if (!o)
            out[n++] = (struct change){E_OPENED, c, NULL, 0};
        else if (c->level != o->level)
            out[n++] = (struct change){c->level > o->level ? E_RAISED : E_LOWERED, c, o, o->id};
    }
    for (size_t j = 0; j < nopen; j++)
        if (!open[j].matched && !p->full && (p->evaluated & (1u << open[j].kind)))
            out[n++] = (struct change){E_RESOLVED, NULL, &open[j], open[j].id};
    return n;
}

/* Writes the changes in one short transaction; then logs and notifies each. */
static void apply(struct pass *p, struct change *ch, size_t n)
{
    struct cmg_store *st = p->st;
    bool notify = p->set->webhook != NULL;
    size_t done = 0;

    if (!n)
        return;
    if (cmg_store_begin(st) < 0) {
        cmg_warn("alerts: the store is busy (%s): %zu change(s) wait for the next check",
                 cmg_store_error(st), n);
        return;
    }
    while (done < n && write_change(st, &ch[done], p->now, notify) == 0)
        done++;
    if (done < n || cmg_store_commit(st) < 0) {
        cmg_error("alerts: cannot record %zu change(s): %s; retried at the next check", n,
                  cmg_store_error(st));
        cmg_store_rollback(st);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        log_change(&ch[i]);
        if (notify && ch[i].ev != E_LOWERED) {
            cJSON *doc = alert_doc(p->a->srv->ctx->service_name, &ch[i], p->now);
            char *body = cJSON_PrintUnformatted(doc);
            cJSON_Delete(doc);
            if (body)
                cmg_webhook_post(p->a->webhook, body, kind_names[ch[i].c ? ch[i].c->kind
                                                                        : ch[i].o->kind],
                                 ch[i].c ? ch[i].c->subject : ch[i].o->subject);
        }
    }
}

static uint64_t run_check(struct cmg_site_alerts *a)
{
    struct cmg_alert_settings set;
    struct pass p = {.a = a, .st = a->srv->ctx->store, .set = &set, .now = (int64_t)time(NULL)};
    struct open_alert *open = NULL;
    struct change *ch = NULL;
    size_t nopen = 0;
    uint64_t next = CMG_ALERTS_CHECK_MS;

    if (cmg_alert_settings_load(p.st, &set) < 0) {
        cmg_warn("alerts: cannot read the thresholds: %s", cmg_store_error(p.st));
        return next;
    }
    evaluate(&p);
    if (load_open(p.st, &open, &nopen) < 0)
        cmg_warn("alerts: cannot read the open alerts: %s", cmg_store_error(p.st));
    else if ((ch = calloc(p.n + nopen + 1, sizeof(*ch))))
        apply(&p, ch, plan(&p, open, nopen, ch));
    if (p.next_due && (uint64_t)(p.next_due - p.now) * 1000 < next)
        next = (uint64_t)(p.next_due - p.now) * 1000;
    free(ch);
    free(open);
    free(p.c);
    cmg_alert_settings_free(&set);
    return next;
}

static void on_timer(struct cmg_timer *t)
{
    struct cmg_site_alerts *a = OF(struct cmg_site_alerts, timer, t);
    uint64_t next = run_check(a);

    a->last_check_ms = cmg_loop_now(a->loop);
    a->checked = true;
    cmg_timer_start(a->loop, &a->timer, next, on_timer);
}

struct cmg_site_alerts *cmg_site_alerts_new(struct cmg_site_server *srv)
{
    struct cmg_site_alerts *a = calloc(1, sizeof(*a));

    if (!a)
        return NULL;
    a->srv = srv;
    a->loop = srv->loop;
    if (!(a->webhook = cmg_webhook_new(srv->loop, srv->ctx->store))) {
        free(a);
        return NULL;
    }
    cmg_timer_start(a->loop, &a->timer, FIRST_CHECK_MS, on_timer);
    return a;
}

void cmg_site_alerts_check(struct cmg_site_server *srv)
{
    struct cmg_site_alerts *a = srv ? srv->alerts : NULL;
    uint64_t now, at = 0;

    if (!a)
        return;
    now = cmg_loop_now(a->loop);
    if (a->checked && now - a->last_check_ms < CMG_ALERTS_MIN_GAP_MS)
        at = a->last_check_ms + CMG_ALERTS_MIN_GAP_MS - now;
    if (cmg_timer_armed(&a->timer) && a->timer.when <= now + at)
        return;   /* due as soon anyway */
    cmg_timer_stop(a->loop, &a->timer);
    cmg_timer_start(a->loop, &a->timer, at, on_timer);
}

void cmg_site_alerts_free(struct cmg_site_alerts *a)
{
    if (!a)
        return;
    cmg_timer_stop(a->loop, &a->timer);
    cmg_webhook_free(a->webhook);
    free(a->watched);
    free(a);
}
