/*
 * The qcow2 format driver: header and header extensions, open, close and
 * create, the I/O entry points (read, write, zero write, discard, flush),
 * block status, info, and the driver vtable.  Mapping lives in
 * qcow2-cluster.c, refcounts and the check in qcow2-refcount.c, the
 * persistent bitmaps extension in qcow2-bitmap.c.
 *
 * Header extensions we do not parse are kept as they are on every header
 * rewrite.  bitback's own generations extension (0x62626b67) is read here
 * raw and interpreted by qcow2-bitmap.c; it is trusted only together with
 * its autoclear bit, which QEMU clears when it opens the image for writing.
 *
 * Version 3 images are read and written; version 2 images are read only.
 * Encryption, external data files, extended L2 entries and unknown
 * incompatible features are refused at open; an image with internal
 * snapshots opens read-only only.  Nothing is marked dirty at open (no lazy
 * refcounts): metadata is written back in an order that keeps the image
 * consistent at every moment (qcow2.h, qcow2-cluster.c C1-C4), at each
 * flush and at close, so a cleanly closed image passes `qemu-img check`
 * and a crashed one shows leaks at worst.
 *
 * Writes and allocation (the contract with concurrent requests):
 *   1. Metadata (L1, L2 tables and cache, refcounts, header) changes only
 *      under s->lock.  Data I/O never holds it.
 *   2. A write into clusters that are already allocated (NORMAL, with the
 *      COPIED flag) looks up the host offset under the lock and writes
 *      without it.
 *   3. A write that needs new clusters registers the guest clusters as
 *      in flight (s->inflight) while holding the lock, allocates host
 *      clusters (refcounts changed in the cache), then drops the lock to
 *      copy the untouched head and tail of the clusters (from what a read of them
 *      returns now: backing file, zeroes, compressed data) and write the
 *      data, and takes the lock again to change the L2 entries in the
 *      cache (written back later, after the refcounts and the data are
 *      synced), freeing (deferred) what they replaced.  Any request
 *      touching an in-flight cluster (write, zero write, discard) waits,
 *      so two writers never allocate the same guest cluster.
 *   4. Zero writes and discards of whole clusters change L2 entries only
 *      (zero flag, or unallocated without a backing file); partial
 *      clusters of a zero write are written as data, of a discard ignored.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/drivers/file-lock.h"
#include "block/drivers/qcow2/qcow2.h"
#include "util/cleanup.h"
#include "util/bswap.h"
#include "util/cutils.h"
#include "util/iov.h"
#include "util/json-opts.h"

#define QCOW2_HEADER_V3_LENGTH 112   /* 104 + compression type + padding */

typedef struct Qcow2InFlight {
    uint64_t first, end;             /* guest cluster indexes [first, end) */
    bool alloc;                      /* allocating (else an in-place write) */
    struct Qcow2InFlight *next;
} Qcow2InFlight;

uint64_t qcow2_file_length(BlockDriverState *bs)
{
    int64_t len = bdrv_getlength(bs->file);
    return len < 0 ? 0 : (uint64_t)len;
}

/* ---- header ---- */

static int qcow2_probe(const uint8_t *buf, size_t len, const char *filename)
{
    if (len >= 8 && ld_be32(buf) == QCOW2_MAGIC) {
        uint32_t v = ld_be32(buf + 4);
        return v == 2 || v == 3 ? 100 : 0;
    }
    return 0;
}

/* The name of feature `bit` of `type` from the feature name table, for
 * error messages. */
static void feature_name(const uint8_t *table, size_t len, int type, int bit,
                         char out[48])
{
    snprintf(out, 48, "bit %d", bit);
    for (size_t i = 0; table && i + 48 <= len; i += 48) {
        if (table[i] == type && table[i + 1] == bit) {
            snprintf(out, 48, "%.46s", (const char *)table + i + 2);
        }
    }
}

static bool append_ext(uint8_t **buf, size_t *len, const uint8_t *ext,
                       size_t ext_len)
{
    uint8_t *n = realloc(*buf, *len + ext_len);
    if (!n) {
        return false;
    }
    memcpy(n + *len, ext, ext_len);
    *buf = n;
    *len += ext_len;
    return true;
}

/* Parse the header extensions in hdr[start, end). */
static bool parse_extensions(BDRVQcow2State *s, const uint8_t *hdr,
                             uint64_t start, uint64_t end,
                             const uint8_t **ret_features, size_t *ret_features_len,
                             Error **errp)
{
    uint64_t pos = start;
    bool seen_bitmaps = false;
    bool seen_gen = false;
    while (pos + 8 <= end) {
        uint32_t type = ld_be32(hdr + pos);
        uint32_t len = ld_be32(hdr + pos + 4);
        uint64_t total = 8 + ROUND_UP((uint64_t)len, 8);
        if (type == QCOW2_EXT_END) {
            return true;
        }
        if (pos + 8 + len > end) {
            error_setg(errp, "qcow2: header extension 0x%08x overruns the "
                       "first cluster", type);
            return false;
        }
        const uint8_t *data = hdr + pos + 8;
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            free(s->backing_format);
            s->backing_format = strndup((const char *)data, len);
            if (!s->backing_format) {
                error_setg(errp, "out of memory");
                return false;
            }
            break;
        case QCOW2_EXT_BITMAPS:
            if (len < 24) {
                error_setg(errp, "qcow2: the bitmaps extension is too short");
                return false;
            }
            s->nb_bitmaps = ld_be32(data);
            s->bitmap_directory_size = ld_be64(data + 8);
            s->bitmap_directory_offset = ld_be64(data + 16);
            seen_bitmaps = true;
            break;
        case QCOW2_EXT_DATA_FILE:
            error_setg(errp, "qcow2: images with an external data file are "
                       "not supported");
            return false;
        case QCOW2_EXT_BITBACK_GENERATIONS:
            /* Interpreted (and validated) by qcow2-bitmap.c at load.  Two
             * copies are ambiguous: neither is trusted, and the next store
             * writes one fresh copy. */
            free(s->gen_ext);
            s->gen_ext = NULL;
            s->gen_ext_len = 0;
            if (!seen_gen && len > 0) {
                s->gen_ext = malloc(len);
                if (!s->gen_ext) {
                    error_setg(errp, "out of memory");
                    return false;
                }
                memcpy(s->gen_ext, data, len);
                s->gen_ext_len = len;
            }
            seen_gen = true;
            break;
        case QCOW2_EXT_FEATURE_TABLE:
            *ret_features = data;
            *ret_features_len = len;
            __attribute__((fallthrough));   /* preserved as is */
        default:
            if (pos + total > end) {
                total = end - pos;
            }
            if (!append_ext(&s->other_exts, &s->other_exts_len, hdr + pos, total)) {
                error_setg(errp, "out of memory");
                return false;
            }
            break;
        }
        pos += total;
    }
    (void)seen_bitmaps;
    return true;
}

/* Bytes of the first cluster the header takes besides the generations
 * extension (with a bitmaps extension, whether or not there is one now). */
static uint64_t header_fixed_bytes(BDRVQcow2State *s)
{
    uint64_t n = QCOW2_HEADER_V3_LENGTH + 32 + s->other_exts_len + 8;
    if (s->backing_format && s->backing_file) {
        n += 8 + ROUND_UP(strlen(s->backing_format), 8);
    }
    if (s->backing_file) {
        n += strlen(s->backing_file);
    }
    return n;
}

uint64_t qcow2_gen_ext_space_locked(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t used = header_fixed_bytes(s) + 8;   /* + our type and length */
    return used >= s->cluster_size ? 0
                                   : ROUND_DOWN(s->cluster_size - used, 8);
}

