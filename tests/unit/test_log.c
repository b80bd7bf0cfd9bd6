/* Log lines: JSON escaping of hostile bytes, one valid object per line whatever the
 * fields hold, lines bounded, and the text format's key=value rendering. */
#include "core/log.h"

#include <cjson/cJSON.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

static char out[8192];

/* The escape of s (len bytes) into a buffer of cap bytes, as a C string. */
static const char *escape(const char *s, size_t len, size_t cap, size_t *used)
{
    size_t n = cmg_log_json_escape(out, cap, s, len, used);
    out[n] = 0;
    return out;
}

static void escapes_quotes_backslashes_and_controls(void **state)
{
    size_t used;
    assert_string_equal(escape("a\"b\\c", 5, 100, &used), "a\\\"b\\\\c");
    assert_string_equal(escape("\n\r\t\x01\x1f\x7f", 6, 100, &used),
                        "\\u000a\\u000d\\u0009\\u0001\\u001f\\u007f");
    assert_string_equal(escape("a\0b", 3, 100, &used), "a\\u0000b");
    assert_int_equal(used, 3);
}

static void keeps_valid_utf8_and_replaces_the_rest(void **state)
{
    size_t used;
    /* é, €, 𝄞: kept as they are */
    assert_string_equal(escape("\xc3\xa9\xe2\x82\xac\xf0\x9d\x84\x9e", 9, 100, &used),
                        "\xc3\xa9\xe2\x82\xac\xf0\x9d\x84\x9e");
    /* a lone continuation byte, an overlong '/', a surrogate, past U+10FFFF, 0xff,
     * and a character cut short: each byte becomes U+FFFD */
    const struct { const char *in; size_t len; size_t fffd; } bad[] = {
        {"\x80", 1, 1}, {"\xc0\xaf", 2, 2}, {"\xed\xa0\x80", 3, 3},
        {"\xf4\x90\x80\x80", 4, 4}, {"\xff", 1, 1}, {"\xe2\x82", 2, 2}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        escape(bad[i].in, bad[i].len, 100, &used);
        assert_int_equal(strlen(out), 3 * bad[i].fffd);
        for (size_t k = 0; k < bad[i].fffd; k++)
            assert_memory_equal(out + 3 * k, "\xef\xbf\xbd", 3);
    }
}

static void stops_before_what_does_not_fit(void **state)
{
    size_t used;
    /* never half an escape or half a character */
    assert_string_equal(escape("ab\"", 3, 3, &used), "ab");
    assert_int_equal(used, 2);
    assert_string_equal(escape("a\x01", 2, 6, &used), "a");
    assert_int_equal(used, 1);
    assert_string_equal(escape("a\xe2\x82\xac", 4, 3, &used), "a");
    assert_int_equal(used, 1);
}

