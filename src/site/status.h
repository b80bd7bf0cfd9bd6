/* What the deployment is doing, from the site's store: the status document ('cmg site
 * status --json', admin op "status", GET /v1/status) and the traffic series (admin op
 * "traffic", GET /v1/traffic). Both are made from the report tables that 'cmg site serve'
 * fills from the connectors' reports, in one read transaction, against the time given.
 * docs/site.md, "cmg site status", names every field. */
#ifndef CMG_SITE_STATUS_H
#define CMG_SITE_STATUS_H

#include "site/ctx.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>

#define CMG_CERT_EXPIRY_DAYS_DEFAULT 30   /* alert_settings cert_expiry_days */

/* The status document at now (unix seconds). 0 with *out (the caller frees it), or 500
 * with a reason in msg. */
int cmg_site_status(struct cmg_site_ctx *s, int64_t now, cJSON **out, char *msg, size_t len);

/* The traffic series of range "day" (the last 24 h of 5-minute buckets) or "month" (the
 * days of the current UTC month), over every gateway instance or the one named. 0 with
 * *out, 400 (msg names the accepted values) or 500. */
int cmg_site_traffic(struct cmg_site_ctx *s, int64_t now, const char *range,
                     const char *instance, cJSON **out, char *msg, size_t len);

/* The status document as one screen of text ('cmg site status'). */
void cmg_site_status_print(const cJSON *doc, FILE *out);

/* Ages as people read them: "3m12s", "2h5m", "4d3h". */
void cmg_format_age(int64_t seconds, char *out, size_t len);
/* Byte counts: "812 B", "12.3 GiB". */
void cmg_format_bytes(double bytes, char *out, size_t len);

/* A member of a JSON object read leniently: def (or "") when absent or of another type. */
static inline double cmg_json_num(const cJSON *o, const char *key, double def)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : def;
}

static inline const char *cmg_json_str(const cJSON *o, const char *key)
{
    const char *v = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, key));
    return v ? v : "";
}

#endif
