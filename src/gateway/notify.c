/* The notification hub: the window of the site's notifications (contiguous seqs, the
 * newest notify_window and none older than 24 h), the device registry (a hash map
 * device id -> channel, one channel per device: a newer one replaces the older), and
 * delivery. Each notification is formatted once (an HTTP/1.1 chunk whose payload is the
 * SSE event, which HTTP/2 streams send alone) and written to every channel it targets:
 * a list by lookup, a broadcast by walking the channels. One 1-s sweep timer serves
 * every channel: heartbeats, expired credentials, the wait for the first notify-sync. */
#include "gateway/notify.h"
#include "core/log.h"
#include "core/metrics.h"
#include "gateway/gw.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WINDOW_MAX_AGE_S (24 * 3600)
/* Past this, the oldest notifications leave the window whatever notify_window says. */
#define WINDOW_MAX_BYTES (256u << 20)
/* After a notify-sync whose backlog did not come (the connector keeps less), replay
 * decisions wait no longer than this. */
#define SYNC_GRACE_MS 2000
#define SWEEP_MS 1000
#define EPOCH_LEN 16
#define MAX_SEQ (1ull << 53)
/* Channels one loop round visits for live deliveries: a broadcast to many goes out in
 * slices, so that tunnels and other devices keep flowing meanwhile. */
#define FAN_SLICE 2000
/* Channels one loop round checks against a new policy. A certificate's chain is verified
 * again (0.1-0.2 ms) only when the policy's trust changed (its CTL, CRL, revocation check
 * or clock skew: cmg_device_cert); otherwise a check is a few lookups and 100,000
 * channels take a few loop rounds. A new CRL costs 10-20 s of rounds for 100,000
 * certificate channels, the loop going on between slices. */
#define POLICY_SLICE 2000
/* A site's epoch changes when its store is made anew: rarely. More often than this, a
 * change waits (a connector flapping between two sites costs the fleet nothing). */
#define EPOCH_CHANGE_MIN_MS 10000

const char *const cmg_notify_close_names[CMG_NOTIFY_CLOSES] = {
    "peer", "replaced", "overflow", "blocked", "expired", "drain"};

/* One notification (or tombstone) of the window, formatted once; held by the window
 * and by the fan-out queue while its live delivery is under way. */
struct event {
    int refs;
    uint64_t seq;
    int64_t created, expires;   /* created: the site's, or when a tombstone came */
    bool tombstone, all;
    char **devices;           /* sorted, into arena */
    size_t ndevices;
    char *arena;
    size_t mem;               /* what it holds, for WINDOW_MAX_BYTES */
    size_t prefix;            /* the chunk-size line before the SSE bytes */
    size_t len;               /* prefix + SSE + CRLF */
    char wire[];
};

struct cmg_notify_channel {
    struct cmg_notify_hub *hub;
    struct cmg_device *d;
    const struct cmg_notify_sink_ops *ops;
    void *sink;
    struct cmg_notify_channel *hnext;        /* hash chain */
    struct cmg_notify_channel *prev, *next;  /* every open channel */
    uint64_t sent_seq;        /* never a seq at or below this one again */
    uint64_t resume_seq;      /* Last-Event-ID, while the replay waits */
    uint64_t replay_next;     /* a replay paused by notify_buffer goes on from here */
    uint64_t hb_due_ms;
    uint32_t gen;             /* the hub's epoch generation its ids are of */
    int64_t expires;          /* unix seconds; 0: the credential does not expire */
    uint64_t issuer_hash;     /* OIDC: the issuer the token was taken under */
    uint16_t subject_at;      /* OIDC subject (UPN), after device[] (at most 128 bytes) */
    uint32_t jti_at;          /* token jti, after the subject (which has no bound) */
    uint8_t method;
    uint8_t reason;           /* enum cmg_notify_close */
    bool mapped, linked, waiting, has_resume, ended, replaying;
    char resume_epoch[EPOCH_LEN + 1];
    char device[];
};

struct cmg_notify_hub {
    struct cmg_gateway *gw;
    char epoch[EPOCH_LEN + 1];
    bool synced;
    uint64_t last;            /* the site's newest seq, as the last notify-sync said */
    uint64_t sync_ms;
    struct event **ring;      /* seq % cap */
    uint32_t cap, count;      /* the window is (hi - count, hi] */
    uint64_t hi;
    size_t mem;
    struct cmg_notify_channel **buckets;
    size_t nbuckets, nchannels;
    struct cmg_notify_channel *all;
    uint32_t nwaiting;
    struct cmg_timer sweep;
    /* live deliveries, in seq order: the event at the head goes out from `cursor` (a
     * broadcast) or `pos` (a list) on; later ones wait for it */
    struct event **queue;
    size_t qhead, qlen, qcap;
    struct cmg_notify_channel *cursor;
    size_t pos;
    size_t qmem;              /* what the queued events hold: at most WINDOW_MAX_BYTES */
    bool started;
    bool walk;                /* the list at the head is longer than the channels: walk them */
    bool told_bytes;          /* the byte cap shortened the window (logged once) */
    struct cmg_task fan_task;
    struct cmg_notify_channel *policy_cursor;   /* the next channel a new policy checks */
    struct cmg_task policy_task;
    /* Channels start (the replay decision) and move to a new epoch (one reset) in
     * slices too: walks that go on from these. */
    struct cmg_notify_channel *begin_cursor, *epoch_cursor;
    struct cmg_task begin_task, epoch_task;
    uint32_t gen;             /* epoch changes so far */
    uint64_t epoch_ms;        /* when the epoch last changed */
    char next_epoch[EPOCH_LEN + 1];   /* a change that waits for EPOCH_CHANGE_MIN_MS */
    uint64_t next_last;
    uint64_t deliveries;
    uint64_t closed[CMG_NOTIFY_CLOSES];
};

static void queue_clear(struct cmg_notify_hub *hub);

#define HUB_OF(t) ((struct cmg_notify_hub *)((char *)(t) - offsetof(struct cmg_notify_hub, sweep)))

static int64_t now_s(void) { return (int64_t)time(NULL); }

/* ---- the registry ---- */

static uint64_t hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static struct cmg_notify_channel **bucket(struct cmg_notify_hub *hub, const char *device)
{
    return &hub->buckets[hash(device) & (hub->nbuckets - 1)];
}

static struct cmg_notify_channel *lookup(struct cmg_notify_hub *hub, const char *device)
{
    struct cmg_notify_channel *ch = *bucket(hub, device);
    while (ch && strcmp(ch->device, device))
        ch = ch->hnext;
    return ch;
}

