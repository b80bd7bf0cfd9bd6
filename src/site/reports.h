/* Reports from the gateways, carried by the connectors (docs/site.md, "Reports"):
 * checked, then kept in the store in one transaction: each gateway report once per
 * (instance, boot, seq) however many connectors carried it; the counters' growth since
 * the last report of the same boot (a new boot: the counters themselves) added to the
 * 5-minute bucket, the day and the month of the report's time. */
#ifndef CMG_SITE_REPORTS_H
#define CMG_SITE_REPORTS_H

#include "core/metrics.h"
#include "site/store.h"

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#define CMG_REPORT_MAX_GATEWAYS 64       /* gateway reports in one connector's report */
#define CMG_REPORT_MAX_ROLES 4097        /* the metrics' 4096 and "other" */
#define CMG_REPORT_MAX_REFUSALS 65
#define CMG_REPORT_MAX_CERTS 16
#define CMG_REPORT_BUCKET_S 300
#define CMG_REPORT_DAY_KEEP_S (400 * 86400)
#define CMG_REPORT_PRUNE_S 3600

/* body as one JSON document with nothing after it (whitespace aside), or NULL. */
cJSON *cmg_report_json(const char *body, size_t len);

/* A connector's report, checked: the document (owned), or NULL with the reason in err. */
cJSON *cmg_report_parse(const char *body, size_t len, char *err, size_t errlen);

/* One gateway's report, checked as the site checks it (connectors refuse what the site
 * would: one bad report must not hold up the others). 0, or -1 with the reason in err. */
int cmg_report_check_gateway(const cJSON *g, char *err, size_t errlen);

/* The counters' growth: delta[i] = now[i] - before[i]; a counter that went down is a
 * new baseline (delta 0). Returns how many went down. */
size_t cmg_report_delta(const uint64_t *before, const uint64_t *now, size_t n, uint64_t *delta);

/* Keeps a checked report of connector (the name of its certificate), received at now
 * (unix seconds), in one transaction. 0, or -1 (store error in err). */
int cmg_report_ingest(struct cmg_store *st, const char *connector, const cJSON *doc, int64_t now,
                      char *err, size_t errlen);

/* Drops what is past retention: traffic_5m buckets and report_boots not heard of for
 * retention_s, traffic_day rows older than 400 days. 0 or -1. */
int cmg_report_prune(struct cmg_store *st, int64_t now, int64_t retention_s);

#endif
