/* The gateways' notify reports (contract: who got which notification, which channels
 * opened and closed), as connectors relay them to POST /v1/connector/notify-report:
 * checked whole before anything is kept, then kept in one transaction, once per
 * (instance, boot, seq). */
#include "site/notify.h"

#include "core/log.h"
#include "core/metrics.h"
#include "site/reports.h"
#include "site/store_sql.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define MAX_COUNT 9007199254740992.0   /* 2^53 */
#define MAX_BOOTS 4096                 /* (instance, boot) marks kept at most */

/* ---- checking ---- */

static const cJSON *get(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

static bool count_ok(const cJSON *v, double min)
{
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble >= min &&
           v->valuedouble <= MAX_COUNT && v->valuedouble == floor(v->valuedouble);
}

static bool instance_ok(const cJSON *v)
{
    size_t n = 0;

    if (!cJSON_IsString(v))
        return false;
    for (; v->valuestring[n]; n++)
        if (n == CMG_REPORT_MAX_STR || (unsigned char)v->valuestring[n] < 0x20 ||
            (unsigned char)v->valuestring[n] > 0x7e)
            return false;
    return n > 0;
}

static bool boot_ok(const cJSON *v)
{
    size_t n = 0;

    if (!cJSON_IsString(v))
        return false;
    for (; v->valuestring[n]; n++)
        if (!strchr("0123456789abcdef", v->valuestring[n]))
            return false;
    return n == 16;
}

/* An array of strings (device ids: one that is not a device id is skipped when the
 * report is kept, not a reason to refuse the whole report), counted into *ids. */
static bool id_list_ok(const cJSON *a, size_t *ids)
{
    const cJSON *e;

    if (!cJSON_IsArray(a))
        return false;
    cJSON_ArrayForEach(e, a) {
        if (++*ids > CMG_NOTIFY_REPORT_MAX_IDS || !cJSON_IsString(e))
            return false;
    }
    return true;
}

/* A device id of a report entry; one that is not is counted in *skipped. */
static bool device_ok(const cJSON *v, int64_t *skipped)
{
    bool ok = cmg_notify_device_ok(v->valuestring);

    if (!ok)
        ++*skipped;
    return ok;
}

static const char *check_delivered(const cJSON *d, size_t *ids)
{
    const cJSON *e;

    if (!d)
        return NULL;
    if (!cJSON_IsObject(d))
        return "delivered: an object of \"EPOCH-SEQ\": [device ids] expected";
    cJSON_ArrayForEach(e, d) {
        if (++*ids > CMG_NOTIFY_REPORT_MAX_IDS)
            return "delivered: too many notifications and devices for one report";
        if (!id_list_ok(e, ids))
            return "delivered: lists of device ids (strings) expected (65536 ids in all at "
                   "most)";
    }
    return NULL;
}

static const char *check_closed(const cJSON *c, size_t *ids)
{
    const cJSON *e;

    if (!c)
        return NULL;
    if (!cJSON_IsArray(c))
        return "closed: an array of [device id, unix time] expected";
    cJSON_ArrayForEach(e, c) {
        if (++*ids > CMG_NOTIFY_REPORT_MAX_IDS || !cJSON_IsArray(e) ||
            cJSON_GetArraySize(e) != 2 || !cJSON_IsString(cJSON_GetArrayItem(e, 0)) ||
            !count_ok(cJSON_GetArrayItem(e, 1), 0))
            return "closed: an array of [device id, unix time] expected (65536 ids in all "
                   "at most)";
    }
    return NULL;
}

static const char *check_report(const cJSON *doc)
{
    const char *bad;
    size_t ids = 0;

    if (!instance_ok(get(doc, "instance")))
        return "instance: 1..256 printable ASCII characters expected";
    if (!boot_ok(get(doc, "boot")))
        return "boot: 16 lowercase hex digits expected";
    if (!count_ok(get(doc, "seq"), 1))
        return "seq: a whole number from 1 to 2^53 expected";
    if (!count_ok(get(doc, "time"), 0))
        return "time: a unix time expected";
    if ((bad = check_delivered(get(doc, "delivered"), &ids)))
        return bad;
    if (get(doc, "opened") && !id_list_ok(get(doc, "opened"), &ids))
        return "opened: an array of device ids (strings) expected (65536 ids in all at most)";
    return check_closed(get(doc, "closed"), &ids);
}

cJSON *cmg_notify_report_parse(const char *body, size_t len, char *err, size_t errlen)
{
    cJSON *doc = len <= CMG_REPORT_MAX_BODY ? cmg_report_json(body, len) : NULL;
    const char *bad = NULL;

    if (!cJSON_IsObject(doc))
        bad = "a JSON object of at most 1 MiB expected";
    else
        bad = check_report(doc);
    if (bad) {
        snprintf(err, errlen, "%s", bad);
        cJSON_Delete(doc);
        doc = NULL;
    }
    return doc;
}

/* ---- keeping ---- */

static int step_reset(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);

    sqlite3_reset(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

static int done(sqlite3_stmt *st)
{
    int rc = st ? sqlite3_step(st) : SQLITE_ERROR;

    sqlite3_finalize(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

/* The boot's newest report: 1 seq was kept already (a replay), 0 marked now (*new_boot
 * if the boot is new), -1. */
static int mark(struct cmg_store *st, const char *instance, const char *boot, int64_t seq,
                int64_t now, bool *new_boot)
{
    sqlite3_stmt *q = cmg_store_prepare(st, "SELECT seq FROM notify_boots WHERE instance = ? AND"
                                            " boot = ?", "ss", instance, boot);
    int step = q ? sqlite3_step(q) : SQLITE_ERROR;
    int64_t kept = step == SQLITE_ROW ? sqlite3_column_int64(q, 0) : 0;

    sqlite3_finalize(q);
    if (step != SQLITE_ROW && step != SQLITE_DONE)
        return -1;
    if (step == SQLITE_ROW && seq <= kept)
        return 1;
    *new_boot = step == SQLITE_DONE;
    if (*new_boot &&   /* forged boots cannot grow the table: the oldest mark goes */
        done(cmg_store_prepare(st, "DELETE FROM notify_boots WHERE (instance, boot) IN"
                                   " (SELECT instance, boot FROM notify_boots"
                                   " ORDER BY received LIMIT max(0, (SELECT count(*) FROM"
                                   " notify_boots) - ? + 1))", "i", (int64_t)MAX_BOOTS)) < 0)
        return -1;
    return done(cmg_store_prepare(st, "INSERT INTO notify_boots (instance, boot, seq, received)"
                                      " VALUES (?1, ?2, ?3, ?4) ON CONFLICT (instance, boot) DO"
                                      " UPDATE SET seq = ?3, received = ?4", "ssii", instance,
                                  boot, seq, now));
}

/* A delivery is kept only for a target of the notification: one of its list, or for one
 * to all devices, a device the site knows (registered, or with a channel row: the
 * report's own opened/closed are kept first). ?1 seq, ?2 device, ?3 now, ?4 instance. */
#define DELIVERY_SQL                                                                          \
    "INSERT OR IGNORE INTO notify_delivered (seq, device, at, instance) SELECT ?1, ?2, ?3, ?4" \
    " WHERE EXISTS (SELECT 1 FROM notify_targets WHERE seq = ?1 AND device = ?2) OR"          \
    " (EXISTS (SELECT 1 FROM notifications WHERE seq = ?1 AND all_devices) AND"               \
    " (EXISTS (SELECT 1 FROM device_seen WHERE device = ?2) OR"                               \
    " EXISTS (SELECT 1 FROM devices WHERE id = ?2)))"

/* A delivery kept after seq's counts were made final (a gateway that could not report
 * for a while sends it later) is added to them, so that status and --missed agree. */
static int count_late(struct cmg_store *st, int64_t seq)
{
    return done(cmg_store_prepare(st, "UPDATE notifications SET final_delivered ="
                                      " min(final_delivered + 1, final_targets) WHERE seq = ?"
                                      " AND final_delivered IS NOT NULL", "i", seq));
}

/* The deliveries of this site's epoch to the targets of notifications it has; others
 * are ignored (a gateway's report may hold deliveries of a store made anew), counted
 * in *ignored. */
static int keep_delivered(struct cmg_store *st, const cJSON *d, const char *instance,
                          int64_t now, int64_t *ignored, int64_t *skipped)
{
    sqlite3_stmt *ins = cmg_store_prepare(st, DELIVERY_SQL, "iiis", (int64_t)0, (int64_t)0, now,
                                          instance);
    sqlite3 *db = cmg_store_db(st);
    int64_t last = cmg_notify_last(st), seq;
    char mine[17], epoch[17];
    int rc = ins && last >= 0 && cmg_notify_epoch(st, mine) == 0 ? 0 : -1;
    const cJSON *e, *dev, *items = rc == 0 ? d : NULL;

    cJSON_ArrayForEach(e, items) {
        if (cmg_notify_id_parse(e->string, epoch, &seq) < 0 || seq < 1) {
            *skipped += 1 + cJSON_GetArraySize(e);   /* not a notification id */
            continue;
        }
        if (strcmp(epoch, mine) || seq > last) {
            *ignored += cJSON_GetArraySize(e);
            continue;
        }
        sqlite3_bind_int64(ins, 1, seq);
        cJSON_ArrayForEach(dev, e) {
            if (!device_ok(dev, skipped))
                continue;
            sqlite3_bind_text(ins, 2, dev->valuestring, -1, SQLITE_STATIC);
            if (step_reset(ins) < 0) {
                rc = -1;
                break;
            }
            if (sqlite3_changes(db) == 0)
                ++*ignored;   /* not a target, or kept already */
            else if (count_late(st, seq) < 0) {
                rc = -1;
                break;
            }
        }
    }
    sqlite3_finalize(ins);
    return rc;
}

/* Channel rows of devices the site does not know (not registered, no certificate it
 * issued) beyond CMG_NOTIFY_MAX_UNKNOWN: the oldest go, closed ones first, so forged ids
 * cannot grow the store. The rows of known devices are never counted nor dropped. */
static int cap_unknown(struct cmg_store *st)
{
    sqlite3_stmt *q = cmg_store_prepare(
        st, "SELECT (SELECT count(*) FROM device_seen) - (SELECT count(*) FROM devices) -"
            " (SELECT count(*) FROM certs WHERE thumbprint IS NOT NULL) - ?", "i",
        (int64_t)CMG_NOTIFY_MAX_UNKNOWN);
    int64_t excess = q && sqlite3_step(q) == SQLITE_ROW ? sqlite3_column_int64(q, 0) : -1;

    sqlite3_finalize(q);
    if (excess <= 0)
        return q ? 0 : -1;   /* under the cap (an estimate from above: known rows may lack) */
    /* real OIDC or external-CA devices count as unknown too: a fleet of them past the cap
     * loses its oldest channel rows, which this line lets an operator see */
    cmg_warn("notify: %" PRId64 " channel row(s) of devices this site does not know (not "
             "registered, no certificate it issued) evicted, past the cap of %d; OIDC and "
             "external-CA devices count here", excess, CMG_NOTIFY_MAX_UNKNOWN);
    return done(cmg_store_prepare(
        st, "DELETE FROM device_seen WHERE device IN (SELECT device FROM device_seen s"
            " WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = s.device) AND"
            " NOT (s.device LIKE 'cert:%' AND (EXISTS (SELECT 1 FROM devices d WHERE"
            " d.thumbprint = substr(s.device, 6)) OR EXISTS (SELECT 1 FROM certs c WHERE"
            " c.thumbprint = substr(s.device, 6))))"
            " ORDER BY open, last_seen LIMIT ?)", "i", excess));
}

/* Closed channels: closed only if this instance holds the device's channel (it may
 * have moved to another); the last time seen moves on either way. */
static int keep_closed(struct cmg_store *st, const cJSON *c, const char *instance,
                       const char *boot, int64_t now, int64_t *skipped)
{
    sqlite3_stmt *up = cmg_store_prepare(
        st, "INSERT INTO device_seen (device, instance, boot, open, since, last_seen,"
            " first_seen) VALUES (?1, ?2, ?3, 0, ?4, ?4, ?5) ON CONFLICT (device) DO UPDATE SET"
            " open = CASE WHEN instance = ?2 THEN 0 ELSE open END,"
            " last_seen = max(last_seen, ?4)", "nss", instance, boot);
    int rc = up ? 0 : -1;
    const cJSON *e, *items = rc == 0 ? c : NULL;

    sqlite3_bind_int64(up, 5, now);
    cJSON_ArrayForEach(e, items) {
        double t = cJSON_GetArrayItem(e, 1)->valuedouble;

        if (!device_ok(cJSON_GetArrayItem(e, 0), skipped))
            continue;
        sqlite3_bind_text(up, 1, cJSON_GetArrayItem(e, 0)->valuestring, -1, SQLITE_STATIC);
        sqlite3_bind_int64(up, 4, t < (double)now ? (int64_t)t : now);   /* not in the future */
        if (step_reset(up) < 0) {
            rc = -1;
            break;
        }
    }
    sqlite3_finalize(up);
    return rc;
}

static int keep_opened(struct cmg_store *st, const cJSON *o, const char *instance,
                       const char *boot, int64_t now, int64_t *skipped)
{
    sqlite3_stmt *up = cmg_store_prepare(
        st, "INSERT INTO device_seen (device, instance, boot, open, since, last_seen,"
            " first_seen) VALUES (?1, ?2, ?3, 1, ?4, ?4, ?4) ON CONFLICT (device) DO UPDATE SET"
            " instance = ?2, boot = ?3, open = 1, since = ?4, last_seen = max(last_seen, ?4)",
        "sssi", "", instance, boot, now);
    int rc = up ? 0 : -1;
    const cJSON *e, *items = rc == 0 ? o : NULL;

    cJSON_ArrayForEach(e, items) {
        if (!device_ok(e, skipped))
            continue;
        sqlite3_bind_text(up, 1, e->valuestring, -1, SQLITE_STATIC);
        if (step_reset(up) < 0) {
            rc = -1;
            break;
        }
    }
    sqlite3_finalize(up);
    return rc;
}

static int ingest_tx(struct cmg_store *st, const cJSON *doc, int64_t now, int64_t *ignored,
                     int64_t *skipped)
{
    const char *instance = get(doc, "instance")->valuestring;
    const char *boot = get(doc, "boot")->valuestring;
    bool new_boot = false;
    int rc = mark(st, instance, boot, (int64_t)get(doc, "seq")->valuedouble, now, &new_boot);

    if (rc != 0)
        return rc;
    /* a new boot: the channels of the instance's earlier boots are gone with them */
    if (new_boot && done(cmg_store_prepare(st, "UPDATE device_seen SET open = 0 WHERE open AND"
                                               " instance = ? AND boot <> ?", "ss", instance,
                                           boot)) < 0)
        return -1;
    /* the channels first: a delivery of a broadcast counts for a device seen */
    if (keep_closed(st, get(doc, "closed"), instance, boot, now, skipped) < 0 ||
        keep_opened(st, get(doc, "opened"), instance, boot, now, skipped) < 0 ||
        keep_delivered(st, get(doc, "delivered"), instance, now, ignored, skipped) < 0 ||
        cap_unknown(st) < 0)
        return -1;
    return 0;
}

int cmg_notify_report_ingest(struct cmg_store *st, const cJSON *doc, int64_t now, char *err,
                             size_t errlen)
{
    int64_t ignored = 0, skipped = 0;
    int rc;

    if (cmg_store_begin(st) < 0) {
        snprintf(err, errlen, "store busy: %s", cmg_store_error(st));
        return -1;
    }
    rc = ingest_tx(st, doc, now, &ignored, &skipped);
    if (rc >= 0 && cmg_store_commit(st) < 0)
        rc = -1;
    if (rc < 0) {
        snprintf(err, errlen, "store: %s", cmg_store_error(st));
        cmg_store_rollback(st);
    }
    if (rc == 0 && skipped > 0)
        cmg_warn("notify report of %s: %" PRId64 " entry(ies) skipped, the rest kept: device "
                 "ids not printable ASCII without space of 1..127 bytes, or keys of "
                 "\"delivered\" not notification ids EPOCH-SEQ",
                 get(doc, "instance")->valuestring, skipped);
    if (rc == 0 && ignored > 0)
        cmg_info("notify report of %s: %" PRId64 " delivery(ies) ignored (not a "
                "target, an unknown notification or kept already)",
                get(doc, "instance")->valuestring, ignored);
    return rc;
}
