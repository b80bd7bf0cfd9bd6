/* A small HTTP/1.1 server on the event loop, for the site's own services (admin API,
 * registration, the connectors' policy feed): TLS (or plain TCP) on an internal address,
 * requests with bodies of bounded size, keep-alive, and requests a handler may hold
 * (long polls) and answer later. Not for the data path. */
#ifndef CMG_HTTPD_H
#define CMG_HTTPD_H

#include "core/loop.h"
#include "http/headers.h"

#include <openssl/ssl.h>
#include <stddef.h>

#define CMG_HTTPD_MAX_BODY (1024 * 1024)

struct cmg_httpd;
struct cmg_httpd_conn;

struct cmg_httpd_req {
    struct cmg_httpd_conn *conn;
    char method[16];
    char target[2048];
    struct cmg_headers headers;
    char *body;                 /* NUL-terminated */
    size_t body_len;
    char peer[64];
    X509 *peer_cert;            /* the client's verified certificate (TLS), or NULL */
    /* set by a handler that holds the request: called if the client goes first */
    void (*on_abort)(struct cmg_httpd_req *req);
    void *hold;
};

typedef void (*cmg_httpd_handler)(void *user, struct cmg_httpd_req *req);

/* Listens on addr ("host:port"), over TLS with tls (its client certificate policy
 * applies), or plain with NULL. -1 with a reason in err. */
int cmg_httpd_listen(struct cmg_loop *loop, const char *addr, SSL_CTX *tls, cmg_httpd_handler fn,
                     void *user, struct cmg_httpd **out, char *err, size_t errlen);
/* The context new connections take (the caller owns it; live ones keep theirs). */
void cmg_httpd_set_tls(struct cmg_httpd *h, SSL_CTX *tls);
/* Connections held at once (default 1,024) and the largest request body (default
 * CMG_HTTPD_MAX_BODY; 0: a request with a body is refused). */
void cmg_httpd_set_limits(struct cmg_httpd *h, unsigned max_conns, size_t max_body);
/* Closes the listener and every connection (held requests see on_abort). */
void cmg_httpd_free(struct cmg_httpd *h);
/* Answers a request (now or later, once). extra: more header lines, "\r\n"-terminated,
 * or NULL. */
void cmg_httpd_respond(struct cmg_httpd_req *req, int status, const char *content_type,
                       const char *body, size_t len, const char *extra);
/* JSON helpers: {"error": reason} with status, and a cJSON document (freed here). */
void cmg_httpd_error(struct cmg_httpd_req *req, int status, const char *reason);
struct cJSON;
void cmg_httpd_json(struct cmg_httpd_req *req, int status, struct cJSON *doc);
/* A request header's value, or NULL. */
const char *cmg_httpd_header(const struct cmg_httpd_req *req, const char *name);
/* The bearer token of the Authorization header, or NULL. */
const char *cmg_httpd_bearer(const struct cmg_httpd_req *req);

#endif
