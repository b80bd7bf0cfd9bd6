/* cmg-load: a load generator for OpenCMG's benchmarks. It does what wrk and
 * h2load cannot: present a client certificate (or a bearer token), over
 * HTTP/1.1 or HTTP/2, at full speed or at a fixed rate with honest latency,
 * one full handshake per request, or hold many idle connections from several
 * processes and source addresses. It prints one JSON line of results. */
#include "load.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 64

const unsigned char load_pattern[65536] = {'c', 'm', 'g', '-', 'l', 'o', 'a', 'd'};

uint64_t load_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static const char usage[] =
    "usage: cmg-load [options] URL\n"
    "\n"
    "Sends HTTP/1.1 or HTTP/2 requests for URL (https://HOST[:PORT]/PATH, or http://)\n"
    "and prints one JSON line of results on stdout (a summary on stderr).\n"
    "\n"
    "Target and credentials:\n"
    "  --connect ADDR:PORT    connect there instead of HOST:PORT; HOST is still sent\n"
    "                         as Host (:authority) and SNI, and checked with --cacert\n"
    "  --cacert FILE          verify the server's certificate and name with FILE\n"
    "                         (default: the server is not verified)\n"
    "  --cert FILE            present this client certificate (mutual TLS)\n"
    "  --key FILE             its private key (default: in --cert)\n"
    "  --bearer TOKEN         send 'Authorization: Bearer TOKEN'\n"
    "  -H, --header 'N: V'    one more request header (repeatable, up to 16)\n"
    "  -X, --method M         request method (default GET; POST with --body-size)\n"
    "  --body-size N          send a request body of N bytes (suffix K, M, G: x1024)\n"
    "  --h2                   HTTP/2 (ALPN h2); default HTTP/1.1 (ALPN http/1.1)\n"
    "\n"
    "Load (the default: -c 64 connections, as fast as each can, 1 s warm-up, 5 s):\n"
    "  -c, --connections N    connections (default 64)\n"
    "  -m, --streams N        HTTP/2: requests in flight per connection (default 1)\n"
    "  -d, --duration S       measure for S seconds (default 5)\n"
    "  -w, --warmup S         run S seconds before measuring (default 1)\n"
    "  -n, --requests N       stop after N responses instead; the time is from the\n"
    "                         first request to the last response (no warm-up)\n"
    "  -r, --rate R           R requests/s in all, on a schedule spread evenly over\n"
    "                         the connections; a request that waits for a free\n"
    "                         connection counts from when it was due\n"
    "  --new-conn             a new connection per request (HTTP/1.1, with\n"
    "                         'Connection: close'): connect, full TLS handshake (no\n"
    "                         session is resumed), request, close; latency includes\n"
    "                         connect and handshake\n"
    "  --idle                 open -c connections, at most --concurrency handshakes at\n"
    "                         a time, then hold them: print {\"event\":\"holding\",...}\n"
    "                         once all are up, hold --hold seconds, close, report\n"
    "  --idle-request         with --idle: one request on each connection first\n"
    "  --hold S               with --idle: seconds to hold (default 5)\n"
    "  --concurrency N        with --idle: handshakes under way at once (default 256)\n"
    "  --src FIRST[-LAST]     bind each connection to a source address in that IPv4\n"
    "                         range, round-robin (e.g. 127.0.0.2-127.0.0.9)\n"
    "  -p, --procs P          worker processes, each with its share of connections,\n"
    "                         rate and requests (default 1); a process may hold only\n"
    "                         as many descriptors as RLIMIT_NOFILE allows (raised to\n"
    "                         its hard limit)\n"
    "  --max-time S           give up after S seconds (default: warm-up + duration\n"
    "                         + 30, or 600 with -n or --idle)\n"
    "  -q, --quiet            no summary on stderr\n"
    "\n"
    "Notification channels (--notify; one process, steered by lines on stdin):\n"
    "  --notify               hold -c Server-Sent-Events channels (GET URL with\n"
    "                         'Accept: text/event-stream', HTTP/1.1, TLS), each with\n"
    "                         its own client certificate; stamp every event's arrival\n"
    "                         (CLOCK_REALTIME ns) by its id; a channel that ends is\n"
    "                         lost, never dialled again on its own. Prints\n"
    "                         {\"event\":\"up\",...} once every channel is up or failed,\n"
    "                         then answers commands on stdin, one JSON line each:\n"
    "                         'dump FILE' (per event: KEY COUNT FIRST LAST T1 T2 ...,\n"
    "                         then forgets them), 'mark' (each channel keeps its last\n"
    "                         event id), 'replay M' (M marked channels close and dial\n"
    "                         again with Last-Event-ID: <mark>), 'replay-stats',\n"
    "                         'stats', 'quit' (or the end of stdin)\n"
    "  --mint-ca FILE         mint a certificate per channel (CN bench-device-<n>, one\n"
    "  --mint-ca-key FILE     shared P-256 key, valid from an hour ago) from this CA\n"
    "  --cert-dir DIR         or read DIR/device<n+1>.crt and .key per channel\n"
    "  --device-offset K      the first channel is device K (default 0)\n"
    "  --ids-out FILE         write each channel's device id (cert:<SHA-256>), a line each\n"
    "  --bind LIST            source addresses, round-robin: A[-B][,C[-D]...]\n"
    "  --connect-rate R       dial at most R channels per second (default: no limit\n"
    "                         but --concurrency)\n"
    "  --path P               request P instead of the URL's path\n"
    "  --last-event-id ID     send 'Last-Event-ID: ID' on every first dial\n"
    "  --key-data             know an event by its first data line, not its id\n"
    "  -h, --help             this text\n"
    "\n"
    "Output: requests and rps count responses that completed in the window; status\n"
    "counts by class; errors are failed connections or requests; latency (us) is\n"
    "from sending the request (or when it was due, or the connect with --new-conn)\n"
    "to the last byte of the response, in a log-linear histogram within 0.1 %;\n"
    "bytes_in/out are response/request body bytes, MB = 10^6 bytes; cpu_s is the\n"
    "workers' user + system CPU time.\n"
    "\n"
    "Exit status: 0 when responses (with --idle: connections) got through, 1 when\n"
    "none did, a worker failed or --max-time ran out, 2 for a usage error.\n";

