/* cmg client analyze: checks the way from a device to the internal service step by step,
 * each PASS, FAIL or SKIP with what was seen and, for a failure, a one-line fix. The
 * network steps (name, TCP, TLS) are those of one request to the gateway's reserved
 * path CMG_ANALYZE_PATH, made with cmg_fetch's trace; the gateway answers it with how it
 * judged that request's credential, whether a mapping covers --path and how many
 * connectors serve it, and its Date; then a request for --path itself tries the whole
 * way to the internal service. */
#include "client/analyze.h"
#include "client/client.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <openssl/crypto.h>
#include <openssl/x509_vfy.h>

#define ANALYZE_PATH "/CCM_Analyze"
#define ANALYZE_BODY_MAX (64 * 1024)     /* the gateway's answer, and what is kept of the
                                            internal service's */
#define ANALYZE_DEFAULT_SKEW 60          /* s, when the gateway does not say its own */
/* Farthest this machine's clock may be from the gateway's for the gateway's certificate to
 * be judged at the gateway's time when it is not valid at ours. */
#define ANALYZE_CLOCK_RETRY_MAX (24 * 3600)

struct analyze_opts {
    const char *gateway, *ca, *cert, *key, *state, *token, *path, *server_name;
    bool json;
    int timeout_ms;
};

/* What the device presents, and where it goes. */
struct analyze_ctx {
    struct analyze_opts o;
    struct cmg_client_state s;
    struct cmg_client_conn conn;
    char ca[PATH_MAX];
    char *auth;                  /* "Authorization: Bearer ...", or NULL */
    const char *path;            /* --path, or the state's prefix + "/" */
    char state_path[600];
    /* This machine's clock is off and the gateway's certificate is not valid at its time:
     * the certificate is judged at the gateway's (its Date), and no token is sent. */
    long long verify_time;
    bool token_withheld;
    struct cmg_analyze_steps steps;
};

static void analyze_usage(FILE *out)
{
    fputs("usage: cmg client analyze --gateway HOST:PORT [--ca FILE]\n"
          "                          [--cert FILE --key FILE | --state DIR | --token TOKEN]\n"
          "                          [--path PATH] [--server-name NAME] [--timeout SECONDS]\n"
          "                          [--json]\n"
          "\n"
          "Checks, in order, what a request of this device needs, each step PASS, FAIL or\n"
          "SKIP with the time it took and, for a failure, a one-line fix:\n"
          "  dns         name resolution of HOST\n"
          "  tcp         a TCP connection to the gateway's device port\n"
          "  tls         TLS version, ALPN, the gateway's chain (--ca), name and expiry\n"
          "  credential  the device's certificate or token as the gateway judged it\n"
          "              (chain to the CTL, EKU, validity, revocation; or the token's\n"
          "              signature, issuer, audience, tenant, expiry, certificate binding)\n"
          "  clock       this machine's clock against the gateway's Date\n"
          "  mapping     a published mapping covering PATH\n"
          "  connector   a connector with a tunnel to this gateway serving PATH's role\n"
          "  service     the internal service's answer to PATH, through the whole way\n"
          "The gateway answers the analyser at its reserved path " ANALYZE_PATH ".\n"
          "\n"
          "options:\n"
          "  --gateway HOST:PORT   the gateway's device port (default: the state's)\n"
          "  --ca FILE             PEM roots for the gateway's certificate (default: the\n"
          "                        state's ca.crt; without state, the system's roots)\n"
          "  --cert FILE           PEM client certificate (chain) of a PKI device\n"
          "  --key FILE            its PEM private key (default: in the --cert file)\n"
          "  --state DIR           a registered device's state directory: its certificate,\n"
          "                        token, CA, gateway and path prefix (the token is not\n"
          "                        renewed)\n"
          "  --token TOKEN         a bearer token (site device token, Entra ID / OIDC)\n"
          "  --path PATH           the request to check (default with --state: the\n"
          "                        state's prefix + '/'); without it, the mapping,\n"
          "                        connector and service steps are skipped\n"
          "  --server-name NAME    the name the gateway's certificate must carry (default:\n"
          "                        the host of the gateway); also sent as SNI and Host\n"
          "  --timeout SECONDS     for connecting and each read or write (default 30)\n"
          "  --json                print a JSON array of steps {name, result, detail, fix,\n"
          "                        ms} instead of text\n"
          "  -h, --help            print this help\n"
          "\n"
          "Exit status: 0 when no step failed (skipped steps are not failures), 1 when\n"
          "one did, 2 bad usage.\n",
          out);
}

