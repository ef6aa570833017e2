/*
 * The storage backend of a repository: the operations the repository
 * library does on its files (manifests, attempt markers, the marker
 * bitback-repo.json, the folders, the renames of the commit protocol).
 * A backend is a vtable, like a block driver: storage-local.c is the one
 * implementation (POSIX files); another backend (an object store) is one
 * more file filling the same table.
 *
 * Not routed through it: the qcow2 data files themselves, which the block
 * layer opens and writes by path (bdrv_open_image, bdrv_img_create,
 * repo_restore_image), and the containment check of chain.c (realpath).
 *
 * Paths are full paths ("REPO/NODE/ID.json") as paths.c builds them.
 * Operations made of several steps, whose failures need words, set errp;
 * the ones that are a single step return 0 or -errno and let the caller
 * word the error.
 */
#ifndef BITBACK_REPO_STORAGE_H
#define BITBACK_REPO_STORAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

typedef struct RepoStat {
    bool is_dir;
    bool is_regular;
    uint64_t size;                     /* bytes */
    uint64_t allocated;                /* bytes the storage holds for it */
} RepoStat;

/* Called with each name in a folder ("." and ".." left out); return false
 * to stop the listing. */
typedef bool RepoListFn(void *opaque, const char *name);

/* A file opened for streaming (the binary index of a backup): written
 * front to back once under a temporary name, or read at offsets. */
typedef struct RepoFile RepoFile;

typedef struct RepoStorage {
    const char *name;                  /* "local" */
    /* The whole content of the regular file path, at most max bytes, as
     * a NUL-terminated string (caller frees); *ret_len its length. */
    char *(*read)(const char *path, uint64_t max, size_t *ret_len,
                  Error **errp);
    /* Create or truncate path (a temporary name), write data and make it
     * durable.  On failure path is removed. */
    bool (*write_tmp)(const char *path, const void *data, size_t len,
                      Error **errp);
    /* Make the content of path durable (a file written elsewhere). */
    bool (*sync)(const char *path, Error **errp);
    /* Make the entries of folder dir durable (after create/rename/remove). */
    bool (*sync_dir)(const char *dir, Error **errp);
    /* Replace path's content by data atomically and durably: readers see
     * the old or the new content, never a mix. */
    bool (*replace)(const char *path, const void *data, size_t len,
                    Error **errp);
    /* Rename from to `to`, replacing it atomically.  0 or -errno. */
    int (*rename)(const char *from, const char *to);
    /* Remove path.  0 or -errno (-ENOENT when there was none). */
    int (*remove)(const char *path);
    /* Create folder dir.  1 created, 0 it existed, or -errno. */
    int (*mkdir)(const char *dir);
    /* What path is.  0 or -errno (-ENOENT: no such file). */
    int (*stat)(const char *path, RepoStat *ret);
    /* Call fn for each name in folder dir, in no particular order.  0 or
     * -errno (a failure may come after some names). */
    int (*list)(const char *dir, RepoListFn *fn, void *opaque);

    /* Streaming files.  create: make path (a temporary name) empty for
     * writing; append: add len bytes at its end (0 or -errno); finish:
     * make it durable and close it (false and path removed on failure).
     * open: a regular file for reading, *ret_size its size; pread: exactly
     * len bytes at off (0, or -errno, -EIO when the file is shorter).
     * close: release a file of either kind (NULL is fine); a file being
     * written is removed, as after a failure. */
    RepoFile *(*create)(const char *path, Error **errp);
    int (*append)(RepoFile *f, const void *buf, size_t len);
    bool (*finish)(RepoFile *f, Error **errp);
    RepoFile *(*open)(const char *path, uint64_t *ret_size, Error **errp);
    int (*pread)(RepoFile *f, void *buf, size_t len, uint64_t off);
    void (*close)(RepoFile *f);
} RepoStorage;

/* POSIX files (storage-local.c). */
extern const RepoStorage repo_storage_local;

#endif
