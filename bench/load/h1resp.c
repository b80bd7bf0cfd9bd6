#include "h1resp.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

void load_h1_reset(struct load_h1 *p, bool head)
{
    p->state = LOAD_H1_STATUS;
    p->head = head;
    p->status = 0;
    p->content_length = -1;
    p->chunked = false;
    p->close = false;
    p->remaining = 0;
    p->body_bytes = 0;
    p->line_len = 0;
    p->error = NULL;
}

static int fail(struct load_h1 *p, const char *why)
{
    p->error = why;
    return -1;
}

static bool token_in(const char *value, const char *token)
{
    size_t n = strlen(token);
    for (const char *s = value; *s; s++)
        if (!strncasecmp(s, token, n) && (s == value || s[-1] == ' ' || s[-1] == ',') &&
            (s[n] == 0 || s[n] == ' ' || s[n] == ',' || s[n] == '\t'))
            return true;
    return false;
}

static int status_line(struct load_h1 *p, char *line)
{
    char *end;
    long st;

    if (strncmp(line, "HTTP/1.", 7) != 0 || (line[7] != '0' && line[7] != '1') || line[8] != ' ')
        return fail(p, "bad status line");
    st = strtol(line + 9, &end, 10);
    if (st < 100 || st > 999 || end != line + 12)
        return fail(p, "bad status code");
    p->status = (int)st;
    p->close = line[7] == '0';   /* HTTP/1.0 closes unless told otherwise */
    p->state = LOAD_H1_HEADERS;
    return 0;
}

static int header_line(struct load_h1 *p, char *line)
{
    char *colon = strchr(line, ':'), *v;

    if (!colon)
        return fail(p, "bad header line");
    *colon = 0;
    for (v = colon + 1; *v == ' ' || *v == '\t'; v++)
        ;
    if (!strcasecmp(line, "content-length")) {
        char *end;
        long long n = strtoll(v, &end, 10);
        if (n < 0 || end == v)
            return fail(p, "bad Content-Length");
        p->content_length = n;
    } else if (!strcasecmp(line, "transfer-encoding")) {
        p->chunked = token_in(v, "chunked");
    } else if (!strcasecmp(line, "connection")) {
        if (token_in(v, "close"))
            p->close = true;
        else if (token_in(v, "keep-alive"))
            p->close = false;
    }
    return 0;
}

/* The blank line after the headers: decide how the body is framed. */
static int end_of_head(struct load_h1 *p)
{
    if (p->status < 200) {   /* interim: the real response follows */
        bool head = p->head;
        load_h1_reset(p, head);
        return 0;
    }
    if (p->head || p->status == 204 || p->status == 304) {
        p->state = LOAD_H1_DONE;
    } else if (p->chunked) {
        p->state = LOAD_H1_CHUNK_SIZE;
    } else if (p->content_length >= 0) {
        p->remaining = (uint64_t)p->content_length;
        p->state = p->remaining ? LOAD_H1_BODY : LOAD_H1_DONE;
    } else {
        p->close = true;
        p->state = LOAD_H1_UNTIL_EOF;
    }
    return 0;
}

static int chunk_size(struct load_h1 *p, char *line)
{
    char *end;
    unsigned long long n = strtoull(line, &end, 16);
    if (end == line || (*end && *end != ';' && *end != ' ' && *end != '\t'))
        return fail(p, "bad chunk size");
    p->remaining = n;
    p->state = n ? LOAD_H1_CHUNK_DATA : LOAD_H1_TRAILERS;
    return 0;
}

/* One complete line (CRLF removed) in the states that read lines. */
static int on_line(struct load_h1 *p, char *line)
{
    switch (p->state) {
    case LOAD_H1_STATUS:
        return status_line(p, line);
    case LOAD_H1_HEADERS:
        return line[0] ? header_line(p, line) : end_of_head(p);
    case LOAD_H1_CHUNK_SIZE:
        return chunk_size(p, line);
    case LOAD_H1_CHUNK_CRLF:
        if (line[0])
            return fail(p, "no CRLF after chunk");
        p->state = LOAD_H1_CHUNK_SIZE;
        return 0;
    case LOAD_H1_TRAILERS:
        if (!line[0])
            p->state = LOAD_H1_DONE;
        return 0;
    default:
        return fail(p, "internal: line in a body state");
    }
}

int load_h1_feed(struct load_h1 *p, const char *data, size_t len, size_t *used)
{
    size_t i = 0;

    while (i < len && p->state != LOAD_H1_DONE) {
        if (p->state == LOAD_H1_BODY || p->state == LOAD_H1_CHUNK_DATA) {
            size_t n = len - i;
            if ((uint64_t)n > p->remaining)
                n = (size_t)p->remaining;
            p->remaining -= n;
            p->body_bytes += n;
            i += n;
            if (!p->remaining)
                p->state = p->state == LOAD_H1_BODY ? LOAD_H1_DONE : LOAD_H1_CHUNK_CRLF;
            continue;
        }
        if (p->state == LOAD_H1_UNTIL_EOF) {
            p->body_bytes += len - i;
            i = len;
            break;
        }
        {
            const char *nl = memchr(data + i, '\n', len - i);
            size_t n = nl ? (size_t)(nl - (data + i)) : len - i;
            if (p->line_len + n >= LOAD_H1_MAX_LINE) {
                *used = i;
                return fail(p, "line too long");
            }
            memcpy(p->line + p->line_len, data + i, n);
            p->line_len += n;
            i += n;
            if (!nl)
                break;
            i++;   /* the '\n' */
            if (p->line_len && p->line[p->line_len - 1] == '\r')
                p->line_len--;
            p->line[p->line_len] = 0;
            p->line_len = 0;
            if (on_line(p, p->line) < 0) {
                *used = i;
                return -1;
            }
        }
    }
    *used = i;
    return p->state == LOAD_H1_DONE ? 1 : 0;
}

int load_h1_eof(struct load_h1 *p)
{
    if (p->state == LOAD_H1_UNTIL_EOF) {
        p->state = LOAD_H1_DONE;
        return 1;
    }
    return fail(p, p->state == LOAD_H1_STATUS && !p->line_len ? "connection closed"
                                                               : "connection closed mid-response");
}
