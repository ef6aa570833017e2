/*
 * The "qbm" format driver: persistent dirty bitmaps (and an optional backing
 * image) for any data image, raw included, by gluing plain bitmap files to
 * the data image with a JSON descriptor.  docs/specs/qbm.md is the format's
 * authority; the invariants named here are numbered as there.
 *
 * Node layout: bs->file is the `file` node of the descriptor (we only use
 * its file name; the descriptor is read and replaced with plain POSIX I/O
 * because replacement is a rename in its folder).  The data image is a
 * child node we open ourselves (s->data) from the descriptor, or the node
 * the "data-file" option gives (which must be that same file: a blkdebug
 * filter over it, say); bs->backing is the backing image.
 *
 * Image locks (file-lock.h), when bs->locking: the data image's file node
 * and bs->file (the descriptor as opened) lock themselves; the bitmap
 * files and the allocation file, which we read and write with short-lived
 * fds, are locked by fds kept in s->locks for as long as the node uses
 * them; a descriptor written by us takes its lock before it replaces the
 * old one (qbm_descriptor_write), and that fd joins s->locks too.  So no
 * file of the image can be opened in a conflicting way by QEMU's tools or
 * another bitback while the node is open.
 *
 * Locks (outermost first):
 *   clean_lock (rwlock)  every data-changing request holds it shared while
 *                        it runs; store_bitmaps and descriptor changes hold
 *                        it exclusive.  This is what makes "CLEAN on disk"
 *                        and "a write in flight" mutually exclusive
 *                        (Q1).
 *   alloc_write_lock     serializes allocating writes (section 4).
 *   flush_lock           serializes flushes of the allocation bitmap.
 *   alloc_lock           protects the in-memory allocation HBitmaps; held
 *                        only for bitmap operations, never across I/O.
 *   bs->lock             the node's bitmaps: bits and fields (see
 *                        block.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/block.h"
#include "block/drivers/file-lock.h"
#include "block/drivers/qbm/qbm-bitmaps.h"
#include "block/drivers/qbm/qbm-format.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/iov.h"
#include "util/json-opts.h"
#include "util/log.h"
#include "util/osdep.h"

/* An fd that holds the lock bytes of one file of the image. */
typedef struct QbmFileLock {
    char *path;
    int fd;
} QbmFileLock;

typedef struct BDRVQbmState {
    char *desc_path;                /* the descriptor file */
    char *dir;                      /* its folder */
    QbmDescriptor desc;             /* current descriptor + per-bitmap state */
    BlockDriverState *data;         /* the data image node (owned) */
    bool rw;

    pthread_rwlock_t clean_lock;
    bool files_clean;               /* bitmap files say CLEAN (after a store) */

    /* Allocation bitmap: with desc.alloc_file, or in memory only (no
     * alloc_path) for a backing node attached at open (section 4.1). */
    HBitmap *alloc;                 /* which clusters the data image holds */
    HBitmap *alloc_pending;         /* set in memory, not yet on disk */
    char *alloc_path;
    QbmHeader alloc_hdr;
    uint64_t alloc_cluster;
    pthread_mutex_t alloc_lock;
    pthread_mutex_t alloc_write_lock;
    pthread_mutex_t flush_lock;
    bool locks_init;

    QbmFileLock *locks;             /* lock fds of side files (see top) */
    size_t nb_locks;
} BDRVQbmState;

static char *qbm_file_path(BDRVQbmState *s, const char *name)
{
    return path_join(s->dir, name);
}

/* QbmEntryOpenFn: an entry's bitmap file in the descriptor's folder. */
static WilStore *qbm_entry_open(void *opaque, const QbmBitmapEntry *e,
                                bool writable, Error **errp)
{
    _cleanup_free_ char *path = qbm_file_path(opaque, e->file);
    if (!path) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    return qbm_bitmap_file_open(path, e->file, writable, errp);
}

/* Keep `fd` (a lock holder for `path`) in s->locks, replacing the entry of
 * the same path.  Takes ownership of fd. */
static bool qbm_keep_lock(BDRVQbmState *s, const char *path, int fd, Error **errp)
{
    for (size_t i = 0; i < s->nb_locks; i++) {
        if (strcmp(s->locks[i].path, path) == 0) {
            close(s->locks[i].fd);
            s->locks[i].fd = fd;
            return true;
        }
    }
    QbmFileLock *arr = realloc(s->locks, (s->nb_locks + 1) * sizeof(*arr));
    char *copy = strdup(path);
    if (!arr || !copy) {
        if (arr) {
            s->locks = arr;
        }
        free(copy);
        close(fd);
        error_setg(errp, "out of memory");
        return false;
    }
    s->locks = arr;
    s->locks[s->nb_locks++] = (QbmFileLock){ .path = copy, .fd = fd };
    return true;
}

/* Lock the side file `name` of the image for as long as the node uses it
 * (a no-op with locking off, or when the file does not exist: loading it
 * reports that). */
static bool qbm_lock_file(BlockDriverState *bs, const char *name, Error **errp)
{
    BDRVQbmState *s = bs->opaque;
    if (!bs->locking) {
        return true;
    }
    _cleanup_free_ char *path = qbm_file_path(s, name);
    if (!path) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (access(path, F_OK) != 0) {
        return true;
    }
    int fd = file_lock_open(path, bs->open_flags, OPEN_NOFOLLOW, errp);
    return fd >= 0 && qbm_keep_lock(s, path, fd, errp);
}

/* Drop the lock of the side file `name` (once the node no longer uses it). */
static void qbm_unlock_file(BDRVQbmState *s, const char *name)
{
    _cleanup_free_ char *path = qbm_file_path(s, name);
    for (size_t i = 0; path && i < s->nb_locks; i++) {
        if (strcmp(s->locks[i].path, path) == 0) {
            close(s->locks[i].fd);
            free(s->locks[i].path);
            s->locks[i] = s->locks[--s->nb_locks];
            return;
        }
    }
}

/* Replace the descriptor with s->desc; with locking, the new descriptor is
 * locked before it takes the old one's place. */
static bool qbm_write_descriptor(BlockDriverState *bs, Error **errp)
{
    BDRVQbmState *s = bs->opaque;
    int fd = -1;
    if (!qbm_descriptor_write(s->desc_path, &s->desc, bs->open_flags,
                              bs->locking ? &fd : NULL, errp)) {
        return false;
    }
    if (fd >= 0 && !qbm_keep_lock(s, s->desc_path, fd, errp)) {
        error_prepend(errp, "'%s' is written, but not locked: ", s->desc_path);
        return false;
    }
    return true;
}

