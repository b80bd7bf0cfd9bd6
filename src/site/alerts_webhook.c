/* The alerts' webhook: each notification is POSTed by a child process (the blocking
 * client of client/fetch.c, as the OIDC key refresh does), one at a time, so a slow or
 * dead receiver never holds up the site's loop. At most CMG_WEBHOOK_QUEUE_MAX wait (the
 * oldest is dropped, logged); each delivery is tried twice; the child is killed after
 * CMG_WEBHOOK_DEADLINE_S. Logs name the webhook by its origin only: a URL's path, query
 * and user information often are its credentials. */
#include "site/alerts.h"

#include "client/fetch.h"
#include "core/log.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ANSWER_MAX 1024
#define RESPONSE_MAX (64 * 1024)   /* what is read of the receiver's answer */

struct item {
    char *body;
    char kind[24];
    char subject[256];
};

struct cmg_webhook {
    struct cmg_loop *loop;
    struct cmg_store *store;
    struct item queue[CMG_WEBHOOK_QUEUE_MAX];
    size_t head, count;
    pid_t child;
    struct cmg_io io;
    struct cmg_timer deadline;
    char answer[ANSWER_MAX];
    size_t answer_len;
    char origin[300];          /* of the delivery under way */
};

#define OF(type, member, p) ((type *)((char *)(p) - offsetof(type, member)))

/* ---- the child ---- */

/* The URL without its user information, and "Authorization: Basic ..." for it. */
static int split_credentials(const char *url, char *bare, size_t barelen, char *auth,
                             size_t authlen)
{
    const char *p = strstr(url, "://"), *host = p ? p + 3 : url;
    size_t n = strcspn(host, "/?#");
    const char *at = memchr(host, '@', n);
    unsigned char b64[1400];
    size_t ulen;

    auth[0] = '\0';
    if (!at) {
        snprintf(bare, barelen, "%s", url);
        return 0;
    }
    ulen = (size_t)(at - host);
    if (ulen * 4 / 3 + 4 >= sizeof(b64))
        return -1;
    EVP_EncodeBlock(b64, (const unsigned char *)host, (int)ulen);
    snprintf(auth, authlen, "Authorization: Basic %s", b64);
    snprintf(bare, barelen, "%.*s%s", (int)(host - url), url, at + 1);
    return 0;
}

/* why, with the URL (if it is in there) replaced by its origin. */
static void scrub(char *why, size_t len, const char *url, const char *bare, const char *origin)
{
    const char *const urls[] = {url, bare};
    char *hit, out[700] = "";

    for (size_t i = 0; i < 2; i++)
        if (*urls[i] && (hit = strstr(why, urls[i]))) {
            snprintf(out, sizeof(out), "%.*s%s%s", (int)(hit - why), why, origin,
                     hit + strlen(urls[i]));
            size_t n = strlen(out) < len - 1 ? strlen(out) : len - 1;
            memcpy(why, out, n);
            why[n] = '\0';
        }
}

/* One POST; 0 if answered 2xx, else -1 with why. */
static int attempt(const char *url, const char *auth, const char *ca, const char *body,
                   char *why, size_t len)
{
    const char *headers[] = {"Content-Type: application/json", auth};
    struct cmg_fetch_req req = {.url = url, .method = "POST", .ca_pem = ca,
                                .headers = headers, .n_headers = *auth ? 2 : 1,
                                .body = body, .body_len = strlen(body),
                                .timeout_ms = CMG_WEBHOOK_TIMEOUT_MS,
                                .max_body = RESPONSE_MAX, .truncate_body = true};
    struct cmg_fetch_resp resp = {0};
    int rc = -1;

    if (cmg_fetch(&req, &resp, why, len) != CMG_FETCH_OK)
        ;
    else if (resp.status < 200 || resp.status > 299)
        snprintf(why, len, "HTTP status %d, expected 2xx", resp.status);
    else {
        snprintf(why, len, "%d", resp.status);
        rc = 0;
    }
    cmg_fetch_resp_free(&resp);
    return rc;
}

static void write_all(int fd, const char *p, size_t n)
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

