#include "http/headers.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

void cmg_headers_free(struct cmg_headers *h)
{
    cmg_buf_free(&h->arena);
    free(h->v);
    h->v = NULL;
    h->n = h->cap = 0;
}

void cmg_headers_reset(struct cmg_headers *h)
{
    cmg_buf_reset(&h->arena);
    h->n = 0;
}

static struct cmg_header *new_entry(struct cmg_headers *h)
{
    if (h->n == h->cap) {
        uint32_t cap = h->cap ? h->cap * 2 : 16;
        struct cmg_header *v = realloc(h->v, cap * sizeof(*v));
        if (!v)
            return NULL;
        h->v = v;
        h->cap = cap;
    }
    memset(&h->v[h->n], 0, sizeof(h->v[0]));
    h->v[h->n].name = h->v[h->n].value = (uint32_t)h->arena.len;
    return &h->v[h->n++];
}

/* Each run is NUL-terminated in the arena, for the convenience of C string users. */
static int put(struct cmg_headers *h, const char *p, size_t n)
{
    if (h->arena.len + n + 1 > UINT32_MAX)
        return -1;
    if (cmg_buf_reserve(&h->arena, n + 1) < 0)
        return -1;
    memcpy(cmg_buf_tail(&h->arena), p, n);
    cmg_buf_tail(&h->arena)[n] = 0;
    h->arena.len += n;
    return 0;
}

int cmg_headers_add(struct cmg_headers *h, const char *name, size_t nlen, const char *value,
                    size_t vlen)
{
    return cmg_headers_append_name(h, name, nlen, true) < 0 ||
                   cmg_headers_append_value(h, value, vlen, true) < 0
               ? -1
               : 0;
}

/* A run continued in pieces overwrites its NUL, so that the run stays contiguous. */
int cmg_headers_append_name(struct cmg_headers *h, const char *p, size_t n, bool start)
{
    struct cmg_header *e;
    if (start || !h->n) {
        e = new_entry(h);
        if (!e)
            return -1;
    } else {
        e = &h->v[h->n - 1];
        h->arena.len--;
    }
    if (put(h, p, n) < 0)
        return -1;
    e->name_len += (uint32_t)n;
    h->arena.len++;
    return 0;
}

int cmg_headers_append_value(struct cmg_headers *h, const char *p, size_t n, bool start)
{
    struct cmg_header *e;
    if (!h->n)
        return -1;
    e = &h->v[h->n - 1];
    if (start) {
        e->value = (uint32_t)h->arena.len;
        e->value_len = 0;
    } else {
        h->arena.len--;
    }
    if (put(h, p, n) < 0)
        return -1;
    e->value_len += (uint32_t)n;
    h->arena.len++;
    return 0;
}

int cmg_headers_find(const struct cmg_headers *h, const char *name)
{
    for (uint32_t i = 0; i < h->n; i++)
        if (cmg_header_is(h, i, name))
            return (int)i;
    return -1;
}

bool cmg_header_is(const struct cmg_headers *h, uint32_t i, const char *name)
{
    size_t len = strlen(name);
    return h->v[i].name_len == len && strncasecmp(cmg_headers_name(h, i), name, len) == 0;
}

bool cmg_header_has_prefix(const char *name, size_t len, const char *prefix)
{
    size_t plen = strlen(prefix);
    return len >= plen && strncasecmp(name, prefix, plen) == 0;
}

bool cmg_header_not_forwarded(const char *name, size_t len)
{
    static const char *const names[] = {
        "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
        "te", "trailer", "proxy-authenticate", "proxy-authorization", "http2-settings",
        "expect", "host", "content-length", CMG_REASON_HEADER};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strlen(names[i]) == len && strncasecmp(name, names[i], len) == 0)
            return true;
    return false;
}

/* name equals word, or starts with it when word ends in '-', ignoring case and
 * reading '_' as '-'. */
static bool spelt_as(const char *name, size_t len, const char *word)
{
    size_t wlen = strlen(word);

    if (len < wlen || (len > wlen && word[wlen - 1] != '-'))
        return false;
    for (size_t i = 0; i < wlen; i++) {
        char c = name[i] == '_' ? '-' : (char)tolower((unsigned char)name[i]);
        if (c != word[i])
            return false;
    }
    return true;
}

bool cmg_header_gateway_only(const char *name, size_t len)
{
    static const char *const words[] = {"cmg-",          "forwarded",     "x-forwarded-",
                                        "x-real-ip",     "x-original-url", "x-rewrite-url",
                                        "x-client-"};
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
        if (spelt_as(name, len, words[i]))
            return true;
    return false;
}
