#include "core/loop.h"
#include "core/log.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256

struct later {
    struct later *next;
    void *p;
    void (*fn)(void *);
};

struct cmg_loop {
    int epfd;
    bool stop;
    uint64_t now;
    uint64_t round;          /* + 1 per epoll_wait */
    struct cmg_timer **heap;
    size_t nheap, capheap;
    struct cmg_task tasks;   /* list head */
    struct later *later;
    struct cmg_task mark;    /* separates this round of tasks from the next */
    struct cmg_io sigio;
    void (*on_hup)(void *);   /* SIGHUP: reload; NULL: the role cannot */
    void *hup_arg;
    void (*on_drain)(void *); /* SIGTERM/SIGINT: drain; NULL: stop at once */
    void *drain_arg;
    bool draining;
};

static uint64_t clock_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* SIGTERM (or SIGINT) asks a role that can drain to drain; a second one, or SIGQUIT,
 * stops at once. */
static void on_stop_signal(struct cmg_loop *loop, int signo)
{
    const char *name = signo == SIGTERM ? "SIGTERM" : signo == SIGINT ? "SIGINT" : "SIGQUIT";
    if (signo != SIGQUIT && loop->on_drain && !loop->draining) {
        cmg_info("%s received: draining (SIGQUIT, or %s again, stops at once)", name, name);
        loop->draining = true;
        loop->on_drain(loop->drain_arg);
        return;
    }
    cmg_info("%s received, stopping%s", name, loop->draining ? " now: the drain is cut short" : "");
    cmg_loop_stop(loop);
}

static void on_signal(struct cmg_io *io, uint32_t events)
{
    struct cmg_loop *loop = io->loop;
    struct signalfd_siginfo si;
    (void)events;
    while (read(io->fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
        if (si.ssi_signo == SIGHUP && loop->on_hup) {
            cmg_info("SIGHUP received: reloading");
            loop->on_hup(loop->hup_arg);
        } else if (si.ssi_signo == SIGHUP) {
            cmg_warn("SIGHUP received: this role does not reload its configuration yet; "
                     "nothing changed (restart it to apply changes)");
        } else {
            on_stop_signal(loop, (int)si.ssi_signo);
        }
    }
}

void cmg_loop_on_hup(struct cmg_loop *loop, void (*fn)(void *), void *arg)
{
    loop->on_hup = fn;
    loop->hup_arg = arg;
}

void cmg_loop_on_drain(struct cmg_loop *loop, void (*fn)(void *), void *arg)
{
    loop->on_drain = fn;
    loop->drain_arg = arg;
}

bool cmg_loop_draining(const struct cmg_loop *loop)
{
    return loop->draining;
}

struct cmg_loop *cmg_loop_new(void)
{
    struct cmg_loop *loop = calloc(1, sizeof(*loop));
    sigset_t set;
    int sfd;

    if (!loop)
        return NULL;
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (loop->epfd < 0) {
        free(loop);
        return NULL;
    }
    loop->tasks.next = loop->tasks.prev = &loop->tasks;
    loop->now = clock_ms();
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGQUIT);
    sigprocmask(SIG_BLOCK, &set, NULL);
    sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    loop->sigio.fd = -1;
    if (sfd >= 0)
        cmg_io_start(loop, &loop->sigio, sfd, EPOLLIN, on_signal);
    return loop;
}

static void run_later(struct cmg_loop *loop)
{
    while (loop->later) {
        struct later *l = loop->later;
        loop->later = NULL;
        while (l) {
            struct later *next = l->next;
            l->fn(l->p);
            free(l);
            l = next;
        }
    }
}

void cmg_loop_free(struct cmg_loop *loop)
{
    if (!loop)
        return;
    run_later(loop);
    if (loop->sigio.fd >= 0) {
        int fd = loop->sigio.fd;
        cmg_io_stop(&loop->sigio);
        close(fd);
    }
    close(loop->epfd);
    free(loop->heap);
    free(loop);
}

void cmg_loop_stop(struct cmg_loop *loop) { loop->stop = true; }
bool cmg_loop_stopping(const struct cmg_loop *loop) { return loop->stop; }
uint64_t cmg_loop_round(const struct cmg_loop *loop)
{
    return loop->round;
}

uint64_t cmg_loop_now(const struct cmg_loop *loop) { return loop->now; }

void cmg_loop_free_later(struct cmg_loop *loop, void *p, void (*fn)(void *))
{
    struct later *l = malloc(sizeof(*l));
    if (!l) {   /* cannot defer: freeing now is the lesser evil than leaking forever */
        fn(p);
        return;
    }
    l->p = p;
    l->fn = fn;
    l->next = loop->later;
    loop->later = l;
}

/* ---- file descriptors ---- */

int cmg_io_start(struct cmg_loop *loop, struct cmg_io *io, int fd, uint32_t events, cmg_io_fn fn)
{
    struct epoll_event ev = {.events = events, .data.ptr = io};
    io->loop = loop;
    io->fn = fn;
    io->fd = fd;
    io->events = events;
    if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        io->fd = -1;
        return -1;
    }
    return 0;
}

