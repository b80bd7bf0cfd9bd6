/* The status document as one screen of text, the matrix first; see status.h. */
#include "site/status.h"

#include "core/log.h"

#include <inttypes.h>
#include <math.h>
#include <string.h>
#include <time.h>

#define MAX_CERT_LINES 10
#define SHOWN_MAX 1024   /* bytes of one string as shown, "..." past it */

/* A string from the network or the store as the terminal shows it, never as what it
 * would do: control characters (C0, DEL, and C1, U+0080..U+009F) and bytes that are no
 * part of valid UTF-8 written as \xNN, so that a name cannot move the cursor, retitle
 * the window or hide what follows it. A value of the function lives until the end of
 * the statement that called it: shown(x).s is an argument of printf as it is. */
struct shown {
    char s[SHOWN_MAX];
};

static struct shown shown(const char *in)
{
    struct shown out;
    const unsigned char *p = (const unsigned char *)in;
    size_t n = strlen(in), i = 0, o = 0;

    while (i < n) {
        size_t take = cmg_utf8_char(p + i, n - i);
        bool control = take == 0 || p[i] < 0x20 || p[i] == 0x7F ||
                       (take == 2 && p[i] == 0xC2 && p[i + 1] < 0xA0);
        size_t len = take ? take : 1;

        if (o + (control ? 4 * len : len) + 4 > sizeof(out.s)) {
            memcpy(out.s + o, "...", 3);
            o += 3;
            break;
        }
        for (size_t k = 0; control && k < len; k++)
            o += (size_t)snprintf(out.s + o, 5, "\\x%02x", p[i + k]);
        if (!control) {
            memcpy(out.s + o, p + i, len);
            o += len;
        }
        i += len;
    }
    out.s[o] = 0;
    return out;
}

/* The string at key, shown. */
static struct shown text(const cJSON *o, const char *key)
{
    return shown(cmg_json_str(o, key));
}

static bool is_true(const cJSON *o, const char *key)
{
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, key));
}

static const cJSON *item(const cJSON *o, const char *key)
{
    return cJSON_GetObjectItemCaseSensitive(o, key);
}

void cmg_format_age(int64_t s, char *out, size_t len)
{
    if (s < 0)
        s = 0;
    if (s < 60)
        snprintf(out, len, "%" PRId64 "s", s);
    else if (s < 3600)
        snprintf(out, len, "%" PRId64 "m%" PRId64 "s", s / 60, s % 60);
    else if (s < 86400)
        snprintf(out, len, "%" PRId64 "h%" PRId64 "m", s / 3600, s % 3600 / 60);
    else
        snprintf(out, len, "%" PRId64 "d%" PRId64 "h", s / 86400, s % 86400 / 3600);
}

void cmg_format_bytes(double b, char *out, size_t len)
{
    static const char *const units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    size_t u = 0;

    if (b < 1024) {
        snprintf(out, len, "%.0f B", b);
        return;
    }
    b /= 1024;
    while (b >= 1024 && u + 1 < sizeof(units) / sizeof(units[0])) {
        b /= 1024;
        u++;
    }
    snprintf(out, len, b == floor(b) ? "%.0f %s" : "%.1f %s", b, units[u]);
}

static void iso(double t, char *out, size_t len)
{
    time_t tt = (time_t)t;
    struct tm tm;

    gmtime_r(&tt, &tm);
    strftime(out, len, "%Y-%m-%d %H:%M:%SZ", &tm);
}

/* "3m12s" since t, or "-" when t is unknown (null, 0: never a time of this deployment). */
static void age_since(const cJSON *doc, const cJSON *t, char *out, size_t len)
{
    if (cJSON_IsNumber(t) && t->valuedouble > 0)
        cmg_format_age((int64_t)(cmg_json_num(doc, "time", 0) - t->valuedouble), out, len);
    else
        snprintf(out, len, "-");
}

static void print_matrix(const cJSON *doc, FILE *f)
{
    const cJSON *t;

    fprintf(f, "%-24s %-16s %-10s %-9s %-9s %s\n", "GATEWAY", "CONNECTOR", "STATE", "SINCE",
            "RTT", "VIEWS (gateway/connector)");
    cJSON_ArrayForEach(t, item(doc, "tunnels")) {
        char since[32], rtt[32] = "-";
        age_since(doc, item(t, "since"), since, sizeof(since));
        /* a round-trip time is the connector's: not shown from a report gone stale */
        if (cJSON_IsNumber(item(t, "rtt_ms")) &&
            strcmp(cmg_json_str(t, "connector_view"), "stale") &&
            strcmp(cmg_json_str(t, "connector_view"), "none"))
            snprintf(rtt, sizeof(rtt), cmg_json_num(t, "rtt_ms", 0) < 10 ? "%.2f ms" : "%.0f ms",
                     cmg_json_num(t, "rtt_ms", 0));
        fprintf(f, "%-24s %-16s %-10s %-9s %-9s %s/%s\n", text(t, "gateway").s,
                text(t, "connector").s, text(t, "state").s, since, rtt,
                text(t, "gateway_view").s, text(t, "connector_view").s);
    }
}

