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
#include "repo/repo.h"
#include "util/cleanup.h"

/* The target is checked a window at a time (a multiple of
 * REPO_CLUSTER_SIZE): block status for the window, then its non-zero
 * clusters read and hashed on repo_hash_extents' threads, then compared.
 * The window bounds the memory for the hashes. */
#define VERIFY_WINDOW (256u * 1024 * 1024)
#define VERIFY_WINDOW_CLUSTERS (VERIFY_WINDOW / REPO_CLUSTER_SIZE)
/* Mismatch lines printed per backup before they are only counted. */
#define VERIFY_MAX_LINES 100

typedef struct VerifyState {
    bool json;
    bool progress;
    uint64_t bytes_read;
    unsigned backups_checked;
    uint64_t mismatches;          /* problems found, all backups */
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
            "  --repo DIR         the backup repository\n"
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

/* Report one problem of backup m.  offset < 0: not about a cluster. */
static void problem(VerifyState *vs, const RepoManifest *m, int64_t offset,
                    const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void problem(VerifyState *vs, const RepoManifest *m, int64_t offset,
                    const char *kind, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    vs->mismatches++;
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

static void end_backup(VerifyState *vs, const RepoManifest *m)
{
    if (vs->lines > VERIFY_MAX_LINES && !vs->json) {
        printf("verify: backup %s disk %s: ... and %u more problems\n",
               m->id, m->node, vs->lines - VERIFY_MAX_LINES);
    }
    vs->lines = 0;
}

static void hex(const uint8_t *h, size_t len, char *out)
{
    for (size_t i = 0; i < len; i++) {
        sprintf(out + 2 * i, "%02x", h[i]);
    }
}

/* ---- the stored check ---- */

/* Compare the scan of m's file with manifest ref (m itself, or a pending
 * one).  Returns the number of problems; reports them unless dry. */
static uint64_t compare_scan(VerifyState *vs, const RepoManifest *m,
                             const RepoManifest *ref, const RepoManifest *scan,
                             const char *path, bool dry)
{
    uint64_t found = 0;
    size_t i = 0, j = 0;
    uint64_t cs = ref->cluster_size ? ref->cluster_size : REPO_CLUSTER_SIZE;

#define REPORT(...) do { found++; if (!dry) { problem(vs, m, __VA_ARGS__); } } while (0)
    /* 1 and 2: merge-walk the two sorted lists. */
    while (i < ref->n_hashes || j < scan->n_hashes) {
        if (j == scan->n_hashes ||
            (i < ref->n_hashes && ref->hashes[i].cluster < scan->hashes[j].cluster)) {
            REPORT((int64_t)(ref->hashes[i].cluster * cs), "missing",
                   "cluster at offset %" PRIu64 " is listed in the manifest "
                   "but not stored in %s", ref->hashes[i].cluster * cs, path);
            i++;
        } else if (i == ref->n_hashes ||
                   scan->hashes[j].cluster < ref->hashes[i].cluster) {
            REPORT((int64_t)(scan->hashes[j].cluster * cs), "extra",
                   "cluster at offset %" PRIu64 " is stored in %s but not "
                   "listed in the manifest", scan->hashes[j].cluster * cs,
                   path);
            j++;
        } else {
            if (memcmp(ref->hashes[i].hash, scan->hashes[j].hash,
                       REPO_HASH_LEN)) {
                REPORT((int64_t)(ref->hashes[i].cluster * cs), "data",
                       "data mismatch at offset %" PRIu64 " (%" PRIu64
                       "-byte cluster)", ref->hashes[i].cluster * cs, cs);
            }
            i++;
            j++;
        }
    }

    /* 3b: the root of the re-read data. */
    if (memcmp(scan->merkle_root, ref->merkle_root, REPO_ROOT_LEN)) {
        char a[2 * REPO_ROOT_LEN + 1], b[2 * REPO_ROOT_LEN + 1];
        hex(scan->merkle_root, REPO_ROOT_LEN, a);
        hex(ref->merkle_root, REPO_ROOT_LEN, b);
        REPORT(-1, "merkle-root",
               "the Merkle root of the re-read data is %s, the manifest "
               "records %s", a, b);
    }
#undef REPORT
    return found;
}

static void verify_stored(VerifyState *vs, Repo *repo, RepoManifest *m)
{
    _cleanup_free_ char *path = repo_data_path(repo, m->node, m->seq);
    RepoManifest *scan = calloc(1, sizeof(*scan));
    BlockDriverState *bs = NULL;
    uint8_t root[REPO_ROOT_LEN];
    Error *err = NULL;

    vs->backups_checked++;
    if (!path || !scan) {
        problem(vs, m, -1, "error", "out of memory");
        goto out;
    }

    /* 3a: the manifest's own list against its root. */
    repo_merkle_root(m->hashes, m->n_hashes, root);
    if (memcmp(root, m->merkle_root, REPO_ROOT_LEN)) {
        problem(vs, m, -1, "merkle-root",
                "the merkle-root of the manifest does not match its hash list");
    }

    /* The chain the manifests describe, or this backup fails. */
    bs = repo_open_chain(repo, m, &err);
    if (!bs) {
        problem(vs, m, -1, "chain", "%s", error_get_pretty(err));
        error_free(err);
        goto out;
    }

    /* Re-read the layer. */
    scan->seq = m->seq;
    snprintf(scan->id, sizeof(scan->id), "%s", m->id);
    scan->image_size = m->image_size;
    scan->cluster_size = m->cluster_size;
    char label[REPO_MAX_NODE_NAME + 32];
    snprintf(label, sizeof(label), "%s verify %s", m->node, m->id);
    CliProgress *prog = cli_progress_new(label, m->image_size, vs->progress);
    bool ok = repo_scan_node(bs, path, scan, cli_progress_cb, prog, &err);
    cli_progress_finish(prog);
    if (!ok) {
        problem(vs, m, -1, "unreadable", "cannot read %s: %s", path,
                error_get_pretty(err));
        error_free(err);
        goto out;
    }
    vs->bytes_read += scan->changed_bytes;

    /* An interrupted prune (prune-cmd.c, step 2) may have put a synthetic
     * full in place while its manifest is still pending: check the file
     * against that manifest, which is the one the next prune commits. */
    if (m->parent_seq && compare_scan(vs, m, m, scan, path, true)) {
        RepoManifest *p = repo_pending_manifest(repo, m);
        if (p && !compare_scan(vs, m, p, scan, path, true)) {
            if (!vs->json) {
                printf("verify: backup %s disk %s: an interrupted prune made "
                       "it a synthetic full; its file matches the pending "
                       "manifest (run 'bitback prune' to finish)\n",
                       m->id, m->node);
            }
            repo_manifest_free(p);
            goto out;
        }
        repo_manifest_free(p);
    }
    compare_scan(vs, m, m, scan, path, false);

out:
    end_backup(vs, m);
    bdrv_unref(bs);
    repo_manifest_free(scan);
}

/* ---- the target check ---- */

/* Expected hash per cluster: sparse, sorted, the newest backup's entry. */
typedef struct Expected {
    uint64_t cluster;
    unsigned pos;                 /* index in the chain: larger is newer */
    const uint8_t *hash;
} Expected;

static int expected_cmp(const void *a, const void *b)
{
    const Expected *x = a, *y = b;

    if (x->cluster != y->cluster) {
        return x->cluster < y->cluster ? -1 : 1;
    }
    return x->pos > y->pos ? -1 : x->pos < y->pos;   /* newest first */
}

static Expected *build_expected(RepoManifest **chain, size_t n_chain,
                                size_t *ret_n)
{
    size_t total = 0, n = 0;
    Expected *e;

    for (size_t i = 0; i < n_chain; i++) {
        total += chain[i]->n_hashes;
    }
    e = calloc(total ? total : 1, sizeof(*e));
    if (!e) {
        return NULL;
    }
    for (size_t i = 0; i < n_chain; i++) {
        for (size_t k = 0; k < chain[i]->n_hashes; k++) {
            e[n++] = (Expected){ chain[i]->hashes[k].cluster, (unsigned)i,
                                 chain[i]->hashes[k].hash };
        }
    }
    qsort(e, n, sizeof(*e), expected_cmp);
    /* Keep the first (newest) entry of each cluster. */
    size_t out = 0;
    for (size_t k = 0; k < n; k++) {
        if (out && e[out - 1].cluster == e[k].cluster) {
            continue;
        }
        e[out++] = e[k];
    }
    *ret_n = out;
    return e;
}

/* Check target against point m.  Returns false on an operational error
 * (errp set); mismatches are counted in vs. */
static bool verify_against(VerifyState *vs, Repo *repo, RepoManifest *m,
                           const char *target, Error **errp)
{
    _cleanup_free_ RepoManifest **chain = NULL;
    _cleanup_free_ Expected *exp = NULL;
    _cleanup_free_ bool *zero = NULL;
    _cleanup_free_ RepoExtent *ext = NULL;
    _cleanup_free_ RepoHash *got_hashes = NULL;
    BlockDriverState *bs;
    size_t n_chain, n_exp = 0, cur = 0;
    uint64_t cs = REPO_CLUSTER_SIZE, size = m->image_size;
    uint8_t zero_full[REPO_HASH_LEN], zero_tail[REPO_HASH_LEN];
    int64_t len;
    bool ok = false;

    chain = repo_chain(repo, m, &n_chain, errp);
    if (!chain) {
        return false;
    }
    for (size_t i = 0; i < n_chain; i++) {
        if (chain[i]->image_size != size ||
            (chain[i]->cluster_size && chain[i]->cluster_size != cs)) {
            error_setg(errp, "backup %s of %s has a different image or "
                       "cluster size than backup %s", chain[i]->id, m->node,
                       m->id);
            return false;
        }
    }
    exp = build_expected(chain, n_chain, &n_exp);
    zero = calloc(VERIFY_WINDOW_CLUSTERS, sizeof(*zero));
    ext = calloc(VERIFY_WINDOW_CLUSTERS, sizeof(*ext));
    got_hashes = calloc(VERIFY_WINDOW_CLUSTERS, sizeof(*got_hashes));
    if (!exp || !zero || !ext || !got_hashes) {
        error_setg(errp, "out of memory");
        return false;
    }
    repo_hash_zero_cluster(cs, zero_full);
    repo_hash_zero_cluster(size % cs ? size % cs : cs, zero_tail);

    if (bdrv_filename_is_nbd_uri(target)) {
        bs = bdrv_open_image(target, NULL, 0, errp);
    } else {
        bs = cli_open_image(target, NULL, 0, errp);
    }
    if (!bs) {
        return false;
    }
    vs->backups_checked++;
    len = bdrv_getlength(bs);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "cannot get the size of %s", target);
        goto out;
    }
    if ((uint64_t)len != size) {
        problem(vs, m, -1, "size", "%s has %" PRId64 " bytes, the backup %"
                PRIu64, target, len, size);
        ok = true;
        goto out;
    }

    char label[REPO_MAX_NODE_NAME + 32];
    snprintf(label, sizeof(label), "%s verify %s", m->node, m->id);
    CliProgress *prog = cli_progress_new(label, size, vs->progress);
    for (uint64_t off = 0; off < size; off += VERIFY_WINDOW) {
        uint64_t win = MIN((uint64_t)VERIFY_WINDOW, size - off);
        size_t ncl = (size_t)DIV_ROUND_UP(win, cs);
        size_t n_ext = 0, n_read = 0;
        uint64_t rbytes = 0;

        /* Which whole clusters does the target report as zeroes? */
        for (size_t k = 0; k < ncl; k++) {
            zero[k] = true;
        }
        for (uint64_t p = 0; p < win;) {
            uint64_t pnum;
            int st = bdrv_block_status(bs, off + p, win - p, &pnum);
            if (st < 0 || pnum == 0) {
                st = BDRV_BLOCK_DATA;   /* unknown: read it */
                pnum = win - p;
            }
            pnum = MIN(pnum, win - p);
            if (!(st & BDRV_BLOCK_ZERO)) {
                for (uint64_t k = p / cs; k <= (p + pnum - 1) / cs; k++) {
                    zero[k] = false;
                }
            }
            p += pnum;
        }
        /* The runs of non-zero clusters, read and hashed on the pool. */
        for (size_t k = 0; k < ncl;) {
            if (zero[k]) {
                k++;
                continue;
            }
            size_t end = k;
            while (end < ncl && !zero[end]) {
                end++;
            }
            uint64_t roff = (uint64_t)k * cs;
            uint64_t rlen = MIN((uint64_t)end * cs, win) - roff;
            ext[n_ext++] = (RepoExtent){ .start = off + roff, .length = rlen };
            rbytes += rlen;
            n_read += end - k;
            k = end;
        }
        uint64_t err_off = 0;
        int r = repo_hash_extents(bs, ext, n_ext, got_hashes, cli_progress_cb,
                                  prog, off, size, &err_off);
        if (r < 0) {
            cli_progress_finish(prog);
            error_setg_errno(errp, -r, "cannot read %s at offset %" PRIu64,
                             target, err_off);
            goto out;
        }
        vs->bytes_read += rbytes;
        /* Compare. */
        size_t next = 0;
        for (size_t k = 0; k < ncl; k++) {
            uint64_t c = off / cs + k;
            uint64_t clen = MIN(cs, size - c * cs);
            const uint8_t *want = clen == cs ? zero_full : zero_tail;
            const uint8_t *got;
            unsigned from = 0;

            while (cur < n_exp && exp[cur].cluster < c) {
                cur++;
            }
            if (cur < n_exp && exp[cur].cluster == c) {
                want = exp[cur].hash;
                from = exp[cur].pos + 1;
            }
            if (zero[k]) {
                got = clen == cs ? zero_full : zero_tail;
            } else {
                assert(next < n_read && got_hashes[next].cluster == c);
                got = got_hashes[next++].hash;
            }
            if (memcmp(want, got, REPO_HASH_LEN)) {
                if (from) {
                    problem(vs, m, (int64_t)(c * cs), "data",
                            "data mismatch at offset %" PRIu64 " (%" PRIu64
                            "-byte cluster, stored by backup %s) in %s",
                            c * cs, clen, chain[from - 1]->id, target);
                } else {
                    problem(vs, m, (int64_t)(c * cs), "data",
                            "data mismatch at offset %" PRIu64 " (%" PRIu64
                            "-byte cluster, zeroes in the backup) in %s",
                            c * cs, clen, target);
                }
            }
        }
        cli_progress_update(prog, off + win, size);
    }
    cli_progress_finish(prog);
    ok = true;

out:
    end_backup(vs, m);
    bdrv_close(bs, NULL);
    return ok;
}

int cli_cmd_verify(int argc, char **argv)
{
    enum { OPT_REPO = 256, OPT_NODE, OPT_AT, OPT_AGAINST, OPT_PROGRESS,
           OPT_OUTPUT };
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"repo", required_argument, NULL, OPT_REPO},
        {"node", required_argument, NULL, OPT_NODE},
        {"at", required_argument, NULL, OPT_AT},
        {"against", required_argument, NULL, OPT_AGAINST},
        {"progress", no_argument, NULL, OPT_PROGRESS},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {NULL, 0, NULL, 0},
    };
    const char *repo_path = NULL, *node_arg = NULL, *at = NULL;
    const char *against = NULL;
    VerifyState vs = { 0 };
    Error *err = NULL;
    unsigned seq = 0;
    bool all;
    int c;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        switch (c) {
        case 'h':
            verify_usage(stdout);
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
        case OPT_AGAINST:
            against = optarg;
            break;
        case OPT_PROGRESS:
            vs.progress = true;
            break;
        case OPT_OUTPUT:
            if (!cli_parse_output(optarg, &vs.json, &err)) {
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            break;
        default:
            verify_usage(stderr);
            return CLI_EXIT_ERROR;
        }
    }
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
    vs.progress = cli_progress_wanted(vs.progress) && !vs.json;

    Repo *repo = repo_open(repo_path, false, &err);
    if (!repo) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    int ret = CLI_EXIT_ERROR;
    _cleanup_free_ const char **nodes = NULL;
    const char *one[2] = { NULL, NULL };
    const char **scope;
    double start = now_seconds();

    vs.problems = json_object_new_array();
    if (against || node_arg) {
        one[0] = cli_repo_pick_node(repo, node_arg, &err);
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

    if (against) {
        RepoManifest *m = repo_find(repo, scope[0], seq, &err);
        if (!m || !verify_against(&vs, repo, m, against, &err)) {
            goto out;
        }
    } else if (all) {
        for (size_t i = 0; i < repo->n_backups; i++) {
            RepoManifest *m = repo->backups[i];
            for (size_t k = 0; scope[k]; k++) {
                if (!strcmp(scope[k], m->node)) {
                    verify_stored(&vs, repo, m);
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
                verify_stored(&vs, repo, m);
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
    double rate = secs > 0 ? (double)vs.bytes_read / secs : 0;
    if (vs.json) {
        _cleanup_json_ struct json_object *o = json_object_new_object();
        json_object_object_add(o, "ok", json_object_new_boolean(!vs.mismatches));
        json_object_object_add(o, "backups-checked",
                               json_object_new_int64(vs.backups_checked));
        json_object_object_add(o, "bytes-read",
                               json_object_new_int64((int64_t)vs.bytes_read));
        json_object_object_add(o, "seconds", json_object_new_double(secs));
        json_object_object_add(o, "mismatches",
                               json_object_new_int64((int64_t)vs.mismatches));
        json_object_object_add(o, "problems", json_object_get(vs.problems));
        cli_print_json(o);
    } else {
        char rd[32], rt[32];
        cli_size_to_str(vs.bytes_read, rd, sizeof(rd));
        cli_size_to_str((uint64_t)rate, rt, sizeof(rt));
        if (vs.mismatches) {
            printf("verify: FAILED: %" PRIu64 " problem%s in %u backup%s "
                   "checked (%s read in %.2f s, %s/s)\n", vs.mismatches,
                   vs.mismatches == 1 ? "" : "s", vs.backups_checked,
                   vs.backups_checked == 1 ? "" : "s", rd, secs, rt);
        } else {
            printf("verify: %u backup%s checked%s%s, all good (%s read in "
                   "%.2f s, %s/s)\n", vs.backups_checked,
                   vs.backups_checked == 1 ? "" : "s",
                   against ? " against " : "", against ? against : "",
                   rd, secs, rt);
        }
    }
    ret = vs.mismatches ? CLI_EXIT_MISMATCH : CLI_EXIT_OK;

out:
    if (err) {
        error_report_err(err);
    }
    json_object_put(vs.problems);
    repo_free(repo);
    return ret;
}
