/*
 * Named dirty bitmaps on a block node (QEMU's BdrvDirtyBitmap).
 *
 * A node owns a list of named bitmaps.  Each wraps an HBitmap and carries
 * the states QMP shows:
 *   recording    enabled: writes to the node mark it
 *   persistent   stored in the image by the node's driver
 *   busy         in use by an operation (a backup job, an export); it can
 *                not be changed or removed by the user while busy
 *   inconsistent loaded from an image that was not closed cleanly or whose
 *                checksum did not match; it can only be removed
 *   generation   a UUID that changes on every clear, so a backup chain can
 *                tell whether the bitmap still belongs to it; or "" when
 *                unknown: a bitmap loaded from an image whose history
 *                bitback cannot vouch for (qcow2 after a QEMU write
 *                session, or an inconsistent one).  A backup chain does
 *                not compare an unknown generation.  Creating a bitmap,
 *                clearing it and abdicating start a new, known generation.
 *
 * Locking: the node's bs->lock (what it guards and its rules: block.h,
 * next to the field).  Functions with a _locked suffix need the caller to
 * hold it; the others take it themselves.
 *
 * Invariant (DESIGN.md D1): bdrv_set_dirty() runs before a write is issued
 * to the driver, for every write path of the node (block.c does this).
 */
#ifndef BITBACK_DIRTY_BITMAP_H
#define BITBACK_DIRTY_BITMAP_H

#include <stdbool.h>
#include <stdint.h>
#include "bitmap/hbitmap.h"
#include "util/cutils.h"
#include "util/error.h"

typedef struct BlockDriverState BlockDriverState;
typedef struct BdrvDirtyBitmap BdrvDirtyBitmap;

#define BDRV_BITMAP_MAX_NAME 1023

struct BdrvDirtyBitmap {
    BlockDriverState *bs;
    char *name;
    HBitmap *hb;
    uint32_t granularity;          /* bytes, power of two */
    bool disabled;                 /* not recording */
    bool persistent;
    bool busy;
    bool inconsistent;
    char *inconsistent_reason;     /* why, when inconsistent (owned) */
    char generation[UUID_STR_LEN]; /* "" when unknown */
    char prior_generation[UUID_STR_LEN]; /* when generation is unknown:
                                      the one bitback last recorded before
                                      another program wrote the bitmap
                                      ("" if none); a backup chain whose
                                      manifest differs knows the bitmap was
                                      cleared since (qcow2-bitmap.c G6) */
    bool recovered;                /* rebuilt from the write-intent log
                                      after a crash (write-intent.h) */
    uint64_t recovered_bytes;      /* dirty bytes the recovery added */
    BdrvDirtyBitmap *successor;    /* backup jobs: new writes go here too */
    BdrvDirtyBitmap *next;
};

/* Check flags for bdrv_dirty_bitmap_check(). */
#define BDRV_BITMAP_BUSY         0x1   /* refuse if busy */
#define BDRV_BITMAP_INCONSISTENT 0x2   /* refuse if inconsistent */
#define BDRV_BITMAP_DEFAULT      (BDRV_BITMAP_BUSY | BDRV_BITMAP_INCONSISTENT)
#define BDRV_BITMAP_ALLOW_RO     0x4   /* allow on read-only nodes */

/* A name for a NEW bitmap (QMP block-dirty-bitmap-add, bitmap --add): on
 * top of what bdrv_create_dirty_bitmap checks, no control characters
 * (bytes below 0x20, 0x7f), which would end up in descriptors, file names,
 * NBD context names and terminals.  Bitmaps that images already hold are
 * loaded whatever their names.  Returns false with errp set. */
bool bdrv_dirty_bitmap_check_new_name(const char *name, Error **errp);

/* Create a bitmap covering the node's current length.  granularity must be
 * a power of two in [512, 2 GiB]; name must be unique on the node, non-empty
 * and at most BDRV_BITMAP_MAX_NAME bytes.  The new bitmap is enabled, not
 * persistent, with a fresh generation. */
