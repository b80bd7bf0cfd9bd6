/* The site's notifications: ids, types, TTLs and device ids as the contract spells them;
 * a gateway's notify report checked whole (types, sizes, printable ids, bounded lists);
 * kept once per (instance, boot, seq), a new boot closing the older boots' channels; the
 * feed's answer (held at the newest, tombstones for the expired, from the oldest kept). */
#include "site/notify.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define NOW 1790000000

static struct cmg_store *st;

static int store_up(void **state)
{
    static char dir[] = "/tmp/test_notify.XXXXXX";
    char err[300];
    (void)state;
    return mkdtemp(dir) && cmg_store_open(dir, &st, err, sizeof(err)) == 0 ? 0 : -1;
}

static int store_down(void **state)
{
    (void)state;
    cmg_store_close(st);
    return 0;
}

static void ids_as_the_contract_spells_them(void **state)
{
    char epoch[17];
    int64_t seq;
    (void)state;
    assert_int_equal(cmg_notify_id_parse("3f9a1c0e5b7d2a64-17", epoch, &seq), 0);
    assert_string_equal(epoch, "3f9a1c0e5b7d2a64");
    assert_int_equal(seq, 17);
    assert_int_equal(cmg_notify_id_parse("3f9a1c0e5b7d2a64-0", epoch, &seq), 0);
    static const char *const bad[] = {"", "3f9a1c0e5b7d2a64", "3f9a1c0e5b7d2a64-", "3F9a1c0e5b7d2a64-1",
                                      "3f9a1c0e5b7d2a6-1", "3f9a1c0e5b7d2a64-01", "3f9a1c0e5b7d2a64-1 ",
                                      "3f9a1c0e5b7d2a64--1", "3f9a1c0e5b7d2a64-1234567890123456789",
                                      "3f9a1c0e5b7d2a64x1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(cmg_notify_id_parse(bad[i], epoch, &seq), -1);
}

static void types_devices_and_ttls(void **state)
{
    char id[200];
    (void)state;
    assert_true(cmg_notify_type_ok("policy"));
    assert_true(cmg_notify_type_ok("a.b_c-D9"));
    assert_false(cmg_notify_type_ok("reset"));
    assert_false(cmg_notify_type_ok(""));
    assert_false(cmg_notify_type_ok("a b"));
    memset(id, 'a', 65);
    id[65] = 0;
    assert_false(cmg_notify_type_ok(id));
    id[64] = 0;
    assert_true(cmg_notify_type_ok(id));
    assert_true(cmg_notify_device_ok("cert:ab"));
    assert_true(cmg_notify_device_ok("a\"b\\c"));
    assert_false(cmg_notify_device_ok(""));
    assert_false(cmg_notify_device_ok("a b"));
    assert_false(cmg_notify_device_ok("caf\xc3\xa9"));
    memset(id, 'd', 128);
    id[128] = 0;
    assert_false(cmg_notify_device_ok(id));
    id[127] = 0;
    assert_true(cmg_notify_device_ok(id));
    assert_int_equal(cmg_notify_ttl_parse("1"), 1);
    assert_int_equal(cmg_notify_ttl_parse("90s"), 90);
    assert_int_equal(cmg_notify_ttl_parse("30m"), 1800);
    assert_int_equal(cmg_notify_ttl_parse("24h"), 86400);
    assert_int_equal(cmg_notify_ttl_parse("25h"), -1);
    assert_int_equal(cmg_notify_ttl_parse("0"), -1);
    assert_int_equal(cmg_notify_ttl_parse("1d"), -1);
    assert_int_equal(cmg_notify_ttl_parse("-5"), -1);
}

#define R(rest) "{\"instance\":\"gw\",\"boot\":\"0123456789abcdef\",\"seq\":1,\"time\":5" rest "}"

static void reports_are_checked_whole(void **state)
{
    static const char *const bad[] = {
        "[]", "{", R(",\"x\":1") " x", "{\"instance\":\"gw\",\"boot\":\"0123456789abcdef\",\"seq\":1}",
        "{\"instance\":\"\",\"boot\":\"0123456789abcdef\",\"seq\":1,\"time\":5}",
        "{\"instance\":\"gw\",\"boot\":\"0123456789ABCDEF\",\"seq\":1,\"time\":5}",
        "{\"instance\":\"gw\",\"boot\":\"0123456789abcdef\",\"seq\":0,\"time\":5}",
        "{\"instance\":\"gw\",\"boot\":\"0123456789abcdef\",\"seq\":-1,\"time\":5}",
        "{\"instance\":\"gw\",\"boot\":\"0123456789abcdef\",\"seq\":1e300,\"time\":5}",
        R(",\"delivered\":[]"), R(",\"delivered\":{\"x-1\":[\"d\"]}"),
        R(",\"delivered\":{\"0123456789abcdef-1\":\"d\"}"),
        R(",\"delivered\":{\"0123456789abcdef-0\":[\"d\"]}"),
        R(",\"opened\":[\"a b\"]"), R(",\"opened\":[1]"), R(",\"opened\":{}"),
        R(",\"opened\":[\"\\u0001\"]"), R(",\"closed\":[[\"d\"]]"),
        R(",\"closed\":[[\"d\",1,2]]"), R(",\"closed\":[[\"d\",-1]]"), R(",\"closed\":[\"d\"]"),
    };
    char err[300];
    cJSON *doc;
    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        doc = cmg_notify_report_parse(bad[i], strlen(bad[i]), err, sizeof(err));
        if (doc)
            fail_msg("accepted: %s", bad[i]);
        assert_true(err[0] != 0);
    }
    const char *good = R(",\"delivered\":{\"0123456789abcdef-3\":[\"d1\",\"cert:ab\"]},"
                         "\"opened\":[\"d3\"],\"closed\":[[\"d4\",1790000000]],\"extra\":true");
    doc = cmg_notify_report_parse(good, strlen(good), err, sizeof(err));
    assert_non_null(doc);
    cJSON_Delete(doc);
}

