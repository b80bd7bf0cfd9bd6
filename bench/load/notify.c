/* cmg-load --notify: holds N Server-Sent-Events channels (GET with Accept:
 * text/event-stream, HTTP/1.1 over TLS, one client certificate per channel) in
 * one process and one epoll loop, and stamps every event's arrival with
 * CLOCK_REALTIME, one clock for every process of the machine, so that a driver
 * can time a broadcast from its own call to the last delivery across several
 * load processes.
 *
 * A channel that ends is counted as lost and never dialled again on its own:
 * what a round delivers is what the server delivered. The driver steers it by
 * lines on stdin and reads one JSON line on stdout per answer:
 *   dump FILE   writes what arrived since the last dump (per event key: count,
 *               first, last and every arrival time, ns) and starts afresh
 *   mark        every open channel remembers the last event id it saw
 *   replay M    M open channels with a mark are closed and dialled again with
 *               Last-Event-ID: <mark>; 'replay-stats' says what they got since
 *   stats       channels up, lost, events, CPU
 *   quit        (or the end of stdin) closes everything and reports */
#include "load.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_BYTES 200      /* SSE and header lines are kept up to this; the rest is skipped */
#define ID_MAX 72               /* event ids kept per channel (ours are 16 + 1 + 20) */
#define KEY_MAX 96
#define MAX_EVENTS 1024
#define NS 1000000000ull

enum chan_state { CH_IDLE, CH_CONNECTING, CH_HANDSHAKE, CH_REQUEST, CH_HEAD, CH_OPEN, CH_GONE };
enum body_state { B_CHUNK_SIZE, B_CHUNK_DATA, B_CHUNK_CRLF, B_PLAIN };

struct chan {
    int fd;
    SSL *ssl;
    X509 *cert;
    EVP_PKEY *key;              /* NULL: the shared key */
    uint8_t state, body, field; /* field: 1 inside a chunk extension */
    bool rd, wr, replaying, chunked, has_event;
    uint16_t req_sent, line_len;
    uint32_t chunk_left;
    uint32_t replay_events;
    uint64_t dialled_ns;
    char line[LINE_MAX_BYTES];
    char last_id[ID_MAX];       /* the SSE last event id */
    char mark[ID_MAX];
    char data[KEY_MAX];         /* the first data line of the event being read */
};

struct record {                 /* the arrivals of one event key */
    char *key;
    uint32_t count, cap;
    uint64_t *times;
};

struct notify {
    const struct load_opts *o;
    struct chan *ch;
    unsigned n;
    int ep;
    SSL_CTX *ctx;
    EVP_PKEY *shared_key;
    char req[4096];
    size_t req_len;
    /* dialling */
    unsigned next_dial, in_flight, up, failed, lost, replay_n, replay_next;
    uint64_t t_start, t_up, dial_due_ns;
    bool told_up;
    /* what arrived */
    struct record *recs;
    size_t nrecs, rcap;
    uint64_t events, events_total;
    /* the driver */
    char cmd[4096];
    size_t cmd_len;
    bool quit;
    char first_error[200];
};

static uint64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static void note_error(struct notify *nt, const char *what, unsigned long tls_err)
{
    char detail[160] = "";
    if (nt->first_error[0])
        return;
    if (tls_err)
        ERR_error_string_n(tls_err, detail, sizeof(detail));
    snprintf(nt->first_error, sizeof(nt->first_error), "%s%s%s", what, detail[0] ? ": " : "",
             detail);
}

/* ------------------------------------------------------------ certificates */

static int add_ext(X509 *cert, X509V3_CTX *ctx, int nid, const char *value)
{
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, ctx, nid, value);
    int ok = ext && X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
    return ok ? 0 : -1;
}

/* A device certificate for CN bench-device-<number>, signed by the CA, valid from
 * an hour ago (clocks of test machines drift) for 30 days. */