bool cmg_notify_channel_open(struct cmg_gateway *gw, const char *device)
{
    const struct cmg_notify_channel *ch = gw->notify ? lookup(gw->notify, device) : NULL;
    return ch && !ch->ended;
}

/* Twice the buckets once there are more channels than buckets. */
static void grow(struct cmg_notify_hub *hub)
{
    size_t n = hub->nbuckets * 2;
    struct cmg_notify_channel **b = calloc(n, sizeof(*b)), **old = hub->buckets;
    size_t oldn = hub->nbuckets;

    if (!b)
        return;   /* longer chains, still correct */
    hub->buckets = b;
    hub->nbuckets = n;
    for (size_t i = 0; i < oldn; i++)
        for (struct cmg_notify_channel *ch = old[i], *next; ch; ch = next) {
            struct cmg_notify_channel **slot = bucket(hub, ch->device);
            next = ch->hnext;
            ch->hnext = *slot;
            *slot = ch;
        }
    free(old);
}

static void map(struct cmg_notify_hub *hub, struct cmg_notify_channel *ch)
{
    struct cmg_notify_channel **slot;
    if (hub->nchannels + 1 > hub->nbuckets)
        grow(hub);
    slot = bucket(hub, ch->device);
    ch->hnext = *slot;
    *slot = ch;
    ch->mapped = true;
    hub->nchannels++;
}

static void unmap(struct cmg_notify_hub *hub, struct cmg_notify_channel *ch)
{
    struct cmg_notify_channel **p = bucket(hub, ch->device);
    if (!ch->mapped)
        return;
    while (*p && *p != ch)
        p = &(*p)->hnext;
    if (*p)
        *p = ch->hnext;
    ch->mapped = false;
    hub->nchannels--;
}

static void unlink_channel(struct cmg_notify_hub *hub, struct cmg_notify_channel *ch)
{
    if (!ch->linked)
        return;
    if (hub->cursor == ch)   /* a broadcast under way goes on with the next */
        hub->cursor = ch->next;
    if (hub->policy_cursor == ch)
        hub->policy_cursor = ch->next;
    if (hub->begin_cursor == ch)
        hub->begin_cursor = ch->next;
    if (hub->epoch_cursor == ch)
        hub->epoch_cursor = ch->next;
    if (ch->prev)
        ch->prev->next = ch->next;
    else
        hub->all = ch->next;
    if (ch->next)
        ch->next->prev = ch->prev;
    ch->linked = false;
    if (ch->waiting)
        hub->nwaiting--;
    ch->waiting = false;
}

/* ---- writing to a channel ---- */

/* The chunk framing of HTTP/1.1 around SSE bytes: "<hex>\r\n" + sse + "\r\n" in out
 * (room for n + 16 bytes). Its length. */
static size_t frame(char *out, const char *sse, size_t n, size_t *prefix)
{
    int p = snprintf(out, 16, "%zx\r\n", n);
    memcpy(out + p, sse, n);
    memcpy(out + p + n, "\r\n", 2);
    *prefix = (size_t)p;
    return (size_t)p + n + 2;
}

/* Ends the channel (for `reason`); its protocol lets go of it. Not touched after. */
static void end_channel(struct cmg_notify_channel *ch, enum cmg_notify_close reason, bool graceful)
{
    struct cmg_notify_hub *hub = ch->hub;

    if (ch->ended)
        return;
    ch->ended = true;
    ch->reason = (uint8_t)reason;
    unmap(hub, ch);
    unlink_channel(hub, ch);
    if (reason == CMG_NOTIFY_OVERFLOW)
        cmg_info("notify channel of device %s closed: more than notify_buffer (%llu bytes) "
                 "queued that it did not take", ch->device,
                 (unsigned long long)hub->gw->cfg.notify_buffer);
    else
        cmg_debug("notify channel of device %s ended: %s", ch->device, cmg_notify_close_names[reason]);
    ch->ops->end(ch->sink, ch, graceful);
}

/* Writes framed bytes (sse at framed + prefix); past notify_buffer the channel is
 * closed, unless `admitted` (a replay's write that room_for let through: the TLS
 * record overhead it cannot count must not close a device that reads). 0, or -1 if
 * it is gone (freed: not to be touched). */
static int put_admitted(struct cmg_notify_channel *ch, const char *framed, size_t flen,
                        size_t prefix, bool admitted)
{
    int rc = ch->ops->write(ch->sink, framed, flen, framed + prefix, flen - prefix - 2);
    if (rc < 0 || (!admitted && !ch->ops->deferred &&
                   ch->ops->pending(ch->sink) > ch->hub->gw->cfg.notify_buffer)) {
        /* a write that failed: the connection is gone or out of memory */
        end_channel(ch, rc < 0 ? CMG_NOTIFY_PEER : CMG_NOTIFY_OVERFLOW, false);
        return -1;
    }
    return 0;
}

static int put(struct cmg_notify_channel *ch, const char *framed, size_t flen, size_t prefix)
{
    return put_admitted(ch, framed, flen, prefix, false);
}

/* A message made for this channel alone (retry:, a heartbeat, a reset). */
static int put_own(struct cmg_notify_channel *ch, const char *sse, size_t n)
{
    char buf[512];
    size_t prefix, len;
    if (n + 16 > sizeof(buf))
        return -1;
    len = frame(buf, sse, n, &prefix);
    return put(ch, buf, len, prefix);
}

/* 0, or -1 if the write ended the channel (then it is freed). */
static int send_event(struct cmg_notify_channel *ch, const struct event *e, bool admitted)
{
    ch->sent_seq = e->seq;
    if (put_admitted(ch, e->wire, e->len, e->prefix, admitted) < 0)
        return -1;
    ch->hub->deliveries++;
    cmg_notify_report_delivered(ch->hub->gw, e->seq, ch->device);
    return 0;
}

