/*
 * Option files (optfile.h): the parser works on a buffer (the fuzz target
 * fuzz-optfile calls it), optfile_read feeds it a checked regular file.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/optfile.h"
#include "util/osdep.h"

static bool is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r';
}

static bool is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
}

void optfile_free(OptFileEntry *entries, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(entries[i].name);
        free(entries[i].value);
    }
    free(entries);
}

static char *xstrndup(const char *s, size_t n)
{
    char *p = strndup(s, n);
    if (!p) {
        abort();
    }
    return p;
}

/* One line [s, e) (no newline), already known not to be blank or a
 * comment, into *ent; false with errp. */
static bool parse_line(const char *s, const char *e, const char *filename,
                       unsigned line, OptFileEntry *ent, Error **errp)
{
    if (e - s >= 2 && s[0] == '-' && s[1] == '-') {
        s += 2;
    }
    const char *n = s;
    while (n < e && is_name_char(*n)) {
        n++;
    }
    if (n == s || (n < e && !is_blank(*n) && *n != '=')) {
        error_setg(errp, "%s:%u: expected an option name ([a-z0-9-]), then "
                   "a blank or '=' and its value", filename, line);
        return false;
    }
    const char *v = n;
    if (v < e && *v == '=') {
        v++;
    } else {
        while (v < e && is_blank(*v)) {
            v++;
        }
    }
    ent->name = xstrndup(s, n - s);
    ent->value = v < e || (n < e && *n == '=') ? xstrndup(v, e - v) : NULL;
    ent->line = line;
    return true;
}

bool optfile_parse(const char *buf, size_t len, const char *filename,
                   OptFileEntry **ret_entries, size_t *ret_n, Error **errp)
{
    OptFileEntry *ents = NULL;
    size_t n = 0;
    unsigned line = 0;

    if (len > OPTFILE_MAX_BYTES) {
        error_setg(errp, "%s: larger than %d bytes", filename, OPTFILE_MAX_BYTES);
        return false;
    }
    if (memchr(buf, '\0', len)) {
        error_setg(errp, "%s: contains a NUL byte: not a text file", filename);
        return false;
    }
    for (size_t off = 0; off < len;) {
        const char *s = buf + off;
        const char *nl = memchr(s, '\n', len - off);
        const char *e = nl ? nl : buf + len;
        off = (size_t)(e - buf) + 1;
        line++;
        while (s < e && is_blank(*s)) {
            s++;
        }
        while (e > s && is_blank(e[-1])) {
            e--;
        }
        if (s == e || *s == '#') {
            continue;
        }
        if (n == OPTFILE_MAX_ENTRIES) {
            error_setg(errp, "%s:%u: more than %d options", filename, line,
                       OPTFILE_MAX_ENTRIES);
            optfile_free(ents, n);
            return false;
        }
        if (n % 64 == 0) {
            OptFileEntry *p = realloc(ents, (n + 64) * sizeof(*p));
            if (!p) {
                abort();
            }
            ents = p;
        }
        if (!parse_line(s, e, filename, line, &ents[n], errp)) {
            optfile_free(ents, n);
            return false;
        }
        n++;
    }
    *ret_entries = ents;
    *ret_n = n;
    return true;
}

bool optfile_read(const char *path, OptFileEntry **ret_entries, size_t *ret_n,
                  Error **errp)
{
    _cleanup_close_ int fd = open_checked(path, O_RDONLY, 0, 0, errp);
    if (fd < 0) {
        return false;
    }
    /* One byte over the limit tells a file that is too large. */
    _cleanup_free_ char *buf = malloc(OPTFILE_MAX_BYTES + 1);
    if (!buf) {
        abort();
    }
    ssize_t len = read_upto(fd, buf, OPTFILE_MAX_BYTES + 1);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "cannot read '%s'", path);
        return false;
    }
    return optfile_parse(buf, (size_t)len, path, ret_entries, ret_n, errp);
}