static X509 *mint(X509 *ca, EVP_PKEY *ca_key, EVP_PKEY *key, unsigned long number)
{
    X509 *cert = X509_new();
    X509_NAME *name = X509_NAME_new();
    X509V3_CTX ctx;
    unsigned char serial[16];
    BIGNUM *bn = NULL;
    char cn[64];
    bool ok = false;

    snprintf(cn, sizeof(cn), "bench-device-%lu", number);
    if (!cert || !name || RAND_bytes(serial, sizeof(serial)) != 1)
        goto out;
    serial[0] &= 0x7f;
    if (!(bn = BN_bin2bn(serial, sizeof(serial), NULL)) ||
        !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert)) ||
        !X509_set_version(cert, X509_VERSION_3) ||
        !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (unsigned char *)cn, -1, -1, 0) ||
        !X509_set_subject_name(cert, name) || !X509_set_issuer_name(cert, X509_get_subject_name(ca)) ||
        !X509_gmtime_adj(X509_getm_notBefore(cert), -3600) ||
        !X509_gmtime_adj(X509_getm_notAfter(cert), 30L * 86400) || !X509_set_pubkey(cert, key))
        goto out;
    X509V3_set_ctx(&ctx, ca, cert, NULL, NULL, 0);
    if (add_ext(cert, &ctx, NID_basic_constraints, "critical,CA:FALSE") < 0 ||
        add_ext(cert, &ctx, NID_key_usage, "critical,digitalSignature") < 0 ||
        add_ext(cert, &ctx, NID_ext_key_usage, "clientAuth") < 0 ||
        (X509_get0_subject_key_id(ca) &&   /* a CA without one names none */
         add_ext(cert, &ctx, NID_authority_key_identifier, "keyid") < 0) ||
        X509_sign(cert, ca_key, EVP_sha256()) <= 0)
        goto out;
    ok = true;
out:
    BN_free(bn);
    X509_NAME_free(name);
    if (!ok) {
        X509_free(cert);
        return NULL;
    }
    return cert;
}

static X509 *read_cert(const char *path)
{
    FILE *f = fopen(path, "r");
    X509 *x = f ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;
    if (f)
        fclose(f);
    return x;
}

static EVP_PKEY *read_key(const char *path)
{
    FILE *f = fopen(path, "r");
    EVP_PKEY *k = f ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;
    if (f)
        fclose(f);
    return k;
}

/* One certificate per channel: minted from the CA, or read from --cert-dir
 * (deviceN.crt and deviceN.key, N = offset + i + 1, as cmg site init names them). */
static int load_certs(struct notify *nt)
{
    const struct load_opts *o = nt->o;
    X509 *ca = NULL;
    EVP_PKEY *ca_key = NULL;
    int rc = -1;

    if (o->mint_ca) {
        EVP_PKEY_CTX *kc = EVP_PKEY_CTX_new_id(EVP_PKEY_EC, NULL);
        if (!(ca = read_cert(o->mint_ca)) || !(ca_key = read_key(o->mint_ca_key))) {
            fprintf(stderr, "cmg-load: --mint-ca %s / --mint-ca-key %s: cannot read a PEM certificate "
                            "and its key\n", o->mint_ca, o->mint_ca_key);
            EVP_PKEY_CTX_free(kc);
            goto out;
        }
        if (!kc || EVP_PKEY_keygen_init(kc) <= 0 ||
            EVP_PKEY_CTX_set_ec_paramgen_curve_nid(kc, NID_X9_62_prime256v1) <= 0 ||
            EVP_PKEY_keygen(kc, &nt->shared_key) <= 0) {
            EVP_PKEY_CTX_free(kc);
            fprintf(stderr, "cmg-load: cannot make a P-256 key\n");
            goto out;
        }
        EVP_PKEY_CTX_free(kc);
    }
    if (!o->mint_ca && !o->cert_dir)
        return 0;   /* --cert for every channel, or none */
    for (unsigned i = 0; i < nt->n; i++) {
        struct chan *c = &nt->ch[i];
        unsigned long number = o->device_offset + i;
        if (o->mint_ca) {
            c->cert = mint(ca, ca_key, nt->shared_key, number);
        } else {
            char crt[4200], key[4200];
            snprintf(crt, sizeof(crt), "%s/device%lu.crt", o->cert_dir, number + 1);
            snprintf(key, sizeof(key), "%s/device%lu.key", o->cert_dir, number + 1);
            c->cert = read_cert(crt);
            c->key = read_key(key);
            if (!c->cert || !c->key) {
                fprintf(stderr, "cmg-load: --cert-dir: cannot read %s and %s\n", crt, key);
                goto out;
            }
        }
        if (!c->cert) {
            fprintf(stderr, "cmg-load: cannot mint certificate %u\n", i);
            goto out;
        }
    }
    rc = 0;
out:
    X509_free(ca);
    EVP_PKEY_free(ca_key);
    return rc;
}

