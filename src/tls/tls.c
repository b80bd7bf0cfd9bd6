#include "tls/tls.h"

#include "core/log.h"

#include <arpa/inet.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pkcs12.h>
#include <openssl/provider.h>
#include <openssl/x509v3.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static int verify_err_index = -1;
static int alpn_index = -1;
static int eku_index = -1;   /* SSL_CTX: the OID text a peer's leaf must carry */
static int leaf_check_index = -1;   /* SSL: a struct leaf_check */

struct leaf_check {
    cmg_tls_leaf_check fn;
    void *arg;
};

static void alpn_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    OPENSSL_free(ptr);
}

static const char tls12_ciphers[] =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

void cmg_tls_tunnel_ciphers(SSL_CTX *ctx)
{
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                                  "TLS_CHACHA20_POLY1305_SHA256");
}

static void set_err(char *err, size_t errlen, const char *what, const char *file)
{
    unsigned long e = ERR_get_error();
    char detail[200] = "";
    if (e)
        ERR_error_string_n(e, detail, sizeof(detail));
    snprintf(err, errlen, "%s%s%s%s%s", what, file ? " " : "", file ? file : "",
             detail[0] ? ": " : "", detail);
    ERR_clear_error();
}

/* Encodes "h2,http/1.1" in the wire format: length-prefixed names. */
static int alpn_wire(const char *list, unsigned char *out, size_t outlen)
{
    size_t n = 0;
    while (list && *list) {
        const char *comma = strchr(list, ',');
        size_t len = comma ? (size_t)(comma - list) : strlen(list);
        if (len == 0 || len > 255 || n + 1 + len > outlen)
            return -1;
        out[n++] = (unsigned char)len;
        memcpy(out + n, list, len);
        n += len;
        list = comma ? comma + 1 : NULL;
    }
    return (int)n;
}

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
    const unsigned char *pref = arg;
    unsigned char *sel = NULL;
    (void)ssl;
    /* pref is the server's wire list, NUL-terminated after its length byte run */
    if (SSL_select_next_proto(&sel, outlen, pref + 1, pref[0], in, inlen) !=
        OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

static int ask_verify_cb(int ok, X509_STORE_CTX *store)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
    if (!ok && ssl && !SSL_get_ex_data(ssl, verify_err_index))
        SSL_set_ex_data(ssl, verify_err_index,
                        (void *)(intptr_t)X509_STORE_CTX_get_error(store));
    return 1;   /* decided per request, from the recorded error */
}

bool cmg_tls_has_eku(X509 *x, const char *oid)
{
    EXTENDED_KEY_USAGE *eku = x ? X509_get_ext_d2i(x, NID_ext_key_usage, NULL, NULL) : NULL;
    ASN1_OBJECT *want = OBJ_txt2obj(oid, 1);
    bool found = false;

    for (int i = 0; want && i < sk_ASN1_OBJECT_num(eku) && !found; i++)
        found = OBJ_cmp(sk_ASN1_OBJECT_value(eku, i), want) == 0;
    ASN1_OBJECT_free(want);
    EXTENDED_KEY_USAGE_free(eku);
    ERR_clear_error();
    return found;
}

/* A chain that verifies is refused if its leaf lacks the extended key usage that
 * its context requires (a connector's, the site's), or fails the connection's own
 * check (a revoked connector). */
static int eku_verify_cb(int ok, X509_STORE_CTX *store)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
    const char *oid = ssl ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), eku_index) : NULL;
    const struct leaf_check *check = ssl ? SSL_get_ex_data(ssl, leaf_check_index) : NULL;
    X509 *leaf = X509_STORE_CTX_get_current_cert(store);
    int e = X509_V_OK;

    if (!ok || X509_STORE_CTX_get_error_depth(store) != 0)
        return ok;
    if (oid && !cmg_tls_has_eku(leaf, oid))
        e = X509_V_ERR_INVALID_PURPOSE;
    else if (check)
        e = check->fn(check->arg, leaf);
    if (e != X509_V_OK) {
        X509_STORE_CTX_set_error(store, e);
        return 0;
    }
    return 1;
}

static void leaf_check_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                            void *argp)
{
    OPENSSL_free(ptr);
}

