/*
 * qcow2 reference counts: the refcount table (in memory, host order), the
 * refcount blocks (through the table cache of qcow2-cluster.c), cluster
 * allocation and freeing, growth of the refcount table, and the check.
 *
 * Every host cluster in use has a refcount >= 1; a cluster that no
 * refcount block covers has refcount 0 and is free.  Invariants kept by
 * the allocator:
 *   1. A refcount is on disk before the structure pointing at the cluster:
 *      increments change the cached refcount block (dirty), and the
 *      write-back order of qcow2-cluster.c (C1) writes and syncs refcount
 *      blocks before any L2 table or L1 entry; qcow2_update_header_locked
 *      flushes metadata before the header names anything.  Decrements are
 *      deferred (s->pending_frees) until the removed references are
 *      durable (C3), so a crash leaks clusters at worst, and a freed
 *      cluster is not reused while an L2 entry on disk may still map it.
 *   2. A new refcount block for region R (the clusters it describes) is
 *      placed in the first cluster of R, which is free because nothing
 *      counts it, and counts itself.  Only then does the refcount table
 *      point at it.
 *   3. A grown refcount table is placed in regions the old table did not
 *      cover (all free), together with refcount blocks for those regions;
 *      the header switches to it only after it is written and flushed,
 *      and the old table's clusters are freed last.
 * Refcount widths 1..64 bits (refcount_order 0..6) are all handled.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/drivers/qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/cleanup.h"

bool qcow2_refcount_init(BlockDriverState *bs, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    if (s->refcount_order > 6) {
        error_setg(errp, "qcow2: refcount_order %u is invalid (at most 6)",
                   s->refcount_order);
        return false;
    }
    s->refcount_block_bits = s->cluster_bits + 3 - s->refcount_order;
    if ((uint64_t)s->refcount_table_clusters * cs > QCOW2_MAX_REFTABLE_BYTES) {
        error_setg(errp, "qcow2: the refcount table is too large "
                   "(%u clusters)", s->refcount_table_clusters);
        return false;
    }
    if (s->refcount_table_clusters == 0) {
        error_setg(errp, "qcow2: the image has no refcount table");
        return false;
    }
    uint64_t bytes = (uint64_t)s->refcount_table_clusters * cs;
    if ((s->refcount_table_offset & (cs - 1)) ||
        s->refcount_table_offset > qcow2_file_length(bs) ||
        bytes > qcow2_file_length(bs) - s->refcount_table_offset) {
        error_setg(errp, "qcow2: the refcount table offset 0x%" PRIx64
                   " is invalid (unaligned or past the end of the file)",
                   s->refcount_table_offset);
        return false;
    }
    s->refcount_table_size = bytes / 8;
    s->refcount_table = malloc(bytes);
    if (!s->refcount_table) {
        error_setg(errp, "out of memory");
        return false;
    }
    int r = bdrv_pread(bs->file, s->refcount_table_offset, s->refcount_table, bytes);
    if (r < 0) {
        error_setg_errno(errp, -r, "qcow2: cannot read the refcount table");
        return false;
    }
    for (uint64_t i = 0; i < s->refcount_table_size; i++) {
        s->refcount_table[i] = be64toh(s->refcount_table[i]);
    }
    return true;
}

/* ---- entries of a refcount block ---- */

static uint64_t rb_get(BDRVQcow2State *s, const void *block, uint64_t i)
{
    const uint8_t *b = block;
    switch (s->refcount_order) {
    case 0: case 1: case 2: {
        unsigned bits = 1u << s->refcount_order;
        unsigned per_byte = 8 / bits;
        return (b[i / per_byte] >> ((i % per_byte) * bits)) & ((1u << bits) - 1);
    }
    case 3: return b[i];
    case 4: return ld_be16(b + i * 2);
    case 5: return ld_be32(b + i * 4);
    default: return ld_be64(b + i * 8);
    }
}

static void rb_set(BDRVQcow2State *s, void *block, uint64_t i, uint64_t val)
{
    uint8_t *b = block;
    switch (s->refcount_order) {
    case 0: case 1: case 2: {
        unsigned bits = 1u << s->refcount_order;
        unsigned per_byte = 8 / bits;
        unsigned shift = (unsigned)(i % per_byte) * bits;
        uint8_t mask = (uint8_t)(((1u << bits) - 1) << shift);
        b[i / per_byte] = (uint8_t)((b[i / per_byte] & ~mask) | ((val << shift) & mask));
        break;
    }
    case 3: b[i] = (uint8_t)val; break;
    case 4: st_be16(b + i * 2, (uint16_t)val); break;
    case 5: st_be32(b + i * 4, (uint32_t)val); break;
    default: st_be64(b + i * 8, val); break;
    }
}

