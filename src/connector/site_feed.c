/* The site feed: the connector long-polls the site's feed listener for the signed
 * policy and the signed routes (GET /v1/connector/feed?after=N, answered at once
 * when the site has something newer, else after some seconds), over mutual TLS:
 * the connector shows its own certificate, and the site must show one of the site
 * CA with OpenCMG's site usage (a gateway's certificate of the same CA is refused).
 * Nothing is taken on the channel's word: both documents must verify with the site
 * key, the version comes from the verified policy, and only a newer one replaces
 * what is in force. Whatever is new goes up every tunnel and into the cache on
 * disk, which a restart serves from while the site is down. A site that cannot be
 * reached is retried with back-off; the connector meanwhile serves with what it
 * has, and warns once the policy in force is older than max_policy_age. */
#include "auth/jwk.h"
#include "auth/jws.h"
#include "auth/keychain.h"
#include "auth/policy.h"
#include "connector/cn.h"
#include "core/log.h"
#include "site/pki.h"
#include "tls/tls.h"

#include <cjson/cJSON.h>
#include <openssl/crypto.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FEED_TIMEOUT_MS 40000
#define FEED_MAX_BODY (8u * 1024 * 1024)
#define RETRY_MIN_MS 500
#define RETRY_MAX_MS 15000
#define KID_REPORT_GAP_MS 60000

struct cmg_site_feed {
    struct cmg_connector *cn;
    char authority[300];
    char path_prefix[256];
    char host[256];           /* for SNI */
    struct cmg_addr addr;
    SSL_CTX *tls;
    struct cmg_site_call call;   /* the poll under way */
    bool failing;             /* logged once until it works again */
    uint32_t retry_ms;
    struct cmg_timer timer;
    char unknown_kid[129];    /* a gateway's report, sent with the next feed request */
    uint64_t kid_reported_ms;
};

static void request(struct cmg_site_feed *f);

static void on_retry(struct cmg_timer *t)
{
    request((struct cmg_site_feed *)((char *)t - offsetof(struct cmg_site_feed, timer)));
}

static void retry(struct cmg_site_feed *f, const char *why)
{
    cmg_site_call_cancel(&f->call);
    if (!f->failing)
        cmg_warn("site %s unreachable or refusing: %s%s (serving with policy version %lld; "
                 "retrying)", f->authority, why,
                 strstr(why, "unsuitable certificate purpose")
                     ? " (the certificate shown is not the site's: it lacks OpenCMG's site "
                       "usage; is site = the site's feed_listen?)" : "",
                 (long long)f->cn->policy_version);
    f->failing = true;
    f->retry_ms = f->retry_ms ? f->retry_ms * 2 : RETRY_MIN_MS;
    if (f->retry_ms > RETRY_MAX_MS)
        f->retry_ms = RETRY_MAX_MS;
    cmg_timer_start(f->cn->loop, &f->timer, f->retry_ms, on_retry);
}

static void on_age(struct cmg_timer *t)
{
    struct cmg_connector *cn =
        (struct cmg_connector *)((char *)t - offsetof(struct cmg_connector, age_timer));

    cmg_warn("policy version %lld in force was signed %lld s ago, more than max_policy_age "
             "(%u s): the site has not been heard from; is it running, and reachable at %s?",
             (long long)cn->policy_version, (long long)(time(NULL) - cn->policy_iat),
             cn->cfg.max_policy_age_ms / 1000, cn->cfg.site);
    cmg_timer_start(cn->loop, &cn->age_timer, CMG_POLICY_AGE_REPEAT_MS, on_age);
}

/* Warns when the policy in force grows older than max_policy_age. */
static void watch_age(struct cmg_connector *cn)
{
    int64_t left_ms = (cn->policy_iat + cn->cfg.max_policy_age_ms / 1000 - time(NULL)) * 1000;

    cmg_timer_stop(cn->loop, &cn->age_timer);
    if (cn->policy_iat > 0 && cn->cfg.max_policy_age_ms > 0)
        cmg_timer_start(cn->loop, &cn->age_timer, left_ms > 0 ? (uint64_t)left_ms : 0, on_age);
}

