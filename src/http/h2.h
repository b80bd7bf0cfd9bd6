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

#endif
