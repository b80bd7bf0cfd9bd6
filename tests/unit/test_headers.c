/* Header lists built in pieces, as parsers deliver them. */
#include "http/headers.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

static void pieces_join_into_one_field(void **state)
{
    struct cmg_headers h = {0};
    assert_int_equal(cmg_headers_append_name(&h, "Con", 3, true), 0);
    assert_int_equal(cmg_headers_append_name(&h, "tent-Type", 9, false), 0);
    assert_int_equal(cmg_headers_append_value(&h, "text/", 5, true), 0);
    assert_int_equal(cmg_headers_append_value(&h, "plain", 5, false), 0);
    assert_int_equal(cmg_headers_add(&h, "Host", 4, "a", 1), 0);
    assert_int_equal(h.n, 2);
    assert_string_equal(cmg_headers_name(&h, 0), "Content-Type");
    assert_string_equal(cmg_headers_value(&h, 0), "text/plain");
    assert_int_equal(cmg_headers_find(&h, "content-type"), 0);
    assert_int_equal(cmg_headers_find(&h, "HOST"), 1);
    assert_int_equal(cmg_headers_find(&h, "x"), -1);
    cmg_headers_free(&h);
}

static void many_fields_grow_the_arena(void **state)
{
    struct cmg_headers h = {0};
    char name[16];
    for (int i = 0; i < 500; i++) {
        snprintf(name, sizeof(name), "x-%d", i);
        assert_int_equal(cmg_headers_add(&h, name, strlen(name), "value", 5), 0);
    }
    assert_int_equal(cmg_headers_find(&h, "x-499"), 499);
    assert_string_equal(cmg_headers_value(&h, 250), "value");
    cmg_headers_free(&h);
}

static void connection_fields_are_not_forwarded(void **state)
{
    assert_true(cmg_header_not_forwarded("Connection", 10));
    assert_true(cmg_header_not_forwarded("transfer-encoding", 17));
    assert_true(cmg_header_not_forwarded("Keep-Alive", 10));
    assert_false(cmg_header_not_forwarded("Content-Type", 12));
    assert_true(cmg_header_has_prefix("CMG-Client-Subject", 18, "cmg-"));
    assert_false(cmg_header_has_prefix("CM", 2, "cmg-"));
}

static void identity_and_routing_fields_are_the_gateways(void **state)
{
    const char *ours[] = {"CMG-Client-Device-Id", "cmg_client_device_id", "Cmg_Client-Subject",
                          "cmg-", "Forwarded", "X-Forwarded-For", "x_forwarded_proto",
                          "X-Forwarded-Host", "X-Real-IP", "x_real_ip", "X-Original-URL",
                          "X-Rewrite-Url", "X-Client-IP", "x_client_cert"};
    const char *theirs[] = {"Authorization", "Content-Type", "CM", "cmg", "Forwarded-X",
                            "X-Forwardedfor", "X-Real-IPs", "X-Original-URLs", "X-Clientip",
                            "X-Device-Header"};
    for (size_t i = 0; i < sizeof(ours) / sizeof(ours[0]); i++)
        if (!cmg_header_gateway_only(ours[i], strlen(ours[i])))
            fail_msg("passed on: %s", ours[i]);
    for (size_t i = 0; i < sizeof(theirs) / sizeof(theirs[0]); i++)
        if (cmg_header_gateway_only(theirs[i], strlen(theirs[i])))
            fail_msg("dropped: %s", theirs[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(pieces_join_into_one_field),
        cmocka_unit_test(many_fields_grow_the_arena),
        cmocka_unit_test(connection_fields_are_not_forwarded),
        cmocka_unit_test(identity_and_routing_fields_are_the_gateways),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
