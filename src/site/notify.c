/* Client notifications in the site's store and the connectors' notify feed; see
 * notify.h. The reports of the gateways are notify_report.c's. */
#include "site/notify.h"

#include "core/buf.h"
#include "site/ops.h"
#include "core/metrics.h"
#include "site/store_sql.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A live document's fixed part: the keys, the id, the numbers. */
#define DOC_OVERHEAD 256

/* ---- identifiers ---- */

bool cmg_notify_device_ok(const char *id)
{
    size_t n = 0;

    for (; id[n]; n++)
        if (n == CMG_NOTIFY_MAX_DEVICE_ID || (unsigned char)id[n] <= 0x20 ||
            (unsigned char)id[n] > 0x7e)
            return false;
    return n > 0;
}

bool cmg_notify_type_ok(const char *type)
{
    size_t n = 0;

    for (; type[n]; n++)
        if (n == CMG_NOTIFY_MAX_TYPE ||
            !(isalnum((unsigned char)type[n]) || strchr("_.-", type[n])))
            return false;
    return n > 0 && strcmp(type, "reset") != 0;
}

int cmg_notify_id_parse(const char *id, char epoch[17], int64_t *seq)
{
    const char *s;
    int64_t v = 0;

    for (int i = 0; i < 16; i++)   /* stops at the NUL of a shorter one */
        if (!isdigit((unsigned char)id[i]) && !(id[i] >= 'a' && id[i] <= 'f'))
            return -1;
    if (id[16] != '-')
        return -1;
    s = id + 17;
    if (!isdigit((unsigned char)*s) || (*s == '0' && s[1]) || strlen(s) > 18)
        return -1;
    for (; *s; s++) {
        if (!isdigit((unsigned char)*s))
            return -1;
        v = v * 10 + (*s - '0');
    }
    memcpy(epoch, id, 16);
    epoch[16] = 0;
    *seq = v;
    return 0;
}

int64_t cmg_notify_ttl_parse(const char *s)
{
    char *end;
    long long n;

    if (!s || !isdigit((unsigned char)*s))
        return -1;
    errno = 0;
    n = strtoll(s, &end, 10);
    if (errno || n > CMG_NOTIFY_TTL_MAX)
        return -1;
    if (!strcmp(end, "m"))
        n *= 60;
    else if (!strcmp(end, "h"))
        n *= 3600;
    else if (*end && strcmp(end, "s"))
        return -1;
    return n >= 1 && n <= CMG_NOTIFY_TTL_MAX ? n : -1;
}

/* ---- the store ---- */

/* Runs a statement that gives no rows and finalizes it: 0, or -1. */
static int done(sqlite3_stmt *st)
{
    int rc = st ? sqlite3_step(st) : SQLITE_ERROR;

    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

/* The first column of the first row as an integer (def when none or NULL); finalizes. */
static int64_t one_int(sqlite3_stmt *st, int64_t def, bool *failed)
{
    int rc = st ? sqlite3_step(st) : SQLITE_ERROR;
    int64_t v = def;

    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_int64(st, 0);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE && failed)
        *failed = true;
    sqlite3_finalize(st);
    return v;
}

int cmg_notify_epoch(struct cmg_store *st, char out[17])
{
    sqlite3_stmt *q = cmg_store_prepare(st, "SELECT epoch FROM notify_meta LIMIT 1", "");
    int rc = -1;

    if (q && sqlite3_step(q) == SQLITE_ROW && sqlite3_column_bytes(q, 0) == 16) {
        memcpy(out, sqlite3_column_text(q, 0), 16);
        out[16] = 0;
        rc = 0;
    }
    sqlite3_finalize(q);
    return rc;
}

int64_t cmg_notify_last(struct cmg_store *st)
{
    bool failed = false;
    int64_t v = one_int(cmg_store_prepare(st, "SELECT max(seq) FROM notifications", ""), 0,
                        &failed);
    return failed ? -1 : v;
}

/* JSON string bytes of a device id (printable ASCII: only '"' and '\' are escaped). */
static size_t id_json_len(const char *id)
{
    size_t n = 2;

    for (; *id; id++)
        n += (*id == '"' || *id == '\\') ? 2 : 1;
    return n;
}

