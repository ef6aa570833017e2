/*
 * qcow2 driver internals, shared by the files of the driver:
 *   qcow2.c           header and extensions, open/close/create, I/O entry
 *                     points, block status, info, the driver vtable
 *   qcow2-cluster.c   L1/L2 tables, the L2 cache, guest offset -> host
 *                     cluster mapping, zero clusters, compressed reads
 *   qcow2-refcount.c  refcount table and blocks, cluster allocation and
 *                     freeing, refcount table growth, check
 *   qcow2-bitmap.c    the persistent bitmaps extension (0x23852875)
 *
 * The format is QEMU's docs/interop/qcow2.txt; every multi-byte field on
 * disk is big-endian.
 *
 * Locking: s->lock serializes metadata (L1/L2 tables and cache, refcounts,
 * header, bitmap directory).  Guest data I/O to already-allocated clusters
 * runs without it (the mapping is looked up under the lock, the data
 * transfer happens after dropping it).
 *
 * Crash safety (ordering, as QEMU does): a new cluster's refcount is
 * written (and flushed before the L2 update when needed) before the L2
 * entry pointing at it, and the data before the L2 entry; so a crash
 * leaks clusters at worst and never exposes unwritten or shared data.
 */
#ifndef BITBACK_QCOW2_H
#define BITBACK_QCOW2_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include "block/block.h"

#define QCOW2_MAGIC 0x514649fbu             /* "QFI\xfb" */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21           /* 2 MiB */

#define QCOW2_EXT_END            0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857u
#define QCOW2_EXT_BITMAPS        0x23852875u
#define QCOW2_EXT_DATA_FILE      0x44415441u

#define QCOW2_INCOMPAT_DIRTY       (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT     (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE   (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2       (1ull << 4)
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS    (1ull << 0)

typedef struct Qcow2L2Cache Qcow2L2Cache;   /* qcow2-cluster.c */
typedef struct Qcow2Bitmaps Qcow2Bitmaps;   /* qcow2-bitmap.c */

typedef struct BDRVQcow2State {
    pthread_mutex_t lock;            /* metadata (see above) */

    /* header */
    uint32_t version;                /* 2 or 3 */
    uint32_t cluster_bits;
    uint64_t cluster_size;
    uint64_t size;                   /* guest size */
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t *l1_table;              /* host order, l1_size entries */
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint64_t *refcount_table;        /* host order */
    uint32_t refcount_order;         /* refcount bits = 1 << order */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t header_length;
    uint8_t compression_type;        /* 0 deflate, 1 zstd */
    uint32_t nb_snapshots;
    char *backing_file;              /* from the header, or NULL */
    char *backing_format;            /* from the extension, or NULL */

    Qcow2L2Cache *l2_cache;

    /* bitmaps extension, as read from / written to the header */
    uint32_t nb_bitmaps;
    uint64_t bitmap_directory_size;
    uint64_t bitmap_directory_offset;
    Qcow2Bitmaps *bitmaps;           /* qcow2-bitmap.c's state, or NULL */

    uint64_t free_cluster_index;     /* allocation search hint */
} BDRVQcow2State;

/* ---- qcow2-refcount.c: used by every other file ---- */

/* Allocate `size` bytes (rounded up to clusters) of contiguous host
 * clusters with refcount 1; returns the host offset or -errno.  The
 * refcounts are on disk when this returns.  s->lock held. */
int64_t qcow2_alloc_clusters_locked(BlockDriverState *bs, uint64_t size);
/* Drop one reference on each cluster of [offset, offset+size).  s->lock
 * held. */
int qcow2_free_clusters_locked(BlockDriverState *bs, uint64_t offset,
                               uint64_t size);

/* ---- qcow2.c ---- */

/* Rewrite the header and all its extensions (including the bitmaps
 * extension from s->nb_bitmaps / bitmap_directory_*, and autoclear) in
 * the first cluster, then flush.  s->lock held.  0 or -errno. */
int qcow2_update_header_locked(BlockDriverState *bs);

/* ---- qcow2-bitmap.c: called by qcow2.c ---- */

/* At open, after the header (and its bitmaps extension fields) is read:
 * load every bitmap into bs as a persistent BdrvDirtyBitmap.  A bitmap
 * marked in_use, or whose autoclear bit is clear while the extension
 * exists, loads as inconsistent (DESIGN.md invariant 2).  For a writable
 * open, every loaded bitmap with the auto flag is then marked in_use on
 * disk (header rewritten), so a crash leaves it in_use.  Bad directory
 * entries or tables pointing outside the file fail the open with a clear
 * error. */
bool qcow2_load_bitmaps(BlockDriverState *bs, Error **errp);
/* Driver hooks (BlockDriver.persistent_bitmap_add/remove/store_bitmaps). */
bool qcow2_persistent_bitmap_add(BlockDriverState *bs, BdrvDirtyBitmap *bm,
                                 Error **errp);
bool qcow2_persistent_bitmap_remove(BlockDriverState *bs, const char *name,
                                    Error **errp);
/* Write every persistent bitmap (new tables, new directory, old ones
 * freed), clear in_use, set autoclear.  Called at close and on demand. */
bool qcow2_store_bitmaps(BlockDriverState *bs, Error **errp);
/* info: "bitmaps" array for format-specific data (name, granularity,
 * flags ["auto", "in-use"]) as qemu-img info shows it. */
void qcow2_bitmaps_info(BlockDriverState *bs, struct json_object *data);
void qcow2_bitmaps_free(BlockDriverState *bs);

#endif
