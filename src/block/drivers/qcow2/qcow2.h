/*
 * qcow2 driver internals, shared by the files of the driver:
 *   qcow2.c           header and extensions, open/close/create, I/O entry
 *                     points, block status, info, the driver vtable
 *   qcow2-cluster.c   L1/L2 tables, the L2 cache, guest offset -> host
 *                     cluster mapping, zero clusters, compressed reads
 *   qcow2-refcount.c  refcount table and blocks, cluster allocation and
 *                     freeing, refcount table growth, check
 *   qcow2-overlap.c   metadata overlap checks, marking the image corrupt
 *   qcow2-bitmap.c    the persistent bitmaps extension (0x23852875), and
 *                     bitback's bitmap generations extension (0x62626b67,
 *                     docs/specs/qcow2.md)
 *
 * The format is QEMU's docs/interop/qcow2.txt; every multi-byte field on
 * disk is big-endian.
 *
 * Locking: s->lock serializes metadata (L1/L2 tables and cache, refcounts,
 * header, bitmap directory).  Guest data I/O to already-allocated clusters
 * runs without it (the mapping is looked up under the lock, the data
 * transfer happens after dropping it).
 *
 * Metadata write-back (as QEMU does; qcow2-cluster.c has the details):
 * L2 tables, refcount blocks and the L1 table change in memory (the
 * table cache and s->l1_table are the truth while the node is open) and
 * reach the file at a flush (guest flush, FUA, header update, close) or
 * when a dirty table is evicted, in this order:
 *   1. dirty refcount blocks (increments only: decrements are deferred,
 *      see 3), and the data of newly allocated clusters, which is written
 *      directly before its L2 entry changes in memory;
 *   2. fdatasync, then dirty L2 tables and L1 entries (a new L2 table is
 *      written zero-filled at allocation, so it is durable by this sync
 *      before any L1 entry names it);
 *   3. fdatasync, then the deferred frees: refcount decrements of clusters
 *      whose last reference was removed, applied only once the removal is
 *      durable, so a freed cluster is neither counted 0 while referenced
 *      on disk nor reused (overwritten) while an old L2 entry on disk
 *      still maps it.
 * A crash at any moment thus leaks clusters at worst; data followed by a
 * completed flush survives; a read never sees another cluster's data.
 * An allocating write costs no fdatasync: a flush costs two (three when
 * clusters were freed).
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
/* bitback-private: {bitmap name, bitmap table offset, generation UUID}
 * records, valid only while QCOW2_AUTOCLEAR_BITBACK_GENERATIONS is set
 * (docs/specs/qcow2.md, "bitback bitmap generations"). */
#define QCOW2_EXT_BITBACK_GENERATIONS 0x62626b67u   /* "bbkg" */

#define QCOW2_INCOMPAT_DIRTY       (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT     (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE   (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2       (1ull << 4)
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS    (1ull << 0)
/* bitback-private autoclear bit: the generations extension describes the
 * bitmap directory.  Programs that do not know it (QEMU) clear it when they
 * open the image for writing, which invalidates every record. */
