/*
 * The "raw" format driver: the image is the bytes of its protocol child,
 * unchanged.  Everything is passed straight through to bs->file.  raw has
 * no place for metadata, so persistent bitmaps on raw data need a QBM
 * wrapper (qbm.c); except over an RBD image, whose bitmaps live in RADOS
 * next to it: the raw node directly over an rbd node it opened owns them
 * (rbd-bitmaps.h), so `rbd:` names have persistent bitmaps.
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "block/block.h"
#include "block/drivers/file-lock.h"
#include "block/drivers/rbd-bitmaps.h"
#include "util/cleanup.h"

static bool raw_open(BlockDriverState *bs, struct json_object *options, int flags,
                     Error **errp)
{
    bs->request_alignment = bs->file->request_alignment;
    bs->supported_read_flags = bs->file->supported_read_flags;
    return rbd_bitmaps_attach(bs, (flags & BDRV_O_RDWR) != 0, errp);
}

static void raw_close(BlockDriverState *bs)
{
    rbd_bitmaps_detach(bs);
}

static int64_t raw_getlength(BlockDriverState *bs)
{
    return bdrv_getlength(bs->file);
}

static int raw_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                      const struct iovec *iov, int niov, int flags)
{
    return bdrv_preadv(bs->file, offset, bytes, iov, niov, flags);
}

static int raw_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                       const struct iovec *iov, int niov, int flags)
{
    return bdrv_pwritev(bs->file, offset, bytes, iov, niov, flags);
}

/* The child's asynchronous write, where it has one (an rbd node). */
static int raw_aio_pwritev(BlockDriverState *bs, uint64_t offset,
                           uint64_t bytes, const struct iovec *iov, int niov,
                           void (*cb)(void *opaque, int ret), void *opaque)
{
    int r = bdrv_aio_pwritev(bs->file, offset, bytes, iov, niov, cb, opaque);
    return r == 1 ? 0 : r == 0 ? -EAGAIN : r;
}

static int raw_pwrite_zeroes(BlockDriverState *bs, uint64_t offset,
                             uint64_t bytes, int flags)
{
    return bdrv_pwrite_zeroes(bs->file, offset, bytes, flags);
}

static int raw_pdiscard(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    return bdrv_pdiscard(bs->file, offset, bytes);
}

static int raw_flush(BlockDriverState *bs)
{
    return bdrv_flush(bs->file);
}

static bool raw_truncate(BlockDriverState *bs, uint64_t size, Error **errp)
{
    return bdrv_truncate_child(bs->file, size, errp);
}

static int raw_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return 1;   /* anything is raw, as a last resort */
}

static bool raw_create(const char *filename, uint64_t size,
                       struct json_object *opts, Error **errp)
{
    struct json_object_iterator it = json_object_iter_begin(opts);
    struct json_object_iterator end = json_object_iter_end(opts);
    if (!json_object_iter_equal(&it, &end)) {
        error_setg(errp, "Invalid parameter '%s' for format raw",
                   json_object_iter_peek_name(&it));
        return false;
    }
    _cleanup_close_ int fd = file_lock_create(filename, errp);
    if (fd < 0) {
        return false;
    }
    if (ftruncate(fd, (off_t)size) < 0) {
        error_setg_errno(errp, errno, "Could not resize '%s'", filename);
        return false;
    }
    return true;
}

/* blockdev-add's members of a raw node: its file child, or the
 * "filename" shorthand for one (block.h: open_opts). */
static const JsonOptSpec raw_open_opts[] = {
    { "file", JSON_OPT_REF, true },
    { "filename", JSON_OPT_STR, true },
    { NULL },
};

const BlockDriver bdrv_raw = {
    .format_name = "raw",
    .instance_size = 0,
    .probe = raw_probe,
    .open = raw_open,
    .open_opts = raw_open_opts,
    .close = raw_close,
    .getlength = raw_getlength,
    .preadv = raw_preadv,
    .pwritev = raw_pwritev,
    .aio_pwritev = raw_aio_pwritev,
    .aio_pwritev_via_file = true,
    .pwrite_zeroes = raw_pwrite_zeroes,
    .pdiscard = raw_pdiscard,
    .flush = raw_flush,
    .block_status = bdrv_block_status_from_file,
    .create = raw_create,
    .truncate = raw_truncate,
    .can_store_persistent_bitmaps = rbd_bitmaps_can_store,
    .persistent_bitmap_add = rbd_bitmaps_add,
    .persistent_bitmap_remove = rbd_bitmaps_remove,
    .store_bitmaps = rbd_bitmaps_store,
    .open_intent_store = rbd_bitmaps_open_intent_store,
};
