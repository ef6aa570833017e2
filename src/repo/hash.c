/*
 * Hashes (docs/specs/repository.md, "Hashes"): the per-cluster XXH3-128,
 * the SHA-256 Merkle root over them, the pool of threads that reads and
 * hashes extents of an image, and the scan of a backup file that fills a
 * manifest's extents, hashes and root.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xxhash.h>

#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

/* Reads of repo_scan_backup: many clusters per request. */
#define SCAN_BATCH         (4u * 1024 * 1024)

void repo_hash_cluster(const void *buf, size_t len, uint8_t out[REPO_HASH_LEN])
{
    XXH128_hash_t h = XXH3_128bits(buf, len);
    XXH128_canonical_t c;

    XXH128_canonicalFromHash(&c, h);
    memcpy(out, c.digest, REPO_HASH_LEN);
}

void repo_hash_zero_cluster(size_t len, uint8_t out[REPO_HASH_LEN])
{
    static const uint8_t zeroes[REPO_CLUSTER_SIZE];

    if (len <= sizeof(zeroes)) {
        repo_hash_cluster(zeroes, len, out);
        return;
    }
    /* Longer than a cluster (not used by the repository itself). */
    XXH3_state_t *st = XXH3_createState();
    XXH128_canonical_t c;
    if (!st) {
        abort();
    }
    XXH3_128bits_reset(st);
    for (size_t done = 0; done < len; done += sizeof(zeroes)) {
        XXH3_128bits_update(st, zeroes, MIN(sizeof(zeroes), len - done));
    }
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(st));
    XXH3_freeState(st);
    memcpy(out, c.digest, REPO_HASH_LEN);
}

/* ---- Hashing on a pool of threads ----
 *
 * repo_hash_extents splits the extents into batches of SCAN_BATCH bytes
 * (never crossing an extent) and hands them out, in order, from a cursor
 * under pool->lock.  Each thread (the caller's plus up to threads - 1
 * helpers) reads its batch with bdrv_pread into its own buffer and hashes
 * the batch's clusters into out[] at the index the cursor assigned, so the
 * result does not depend on which thread did what.
 *
 * Invariants (pool->lock protects every field below it):
 *   1. Batches are handed out in ascending offset order; batch k's hashes
 *      go to out[first_k ..], first_k = the number of clusters in batches
 *      before k.  Slots of out[] are written by exactly one thread.
 *   2. done only grows: it is the sum of the lengths of finished batches.
 *      Only the calling thread calls progress, with done under the lock
 *      read, so the callback sees a monotonic count from one thread; it
 *      reports the final done before returning, even when the helpers did
 *      every batch.
 *   3. After an error no new batch is handed out; err/err_offset keep the
 *      failed batch with the lowest offset.  Every batch below a handed
 *      out one was handed out too (1), so that is the first bad batch of
 *      the whole scan, whatever the thread count.
 *   4. The caller returns only after every helper it started has joined.
 */

typedef struct HashPool {
    BlockDriverState *bs;
    const RepoExtent *ext;
    size_t n_ext;
    RepoHash *out;
    uint32_t bsize;               /* the hash block size */

    pthread_mutex_t lock;
    pthread_cond_t cond;          /* a batch finished */
    size_t cur_ext;               /* cursor: next batch */
    uint64_t cur_off;
    size_t cur_hash;
    uint64_t done;
    uint64_t reported;            /* done as last reported (caller only) */
    unsigned running;             /* helpers not yet finished */
    int err;
    uint64_t err_offset;
} HashPool;

unsigned repo_hash_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) {
        return 1;
    }
    return (unsigned)MIN(n, (long)REPO_DEFAULT_HASH_THREADS);
}

/* Take the next batch: false when none is left or after an error. */
static bool hash_pool_next_locked(HashPool *p, uint64_t *ret_off,
                                  uint64_t *ret_len, size_t *ret_first)
{
    while (p->cur_ext < p->n_ext &&
           p->cur_off >= p->ext[p->cur_ext].start + p->ext[p->cur_ext].length) {
        p->cur_ext++;
        if (p->cur_ext < p->n_ext) {
            p->cur_off = p->ext[p->cur_ext].start;
        }
    }
    if (p->err || p->cur_ext == p->n_ext) {
        return false;
    }
    uint64_t end = p->ext[p->cur_ext].start + p->ext[p->cur_ext].length;
    *ret_off = p->cur_off;
    *ret_len = MIN((uint64_t)SCAN_BATCH, end - p->cur_off);
    *ret_first = p->cur_hash;
    p->cur_off += *ret_len;
    p->cur_hash += DIV_ROUND_UP(*ret_len, p->bsize);
    return true;
}

