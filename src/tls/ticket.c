/* TLS session ticket keys shared through a file (see ticket.h for its format). Keys are
 * secrets: no line of the log shows one, nor any part of a line that holds one. */
#include "tls/ticket.h"

#include "core/log.h"
#include "http/path.h"

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
#define NO_FILE (-2)                /* absent, and not to be created here */
#define FUTURE_SLACK_S 3600         /* a key dated later than that is taken as made now */

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
        int hi = cmg_hex_digit(line[2 * i]), lo = cmg_hex_digit(line[2 * i + 1]);
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

/* Whoever reads the file can forge a ticket naming any device's certificate, and whoever
 * writes it can plant a key: it is a device credential, like a CA key. */
static int check_owner_mode(const char *what, const char *path, const struct stat *st,
                            mode_t forbidden, char *err, size_t errlen)
{
    uid_t me = geteuid();

    if (st->st_uid != 0 && st->st_uid != me)
        snprintf(err, errlen, "ticket_key_file %s: expected %s owned by root or the gateway's "
                 "user (uid %u), found uid %u", path, what, (unsigned)me, (unsigned)st->st_uid);
    else if (st->st_mode & forbidden)
        snprintf(err, errlen, "ticket_key_file %s: expected %s closed to other users (%s), "
                 "found mode %04o", path, what, forbidden == 022 ? "no writes by group or others"
                 : "no reads by others, no writes by group or others",
                 (unsigned)(st->st_mode & 07777));
    else
        return 0;
    snprintf(err + strlen(err), errlen - strlen(err), ": whoever reads it can impersonate any "
             "certificate device and decrypt TLS 1.2 sessions; chown it and chmod 600 it");
    return -1;
}

static int check_file(const char *file, int fd, char *err, size_t errlen)
{
    struct stat st;

    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "ticket_key_file %s: expected a regular file", file);
        return -1;
    }
    return check_owner_mode("the file", file, &st, 022 | 004, err, errlen);
}

/* A key file is created only in a directory no other user can write to. */
static int check_dir(const char *file, char *err, size_t errlen)
{
    char dir[PATH_MAX];
    char *slash;
    struct stat st;

    snprintf(dir, sizeof(dir), "%s", file);
    slash = strrchr(dir, '/');
    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else
        slash[slash == dir] = 0;
    if (stat(dir, &st) < 0)
        return 0;   /* absent: the open says so */
    return check_owner_mode("its directory", dir, &st, 022, err, errlen);
}

/* Opens the file to read it, without a lock: writers rename a complete file over it. A
 * FIFO or a terminal named there must not block the loop. fd, or -1 with err, or NO_FILE
 * if it is absent. */
