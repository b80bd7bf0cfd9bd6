/* A blocking job in a child process; see child.h. */
#include "site/child.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define OF(type, member, p) ((type *)((char *)(p) - offsetof(type, member)))

void cmg_child_write(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

void cmg_child_init(struct cmg_child *c, struct cmg_loop *loop, unsigned deadline_s, size_t max,
                    cmg_child_done_fn done)
{
    memset(c, 0, sizeof(*c));
    c->loop = loop;
    c->io.fd = -1;
    c->deadline_s = deadline_s;
    c->max = max;
    c->done = done;
}

/* Stops reading and reaps the child; the answer stays. */
static void reap(struct cmg_child *c)
{
    if (c->io.fd >= 0) {
        int fd = c->io.fd;   /* cmg_io_stop() forgets it */
        cmg_io_stop(&c->io);
        close(fd);
    }
    cmg_timer_stop(c->loop, &c->deadline);
    if (c->pid > 0) {
        kill(c->pid, SIGKILL);
        while (waitpid(c->pid, NULL, 0) < 0 && errno == EINTR)
            ;
        c->pid = 0;
    }
}

void cmg_child_stop(struct cmg_child *c)
{
    reap(c);
    free(c->answer);
    c->answer = NULL;
    c->len = 0;
}

static void end(struct cmg_child *c, const char *failure)
{
    reap(c);
    c->done(c, failure);
}

static void on_answer(struct cmg_io *io, uint32_t events)
{
    struct cmg_child *c = OF(struct cmg_child, io, io);
    char buf[16384];
    ssize_t n;

    (void)events;
    for (;;) {
        n = read(io->fd, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0)
            break;
        if (c->len + (size_t)n > c->max) {
            end(c, "the answer of the process doing it is too large");
            return;
        }
        char *p = realloc(c->answer, c->len + (size_t)n + 1);
        if (!p) {
            end(c, "out of memory");
            return;
        }
        c->answer = p;
        memcpy(c->answer + c->len, buf, (size_t)n);
        c->len += (size_t)n;
        c->answer[c->len] = '\0';
    }
    end(c, NULL);
}

static void on_deadline(struct cmg_timer *t)
{
    struct cmg_child *c = OF(struct cmg_child, deadline, t);
    char why[96];

    snprintf(why, sizeof(why), "no answer within %u s", c->deadline_s);
    end(c, why);
}

/* In the child: nothing of the site's but fd; no core, no ptrace; gone with the site. */
static void child_main(struct cmg_child *c, void (*job)(void *, int), void *arg, int fd,
                       pid_t site)
{
    sigset_t none;

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    prctl(PR_SET_DUMPABLE, 0);
    if (getppid() != site)
        _exit(1);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGALRM, SIG_DFL);
    alarm(c->deadline_s + 5);
    if (fd > 3)
        close_range(3, (unsigned)fd - 1, 0);
    close_range((unsigned)fd + 1, ~0U, 0);
    job(arg, fd);
    _exit(0);
}

int cmg_child_start(struct cmg_child *c, void (*job)(void *arg, int fd), void *arg)
{
    pid_t pid, site = getpid();
    int p[2];

    cmg_child_stop(c);
    if (pipe2(p, O_CLOEXEC) < 0)
        return -1;
    if ((pid = fork()) < 0) {
        close(p[0]);
        close(p[1]);
        return -1;
    }
    if (pid == 0)
        child_main(c, job, arg, p[1], site);
    close(p[1]);
    fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK);
    c->pid = pid;
    if (cmg_io_start(c->loop, &c->io, p[0], EPOLLIN, on_answer) < 0) {
        int e = errno;
        close(p[0]);
        reap(c);
        errno = e;
        return -1;
    }
    cmg_timer_start(c->loop, &c->deadline, c->deadline_s * 1000, on_deadline);
    return 0;
}