static int usage_error(const char *fmt, const char *arg)
{
    fputs("cmg client analyze: ", stderr);
    fprintf(stderr, fmt, arg);
    fputs("\n\n", stderr);
    analyze_usage(stderr);
    return CMG_CLIENT_EXIT_USAGE;
}

static int parse_analyze(int argc, char **argv, struct analyze_opts *o, int *done)
{
    enum { O_GATEWAY, O_CA, O_CERT, O_KEY, O_STATE, O_TOKEN, O_PATH, O_SERVER_NAME, O_TIMEOUT };
    static const char *const names[] = {
        [O_GATEWAY] = "--gateway", [O_CA] = "--ca",       [O_CERT] = "--cert",
        [O_KEY] = "--key",         [O_STATE] = "--state", [O_TOKEN] = "--token",
        [O_PATH] = "--path",       [O_SERVER_NAME] = "--server-name",
        [O_TIMEOUT] = "--timeout"};
    const char *timeout = NULL;
    char host[256];
    int port;

    *done = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        size_t k;
        int r = 0;

        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            analyze_usage(stdout);
            return CMG_CLIENT_EXIT_OK;
        }
        if (!strcmp(a, "--json")) {
            o->json = true;
            continue;
        }
        for (k = 0; k < sizeof(names) / sizeof(names[0]); k++)
            if ((r = cmg_client_opt(argc, argv, &i, names[k], &val)) != 0)
                break;
        if (r < 0)
            return usage_error("option %s needs a value", a);
        if (r == 0)
            return usage_error("unexpected argument '%s'", a);
        switch (k) {
        case O_GATEWAY: o->gateway = val; break;
        case O_CA: o->ca = val; break;
        case O_CERT: o->cert = val; break;
        case O_KEY: o->key = val; break;
        case O_STATE: o->state = val; break;
        case O_TOKEN: o->token = val; break;
        case O_PATH: o->path = val; break;
        case O_SERVER_NAME: o->server_name = val; break;
        default: timeout = val; break;
        }
    }
    if (!o->gateway && !o->state)
        return usage_error("%s", "missing --gateway HOST:PORT");
    if (o->gateway && cmg_fetch_split_addr(o->gateway, 0, host, sizeof(host), &port) < 0)
        return usage_error("--gateway '%s': not HOST:PORT or [IPv6]:PORT", o->gateway);
    if (o->key && !o->cert)
        return usage_error("%s", "--key goes with --cert");
    if (o->cert && o->state)
        return usage_error("%s", "--state and --cert exclude each other");
    if (o->token && !cmg_client_token_ok(o->token))
        return usage_error("%s", "--token: not a token (base64url parts and dots)");
    if (o->path && o->path[0] != '/')
        return usage_error("--path '%s' must start with '/'", o->path);
    if (timeout && cmg_client_parse_timeout(timeout, &o->timeout_ms) < 0)
        return usage_error("--timeout '%s': not a number of seconds", timeout);
    *done = 0;
    return CMG_CLIENT_EXIT_OK;
}