int qcow2_update_header_locked(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    if (s->version < 3) {
        return -ENOTSUP;
    }
    _cleanup_free_ uint8_t *buf = calloc(1, cs);
    if (!buf) {
        return -ENOMEM;
    }
    uint64_t pos = QCOW2_HEADER_V3_LENGTH;
    /* Extensions: backing format, bitmaps, then the preserved ones. */
    if (s->backing_format && s->backing_file) {
        size_t n = strlen(s->backing_format);
        if (pos + 8 + ROUND_UP(n, 8) > cs) {
            return -EFBIG;
        }
        st_be32(buf + pos, QCOW2_EXT_BACKING_FORMAT);
        st_be32(buf + pos + 4, (uint32_t)n);
        memcpy(buf + pos + 8, s->backing_format, n);
        pos += 8 + ROUND_UP(n, 8);
    }
    if (s->nb_bitmaps > 0) {
        if (pos + 32 > cs) {
            return -EFBIG;
        }
        st_be32(buf + pos, QCOW2_EXT_BITMAPS);
        st_be32(buf + pos + 4, 24);
        st_be32(buf + pos + 8, s->nb_bitmaps);
        st_be64(buf + pos + 16, s->bitmap_directory_size);
        st_be64(buf + pos + 24, s->bitmap_directory_offset);
        pos += 32;
    }
    /* The generations extension goes with its autoclear bit, both or
     * neither.  If it no longer fits (qcow2-bitmap.c sizes it by
     * qcow2_gen_ext_space_locked, so only a corner case), it is dropped:
     * every bitmap's generation is then unknown at the next open. */
    if (s->gen_ext_len && (s->autoclear_features & QCOW2_AUTOCLEAR_BITBACK_GENERATIONS) &&
        ROUND_UP((uint64_t)s->gen_ext_len, 8) > qcow2_gen_ext_space_locked(bs)) {
        free(s->gen_ext);
        s->gen_ext = NULL;
        s->gen_ext_len = 0;
    }
    if (!s->gen_ext_len) {
        s->autoclear_features &= ~QCOW2_AUTOCLEAR_BITBACK_GENERATIONS;
    }
    if (s->autoclear_features & QCOW2_AUTOCLEAR_BITBACK_GENERATIONS) {
        st_be32(buf + pos, QCOW2_EXT_BITBACK_GENERATIONS);
        st_be32(buf + pos + 4, s->gen_ext_len);
        memcpy(buf + pos + 8, s->gen_ext, s->gen_ext_len);
        pos += 8 + ROUND_UP((uint64_t)s->gen_ext_len, 8);
    }
    if (pos + s->other_exts_len + 8 > cs) {
        return -EFBIG;
    }
    if (s->other_exts_len) {
        memcpy(buf + pos, s->other_exts, s->other_exts_len);
        pos += s->other_exts_len;
    }
    pos += 8;   /* end of extensions (zeroes) */
    uint64_t backing_offset = 0;
    uint32_t backing_size = 0;
    if (s->backing_file) {
        backing_size = (uint32_t)strlen(s->backing_file);
        if (pos + backing_size > cs) {
            return -EFBIG;
        }
        backing_offset = pos;
        memcpy(buf + pos, s->backing_file, backing_size);
        pos += backing_size;
    }

    uint64_t incompat = s->incompatible_features & ~QCOW2_INCOMPAT_COMPRESSION;
    if (s->compression_type != 0) {
        incompat |= QCOW2_INCOMPAT_COMPRESSION;
    }
    st_be32(buf + 0, QCOW2_MAGIC);
    st_be32(buf + 4, 3);
    st_be64(buf + 8, backing_offset);
    st_be32(buf + 16, backing_size);
    st_be32(buf + 20, s->cluster_bits);
    st_be64(buf + 24, s->size);
    st_be32(buf + 32, 0);
    st_be32(buf + 36, s->l1_size);
    st_be64(buf + 40, s->l1_table_offset);
    st_be64(buf + 48, s->refcount_table_offset);
    st_be32(buf + 56, s->refcount_table_clusters);
    st_be32(buf + 60, s->nb_snapshots);
    st_be64(buf + 64, s->snapshots_offset);
    st_be64(buf + 72, incompat);
    st_be64(buf + 80, s->compatible_features);
    st_be64(buf + 88, s->autoclear_features);
    st_be32(buf + 96, s->refcount_order);
    st_be32(buf + 100, QCOW2_HEADER_V3_LENGTH);
    buf[104] = s->compression_type;

    /* Whatever the header names (bitmap directory, tables) has its
     * refcounts durable first. */
    int r = qcow2_flush_metadata_locked(bs);
    if (r == 0) {
        r = qcow2_sync_if_needed_locked(bs);
    }
    if (r == 0) {
        r = qcow2_check_overlap_locked(bs, QCOW2_OL_HEADER, 0, pos);
    }
    if (r == 0) {
        r = bdrv_pwrite(bs->file, 0, buf, pos, 0);
    }
    if (r == 0) {
        r = qcow2_sync_locked(bs);
    }
    if (r == 0) {
        s->header_length = QCOW2_HEADER_V3_LENGTH;
    }
    return r;
}

/* ---- open / close ---- */

static void qcow2_state_free(BDRVQcow2State *s)
{
    free(s->l1_table);
    free(s->refcount_table);
    free(s->backing_file);
    free(s->backing_format);
    free(s->other_exts);
    free(s->gen_ext);
    free(s->gen_ext_stale);
    qcow2_cache_free(s->l2_cache);
    qcow2_cache_free(s->refblock_cache);
    qcow2_pending_frees_free(s);
    s->l1_table = NULL;
    s->refcount_table = NULL;
    s->backing_file = NULL;
    s->backing_format = NULL;
    s->other_exts = NULL;
    s->gen_ext = NULL;
    s->gen_ext_len = 0;
    s->l2_cache = NULL;
    s->refblock_cache = NULL;
}

