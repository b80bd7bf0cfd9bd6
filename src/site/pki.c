/* Site PKI: keys, certificates, PEM and PKCS#12 files. See pki.h. */
#include "site/pki.h"
#include "tls/tls.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/pkcs12.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#define CMG_PKI_SKEW_SECONDS 300 /* notBefore = now - 5 minutes */

/* Prints "cmg: <message>: <OpenSSL reasons>" and clears the OpenSSL error queue. */
static void pki_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void pki_error(const char *fmt, ...)
{
    va_list ap;
    unsigned long e;
    const char *sep = ": ";

    fputs("cmg: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    while ((e = ERR_get_error()) != 0) {
        const char *reason = ERR_reason_error_string(e);
        char buf[256];

        if (!reason) {
            ERR_error_string_n(e, buf, sizeof(buf));
            reason = buf;
        }
        fprintf(stderr, "%s%s", sep, reason);
        sep = "; ";
    }
    fputc('\n', stderr);
}

EVP_PKEY *cmg_pki_new_key(void)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");

    if (!key)
        pki_error("cannot generate a P-256 key");
    return key;
}

/* A random positive serial number of 128 bits. */
static int pki_set_serial(X509 *cert)
{
    unsigned char raw[16];
    BIGNUM *bn = NULL;
    int ret = -1;

    if (RAND_bytes(raw, sizeof(raw)) != 1)
        goto out;
    raw[0] &= 0x7f; /* positive, and at most 16 bytes once DER-encoded */
    bn = BN_bin2bn(raw, sizeof(raw), NULL);
    if (!bn || BN_is_zero(bn) || !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert)))
        goto out;
    ret = 0;
out:
    BN_free(bn);
    OPENSSL_cleanse(raw, sizeof(raw));
    return ret;
}

static int pki_name_add(X509_NAME *name, const char *field, const char *value)
{
    if (!value)
        return 0;
    if (!X509_NAME_add_entry_by_txt(name, field, MBSTRING_UTF8, (const unsigned char *)value,
                                    -1, -1, 0))
        return -1;
    return 0;
}

static int pki_add_ext(X509 *cert, X509V3_CTX *ctx, int nid, const char *value)
{
    X509_EXTENSION *ext = X509V3_EXT_nconf_nid(NULL, ctx, nid, value);
    int ret = -1;

    if (!ext)
        goto out;
    if (!X509_add_ext(cert, ext, -1))
        goto out;
    ret = 0;
out:
    X509_EXTENSION_free(ext);
    return ret;
}

static int pki_add_san(X509 *cert, const struct cmg_cert_req *req)
{
    GENERAL_NAMES *gens = NULL;
    GENERAL_NAME *gen = NULL;
    ASN1_IA5STRING *ia5 = NULL;
    ASN1_OCTET_STRING *ip = NULL;
    size_t i;
    int ret = -1;

    if (req->n_dns_names == 0 && req->n_ip_addrs == 0)
        return 0;
    gens = sk_GENERAL_NAME_new_null();
    if (!gens)
        goto out;
    for (i = 0; i < req->n_dns_names; i++) {
        if (!(gen = GENERAL_NAME_new()) || !(ia5 = ASN1_IA5STRING_new()) ||
            !ASN1_STRING_set(ia5, req->dns_names[i], -1))
            goto out;
        GENERAL_NAME_set0_value(gen, GEN_DNS, ia5);
        ia5 = NULL;
        if (!sk_GENERAL_NAME_push(gens, gen))
            goto out;
        gen = NULL;
    }
    for (i = 0; i < req->n_ip_addrs; i++) {
        if (!(gen = GENERAL_NAME_new()))
            goto out;
        if (!(ip = a2i_IPADDRESS(req->ip_addrs[i]))) {
            ERR_raise_data(ERR_LIB_X509V3, X509V3_R_BAD_IP_ADDRESS, "%s", req->ip_addrs[i]);
            goto out;
        }
        GENERAL_NAME_set0_value(gen, GEN_IPADD, ip);
        ip = NULL;
        if (!sk_GENERAL_NAME_push(gens, gen))
            goto out;
        gen = NULL;
    }
    if (X509_add1_ext_i2d(cert, NID_subject_alt_name, gens, 0, X509V3_ADD_DEFAULT) != 1)
        goto out;
    ret = 0;
out:
    ASN1_IA5STRING_free(ia5);
    ASN1_OCTET_STRING_free(ip);
    GENERAL_NAME_free(gen);
    GENERAL_NAMES_free(gens);
    return ret;
}

