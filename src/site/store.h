/* The site's store: one SQLite database (WAL) in the site directory, written only
 * by the site (its server and its admin commands). Every change that gateways must
 * see bumps the policy version in the same transaction, so a running server that
 * sees a higher version republishes. Lists come out as cJSON arrays, shared by the
 * admin commands (printed as tables) and the admin API (sent as they are). */
#ifndef CMG_SITE_STORE_H
#define CMG_SITE_STORE_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CMG_STORE_FILE "site.db"

enum { CMG_MAP_AUTH_CERT = 1, CMG_MAP_AUTH_TOKEN = 2, CMG_MAP_AUTH_OIDC = 4 };

struct cmg_site_mapping {
    char role[65];
    char type[8];            /* mp, sup or site */
    char url[1024];          /* internal base URL */
    unsigned auth;           /* CMG_MAP_AUTH_* */
    uint64_t max_body;
    bool forward_authorization;  /* the device's Authorization reaches the service */
};

struct cmg_store;

/* Opens (creating if needed) DIR/site.db. -1 with a reason in err. */
int cmg_store_open(const char *dir, struct cmg_store **out, char *err, size_t errlen);
void cmg_store_close(struct cmg_store *s);
const char *cmg_store_error(struct cmg_store *s);

/* The database itself, for the modules that keep their own tables (reports.c). */
typedef struct sqlite3 sqlite3;
sqlite3 *cmg_store_db(struct cmg_store *s);

int cmg_store_begin(struct cmg_store *s);        /* BEGIN IMMEDIATE: for writing */
int cmg_store_begin_read(struct cmg_store *s);   /* BEGIN: a consistent snapshot */
int cmg_store_commit(struct cmg_store *s);
void cmg_store_rollback(struct cmg_store *s);
/* Within a transaction: the gateways must be told (policy version + 1). */
int cmg_store_bump(struct cmg_store *s);
int64_t cmg_store_policy_version(struct cmg_store *s);
/* SQLite's data_version: changes when another connection committed. */
int64_t cmg_store_data_version(struct cmg_store *s);

/* The rows of a read-only query as [{column: value}] (integers and reals as numbers,
 * NULL as null), its parameters bound as fmt says ('s' text, 'i' int64_t, 'n' null);
 * NULL on an error (cmg_store_error). For readers of the report tables (status.c). */
cJSON *cmg_store_query_json(struct cmg_store *s, const char *sql, const char *fmt, ...);

/* Settings (meta table). */
int cmg_store_get_setting(struct cmg_store *s, const char *key, char *out, size_t outlen);
int cmg_store_set_setting(struct cmg_store *s, const char *key, const char *value);

/* Mapping auth list "cert,token,oidc" <-> bits; -1 on an unknown word. */
int cmg_mapping_auth_parse(const char *s, unsigned *auth);
void cmg_mapping_auth_format(unsigned auth, char *out, size_t outlen);

/* 0 added; 1 the role exists already. Bumps. */
int cmg_store_mapping_add(struct cmg_store *s, const struct cmg_site_mapping *m);
/* 0 removed; 1 no such role. Bumps. */
int cmg_store_mapping_remove(struct cmg_store *s, const char *role);
int cmg_store_mappings(struct cmg_store *s, struct cmg_site_mapping **out, size_t *n);
cJSON *cmg_store_mappings_json(struct cmg_store *s);

int cmg_store_bulk_add(struct cmg_store *s, const char *guid, int64_t created, int64_t expires,
                       const char *description);
/* 0 found (fills what is asked for), 1 not found. */
int cmg_store_bulk_get(struct cmg_store *s, const char *guid, int64_t *expires, bool *blocked);
/* 0 done, 1 not found. Bumps. */
int cmg_store_bulk_block(struct cmg_store *s, const char *guid, bool blocked);
cJSON *cmg_store_bulk_json(struct cmg_store *s);

struct cmg_device_rec {
    char id[64];
    char name[128];
    char thumbprint[65];
    bool blocked;
};
/* The device for this certificate thumbprint, recorded now if new (its id then made
 * here). Runs inside the caller's transaction. 0, or -1. */
int cmg_store_device_upsert(struct cmg_store *s, const char *thumbprint, const char *name,
                            const char *bulk_guid, int64_t now, struct cmg_device_rec *d);
/* 0 found, 1 not found. */
int cmg_store_device_get(struct cmg_store *s, const char *id, struct cmg_device_rec *d);
int cmg_store_device_token(struct cmg_store *s, const char *id, const char *jti, int64_t issued,
                           int64_t expires);
/* 0 done, 1 not found. Bumps. */
int cmg_store_device_block(struct cmg_store *s, const char *id, bool blocked);
cJSON *cmg_store_devices_json(struct cmg_store *s);

int cmg_store_cert_add(struct cmg_store *s, const char *serial, const char *name,
                       const char *subject, int64_t issued, int64_t expires);
