/* The Server-Sent Events parser (client/sse.c): whatever bytes a gateway sends, cut
 * anywhere, the parser stays within its bounds, every event it gives has a
 * NUL-terminated type, id and data within their limits, and the same bytes fed whole
 * or in pieces give the same events. The first byte picks where the input is cut. */
#include "client/sse.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct tally {
    unsigned events;
    uint64_t hash;
};

static int on_event(void *arg, const struct cmg_sse_event *ev)
{
    struct tally *t = arg;
    size_t idn = strlen(ev->id), tn = strlen(ev->type);

    if (idn > CMG_SSE_MAX_ID || tn > CMG_SSE_MAX_EVENT || !tn ||
        (ev->data && (ev->data_len > CMG_SSE_MAX_DATA || ev->data[ev->data_len] != 0)))
        abort();
    for (size_t i = 0; i < idn; i++)
        if ((unsigned char)ev->id[i] < 0x20 || (unsigned char)ev->id[i] > 0x7e)
            abort();
    t->events++;
    t->hash = t->hash * 1000003u ^ idn ^ tn << 8 ^ (ev->data ? ev->data_len + 1 : 0) << 16;
    return 0;
}

static int run(const uint8_t *data, size_t size, size_t step, struct tally *t)
{
    struct cmg_sse *p = cmg_sse_new(on_event, t, NULL);
    char err[128];
    int rc = 0;

    if (!p)
        return -2;
    for (size_t off = 0; off < size && rc == 0; off += step)
        rc = cmg_sse_feed(p, (const char *)data + off, size - off < step ? size - off : step,
                          err, sizeof(err));
    cmg_sse_free(p);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct tally whole = {0}, cut = {0};
    size_t step;
    int a, b;

    if (size < 1)
        return 0;
    step = (size_t)data[0] % 7 + 1;
    a = run(data + 1, size - 1, size, &whole);
    b = run(data + 1, size - 1, step, &cut);
    if (a == -2 || b == -2)
        return 0;
    if (a != b || whole.events != cut.events || whole.hash != cut.hash)
        abort();
    return 0;
}
