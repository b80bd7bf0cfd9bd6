/* Request heads as the gateway collects them: llhttp with header names and
 * values gathered piecewise into a cmg_headers arena, fed in random splits. */
#include "http/headers.h"

#include <llhttp.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct state {
    llhttp_t parser;
    struct cmg_headers h;
    bool in_value;
};

static int on_field(llhttp_t *p, const char *at, size_t n)
{
    struct state *s = (struct state *)p;
    bool start = s->in_value || s->h.n == 0;
    s->in_value = false;
    return cmg_headers_append_name(&s->h, at, n, start);
}

static int on_value(llhttp_t *p, const char *at, size_t n)
{
    struct state *s = (struct state *)p;
    bool start = !s->in_value;
    s->in_value = true;
    return cmg_headers_append_value(&s->h, at, n, start);
}

static int on_headers_complete(llhttp_t *p)
{
    struct state *s = (struct state *)p;
    for (uint32_t i = 0; i < s->h.n; i++) {
        /* every run is NUL-terminated where its length says */
        if (cmg_headers_name(&s->h, i)[s->h.v[i].name_len] != 0)
            __builtin_trap();
        (void)cmg_header_not_forwarded(cmg_headers_name(&s->h, i), s->h.v[i].name_len);
    }
    (void)cmg_headers_find(&s->h, "host");
    cmg_headers_reset(&s->h);
    s->in_value = false;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static llhttp_settings_t settings;
    struct state s;
    size_t split;

    if (size < 1)
        return 0;
    llhttp_settings_init(&settings);
    settings.on_header_field = on_field;
    settings.on_header_value = on_value;
    settings.on_headers_complete = on_headers_complete;
    memset(&s, 0, sizeof(s));
    llhttp_init(&s.parser, HTTP_REQUEST, &settings);
    split = data[0] % size;   /* the first byte picks where the input is cut in two */
    data++;
    size--;
    if (split > size)
        split = size;
    if (llhttp_execute(&s.parser, (const char *)data, split) == HPE_OK)
        llhttp_execute(&s.parser, (const char *)data + split, size - split);
    cmg_headers_free(&s.h);
    return 0;
}
