/* Alert thresholds in the store, and the admin operations that set them; see alerts.h. */
#include "site/alerts.h"
#include "site/ops.h"

#include "client/fetch.h"
#include "site/pki.h"
#include "site/store_sql.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define WEBHOOK_URL_MAX 2048
#define WEBHOOK_CA_MAX (256 * 1024)
#define NO_TUNNEL_MAX_S (3650 * 86400LL)   /* ten years: since + it cannot overflow */

/* ---- parsing ---- */

/* A whole number at the start of s; end gets what follows. -1 if none or too large. */
static int64_t leading_number(const char *s, const char **end)
{
    char *e;
    long long n;

    if (!s || !isdigit((unsigned char)*s))
        return -1;
    errno = 0;
    n = strtoll(s, &e, 10);
    if (errno || n < 0)
        return -1;
    *end = e;
    return n;
}

int64_t cmg_alerts_parse_size(const char *s)
{
    static const struct {
        const char *unit;
        int64_t factor;
    } units[] = {{"", 1},           {"B", 1},
                 {"KB", 1000},      {"MB", 1000000},          {"GB", 1000000000},
                 {"TB", 1000000000000LL},
                 {"KiB", 1LL << 10}, {"MiB", 1LL << 20},      {"GiB", 1LL << 30},
                 {"TiB", 1LL << 40}};
    const char *unit;
    int64_t n = leading_number(s, &unit);

    if (n < 0)
        return -1;
    while (*unit == ' ')
        unit++;
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++)
        if (!strcasecmp(unit, units[i].unit))
            return n > INT64_MAX / units[i].factor ? -1 : n * units[i].factor;
    return -1;
}

int64_t cmg_alerts_parse_duration(const char *s)
{
    const char *unit;
    int64_t n = leading_number(s, &unit), f;

    if (n < 0)
        return -1;
    if (!*unit || !strcmp(unit, "m"))
        f = 60;
    else if (!strcmp(unit, "s"))
        f = 1;
    else if (!strcmp(unit, "h"))
        f = 3600;
    else if (!strcmp(unit, "d"))
        f = 86400;
    else
        return -1;
    return n > INT64_MAX / f ? -1 : n * f;
}

/* ---- settings ---- */

static char *setting(struct cmg_store *st, const char *name, int *rc)
{
    sqlite3_stmt *q = cmg_store_prepare(st, "SELECT value FROM alert_settings WHERE name = ?",
                                        "s", name);
    char *v = NULL;
    int step;

    if (!q) {
        *rc = -1;
        return NULL;
    }
    if ((step = sqlite3_step(q)) == SQLITE_ROW)
        v = strdup((const char *)sqlite3_column_text(q, 0));
    else if (step != SQLITE_DONE)
        *rc = -1;
    sqlite3_finalize(q);
    return v;
}

static uint64_t setting_u64(struct cmg_store *st, const char *name, uint64_t def, int *rc)
{
    char *v = setting(st, name, rc), *end;
    unsigned long long n = def;

    if (v) {
        n = strtoull(v, &end, 10);
        if (*end || end == v)
            n = def;
    }
    free(v);
    return n;
}

int cmg_alert_settings_load(struct cmg_store *st, struct cmg_alert_settings *o)
{
    int rc = 0;

    memset(o, 0, sizeof(*o));
    o->egress_monthly = setting_u64(st, "egress_monthly", 0, &rc);
    o->egress_daily = setting_u64(st, "egress_daily", 0, &rc);
    o->warning_pct = (unsigned)setting_u64(st, "warning_pct", CMG_ALERTS_WARNING_PCT, &rc);
    o->critical_pct = (unsigned)setting_u64(st, "critical_pct", CMG_ALERTS_CRITICAL_PCT, &rc);
    o->cert_expiry_days =
        (unsigned)setting_u64(st, "cert_expiry_days", CMG_ALERTS_CERT_EXPIRY_DAYS, &rc);
    o->no_tunnel_s = (int64_t)setting_u64(st, "no_tunnel", CMG_ALERTS_NO_TUNNEL_S, &rc);
    o->webhook = setting(st, "webhook", &rc);
    o->webhook_ca = setting(st, "webhook_ca", &rc);
    if (o->critical_pct == 0 || o->critical_pct > 100 || o->warning_pct >= o->critical_pct) {
        o->warning_pct = CMG_ALERTS_WARNING_PCT;   /* a store edited by hand */
        o->critical_pct = CMG_ALERTS_CRITICAL_PCT;
    }
    if (rc < 0)
        cmg_alert_settings_free(o);
    return rc;
}

void cmg_alert_settings_free(struct cmg_alert_settings *s)
{
    free(s->webhook);
    free(s->webhook_ca);
    s->webhook = s->webhook_ca = NULL;
}

