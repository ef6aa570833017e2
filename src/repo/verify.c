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

/* The target is checked a window at a time (a multiple of every hash
 * block size): the chain's expected records for the window, block status,
 * then its non-zero blocks read and hashed on repo_hash_extents' threads,
 * then compared.  The window bounds the memory. */
#define VERIFY_WINDOW (256u * 1024 * 1024)

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

/* One reference the scan is compared with: the backup's manifest (its
 * index), or the manifest a prune left pending.  Fed the scan's records
 * in order (the sink); walks the reference's records alongside. */
typedef struct Compare {
    RepoVerify *v;
    const RepoManifest *m;          /* the backup problems are about */
    const RepoManifest *ref;
    const char *path;
    bool dry;                       /* count, do not report */
    RepoIndexReader *rd;
    RepoIndexRecord cur;
    int have;                       /* 1 cur is valid, 0 end, -1 error */
    Error *rd_err;
    RepoMerkle ref_mk, scan_mk;
    uint64_t found;
} Compare;

static void compare_report(Compare *c, uint64_t block, const char *kind,
                           const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void compare_report(Compare *c, uint64_t block, const char *kind,
                           const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    c->found++;
    if (c->dry) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    problem(c->v, c->m, (int64_t)(block * c->ref->cluster_size), kind, "%s",
            msg);
}

static void compare_advance(Compare *c)
{
    if (c->have == 1) {
        repo_merkle_add_record(&c->ref_mk, &c->cur);
    }
    c->have = repo_index_next(c->rd, &c->cur, &c->rd_err);
}

static const char *record_what(const RepoIndexRecord *r)
{
    return r->zero ? "a run of zero blocks" : "a hashed block";
}

/* The reference's records before `block` are not in the scan. */
static void compare_missing_before(Compare *c, uint64_t block)
{
    uint64_t cs = c->ref->cluster_size;

    while (c->have == 1 && c->cur.block < block) {
        compare_report(c, c->cur.block, "missing", "%s at offset %" PRIu64
                       " is listed in the manifest but not stored in %s",
                       record_what(&c->cur), c->cur.block * cs, c->path);
        compare_advance(c);
    }
}

static void compare_record(Compare *c, const RepoIndexRecord *r)
{
    uint64_t cs = c->ref->cluster_size;

    repo_merkle_add_record(&c->scan_mk, r);
    compare_missing_before(c, r->block);
    if (c->have != 1 || c->cur.block > r->block) {
        compare_report(c, r->block, "extra", "%s at offset %" PRIu64
                       " is stored in %s but not listed in the manifest",
                       record_what(r), r->block * cs, c->path);
        return;
    }
    if (c->cur.zero != r->zero || c->cur.count != r->count) {
        compare_report(c, r->block, "data", "data mismatch at offset %"
                       PRIu64 ": the manifest lists %s of %" PRIu64
                       " blocks, %s holds %s of %" PRIu64, r->block * cs,
                       record_what(&c->cur), c->cur.count, c->path,
                       record_what(r), r->count);
    } else if (!r->zero && memcmp(c->cur.hash, r->hash, REPO_HASH_LEN)) {
        compare_report(c, r->block, "data", "data mismatch at offset %" PRIu64
                       " (%" PRIu64 "-byte block)", r->block * cs, cs);
    }
    compare_advance(c);
}

typedef struct CompareSet {
    Compare *c;
    size_t n;
} CompareSet;

static bool compare_sink(void *opaque, const RepoIndexRecord *r, Error **errp)
{
    CompareSet *set = opaque;

    (void)errp;
    for (size_t i = 0; i < set->n; i++) {
        compare_record(&set->c[i], r);
    }
    return true;
}

static bool compare_start(Compare *c, RepoVerify *v, Repo *repo,
                          const RepoManifest *m, const RepoManifest *ref,
                          const char *path, bool dry)
{
    Error *err = NULL;

    *c = (Compare){ .v = v, .m = m, .ref = ref, .path = path, .dry = dry };
    repo_merkle_init(&c->ref_mk);
    repo_merkle_init(&c->scan_mk);
    c->rd = repo_index_open(repo, ref, &err);
    if (!c->rd) {
        if (!dry) {
            problem(v, m, -1, "index", "%s", error_get_pretty(err));
        }
        error_free(err);
        return false;
    }
    compare_advance(c);
    return true;
}

/* After the scan: what the reference lists beyond it, the reference's
 * own root (3a) and the scan's root (3b).  The number of problems. */
static uint64_t compare_finish(Compare *c, bool scanned)
{
    uint8_t root[REPO_ROOT_LEN];
    char a[2 * REPO_ROOT_LEN + 1], b[2 * REPO_ROOT_LEN + 1];

    if (scanned) {
        compare_missing_before(c, UINT64_MAX);
    } else {
        while (c->have == 1) {
            compare_advance(c);
        }
    }
    if (c->have < 0) {
        c->found++;
        if (!c->dry) {
            problem(c->v, c->m, -1, "index", "%s",
                    error_get_pretty(c->rd_err));
        }
    } else {
        repo_merkle_final(&c->ref_mk, root);
        if (memcmp(root, c->ref->merkle_root, REPO_ROOT_LEN)) {
            c->found++;
            if (!c->dry) {
                problem(c->v, c->m, -1, "merkle-root", "the merkle-root of "
                        "the manifest does not match its hash list");
            }
        }
    }
    if (scanned) {
        repo_merkle_final(&c->scan_mk, root);
        if (memcmp(root, c->ref->merkle_root, REPO_ROOT_LEN)) {
            hex(root, REPO_ROOT_LEN, a);
            hex(c->ref->merkle_root, REPO_ROOT_LEN, b);
            c->found++;
            if (!c->dry) {
                problem(c->v, c->m, -1, "merkle-root", "the Merkle root of "
                        "the re-read data is %s, the manifest records %s",
                        a, b);
            }
        }
    }
    error_free(c->rd_err);
    c->rd_err = NULL;
    repo_index_close(c->rd);
    c->rd = NULL;
    return c->found;
}

/* Scan m's layer (bs) against refs[0..n); false when the file could not be
 * read (reported). */
static bool scan_compare(RepoVerify *v, const RepoManifest *m,
                         BlockDriverState *bs, const char *path,
                         Compare *c, size_t n)
{
    CompareSet set = { c, n };
    uint64_t changed, read = 0;
    Error *err = NULL;
    char label[REPO_MAX_NODE_NAME + 32];

    snprintf(label, sizeof(label), "%s verify %s", m->node, m->id);
    void *step = repo_progress_begin(&v->progress, label, m->image_size);
    bool ok = repo_scan_layer(bs, path, m->image_size, m->cluster_size, 0,
                              compare_sink, &set,
                              repo_progress_fn(&v->progress), step, &changed,
                              &read, &err);
    repo_progress_end(&v->progress, step);
    v->bytes_read += read;
    if (!ok) {
        problem(v, m, -1, "unreadable", "cannot read %s: %s", path,
                error_get_pretty(err));
        error_free(err);
    }
    return ok;
}

void repo_verify_stored(RepoVerify *v, Repo *repo, const RepoManifest *m)
{
    _cleanup_free_ char *path = repo_data_path(repo, m->node, m->seq);
    RepoManifest *pending = NULL;
    BlockDriverState *bs = NULL;
    Compare c[2];
    Error *err = NULL;

    v->backups_checked++;

    /* The chain the manifests describe, or this backup fails (its own
     * list is still checked against its root). */
    bs = repo_open_chain(repo, m, &err);
    if (!bs) {
        problem(v, m, -1, "chain", "%s", error_get_pretty(err));
        error_free(err);
        if (compare_start(&c[0], v, repo, m, m, path, false)) {
            compare_finish(&c[0], false);
        }
        return;
    }

    /* An interrupted prune (prune.c, step 2) may have put a synthetic
     * full in place while its manifest is still pending: when the file
     * does not match its manifest but matches that one, it is a note. */
    if (m->parent_seq) {
        pending = repo_pending_manifest(repo, m);
    }
    if (pending && compare_start(&c[0], v, repo, m, m, path, true)) {
        if (compare_start(&c[1], v, repo, m, pending, path, true)) {
            bool ok = scan_compare(v, m, bs, path, c, 2);
            uint64_t own = compare_finish(&c[0], ok);
            uint64_t pend = compare_finish(&c[1], ok);
            if (!ok || !own) {
                goto out;
            }
            if (!pend) {
                if (v->note) {
                    v->note(v, m, "an interrupted prune made it a synthetic "
                            "full; its file matches the pending manifest (run "
                            "'bitback prune' to finish)");
                }
                goto out;
            }
        } else {
            compare_finish(&c[0], false);
        }
    }
    if (compare_start(&c[0], v, repo, m, m, path, false)) {
        bool ok = scan_compare(v, m, bs, path, c, 1);
        compare_finish(&c[0], ok);
    }

out:
    repo_manifest_free(pending);
    bdrv_unref(bs);
}

/* ---- the target check ---- */

/* What the chain says block b of a window holds. */
typedef struct Expected {
    bool known;                   /* some backup of the chain lists it */
    bool zero;
    unsigned from;                /* that backup's index in the chain */
    uint8_t hash[REPO_HASH_LEN];
} Expected;

/* One backup of the chain: its records, read in order across windows. */
typedef struct Layer {
    RepoIndexReader *rd;
    RepoIndexRecord cur;
    int have;
} Layer;

/* Fill exp[] for blocks [wb, we) from the layers, oldest first so that the
 * newest backup's record wins.  False with errp on an index error. */
static bool expected_window(Layer *layers, size_t n, uint64_t wb, uint64_t we,
                            Expected *exp, Error **errp)
{
    memset(exp, 0, (size_t)(we - wb) * sizeof(*exp));
    for (size_t i = 0; i < n; i++) {
        Layer *l = &layers[i];
        while (l->have == 1 && l->cur.block < we) {
            uint64_t s = MAX(l->cur.block, wb);
            uint64_t e = MIN(l->cur.block + l->cur.count, we);
            for (uint64_t b = s; b < e; b++) {
                Expected *x = &exp[b - wb];
                x->known = true;
                x->zero = l->cur.zero;
                x->from = (unsigned)i;
                memcpy(x->hash, l->cur.hash, REPO_HASH_LEN);
            }
            if (l->cur.block + l->cur.count > we) {
                break;                      /* continues in the next window */
            }
            l->have = repo_index_next(l->rd, &l->cur, errp);
        }
        if (l->have < 0) {
            return false;
        }
    }
    return true;
}

bool repo_verify_against(RepoVerify *v, Repo *repo, const RepoManifest *m,
                         const char *target, Error **errp)
{
    _cleanup_free_ RepoManifest **chain = NULL;
    _cleanup_free_ Layer *layers = NULL;
    _cleanup_free_ Expected *exp = NULL;
    _cleanup_free_ bool *zero = NULL;
    _cleanup_free_ RepoExtent *ext = NULL;
    _cleanup_free_ RepoHash *got_hashes = NULL;
    BlockDriverState *bs = NULL;
    size_t n_chain = 0;
    uint64_t cs = m->cluster_size, size = m->image_size;
    uint8_t zero_full[REPO_HASH_LEN], zero_tail[REPO_HASH_LEN];
    int64_t len;
    bool ok = false;

    chain = repo_chain(repo, m, &n_chain, errp);
    if (!chain) {
        return false;
    }
    for (size_t i = 0; i < n_chain; i++) {
        if (chain[i]->image_size != size || chain[i]->cluster_size != cs) {
            error_setg(errp, "backup %s of %s has a different image or "
                       "hash block size than backup %s", chain[i]->id,
                       m->node, m->id);
            return false;
        }
    }
    uint64_t wblocks = VERIFY_WINDOW / cs;
    layers = calloc(n_chain, sizeof(*layers));
    exp = calloc(wblocks, sizeof(*exp));
    zero = calloc(wblocks, sizeof(*zero));
    ext = calloc(wblocks, sizeof(*ext));
    got_hashes = calloc(wblocks, sizeof(*got_hashes));
    if (!layers || !exp || !zero || !ext || !got_hashes) {
        error_setg(errp, "out of memory");
        return false;
    }
    for (size_t i = 0; i < n_chain; i++) {
        layers[i].rd = repo_index_open(repo, chain[i], errp);
        if (!layers[i].rd) {
            goto out;
        }
        layers[i].have = repo_index_next(layers[i].rd, &layers[i].cur, errp);
        if (layers[i].have < 0) {
            goto out;
        }
    }
    repo_hash_zero_cluster(cs, zero_full);
    repo_hash_zero_cluster(size % cs ? size % cs : cs, zero_tail);

    bs = v->open_target ? v->open_target(target, errp)
                        : bdrv_open_image(target, NULL, 0, errp);
    if (!bs) {
        goto out;
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

        if (!expected_window(layers, n_chain, off / cs, off / cs + ncl, exp,
                             errp)) {
            repo_progress_end(&v->progress, step);
            goto out;
        }
        /* Which whole blocks does the target report as zeroes? */
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
        /* The runs of non-zero blocks, read and hashed on the pool. */
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
        int r = repo_hash_extents(bs, ext, n_ext, (uint32_t)cs, got_hashes, 0,
                                  update, step, off, size, &err_off);
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
            const uint8_t *zh = clen == cs ? zero_full : zero_tail;
            const uint8_t *want = exp[k].known && !exp[k].zero ? exp[k].hash
                                                               : zh;
            const uint8_t *got;

            if (zero[k]) {
                got = zh;
            } else {
                assert(next < n_read && got_hashes[next].cluster == c);
                got = got_hashes[next++].hash;
            }
            if (memcmp(want, got, REPO_HASH_LEN)) {
                if (exp[k].known) {
                    problem(v, m, (int64_t)(c * cs), "data",
                            "data mismatch at offset %" PRIu64 " (%" PRIu64
                            "-byte block, stored by backup %s) in %s",
                            c * cs, clen, chain[exp[k].from]->id, target);
                } else {
                    problem(v, m, (int64_t)(c * cs), "data",
                            "data mismatch at offset %" PRIu64 " (%" PRIu64
                            "-byte block, zeroes in the backup) in %s",
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
    if (bs) {
        bdrv_close(bs, NULL);
    }
    for (size_t i = 0; layers && i < n_chain; i++) {
        repo_index_close(layers[i].rd);
    }
    return ok;
}
