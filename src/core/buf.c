#include "core/buf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void cmg_buf_free(struct cmg_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->off = b->len = b->cap = 0;
}

void cmg_buf_release(struct cmg_buf *b)
{
    if (b->len == 0)
        cmg_buf_free(b);
}

int cmg_buf_reserve(struct cmg_buf *b, size_t n)
{
    size_t cap;
    char *p;

    if (cmg_buf_room(b) >= n)
        return 0;
    /* Sliding the data to the front is cheaper than growing when half is free. */
    if (b->off > 0 && b->cap - b->len >= n && b->off >= b->len) {
        memmove(b->data, b->data + b->off, b->len);
        b->off = 0;
        return 0;
    }
    if (b->off > 0) {
        memmove(b->data, b->data + b->off, b->len);
        b->off = 0;
    }
    if (b->cap - b->len >= n)
        return 0;
    cap = b->cap ? b->cap : 1024;
    while (cap - b->len < n) {
        if (cap > ((size_t)-1) / 2)
            return -1;
        cap *= 2;
    }
    p = realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

int cmg_buf_append(struct cmg_buf *b, const void *p, size_t n)
{
    if (n == 0)
        return 0;
    if (cmg_buf_reserve(b, n) < 0)
        return -1;
    memcpy(cmg_buf_tail(b), p, n);
    b->len += n;
    return 0;
}

int cmg_buf_appends(struct cmg_buf *b, const char *s) { return cmg_buf_append(b, s, strlen(s)); }

int cmg_buf_printf(struct cmg_buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || cmg_buf_reserve(b, (size_t)n + 1) < 0)
        return -1;
    va_start(ap, fmt);
    vsnprintf(cmg_buf_tail(b), (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void cmg_buf_consume(struct cmg_buf *b, size_t n)
{
    if (n >= b->len) {
        b->off = b->len = 0;
        return;
    }
    b->off += n;
    b->len -= n;
}
