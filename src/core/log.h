/* Logging: one line per event, "time role[pid] level: message key=value ...",
 * written to stderr so that systemd, docker or a terminal can collect it. */
#ifndef CMG_LOG_H
#define CMG_LOG_H

enum cmg_log_level { CMG_LOG_DEBUG, CMG_LOG_INFO, CMG_LOG_WARN, CMG_LOG_ERROR };

#include <stdbool.h>

void cmg_log_init(const char *role);
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

#define cmg_debug(...) \
    do { if (cmg_log_enabled(CMG_LOG_DEBUG)) cmg_log(CMG_LOG_DEBUG, __VA_ARGS__); } while (0)
#define cmg_info(...) cmg_log(CMG_LOG_INFO, __VA_ARGS__)
#define cmg_warn(...) cmg_log(CMG_LOG_WARN, __VA_ARGS__)
#define cmg_error(...) cmg_log(CMG_LOG_ERROR, __VA_ARGS__)

#endif