static int append_json_id(struct cmg_buf *b, const char *id)
{
    int rc = cmg_buf_append(b, "\"", 1);

    for (const char *p = id; rc == 0 && *p; p++)
        rc = (*p == '"' || *p == '\\') ? cmg_buf_printf(b, "\\%c", *p) : cmg_buf_append(b, p, 1);
    return rc == 0 ? cmg_buf_append(b, "\"", 1) : -1;
}

/* The targets inserted one by one with one prepared statement (a list of 100,000 in
 * the caller's transaction); duplicates count once. -1 on a store error. */
static int64_t insert_targets(struct cmg_store *st, int64_t seq, const char *const *ids,
                              size_t n)
{
    sqlite3_stmt *ins = cmg_store_prepare(
        st, "INSERT OR IGNORE INTO notify_targets (seq, device) VALUES (?, ?)", "i", seq);
    sqlite3 *db = cmg_store_db(st);
    int64_t added = 0;

    for (size_t i = 0; ins && i < n; i++) {
        sqlite3_bind_text(ins, 2, ids[i], -1, SQLITE_STATIC);
        if (sqlite3_step(ins) != SQLITE_DONE) {
            sqlite3_finalize(ins);
            return -1;
        }
        added += sqlite3_changes(db);
        sqlite3_reset(ins);
    }
    sqlite3_finalize(ins);
    return ins ? added : -1;
}

size_t cmg_notify_devices_fitting(const struct cmg_notify_new *n, size_t *bytes_out)
{
    size_t bytes = DOC_OVERHEAD + strlen(n->type) + strlen(n->data), i = 0;

    for (; !n->all && i < n->ndevices && i < CMG_NOTIFY_MAX_DEVICES; i++) {
        size_t more = id_json_len(n->devices[i]) + 1;
        if (bytes + more > CMG_NOTIFY_MAX_LINE)
            break;
        bytes += more;
    }
    if (bytes_out)
        *bytes_out = bytes;
    return i;
}

/* The document's size, before anything is written: it must fit a control line. */
static int check_size(const struct cmg_notify_new *n, char *err, size_t errlen)
{
    size_t bytes = DOC_OVERHEAD + strlen(n->type) + strlen(n->data);

    for (size_t i = 0; !n->all && i < n->ndevices; i++)
        bytes += id_json_len(n->devices[i]) + 1;
    if (n->ndevices > CMG_NOTIFY_MAX_DEVICES || bytes > CMG_NOTIFY_MAX_LINE)
        return cmg_site_fail(err, errlen, 400,
                    "too many devices for one notification (%zu ids, %zu bytes; at most %d "
                    "ids in %u bytes): split the list, or use --all",
                    n->ndevices, bytes, CMG_NOTIFY_MAX_DEVICES, CMG_NOTIFY_MAX_LINE);
    return 0;
}

static int create_tx(struct cmg_store *st, const struct cmg_notify_new *n, int64_t now,
                     int64_t *seq, int64_t *ntargets)
{
    int64_t last = cmg_notify_last(st);

    if (last < 0)
        return -1;
    *seq = last + 1;
    *ntargets = 0;
    /* resend_of: NULL (the 'n') unless it re-sends one */
    if (done(cmg_store_prepare(st, "INSERT INTO notifications (seq, type, data, created, expires,"
                                   " all_devices, ntargets, resend_of)"
                                   " VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                               n->resend_of > 0 ? "issiiii" : "issiiin", *seq, n->type, n->data,
                               now, now + n->ttl, (int64_t)n->all, n->resend_of)) < 0)
        return -1;
    if (n->all)
        return 0;
    if ((*ntargets = insert_targets(st, *seq, n->devices, n->ndevices)) < 0)
        return -1;
    return done(cmg_store_prepare(st, "UPDATE notifications SET ntargets = ? WHERE seq = ?", "ii",
                                  *ntargets, *seq));
}

