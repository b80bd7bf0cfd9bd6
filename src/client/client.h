/* cmg client: the reference device agent. `register` with a bulk token, `get` through the
 * gateway (renewing the device token when due), `renew`. */
#ifndef CMG_CLIENT_H
#define CMG_CLIENT_H

#include "client/fetch.h"
#include "client/state.h"

#include <stddef.h>

int cmg_client_main(int argc, char **argv);

/* ---- inside the client ---- */

/* Exit statuses of the subcommands. */
enum {
    CMG_CLIENT_EXIT_OK = 0,
    CMG_CLIENT_EXIT_FAIL = 1,  /* refused, a non-2xx status, a local problem */
    CMG_CLIENT_EXIT_USAGE = 2,
    CMG_CLIENT_EXIT_NET = 3,   /* connection, TLS, timeout, malformed answer */
};

/* How to reach the gateway. */
struct cmg_client_conn {
    const char *gateway;      /* "host:port" or "[v6]:port" */
    const char *server_name;  /* TLS name to expect; NULL: the host of gateway */
    const char *ca_file;      /* NULL: system roots */
    EVP_PKEY *key;            /* the device's client certificate, in memory ... */
    X509 *cert;
    const char *cert_file;    /* ... or in PEM files */
    const char *key_file;
    int timeout_ms;           /* 0: the default */
};

int cmg_client_register_main(int argc, char **argv);
int cmg_client_renew_main(int argc, char **argv);
int cmg_client_get_main(int argc, char **argv);

/* Renews s's token over conn (POST <prefix>/renew) and saves the state. Returns an exit
 * status; on failure a one-line message (without "cmg client: ") is in msg. */
int cmg_client_renew(const struct cmg_client_conn *conn, struct cmg_client_state *s,
                     char *msg, size_t msglen);

int cmg_client_listen_main(int argc, char **argv);

/* For a registered device: its state (state: --state, or NULL for the default), identity
 * and connection (gateway, server_name, ca_opt: the options that override the state's,
 * or NULL; ca receives the state's ca.crt path); renews the token first when due (a
 * failure while it is still valid is a warning). Returns an exit status. */
int cmg_client_prepare_state(const char *state, const char *gateway, const char *server_name,
                             const char *ca_opt, struct cmg_client_state *s,
                             struct cmg_client_conn *conn, char *ca, size_t calen);

/* "--opt VALUE" or "--opt=VALUE" at argv[*i]: 1 with *val set (and *i advanced past the
 * value), 0 if argv[*i] is not opt, -1 if the value is missing. */
int cmg_client_opt(int argc, char **argv, int *i, const char *opt, const char **val);
/* "--timeout SECONDS" as milliseconds: 0 or -1. */
int cmg_client_parse_timeout(const char *s, int *ms);
/* The server name to expect when --server-name is not given: the registered one, unless
 * it was only the host of the registered gateway and `gateway` (--gateway) names another
 * (NULL: the host of the gateway used). */
const char *cmg_client_stored_server_name(const char *gateway, const struct cmg_client_state *s);
/* The exit status for a cmg_fetch result. */
int cmg_client_fetch_exit(int result);
/* A printable one-line reason for a refusal: the "error" of a JSON body, else the first
 * line of a text/plain body, else the status line's reason phrase. */
void cmg_client_reason(const struct cmg_fetch_resp *resp, char *out, size_t outlen);

#endif
