/* TLS session ticket keys shared through a file (see ticket.h for its format). Keys are
 * secrets: no line of the log shows one, nor any part of a line that holds one. */
#include "tls/ticket.h"

#include "core/log.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define KEY_BYTES 80                /* name 16, HMAC 32, AES 32 */
#define KEY_HEX (2 * KEY_BYTES)
#define FILE_MAX 4096               /* a bigger file is not a key file */
#define REREAD_MAX_MS 60000
#define REREAD_MIN_MS 1000
#define OPEN_TRIES 8
#define NO_FILE (-2)
#define LOCK_WAIT_MS 1000           /* writers hold the lock for a write and an fsync */                /* absent, and not to be created here */                /* writers replace the file: a lock taken on the old one is retaken */

static const char header[] =
    "# OpenCMG TLS session ticket keys (gateway.conf ticket_key_file), newest first, at most 3:\n"
    "# <created, unix seconds> <hex: key name 16 bytes, HMAC key 32, AES key 32>\n"
    "# Shared by every gateway instance of the deployment. Secret: keep it mode 0600.\n";

static int ctx_index = -1;

/* How often the file is read again: a minute, or half a rotation period if shorter. */
static uint64_t reread_ms(uint64_t rotate_s)
{
    uint64_t ms = rotate_s ? rotate_s * 1000 / 2 : REREAD_MAX_MS;

    if (ms > REREAD_MAX_MS)
        ms = REREAD_MAX_MS;
    return ms < REREAD_MIN_MS ? REREAD_MIN_MS : ms;
}

/* ---- the file's text ---- */

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* "<unix seconds> <KEY_HEX hex digits>", nothing else. 0 or -1. */
static int parse_key(const char *line, size_t len, struct cmg_ticket_key *k)
{
    unsigned char raw[KEY_BYTES];
    size_t i = 0;
    int64_t created = 0;
    int rc = -1;

    while (i < len && line[i] >= '0' && line[i] <= '9' && i < 12)
        created = created * 10 + (line[i++] - '0');
    if (i == 0 || i >= len || line[i] != ' ' || len - i - 1 != KEY_HEX)
        return -1;
    line += i + 1;
    for (i = 0; i < KEY_BYTES; i++) {
        int hi = hex_digit(line[2 * i]), lo = hex_digit(line[2 * i + 1]);
        if (hi < 0 || lo < 0)
            goto out;
        raw[i] = (unsigned char)(hi << 4 | lo);
    }
    k->created = created;
    memcpy(k->name, raw, 16);
    memcpy(k->hmac, raw + 16, 32);
    memcpy(k->aes, raw + 48, 32);
    rc = 0;
out:
    OPENSSL_cleanse(raw, sizeof(raw));
    return rc;
}

/* Newest first, whatever order the file had. */
static void sort_keys(struct cmg_ticket_key *keys, size_t n)
{
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && keys[j].created > keys[j - 1].created; j--) {
            struct cmg_ticket_key tmp = keys[j];
            keys[j] = keys[j - 1];
            keys[j - 1] = tmp;
            OPENSSL_cleanse(&tmp, sizeof(tmp));
        }
}

static int parse_keys(const char *file, const char *text, struct cmg_ticket_key *keys, size_t *n,
                      char *err, size_t errlen)
{
    int lineno = 0;

    *n = 0;
    while (*text) {
        const char *nl = strchr(text, '\n');
        size_t len = nl ? (size_t)(nl - text) : strlen(text);
        size_t used = len;

        lineno++;
        while (used && (text[used - 1] == '\r' || text[used - 1] == ' ' || text[used - 1] == '\t'))
            used--;
        if (used && text[0] != '#') {
            if (*n == CMG_TICKET_MAX_KEYS) {
                snprintf(err, errlen, "ticket_key_file %s line %d: expected at most %d keys, "
                         "found more", file, lineno, CMG_TICKET_MAX_KEYS);
                return -1;
            }
            if (parse_key(text, used, &keys[*n]) < 0) {
                snprintf(err, errlen, "ticket_key_file %s line %d: expected '<unix time> <%d hex "
                         "digits>' (a ticket key: name, HMAC and AES keys), found a line of %zu "
                         "characters that is not", file, lineno, KEY_HEX, used);
                return -1;
            }
            (*n)++;
        }
        text += nl ? len + 1 : len;
    }
    sort_keys(keys, *n);
    return 0;
}

