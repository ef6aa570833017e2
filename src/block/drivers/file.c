/*
 * The "file" protocol driver: a POSIX file or block device, accessed with
 * preadv/pwritev.  With cache.direct=on the file is opened O_DIRECT and the
 * node asks the generic layer (block.c) for 4 KiB aligned requests.
 *
 * Holes are found with SEEK_DATA/SEEK_HOLE, zero writes use fallocate
 * (punching holes when the caller allows it), FUA writes use RWF_DSYNC.
 *
 * Locking (option "locking": on | off | auto, as QEMU's file driver; auto
 * means on, since Linux has OFD locks): the fd takes QEMU's lock bytes at
 * open (file-lock.h) for a writer or a reader, so the open fails while
 * QEMU's tools or another bitback hold the file in a conflicting way, and
 * they are refused while we hold it.  The locks live as long as the fd.
 *
 * What it opens (docs/specs/qbm.md, Q9/Q10): a regular file or a block
 * device, never a FIFO, socket, character device or directory; the check
 * is made on the opened fd, and the open is O_NONBLOCK, so a FIFO is
 * refused instead of hanging the open (util/osdep.h open_checked).  A
 * symbolic link is followed (a user-named image may be one, as in QEMU),
 * unless the bitback-only option "x-no-follow" (boolean) is true: format
 * drivers set it on the files an image names (qbm's data image).
 *
 * The bitback-only boolean "x-remove-on-close": the file is unlinked when
 * the node closes (blockdev-del, daemon exit).  `bitback backup` sets it
 * on the fleecing overlays it makes on a remote bitbackd with
 * blockdev-create, which it cannot unlink itself (docs/qmp.md).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "block/block.h"
#include "block/drivers/file-lock.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/iov.h"
#include "util/json-opts.h"
#include "util/osdep.h"

#define FILE_DIRECT_ALIGNMENT 4096
#define FILE_MAX_IOV 1024

typedef struct BDRVFileState {
    int fd;
    bool is_blockdev;
    bool has_fallocate;     /* cleared after EOPNOTSUPP */
    char *remove_on_close;  /* "x-remove-on-close": the path to unlink */
} BDRVFileState;

static bool file_open(BlockDriverState *bs, struct json_object *options, int flags,
                      Error **errp)
{
    BDRVFileState *s = bs->opaque;
    struct json_object *v;
    if (!json_object_object_get_ex(options, "filename", &v) ||
        !json_object_is_type(v, json_type_string)) {
        error_setg(errp, "Parameter 'filename' is missing");
        return false;
    }
    const char *filename = json_object_get_string(v);
    if (!bdrv_opt_locking(options, !(flags & BDRV_O_NO_LOCK), &bs->locking, errp)) {
        return false;
    }
    /* Every mode does its I/O in the calling thread here (docs/qmp.md);
     * QEMU's rule for "native" still holds. */
    const char *aio;
    if (!bdrv_opt_enum(options, "aio", bdrv_aio_values, "threads", &aio, errp)) {
        return false;
    }
    if (!strcmp(aio, "native") && !(flags & BDRV_O_NOCACHE)) {
        error_setg(errp, "aio=native was specified, but it requires "
                   "cache.direct=on, which was not specified.");
        return false;
    }
    int oflags = (flags & BDRV_O_RDWR) ? O_RDWR : O_RDONLY;
    if (flags & BDRV_O_NOCACHE) {
        oflags |= O_DIRECT;
    }
    unsigned how = OPEN_BLOCKDEV |
                   (json_opt_bool(options, "x-no-follow", false) ? OPEN_NOFOLLOW : 0);
    s->fd = open_checked(filename, oflags, 0, how, errp);
    if (s->fd < 0) {
        return false;
    }
    struct stat st;
    if (fstat(s->fd, &st) < 0) {
        error_setg_errno(errp, errno, "Could not stat '%s'", filename);
        close(s->fd);
        return false;
    }
    if (bs->locking && !file_lock_fd(s->fd, filename, flags, errp)) {
        close(s->fd);
        return false;
    }
    s->is_blockdev = S_ISBLK(st.st_mode);
    s->has_fallocate = true;
    if (json_opt_bool(options, "x-remove-on-close", false) &&
        !(s->remove_on_close = strdup(filename))) {
        error_setg(errp, "out of memory");
        close(s->fd);
        return false;
    }
    if (flags & BDRV_O_NOCACHE) {
        bs->request_alignment = FILE_DIRECT_ALIGNMENT;
    } else {
        /* RWF_NOWAIT means "only from the page cache"; with O_DIRECT the
         * read would still wait for the device. */
        bs->supported_read_flags = BDRV_REQ_NOWAIT;
    }
    return true;
}

