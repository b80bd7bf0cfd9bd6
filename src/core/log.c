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
static enum cmg_log_format log_format = CMG_LOG_TEXT;
static int log_pid;
/* Lines of info and debug wait here, whole, until the event loop ends a round (or the
 * buffer is full): one write per round instead of one per request. A write stays under
 * PIPE_BUF, so lines of several processes sharing a pipe still never interleave. */
static char pending[CMG_LOG_LINE_MAX];
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

void cmg_log_set_format(enum cmg_log_format format) { log_format = format; }

int cmg_log_parse_format(const char *name)
{
    return !strcmp(name, "text") ? CMG_LOG_TEXT : !strcmp(name, "json") ? CMG_LOG_JSON : -1;
}

int cmg_log_parse_level(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(name, level_names[i]) == 0)
            return i;
    return -1;
}

int cmg_log_enabled(enum cmg_log_level level) { return level >= log_level; }

/* ---- rendering ---- */

/* A line being built. `limit` keeps room for what closes it whatever happens: in json
 * the quote of a string cut short, ,"truncated":true, the brace and the newline. */
#define JSON_RESERVE 20
struct line {
    char b[CMG_LOG_LINE_MAX];
    size_t n, limit;
    bool full;   /* something did not fit: nothing more is added */
};

/* Appends all of s or, if it does not fit, nothing (and the line is full). */
static bool put(struct line *l, const char *s, size_t len)
{
    if (l->full || l->n > l->limit || len > l->limit - l->n) {
        l->full = true;
        return false;
    }
    memcpy(l->b + l->n, s, len);
    l->n += len;
    return true;
}

static bool put_str(struct line *l, const char *s) { return put(l, s, strlen(s)); }

size_t cmg_utf8_char(const unsigned char *p, size_t left)
{
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;

    if (p[0] < 0x80)
        return 1;
    if (p[0] >= 0xC2 && p[0] <= 0xDF)
        n = 2;
    else if (p[0] >= 0xE0 && p[0] <= 0xEF) {
        n = 3;
        lo = p[0] == 0xE0 ? 0xA0 : 0x80;
        hi = p[0] == 0xED ? 0x9F : 0xBF;
    } else if (p[0] >= 0xF0 && p[0] <= 0xF4) {
        n = 4;
        lo = p[0] == 0xF0 ? 0x90 : 0x80;
        hi = p[0] == 0xF4 ? 0x8F : 0xBF;
    } else
        return 0;
    if (left < n || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (p[i] < 0x80 || p[i] > 0xBF)
            return 0;
    return n;
}

size_t cmg_log_json_escape(char *out, size_t cap, const char *s, size_t len, size_t *used)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, o = 0;

    while (i < len) {
        char esc[8];
        const char *w = esc;
        size_t wn, take = cmg_utf8_char(p + i, len - i);

        if (take == 0) {                     /* not UTF-8: U+FFFD */
            w = "\xEF\xBF\xBD";
            wn = 3;
            take = 1;
        } else if (p[i] == '"' || p[i] == '\\') {
            esc[0] = '\\';
            esc[1] = (char)p[i];
            wn = 2;
        } else if (p[i] < 0x20 || p[i] == 0x7F) {
            wn = (size_t)snprintf(esc, sizeof(esc), "\\u%04x", p[i]);
        } else {
            w = s + i;
            wn = take;
        }
        if (wn > cap - o)
            break;
        memcpy(out + o, w, wn);
        o += wn;
        i += take;
    }
    *used = i;
    return o;
}

/* A JSON member `,"key":"value"` (the key is the caller's, but escaped all the same). */
static void put_json_str(struct line *l, const char *key, const char *s, size_t len)
{
    char head[80];
    size_t used, k = cmg_log_json_escape(head + 2, sizeof(head) - 5, key, strlen(key), &used);

    head[0] = ',';
    head[1] = '"';
    memcpy(head + 2 + k, "\":\"", 3);
    if (!put(l, head, k + 5))
        return;
    l->n += cmg_log_json_escape(l->b + l->n, l->limit - l->n, s, len, &used);
    /* A value that fills the line to its limit ends it too: the quote below takes one
     * byte of JSON_RESERVE, which has room for it and the closing text, not for more. */
    l->full = used < len || l->n >= l->limit;
    l->b[l->n++] = '"';   /* within JSON_RESERVE */
}

