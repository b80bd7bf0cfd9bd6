/* cmg site init: creates a site directory for a local deployment: the site CA, the
 * gateway's server certificate, the connector's and a sample device's client certificates,
 * gateway.conf and connector.conf (the format of docs/configuration.md). */
#include "site/init.h"

#include "site/connectors.h"
#include "site/ctx.h"
#include "site/init_store.h"
#include "site/pki.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#define SITE_DEFAULT_GATEWAY_PORT 443
#define SITE_DEFAULT_TUNNEL_PORT 10140
#define SITE_ROLE_ID_BASE UINT64_C(72057594037927936) /* 2^56, as Configuration Manager */
#define SITE_PFX_MAX (16u * 1024 * 1024)
#define SITE_CA_DAYS 3650
#define SITE_SERVER_DAYS 730
#define SITE_DEVICE_DAYS 365
#define SITE_MAX_BODY "1073741824"
#define SITE_FIRST_CONNECTOR "connector-1"

struct site_opts {
    const char *dir;
    const char *name;
    const char **mp_urls;
    size_t n_mp;
    unsigned gateway_port;
    unsigned tunnel_port;
    const char *pfx_path;
    const char *pfx_pass;
    const char *site_admin;
    const char *site_service;
    const char *site_feed;
    const char *site_address;
    int force;
};

/* What the site is made of, before it is written. */
struct site {
    char dir[PATH_MAX]; /* absolute */
    uint64_t *role_ids;
    EVP_PKEY *ca_key, *gw_key, *dev_key;
    X509 *ca_cert, *gw_cert, *dev_cert;
    struct cmg_connector_cert conn;
    unsigned char *pfx;    /* --gateway-pfx: the file as read */
    size_t pfx_len;
    STACK_OF(X509) *gw_ca; /* --gateway-pfx: what the connector trusts (gateway-ca.crt) */
    int gw_ca_has_root;
    char crl_url[300];     /* the CRL distribution point of what the site issues */
};

void cmg_site_init_usage(FILE *out)
{
    fprintf(out,
            "usage: cmg site init DIR --service-name NAME [--mp URL]... [--gateway-port N]\n"
            "                     [--tunnel-port N] [--gateway-pfx FILE [--pfx-password PASS]]\n"
            "                     [--force]\n"
            "\n"
            "Creates the site directory DIR (and its parents if missing) for a local\n"
            "deployment, with:\n"
            "  ca.crt, ca.key                 the site CA (P-256, 10 years)\n"
            "  site-signing.key, .pub         the key that signs tokens and the policy\n"
            "  site.conf, site.db             the site service's settings and store\n"
            "  admin.token                    the admin API's bearer token\n"
            "  site.crt, site.key             the site's certificate: admin API, policy feed\n"
            "                                 and registration service (2 years)\n"
            "  gateway.crt, gateway.key       the gateway's server certificate for NAME,\n"
            "                                 localhost, 127.0.0.1 and ::1 (2 years)\n"
            "  connector.crt, connector.key   certificate of connector-1 (2 years; more with\n"
            "                                 'cmg site connector add NAME')\n"
            "  devices/device1.crt, .key      a sample device client certificate (1 year)\n"
            "  gateway.conf, connector.conf   configurations that work as they are\n"
            "and prints the device-facing URL of every mapping, one per line.\n"
            "\n"
            "options:\n"
            "  --service-name NAME   the DNS name devices use to reach the gateway (required)\n"
            "  --mp URL              publish an internal server (http:// or https://, with an\n"
            "                        optional base path) under a new role id; repeatable\n"
            "  --gateway-port N      device port of the gateway (default %d); the site's\n"
            "                        certificates name https://NAME[:N]/CCM_CRL/site.crl,\n"
            "                        where the gateway serves the CRL, as their CRL\n"
            "                        distribution point\n"
            "  --tunnel-port N       port on which the gateway accepts connectors\n"
            "                        (default %d)\n"
            "  --gateway-pfx FILE    use this PKCS#12 file (certificate and key) as the\n"
            "                        gateway's server certificate instead of issuing one; it is\n"
            "                        copied to DIR/gateway.pfx, and its CA certificates to\n"
            "                        DIR/gateway-ca.crt, which the connector then trusts\n"
            "  --pfx-password PASS   password of the --gateway-pfx file (default: none); it is\n"
            "                        written to gateway.conf\n"
            "  --site-admin ADDR     address of the site's admin API (HTTPS with the site's\n"
            "                        certificate; default " CMG_SITE_DEFAULT_ADMIN ")\n"
            "  --site-feed ADDR      address of the connectors' policy feed (mutual TLS;\n"
            "                        default " CMG_SITE_DEFAULT_FEED ")\n"
            "  --site-service ADDR   address of the site's registration service, published\n"
            "                        to devices under its own role id (default\n"
            "                        " CMG_SITE_DEFAULT_SERVICE ")\n"
            "  --site-address HOST   the name or address connectors on other hosts reach\n"
            "                        the site at: the feed and the registration service\n"
            "                        are published as https://HOST:PORT (their listen\n"
            "                        ports), and the site's certificate names HOST\n"
            "                        (default: the listen addresses, loopback)\n"
            "  --force               replace an existing site in DIR (a new CA: certificates\n"
            "                        of the old site stop working)\n"
            "  -h, --help            print this help\n",
            SITE_DEFAULT_GATEWAY_PORT, SITE_DEFAULT_TUNNEL_PORT);
}