static bool qcow2_read_header(BlockDriverState *bs, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t flen = qcow2_file_length(bs);
    uint8_t h[QCOW2_HEADER_V3_LENGTH];
    const char *name = bs->filename ? bs->filename : "image";

    if (flen < 72) {
        error_setg(errp, "qcow2: '%s' is too short to be a qcow2 image", name);
        return false;
    }
    memset(h, 0, sizeof(h));
    int r = bdrv_pread(bs->file, 0, h, MIN(flen, sizeof(h)));
    if (r < 0) {
        error_setg_errno(errp, -r, "qcow2: cannot read the header of '%s'", name);
        return false;
    }
    if (ld_be32(h) != QCOW2_MAGIC) {
        error_setg(errp, "qcow2: '%s' is not a qcow2 image (bad magic)", name);
        return false;
    }
    s->version = ld_be32(h + 4);
    if (s->version != 2 && s->version != 3) {
        error_setg(errp, "qcow2: unsupported qcow2 version %u", s->version);
        return false;
    }
    s->cluster_bits = ld_be32(h + 20);
    if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        s->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        error_setg(errp, "qcow2: unsupported cluster size: 2^%u (cluster_bits "
                   "must be between %d and %d)", s->cluster_bits,
                   QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
        return false;
    }
    s->cluster_size = 1ull << s->cluster_bits;
    s->l2_bits = s->cluster_bits - 3;
    s->size = ld_be64(h + 24);
    if (s->size > BDRV_MAX_LENGTH) {
        error_setg(errp, "qcow2: the image size %" PRIu64 " is too large", s->size);
        return false;
    }
    if (ld_be32(h + 32) != 0) {
        error_setg(errp, "qcow2: encrypted images are not supported");
        return false;
    }
    s->l1_size = ld_be32(h + 36);
    s->l1_table_offset = ld_be64(h + 40);
    s->refcount_table_offset = ld_be64(h + 48);
    s->refcount_table_clusters = ld_be32(h + 56);
    s->nb_snapshots = ld_be32(h + 60);
    s->snapshots_offset = ld_be64(h + 64);
    s->refcount_order = 4;
    s->header_length = 72;
    if (s->version >= 3) {
        s->incompatible_features = ld_be64(h + 72);
        s->compatible_features = ld_be64(h + 80);
        s->autoclear_features = ld_be64(h + 88);
        s->refcount_order = ld_be32(h + 96);
        s->header_length = ld_be32(h + 100);
        if (s->header_length < 104 || (s->header_length & 7)) {
            error_setg(errp, "qcow2: invalid header_length %u (at least 104 "
                       "and a multiple of 8)", s->header_length);
            return false;
        }
        if (s->header_length > 104) {
            s->compression_type = h[104];
        }
    }
    if (s->header_length > s->cluster_size) {
        error_setg(errp, "qcow2: header_length %u is larger than a cluster",
                   s->header_length);
        return false;
    }
    if (s->refcount_order > 6) {
        error_setg(errp, "qcow2: invalid refcount_order %u (at most 6)",
                   s->refcount_order);
        return false;
    }

    /* The whole first cluster: extensions and the backing file name. */
    uint64_t first_len = MIN(s->cluster_size, flen);
    _cleanup_free_ uint8_t *hdr = malloc(first_len);
    if (!hdr) {
        error_setg(errp, "out of memory");
        return false;
    }
    r = bdrv_pread(bs->file, 0, hdr, first_len);
    if (r < 0) {
        error_setg_errno(errp, -r, "qcow2: cannot read the header of '%s'", name);
        return false;
    }
    uint64_t backing_offset = ld_be64(h + 8);
    uint32_t backing_size = ld_be32(h + 16);
    uint64_t ext_end = first_len;
    if (backing_offset) {
        if (backing_size > 1023 || backing_offset > first_len ||
            backing_size > first_len - backing_offset) {
            error_setg(errp, "qcow2: invalid backing file name (offset %" PRIu64
                       ", length %u)", backing_offset, backing_size);
            return false;
        }
        s->backing_file = strndup((const char *)hdr + backing_offset, backing_size);
        if (!s->backing_file) {
            error_setg(errp, "out of memory");
            return false;
        }
        ext_end = MIN(ext_end, backing_offset);
    }
    const uint8_t *features = NULL;
    size_t features_len = 0;
    if (!parse_extensions(s, hdr, s->header_length, ext_end, &features,
                          &features_len, errp)) {
        return false;
    }
    if (!(s->autoclear_features & QCOW2_AUTOCLEAR_BITBACK_GENERATIONS) ||
        !s->gen_ext) {
        /* Another program opened the image for writing since bitback wrote
         * the records (or there are none): they may describe bitmaps that
         * were cleared and rewritten since, even at the same offsets.  They
         * still say what bitback last knew (G6). */
        s->gen_ext_stale = s->gen_ext;
        s->gen_ext_stale_len = s->gen_ext_len;
        s->gen_ext = NULL;
        s->gen_ext_len = 0;
        s->autoclear_features &= ~QCOW2_AUTOCLEAR_BITBACK_GENERATIONS;
    }

    /* Features. */
    uint64_t known = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT |
                     QCOW2_INCOMPAT_COMPRESSION;
    uint64_t unknown = s->incompatible_features & ~known;
    if (s->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
        error_setg(errp, "qcow2: images with an external data file are not "
                   "supported");
        return false;
    }
    if (s->incompatible_features & QCOW2_INCOMPAT_EXTL2) {
        error_setg(errp, "qcow2: images with extended L2 entries are not "
                   "supported");
        return false;
    }
    if (unknown) {
        char fname[48];
        int bit = __builtin_ctzll(unknown);
        feature_name(features, features_len, 0, bit, fname);
        error_setg(errp, "qcow2: unsupported incompatible feature: %s", fname);
        return false;
    }
    if (s->incompatible_features & QCOW2_INCOMPAT_COMPRESSION) {
        if (s->header_length <= 104 || s->compression_type == 0) {
            error_setg(errp, "qcow2: the compression type bit is set but no "
                       "compression type is given");
            return false;
        }
    } else if (s->compression_type != 0) {
        error_setg(errp, "qcow2: compression type %u without the compression "
                   "type bit", s->compression_type);
        return false;
    }
    if (s->compression_type > 1) {
        error_setg(errp, "qcow2: unknown compression type %u", s->compression_type);
        return false;
    }

    /* L1 table. */
    uint64_t l2_span = s->cluster_size << s->l2_bits;   /* bytes per L1 entry */
    uint64_t needed = DIV_ROUND_UP(s->size, l2_span);
    if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        error_setg(errp, "qcow2: the L1 table is too large (%u entries)", s->l1_size);
        return false;
    }
    if (s->l1_size < needed) {
        error_setg(errp, "qcow2: the L1 table is too small (%u entries) for "
                   "the image size %" PRIu64, s->l1_size, s->size);
        return false;
    }
    uint64_t l1_bytes = (uint64_t)s->l1_size * 8;
    if (s->l1_size && ((s->l1_table_offset & (s->cluster_size - 1)) ||
                       s->l1_table_offset > flen ||
                       l1_bytes > flen - s->l1_table_offset)) {
        error_setg(errp, "qcow2: the L1 table offset 0x%" PRIx64 " is invalid "
                   "(unaligned or past the end of the file)", s->l1_table_offset);
        return false;
    }
    s->l1_table = calloc(s->l1_size ? s->l1_size : 1, 8);
    if (!s->l1_table) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (s->l1_size) {
        r = bdrv_pread(bs->file, s->l1_table_offset, s->l1_table, l1_bytes);
        if (r < 0) {
            error_setg_errno(errp, -r, "qcow2: cannot read the L1 table");
            return false;
        }
        for (uint32_t i = 0; i < s->l1_size; i++) {
            s->l1_table[i] = be64toh(s->l1_table[i]);
        }
    }
    return true;
}

static bool qcow2_open(BlockDriverState *bs, struct json_object *options,
                       int flags, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->inflight_cond, NULL);
    s->writable = (flags & BDRV_O_RDWR) != 0;
    s->l1_dirty_lo = UINT32_MAX;
    s->l1_dirty_hi = 0;

    if (!qcow2_read_header(bs, errp) || !qcow2_refcount_init(bs, errp)) {
        goto fail;
    }
    if (s->writable) {
        const char *why = NULL;
        if (s->version < 3) {
            why = "version 2 (compat=0.10) images are read-only; "
                  "upgrade with qemu-img amend -o compat=1.1";
        } else if (s->nb_snapshots > 0) {
            why = "images with internal snapshots are read-only";
        } else if (s->incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
            why = "the image is marked corrupt; repair it with qemu-img check -r all";
        } else if (s->incompatible_features & QCOW2_INCOMPAT_DIRTY) {
            why = "the image is marked dirty (lazy refcounts); repair it "
                  "with qemu-img check -r all";
        }
        if (why) {
            error_setg(errp, "qcow2: cannot open '%s' for writing: %s",
                       bs->filename ? bs->filename : "image", why);
            goto fail;
        }
    }
    unsigned nb_l2 = (unsigned)MAX(4, MIN(64, (4u << 20) >> s->cluster_bits));
    s->l2_cache = qcow2_cache_new(nb_l2, s->cluster_size);
    /* Refcount blocks: each covers cluster_size * 8 / refcount bits
     * clusters, so a few suffice (at most 1 MiB). */
    unsigned nb_rb = (unsigned)MAX(4, MIN(16, (1u << 20) >> s->cluster_bits));
    s->refblock_cache = qcow2_cache_new(nb_rb, s->cluster_size);
    if (!s->l2_cache || !s->refblock_cache) {
        error_setg(errp, "out of memory");
        goto fail;
    }
    qcow2_cache_set_dependency(s->l2_cache, s->refblock_cache);
    s->free_cluster_index = 1;

    if (s->writable && (s->autoclear_features & ~QCOW2_AUTOCLEAR_KNOWN)) {
        /* Unknown autoclear features must be cleared before writing. */
        s->autoclear_features &= QCOW2_AUTOCLEAR_KNOWN;
        int r = qcow2_update_header_locked(bs);
        if (r < 0) {
            error_setg_errno(errp, -r, "qcow2: cannot update the header");
            goto fail;
        }
    }

    if (!bdrv_open_backing(bs, options, s->backing_file, s->backing_format, errp)) {
        goto fail;
    }
    /* Bitmaps are sized by the node's length, cached only after open. */
    bs->size = s->size;
    if (!qcow2_load_bitmaps(bs, errp)) {
        goto fail;
    }
    return true;

