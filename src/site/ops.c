/* The site's administrative operations; see ops.h. */
#include "site/ops.h"

#include "auth/jwk.h"
#include "core/net.h"
#include "http/path.h"
#include "site/alerts.h"
#include "site/notify_ops.h"
#include "site/connectors.h"
#include "site/pki.h"
#include "site/policy_build.h"
#include "site/signing.h"
#include "site/status.h"
#include "site/tokens.h"
#include "tls/tls.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ROLE_ID_BASE UINT64_C(72057594037927936) /* 2^56, as Configuration Manager */
#define DEVICE_CERT_DAYS 365
#define DEFAULT_MAX_BODY UINT64_C(1073741824)

int cmg_site_fail(char *msg, size_t len, int status, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, len, fmt, ap);
    va_end(ap);
    return status;
}

static const char *arg_str(const cJSON *args, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(args, name);
    return cJSON_IsString(v) && v->valuestring[0] ? v->valuestring : NULL;
}

/* A non-negative whole number given as a JSON number or a decimal string. */
static int arg_uint(const cJSON *args, const char *name, uint64_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(args, name);
    char *end;

    if (!v)
        return 1;
    if (cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < 9.0e18 &&
        v->valuedouble == (double)(uint64_t)v->valuedouble) {
        *out = (uint64_t)v->valuedouble;
        return 0;
    }
    if (cJSON_IsString(v) && isdigit((unsigned char)v->valuestring[0])) {
        errno = 0;
        *out = strtoull(v->valuestring, &end, 10);
        if (!errno && !*end)
            return 0;
    }
    return -1;
}

static bool arg_bool(const cJSON *args, const char *name)
{
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(args, name));
}

/* Runs body inside a transaction: commits on 0, rolls back otherwise. */
#define IN_TX(s, msg, len, call)                                                                   \
    do {                                                                                           \
        int rc_;                                                                                   \
        if (cmg_store_begin((s)->store) < 0)                                                       \
            return cmg_site_fail(msg, len, 500, "store busy: %s", cmg_store_error((s)->store));    \
        rc_ = (call);                                                                              \
        if (rc_ == 0 && cmg_store_commit((s)->store) < 0)                                          \
            rc_ = cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error((s)->store));          \
        if (rc_ != 0)                                                                              \
            cmg_store_rollback((s)->store);                                                        \
        return rc_;                                                                                \
    } while (0)

/* ---- mappings ---- */

static int new_role_id(struct cmg_site_ctx *s, char out[65])
{
    struct cmg_site_mapping *v;
    size_t n;
    bool dup;

    if (cmg_store_mappings(s->store, &v, &n) < 0)
        return -1;
    do {
        unsigned char r[3];
        RAND_bytes(r, sizeof(r));
        snprintf(out, 65, "%llu",
                 (unsigned long long)(ROLE_ID_BASE +
                                      ((uint64_t)r[0] << 16 | (uint64_t)r[1] << 8 | r[2])));
        dup = false;
        for (size_t i = 0; i < n; i++)
            dup |= !strcmp(v[i].role, out);
    } while (dup);
    free(v);
    return 0;
}

static bool valid_role(const char *r)
{
    size_t n = strlen(r);
    if (n == 0 || n > CMG_ROLE_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)r[i]) && r[i] != '_' && r[i] != '-')
            return false;
    return true;
}

bool cmg_site_role_valid(const char *role) { return valid_role(role); }

static bool valid_url(const char *u)
{
    if (strncmp(u, "http://", 7) && strncmp(u, "https://", 8))
        return false;
    for (; *u; u++)
        if ((unsigned char)*u <= ' ' || *u == 0x7f)
            return false;
    return true;
}

/* The host of an internal URL must be well formed and resolve here (the connectors
 * are on this network): a route that no connector could dial is refused when it is
 * added, not answered 503 or 502 to every device later. */
static int check_url_host(const char *url, char *msg, size_t len)
{
    bool tls = !strncmp(url, "https://", 8);
    const char *a = url + (tls ? 8 : 7);
    size_t n = strcspn(a, "/?#");
    char authority[300], err[400];
    struct cmg_addr addr;

    if (n == 0)
        return cmg_site_fail(msg, len, 400, "url %s: no host", url);
    if (n >= sizeof(authority))
        return cmg_site_fail(msg, len, 400, "url %s: host too long", url);
    memcpy(authority, a, n);
    authority[n] = 0;
    if (strchr(authority, '@'))
        return cmg_site_fail(msg, len, 400, "url %s: expected host[:port], found user information "
                                   "('@'), which is not supported", url);
    if (cmg_addr_parse(authority, tls ? 443 : 80, &addr, err, sizeof(err)) < 0)
        return cmg_site_fail(msg, len, 400,
                             "url %s: expected a host (and port) that resolves on this "
                             "network, found %s: no connector could reach it",
                             url, err);
    return 0;
}

static int mapping_add_tx(struct cmg_site_ctx *s, struct cmg_site_mapping *m, char *msg,
                          size_t len)
{
    int rc;

    if (!m->role[0] && new_role_id(s, m->role) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    rc = cmg_store_mapping_add(s->store, m);
    if (rc < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    if (rc == 1)
        return cmg_site_fail(msg, len, 409, "role %s is mapped already (remove it first)", m->role);
    return 0;
}

static int op_mapping_add(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                          size_t len)
{
    struct cmg_site_mapping m = {0};
    const char *role = arg_str(args, "role"), *type = arg_str(args, "type");
    const char *url = arg_str(args, "url"), *auth = arg_str(args, "auth");
    int rc;

    if (role && !valid_role(role))
        return cmg_site_fail(msg, len, 400, "role id '%s': letters, digits, '_' and '-' only, "
                                   "at most %d", role, CMG_ROLE_ID_MAX);
    if (!type || (strcmp(type, "mp") && strcmp(type, "sup") && strcmp(type, "site")))
        return cmg_site_fail(msg, len, 400, "type must be mp, sup or site");
    if (!url || !valid_url(url) || strlen(url) >= sizeof(m.url))
        return cmg_site_fail(msg, len, 400, "url must be an http:// or https:// URL");
    if ((rc = check_url_host(url, msg, len)) != 0)
        return rc;
    if (cmg_mapping_auth_parse(auth ? auth : !strcmp(type, "site") ? "token" : "cert,token,oidc",
                               &m.auth) < 0)
        return cmg_site_fail(msg, len, 400,
                             "auth must list cert, token and/or oidc, e.g. cert,token");
    m.max_body = DEFAULT_MAX_BODY;
    if (arg_uint(args, "max_body", &m.max_body) < 0)
        return cmg_site_fail(msg, len, 400, "max_body must be a number of bytes");
    /* A device's credential goes to a service only where asked for: the registration
     * service (type site) checks the bulk token again; others get the identity headers. */
    m.forward_authorization = !strcmp(type, "site");
    if (cJSON_GetObjectItemCaseSensitive(args, "forward_authorization"))
        m.forward_authorization = arg_bool(args, "forward_authorization");
    snprintf(m.role, sizeof(m.role), "%s", role ? role : "");
    snprintf(m.type, sizeof(m.type), "%s", type);
    snprintf(m.url, sizeof(m.url), "%s", url);
    if (cmg_store_begin(s->store) < 0)
        return cmg_site_fail(msg, len, 500, "store busy: %s", cmg_store_error(s->store));
    rc = mapping_add_tx(s, &m, msg, len);
    if (rc == 0 && cmg_store_commit(s->store) < 0)
        rc = cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    if (rc != 0) {
        cmg_store_rollback(s->store);
        return rc;
    }
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "role", m.role);
    cJSON_AddStringToObject(*result, "type", m.type);
    cJSON_AddStringToObject(*result, "url", m.url);
    {
        char a[64];
        cmg_mapping_auth_format(m.auth, a, sizeof(a));
        cJSON_AddStringToObject(*result, "auth", a);
    }
    cJSON_AddNumberToObject(*result, "max_body", (double)m.max_body);
    cJSON_AddBoolToObject(*result, "forward_authorization", m.forward_authorization);
    return 0;
}

static int mapping_remove_tx(struct cmg_site_ctx *s, const char *role, char *msg, size_t len)
{
    int rc = cmg_store_mapping_remove(s->store, role);
    if (rc < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    return rc == 1 ? cmg_site_fail(msg, len, 404, "no mapping for role %s", role) : 0;
}

static int op_mapping_remove(struct cmg_site_ctx *s, const cJSON *args, cJSON **result,
                             char *msg, size_t len)
{
    const char *role = arg_str(args, "role");

    if (!role)
        return cmg_site_fail(msg, len, 400, "which role? (--role ID)");
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "removed", role);
    IN_TX(s, msg, len, mapping_remove_tx(s, role, msg, len));
}

static int op_mapping_list(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                           size_t len)
{
    *result = cmg_store_mappings_json(s->store);
    return *result ? 0 : cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
}

/* ---- bulk registration tokens ---- */

int64_t cmg_parse_lifetime(const char *v)
{
    char *end;
    long long n;

    if (!v || !isdigit((unsigned char)*v))
        return -1;
    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno || n <= 0 || n > 100000000LL)
        return -1;
    if (!*end || !strcmp(end, "d"))
        return n * 86400;
    if (!strcmp(end, "h"))
        return n * 3600;
    if (!strcmp(end, "m"))
        return n * 60;
    if (!strcmp(end, "s"))
        return n;
    return -1;
}

