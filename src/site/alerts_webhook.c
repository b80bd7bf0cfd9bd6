/* The alerts' webhook: each notification is POSTed by a child process (the blocking
 * client of client/fetch.c, in site/child.c as the OIDC key refresh), one at a time, so a slow or
 * dead receiver never holds up the site's loop. At most CMG_WEBHOOK_QUEUE_MAX wait (the
 * oldest is dropped, logged); each delivery is tried twice; the child is killed after
 * CMG_WEBHOOK_DEADLINE_S. Logs name the webhook by its origin only: a URL's path, query
 * and user information often are its credentials (the child gives the fetch the host and
 * port apart from the path, so its errors cannot quote them). */
#include "site/alerts.h"

#include "client/fetch.h"
#include "core/log.h"
#include "site/child.h"

#include <errno.h>
#include <openssl/evp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
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
    struct cmg_child delivery;  /* the process POSTing the head of the queue */
    char origin[300];          /* of the delivery under way */
};

#define OF(type, member, p) ((type *)((char *)(p) - offsetof(type, member)))

/* ---- the child ---- */

/* Where a delivery goes: the URL's parts as client/fetch.c takes them apart, so that
 * its errors name the host and port only (never the path or query, often a secret). */
struct target {
    bool tls;
    char addr[300];           /* "host:port" or "[v6]:port" */
    char path[4096];
    char auth[2048];          /* "Authorization: Basic ..." from the user information, or "" */
};