/* The device's credential and where to send it. 0, or -1 with a message printed. */
static int prepare(struct analyze_ctx *c)
{
    const char *token = c->o.token;
    char dir[PATH_MAX];
    size_t n;

    c->conn.gateway = c->o.gateway;
    c->conn.server_name = c->o.server_name;
    c->conn.ca_file = c->o.ca;
    c->conn.cert_file = c->o.cert;
    c->conn.key_file = c->o.key;
    c->conn.timeout_ms = c->o.timeout_ms;
    c->path = c->o.path;
    if (c->o.state) {
        if (cmg_client_state_dir(c->o.state, dir, sizeof(dir)) < 0 ||
            cmg_client_state_load(dir, &c->s) < 0 ||
            cmg_client_state_load_identity(dir, &c->conn.key, &c->conn.cert) < 0 ||
            cmg_client_state_path(dir, "ca.crt", c->ca, sizeof(c->ca)) < 0)
            return -1;
        if (!c->conn.gateway)
            c->conn.gateway = c->s.gateway;
        if (!c->conn.server_name)
            c->conn.server_name = cmg_client_stored_server_name(c->o.gateway, &c->s);
        if (!c->conn.ca_file)
            c->conn.ca_file = c->ca;
        if (!token)
            token = c->s.token;
        if (!c->path && c->s.prefix) {
            snprintf(c->state_path, sizeof(c->state_path), "%s/", c->s.prefix);
            c->path = c->state_path;
        }
    }
    if (token) {
        n = strlen(token) + 32;
        c->auth = malloc(n);
        if (!c->auth) {
            fputs("cmg client: out of memory\n", stderr);
            return -1;
        }
        snprintf(c->auth, n, "Authorization: Bearer %s", token);
    }
    return 0;
}

/* The fetch request for target with the device's credential. */
static void request_for(const struct analyze_ctx *c, const char *target,
                        struct cmg_fetch_req *req)
{
    memset(req, 0, sizeof(*req));
    req->addr = c->conn.gateway;
    req->target = target;
    req->tls = true;
    req->server_name = c->conn.server_name;
    req->ca_file = c->conn.ca_file;
    req->cert_file = c->conn.cert_file;
    req->key_file = c->conn.key_file;
    req->cert = c->conn.cert;
    req->key = c->conn.key;
    if (c->auth && !c->token_withheld) {
        req->headers = (const char *const *)&c->auth;
        req->n_headers = 1;
    }
    req->verify_time = c->verify_time;
    req->timeout_ms = c->conn.timeout_ms;
    req->max_body = ANALYZE_BODY_MAX;
    req->truncate_body = true;
    req->alpn = "http/1.1";
}

/* CMG_ANALYZE_PATH?path=<PATH, percent-encoded> into a new string (NULL: no memory). */
static char *analyze_target(const char *path)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = path ? strlen(path) : 0, o = 0;
    char *t = malloc(sizeof(ANALYZE_PATH) + 6 + 3 * n);

    if (!t)
        return NULL;
    o = (size_t)sprintf(t, "%s%s", ANALYZE_PATH, path ? "?path=" : "");
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)path[i];

        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
            strchr("-._~/", ch)) {
            t[o++] = (char)ch;
        } else {
            t[o++] = '%';
            t[o++] = hex[ch >> 4];
            t[o++] = hex[ch & 15];
        }
    }
    t[o] = 0;
    return t;
}

/* ---- judging the answers ---- */

static const char *tls_fix(long verify)
{
    switch (verify) {
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
        return "give --ca the CA certificate that issued the gateway's server certificate "
               "(the ca.crt that 'cmg site init' wrote)";
    case X509_V_ERR_HOSTNAME_MISMATCH:
    case X509_V_ERR_IP_ADDRESS_MISMATCH:
        return "use the name in the gateway's certificate: --server-name NAME (the site's "
               "service name), or a HOST the certificate names";
    case X509_V_ERR_CERT_HAS_EXPIRED:
        return "renew the gateway's server certificate (cmg site cert renew) and reload the "
               "gateway (SIGHUP)";
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return "check this machine's clock (NTP), or the gateway certificate's start date";
    default:
        return "check the gateway's TLS certificate and this device's --ca";
    }
}

