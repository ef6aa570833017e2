/*
 * The backup job (blockdev-backup / drive-backup): copies the content a
 * source node had when the job was created into a target node, while
 * writers keep writing to the source.
 *
 * backup_job_create() runs inside a drained section, so no write is in
 * flight while it decides which clusters to copy (the copy bitmap) and
 * installs a copy-before-write (CBW) hook on the source.  From then on a
 * guest write to a cluster that still has to be copied first copies the
 * cluster's old data to the target itself, and only then lands.  The job
 * copies everything else with four worker threads, one chunk (up to 1 MiB
 * of contiguous clusters) each, skipping what block status says the target
 * does not need (sync=top: clusters the top layer does not allocate) and
 * writing zero ranges as zeroes with MAY_UNMAP, so the target stays sparse.
 *
 * Cluster states (protected by s->lock; every change broadcasts s->cond):
 *
 *   TO_COPY    bit set in s->copy_bitmap
 *   IN_FLIGHT  bit set in s->in_flight: claimed by a worker or by a CBW
 *              (a guest write, or a fleecing read of the target)
 *   DONE       neither bit: copied, or never to be copied
 *
 *   TO_COPY -> IN_FLIGHT   a worker, a CBW or a sync=none fleecing read
 *                          claims it
 *   IN_FLIGHT -> TO_COPY   a sync=none fleecing read is over (invariant 4)
 *   IN_FLIGHT -> DONE      the copy succeeded, or a CBW copy failed (the
 *                          job then fails, see below)
 *   IN_FLIGHT -> TO_COPY   a worker's copy failed: the run thread decides
 *                          (on-*-error) whether the chunk is retried
 *
 * Invariants:
 *   1. A cluster's old data is copied to the target at most once, except
 *      that a worker retries a chunk after an I/O error.
 *   2. A guest write returns from the CBW hook only when every cluster it
 *      touches is DONE.  If one is TO_COPY the writer claims and copies it
 *      itself; if one is IN_FLIGHT it waits for it.
 *   3. Whoever copies a cluster reads the source while holding the claim,
 *      so no guest write to that cluster can land before the old data is
 *      read (the write is parked in its CBW hook, invariant 2).
 *   4. Fleecing (the target's backing chain contains the source): reads
 *      of the target fall through unallocated clusters to the live source.
 *      With sync=none a read hook on the target claims every TO_COPY
 *      cluster it touches for the length of the read (after waiting for
 *      IN_FLIGHT ones) and gives them back as TO_COPY afterwards, so no
 *      guest write lands on them while the read falls through: each
 *      cluster is written to the target only if the guest overwrites it
 *      (a pull backup reads everything once and copies nothing twice).
 *      With sync=full/top the read copies what it touches first (the job
 *      copies it anyway) and reads it from the target.
 *   5. No claim is held while the job waits for anything outside its own
 *      threads (a pause, an on-error=stop decision, the rate limit): a
 *      guest write never waits for the user or the main loop, so a drain
 *      on the main thread can always finish.
 *
 * Data safety beats the backup: a CBW copy that fails does not fail the
 * guest write (we never lose a write).  The cluster becomes DONE, the
 * point-in-time copy is broken, and the job fails with that error.  With
 * bitmap-mode=always the guest's write is in the successor bitmap, so the
 * next incremental still copies the cluster.
 *
 * Progress is exact: total = bytes of the copy bitmap (for sync=none 0,
 * and each CBW copy adds what it copies to both total and current);
 * current grows by each cluster range as it becomes DONE.
 *
 * Bitmaps (backup.h): a bitmap gets a successor at create time; commit and
 * abort abdicate or reclaim it as QEMU does.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "job/backup.h"
#include "util/cleanup.h"

#define BACKUP_MIN_CLUSTER_SIZE (64u * 1024)
#define BACKUP_CHUNK_SIZE       (1024u * 1024)   /* per request and buffer */
#define BACKUP_WORKERS          4
#define BACKUP_NONE_POLL_NS     (100 * 1000 * 1000)

/* A chunk a worker copies (claimed: its clusters are IN_FLIGHT). */
typedef struct BackupChunk {
    uint64_t offset;
    uint64_t bytes;
    int ret;                        /* result when it failed */
    bool is_read;                   /* the failure was a source read */
    struct BackupChunk *next;
} BackupChunk;

