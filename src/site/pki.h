/* Site PKI: P-256 keys, certificates issued by the site CA, PEM and PKCS#12 files.
 *
 * Functions return 0 / -1 or a new object / NULL. On failure they print one line to
 * stderr naming the file (if any) and the reason, followed by the OpenSSL error queue,
 * which they clear. */
#ifndef CMG_SITE_PKI_H
#define CMG_SITE_PKI_H

#include <stdbool.h>
#include <stddef.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

/* Extended key usages, for cmg_cert_req.eku. */
#define CMG_PKI_EKU_SERVER 0x1 /* serverAuth */
#define CMG_PKI_EKU_CLIENT 0x2 /* clientAuth */
#define CMG_PKI_EKU_CONNECTOR 0x4 /* OpenCMG connector (tls.h): tunnels and site feed only */
#define CMG_PKI_EKU_SITE 0x8   /* OpenCMG site: the site's channel certificate */

/* What to put in a certificate. */
struct cmg_cert_req {
    const char *cn;               /* subject commonName (required) */
    const char *ou;               /* subject organizationalUnitName, or NULL */
    const char *o;                /* subject organizationName, or NULL */
    const char *const *dns_names; /* subjectAltName DNS entries */
    size_t n_dns_names;
    const char *const *ip_addrs;  /* subjectAltName IP entries ("127.0.0.1", "::1") */
    size_t n_ip_addrs;
    EVP_PKEY *key;                /* the subject's key (only its public half is used) */
    int is_ca;                    /* CA:TRUE, keyCertSign + cRLSign; else CA:FALSE,
                                     digitalSignature */
    unsigned eku;                 /* CMG_PKI_EKU_* bits; 0 for none */
    int days;                     /* validity from now; notBefore is now - 5 minutes */
    const char *crl_url;          /* CRL distribution point (not on a CA), or NULL */
};

/* A new P-256 key. */
EVP_PKEY *cmg_pki_new_key(void);

/* Issues a certificate for req, signed by ca_key (ECDSA with SHA-256). With ca_cert NULL,
 * the certificate is self-signed: its issuer is its own subject and ca_key must be
 * req->key. Serial: 128 random bits, positive. Adds SKI and AKI. */
X509 *cmg_pki_issue(const struct cmg_cert_req *req, X509 *ca_cert, EVP_PKEY *ca_key);

/* A new certificate for old's subject from the CA: the same subject and extensions
 * (names, usages, CRL location), key's public half, a new serial, and a validity as long
 * as old's from now (never past the CA's end); new key identifiers. */
X509 *cmg_pki_renew(X509 *old, EVP_PKEY *key, X509 *ca_cert, EVP_PKEY *ca_key);

/* Writes a file atomically (temporary file in the same directory, then rename), creating
 * it with the given mode (less the umask); an existing file is replaced. */
int cmg_pki_write_file(const char *path, const void *data, size_t len, unsigned mode);
/* Writes an unencrypted PKCS#8 PEM private key, mode 0600. */
int cmg_pki_write_key(const char *path, EVP_PKEY *key);
/* Writes one PEM certificate, mode 0644. */
int cmg_pki_write_cert(const char *path, X509 *cert);
/* Writes several PEM certificates into one file, mode 0644. */
int cmg_pki_write_certs(const char *path, STACK_OF(X509) *certs);

/* Reads a whole file (at most max bytes) into a new buffer, which the caller frees. */
int cmg_pki_read_file(const char *path, size_t max, unsigned char **data, size_t *len);
/* Loaders for PEM files. */
X509 *cmg_pki_load_cert(const char *path);
EVP_PKEY *cmg_pki_load_key(const char *path);
/* Opens a PKCS#12 file held in memory (name is used in messages) with password pass
 * (NULL or "" for none). Tries the default providers first, then loads the "legacy"
 * provider for old RC2/3DES-encrypted files. On success *key and *cert are set, and
 * *chain (if chain is not NULL) to the other certificates (possibly an empty stack). */
int cmg_pki_parse_pkcs12(const char *name, const unsigned char *data, size_t len,
                         const char *pass, EVP_PKEY **key, X509 **cert,
                         STACK_OF(X509) **chain);

/* PEM text holding certificates only, at least one (a private CA's roots). */
bool cmg_pem_certs_only(const char *pem);

#endif