static int bulk_create_tx(struct cmg_site_ctx *s, int64_t lifetime, const char *desc,
                          cJSON **result, char *msg, size_t len)
{
    char guid[64];
    int64_t exp;
    char *tok = cmg_site_bulk_token(s, (int64_t)time(NULL), lifetime, desc, guid, &exp);

    if (!tok)
        return cmg_site_fail(msg, len, 500, "cannot make the token (store: %s)",
                    cmg_store_error(s->store));
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "guid", guid);
    cJSON_AddNumberToObject(*result, "expires", (double)exp);
    cJSON_AddStringToObject(*result, "token", tok);
    free(tok);
    return 0;
}

static int op_bulk_create(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                          size_t len)
{
    const char *lt = arg_str(args, "lifetime");
    int64_t lifetime = lt ? cmg_parse_lifetime(lt) : (int64_t)CMG_BULK_DEFAULT_DAYS * 86400;
    uint64_t secs;

    if (!lt && arg_uint(args, "lifetime", &secs) == 0)
        lifetime = secs > INT64_MAX / 2 ? -1 : (int64_t)secs;
    if (lifetime <= 0)
        return cmg_site_fail(msg, len, 400, "lifetime: a duration such as 3d, 72h or 90m");
    if (lifetime > (int64_t)CMG_BULK_MAX_DAYS * 86400)
        return cmg_site_fail(msg, len, 400, "lifetime: %d days at most", CMG_BULK_MAX_DAYS);
    IN_TX(s, msg, len, bulk_create_tx(s, lifetime, arg_str(args, "description"), result, msg, len));
}

static int op_bulk_list(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                        size_t len)
{
    *result = cmg_store_bulk_json(s->store);
    return *result ? 0 : cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
}

static int bulk_block_tx(struct cmg_site_ctx *s, const char *guid, bool block, char *msg,
                         size_t len)
{
    int rc = cmg_store_bulk_block(s->store, guid, block);
    if (rc < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    return rc == 1 ? cmg_site_fail(msg, len, 404, "no bulk token with GUID %s", guid) : 0;
}

static int op_bulk_block(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len)
{
    const char *guid = arg_str(args, "guid");
    bool block = !cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(args, "blocked"));

    if (!guid)
        return cmg_site_fail(msg, len, 400, "which token? (its GUID)");
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "guid", guid);
    cJSON_AddBoolToObject(*result, "blocked", block);
    IN_TX(s, msg, len, bulk_block_tx(s, guid, block, msg, len));
}

/* ---- devices ---- */

static bool valid_name(const char *n);

/* A SHA-256 thumbprint as people write it (hex, any case, ':' between bytes), in
 * the gateway's spelling: 64 lower-case hex digits. -1 if it is not one. */
static int normal_thumbprint(const char *in, char out[65])
{
    size_t n = 0;

    for (; *in; in++) {
        if (*in == ':')
            continue;
        if (!isxdigit((unsigned char)*in) || n == 64)
            return -1;
        out[n++] = (char)tolower((unsigned char)*in);
    }
    out[n] = 0;
    return n == 64 ? 0 : -1;
}

static bool issued_here(struct cmg_site_ctx *s, X509 *x)
{
    EVP_PKEY *ca = X509_get0_pubkey(s->ca_cert);
    return x && ca && X509_verify(x, ca) == 1;
}

/* The thumbprint of DIR/devices/NAME.crt if the site issued it ('site init' writes
 * its sample device there, unrecorded). 0, or -1. */
static int device_file_thumbprint(struct cmg_site_ctx *s, const char *name, char out[65])
{
    char path[PATH_MAX];
    X509 *x = NULL;
    int rc = -1;

    if (valid_name(name) &&
        snprintf(path, sizeof(path), "%s/devices/%s.crt", s->dir, name) < (int)sizeof(path) &&
        (x = cmg_pki_load_cert(path)) && issued_here(s, x)) {
        cmg_tls_thumbprint(x, out);
        rc = out[0] ? 0 : -1;
    }
    X509_free(x);
    return rc;
}

/* What 'device block ID' names when ID is no registered device: "oidc:<id>" as given,
 * a certificate by thumbprint ("cert:" optional) or by the name it was issued to.
 * The identity as the gateway spells it into out, or -1. */
static int identity_of(struct cmg_site_ctx *s, const char *id, char *out, size_t outlen)
{
    char thumb[65];

    if (!strncmp(id, "oidc:", 5) && id[5]) {
        snprintf(out, outlen, "%s", id);
        return 0;
    }
    if (normal_thumbprint(!strncmp(id, "cert:", 5) ? id + 5 : id, thumb) < 0 &&
        cmg_store_cert_thumbprint(s->store, id, thumb, sizeof(thumb)) != 0 &&
        device_file_thumbprint(s, id, thumb) < 0)
        return -1;
    snprintf(out, outlen, "cert:%s", thumb);
    return 0;
}

