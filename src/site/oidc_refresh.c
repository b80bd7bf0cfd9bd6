/* OIDC key refresh; see oidc_refresh.h. */
#include "site/oidc_refresh.h"

#include "auth/jwk.h"
#include "client/fetch.h"
#include "core/log.h"
#include "site/child.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define FETCH_TIMEOUT_MS 10000              /* each connect, handshake, read, write */
#define MIN_LIFETIME_S 300                  /* bounds on what cache headers may ask for */
#define MAX_LIFETIME_S 86400
#define RETRY_S 30                          /* while the last fetch failed */
#define KID_REFRESH_GAP_S 60                /* unknown-kid refreshes at most this often */
#define FIRST_REFRESH_MS 1000
#define ANSWER_MAX (2 * CMG_OIDC_DOC_MAX + 64 * 1024)

/* ---- fetching (blocking) ---- */

/* The value of header name in a response head, trimmed; false if absent. */
static bool header_value(const char *head, const char *name, char *out, size_t len)
{
    size_t n = strlen(name);

    for (const char *line = strstr(head, "\r\n"); line && line[2]; line = strstr(line + 2, "\r\n")) {
        const char *h = line + 2, *v, *end = strstr(h, "\r\n");
        if (strncasecmp(h, name, n) || h[n] != ':' || !end)
            continue;
        for (v = h + n + 1; *v == ' ' || *v == '\t'; v++)
            ;
        while (end > v && (end[-1] == ' ' || end[-1] == '\t'))
            end--;
        snprintf(out, len, "%.*s", (int)(end - v), v);
        return true;
    }
    return false;
}

/* An HTTP-date (RFC 9110, IMF-fixdate), or -1. */
static time_t http_date(const char *s)
{
    struct tm tm = {0};
    const char *end = strptime(s, "%a, %d %b %Y %H:%M:%S GMT", &tm);

    return end && !*end ? timegm(&tm) : (time_t)-1;
}

/* Seconds the response says it stays fresh (Cache-Control max-age, else Expires
 * minus Date), 0 for no-store / no-cache / an Expires in the past or malformed; -1 if
 * the response says nothing. */
static int64_t cache_lifetime(const char *head)
{
    char v[256], date[64];
    const char *age;
    time_t expires, now;

    if (header_value(head, "Cache-Control", v, sizeof(v))) {
        if (strcasestr(v, "no-store") || strcasestr(v, "no-cache"))
            return 0;
        if ((age = strcasestr(v, "max-age=")) && age[8] >= '0' && age[8] <= '9') {
            long long s = strtoll(age + 8, NULL, 10);
            return s > MAX_LIFETIME_S ? MAX_LIFETIME_S : s;
        }
    }
    if (!header_value(head, "Expires", v, sizeof(v)))
        return -1;
    if ((expires = http_date(v)) < 0)
        return 0;
    now = header_value(head, "Date", date, sizeof(date)) && http_date(date) >= 0
              ? http_date(date) : time(NULL);
    return expires > now ? (int64_t)(expires - now) : 0;
}

/* GET url: a JSON object of at most CMG_OIDC_DOC_MAX bytes, answered 200. */
static cJSON *fetch_json(const char *url, const char *ca_pem, const char *what,
                         int64_t *max_age, char *err, size_t errlen)
{
    struct cmg_fetch_req req = {.url = url, .ca_pem = ca_pem, .timeout_ms = FETCH_TIMEOUT_MS,
                                .max_body = CMG_OIDC_DOC_MAX};
    struct cmg_fetch_resp resp = {0};
    char why[512];
    cJSON *doc = NULL;

    if (strncmp(url, "https://", 8) && strncmp(url, "http://", 7))
        snprintf(err, errlen, "the %s URL %s is not http(s)", what, url);
    else if (cmg_fetch(&req, &resp, why, sizeof(why)) != CMG_FETCH_OK)
        snprintf(err, errlen, "the %s at %s: %s", what, url, why);
    else if (resp.status != 200)
        snprintf(err, errlen, "the %s at %s: HTTP status %d, expected 200", what, url,
                 resp.status);
    else if (!cJSON_IsObject(doc = cJSON_ParseWithLength(resp.body ? resp.body : "",
                                                         resp.body_len))) {
        snprintf(err, errlen, "the %s at %s is not a JSON object", what, url);
        cJSON_Delete(doc);
        doc = NULL;
    } else if (max_age)
        *max_age = cache_lifetime(resp.head ? resp.head : "");
    cmg_fetch_resp_free(&resp);
    return doc;
}

