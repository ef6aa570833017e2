/*
 * Small utilities: qemu-img style size parsing, UUIDs, path helpers,
 * full-length pread/pwrite, durable file replacement.
 */
#ifndef BITBACK_CUTILS_H
#define BITBACK_CUTILS_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include "util/error.h"

/* Parse "123", "64K", "1.5G", "2T" (suffixes K M G T P E, case-insensitive,
 * powers of 1024; "B" or "b" means bytes).  Returns false on garbage or
 * overflow, with a message naming `what`. */
bool parse_size(const char *str, const char *what, uint64_t *ret, Error **errp);

/* A fresh random (version 4) UUID in canonical text form (36 chars + NUL). */
#define UUID_STR_LEN 37
void uuid_generate_str(char out[UUID_STR_LEN]);
bool uuid_is_valid_str(const char *s);

/* Seconds on the monotonic clock (for rates and intervals). */
double clock_monotonic_seconds(void);
/* Nanoseconds on the monotonic clock. */
uint64_t clock_monotonic_ns(void);
/* A poll() timeout: milliseconds from now until deadline_ns (monotonic),
 * rounded up, 0 when it has passed, at most INT_MAX. */
int clock_ms_until(uint64_t deadline_ns);

/* pread/pwrite that loop over short transfers and EINTR.  They return 0 on
 * success, -errno on failure; a read past EOF returns -EIO (short file). */
int pread_full(int fd, void *buf, size_t len, off_t off);
int pwrite_full(int fd, const void *buf, size_t len, off_t off);
/* read() from fd's position until end of file or `max` bytes, looping over
 * short reads and EINTR: the count read, or -errno. */
ssize_t read_upto(int fd, void *buf, size_t max);

/* Directory part of path ("." when there is none).  Caller frees. */
char *path_dirname(const char *path);
/* Join dir and name unless name is absolute.  Caller frees. */
char *path_join(const char *dir, const char *name);
/* True if name is a plain file name inside a folder: not empty, no '/',
 * not "." or "..". */
bool path_is_simple_name(const char *name);

/* Atomically replace `path` with `len` bytes of data: write path.tmp,
 * fsync it, rename over path, fsync the folder.  A crash at any point leaves
 * either the old or the new file.  Returns false with errp set on failure. */
bool file_replace_atomic(const char *path, const void *data, size_t len,
                         Error **errp);
/* The same, and then some: `prepare` (NULL: none) runs on the new file --
 * its fd open read-write, the data synced -- before the file takes path's
 * place, and its failure abandons the replacement (for taking the new
 * file's lock before anyone can open it by name).  With ret_fd (NULL: not
 * wanted) the new file's fd stays open there for the caller to close. */
typedef bool FileReplacePrepareFn(int fd, const char *tmp_path, void *opaque,
                                  Error **errp);
bool file_replace_atomic_full(const char *path, const void *data, size_t len,
                              FileReplacePrepareFn *prepare, void *opaque,
                              int *ret_fd, Error **errp);
/* fsync the folder that holds `path`. */
int fsync_parent_dir(const char *path);

/* ISO 8601 UTC time stamps as manifests write them, exactly
 * "YYYY-MM-DDTHH:MM:SSZ" (20 characters).  iso8601_utc_parse() accepts
 * only that form and only a real date and time (month 1-12, a day the
 * month has, 00:00:00-23:59:59, years 1970-9999); it returns false
 * otherwise and *ret is then unchanged.  iso8601_utc_format() writes the
 * form for t into buf (at least ISO8601_UTC_BUF bytes). */
#define ISO8601_UTC_BUF 21
bool iso8601_utc_parse(const char *s, time_t *ret);
void iso8601_utc_format(time_t t, char *buf);

/* vasprintf() that returns the new string (free() it), or NULL when out
 * of memory. */
char *vstrprintf(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));
/* The same with arguments. */
char *strprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