static int device_block_tx(struct cmg_site_ctx *s, const char *id, bool block, cJSON *result,
                           char *msg, size_t len)
{
    char ident[300];
    int rc = cmg_store_device_block(s->store, id, block);

    if (rc == 1 && identity_of(s, id, ident, sizeof(ident)) == 0) {
        cJSON_AddStringToObject(result, "identity", ident);
        rc = cmg_store_identity_block(s->store, ident, block);
        if (rc == 1 && block)
            rc = 0;   /* blocked already */
        else if (rc == 1)
            return cmg_site_fail(msg, len, 404, "%s is not blocked", ident);
    } else if (rc == 1)
        return cmg_site_fail(msg, len, 404,
                             "no device %s: give a registered device id, the name or "
                             "SHA-256 thumbprint of a certificate device, or oidc:ID "
                             "(an OIDC oid, deviceid or user name)",
                             id);
    return rc < 0 ? cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store)) : 0;
}

static int op_device_block(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                           size_t len)
{
    const char *id = arg_str(args, "id");
    bool block = !cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(args, "blocked"));

    if (!id)
        return cmg_site_fail(msg, len, 400, "which device? (a device id, a certificate name or "
                                   "thumbprint, or oidc:ID)");
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "id", id);
    cJSON_AddBoolToObject(*result, "blocked", block);
    IN_TX(s, msg, len, device_block_tx(s, id, block, *result, msg, len));
}

/* ---- certificates ---- */

static bool valid_name(const char *n)
{
    size_t len = strlen(n);
    if (len == 0 || len > 64 || n[0] == '.' || n[0] == '-')
        return false;
    for (size_t i = 0; i < len; i++)
        if (!isalnum((unsigned char)n[i]) && !strchr("._-", n[i]))
            return false;
    return true;
}

/* A serial as people write it ("serial=0A:1B", "a1b", "0x0A1B") in the form stored:
 * upper-case hex without separators or leading zeros. -1 if not hex. */
static int normal_serial(const char *in, char *out, size_t outlen)
{
    size_t n = 0;

    if (!strncasecmp(in, "serial=", 7))
        in += 7;
    if (!strncasecmp(in, "0x", 2))
        in += 2;
    for (; *in; in++) {
        if (*in == ':' || *in == ' ')
            continue;
        if (!isxdigit((unsigned char)*in) || n + 1 >= outlen)
            return -1;
        if (n == 0 && *in == '0')
            continue;
        out[n++] = (char)toupper((unsigned char)*in);
    }
    if (n == 0)
        out[n++] = '0';
    out[n] = 0;
    return 0;
}

static int cert_issue_tx(struct cmg_site_ctx *s, const char *name, const char *outdir,
                         cJSON **result, char *msg, size_t len)
{
    char crt[PATH_MAX], key[PATH_MAX], subject[512], thumb[65];
    struct cmg_cert_req req = {0};
    EVP_PKEY *k = cmg_pki_new_key();
    X509 *x = NULL;
    BIGNUM *bn = NULL;
    char *serial = NULL;
    int rc = 500;

    req.cn = name;
    req.o = "OpenCMG device";
    req.key = k;
    req.eku = CMG_PKI_EKU_CLIENT;
    req.days = DEVICE_CERT_DAYS;
    req.crl_url = s->crl_url;
    if (!k || !(x = cmg_pki_issue(&req, s->ca_cert, s->ca_key)) ||
        !(bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(x), NULL)) || !(serial = BN_bn2hex(bn))) {
        cmg_site_fail(msg, len, 500, "cannot issue the certificate");
        goto out;
    }
    X509_NAME_oneline(X509_get_subject_name(x), subject, sizeof(subject));
    normal_serial(serial, serial, strlen(serial) + 1);
    if (snprintf(crt, sizeof(crt), "%s/%s.crt", outdir, name) >= (int)sizeof(crt) ||
        snprintf(key, sizeof(key), "%s/%s.key", outdir, name) >= (int)sizeof(key)) {
        cmg_site_fail(msg, len, 400, "output path too long");
        rc = 400;
        goto out;
    }
    cmg_tls_thumbprint(x, thumb);
    if (cmg_store_cert_add(s->store, serial, name, subject, (int64_t)time(NULL),
                           (int64_t)time(NULL) + DEVICE_CERT_DAYS * 86400LL) < 0 ||
        cmg_store_cert_set_thumbprint(s->store, serial, thumb) < 0) {
        cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
        goto out;
    }
    if (cmg_pki_write_key(key, k) < 0 || cmg_pki_write_cert(crt, x) < 0) {
        cmg_site_fail(msg, len, 500, "cannot write %s / %s", crt, key);
        goto out;
    }
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "name", name);
    cJSON_AddStringToObject(*result, "serial", serial);
    cJSON_AddStringToObject(*result, "thumbprint", thumb);
    cJSON_AddStringToObject(*result, "cert", crt);
    cJSON_AddStringToObject(*result, "key", key);
    rc = 0;
out:
    OPENSSL_free(serial);
    BN_free(bn);
    X509_free(x);
    EVP_PKEY_free(k);
    return rc;
}

/* Where an operation writes files: --out, else DIR/sub (made if missing). Through the
 * admin API only inside the site directory: a caller of the API must not be able to
 * make the site write anywhere else. 0, or an HTTP status with msg. */
static int out_dir(struct cmg_site_ctx *s, const cJSON *args, const char *sub, char *dir,
                   size_t dirlen, char *msg, size_t len)
{
    const char *out = arg_str(args, "out");
    char real[PATH_MAX];
    size_t n = strlen(s->dir);

    if (!out) {
        if (snprintf(dir, dirlen, "%s/%s", s->dir, sub) >= (int)dirlen)
            return cmg_site_fail(msg, len, 400, "site directory path too long");
        mkdir(dir, 0755);
        return 0;
    }
    if (s->confined && (!realpath(out, real) || strncmp(real, s->dir, n) ||
                        (real[n] != '/' && real[n] != 0)))
        return cmg_site_fail(msg, len, 403,
                             "the admin API writes only inside the site directory %s: "
                             "out '%s' is outside it (or missing)",
                             s->dir, out);
    if (snprintf(dir, dirlen, "%s", out) >= (int)dirlen)
        return cmg_site_fail(msg, len, 400, "out: path too long");
    return 0;
}

static int op_cert_issue(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len)
{
    const char *name = arg_str(args, "device");
    char dir[PATH_MAX];
    int rc;

    if (!name || !valid_name(name))
        return cmg_site_fail(msg, len, 400,
                             "--device NAME: letters, digits, '.', '_' and '-' only");
    if ((rc = out_dir(s, args, "devices", dir, sizeof(dir), msg, len)) != 0)
        return rc;
    IN_TX(s, msg, len, cert_issue_tx(s, name, dir, result, msg, len));
}

/* ---- connectors ---- */

