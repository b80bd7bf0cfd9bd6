/* Server-Sent Events, parsed as the HTML standard says (9.2.6), with bounds. */
#include "client/sse.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RETRY_MAX_MS 86400000L   /* a day: more is not a hint to honour */

struct cmg_sse {
    cmg_sse_on_event on_event;
    void *arg;
    char line[CMG_SSE_MAX_LINE + 1];
    size_t line_len;
    bool after_cr;           /* the last byte ended a line with CR: a LF next is its end too */
    size_t bom_seen;         /* bytes of a leading byte order mark matched so far */
    bool started;            /* past the stream's first bytes (where a BOM may be) */
    char last_id[CMG_SSE_MAX_ID + 1];
    char type[CMG_SSE_MAX_EVENT + 1];
    char data[CMG_SSE_MAX_DATA + 1];
    size_t data_len;
    bool has_data;
    long retry_ms;
};

static const unsigned char bom[3] = {0xef, 0xbb, 0xbf};

struct cmg_sse *cmg_sse_new(cmg_sse_on_event on_event, void *arg, const char *id)
{
    struct cmg_sse *p = calloc(1, sizeof(*p));

    if (!p)
        return NULL;
    p->on_event = on_event;
    p->arg = arg;
    p->retry_ms = -1;
    if (id && strlen(id) <= CMG_SSE_MAX_ID)
        snprintf(p->last_id, sizeof(p->last_id), "%s", id);
    return p;
}

void cmg_sse_free(struct cmg_sse *p) { free(p); }

void cmg_sse_reset(struct cmg_sse *p)
{
    p->line_len = p->data_len = p->bom_seen = 0;
    p->after_cr = p->started = p->has_data = false;
    p->type[0] = 0;
}

const char *cmg_sse_last_id(const struct cmg_sse *p) { return p->last_id; }

long cmg_sse_retry_ms(const struct cmg_sse *p) { return p->retry_ms; }

/* An id goes back to the server in Last-Event-ID: printable ASCII only. */
static bool id_ok(const char *v, size_t n)
{
    if (n > CMG_SSE_MAX_ID)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)v[i] < 0x20 || (unsigned char)v[i] > 0x7e)
            return false;
    return true;
}

static int dispatch(struct cmg_sse *p)
{
    struct cmg_sse_event ev = {.id = p->last_id, .type = p->type[0] ? p->type : "message"};
    int rc = 0;

    /* The standard dispatches nothing without data; an event named without data (a
     * bare "event: reset") is dispatched too, with no data, so that it is not lost. */
    if (p->has_data || p->type[0]) {
        if (p->has_data) {
            if (p->data_len && p->data[p->data_len - 1] == '\n')
                p->data_len--;
            p->data[p->data_len] = 0;
            ev.data = p->data;
            ev.data_len = p->data_len;
        }
        rc = p->on_event(p->arg, &ev);
    }
    p->data_len = 0;
    p->has_data = false;
    p->type[0] = 0;
    return rc;
}

static int field(struct cmg_sse *p, const char *name, size_t nlen, const char *v, size_t vlen,
                 char *err, size_t errlen)
{
    if (nlen == 4 && !memcmp(name, "data", 4)) {
        if (p->data_len + vlen + 1 > CMG_SSE_MAX_DATA) {
            snprintf(err, errlen, "an event's data over %d bytes", CMG_SSE_MAX_DATA);
            return -1;
        }
        memcpy(p->data + p->data_len, v, vlen);
        p->data_len += vlen;
        p->data[p->data_len++] = '\n';
        p->has_data = true;
    } else if (nlen == 5 && !memcmp(name, "event", 5)) {
        if (vlen <= CMG_SSE_MAX_EVENT) {
            memcpy(p->type, v, vlen);
            p->type[vlen] = 0;
        }
    } else if (nlen == 2 && !memcmp(name, "id", 2)) {
        if (!memchr(v, 0, vlen) && id_ok(v, vlen)) {
            memcpy(p->last_id, v, vlen);
            p->last_id[vlen] = 0;
        }
    } else if (nlen == 5 && !memcmp(name, "retry", 5)) {
        long ms = 0;
        size_t i = 0;
        for (; i < vlen && v[i] >= '0' && v[i] <= '9' && ms <= RETRY_MAX_MS; i++)
            ms = ms * 10 + (v[i] - '0');
        if (vlen && i == vlen && ms <= RETRY_MAX_MS)
            p->retry_ms = ms;
    }
    return 0;
}

static int line(struct cmg_sse *p, char *err, size_t errlen)
{
    const char *l = p->line, *colon;
    size_t n = p->line_len, nlen, vlen;

    if (n == 0)
        return dispatch(p);
    if (l[0] == ':')
        return 0;   /* a comment: a heartbeat */
    colon = memchr(l, ':', n);
    nlen = colon ? (size_t)(colon - l) : n;
    vlen = colon ? n - nlen - 1 : 0;
    if (colon && vlen && colon[1] == ' ') {
        colon++;
        vlen--;
    }
    return field(p, l, nlen, colon ? colon + 1 : "", vlen, err, errlen);
}

int cmg_sse_feed(struct cmg_sse *p, const char *buf, size_t n, char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++) {
        char c = buf[i];
        int rc;

        if (!p->started) {   /* a byte order mark, once, at the start */
            if ((unsigned char)c == bom[p->bom_seen]) {
                if (++p->bom_seen == sizeof(bom))
                    p->started = true;
                continue;
            }
            p->started = true;
            if (p->bom_seen) {   /* not a whole mark: its bytes are the line's */
                memcpy(p->line, bom, p->bom_seen);
                p->line_len = p->bom_seen;
            }
        }
        if (c == '\n' && p->after_cr) {
            p->after_cr = false;
            continue;
        }
        p->after_cr = c == '\r';
        if (c == '\r' || c == '\n') {
            rc = line(p, err, errlen);
            p->line_len = 0;
            if (rc)
                return rc;
            continue;
        }
        if (p->line_len >= CMG_SSE_MAX_LINE) {
            snprintf(err, errlen, "a line over %d bytes", CMG_SSE_MAX_LINE);
            return -1;
        }
        p->line[p->line_len++] = c;
    }
    return 0;
}
