/* The header fields of one HTTP/1.x message, collected from llhttp's callbacks.
 * llhttp hands names and values over in pieces (a piece ends where a read ended);
 * every parser of the project (devices at the gateway, internal services at the
 * connector, the site's server, the client) calls these from its callbacks, so that
 * one piece of code joins the pieces, counts the head against its limits and
 * refuses what llhttp lets through: whitespace before the colon, a value continued
 * after it was complete (obs-fold, where llhttp reports it so). */
#ifndef CMG_H1_HEAD_H
#define CMG_H1_HEAD_H

#include "http/headers.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum cmg_h1_head_error {
    CMG_H1_HEAD_OK,
    CMG_H1_HEAD_TOO_LARGE,     /* over max_bytes or max_fields */
    CMG_H1_HEAD_BAD_NAME,      /* whitespace before the colon */
    CMG_H1_HEAD_OBS_FOLD,      /* a value continued on the next line */
    CMG_H1_HEAD_NO_MEMORY,
};

struct cmg_h1_head {
    struct cmg_headers *fields;   /* where the fields go (the caller's) */
    size_t bytes, max_bytes;      /* head bytes counted so far, and the limit */
    uint32_t max_fields;
    bool in_value;                /* the last piece was part of a value */
    bool value_done;              /* and that value is complete */
    enum cmg_h1_head_error error; /* why a call returned -1 */
};

void cmg_h1_head_init(struct cmg_h1_head *h, struct cmg_headers *fields, size_t max_bytes,
                      uint32_t max_fields);
/* A new message: forgets the fields and the count (on_message_begin). */
void cmg_h1_head_begin(struct cmg_h1_head *h);
/* Head bytes outside the fields (request target, status text): counted only. */
int cmg_h1_head_count(struct cmg_h1_head *h, size_t n);
/* llhttp's on_header_field, on_header_field_complete, on_header_value and
 * on_header_value_complete. 0, or -1 with h->error set. */
int cmg_h1_head_field(struct cmg_h1_head *h, const char *at, size_t n);
int cmg_h1_head_field_done(struct cmg_h1_head *h);
int cmg_h1_head_value(struct cmg_h1_head *h, const char *at, size_t n);
int cmg_h1_head_value_done(struct cmg_h1_head *h);
/* A short English phrase for h->error, for log lines and error messages. */
const char *cmg_h1_head_error_text(const struct cmg_h1_head *h);

#endif
