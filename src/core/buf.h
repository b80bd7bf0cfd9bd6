/* A byte buffer: bytes live in data[off, off+len); room after them for appends.
 * Consuming from the front is O(1); space is reclaimed when the buffer empties
 * or an append needs it. */
#ifndef CMG_BUF_H
#define CMG_BUF_H

#include <stdarg.h>
#include <stddef.h>

struct cmg_buf {
    char *data;
    size_t off, len, cap;
};

void cmg_buf_free(struct cmg_buf *b);
/* Frees the storage if the buffer is empty: idle connections should cost little. */
void cmg_buf_release(struct cmg_buf *b);
/* Makes room for at least n more bytes after the data. 0 or -1 (out of memory). */
int cmg_buf_reserve(struct cmg_buf *b, size_t n);
int cmg_buf_append(struct cmg_buf *b, const void *p, size_t n);
int cmg_buf_appends(struct cmg_buf *b, const char *s);
int cmg_buf_printf(struct cmg_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void cmg_buf_consume(struct cmg_buf *b, size_t n);

static inline char *cmg_buf_head(const struct cmg_buf *b) { return b->data + b->off; }
static inline char *cmg_buf_tail(const struct cmg_buf *b) { return b->data + b->off + b->len; }
static inline size_t cmg_buf_room(const struct cmg_buf *b) { return b->cap - b->off - b->len; }
static inline void cmg_buf_commit(struct cmg_buf *b, size_t n) { b->len += n; }
static inline void cmg_buf_reset(struct cmg_buf *b) { b->off = b->len = 0; }

#endif