static int connector_add_tx(struct cmg_site_ctx *s, const char *name, const char *dir,
                            cJSON **result, char *msg, size_t len)
{
    struct cmg_connector_cert c;
    char crt[PATH_MAX], key[PATH_MAX], err[512];
    int rc;

    if (snprintf(crt, sizeof(crt), "%s/%s.crt", dir, name) >= (int)sizeof(crt) ||
        snprintf(key, sizeof(key), "%s/%s.key", dir, name) >= (int)sizeof(key))
        return cmg_site_fail(msg, len, 400, "output path too long");
    /* A taken name writes no file (the transaction holds the store meanwhile). */
    if ((rc = cmg_store_connector_exists(s->store, name)) != 0)
        return rc < 0 ? cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store))
                      : cmg_site_fail(msg, len, 409, "a connector named %s exists already (revoked "
                             "or not): choose another name", name);
    if (cmg_site_connector_issue(s->ca_cert, s->ca_key, s->crl_url, name, crt, key, &c, err,
                                 sizeof(err)) < 0)
        return cmg_site_fail(msg, len, 500, "%s", err);
    if (cmg_store_connector_add(s->store, name, c.serial, c.issued, c.expires) != 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "name", name);
    cJSON_AddStringToObject(*result, "serial", c.serial);
    cJSON_AddStringToObject(*result, "cert", crt);
    cJSON_AddStringToObject(*result, "key", key);
    cJSON_AddNumberToObject(*result, "expires", (double)c.expires);
    return 0;
}

static int op_connector_add(struct cmg_site_ctx *s, const cJSON *args, cJSON **result,
                            char *msg, size_t len)
{
    const char *name = arg_str(args, "name");
    char dir[PATH_MAX];
    int rc;

    if (!name || !cmg_site_connector_name_ok(name))
        return cmg_site_fail(msg, len, 400, "connector NAME: 1 to 64 letters, digits, '.', '_' and "
                    "'-' expected, found '%s'", name ? name : "");
    if ((rc = out_dir(s, args, CMG_SITE_CONNECTORS_DIR, dir, sizeof(dir), msg, len)) != 0)
        return rc;
    IN_TX(s, msg, len, connector_add_tx(s, name, dir, result, msg, len));
}

static int op_connector_list(struct cmg_site_ctx *s, const cJSON *args, cJSON **result,
                             char *msg, size_t len)
{
    *result = cmg_store_connectors_json(s->store);
    return *result ? 0 : cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
}

static int connector_revoke_tx(struct cmg_site_ctx *s, const char *name, char *msg, size_t len)
{
    int rc = cmg_store_connector_revoke(s->store, name, (int64_t)time(NULL));

    if (rc < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    if (rc == 1)
        return cmg_site_fail(msg, len, 404,
                             "no connector named %s ('cmg site connector list' shows "
                             "them)",
                             name);
    if (rc == 2)
        return cmg_site_fail(msg, len, 409, "connector %s is revoked already", name);
    return 0;
}

static int op_connector_revoke(struct cmg_site_ctx *s, const cJSON *args, cJSON **result,
                               char *msg, size_t len)
{
    const char *name = arg_str(args, "name");

    if (!name)
        return cmg_site_fail(msg, len, 400,
                             "which connector? (its NAME, as 'connector list' shows)");
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "revoked", name);
    IN_TX(s, msg, len, connector_revoke_tx(s, name, msg, len));
}

/* A certificate the site issued but did not record ('site init' makes the gateway's,
 * the connector's and the sample device's): recorded now, so that it can be revoked. */
static int record_unlisted(struct cmg_site_ctx *s, X509 *x, const char *serial)
{
    char name[256] = "", subject[512], thumb[65];
    int64_t expires = 0;
    struct tm tm;

    X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, name, sizeof(name));
    X509_NAME_oneline(X509_get_subject_name(x), subject, sizeof(subject));
    if (ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm))
        expires = (int64_t)timegm(&tm);
    cmg_tls_thumbprint(x, thumb);
    return cmg_store_cert_add(s->store, serial, name[0] ? name : subject, subject,
                              (int64_t)time(NULL), expires) < 0 ||
                   cmg_store_cert_set_thumbprint(s->store, serial, thumb) < 0
               ? -1 : 0;
}

static int cert_revoke_tx(struct cmg_site_ctx *s, const char *serial, X509 *x, char *msg,
                          size_t len)
{
    int rc = cmg_store_cert_revoke(s->store, serial, (int64_t)time(NULL));
    if (rc == 1 && x) {
        if (record_unlisted(s, x, serial) < 0)
            return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
        rc = cmg_store_cert_revoke(s->store, serial, (int64_t)time(NULL));
    }
    if (rc < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    if (rc == 1)
        return cmg_site_fail(msg, len, 404, "no certificate with serial %s was issued by this site",
                    serial);
    if (rc == 2)
        return cmg_site_fail(msg, len, 409, "certificate %s is revoked already", serial);
    return 0;
}

/* The certificate given with the request (PEM text, "pem"), or for --device NAME the
 * one in DIR/devices/NAME.crt; only if this site's CA issued it. */
static X509 *given_cert(struct cmg_site_ctx *s, const cJSON *args)
{
    const char *pem = arg_str(args, "pem"), *name = arg_str(args, "device");
    char path[PATH_MAX];
    X509 *x = NULL;

    if (pem) {
        BIO *b = BIO_new_mem_buf(pem, -1);
        x = b ? PEM_read_bio_X509(b, NULL, NULL, NULL) : NULL;
        BIO_free(b);
    } else if (name && valid_name(name) &&
               snprintf(path, sizeof(path), "%s/devices/%s.crt", s->dir, name) <
                   (int)sizeof(path)) {
        x = cmg_pki_load_cert(path);
    }
    if (x && !issued_here(s, x)) {
        X509_free(x);
        x = NULL;
    }
    return x;
}

static int serial_hex(X509 *x, char *out, size_t len)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(x), NULL);
    char *hex = bn ? BN_bn2hex(bn) : NULL;
    int rc = hex && strlen(hex) < len ? 0 : -1;

    if (rc == 0)
        snprintf(out, len, "%s", hex);
    OPENSSL_free(hex);
    BN_free(bn);
    return rc;
}

static int op_cert_revoke(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                          size_t len)
{
    const char *serial = arg_str(args, "serial"), *name = arg_str(args, "device");
    X509 *x = given_cert(s, args);
    char found[128];
    int rc;

    if (!serial && name && cmg_store_cert_by_name(s->store, name, found, sizeof(found)) == 0)
        serial = found;
    else if (!serial && x && serial_hex(x, found, sizeof(found)) == 0)
        serial = found;
    rc = !serial && name
             ? cmg_site_fail(msg, len, 404, "no unrevoked certificate for device %s", name)
         : !serial ? cmg_site_fail(msg, len, 400,
                                   "which certificate? (--serial HEX, --cert FILE or "
                                   "--device NAME)")
         : normal_serial(serial, found, sizeof(found)) < 0
             ? cmg_site_fail(msg, len, 400, "serial %s: hexadecimal digits expected", serial)
             : 0;
    if (rc == 0) {
        *result = cJSON_CreateObject();
        cJSON_AddStringToObject(*result, "revoked", found);
        if (!cmg_site_revocation_checked(s))
            cJSON_AddStringToObject(*result, "note",
                                    "revocation checking is off: this revocation has no effect "
                                    "until it is on (cmg site cert check-revocation on)");
        if (cmg_store_begin(s->store) < 0)
            rc = cmg_site_fail(msg, len, 500, "store busy: %s", cmg_store_error(s->store));
        else if ((rc = cert_revoke_tx(s, found, x, msg, len)) == 0 &&
                 cmg_store_commit(s->store) < 0)
            rc = cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
        if (rc != 0)
            cmg_store_rollback(s->store);
    }
    X509_free(x);
    return rc;
}

/* ---- cert list: everything the site issued or holds ---- */