int cmg_tls_set_leaf_check(SSL *ssl, cmg_tls_leaf_check fn, void *arg)
{
    struct leaf_check *check = OPENSSL_malloc(sizeof(*check));

    if (!check || !SSL_set_ex_data(ssl, leaf_check_index, check)) {
        OPENSSL_free(check);
        return -1;
    }
    check->fn = fn;
    check->arg = arg;
    return 0;
}

static void eku_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    OPENSSL_free(ptr);
}

/* Requires the extended key usage oid of every peer leaf (any purpose otherwise:
 * OpenCMG's own usages stand alone). */
static int require_eku(SSL_CTX *ctx, const char *oid, bool instead_of_purpose)
{
    char *copy = OPENSSL_strdup(oid);

    if (!copy || !SSL_CTX_set_ex_data(ctx, eku_index, copy)) {
        OPENSSL_free(copy);
        return -1;
    }
    if (instead_of_purpose)
        SSL_CTX_set_purpose(ctx, X509_PURPOSE_ANY);
    return 0;
}

void cmg_tls_serial(X509 *x, char *out, size_t outlen)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    char *hex = bn ? BN_bn2hex(bn) : NULL;
    const char *p = hex;

    while (p && p[0] == '0' && p[1])
        p++;
    snprintf(out, outlen, "%s", p ? p : "");
    OPENSSL_free(hex);
    BN_free(bn);
}

long cmg_tls_peer_verify_error(const SSL *ssl)
{
    intptr_t e = (intptr_t)SSL_get_ex_data(ssl, verify_err_index);
    if (e)
        return (long)e;
    return SSL_get_verify_result(ssl);
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcasecmp(s + n - m, suffix) == 0;
}

static int load_pkcs12(SSL_CTX *ctx, const char *file, const char *password, char *err,
                       size_t errlen)
{
    FILE *f = fopen(file, "rb");
    PKCS12 *p12 = NULL;
    EVP_PKEY *pkey = NULL;
    X509 *cert = NULL;
    STACK_OF(X509) *chain = NULL;
    int rc = -1;

    if (!f) {
        snprintf(err, errlen, "cannot open %s: %m", file);
        return -1;
    }
    p12 = d2i_PKCS12_fp(f, NULL);
    fclose(f);
    if (!p12) {
        set_err(err, errlen, "not a PKCS#12 file:", file);
        return -1;
    }
    if (!PKCS12_parse(p12, password ? password : "", &pkey, &cert, &chain)) {
        /* Files exported by older tools use RC2/3DES, which need the legacy provider. */
        ERR_clear_error();
        OSSL_PROVIDER_try_load(NULL, "legacy", 1);
        if (!PKCS12_parse(p12, password ? password : "", &pkey, &cert, &chain)) {
            set_err(err, errlen, "cannot read PKCS#12 (wrong password?)", file);
            goto out;
        }
    }
    if (!cert || !pkey) {
        snprintf(err, errlen, "%s holds no certificate with its private key", file);
        goto out;
    }
    if (SSL_CTX_use_certificate(ctx, cert) != 1 || SSL_CTX_use_PrivateKey(ctx, pkey) != 1 ||
        (chain && SSL_CTX_set1_chain(ctx, chain) != 1) || SSL_CTX_check_private_key(ctx) != 1) {
        set_err(err, errlen, "cannot use the certificate in", file);
        goto out;
    }
    rc = 0;
out:
    EVP_PKEY_free(pkey);
    X509_free(cert);
    sk_X509_pop_free(chain, X509_free);
    PKCS12_free(p12);
    return rc;
}