/* ---- the file ---- */

/* The lock, waited for a short while at most: the loop must not hang on a file that
 * some other process keeps locked. */
static int lock_briefly(int fd, int how)
{
    const struct timespec step = {0, 5 * 1000 * 1000};

    for (int waited = 0; waited <= LOCK_WAIT_MS; waited += 5) {
        if (flock(fd, how | LOCK_NB) == 0)
            return 0;
        if (errno != EWOULDBLOCK && errno != EINTR)
            return -1;
        nanosleep(&step, NULL);
    }
    return -1;
}

/* Opens the file as it is now and locks it: a writer renames a new file over it, so a
 * lock won on the file it replaced is given up and taken on the new one. -1 with err, or
 * NO_FILE if it is absent and cannot be created here. */
static int open_locked(const char *file, bool *writable, char *err, size_t errlen)
{
    for (int i = 0; i < OPEN_TRIES; i++) {
        struct stat at_fd, at_path;
        /* A symbolic link is followed: a mounted secret (Kubernetes) is one. */
        int fd = open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0600), create_errno = errno;

        *writable = fd >= 0;
        if (fd < 0 && (errno == EACCES || errno == EROFS))
            fd = open(file, O_RDONLY | O_CLOEXEC);
        if (fd < 0 && errno == ENOENT) {
            snprintf(err, errlen, "ticket_key_file %s: absent, and it cannot be created: %s",
                     file, strerror(create_errno));
            return NO_FILE;
        }
        if (fd < 0) {
            snprintf(err, errlen, "ticket_key_file %s: cannot open it: %s", file, strerror(errno));
            return -1;
        }
        if (lock_briefly(fd, *writable ? LOCK_EX : LOCK_SH) < 0) {
            snprintf(err, errlen, "ticket_key_file %s: expected it unlocked within %d ms (other "
                     "instances hold it for a moment), found it locked longer", file,
                     LOCK_WAIT_MS);
            close(fd);
            return -1;
        }
        if (fstat(fd, &at_fd) == 0 && stat(file, &at_path) == 0 && at_fd.st_dev == at_path.st_dev &&
            at_fd.st_ino == at_path.st_ino)
            return fd;
        close(fd);
    }
    snprintf(err, errlen, "ticket_key_file %s: replaced again and again while being opened", file);
    return -1;
}

/* The whole file, NUL-terminated. 0, or -1 with err. */
static int read_text(int fd, const char *file, char *buf, size_t cap, char *err, size_t errlen)
{
    size_t len = 0;
    struct stat st;

    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "ticket_key_file %s: expected a regular file", file);
        return -1;
    }
    for (;;) {
        ssize_t n = read(fd, buf + len, cap - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            snprintf(err, errlen, "ticket_key_file %s: cannot read it: %s", file, strerror(errno));
            return -1;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len == cap - 1) {
            snprintf(err, errlen, "ticket_key_file %s: expected at most %d keys in %zu bytes, "
                     "found a bigger file", file, CMG_TICKET_MAX_KEYS, cap - 1);
            return -1;
        }
    }
    buf[len] = 0;
    if (memchr(buf, 0, len)) {
        snprintf(err, errlen, "ticket_key_file %s: expected text, found a NUL byte", file);
        return -1;
    }
    return 0;
}

/* Writes the keys to FILE.new (0600), then renames it over FILE (under the caller's lock);
 * if FILE is a symbolic link, over the file it names, which stays shared. */
static int write_keys(const char *file, const struct cmg_ticket_key *keys, size_t n, char *err,
                      size_t errlen)
{
    char tmp[PATH_MAX + 8], text[FILE_MAX], real[PATH_MAX];
    const char *dest = realpath(file, real) ? real : file;
    size_t len = (size_t)snprintf(text, sizeof(text), "%s", header);
    int fd, rc = -1;

    for (size_t i = 0; i < n; i++) {
        const unsigned char *parts[] = {keys[i].name, keys[i].hmac, keys[i].aes};
        const size_t sizes[] = {16, 32, 32};
        len += (size_t)snprintf(text + len, sizeof(text) - len, "%lld ", (long long)keys[i].created);
        for (int p = 0; p < 3; p++)
            for (size_t b = 0; b < sizes[p]; b++)
                len += (size_t)snprintf(text + len, sizeof(text) - len, "%02x", parts[p][b]);
        len += (size_t)snprintf(text + len, sizeof(text) - len, "\n");
    }
    snprintf(tmp, sizeof(tmp), "%s.new", dest);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0 || fchmod(fd, 0600) < 0 || write(fd, text, len) != (ssize_t)len || fsync(fd) < 0) {
        snprintf(err, errlen, "ticket_key_file %s: cannot write %s: %s", file, tmp, strerror(errno));
        unlink(tmp);
    } else if (rename(tmp, dest) < 0) {
        snprintf(err, errlen, "ticket_key_file %s: cannot replace it: %s", file, strerror(errno));
        unlink(tmp);
    } else {
        rc = 0;
    }
    if (fd >= 0)
        close(fd);
    OPENSSL_cleanse(text, sizeof(text));
    return rc;
}

