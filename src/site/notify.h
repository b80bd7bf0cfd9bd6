/* Client notifications on the site's side (docs/site.md, "Notifications"): the store's
 * notifications numbered 1, 2, 3, ... under the site's epoch, the connectors' notify
 * feed that carries them to every gateway, the gateways' notify reports (who got
 * what, which channels are open) and the counts made of them. */
#ifndef CMG_SITE_NOTIFY_H
#define CMG_SITE_NOTIFY_H

#include "site/store.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CMG_NOTIFY_MAX_DEVICES 100000          /* ids of one notification */
#define CMG_NOTIFY_MAX_LINE (4u << 20)         /* one notification document */
#define CMG_NOTIFY_MAX_DATA (16u * 1024)       /* its data, compact JSON */
#define CMG_NOTIFY_MAX_DEVICE_ID 127
#define CMG_NOTIFY_MAX_TYPE 64
#define CMG_NOTIFY_TTL_DEFAULT 3600
#define CMG_NOTIFY_TTL_MAX 86400
#define CMG_NOTIFY_FEED_BYTES (8u << 20)       /* documents in one feed answer */
#define CMG_NOTIFY_FEED_SEQS 1024              /* the feed serves the newest seqs ... */
#define CMG_NOTIFY_FEED_AGE_S 86400            /* ... of the last 24 h */
#define CMG_NOTIFY_RETENTION_S (31 * 86400)
#define CMG_NOTIFY_REPORT_MAX_IDS 65536        /* device ids in one notify report */
#define CMG_NOTIFY_ID_MAX 40                   /* "<16 hex>-<seq>" and its NUL */

/* A device id as gateways name devices: printable ASCII without space, 1..127 bytes. */
bool cmg_notify_device_ok(const char *id);
/* A type: 1..64 of [A-Za-z0-9_.-], not the gateway's own "reset". */
bool cmg_notify_type_ok(const char *type);
/* "<16 lowercase hex>-<decimal seq, no leading zero>": 0 with its parts, or -1. */
int cmg_notify_id_parse(const char *id, char epoch[17], int64_t *seq);
/* A TTL: N, Ns, Nm, Nh (bare: seconds), 1 s .. 24 h; -1 if not one. */
int64_t cmg_notify_ttl_parse(const char *s);

/* The site's epoch (made with the store). 0, or -1. */
int cmg_notify_epoch(struct cmg_store *st, char out[17]);
/* The highest seq assigned (0 if none), or -1. */
int64_t cmg_notify_last(struct cmg_store *st);

struct cmg_notify_new {
    const char *type;
    const char *data;              /* compact JSON, checked */
    int64_t ttl;
    bool all;
    const char *const *devices;    /* when not all: ids, checked; duplicates count once */
    size_t ndevices;
    int64_t resend_of;             /* 0, or the seq this one re-sends */
};
/* Records a notification in one transaction: 0 with its seq and target count, or an
 * HTTP status (400 too big, 500 store) with the reason in err. */
int cmg_notify_create(struct cmg_store *st, const struct cmg_notify_new *n, int64_t now,
                      int64_t *seq, int64_t *ntargets, char *err, size_t errlen);

/* The notify feed's answer to after ("" when absent), per the contract: 0 with the body
 * (malloc'd) in *body; 1 nothing new for a caller at the newest seq (hold it; with
 * may_hold false, the empty answer is made instead); 400 a malformed after (the reason
 * in err); 500 a store error. */
int cmg_notify_feed(struct cmg_store *st, const char *after, int64_t now, bool may_hold,
                    char **body, size_t *len, char *err, size_t errlen);

/* A notify report as a gateway sends it (through a connector), checked whole: the
 * document, or NULL with the reason in err. */
cJSON *cmg_notify_report_parse(const char *body, size_t len, char *err, size_t errlen);
/* Keeps a checked report received at now: 0 kept, 1 a replay (ignored), -1 store error. */
int cmg_notify_report_ingest(struct cmg_store *st, const cJSON *doc, int64_t now, char *err,
                             size_t errlen);

/* The counts of notification seq: {"id","type","created","expires","targets",
 * "delivered","waiting","expired","resend_of"}; 0, 1 no such notification, -1. */
int cmg_notify_status(struct cmg_store *st, int64_t seq, int64_t now, cJSON **out);
/* Targets of seq without a delivery row of it, as a JSON array of ids (NULL: error). */
cJSON *cmg_notify_missed(struct cmg_store *st, int64_t seq);
/* Registered devices with last_seen and channel, and the devices seen only on a
 * channel; report_interval_s is the site's default for instances that never said. */
cJSON *cmg_notify_devices_json(struct cmg_store *st, int64_t now, int64_t report_interval_s);

/* Drops notifications (and their rows), device_seen rows and notify report marks older
 * than retention_s; the newest notification stays (the sequence goes on). 0 or -1. */
int cmg_notify_prune(struct cmg_store *st, int64_t now, int64_t retention_s);

#endif
