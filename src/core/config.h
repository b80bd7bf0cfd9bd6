/* Helpers for reading INI configuration values (files are parsed with inih). */
#ifndef CMG_CONFIG_H
#define CMG_CONFIG_H

#include <stddef.h>
#include <stdint.h>

/* The directory part of a file name ("." if none). */
void cmg_conf_dir(const char *file, char *dir, size_t dirlen);
/* A path relative to dir, unless absolute. 0, or -1 if too long. */
int cmg_conf_path(char *out, size_t outlen, const char *dir, const char *value);
/* Whole number in [min, max]. 0 or -1. */
int cmg_conf_uint(const char *v, uint64_t min, uint64_t max, uint64_t *out);
/* Seconds, fractions allowed ("0.5"), as milliseconds; at most a day. 0 or -1. */
int cmg_conf_seconds(const char *v, uint32_t *ms);
/* A duration in whole seconds: "300", "300s", "5m", "1h", "31d"; within [min, max].
 * 0 or -1. */
int cmg_conf_duration(const char *v, uint64_t min, uint64_t max, uint64_t *seconds);
/* A size in bytes: "65536", "64KiB" / "64K", "16MiB" / "16M", "1GiB" / "1G"; within
 * [min, max]. 0 or -1. */
int cmg_conf_size(const char *v, uint64_t min, uint64_t max, uint64_t *bytes);
/* Copies a value into a fixed buffer. 0, or -1 if too long. */
int cmg_conf_str(char *out, size_t outlen, const char *v);

#endif
