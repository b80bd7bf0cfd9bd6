/* The HTTP/1.x header collector, driven by llhttp as every parser of the project
 * drives it: input cut at every byte gives the same fields. */
#include "http/h1_head.h"

#include <llhttp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

struct parse {
    llhttp_t parser;
    struct cmg_headers fields;
    struct cmg_h1_head head;
};

static int on_field(llhttp_t *p, const char *at, size_t n)
{
    return cmg_h1_head_field(&((struct parse *)p)->head, at, n);
}

static int on_field_done(llhttp_t *p) { return cmg_h1_head_field_done(&((struct parse *)p)->head); }

static int on_value(llhttp_t *p, const char *at, size_t n)
{
    return cmg_h1_head_value(&((struct parse *)p)->head, at, n);
}

static int on_value_done(llhttp_t *p) { return cmg_h1_head_value_done(&((struct parse *)p)->head); }

static int on_begin(llhttp_t *p)
{
    cmg_h1_head_begin(&((struct parse *)p)->head);
    return 0;
}

/* Parses text in two reads cut at `cut`; llhttp's verdict. */
static llhttp_errno_t parse(struct parse *s, const char *text, size_t cut, size_t max_bytes,
                            uint32_t max_fields)
{
    static llhttp_settings_t settings;
    size_t len = strlen(text);
    llhttp_errno_t e;

    llhttp_settings_init(&settings);
    settings.on_message_begin = on_begin;
    settings.on_header_field = on_field;
    settings.on_header_field_complete = on_field_done;
    settings.on_header_value = on_value;
    settings.on_header_value_complete = on_value_done;
    memset(s, 0, sizeof(*s));
    llhttp_init(&s->parser, HTTP_REQUEST, &settings);
    cmg_h1_head_init(&s->head, &s->fields, max_bytes, max_fields);
    e = llhttp_execute(&s->parser, text, cut);
    if (e == HPE_OK)
        e = llhttp_execute(&s->parser, text + cut, len - cut);
    return e;
}

static void fields_are_the_same_wherever_the_input_is_cut(void **state)
{
    const char *req = "GET / HTTP/1.1\r\nHost: a.test\r\nX-Empty:\r\nX-Long: one two\r\n\r\n";
    for (size_t cut = 0; cut <= strlen(req); cut++) {
        struct parse s;
        assert_int_equal(parse(&s, req, cut, 16384, 100), HPE_OK);
        assert_int_equal(s.fields.n, 3);
        assert_string_equal(cmg_headers_name(&s.fields, 0), "Host");
        assert_string_equal(cmg_headers_value(&s.fields, 0), "a.test");
        assert_string_equal(cmg_headers_name(&s.fields, 1), "X-Empty");
        assert_string_equal(cmg_headers_value(&s.fields, 1), "");   /* its own empty run */
        assert_int_equal(s.fields.v[1].value_len, 0);
        assert_string_equal(cmg_headers_value(&s.fields, 2), "one two");
        cmg_headers_free(&s.fields);
    }
}

static void whitespace_before_the_colon_is_refused(void **state)
{
    struct parse s;
    assert_int_not_equal(parse(&s, "GET / HTTP/1.1\r\nX-A : b\r\n\r\n", 0, 16384, 100), HPE_OK);
    assert_int_equal(s.head.error, CMG_H1_HEAD_BAD_NAME);
    cmg_headers_free(&s.fields);
}

static void limits_on_bytes_and_fields(void **state)
{
    struct parse s;
    char big[2048];

    snprintf(big, sizeof(big), "GET / HTTP/1.1\r\nX-A: %01000d\r\n\r\n", 0);
    assert_int_not_equal(parse(&s, big, 100, 1000, 100), HPE_OK);
    assert_int_equal(s.head.error, CMG_H1_HEAD_TOO_LARGE);
    cmg_headers_free(&s.fields);
    assert_int_equal(parse(&s, big, 100, 2000, 100), HPE_OK);
    cmg_headers_free(&s.fields);

    assert_int_not_equal(parse(&s, "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", 5, 16384, 2), HPE_OK);
    assert_int_equal(s.head.error, CMG_H1_HEAD_TOO_LARGE);
    assert_int_equal(s.fields.n, 2);
    cmg_headers_free(&s.fields);
}

static void a_new_message_forgets_the_last(void **state)
{
    struct parse s;
    assert_int_equal(parse(&s, "GET / HTTP/1.1\r\nA: 1\r\n\r\nGET / HTTP/1.1\r\nB: 2\r\n\r\n", 3, 64, 1),
                     HPE_OK);
    assert_int_equal(s.fields.n, 1);
    assert_string_equal(cmg_headers_name(&s.fields, 0), "B");
    cmg_headers_free(&s.fields);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(fields_are_the_same_wherever_the_input_is_cut),
        cmocka_unit_test(whitespace_before_the_colon_is_refused),
        cmocka_unit_test(limits_on_bytes_and_fields),
        cmocka_unit_test(a_new_message_forgets_the_last),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