static void qbm_state_free(BDRVQbmState *s)
{
    if (s->data) {
        bdrv_unref(s->data);
        s->data = NULL;
    }
    hbitmap_free(s->alloc);
    hbitmap_free(s->alloc_pending);
    s->alloc = s->alloc_pending = NULL;
    free(s->alloc_path);
    free(s->desc_path);
    free(s->dir);
    s->alloc_path = s->desc_path = s->dir = NULL;
    qbm_descriptor_clear(&s->desc);
    for (size_t i = 0; i < s->nb_locks; i++) {
        close(s->locks[i].fd);
        free(s->locks[i].path);
    }
    free(s->locks);
    s->locks = NULL;
    s->nb_locks = 0;
    if (s->locks_init) {
        pthread_rwlock_destroy(&s->clean_lock);
        pthread_mutex_destroy(&s->alloc_lock);
        pthread_mutex_destroy(&s->alloc_write_lock);
        pthread_mutex_destroy(&s->flush_lock);
        s->locks_init = false;
    }
}

static int qbm_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return qbm_descriptor_probe(buf, len);
}

/* ---- CLEAN flag transitions ---- */

/* Clear CLEAN durably in every consistent bitmap file and the allocation
 * file.  Caller holds clean_lock exclusively (or is open()). */
static bool qbm_mark_files_dirty(BDRVQbmState *s, Error **errp)
{
    if (!qbm_entries_mark_dirty(&s->desc, qbm_entry_open, s, errp)) {
        return false;
    }
    if (s->alloc_path && (s->alloc_hdr.flags & QBM_FLAG_CLEAN)) {
        QbmHeader h = s->alloc_hdr;
        h.flags &= ~QBM_FLAG_CLEAN;
        if (!qbm_bitmap_file_write_header(s->alloc_path, &h, errp)) {
            return false;
        }
        s->alloc_hdr = h;
    }
    s->files_clean = false;
    return true;
}

/* Start a data-changing request: returns with clean_lock held shared and
 * every bitmap file marked not clean, or -errno. */
static int qbm_begin_write(BDRVQbmState *s)
{
    for (;;) {
        pthread_rwlock_rdlock(&s->clean_lock);
        if (!__atomic_load_n(&s->files_clean, __ATOMIC_ACQUIRE)) {
            return 0;
        }
        pthread_rwlock_unlock(&s->clean_lock);
        pthread_rwlock_wrlock(&s->clean_lock);
        int r = 0;
        if (s->files_clean) {
            Error *err = NULL;
            if (!qbm_mark_files_dirty(s, &err)) {
                error_free(err);
                r = -EIO;
            }
        }
        pthread_rwlock_unlock(&s->clean_lock);
        if (r < 0) {
            return r;
        }
    }
}

static void qbm_end_write(BDRVQbmState *s)
{
    pthread_rwlock_unlock(&s->clean_lock);
}

/* ---- open ---- */

static bool qbm_load_allocation(BlockDriverState *bs, BDRVQbmState *s, Error **errp)
{
    unsigned shift = (unsigned)qbm_granularity_shift(s->desc.alloc_granularity);
    s->alloc_cluster = s->desc.alloc_granularity;
    s->alloc_path = qbm_file_path(s, s->desc.alloc_file);
    if (!s->alloc_path) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (qbm_data_size(s->desc.size, shift) > QBM_MAX_BITMAP_DATA) {
        error_setg(errp, "allocation bitmap of '%s' would be too large",
                   s->desc_path);
        return false;
    }
    s->alloc = hbitmap_new(s->desc.size, shift);
    s->alloc_pending = hbitmap_new(s->desc.size, shift);
    if (!s->alloc || !s->alloc_pending) {
        error_setg(errp, "out of memory for the allocation bitmap");
        return false;
    }
    _cleanup_free_ char *reason = NULL;
    QbmLoadResult lr = qbm_bitmap_file_load(s->alloc_path, s->desc.alloc_file,
                                            s->desc.size, shift, s->alloc,
                                            &s->alloc_hdr, &reason);
    if (lr == QBM_LOAD_BAD) {
        /* Section 4: the allocation bitmap decides what guests read. */
        error_setg(errp, "allocation bitmap: %s", reason);
        return false;
    }
    return true;
}

/* Section 4.1: a backing node attached at open (blockdev-add's "backing")
 * to an image without an allocation bitmap.  The overlay then needs to know
 * which clusters it holds; it can only know that "none" is the answer when
 * the data image provably holds no data (no extent reports DATA: holes,
 * zero clusters, or an empty image).  Then every cluster starts
 * unallocated, in an allocation bitmap kept in memory for this open only;
 * otherwise the open fails rather than read the data image's zeros or
 * stale bytes where the backing node's data belongs. */
static bool qbm_start_runtime_allocation(BDRVQbmState *s, Error **errp)
{
    uint64_t off = 0;
    while (off < s->desc.size) {
        uint64_t n = 0;
        int r = bdrv_block_status(s->data, off, s->desc.size - off, &n);
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot read the block status of the "
                             "data image '%s'", s->desc.data_file);
            return false;
        }
        if (r & BDRV_BLOCK_DATA) {
            error_setg(errp, "'%s' has no allocation bitmap and its data image "
                       "'%s' holds data (at offset %llu), so it cannot tell "
                       "its own clusters from those of a backing node: attach "
                       "a backing node only to an empty qbm image, or create "
                       "the overlay with -o backing=FILE", s->desc_path,
                       s->desc.data_file, (unsigned long long)off);
            return false;
        }
        if (n == 0) {
            break;      /* past the data image's end: nothing there */
        }
        off += n;
    }
    unsigned shift = 16;    /* section 6's default granularity, 64 KiB */
    while (qbm_data_size(s->desc.size, shift) > QBM_MAX_BITMAP_DATA &&
           (UINT64_C(1) << shift) < QBM_MAX_ALLOC_GRANULARITY) {
        shift++;
    }
    s->alloc_cluster = UINT64_C(1) << shift;
    s->alloc = hbitmap_new(s->desc.size, shift);
    s->alloc_pending = hbitmap_new(s->desc.size, shift);
    if (!s->alloc || !s->alloc_pending) {
        error_setg(errp, "out of memory for the allocation bitmap");
        return false;
    }
    return true;
}

/* A backing node attached after open (drive-backup sync=none into an
 * existing qbm): the same rule as at open, section 4.1. */