static double epoch_of(const ASN1_TIME *t)
{
    struct tm tm;
    return ASN1_TIME_to_tm(t, &tm) ? (double)timegm(&tm) : 0;
}

static cJSON *row_of(const cJSON *list, const char *serial)
{
    cJSON *row;
    cJSON_ArrayForEach(row, list) {
        const char *v = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(row, "serial"));
        if (v && !strcasecmp(v, serial))
            return row;
    }
    return NULL;
}

static void set_string(cJSON *row, const char *key, const char *value)
{
    cJSON_DeleteItemFromObjectCaseSensitive(row, key);
    cJSON_AddStringToObject(row, key, value);
}

/* The certificate in DIR/rel, as a row of kind: or, when the store recorded it, its
 * row told the kind and the file. */
static void add_cert_file(struct cmg_site_ctx *s, cJSON *list, const char *kind, const char *name,
                          const char *rel)
{
    char path[PATH_MAX], hex[80] = "", serial[80] = "", subject[512] = "";
    X509 *x;
    cJSON *row;

    if (snprintf(path, sizeof(path), "%s/%s", s->dir, rel) >= (int)sizeof(path) ||
        !(x = cmg_pki_load_cert(path)))
        return;
    if (serial_hex(x, hex, sizeof(hex)) == 0 && normal_serial(hex, serial, sizeof(serial)) == 0 &&
        (row = row_of(list, serial))) {
        /* the certificate says when it ends, not what was noted when it was made */
        set_string(row, "kind", kind);
        set_string(row, "file", path);
        cJSON_DeleteItemFromObjectCaseSensitive(row, "expires");
        cJSON_AddNumberToObject(row, "expires", epoch_of(X509_get0_notAfter(x)));
        X509_free(x);
        return;
    }
    X509_NAME_oneline(X509_get_subject_name(x), subject, sizeof(subject));
    row = cJSON_CreateObject();
    cJSON_AddStringToObject(row, "kind", kind);
    cJSON_AddStringToObject(row, "name", name);
    cJSON_AddStringToObject(row, "serial", serial);
    cJSON_AddStringToObject(row, "subject", subject);
    cJSON_AddNumberToObject(row, "issued", epoch_of(X509_get0_notBefore(x)));
    cJSON_AddNumberToObject(row, "expires", epoch_of(X509_get0_notAfter(x)));
    cJSON_AddNullToObject(row, "revoked");
    cJSON_AddStringToObject(row, "file", path);
    cJSON_AddItemToArray(list, row);
    X509_free(x);
}

void cmg_site_cert_files(struct cmg_site_ctx *s, cJSON *list)
{
    add_cert_file(s, list, "CA", "site CA", "ca.crt");
    add_cert_file(s, list, "site", "site channel", "site.crt");
    add_cert_file(s, list, "gateway", "gateway", "gateway.crt");
    add_cert_file(s, list, "connector", "connector-1", "connector.crt");
}

/* Every NAME.crt of DIR/sub, in name order, as rows of kind. */
static void add_cert_dir(struct cmg_site_ctx *s, cJSON *list, const char *kind, const char *sub)
{
    char path[PATH_MAX];
    struct dirent **names = NULL;
    int n;

    if (snprintf(path, sizeof(path), "%s/%s", s->dir, sub) >= (int)sizeof(path))
        return;
    n = scandir(path, &names, NULL, alphasort);
    for (int i = 0; i < n; i++) {
        char *name = names[i]->d_name, rel[NAME_MAX + 64];
        size_t l = strlen(name);
        if (l > 4 && !strcmp(name + l - 4, ".crt")) {
            snprintf(rel, sizeof(rel), "%s/%s", sub, name);
            name[l - 4] = 0;
            if (valid_name(name))
                add_cert_file(s, list, kind, name, rel);
        }
        free(names[i]);
    }
    free(names);
}

/* Rows of the store's list, of kind unless the store says what they are for. */
static void add_recorded(cJSON *list, cJSON *recorded, const char *kind)
{
    cJSON *row;
    while (recorded && (row = cJSON_DetachItemFromArray(recorded, 0))) {
        if (!cJSON_IsString(cJSON_GetObjectItemCaseSensitive(row, "kind")))
            set_string(row, "kind", kind);
        cJSON_AddItemToArray(list, row);
    }
    cJSON_Delete(recorded);
}

/* The rows by kind (CA first, signing keys last), each kind in the order it came: one
 * walk, each row moved once. */
static cJSON *by_kind(cJSON *list)
{
    static const char *const kinds[] = {"CA", "site", "gateway", "connector", "device"};
    enum { NKINDS = sizeof(kinds) / sizeof(kinds[0]) };
    cJSON *groups[NKINDS + 1], *out = cJSON_CreateArray(), *row, *next;

    for (size_t k = 0; k <= NKINDS; k++)
        groups[k] = cJSON_CreateArray();
    for (row = list ? list->child : NULL; row; row = next) {
        const char *kind = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(row, "kind"));
        size_t k = 0;
        next = row->next;
        while (k < NKINDS && !(kind && !strcmp(kind, kinds[k])))
            k++;
        cJSON_AddItemToArray(groups[k], cJSON_DetachItemViaPointer(list, row));
    }
    for (size_t k = 0; k <= NKINDS; k++) {
        while ((row = cJSON_DetachItemFromArray(groups[k], 0)))
            cJSON_AddItemToArray(out, row);
        cJSON_Delete(groups[k]);
    }
    cJSON_Delete(list);
    return out;
}

/* "not_after" beside "expires": the date as people read it. */
static void add_not_after(cJSON *list)
{
    cJSON *row;
    cJSON_ArrayForEach(row, list) {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(row, "expires");
        time_t t = cJSON_IsNumber(e) ? (time_t)e->valuedouble : 0;
        struct tm tm;
        char when[32];
        if (t && gmtime_r(&t, &tm) && strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm))
            cJSON_AddStringToObject(row, "not_after", when);
        else
            cJSON_AddNullToObject(row, "not_after");
    }
}

static int op_cert_list(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                        size_t len)
{
    cJSON *connectors, *devices;

    if (arg_bool(args, "revoked")) {
        *result = cmg_store_certs_json(s->store, true);
        return *result ? 0 : cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    }
    connectors = cmg_store_connectors_json(s->store);
    devices = cmg_store_certs_json(s->store, false);
    if (!connectors || !devices) {
        cJSON_Delete(connectors);
        cJSON_Delete(devices);
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    }
    /* the store's rows first: a file in the site directory then names its row's kind */
    *result = cJSON_CreateArray();
    add_recorded(*result, connectors, "connector");
    add_recorded(*result, devices, "device");
    cmg_site_cert_files(s, *result);
    add_cert_dir(s, *result, "connector", "connectors");
    add_cert_dir(s, *result, "device", "devices");
    *result = by_kind(*result);
    cmg_site_signing_list(s, *result);
    add_not_after(*result);
    return 0;
}

/* ---- cert renew: a new pair for the gateway, a connector or the site's channel ---- */

struct renewal {
    const char *kind;             /* "gateway", "connector", "site" */
    char name[256];
    char crt[PATH_MAX], key[PATH_MAX];
    char old_crt[PATH_MAX + 8], old_key[PATH_MAX + 8];
    const char *next;             /* what the operator does next */
};