static void print_gateways(const cJSON *doc, FILE *f)
{
    const cJSON *g;

    fprintf(f, "\n%-24s %-10s %-7s %-18s %-8s %s\n", "GATEWAY", "STATE", "POLICY",
            "LAST REPORT", "DEVICES", "VIA");
    cJSON_ArrayForEach(g, item(doc, "gateways")) {
        char age[32], last[48];
        cmg_format_age((int64_t)cmg_json_num(g, "last_report_age", 0), age, sizeof(age));
        snprintf(last, sizeof(last), "%s ago%s", age, is_true(g, "stale") ? " STALE" : "");
        fprintf(f, "%-24s %-10s %-7.0f %-18s %-8.0f %s\n", text(g, "instance").s,
                text(g, "state").s, cmg_json_num(g, "policy_version", 0), last,
                cmg_json_num(g, "devices_now", 0), text(g, "via").s);
    }
    if (cmg_json_num(doc, "gateways_more", 0) > 0)
        fprintf(f, "... and %.0f more instances that reported longer ago (not shown)\n",
                cmg_json_num(doc, "gateways_more", 0));
}

static void print_connectors(const cJSON *doc, FILE *f)
{
    const cJSON *c;

    fprintf(f, "\n%-24s %-18s %s\n", "CONNECTOR", "LAST REPORT", "POLICY");
    cJSON_ArrayForEach(c, item(doc, "connectors")) {
        char age[32], last[48], policy[24] = "-";
        if (cJSON_IsNumber(item(c, "last_report"))) {
            cmg_format_age((int64_t)cmg_json_num(c, "last_report_age", 0), age, sizeof(age));
            snprintf(last, sizeof(last), "%s ago%s", age, is_true(c, "stale") ? " STALE" : "");
        } else
            snprintf(last, sizeof(last), "never reported");
        if (cJSON_IsNumber(item(c, "policy_version")))
            snprintf(policy, sizeof(policy), "%.0f", cmg_json_num(c, "policy_version", 0));
        const char *note = is_true(c, "revoked") ? " revoked"
                           : is_true(c, "draining") ? " draining" : "";
        fprintf(f, "%-24s %-18s %s%s\n", text(c, "name").s, last, policy, note);
    }
}

static void print_traffic(const cJSON *doc, FILE *f)
{
    static const char *const periods[][2] = {{"today", "today"}, {"month", "this month"}};
    const cJSON *t = item(doc, "traffic");

    fprintf(f, "\n%-12s %-10s %-14s %s\n", "TRAFFIC", "REQUESTS", "REQUEST BYTES",
            "RESPONSE BYTES");
    for (size_t i = 0; i < 2; i++) {
        const cJSON *p = item(t, periods[i][0]);
        char up[32], down[32];
        cmg_format_bytes(cmg_json_num(p, "request_bytes", 0), up, sizeof(up));
        cmg_format_bytes(cmg_json_num(p, "response_bytes", 0), down, sizeof(down));
        fprintf(f, "%-12s %-10.0f %-14s %s\n", periods[i][1], cmg_json_num(p, "requests", 0), up,
                down);
    }
}

/* "12.3 GiB of 100 GiB (12 %)", or "... (no monthly limit set)". */
static void egress_line(const cJSON *e, const char *used_key, const char *limit_key,
                        const char *pct_key, const char *what, const char *period, FILE *f)
{
    char used[32], limit[32];

    cmg_format_bytes(cmg_json_num(e, used_key, 0), used, sizeof(used));
    if (!cJSON_IsNumber(item(e, limit_key))) {
        fprintf(f, "  %s %s (no %s limit set)\n", used, period, what);
        return;
    }
    cmg_format_bytes(cmg_json_num(e, limit_key, 0), limit, sizeof(limit));
    fprintf(f, "  %s of %s %s (%.0f %%)\n", used, limit, period,
            floor(cmg_json_num(e, pct_key, 0)));
}

