/* One HTTP/1.1 exchange with the site's feed listener: the feed's address and TLS
 * context (mutual TLS, the site's certificate required), a short connection of its
 * own ("Connection: close"), the answer's body kept up to a limit, every wait bounded
 * by a deadline. The policy feed, the connector's report, the notify feed and the
 * relay of the gateways' notify reports all talk to the site through this one client. */
#include "connector/cn.h"
#include "core/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CALL_OF(p, field) \
    ((struct cmg_site_call *)((char *)(p) - offsetof(struct cmg_site_call, field)))

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct cmg_site_call *c = p->data;

    if (c->answer.len + n > c->max_answer)
        return c->cut_answer ? cmg_buf_append(&c->answer, at, c->max_answer - c->answer.len)
                             : -1;
    return cmg_buf_append(&c->answer, at, n);
}

static int on_headers_complete(llhttp_t *p)
{
    ((struct cmg_site_call *)p->data)->status = p->status_code;
    return 0;
}

static int on_complete(llhttp_t *p)
{
    ((struct cmg_site_call *)p->data)->complete = true;
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_body = on_body,
    .on_headers_complete = on_headers_complete,
    .on_message_complete = on_complete,
};

/* Closes the connection; the answer stays until the next call or cmg_site_call_free. */
static void end(struct cmg_site_call *c)
{
    cmg_timer_stop(c->cn->loop, &c->timer);
    if (c->conn.state != CMG_CONN_CLOSED || c->conn.io.fd >= 0)
        cmg_conn_close(&c->conn);
    cmg_buf_free(&c->request);
    c->busy = false;
}

/* The owner hears once, with everything closed: it may start the next call. */
static void done(struct cmg_site_call *c, int status, const char *why)
{
    end(c);
    c->done(c, status, why);
}

static void on_read(struct cmg_conn *conn)
{
    struct cmg_site_call *c = conn->owner;
    char buf[16384];
    ssize_t n;

    while (c->busy && !c->complete) {
        n = cmg_conn_read(conn, buf, sizeof(buf));
        if (n == CMG_AGAIN)
            return;
        if (n == 0) {
            if (llhttp_finish(&c->parser) != HPE_OK || !c->complete) {
                done(c, 0, "connection closed mid-answer");
                return;
            }
            break;
        }
        enum llhttp_errno e = llhttp_execute(&c->parser, buf, (size_t)n);
        if (e != HPE_OK && e != HPE_PAUSED) {
            done(c, 0, c->answer.len >= c->max_answer ? "answer too large" : "malformed answer");
            return;
        }
    }
    if (c->complete)
        done(c, c->status, NULL);
}

static void on_error(struct cmg_conn *conn, const char *why) { done(conn->owner, 0, why); }

static void on_timeout(struct cmg_timer *tm) { done(CALL_OF(tm, timer), -1, "no answer in time"); }

/* TLS is up and the site's certificate verified: the request, queued at the start. */
static void on_open(struct cmg_conn *conn)
{
    struct cmg_site_call *c = conn->owner;

    if (cmg_buf_append(&conn->out, cmg_buf_head(&c->request), c->request.len) < 0) {
        done(c, 0, "out of memory");
        return;
    }
    cmg_buf_free(&c->request);
    cmg_conn_flush(conn);
    cmg_conn_want_read(conn, true);
}

static const struct cmg_conn_ops call_ops = {on_open, on_read, NULL, on_error};

void cmg_site_call_init(struct cmg_site_call *c, struct cmg_connector *cn,
                        void (*done_cb)(struct cmg_site_call *c, int status, const char *why),
                        size_t max_answer)
{
    memset(c, 0, sizeof(*c));
    c->cn = cn;
    c->done = done_cb;
    c->max_answer = max_answer;
    c->conn.io.fd = -1;
    c->conn.state = CMG_CONN_CLOSED;
}

int cmg_site_call_start(struct cmg_site_call *c, const char *method, const char *target,
                        const char *headers, const void *body, size_t len, uint32_t timeout_ms)
{
    const char *authority, *host, *prefix;
    const struct cmg_addr *addr;
    SSL_CTX *tls;
    SSL *ssl;
    int fd;

    if (c->busy)
        return -1;
    cmg_buf_free(&c->answer);
    if (!cmg_site_feed_target(c->cn, &addr, &tls, &host, &authority, &prefix)) {
        c->done(c, 0, "no site configured");
        return 0;
    }
    if (cmg_buf_printf(&c->request, "%s %s%s HTTP/1.1\r\nHost: %s\r\n%s", method, prefix, target,
                       authority, headers ? headers : "") < 0 ||
        (body && cmg_buf_printf(&c->request, "Content-Length: %zu\r\n", len) < 0) ||
        cmg_buf_appends(&c->request, "Connection: close\r\n\r\n") < 0 ||
        (body && len && cmg_buf_append(&c->request, body, len) < 0)) {
        cmg_buf_free(&c->request);
        c->done(c, 0, "out of memory");
        return 0;
    }
    c->busy = true;
    c->complete = false;
    c->status = 0;
    llhttp_init(&c->parser, HTTP_RESPONSE, &settings);
    c->parser.data = c;
    if ((fd = cmg_net_connect(addr)) < 0) {
        done(c, 0, strerror(errno));
        return 0;
    }
    if (!(ssl = SSL_new(tls))) {
        close(fd);
        done(c, 0, "out of memory");
        return 0;
    }
    SSL_set_connect_state(ssl);
    SSL_set_tlsext_host_name(ssl, host);
    if (cmg_conn_start(&c->conn, c->cn->loop, fd, ssl, true, &call_ops, c) < 0) {
        done(c, 0, "cannot start the connection");
        return 0;
    }
    cmg_timer_start(c->cn->loop, &c->timer, timeout_ms, on_timeout);
    return 0;
}

const char *cmg_site_call_authority(const struct cmg_site_call *c)
{
    const char *authority = "(no site)", *host, *prefix;
    const struct cmg_addr *addr;
    SSL_CTX *tls;

    cmg_site_feed_target(c->cn, &addr, &tls, &host, &authority, &prefix);
    return authority;
}

void cmg_site_call_cancel(struct cmg_site_call *c)
{
    if (c->busy)
        end(c);
}

void cmg_site_call_free(struct cmg_site_call *c)
{
    cmg_site_call_cancel(c);
    cmg_buf_free(&c->answer);
}
