/* cmg client register / renew: the device's key and self-signed certificate, a bulk
 * registration token for the first device token, the current token for the next ones.
 *
 *   POST <prefix>/register   Authorization: Bearer <bulk token>    {"name": "<device>"}
 *   POST <prefix>/renew      Authorization: Bearer <device token>  {}
 *   200 {"device_id","token","expires","renew_after"}
 *
 * both over mutual TLS with the device certificate, to which the device token is bound. */
#include "client/client.h"

#include "auth/b64url.h"
#include "site/pki.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>

#define REG_ANSWER_MAX (64 * 1024)
#define REG_CA_MAX (1024 * 1024)
#define REG_PREFIX_MAX 1024
#define REG_NAME_MAX 64       /* a certificate's CN */
#define REG_ID_MAX 256

struct reg_opts {
    const char *gateway, *ca, *bulk_token, *state, *server_name, *name, *prefix;
    int timeout_ms;
};

static void register_usage(FILE *out)
{
    fputs("usage: cmg client register --gateway HOST:PORT --ca FILE --bulk-token TOKEN\n"
          "                           [--state DIR] [--server-name NAME] [--name DEVICE]\n"
          "                           [--prefix /CCM_Proxy_ServerAuth/ROLE]\n"
          "                           [--timeout SECONDS]\n"
          "\n"
          "Registers this device with a bulk registration token. The first time, creates\n"
          "in the state directory (mode 0700) the device key (device.key, P-256, mode\n"
          "0600) and a self-signed client certificate (device.crt, CN = the device name,\n"
          "10 years); later runs reuse them. Then sends POST <prefix>/register to the\n"
          "gateway over mutual TLS with that certificate; on success, copies the CA file\n"
          "to ca.crt and writes the device token to device.json (mode 0600), and prints\n"
          "the device id and when the token expires. 'cmg client get' renews the token\n"
          "when it is due.\n"
          "\n"
          "options:\n"
          "  --gateway HOST:PORT  the gateway's device port ([IPv6]:PORT for IPv6)\n"
          "  --ca FILE            PEM roots the gateway's server certificate chains to\n"
          "  --bulk-token TOKEN   the bulk registration token (a JWT from the site admin);\n"
          "                       @FILE reads it from FILE, - from standard input (so it\n"
          "                       stays out of the shell history)\n"
          "  --state DIR          the state directory (default: $" CMG_CLIENT_STATE_ENV ",\n"
          "                       else the last registered one, else\n"
          "                       ~/.config/opencmg/client); recorded in\n"
          "                       ~/.config/opencmg/client-state for later commands\n"
          "  --server-name NAME   the name the gateway's certificate must carry (default:\n"
          "                       the host of --gateway); also sent as SNI and Host\n"
          "  --name DEVICE        the device name (default: the host name)\n"
          "  --prefix PREFIX      the registration prefix (default: the token's cmg_reg\n"
          "                       claim, e.g. /CCM_Proxy_ServerAuth/SITE_ab12cd)\n"
          "  --timeout SECONDS    for connecting and each read or write (default 30)\n"
          "  -h, --help           print this help\n"
          "\n"
          "Exit status: 0 registered, 1 refused (the reason is printed) or a local\n"
          "problem, 2 bad usage, 3 no connection (network, TLS, timeout).\n",
          out);
}

static void renew_usage(FILE *out)
{
    fputs("usage: cmg client renew [--state DIR] [--timeout SECONDS]\n"
          "\n"
          "Renews the device token now (POST <prefix>/renew with the current token, over\n"
          "mutual TLS with the device certificate) and saves the new one in device.json.\n"
          "'cmg client get' does this by itself once the token is due for renewal.\n"
          "\n"
          "options:\n"
          "  --state DIR          the state directory (default: $" CMG_CLIENT_STATE_ENV ",\n"
          "                       else the last registered one, else\n"
          "                       ~/.config/opencmg/client)\n"
          "  --timeout SECONDS    for connecting and each read or write (default 30)\n"
          "  -h, --help           print this help\n"
          "\n"
          "Exit status: 0 renewed, 1 refused or a local problem, 2 bad usage,\n"
          "3 no connection (network, TLS, timeout).\n",
          out);
}

