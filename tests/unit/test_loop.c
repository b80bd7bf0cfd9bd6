/* The event loop's timers and tasks. */
#include "core/buf.h"
#include "core/loop.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static struct cmg_loop *loop;
static int order[16], norder;
static struct cmg_timer timers[5];

static void record(struct cmg_timer *t)
{
    order[norder++] = (int)(t - timers);
    if (norder == 4)
        cmg_loop_stop(loop);
}

static void timers_fire_in_order_and_stop_cancels(void **state)
{
    const uint64_t delays[5] = {30, 10, 20, 5, 15};
    loop = cmg_loop_new();
    norder = 0;
    for (int i = 0; i < 5; i++)
        cmg_timer_start(loop, &timers[i], delays[i], record);
    cmg_timer_stop(loop, &timers[4]);
    assert_false(cmg_timer_armed(&timers[4]));
    assert_int_equal(cmg_loop_run(loop), 0);
    assert_int_equal(norder, 4);
    assert_int_equal(order[0], 3);
    assert_int_equal(order[1], 1);
    assert_int_equal(order[2], 2);
    assert_int_equal(order[3], 0);
    cmg_loop_free(loop);
}

static struct cmg_task tasks[2];
static int ran;

static void task_fn(struct cmg_task *t)
{
    ran++;
    if (t == &tasks[0])
        cmg_task_post(loop, &tasks[1], task_fn);   /* runs in the next round */
    else
        cmg_loop_stop(loop);
}

static void tasks_run_once_each(void **state)
{
    loop = cmg_loop_new();
    ran = 0;
    memset(tasks, 0, sizeof(tasks));
    cmg_task_post(loop, &tasks[0], task_fn);
    cmg_task_post(loop, &tasks[0], task_fn);   /* already queued: no second run */
    assert_int_equal(cmg_loop_run(loop), 0);
    assert_int_equal(ran, 2);
    cmg_loop_free(loop);
}

static void buffer_slides_and_grows(void **state)
{
    struct cmg_buf b = {0};
    char big[5000];
    memset(big, 'x', sizeof(big));
    assert_int_equal(cmg_buf_append(&b, "hello", 5), 0);
    cmg_buf_consume(&b, 2);
    assert_memory_equal(cmg_buf_head(&b), "llo", 3);
    assert_int_equal(cmg_buf_append(&b, big, sizeof(big)), 0);
    assert_int_equal(b.len, 3 + sizeof(big));
    assert_memory_equal(cmg_buf_head(&b), "llo", 3);
    assert_int_equal(cmg_buf_printf(&b, "%d", 42), 0);
    assert_memory_equal(cmg_buf_tail(&b) - 2, "42", 2);
    cmg_buf_consume(&b, b.len);
    assert_int_equal(b.len, 0);
    cmg_buf_release(&b);
    assert_null(b.data);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(timers_fire_in_order_and_stop_cancels),
        cmocka_unit_test(tasks_run_once_each),
        cmocka_unit_test(buffer_slides_and_grows),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