static int site_usage_error(const char *fmt, const char *arg)
{
    fputs("cmg site init: ", stderr);
    fprintf(stderr, fmt, arg);
    fputs("\n\n", stderr);
    cmg_site_init_usage(stderr);
    return 2;
}

/* "host:port" (one colon, not an IPv6 address): the ports come from the listen options. */
static bool site_address_has_port(const char *addr)
{
    struct in6_addr a6;
    const char *colon = strchr(addr, ':');

    return colon && !strchr(colon + 1, ':') && inet_pton(AF_INET6, addr, &a6) != 1;
}

static int site_parse_port(const char *s, unsigned *port)
{
    char *end;
    unsigned long v;

    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *end || v < 1 || v > 65535)
        return -1;
    *port = (unsigned)v;
    return 0;
}

/* A DNS name: labels of letters, digits and hyphens; at most 64 characters (the limit of
 * a certificate's CN). */
static int site_check_name(const char *name)
{
    size_t len = strlen(name), label = 0, i;

    if (len == 0 || len > 64)
        return -1;
    for (i = 0; i < len; i++) {
        char c = name[i];

        if (c == '.') {
            if (label == 0 || name[i - 1] == '-')
                return -1;
            label = 0;
            continue;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-'))
            return -1;
        if (c == '-' && label == 0)
            return -1;
        if (++label > 63)
            return -1;
    }
    if (label == 0 || name[len - 1] == '-')
        return -1;
    return 0;
}

/* http:// or https://, a host (name, IPv4 or [IPv6]), an optional port and an optional
 * path. Returns NULL if url is fine, else the reason. */
static const char *site_check_url(const char *url)
{
    const char *p, *host, *end, *port = NULL;
    char addr[INET6_ADDRSTRLEN + 1];
    unsigned char buf[sizeof(struct in6_addr)];
    unsigned port_num;

    if (!strncasecmp(url, "http://", 7))
        host = url + 7;
    else if (!strncasecmp(url, "https://", 8))
        host = url + 8;
    else
        return "must start with http:// or https://";
    for (p = url; *p; p++)
        if ((unsigned char)*p <= 0x20 || *p == 0x7f)
            return "must not contain spaces or control characters";
    if (strpbrk(url, "?#"))
        return "must not have a query or a fragment";
    end = host + strcspn(host, "/");
    if (memchr(host, '@', (size_t)(end - host)))
        return "must not contain a user name or password";
    if (*host == '[') {
        const char *close = memchr(host, ']', (size_t)(end - host));
        size_t n;

        if (!close)
            return "has an unterminated [IPv6 address]";
        n = (size_t)(close - host - 1);
        if (n == 0 || n >= sizeof(addr))
            return "has a bad [IPv6 address]";
        memcpy(addr, host + 1, n);
        addr[n] = '\0';
        if (inet_pton(AF_INET6, addr, buf) != 1)
            return "has a bad [IPv6 address]";
        if (close + 1 < end) {
            if (close[1] != ':')
                return "has junk after the [IPv6 address]";
            port = close + 2;
        }
    } else {
        const char *colon = memchr(host, ':', (size_t)(end - host));
        const char *q;

        if ((colon ? colon : end) == host)
            return "has no host";
        for (q = host; q < (colon ? colon : end); q++)
            if (!((*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z') ||
                  (*q >= '0' && *q <= '9') || *q == '-' || *q == '.' || *q == '_'))
                return "has a bad character in the host name";
        if (colon)
            port = colon + 1;
    }
    if (port) {
        char num[8];
        size_t n = (size_t)(end - port);

        if (n == 0 || n >= sizeof(num))
            return "has a bad port";
        memcpy(num, port, n);
        num[n] = '\0';
        if (site_parse_port(num, &port_num) < 0)
            return "has a bad port";
    }
    return NULL;
}

/* A password goes into gateway.conf as "cert_password = PASS": it must survive the INI
 * parser, which strips surrounding blanks and takes " ;" as the start of a comment. */
static int site_check_password(const char *pass)
{
    size_t len = strlen(pass), i;

    if (len == 0)
        return 0;
    if (pass[0] == ' ' || pass[0] == '\t' || pass[len - 1] == ' ' || pass[len - 1] == '\t')
        return -1;
    for (i = 0; i < len; i++) {
        if ((unsigned char)pass[i] < 0x20 || pass[i] == 0x7f)
            return -1;
        if ((pass[i] == ';' || pass[i] == '#') && i > 0 &&
            (pass[i - 1] == ' ' || pass[i - 1] == '\t'))
            return -1;
    }
    return 0;
}

/* "--opt VALUE" or "--opt=VALUE". Returns 1 and sets *val if argv[*i] is opt, 0 if not,
 * -1 if the value is missing. */
static int site_opt(int argc, char **argv, int *i, const char *opt, const char **val)
{
    const char *a = argv[*i];
    size_t n = strlen(opt);

    if (strncmp(a, opt, n))
        return 0;
    if (a[n] == '=') {
        *val = a + n + 1;
        return 1;
    }
    if (a[n])
        return 0;
    if (*i + 1 >= argc)
        return -1;
    *val = argv[++*i];
    return 1;
}

/* Returns 0, or the exit status (0 for --help, 2 for bad usage) plus 1 in *done. */
static int site_parse(int argc, char **argv, struct site_opts *o, int *done)
{
    enum { OPT_NAME, OPT_MP, OPT_GATEWAY_PORT, OPT_TUNNEL_PORT, OPT_PFX, OPT_PFX_PASSWORD,
           OPT_SITE_ADMIN, OPT_SITE_SERVICE, OPT_SITE_FEED, OPT_SITE_ADDRESS };
    static const char *const value_opts[] = {
        [OPT_NAME] = "--service-name",         [OPT_MP] = "--mp",
        [OPT_GATEWAY_PORT] = "--gateway-port", [OPT_TUNNEL_PORT] = "--tunnel-port",
        [OPT_PFX] = "--gateway-pfx",           [OPT_PFX_PASSWORD] = "--pfx-password",
        [OPT_SITE_ADMIN] = "--site-admin",     [OPT_SITE_SERVICE] = "--site-service",
        [OPT_SITE_FEED] = "--site-feed",       [OPT_SITE_ADDRESS] = "--site-address"};
    int i, only_args = 0;
    size_t k;

    *done = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        int r = 0;

        if (!only_args && (!strcmp(a, "-h") || !strcmp(a, "--help"))) {
            cmg_site_init_usage(stdout);
            return 0;
        }
        if (!only_args && !strcmp(a, "--")) {
            only_args = 1;
            continue;
        }
        if (only_args || a[0] != '-' || !a[1]) {
            if (o->dir)
                return site_usage_error("unexpected argument '%s' (one DIR only)", a);
            o->dir = a;
            continue;
        }
        if (!strcmp(a, "--force")) {
            o->force = 1;
            continue;
        }
        for (k = 0; k < sizeof(value_opts) / sizeof(value_opts[0]); k++) {
            r = site_opt(argc, argv, &i, value_opts[k], &val);
            if (r)
                break;
        }
        if (r < 0)
            return site_usage_error("option %s needs a value", value_opts[k]);
        if (r == 0)
            return site_usage_error("unknown option '%s'", a);
        switch (k) {
        case OPT_NAME:
            o->name = val;
            break;
        case OPT_MP:
            o->mp_urls[o->n_mp++] = val;
            break;
        case OPT_GATEWAY_PORT:
            if (site_parse_port(val, &o->gateway_port) < 0)
                return site_usage_error("--gateway-port: '%s' is not a port (1-65535)", val);
            break;
        case OPT_TUNNEL_PORT:
            if (site_parse_port(val, &o->tunnel_port) < 0)
                return site_usage_error("--tunnel-port: '%s' is not a port (1-65535)", val);
            break;
        case OPT_PFX:
            o->pfx_path = val;
            break;
        case OPT_SITE_ADMIN:
            o->site_admin = val;
            break;
        case OPT_SITE_SERVICE:
            o->site_service = val;
            break;
        case OPT_SITE_FEED:
            o->site_feed = val;
            break;
        case OPT_SITE_ADDRESS:
            o->site_address = val;
            break;
        case OPT_PFX_PASSWORD:
        default:
            o->pfx_pass = val;
            break;
        }
    }
    if (!o->dir)
        return site_usage_error("%s", "missing DIR");
    if (!*o->dir)
        return site_usage_error("%s", "DIR is empty");
    if (!o->name)
        return site_usage_error("%s", "missing --service-name NAME");
    if (site_check_name(o->name) < 0)
        return site_usage_error("--service-name: '%s' is not a DNS name (letters, digits, "
                                "hyphens and dots, at most 64 characters)", o->name);
    for (k = 0; k < o->n_mp; k++) {
        const char *why = site_check_url(o->mp_urls[k]);

        if (why) {
            fprintf(stderr, "cmg site init: --mp '%s': %s\n\n", o->mp_urls[k], why);
            cmg_site_init_usage(stderr);
            return 2;
        }
    }
    if (o->site_address && (!o->site_address[0] || strpbrk(o->site_address, " \t/[]@")))
        return site_usage_error("--site-address: '%s' is not a host name or IP address",
                                o->site_address);
    if (o->site_address && site_address_has_port(o->site_address))
        return site_usage_error("--site-address: '%s' names a port; give the host only (the "
                                "ports are those of --site-feed and --site-service)",
                                o->site_address);
    if (!o->site_address &&
        (cmg_site_listen_wildcard(o->site_feed ? o->site_feed : CMG_SITE_DEFAULT_FEED) ||
         cmg_site_listen_wildcard(o->site_service ? o->site_service : CMG_SITE_DEFAULT_SERVICE)))
        return site_usage_error("%s", "--site-feed or --site-service listens on every address: "
                                      "give --site-address HOST, the name or address "
                                      "connectors reach the site at");
    if (o->gateway_port == o->tunnel_port)
        return site_usage_error("%s", "--gateway-port and --tunnel-port must differ");
    if (o->pfx_pass && !o->pfx_path)
        return site_usage_error("%s", "--pfx-password needs --gateway-pfx");
    if (o->pfx_pass && site_check_password(o->pfx_pass) < 0)
        return site_usage_error("%s", "--pfx-password: a password written to gateway.conf "
                                      "cannot start or end with a blank, contain control "
                                      "characters, or have ';' or '#' after a blank");
    *done = 0;
    return 0;
}

/* mkdir -p */
static int site_mkdirs(const char *dir)
{
    char path[PATH_MAX];
    struct stat st;
    size_t len = strlen(dir), i;

    if (len >= sizeof(path)) {
        fprintf(stderr, "cmg site init: %s: path too long\n", dir);
        return -1;
    }
    memcpy(path, dir, len + 1);
    for (i = 1; i <= len; i++) {
        if (path[i] != '/' && path[i] != '\0')
            continue;
        path[i] = '\0';
        if (mkdir(path, 0755) < 0 && errno != EEXIST) {
            fprintf(stderr, "cmg site init: cannot create directory %s: %s\n", path,
                    strerror(errno));
            return -1;
        }
        path[i] = dir[i];
    }
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "cmg site init: %s: not a directory\n", dir);
        return -1;
    }
    return 0;
}

