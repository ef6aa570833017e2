/*
 * qcow2 guest-to-host mapping: the L1 and L2 tables, the table cache that
 * holds L2 tables (and refcount blocks, qcow2-refcount.c), metadata
 * write-back, zero clusters and compressed clusters.
 *
 * A guest offset splits into an L1 index, an L2 index and an offset in the
 * cluster.  The L1 table lives in memory (s->l1_table, host order, changed
 * entries written back as the range [l1_dirty_lo, l1_dirty_hi)); L2 tables
 * come through an LRU cache that stores them as they are on disk
 * (big-endian).  The cache is write-back (QEMU's model): a caller changes
 * entries in the cached table and marks it dirty; the table reaches the
 * file at qcow2_flush_metadata_locked or when it is evicted, so an
 * allocating write costs no fdatasync.  The order that keeps a crashed
 * image consistent (qcow2.h has the three steps) is enforced here; these
 * are the C invariants of docs/DESIGN.md's index (C, not W: W is the
 * write-intent log's set):
 *   C1. No dirty L2 table or L1 entry is written before every dirty
 *       refcount block is written and synced (the L2 cache depends on the
 *       refcount block cache), and before the data of the clusters it
 *       maps is synced (write_gen/synced_gen: an allocating write notes
 *       its data write before it changes the L2 entry).
 *   C2. A new L2 table is written zero-filled when it is allocated, and
 *       its L1 entry only at a flush, after a sync: L1 never names a table
 *       whose content is not durable.
 *   C3. Deferred frees are applied only after the L2/L1 writes that
 *       removed the references are synced.
 *   C4. Eviction prefers clean tables; a dirty victim is written (C1
 *       applies) before its slot is reused.  A failed write-back leaves
 *       the table dirty and fails the request.
 *
 * Every offset read from a table is checked (alignment, end of file)
 * before use: a bad table fails the access with -EIO, never a wild read.
 */
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "block/drivers/qcow2/qcow2.h"
#include "util/cleanup.h"

/* ---- table cache ---- */

typedef struct Qcow2CacheEntry {
    uint64_t offset;                 /* 0 = empty slot */
    uint64_t lru;                    /* last use, larger = newer */
    bool dirty;                      /* changed since read or written */
    void *table;
} Qcow2CacheEntry;

struct Qcow2L2Cache {
    unsigned nb;
    size_t table_size;
    uint64_t clock;
    unsigned nb_dirty;
    Qcow2L2Cache *depends;           /* written back (and synced) first */
    Qcow2CacheEntry *e;
};

Qcow2L2Cache *qcow2_cache_new(unsigned nb_tables, size_t table_size)
{
    Qcow2L2Cache *c = calloc(1, sizeof(*c));
    if (!c) {
        return NULL;
    }
    c->nb = nb_tables;
    c->table_size = table_size;
    c->e = calloc(nb_tables, sizeof(*c->e));
    if (!c->e) {
        free(c);
        return NULL;
    }
    for (unsigned i = 0; i < nb_tables; i++) {
        c->e[i].table = aligned_alloc(4096, ROUND_UP(table_size, 4096));
        if (!c->e[i].table) {
            qcow2_cache_free(c);
            return NULL;
        }
    }
    return c;
}

void qcow2_cache_free(Qcow2L2Cache *c)
{
    if (!c) {
        return;
    }
    for (unsigned i = 0; i < c->nb; i++) {
        free(c->e[i].table);
    }
    free(c->e);
    free(c);
}

void qcow2_cache_set_dependency(Qcow2L2Cache *c, Qcow2L2Cache *depends)
{
    c->depends = depends;
}

void qcow2_note_write_locked(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    s->write_gen++;
}

int qcow2_sync_locked(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t gen = s->write_gen;
    int r = bdrv_flush(bs->file);
    if (r == 0 && gen > s->synced_gen) {
        s->synced_gen = gen;
    }
    return r;
}

int qcow2_sync_if_needed_locked(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    return s->write_gen > s->synced_gen ? qcow2_sync_locked(bs) : 0;
}

/* C1: the cache c depends on (refcount blocks), if any, written back and
 * synced.  0 or -errno. */
static int cache_depends_writeback_locked(BlockDriverState *bs,
                                          Qcow2L2Cache *c)
{
    if (!c->depends) {
        return 0;
    }
    int r = qcow2_cache_writeback_locked(bs, c->depends);
    if (r == 0) {
        r = qcow2_sync_if_needed_locked(bs);
    }
    return r;
}