/* Tries twice; writes "ok STATUS" or "fail WHY" to fd and exits. It holds none of the
 * site's descriptors, and dies with the site, or by itself past its deadline. */
static void child_main(const char *url, const char *ca, const char *body, const char *origin,
                       int fd, pid_t site)
{
    char bare[4096], auth[2048], why[600], line[700];
    sigset_t none;
    int rc = -1;

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != site)
        _exit(1);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGALRM, SIG_DFL);
    alarm(CMG_WEBHOOK_DEADLINE_S + 5);
    if (fd > 3)
        close_range(3, (unsigned)fd - 1, 0);
    close_range((unsigned)fd + 1, ~0U, 0);
    if (split_credentials(url, bare, sizeof(bare), auth, sizeof(auth)) < 0) {
        snprintf(why, sizeof(why), "the user information of the URL is too long");
    } else {
        for (int i = 0; i < 2 && rc < 0; i++) {
            if (i)
                usleep(CMG_WEBHOOK_RETRY_MS * 1000);
            rc = attempt(bare, auth, ca, body, why, sizeof(why));
        }
    }
    scrub(why, sizeof(why), url, bare, origin);
    snprintf(line, sizeof(line), "%s %s", rc == 0 ? "ok" : "fail", why);
    write_all(fd, line, strlen(line));
    _exit(0);
}

/* ---- the queue (on the site's loop) ---- */

static void item_free(struct item *it)
{
    free(it->body);
    memset(it, 0, sizeof(*it));
}

static void kill_child(struct cmg_webhook *w)
{
    if (w->io.fd >= 0) {
        cmg_io_stop(&w->io);
        close(w->io.fd);
        w->io.fd = -1;
    }
    cmg_timer_stop(w->loop, &w->deadline);
    if (w->child > 0) {
        kill(w->child, SIGKILL);
        while (waitpid(w->child, NULL, 0) < 0 && errno == EINTR)
            ;
        w->child = 0;
    }
}

static void kick(struct cmg_webhook *w);

/* The delivery at the head ended: logged, dropped from the queue, the next one started. */
static void finish(struct cmg_webhook *w, const char *failure)
{
    struct item *it = &w->queue[w->head];
    bool ok = !failure && !strncmp(w->answer, "ok ", 3);
    const char *why = failure ? failure
                    : !strncmp(w->answer, "fail ", 5) ? w->answer + 5
                                                      : "the delivery process gave no answer";
    const struct cmg_log_field f[] = {
        CMG_F_STR("kind", it->kind), CMG_F_STR("subject", it->subject),
        CMG_F_STR("webhook", w->origin), CMG_F_STR(ok ? "status" : "error", ok ? w->answer + 3 : why)};

    kill_child(w);
    if (ok)
        cmg_log_kv(CMG_LOG_INFO, "alert webhook delivered", f, CMG_LOG_NFIELDS(f));
    else
        cmg_log_kv(CMG_LOG_WARN, "alert webhook failed after 2 tries: the alert stays recorded "
                   "and logged; this notification is dropped", f, CMG_LOG_NFIELDS(f));
    item_free(it);
    w->head = (w->head + 1) % CMG_WEBHOOK_QUEUE_MAX;
    w->count--;
    w->answer_len = 0;
    w->answer[0] = '\0';
    kick(w);
}

static void on_answer(struct cmg_io *io, uint32_t events)
{
    struct cmg_webhook *w = OF(struct cmg_webhook, io, io);
    ssize_t n;

    (void)events;
    for (;;) {
        n = read(io->fd, w->answer + w->answer_len, sizeof(w->answer) - 1 - w->answer_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0 || w->answer_len + (size_t)n >= sizeof(w->answer) - 1) {
            w->answer_len += n > 0 ? (size_t)n : 0;
            break;
        }
        w->answer_len += (size_t)n;
    }
    w->answer[w->answer_len] = '\0';
    finish(w, NULL);
}

static void on_deadline(struct cmg_timer *t)
{
    struct cmg_webhook *w = OF(struct cmg_webhook, deadline, t);
    char why[96];

    snprintf(why, sizeof(why), "no answer within %d s", CMG_WEBHOOK_DEADLINE_S);
    finish(w, why);
}