fail:
    qcow2_bitmaps_free(bs);
    bdrv_release_all_dirty_bitmaps(bs);
    if (bs->backing) {
        bdrv_unref(bs->backing);
        bs->backing = NULL;
    }
    qcow2_state_free(s);
    pthread_cond_destroy(&s->inflight_cond);
    pthread_mutex_destroy(&s->lock);
    return false;
}

/* Write back the cached metadata (ordered, qcow2-cluster.c), then sync
 * the file without holding the lock, so in-place writes go on meanwhile. */
static int qcow2_flush(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    pthread_mutex_lock(&s->lock);
    int r = qcow2_flush_metadata_locked(bs);
    uint64_t gen = s->write_gen;
    pthread_mutex_unlock(&s->lock);
    if (r < 0) {
        return r;
    }
    r = bdrv_flush(bs->file);
    if (r == 0) {
        pthread_mutex_lock(&s->lock);
        if (gen > s->synced_gen) {
            s->synced_gen = gen;
        }
        pthread_mutex_unlock(&s->lock);
    }
    return r;
}

static void qcow2_close(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    /* block.c stored the persistent bitmaps (store_bitmaps) already. */
    if (s->writable) {
        qcow2_flush(bs);
    }
    qcow2_bitmaps_free(bs);
    qcow2_state_free(s);
    pthread_cond_destroy(&s->inflight_cond);
    pthread_mutex_destroy(&s->lock);
}

static int64_t qcow2_getlength(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    return (int64_t)s->size;
}

static uint64_t qcow2_get_cluster_size(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    return s->cluster_size;
}

/* ---- reads ---- */

/* A data cluster's bytes; a cluster cut short by the end of the file
 * reads as zeroes past it. */
static int read_host(BlockDriverState *bs, uint64_t host, uint64_t bytes,
                     const struct iovec *iov, int niov, size_t iov_off)
{
    uint64_t flen = qcow2_file_length(bs);
    if (host >= flen) {
        return -EIO;   /* data cluster past the end of the file */
    }
    return bdrv_preadv_zero_tail(bs->file, host, bytes, flen - host, iov, niov,
                                 iov_off);
}

static int qcow2_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                        const struct iovec *iov, int niov, int flags)
{
    BDRVQcow2State *s = bs->opaque;
    size_t done = 0;
    _cleanup_free_ uint8_t *cbuf = NULL;
    uint64_t cbuf_entry = 0;

    while (done < bytes) {
        uint64_t off = offset + done, n, host;
        Qcow2ClusterType type;
        pthread_mutex_lock(&s->lock);
        int r = qcow2_get_mapping_locked(bs, off, bytes - done, &type, &host, &n);
        pthread_mutex_unlock(&s->lock);
        if (r < 0) {
            return r;
        }
        switch (type) {
        case QCOW2_CLUSTER_UNALLOCATED:
            r = bdrv_preadv_backing(bs, off, n, iov, niov, done);
            break;
        case QCOW2_CLUSTER_ZERO_PLAIN:
        case QCOW2_CLUSTER_ZERO_ALLOC:
            iov_memset(iov, niov, done, 0, n);
            break;
        case QCOW2_CLUSTER_NORMAL:
            r = read_host(bs, host, n, iov, niov, done);
            break;
        case QCOW2_CLUSTER_COMPRESSED:
            if (!cbuf) {
                cbuf = malloc(s->cluster_size);
                if (!cbuf) {
                    return -ENOMEM;
                }
            }
            if (cbuf_entry != host) {
                cbuf_entry = 0;
                r = qcow2_read_compressed(bs, host, cbuf);
                if (r == 0) {
                    cbuf_entry = host;
                }
            }
            if (r == 0) {
                iov_from_buf(iov, niov, done, cbuf + (off & (s->cluster_size - 1)), n);
            }
            break;
        }
        if (r < 0) {
            return r;
        }
        done += n;
    }
    return 0;
}

/* ---- writes ---- */

/* Is an allocation (or, with `any`, also an in-place write) in flight on
 * guest clusters [first, end)? */
static bool inflight_overlaps_locked(BDRVQcow2State *s, uint64_t first,
                                     uint64_t end, bool any)
{
    for (Qcow2InFlight *f = s->inflight; f; f = f->next) {
        if ((any || f->alloc) && f->first < end && first < f->end) {
            return true;
        }
    }
    return false;
}

static void inflight_remove_locked(BDRVQcow2State *s, Qcow2InFlight *f)
{
    for (Qcow2InFlight **p = &s->inflight; *p; p = &(*p)->next) {
        if (*p == f) {
            *p = f->next;
            break;
        }
    }
    pthread_cond_broadcast(&s->inflight_cond);
}

/* Wait until no allocation (with `any`: no write at all) is in flight
 * for clusters [first, end). */
static void inflight_wait_locked(BDRVQcow2State *s, uint64_t first, uint64_t end,
                                 bool any)
{
    while (inflight_overlaps_locked(s, first, end, any)) {
        pthread_cond_wait(&s->inflight_cond, &s->lock);
    }
}

/* Write guest [offset, offset+bytes) (bytes within one L2 table, starting in
 * clusters that need allocation: n clusters from `first`) into new
 * clusters.  Called with s->lock held, which it drops for the data I/O.
 * *ret_done: bytes written from offset. */
static int write_allocating_locked(BlockDriverState *bs, uint64_t offset,
                                   uint64_t bytes, const struct iovec *iov,
                                   int niov, size_t iov_off, uint64_t nb_clusters,
                                   uint64_t *ret_done)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t first = offset >> s->cluster_bits;
    uint64_t *table;
    uint64_t l2_offset;
    unsigned index;

    int r = qcow2_get_l2_locked(bs, offset, true, &table, &l2_offset, &index);
    if (r < 0) {
        return r;
    }
    uint64_t got;
    int64_t host = qcow2_alloc_clusters_upto_locked(bs, nb_clusters, &got);
    if (host < 0) {
        return (int)host;
    }
    nb_clusters = got;   /* the rest goes round the caller's loop again */
    Qcow2InFlight f = { .first = first, .end = first + nb_clusters, .alloc = true };
    f.next = s->inflight;
    s->inflight = &f;
    pthread_mutex_unlock(&s->lock);

    uint64_t start = first * cs;
    uint64_t head = offset - start;
    uint64_t len = MIN(bytes, nb_clusters * cs - head);
    uint64_t tail_start = offset + len;
    uint64_t tail = start + nb_clusters * cs - tail_start;
    /* The tail of the last cluster may lie past the end of the image. */
    uint64_t tail_read = tail_start < s->size ? MIN(tail, s->size - tail_start) : 0;
    uint8_t *head_buf = NULL, *tail_buf = NULL;
    r = 0;
    if (head) {
        head_buf = malloc(head);
        if (!head_buf) {
            r = -ENOMEM;
        } else {
            struct iovec h = { head_buf, head };
            r = qcow2_preadv(bs, start, head, &h, 1, 0);
        }
    }
    if (r == 0 && tail) {
        tail_buf = calloc(1, tail);
        if (!tail_buf) {
            r = -ENOMEM;
        } else if (tail_read) {
            struct iovec t = { tail_buf, tail_read };
            r = qcow2_preadv(bs, tail_start, tail_read, &t, 1, 0);
        }
    }
    if (r == 0) {
        int max = niov + 2;
        struct iovec *v = calloc((size_t)max, sizeof(*v));
        if (!v) {
            r = -ENOMEM;
        } else {
            int k = 0;
            if (head) {
                v[k++] = (struct iovec){ head_buf, head };
            }
            int m = iov_slice(iov, niov, iov_off, len, v + k, niov);
            if (m < 0) {
                r = -EINVAL;
            } else {
                k += m;
                if (tail) {
                    v[k++] = (struct iovec){ tail_buf, tail };
                }
                r = bdrv_pwritev(bs->file, (uint64_t)host, nb_clusters * cs, v, k, 0);
            }
            free(v);
        }
    }
    free(head_buf);
    free(tail_buf);

    pthread_mutex_lock(&s->lock);
    if (r == 0) {
        /* The data must be synced before the L2 entries are written (C1). */
        qcow2_note_write_locked(bs);
        r = qcow2_get_l2_locked(bs, offset, false, &table, &l2_offset, &index);
        if (r == 0 && !table) {
            r = -EIO;
        }
    }
    if (r == 0) {
        _cleanup_free_ uint64_t *olds = malloc(nb_clusters * 8);
        if (!olds) {
            r = -ENOMEM;
        } else {
            for (uint64_t i = 0; i < nb_clusters; i++) {
                olds[i] = be64toh(table[index + i]);
                table[index + i] = htobe64(((uint64_t)host + i * cs) | QCOW2_OFLAG_COPIED);
            }
            r = qcow2_write_l2_entries_locked(bs, table, l2_offset, index,
                                              (unsigned)nb_clusters);
            if (r == 0) {
                for (uint64_t i = 0; i < nb_clusters; i++) {
                    qcow2_free_l2_entry_locked(bs, olds[i]);
                }
            }
        }
    }
    if (r < 0) {
        qcow2_free_clusters_locked(bs, (uint64_t)host, nb_clusters * cs);
    }
    inflight_remove_locked(s, &f);
    *ret_done = len;
    return r;
}

