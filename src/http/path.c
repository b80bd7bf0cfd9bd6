#include "http/path.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const char hex_digits[] = "0123456789ABCDEF";

int cmg_hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The byte of the escape "%HH" at p[i] (p[i] is '%'), or -1 if it is malformed. */
static int escape_at(const char *p, size_t i, size_t end)
{
    int hi, lo;

    if (i + 2 >= end || (hi = cmg_hex_digit(p[i + 1])) < 0 || (lo = cmg_hex_digit(p[i + 2])) < 0)
        return -1;
    return hi * 16 + lo;
}

static bool unreserved(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '.' || c == '_' || c == '~';
}

static void put_escape(char *out, size_t *o, int v)
{
    out[(*o)++] = '%';
    out[(*o)++] = hex_digits[v >> 4];
    out[(*o)++] = hex_digits[v & 15];
}

/* A multi-byte UTF-8 character spelt as escapes from p[i]: the range its second
 * byte must be in says what is shortest form and not a surrogate (RFC 3629). The
 * escapes go to out in upper case; the number of input bytes used, or 0. */
static size_t utf8_escapes(const char *p, size_t i, size_t end, int lead, char *out, size_t *o)
{
    int more, lo = 0x80, hi = 0xbf;

    if (lead >= 0xc2 && lead <= 0xdf)
        more = 1;
    else if (lead >= 0xe0 && lead <= 0xef)
        more = 2, lo = lead == 0xe0 ? 0xa0 : 0x80, hi = lead == 0xed ? 0x9f : 0xbf;
    else if (lead >= 0xf0 && lead <= 0xf4)
        more = 3, lo = lead == 0xf0 ? 0x90 : 0x80, hi = lead == 0xf4 ? 0x8f : 0xbf;
    else
        return 0;   /* a continuation byte alone, an overlong lead (C0, C1), or past U+10FFFF */
    put_escape(out, o, lead);
    for (int k = 1; k <= more; k++) {
        size_t j = i + 3 * (size_t)k;
        int v = j < end && p[j] == '%' ? escape_at(p, j, end) : -1;
        if (v < lo || v > hi)
            return 0;
        put_escape(out, o, v);
        lo = 0x80, hi = 0xbf;
    }
    return 3 * (size_t)(more + 1);
}

/* "." or ".." once ";params" are dropped ("..;/" is ".." to Tomcat and others). */
static bool dot_segment(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] == ';' || (s[i] == '%' && i + 2 < n && s[i + 1] == '3' && s[i + 2] == 'B')) {
            n = i;
            break;
        }
    return (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.');
}

/* "%25" and two hex digits, which decode twice to another byte. Judged on the
 * canonical form, where "%25%34%31" has become "%2541". */
static bool double_encoded(const char *s, size_t n)
{
    for (size_t i = 0; i + 4 < n; i++)
        if (s[i] == '%' && s[i + 1] == '2' && s[i + 2] == '5' && cmg_hex_digit(s[i + 3]) >= 0 &&
            cmg_hex_digit(s[i + 4]) >= 0)
            return true;
    return false;
}

/* One escape of the path at p[i]: its canonical spelling to out; bytes used, or 0. */
static size_t path_escape(const char *p, size_t i, size_t end, char *out, size_t *o,
                          const char **why)
{
    int v = escape_at(p, i, end);
    size_t used = 3;

    if (v < 0)
        *why = "malformed %-escape", used = 0;
    else if (v >= 0x80) {
        if (!(used = utf8_escapes(p, i, end, v, out, o)))
            *why = "escapes that are not UTF-8 in shortest form";
    } else if (v < 0x20 || v == 0x7f)
        *why = "an encoded control byte", used = 0;
    else if (v == '/' || v == '\\')
        *why = "an encoded '/' or '\\'", used = 0;
    else if (unreserved(v))
        out[(*o)++] = (char)v;
    else
        put_escape(out, o, v);
    return used;
}

/* The path part p[0..end) to out, canonical; -1 if refused. */
static int canonical_path(const char *p, size_t end, char *out, size_t *olen, const char **why)
{
    size_t o = 1, seg = 1, i = 1;

    out[0] = '/';
    while (i < end) {
        unsigned char c = (unsigned char)p[i];
        if (c == '/') {
            if (dot_segment(out + seg, o - seg)) {
                *why = "a '.' or '..' segment";
                return -1;
            }
            if (o > seg)      /* an empty segment merges into the one before */
                out[o++] = '/';
            seg = o;
            i++;
        } else if (c == '%') {
            size_t used = path_escape(p, i, end, out, &o, why);
            if (!used)
                return -1;
            i += used;
        } else if (c == '\\') {
            *why = "a backslash";
            return -1;
        } else {
            out[o++] = (char)c;
            i++;
        }
    }
    if (dot_segment(out + seg, o - seg)) {
        *why = "a '.' or '..' segment";
        return -1;
    }
    if (double_encoded(out, o)) {
        *why = "double encoding (%25 and two hex digits)";
        return -1;
    }
    *olen = o;
    return 0;
}