static int put(struct cmg_store *st, const char *name, const char *value)
{
    sqlite3_stmt *q =
        value ? cmg_store_prepare(st, "INSERT OR REPLACE INTO alert_settings VALUES (?, ?)",
                                  "ss", name, value)
              : cmg_store_prepare(st, "DELETE FROM alert_settings WHERE name = ?", "s", name);
    int step = q ? sqlite3_step(q) : SQLITE_ERROR;

    sqlite3_finalize(q);
    return step == SQLITE_DONE ? 0 : -1;
}

static int put_u64(struct cmg_store *st, const char *name, uint64_t v)
{
    char text[32];

    snprintf(text, sizeof(text), "%llu", (unsigned long long)v);
    return put(st, name, text);
}

void cmg_alerts_url_origin(const char *url, char *out, size_t outlen)
{
    const char *p = strstr(url, "://"), *host, *at;
    size_t n;

    if (!p) {
        snprintf(out, outlen, "(not a URL)");
        return;
    }
    host = p + 3;
    n = strcspn(host, "/?#");
    at = memrchr(host, '@', n);
    if (at) {   /* user:password@ stays out (the password may hold an '@') */
        n -= (size_t)(at + 1 - host);
        host = at + 1;
    }
    snprintf(out, outlen, "%.*s%.*s", (int)(p + 3 - url), url, (int)n, host);
}

/* ---- the operations ---- */

static const char *arg_str(const cJSON *args, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(args, name);
    return cJSON_IsString(v) && v->valuestring[0] ? v->valuestring : NULL;
}

/* A percentage argument: absent (keeps cur), or a whole number in 1..100. */
static int pct_arg(const cJSON *args, const char *name, unsigned cur, unsigned *out,
                   char *msg, size_t len)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(args, name);
    const char *text = cJSON_GetStringValue(v), *end = "";
    int64_t n;

    *out = cur;
    if (!v)
        return 0;
    if (cJSON_IsNumber(v) && v->valuedouble == (double)(int64_t)v->valuedouble)
        n = (int64_t)v->valuedouble;
    else
        n = leading_number(text, &end);
    if (n < 1 || n > 100 || *end)
        return cmg_site_fail(msg, len, 400, "--%s: expected a whole percentage 1..100, found '%s'",
                    name, text ? text : cJSON_IsNumber(v) ? "a number out of range" : "?");
    *out = (unsigned)n;
    return 0;
}

/* A threshold's value given as a string or a number. */
static const char *value_text(const cJSON *args, char *buf, size_t len)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(args, "value");

    if (cJSON_IsNumber(v)) {
        /* a whole number as digits; any other as itself, which no parser takes */
        bool whole = v->valuedouble >= 0 && v->valuedouble < 9e18 &&
                     v->valuedouble == floor(v->valuedouble);
        snprintf(buf, len, whole ? "%.0f" : "%.17g", v->valuedouble);
        return buf;
    }
    return cJSON_GetStringValue(v);
}

/* The value of NAME in the store's unit (bytes, days, seconds); 400 if malformed. */
static int threshold_value(const char *name, const char *text, int64_t *out, char *msg,
                           size_t len)
{
    const char *end = "";

    if (!text)
        return cmg_site_fail(msg, len, 400, "alert set %s: a value is needed", name);
    if (!strncmp(name, "egress-", 7)) {
        if ((*out = cmg_alerts_parse_size(text)) < 0)
            return cmg_site_fail(msg, len, 400,
                                 "%s: expected a size such as 100GiB, 500GB or a number "
                                 "of bytes (B, KB/MB/GB/TB, KiB/MiB/GiB/TiB), found '%s'",
                                 name, text);
    } else if (!strcmp(name, "cert-expiry")) {
        *out = leading_number(text, &end);
        if (*out >= 0 && !strcmp(end, "d"))
            end = "";
        if (*out < 0 || *end || *out > 3650)
            return cmg_site_fail(msg, len, 400,
                                 "cert-expiry: expected a number of days such as 30 or "
                                 "30d (0: off), found '%s'",
                                 text);
    } else if ((*out = cmg_alerts_parse_duration(text)) < 0 || *out > NO_TUNNEL_MAX_S) {
        return cmg_site_fail(msg, len, 400,
                             "no-tunnel: expected a duration such as 30s, 10m or 1h (a "
                             "bare number: minutes; 0: off; at most 3650d), found '%s'",
                             text);
    }
    return 0;
}

static const char *store_key(const char *name)
{
    return !strcmp(name, "egress-monthly") ? "egress_monthly"
         : !strcmp(name, "egress-daily")   ? "egress_daily"
         : !strcmp(name, "cert-expiry")    ? "cert_expiry_days"
         : !strcmp(name, "no-tunnel")      ? "no_tunnel"
                                           : NULL;
}