/* The jwks_uri (and issuer) of a discovery document. */
static int discover(const struct cmg_oidc_source *src, struct cmg_oidc_fetched *out, char *err,
                    size_t errlen)
{
    cJSON *doc = fetch_json(src->discovery, src->ca_pem, "discovery document", NULL, err,
                            errlen);
    const char *issuer = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "issuer"));
    const char *uri = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "jwks_uri"));
    int rc = -1;

    if (!doc)
        return -1;
    if (!issuer || !*issuer || !uri || !*uri)
        snprintf(err, errlen, "the discovery document at %s names no %s", src->discovery,
                 !issuer || !*issuer ? "issuer" : "jwks_uri");
    else if (src->issuer && *src->issuer && strcmp(src->issuer, issuer))
        snprintf(err, errlen, "the discovery document at %s names issuer %s, expected %s",
                 src->discovery, issuer, src->issuer);
    else if (!strncmp(src->discovery, "https://", 8) && strncmp(uri, "https://", 8))
        snprintf(err, errlen, "the discovery document at %s names jwks_uri %s, expected an "
                 "https URL", src->discovery, uri);
    else if (!(out->issuer = strdup(issuer)) || !(out->jwks_uri = strdup(uri)))
        snprintf(err, errlen, "out of memory");
    else
        rc = 0;
    cJSON_Delete(doc);
    return rc;
}

int cmg_oidc_fetch_keys(const struct cmg_oidc_source *src, struct cmg_oidc_fetched *out,
                        char *err, size_t errlen)
{
    struct cmg_jwks keys = {0};
    char why[256];

    memset(out, 0, sizeof(*out));
    out->max_age = -1;
    if (src->discovery && *src->discovery) {
        if (discover(src, out, err, errlen) < 0)
            goto fail;
    } else if (!src->jwks_uri || !(out->jwks_uri = strdup(src->jwks_uri))) {
        snprintf(err, errlen, "no discovery or JWKS URL");
        goto fail;
    }
    if (!(out->jwks = fetch_json(out->jwks_uri, src->ca_pem, "key set", &out->max_age, err,
                                 errlen)))
        goto fail;
    if (cmg_jwks_from_json(out->jwks, &keys, why, sizeof(why)) < 0) {
        snprintf(err, errlen, "the key set at %s: %s", out->jwks_uri, why);
        goto fail;
    }
    cmg_jwks_free(&keys);
    return 0;
fail:
    cmg_oidc_fetched_free(out);
    return -1;
}

void cmg_oidc_fetched_free(struct cmg_oidc_fetched *f)
{
    free(f->issuer);
    free(f->jwks_uri);
    cJSON_Delete(f->jwks);
    memset(f, 0, sizeof(*f));
    f->max_age = -1;
}

/* ---- the fetch process ---- */

/* The child's job: fetches, writes its answer (a JSON object: the keys, or "error"). */
static void fetch_job(void *arg, int fd)
{
    const struct cmg_oidc_source *src = arg;
    struct cmg_oidc_fetched f;
    char err[768];
    cJSON *o = cJSON_CreateObject();
    char *text;

    if (cmg_oidc_fetch_keys(src, &f, err, sizeof(err)) < 0) {
        cJSON_AddStringToObject(o, "error", err);
    } else {
        cJSON_AddStringToObject(o, "jwks_uri", f.jwks_uri);
        cJSON_AddNumberToObject(o, "max_age", (double)f.max_age);
        cJSON_AddItemToObject(o, "jwks", f.jwks);
        f.jwks = NULL;
    }
    if ((text = cJSON_PrintUnformatted(o)))
        cmg_child_write(fd, text, strlen(text));
}

/* ---- the refresher (on the site's event loop) ---- */

struct cmg_oidc_refresher {
    struct cmg_loop *loop;
    struct cmg_site_ctx *ctx;
    void (*changed)(void *arg);
    void *arg;
    struct cmg_timer next;
    struct cmg_child fetch;  /* the fetch process */
    char *source;            /* discovery or JWKS URL + roots of the fetch under way */
    char *url;               /* the URL named in logs */
    uint64_t kid_refresh_ms; /* when the last unknown-kid refresh was due */
    bool kid_refreshed;
    bool failing;
    char last_error[768];
    uint64_t error_logged_ms;
    time_t last_ok;          /* the last fetch that worked; 0: none yet */
};