static int usage_error(void (*usage)(FILE *), const char *cmd, const char *fmt, const char *arg)
{
    fprintf(stderr, "cmg client %s: ", cmd);
    fprintf(stderr, fmt, arg);
    fputs("\n\n", stderr);
    usage(stderr);
    return CMG_CLIENT_EXIT_USAGE;
}

/* ---- the token exchange, shared by register and renew ---- */

static int printable_ok(const char *s, size_t max)
{
    size_t n = strlen(s);

    if (n == 0 || n > max)
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] >= 0x7f)
            return 0;
    return 1;
}

/* POSTs body to <s->prefix>/<endpoint> with bearer; on 200 sets s's device_id, token,
 * expires and renew_after. Returns an exit status; msg says why on failure. */
static int token_exchange(const struct cmg_client_conn *conn, struct cmg_client_state *s,
                          const char *endpoint, const char *what, const char *bearer,
                          const char *body, char *msg, size_t msglen)
{
    struct cmg_fetch_req req;
    struct cmg_fetch_resp resp;
    char target[REG_PREFIX_MAX + 32], *auth = NULL, reason[256], err[512];
    const char *headers[2];
    cJSON *root = NULL;
    const cJSON *id, *tok, *exp, *ra;
    size_t alen = strlen(bearer) + 32;
    int64_t now = (int64_t)time(NULL);
    int rc, ret = CMG_CLIENT_EXIT_FAIL;

    memset(&req, 0, sizeof(req));
    memset(&resp, 0, sizeof(resp));
    snprintf(target, sizeof(target), "%s/%s", s->prefix, endpoint);
    auth = malloc(alen);
    if (!auth) {
        snprintf(msg, msglen, "%s: out of memory", what);
        goto out;
    }
    snprintf(auth, alen, "Authorization: Bearer %s", bearer);
    headers[0] = auth;
    headers[1] = "Content-Type: application/json";
    req.addr = conn->gateway;
    req.target = target;
    req.tls = true;
    req.method = "POST";
    req.server_name = conn->server_name;
    req.ca_file = conn->ca_file;
    req.key = conn->key;
    req.cert = conn->cert;
    req.cert_file = conn->cert_file;
    req.key_file = conn->key_file;
    req.headers = headers;
    req.n_headers = 2;
    req.body = body;
    req.body_len = strlen(body);
    req.timeout_ms = conn->timeout_ms;
    req.max_body = REG_ANSWER_MAX;
    req.truncate_body = true;
    rc = cmg_fetch(&req, &resp, err, sizeof(err));
    if (rc != CMG_FETCH_OK) {
        snprintf(msg, msglen, "%s", err);
        ret = cmg_client_fetch_exit(rc);
        goto out;
    }
    if (resp.status != 200) {
        cmg_client_reason(&resp, reason, sizeof(reason));
        snprintf(msg, msglen, "%s refused: %d %s", what, resp.status, reason);
        goto out;
    }
    root = resp.truncated ? NULL : cJSON_ParseWithLength(resp.body ? resp.body : "", resp.body_len);
    id = cJSON_GetObjectItemCaseSensitive(root, "device_id");
    tok = cJSON_GetObjectItemCaseSensitive(root, "token");
    exp = cJSON_GetObjectItemCaseSensitive(root, "expires");
    ra = cJSON_GetObjectItemCaseSensitive(root, "renew_after");
    if (!cJSON_IsString(id) || !printable_ok(id->valuestring, REG_ID_MAX) ||
        !cJSON_IsString(tok) || !cmg_client_token_ok(tok->valuestring) ||
        !cJSON_IsNumber(exp) || exp->valuedouble <= 0 || exp->valuedouble > 1e15) {
        snprintf(msg, msglen, "%s: the gateway's answer is not a device token (expected JSON "
                              "with device_id, token, expires)", what);
        ret = CMG_CLIENT_EXIT_NET;
        goto out;
    }
    free(s->device_id);
    if (s->token) {
        OPENSSL_cleanse(s->token, strlen(s->token));
        free(s->token);
    }
    s->device_id = strdup(id->valuestring);
    s->token = strdup(tok->valuestring);
    s->expires = (int64_t)exp->valuedouble;
    /* Without a renew_after, renew half way through the remaining lifetime. */
    s->renew_after = cJSON_IsNumber(ra) && ra->valuedouble > 0 && ra->valuedouble < 1e15
                         ? (int64_t)ra->valuedouble
                         : now + (s->expires - now) / 2;
    if (!s->device_id || !s->token) {
        snprintf(msg, msglen, "%s: out of memory", what);
        goto out;
    }
    ret = CMG_CLIENT_EXIT_OK;
out:
    if (root) {
        /* The answer held the token. */
        cJSON_Delete(root);
    }
    if (resp.body)
        OPENSSL_cleanse(resp.body, resp.body_len);
    cmg_fetch_resp_free(&resp);
    if (auth) {
        OPENSSL_cleanse(auth, strlen(auth));
        free(auth);
    }
    return ret;
}

