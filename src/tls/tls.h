/* TLS contexts and certificate helpers (OpenSSL 3). */
#ifndef CMG_TLS_H
#define CMG_TLS_H

#include "core/loop.h"

#include <limits.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>

/* OpenCMG's own extended key usages. A connector's certificate carries only
 * CONNECTOR (no clientAuth: no device path takes it); the site's channel
 * certificate carries SITE beside serverAuth: a certificate of the same CA without
 * it is not the site's. The arc lies in IANA's experimental subtree (1.3.6.1.3)
 * until OpenCMG has a private enterprise number; every arc fits in 32 bits, as
 * common X.509 parsers require. */
#define CMG_OID_ARC "1.3.6.1.3.7264"
#define CMG_OID_EKU_CONNECTOR CMG_OID_ARC ".1.1"
#define CMG_OID_EKU_SITE CMG_OID_ARC ".1.2"

enum cmg_tls_client_auth {
    CMG_TLS_NO_CLIENT_CERT,
    CMG_TLS_ASK_CLIENT_CERT,      /* asked for, judged per request (devices) */
    CMG_TLS_REQUIRE_CLIENT_CERT,  /* handshake fails without a valid one (tunnels) */
};

struct cmg_tls_server_opts {
    const char *cert;        /* PEM chain, or PKCS#12 when it ends in .pfx or .p12 */
    const char *key;         /* PEM key; NULL with PKCS#12 */
    const char *password;    /* of the PKCS#12 file */
    const char *client_ca;   /* trusted roots for client certificates */
    enum cmg_tls_client_auth client_auth;
    const char *alpn;        /* protocols in preference order, comma-separated */
    /* With REQUIRE_CLIENT_CERT: the extended key usage (OID text) the client's
     * certificate must carry instead of clientAuth; NULL: clientAuth. */
    const char *client_eku;
};

struct cmg_tls_client_opts {
    const char *ca;          /* roots that the server must chain to; NULL: system default */
    const char *cert, *key;  /* optional client certificate */
    const char *alpn;        /* comma-separated; NULL for none */
    const char *server_eku;  /* an extended key usage (OID text) the server's
                                certificate must carry too; NULL for none */
};

SSL_CTX *cmg_tls_server_ctx(const struct cmg_tls_server_opts *o, char *err, size_t errlen);
SSL_CTX *cmg_tls_client_ctx(const struct cmg_tls_client_opts *o, char *err, size_t errlen);

/* Both ends of a tunnel are ours: AES-128-GCM first (TLS 1.3), the cheapest AEAD
 * per byte where AES instructions exist, and every byte crosses it twice. */
void cmg_tls_tunnel_ciphers(SSL_CTX *ctx);
/* A further check of the peer's leaf certificate once its chain verified, on one
 * connection (before its handshake): X509_V_OK, or the X509_V_ERR_* code that
 * fails the handshake with the matching alert (e.g. X509_V_ERR_CERT_REVOKED).
 * Needs a context whose verification this file set up (client_eku, server_eku). */
typedef int (*cmg_tls_leaf_check)(void *arg, X509 *leaf);
int cmg_tls_set_leaf_check(SSL *ssl, cmg_tls_leaf_check fn, void *arg);
/* The negotiated ALPN protocol equals proto. */
bool cmg_tls_alpn_is(const SSL *ssl, const char *proto);
/* The first verification error of the peer's certificate (X509_V_OK if none, or if
 * no certificate was sent: check SSL_get0_peer_certificate too). */
long cmg_tls_peer_verify_error(const SSL *ssl);
/* SHA-256 of the certificate's DER, lowercase hex. */
void cmg_tls_thumbprint(X509 *x, char out[65]);
/* The certificate lists this extended key usage (OID text). */
bool cmg_tls_has_eku(X509 *x, const char *oid);
/* The serial number in upper-case hex without leading zeros ("0" for zero). */
void cmg_tls_serial(X509 *x, char *out, size_t outlen);
/* RFC 2253 form of the subject name. */
void cmg_tls_subject(X509 *x, char *out, size_t outlen);
/* RFC 2253 form of the issuer name. */
void cmg_tls_issuer(X509 *x, char *out, size_t outlen);
/* The value of the first subject attribute with this NID, or "" */
void cmg_tls_subject_entry(X509 *x, int nid, char *out, size_t outlen);

/* ---- certificate lifecycle: names and expiry ---- */

/* A server certificate a role presents (the leaf of ctx, loaded from file) must be
 * valid now and name service_name (a DNS name or an IP address). -1 with err naming
 * the file and what was expected and found. */
int cmg_tls_check_server_cert(SSL_CTX *ctx, const char *file, const char *service_name,
                              char *err, size_t errlen);

/* A certificate a role shows (the leaf of ctx, loaded from file) must be valid now, carry
 * the extended key usage eku (OID text; NULL: any) and chain to a root of ca_file (NULL or
 * "": not checked). -1 with err naming the file and what was expected and found. */
int cmg_tls_check_own_cert(SSL_CTX *ctx, const char *file, const char *ca_file,
                           const char *eku, char *err, size_t errlen);

/* A role's own certificates and CAs, watched for their end: one warning line each
 * time one comes within 30, 14, 7, 3 and 1 day(s) of its notAfter (and once it has
 * passed), checked at start and daily, naming the file and the date. */
#define CMG_TLS_WATCH_MAX 8
struct cmg_tls_watched {
    char what[48];
    char file[PATH_MAX];
    X509 *cert;              /* of the file's certificates, the one that ends first */
    int mark;                /* the last mark warned of (index into the marks), -1: none */
};
struct cmg_tls_watch {
    struct cmg_loop *loop;
    struct cmg_timer timer;
    size_t n;
    struct cmg_tls_watched certs[CMG_TLS_WATCH_MAX];
};
/* Watches the certificates of a PEM file (a chain, or a bundle of CAs). -1 with err
 * if the file holds none. */
int cmg_tls_watch_file(struct cmg_tls_watch *w, const char *what, const char *file, char *err,
                       size_t errlen);
/* Watches x (a reference is taken), e.g. the leaf a context loaded from a PKCS#12 file. */
void cmg_tls_watch_cert(struct cmg_tls_watch *w, const char *what, const char *file, X509 *x);
/* Checks now, then every day. */
void cmg_tls_watch_start(struct cmg_tls_watch *w, struct cmg_loop *loop);
void cmg_tls_watch_free(struct cmg_tls_watch *w);
/* The names a certificate answers to: its DNS and IP subjectAltNames, else its CN. */
void cmg_tls_cert_names(X509 *x, char *out, size_t outlen);
/* Its extended key usages, by name ("clientAuth", "OpenCMG connector", ...). */
void cmg_tls_usages(X509 *x, char *out, size_t outlen);
/* notAfter as "YYYY-MM-DD HH:MM:SS UTC". */
void cmg_tls_not_after(X509 *x, char *out, size_t outlen);

#endif