static int hex_digit(int c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* "Authorization: Basic ..." for user information (percent-encoded, as in a URL). */
static int basic_auth(const char *info, size_t n, char *out, size_t outlen)
{
    char plain[1024];
    unsigned char b64[1400];
    size_t len = 0;

    for (size_t i = 0; i < n; i++, len++) {
        if (len == sizeof(plain))
            return -1;
        if (info[i] == '%' && i + 2 < n && hex_digit(info[i + 1]) >= 0 &&
            hex_digit(info[i + 2]) >= 0) {
            plain[len] = (char)(hex_digit(info[i + 1]) * 16 + hex_digit(info[i + 2]));
            i += 2;
        } else {
            plain[len] = info[i];
        }
    }
    EVP_EncodeBlock(b64, (const unsigned char *)plain, (int)len);
    snprintf(out, outlen, "Authorization: Basic %s", b64);
    return 0;
}

/* 0, or -1 with why (naming no part of the URL but its origin). */
static int split_url(const char *url, struct target *t, char *why, size_t len)
{
    const char *p = strstr(url, "://"), *host, *at;
    char authority[300], name[256];
    size_t n;
    int port;

    memset(t, 0, sizeof(*t));
    if (!p)
        return snprintf(why, len, "not a URL"), -1;
    t->tls = !strncasecmp(url, "https", 5);
    host = p + 3;
    n = strcspn(host, "/?#");
    if ((at = memrchr(host, '@', n))) {   /* the password may hold an '@' */
        if (basic_auth(host, (size_t)(at - host), t->auth, sizeof(t->auth)) < 0)
            return snprintf(why, len, "the user information of the URL is too long"), -1;
        n -= (size_t)(at + 1 - host);
        host = at + 1;
    }
    if (n >= sizeof(authority))
        return snprintf(why, len, "the host of the URL is too long"), -1;
    memcpy(authority, host, n);
    authority[n] = '\0';
    if (cmg_fetch_split_addr(authority, t->tls ? 443 : 80, name, sizeof(name), &port) < 0)
        return snprintf(why, len, "bad host or port"), -1;
    snprintf(t->addr, sizeof(t->addr), strchr(name, ':') ? "[%s]:%d" : "%s:%d", name, port);
    if (snprintf(t->path, sizeof(t->path), "%s%.*s", host[n] == '/' ? "" : "/",
                 (int)strcspn(host + n, "#"), host + n) >= (int)sizeof(t->path))
        return snprintf(why, len, "the URL is too long"), -1;
    return 0;
}

/* One POST; 0 if answered 2xx, else -1 with why. */
static int attempt(const struct target *t, const char *ca, const char *body, char *why,
                   size_t len)
{
    const char *headers[] = {"Content-Type: application/json", t->auth};
    struct cmg_fetch_req req = {.addr = t->addr, .target = t->path, .tls = t->tls,
                                .method = "POST", .ca_pem = ca,
                                .headers = headers, .n_headers = *t->auth ? 2 : 1,
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

struct job {
    const char *url, *ca, *body;
};

/* The child's job: tries twice; writes "ok STATUS" or "fail WHY". */
static void delivery_job(void *arg, int fd)
{
    const struct job *j = arg;
    static struct target t;
    char why[600], line[700];
    int rc = -1;

    if (split_url(j->url, &t, why, sizeof(why)) == 0) {
        for (int i = 0; i < 2 && rc < 0; i++) {
            if (i)
                usleep(CMG_WEBHOOK_RETRY_MS * 1000);
            rc = attempt(&t, j->ca, j->body, why, sizeof(why));
        }
    }
    snprintf(line, sizeof(line), "%s %s", rc == 0 ? "ok" : "fail", why);
    cmg_child_write(fd, line, strlen(line));
}

/* ---- the queue (on the site's loop) ---- */

static void item_free(struct item *it)
{
    free(it->body);
    memset(it, 0, sizeof(*it));
}

static void kick(struct cmg_webhook *w);

/* The delivery at the head ended: logged, dropped from the queue, the next one started. */
static void finish(struct cmg_webhook *w, const char *failure)
{
    struct item *it = &w->queue[w->head];
    const char *answer = w->delivery.answer ? w->delivery.answer : "";
    bool ok = !failure && !strncmp(answer, "ok ", 3);
    const char *why = failure ? failure
                    : !strncmp(answer, "fail ", 5) ? answer + 5
                                                   : "the delivery process gave no answer";
    const struct cmg_log_field f[] = {
        CMG_F_STR("kind", it->kind), CMG_F_STR("subject", it->subject),
        CMG_F_STR("webhook", w->origin), CMG_F_STR(ok ? "status" : "error", ok ? answer + 3 : why)};

    if (ok)
        cmg_log_kv(CMG_LOG_INFO, "alert webhook delivered", f, CMG_LOG_NFIELDS(f));
    else
        cmg_log_kv(CMG_LOG_WARN, "alert webhook failed after 2 tries: the alert stays recorded "
                   "and logged; this notification is dropped", f, CMG_LOG_NFIELDS(f));
    item_free(it);
    w->head = (w->head + 1) % CMG_WEBHOOK_QUEUE_MAX;
    w->count--;
    cmg_child_stop(&w->delivery);
    kick(w);
}

static void delivered(struct cmg_child *c, const char *failure)
{
    finish(OF(struct cmg_webhook, delivery, c), failure);
}

static int start_child(struct cmg_webhook *w, const struct cmg_alert_settings *set)
{
    struct job j = {set->webhook, set->webhook_ca, w->queue[w->head].body};

    return cmg_child_start(&w->delivery, delivery_job, &j);
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

    if (cmg_child_running(&w->delivery) || !w->count)
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
        size_t victim = (w->head + (cmg_child_running(&w->delivery) ? 1 : 0)) % CMG_WEBHOOK_QUEUE_MAX;
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
    cmg_child_init(&w->delivery, loop, CMG_WEBHOOK_DEADLINE_S, ANSWER_MAX, delivered);
    return w;
}

void cmg_webhook_free(struct cmg_webhook *w)
{
    if (!w)
        return;
    cmg_child_stop(&w->delivery);
    if (w->count)
        cmg_info("alert webhook: %zu notification(s) not delivered at shutdown (the alerts "
                 "stay recorded)", w->count);
    drop_all(w);
    free(w);
}