int cmg_notify_create(struct cmg_store *st, const struct cmg_notify_new *n, int64_t now,
                      int64_t *seq, int64_t *ntargets, char *err, size_t errlen)
{
    int rc = check_size(n, err, errlen);

    if (rc != 0)
        return rc;
    if (cmg_store_begin(st) < 0)
        return cmg_site_fail(err, errlen, 500, "store busy: %s", cmg_store_error(st));
    if (create_tx(st, n, now, seq, ntargets) < 0 || cmg_store_commit(st) < 0) {
        rc = cmg_site_fail(err, errlen, 500, "store: %s", cmg_store_error(st));
        cmg_store_rollback(st);
    }
    return rc;
}

/* ---- the feed ---- */

/* The oldest seq the feed serves: among the newest CMG_NOTIFY_FEED_SEQS, none made
 * more than CMG_NOTIFY_FEED_AGE_S ago (last + 1 when there is none). */
static int64_t oldest_kept(struct cmg_store *st, int64_t last, int64_t now, bool *failed)
{
    int64_t first = last > CMG_NOTIFY_FEED_SEQS ? last - CMG_NOTIFY_FEED_SEQS + 1 : 1;

    return one_int(cmg_store_prepare(st, "SELECT min(seq) FROM notifications WHERE seq >= ? AND"
                                         " created >= ?", "ii", first, now - CMG_NOTIFY_FEED_AGE_S),
                   last + 1, failed);
}

/* A live notification's document, from its row (seq, type, data, created, expires,
 * all_devices) and its targets. */
static int append_live(struct cmg_store *st, struct cmg_buf *b, const char *epoch,
                       sqlite3_stmt *row)
{
    int64_t seq = sqlite3_column_int64(row, 0);
    sqlite3_stmt *t;
    int step = SQLITE_ERROR;
    int rc = cmg_buf_printf(b, "{\"id\":\"%s-%" PRId64 "\",\"seq\":%" PRId64 ",\"type\":\"%s\","
                               "\"data\":%s,\"created\":%" PRId64 ",\"expires\":%" PRId64,
                            epoch, seq, seq, (const char *)sqlite3_column_text(row, 1),
                            (const char *)sqlite3_column_text(row, 2),
                            (int64_t)sqlite3_column_int64(row, 3),
                            (int64_t)sqlite3_column_int64(row, 4));

    if (rc < 0)
        return -1;
    if (sqlite3_column_int64(row, 5))
        return cmg_buf_appends(b, ",\"all\":true}");
    t = cmg_store_prepare(st, "SELECT device FROM notify_targets WHERE seq = ?", "i", seq);
    rc = t ? cmg_buf_appends(b, ",\"devices\":[") : -1;
    for (bool first = true; rc == 0 && (step = sqlite3_step(t)) == SQLITE_ROW; first = false)
        if ((!first && cmg_buf_append(b, ",", 1) < 0) ||
            append_json_id(b, (const char *)sqlite3_column_text(t, 0)) < 0)
            rc = -1;
    if (rc == 0 && step != SQLITE_DONE)
        rc = -1;   /* a partial list would reach the gateways: the answer fails instead */
    sqlite3_finalize(t);
    return rc == 0 ? cmg_buf_appends(b, "]}") : -1;
}

/* The documents from seq start on, within CMG_NOTIFY_FEED_BYTES (one at least); *more
 * when some are left. 0 or -1. */
static int append_docs(struct cmg_store *st, struct cmg_buf *b, const char *epoch, int64_t start,
                       int64_t now, bool *more)
{
    sqlite3_stmt *q = cmg_store_prepare(st, "SELECT seq, type, data, created, expires,"
                                            " all_devices FROM notifications WHERE seq >= ?"
                                            " ORDER BY seq", "i", start);
    size_t begin = b->len;
    int rc = q ? 0 : -1, step = SQLITE_DONE;

    *more = false;
    while (rc == 0 && (step = sqlite3_step(q)) == SQLITE_ROW) {
        size_t mark = b->len;
        int64_t seq = sqlite3_column_int64(q, 0);

        if (mark > begin)
            rc = cmg_buf_append(b, ",", 1);
        if (rc == 0 && sqlite3_column_int64(q, 4) <= now)
            rc = cmg_buf_printf(b, "{\"id\":\"%s-%" PRId64 "\",\"seq\":%" PRId64
                                   ",\"expired\":true}", epoch, seq, seq);
        else if (rc == 0)
            rc = append_live(st, b, epoch, q);
        if (rc == 0 && mark > begin && b->len - begin > CMG_NOTIFY_FEED_BYTES) {
            b->len = mark;   /* the next answer starts with this one */
            *more = true;
            break;
        }
    }
    if (rc == 0 && !*more && step != SQLITE_DONE)
        rc = -1;   /* the store failed mid-way */
    sqlite3_finalize(q);
    return rc;
}