static uint64_t refcount_max(BDRVQcow2State *s)
{
    return s->refcount_order == 6 ? UINT64_MAX
                                  : (1ull << (1u << s->refcount_order)) - 1;
}

/* The refcount block for region rt_index: NULL if none. */
static int load_refblock_locked(BlockDriverState *bs, uint64_t rt_index,
                                void **ret_block, uint64_t *ret_offset)
{
    BDRVQcow2State *s = bs->opaque;
    *ret_block = NULL;
    *ret_offset = 0;
    if (rt_index >= s->refcount_table_size) {
        return 0;
    }
    uint64_t off = s->refcount_table[rt_index] & QCOW2_REFT_OFFSET_MASK;
    if (!off) {
        return 0;
    }
    if ((off & (s->cluster_size - 1)) || off + s->cluster_size > qcow2_file_length(bs)) {
        return -EIO;
    }
    *ret_offset = off;
    return qcow2_cache_get_locked(bs, s->refblock_cache, off, false, ret_block);
}

int qcow2_get_refcount_locked(BlockDriverState *bs, uint64_t cluster_index,
                              uint64_t *ret_refcount)
{
    BDRVQcow2State *s = bs->opaque;
    void *block;
    uint64_t off;
    int r = load_refblock_locked(bs, cluster_index >> s->refcount_block_bits,
                                 &block, &off);
    if (r < 0) {
        return r;
    }
    *ret_refcount = block ? rb_get(s, block, cluster_index &
                                   ((1ull << s->refcount_block_bits) - 1)) : 0;
    return 0;
}

/* Add `delta` to the refcount of clusters [first, first+n), all covered by
 * existing blocks.  Changes the cached blocks and marks them dirty.  On
 * -ERANGE / -EIO nothing past the failing block is changed. */
static int update_refcounts_locked(BlockDriverState *bs, uint64_t first,
                                   uint64_t n, int64_t delta,
                                   uint64_t *ret_freed_first)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t per_block = 1ull << s->refcount_block_bits;
    uint64_t c = first, end = first + n;
    while (c < end) {
        uint64_t rt_index = c >> s->refcount_block_bits;
        uint64_t idx = c & (per_block - 1);
        uint64_t cnt = MIN(end - c, per_block - idx);
        void *block;
        uint64_t boff;
        int r = load_refblock_locked(bs, rt_index, &block, &boff);
        if (r < 0) {
            return r;
        }
        if (!block) {
            return -EIO;
        }
        /* Check first, then change: no half-applied block on error. */
        for (uint64_t i = 0; i < cnt; i++) {
            uint64_t v = rb_get(s, block, idx + i);
            if ((delta < 0 && v < (uint64_t)-delta) ||
                (delta > 0 && v > refcount_max(s) - (uint64_t)delta)) {
                return delta < 0 ? -EIO : -ERANGE;
            }
        }
        for (uint64_t i = 0; i < cnt; i++) {
            uint64_t v = rb_get(s, block, idx + i) + (uint64_t)delta;
            rb_set(s, block, idx + i, v);
            if (v == 0 && ret_freed_first && c + i < *ret_freed_first) {
                *ret_freed_first = c + i;
            }
        }
        qcow2_cache_mark_dirty_locked(s->refblock_cache, block);
        c += cnt;
    }
    return 0;
}

/* Grow the refcount table so that it has at least min_entries entries
 * (invariant 3). */
