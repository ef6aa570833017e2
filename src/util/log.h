/*
 * The daemon's log: one line per event on stderr, with syslog's levels.
 *
 * Under systemd (JOURNAL_STREAM names stderr's device and inode) each line
 * starts with "<N>", the level as sd-daemon(3) prefixes it, so journald
 * files it at that priority; otherwise with "PROGNAME: LEVEL: ".  journald
 * stamps lines itself, and a terminal user has the shell's, so no
 * timestamp is written.  Lines above the threshold (log_set_level) are
 * dropped before they are formatted; a program that sets none (the CLI)
 * gets warnings and errors only, prefixed with error_progname.
 *
 * Thread-safe: each line is formatted into one buffer and written with one
 * write(2), so lines of different threads never interleave.  Not for the
 * per-request data path (DESIGN.md: data path errors return -errno); the
 * callers there log only exceptional events, rate-limited (log_ratelimit).
 */
#ifndef BITBACK_LOG_H
#define BITBACK_LOG_H

#include <stdbool.h>
#include <stdint.h>

#include "util/error.h"

typedef enum LogLevel {
    LOG_LEVEL_ERR = 3,
    LOG_LEVEL_WARNING = 4,
    LOG_LEVEL_NOTICE = 5,
    LOG_LEVEL_INFO = 6,
    LOG_LEVEL_DEBUG = 7,
} LogLevel;

#define LOG_LEVEL_DEFAULT LOG_LEVEL_INFO

/* Set the threshold: lines of a level numerically above it are dropped. */
void log_set_level(LogLevel level);
/* The level named by `name` (err, warning, notice, info, debug), or false
 * with errp set. */
bool log_level_parse(const char *name, LogLevel *ret_level, Error **errp);
/* True when a line at `level` would be written. */
bool log_enabled(LogLevel level);
/* Decide the line format from JOURNAL_STREAM and stderr (call once, early,
 * and again after stderr was redirected); progname prefixes plain lines. */
void log_init(const char *progname);

/* Write one line (a trailing newline is added; embedded newlines become
 * spaces so an event stays one line). */
void log_msg(LogLevel level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* A rate limit for a class of events: at most `burst` lines per
 * `interval_sec`; the count of lines dropped is reported with the next
 * one let through.  Zero-initialize with LOG_RATELIMIT_INIT. */
typedef struct LogRatelimit {
    unsigned interval_sec;
    unsigned burst;
    uint64_t window_start_ns;   /* under the log's own lock */
    unsigned in_window;
    uint64_t dropped;
} LogRatelimit;

#define LOG_RATELIMIT_INIT(interval, n) { .interval_sec = (interval), .burst = (n) }

/* log_msg through the limit rl. */
void log_msg_ratelimited(LogRatelimit *rl, LogLevel level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
