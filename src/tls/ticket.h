/* TLS session ticket keys shared by the instances of a deployment (ticket_key_file):
 * a session that one instance began resumes at any other, and after a restart.
 *
 * The file holds at most CMG_TICKET_MAX_KEYS keys, newest first, one a line:
 *
 *     <creation time, unix seconds> <160 hex digits: name 16 bytes, HMAC 32, AES 32>
 *
 * ('#' comments and blank lines aside). Every key decrypts; the newest key made at least
 * a re-read interval ago encrypts (a newer one only decrypts until the other instances
 * have read it), and a ticket of another key is renewed. The file is read without a lock
 * (writers rename a complete file over it); the instance that finds the newest key older
 * than the rotation period adds a new one, under the lock file `<file>.lock` if it wins it
 * at once (else it skips), and drops keys older than two periods (and the re-read
 * interval); an absent file is created (with a key) only by the instance whose link of a
 * complete file wins. Every instance re-reads the file at that interval (at most a
 * minute) and on SIGHUP. The file is a device credential: one other users may read or
 * write is refused. */
#ifndef CMG_TLS_TICKET_H
#define CMG_TLS_TICKET_H

#include "core/loop.h"

#include <limits.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CMG_TICKET_MAX_KEYS 3

struct cmg_ticket_key {
    int64_t created;                /* unix seconds */
    unsigned char name[16], hmac[32], aes[32];
};

struct cmg_tickets {
    char file[PATH_MAX];
    uint64_t rotate_s;              /* 0: never rotated here (the file comes from elsewhere) */
    struct cmg_ticket_key keys[CMG_TICKET_MAX_KEYS];
    size_t n;
    struct cmg_loop *loop;
    struct cmg_timer timer;         /* the periodic re-read */
    bool warned;                    /* a failed re-read was logged: quiet until one succeeds */
    bool write_warned;              /* a rotation could not be written: said once */
    bool future_warned;             /* a key dated ahead of the clock: said once */
};

/* Reads the key file, creating it (mode 0600) or rotating its keys as due, then
 * re-reads it periodically. 0, or -1 with err naming the file and what was expected.
 * A file that is absent and cannot be created (a read-only or missing directory) is
 * warned of, and a key of this process serves until it can be. */
int cmg_tickets_start(struct cmg_tickets *t, struct cmg_loop *loop, const char *file,
                      uint64_t rotate_s, char *err, size_t errlen);
/* SIGHUP: a new rotation period, and the file read again now. A file that cannot be
 * used keeps the keys in force (one warning). */
void cmg_tickets_reload(struct cmg_tickets *t, uint64_t rotate_s);
/* New tickets of ctx are made and read with t's keys (ctx must outlive no t). */
int cmg_tickets_attach(struct cmg_tickets *t, SSL_CTX *ctx);
void cmg_tickets_stop(struct cmg_tickets *t);

/* Tickets of ctx carry the intermediate certificates the client sent (a session keeps
 * only its certificate), whoever's keys encrypt them. 0 or -1. */
int cmg_tickets_keep_chain(SSL_CTX *ctx);
/* The intermediates the peer sent, on a resumed connection those its ticket kept: a new
 * stack (free with sk_X509_pop_free(chain, X509_free)), or NULL. */
STACK_OF(X509) *cmg_tickets_peer_chain(SSL *ssl);

#endif