/* The one-line fix for a refusal's reason token. */
static const char *credential_fix(const char *reason)
{
    static const struct {
        const char *reason, *fix;
    } fixes[] = {
        {"CMGService_Client_Certificate_Revoked",
         "the device certificate is revoked: issue the device a new one"},
        {"CMGService_CRL_Unavailable",
         "the gateway cannot use the site's CRL: publish a fresh one (cmg site) and check the "
         "connectors carry the policy"},
        {"CMGService_Invalid_Client_Certificate",
         "give the device a certificate (--cert/--key) issued under the site's trusted CAs, "
         "valid now, with the clientAuth usage"},
        {"CMGService_Token_Expired",
         "get a fresh token (cmg client renew, or from the identity provider); check this "
         "machine's clock"},
        {"CMGService_Token_Blocked", "the token was revoked on the site: get a new one"},
        {"CMGService_Device_Blocked", "the device is blocked on the site (cmg site device)"},
        {"CMGService_Wrong_Audience",
         "request the token for an audience the site accepts (its OIDC audiences)"},
        {"CMGService_Wrong_Tenant", "use a token of the site's tenant"},
        {"CMGService_Token_Certificate_Mismatch",
         "send the token with the certificate it was issued for (the state directory's "
         "device.crt)"},
        {"CMGService_Auth_Mode_Not_Allowed",
         "use the credential the mapping allows (a client certificate on "
         "/CCM_Proxy_MutualAuth/, a token on /CCM_Proxy_ServerAuth/)"},
        {"CMGService_Bulk_Token_Registration_Only",
         "register first (cmg client register), then use the device token"},
        {"CMGService_Client_Certificate_Required",
         "present the device certificate together with the token"},
    };

    for (size_t i = 0; i < sizeof(fixes) / sizeof(fixes[0]); i++)
        if (reason && !strcmp(reason, fixes[i].reason))
            return fixes[i].fix;
    return "give a token the gateway accepts: issued by the site or the policy's OIDC "
           "issuer, signed with a key of the policy, not expired";
}

static const char *json_str(const cJSON *o, const char *name)
{
    const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, name));
    return s ? s : "";
}

static bool has_credential(const struct analyze_ctx *c)
{
    return c->auth || c->conn.cert || c->conn.cert_file;
}

/* A token judged without a path (any mapping that takes tokens). */
static void judge_token(struct analyze_ctx *c, const cJSON *tok, long long ms)
{
    const char *reason = json_str(tok, "reason");

    if (!tok && c->path)
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_SKIP, ms, NULL,
                         "a token is judged for a mapped path: %s is not (see mapping)", c->path);
    else if (!tok)
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_SKIP, ms, NULL,
                         "a token is judged for a mapped path: give --path");
    else if (!strcmp(json_str(tok, "result"), "pass"))
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_PASS, ms, NULL,
                         "token accepted as %s", json_str(tok, "method"));
    else
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_FAIL, ms, credential_fix(reason),
                         "token refused: %s (%s)", reason,
                         *json_str(tok, "check") ? json_str(tok, "check") : "no detail");
}

