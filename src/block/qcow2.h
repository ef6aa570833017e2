/*
 * qcow2 driver internals, shared by the files of the driver:
 *   qcow2.c           header and extensions, open/close/create, I/O entry
 *                     points, block status, info, the driver vtable
 *   qcow2-cluster.c   L1/L2 tables, the L2 cache, guest offset -> host
 *                     cluster mapping, zero clusters, compressed reads
 *   qcow2-refcount.c  refcount table and blocks, cluster allocation and
 *                     freeing, refcount table growth, check
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
    bool refcounts_unflushed;        /* refcount writes not yet flushed:
                                        flush before an L2 update */
    struct Qcow2InFlight *inflight;  /* guest clusters being allocated */
    pthread_cond_t inflight_cond;

    /* bitback generations extension: its raw payload, as read (only when
     * the autoclear bit was set) or as qcow2-bitmap.c last built it; NULL
     * when absent.  Written by qcow2_update_header_locked only while
     * autoclear_features has QCOW2_AUTOCLEAR_BITBACK_GENERATIONS. */
    uint8_t *gen_ext;
    uint32_t gen_ext_len;
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

typedef enum Qcow2ClusterType {
    QCOW2_CLUSTER_UNALLOCATED,
    QCOW2_CLUSTER_ZERO_PLAIN,        /* zero flag, no host cluster */
    QCOW2_CLUSTER_ZERO_ALLOC,        /* zero flag, host cluster kept */
    QCOW2_CLUSTER_NORMAL,
    QCOW2_CLUSTER_COMPRESSED,
} Qcow2ClusterType;

/* ---- qcow2-cluster.c ---- */

/* An LRU cache of cluster-sized tables (L2 tables, refcount blocks),
 * write-through: callers change a cached table in memory and write the
 * changed bytes to the file themselves.  A table pointer is valid until
 * the next call on the same cache; everything runs under s->lock. */
Qcow2L2Cache *qcow2_cache_new(unsigned nb_tables, size_t table_size);
void qcow2_cache_free(Qcow2L2Cache *c);
/* The table at host offset `offset`: read from bs->file on a miss, or
 * zero-filled without reading when `fresh`.  0 or -errno. */
int qcow2_cache_get_locked(BlockDriverState *bs, Qcow2L2Cache *c,
                           uint64_t offset, bool fresh, void **ret_table);
void qcow2_cache_drop_locked(Qcow2L2Cache *c, uint64_t offset);

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
/* Write entries [index, index+n) of a cached L2 table to the file. */
int qcow2_write_l2_entries_locked(BlockDriverState *bs, uint64_t *table,
                                  uint64_t l2_offset, unsigned index,
                                  unsigned n);
/* Drop the references an L2 entry holds (data, compressed or
 * preallocated-zero clusters). */
int qcow2_free_l2_entry_locked(BlockDriverState *bs, uint64_t entry);
/* Decompress the compressed cluster described by L2 entry `entry` into
 * `out` (cluster_size bytes).  No lock needed.  0 or -errno. */
int qcow2_read_compressed(BlockDriverState *bs, uint64_t entry, uint8_t *out);

/* ---- qcow2-refcount.c ---- */

/* Like qcow2_alloc_clusters_locked, but the run may be shorter: between 1
 * and n clusters (*ret_n of them).  Contiguous allocations larger than a
 * refcount block's region minus one cluster fail with -EFBIG; this one
 * never does for that reason.  Returns the host offset or -errno. */
int64_t qcow2_alloc_clusters_upto_locked(BlockDriverState *bs, uint64_t n,
                                         uint64_t *ret_n);
/* Load and check the refcount table (at open). */
bool qcow2_refcount_init(BlockDriverState *bs, Error **errp);
/* Refcount of host cluster `cluster_index` (0 where no block covers it). */
int qcow2_get_refcount_locked(BlockDriverState *bs, uint64_t cluster_index,
                              uint64_t *ret_refcount);
/* The check hook: walk every structure, compare with the refcounts. */
int qcow2_check(BlockDriverState *bs, char **report);
/* Free-cluster helper for tests and check: the byte range of compressed
 * data an L2 entry names. */
void qcow2_compressed_range(BDRVQcow2State *s, uint64_t entry,
                            uint64_t *ret_offset, uint64_t *ret_bytes);

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
/* Bytes of payload the generations extension may have so that the header
 * (with a bitmaps extension) still fits the first cluster.  s->lock held. */
uint64_t qcow2_gen_ext_space_locked(BlockDriverState *bs);

/* ---- qcow2-bitmap.c: called by qcow2.c ---- */

/* At open, after the header (and its bitmaps extension fields) is read:
 * load every bitmap into bs as a persistent BdrvDirtyBitmap.  A bitmap
 * marked in_use, or whose autoclear bit is clear while the extension
 * exists, loads as inconsistent (DESIGN.md invariant 2).  For a writable
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
/* info: "bitmaps" array for format-specific data (name, granularity,
 * flags ["auto", "in-use"]) as qemu-img info shows it. */
void qcow2_bitmaps_info(BlockDriverState *bs, struct json_object *data);
void qcow2_bitmaps_free(BlockDriverState *bs);

#endif