#define OF(type, member, p) ((type *)((char *)(p) - offsetof(type, member)))

static uint32_t interval_s(const struct cmg_oidc_refresher *r)
{
    return r->ctx->oidc_refresh_s ? r->ctx->oidc_refresh_s : CMG_SITE_OIDC_REFRESH_S;
}

static void on_next(struct cmg_timer *t);

static void schedule(struct cmg_oidc_refresher *r, uint64_t ms)
{
    cmg_timer_stop(r->loop, &r->next);
    cmg_timer_start(r->loop, &r->next, ms, on_next);
}

/* What identifies where the keys come from: an admin change of it during a fetch
 * makes the fetch's answer stale. */
static char *source_key(const struct cmg_oidc_conf *o)
{
    const char *d = o->discovery ? o->discovery : "";
    const char *j = o->jwks_uri ? o->jwks_uri : "";
    const char *c = o->ca ? o->ca : "";
    size_t n = strlen(d) + strlen(j) + strlen(c) + 3;
    char *k = malloc(n);

    if (k)
        snprintf(k, n, "%s\n%s\n%s", d, *d ? "" : j, c);
    return k;
}

static bool refreshable(const struct cmg_oidc_conf *o)
{
    return (o->discovery && *o->discovery) || (o->jwks_uri && *o->jwks_uri);
}

/* The kids of a key set, comma-separated, that are not in other. */
static void kids_missing(const cJSON *set, const cJSON *other, char *out, size_t len)
{
    const cJSON *k, *o;
    size_t used = 0;

    out[0] = '\0';
    cJSON_ArrayForEach(k, cJSON_GetObjectItemCaseSensitive(set, "keys")) {
        const char *kid = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(k, "kid"));
        bool found = false;
        cJSON_ArrayForEach(o, cJSON_GetObjectItemCaseSensitive(other, "keys")) {
            const char *ok = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "kid"));
            found = found || (kid && ok && !strcmp(kid, ok));
        }
        if (!found && used < len) {
            int w = snprintf(out + used, len - used, "%s%s", used ? "," : "", kid ? kid : "?");
            used += w > 0 ? (size_t)w : 0;
        }
    }
}

static void failed(struct cmg_oidc_refresher *r, const char *why)
{
    uint32_t retry = interval_s(r) < RETRY_S ? interval_s(r) : RETRY_S;
    uint64_t now = cmg_loop_now(r->loop);

    /* The same failure again is logged once per refresh interval. */
    if (strcmp(why, r->last_error) ||
        now - r->error_logged_ms >= (uint64_t)interval_s(r) * 1000) {
        cmg_warn("OIDC keys: cannot refresh from %s: %s; the keys in force stay; retrying "
                 "every %u s", r->url ? r->url : "?", why, retry);
        snprintf(r->last_error, sizeof(r->last_error), "%s", why);
        r->error_logged_ms = now;
    }
    r->failing = true;
    schedule(r, (uint64_t)retry * 1000);
}

/* How long the fetched keys are fresh: the provider's word within bounds (the lower
 * one no longer than the configured interval), else the configured interval. */
static uint64_t lifetime_s(const struct cmg_oidc_refresher *r, int64_t max_age)
{
    uint64_t lo = interval_s(r) < MIN_LIFETIME_S ? interval_s(r) : MIN_LIFETIME_S;

    if (max_age < 0)
        return interval_s(r);
    return (uint64_t)max_age < lo ? lo : (uint64_t)max_age > MAX_LIFETIME_S ? MAX_LIFETIME_S
                                                                           : (uint64_t)max_age;
}

