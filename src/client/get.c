/* cmg client get: one request through the gateway, over mutual TLS with the device's
 * certificate and, for a registered device, its token (renewed first when due). The body of
 * a 2xx answer streams to standard output or to -o FILE; for any other status the reason
 * goes to standard error. */
#include "client/client.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#define GET_MAX_HEADERS 64
#define GET_BODY_MAX (64u * 1024 * 1024) /* -d @FILE, held in memory */
#define GET_ERROR_BODY_MAX (64 * 1024)   /* kept of a non-2xx body, for its reason */

struct get_opts {
    const char *path, *state, *out, *method, *data, *gateway, *ca, *cert, *key, *server_name;
    const char *headers[GET_MAX_HEADERS];
    size_t n_headers;
    bool include;
    int timeout_ms;
};

/* Where the body of a 2xx answer goes: stdout, or a temporary file renamed to -o FILE once
 * the whole body is in. */
struct get_sink {
    const struct get_opts *o;
    FILE *file;
    char tmp[PATH_MAX];
};

static void get_usage(FILE *out)
{
    fputs("usage: cmg client get PATH [--state DIR] [-o FILE] [-i] [-X METHOD]\n"
          "                      [-d DATA|@FILE] [-H 'Name: value']... [--timeout SECONDS]\n"
          "       cmg client get PATH --gateway HOST:PORT --cert FILE [--key FILE]\n"
          "                      [--ca FILE] [--server-name NAME] [options as above]\n"
          "\n"
          "Sends a request for PATH (e.g. /CCM_Proxy_ServerAuth/ROLE/sms_mp/.sms_aut?x)\n"
          "to the gateway over mutual TLS, and writes the body of a 2xx answer to standard\n"
          "output. A registered device (the first form) uses the gateway, CA, certificate\n"
          "and token of its state directory: it sends Authorization: Bearer with its\n"
          "device token, renewing the token first once it is due (if that fails while\n"
          "the token is still valid, it warns and goes on). A device with a PKI\n"
          "certificate (the second form) needs no registration and sends no\n"
          "Authorization header.\n"
          "\n"
          "options:\n"
          "  --state DIR           the state directory (default: $" CMG_CLIENT_STATE_ENV ",\n"
          "                        else the last registered one, else\n"
          "                        ~/.config/opencmg/client)\n"
          "  -o, --output FILE     write the body to FILE instead (replaced only once the\n"
          "                        whole body of a 2xx answer is in); - for stdout\n"
          "  -i, --include         write the status line and headers before the body\n"
          "                        (for a non-2xx answer, both go to standard output)\n"
          "  -X, --request METHOD  the method (default GET, or POST with -d)\n"
          "  -d, --data DATA       send DATA as the request body; @FILE reads FILE (@- for\n"
          "                        standard input), at most 64 MiB\n"
          "  -H, --header LINE     add a request header 'Name: value' (repeatable); an\n"
          "                        Authorization header replaces the device token\n"
          "  --gateway HOST:PORT   the gateway's device port (overrides the state's; the\n"
          "                        registered server name still applies)\n"
          "  --ca FILE             PEM roots for the gateway's certificate (default: the\n"
          "                        state's ca.crt; without state, the system's roots)\n"
          "  --cert FILE           PEM client certificate (chain) of a PKI device\n"
          "  --key FILE            its PEM private key (default: in the --cert file)\n"
          "  --server-name NAME    the name the gateway's certificate must carry\n"
          "                        (default: the host of the gateway); also sent as SNI\n"
          "                        and Host\n"
          "  --timeout SECONDS     for connecting and each read or write (default 30)\n"
          "  -h, --help            print this help\n"
          "\n"
          "Exit status: 0 for a 2xx answer; 1 for another status (the reason is printed,\n"
          "e.g. 'cmg client: GET /x: 403 CMGService_Device_Blocked') or a local problem;\n"
          "2 bad usage; 3 no connection (network, TLS, timeout).\n",
          out);
}

static int get_usage_error(const char *fmt, const char *arg)
{
    fputs("cmg client get: ", stderr);
    fprintf(stderr, fmt, arg);
    fputs("\n\n", stderr);
    get_usage(stderr);
    return CMG_CLIENT_EXIT_USAGE;
}

