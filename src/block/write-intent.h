/*
 * Crash-safe persistent bitmaps: the write-intent log (WIL), next to an
 * image as IMAGE.wil, or where the node's driver keeps it
 * (BlockDriver.open_intent_store, wil-store.h: a RADOS object beside an
 * RBD image).  docs/specs/write-intent.md has the format, the numbered
 * invariants this code keeps, and why it is cheap.
 *
 * block.c owns the calls:
 *   open    write_intent_open() after the driver loaded its bitmaps: after a
 *           crash it recovers them (RO or RW); on RW nodes it prepares the
 *           log, active as soon as the node has a persistent bitmap
 *   write   write_intent_mark() instead of bdrv_set_dirty() on every write
 *           path: it sets the dirty bits and returns only when the write's
 *           regions are durable in the log (W1)
 *   flush   write_intent_flushed() after a guest flush
 *   meta    write_intent_sync_changed() at the end of every bitmap change
 *           (dirty-bitmap.c; a batch of changes syncs once at its end: W9)
 *   close   write_intent_close() around the format's final store
 */
#ifndef BITBACK_WRITE_INTENT_H
#define BITBACK_WRITE_INTENT_H

#include <stdbool.h>
#include <stdint.h>
#include "util/error.h"

typedef struct BlockDriverState BlockDriverState;
typedef struct WriteIntent WriteIntent;

#define WIL_DEFAULT_REGION_SHIFT 26        /* 64 MiB */
#define WIL_MIN_REGION_SHIFT     16        /* 64 KiB */
#define WIL_MAX_REGION_SHIFT     40        /* 1 TiB */
#define WIL_SNAPSHOT_INTERVAL_MS 5000
#define WIL_MAX_MARKED_REGIONS   64        /* more: snapshot soon... */
#define WIL_MIN_SNAPSHOT_GAP_MS  1000      /* ...but at most once a second */
#define WIL_READAHEAD_WINDOW     (8u << 20) /* a write this close to the last
                                               one's end continues it */
/* A stream's read-ahead (W10): what it writes in
 * WIL_READAHEAD_TIME_MS at its top speed (measured over steps of
 * WIL_READAHEAD_RATE_NS, the peak halving every WIL_READAHEAD_RATE_HALF_NS),
 * or in 3 times the slowest recent sync (halving every
 * WIL_READAHEAD_SYNC_HALF_NS) if longer; at least half a region,
 * at most WIL_READAHEAD_MAX_BYTES; and more than half a region only once
 * the stream has moved on WIL_READAHEAD_STREAM_MIN. */
#define WIL_READAHEAD_TIME_MS      500
#define WIL_READAHEAD_RATE_NS      50000000ull
#define WIL_READAHEAD_RATE_HALF_NS 2000000000ull
#define WIL_READAHEAD_SYNC_HALF_NS 1000000000ull
#define WIL_READAHEAD_MAX_BYTES    (4ull << 30)
#define WIL_READAHEAD_STREAM_MIN   (64ull << 20)

/* For block.c, after drv->open.  A no-op (true) when the node is not
 * crash-safe or its driver stores no persistent bitmaps.  Fails only when
 * the log cannot be set up on a read-write node. */
bool write_intent_open(BlockDriverState *bs, Error **errp);
/* block_resize, after the node and its bitmaps took size (W11): the map
 * is sized for it, and an active log is rewritten for it (a snapshot of
 * the resized bitmaps in new slots, the header with the new size, an
 * empty map).  false with errp set when memory is short or the log
 * cannot be written; the log then fails later writes as any I/O error of
 * it does.  Main thread, the node drained. */
bool write_intent_resize(BlockDriverState *bs, uint64_t size, Error **errp);

/* The recovery write_intent_open runs on the node's log, on a log the caller
 * opened (fd: a regular file or a memfd, read with pread, left open): for
 * each persistent bitmap of bs that the format loaded inconsistent and
 * that the log's newest valid snapshot holds (same name, granularity and
 * size), load the snapshot's bits, add every region the intent map marks,
 * and mark the bitmap consistent and recovered (W6).  Nothing happens
 * unless the log is active, covers bs's size, and no other program may
 * have written the bitmaps (bs->bitmaps_foreign_writes).  Never fails: a
 * log that cannot be used leaves the bitmaps as the format loaded them
 * (inconsistent: the safe side).  Writes nothing.  Returns how many
 * bitmaps were recovered; *ret_seq: the highest sequence number of a slot
 * that may be valid (0 when none).  Harnesses and tests call it on a log
 * in a memfd; write_intent_open runs it on the node's log. */
int write_intent_recover_fd(BlockDriverState *bs, int fd, uint64_t *ret_seq);

/* Set the dirty bits of [offset, offset+bytes) in every enabled bitmap and,
 * when the log is active, first make the regions' intent durable.
 * 0 or -errno (the write must then fail: its bit would not be safe). */
int write_intent_mark(BlockDriverState *bs, uint64_t offset, uint64_t bytes);
/* The same, but -EAGAIN (with nothing set) where a region's intent is not
 * durable yet and would have to be written first. */
int write_intent_mark_nowait(BlockDriverState *bs, uint64_t offset,
                             uint64_t bytes);

/* A guest flush completed: take a snapshot soon (at most once a second). */
void write_intent_flushed(BlockDriverState *bs);

/* Bitmaps of bs were added, removed, cleared, enabled, disabled or merged:
 * make that durable now (W9).  Activates the log when bs now has a
 * persistent bitmap. */
bool write_intent_sync_metadata(BlockDriverState *bs, Error **errp);

/* If bs's bitmaps changed (bs->bitmaps_changed) and it has a log: sync them
 * (write_intent_sync_metadata).  On failure the error is reported on stderr,
 * bs stays marked changed, so a later call (or the log's thread) tries
 * again, and the result is false. */
bool write_intent_sync_changed(BlockDriverState *bs);

/* Every node whose bitmaps changed (bs->bitmaps_changed): sync them.  For
 * the end of a batch of bitmap changes (bdrv_dirty_bitmap_batch_end) and
 * for the daemon at shutdown.  Errors are reported on stderr, and a node that failed stays
 * marked changed, so the next call tries again.  Returns false if any node
 * failed. */
bool write_intent_sync_all_changed(void);

/* Take a snapshot and reset the intent map now (tests, shutdown paths). */
bool write_intent_snapshot(BlockDriverState *bs, Error **errp);

/* Before the format's final store: stop the background thread.  After it:
 * stored_ok marks the log inactive (W7); otherwise it stays
 * active so the next open recovers.  Frees the state. */
void write_intent_close_begin(BlockDriverState *bs);
void write_intent_close_end(BlockDriverState *bs, bool stored_ok);

/* For query output: regions marked now (tests and `info`). */
uint64_t write_intent_marked_regions(BlockDriverState *bs);

/* What crash safety has cost this node since it was opened: intent-map
 * syncs, how many writes waited for one and for how long in all, and
 * snapshots written.  False when the node keeps no log. */
typedef struct WriteIntentStats {
    uint64_t region_size;
    uint64_t marked_regions;
    uint64_t intent_syncs;
    uint64_t writer_waits;
    uint64_t writer_wait_ns;
    uint64_t snapshots;
} WriteIntentStats;
bool write_intent_stats(BlockDriverState *bs, WriteIntentStats *st);

#endif