/* The device id the gateway forwards for each channel: cert:<SHA-256 of the DER>. */
static int write_ids(struct notify *nt, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "cmg-load: --ids-out %s: %s\n", path, strerror(errno));
        return -1;
    }
    for (unsigned i = 0; i < nt->n; i++) {
        unsigned char md[32];
        unsigned len = 0;
        if (!nt->ch[i].cert || X509_digest(nt->ch[i].cert, EVP_sha256(), md, &len) != 1) {
            fprintf(stderr, "cmg-load: --ids-out: channel %u has no certificate of its own\n", i);
            fclose(f);
            return -1;
        }
        fputs("cert:", f);
        for (unsigned k = 0; k < len; k++)
            fprintf(f, "%02x", md[k]);
        fputc('\n', f);
    }
    return fclose(f) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------ arrivals */

static uint64_t hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static struct record *record_for(struct notify *nt, const char *key)
{
    size_t i;
    if (nt->nrecs * 2 >= nt->rcap) {   /* grow and rehash */
        size_t cap = nt->rcap ? nt->rcap * 2 : 256;
        struct record *t = calloc(cap, sizeof(*t));
        if (!t)
            return NULL;
        for (size_t k = 0; k < nt->rcap; k++) {
            if (!nt->recs[k].key)
                continue;
            for (i = hash(nt->recs[k].key) & (cap - 1); t[i].key; i = (i + 1) & (cap - 1))
                ;
            t[i] = nt->recs[k];
        }
        free(nt->recs);
        nt->recs = t;
        nt->rcap = cap;
    }
    for (i = hash(key) & (nt->rcap - 1); nt->recs[i].key; i = (i + 1) & (nt->rcap - 1))
        if (!strcmp(nt->recs[i].key, key))
            return &nt->recs[i];
    if (!(nt->recs[i].key = strdup(key)))
        return NULL;
    nt->nrecs++;
    return &nt->recs[i];
}

static void record_arrival(struct notify *nt, const char *key, uint64_t at)
{
    struct record *r = record_for(nt, key);
    if (!r)
        return;
    if (r->count == r->cap) {
        uint32_t cap = r->cap ? r->cap * 2 : 64;
        uint64_t *t = realloc(r->times, cap * sizeof(*t));
        if (!t)
            return;
        r->times = t;
        r->cap = cap;
    }
    r->times[r->count++] = at;
    nt->events++;
    nt->events_total++;
}

static void clear_records(struct notify *nt)
{
    for (size_t i = 0; i < nt->rcap; i++) {
        free(nt->recs[i].key);
        free(nt->recs[i].times);
    }
    free(nt->recs);
    nt->recs = NULL;
    nt->nrecs = nt->rcap = 0;
    nt->events = 0;
}

