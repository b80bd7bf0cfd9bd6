/* The exposition: label values escaped, histograms cumulative with +Inf, _sum in seconds;
 * the role table keeps each role apart through growth, then folds new ones into "other";
 * metrics_listen values. */
#include "core/metrics.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

static const char *text(struct cmg_buf *b)
{
    cmg_buf_append(b, "", 1);
    b->len--;
    return cmg_buf_head(b);
}

static void labels_are_escaped(void **state)
{
    struct cmg_buf b = {0};
    const char *l[] = {"role", "a\"b\\c\nd", "code", "2xx", NULL};
    (void)state;
    cmg_metrics_u64(&b, "cmg_x_total", l, 7);
    assert_string_equal(text(&b), "cmg_x_total{role=\"a\\\"b\\\\c\\nd\",code=\"2xx\"} 7\n");
    cmg_buf_reset(&b);
    cmg_metrics_u64(&b, "cmg_y", NULL, 0);
    assert_string_equal(text(&b), "cmg_y 0\n");
    cmg_buf_free(&b);
}

static void histogram_is_cumulative(void **state)
{
    struct cmg_histogram h = {0};
    struct cmg_buf b = {0};
    const char *l[] = {"role", "r", NULL};
    (void)state;
    cmg_histogram_observe(&h, 1000);        /* 1 ms: le 0.005 */
    cmg_histogram_observe(&h, 5000);        /* exactly 5 ms: le 0.005 too */
    cmg_histogram_observe(&h, 200000);      /* 0.2 s */
    cmg_histogram_observe(&h, 60000000);    /* 60 s: only +Inf */
    cmg_metrics_histogram(&b, "cmg_d_seconds", l, &h);
    const char *t = text(&b);
    assert_non_null(strstr(t, "cmg_d_seconds_bucket{role=\"r\",le=\"0.005\"} 2\n"));
    assert_non_null(strstr(t, "cmg_d_seconds_bucket{role=\"r\",le=\"0.1\"} 2\n"));
    assert_non_null(strstr(t, "cmg_d_seconds_bucket{role=\"r\",le=\"0.25\"} 3\n"));
    assert_non_null(strstr(t, "cmg_d_seconds_bucket{role=\"r\",le=\"30\"} 3\n"));
    assert_non_null(strstr(t, "cmg_d_seconds_bucket{role=\"r\",le=\"+Inf\"} 4\n"));
    assert_non_null(strstr(t, "cmg_d_seconds_sum{role=\"r\"} 60.206000\n"));
    assert_non_null(strstr(t, "cmg_d_seconds_count{role=\"r\"} 4\n"));
    cmg_buf_free(&b);
}

static void status_classes(void **state)
{
    (void)state;
    assert_string_equal(cmg_metrics_class_names[cmg_metrics_status_class(101)], "1xx");
    assert_string_equal(cmg_metrics_class_names[cmg_metrics_status_class(200)], "2xx");
    assert_string_equal(cmg_metrics_class_names[cmg_metrics_status_class(599)], "5xx");
    assert_string_equal(cmg_metrics_class_names[cmg_metrics_status_class(0)], "other");
    assert_string_equal(cmg_metrics_class_names[cmg_metrics_status_class(600)], "other");
}

static void roles_stay_apart_then_fold_into_other(void **state)
{
    struct cmg_metrics_roles r = {0};
    char name[32];
    (void)state;
    for (int i = 0; i < CMG_METRICS_MAX_ROLES; i++) {
        snprintf(name, sizeof(name), "%d", i);
        struct cmg_metrics_role *s = cmg_metrics_role(&r, name);
        assert_non_null(s);
        s->requests[1][0] += (uint64_t)i + 1;
    }
    assert_int_equal(r.n, CMG_METRICS_MAX_ROLES);
    for (int i = 0; i < CMG_METRICS_MAX_ROLES; i += 97) {   /* each kept its own count */
        snprintf(name, sizeof(name), "%d", i);
        assert_int_equal(cmg_metrics_role(&r, name)->requests[1][0], (uint64_t)i + 1);
    }
    struct cmg_metrics_role *o = cmg_metrics_role(&r, "one-too-many");
    assert_string_equal(o->role, "other");
    assert_ptr_equal(cmg_metrics_role(&r, "another"), o);
    assert_int_equal(r.n, CMG_METRICS_MAX_ROLES + 1);
    cmg_metrics_roles_free(&r);
}

static void listen_values(void **state)
{
    struct cmg_metrics_conf c;
    (void)state;
    cmg_metrics_conf_default(&c, CMG_METRICS_GATEWAY_DEFAULT);
    assert_false(c.explicit_);
    assert_int_equal(cmg_metrics_conf_set(&c, "off"), 0);
    assert_string_equal(c.listen, "");
    assert_int_equal(cmg_metrics_conf_set(&c, "127.0.0.1:9100"), 0);
    assert_string_equal(c.listen, "127.0.0.1:9100");
    assert_true(c.explicit_);
    assert_int_equal(cmg_metrics_conf_set(&c, "no port"), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(labels_are_escaped),
        cmocka_unit_test(histogram_is_cumulative),
        cmocka_unit_test(status_classes),
        cmocka_unit_test(roles_stay_apart_then_fold_into_other),
        cmocka_unit_test(listen_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
