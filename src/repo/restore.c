/*
 * Restore (docs/specs/repository.md): write the image as it was at one
 * backup of a repository into a new raw or qcow2 file, or in place into an
 * existing file or block device.  `bitback restore` is its front end;
 * prune writes its synthetic fulls with repo_restore_image().
 *
 * The backup's chain opens read-only through repo_open_chain(), exactly as
 * the manifests describe it (its qcow2 headers' backing names are checked,
 * never followed; a chain that differs is refused before the output or its
 * temporary file is created); so restoring any point is one sequential
 * pass over the top node.  Ranges that block status reports as zero or
 * unallocated are skipped, and so are 64 KiB pieces of data ranges that
 * read as zeroes: the raw output is sparse, the qcow2 output holds only
 * non-zero clusters (both read back bit-identical, as the skipped parts
 * read as zeroes in a new file).  Data moves in 4 MiB requests.
 *
 * Safety: the image is written to a temporary file next to the output
 * (".NAME.bitback-restore.tmp"), fsynced, and renamed over the output only
 * when complete; an interrupted restore never leaves a half-written output.
 *
 * In place (repo_restore_existing): the target is opened as a raw node
 * with QEMU's image locks and written where it is (no truncation, no
 * rename, its tail past the image kept), every byte of the image, zero
 * ranges included; with `sparse` the target is read first and only the
 * 64 KiB pieces that differ are written.  Memory stays two 4 MiB buffers;
 * the target is flushed at the end.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "repo/ops.h"
#include "repo/repo-internal.h"
#include "util/bufzero.h"
#include "util/cleanup.h"
#include "util/cutils.h"

/* Bytes per copy request (and per block-status query). */
#define RESTORE_CHUNK (4u * 1024 * 1024)

void *repo_progress_begin(const RepoProgressOps *p, const char *label,
                          uint64_t total)
{
    return p && p->begin ? p->begin(p->opaque, label, total) : NULL;
}

void repo_progress_end(const RepoProgressOps *p, void *step)
{
    if (p && p->end) {
        p->end(step);
    }
}

RepoProgressFn *repo_progress_fn(const RepoProgressOps *p)
{
    return p ? p->update : NULL;
}

const char *repo_pick_node(Repo *repo, const char *node, Error **errp)
{
    _cleanup_free_ const char **nodes = repo_nodes(repo);
    size_t n = 0;

    while (nodes && nodes[n]) {
        n++;
    }
    if (node) {
        for (size_t i = 0; i < n; i++) {
            if (!strcmp(nodes[i], node)) {
                return nodes[i];
            }
        }
        error_setg(errp, "no backups of disk '%s' in %s", node, repo->path);
        return NULL;
    }
    if (n == 1) {
        return nodes[0];
    }
    if (n == 0) {
        error_setg(errp, "the repository %s holds no backups", repo->path);
        return NULL;
    }
    /* List them so the user can pick one. */
    size_t len = 1;
    for (size_t i = 0; i < n; i++) {
        len += strlen(nodes[i]) + 2;
    }
    _cleanup_free_ char *list = calloc(1, len);
    if (!list) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (i) {
            strcat(list, ", ");
        }
        strcat(list, nodes[i]);
    }
    error_setg(errp, "the repository %s holds several disks (%s): choose one "
               "with --node", repo->path, list);
    return NULL;
}

/* Where copy_data writes: the raw fd of a new file, or a node (a new
 * qcow2 file's, or an existing target's raw node).  A new destination
 * reads as zeroes where nothing is written; an existing one (in_place)
 * holds old data that every byte of the image must replace, and with
 * `sparse` it is read first so that only differing pieces are written
 * (tbuf: RESTORE_CHUNK bytes for those reads). */
typedef struct RestoreDest {
    int fd;
    BlockDriverState *bs;
    bool in_place;
    bool sparse;
    uint8_t *tbuf;
    uint64_t written;
} RestoreDest;

