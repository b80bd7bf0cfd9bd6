/* Opening a site directory; see ctx.h. */
#include "site/ctx.h"

#include "core/config.h"
#include "auth/policy.h"
#include "core/log.h"
#include "site/ops.h"
#include "site/pki.h"
#include "site/signing.h"

#include <errno.h>
#include <ini.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

void cmg_site_issuer(const char *site_role, char *out, size_t outlen)
{
    snprintf(out, outlen, "opencmg-site:%s", site_role);
}

void cmg_site_crl_url(const char *service_name, unsigned port, char *out, size_t outlen)
{
    char at[16] = "";

    if (port != 443)
        snprintf(at, sizeof(at), ":%u", port);
    snprintf(out, outlen, "https://%s%s%s", service_name, at, CMG_CRL_PATH);
}

static int path_in(char *out, size_t len, const char *dir, const char *name)
{
    return snprintf(out, len, "%s/%s", dir, name) < (int)len ? 0 : -1;
}

/* A random hex secret written once to dir/name (mode 0600). */
static int ensure_secret(const char *dir, const char *name, char *err, size_t errlen)
{
    char path[PATH_MAX], hex[65];
    unsigned char r[32];
    struct stat st;

    if (path_in(path, sizeof(path), dir, name) < 0)
        return -1;
    if (stat(path, &st) == 0)
        return 0;
    if (RAND_bytes(r, sizeof(r)) != 1)
        return -1;
    for (size_t i = 0; i < sizeof(r); i++)
        snprintf(hex + 2 * i, 3, "%02x", r[i]);
    hex[64] = '\n';
    if (cmg_pki_write_file(path, hex, 65, 0600) < 0) {
        snprintf(err, errlen, "cannot write %s", path);
        return -1;
    }
    return 0;
}

int cmg_site_write_signing_pub(const char *dir, EVP_PKEY *key)
{
    char path[PATH_MAX], *data;
    BIO *bio = BIO_new(BIO_s_mem());
    long len;
    int rc = -1;

    if (path_in(path, sizeof(path), dir, CMG_SITE_SIGNING_PUB) == 0 && bio &&
        PEM_write_bio_PUBKEY(bio, key) == 1 && (len = BIO_get_mem_data(bio, &data)) > 0)
        rc = cmg_pki_write_file(path, data, (size_t)len, 0644);
    BIO_free(bio);
    return rc;
}

int cmg_site_ensure_secrets(const char *dir, char *err, size_t errlen)
{
    char key_path[PATH_MAX], pub_path[PATH_MAX];
    EVP_PKEY *key = NULL;
    struct stat st;
    int rc = -1;

    if (path_in(key_path, sizeof(key_path), dir, CMG_SITE_SIGNING_KEY) < 0 ||
        path_in(pub_path, sizeof(pub_path), dir, CMG_SITE_SIGNING_PUB) < 0)
        return -1;
    if (stat(key_path, &st) != 0) {
        if (!(key = cmg_pki_new_key()) || cmg_pki_write_key(key_path, key) < 0) {
            snprintf(err, errlen, "cannot write the signing key %s", key_path);
            goto out;
        }
    } else if (!(key = cmg_pki_load_key(key_path))) {
        snprintf(err, errlen, "cannot read the signing key %s", key_path);
        goto out;
    }
    if (stat(pub_path, &st) != 0 && cmg_site_write_signing_pub(dir, key) < 0) {
        snprintf(err, errlen, "cannot write %s", pub_path);
        goto out;
    }
    if (ensure_secret(dir, CMG_SITE_ADMIN_TOKEN, err, errlen) < 0)
        goto out;
    rc = 0;
out:
    EVP_PKEY_free(key);
    return rc;
}

static int read_secret(const char *dir, const char *name, char out[65], char *err,
                       size_t errlen)
{
    char path[PATH_MAX];
    unsigned char *data = NULL;
    size_t len = 0;

    if (path_in(path, sizeof(path), dir, name) < 0 ||
        cmg_pki_read_file(path, 1024, &data, &len) < 0) {
        snprintf(err, errlen, "cannot read %s/%s", dir, name);
        return -1;
    }
    while (len > 0 && (data[len - 1] == '\n' || data[len - 1] == '\r'))
        len--;
    snprintf(out, 65, "%.*s", (int)(len < 64 ? len : 64), (const char *)data);
    free(data);
    return 0;
}

struct conf_state {
    struct cmg_site_ctx *s;
    char *err;
    size_t errlen;
    int failed;
};

