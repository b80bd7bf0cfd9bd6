/* The notify feed: the connector long-polls the site's feed listener for client
 * notifications (GET /v1/connector/notify?after=E-S, held by the site until there is
 * something new) and sends each one, in sequence order, as a `notify` control message
 * on every ready tunnel. It keeps a backlog of the newest documents (1024, none older
 * than 24 h, 64 MiB in all) and sends `notify-sync` and the whole backlog on every
 * tunnel that comes up, so a fresh gateway instance has the window at once; the
 * gateways de-duplicate by sequence. Each tunnel takes the documents from the backlog
 * one at a time as its control stream drains (a cursor, no copy), so memory is the
 * backlog's whatever the number of tunnels, and nothing is kept per device. A site that cannot be reached is retried with
 * back-off; meanwhile nothing is sent and the tunnels work as ever. */
#include "connector/cn.h"
#include "core/log.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NOTIFY_TIMEOUT_MS 40000            /* the site holds a poll for 25 s */
#define NOTIFY_MAX_ANSWER (9u * 1024 * 1024)   /* 8 MiB of documents, and the envelope */
#define BACKLOG_MAX 1024
#define BACKLOG_MAX_AGE_S (24 * 3600)
#define BACKLOG_MAX_BYTES (64u * 1024 * 1024)
#define RETRY_MIN_MS 500
#define RETRY_MAX_MS 15000
#define EPOCH_LEN 16

/* One document as its control message, ready to send. */
struct kept {
    uint64_t seq;
    int64_t created;     /* unix seconds (tombstones: when it came) */
    char *line;
    size_t len;
};

struct cmg_notify_feed {
    struct cmg_connector *cn;
    struct cmg_site_call call;
    struct cmg_timer timer;
    char epoch[EPOCH_LEN + 1];    /* "" until the first answer */
    uint64_t last;                /* the highest sequence the site has assigned */
    struct kept backlog[BACKLOG_MAX];   /* a ring, oldest at head */
    size_t head, n, bytes;
    bool failing;                 /* logged once until it works again */
    uint32_t retry_ms;
};

#define FEED_OF(p, field) \
    ((struct cmg_notify_feed *)((char *)(p) - offsetof(struct cmg_notify_feed, field)))

static void poll_site(struct cmg_notify_feed *f);

/* ---- the backlog ---- */

static struct kept *kept_at(struct cmg_notify_feed *f, size_t i)
{
    return &f->backlog[(f->head + i) % BACKLOG_MAX];
}

static uint64_t newest_seq(struct cmg_notify_feed *f)
{
    return f->n ? kept_at(f, f->n - 1)->seq : 0;
}

static void drop_oldest(struct cmg_notify_feed *f)
{
    struct kept *k = kept_at(f, 0);

    f->bytes -= k->len;
    free(k->line);
    memset(k, 0, sizeof(*k));
    f->head = (f->head + 1) % BACKLOG_MAX;
    f->n--;
}

static void backlog_clear(struct cmg_notify_feed *f)
{
    while (f->n)
        drop_oldest(f);
    f->head = 0;
}

/* Keeps the newest BACKLOG_MAX, none older than a day, at most BACKLOG_MAX_BYTES. */
static void backlog_trim(struct cmg_notify_feed *f, size_t room_for)
{
    int64_t oldest = (int64_t)time(NULL) - BACKLOG_MAX_AGE_S;

    while (f->n && (f->n + (room_for ? 1 : 0) > BACKLOG_MAX ||
                    f->bytes + room_for > BACKLOG_MAX_BYTES || kept_at(f, 0)->created < oldest))
        drop_oldest(f);
}

static void backlog_add(struct cmg_notify_feed *f, uint64_t seq, int64_t created, char *line,
                        size_t len)
{
    struct kept *k;

    backlog_trim(f, len);
    k = kept_at(f, f->n++);
    *k = (struct kept){.seq = seq, .created = created, .line = line, .len = len};
    f->bytes += len;
}

/* ---- to the tunnels ---- */

static bool tunnel_ready(const struct cmg_cn_tunnel *t)
{
    return t->up && t->h2 && t->ctl_stream >= 0;
}

/* notify-sync, then the backlog in sequence order: taken one document at a time as
 * the control stream drains (cmg_notify_feed_fill). */
static void sync_tunnel(struct cmg_notify_feed *f, struct cmg_cn_tunnel *t)
{
    char line[128];
    uint64_t last = f->last > newest_seq(f) ? f->last : newest_seq(f);
    int n = snprintf(line, sizeof(line), "{\"type\":\"notify-sync\",\"epoch\":\"%s\",\"last\":%" PRIu64 "}",
                     f->epoch, last);

    backlog_trim(f, 0);
    if (cmg_cn_tunnel_control(t, line, (size_t)n) < 0)
        return;
    t->notify_synced = true;
    t->notify_next = f->n ? kept_at(f, 0)->seq : 0;   /* empty: whatever comes first */
}

