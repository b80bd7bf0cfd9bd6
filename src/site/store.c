/* The site's SQLite store; see store.h. */
#include "site/store.h"
#include "site/store_sql.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/rand.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

struct cmg_store {
    sqlite3 *db;
};

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    "INSERT OR IGNORE INTO meta VALUES ('schema', '1'), ('policy_version', '1');"
    "CREATE TABLE IF NOT EXISTS mappings (role TEXT PRIMARY KEY,"
    " type TEXT NOT NULL CHECK (type IN ('mp', 'sup', 'site')), url TEXT NOT NULL,"
    " auth INTEGER NOT NULL, max_body INTEGER NOT NULL, created INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS bulk_tokens (guid TEXT PRIMARY KEY, created INTEGER NOT NULL,"
    " expires INTEGER NOT NULL, blocked INTEGER NOT NULL DEFAULT 0, description TEXT);"
    "CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, name TEXT NOT NULL,"
    " thumbprint TEXT NOT NULL UNIQUE, bulk_guid TEXT, registered INTEGER NOT NULL,"
    " token_jti TEXT, token_issued INTEGER, token_expires INTEGER,"
    " blocked INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE IF NOT EXISTS certs (serial TEXT PRIMARY KEY, name TEXT NOT NULL,"
    " subject TEXT NOT NULL, issued INTEGER NOT NULL, expires INTEGER NOT NULL,"
    " revoked INTEGER);"
    /* the status document reads those that end soon, never all of them */
    "CREATE INDEX IF NOT EXISTS certs_expires ON certs (expires);"
    "CREATE TABLE IF NOT EXISTS connectors (name TEXT PRIMARY KEY, serial TEXT NOT NULL,"
    " issued INTEGER NOT NULL, expires INTEGER NOT NULL, revoked INTEGER);"
    "CREATE TABLE IF NOT EXISTS oidc (id INTEGER PRIMARY KEY CHECK (id = 1), issuer TEXT,"
    " tenant TEXT, audiences TEXT, jwks TEXT, source TEXT);"
    "CREATE TABLE IF NOT EXISTS blocked_ids (id TEXT PRIMARY KEY, created INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS signing_keys (kid TEXT PRIMARY KEY, jwk TEXT NOT NULL,"
    " created INTEGER NOT NULL, retired INTEGER, announcement TEXT);"
    /* reports (reports.c): the gateways' counters as the connectors carry them, kept
     * once per (instance, boot, seq); traffic by role, role '' the whole gateway */
    "CREATE TABLE IF NOT EXISTS report_boots (instance TEXT NOT NULL, boot TEXT NOT NULL,"
    " seq INTEGER NOT NULL, counters TEXT NOT NULL, received INTEGER NOT NULL,"
    " PRIMARY KEY (instance, boot));"
    "CREATE TABLE IF NOT EXISTS gateways (instance TEXT PRIMARY KEY, boot TEXT NOT NULL,"
    " seq INTEGER NOT NULL, state TEXT NOT NULL, policy_version INTEGER NOT NULL,"
    " started INTEGER NOT NULL, report_time INTEGER NOT NULL, received INTEGER NOT NULL,"
    " interval INTEGER NOT NULL, devices_now INTEGER NOT NULL, via TEXT NOT NULL,"
    " tunnels TEXT NOT NULL, certificates TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS connector_reports (connector TEXT PRIMARY KEY,"
    " received INTEGER NOT NULL, report_time INTEGER NOT NULL, interval INTEGER NOT NULL,"
    " draining INTEGER NOT NULL, policy_version INTEGER NOT NULL, tunnels TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS traffic_5m (instance TEXT NOT NULL, role TEXT NOT NULL,"
    " bucket INTEGER NOT NULL,"
    " requests INTEGER NOT NULL DEFAULT 0, r1xx INTEGER NOT NULL DEFAULT 0, r2xx INTEGER NOT NULL DEFAULT 0,"
    " r3xx INTEGER NOT NULL DEFAULT 0, r4xx INTEGER NOT NULL DEFAULT 0, r5xx INTEGER NOT NULL DEFAULT 0,"
    " rother INTEGER NOT NULL DEFAULT 0, request_bytes INTEGER NOT NULL DEFAULT 0,"
    " response_bytes INTEGER NOT NULL DEFAULT 0, egress_bytes INTEGER NOT NULL DEFAULT 0,"
    " ingress_bytes INTEGER NOT NULL DEFAULT 0, device_connections INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (instance, role, bucket));"
    "CREATE TABLE IF NOT EXISTS traffic_day (instance TEXT NOT NULL, role TEXT NOT NULL,"
    " day TEXT NOT NULL,"
    " requests INTEGER NOT NULL DEFAULT 0, r1xx INTEGER NOT NULL DEFAULT 0, r2xx INTEGER NOT NULL DEFAULT 0,"
    " r3xx INTEGER NOT NULL DEFAULT 0, r4xx INTEGER NOT NULL DEFAULT 0, r5xx INTEGER NOT NULL DEFAULT 0,"
    " rother INTEGER NOT NULL DEFAULT 0, request_bytes INTEGER NOT NULL DEFAULT 0,"
    " response_bytes INTEGER NOT NULL DEFAULT 0, egress_bytes INTEGER NOT NULL DEFAULT 0,"
    " ingress_bytes INTEGER NOT NULL DEFAULT 0, device_connections INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (instance, role, day));"
    "CREATE TABLE IF NOT EXISTS traffic_month (instance TEXT NOT NULL, role TEXT NOT NULL,"
    " month TEXT NOT NULL,"
    " requests INTEGER NOT NULL DEFAULT 0, r1xx INTEGER NOT NULL DEFAULT 0, r2xx INTEGER NOT NULL DEFAULT 0,"
    " r3xx INTEGER NOT NULL DEFAULT 0, r4xx INTEGER NOT NULL DEFAULT 0, r5xx INTEGER NOT NULL DEFAULT 0,"
    " rother INTEGER NOT NULL DEFAULT 0, request_bytes INTEGER NOT NULL DEFAULT 0,"
    " response_bytes INTEGER NOT NULL DEFAULT 0, egress_bytes INTEGER NOT NULL DEFAULT 0,"
    " ingress_bytes INTEGER NOT NULL DEFAULT 0, device_connections INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (instance, role, month));"
    "CREATE TABLE IF NOT EXISTS alert_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,"
    " subject TEXT NOT NULL, level TEXT NOT NULL CHECK (level IN ('warning','critical')),"
    " message TEXT NOT NULL, value REAL, threshold REAL, opened INTEGER NOT NULL,"
    " updated INTEGER NOT NULL, resolved INTEGER, notified TEXT);"
    /* the alerts pass reads these on the site's loop: indexes, not scans */
    "CREATE INDEX IF NOT EXISTS traffic_day_role ON traffic_day (role, day);"
    "CREATE INDEX IF NOT EXISTS traffic_month_role ON traffic_month (role, month);"
    "CREATE INDEX IF NOT EXISTS certs_name ON certs (name);"
    /* one open alert per (kind, subject): duplicates an older build left are resolved */
    "UPDATE alerts SET resolved = updated WHERE resolved IS NULL AND id NOT IN (SELECT"
    " max(id) FROM alerts WHERE resolved IS NULL GROUP BY kind, subject);"
    "CREATE UNIQUE INDEX IF NOT EXISTS alerts_open ON alerts (kind, subject)"
    " WHERE resolved IS NULL;"
    /* client notifications (notify.c): the epoch is made once, with the store */
    "CREATE TABLE IF NOT EXISTS notify_meta (epoch TEXT NOT NULL);"
    "INSERT INTO notify_meta SELECT lower(hex(randomblob(8)))"
    " WHERE NOT EXISTS (SELECT 1 FROM notify_meta);"
    "CREATE TABLE IF NOT EXISTS notifications (seq INTEGER PRIMARY KEY, type TEXT NOT NULL,"
    " data TEXT NOT NULL, created INTEGER NOT NULL, expires INTEGER NOT NULL,"
    " all_devices INTEGER NOT NULL, ntargets INTEGER NOT NULL, resend_of INTEGER);"
    "CREATE TABLE IF NOT EXISTS notify_targets (seq INTEGER NOT NULL, device TEXT NOT NULL,"
    " PRIMARY KEY (seq, device)) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS notify_delivered (seq INTEGER NOT NULL, device TEXT NOT NULL,"
    " at INTEGER NOT NULL, instance TEXT NOT NULL, PRIMARY KEY (seq, device)) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS device_seen (device TEXT PRIMARY KEY, instance TEXT NOT NULL,"
    " boot TEXT NOT NULL, open INTEGER NOT NULL, since INTEGER NOT NULL,"
    " last_seen INTEGER NOT NULL, first_seen INTEGER NOT NULL);"
    "CREATE INDEX IF NOT EXISTS device_seen_open ON device_seen (instance) WHERE open;"
    /* each gateway boot's newest notify report: a replay is told by its seq */
    "CREATE TABLE IF NOT EXISTS notify_boots (instance TEXT NOT NULL, boot TEXT NOT NULL,"
    " seq INTEGER NOT NULL, received INTEGER NOT NULL, PRIMARY KEY (instance, boot))"
    " WITHOUT ROWID;";

