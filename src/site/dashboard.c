/* The web dashboard on the admin listener; see dashboard.h. Sessions live in memory
 * only (at most SESSIONS_MAX, the oldest evicted; gone at a restart). Every answer
 * carries a strict Content-Security-Policy: the pages hold no inline script or style. */
#include "site/dashboard.h"

#include "core/log.h"
#include "http/httpd.h"
#include "http/path.h"
#include "site/alerts.h"
#include "site/dashboard_assets.h"
#include "site/ops.h"
#include "site/serve.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SESSIONS_MAX 64
#define SESSION_BYTES 32
#define SESSION_HEX (2 * SESSION_BYTES)
#define SESSION_TTL_S (12 * 3600)
#define COOKIE "cmg_session"
/* Failed sign-ins: LOGIN_BURST at once from one address, then one per LOGIN_REFILL_MS. */
#define LOGIN_PEERS 64
#define LOGIN_BURST 10
#define LOGIN_REFILL_MS 6000
#define TOKEN_MAX 512
#define MESSAGE_MARK "<!--message-->"

#define SECURITY_HEADERS                                                                       \
    "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "       \
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "           \
    "frame-ancestors 'none'\r\n"                                                               \
    "X-Content-Type-Options: nosniff\r\n"                                                      \
    "Referrer-Policy: no-referrer\r\n"                                                         \
    "X-Frame-Options: DENY\r\n"
#define COOKIE_ATTRS "; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age="

struct session {
    char id[SESSION_HEX + 1];   /* "" when free */
    int64_t created, expires;   /* wall clock: a cookie's life is in days and hours */
};

struct login_peer {
    char host[64];              /* "" when free */
    unsigned tokens;            /* failed sign-ins it may still make now */
    uint64_t refilled, used;    /* loop milliseconds */
};

struct cmg_dashboard {
    struct cmg_site_server *srv;
    struct session sessions[SESSIONS_MAX];
    struct login_peer peers[LOGIN_PEERS];
    struct login_peer others;   /* every address while the table holds only held-back ones */
    struct cmg_log_limit refused, limited;   /* wrong tokens; addresses held back */
};

/* The devices page reads one page of device.list, polled every 30 s. */
#define DASHBOARD_DEVICES 100000

/* The read-only admin operations the pages list. */
static const char *const api_ops[] = {"device.list", "cert.list", "connector.list",
                                      "mapping.list", "alert.list"};

struct cmg_dashboard *cmg_dashboard_new(struct cmg_site_server *srv)
{
    struct cmg_dashboard *d = calloc(1, sizeof(*d));

    if (d) {
        d->srv = srv;
        d->refused.what = "refused dashboard sign-ins";
        d->limited.what = "dashboard sign-ins held back (rate_limited)";
    }
    return d;
}

void cmg_dashboard_free(struct cmg_dashboard *d)
{
    if (d)
        OPENSSL_cleanse(d->sessions, sizeof(d->sessions));
    free(d);
}

/* ---- answers ---- */

static void respond(struct cmg_httpd_req *req, int status, const char *type, const void *body,
                    size_t len, const char *more)
{
    char extra[1024];

    snprintf(extra, sizeof(extra), "%s%s", SECURITY_HEADERS, more ? more : "");
    cmg_httpd_respond(req, status, type, body, len, extra);
}

static void respond_json(struct cmg_httpd_req *req, int status, cJSON *doc)
{
    char *s = doc ? cJSON_PrintUnformatted(doc) : NULL;

    cJSON_Delete(doc);
    if (!s)
        respond(req, 500, "application/json", "{\"error\":\"out of memory\"}\n", 26, NULL);
    else
        respond(req, status, "application/json", s, strlen(s), NULL);
    free(s);
}

static void respond_error(struct cmg_httpd_req *req, int status, const char *reason)
{
    cJSON *o = cJSON_CreateObject();

    cJSON_AddStringToObject(o, "error", reason);
    respond_json(req, status, o);
}

static void redirect(struct cmg_httpd_req *req, const char *to, const char *more)
{
    char extra[512];

    snprintf(extra, sizeof(extra), "Location: %s\r\n%s", to, more ? more : "");
    respond(req, 303, "text/plain; charset=utf-8", "", 0, extra);
}