/* Read and hash one batch into p->out[first ..].  0 or -errno. */
static int hash_batch(HashPool *p, uint8_t *buf, uint64_t off, uint64_t len,
                      size_t first)
{
    int r = bdrv_pread(p->bs, off, buf, len);
    if (r < 0) {
        return r;
    }
    for (uint64_t c = 0; c < len; c += p->bsize) {
        RepoHash *h = &p->out[first++];
        h->cluster = (off + c) / p->bsize;
        repo_hash_cluster(buf + c, MIN(p->bsize, len - c), h->hash);
    }
    return 0;
}

/* Take and do batches until none is left.  progress is non-NULL only in
 * the calling thread, which reports after each of its own batches;
 * helpers wake it instead (pool->cond). */
static void hash_pool_work(HashPool *p, uint8_t *buf, RepoProgressFn *progress,
                           void *opaque, uint64_t base, uint64_t total)
{
    uint64_t off, len;
    size_t first;

    pthread_mutex_lock(&p->lock);
    while (hash_pool_next_locked(p, &off, &len, &first)) {
        pthread_mutex_unlock(&p->lock);
        int r = hash_batch(p, buf, off, len, first);
        pthread_mutex_lock(&p->lock);
        if (r < 0) {
            if (!p->err || off < p->err_offset) {
                p->err = r;
                p->err_offset = off;
            }
        } else {
            p->done += len;
        }
        if (progress) {
            uint64_t done = p->done;
            p->reported = done;
            pthread_mutex_unlock(&p->lock);
            progress(opaque, base + done, total);
            pthread_mutex_lock(&p->lock);
        } else {
            pthread_cond_broadcast(&p->cond);
        }
    }
    pthread_mutex_unlock(&p->lock);
}