/* Columns added after the first schema: a store made before them gets them on open,
 * with the value that keeps it working as it did (the registration service needs the
 * device's bulk token, so site mappings pass Authorization on). */
static const struct {
    const char *table, *column, *add;
} added_columns[] = {
    {"mappings", "forward_authorization",
     "ALTER TABLE mappings ADD COLUMN forward_authorization INTEGER NOT NULL DEFAULT 0;"
     "UPDATE mappings SET forward_authorization = 1 WHERE type = 'site';"},
    {"certs", "thumbprint", "ALTER TABLE certs ADD COLUMN thumbprint TEXT;"},
    {"oidc", "jwks_uri",
     "ALTER TABLE oidc ADD COLUMN discovery TEXT; ALTER TABLE oidc ADD COLUMN jwks_uri TEXT;"
     "ALTER TABLE oidc ADD COLUMN ca TEXT;"},
    /* 'cert renew': what a certificate is for when it is not a device's (gateway, site,
     * a connector's earlier one), and when a renewal replaced it */
    {"certs", "replaced",
     "ALTER TABLE certs ADD COLUMN kind TEXT; ALTER TABLE certs ADD COLUMN replaced INTEGER;"},
};

const char *cmg_store_error(struct cmg_store *s)
{
    return sqlite3_errmsg(s->db);
}