static double parse_double(const char *s, const char *what)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || v < 0) {
        fprintf(stderr, "cmg-load: %s: not a number: '%s'\n", what, s);
        exit(2);
    }
    return v;
}

static uint64_t parse_size(const char *s, const char *what)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    uint64_t mult = 1;

    if (end == s)
        goto bad;
    switch (toupper((unsigned char)*end)) {
    case 0:
        break;
    case 'K':
        mult = 1024;
        end++;
        break;
    case 'M':
        mult = 1024 * 1024;
        end++;
        break;
    case 'G':
        mult = 1024ull * 1024 * 1024;
        end++;
        break;
    default:
        goto bad;
    }
    if (*end)
        goto bad;
    return (uint64_t)v * mult;
bad:
    fprintf(stderr, "cmg-load: %s: not a size: '%s'\n", what, s);
    exit(2);
}

static int resolve(const char *host, const char *port, struct load_opts *o)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0 || !res) {
        fprintf(stderr, "cmg-load: cannot resolve %s:%s: %s\n", host, port, gai_strerror(rc));
        return -1;
    }
    memcpy(&o->addr, res->ai_addr, res->ai_addrlen);
    o->addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* "ADDR:PORT" or "[V6]:PORT" */
static int parse_hostport(const char *s, char *host, size_t hostlen, char *port, size_t portlen)
{
    const char *colon;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (!close || close[1] != ':')
            return -1;
        snprintf(host, hostlen, "%.*s", (int)(close - s - 1), s + 1);
        snprintf(port, portlen, "%s", close + 2);
        return 0;
    }
    colon = strrchr(s, ':');
    if (!colon)
        return -1;
    snprintf(host, hostlen, "%.*s", (int)(colon - s), s);
    snprintf(port, portlen, "%s", colon + 1);
    return 0;
}