static const struct cmg_dashboard_asset *asset_find(const char *name)
{
    for (const struct cmg_dashboard_asset *a = cmg_dashboard_assets; a->name; a++)
        if (!strcmp(a->name, name))
            return a;
    return NULL;
}

static const char *content_type(const char *name)
{
    const char *dot = strrchr(name, '.');

    if (dot && !strcmp(dot, ".html"))
        return "text/html; charset=utf-8";
    if (dot && !strcmp(dot, ".js"))
        return "text/javascript; charset=utf-8";
    if (dot && !strcmp(dot, ".css"))
        return "text/css; charset=utf-8";
    if (dot && !strcmp(dot, ".svg"))
        return "image/svg+xml";
    return "application/octet-stream";
}

static void send_asset(struct cmg_httpd_req *req, const struct cmg_dashboard_asset *a)
{
    respond(req, 200, content_type(a->name), a->data, a->len, NULL);
}

/* The sign-in page, with a message where login.html marks it (a fixed text: nothing of
 * the request goes into the page). */
static void login_page(struct cmg_httpd_req *req, int status, const char *message,
                       const char *more)
{
    const struct cmg_dashboard_asset *a = asset_find("login.html");
    const char *mark = memmem(a->data, a->len, MESSAGE_MARK, strlen(MESSAGE_MARK));
    size_t head = mark ? (size_t)(mark - (const char *)a->data) : a->len;
    size_t tail = mark ? a->len - head - strlen(MESSAGE_MARK) : 0;
    char *page = NULL;
    int n;

    if (!message || !mark ||
        (n = asprintf(&page, "%.*s<p class=\"message\" role=\"alert\">%s</p>%.*s", (int)head,
                      (const char *)a->data, message, (int)tail,
                      (const char *)a->data + head + strlen(MESSAGE_MARK))) < 0) {
        page = NULL;
        respond(req, status, content_type(a->name), a->data, a->len, more);
    } else {
        respond(req, status, content_type(a->name), page, (size_t)n, more);
    }
    free(page);
}

/* ---- sessions ---- */

static bool is_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (cmg_hex_digit(s[i]) < 0)
            return false;
    return true;
}

/* Whether id (SESSION_HEX characters) is a live session: compared with every slot in
 * constant time. */
static struct session *session_find(struct cmg_dashboard *d, const char *id, int64_t now)
{
    struct session *found = NULL;

    for (size_t i = 0; i < SESSIONS_MAX; i++) {
        struct session *s = &d->sessions[i];
        bool same = CRYPTO_memcmp(s->id, id, SESSION_HEX) == 0;
        if (same && s->id[0] && s->expires > now)
            found = s;
    }
    return found;
}

/* The session the request's cookie names, or NULL. */
static struct session *session_of(struct cmg_dashboard *d, const struct cmg_httpd_req *req)
{
    const char *v = cmg_httpd_header(req, "cookie");
    const size_t klen = strlen(COOKIE "=");
    int64_t now = (int64_t)time(NULL);

    while (v && *v) {
        size_t n;
        v += strspn(v, " \t;");
        n = strcspn(v, ";");
        if (n == klen + SESSION_HEX && !strncmp(v, COOKIE "=", klen) &&
            is_hex(v + klen, SESSION_HEX)) {
            struct session *s = session_find(d, v + klen, now);
            if (s)
                return s;
        }
        v += n;
    }
    return NULL;
}

/* A new session in a free or expired slot, else in the oldest one's. */
static struct session *session_new(struct cmg_dashboard *d)
{
    unsigned char raw[SESSION_BYTES];
    int64_t now = (int64_t)time(NULL);
    struct session *slot = &d->sessions[0];

    if (RAND_bytes(raw, sizeof(raw)) != 1)
        return NULL;
    for (size_t i = 0; i < SESSIONS_MAX; i++) {
        struct session *s = &d->sessions[i];
        if (!s->id[0] || s->expires <= now) {
            slot = s;
            break;
        }
        if (s->created < slot->created)
            slot = s;
    }
    for (size_t i = 0; i < sizeof(raw); i++)
        snprintf(slot->id + 2 * i, 3, "%02x", raw[i]);
    OPENSSL_cleanse(raw, sizeof(raw));
    slot->created = now;
    slot->expires = now + SESSION_TTL_S;
    return slot;
}

static void session_end(struct session *s)
{
    OPENSSL_cleanse(s, sizeof(*s));
}

