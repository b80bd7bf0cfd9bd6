/* A blocking job (a fetch) run in a child process, off the site's event loop. The child
 * holds none of the site's descriptors but its answer pipe, cannot be traced or dump
 * core (it may hold a URL's secrets), dies with the site, and by itself a little after
 * its deadline; the loop reads its answer, bounded, and kills it at the deadline.
 * Used by the OIDC key refresher and the alerts' webhook. */
#ifndef CMG_SITE_CHILD_H
#define CMG_SITE_CHILD_H

#include "core/loop.h"

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct cmg_child;
/* The job ended: failure NULL and the answer in c->answer (NUL-terminated, c->len bytes;
 * the child is reaped), or failure says why (deadline, answer too large, out of memory). */
typedef void (*cmg_child_done_fn)(struct cmg_child *c, const char *failure);

struct cmg_child {
    struct cmg_loop *loop;
    struct cmg_io io;
    struct cmg_timer deadline;
    pid_t pid;                    /* > 0 while the job runs */
    unsigned deadline_s;
    size_t max;                   /* the largest answer taken */
    char *answer;
    size_t len;
    cmg_child_done_fn done;
};

void cmg_child_init(struct cmg_child *c, struct cmg_loop *loop, unsigned deadline_s, size_t max,
                    cmg_child_done_fn done);
/* Runs job(arg, fd) in a new process, which writes its answer to fd and returns; the
 * process then exits. 0, or -1 (errno). One job at a time. */
int cmg_child_start(struct cmg_child *c, void (*job)(void *arg, int fd), void *arg);
static inline bool cmg_child_running(const struct cmg_child *c) { return c->pid > 0; }
/* Kills the job if it runs, reaps it, and frees the answer. */
void cmg_child_stop(struct cmg_child *c);
/* For the job: writes all of p to fd (the answer). */
void cmg_child_write(int fd, const char *p, size_t n);

#endif