sqlite3 *cmg_store_db(struct cmg_store *s)
{
    return s->db;
}

static bool has_column(sqlite3 *db, const char *table, const char *column)
{
    sqlite3_stmt *st = NULL;
    bool found = false;

    if (sqlite3_prepare_v2(db, "SELECT 1 FROM pragma_table_info(?) WHERE name = ?", -1, &st,
                           NULL) == SQLITE_OK &&
        sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC) == SQLITE_OK &&
        sqlite3_bind_text(st, 2, column, -1, SQLITE_STATIC) == SQLITE_OK)
        found = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    return found;
}

static int add_columns(sqlite3 *db)
{
    for (size_t i = 0; i < sizeof(added_columns) / sizeof(added_columns[0]); i++)
        if (!has_column(db, added_columns[i].table, added_columns[i].column) &&
            sqlite3_exec(db, added_columns[i].add, NULL, NULL, NULL) != SQLITE_OK)
            return -1;
    return 0;
}

/* The store holds who is blocked and what was revoked: readable by the site's owner
 * only. SQLite gives its -wal and -shm files the mode of the database file; those of
 * a store made before this rule are narrowed too. */
static int owner_only(const char *path)
{
    static const char *const suffixes[] = {"", "-wal", "-shm"};
    char file[4200];
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);

    if (fd < 0)
        return -1;
    close(fd);
    for (size_t i = 0; i < sizeof(suffixes) / sizeof(suffixes[0]); i++) {
        snprintf(file, sizeof(file), "%s%s", path, suffixes[i]);
        if (chmod(file, 0600) < 0 && errno != ENOENT)
            return -1;
    }
    return 0;
}

int cmg_store_open(const char *dir, struct cmg_store **out, char *err, size_t errlen)
{
    struct cmg_store *s = calloc(1, sizeof(*s));
    char path[4096];

    *out = NULL;
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    snprintf(path, sizeof(path), "%s/%s", dir, CMG_STORE_FILE);
    if (owner_only(path) < 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        cmg_store_close(s);
        return -1;
    }
    /* synchronous=FULL: a commit is on disk (WAL fsynced) before the change is
     * published or answered, so a power cut cannot undo a revocation already told. */
    if (sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) !=
            SQLITE_OK ||
        sqlite3_busy_timeout(s->db, 10000) != SQLITE_OK ||
        sqlite3_exec(s->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", NULL, NULL,
                     NULL) != SQLITE_OK ||
        sqlite3_exec(s->db, schema, NULL, NULL, NULL) != SQLITE_OK || add_columns(s->db) < 0) {
        snprintf(err, errlen, "%s: %s", path, s->db ? sqlite3_errmsg(s->db) : "cannot open");
        cmg_store_close(s);
        return -1;
    }
    *out = s;
    return 0;
}

void cmg_store_close(struct cmg_store *s)
{
    if (!s)
        return;
    sqlite3_close(s->db);
    free(s);
}

static int exec(struct cmg_store *s, const char *sql)
{
    return sqlite3_exec(s->db, sql, NULL, NULL, NULL) == SQLITE_OK ? 0 : -1;
}

int cmg_store_begin(struct cmg_store *s) { return exec(s, "BEGIN IMMEDIATE"); }
int cmg_store_begin_read(struct cmg_store *s) { return exec(s, "BEGIN"); }
int cmg_store_commit(struct cmg_store *s) { return exec(s, "COMMIT"); }

void cmg_store_rollback(struct cmg_store *s)
{
    if (!sqlite3_get_autocommit(s->db))
        exec(s, "ROLLBACK");
}

/* Prepares sql and binds the arguments described by fmt: 's' text, 'i' int64, 'n' null. */
static sqlite3_stmt *vprep(struct cmg_store *s, const char *sql, const char *fmt, va_list ap)
{
    sqlite3_stmt *st = NULL;
    int i = 1, rc = SQLITE_OK;

    if (sqlite3_prepare_v2(s->db, sql, -1, &st, NULL) != SQLITE_OK)
        return NULL;
    for (const char *f = fmt; *f && rc == SQLITE_OK; f++, i++) {
        if (*f == 's')
            rc = sqlite3_bind_text(st, i, va_arg(ap, const char *), -1, SQLITE_TRANSIENT);
        else if (*f == 'i')
            rc = sqlite3_bind_int64(st, i, va_arg(ap, int64_t));
        else
            rc = sqlite3_bind_null(st, i);
    }
    if (rc != SQLITE_OK) {
        sqlite3_finalize(st);
        return NULL;
    }
    return st;
}

/* store_sql.h shares it with the store's other files. */
#define prep cmg_store_prepare
sqlite3_stmt *cmg_store_prepare(struct cmg_store *s, const char *sql, const char *fmt, ...)
{
    sqlite3_stmt *st;
    va_list ap;

    va_start(ap, fmt);
    st = vprep(s, sql, fmt, ap);
    va_end(ap);
    return st;
}

/* Runs a statement that returns no rows; the number of rows changed, or -1. */
static int run(sqlite3_stmt *st)
{
    int rc;

    if (!st)
        return -1;
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return -1;
    return 1;
}

static int changes(struct cmg_store *s, sqlite3_stmt *st)
{
    return run(st) < 0 ? -1 : sqlite3_changes(s->db);
}