bool cmg_dashboard_admits(struct cmg_dashboard *d, const struct cmg_httpd_req *req)
{
    size_t n = strcspn(req->target, "?");

    if (!d || strcmp(req->method, "GET"))
        return false;
    if (!(n == 10 && !strncmp(req->target, "/v1/status", n)) &&
        !(n == 11 && !strncmp(req->target, "/v1/traffic", n)))
        return false;
    return session_of(d, req) != NULL;
}

/* ---- sign-in ---- */

/* The address of "host:port" or "[v6]:port", for the per-address limit. */
static void peer_host(const char *peer, char *out, size_t len)
{
    const char *colon = strrchr(peer, ':');
    size_t n = colon ? (size_t)(colon - peer) : strlen(peer);

    if (n >= 2 && peer[0] == '[' && peer[n - 1] == ']') {
        peer++;
        n -= 2;
    }
    snprintf(out, len, "%.*s", (int)n, peer);
    if (strchr(out, ':')) {   /* IPv6: one limit per /64, what one host is given */
        unsigned char a[16];
        if (inet_pton(AF_INET6, out, a) == 1) {
            memset(a + 8, 0, 8);
            inet_ntop(AF_INET6, a, out, (socklen_t)len);
        }
    }
}

static void refill(struct login_peer *p, uint64_t now)
{
    uint64_t add = (now - p->refilled) / LOGIN_REFILL_MS;

    if (add > 0) {
        p->tokens = add >= LOGIN_BURST - p->tokens ? LOGIN_BURST : p->tokens + (unsigned)add;
        p->refilled += add * LOGIN_REFILL_MS;
    }
}

/* The peer's entry, its tokens refilled: its own, or a new one in place of the least
 * recently used entry that is not held back (forgetting one would give it its tries
 * again), or else the entry all other addresses share. */
static struct login_peer *login_peer(struct cmg_dashboard *d, const char *host, uint64_t now)
{
    struct login_peer *p = NULL, *free_one = NULL;

    for (size_t i = 0; i < LOGIN_PEERS && !p; i++) {
        struct login_peer *e = &d->peers[i];
        if (e->host[0] && !strcmp(e->host, host)) {
            p = e;
            continue;
        }
        if (e->host[0])
            refill(e, now);
        if ((!e->host[0] || e->tokens == LOGIN_BURST) && (!free_one || e->used < free_one->used))
            free_one = e;
    }
    if (!p && free_one) {
        p = free_one;
        snprintf(p->host, sizeof(p->host), "%s", host);
        p->tokens = LOGIN_BURST;
        p->refilled = now;
    } else if (!p) {
        p = &d->others;
        if (!p->host[0]) {
            snprintf(p->host, sizeof(p->host), "*");
            p->tokens = LOGIN_BURST;
            p->refilled = now;
        }
    }
    refill(p, now);
    p->used = now;
    return p;
}

bool cmg_dashboard_may_guess(struct cmg_dashboard *d, const struct cmg_httpd_req *req)
{
    char host[64];

    if (!d)
        return true;
    peer_host(req->peer, host, sizeof(host));
    return login_peer(d, host, cmg_loop_now(d->srv->loop))->tokens > 0;
}

void cmg_dashboard_guessed_wrong(struct cmg_dashboard *d, const struct cmg_httpd_req *req)
{
    char host[64];
    struct login_peer *p;

    if (!d)
        return;
    peer_host(req->peer, host, sizeof(host));
    p = login_peer(d, host, cmg_loop_now(d->srv->loop));
    if (p->tokens > 0)
        p->tokens--;
}

/* The form field `name` of an application/x-www-form-urlencoded body, decoded and
 * trimmed of surrounding white space; false if absent, malformed or too long. */
static bool form_value(const char *body, size_t len, const char *name, char *out, size_t cap)
{
    size_t nlen = strlen(name), o = 0;
    const char *p = body, *end = body + len, *v = NULL, *vend;

    while (p < end && !v) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *field_end = amp ? amp : end;
        if ((size_t)(field_end - p) > nlen && !strncmp(p, name, nlen) && p[nlen] == '=')
            v = p + nlen + 1;
        else
            p = amp ? amp + 1 : end;
    }
    if (!v)
        return false;
    vend = memchr(v, '&', (size_t)(end - v));
    if (!vend)
        vend = end;
    for (; v < vend; v++) {
        char c = *v;
        if (c == '+')
            c = ' ';
        else if (c == '%') {
            if (vend - v < 3 || cmg_hex_digit(v[1]) < 0 || cmg_hex_digit(v[2]) < 0)
                return false;
            c = (char)(cmg_hex_digit(v[1]) * 16 + cmg_hex_digit(v[2]));
            v += 2;
        }
        if (o + 1 >= cap)
            return false;
        if (o || !strchr(" \t\r\n", c))
            out[o++] = c;
    }
    while (o && strchr(" \t\r\n", out[o - 1]))
        o--;
    out[o] = 0;
    return o > 0;
}

