/* Alerts: egress thresholds, certificate expiry, connectors and gateway instances
 * without a tunnel or silent. Thresholds live in the store (alert_settings, set by
 * 'cmg site alert ...'); 'site serve' evaluates them every CMG_ALERTS_CHECK_MS and when
 * asked (cmg_site_alerts_check: after a report is stored, after a change in the store),
 * over the report tables (traffic_day, traffic_month, connector_reports, gateways) and
 * the certificates the store holds. An alert is one row of the alerts table, keyed by
 * (kind, subject) while open: opened, raised from warning to critical, resolved when the
 * condition is gone; each is logged (warning: cmg_warn, critical: cmg_error, resolved:
 * cmg_info, with kind, subject, level, value and threshold as fields) and POSTed to the
 * webhook if one is set (alerts_webhook.c, off the event loop). */
#ifndef CMG_SITE_ALERTS_H
#define CMG_SITE_ALERTS_H

#include "core/loop.h"
#include "site/ctx.h"
#include "site/ops.h"

#include <cjson/cJSON.h>
#include <stdint.h>

#define CMG_ALERTS_CHECK_MS 5000
#define CMG_ALERTS_MIN_GAP_MS 500       /* checks asked for come at most this often */
#define CMG_ALERTS_WARNING_PCT 50
#define CMG_ALERTS_CRITICAL_PCT 90
#define CMG_ALERTS_CERT_EXPIRY_DAYS 30
#define CMG_ALERTS_CERT_CRITICAL_DAYS 7 /* a certificate this close to its end: critical */
#define CMG_ALERTS_NO_TUNNEL_S 600

/* What alert_settings holds, with the defaults for what it lacks. */
struct cmg_alert_settings {
    uint64_t egress_monthly, egress_daily;   /* bytes; 0: no threshold */
    unsigned warning_pct, critical_pct;
    unsigned cert_expiry_days;               /* 0: off */
    int64_t no_tunnel_s;                     /* 0: off */
    char *webhook;                           /* URL, or NULL */
    char *webhook_ca;                        /* PEM roots for its https, or NULL */
};
/* 0, or -1 (the store's error). Free with cmg_alert_settings_free. */
int cmg_alert_settings_load(struct cmg_store *st, struct cmg_alert_settings *out);
void cmg_alert_settings_free(struct cmg_alert_settings *s);
/* [{id, kind, subject, level, message, value, threshold, opened, updated}], open ones,
 * newest first; NULL on a store error. */
cJSON *cmg_alerts_open_json(struct cmg_store *st);
/* "https://host:port" of a URL: what logs may name (no credentials, no path). */
void cmg_alerts_url_origin(const char *url, char *out, size_t outlen);

/* "100GiB", "5GB", "1024" (bytes; B, KB/MB/GB/TB by 1000, KiB/MiB/GiB/TiB by 1024) in
 * bytes; -1 if malformed. */
int64_t cmg_alerts_parse_size(const char *s);
/* "30s", "10m", "1h", "2d", or a bare number of minutes, in seconds; -1 if malformed. */
int64_t cmg_alerts_parse_duration(const char *s);

/* The admin operations alert.set, alert.unset, alert.list and alert.webhook (ops.c). */
int cmg_alerts_op_set(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                      size_t len);
int cmg_alerts_op_unset(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                        size_t len);
int cmg_alerts_op_list(struct cmg_site_ctx *s, const cJSON *args, cJSON **result, char *msg,
                       size_t len);
int cmg_alerts_op_webhook(struct cmg_site_ctx *s, const cJSON *args, cJSON **result,
                          char *msg, size_t len);

/* ---- in 'site serve' ---- */

struct cmg_site_server;
struct cmg_site_alerts;

/* Starts the evaluation on srv's loop (the first a second after start). NULL when out
 * of memory. */
struct cmg_site_alerts *cmg_site_alerts_new(struct cmg_site_server *srv);
/* Evaluates soon (at once, unless the last check was less than CMG_ALERTS_MIN_GAP_MS
 * ago): what report ingestion calls after it stored a report. */
void cmg_site_alerts_check(struct cmg_site_server *srv);
/* Stops the evaluation and the webhook (a delivery under way is killed). */
void cmg_site_alerts_free(struct cmg_site_alerts *a);

/* ---- the webhook (alerts_webhook.c) ---- */

#define CMG_WEBHOOK_QUEUE_MAX 100
#define CMG_WEBHOOK_TIMEOUT_MS 5000      /* connect, handshake, each read and write */
#define CMG_WEBHOOK_RETRY_MS 1000        /* before the one retry */
#define CMG_WEBHOOK_DEADLINE_S 15        /* a delivery (both tries) is killed after this */

struct cmg_webhook;
struct cmg_webhook *cmg_webhook_new(struct cmg_loop *loop, struct cmg_store *st);
/* Queues body (JSON, taken over) for the webhook set now; kind and subject name it in
 * logs. The oldest waiting one is dropped (logged) past CMG_WEBHOOK_QUEUE_MAX. */
void cmg_webhook_post(struct cmg_webhook *w, char *body, const char *kind,
                      const char *subject);
void cmg_webhook_free(struct cmg_webhook *w);

#endif