/* One line per event key: KEY COUNT FIRST LAST T1 T2 ... (ns since the epoch). */
static int dump_records(struct notify *nt, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    for (size_t i = 0; i < nt->rcap; i++) {
        struct record *r = &nt->recs[i];
        uint64_t first = UINT64_MAX, last = 0;
        if (!r->key)
            continue;
        for (uint32_t k = 0; k < r->count; k++) {
            first = r->times[k] < first ? r->times[k] : first;
            last = r->times[k] > last ? r->times[k] : last;
        }
        fprintf(f, "%s %u %llu %llu", r->key, r->count, (unsigned long long)first,
                (unsigned long long)last);
        for (uint32_t k = 0; k < r->count; k++)
            fprintf(f, " %llu", (unsigned long long)r->times[k]);
        fputc('\n', f);
    }
    return fclose(f) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------ the stream */

static void sse_dispatch(struct notify *nt, struct chan *c, uint64_t at)
{
    const char *key = nt->o->key_data ? c->data : c->last_id;
    if (c->has_event && key[0]) {
        record_arrival(nt, key, at);
        if (c->replaying)
            c->replay_events++;
    }
    c->has_event = false;
    c->data[0] = 0;
}

/* One complete SSE line (without its end). */
static void sse_line(struct notify *nt, struct chan *c, uint64_t at)
{
    const char *v;
    size_t n = c->line_len < LINE_MAX_BYTES ? c->line_len : LINE_MAX_BYTES - 1;

    c->line[n] = 0;
    if (n == 0) {
        sse_dispatch(nt, c, at);
        return;
    }
    if (c->line[0] == ':')
        return;   /* a comment: the heartbeat */
    v = strchr(c->line, ':');
    v = v ? v + 1 + (v[1] == ' ') : c->line + n;
    if (!strncmp(c->line, "id:", 3) || !strcmp(c->line, "id")) {
        snprintf(c->last_id, sizeof(c->last_id), "%s", v);
        c->has_event = true;
    } else if (!strncmp(c->line, "data:", 5)) {
        if (!c->data[0])
            snprintf(c->data, sizeof(c->data), "%.*s", KEY_MAX - 1, v);
        c->has_event = true;
    } else if (!strncmp(c->line, "event:", 6)) {
        c->has_event = true;
    }
}

static void sse_feed(struct notify *nt, struct chan *c, const char *p, size_t n, uint64_t at)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\n') {
            if (c->line_len && c->line_len < LINE_MAX_BYTES && c->line[c->line_len - 1] == '\r')
                c->line_len--;
            sse_line(nt, c, at);
            c->line_len = 0;
        } else {
            if (c->line_len < LINE_MAX_BYTES - 1)
                c->line[c->line_len] = p[i];
            if (c->line_len < UINT16_MAX)
                c->line_len++;
        }
    }
}

static void lose(struct notify *nt, struct chan *c, const char *why, unsigned long tls_err);

/* A header line of the response; 0, or -1 (the channel is gone). */
static int head_line(struct notify *nt, struct chan *c)
{
    size_t n = c->line_len < LINE_MAX_BYTES ? c->line_len : LINE_MAX_BYTES - 1;
    c->line[n] = 0;
    if (n && c->line[n - 1] == '\r')
        c->line[--n] = 0;
    if (!strncmp(c->line, "HTTP/", 5)) {
        const char *sp = strchr(c->line, ' ');
        int status = sp ? atoi(sp + 1) : 0;
        if (status != 200) {
            char why[120];
            snprintf(why, sizeof(why), "HTTP status %d, 200 expected", status);
            lose(nt, c, why, 0);
            return -1;
        }
        return 0;
    }
    if (!strncasecmp(c->line, "transfer-encoding:", 18) && strcasestr(c->line + 18, "chunked"))
        c->chunked = true;
    if (n == 0) {   /* the end of the head: the channel is up */
        c->state = CH_OPEN;
        c->body = c->chunked ? B_CHUNK_SIZE : B_PLAIN;
        c->chunk_left = 0;
        nt->in_flight--;
        nt->up++;
    }
    return 0;
}

/* Response bytes; 0, or -1 when the channel is gone. */
static int take(struct notify *nt, struct chan *c, const char *p, size_t n, uint64_t at)
{
    size_t i = 0;
    while (i < n) {
        if (c->state == CH_HEAD) {
            char ch = p[i++];
            if (ch == '\n') {
                if (head_line(nt, c) < 0)
                    return -1;
                c->line_len = 0;
            } else if (c->line_len < LINE_MAX_BYTES - 1) {
                c->line[c->line_len++] = ch;
            }
            continue;
        }
        switch (c->body) {
        case B_PLAIN:
            sse_feed(nt, c, p + i, n - i, at);
            return 0;
        case B_CHUNK_SIZE: {
            char ch = p[i++];
            if (ch == '\n') {
                if (c->chunk_left == 0) {
                    lose(nt, c, "the server ended the stream (last chunk)", 0);
                    return -1;
                }
                c->body = B_CHUNK_DATA;
                c->field = 0;
            } else if (ch == ';') {
                c->field = 1;   /* a chunk extension follows: not part of the size */
            } else if (!c->field && isxdigit((unsigned char)ch) && c->chunk_left < (1u << 27)) {
                c->chunk_left = c->chunk_left * 16 +
                                (uint32_t)(isdigit((unsigned char)ch) ? ch - '0' : (tolower(ch) - 'a' + 10));
            }
            break;
        }
        case B_CHUNK_DATA: {
            size_t k = n - i < c->chunk_left ? n - i : c->chunk_left;
            sse_feed(nt, c, p + i, k, at);
            i += k;
            c->chunk_left -= (uint32_t)k;
            if (!c->chunk_left)
                c->body = B_CHUNK_CRLF;
            break;
        }
        case B_CHUNK_CRLF:
            if (p[i++] == '\n')
                c->body = B_CHUNK_SIZE;
            break;
        }
    }
    return 0;
}

