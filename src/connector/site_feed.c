/* The site feed: the connector long-polls the site's admin address for the signed
 * policy and the routes (GET /v1/connector/feed?after=N, answered at once when the
 * site has something newer, else after some seconds). Whatever is new goes up
 * every tunnel. A site that cannot be reached is retried with back-off; the
 * connector meanwhile serves with what it has. */
#include "connector/cn.h"
#include "core/log.h"
#include "site/pki.h"

#include <cjson/cJSON.h>
#include <openssl/crypto.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FEED_TIMEOUT_MS 40000
#define FEED_MAX_BODY (8u * 1024 * 1024)
#define RETRY_MIN_MS 500
#define RETRY_MAX_MS 15000

struct cmg_site_feed {
    struct cmg_connector *cn;
    char authority[300];
    char path_prefix[256];
    struct cmg_addr addr;
    char secret[128];
    struct cmg_conn conn;
    bool busy;
    llhttp_t parser;
    int status;
    struct cmg_buf body;
    bool complete;
    bool failing;             /* logged once until it works again */
    uint32_t retry_ms;
    struct cmg_timer timer;
};

static void request(struct cmg_site_feed *f);

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_site_feed *f = p->data;
    if (f->body.len + n > FEED_MAX_BODY)
        return -1;
    return cmg_buf_append(&f->body, at, n);
}

static int on_headers_complete(llhttp_t *p)
{
    ((struct cmg_site_feed *)p->data)->status = p->status_code;
    return 0;
}

static int on_complete(llhttp_t *p)
{
    ((struct cmg_site_feed *)p->data)->complete = true;
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_body = on_body,
    .on_headers_complete = on_headers_complete,
    .on_message_complete = on_complete,
};

static void finish(struct cmg_site_feed *f)
{
    cmg_timer_stop(f->cn->loop, &f->timer);
    if (f->conn.state != CMG_CONN_CLOSED)
        cmg_conn_close(&f->conn);
    f->busy = false;
    cmg_buf_free(&f->body);
}

static void on_retry(struct cmg_timer *t)
{
    request((struct cmg_site_feed *)((char *)t - offsetof(struct cmg_site_feed, timer)));
}

static void retry(struct cmg_site_feed *f, const char *why)
{
    finish(f);
    if (!f->failing)
        cmg_warn("site %s unreachable or refusing: %s (serving with policy version %lld; "
                 "retrying)", f->authority, why, (long long)f->cn->policy_version);
    f->failing = true;
    f->retry_ms = f->retry_ms ? f->retry_ms * 2 : RETRY_MIN_MS;
    if (f->retry_ms > RETRY_MAX_MS)
        f->retry_ms = RETRY_MAX_MS;
    cmg_timer_start(f->cn->loop, &f->timer, f->retry_ms, on_retry);
}

/* A feed document: {"version": N, "policy": "<jws>", "routes": {...}}. */
static void take(struct cmg_site_feed *f)
{
    struct cmg_connector *cn = f->cn;
    cJSON *doc = cJSON_ParseWithLength(cmg_buf_head(&f->body), f->body.len);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(doc, "version");
    const char *policy = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "policy"));
    const cJSON *routes = cJSON_GetObjectItemCaseSensitive(doc, "routes");
    bool changed = false;

    if (!cJSON_IsNumber(v) || !policy || !cJSON_IsObject(routes)) {
        cJSON_Delete(doc);
        retry(f, "malformed feed document");
        return;
    }
    if (f->failing)
        cmg_info("site %s reached again", f->authority);
    f->failing = false;
    f->retry_ms = 0;
    if ((int64_t)v->valuedouble > cn->policy_version) {
        char *copy = strdup(policy);
        if (copy) {
            free(cn->policy);
            cn->policy = copy;
            cn->policy_version = (int64_t)v->valuedouble;
            changed = true;
            cmg_info("policy version %lld from the site", (long long)cn->policy_version);
        }
    }
    changed |= cmg_cn_routes_apply(cn, routes);
    cJSON_Delete(doc);
    if (changed)
        for (int i = 0; i < cn->ntunnels; i++)
            cmg_cn_tunnel_announce(&cn->tunnels[i]);
    finish(f);
    cmg_timer_start(cn->loop, &f->timer, 0, on_retry);   /* the next poll, from the loop */
}

