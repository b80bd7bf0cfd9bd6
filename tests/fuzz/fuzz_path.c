/* Request targets from devices, through the canonicaliser the gateway runs
 * (cmg_path_canonical, then cmg_path_parse on its output, as cmg_admit does). It
 * must never read out of bounds, and what it lets through must be canonical: a
 * fixed point of itself, with no "." or ".." segment (";params" dropped), no "//",
 * no backslash, '#', "%25HH" or encoded '/' in the path. */
#include "http/path.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool is_dots(const char *s, size_t n)
{
    const char *semi = memchr(s, ';', n);
    if (semi)
        n = (size_t)(semi - s);
    return (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.');
}

static bool hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f');
}

/* Escapes the canonical path must not hold. */
static bool bad_escape(const char *c, size_t i, size_t end)
{
    if (i + 2 >= end)
        return true;
    if (!strncmp(c + i, "%25", 3))
        return i + 4 < end && hex(c[i + 3]) && hex(c[i + 4]);
    return !strncmp(c + i, "%2F", 3) || !strncmp(c + i, "%5C", 3) ||
           !strncmp(c + i, "%2E", 3) || (c[i + 1] >= 'a' && c[i + 1] <= 'f') || (c[i + 2] >= 'a' && c[i + 2] <= 'f');
}

static void check_path(const char *c, size_t end)
{
    size_t seg = 1;

    if (end == 0 || c[0] != '/')
        abort();
    for (size_t i = 1; i <= end; i++) {
        if (i < end && (c[i] == '\\' || c[i] == '#' || (c[i] == '%' && bad_escape(c, i, end))))
            abort();
        if (i == end || c[i] == '/') {
            if (is_dots(c + seg, i - seg) || (i < end && i == seg))   /* dots, or "//" */
                abort();
            seg = i + 1;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *p = malloc(size ? size : 1);   /* exact size, so overreads are caught */
    char *out = malloc(size + 1), *again = malloc(size + 1);
    const char *why;
    size_t len = 0, len2 = 0;
    struct cmg_path path;

    if (!p || !out || !again)
        goto done;
    memcpy(p, data, size);
    if (cmg_path_canonical(p, size, out, &len, &why) < 0) {
        if (!why || cmg_path_check(p, size) == 0)
            abort();
        goto done;
    }
    if (len > size || out[len] || cmg_path_check(out, len) != 0 ||
        cmg_path_canonical(out, len, again, &len2, &why) < 0 || len2 != len ||
        memcmp(out, again, len))
        abort();
    check_path(out, memchr(out, '?', len) ? (size_t)((char *)memchr(out, '?', len) - out) : len);
    cmg_path_parse(out, len, &path);
    if (path.kind != CMG_PATH_OTHER &&
        (path.role < out || path.role + path.role_len > out + len || path.role_len == 0 ||
         path.rest + path.rest_len != out + len))
        abort();
done:
    free(p);
    free(out);
    free(again);
    return 0;
}
