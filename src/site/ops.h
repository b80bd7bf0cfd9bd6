/* The site's administrative operations, shared by the admin commands and the admin
 * API: each takes its arguments as a JSON object and gives a JSON result, so both
 * front ends say the same thing. Changes run in one transaction and bump the policy
 * version, which the running site server republishes to every gateway. */
#ifndef CMG_SITE_OPS_H
#define CMG_SITE_OPS_H

#include "site/ctx.h"

#include <cjson/cJSON.h>

/* 0 with *result (the caller frees it), or an HTTP status (400, 404, 409, 500) with a
 * message in msg. */
typedef int (*cmg_site_op)(struct cmg_site_ctx *s, const cJSON *args, cJSON **result,
                           char *msg, size_t msglen);

struct cmg_site_op_def {
    const char *name;     /* "mapping.add", ... */
    cmg_site_op fn;
};

/* The operation called name, or NULL. */
const struct cmg_site_op_def *cmg_site_op_find(const char *name);
/* Runs it. */
int cmg_site_op_run(struct cmg_site_ctx *s, const char *name, const cJSON *args,
                    cJSON **result, char *msg, size_t msglen);

/* The certificates of the site directory's own files (ca.crt, site.crt, gateway.crt,
 * connector.crt) added to list as 'cert list' shows them: kind, name, serial, expires,
 * or merged into the row of list of the same serial. */
void cmg_site_cert_files(struct cmg_site_ctx *s, cJSON *list);

/* "3d", "72h", "90m", "3600s" or a bare number of days, in seconds; -1 if malformed. */
int64_t cmg_parse_lifetime(const char *s);
/* A role id as mappings have them: letters, digits, '_' and '-', 1 to 64. */
bool cmg_site_role_valid(const char *role);

/* An operation's refusal: the message (printf-style) into msg, and the status returned. */
int cmg_site_fail(char *msg, size_t len, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
