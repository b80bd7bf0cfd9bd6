/* Client notifications in the site's store and the connectors' notify feed; see
 * notify.h. The reports of the gateways are notify_report.c's. */
#include "site/notify.h"

#include "core/buf.h"
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
    const char *s = id + 17;
    int64_t v = 0;

    for (int i = 0; i < 16; i++)
        if (!isdigit((unsigned char)id[i]) && !(id[i] >= 'a' && id[i] <= 'f'))
            return -1;
    if (id[16] != '-' || !isdigit((unsigned char)*s) || (*s == '0' && s[1]) || strlen(s) > 18)
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

static int fail(char *err, size_t errlen, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(char *err, size_t errlen, int status, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return status;
}

/* The document's size, before anything is written: it must fit a control line. */
static int check_size(const struct cmg_notify_new *n, char *err, size_t errlen)
{
    size_t bytes = DOC_OVERHEAD + strlen(n->type) + strlen(n->data);

    for (size_t i = 0; !n->all && i < n->ndevices; i++)
        bytes += id_json_len(n->devices[i]) + 1;
    if (n->ndevices > CMG_NOTIFY_MAX_DEVICES || bytes > CMG_NOTIFY_MAX_LINE)
        return fail(err, errlen, 400,
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
        return fail(err, errlen, 500, "store busy: %s", cmg_store_error(st));
    if (create_tx(st, n, now, seq, ntargets) < 0 || cmg_store_commit(st) < 0) {
        rc = fail(err, errlen, 500, "store: %s", cmg_store_error(st));
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
    for (bool first = true; rc == 0 && sqlite3_step(t) == SQLITE_ROW; first = false)
        if ((!first && cmg_buf_append(b, ",", 1) < 0) ||
            append_json_id(b, (const char *)sqlite3_column_text(t, 0)) < 0)
            rc = -1;
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
 * absent, of another epoch, older than the window or beyond last. */
static int64_t start_of(struct cmg_store *st, const char *epoch, const char *after_epoch,
                        int64_t after_seq, int64_t last, int64_t now, bool *failed)
{
    int64_t oldest = oldest_kept(st, last, now, failed);

    if (!*after_epoch || strcmp(after_epoch, epoch) || after_seq > last || after_seq + 1 < oldest)
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
        return fail(err, errlen, 400, "after: EPOCH-SEQ expected (16 lowercase hex digits, '-', "
                                      "a decimal sequence number), or nothing");
    if (cmg_store_begin_read(st) < 0)
        return fail(err, errlen, 500, "store busy: %s", cmg_store_error(st));
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
        fail(err, errlen, 500, "store: %s", cmg_store_error(st));
    cmg_store_commit(st);
    cmg_buf_free(&b);
    return rc;
}

/* ---- counts ---- */

/* The targets of a notification as a table t(device): its list, or for one to all
 * devices, those the site knew when it was made (?1 its seq, ?2 its created time). */
#define TARGETS_CTE                                                                           \
    "WITH n AS (SELECT all_devices AS all_ FROM notifications WHERE seq = ?1),"               \
    " t(device) AS (SELECT device FROM notify_targets WHERE seq = ?1 AND NOT (SELECT all_ FROM n)" \
    " UNION SELECT id FROM devices WHERE registered <= ?2 AND (SELECT all_ FROM n)"            \
    " UNION SELECT 'cert:' || thumbprint FROM certs WHERE thumbprint IS NOT NULL AND"          \
    " (kind IS NULL OR kind = 'device') AND issued <= ?2 AND (SELECT all_ FROM n)"             \
    " UNION SELECT device FROM device_seen WHERE first_seen <= ?2 AND (SELECT all_ FROM n)) "

int cmg_notify_status(struct cmg_store *st, int64_t seq, int64_t now, cJSON **out)
{
    sqlite3_stmt *n = cmg_store_prepare(st, "SELECT type, created, expires, resend_of FROM "
                                            "notifications WHERE seq = ?", "i", seq);
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
    c = cmg_store_prepare(st, TARGETS_CTE "SELECT count(*), count(d.device) FROM t LEFT JOIN"
                              " notify_delivered d ON d.seq = ?1 AND d.device = t.device",
                          "ii", seq, created);
    if (!c || sqlite3_step(c) != SQLITE_ROW)
        goto out;
    targets = sqlite3_column_int64(c, 0);
    delivered = sqlite3_column_int64(c, 1);
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
                             : cmg_store_prepare(st, TARGETS_CTE "SELECT device FROM t WHERE NOT"
                                                     " EXISTS (SELECT 1 FROM notify_delivered d"
                                                     " WHERE d.seq = ?1 AND d.device = t.device)"
                                                     " ORDER BY device", "ii", seq, created);
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

/* A device's channel row: ?1 the device, ?2 now, ?3 the default report interval. An
 * open channel counts while its instance was heard of (any report) within 2 of its
 * report intervals. */
#define SEEN_SQL                                                                              \
    "WITH heard(instance, at, iv) AS (SELECT instance, max(at), max(iv) FROM"                 \
    " (SELECT instance, received AS at, interval AS iv FROM gateways UNION ALL"               \
    " SELECT instance, received, 0 FROM notify_boots) GROUP BY instance)"                     \
    " SELECT s.last_seen, s.open AND coalesce(h.at >= ?2 - 2 * (CASE WHEN h.iv > 0 THEN h.iv" \
    " ELSE ?3 END), 0), h.at FROM device_seen s LEFT JOIN heard h ON h.instance = s.instance" \
    " WHERE s.device = ?1"

struct seen {
    bool found, open;
    int64_t last_seen;
};

/* The channel row of id, merged into *s (the newer wins). */
static void seen_of(sqlite3_stmt *q, const char *id, struct seen *s)
{
    sqlite3_bind_text(q, 1, id, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(q) == SQLITE_ROW) {
        int64_t last = sqlite3_column_int64(q, 0);
        bool open = sqlite3_column_int64(q, 1) != 0;
        if (open && sqlite3_column_int64(q, 2) > last)
            last = sqlite3_column_int64(q, 2);   /* heard of with its instance */
        if (!s->found || last > s->last_seen) {
            s->last_seen = last;
            s->open = open;
        }
        s->found = true;
    }
    sqlite3_reset(q);
}

static void add_seen(cJSON *row, const struct seen *s)
{
    if (s->found)
        cJSON_AddNumberToObject(row, "last_seen", (double)s->last_seen);
    else
        cJSON_AddNullToObject(row, "last_seen");
    cJSON_AddStringToObject(row, "channel", !s->found ? "-" : s->open ? "open" : "closed");
}

/* Devices seen on a channel only (certificate and OIDC devices), appended to list. */
static int add_channel_only(struct cmg_store *st, cJSON *list, sqlite3_stmt *seen)
{
    sqlite3_stmt *q = cmg_store_prepare(st, "SELECT device FROM device_seen WHERE device NOT IN"
                                            " (SELECT id FROM devices) AND device NOT IN (SELECT"
                                            " 'cert:' || thumbprint FROM devices) ORDER BY device",
                                        "");
    int step = SQLITE_ERROR;

    while (q && (step = sqlite3_step(q)) == SQLITE_ROW) {
        const char *id = (const char *)sqlite3_column_text(q, 0);
        cJSON *row = cJSON_CreateObject();
        struct seen s = {0};

        cJSON_AddStringToObject(row, "id", id);
        cJSON_AddNullToObject(row, "name");
        cJSON_AddFalseToObject(row, "blocked");
        seen_of(seen, id, &s);
        add_seen(row, &s);
        cJSON_AddItemToArray(list, row);
    }
    sqlite3_finalize(q);
    return step == SQLITE_DONE ? 0 : -1;
}

cJSON *cmg_notify_devices_json(struct cmg_store *st, int64_t now, int64_t report_interval_s)
{
    cJSON *list = cmg_store_devices_json(st), *row;
    sqlite3_stmt *seen = list ? cmg_store_prepare(st, SEEN_SQL, "sii", "", now, report_interval_s)
                              : NULL;
    cJSON *rows = seen ? list : NULL;
    char cert_id[80];

    cJSON_ArrayForEach(row, rows) {
        const char *thumb = cJSON_GetStringValue(cJSON_GetObjectItem(row, "thumbprint"));
        struct seen s = {0};

        seen_of(seen, cJSON_GetStringValue(cJSON_GetObjectItem(row, "id")), &s);
        snprintf(cert_id, sizeof(cert_id), "cert:%s", thumb ? thumb : "");
        if (thumb)   /* the same device on its certificate */
            seen_of(seen, cert_id, &s);
        add_seen(row, &s);
    }
    if (list && (!seen || add_channel_only(st, list, seen) < 0)) {
        cJSON_Delete(list);
        list = NULL;
    }
    sqlite3_finalize(seen);
    return list;
}

/* ---- retention ---- */

int cmg_notify_prune(struct cmg_store *st, int64_t now, int64_t retention_s)
{
    int64_t old = now - retention_s;
    int rc = -1;

    if (cmg_store_begin(st) < 0)
        return -1;
    if (done(cmg_store_prepare(st, "DELETE FROM notifications WHERE created < ? AND seq <"
                                   " (SELECT max(seq) FROM notifications)", "i", old)) == 0 &&
        done(cmg_store_prepare(st, "DELETE FROM notify_targets WHERE seq <"
                                   " (SELECT min(seq) FROM notifications)", "")) == 0 &&
        done(cmg_store_prepare(st, "DELETE FROM notify_delivered WHERE seq <"
                                   " (SELECT min(seq) FROM notifications)", "")) == 0 &&
        /* an open channel counts only while its instance reports */
        done(cmg_store_prepare(st, "DELETE FROM device_seen WHERE last_seen < ?1 AND (NOT open"
                                   " OR instance NOT IN (SELECT instance FROM notify_boots"
                                   " WHERE received >= ?1))", "i", old)) == 0 &&
        done(cmg_store_prepare(st, "DELETE FROM notify_boots WHERE received < ?", "i", old)) == 0)
        rc = cmg_store_commit(st);
    if (rc < 0)
        cmg_store_rollback(st);
    return rc;
}
