#include "http/path.h"

#include <stdbool.h>
#include <string.h>
#include <strings.h>

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A segment that decodes to "." or ".." (any mix of '.' and "%2e"). */
static bool dot_segment(const char *s, size_t n)
{
    size_t dots = 0;
    for (size_t i = 0; i < n;) {
        if (s[i] == '.') {
            i++;
        } else if (s[i] == '%' && i + 2 < n && s[i + 1] == '2' &&
                   (s[i + 2] == 'e' || s[i + 2] == 'E')) {
            i += 3;
        } else {
            return false;
        }
        dots++;
    }
    return dots == 1 || dots == 2;
}

int cmg_path_check(const char *p, size_t n)
{
    size_t path_end = n, seg = 1;

    if (n == 0 || p[0] != '/')
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= 0x20 || c == 0x7f)
            return -1;
        if (c == '?' && path_end == n)
            path_end = i;
        if (c == '%') {
            int hi, lo, v;
            if (i + 2 >= n || (hi = hexval(p[i + 1])) < 0 || (lo = hexval(p[i + 2])) < 0)
                return -1;
            v = hi * 16 + lo;
            if (v == 0 || (i < path_end && (v == '/' || v == '\\' || v < 0x20 || v == 0x7f)))
                return -1;
        }
        if (i < path_end && c == '\\')
            return -1;
    }
    for (size_t i = 1; i <= path_end; i++) {
        if (i == path_end || p[i] == '/') {
            if (dot_segment(p + seg, i - seg))
                return -1;
            seg = i + 1;
        }
    }
    return 0;
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