static void *hash_pool_helper(void *opaque)
{
    HashPool *p = opaque;
    uint8_t *buf = malloc(SCAN_BATCH);

    if (buf) {
        hash_pool_work(p, buf, NULL, NULL, 0, 0);
        free(buf);
    }
    /* Without a buffer this helper does nothing; the others cover. */
    pthread_mutex_lock(&p->lock);
    p->running--;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int repo_hash_extents(BlockDriverState *bs, const RepoExtent *ext,
                      size_t n_ext, uint32_t block_size, RepoHash *out,
                      unsigned threads, RepoProgressFn *progress, void *opaque,
                      uint64_t base, uint64_t total, uint64_t *ret_err_offset)
{
    HashPool p = {
        .bs = bs, .ext = ext, .n_ext = n_ext, .out = out, .bsize = block_size,
        .cur_off = n_ext ? ext[0].start : 0,
    };
    pthread_t tids[REPO_MAX_HASH_THREADS];
    unsigned n_tids = 0;
    uint64_t n_batches = 0;
    _cleanup_free_ uint8_t *buf = malloc(SCAN_BATCH);

    if (!buf) {
        return -ENOMEM;
    }
    for (size_t i = 0; i < n_ext; i++) {
        n_batches += DIV_ROUND_UP(ext[i].length, SCAN_BATCH);
    }
    pthread_mutex_init(&p.lock, NULL);
    pthread_cond_init(&p.cond, NULL);

    /* Helpers: never more than there are batches for. */
    if (threads == 0) {
        threads = repo_hash_threads();
    }
    threads = MIN(threads, REPO_MAX_HASH_THREADS);
    unsigned want = (unsigned)MIN((uint64_t)threads, n_batches);
    for (unsigned i = 1; i < want; i++) {
        pthread_mutex_lock(&p.lock);
        p.running++;
        pthread_mutex_unlock(&p.lock);
        if (pthread_create(&tids[n_tids], NULL, hash_pool_helper, &p) != 0) {
            /* Fewer threads only make it slower. */
            pthread_mutex_lock(&p.lock);
            p.running--;
            pthread_mutex_unlock(&p.lock);
            break;
        }
        n_tids++;
    }

    hash_pool_work(&p, buf, progress, opaque, base, total);

    /* Wait for the helpers, reporting their progress (invariant 2). */
    pthread_mutex_lock(&p.lock);
    uint64_t reported = p.reported;
    for (;;) {
        if (progress && p.done != reported) {
            reported = p.done;
            pthread_mutex_unlock(&p.lock);
            progress(opaque, base + reported, total);
            pthread_mutex_lock(&p.lock);
            continue;            /* more may have finished meanwhile */
        }
        if (!p.running) {
            break;
        }
        pthread_cond_wait(&p.cond, &p.lock);
    }
    pthread_mutex_unlock(&p.lock);
    for (unsigned i = 0; i < n_tids; i++) {
        pthread_join(tids[i], NULL);
    }
    pthread_cond_destroy(&p.cond);
    pthread_mutex_destroy(&p.lock);
    if (p.err && ret_err_offset) {
        *ret_err_offset = p.err_offset;
    }
    return p.err;
}

/* ---- Scanning a backup's layer ----
 *
 * repo_scan_layer walks the layer's block status in the biggest steps the
 * driver gives (a qcow2 reports a whole unallocated L2 range, 512 MiB at
 * 64 KiB clusters, per L1 entry, and merges runs), so holes cost nothing
 * per cluster.  Each hash block (bsize bytes; the image's last one may be
 * shorter) is then
 *   - left out when the layer allocates none of it,
 *   - part of a zero run when the layer allocates all of it as zeroes,
 *   - hashed otherwise, its content read through the chain.
 * Pending items queue up in order until SCAN_WINDOW bytes of blocks wait
 * for hashing; then the window's blocks are read and hashed on the pool
 * and every item goes to the sink in order.  Memory: the queue (bounded by
 * the window) and the pool's buffers, whatever the image size. */

#define SCAN_WINDOW        (256u * 1024 * 1024)
#define SCAN_MAX_ITEMS     4096

typedef struct ScanItem {
    bool zero;
    uint64_t block, count;
} ScanItem;

typedef struct Scan {
    BlockDriverState *bs;
    const char *path;
    uint64_t size, n_blocks;
    uint32_t bsize;
    unsigned threads;
    bool count_only;               /* first pass: only count hashed bytes */
    RepoRecordSink *sink;
    void *sink_opaque;
    RepoProgressFn *progress;
    void *opaque;

    /* The block whose status is partly known. */
    uint64_t part_blk;
    uint64_t part_alloc;           /* bytes of it the layer allocates */
    bool part_data;                /* some of them hold data */

    ScanItem items[SCAN_MAX_ITEMS];
    size_t n_items;
    uint64_t queued_blocks;        /* blocks to hash in items[] */
    RepoExtent ext[SCAN_MAX_ITEMS];
    RepoHash *hashes;              /* SCAN_WINDOW / bsize */

    uint64_t changed;              /* bytes the layer allocates */
    uint64_t hashed;               /* bytes hashed (read) so far */
    uint64_t total;                /* bytes to hash, from the first pass */
} Scan;

static uint64_t block_len(const Scan *sc, uint64_t blk)
{
    return MIN((uint64_t)sc->bsize, sc->size - blk * sc->bsize);
}

/* Hash what the queue holds and hand every item to the sink, in order. */
static bool scan_flush(Scan *sc, Error **errp)
{
    size_t n_ext = 0, k = 0;
    uint64_t bytes = 0;

    if (sc->count_only) {
        for (size_t i = 0; i < sc->n_items; i++) {
            if (!sc->items[i].zero) {
                uint64_t b = sc->items[i].block, n = sc->items[i].count;
                sc->total += (n - 1) * sc->bsize + block_len(sc, b + n - 1);
            }
        }
        sc->n_items = 0;
        sc->queued_blocks = 0;
        return true;
    }
    for (size_t i = 0; i < sc->n_items; i++) {
        const ScanItem *it = &sc->items[i];
        if (!it->zero) {
            uint64_t start = it->block * sc->bsize;
            uint64_t end = MIN((it->block + it->count) * sc->bsize, sc->size);
            sc->ext[n_ext++] = (RepoExtent){ start, end - start };
            bytes += end - start;
        }
    }
    if (n_ext) {
        uint64_t err_off = 0;
        int r = repo_hash_extents(sc->bs, sc->ext, n_ext, sc->bsize,
                                  sc->hashes, sc->threads, sc->progress,
                                  sc->opaque, sc->hashed,
                                  MAX(sc->total, sc->hashed + bytes), &err_off);
        if (r < 0) {
            if (r == -ENOMEM) {
                error_setg(errp, "out of memory");
            } else {
                error_setg_errno(errp, -r, "%s: read error at offset %" PRIu64,
                                 sc->path, err_off);
            }
            return false;
        }
        sc->hashed += bytes;
    }
    for (size_t i = 0; i < sc->n_items; i++) {
        const ScanItem *it = &sc->items[i];
        RepoIndexRecord rec = { .block = it->block, .count = it->count,
                                .zero = true };
        if (it->zero) {
            if (!sc->sink(sc->sink_opaque, &rec, errp)) {
                return false;
            }
            continue;
        }
        for (uint64_t b = 0; b < it->count; b++, k++) {
            rec = (RepoIndexRecord){ .block = sc->hashes[k].cluster,
                                     .count = 1 };
            memcpy(rec.hash, sc->hashes[k].hash, REPO_HASH_LEN);
            if (!sc->sink(sc->sink_opaque, &rec, errp)) {
                return false;
            }
        }
    }
    sc->n_items = 0;
    sc->queued_blocks = 0;
    return true;
}

/* Queue blocks [blk, blk+n) as a zero run or as blocks to hash, merging
 * with the item before when they touch. */
static bool scan_queue(Scan *sc, uint64_t blk, uint64_t n, bool zero,
                       Error **errp)
{
    while (n) {
        uint64_t take = n;
        if (!zero) {
            uint64_t room = SCAN_WINDOW / sc->bsize - sc->queued_blocks;
            take = MIN(n, room);
        }
        ScanItem *last = sc->n_items ? &sc->items[sc->n_items - 1] : NULL;
        if (last && last->zero == zero && last->block + last->count == blk) {
            last->count += take;
        } else {
            if (sc->n_items == SCAN_MAX_ITEMS && !scan_flush(sc, errp)) {
                return false;
            }
            sc->items[sc->n_items++] = (ScanItem){ zero, blk, take };
        }
        if (!zero) {
            sc->queued_blocks += take;
            if (sc->queued_blocks == SCAN_WINDOW / sc->bsize &&
                !scan_flush(sc, errp)) {
                return false;
            }
        }
        blk += take;
        n -= take;
    }
    return true;
}

/* The partly known block is complete: classify it. */
static bool scan_end_partial(Scan *sc, Error **errp)
{
    uint64_t blk = sc->part_blk;
    bool ok = true;

    if (sc->part_alloc) {
        bool zero = !sc->part_data && sc->part_alloc == block_len(sc, blk);
        ok = scan_queue(sc, blk, 1, zero, errp);
    }
    sc->part_alloc = 0;
    sc->part_data = false;
    return ok;
}

/* The layer's status over [s, e): st is 0 (not allocated here), or
 * ALLOCATED with ZERO or DATA. */
static bool scan_run(Scan *sc, uint64_t s, uint64_t e, int st, Error **errp)
{
    bool alloc = st & BDRV_BLOCK_ALLOCATED;
    bool zero = alloc && (st & BDRV_BLOCK_ZERO) && !(st & BDRV_BLOCK_DATA);

    if (alloc) {
        sc->changed += e - s;
    }
    while (s < e) {
        uint64_t blk = s / sc->bsize;
        uint64_t bstart = blk * sc->bsize, bend = bstart + block_len(sc, blk);

        if (s == bstart && e >= bend) {
            /* Whole blocks: the run covers [blk, full). */
            uint64_t full = e == sc->size ? sc->n_blocks : e / sc->bsize;
            if (alloc && !scan_queue(sc, blk, full - blk, zero, errp)) {
                return false;
            }
            s = MIN(full * sc->bsize, sc->size);
            continue;
        }
        uint64_t n = MIN(e, bend) - s;
        sc->part_blk = blk;
        if (alloc) {
            sc->part_alloc += n;
            sc->part_data |= !zero;
        }
        s += n;
        if (s == bend && !scan_end_partial(sc, errp)) {
            return false;
        }
    }
    return true;
}

/* One pass over the layer. */
static bool scan_pass(Scan *sc, Error **errp)
{
    for (uint64_t off = 0; off < sc->size;) {
        uint64_t pnum = 0;
        int st = bdrv_layer_status(sc->bs, off, sc->size - off, &pnum);
        if (st < 0) {
            error_setg_errno(errp, -st, "%s: cannot read the allocation at "
                             "offset %" PRIu64, sc->path, off);
            return false;
        }
        if (pnum == 0) {
            error_setg(errp, "%s: the allocation status at offset %" PRIu64
                       " makes no progress", sc->path, off);
            return false;
        }
        pnum = MIN(pnum, sc->size - off);
        if (!scan_run(sc, off, off + pnum, st, errp)) {
            return false;
        }
        off += pnum;
    }
    return scan_flush(sc, errp);
}

bool repo_scan_layer(BlockDriverState *bs, const char *path, uint64_t size,
                     uint32_t bsize, unsigned threads, RepoRecordSink *sink,
                     void *sink_opaque, RepoProgressFn *progress,
                     void *opaque, uint64_t *ret_changed, uint64_t *ret_read,
                     Error **errp)
{
    _cleanup_free_ Scan *sc = calloc(1, sizeof(*sc));
    int64_t len = bdrv_getlength(bs);

    if (!sc) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "%s: cannot get the image size",
                         path);
        return false;
    }
    if ((uint64_t)len != size) {
        error_setg(errp, "%s: the image is %" PRId64 " bytes, expected %"
                   PRIu64, path, len, size);
        return false;
    }
    *sc = (Scan){
        .bs = bs, .path = path, .size = size, .bsize = bsize,
        .n_blocks = DIV_ROUND_UP(size, bsize), .threads = threads,
        .sink = sink, .sink_opaque = sink_opaque,
    };
    /* The first pass only counts, for an exact progress total. */
    if (progress) {
        sc->count_only = true;
        if (!scan_pass(sc, errp)) {
            return false;
        }
        sc->count_only = false;
        sc->changed = 0;
        sc->progress = progress;
        sc->opaque = opaque;
        progress(opaque, 0, sc->total);
    }
    sc->hashes = calloc(SCAN_WINDOW / bsize, sizeof(*sc->hashes));
    if (!sc->hashes) {
        error_setg(errp, "out of memory");
        return false;
    }
    bool ok = scan_pass(sc, errp);
    free(sc->hashes);
    if (ok) {
        *ret_changed = sc->changed;
        if (ret_read) {
            *ret_read = sc->hashed;
        }
    }
    return ok;
}

