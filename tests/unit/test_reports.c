/* The site's report logic: the counters' growth never goes negative (a counter that went
 * down is a new baseline), and a connector's report is checked field by field: types,
 * sizes, bounded lists, role ids as the policy's, printable strings, states from their
 * lists. Kept in a store: a report is taken only from a connector it lists, its growth is
 * clamped to a plausible rate, a boot heard of later wins whatever its clock says, each
 * instance's latest boot outlives report_retention, and 4097 roles are kept quickly. */
#include "site/reports.h"

#include <math.h>
#include <setjmp.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <time.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

static void growth_is_the_difference(void **state)
{
    uint64_t before[3] = {10, 0, 5}, now[3] = {15, 7, 5}, d[3];
    (void)state;
    assert_int_equal(cmg_report_delta(before, now, 3, d), 0);
    assert_int_equal(d[0], 5);
    assert_int_equal(d[1], 7);
    assert_int_equal(d[2], 0);
}

static void a_counter_that_went_down_counts_nothing(void **state)
{
    uint64_t before[3] = {10, UINT64_C(9007199254740992), 5}, now[3] = {3, 0, 6}, d[3];
    (void)state;
    assert_int_equal(cmg_report_delta(before, now, 3, d), 2);
    assert_int_equal(d[0], 0);
    assert_int_equal(d[1], 0);
    assert_int_equal(d[2], 1);
}

#define GW(extra) "{\"instance\":\"h/0\",\"boot\":\"0123456789abcdef\",\"seq\":1,\"started\":1," \
    "\"time\":2,\"interval\":300,\"state\":\"serving\",\"policy_version\":3," \
    "\"device_connections\":4,\"devices_now\":0,\"egress_bytes\":5,\"ingress_bytes\":6," \
    "\"roles\":[{\"role\":\"7205\",\"requests\":{\"1xx\":0,\"2xx\":1,\"3xx\":0,\"4xx\":0," \
    "\"5xx\":0,\"other\":0},\"request_bytes\":" extra ",\"response_bytes\":9}]," \
    "\"refusals\":{\"forbidden_path\":1},\"tunnels\":[{\"connector\":\"c1\",\"peer\":\"p\"," \
    "\"state\":\"up\",\"since\":1}],\"certificates\":[]}"
#define CN(gw) "{\"connector\":\"c1\",\"time\":1,\"interval\":300,\"draining\":false," \
    "\"policy_version\":3,\"tunnels\":[{\"gateway\":\"g:1\",\"instance\":\"\",\"state\":\"up\"," \
    "\"since\":1,\"rtt_ms\":null,\"reconnects\":0}],\"gateway_reports\":[" gw "]}"

static bool accepted(const char *doc)
{
    char err[300];
    cJSON *d = cmg_report_parse(doc, strlen(doc), err, sizeof(err));
    bool ok = d != NULL;
    cJSON_Delete(d);
    return ok;
}

static void a_good_report_is_accepted(void **state)
{
    (void)state;
    assert_true(accepted(CN(GW("8"))));
    assert_true(accepted(CN("")));
    assert_true(accepted(CN(GW("9007199254740992"))));
}

static void bad_numbers_are_refused(void **state)
{
    (void)state;
    assert_false(accepted(CN(GW("-1"))));
    assert_false(accepted(CN(GW("1.5"))));
    assert_false(accepted(CN(GW("1e30"))));
    assert_false(accepted(CN(GW("9007199254740993000"))));
    assert_false(accepted(CN(GW("\"8\""))));
    assert_false(accepted(CN(GW("null"))));
}

static void bad_shapes_are_refused(void **state)
{
    (void)state;
    assert_false(accepted(""));
    assert_false(accepted("[]"));
    assert_false(accepted("{\"time\":1}"));
    assert_false(accepted(CN("1")));
    assert_false(accepted(CN("{}")));
    assert_false(accepted(CN(GW("8")) " x"));   /* something after the document */
    assert_false(accepted("{\"connector\":\"c1\",\"time\":1,\"interval\":300,\"draining\":0,"
                          "\"policy_version\":3,\"tunnels\":[],\"gateway_reports\":[]}"));
}

