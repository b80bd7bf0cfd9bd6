/* Glue between nghttp2 sessions and connections. */
#ifndef CMG_H2_H
#define CMG_H2_H

#include "core/conn.h"

#include <nghttp2/nghttp2.h>

/* Output queued before we wait for the connection to drain. */
#define CMG_H2_OUT_HIGH (256 * 1024)

/* Moves what the session has to send into the connection and writes it, until
 * the session has nothing more or the connection must drain first (on_drain
 * then calls again). Returns 0, or a negative nghttp2 error. */
int cmg_h2_send(nghttp2_session *s, struct cmg_conn *c);
/* The session has nothing more to do and everything is written. */
int cmg_h2_finished(nghttp2_session *s, const struct cmg_conn *c);

/* A short text answer made locally; body must outlive the stream (a literal). */
struct cmg_h2_text {
    const char *p;
    size_t left;
};
int cmg_h2_submit_text(nghttp2_session *s, int32_t stream_id, int status, const char *body,
                       struct cmg_h2_text *text);

#endif