/* Where a relying party fetches the site's CRL (the gateway serves it). A CA's own
 * certificate is the trust anchor: it names none. */
static int pki_add_cdp(X509 *cert, X509V3_CTX *ctx, const struct cmg_cert_req *req)
{
    char value[600];

    if (!req->crl_url || !req->crl_url[0] || req->is_ca)
        return 0;
    if (strpbrk(req->crl_url, ", \t\r\n") ||
        snprintf(value, sizeof(value), "URI:%s", req->crl_url) >= (int)sizeof(value)) {
        ERR_raise_data(ERR_LIB_X509V3, X509V3_R_INVALID_NAME, "crl_url %s", req->crl_url);
        return -1;
    }
    return pki_add_ext(cert, ctx, NID_crl_distribution_points, value);
}

X509 *cmg_pki_issue(const struct cmg_cert_req *req, X509 *ca_cert, EVP_PKEY *ca_key)
{
    X509 *cert = NULL, *ret = NULL;
    X509_NAME *name = NULL;
    X509V3_CTX ctx;
    char eku[256] = "";
    const char *who = req && req->cn ? req->cn : "(no name)";

    if (!req || !req->cn || !req->key || !ca_key || req->days <= 0) {
        pki_error("cannot issue a certificate for %s: incomplete request", who);
        goto out;
    }
    if (ca_cert ? X509_check_private_key(ca_cert, ca_key) != 1
                : EVP_PKEY_eq(req->key, ca_key) != 1) {
        pki_error("cannot issue a certificate for %s: the CA key does not match", who);
        goto out;
    }
    if (!(cert = X509_new()) || !X509_set_version(cert, X509_VERSION_3) ||
        pki_set_serial(cert) < 0)
        goto fail;

    if (!(name = X509_NAME_new()) || pki_name_add(name, "O", req->o) < 0 ||
        pki_name_add(name, "OU", req->ou) < 0 || pki_name_add(name, "CN", req->cn) < 0)
        goto fail;
    if (!X509_set_subject_name(cert, name) ||
        !X509_set_issuer_name(cert, ca_cert ? X509_get_subject_name(ca_cert) : name))
        goto fail;

    if (!X509_gmtime_adj(X509_getm_notBefore(cert), -CMG_PKI_SKEW_SECONDS) ||
        !X509_time_adj_ex(X509_getm_notAfter(cert), req->days, 0, NULL))
        goto fail;
    /* Never outlive the issuer. */
    if (ca_cert && ASN1_TIME_compare(X509_get0_notAfter(cert), X509_get0_notAfter(ca_cert)) > 0 &&
        !X509_set1_notAfter(cert, X509_get0_notAfter(ca_cert)))
        goto fail;
    if (!X509_set_pubkey(cert, req->key))
        goto fail;

    X509V3_set_ctx(&ctx, ca_cert ? ca_cert : cert, cert, NULL, NULL, 0);
    if (req->is_ca) {
        if (pki_add_ext(cert, &ctx, NID_basic_constraints, "critical,CA:TRUE") < 0 ||
            pki_add_ext(cert, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign") < 0)
            goto fail;
    } else {
        if (pki_add_ext(cert, &ctx, NID_basic_constraints, "critical,CA:FALSE") < 0 ||
            pki_add_ext(cert, &ctx, NID_key_usage, "critical,digitalSignature") < 0)
            goto fail;
    }
    if (req->eku) {
        static const struct { unsigned bit; const char *name; } ekus[] = {
            {CMG_PKI_EKU_SERVER, "serverAuth"},
            {CMG_PKI_EKU_CLIENT, "clientAuth"},
            {CMG_PKI_EKU_CONNECTOR, CMG_OID_EKU_CONNECTOR},
            {CMG_PKI_EKU_SITE, CMG_OID_EKU_SITE},
        };
        size_t n = 0;
        for (size_t i = 0; i < sizeof(ekus) / sizeof(ekus[0]); i++)
            if (req->eku & ekus[i].bit)
                n += (size_t)snprintf(eku + n, sizeof(eku) - n, "%s%s", n ? "," : "",
                                      ekus[i].name);
        if (n >= sizeof(eku) || pki_add_ext(cert, &ctx, NID_ext_key_usage, eku) < 0)
            goto fail;
    }
    /* SKI first: for a self-signed certificate the AKI is taken from it. */
    if (pki_add_ext(cert, &ctx, NID_subject_key_identifier, "hash") < 0 ||
        pki_add_ext(cert, &ctx, NID_authority_key_identifier, "keyid:always") < 0)
        goto fail;
    if (pki_add_san(cert, req) < 0)
        goto fail;
    if (pki_add_cdp(cert, &ctx, req) < 0)
        goto fail;

    if (X509_sign(cert, ca_key, EVP_sha256()) <= 0)
        goto fail;
    ret = cert;
    cert = NULL;
    goto out;
fail:
    pki_error("cannot issue a certificate for %s", who);
out:
    X509_NAME_free(name);
    X509_free(cert);
    return ret;
}

/* The extensions of old that describe the subject (names, usages, CRL location...): all
 * but the key identifiers, which are made again for the new key. */
static int pki_copy_exts(X509 *cert, X509 *old)
{
    for (int i = 0; i < X509_get_ext_count(old); i++) {
        X509_EXTENSION *ext = X509_get_ext(old, i);
        int nid = OBJ_obj2nid(X509_EXTENSION_get_object(ext));
        if (nid == NID_subject_key_identifier || nid == NID_authority_key_identifier)
            continue;
        if (!X509_add_ext(cert, ext, -1))
            return -1;
    }
    return 0;
}

/* notBefore now (less the skew), notAfter as far after it as old's was after its own. */
static int pki_renewed_validity(X509 *cert, X509 *old, X509 *ca_cert)
{
    int days = 0, secs = 0;

    if (!ASN1_TIME_diff(&days, &secs, X509_get0_notBefore(old), X509_get0_notAfter(old)) ||
        (days <= 0 && secs <= 0) ||
        !X509_gmtime_adj(X509_getm_notBefore(cert), -CMG_PKI_SKEW_SECONDS) ||
        !X509_time_adj_ex(X509_getm_notAfter(cert), days, secs - CMG_PKI_SKEW_SECONDS, NULL))
        return -1;
    if (ASN1_TIME_compare(X509_get0_notAfter(cert), X509_get0_notAfter(ca_cert)) > 0 &&
        !X509_set1_notAfter(cert, X509_get0_notAfter(ca_cert)))
        return -1;
    return 0;
}

X509 *cmg_pki_renew(X509 *old, EVP_PKEY *key, X509 *ca_cert, EVP_PKEY *ca_key)
{
    X509 *cert = NULL;
    X509V3_CTX ctx;
    char who[256] = "(no name)";

    X509_NAME_oneline(X509_get_subject_name(old), who, sizeof(who));
    if (X509_check_private_key(ca_cert, ca_key) != 1) {
        pki_error("cannot renew %s: the CA key does not match", who);
        return NULL;
    }
    if (!(cert = X509_new()) || !X509_set_version(cert, X509_VERSION_3) ||
        pki_set_serial(cert) < 0 ||
        !X509_set_subject_name(cert, X509_get_subject_name(old)) ||
        !X509_set_issuer_name(cert, X509_get_subject_name(ca_cert)) ||
        pki_renewed_validity(cert, old, ca_cert) < 0 || !X509_set_pubkey(cert, key) ||
        pki_copy_exts(cert, old) < 0)
        goto fail;
    X509V3_set_ctx(&ctx, ca_cert, cert, NULL, NULL, 0);
    if (pki_add_ext(cert, &ctx, NID_subject_key_identifier, "hash") < 0 ||
        pki_add_ext(cert, &ctx, NID_authority_key_identifier, "keyid:always") < 0 ||
        X509_sign(cert, ca_key, EVP_sha256()) <= 0)
        goto fail;
    return cert;
fail:
    pki_error("cannot renew the certificate of %s", who);
    X509_free(cert);
    return NULL;
}

int cmg_pki_write_file(const char *path, const void *data, size_t len, unsigned mode)
{
    static unsigned counter;
    char tmp[PATH_MAX];
    const unsigned char *p = data;
    int fd = -1, ret = -1, n;

    n = snprintf(tmp, sizeof(tmp), "%s.tmp-%ld-%u", path, (long)getpid(), counter++);
    if (n < 0 || (size_t)n >= sizeof(tmp)) {
        fprintf(stderr, "cmg: %s: path too long\n", path);
        return -1;
    }
    /* Created with its final mode: a key is never readable by others, not even briefly. */
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, (mode_t)mode);
    if (fd < 0) {
        fprintf(stderr, "cmg: cannot create %s: %s\n", tmp, strerror(errno));
        return -1;
    }
    while (len > 0) {
        ssize_t w = write(fd, p, len);

        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            fprintf(stderr, "cmg: cannot write %s: %s\n", tmp, strerror(errno));
            goto out;
        }
        p += w;
        len -= (size_t)w;
    }
    if (fsync(fd) < 0) {
        fprintf(stderr, "cmg: cannot write %s: %s\n", tmp, strerror(errno));
        goto out;
    }
    if (close(fd) < 0) {
        fd = -1;
        fprintf(stderr, "cmg: cannot write %s: %s\n", tmp, strerror(errno));
        goto out;
    }
    fd = -1;
    if (rename(tmp, path) < 0) {
        fprintf(stderr, "cmg: cannot create %s: %s\n", path, strerror(errno));
        goto out;
    }
    ret = 0;
out:
    if (fd >= 0)
        close(fd);
    if (ret < 0)
        unlink(tmp);
    return ret;
}

