/*
 * `bitback verify`: prove that a repository's backups still hold what was
 * backed up, and that a restored image or a live export matches a backup.
 *
 *   bitback verify --repo DIR [--node NODE] [--at ID|latest|all]
 *                  [--against NBD_URI|FILE] [--progress] [--output=json]
 *
 * Stored check (without --against; default --at all, every disk unless
 * --node): for each backup, repo_open_chain() opens its chain exactly as
 * the manifests describe it (each file's recorded backing name must be its
 * manifest's parent; it is checked, never followed), and repo_scan_node()
 * re-reads every cluster allocated in the backup's own qcow2 layer,
 * through that chain, and hashes it, on a pool of threads
 * (repo_hash_extents: one per online CPU, at most 8; the result does not
 * depend on their number).  The result
 * must equal the manifest exactly:
 *   1. the same set of clusters (a cluster stored but not listed, or listed
 *      but not stored, is a mismatch),
 *   2. the same hash for each cluster,
 *   3. the Merkle root recomputed from the manifest's list and the one
 *      computed from the re-read data both equal the manifest's
 *      merkle-root (so an edited hash list is caught too).
 * A backup whose chain cannot be opened as its manifests describe it (a
 * file missing, unreadable or outside the repository, a parent missing, a
 * backing link that is not the manifest's: swapped, removed, added to a
 * full, or pointing anywhere else) is a failure of that backup ("chain",
 * naming the backup whose link is wrong), and so is a file that cannot be
 * read.
 *
 * Target check (--against, default --at latest, one disk): the expected
 * content of cluster c at point ID is the hash of c in the newest backup of
 * ID's chain (repo_chain) that lists c, else the hash of zeroes (a full
 * backup lists every cluster it stores; what it does not store reads as
 * zeroes).  The target (an NBD URI, or a file probed as raw/qcow2/qbm) must
 * have the backup's size; it is checked 256 MiB at a time: block status
 * first, then the clusters not reported as zero are read in 4 MiB requests
 * and hashed on the same pool of threads (zero clusters are compared
 * against the zero hash without reading), then compared in order.  (An
 * NBD target's reads are serialized on its one connection; the hashing of
 * one batch still overlaps the read of the next.)  The manifests are
 * the reference here: run verify without --against to check the stored
 * files themselves.
 *
 * Each mismatch prints one line naming backup ID, disk and the guest byte
 * offset of the cluster.  Exit status: 0 all good (with a summary line),
 * 2 any mismatch or unreadable backup, 1 operational errors (bad
 * arguments, no repository, unknown ID, a target that cannot be opened).
 */
#include <assert.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/progress.h"
#include "repo/ops.h"
#include "util/cleanup.h"

/* Mismatch lines printed per backup before they are only counted. */
#define VERIFY_MAX_LINES 100

typedef struct VerifyState {
    RepoVerify v;                 /* the library's callbacks and counters */
    bool json;
    struct json_object *problems; /* --output=json: list of objects */
    /* Per backup: lines printed, for the cap. */
    unsigned lines;
} VerifyState;

static void verify_usage(FILE *out)
{
    fprintf(out,
            "Usage: bitback verify --repo DIR [--node NODE] [--at ID|latest|all]\n"
            "                      [--against NBD_URI|FILE] [--progress] [--output=json]\n"
            "\n"
            "Re-read the repository's backups and check them against the per-cluster\n"
            "hashes and Merkle roots recorded when they were taken.\n"
            "\n"
            "Options:\n"
            "  --repo DIR         the backup repository: a folder, or\n"
            "                     rbd:POOL[/NS][:conf=PATH][:id=USER] in Ceph\n"
            "  --node NODE        only this disk (default: every disk; with --against\n"
            "                     it may be omitted when the repository has one disk)\n"
            "  --at ID|latest|all the backups to check (default: all; with --against:\n"
            "                     the point to compare with, default latest)\n"
            "  --against TARGET   instead of the stored files, check that TARGET (an\n"
            "                     NBD URI such as nbd+unix:///?socket=S, or an image\n"
            "                     file, raw/qcow2/qbm, probed) holds exactly the disk's\n"
            "                     content at backup ID, as the manifests record it\n"
            "  --progress         draw a progress bar even when stdout is not a terminal\n"
            "  --output=FMT       human (default) or json\n"
            "\n"
            "Each backup's chain is opened as its manifests describe it: a backing\n"
            "link that differs (swapped, removed, added to a full, pointing outside\n"
            "the repository) fails every backup whose chain holds it.\n"
            "Each mismatch is one line naming the backup, the disk and the byte offset.\n"
            "Exit status: 0 all good, 2 a mismatch or an unreadable backup,\n"
            "1 an error (bad arguments, no repository, unknown backup).\n");
}

