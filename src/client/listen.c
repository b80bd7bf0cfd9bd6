/* cmg client listen: the device's notification channel. GET /CCM_Notify over HTTP/1.1
 * with Accept: text/event-stream, held open; each event is printed as one JSON line
 * {"id","event","data"} (and may run a command); when the channel ends it is opened
 * again after the server's retry: hint, doubled per failure up to a minute and
 * jittered +-50 %, with Last-Event-ID so that the gateway replays what was missed. The
 * last id is kept in the state directory (notify.last-id, written atomically), so a
 * restart resumes too. SIGTERM and SIGINT end it with status 0. */
#include "client/client.h"
#include "client/sse.h"
#include "core/log.h"
#include "site/pki.h"

#include <cjson/cJSON.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LISTEN_PATH "/CCM_Notify"
#define LAST_ID_FILE "notify.last-id"
#define RETRY_DEFAULT_MS 4000      /* until the server gives its retry: hint */
#define BACKOFF_MAX_MS 60000
#define READ_TIMEOUT_MS 120000     /* silence this long: the channel is dead (heartbeats: 45 s) */
#define ERROR_BODY_MAX 4096

struct listen_opts {
    const char *state, *gateway, *cert, *key, *ca, *server_name, *token_file, *exec;
    bool once;
    long max_events;   /* 0: no limit */
    int timeout_ms;
};

/* One run of the command: what the events and the connections share. */
struct listener {
    const struct listen_opts *o;
    struct cmg_sse *sse;
    char id_file[PATH_MAX];      /* "" : the last id is not kept */
    char saved_id[CMG_SSE_MAX_ID + 1];
    long events;
    bool stop;                   /* --max-events reached */
    bool channel;                /* this connection's answer was an event stream */
    bool local;                  /* this connection failed here: state, token */
    char why[1100];              /* why this connection ended, if not the server's doing */
    FILE *sink;
};

static volatile sig_atomic_t child_pid;

/* Events are flushed as they come, and notify.last-id is replaced by rename: nothing is
 * lost by leaving at once. A command under way is told too. */
static void on_signal(int sig)
{
    (void)sig;
    if (child_pid > 0)
        kill((pid_t)child_pid, SIGTERM);
    _exit(CMG_CLIENT_EXIT_OK);
}

static void listen_usage(FILE *out)
{
    fputs("usage: cmg client listen [--state DIR] [--token FILE] [options]\n"
          "       cmg client listen --gateway HOST:PORT --cert FILE [--key FILE] [--ca FILE]\n"
          "                         [--token FILE] [options]\n"
          "\n"
          "Holds the device's notification channel (GET " LISTEN_PATH ", Server-Sent Events) and\n"
          "prints each event on standard output as one JSON line:\n"
          "  {\"id\":\"E-S\",\"event\":\"TYPE\",\"data\":<JSON>}\n"
          "(event \"reset\" means: do a full policy poll). When the channel ends it is opened\n"
          "again after the server's retry: hint (doubled after each failure, at most 60 s,\n"
          "jittered +-50 %), with Last-Event-ID, so that the gateway replays what was missed.\n"
          "The last id is kept in the state directory (" LAST_ID_FILE "): a restart resumes.\n"
          "A registered device (the first form) uses its state directory's gateway, CA,\n"
          "certificate and device token, as 'cmg client get' does; a device with a PKI\n"
          "certificate (the second form) needs no registration.\n"
          "\n"
          "options:\n"
          "  --state DIR           the state directory (default: $" CMG_CLIENT_STATE_ENV ", else\n"
          "                        the last registration's); with --cert, only where\n"
          "                        " LAST_ID_FILE " is kept (without it, in memory only)\n"
          "  --gateway HOST:PORT   the gateway's device port (overrides the state's)\n"
          "  --cert FILE           PEM client certificate (chain) of a PKI device\n"
          "  --key FILE            its PEM private key (default: in the --cert file)\n"
          "  --ca FILE             PEM roots for the gateway's certificate (default: the\n"
          "                        state's ca.crt; without state, the system's roots)\n"
          "  --server-name NAME    the name the gateway's certificate must carry\n"
          "  --token FILE          a bearer token (site device token or OIDC) to send, read\n"
          "                        from FILE at each connection ('-': standard input, once);\n"
          "                        replaces the state's device token\n"
          "  --exec CMD            run '/bin/sh -c CMD' for each event, one at a time, with\n"
          "                        CMG_EVENT_ID, CMG_EVENT_TYPE and CMG_EVENT_DATA in its\n"
          "                        environment; its output goes to standard error\n"
          "  --once                hold the channel once: no reconnection\n"
          "  --max-events N        exit (status 0) after N events\n"
          "  --timeout SECONDS     silence after which the channel counts as dead and is\n"
          "                        opened again (default 120; the gateway's heartbeat\n"
          "                        comes every 45 s); also bounds connecting\n"
          "\n"
          "Connections and disconnections are logged on standard error. SIGTERM or SIGINT\n"
          "ends it with status 0. With --once, the status is 0 if the channel was held and\n"
          "ended, 1 if the gateway refused it, 3 if it could not be reached.\n",
          out);
}