/* Where the answer to after starts: after's next seq, or the oldest kept when after is
 * absent, of another epoch or older than the window. An after of this epoch beyond last
 * (a store restored from a backup, the connector ahead of it) is not answered from the
 * oldest, which would make the connector poll again at once for ever: it is held like
 * one at last, and then answered with nothing and the site's last, which tells the
 * connector to start again from there. */
static int64_t start_of(struct cmg_store *st, const char *epoch, const char *after_epoch,
                        int64_t after_seq, int64_t last, int64_t now, bool *failed)
{
    int64_t oldest = oldest_kept(st, last, now, failed);

    if (!*after_epoch || strcmp(after_epoch, epoch) || after_seq + 1 < oldest)
        return oldest;
    return after_seq + 1;
}

int cmg_notify_feed(struct cmg_store *st, const char *after, int64_t now, bool may_hold,
                    char **body, size_t *len, char *err, size_t errlen)
{
    char epoch[17], after_epoch[17] = "";
    int64_t after_seq = 0, last, start = 0;
    struct cmg_buf b = {0};
    bool failed = false, more = false;
    int rc = 500;

    *body = NULL;
    if (*after && cmg_notify_id_parse(after, after_epoch, &after_seq) < 0)
        return cmg_site_fail(err, errlen, 400,
                             "after: EPOCH-SEQ expected (16 lowercase hex digits, '-', "
                             "a decimal sequence number), or nothing");
    if (cmg_store_begin_read(st) < 0)
        return cmg_site_fail(err, errlen, 500, "store busy: %s", cmg_store_error(st));
    if (cmg_notify_epoch(st, epoch) < 0 || (last = cmg_notify_last(st)) < 0)
        goto out;
    start = start_of(st, epoch, after_epoch, after_seq, last, now, &failed);
    /* nothing to send to a caller that knows the epoch: held until there is */
    if (!failed && may_hold && !strcmp(after_epoch, epoch) && start > last) {
        rc = 1;
        goto out;
    }
    if (failed ||
        cmg_buf_printf(&b, "{\"epoch\":\"%s\",\"last\":%" PRId64 ",\"notifications\":[", epoch,
                       last) < 0 ||
        (start <= last && append_docs(st, &b, epoch, start, now, &more) < 0) ||
        cmg_buf_printf(&b, "],\"more\":%s}", more ? "true" : "false") < 0)
        goto out;
    *body = cmg_buf_head(&b);
    *len = b.len;
    b.data = NULL;
    rc = 0;
out:
    if (rc == 500)
        cmg_site_fail(err, errlen, 500, "store: %s", cmg_store_error(st));
    cmg_store_commit(st);
    cmg_buf_free(&b);
    return rc;
}

int cmg_notify_new_epoch(struct cmg_store *st, char old[17], char made[17])
{
    int rc = -1;

    if (cmg_store_begin(st) < 0)
        return -1;
    if (cmg_notify_epoch(st, old) == 0 &&
        done(cmg_store_prepare(st, "UPDATE notify_meta SET epoch = lower(hex(randomblob(8)))",
                               "")) == 0 &&
        cmg_notify_epoch(st, made) == 0 && strcmp(old, made) != 0)
        rc = cmg_store_commit(st);
    if (rc < 0)
        cmg_store_rollback(st);
    return rc;
}

/* ---- counts ---- */

/* The targets of a notification as a table t(device, alias): its list, or for one to
 * all devices, those the site knew when it was made (?1 its seq, ?2 its created time)
 * that could receive it: registered devices not blocked (alias: the same device on its
 * certificate, cert:<thumbprint>, so it counts once), device certificates neither
 * revoked, replaced nor expired then (other than a registered device's), and the
 * devices seen on a channel that are none of those (nor a registered device under
 * either name). */