static int known_name(const char *name, char *msg, size_t len)
{
    if (!name)
        return cmg_site_fail(msg, len, 400,
                             "which threshold? expected egress-monthly, egress-daily, "
                             "cert-expiry or no-tunnel");
    if (!store_key(name))
        return cmg_site_fail(msg, len, 400, "unknown threshold '%s': expected egress-monthly, "
                    "egress-daily, cert-expiry or no-tunnel", name);
    return 0;
}

static int write_set(struct cmg_site_ctx *s, const char *key, int64_t value, unsigned warning,
                     unsigned critical, char *msg, size_t len)
{
    struct cmg_store *st = s->store;
    int rc = 0;

    if (cmg_store_begin(st) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(st));
    if (put_u64(st, key, (uint64_t)value) < 0 || put_u64(st, "warning_pct", warning) < 0 ||
        put_u64(st, "critical_pct", critical) < 0 || cmg_store_commit(st) < 0)
        rc = cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(st));
    if (rc)
        cmg_store_rollback(st);
    return rc;
}

static int list_result(struct cmg_site_ctx *s, cJSON **result, char *msg, size_t len);

int cmg_alerts_op_set(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                      size_t len)
{
    const char *name = arg_str(args, "name");
    struct cmg_alert_settings cur;
    unsigned warning, critical;
    char buf[32];
    int64_t value = 0;
    int rc;

    if ((rc = known_name(name, msg, len)) != 0 ||
        (rc = threshold_value(name, value_text(args, buf, sizeof(buf)), &value, msg, len)) != 0)
        return rc;
    if (strncmp(name, "egress-", 7) && (cJSON_GetObjectItemCaseSensitive(args, "warning") ||
                                        cJSON_GetObjectItemCaseSensitive(args, "critical")))
        return cmg_site_fail(msg, len, 400,
                             "%s: --warning and --critical are percentages of an egress "
                             "allowance, found them given for %s",
                             name, name);
    if (cmg_alert_settings_load(s->store, &cur) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    cmg_alert_settings_free(&cur);
    if ((rc = pct_arg(args, "warning", cur.warning_pct, &warning, msg, len)) != 0 ||
        (rc = pct_arg(args, "critical", cur.critical_pct, &critical, msg, len)) != 0)
        return rc;
    if (warning >= critical)
        return cmg_site_fail(msg, len, 400,
                             "expected 0 < warning < critical <= 100, found warning %u %% "
                             "and critical %u %%",
                             warning, critical);
    if ((rc = write_set(s, store_key(name), value, warning, critical, msg, len)) != 0)
        return rc;
    return list_result(s, result, msg, len);
}

int cmg_alerts_op_unset(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                        size_t len)
{
    const char *name = arg_str(args, "name");
    int rc;

    if ((rc = known_name(name, msg, len)) != 0)
        return rc;
    if (put(s->store, store_key(name), NULL) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    return list_result(s, result, msg, len);
}

static bool plain_url(const char *u)
{
    for (; *u; u++)
        if ((unsigned char)*u <= ' ' || *u == 0x7f)
            return false;
    return true;
}

/* The host and port as the delivery will read them (client/fetch.c's own parser). */
static int webhook_host_check(const char *url, char *msg, size_t len)
{
    const char *p = strstr(url, "://") + 3, *at;
    size_t n = strcspn(p, "/?#");
    char authority[300], host[256];
    int port;

    if ((at = memrchr(p, '@', n))) {
        n -= (size_t)(at + 1 - p);
        p = at + 1;
    }
    if (n >= sizeof(authority) ||
        (memcpy(authority, p, n), authority[n] = '\0',
         cmg_fetch_split_addr(authority, 443, host, sizeof(host), &port) < 0))
        return cmg_site_fail(msg, len, 400, "webhook: expected a host and port such as "
                    "hooks.example.com:443, found '%.*s'", (int)(n < 200 ? n : 200), p);
    return 0;
}

static int webhook_check(const char *url, const char *ca, char *msg, size_t len)
{
    int rc;

    if (strncmp(url, "https://", 8) && strncmp(url, "http://", 7))
        return cmg_site_fail(msg, len, 400,
                             "webhook: expected an http:// or https:// URL (or --off), "
                             "found '%.200s'",
                             url);
    if (strlen(url) > WEBHOOK_URL_MAX || !plain_url(url) || !url[strcspn(url, ":") + 3] ||
        strchr("/?#", url[strcspn(url, ":") + 3]))
        return cmg_site_fail(msg, len, 400,
                             "webhook: expected a URL with a host, at most %d characters, "
                             "no spaces or control characters",
                             WEBHOOK_URL_MAX);
    if ((rc = webhook_host_check(url, msg, len)) != 0)
        return rc;
    if (ca && (strlen(ca) > WEBHOOK_CA_MAX || !cmg_pem_certs_only(ca)))
        return cmg_site_fail(msg, len, 400,
                             "webhook --ca: expected PEM certificates (the roots of the "
                             "webhook's HTTPS), found none");
    if (ca && strncmp(url, "https://", 8))
        return cmg_site_fail(msg, len, 400,
                             "webhook --ca: the URL is http://, found no TLS to check");
    return 0;
}

int cmg_alerts_op_webhook(struct cmg_site_ctx *s, const cJSON *args, cJSON **result,
                          char *msg, size_t len)
{
    const char *url = arg_str(args, "url"), *ca = arg_str(args, "ca");
    bool off = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(args, "off"));
    struct cmg_store *st = s->store;
    int rc = 0;

    if (off == !!url)
        return cmg_site_fail(msg, len, 400, "webhook: expected a URL or --off (one of them)");
    if (url && (rc = webhook_check(url, ca, msg, len)) != 0)
        return rc;
    if (cmg_store_begin(st) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(st));
    if (put(st, "webhook", off ? NULL : url) < 0 || put(st, "webhook_ca", off ? NULL : ca) < 0 ||
        cmg_store_commit(st) < 0)
        rc = cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(st));
    if (rc) {
        cmg_store_rollback(st);
        return rc;
    }
    return list_result(s, result, msg, len);
}