int cmg_store_bump(struct cmg_store *s)
{
    return exec(s, "UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                   "WHERE key = 'policy_version'");
}

/* A statement that gives one integer; def if no row. */
static int64_t one_int(struct cmg_store *s, const char *sql, int64_t def)
{
    sqlite3_stmt *st = prep(s, sql, "");
    int64_t v = def;

    if (st && sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

int64_t cmg_store_policy_version(struct cmg_store *s)
{
    return one_int(s, "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'policy_version'", -1);
}

int64_t cmg_store_data_version(struct cmg_store *s)
{
    return one_int(s, "PRAGMA data_version", -1);
}

int cmg_store_get_setting(struct cmg_store *s, const char *key, char *out, size_t outlen)
{
    sqlite3_stmt *st = prep(s, "SELECT value FROM meta WHERE key = ?", "s", key);
    int rc = 1;

    if (!st)
        return -1;
    if (sqlite3_step(st) == SQLITE_ROW) {
        snprintf(out, outlen, "%s", (const char *)sqlite3_column_text(st, 0));
        rc = 0;
    }
    sqlite3_finalize(st);
    return rc;
}

int cmg_store_set_setting(struct cmg_store *s, const char *key, const char *value)
{
    return run(prep(s, "INSERT OR REPLACE INTO meta VALUES (?, ?)", "ss", key, value)) < 0
               ? -1 : 0;
}

/* ---- mappings ---- */

static const struct { const char *word; unsigned bit; } auth_words[] = {
    {"cert", CMG_MAP_AUTH_CERT}, {"token", CMG_MAP_AUTH_TOKEN}, {"oidc", CMG_MAP_AUTH_OIDC},
};

int cmg_mapping_auth_parse(const char *s, unsigned *auth)
{
    *auth = 0;
    while (*s) {
        size_t n = strcspn(s, ",");
        unsigned bit = 0;
        for (size_t i = 0; i < sizeof(auth_words) / sizeof(auth_words[0]); i++)
            if (strlen(auth_words[i].word) == n && !strncasecmp(s, auth_words[i].word, n))
                bit = auth_words[i].bit;
        if (!bit)
            return -1;
        *auth |= bit;
        s += n + (s[n] == ',');
    }
    return *auth ? 0 : -1;
}

void cmg_mapping_auth_format(unsigned auth, char *out, size_t outlen)
{
    size_t len = 0;

    out[0] = 0;
    for (size_t i = 0; i < sizeof(auth_words) / sizeof(auth_words[0]); i++)
        if (auth & auth_words[i].bit)
            len += (size_t)snprintf(out + len, len < outlen ? outlen - len : 0, "%s%s",
                                    len ? "," : "", auth_words[i].word);
}

int cmg_store_mapping_add(struct cmg_store *s, const struct cmg_site_mapping *m)
{
    sqlite3_stmt *st = prep(s, "INSERT OR IGNORE INTO mappings (role, type, url, auth, max_body,"
                               " created, forward_authorization) VALUES (?, ?, ?, ?, ?, "
                               "strftime('%s', 'now'), ?)",
                            "sssiii", m->role, m->type, m->url, (int64_t)m->auth,
                            (int64_t)m->max_body, (int64_t)m->forward_authorization);
    int n = changes(s, st);

    if (n < 0)
        return -1;
    if (n == 0)
        return 1;
    return cmg_store_bump(s);
}

int cmg_store_mapping_remove(struct cmg_store *s, const char *role)
{
    int n = changes(s, prep(s, "DELETE FROM mappings WHERE role = ?", "s", role));

    if (n < 0)
        return -1;
    if (n == 0)
        return 1;
    return cmg_store_bump(s);
}

int cmg_store_mappings(struct cmg_store *s, struct cmg_site_mapping **out, size_t *n)
{
    sqlite3_stmt *st = prep(s, "SELECT role, type, url, auth, max_body, forward_authorization "
                               "FROM mappings ORDER BY created, role", "");
    struct cmg_site_mapping *v = NULL, *nv;
    size_t len = 0;
    int rc;

    *out = NULL;
    *n = 0;
    if (!st)
        return -1;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (!(nv = realloc(v, (len + 1) * sizeof(*v)))) {
            rc = SQLITE_NOMEM;
            break;
        }
        v = nv;
        memset(&v[len], 0, sizeof(v[len]));
        snprintf(v[len].role, sizeof(v[len].role), "%s", sqlite3_column_text(st, 0));
        snprintf(v[len].type, sizeof(v[len].type), "%s", sqlite3_column_text(st, 1));
        snprintf(v[len].url, sizeof(v[len].url), "%s", sqlite3_column_text(st, 2));
        v[len].auth = (unsigned)sqlite3_column_int64(st, 3);
        v[len].max_body = (uint64_t)sqlite3_column_int64(st, 4);
        v[len].forward_authorization = sqlite3_column_int64(st, 5) != 0;
        len++;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        free(v);
        return -1;
    }
    *out = v;
    *n = len;
    return 0;
}

/* Rows of a query as an array of objects, column names as keys; integers stay numbers. */
static cJSON *rows_json(struct cmg_store *s, sqlite3_stmt *st)
{
    cJSON *arr = cJSON_CreateArray();
    int rc;

    if (!st || !arr) {
        sqlite3_finalize(st);
        cJSON_Delete(arr);
        return NULL;
    }
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(arr, o))
            break;
        for (int i = 0; i < sqlite3_column_count(st); i++) {
            const char *name = sqlite3_column_name(st, i);
            switch (sqlite3_column_type(st, i)) {
            case SQLITE_INTEGER:
                cJSON_AddNumberToObject(o, name, (double)sqlite3_column_int64(st, i));
                break;
            case SQLITE_FLOAT:
                cJSON_AddNumberToObject(o, name, sqlite3_column_double(st, i));
                break;
            case SQLITE_NULL:
                cJSON_AddNullToObject(o, name);
                break;
            default:
                cJSON_AddStringToObject(o, name, (const char *)sqlite3_column_text(st, i));
            }
        }
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        cJSON_Delete(arr);
        return NULL;
    }
    (void)s;
    return arr;
}

