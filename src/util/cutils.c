/*
 * Small utilities shared by the CLI, the daemon and the drivers: qemu-img
 * style size parsing, random UUIDs, full-length positional I/O, path
 * helpers, and durable atomic replacement of small files (QBM descriptors,
 * backup manifests).
 */
#include <ctype.h>
#include <errno.h>
#include <time.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "util/cleanup.h"
#include "util/cutils.h"

bool parse_size(const char *str, const char *what, uint64_t *ret, Error **errp)
{
    if (!str || !*str) {
        error_setg(errp, "%s: empty size", what);
        return false;
    }
    const char *p = str;
    while (isspace((unsigned char)*p)) {
        p++;
    }
    if (*p == '-' || *p == '+') {
        error_setg(errp, "%s: invalid size '%s'", what, str);
        return false;
    }
    errno = 0;
    char *end = NULL;
    unsigned long long whole = strtoull(p, &end, 10);
    if (end == p || errno) {
        error_setg(errp, "%s: invalid size '%s'", what, str);
        return false;
    }
    double frac = 0;
    if (*end == '.') {
        char *fend = NULL;
        frac = strtod(end, &fend);
        if (fend == end + 1) {
            error_setg(errp, "%s: invalid size '%s'", what, str);
            return false;
        }
        end = fend;
    }
    unsigned shift = 0;
    switch (toupper((unsigned char)*end)) {
    case '\0': break;
    case 'B': shift = 0; end++; break;
    case 'K': shift = 10; end++; break;
    case 'M': shift = 20; end++; break;
    case 'G': shift = 30; end++; break;
    case 'T': shift = 40; end++; break;
    case 'P': shift = 50; end++; break;
    case 'E': shift = 60; end++; break;
    default:
        error_setg(errp, "%s: invalid size '%s' (suffixes: K, M, G, T, P, E)", what, str);
        return false;
    }
    if (*end != '\0') {
        error_setg(errp, "%s: invalid size '%s'", what, str);
        return false;
    }
    if (frac != 0 && shift == 0) {
        error_setg(errp, "%s: fractional byte count '%s'", what, str);
        return false;
    }
    if (shift && whole > (UINT64_MAX >> shift)) {
        error_setg(errp, "%s: size '%s' is too large", what, str);
        return false;
    }
    uint64_t v = (uint64_t)whole << shift;
    if (frac != 0) {
        double extra = frac * (double)(UINT64_C(1) << shift);
        if ((double)(UINT64_MAX - v) < extra) {
            error_setg(errp, "%s: size '%s' is too large", what, str);
            return false;
        }
        v += (uint64_t)extra;
    }
    *ret = v;
    return true;
}

void uuid_generate_str(char out[UUID_STR_LEN])
{
    uint8_t b[16];
    size_t got = 0;
    while (got < sizeof(b)) {
        ssize_t r = getrandom(b + got, sizeof(b) - got, 0);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            abort();
        }
        got += (size_t)r;
    }
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    snprintf(out, UUID_STR_LEN,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10],
             b[11], b[12], b[13], b[14], b[15]);
}

bool uuid_is_valid_str(const char *s)
{
    if (!s || strlen(s) != 36) {
        return false;
    }
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-') {
                return false;
            }
        } else if (!isxdigit((unsigned char)s[i])) {
            return false;
        }
    }
    return true;
}

double clock_monotonic_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

uint64_t clock_monotonic_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int clock_ms_until(uint64_t deadline_ns)
{
    uint64_t now = clock_monotonic_ns();
    if (now >= deadline_ns) {
        return 0;
    }
    return (int)MIN(DIV_ROUND_UP(deadline_ns - now, 1000000), (uint64_t)INT_MAX);
}

int pread_full(int fd, void *buf, size_t len, off_t off)
{
    char *p = buf;
    while (len > 0) {
        ssize_t r = pread(fd, p, len, off);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (r == 0) {
            return -EIO;
        }
        p += r;
        len -= (size_t)r;
        off += r;
    }
    return 0;
}

ssize_t read_upto(int fd, void *buf, size_t max)
{
    char *p = buf;
    size_t len = 0;
    while (len < max) {
        ssize_t r = read(fd, p + len, max - len);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (r == 0) {
            break;
        }
        len += (size_t)r;
    }
    return (ssize_t)len;
}

int pwrite_full(int fd, const void *buf, size_t len, off_t off)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t r = pwrite(fd, p, len, off);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        p += r;
        len -= (size_t)r;
        off += r;
    }
    return 0;
}

char *path_dirname(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash) {
        return strdup(".");
    }
    if (slash == path) {
        return strdup("/");
    }
    return strndup(path, (size_t)(slash - path));
}