#define TARGETS_CTE                                                                           \
    "WITH n AS (SELECT all_devices AS all_ FROM notifications WHERE seq = ?1),"               \
    " t(device, alias) AS (SELECT device, NULL FROM notify_targets WHERE seq = ?1 AND"        \
    " NOT (SELECT all_ FROM n)"                                                               \
    " UNION SELECT id, 'cert:' || thumbprint FROM devices WHERE registered <= ?2 AND"         \
    " NOT blocked AND (SELECT all_ FROM n)"                                                   \
    " UNION SELECT 'cert:' || c.thumbprint, NULL FROM certs c WHERE c.thumbprint IS NOT NULL" \
    " AND (c.kind IS NULL OR c.kind = 'device') AND c.revoked IS NULL AND c.replaced IS NULL" \
    " AND c.issued <= ?2 AND c.expires > ?2 AND (SELECT all_ FROM n) AND NOT EXISTS"          \
    " (SELECT 1 FROM devices d WHERE d.thumbprint = c.thumbprint)"                            \
    " UNION SELECT s.device, NULL FROM device_seen s WHERE s.first_seen <= ?2 AND"            \
    " (SELECT all_ FROM n) AND NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = s.device)"    \
    " AND NOT (s.device LIKE 'cert:%' AND (EXISTS (SELECT 1 FROM devices d WHERE"             \
    " d.thumbprint = substr(s.device, 6)) OR EXISTS (SELECT 1 FROM certs c WHERE"             \
    " c.thumbprint = substr(s.device, 6) AND (c.revoked IS NOT NULL OR c.replaced IS NOT"     \
    " NULL OR c.expires <= ?2))))) "

/* A target of t has a delivery of ?1 under its name or its alias. */
#define DELIVERED_SQL                                                                         \
    "(EXISTS (SELECT 1 FROM notify_delivered d WHERE d.seq = ?1 AND d.device = t.device) OR"  \
    " (t.alias IS NOT NULL AND EXISTS (SELECT 1 FROM notify_delivered d WHERE d.seq = ?1 AND" \
    " d.device = t.alias)))"

int cmg_notify_status(struct cmg_store *st, int64_t seq, int64_t now, cJSON **out)
{
    sqlite3_stmt *n = cmg_store_prepare(st, "SELECT type, created, expires, resend_of,"
                                            " final_targets, final_delivered FROM"
                                            " notifications WHERE seq = ?", "i", seq);
    sqlite3_stmt *c = NULL;
    char epoch[17], id[CMG_NOTIFY_ID_MAX];
    int rc = -1, step = n ? sqlite3_step(n) : SQLITE_ERROR;
    int64_t created, expires, targets, delivered;

    *out = NULL;
    if (step == SQLITE_DONE)
        rc = 1;
    if (step != SQLITE_ROW || cmg_notify_epoch(st, epoch) < 0)
        goto out;
    created = sqlite3_column_int64(n, 1);
    expires = sqlite3_column_int64(n, 2);
    if (sqlite3_column_type(n, 4) != SQLITE_NULL) {   /* counted once, when it was over */
        targets = sqlite3_column_int64(n, 4);
        delivered = sqlite3_column_int64(n, 5);
    } else {
        c = cmg_store_prepare(st, TARGETS_CTE "SELECT count(*), count(CASE WHEN " DELIVERED_SQL
                                  " THEN 1 END) FROM t", "ii", seq, created);
        if (!c || sqlite3_step(c) != SQLITE_ROW)
            goto out;
        targets = sqlite3_column_int64(c, 0);
        delivered = sqlite3_column_int64(c, 1);
        if (now >= expires + CMG_NOTIFY_FINAL_AFTER_S)   /* no delivery can come any more */
            done(cmg_store_prepare(st, "UPDATE notifications SET final_targets = ?,"
                                       " final_delivered = ? WHERE seq = ?", "iii", targets,
                                   delivered, seq));
    }
    snprintf(id, sizeof(id), "%s-%" PRId64, epoch, seq);
    *out = cJSON_CreateObject();
    cJSON_AddStringToObject(*out, "id", id);
    cJSON_AddStringToObject(*out, "type", (const char *)sqlite3_column_text(n, 0));
    cJSON_AddNumberToObject(*out, "created", (double)created);
    cJSON_AddNumberToObject(*out, "expires", (double)expires);
    cJSON_AddNumberToObject(*out, "targets", (double)targets);
    cJSON_AddNumberToObject(*out, "delivered", (double)delivered);
    cJSON_AddNumberToObject(*out, "waiting", (double)(now < expires ? targets - delivered : 0));
    cJSON_AddNumberToObject(*out, "expired", (double)(now < expires ? 0 : targets - delivered));
    if (sqlite3_column_type(n, 3) != SQLITE_NULL) {
        snprintf(id, sizeof(id), "%s-%" PRId64, epoch, (int64_t)sqlite3_column_int64(n, 3));
        cJSON_AddStringToObject(*out, "resend_of", id);
    }
    rc = 0;
out:
    sqlite3_finalize(n);
    sqlite3_finalize(c);
    return rc;
}