cJSON *cmg_store_query_json(struct cmg_store *s, const char *sql, const char *fmt, ...)
{
    sqlite3_stmt *st;
    va_list ap;

    va_start(ap, fmt);
    st = vprep(s, sql, fmt, ap);
    va_end(ap);
    return rows_json(s, st);
}

cJSON *cmg_store_mappings_json(struct cmg_store *s)
{
    struct cmg_site_mapping *v;
    cJSON *arr;
    size_t n;
    char auth[64];

    if (cmg_store_mappings(s, &v, &n) < 0)
        return NULL;
    arr = cJSON_CreateArray();
    for (size_t i = 0; arr && i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        cmg_mapping_auth_format(v[i].auth, auth, sizeof(auth));
        cJSON_AddItemToArray(arr, o);
        cJSON_AddStringToObject(o, "role", v[i].role);
        cJSON_AddStringToObject(o, "type", v[i].type);
        cJSON_AddStringToObject(o, "url", v[i].url);
        cJSON_AddStringToObject(o, "auth", auth);
        cJSON_AddNumberToObject(o, "max_body", (double)v[i].max_body);
        cJSON_AddBoolToObject(o, "forward_authorization", v[i].forward_authorization);
    }
    free(v);
    return arr;
}

/* ---- bulk registration tokens ---- */

int cmg_store_bulk_add(struct cmg_store *s, const char *guid, int64_t created, int64_t expires,
                       const char *description)
{
    return run(prep(s, "INSERT INTO bulk_tokens (guid, created, expires, description) "
                       "VALUES (?, ?, ?, ?)",
                    description ? "siis" : "siin", guid, created, expires, description)) < 0
               ? -1 : 0;
}

int cmg_store_bulk_get(struct cmg_store *s, const char *guid, int64_t *expires, bool *blocked)
{
    sqlite3_stmt *st = prep(s, "SELECT expires, blocked FROM bulk_tokens WHERE guid = ?", "s",
                            guid);
    int rc = 1;

    if (!st)
        return -1;
    if (sqlite3_step(st) == SQLITE_ROW) {
        if (expires)
            *expires = sqlite3_column_int64(st, 0);
        if (blocked)
            *blocked = sqlite3_column_int64(st, 1) != 0;
        rc = 0;
    }
    sqlite3_finalize(st);
    return rc;
}

int cmg_store_bulk_block(struct cmg_store *s, const char *guid, bool blocked)
{
    int n = changes(s, prep(s, "UPDATE bulk_tokens SET blocked = ? WHERE guid = ?", "is",
                            (int64_t)blocked, guid));
    if (n < 0)
        return -1;
    return n == 0 ? 1 : cmg_store_bump(s);
}

cJSON *cmg_store_bulk_json(struct cmg_store *s)
{
    return rows_json(s, prep(s, "SELECT guid, created, expires, blocked, description "
                                "FROM bulk_tokens ORDER BY created, guid", ""));
}

/* ---- devices ---- */

static void new_guid(char out[64])
{
    unsigned char r[16];

    RAND_bytes(r, sizeof(r));
    r[6] = (unsigned char)((r[6] & 0x0f) | 0x40); /* version 4 */
    r[8] = (unsigned char)((r[8] & 0x3f) | 0x80);
    snprintf(out, 64, "GUID:%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12],
             r[13], r[14], r[15]);
}

static int device_row(sqlite3_stmt *st, struct cmg_device_rec *d)
{
    int rc = 1;

    if (!st)
        return -1;
    if (sqlite3_step(st) == SQLITE_ROW) {
        snprintf(d->id, sizeof(d->id), "%s", sqlite3_column_text(st, 0));
        snprintf(d->name, sizeof(d->name), "%s", sqlite3_column_text(st, 1));
        snprintf(d->thumbprint, sizeof(d->thumbprint), "%s", sqlite3_column_text(st, 2));
        d->blocked = sqlite3_column_int64(st, 3) != 0;
        rc = 0;
    }
    sqlite3_finalize(st);
    return rc;
}

int cmg_store_device_upsert(struct cmg_store *s, const char *thumbprint, const char *name,
                            const char *bulk_guid, int64_t now, struct cmg_device_rec *d)
{
    char id[64];
    int rc = device_row(prep(s, "SELECT id, name, thumbprint, blocked FROM devices "
                                "WHERE thumbprint = ?", "s", thumbprint), d);

    if (rc <= 0)
        return rc;
    new_guid(id);
    if (run(prep(s, "INSERT INTO devices (id, name, thumbprint, bulk_guid, registered) "
                    "VALUES (?, ?, ?, ?, ?)", "ssssi", id, name, thumbprint, bulk_guid, now)) < 0)
        return -1;
    return device_row(prep(s, "SELECT id, name, thumbprint, blocked FROM devices WHERE id = ?",
                           "s", id), d) == 0 ? 0 : -1;
}