#define QCOW2_AUTOCLEAR_BITBACK_GENERATIONS (1ull << 63)
#define QCOW2_AUTOCLEAR_KNOWN (QCOW2_AUTOCLEAR_BITMAPS | \
                               QCOW2_AUTOCLEAR_BITBACK_GENERATIONS)

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
    /* Bound of the allocator (B3): a run never starts more than
     * QCOW2_LEAK_WINDOW past MAX(clusters in the file, alloc_end);
     * alloc_end is the end (cluster index) of everything allocated since
     * open. */
    uint64_t alloc_end;
    /* Where the next compressed cluster's bytes go (host byte offset inside
     * a host cluster that compressed data of this session partly fills),
     * 0 when none: qcow2_alloc_compressed_locked.  Reset when a cluster it
     * points into is freed. */
    uint64_t compressed_cursor;

    /* Added by the driver core (qcow2.c, qcow2-cluster.c,
     * qcow2-refcount.c); q2 may read them. */
    uint32_t l2_bits;                /* log2(entries per L2 table) */
    uint64_t refcount_table_size;    /* entries in refcount_table */
    uint32_t refcount_block_bits;    /* log2(entries per refcount block) */
    Qcow2L2Cache *refblock_cache;    /* the same LRU table cache type */
    bool writable;                   /* opened read-write */
    uint64_t snapshots_offset;
    uint8_t *other_exts;             /* header extensions we do not parse,
                                        raw (type, length, data, padding),
                                        preserved on header rewrites */
    size_t other_exts_len;
    /* Write-back bookkeeping (qcow2-cluster.c), all under s->lock.
     * write_gen counts writes to bs->file that a later metadata write
     * depends on (refcount blocks, new clusters' data, new L2 tables);
     * synced_gen is the write_gen an fdatasync that completed had seen. */
    uint64_t write_gen;
    uint64_t synced_gen;
    uint32_t l1_dirty_lo, l1_dirty_hi;   /* L1 entries [lo, hi) to write */
    /* Deferred frees: host byte ranges whose refcount drops by one once
     * the references removed before are durable (step 3 above). */
    struct Qcow2PendingFree *pending_frees;
    size_t nb_pending_frees, pending_frees_cap;
    struct Qcow2InFlight *inflight;  /* guest clusters being allocated */
    pthread_cond_t inflight_cond;

    /* bitback generations extension: its raw payload, as read (only when
     * the autoclear bit was set) or as qcow2-bitmap.c last built it; NULL
     * when absent.  Written by qcow2_update_header_locked only while
     * autoclear_features has QCOW2_AUTOCLEAR_BITBACK_GENERATIONS. */
    uint8_t *gen_ext;
    uint32_t gen_ext_len;
    /* The payload found when the autoclear bit was clear (another program
     * wrote the image since): read at load for prior generations only
     * (qcow2-bitmap.c G6), never written back as is. */
    uint8_t *gen_ext_stale;
    uint32_t gen_ext_stale_len;
} BDRVQcow2State;

/* Entry layouts (host order after be64toh). */
#define QCOW2_OFLAG_COPIED     (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO       (1ull << 0)
#define QCOW2_L1E_OFFSET_MASK  0x00fffffffffffe00ull
#define QCOW2_L2E_OFFSET_MASK  0x00fffffffffffe00ull
#define QCOW2_REFT_OFFSET_MASK 0xfffffffffffffe00ull
/* Implementation limits, as QEMU's (checked before allocating). */
#define QCOW2_MAX_L1_BYTES       (32u * 1024 * 1024)
#define QCOW2_MAX_REFTABLE_BYTES (8u * 1024 * 1024)
#define QCOW2_MAX_HOST_OFFSET    (1ull << 56)
/* How far past the end of the file (or of this session's allocations) the
 * refcounts may count clusters before that is a corruption (B3): what a
 * crash can leave counted but never written. */
#define QCOW2_LEAK_WINDOW        (1ull << 30)

typedef enum Qcow2ClusterType {
    QCOW2_CLUSTER_UNALLOCATED,
    QCOW2_CLUSTER_ZERO_PLAIN,        /* zero flag, no host cluster */
    QCOW2_CLUSTER_ZERO_ALLOC,        /* zero flag, host cluster kept */
    QCOW2_CLUSTER_NORMAL,
    QCOW2_CLUSTER_COMPRESSED,
} Qcow2ClusterType;

/* ---- qcow2-cluster.c ---- */

/* An LRU cache of cluster-sized tables (L2 tables, refcount blocks),
 * write-back: callers change a cached table in memory and mark it dirty;
 * it reaches the file at qcow2_flush_metadata_locked or when evicted.  A
 * cache with a dependency (the L2 cache depends on the refcount block
 * cache) writes back the dependency and syncs before writing any of its
 * own dirty tables.  A table pointer is valid until the next get on the
 * same cache; everything runs under s->lock. */