cJSON *cmg_notify_missed(struct cmg_store *st, int64_t seq)
{
    bool failed = false;
    int64_t created = one_int(cmg_store_prepare(st, "SELECT created FROM notifications WHERE "
                                                    "seq = ?", "i", seq), 0, &failed);
    sqlite3_stmt *q = failed ? NULL
                             : cmg_store_prepare(st, TARGETS_CTE "SELECT device FROM t WHERE"
                                                     " NOT " DELIVERED_SQL " ORDER BY device",
                                                 "ii", seq, created);
    cJSON *ids = q ? cJSON_CreateArray() : NULL;
    int step;

    while (ids && (step = sqlite3_step(q)) == SQLITE_ROW)
        cJSON_AddItemToArray(ids, cJSON_CreateString((const char *)sqlite3_column_text(q, 0)));
    if (ids && step != SQLITE_DONE) {
        cJSON_Delete(ids);
        ids = NULL;
    }
    sqlite3_finalize(q);
    return ids;
}

/* ---- devices and their channels ---- */

/* Every device, registered or seen only on a channel, with its channel rows, in one
 * set-based query (the dashboard polls it: nothing per device is recomputed). ?1 now,
 * ?2 the default report interval, ?3/?4/?5 the cursor (group, registered, id; group 0
 * registered devices by registration, 1 those seen only on a channel, by id), ?6 the
 * page size. An open channel counts while its instance was heard of (any report)
 * within 2 of its report intervals. */
#define OPEN_SQL(s, h)                                                                        \
    s ".last_seen, " s ".open AND coalesce(" h ".at >= ?1 - 2 * (CASE WHEN " h ".iv > 0 THEN " \
    h ".iv ELSE ?2 END), 0), " h ".at"
#define DEVICES_SQL                                                                           \
    "WITH heard(instance, at, iv) AS MATERIALIZED (SELECT instance, max(at), max(iv) FROM"    \
    " (SELECT instance, received AS at, interval AS iv FROM gateways UNION ALL"               \
    " SELECT instance, received, 0 FROM notify_boots) GROUP BY instance),"                    \
    " rows AS (SELECT 0 AS grp, d.registered AS reg, d.id AS id, d.name, d.thumbprint,"       \
    " d.bulk_guid, d.token_issued, d.token_expires, d.blocked, " OPEN_SQL("s1", "h1") ", "    \
    OPEN_SQL("s2", "h2") " FROM devices d"                                                    \
    " LEFT JOIN device_seen s1 ON s1.device = d.id"                                           \
    " LEFT JOIN heard h1 ON h1.instance = s1.instance"                                        \
    " LEFT JOIN device_seen s2 ON d.thumbprint IS NOT NULL AND s2.device = 'cert:' ||"        \
    " d.thumbprint LEFT JOIN heard h2 ON h2.instance = s2.instance"                           \
    " UNION ALL SELECT 1, 0, s.device, NULL, NULL, NULL, NULL, NULL, 0, " OPEN_SQL("s", "h")  \
    ", NULL, NULL, NULL FROM device_seen s LEFT JOIN heard h ON h.instance = s.instance"      \
    " WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = s.device)"                       \
    " AND NOT EXISTS (SELECT 1 FROM devices d WHERE s.device LIKE 'cert:%'"                   \
    " AND d.thumbprint = substr(s.device, 6)))"                                               \
    " SELECT * FROM rows WHERE (grp, reg, id) > (?3, ?4, ?5) ORDER BY grp, reg, id LIMIT ?6"