int cmg_store_device_get(struct cmg_store *s, const char *id, struct cmg_device_rec *d)
{
    return device_row(prep(s, "SELECT id, name, thumbprint, blocked FROM devices WHERE id = ?",
                           "s", id), d);
}

int cmg_store_device_token(struct cmg_store *s, const char *id, const char *jti, int64_t issued,
                           int64_t expires)
{
    return run(prep(s, "UPDATE devices SET token_jti = ?, token_issued = ?, token_expires = ? "
                       "WHERE id = ?", "siis", jti, issued, expires, id)) < 0 ? -1 : 0;
}

int cmg_store_device_block(struct cmg_store *s, const char *id, bool blocked)
{
    int n = changes(s, prep(s, "UPDATE devices SET blocked = ? WHERE id = ?", "is",
                            (int64_t)blocked, id));
    if (n < 0)
        return -1;
    return n == 0 ? 1 : cmg_store_bump(s);
}

cJSON *cmg_store_devices_json(struct cmg_store *s)
{
    return rows_json(s, prep(s, "SELECT id, name, thumbprint, bulk_guid, registered, "
                                "token_issued, token_expires, blocked FROM devices "
                                "ORDER BY registered, id", ""));
}

/* ---- certificates issued by the site ---- */

/* A connector certificate's subject (site/connectors.c issues it so). */
#define CONNECTOR_SUBJECT "'/O=OpenCMG/OU=OpenCMG Connector/CN=' || name"

int cmg_store_cert_add(struct cmg_store *s, const char *serial, const char *name,
                       const char *subject, int64_t issued, int64_t expires)
{
    return run(prep(s, "INSERT INTO certs (serial, name, subject, issued, expires) "
                       "VALUES (?, ?, ?, ?, ?)", "sssii", serial, name, subject, issued,
                    expires)) < 0 ? -1 : 0;
}

int cmg_store_cert_set_thumbprint(struct cmg_store *s, const char *serial, const char *thumbprint)
{
    return run(prep(s, "UPDATE certs SET thumbprint = ? WHERE serial = ?", "ss", thumbprint,
                    serial)) < 0 ? -1 : 0;
}

int cmg_store_cert_thumbprint(struct cmg_store *s, const char *name, char *out, size_t len)
{
    sqlite3_stmt *st = prep(s, "SELECT thumbprint FROM certs WHERE name = ? AND thumbprint "
                               "IS NOT NULL ORDER BY issued DESC LIMIT 1", "s", name);
    int rc = 1;

    if (!st)
        return -1;
    if (sqlite3_step(st) == SQLITE_ROW) {
        snprintf(out, len, "%s", sqlite3_column_text(st, 0));
        rc = 0;
    }
    sqlite3_finalize(st);
    return rc;
}

/* Revokes the row of `table` that `where` (with one '?' for key) selects: 0 revoked
 * now, 1 not found, 2 already revoked. Bumps. (Table and condition are ours.) */
static int revoke_row(struct cmg_store *s, const char *table, const char *where, const char *key,
                      int64_t when)
{
    char sql[160];
    sqlite3_stmt *st;
    int rc;

    snprintf(sql, sizeof(sql), "SELECT revoked FROM %s WHERE %s", table, where);
    if (!(st = prep(s, sql, "s", key)))
        return -1;
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? 1 : -1;
    }
    rc = sqlite3_column_type(st, 0) != SQLITE_NULL;
    sqlite3_finalize(st);
    if (rc)
        return 2;
    snprintf(sql, sizeof(sql), "UPDATE %s SET revoked = ? WHERE %s", table, where);
    if (run(prep(s, sql, "is", when, key)) < 0)
        return -1;
    return cmg_store_bump(s);
}

/* A connector's certificate is revoked where its connector is recorded, whichever
 * command names it: the CRL and the policy's revoked_connectors both read that. */
int cmg_store_cert_revoke(struct cmg_store *s, const char *serial, int64_t when)
{
    static const char by_serial[] = "serial = ? COLLATE NOCASE";
    int rc = revoke_row(s, "certs", by_serial, serial, when);
    return rc == 1 ? revoke_row(s, "connectors", by_serial, serial, when) : rc;
}

int cmg_store_cert_by_name(struct cmg_store *s, const char *name, char *serial, size_t len)
{
    sqlite3_stmt *st = prep(s, "SELECT serial FROM certs WHERE name = ? AND revoked IS NULL "
                               "ORDER BY issued DESC LIMIT 1", "s", name);
    int rc = 1;

    if (!st)
        return -1;
    if (sqlite3_step(st) == SQLITE_ROW) {
        snprintf(serial, len, "%s", sqlite3_column_text(st, 0));
        rc = 0;
    }
    sqlite3_finalize(st);
    return rc;
}

/* The site's certificates: those of 'cert issue' (and of 'site init' once named), and
 * the connectors' (each recorded with its connector). The revoked ones are the CRL. */