static int grow_refcount_table_locked(BlockDriverState *bs, uint64_t min_entries)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t per_region = 1ull << s->refcount_block_bits;
    uint64_t entries_per_cluster = cs / 8;
    uint64_t old_size = s->refcount_table_size;
    /* New structures go to the first region the old table did not cover. */
    uint64_t region0 = old_size;
    uint64_t nb_blocks = 1, table_clusters = 0, new_size = 0;
    for (int iter = 0; iter < 64; iter++) {
        new_size = MAX(MAX(old_size * 2, min_entries), region0 + nb_blocks);
        new_size = ROUND_UP(new_size, entries_per_cluster);
        table_clusters = new_size / entries_per_cluster;
        uint64_t need = DIV_ROUND_UP(nb_blocks + table_clusters, per_region);
        if (need <= nb_blocks && region0 + nb_blocks <= new_size) {
            break;
        }
        nb_blocks = need;
    }
    if (new_size * 8 > QCOW2_MAX_REFTABLE_BYTES ||
        (region0 + nb_blocks) * per_region * cs > QCOW2_MAX_HOST_OFFSET) {
        return -EFBIG;
    }
    uint64_t first = region0 * per_region;               /* cluster index */
    uint64_t table_first = first + nb_blocks;
    uint64_t used_end = table_first + table_clusters;
    /* O1: the new regions are counted by nothing, which a hostile image
     * may still use for metadata. */
    int r = qcow2_check_overlap_locked(bs, 0, first * cs, (used_end - first) * cs);
    if (r == 0) {
        r = qcow2_check_overlap_locked(bs, QCOW2_OL_HEADER, 48, 12);
    }
    if (r < 0) {
        return r;
    }

    /* The refcount blocks, each counting the new clusters of its region. */
    _cleanup_free_ uint8_t *block = aligned_alloc(4096, ROUND_UP(cs, 4096));
    _cleanup_free_ uint64_t *table = calloc(new_size, 8);
    if (!block || !table) {
        return -ENOMEM;
    }
    for (uint64_t b = 0; b < nb_blocks; b++) {
        memset(block, 0, cs);
        uint64_t rstart = (region0 + b) * per_region;
        for (uint64_t c = MAX(rstart, first); c < MIN(rstart + per_region, used_end); c++) {
            rb_set(s, block, c - rstart, 1);
        }
        r = bdrv_pwrite(bs->file, (first + b) * cs, block, cs, 0);
        if (r < 0) {
            return r;
        }
    }
    for (uint64_t i = 0; i < new_size; i++) {
        uint64_t v = i < old_size ? s->refcount_table[i] : 0;
        if (i >= region0 && i < region0 + nb_blocks) {
            v = (first + (i - region0)) * cs;
        }
        table[i] = htobe64(v);
    }
    r = bdrv_pwrite(bs->file, table_first * cs, table, new_size * 8, 0);
    if (r == 0) {
        r = qcow2_sync_locked(bs);
    }
    if (r < 0) {
        return r;
    }
    /* Switch the header over (offset and cluster count are adjacent). */
    uint8_t hdr[12];
    st_be64(hdr, table_first * cs);
    st_be32(hdr + 8, (uint32_t)table_clusters);
    r = bdrv_pwrite(bs->file, 48, hdr, sizeof(hdr), 0);
    if (r == 0) {
        r = qcow2_sync_locked(bs);
    }
    if (r < 0) {
        return r;
    }
    uint64_t old_offset = s->refcount_table_offset;
    uint64_t old_clusters = s->refcount_table_clusters;
    for (uint64_t i = 0; i < new_size; i++) {
        table[i] = be64toh(table[i]);
    }
    free(s->refcount_table);
    s->refcount_table = steal_pointer(&table);
    s->refcount_table_size = new_size;
    s->refcount_table_offset = table_first * cs;
    s->refcount_table_clusters = (uint32_t)table_clusters;
    s->alloc_end = MAX(s->alloc_end, used_end);
    /* Free the old table last; a failure here only leaks it. */
    qcow2_free_clusters_locked(bs, old_offset, old_clusters * cs);
    return 0;
}

/* Make sure region rt_index has a refcount block (invariant 2). */
static int ensure_refblock_locked(BlockDriverState *bs, uint64_t rt_index)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    if (rt_index >= s->refcount_table_size) {
        int r = grow_refcount_table_locked(bs, rt_index + 1);
        if (r < 0) {
            return r;
        }
        if (s->refcount_table[rt_index] & QCOW2_REFT_OFFSET_MASK) {
            return 0;   /* the growth made it */
        }
    }
    if (s->refcount_table[rt_index] & QCOW2_REFT_OFFSET_MASK) {
        return 0;
    }
    uint64_t off = (rt_index << s->refcount_block_bits) * cs;
    if (off == 0 || off + cs > QCOW2_MAX_HOST_OFFSET) {
        return off == 0 ? -EIO : -EFBIG;   /* region 0 must have a block */
    }
    /* O1: nothing counts the region, but metadata may still lie there. */
    uint64_t entry_off = s->refcount_table_offset + rt_index * 8;
    int r = qcow2_check_overlap_locked(bs, 0, off, cs);
    if (r == 0) {
        r = qcow2_check_overlap_locked(bs, QCOW2_OL_REFCOUNT_TABLE, entry_off, 8);
    }
    if (r < 0) {
        return r;
    }
    void *block;
    r = qcow2_cache_get_locked(bs, s->refblock_cache, off, true, &block);
    if (r < 0) {
        return r;
    }
    rb_set(s, block, 0, 1);
    r = bdrv_pwrite(bs->file, off, block, cs, 0);
    if (r == 0) {
        r = qcow2_sync_locked(bs);
    }
    if (r == 0) {
        uint64_t be = htobe64(off);
        r = bdrv_pwrite(bs->file, entry_off, &be, 8, 0);
    }
    if (r < 0) {
        qcow2_cache_drop_locked(s->refblock_cache, off);
        return r;
    }
    s->refcount_table[rt_index] = off;
    s->alloc_end = MAX(s->alloc_end, off / cs + 1);
    return 0;
}

