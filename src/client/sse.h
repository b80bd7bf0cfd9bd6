/* A parser of Server-Sent Events (the text/event-stream format of the HTML standard,
 * "Server-sent events", 9.2.6): bytes in any pieces, lines ended by CRLF, LF or CR, a
 * leading byte order mark skipped, comments (lines starting with ':') ignored, the
 * fields data, event, id and retry; unknown fields ignored. Everything is bounded:
 * a line longer than CMG_SSE_MAX_LINE or an event's data over CMG_SSE_MAX_DATA is an
 * error (the caller drops the connection), never a growing buffer. */
#ifndef CMG_CLIENT_SSE_H
#define CMG_CLIENT_SSE_H

#include <stdbool.h>
#include <stddef.h>

#define CMG_SSE_MAX_LINE (64 * 1024)
#define CMG_SSE_MAX_DATA (256 * 1024)
#define CMG_SSE_MAX_ID 255       /* a longer id is ignored: it is sent back as a header */
#define CMG_SSE_MAX_EVENT 255

struct cmg_sse_event {
    const char *id;          /* the last event id ("" if none) */
    const char *type;        /* "message" if the event named none */
    const char *data;        /* NUL-terminated, its last newline removed; NULL if no data */
    size_t data_len;
};

/* Returns 0 to go on, anything else to stop cmg_sse_feed (which returns it). */
typedef int (*cmg_sse_on_event)(void *arg, const struct cmg_sse_event *ev);

struct cmg_sse;

/* A parser (heap, about 320 KiB), or NULL. id: the last event id to start from (a
 * reconnection's), or NULL. */
struct cmg_sse *cmg_sse_new(cmg_sse_on_event on_event, void *arg, const char *id);
void cmg_sse_free(struct cmg_sse *p);
/* Starts a new stream: a partial line or event is dropped, the last id kept. */
void cmg_sse_reset(struct cmg_sse *p);
/* Feeds n bytes. 0; -1 with a message in err if the stream breaks a bound; or what
 * on_event returned if not 0. */
int cmg_sse_feed(struct cmg_sse *p, const char *buf, size_t n, char *err, size_t errlen);
/* The last event id ("" if none). */
const char *cmg_sse_last_id(const struct cmg_sse *p);
/* The reconnection time the server asked for with retry: (ms), or -1 if none. */
long cmg_sse_retry_ms(const struct cmg_sse *p);

#endif
