/* Notify reports (docs/tunnel.md, "Notify reports"): which devices got which
 * notification, and which channels opened and closed, sent as POST /.cmg/notify-report
 * on one ready tunnel at a time, at most a second after something to report, one report
 * in flight. A report that is not answered 204 is kept and sent again, the same body
 * (its seq lets the site ignore a copy it has), on another tunnel if there is one.
 * Unsent data is bounded: past 16 MiB the oldest deliveries go, with one warning. */
#include "core/log.h"
#include "gateway/gw.h"
#include "gateway/notify.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BATCH_MS 1000
#define RETRY_MS 1000
#define MAX_UNSENT (16u << 20)
#define MAX_BODY CMG_REPORT_MAX_GATEWAY_BODY

/* Records, appended as they come: delivered "seq(8) len(1) id", opened "len(1) id",
 * closed "when(8) len(1) id". */
struct cmg_notify_reports {
    struct cmg_gateway *gw;
    struct cmg_buf delivered, opened, closed;
    size_t sent_d, sent_o, sent_c;      /* of each, what the report in flight holds */
    uint64_t seq;
    char *body;                         /* the report in flight, or to send again */
    size_t len, off;
    struct cmg_tunnel *tun;             /* where it is in flight (NULL: nowhere) */
    int32_t stream;
    int status;
    const struct cmg_tunnel *failed_on; /* compared, never followed */
    struct cmg_timer timer;
    uint64_t dropped;
    bool warned;
};

#define REPORTS_OF(t) \
    ((struct cmg_notify_reports *)((char *)(t) - offsetof(struct cmg_notify_reports, timer)))

static void on_timer(struct cmg_timer *t);

static void soon(struct cmg_gateway *gw, uint64_t ms)
{
    struct cmg_notify_reports *r = gw->notify_reports;
    if (r && !r->tun && !cmg_timer_armed(&r->timer))
        cmg_timer_start(gw->loop, &r->timer, ms, on_timer);
}

static size_t unsent(const struct cmg_notify_reports *r)
{
    return r->delivered.len + r->opened.len + r->closed.len;
}

/* Drops every delivery record after `from`; how many. */
static uint64_t drop_all(struct cmg_buf *b, size_t from)
{
    const char *p = cmg_buf_head(b);
    uint64_t n = 0;

    for (size_t at = from; at < b->len; at += 9 + (unsigned char)p[at + 8])
        n++;
    b->len = from;
    return n;
}

/* Drops an eighth (at least one record) of b's records after `from` (those in
 * flight), oldest first; records are "pre bytes, len(1), id". How many went. */
static uint64_t drop_oldest(struct cmg_buf *b, size_t from, size_t pre)
{
    size_t at = from, target = (b->len - from) / 8;
    const char *p = cmg_buf_head(b);
    uint64_t n = 0;

    while (at < b->len && (n == 0 || at - from < target)) {
        at += pre + 1 + (unsigned char)p[at + pre];
        n++;
    }
    memmove(cmg_buf_head(b) + from, p + at, b->len - at);
    b->len -= at - from;
    return n;
}

/* Past MAX_UNSENT (the site does not take reports): an eighth of the delivery records
 * not in flight goes, oldest first, with one warning until a report is taken again.
 * Opened and closed records are never dropped (a dropped close would show the device
 * open at the site for good): they are bounded by the channels' churn. */
static void bound(struct cmg_notify_reports *r)
{
    uint64_t n;

    if (unsent(r) <= MAX_UNSENT || r->delivered.len <= r->sent_d)
        return;
    n = drop_oldest(&r->delivered, r->sent_d, 8);
    r->dropped += n;
    if (!r->warned)
        cmg_warn("notify reports: more than %u MiB not taken by the site (is it reachable?): "
                 "the oldest %llu delivery record(s) dropped; 'notify status' undercounts "
                 "them", MAX_UNSENT >> 20, (unsigned long long)n);
    r->warned = true;
}

uint64_t cmg_notify_report_dropped(const struct cmg_gateway *gw)
{
    return gw->notify_reports ? gw->notify_reports->dropped : 0;
}