static void judge_credential(struct analyze_ctx *c, const cJSON *doc, long long ms)
{
    const cJSON *cred = cJSON_GetObjectItemCaseSensitive(doc, "credential");
    const cJSON *cert = cJSON_GetObjectItemCaseSensitive(doc, "certificate");
    const char *result, *reason;

    if (!has_credential(c)) {
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_SKIP, ms, NULL,
                         "no credential given (--cert/--key, --state or --token)");
        return;
    }
    if (c->token_withheld) {
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_SKIP, ms, NULL,
                         "the token was not sent: the gateway's certificate is valid only by "
                         "the gateway's clock (see clock)");
        return;
    }
    if (cred) {
        result = json_str(cred, "result");
        reason = json_str(cred, "reason");
        if (!strcmp(result, "pass"))
            cmg_analyze_step(&c->steps, "credential", CMG_STEP_PASS, ms, NULL,
                             "accepted for %s as %s", c->path, json_str(cred, "method"));
        else
            cmg_analyze_step(&c->steps, "credential", CMG_STEP_FAIL, ms, credential_fix(reason),
                             "refused for %s: %s (%s)", c->path, reason,
                             *json_str(cred, "check") ? json_str(cred, "check") : "no detail");
        return;
    }
    if (c->auth) {
        judge_token(c, cJSON_GetObjectItemCaseSensitive(doc, "token"), ms);
        return;
    }
    if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cert, "presented")))
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_FAIL, ms,
                         "check that --cert and --key are the device's certificate and key",
                         "the gateway received no client certificate");
    else if (!strcmp(json_str(cert, "result"), "pass"))
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_PASS, ms, NULL,
                         "certificate %s accepted (chain to the CTL, usage, validity, "
                         "revocation)", json_str(cert, "subject"));
    else
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_FAIL, ms,
                         credential_fix(json_str(cert, "reason")),
                         "certificate %s refused: %s (%s)", json_str(cert, "subject"),
                         json_str(cert, "reason"), json_str(cert, "check"));
}

/* The Date field of a response head, as unix seconds; -1 if absent or unreadable. */
static long long head_date(const char *head)
{
    const char *p = head;
    struct tm tm;

    while (p && (p = strchr(p, '\n'))) {
        p++;
        if (!strncasecmp(p, "Date:", 5)) {
            p += 5;
            while (*p == ' ')
                p++;
            memset(&tm, 0, sizeof(tm));
            if (!strptime(p, "%a, %d %b %Y %H:%M:%S GMT", &tm))
                return -1;
            return (long long)timegm(&tm);
        }
    }
    return -1;
}

static void judge_clock(struct analyze_ctx *c, const struct cmg_fetch_resp *resp,
                        const cJSON *doc, long long local)
{
    long long date = head_date(resp->head), skew, allowed;
    const cJSON *cs = cJSON_GetObjectItemCaseSensitive(doc, "clock_skew");

    if (date < 0) {
        cmg_analyze_step(&c->steps, "clock", CMG_STEP_SKIP, 0, NULL,
                         "the gateway's answer has no Date");
        return;
    }
    /* what the gateway says is bounded: it is a number from the network */
    allowed = cJSON_IsNumber(cs) && cs->valuedouble > 0 && cs->valuedouble <= 86400
                  ? (long long)cs->valuedouble
                  : ANALYZE_DEFAULT_SKEW;
    skew = local - date;
    if (skew <= allowed && skew >= -allowed)
        cmg_analyze_step(&c->steps, "clock", CMG_STEP_PASS, 0, NULL,
                         "%lld s from the gateway's clock (at most %lld s allowed)", skew,
                         allowed);
    else
        cmg_analyze_step(&c->steps, "clock", CMG_STEP_FAIL, 0,
                         "set this machine's clock (NTP); tokens and certificates are judged "
                         "by the gateway's",
                         "this machine's clock is %lld s %s the gateway's (at most %lld s "
                         "allowed)", skew < 0 ? -skew : skew, skew < 0 ? "behind" : "ahead of",
                         allowed);
}