Qcow2L2Cache *qcow2_cache_new(unsigned nb_tables, size_t table_size);
void qcow2_cache_free(Qcow2L2Cache *c);
void qcow2_cache_set_dependency(Qcow2L2Cache *c, Qcow2L2Cache *depends);
/* The table at host offset `offset`: read from bs->file on a miss, or
 * zero-filled without reading when `fresh` (not dirty: the caller writes
 * it or marks it).  A dirty victim is written back first.  0 or -errno. */
int qcow2_cache_get_locked(BlockDriverState *bs, Qcow2L2Cache *c,
                           uint64_t offset, bool fresh, void **ret_table);
/* Mark the cached table `table` (a pointer from get) dirty. */
void qcow2_cache_mark_dirty_locked(Qcow2L2Cache *c, const void *table);
/* Forget the table at `offset`, dirty or not (its cluster is unused). */
void qcow2_cache_drop_locked(Qcow2L2Cache *c, uint64_t offset);
/* Write every dirty table of c (after its dependency's, synced). */
int qcow2_cache_writeback_locked(BlockDriverState *bs, Qcow2L2Cache *c);
/* Write all dirty metadata in the order of the header comment (steps 1-3,
 * syncing between them as needed), apply the deferred frees.  The last
 * writes are not synced: callers that need durability sync after.  0 or
 * -errno (dirty state is kept on error, to retry). */
int qcow2_flush_metadata_locked(BlockDriverState *bs);
/* fdatasync bs->file, and record that everything before is durable. */
int qcow2_sync_locked(BlockDriverState *bs);
/* The same, only when something written since the last sync needs it. */
int qcow2_sync_if_needed_locked(BlockDriverState *bs);
/* Note a write that later metadata writes depend on (see write_gen). */
void qcow2_note_write_locked(BlockDriverState *bs);

/* Classify a (host order) L2 entry. */
Qcow2ClusterType qcow2_l2_entry_type(BDRVQcow2State *s, uint64_t entry);
/* Mapping of guest [offset, offset+bytes): the type at offset, and
 * *ret_bytes (> 0, <= bytes) over which it holds -- for NORMAL clusters
 * with contiguous host offsets.  *ret_host is the host offset of the byte
 * at `offset` (NORMAL, ZERO_ALLOC) or the raw L2 entry (COMPRESSED).
 * -EIO for bad tables.  s->lock held. */
int qcow2_get_mapping_locked(BlockDriverState *bs, uint64_t offset,
                             uint64_t bytes, Qcow2ClusterType *ret_type,
                             uint64_t *ret_host, uint64_t *ret_bytes);
/* The L2 table covering guest `offset` (allocating it when `alloc`):
 * *ret_table (NULL when unallocated and !alloc; big-endian entries),
 * its host offset and the entry index of `offset`.  s->lock held. */
int qcow2_get_l2_locked(BlockDriverState *bs, uint64_t offset, bool alloc,
                        uint64_t **ret_table, uint64_t *ret_l2_offset,
                        unsigned *ret_index);
/* Entries [index, index+n) of a cached L2 table changed: mark it dirty
 * (written back later).  Always 0. */
int qcow2_write_l2_entries_locked(BlockDriverState *bs, uint64_t *table,
                                  uint64_t l2_offset, unsigned index,
                                  unsigned n);
/* Drop the references an L2 entry holds (data, compressed or
 * preallocated-zero clusters): deferred frees, see the header comment. */
int qcow2_free_l2_entry_locked(BlockDriverState *bs, uint64_t entry);
/* Decompress the compressed cluster described by L2 entry `entry` into
 * `out` (cluster_size bytes).  No lock needed.  0 or -errno. */
int qcow2_read_compressed(BlockDriverState *bs, uint64_t entry, uint8_t *out);
/* Compress the cluster `in` (cluster_size bytes) with the image's
 * compression type (zstd: a plain frame; deflate: raw, windowBits -12, as
 * QEMU writes them) at `level` (0: the algorithm's default) into `out`
 * (out_cap bytes): 0 and *ret_len, -ENOSPC when it does not fit out_cap
 * (store the cluster plain), other -errno.  No lock needed. */
int qcow2_compress_cluster(BDRVQcow2State *s, int level, const uint8_t *in,
                           uint8_t *out, size_t out_cap, size_t *ret_len);
