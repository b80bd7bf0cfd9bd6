/* A list of header fields kept in one arena: names and values are byte runs
 * addressed by offsets, so the arena may grow while the list is built. */
#ifndef CMG_HEADERS_H
#define CMG_HEADERS_H

#include "core/buf.h"

#include <stdbool.h>
#include <stdint.h>

struct cmg_header {
    uint32_t name, name_len, value, value_len;
};

struct cmg_headers {
    struct cmg_buf arena;
    struct cmg_header *v;
    uint32_t n, cap;
};

void cmg_headers_free(struct cmg_headers *h);
void cmg_headers_reset(struct cmg_headers *h);
int cmg_headers_add(struct cmg_headers *h, const char *name, size_t nlen, const char *value,
                    size_t vlen);
/* For parsers that see names and values in pieces: */
int cmg_headers_append_name(struct cmg_headers *h, const char *p, size_t n, bool start);
int cmg_headers_append_value(struct cmg_headers *h, const char *p, size_t n, bool start);

static inline const char *cmg_headers_name(const struct cmg_headers *h, uint32_t i)
{
    return h->arena.data + h->v[i].name;
}
static inline const char *cmg_headers_value(const struct cmg_headers *h, uint32_t i)
{
    return h->arena.data + h->v[i].value;
}
/* Index of the first field with this name (case-insensitive), or -1. */
int cmg_headers_find(const struct cmg_headers *h, const char *name);
bool cmg_header_is(const struct cmg_headers *h, uint32_t i, const char *name);
/* Why the connector failed a request (a reason token), on its own 502/504 only. */
#define CMG_REASON_HEADER "cmg-reason"
/* Fields never passed on as they came: those of one connection (RFC 9110 7.6.1),
 * the framing and host fields that each hop sets for itself, and CMG_REASON_HEADER
 * (between connector and gateway only: an internal service cannot forge it). */
bool cmg_header_not_forwarded(const char *name, size_t len);
/* Fields only the gateway may set, whatever a device sends: identity ("cmg-*") and
 * routing ("forwarded", "x-forwarded-*", "x-real-ip", "x-original-url",
 * "x-rewrite-url", "x-client-*"). Compared without case and with '_' read as '-',
 * since CGI and IIS give "CMG_Client_Id" and "CMG-Client-Id" the same variable. */
bool cmg_header_gateway_only(const char *name, size_t len);
/* Case-insensitive prefix test, e.g. "cmg-". */
bool cmg_header_has_prefix(const char *name, size_t len, const char *prefix);

#endif
