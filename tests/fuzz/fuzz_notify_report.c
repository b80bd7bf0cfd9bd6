/* The gateways' notify reports: any body a connector may POST to
 * /v1/connector/notify-report is checked (cmg_notify_report_parse) without reading out of
 * bounds or leaking; one that passes is kept (cmg_notify_report_ingest) in a store of its
 * own, which must take it (or know it as a replay), with notifications to deliver. */
#include "site/notify.h"

#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A store with a few notifications of its epoch, so that deliveries are kept. */
static struct cmg_store *store(void)
{
    static struct cmg_store *st;
    static char dir[] = "/tmp/fuzz_notify_report.XXXXXX";
    static const char *const ids[] = {"d1", "cert:ab"};
    struct cmg_notify_new n = {.type = "policy", .data = "null", .ttl = 3600, .devices = ids,
                               .ndevices = 2};
    char err[300];
    int64_t seq, targets;

    if (st)
        return st;
    if (!mkdtemp(dir) || cmg_store_open(dir, &st, err, sizeof(err)) < 0) {
        fprintf(stderr, "fuzz_notify_report: no store: %s\n", err);
        abort();
    }
    /* the seeds' epoch: their deliveries are of notifications this store has */
    sqlite3_exec(cmg_store_db(st), "UPDATE notify_meta SET epoch = '0000000000000000'", NULL,
                 NULL, NULL);
    for (int i = 0; i < 3; i++)
        if (cmg_notify_create(st, &n, 1790000000, &seq, &targets, err, sizeof(err)) != 0) {
            fprintf(stderr, "fuzz_notify_report: %s\n", err);
            abort();
        }
    return st;
}

/* The retention pass, as the site runs it: a step at a time until done. */
static int prune(int64_t now)
{
    int rc;

    while ((rc = cmg_notify_prune(store(), now, 86400, 7 * 86400)) == 1)
        ;
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int64_t now = 1790000000;
    char err[300];
    cJSON *doc = cmg_notify_report_parse((const char *)data, size, err, sizeof(err));

    if (!doc)
        return 0;
    now += 60;
    if (cmg_notify_report_ingest(store(), doc, now, err, sizeof(err)) < 0 ||
        (now % 86400 < 60 && prune(now) < 0)) {
        fprintf(stderr, "fuzz_notify_report: a checked report was not kept or pruned: %s\n", err);
        abort();
    }
    cJSON_Delete(doc);
    return 0;
}