/* ------------------------------------------------------------ a channel */

static void close_chan(struct chan *c)
{
    if (c->ssl) {
        SSL_free(c->ssl);   /* no close_notify: the end of a round is abrupt on purpose */
        c->ssl = NULL;
    }
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

static void lose(struct notify *nt, struct chan *c, const char *why, unsigned long tls_err)
{
    if (c->state == CH_OPEN)
        nt->lost++;
    else if (c->state != CH_GONE && c->state != CH_IDLE) {
        nt->in_flight--;
        nt->failed++;
    }
    note_error(nt, why, tls_err);
    close_chan(c);
    c->state = CH_GONE;
}

static int dial(struct notify *nt, struct chan *c)
{
    const struct load_opts *o = nt->o;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    unsigned idx = (unsigned)(c - nt->ch);
    int one = 1;

    c->fd = socket(o->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->state = CH_CONNECTING;
    c->rd = c->wr = c->chunked = c->has_event = false;
    c->req_sent = c->line_len = 0;
    c->data[0] = 0;
    c->dialled_ns = load_now();
    nt->in_flight++;
    if (c->fd < 0)
        goto fail;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (o->nbind && o->addr.ss_family == AF_INET) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(o->bind[idx % o->nbind]);
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
        if (bind(c->fd, (struct sockaddr *)&src, sizeof(src)) < 0)
            goto fail;
    }
    if (connect(c->fd, (struct sockaddr *)&o->addr, o->addrlen) < 0 && errno != EINPROGRESS)
        goto fail;
    if (epoll_ctl(nt->ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        goto fail;
    return 0;
fail: {
    char why[120];
    snprintf(why, sizeof(why), "connect: %s", strerror(errno));
    lose(nt, c, why, 0);
    return -1;
}
}

static int start_tls(struct notify *nt, struct chan *c)
{
    const struct load_opts *o = nt->o;
    int soerr = 0;
    socklen_t len = sizeof(soerr);

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0 || soerr) {
        char why[120];
        snprintf(why, sizeof(why), "connect: %s", strerror(soerr ? soerr : errno));
        lose(nt, c, why, 0);
        return -1;
    }
    if (!(c->ssl = SSL_new(nt->ctx)) || SSL_set_fd(c->ssl, c->fd) != 1 ||
        (c->cert && (SSL_use_certificate(c->ssl, c->cert) != 1 ||
                     SSL_use_PrivateKey(c->ssl, c->key ? c->key : nt->shared_key) != 1))) {
        lose(nt, c, "cannot set up TLS with the channel's certificate", ERR_get_error());
        return -1;
    }
    SSL_set_connect_state(c->ssl);
    if (o->host[0] && strspn(o->host, "0123456789.:") != strlen(o->host))
        SSL_set_tlsext_host_name(c->ssl, o->host);
    if (o->cacert)
        SSL_set1_host(c->ssl, o->host);
    c->state = CH_HANDSHAKE;
    return 0;
}

static int send_request(struct notify *nt, struct chan *c)
{
    char head[sizeof(nt->req) + 128];
    size_t len = nt->req_len;

    memcpy(head, nt->req, len);
    if (c->replaying && c->mark[0])
        len += (size_t)snprintf(head + len, sizeof(head) - len, "Last-Event-ID: %s\r\n", c->mark);
    else if (nt->o->last_event_id)
        len += (size_t)snprintf(head + len, sizeof(head) - len, "Last-Event-ID: %s\r\n",
                                nt->o->last_event_id);
    len += (size_t)snprintf(head + len, sizeof(head) - len, "\r\n");
    while (c->req_sent < len) {
        size_t n = 0;
        int r;
        ERR_clear_error();
        r = SSL_write_ex(c->ssl, head + c->req_sent, len - c->req_sent, &n);
        if (r != 1) {
            int err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
                c->wr = false;
                return 0;
            }
            lose(nt, c, "TLS write of the request", ERR_get_error());
            return -1;
        }
        c->req_sent = (uint16_t)(c->req_sent + n);
    }
    c->state = CH_HEAD;
    return 0;
}

static void read_stream(struct notify *nt, struct chan *c, char *buf, size_t cap)
{
    while (c->state == CH_HEAD || c->state == CH_OPEN) {
        size_t n = 0;
        int r;
        ERR_clear_error();
        r = SSL_read_ex(c->ssl, buf, cap, &n);
        if (r != 1) {
            int err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
                return;
            lose(nt, c, err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL
                            ? "the server closed the channel" : "TLS read",
                 ERR_get_error());
            return;
        }
        if (take(nt, c, buf, n, realtime_ns()) < 0)
            return;
    }
}

static void chan_event(struct notify *nt, struct chan *c, uint32_t events, char *buf, size_t cap)
{
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        c->rd = true;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        c->wr = true;
    if (c->state == CH_CONNECTING) {
        if (!c->wr || start_tls(nt, c) < 0)
            return;
    }
    if (c->state == CH_HANDSHAKE) {
        int r;
        ERR_clear_error();
        r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            int err = SSL_get_error(c->ssl, r);
            if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE)
                lose(nt, c, "TLS handshake", ERR_get_error());
            return;
        }
        c->state = CH_REQUEST;
    }
    if (c->state == CH_REQUEST && send_request(nt, c) < 0)
        return;
    read_stream(nt, c, buf, cap);
}

