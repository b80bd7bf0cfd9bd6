/* An open site directory: its configuration (site.conf), its keys and its store.
 * The admin commands and the site server both work through one of these. */
#ifndef CMG_SITE_CTX_H
#define CMG_SITE_CTX_H

#include "auth/jwk.h"
#include "core/metrics.h"
#include "site/store.h"

#include <limits.h>
#include <stdbool.h>
#include <openssl/x509.h>

#define CMG_SITE_CONF "site.conf"
#define CMG_SITE_SIGNING_KEY "site-signing.key"
#define CMG_SITE_SIGNING_PUB "site-signing.pub"
#define CMG_SITE_ADMIN_TOKEN "admin.token"
#define CMG_SITE_DEFAULT_ADMIN "127.0.0.1:8090"
#define CMG_SITE_DEFAULT_SERVICE "127.0.0.1:8091"
#define CMG_SITE_DEFAULT_FEED "127.0.0.1:8092"
#define CMG_SITE_OIDC_REFRESH_S 3600     /* default site.conf oidc_refresh */
#define CMG_SITE_REPORT_RETENTION_S (31 * 86400)
#define CMG_SITE_NOTIFY_RETENTION_S (7 * 86400)
#define CMG_BULK_DEFAULT_DAYS 3
#define CMG_BULK_MAX_DAYS 7
#define CMG_DEVICE_TOKEN_DAYS 90
#define CMG_DEVICE_RENEW_DAYS 30

struct cmg_site_ctx {
    char dir[PATH_MAX];
    char service_name[256];
    char site_role[65];
    char issuer[128];            /* "iss" of every site token */
    char admin_listen[300], service_listen[300], feed_listen[300];
    struct cmg_metrics_conf metrics;   /* metrics_listen */
    char crl_url[300];           /* the CRL distribution point certificates name, or "" */
    char connector_address[256];   /* the host connectors reach the site at, or "" */
    int log_level;
    int log_format;              /* enum cmg_log_format */
    uint32_t oidc_refresh_s;     /* OIDC key refresh interval (site.conf oidc_refresh) */
    EVP_PKEY *sign_key;          /* ES256, signs tokens and the policy: the current key */
    struct cmg_jwk sign_pub;     /* its public half, kid = RFC 7638 thumbprint */
    int64_t sign_created;        /* when it was made (signing.c) */
    int64_t key_rotation_s;      /* site.conf key_rotation: its age at rotation; 0 never */
    uint32_t report_interval_s;  /* site.conf report_interval (reports.c) */
    int64_t report_retention_s;  /* site.conf report_retention: traffic_5m kept this long */
    int64_t notify_retention_s;  /* site.conf notify_retention: per-device notify rows */
    X509 *ca_cert;
    EVP_PKEY *ca_key;
    char admin_token[65];
    struct cmg_store *store;
    bool confined;               /* the admin API: files are written inside dir only */
};

/* Opens DIR: reads site.conf, loads the CA and the signing key (making the signing key
 * and the admin token if they are missing), opens the store.
 * -1 with a reason in err. */
int cmg_site_open(const char *dir, struct cmg_site_ctx *s, char *err, size_t errlen);
void cmg_site_close(struct cmg_site_ctx *s);
/* Reads s->dir/site.conf into s (its keys only: nothing is loaded or opened). */
int cmg_site_read_conf(struct cmg_site_ctx *s, char *err, size_t errlen);
/* Makes what cmg_site_open needs beyond the CA if missing: signing key pair, admin
 * token. Used by 'site init' too. */
int cmg_site_ensure_secrets(const char *dir, char *err, size_t errlen);
/* Writes DIR/site-signing.pub, the public half of key. */
int cmg_site_write_signing_pub(const char *dir, EVP_PKEY *key);
/* The CRL distribution point of a site whose gateway devices reach at
 * service_name:port: https://NAME[:PORT]/CCM_CRL/site.crl (no ":443"). */
void cmg_site_crl_url(const char *service_name, unsigned port, char *out, size_t outlen);
/* The issuer name of a site's tokens. */
void cmg_site_issuer(const char *site_role, char *out, size_t outlen);

#endif