static void file_close(BlockDriverState *bs)
{
    BDRVFileState *s = bs->opaque;
    if (s->remove_on_close) {
        unlink(s->remove_on_close);     /* before the locks go with the fd */
        free(s->remove_on_close);
        s->remove_on_close = NULL;
    }
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
}

static int64_t file_getlength(BlockDriverState *bs)
{
    BDRVFileState *s = bs->opaque;
    if (s->is_blockdev) {
        uint64_t size;
        if (ioctl(s->fd, BLKGETSIZE64, &size) < 0) {
            return -errno;
        }
        return (int64_t)size;
    }
    struct stat st;
    if (fstat(s->fd, &st) < 0) {
        return -errno;
    }
    return st.st_size;
}

/* A transfer moved n more bytes of a `bytes`-long request: count them in
 * *done and, unless the request is complete, advance (*iov, *niov) past
 * them (the rest copied into `tmp`).  0, or -EINVAL if the rest does not
 * fit in tmp. */
static int file_advance(uint64_t *done, uint64_t bytes, size_t n,
                        const struct iovec **iov, int *niov, struct iovec *tmp)
{
    *done += n;
    if (*done < bytes) {
        size_t total = iov_size(*iov, *niov);
        int r = iov_slice(*iov, *niov, n, total - n, tmp, FILE_MAX_IOV);
        if (r < 0) {
            return -EINVAL;
        }
        *niov = r;
        *iov = tmp;
    }
    return 0;
}

static int file_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                       const struct iovec *iov, int niov, int flags)
{
    BDRVFileState *s = bs->opaque;
    struct iovec tmp[FILE_MAX_IOV];
    if (niov > FILE_MAX_IOV) {
        return -EINVAL;
    }
    uint64_t done = 0;
    while (done < bytes) {
        ssize_t r = preadv2(s->fd, iov, MIN(niov, IOV_MAX), (off_t)(offset + done),
                            (flags & BDRV_REQ_NOWAIT) ? RWF_NOWAIT : 0);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            if ((flags & BDRV_REQ_NOWAIT) &&
                (errno == EOPNOTSUPP || errno == EINVAL)) {
                return -EAGAIN;   /* a kernel or file system without it */
            }
            return -errno;
        }
        if (r == 0) {
            /* Past EOF (a file shrunk behind our back): reads as zeroes. */
            iov_memset(iov, niov, 0, 0, bytes - done);
            return 0;
        }
        if (file_advance(&done, bytes, (size_t)r, &iov, &niov, tmp) < 0) {
            return -EINVAL;
        }
    }
    return 0;
}

static int file_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                        const struct iovec *iov, int niov, int flags)
{
    BDRVFileState *s = bs->opaque;
    struct iovec tmp[FILE_MAX_IOV];
    if (niov > FILE_MAX_IOV) {
        return -EINVAL;
    }
    int rwf = (flags & BDRV_REQ_FUA) ? RWF_DSYNC : 0;
    uint64_t done = 0;
    while (done < bytes) {
        ssize_t r = pwritev2(s->fd, iov, MIN(niov, IOV_MAX),
                             (off_t)(offset + done), rwf);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EOPNOTSUPP && rwf) {
                /* Old kernel without RWF_DSYNC: write, then sync. */
                rwf = 0;
                flags &= ~BDRV_REQ_FUA;
                int w = file_pwritev(bs, offset + done, bytes - done, iov, niov, 0);
                if (w < 0) {
                    return w;
                }
                return fdatasync(s->fd) < 0 ? -errno : 0;
            }
            return -errno;
        }
        if (file_advance(&done, bytes, (size_t)r, &iov, &niov, tmp) < 0) {
            return -EINVAL;
        }
    }
    return 0;
}