static bool region_has_block(BDRVQcow2State *s, uint64_t cluster)
{
    uint64_t rt_index = cluster >> s->refcount_block_bits;
    return rt_index < s->refcount_table_size &&
           (s->refcount_table[rt_index] & QCOW2_REFT_OFFSET_MASK);
}

/* Allocate a run of free clusters, of exactly n (`exact`) or of 1..n, and
 * give them refcount 1.  Returns the first cluster index; *ret_n gets the
 * run length. */
static int64_t alloc_run_locked(BlockDriverState *bs, uint64_t n, bool exact,
                                uint64_t *ret_n)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    /* A new refcount block takes the first cluster of its region, so an
     * exact run can span at most one region minus that cluster. */
    if (n == 0 || (exact && n > (1ull << s->refcount_block_bits) - 1)) {
        return n == 0 ? -EINVAL : -EFBIG;
    }
    if (qcow2_is_corrupt(s)) {
        return -EIO;   /* O2 */
    }
    for (;;) {
        uint64_t start = MAX(s->free_cluster_index, 1), run = 0;
        bool need_block = false;
        /* B3: a crash between a refcount update and the cluster's write
         * leaves clusters counted past the end of the file (leaks, as in
         * QEMU): they are skipped like any used cluster.  A crash leaves
         * at most what was in flight, so refcounts that claim more than
         * QCOW2_LEAK_WINDOW past the end (or past what this session
         * allocated, not yet written) are corrupt: refuse rather than
         * grow the file far past its end. */
        uint64_t end = MAX(DIV_ROUND_UP(qcow2_file_length(bs), cs), s->alloc_end);
        uint64_t bound = end + MAX(QCOW2_LEAK_WINDOW / cs, 1);
        while (run < n) {
            uint64_t c = start + run;
            if (run == 0 && c > bound) {
                return qcow2_signal_corruption_locked(bs, "the refcounts "
                    "claim every cluster up to 0x%" PRIx64 " in use, more "
                    "than %" PRIu64 " MiB past the end of the file (0x%"
                    PRIx64 ")", c * cs, (uint64_t)(QCOW2_LEAK_WINDOW >> 20), end * cs);
            }
            if ((c + 1) * cs > QCOW2_MAX_HOST_OFFSET) {
                if (!exact && run > 0) {
                    break;
                }
                return -EFBIG;
            }
            if (!region_has_block(s, c)) {
                /* Nothing counted here: free.  A non-exact run stops
                 * before a region that first needs a block. */
                if (run > 0 && !exact) {
                    break;
                }
                need_block = true;
                run++;
                continue;
            }
            uint64_t rc;
            int r = qcow2_get_refcount_locked(bs, c, &rc);
            if (r < 0) {
                return r;
            }
            if (rc == 0) {
                run++;
            } else if (!exact && run > 0) {
                break;
            } else {
                start = c + 1;
                run = 0;
                need_block = false;
            }
        }
        if (need_block) {
            /* Make the missing blocks (in their regions' first clusters,
             * maybe inside our run), then search again. */
            for (uint64_t c = start; c < start + run; c++) {
                if (!region_has_block(s, c)) {
                    int r = ensure_refblock_locked(bs, c >> s->refcount_block_bits);
                    if (r < 0) {
                        return r;
                    }
                }
            }
            continue;
        }
        int r = update_refcounts_locked(bs, start, run, 1, NULL);
        if (r < 0) {
            return r;
        }
        s->free_cluster_index = start + run;
        s->alloc_end = MAX(s->alloc_end, start + run);
        /* O1: refcount 0 on metadata (corrupt refcounts) would hand it
         * out; every user of a new cluster writes it next. */
        r = qcow2_check_overlap_locked(bs, 0, start * cs, run * cs);
        if (r < 0) {
            return r;
        }
        *ret_n = run;
        return (int64_t)start;
    }
}

int64_t qcow2_alloc_clusters_locked(BlockDriverState *bs, uint64_t size)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t got;
    int64_t c = alloc_run_locked(bs, DIV_ROUND_UP(size, s->cluster_size), true, &got);
    return c < 0 ? c : (int64_t)((uint64_t)c * s->cluster_size);
}

int64_t qcow2_alloc_clusters_upto_locked(BlockDriverState *bs, uint64_t n,
                                         uint64_t *ret_n)
{
    BDRVQcow2State *s = bs->opaque;
    int64_t c = alloc_run_locked(bs, n, false, ret_n);
    return c < 0 ? c : (int64_t)((uint64_t)c * s->cluster_size);
}