static int usage_error(const char *fmt, const char *arg)
{
    fputs("cmg client listen: ", stderr);
    fprintf(stderr, fmt, arg);
    fputs("\n\n", stderr);
    listen_usage(stderr);
    return CMG_CLIENT_EXIT_USAGE;
}

static int parse_count(const char *s, long *out)
{
    char *end;

    errno = 0;
    *out = strtol(s, &end, 10);
    return !*s || *end || errno || *out < 1 ? -1 : 0;
}

static int parse_listen(int argc, char **argv, struct listen_opts *o, int *done)
{
    enum { O_STATE, O_GATEWAY, O_CERT, O_KEY, O_CA, O_SERVER_NAME, O_TOKEN, O_EXEC,
           O_MAX_EVENTS, O_TIMEOUT };
    static const char *const names[] = {
        [O_STATE] = "--state", [O_GATEWAY] = "--gateway", [O_CERT] = "--cert",
        [O_KEY] = "--key", [O_CA] = "--ca", [O_SERVER_NAME] = "--server-name",
        [O_TOKEN] = "--token", [O_EXEC] = "--exec", [O_MAX_EVENTS] = "--max-events",
        [O_TIMEOUT] = "--timeout"};
    char host[256];
    int port;

    *done = 1;
    o->timeout_ms = READ_TIMEOUT_MS;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        size_t k;
        int r = 0;

        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            listen_usage(stdout);
            return CMG_CLIENT_EXIT_OK;
        }
        if (!strcmp(a, "--once")) {
            o->once = true;
            continue;
        }
        for (k = 0; k < sizeof(names) / sizeof(names[0]); k++)
            if ((r = cmg_client_opt(argc, argv, &i, names[k], &val)) != 0)
                break;
        if (r < 0)
            return usage_error("option %s needs a value", a);
        if (r == 0)
            return usage_error("unknown option or argument '%s'", a);
        switch (k) {
        case O_STATE: o->state = val; break;
        case O_GATEWAY: o->gateway = val; break;
        case O_CERT: o->cert = val; break;
        case O_KEY: o->key = val; break;
        case O_CA: o->ca = val; break;
        case O_SERVER_NAME: o->server_name = val; break;
        case O_TOKEN: o->token_file = val; break;
        case O_EXEC: o->exec = val; break;
        case O_MAX_EVENTS:
            if (parse_count(val, &o->max_events) < 0)
                return usage_error("--max-events '%s': a whole number of at least 1 expected",
                                   val);
            break;
        default:
            if (cmg_client_parse_timeout(val, &o->timeout_ms) < 0)
                return usage_error("--timeout '%s': not a number of seconds", val);
            break;
        }
    }
    if (o->key && !o->cert)
        return usage_error("%s", "--key goes with --cert");
    if (o->cert && !o->gateway)
        return usage_error("%s", "--cert needs --gateway HOST:PORT (a device without "
                                 "registration has no state to take it from)");
    if (o->gateway && cmg_fetch_split_addr(o->gateway, 0, host, sizeof(host), &port) < 0)
        return usage_error("--gateway '%s': not HOST:PORT or [IPv6]:PORT", o->gateway);
    *done = 0;
    return CMG_CLIENT_EXIT_OK;
}

/* ---- the last id ---- */

static void load_last_id(struct listener *l)
{
    unsigned char *data = NULL;
    size_t len = 0;

    if (!l->id_file[0] || access(l->id_file, F_OK) != 0)
        return;
    if (cmg_client_read_file(l->id_file, CMG_SSE_MAX_ID + 2, &data, &len) < 0)
        return;
    while (len && (data[len - 1] == '\n' || data[len - 1] == '\r'))
        data[--len] = 0;
    if (len && strlen((char *)data) == len && cmg_client_token_ok((char *)data) >= 0 &&
        !strpbrk((char *)data, " \t")) {
        snprintf(l->saved_id, sizeof(l->saved_id), "%s", (char *)data);
    } else if (len) {
        fprintf(stderr, "cmg client: %s: not an event id; starting without one\n", l->id_file);
    }
    free(data);
}

