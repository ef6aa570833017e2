/*
 * `bitback restore`: write the image as it was at one backup of a
 * repository (docs/specs/repository.md) into a new raw or qcow2 file, or
 * in place into an existing block device or (--existing) regular file.
 *
 *   bitback restore --repo DIR [--node NODE] [--at ID|latest] OUTPUT
 *                   [-f raw|qcow2] [--force | --existing [--sparse]]
 *                   [--progress] [--output=json]
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
 * In place (repo_restore_in_place): OUTPUT is a block device, or a regular
 * file and --existing says so; it is written through a raw node with
 * QEMU's image locks, never truncated or renamed, and must be at least the
 * image's size (its tail is kept).  --sparse reads it first and writes
 * only the pieces that differ.  A regular OUTPUT without --existing keeps
 * the rules above (refused, or replaced with --force).
 *
 * The work is the repository library's (src/repo/restore.c,
 * repo_restore); this file parses the options, checks OUTPUT, draws the
 * progress bar and prints the summary.
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
#include "repo/ops.h"
#include "util/cleanup.h"
#include "util/cutils.h"

static void restore_usage(FILE *out)
{
    fprintf(out,
            "Usage: bitback restore --repo DIR [--node NODE] [--at ID|latest] OUTPUT\n"
            "                       [-f raw|qcow2] [--force | --existing [--sparse]]\n"
            "                       [--progress] [--output=json]\n"
            "\n"
            "Write the disk NODE as it was at backup ID into the new file OUTPUT,\n"
            "bit for bit, or in place into an existing block device or (with\n"
            "--existing) regular file.  Any point of a chain can be restored.\n"
            "\n"
            "Options:\n"
            "  --repo DIR         the backup repository: a folder, or\n"
            "                     rbd:POOL[/NS][:conf=PATH][:id=USER] in Ceph\n"
            "  --node NODE        the disk (may be omitted when the repository has one)\n"
            "  --at ID|latest     the backup to restore (default: latest); leading\n"
            "                     zeros of ID are optional\n"
            "  -f, --format FMT   raw (default; a sparse file) or qcow2 (no backing\n"
            "                     file, only non-zero clusters allocated)\n"
            "  --force            replace OUTPUT if it exists (default: refuse)\n"
            "  --existing         write in place into the existing regular file\n"
            "                     OUTPUT (a block device always is): no truncation,\n"
            "                     no temporary file; OUTPUT must be at least the\n"
            "                     image's size, and bytes past it are kept\n"
            "  --sparse           in place: read OUTPUT and write only the 64 KiB\n"
            "                     pieces that differ (the summary gives the bytes\n"
            "                     written)\n"
            "  --progress         draw a progress bar even when stdout is not a terminal\n"
            "  --output=FMT       human (default) or json: a summary object on stdout\n"
            "\n"
            "The image is written to .OUTPUT.bitback-restore.tmp in OUTPUT's folder,\n"
            "synced, and renamed to OUTPUT only when complete: an interrupted restore\n"
            "never leaves a partial OUTPUT (remove the .tmp file it leaves behind).\n"
            "An in-place restore writes OUTPUT directly (an interrupted one leaves\n"
            "it partly restored) and syncs it at the end; raw format only.\n"
            "\n"
            "The backup's chain is opened as its manifests describe it: a backup\n"
            "file whose backing file is not its manifest's parent (another backup,\n"
            "none, a path outside the repository, ...) is refused and nothing is\n"
            "written.\n");
}

int cli_cmd_restore(int argc, char **argv)
{
    enum { OPT_FORCE = CLI_OPT_FIRST_FREE, OPT_EXISTING, OPT_SPARSE };
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"repo", required_argument, NULL, CLI_OPT_REPO},
        {"node", required_argument, NULL, CLI_OPT_NODE},
        {"at", required_argument, NULL, CLI_OPT_AT},
        {"format", required_argument, NULL, 'f'},
        {"force", no_argument, NULL, OPT_FORCE},
        {"existing", no_argument, NULL, OPT_EXISTING},
        {"sparse", no_argument, NULL, OPT_SPARSE},
        {"progress", no_argument, NULL, CLI_OPT_PROGRESS},
        {"output", required_argument, NULL, CLI_OPT_OUTPUT},
        {NULL, 0, NULL, 0},
    };
    CliRepoOpts opts = { .at = "latest" };
    const char *format = "raw", *output, *node;
    bool force = false, existing = false, sparse = false, format_set = false;
    Error *err = NULL;
    unsigned seq;
    int c;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:", long_opts, NULL)) != -1) {
        if (c == 'h') {
            restore_usage(stdout);
            return CLI_EXIT_OK;
        } else if (c == 'f') {
            format = optarg;
            format_set = true;
        } else if (c == OPT_FORCE) {
            force = true;
        } else if (c == OPT_EXISTING) {
            existing = true;
        } else if (c == OPT_SPARSE) {
            sparse = true;
        } else if (!cli_repo_opt(c, &opts, restore_usage)) {
            return CLI_EXIT_ERROR;
        }
    }
    const char *repo_path = opts.repo, *node_arg = opts.node, *at = opts.at;
    bool json = opts.json;
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

    if (existing && force) {
        error_report("restore: --existing writes into OUTPUT, --force replaces "
                     "it: give one of them");
        return CLI_EXIT_ERROR;
    }
    struct stat st;
    if (stat(output, &st) == 0 && S_ISBLK(st.st_mode)) {
        existing = true;   /* a device is always written in place */
    } else if (existing) {
        if (stat(output, &st) < 0 || !S_ISREG(st.st_mode)) {
            error_report("restore: --existing: %s is not an existing regular "
                         "file or block device", output);
            return CLI_EXIT_ERROR;
        }
    } else if (lstat(output, &st) == 0) {
        if (!S_ISREG(st.st_mode)) {
            error_report("restore: %s exists and is not a regular file or "
                         "block device; restore to a new file", output);
            return CLI_EXIT_ERROR;
        }
        if (!force) {
            error_report("restore: %s already exists (use --existing to write "
                         "into it, --force to replace it)", output);
            return CLI_EXIT_ERROR;
        }
    } else if (errno != ENOENT) {
        error_report("restore: cannot access %s: %s", output, strerror(errno));
        return CLI_EXIT_ERROR;
    }
    if (sparse && !existing) {
        error_report("restore: --sparse is for an in-place restore (--existing "
                     "or a block device); a new file is sparse anyway");
        return CLI_EXIT_ERROR;
    }
    if (existing && format_set && strcmp(format, "raw")) {
        error_report("restore: an in-place restore writes raw data, not %s",
                     format);
        return CLI_EXIT_ERROR;
    }
    if (existing) {
        format = "raw";
    }

    Repo *repo = repo_open(repo_path, false, &err);
    if (!repo) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    int ret = CLI_EXIT_ERROR;
    RepoManifest *m;
    RepoLock *lock = NULL;
    RepoProgressOps prog;
    uint64_t written = 0;

    node = repo_pick_node(repo, node_arg, &err);
    if (!node || !(lock = repo_lock_node(repo, node, REPO_LOCK_READ, &err))) {
        goto out;
    }
    m = repo_find(repo, node, seq, &err);
    if (!m) {
        goto out;
    }
    cli_progress_ops(&prog, cli_progress_wanted(opts.progress));
    if (existing ? !repo_restore_in_place(repo, m, output, sparse, &prog,
                                          &written, &err)
                 : !repo_restore(repo, m, output, format, &prog, &written,
                                 &err)) {
        goto out;
    }

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
        json_object_object_add(o, "in-place", json_object_new_boolean(existing));
        cli_print_json(o);
    } else {
        char sz[32], wr[32];
        printf("restored backup %s of %s %s %s (%s, %s, %s of data%s, "
               "%" PRIu64 " bytes written)\n",
               m->id, node, existing ? "in place into" : "to", output, format,
               cli_size_to_str(m->image_size, sz, sizeof(sz)),
               cli_size_to_str(written, wr, sizeof(wr)),
               existing && sparse ? " changed" : "", written);
    }
    ret = CLI_EXIT_OK;

out:
    if (err) {
        error_report_err(err);
    }
    repo_unlock(lock);
    repo_free(repo);
    return ret;
}