static SSL_CTX *new_ctx(const SSL_METHOD *method, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(method);
    if (verify_err_index < 0)
        verify_err_index = SSL_get_ex_new_index(0, "cmg verify error", NULL, NULL, NULL);
    if (alpn_index < 0)
        alpn_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, alpn_free);
    if (eku_index < 0)
        eku_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, eku_free);
    if (leaf_check_index < 0)
        leaf_check_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, leaf_check_free);
    if (!ctx) {
        set_err(err, errlen, "cannot create a TLS context", NULL);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* One read(2) takes a record's header and body, and whatever follows, up to
     * four full records at once (the buffer goes when it empties: RELEASE_BUFFERS). */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, 4 * (SSL3_RT_MAX_PLAIN_LENGTH + 256));
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (SSL_CTX_set_cipher_list(ctx, tls12_ciphers) != 1) {
        set_err(err, errlen, "cannot set ciphers", NULL);
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

SSL_CTX *cmg_tls_server_ctx(const struct cmg_tls_server_opts *o, char *err, size_t errlen)
{
    SSL_CTX *ctx = new_ctx(TLS_server_method(), err, errlen);
    unsigned char *wire = NULL;
    int n;

    if (!ctx)
        return NULL;
    if (ends_with(o->cert, ".pfx") || ends_with(o->cert, ".p12")) {
        if (load_pkcs12(ctx, o->cert, o->password, err, errlen) < 0)
            goto fail;
    } else {
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert) != 1) {
            set_err(err, errlen, "cannot load certificate", o->cert);
            goto fail;
        }
        if (!o->key || SSL_CTX_use_PrivateKey_file(ctx, o->key, SSL_FILETYPE_PEM) != 1) {
            set_err(err, errlen, "cannot load private key", o->key ? o->key : "(none given)");
            goto fail;
        }
        if (SSL_CTX_check_private_key(ctx) != 1) {
            set_err(err, errlen, "private key does not match certificate", o->cert);
            goto fail;
        }
    }
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"cmg", 3);
    if (o->client_auth != CMG_TLS_NO_CLIENT_CERT) {
        STACK_OF(X509_NAME) *names;
        if (!o->client_ca || SSL_CTX_load_verify_locations(ctx, o->client_ca, NULL) != 1) {
            set_err(err, errlen, "cannot load client CA", o->client_ca ? o->client_ca : "(none)");
            goto fail;
        }
        names = SSL_load_client_CA_file(o->client_ca);
        if (names)
            SSL_CTX_set_client_CA_list(ctx, names);
        SSL_CTX_set_purpose(ctx, X509_PURPOSE_SSL_CLIENT);   /* clientAuth EKU */
        if (o->client_auth == CMG_TLS_REQUIRE_CLIENT_CERT && o->client_eku &&
            require_eku(ctx, o->client_eku, true) < 0) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        if (o->client_auth == CMG_TLS_REQUIRE_CLIENT_CERT)
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                               eku_verify_cb);
        else
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, ask_verify_cb);
    }
    if (o->alpn) {
        /* wire[0] holds the list's length, then the list: handed to the callback */
        wire = OPENSSL_zalloc(256 + 1);
        n = wire ? alpn_wire(o->alpn, wire + 1, 255) : -1;
        if (n < 0) {
            snprintf(err, errlen, "bad ALPN list '%s'", o->alpn);
            goto fail;
        }
        wire[0] = (unsigned char)n;
        SSL_CTX_set_alpn_select_cb(ctx, alpn_select, wire);
        SSL_CTX_set_ex_data(ctx, alpn_index, wire);   /* freed with the context */
    }
    return ctx;
fail:
    OPENSSL_free(wire);
    SSL_CTX_free(ctx);
    return NULL;
}

SSL_CTX *cmg_tls_client_ctx(const struct cmg_tls_client_opts *o, char *err, size_t errlen)
{
    SSL_CTX *ctx = new_ctx(TLS_client_method(), err, errlen);
    unsigned char wire[256];
    int n;

    if (!ctx)
        return NULL;
    if (o->ca ? SSL_CTX_load_verify_locations(ctx, o->ca, NULL) != 1
              : SSL_CTX_set_default_verify_paths(ctx) != 1) {
        set_err(err, errlen, "cannot load CA", o->ca ? o->ca : "(system default)");
        goto fail;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, eku_verify_cb);
    if (o->server_eku && require_eku(ctx, o->server_eku, false) < 0) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (o->cert) {
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert) != 1) {
            set_err(err, errlen, "cannot load certificate", o->cert);
            goto fail;
        }
        if (SSL_CTX_use_PrivateKey_file(ctx, o->key ? o->key : o->cert, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(ctx) != 1) {
            set_err(err, errlen, "cannot load private key", o->key ? o->key : o->cert);
            goto fail;
        }
    }
    if (o->alpn) {
        n = alpn_wire(o->alpn, wire, sizeof(wire));
        if (n < 0 || SSL_CTX_set_alpn_protos(ctx, wire, (unsigned)n) != 0) {
            snprintf(err, errlen, "bad ALPN list '%s'", o->alpn);
            goto fail;
        }
    }
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