int cmg_client_renew(const struct cmg_client_conn *conn, struct cmg_client_state *s,
                     char *msg, size_t msglen)
{
    char *old = strdup(s->token);
    int ret;

    if (!old) {
        snprintf(msg, msglen, "renewal: out of memory");
        return CMG_CLIENT_EXIT_FAIL;
    }
    ret = token_exchange(conn, s, "renew", "renewal", old, "{}", msg, msglen);
    OPENSSL_cleanse(old, strlen(old));
    free(old);
    if (ret == CMG_CLIENT_EXIT_OK && cmg_client_state_save(s) < 0) {
        snprintf(msg, msglen, "renewal: the new token could not be saved in %s", s->dir);
        ret = CMG_CLIENT_EXIT_FAIL;
    }
    return ret;
}

/* ---- register ---- */

/* The token from --bulk-token: literal, @FILE or - (standard input), trimmed. */
static int read_token(const char *arg, char **token)
{
    unsigned char *data = NULL;
    size_t len = 0, start = 0, full = 0;
    int ret = -1;

    *token = NULL;
    if (arg[0] == '@' || !strcmp(arg, "-")) {
        if (cmg_client_read_file(arg[0] == '@' ? arg + 1 : "-", CMG_CLIENT_TOKEN_MAX + 64,
                                 &data, &len) < 0)
            goto out;
    } else {
        len = strlen(arg);
        data = (unsigned char *)strdup(arg);
        if (!data)
            goto out;
    }
    full = len;
    while (start < len && data[start] && strchr(" \t\r\n", data[start]))
        start++;
    while (len > start && data[len - 1] && strchr(" \t\r\n", data[len - 1]))
        len--;
    data[len] = 0;
    if (memchr(data + start, 0, len - start) || !cmg_client_token_ok((char *)data + start)) {
        fputs("cmg client register: --bulk-token: not a token (a JWT: base64url parts "
              "separated by dots)\n", stderr);
        goto out;
    }
    *token = strdup((char *)data + start);
    ret = *token ? 0 : -1;
out:
    if (data) {
        OPENSSL_cleanse(data, full);
        free(data);
    }
    return ret;
}