/* An in-place write of guest data to host [host, host+bytes), mapped by
 * an L2 entry: the cluster must start inside the file (B2: an entry far
 * past the end would grow the file to that size) and overlap no metadata
 * (O1).  0, or -EIO with the image marked corrupt.  s->lock held. */
static int check_data_write_locked(BlockDriverState *bs, uint64_t host,
                                   uint64_t bytes)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t start = ROUND_DOWN(host, s->cluster_size);
    if (start >= MAX(qcow2_file_length(bs), s->alloc_end * s->cluster_size)) {
        return qcow2_signal_corruption_locked(bs, "data cluster at 0x%" PRIx64
                                              " is past the end of the file",
                                              start);
    }
    return qcow2_check_overlap_locked(bs, 0, host, bytes);
}

static int qcow2_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                         const struct iovec *iov, int niov, int flags);

/* Write one guest cluster at `offset` (cluster-aligned; `bytes` is the
 * cluster size, or less for the image's last cluster, zero-padded) from
 * `data` compressed (BDRV_REQ_WRITE_COMPRESSED).  The cluster must be
 * unallocated or a zero cluster without data: -ENOTSUP otherwise.  A
 * cluster that does not shrink below the cluster size is written plain.
 * Locking as for allocating writes (rule 3 above): the guest cluster is in
 * flight while its compressed bytes are written without the lock, the L2
 * entry changes afterwards (C1: data noted before). */
static int write_compressed_cluster(BlockDriverState *bs, uint64_t offset,
                                    uint64_t bytes, const uint8_t *data,
                                    int level)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    _cleanup_free_ uint8_t *out = malloc(cs);
    if (!out) {
        return -ENOMEM;
    }
    size_t clen = 0;
    /* Strictly smaller than a cluster, as QEMU. */
    int r = qcow2_compress_cluster(s, level, data, out, cs - 1, &clen);
    if (r == -ENOSPC) {
        struct iovec v = { (void *)data, bytes };
        return qcow2_pwritev(bs, offset, bytes, &v, 1, 0);
    }
    if (r < 0) {
        return r;
    }

    uint64_t guest = offset >> s->cluster_bits;
    pthread_mutex_lock(&s->lock);
    inflight_wait_locked(s, guest, guest + 1, true);
    Qcow2ClusterType type;
    uint64_t host_entry, n;
    r = qcow2_get_mapping_locked(bs, offset, cs, &type, &host_entry, &n);
    if (r == 0 && type != QCOW2_CLUSTER_UNALLOCATED &&
        type != QCOW2_CLUSTER_ZERO_PLAIN) {
        r = -ENOTSUP;   /* compressed clusters never overwrite data */
    }
    uint64_t *table, l2_offset;
    unsigned index;
    if (r == 0) {
        /* The L2 table first: its allocation must not land between the
         * compressed bytes and the clusters they may continue into. */
        r = qcow2_get_l2_locked(bs, offset, true, &table, &l2_offset, &index);
    }
    if (r < 0) {
        pthread_mutex_unlock(&s->lock);
        return r;
    }
    int64_t host = qcow2_alloc_compressed_locked(bs, clen);
    if (host < 0) {
        pthread_mutex_unlock(&s->lock);
        return (int)host;
    }
    uint64_t entry = qcow2_compressed_entry(s, (uint64_t)host, clen);
    unsigned x = 62 - (s->cluster_bits - 8);
    r = (uint64_t)host + clen > (1ull << x) ? -EFBIG
        : qcow2_check_overlap_locked(bs, 0, (uint64_t)host, clen);
    Qcow2InFlight f = { .first = guest, .end = guest + 1, .alloc = true };
    if (r == 0) {
        f.next = s->inflight;
        s->inflight = &f;
        pthread_mutex_unlock(&s->lock);
        r = bdrv_pwrite(bs->file, (uint64_t)host, out, clen, 0);
        pthread_mutex_lock(&s->lock);
        if (r == 0) {
            qcow2_note_write_locked(bs);   /* C1 */
            r = qcow2_get_l2_locked(bs, offset, false, &table, &l2_offset,
                                    &index);
            if (r == 0 && !table) {
                r = -EIO;
            }
        }
        if (r == 0) {
            /* A compressed entry never has the COPIED flag (qcow2.txt). */
            table[index] = htobe64(entry);
            r = qcow2_write_l2_entries_locked(bs, table, l2_offset, index, 1);
        }
        inflight_remove_locked(s, &f);
    }
    if (r < 0) {
        qcow2_free_l2_entry_locked(bs, entry);
    }
    pthread_mutex_unlock(&s->lock);
    return r;
}

/* BDRV_REQ_WRITE_COMPRESSED: whole clusters, one by one. */
static int qcow2_pwritev_compressed(BlockDriverState *bs, uint64_t offset,
                                    uint64_t bytes, const struct iovec *iov,
                                    int niov, int flags)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    if ((offset & (cs - 1)) ||
        ((bytes & (cs - 1)) && offset + bytes != s->size)) {
        return -EINVAL;
    }
    _cleanup_free_ uint8_t *buf = malloc(cs);
    if (!buf) {
        return -ENOMEM;
    }
    int level = BDRV_REQ_COMPRESS_LEVEL_OF(flags);
    for (uint64_t done = 0; done < bytes; done += cs) {
        uint64_t n = MIN(cs, bytes - done);
        iov_to_buf(iov, niov, done, buf, n);
        memset(buf + n, 0, cs - n);   /* the image's last, partial cluster */
        int r = write_compressed_cluster(bs, offset + done, n, buf, level);
        if (r < 0) {
            return r;
        }
    }
    if (flags & BDRV_REQ_FUA) {
        return qcow2_flush(bs);
    }
    return 0;
}