/* Text: a value as it is, or in quotes if it holds a space, a quote or nothing, with
 * quotes, backslashes and control characters escaped: one line per event, always. */
static void put_text_value(struct line *l, const char *s, size_t len)
{
    bool quote = len == 0;

    for (size_t i = 0; i < len && !quote; i++)
        quote = s[i] == ' ' || s[i] == '"' || (unsigned char)s[i] < 0x20 || s[i] == 0x7F;
    if (!quote) {   /* as much as fits */
        size_t k = l->full || len <= l->limit - l->n ? len : l->limit - l->n;
        put(l, s, k);
        l->full |= k < len;
        return;
    }
    put(l, "\"", 1);
    for (size_t i = 0; i < len && !l->full; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\')
            put(l, (char[]){'\\', (char)c}, 2);
        else if (c < 0x20 || c == 0x7F)
            put(l, esc, (size_t)snprintf(esc, sizeof(esc), "\\x%02x", c));
        else
            put(l, (const char *)&c, 1);
    }
    if (!l->full)
        put(l, "\"", 1);
}

static void put_text_field(struct line *l, const struct cmg_log_field *f)
{
    char num[32];

    put(l, " ", 1);
    put_str(l, f->key);
    put(l, "=", 1);
    if (f->type == CMG_LOG_F_NUM)
        put(l, num, (size_t)snprintf(num, sizeof(num), "%lld", f->num));
    else
        put_text_value(l, f->str, f->len);
}

static void put_json_field(struct line *l, const struct cmg_log_field *f)
{
    char num[120];
    size_t used, k;

    if (f->type == CMG_LOG_F_STR) {
        put_json_str(l, f->key, f->str, f->len);
        return;
    }
    k = cmg_log_json_escape(num + 2, 80, f->key, strlen(f->key), &used);
    num[0] = ',';
    num[1] = '"';
    put(l, num, k + 2 + (size_t)snprintf(num + 2 + k, sizeof(num) - 2 - k, "\":%lld", f->num));
}

/* "2026-01-02T03:04:05.678Z": RFC 3339, UTC, milliseconds. */
static const char *timestamp(char *out, size_t size)
{
    struct timeval tv;
    struct tm tm;

    gettimeofday(&tv, NULL);
    if (tv.tv_sec != stamp_sec) {
        stamp_sec = tv.tv_sec;
        gmtime_r(&tv.tv_sec, &tm);
        strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
    }
    snprintf(out, size, "%s.%03dZ", stamp, (int)(tv.tv_usec / 1000));
    return out;
}

static void render_text(struct line *l, enum cmg_log_level level, const char *msg, size_t msg_len,
                        const struct cmg_log_field *f, size_t n)
{
    char ts[40], head[128];

    l->limit = sizeof(l->b) - 1;
    put(l, head, (size_t)snprintf(head, sizeof(head), "%s %s[%d] %s: ",
                                  timestamp(ts, sizeof(ts)), log_role,
                                  log_pid ? log_pid : (int)getpid(), level_names[level]));
    for (size_t i = 0; i < msg_len; i++) {   /* one line per event, whatever it quotes */
        char c = (unsigned char)msg[i] < 0x20 || msg[i] == 0x7F ? '?' : msg[i];
        if (!put(l, &c, 1))
            break;
    }
    for (size_t i = 0; i < n && !l->full; i++)
        if (f[i].type != CMG_LOG_F_NONE)
            put_text_field(l, &f[i]);
}