/* A new newest key; the oldest goes if there is no room. */
static int add_key(struct cmg_ticket_key *keys, size_t *n, int64_t now)
{
    struct cmg_ticket_key *k = &keys[0];

    if (*n == CMG_TICKET_MAX_KEYS)
        (*n)--;
    memmove(keys + 1, keys, *n * sizeof(*keys));
    (*n)++;
    k->created = now;
    return RAND_bytes(k->name, sizeof(k->name)) == 1 &&
                   RAND_priv_bytes(k->hmac, sizeof(k->hmac)) == 1 &&
                   RAND_priv_bytes(k->aes, sizeof(k->aes)) == 1
               ? 0
               : -1;
}

/* Drops the keys older than two periods and the re-read interval (the newest stays):
 * a ticket lives at most that long. True if one went. */
static bool drop_old(struct cmg_ticket_key *keys, size_t *n, int64_t now, uint64_t rotate_s)
{
    int64_t limit = (int64_t)(2 * rotate_s + reread_ms(rotate_s) / 1000);
    size_t keep = 1;

    while (keep < *n && now - keys[keep].created <= limit)
        keep++;
    if (keep == *n)
        return false;
    OPENSSL_cleanse(keys + keep, (*n - keep) * sizeof(*keys));
    *n = keep;
    return true;
}

static bool rotation_due(const struct cmg_ticket_key *keys, size_t n, int64_t now, uint64_t rotate_s)
{
    return n == 0 || (rotate_s && now - keys[0].created >= (int64_t)rotate_s);
}

/* Adds or drops keys as due and writes the file: what the instances then share. */
static int rotate(struct cmg_tickets *t, struct cmg_ticket_key *keys, size_t *n, char *err,
                  size_t errlen)
{
    int64_t now = time(NULL);
    bool created = *n == 0, added = false, dropped;

    if (rotation_due(keys, *n, now, t->rotate_s)) {
        if (add_key(keys, n, now) < 0) {
            snprintf(err, errlen, "ticket_key_file %s: no random bytes for a new key", t->file);
            return -1;
        }
        added = true;
    }
    dropped = t->rotate_s && drop_old(keys, n, now, t->rotate_s);
    if (!added && !dropped)
        return 0;
    if (write_keys(t->file, keys, *n, err, errlen) < 0)
        return -1;
    /* (the file is named where it is wrong, not in these routine lines) */
    if (created)
        cmg_info("ticket_key_file created (mode 0600): TLS sessions resume at every gateway "
                 "instance that shares it");
    else
        cmg_info("ticket_key_file: %s; %zu key(s) in it",
                 added ? "a new ticket key encrypts from now on" : "an old ticket key dropped", *n);
    return 0;
}

/* Rotates; if the new file cannot be written, the keys read stay in force (one
 * warning): an instance never encrypts with a key the others lack. -1 only if the file
 * held no key. */
static int rotate_or_keep(struct cmg_tickets *t, struct cmg_ticket_key *keys, size_t *n,
                          char *err, size_t errlen)
{
    struct cmg_ticket_key next[CMG_TICKET_MAX_KEYS];
    size_t nnext = *n;
    int rc = 0;

    memcpy(next, keys, sizeof(next));
    if (rotate(t, next, &nnext, err, errlen) == 0) {
        memcpy(keys, next, sizeof(next));
        *n = nnext;
        t->write_warned = false;
    } else if (*n == 0) {
        rc = -1;
    } else if (!t->write_warned) {
        t->write_warned = true;
        cmg_warn("%s; the %zu key(s) it holds stay in force, not rotated", err, *n);
    }
    OPENSSL_cleanse(next, sizeof(next));
    return rc;
}