BdrvDirtyBitmap *bdrv_create_dirty_bitmap(BlockDriverState *bs,
                                          uint32_t granularity,
                                          const char *name, Error **errp);
/* Unlink from the node and free.  Does not touch the image: callers that
 * remove a persistent bitmap ask the driver first (block.c). */
void bdrv_release_dirty_bitmap(BdrvDirtyBitmap *bm);
void bdrv_release_all_dirty_bitmaps(BlockDriverState *bs);

BdrvDirtyBitmap *bdrv_find_dirty_bitmap(BlockDriverState *bs, const char *name);
BdrvDirtyBitmap *bdrv_find_dirty_bitmap_locked(BlockDriverState *bs,
                                               const char *name);

/* Fails with a clear message when the bitmap is busy / inconsistent /
 * on a read-only node, according to flags. */
bool bdrv_dirty_bitmap_check(const BdrvDirtyBitmap *bm, unsigned flags,
                             Error **errp);

/* Mark [offset, offset+bytes) in every enabled bitmap of bs (and their
 * successors). */
void bdrv_set_dirty(BlockDriverState *bs, uint64_t offset, uint64_t bytes);
void bdrv_set_dirty_locked(BlockDriverState *bs, uint64_t offset, uint64_t bytes);
/* Note that bs's bitmaps changed in a way the write-intent log must save
 * (add, remove, clear, enable, disable, merge, successor end). */
void bdrv_dirty_bitmaps_changed(BlockDriverState *bs);

/* W9 (write-intent.md): every function here that changes a node's bitmaps
 * (create, release, clear, enable, disable, merge, set_persistent,
 * abdicate, reclaim, merge_bits, restore) makes the change durable in the
 * node's write-intent log before it returns (write_intent_sync_changed),
 * unless a batch is open.  A caller that makes several changes as one (a
 * QMP command, a transaction, a job's completion, bdrv_dirty_bitmap_add)
 * opens a batch: the outermost batch_end syncs every node whose bitmaps
 * changed (write_intent_sync_all_changed) and returns false if one failed
 * (reported on stderr; the node stays pending).  Batches nest; main thread
 * only.  A failed sync never fails the change itself: the log's thread
 * retries it.  Releasing every bitmap of a node (close) is not a change. */
void bdrv_dirty_bitmap_batch_begin(void);
bool bdrv_dirty_bitmap_batch_end(void);

/* User operations: each checks the bitmap (busy, inconsistent) first. */
bool bdrv_clear_dirty_bitmap(BdrvDirtyBitmap *bm, Error **errp);  /* new generation */
bool bdrv_enable_dirty_bitmap(BdrvDirtyBitmap *bm, Error **errp);
bool bdrv_disable_dirty_bitmap(BdrvDirtyBitmap *bm, Error **errp);
/* target |= OR of srcs.  All must match target's size and granularity.
 * On failure target is unchanged. */
bool bdrv_merge_dirty_bitmaps(BdrvDirtyBitmap *target,
                              BdrvDirtyBitmap *const *srcs, int nsrcs,
                              Error **errp);

void bdrv_dirty_bitmap_set_persistent(BdrvDirtyBitmap *bm, bool persistent);
void bdrv_dirty_bitmap_set_busy(BdrvDirtyBitmap *bm, bool busy);
/* Mark inconsistent with a reason (copied); also disables it. */
void bdrv_dirty_bitmap_set_inconsistent(BdrvDirtyBitmap *bm, const char *reason);

/* bm's history fields, copied together under bs->lock: for callers above
 * the block layer, which never take a node's lock themselves. */
typedef struct BdrvDirtyBitmapHistory {
    char generation[UUID_STR_LEN];
    char prior_generation[UUID_STR_LEN];
    bool recovered;
    uint64_t recovered_bytes;
} BdrvDirtyBitmapHistory;
void bdrv_dirty_bitmap_history(BdrvDirtyBitmap *bm, BdrvDirtyBitmapHistory *out);

