/* The admin operations of notifications (notify, notify.status, notify.resend,
 * notify.list), shared by 'cmg site notify' and the admin API; see ops.h. */
#include "site/notify.h"
#include "site/notify_ops.h"
#include "site/ops.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LIST_DEFAULT 20
#define LIST_MAX 100    /* each row's counts may be computed: a bounded page */
#define DEVICES_PAGE_MAX 100000   /* device.list rows in one page */

static const cJSON *arg(const cJSON *args, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(args, name);
}

/* A value as it may be shown in a message: printable, cut short. */
static void shown(const char *in, char *out, size_t outlen)
{
    size_t i = 0;

    for (; in[i] && i + 4 < outlen && i < 40; i++)
        out[i] = (in[i] >= 0x20 && in[i] < 0x7f) ? in[i] : '?';
    snprintf(out + i, outlen - i, "%s", in[i] ? "..." : "");
}

/* ttl: seconds (a number) or a duration string; default 1h. -1 with msg if bad. */
static int64_t ttl_arg(const cJSON *args, char *msg, size_t len)
{
    const cJSON *v = arg(args, "ttl");
    int64_t ttl = -1;

    if (!v)
        return CMG_NOTIFY_TTL_DEFAULT;
    if (cJSON_IsNumber(v) && v->valuedouble >= 1 && v->valuedouble <= CMG_NOTIFY_TTL_MAX &&
        v->valuedouble == (double)(int64_t)v->valuedouble)
        ttl = (int64_t)v->valuedouble;
    else if (cJSON_IsString(v))
        ttl = cmg_notify_ttl_parse(v->valuestring);
    if (ttl < 0)
        cmg_site_fail(msg, len, 400,
                      "ttl: a duration from 1s to 24h expected (3600, 90s, 30m, 2h)");
    return ttl;
}