bool cmg_notify_feed_fill(struct cmg_cn_tunnel *t)
{
    struct cmg_notify_feed *f = t->cn->notify;
    const struct kept *k;
    uint64_t oldest;
    size_t i;

    if (!f || !t->notify_synced || !f->n)
        return false;
    oldest = kept_at(f, 0)->seq;   /* the backlog is contiguous: a seq is its index */
    i = t->notify_next > oldest ? (size_t)(t->notify_next - oldest) : 0;
    if (i >= f->n)
        return false;
    k = kept_at(f, i);
    if (cmg_buf_append(&t->ctl_out, k->line, k->len) < 0 ||
        cmg_buf_append(&t->ctl_out, "\n", 1) < 0) {
        cmg_buf_reset(&t->ctl_out);
        return false;   /* tried again when the stream is resumed */
    }
    t->notify_next = k->seq + 1;
    return true;
}

void cmg_notify_feed_tunnel_ready(struct cmg_cn_tunnel *t)
{
    struct cmg_notify_feed *f = t->cn->notify;

    if (f && f->epoch[0] && tunnel_ready(t))
        sync_tunnel(f, t);
}

static void sync_all(struct cmg_notify_feed *f)
{
    for (int i = 0; i < f->cn->ntunnels; i++)
        if (tunnel_ready(&f->cn->tunnels[i]))
            sync_tunnel(f, &f->cn->tunnels[i]);
}

/* A new document in the backlog: every synced tunnel takes it in its turn. */
static void wake_all(struct cmg_notify_feed *f)
{
    for (int i = 0; i < f->cn->ntunnels; i++)
        if (tunnel_ready(&f->cn->tunnels[i]) && f->cn->tunnels[i].notify_synced)
            cmg_cn_tunnel_control_more(&f->cn->tunnels[i]);
}

/* ---- the site's answer ---- */

static bool epoch_ok(const char *e)
{
    size_t i = 0;

    for (; e[i] && i <= EPOCH_LEN; i++)
        if (!isdigit((unsigned char)e[i]) && !(e[i] >= 'a' && e[i] <= 'f'))
            return false;
    return i == EPOCH_LEN && !e[i];
}

static bool whole_number(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9007199254740992.0 ||
        v->valuedouble != (double)(uint64_t)v->valuedouble)
        return false;
    *out = (uint64_t)v->valuedouble;
    return true;
}

/* A document as its control message: {"type":"notify","event":TYPE, then the
 * document's other fields (contract 4: the document's fields at the top level next to
 * "type"; the notification's own type goes as "event", so that the message has one
 * "type" and every JSON parser reads it alike). NULL with why if it is not a document
 * of this epoch. */
static char *control_line(const struct cmg_notify_feed *f, cJSON *doc, uint64_t *seq,
                          int64_t *created, size_t *len, const char **why)
{
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(doc, "id");
    const cJSON *expired = cJSON_GetObjectItemCaseSensitive(doc, "expired");
    const cJSON *when = cJSON_GetObjectItemCaseSensitive(doc, "created");
    cJSON *type = cJSON_GetObjectItemCaseSensitive(doc, "type"), *event = NULL;
    char want[64], *text = NULL, *line = NULL;
    size_t room;

    *why = "a document with an id E-S and a seq expected";
    if (!cJSON_IsObject(doc) || !whole_number(cJSON_GetObjectItemCaseSensitive(doc, "seq"), seq) ||
        !*seq || !cJSON_IsString(id))
        return NULL;
    snprintf(want, sizeof(want), "%s-%" PRIu64, f->epoch, *seq);
    if (strcmp(id->valuestring, want)) {
        *why = "a document whose id is not the answer's epoch and its seq";
        return NULL;
    }
    *why = "a document with a type, or expired";
    if (!cJSON_IsTrue(expired) && !cJSON_IsString(type))
        return NULL;
    *created = cJSON_IsNumber(when) ? (int64_t)when->valuedouble : (int64_t)time(NULL);
    *why = "out of memory";
    if (type) {
        event = cJSON_DetachItemViaPointer(doc, type);
        if (!cJSON_IsString(event)) {
            cJSON_Delete(event);
            event = NULL;
        }
    }
    if (event && !cJSON_AddStringToObject(doc, "event", event->valuestring))
        goto out;
    if (!(text = cJSON_PrintUnformatted(doc)))
        goto out;
    room = strlen(text) + 32;
    if ((line = malloc(room)))
        *len = (size_t)snprintf(line, room, "{\"type\":\"notify\",%s", text + 1);
out:
    cJSON_Delete(event);
    free(text);
    return line;
}

/* Takes the documents in sequence order: older ones than held are skipped (a repeat),
 * and a gap (the site keeps no older ones) empties the backlog, which stays contiguous.
 * -1 with why at the first that is not a document. */