/* The routes document, verified with the site key: {"version", "routes"}. NULL with
 * the reason in err. */
static cJSON *verified_routes(struct cmg_connector *cn, const char *jws, int64_t version,
                              char *err, size_t errlen)
{
    struct cmg_jws j;
    const cJSON *v, *routes;
    const char *typ;
    cJSON *out = NULL;
    char why[CMG_KEYCHAIN_MAX * 50 + 200];

    if (cmg_jws_parse_limit(jws, strlen(jws), CMG_POLICY_MAX, &j) < 0) {
        snprintf(err, errlen, "routes: not a signed document (malformed JWS)");
        return NULL;
    }
    typ = cmg_jws_header_str(&j, "typ");
    v = cJSON_GetObjectItemCaseSensitive(j.payload, "version");
    routes = cJSON_GetObjectItemCaseSensitive(j.payload, "routes");
    if (!typ || strcmp(typ, CMG_ROUTES_TYP))
        snprintf(err, errlen, "routes: typ %s expected, found %s", CMG_ROUTES_TYP,
                 typ ? typ : "none");
    else if (cmg_keychain_verify(&cn->site_keys, &j, NULL, why, sizeof(why)) < 0)
        snprintf(err, errlen, "routes: %s", why);
    else if (!cJSON_IsNumber(v) || v->valuedouble != (double)version || !cJSON_IsObject(routes))
        snprintf(err, errlen, "routes: version %lld with an object of routes expected",
                 (long long)version);
    else
        out = cJSON_Duplicate(routes, 1);
    cmg_jws_free(&j);
    return out;
}

/* Takes a signed policy and its signed routes if both verify and the version is
 * newer than the one in force. 1 if taken, 0 if not newer, -1 if refused (logged). */
static int take_signed(struct cmg_connector *cn, const char *policy, const char *routes_jws,
                       const char *from)
{
    struct cmg_policy *p = NULL;
    cJSON *routes = NULL;
    size_t trusted = cn->site_keys.n;
    char err[CMG_KEYCHAIN_MAX * 50 + 300], *copy = NULL;
    int rc = -1;

    if (cmg_policy_from_jws(policy, strlen(policy), &cn->site_keys, &p, err, sizeof(err)) < 0 ||
        !(routes = verified_routes(cn, routes_jws, p->version, err, sizeof(err)))) {
        cmg_warn("policy and routes from %s refused: %s (version %lld stays in force)", from,
                 err, (long long)cn->policy_version);
        cmg_keychain_remember(&cn->site_keys, trusted, cn->cfg.policy_cache);
        goto out;
    }
    cmg_keychain_remember(&cn->site_keys, trusted, cn->cfg.policy_cache);
    rc = 0;
    if (p->version <= cn->policy_version) {
        if (p->version < cn->policy_version)
            cmg_warn("policy from %s ignored: version %lld is older than version %lld in force",
                     from, (long long)p->version, (long long)cn->policy_version);
        goto out;
    }
    if (!(copy = strdup(policy))) {
        rc = -1;
        goto out;
    }
    free(cn->policy);
    cn->policy = copy;
    cn->policy_version = p->version;
    cn->policy_iat = p->issued_at;
    cmg_cn_routes_apply(cn, routes);
    watch_age(cn);
    cmg_info("policy version %lld and its routes from %s (signed by site key id %s)",
             (long long)cn->policy_version, from, cmg_keychain_newest(&cn->site_keys)->kid);
    rc = 1;
out:
    cJSON_Delete(routes);
    cmg_policy_unref(p);
    return rc;
}

static void keep(struct cmg_connector *cn, const char *policy, const char *routes)
{
    cJSON *doc = cJSON_CreateObject();
    char *text;

    cJSON_AddStringToObject(doc, "policy", policy);
    cJSON_AddStringToObject(doc, "routes", routes);
    text = cJSON_PrintUnformatted(doc);
    if (!text || cmg_pki_write_file(cn->cfg.policy_cache, text, strlen(text), 0644) < 0)
        cmg_warn("cannot keep the policy in %s: a restart will wait for the site",
                 cn->cfg.policy_cache);
    free(text);
    cJSON_Delete(doc);
}