bool cmg_tls_alpn_is(const SSL *ssl, const char *proto)
{
    const unsigned char *p = NULL;
    unsigned int len = 0;
    SSL_get0_alpn_selected(ssl, &p, &len);
    return p && len == strlen(proto) && memcmp(p, proto, len) == 0;
}

void cmg_tls_thumbprint(X509 *x, char out[65])
{
    unsigned char md[32];
    unsigned int len = 0;
    static const char hex[] = "0123456789abcdef";

    out[0] = 0;
    if (!X509_digest(x, EVP_sha256(), md, &len) || len != 32)
        return;
    for (unsigned i = 0; i < 32; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[64] = 0;
}

static void print_name(const X509_NAME *name, char *out, size_t outlen)
{
    BIO *b = BIO_new(BIO_s_mem());
    int n = 0;
    out[0] = 0;
    if (!b)
        return;
    if (X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB) >= 0)
        n = BIO_read(b, out, (int)outlen - 1);
    out[n > 0 ? n : 0] = 0;
    BIO_free(b);
}

void cmg_tls_subject(X509 *x, char *out, size_t outlen)
{
    print_name(X509_get_subject_name(x), out, outlen);
}

void cmg_tls_issuer(X509 *x, char *out, size_t outlen)
{
    print_name(X509_get_issuer_name(x), out, outlen);
}

void cmg_tls_subject_entry(X509 *x, int nid, char *out, size_t outlen)
{
    X509_NAME *name = X509_get_subject_name(x);
    int i = X509_NAME_get_index_by_NID(name, nid, -1);
    const ASN1_STRING *s;
    int len;

    out[0] = 0;
    if (i < 0)
        return;
    s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));
    len = ASN1_STRING_length(s);
    if (len < 0 || (size_t)len >= outlen || memchr(ASN1_STRING_get0_data(s), 0, (size_t)len))
        return;
    memcpy(out, ASN1_STRING_get0_data(s), (size_t)len);
    out[len] = 0;
}

/* ---- certificate lifecycle: names and expiry ---- */

/* The chain of ctx (its leaf and extra certificates) verifies up to a root of ca_file now. */
static int verify_chain(SSL_CTX *ctx, X509 *leaf, const char *ca_file, char *why, size_t whylen)
{
    X509_STORE *roots = X509_STORE_new();
    X509_STORE_CTX *vc = X509_STORE_CTX_new();
    STACK_OF(X509) *extra = NULL;
    int rc = -1;

    SSL_CTX_get0_chain_certs(ctx, &extra);
    if (!roots || !vc || X509_STORE_load_file(roots, ca_file) != 1) {
        snprintf(why, whylen, "cannot load the CA file %s", ca_file);
    } else if (X509_STORE_CTX_init(vc, roots, leaf, extra) != 1) {
        snprintf(why, whylen, "out of memory");
    } else if (X509_verify_cert(vc) != 1) {
        snprintf(why, whylen, "it is not from the CA of %s (%s)", ca_file,
                 X509_verify_cert_error_string(X509_STORE_CTX_get_error(vc)));
    } else {
        rc = 0;
    }
    ERR_clear_error();
    X509_STORE_CTX_free(vc);
    X509_STORE_free(roots);
    return rc;
}

int cmg_tls_check_own_cert(SSL_CTX *ctx, const char *file, const char *ca_file,
                           const char *eku, char *err, size_t errlen)
{
    X509 *x = SSL_CTX_get0_certificate(ctx);
    char when[64], why[400], usages[256];

    if (!x) {
        snprintf(err, errlen, "%s: no certificate", file);
        return -1;
    }
    if (X509_cmp_current_time(X509_get0_notAfter(x)) <= 0) {
        cmg_tls_not_after(x, when, sizeof(when));
        snprintf(err, errlen, "certificate %s expired on %s: expected a certificate valid now",
                 file, when);
        return -1;
    }
    if (X509_cmp_current_time(X509_get0_notBefore(x)) > 0) {
        snprintf(err, errlen, "certificate %s is not valid yet: expected a certificate valid "
                 "now (is this host's clock right?)", file);
        return -1;
    }
    if (eku && !cmg_tls_has_eku(x, eku)) {
        cmg_tls_usages(x, usages, sizeof(usages));
        snprintf(err, errlen, "certificate %s lacks the usage it needs: expected %s, found %s",
                 file, eku, usages);
        return -1;
    }
    if (ca_file && ca_file[0] && verify_chain(ctx, x, ca_file, why, sizeof(why)) < 0) {
        snprintf(err, errlen, "certificate %s: %s", file, why);
        return -1;
    }
    return 0;
}