/* The cmg_reg claim of the (unverified) bulk token into prefix. 0 or -1 with a message. */
static int token_prefix(const char *token, char *prefix, size_t prefixlen)
{
    const char *p1 = strchr(token, '.'), *p2 = p1 ? strchr(p1 + 1, '.') : NULL;
    unsigned char *payload = NULL;
    size_t n, plen = 0;
    cJSON *root = NULL;
    const cJSON *use, *reg;
    int ret = -1;

    if (!p1 || !p2 || strchr(p2 + 1, '.')) {
        fputs("cmg client register: --bulk-token: not a JWT (three parts separated by dots)\n",
              stderr);
        goto out;
    }
    n = (size_t)(p2 - p1 - 1);
    payload = malloc(n + 1);
    if (!payload || cmg_b64url_decode(p1 + 1, n, payload, n, &plen) < 0) {
        fputs("cmg client register: --bulk-token: its payload is not base64url\n", stderr);
        goto out;
    }
    root = cJSON_ParseWithLength((const char *)payload, plen);
    use = cJSON_GetObjectItemCaseSensitive(root, "cmg_use");
    reg = cJSON_GetObjectItemCaseSensitive(root, "cmg_reg");
    if (!cJSON_IsObject(root)) {
        fputs("cmg client register: --bulk-token: its payload is not a JSON object\n", stderr);
        goto out;
    }
    if (use && (!cJSON_IsString(use) || strcmp(use->valuestring, "bulk"))) {
        fputs("cmg client register: --bulk-token: not a bulk registration token (its cmg_use "
              "is not \"bulk\")\n", stderr);
        goto out;
    }
    if (!cJSON_IsString(reg) || !reg->valuestring[0]) {
        fputs("cmg client register: --bulk-token: the token has no cmg_reg claim; give "
              "--prefix\n", stderr);
        goto out;
    }
    if (strlen(reg->valuestring) >= prefixlen) {
        fputs("cmg client register: --bulk-token: its cmg_reg claim is too long\n", stderr);
        goto out;
    }
    strcpy(prefix, reg->valuestring);
    ret = 0;
out:
    cJSON_Delete(root);
    if (payload) {
        OPENSSL_cleanse(payload, n);
        free(payload);
    }
    return ret;
}

/* A path prefix: "/...", printable, no spaces, '?', '#'; trailing slashes dropped. */
static int prefix_ok(char *prefix)
{
    size_t n = strlen(prefix);

    while (n > 1 && prefix[n - 1] == '/')
        prefix[--n] = 0;
    if (prefix[0] != '/' || n < 2)
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)prefix[i] <= 0x20 || (unsigned char)prefix[i] >= 0x7f ||
            prefix[i] == '?' || prefix[i] == '#')
            return 0;
    return 1;
}

static int parse_register(int argc, char **argv, struct reg_opts *o, int *done)
{
    enum { O_GATEWAY, O_CA, O_TOKEN, O_STATE, O_SERVER_NAME, O_NAME, O_PREFIX, O_TIMEOUT };
    static const char *const names[] = {
        [O_GATEWAY] = "--gateway",         [O_CA] = "--ca",    [O_TOKEN] = "--bulk-token",
        [O_STATE] = "--state",             [O_SERVER_NAME] = "--server-name",
        [O_NAME] = "--name",               [O_PREFIX] = "--prefix",
        [O_TIMEOUT] = "--timeout"};
    const char **slots[] = {&o->gateway, &o->ca,     &o->bulk_token, &o->state,
                            &o->server_name, &o->name, &o->prefix};
    const char *timeout = NULL;
    char host[256];
    int port;

    *done = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        size_t k;
        int r = 0;

        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            register_usage(stdout);
            return CMG_CLIENT_EXIT_OK;
        }
        for (k = 0; k < sizeof(names) / sizeof(names[0]); k++)
            if ((r = cmg_client_opt(argc, argv, &i, names[k], &val)) != 0)
                break;
        if (r < 0)
            return usage_error(register_usage, "register", "option %s needs a value", names[k]);
        if (r == 0)
            return usage_error(register_usage, "register",
                               a[0] == '-' ? "unknown option '%s'" : "unexpected argument '%s'",
                               a);
        if (k == O_TIMEOUT)
            timeout = val;
        else
            *slots[k] = val;
    }
    if (!o->gateway)
        return usage_error(register_usage, "register", "%s", "missing --gateway HOST:PORT");
    if (cmg_fetch_split_addr(o->gateway, 0, host, sizeof(host), &port) < 0)
        return usage_error(register_usage, "register",
                           "--gateway '%s': not HOST:PORT or [IPv6]:PORT", o->gateway);
    if (!o->ca)
        return usage_error(register_usage, "register", "%s", "missing --ca FILE");
    if (!o->bulk_token)
        return usage_error(register_usage, "register", "%s", "missing --bulk-token TOKEN");
    if (o->server_name && !printable_ok(o->server_name, 253))
        return usage_error(register_usage, "register", "--server-name '%s': not a host name",
                           o->server_name);
    if (o->name && (!printable_ok(o->name, REG_NAME_MAX) || o->name[0] == ' ' ||
                    o->name[strlen(o->name) - 1] == ' '))
        return usage_error(register_usage, "register",
                           "--name '%s': 1 to 64 printable characters, no leading or trailing "
                           "space", o->name);
    if (timeout && cmg_client_parse_timeout(timeout, &o->timeout_ms) < 0)
        return usage_error(register_usage, "register", "--timeout '%s': not a number of seconds",
                           timeout);
    *done = 0;
    return CMG_CLIENT_EXIT_OK;
}