static int site_path(char *buf, size_t size, const char *dir, const char *name)
{
    int n = snprintf(buf, size, "%s/%s", dir, name);

    if (n < 0 || (size_t)n >= size) {
        fprintf(stderr, "cmg site init: %s/%s: path too long\n", dir, name);
        return -1;
    }
    return 0;
}

static int site_new_role_ids(struct site *s, size_t n)
{
    size_t i, j;

    if (n == 0)
        return 0;
    s->role_ids = calloc(n, sizeof(*s->role_ids));
    if (!s->role_ids) {
        fputs("cmg site init: out of memory\n", stderr);
        return -1;
    }
    for (i = 0; i < n; i++) {
        unsigned char r[3];
        int dup;

        do {
            if (RAND_bytes(r, sizeof(r)) != 1) {
                ERR_clear_error();
                fputs("cmg site init: the random generator failed\n", stderr);
                return -1;
            }
            s->role_ids[i] =
                SITE_ROLE_ID_BASE + ((uint64_t)r[0] << 16 | (uint64_t)r[1] << 8 | r[2]);
            for (dup = 0, j = 0; j < i; j++)
                dup |= s->role_ids[j] == s->role_ids[i];
        } while (dup);
    }
    return 0;
}

/* The gateway certificate from --gateway-pfx: check it, and choose what the connector
 * trusts for it (the CA certificates in the file, or the certificate if self-signed). */