static int take_documents(struct cmg_notify_feed *f, cJSON *list, const char **why)
{
    cJSON *doc;

    cJSON_ArrayForEach(doc, list) {
        uint64_t seq;
        int64_t created;
        size_t len = 0;
        char *line = control_line(f, doc, &seq, &created, &len, why);

        if (!line)
            return -1;
        if (f->n && seq <= newest_seq(f)) {
            free(line);
            continue;
        }
        if (f->n && seq != newest_seq(f) + 1) {
            cmg_info("notify feed: the site keeps no notification between %" PRIu64 " and %" PRIu64
                     " any more; the backlog starts again at %" PRIu64,
                     newest_seq(f), seq, seq);
            backlog_clear(f);
        }
        backlog_add(f, seq, created, line, len);
        if (seq > f->last)
            f->last = seq;
        wake_all(f);
    }
    return 0;
}

/* {"epoch":"E","last":L,"notifications":[...],"more":B}. 0, or -1 with why. */
static int take_answer(struct cmg_notify_feed *f, const char *body, size_t len, const char **why)
{
    cJSON *doc = cJSON_ParseWithLength(body, len);
    const cJSON *epoch = cJSON_GetObjectItemCaseSensitive(doc, "epoch");
    cJSON *list = cJSON_GetObjectItemCaseSensitive(doc, "notifications");
    uint64_t last = 0;
    bool new_epoch;
    int rc = -1;

    *why = "an object with epoch (16 hex), last and notifications expected";
    if (!cJSON_IsString(epoch) || !epoch_ok(epoch->valuestring) ||
        !whole_number(cJSON_GetObjectItemCaseSensitive(doc, "last"), &last) ||
        !cJSON_IsArray(list))
        goto out;
    new_epoch = strcmp(f->epoch, epoch->valuestring) != 0;
    if (new_epoch) {
        if (f->epoch[0])
            cmg_info("notify feed: the site's epoch is now %s (was %s): a new store; the "
                     "backlog starts again", epoch->valuestring, f->epoch);
        backlog_clear(f);
        snprintf(f->epoch, sizeof(f->epoch), "%s", epoch->valuestring);
        f->last = 0;
    }
    if (last > f->last)
        f->last = last;
    if (new_epoch)
        sync_all(f);   /* notify-sync first, then what this answer brings */
    rc = take_documents(f, list, why);
out:
    cJSON_Delete(doc);
    return rc;
}

/* ---- polling ---- */

static void on_timer(struct cmg_timer *tm) { poll_site(FEED_OF(tm, timer)); }

static void retry(struct cmg_notify_feed *f, const char *why)
{
    if (!f->failing)
        cmg_warn("notify feed of site %s unreachable or refusing: %s (no notifications "
                 "until it answers; retrying)", cmg_site_call_authority(&f->call), why);
    f->failing = true;
    f->retry_ms = f->retry_ms ? f->retry_ms * 2 : RETRY_MIN_MS;
    if (f->retry_ms > RETRY_MAX_MS)
        f->retry_ms = RETRY_MAX_MS;
    cmg_timer_start(f->cn->loop, &f->timer, f->retry_ms, on_timer);
}

static void on_answer(struct cmg_site_call *c, int status, const char *why)
{
    struct cmg_notify_feed *f = FEED_OF(c, call);
    char msg[160];

    if (status <= 0) {
        retry(f, why);
        return;
    }
    if (status != 200) {
        snprintf(msg, sizeof(msg), "status %d%s", status,
                 status == 403 ? " (this connector's certificate is revoked)"
                 : status == 404 ? " (a site without client notifications?)" : "");
        retry(f, msg);
        return;
    }
    if (take_answer(f, cmg_buf_head(&c->answer), c->answer.len, &why) < 0) {
        snprintf(msg, sizeof(msg), "malformed answer: %s", why);
        retry(f, msg);
        return;
    }
    if (f->failing)
        cmg_info("notify feed of site %s reached again", cmg_site_call_authority(&f->call));
    f->failing = false;
    f->retry_ms = 0;
    cmg_buf_free(&c->answer);
    cmg_timer_start(f->cn->loop, &f->timer, 0, on_timer);   /* the next poll, from the loop */
}

static void poll_site(struct cmg_notify_feed *f)
{
    char target[96];

    if (f->epoch[0])
        snprintf(target, sizeof(target), "/v1/connector/notify?after=%s-%" PRIu64, f->epoch,
                 f->n ? newest_seq(f) : f->last);
    else
        snprintf(target, sizeof(target), "/v1/connector/notify");
    cmg_site_call_start(&f->call, "GET", target, NULL, NULL, 0, NOTIFY_TIMEOUT_MS);
}

int cmg_notify_feed_start(struct cmg_connector *cn)
{
    struct cmg_notify_feed *f;

    if (!cn->feed)
        return 0;
    if (!(f = calloc(1, sizeof(*f)))) {
        cmg_error("notify feed: out of memory");
        return -1;
    }
    f->cn = cn;
    cmg_site_call_init(&f->call, cn, on_answer, NOTIFY_MAX_ANSWER);
    cn->notify = f;
    poll_site(f);
    return 0;
}

void cmg_notify_feed_stop(struct cmg_connector *cn)
{
    struct cmg_notify_feed *f = cn->notify;

    if (!f)
        return;
    cmg_timer_stop(cn->loop, &f->timer);
    cmg_site_call_free(&f->call);
    backlog_clear(f);
    free(f);
    cn->notify = NULL;
}