/* The CA file, checked to hold a PEM certificate. 0 or -1 with a message. */
static int read_ca(const char *path, unsigned char **data, size_t *len)
{
    BIO *bio;
    X509 *x = NULL;

    if (cmg_client_read_file(path, REG_CA_MAX, data, len) < 0)
        return -1;
    bio = BIO_new_mem_buf(*data, (int)*len);
    if (bio)
        x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (!x) {
        fprintf(stderr, "cmg client register: --ca %s: no PEM certificate in it\n", path);
        free(*data);
        *data = NULL;
        return -1;
    }
    X509_free(x);
    return 0;
}

int cmg_client_register_main(int argc, char **argv)
{
    struct reg_opts o;
    struct cmg_client_state s;
    struct cmg_client_conn conn;
    char host[256], name[REG_NAME_MAX + 1], prefix[REG_PREFIX_MAX], ca_copy[PATH_MAX];
    char msg[768], when[64], *token = NULL, *body = NULL;
    unsigned char *ca = NULL;
    size_t ca_len = 0;
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    cJSON *req = NULL;
    int port, done, ret;

    memset(&o, 0, sizeof(o));
    memset(&s, 0, sizeof(s));
    memset(&conn, 0, sizeof(conn));
    ret = parse_register(argc, argv, &o, &done);
    if (done)
        return ret;
    ret = CMG_CLIENT_EXIT_USAGE;
    cmg_fetch_split_addr(o.gateway, 0, host, sizeof(host), &port);
    if (read_token(o.bulk_token, &token) < 0)
        goto out;
    if (o.prefix) {
        snprintf(prefix, sizeof(prefix), "%s", o.prefix);
    } else if (token_prefix(token, prefix, sizeof(prefix)) < 0) {
        goto out;
    }
    if (!prefix_ok(prefix)) {
        fprintf(stderr, "cmg client register: %s '%s': not a path prefix like "
                        "/CCM_Proxy_ServerAuth/ROLE\n", o.prefix ? "--prefix" : "cmg_reg", prefix);
        goto out;
    }
    if (o.name) {
        snprintf(name, sizeof(name), "%s", o.name);
    } else if (gethostname(name, sizeof(name)) < 0 || !name[0] ||
               !printable_ok(name, REG_NAME_MAX)) {
        fputs("cmg client register: cannot use the host name as the device name; give "
              "--name\n", stderr);
        goto out;
    }
    name[sizeof(name) - 1] = 0;

    ret = CMG_CLIENT_EXIT_FAIL;
    if (read_ca(o.ca, &ca, &ca_len) < 0 ||
        cmg_client_state_dir(o.state, s.dir, sizeof(s.dir)) < 0 ||
        cmg_client_state_mkdir(s.dir, sizeof(s.dir)) < 0 ||
        cmg_client_state_identity(s.dir, name, &key, &cert) < 0 ||
        cmg_client_state_path(s.dir, "ca.crt", ca_copy, sizeof(ca_copy)) < 0)
        goto out;
    s.gateway = strdup(o.gateway);
    s.server_name = strdup(o.server_name ? o.server_name : host);
    s.prefix = strdup(prefix);
    req = cJSON_CreateObject();
    if (!s.gateway || !s.server_name || !s.prefix || !req ||
        !cJSON_AddStringToObject(req, "name", name) || !(body = cJSON_PrintUnformatted(req))) {
        fputs("cmg client register: out of memory\n", stderr);
        goto out;
    }

    conn.gateway = o.gateway;
    conn.server_name = s.server_name;
    conn.ca_file = o.ca;
    conn.key = key;
    conn.cert = cert;
    conn.timeout_ms = o.timeout_ms;
    ret = token_exchange(&conn, &s, "register", "registration", token, body, msg, sizeof(msg));
    if (ret != CMG_CLIENT_EXIT_OK) {
        fprintf(stderr, "cmg client: %s\n", msg);
        goto out;
    }
    ret = CMG_CLIENT_EXIT_FAIL;
    /* The CA is copied once it has proved itself, with the token it goes with. */
    if (cmg_pki_write_file(ca_copy, ca, ca_len, 0644) < 0 || cmg_client_state_save(&s) < 0)
        goto out;
    cmg_client_state_remember(s.dir);
    cmg_client_iso_time(s.expires, when, sizeof(when));
    printf("registered as device %s; token expires %s\n", s.device_id, when);
    ret = CMG_CLIENT_EXIT_OK;
out:
    if (token) {
        OPENSSL_cleanse(token, strlen(token));
        free(token);
    }
    cJSON_free(body);
    cJSON_Delete(req);
    free(ca);
    EVP_PKEY_free(key);
    X509_free(cert);
    cmg_client_state_free(&s);
    return ret;
}