static int qcow2_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                         const struct iovec *iov, int niov, int flags)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    size_t done = 0;

    if (flags & BDRV_REQ_WRITE_COMPRESSED) {
        return qcow2_pwritev_compressed(bs, offset, bytes, iov, niov, flags);
    }
    while (done < bytes) {
        uint64_t off = offset + done, n, host;
        Qcow2ClusterType type;
        uint64_t first = off >> s->cluster_bits;
        pthread_mutex_lock(&s->lock);
        inflight_wait_locked(s, first, first + 1, false);
        int r = qcow2_get_mapping_locked(bs, off, bytes - done, &type, &host, &n);
        if (r < 0) {
            pthread_mutex_unlock(&s->lock);
            return r;
        }
        if (type == QCOW2_CLUSTER_NORMAL) {
            /* Only COPIED (refcount 1) clusters are written in place. */
            uint64_t *table, l2_offset;
            unsigned index;
            r = qcow2_get_l2_locked(bs, off, false, &table, &l2_offset, &index);
            if (r == 0 && table &&
                (be64toh(table[index]) & QCOW2_OFLAG_COPIED)) {
                r = check_data_write_locked(bs, host, n);
            }
            if (r == 0 && table &&
                (be64toh(table[index]) & QCOW2_OFLAG_COPIED)) {
                /* Registered so that a zero write or discard cannot free
                 * the clusters under the data. */
                Qcow2InFlight f = {
                    .first = first,
                    .end = DIV_ROUND_UP(off + n, cs),
                };
                f.next = s->inflight;
                s->inflight = &f;
                pthread_mutex_unlock(&s->lock);
                r = -ENOMEM;
                struct iovec *sub = calloc((size_t)niov, sizeof(*sub));
                if (sub) {
                    int m = iov_slice(iov, niov, done, n, sub, niov);
                    r = m < 0 ? -EINVAL : bdrv_pwritev(bs->file, host, n, sub, m, 0);
                    free(sub);
                }
                pthread_mutex_lock(&s->lock);
                inflight_remove_locked(s, &f);
                pthread_mutex_unlock(&s->lock);
                if (r < 0) {
                    return r;
                }
                done += n;
                continue;
            }
            if (r < 0) {
                pthread_mutex_unlock(&s->lock);
                return r;
            }
            n = MIN(n, cs - (off & (cs - 1)));   /* shared: one cluster */
        }
        /* Allocate the run of clusters the mapping returned, stopping
         * before any that another request is allocating. */
        uint64_t nb = DIV_ROUND_UP((off & (cs - 1)) + n, cs);
        for (uint64_t i = 1; i < nb; i++) {
            if (inflight_overlaps_locked(s, first + i, first + i + 1, true)) {
                nb = i;
                n = MIN(n, nb * cs - (off & (cs - 1)));
                break;
            }
        }
        uint64_t written = 0;
        r = write_allocating_locked(bs, off, n, iov, niov, done, nb, &written);
        pthread_mutex_unlock(&s->lock);
        if (r < 0) {
            return r;
        }
        done += written;
    }
    if (flags & BDRV_REQ_FUA) {
        return qcow2_flush(bs);
    }
    return 0;
}

/* Set the entries of whole clusters [offset, offset+bytes) to `zero`
 * (zero flag) or unallocated, freeing what they held.  Skips clusters that
 * already read as required. */
static int clear_clusters(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                          bool zero)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t done = 0;
    LOCK_GUARD(&s->lock);
    if (qcow2_is_corrupt(s)) {
        return -EIO;   /* O2 */
    }
    while (done < bytes) {
        uint64_t off = offset + done;
        uint64_t first = off >> s->cluster_bits;
        uint64_t span = MIN(bytes - done,
                            ((1ull << s->l2_bits) - ((off >> s->cluster_bits) &
                             ((1ull << s->l2_bits) - 1))) * cs);
        uint64_t nb = span / cs;
        inflight_wait_locked(s, first, first + nb, true);
        uint64_t *table, l2_offset;
        unsigned index;
        /* New entry: zero writes set the zero flag; discards leave the
         * cluster unallocated, or zero when unallocated would expose the
         * backing file.  Without a backing file an unallocated cluster
         * reads as zeroes, so it needs no change (and no L2 table). */
        uint64_t newe = zero || bs->backing ? QCOW2_OFLAG_ZERO : 0;
        int r = qcow2_get_l2_locked(bs, off, zero && bs->backing, &table,
                                    &l2_offset, &index);
        if (r < 0) {
            return r;
        }
        if (table) {
            _cleanup_free_ uint64_t *olds = malloc(nb * 8);
            if (!olds) {
                return -ENOMEM;
            }
            unsigned lo = UINT32_MAX, hi = 0;
            for (uint64_t i = 0; i < nb; i++) {
                olds[i] = be64toh(table[index + i]);
                Qcow2ClusterType t = qcow2_l2_entry_type(s, olds[i]);
                bool reads_zero = t == QCOW2_CLUSTER_ZERO_PLAIN ||
                                  (t == QCOW2_CLUSTER_UNALLOCATED && !bs->backing);
                bool keep = newe ? reads_zero : t == QCOW2_CLUSTER_UNALLOCATED ||
                                                t == QCOW2_CLUSTER_ZERO_PLAIN;
                if (keep) {
                    olds[i] = 0;
                    continue;
                }
                table[index + i] = htobe64(newe);
                lo = MIN(lo, (unsigned)(index + i));
                hi = MAX(hi, (unsigned)(index + i));
            }
            if (lo <= hi) {
                r = qcow2_write_l2_entries_locked(bs, table, l2_offset, lo, hi - lo + 1);
                if (r < 0) {
                    return r;
                }
                for (uint64_t i = 0; i < nb; i++) {
                    if (olds[i]) {
                        qcow2_free_l2_entry_locked(bs, olds[i]);
                    }
                }
            }
        }
        if (s->nb_pending_frees > QCOW2_MAX_PENDING_FREES) {
            /* Bound the deferred frees (a discard of scattered clusters). */
            r = qcow2_flush_metadata_locked(bs);
            if (r < 0) {
                return r;
            }
        }
        done += span;
    }
    return 0;
}

/* Zero [offset, offset+bytes) by writing a zero buffer (partial
 * clusters of a zero write). */
static int write_zero_buffer(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    _cleanup_free_ uint8_t *buf = calloc(1, bytes);
    if (!buf) {
        return -ENOMEM;
    }
    struct iovec v = { buf, bytes };
    return qcow2_pwritev(bs, offset, bytes, &v, 1, 0);
}

/* The end of the range in whole clusters: the image's last, partial
 * cluster counts as whole. */
static uint64_t cluster_end(BDRVQcow2State *s, uint64_t end)
{
    return end == s->size ? ROUND_UP(end, s->cluster_size)
                          : ROUND_DOWN(end, s->cluster_size);
}

static int qcow2_pwrite_zeroes(BlockDriverState *bs, uint64_t offset,
                               uint64_t bytes, int flags)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t start = ROUND_UP(offset, cs);
    uint64_t end = cluster_end(s, offset + bytes);
    if (end <= start || ((start > offset || end < offset + bytes) &&
                         (flags & BDRV_REQ_NO_FALLBACK))) {
        return -ENOTSUP;   /* block.c falls back to a zero buffer */
    }
    int r = 0;
    if (start > offset) {
        r = write_zero_buffer(bs, offset, start - offset);
    }
    if (r == 0) {
        r = clear_clusters(bs, start, end - start, true);
    }
    if (r == 0 && end < offset + bytes) {
        r = write_zero_buffer(bs, end, offset + bytes - end);
    }
    if (r == 0 && (flags & BDRV_REQ_FUA)) {
        r = qcow2_flush(bs);
    }
    return r;
}

static int qcow2_pdiscard(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t start = ROUND_UP(offset, s->cluster_size);
    uint64_t end = cluster_end(s, offset + bytes);
    if (end <= start) {
        return 0;   /* discard is advisory: partial clusters stay */
    }
    return clear_clusters(bs, start, end - start, false);
}

/* ---- block status ---- */