static void render_json(struct line *l, enum cmg_log_level level, const char *msg, size_t msg_len,
                        const struct cmg_log_field *f, size_t n)
{
    char ts[40], head[160];

    l->limit = sizeof(l->b) - JSON_RESERVE;
    put(l, head, (size_t)snprintf(head, sizeof(head),
                                  "{\"ts\":\"%s\",\"level\":\"%s\",\"role\":\"%s\",\"pid\":%d",
                                  timestamp(ts, sizeof(ts)), level_names[level], log_role,
                                  log_pid ? log_pid : (int)getpid()));
    put_json_str(l, "msg", msg, msg_len);
    for (size_t i = 0; i < n && !l->full; i++)
        if (f[i].type != CMG_LOG_F_NONE)
            put_json_field(l, &f[i]);
    if (l->full) {
        memcpy(l->b + l->n, ",\"truncated\":true", 17);
        l->n += 17;
    }
    l->b[l->n++] = '}';
}

/* Writes the line, whole, now or with the next flush. */
static void emit(enum cmg_log_level level, const char *msg, size_t msg_len,
                 const struct cmg_log_field *f, size_t n)
{
    struct line l = {.n = 0};

    if (log_format == CMG_LOG_JSON)
        render_json(&l, level, msg, msg_len, f, n);
    else
        render_text(&l, level, msg, msg_len, f, n);
    l.b[l.n++] = '\n';
    if (npending + l.n > sizeof(pending))
        cmg_log_flush();
    memcpy(pending + npending, l.b, l.n);
    npending += l.n;
    if (!buffered || level >= CMG_LOG_WARN)
        cmg_log_flush();
}

static void log_line(enum cmg_log_level level, const char *fmt, va_list ap, int with_ssl)
{
    char msg[2048];
    size_t n = 0;
    int m;

    if (level < log_level)
        return;
    m = vsnprintf(msg, sizeof(msg), fmt, ap);
    n = m < 0 ? 0 : (size_t)m < sizeof(msg) ? (size_t)m : sizeof(msg) - 1;
    if (with_ssl) {
        unsigned long e;
        while ((e = ERR_get_error()) != 0 && n + 2 < sizeof(msg)) {
            n += (size_t)snprintf(msg + n, sizeof(msg) - n, n ? " (" : "(");
            if (n < sizeof(msg)) {
                ERR_error_string_n(e, msg + n, sizeof(msg) - n);
                n += strlen(msg + n);
            }
            if (n + 1 < sizeof(msg))
                msg[n++] = ')';
        }
        ERR_clear_error();
    }
    if (n >= sizeof(msg))
        n = sizeof(msg) - 1;
    emit(level, msg, n, NULL, 0);
}

void cmg_log_kv(enum cmg_log_level level, const char *msg, const struct cmg_log_field *f, size_t n)
{
    if (level >= log_level)
        emit(level, msg, strlen(msg), f, n);
}

void cmg_log(enum cmg_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_line(level, fmt, ap, 0);
    va_end(ap);
}

/* Whether a line of l's kind may be written now; if not, it is counted. */
static bool limit_admits(struct cmg_log_limit *l, enum cmg_log_level level)
{
    unsigned burst = l->burst ? l->burst : CMG_LOG_LIMIT_BURST;
    long now;

    if (level < log_level)
        return false;
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
        return false;
    }
    l->logged++;
    return true;
}

void cmg_log_limited(struct cmg_log_limit *l, enum cmg_log_level level, const char *fmt, ...)
{
    va_list ap;

    if (!limit_admits(l, level))
        return;
    va_start(ap, fmt);
    log_line(level, fmt, ap, 0);
    va_end(ap);
}

void cmg_log_kv_limited(struct cmg_log_limit *l, enum cmg_log_level level, const char *msg,
                        const struct cmg_log_field *f, size_t n)
{
    if (limit_admits(l, level))
        emit(level, msg, strlen(msg), f, n);
}

void cmg_log_ssl(enum cmg_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_line(level, fmt, ap, 1);
    va_end(ap);
}