/* The cache, read like any feed answer: verified, never trusted as it lies on disk. */
static void load_cache(struct cmg_connector *cn)
{
    unsigned char *data = NULL;
    size_t len = 0;
    cJSON *doc;
    const char *policy, *routes;

    if (access(cn->cfg.policy_cache, R_OK) != 0 ||
        cmg_pki_read_file(cn->cfg.policy_cache, 2 * CMG_POLICY_MAX, &data, &len) < 0)
        return;
    doc = cJSON_ParseWithLength((const char *)data, len);
    policy = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "policy"));
    routes = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "routes"));
    if (!policy || !routes)
        cmg_warn("%s: not a policy cache; ignored", cn->cfg.policy_cache);
    else
        take_signed(cn, policy, routes, "the cache");
    cJSON_Delete(doc);
    free(data);
}

/* A feed document: {"version": N (a hint), "policy": "<jws>", "routes": "<jws>"}. */
static void take(struct cmg_site_feed *f)
{
    struct cmg_connector *cn = f->cn;
    cJSON *doc = cJSON_ParseWithLength(cmg_buf_head(&f->call.answer), f->call.answer.len);
    const char *policy = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "policy"));
    const char *routes = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "routes"));
    char from[320];
    int rc;

    if (!policy || !routes) {
        cJSON_Delete(doc);
        retry(f, "malformed feed document");
        return;
    }
    snprintf(from, sizeof(from), "site %s", f->authority);
    rc = take_signed(cn, policy, routes, from);
    if (rc < 0) {
        cJSON_Delete(doc);
        retry(f, "the feed's documents do not verify");
        return;
    }
    if (f->failing)
        cmg_info("site %s reached again", f->authority);
    f->failing = false;
    f->retry_ms = 0;
    if (rc > 0) {
        keep(cn, policy, routes);
        for (int i = 0; i < cn->ntunnels; i++)
            cmg_cn_tunnel_announce(&cn->tunnels[i]);
    }
    cJSON_Delete(doc);
    cmg_buf_free(&f->call.answer);
    cmg_timer_start(cn->loop, &f->timer, 0, on_retry);   /* the next poll, from the loop */
}

static void on_answer(struct cmg_site_call *c, int status, const char *why)
{
    struct cmg_site_feed *f = (struct cmg_site_feed *)((char *)c - offsetof(struct cmg_site_feed, call));
    char msg[64];

    if (status == 200) {
        take(f);
        return;
    }
    if (status > 0) {
        snprintf(msg, sizeof(msg), "status %d%s", status,
                 status == 403 ? " (this connector's certificate is revoked)" : "");
        why = msg;
    }
    retry(f, why);
}

/* Asks for what is newer than the policy in force (held by the site until there is). */
static void request(struct cmg_site_feed *f)
{
    char target[64], kid[200] = "";

    snprintf(target, sizeof(target), "/v1/connector/feed?after=%lld",
             (long long)f->cn->policy_version);
    if (f->unknown_kid[0])
        snprintf(kid, sizeof(kid), "CMG-Unknown-Kid: %s\r\n", f->unknown_kid);
    f->unknown_kid[0] = '\0';
    cmg_site_call_start(&f->call, "GET", target, kid, NULL, 0, FEED_TIMEOUT_MS);
}

void cmg_site_feed_unknown_kid(struct cmg_connector *cn, const char *kid)
{
    struct cmg_site_feed *f = cn->feed;
    uint64_t now = cmg_loop_now(cn->loop);

    if (!f || !cmg_jwk_kid_plain(kid) ||
        (f->kid_reported_ms && now - f->kid_reported_ms < KID_REPORT_GAP_MS))
        return;
    snprintf(f->unknown_kid, sizeof(f->unknown_kid), "%s", kid);
    f->kid_reported_ms = now;
    cmg_info("a gateway saw an OIDC token signed with key id %s, unknown to the policy: "
             "telling site %s", kid, f->authority);
    if (f->call.busy && !f->failing) {   /* the long poll waits: ask again now, with the report */
        cmg_site_call_cancel(&f->call);
        request(f);
    }
}