typedef struct BackupJob {
    Job common;                     /* must be first */
    BlockDriverState *source;
    BlockDriverState *target;
    MirrorSyncMode sync;
    BdrvDirtyBitmap *sync_bitmap;   /* has a successor while the job lives */
    BitmapSyncMode bitmap_mode;
    BlockdevOnError on_source_error;
    BlockdevOnError on_target_error;
    uint64_t len;
    uint64_t cluster_size;
    uint64_t buf_size;              /* per copy buffer: >= one cluster */
    int write_flags;                /* data writes to the target */
    bool started;                   /* run() was entered */
    bool refs_taken;
    BdrvIoHook write_hook;          /* on source: copy-before-write */
    BdrvIoHook read_hook;           /* on target: fleecing */
    bool write_hook_installed;
    bool read_hook_installed;

    pthread_mutex_t lock;
    pthread_cond_t cond;
    /* (lock) */
    HBitmap *copy_bitmap;           /* TO_COPY */
    HBitmap *in_flight;             /* IN_FLIGHT */
    bool stopped;                   /* run() gave up: CBW becomes a no-op */
    int cbw_ret;                    /* first CBW failure, 0 if none */
    BackupChunk *queue;             /* claimed, waiting for a worker */
    BackupChunk **queue_tail;
    BackupChunk *failed;            /* released after an error */
    int active;                     /* chunks queued or being copied */
    bool workers_quit;
} BackupJob;

static const JobDriver backup_job_driver;

static inline BackupJob *to_backup(Job *job)
{
    return (BackupJob *)job;
}

static uint64_t clip_len(BackupJob *s, uint64_t offset, uint64_t bytes)
{
    return offset >= s->len ? 0 : MIN(bytes, s->len - offset);
}

/* ---- copying ---- */

/* With compression (whole clusters only), the range of pnum bytes at a
 * cluster-aligned offset, of which `want` bytes are wanted: a range not
 * copied as data (zero or, for sync=top, skipped) keeps only its
 * cluster-aligned part, and without one the rest of the cluster is copied
 * as data; a data range runs on to the end of its last cluster (`want`
 * ends at a cluster boundary or at the image end).  Returns whether the
 * range is copied as data. */
static bool compress_align(uint64_t cluster_size, uint64_t want, bool as_data,
                           uint64_t *pnum)
{
    if (!as_data && *pnum >= cluster_size) {
        *pnum = ROUND_DOWN(*pnum, cluster_size);
        return false;
    }
    *pnum = MIN(ROUND_UP(*pnum, cluster_size), want);
    return true;
}

/* Copy [offset, offset+bytes) from source to target using block status:
 * ranges the top layer does not allocate are skipped for sync=top, zero
 * ranges become zero writes.  buf holds s->buf_size bytes.  Returns
 * 0 or -errno with *ret_is_read telling which side failed.  Runs in a
 * worker or in a CBW (a guest request's thread): the I/O is nested or
 * internal, so it never waits for a drained section. */
static int backup_copy_range(BackupJob *s, uint64_t offset, uint64_t bytes,
                             uint8_t *buf, bool *ret_is_read)
{
    uint64_t end = offset + bytes;
    while (offset < end) {
        uint64_t pnum = 0;
        uint64_t want = MIN(end - offset, s->buf_size);
        int st = bdrv_block_status(s->source, offset, want, &pnum);
        if (st < 0 || pnum == 0) {
            st = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;  /* just copy */
            pnum = want;
        }
        pnum = MIN(pnum, want);
        bool skip = s->sync == MIRROR_SYNC_MODE_TOP &&
                    !(st & BDRV_BLOCK_ALLOCATED);
        bool as_data = !skip && !(st & BDRV_BLOCK_ZERO);
        if (s->write_flags & BDRV_REQ_WRITE_COMPRESSED) {
            as_data = compress_align(s->cluster_size, want, as_data, &pnum);
        }
        int r;
        if (as_data) {
            r = bdrv_pread(s->source, offset, buf, pnum);
            if (r < 0) {
                *ret_is_read = true;
                return r;
            }
            r = bdrv_pwrite(s->target, offset, buf, pnum, s->write_flags);
            if (r < 0) {
                *ret_is_read = false;
                return r;
            }
        } else if (!skip) {
            /* the backing layers are not part of a top backup */
            r = bdrv_pwrite_zeroes(s->target, offset, pnum, BDRV_REQ_MAY_UNMAP);
            if (r < 0) {
                *ret_is_read = false;
                return r;
            }
        }
        offset += pnum;
    }
    return 0;
}