/* Write one dirty entry (C1: after the dependency, synced). */
static int cache_entry_write_locked(BlockDriverState *bs, Qcow2L2Cache *c,
                                    Qcow2CacheEntry *e)
{
    if (!e->dirty) {
        return 0;
    }
    int r = cache_depends_writeback_locked(bs, c);
    if (r < 0) {
        return r;
    }
    /* O1: only the L2 cache has a dependency. */
    r = qcow2_check_overlap_locked(bs, c->depends ? QCOW2_OL_ACTIVE_L2
                                                  : QCOW2_OL_REFCOUNT_BLOCK,
                                   e->offset, c->table_size);
    if (r < 0) {
        return r;
    }
    r = bdrv_pwrite(bs->file, e->offset, e->table, c->table_size, 0);
    if (r < 0) {
        return r;
    }
    e->dirty = false;
    c->nb_dirty--;
    if (!c->depends) {
        /* A refcount block: L2 writes wait for it (C1).  Nothing waits
         * for an L2 table write but the deferred frees, which sync
         * unconditionally (C3). */
        qcow2_note_write_locked(bs);
    }
    return 0;
}

int qcow2_cache_writeback_locked(BlockDriverState *bs, Qcow2L2Cache *c)
{
    if (c->nb_dirty == 0) {
        return 0;
    }
    /* Once for all the tables, rather than per table. */
    int r = cache_depends_writeback_locked(bs, c);
    if (r < 0) {
        return r;
    }
    for (unsigned i = 0; i < c->nb && c->nb_dirty; i++) {
        r = cache_entry_write_locked(bs, c, &c->e[i]);
        if (r < 0) {
            return r;
        }
    }
    return 0;
}

int qcow2_cache_get_locked(BlockDriverState *bs, Qcow2L2Cache *c,
                           uint64_t offset, bool fresh, void **ret_table)
{
    Qcow2CacheEntry *victim = NULL;
    for (unsigned i = 0; i < c->nb; i++) {
        Qcow2CacheEntry *e = &c->e[i];
        if (e->offset == offset) {
            e->lru = ++c->clock;
            if (fresh) {
                memset(e->table, 0, c->table_size);
            }
            *ret_table = e->table;
            return 0;
        }
        /* An empty slot, else the least recently used clean one, else the
         * least recently used (C4). */
        if (!victim || (victim->offset != 0 &&
                        (e->offset == 0 ||
                         (e->dirty == victim->dirty ? e->lru < victim->lru
                                                    : victim->dirty)))) {
            victim = e;
        }
    }
    if (victim->offset) {
        int r = cache_entry_write_locked(bs, c, victim);
        if (r < 0) {
            return r;
        }
    }
    victim->offset = 0;
    if (fresh) {
        memset(victim->table, 0, c->table_size);
    } else {
        int r = bdrv_pread(bs->file, offset, victim->table, c->table_size);
        if (r < 0) {
            return r;
        }
    }
    victim->offset = offset;
    victim->lru = ++c->clock;
    *ret_table = victim->table;
    return 0;
}

void qcow2_cache_mark_dirty_locked(Qcow2L2Cache *c, const void *table)
{
    for (unsigned i = 0; i < c->nb; i++) {
        if (c->e[i].table == table && c->e[i].offset) {
            if (!c->e[i].dirty) {
                c->e[i].dirty = true;
                c->nb_dirty++;
            }
            return;
        }
    }
}

void qcow2_cache_drop_locked(Qcow2L2Cache *c, uint64_t offset)
{
    for (unsigned i = 0; i < c->nb; i++) {
        if (c->e[i].offset == offset) {
            c->e[i].offset = 0;
            if (c->e[i].dirty) {
                c->e[i].dirty = false;
                c->nb_dirty--;
            }
        }
    }
}

/* Write the changed L1 entries (C2: the caller synced before). */
static int l1_writeback_locked(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    uint32_t lo = s->l1_dirty_lo, hi = s->l1_dirty_hi;
    if (lo >= hi) {
        return 0;
    }
    _cleanup_free_ uint64_t *be = malloc((size_t)(hi - lo) * 8);
    if (!be) {
        return -ENOMEM;
    }
    for (uint32_t i = lo; i < hi; i++) {
        be[i - lo] = htobe64(s->l1_table[i]);
    }
    int r = qcow2_check_overlap_locked(bs, QCOW2_OL_ACTIVE_L1,
                                       s->l1_table_offset + (uint64_t)lo * 8,
                                       (uint64_t)(hi - lo) * 8);
    if (r < 0) {
        return r;
    }
    r = bdrv_pwrite(bs->file, s->l1_table_offset + (uint64_t)lo * 8, be,
                        (uint64_t)(hi - lo) * 8, 0);
    if (r == 0) {
        s->l1_dirty_lo = UINT32_MAX;
        s->l1_dirty_hi = 0;
    }
    return r;
}