char *path_join(const char *dir, const char *name)
{
    if (name[0] == '/' || !dir || !*dir) {
        return strdup(name);
    }
    char *s = NULL;
    if (asprintf(&s, "%s/%s", dir, name) < 0) {
        return NULL;
    }
    return s;
}

bool path_is_simple_name(const char *name)
{
    return name && *name && !strchr(name, '/') && strcmp(name, ".") != 0 &&
           strcmp(name, "..") != 0;
}

int fsync_parent_dir(const char *path)
{
    _cleanup_free_ char *dir = path_dirname(path);
    if (!dir) {
        return -ENOMEM;
    }
    _cleanup_close_ int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        return -errno;
    }
    if (fsync(fd) < 0) {
        return -errno;
    }
    return 0;
}

bool file_replace_atomic(const char *path, const void *data, size_t len,
                         Error **errp)
{
    return file_replace_atomic_full(path, data, len, NULL, NULL, NULL, errp);
}

bool file_replace_atomic_full(const char *path, const void *data, size_t len,
                              FileReplacePrepareFn *prepare, void *opaque,
                              int *ret_fd, Error **errp)
{
    _cleanup_free_ char *tmp = NULL;
    if (asprintf(&tmp, "%s.tmp", path) < 0) {
        error_setg(errp, "out of memory");
        return false;
    }
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot create '%s'", tmp);
        return false;
    }
    int r = pwrite_full(fd, data, len, 0);
    if (r == 0 && fsync(fd) < 0) {
        r = -errno;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot write '%s'", tmp);
        goto fail;
    }
    if (prepare && !prepare(fd, tmp, opaque, errp)) {
        goto fail;
    }
    if (!ret_fd) {
        int cfd = fd;
        fd = -1;
        if (close(cfd) < 0) {
            error_setg_errno(errp, errno, "cannot write '%s'", tmp);
            goto fail;
        }
    }
    if (rename(tmp, path) < 0) {
        error_setg_errno(errp, errno, "cannot rename '%s' to '%s'", tmp, path);
        goto fail;
    }
    r = fsync_parent_dir(path);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot sync the folder of '%s'", path);
        if (fd >= 0) {
            close(fd);
        }
        return false;
    }
    if (ret_fd) {
        *ret_fd = fd;
    }
    return true;

fail:
    if (fd >= 0) {
        close(fd);
    }
    unlink(tmp);
    return false;
}

char *vstrprintf(const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) {
        return NULL;
    }
    return s;
}

char *strprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = vstrprintf(fmt, ap);
    va_end(ap);
    return s;
}

bool iso8601_utc_parse(const char *s, time_t *ret)
{
    static const char pattern[] = "dddd-dd-ddTdd:dd:ddZ";
    struct tm tm = { 0 }, back;
    int v[6] = { 0 }, k = -1;
    time_t t;

    if (strlen(s) != sizeof(pattern) - 1) {
        return false;
    }
    /* Digits and separators at exactly their places; the numbers in v. */
    for (size_t i = 0; pattern[i]; i++) {
        if (pattern[i] != 'd') {
            if (s[i] != pattern[i]) {
                return false;
            }
            continue;
        }
        if (s[i] < '0' || s[i] > '9') {
            return false;
        }
        if (i == 0 || pattern[i - 1] != 'd') {
            k++;
        }
        v[k] = v[k] * 10 + (s[i] - '0');
    }
    if (v[0] < 1970 || v[1] < 1 || v[1] > 12 || v[2] < 1 || v[2] > 31 ||
        v[3] > 23 || v[4] > 59 || v[5] > 59) {
        return false;
    }
    tm.tm_year = v[0] - 1900;
    tm.tm_mon = v[1] - 1;
    tm.tm_mday = v[2];
    tm.tm_hour = v[3];
    tm.tm_min = v[4];
    tm.tm_sec = v[5];
    t = timegm(&tm);
    /* timegm normalizes 2026-02-30 to March 2: a day the month lacks. */
    if (t == (time_t)-1 || !gmtime_r(&t, &back) || back.tm_mday != v[2] ||
        back.tm_mon != v[1] - 1) {
        return false;
    }
    *ret = t;
    return true;
}

void iso8601_utc_format(time_t t, char *buf)
{
    struct tm tm;

    if (!gmtime_r(&t, &tm) ||
        !strftime(buf, ISO8601_UTC_BUF, "%Y-%m-%dT%H:%M:%SZ", &tm)) {
        snprintf(buf, ISO8601_UTC_BUF, "1970-01-01T00:00:00Z");
    }
}