/* Resize every bitmap of bs (and its successor) to cover size bytes
 * (hbitmap_resized_copy: bits for a new area clear, bits past a new end
 * dropped), in one step under bs->lock: all or, false with errp set when
 * memory is short, none.  Main thread, the node drained (block_resize). */
bool bdrv_dirty_bitmaps_truncate(BlockDriverState *bs, uint64_t size,
                                 Error **errp);
uint64_t bdrv_dirty_bitmap_count(BdrvDirtyBitmap *bm);   /* dirty bytes */
uint64_t bdrv_dirty_bitmap_size(const BdrvDirtyBitmap *bm);

/* A dirty or clean extent. */
typedef struct BdrvDirtyExtent {
    uint64_t start;
    uint64_t length;
    bool dirty;
} BdrvDirtyExtent;

/* The first extents of [offset, offset+bytes) (clipped to the bitmap's
 * size), in order, alternating dirty and clean, merged where adjacent; if
 * dirty_only, only the dirty ones.  At most max of them are written to ext
 * (the caller's array of max); returns how many.  They start at offset and
 * are consecutive, so they cover a prefix of the range (unless dirty_only),
 * and the last one is whole: the walk stops at the first extent that needs
 * a slot past max, so a caller can go on from the last one's end with
 * another call and get the list of a single walk.  0 when the range is
 * empty, past the bitmap's end, or max is 0.
 *
 * Memory is the caller's: O(max), whatever the range.  The walk takes
 * bs->lock for bounded steps and lets go of it in between (dirty-bitmap.c
 * says how much one step does), so a write that lands meanwhile may or
 * may not show; each extent was true when it was read. */
size_t bdrv_dirty_bitmap_extents(BdrvDirtyBitmap *bm, uint64_t offset,
                                 uint64_t bytes, bool dirty_only,
                                 BdrvDirtyExtent *ext, size_t max);

/* SHA-256 of the serialized bits, as lowercase hex (65 bytes with NUL),
 * for x-debug-block-dirty-bitmap-sha256. */
void bdrv_dirty_bitmap_sha256(BdrvDirtyBitmap *bm, char out[65]);

/* ---- Backup jobs: successors (QEMU's create_successor / abdicate /
 * reclaim).  A job that reads a bitmap freezes it: the bitmap keeps the
 * bits of the point in time, stops recording and becomes busy, while an
 * anonymous successor (enabled if the bitmap was) records every new write.
 * When the job ends, exactly one of these runs:
 *   abdicate  the successor replaces the bitmap's bits (the copied bits are
 *             gone, the new writes stay); a new generation
 *   reclaim   the successor's bits are merged back into the bitmap, so no
 *             dirty bit is ever lost
 * Either way the bitmap is no longer busy, records again if it did before,
 * and keeps its name, granularity and persistence.
 */
bool bdrv_dirty_bitmap_create_successor(BdrvDirtyBitmap *bm, Error **errp);
void bdrv_dirty_bitmap_abdicate(BdrvDirtyBitmap *bm);
void bdrv_dirty_bitmap_reclaim(BdrvDirtyBitmap *bm);
/* A copy of the current bits (caller frees with hbitmap_free).  NULL when
 * memory is short. */
HBitmap *bdrv_dirty_bitmap_copy_bits(BdrvDirtyBitmap *bm);
/* bm |= bits (same size and granularity). */
void bdrv_dirty_bitmap_merge_bits(BdrvDirtyBitmap *bm, const HBitmap *bits);

/* ---- Transactions: undo for clear / merge / enable / disable.  A backup
 * holds the bits, the generation and the recording state; restoring puts
 * them back (and frees the backup).  Callers run both with every node
 * drained, so no write lands in between. */
typedef struct BdrvDirtyBitmapBackup BdrvDirtyBitmapBackup;
BdrvDirtyBitmapBackup *bdrv_dirty_bitmap_backup(BdrvDirtyBitmap *bm, Error **errp);
void bdrv_dirty_bitmap_restore(BdrvDirtyBitmap *bm, BdrvDirtyBitmapBackup *b);
void bdrv_dirty_bitmap_backup_free(BdrvDirtyBitmapBackup *b);

#endif