static void add_bytes_or_null(cJSON *o, const char *name, uint64_t v)
{
    if (v)
        cJSON_AddNumberToObject(o, name, (double)v);
    else
        cJSON_AddNullToObject(o, name);
}

/* {"settings": {...}, "alerts": [open ones]} */
static int list_result(struct cmg_site_ctx *s, cJSON **result, char *msg, size_t len)
{
    struct cmg_alert_settings a;
    cJSON *set, *open;

    if (cmg_alert_settings_load(s->store, &a) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    if (!(open = cmg_alerts_open_json(s->store))) {
        cmg_alert_settings_free(&a);
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    }
    *result = cJSON_CreateObject();
    set = cJSON_AddObjectToObject(*result, "settings");
    add_bytes_or_null(set, "egress_monthly", a.egress_monthly);
    add_bytes_or_null(set, "egress_daily", a.egress_daily);
    cJSON_AddNumberToObject(set, "warning_pct", a.warning_pct);
    cJSON_AddNumberToObject(set, "critical_pct", a.critical_pct);
    cJSON_AddNumberToObject(set, "cert_expiry_days", a.cert_expiry_days);
    cJSON_AddNumberToObject(set, "no_tunnel", (double)a.no_tunnel_s);
    if (a.webhook)
        cJSON_AddStringToObject(set, "webhook", a.webhook);
    else
        cJSON_AddNullToObject(set, "webhook");
    cJSON_AddBoolToObject(set, "webhook_ca", a.webhook_ca != NULL);
    cJSON_AddItemToObject(*result, "alerts", open);
    cmg_alert_settings_free(&a);
    return 0;
}

int cmg_alerts_op_list(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                       size_t len)
{
    (void)args;
    return list_result(s, result, msg, len);
}

cJSON *cmg_alerts_open_json(struct cmg_store *st)
{
    sqlite3_stmt *q;
    cJSON *arr;
    int step;

    if (!(q = cmg_store_prepare(st, "SELECT id, kind, subject, level, message, value, "
                                    "threshold, opened, updated FROM alerts WHERE resolved IS "
                                    "NULL ORDER BY id DESC", "")))
        return NULL;
    arr = cJSON_CreateArray();
    while ((step = sqlite3_step(q)) == SQLITE_ROW) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "id", (double)sqlite3_column_int64(q, 0));
        cJSON_AddStringToObject(o, "kind", (const char *)sqlite3_column_text(q, 1));
        cJSON_AddStringToObject(o, "subject", (const char *)sqlite3_column_text(q, 2));
        cJSON_AddStringToObject(o, "level", (const char *)sqlite3_column_text(q, 3));
        cJSON_AddStringToObject(o, "message", (const char *)sqlite3_column_text(q, 4));
        cJSON_AddNumberToObject(o, "value", sqlite3_column_double(q, 5));
        cJSON_AddNumberToObject(o, "threshold", sqlite3_column_double(q, 6));
        cJSON_AddNumberToObject(o, "opened", (double)sqlite3_column_int64(q, 7));
        cJSON_AddNumberToObject(o, "updated", (double)sqlite3_column_int64(q, 8));
        cJSON_AddItemToArray(arr, o);
    }
    sqlite3_finalize(q);
    if (step != SQLITE_DONE) {
        cJSON_Delete(arr);
        return NULL;
    }
    return arr;
}