static int site_load_pfx(struct site *s, const struct site_opts *o)
{
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    STACK_OF(X509) *chain = NULL;
    int i, ret = -1;

    if (cmg_pki_read_file(o->pfx_path, SITE_PFX_MAX, &s->pfx, &s->pfx_len) < 0)
        goto out;
    if (cmg_pki_parse_pkcs12(o->pfx_path, s->pfx, s->pfx_len, o->pfx_pass, &key, &cert,
                             &chain) < 0)
        goto out;
    if (X509_check_host(cert, o->name, 0, 0, NULL) != 1)
        fprintf(stderr, "cmg site init: warning: the certificate in %s is not for %s: "
                        "devices and the connector will refuse it\n", o->pfx_path, o->name);
    if (X509_cmp_current_time(X509_get0_notAfter(cert)) <= 0)
        fprintf(stderr, "cmg site init: warning: the certificate in %s has expired\n",
                o->pfx_path);
    if (X509_check_purpose(cert, X509_PURPOSE_SSL_SERVER, 0) != 1)
        fprintf(stderr, "cmg site init: warning: the certificate in %s is not valid for "
                        "TLS servers (key usage or extended key usage)\n", o->pfx_path);
    if (X509_check_issued(cert, cert) == X509_V_OK) {
        if (!X509_up_ref(cert) || !sk_X509_push(chain, cert)) {
            X509_free(cert);
            fputs("cmg site init: out of memory\n", stderr);
            goto out;
        }
    }
    for (i = 0; i < sk_X509_num(chain); i++)
        if (X509_check_issued(sk_X509_value(chain, i), sk_X509_value(chain, i)) == X509_V_OK)
            s->gw_ca_has_root = 1;
    s->gw_ca = chain;
    chain = NULL;
    ret = 0;
out:
    sk_X509_pop_free(chain, X509_free);
    X509_free(cert);
    EVP_PKEY_free(key);
    return ret;
}