/* mapping and connector; true if the service can be tried. */
static bool judge_route(struct analyze_ctx *c, const cJSON *doc)
{
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(doc, "mapping");
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(doc, "connectors");
    const char *role = json_str(map, "role");

    if (!c->path) {
        cmg_analyze_step(&c->steps, "mapping", CMG_STEP_SKIP, 0, NULL, "no --path given");
        cmg_analyze_step(&c->steps, "connector", CMG_STEP_SKIP, 0, NULL, "no --path given");
        cmg_analyze_step(&c->steps, "service", CMG_STEP_SKIP, 0, NULL, "no --path given");
        return false;
    }
    if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(map, "found"))) {
        cmg_analyze_step(&c->steps, "mapping", CMG_STEP_FAIL, 0,
                         "publish a mapping for the path's role on the site (cmg site mapping "
                         "add), or correct --path",
                         "%s: %s (%s)", c->path, *json_str(map, "reason") ? json_str(map, "reason")
                                                                        : "no answer",
                         json_str(map, "check"));
        cmg_analyze_step(&c->steps, "connector", CMG_STEP_SKIP, 0, NULL, "no mapping");
        return false;
    }
    cmg_analyze_step(&c->steps, "mapping", CMG_STEP_PASS, 0, NULL,
                     "%s: role %s (%s, %s authentication)", c->path, role,
                     json_str(map, "type"), json_str(map, "auth"));
    if (!n) {   /* told only to a credential the mapping takes */
        cmg_analyze_step(&c->steps, "connector", CMG_STEP_SKIP, 0, NULL,
                         "the gateway tells connectors only to a credential it accepts");
        return false;
    }
    if (!cJSON_IsNumber(n) || !(n->valuedouble >= 1 && n->valuedouble < 1e6)) {
        cmg_analyze_step(&c->steps, "connector", CMG_STEP_FAIL, 0,
                         "start a connector serving this role with a tunnel to this gateway "
                         "instance ('cmg connector analyze -c connector.conf' checks it)",
                         "no connector with a tunnel to this gateway serves role %s", role);
        return false;
    }
    cmg_analyze_step(&c->steps, "connector", CMG_STEP_PASS, 0, NULL,
                     "%d tunnel(s) to this gateway serve role %s", (int)n->valuedouble, role);
    return true;
}

static bool credential_passed(const struct cmg_analyze_steps *s)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->v[i].name, "credential"))
            return s->v[i].result == CMG_STEP_PASS;
    return false;
}

/* The internal service's answer to --path, through the gateway and a connector. */
static void judge_service(struct analyze_ctx *c)
{
    struct cmg_fetch_req req;
    struct cmg_fetch_resp resp;
    struct cmg_fetch_trace tr;
    char err[768], reason[256];
    int rc;

    request_for(c, c->path, &req);
    req.trace = &tr;
    rc = cmg_fetch(&req, &resp, err, sizeof(err));
    reason[0] = 0;
    if (rc == CMG_FETCH_OK && resp.status >= 400)
        cmg_client_reason(&resp, reason, sizeof(reason));
    if (rc != CMG_FETCH_OK)
        cmg_analyze_step(&c->steps, "service", CMG_STEP_FAIL,
                         tr.resolve_ms + tr.connect_ms + tr.tls_ms + tr.exchange_ms,
                         "see the gateway's log for this request", "%s", err);
    else if (resp.status == 502 || resp.status == 503 || resp.status == 504)
        cmg_analyze_step(&c->steps, "service", CMG_STEP_FAIL, tr.exchange_ms,
                         !strncmp(reason, "CMGConnector_Upstream", 21)
                             ? "start the internal service, or correct the connector's route "
                               "to it ('cmg connector analyze -c connector.conf' checks it)"
                             : "see the gateway's and the connector's logs for this request",
                         "GET %s: %d %s", c->path, resp.status, reason);
    else if (!credential_passed(&c->steps) && !strncmp(reason, "CMGService_", 11))
        /* the gateway refused a credential it was not asked about: not the service's answer */
        cmg_analyze_step(&c->steps, "service", CMG_STEP_FAIL, tr.exchange_ms,
                         credential_fix(reason), "GET %s: the gateway refused it: %d %s",
                         c->path, resp.status, reason);
    else
        cmg_analyze_step(&c->steps, "service", CMG_STEP_PASS, tr.exchange_ms, NULL,
                         "GET %s: the internal service answered %d", c->path, resp.status);
    cmg_fetch_resp_free(&resp);
}

