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

/* The canonical form of t, or NULL if it is refused. */
static const char *canon(const char *t)
{
    static char out[512];
    const char *why;
    size_t len;
    if (cmg_path_canonical(t, strlen(t), out, &len, &why) < 0) {
        assert_non_null(why);
        return NULL;
    }
    assert_int_equal(len, strlen(out));
    return out;
}

static void canonical_form(void **state)
{
    assert_string_equal(canon("/a//b///c/"), "/a/b/c/");
    assert_string_equal(canon("//a"), "/a");
    assert_null(canon("/x%2fy"));
    assert_string_equal(canon("/%41%7e%2d?q=%2f//"), "/A~-?q=%2f//");
    assert_string_equal(canon("/a%3f%c3%a9%e2%82%ac%f0%9f%98%80"), "/a%3F%C3%A9%E2%82%AC%F0%9F%98%80");
    assert_string_equal(canon("/a;b=1/..c/...?x=../.."), "/a;b=1/..c/...?x=../..");
    assert_string_equal(canon("/100%25"), "/100%25");
    assert_int_equal(cmg_path_check("/a/B%20", 7), 0);
    assert_int_equal(cmg_path_check("/a//b", 5), -1);       /* acceptable, not canonical */
    assert_int_equal(cmg_path_check("/a/b%2a", 7), -1);
    assert_int_equal(cmg_path_check("/%7e", 4), -1);
}

static void refuses_what_backends_resolve_elsewhere(void **state)
{
    const char *bad[] = {"/a/..;/b", "/a/..;x=1/b", "/a/.;/b", "/a/..%3bx/b", "/a/%2e%2e;/b",
                         "/a/%252e%252e/b", "/a/%252F", "/a/%c0%ae%c0%ae/b", "/a/%c0%af",
                         "/a/%e0%80%ae", "/a/%ed%a0%80", "/a/%f4%90%80%80", "/a/%80",
                         "/a/%c3", "/a/%c3%41", "/a/%e2%82", "/a#frag", "/a?b#c", "/a\\b",
                         "/a%5cb", "/a%5C..", "/a/b?c\\d", "/a/\xc3\xa9", "*",
                         "/a/./b", "/a/.", "/.."};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (canon(bad[i]))
            fail_msg("accepted: %s", bad[i]);
        assert_int_equal(check(bad[i]), -1);
    }
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

static void query_parameters(void **state)
{
    const char *q = "range=month&instance=HOST%2F0&x=&path=a%zz&long=abcdefghij";
    char out[8];

    assert_int_equal(cmg_query_param(q, strlen(q), "range", out, sizeof(out)), 1);
    assert_string_equal(out, "month");
    assert_int_equal(cmg_query_param(q, strlen(q), "instance", out, sizeof(out)), 1);
    assert_string_equal(out, "HOST/0");
    assert_int_equal(cmg_query_param(q, strlen(q), "nope", out, sizeof(out)), 0);
    assert_int_equal(cmg_query_param(q, strlen(q), "ran", out, sizeof(out)), 0);
    assert_int_equal(cmg_query_param(q, strlen(q), "x", out, sizeof(out)), -1);      /* empty */
    assert_int_equal(cmg_query_param(q, strlen(q), "path", out, sizeof(out)), -1);   /* %zz */
    assert_int_equal(cmg_query_param(q, strlen(q), "long", out, sizeof(out)), -1);   /* room */
    assert_int_equal(cmg_query_param("a=%4", 4, "a", out, sizeof(out)), -1);        /* cut */
    assert_int_equal(cmg_query_param("a=%20", 5, "a", out, sizeof(out)), -1);       /* space */
    assert_int_equal(cmg_query_param("a=%41", 5, "a", out, sizeof(out)), 1);
    assert_string_equal(out, "A");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(accepts_ordinary_targets),
        cmocka_unit_test(refuses_dot_segments_and_bad_escapes),
        cmocka_unit_test(finds_role_and_rest),
        cmocka_unit_test(canonical_form),
        cmocka_unit_test(refuses_what_backends_resolve_elsewhere),
        cmocka_unit_test(query_parameters),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