static void strings_must_be_printable_and_states_known(void **state)
{
    (void)state;
    assert_false(accepted(CN("{\"instance\":\"a\\u001bb\"}")));
    assert_false(accepted("{\"connector\":\"c\\n1\",\"time\":1,\"interval\":300,"
                          "\"draining\":false,\"policy_version\":3,\"tunnels\":[],"
                          "\"gateway_reports\":[]}"));
    assert_false(accepted("{\"connector\":\"c\\u00e91\",\"time\":1,\"interval\":300,"
                          "\"draining\":false,\"policy_version\":3,\"tunnels\":[],"
                          "\"gateway_reports\":[]}"));
    /* a connector's tunnel in a state the contract does not name; since null is fine */
    assert_false(accepted("{\"time\":1,\"interval\":300,\"draining\":false,\"policy_version\":3,"
                          "\"tunnels\":[{\"gateway\":\"g:1\",\"instance\":\"\",\"state\":\"<b>\","
                          "\"since\":1,\"rtt_ms\":null,\"reconnects\":0}],\"gateway_reports\":[]}"));
    assert_true(accepted("{\"time\":1,\"interval\":300,\"draining\":false,\"policy_version\":3,"
                         "\"tunnels\":[{\"gateway\":\"g:1\",\"instance\":\"\",\"state\":\"down\","
                         "\"since\":null,\"rtt_ms\":null,\"reconnects\":0}],\"gateway_reports\":[]}"));
}

/* A gateway report, made to measure. */
static cJSON *gateway(const char *instance, const char *boot, double seq, double started,
                      double t, const char *via, int nroles, double count)
{
    cJSON *g = cJSON_CreateObject(), *roles = cJSON_AddArrayToObject(g, "roles");
    cJSON *tun = cJSON_CreateObject();
    char id[32];

    cJSON_AddStringToObject(g, "instance", instance);
    cJSON_AddStringToObject(g, "boot", boot);
    cJSON_AddNumberToObject(g, "seq", seq);
    cJSON_AddNumberToObject(g, "started", started);
    cJSON_AddNumberToObject(g, "time", t);
    cJSON_AddNumberToObject(g, "interval", 300);
    cJSON_AddStringToObject(g, "state", "serving");
    cJSON_AddNumberToObject(g, "policy_version", 1);
    cJSON_AddNumberToObject(g, "device_connections", count);
    cJSON_AddNumberToObject(g, "devices_now", 0);
    cJSON_AddNumberToObject(g, "egress_bytes", count);
    cJSON_AddNumberToObject(g, "ingress_bytes", count);
    for (int i = 0; i < nroles; i++) {
        cJSON *r = cJSON_CreateObject(), *req = cJSON_AddObjectToObject(r, "requests");
        snprintf(id, sizeof(id), "%d", i);
        cJSON_AddStringToObject(r, "role", id);
        for (const char *const *c = (const char *const[]){"1xx", "2xx", "3xx", "4xx", "5xx",
                                                           "other", NULL}; *c; c++)
            cJSON_AddNumberToObject(req, *c, count);
        cJSON_AddNumberToObject(r, "request_bytes", count);
        cJSON_AddNumberToObject(r, "response_bytes", count);
        cJSON_AddItemToArray(roles, r);
    }
    cJSON_AddObjectToObject(g, "refusals");
    cJSON_AddStringToObject(tun, "connector", via);
    cJSON_AddStringToObject(tun, "peer", "127.0.0.1:1");
    cJSON_AddStringToObject(tun, "state", "up");
    cJSON_AddNumberToObject(tun, "since", 1);
    cJSON_AddItemToArray(cJSON_AddArrayToObject(g, "tunnels"), tun);
    cJSON_AddArrayToObject(g, "certificates");
    return g;
}

/* A connector's report of the gateway reports gs (taken), checked as the site checks it. */
static cJSON *carrying(cJSON *g1, cJSON *g2)
{
    cJSON *doc = cJSON_CreateObject(), *list;
    char *text, err[300];

    cJSON_AddNumberToObject(doc, "time", 1);
    cJSON_AddNumberToObject(doc, "interval", 300);
    cJSON_AddBoolToObject(doc, "draining", false);
    cJSON_AddNumberToObject(doc, "policy_version", 1);
    cJSON_AddArrayToObject(doc, "tunnels");
    list = cJSON_AddArrayToObject(doc, "gateway_reports");
    cJSON_AddItemToArray(list, g1);
    if (g2)
        cJSON_AddItemToArray(list, g2);
    text = cJSON_PrintUnformatted(doc);
    cJSON_Delete(doc);
    doc = cmg_report_parse(text, strlen(text), err, sizeof(err));
    if (!doc)
        fail_msg("refused: %s", err);
    free(text);
    return doc;
}