int qcow2_flush_metadata_locked(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    if (!s->writable) {
        return 0;
    }
    if (qcow2_is_corrupt(s)) {
        return -EIO;   /* O2: nothing more reaches the file */
    }
    /* Step 1: refcount blocks. */
    int r = qcow2_cache_writeback_locked(bs, s->refblock_cache);
    if (r < 0) {
        return r;
    }
    /* Step 2: L2 tables, then L1 (C1, C2). */
    if (s->l2_cache->nb_dirty || s->l1_dirty_lo < s->l1_dirty_hi) {
        r = qcow2_sync_if_needed_locked(bs);
        if (r == 0) {
            r = qcow2_cache_writeback_locked(bs, s->l2_cache);
        }
        if (r == 0) {
            r = l1_writeback_locked(bs);
        }
        if (r < 0) {
            return r;
        }
    }
    /* Step 3: deferred frees, once the removals are durable (C3). */
    if (s->nb_pending_frees) {
        r = qcow2_sync_locked(bs);
        if (r < 0) {
            return r;
        }
        qcow2_apply_pending_frees_locked(bs);
        r = qcow2_cache_writeback_locked(bs, s->refblock_cache);
    }
    return r;
}

/* ---- mapping ---- */

Qcow2ClusterType qcow2_l2_entry_type(BDRVQcow2State *s, uint64_t entry)
{
    if (entry & QCOW2_OFLAG_COMPRESSED) {
        return QCOW2_CLUSTER_COMPRESSED;
    }
    if ((entry & QCOW2_OFLAG_ZERO) && s->version >= 3) {
        return (entry & QCOW2_L2E_OFFSET_MASK) ? QCOW2_CLUSTER_ZERO_ALLOC
                                               : QCOW2_CLUSTER_ZERO_PLAIN;
    }
    return (entry & QCOW2_L2E_OFFSET_MASK) ? QCOW2_CLUSTER_NORMAL
                                           : QCOW2_CLUSTER_UNALLOCATED;
}

/* The L2 table offset in L1 entry `l1_index`, checked; 0 if none. */
static int l1_entry_locked(BlockDriverState *bs, uint64_t l1_index,
                           uint64_t *ret_l2_offset)
{
    BDRVQcow2State *s = bs->opaque;
    if (l1_index >= s->l1_size) {
        return -EIO;
    }
    uint64_t l2_offset = s->l1_table[l1_index] & QCOW2_L1E_OFFSET_MASK;
    if (l2_offset && ((l2_offset & (s->cluster_size - 1)) ||
                      l2_offset + s->cluster_size > qcow2_file_length(bs))) {
        return -EIO;   /* unaligned or past the end of the file */
    }
    *ret_l2_offset = l2_offset;
    return 0;
}

int qcow2_get_mapping_locked(BlockDriverState *bs, uint64_t offset,
                             uint64_t bytes, Qcow2ClusterType *ret_type,
                             uint64_t *ret_host, uint64_t *ret_bytes)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t in_cluster = offset & (cs - 1);
    uint64_t l2_entries = 1ull << s->l2_bits;
    uint64_t l1_index = offset >> (s->cluster_bits + s->l2_bits);
    unsigned l2_index = (unsigned)((offset >> s->cluster_bits) & (l2_entries - 1));
    /* Stay within one L2 table. */
    uint64_t max_bytes = (l2_entries - l2_index) * cs - in_cluster;
    bytes = MIN(bytes, max_bytes);

    uint64_t l2_offset;
    int r = l1_entry_locked(bs, l1_index, &l2_offset);
    if (r < 0) {
        return r;
    }
    if (!l2_offset) {
        *ret_type = QCOW2_CLUSTER_UNALLOCATED;
        *ret_host = 0;
        *ret_bytes = bytes;
        return 0;
    }
    uint64_t *table;
    r = qcow2_cache_get_locked(bs, s->l2_cache, l2_offset, false, (void **)&table);
    if (r < 0) {
        return r;
    }
    uint64_t first = be64toh(table[l2_index]);
    Qcow2ClusterType type = qcow2_l2_entry_type(s, first);
    uint64_t host = first & QCOW2_L2E_OFFSET_MASK;
    if ((type == QCOW2_CLUSTER_NORMAL || type == QCOW2_CLUSTER_ZERO_ALLOC) &&
        (host & (cs - 1))) {
        return -EIO;
    }
    uint64_t nb_clusters = DIV_ROUND_UP(in_cluster + bytes, cs);
    uint64_t n = 1;
    if (type != QCOW2_CLUSTER_COMPRESSED) {
        while (n < nb_clusters) {
            uint64_t e = be64toh(table[l2_index + n]);
            if (qcow2_l2_entry_type(s, e) != type) {
                break;
            }
            if (type == QCOW2_CLUSTER_NORMAL &&
                (e & QCOW2_L2E_OFFSET_MASK) != host + n * cs) {
                break;
            }
            n++;
        }
    }
    *ret_type = type;
    *ret_host = type == QCOW2_CLUSTER_COMPRESSED ? first : host + in_cluster;
    *ret_bytes = MIN(bytes, n * cs - in_cluster);
    return 0;
}

