/* Request targets: what the gateway lets through, and how it finds the role. */
#include "http/path.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static int check(const char *p) { return cmg_path_check(p, strlen(p)); }

static void accepts_ordinary_targets(void **state)
{
    assert_int_equal(check("/"), 0);
    assert_int_equal(check("/CCM_Proxy_MutualAuth/72057594037927940/CCM_System/request"), 0);
    assert_int_equal(check("/a/b.c/..d/x%20y?q=../..&z=%2F"), 0);
}

static void refuses_dot_segments_and_bad_escapes(void **state)
{
    const char *bad[] = {"", "a", "/..", "/a/../b", "/a/./b", "/a/%2e%2e/b", "/a/.%2E",
                         "/a%2fb", "/a%5cb", "/a\\b", "/a%00", "/a%zz", "/a%2", "/a b",
                         "/a\tb", "/a\x7f"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(check(bad[i]), -1);
    assert_int_equal(cmg_path_check("/a\0b", 4), -1);
}

static void finds_role_and_rest(void **state)
{
    struct cmg_path p;
    const char *t = "/ccm_proxy_mutualauth/123/CCM_System/x?y";
    cmg_path_parse(t, strlen(t), &p);
    assert_int_equal(p.kind, CMG_PATH_MUTUAL_AUTH);
    assert_int_equal(p.role_len, 3);
    assert_memory_equal(p.role, "123", 3);
    assert_string_equal(p.rest, "/CCM_System/x?y");

    t = "/CCM_Proxy_ServerAuth/abc";
    cmg_path_parse(t, strlen(t), &p);
    assert_int_equal(p.kind, CMG_PATH_SERVER_AUTH);
    assert_int_equal(p.rest_len, 0);

    t = "/CCM_Proxy_MutualAuth//x";   /* empty role */
    cmg_path_parse(t, strlen(t), &p);
    assert_int_equal(p.kind, CMG_PATH_OTHER);
    t = "/CCM_Proxy_MutualAuth/a.b/x";   /* role ids have no dots */
    cmg_path_parse(t, strlen(t), &p);
    assert_int_equal(p.kind, CMG_PATH_OTHER);
    t = "/other/123";
    cmg_path_parse(t, strlen(t), &p);
    assert_int_equal(p.kind, CMG_PATH_OTHER);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(accepts_ordinary_targets),
        cmocka_unit_test(refuses_dot_segments_and_bad_escapes),
        cmocka_unit_test(finds_role_and_rest),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
