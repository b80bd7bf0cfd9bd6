/* Logging: one line per event, written to stderr so that systemd, docker or a terminal
 * can collect it. Two formats (log_format): text, "time role[pid] level: message
 * key=value ...", and json, one object a line: {"ts","level","role","pid","msg", fields}.
 * Lines with fields (cmg_log_kv) are rendered in either from the same call. */
#ifndef CMG_LOG_H
#define CMG_LOG_H

enum cmg_log_level { CMG_LOG_DEBUG, CMG_LOG_INFO, CMG_LOG_WARN, CMG_LOG_ERROR };

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

/* The longest line written, newline included: a line stays one write under PIPE_BUF.
 * Longer ones are cut (json: the values, and "truncated":true says so). */
#define CMG_LOG_LINE_MAX 4096

enum cmg_log_format { CMG_LOG_TEXT, CMG_LOG_JSON };

void cmg_log_init(const char *role);
void cmg_log_set_format(enum cmg_log_format format);
/* Returns the format for "text" or "json", or -1. */
int cmg_log_parse_format(const char *name);
/* With buffering on (the event loop turns it on while it runs), info and debug lines
 * are written once per loop round by cmg_log_flush(); warnings and errors at once. */
void cmg_log_set_buffered(bool on);
void cmg_log_flush(void);
void cmg_log_set_level(enum cmg_log_level level);
/* Returns the level for "debug", "info", "warn" or "error", or -1. */
int cmg_log_parse_level(const char *name);
int cmg_log_enabled(enum cmg_log_level level);
void cmg_log(enum cmg_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Logs fmt followed by the OpenSSL error queue, which it then clears. */
void cmg_log_ssl(enum cmg_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Lines a peer can cause at will (refusals, failed handshakes): at most `burst` (default
 * CMG_LOG_LIMIT_BURST) of one kind a second; a line counts what a second held back, written
 * with the next line of that kind or the next log flush after the second is over. */
#define CMG_LOG_LIMIT_BURST 10
struct cmg_log_limit {
    const char *what;   /* names the lines in the summary: "refused connections" */
    unsigned burst;     /* lines a second; 0: CMG_LOG_LIMIT_BURST */
    long sec;
    unsigned logged, held;
    enum cmg_log_level level;   /* of the lines held */
    bool listed;                /* among those the log flush summarizes */
};
void cmg_log_limited(struct cmg_log_limit *l, enum cmg_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A field of a structured line: a string (any bytes: escaped as the format needs), a
 * number, or nothing (an optional field left out). */
enum cmg_log_field_type { CMG_LOG_F_NONE, CMG_LOG_F_STR, CMG_LOG_F_NUM };
struct cmg_log_field {
    const char *key;
    enum cmg_log_field_type type;
    const char *str;
    size_t len;
    long long num;
};
static inline size_t cmg_log_strlen(const char *s) { return s ? strlen(s) : 0; }
static inline enum cmg_log_field_type cmg_log_opt_type(const char *s)
{
    return s ? CMG_LOG_F_STR : CMG_LOG_F_NONE;
}
static inline const char *cmg_log_or_dash(const char *s) { return s ? s : "-"; }
/* A string; NULL is written "-". */
#define CMG_F_STR(k, s) \
    {.key = (k), .type = CMG_LOG_F_STR, .str = cmg_log_or_dash(s), \
     .len = strlen(cmg_log_or_dash(s))}
/* len bytes at s (not NUL-terminated). */
#define CMG_F_STRN(k, s, n) {.key = (k), .type = CMG_LOG_F_STR, .str = (s), .len = (n)}
/* A string, left out if s is NULL. */
#define CMG_F_OPT(k, s) \
    {.key = (k), .type = cmg_log_opt_type(s), .str = (s), .len = cmg_log_strlen(s)}
/* len bytes at s, left out if s is NULL. */
#define CMG_F_OPTN(k, s, n) {.key = (k), .type = cmg_log_opt_type(s), .str = (s), .len = (n)}
#define CMG_F_NUM(k, n) {.key = (k), .type = CMG_LOG_F_NUM, .num = (long long)(n)}

/* One line: msg (a fixed text: what happened), then the fields. */
void cmg_log_kv(enum cmg_log_level level, const char *msg, const struct cmg_log_field *f,
                size_t n);
void cmg_log_kv_limited(struct cmg_log_limit *l, enum cmg_log_level level, const char *msg,
                        const struct cmg_log_field *f, size_t n);
#define CMG_LOG_NFIELDS(f) (sizeof(f) / sizeof((f)[0]))

/* The length of the valid UTF-8 character at p (at most `left` bytes, left > 0), or 0
 * (RFC 3629: no overlong forms, no surrogates, nothing past U+10FFFF). */
size_t cmg_utf8_char(const unsigned char *p, size_t left);

/* The inside of a JSON string for the len bytes at s, written to out (at most cap bytes):
 * quotes, backslashes and control characters escaped, each byte that is no part of valid
 * UTF-8 as U+FFFD. Returns the bytes written; *used says how many of s they cover (less
 * than len when out is full; never a part of an escape or of a character). */
size_t cmg_log_json_escape(char *out, size_t cap, const char *s, size_t len, size_t *used);

#define cmg_debug(...) \
    do { if (cmg_log_enabled(CMG_LOG_DEBUG)) cmg_log(CMG_LOG_DEBUG, __VA_ARGS__); } while (0)
#define cmg_info(...) cmg_log(CMG_LOG_INFO, __VA_ARGS__)
#define cmg_warn(...) cmg_log(CMG_LOG_WARN, __VA_ARGS__)
#define cmg_error(...) cmg_log(CMG_LOG_ERROR, __VA_ARGS__)

#endif
