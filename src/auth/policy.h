/* The gateway policy (ARCHITECTURE.md, docs/policy.md): what the site publishes to
 * every gateway, signed. Once parsed it is immutable and shared by reference: a
 * request admitted under one policy finishes under it, while new requests see the
 * newest. A gateway without a signed policy runs on a local one built from its
 * configuration (version 0). */
#ifndef CMG_POLICY_H
#define CMG_POLICY_H

#include "auth/jwk.h"

#include <openssl/x509.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CMG_POLICY_MAX (4 * 1024 * 1024)   /* longest signed policy accepted, bytes */
#define CMG_POLICY_TYP "cmg-policy+jwt"
#define CMG_ROUTES_TYP "cmg-routes+jwt"    /* the routes, for connectors only */
/* Where the gateway serves the policy's CRL to anyone (DER), and so the CRL
 * distribution point of every certificate the site issues. */
#define CMG_CRL_PATH "/CCM_CRL/site.crl"
/* The site signs a fresh policy at least this often (so the CRL in it never goes
 * stale); gateways and connectors warn when the one in force is older than
 * max_policy_age, by default twice that. */
#define CMG_POLICY_RESIGN_S (24 * 3600)
#define CMG_POLICY_MAX_AGE_MS (2u * CMG_POLICY_RESIGN_S * 1000u)
#define CMG_POLICY_AGE_REPEAT_MS (3600u * 1000u)   /* the warning, again while it lasts */

enum { CMG_AUTH_CERT = 1, CMG_AUTH_TOKEN = 2, CMG_AUTH_OIDC = 4 };

struct cmg_policy_mapping {
    char role[65];
    char type[8];            /* mp, sup, site */
    unsigned auth;           /* CMG_AUTH_* */
    uint64_t max_body;
    bool forward_authorization;  /* the device's Authorization reaches the service */
    unsigned rr;             /* round-robin position over tunnels */
};

struct cmg_policy {
    int refs;
    int64_t version;         /* 0: local, from the gateway's configuration */
    char service_name[256];
    char site_role[65];
    char issuer[128];        /* "iss" of the site's tokens */
    struct cmg_policy_mapping *mappings;
    size_t nmappings;
    X509_STORE *trust;       /* CTL roots, and the CRLs */
    bool check_revocation;
    unsigned char *crl_der;  /* the site's CRL as the gateway serves it; NULL if none */
    size_t crl_der_len;
    int64_t crl_next_update; /* its nextUpdate, seconds since the epoch (0: none) */
    struct cmg_jwks site_keys;
    bool oidc;
    char oidc_issuer[512], oidc_tenant[128];
    char **oidc_audiences;
    size_t noidc_audiences;
    struct cmg_jwks oidc_keys;
    char **blocked_devices;  /* sorted */
    size_t nblocked_devices;
    char **revoked_tokens;   /* sorted jti / bulk token GUIDs */
    size_t nrevoked_tokens;
    int64_t clock_skew;      /* seconds */
    uint64_t trust_digest;   /* of what a certificate's verdict depends on; 0: unknown */
    /* the site <-> connector channel */
    int64_t issued_at;       /* "iat": when the site signed it (0: unknown, local) */
    char **revoked_connectors;   /* sorted serials, upper-case hex */
    size_t nrevoked_connectors;
};

/* Loads the site's public key (PEM, EC P-256) as an ES256 JWK. NULL on failure. */
int cmg_policy_load_site_key(const char *file, struct cmg_jwk *key, char *err, size_t errlen);
struct cmg_keychain;
/* Verifies (with the site keys trusted, following the key announcements the policy
 * carries: keychain.h) and parses a signed policy. -1 with the reason in err. */
int cmg_policy_from_jws(const char *jws, size_t len, struct cmg_keychain *site_keys,
                        struct cmg_policy **out, char *err, size_t errlen);
/* Parses a policy payload that was already verified (or, for tests and fuzzing, that
 * needs no verification). -1 with the reason in err. */
int cmg_policy_from_json(const char *json, size_t len, struct cmg_policy **out, char *err,
                         size_t errlen);
/* An empty local policy; the caller fills mappings and trust. */
struct cmg_policy *cmg_policy_new(void);
struct cmg_policy *cmg_policy_ref(struct cmg_policy *p);
void cmg_policy_unref(struct cmg_policy *p);

struct cmg_policy_mapping *cmg_policy_mapping(struct cmg_policy *p, const char *role,
                                              size_t role_len);
bool cmg_policy_device_blocked(const struct cmg_policy *p, const char *id);
bool cmg_policy_token_revoked(const struct cmg_policy *p, const char *jti);
bool cmg_policy_audience(const struct cmg_policy *p, const char *aud);
/* The connector certificate with this serial (cmg_tls_serial's form) is revoked. */
bool cmg_policy_connector_revoked(const struct cmg_policy *p, const char *serial);

/* Verifies a client certificate chain against the policy's roots (and CRLs when
 * revocation is checked), at security level 2 (RSA and DH keys of 2048 bits or
 * more). Returns X509_V_OK or the X509_V_ERR_* code. */
long cmg_policy_verify_cert(const struct cmg_policy *p, X509 *leaf, STACK_OF(X509) *chain);
/* Whether a verification error says the CRL could not be used (missing, expired, not
 * yet valid beyond the clock skew, badly signed), not that the certificate is bad. */
bool cmg_policy_crl_error(long verify_error);

#endif