static int start_child(struct cmg_webhook *w, const struct cmg_alert_settings *set)
{
    pid_t pid, site = getpid();
    int p[2];

    if (pipe2(p, O_CLOEXEC) < 0)
        return -1;
    if ((pid = fork()) < 0) {
        close(p[0]);
        close(p[1]);
        return -1;
    }
    if (pid == 0)
        child_main(set->webhook, set->webhook_ca, w->queue[w->head].body, w->origin, p[1],
                   site);
    close(p[1]);
    fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK);
    w->child = pid;
    if (cmg_io_start(w->loop, &w->io, p[0], EPOLLIN, on_answer) < 0) {
        close(p[0]);
        kill_child(w);
        return -1;
    }
    cmg_timer_start(w->loop, &w->deadline, CMG_WEBHOOK_DEADLINE_S * 1000, on_deadline);
    return 0;
}

static void drop_all(struct cmg_webhook *w)
{
    while (w->count) {
        item_free(&w->queue[w->head]);
        w->head = (w->head + 1) % CMG_WEBHOOK_QUEUE_MAX;
        w->count--;
    }
}

/* Starts the delivery at the head, to the webhook set now. */
static void kick(struct cmg_webhook *w)
{
    struct cmg_alert_settings set;

    if (w->child > 0 || !w->count)
        return;
    if (cmg_alert_settings_load(w->store, &set) < 0) {
        cmg_warn("alert webhook: cannot read its settings (%s): %zu notification(s) dropped",
                 cmg_store_error(w->store), w->count);
        drop_all(w);
        return;
    }
    if (!set.webhook) {
        cmg_info("alert webhook: none is set any more: %zu notification(s) dropped", w->count);
        drop_all(w);
    } else {
        cmg_alerts_url_origin(set.webhook, w->origin, sizeof(w->origin));
        if (start_child(w, &set) < 0) {
            char why[128];
            snprintf(why, sizeof(why), "cannot start the delivery process: %s", strerror(errno));
            finish(w, why);
        }
    }
    cmg_alert_settings_free(&set);
}

void cmg_webhook_post(struct cmg_webhook *w, char *body, const char *kind, const char *subject)
{
    struct item *it;

    if (w->count == CMG_WEBHOOK_QUEUE_MAX) {
        /* the head may be under way: the oldest waiting one goes */
        size_t victim = (w->head + (w->child > 0 ? 1 : 0)) % CMG_WEBHOOK_QUEUE_MAX;
        const struct cmg_log_field f[] = {CMG_F_STR("kind", w->queue[victim].kind),
                                          CMG_F_STR("subject", w->queue[victim].subject),
                                          CMG_F_NUM("queue", CMG_WEBHOOK_QUEUE_MAX)};
        cmg_log_kv(CMG_LOG_WARN, "alert webhook queue full: the oldest waiting notification "
                   "is dropped (the alert stays recorded)", f, CMG_LOG_NFIELDS(f));
        item_free(&w->queue[victim]);
        for (size_t i = victim; i != (w->head + w->count - 1) % CMG_WEBHOOK_QUEUE_MAX;
             i = (i + 1) % CMG_WEBHOOK_QUEUE_MAX)
            w->queue[i] = w->queue[(i + 1) % CMG_WEBHOOK_QUEUE_MAX];
        w->count--;
    }
    it = &w->queue[(w->head + w->count) % CMG_WEBHOOK_QUEUE_MAX];
    it->body = body;
    snprintf(it->kind, sizeof(it->kind), "%s", kind);
    snprintf(it->subject, sizeof(it->subject), "%s", subject);
    w->count++;
    kick(w);
}

struct cmg_webhook *cmg_webhook_new(struct cmg_loop *loop, struct cmg_store *st)
{
    struct cmg_webhook *w = calloc(1, sizeof(*w));

    if (!w)
        return NULL;
    w->loop = loop;
    w->store = st;
    w->io.fd = -1;
    return w;
}

void cmg_webhook_free(struct cmg_webhook *w)
{
    if (!w)
        return;
    kill_child(w);
    drop_all(w);
    free(w);
}
