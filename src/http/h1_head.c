#include "http/h1_head.h"

/* ": " and CRLF of a field line: counted once per field, roughly what the wire had. */
#define FIELD_OVERHEAD 4

void cmg_h1_head_init(struct cmg_h1_head *h, struct cmg_headers *fields, size_t max_bytes,
                      uint32_t max_fields)
{
    h->fields = fields;
    h->max_bytes = max_bytes;
    h->max_fields = max_fields;
    cmg_h1_head_begin(h);
}

void cmg_h1_head_begin(struct cmg_h1_head *h)
{
    cmg_headers_reset(h->fields);
    h->bytes = 0;
    h->in_value = h->value_done = false;
    h->error = CMG_H1_HEAD_OK;
}

static int failed(struct cmg_h1_head *h, enum cmg_h1_head_error e)
{
    h->error = e;
    return -1;
}

int cmg_h1_head_count(struct cmg_h1_head *h, size_t n)
{
    if (n > h->max_bytes - h->bytes)
        return failed(h, CMG_H1_HEAD_TOO_LARGE);
    h->bytes += n;
    return 0;
}

int cmg_h1_head_field(struct cmg_h1_head *h, const char *at, size_t n)
{
    bool start = h->in_value || h->fields->n == 0;

    if (start && h->fields->n >= h->max_fields)
        return failed(h, CMG_H1_HEAD_TOO_LARGE);
    if (cmg_h1_head_count(h, start ? n + FIELD_OVERHEAD : n) < 0)
        return -1;
    h->in_value = h->value_done = false;
    if (cmg_headers_append_name(h->fields, at, n, start) < 0)
        return failed(h, CMG_H1_HEAD_NO_MEMORY);
    return 0;
}

int cmg_h1_head_field_done(struct cmg_h1_head *h)
{
    const struct cmg_headers *f = h->fields;
    uint32_t len = f->n ? f->v[f->n - 1].name_len : 0;
    char last = len ? cmg_headers_name(f, f->n - 1)[len - 1] : 0;

    /* RFC 9112 5.1: a server must refuse it; a proxy must not pass it on. */
    if (last == ' ' || last == '\t')
        return failed(h, CMG_H1_HEAD_BAD_NAME);
    return 0;
}

int cmg_h1_head_value(struct cmg_h1_head *h, const char *at, size_t n)
{
    bool start = !h->in_value;

    if (h->value_done)
        return failed(h, CMG_H1_HEAD_OBS_FOLD);
    if (!h->fields->n)   /* llhttp names a field first; keep the list sound regardless */
        return failed(h, CMG_H1_HEAD_BAD_NAME);
    if (cmg_h1_head_count(h, n) < 0)
        return -1;
    h->in_value = true;
    if (cmg_headers_append_value(h->fields, at, n, start) < 0)
        return failed(h, CMG_H1_HEAD_NO_MEMORY);
    return 0;
}

int cmg_h1_head_value_done(struct cmg_h1_head *h)
{
    /* An empty value comes without a piece: give the field its empty value. */
    if (!h->in_value && cmg_h1_head_value(h, "", 0) < 0)
        return -1;
    h->value_done = true;
    return 0;
}

const char *cmg_h1_head_error_text(const struct cmg_h1_head *h)
{
    switch (h->error) {
    case CMG_H1_HEAD_OK:
        return "no error";
    case CMG_H1_HEAD_TOO_LARGE:
        return "header section over its limit";
    case CMG_H1_HEAD_BAD_NAME:
        return "whitespace between a header name and its colon";
    case CMG_H1_HEAD_OBS_FOLD:
        return "a header value folded onto the next line (obs-fold)";
    case CMG_H1_HEAD_NO_MEMORY:
        return "out of memory";
    }
    return "error";
}