/* Writes what a memory BIO holds to path. */
static int pki_write_bio(const char *path, BIO *bio, unsigned mode)
{
    char *data = NULL;
    long len = BIO_get_mem_data(bio, &data);

    if (len <= 0 || !data) {
        pki_error("cannot encode %s", path);
        return -1;
    }
    return cmg_pki_write_file(path, data, (size_t)len, mode);
}

int cmg_pki_write_key(const char *path, EVP_PKEY *key)
{
    BIO *bio = BIO_new(BIO_s_secmem()); /* cleared when freed */
    int ret = -1;

    /* PEM_write_bio_PrivateKey writes PKCS#8 ("BEGIN PRIVATE KEY") in OpenSSL 3. */
    if (!bio || !PEM_write_bio_PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL)) {
        pki_error("cannot encode the key for %s", path);
        goto out;
    }
    ret = pki_write_bio(path, bio, 0600);
out:
    BIO_free(bio);
    return ret;
}

int cmg_pki_write_certs(const char *path, STACK_OF(X509) *certs)
{
    BIO *bio = BIO_new(BIO_s_mem());
    int i, ret = -1;

    if (!bio)
        goto fail;
    for (i = 0; i < sk_X509_num(certs); i++)
        if (!PEM_write_bio_X509(bio, sk_X509_value(certs, i)))
            goto fail;
    ret = pki_write_bio(path, bio, 0644);
    goto out;
fail:
    pki_error("cannot encode the certificate for %s", path);
out:
    BIO_free(bio);
    return ret;
}