static bool qbm_backing_attached(BlockDriverState *bs, Error **errp)
{
    BDRVQbmState *s = bs->opaque;
    return s->desc.alloc_file || s->alloc ||
           qbm_start_runtime_allocation(s, errp);
}

/* Open the data image `path` (named by the descriptor) with `format`: its
 * file node is opened with "x-no-follow", so a symbolic link is refused
 * and anything but a regular file or block device too (Q9). */
static BlockDriverState *qbm_open_data(const char *path, const char *format,
                                       int flags, Error **errp)
{
    const BlockDriver *drv = bdrv_find_format(format);
    if (!drv) {
        error_setg(errp, "Unknown driver '%s'", format);
        return NULL;
    }
    _cleanup_json_ struct json_object *file = json_object_new_object();
    _cleanup_json_ struct json_object *opts =
        drv->is_protocol ? json_object_get(file) : json_object_new_object();
    if (!file || !opts) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    json_object_object_add(file, "driver", json_object_new_string(
                               drv->is_protocol ? format : "file"));
    json_object_object_add(file, "filename", json_object_new_string(path));
    json_object_object_add(file, "x-no-follow", json_object_new_boolean(true));
    if (!drv->is_protocol) {
        json_object_object_add(opts, "driver", json_object_new_string(format));
        json_object_object_add(opts, "file", json_object_get(file));
    }
    return bdrv_open_options(opts, flags, errp);
}

/* Are a and b (b may be NULL) names of the same file? */
static bool qbm_same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    return b && stat(a, &sa) == 0 && stat(b, &sb) == 0 &&
           sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static bool qbm_open(BlockDriverState *bs, struct json_object *options, int flags,
                     Error **errp)
{
    BDRVQbmState *s = bs->opaque;
    const char *desc = bs->file && bs->file->filename ? bs->file->filename
                                                       : bs->filename;
    if (!desc) {
        error_setg(errp, "qbm: the descriptor has no file name");
        return false;
    }
    pthread_rwlock_init(&s->clean_lock, NULL);
    pthread_mutex_init(&s->alloc_lock, NULL);
    pthread_mutex_init(&s->alloc_write_lock, NULL);
    pthread_mutex_init(&s->flush_lock, NULL);
    s->locks_init = true;
    s->rw = (flags & BDRV_O_RDWR) != 0;
    s->desc_path = strdup(desc);
    s->dir = path_dirname(desc);
    if (!s->desc_path || !s->dir) {
        error_setg(errp, "out of memory");
        goto fail;
    }
    if (!qbm_descriptor_read(s->desc_path, &s->desc, errp)) {
        goto fail;
    }

    /* The data image. */
    {
        _cleanup_free_ char *path = qbm_file_path(s, s->desc.data_file);
        if (!path) {
            error_setg(errp, "out of memory");
            goto fail;
        }
        /* Locked as the descriptor is (its file node's "locking"). */
        int data_flags = (flags & (BDRV_O_RDWR | BDRV_O_NOCACHE |
                                   BDRV_O_FORCE_SHARE)) |
                         (bs->locking ? 0 : BDRV_O_NO_LOCK);
        struct json_object *data_ref = json_object_object_get(options,
                                                              "data-file");
        s->data = data_ref ? bdrv_open_child(bs, data_ref, data_flags, errp)
                           : qbm_open_data(path, s->desc.data_format,
                                           data_flags, errp);
        if (!s->data) {
            error_prepend(errp, "cannot open the data image of '%s': ",
                          s->desc_path);
            goto fail;
        }
        if (!data_ref) {
            s->data->user_owned = false;
        } else if (!qbm_same_file(path, s->data->filename)) {
            error_setg(errp, "qbm: 'data-file' must be the data image '%s' "
                       "that '%s' names", path, s->desc_path);
            goto fail;
        }
        bs->supported_read_flags = s->data->supported_read_flags;
        if (qbm_same_file(s->desc_path, path)) {
            error_setg(errp, "invalid QBM descriptor '%s': the data image is "
                       "the descriptor itself", s->desc_path);
            goto fail;
        }
        int64_t len = bdrv_getlength(s->data);
        if (len < 0 || (uint64_t)len < s->desc.size) {
            error_setg(errp, "data image '%s' is %lld bytes, shorter than the "
                       "image size %llu in '%s'", path, (long long)len,
                       (unsigned long long)s->desc.size, s->desc_path);
            goto fail;
        }
    }

    /* The side files, before anything reads or writes them. */
    if (s->desc.alloc_file && !qbm_lock_file(bs, s->desc.alloc_file, errp)) {
        goto fail;
    }
    for (size_t i = 0; i < s->desc.nb_bitmaps; i++) {
        if (!qbm_lock_file(bs, s->desc.bitmaps[i].file, errp)) {
            goto fail;
        }
    }

    if (s->desc.backing_file &&
        !bdrv_open_backing(bs, options, s->desc.backing_file,
                           s->desc.backing_format, errp)) {
        goto fail;
    }
    if (!s->desc.backing_file && !bdrv_open_backing(bs, options, NULL, NULL, errp)) {
        goto fail;
    }
    if (s->desc.alloc_file && !qbm_load_allocation(bs, s, errp)) {
        goto fail;
    }
    if (!s->desc.alloc_file && bs->backing &&
        !qbm_start_runtime_allocation(s, errp)) {
        goto fail;
    }

    /* bdrv_create_dirty_bitmap sizes bitmaps by the node's length, which
     * block.c caches only after open returns. */
    bs->size = s->desc.size;
    if (!qbm_entries_load(bs, &s->desc, qbm_entry_open, s, errp)) {
        goto fail;
    }
    if (s->rw) {
        /* Seed semantics: CLEAN is cleared durably before any write. */
        if (!qbm_mark_files_dirty(s, errp)) {
            error_prepend(errp, "cannot open '%s' for writing: ", s->desc_path);
            goto fail;
        }
    }
    return true;

fail:
    bdrv_release_all_dirty_bitmaps(bs);
    if (bs->backing) {
        bdrv_unref(bs->backing);
        bs->backing = NULL;
    }
    qbm_state_free(s);
    return false;
}

static void qbm_close(BlockDriverState *bs)
{
    qbm_state_free(bs->opaque);
}

static int64_t qbm_getlength(BlockDriverState *bs)
{
    BDRVQbmState *s = bs->opaque;
    return (int64_t)s->desc.size;
}

/* ---- data path ---- */

/* Is [offset, offset+bytes) allocated from its start, and how far does that
 * state hold (*pnum, clipped to bytes)? */
