/*
 * `bitback restore`: write the image as it was at one backup of a
 * repository (docs/specs/repository.md) into a new raw or qcow2 file.
 *
 *   bitback restore --repo DIR [--node NODE] [--at ID|latest] OUTPUT
 *                   [-f raw|qcow2] [--force] [--progress] [--output=json]
 *
 * The backup's chain opens read-only through repo_open_chain(), exactly as
 * the manifests describe it (its qcow2 headers' backing names are checked,
 * never followed; a chain that differs is refused before OUTPUT or its
 * temporary file is created); so restoring any point is one sequential
 * pass over the top node.  Ranges that block
 * status reports as zero or unallocated are skipped, and so are 64 KiB
 * pieces of data ranges that read as zeroes: the raw output is sparse, the
 * qcow2 output holds only non-zero clusters (both read back bit-identical,
 * as the skipped parts read as zeroes in a new file).  Data moves in 4 MiB
 * requests.
 *
 * Safety: the image is written to a temporary file next to OUTPUT
 * (".NAME.bitback-restore.tmp"), fsynced, and renamed over OUTPUT only when
 * complete; an interrupted restore never leaves a half-written OUTPUT.  An
 * existing OUTPUT is refused unless --force is given (a restore usually
 * targets a disk somebody may still need; qemu-img convert's silent
 * overwrite is the wrong default here).
 *
 * cli_restore_image() is shared with `bitback prune`, which writes
 * synthetic full backups with it.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/progress.h"
#include "repo/repo.h"
#include "util/cleanup.h"
#include "util/cutils.h"

/* Bytes per copy request (and per block-status query). */
#define RESTORE_CHUNK (4u * 1024 * 1024)

static void restore_usage(FILE *out)
{
    fprintf(out,
            "Usage: bitback restore --repo DIR [--node NODE] [--at ID|latest] OUTPUT\n"
            "                       [-f raw|qcow2] [--force] [--progress] [--output=json]\n"
            "\n"
            "Write the disk NODE as it was at backup ID into the new file OUTPUT,\n"
            "bit for bit.  Any point of a chain can be restored.\n"
            "\n"
            "Options:\n"
            "  --repo DIR         the backup repository\n"
            "  --node NODE        the disk (may be omitted when the repository has one)\n"
            "  --at ID|latest     the backup to restore (default: latest); leading\n"
            "                     zeros of ID are optional\n"
            "  -f, --format FMT   raw (default; a sparse file) or qcow2 (no backing\n"
            "                     file, only non-zero clusters allocated)\n"
            "  --force            replace OUTPUT if it exists (default: refuse)\n"
            "  --progress         draw a progress bar even when stdout is not a terminal\n"
            "  --output=FMT       human (default) or json: a summary object on stdout\n"
            "\n"
            "The image is written to .OUTPUT.bitback-restore.tmp in OUTPUT's folder,\n"
            "synced, and renamed to OUTPUT only when complete: an interrupted restore\n"
            "never leaves a partial OUTPUT (remove the .tmp file it leaves behind).\n"
            "OUTPUT must be a regular file path.\n"
            "\n"
            "The backup's chain is opened as its manifests describe it: a backup\n"
            "file whose backing file is not its manifest's parent (another backup,\n"
            "none, a path outside the repository, ...) is refused and nothing is\n"
            "written.\n");
}

const char *cli_repo_pick_node(Repo *repo, const char *node, Error **errp)
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

static bool is_zero(const uint8_t *buf, size_t len)
{
    /* The first byte, then memcmp against the buffer shifted by one: every
     * byte equals its neighbour and the first is zero. */
    return len == 0 || (buf[0] == 0 && !memcmp(buf, buf + 1, len - 1));
}