static int parse_get(int argc, char **argv, struct get_opts *o, int *done)
{
    enum { O_STATE, O_OUT, O_OUT2, O_METHOD, O_METHOD2, O_DATA, O_DATA2, O_HEADER, O_HEADER2,
           O_GATEWAY, O_CA, O_CERT, O_KEY, O_SERVER_NAME, O_TIMEOUT };
    static const char *const names[] = {
        [O_STATE] = "--state",     [O_OUT] = "-o",        [O_OUT2] = "--output",
        [O_METHOD] = "-X",         [O_METHOD2] = "--request",
        [O_DATA] = "-d",           [O_DATA2] = "--data",  [O_HEADER] = "-H",
        [O_HEADER2] = "--header",  [O_GATEWAY] = "--gateway", [O_CA] = "--ca",
        [O_CERT] = "--cert",       [O_KEY] = "--key",     [O_SERVER_NAME] = "--server-name",
        [O_TIMEOUT] = "--timeout"};
    const char *timeout = NULL;
    bool only_args = false;
    char host[256];
    int port;

    *done = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        size_t k;
        int r = 0;

        if (!only_args && (!strcmp(a, "-h") || !strcmp(a, "--help"))) {
            get_usage(stdout);
            return CMG_CLIENT_EXIT_OK;
        }
        if (!only_args && !strcmp(a, "--")) {
            only_args = true;
            continue;
        }
        if (only_args || a[0] != '-' || !a[1]) {
            if (o->path)
                return get_usage_error("unexpected argument '%s' (one PATH only)", a);
            o->path = a;
            continue;
        }
        if (!strcmp(a, "-i") || !strcmp(a, "--include")) {
            o->include = true;
            continue;
        }
        for (k = 0; k < sizeof(names) / sizeof(names[0]); k++)
            if ((r = cmg_client_opt(argc, argv, &i, names[k], &val)) != 0)
                break;
        if (r < 0)
            return get_usage_error("option %s needs a value", a);
        if (r == 0)
            return get_usage_error("unknown option '%s'", a);
        switch (k) {
        case O_STATE: o->state = val; break;
        case O_OUT: case O_OUT2: o->out = val; break;
        case O_METHOD: case O_METHOD2: o->method = val; break;
        case O_DATA: case O_DATA2: o->data = val; break;
        case O_HEADER: case O_HEADER2:
            if (o->n_headers == GET_MAX_HEADERS)
                return get_usage_error("too many -H options (at most %s)", "64");
            o->headers[o->n_headers++] = val;
            break;
        case O_GATEWAY: o->gateway = val; break;
        case O_CA: o->ca = val; break;
        case O_CERT: o->cert = val; break;
        case O_KEY: o->key = val; break;
        case O_SERVER_NAME: o->server_name = val; break;
        default: timeout = val; break;
        }
    }
    if (!o->path)
        return get_usage_error("%s", "missing PATH");
    if (o->path[0] != '/')
        return get_usage_error("PATH '%s' must start with '/'", o->path);
    if (o->gateway && cmg_fetch_split_addr(o->gateway, 0, host, sizeof(host), &port) < 0)
        return get_usage_error("--gateway '%s': not HOST:PORT or [IPv6]:PORT", o->gateway);
    if (o->key && !o->cert)
        return get_usage_error("%s", "--key goes with --cert");
    if (o->cert && !o->gateway)
        return get_usage_error("%s", "--cert needs --gateway HOST:PORT (a device without "
                                     "registration)");
    if (o->cert && o->state)
        return get_usage_error("%s", "--state and --cert exclude each other");
    if (o->out && !*o->out)
        return get_usage_error("%s", "-o: empty file name");
    if (timeout && cmg_client_parse_timeout(timeout, &o->timeout_ms) < 0)
        return get_usage_error("--timeout '%s': not a number of seconds", timeout);
    for (size_t i = 0; i < o->n_headers; i++)
        if (!strchr(o->headers[i], ':'))
            return get_usage_error("-H '%s': not 'Name: value'", o->headers[i]);
    *done = 0;
    return CMG_CLIENT_EXIT_OK;
}