/* The L2 entry (host order) of `len` compressed bytes at host byte
 * `host`: the offset and the count of 512-byte sectors after the first
 * that the bytes reach into (qcow2.txt's compressed cluster descriptor). */
uint64_t qcow2_compressed_entry(BDRVQcow2State *s, uint64_t host, uint64_t len);

/* ---- qcow2-refcount.c ---- */

/* Like qcow2_alloc_clusters_locked, but the run may be shorter: between 1
 * and n clusters (*ret_n of them).  Contiguous allocations larger than a
 * refcount block's region minus one cluster fail with -EFBIG; this one
 * never does for that reason.  Returns the host offset or -errno. */
int64_t qcow2_alloc_clusters_upto_locked(BlockDriverState *bs, uint64_t n,
                                         uint64_t *ret_n);
/* Host space for `size` (1..cluster_size) bytes of a compressed cluster,
 * packed right after the previous compressed cluster's bytes (QEMU's
 * qcow2_alloc_bytes): in the same host cluster while it has room, else
 * continuing into a newly allocated host cluster when that one is the
 * next in the file, else at the start of the new cluster.  Each host
 * cluster the bytes touch gains one reference (refcount 1 for a new one),
 * so freeing the compressed cluster (qcow2_free_l2_entry_locked) drops
 * exactly those.  Returns the host byte offset or -errno.  s->lock held. */
int64_t qcow2_alloc_compressed_locked(BlockDriverState *bs, uint64_t size);
/* The length of the image file, 0 when it cannot be read (bounds checks
 * then refuse every offset). */
uint64_t qcow2_file_length(BlockDriverState *bs);
/* Load and check the refcount table (at open). */
bool qcow2_refcount_init(BlockDriverState *bs, Error **errp);
/* Refcount of host cluster `cluster_index` (0 where no block covers it). */
int qcow2_get_refcount_locked(BlockDriverState *bs, uint64_t cluster_index,
                              uint64_t *ret_refcount);
/* The check hook: walk every structure, compare with the refcounts. */
int qcow2_check(BlockDriverState *bs, BdrvCheckResult *res);
/* Free-cluster helper for tests and check: the byte range of compressed
 * data an L2 entry names. */
void qcow2_compressed_range(BDRVQcow2State *s, uint64_t entry,
                            uint64_t *ret_offset, uint64_t *ret_bytes);

/* ---- qcow2-refcount.c: used by every other file ---- */

/* Allocate `size` bytes (rounded up to clusters) of contiguous host
 * clusters with refcount 1; returns the host offset or -errno.  The
 * refcounts are in the refcount block cache (dirty) when this returns:
 * anything on disk that points at the clusters must be written only
 * after a qcow2_flush_metadata_locked + sync (qcow2_update_header_locked
 * does both first; L1/L2 changes go through the caches).  s->lock held. */
int64_t qcow2_alloc_clusters_locked(BlockDriverState *bs, uint64_t size);
/* Drop one reference on each cluster of [offset, offset+size), deferred:
 * the decrement is applied by the next qcow2_flush_metadata_locked, after
 * the removal of the references is durable; until then the clusters stay
 * allocated.  0 or -ENOMEM (a leak at worst).  s->lock held. */
int qcow2_free_clusters_locked(BlockDriverState *bs, uint64_t offset,
                               uint64_t size);
/* Apply the deferred frees to the refcount cache (dirty blocks), give
 * freed clusters back to the file system.  Called by
 * qcow2_flush_metadata_locked once the removals are durable. */
void qcow2_apply_pending_frees_locked(BlockDriverState *bs);
void qcow2_pending_frees_free(BDRVQcow2State *s);
/* Deferred frees above which clear_clusters flushes metadata to apply. */
#define QCOW2_MAX_PENDING_FREES 4096

/* ---- qcow2-overlap.c ---- */