static void check_mode(struct cmg_tickets *t, int fd)
{
    struct stat st;

    if (t->mode_warned || fstat(fd, &st) < 0 || !(st.st_mode & 077))
        return;
    t->mode_warned = true;
    cmg_warn("ticket_key_file %s is open to other users (mode %04o): whoever reads it can "
             "decrypt resumed TLS sessions; chmod 600 it", t->file, (unsigned)(st.st_mode & 07777));
}

/* Reads the file under its lock, rotates as due, and puts its keys in force. 0, or -1
 * or NO_FILE with err (the keys in force stay). */
static int sync_file(struct cmg_tickets *t, char *err, size_t errlen)
{
    struct cmg_ticket_key keys[CMG_TICKET_MAX_KEYS] = {{0}};
    char text[FILE_MAX];
    size_t n = 0;
    bool writable;
    int fd = open_locked(t->file, &writable, err, errlen), rc = -1;

    if (fd < 0)
        return fd;
    check_mode(t, fd);
    if (read_text(fd, t->file, text, sizeof(text), err, errlen) < 0 ||
        parse_keys(t->file, text, keys, &n, err, errlen) < 0)
        goto out;
    if (writable && rotate_or_keep(t, keys, &n, err, errlen) < 0)
        goto out;
    if (n == 0) {
        snprintf(err, errlen, "ticket_key_file %s: expected a key, found none (and it cannot "
                 "be written here)", t->file);
        goto out;
    }
    OPENSSL_cleanse(t->keys, sizeof(t->keys));
    memcpy(t->keys, keys, n * sizeof(*keys));
    t->n = n;
    rc = 0;
out:
    close(fd);   /* and the lock with it */
    OPENSSL_cleanse(keys, sizeof(keys));
    OPENSSL_cleanse(text, sizeof(text));
    return rc;
}

/* A re-read: a file that cannot be used is said once; the keys in force stay. */
static void refresh(struct cmg_tickets *t)
{
    char err[PATH_MAX + 300];

    if (sync_file(t, err, sizeof(err)) == 0) {
        t->warned = false;
    } else if (!t->warned) {
        t->warned = true;
        cmg_warn("%s; the %zu ticket key(s) in force are kept", err, t->n);
    }
}

static void on_reread(struct cmg_timer *timer)
{
    struct cmg_tickets *t =
        (struct cmg_tickets *)((char *)timer - offsetof(struct cmg_tickets, timer));

    refresh(t);
    cmg_timer_start(t->loop, &t->timer, reread_ms(t->rotate_s), on_reread);
}

int cmg_tickets_start(struct cmg_tickets *t, struct cmg_loop *loop, const char *file,
                      uint64_t rotate_s, char *err, size_t errlen)
{
    int rc;

    snprintf(t->file, sizeof(t->file), "%s", file);
    t->rotate_s = rotate_s;
    t->loop = loop;
    rc = sync_file(t, err, errlen);
    if (rc == NO_FILE) {
        /* As with a policy_cache it cannot write: it serves on, and says what that costs. */
        if (add_key(t->keys, &t->n, time(NULL)) < 0)
            return -1;
        t->warned = true;
        cmg_warn("%s; until it can be, tickets use a key of this process only (no resumption "
                 "at other instances or after a restart)", err);
    } else if (rc < 0) {
        return -1;
    }
    cmg_timer_start(loop, &t->timer, reread_ms(rotate_s), on_reread);
    return 0;
}

void cmg_tickets_reload(struct cmg_tickets *t, uint64_t rotate_s)
{
    if (!t->loop)
        return;
    t->rotate_s = rotate_s;
    t->warned = false;   /* the operator asked: a file that cannot be used is said again */
    refresh(t);
    cmg_timer_start(t->loop, &t->timer, reread_ms(rotate_s), on_reread);
}

void cmg_tickets_stop(struct cmg_tickets *t)
{
    if (t->loop)
        cmg_timer_stop(t->loop, &t->timer);
    OPENSSL_cleanse(t->keys, sizeof(t->keys));
    t->n = 0;
    t->loop = NULL;
}

/* ---- OpenSSL's side ---- */

static int set_mac_key(EVP_MAC_CTX *hctx, unsigned char *key)
{
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, key, 32),
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end()};

    return EVP_MAC_CTX_set_params(hctx, params) == 1 ? 0 : -1;
}