int cmg_io_set(struct cmg_io *io, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = io};
    if (io->fd < 0 || io->events == events)
        return 0;
    io->events = events;
    return epoll_ctl(io->loop->epfd, EPOLL_CTL_MOD, io->fd, &ev);
}

void cmg_io_stop(struct cmg_io *io)
{
    if (io->fd < 0)
        return;
    epoll_ctl(io->loop->epfd, EPOLL_CTL_DEL, io->fd, NULL);
    io->fd = -1;
}

/* ---- timers: a binary min-heap; slot = index + 1 ---- */

static void heap_place(struct cmg_loop *loop, struct cmg_timer *t, size_t i)
{
    loop->heap[i] = t;
    t->slot = i + 1;
}

static void heap_up(struct cmg_loop *loop, size_t i)
{
    struct cmg_timer *t = loop->heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (loop->heap[parent]->when <= t->when)
            break;
        heap_place(loop, loop->heap[parent], i);
        i = parent;
    }
    heap_place(loop, t, i);
}

static void heap_down(struct cmg_loop *loop, size_t i)
{
    struct cmg_timer *t = loop->heap[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= loop->nheap)
            break;
        if (c + 1 < loop->nheap && loop->heap[c + 1]->when < loop->heap[c]->when)
            c++;
        if (loop->heap[c]->when >= t->when)
            break;
        heap_place(loop, loop->heap[c], i);
        i = c;
    }
    heap_place(loop, t, i);
}

void cmg_timer_stop(struct cmg_loop *loop, struct cmg_timer *t)
{
    size_t i;
    struct cmg_timer *last;

    if (!t->slot)
        return;
    i = t->slot - 1;
    t->slot = 0;
    last = loop->heap[--loop->nheap];
    if (i == loop->nheap)
        return;
    heap_place(loop, last, i);
    heap_up(loop, i);
    heap_down(loop, last->slot - 1);
}

void cmg_timer_start(struct cmg_loop *loop, struct cmg_timer *t, uint64_t ms, cmg_timer_fn fn)
{
    cmg_timer_stop(loop, t);
    t->fn = fn;
    t->when = loop->now + ms;
    if (loop->nheap == loop->capheap) {
        size_t cap = loop->capheap ? loop->capheap * 2 : 64;
        struct cmg_timer **h = realloc(loop->heap, cap * sizeof(*h));
        if (!h) {
            cmg_error("out of memory arming a timer");
            abort();
        }
        loop->heap = h;
        loop->capheap = cap;
    }
    heap_place(loop, t, loop->nheap++);
    heap_up(loop, loop->nheap - 1);
}

static void run_timers(struct cmg_loop *loop)
{
    while (loop->nheap && loop->heap[0]->when <= loop->now) {
        struct cmg_timer *t = loop->heap[0];
        cmg_timer_stop(loop, t);
        t->fn(t);
    }
}

/* ---- tasks ---- */

void cmg_task_post(struct cmg_loop *loop, struct cmg_task *t, cmg_task_fn fn)
{
    t->fn = fn;
    if (t->queued)
        return;
    t->queued = true;
    t->prev = loop->tasks.prev;
    t->next = &loop->tasks;
    loop->tasks.prev->next = t;
    loop->tasks.prev = t;
}

void cmg_task_cancel(struct cmg_loop *loop, struct cmg_task *t)
{
    (void)loop;
    if (!t->queued)
        return;
    t->prev->next = t->next;
    t->next->prev = t->prev;
    t->queued = false;
}

static void run_tasks(struct cmg_loop *loop)
{
    /* Tasks posted while running wait for the next round, so none can starve I/O. */
    cmg_task_post(loop, &loop->mark, NULL);
    while (loop->tasks.next != &loop->mark) {
        struct cmg_task *t = loop->tasks.next;
        cmg_task_cancel(loop, t);
        t->fn(t);
    }
    cmg_task_cancel(loop, &loop->mark);
}

int cmg_loop_run(struct cmg_loop *loop)
{
    struct epoll_event events[MAX_EVENTS];
    uint64_t log_flushed = loop->now;

    cmg_log_set_buffered(true);
    while (!loop->stop) {
        int timeout = -1, n;
        if (loop->tasks.next != &loop->tasks)
            timeout = 0;
        else if (loop->nheap) {
            uint64_t when = loop->heap[0]->when;
            timeout = when <= loop->now ? 0 : (int)(when - loop->now);
        }
        /* Log lines of this round go out before the loop sleeps, or each second. */
        if (timeout != 0 || loop->now - log_flushed >= 1000) {
            cmg_log_flush();
            log_flushed = loop->now;
        }
        n = epoll_wait(loop->epfd, events, MAX_EVENTS, timeout);
        loop->now = clock_ms();
        loop->round++;
        if (n < 0 && errno != EINTR) {
            cmg_log_set_buffered(false);
            cmg_error("epoll_wait: %s", strerror(errno));
            return -1;
        }
        for (int i = 0; i < n; i++) {
            struct cmg_io *io = events[i].data.ptr;
            if (io->fd >= 0)   /* skip what an earlier event in this batch stopped */
                io->fn(io, events[i].events);
        }
        run_tasks(loop);
        run_timers(loop);
        run_later(loop);
    }
    cmg_log_set_buffered(false);
    return 0;
}