static int open_file(const char *file, char *err, size_t errlen)
{
    /* A symbolic link is followed: a mounted secret (Kubernetes) is one. */
    int fd = open(file, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);

    if (fd < 0 && errno == ENOENT) {
        snprintf(err, errlen, "ticket_key_file %s: absent", file);
        return NO_FILE;
    }
    if (fd < 0) {
        snprintf(err, errlen, "ticket_key_file %s: cannot open it: %s", file, strerror(errno));
        return -1;
    }
    if (check_file(file, fd, err, errlen) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The whole file, NUL-terminated. 0, or -1 with err. */
static int read_text(int fd, const char *file, char *buf, size_t cap, char *err, size_t errlen)
{
    size_t len = 0;

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

/* The keys of the file, newest first: 0, or -1 / NO_FILE with err. An empty file (one
 * being copied in place) is no more usable than a corrupt one. */
static int read_keys(const char *file, struct cmg_ticket_key *keys, size_t *n, char *err,
                     size_t errlen)
{
    char text[FILE_MAX];
    int fd = open_file(file, err, errlen), rc = -1;

    *n = 0;
    if (fd < 0)
        return fd;
    if (read_text(fd, file, text, sizeof(text), err, errlen) == 0 &&
        parse_keys(file, text, keys, n, err, errlen) == 0) {
        rc = 0;
        if (*n == 0) {
            snprintf(err, errlen, "ticket_key_file %s: expected a key, found none (copy a key "
                     "file to a temporary name, then mv it into place)", file);
            rc = -1;
        }
    }
    close(fd);
    OPENSSL_cleanse(text, sizeof(text));
    return rc;
}

/* Keys dated more than an hour ahead (a clock set wrong where they were made) count as
 * made when this process first saw them: otherwise no rotation would ever be due. */
static void clamp_future(struct cmg_tickets *t, struct cmg_ticket_key *keys, size_t n,
                         int64_t now)
{
    for (size_t i = 0; i < n; i++) {
        size_t j = 0;

        while (j < t->n && memcmp(t->keys[j].name, keys[i].name, 16) != 0)
            j++;
        if (j < t->n && t->keys[j].created <= now + FUTURE_SLACK_S) {
            keys[i].created = t->keys[j].created;
        } else if (keys[i].created > now + FUTURE_SLACK_S) {
            if (!t->future_warned)
                cmg_warn("ticket_key_file %s: a key is dated %lld s ahead of this host's clock: "
                         "taken as made now (check the clocks of the hosts that write the file)",
                         t->file, (long long)(keys[i].created - now));
            t->future_warned = true;
            keys[i].created = now;
        }
    }
    sort_keys(keys, n);
}

/* The text of the file holding these keys. */
static size_t format_keys(char *text, size_t cap, const struct cmg_ticket_key *keys, size_t n)
{
    size_t len = (size_t)snprintf(text, cap, "%s", header);

    for (size_t i = 0; i < n; i++) {
        const unsigned char *parts[] = {keys[i].name, keys[i].hmac, keys[i].aes};
        const size_t sizes[] = {16, 32, 32};
        len += (size_t)snprintf(text + len, cap - len, "%lld ", (long long)keys[i].created);
        for (int p = 0; p < 3; p++)
            for (size_t b = 0; b < sizes[p]; b++)
                len += (size_t)snprintf(text + len, cap - len, "%02x", parts[p][b]);
        len += (size_t)snprintf(text + len, cap - len, "\n");
    }
    return len;
}

/* The directory of path, made durable after a rename or a link in it. */
static void sync_dir(const char *path)
{
    char dir[PATH_MAX];
    char *slash;
    int fd;

    snprintf(dir, sizeof(dir), "%s", path);
    slash = strrchr(dir, '/');
    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else
        slash[slash == dir] = 0;
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* Writes the keys to a new file beside dest (0600, synced), then puts it at dest: renamed
 * over it (replace), or linked there only if dest is absent (create: EEXIST if another
 * instance made it first). 0, or -1 with err and errno. */
static int write_keys(const char *file, const char *dest, const struct cmg_ticket_key *keys,
                      size_t n, bool replace, char *err, size_t errlen)
{
    char tmp[PATH_MAX + 32], text[FILE_MAX];
    size_t len = format_keys(text, sizeof(text), keys, n);
    ssize_t w = -1;
    int fd, rc = -1, saved = 0;

    snprintf(tmp, sizeof(tmp), "%s.%ld.new", dest, (long)getpid());
    unlink(tmp);
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd >= 0)
        w = write(fd, text, len);
    if (fd < 0 || w != (ssize_t)len || fsync(fd) < 0) {
        saved = fd < 0 || w < 0 ? errno : EIO;   /* a short write leaves errno stale */
        snprintf(err, errlen, "ticket_key_file %s: cannot write %s: %s", file, tmp,
                 w >= 0 && w != (ssize_t)len ? "short write (disk full?)" : strerror(saved));
    } else if (replace ? rename(tmp, dest) < 0 : link(tmp, dest) < 0) {
        saved = errno;
        snprintf(err, errlen, "ticket_key_file %s: cannot %s it: %s", file,
                 replace ? "replace" : "create", strerror(saved));
    } else {
        sync_dir(dest);
        rc = 0;
    }
    if (fd >= 0)
        close(fd);
    if (rc < 0 || !replace)
        unlink(tmp);
    OPENSSL_cleanse(text, sizeof(text));
    errno = saved;
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
    return rotate_s && (n == 0 || now - keys[0].created >= (int64_t)rotate_s);
}

static bool drop_due(const struct cmg_ticket_key *keys, size_t n, int64_t now, uint64_t rotate_s)
{
    struct cmg_ticket_key copy[CMG_TICKET_MAX_KEYS];
    size_t m = n;
    bool due;

    memcpy(copy, keys, n * sizeof(*keys));
    due = rotate_s && drop_old(copy, &m, now, rotate_s);
    OPENSSL_cleanse(copy, sizeof(copy));
    return due;
}

/* Where a new file goes: the path, or where the symbolic link there points (a link
 * made in advance to a shared file stays a link). */
static const char *creation_path(const char *file, char *out, size_t cap)
{
    char target[PATH_MAX];
    ssize_t len = readlink(file, target, sizeof(target) - 1);
    const char *slash = strrchr(file, '/');

    if (len <= 0)
        return file;
    target[len] = 0;
    if (target[0] == '/' || !slash)
        len = snprintf(out, cap, "%s", target);
    else
        len = snprintf(out, cap, "%.*s/%s", (int)(slash - file), file, target);
    return len > 0 && (size_t)len < cap ? out : file;
}

/* The file is absent: this instance makes it, with one key, unless another instance
 * made it first (then 1: read it). 0, 1, or NO_FILE / -1 with err. */
static int create_file(struct cmg_tickets *t, char *err, size_t errlen)
{
    struct cmg_ticket_key key[CMG_TICKET_MAX_KEYS];
    size_t n = 0;
    int rc;

    char path[PATH_MAX];
    const char *dest = creation_path(t->file, path, sizeof(path));

    if (check_dir(dest, err, errlen) < 0)
        return -1;
    if (add_key(key, &n, time(NULL)) < 0) {
        snprintf(err, errlen, "ticket_key_file %s: no random bytes for a new key", t->file);
        return -1;
    }
    rc = write_keys(t->file, dest, key, n, false, err, errlen);
    OPENSSL_cleanse(key, sizeof(key));
    if (rc < 0 && errno == EEXIST)
        return 1;
    if (rc < 0 && (errno == ENOENT || errno == EACCES || errno == EROFS || errno == EPERM)) {
        snprintf(err, errlen, "ticket_key_file %s: absent, and it cannot be created: %s",
                 t->file, strerror(errno));
        return NO_FILE;
    }
    if (rc == 0)
        cmg_info("ticket_key_file created (mode 0600): TLS sessions resume at every gateway "
                 "instance that shares it");
    return rc < 0 ? -1 : 1;
}

/* Adds or drops keys as due and writes the file, under the lock file beside it (never
 * waited for: busy, another instance rotates, and the next re-read sees its keys). The
 * file is read again under the lock: the other instances' rotation counts. keys become
 * what the file now holds. 0, or -1 with err (keys as read). */
static int rotate_locked(struct cmg_tickets *t, struct cmg_ticket_key *keys, size_t *n,
                         char *err, size_t errlen)
{
    struct cmg_ticket_key next[CMG_TICKET_MAX_KEYS];
    char real[PATH_MAX], lock[PATH_MAX + 8];
    const char *dest = realpath(t->file, real) ? real : t->file;   /* a link stays one */
    size_t nnext = 0;
    int64_t now = time(NULL);
    bool added = false;
    int fd, rc = -1;

    snprintf(lock, sizeof(lock), "%s.lock", dest);
    fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "ticket_key_file %s: cannot open its lock %s: %s", t->file, lock,
                 strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        close(fd);
        cmg_debug("ticket_key_file %s: another instance is rotating it", t->file);
        return 0;
    }
    if (read_keys(t->file, next, &nnext, err, errlen) < 0)
        goto out;
    clamp_future(t, next, nnext, now);
    if (rotation_due(next, nnext, now, t->rotate_s)) {
        if (add_key(next, &nnext, now) < 0) {
            snprintf(err, errlen, "ticket_key_file %s: no random bytes for a new key", t->file);
            goto out;
        }
        added = true;
    }
    if ((added | drop_old(next, &nnext, now, t->rotate_s)) &&
        write_keys(t->file, dest, next, nnext, true, err, errlen) < 0)
        goto out;
    if (added)
        cmg_info("ticket_key_file: a new ticket key, decrypting now, encrypting in %llu s; %zu "
                 "key(s) in it", (unsigned long long)reread_ms(t->rotate_s) / 1000, nnext);
    else
        cmg_info("ticket_key_file: an old ticket key dropped; %zu key(s) in it", nnext);
    memcpy(keys, next, sizeof(next));
    *n = nnext;
    rc = 0;
out:
    close(fd);   /* and the lock with it */
    OPENSSL_cleanse(next, sizeof(next));
    return rc;
}

/* Reads the file (creating it if absent), rotates as due, and puts its keys in force.
 * 0, or -1 or NO_FILE with err (the keys in force stay). */
static int sync_file(struct cmg_tickets *t, char *err, size_t errlen)
{
    struct cmg_ticket_key keys[CMG_TICKET_MAX_KEYS] = {{0}};
    size_t n = 0;
    int64_t now = time(NULL);
    int rc = read_keys(t->file, keys, &n, err, errlen);

    if (rc == NO_FILE) {
        rc = create_file(t, err, errlen);
        if (rc == 1)
            rc = read_keys(t->file, keys, &n, err, errlen);
    }
    if (rc < 0)
        goto out;
    clamp_future(t, keys, n, now);
    if ((rotation_due(keys, n, now, t->rotate_s) || drop_due(keys, n, now, t->rotate_s)) &&
        rotate_locked(t, keys, &n, err, errlen) < 0) {
        if (!t->write_warned)
            cmg_warn("%s; the %zu key(s) it holds stay in force, not rotated", err, n);
        t->write_warned = true;
    } else {
        t->write_warned = false;
    }
    OPENSSL_cleanse(t->keys, sizeof(t->keys));
    memcpy(t->keys, keys, n * sizeof(*keys));
    t->n = n;
    rc = 0;
out:
    OPENSSL_cleanse(keys, sizeof(keys));
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

/* The key that encrypts: the newest one the other instances have surely read (made at
 * least a re-read interval ago); a newer one only decrypts for now. The oldest if none is
 * that old (a file just made). */
static size_t encrypting_key(const struct cmg_tickets *t)
{
    int64_t ready = (int64_t)time(NULL) - (int64_t)(reread_ms(t->rotate_s) / 1000);
    size_t i = 0;

    while (i + 1 < t->n && t->keys[i].created > ready)
        i++;
    return i;
}

/* Encrypting: the encrypting key. Decrypting: the key the ticket names (none: 0, a full
 * handshake); a ticket of another key is renewed (2). */
static int ticket_cb(SSL *s, unsigned char name[16], unsigned char *iv, EVP_CIPHER_CTX *cctx,
                     EVP_MAC_CTX *hctx, int enc)
{
    struct cmg_tickets *t = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(s), ctx_index);
    struct cmg_ticket_key *k;
    size_t i = 0, current;

    if (!t || t->n == 0)
        return 0;
    current = encrypting_key(t);
    if (enc) {
        if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(EVP_aes_256_cbc())) != 1)
            return -1;
        i = current;
        memcpy(name, t->keys[i].name, 16);
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
    return i == current ? 1 : 2;
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

/* The application data of a ticket whose chain could not be kept (more than
 * CHAIN_MAX_CERTS or CHAIN_MAX_BYTES): no DER certificate starts with it. */
static const unsigned char chain_left_out = 0;

/* DER of the certificates, one after another; NULL if none or too many (*total < 0). */
static unsigned char *chain_der(STACK_OF(X509) *chain, int *total)
{
    int n = sk_X509_num(chain);
    unsigned char *der, *p;

    *total = 0;
    if (n <= 0)
        return NULL;
    *total = -1;
    if (n > CHAIN_MAX_CERTS)
        return NULL;
    *total = 0;
    for (int i = 0; i < n; i++) {
        int len = i2d_X509(sk_X509_value(chain, i), NULL);
        if (len <= 0 || *total + len > CHAIN_MAX_BYTES) {
            *total = -1;
            return NULL;
        }
        *total += len;
    }
    der = p = OPENSSL_malloc((size_t)*total);
    for (int i = 0; der && i < n; i++)
        i2d_X509(sk_X509_value(chain, i), &p);
    return der;
}

/* A ticket is about to be made: a full handshake's chain goes in it (a resumed session
 * keeps the data of the ticket it came from). A chain too long to keep is marked so: such
 * a ticket never resumes (the device could not be judged without its intermediates). */
static int keep_chain(SSL *s, void *arg)
{
    SSL_SESSION *sess = SSL_get_session(s);
    unsigned char *der;
    int total, ok = 1;

    (void)arg;
    if (SSL_session_reused(s))
        return 1;
    der = chain_der(SSL_get_peer_cert_chain(s), &total);
    if (der)
        ok = SSL_SESSION_set1_ticket_appdata(sess, der, (size_t)total);
    if (!der || !ok)
        ok = total == 0 || SSL_SESSION_set1_ticket_appdata(sess, &chain_left_out, 1);
    OPENSSL_free(der);
    return ok ? 1 : 0;
}

static bool chain_was_left_out(SSL_SESSION *sess)
{
    void *data = NULL;
    size_t len = 0;

    return SSL_SESSION_get0_ticket_appdata(sess, &data, &len) && len == 1 &&
           *(const unsigned char *)data == chain_left_out;
}

/* A ticket read: one whose chain was left out gets a full handshake (and a new ticket). */
static SSL_TICKET_RETURN check_chain(SSL *s, SSL_SESSION *sess, const unsigned char *name,
                                     size_t name_len, SSL_TICKET_STATUS status, void *arg)
{
    (void)s, (void)name, (void)name_len, (void)arg;
    switch (status) {
    case SSL_TICKET_FATAL_ERR_MALLOC:
    case SSL_TICKET_FATAL_ERR_OTHER:
        return SSL_TICKET_RETURN_ABORT;
    case SSL_TICKET_SUCCESS:
    case SSL_TICKET_SUCCESS_RENEW:
        if (chain_was_left_out(sess))
            return SSL_TICKET_RETURN_IGNORE_RENEW;
        return status == SSL_TICKET_SUCCESS ? SSL_TICKET_RETURN_USE : SSL_TICKET_RETURN_USE_RENEW;
    default:
        return SSL_TICKET_RETURN_IGNORE_RENEW;
    }
}

int cmg_tickets_keep_chain(SSL_CTX *ctx)
{
    return SSL_CTX_set_session_ticket_cb(ctx, keep_chain, check_chain, NULL) == 1 ? 0 : -1;
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
