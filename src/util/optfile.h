/*
 * Option files: a program's long options written one a line, for
 * `bitbackd --config FILE`:
 *
 *   # a comment; blank lines are skipped
 *   blockdev driver=file,node-name=disk0,filename=/srv/disk.raw
 *   --nbd-server addr.type=fd,addr.str=nbd
 *   pidfile=/run/bitback/disk0.pid
 *   daemonize
 *
 * A line is NAME, NAME VALUE or NAME=VALUE, NAME with or without the
 * leading "--"; the value is the rest of the line (no quoting; leading
 * and trailing blanks removed).  Which names exist and which take a value
 * is the caller's business.
 */
#ifndef BITBACK_OPTFILE_H
#define BITBACK_OPTFILE_H

#include <stdbool.h>
#include <stddef.h>
#include "util/error.h"

#define OPTFILE_MAX_BYTES   (1024 * 1024)
#define OPTFILE_MAX_ENTRIES 4096

typedef struct OptFileEntry {
    char *name;        /* without "--" */
    char *value;       /* NULL: the line has no value */
    unsigned line;     /* 1-based */
} OptFileEntry;

/* Parse len bytes of buf (a file's contents; `filename` only names it in
 * errors).  On success *ret_entries (free with optfile_free) holds
 * *ret_n entries in file order.  false with errp "FILE:LINE: ..." for a
 * NUL byte, a name that is not [a-z0-9-]+, a file over the limits. */
bool optfile_parse(const char *buf, size_t len, const char *filename,
                   OptFileEntry **ret_entries, size_t *ret_n, Error **errp);
/* Read and parse the regular file at path, as optfile_parse. */
bool optfile_read(const char *path, OptFileEntry **ret_entries, size_t *ret_n,
                  Error **errp);
void optfile_free(OptFileEntry *entries, size_t n);

#endif