int64_t qcow2_alloc_compressed_locked(BlockDriverState *bs, uint64_t size)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t cur = s->compressed_cursor;
    if (size == 0 || size > cs) {
        return -EINVAL;
    }
    if (cur) {
        /* The reference these bytes hold on the cursor's cluster; a full
         * refcount starts a new cluster. */
        int r = update_refcounts_locked(bs, cur / cs, 1, 1, NULL);
        if (r == -ERANGE) {
            cur = 0;
        } else if (r < 0) {
            return r;
        }
    }
    if (cur && (cur & (cs - 1)) + size <= cs) {
        s->compressed_cursor = ((cur + size) & (cs - 1)) ? cur + size : 0;
        return (int64_t)cur;
    }
    int64_t next = qcow2_alloc_clusters_locked(bs, cs);
    if (cur && next == (int64_t)ROUND_UP(cur, cs)) {
        /* Contiguous: the bytes run on into the new cluster. */
        s->compressed_cursor = ((cur + size) & (cs - 1)) ? cur + size : 0;
        return (int64_t)cur;
    }
    if (cur) {
        /* Not used after all: nothing names it yet, undo at once. */
        update_refcounts_locked(bs, cur / cs, 1, -1, NULL);
    }
    if (next < 0) {
        return next;
    }
    s->compressed_cursor = size < cs ? (uint64_t)next + size : 0;
    return next;
}

typedef struct Qcow2PendingFree {
    uint64_t offset, size;           /* host bytes */
} Qcow2PendingFree;

int qcow2_free_clusters_locked(BlockDriverState *bs, uint64_t offset,
                               uint64_t size)
{
    BDRVQcow2State *s = bs->opaque;
    if (size == 0) {
        return 0;
    }
    if (s->nb_pending_frees) {
        /* Runs of adjacent clusters (a discard) merge into one. */
        Qcow2PendingFree *last = &s->pending_frees[s->nb_pending_frees - 1];
        uint64_t cs = s->cluster_size;
        if ((last->offset + last->size) % cs == 0 && offset % cs == 0 &&
            last->offset + last->size == offset) {
            last->size += size;
            return 0;
        }
    }
    if (s->nb_pending_frees == s->pending_frees_cap) {
        size_t cap = MAX(64, s->pending_frees_cap * 2);
        Qcow2PendingFree *n = realloc(s->pending_frees, cap * sizeof(*n));
        if (!n) {
            return -ENOMEM;   /* the clusters leak */
        }
        s->pending_frees = n;
        s->pending_frees_cap = cap;
    }
    s->pending_frees[s->nb_pending_frees++] = (Qcow2PendingFree){ offset, size };
    return 0;
}

/* Drop one reference now (the removals are durable). */
static void free_now_locked(BlockDriverState *bs, uint64_t offset,
                            uint64_t size)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t first = offset / cs;
    uint64_t n = DIV_ROUND_UP(offset + size, cs) - first;
    uint64_t freed_first = UINT64_MAX;
    if (update_refcounts_locked(bs, first, n, -1, &freed_first) < 0) {
        return;   /* a bad refcount: leave it (a leak at worst) */
    }
    if (freed_first < s->free_cluster_index) {
        s->free_cluster_index = freed_first;
    }
    /* The cursor's cluster may now be free (and reused for anything). */
    if (s->compressed_cursor && s->compressed_cursor / cs >= first &&
        s->compressed_cursor / cs < first + n) {
        s->compressed_cursor = 0;
    }
    /* Give freed clusters back to the file system (advisory). */
    uint64_t flen = qcow2_file_length(bs);
    for (uint64_t c = first; c < first + n; c++) {
        uint64_t rc;
        if (qcow2_get_refcount_locked(bs, c, &rc) == 0 && rc == 0 &&
            (c + 1) * cs <= flen &&
            qcow2_check_overlap_locked(bs, 0, c * cs, cs) == 0) {
            bdrv_pdiscard(bs->file, c * cs, cs);
        }
    }
}

void qcow2_apply_pending_frees_locked(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    for (size_t i = 0; i < s->nb_pending_frees; i++) {
        free_now_locked(bs, s->pending_frees[i].offset, s->pending_frees[i].size);
    }
    s->nb_pending_frees = 0;
}

void qcow2_pending_frees_free(BDRVQcow2State *s)
{
    free(s->pending_frees);
    s->pending_frees = NULL;
    s->nb_pending_frees = s->pending_frees_cap = 0;
}

/* ---- check ---- */

/* The check is linear in the file size plus the metadata size (K1): a
 * table that several entries name (L2 tables, bitmap tables, refcount
 * blocks past the end of the file) is counted once per reference but
 * walked only once, and a region wholly past the end of the file is
 * reported once per refcount table entry, not once per cluster. */