static bool is_authorization(const char *h)
{
    return !strncasecmp(h, "authorization:", 14);
}

static int on_head(void *arg, const struct cmg_fetch_resp *resp, FILE **out, char *err,
                   size_t errlen)
{
    struct get_sink *k = arg;
    int fd;

    *out = NULL;
    if (resp->status < 200 || resp->status > 299)
        return 0; /* kept in memory, for its reason */
    if (k->o->out && strcmp(k->o->out, "-")) {
        if (snprintf(k->tmp, sizeof(k->tmp), "%s.cmg-XXXXXX", k->o->out) >= (int)sizeof(k->tmp)) {
            snprintf(err, errlen, "-o %s: path too long", k->o->out);
            k->tmp[0] = 0;
            return -1;
        }
        fd = mkstemp(k->tmp);
        if (fd < 0 || !(k->file = fdopen(fd, "wb"))) {
            snprintf(err, errlen, "cannot write %s: %s", k->o->out, strerror(errno));
            if (fd >= 0) {
                close(fd);
                unlink(k->tmp);
            }
            k->tmp[0] = 0;
            return -1;
        }
        *out = k->file;
    } else {
        *out = stdout;
    }
    if (k->o->include && fputs(resp->head, *out) == EOF) {
        snprintf(err, errlen, "cannot write the response head: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* Closes the -o temporary file: renamed to FILE (with the mode a new file gets) if keep,
 * else removed. 0 or -1 with a message. */
static int finish_sink(struct get_sink *k, bool keep)
{
    int ret = 0;
    mode_t mask;

    if (!k->file)
        return 0;
    if (keep) {
        mask = umask(0);
        umask(mask);
        if (fchmod(fileno(k->file), 0666 & ~mask) < 0)
            ret = -1;
    }
    if (fclose(k->file) != 0)
        ret = -1;
    k->file = NULL;
    if (keep && ret == 0 && rename(k->tmp, k->o->out) < 0)
        ret = -1;
    if (ret < 0 && keep)
        fprintf(stderr, "cmg client: cannot write %s: %s\n", k->o->out, strerror(errno));
    if (!keep || ret < 0)
        unlink(k->tmp);
    return ret;
}

int cmg_client_prepare_state(const char *state, const char *gateway, const char *server_name,
                             const char *ca_opt, struct cmg_client_state *s,
                             struct cmg_client_conn *conn, char *ca, size_t calen)
{
    char dir[PATH_MAX], msg[768], when[64];
    int64_t now = (int64_t)time(NULL);
    int rc;

    if (cmg_client_state_dir(state, dir, sizeof(dir)) < 0 ||
        cmg_client_state_load(dir, s) < 0 ||
        cmg_client_state_load_identity(dir, &conn->key, &conn->cert) < 0 ||
        cmg_client_state_path(dir, "ca.crt", ca, calen) < 0)
        return CMG_CLIENT_EXIT_FAIL;
    conn->gateway = gateway ? gateway : s->gateway;
    conn->server_name = server_name ? server_name : cmg_client_stored_server_name(gateway, s);
    conn->ca_file = ca_opt ? ca_opt : ca;
    if (now < s->renew_after)
        return CMG_CLIENT_EXIT_OK;
    rc = cmg_client_renew(conn, s, msg, sizeof(msg));
    if (rc == CMG_CLIENT_EXIT_OK)
        return rc;
    if (now < s->expires) {
        cmg_client_iso_time(s->expires, when, sizeof(when));
        fprintf(stderr, "cmg client: warning: %s; going on with the current token (valid "
                        "until %s)\n", msg, when);
        return CMG_CLIENT_EXIT_OK;
    }
    fprintf(stderr, "cmg client: %s (and the device token has expired)\n", msg);
    return rc;
}

int cmg_client_get_main(int argc, char **argv)
{
    struct get_opts o;
    struct get_sink sink;
    struct cmg_client_state s;
    struct cmg_client_conn conn;
    struct cmg_fetch_req req;
    struct cmg_fetch_resp resp;
    const char **headers = NULL;
    char ca[PATH_MAX], err[768], reason[256], *auth = NULL;
    unsigned char *data = NULL;
    size_t n_headers = 0, data_len = 0;
    bool user_auth = false;
    int done, rc, ret;

    memset(&o, 0, sizeof(o));
    memset(&sink, 0, sizeof(sink));
    memset(&s, 0, sizeof(s));
    memset(&conn, 0, sizeof(conn));
    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    ret = parse_get(argc, argv, &o, &done);
    if (done)
        return ret;
    ret = CMG_CLIENT_EXIT_FAIL;
    sink.o = &o;

    if (o.data && o.data[0] == '@') {
        if (cmg_client_read_file(o.data + 1, GET_BODY_MAX, &data, &data_len) < 0)
            goto out;
    } else if (o.data) {
        data_len = strlen(o.data);
        if (!(data = (unsigned char *)strdup(o.data)))
            goto oom;
    }
    headers = calloc(o.n_headers + 1, sizeof(*headers));
    if (!headers)
        goto oom;
    for (size_t i = 0; i < o.n_headers; i++) {
        headers[n_headers++] = o.headers[i];
        user_auth |= is_authorization(o.headers[i]);
    }

    if (o.cert) {
        conn.gateway = o.gateway;
        conn.server_name = o.server_name;
        conn.ca_file = o.ca;
        conn.cert_file = o.cert;
        conn.key_file = o.key;
        conn.timeout_ms = o.timeout_ms;
    } else {
        conn.timeout_ms = o.timeout_ms;
        ret = cmg_client_prepare_state(o.state, o.gateway, o.server_name, o.ca, &s, &conn, ca,
                                       sizeof(ca));
        if (ret != CMG_CLIENT_EXIT_OK)
            goto out;
        ret = CMG_CLIENT_EXIT_FAIL;
        if (!user_auth) {
            size_t alen = strlen(s.token) + 32;

            if (!(auth = malloc(alen)))
                goto oom;
            snprintf(auth, alen, "Authorization: Bearer %s", s.token);
            headers[n_headers++] = auth;
        }
    }

    req.addr = conn.gateway;
    req.target = o.path;
    req.tls = true;
    req.method = o.method ? o.method : o.data ? "POST" : "GET";
    req.server_name = conn.server_name;
    req.ca_file = conn.ca_file;
    req.key = conn.key;
    req.cert = conn.cert;
    req.cert_file = conn.cert_file;
    req.key_file = conn.key_file;
    req.headers = headers;
    req.n_headers = n_headers;
    req.body = data;
    req.body_len = data_len;
    req.timeout_ms = conn.timeout_ms;
    req.on_head = on_head;
    req.arg = &sink;
    req.max_body = GET_ERROR_BODY_MAX;
    req.truncate_body = true;
    rc = cmg_fetch(&req, &resp, err, sizeof(err));
    if (finish_sink(&sink, rc == CMG_FETCH_OK) < 0 && rc == CMG_FETCH_OK)
        goto out;
    if (rc != CMG_FETCH_OK) {
        fflush(stdout);
        fprintf(stderr, "cmg client: %s\n", err);
        ret = cmg_client_fetch_exit(rc);
        goto out;
    }
    if (resp.status >= 200 && resp.status <= 299) {
        ret = CMG_CLIENT_EXIT_OK;
        goto out;
    }
    if (o.include) {
        fputs(resp.head, stdout);
        if (resp.body)
            fwrite(resp.body, 1, resp.body_len, stdout);
    }
    cmg_client_reason(&resp, reason, sizeof(reason));
    fflush(stdout);
    fprintf(stderr, "cmg client: %s %s: %d %s\n", req.method, o.path, resp.status, reason);
    goto out;
oom:
    fputs("cmg client: out of memory\n", stderr);
out:
    if (fflush(stdout) != 0 && ret == CMG_CLIENT_EXIT_OK) {
        fprintf(stderr, "cmg client: cannot write to standard output: %s\n", strerror(errno));
        ret = CMG_CLIENT_EXIT_FAIL;
    }
    cmg_fetch_resp_free(&resp);
    if (auth) {
        OPENSSL_cleanse(auth, strlen(auth));
        free(auth);
    }
    free(headers);
    free(data);
    EVP_PKEY_free(conn.key);
    X509_free(conn.cert);
    cmg_client_state_free(&s);
    return ret;
}