static int file_pwrite_zeroes(BlockDriverState *bs, uint64_t offset,
                              uint64_t bytes, int flags)
{
    BDRVFileState *s = bs->opaque;
    if (s->is_blockdev || !__atomic_load_n(&s->has_fallocate, __ATOMIC_RELAXED)) {
        return -ENOTSUP;
    }
    int r;
    int64_t len = bdrv_getlength(bs);
    if ((flags & BDRV_REQ_MAY_UNMAP) && (int64_t)(offset + bytes) <= len) {
        r = fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t)offset, (off_t)bytes);
    } else {
        r = fallocate(s->fd, FALLOC_FL_ZERO_RANGE, (off_t)offset, (off_t)bytes);
    }
    if (r < 0) {
        if (errno == EOPNOTSUPP || errno == ENOSYS) {
            __atomic_store_n(&s->has_fallocate, false, __ATOMIC_RELAXED);
            return -ENOTSUP;
        }
        return -errno;
    }
    if ((flags & BDRV_REQ_FUA) && fdatasync(s->fd) < 0) {
        return -errno;
    }
    return 0;
}

static int file_pdiscard(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    BDRVFileState *s = bs->opaque;
    if (s->is_blockdev) {
        return 0;
    }
    if (fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offset, (off_t)bytes) < 0) {
        if (errno == EOPNOTSUPP || errno == ENOSYS) {
            return 0;   /* discard is a hint */
        }
        return -errno;
    }
    return 0;
}

static int file_flush(BlockDriverState *bs)
{
    BDRVFileState *s = bs->opaque;
    return fdatasync(s->fd) < 0 ? -errno : 0;
}

static int file_block_status(BlockDriverState *bs, uint64_t offset,
                             uint64_t bytes, uint64_t *pnum)
{
    BDRVFileState *s = bs->opaque;
    if (s->is_blockdev) {
        *pnum = bytes;
        return BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
    }
    off_t data = lseek(s->fd, (off_t)offset, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {
            /* No data after offset: a hole to the end. */
            *pnum = bytes;
            return BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED;
        }
        *pnum = bytes;     /* no SEEK_DATA support: assume data */
        return BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
    }
    if ((uint64_t)data > offset) {
        *pnum = MIN(bytes, (uint64_t)data - offset);
        return BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED;
    }
    off_t hole = lseek(s->fd, (off_t)offset, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole <= offset) {
        *pnum = bytes;
        return BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
    }
    *pnum = MIN(bytes, (uint64_t)hole - offset);
    return BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
}

static bool file_truncate(BlockDriverState *bs, uint64_t size, Error **errp)
{
    BDRVFileState *s = bs->opaque;
    if (s->is_blockdev) {
        int64_t len = file_getlength(bs);
        if (len >= 0 && (uint64_t)len == size) {
            return true;
        }
        error_setg(errp, "Cannot resize block device '%s'", bs->filename);
        return false;
    }
    if (ftruncate(s->fd, (off_t)size) < 0) {
        error_setg_errno(errp, errno, "Failed to resize '%s'", bs->filename);
        return false;
    }
    return true;
}

/* blockdev-add's members of a file node (block.h: open_opts). */
static const JsonOptSpec file_open_opts[] = {
    { "filename", JSON_OPT_STR, false },
    { "locking", JSON_OPT_STR, true, NULL, bdrv_locking_values },
    { "aio", JSON_OPT_STR, true, NULL, bdrv_aio_values },
    { "x-no-follow", JSON_OPT_BOOL, true },
    { "x-remove-on-close", JSON_OPT_BOOL, true },
    { NULL },
};

const BlockDriver bdrv_file = {
    .format_name = "file",
    .instance_size = sizeof(BDRVFileState),
    .is_protocol = true,
    .open = file_open,
    .open_opts = file_open_opts,
    .close = file_close,
    .getlength = file_getlength,
    .preadv = file_preadv,
    .pwritev = file_pwritev,
    .pwrite_zeroes = file_pwrite_zeroes,
    .pdiscard = file_pdiscard,
    .flush = file_flush,
    .block_status = file_block_status,
    .truncate = file_truncate,
};