void cmg_notify_report_epoch(struct cmg_gateway *gw)
{
    struct cmg_notify_reports *r = gw->notify_reports;
    if (!r || r->delivered.len <= r->sent_d)
        return;
    /* Unsent deliveries name seqs of the old epoch: the site's new store knows none. */
    r->dropped += drop_all(&r->delivered, r->sent_d);
}

static void add(struct cmg_buf *b, const void *pre, size_t prelen, const char *device)
{
    size_t n = strlen(device);
    unsigned char len = (unsigned char)(n > 255 ? 255 : n);
    if (cmg_buf_reserve(b, prelen + 1 + len) < 0)
        return;
    cmg_buf_append(b, pre, prelen);
    cmg_buf_append(b, &len, 1);
    cmg_buf_append(b, device, len);
}

void cmg_notify_report_delivered(struct cmg_gateway *gw, uint64_t seq, const char *device)
{
    struct cmg_notify_reports *r = gw->notify_reports;
    if (!r)
        return;
    add(&r->delivered, &seq, 8, device);
    bound(r);
    soon(gw, BATCH_MS);
}

void cmg_notify_report_opened(struct cmg_gateway *gw, const char *device)
{
    struct cmg_notify_reports *r = gw->notify_reports;
    if (!r)
        return;
    add(&r->opened, NULL, 0, device);
    bound(r);
    soon(gw, BATCH_MS);
}

void cmg_notify_report_closed(struct cmg_gateway *gw, const char *device, int64_t when)
{
    struct cmg_notify_reports *r = gw->notify_reports;
    if (!r)
        return;
    add(&r->closed, &when, 8, device);
    bound(r);
    soon(gw, BATCH_MS);
}

/* ---- the document ---- */

static void put_id(struct cmg_buf *b, const char *p, size_t n)
{
    cmg_buf_append(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '"' || p[i] == '\\')
            cmg_buf_append(b, "\\", 1);
        cmg_buf_append(b, p + i, 1);
    }
    cmg_buf_append(b, "\"", 1);
}

/* An id's JSON: its bytes, a backslash before each quote or backslash, the quotes
 * and a comma. */
static size_t id_cost(const char *id, size_t n)
{
    size_t cost = n + 3;
    for (size_t i = 0; i < n; i++)
        cost += id[i] == '"' || id[i] == '\\';
    return cost;
}

/* How many bytes of records fit in `room` (an upper bound of their JSON): `extra` per
 * record, and for deliveries (keyed) `key` whenever the seq differs from the record
 * before (the distinct seqs are never more than those changes plus one). */