static void on_read(struct cmg_conn *c)
{
    struct cmg_site_feed *f = c->owner;
    char buf[16384];
    ssize_t n;

    while (f->busy && !f->complete) {
        n = cmg_conn_read(c, buf, sizeof(buf));
        if (n == CMG_AGAIN)
            return;
        if (n == 0) {
            if (llhttp_finish(&f->parser) != HPE_OK || !f->complete) {
                retry(f, "connection closed mid-answer");
                return;
            }
            break;
        }
        enum llhttp_errno e = llhttp_execute(&f->parser, buf, (size_t)n);
        if (e != HPE_OK && e != HPE_PAUSED) {
            retry(f, "malformed answer");
            return;
        }
    }
    if (!f->complete)
        return;
    if (f->status != 200) {
        char why[64];
        snprintf(why, sizeof(why), "status %d%s", f->status,
                 f->status == 401 ? " (is site_secret the site's connector.secret?)" : "");
        retry(f, why);
        return;
    }
    take(f);
}

static void on_error(struct cmg_conn *c, const char *why)
{
    retry(c->owner, why);
}

static void on_timeout(struct cmg_timer *t)
{
    retry((struct cmg_site_feed *)((char *)t - offsetof(struct cmg_site_feed, timer)),
          "no answer in time");
}

static const struct cmg_conn_ops feed_ops = {NULL, on_read, NULL, on_error};

static void request(struct cmg_site_feed *f)
{
    int fd = cmg_net_connect(&f->addr);

    if (fd < 0) {
        retry(f, strerror(errno));
        return;
    }
    f->busy = true;
    f->complete = false;
    f->status = 0;
    llhttp_init(&f->parser, HTTP_RESPONSE, &settings);
    f->parser.data = f;
    if (cmg_conn_start(&f->conn, f->cn->loop, fd, NULL, true, &feed_ops, f) < 0) {
        close(fd);
        retry(f, "cannot start the connection");
        return;
    }
    if (cmg_buf_printf(&f->conn.out,
                       "GET %s/v1/connector/feed?after=%lld HTTP/1.1\r\nHost: %s\r\n"
                       "Authorization: Bearer %s\r\nConnection: close\r\n\r\n",
                       f->path_prefix, (long long)f->cn->policy_version, f->authority,
                       f->secret) < 0) {
        retry(f, "out of memory");
        return;
    }
    cmg_conn_flush(&f->conn);
    cmg_conn_want_read(&f->conn, true);
    cmg_timer_start(f->cn->loop, &f->timer, FEED_TIMEOUT_MS, on_timeout);
}

static int read_secret(const char *file, char *out, size_t len, char *err, size_t errlen)
{
    unsigned char *data = NULL;
    size_t n = 0;

    if (cmg_pki_read_file(file, 4096, &data, &n) < 0) {
        snprintf(err, errlen, "site_secret: cannot read %s", file);
        return -1;
    }
    while (n && (data[n - 1] == '\n' || data[n - 1] == '\r' || data[n - 1] == ' '))
        n--;
    if (n == 0 || n >= len || memchr(data, '\n', n) || memchr(data, '\r', n)) {
        snprintf(err, errlen, "site_secret: %s does not hold one line", file);
        free(data);
        return -1;
    }
    memcpy(out, data, n);
    out[n] = 0;
    free(data);
    return 0;
}

int cmg_site_feed_start(struct cmg_connector *cn, char *err, size_t errlen)
{
    const char *url = cn->cfg.site;
    struct cmg_site_feed *f;
    const char *host = url + 7, *slash;

    if (!url[0])
        return 0;
    if (!(f = calloc(1, sizeof(*f)))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    f->cn = cn;
    slash = strchr(host, '/');
    snprintf(f->authority, sizeof(f->authority), "%.*s",
             (int)(slash ? (size_t)(slash - host) : strlen(host)), host);
    snprintf(f->path_prefix, sizeof(f->path_prefix), "%s", slash ? slash : "");
    {
        size_t n = strlen(f->path_prefix);
        while (n && f->path_prefix[n - 1] == '/')
            f->path_prefix[--n] = 0;
    }
    if (read_secret(cn->cfg.site_secret, f->secret, sizeof(f->secret), err, errlen) < 0 ||
        cmg_addr_parse(f->authority, 80, &f->addr, err, errlen) < 0) {
        free(f);
        return -1;
    }
    cn->feed = f;
    request(f);
    return 0;
}

void cmg_site_feed_stop(struct cmg_connector *cn)
{
    struct cmg_site_feed *f = cn->feed;

    if (!f)
        return;
    finish(f);
    OPENSSL_cleanse(f->secret, sizeof(f->secret));
    free(f);
    cn->feed = NULL;
}