static int qcow2_block_status(BlockDriverState *bs, uint64_t offset,
                              uint64_t bytes, uint64_t *pnum)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t done = 0;
    int status = -1;
    LOCK_GUARD(&s->lock);
    while (done < bytes) {
        uint64_t n, host;
        Qcow2ClusterType type;
        int r = qcow2_get_mapping_locked(bs, offset + done, bytes - done,
                                         &type, &host, &n);
        if (r < 0) {
            if (done) {
                break;
            }
            return r;
        }
        int st;
        switch (type) {
        case QCOW2_CLUSTER_UNALLOCATED:
            st = 0;
            break;
        case QCOW2_CLUSTER_ZERO_PLAIN:
        case QCOW2_CLUSTER_ZERO_ALLOC:
            st = BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED;
            break;
        default:
            st = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
            break;
        }
        if (status >= 0 && st != status) {
            break;
        }
        status = st;
        done += n;
    }
    *pnum = done;
    return status;
}

/* ---- create ---- */

/* A new image of size into the file filename (img create) or, when
 * filename is NULL, into the empty protocol node file (blockdev-create's
 * "file": NODE), which is flushed. */
static bool qcow2_create_into(const char *filename, BlockDriverState *file,
                              uint64_t size, struct json_object *opts,
                              Error **errp)
{
    static const char *const known[] = {
        "cluster_size", "backing_file", "backing_fmt", "backing",
        "backing-format", "compat", "refcount_bits", "lazy_refcounts",
        "compression_type", "preallocation",
    };
    if (!bdrv_check_create_opts(opts, known, ARRAY_SIZE(known), "qcow2", errp)) {
        return false;
    }
    const char *backing = json_opt_str(opts, "backing_file");
    if (!backing) {
        backing = json_opt_str(opts, "backing");
    }
    const char *backing_fmt = json_opt_str(opts, "backing_fmt");
    if (!backing_fmt) {
        backing_fmt = json_opt_str(opts, "backing-format");
    }
    const char *v;
    uint64_t cs = 65536;
    if ((v = json_opt_str(opts, "cluster_size")) && !parse_size(v, "cluster_size", &cs, errp)) {
        return false;
    }
    if (!IS_POW2(cs) || cs < (1u << QCOW2_MIN_CLUSTER_BITS) ||
        cs > (1u << QCOW2_MAX_CLUSTER_BITS)) {
        error_setg(errp, "Cluster size must be a power of two between 512 and "
                   "2048k");
        return false;
    }
    if ((v = json_opt_str(opts, "compat")) && strcmp(v, "1.1") && strcmp(v, "v3")) {
        error_setg(errp, "qcow2: only compat=1.1 images can be created");
        return false;
    }
    if ((v = json_opt_str(opts, "refcount_bits")) && strcmp(v, "16")) {
        error_setg(errp, "qcow2: only refcount_bits=16 is supported");
        return false;
    }
    if ((v = json_opt_str(opts, "lazy_refcounts")) && strcmp(v, "off") && strcmp(v, "false")) {
        error_setg(errp, "qcow2: lazy_refcounts is not supported");
        return false;
    }
    if ((v = json_opt_str(opts, "preallocation")) && strcmp(v, "off")) {
        error_setg(errp, "qcow2: only preallocation=off is supported");
        return false;
    }
    uint8_t compression_type = 0;
    if ((v = json_opt_str(opts, "compression_type"))) {
        if (!strcmp(v, "zstd")) {
            compression_type = 1;
        } else if (strcmp(v, "zlib")) {
            error_setg(errp, "qcow2: unknown compression_type '%s'", v);
            return false;
        }
    }
    if (backing_fmt && !backing) {
        error_setg(errp, "qcow2: a backing format needs a backing file");
        return false;
    }
    if (backing && strlen(backing) > 1023) {
        error_setg(errp, "qcow2: the backing file name is too long");
        return false;
    }
    if (backing && size == 0 && !filename) {
        error_setg(errp, "qcow2: the size is needed with a backing file");
        return false;
    }
    if (backing && size == 0) {
        /* The size of the backing image, as qemu-img does. */
        _cleanup_free_ char *dir = path_dirname(filename);
        _cleanup_free_ char *path = dir ? path_join(dir, backing) : NULL;
        if (!path) {
            error_setg(errp, "out of memory");
            return false;
        }
        /* Shared, as qemu-img create reads the size of a backing file
         * that may be in use. */
        BlockDriverState *b = bdrv_open_image(path, backing_fmt,
                                              BDRV_O_FORCE_SHARE, errp);
        if (!b) {
            error_prepend(errp, "Could not open backing image '%s': ", backing);
            return false;
        }
        int64_t len = bdrv_getlength(b);
        bdrv_close(b, NULL);
        if (len < 0) {
            error_setg(errp, "cannot get the size of '%s'", backing);
            return false;
        }
        size = (uint64_t)len;
    }
    if (size > BDRV_MAX_LENGTH) {
        error_setg(errp, "qcow2: the image size is too large");
        return false;
    }

    /* Layout: header, refcount table, refcount blocks, L1 table. */
    unsigned cluster_bits = (unsigned)__builtin_ctzll(cs);
    uint64_t l2_span = cs * (cs / 8);
    uint64_t l1_size = DIV_ROUND_UP(size, l2_span);
    if (l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        error_setg(errp, "qcow2: the image is too large for cluster size %" PRIu64,
                   cs);
        return false;
    }
    uint64_t l1_clusters = DIV_ROUND_UP(l1_size * 8, cs);
    uint64_t per_block = cs * 8 / 16;
    uint64_t rt_clusters = 1, rb = 1;
    for (int i = 0; i < 64; i++) {
        uint64_t total = 1 + rt_clusters + rb + l1_clusters;
        uint64_t rb2 = DIV_ROUND_UP(total, per_block);
        uint64_t rt2 = DIV_ROUND_UP(rb2 * 8, cs);
        if (rb2 == rb && rt2 == rt_clusters) {
            break;
        }
        rb = rb2;
        rt_clusters = rt2;
    }
    uint64_t total = 1 + rt_clusters + rb + l1_clusters;
    if (rt_clusters * cs > QCOW2_MAX_REFTABLE_BYTES) {
        error_setg(errp, "qcow2: the image is too large for cluster size %" PRIu64,
                   cs);
        return false;
    }
    uint64_t rt_off = cs, rb_off = rt_off + rt_clusters * cs;
    uint64_t l1_off = rb_off + rb * cs;

    _cleanup_free_ uint8_t *buf = calloc(total, cs);
    if (!buf) {
        error_setg(errp, "out of memory");
        return false;
    }
    /* The header (no node exists yet to use qcow2_update_header_locked). */
    uint8_t *h = buf;
    uint64_t pos = QCOW2_HEADER_V3_LENGTH;
    if (backing && backing_fmt) {
        size_t n = strlen(backing_fmt);
        st_be32(h + pos, QCOW2_EXT_BACKING_FORMAT);
        st_be32(h + pos + 4, (uint32_t)n);
        memcpy(h + pos + 8, backing_fmt, n);
        pos += 8 + ROUND_UP(n, 8);
    }
    pos += 8;
    if (pos + (backing ? strlen(backing) : 0) > cs) {
        error_setg(errp, "qcow2: the backing file name does not fit the header");
        return false;
    }
    uint64_t boff = 0;
    if (backing) {
        boff = pos;
        memcpy(h + pos, backing, strlen(backing));
    }
    st_be32(h + 0, QCOW2_MAGIC);
    st_be32(h + 4, 3);
    st_be64(h + 8, boff);
    st_be32(h + 16, backing ? (uint32_t)strlen(backing) : 0);
    st_be32(h + 20, cluster_bits);
    st_be64(h + 24, size);
    st_be32(h + 36, (uint32_t)l1_size);
    st_be64(h + 40, l1_size ? l1_off : 0);
    st_be64(h + 48, rt_off);
    st_be32(h + 56, (uint32_t)rt_clusters);
    st_be64(h + 72, compression_type ? QCOW2_INCOMPAT_COMPRESSION : 0);
    st_be32(h + 96, 4);
    st_be32(h + 100, QCOW2_HEADER_V3_LENGTH);
    h[104] = compression_type;
    /* Refcount table and blocks: clusters [0, total) have refcount 1. */
    for (uint64_t i = 0; i < rb; i++) {
        st_be64(buf + rt_off + i * 8, rb_off + i * cs);
    }
    for (uint64_t c = 0; c < total; c++) {
        st_be16(buf + rb_off + c * 2, 1);
    }

    if (!filename) {
        int r = bdrv_pwrite(file, 0, buf, total * cs, 0);
        if (r == 0) {
            r = bdrv_flush(file);
        }
        if (r < 0) {
            error_setg_errno(errp, -r, "Could not write the qcow2 image to "
                             "node '%s'", file->node_name);
            return false;
        }
        return true;
    }
    _cleanup_close_ int fd = file_lock_create(filename, errp);
    if (fd < 0) {
        return false;
    }
    int r = pwrite_full(fd, buf, total * cs, 0);
    if (r < 0 || fsync(fd) < 0) {
        error_setg_errno(errp, r < 0 ? -r : errno, "Could not write '%s'", filename);
        return false;
    }
    return true;
}