/* ---- renew ---- */

int cmg_client_renew_main(int argc, char **argv)
{
    struct cmg_client_state s;
    struct cmg_client_conn conn;
    const char *state = NULL, *timeout = NULL;
    char dir[PATH_MAX], ca[PATH_MAX], msg[768], when[64];
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    int ret = CMG_CLIENT_EXIT_FAIL;

    memset(&s, 0, sizeof(s));
    memset(&conn, 0, sizeof(conn));
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int r;

        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            renew_usage(stdout);
            return CMG_CLIENT_EXIT_OK;
        }
        if ((r = cmg_client_opt(argc, argv, &i, "--state", &state)) == 0)
            r = cmg_client_opt(argc, argv, &i, "--timeout", &timeout);
        if (r < 0)
            return usage_error(renew_usage, "renew", "option %s needs a value", a);
        if (r == 0)
            return usage_error(renew_usage, "renew",
                               a[0] == '-' ? "unknown option '%s'" : "unexpected argument '%s'",
                               a);
    }
    if (timeout && cmg_client_parse_timeout(timeout, &conn.timeout_ms) < 0)
        return usage_error(renew_usage, "renew", "--timeout '%s': not a number of seconds",
                           timeout);
    if (cmg_client_state_dir(state, dir, sizeof(dir)) < 0 ||
        cmg_client_state_load(dir, &s) < 0)
        goto out;
    if (cmg_client_state_load_identity(dir, &key, &cert) < 0 ||
        cmg_client_state_path(dir, "ca.crt", ca, sizeof(ca)) < 0)
        goto out;
    conn.gateway = s.gateway;
    conn.server_name = s.server_name && *s.server_name ? s.server_name : NULL;
    conn.ca_file = ca;
    conn.key = key;
    conn.cert = cert;
    ret = cmg_client_renew(&conn, &s, msg, sizeof(msg));
    if (ret != CMG_CLIENT_EXIT_OK) {
        fprintf(stderr, "cmg client: %s\n", msg);
        goto out;
    }
    cmg_client_iso_time(s.expires, when, sizeof(when));
    printf("renewed device %s; token expires %s\n", s.device_id, when);
out:
    cmg_client_state_free(&s);
    EVP_PKEY_free(key);
    X509_free(cert);
    return ret;
}