int cmg_pki_write_cert(const char *path, X509 *cert)
{
    STACK_OF(X509) *one = sk_X509_new_null();
    int ret = -1;

    if (!one || !sk_X509_push(one, cert)) {
        pki_error("cannot encode the certificate for %s", path);
        goto out;
    }
    ret = cmg_pki_write_certs(path, one);
out:
    sk_X509_free(one); /* does not free cert */
    return ret;
}

int cmg_pki_read_file(const char *path, size_t max, unsigned char **data, size_t *len)
{
    struct stat st;
    unsigned char *buf = NULL;
    size_t got = 0;
    int fd, ret = -1;

    *data = NULL;
    *len = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "cmg: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) < 0) {
        fprintf(stderr, "cmg: cannot read %s: %s\n", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        fprintf(stderr, "cmg: %s: not a regular file\n", path);
        goto out;
    }
    if ((unsigned long long)st.st_size > max) {
        fprintf(stderr, "cmg: %s: too large (more than %zu bytes)\n", path, max);
        goto out;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        fprintf(stderr, "cmg: cannot read %s: out of memory\n", path);
        goto out;
    }
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);

        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            fprintf(stderr, "cmg: cannot read %s: %s\n", path, strerror(errno));
            goto out;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    buf[got] = '\0';
    *data = buf;
    *len = got;
    buf = NULL;
    ret = 0;