/* Stores new keys; 1 if they changed, 0 if not, -1 on a store failure. */
static int store_keys(struct cmg_oidc_refresher *r, const struct cmg_oidc_conf *o,
                      const cJSON *jwks, const char *jwks_uri, uint64_t fresh_s)
{
    struct cmg_store *st = r->ctx->store;
    char *text = cJSON_PrintUnformatted(jwks);
    cJSON *old = cJSON_Parse(o->jwks ? o->jwks : "{}");
    char added[256], removed[256];
    int rc = -1;

    if (!text)
        goto out;
    if (o->jwks && !strcmp(text, o->jwks) && o->jwks_uri && !strcmp(jwks_uri, o->jwks_uri)) {
        cmg_debug("OIDC keys from %s unchanged; next refresh in %llu s", jwks_uri,
                  (unsigned long long)fresh_s);
        rc = 0;
        goto out;
    }
    if (cmg_store_begin(st) < 0 || cmg_store_oidc_keys_set(st, text, jwks_uri) < 0 ||
        cmg_store_commit(st) < 0) {
        cmg_store_rollback(st);
        cmg_error("OIDC keys: cannot store the keys fetched from %s: %s", jwks_uri,
                  cmg_store_error(st));
        goto out;
    }
    kids_missing(jwks, old, added, sizeof(added));
    kids_missing(old, jwks, removed, sizeof(removed));
    cmg_info("OIDC keys from %s changed: added kid %s, removed kid %s; %d key(s) in force; "
             "next refresh in %llu s", jwks_uri, added[0] ? added : "(none)",
             removed[0] ? removed : "(none)",
             cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(jwks, "keys")),
             (unsigned long long)fresh_s);
    rc = 1;
out:
    cJSON_Delete(old);
    free(text);
    return rc;
}

/* The child's answer, checked here again: it is what the provider sent. */
static void apply(struct cmg_oidc_refresher *r)
{
    cJSON *doc = cJSON_ParseWithLength(r->fetch.answer ? r->fetch.answer : "", r->fetch.len);
    const cJSON *jwks = cJSON_GetObjectItemCaseSensitive(doc, "jwks");
    const char *uri = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "jwks_uri"));
    const char *error = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "error"));
    const cJSON *age = cJSON_GetObjectItemCaseSensitive(doc, "max_age");
    struct cmg_oidc_conf o = {0};
    struct cmg_jwks keys = {0};
    char why[300], *now_key = NULL;
    uint64_t fresh;
    int rc;

    if (error || !cJSON_IsObject(jwks) || !uri || !cJSON_IsNumber(age)) {
        failed(r, error ? error : "the fetch process gave no answer");
        goto out;
    }
    if (cmg_jwks_from_json(jwks, &keys, why, sizeof(why)) < 0) {
        failed(r, why);
        goto out;
    }
    if ((rc = cmg_store_oidc_get(r->ctx->store, &o)) != 0 || !(now_key = source_key(&o)) ||
        strcmp(now_key, r->source)) {
        /* cleared or set again meanwhile: the next round fetches what is set now */
        schedule(r, rc < 0 ? (uint64_t)RETRY_S * 1000 : FIRST_REFRESH_MS);
        goto out;
    }
    fresh = lifetime_s(r, (int64_t)age->valuedouble);
    if ((rc = store_keys(r, &o, jwks, uri, fresh)) < 0) {
        failed(r, "the store refused the new keys");
        goto out;
    }
    if (r->failing)
        cmg_info("OIDC keys: refresh from %s works again", r->url);
    r->failing = false;
    r->last_error[0] = '\0';
    r->last_ok = time(NULL);
    schedule(r, fresh * 1000);
    if (rc == 1 && r->changed)
        r->changed(r->arg);
out:
    cmg_jwks_free(&keys);
    cmg_oidc_conf_free(&o);
    free(now_key);
    cJSON_Delete(doc);
}

static void fetched(struct cmg_child *c, const char *failure)
{
    struct cmg_oidc_refresher *r = OF(struct cmg_oidc_refresher, fetch, c);

    if (failure)
        failed(r, failure);
    else
        apply(r);
    cmg_child_stop(c);
}

/* Starts the fetch process for o. */
static int start_fetch(struct cmg_oidc_refresher *r, const struct cmg_oidc_conf *o)
{
    struct cmg_oidc_source src = {
        .discovery = o->discovery, .jwks_uri = o->jwks_uri,
        .ca_pem = o->ca && *o->ca ? o->ca : NULL, .issuer = o->issuer};

    return cmg_child_start(&r->fetch, fetch_job, &src);
}

