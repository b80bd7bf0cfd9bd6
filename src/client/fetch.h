/* A small blocking HTTP/1.1 client over TCP or TLS, for command-line tools (cmg client,
 * cmg site fetching a JWKS): one request per connection ("Connection: close"), every wait
 * bounded by a timeout, everything read from the network bounded.
 *
 * TLS: the server certificate is verified against ca_file (or the system's roots), and
 * its name against server_name (or the host): SNI and a hostname (or IP address) check.
 * SIGPIPE is ignored while cmg_fetch runs (the previous disposition is restored). */
#ifndef CMG_CLIENT_FETCH_H
#define CMG_CLIENT_FETCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

#define CMG_FETCH_TIMEOUT_MS 30000        /* default for connect, handshake, each read/write */
#define CMG_FETCH_MAX_BODY (1024 * 1024)  /* default limit of a body collected into memory */
#define CMG_FETCH_MAX_HEAD (64 * 1024)    /* response status line and headers */
#define CMG_FETCH_MAX_HEADERS 100

/* What cmg_fetch returns. The message in err says more. */
enum cmg_fetch_result {
    CMG_FETCH_OK = 0,        /* a complete response arrived (whatever its status) */
    CMG_FETCH_EINVAL = -1,   /* bad URL, address, method, header or request */
    CMG_FETCH_ELOCAL = -2,   /* a local problem: CA, certificate or key file, memory, output */
    CMG_FETCH_ENET = -3,     /* resolving, connecting, TLS, a timeout, a broken or malformed
                                response */
    CMG_FETCH_ETOOBIG = -4,  /* response head or collected body over its limit */
};

struct cmg_fetch_resp;

/* How far a request got: the stage it failed in, when it failed. */
enum cmg_fetch_stage {
    CMG_FETCH_STAGE_SETUP,     /* URL, files, TLS context */
    CMG_FETCH_STAGE_RESOLVE,
    CMG_FETCH_STAGE_CONNECT,
    CMG_FETCH_STAGE_TLS,
    CMG_FETCH_STAGE_EXCHANGE,  /* request sent, response read */
    CMG_FETCH_STAGE_DONE,
};

/* What the connection was like, step by step (for `cmg client analyze`). */
struct cmg_fetch_trace {
    enum cmg_fetch_stage stage;
    long long resolve_ms, connect_ms, tls_ms, exchange_ms;
    char address[64];          /* the address connected to, numeric */
    char tls_version[16];      /* "TLSv1.3" */
    char alpn[32];             /* the protocol the server chose; "" if none */
    long verify_result;        /* X509_V_OK or the error verifying the server */
    char peer_subject[256];    /* the server certificate's subject ... */
    long long peer_not_after;  /* ... and its end, unix seconds (0: unknown) */
};

struct cmg_fetch_req {
    /* Where: a URL ("http://host[:port]/target", "https://[::1]:8443/x?y"), or, with url
     * NULL, addr ("host:port", "[v6]:port") + target ("/...") + tls. */
    const char *url;
    const char *addr;
    const char *target;
    bool tls;
    const char *method;       /* NULL: "GET" */
    const char *server_name;  /* TLS name to expect (SNI and certificate check) and the
                                 Host header; NULL: the host of the URL or address */
    const char *ca_file;      /* roots for the server certificate; NULL: ca_pem, else the
                                 system defaults */
    const char *ca_pem;       /* the roots as PEM text, when ca_file is NULL */
    /* Optional client certificate: PEM files (cert_file may hold the chain; key_file NULL:
     * the key is in cert_file), or an in-memory pair (not taken over). */
    const char *cert_file, *key_file;
    EVP_PKEY *key;
    X509 *cert;
    const char *const *headers; /* extra "Name: value" lines (no CR/LF), e.g. Authorization */
    size_t n_headers;
    const void *body;         /* request body; when not NULL, sent with Content-Length */
    size_t body_len;
    int timeout_ms;           /* each of connect, handshake, read, write; 0: the default */
    /* Where the response body goes. on_head, if set, is called once the head of the final
     * response is in, and may set *out; else out is used. A body with no FILE to go to is
     * collected into resp->body, at most max_body bytes (0: CMG_FETCH_MAX_BODY): more is an
     * error, or with truncate_body, cut off (resp->truncated). on_head returns 0, or -1 with
     * a message in err to abandon the request (CMG_FETCH_ELOCAL). */
    FILE *out;
    int (*on_head)(void *arg, const struct cmg_fetch_resp *resp, FILE **out, char *err,
                   size_t errlen);
    void *arg;
    size_t max_body;
    bool truncate_body;
    const char *alpn;         /* a protocol to offer in ALPN ("http/1.1"); NULL: none */
    /* For the analyser only: the server certificate judged at this time (unix seconds)
     * rather than now, when this machine's clock is known to be off; or not verified at
     * all (no_verify: send nothing secret on such a connection). */
    long long verify_time;
    bool no_verify;
    struct cmg_fetch_trace *trace;   /* filled if not NULL */
};

struct cmg_fetch_resp {
    int status;
    char *head;              /* the status line and header lines as received, each ending
                                in CRLF, then an empty line */
    char *content_type;      /* NULL if absent */
    int64_t content_length;  /* -1 if absent */
    char *body;              /* a collected body, NUL-terminated; NULL if streamed or none */
    size_t body_len;
    bool truncated;
    uint64_t body_bytes;     /* body bytes received, streamed or collected */
};

/* Sends the request and reads the response. Returns CMG_FETCH_OK or a negative
 * enum cmg_fetch_result with a one-line message in err (e.g. "connect 127.0.0.1:8443:
 * Connection refused"). resp is filled as far as it got; free it with
 * cmg_fetch_resp_free in every case. */
int cmg_fetch(const struct cmg_fetch_req *req, struct cmg_fetch_resp *resp, char *err,
              size_t errlen);
void cmg_fetch_resp_free(struct cmg_fetch_resp *resp);

/* Connects as cmg_fetch does (addr, tls, TLS names, CA, client certificate, ALPN, trace),
 * sends nothing and reads what the server says first, until `want` bytes are in buf: for
 * a protocol whose server speaks first (the gateway's tunnel, HTTP/2 from the gateway's
 * side). CMG_FETCH_OK with *got == want, or an error as cmg_fetch's. */
int cmg_fetch_greeting(const struct cmg_fetch_req *req, char *buf, size_t want, size_t *got,
                       char *err, size_t errlen);

/* GET url, collecting at most max bytes of body (more is an error). On 0, *status is the
 * response status and *body a NUL-terminated copy (the caller frees it) of *len bytes,
 * whatever the status. ca_file NULL: system roots. -1 with a message in err otherwise. */
int cmg_fetch_url(const char *url, const char *ca_file, size_t max, char **body, size_t *len,
                  int *status, char *err, size_t errlen);

/* Splits "host:port" or "[v6]:port" (port required unless default_port > 0). host gets
 * the name without brackets. 0 or -1. */
int cmg_fetch_split_addr(const char *addr, int default_port, char *host, size_t hostcap,
                         int *port);

#endif
