/* The site's reports: any body a connector may POST to /v1/connector/report is checked
 * (cmg_report_parse) without reading out of bounds or leaking; one that passes is kept
 * (cmg_report_ingest) in a store of its own, which must take it. */
#include "site/reports.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct cmg_store *store(void)
{
    static struct cmg_store *st;
    static char dir[] = "/tmp/fuzz_report.XXXXXX";
    char err[300];

    if (!st && (!mkdtemp(dir) || cmg_store_open(dir, &st, err, sizeof(err)) < 0)) {
        fprintf(stderr, "fuzz_report: no store: %s\n", err);
        abort();
    }
    return st;
}

/* The connector the first gateway report lists first: the site takes a gateway's report
 * only from a connector it holds a tunnel to. */
static const char *carrier(const cJSON *doc)
{
    const cJSON *g = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(doc, "gateway_reports"), 0);
    const cJSON *t = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(g, "tunnels"), 0);
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(t, "connector");

    return cJSON_IsString(name) ? name->valuestring : "fuzz";
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int64_t now = 1790000000;
    char err[300];
    cJSON *doc = cmg_report_parse((const char *)data, size, err, sizeof(err));

    if (!doc)
        return 0;
    now += 600;   /* a new hour's quota now and then; traffic past retention pruned */
    if (cmg_report_ingest(store(), carrier(doc), doc, now, err, sizeof(err)) < 0 ||
        (now % 86400 < 600 && cmg_report_prune(store(), now, 7 * 86400) < 0)) {
        fprintf(stderr, "fuzz_report: a checked report was not kept or pruned: %s\n", err);
        abort();
    }
    cJSON_Delete(doc);
    return 0;
}