/* Bytes no part of a target may hold: controls, space, DEL and above, '#', '\'. */
static const char *bad_byte(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= 0x20 || c >= 0x7f)
            return "a control byte, space or non-ASCII byte";
        if (c == '#')
            return "a fragment ('#')";
        if (c == '\\')
            return "a backslash";
        if (c == '%' && (escape_at(p, i, n) <= 0))
            return "malformed %-escape or %00";
    }
    return NULL;
}

int cmg_path_canonical(const char *p, size_t n, char *out, size_t *out_len, const char **why)
{
    const char *q = memchr(p, '?', n);
    size_t path_end = q ? (size_t)(q - p) : n, len = 0;

    *why = NULL;
    if (n == 0 || p[0] != '/')
        *why = "not an origin-form target (no leading '/')";
    else
        *why = bad_byte(p, n);
    if (*why || canonical_path(p, path_end, out, &len, why) < 0)
        return -1;
    memcpy(out + len, p + path_end, n - path_end);
    len += n - path_end;
    out[len] = 0;
    *out_len = len;
    return 0;
}

int cmg_path_check(const char *p, size_t n)
{
    char *canon = malloc(n + 1);
    const char *why;
    size_t len = 0;
    int rc = -1;

    if (canon && cmg_path_canonical(p, n, canon, &len, &why) == 0 && len == n &&
        !memcmp(canon, p, n))
        rc = 0;
    free(canon);
    return rc;
}

static bool take_prefix(const char *p, size_t n, const char *prefix, size_t *used)
{
    size_t len = strlen(prefix);
    if (n < len || strncasecmp(p, prefix, len) != 0)
        return false;
    *used = len;
    return true;
}

void cmg_path_parse(const char *p, size_t n, struct cmg_path *out)
{
    size_t used = 0, r;

    memset(out, 0, sizeof(*out));
    out->kind = CMG_PATH_OTHER;
    if (take_prefix(p, n, "/CCM_Proxy_MutualAuth/", &used))
        out->kind = CMG_PATH_MUTUAL_AUTH;
    else if (take_prefix(p, n, "/CCM_Proxy_ServerAuth/", &used))
        out->kind = CMG_PATH_SERVER_AUTH;
    else
        return;
    for (r = used; r < n && p[r] != '/' && p[r] != '?'; r++) {
        char c = p[r];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              c == '-' || c == '_')) {
            out->kind = CMG_PATH_OTHER;
            return;
        }
    }
    if (r == used || r - used > CMG_ROLE_ID_MAX) {
        out->kind = CMG_PATH_OTHER;
        return;
    }
    out->role = p + used;
    out->role_len = r - used;
    out->rest = p + r;
    out->rest_len = n - r;
}

/* Decodes one value (n bytes) into out; its length, or -1. */
static int query_decode(const char *v, size_t n, char *out, size_t cap)
{
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        char c = v[i];
        int hi, lo;

        if (c == '%') {
            if (i + 2 >= n)
                return -1;
            hi = cmg_hex_digit(v[i + 1]);
            lo = cmg_hex_digit(v[i + 2]);
            if (hi < 0 || lo < 0)
                return -1;
            c = (char)(hi * 16 + lo);
            i += 2;
        }
        if ((unsigned char)c <= 0x20 || (unsigned char)c >= 0x7F)
            return -1;   /* a request-target is printable ASCII */
        if (o + 1 >= cap)
            return -1;
        out[o++] = c;
    }
    out[o] = 0;
    return (int)o;
}

int cmg_query_param(const char *q, size_t n, const char *name, char *out, size_t cap)
{
    size_t k = strlen(name), i = 0;

    while (i < n) {
        size_t end = i;
        while (end < n && q[end] != '&')
            end++;
        if (end - i > k && !memcmp(q + i, name, k) && q[i + k] == '=')
            return query_decode(q + i + k + 1, end - i - k - 1, out, cap) > 0 ? 1 : -1;
        i = end + 1;
    }
    return 0;
}