#define WATCH_INTERVAL_MS (24ull * 3600 * 1000)

void cmg_tls_not_after(X509 *x, char *out, size_t outlen)
{
    struct tm tm;

    if (!ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm) ||
        !strftime(out, outlen, "%Y-%m-%d %H:%M:%S UTC", &tm))
        snprintf(out, outlen, "(unreadable date)");
}

void cmg_tls_cert_names(X509 *x, char *out, size_t outlen)
{
    GENERAL_NAMES *sans = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    size_t used = 0;

    out[0] = 0;
    for (int i = 0; i < sk_GENERAL_NAME_num(sans); i++) {
        const GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, i);
        char ip[INET6_ADDRSTRLEN] = "";
        const char *name = NULL;
        int n;
        if (g->type == GEN_DNS) {
            name = (const char *)ASN1_STRING_get0_data(g->d.dNSName);
        } else if (g->type == GEN_IPADD) {
            int len = ASN1_STRING_length(g->d.iPAddress);
            const unsigned char *a = ASN1_STRING_get0_data(g->d.iPAddress);
            if (len == 4 || len == 16)
                inet_ntop(len == 4 ? AF_INET : AF_INET6, a, ip, sizeof(ip));
            name = ip;
        }
        if (!name || !name[0])
            continue;
        n = snprintf(out + used, outlen - used, "%s%s", used ? ", " : "", name);
        if (n < 0 || (size_t)n >= outlen - used)
            break;
        used += (size_t)n;
    }
    GENERAL_NAMES_free(sans);
    if (!used) {
        char cn[256] = "";
        X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn));
        snprintf(out, outlen, "%s%s", cn[0] ? "CN=" : "no name at all", cn);
    }
}

static bool names_host(X509 *x, const char *name)
{
    unsigned char addr[16];

    if (inet_pton(AF_INET, name, addr) == 1 || inet_pton(AF_INET6, name, addr) == 1)
        return X509_check_ip_asc(x, name, 0) == 1;
    return X509_check_host(x, name, 0, 0, NULL) == 1;
}

int cmg_tls_check_server_cert(SSL_CTX *ctx, const char *file, const char *service_name,
                              char *err, size_t errlen)
{
    X509 *x = SSL_CTX_get0_certificate(ctx);
    char when[64], names[512];

    if (!x) {
        snprintf(err, errlen, "%s: no certificate", file);
        return -1;
    }
    cmg_tls_not_after(x, when, sizeof(when));
    if (X509_cmp_current_time(X509_get0_notAfter(x)) <= 0) {
        snprintf(err, errlen, "certificate %s expired on %s: expected a certificate valid now "
                 "(renew it: cmg site cert renew gateway NAME, or your CA)", file, when);
        return -1;
    }
    if (!names_host(x, service_name)) {
        cmg_tls_cert_names(x, names, sizeof(names));
        snprintf(err, errlen, "certificate %s does not name the service: expected %s "
                 "(service_name), found %s", file, service_name, names);
        return -1;
    }
    return 0;
}

/* The marks, in days before notAfter, and "passed". */
static const int marks[] = {30, 14, 7, 3, 1, 0};
#define NMARKS ((int)(sizeof(marks) / sizeof(marks[0])))

/* The last mark the time left has reached (-1: more than 30 days left). */
static int mark_of(X509 *x, int *days_left)
{
    int days = 0, secs = 0, m = -1;
    int64_t left;

    if (!ASN1_TIME_diff(&days, &secs, NULL, X509_get0_notAfter(x)))
        return -1;
    left = (int64_t)days * 86400 + secs;
    *days_left = left > 0 ? (int)((left + 86399) / 86400) : 0;   /* started days count */
    for (int i = 0; i < NMARKS; i++)
        if (left <= (int64_t)marks[i] * 86400)
            m = i;
    return m;
}