static void too_many_ids_are_refused(void **state)
{
    size_t n = CMG_NOTIFY_REPORT_MAX_IDS + 1, len = 0;
    char *body = malloc(n * 4 + 200), err[300];
    (void)state;
    len += (size_t)sprintf(body, "{\"instance\":\"g\",\"boot\":\"0123456789abcdef\",\"seq\":1,"
                                 "\"time\":1,\"opened\":[");
    for (size_t i = 0; i < n; i++)
        len += (size_t)sprintf(body + len, "%s\"a\"", i ? "," : "");
    len += (size_t)sprintf(body + len, "]}");
    assert_null(cmg_notify_report_parse(body, len, err, sizeof(err)));
    assert_non_null(strstr(err, "65536"));
    free(body);
}

static int64_t count(const char *table)
{
    cJSON *r;
    char sql[128];
    int64_t n;

    snprintf(sql, sizeof(sql), "SELECT count(*) AS n FROM %s", table);
    r = cmg_store_query_json(st, sql, "");
    n = (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItem(cJSON_GetArrayItem(r, 0), "n"));
    cJSON_Delete(r);
    return n;
}

static int keep(const char *body)
{
    char err[300];
    cJSON *doc = cmg_notify_report_parse(body, strlen(body), err, sizeof(err));
    int rc;

    assert_non_null(doc);
    rc = cmg_notify_report_ingest(st, doc, NOW, err, sizeof(err));
    cJSON_Delete(doc);
    return rc;
}