static int site_issue(struct site *s, const struct site_opts *o, int name_is_ip)
{
    const char *gw_dns[] = {o->name, "localhost"};
    const char *gw_ip[] = {"127.0.0.1", "::1", o->name};
    char ca_cn[128];
    struct cmg_cert_req ca = {0}, gw = {0}, dev = {0};

    snprintf(ca_cn, sizeof(ca_cn), "OpenCMG Site CA %s", o->name);
    if (!(s->ca_key = cmg_pki_new_key()))
        return -1;
    ca.cn = ca_cn;
    ca.o = "OpenCMG";
    ca.key = s->ca_key;
    ca.is_ca = 1;
    ca.days = SITE_CA_DAYS;
    if (!(s->ca_cert = cmg_pki_issue(&ca, NULL, s->ca_key)))
        return -1;

    if (!o->pfx_path) {
        if (!(s->gw_key = cmg_pki_new_key()))
            return -1;
        gw.cn = o->name;
        gw.o = "OpenCMG";
        /* An IPv4 service name goes in the SAN as an IP address, not a DNS name. */
        gw.dns_names = name_is_ip ? gw_dns + 1 : gw_dns;
        gw.n_dns_names = name_is_ip ? 1 : 2;
        gw.ip_addrs = gw_ip;
        gw.n_ip_addrs = name_is_ip && strcmp(o->name, "127.0.0.1") ? 3 : 2;
        gw.key = s->gw_key;
        gw.eku = CMG_PKI_EKU_SERVER;
        gw.days = SITE_SERVER_DAYS;
        /* No CRL location on the gateway's own certificate: it would be fetched over TLS
         * from the very server whose certificate is being checked (RFC 5280 4.2.1.13). */
        if (!(s->gw_cert = cmg_pki_issue(&gw, s->ca_cert, s->ca_key)))
            return -1;
    }

    if (!(s->dev_key = cmg_pki_new_key()))
        return -1;
    dev.cn = "device1";
    dev.ou = "Devices";
    dev.o = "OpenCMG";
    dev.key = s->dev_key;
    dev.eku = CMG_PKI_EKU_CLIENT;
    dev.days = SITE_DEVICE_DAYS;
    dev.crl_url = s->crl_url;
    if (!(s->dev_cert = cmg_pki_issue(&dev, s->ca_cert, s->ca_key)))
        return -1;
    return 0;
}

/* Writes the text built in a memory stream to DIR/name (0644, or 0600 with a secret). */
static int site_write_text(const struct site *s, const char *name, char *text, size_t len,
                           unsigned mode)
{
    char path[PATH_MAX];

    if (site_path(path, sizeof(path), s->dir, name) < 0)
        return -1;
    return cmg_pki_write_file(path, text, len, mode);
}

/* One "key = value" line of a configuration file, with an optional comment aligned as in
 * docs/configuration.md. */