/* 0 revoked now, 1 not found, 2 already revoked. Bumps. A connector's certificate
 * is revoked as its connector (cmg_store_connector_revoke). */
int cmg_store_cert_revoke(struct cmg_store *s, const char *serial, int64_t when);
/* The SHA-256 thumbprint (hex) of an issued certificate, kept for 'device block NAME'. */
int cmg_store_cert_set_thumbprint(struct cmg_store *s, const char *serial, const char *thumbprint);
/* Thumbprint of the newest certificate issued for name that has one; 0, or 1 if none. */
int cmg_store_cert_thumbprint(struct cmg_store *s, const char *name, char *out, size_t len);
/* Serial of the newest certificate issued for name; 0, or 1 if none. */
int cmg_store_cert_by_name(struct cmg_store *s, const char *name, char *serial, size_t len);
/* [{serial, name, subject, issued, expires, revoked}]: the certificates the site
 * recorded ('cert issue', devices; connectors are cmg_store_connectors_json()'s);
 * revoked_only: what the CRL lists, revoked connectors included. */
cJSON *cmg_store_certs_json(struct cmg_store *s, bool revoked_only);
/* Connector certificates ('cmg site connector'): add gives 1 if the name is taken;
 * revoke gives 1 if there is no such connector, 2 if it is revoked already. */
int cmg_store_connector_add(struct cmg_store *s, const char *name, const char *serial,
                            int64_t issued, int64_t expires);
int cmg_store_connector_revoke(struct cmg_store *s, const char *name, int64_t when);
int cmg_store_connector_exists(struct cmg_store *s, const char *name);   /* 1, 0, -1 */
bool cmg_store_connector_revoked(struct cmg_store *s, const char *serial);
cJSON *cmg_store_connectors_json(struct cmg_store *s);
/* A certificate 'cert renew' replaced or made: kind "gateway", "site" or "connector",
 * name the service name, "site channel" or the connector's name. */
struct cmg_store_cert {
    const char *kind, *name, *subject;
    char serial[80];
    int64_t issued, expires;
};
/* The replaced one: recorded (if it was not) and marked replaced at when; it stays valid
 * until it expires or is revoked (a connector's is revoked with its connector). */
int cmg_store_cert_replaced(struct cmg_store *s, const struct cmg_store_cert *old,
                            int64_t when);
/* The new one: a connector's becomes its connector's certificate; another is recorded. */
int cmg_store_cert_renewed(struct cmg_store *s, const struct cmg_store_cert *c);
/* Serials of revoked connector certificates not yet expired, for the policy. */
cJSON *cmg_store_revoked_connectors(struct cmg_store *s);

/* What the policy carries for OIDC, and where its keys are refreshed from (discovery
 * URL, JWKS URL, PEM roots of a private provider: "" when none); NULL members when not
 * set. */
struct cmg_oidc_conf {
    char *issuer, *tenant, *audiences /* JSON array */, *jwks /* JSON */, *source;
    char *discovery, *jwks_uri, *ca;
};
int cmg_store_oidc_get(struct cmg_store *s, struct cmg_oidc_conf *o);   /* 0 set, 1 unset */
int cmg_store_oidc_set(struct cmg_store *s, const struct cmg_oidc_conf *o); /* bumps */
int cmg_store_oidc_clear(struct cmg_store *s);                          /* bumps */
/* New keys fetched from the provider, and the URL they came from. Bumps. */
int cmg_store_oidc_keys_set(struct cmg_store *s, const char *jwks, const char *jwks_uri);
void cmg_oidc_conf_free(struct cmg_oidc_conf *o);

/* Identities blocked that are not registered devices: "cert:<thumbprint>" of a
 * certificate device, "oidc:<id>" of an OIDC one. 0 done, 1 nothing to change. Bumps. */
int cmg_store_identity_block(struct cmg_store *s, const char *id, bool blocked);
cJSON *cmg_store_blocked_ids_json(struct cmg_store *s);
/* Blocked device ids (registered devices, and the identities above) and blocked bulk
 * token GUIDs, for the policy. */
cJSON *cmg_store_blocked_devices(struct cmg_store *s);
cJSON *cmg_store_blocked_tokens(struct cmg_store *s);

/* The site's signing keys (signing.c): the current one has no retired time; each
 * later one carries its announcement, signed by the one before. */
int cmg_store_signing_key_add(struct cmg_store *s, const char *kid, const char *jwk,
                              int64_t created, const char *announcement);
/* -1 unless kid was the current key. */
int cmg_store_signing_key_retire(struct cmg_store *s, const char *kid, int64_t when);
/* 1 with the current key's kid and created time; 0 if none is recorded; -1. */
int cmg_store_signing_key_current(struct cmg_store *s, char *kid, size_t kidlen,
                                  int64_t *created);
/* [{kid, jwk (text), created, retired, announcement}], oldest first. */
cJSON *cmg_store_signing_keys_json(struct cmg_store *s);

#endif