static bool qbm_alloc_extent(BDRVQbmState *s, uint64_t offset, uint64_t bytes,
                             uint64_t *pnum)
{
    pthread_mutex_lock(&s->alloc_lock);
    bool allocated = hbitmap_get(s->alloc, offset);
    int64_t next = allocated ? hbitmap_next_zero(s->alloc, offset, bytes)
                             : hbitmap_next_dirty(s->alloc, offset, bytes);
    pthread_mutex_unlock(&s->alloc_lock);
    *pnum = next < 0 ? bytes : (uint64_t)next - offset;
    if (*pnum == 0) {
        *pnum = MIN(bytes, s->alloc_cluster - offset % s->alloc_cluster);
    }
    return allocated;
}

static int qbm_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                      const struct iovec *iov, int niov, int flags)
{
    BDRVQbmState *s = bs->opaque;
    if (!s->alloc) {
        return bdrv_preadv(s->data, offset, bytes, iov, niov, flags);
    }
    _cleanup_free_ struct iovec *sub = calloc((size_t)niov, sizeof(*sub));
    if (!sub) {
        return -ENOMEM;
    }
    uint64_t done = 0;
    while (done < bytes) {
        uint64_t n;
        bool allocated = qbm_alloc_extent(s, offset + done, bytes - done, &n);
        int r;
        if (allocated) {
            int cnt = iov_slice(iov, niov, done, n, sub, niov);
            if (cnt < 0) {
                return -EINVAL;
            }
            r = bdrv_preadv(s->data, offset + done, n, sub, cnt, flags);
        } else if ((flags & BDRV_REQ_NOWAIT) && bs->backing) {
            return -EAGAIN;
        } else {
            r = bdrv_preadv_backing(bs, offset + done, n, iov, niov, done);
        }
        if (r < 0) {
            return r;
        }
        done += n;
    }
    return 0;
}

static bool qbm_range_allocated(BDRVQbmState *s, uint64_t offset, uint64_t bytes)
{
    pthread_mutex_lock(&s->alloc_lock);
    int64_t z = hbitmap_next_zero(s->alloc, offset, bytes);
    pthread_mutex_unlock(&s->alloc_lock);
    return z < 0;
}

static bool qbm_cluster_allocated(BDRVQbmState *s, uint64_t offset)
{
    pthread_mutex_lock(&s->alloc_lock);
    bool a = hbitmap_get(s->alloc, offset);
    pthread_mutex_unlock(&s->alloc_lock);
    return a;
}

/* Copy [offset, offset+bytes) from the backing image (or zeros) into the
 * data image: the copy-on-write part of an allocating write. */
static int qbm_cow(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    BDRVQbmState *s = bs->opaque;
    _cleanup_free_ uint8_t *buf = malloc(bytes);
    if (!buf) {
        return -ENOMEM;
    }
    struct iovec iov = { .iov_base = buf, .iov_len = bytes };
    int r = bdrv_preadv_backing(bs, offset, bytes, &iov, 1, 0);
    if (r < 0) {
        return r;
    }
    return bdrv_pwrite(s->data, offset, buf, bytes, 0);
}

static int qbm_flush_locked(BlockDriverState *bs);

/* A write (iov != NULL) or zero write (iov == NULL) with an allocation
 * bitmap (section 4). */
static int qbm_overlay_write(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                             const struct iovec *iov, int niov, int flags)
{
    BDRVQbmState *s = bs->opaque;
    uint64_t end = offset + bytes;
    int r;

    if (qbm_range_allocated(s, offset, bytes)) {
        goto plain;
    }
    pthread_mutex_lock(&s->alloc_write_lock);
    /* Re-check: a concurrent allocating write may have done our work. */
    if (qbm_range_allocated(s, offset, bytes)) {
        pthread_mutex_unlock(&s->alloc_write_lock);
        goto plain;
    }
    uint64_t cs = s->alloc_cluster;
    uint64_t cstart = ROUND_DOWN(offset, cs);
    uint64_t cend = MIN(ROUND_UP(end, cs), s->desc.size);
    r = 0;
    if (offset > cstart && !qbm_cluster_allocated(s, cstart)) {
        r = qbm_cow(bs, cstart, offset - cstart);
    }
    if (r == 0 && end < cend && !qbm_cluster_allocated(s, end)) {
        r = qbm_cow(bs, end, cend - end);
    }
    if (r == 0) {
        r = iov ? bdrv_pwritev(s->data, offset, bytes, iov, niov,
                               flags & ~BDRV_REQ_FUA)
                : bdrv_pwrite_zeroes(s->data, offset, bytes,
                                     flags & ~(BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP));
    }
    if (r == 0) {
        pthread_mutex_lock(&s->alloc_lock);
        hbitmap_set(s->alloc, cstart, cend - cstart);
        hbitmap_set(s->alloc_pending, cstart, cend - cstart);
        pthread_mutex_unlock(&s->alloc_lock);
    }
    pthread_mutex_unlock(&s->alloc_write_lock);
    if (r == 0 && (flags & BDRV_REQ_FUA)) {
        /* The allocation bit must be durable too (Q7). */
        pthread_mutex_lock(&s->flush_lock);
        r = qbm_flush_locked(bs);
        pthread_mutex_unlock(&s->flush_lock);
    }
    return r;

plain:
    return iov ? bdrv_pwritev(s->data, offset, bytes, iov, niov, flags)
               : bdrv_pwrite_zeroes(s->data, offset, bytes, flags);
}

static int qbm_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                       const struct iovec *iov, int niov, int flags)
{
    BDRVQbmState *s = bs->opaque;
    int r = qbm_begin_write(s);
    if (r < 0) {
        return r;
    }
    if (s->alloc) {
        r = qbm_overlay_write(bs, offset, bytes, iov, niov, flags);
    } else {
        r = bdrv_pwritev(s->data, offset, bytes, iov, niov, flags);
    }
    qbm_end_write(s);
    return r;
}

static int qbm_pwrite_zeroes(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                             int flags)
{
    BDRVQbmState *s = bs->opaque;
    int r = qbm_begin_write(s);
    if (r < 0) {
        return r;
    }
    if (s->alloc) {
        r = qbm_overlay_write(bs, offset, bytes, NULL, 0, flags);
    } else {
        r = bdrv_pwrite_zeroes(s->data, offset, bytes, flags);
    }
    qbm_end_write(s);
    return r;
}

static int qbm_pdiscard(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    BDRVQbmState *s = bs->opaque;
    if (s->alloc) {
        return 0;   /* advisory; deallocating would expose backing data */
    }
    int r = qbm_begin_write(s);
    if (r < 0) {
        return r;
    }
    r = bdrv_pdiscard(s->data, offset, bytes);
    qbm_end_write(s);
    return r;
}