/* "host:port" or "[v6]:port" -> host, for SNI. */
static void authority_host(const char *a, char *out, size_t outlen)
{
    const char *end = a[0] == '[' ? strchr(a, ']') : strrchr(a, ':');

    if (a[0] == '[')
        snprintf(out, outlen, "%.*s", end ? (int)(end - a - 1) : 0, a + 1);
    else
        snprintf(out, outlen, "%.*s", end ? (int)(end - a) : (int)strlen(a), a);
}

SSL_CTX *cmg_site_feed_tls(const struct cmg_cn_config *c, char *err, size_t errlen)
{
    struct cmg_tls_client_opts tls = {.ca = c->site_ca, .cert = c->cert, .key = c->key,
                                      .server_eku = CMG_OID_EKU_SITE};

    return cmg_tls_client_ctx(&tls, err, errlen);
}

void cmg_site_feed_set_tls(struct cmg_connector *cn, SSL_CTX *tls)
{
    if (!cn->feed) {
        SSL_CTX_free(tls);
        return;
    }
    SSL_CTX_free(cn->feed->tls);   /* the request under way holds its own reference */
    cn->feed->tls = tls;
}

int cmg_site_feed_start(struct cmg_connector *cn, char *err, size_t errlen)
{
    const char *url = cn->cfg.site;
    struct cmg_site_feed *f;
    struct cmg_jwk pinned;
    const char *host = url + 8, *slash;
    int rc;

    if (!url[0])
        return 0;
    if (cmg_policy_load_site_key(cn->cfg.site_key, &pinned, err, errlen) < 0)
        return -1;
    rc = cmg_keychain_init(&cn->site_keys, &pinned);
    EVP_PKEY_free(pinned.pkey);
    if (rc < 0) {
        snprintf(err, errlen, "%s: its key id cannot be computed", cn->cfg.site_key);
        return -1;
    }
    cmg_keychain_restore(&cn->site_keys, cn->cfg.policy_cache);
    load_cache(cn);
    if (!(f = calloc(1, sizeof(*f)))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    f->cn = cn;
    cmg_site_call_init(&f->call, cn, on_answer, FEED_MAX_BODY);
    slash = strchr(host, '/');
    snprintf(f->authority, sizeof(f->authority), "%.*s",
             (int)(slash ? (size_t)(slash - host) : strlen(host)), host);
    snprintf(f->path_prefix, sizeof(f->path_prefix), "%s", slash ? slash : "");
    {
        size_t n = strlen(f->path_prefix);
        while (n && f->path_prefix[n - 1] == '/')
            f->path_prefix[--n] = 0;
    }
    authority_host(f->authority, f->host, sizeof(f->host));
    if (cmg_addr_parse(f->authority, 443, &f->addr, err, errlen) < 0 ||
        !(f->tls = cmg_site_feed_tls(&cn->cfg, err, errlen))) {
        free(f);
        return -1;
    }
    cn->feed = f;
    request(f);
    return 0;
}

bool cmg_site_feed_target(const struct cmg_connector *cn, const struct cmg_addr **addr,
                          SSL_CTX **tls, const char **host, const char **authority,
                          const char **prefix)
{
    const struct cmg_site_feed *f = cn->feed;

    if (!f)
        return false;
    *addr = &f->addr;
    *tls = f->tls;
    *host = f->host;
    *authority = f->authority;
    *prefix = f->path_prefix;
    return true;
}

void cmg_site_feed_stop(struct cmg_connector *cn)
{
    struct cmg_site_feed *f = cn->feed;

    if (cn->loop)
        cmg_timer_stop(cn->loop, &cn->age_timer);
    cmg_keychain_free(&cn->site_keys);
    if (!f)
        return;
    cmg_timer_stop(cn->loop, &f->timer);
    cmg_site_call_free(&f->call);
    SSL_CTX_free(f->tls);
    free(f);
    cn->feed = NULL;
}