/* A live notification: a channel still replaying gets it from the window, in order. */
static void deliver(struct cmg_notify_channel *ch, const struct event *e)
{
    if (ch->ended || ch->waiting || ch->replaying || ch->gen != ch->hub->gen ||
        e->seq <= ch->sent_seq)
        return;   /* waiting for its replay, or for its reset into the new epoch */
    send_event(ch, e, false);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool targets(const struct event *e, const char *device)
{
    return e->all || (e->ndevices &&
                      bsearch(&device, e->devices, e->ndevices, sizeof(char *), cmp_str));
}

static uint64_t jitter(uint64_t ms, unsigned pct)
{
    uint32_t r = 0;
    RAND_bytes((unsigned char *)&r, sizeof(r));
    return ms - ms * pct / 100 + (uint64_t)((double)r / 4294967296.0 * (double)(ms * pct * 2 / 100));
}

/* ---- the window ---- */

static void event_free(struct event *e)
{
    if (!e || --e->refs > 0)
        return;
    free(e->devices);
    free(e->arena);
    free(e);
}

static uint64_t window_lo(const struct cmg_notify_hub *hub)
{
    return hub->count ? hub->hi - hub->count + 1 : hub->last + 1;
}

static struct event *at(const struct cmg_notify_hub *hub, uint64_t seq)
{
    return hub->ring[seq % hub->cap];
}

static void drop_oldest(struct cmg_notify_hub *hub)
{
    uint64_t lo = hub->hi - hub->count + 1;
    struct event *e = at(hub, lo);

    hub->ring[lo % hub->cap] = NULL;
    if (e)
        hub->mem -= e->mem;
    event_free(e);
    hub->count--;
}

static void window_clear(struct cmg_notify_hub *hub)
{
    while (hub->count)
        drop_oldest(hub);
    hub->hi = 0;
}

/* The window keeps the newest notify_window seqs, none older than 24 h. */
static void window_trim(struct cmg_notify_hub *hub)
{
    int64_t oldest = now_s() - WINDOW_MAX_AGE_S;
    while (hub->count && hub->count > hub->cap)
        drop_oldest(hub);
    if (hub->mem > WINDOW_MAX_BYTES && !hub->told_bytes) {
        cmg_info("notifications: the window holds more than %u MiB: its oldest leave before "
                 "notify_window (%u) is reached", WINDOW_MAX_BYTES >> 20, hub->cap);
        hub->told_bytes = true;
    }
    while (hub->count && hub->mem > WINDOW_MAX_BYTES)
        drop_oldest(hub);
    while (hub->count) {
        const struct event *e = at(hub, hub->hi - hub->count + 1);
        if (e && e->created >= oldest)
            break;
        drop_oldest(hub);
    }
}

/* ---- replay ---- */

static void send_reset(struct cmg_notify_channel *ch, const char *reason)
{
    struct cmg_notify_hub *hub = ch->hub;
    uint64_t top = hub->hi > hub->last ? hub->hi : hub->last;
    char sse[256];
    int n = snprintf(sse, sizeof(sse), "id: %s-%llu\nevent: reset\ndata: {\"reason\":\"%s\"}\n\n",
                     hub->epoch, (unsigned long long)top, reason);

    /* Seqs the window does not hold yet (a backlog still on its way) go out when they
     * come: the reset names the site's newest, but only what was here is skipped. */
    ch->sent_seq = hub->hi;
    ch->replaying = false;
    put_own(ch, sse, (size_t)n);
}

/* Room for e: the queue is empty, or e fits under notify_buffer with what waits. */
static bool room_for(const struct cmg_notify_channel *ch, const struct event *e)
{
    size_t pending = ch->ops->pending(ch->sink);
    return pending == 0 || pending + e->len <= ch->hub->gw->cfg.notify_buffer;
}

/* Every unexpired notification of the window after `from` that targets the device,
 * as far as notify_buffer leaves room: the rest when the device has taken it
 * (cmg_notify_resume), so that a replay never overflows a device that reads. */
static void replay(struct cmg_notify_channel *ch, uint64_t from)
{
    struct cmg_notify_hub *hub = ch->hub;
    int64_t now = now_s();

    ch->replaying = false;
    for (uint64_t seq = from > window_lo(hub) ? from : window_lo(hub); seq <= hub->hi && hub->count;
         seq++) {
        const struct event *e = at(hub, seq);
        if (ch->ended)
            return;
        if (!e || e->tombstone || e->expires <= now || seq <= ch->sent_seq ||
            !targets(e, ch->device))
            continue;
        if (!room_for(ch, e)) {
            ch->replaying = true;
            ch->replay_next = seq;
            return;
        }
        if (send_event(ch, e, true) < 0)
            return;   /* the write ended the channel: it is freed */
    }
}

/* A paused replay goes on when the device has taken what was queued; not into a new
 * epoch (reset_slice gives the channel its reset first), nor past seqs the window
 * dropped meanwhile (the device gets a reset instead of a silent gap). */
void cmg_notify_resume(struct cmg_notify_channel *ch)
{
    if (!ch || !ch->replaying || ch->ended)
        return;
    if (ch->gen != ch->hub->gen)
        ch->replaying = false;
    else if (ch->replay_next < window_lo(ch->hub))
        send_reset(ch, "window");
    else
        replay(ch, ch->replay_next);
}

const char *cmg_notify_close_reason(const struct cmg_notify_channel *ch)
{
    return cmg_notify_close_names[ch->reason];
}

void cmg_notify_overflow(struct cmg_notify_channel *ch)
{
    end_channel(ch, CMG_NOTIFY_OVERFLOW, false);
}

/* The window can prove what a channel missed: replay it, or one reset if not. */
static void begin(struct cmg_notify_channel *ch)
{
    struct cmg_notify_hub *hub = ch->hub;
    uint64_t top = hub->hi > hub->last ? hub->hi : hub->last;

    if (ch->waiting)
        hub->nwaiting--;
    ch->waiting = false;
    ch->gen = hub->gen;
    if (!ch->has_resume) {
        replay(ch, 1);
        return;
    }
    if (strcmp(ch->resume_epoch, hub->epoch))
        send_reset(ch, "epoch");
    else if (ch->resume_seq > top)
        send_reset(ch, "ahead");
    else if (ch->resume_seq + 1 < window_lo(hub))
        send_reset(ch, "window");
    else {
        ch->sent_seq = ch->resume_seq;
        replay(ch, ch->resume_seq + 1);
    }
}

/* Replay decisions wait for the first notify-sync, and for its backlog (or a grace). */
static bool window_ready(const struct cmg_notify_hub *hub)
{
    return hub->synced &&
           (hub->hi >= hub->last ||
            cmg_loop_now(hub->gw->loop) - hub->sync_ms >= SYNC_GRACE_MS);
}

static void on_begin_task(struct cmg_task *t);

/* The waiting channels start FAN_SLICE a loop round (after a restart every device
 * comes back at once): the walk goes on from begin_cursor. */
static void begin_waiting(struct cmg_notify_hub *hub)
{
    unsigned budget = FAN_SLICE;

    if (!hub->nwaiting || !window_ready(hub))
        return;
    if (!hub->begin_cursor)
        hub->begin_cursor = hub->all;
    while (hub->begin_cursor && hub->nwaiting && budget--) {
        struct cmg_notify_channel *ch = hub->begin_cursor;
        hub->begin_cursor = ch->next;   /* before: beginning may end ch */
        if (ch->waiting)
            begin(ch);
    }
    if (!hub->nwaiting)
        hub->begin_cursor = NULL;
    else   /* more on the way, or some opened behind the walk: from the start again */
        cmg_task_post(hub->gw->loop, &hub->begin_task, on_begin_task);
}

static void on_begin_task(struct cmg_task *t)
{
    begin_waiting((struct cmg_notify_hub *)((char *)t - offsetof(struct cmg_notify_hub, begin_task)));
}

static void on_epoch_task(struct cmg_task *t);

/* Channels of the old epoch: their ids mean nothing now, one reset each, FAN_SLICE a
 * loop round; live events of the new epoch wait for a channel's reset (deliver()). */
static void reset_slice(struct cmg_notify_hub *hub)
{
    unsigned budget = FAN_SLICE;

    while (hub->epoch_cursor && budget--) {
        struct cmg_notify_channel *ch = hub->epoch_cursor;
        hub->epoch_cursor = ch->next;   /* before: the reset may end ch */
        if (ch->gen == hub->gen || ch->waiting)
            continue;   /* opened since, or its decision waits: it starts in the new epoch */
        ch->gen = hub->gen;
        send_reset(ch, "epoch");
    }
    if (hub->epoch_cursor)
        cmg_task_post(hub->gw->loop, &hub->epoch_task, on_epoch_task);
}

static void on_epoch_task(struct cmg_task *t)
{
    reset_slice((struct cmg_notify_hub *)((char *)t - offsetof(struct cmg_notify_hub, epoch_task)));
}

/* ---- control messages ---- */

static bool is_epoch(const char *s)
{
    size_t n = strlen(s);
    if (n != EPOCH_LEN)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

static bool is_device_id(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > CMG_NOTIFY_MAX_ID)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= ' ' || s[i] > '~')
            return false;
    return true;
}