/* Write [off, off+len) of buf (buf holds the data at offset `base`) to the
 * destination: the raw fd, or the qcow2 node. */
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
                     BlockDriverState *dst_bs,
                     void (*progress)(void *, uint64_t, uint64_t),
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
                if (!is_zero(buf + pos, piece)) {
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

bool cli_restore_image(BlockDriverState *src, const char *what,
                       const char *dst, const char *format,
                       void (*progress)(void *opaque, uint64_t done,
                                        uint64_t total),
                       void *opaque, uint64_t *ret_written, Error **errp)
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

int cli_cmd_restore(int argc, char **argv)
{
    enum { OPT_REPO = 256, OPT_NODE, OPT_AT, OPT_FORCE, OPT_PROGRESS,
           OPT_OUTPUT };
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"repo", required_argument, NULL, OPT_REPO},
        {"node", required_argument, NULL, OPT_NODE},
        {"at", required_argument, NULL, OPT_AT},
        {"format", required_argument, NULL, 'f'},
        {"force", no_argument, NULL, OPT_FORCE},
        {"progress", no_argument, NULL, OPT_PROGRESS},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {NULL, 0, NULL, 0},
    };
    const char *repo_path = NULL, *node_arg = NULL, *at = "latest";
    const char *format = "raw", *output, *node;
    bool force = false, force_progress = false, json = false;
    Error *err = NULL;
    unsigned seq;
    int c;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:", long_opts, NULL)) != -1) {
        switch (c) {
        case 'h':
            restore_usage(stdout);
            return CLI_EXIT_OK;
        case OPT_REPO:
            repo_path = optarg;
            break;
        case OPT_NODE:
            node_arg = optarg;
            break;
        case OPT_AT:
            at = optarg;
            break;
        case 'f':
            format = optarg;
            break;
        case OPT_FORCE:
            force = true;
            break;
        case OPT_PROGRESS:
            force_progress = true;
            break;
        case OPT_OUTPUT:
            if (!cli_parse_output(optarg, &json, &err)) {
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            break;
        default:
            restore_usage(stderr);
            return CLI_EXIT_ERROR;
        }
    }
    if (!repo_path) {
        error_report("restore: --repo DIR is required (see 'bitback restore --help')");
        return CLI_EXIT_ERROR;
    }
    if (optind != argc - 1) {
        error_report("restore: expected exactly one OUTPUT file (see 'bitback restore --help')");
        return CLI_EXIT_ERROR;
    }
    output = argv[optind];
    if (strcmp(format, "raw") && strcmp(format, "qcow2")) {
        error_report("restore: -f must be raw or qcow2, not '%s'", format);
        return CLI_EXIT_ERROR;
    }
    if (!repo_parse_id(at, &seq, &err)) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }

    struct stat st;
    if (lstat(output, &st) == 0) {
        if (!S_ISREG(st.st_mode)) {
            error_report("restore: %s exists and is not a regular file; "
                         "restore to a new file", output);
            return CLI_EXIT_ERROR;
        }
        if (!force) {
            error_report("restore: %s already exists (use --force to replace it)",
                         output);
            return CLI_EXIT_ERROR;
        }
    } else if (errno != ENOENT) {
        error_report("restore: cannot access %s: %s", output, strerror(errno));
        return CLI_EXIT_ERROR;
    }

    Repo *repo = repo_open(repo_path, false, &err);
    if (!repo) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    int ret = CLI_EXIT_ERROR;
    _cleanup_free_ char *data = NULL, *tmp = NULL;
    RepoManifest *m;
    CliProgress *prog = NULL;
    BlockDriverState *src = NULL;
    uint64_t written = 0;

    node = cli_repo_pick_node(repo, node_arg, &err);
    if (!node) {
        goto out;
    }
    m = repo_find(repo, node, seq, &err);
    if (!m) {
        goto out;
    }
    data = repo_data_path(repo, node, m->seq);
    tmp = restore_tmp_name(output);
    if (!data || !tmp) {
        error_setg(&err, "out of memory");
        goto out;
    }
    /* The chain as the manifests describe it, or nothing is written. */
    src = repo_open_chain(repo, m, &err);
    if (!src) {
        error_prepend(&err, "cannot restore backup %s of %s: ", m->id, node);
        goto out;
    }
    unlink(tmp);   /* a leftover of an interrupted restore */

    char label[REPO_MAX_NODE_NAME + 32];
    snprintf(label, sizeof(label), "%s restore %s", node, m->id);
    prog = cli_progress_new(label, m->image_size,
                            cli_progress_wanted(force_progress));
    bool ok = cli_restore_image(src, data, tmp, format, cli_progress_cb, prog,
                                &written, &err);
    cli_progress_finish(steal_pointer(&prog));
    if (!ok) {
        error_prepend(&err, "restore of backup %s of %s failed: ", m->id, node);
        goto out;
    }
    if (rename(tmp, output) < 0) {
        error_setg_errno(&err, errno, "cannot rename %s to %s", tmp, output);
        unlink(tmp);
        goto out;
    }
    fsync_parent_dir(output);

    if (json) {
        _cleanup_json_ struct json_object *o = json_object_new_object();
        json_object_object_add(o, "node", json_object_new_string(node));
        json_object_object_add(o, "id", json_object_new_string(m->id));
        json_object_object_add(o, "output", json_object_new_string(output));
        json_object_object_add(o, "format", json_object_new_string(format));
        json_object_object_add(o, "image-size",
                               json_object_new_int64((int64_t)m->image_size));
        json_object_object_add(o, "data-bytes",
                               json_object_new_int64((int64_t)written));
        cli_print_json(o);
    } else {
        char sz[32], wr[32];
        printf("restored backup %s of %s to %s (%s, %s, %s of data)\n",
               m->id, node, output, format,
               cli_size_to_str(m->image_size, sz, sizeof(sz)),
               cli_size_to_str(written, wr, sizeof(wr)));
    }
    ret = CLI_EXIT_OK;

out:
    if (err) {
        error_report_err(err);
    }
    bdrv_unref(src);
    repo_free(repo);
    return ret;
}