static void print_egress(const cJSON *doc, FILE *f)
{
    const cJSON *e = item(doc, "egress"), *g;

    fprintf(f, "\nEGRESS (bytes to devices; warning at %.0f %%, critical at %.0f %% of a "
            "limit)\n", cmg_json_num(e, "warning_pct", 50), cmg_json_num(e, "critical_pct", 90));
    egress_line(e, "today", "daily_limit", "today_pct", "daily", "today", f);
    egress_line(e, "month", "monthly_limit", "month_pct", "monthly", "this month", f);
    cJSON_ArrayForEach(g, item(e, "by_gateway")) {
        char today[32], month[32];
        cmg_format_bytes(cmg_json_num(g, "today", 0), today, sizeof(today));
        cmg_format_bytes(cmg_json_num(g, "month", 0), month, sizeof(month));
        fprintf(f, "  %-24s %s today, %s this month\n", text(g, "instance").s, today, month);
    }
}

static void print_certificates(const cJSON *doc, FILE *f)
{
    const cJSON *list = item(doc, "certificates"), *c;
    int n = cJSON_GetArraySize(list), shown = 0;

    fprintf(f, "\nCERTIFICATES ending within %.0f days:%s\n",
            cmg_json_num(doc, "cert_expiry_days", CMG_CERT_EXPIRY_DAYS_DEFAULT), n ? "" : " none");
    cJSON_ArrayForEach(c, list) {
        char when[40];
        double days = cmg_json_num(c, "days_left", 0);

        if (shown++ == MAX_CERT_LINES) {
            fprintf(f, "  ... and %.0f more (--json lists %s)\n",
                    n - MAX_CERT_LINES + cmg_json_num(doc, "certificates_more", 0),
                    cmg_json_num(doc, "certificates_more", 0) > 0 ? "the soonest of them"
                                                                  : "them all");
            break;
        }
        char left[48];
        iso(cmg_json_num(c, "not_after", 0), when, sizeof(when));
        if (days < 0) {
            char age[32];
            cmg_format_age((int64_t)(cmg_json_num(doc, "time", 0) -
                                     cmg_json_num(c, "not_after", 0)),
                           age, sizeof(age));
            snprintf(left, sizeof(left), "EXPIRED %s ago", age);
        } else
            snprintf(left, sizeof(left), "in %.0f day%s", days, days == 1 ? "" : "s");
        fprintf(f, "  %-9s %-28s serial %-20s %s (%s)\n", text(c, "kind").s, text(c, "name").s,
                text(c, "serial").s, when, left);
    }
}

static void print_alerts(const cJSON *doc, FILE *f)
{
    const cJSON *list = item(doc, "alerts"), *a;

    fprintf(f, "\nALERTS open:%s\n", cJSON_GetArraySize(list) ? "" : " none");
    cJSON_ArrayForEach(a, list) {
        char age[32];
        age_since(doc, item(a, "opened"), age, sizeof(age));
        fprintf(f, "  %-8s %-16s %s: %s (for %s)\n", text(a, "level").s, text(a, "kind").s,
                text(a, "subject").s, text(a, "message").s, age);
    }
}

/* Nothing reported yet: why, and what to look at. */
static void print_no_report(const cJSON *doc, FILE *f)
{
    fprintf(f, "no report yet: gateways report every report_interval (%.0f s by default) "
            "through their connectors' tunnels, and connectors pass the reports to "
            "'cmg site serve' on its feed listener.\n"
            "Are the connectors running and connected to the site and the gateways? %d "
            "connector(s) registered here ('cmg site connector list').\n",
            cmg_json_num(doc, "report_interval", CMG_REPORT_INTERVAL_DEFAULT),
            cJSON_GetArraySize(item(doc, "connectors")));
    if (cJSON_IsFalse(item(doc, "site_serving")))
        fprintf(f, "'cmg site serve' is not running on this site: reports have nowhere to "
                "go.\n");
}

void cmg_site_status_print(const cJSON *doc, FILE *f)
{
    char now[40];
    bool reports = cJSON_GetArraySize(item(doc, "gateways")) > 0;
    const cJSON *c;

    cJSON_ArrayForEach(c, item(doc, "connectors"))
        reports |= cJSON_IsNumber(item(c, "last_report"));
    iso(cmg_json_num(doc, "time", 0), now, sizeof(now));
    fprintf(f, "site %s (role %s), policy version %.0f, at %s\n\n", text(doc, "service_name").s,
            text(doc, "site_role").s, cmg_json_num(doc, "policy_version", 0), now);
    if (!reports) {
        print_no_report(doc, f);
    } else {
        print_matrix(doc, f);
        print_gateways(doc, f);
    }
    print_connectors(doc, f);
    print_traffic(doc, f);
    print_egress(doc, f);
    print_certificates(doc, f);
    print_alerts(doc, f);
}
