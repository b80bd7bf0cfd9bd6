/* The site's report logic: the counters' growth never goes negative (a counter that went
 * down is a new baseline), and a connector's report is checked field by field: types,
 * sizes, bounded lists, role ids as the policy's. */
#include "site/reports.h"

#include <setjmp.h>
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(growth_is_the_difference),
        cmocka_unit_test(a_counter_that_went_down_counts_nothing),
        cmocka_unit_test(a_good_report_is_accepted),
        cmocka_unit_test(bad_numbers_are_refused),
        cmocka_unit_test(bad_shapes_are_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