static void log_refusal(struct cmg_log_limit *limit, struct cmg_httpd_req *req,
                        const char *reason, const char *msg)
{
    const struct cmg_log_field f[] = {
        CMG_F_STR("reason", reason), CMG_F_STR("peer", req->peer),
        CMG_F_STR("method", req->method), CMG_F_STR("path", req->target)};
    cmg_log_kv_limited(limit, CMG_LOG_WARN, msg, f, CMG_LOG_NFIELDS(f));
}

/* POST /ui/login with the form field `token`: the admin token gives a session. */
static void login(struct cmg_dashboard *d, struct cmg_httpd_req *req)
{
    char host[64], token[TOKEN_MAX], cookie[160];
    struct login_peer *p;
    struct session *s;

    peer_host(req->peer, host, sizeof(host));
    p = login_peer(d, host, cmg_loop_now(d->srv->loop));
    if (p->tokens == 0) {
        log_refusal(&d->limited, req, "rate_limited",
                    "dashboard sign-in refused: too many failed sign-ins from this address");
        login_page(req, 429, "Too many failed sign-ins from this address: wait a minute.",
                   "Retry-After: 60\r\n");
        return;
    }
    if (!form_value(req->body, req->body_len, "token", token, sizeof(token)) ||
        !cmg_site_secret_is(token, d->srv->ctx->admin_token)) {
        p->tokens--;
        log_refusal(&d->refused, req, "admin_token", "dashboard sign-in refused: no or wrong admin token");
        login_page(req, 401, "Wrong admin token: give the content of admin.token in the "
                   "site directory.", NULL);
    } else if (!(s = session_new(d))) {
        login_page(req, 500, "No session could be made (no random bytes): try again.", NULL);
    } else {
        snprintf(cookie, sizeof(cookie), "Set-Cookie: " COOKIE "=%s" COOKIE_ATTRS "%d\r\n", s->id,
                 SESSION_TTL_S);
        cmg_info("dashboard sign-in from %s", req->peer);
        redirect(req, "/ui/", cookie);
    }
    OPENSSL_cleanse(token, sizeof(token));
}

/* POST /ui/logout: the session ends here and in the browser. */
static void logout(struct cmg_dashboard *d, struct cmg_httpd_req *req)
{
    struct session *s = session_of(d, req);

    if (s) {
        session_end(s);
        cmg_info("dashboard sign-out from %s", req->peer);
    }
    redirect(req, "/ui/login", "Set-Cookie: " COOKIE "=" COOKIE_ATTRS "0\r\n");
}

/* ---- data ---- */

/* The webhook's URL past its origin (user information, path, query) is often its
 * secret: a session, weaker than the admin token, sees the origin only. */
static void webhook_origin_only(cJSON *result)
{
    cJSON *set = cJSON_GetObjectItemCaseSensitive(result, "settings");
    const char *url = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(set, "webhook"));
    char origin[300];

    if (!url)
        return;
    cmg_alerts_url_origin(url, origin, sizeof(origin));
    cJSON_ReplaceItemInObjectCaseSensitive(set, "webhook", cJSON_CreateString(origin));
}

/* GET /ui/api/NAME: one of the read-only operations, as the admin API would run it. */
static void api(struct cmg_dashboard *d, struct cmg_httpd_req *req, const char *name)
{
    cJSON *args, *result = NULL;
    char msg[512];
    bool listed = false;
    int rc;

    for (size_t i = 0; i < sizeof(api_ops) / sizeof(api_ops[0]); i++)
        listed = listed || !strcmp(name, api_ops[i]);
    if (!listed) {
        respond_error(req, 404, "the dashboard reads device.list, cert.list, connector.list, "
                      "mapping.list and alert.list only");
        return;
    }
    if (!(args = cJSON_CreateObject())) {
        respond_error(req, 500, "out of memory");
        return;
    }
    if (!strcmp(name, "device.list"))   /* one page: registered devices come first */
        cJSON_AddNumberToObject(args, "limit", DASHBOARD_DEVICES);
    rc = cmg_site_op_run(d->srv->ctx, name, args, &result, msg, sizeof(msg));
    cJSON_Delete(args);
    if (rc == 0 && !strcmp(name, "alert.list"))
        webhook_origin_only(result);
    if (rc != 0)
        respond_error(req, rc, msg);
    else
        respond_json(req, 200, result);
}

