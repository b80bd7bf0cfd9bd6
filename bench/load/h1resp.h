/* An incremental HTTP/1.1 response reader for a load generator: it keeps the
 * status and the framing (Content-Length, chunked, or until the end of the
 * connection), counts body bytes and throws them away. Interim 1xx responses
 * are skipped. */
#ifndef LOAD_H1RESP_H
#define LOAD_H1RESP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LOAD_H1_MAX_LINE 8192

enum load_h1_state {
    LOAD_H1_STATUS, LOAD_H1_HEADERS, LOAD_H1_BODY, LOAD_H1_CHUNK_SIZE, LOAD_H1_CHUNK_DATA,
    LOAD_H1_CHUNK_CRLF, LOAD_H1_TRAILERS, LOAD_H1_UNTIL_EOF, LOAD_H1_DONE
};

struct load_h1 {
    enum load_h1_state state;
    bool head;               /* the request was HEAD: no body whatever the headers say */
    int status;
    int64_t content_length;  /* -1 when absent */
    bool chunked;
    bool close;              /* the server will close after this response */
    uint64_t remaining;      /* body or chunk bytes still to come */
    uint64_t body_bytes;
    size_t line_len;
    char line[LOAD_H1_MAX_LINE];
    const char *error;
};

/* Ready for a new response (head: the request was HEAD). */
void load_h1_reset(struct load_h1 *p, bool head);
/* Feeds bytes; *used says how many were taken. 1: the response is complete (bytes
 * after it are not taken); 0: more is needed; -1: malformed (p->error says why). */
int load_h1_feed(struct load_h1 *p, const char *data, size_t len, size_t *used);
/* The connection ended: 1 if that completes a body delimited by the end of the
 * connection, -1 otherwise. */
int load_h1_eof(struct load_h1 *p);

#endif
