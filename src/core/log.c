#include "core/log.h"

#include <openssl/err.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const char *log_role = "cmg";
static enum cmg_log_level log_level = CMG_LOG_INFO;
static int log_pid;
/* Lines of info and debug wait here, whole, until the event loop ends a round (or the
 * buffer is full): one write per round instead of one per request. A write stays under
 * PIPE_BUF, so lines of several processes sharing a pipe still never interleave. */
static char pending[4096];
static size_t npending;
static bool buffered;
static time_t stamp_sec = -1;
static char stamp[32];
static const char *const level_names[] = {"debug", "info", "warn", "error"};

void cmg_log_init(const char *role)
{
    log_role = role;
    log_pid = (int)getpid();
}

/* Limiters holding lines back, so that their count is written even when no line of
 * their kind comes again: see summarize(). */
#define MAX_HOLDING 16
static struct cmg_log_limit *holding[MAX_HOLDING];
static size_t nholding;

/* Writes the count of what l held back in a second that is over. */
static void summarize(struct cmg_log_limit *l, long now_sec, enum cmg_log_level level)
{
    unsigned burst = l->burst ? l->burst : CMG_LOG_LIMIT_BURST;

    if (l->held && l->sec != now_sec) {
        unsigned held = l->held;
        l->held = 0;
        cmg_log(level, "%u more %s not logged (at most %u a second)", held, l->what, burst);
    }
}

static long mono_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (long)ts.tv_sec;
}

void cmg_log_flush(void)
{
    size_t off = 0;
    static bool summarizing;

    if (nholding && !summarizing) {
        long now = mono_sec();
        summarizing = true;
        for (size_t i = 0; i < nholding;)
            if (holding[i]->sec != now) {
                summarize(holding[i], now, holding[i]->level);
                holding[i]->listed = false;
                holding[i] = holding[--nholding];
            } else {
                i++;
            }
        summarizing = false;
    }

    while (off < npending) {
        ssize_t w = write(STDERR_FILENO, pending + off, npending - off);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    npending = 0;
}

void cmg_log_set_buffered(bool on)
{
    if (!on)
        cmg_log_flush();
    buffered = on;
}

void cmg_log_set_level(enum cmg_log_level level) { log_level = level; }

int cmg_log_parse_level(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(name, level_names[i]) == 0)
            return i;
    return -1;
}

int cmg_log_enabled(enum cmg_log_level level) { return level >= log_level; }

static void log_line(enum cmg_log_level level, const char *fmt, va_list ap, int with_ssl)
{
    char line[2048];
    struct timeval tv;
    struct tm tm;
    size_t n;

    if (level < log_level)
        return;
    gettimeofday(&tv, NULL);
    if (tv.tv_sec != stamp_sec) {
        stamp_sec = tv.tv_sec;
        gmtime_r(&tv.tv_sec, &tm);
        strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
    }
    n = (size_t)snprintf(line, sizeof(line), "%s.%03dZ %s[%d] %s: ", stamp,
                         (int)(tv.tv_usec / 1000), log_role, log_pid ? log_pid : (int)getpid(),
                         level_names[level]);
    if (n < sizeof(line)) {
        int m = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
        n = m < 0 ? n : n + (size_t)m;
    }
    if (with_ssl) {
        unsigned long e;
        while ((e = ERR_get_error()) != 0 && n + 2 < sizeof(line)) {
            n += (size_t)snprintf(line + n, sizeof(line) - n, n ? " (" : "(");
            if (n < sizeof(line)) {
                ERR_error_string_n(e, line + n, sizeof(line) - n);
                n += strlen(line + n);
            }
            if (n + 1 < sizeof(line))
                line[n++] = ')';
        }
        ERR_clear_error();
    }
    if (n >= sizeof(line) - 1)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    if (npending + n > sizeof(pending))
        cmg_log_flush();
    if (n > sizeof(pending)) {
        /* One write per line, so that lines of several processes do not interleave. */
        if (write(STDERR_FILENO, line, n) < 0)
            return;
        return;
    }
    memcpy(pending + npending, line, n);
    npending += n;
    if (!buffered || level >= CMG_LOG_WARN)
        cmg_log_flush();
}

void cmg_log(enum cmg_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_line(level, fmt, ap, 0);
    va_end(ap);
}

void cmg_log_limited(struct cmg_log_limit *l, enum cmg_log_level level, const char *fmt, ...)
{
    unsigned burst = l->burst ? l->burst : CMG_LOG_LIMIT_BURST;
    long now;
    va_list ap;

    if (level < log_level)
        return;
    now = mono_sec();
    if (now != l->sec) {
        summarize(l, now, level);
        l->sec = now;
        l->logged = 0;
    }
    if (l->logged >= burst) {
        l->held++;
        l->level = level;
        if (!l->listed && nholding < MAX_HOLDING) {   /* counted when the second is over */
            l->listed = true;
            holding[nholding++] = l;
        }
        return;
    }
    l->logged++;
    va_start(ap, fmt);
    log_line(level, fmt, ap, 0);
    va_end(ap);
}

void cmg_log_ssl(enum cmg_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_line(level, fmt, ap, 1);
    va_end(ap);
}