enum {
    CHECK_WALKED_L2 = 1 << 0,        /* this L2 table's entries counted */
    CHECK_WALKED_BITMAP = 1 << 1,    /* this bitmap table's entries counted */
    CHECK_SCANNED_PAST_EOF = 1 << 2, /* this block, naming a region wholly
                                        past the end, was scanned... */
    CHECK_COUNTS_PAST_EOF = 1 << 3,  /* ...and counts clusters there */
};

typedef struct CheckState {
    BDRVQcow2State *s;
    uint16_t *refs;                  /* expected refcount per cluster */
    uint8_t *walked;                 /* CHECK_* flags per cluster */
    uint64_t nb_clusters;
    BdrvCheckResult *res;
} CheckState;

/* True the first time it is called for (the cluster holding) `offset`
 * with `flag`: the table there is to be walked now.  Offsets past the end
 * of the file are never walked (check_ref reported them). */
static bool check_first_walk(CheckState *cs, uint64_t offset, uint8_t flag)
{
    uint64_t c = offset >> cs->s->cluster_bits;
    if (c >= cs->nb_clusters || (cs->walked[c] & flag)) {
        return false;
    }
    cs->walked[c] |= flag;
    return true;
}

/* Count one reference to every cluster of [offset, offset+size). */
static void check_ref(CheckState *cs, uint64_t offset, uint64_t size,
                      const char *what)
{
    uint64_t csz = cs->s->cluster_size;
    if (size == 0) {
        return;
    }
    uint64_t first = offset / csz, last = (offset + size - 1) / csz;
    if (last >= cs->nb_clusters) {
        bdrv_check_report(cs->res, BDRV_CHECK_CORRUPTION, "ERROR %s at offset "
                          "0x%" PRIx64 " is past the end of the file", what,
                          offset);
        return;
    }
    for (uint64_t c = first; c <= last; c++) {
        if (cs->refs[c] < UINT16_MAX) {
            cs->refs[c]++;
        }
    }
}

static int check_l2(BlockDriverState *bs, CheckState *cs, uint64_t l2_offset,
                    uint64_t *l2)
{
    BDRVQcow2State *s = bs->opaque;
    int r = bdrv_pread(bs->file, l2_offset, l2, s->cluster_size);
    if (r < 0) {
        return r;
    }
    for (uint64_t i = 0; i < (1ull << s->l2_bits); i++) {
        uint64_t e = be64toh(l2[i]);
        uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
        switch (qcow2_l2_entry_type(s, e)) {
        case QCOW2_CLUSTER_COMPRESSED: {
            uint64_t off, len;
            qcow2_compressed_range(s, e, &off, &len);
            check_ref(cs, off, len, "compressed cluster");
            cs->res->allocated_clusters++;
            break;
        }
        case QCOW2_CLUSTER_NORMAL:
        case QCOW2_CLUSTER_ZERO_ALLOC:
            if (host & (s->cluster_size - 1)) {
                bdrv_check_report(cs->res, BDRV_CHECK_CORRUPTION,
                                  "ERROR offset=%" PRIx64 ": data cluster is "
                                  "not properly aligned; L2 entry corrupted",
                                  host);
                break;
            }
            check_ref(cs, host, s->cluster_size, "data cluster");
            cs->res->allocated_clusters++;
            if (s->nb_snapshots == 0 && !(e & QCOW2_OFLAG_COPIED)) {
                bdrv_check_report(cs->res, BDRV_CHECK_CORRUPTION,
                                  "ERROR OFLAG_COPIED data cluster: "
                                  "l2_entry=%" PRIx64 " refcount=1", e);
            }
            break;
        default:
            break;
        }
    }
    return 0;
}