/* Flush with flush_lock held: section 4's durability order. */
static int qbm_flush_locked(BlockDriverState *bs)
{
    BDRVQbmState *s = bs->opaque;
    if (!s->alloc || !s->rw || !s->alloc_path) {
        /* No allocation bitmap, or one kept in memory (section 4.1). */
        return bdrv_flush(s->data);
    }
    /* (1) snapshot the bytes of the allocation bitmap that hold pending bits */
    pthread_mutex_lock(&s->alloc_lock);
    uint64_t nb = hbitmap_nb_bits(s->alloc);
    int64_t first = hbitmap_next_dirty(s->alloc_pending, 0, s->desc.size);
    uint64_t b0 = 0, b1 = 0;
    uint8_t *snap = NULL;
    if (first >= 0) {
        uint64_t last = 0;
        uint64_t pos = (uint64_t)first;
        uint64_t o, n;
        while (pos < s->desc.size &&
               hbitmap_next_dirty_area(s->alloc_pending, pos, s->desc.size - pos,
                                       0, &o, &n)) {
            last = o + n;
            pos = o + n;
        }
        unsigned shift = hbitmap_granularity_shift(s->alloc);
        uint64_t bit0 = (uint64_t)first >> shift;
        uint64_t bit1 = DIV_ROUND_UP(last, UINT64_C(1) << shift);
        b0 = ROUND_DOWN(bit0 / 8, 4096);
        b1 = MIN(ROUND_UP(DIV_ROUND_UP(bit1, 8), 4096), s->alloc_hdr.data_size);
        snap = calloc(1, b1 - b0);
        if (!snap) {
            pthread_mutex_unlock(&s->alloc_lock);
            return -ENOMEM;
        }
        uint64_t fb = b0 * 8;
        uint64_t nbits = MIN((b1 - b0) * 8, nb - fb);
        hbitmap_serialize_part(s->alloc, snap, fb, nbits);
        hbitmap_reset_all(s->alloc_pending);
    }
    pthread_mutex_unlock(&s->alloc_lock);

    /* (2) the data first */
    int r = bdrv_flush(s->data);
    if (r == 0 && snap) {
        /* (3) then the bits, (4) synced */
        _cleanup_close_ int fd = open_checked(s->alloc_path, O_WRONLY, 0,
                                              OPEN_NOFOLLOW, NULL);
        if (fd < 0) {
            r = -errno;
        } else {
            r = pwrite_full(fd, snap, b1 - b0, QBM_HEADER_SIZE + b0);
            if (r == 0 && fdatasync(fd) < 0) {
                r = -errno;
            }
        }
    }
    if (r < 0 && snap) {
        /* Keep them pending for the next flush. */
        unsigned shift = hbitmap_granularity_shift(s->alloc);
        pthread_mutex_lock(&s->alloc_lock);
        hbitmap_set(s->alloc_pending, (b0 * 8) << shift, ((b1 - b0) * 8) << shift);
        pthread_mutex_unlock(&s->alloc_lock);
    }
    free(snap);
    return r;
}

static int qbm_flush(BlockDriverState *bs)
{
    BDRVQbmState *s = bs->opaque;
    pthread_mutex_lock(&s->flush_lock);
    int r = qbm_flush_locked(bs);
    pthread_mutex_unlock(&s->flush_lock);
    return r;
}

static int qbm_block_status(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                            uint64_t *pnum)
{
    BDRVQbmState *s = bs->opaque;
    uint64_t n = bytes;
    if (s->alloc) {
        if (!qbm_alloc_extent(s, offset, bytes, &n)) {
            *pnum = n;
            return 0;   /* block.c asks the backing image */
        }
    }
    int r = bdrv_block_status(s->data, offset, n, pnum);
    if (r < 0) {
        return r;
    }
    if (*pnum == 0) {
        *pnum = n;
    }
    return (r & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO)) | BDRV_BLOCK_ALLOCATED;
}

/* ---- persistent bitmaps ---- */

static bool qbm_file_in_use(BDRVQbmState *s, const char *file)
{
    if (s->desc.alloc_file && strcmp(s->desc.alloc_file, file) == 0) {
        return true;
    }
    for (size_t i = 0; i < s->desc.nb_bitmaps; i++) {
        if (strcmp(s->desc.bitmaps[i].file, file) == 0) {
            return true;
        }
    }
    return false;
}

/* The descriptor's name without ".qbm". */
static char *qbm_stem(const char *desc_path)
{
    const char *base = strrchr(desc_path, '/');
    base = base ? base + 1 : desc_path;
    size_t n = strlen(base);
    if (n > 4 && strcmp(base + n - 4, ".qbm") == 0) {
        n -= 4;
    }
    return strndup(base, n);
}

static bool name_is_filename_safe(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > 64) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '_' || c == '-')) {
            return false;
        }
    }
    return true;
}

