/*
 * The storage backend of a repository: the operations the repository
 * library does on its files (manifests, attempt markers, the marker
 * bitback-repo.json, the folders, the renames of the commit protocol).
 * A backend is a vtable, like a block driver: storage-local.c (POSIX
 * files) and storage-rados.c (a Ceph pool: RADOS objects for metadata,
 * RBD images for the qcow2 data files).
 *
 * The qcow2 data files themselves are opened and written by the block
 * layer (bdrv_open_image, bdrv_img_create) by the name block_name gives;
 * the backend only stats, renames, removes and lists them.
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

struct json_object;

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

/* A lock held on an object of the storage (lock.c). */
typedef struct RepoStorageLock RepoStorageLock;

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

    /* The name the block layer opens the data file path (ID.qcow2 or
     * .ID.qcow2.tmp) of the repository at root by, malloc'd, checked to lie
     * inside the repository; NULL with errp set otherwise.  NULL member:
     * the path itself (local files; chain.c's contained_path resolves
     * links when it opens one). */
    char *(*block_name)(const char *root, const char *path, Error **errp);
    /* Block-layer options (blockdev-add's form: a qcow2 node over the
     * protocol node of path) for the not yet committed data file path of
     * the repository at root, written through by a backup; its backing is
     * the node of parent_path (read-only, with no backing of its own), or
     * none when parent_path is NULL.  For backends whose files the block
     * layer cannot find by the backing name a header records ("ID.qcow2"
     * next to an rbd: name).  A backing node, even one never read, keeps
     * the overlay's zero writes explicit (qcow2's zero flag instead of an
     * unallocated cluster, which would show the parent).  NULL member:
     * open path by name. */
    struct json_object *(*overlay_options)(const char *root, const char *path,
                                           const char *parent_path,
                                           Error **errp);
    /* Per-disk locks where the storage has its own (lock.c; NULL: none,
     * the folder backend's flock locks live in lock.c).  lock: take the
     * lock `name` on the object path (created if missing), exclusive or
     * shared, at once, kept alive until unlock; who: a few words naming
     * the run, shown to whoever finds it held.  0 with *ret set; -EBUSY
     * when held by someone else (*ret_holder: who, malloc'd); or -errno.
     * check: still held (renewed now), or false with errp set. */
    int (*lock)(const char *path, const char *name, bool exclusive,
                const char *who, RepoStorageLock **ret, char **ret_holder);
    bool (*lock_check)(RepoStorageLock *l, Error **errp);
    void (*unlock)(RepoStorageLock *l);
} RepoStorage;

/* POSIX files (storage-local.c). */
extern const RepoStorage repo_storage_local;

/* A Ceph pool (storage-rados.c), for repositories named
 * "rbd:POOL[/NAMESPACE][:conf=PATH][:id=USER]". */
extern const RepoStorage repo_storage_rados;
/* Connect to the repository spec names and register its root
 * "rbd:POOL[/NS]" (*ret_root, malloc'd: the repository's path, under
 * which every path of it lies) until repo_storage_rados_detach(root).
 * False with errp set on a bad name, an unreachable cluster or a missing
 * pool. */
bool repo_storage_rados_attach(const char *spec, char **ret_root,
                               Error **errp);
void repo_storage_rados_detach(const char *root);

#endif