/* The clusters of the bitmaps extension: directory, tables, data. */
static void check_bitmaps(BlockDriverState *bs, CheckState *cs)
{
    BDRVQcow2State *s = bs->opaque;
    if (!s->nb_bitmaps || !s->bitmap_directory_size) {
        return;
    }
    uint64_t dsize = s->bitmap_directory_size;
    if (dsize > 64ull * 1024 * 1024 ||
        s->bitmap_directory_offset + dsize > cs->nb_clusters * s->cluster_size) {
        bdrv_check_report(cs->res, BDRV_CHECK_CORRUPTION, "ERROR the bitmap "
                          "directory is past the end of the file");
        return;
    }
    check_ref(cs, s->bitmap_directory_offset, dsize, "bitmap directory");
    _cleanup_free_ uint8_t *dir = malloc(dsize);
    if (!dir || bdrv_pread(bs->file, s->bitmap_directory_offset, dir, dsize) < 0) {
        bdrv_check_report(cs->res, BDRV_CHECK_ERROR,
                          "ERROR cannot read the bitmap directory");
        return;
    }
    uint64_t pos = 0;
    for (uint32_t i = 0; i < s->nb_bitmaps && pos + 24 <= dsize; i++) {
        uint64_t toff = ld_be64(dir + pos);
        uint32_t tsize = ld_be32(dir + pos + 8);
        uint16_t name_size = ld_be16(dir + pos + 18);
        uint32_t extra = ld_be32(dir + pos + 20);
        pos += ROUND_UP(24 + (uint64_t)extra + name_size, 8);
        uint64_t tbytes = (uint64_t)tsize * 8;
        if (tbytes > 64ull * 1024 * 1024 ||
            toff + tbytes > cs->nb_clusters * s->cluster_size) {
            bdrv_check_report(cs->res, BDRV_CHECK_CORRUPTION, "ERROR bitmap "
                              "table %u is past the end of the file", i);
            continue;
        }
        check_ref(cs, toff, tbytes, "bitmap table");
        if (!tbytes || !check_first_walk(cs, toff, CHECK_WALKED_BITMAP)) {
            continue;
        }
        _cleanup_free_ uint64_t *t = malloc(tbytes);
        if (!t || bdrv_pread(bs->file, toff, t, tbytes) < 0) {
            continue;
        }
        for (uint32_t j = 0; j < tsize; j++) {
            uint64_t off = be64toh(t[j]) & QCOW2_L2E_OFFSET_MASK;
            if (off) {
                check_ref(cs, off, s->cluster_size, "bitmap data cluster");
            }
        }
    }
}

/* Report n leaked clusters past the end of the file from `first` as one
 * problem per cluster but one message per run (K1: the messages stay
 * bounded). */
static void report_leaks_past_eof(CheckState *cs, uint64_t first, uint64_t n)
{
    if (n == 0) {
        return;
    }
    if (n == 1) {
        bdrv_check_report(cs->res, BDRV_CHECK_LEAK, "Leaked cluster %" PRIu64
                          " (past the end of the file) reference=0", first);
        return;
    }
    bdrv_check_report(cs->res, BDRV_CHECK_LEAK, "Leaked clusters %" PRIu64
                      "-%" PRIu64 " (past the end of the file) reference=0",
                      first, first + n - 1);
    cs->res->leaks += n - 1;
}

/* Report the clusters past the end of the file that the refcount block at
 * `off` (entry i of the refcount table) counts.  Those up to
 * QCOW2_LEAK_WINDOW past the end are leaks (what a crash leaves, B3),
 * reported per cluster; those beyond are a corruption.  A region that
 * reaches into the window is scanned per cluster; a region wholly past it
 * is reported once per entry that names a counting block, and each such
 * block is scanned once, whatever number of entries name it (K1). */
static void check_refblock_past_eof(BlockDriverState *bs, CheckState *cs,
                                    uint64_t i, uint64_t off)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t per_block = 1ull << s->refcount_block_bits;
    uint64_t region_first = i << s->refcount_block_bits;
    uint64_t leak_end = cs->nb_clusters + MAX(QCOW2_LEAK_WINDOW / s->cluster_size, 1);
    uint64_t c = off >> s->cluster_bits;
    bool whole = region_first >= leak_end;
    bool memo = whole && c < cs->nb_clusters;
    bool counts = false;
    if (memo && (cs->walked[c] & CHECK_SCANNED_PAST_EOF)) {
        counts = cs->walked[c] & CHECK_COUNTS_PAST_EOF;
    } else {
        void *block;
        uint64_t boff;
        if (load_refblock_locked(bs, i, &block, &boff) < 0 || !block) {
            return;   /* reported with the references above */
        }
        uint64_t k = region_first < cs->nb_clusters ? cs->nb_clusters - region_first : 0;
        uint64_t run = 0;   /* leaked clusters just before k */
        for (; k < per_block && !(whole && counts); k++) {
            uint64_t rc = rb_get(s, block, k);
            bool leak = rc && !whole && region_first + k < leak_end;
            if (leak) {
                run++;
            } else {
                report_leaks_past_eof(cs, region_first + k - run, run);
                run = 0;
                counts = counts || rc;
            }
        }
        report_leaks_past_eof(cs, region_first + k - run, run);
        if (memo) {
            cs->walked[c] |= CHECK_SCANNED_PAST_EOF |
                             (counts ? CHECK_COUNTS_PAST_EOF : 0);
        }
    }
    if (counts) {
        bdrv_check_report(cs->res, BDRV_CHECK_CORRUPTION, "ERROR refcount "
                          "block %" PRIu64 " (at 0x%" PRIx64 ") counts "
                          "clusters more than %" PRIu64 " MiB past the end "
                          "of the file", i, off,
                          (uint64_t)(QCOW2_LEAK_WINDOW >> 20));
    }
}