int qcow2_get_l2_locked(BlockDriverState *bs, uint64_t offset, bool alloc,
                        uint64_t **ret_table, uint64_t *ret_l2_offset,
                        unsigned *ret_index)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t l1_index = offset >> (s->cluster_bits + s->l2_bits);
    uint64_t l2_offset;
    int r = l1_entry_locked(bs, l1_index, &l2_offset);
    if (r < 0) {
        return r;
    }
    *ret_index = (unsigned)((offset >> s->cluster_bits) & ((1ull << s->l2_bits) - 1));
    if (l2_offset) {
        if (!(s->l1_table[l1_index] & QCOW2_OFLAG_COPIED) && alloc) {
            return -EIO;   /* shared L2 tables exist only with snapshots */
        }
        *ret_l2_offset = l2_offset;
        return qcow2_cache_get_locked(bs, s->l2_cache, l2_offset, false,
                                      (void **)ret_table);
    }
    if (!alloc) {
        *ret_table = NULL;
        *ret_l2_offset = 0;
        return 0;
    }

    /* A new, empty L2 table: refcount (cached), the zero-filled table
     * written now, the L1 entry in memory, written at a flush (C2). */
    int64_t off = qcow2_alloc_clusters_locked(bs, s->cluster_size);
    if (off < 0) {
        return (int)off;
    }
    uint64_t *table;
    r = qcow2_cache_get_locked(bs, s->l2_cache, (uint64_t)off, true, (void **)&table);
    if (r == 0) {
        r = bdrv_pwrite(bs->file, (uint64_t)off, table, s->cluster_size, 0);
    }
    if (r < 0) {
        qcow2_cache_drop_locked(s->l2_cache, (uint64_t)off);
        qcow2_free_clusters_locked(bs, (uint64_t)off, s->cluster_size);
        return r;
    }
    qcow2_note_write_locked(bs);
    s->l1_table[l1_index] = (uint64_t)off | QCOW2_OFLAG_COPIED;
    s->l1_dirty_lo = MIN(s->l1_dirty_lo, (uint32_t)l1_index);
    s->l1_dirty_hi = MAX(s->l1_dirty_hi, (uint32_t)l1_index + 1);
    *ret_table = table;
    *ret_l2_offset = (uint64_t)off;
    return 0;
}

int qcow2_write_l2_entries_locked(BlockDriverState *bs, uint64_t *table,
                                  uint64_t l2_offset, unsigned index,
                                  unsigned n)
{
    BDRVQcow2State *s = bs->opaque;
    (void)l2_offset;
    (void)index;
    (void)n;
    qcow2_cache_mark_dirty_locked(s->l2_cache, table);
    return 0;
}

void qcow2_compressed_range(BDRVQcow2State *s, uint64_t entry,
                            uint64_t *ret_offset, uint64_t *ret_bytes)
{
    unsigned x = 62 - (s->cluster_bits - 8);
    uint64_t off = entry & ((1ull << x) - 1);
    uint64_t sectors = ((entry & ~QCOW2_OFLAG_COPIED & ~QCOW2_OFLAG_COMPRESSED) >> x) + 1;
    *ret_offset = off;
    *ret_bytes = sectors * 512 - (off & 511);
}

int qcow2_free_l2_entry_locked(BlockDriverState *bs, uint64_t entry)
{
    BDRVQcow2State *s = bs->opaque;
    switch (qcow2_l2_entry_type(s, entry)) {
    case QCOW2_CLUSTER_NORMAL:
    case QCOW2_CLUSTER_ZERO_ALLOC:
        return qcow2_free_clusters_locked(bs, entry & QCOW2_L2E_OFFSET_MASK,
                                          s->cluster_size);
    case QCOW2_CLUSTER_COMPRESSED: {
        uint64_t off, len;
        qcow2_compressed_range(s, entry, &off, &len);
        uint64_t start = ROUND_DOWN(off, s->cluster_size);
        return qcow2_free_clusters_locked(bs, start, off + len - start);
    }
    default:
        return 0;
    }
}