/* ------------------------------------------------------------ the driver */

static double cpu_seconds(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", *s);
        else
            putchar(*s);
    }
    putchar('"');
}

static void say_state(struct notify *nt, const char *event)
{
    printf("{\"event\":\"%s\",\"channels\":%u,\"up\":%u,\"failed\":%u,\"lost\":%u,\"events\":%llu,"
           "\"events_total\":%llu,\"establish_s\":%.3f,\"cpu_s\":%.3f,\"first_error\":",
           event, nt->n, nt->up - nt->lost, nt->failed, nt->lost, (unsigned long long)nt->events,
           (unsigned long long)nt->events_total,
           nt->t_up ? (double)(nt->t_up - nt->t_start) / 1e9 : 0, cpu_seconds());
    json_str(nt->first_error);
    printf("}\n");
    fflush(stdout);
}

static void cmd_replay(struct notify *nt, unsigned want)
{
    unsigned taken = 0;
    nt->replay_n = 0;
    for (unsigned i = 0; i < nt->n; i++)
        nt->ch[i].replaying = false;
    for (unsigned i = 0; i < nt->n && taken < want; i++) {
        struct chan *c = &nt->ch[i];
        if (c->state != CH_OPEN || !c->mark[0])
            continue;
        close_chan(c);
        nt->up--;   /* closed on purpose: not lost */
        c->replaying = true;
        c->replay_events = 0;
        c->state = CH_IDLE;
        taken++;
    }
    nt->replay_n = taken;
    nt->replay_next = 0;   /* dial_more dials them, at the same bounded pace as the first time */
    printf("{\"event\":\"replaying\",\"channels\":%u}\n", taken);
    fflush(stdout);
}