static void reports_are_kept_once_and_new_boots_close(void **state)
{
    const char *const ids[] = {"d1", "d2"};
    struct cmg_notify_new n = {.type = "policy", .data = "null", .ttl = 60, .devices = ids,
                               .ndevices = 2};
    char epoch[17], body[512], err[300];
    int64_t seq, targets;
    cJSON *s;
    (void)state;
    assert_int_equal(cmg_notify_epoch(st, epoch), 0);
    assert_int_equal(cmg_notify_create(st, &n, NOW, &seq, &targets, err, sizeof(err)), 0);
    assert_int_equal(targets, 2);
    snprintf(body, sizeof(body), "{\"instance\":\"gw\",\"boot\":\"000000000000000a\",\"seq\":1,"
             "\"time\":1,\"delivered\":{\"%s-%lld\":[\"d1\"]},\"opened\":[\"d1\",\"d2\"]}", epoch,
             (long long)seq);
    assert_int_equal(keep(body), 0);
    assert_int_equal(keep(body), 1);   /* the same seq again: a replay */
    assert_int_equal(cmg_notify_status(st, seq, NOW, &s), 0);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(s, "delivered")), 1);
    assert_int_equal(cJSON_GetNumberValue(cJSON_GetObjectItem(s, "waiting")), 1);
    cJSON_Delete(s);
    assert_int_equal(count("device_seen WHERE open"), 2);
    assert_int_equal(keep("{\"instance\":\"gw\",\"boot\":\"000000000000000b\",\"seq\":1,"
                          "\"time\":1}"), 0);
    assert_int_equal(count("device_seen WHERE open"), 0);
}

static void the_feed_holds_at_the_newest_and_tombstones_the_expired(void **state)
{
    struct cmg_notify_new n = {.type = "script", .data = "{\"a\":1}", .ttl = 10, .all = true};
    char epoch[17], after[64], err[300], *body;
    int64_t seq, targets, last;
    size_t len;
    cJSON *doc, *list;
    (void)state;
    assert_int_equal(cmg_notify_epoch(st, epoch), 0);
    assert_int_equal(cmg_notify_create(st, &n, NOW, &seq, &targets, err, sizeof(err)), 0);
    last = cmg_notify_last(st);
    assert_int_equal(last, seq);
    snprintf(after, sizeof(after), "%s-%lld", epoch, (long long)last);
    assert_int_equal(cmg_notify_feed(st, after, NOW, true, &body, &len, err, sizeof(err)), 1);
    assert_int_equal(cmg_notify_feed(st, "nope", NOW, true, &body, &len, err, sizeof(err)), 400);
    snprintf(after, sizeof(after), "%s-%lld", epoch, (long long)(last - 1));
    assert_int_equal(cmg_notify_feed(st, after, NOW + 11, true, &body, &len, err, sizeof(err)), 0);
    doc = cJSON_ParseWithLength(body, len);
    list = cJSON_GetObjectItem(doc, "notifications");
    assert_int_equal(cJSON_GetArraySize(list), 1);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetArrayItem(list, 0), "expired")));
    assert_null(cJSON_GetObjectItem(cJSON_GetArrayItem(list, 0), "type"));
    cJSON_Delete(doc);
    free(body);
    /* the first call: from the oldest kept, at once */
    assert_int_equal(cmg_notify_feed(st, "", NOW, true, &body, &len, err, sizeof(err)), 0);
    doc = cJSON_ParseWithLength(body, len);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(doc, "notifications")), (int)last);
    cJSON_Delete(doc);
    free(body);
    /* a day later nothing is kept: an empty answer, and a caller of this epoch waits */
    assert_int_equal(cmg_notify_feed(st, "", NOW + 86401, true, &body, &len, err, sizeof(err)), 0);
    assert_non_null(strstr(body, "\"notifications\":[]"));
    free(body);
    snprintf(after, sizeof(after), "%s-0", epoch);
    assert_int_equal(cmg_notify_feed(st, after, NOW + 86401, true, &body, &len, err, sizeof(err)),
                     1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ids_as_the_contract_spells_them),
        cmocka_unit_test(types_devices_and_ttls),
        cmocka_unit_test(reports_are_checked_whole),
        cmocka_unit_test(too_many_ids_are_refused),
        cmocka_unit_test(reports_are_kept_once_and_new_boots_close),
        cmocka_unit_test(the_feed_holds_at_the_newest_and_tombstones_the_expired),
    };
    return cmocka_run_group_tests(tests, store_up, store_down);
}
