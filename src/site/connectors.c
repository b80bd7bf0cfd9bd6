/* Certificates of the site <-> connector channel; see connectors.h. */
#include "site/connectors.h"

#include "site/pki.h"
#include "tls/tls.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/x509v3.h>

#define MAX_NAMES 8

int cmg_site_connector_name_ok(const char *name)
{
    size_t len = strlen(name);

    if (len == 0 || len > 64 || name[0] == '.' || name[0] == '-')
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!isalnum((unsigned char)name[i]) && !strchr("._-", name[i]))
            return 0;
    return 1;
}

int cmg_site_connector_issue(X509 *ca_cert, EVP_PKEY *ca_key, const char *crl_url,
                             const char *name,
                             const char *crt, const char *key, struct cmg_connector_cert *out,
                             char *err, size_t errlen)
{
    struct cmg_cert_req req = {0};
    EVP_PKEY *k = cmg_pki_new_key();
    X509 *x = NULL;
    int rc = -1;

    req.cn = name;
    req.ou = "OpenCMG Connector";
    req.o = "OpenCMG";
    req.key = k;
    req.eku = CMG_PKI_EKU_CONNECTOR;   /* tunnels and the site feed, nothing else */
    req.days = CMG_SITE_CONNECTOR_DAYS;
    req.crl_url = crl_url;
    if (!k || !(x = cmg_pki_issue(&req, ca_cert, ca_key))) {
        snprintf(err, errlen, "cannot issue a certificate for connector %s", name);
        goto out;
    }
    if (cmg_pki_write_key(key, k) < 0 || cmg_pki_write_cert(crt, x) < 0) {
        snprintf(err, errlen, "cannot write %s / %s", crt, key);
        goto out;
    }
    cmg_tls_serial(x, out->serial, sizeof(out->serial));
    out->issued = (int64_t)time(NULL);
    out->expires = out->issued + CMG_SITE_CONNECTOR_DAYS * 86400LL;
    rc = 0;
out:
    X509_free(x);
    EVP_PKEY_free(k);
    return rc;
}

/* The host of "host:port" or "[v6]:port" into out. */
static void listen_host(const char *addr, char *out, size_t outlen)
{
    const char *end;

    if (addr[0] == '[') {
        end = strchr(addr, ']');
        snprintf(out, outlen, "%.*s", end ? (int)(end - addr - 1) : 0, addr + 1);
        return;
    }
    end = strrchr(addr, ':');
    snprintf(out, outlen, "%.*s", end ? (int)(end - addr) : (int)strlen(addr), addr);
}

void cmg_site_reach(const char *listen, const char *address, char *out, size_t outlen)
{
    const char *port = strrchr(listen, ':');

    if (!address || !address[0] || !port)
        snprintf(out, outlen, "%s", listen);
    else
        snprintf(out, outlen, strchr(address, ':') ? "[%s]%s" : "%s%s", address, port);
}

bool cmg_site_listen_wildcard(const char *listen)
{
    char host[300];

    listen_host(listen, host, sizeof(host));
    return !host[0] || !strcmp(host, "0.0.0.0") || !strcmp(host, "::") || !strcmp(host, "*");
}

static void add_name(const char *host, const char **dns, size_t *ndns, const char **ips,
                     size_t *nips)
{
    unsigned char buf[16];
    bool ip = inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
    const char **v = ip ? ips : dns;
    size_t *n = ip ? nips : ndns;

    if (!host[0] || *n == MAX_NAMES || !strcmp(host, "0.0.0.0") || !strcmp(host, "::"))
        return;
    for (size_t i = 0; i < *n; i++)
        if (!strcmp(v[i], host))
            return;
    v[(*n)++] = host;
}

/* The pair on disk is this CA's site certificate, unexpired, with every name. */
static bool channel_cert_ok(const char *crt, const char *key, X509 *ca_cert,
                            const char *const *ips, size_t nips, const char *const *dns,
                            size_t ndns)
{
    X509 *x = NULL;
    EVP_PKEY *k = NULL;
    bool ok = false;

    if (access(crt, R_OK) != 0 || access(key, R_OK) != 0)
        return false;
    x = cmg_pki_load_cert(crt);
    k = x ? cmg_pki_load_key(key) : NULL;
    ok = k && X509_check_private_key(x, k) == 1 &&
         X509_check_issued(ca_cert, x) == X509_V_OK &&
         X509_cmp_current_time(X509_get0_notAfter(x)) > 0 &&
         cmg_tls_has_eku(x, CMG_OID_EKU_SITE);
    for (size_t i = 0; ok && i < nips; i++)
        ok = X509_check_ip_asc(x, ips[i], 0) == 1;
    for (size_t i = 0; ok && i < ndns; i++)
        ok = X509_check_host(x, dns[i], 0, 0, NULL) == 1;
    X509_free(x);
    EVP_PKEY_free(k);
    return ok;
}

int cmg_site_channel_cert(const char *dir, X509 *ca_cert, EVP_PKEY *ca_key,
                          const char *crl_url, const char *const *listen, size_t nlisten,
                          char *err, size_t errlen)
{
    char hosts[MAX_NAMES][300], crt[PATH_MAX], key[PATH_MAX];
    const char *dns[MAX_NAMES + 1], *ips[MAX_NAMES + 2];
    size_t ndns = 0, nips = 0;
    struct cmg_cert_req req = {0};
    EVP_PKEY *k = NULL;
    X509 *x = NULL;
    int rc = -1;

    add_name("localhost", dns, &ndns, ips, &nips);
    add_name("127.0.0.1", dns, &ndns, ips, &nips);
    add_name("::1", dns, &ndns, ips, &nips);
    for (size_t i = 0; i < nlisten && i < MAX_NAMES; i++) {
        listen_host(listen[i], hosts[i], sizeof(hosts[i]));
        add_name(hosts[i], dns, &ndns, ips, &nips);
    }
    if (snprintf(crt, sizeof(crt), "%s/%s", dir, CMG_SITE_CHANNEL_CERT) >= (int)sizeof(crt) ||
        snprintf(key, sizeof(key), "%s/%s", dir, CMG_SITE_CHANNEL_KEY) >= (int)sizeof(key)) {
        snprintf(err, errlen, "%s: path too long", dir);
        return -1;
    }
    if (channel_cert_ok(crt, key, ca_cert, ips, nips, dns, ndns))
        return 0;
    req.cn = "OpenCMG site";
    req.o = "OpenCMG";
    req.dns_names = dns;
    req.n_dns_names = ndns;
    req.ip_addrs = ips;
    req.n_ip_addrs = nips;
    req.eku = CMG_PKI_EKU_SERVER | CMG_PKI_EKU_SITE;
    req.days = CMG_SITE_CHANNEL_DAYS;
    req.crl_url = crl_url;
    if (!(k = req.key = cmg_pki_new_key()) || !(x = cmg_pki_issue(&req, ca_cert, ca_key)) ||
        cmg_pki_write_key(key, k) < 0 || cmg_pki_write_cert(crt, x) < 0) {
        snprintf(err, errlen, "cannot make the site's channel certificate %s", crt);
        goto out;
    }
    rc = 0;
out:
    X509_free(x);
    EVP_PKEY_free(k);
    return rc;
}