cJSON *cmg_store_certs_json(struct cmg_store *s, bool revoked_only)
{
    return rows_json(s, prep(s, revoked_only
                                    ? "SELECT serial, name, subject, issued, expires, revoked "
                                      "FROM certs WHERE revoked IS NOT NULL UNION ALL "
                                      "SELECT serial, name, " CONNECTOR_SUBJECT ", issued, "
                                      "expires, revoked FROM connectors WHERE revoked IS NOT "
                                      "NULL AND serial NOT IN (SELECT serial FROM certs) "
                                      "ORDER BY revoked, serial"
                                    : "SELECT serial, name, subject, issued, expires, revoked, "
                                      "kind, replaced FROM certs ORDER BY issued, serial", ""));
}

/* ---- connector certificates ---- */

int cmg_store_connector_add(struct cmg_store *s, const char *name, const char *serial,
                            int64_t issued, int64_t expires)
{
    sqlite3_stmt *st = prep(s, "INSERT INTO connectors VALUES (?, ?, ?, ?, NULL)", "ssii",
                            name, serial, issued, expires);
    int rc;

    if (!st)
        return -1;
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_CONSTRAINT)
        return 1;
    return rc == SQLITE_DONE ? 0 : -1;
}

int cmg_store_connector_revoke(struct cmg_store *s, const char *name, int64_t when)
{
    int rc = revoke_row(s, "connectors", "name = ?", name, when);

    /* the certificates a renewal replaced go with it */
    if (rc == 0 && run(prep(s, "UPDATE certs SET revoked = ? WHERE kind = 'connector' AND "
                               "name = ? AND revoked IS NULL", "is", when, name)) < 0)
        return -1;
    return rc;
}

int cmg_store_connector_exists(struct cmg_store *s, const char *name)
{
    sqlite3_stmt *st = prep(s, "SELECT 1 FROM connectors WHERE name = ?", "s", name);
    int rc;

    if (!st)
        return -1;
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : -1;
}

bool cmg_store_connector_revoked(struct cmg_store *s, const char *serial)
{
    sqlite3_stmt *st = prep(s, "SELECT 1 FROM connectors WHERE serial = ? COLLATE NOCASE "
                               "AND revoked IS NOT NULL UNION ALL SELECT 1 FROM certs WHERE "
                               "serial = ? COLLATE NOCASE AND kind = 'connector' AND revoked "
                               "IS NOT NULL", "ss", serial, serial);
    bool revoked = st && sqlite3_step(st) == SQLITE_ROW;

    sqlite3_finalize(st);
    return revoked;
}

cJSON *cmg_store_connectors_json(struct cmg_store *s)
{
    return rows_json(s, prep(s, "SELECT name, serial, issued, expires, revoked FROM connectors "
                                "ORDER BY issued, name", ""));
}

/* ---- renewals ('cert renew') ---- */

int cmg_store_cert_replaced(struct cmg_store *s, const struct cmg_store_cert *old,
                            int64_t when)
{
    if (run(prep(s, "INSERT OR IGNORE INTO certs (serial, name, subject, issued, expires) "
                    "VALUES (?, ?, ?, ?, ?)", "sssii", old->serial, old->name, old->subject,
                 old->issued, old->expires)) < 0 ||
        run(prep(s, "UPDATE certs SET kind = ?, replaced = ? WHERE serial = ? COLLATE NOCASE",
                 "sis", old->kind, when, old->serial)) < 0)
        return -1;
    return 0;   /* nothing the policy holds changed */
}

int cmg_store_cert_renewed(struct cmg_store *s, const struct cmg_store_cert *c)
{
    if (!strcmp(c->kind, "connector"))
        return changes(s, prep(s, "UPDATE connectors SET serial = ?, issued = ?, expires = ? "
                                  "WHERE name = ?", "siis", c->serial, c->issued, c->expires,
                               c->name)) == 1 ? 0 : -1;
    if (cmg_store_cert_add(s, c->serial, c->name, c->subject, c->issued, c->expires) < 0)
        return -1;
    return run(prep(s, "UPDATE certs SET kind = ? WHERE serial = ?", "ss", c->kind,
                    c->serial)) < 0 ? -1 : 0;
}

/* ---- signing keys ---- */

int cmg_store_signing_key_add(struct cmg_store *s, const char *kid, const char *jwk,
                              int64_t created, const char *announcement)
{
    /* The first key may be recorded by two commands at once: the same row twice. */
    return run(prep(s, announcement ? "INSERT INTO signing_keys (kid, jwk, created, "
                                      "announcement) VALUES (?, ?, ?, ?)"
                                    : "INSERT OR IGNORE INTO signing_keys (kid, jwk, created, "
                                      "announcement) VALUES (?, ?, ?, ?)",
                    announcement ? "ssis" : "ssin", kid, jwk, created, announcement));
}

int cmg_store_signing_key_retire(struct cmg_store *s, const char *kid, int64_t when)
{
    return changes(s, prep(s, "UPDATE signing_keys SET retired = ? WHERE kid = ? AND "
                              "retired IS NULL", "is", when, kid)) == 1 ? 0 : -1;
}