static bool is_type(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 64 || !strcmp(s, "reset"))
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
              (s[i] >= '0' && s[i] <= '9') || s[i] == '_' || s[i] == '.' || s[i] == '-'))
            return false;
    return true;
}

/* A whole number in [min, 2^53]. */
static bool get_count(const cJSON *msg, const char *name, uint64_t min, uint64_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(msg, name);
    if (!cJSON_IsNumber(v) || v->valuedouble < (double)min || v->valuedouble > 9007199254740992.0 ||
        v->valuedouble != (double)(uint64_t)v->valuedouble)
        return false;
    *out = (uint64_t)v->valuedouble;
    return true;
}

static struct cmg_log_limit epoch_flaps = {.what = "deferred epoch changes"};

/* The site's epoch and newest seq, as a notify-sync (or a deferred one) says. */
static void sync_to(struct cmg_notify_hub *hub, const char *epoch, uint64_t last, const char *from)
{
    if (strcmp(epoch, hub->epoch) && hub->epoch[0] &&
        cmg_loop_now(hub->gw->loop) - hub->epoch_ms < EPOCH_CHANGE_MIN_MS) {
        cmg_log_limited(&epoch_flaps, CMG_LOG_WARN,
                        "connector %s: the site's epoch changes again (%s, was %s) within %d s: "
                        "the change waits (are connectors of two sites on this gateway?)", from,
                        epoch, hub->epoch, EPOCH_CHANGE_MIN_MS / 1000);
        memmove(hub->next_epoch, epoch, EPOCH_LEN + 1);
        hub->next_last = last;
        return;
    }
    hub->next_epoch[0] = 0;
    if (strcmp(epoch, hub->epoch)) {
        if (hub->epoch[0])
            cmg_info("notifications: the site's epoch is now %s (was %s): the window starts anew",
                     epoch, hub->epoch);
        window_clear(hub);
        queue_clear(hub);   /* what the old epoch still had to deliver is void */
        if (hub->epoch[0]) {   /* the first epoch heard is no change */
            hub->epoch_ms = cmg_loop_now(hub->gw->loop);
            cmg_notify_report_epoch(hub->gw);
        }
        memcpy(hub->epoch, epoch, EPOCH_LEN + 1);
        hub->last = last;
        hub->gen++;
        hub->epoch_cursor = hub->all;
        reset_slice(hub);
    } else if (last > hub->last) {
        hub->last = last;
    }
    if (!hub->synced)
        cmg_info("notifications: in step with the site (epoch %s, last %llu) through %s", epoch,
                 (unsigned long long)last, from);
    hub->synced = true;
    hub->sync_ms = cmg_loop_now(hub->gw->loop);
    begin_waiting(hub);
}

static void on_sync(struct cmg_notify_hub *hub, const cJSON *msg, const char *from)
{
    const char *epoch = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(msg, "epoch"));
    uint64_t last;

    if (!epoch || !is_epoch(epoch) || !get_count(msg, "last", 0, &last)) {
        cmg_warn("connector %s: notify-sync ignored: expected {\"epoch\": 16 hex digits, "
                 "\"last\": a count}", from);
        return;
    }
    sync_to(hub, epoch, last, from);
}

/* An epoch change that waited: in force once EPOCH_CHANGE_MIN_MS have passed. */
static void deferred_epoch(struct cmg_notify_hub *hub)
{
    char epoch[EPOCH_LEN + 1];

    if (!hub->next_epoch[0] || cmg_loop_now(hub->gw->loop) - hub->epoch_ms < EPOCH_CHANGE_MIN_MS)
        return;
    memcpy(epoch, hub->next_epoch, sizeof(epoch));
    sync_to(hub, epoch, hub->next_last, "(an epoch change that waited)");
}