static double now_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* RepoVerify.problem: print it, or add it to the JSON list. */
static void problem(RepoVerify *v, const RepoManifest *m, int64_t offset,
                    const char *kind, const char *msg)
{
    VerifyState *vs = (VerifyState *)v;   /* v is its first member */

    if (++vs->lines > VERIFY_MAX_LINES) {
        return;
    }
    if (vs->json) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "id", json_object_new_string(m->id));
        json_object_object_add(o, "node", json_object_new_string(m->node));
        json_object_object_add(o, "kind", json_object_new_string(kind));
        if (offset >= 0) {
            json_object_object_add(o, "offset", json_object_new_int64(offset));
        }
        json_object_object_add(o, "message", json_object_new_string(msg));
        json_object_array_add(vs->problems, o);
    } else {
        printf("verify: backup %s disk %s: %s\n", m->id, m->node, msg);
    }
}

/* RepoVerify.note: human output only. */
static void note(RepoVerify *v, const RepoManifest *m, const char *msg)
{
    VerifyState *vs = (VerifyState *)v;   /* v is its first member */

    if (!vs->json) {
        printf("verify: backup %s disk %s: %s\n", m->id, m->node, msg);
    }
}

/* RepoVerify.open_target: an NBD URI, or an image file probed. */
static BlockDriverState *open_target(const char *target, Error **errp)
{
    if (bdrv_filename_is_nbd_uri(target)) {
        return bdrv_open_image(target, NULL, 0, errp);
    }
    return cli_open_image(target, NULL, 0, errp);
}

static void end_backup(VerifyState *vs, const RepoManifest *m)
{
    if (vs->lines > VERIFY_MAX_LINES && !vs->json) {
        printf("verify: backup %s disk %s: ... and %u more problems\n",
               m->id, m->node, vs->lines - VERIFY_MAX_LINES);
    }
    vs->lines = 0;
}

static void verify_one(VerifyState *vs, Repo *repo, const RepoManifest *m)
{
    repo_verify_stored(&vs->v, repo, m);
    end_backup(vs, m);
}