/* Write [off, off+len) of buf to the destination. */
static int dst_write(RestoreDest *d, const uint8_t *buf, uint64_t off,
                     uint64_t len)
{
    int r = d->bs ? bdrv_pwrite(d->bs, off, buf, len, 0)
                  : pwrite_full(d->fd, buf, len, (off_t)off);
    if (r < 0) {
        return r;
    }
    d->written += len;
    return 0;
}

/* Write the runs of 64 KiB pieces (aligned to the image, so qcow2
 * clusters are whole) of buf, the image's bytes at [off, off+len), that
 * the destination needs: those that differ from old (the target's current
 * bytes there), or without old those that are not zero (a new file). */
static int write_runs(RestoreDest *d, const uint8_t *buf, const uint8_t *old,
                      uint64_t off, uint64_t len)
{
    uint64_t pos = 0, run = 0, run_len = 0;

    while (pos < len) {
        uint64_t piece = MIN(REPO_CLUSTER_SIZE - (off + pos) % REPO_CLUSTER_SIZE,
                             len - pos);
        bool need = old ? memcmp(buf + pos, old + pos, piece) != 0
                        : !buf_is_zero(buf + pos, piece);
        if (need) {
            if (!run_len) {
                run = pos;
            }
            run_len += piece;
        } else if (run_len) {
            int r = dst_write(d, buf + run, off + run, run_len);
            if (r < 0) {
                return r;
            }
            run_len = 0;
        }
        pos += piece;
    }
    return run_len ? dst_write(d, buf + run, off + run, run_len) : 0;
}

/* Put the image's bytes buf at [off, off+len) (len <= RESTORE_CHUNK) into
 * the destination, as RestoreDest says. */
static int dst_put(RestoreDest *d, const uint8_t *buf, uint64_t off,
                   uint64_t len)
{
    if (!d->in_place) {
        return write_runs(d, buf, NULL, off, len);
    }
    if (!d->sparse) {
        return dst_write(d, buf, off, len);
    }
    int r = bdrv_pread(d->bs, off, d->tbuf, len);
    if (r < 0) {
        return r;
    }
    return write_runs(d, buf, d->tbuf, off, len);
}

/* Copy the image src shows into the destination, RESTORE_CHUNK at a
 * time: ranges block status reports as zero or unallocated are zeroes
 * (skipped for a new destination), the rest is read. */
static int copy_data(BlockDriverState *src, uint64_t size, RestoreDest *d,
                     RepoProgressFn *progress, void *opaque)
{
    _cleanup_free_ uint8_t *buf = malloc(RESTORE_CHUNK);
    uint64_t off = 0;
    bool buf_zero = false;   /* buf holds RESTORE_CHUNK zero bytes */

    if (!buf) {
        return -ENOMEM;
    }
    while (off < size) {
        uint64_t pnum;
        int r, st = bdrv_block_status(src, off, MIN(size - off, RESTORE_CHUNK),
                                      &pnum);
        if (st < 0) {
            return st;
        }
        if (pnum == 0) {
            return -EIO;   /* a driver that makes no progress */
        }
        if ((st & BDRV_BLOCK_DATA) && !(st & BDRV_BLOCK_ZERO)) {
            r = bdrv_pread(src, off, buf, pnum);
            buf_zero = false;
            if (r == 0) {
                r = dst_put(d, buf, off, pnum);
            }
        } else if (d->in_place) {
            if (!buf_zero) {
                memset(buf, 0, RESTORE_CHUNK);
                buf_zero = true;
            }
            r = dst_put(d, buf, off, pnum);
        } else {
            r = 0;   /* a new destination reads as zeroes already */
        }
        if (r < 0) {
            return r;
        }
        off += pnum;
        if (progress) {
            progress(opaque, off, size);
        }
    }
    return 0;
}

