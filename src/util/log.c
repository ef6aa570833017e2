/*
 * The daemon's log (log.h): level threshold, the journal's "<N>" prefix or
 * a readable one, one write(2) per line, and a rate limit for events that
 * a client or a failing disk could repeat without end.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util/cleanup.h"
#include "util/log.h"

#define LOG_MAX_LINE 4096      /* longer lines are cut */

/* Until the program sets a level (bitbackd: --log-level), only warnings
 * and errors: the CLI's own output stays as it was. */
static int log_threshold = LOG_LEVEL_WARNING;    /* atomic */
static bool log_journal;                         /* set by log_init */
static const char *log_progname;                 /* NULL: error_progname */
static pthread_mutex_t log_rl_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = {
    [LOG_LEVEL_ERR] = "err",
    [LOG_LEVEL_WARNING] = "warning",
    [LOG_LEVEL_NOTICE] = "notice",
    [LOG_LEVEL_INFO] = "info",
    [LOG_LEVEL_DEBUG] = "debug",
};

void log_set_level(LogLevel level)
{
    __atomic_store_n(&log_threshold, (int)level, __ATOMIC_RELAXED);
}

bool log_enabled(LogLevel level)
{
    return (int)level <= __atomic_load_n(&log_threshold, __ATOMIC_RELAXED);
}

bool log_level_parse(const char *name, LogLevel *ret_level, Error **errp)
{
    for (int l = LOG_LEVEL_ERR; l <= LOG_LEVEL_DEBUG; l++) {
        if (strcmp(name, level_names[l]) == 0) {
            *ret_level = (LogLevel)l;
            return true;
        }
    }
    error_setg(errp, "unknown log level '%s' (expected err, warning, notice, "
               "info or debug)", name);
    return false;
}

/* JOURNAL_STREAM is "DEV:INODE" of the journal's stream socket; it is
 * inherited by children whose stderr goes elsewhere, so it counts only
 * when it names the file stderr is now (systemd.exec(5)). */
void log_init(const char *progname)
{
    log_progname = progname;
    log_journal = false;
    const char *js = getenv("JOURNAL_STREAM");
    struct stat st;
    unsigned long long dev, ino;
    char tail;
    if (js && sscanf(js, "%llu:%llu%c", &dev, &ino, &tail) == 2 &&
        fstat(STDERR_FILENO, &st) == 0 &&
        (unsigned long long)st.st_dev == dev &&
        (unsigned long long)st.st_ino == ino) {
        log_journal = true;
    }
}

static void log_vmsg(LogLevel level, const char *suffix, const char *fmt,
                     va_list ap)
{
    char line[LOG_MAX_LINE];
    int n;
    if (log_journal) {
        n = snprintf(line, sizeof(line), "<%d>", (int)level);
    } else {
        n = snprintf(line, sizeof(line), "%s: %s: ",
                     log_progname ? log_progname : error_progname,
                     level_names[level]);
    }
    size_t start = (size_t)n;
    n = vsnprintf(line + start, sizeof(line) - start, fmt, ap);
    size_t len = n < 0 ? start : MIN(start + (size_t)n, sizeof(line) - 1);
    if (suffix) {
        int m = snprintf(line + len, sizeof(line) - len, "%s", suffix);
        len = m < 0 ? len : MIN(len + (size_t)m, sizeof(line) - 1);
    }
    for (size_t i = start; i < len; i++) {
        if (line[i] == '\n' || line[i] == '\r') {
            line[i] = ' ';
        }
    }
    line[len++] = '\n';
    /* one write: a line is never split by another thread's */
    for (size_t off = 0; off < len; ) {
        ssize_t w = write(STDERR_FILENO, line + off, len - off);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return;
        }
        off += (size_t)w;
    }
}

void log_msg(LogLevel level, const char *fmt, ...)
{
    if (!log_enabled(level)) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    log_vmsg(level, NULL, fmt, ap);
    va_end(ap);
}

void log_msg_ratelimited(LogRatelimit *rl, LogLevel level, const char *fmt, ...)
{
    if (!log_enabled(level)) {
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    uint64_t dropped = 0;
    {
        LOCK_GUARD(&log_rl_lock);
        if (now - rl->window_start_ns >= (uint64_t)rl->interval_sec * 1000000000ull) {
            rl->window_start_ns = now;
            rl->in_window = 0;
        }
        if (rl->in_window >= rl->burst) {
            rl->dropped++;
            return;
        }
        rl->in_window++;
        dropped = rl->dropped;
        rl->dropped = 0;
    }
    char suffix[64];
    if (dropped) {
        snprintf(suffix, sizeof(suffix), " (%llu similar messages suppressed)",
                 (unsigned long long)dropped);
    }
    va_list ap;
    va_start(ap, fmt);
    log_vmsg(level, dropped ? suffix : NULL, fmt, ap);
    va_end(ap);
}