int qcow2_check(BlockDriverState *bs, BdrvCheckResult *res)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t csz = s->cluster_size;
    if (s->nb_snapshots > 0) {
        return -ENOTSUP;   /* snapshot tables are not walked */
    }
    LOCK_GUARD(&s->lock);
    /* The walk reads tables from the file: write the cached ones first. */
    int fr = qcow2_flush_metadata_locked(bs);
    if (fr < 0) {
        return fr;
    }
    CheckState cs = { .s = s, .res = res };
    cs.nb_clusters = DIV_ROUND_UP(qcow2_file_length(bs), csz);
    cs.refs = calloc(cs.nb_clusters ? cs.nb_clusters : 1, sizeof(uint16_t));
    _cleanup_free_ uint8_t *walked = calloc(cs.nb_clusters ? cs.nb_clusters : 1, 1);
    cs.walked = walked;
    _cleanup_free_ uint64_t *l2 = malloc(csz);
    if (!cs.refs || !l2 || !walked) {
        free(cs.refs);
        return -ENOMEM;
    }

    check_ref(&cs, 0, csz, "header");
    check_ref(&cs, s->l1_table_offset, (uint64_t)s->l1_size * 8, "L1 table");
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t l2_offset = s->l1_table[i] & QCOW2_L1E_OFFSET_MASK;
        if (!l2_offset) {
            continue;
        }
        if (l2_offset & (csz - 1)) {
            bdrv_check_report(res, BDRV_CHECK_CORRUPTION, "ERROR l2_offset=%"
                              PRIx64 ": Table is not cluster aligned; L1 "
                              "entry corrupted", l2_offset);
            continue;
        }
        if (!(s->l1_table[i] & QCOW2_OFLAG_COPIED)) {
            bdrv_check_report(res, BDRV_CHECK_CORRUPTION, "ERROR OFLAG_COPIED "
                              "L2 cluster: l1_index=%u l1_entry=%" PRIx64, i,
                              s->l1_table[i]);
        }
        if (l2_offset + csz > cs.nb_clusters * csz) {
            bdrv_check_report(res, BDRV_CHECK_CORRUPTION, "ERROR L2 table at "
                              "0x%" PRIx64 " is past the end of the file",
                              l2_offset);
            continue;
        }
        check_ref(&cs, l2_offset, csz, "L2 table");
        if (!check_first_walk(&cs, l2_offset, CHECK_WALKED_L2)) {
            continue;   /* named twice: its refcount mismatch says so */
        }
        int r = check_l2(bs, &cs, l2_offset, l2);
        if (r < 0) {
            free(cs.refs);
            return r;
        }
    }
    check_ref(&cs, s->refcount_table_offset,
              (uint64_t)s->refcount_table_clusters * csz, "refcount table");
    for (uint64_t i = 0; i < s->refcount_table_size; i++) {
        uint64_t off = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
        if (!off) {
            continue;
        }
        if (off & (csz - 1)) {
            bdrv_check_report(res, BDRV_CHECK_CORRUPTION, "ERROR refcount "
                              "block %" PRIu64 " is not cluster aligned; "
                              "refcount table entry corrupted", i);
            continue;
        }
        check_ref(&cs, off, csz, "refcount block");
    }
    check_bitmaps(bs, &cs);

    /* Compare with the refcounts on disk. */
    for (uint64_t c = 0; c < cs.nb_clusters; c++) {
        uint64_t rc;
        int r = qcow2_get_refcount_locked(bs, c, &rc);
        if (r < 0) {
            bdrv_check_report(res, BDRV_CHECK_ERROR, "ERROR cannot read the "
                              "refcount of cluster %" PRIu64, c);
            continue;
        }
        if (rc == cs.refs[c]) {
            continue;
        }
        if (rc > cs.refs[c] && cs.refs[c] == 0) {
            bdrv_check_report(res, BDRV_CHECK_LEAK, "Leaked cluster %" PRIu64
                              " refcount=%" PRIu64 " reference=%u", c, rc,
                              cs.refs[c]);
        } else {
            bdrv_check_report(res, BDRV_CHECK_CORRUPTION, "ERROR cluster %"
                              PRIu64 " refcount=%" PRIu64 " reference=%u", c,
                              rc, cs.refs[c]);
        }
    }
    /* Refcounts past the end of the file (K1). */
    for (uint64_t i = cs.nb_clusters >> s->refcount_block_bits;
         i < s->refcount_table_size; i++) {
        uint64_t off = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
        if (!off) {
            continue;
        }
        check_refblock_past_eof(bs, &cs, i, off);
    }
    /* The used space ends after the last cluster something refers to. */
    for (uint64_t c = cs.nb_clusters; c > 0; c--) {
        if (cs.refs[c - 1]) {
            res->image_end_offset = c * csz;
            break;
        }
    }
    res->total_clusters = DIV_ROUND_UP(s->size, csz);
    free(cs.refs);
    return 0;
}
