/* Blocking HTTP/1.1 client over TCP or TLS; see fetch.h. The socket is non-blocking and
 * every wait is a poll() with the timeout, so a silent server cannot hold us forever;
 * llhttp parses the response (Content-Length, chunked, or up to the close). */
#include "client/fetch.h"
#include "http/h1_head.h"

#include "core/buf.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <llhttp.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define FETCH_READ_CHUNK 16384
#define FETCH_HOST_MAX 256
#define FETCH_ADDR_MAX (FETCH_HOST_MAX + 16)

struct fetch {
    const struct cmg_fetch_req *req;
    struct cmg_fetch_resp *resp;
    char *err;
    size_t errlen;
    int result;                    /* the first error, or CMG_FETCH_OK */

    char host[FETCH_HOST_MAX];     /* without brackets */
    char addr[FETCH_ADDR_MAX];     /* "host:port" or "[v6]:port", for messages */
    int port;
    bool tls;
    char *target;
    const char *name;              /* server_name, or host */
    const char *method;
    int timeout_ms;

    int fd;
    SSL_CTX *ctx;
    SSL *ssl;

    llhttp_t parser;
    struct cmg_buf reason;         /* the status line's text */
    struct cmg_headers fields;
    struct cmg_h1_head head;       /* collects fields */
    bool informational;            /* parsing a 1xx response */
    bool done;
    FILE *out;
    size_t max_body;
    size_t body_cap;               /* allocated for resp->body */
};

/* ---- errors ---- */

