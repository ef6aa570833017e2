/*
 * qcow2 metadata overlap checks and corruption marking (QEMU's
 * qcow2_check_metadata_overlap in its default "cached" mode, and
 * qcow2_signal_corruption).
 *
 * Contract (docs/specs/qcow2.md, O1-O3):
 *   O1. Before bitback writes host bytes of a writable image -- guest data
 *       in place, newly allocated clusters of any kind, a refcount block,
 *       L2 table or the L1/refcount table written back -- the range is
 *       checked against the metadata known in memory: the header cluster,
 *       the active L1 table, every L2 table the L1 table names, the
 *       refcount table, every refcount block it names, the snapshot table
 *       and the bitmap directory.  The kinds the caller is writing are
 *       left out (`ignore`).  The cost is O(L1 entries + refcount table
 *       entries), memory already held, no reads.
 *   O2. On an overlap (or another corruption a write finds, O3) the write
 *       is refused with -EIO, the corrupt bit (incompatible feature bit 1)
 *       is set in memory and, best effort, on disk, and every later write,
 *       allocation and metadata write-back is refused with -EIO.  Reads
 *       still work.  A read-only open never writes the bit.
 *   O3. A clean image never trips O1: the allocator only hands out
 *       clusters whose refcount is 0, and no metadata has refcount 0 in a
 *       consistent image.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>

#include "block/drivers/qcow2/qcow2.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/error.h"

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

/* The kind of metadata [offset, offset+size) overlaps, 0 if none. */
static unsigned overlap_kind(BDRVQcow2State *s, unsigned ignore,
                             uint64_t offset, uint64_t size)
{
    uint64_t cs = s->cluster_size;
    if (!(ignore & QCOW2_OL_HEADER) && ranges_overlap(offset, size, 0, cs)) {
        return QCOW2_OL_HEADER;
    }
    if (!(ignore & QCOW2_OL_ACTIVE_L1) &&
        ranges_overlap(offset, size, s->l1_table_offset,
                       (uint64_t)s->l1_size * 8)) {
        return QCOW2_OL_ACTIVE_L1;
    }
    if (!(ignore & QCOW2_OL_REFCOUNT_TABLE) &&
        ranges_overlap(offset, size, s->refcount_table_offset,
                       (uint64_t)s->refcount_table_clusters * cs)) {
        return QCOW2_OL_REFCOUNT_TABLE;
    }
    if (!(ignore & QCOW2_OL_SNAPSHOT_TABLE) && s->nb_snapshots &&
        ranges_overlap(offset, size, s->snapshots_offset, cs)) {
        return QCOW2_OL_SNAPSHOT_TABLE;
    }
    if (!(ignore & QCOW2_OL_BITMAP_DIRECTORY) && s->nb_bitmaps &&
        ranges_overlap(offset, size, s->bitmap_directory_offset,
                       s->bitmap_directory_size)) {
        return QCOW2_OL_BITMAP_DIRECTORY;
    }
    /* Tables are cluster-aligned and one cluster long: compare clusters. */
    uint64_t first = offset >> s->cluster_bits;
    uint64_t last = (offset + size - 1) >> s->cluster_bits;
    if (!(ignore & QCOW2_OL_ACTIVE_L2)) {
        for (uint32_t i = 0; i < s->l1_size; i++) {
            uint64_t c = (s->l1_table[i] & QCOW2_L1E_OFFSET_MASK) >> s->cluster_bits;
            if (c && c >= first && c <= last) {
                return QCOW2_OL_ACTIVE_L2;
            }
        }
    }
    if (!(ignore & QCOW2_OL_REFCOUNT_BLOCK)) {
        for (uint64_t i = 0; i < s->refcount_table_size; i++) {
            uint64_t c = (s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK) >> s->cluster_bits;
            if (c && c >= first && c <= last) {
                return QCOW2_OL_REFCOUNT_BLOCK;
            }
        }
    }
    return 0;
}

static const char *overlap_name(unsigned kind)
{
    switch (kind) {
    case QCOW2_OL_HEADER: return "qcow2_header";
    case QCOW2_OL_ACTIVE_L1: return "active L1 table";
    case QCOW2_OL_ACTIVE_L2: return "active L2 table";
    case QCOW2_OL_REFCOUNT_TABLE: return "refcount table";
    case QCOW2_OL_REFCOUNT_BLOCK: return "refcount block";
    case QCOW2_OL_SNAPSHOT_TABLE: return "snapshot table";
    default: return "bitmap directory";
    }
}

int qcow2_signal_corruption_locked(BlockDriverState *bs, const char *fmt, ...)
{
    BDRVQcow2State *s = bs->opaque;
    va_list ap;
    va_start(ap, fmt);
    _cleanup_free_ char *why = vstrprintf(fmt, ap);
    va_end(ap);
    bool first = !(s->incompatible_features & QCOW2_INCOMPAT_CORRUPT);
    if (first) {
        error_report("qcow2: Marking image '%s' as corrupt: %s; further "
                     "corruption events will be suppressed",
                     bs->filename ? bs->filename : "image",
                     why ? why : "(out of memory)");
    }
    s->incompatible_features |= QCOW2_INCOMPAT_CORRUPT;
    if (first && s->writable && s->version >= 3) {
        /* Only the feature field: the rest of the header may be what is
         * damaged.  Best effort: the in-memory bit refuses writes anyway. */
        uint64_t be = htobe64(s->incompatible_features);
        if (bdrv_pwrite(bs->file, 72, &be, 8, 0) == 0) {
            bdrv_flush(bs->file);
        }
    }
    return -EIO;
}

int qcow2_check_overlap_locked(BlockDriverState *bs, unsigned ignore,
                               uint64_t offset, uint64_t size)
{
    BDRVQcow2State *s = bs->opaque;
    if (s->incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
        return -EIO;
    }
    if (size == 0) {
        return 0;
    }
    if (offset >= QCOW2_MAX_HOST_OFFSET || size > QCOW2_MAX_HOST_OFFSET - offset) {
        return qcow2_signal_corruption_locked(bs, "write at host offset 0x%"
                                              PRIx64 " is past the qcow2 limit",
                                              offset);
    }
    unsigned kind = overlap_kind(s, ignore, offset, size);
    if (kind) {
        return qcow2_signal_corruption_locked(bs, "Preventing invalid write on "
                                              "metadata (overlaps with %s) at "
                                              "0x%" PRIx64 " (%" PRIu64 " bytes)",
                                              overlap_name(kind), offset, size);
    }
    return 0;
}