/* Metadata kinds, for qcow2_check_overlap_locked's `ignore` mask. */
#define QCOW2_OL_HEADER           (1u << 0)
#define QCOW2_OL_ACTIVE_L1        (1u << 1)
#define QCOW2_OL_ACTIVE_L2        (1u << 2)
#define QCOW2_OL_REFCOUNT_TABLE   (1u << 3)
#define QCOW2_OL_REFCOUNT_BLOCK   (1u << 4)
#define QCOW2_OL_SNAPSHOT_TABLE   (1u << 5)
#define QCOW2_OL_BITMAP_DIRECTORY (1u << 6)

/* O1/O2 (qcow2-overlap.c): 0 when host bytes [offset, offset+size) may be
 * written, i.e. overlap no metadata of a kind not in `ignore` and the
 * image is not marked corrupt; else -EIO (an overlap marks the image
 * corrupt first).  s->lock held. */
int qcow2_check_overlap_locked(BlockDriverState *bs, unsigned ignore,
                               uint64_t offset, uint64_t size);
/* O2: report the corruption `fmt` once (error_report), set the corrupt
 * bit in memory and, for a writable v3 image, on disk.  Every later write
 * fails.  Returns -EIO, for `return qcow2_signal_corruption_locked(...)`.
 * s->lock held. */
int qcow2_signal_corruption_locked(BlockDriverState *bs, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* The image is marked corrupt (O2): writes are refused. */
static inline bool qcow2_is_corrupt(const BDRVQcow2State *s)
{
    return (s->incompatible_features & QCOW2_INCOMPAT_CORRUPT) != 0;
}

/* ---- qcow2.c ---- */

/* Rewrite the header and all its extensions (including the bitmaps
 * extension from s->nb_bitmaps / bitmap_directory_*, and autoclear) in
 * the first cluster, then flush.  All dirty metadata is written back and
 * synced first, so the header never names a structure whose refcounts
 * are not durable.  s->lock held.  0 or -errno. */
int qcow2_update_header_locked(BlockDriverState *bs);
/* Bytes of payload the generations extension may have so that the header
 * (with a bitmaps extension) still fits the first cluster.  s->lock held. */
uint64_t qcow2_gen_ext_space_locked(BlockDriverState *bs);

/* ---- qcow2-bitmap.c: called by qcow2.c ---- */

/* At open, after the header (and its bitmaps extension fields) is read:
 * load every bitmap into bs as a persistent BdrvDirtyBitmap.  A bitmap
 * marked in_use, or whose autoclear bit is clear while the extension
 * exists, loads as inconsistent (DESIGN.md D2).  For a writable
 * open, every loaded bitmap with the auto flag is then marked in_use on
 * disk (header rewritten), so a crash leaves it in_use.  Bad directory
 * entries or tables pointing outside the file fail the open with a clear
 * error.  A consistent bitmap takes its generation from the bitback
 * generations extension when the record still matches its table (see
 * qcow2-bitmap.c, G1); every other bitmap's generation is unknown (""). */
bool qcow2_load_bitmaps(BlockDriverState *bs, Error **errp);
/* Driver hooks (BlockDriver.persistent_bitmap_add/remove/store_bitmaps). */
bool qcow2_persistent_bitmap_add(BlockDriverState *bs, BdrvDirtyBitmap *bm,
                                 Error **errp);
bool qcow2_persistent_bitmap_remove(BlockDriverState *bs, const char *name,
                                    Error **errp);
/* Write every persistent bitmap (new tables, new directory, old ones
 * freed), clear in_use, set autoclear.  Called at close and on demand. */
bool qcow2_store_bitmaps(BlockDriverState *bs, Error **errp);
/* block_resize to size: false (errp set) while an entry of the image is
 * kept as found (inconsistent: it could not follow the new length), or
 * when a persistent bitmap would be too large at size. */
bool qcow2_bitmaps_resizable(BlockDriverState *bs, uint64_t size,
                             Error **errp);
/* info: "bitmaps" array for format-specific data (name, granularity,
 * flags ["auto", "in-use"]) as qemu-img info shows it. */
void qcow2_bitmaps_info(BlockDriverState *bs, struct json_object *data);
void qcow2_bitmaps_free(BlockDriverState *bs);

#endif