static void save_last_id(struct listener *l, const char *id)
{
    char text[CMG_SSE_MAX_ID + 2];
    int n;

    if (!l->id_file[0] || !strcmp(id, l->saved_id))
        return;
    n = snprintf(text, sizeof(text), "%s\n", id);
    if (cmg_pki_write_file(l->id_file, text, (size_t)n, 0600) < 0)
        fprintf(stderr, "cmg client: cannot write %s: %s (a restart may replay events)\n",
                l->id_file, strerror(errno));
    snprintf(l->saved_id, sizeof(l->saved_id), "%s", id);
}

/* ---- an event ---- */

static void run_command(const char *cmd, const struct cmg_sse_event *ev)
{
    pid_t pid;
    int status = 0;

    fflush(stderr);
    pid = fork();
    if (pid < 0) {
        fprintf(stderr, "cmg client: --exec: cannot start a process: %s\n", strerror(errno));
        return;
    }
    if (pid == 0) {
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        if (dup2(STDERR_FILENO, STDOUT_FILENO) < 0 ||
            setenv("CMG_EVENT_ID", ev->id, 1) < 0 ||
            setenv("CMG_EVENT_TYPE", ev->type, 1) < 0 ||
            setenv("CMG_EVENT_DATA", ev->data ? ev->data : "null", 1) < 0)
            _exit(127);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    child_pid = pid;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    child_pid = 0;
    if (WIFEXITED(status) && WEXITSTATUS(status))
        fprintf(stderr, "cmg client: --exec for event %s exited with status %d\n", ev->id,
                WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        fprintf(stderr, "cmg client: --exec for event %s ended by signal %d\n", ev->id,
                WTERMSIG(status));
}

/* A copy of the n bytes at s that is valid UTF-8 without NUL: each byte that is no
 * part of a valid character (or a NUL) becomes U+FFFD. NULL if out of memory. */
static char *valid_utf8(const char *s, size_t n)
{
    char *out = malloc(n * 3 + 1), *o = out;

    for (size_t i = 0, k; out && i < n; i += k) {
        k = cmg_utf8_char((const unsigned char *)s + i, n - i);
        if (k == 0 || s[i] == 0) {
            memcpy(o, "\xef\xbf\xbd", 3);
            o += 3;
            k = 1;
        } else {
            memcpy(o, s + i, k);
            o += k;
        }
    }
    if (out)
        *o = 0;
    return out;
}

/* {"id","event","data"}: data as the JSON it should be, else as a string; valid UTF-8
 * whatever the gateway sent, so that every line is JSON. */
static int print_event(const struct cmg_sse_event *ev)
{
    cJSON *o = cJSON_CreateObject(), *data = NULL;
    char *type = valid_utf8(ev->type, strlen(ev->type));
    char *text = ev->data ? valid_utf8(ev->data, ev->data_len) : NULL;
    int rc = -1;

    if (text && !(data = cJSON_ParseWithOpts(text, NULL, 1)))
        data = cJSON_CreateString(text);
    if (!ev->data)
        data = cJSON_CreateNull();
    free(text);
    text = NULL;
    if (o && data && type && (ev->id[0] ? cJSON_AddStringToObject(o, "id", ev->id)
                                        : cJSON_AddNullToObject(o, "id")) &&
        cJSON_AddStringToObject(o, "event", type)) {
        cJSON_AddItemToObject(o, "data", data);
        data = NULL;
        text = cJSON_PrintUnformatted(o);
    }
    if (text && printf("%s\n", text) >= 0 && fflush(stdout) == 0)
        rc = 0;
    cJSON_free(text);
    free(type);
    cJSON_Delete(data);
    cJSON_Delete(o);
    return rc;
}

static int on_event(void *arg, const struct cmg_sse_event *ev)
{
    struct listener *l = arg;

    if (print_event(ev) < 0) {
        snprintf(l->why, sizeof(l->why), "cannot write to standard output: %s", strerror(errno));
        l->stop = true;
        return 1;
    }
    if (ev->id[0])
        save_last_id(l, ev->id);
    if (l->o->exec)
        run_command(l->o->exec, ev);
    if (l->o->max_events && ++l->events >= l->o->max_events) {
        snprintf(l->why, sizeof(l->why), "%ld event(s) received (--max-events)", l->events);
        l->stop = true;
        return 1;
    }
    return 0;
}

/* ---- the connection ---- */

/* The response body goes through the parser as it comes: cmg_fetch writes it here. */
static ssize_t sink_write(void *cookie, const char *buf, size_t n)
{
    struct listener *l = cookie;
    char err[128];
    int rc = cmg_sse_feed(l->sse, buf, n, err, sizeof(err));

    if (rc == 0)
        return (ssize_t)n;
    if (rc < 0)
        snprintf(l->why, sizeof(l->why), "the gateway sent %s", err);
    /* 0, not -1: glibc counts a cookie's -1 as bytes written, and writes them again */
    errno = EPIPE;
    return 0;
}

static int on_head(void *arg, const struct cmg_fetch_resp *resp, FILE **out, char *err,
                   size_t errlen)
{
    struct listener *l = arg;
    static const cookie_io_functions_t io = {.write = sink_write};

    *out = NULL;
    if (resp->status != 200)
        return 0;   /* kept in memory, for its reason */
    if (!resp->content_type || strncmp(resp->content_type, "text/event-stream", 17)) {
        snprintf(err, errlen, "expected content-type text/event-stream, found %s",
                 resp->content_type ? resp->content_type : "none");
        return -1;
    }
    if (!(l->sink = fopencookie(l, "w", io))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    setvbuf(l->sink, NULL, _IONBF, 0);
    cmg_sse_reset(l->sse);
    l->channel = true;
    fprintf(stderr, "cmg client: channel open%s%s\n", cmg_sse_last_id(l->sse)[0] ? ", from " : "",
            cmg_sse_last_id(l->sse));
    *out = l->sink;
    return 0;
}

/* The bearer token: --token FILE (read at each connection: it may be renewed), else the
 * state's device token. NULL if none; -1 on a bad file. */
static int bearer(const struct listen_opts *o, const struct cmg_client_state *s, char **header)
{
    static char *stdin_token;
    unsigned char *data = NULL;
    size_t len = 0;
    const char *tok = s->token;

    *header = NULL;
    if (o->token_file && !strcmp(o->token_file, "-") && stdin_token) {
        tok = stdin_token;
    } else if (o->token_file) {
        if (cmg_client_read_file(o->token_file, CMG_CLIENT_TOKEN_MAX + 2, &data, &len) < 0)
            return -1;
        while (len && (data[len - 1] == '\n' || data[len - 1] == '\r' || data[len - 1] == ' '))
            data[--len] = 0;
        if (!cmg_client_token_ok((char *)data)) {
            fprintf(stderr, "cmg client: --token %s: not a token (base64url and dots, at most "
                            "%d bytes)\n", o->token_file, CMG_CLIENT_TOKEN_MAX);
            free(data);
            return -1;
        }
        if (!strcmp(o->token_file, "-"))
            stdin_token = strdup((char *)data);
        tok = (char *)data;
    }
    if (tok && *tok && (*header = malloc(strlen(tok) + 32)))
        snprintf(*header, strlen(tok) + 32, "Authorization: Bearer %s", tok);
    if (data) {
        OPENSSL_cleanse(data, len);
        free(data);
    }
    return 0;
}

/* One connection: the credentials (renewed when due), the channel until it ends. An
 * exit status for --once. */
static int hold(struct listener *l)
{
    const struct listen_opts *o = l->o;
    struct cmg_client_state s = {0};
    struct cmg_client_conn conn = {0};
    struct cmg_fetch_req req = {0};
    struct cmg_fetch_resp resp = {0};
    const char *headers[4];
    char ca[PATH_MAX], err[768], reason[256], last[CMG_SSE_MAX_ID + 32], *auth = NULL;
    size_t n = 0;
    int rc, ret = CMG_CLIENT_EXIT_FAIL;

    l->channel = l->local = false;
    l->why[0] = 0;
    if (o->cert) {
        conn.gateway = o->gateway;
        conn.server_name = o->server_name;
        conn.ca_file = o->ca;
        conn.cert_file = o->cert;
        conn.key_file = o->key;
    } else if ((ret = cmg_client_prepare_state(o->state, o->gateway, o->server_name, o->ca, &s,
                                               &conn, ca, sizeof(ca))) != CMG_CLIENT_EXIT_OK) {
        snprintf(l->why, sizeof(l->why), "the state directory cannot be used");
        l->local = true;
        goto out;
    }
    ret = CMG_CLIENT_EXIT_FAIL;
    if (bearer(o, &s, &auth) < 0) {
        snprintf(l->why, sizeof(l->why), "no token to send");
        l->local = true;
        goto out;
    }
    headers[n++] = "Accept: text/event-stream";
    headers[n++] = "Cache-Control: no-cache";
    if (cmg_sse_last_id(l->sse)[0]) {
        snprintf(last, sizeof(last), "Last-Event-ID: %s", cmg_sse_last_id(l->sse));
        headers[n++] = last;
    }
    if (auth)
        headers[n++] = auth;
    req.addr = conn.gateway;
    req.target = LISTEN_PATH;
    req.tls = true;
    req.server_name = conn.server_name;
    req.ca_file = conn.ca_file;
    req.key = conn.key;
    req.cert = conn.cert;
    req.cert_file = conn.cert_file;
    req.key_file = conn.key_file;
    req.headers = headers;
    req.n_headers = n;
    req.timeout_ms = o->timeout_ms;
    req.on_head = on_head;
    req.arg = l;
    req.max_body = ERROR_BODY_MAX;
    req.truncate_body = true;
    req.alpn = "http/1.1";
    fprintf(stderr, "cmg client: connecting to %s for notifications\n", conn.gateway);
    rc = cmg_fetch(&req, &resp, err, sizeof(err));
    if (l->sink) {
        fclose(l->sink);
        l->sink = NULL;
    }
    if (rc != CMG_FETCH_OK) {
        if (!l->why[0])
            snprintf(l->why, sizeof(l->why), "%s", err);
        ret = l->channel || l->stop ? CMG_CLIENT_EXIT_OK : cmg_client_fetch_exit(rc);
    } else if (resp.status != 200) {
        cmg_client_reason(&resp, reason, sizeof(reason));
        snprintf(l->why, sizeof(l->why), "refused: %d %s", resp.status, reason);
    } else {
        snprintf(l->why, sizeof(l->why), "the gateway ended the channel");
        ret = CMG_CLIENT_EXIT_OK;
    }
out:
    cmg_fetch_resp_free(&resp);
    if (auth) {
        OPENSSL_cleanse(auth, strlen(auth));
        free(auth);
    }
    EVP_PKEY_free(conn.key);
    X509_free(conn.cert);
    cmg_client_state_free(&s);
    return ret;
}

/* The wait before the next connection: the server's hint (or the default), doubled per
 * failure in a row, at most a minute, then jittered +-50 % (so that a fleet spreads). */
static long next_delay_ms(const struct listener *l, unsigned failures)
{
    long base = cmg_sse_retry_ms(l->sse) >= 0 ? cmg_sse_retry_ms(l->sse) : RETRY_DEFAULT_MS;
    unsigned char r[2] = {0};
    long ms = base;

    for (unsigned i = 0; i < failures && ms < BACKOFF_MAX_MS; i++)
        ms *= 2;
    if (ms > BACKOFF_MAX_MS)
        ms = BACKOFF_MAX_MS;
    RAND_bytes(r, sizeof(r));
    ms = ms / 2 + (long)(((uint64_t)(r[0] | r[1] << 8) * (uint64_t)ms) >> 16);
    return ms > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : ms;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static int id_file_path(const struct listen_opts *o, char *out, size_t outlen)
{
    char dir[PATH_MAX];

    out[0] = 0;
    if (o->cert && !o->state)
        return 0;   /* kept in memory only */
    if (cmg_client_state_dir(o->state, dir, sizeof(dir)) < 0)
        return -1;
    return cmg_client_state_path(dir, LAST_ID_FILE, out, outlen);
}

int cmg_client_listen_main(int argc, char **argv)
{
    struct listen_opts o = {0};
    struct listener l = {.o = &o};
    struct sigaction sa = {.sa_handler = on_signal};
    unsigned failures = 0, attempts = 0;
    int done, ret;

    ret = parse_listen(argc, argv, &o, &done);
    if (done)
        return ret;
    if (id_file_path(&o, l.id_file, sizeof(l.id_file)) < 0)
        return CMG_CLIENT_EXIT_FAIL;
    load_last_id(&l);
    if (!(l.sse = cmg_sse_new(on_event, &l, l.saved_id))) {
        fputs("cmg client: out of memory\n", stderr);
        return CMG_CLIENT_EXIT_FAIL;
    }
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    for (;;) {
        long delay;
        bool first = attempts++ == 0;

        ret = hold(&l);
        failures = l.channel ? 0 : failures + 1;
        /* a state or token that cannot be used at the start is a mistake to report, not
         * to retry; later (a renewal, a file being replaced) it is retried */
        if (l.stop || o.once || (l.local && first))
            break;
        delay = next_delay_ms(&l, l.channel ? 0 : failures);
        fprintf(stderr, "cmg client: channel %s: %s; reconnecting in %.1f s\n",
                l.channel ? "closed" : "not open", l.why, (double)delay / 1000.0);
        sleep_ms(delay);
    }
    if (l.why[0])
        fprintf(stderr, "cmg client: channel %s: %s\n", l.channel ? "closed" : "not open", l.why);
    cmg_sse_free(l.sse);
    return ret;
}