/* The target list, sorted, its strings in one arena. -1 if malformed. */
static int read_devices(struct event *e, const cJSON *list)
{
    const cJSON *v;
    size_t n = 0, bytes = 0, off = 0;

    cJSON_ArrayForEach(v, list) {
        const char *s = cJSON_GetStringValue(v);
        if (!s || !is_device_id(s) || ++n > CMG_NOTIFY_MAX_DEVICES)
            return -1;
        bytes += strlen(s) + 1;
    }
    if (!n || !(e->devices = malloc(n * sizeof(char *))) || !(e->arena = malloc(bytes)))
        return -1;
    cJSON_ArrayForEach(v, list) {
        size_t len = strlen(v->valuestring) + 1;
        e->devices[e->ndevices++] = memcpy(e->arena + off, v->valuestring, len);
        off += len;
    }
    qsort(e->devices, n, sizeof(char *), cmp_str);
    e->mem += n * sizeof(char *) + bytes;
    return 0;
}

/* The notification's type: "event" (what connectors add, since the message's own
 * "type" is "notify"), else the second "type" of the message. */
static const char *event_type(const cJSON *msg)
{
    const char *t = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(msg, "event"));
    const cJSON *c;
    bool first = true;

    if (t)
        return t;
    cJSON_ArrayForEach(c, msg) {
        if (!c->string || strcmp(c->string, "type"))
            continue;
        if (!first)
            return cJSON_GetStringValue(c);
        first = false;
    }
    return NULL;
}

/* The event's bytes, formatted once; NULL with why if the document is not one. */
static struct event *make_event(struct cmg_notify_hub *hub, const cJSON *msg, uint64_t seq,
                                const char **why)
{
    const char *type = event_type(msg);
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(msg, "data");
    const cJSON *devices = cJSON_GetObjectItemCaseSensitive(msg, "devices");
    bool all = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(msg, "all"));
    uint64_t expires = 0, created = 0;
    char *json = NULL;
    struct event *e = NULL;
    size_t dlen, slen, need;
    int hlen;
    char head[128];

    *why = "a type of 1..64 of [A-Za-z0-9_.-] (not reset)";
    if (!type || !is_type(type))
        goto fail;
    *why = "expires: a time";
    if (!get_count(msg, "expires", 1, &expires))
        goto fail;
    *why = "exactly one of \"all\": true or \"devices\": [...]";
    if (all == cJSON_IsArray(devices))
        goto fail;
    *why = "data: JSON of at most 16 KiB";
    if (data && !(json = cJSON_PrintUnformatted(data)))
        goto fail;
    dlen = json ? strlen(json) : 4;
    if (dlen > CMG_NOTIFY_MAX_DATA || (json && memchr(json, '\n', dlen)))
        goto fail;
    hlen = snprintf(head, sizeof(head), "id: %s-%llu\nevent: %s\ndata: ", hub->epoch,
                    (unsigned long long)seq, type);
    slen = (size_t)hlen + dlen + 2;
    need = sizeof(*e) + slen + 16 + 2;
    *why = "out of memory";
    if (!(e = calloc(1, need)))
        goto fail;
    e->refs = 1;
    e->seq = seq;
    e->created = get_count(msg, "created", 1, &created) ? (int64_t)created : now_s();
    e->expires = (int64_t)expires;
    e->all = all;
    e->mem = need;
    e->prefix = (size_t)snprintf(e->wire, 16, "%zx\r\n", slen);
    memcpy(e->wire + e->prefix, head, (size_t)hlen);
    memcpy(e->wire + e->prefix + hlen, json ? json : "null", dlen);
    memcpy(e->wire + e->prefix + hlen + dlen, "\n\n\r\n", 4);
    e->len = e->prefix + slen + 2;
    *why = "devices: 1..100000 device ids (printable ASCII, 1..127 bytes)";
    if (!all && read_devices(e, devices) < 0)
        goto fail;
    free(json);
    return e;
fail:
    free(json);
    event_free(e);
    return NULL;
}

static struct event *make_tombstone(uint64_t seq)
{
    struct event *e = calloc(1, sizeof(*e));
    if (e) {
        e->refs = 1;
        e->seq = seq;
        e->created = now_s();
        e->tombstone = true;
        e->mem = sizeof(*e);
    }
    return e;
}

/* The head of the queue goes on from where it stopped, for at most `budget` channels;
 * the number left. */
static unsigned fan_one(struct cmg_notify_hub *hub, const struct event *e, unsigned budget)
{
    if (!hub->started) {
        hub->started = true;
        hub->cursor = hub->all;
        hub->pos = 0;
        hub->walk = !e->all && e->ndevices > hub->nchannels;
    }
    if (e->all || hub->walk) {
        /* every channel, or each channel looked up in a list longer than their number */
        while (hub->cursor && budget) {
            struct cmg_notify_channel *ch = hub->cursor;
            hub->cursor = ch->next;   /* before: delivering may end ch */
            if (e->all || targets(e, ch->device))
                deliver(ch, e);
            budget--;
        }
        if (!hub->cursor)
            hub->started = false;
        return budget;
    }
    while (hub->pos < e->ndevices && budget && hub->nchannels) {
        struct cmg_notify_channel *ch = lookup(hub, e->devices[hub->pos++]);
        if (ch)
            deliver(ch, e);
        budget--;
    }
    if (hub->pos >= e->ndevices || !hub->nchannels)
        hub->started = false;
    return budget;
}

static void on_fan_task(struct cmg_task *t);

static void queue_clear(struct cmg_notify_hub *hub)
{
    while (hub->qlen) {
        hub->qmem -= hub->queue[hub->qhead]->mem;
        event_free(hub->queue[hub->qhead]);
        hub->queue[hub->qhead] = NULL;
        hub->qhead = (hub->qhead + 1) % hub->qcap;
        hub->qlen--;
    }
    hub->started = false;
    hub->cursor = NULL;
}

/* Live notifications reach the channels they target, in seq order: a list by lookup,
 * all by a walk, FAN_SLICE channels a loop round. */
static void fan_out(struct cmg_notify_hub *hub)
{
    unsigned budget = FAN_SLICE;

    while (hub->qlen && budget) {
        struct event *e = hub->queue[hub->qhead];
        budget = fan_one(hub, e, budget);
        if (hub->started)
            break;   /* the slice is spent */
        hub->queue[hub->qhead] = NULL;
        hub->qhead = (hub->qhead + 1) % hub->qcap;
        hub->qlen--;
        hub->qmem -= e->mem;
        event_free(e);
    }
    if (hub->qlen)
        cmg_task_post(hub->gw->loop, &hub->fan_task, on_fan_task);
}

static void on_fan_task(struct cmg_task *t)
{
    fan_out((struct cmg_notify_hub *)((char *)t - offsetof(struct cmg_notify_hub, fan_task)));
}