static void cmd_replay_stats(struct notify *nt)
{
    unsigned up = 0, min = UINT32_MAX, max = 0;
    uint64_t sum = 0;
    for (unsigned i = 0; i < nt->n; i++) {
        struct chan *c = &nt->ch[i];
        if (!c->replaying)
            continue;
        up += c->state == CH_OPEN;
        sum += c->replay_events;
        min = c->replay_events < min ? c->replay_events : min;
        max = c->replay_events > max ? c->replay_events : max;
    }
    printf("{\"event\":\"replay\",\"channels\":%u,\"up\":%u,\"events\":%llu,\"min\":%u,\"max\":%u}\n",
           nt->replay_n, up, (unsigned long long)sum, nt->replay_n ? min : 0, max);
    fflush(stdout);
}

static void command(struct notify *nt, char *line)
{
    if (!strncmp(line, "dump ", 5)) {
        int ok = dump_records(nt, line + 5) == 0;
        printf("{\"event\":\"dumped\",\"ok\":%s,\"keys\":%zu,\"events\":%llu,\"up\":%u,\"lost\":%u}\n",
               ok ? "true" : "false", nt->nrecs, (unsigned long long)nt->events, nt->up - nt->lost,
               nt->lost);
        fflush(stdout);
        clear_records(nt);
    } else if (!strcmp(line, "mark")) {
        unsigned marked = 0;
        for (unsigned i = 0; i < nt->n; i++) {
            struct chan *c = &nt->ch[i];
            memcpy(c->mark, c->last_id, sizeof(c->mark));
            marked += c->state == CH_OPEN && c->mark[0];
        }
        printf("{\"event\":\"marked\",\"channels\":%u}\n", marked);
        fflush(stdout);
    } else if (!strncmp(line, "replay ", 7)) {
        cmd_replay(nt, (unsigned)strtoul(line + 7, NULL, 10));
    } else if (!strcmp(line, "replay-stats")) {
        cmd_replay_stats(nt);
    } else if (!strcmp(line, "stats")) {
        say_state(nt, "stats");
    } else if (!strcmp(line, "quit")) {
        nt->quit = true;
    } else if (line[0]) {
        printf("{\"event\":\"error\",\"error\":\"unknown command; dump FILE, mark, replay M, "
               "replay-stats, stats, quit\"}\n");
        fflush(stdout);
    }
}

static void read_commands(struct notify *nt)
{
    for (;;) {
        ssize_t k = read(0, nt->cmd + nt->cmd_len, sizeof(nt->cmd) - 1 - nt->cmd_len);
        char *nl;
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (k <= 0) {   /* the driver is gone */
            nt->quit = true;
            return;
        }
        nt->cmd_len += (size_t)k;
        nt->cmd[nt->cmd_len] = 0;
        while ((nl = strchr(nt->cmd, '\n'))) {
            *nl = 0;
            command(nt, nt->cmd);
            nt->cmd_len -= (size_t)(nl + 1 - nt->cmd);
            memmove(nt->cmd, nl + 1, nt->cmd_len + 1);
        }
        if (nt->cmd_len == sizeof(nt->cmd) - 1)
            nt->cmd_len = 0;   /* a line longer than any command: dropped */
    }
}

/* Dials what the rate and the number under way allow; returns ns until the next may go. */
static uint64_t dial_more(struct notify *nt, uint64_t now)
{
    const struct load_opts *o = nt->o;
    uint64_t gap = o->connect_rate > 0 ? (uint64_t)(1e9 / o->connect_rate) : 0;

    for (;;) {
        struct chan *c = NULL;
        if (nt->next_dial < nt->n) {
            c = &nt->ch[nt->next_dial];
        } else {   /* then channels a replay closed, in order */
            while (nt->replay_next < nt->n &&
                   !(nt->ch[nt->replay_next].replaying && nt->ch[nt->replay_next].state == CH_IDLE))
                nt->replay_next++;
            if (nt->replay_next < nt->n)
                c = &nt->ch[nt->replay_next];
        }
        if (!c || nt->in_flight >= o->concurrency)
            return UINT64_MAX;
        if (gap && now < nt->dial_due_ns)
            return nt->dial_due_ns - now;
        if (c == &nt->ch[nt->next_dial])
            nt->next_dial++;
        dial(nt, c);
        if (gap)
            nt->dial_due_ns = (nt->dial_due_ns > now - gap ? nt->dial_due_ns : now) + gap;
    }
}

