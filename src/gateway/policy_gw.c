/* The policy in force at the gateway: the local one from gateway.conf until the
 * site's signed policy arrives through a connector; then only newer signed ones
 * replace it. The last good one is kept on disk and served at once after a restart,
 * before any connector is back. Requests already admitted keep the policy they
 * were admitted under (they hold a reference), so nothing in flight is dropped. */
#include "core/config.h"
#include "core/log.h"
#include "gateway/gw.h"
#include "gateway/notify.h"
#include "site/pki.h"

#include <openssl/x509_vfy.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static struct cmg_policy *local_policy(struct cmg_gateway *gw)
{
    struct cmg_gw_config *c = &gw->cfg;
    struct cmg_policy *p = cmg_policy_new();

    if (!p)
        return NULL;
    snprintf(p->service_name, sizeof(p->service_name), "%s", c->service_name);
    p->mappings = calloc(c->nmappings ? c->nmappings : 1, sizeof(*p->mappings));
    p->trust = X509_STORE_new();
    if (!p->mappings || !p->trust || X509_STORE_load_file(p->trust, c->client_ca) != 1) {
        cmg_log_ssl(CMG_LOG_ERROR, "cannot load client_ca %s", c->client_ca);
        cmg_policy_unref(p);
        return NULL;
    }
    if (c->nmappings)   /* none in gateway.conf: c->mappings is NULL */
        memcpy(p->mappings, c->mappings, c->nmappings * sizeof(*p->mappings));
    p->nmappings = c->nmappings;
    return p;
}

static void on_policy_age(struct cmg_timer *t)
{
    struct cmg_gateway *gw =
        (struct cmg_gateway *)((char *)t - offsetof(struct cmg_gateway, policy_age_timer));

    cmg_warn("policy version %lld in force was signed %lld s ago, more than max_policy_age "
             "(%u s): no newer policy came from the site; are the connectors and the site "
             "running?", (long long)gw->policy->version,
             (long long)(time(NULL) - gw->policy->issued_at), gw->cfg.max_policy_age_ms / 1000);
    cmg_timer_start(gw->loop, &gw->policy_age_timer, CMG_POLICY_AGE_REPEAT_MS, on_policy_age);
}

/* Warns once the signed policy in force grows older than max_policy_age. */
static void watch_age(struct cmg_gateway *gw)
{
    const struct cmg_policy *p = gw->policy;
    int64_t left_ms = (p->issued_at + gw->cfg.max_policy_age_ms / 1000 - time(NULL)) * 1000;

    cmg_timer_stop(gw->loop, &gw->policy_age_timer);
    if (p->issued_at > 0 && gw->cfg.max_policy_age_ms > 0)
        cmg_timer_start(gw->loop, &gw->policy_age_timer, left_ms > 0 ? (uint64_t)left_ms : 0,
                        on_policy_age);
}

static void apply(struct cmg_gateway *gw, struct cmg_policy *p, const char *from)
{
    cmg_policy_unref(gw->policy);
    gw->policy = p;
    gw->policy_gen++;
    cmg_info("policy version %lld in force (from %s): %zu mapping(s), revocation check %s, "
             "oidc %s, %zu blocked device(s), signed by site key id %s",
             (long long)p->version, from, p->nmappings, p->check_revocation ? "on" : "off",
             p->oidc ? "on" : "off", p->nblocked_devices,
             cmg_keychain_newest(&gw->site_keys)->kid);
    watch_age(gw);
    cmg_tunnel_close_revoked(gw);
    cmg_notify_policy(gw);
    cmg_gw_ready_news(gw);
}

