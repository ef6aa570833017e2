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

#include <openssl/sha.h>
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

void repo_merkle_root(const RepoHash *hashes, size_t n,
                      uint8_t out[REPO_ROOT_LEN])
{
    if (n == 0) {
        SHA256((const unsigned char *)"", 0, out);
        return;
    }
    uint8_t *level = malloc(n * REPO_ROOT_LEN);
    if (!level) {
        abort();
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t leaf[8 + REPO_HASH_LEN];
        for (int b = 0; b < 8; b++) {
            leaf[b] = (uint8_t)(hashes[i].cluster >> (8 * b));
        }
        memcpy(leaf + 8, hashes[i].hash, REPO_HASH_LEN);
        SHA256(leaf, sizeof(leaf), level + i * REPO_ROOT_LEN);
    }
    /* Pair neighbours in place; an odd last node moves up unchanged. */
    while (n > 1) {
        size_t m = 0;
        for (size_t i = 0; i + 1 < n; i += 2, m++) {
            SHA256(level + i * REPO_ROOT_LEN, 2 * REPO_ROOT_LEN,
                   level + m * REPO_ROOT_LEN);
        }
        if (n & 1) {
            memmove(level + m * REPO_ROOT_LEN, level + (n - 1) * REPO_ROOT_LEN,
                    REPO_ROOT_LEN);
            m++;
        }
        n = m;
    }
    memcpy(out, level, REPO_ROOT_LEN);
    free(level);
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
    p->cur_hash += DIV_ROUND_UP(*ret_len, REPO_CLUSTER_SIZE);
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
    for (uint64_t c = 0; c < len; c += REPO_CLUSTER_SIZE) {
        RepoHash *h = &p->out[first++];
        h->cluster = (off + c) / REPO_CLUSTER_SIZE;
        repo_hash_cluster(buf + c, MIN(REPO_CLUSTER_SIZE, len - c), h->hash);
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
                      size_t n_ext, RepoHash *out, unsigned threads,
                      RepoProgressFn *progress, void *opaque, uint64_t base,
                      uint64_t total, uint64_t *ret_err_offset)
{
    HashPool p = {
        .bs = bs, .ext = ext, .n_ext = n_ext, .out = out,
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

/* ---- Scanning a backup file ---- */

static bool extents_append(RepoExtent **ext, size_t *n, size_t *cap,
                           uint64_t start, uint64_t end)
{
    if (*n && start <= (*ext)[*n - 1].start + (*ext)[*n - 1].length) {
        RepoExtent *last = &(*ext)[*n - 1];
        last->length = MAX(last->start + last->length, end) - last->start;
        return true;
    }
    if (*n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 16;
        RepoExtent *ne = realloc(*ext, ncap * sizeof(*ne));
        if (!ne) {
            return false;
        }
        *ext = ne;
        *cap = ncap;
    }
    (*ext)[(*n)++] = (RepoExtent){ .start = start, .length = end - start };
    return true;
}

bool repo_scan_backup(Repo *repo, const char *qcow2_path, RepoManifest *m,
                      RepoProgressFn *progress, void *opaque, Error **errp)
{
    BlockDriverState *bs = repo_open_new(repo, m, qcow2_path, 0, errp);
    bool ok;

    if (!bs) {
        error_prepend(errp, "cannot open backup '%s': ", qcow2_path);
        return false;
    }
    ok = repo_scan_node(bs, qcow2_path, m, 0, progress, opaque, errp);
    bdrv_unref(bs);
    return ok;
}

bool repo_scan_node(BlockDriverState *bs, const char *qcow2_path,
                    RepoManifest *m, unsigned threads, RepoProgressFn *progress,
                    void *opaque, Error **errp)
{
    _cleanup_free_ RepoExtent *ext = NULL;
    _cleanup_free_ RepoHash *hashes = NULL;
    size_t n_ext = 0, cap = 0, n_hashes = 0;
    uint64_t total = 0;
    int64_t len = bdrv_getlength(bs);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "%s: cannot get the image size",
                         qcow2_path);
        return false;
    }
    uint64_t size = (uint64_t)len;
    if (m->image_size && m->image_size != size) {
        error_setg(errp, "%s: the image is %" PRIu64 " bytes, expected %" PRIu64,
                   qcow2_path, size, m->image_size);
        return false;
    }

    /* 1. The clusters allocated in this layer, as merged extents. */
    for (uint64_t off = 0; off < size;) {
        uint64_t pnum = 0;
        int r = bdrv_is_allocated(bs, off, size - off, &pnum);
        if (r < 0) {
            error_setg_errno(errp, -r, "%s: cannot read the allocation at "
                             "offset %" PRIu64, qcow2_path, off);
            return false;
        }
        if (pnum == 0) {
            error_setg(errp, "%s: the allocation status at offset %" PRIu64
                       " makes no progress", qcow2_path, off);
            return false;
        }
        if (r) {
            uint64_t s = ROUND_DOWN(off, REPO_CLUSTER_SIZE);
            uint64_t e = MIN(ROUND_UP(off + pnum, REPO_CLUSTER_SIZE), size);
            if (!extents_append(&ext, &n_ext, &cap, s, e)) {
                error_setg(errp, "out of memory");
                return false;
            }
        }
        off += pnum;
    }
    uint64_t n_clusters = 0;
    for (size_t i = 0; i < n_ext; i++) {
        total += ext[i].length;
        n_clusters += DIV_ROUND_UP(ext[i].length, REPO_CLUSTER_SIZE);
    }
    hashes = calloc(n_clusters ? n_clusters : 1, sizeof(*hashes));
    if (!hashes) {
        error_setg(errp, "out of memory");
        return false;
    }

    /* 2. Read them through the chain in big batches and hash each cluster,
     *    on a pool of threads. */
    if (progress) {
        progress(opaque, 0, total);
    }
    uint64_t err_off = 0;
    int r = repo_hash_extents(bs, ext, n_ext, hashes, threads, progress,
                              opaque, 0, total, &err_off);
    if (r < 0) {
        if (r == -ENOMEM) {
            error_setg(errp, "out of memory");
        } else {
            error_setg_errno(errp, -r, "%s: read error at offset %" PRIu64,
                             qcow2_path, err_off);
        }
        return false;
    }
    n_hashes = (size_t)n_clusters;

    free(m->extents);
    free(m->hashes);
    m->extents = steal_pointer(&ext);
    m->n_extents = n_ext;
    m->hashes = steal_pointer(&hashes);
    m->n_hashes = n_hashes;
    m->image_size = size;
    m->cluster_size = REPO_CLUSTER_SIZE;
    m->changed_bytes = total;
    repo_merkle_root(m->hashes, m->n_hashes, m->merkle_root);
    return true;
}