static bool index_sink(void *opaque, const RepoIndexRecord *r, Error **errp)
{
    (void)errp;
    repo_index_writer_add(opaque, r);
    return true;
}

uint32_t repo_hash_size_for(Repo *repo, const char *node, unsigned parent_seq,
                            uint64_t image_size)
{
    RepoManifest *p = parent_seq ? repo_lookup(repo, node, parent_seq) : NULL;
    uint32_t h = REPO_MIN_HASH_SIZE;

    if (p) {
        return p->cluster_size;
    }
    while (h < REPO_MAX_HASH_SIZE && DIV_ROUND_UP(image_size, h) > (UINT64_C(1) << 28)) {
        h *= 2;
    }
    return h;
}

bool repo_scan_to_index(Repo *repo, BlockDriverState *bs, const char *path,
                        RepoManifest *m, RepoProgressFn *progress,
                        void *opaque, Error **errp)
{
    int64_t len = bdrv_getlength(bs);

    if (len < 0) {
        error_setg_errno(errp, (int)-len, "%s: cannot get the image size",
                         path);
        return false;
    }
    if (!m->image_size) {
        m->image_size = (uint64_t)len;
    }
    if (!m->cluster_size) {
        m->cluster_size = repo_hash_size_for(repo, m->node, m->parent_seq,
                                             m->image_size);
    }
    RepoIndexWriter *w = repo_index_writer_new(repo, m->node, m->seq,
                                               m->image_size, m->cluster_size,
                                               errp);
    if (!w) {
        return false;
    }
    if (!repo_scan_layer(bs, path, m->image_size, m->cluster_size, 0,
                         index_sink, w, progress, opaque, &m->changed_bytes,
                         NULL, errp)) {
        repo_index_writer_abort(w);
        return false;
    }
    m->version = 2;
    return repo_index_writer_finish(w, m->merkle_root, &m->index_records,
                                    errp);
}

bool repo_scan_backup(Repo *repo, const char *qcow2_path, RepoManifest *m,
                      int flags, RepoProgressFn *progress, void *opaque,
                      Error **errp)
{
    BlockDriverState *bs = repo_open_new(repo, m, qcow2_path, flags, errp);
    bool ok;

    if (!bs) {
        error_prepend(errp, "cannot open backup '%s': ", qcow2_path);
        return false;
    }
    ok = repo_scan_to_index(repo, bs, qcow2_path, m, progress, opaque, errp);
    bdrv_unref(bs);
    return ok;
}