/* Column of the first channel row in DEVICES_SQL's rows (3 columns per row). */
#define SEEN_COL 9

struct seen {
    bool found, open;
    int64_t last_seen;
};

/* The channel row at column col of q (last_seen, open, heard at), merged into *s (the
 * newer wins). */
static void seen_of(sqlite3_stmt *q, int col, struct seen *s)
{
    int64_t last;
    bool open;

    if (sqlite3_column_type(q, col) == SQLITE_NULL)
        return;
    last = sqlite3_column_int64(q, col);
    open = sqlite3_column_int64(q, col + 1) != 0;
    if (open && sqlite3_column_int64(q, col + 2) > last)
        last = sqlite3_column_int64(q, col + 2);   /* heard of with its instance */
    if (!s->found || last > s->last_seen) {
        s->last_seen = last;
        s->open = open;
    }
    s->found = true;
}

static void add_seen(cJSON *row, const struct seen *s)
{
    if (s->found)
        cJSON_AddNumberToObject(row, "last_seen", (double)s->last_seen);
    else
        cJSON_AddNullToObject(row, "last_seen");
    cJSON_AddStringToObject(row, "channel", !s->found ? "-" : s->open ? "open" : "closed");
}

static void add_text_or_null(cJSON *row, const char *name, sqlite3_stmt *q, int col)
{
    if (sqlite3_column_type(q, col) == SQLITE_NULL)
        cJSON_AddNullToObject(row, name);
    else if (sqlite3_column_type(q, col) == SQLITE_INTEGER)
        cJSON_AddNumberToObject(row, name, (double)sqlite3_column_int64(q, col));
    else
        cJSON_AddStringToObject(row, name, (const char *)sqlite3_column_text(q, col));
}

/* One row of DEVICES_SQL as device.list shows it. */
static cJSON *device_row(sqlite3_stmt *q)
{
    cJSON *row = cJSON_CreateObject();
    struct seen s = {0};
    bool registered = sqlite3_column_int64(q, 0) == 0;

    add_text_or_null(row, "id", q, 2);
    add_text_or_null(row, "name", q, 3);
    if (registered) {
        add_text_or_null(row, "thumbprint", q, 4);
        add_text_or_null(row, "bulk_guid", q, 5);
        add_text_or_null(row, "registered", q, 1);
        add_text_or_null(row, "token_issued", q, 6);
        add_text_or_null(row, "token_expires", q, 7);
        add_text_or_null(row, "blocked", q, 8);
    } else {
        cJSON_AddFalseToObject(row, "blocked");
    }
    seen_of(q, SEEN_COL, &s);
    seen_of(q, SEEN_COL + 3, &s);   /* the same device on its certificate */
    add_seen(row, &s);
    return row;
}

/* The cursor of after: (group, registered) of that device, so the next page starts
 * right after it. */
static void cursor_of(struct cmg_store *st, const char *after, int64_t *grp, int64_t *reg)
{
    bool failed = false;

    *grp = -1;
    *reg = 0;
    if (!after)
        return;
    *reg = one_int(cmg_store_prepare(st, "SELECT registered FROM devices WHERE id = ?", "s",
                                     after), -1, &failed);
    *grp = *reg < 0 ? 1 : 0;
    if (*reg < 0)
        *reg = 0;
}

cJSON *cmg_notify_devices_json(struct cmg_store *st, int64_t now, int64_t report_interval_s,
                               const char *after, int64_t limit)
{
    int64_t grp, reg;
    sqlite3_stmt *q;
    cJSON *list = NULL;
    int step = SQLITE_ERROR;

    cursor_of(st, after, &grp, &reg);
    q = cmg_store_prepare(st, DEVICES_SQL, "iiiisi", now, report_interval_s, grp, reg,
                          after ? after : "", limit > 0 ? limit : (int64_t)-1);
    list = q ? cJSON_CreateArray() : NULL;
    while (list && (step = sqlite3_step(q)) == SQLITE_ROW)
        cJSON_AddItemToArray(list, device_row(q));
    if (list && step != SQLITE_DONE) {
        cJSON_Delete(list);
        list = NULL;
    }
    sqlite3_finalize(q);
    return list;
}