static void on_next(struct cmg_timer *t)
{
    struct cmg_oidc_refresher *r = OF(struct cmg_oidc_refresher, next, t);
    struct cmg_oidc_conf o;
    int rc = cmg_store_oidc_get(r->ctx->store, &o);

    if (rc != 0 || !refreshable(&o)) {
        /* nothing to follow (yet): look again after an interval or an 'oidc set' */
        schedule(r, (uint64_t)(rc < 0 ? RETRY_S : interval_s(r)) * 1000);
        goto out;
    }
    free(r->source);
    free(r->url);
    r->source = source_key(&o);
    r->url = strdup(o.discovery && *o.discovery ? o.discovery : o.jwks_uri);
    if (!r->source || !r->url || start_fetch(r, &o) < 0) {
        char why[128];
        snprintf(why, sizeof(why), "cannot start the fetch process: %s", strerror(errno));
        failed(r, why);
    }
out:
    cmg_oidc_conf_free(&o);
}

struct cmg_oidc_refresher *cmg_oidc_refresher_new(struct cmg_loop *loop,
                                                  struct cmg_site_ctx *ctx,
                                                  void (*changed)(void *arg), void *arg)
{
    struct cmg_oidc_refresher *r = calloc(1, sizeof(*r));

    if (!r)
        return NULL;
    r->loop = loop;
    r->ctx = ctx;
    r->changed = changed;
    r->arg = arg;
    cmg_child_init(&r->fetch, loop, CMG_OIDC_FETCH_DEADLINE_S, ANSWER_MAX, fetched);
    schedule(r, FIRST_REFRESH_MS);
    return r;
}

/* Worth a refresh: a plain key id that the keys in force lack, of keys that can be
 * refreshed. */
static bool kid_worth_a_refresh(struct cmg_oidc_refresher *r, const char *kid)
{
    struct cmg_oidc_conf o;
    cJSON *doc = NULL;
    const cJSON *k;
    bool worth = false;

    if (!cmg_jwk_kid_plain(kid))
        return false;
    if (cmg_store_oidc_get(r->ctx->store, &o) != 0)
        return false;
    if (refreshable(&o) && (doc = cJSON_Parse(o.jwks ? o.jwks : "{}"))) {
        worth = true;
        cJSON_ArrayForEach(k, cJSON_GetObjectItemCaseSensitive(doc, "keys")) {
            const char *have = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(k, "kid"));
            worth = worth && !(have && !strcmp(have, kid));
        }
    }
    cJSON_Delete(doc);
    cmg_oidc_conf_free(&o);
    return worth;
}

void cmg_oidc_refresher_unknown_kid(struct cmg_oidc_refresher *r, const char *kid)
{
    uint64_t now, at = 0, gap = (uint64_t)KID_REFRESH_GAP_S * 1000;

    if (!r || cmg_child_running(&r->fetch))
        return;   /* a fetch is under way */
    now = cmg_loop_now(r->loop);
    if (r->kid_refreshed && now - r->kid_refresh_ms < gap)
        at = r->kid_refresh_ms + gap - now;
    if (cmg_timer_armed(&r->next) && r->next.when <= now + at)
        return;   /* due sooner anyway */
    if (!kid_worth_a_refresh(r, kid))
        return;   /* a gateway behind on the policy, or no URL to refresh from */
    cmg_info("OIDC keys: a gateway saw a token signed with key id %s, which the keys in "
             "force lack: refreshing in %llu s", kid, (unsigned long long)(at / 1000));
    r->kid_refresh_ms = now + at;
    r->kid_refreshed = true;
    schedule(r, at);
}

cJSON *cmg_oidc_refresher_status(const struct cmg_oidc_refresher *r)
{
    cJSON *o = cJSON_CreateObject();
    uint64_t now = cmg_loop_now(r->loop);
    uint64_t next = cmg_timer_armed(&r->next) && r->next.when > now ? r->next.when - now : 0;

    cJSON_AddBoolToObject(o, "fetching", cmg_child_running(&r->fetch));
    cJSON_AddNumberToObject(o, "next_in", cmg_child_running(&r->fetch) ? 0 : (double)((next + 999) / 1000));
    cJSON_AddNumberToObject(o, "last_ok", (double)r->last_ok);
    cJSON_AddStringToObject(o, "last_error", r->failing ? r->last_error : "");
    return o;
}

void cmg_oidc_refresher_free(struct cmg_oidc_refresher *r)
{
    if (!r)
        return;
    cmg_child_stop(&r->fetch);
    cmg_timer_stop(r->loop, &r->next);
    free(r->source);
    free(r->url);
    free(r);
}