/* Encrypting: the newest key. Decrypting: the key the ticket names (none: 0, a full
 * handshake); a ticket of an older key is renewed (2). */
static int ticket_cb(SSL *s, unsigned char name[16], unsigned char *iv, EVP_CIPHER_CTX *cctx,
                     EVP_MAC_CTX *hctx, int enc)
{
    struct cmg_tickets *t = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(s), ctx_index);
    struct cmg_ticket_key *k;
    size_t i = 0;

    if (!t || t->n == 0)
        return 0;
    if (enc) {
        if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(EVP_aes_256_cbc())) != 1)
            return -1;
        memcpy(name, t->keys[0].name, 16);
    } else {
        while (i < t->n && memcmp(name, t->keys[i].name, 16) != 0)
            i++;
        if (i == t->n)
            return 0;
    }
    k = &t->keys[i];
    if (EVP_CipherInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv, enc) != 1 ||
        set_mac_key(hctx, k->hmac) < 0)
        return -1;
    return i == 0 ? 1 : 2;
}

int cmg_tickets_attach(struct cmg_tickets *t, SSL_CTX *ctx)
{
    if (ctx_index < 0)
        ctx_index = SSL_CTX_get_ex_new_index(0, "cmg ticket keys", NULL, NULL, NULL);
    if (ctx_index < 0 || !SSL_CTX_set_ex_data(ctx, ctx_index, t))
        return -1;
    return SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_cb) == 1 ? 0 : -1;
}

/* ---- the chain a device sent, kept in its ticket ----
 * A session (and so a ticket) keeps the peer's certificate but not the intermediate
 * certificates it sent: a resumed connection could not verify a device whose issuing CA
 * is not in the CTL. The intermediates ride in the ticket's application data (encrypted
 * and authenticated with it) and serve as untrusted certificates when it resumes. */

#define CHAIN_MAX_CERTS 8
#define CHAIN_MAX_BYTES (16 * 1024)

/* DER of the certificates, one after another; NULL if none or too many. */
static unsigned char *chain_der(STACK_OF(X509) *chain, int *total)
{
    int n = sk_X509_num(chain);
    unsigned char *der, *p;

    *total = 0;
    if (n <= 0 || n > CHAIN_MAX_CERTS)
        return NULL;
    for (int i = 0; i < n; i++) {
        int len = i2d_X509(sk_X509_value(chain, i), NULL);
        if (len <= 0 || *total + len > CHAIN_MAX_BYTES)
            return NULL;
        *total += len;
    }
    der = p = OPENSSL_malloc((size_t)*total);
    for (int i = 0; der && i < n; i++)
        i2d_X509(sk_X509_value(chain, i), &p);
    return der;
}

/* A ticket is about to be made: a full handshake's chain goes in it (a resumed session
 * keeps the data of the ticket it came from). */
static int keep_chain(SSL *s, void *arg)
{
    int total;
    unsigned char *der;

    (void)arg;
    if (SSL_session_reused(s))
        return 1;
    der = chain_der(SSL_get_peer_cert_chain(s), &total);
    if (der)
        SSL_SESSION_set1_ticket_appdata(SSL_get_session(s), der, (size_t)total);
    OPENSSL_free(der);
    return 1;
}

int cmg_tickets_keep_chain(SSL_CTX *ctx)
{
    return SSL_CTX_set_session_ticket_cb(ctx, keep_chain, NULL, NULL) == 1 ? 0 : -1;
}

STACK_OF(X509) *cmg_tickets_peer_chain(SSL *ssl)
{
    STACK_OF(X509) *sent = SSL_get_peer_cert_chain(ssl), *kept;
    const unsigned char *p, *end;
    void *data = NULL;
    size_t len = 0;

    if (sk_X509_num(sent) > 0 || !SSL_session_reused(ssl))
        return sent ? X509_chain_up_ref(sent) : NULL;
    if (!SSL_SESSION_get0_ticket_appdata(SSL_get0_session(ssl), &data, &len) || len == 0)
        return NULL;
    kept = sk_X509_new_null();
    for (p = data, end = p + len; kept && p < end;) {
        X509 *x = d2i_X509(NULL, &p, end - p);
        if (!x || !sk_X509_push(kept, x)) {
            X509_free(x);
            break;
        }
    }
    ERR_clear_error();
    return kept;
}