/* Queues a live notification; it goes out at once unless others are still going out. */
static struct cmg_log_limit queue_full = {.what = "notifications not delivered live"};

static void enqueue(struct cmg_notify_hub *hub, struct event *e)
{
    if (hub->qmem + e->mem > WINDOW_MAX_BYTES) {
        cmg_log_limited(&queue_full, CMG_LOG_WARN,
                        "notifications: more than %u MiB wait to go out live: %s-%llu not "
                        "delivered live (devices get it when they reconnect)",
                        WINDOW_MAX_BYTES >> 20, hub->epoch, (unsigned long long)e->seq);
        return;
    }
    if (hub->qlen == hub->qcap) {
        size_t n = hub->qcap ? hub->qcap * 2 : 16;
        struct event **q = calloc(n, sizeof(*q));
        if (!q) {
            cmg_warn("notifications: out of memory: %s-%llu not delivered live (replayed on "
                     "reconnect)", hub->epoch, (unsigned long long)e->seq);
            return;
        }
        for (size_t i = 0; i < hub->qlen; i++)
            q[i] = hub->queue[(hub->qhead + i) % hub->qcap];
        free(hub->queue);
        hub->queue = q;
        hub->qhead = 0;
        hub->qcap = n;
    }
    e->refs++;
    hub->qmem += e->mem;
    hub->queue[(hub->qhead + hub->qlen++) % hub->qcap] = e;
    if (hub->qlen == 1)
        fan_out(hub);
}

static void on_notify(struct cmg_notify_hub *hub, const cJSON *msg, const char *from)
{
    const char *id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(msg, "id"));
    char want[64];
    const char *why = "an id E-S and a seq";
    struct event *e;
    uint64_t seq;

    if (!hub->epoch[0]) {
        cmg_debug("connector %s: notify before any notify-sync: ignored", from);
        return;
    }
    if (!id || !get_count(msg, "seq", 1, &seq))
        goto bad;
    snprintf(want, sizeof(want), "%s-%llu", hub->epoch, (unsigned long long)seq);
    if (strcmp(id, want)) {
        cmg_debug("connector %s: notify %s is not of epoch %s: ignored", from, id, hub->epoch);
        return;
    }
    if (hub->count && seq <= hub->hi)
        return;   /* held already (another connector, another tunnel), or older than the window */
    if (seq > (hub->last > hub->hi ? hub->last : hub->hi) + hub->cap) {
        /* a seq far beyond the site's newest would restart the window there, and every
         * later real one would be ignored as old */
        cmg_warn("connector %s: notify %s ignored: its seq is more than notify_window (%u) "
                 "beyond the newest the site announced (%llu)", from, id, hub->cap,
                 (unsigned long long)(hub->last > hub->hi ? hub->last : hub->hi));
        return;
    }
    if (!hub->count && seq <= hub->hi)
        return;
    if (hub->count && seq != hub->hi + 1) {
        cmg_info("notifications: %llu follows %llu: the window starts again at %llu",
                 (unsigned long long)seq, (unsigned long long)hub->hi, (unsigned long long)seq);
        window_clear(hub);
    }
    e = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(msg, "expired")) ? make_tombstone(seq)
                                                                       : make_event(hub, msg, seq, &why);
    if (!e)
        goto bad;
    while (hub->count >= hub->cap)   /* its slot in the ring is the oldest's */
        drop_oldest(hub);
    hub->ring[seq % hub->cap] = e;
    hub->hi = seq;
    hub->count++;
    hub->mem += e->mem;
    if (seq > hub->last)
        hub->last = seq;
    window_trim(hub);
    /* the newest goes last: an empty window means it was older than the window's 24 h
     * (a site clock far from this one) and is freed already */
    if (hub->count && !e->tombstone && e->expires > now_s())
        enqueue(hub, e);
    begin_waiting(hub);
    return;
bad:
    cmg_warn("connector %s: notify %s ignored: expected %s", from, id ? id : "(no id)", why);
}

bool cmg_notify_control(struct cmg_gateway *gw, const char *type, const cJSON *msg, const char *from)
{
    if (!strcmp(type, "notify-sync"))
        on_sync(gw->notify, msg, from);
    else if (!strcmp(type, "notify"))
        on_notify(gw->notify, msg, from);
    else
        return false;
    return true;
}

const char *cmg_gw_notify_epoch(const struct cmg_gateway *gw)
{
    return gw->notify ? gw->notify->epoch : "";
}

/* ---- admission ---- */

bool cmg_notify_names(const char *target, size_t len)
{
    size_t n = sizeof(CMG_NOTIFY_PATH) - 1;
    return len >= n && !memcmp(target, CMG_NOTIFY_PATH, n) && (len == n || target[n] == '?');
}

static bool accepts_sse(const struct cmg_headers *in)
{
    for (uint32_t i = 0; i < in->n; i++)
        if (cmg_header_is(in, i, "accept") &&
            memmem(cmg_headers_value(in, i), in->v[i].value_len, CMG_NOTIFY_CONTENT_TYPE,
                   sizeof(CMG_NOTIFY_CONTENT_TYPE) - 1))
            return true;
    return false;
}

int cmg_notify_admit(struct cmg_device *d, const char *method, const struct cmg_headers *in,
                     bool has_body, struct cmg_identity *id, int64_t *expires,
                     struct cmg_answer *answer)
{
    /* Any of the three credentials; a bulk token is refused as on any path but the
     * registration one (its mapping type is not "site"). */
    static struct cmg_policy_mapping channel = {
        .role = "CCM_Notify", .type = "notify",
        .auth = CMG_AUTH_CERT | CMG_AUTH_TOKEN | CMG_AUTH_OIDC};
    struct cmg_path path = {.rest = "", .rest_len = 0};
    const char *reason = NULL;
    int status = 0;

    *expires = 0;
    memset(id, 0, sizeof(*id));
    path.kind = cmg_headers_find(in, "authorization") >= 0 ? CMG_PATH_SERVER_AUTH
                                                            : CMG_PATH_MUTUAL_AUTH;
    if (strcmp(method, "GET"))
        status = 405, reason = "CMGService_Method_Not_Allowed";
    else if (has_body)
        status = 413, reason = "CMGService_Request_Too_Large";
    else if (d->gw->state == CMG_GW_DRAINING || !d->gw->notify)
        status = 503, reason = "CMGService_Draining";
    else if ((status = cmg_authenticate(d, d->gw->policy, &channel, &path, in, id, &reason)) != 0)
        ;
    else if (!is_device_id(id->device_id))
        status = 403, reason = "CMGService_No_Device_Id";
    else if (!accepts_sse(in))
        status = 406, reason = "CMGService_Not_Acceptable";
    if (status) {
        *answer = cmg_answer_refusal(status, reason);
        answer->claim = id->failed_claim;
        answer->cert = id->failed_cert;
        return status;
    }
    if (id->method != CMG_ID_CERT)
        *expires = cmg_device_token_expiry(d);
    return 0;
}