static bool qbm_persistent_bitmap_add(BlockDriverState *bs, BdrvDirtyBitmap *bm,
                                      Error **errp)
{
    BDRVQbmState *s = bs->opaque;
    if (!s->rw) {
        error_setg(errp, "cannot add bitmap '%s': image is read-only", bm->name);
        return false;
    }
    if (s->desc.nb_bitmaps >= QBM_MAX_BITMAPS) {
        error_setg(errp, "cannot add bitmap '%s': '%s' already has %d bitmaps",
                   bm->name, s->desc_path, QBM_MAX_BITMAPS);
        return false;
    }
    unsigned shift = (unsigned)qbm_granularity_shift(bm->granularity);
    pthread_rwlock_wrlock(&s->clean_lock);
    bool ok = false;
    _cleanup_free_ char *stem = qbm_stem(s->desc_path);
    _cleanup_free_ char *file = NULL;
    _cleanup_free_ char *path = NULL;
    QbmHeader hdr;
    if (qbm_entry_find(&s->desc, bm->name, NULL)) {
        error_setg(errp, "bitmap '%s' already exists in '%s'", bm->name,
                   s->desc_path);
        goto out;
    }
    /* Pick a fresh file name: never overwrite an existing file. */
    for (unsigned i = 0; i < 1000 && !path; i++) {
        free(file);
        file = NULL;
        int n;
        if (i == 0 && name_is_filename_safe(bm->name)) {
            n = asprintf(&file, "%s.%s.bm", stem ? stem : "qbm", bm->name);
        } else {
            n = asprintf(&file, "%s.bitmap%u.bm", stem ? stem : "qbm", i);
        }
        if (n < 0 || !(file) || !path_is_simple_name(file)) {
            file = NULL;
            continue;
        }
        if (qbm_file_in_use(s, file)) {
            continue;
        }
        path = qbm_file_path(s, file);
        if (!path) {
            error_setg(errp, "out of memory");
            goto out;
        }
        Error *err = NULL;
        int r = qbm_bitmap_file_create(path, s->desc.size, shift, bm->generation,
                                       0, true, &hdr, &err);
        if (r < 0) {
            /* Only a name taken by another file moves on to the next name;
             * any other failure (ENOSPC, EACCES, ...) is the answer, and the
             * create left no file behind. */
            free(path);
            path = NULL;
            if (r == -EEXIST) {
                error_free(err);
                continue;
            }
            error_propagate(errp, err);
            error_prepend(errp, "cannot add bitmap '%s': ", bm->name);
            goto out;
        }
    }
    if (!path) {
        error_setg(errp, "cannot find a free file name for bitmap '%s' in '%s'",
                   bm->name, s->dir);
        goto out;
    }
    if (!qbm_lock_file(bs, file, errp)) {
        unlink(path);
        goto out;
    }
    QbmBitmapEntry *e = qbm_entry_append(&s->desc, bm, file, &hdr);
    if (!e) {
        qbm_unlock_file(s, file);
        unlink(path);
        error_setg(errp, "out of memory");
        goto out;
    }
    /* Q4: the file exists and is synced before it is published. */
    if (!qbm_write_descriptor(bs, errp)) {
        s->desc.nb_bitmaps--;
        qbm_unlock_file(s, e->file);
        qbm_bitmap_entry_clear(e);
        unlink(path);
        goto out;
    }
    ok = true;
out:
    pthread_rwlock_unlock(&s->clean_lock);
    return ok;
}

static bool qbm_persistent_bitmap_remove(BlockDriverState *bs, const char *name,
                                         Error **errp)
{
    BDRVQbmState *s = bs->opaque;
    if (!s->rw) {
        error_setg(errp, "cannot remove bitmap '%s': image is read-only", name);
        return false;
    }
    pthread_rwlock_wrlock(&s->clean_lock);
    bool ok = false;
    size_t idx;
    _cleanup_free_ char *path = NULL;
    QbmBitmapEntry *e = qbm_entry_find(&s->desc, name, &idx);
    if (!e) {
        ok = true;   /* not in the image (never stored) */
        goto out;
    }
    QbmBitmapEntry saved;
    qbm_entry_take(&s->desc, idx, &saved);
    /* Q4: unpublish first, then delete. */
    if (!qbm_write_descriptor(bs, errp)) {
        qbm_entry_put_back(&s->desc, idx, &saved);
        goto out;
    }
    path = qbm_file_path(s, saved.file);
    if (path && unlink(path) == 0) {
        fsync_parent_dir(path);
    }
    qbm_unlock_file(s, saved.file);
    qbm_bitmap_entry_clear(&saved);
    ok = true;
out:
    pthread_rwlock_unlock(&s->clean_lock);
    return ok;
}

static bool qbm_store_bitmaps(BlockDriverState *bs, Error **errp)
{
    BDRVQbmState *s = bs->opaque;
    if (!s->rw) {
        return true;
    }
    pthread_rwlock_wrlock(&s->clean_lock);
    bool ok = false;
    int r = qbm_flush(bs);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot flush '%s'", s->desc_path);
        goto out;
    }
    bool desc_changed;
    if (!qbm_entries_store(bs, &s->desc, qbm_entry_open, s, &desc_changed,
                           errp)) {
        goto out;
    }
    if (s->alloc_path) {
        /* After the flush the file's bits equal the in-memory ones. */
        QbmSerializeCtx ctx = { .hb = s->alloc, .lock = &s->alloc_lock };
        QbmHeader h = s->alloc_hdr;
        h.checksum = qbm_checksum_bits(h.data_size, qbm_serialize_hbitmap, &ctx);
        h.flags |= QBM_FLAG_CLEAN;
        if (!qbm_bitmap_file_write_header(s->alloc_path, &h, errp)) {
            goto out;
        }
        s->alloc_hdr = h;
    }
    if (desc_changed && !qbm_write_descriptor(bs, errp)) {
        goto out;
    }
    __atomic_store_n(&s->files_clean, true, __ATOMIC_RELEASE);
    ok = true;
out:
    pthread_rwlock_unlock(&s->clean_lock);
    return ok;
}

/* ---- block_resize ---- */

/* Change the image's size (qbm.md, "Resizing"): the data image, then the
 * descriptor's size when growing (the descriptor never names more than
 * the data image holds), the other way round when shrinking.  The bitmap
 * files follow at the next store: until then their headers keep the old
 * size, which no longer matches the descriptor, so a crash leaves them
 * inconsistent (Q2) -- and the write-intent log recovers them. */
