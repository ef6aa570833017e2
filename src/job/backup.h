/*
 * The backup job: copies a point-in-time view of a source node into a
 * target node while writers keep writing to the source (QEMU's backup job
 * with its copy-before-write filter).
 *
 * Point in time (DESIGN.md D3): backup_job_create() must be called
 * inside a drained section (bdrv_drain_all_begin).  It fixes the set of
 * clusters to copy and installs a copy-before-write hook on the source;
 * from then on a write to a cluster that has not been copied yet first
 * copies the old data to the target.  The job copies the rest in its
 * thread, several requests in parallel, skipping what block status says
 * is unallocated (sync=top) or zero (written as zeroes, so the target
 * stays sparse).
 *
 * sync modes: full (the whole image), top (what the top layer allocates),
 * none (only copy-before-write data; the job runs until cancelled -- image
 * fleecing), incremental and bitmap (the bitmap's dirty clusters).
 *
 * Bitmaps: with a bitmap, the job freezes it with a successor bitmap
 * (dirty-bitmap.h) and, when it ends, as QEMU does:
 *   on-success  success: abdicate (the bitmap keeps only writes made
 *               since the job started); failure/cancel: reclaim
 *   never       always reclaim (the bitmap is unchanged + new writes)
 *   always      abdicate, and on failure also merge back the clusters
 *               that were not copied
 */
#ifndef BITBACK_BACKUP_H
#define BITBACK_BACKUP_H

#include <stdbool.h>
#include <stdint.h>
#include "block/block.h"
#include "job/job.h"

typedef enum MirrorSyncMode {
    MIRROR_SYNC_MODE_TOP,
    MIRROR_SYNC_MODE_FULL,
    MIRROR_SYNC_MODE_NONE,
    MIRROR_SYNC_MODE_INCREMENTAL,
    MIRROR_SYNC_MODE_BITMAP,
} MirrorSyncMode;

typedef enum BitmapSyncMode {
    BITMAP_SYNC_MODE_ON_SUCCESS,
    BITMAP_SYNC_MODE_NEVER,
    BITMAP_SYNC_MODE_ALWAYS,
} BitmapSyncMode;

typedef struct BackupOptions {
    MirrorSyncMode sync;
    BdrvDirtyBitmap *bitmap;        /* on the source (or its backing chain);
                                       NULL if none */
    BitmapSyncMode bitmap_mode;     /* already defaulted by the caller */
    uint64_t speed;                 /* bytes/s, 0 = unlimited */
    BlockdevOnError on_source_error;
    BlockdevOnError on_target_error;
    bool auto_finalize;
    bool auto_dismiss;
    bool compress;                  /* write compressed clusters (a target
                                       whose driver supports it: qcow2) */
    int compress_level;             /* with compress: 0 = the algorithm's
                                       default (x-compress-level) */
} BackupOptions;

/* "Node 'X' is busy: ..." if a job uses bs (the check backup_job_create
 * makes on its source and target). */
bool backup_check_not_busy(BlockDriverState *bs, Error **errp);

/* Create a backup job from source to target (both already in the graph)
 * in state "created".  Must run inside bdrv_drain_all_begin/end.  Checks,
 * with QEMU's messages where QEMU has one:
 *   - source and target differ, have the same length ("Source and target
 *     image have different sizes")
 *   - target is writable; neither node is used by another job
 *   - sync incremental/bitmap need a bitmap; the bitmap is usable
 *     (bdrv_dirty_bitmap_check), granularity/size match the source
 *   - compress: "Compression is not supported for this drive NODE" when
 *     the target's driver cannot write compressed clusters; a compressing
 *     job copies in whole target clusters (its cluster size is a multiple
 *     of the target's), each written with BDRV_REQ_WRITE_COMPRESSED
 * On success the copy-before-write hook is installed, the bitmap (if any)
 * has a successor, both nodes are referenced and carry job_blocker.
 * Start it with job_start(); undo it with job_early_fail(). */
Job *backup_job_create(const char *job_id, BlockDriverState *source,
                       BlockDriverState *target, const BackupOptions *opts,
                       JobTxn *txn, Error **errp);

#endif