static size_t fit(const struct cmg_buf *b, size_t pre, size_t extra, size_t key, size_t *room)
{
    const char *p = cmg_buf_head(b);
    size_t at = 0, before = SIZE_MAX;
    while (at < b->len) {
        size_t n = (unsigned char)p[at + pre];
        size_t cost = id_cost(p + at + pre + 1, n) + extra;
        if (key && (before == SIZE_MAX || memcmp(p + before, p + at, 8)))
            cost += key;
        if (cost > *room)
            break;
        *room -= cost;
        before = at;
        at += pre + 1 + n;
    }
    return at;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void put_delivered(struct cmg_buf *b, const struct cmg_buf *d, size_t upto, const char *epoch)
{
    const char *p = cmg_buf_head(d);
    size_t nrec = 0, k = 0;
    uint64_t *seqs;

    for (size_t at = 0; at < upto; at += 9 + (unsigned char)p[at + 8])
        nrec++;
    if (!nrec || !(seqs = malloc(nrec * sizeof(*seqs))))
        return;
    for (size_t at = 0; at < upto; at += 9 + (unsigned char)p[at + 8])
        memcpy(&seqs[k++], p + at, 8);
    qsort(seqs, nrec, sizeof(*seqs), cmp_u64);
    for (size_t i = 0; i < nrec; i++) {
        bool first = true;
        if (i && seqs[i] == seqs[i - 1])
            continue;
        cmg_buf_printf(b, "%s\"%s-%llu\":[", i ? "," : "", epoch, (unsigned long long)seqs[i]);
        for (size_t at = 0; at < upto; at += 9 + (unsigned char)p[at + 8]) {
            uint64_t s;
            memcpy(&s, p + at, 8);
            if (s != seqs[i])
                continue;
            if (!first)
                cmg_buf_append(b, ",", 1);
            first = false;
            put_id(b, p + at + 9, (unsigned char)p[at + 8]);
        }
        cmg_buf_append(b, "]", 1);
    }
    free(seqs);
}

/* Whether the device of a record (len bytes at id) holds a channel here now. */
static bool record_open(struct cmg_gateway *gw, const char *id, size_t len)
{
    char device[256];

    memcpy(device, id, len);   /* a record's length is one byte */
    device[len] = '\0';
    return cmg_notify_channel_open(gw, device);
}

/* The next report's body from what is unsent (sent_* say how much it takes). */
static int make_body(struct cmg_gateway *gw, struct cmg_notify_reports *r)
{
    struct cmg_buf b = {0};
    size_t room = MAX_BODY - 1024 - 2 * CMG_REPORT_MAX_STR;
    const char *p;
    bool first;

    r->sent_o = fit(&r->opened, 0, 0, 0, &room);
    r->sent_c = fit(&r->closed, 8, 24, 0, &room);
    r->sent_d = fit(&r->delivered, 8, 0, 48, &room);   /* "E-S":[...], : 16+1+20+8 */
    cmg_buf_printf(&b, "{\"instance\":");
    put_id(&b, gw->report.instance, strlen(gw->report.instance));
    cmg_buf_printf(&b, ",\"boot\":\"%s\",\"seq\":%llu,\"time\":%lld,\"delivered\":{",
                   gw->report.boot, (unsigned long long)++r->seq, (long long)time(NULL));
    put_delivered(&b, &r->delivered, r->sent_d, cmg_gw_notify_epoch(gw));
    /* A device that opened and closed (or closed and opened again) since the last report
     * is in both lists: each says only what holds now, so the site's order of applying
     * them cannot leave a closed channel open. */
    cmg_buf_appends(&b, "},\"opened\":[");
    p = cmg_buf_head(&r->opened);
    first = true;
    for (size_t at = 0; at < r->sent_o; at += 1 + (unsigned char)p[at]) {
        if (!record_open(gw, p + at + 1, (unsigned char)p[at]))
            continue;
        if (!first)
            cmg_buf_append(&b, ",", 1);
        first = false;
        put_id(&b, p + at + 1, (unsigned char)p[at]);
    }
    cmg_buf_appends(&b, "],\"closed\":[");
    p = cmg_buf_head(&r->closed);
    first = true;
    for (size_t at = 0; at < r->sent_c; at += 9 + (unsigned char)p[at + 8]) {
        int64_t when;
        if (record_open(gw, p + at + 9, (unsigned char)p[at + 8]))
            continue;
        memcpy(&when, p + at, 8);
        cmg_buf_appends(&b, first ? "[" : ",[");
        first = false;
        put_id(&b, p + at + 9, (unsigned char)p[at + 8]);
        cmg_buf_printf(&b, ",%lld]", (long long)when);
    }
    if (cmg_buf_appends(&b, "]}") < 0) {
        cmg_buf_free(&b);
        return -1;
    }
    free(r->body);
    r->body = b.data;   /* off is 0: nothing was consumed */
    r->len = b.len;
    return 0;
}

/* ---- sending ---- */

static ssize_t read_body(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct cmg_notify_reports *r = src->ptr;
    size_t n = r->len - r->off < length ? r->len - r->off : length;

    memcpy(buf, r->body + r->off, n);
    r->off += n;
    if (r->off == r->len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

/* The first ready tunnel, another than the one that failed last if there is one. */
static struct cmg_tunnel *pick(struct cmg_gateway *gw, const struct cmg_notify_reports *r)
{
    struct cmg_tunnel *first = NULL;
    for (struct cmg_tunnel *t = gw->tunnels; t; t = t->next) {
        if (!t->ready || t->dead || !t->h2)
            continue;
        if (t != r->failed_on)
            return t;
        if (!first)
            first = t;
    }
    return first;
}

static void send_report(struct cmg_gateway *gw, struct cmg_notify_reports *r)
{
    char clen[24];
    nghttp2_nv nv[] = {
        {(uint8_t *)":method", (uint8_t *)"POST", 7, 4, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":scheme", (uint8_t *)"https", 7, 5, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":authority", (uint8_t *)"tunnel", 10, 6, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)":path", (uint8_t *)CMG_NOTIFY_REPORT_PATH, 5,
         sizeof(CMG_NOTIFY_REPORT_PATH) - 1, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-type", (uint8_t *)"application/json", 12, 16, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-length", (uint8_t *)clen, 14, 0, NGHTTP2_NV_FLAG_NONE},
    };
    nghttp2_data_provider dp = {.source.ptr = r, .read_callback = read_body};
    struct cmg_tunnel *t = pick(gw, r);
    int32_t id;

    if (!t || !gw->report.boot[0]) {
        soon(gw, RETRY_MS);   /* no tunnel yet: kept */
        return;
    }
    if (!r->body && make_body(gw, r) < 0) {
        soon(gw, RETRY_MS);
        return;
    }
    r->off = 0;
    r->status = 0;
    nv[5].valuelen = (size_t)snprintf(clen, sizeof(clen), "%zu", r->len);
    id = nghttp2_submit_request(t->h2, NULL, nv, sizeof(nv) / sizeof(nv[0]), &dp, NULL);
    if (id < 0) {
        r->failed_on = t;
        soon(gw, RETRY_MS);
        return;
    }
    r->tun = t;
    r->stream = id;
    cmg_tunnel_kick(t);
}

static void on_timer(struct cmg_timer *t)
{
    struct cmg_notify_reports *r = REPORTS_OF(t);
    if (!r->tun && (r->body || unsent(r)))
        send_report(r->gw, r);
}

static struct cmg_log_limit failed_reports = {.what = "failed notify reports"};

/* The report in flight is over: taken (204), or kept for another try. */
static void settled(struct cmg_gateway *gw, struct cmg_notify_reports *r, bool taken, const char *why)
{
    struct cmg_tunnel *t = r->tun;

    r->tun = NULL;
    if (!taken) {
        r->failed_on = t;
        cmg_log_limited(&failed_reports, CMG_LOG_INFO,
                        "notify report %llu not taken (%s): kept, sent again in %d s",
                        (unsigned long long)r->seq, why, RETRY_MS / 1000);
        soon(gw, RETRY_MS);
        return;
    }
    cmg_buf_consume(&r->delivered, r->sent_d);
    cmg_buf_consume(&r->opened, r->sent_o);
    cmg_buf_consume(&r->closed, r->sent_c);
    r->sent_d = r->sent_o = r->sent_c = 0;
    free(r->body);
    r->body = NULL;
    r->failed_on = NULL;
    r->warned = false;
    if (unsent(r))
        soon(gw, 0);
    else {
        cmg_buf_release(&r->delivered);
        cmg_buf_release(&r->opened);
        cmg_buf_release(&r->closed);
    }
}

bool cmg_notify_report_status(struct cmg_tunnel *t, int32_t stream_id, int status)
{
    struct cmg_notify_reports *r = t->gw->notify_reports;
    if (!r || r->tun != t || r->stream != stream_id)
        return false;
    r->status = status;
    return true;
}

bool cmg_notify_report_closed_stream(struct cmg_tunnel *t, int32_t stream_id, uint32_t error)
{
    struct cmg_notify_reports *r = t->gw->notify_reports;
    char why[64];

    if (!r || r->tun != t || r->stream != stream_id)
        return false;
    snprintf(why, sizeof(why), error ? "stream reset" : "status %d", r->status);
    settled(t->gw, r, !error && r->status == 204, why);
    return true;
}

void cmg_notify_report_tunnel_gone(struct cmg_tunnel *t)
{
    struct cmg_notify_reports *r = t->gw->notify_reports;
    if (r && r->tun == t)
        settled(t->gw, r, false, "tunnel lost");
}

int cmg_notify_report_start(struct cmg_gateway *gw)
{
    if (!(gw->notify_reports = calloc(1, sizeof(*gw->notify_reports))))
        return -1;
    gw->notify_reports->stream = -1;
    gw->notify_reports->gw = gw;
    return 0;
}

void cmg_notify_report_stop(struct cmg_gateway *gw)
{
    struct cmg_notify_reports *r = gw->notify_reports;
    if (!r)
        return;
    cmg_timer_stop(gw->loop, &r->timer);
    cmg_buf_free(&r->delivered);
    cmg_buf_free(&r->opened);
    cmg_buf_free(&r->closed);
    free(r->body);
    free(r);
    gw->notify_reports = NULL;
}