/* The network steps of the analysis request; true if it got an answer. */
static bool judge_network(struct analyze_ctx *c, const struct cmg_fetch_trace *tr, int rc,
                          const char *err)
{
    char until[64];
    bool expired;

    if (tr->stage == CMG_FETCH_STAGE_SETUP) {
        cmg_analyze_step(&c->steps, "dns", CMG_STEP_SKIP, 0, NULL, "not tried");
        cmg_analyze_step(&c->steps, "tcp", CMG_STEP_SKIP, 0, NULL, "not tried");
        cmg_analyze_step(&c->steps, "tls", CMG_STEP_FAIL, 0,
                         "check the --ca, --cert and --key files (PEM, readable)", "%s", err);
        return false;
    }
    if (tr->stage == CMG_FETCH_STAGE_RESOLVE) {
        cmg_analyze_step(&c->steps, "dns", CMG_STEP_FAIL, tr->resolve_ms,
                         "check the gateway's name in DNS (or /etc/hosts), or give --gateway "
                         "an address with --server-name NAME", "%s", err);
        return false;
    }
    cmg_analyze_step(&c->steps, "dns", CMG_STEP_PASS, tr->resolve_ms, NULL, "%s resolved",
                     c->conn.gateway);
    if (tr->stage == CMG_FETCH_STAGE_CONNECT) {
        cmg_analyze_step(&c->steps, "tcp", CMG_STEP_FAIL, tr->connect_ms,
                         "check that the gateway runs and listens on this port, and that no "
                         "firewall drops the connection", "%s", err);
        return false;
    }
    cmg_analyze_step(&c->steps, "tcp", CMG_STEP_PASS, tr->connect_ms, NULL, "connected to %s",
                     tr->address);
    if (tr->stage == CMG_FETCH_STAGE_TLS) {
        cmg_analyze_step(&c->steps, "tls", CMG_STEP_FAIL, tr->tls_ms, tls_fix(tr->verify_result),
                         "%s", err);
        return false;
    }
    cmg_client_iso_time(tr->peer_not_after, until, sizeof(until));
    expired = tr->peer_not_after &&
              tr->peer_not_after < (c->verify_time ? c->verify_time : (long long)time(NULL));
    cmg_analyze_step(&c->steps, "tls", expired ? CMG_STEP_FAIL : CMG_STEP_PASS, tr->tls_ms,
                     expired ? tls_fix(X509_V_ERR_CERT_HAS_EXPIRED) : NULL,
                     "%s, ALPN %s, certificate %s verified for %s, valid until %s%s",
                     tr->tls_version, tr->alpn[0] ? tr->alpn : "(none)", tr->peer_subject,
                     c->conn.server_name ? c->conn.server_name : c->conn.gateway, until,
                     c->verify_time ? " (by the gateway's clock: this machine's is off)" : "");
    if (rc != CMG_FETCH_OK) {
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_FAIL, tr->exchange_ms,
                         has_credential(c) ? "the gateway closed the connection: check the "
                                             "device certificate (--cert/--key)"
                                           : "see the gateway's log",
                         "%s", err);
        return false;
    }
    return !expired;
}

static void skip_rest(struct analyze_ctx *c)
{
    static const char *const names[] = {"dns", "tcp", "tls", "credential", "clock",
                                        "mapping", "connector", "service"};

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!cmg_analyze_has(&c->steps, names[i]))
            cmg_analyze_step(&c->steps, names[i], CMG_STEP_SKIP, 0, NULL,
                             "an earlier step failed");
}

/* The gateway's clock: the Date of its answer to a request that carries nothing secret,
 * on a connection whose certificate is not verified; -1 if none. */
static long long gateway_time(const struct analyze_ctx *c)
{
    struct cmg_fetch_req req;
    struct cmg_fetch_resp resp;
    char err[768];
    long long date = -1;

    memset(&req, 0, sizeof(req));
    req.addr = c->conn.gateway;
    req.target = ANALYZE_PATH;
    req.tls = true;
    req.server_name = c->conn.server_name;
    req.no_verify = true;
    req.timeout_ms = c->conn.timeout_ms;
    req.max_body = ANALYZE_BODY_MAX;
    req.truncate_body = true;
    if (cmg_fetch(&req, &resp, err, sizeof(err)) == CMG_FETCH_OK && resp.head)
        date = head_date(resp.head);
    cmg_fetch_resp_free(&resp);
    return date;
}