/* ---- compressed clusters ---- */

static int inflate_raw(const uint8_t *in, size_t in_len, uint8_t *out,
                       size_t out_len)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, -12) != Z_OK) {
        return -ENOMEM;
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)in_len;
    z.next_out = out;
    z.avail_out = (uInt)out_len;
    int r = inflate(&z, Z_FINISH);
    bool ok = (r == Z_STREAM_END || r == Z_BUF_ERROR) && z.avail_out == 0;
    inflateEnd(&z);
    return ok ? 0 : -EIO;
}

static int zstd_decompress_cluster(const uint8_t *in, size_t in_len,
                                   uint8_t *out, size_t out_len)
{
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    if (!dctx) {
        return -ENOMEM;
    }
    ZSTD_inBuffer input = { in, in_len, 0 };
    ZSTD_outBuffer output = { out, out_len, 0 };
    int ret = 0;
    /* The compressed data may be followed by padding: stop once the
     * cluster is full. */
    while (output.pos < output.size) {
        size_t before_in = input.pos, before_out = output.pos;
        size_t z = ZSTD_decompressStream(dctx, &output, &input);
        if (ZSTD_isError(z)) {
            ret = -EIO;
            break;
        }
        if (input.pos == before_in && output.pos == before_out) {
            ret = -EIO;   /* no progress: truncated data */
            break;
        }
    }
    ZSTD_freeDCtx(dctx);
    return ret;
}

int qcow2_read_compressed(BlockDriverState *bs, uint64_t entry, uint8_t *out)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t off, len;
    qcow2_compressed_range(s, entry, &off, &len);
    uint64_t flen = qcow2_file_length(bs);
    if (off >= flen || len > 2 * s->cluster_size + 512) {
        return -EIO;
    }
    /* The last sector count may reach past the end of the file. */
    len = MIN(len, flen - off);
    _cleanup_free_ uint8_t *buf = malloc(len);
    if (!buf) {
        return -ENOMEM;
    }
    int r = bdrv_pread(bs->file, off, buf, len);
    if (r < 0) {
        return r;
    }
    if (s->compression_type == 1) {
        return zstd_decompress_cluster(buf, len, out, s->cluster_size);
    }
    return inflate_raw(buf, len, out, s->cluster_size);
}

int qcow2_compress_cluster(BDRVQcow2State *s, int level, const uint8_t *in,
                           uint8_t *out, size_t out_cap, size_t *ret_len)
{
    if (s->compression_type == 1) {
        /* A plain zstd frame, as QEMU writes (qcow2-threads.c). */
        ZSTD_CCtx *cctx = ZSTD_createCCtx();
        if (!cctx) {
            return -ENOMEM;
        }
        int lvl = level ? MIN(level, ZSTD_maxCLevel()) : ZSTD_CLEVEL_DEFAULT;
        size_t z = ZSTD_compressCCtx(cctx, out, out_cap, in, s->cluster_size, lvl);
        ZSTD_freeCCtx(cctx);
        if (ZSTD_isError(z)) {
            return ZSTD_getErrorCode(z) == ZSTD_error_dstSize_tooSmall ? -ENOSPC
                                                                       : -EIO;
        }
        *ret_len = z;
        return 0;
    }
    /* Raw deflate with a 4 KiB window (windowBits -12), as QEMU. */
    z_stream z;
    memset(&z, 0, sizeof(z));
    int lvl = level ? MIN(level, Z_BEST_COMPRESSION) : Z_DEFAULT_COMPRESSION;
    if (deflateInit2(&z, lvl, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
        return -ENOMEM;
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)s->cluster_size;
    z.next_out = out;
    z.avail_out = (uInt)out_cap;
    int r = deflate(&z, Z_FINISH);
    size_t len = out_cap - z.avail_out;
    deflateEnd(&z);
    if (r != Z_STREAM_END) {
        return r == Z_OK || r == Z_BUF_ERROR ? -ENOSPC : -EIO;
    }
    *ret_len = len;
    return 0;
}

uint64_t qcow2_compressed_entry(BDRVQcow2State *s, uint64_t host, uint64_t len)
{
    unsigned x = 62 - (s->cluster_bits - 8);
    uint64_t extra = ((host + len - 1) >> 9) - (host >> 9);
    return QCOW2_OFLAG_COMPRESSED | (extra << x) | host;
}