/* The id argument as a seq of this site: 0, or an HTTP status with msg. */
static int id_arg(struct cmg_site_ctx *s, const cJSON *args, int64_t *seq, char *msg, size_t len)
{
    const char *id = cJSON_GetStringValue(arg(args, "id"));
    char epoch[17], mine[17], show[64];

    if (!id || cmg_notify_id_parse(id, epoch, seq) < 0 || *seq < 1) {
        shown(id ? id : "", show, sizeof(show));
        return cmg_site_fail(msg, len, 400,
                             "id: a notification id EPOCH-SEQ expected, as 'cmg site "
                             "notify' printed it (got '%s')",
                             show);
    }
    if (cmg_notify_epoch(s->store, mine) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    if (strcmp(epoch, mine))
        return cmg_site_fail(msg, len, 404,
                             "no notification %s: this site's notifications are %s-N "
                             "(a site whose store was made anew has a new epoch)",
                             id, mine);
    return 0;
}

/* devices (a list of ids) or all (true): exactly one. */
static int targets_arg(const cJSON *args, struct cmg_notify_new *n, const char ***ids, char *msg,
                       size_t len)
{
    const cJSON *devices = arg(args, "devices"), *e;
    char show[64];
    size_t i = 0;

    n->all = cJSON_IsTrue(arg(args, "all"));
    if (n->all == (devices != NULL) || (devices && !cJSON_IsArray(devices)) ||
        (devices && cJSON_GetArraySize(devices) == 0))
        return cmg_site_fail(msg, len, 400,
                             "one of devices (a list of 1 to %d device ids) or all (true) "
                             "expected",
                             CMG_NOTIFY_MAX_DEVICES);
    if (n->all)
        return 0;
    n->ndevices = (size_t)cJSON_GetArraySize(devices);
    if (!(*ids = calloc(n->ndevices, sizeof(**ids))))
        return cmg_site_fail(msg, len, 500, "out of memory");
    cJSON_ArrayForEach(e, devices) {
        if (!cJSON_IsString(e) || !cmg_notify_device_ok(e->valuestring)) {
            shown(cJSON_IsString(e) ? e->valuestring : "(not a string)", show, sizeof(show));
            return cmg_site_fail(msg, len, 400,
                                 "devices[%zu]: a device id expected (printable ASCII "
                                 "without space, 1..127 bytes), got '%s'",
                                 i, show);
        }
        (*ids)[i++] = e->valuestring;
    }
    n->devices = *ids;
    return 0;
}

/* type and data: 0, or 400 with msg. *data is malloc'd compact JSON. */
static int content_args(const cJSON *args, struct cmg_notify_new *n, char **data, char *msg,
                        size_t len)
{
    const cJSON *d = arg(args, "data");
    char show[64];

    n->type = cJSON_GetStringValue(arg(args, "type"));
    if (!n->type || !cmg_notify_type_ok(n->type)) {
        shown(n->type ? n->type : "", show, sizeof(show));
        return cmg_site_fail(msg, len, 400,
                             "type: 1..64 of A-Z a-z 0-9 _ . - expected ('reset' is the "
                             "gateway's own), got '%s'",
                             show);
    }
    *data = d ? cJSON_PrintUnformatted(d) : strdup("null");
    if (!*data)
        return cmg_site_fail(msg, len, 500, "out of memory");
    if (strlen(*data) > CMG_NOTIFY_MAX_DATA)
        return cmg_site_fail(msg, len, 400,
                             "data: at most %u bytes of JSON expected (compact), got %zu",
                             CMG_NOTIFY_MAX_DATA, strlen(*data));
    n->data = *data;
    return 0;
}

static cJSON *sent_result(struct cmg_site_ctx *s, int64_t seq, const struct cmg_notify_new *n,
                          int64_t ntargets, int64_t expires)
{
    cJSON *r = cJSON_CreateObject();
    char epoch[17] = "", id[CMG_NOTIFY_ID_MAX];

    cmg_notify_epoch(s->store, epoch);
    snprintf(id, sizeof(id), "%s-%" PRId64, epoch, seq);
    cJSON_AddStringToObject(r, "id", id);
    cJSON_AddNumberToObject(r, "seq", (double)seq);
    if (n->all)
        cJSON_AddStringToObject(r, "targets", "all");
    else
        cJSON_AddNumberToObject(r, "targets", (double)ntargets);
    cJSON_AddNumberToObject(r, "expires", (double)expires);
    return r;
}

static int send_new(struct cmg_site_ctx *s, struct cmg_notify_new *n, cJSON **result, char *msg,
                    size_t len)
{
    int64_t now = (int64_t)time(NULL), seq, ntargets;
    int rc = cmg_notify_create(s->store, n, now, &seq, &ntargets, msg, len);

    if (rc == 0)
        *result = sent_result(s, seq, n, ntargets, now + n->ttl);
    return rc;
}

int cmg_notify_op_send(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                       size_t len)
{
    struct cmg_notify_new n = {0};
    const char **ids = NULL;
    char *data = NULL;
    int rc;

    if ((rc = targets_arg(args, &n, &ids, msg, len)) == 0 &&
        (rc = content_args(args, &n, &data, msg, len)) == 0 &&
        (n.ttl = ttl_arg(args, msg, len)) < 0)
        rc = 400;
    if (rc == 0)
        rc = send_new(s, &n, result, msg, len);
    free(ids);
    free(data);
    return rc;
}

int cmg_notify_op_status(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len)
{
    int64_t seq;
    int rc = id_arg(s, args, &seq, msg, len);

    if (rc != 0)
        return rc;
    rc = cmg_notify_status(s->store, seq, (int64_t)time(NULL), result);
    if (rc == 1)
        return cmg_site_fail(msg, len, 404, "no notification %s (kept %d days)",
                    cJSON_GetStringValue(arg(args, "id")), CMG_NOTIFY_RETENTION_S / 86400);
    return rc == 0 ? 0 : cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
}

/* The original's type and data, into n (*data malloc'd), and when it was made: a plain
 * read, no counting. 0, 1 none, -1. */
static int original(struct cmg_site_ctx *s, int64_t seq, struct cmg_notify_new *n, char **data,
                    char **type, int64_t *created)
{
    cJSON *rows = cmg_store_query_json(s->store, "SELECT type, data, created FROM notifications"
                                                 " WHERE seq = ?", "i", seq);
    cJSON *row = cJSON_GetArrayItem(rows, 0);
    const char *t = cJSON_GetStringValue(cJSON_GetObjectItem(row, "type"));
    const char *d = cJSON_GetStringValue(cJSON_GetObjectItem(row, "data"));
    int rc = !rows ? -1 : !row ? 1 : 0;

    *created = (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItem(row, "created"));

    *type = t ? strdup(t) : NULL;
    *data = d ? strdup(d) : NULL;
    cJSON_Delete(rows);
    if (rc == 0 && (!*type || !*data))
        rc = -1;
    n->type = *type;
    n->data = *data;
    return rc;
}

/* The missed devices sent as notifications of one document each (a broadcast's missed
 * set may not fit one): the result names the first, the total, and every part in
 * "notifications" ({"id","seq","targets"}). */
static int send_parts(struct cmg_site_ctx *s, struct cmg_notify_new *n, const char *const *ids,
                      size_t total, cJSON **result, char *msg, size_t len)
{
    cJSON *parts = cJSON_CreateArray(), *part = NULL;
    int64_t all_targets = 0;
    size_t done = 0;
    int rc = parts ? 0 : cmg_site_fail(msg, len, 500, "out of memory");

    while (rc == 0 && done < total) {
        n->devices = ids + done;
        n->ndevices = total - done;
        n->ndevices = cmg_notify_devices_fitting(n, NULL);
        if (n->ndevices == 0) {
            rc = cmg_site_fail(msg, len, 500, "a device id does not fit a notification");
            break;
        }
        if ((rc = send_new(s, n, &part, msg, len)) != 0)
            break;
        all_targets += (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItem(part, "targets"));
        if (!*result)
            *result = cJSON_Duplicate(part, true);
        cJSON_DeleteItemFromObject(part, "expires");
        cJSON_AddItemToArray(parts, part);
        done += n->ndevices;
    }
    if (rc == 0 && *result) {
        cJSON_ReplaceItemInObject(*result, "targets", cJSON_CreateNumber((double)all_targets));
        cJSON_AddItemToObject(*result, "notifications", parts);
        parts = NULL;
    }
    cJSON_Delete(parts);
    return rc;
}

static int resend_missed(struct cmg_site_ctx *s, int64_t seq, const char *id,
                         struct cmg_notify_new *n, cJSON **result, char *msg, size_t len)
{
    cJSON *missed = cmg_notify_missed(s->store, seq), *e;
    const char **ids = NULL;
    size_t i = 0, total;
    int rc;

    if (!missed)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    total = (size_t)cJSON_GetArraySize(missed);
    if (total == 0) {
        *result = cJSON_CreateObject();
        cJSON_AddNullToObject(*result, "id");
        cJSON_AddNumberToObject(*result, "targets", 0);
        cJSON_AddStringToObject(*result, "note", "nothing to resend: every target has it");
        cJSON_Delete(missed);
        return 0;
    }
    if (!(ids = calloc(total, sizeof(*ids)))) {
        cJSON_Delete(missed);
        return cmg_site_fail(msg, len, 500, "out of memory");
    }
    cJSON_ArrayForEach(e, missed) ids[i++] = e->valuestring;
    n->resend_of = seq;
    if ((rc = send_parts(s, n, ids, total, result, msg, len)) == 0)
        cJSON_AddStringToObject(*result, "resend_of", id);
    else {
        cJSON_Delete(*result);   /* the parts made are recorded: sent whatever follows */
        *result = NULL;
    }
    free(ids);
    cJSON_Delete(missed);
    return rc;
}

int cmg_notify_op_resend(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                         size_t len)
{
    struct cmg_notify_new n = {0};
    char *data = NULL, *type = NULL;
    int64_t seq, created = 0;
    int rc = id_arg(s, args, &seq, msg, len);

    if (rc == 0 && !cJSON_IsTrue(arg(args, "missed")))
        rc = cmg_site_fail(msg, len, 400,
                           "missed: true expected (a resend goes to the targets that have "
                           "not had it: --missed)");
    if (rc == 0 && (n.ttl = ttl_arg(args, msg, len)) < 0)
        rc = 400;
    if (rc == 0 && (rc = original(s, seq, &n, &data, &type, &created)) == 1)
        rc = cmg_site_fail(msg, len, 404, "no notification %s",
                           cJSON_GetStringValue(arg(args, "id")));
    else if (rc < 0)
        rc = cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    /* past notify_retention its per-device rows may be gone: "missed" would be everyone */
    else if (rc == 0 && created < (int64_t)time(NULL) - s->notify_retention_s)
        rc = cmg_site_fail(
            msg, len, 409,
            "cannot resend %s to the devices that missed it: it is older "
            "than notify_retention (%lld s), whose per-device delivery rows are pruned; "
            "send a new notification instead",
            cJSON_GetStringValue(arg(args, "id")), (long long)s->notify_retention_s);
    if (rc == 0)
        rc = resend_missed(s, seq, cJSON_GetStringValue(arg(args, "id")), &n, result, msg, len);
    free(data);
    free(type);
    return rc;
}

int cmg_notify_op_list(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                       size_t len)
{
    const cJSON *lim = arg(args, "limit");
    double limit = lim ? cJSON_GetNumberValue(lim) : LIST_DEFAULT;
    int64_t now = (int64_t)time(NULL);
    cJSON *seqs, *row, *st;

    if (!(limit >= 1 && limit <= LIST_MAX))
        return cmg_site_fail(msg, len, 400, "limit: a number from 1 to %d expected", LIST_MAX);
    seqs = cmg_store_query_json(s->store, "SELECT seq FROM notifications ORDER BY seq DESC "
                                          "LIMIT ?", "i", (int64_t)limit);
    if (!seqs)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    *result = cJSON_CreateArray();
    cJSON_ArrayForEach(row, seqs) {
        if (cmg_notify_status(s->store, (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItem(row,
                              "seq")), now, &st) != 0) {
            cJSON_Delete(seqs);
            cJSON_Delete(*result);
            *result = NULL;
            return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
        }
        cJSON_AddItemToArray(*result, st);
    }
    cJSON_Delete(seqs);
    return 0;
}

int cmg_notify_op_new_epoch(struct cmg_site_ctx *s, const cJSON *args, cJSON **result,
                            char *msg, size_t len)
{
    char old[17], made[17];

    (void)args;
    if (cmg_notify_new_epoch(s->store, old, made) < 0)
        return cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "epoch", made);
    cJSON_AddStringToObject(*result, "previous", old);
    return 0;
}

int cmg_notify_op_devices(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                          size_t len)
{
    const cJSON *lim = arg(args, "limit"), *after = arg(args, "after");
    double limit = lim ? cJSON_GetNumberValue(lim) : 0;

    if (lim && !(limit >= 1 && limit <= DEVICES_PAGE_MAX))
        return cmg_site_fail(msg, len, 400, "limit: a number from 1 to %d expected",
                             DEVICES_PAGE_MAX);
    if (after && !(cJSON_IsString(after) && cmg_notify_device_ok(after->valuestring)))
        return cmg_site_fail(msg, len, 400, "after: a device id expected (the last one of the "
                                   "previous page)");
    *result = cmg_notify_devices_json(s->store, (int64_t)time(NULL),
                                      (int64_t)s->report_interval_s,
                                      after ? after->valuestring : NULL, (int64_t)limit);
    return *result ? 0 : cmg_site_fail(msg, len, 500, "store: %s", cmg_store_error(s->store));
}