/* The copy bitmap of sync=full or top: everything, except that when the
 * target reads as zeroes throughout (a new image without backing: the
 * usual backup target) the ranges that need no copy are left out -- for
 * full the ones the source reads as zeroes, for top also the ones its top
 * layer does not allocate.  Walked in the drivers' biggest block status
 * steps, inside the job's drained section, so a sparse disk costs what
 * its allocated extents cost, not its virtual size, and the bitmap's
 * untouched pages are never written (a 64 TiB disk: 128 MiB of bits at
 * 64 KiB clusters, of which only the allocated data's are touched). */
static void backup_init_copy_bitmap(BlockDriverState *source,
                                    BlockDriverState *target,
                                    MirrorSyncMode sync, uint64_t len,
                                    HBitmap *copy)
{
    uint64_t pnum = 0;
    int st = bdrv_block_status(target, 0, len, &pnum);

    if (st < 0 || !(st & BDRV_BLOCK_ZERO) || pnum < len) {
        hbitmap_set_all(copy);
        return;
    }
    for (uint64_t off = 0; off < len;) {
        st = sync == MIRROR_SYNC_MODE_TOP
            ? bdrv_layer_status(source, off, len - off, &pnum)
            : bdrv_block_status(source, off, len - off, &pnum);
        if (st < 0 || pnum == 0) {
            hbitmap_set(copy, off, len - off);   /* unknown: copy it */
            return;
        }
        pnum = MIN(pnum, len - off);
        bool skip = (st & BDRV_BLOCK_ZERO) ||
                    (sync == MIRROR_SYNC_MODE_TOP &&
                     !(st & BDRV_BLOCK_ALLOCATED));
        if (!skip) {
            hbitmap_set(copy, off, pnum);
        }
        off += pnum;
    }
}

/* Claim the first TO_COPY area in [from, from+bytes), at most max_bytes. */
static bool claim_next_locked(BackupJob *s, uint64_t from, uint64_t bytes,
                              uint64_t max_bytes, uint64_t *ret_offset,
                              uint64_t *ret_bytes)
{
    if (!hbitmap_next_dirty_area(s->copy_bitmap, from, bytes, max_bytes,
                                 ret_offset, ret_bytes)) {
        return false;
    }
    hbitmap_reset(s->copy_bitmap, *ret_offset, *ret_bytes);
    hbitmap_set(s->in_flight, *ret_offset, *ret_bytes);
    return true;
}

/* The clusters [*pos, *end) that [offset, offset+bytes) touches, clipped
 * to the source's length; false when none. */
static bool cluster_span(BackupJob *s, uint64_t offset, uint64_t bytes,
                         uint64_t *pos, uint64_t *end)
{
    bytes = clip_len(s, offset, bytes);
    if (bytes == 0) {
        return false;
    }
    *pos = ROUND_DOWN(offset, s->cluster_size);
    *end = MIN(ROUND_UP(offset + bytes, s->cluster_size), s->len);
    return true;
}

/* Copy-before-write for [offset, offset+bytes): on return every cluster it
 * touches is DONE (invariant 2).  Used by the source's write hook and the
 * target's fleecing read hook.  Never fails: a copy error breaks the job,
 * not the caller's request. */
static void backup_cbw(BackupJob *s, uint64_t offset, uint64_t bytes)
{
    uint64_t pos, end;
    if (!cluster_span(s, offset, bytes, &pos, &end)) {
        return;
    }
    _cleanup_free_ uint8_t *buf = NULL;

    pthread_mutex_lock(&s->lock);
    while (pos < end && !s->stopped) {
        /* Wait until nobody holds a cluster of the rest of the range;
         * we hold no claim while we wait (no deadlock). */
        if (hbitmap_next_dirty(s->in_flight, pos, end - pos) >= 0) {
            pthread_cond_wait(&s->cond, &s->lock);
            continue;
        }
        uint64_t o, n;
        if (!claim_next_locked(s, pos, end - pos, 0, &o, &n)) {
            break;          /* the rest is DONE or never to be copied */
        }
        pthread_mutex_unlock(&s->lock);

        int r = -ENOMEM;
        bool is_read = false;
        if (!buf) {
            buf = malloc(s->buf_size);
        }
        if (buf) {
            r = backup_copy_range(s, o, n, buf, &is_read);
        }
        if (s->sync == MIRROR_SYNC_MODE_NONE) {
            job_progress_add_total(&s->common, n);
        }
        job_progress_update(&s->common, n);

        pthread_mutex_lock(&s->lock);
        hbitmap_reset(s->in_flight, o, n);
        if (r < 0 && s->cbw_ret == 0) {
            s->cbw_ret = r;
        }
        pthread_cond_broadcast(&s->cond);
        pos = o + n;
    }
    pthread_mutex_unlock(&s->lock);
}