/* ---- channels ---- */

/* Last-Event-ID: E-S (16 lower-case hex digits, a decimal seq). */
static void read_resume(struct cmg_notify_channel *ch, const struct cmg_headers *in)
{
    int i = cmg_headers_find(in, "last-event-id");
    const char *v;
    size_t n;

    if (i < 0)
        return;
    v = cmg_headers_value(in, (uint32_t)i);
    n = in->v[i].value_len;
    ch->has_resume = true;   /* a malformed one proves nothing: a reset */
    if (n < EPOCH_LEN + 2 || n > EPOCH_LEN + 1 + 16 || v[EPOCH_LEN] != '-')
        return;   /* a seq is at most 2^53: 16 digits */
    memcpy(ch->resume_epoch, v, EPOCH_LEN);
    ch->resume_epoch[EPOCH_LEN] = 0;
    if (!is_epoch(ch->resume_epoch)) {
        ch->resume_epoch[0] = 0;
        return;
    }
    for (size_t k = EPOCH_LEN + 1; k < n; k++) {
        if (v[k] < '0' || v[k] > '9') {
            ch->resume_epoch[0] = 0;
            return;
        }
        ch->resume_seq = ch->resume_seq * 10 + (uint64_t)(v[k] - '0');
    }
    if (ch->resume_seq > MAX_SEQ)
        ch->resume_epoch[0] = 0;
}

static void link_channel(struct cmg_notify_hub *hub, struct cmg_notify_channel *ch)
{
    ch->next = hub->all;
    if (ch->next)
        ch->next->prev = ch;
    hub->all = ch;
    ch->linked = true;
}

struct cmg_notify_channel *cmg_notify_open(struct cmg_gateway *gw, struct cmg_device *d,
                                           const struct cmg_identity *id, int64_t expires,
                                           const struct cmg_headers *in,
                                           const struct cmg_notify_sink_ops *ops, void *sink)
{
    struct cmg_notify_hub *hub = gw->notify;
    bool oidc = id->method == CMG_ID_OIDC, token = id->method != CMG_ID_CERT;
    size_t n = strlen(id->device_id) + 1, ns = oidc ? strlen(id->subject) + 1 : 1,
           nj = token ? strlen(id->jti) + 1 : 1;
    struct cmg_notify_channel *ch = calloc(1, sizeof(*ch) + n + ns + nj), *old;

    if (!ch)
        return NULL;
    ch->hub = hub;
    ch->d = d;
    ch->ops = ops;
    ch->sink = sink;
    ch->expires = expires;
    ch->method = (uint8_t)id->method;
    ch->gen = hub->gen;
    memcpy(ch->device, id->device_id, n);
    /* what a later policy may block: the OIDC subject, the token's jti, the issuer */
    ch->subject_at = (uint16_t)n;
    ch->jti_at = (uint32_t)(n + ns);
    memcpy(ch->device + ch->subject_at, oidc ? id->subject : "", ns);
    memcpy(ch->device + ch->jti_at, token ? id->jti : "", nj);
    if (oidc && gw->policy)
        ch->issuer_hash = hash(gw->policy->oidc_issuer);
    read_resume(ch, in);
    if ((old = lookup(hub, ch->device)) != NULL)
        end_channel(old, CMG_NOTIFY_REPLACED, true);
    else
        cmg_notify_report_opened(gw, ch->device);
    map(hub, ch);
    link_channel(hub, ch);
    ch->hb_due_ms = cmg_loop_now(gw->loop) + jitter(gw->cfg.notify_heartbeat_ms, 20);
    return ch;
}

void cmg_notify_begin(struct cmg_notify_channel *ch)
{
    struct cmg_notify_hub *hub = ch->hub;
    char sse[64];
    int len = snprintf(sse, sizeof(sse), "retry: %llu\n\n",
                       (unsigned long long)jitter(hub->gw->cfg.notify_retry_ms, 50));

    if (put_own(ch, sse, (size_t)len) < 0)
        return;   /* ended already */
    if (window_ready(hub))
        begin(ch);
    else {
        ch->waiting = true;
        hub->nwaiting++;
    }
}

void cmg_notify_gone(struct cmg_notify_channel *ch)
{
    struct cmg_notify_hub *hub = ch->hub;

    if (!ch->ended)
        ch->reason = CMG_NOTIFY_PEER;
    unmap(hub, ch);
    unlink_channel(hub, ch);
    hub->closed[ch->reason]++;
    if (ch->reason != CMG_NOTIFY_REPLACED)
        cmg_notify_report_closed(hub->gw, ch->device, now_s());
    free(ch);
}

/* ---- policy, drain, the sweep ---- */

static bool blocked_as(const struct cmg_policy *p, const char *kind, const char *id)
{
    char key[300];
    return p->nblocked_devices && snprintf(key, sizeof(key), "%s%s", kind, id) < (int)sizeof(key) &&
           cmg_policy_device_blocked(p, key);
}

/* A CRL that cannot be used refuses new requests, but does not close every
 * certificate channel at once: only a verdict the CRL or the trust proves does. */
static bool cert_still_good(struct cmg_device *d)
{
    return cmg_device_cert(d) == CMG_CERT_OK ||
           (d->cert == CMG_CERT_INVALID && cmg_policy_crl_error(d->cert_error));
}

static bool oidc_still_good(const struct cmg_notify_channel *ch, const struct cmg_policy *p)
{
    return p->oidc && hash(p->oidc_issuer) == ch->issuer_hash &&
           !(ch->device[ch->subject_at] && blocked_as(p, "oidc:", ch->device + ch->subject_at));
}

static bool still_allowed(struct cmg_notify_channel *ch, const struct cmg_policy *p)
{
    struct cmg_device *d = ch->d;

    if (ch->method == CMG_ID_CERT && !cert_still_good(d))
        return false;   /* revoked, or no longer trusted */
    if (ch->method == CMG_ID_OIDC && !oidc_still_good(ch, p))
        return false;   /* OIDC off, another issuer, or its user blocked */
    if (ch->device[ch->jti_at] && cmg_policy_token_revoked(p, ch->device + ch->jti_at))
        return false;
    if (blocked_as(p, ch->method == CMG_ID_OIDC ? "oidc:" : "", ch->device))
        return false;
    return !(d->has_cert && blocked_as(p, "cert:", d->thumbprint));
}

