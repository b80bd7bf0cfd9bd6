/* The client's state directory: the device key and self-signed certificate, the CA that
 * the gateway's certificate chains to, and device.json (where and who the device is,
 * its current token).
 *
 *   DIR/device.key   P-256 key, mode 0600
 *   DIR/device.crt   self-signed client certificate (CN = device name)
 *   DIR/ca.crt       roots for the gateway's server certificate
 *   DIR/device.json  {"gateway","server_name","prefix","device_id","token","expires",
 *                     "renew_after"}, mode 0600
 *
 * Messages go to stderr, prefixed "cmg client: ". */
#ifndef CMG_CLIENT_STATE_H
#define CMG_CLIENT_STATE_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

#define CMG_CLIENT_STATE_ENV "CMG_CLIENT_STATE"
#define CMG_CLIENT_TOKEN_MAX 16384 /* longest token accepted, from a file or the network */

struct cmg_client_state {
    char dir[PATH_MAX];
    char *gateway;      /* "host:port" */
    char *server_name;  /* TLS name of the gateway */
    char *prefix;       /* "/CCM_Proxy_ServerAuth/ROLE", no trailing slash */
    char *device_id;
    char *token;
    int64_t expires;    /* unix seconds */
    int64_t renew_after;
};

/* The state directory: opt if given, else $CMG_CLIENT_STATE, else the one recorded by the
 * last register ($HOME/.config/opencmg/client-state), else $HOME/.config/opencmg/client.
 * 0, or -1 with a message printed. */
int cmg_client_state_dir(const char *opt, char *dir, size_t dirlen);
/* Creates dir (and missing parents) with mode 0700, and makes dir absolute. 0 or -1. */
int cmg_client_state_mkdir(char *dir, size_t dirlen);
/* Records dir as the state of the last registration. 0 or -1 (a warning is printed). */
int cmg_client_state_remember(const char *dir);

/* "dir/name" into out; -1 (with a message) if too long. */
int cmg_client_state_path(const char *dir, const char *name, char *out, size_t outlen);

/* Reads dir/device.json into s (s->dir set to dir). 0, or -1 with a message. */
int cmg_client_state_load(const char *dir, struct cmg_client_state *s);
/* Writes s->dir/device.json atomically, mode 0600. 0 or -1. */
int cmg_client_state_save(const struct cmg_client_state *s);
/* Frees the strings (the token is wiped first). */
void cmg_client_state_free(struct cmg_client_state *s);

/* The device key and certificate of dir: loaded if present, else created (certificate:
 * self-signed, CN = name, clientAuth, 10 years) and written. 0 or -1. */
int cmg_client_state_identity(const char *dir, const char *name, EVP_PKEY **key, X509 **cert);
/* Loads the existing identity of dir. 0 or -1. */
int cmg_client_state_load_identity(const char *dir, EVP_PKEY **key, X509 **cert);

/* Reads a whole file ("-": standard input), at most max bytes (more is an error), into a
 * new NUL-terminated buffer that the caller frees. 0, or -1 with a message. */
int cmg_client_read_file(const char *path, size_t max, unsigned char **data, size_t *len);

/* A token as it may be sent in a header: base64url characters and dots only, at most
 * CMG_CLIENT_TOKEN_MAX bytes. */
int cmg_client_token_ok(const char *t);
/* Unix time as "2025-01-31T12:00:00Z". */
void cmg_client_iso_time(int64_t t, char *out, size_t outlen);

#endif