static int renewal_files(struct renewal *r, const char *dir, const char *base, char *msg,
                         size_t len)
{
    if (snprintf(r->crt, sizeof(r->crt), "%s/%s.crt", dir, base) >= (int)sizeof(r->crt) ||
        snprintf(r->key, sizeof(r->key), "%s/%s.key", dir, base) >= (int)sizeof(r->key))
        return cmg_site_fail(msg, len, 400, "%s: path too long", dir);
    snprintf(r->old_crt, sizeof(r->old_crt), "%s.old", r->crt);
    snprintf(r->old_key, sizeof(r->old_key), "%s.old", r->key);
    return 0;
}

/* The connectors' names, for a message; whether name is one of them and revoked. */
static void connector_names(struct cmg_site_ctx *s, const char *name, char *out, size_t outlen,
                            bool *known, bool *revoked)
{
    cJSON *list = cmg_store_connectors_json(s->store), *row;
    size_t used = 0;

    *known = *revoked = false;
    out[0] = 0;
    cJSON_ArrayForEach(row, list) {
        const char *n = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(row, "name"));
        int w;
        if (!n)
            continue;
        if (name && !strcmp(n, name)) {
            *known = true;
            *revoked = cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(row, "revoked"));
        }
        w = snprintf(out + used, outlen - used, "%s%s", used ? ", " : "", n);
        if (w < 0 || (size_t)w >= outlen - used)
            break;
        used += (size_t)w;
    }
    if (!used)
        snprintf(out, outlen, "none ('cmg site connector add NAME' makes one)");
    cJSON_Delete(list);
}

/* A connector's pair: --out DIR/NAME.crt, else DIR/connectors/NAME.crt ('connector add'),
 * else DIR/connector.crt when it is NAME's ('site init' writes the first one there). */
static int connector_files(struct cmg_site_ctx *s, const cJSON *args, struct renewal *r,
                           char *msg, size_t len)
{
    char dir[PATH_MAX], first[PATH_MAX], cn[256] = "";
    X509 *x;
    int rc;

    if ((rc = out_dir(s, args, CMG_SITE_CONNECTORS_DIR, dir, sizeof(dir), msg, len)) != 0 ||
        (rc = renewal_files(r, dir, r->name, msg, len)) != 0)
        return rc;
    if (arg_str(args, "out") || access(r->crt, F_OK) == 0 ||
        snprintf(first, sizeof(first), "%s/connector.crt", s->dir) >= (int)sizeof(first) ||
        !(x = cmg_pki_load_cert(first)))
        return 0;
    X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn));
    X509_free(x);
    return strcmp(cn, r->name) ? 0 : renewal_files(r, s->dir, "connector", msg, len);
}

/* Which certificate args name, and its files. 0, or an HTTP status with msg. */
static int renewal_target(struct cmg_site_ctx *s, const cJSON *args, struct renewal *r,
                          char *msg, size_t len)
{
    const char *kind = arg_str(args, "kind"), *name = arg_str(args, "name");
    char names[1024];
    bool known, revoked;

    if (!kind)
        return cmg_site_fail(msg, len, 400,
                             "renew what? 'gateway [NAME]', 'connector NAME' or 'site'");
    if (!strcmp(kind, "gateway")) {
        if (name && strcmp(name, s->service_name))
            return cmg_site_fail(msg, len, 404,
                                 "no gateway certificate for %s: the site has one, for "
                                 "%s (service_name in site.conf)",
                                 name, s->service_name);
        r->kind = "gateway";
        snprintf(r->name, sizeof(r->name), "%s", s->service_name);
        r->next = "send SIGHUP to the gateway instances: systemctl reload "
                  "'opencmg-gateway@*' on each host (or kill -HUP each gateway's pid); "
                  "gateways on other hosts need the new pair copied there first";
        return renewal_files(r, s->dir, "gateway", msg, len);
    }
    if (!strcmp(kind, "connector")) {
        connector_names(s, name, names, sizeof(names), &known, &revoked);
        if (!name)
            return cmg_site_fail(msg, len, 400, "which connector? its NAME: %s", names);
        if (!known)
            return cmg_site_fail(msg, len, 404, "no connector named %s; the connectors: %s", name,
                        names);
        if (revoked)
            return cmg_site_fail(msg, len, 409,
                                 "connector %s is revoked: a revoked connector is not "
                                 "renewed ('cmg site connector add' makes a new one)",
                                 name);
        r->kind = "connector";
        snprintf(r->name, sizeof(r->name), "%s", name);
        r->next = "send SIGHUP to the connector: systemctl reload opencmg-connector (or kill "
                  "-HUP its pid); a connector on another host needs the new pair copied there "
                  "first";
        return connector_files(s, args, r, msg, len);
    }
    if (!strcmp(kind, "site")) {
        if (name)
            return cmg_site_fail(msg, len, 400, "the site has one channel certificate: no NAME");
        r->kind = "site";
        snprintf(r->name, sizeof(r->name), "site channel");
        r->next = "send SIGHUP to the site service: systemctl reload opencmg-site (or kill "
                  "-HUP the pid in serve.lock)";
        return renewal_files(r, s->dir, "site", msg, len);
    }
    return cmg_site_fail(msg, len, 400, "renew gateway, connector or site: found '%s'", kind);
}

/* The certificate in force, if this site's CA issued it (and, a connector's, to NAME). */
static int renewal_old(struct cmg_site_ctx *s, const struct renewal *r, X509 **out, char *msg,
                       size_t len)
{
    char issuer[256] = "", cn[256] = "";
    X509 *x;

    if (access(r->crt, R_OK) != 0 || access(r->key, R_OK) != 0)
        return cmg_site_fail(msg, len, 404,
                             "the %s certificate is not where it is renewed: %s / %s: %s", r->kind,
                             r->crt, r->key, strerror(errno));
    if (!(x = cmg_pki_load_cert(r->crt)))
        return cmg_site_fail(msg, len, 409, "%s: not a PEM certificate", r->crt);
    X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn));
    if (!issued_here(s, x)) {
        X509_NAME_oneline(X509_get_issuer_name(x), issuer, sizeof(issuer));
        X509_free(x);
        return cmg_site_fail(msg, len, 409,
                             "%s was not issued by the site CA (its issuer: %s): renew it "
                             "where it came from",
                             r->crt, issuer);
    }
    if (!strcmp(r->kind, "connector") && strcmp(cn, r->name)) {
        X509_free(x);
        return cmg_site_fail(msg, len, 409, "%s is connector %s's certificate, not %s's", r->crt,
                             cn, r->name);
    }
    *out = x;
    return 0;
}

static void renewal_record(const struct renewal *r, X509 *x, char *subject, size_t sublen,
                           struct cmg_store_cert *c)
{
    char hex[80] = "0";

    serial_hex(x, hex, sizeof(hex));
    normal_serial(hex, c->serial, sizeof(c->serial));
    X509_NAME_oneline(X509_get_subject_name(x), subject, (int)sublen);
    c->kind = r->kind;
    c->name = r->name;
    c->subject = subject;
    c->issued = (int64_t)epoch_of(X509_get0_notBefore(x));
    c->expires = (int64_t)epoch_of(X509_get0_notAfter(x));
}