static struct cmg_store *st;

static int store_up(void **state)
{
    static char dir[] = "/tmp/test_reports.XXXXXX";
    char err[300];
    (void)state;
    return mkdtemp(dir) && cmg_store_open(dir, &st, err, sizeof(err)) == 0 ? 0 : -1;
}

static double number(const char *sql)
{
    sqlite3_stmt *q = NULL;
    double v = -1;

    if (sqlite3_prepare_v2(cmg_store_db(st), sql, -1, &q, NULL) == SQLITE_OK &&
        sqlite3_step(q) == SQLITE_ROW)
        v = sqlite3_column_double(q, 0);
    sqlite3_finalize(q);
    return v;
}

static void keep(const char *via, cJSON *doc, int64_t now)
{
    char err[300];
    assert_int_equal(cmg_report_ingest(st, via, doc, now, err, sizeof(err)), 0);
    cJSON_Delete(doc);
}

#define NOW 1790000000

static void only_a_connector_the_report_lists_is_believed(void **state)
{
    (void)state;
    keep("mallory", carrying(gateway("victim/0", "00000000000000a1", 5, NOW - 100, NOW, "c1", 1, 9),
                             NULL), NOW);
    assert_true(number("SELECT count(*) FROM gateways WHERE instance = 'victim/0'") == 0);
    assert_true(number("SELECT count(*) FROM report_boots WHERE instance = 'victim/0'") == 0);
    keep("c1", carrying(gateway("victim/0", "00000000000000a1", 5, NOW - 100, NOW, "c1", 1, 9),
                        NULL), NOW);
    assert_true(number("SELECT sum(r2xx) FROM traffic_month WHERE instance = 'victim/0'") == 9);
}

static void growth_is_clamped_to_a_plausible_rate(void **state)
{
    (void)state;
    /* a new boot 10 s old claiming 2^53 bytes and requests */
    keep("c1", carrying(gateway("fast/0", "00000000000000b1", 1, NOW - 10, NOW, "c1", 1,
                                9007199254740992.0), NULL), NOW);
    assert_true(number("SELECT egress_bytes FROM traffic_month WHERE instance = 'fast/0' AND role = ''")
                == 10 * 12500000000.0);
    assert_true(number("SELECT r2xx FROM traffic_month WHERE instance = 'fast/0' AND role <> ''")
                == 10 * 1e7);
}

static void the_boot_heard_of_last_wins_whatever_its_clock(void **state)
{
    (void)state;
    keep("c1", carrying(gateway("clock/0", "00000000000000c1", 3, NOW - 50, NOW - 10, "c1", 1, 1),
                        NULL), NOW - 10);
    /* restarted with its clock stepped back an hour */
    keep("c1", carrying(gateway("clock/0", "00000000000000c2", 1, NOW - 3600, NOW - 3599, "c1", 1, 1),
                        NULL), NOW);
    assert_true(number("SELECT boot = '00000000000000c2' FROM gateways WHERE instance = 'clock/0'") == 1);
    keep("c1", carrying(gateway("clock/0", "00000000000000c2", 2, NOW - 3600, NOW - 3598, "c1", 1, 2),
                        NULL), NOW + 1);
    assert_true(number("SELECT seq FROM gateways WHERE instance = 'clock/0'") == 2);
    /* a late report of the old boot moves the counts, not the row */
    keep("c1", carrying(gateway("clock/0", "00000000000000c1", 4, NOW - 50, NOW - 5, "c1", 1, 2),
                        NULL), NOW + 2);
    assert_true(number("SELECT boot = '00000000000000c2' FROM gateways WHERE instance = 'clock/0'") == 1);
}