bool repo_restore_image(BlockDriverState *src, const char *what,
                        const char *dst, const char *format,
                        RepoProgressFn *progress, void *opaque,
                        uint64_t *ret_written, Error **errp)
{
    BlockDriverState *dst_bs = NULL;
    _cleanup_close_ int fd = -1;
    bool raw = !strcmp(format, "raw");
    int64_t len;
    int r;

    if (!raw && strcmp(format, "qcow2")) {
        error_setg(errp, "restore writes raw or qcow2, not '%s'", format);
        return false;
    }
    len = bdrv_getlength(src);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "cannot get the size of %s", what);
        return false;
    }

    /* Create the destination: it must be new (callers pick a tmp name).
     * An rbd: name (a rados repository's file) is created by the rbd
     * driver, which refuses an existing image. */
    bool rbd = bdrv_filename_is_rbd(dst);
    if (rbd && raw) {
        error_setg(errp, "restore writes qcow2 to an rbd: name, not raw");
        return false;
    }
    fd = rbd ? -1 : open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && !rbd) {
        error_setg_errno(errp, errno, "cannot create %s", dst);
        return false;
    }
    if (raw) {
        if (ftruncate(fd, (off_t)len) < 0) {
            error_setg_errno(errp, errno, "cannot set the size of %s", dst);
            goto fail;
        }
    } else {
        if (fd >= 0) {
            close(fd);
            fd = -1;
        }
        if (!bdrv_img_create(dst, "qcow2", (uint64_t)len, NULL, errp)) {
            error_prepend(errp, "cannot create %s: ", dst);
            goto fail;
        }
        dst_bs = bdrv_open_image(dst, "qcow2", BDRV_O_RDWR, errp);
        if (!dst_bs) {
            error_prepend(errp, "cannot open %s: ", dst);
            goto fail;
        }
    }

    RestoreDest d = { .fd = fd, .bs = dst_bs };
    r = copy_data(src, (uint64_t)len, &d, progress, opaque);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot copy %s to %s", what, dst);
        goto fail;
    }
    if (dst_bs) {
        r = bdrv_flush(dst_bs);
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot flush %s", dst);
            goto fail;
        }
        if (!bdrv_close(steal_pointer(&dst_bs), errp)) {
            error_prepend(errp, "cannot close %s: ", dst);
            goto fail;
        }
        if (!rbd && !repo_fsync_path(dst, errp)) {
            goto fail;     /* rbd: the flush made it durable (rados-obj.h) */
        }
    } else if (fsync(fd) < 0) {
        error_setg_errno(errp, errno, "cannot sync %s", dst);
        goto fail;
    }
    if (ret_written) {
        *ret_written = d.written;
    }
    return true;

fail:
    if (dst_bs) {
        bdrv_close(dst_bs, NULL);
    }
    if (!rbd) {
        unlink(dst);       /* an rbd: name: the caller's storage removes it */
    }
    return false;
}

bool repo_restore_existing(BlockDriverState *src, const char *what,
                           const char *dst, bool sparse,
                           RepoProgressFn *progress, void *opaque,
                           uint64_t *ret_written, Error **errp)
{
    _cleanup_free_ uint8_t *tbuf = NULL;
    BlockDriverState *dst_bs;
    int64_t len, dst_len;
    bool ok = false;
    int r;

    len = bdrv_getlength(src);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "cannot get the size of %s", what);
        return false;
    }
    /* A raw node over the file or device: QEMU's image locks, so nobody
     * else has it open for writing (nor opens it so while we write). */
    dst_bs = bdrv_open_image(dst, "raw", BDRV_O_RDWR, errp);
    if (!dst_bs) {
        error_prepend(errp, "cannot open %s: ", dst);
        return false;
    }
    dst_len = bdrv_getlength(dst_bs);
    if (dst_len < 0) {
        error_setg_errno(errp, (int)-dst_len, "cannot get the size of %s", dst);
        goto out;
    }
    if (dst_len < len) {
        error_setg(errp, "%s is smaller (%" PRId64 " bytes) than the image "
                   "(%" PRId64 " bytes); nothing was written", dst, dst_len,
                   len);
        goto out;
    }
    if (sparse && !(tbuf = malloc(RESTORE_CHUNK))) {
        error_setg(errp, "out of memory");
        goto out;
    }
    RestoreDest d = { .fd = -1, .bs = dst_bs, .in_place = true,
                      .sparse = sparse, .tbuf = tbuf };
    r = copy_data(src, (uint64_t)len, &d, progress, opaque);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot copy %s to %s", what, dst);
        goto out;
    }
    r = bdrv_flush(dst_bs);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot flush %s", dst);
        goto out;
    }
    if (ret_written) {
        *ret_written = d.written;
    }
    ok = true;