static int backup_before_write(BdrvIoHook *hook, BlockDriverState *bs,
                               uint64_t offset, uint64_t bytes)
{
    (void)bs;
    backup_cbw(hook->opaque, offset, bytes);
    return 0;
}

/* Fleecing read, sync=full/top: the job copies every cluster anyway, so a
 * read copies what it touches first (the copy is not extra work) and then
 * reads it from the target. */
static int backup_before_fleecing_read(BdrvIoHook *hook, BlockDriverState *bs,
                                       uint64_t offset, uint64_t bytes)
{
    (void)bs;
    backup_cbw(hook->opaque, offset, bytes);
    return 0;
}

/* Fleecing read, sync=none (invariant 4): no copy.  The read claims the
 * TO_COPY clusters it touches (TO_COPY -> IN_FLIGHT, after waiting for
 * every IN_FLIGHT one in its range), so a guest write to them waits in its
 * CBW hook until the read is over; the read then falls through to the
 * live source, which still holds the frozen data.  The after-read hook
 * gives them back (IN_FLIGHT -> TO_COPY).  The clusters IN_FLIGHT in the
 * range at release are exactly this read's: anyone else waits for them
 * first, and no worker claims clusters with sync=none. */
static int backup_before_fleecing_read_claim(BdrvIoHook *hook,
                                             BlockDriverState *bs,
                                             uint64_t offset, uint64_t bytes)
{
    BackupJob *s = hook->opaque;
    (void)bs;
    uint64_t pos, end;
    if (!cluster_span(s, offset, bytes, &pos, &end)) {
        return 0;
    }

    pthread_mutex_lock(&s->lock);
    while (!s->stopped && hbitmap_next_dirty(s->in_flight, pos, end - pos) >= 0) {
        pthread_cond_wait(&s->cond, &s->lock);
    }
    uint64_t o, n;
    while (!s->stopped && pos < end &&
           claim_next_locked(s, pos, end - pos, 0, &o, &n)) {
        pos = o + n;
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static void backup_after_fleecing_read_claim(BdrvIoHook *hook,
                                             BlockDriverState *bs,
                                             uint64_t offset, uint64_t bytes)
{
    BackupJob *s = hook->opaque;
    (void)bs;
    uint64_t pos, end;
    if (!cluster_span(s, offset, bytes, &pos, &end)) {
        return;
    }
    uint64_t o, n;

    pthread_mutex_lock(&s->lock);
    while (pos < end &&
           hbitmap_next_dirty_area(s->in_flight, pos, end - pos, 0, &o, &n)) {
        hbitmap_reset(s->in_flight, o, n);
        if (!s->stopped) {
            hbitmap_set(s->copy_bitmap, o, n);
        }
        pos = o + n;
    }
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

/* ---- worker threads ---- */

static void *backup_worker(void *opaque)
{
    BackupJob *s = opaque;
    uint8_t *buf = malloc(s->buf_size);

    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->queue && !s->workers_quit) {
            pthread_cond_wait(&s->cond, &s->lock);
        }
        if (s->workers_quit) {
            break;
        }
        BackupChunk *c = s->queue;
        s->queue = c->next;
        if (!s->queue) {
            s->queue_tail = &s->queue;
        }
        c->next = NULL;
        pthread_mutex_unlock(&s->lock);

        bool is_read = false;
        int r = buf ? backup_copy_range(s, c->offset, c->bytes, buf, &is_read)
                    : -ENOMEM;
        if (r == 0) {
            job_progress_update(&s->common, c->bytes);
        }

        pthread_mutex_lock(&s->lock);
        hbitmap_reset(s->in_flight, c->offset, c->bytes);
        if (r == 0) {
            free(c);
        } else {
            /* Back to TO_COPY: a guest write may copy it meanwhile
             * (invariant 5); the run thread decides about a retry. */
            hbitmap_set(s->copy_bitmap, c->offset, c->bytes);
            c->ret = r;
            c->is_read = is_read;
            c->next = s->failed;
            s->failed = c;
        }
        s->active--;
        pthread_cond_broadcast(&s->cond);
    }
    pthread_mutex_unlock(&s->lock);
    free(buf);
    return NULL;
}

/* Release chunks that were claimed but not copied (main loop stopping). */
static void release_queue_locked(BackupJob *s)
{
    while (s->queue) {
        BackupChunk *c = s->queue;
        s->queue = c->next;
        hbitmap_reset(s->in_flight, c->offset, c->bytes);
        hbitmap_set(s->copy_bitmap, c->offset, c->bytes);
        s->active--;
        free(c);
    }
    s->queue_tail = &s->queue;
    pthread_cond_broadcast(&s->cond);
}

/* The copy loop of the run thread: hands chunks to the workers, applies
 * the rate limit, pause points and the error policy.  Returns 0, -ECANCELED
 * or the -errno of a reported error. */
static int backup_loop(BackupJob *s)
{
    Job *job = &s->common;
    pthread_t threads[BACKUP_WORKERS];
    int nthreads = 0;
    int ret = 0;

    for (int i = 0; i < BACKUP_WORKERS; i++) {
        if (pthread_create(&threads[i], NULL, backup_worker, s) != 0) {
            break;
        }
        nthreads++;
    }
    if (nthreads == 0) {
        return -EAGAIN;
    }

    uint64_t cursor = 0;
    uint64_t max_chunk = MAX((uint64_t)BACKUP_CHUNK_SIZE, s->cluster_size);
    for (;;) {
        job_pause_point(job);
        if (job_is_cancelled(job)) {
            ret = -ECANCELED;
            break;
        }
        pthread_mutex_lock(&s->lock);
        if (s->failed) {
            BackupChunk *c = s->failed;
            s->failed = c->next;
            pthread_mutex_unlock(&s->lock);
            BlockdevOnError pol = c->is_read ? s->on_source_error
                                             : s->on_target_error;
            JobErrorAction act = job_error_action(job, pol, c->is_read, c->ret);
            if (act == JOB_ERROR_ACTION_REPORT) {
                ret = c->ret;
                free(c);
                break;
            }
            cursor = MIN(cursor, c->offset);     /* retry from there */
            free(c);
            continue;
        }
        if (s->cbw_ret < 0) {
            ret = s->cbw_ret;
            pthread_mutex_unlock(&s->lock);
            break;
        }
        if (s->active >= nthreads) {
            pthread_cond_wait(&s->cond, &s->lock);
            pthread_mutex_unlock(&s->lock);
            continue;
        }
        uint64_t o, n;
        if (!claim_next_locked(s, cursor, s->len - cursor, max_chunk, &o, &n)) {
            if (s->active == 0) {
                pthread_mutex_unlock(&s->lock);
                break;                      /* everything handed out is done */
            }
            pthread_cond_wait(&s->cond, &s->lock);
            pthread_mutex_unlock(&s->lock);
            continue;
        }
        BackupChunk *c = calloc(1, sizeof(*c));
        if (!c) {
            hbitmap_reset(s->in_flight, o, n);
            hbitmap_set(s->copy_bitmap, o, n);
            pthread_cond_broadcast(&s->cond);
            pthread_mutex_unlock(&s->lock);
            ret = -ENOMEM;
            break;
        }
        c->offset = o;
        c->bytes = n;
        *s->queue_tail = c;
        s->queue_tail = &c->next;
        s->active++;
        cursor = o + n;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->lock);
        job_rate_limit(job, n);
    }

    /* Stop: unclaim what no worker took, let the others finish. */
    pthread_mutex_lock(&s->lock);
    release_queue_locked(s);
    while (s->active > 0) {
        pthread_cond_wait(&s->cond, &s->lock);
    }
    s->workers_quit = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < nthreads; i++) {
        pthread_join(threads[i], NULL);
    }
    /* Late failures: only matter when we would otherwise succeed. */
    pthread_mutex_lock(&s->lock);
    while (s->failed) {
        BackupChunk *c = s->failed;
        s->failed = c->next;
        if (ret == 0) {
            ret = c->ret;
        }
        free(c);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int backup_run(Job *job, Error **errp)
{
    BackupJob *s = to_backup(job);
    int ret = 0;

    s->started = true;
    if (s->sync == MIRROR_SYNC_MODE_NONE) {
        /* Only copy-before-write copies: run until cancelled (its normal
         * end, reported as BLOCK_JOB_CANCELLED as QEMU does) or until a
         * CBW copy failed. */
        for (;;) {
            job_pause_point(job);
            if (job_is_cancelled(job)) {
                ret = -ECANCELED;
                break;
            }
            pthread_mutex_lock(&s->lock);
            ret = s->cbw_ret;
            pthread_mutex_unlock(&s->lock);
            if (ret < 0) {
                break;
            }
            job_sleep_ns(job, BACKUP_NONE_POLL_NS);
        }
    } else {
        ret = backup_loop(s);
    }

    pthread_mutex_lock(&s->lock);
    if (ret == 0) {
        /* Guest writes may still be copying clusters they claimed. */
        while (!hbitmap_is_empty(s->in_flight)) {
            pthread_cond_wait(&s->cond, &s->lock);
        }
        ret = s->cbw_ret;
    } else {
        /* The copy is abandoned: later writes need not copy anything. */
        s->stopped = true;
        pthread_cond_broadcast(&s->cond);
    }
    pthread_mutex_unlock(&s->lock);

    if (ret == 0) {
        ret = bdrv_flush(s->target);
    }
    if (ret < 0 && ret != -ECANCELED) {
        /* QEMU puts just the error text in BLOCK_JOB_COMPLETED "error". */
        error_setg(errp, "%s", strerror(-ret));
    }
    return ret;
}

/* ---- finishing (main thread) ---- */

/* The not-yet-copied clusters at the bitmap's granularity. */
static HBitmap *uncopied_bits(BackupJob *s)
{
    HBitmap *bits = hbitmap_new(bdrv_dirty_bitmap_size(s->sync_bitmap),
                                (unsigned)__builtin_ctz(s->sync_bitmap->granularity));
    if (!bits) {
        return NULL;
    }
    pthread_mutex_lock(&s->lock);
    uint64_t pos = 0, o, n;
    while (pos < s->len &&
           hbitmap_next_dirty_area(s->copy_bitmap, pos, s->len - pos, 0, &o, &n)) {
        hbitmap_set(bits, o, n);
        pos = o + n;
    }
    pos = 0;
    while (pos < s->len &&
           hbitmap_next_dirty_area(s->in_flight, pos, s->len - pos, 0, &o, &n)) {
        hbitmap_set(bits, o, n);
        pos = o + n;
    }
    pthread_mutex_unlock(&s->lock);
    return bits;
}

static void backup_commit(Job *job)
{
    BackupJob *s = to_backup(job);
    if (!s->sync_bitmap) {
        return;
    }
    if (s->bitmap_mode == BITMAP_SYNC_MODE_NEVER) {
        bdrv_dirty_bitmap_reclaim(s->sync_bitmap);
    } else {
        bdrv_dirty_bitmap_abdicate(s->sync_bitmap);
    }
}

static void backup_abort(Job *job)
{
    BackupJob *s = to_backup(job);
    if (!s->sync_bitmap) {
        return;
    }
    if (s->bitmap_mode == BITMAP_SYNC_MODE_ALWAYS && s->started) {
        /* Keep what was copied out of the bitmap, but every cluster
         * that was not copied goes back in. */
        HBitmap *bits = uncopied_bits(s);
        if (!bits) {
            bdrv_dirty_bitmap_reclaim(s->sync_bitmap);  /* lose no bit */
            return;
        }
        bdrv_dirty_bitmap_abdicate(s->sync_bitmap);
        bdrv_dirty_bitmap_merge_bits(s->sync_bitmap, bits);
        hbitmap_free(bits);
    } else {
        bdrv_dirty_bitmap_reclaim(s->sync_bitmap);
    }
}

static void backup_clean(Job *job)
{
    BackupJob *s = to_backup(job);
    if (!s->refs_taken) {
        return;
    }
    bdrv_drain_all_begin();
    if (s->write_hook_installed) {
        bdrv_remove_io_hook(s->source, &s->write_hook);
        s->write_hook_installed = false;
    }
    if (s->read_hook_installed) {
        bdrv_remove_io_hook(s->target, &s->read_hook);
        s->read_hook_installed = false;
    }
    s->source->job_blocker = NULL;
    s->target->job_blocker = NULL;
    bdrv_drain_all_end();
    bdrv_unref(s->source);
    bdrv_unref(s->target);
    s->refs_taken = false;
}

static void backup_free(Job *job)
{
    BackupJob *s = to_backup(job);
    hbitmap_free(s->copy_bitmap);
    hbitmap_free(s->in_flight);
    while (s->failed) {
        BackupChunk *c = s->failed;
        s->failed = c->next;
        free(c);
    }
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
}

static const JobDriver backup_job_driver = {
    .type = "backup",
    .instance_size = sizeof(BackupJob),
    .run = backup_run,
    .commit = backup_commit,
    .abort = backup_abort,
    .clean = backup_clean,
    .free = backup_free,
};

/* ---- creation ---- */

static const char *sync_mode_name(MirrorSyncMode m)
{
    switch (m) {
    case MIRROR_SYNC_MODE_TOP: return "top";
    case MIRROR_SYNC_MODE_FULL: return "full";
    case MIRROR_SYNC_MODE_NONE: return "none";
    case MIRROR_SYNC_MODE_INCREMENTAL: return "incremental";
    case MIRROR_SYNC_MODE_BITMAP: return "bitmap";
    }
    return "?";
}

bool backup_check_not_busy(BlockDriverState *bs, Error **errp)
{
    if (bs->job_blocker) {
        error_setg(errp, "Node '%s' is busy: block device is in use by block "
                   "job: backup", bs->node_name);
        return false;
    }
    return true;
}

Job *backup_job_create(const char *job_id, BlockDriverState *source,
                       BlockDriverState *target, const BackupOptions *opts,
                       JobTxn *txn, Error **errp)
{
    BdrvDirtyBitmap *bm = opts->bitmap;

    if (source == target) {
        error_setg(errp, "Source and target cannot be the same");
        return NULL;
    }
    uint64_t target_cluster = bdrv_get_cluster_size(target);
    if (opts->compress && (!target->drv->supports_compressed_writes ||
                           !target_cluster)) {
        error_setg(errp, "Compression is not supported for this drive %s",
                   target->node_name);
        return NULL;
    }
    if (target->read_only) {
        error_setg(errp, "Block node is read-only");
        return NULL;
    }
    if (!backup_check_not_busy(source, errp) ||
        !backup_check_not_busy(target, errp)) {
        return NULL;
    }
    int64_t len = bdrv_getlength(source);
    int64_t target_len = bdrv_getlength(target);
    if (len < 0 || target_len < 0) {
        error_setg(errp, "Cannot get the length of the source or target");
        return NULL;
    }
    if (len != target_len) {
        error_setg(errp, "Source and target image have different sizes");
        return NULL;
    }
    if ((opts->sync == MIRROR_SYNC_MODE_INCREMENTAL ||
         opts->sync == MIRROR_SYNC_MODE_BITMAP) && !bm) {
        error_setg(errp, "must provide a valid bitmap name for '%s' sync mode",
                   sync_mode_name(opts->sync));
        return NULL;
    }
    if (bm && opts->sync == MIRROR_SYNC_MODE_NONE) {
        error_setg(errp, "sync mode 'none' does not produce meaningful bitmap "
                   "outputs");
        return NULL;
    }
    if (bm) {
        unsigned flags = BDRV_BITMAP_DEFAULT;
        if (opts->bitmap_mode == BITMAP_SYNC_MODE_NEVER) {
            flags |= BDRV_BITMAP_ALLOW_RO;   /* it is only read */
        }
        if (!bdrv_dirty_bitmap_check(bm, flags, errp)) {
            return NULL;
        }
        if (bdrv_dirty_bitmap_size(bm) != (uint64_t)len) {
            error_setg(errp, "Bitmap '%s' covers %" PRIu64 " bytes but the "
                       "source has %" PRId64, bm->name,
                       bdrv_dirty_bitmap_size(bm), len);
            return NULL;
        }
    }

    /* The copy unit: 64 KiB for full and top; with a bitmap, its
     * granularity, but never below the target's cluster (no partial
     * target cluster is written, so no copy-on-write from the target's
     * backing): a 4 KiB bitmap into a 4 KiB-cluster target copies what
     * changed, not 64 KiB per write. */
    uint64_t cluster_size = BACKUP_MIN_CLUSTER_SIZE;
    if (bm) {
        cluster_size = MAX((uint64_t)bm->granularity,
                           target_cluster ? target_cluster : 512);
    }
    if (opts->compress && target_cluster > cluster_size) {
        cluster_size = target_cluster;   /* both powers of two */
    }
    unsigned shift = (unsigned)__builtin_ctzll(cluster_size);
    HBitmap *copy = hbitmap_new((uint64_t)len, shift);
    HBitmap *in_flight = hbitmap_new((uint64_t)len, shift);
    if (!copy || !in_flight) {
        hbitmap_free(copy);
        hbitmap_free(in_flight);
        error_setg(errp, "Cannot allocate the copy bitmap");
        return NULL;
    }

    /* The point in time: nothing is in flight (we are drained), so the
     * bitmap's bits and the successor split exactly here. */
    if (bm) {
        if (!bdrv_dirty_bitmap_create_successor(bm, errp)) {
            hbitmap_free(copy);
            hbitmap_free(in_flight);
            return NULL;
        }
    }
    if (opts->sync == MIRROR_SYNC_MODE_INCREMENTAL ||
        opts->sync == MIRROR_SYNC_MODE_BITMAP) {
        HBitmap *bits = bdrv_dirty_bitmap_copy_bits(bm);
        if (!bits) {
            bdrv_dirty_bitmap_reclaim(bm);
            hbitmap_free(copy);
            hbitmap_free(in_flight);
            error_setg(errp, "Cannot copy bitmap '%s'", bm->name);
            return NULL;
        }
        /* Translate to cluster granularity (>= the bitmap's). */
        uint64_t pos = 0, o, n;
        while (pos < (uint64_t)len &&
               hbitmap_next_dirty_area(bits, pos, (uint64_t)len - pos, 0, &o, &n)) {
            hbitmap_set(copy, o, n);
            pos = o + n;
        }
        hbitmap_free(bits);
    } else {
        backup_init_copy_bitmap(source, target, opts->sync, (uint64_t)len,
                                copy);
    }

    Job *job = job_create(&backup_job_driver, job_id, source->node_name, txn,
                          opts->auto_finalize, opts->auto_dismiss, opts->speed,
                          errp);
    if (!job) {
        if (bm) {
            bdrv_dirty_bitmap_reclaim(bm);
        }
        hbitmap_free(copy);
        hbitmap_free(in_flight);
        return NULL;
    }

    BackupJob *s = to_backup(job);
    s->source = source;
    s->target = target;
    s->sync = opts->sync;
    s->sync_bitmap = bm;
    s->bitmap_mode = opts->bitmap_mode;
    s->on_source_error = opts->on_source_error;
    s->on_target_error = opts->on_target_error;
    s->len = (uint64_t)len;
    s->cluster_size = cluster_size;
    s->buf_size = MAX((uint64_t)BACKUP_CHUNK_SIZE, cluster_size);
    s->write_flags = opts->compress
        ? BDRV_REQ_WRITE_COMPRESSED | BDRV_REQ_COMPRESS_LEVEL(opts->compress_level)
        : 0;
    s->copy_bitmap = copy;
    s->in_flight = in_flight;
    s->queue_tail = &s->queue;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);

    job_progress_set_total(job, opts->sync == MIRROR_SYNC_MODE_NONE
                                ? 0 : hbitmap_count_bytes(copy));
    if (opts->sync == MIRROR_SYNC_MODE_FULL ||
        opts->sync == MIRROR_SYNC_MODE_TOP) {
        /* As QEMU: the whole image, what needs no copy already done. */
        uint64_t copy_bytes = hbitmap_count_bytes(copy);
        job_progress_set_total(job, (uint64_t)len);
        job_progress_update(job, (uint64_t)len - copy_bytes);
    }

    bdrv_ref(source);
    bdrv_ref(target);
    s->refs_taken = true;
    source->job_blocker = job->id;
    target->job_blocker = job->id;

    s->write_hook = (BdrvIoHook) {
        .before_write = backup_before_write,
        .opaque = s,
    };
    bdrv_add_io_hook(source, &s->write_hook);
    s->write_hook_installed = true;
    if (bdrv_chain_contains(target, source)) {
        /* Fleecing: reads of the target fall through to the live source. */
        s->read_hook = s->sync == MIRROR_SYNC_MODE_NONE
            ? (BdrvIoHook) {
                .before_read = backup_before_fleecing_read_claim,
                .after_read = backup_after_fleecing_read_claim,
                .opaque = s,
            }
            : (BdrvIoHook) {
                .before_read = backup_before_fleecing_read,
                .opaque = s,
            };
        bdrv_add_io_hook(target, &s->read_hook);
        s->read_hook_installed = true;
    }
    return job;
}