static bool qcow2_create(const char *filename, uint64_t size,
                         struct json_object *opts, Error **errp)
{
    return qcow2_create_into(filename, NULL, size, opts, errp);
}

/* Point the image at a new, larger L1 table of n entries (block_resize):
 * the table is written and synced in new clusters, then the header names
 * it (qcow2_update_header_locked syncs the new clusters' refcounts first),
 * then the old clusters are freed: a crash leaves the old table or the
 * new one, at worst leaking the new clusters.  s->lock held. */
static int qcow2_grow_l1_locked(BlockDriverState *bs, uint32_t n)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t bytes = ROUND_UP((uint64_t)n * 8, s->cluster_size);
    _cleanup_free_ uint64_t *disk = calloc(1, bytes);
    uint64_t *mem = calloc(n, 8);
    if (!disk || !mem) {
        free(mem);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        disk[i] = htobe64(s->l1_table[i]);
        mem[i] = s->l1_table[i];
    }
    int64_t off = qcow2_alloc_clusters_locked(bs, bytes);
    int r = off < 0 ? (int)off : 0;
    if (r == 0) {
        r = qcow2_check_overlap_locked(bs, 0, (uint64_t)off, bytes);
    }
    if (r == 0) {
        r = bdrv_pwrite(bs->file, (uint64_t)off, disk, bytes, 0);
    }
    if (r == 0) {
        r = bdrv_flush(bs->file);
    }
    if (r < 0) {
        if (off >= 0) {
            qcow2_free_clusters_locked(bs, (uint64_t)off, bytes);
        }
        free(mem);
        return r;
    }
    uint64_t old_off = s->l1_table_offset;
    uint64_t old_bytes = ROUND_UP((uint64_t)s->l1_size * 8, s->cluster_size);
    uint32_t old_size = s->l1_size;
    uint64_t *old_table = s->l1_table;
    s->l1_table = mem;
    s->l1_table_offset = (uint64_t)off;
    s->l1_size = n;
    r = qcow2_update_header_locked(bs);
    if (r < 0) {
        s->l1_table = old_table;
        s->l1_table_offset = old_off;
        s->l1_size = old_size;
        free(mem);
        qcow2_free_clusters_locked(bs, (uint64_t)off, bytes);
        return r;
    }
    free(old_table);
    if (old_size) {
        qcow2_free_clusters_locked(bs, old_off, old_bytes);
    }
    return 0;
}

/* block_resize: grow only (QEMU also shrinks qcow2; bitback does not), on
 * an image without internal snapshots.  Stored bitmaps are all loaded and
 * consistent (bdrv_truncate checks): their entries stay in use, sized for
 * the old length, until the next store writes them at the new one. */
static bool qcow2_truncate(BlockDriverState *bs, uint64_t size, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    LOCK_GUARD(&s->lock);
    if (size < s->size) {
        error_setg(errp, "qcow2: shrinking an image is not supported");
        return false;
    }
    if (s->nb_snapshots) {
        error_setg(errp, "Can't resize an image which has snapshots");
        return false;
    }
    if (!qcow2_bitmaps_resizable(bs, size, errp)) {
        return false;
    }
    if (qcow2_is_corrupt(s)) {
        error_setg(errp, "qcow2: the image is marked corrupt");
        return false;
    }
    uint64_t l2_span = s->cluster_size << s->l2_bits;
    uint64_t needed = DIV_ROUND_UP(size, l2_span);
    if (needed * 8 > QCOW2_MAX_L1_BYTES) {
        error_setg(errp, "qcow2: the L1 table for %" PRIu64 " bytes would be "
                   "too large", size);
        return false;
    }
    uint64_t old = s->size;
    int r;
    s->size = size;
    if (needed > s->l1_size) {
        r = qcow2_grow_l1_locked(bs, (uint32_t)needed);
    } else {
        r = qcow2_update_header_locked(bs);
    }
    if (r < 0) {
        s->size = old;
        error_setg_errno(errp, -r, "qcow2: cannot resize the image");
        return false;
    }
    return true;
}

static bool qcow2_create_on_node(BlockDriverState *file, uint64_t size,
                                 struct json_object *opts, Error **errp)
{
    return qcow2_create_into(NULL, file, size, opts, errp);
}

/* ---- info ---- */

static void qcow2_info(BlockDriverState *bs, struct json_object *data)
{
    BDRVQcow2State *s = bs->opaque;
    json_object_object_add(data, "compat",
                           json_object_new_string(s->version >= 3 ? "1.1" : "0.10"));
    json_object_object_add(data, "compression-type",
                           json_object_new_string(s->compression_type == 1 ? "zstd" : "zlib"));
    if (s->version >= 3) {
        json_object_object_add(data, "lazy-refcounts", json_object_new_boolean(
            (s->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS) != 0));
    }
    qcow2_bitmaps_info(bs, data);
    json_object_object_add(data, "refcount-bits",
                           json_object_new_int(1 << s->refcount_order));
    if (s->version >= 3) {
        json_object_object_add(data, "corrupt", json_object_new_boolean(
            (s->incompatible_features & QCOW2_INCOMPAT_CORRUPT) != 0));
        json_object_object_add(data, "extended-l2", json_object_new_boolean(false));
    }
}

/* blockdev-add's members of a qcow2 node: its file (or the "filename"
 * shorthand) and its backing node (block.h: open_opts). */
static const JsonOptSpec qcow2_open_opts[] = {
    { "file", JSON_OPT_REF, true },
    { "filename", JSON_OPT_STR, true },
    { "backing", JSON_OPT_REF, true },
    { NULL },
};

const BlockDriver bdrv_qcow2 = {
    .format_name = "qcow2",
    .instance_size = sizeof(BDRVQcow2State),
    .supports_backing = true,
    .supports_compressed_writes = true,
    .probe = qcow2_probe,
    .open = qcow2_open,
    .open_opts = qcow2_open_opts,
    .close = qcow2_close,
    .getlength = qcow2_getlength,
    .get_cluster_size = qcow2_get_cluster_size,
    .preadv = qcow2_preadv,
    .pwritev = qcow2_pwritev,
    .pwrite_zeroes = qcow2_pwrite_zeroes,
    .pdiscard = qcow2_pdiscard,
    .flush = qcow2_flush,
    .block_status = qcow2_block_status,
    .persistent_bitmap_add = qcow2_persistent_bitmap_add,
    .persistent_bitmap_remove = qcow2_persistent_bitmap_remove,
    .store_bitmaps = qcow2_store_bitmaps,
    .create = qcow2_create,
    .create_on_node = qcow2_create_on_node,
    .truncate = qcow2_truncate,
    .info = qcow2_info,
    .check = qcow2_check,
};
