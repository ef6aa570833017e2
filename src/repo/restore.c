/*
 * Restore (docs/specs/repository.md): write the image as it was at one
 * backup of a repository into a new raw or qcow2 file.  `bitback restore`
 * is its front end; prune writes its synthetic fulls with
 * repo_restore_image().
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
 */
#include <errno.h>
#include <fcntl.h>
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

/* Write [off, off+len) of buf to the destination: the raw fd, or the
 * qcow2 node. */
static int dst_write(int fd, BlockDriverState *dst_bs, const uint8_t *buf,
                     uint64_t off, uint64_t len)
{
    if (dst_bs) {
        return bdrv_pwrite(dst_bs, off, buf, len, 0);
    }
    return pwrite_full(fd, buf, len, (off_t)off);
}

/* Copy every non-zero piece of src into the destination. */
static int copy_data(BlockDriverState *src, uint64_t size, int fd,
                     BlockDriverState *dst_bs, RepoProgressFn *progress,
                     void *opaque, uint64_t *ret_written)
{
    _cleanup_free_ uint8_t *buf = malloc(RESTORE_CHUNK);
    uint64_t off = 0, written = 0;

    if (!buf) {
        return -ENOMEM;
    }
    while (off < size) {
        uint64_t pnum;
        int st = bdrv_block_status(src, off, MIN(size - off, RESTORE_CHUNK),
                                   &pnum);
        if (st < 0) {
            return st;
        }
        if (pnum == 0) {
            return -EIO;   /* a driver that makes no progress */
        }
        if ((st & BDRV_BLOCK_DATA) && !(st & BDRV_BLOCK_ZERO)) {
            int r = bdrv_pread(src, off, buf, pnum);
            if (r < 0) {
                return r;
            }
            /* Write the runs of non-zero 64 KiB pieces (aligned to the
             * image, so qcow2 clusters are whole). */
            uint64_t pos = 0, run = 0, run_len = 0;
            while (pos < pnum) {
                uint64_t piece = MIN(REPO_CLUSTER_SIZE -
                                     (off + pos) % REPO_CLUSTER_SIZE,
                                     pnum - pos);
                if (!buf_is_zero(buf + pos, piece)) {
                    if (!run_len) {
                        run = pos;
                    }
                    run_len += piece;
                } else if (run_len) {
                    r = dst_write(fd, dst_bs, buf + run, off + run, run_len);
                    if (r < 0) {
                        return r;
                    }
                    written += run_len;
                    run_len = 0;
                }
                pos += piece;
            }
            if (run_len) {
                r = dst_write(fd, dst_bs, buf + run, off + run, run_len);
                if (r < 0) {
                    return r;
                }
                written += run_len;
            }
        }
        off += pnum;
        if (progress) {
            progress(opaque, off, size);
        }
    }
    if (ret_written) {
        *ret_written = written;
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

    /* Create the destination: it must be new (callers pick a tmp name). */
    fd = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot create %s", dst);
        return false;
    }
    if (raw) {
        if (ftruncate(fd, (off_t)len) < 0) {
            error_setg_errno(errp, errno, "cannot set the size of %s", dst);
            goto fail;
        }
    } else {
        close(fd);
        fd = -1;
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

    r = copy_data(src, (uint64_t)len, fd, dst_bs, progress, opaque,
                  ret_written);
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
        if (!repo_fsync_path(dst, errp)) {
            goto fail;
        }
    } else if (fsync(fd) < 0) {
        error_setg_errno(errp, errno, "cannot sync %s", dst);
        goto fail;
    }
    return true;

fail:
    if (dst_bs) {
        bdrv_close(dst_bs, NULL);
    }
    unlink(dst);
    return false;
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

bool repo_restore(Repo *repo, const RepoManifest *m, const char *output,
                  const char *format, const RepoProgressOps *progress,
                  uint64_t *ret_written, Error **errp)
{
    _cleanup_free_ char *data = repo_data_path(repo, m->node, m->seq);
    _cleanup_free_ char *tmp = restore_tmp_name(output);
    BlockDriverState *src;
    char label[REPO_MAX_NODE_NAME + 32];
    void *step;
    bool ok;

    if (!data || !tmp) {
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
    unlink(tmp);   /* a leftover of an interrupted restore */

    snprintf(label, sizeof(label), "%s restore %s", m->node, m->id);
    step = repo_progress_begin(progress, label, m->image_size);
    ok = repo_restore_image(src, data, tmp, format,
                            repo_progress_fn(progress), step, ret_written,
                            errp);
    repo_progress_end(progress, step);
    bdrv_unref(src);
    if (!ok) {
        error_prepend(errp, "restore of backup %s of %s failed: ", m->id,
                      m->node);
        return false;
    }
    if (rename(tmp, output) < 0) {
        error_setg_errno(errp, errno, "cannot rename %s to %s", tmp, output);
        unlink(tmp);
        return false;
    }
    fsync_parent_dir(output);
    return true;
}