static int conf_entry(void *user, const char *section, const char *name, const char *value)
{
    struct conf_state *cs = user;
    struct cmg_site_ctx *s = cs->s;
    int rc = 0;

    if (strcmp(section, "site"))
        return 1;   /* sections of later versions are left alone */
    if (!strcmp(name, "service_name"))
        rc = cmg_conf_str(s->service_name, sizeof(s->service_name), value);
    else if (!strcmp(name, "site_role"))
        rc = cmg_conf_str(s->site_role, sizeof(s->site_role), value);
    else if (!strcmp(name, "admin_listen"))
        rc = cmg_conf_str(s->admin_listen, sizeof(s->admin_listen), value);
    else if (!strcmp(name, "service_listen"))
        rc = cmg_conf_str(s->service_listen, sizeof(s->service_listen), value);
    else if (!strcmp(name, "metrics_listen"))
        rc = cmg_metrics_conf_set(&s->metrics, value);
    else if (!strcmp(name, "feed_listen"))
        rc = cmg_conf_str(s->feed_listen, sizeof(s->feed_listen), value);
    else if (!strcmp(name, "crl_url"))
        rc = strncmp(value, "https://", 8) && strncmp(value, "http://", 7)
                 ? -1 : cmg_conf_str(s->crl_url, sizeof(s->crl_url), value);
    else if (!strcmp(name, "connector_address"))
        rc = cmg_conf_str(s->connector_address, sizeof(s->connector_address), value);
    else if (!strcmp(name, "oidc_refresh")) {
        uint64_t v;
        rc = cmg_conf_uint(value, 1, 86400, &v);
        s->oidc_refresh_s = (uint32_t)v;
    } else if (!strcmp(name, "key_rotation")) {
        s->key_rotation_s = strcmp(value, "0") ? cmg_parse_lifetime(value) : 0;
        rc = s->key_rotation_s < 0 ? -1 : 0;
    } else if (!strcmp(name, "report_interval")) {
        uint64_t v;
        rc = cmg_conf_duration(value, 1, CMG_REPORT_MAX_INTERVAL, &v);
        s->report_interval_s = (uint32_t)v;
    } else if (!strcmp(name, "report_retention")) {
        uint64_t v;
        rc = cmg_conf_duration(value, 3600, 100ull * 366 * 86400, &v);
        s->report_retention_s = (int64_t)v;
    } else if (!strcmp(name, "notify_retention")) {
        uint64_t v;
        rc = cmg_conf_duration(value, 3600, 100ull * 366 * 86400, &v);
        s->notify_retention_s = (int64_t)v;
    } else if (!strcmp(name, "log_level"))
        rc = (s->log_level = cmg_log_parse_level(value)) < 0 ? -1 : 0;
    else if (!strcmp(name, "log_format"))
        rc = (s->log_format = cmg_log_parse_format(value)) < 0 ? -1 : 0;
    else {
        snprintf(cs->err, cs->errlen, "unknown key '%s'", name);
        cs->failed = 1;
        return 0;
    }
    if (rc < 0) {
        snprintf(cs->err, cs->errlen, "bad value for %s: '%s'", name, value);
        cs->failed = 1;
        return 0;
    }
    return 1;
}

int cmg_site_read_conf(struct cmg_site_ctx *s, char *err, size_t errlen)
{
    struct conf_state cs = {s, err, errlen, 0};
    char path[PATH_MAX], msg[256] = "";
    int line;

    snprintf(s->admin_listen, sizeof(s->admin_listen), "%s", CMG_SITE_DEFAULT_ADMIN);
    snprintf(s->service_listen, sizeof(s->service_listen), "%s", CMG_SITE_DEFAULT_SERVICE);
    snprintf(s->feed_listen, sizeof(s->feed_listen), "%s", CMG_SITE_DEFAULT_FEED);
    s->log_level = CMG_LOG_INFO;
    s->log_format = CMG_LOG_TEXT;
    cmg_metrics_conf_default(&s->metrics, CMG_METRICS_SITE_DEFAULT);
    s->oidc_refresh_s = CMG_SITE_OIDC_REFRESH_S;
    s->key_rotation_s = CMG_SITE_KEY_ROTATION_S;
    s->report_interval_s = CMG_REPORT_INTERVAL_DEFAULT;
    s->report_retention_s = CMG_SITE_REPORT_RETENTION_S;
    s->notify_retention_s = CMG_SITE_NOTIFY_RETENTION_S;
    if (path_in(path, sizeof(path), s->dir, CMG_SITE_CONF) < 0)
        return -1;
    cs.err = msg;
    cs.errlen = sizeof(msg);
    line = ini_parse(path, conf_entry, &cs);
    if (line < 0) {
        snprintf(err, errlen, "%s: %s (is this a site directory made by 'cmg site init'?)",
                 path, strerror(errno));
        return -1;
    }
    if (line > 0 || cs.failed) {
        snprintf(err, errlen, "%s:%d: %s", path, line, msg[0] ? msg : "syntax error");
        return -1;
    }
    if (!s->service_name[0] || !s->site_role[0]) {
        snprintf(err, errlen, "%s: service_name and site_role are required", path);
        return -1;
    }
    cmg_site_issuer(s->site_role, s->issuer, sizeof(s->issuer));
    return 0;
}

int cmg_site_open(const char *dir, struct cmg_site_ctx *s, char *err, size_t errlen)
{
    char path[PATH_MAX];

    memset(s, 0, sizeof(*s));
    if (!realpath(dir, s->dir)) {
        snprintf(err, errlen, "%s: %s", dir, strerror(errno));
        return -1;
    }
    if (cmg_site_read_conf(s, err, errlen) < 0 || cmg_site_ensure_secrets(s->dir, err, errlen) < 0)
        goto fail;
    if (path_in(path, sizeof(path), s->dir, "ca.crt") < 0 || !(s->ca_cert = cmg_pki_load_cert(path)) ||
        path_in(path, sizeof(path), s->dir, "ca.key") < 0 || !(s->ca_key = cmg_pki_load_key(path))) {
        snprintf(err, errlen, "cannot load the site CA from %s", s->dir);
        goto fail;
    }
    if (read_secret(s->dir, CMG_SITE_ADMIN_TOKEN, s->admin_token, err, errlen) < 0 ||
        cmg_store_open(s->dir, &s->store, err, errlen) < 0 ||
        cmg_site_signing_load(s, err, errlen) < 0)
        goto fail;
    return 0;
fail:
    cmg_site_close(s);
    return -1;
}

void cmg_site_close(struct cmg_site_ctx *s)
{
    cmg_store_close(s->store);
    EVP_PKEY_free(s->sign_key);
    X509_free(s->ca_cert);
    EVP_PKEY_free(s->ca_key);
    OPENSSL_cleanse(s->admin_token, sizeof(s->admin_token));
    memset(s, 0, sizeof(*s));
}
