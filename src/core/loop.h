/* The event loop: epoll (level-triggered) for file descriptors, a binary heap
 * of timers, and tasks that run once after the current batch of events.
 * One loop per process; every connection belongs to it. Objects that may
 * still be named by pending events are freed with cmg_loop_free_later(). */
#ifndef CMG_LOOP_H
#define CMG_LOOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cmg_loop;
struct cmg_io;
struct cmg_timer;
struct cmg_task;

typedef void (*cmg_io_fn)(struct cmg_io *io, uint32_t events);
typedef void (*cmg_timer_fn)(struct cmg_timer *t);
typedef void (*cmg_task_fn)(struct cmg_task *t);

struct cmg_io {
    struct cmg_loop *loop;
    int fd;            /* -1 when not watched */
    uint32_t events;   /* EPOLLIN | EPOLLOUT currently asked for */
    cmg_io_fn fn;
};

struct cmg_timer {
    uint64_t when;     /* loop time in ms */
    size_t slot;       /* index in the heap + 1; 0 when not armed */
    cmg_timer_fn fn;
};

struct cmg_task {
    struct cmg_task *prev, *next;
    cmg_task_fn fn;
    bool queued;
};

struct cmg_loop *cmg_loop_new(void);
void cmg_loop_free(struct cmg_loop *loop);
/* Runs until cmg_loop_stop(), SIGQUIT, or SIGINT/SIGTERM when the role has no drain.
 * Returns 0, or -1 on a loop failure. */
int cmg_loop_run(struct cmg_loop *loop);
void cmg_loop_stop(struct cmg_loop *loop);
/* SIGHUP calls fn(arg) from the loop; without one it is logged and changes nothing. */
void cmg_loop_on_hup(struct cmg_loop *loop, void (*fn)(void *), void *arg);
/* SIGTERM or SIGINT calls fn(arg) once, from the loop: the role drains, then calls
 * cmg_loop_stop(). A second SIGTERM/SIGINT, or SIGQUIT, stops the loop at once. */
void cmg_loop_on_drain(struct cmg_loop *loop, void (*fn)(void *), void *arg);
bool cmg_loop_draining(const struct cmg_loop *loop);
bool cmg_loop_stopping(const struct cmg_loop *loop);
/* Monotonic milliseconds, read once per loop iteration. */
uint64_t cmg_loop_now(const struct cmg_loop *loop);
/* Counts loop iterations (one epoll_wait each): per-round budgets reset with it. */
uint64_t cmg_loop_round(const struct cmg_loop *loop);
/* Frees p with fn after the current batch of events has been handled. */
void cmg_loop_free_later(struct cmg_loop *loop, void *p, void (*fn)(void *));

int cmg_io_start(struct cmg_loop *loop, struct cmg_io *io, int fd, uint32_t events, cmg_io_fn fn);
int cmg_io_set(struct cmg_io *io, uint32_t events);
/* Stops watching; the descriptor is not closed. */
void cmg_io_stop(struct cmg_io *io);

void cmg_timer_start(struct cmg_loop *loop, struct cmg_timer *t, uint64_t ms, cmg_timer_fn fn);
void cmg_timer_stop(struct cmg_loop *loop, struct cmg_timer *t);
static inline bool cmg_timer_armed(const struct cmg_timer *t) { return t->slot != 0; }

/* Queues t to run once after the current events; queuing a queued task does nothing. */
void cmg_task_post(struct cmg_loop *loop, struct cmg_task *t, cmg_task_fn fn);
void cmg_task_cancel(struct cmg_loop *loop, struct cmg_task *t);

#endif
