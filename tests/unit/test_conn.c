/* A connection tells its owner when output that had to wait is written (on_drain), also
 * when the owner's own flush left it waiting while a flush from the loop was due. */
#include "core/conn.h"
#include "core/loop.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

static struct cmg_loop *loop;
static struct cmg_conn conn;
static struct cmg_timer deadline;
static int peer = -1, drains;

/* The reader takes everything there is, as a device reading fast does. */
static void drain_peer(void)
{
    char buf[65536];

    while (recv(peer, buf, sizeof(buf), MSG_DONTWAIT) > 0)
        ;
}

/* A response's head, queued for the loop's flush; then body up to the socket's limit,
 * flushed by the owner at once: some of it waits. The reader then takes all there is,
 * before the loop's flush writes the rest. */
static void on_open(struct cmg_conn *c)
{
    static const char chunk[4096];

    cmg_conn_write(c, "HTTP/1.1 200 OK\r\n\r\n", 19);
    cmg_conn_flush_later(c);
    do {
        cmg_conn_write(c, chunk, sizeof(chunk));
        cmg_conn_flush(c);
    } while (cmg_conn_pending(c) == 0);
    assert_true(c->flush_later);
    drain_peer();
}

static void on_read(struct cmg_conn *c)
{
    char buf[64];
    while (cmg_conn_read(c, buf, sizeof(buf)) > 0)
        ;
}

static void on_drain(struct cmg_conn *c)
{
    (void)c;
    drains++;
    cmg_loop_stop(loop);
}

static void on_error(struct cmg_conn *c, const char *why)
{
    (void)c;
    fail_msg("connection failed: %s", why);
}

static const struct cmg_conn_ops ops = {on_open, on_read, on_drain, on_error};

static void give_up(struct cmg_timer *t)
{
    (void)t;
    cmg_loop_stop(loop);
}

static void output_waiting_from_the_owners_flush_is_told(void **state)
{
    int sv[2], small = 16384;

    (void)state;
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
    peer = sv[1];
    assert_non_null(loop = cmg_loop_new());
    assert_int_equal(cmg_conn_start(&conn, loop, sv[0], NULL, false, &ops, NULL), 0);
    cmg_timer_start(loop, &deadline, 2000, give_up);
    assert_int_equal(cmg_loop_run(loop), 0);
    assert_int_equal(drains, 1);
    assert_int_equal(cmg_conn_pending(&conn), 0);
    cmg_timer_stop(loop, &deadline);
    cmg_conn_close(&conn);
    cmg_loop_free(loop);
    close(peer);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(output_waiting_from_the_owners_flush_is_told),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