static int parse_url(const char *url, const char *connect_to, struct load_opts *o)
{
    const char *p, *slash;
    char hostport[256], port[16];

    if (!strncmp(url, "https://", 8)) {
        o->tls = true;
        p = url + 8;
    } else if (!strncmp(url, "http://", 7)) {
        o->tls = false;
        p = url + 7;
    } else {
        fprintf(stderr, "cmg-load: the URL must start with https:// or http://\n");
        return -1;
    }
    slash = strchr(p, '/');
    snprintf(hostport, sizeof(hostport), "%.*s", (int)(slash ? slash - p : (long)strlen(p)), p);
    snprintf(o->path, sizeof(o->path), "%s", slash ? slash : "/");
    snprintf(o->authority, sizeof(o->authority), "%s", hostport);
    if (parse_hostport(hostport, o->host, sizeof(o->host), port, sizeof(port)) < 0) {
        snprintf(o->host, sizeof(o->host), "%s", hostport[0] == '[' ? hostport + 1 : hostport);
        if (hostport[0] == '[')
            o->host[strcspn(o->host, "]")] = 0;
        snprintf(port, sizeof(port), "%s", o->tls ? "443" : "80");
    }
    if (connect_to) {
        char chost[256], cport[16];
        if (parse_hostport(connect_to, chost, sizeof(chost), cport, sizeof(cport)) < 0) {
            fprintf(stderr, "cmg-load: --connect wants ADDR:PORT\n");
            return -1;
        }
        return resolve(chost, cport, o);
    }
    return resolve(o->host, port, o);
}

static int parse_src(const char *s, struct load_opts *o)
{
    char first[64], *dash;
    struct in_addr a;

    snprintf(first, sizeof(first), "%s", s);
    dash = strchr(first, '-');
    if (dash)
        *dash++ = 0;
    if (inet_pton(AF_INET, first, &a) != 1)
        return -1;
    o->src_first = o->src_last = ntohl(a.s_addr);
    if (dash) {
        if (inet_pton(AF_INET, dash, &a) != 1)
            return -1;
        o->src_last = ntohl(a.s_addr);
    }
    return o->src_last >= o->src_first ? 0 : -1;
}

/* --bind: a comma-separated list of addresses and ranges. */
static int parse_bind(const char *s, struct load_opts *o)
{
    char list[4096], *save = NULL;
    struct load_opts one;

    snprintf(list, sizeof(list), "%s", s);
    for (char *part = strtok_r(list, ",", &save); part; part = strtok_r(NULL, ",", &save)) {
        if (parse_src(part, &one) < 0)
            return -1;
        for (uint32_t a = one.src_first; a <= one.src_last; a++) {
            if (o->nbind == LOAD_MAX_BIND)
                return -1;
            o->bind[o->nbind++] = a;
        }
    }
    return o->nbind ? 0 : -1;
}