static bool qbm_truncate(BlockDriverState *bs, uint64_t size, Error **errp)
{
    BDRVQbmState *s = bs->opaque;
    uint64_t old = s->desc.size;
    bool ok = false;

    if (!s->rw) {
        error_setg(errp, "Image is read-only");   /* a child of a resize */
        return false;
    }
    if (s->alloc) {
        error_setg(errp, "qbm: cannot resize '%s': it has an allocation "
                   "bitmap (an overlay over a backing image)", s->desc_path);
        return false;
    }
    for (size_t i = 0; i < s->desc.nb_bitmaps; i++) {
        QbmBitmapEntry *e = &s->desc.bitmaps[i];
        if (e->inconsistent) {
            error_setg(errp, "qbm: cannot resize '%s': bitmap '%s' is "
                       "inconsistent (remove it first)", s->desc_path, e->name);
            return false;
        }
        if (!qbm_bitmap_check_size(size, (unsigned)qbm_granularity_shift(
                                       e->granularity), UINT64_MAX, errp)) {
            error_prepend(errp, "qbm: cannot resize '%s': bitmap '%s': ",
                          s->desc_path, e->name);
            return false;
        }
    }
    int64_t data_len = bdrv_getlength(s->data);
    if (data_len < 0) {
        error_setg_errno(errp, (int)-data_len, "qbm: cannot get the length "
                         "of the data image of '%s'", s->desc_path);
        return false;
    }
    if (size > old) {
        /* What the data image holds past the old end (it may be longer
         * than the image) must read as zeroes once it is inside. */
        uint64_t end = MIN((uint64_t)data_len, size);
        int r = end > old ? bdrv_pwrite_zeroes(s->data, old, end - old, 0) : 0;
        if (r == 0 && end > old) {
            r = bdrv_flush(s->data);
        }
        if (r < 0) {
            error_setg_errno(errp, -r, "qbm: cannot zero the grown area of "
                             "the data image of '%s'", s->desc_path);
            return false;
        }
        if ((uint64_t)data_len < size &&
            !bdrv_truncate_child(s->data, size, errp)) {
            error_prepend(errp, "qbm: cannot grow the data image of '%s': ",
                          s->desc_path);
            return false;
        }
    }
    pthread_rwlock_wrlock(&s->clean_lock);
    _cleanup_free_ QbmHeader *hdrs = calloc(s->desc.nb_bitmaps + 1,
                                            sizeof(*hdrs));
    if (!hdrs) {
        error_setg(errp, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < s->desc.nb_bitmaps; i++) {
        QbmBitmapEntry *e = &s->desc.bitmaps[i];
        hdrs[i] = e->hdr;
        e->hdr.image_size = size;
        e->hdr.data_size = qbm_data_size(size, (unsigned)qbm_granularity_shift(
                                             e->granularity));
    }
    s->desc.size = size;
    if (!qbm_write_descriptor(bs, errp)) {
        s->desc.size = old;
        for (size_t i = 0; i < s->desc.nb_bitmaps; i++) {
            s->desc.bitmaps[i].hdr = hdrs[i];
        }
        goto out;
    }
    ok = true;
out:
    pthread_rwlock_unlock(&s->clean_lock);
    if (ok && size < old && (uint64_t)data_len > size) {
        /* The descriptor is what counts; a data image left longer is
         * valid (qbm.md), so a failure here is only reported. */
        Error *err = NULL;
        if (!bdrv_truncate_child(s->data, size, &err)) {
            log_msg(LOG_LEVEL_WARNING, "qbm: '%s' was resized, but its data "
                    "image keeps its old length: %s", s->desc_path,
                    error_get_pretty(err));
            error_free(err);
        }
    }
    return ok;
}

/* ---- create ---- */

static bool qbm_create(const char *filename, uint64_t size,
                       struct json_object *opts, Error **errp)
{
    static const char *const known[] = {
        "data-file", "data-format", "backing", "backing-format", "granularity",
    };
    if (!bdrv_check_create_opts(opts, known, ARRAY_SIZE(known), "qbm", errp)) {
        return false;
    }
    const char *data_file = json_opt_str(opts, "data-file");
    const char *data_format = json_opt_str(opts, "data-format");
    const char *backing = json_opt_str(opts, "backing");
    const char *backing_format = json_opt_str(opts, "backing-format");
    const char *gran_str = json_opt_str(opts, "granularity");
    if (!data_format) {
        data_format = "raw";
    }
    if (strcmp(data_format, "qbm") == 0 || !bdrv_find_format(data_format)) {
        error_setg(errp, "data-format '%s' is not usable for a qbm data image",
                   data_format);
        return false;
    }
    uint64_t gran = 64 * 1024;
    if (gran_str && !parse_size(gran_str, "granularity", &gran, errp)) {
        return false;
    }
    int shift = qbm_granularity_shift(gran);
    if (shift < 0 || gran > QBM_MAX_ALLOC_GRANULARITY) {
        error_setg(errp, "granularity %llu is not a power of two between 512 "
                   "and %u", (unsigned long long)gran, QBM_MAX_ALLOC_GRANULARITY);
        return false;
    }
    if (backing_format && !backing) {
        error_setg(errp, "backing-format needs backing");
        return false;
    }

    _cleanup_free_ char *dir = path_dirname(filename);
    _cleanup_free_ char *stem = qbm_stem(filename);
    _cleanup_free_ char *default_data = NULL;
    if (!dir || !stem || asprintf(&default_data, "%s.raw", stem) < 0) {
        error_setg(errp, "out of memory");
        return false;
    }
    /* An existing descriptor is replaced only if nobody uses it: held
     * with a writer's lock (not truncated: the rename replaces it) until
     * the new one is in place. */
    _cleanup_close_ int desc_lock = -1;
    if (access(filename, F_OK) == 0) {
        desc_lock = file_lock_open(filename, BDRV_O_RDWR, 0, errp);
        if (desc_lock < 0) {
            return false;
        }
    }
    if (!data_file) {
        data_file = default_data;
    }

    _cleanup_free_ char *probed_backing_format = NULL;
    if (backing) {
        _cleanup_free_ char *bpath = path_join(dir, backing);
        /* Shared, as qemu-img create reads a backing file that may be in
         * use. */
        BlockDriverState *b = bpath ? bdrv_open_image(bpath, backing_format,
                                                      BDRV_O_FORCE_SHARE, errp)
                                    : NULL;
        if (!b) {
            error_prepend(errp, "Could not open backing file '%s': ", backing);
            return false;
        }
        int64_t blen = bdrv_getlength(b);
        if (!backing_format) {
            /* Record what was probed: later opens never probe data that a
             * guest may have written. */
            probed_backing_format = strdup(b->drv->format_name);
            backing_format = probed_backing_format;
        }
        bdrv_unref(b);
        if (size == 0 && blen > 0) {
            size = (uint64_t)blen;
        }
    }

    _cleanup_free_ char *dpath = path_join(dir, data_file);
    if (!dpath) {
        error_setg(errp, "out of memory");
        return false;
    }
    struct stat st;
    if (data_file != default_data && stat(dpath, &st) == 0) {
        /* Wrap an existing image without copying. */
        BlockDriverState *d = bdrv_open_image(dpath, data_format, 0, errp);
        if (!d) {
            error_prepend(errp, "cannot open data file '%s': ", data_file);
            return false;
        }
        int64_t dlen = bdrv_getlength(d);
        bdrv_unref(d);
        if (dlen < 0) {
            error_setg(errp, "cannot get the size of '%s'", data_file);
            return false;
        }
        if (size != 0 && size != (uint64_t)dlen) {
            error_setg(errp, "size %llu does not match the size %lld of the "
                       "existing data file '%s'", (unsigned long long)size,
                       (long long)dlen, data_file);
            return false;
        }
        size = (uint64_t)dlen;
    } else if (strcmp(data_format, "raw") == 0) {
        _cleanup_close_ int fd = file_lock_create(dpath, errp);
        if (fd < 0) {
            error_prepend(errp, "cannot create data file: ");
            return false;
        }
        if (ftruncate(fd, (off_t)size) < 0 || fsync(fd) < 0) {
            error_setg_errno(errp, errno, "cannot size data file '%s'", dpath);
            return false;
        }
    } else if (!bdrv_img_create(dpath, data_format, size, NULL, errp)) {
        error_prepend(errp, "cannot create data file '%s': ", dpath);
        return false;
    }

    QbmDescriptor d = {
        .size = size,
        .data_file = strdup(data_file),
        .data_format = strdup(data_format),
        .backing_file = backing ? strdup(backing) : NULL,
        .backing_format = backing_format ? strdup(backing_format) : NULL,
    };
    bool ok = d.data_file && d.data_format;
    if (ok && backing) {
        char gen[UUID_STR_LEN];
        uuid_generate_str(gen);
        ok = asprintf(&d.alloc_file, "%s.alloc.bm", stem) >= 0;
        d.alloc_granularity = (uint32_t)gran;
        _cleanup_free_ char *apath = ok ? path_join(dir, d.alloc_file) : NULL;
        if (!ok || !apath) {
            d.alloc_file = NULL;
            error_setg(errp, "out of memory");
            qbm_descriptor_clear(&d);
            return false;
        }
        if (qbm_bitmap_file_create(apath, size, (unsigned)shift, gen,
                                   QBM_FLAG_CLEAN, false, NULL, errp) < 0) {
            qbm_descriptor_clear(&d);
            return false;
        }
    } else if (!ok) {
        error_setg(errp, "out of memory");
    }
    ok = ok && qbm_descriptor_write(filename, &d, 0, NULL, errp);
    qbm_descriptor_clear(&d);
    return ok;
}

/* ---- info and check ---- */

static void qbm_info(BlockDriverState *bs, struct json_object *data)
{
    BDRVQbmState *s = bs->opaque;
    json_object_object_add(data, "descriptor-version", json_object_new_int(QBM_VERSION));
    json_object_object_add(data, "data-file", json_object_new_string(s->desc.data_file));
    json_object_object_add(data, "data-file-format",
                           json_object_new_string(s->desc.data_format));
    if (s->desc.backing_file) {
        json_object_object_add(data, "backing",
                               json_object_new_string(s->desc.backing_file));
        if (s->desc.backing_format) {
            json_object_object_add(data, "backing-format",
                                   json_object_new_string(s->desc.backing_format));
        }
    }
    if (s->desc.alloc_file) {
        json_object_object_add(data, "allocation-file",
                               json_object_new_string(s->desc.alloc_file));
        json_object_object_add(data, "allocation-granularity",
                               json_object_new_int64(s->desc.alloc_granularity));
    }
    struct json_object *files = json_object_new_array();
    for (size_t i = 0; i < s->desc.nb_bitmaps; i++) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "name", json_object_new_string(s->desc.bitmaps[i].name));
        json_object_object_add(o, "file", json_object_new_string(s->desc.bitmaps[i].file));
        json_object_array_add(files, o);
    }
    json_object_object_add(data, "bitmap-files", files);
}

