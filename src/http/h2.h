/* Glue between nghttp2 sessions and connections. */
#ifndef CMG_H2_H
#define CMG_H2_H

#include "core/conn.h"

#include <nghttp2/nghttp2.h>
#include <stdbool.h>

/* Output queued before we wait for the connection to drain. */
#define CMG_H2_OUT_HIGH (256 * 1024)

/* Tunnel flow control. A stream's window, the same both ways, is what may be in flight
 * towards a reader that has not passed it on yet: 4 MiB keeps a bulk transfer moving
 * across the scheduling hiccups of a busy host (1 MiB stalled it, bench/). The
 * connection window bounds what one tunnel may hold buffered at the connector (the
 * gateway gives its own, CMG_GW_TUNNEL_WINDOW in gateway/gw.h). */
#define CMG_TUNNEL_STREAM_WINDOW (4 << 20)
#define CMG_TUNNEL_CONNECTION_WINDOW (64 << 20)

/* Feeds the session what the connection has to read, CMG_H2_READ_CHUNK bytes at a
 * time, until the connection has nothing more for this loop round (cmg_conn_read's
 * per-round budget bounds what one connection is served before the others), *stop
 * turns true (set by a callback; may be NULL), or the session wants no more input
 * (a GOAWAY: reading stops). Returns 0; CMG_H2_EOF when the peer closed the
 * connection; or a negative nghttp2 error. */
#define CMG_H2_READ_CHUNK 16384
#define CMG_H2_EOF 1
int cmg_h2_read(nghttp2_session *s, struct cmg_conn *c, const bool *stop);
/* Feeds the session n bytes: what cmg_h2_read() does with each chunk it reads.
 * 0, or a negative nghttp2 error. */
int cmg_h2_recv(nghttp2_session *s, const uint8_t *p, size_t n);

/* Moves what the session has to send into the connection and writes it, until
 * the session has nothing more or the connection must drain first (on_drain
 * then calls again). Returns 0, or a negative nghttp2 error. */
int cmg_h2_send(nghttp2_session *s, struct cmg_conn *c);
/* The session has nothing more to do and everything is written. */
int cmg_h2_finished(nghttp2_session *s, const struct cmg_conn *c);

/* DATA frames without nghttp2's copy of the body. A read callback answers with
 * cmg_h2_offer(): how much of src to send now (at most length), flagged
 * NGHTTP2_DATA_FLAG_NO_COPY, with EOF once eof is set and src is all taken, or
 * NGHTTP2_ERR_DEFERRED when there is nothing yet. nghttp2 then calls the session's
 * send_data callback, which calls cmg_h2_put_data(): the frame header and the
 * body go straight from src into the connection's output, and leave src. */
ssize_t cmg_h2_offer(const struct cmg_buf *src, bool eof, size_t length, uint32_t *flags);
int cmg_h2_put_data(struct cmg_conn *c, const nghttp2_frame *frame, const uint8_t *framehd,
                    size_t length, struct cmg_buf *src);
/* Sets the callbacks for large frames: DATA frames up to the peer's maximum frame
 * size (we advertise CMG_H2_MAX_FRAME on tunnels), not nghttp2's default 16 KiB. */
#define CMG_H2_MAX_FRAME (64 * 1024)
void cmg_h2_large_frames(nghttp2_session_callbacks *cb);

/* A short answer made locally; its body must outlive the stream (a literal, or held
 * by the caller until the stream closes). */
struct cmg_h2_text {
    const unsigned char *p;
    size_t left;
};
/* status, content-type, content-length, cache-control "max-age=N" when max_age >= 0,
 * and the body unless no_body (the answer to HEAD: its length, no data). */
int cmg_h2_submit_local(nghttp2_session *s, int32_t stream_id, int status, const char *type,
                        const void *body, size_t len, long long max_age, bool no_body,
                        struct cmg_h2_text *text);
/* A text/plain answer: cmg_h2_submit_local() with body a NUL-terminated literal. */
int cmg_h2_submit_text(nghttp2_session *s, int32_t stream_id, int status, const char *body,
                       struct cmg_h2_text *text);
/* The same with a reason token (a literal, or NULL) in CMG_REASON_HEADER: how the
 * connector tells the gateway why it failed a request. */
int cmg_h2_submit_reason(nghttp2_session *s, int32_t stream_id, int status, const char *body,
                         const char *reason, struct cmg_h2_text *text);

#endif