out:
    free(buf);
    close(fd);
    return ret;
}

X509 *cmg_pki_load_cert(const char *path)
{
    BIO *bio = BIO_new_file(path, "r");
    X509 *cert = NULL;

    if (!bio || !(cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)))
        pki_error("cannot load the certificate %s", path);
    BIO_free(bio);
    return cert;
}

/* Keys are written unencrypted: never prompt for a pass phrase. */
static int pki_no_password(char *buf, int size, int rwflag, void *u)
{
    return -1;
}

EVP_PKEY *cmg_pki_load_key(const char *path)
{
    BIO *bio = BIO_new_file(path, "r");
    EVP_PKEY *key = NULL;

    if (!bio || !(key = PEM_read_bio_PrivateKey(bio, NULL, pki_no_password, NULL)))
        pki_error("cannot load the private key %s", path);
    BIO_free(bio);
    return key;
}

/* 1 if pass (or, for an empty one, no password) opens the MAC of p12, 0 if not. */
static int pki_pkcs12_mac_ok(PKCS12 *p12, const char *pass)
{
    if (!PKCS12_mac_present(p12))
        return 1;
    if (PKCS12_verify_mac(p12, pass, -1))
        return 1;
    if (!*pass && PKCS12_verify_mac(p12, NULL, 0))
        return 1;
    return 0;
}

int cmg_pki_parse_pkcs12(const char *name, const unsigned char *data, size_t len,
                         const char *pass, EVP_PKEY **key, X509 **cert,
                         STACK_OF(X509) **chain)
{
    PKCS12 *p12 = NULL;
    OSSL_PROVIDER *legacy = NULL;
    STACK_OF(X509) *ca = NULL;
    const unsigned char *p = data;
    int ret = -1;

    *key = NULL;
    *cert = NULL;
    if (chain)
        *chain = NULL;
    if (!pass)
        pass = "";
    if (len > LONG_MAX || !(p12 = d2i_PKCS12(NULL, &p, (long)len))) {
        ERR_clear_error();
        pki_error("%s: not a PKCS#12 (.pfx/.p12) file", name);
        goto out;
    }
    if (!pki_pkcs12_mac_ok(p12, pass)) {
        ERR_clear_error();
        fprintf(stderr, "cmg: %s: wrong password (the PKCS#12 integrity check failed)\n",
                name);
        goto out;
    }
    if (!PKCS12_parse(p12, pass, key, cert, &ca)) {
        /* Files exported by older tools encrypt with RC2 or 3DES, which OpenSSL 3 keeps in
         * its legacy provider. */
        ERR_clear_error();
        legacy = OSSL_PROVIDER_try_load(NULL, "legacy", 1);
        if (!legacy) {
            ERR_clear_error();
            pki_error("%s: cannot decrypt it, and the OpenSSL legacy provider (needed for "
                      "RC2-encrypted files) cannot be loaded; re-export it with AES "
                      "(openssl pkcs12 -export without -legacy)", name);
            goto out;
        }
        if (!PKCS12_parse(p12, pass, key, cert, &ca)) {
            pki_error("%s: cannot decrypt it with the given password", name);
            goto out;
        }
    }
    if (!*key || !*cert) {
        fprintf(stderr, "cmg: %s: must hold a certificate and its private key\n", name);
        goto out;
    }
    if (X509_check_private_key(*cert, *key) != 1) {
        pki_error("%s: the private key does not match the certificate", name);
        goto out;
    }
    if (chain) {
        if (!ca && !(ca = sk_X509_new_null())) {
            pki_error("%s: out of memory", name);
            goto out;
        }
        *chain = ca;
        ca = NULL;
    }
    ret = 0;
out:
    if (ret < 0) {
        EVP_PKEY_free(*key);
        X509_free(*cert);
        *key = NULL;
        *cert = NULL;
    }
    sk_X509_pop_free(ca, X509_free);
    PKCS12_free(p12);
    if (legacy)
        OSSL_PROVIDER_unload(legacy);
    return ret;
}

bool cmg_pem_certs_only(const char *pem)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    X509 *x;
    int n = 0;

    while (bio && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL))) {
        X509_free(x);
        n++;
    }
    ERR_clear_error();
    BIO_free(bio);
    return n > 0;
}