/* The gateway's certificate failed only for its validity period: if this machine's clock is
 * what is off, the certificate is judged again by the gateway's clock (and the clock step
 * says so), so that the failing step is the clock, not TLS. true if it is worth a retry. */
static bool clock_retry(struct analyze_ctx *c, const struct cmg_fetch_trace *tr)
{
    long long gw, skew;

    if (tr->stage != CMG_FETCH_STAGE_TLS || c->verify_time ||
        (tr->verify_result != X509_V_ERR_CERT_NOT_YET_VALID &&
         tr->verify_result != X509_V_ERR_CERT_HAS_EXPIRED))
        return false;
    gw = gateway_time(c);
    skew = (long long)time(NULL) - gw;
    if (gw <= 0 || skew > ANALYZE_CLOCK_RETRY_MAX || skew < -ANALYZE_CLOCK_RETRY_MAX ||
        (skew <= ANALYZE_DEFAULT_SKEW && skew >= -ANALYZE_DEFAULT_SKEW))
        return false;
    c->verify_time = gw;
    c->token_withheld = c->auth != NULL;
    return true;
}

static void analyze(struct analyze_ctx *c)
{
    struct cmg_fetch_req req;
    struct cmg_fetch_resp resp;
    struct cmg_fetch_trace tr;
    char err[768], *target = analyze_target(c->path);
    cJSON *doc = NULL;
    int rc;

    if (!target) {
        cmg_analyze_step(&c->steps, "dns", CMG_STEP_FAIL, 0, NULL, "out of memory");
        return;
    }
    request_for(c, target, &req);
    req.trace = &tr;
    rc = cmg_fetch(&req, &resp, err, sizeof(err));
    if (clock_retry(c, &tr)) {
        cmg_fetch_resp_free(&resp);
        request_for(c, target, &req);
        req.trace = &tr;
        rc = cmg_fetch(&req, &resp, err, sizeof(err));
    }
    if (!judge_network(c, &tr, rc, err))
        goto out;
    if (resp.status != 200 ||
        !(doc = cJSON_ParseWithLength(resp.body ? resp.body : "", resp.body_len))) {
        char reason[256];

        cmg_client_reason(&resp, reason, sizeof(reason));
        cmg_analyze_step(&c->steps, "credential", CMG_STEP_FAIL, tr.exchange_ms,
                         "run a gateway that answers the analyser (" ANALYZE_PATH ")",
                         "GET " ANALYZE_PATH ": %d %s", resp.status, reason);
        goto out;
    }
    judge_credential(c, doc, tr.exchange_ms);
    judge_clock(c, &resp, doc, (long long)time(NULL));
    if (judge_route(c, doc) && !cmg_analyze_failed(&c->steps))
        judge_service(c);
out:
    skip_rest(c);
    cJSON_Delete(doc);
    cmg_fetch_resp_free(&resp);
    free(target);
}

int cmg_client_analyze_main(int argc, char **argv)
{
    struct analyze_ctx c;
    int done, ret;

    memset(&c, 0, sizeof(c));
    ret = parse_analyze(argc, argv, &c.o, &done);
    if (done)
        return ret;
    if (prepare(&c) < 0) {
        ret = CMG_CLIENT_EXIT_FAIL;
        goto out;
    }
    analyze(&c);
    cmg_analyze_print(&c.steps, c.o.json, stdout);
    ret = cmg_analyze_failed(&c.steps) ? CMG_CLIENT_EXIT_FAIL : CMG_CLIENT_EXIT_OK;
out:
    if (c.auth) {
        OPENSSL_cleanse(c.auth, strlen(c.auth));
        free(c.auth);
    }
    EVP_PKEY_free(c.conn.key);
    X509_free(c.conn.cert);
    cmg_client_state_free(&c.s);
    cmg_analyze_steps_free(&c.steps);
    return ret;
}
