/*
 * Verify (docs/specs/repository.md): prove that a repository's backups
 * still hold what was backed up, and that a restored image or a live
 * export matches a backup.  `bitback verify` is its front end.
 *
 * Stored check (repo_verify_stored): repo_open_chain() opens the backup's
 * chain exactly as the manifests describe it (each file's recorded backing
 * name must be its manifest's parent; it is checked, never followed), and
 * repo_scan_node() re-reads every cluster allocated in the backup's own
 * qcow2 layer, through that chain, and hashes it, on a pool of threads
 * (repo_hash_extents; the result does not depend on their number).  The
 * result must equal the manifest exactly:
 *   1. the same set of clusters (a cluster stored but not listed, or listed
 *      but not stored, is a mismatch),
 *   2. the same hash for each cluster,
 *   3. the Merkle root recomputed from the manifest's list and the one
 *      computed from the re-read data both equal the manifest's
 *      merkle-root (so an edited hash list is caught too).
 * A backup whose chain cannot be opened as its manifests describe it is a
 * problem of that backup ("chain", naming the backup whose link is
 * wrong), and so is a file that cannot be read ("unreadable").
 *
 * Target check (repo_verify_against): the expected content of cluster c
 * at point ID is the hash of c in the newest backup of ID's chain
 * (repo_chain) that lists c, else the hash of zeroes (a full backup lists
 * every cluster it stores; what it does not store reads as zeroes).  The
 * target must have the backup's size; it is checked 256 MiB at a time:
 * block status first, then the clusters not reported as zero are read in
 * 4 MiB requests and hashed on the same pool of threads (zero clusters are
 * compared against the zero hash without reading), then compared in order.
 * The manifests are the reference here.
 */
#include <assert.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repo/ops.h"
#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

/* The target is checked a window at a time (a multiple of
 * REPO_CLUSTER_SIZE): block status for the window, then its non-zero
 * clusters read and hashed on repo_hash_extents' threads, then compared.
 * The window bounds the memory for the hashes. */
#define VERIFY_WINDOW (256u * 1024 * 1024)
#define VERIFY_WINDOW_CLUSTERS (VERIFY_WINDOW / REPO_CLUSTER_SIZE)

/* Report one problem of backup m.  offset < 0: not about a cluster. */
static void problem(RepoVerify *v, const RepoManifest *m, int64_t offset,
                    const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void problem(RepoVerify *v, const RepoManifest *m, int64_t offset,
                    const char *kind, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    v->problems++;
    v->problem(v, m, offset, kind, msg);
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
static uint64_t compare_scan(RepoVerify *v, const RepoManifest *m,
                             const RepoManifest *ref, const RepoManifest *scan,
                             const char *path, bool dry)
{
    uint64_t found = 0;
    size_t i = 0, j = 0;
    uint64_t cs = ref->cluster_size ? ref->cluster_size : REPO_CLUSTER_SIZE;

#define REPORT(...) do { found++; if (!dry) { problem(v, m, __VA_ARGS__); } } while (0)
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

void repo_verify_stored(RepoVerify *v, Repo *repo, const RepoManifest *m)
{
    _cleanup_free_ char *path = repo_data_path(repo, m->node, m->seq);
    RepoManifest *scan = calloc(1, sizeof(*scan));
    BlockDriverState *bs = NULL;
    uint8_t root[REPO_ROOT_LEN];
    Error *err = NULL;

    v->backups_checked++;
    if (!path || !scan) {
        problem(v, m, -1, "error", "out of memory");
        goto out;
    }

    /* 3a: the manifest's own list against its root. */
    repo_merkle_root(m->hashes, m->n_hashes, root);
    if (memcmp(root, m->merkle_root, REPO_ROOT_LEN)) {
        problem(v, m, -1, "merkle-root",
                "the merkle-root of the manifest does not match its hash list");
    }

    /* The chain the manifests describe, or this backup fails. */
    bs = repo_open_chain(repo, m, &err);
    if (!bs) {
        problem(v, m, -1, "chain", "%s", error_get_pretty(err));
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
    void *step = repo_progress_begin(&v->progress, label, m->image_size);
    bool ok = repo_scan_node(bs, path, scan, 0, repo_progress_fn(&v->progress),
                             step, &err);
    repo_progress_end(&v->progress, step);
    if (!ok) {
        problem(v, m, -1, "unreadable", "cannot read %s: %s", path,
                error_get_pretty(err));
        error_free(err);
        goto out;
    }
    v->bytes_read += scan->changed_bytes;

    /* An interrupted prune (prune.c, step 2) may have put a synthetic
     * full in place while its manifest is still pending: check the file
     * against that manifest, which is the one the next prune commits. */
    if (m->parent_seq && compare_scan(v, m, m, scan, path, true)) {
        RepoManifest *p = repo_pending_manifest(repo, m);
        if (p && !compare_scan(v, m, p, scan, path, true)) {
            if (v->note) {
                v->note(v, m, "an interrupted prune made it a synthetic "
                        "full; its file matches the pending manifest (run "
                        "'bitback prune' to finish)");
            }
            repo_manifest_free(p);
            goto out;
        }
        repo_manifest_free(p);
    }
    compare_scan(v, m, m, scan, path, false);

out:
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

bool repo_verify_against(RepoVerify *v, Repo *repo, const RepoManifest *m,
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

    bs = v->open_target ? v->open_target(target, errp)
                        : bdrv_open_image(target, NULL, 0, errp);
    if (!bs) {
        return false;
    }
    v->backups_checked++;
    len = bdrv_getlength(bs);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "cannot get the size of %s", target);
        goto out;
    }
    if ((uint64_t)len != size) {
        problem(v, m, -1, "size", "%s has %" PRId64 " bytes, the backup %"
                PRIu64, target, len, size);
        ok = true;
        goto out;
    }

    char label[REPO_MAX_NODE_NAME + 32];
    snprintf(label, sizeof(label), "%s verify %s", m->node, m->id);
    void *step = repo_progress_begin(&v->progress, label, size);
    RepoProgressFn *update = repo_progress_fn(&v->progress);
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
        int r = repo_hash_extents(bs, ext, n_ext, got_hashes, 0, update, step,
                                  off, size, &err_off);
        if (r < 0) {
            repo_progress_end(&v->progress, step);
            error_setg_errno(errp, -r, "cannot read %s at offset %" PRIu64,
                             target, err_off);
            goto out;
        }
        v->bytes_read += rbytes;
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
                    problem(v, m, (int64_t)(c * cs), "data",
                            "data mismatch at offset %" PRIu64 " (%" PRIu64
                            "-byte cluster, stored by backup %s) in %s",
                            c * cs, clen, chain[from - 1]->id, target);
                } else {
                    problem(v, m, (int64_t)(c * cs), "data",
                            "data mismatch at offset %" PRIu64 " (%" PRIu64
                            "-byte cluster, zeroes in the backup) in %s",
                            c * cs, clen, target);
                }
            }
        }
        if (update) {
            update(step, off + win, size);
        }
    }
    repo_progress_end(&v->progress, step);
    ok = true;

out:
    bdrv_close(bs, NULL);
    return ok;
}