static void on_policy_task(struct cmg_task *t);

/* POLICY_SLICE channels a loop round, from where the last round stopped. */
static void policy_slice(struct cmg_notify_hub *hub)
{
    const struct cmg_policy *p = hub->gw->policy;
    unsigned budget = POLICY_SLICE;

    while (hub->policy_cursor && budget--) {
        struct cmg_notify_channel *ch = hub->policy_cursor;
        hub->policy_cursor = ch->next;   /* before: ending unlinks ch */
        if (!still_allowed(ch, p)) {
            cmg_info("notify channel of device %s closed: blocked or revoked by policy version %lld",
                     ch->device, (long long)p->version);
            end_channel(ch, CMG_NOTIFY_BLOCKED, true);
        }
    }
    if (hub->policy_cursor)
        cmg_task_post(hub->gw->loop, &hub->policy_task, on_policy_task);
}

static void on_policy_task(struct cmg_task *t)
{
    policy_slice((struct cmg_notify_hub *)((char *)t - offsetof(struct cmg_notify_hub, policy_task)));
}

/* Channels opened from now on are admitted under the new policy; the older ones are
 * checked in slices (a newer policy starts the walk again). */
void cmg_notify_policy(struct cmg_gateway *gw)
{
    struct cmg_notify_hub *hub = gw->notify;

    if (!hub || !gw->policy)
        return;
    hub->policy_cursor = hub->all;
    policy_slice(hub);
}

void cmg_notify_drain(struct cmg_gateway *gw)
{
    struct cmg_notify_hub *hub = gw->notify;
    size_t n = 0;

    if (!hub)
        return;
    while (hub->all) {
        end_channel(hub->all, CMG_NOTIFY_DRAIN, true);
        n++;
    }
    if (n)
        cmg_info("draining: %zu notification channel(s) ended (their devices reconnect elsewhere)", n);
}

static void heartbeat(struct cmg_notify_channel *ch, uint64_t now)
{
    static const char hb[] = ": hb\n\n";
    ch->hb_due_ms = now + jitter(ch->hub->gw->cfg.notify_heartbeat_ms, 20);
    put_own(ch, hb, sizeof(hb) - 1);
}

static void on_sweep(struct cmg_timer *t)
{
    struct cmg_notify_hub *hub = HUB_OF(t);
    uint64_t now = cmg_loop_now(hub->gw->loop);
    int64_t wall = now_s();

    for (struct cmg_notify_channel *ch = hub->all, *next; ch; ch = next) {
        next = ch->next;
        if (ch->expires && wall >= ch->expires) {
            cmg_info("notify channel of device %s closed: its token expired", ch->device);
            end_channel(ch, CMG_NOTIFY_EXPIRED, true);
        } else if (now >= ch->hb_due_ms)
            heartbeat(ch, now);
    }
    window_trim(hub);
    deferred_epoch(hub);
    begin_waiting(hub);
    cmg_timer_start(hub->gw->loop, &hub->sweep, SWEEP_MS, on_sweep);
}

/* ---- metrics ---- */

void cmg_notify_metrics(struct cmg_gateway *gw, struct cmg_buf *b)
{
    struct cmg_notify_hub *hub = gw->notify;
    size_t open = 0;

    if (!hub)
        return;
    for (struct cmg_notify_channel *ch = hub->all; ch; ch = ch->next)
        open++;
    cmg_metrics_family(b, "cmg_notify_channels", "gauge", "Notification channels open now.");
    cmg_metrics_u64(b, "cmg_notify_channels", NULL, open);
    cmg_metrics_family(b, "cmg_notify_deliveries_total", "counter",
                       "Notifications written to a device's channel.");
    cmg_metrics_u64(b, "cmg_notify_deliveries_total", NULL, hub->deliveries);
    cmg_metrics_family(b, "cmg_notify_closed_total", "counter",
                       "Notification channels ended, by reason.");
    for (int i = 0; i < CMG_NOTIFY_CLOSES; i++) {
        const char *l[] = {"reason", cmg_notify_close_names[i], NULL};
        cmg_metrics_u64(b, "cmg_notify_closed_total", l, hub->closed[i]);
    }
    cmg_metrics_family(b, "cmg_notify_report_records_dropped_total", "counter",
                       "Notify report records dropped: the site took no report for too long "
                       "(more than 16 MiB waited), or they named an old epoch.");
    cmg_metrics_u64(b, "cmg_notify_report_records_dropped_total", NULL,
                    cmg_notify_report_dropped(gw));
}

/* ---- life ---- */

int cmg_notify_start(struct cmg_gateway *gw)
{
    struct cmg_notify_hub *hub = calloc(1, sizeof(*hub));

    if (!hub || !(hub->ring = calloc(gw->cfg.notify_window, sizeof(*hub->ring))) ||
        !(hub->buckets = calloc(1024, sizeof(*hub->buckets)))) {
        if (hub)
            free(hub->ring);
        free(hub);
        cmg_error("notifications: out of memory");
        return -1;
    }
    hub->gw = gw;
    hub->cap = gw->cfg.notify_window;
    hub->nbuckets = 1024;
    gw->notify = hub;
    cmg_timer_start(gw->loop, &hub->sweep, SWEEP_MS, on_sweep);
    return cmg_notify_report_start(gw);
}

void cmg_notify_stop(struct cmg_gateway *gw)
{
    struct cmg_notify_hub *hub = gw->notify;

    if (!hub)
        return;
    cmg_notify_report_stop(gw);
    cmg_timer_stop(gw->loop, &hub->sweep);
    cmg_task_cancel(gw->loop, &hub->fan_task);
    cmg_task_cancel(gw->loop, &hub->policy_task);
    cmg_task_cancel(gw->loop, &hub->begin_task);
    cmg_task_cancel(gw->loop, &hub->epoch_task);
    queue_clear(hub);
    free(hub->queue);
    while (hub->all)   /* the devices are closed first: nothing should be left */
        unlink_channel(hub, hub->all);
    window_clear(hub);
    free(hub->ring);
    free(hub->buckets);
    free(hub);
    gw->notify = NULL;
}