/* ---- retention ---- */

/* One expired notification without its final counts gets them (a full count, so one
 * per call). 0, or -1. */
static int finalize_one(struct cmg_store *st, int64_t now)
{
    bool failed = false;
    int64_t seq = one_int(cmg_store_prepare(st, "SELECT min(seq) FROM notifications WHERE"
                                                " final_targets IS NULL AND expires <= ?", "i",
                                            now - CMG_NOTIFY_FINAL_AFTER_S), 0, &failed);
    cJSON *counts = NULL;
    int rc = failed ? -1 : 0;

    if (rc == 0 && seq > 0 && cmg_notify_status(st, seq, now, &counts) < 0)
        rc = -1;
    cJSON_Delete(counts);
    return rc;
}

/* Deletes at most CMG_NOTIFY_PRUNE_BATCH rows of table for the counted notifications
 * made before old: 1 some were left, 0 none, -1. */
static int prune_rows(struct cmg_store *st, const char *table, int64_t old)
{
    char sql[400];
    sqlite3_stmt *q;
    int rc;

    snprintf(sql, sizeof(sql), "DELETE FROM %s WHERE (seq, device) IN (SELECT seq, device FROM"
             " %s WHERE seq IN (SELECT seq FROM notifications WHERE created < ? AND"
             " final_targets IS NOT NULL) LIMIT %d)", table, table, CMG_NOTIFY_PRUNE_BATCH);
    q = cmg_store_prepare(st, sql, "i", old);
    rc = q ? sqlite3_step(q) : SQLITE_ERROR;
    sqlite3_finalize(q);
    if (rc != SQLITE_DONE)
        return -1;
    return sqlite3_changes(cmg_store_db(st)) == CMG_NOTIFY_PRUNE_BATCH ? 1 : 0;
}

/* Notifications, channel rows and report marks older than retention_s. */
static int prune_old(struct cmg_store *st, int64_t now, int64_t retention_s)
{
    int64_t old = now - retention_s;

    if (done(cmg_store_prepare(st, "DELETE FROM notifications WHERE created < ? AND seq <"
                                   " (SELECT max(seq) FROM notifications)", "i", old)) < 0 ||
        done(cmg_store_prepare(st, "DELETE FROM notify_targets WHERE seq <"
                                   " (SELECT min(seq) FROM notifications)", "")) < 0 ||
        done(cmg_store_prepare(st, "DELETE FROM notify_delivered WHERE seq <"
                                   " (SELECT min(seq) FROM notifications)", "")) < 0 ||
        /* an open channel counts only while its instance reports */
        done(cmg_store_prepare(st, "DELETE FROM device_seen WHERE last_seen < ?1 AND (NOT open"
                                   " OR instance NOT IN (SELECT instance FROM notify_boots"
                                   " WHERE received >= ?1))", "i", old)) < 0 ||
        done(cmg_store_prepare(st, "DELETE FROM notify_boots WHERE received < ?", "i", old)) < 0)
        return -1;
    return 0;
}

int cmg_notify_prune(struct cmg_store *st, int64_t now, int64_t rows_retention_s,
                     int64_t retention_s)
{
    int rc = -1, more = 0;

    if (cmg_store_begin(st) < 0)
        return -1;
    if (finalize_one(st, now) == 0 &&
        (more = prune_rows(st, "notify_targets", now - rows_retention_s)) >= 0 &&
        (more |= prune_rows(st, "notify_delivered", now - rows_retention_s)) >= 0 &&
        (more > 0 || prune_old(st, now, retention_s) == 0))
        rc = cmg_store_commit(st);
    if (rc < 0) {
        cmg_store_rollback(st);
        return -1;
    }
    /* more to do: rows left, or notifications left to count */
    return more > 0 || one_int(cmg_store_prepare(st, "SELECT count(*) FROM notifications WHERE"
                                                     " final_targets IS NULL AND expires <= ?",
                                                 "i", now - CMG_NOTIFY_FINAL_AFTER_S), 0,
                               NULL) > 0 ? 1 : 0;
}