/* ---- routing ---- */

static bool is_read(const struct cmg_httpd_req *req)
{
    return !strcmp(req->method, "GET") || !strcmp(req->method, "HEAD");
}

static void not_allowed(struct cmg_httpd_req *req, const char *allow)
{
    char extra[64];

    snprintf(extra, sizeof(extra), "Allow: %s\r\n", allow);
    respond(req, 405, "application/json", "{\"error\":\"method not allowed\"}\n", 31, extra);
}

/* A POST another site's page made the browser send (a form aimed at us): refused, so that
 * no other site can sign the browser out, or in. Browsers say where a request comes from
 * in Sec-Fetch-Site; older ones in Origin ("null" under our no-referrer policy, which
 * tells nothing). Scripts and curl send neither. */
static bool cross_site(const struct cmg_httpd_req *req)
{
    const char *fetch_site = cmg_httpd_header(req, "Sec-Fetch-Site");
    const char *origin = cmg_httpd_header(req, "Origin"), *host = cmg_httpd_header(req, "Host");

    if (fetch_site)
        return strcmp(fetch_site, "same-origin") && strcmp(fetch_site, "none");
    return origin && strcmp(origin, "null") &&
           (!host || strncmp(origin, "https://", 8) || strcmp(origin + 8, host));
}

/* A page: the app once signed in, else the sign-in page. */
static void page(struct cmg_dashboard *d, struct cmg_httpd_req *req, const char *path)
{
    bool signed_in = session_of(d, req) != NULL;

    if (!strcmp(req->method, "POST") && cross_site(req)) {
        respond_error(req, 403, "a sign-in or sign-out from another site's page is refused");
    } else if (!strcmp(path, "/ui/login")) {
        if (!strcmp(req->method, "POST"))
            login(d, req);
        else if (!is_read(req))
            not_allowed(req, "GET, HEAD, POST");
        else if (signed_in)
            redirect(req, "/ui/", NULL);
        else
            login_page(req, 200, NULL, NULL);
    } else if (!strcmp(path, "/ui/logout")) {
        if (strcmp(req->method, "POST"))
            not_allowed(req, "POST");
        else
            logout(d, req);
    } else if (!is_read(req)) {
        not_allowed(req, "GET, HEAD");
    } else if (!signed_in) {
        redirect(req, "/ui/login", NULL);
    } else {
        send_asset(req, asset_find("index.html"));
    }
}

bool cmg_dashboard_handle(struct cmg_dashboard *d, struct cmg_httpd_req *req)
{
    char path[sizeof(req->target)];
    const struct cmg_dashboard_asset *a;
    const char *name;

    snprintf(path, sizeof(path), "%.*s", (int)strcspn(req->target, "?"), req->target);
    if (!strcmp(path, "/") || !strcmp(path, "/ui")) {
        if (is_read(req))
            redirect(req, "/ui/", NULL);
        else
            not_allowed(req, "GET, HEAD");
        return true;
    }
    if (strncmp(path, "/ui/", 4))
        return false;
    name = path + 4;
    if (!strncmp(name, "api/", 4)) {
        if (strcmp(req->method, "GET"))
            not_allowed(req, "GET");
        else if (!session_of(d, req))
            respond_error(req, 401, "sign in first: /ui/login");
        else
            api(d, req, name + 4);
    } else if (!*name || !strcmp(name, "login") || !strcmp(name, "logout")) {
        page(d, req, path);
    } else if (!(a = asset_find(name)) || strstr(name, ".html")) {
        respond_error(req, 404, "no such dashboard file");
    } else if (!is_read(req)) {
        not_allowed(req, "GET, HEAD");
    } else {
        send_asset(req, a);   /* the files are the same for everyone: no session needed */
    }
    return true;
}