/* A copy of a file the renewal replaces, beside it. */
static int keep_previous(const char *from, const char *to, unsigned mode)
{
    unsigned char *data = NULL;
    size_t n = 0;
    int rc = cmg_pki_read_file(from, 1 << 20, &data, &n) < 0 ||
             cmg_pki_write_file(to, data, n, mode) < 0 ? -1 : 0;

    if (data)
        OPENSSL_cleanse(data, n);
    free(data);
    return rc;
}

static cJSON *renewal_result(const struct renewal *r, const struct cmg_store_cert *old,
                             const struct cmg_store_cert *c, X509 *x)
{
    cJSON *o = cJSON_CreateObject();
    char when[64];

    cmg_tls_not_after(x, when, sizeof(when));
    cJSON_AddStringToObject(o, "kind", r->kind);
    cJSON_AddStringToObject(o, "name", r->name);
    cJSON_AddStringToObject(o, "serial", c->serial);
    cJSON_AddNumberToObject(o, "expires", (double)c->expires);
    cJSON_AddStringToObject(o, "not_after", when);
    cJSON_AddStringToObject(o, "cert", r->crt);
    cJSON_AddStringToObject(o, "key", r->key);
    cJSON_AddStringToObject(o, "replaced_serial", old->serial);
    cJSON_AddNumberToObject(o, "replaced_expires", (double)old->expires);
    cJSON_AddStringToObject(o, "previous_cert", r->old_crt);
    cJSON_AddStringToObject(o, "previous_key", r->old_key);
    cJSON_AddStringToObject(o, "next", r->next);
    return o;
}

/* Records the renewal in the store (in the caller's transaction). */
static int renew_record(struct cmg_site_ctx *s, const struct renewal *r, X509 *old, X509 *x,
                        struct cmg_store_cert *was, struct cmg_store_cert *now,
                        char *subjects, size_t sublen, char *msg, size_t len)
{
    renewal_record(r, old, subjects, sublen / 2, was);
    renewal_record(r, x, subjects + sublen / 2, sublen / 2, now);
    if (cmg_store_cert_replaced(s->store, was, (int64_t)time(NULL)) < 0 ||
        cmg_store_cert_renewed(s->store, now) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    return 0;
}

/* Keeps the previous pair as *.old, then writes the new one over the files the role reads
 * (each file replaced atomically; the key first: a reload between the two sees a pair
 * that does not match, refuses it and keeps what it has). */
static int renew_write(const struct renewal *r, EVP_PKEY *k, X509 *x, char *msg, size_t len)
{
    if (keep_previous(r->crt, r->old_crt, 0644) < 0 ||
        keep_previous(r->key, r->old_key, 0600) < 0 || cmg_pki_write_key(r->key, k) < 0 ||
        cmg_pki_write_cert(r->crt, x) < 0)
        return cmg_site_fail(msg, len, 500,
                             "the renewal is recorded, but %s / %s (or their copies *.old) "
                             "cannot be written: run 'cert renew' again",
                             r->crt, r->key);
    return 0;
}

/* The store first, the files once it committed: files written for a renewal the store
 * rolled back would be a certificate that no revocation of the role names. */
static int op_cert_renew(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len)
{
    struct renewal r = {0};
    struct cmg_store_cert was, now;
    char subjects[1024];
    X509 *old = NULL, *x = NULL;
    EVP_PKEY *k = NULL;
    int rc;

    if ((rc = renewal_target(s, args, &r, msg, len)) != 0 ||
        (rc = renewal_old(s, &r, &old, msg, len)) != 0)
        return rc;
    if (!(k = cmg_pki_new_key()) || !(x = cmg_pki_renew(old, k, s->ca_cert, s->ca_key))) {
        rc = cmg_site_fail(msg, len, 500, "cannot issue the new %s certificate", r.kind);
        goto out;
    }
    if (cmg_store_begin(s->store) < 0) {
        rc = cmg_site_fail(msg, len, 500, "store busy: %s", cmg_store_error(s->store));
        goto out;
    }
    rc = renew_record(s, &r, old, x, &was, &now, subjects, sizeof(subjects), msg, len);
    if (rc == 0 && cmg_store_commit(s->store) < 0)
        rc = cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    if (rc != 0) {
        cmg_store_rollback(s->store);
        goto out;
    }
    if ((rc = renew_write(&r, k, x, msg, len)) == 0)
        *result = renewal_result(&r, &was, &now, x);
out:
    X509_free(x);
    EVP_PKEY_free(k);
    X509_free(old);
    return rc;
}

static int revocation_tx(struct cmg_site_ctx *s, bool on, char *msg, size_t len)
{
    if (cmg_store_set_setting(s->store, "check_revocation", on ? "on" : "off") < 0 ||
        cmg_store_bump(s->store) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    return 0;
}

static int op_revocation(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len)
{
    const cJSON *on = cJSON_GetObjectItemCaseSensitive(args, "check_revocation");

    if (!cJSON_IsBool(on)) {
        *result = cJSON_CreateObject();
        cJSON_AddBoolToObject(*result, "check_revocation", cmg_site_revocation_checked(s));
        return 0;
    }
    *result = cJSON_CreateObject();
    cJSON_AddBoolToObject(*result, "check_revocation", cJSON_IsTrue(on));
    IN_TX(s, msg, len, revocation_tx(s, cJSON_IsTrue(on), msg, len));
}

/* ---- OIDC ---- */

static int oidc_set_tx(struct cmg_site_ctx *s, const struct cmg_oidc_conf *o, char *msg,
                       size_t len)
{
    return cmg_store_oidc_set(s->store, o) < 0
               ? cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store)) : 0;
}

static bool http_url(const char *u)
{
    return !strncmp(u, "https://", 8) || !strncmp(u, "http://", 7);
}

/* Where the keys are refreshed from: a discovery URL, else a JWKS URL (none when the
 * keys came from a file), and the roots of a private provider. 0 or a 400. */
static int oidc_refresh_args(const cJSON *args, struct cmg_oidc_conf *o, char *msg, size_t len)
{
    const char *discovery = arg_str(args, "discovery"), *uri = arg_str(args, "jwks_uri");
    const char *ca = arg_str(args, "ca");

    if ((discovery && !http_url(discovery)) || (uri && !http_url(uri)))
        return cmg_site_fail(msg, len, 400, "the %s URL must be http(s)://, found %s",
                    discovery && !http_url(discovery) ? "discovery" : "JWKS",
                    discovery && !http_url(discovery) ? discovery : uri);
    if (ca && *ca && !cmg_pem_certs_only(ca))
        return cmg_site_fail(msg, len, 400,
                             "ca: expected PEM certificates (the provider's CA), found "
                             "none");
    o->discovery = (char *)(discovery ? discovery : "");
    o->jwks_uri = (char *)(uri ? uri : "");
    o->ca = (char *)(ca ? ca : "");
    return 0;
}