/* Every problem found is a corruption: the image has no leaks to find. */
static int qbm_check(BlockDriverState *bs, BdrvCheckResult *res)
{
    BDRVQbmState *s = bs->opaque;
    /* The descriptor on disk must still parse. */
    QbmDescriptor d;
    Error *err = NULL;
    if (!qbm_descriptor_read(s->desc_path, &d, &err)) {
        bdrv_check_report(res, BDRV_CHECK_CORRUPTION, "%s",
                          error_get_pretty(err));
        error_free(err);
    } else {
        qbm_descriptor_clear(&d);
    }
    int64_t dlen = bdrv_getlength(s->data);
    if (dlen >= 0 && (uint64_t)dlen != s->desc.size) {
        bdrv_check_report(res, BDRV_CHECK_CORRUPTION, "data image '%s' is "
                          "%lld bytes, the image size is %llu",
                          s->desc.data_file, (long long)dlen,
                          (unsigned long long)s->desc.size);
    }
    if (s->alloc_path) {
        char *reason = NULL;
        unsigned shift = hbitmap_granularity_shift(s->alloc);
        if (qbm_bitmap_file_load(s->alloc_path, s->desc.alloc_file, s->desc.size,
                                 shift, NULL, NULL, &reason) == QBM_LOAD_BAD) {
            bdrv_check_report(res, BDRV_CHECK_CORRUPTION,
                              "allocation bitmap: %s", reason);
        }
        free(reason);
    }
    /* Bitmaps loaded consistent must still be readable and, when CLEAN,
     * match their checksum (inconsistent ones are reported by the caller). */
    for (size_t i = 0; i < s->desc.nb_bitmaps; i++) {
        QbmBitmapEntry *e = &s->desc.bitmaps[i];
        if (e->inconsistent) {
            continue;
        }
        _cleanup_free_ char *path = qbm_file_path(s, e->file);
        char *reason = NULL;
        if (path && qbm_bitmap_file_load(path, e->file, s->desc.size,
                                         (unsigned)qbm_granularity_shift(e->granularity),
                                         NULL, NULL, &reason) == QBM_LOAD_BAD) {
            bdrv_check_report(res, BDRV_CHECK_CORRUPTION, "bitmap '%s': %s",
                              e->name, reason);
        }
        free(reason);
    }
    return 0;
}

/* blockdev-add's members of a qbm node: its descriptor's file (or the
 * "filename" shorthand), its data image and its backing node (block.h:
 * open_opts). */
static const JsonOptSpec qbm_open_opts[] = {
    { "file", JSON_OPT_REF, true },
    { "filename", JSON_OPT_STR, true },
    { "data-file", JSON_OPT_REF, true },
    { "backing", JSON_OPT_REF, true },
    { NULL },
};

const BlockDriver bdrv_qbm = {
    .format_name = "qbm",
    .instance_size = sizeof(BDRVQbmState),
    .supports_backing = true,
    .probe = qbm_probe,
    .open = qbm_open,
    .open_opts = qbm_open_opts,
    .close = qbm_close,
    .backing_attached = qbm_backing_attached,
    .getlength = qbm_getlength,
    .preadv = qbm_preadv,
    .pwritev = qbm_pwritev,
    .pwrite_zeroes = qbm_pwrite_zeroes,
    .pdiscard = qbm_pdiscard,
    .flush = qbm_flush,
    .block_status = qbm_block_status,
    .persistent_bitmap_add = qbm_persistent_bitmap_add,
    .persistent_bitmap_remove = qbm_persistent_bitmap_remove,
    .store_bitmaps = qbm_store_bitmaps,
    .truncate = qbm_truncate,
    .create = qbm_create,
    .info = qbm_info,
    .check = qbm_check,
};
