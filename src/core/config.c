#include "core/config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void cmg_conf_dir(const char *file, char *dir, size_t dirlen)
{
    const char *slash = strrchr(file, '/');
    if (!slash)
        snprintf(dir, dirlen, ".");
    else if (slash == file)
        snprintf(dir, dirlen, "/");
    else
        snprintf(dir, dirlen, "%.*s", (int)(slash - file), file);
}

int cmg_conf_path(char *out, size_t outlen, const char *dir, const char *value)
{
    int n;
    if (value[0] == '/' || value[0] == 0)
        n = snprintf(out, outlen, "%s", value);
    else
        n = snprintf(out, outlen, "%s/%s", dir, value);
    return n < 0 || (size_t)n >= outlen ? -1 : 0;
}

int cmg_conf_uint(const char *v, uint64_t min, uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long x;
    if (!*v || *v == '-')
        return -1;
    errno = 0;
    x = strtoull(v, &end, 10);
    if (errno || *end || x < min || x > max)
        return -1;
    *out = x;
    return 0;
}

int cmg_conf_seconds(const char *v, uint32_t *ms)
{
    char *end;
    double s;
    if (!*v || *v == '-')
        return -1;
    errno = 0;
    s = strtod(v, &end);
    if (errno || *end || s < 0 || s > 86400)
        return -1;
    *ms = (uint32_t)(s * 1000 + 0.5);
    return 0;
}

struct conf_unit {
    const char *name;
    uint64_t n;
};

/* A decimal count at most limit followed by one of the units (exact name), scaled and
 * within [min, max]. 0, or -1. */
static int scaled(const char *v, const struct conf_unit *units, size_t nunits,
                  unsigned long long limit, uint64_t min, uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long x;

    if (*v < '0' || *v > '9')
        return -1;
    errno = 0;
    x = strtoull(v, &end, 10);
    if (errno || x > limit)
        return -1;
    for (size_t i = 0; i < nunits; i++)
        if (!strcmp(end, units[i].name)) {
            x *= units[i].n;
            if (x < min || x > max)
                return -1;
            *out = x;
            return 0;
        }
    return -1;
}

int cmg_conf_duration(const char *v, uint64_t min, uint64_t max, uint64_t *seconds)
{
    static const struct conf_unit units[] = {
        {"", 1}, {"s", 1}, {"m", 60}, {"h", 3600}, {"d", 86400}};
    return scaled(v, units, sizeof(units) / sizeof(units[0]), 100000000ull, min, max, seconds);
}

int cmg_conf_size(const char *v, uint64_t min, uint64_t max, uint64_t *bytes)
{
    static const struct conf_unit units[] = {
        {"", 1},        {"B", 1},         {"K", 1024},      {"KiB", 1024},
        {"M", 1 << 20}, {"MiB", 1 << 20}, {"G", 1 << 30},   {"GiB", 1 << 30}};
    return scaled(v, units, sizeof(units) / sizeof(units[0]), 1ull << 40, min, max, bytes);
}

int cmg_conf_str(char *out, size_t outlen, const char *v)
{
    size_t n = strlen(v);
    if (n >= outlen)
        return -1;
    memcpy(out, v, n + 1);
    return 0;
}