/* Runs fn with stderr going to a file; returns what it wrote. */
static char *captured(void (*fn)(void))
{
    FILE *f = tmpfile();
    int saved = dup(STDERR_FILENO);
    long len;
    char *text;

    assert_non_null(f);
    dup2(fileno(f), STDERR_FILENO);
    fn();
    cmg_log_flush();
    dup2(saved, STDERR_FILENO);
    close(saved);
    len = ftell(f);
    text = calloc(1, (size_t)len + 1);
    rewind(f);
    assert_int_equal(fread(text, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    return text;
}

static const char hostile[] = "/p\"ath\\\n\x01\xff\xc0\xaf\xe2\x82 \xc3\xa9";

static void log_hostile(void)
{
    const struct cmg_log_field f[] = {
        CMG_F_STRN("path", hostile, sizeof(hostile) - 1), CMG_F_NUM("status", 404),
        CMG_F_OPT("claim", NULL), CMG_F_STR("reason", "CMGService_No_Mapping")};
    cmg_log_kv(CMG_LOG_INFO, "refused", f, CMG_LOG_NFIELDS(f));
    cmg_info("printf style: %s", "a\"b\nc");
}

static void json_lines_parse_with_their_fields(void **state)
{
    char *text, *line2;
    cJSON *o;

    cmg_log_init("unit");
    cmg_log_set_format(CMG_LOG_JSON);
    text = captured(log_hostile);
    cmg_log_set_format(CMG_LOG_TEXT);
    line2 = strchr(text, '\n');
    assert_non_null(line2);
    *line2++ = 0;
    o = cJSON_Parse(text);
    assert_non_null(o);
    assert_string_equal(cJSON_GetObjectItem(o, "role")->valuestring, "unit");
    assert_string_equal(cJSON_GetObjectItem(o, "level")->valuestring, "info");
    assert_string_equal(cJSON_GetObjectItem(o, "msg")->valuestring, "refused");
    assert_int_equal(strlen(cJSON_GetObjectItem(o, "ts")->valuestring), 24);
    assert_int_equal(cJSON_GetObjectItem(o, "status")->valueint, 404);
    assert_null(cJSON_GetObjectItem(o, "claim"));   /* an optional field left out */
    assert_string_equal(cJSON_GetObjectItem(o, "path")->valuestring,
                        "/p\"ath\\\n\x01\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
                        " \xc3\xa9");
    cJSON_Delete(o);
    o = cJSON_Parse(line2);
    assert_non_null(o);
    assert_string_equal(cJSON_GetObjectItem(o, "msg")->valuestring, "printf style: a\"b\nc");
    cJSON_Delete(o);
    free(text);
}

static void text_lines_quote_and_escape_values(void **state)
{
    char *text = captured(log_hostile);

    assert_non_null(strstr(text, " unit["));
    assert_non_null(strstr(text, " info: refused path=\"/p\\\"ath\\\\\\x0a\\x01"));
    assert_non_null(strstr(text, " status=404 reason=CMGService_No_Mapping\n"));
    assert_null(strstr(text, "claim="));
    assert_non_null(strstr(text, "printf style: a\"b?c\n"));   /* one line per event */
    free(text);
}

static void log_long(void)
{
    static char big[20000];
    memset(big, '\x01', sizeof(big));   /* six bytes each once escaped */
    const struct cmg_log_field f[] = {CMG_F_STRN("a", big, sizeof(big)),
                                      CMG_F_STR("b", "after")};
    cmg_log_kv(CMG_LOG_WARN, "long", f, CMG_LOG_NFIELDS(f));
}

static void long_lines_are_cut_and_stay_valid(void **state)
{
    char *text;
    cJSON *o;

    cmg_log_set_format(CMG_LOG_JSON);
    text = captured(log_long);
    cmg_log_set_format(CMG_LOG_TEXT);
    assert_true(strlen(text) <= CMG_LOG_LINE_MAX);
    assert_int_equal(strchr(text, '\n') - text, strlen(text) - 1);
    o = cJSON_Parse(text);
    assert_non_null(o);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(o, "truncated")));
    assert_null(cJSON_GetObjectItem(o, "b"));
    assert_true(strlen(cJSON_GetObjectItem(o, "a")->valuestring) > 500);
    cJSON_Delete(o);
    free(text);

    text = captured(log_long);   /* text: cut too, one line */
    assert_true(strlen(text) <= CMG_LOG_LINE_MAX);
    assert_int_equal(strchr(text, '\n') - text, strlen(text) - 1);
    free(text);
}

static size_t sweep_len;

static void log_sized(void)
{
    static char value[CMG_LOG_LINE_MAX + 64];
    memset(value, 'A', sizeof(value));
    const struct cmg_log_field f[] = {CMG_F_STRN("path", value, sweep_len),
                                      CMG_F_NUM("status", 200), CMG_F_STR("reason", "after")};
    cmg_log_kv(CMG_LOG_WARN, "request", f, CMG_LOG_NFIELDS(f));
}

/* A value that ends the line exactly at its limit, or one byte either side, with fields
 * after it: never more than CMG_LOG_LINE_MAX bytes, always one valid JSON object. */
static void values_at_the_line_limit_stay_within_it(void **state)
{
    cmg_log_set_format(CMG_LOG_JSON);
    for (sweep_len = CMG_LOG_LINE_MAX - 200; sweep_len <= CMG_LOG_LINE_MAX + 40; sweep_len++) {
        char *text = captured(log_sized);
        cJSON *o;

        assert_true(strlen(text) <= CMG_LOG_LINE_MAX);
        assert_int_equal(strchr(text, '\n') - text, strlen(text) - 1);
        o = cJSON_Parse(text);
        assert_non_null(o);
        cJSON_Delete(o);
        free(text);
    }
    cmg_log_set_format(CMG_LOG_TEXT);
}

static void formats_by_name(void **state)
{
    assert_int_equal(cmg_log_parse_format("text"), CMG_LOG_TEXT);
    assert_int_equal(cmg_log_parse_format("json"), CMG_LOG_JSON);
    assert_int_equal(cmg_log_parse_format("JSON"), -1);
    assert_int_equal(cmg_log_parse_format(""), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(escapes_quotes_backslashes_and_controls),
        cmocka_unit_test(keeps_valid_utf8_and_replaces_the_rest),
        cmocka_unit_test(stops_before_what_does_not_fit),
        cmocka_unit_test(json_lines_parse_with_their_fields),
        cmocka_unit_test(text_lines_quote_and_escape_values),
        cmocka_unit_test(long_lines_are_cut_and_stay_valid),
        cmocka_unit_test(values_at_the_line_limit_stay_within_it),
        cmocka_unit_test(formats_by_name),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