static int op_oidc_set(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                       size_t len)
{
    const char *issuer = arg_str(args, "issuer"), *tenant = arg_str(args, "tenant");
    const cJSON *aud = cJSON_GetObjectItemCaseSensitive(args, "audience");
    const cJSON *jwks = cJSON_GetObjectItemCaseSensitive(args, "jwks");
    struct cmg_oidc_conf o = {0};
    struct cmg_jwks keys = {0};
    cJSON *auds = NULL;
    char err[256];
    int rc;

    if (!issuer)
        return cmg_site_fail(msg, len, 400, "--issuer is required");
    if ((rc = oidc_refresh_args(args, &o, msg, len)) != 0)
        return rc;
    if (cJSON_IsString(aud)) {
        auds = cJSON_CreateArray();
        cJSON_AddItemToArray(auds, cJSON_CreateString(aud->valuestring));
    } else if (cJSON_IsArray(aud) && cJSON_GetArraySize(aud) > 0) {
        auds = cJSON_Duplicate(aud, 1);
    } else
        return cmg_site_fail(msg, len, 400, "--audience is required");
    if (!cJSON_IsObject(jwks) || cmg_jwks_from_json(jwks, &keys, err, sizeof(err)) < 0) {
        cJSON_Delete(auds);
        return cmg_site_fail(msg, len, 400, "jwks: %s",
                             cJSON_IsObject(jwks) ? err
                                                  : "a JWKS object "
                                                    "is required");
    }
    o.issuer = (char *)issuer;
    o.tenant = (char *)(tenant ? tenant : "");
    o.audiences = cJSON_PrintUnformatted(auds);
    o.jwks = cJSON_PrintUnformatted(jwks);
    o.source = (char *)(arg_str(args, "source") ? arg_str(args, "source") : "");
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "issuer", issuer);
    cJSON_AddStringToObject(*result, "tenant", o.tenant);
    cJSON_AddItemToObject(*result, "audiences", auds);
    cJSON_AddNumberToObject(*result, "keys", (double)keys.n);
    cJSON_AddStringToObject(*result, "discovery", o.discovery);
    cJSON_AddStringToObject(*result, "jwks_uri", o.jwks_uri);
    cmg_jwks_free(&keys);
    if (cmg_store_begin(s->store) < 0)
        rc = cmg_site_fail(msg, len, 500, "store busy: %s", cmg_store_error(s->store));
    else if ((rc = oidc_set_tx(s, &o, msg, len)) == 0 && cmg_store_commit(s->store) < 0)
        rc = cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    if (rc != 0) {
        cmg_store_rollback(s->store);
        cJSON_Delete(*result);
        *result = NULL;
    }
    free(o.audiences);
    free(o.jwks);
    return rc;
}

/* The kids of a stored key set. */
static cJSON *oidc_kids(const char *jwks)
{
    cJSON *doc = cJSON_Parse(jwks ? jwks : "{}"), *kids = cJSON_CreateArray();
    const cJSON *k;

    cJSON_ArrayForEach(k, cJSON_GetObjectItemCaseSensitive(doc, "keys")) {
        const char *kid = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(k, "kid"));
        cJSON_AddItemToArray(kids, cJSON_CreateString(kid ? kid : ""));
    }
    cJSON_Delete(doc);
    return kids;
}

static int op_oidc_show(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                        size_t len)
{
    struct cmg_oidc_conf o;
    int rc = cmg_store_oidc_get(s->store, &o);

    if (rc < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    *result = cJSON_CreateObject();
    if (rc == 0) {
        cJSON_AddStringToObject(*result, "issuer", o.issuer ? o.issuer : "");
        cJSON_AddStringToObject(*result, "tenant", o.tenant ? o.tenant : "");
        cJSON_AddItemToObject(*result, "audiences", cJSON_Parse(o.audiences ? o.audiences : "[]"));
        cJSON_AddStringToObject(*result, "source", o.source ? o.source : "");
        cJSON_AddStringToObject(*result, "discovery", o.discovery ? o.discovery : "");
        cJSON_AddStringToObject(*result, "jwks_uri", o.jwks_uri ? o.jwks_uri : "");
        cJSON_AddBoolToObject(*result, "private_ca", o.ca && *o.ca);
        cJSON_AddItemToObject(*result, "kids", oidc_kids(o.jwks));
    }
    cmg_oidc_conf_free(&o);
    return 0;
}

static int oidc_clear_tx(struct cmg_site_ctx *s, char *msg, size_t len)
{
    return cmg_store_oidc_clear(s->store) < 0
               ? cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store)) : 0;
}

static int op_oidc_clear(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len)
{
    *result = cJSON_CreateObject();
    IN_TX(s, msg, len, oidc_clear_tx(s, msg, len));
}

/* ---- signing keys ---- */

static int op_key_rotate(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len)
{
    (void)args;
    return cmg_site_key_rotate(s, result, msg, len);
}

/* ---- what the deployment is doing (status.c) ---- */

static int op_status(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                     size_t len)
{
    (void)args;
    return cmg_site_status(s, (int64_t)time(NULL), result, msg, len);
}

static int op_traffic(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                      size_t len)
{
    const cJSON *range = cJSON_GetObjectItemCaseSensitive(args, "range");
    const cJSON *instance = cJSON_GetObjectItemCaseSensitive(args, "instance");

    if ((range && !cJSON_IsString(range)) || (instance && !cJSON_IsString(instance)))
        return cmg_site_fail(msg, len, 400, "range and instance must be strings");
    return cmg_site_traffic(s, (int64_t)time(NULL), range ? range->valuestring : NULL,
                            instance ? instance->valuestring : NULL, result, msg, len);
}

static const struct cmg_site_op_def ops[] = {
    {"mapping.add", op_mapping_add},       {"mapping.remove", op_mapping_remove},
    {"mapping.list", op_mapping_list},     {"bulk.create", op_bulk_create},
    {"bulk.list", op_bulk_list},           {"bulk.block", op_bulk_block},
    {"device.list", cmg_notify_op_devices}, {"device.block", op_device_block},
    {"cert.issue", op_cert_issue},         {"cert.revoke", op_cert_revoke},
    {"cert.list", op_cert_list},           {"cert.revocation", op_revocation},
    {"oidc.set", op_oidc_set},             {"oidc.show", op_oidc_show},
    {"oidc.clear", op_oidc_clear},         {"connector.add", op_connector_add},
    {"connector.list", op_connector_list}, {"connector.revoke", op_connector_revoke},
    {"cert.renew", op_cert_renew},
    {"key.rotate", op_key_rotate},
    {"status", op_status},                 {"traffic", op_traffic},
    {"alert.set", cmg_alerts_op_set},      {"alert.unset", cmg_alerts_op_unset},
    {"alert.list", cmg_alerts_op_list},    {"alert.webhook", cmg_alerts_op_webhook},
    {"notify", cmg_notify_op_send},        {"notify.status", cmg_notify_op_status},
    {"notify.resend", cmg_notify_op_resend}, {"notify.list", cmg_notify_op_list},
    {"notify.new_epoch", cmg_notify_op_new_epoch},
};

const struct cmg_site_op_def *cmg_site_op_find(const char *name)
{
    for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++)
        if (!strcmp(ops[i].name, name))
            return &ops[i];
    return NULL;
}

int cmg_site_op_run(struct cmg_site_ctx *s, const char *name, const cJSON *args,
                    cJSON **result, char *msg, size_t msglen)
{
    const struct cmg_site_op_def *d = cmg_site_op_find(name);
    int rc;

    *result = NULL;
    if (!d)
        return cmg_site_fail(msg, msglen, 404, "no operation %s", name);
    rc = d->fn(s, args, result, msg, msglen);
    if (rc != 0) {
        cJSON_Delete(*result);
        *result = NULL;
    } else if (!*result)
        return cmg_site_fail(msg, msglen, 500, "out of memory");
    return rc;
}