/* --notify: one process; its own checks, then notify.c runs it. */
static int notify_main(struct load_opts *o)
{
    if (!o->tls || o->proto != LOAD_H1 || o->procs != 1) {
        fprintf(stderr, "cmg-load: --notify holds HTTP/1.1 channels over TLS (https://), in one "
                        "process (start several for more)\n");
        return 2;
    }
    if (!o->mint_ca != !o->mint_ca_key || (o->mint_ca && o->cert_dir)) {
        fprintf(stderr, "cmg-load: --mint-ca and --mint-ca-key go together, and not with --cert-dir\n");
        return 2;
    }
    if (!o->nbind && o->src_first)
        for (uint32_t a = o->src_first; a <= o->src_last && o->nbind < LOAD_MAX_BIND; a++)
            o->bind[o->nbind++] = a;
    if (o->max_time_s <= 0)
        o->max_time_s = 600;
    signal(SIGPIPE, SIG_IGN);
    return load_notify_run(o);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int read_full(int fd, void *p, size_t n)
{
    char *b = p;
    while (n) {
        ssize_t k = read(fd, b, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

static void merge(struct load_stats *a, const struct load_stats *b)
{
    a->requests += b->requests;
    for (int i = 0; i < 6; i++)
        a->status[i] += b->status[i];
    a->errors += b->errors;
    a->connects += b->connects;
    a->handshakes += b->handshakes;
    a->bytes_in += b->bytes_in;
    a->bytes_out += b->bytes_out;
    a->established += b->established;
    a->dropped += b->dropped;
    if (b->window_s > a->window_s)
        a->window_s = b->window_s;
    if (b->establish_s > a->establish_s)
        a->establish_s = b->establish_s;
    a->cpu_user_s += b->cpu_user_s;
    a->cpu_sys_s += b->cpu_sys_s;
    a->timed_out |= b->timed_out;
    if (!a->first_error[0] && b->first_error[0])
        snprintf(a->first_error, sizeof(a->first_error), "%s", b->first_error);
}

static const char *mode_name(enum load_mode m)
{
    static const char *const names[] = {"keepalive", "rate", "newconn", "idle"};
    return names[m];
}

static void json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            fprintf(f, "\\u%04x", *s);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

static void report(const struct load_opts *o, const struct load_stats *st, const struct load_hist *h)
{
    double win = st->window_s > 0 ? st->window_s : 0;
    double rps = win > 0 ? (double)st->requests / win : 0;
    double in = win > 0 ? (double)st->bytes_in / win / 1e6 : 0;
    double out = win > 0 ? (double)st->bytes_out / win / 1e6 : 0;
    double us[7] = {(double)(h->count ? h->min : 0) / 1e3, load_hist_mean(h) / 1e3,
                    (double)load_hist_percentile(h, 50) / 1e3, (double)load_hist_percentile(h, 90) / 1e3,
                    (double)load_hist_percentile(h, 99) / 1e3, (double)load_hist_percentile(h, 99.9) / 1e3,
                    (double)h->max / 1e3};

    printf("{\"tool\":\"cmg-load\",\"mode\":\"%s\",\"proto\":\"%s\",\"procs\":%u,\"connections\":%u,"
           "\"streams\":%u,\"rate\":%.1f,\"window_s\":%.6f,\"requests\":%llu,\"rps\":%.1f,"
           "\"status_2xx\":%llu,\"status_3xx\":%llu,\"status_4xx\":%llu,\"status_5xx\":%llu,"
           "\"status_other\":%llu,\"errors\":%llu,\"connects\":%llu,\"handshakes\":%llu,"
           "\"handshakes_per_s\":%.1f,\"bytes_in\":%llu,\"bytes_out\":%llu,\"mb_per_s_in\":%.2f,"
           "\"mb_per_s_out\":%.2f,\"lat_us\":{\"min\":%.1f,\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,"
           "\"p99\":%.1f,\"p999\":%.1f,\"max\":%.1f},\"latency_samples\":%llu,\"established\":%llu,"
           "\"dropped\":%llu,\"establish_s\":%.3f,\"cpu_s\":%.3f,\"cpu_user_s\":%.3f,"
           "\"cpu_sys_s\":%.3f,\"timed_out\":%s,\"first_error\":",
           mode_name(o->mode), o->proto == LOAD_H2 ? "h2" : "h1", o->procs, o->connections,
           o->streams, o->rate, win, (unsigned long long)st->requests, rps,
           (unsigned long long)st->status[2], (unsigned long long)st->status[3],
           (unsigned long long)st->status[4], (unsigned long long)st->status[5],
           (unsigned long long)(st->status[0] + st->status[1]), (unsigned long long)st->errors,
           (unsigned long long)st->connects, (unsigned long long)st->handshakes,
           win > 0 ? (double)st->handshakes / win : 0, (unsigned long long)st->bytes_in,
           (unsigned long long)st->bytes_out, in, out, us[0], us[1], us[2], us[3], us[4], us[5],
           us[6], (unsigned long long)h->count, (unsigned long long)st->established,
           (unsigned long long)st->dropped, st->establish_s, st->cpu_user_s + st->cpu_sys_s,
           st->cpu_user_s, st->cpu_sys_s, st->timed_out ? "true" : "false");
    json_string(stdout, st->first_error);
    printf("}\n");
    fflush(stdout);
    if (o->quiet)
        return;
    if (o->mode == LOAD_IDLE)
        fprintf(stderr, "cmg-load: %llu of %u connections established in %.2f s, %llu dropped while held; "
                        "%llu responses; errors %llu; cpu %.2f s\n",
                (unsigned long long)st->established, o->connections, st->establish_s,
                (unsigned long long)st->dropped, (unsigned long long)st->requests,
                (unsigned long long)st->errors, st->cpu_user_s + st->cpu_sys_s);
    else
        fprintf(stderr, "cmg-load: %llu responses in %.2f s = %.0f/s (2xx %llu, errors %llu); "
                        "latency ms p50 %.3f p99 %.3f p99.9 %.3f max %.3f; in %.1f MB/s, out %.1f MB/s; "
                        "cpu %.2f s%s%s\n",
                (unsigned long long)st->requests, win, rps, (unsigned long long)st->status[2],
                (unsigned long long)st->errors, us[2] / 1e3, us[4] / 1e3, us[5] / 1e3, us[6] / 1e3,
                in, out, st->cpu_user_s + st->cpu_sys_s, st->first_error[0] ? "; first error: " : "",
                st->first_error);
}

int main(int argc, char **argv)
{
    enum { O_CONNECT = 256, O_CACERT, O_CERT, O_KEY, O_BEARER, O_BODY, O_H2, O_NEWCONN, O_IDLE,
           O_IDLE_REQ, O_HOLD, O_CONC, O_SRC, O_MAXTIME, O_NOTIFY, O_MINT_CA, O_MINT_KEY,
           O_CERT_DIR, O_DEV_OFF, O_IDS_OUT, O_BIND, O_CONN_RATE, O_PATH, O_LAST_ID, O_KEY_DATA };
    static const struct option opts[] = {
        {"connect", required_argument, NULL, O_CONNECT}, {"cacert", required_argument, NULL, O_CACERT},
        {"cert", required_argument, NULL, O_CERT}, {"key", required_argument, NULL, O_KEY},
        {"bearer", required_argument, NULL, O_BEARER}, {"header", required_argument, NULL, 'H'},
        {"method", required_argument, NULL, 'X'}, {"body-size", required_argument, NULL, O_BODY},
        {"h2", no_argument, NULL, O_H2}, {"connections", required_argument, NULL, 'c'},
        {"streams", required_argument, NULL, 'm'}, {"duration", required_argument, NULL, 'd'},
        {"warmup", required_argument, NULL, 'w'}, {"requests", required_argument, NULL, 'n'},
        {"rate", required_argument, NULL, 'r'}, {"new-conn", no_argument, NULL, O_NEWCONN},
        {"idle", no_argument, NULL, O_IDLE}, {"idle-request", no_argument, NULL, O_IDLE_REQ},
        {"hold", required_argument, NULL, O_HOLD}, {"concurrency", required_argument, NULL, O_CONC},
        {"src", required_argument, NULL, O_SRC}, {"procs", required_argument, NULL, 'p'},
        {"max-time", required_argument, NULL, O_MAXTIME}, {"quiet", no_argument, NULL, 'q'},
        {"notify", no_argument, NULL, O_NOTIFY}, {"mint-ca", required_argument, NULL, O_MINT_CA},
        {"mint-ca-key", required_argument, NULL, O_MINT_KEY},
        {"cert-dir", required_argument, NULL, O_CERT_DIR},
        {"device-offset", required_argument, NULL, O_DEV_OFF},
        {"ids-out", required_argument, NULL, O_IDS_OUT}, {"bind", required_argument, NULL, O_BIND},
        {"connect-rate", required_argument, NULL, O_CONN_RATE},
        {"path", required_argument, NULL, O_PATH},
        {"last-event-id", required_argument, NULL, O_LAST_ID},
        {"key-data", no_argument, NULL, O_KEY_DATA},
        {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    static struct load_opts o;
    static struct load_worker w;
    static struct load_stats total;
    static struct load_hist hist, part;
    const char *connect_to = NULL, *method = NULL, *path = NULL;
    pid_t pids[MAX_PROCS];
    int msg_fd[MAX_PROCS], go_fd[MAX_PROCS];
    uint64_t established = 0;
    int ch, rc = 0;

    o.connections = 64;
    o.streams = 1;
    o.procs = 1;
    o.duration_s = 5;
    o.warmup_s = 1;
    o.hold_s = 5;
    o.concurrency = 256;
    while ((ch = getopt_long(argc, argv, "H:X:c:m:d:w:n:r:p:qh", opts, NULL)) != -1) {
        switch (ch) {
        case O_CONNECT: connect_to = optarg; break;
        case O_CACERT: o.cacert = optarg; break;
        case O_CERT: o.cert = optarg; break;
        case O_KEY: o.key = optarg; break;
        case O_BEARER: o.bearer = optarg; break;
        case 'H':
            if (o.nheaders == LOAD_MAX_HEADERS || !strchr(optarg, ':')) {
                fprintf(stderr, "cmg-load: -H 'Name: value', at most %d\n", LOAD_MAX_HEADERS);
                return 2;
            }
            o.headers[o.nheaders++] = optarg;
            break;
        case 'X': method = optarg; break;
        case O_BODY: o.body_size = parse_size(optarg, "--body-size"); break;
        case O_H2: o.proto = LOAD_H2; break;
        case 'c': o.connections = (unsigned)parse_size(optarg, "-c"); break;
        case 'm': o.streams = (unsigned)parse_size(optarg, "-m"); break;
        case 'd': o.duration_s = parse_double(optarg, "-d"); break;
        case 'w': o.warmup_s = parse_double(optarg, "-w"); break;
        case 'n': o.requests = parse_size(optarg, "-n"); break;
        case 'r':
            o.rate = parse_double(optarg, "-r");
            o.mode = LOAD_RATE;
            break;
        case O_NEWCONN: o.mode = LOAD_NEWCONN; break;
        case O_IDLE: o.mode = LOAD_IDLE; break;
        case O_IDLE_REQ: o.idle_request = true; break;
        case O_HOLD: o.hold_s = parse_double(optarg, "--hold"); break;
        case O_CONC: o.concurrency = (unsigned)parse_size(optarg, "--concurrency"); break;
        case O_SRC:
            if (parse_src(optarg, &o) < 0) {
                fprintf(stderr, "cmg-load: --src FIRST[-LAST], IPv4 addresses\n");
                return 2;
            }
            break;
        case 'p': o.procs = (unsigned)parse_size(optarg, "-p"); break;
        case O_MAXTIME: o.max_time_s = parse_double(optarg, "--max-time"); break;
        case 'q': o.quiet = true; break;
        case O_NOTIFY: o.notify = true; break;
        case O_MINT_CA: o.mint_ca = optarg; break;
        case O_MINT_KEY: o.mint_ca_key = optarg; break;
        case O_CERT_DIR: o.cert_dir = optarg; break;
        case O_DEV_OFF: o.device_offset = (unsigned long)parse_size(optarg, "--device-offset"); break;
        case O_IDS_OUT: o.ids_out = optarg; break;
        case O_BIND:
            if (parse_bind(optarg, &o) < 0) {
                fprintf(stderr, "cmg-load: --bind A[-B][,C[-D]...], IPv4 addresses, at most %d\n",
                        LOAD_MAX_BIND);
                return 2;
            }
            break;
        case O_CONN_RATE: o.connect_rate = parse_double(optarg, "--connect-rate"); break;
        case O_PATH: path = optarg; break;
        case O_LAST_ID: o.last_event_id = optarg; break;
        case O_KEY_DATA: o.key_data = true; break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (optind != argc - 1) {
        fputs(usage, stderr);
        return 2;
    }
    snprintf(o.method, sizeof(o.method), "%s", method ? method : o.body_size ? "POST" : "GET");
    if (o.connections == 0 || o.procs == 0 || o.procs > MAX_PROCS || o.procs > o.connections ||
        o.streams == 0 || o.streams > LOAD_MAX_STREAMS || o.concurrency == 0 ||
        (o.mode == LOAD_RATE && o.rate <= 0)) {
        fprintf(stderr, "cmg-load: need -c >= 1, 1 <= -p <= min(-c, %d), 1 <= -m <= %d, a rate > 0\n",
                MAX_PROCS, LOAD_MAX_STREAMS);
        return 2;
    }
    if (o.mode == LOAD_NEWCONN && o.proto == LOAD_H2) {
        fprintf(stderr, "cmg-load: --new-conn is for HTTP/1.1\n");
        return 2;
    }
    if (o.proto == LOAD_H2)   /* HTTP/2 field names are lower case */
        for (int i = 0; i < o.nheaders; i++)
            for (char *s = (char *)o.headers[i]; *s && *s != ':'; s++)
                *s = (char)tolower((unsigned char)*s);
    if (o.proto == LOAD_H1)
        o.streams = 1;
    if (o.requests && o.procs > o.requests)
        o.procs = (unsigned)o.requests;   /* every worker has at least one request to make */
    if (o.max_time_s <= 0)
        o.max_time_s = o.requests || o.mode == LOAD_IDLE ? 600 : o.warmup_s + o.duration_s + 30;
    if (parse_url(argv[optind], connect_to, &o) < 0)
        return 2;
    if (path)
        snprintf(o.path, sizeof(o.path), "%s", path);
    raise_nofile();
    if (o.notify)
        return notify_main(&o);

    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, SIG_IGN);   /* the workers stop early and report; we collect */
    for (unsigned i = 0; i < o.procs; i++) {
        int mp[2], gp[2];
        if (pipe(mp) < 0 || pipe(gp) < 0) {
            perror("cmg-load: pipe");
            return 1;
        }
        fflush(NULL);
        pids[i] = fork();
        if (pids[i] < 0) {
            perror("cmg-load: fork");
            return 1;
        }
        if (pids[i] == 0) {
            unsigned share = o.connections / o.procs, extra = o.connections % o.procs;
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            for (unsigned j = 0; j < i; j++) {
                close(msg_fd[j]);
                close(go_fd[j]);
            }
            close(mp[0]);
            close(gp[1]);
            signal(SIGINT, SIG_DFL);
            w.o = &o;
            w.index = i;
            w.nconns = share + (i < extra);
            w.conn_base = share * i + (i < extra ? i : extra);
            w.rate = o.rate * w.nconns / o.connections;
            if (o.requests)
                w.quota = o.requests / o.procs + (i < o.requests % o.procs);
            _exit(load_worker_run(&w, mp[1], gp[0]));
        }
        close(mp[1]);
        close(gp[0]);
        msg_fd[i] = mp[0];
        go_fd[i] = gp[1];
    }

    if (o.mode == LOAD_IDLE) {
        /* Everyone up (or given up): say so, let the caller look, then hold. */
        double slowest = 0;
        for (unsigned i = 0; i < o.procs; i++) {
            struct load_stats st;
            int kind = 0;
            if (read_full(msg_fd[i], &kind, sizeof(kind)) < 0 ||
                read_full(msg_fd[i], &st, sizeof(st)) < 0) {
                fprintf(stderr, "cmg-load: worker %u ended early\n", i);
                rc = 1;
                continue;
            }
            established += st.established;
            if (st.establish_s > slowest)
                slowest = st.establish_s;
        }
        printf("{\"event\":\"holding\",\"established\":%llu,\"connections\":%u,\"establish_s\":%.3f}\n",
               (unsigned long long)established, o.connections, slowest);
        fflush(stdout);
        for (unsigned i = 0; i < o.procs; i++)
            if (write(go_fd[i], "g", 1) != 1)
                rc = 1;
    }

    load_hist_reset(&hist);
    memset(&total, 0, sizeof(total));
    for (unsigned i = 0; i < o.procs; i++) {
        struct load_stats st;
        int kind = 0;
        if (read_full(msg_fd[i], &kind, sizeof(kind)) < 0 || read_full(msg_fd[i], &st, sizeof(st)) < 0 ||
            read_full(msg_fd[i], &part, sizeof(part)) < 0) {
            fprintf(stderr, "cmg-load: worker %u ended without a report\n", i);
            rc = 1;
            continue;
        }
        merge(&total, &st);
        load_hist_merge(&hist, &part);
    }
    for (unsigned i = 0; i < o.procs; i++) {
        int status;
        close(go_fd[i]);
        close(msg_fd[i]);
        if (waitpid(pids[i], &status, 0) == pids[i] && (!WIFEXITED(status) || WEXITSTATUS(status)))
            rc = 1;
    }
    report(&o, &total, &hist);
    /* Nothing got through: a benchmark of errors is no figure; say so in the status. */
    if (total.timed_out || (o.mode == LOAD_IDLE ? total.established : total.requests) == 0)
        rc = 1;
    return rc;
}
