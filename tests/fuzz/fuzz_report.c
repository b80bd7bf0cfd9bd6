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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[300];
    cJSON *doc = cmg_report_parse((const char *)data, size, err, sizeof(err));

    if (!doc)
        return 0;
    if (cmg_report_ingest(store(), "fuzz", doc, 1790000000, err, sizeof(err)) < 0) {
        fprintf(stderr, "fuzz_report: a checked report was not kept: %s\n", err);
        abort();
    }
    cJSON_Delete(doc);
    return 0;
}