int cli_cmd_verify(int argc, char **argv)
{
    enum { OPT_AGAINST = CLI_OPT_FIRST_FREE };
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"repo", required_argument, NULL, CLI_OPT_REPO},
        {"node", required_argument, NULL, CLI_OPT_NODE},
        {"at", required_argument, NULL, CLI_OPT_AT},
        {"against", required_argument, NULL, OPT_AGAINST},
        {"progress", no_argument, NULL, CLI_OPT_PROGRESS},
        {"output", required_argument, NULL, CLI_OPT_OUTPUT},
        {NULL, 0, NULL, 0},
    };
    CliRepoOpts opts = { 0 };
    const char *against = NULL;
    VerifyState vs = { .v = { .problem = problem, .note = note,
                              .open_target = open_target } };
    Error *err = NULL;
    unsigned seq = 0;
    bool all;
    int c;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        if (c == 'h') {
            verify_usage(stdout);
            return CLI_EXIT_OK;
        } else if (c == OPT_AGAINST) {
            against = optarg;
        } else if (!cli_repo_opt(c, &opts, verify_usage)) {
            return CLI_EXIT_ERROR;
        }
    }
    const char *repo_path = opts.repo, *node_arg = opts.node, *at = opts.at;
    vs.json = opts.json;
    if (!repo_path) {
        error_report("verify: --repo DIR is required (see 'bitback verify --help')");
        return CLI_EXIT_ERROR;
    }
    if (optind != argc) {
        error_report("verify: unexpected argument '%s' (see 'bitback verify --help')",
                     argv[optind]);
        return CLI_EXIT_ERROR;
    }
    if (!at) {
        at = against ? "latest" : "all";
    }
    all = !strcmp(at, "all");
    if (all && against) {
        error_report("verify: --against compares one point: give --at ID or latest");
        return CLI_EXIT_ERROR;
    }
    if (!all && !repo_parse_id(at, &seq, &err)) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    cli_progress_ops(&vs.v.progress,
                     cli_progress_wanted(opts.progress) && !vs.json);

    Repo *repo = repo_open(repo_path, false, &err);
    if (!repo) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    int ret = CLI_EXIT_ERROR;
    _cleanup_free_ const char **nodes = NULL;
    const char *one[2] = { NULL, NULL };
    const char **scope;
    RepoLock **locks = NULL;
    double start = now_seconds();

    vs.problems = json_object_new_array();
    if (against || node_arg) {
        one[0] = repo_pick_node(repo, node_arg, &err);
        if (!one[0]) {
            goto out;
        }
        scope = one;
    } else {
        nodes = repo_nodes(repo);
        scope = nodes;
        if (!nodes || !nodes[0]) {
            error_setg(&err, "the repository %s holds no backups", repo->path);
            goto out;
        }
        if (!nodes[1]) {
            one[0] = nodes[0];   /* one disk: errors name it */
            scope = one;
        }
    }

    locks = repo_lock_nodes(repo, scope, REPO_LOCK_READ, &err);
    if (!locks) {
        goto out;
    }

    if (against) {
        RepoManifest *m = repo_find(repo, scope[0], seq, &err);
        if (!m) {
            goto out;
        }
        bool ok = repo_verify_against(&vs.v, repo, m, against, &err);
        end_backup(&vs, m);
        if (!ok) {
            goto out;
        }
    } else if (all) {
        for (size_t i = 0; i < repo->n_backups; i++) {
            RepoManifest *m = repo->backups[i];
            for (size_t k = 0; scope[k]; k++) {
                if (!strcmp(scope[k], m->node)) {
                    verify_one(&vs, repo, m);
                }
            }
        }
    } else {
        /* One ID: on the chosen disk, or on every disk that has it. */
        size_t found = 0;
        for (size_t k = 0; scope[k]; k++) {
            RepoManifest *m = repo_find(repo, scope[k], seq,
                                        scope == one ? &err : NULL);
            if (m) {
                verify_one(&vs, repo, m);
                found++;
            } else if (err) {
                goto out;
            }
        }
        if (!found) {
            char id[REPO_ID_LEN];
            repo_format_id(seq, id);
            error_setg(&err, "no backup %s in %s", seq ? id : "(latest)",
                       repo->path);
            goto out;
        }
    }

    double secs = now_seconds() - start;
    double rate = secs > 0 ? (double)vs.v.bytes_read / secs : 0;
    if (vs.json) {
        _cleanup_json_ struct json_object *o = json_object_new_object();
        json_object_object_add(o, "ok", json_object_new_boolean(!vs.v.problems));
        json_object_object_add(o, "backups-checked",
                               json_object_new_int64(vs.v.backups_checked));
        json_object_object_add(o, "bytes-read",
                               json_object_new_int64((int64_t)vs.v.bytes_read));
        json_object_object_add(o, "seconds", json_object_new_double(secs));
        json_object_object_add(o, "mismatches",
                               json_object_new_int64((int64_t)vs.v.problems));
        json_object_object_add(o, "problems", json_object_get(vs.problems));
        cli_print_json(o);
    } else {
        char rd[32], rt[32];
        cli_size_to_str(vs.v.bytes_read, rd, sizeof(rd));
        cli_size_to_str((uint64_t)rate, rt, sizeof(rt));
        if (vs.v.problems) {
            printf("verify: FAILED: %" PRIu64 " problem%s in %u backup%s "
                   "checked (%s read in %.2f s, %s/s)\n", vs.v.problems,
                   vs.v.problems == 1 ? "" : "s", vs.v.backups_checked,
                   vs.v.backups_checked == 1 ? "" : "s", rd, secs, rt);
        } else {
            printf("verify: %u backup%s checked%s%s, all good (%s read in "
                   "%.2f s, %s/s)\n", vs.v.backups_checked,
                   vs.v.backups_checked == 1 ? "" : "s",
                   against ? " against " : "", against ? against : "",
                   rd, secs, rt);
        }
    }
    ret = vs.v.problems ? CLI_EXIT_MISMATCH : CLI_EXIT_OK;

out:
    if (err) {
        error_report_err(err);
    }
    repo_unlock_nodes(locks);
    json_object_put(vs.problems);
    repo_free(repo);
    return ret;
}