/* Channels still not up when the time for setting up ran out: failed. */
static void give_up_dialling(struct notify *nt)
{
    for (unsigned i = 0; i < nt->n; i++) {
        struct chan *c = &nt->ch[i];
        if (c->state != CH_OPEN && c->state != CH_GONE && c->state != CH_IDLE)
            lose(nt, c, "not up when --max-time ran out", 0);
    }
    nt->failed += nt->n - nt->next_dial;   /* never dialled */
    nt->next_dial = nt->n;
}

static int build_request(struct notify *nt)
{
    const struct load_opts *o = nt->o;
    int n = snprintf(nt->req, sizeof(nt->req),
                     "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
                     "Cache-Control: no-cache\r\nUser-Agent: cmg-load\r\n",
                     o->path, o->authority);
    for (int i = 0; i < o->nheaders && n > 0 && (size_t)n < sizeof(nt->req); i++)
        n += snprintf(nt->req + n, sizeof(nt->req) - (size_t)n, "%s\r\n", o->headers[i]);
    if (o->bearer && n > 0 && (size_t)n < sizeof(nt->req))
        n += snprintf(nt->req + n, sizeof(nt->req) - (size_t)n, "Authorization: Bearer %s\r\n",
                      o->bearer);
    if (n < 0 || (size_t)n >= sizeof(nt->req) - 200)
        return -1;
    nt->req_len = (size_t)n;
    return 0;
}

static void loop(struct notify *nt)
{
    const struct load_opts *o = nt->o;
    struct epoll_event events[MAX_EVENTS];
    static char buf[65536];
    uint64_t deadline = nt->t_start + (uint64_t)(o->max_time_s * 1e9);

    while (!nt->quit) {
        uint64_t now = load_now(), wait_ns = dial_more(nt, now);
        int timeout_ms, n;

        if (!nt->told_up && now >= deadline)
            give_up_dialling(nt);
        if (!nt->told_up && nt->next_dial == nt->n && nt->in_flight == 0) {
            nt->told_up = true;
            nt->t_up = now;
            say_state(nt, "up");
        }
        if (!nt->told_up && deadline - now < wait_ns)
            wait_ns = deadline > now ? deadline - now : 0;
        timeout_ms = wait_ns == UINT64_MAX ? 1000 : (int)((wait_ns + 999999) / 1000000);
        n = epoll_wait(nt->ep, events, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR)
            break;
        for (int i = 0; i < n; i++) {
            if (!events[i].data.ptr)
                read_commands(nt);
            else
                chan_event(nt, events[i].data.ptr, events[i].events, buf, sizeof(buf));
        }
    }
}

int load_notify_run(const struct load_opts *o)
{
    static struct notify nt;
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = NULL};
    char err[300];
    int rc = 1;

    nt.o = o;
    nt.n = o->connections;
    if (!(nt.ch = calloc(nt.n, sizeof(*nt.ch))))
        return 1;
    for (unsigned i = 0; i < nt.n; i++)
        nt.ch[i].fd = -1;
    if (!(nt.ctx = load_client_ctx(o, err, sizeof(err)))) {
        fprintf(stderr, "cmg-load: %s\n", err);
        return 1;
    }
    SSL_CTX_set_mode(nt.ctx, SSL_MODE_RELEASE_BUFFERS);
    if (build_request(&nt) < 0) {
        fprintf(stderr, "cmg-load: the request head is too long\n");
        return 2;
    }
    if (load_certs(&nt) < 0 || (o->ids_out && write_ids(&nt, o->ids_out) < 0))
        return 1;
    if ((nt.ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
        return 1;
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    if (epoll_ctl(nt.ep, EPOLL_CTL_ADD, 0, &sev) < 0) {
        /* stdin is not pollable (a file, /dev/null): hold until --hold runs out */
        fprintf(stderr, "cmg-load: --notify reads its commands from a pipe on stdin\n");
        return 2;
    }
    nt.t_start = load_now();
    loop(&nt);
    for (unsigned i = 0; i < nt.n; i++)
        close_chan(&nt.ch[i]);
    say_state(&nt, "final");
    rc = nt.told_up && nt.up > 0 ? 0 : 1;
    return rc;
}