static void the_latest_boot_outlives_retention(void **state)
{
    int64_t later = NOW + 40 * 86400;
    (void)state;
    keep("c1", carrying(gateway("quiet/0", "00000000000000d1", 1, NOW - 10, NOW, "c1", 1, 5), NULL), NOW);
    keep("c1", carrying(gateway("quiet/0", "00000000000000d2", 1, NOW - 5, NOW, "c1", 1, 5), NULL), NOW + 1);
    assert_int_equal(cmg_report_prune(st, later, 31 * 86400), 0);
    assert_true(number("SELECT count(*) FROM report_boots WHERE instance = 'quiet/0'") == 1);
    assert_true(number("SELECT count(*) FROM gateways WHERE instance = 'quiet/0'") == 0);
    /* back after 40 days: its counters grew by 1, and 1 is what is counted */
    keep("c1", carrying(gateway("quiet/0", "00000000000000d2", 2, NOW - 5, later, "c1", 1, 6), NULL), later);
    assert_true(number("SELECT r2xx FROM traffic_day WHERE instance = 'quiet/0' AND role <> ''"
                       " ORDER BY day DESC LIMIT 1") == 1);
    /* gone for good (400 days): its rows go */
    assert_int_equal(cmg_report_prune(st, later + 401 * 86400, 31 * 86400), 0);
    assert_true(number("SELECT count(*) FROM report_boots WHERE instance = 'quiet/0'") == 0);
    assert_true(number("SELECT count(*) FROM traffic_month WHERE instance = 'quiet/0'") == 0);
}

/* This process's CPU time: what other processes on a busy machine do does not count. */
static double seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Two reports of 4097 roles each (new instances, new boots): parsed, checked and kept in
 * well under the time the old quadratic code took (1.6 s and more). */
static void many_roles_are_kept_quickly(void **state)
{
    cJSON *doc;
    char *text, err[300];
    double t0, t1, t2;
    (void)state;

    for (int round = 0; round < 3; round++) {
        char inst[2][32], boot[2][17];
        for (int i = 0; i < 2; i++) {
            snprintf(inst[i], sizeof(inst[i]), "big%d/%d", round, i);
            snprintf(boot[i], sizeof(boot[i]), "00000000000001%d%d", round, i);
        }
        doc = carrying(gateway(inst[0], boot[0], 1, NOW - 300, NOW, "c1", 4097, 1),
                       gateway(inst[1], boot[1], 1, NOW - 300, NOW, "c1", 4097, 1));
        text = cJSON_PrintUnformatted(doc);
        cJSON_Delete(doc);
        t0 = seconds();
        doc = cmg_report_parse(text, strlen(text), err, sizeof(err));
        t1 = seconds();
        assert_non_null(doc);
        assert_int_equal(cmg_report_ingest(st, "c1", doc, NOW, err, sizeof(err)), 0);
        t2 = seconds();
        print_message("%zu bytes, 2 x 4097 roles: parse+check %.1f ms, kept %.1f ms of CPU\n",
                      strlen(text), (t1 - t0) * 1e3, (t2 - t1) * 1e3);
        assert_true(t2 - t0 < 1.0);   /* CPU seconds: the quadratic code took 1.6 and more */
        cJSON_Delete(doc);
        free(text);
    }
    assert_true(number("SELECT count(*) FROM traffic_day WHERE instance = 'big2/1'") == 4098);
}

static void role_twice_is_refused_at_any_distance(void **state)
{
    cJSON *g = gateway("dup/0", "00000000000000e1", 1, NOW - 10, NOW, "c1", 4097, 1);
    cJSON *roles = cJSON_GetObjectItem(g, "roles");
    char err[300];
    (void)state;
    cJSON_SetValuestring(cJSON_GetObjectItem(cJSON_GetArrayItem(roles, 4096), "role"), "0");
    assert_int_equal(cmg_report_check_gateway(g, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "twice"));
    cJSON_Delete(g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(growth_is_the_difference),
        cmocka_unit_test(a_counter_that_went_down_counts_nothing),
        cmocka_unit_test(a_good_report_is_accepted),
        cmocka_unit_test(bad_numbers_are_refused),
        cmocka_unit_test(bad_shapes_are_refused),
        cmocka_unit_test(strings_must_be_printable_and_states_known),
        cmocka_unit_test(role_twice_is_refused_at_any_distance),
        cmocka_unit_test(only_a_connector_the_report_lists_is_believed),
        cmocka_unit_test(growth_is_clamped_to_a_plausible_rate),
        cmocka_unit_test(the_boot_heard_of_last_wins_whatever_its_clock),
        cmocka_unit_test(the_latest_boot_outlives_retention),
        cmocka_unit_test(many_roles_are_kept_quickly),
    };
    return cmocka_run_group_tests(tests, store_up, NULL);
}
