/* The JSON escaping of log values (cmg_log_json_escape): whatever bytes a peer sends,
 * the output fits its buffer, covers a prefix of the input, and is the inside of a
 * valid JSON string: valid UTF-8, no control character, every backslash a whole escape,
 * no bare quote. The first byte picks the buffer's size, so that cuts are tried too. */
#include "core/log.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool hex(uint8_t c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

/* The length of a valid UTF-8 character at p, or 0 (written apart from log.c's). */
static size_t utf8_len(const uint8_t *p, size_t left)
{
    uint32_t cp;
    size_t n = p[0] < 0x80 ? 1 : (p[0] & 0xE0) == 0xC0 ? 2 : (p[0] & 0xF0) == 0xE0 ? 3
             : (p[0] & 0xF8) == 0xF0 ? 4 : 0;

    if (n == 0 || n > left)
        return 0;
    cp = n == 1 ? p[0] : p[0] & (0x7F >> n);
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
        cp = cp << 6 | (p[i] & 0x3F);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

static void check(const uint8_t *o, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t k = utf8_len(o + i, n - i);
        if (k == 0 || o[i] < 0x20 || o[i] == 0x7F || o[i] == '"')
            abort();
        if (o[i] == '\\') {
            if (i + 1 >= n)
                abort();
            if (o[i + 1] == 'u') {
                if (i + 6 > n || !hex(o[i + 2]) || !hex(o[i + 3]) || !hex(o[i + 4]) ||
                    !hex(o[i + 5]))
                    abort();
                k = 6;
            } else if (o[i + 1] == '"' || o[i + 1] == '\\')
                k = 2;
            else
                abort();
        }
        i += k;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t cap, used = 0, n;
    char *in, *out;

    if (size == 0)
        return 0;
    cap = data[0] == 0xFF ? 6 * size : data[0];
    in = malloc(size - 1 ? size - 1 : 1);   /* exact sizes, so overreads are caught */
    out = malloc(cap ? cap : 1);
    if (in && out) {
        memcpy(in, data + 1, size - 1);
        n = cmg_log_json_escape(out, cap, in, size - 1, &used);
        if (n > cap || used > size - 1 || (cap >= 6 * (size - 1) && used != size - 1))
            abort();
        check((const uint8_t *)out, n);
    }
    free(in);
    free(out);
    return 0;
}
