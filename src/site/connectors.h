/* Certificates of the site <-> connector channel: one per connector (marked with
 * OpenCMG's connector extended key usage only, so that neither a device path nor
 * any other TLS client takes it), and the site's own (serverAuth and OpenCMG's site
 * usage, which connectors require: a gateway's certificate of the same CA is not
 * the site's). */
#ifndef CMG_SITE_CONNECTORS_H
#define CMG_SITE_CONNECTORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

#define CMG_SITE_CONNECTOR_DAYS 730
#define CMG_SITE_CHANNEL_DAYS 730
#define CMG_SITE_CHANNEL_CERT "site.crt"
#define CMG_SITE_CHANNEL_KEY "site.key"
#define CMG_SITE_CONNECTORS_DIR "connectors"

/* What was issued to a connector. */
struct cmg_connector_cert {
    char serial[80];      /* upper-case hex, as the store and the policy hold it */
    int64_t issued, expires;
};

/* Issues connector NAME's certificate (naming crl_url as its CRL distribution point,
 * unless NULL) and key and writes them to crt and key. -1 with the reason in err. */
int cmg_site_connector_issue(X509 *ca_cert, EVP_PKEY *ca_key, const char *crl_url,
                             const char *name,
                             const char *crt, const char *key, struct cmg_connector_cert *out,
                             char *err, size_t errlen);
/* A connector name: letters, digits, '.', '_' and '-', at most 64. */
int cmg_site_connector_name_ok(const char *name);
/* The address connectors reach a site listener at: host:port with the host of
 * 'connector_address' (site.conf, 'site init --site-address') and the listener's port;
 * without one, the listen address itself. */
void cmg_site_reach(const char *listen, const char *address, char *out, size_t outlen);
/* The listen address takes every address of the host (0.0.0.0, [::]): no
 * connector can dial it as it is. */
bool cmg_site_listen_wildcard(const char *listen);
/* Makes DIR/site.crt and DIR/site.key unless a valid pair of this CA is there. Its
 * names: localhost, 127.0.0.1, ::1 and the host of each listen address; its CRL
 * distribution point crl_url (none if NULL). */
int cmg_site_channel_cert(const char *dir, X509 *ca_cert, EVP_PKEY *ca_key,
                          const char *crl_url, const char *const *listen, size_t nlisten,
                          char *err, size_t errlen);

#endif