/* Records the first error; returns its code. */
static int fail(struct fetch *f, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(struct fetch *f, int code, const char *fmt, ...)
{
    va_list ap;

    if (f->result != CMG_FETCH_OK)
        return f->result;
    f->result = code;
    if (f->errlen) {
        va_start(ap, fmt);
        vsnprintf(f->err, f->errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* The reasons in the OpenSSL error queue, "; "-separated, which it clears. */
static void ssl_reasons(char *buf, size_t cap)
{
    unsigned long e;
    size_t used = 0;

    buf[0] = 0;
    while ((e = ERR_get_error()) != 0) {
        const char *reason = ERR_reason_error_string(e);
        char code[128];
        int n;

        if (!reason) {
            ERR_error_string_n(e, code, sizeof(code));
            reason = code;
        }
        if (used + 1 >= cap)
            continue;
        n = snprintf(buf + used, cap - used, "%s%s", used ? "; " : "", reason);
        if (n > 0)
            used += (size_t)n < cap - used ? (size_t)n : cap - used - 1;
    }
}

/* ---- where to ---- */

static bool is_ip_literal(const char *s)
{
    unsigned char a[sizeof(struct in6_addr)];

    return inet_pton(AF_INET, s, a) == 1 || inet_pton(AF_INET6, s, a) == 1;
}

/* A host name as we accept it: letters, digits, '-', '.', '_'. */
static bool host_name_ok(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char c = s[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.' || c == '_'))
            return false;
    }
    return n > 0;
}

int cmg_fetch_split_addr(const char *addr, int default_port, char *host, size_t hostcap,
                         int *port)
{
    const char *h = addr, *portstr = NULL, *end;
    size_t hlen;
    char *stop;
    unsigned long v;

    if (addr[0] == '[') {
        end = strchr(addr, ']');
        if (!end)
            return -1;
        h = addr + 1;
        hlen = (size_t)(end - h);
        if (end[1] == ':')
            portstr = end + 2;
        else if (end[1])
            return -1;
    } else {
        end = strrchr(addr, ':');
        if (end && strchr(addr, ':') != end)
            return -1; /* a bare IPv6 address: it needs brackets */
        hlen = end ? (size_t)(end - addr) : strlen(addr);
        if (end)
            portstr = end + 1;
        if (!host_name_ok(addr, hlen))
            return -1;
    }
    if (hlen == 0 || hlen >= hostcap)
        return -1;
    memcpy(host, h, hlen);
    host[hlen] = 0;
    if (addr[0] == '[') {
        unsigned char a[sizeof(struct in6_addr)];

        if (inet_pton(AF_INET6, host, a) != 1)
            return -1;
    }
    if (!portstr) {
        if (default_port <= 0)
            return -1;
        *port = default_port;
        return 0;
    }
    if (*portstr < '0' || *portstr > '9')
        return -1;
    errno = 0;
    v = strtoul(portstr, &stop, 10);
    if (errno || *stop || v < 1 || v > 65535)
        return -1;
    *port = (int)v;
    return 0;
}

/* A request target: printable ASCII without spaces, starting with '/'. */
static bool target_ok(const char *s)
{
    if (*s != '/')
        return false;
    for (; *s; s++)
        if ((unsigned char)*s <= 0x20 || (unsigned char)*s >= 0x7f)
            return false;
    return true;
}

static bool tchar(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static bool token_ok(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!tchar(s[i]))
            return false;
    return n > 0;
}

/* Fills host, port, tls, target and addr from the URL or from addr + target. */
static int fetch_where(struct fetch *f)
{
    const struct cmg_fetch_req *req = f->req;
    char authority[FETCH_ADDR_MAX];
    const char *p, *rest;
    size_t alen, tlen;

    if (req->url) {
        if (!strncasecmp(req->url, "https://", 8)) {
            f->tls = true;
            p = req->url + 8;
        } else if (!strncasecmp(req->url, "http://", 7)) {
            f->tls = false;
            p = req->url + 7;
        } else {
            return fail(f, CMG_FETCH_EINVAL, "URL '%s': not http:// or https://", req->url);
        }
        alen = strcspn(p, "/?#");
        if (memchr(p, '@', alen))
            return fail(f, CMG_FETCH_EINVAL, "URL '%s': user names in URLs are not supported",
                        req->url);
        if (alen >= sizeof(authority))
            return fail(f, CMG_FETCH_EINVAL, "URL '%s': host too long", req->url);
        memcpy(authority, p, alen);
        authority[alen] = 0;
        if (cmg_fetch_split_addr(authority, f->tls ? 443 : 80, f->host, sizeof(f->host),
                                 &f->port) < 0)
            return fail(f, CMG_FETCH_EINVAL, "URL '%s': bad host or port", req->url);
        rest = p + alen;
        tlen = strcspn(rest, "#");
        f->target = malloc(tlen + 2);
        if (!f->target)
            return fail(f, CMG_FETCH_ELOCAL, "out of memory");
        snprintf(f->target, tlen + 2, "%s%.*s", *rest == '/' ? "" : "/", (int)tlen, rest);
    } else {
        if (!req->addr || !req->target)
            return fail(f, CMG_FETCH_EINVAL, "no URL, or no address and target");
        if (cmg_fetch_split_addr(req->addr, 0, f->host, sizeof(f->host), &f->port) < 0)
            return fail(f, CMG_FETCH_EINVAL,
                        "address '%s': not HOST:PORT or [IPv6]:PORT", req->addr);
        f->tls = req->tls;
        f->target = strdup(req->target);
        if (!f->target)
            return fail(f, CMG_FETCH_ELOCAL, "out of memory");
    }
    if (!target_ok(f->target))
        return fail(f, CMG_FETCH_EINVAL,
                    "path '%s': must start with '/' and hold no spaces or control characters",
                    f->target);
    snprintf(f->addr, sizeof(f->addr), strchr(f->host, ':') ? "[%s]:%d" : "%s:%d", f->host,
             f->port);
    f->name = req->server_name && *req->server_name ? req->server_name : f->host;
    f->method = req->method && *req->method ? req->method : "GET";
    if (!token_ok(f->method, strlen(f->method)))
        return fail(f, CMG_FETCH_EINVAL, "method '%s' is not an HTTP token", f->method);
    return CMG_FETCH_OK;
}

/* ---- waiting and connecting ---- */

static long long now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The trace enters stage; returns the time, to measure it. */
static long long trace_stage(struct fetch *f, enum cmg_fetch_stage stage)
{
    if (f->req->trace)
        f->req->trace->stage = stage;
    return now_ms();
}

/* 1 when fd is ready for events, 0 on timeout, -1 on a poll error (errno). */
static int wait_fd(int fd, short events, int timeout_ms)
{
    long long deadline = now_ms() + timeout_ms;
    struct pollfd pfd = {.fd = fd, .events = events};

    for (;;) {
        long long left = deadline - now_ms();
        int r;

        if (left < 0)
            left = 0;
        r = poll(&pfd, 1, (int)left);
        if (r > 0)
            return 1;
        if (r == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* Waits for the connection to be readable (POLLIN) or writable; what names the step. */
static int wait_io(struct fetch *f, short events, const char *what)
{
    int r = wait_fd(f->fd, events, f->timeout_ms);

    if (r > 0)
        return 0;
    if (r == 0)
        return fail(f, CMG_FETCH_ENET, "%s %s: timed out after %g s", what, f->addr,
                    f->timeout_ms / 1000.0);
    return fail(f, CMG_FETCH_ENET, "%s %s: %s", what, f->addr, strerror(errno));
}

/* Connects one address; 0, or an errno value (ETIMEDOUT for our own timeout). */
static int connect_one(const struct addrinfo *ai, int timeout_ms, int *fdp)
{
    int fd, e = 0, r;
    socklen_t elen = sizeof(e);

    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return errno;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
        goto out;
    if (errno != EINPROGRESS) {
        e = errno;
        goto out;
    }
    r = wait_fd(fd, POLLOUT, timeout_ms);
    if (r == 0)
        e = ETIMEDOUT;
    else if (r < 0)
        e = errno;
    else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &elen) < 0)
        e = errno;
out:
    if (e) {
        close(fd);
        return e;
    }
    r = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &r, sizeof(r));
    *fdp = fd;
    return 0;
}

static int net_connect(struct fetch *f)
{
    struct addrinfo hints, *res = NULL, *ai;
    char port[8];
    int rc, e = 0, ret;

    struct cmg_fetch_trace *tr = f->req->trace;
    long long t0 = trace_stage(f, CMG_FETCH_STAGE_RESOLVE);

    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    snprintf(port, sizeof(port), "%d", f->port);
    rc = getaddrinfo(f->host, port, &hints, &res);
    if (tr)
        tr->resolve_ms = now_ms() - t0;
    if (rc != 0)
        return fail(f, CMG_FETCH_ENET, "resolve %s: %s", f->host,
                    rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
    t0 = trace_stage(f, CMG_FETCH_STAGE_CONNECT);
    for (ai = res; ai; ai = ai->ai_next) {
        e = connect_one(ai, f->timeout_ms, &f->fd);
        if (tr)
            getnameinfo(ai->ai_addr, ai->ai_addrlen, tr->address, sizeof(tr->address), NULL,
                        0, NI_NUMERICHOST);
        if (e == 0)
            break;
    }
    if (tr)
        tr->connect_ms = now_ms() - t0;
    if (f->fd >= 0)
        ret = CMG_FETCH_OK;
    else if (e == ETIMEDOUT)
        ret = fail(f, CMG_FETCH_ENET, "connect %s: timed out after %g s", f->addr,
                   f->timeout_ms / 1000.0);
    else
        ret = fail(f, CMG_FETCH_ENET, "connect %s: %s", f->addr, strerror(e ? e : EINVAL));
    freeaddrinfo(res);
    return ret;
}

/* ---- TLS ---- */

/* A file OpenSSL is about to read: can it be opened at all? (OpenSSL's own words for a
 * missing file are obscure.) */
static int readable(struct fetch *f, const char *what, const char *path)
{
    FILE *fp = fopen(path, "r");

    if (fp) {
        fclose(fp);
        return CMG_FETCH_OK;
    }
    return fail(f, CMG_FETCH_ELOCAL, "cannot load the %s %s: %s", what, path, strerror(errno));
}

/* Adds the PEM certificates of pem (at least one) to the context's roots. */
static int load_pem_roots(SSL_CTX *ctx, const char *pem)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    X509 *x;
    int n = 0, rc = -1;

    while (bio && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL))) {
        if (X509_STORE_add_cert(store, x) != 1) {
            X509_free(x);
            goto out;
        }
        X509_free(x);
        n++;
    }
    rc = n > 0 ? 0 : -1;
out:
    ERR_clear_error();
    BIO_free(bio);
    return rc;
}

static int tls_context(struct fetch *f)
{
    const struct cmg_fetch_req *req = f->req;
    char why[512];

    if ((req->ca_file && readable(f, "CA file", req->ca_file) != CMG_FETCH_OK) ||
        (req->cert_file && readable(f, "certificate", req->cert_file) != CMG_FETCH_OK) ||
        (req->key_file && readable(f, "private key", req->key_file) != CMG_FETCH_OK))
        return f->result;

    f->ctx = SSL_CTX_new(TLS_client_method());
    if (!f->ctx || !SSL_CTX_set_min_proto_version(f->ctx, TLS1_2_VERSION)) {
        ssl_reasons(why, sizeof(why));
        return fail(f, CMG_FETCH_ELOCAL, "TLS: %s", why);
    }
    /* A close without close_notify ends the stream; llhttp judges whether the response
     * was complete. */
    SSL_CTX_set_options(f->ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    if (req->ca_pem && !req->ca_file) {
        if (load_pem_roots(f->ctx, req->ca_pem) < 0)
            return fail(f, CMG_FETCH_ELOCAL, "the CA certificates given hold no PEM "
                                              "certificate");
    } else if (req->ca_file ? SSL_CTX_load_verify_locations(f->ctx, req->ca_file, NULL) != 1
                            : SSL_CTX_set_default_verify_paths(f->ctx) != 1) {
        ssl_reasons(why, sizeof(why));
        return fail(f, CMG_FETCH_ELOCAL, "cannot load the CA file %s: %s",
                    req->ca_file ? req->ca_file : "(system default)", why);
    }
    SSL_CTX_set_verify(f->ctx, req->no_verify ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, NULL);
    if (req->cert_file) {
        const char *key = req->key_file ? req->key_file : req->cert_file;

        if (SSL_CTX_use_certificate_chain_file(f->ctx, req->cert_file) != 1) {
            ssl_reasons(why, sizeof(why));
            return fail(f, CMG_FETCH_ELOCAL, "cannot load the certificate %s: %s",
                        req->cert_file, why);
        }
        if (SSL_CTX_use_PrivateKey_file(f->ctx, key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(f->ctx) != 1) {
            ssl_reasons(why, sizeof(why));
            return fail(f, CMG_FETCH_ELOCAL, "cannot load the private key %s: %s", key, why);
        }
    } else if (req->cert && req->key) {
        if (SSL_CTX_use_certificate(f->ctx, req->cert) != 1 ||
            SSL_CTX_use_PrivateKey(f->ctx, req->key) != 1 ||
            SSL_CTX_check_private_key(f->ctx) != 1) {
            ssl_reasons(why, sizeof(why));
            return fail(f, CMG_FETCH_ELOCAL, "cannot use the client certificate: %s", why);
        }
    }
    return CMG_FETCH_OK;
}

static int tls_handshake(struct fetch *f);

static int tls_handshake_error(struct fetch *f, int ret)
{
    long v = SSL_get_verify_result(f->ssl);
    int e = SSL_get_error(f->ssl, ret);
    char why[512];

    if (v != X509_V_OK) {
        bool name = v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH;

        ERR_clear_error();
        return fail(f, CMG_FETCH_ENET, "TLS handshake with %s: certificate verify failed: %s%s%s%s",
                    f->addr, X509_verify_cert_error_string(v), name ? " (expected '" : "",
                    name ? f->name : "", name ? "')" : "");
    }
    ssl_reasons(why, sizeof(why));
    if (why[0])
        return fail(f, CMG_FETCH_ENET, "TLS handshake with %s: %s%s", f->addr, why,
                    strstr(why, "wrong version number") ? " (is it a TLS port?)" : "");
    if (e == SSL_ERROR_SYSCALL && errno)
        return fail(f, CMG_FETCH_ENET, "TLS handshake with %s: %s", f->addr, strerror(errno));
    return fail(f, CMG_FETCH_ENET, "TLS handshake with %s: connection closed by the server",
                f->addr);
}

/* What the handshake settled, for the trace. */
static void trace_tls(struct fetch *f)
{
    struct cmg_fetch_trace *tr = f->req->trace;
    const unsigned char *alpn = NULL;
    unsigned int alpn_len = 0;
    X509 *peer;

    if (!tr)
        return;
    tr->verify_result = SSL_get_verify_result(f->ssl);
    snprintf(tr->tls_version, sizeof(tr->tls_version), "%s", SSL_get_version(f->ssl));
    SSL_get0_alpn_selected(f->ssl, &alpn, &alpn_len);
    snprintf(tr->alpn, sizeof(tr->alpn), "%.*s", (int)alpn_len, alpn ? (const char *)alpn : "");
    peer = SSL_get0_peer_certificate(f->ssl);
    if (peer) {
        struct tm tm;

        X509_NAME_oneline(X509_get_subject_name(peer), tr->peer_subject,
                          (int)sizeof(tr->peer_subject));
        if (ASN1_TIME_to_tm(X509_get0_notAfter(peer), &tm) == 1)
            tr->peer_not_after = (long long)timegm(&tm);
    }
}

/* ALPN wants the protocol as <length><name>. */
static int offer_alpn(struct fetch *f)
{
    unsigned char wire[64];
    size_t n = f->req->alpn ? strlen(f->req->alpn) : 0;

    if (n == 0)
        return 0;
    if (n >= sizeof(wire))
        return -1;
    wire[0] = (unsigned char)n;
    memcpy(wire + 1, f->req->alpn, n);
    return SSL_set_alpn_protos(f->ssl, wire, (unsigned int)n + 1) == 0 ? 0 : -1;
}

static int tls_connect(struct fetch *f)
{
    long long t0 = trace_stage(f, CMG_FETCH_STAGE_TLS);
    int ret = tls_handshake(f);

    if (f->req->trace) {
        f->req->trace->tls_ms = now_ms() - t0;
        if (f->ssl)
            trace_tls(f);
    }
    return ret;
}

static int tls_handshake(struct fetch *f)
{
    X509_VERIFY_PARAM *param;
    int r;

    f->ssl = SSL_new(f->ctx);
    if (!f->ssl || SSL_set_fd(f->ssl, f->fd) != 1 || offer_alpn(f) < 0)
        goto openssl_error;
    param = SSL_get0_param(f->ssl);
    if (f->req->verify_time > 0)
        X509_VERIFY_PARAM_set_time(param, (time_t)f->req->verify_time);
    if (is_ip_literal(f->name)) {
        if (X509_VERIFY_PARAM_set1_ip_asc(param, f->name) != 1)
            goto openssl_error;
    } else if (SSL_set_tlsext_host_name(f->ssl, f->name) != 1 ||
               SSL_set1_host(f->ssl, f->name) != 1) {
        goto openssl_error;
    }
    for (;;) {
        ERR_clear_error();
        errno = 0;
        r = SSL_connect(f->ssl);
        if (r == 1)
            return CMG_FETCH_OK;
        switch (SSL_get_error(f->ssl, r)) {
        case SSL_ERROR_WANT_READ:
            if (wait_io(f, POLLIN, "TLS handshake with") != CMG_FETCH_OK)
                return f->result;
            break;
        case SSL_ERROR_WANT_WRITE:
            if (wait_io(f, POLLOUT, "TLS handshake with") != CMG_FETCH_OK)
                return f->result;
            break;
        default:
            return tls_handshake_error(f, r);
        }
    }
openssl_error: {
        char why[512];

        ssl_reasons(why, sizeof(why));
        return fail(f, CMG_FETCH_ELOCAL, "TLS: %s (name '%s')", why, f->name);
    }
}

/* ---- I/O ---- */

/* The error of a failed SSL_read or SSL_write; 0 if it was the end of the stream. */
static int tls_io_error(struct fetch *f, int r, const char *what)
{
    int e = SSL_get_error(f->ssl, r);
    char why[512];

    if (e == SSL_ERROR_ZERO_RETURN)
        return 0;
    ssl_reasons(why, sizeof(why));
    if (why[0])
        return fail(f, CMG_FETCH_ENET, "%s %s: TLS: %s", what, f->addr, why);
    if (e == SSL_ERROR_SYSCALL && errno)
        return fail(f, CMG_FETCH_ENET, "%s %s: %s", what, f->addr, strerror(errno));
    if (e == SSL_ERROR_SYSCALL)
        return 0;
    return fail(f, CMG_FETCH_ENET, "%s %s: TLS error %d", what, f->addr, e);
}

/* A failed SSL_write. With TLS 1.3 a server judges the client certificate after the
 * handshake, so its refusal (an alert, then a close) may make our first write fail: the
 * alert, if it can still be read, says more than "Broken pipe". */
static int tls_write_error(struct fetch *f, int w)
{
    int e = SSL_get_error(f->ssl, w), saved = errno, r;
    char why[512], buf[256];

    if (e == SSL_ERROR_SYSCALL && !ERR_peek_error()) {
        if (wait_fd(f->fd, POLLIN, 1000) > 0) {
            ERR_clear_error();
            r = SSL_read(f->ssl, buf, sizeof(buf));
            if (r <= 0 && SSL_get_error(f->ssl, r) == SSL_ERROR_SSL) {
                ssl_reasons(why, sizeof(why));
                if (why[0])
                    return fail(f, CMG_FETCH_ENET, "write to %s: TLS: %s", f->addr, why);
            }
        }
        ERR_clear_error();
        if (saved)
            return fail(f, CMG_FETCH_ENET, "write to %s: %s%s", f->addr, strerror(saved),
                        f->req->cert || f->req->cert_file
                            ? " (did the server refuse the client certificate?)" : "");
        return fail(f, CMG_FETCH_ENET, "write to %s: connection closed", f->addr);
    }
    if (tls_io_error(f, w, "write to") == 0)
        return fail(f, CMG_FETCH_ENET, "write to %s: connection closed", f->addr);
    return f->result;
}

/* >0: bytes read; 0: end of stream; <0: an error (recorded). */
static long conn_read(struct fetch *f, char *buf, size_t cap)
{
    for (;;) {
        if (!f->ssl) {
            ssize_t n = recv(f->fd, buf, cap, 0);

            if (n >= 0)
                return (long)n;
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return fail(f, CMG_FETCH_ENET, "read from %s: %s", f->addr, strerror(errno));
            if (wait_io(f, POLLIN, "read from") != CMG_FETCH_OK)
                return f->result;
            continue;
        }
        ERR_clear_error();
        errno = 0;
        int n = SSL_read(f->ssl, buf, cap > INT_MAX ? INT_MAX : (int)cap);

        if (n > 0)
            return n;
        switch (SSL_get_error(f->ssl, n)) {
        case SSL_ERROR_WANT_READ:
            if (wait_io(f, POLLIN, "read from") != CMG_FETCH_OK)
                return f->result;
            break;
        case SSL_ERROR_WANT_WRITE:
            if (wait_io(f, POLLOUT, "read from") != CMG_FETCH_OK)
                return f->result;
            break;
        default:
            return tls_io_error(f, n, "read from");
        }
    }
}

static int conn_write(struct fetch *f, const char *p, size_t n)
{
    while (n > 0) {
        size_t done;

        if (!f->ssl) {
            ssize_t w = send(f->fd, p, n, MSG_NOSIGNAL);

            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
                return fail(f, CMG_FETCH_ENET, "write to %s: %s", f->addr, strerror(errno));
            if (w < 0) {
                if (wait_io(f, POLLOUT, "write to") != CMG_FETCH_OK)
                    return f->result;
                continue;
            }
            done = (size_t)w;
        } else {
            int w;

            ERR_clear_error();
            errno = 0;
            w = SSL_write(f->ssl, p, n > INT_MAX ? INT_MAX : (int)n);
            if (w <= 0) {
                int e = SSL_get_error(f->ssl, w);

                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                    if (wait_io(f, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, "write to") !=
                        CMG_FETCH_OK)
                        return f->result;
                    continue;
                }
                return tls_write_error(f, w);
            }
            done = (size_t)w;
        }
        p += done;
        n -= done;
    }
    return CMG_FETCH_OK;
}

/* ---- the request ---- */

/* Extra header lines: "Name: value", no CR, LF or NUL; none of those we set ourselves. */
static int check_header(struct fetch *f, const char *h, bool *has_ua)
{
    static const char *const ours[] = {"host", "content-length", "transfer-encoding",
                                       "connection"};
    const char *colon = strchr(h, ':');
    size_t n = colon ? (size_t)(colon - h) : 0;

    if (!colon || !token_ok(h, n) || strpbrk(h, "\r\n"))
        return fail(f, CMG_FETCH_EINVAL, "header '%s': not 'Name: value'", h);
    for (size_t i = 0; i < sizeof(ours) / sizeof(ours[0]); i++)
        if (strlen(ours[i]) == n && !strncasecmp(h, ours[i], n))
            return fail(f, CMG_FETCH_EINVAL, "header '%.*s' is set by the client itself",
                        (int)n, h);
    if (n == 10 && !strncasecmp(h, "user-agent", n))
        *has_ua = true;
    return CMG_FETCH_OK;
}

static int send_request(struct fetch *f)
{
    const struct cmg_fetch_req *req = f->req;
    struct cmg_buf b = {0};
    bool has_ua = false, v6 = strchr(f->name, ':') != NULL;
    int ret = CMG_FETCH_OK, oom = 0;

    for (size_t i = 0; i < req->n_headers; i++)
        if (check_header(f, req->headers[i], &has_ua) != CMG_FETCH_OK)
            goto out;
    oom |= cmg_buf_printf(&b, "%s %s HTTP/1.1\r\nHost: %s%s%s", f->method, f->target,
                          v6 ? "[" : "", f->name, v6 ? "]" : "");
    if (f->port != (f->tls ? 443 : 80))
        oom |= cmg_buf_printf(&b, ":%d", f->port);
    oom |= cmg_buf_appends(&b, "\r\nConnection: close\r\n");
    if (!has_ua)
        oom |= cmg_buf_appends(&b, "User-Agent: cmg/" CMG_VERSION "\r\n");
    if (req->body)
        oom |= cmg_buf_printf(&b, "Content-Length: %zu\r\n", req->body_len);
    for (size_t i = 0; i < req->n_headers; i++)
        oom |= cmg_buf_printf(&b, "%s\r\n", req->headers[i]);
    oom |= cmg_buf_appends(&b, "\r\n");
    /* A small body goes with the head, in one write. */
    if (req->body && req->body_len <= FETCH_READ_CHUNK)
        oom |= cmg_buf_append(&b, req->body, req->body_len);
    if (oom) {
        fail(f, CMG_FETCH_ELOCAL, "out of memory");
        goto out;
    }
    if (conn_write(f, cmg_buf_head(&b), b.len) != CMG_FETCH_OK)
        goto out;
    if (req->body && req->body_len > FETCH_READ_CHUNK)
        conn_write(f, req->body, req->body_len);
out:
    ret = f->result;
    /* It may hold a bearer token. */
    if (b.data)
        OPENSSL_cleanse(b.data, b.cap);
    cmg_buf_free(&b);
    return ret;
}

/* ---- the response ---- */

static struct fetch *fetch_of(llhttp_t *p) { return p->data; }

/* A callback's failure to collect the head, said once; -1 for llhttp. */
static int head_failed(struct fetch *f)
{
    if (f->head.error == CMG_H1_HEAD_NO_MEMORY)
        fail(f, CMG_FETCH_ELOCAL, "out of memory");
    else if (f->head.error == CMG_H1_HEAD_TOO_LARGE && f->fields.n >= CMG_FETCH_MAX_HEADERS)
        fail(f, CMG_FETCH_ETOOBIG, "%s: more than %d response headers", f->addr,
             CMG_FETCH_MAX_HEADERS);
    else if (f->head.error == CMG_H1_HEAD_TOO_LARGE)
        fail(f, CMG_FETCH_ETOOBIG, "%s: response head longer than %d bytes", f->addr,
             CMG_FETCH_MAX_HEAD);
    else
        fail(f, CMG_FETCH_ENET, "%s: malformed response: %s", f->addr,
             cmg_h1_head_error_text(&f->head));
    return -1;
}

static int on_message_begin(llhttp_t *p)
{
    struct fetch *f = fetch_of(p);

    cmg_h1_head_begin(&f->head);
    cmg_buf_reset(&f->reason);
    free(f->resp->content_type);
    f->resp->content_type = NULL;
    return 0;
}

static int on_status(llhttp_t *p, const char *at, size_t n)
{
    struct fetch *f = fetch_of(p);

    if (cmg_h1_head_count(&f->head, n) < 0)
        return head_failed(f);
    if (cmg_buf_append(&f->reason, at, n) < 0) {
        fail(f, CMG_FETCH_ELOCAL, "out of memory");
        return -1;
    }
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    return cmg_h1_head_field(&fetch_of(p)->head, at, n) < 0 ? head_failed(fetch_of(p)) : 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    return cmg_h1_head_field_done(&fetch_of(p)->head) < 0 ? head_failed(fetch_of(p)) : 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    return cmg_h1_head_value(&fetch_of(p)->head, at, n) < 0 ? head_failed(fetch_of(p)) : 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    return cmg_h1_head_value_done(&fetch_of(p)->head) < 0 ? head_failed(fetch_of(p)) : 0;
}

/* The head as text (status line, fields, blank line), and its Content-Type. */
static int head_text(struct fetch *f, llhttp_t *p, struct cmg_buf *head)
{
    const struct cmg_headers *h = &f->fields;
    int ct = cmg_headers_find(h, "content-type");
    int rc = cmg_buf_printf(head, "HTTP/%u.%u %u %.*s\r\n", p->http_major, p->http_minor,
                            p->status_code, (int)f->reason.len,
                            f->reason.len ? cmg_buf_head(&f->reason) : "");

    for (uint32_t i = 0; i < h->n && rc >= 0; i++)
        rc = cmg_buf_printf(head, "%.*s: %.*s\r\n", (int)h->v[i].name_len, cmg_headers_name(h, i),
                            (int)h->v[i].value_len, cmg_headers_value(h, i));
    if (rc >= 0)
        rc = cmg_buf_printf(head, "\r\n");
    if (rc >= 0 && ct >= 0 &&
        !(f->resp->content_type = strndup(cmg_headers_value(h, (uint32_t)ct), h->v[ct].value_len)))
        rc = -1;
    return rc < 0 ? -1 : 0;
}

static int on_headers_complete(llhttp_t *p)
{
    struct fetch *f = fetch_of(p);
    struct cmg_fetch_resp *resp = f->resp;
    struct cmg_buf head = {0};
    char why[256] = "";

    resp->status = p->status_code;
    if (p->status_code >= 100 && p->status_code < 200 && p->status_code != 101) {
        f->informational = true;
        return 0;
    }
    if (head_text(f, p, &head) < 0) {
        cmg_buf_free(&head);
        fail(f, CMG_FETCH_ELOCAL, "out of memory");
        return -1;
    }
    free(resp->head);
    resp->head = head.data; /* off is 0 in a fresh buffer, and it is NUL-terminated */
    resp->content_length = (p->flags & F_CONTENT_LENGTH) ? (int64_t)p->content_length : -1;
    f->out = f->req->out;
    if (f->req->on_head && f->req->on_head(f->req->arg, resp, &f->out, why, sizeof(why)) < 0) {
        fail(f, CMG_FETCH_ELOCAL, "%s", why[0] ? why : "request abandoned");
        return -1;
    }
    /* No body, whatever the headers say: a response to HEAD, 204, 304 (RFC 9110 §6.4.1). */
    if (!strcasecmp(f->method, "HEAD") || p->status_code == 204 || p->status_code == 304)
        return 1;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct fetch *f = fetch_of(p);
    struct cmg_fetch_resp *resp = f->resp;
    size_t room;

    resp->body_bytes += n;
    if (f->out) {
        if (fwrite(at, 1, n, f->out) != n) {
            fail(f, CMG_FETCH_ELOCAL, "cannot write the response body: %s", strerror(errno));
            return -1;
        }
        return 0;
    }
    room = f->max_body - resp->body_len;
    if (n > room) {
        if (!f->req->truncate_body) {
            fail(f, CMG_FETCH_ETOOBIG, "%s: response body larger than %zu bytes", f->addr,
                 f->max_body);
            return -1;
        }
        resp->truncated = true;
        n = room;
    }
    if (n == 0)
        return 0;
    if (resp->body_len + n + 1 > f->body_cap) {
        size_t cap = f->body_cap ? f->body_cap : 4096;
        char *b;

        while (cap < resp->body_len + n + 1)
            cap *= 2;
        if (cap > f->max_body + 1)
            cap = f->max_body + 1;
        b = realloc(resp->body, cap);
        if (!b) {
            fail(f, CMG_FETCH_ELOCAL, "out of memory");
            return -1;
        }
        resp->body = b;
        f->body_cap = cap;
    }
    memcpy(resp->body + resp->body_len, at, n);
    resp->body_len += n;
    resp->body[resp->body_len] = 0;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    struct fetch *f = fetch_of(p);

    if (f->informational) {
        f->informational = false;
        return 0;
    }
    f->done = true;
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_message_begin = on_message_begin,
    .on_status = on_status,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

static int read_response(struct fetch *f)
{
    char buf[FETCH_READ_CHUNK];
    bool got = false;
    llhttp_errno_t e;
    long n;

    llhttp_init(&f->parser, HTTP_RESPONSE, &settings);
    f->parser.data = f;
    cmg_h1_head_init(&f->head, &f->fields, CMG_FETCH_MAX_HEAD, CMG_FETCH_MAX_HEADERS);
    while (!f->done) {
        n = conn_read(f, buf, sizeof(buf));
        if (n < 0)
            return f->result;
        if (n == 0) {
            e = llhttp_finish(&f->parser);
            if (f->result != CMG_FETCH_OK)
                return f->result;
            if ((e == HPE_OK || e == HPE_PAUSED) && f->done)
                break;
            return fail(f, CMG_FETCH_ENET, "read from %s: connection closed %s", f->addr,
                        got ? "before the end of the response" : "without a response");
        }
        got = true;
        e = llhttp_execute(&f->parser, buf, (size_t)n);
        if (f->result != CMG_FETCH_OK)
            return f->result;
        if (e == HPE_PAUSED && f->done)
            break;
        if (e != HPE_OK)
            return fail(f, CMG_FETCH_ENET, "%s: malformed response: %s", f->addr,
                        llhttp_get_error_reason(&f->parser));
    }
    if (f->out && fflush(f->out) != 0)
        return fail(f, CMG_FETCH_ELOCAL, "cannot write the response body: %s", strerror(errno));
    return CMG_FETCH_OK;
}

/* ---- the whole exchange ---- */

static void fetch_init(struct fetch *f, const struct cmg_fetch_req *req,
                       struct cmg_fetch_resp *resp, char *err, size_t errlen,
                       struct sigaction *old)
{
    struct sigaction ign;

    memset(f, 0, sizeof(*f));
    memset(resp, 0, sizeof(*resp));
    resp->content_length = -1;
    if (errlen)
        err[0] = 0;
    f->req = req;
    f->resp = resp;
    f->err = err;
    f->errlen = errlen;
    f->fd = -1;
    f->timeout_ms = req->timeout_ms > 0 ? req->timeout_ms : CMG_FETCH_TIMEOUT_MS;
    f->max_body = req->max_body ? req->max_body : CMG_FETCH_MAX_BODY;
    if (req->trace) {
        memset(req->trace, 0, sizeof(*req->trace));
        req->trace->verify_result = X509_V_OK;
    }

    /* OpenSSL writes with write(): a peer that is gone must be an error, not a signal. */
    memset(&ign, 0, sizeof(ign));
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(SIGPIPE, &ign, old);
}

/* Local files (CA, certificate, key) are judged before the network. */
static int fetch_connect(struct fetch *f)
{
    if (fetch_where(f) == CMG_FETCH_OK && (!f->tls || tls_context(f) == CMG_FETCH_OK) &&
        net_connect(f) == CMG_FETCH_OK && (!f->tls || tls_connect(f) == CMG_FETCH_OK))
        trace_stage(f, CMG_FETCH_STAGE_EXCHANGE);
    return f->result;
}

static int fetch_end(struct fetch *f, const struct sigaction *old)
{
    if (f->ssl) {
        if (f->result == CMG_FETCH_OK)
            SSL_shutdown(f->ssl); /* one close_notify, not waiting for the peer's */
        SSL_free(f->ssl);
    }
    SSL_CTX_free(f->ctx);
    if (f->fd >= 0)
        close(f->fd);
    cmg_headers_free(&f->fields);
    cmg_buf_free(&f->reason);
    free(f->target);
    ERR_clear_error();
    sigaction(SIGPIPE, old, NULL);
    return f->result;
}

int cmg_fetch(const struct cmg_fetch_req *req, struct cmg_fetch_resp *resp, char *err,
              size_t errlen)
{
    struct fetch f;
    struct sigaction old;

    fetch_init(&f, req, resp, err, errlen, &old);
    if (fetch_connect(&f) == CMG_FETCH_OK) {
        long long t0 = now_ms();

        if (send_request(&f) == CMG_FETCH_OK && read_response(&f) == CMG_FETCH_OK)
            trace_stage(&f, CMG_FETCH_STAGE_DONE);
        if (req->trace)
            req->trace->exchange_ms = now_ms() - t0;
    }
    return fetch_end(&f, &old);
}

int cmg_fetch_greeting(const struct cmg_fetch_req *req, char *buf, size_t want, size_t *got,
                       char *err, size_t errlen)
{
    struct cmg_fetch_resp resp;
    struct fetch f;
    struct sigaction old;

    *got = 0;
    fetch_init(&f, req, &resp, err, errlen, &old);
    if (fetch_connect(&f) == CMG_FETCH_OK) {
        long long t0 = now_ms();

        while (*got < want) {
            long n = conn_read(&f, buf + *got, want - *got);

            if (n < 0)
                break;
            if (n == 0) {
                fail(&f, CMG_FETCH_ENET, "read from %s: connection closed after %zu byte(s)",
                     f.addr, *got);
                break;
            }
            *got += (size_t)n;
        }
        if (f.result == CMG_FETCH_OK)
            trace_stage(&f, CMG_FETCH_STAGE_DONE);
        if (req->trace)
            req->trace->exchange_ms = now_ms() - t0;
    }
    fetch_end(&f, &old);
    cmg_fetch_resp_free(&resp);
    return f.result;
}

void cmg_fetch_resp_free(struct cmg_fetch_resp *resp)
{
    free(resp->head);
    free(resp->content_type);
    free(resp->body);
    memset(resp, 0, sizeof(*resp));
    resp->content_length = -1;
}

int cmg_fetch_url(const char *url, const char *ca_file, size_t max, char **body, size_t *len,
                  int *status, char *err, size_t errlen)
{
    struct cmg_fetch_req req;
    struct cmg_fetch_resp resp;
    int ret = -1;

    memset(&req, 0, sizeof(req));
    req.url = url;
    req.ca_file = ca_file;
    req.max_body = max ? max : CMG_FETCH_MAX_BODY;
    *body = NULL;
    *len = 0;
    *status = 0;
    if (cmg_fetch(&req, &resp, err, errlen) != CMG_FETCH_OK)
        goto out;
    *body = resp.body ? resp.body : strdup("");
    if (!*body) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    resp.body = NULL;
    *len = resp.body_len;
    *status = resp.status;
    ret = 0;
out:
    cmg_fetch_resp_free(&resp);
    return ret;
}