static void check_one(struct cmg_tls_watched *c)
{
    int days = 0, m = mark_of(c->cert, &days);
    char when[64];

    if (m < 0 || m == c->mark)
        return;
    c->mark = m;
    cmg_tls_not_after(c->cert, when, sizeof(when));
    if (marks[m] == 0)
        cmg_error("%s %s expired on %s: renew it", c->what, c->file, when);
    else
        cmg_warn("%s %s expires on %s (%d day(s) left): renew it before then", c->what, c->file,
                 when, days);
}

static void on_watch_timer(struct cmg_timer *t)
{
    struct cmg_tls_watch *w = (struct cmg_tls_watch *)((char *)t - offsetof(struct cmg_tls_watch, timer));

    for (size_t i = 0; i < w->n; i++)
        check_one(&w->certs[i]);
    cmg_timer_start(w->loop, &w->timer, WATCH_INTERVAL_MS, on_watch_timer);
}

void cmg_tls_watch_cert(struct cmg_tls_watch *w, const char *what, const char *file, X509 *x)
{
    struct cmg_tls_watched *c;

    if (!x || w->n >= CMG_TLS_WATCH_MAX)
        return;
    for (size_t i = 0; i < w->n; i++)
        if (!strcmp(w->certs[i].file, file))
            return;   /* one file, one line (the device and connector CAs are often one) */
    c = &w->certs[w->n++];
    snprintf(c->what, sizeof(c->what), "%s", what);
    snprintf(c->file, sizeof(c->file), "%s", file);
    X509_up_ref(x);
    c->cert = x;
    c->mark = -1;
}

int cmg_tls_watch_file(struct cmg_tls_watch *w, const char *what, const char *file, char *err,
                       size_t errlen)
{
    BIO *b = BIO_new_file(file, "r");
    X509 *x, *first = NULL;

    while (b && (x = PEM_read_bio_X509(b, NULL, NULL, NULL))) {
        if (!first || ASN1_TIME_compare(X509_get0_notAfter(x), X509_get0_notAfter(first)) < 0) {
            X509_free(first);
            first = x;
        } else {
            X509_free(x);
        }
    }
    ERR_clear_error();
    BIO_free(b);
    if (!first) {
        snprintf(err, errlen, "%s: no PEM certificate to watch", file);
        return -1;
    }
    cmg_tls_watch_cert(w, what, file, first);
    X509_free(first);
    return 0;
}

void cmg_tls_watch_start(struct cmg_tls_watch *w, struct cmg_loop *loop)
{
    w->loop = loop;
    on_watch_timer(&w->timer);
}

void cmg_tls_watch_free(struct cmg_tls_watch *w)
{
    if (w->loop)
        cmg_timer_stop(w->loop, &w->timer);
    for (size_t i = 0; i < w->n; i++)
        X509_free(w->certs[i].cert);
    w->n = 0;
}

void cmg_tls_usages(X509 *x, char *out, size_t outlen)
{
    EXTENDED_KEY_USAGE *eku = X509_get_ext_d2i(x, NID_ext_key_usage, NULL, NULL);
    size_t used = 0;

    out[0] = 0;
    for (int i = 0; i < sk_ASN1_OBJECT_num(eku); i++) {
        const ASN1_OBJECT *o = sk_ASN1_OBJECT_value(eku, i);
        char name[80];
        int n;
        int nid = OBJ_obj2nid(o);
        if (OBJ_obj2txt(name, sizeof(name), o, 1) <= 0)
            snprintf(name, sizeof(name), "?");
        if (!strcmp(name, CMG_OID_EKU_CONNECTOR))
            snprintf(name, sizeof(name), "OpenCMG connector");
        else if (!strcmp(name, CMG_OID_EKU_SITE))
            snprintf(name, sizeof(name), "OpenCMG site");
        else if (nid != NID_undef)
            snprintf(name, sizeof(name), "%s", OBJ_nid2sn(nid));   /* clientAuth, ... */
        n = snprintf(out + used, outlen - used, "%s%s", used ? ", " : "", name);
        if (n < 0 || (size_t)n >= outlen - used)
            break;
        used += (size_t)n;
    }
    EXTENDED_KEY_USAGE_free(eku);
    ERR_clear_error();
    if (!used)
        snprintf(out, outlen, "no extended key usage");
}