static void site_conf(FILE *f, const char *comment, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void site_conf(FILE *f, const char *comment, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vfprintf(f, fmt, ap);
    va_end(ap);
    if (comment)
        fprintf(f, "%*s; %s", n < 34 ? 34 - n : 1, "", comment);
    fputc('\n', f);
}

/* Ends a memory stream and writes what it holds to DIR/name. */
static int site_write_stream(const struct site *s, const char *name, FILE *f, char **text,
                             size_t *len, unsigned mode)
{
    int err = fflush(f) != 0 || ferror(f);

    if (fclose(f) != 0 || err || !*text) {
        fputs("cmg site init: out of memory\n", stderr);
        return -1;
    }
    return site_write_text(s, name, *text, *len, mode);
}

static int site_write_gateway_conf(const struct site *s, const struct site_opts *o)
{
    char *text = NULL;
    size_t len = 0, i;
    FILE *f = open_memstream(&text, &len);
    int ret = -1;

    if (!f) {
        fputs("cmg site init: out of memory\n", stderr);
        return -1;
    }
    fputs("; OpenCMG gateway, written by 'cmg site init' (see docs/configuration.md).\n"
          "; Paths are relative to the directory of this file.\n"
          "[gateway]\n", f);
    site_conf(f, "the name devices use; must match the certificate", "service_name = %s",
              o->name);
    site_conf(f, "device port (repeatable)", "listen = 0.0.0.0:%u", o->gateway_port);
    site_conf(f, NULL, "listen = [::]:%u", o->gateway_port);
    site_conf(f, "address for connectors; the port is tunnel_port + instance",
              "tunnel_listen = 0.0.0.0");
    site_conf(f, NULL, "tunnel_port = %u", o->tunnel_port);
    site_conf(f, "overridden by --instance", "instance = 0");
    if (o->pfx_path) {
        site_conf(f, "PKCS#12: certificate, chain and key", "cert = gateway.pfx");
        /* No comment on this line: it would become part of the password. */
        site_conf(f, NULL, "cert_password = %s", o->pfx_pass ? o->pfx_pass : "");
    } else {
        site_conf(f, "PEM certificate, or a PKCS#12 file (.pfx/.p12)", "cert = gateway.crt");
        site_conf(f, "PEM key (not needed with a .pfx)", "key = gateway.key");
    }
    site_conf(f, "trusted roots for device certificates (the CTL)", "client_ca = ca.crt");
    site_conf(f, "CA that issues connector certificates", "connector_ca = ca.crt");
    site_conf(f, "seconds between tunnel health pings", "ping_interval = 60");
    site_conf(f, "a tunnel without an answer for this long is dropped", "ping_timeout = 15");
    site_conf(f, "seconds for a device's TLS handshake", "handshake_timeout = 10");
    site_conf(f, "seconds for a device to send a request's headers", "header_timeout = 30");
    site_conf(f, "seconds a kept-alive device connection may idle", "idle_timeout = 120");
    site_conf(f, "bytes of request line + headers", "max_header_size = 16384");
    site_conf(f, "device connections held at once", "max_connections = 10000");
    site_conf(f, "debug, info, warn, error", "log_level = info");
    site_conf(f, "text, or json: one object a line", "log_format = text");
    site_conf(f, "verifies the policy the site signs", "site_key = " CMG_SITE_SIGNING_PUB);
    site_conf(f, "last good policy, served at once after a restart",
              "policy_cache = policy-cache.jws");
    fputs("; Until the first signed policy arrives, these mappings apply:\n", f);
    for (i = 0; i < o->n_mp; i++) {
        fputc('\n', f);
        site_conf(f, o->mp_urls[i], "[mapping %" PRIu64 "]", s->role_ids[i]);
        site_conf(f, "devices authenticate with a client certificate", "auth = cert");
        site_conf(f, "request body limit in bytes", "max_body = " SITE_MAX_BODY);
    }
    /* With a .pfx password in it, the file is a secret. */
    ret = site_write_stream(s, "gateway.conf", f, &text, &len,
                            o->pfx_pass && *o->pfx_pass ? 0600 : 0644);
    if (text)
        OPENSSL_cleanse(text, len);
    free(text);
    return ret;
}

static int site_write_connector_conf(const struct site *s, const struct site_opts *o)
{
    char *text = NULL, feed[300];
    size_t len = 0, i;
    FILE *f = open_memstream(&text, &len);
    int ret;

    if (!f) {
        fputs("cmg site init: out of memory\n", stderr);
        return -1;
    }
    fputs("; OpenCMG connector, written by 'cmg site init' (see docs/configuration.md).\n"
          "; Paths are relative to the directory of this file.\n"
          "[connector]\n", f);
    site_conf(f, "shown in the gateway's logs", "name = " SITE_FIRST_CONNECTOR);
    site_conf(f, "one line per gateway instance", "gateway = 127.0.0.1:%u", o->tunnel_port);
    site_conf(f, "name checked in the gateway's certificate", "server_name = %s", o->name);
    site_conf(f, "this connector's certificate ('cmg site connector add')",
              "cert = connector.crt");
    site_conf(f, NULL, "key = connector.key");
    site_conf(f, "CA that issued the gateway's certificate", "ca = %s",
              o->pfx_path ? "gateway-ca.crt" : "ca.crt");
    site_conf(f, NULL, "ping_interval = 60");
    site_conf(f, NULL, "ping_timeout = 15");
    site_conf(f, "longest pause between dial attempts, seconds", "reconnect_max = 30");
    site_conf(f, "seconds to wait for an internal server's response", "upstream_timeout = 60");
    site_conf(f, NULL, "log_level = info");
    site_conf(f, "text, or json: one object a line", "log_format = text");
    cmg_site_reach(o->site_feed ? o->site_feed : CMG_SITE_DEFAULT_FEED, o->site_address, feed,
                   sizeof(feed));
    site_conf(f, "the site's policy feed (signed policy and routes)", "site = https://%s", feed);
    site_conf(f, "CA of the site's certificate", "site_ca = ca.crt");
    site_conf(f, "verifies what the site signs", "site_key = " CMG_SITE_SIGNING_PUB);
    fputs("; Used until the site answers, and for roles the site does not route:\n", f);
    for (i = 0; i < o->n_mp; i++) {
        fputc('\n', f);
        site_conf(f, NULL, "[mapping %" PRIu64 "]", s->role_ids[i]);
        site_conf(f, NULL, "internal_url = %s", o->mp_urls[i]);
        if (!strncasecmp(o->mp_urls[i], "https://", 8)) {
            site_conf(f, "CA of the internal server's certificate", "; ca =");
            site_conf(f, "the connector's client certificate, if required", "; client_cert =");
            site_conf(f, NULL, "; client_key =");
        }
    }
    ret = site_write_stream(s, "connector.conf", f, &text, &len, 0644);
    free(text);
    return ret;
}

/* Writes every file; ca.crt last, so that a site that is there is complete. */
static int site_write(struct site *s, const struct site_opts *o)
{
    char path[PATH_MAX];

#define SITE_WRITE(fn, name, obj) \
    (site_path(path, sizeof(path), s->dir, name) < 0 || fn(path, obj) < 0)

    if (SITE_WRITE(cmg_pki_write_key, "ca.key", s->ca_key))
        return -1;
    if (o->pfx_path) {
        if (site_path(path, sizeof(path), s->dir, "gateway.pfx") < 0 ||
            cmg_pki_write_file(path, s->pfx, s->pfx_len, 0600) < 0)
            return -1;
        if (sk_X509_num(s->gw_ca) > 0 && SITE_WRITE(cmg_pki_write_certs, "gateway-ca.crt",
                                                    s->gw_ca))
            return -1;
    } else {
        if (SITE_WRITE(cmg_pki_write_key, "gateway.key", s->gw_key) ||
            SITE_WRITE(cmg_pki_write_cert, "gateway.crt", s->gw_cert))
            return -1;
    }
    {
        char crt[PATH_MAX], key[PATH_MAX], err[512];
        if (site_path(crt, sizeof(crt), s->dir, "connector.crt") < 0 ||
            site_path(key, sizeof(key), s->dir, "connector.key") < 0)
            return -1;
        if (cmg_site_connector_issue(s->ca_cert, s->ca_key, s->crl_url, SITE_FIRST_CONNECTOR,
                                     crt, key,
                                     &s->conn, err, sizeof(err)) < 0) {
            fprintf(stderr, "cmg site init: %s\n", err);
            return -1;
        }
    }
    if (site_path(path, sizeof(path), s->dir, "devices") < 0 || site_mkdirs(path) < 0)
        return -1;
    if (SITE_WRITE(cmg_pki_write_key, "devices/device1.key", s->dev_key) ||
        SITE_WRITE(cmg_pki_write_cert, "devices/device1.crt", s->dev_cert))
        return -1;
    if (site_write_gateway_conf(s, o) < 0 || site_write_connector_conf(s, o) < 0)
        return -1;
    {
        struct cmg_init_store st = {
            .dir = s->dir, .service_name = o->name, .site_role = s->role_ids[o->n_mp],
            .admin = o->site_admin ? o->site_admin : CMG_SITE_DEFAULT_ADMIN,
            .service = o->site_service ? o->site_service : CMG_SITE_DEFAULT_SERVICE,
            .feed = o->site_feed ? o->site_feed : CMG_SITE_DEFAULT_FEED,
            .crl_url = s->crl_url,
            .address = o->site_address,
            .connector_name = SITE_FIRST_CONNECTOR, .connector = &s->conn,
            .mp_urls = o->mp_urls, .role_ids = s->role_ids, .n_mp = o->n_mp, .force = o->force};
        char err[512], reach[300];
        const char *listen[] = {st.admin, st.service, st.feed, reach};
        cmg_site_reach(st.feed, st.address, reach, sizeof(reach));
        if (cmg_site_init_store(&st, err, sizeof(err)) < 0 ||
            cmg_site_channel_cert(s->dir, s->ca_cert, s->ca_key, NULL, listen, 4, err,
                                  sizeof(err)) < 0) {
            fprintf(stderr, "cmg site init: %s\n", err);
            return -1;
        }
    }
    if (SITE_WRITE(cmg_pki_write_cert, "ca.crt", s->ca_cert))
        return -1;
#undef SITE_WRITE
    return 0;
}

/* Prints dir/name as one shell word. */
static void site_print_path(const char *dir, const char *name)
{
    char path[PATH_MAX * 2];
    const char *p;

    snprintf(path, sizeof(path), "%s%s%s", dir, name ? "/" : "", name ? name : "");
    if (strspn(path, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                     "_-./:+,=@%") == strlen(path)) {
        fputs(path, stdout);
        return;
    }
    putchar('\'');
    for (p = path; *p; p++) {
        if (*p == '\'')
            fputs("'\\''", stdout);
        else
            putchar(*p);
    }
    putchar('\'');
}

static void site_print_summary(const struct site *s, const struct site_opts *o)
{
    const char *server_ca = o->pfx_path ? "gateway-ca.crt" : "ca.crt";
    size_t i;

    printf("Site created in %s for service %s.\n", s->dir, o->name);
    for (i = 0; i < o->n_mp; i++)
        printf("https://%s:%u/CCM_Proxy_MutualAuth/%" PRIu64 "\n", o->name, o->gateway_port,
               s->role_ids[i]);
    if (o->n_mp == 0)
        puts("No URL is published yet: run 'cmg site init' again with --mp URL for each "
             "internal server.");
    fputs("Sample device certificate: ", stdout);
    site_print_path(s->dir, "devices/device1.crt");
    fputs("\nSample device key:         ", stdout);
    site_print_path(s->dir, "devices/device1.key");
    fputs("\nSite CA certificate:       ", stdout);
    site_print_path(s->dir, "ca.crt");
    putchar('\n');
    if (o->pfx_path) {
        fputs("Gateway CA certificates:   ", stdout);
        site_print_path(s->dir, "gateway-ca.crt");
        puts(s->gw_ca_has_root ? ""
             : sk_X509_num(s->gw_ca) > 0 ? "  (no root: add the root CA that issued gateway.pfx)"
                                         : "  (not written: gateway.pfx holds no CA certificate)");
    }
    printf("Device registration (with a bulk token, 'cmg site token bulk create'):\n"
           "  https://%s:%u/CCM_Proxy_ServerAuth/%" PRIu64 "/register\n",
           o->name, o->gateway_port, s->role_ids[o->n_mp]);
    puts("Next, start the site service, the gateway and the connector:");
    fputs("  cmg site serve ", stdout);
    site_print_path(s->dir, NULL);
    fputs("\n  cmg gateway -c ", stdout);
    site_print_path(s->dir, "gateway.conf");
    fputs("\n  cmg connector -c ", stdout);
    site_print_path(s->dir, "connector.conf");
    putchar('\n');
    if (o->n_mp > 0) {
        puts("and try it as the sample device:");
        fputs("  curl --cacert ", stdout);
        site_print_path(s->dir, server_ca);
        fputs(" --cert ", stdout);
        site_print_path(s->dir, "devices/device1.crt");
        fputs(" --key ", stdout);
        site_print_path(s->dir, "devices/device1.key");
        printf(" --resolve %s:%u:127.0.0.1 https://%s:%u/CCM_Proxy_MutualAuth/%" PRIu64 "/\n",
               o->name, o->gateway_port, o->name, o->gateway_port, s->role_ids[0]);
    }
}

static void site_free(struct site *s)
{
    free(s->role_ids);
    EVP_PKEY_free(s->ca_key);
    EVP_PKEY_free(s->gw_key);
    EVP_PKEY_free(s->dev_key);
    X509_free(s->ca_cert);
    X509_free(s->gw_cert);
    X509_free(s->dev_cert);
    if (s->pfx)
        OPENSSL_cleanse(s->pfx, s->pfx_len);
    free(s->pfx);
    sk_X509_pop_free(s->gw_ca, X509_free);
}

int cmg_site_init_main(int argc, char **argv)
{
    struct site_opts o = {0};
    struct site s = {0};
    char ca_path[PATH_MAX];
    struct in_addr ip4;
    struct stat st;
    int done, status = 1;

    o.gateway_port = SITE_DEFAULT_GATEWAY_PORT;
    o.tunnel_port = SITE_DEFAULT_TUNNEL_PORT;
    o.mp_urls = calloc((size_t)(argc > 0 ? argc : 1), sizeof(*o.mp_urls));
    if (!o.mp_urls) {
        fputs("cmg site init: out of memory\n", stderr);
        goto out;
    }
    status = site_parse(argc, argv, &o, &done);
    if (done)
        goto out;
    status = 1;

    /* Check the .pfx before creating anything. */
    if (o.pfx_path && site_load_pfx(&s, &o) < 0)
        goto out;
    if (site_mkdirs(o.dir) < 0)
        goto out;
    if (!realpath(o.dir, s.dir)) {
        fprintf(stderr, "cmg site init: %s: %s\n", o.dir, strerror(errno));
        goto out;
    }
    if (site_path(ca_path, sizeof(ca_path), s.dir, "ca.crt") < 0)
        goto out;
    if (lstat(ca_path, &st) == 0 && !o.force) {
        fprintf(stderr, "cmg site init: %s already contains a site (%s exists); use --force "
                        "to replace it with a new one\n", o.dir, ca_path);
        goto out;
    }
    if (site_new_role_ids(&s, o.n_mp + 1) < 0)   /* the last one is the site's */
        goto out;
    cmg_site_crl_url(o.name, o.gateway_port, s.crl_url, sizeof(s.crl_url));
    if (site_issue(&s, &o, inet_pton(AF_INET, o.name, &ip4) == 1) < 0)
        goto out;
    if (site_write(&s, &o) < 0)
        goto out;
    if (o.pfx_path && !s.gw_ca_has_root)
        fprintf(stderr, "cmg site init: warning: %s holds no root CA certificate: put the "
                        "root CA that issued the gateway's certificate into %s/gateway-ca.crt, "
                        "or the connector will not trust the gateway\n", o.pfx_path, s.dir);
    site_print_summary(&s, &o);
    if (fflush(stdout) != 0) {
        fprintf(stderr, "cmg site init: cannot write to stdout: %s\n", strerror(errno));
        goto out;
    }
    status = 0;
out:
    site_free(&s);
    free(o.mp_urls);
    return status;
}
