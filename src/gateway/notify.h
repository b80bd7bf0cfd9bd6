/* Client notifications at the gateway (docs/notify-channel.md): the window of the
 * site's notifications that connectors carry up the tunnels (control messages
 * notify-sync and notify), the devices' channels (GET /CCM_Notify, Server-Sent Events
 * over HTTP/1.1 or one HTTP/2 stream), and the notify reports back to the site. */
#ifndef CMG_GW_NOTIFY_H
#define CMG_GW_NOTIFY_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CMG_NOTIFY_PATH "/CCM_Notify"
#define CMG_NOTIFY_REPORT_PATH "/.cmg/notify-report"
#define CMG_NOTIFY_MAX_DEVICES 100000
#define CMG_NOTIFY_MAX_DATA (16 * 1024)
#define CMG_NOTIFY_MAX_ID 127

struct cmg_gateway;
struct cmg_device;
struct cmg_tunnel;
struct cmg_headers;
struct cmg_identity;
struct cmg_answer;
struct cmg_notify_channel;

/* Why a channel ended: the label of cmg_notify_closed_total. */
enum cmg_notify_close {
    CMG_NOTIFY_PEER, CMG_NOTIFY_REPLACED, CMG_NOTIFY_OVERFLOW, CMG_NOTIFY_BLOCKED,
    CMG_NOTIFY_EXPIRED, CMG_NOTIFY_DRAIN, CMG_NOTIFY_CLOSES
};
extern const char *const cmg_notify_close_names[CMG_NOTIFY_CLOSES];

/* What a channel's protocol does with the bytes the hub gives it. */
struct cmg_notify_sink_ops {
    /* Queues one message: over HTTP/1.1 `framed` (a whole chunk), over HTTP/2 `sse`
     * (its payload). 0, or -1 (out of memory). */
    int (*write)(void *sink, const char *framed, size_t flen, const char *sse, size_t slen);
    /* Bytes queued for the device and not yet taken by its socket (over HTTP/2: this
     * stream's bytes not yet framed). A replay goes on while they leave room. */
    size_t (*pending)(void *sink);
    /* Ends the channel: graceful (the last chunk / END_STREAM, then the connection or
     * stream closes as usual) or at once (overflow). The protocol lets go of ch and
     * calls cmg_notify_gone(ch) before it returns. */
    void (*end)(void *sink, struct cmg_notify_channel *ch, bool graceful);
    /* The protocol sends later (a task) and judges notify_buffer itself after each
     * send attempt (cmg_notify_overflow): bytes just queued were never offered. */
    bool deferred;
};

/* The hub: created at start, freed at exit. */
int cmg_notify_start(struct cmg_gateway *gw);
void cmg_notify_stop(struct cmg_gateway *gw);

/* Control messages from a connector (tunnel.c): true if it was one of ours. */
bool cmg_notify_control(struct cmg_gateway *gw, const char *type, const cJSON *msg,
                        const char *from);

/* The target names the channel (a query string is ignored). */
bool cmg_notify_names(const char *target, size_t len);
/* Admission of GET /CCM_Notify: 0 with *id (and *expires, the credential's end, 0 if
 * none), or the status to answer with *answer (a refusal). */
int cmg_notify_admit(struct cmg_device *d, const char *method, const struct cmg_headers *in,
                     bool has_body, struct cmg_identity *id, int64_t *expires,
                     struct cmg_answer *answer);
/* The response head's fields (both protocols send them). */
#define CMG_NOTIFY_CONTENT_TYPE "text/event-stream"
/* A channel is registered (an older one of the device is ended: replaced); NULL if out
 * of memory. Its protocol queues the response head, keeps ch, then calls
 * cmg_notify_begin(ch): retry:, then the replay (or the wait for the first notify-sync).
 * Either may end ch through the sink's end(). */
struct cmg_notify_channel *cmg_notify_open(struct cmg_gateway *gw, struct cmg_device *d,
                                           const struct cmg_identity *id, int64_t expires,
                                           const struct cmg_headers *in,
                                           const struct cmg_notify_sink_ops *ops, void *sink);
void cmg_notify_begin(struct cmg_notify_channel *ch);
/* What the device took left room: a replay paused by notify_buffer goes on. */
void cmg_notify_resume(struct cmg_notify_channel *ch);
/* A deferred protocol found more than notify_buffer unsent after a send attempt. */
void cmg_notify_overflow(struct cmg_notify_channel *ch);
/* Why the hub ends it (valid in the sink's end(), before cmg_notify_gone). */
const char *cmg_notify_close_reason(const struct cmg_notify_channel *ch);
/* Its protocol lets go of it (the device closed, or the end the hub asked for). */
void cmg_notify_gone(struct cmg_notify_channel *ch);

/* A new policy is in force: channels it blocks or revokes end. */
void cmg_notify_policy(struct cmg_gateway *gw);
/* The drain begins: every channel ends now. */
void cmg_notify_drain(struct cmg_gateway *gw);

/* Notify reports (notify_report.c). */
void cmg_notify_report_delivered(struct cmg_gateway *gw, uint64_t seq, const char *device);
void cmg_notify_report_opened(struct cmg_gateway *gw, const char *device);
void cmg_notify_report_closed(struct cmg_gateway *gw, const char *device, int64_t when);
/* The site's epoch changed: unsent deliveries of the old one are dropped. */
void cmg_notify_report_epoch(struct cmg_gateway *gw);
/* Records dropped so far (the site took no report for too long, or the epoch changed). */
uint64_t cmg_notify_report_dropped(const struct cmg_gateway *gw);
/* Tunnel hooks: the :status of a stream, and its end. true if it was the report's. */
bool cmg_notify_report_status(struct cmg_tunnel *t, int32_t stream_id, int status);
bool cmg_notify_report_closed_stream(struct cmg_tunnel *t, int32_t stream_id, uint32_t error);
void cmg_notify_report_tunnel_gone(struct cmg_tunnel *t);
int cmg_notify_report_start(struct cmg_gateway *gw);
void cmg_notify_report_stop(struct cmg_gateway *gw);
const char *cmg_gw_notify_epoch(const struct cmg_gateway *gw);

/* Whether the device holds a channel here now (not one being ended). */
bool cmg_notify_channel_open(struct cmg_gateway *gw, const char *device);

#endif