out:
    if (!bdrv_close(dst_bs, ok ? errp : NULL)) {
        if (ok) {
            error_prepend(errp, "cannot close %s: ", dst);
        }
        ok = false;
    }
    return ok;
}

/* ".NAME.bitback-restore.tmp" in OUTPUT's folder. */
static char *restore_tmp_name(const char *output)
{
    _cleanup_free_ char *dir = path_dirname(output);
    const char *base = strrchr(output, '/');
    char *name, *path;

    base = base ? base + 1 : output;
    if (!dir || asprintf(&name, ".%s.bitback-restore.tmp", base) < 0) {
        return NULL;
    }
    path = path_join(dir, name);
    free(name);
    return path;
}

/* Restore point m into output: in place (an existing file or device,
 * repo_restore_existing) when `existing`, else into a new file through its
 * temporary name and a rename (repo_restore_image). */
static bool restore_point(Repo *repo, const RepoManifest *m,
                          const char *output, const char *format,
                          bool existing, bool sparse,
                          const RepoProgressOps *progress,
                          uint64_t *ret_written, Error **errp)
{
    _cleanup_free_ char *data = repo_data_path(repo, m->node, m->seq);
    _cleanup_free_ char *tmp = existing ? NULL : restore_tmp_name(output);
    BlockDriverState *src;
    char label[REPO_MAX_NODE_NAME + 32];
    void *step;
    bool ok;

    if (!data || (!existing && !tmp)) {
        error_setg(errp, "out of memory");
        return false;
    }
    /* The chain as the manifests describe it, or nothing is written. */
    src = repo_open_chain(repo, m, errp);
    if (!src) {
        error_prepend(errp, "cannot restore backup %s of %s: ", m->id,
                      m->node);
        return false;
    }
    if (tmp) {
        unlink(tmp);   /* a leftover of an interrupted restore */
    }

    snprintf(label, sizeof(label), "%s restore %s", m->node, m->id);
    step = repo_progress_begin(progress, label, m->image_size);
    if (existing) {
        ok = repo_restore_existing(src, data, output, sparse,
                                   repo_progress_fn(progress), step,
                                   ret_written, errp);
    } else {
        ok = repo_restore_image(src, data, tmp, format,
                                repo_progress_fn(progress), step, ret_written,
                                errp);
    }
    repo_progress_end(progress, step);
    bdrv_unref(src);
    if (!ok) {
        error_prepend(errp, "restore of backup %s of %s failed: ", m->id,
                      m->node);
        return false;
    }
    if (existing) {
        return true;
    }
    if (rename(tmp, output) < 0) {
        error_setg_errno(errp, errno, "cannot rename %s to %s", tmp, output);
        unlink(tmp);
        return false;
    }
    fsync_parent_dir(output);
    return true;
}

bool repo_restore(Repo *repo, const RepoManifest *m, const char *output,
                  const char *format, const RepoProgressOps *progress,
                  uint64_t *ret_written, Error **errp)
{
    return restore_point(repo, m, output, format, false, false, progress,
                         ret_written, errp);
}

bool repo_restore_in_place(Repo *repo, const RepoManifest *m,
                           const char *output, bool sparse,
                           const RepoProgressOps *progress,
                           uint64_t *ret_written, Error **errp)
{
    return restore_point(repo, m, output, "raw", true, sparse, progress,
                         ret_written, errp);
}