int cmg_store_signing_key_current(struct cmg_store *s, char *kid, size_t kidlen,
                                  int64_t *created)
{
    sqlite3_stmt *st = prep(s, "SELECT kid, created FROM signing_keys WHERE retired IS NULL "
                               "ORDER BY rowid DESC LIMIT 1", "");
    int rc = -1;

    if (!st)
        return -1;
    switch (sqlite3_step(st)) {
    case SQLITE_ROW:
        snprintf(kid, kidlen, "%s", (const char *)sqlite3_column_text(st, 0));
        *created = sqlite3_column_int64(st, 1);
        rc = 1;
        break;
    case SQLITE_DONE:
        rc = 0;
        break;
    }
    sqlite3_finalize(st);
    return rc;
}

cJSON *cmg_store_signing_keys_json(struct cmg_store *s)
{
    return rows_json(s, prep(s, "SELECT kid, jwk, created, retired, announcement FROM "
                                "signing_keys ORDER BY rowid", ""));
}

/* ---- OIDC ---- */

static char *col_dup(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? strdup((const char *)t) : NULL;
}

int cmg_store_oidc_get(struct cmg_store *s, struct cmg_oidc_conf *o)
{
    sqlite3_stmt *st = prep(s, "SELECT issuer, tenant, audiences, jwks, source, discovery, "
                               "jwks_uri, ca FROM oidc WHERE id = 1", "");
    int rc = 1;

    memset(o, 0, sizeof(*o));
    if (!st)
        return -1;
    if (sqlite3_step(st) == SQLITE_ROW) {
        o->issuer = col_dup(st, 0);
        o->tenant = col_dup(st, 1);
        o->audiences = col_dup(st, 2);
        o->jwks = col_dup(st, 3);
        o->source = col_dup(st, 4);
        o->discovery = col_dup(st, 5);
        o->jwks_uri = col_dup(st, 6);
        o->ca = col_dup(st, 7);
        rc = 0;
    }
    sqlite3_finalize(st);
    return rc;
}

int cmg_store_oidc_set(struct cmg_store *s, const struct cmg_oidc_conf *o)
{
    if (run(prep(s, "INSERT OR REPLACE INTO oidc (id, issuer, tenant, audiences, jwks, source,"
                    " discovery, jwks_uri, ca) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)", "ssssssss",
                 o->issuer, o->tenant ? o->tenant : "", o->audiences, o->jwks,
                 o->source ? o->source : "", o->discovery ? o->discovery : "",
                 o->jwks_uri ? o->jwks_uri : "", o->ca ? o->ca : "")) < 0)
        return -1;
    return cmg_store_bump(s);
}

int cmg_store_oidc_keys_set(struct cmg_store *s, const char *jwks, const char *jwks_uri)
{
    if (run(prep(s, "UPDATE oidc SET jwks = ?, jwks_uri = ? WHERE id = 1", "ss", jwks,
                 jwks_uri)) < 0)
        return -1;
    return cmg_store_bump(s);
}

int cmg_store_oidc_clear(struct cmg_store *s)
{
    if (run(prep(s, "DELETE FROM oidc", "")) < 0)
        return -1;
    return cmg_store_bump(s);
}

void cmg_oidc_conf_free(struct cmg_oidc_conf *o)
{
    free(o->issuer);
    free(o->tenant);
    free(o->audiences);
    free(o->jwks);
    free(o->discovery);
    free(o->jwks_uri);
    free(o->ca);
    free(o->source);
    memset(o, 0, sizeof(*o));
}

/* ---- what the policy lists ---- */

static cJSON *column_strings(struct cmg_store *s, const char *sql)
{
    sqlite3_stmt *st = prep(s, sql, "");
    cJSON *arr = cJSON_CreateArray();
    int rc = SQLITE_ERROR;

    if (st && arr)
        while ((rc = sqlite3_step(st)) == SQLITE_ROW)
            cJSON_AddItemToArray(arr, cJSON_CreateString((const char *)sqlite3_column_text(st, 0)));
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        cJSON_Delete(arr);
        return NULL;
    }
    return arr;
}

cJSON *cmg_store_blocked_devices(struct cmg_store *s)
{
    return column_strings(s, "SELECT id FROM devices WHERE blocked UNION "
                             "SELECT id FROM blocked_ids ORDER BY 1");
}

int cmg_store_identity_block(struct cmg_store *s, const char *id, bool blocked)
{
    int n = changes(s, blocked ? prep(s, "INSERT OR IGNORE INTO blocked_ids VALUES (?, "
                                         "strftime('%s', 'now'))", "s", id)
                               : prep(s, "DELETE FROM blocked_ids WHERE id = ?", "s", id));
    if (n < 0)
        return -1;
    return n == 0 ? 1 : cmg_store_bump(s);
}

cJSON *cmg_store_blocked_ids_json(struct cmg_store *s)
{
    return rows_json(s, prep(s, "SELECT id, created FROM blocked_ids ORDER BY created, id", ""));
}

cJSON *cmg_store_blocked_tokens(struct cmg_store *s)
{
    return column_strings(s, "SELECT guid FROM bulk_tokens WHERE blocked "
                             "AND expires > strftime('%s', 'now') ORDER BY guid");
}

cJSON *cmg_store_revoked_connectors(struct cmg_store *s)
{
    return column_strings(s, "SELECT serial FROM connectors WHERE revoked IS NOT NULL "
                             "AND expires > strftime('%s', 'now') UNION SELECT serial FROM "
                             "certs WHERE kind = 'connector' AND revoked IS NOT NULL AND "
                             "expires > strftime('%s', 'now') ORDER BY serial");
}