/* Parses and checks a signed policy; NULL (with a log line) if it must be refused. */
static struct cmg_policy *accept_signed(struct cmg_gateway *gw, const char *jws, size_t len,
                                        const char *from)
{
    struct cmg_policy *p;
    size_t trusted = gw->site_keys.n;
    char err[CMG_KEYCHAIN_MAX * 50 + 300];

    if (!trusted) {
        cmg_warn("policy from %s refused: no site_key in the configuration to verify it", from);
        return NULL;
    }
    if (cmg_policy_from_jws(jws, len, &gw->site_keys, &p, err, sizeof(err)) < 0) {
        cmg_warn("policy from %s refused: %s (version %lld stays in force)", from, err,
                 (long long)(gw->policy ? gw->policy->version : 0));
        cmg_keychain_remember(&gw->site_keys, trusted, gw->policy_cache);
        return NULL;
    }
    cmg_keychain_remember(&gw->site_keys, trusted, gw->policy_cache);
    if (strcmp(p->service_name, gw->cfg.service_name)) {
        cmg_warn("policy from %s refused: it is for service %s, this gateway is %s", from,
                 p->service_name, gw->cfg.service_name);
        cmg_policy_unref(p);
        return NULL;
    }
    if (gw->policy && p->version <= gw->policy->version) {
        if (p->version < gw->policy->version)
            cmg_warn("policy from %s refused: version %lld is older than version %lld in force",
                     from, (long long)p->version, (long long)gw->policy->version);
        cmg_policy_unref(p);
        return NULL;
    }
    return p;
}

void cmg_gw_policy_offer(struct cmg_gateway *gw, const char *jws, size_t len, const char *from)
{
    struct cmg_policy *p = accept_signed(gw, jws, len, from);

    if (!p)
        return;
    apply(gw, p, from);
    if (gw->policy_cache[0] && cmg_pki_write_file(gw->policy_cache, jws, len, 0644) < 0)
        cmg_warn("cannot keep the policy in %s: a restart will wait for a connector",
                 gw->policy_cache);
}

int cmg_gw_policy_init(struct cmg_gateway *gw)
{
    struct cmg_gw_config *c = &gw->cfg;
    struct cmg_jwk pinned = {0};
    unsigned char *data = NULL;
    size_t len = 0;
    char err[300];
    struct cmg_policy *p;

    if (!(gw->policy = local_policy(gw)))
        return -1;
    if (!c->site_key[0]) {
        cmg_info("no site_key: signed policies are refused, the mappings of %s apply", c->file);
        return 0;
    }
    if (cmg_policy_load_site_key(c->site_key, &pinned, err, sizeof(err)) < 0 ||
        cmg_keychain_init(&gw->site_keys, &pinned) < 0) {
        cmg_error("site_key: %s", pinned.pkey ? "its key id cannot be computed" : err);
        EVP_PKEY_free(pinned.pkey);
        return -1;
    }
    EVP_PKEY_free(pinned.pkey);
    if (c->policy_cache[0])
        snprintf(gw->policy_cache, sizeof(gw->policy_cache), "%s", c->policy_cache);
    else {
        char dir[PATH_MAX];
        cmg_conf_dir(c->file, dir, sizeof(dir));
        if (cmg_conf_path(gw->policy_cache, sizeof(gw->policy_cache), dir,
                          "policy-cache.jws") < 0)
            gw->policy_cache[0] = 0;
    }
    cmg_keychain_restore(&gw->site_keys, gw->policy_cache);
    if (!gw->policy_cache[0] ||
        access(gw->policy_cache, R_OK) != 0 ||
        cmg_pki_read_file(gw->policy_cache, CMG_POLICY_MAX, &data, &len) < 0)
        return 0;
    /* The cache is read like any offer: verified, never trusted as it lies on disk. */
    gw->policy->version = 0;
    p = accept_signed(gw, (const char *)data, len, gw->policy_cache);
    if (p)
        apply(gw, p, "cache");
    free(data);
    return 0;
}

void cmg_gw_policy_free(struct cmg_gateway *gw)
{
    cmg_timer_stop(gw->loop, &gw->policy_age_timer);
    cmg_policy_unref(gw->policy);
    gw->policy = NULL;
    cmg_keychain_free(&gw->site_keys);
}
