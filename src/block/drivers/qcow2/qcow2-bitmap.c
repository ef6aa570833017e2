/*
 * The qcow2 persistent bitmaps extension (header extension 0x23852875,
 * QEMU's docs/interop/qcow2.txt, sections "Bitmaps extension" and
 * "Bitmaps").  This is what lets qemu-img / qemu-nbd see the dirty bitmaps
 * bitback tracks in a qcow2 image, and lets bitback load the ones QEMU
 * stored.  It also keeps each bitmap's generation across reopen, in
 * bitback's own header extension 0x62626b67 (see "generations" below).
 *
 * On disk: the header extension names a contiguous bitmap directory; each
 * directory entry names a contiguous bitmap table whose entries point at
 * data clusters holding the serialized bits (bit i of the bitmap is bit
 * i % 8 of byte i / 8, as hbitmap serializes).  A table entry with no
 * offset stands for an all-zero cluster (bit 0 clear) or an all-one cluster
 * (bit 0 set).
 *
 * In memory: s->bitmaps->entries mirrors the directory on disk.  Each
 * persistent BdrvDirtyBitmap of the node has one entry of the same name
 * (except bitmaps dropped from an untrusted directory, see 5.).
 *
 * Invariants:
 *   1. s->bitmaps->entries equals the directory the header points at; the
 *      directory is only replaced whole: a new one is written and flushed,
 *      then the header is rewritten (one sector), then the old clusters
 *      are freed.  A crash leaks clusters at worst.
 *   2. Bitmap data and tables are written and flushed before a directory
 *      naming them is published, and freed only after a directory no longer
 *      naming them is published.
 *   3. While the image is open for writing, every entry on disk has in_use
 *      set, from open (before any guest write can happen) until the close
 *      store.  So a process that dies leaves them in_use, and in_use at load
 *      makes the bitmap inconsistent (DESIGN.md D2).
 *   4. An entry loaded as inconsistent is never rewritten: its table and
 *      data stay as they are, with in_use set, until the bitmap is removed.
 *   5. When the header's autoclear bit is clear while the extension exists,
 *      a program without bitmap support wrote the image; the bitmaps load as
 *      inconsistent, and their clusters may have been reused, so they are
 *      never freed.  A writable open drops them from the directory (their
 *      clusters leak; `qemu-img check -r leaks` reclaims them).
 *
 * Sizes read from the file are checked against explicit limits before
 * anything is allocated: at most QCOW2_MAX_BITMAPS entries, a directory of
 * at most QCOW2_MAX_BITMAP_DIRECTORY_SIZE bytes, names of at most 1023
 * bytes, and at most QCOW2_BITMAP_MAX_DATA bytes of bits per bitmap.
 *
 * Locking: every entry point takes s->lock itself (callers must not hold
 * it); bitmap bits and fields (generations, flags) are read and written
 * under bs->lock (see block.h), taken inside s->lock and never held
 * across I/O.
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

#define QCOW2_MAX_BITMAPS 65535
#define QCOW2_MAX_BITMAP_DIRECTORY_SIZE (64ull * 1024 * 1024)
/* Serialized bits of one bitmap (limits memory and table size). */
#define QCOW2_BITMAP_MAX_DATA (512ull * 1024 * 1024)
#define QCOW2_BITMAP_MAX_NAME 1023

#define BME_HEADER_SIZE 24
#define BME_FLAG_IN_USE     (1u << 0)
#define BME_FLAG_AUTO       (1u << 1)
#define BME_FLAG_EXTRA_DATA_COMPATIBLE (1u << 2)
#define BME_FLAGS_KNOWN     (BME_FLAG_IN_USE | BME_FLAG_AUTO | \
                             BME_FLAG_EXTRA_DATA_COMPATIBLE)
#define BME_TYPE_DIRTY_TRACKING 1
#define BME_MIN_GRANULARITY_BITS 9
#define BME_MAX_GRANULARITY_BITS 31

#define BME_TABLE_OFFSET_MASK   0x00fffffffffffe00ull
#define BME_TABLE_ALL_ONES      0x1ull
#define BME_TABLE_RESERVED_MASK 0xff000000000001feull

typedef struct Qcow2BitmapEntry {
    char *name;
    uint64_t table_offset;
    uint32_t table_size;           /* entries */
    uint32_t flags;                /* BME_FLAG_*, as on disk */
    uint8_t granularity_bits;
    uint32_t extra_data_size;
    uint8_t *extra_data;           /* kept as is (extra_data_compatible) */
    bool inconsistent;             /* invariant 4 */
} Qcow2BitmapEntry;

struct Qcow2Bitmaps {
    Qcow2BitmapEntry *entries;
    size_t nb;
};

static void entry_clear(Qcow2BitmapEntry *e)
{
    free(e->name);
    free(e->extra_data);
    memset(e, 0, sizeof(*e));
}

static void entries_free(Qcow2BitmapEntry *entries, size_t nb)
{
    for (size_t i = 0; i < nb; i++) {
        entry_clear(&entries[i]);
    }
    free(entries);
}

static bool entry_copy(Qcow2BitmapEntry *dst, const Qcow2BitmapEntry *src)
{
    *dst = *src;
    dst->name = strdup(src->name);
    dst->extra_data = NULL;
    if (src->extra_data_size) {
        dst->extra_data = malloc(src->extra_data_size);
        if (dst->extra_data) {
            memcpy(dst->extra_data, src->extra_data, src->extra_data_size);
        }
    }
    if (!dst->name || (src->extra_data_size && !dst->extra_data)) {
        entry_clear(dst);
        return false;
    }
    return true;
}

static uint64_t entry_disk_size(uint32_t extra_data_size, size_t name_len)
{
    return ROUND_UP((uint64_t)BME_HEADER_SIZE + extra_data_size + name_len, 8);
}

/* Bytes of serialized bits for a bitmap of `gb` granularity bits over the
 * image. */
static uint64_t bitmap_data_bytes(BDRVQcow2State *s, unsigned gb)
{
    uint64_t nb_bits = DIV_ROUND_UP(s->size, UINT64_C(1) << gb);
    return DIV_ROUND_UP(nb_bits, 8);
}

static uint64_t bitmap_table_entries(BDRVQcow2State *s, unsigned gb)
{
    return DIV_ROUND_UP(bitmap_data_bytes(s, gb), s->cluster_size);
}

static bool range_in_file(uint64_t offset, uint64_t len, uint64_t file_len)
{
    return offset <= file_len && len <= file_len - offset;
}

static int gran_bits(uint32_t granularity)
{
    return __builtin_ctz(granularity);
}

/* ---- reading ---- */

/* Parse and validate the directory in buf (size bytes, nb entries). */
static bool dir_parse(BlockDriverState *bs, const uint8_t *buf, uint64_t size,
                      uint32_t nb, uint64_t file_len,
                      Qcow2BitmapEntry **ret_entries, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    Qcow2BitmapEntry *entries = calloc(nb, sizeof(*entries));
    uint64_t pos = 0;

    if (!entries) {
        error_setg(errp, "out of memory");
        return false;
    }
    for (uint32_t i = 0; i < nb; i++) {
        Qcow2BitmapEntry *e = &entries[i];
        const uint8_t *p = buf + pos;
        uint16_t name_size;
        uint64_t esize;
        uint8_t type;

        if (size - pos < BME_HEADER_SIZE) {
            error_setg(errp, "bitmap directory entry %u lies past the end of "
                       "the directory (%" PRIu64 " bytes)", i, size);
            goto fail;
        }
        e->table_offset = ld_be64(p);
        e->table_size = ld_be32(p + 8);
        e->flags = ld_be32(p + 12);
        type = p[16];
        e->granularity_bits = p[17];
        name_size = ld_be16(p + 18);
        e->extra_data_size = ld_be32(p + 20);

        esize = entry_disk_size(e->extra_data_size, name_size);
        if (esize > size - pos) {
            error_setg(errp, "bitmap directory entry %u (%" PRIu64 " bytes) "
                       "lies past the end of the directory", i, esize);
            goto fail;
        }
        if (name_size == 0 || name_size > QCOW2_BITMAP_MAX_NAME) {
            error_setg(errp, "bitmap directory entry %u: bad name size %u "
                       "(must be 1 to %d)", i, name_size, QCOW2_BITMAP_MAX_NAME);
            goto fail;
        }
        const uint8_t *name = p + BME_HEADER_SIZE + e->extra_data_size;
        if (memchr(name, 0, name_size)) {
            error_setg(errp, "bitmap directory entry %u: the name contains a "
                       "NUL byte", i);
            goto fail;
        }
        e->name = strndup((const char *)name, name_size);
        if (!e->name) {
            error_setg(errp, "out of memory");
            goto fail;
        }
        for (uint64_t k = BME_HEADER_SIZE + e->extra_data_size + name_size;
             k < esize; k++) {
            if (p[k]) {
                error_setg(errp, "bitmap '%s': non-zero padding in its "
                           "directory entry", e->name);
                goto fail;
            }
        }
        pos += esize;

        if (e->flags & ~BME_FLAGS_KNOWN) {
            error_setg(errp, "bitmap '%s': reserved flags 0x%x are set",
                       e->name, e->flags & ~BME_FLAGS_KNOWN);
            goto fail;
        }
        if (type != BME_TYPE_DIRTY_TRACKING) {
            error_setg(errp, "bitmap '%s': unsupported type %u", e->name, type);
            goto fail;
        }
        if (e->granularity_bits < BME_MIN_GRANULARITY_BITS ||
            e->granularity_bits > BME_MAX_GRANULARITY_BITS) {
            error_setg(errp, "bitmap '%s': unsupported granularity bits %u "
                       "(must be %d to %d)", e->name, e->granularity_bits,
                       BME_MIN_GRANULARITY_BITS, BME_MAX_GRANULARITY_BITS);
            goto fail;
        }
        if (e->extra_data_size) {
            if (!(e->flags & BME_FLAG_EXTRA_DATA_COMPATIBLE)) {
                error_setg(errp, "bitmap '%s' has %u bytes of unknown extra "
                           "data that is not marked compatible", e->name,
                           e->extra_data_size);
                goto fail;
            }
            e->extra_data = malloc(e->extra_data_size);
            if (!e->extra_data) {
                error_setg(errp, "out of memory");
                goto fail;
            }
            memcpy(e->extra_data, p + BME_HEADER_SIZE, e->extra_data_size);
        }
        for (uint32_t j = 0; j < i; j++) {
            if (strcmp(entries[j].name, e->name) == 0) {
                error_setg(errp, "bitmap name '%s' appears twice in the bitmap "
                           "directory", e->name);
                goto fail;
            }
        }
        if (bitmap_data_bytes(s, e->granularity_bits) > QCOW2_BITMAP_MAX_DATA) {
            error_setg(errp, "bitmap '%s' is too large (more than %llu bytes of "
                       "bits)", e->name, QCOW2_BITMAP_MAX_DATA);
            goto fail;
        }
        /* An in-use entry may be sized for the length the image had
         * before a resize that stopped before the entry was stored again
         * (as in QEMU); it is never loaded, only freed or kept. */
        uint64_t expect = bitmap_table_entries(s, e->granularity_bits);
        bool in_use_any_size = (e->flags & BME_FLAG_IN_USE) &&
            (uint64_t)e->table_size * s->cluster_size <=
                ROUND_UP(QCOW2_BITMAP_MAX_DATA, s->cluster_size);
        if (e->table_size != expect && !in_use_any_size) {
            error_setg(errp, "bitmap '%s': bitmap table has %u entries, but the "
                       "image size and granularity need %" PRIu64, e->name,
                       e->table_size, expect);
            goto fail;
        }
        if (e->table_size &&
            (e->table_offset == 0 || e->table_offset % s->cluster_size ||
             !range_in_file(e->table_offset, (uint64_t)e->table_size * 8,
                            file_len))) {
            error_setg(errp, "bitmap '%s': bitmap table offset 0x%" PRIx64
                       " is not cluster-aligned or lies outside the file",
                       e->name, e->table_offset);
            goto fail;
        }
    }
    if (pos != size) {
        error_setg(errp, "bitmap directory size %" PRIu64 " does not match its "
                   "%u entries (%" PRIu64 " bytes)", size, nb, pos);
        goto fail;
    }
    *ret_entries = entries;
    return true;

fail:
    entries_free(entries, nb);
    return false;
}

/* Read e's bitmap table (host order, table_size entries). */
static uint64_t *table_read(BlockDriverState *bs, const Qcow2BitmapEntry *e,
                            Error **errp)
{
    uint64_t n = e->table_size ? e->table_size : 1;
    uint64_t *t = calloc(n, sizeof(uint64_t));
    if (!t) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    if (e->table_size) {
        int r = bdrv_pread(bs->file, e->table_offset, t,
                           (uint64_t)e->table_size * 8);
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot read the table of bitmap '%s'",
                             e->name);
            free(t);
            return NULL;
        }
    }
    for (uint32_t i = 0; i < e->table_size; i++) {
        t[i] = be64toh(t[i]);
    }
    return t;
}

static bool table_entry_check(BDRVQcow2State *s, const Qcow2BitmapEntry *e,
                              uint32_t idx, uint64_t entry, uint64_t file_len,
                              Error **errp)
{
    uint64_t off = entry & BME_TABLE_OFFSET_MASK;
    if ((entry & BME_TABLE_RESERVED_MASK) ||
        (off && (entry & BME_TABLE_ALL_ONES))) {
        error_setg(errp, "bitmap '%s': table entry %u (0x%" PRIx64 ") has "
                   "reserved bits set", e->name, idx, entry);
        return false;
    }
    if (off && (off % s->cluster_size ||
                !range_in_file(off, s->cluster_size, file_len))) {
        error_setg(errp, "bitmap '%s': table entry %u points at 0x%" PRIx64
                   ", which is not cluster-aligned or lies outside the file",
                   e->name, idx, off);
        return false;
    }
    return true;
}

/* Load e's bits into bm.  s->lock held. */
static bool bitmap_load_data(BlockDriverState *bs, const Qcow2BitmapEntry *e,
                             BdrvDirtyBitmap *bm, uint64_t file_len,
                             Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    _cleanup_free_ uint64_t *table = table_read(bs, e, errp);
    _cleanup_free_ uint8_t *buf = NULL;
    uint64_t bpc = s->cluster_size * 8;
    unsigned gb = e->granularity_bits;
    uint64_t nb_bits;

    if (!table) {
        return false;
    }
    pthread_mutex_lock(&bs->lock);
    nb_bits = hbitmap_nb_bits(bm->hb);
    pthread_mutex_unlock(&bs->lock);
    if (DIV_ROUND_UP(DIV_ROUND_UP(nb_bits, 8), s->cluster_size) != e->table_size) {
        error_setg(errp, "bitmap '%s' does not match the image size", e->name);
        return false;
    }
    buf = malloc(s->cluster_size);
    if (!buf) {
        error_setg(errp, "out of memory");
        return false;
    }
    for (uint32_t j = 0; j < e->table_size; j++) {
        uint64_t first = (uint64_t)j * bpc;
        uint64_t n = MIN(bpc, nb_bits - first);
        uint64_t off = table[j] & BME_TABLE_OFFSET_MASK;

        if (!table_entry_check(s, e, j, table[j], file_len, errp)) {
            return false;
        }
        if (!off) {
            if (table[j] & BME_TABLE_ALL_ONES) {
                pthread_mutex_lock(&bs->lock);
                hbitmap_set(bm->hb, first << gb, n << gb);
                pthread_mutex_unlock(&bs->lock);
            }
            continue;
        }
        int r = bdrv_pread(bs->file, off, buf, s->cluster_size);
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot read the data of bitmap '%s'",
                             e->name);
            return false;
        }
        pthread_mutex_lock(&bs->lock);
        hbitmap_deserialize_part(bm->hb, buf, first, n);
        pthread_mutex_unlock(&bs->lock);
    }
    return true;
}

/* ---- generations (bitback-private extension 0x62626b67) ----
 *
 * A BdrvDirtyBitmap's generation is a UUID that changes on every clear;
 * backup chains compare it to tell whether a bitmap still holds every
 * write since their last backup.  The qcow2 bitmaps extension has no room
 * for it (QEMU refuses entries with extra data), so bitback keeps it in its
 * own header extension, which QEMU preserves as an unknown one:
 *
 *   payload (big-endian)       record (one per bitmap, 8-byte aligned)
 *   0  u32 version (1)         0   u64 bitmap table offset, as in the
 *   4  u32 number of records           directory entry when written
 *   8  records                 8   36 bytes: generation UUID, ASCII
 *                              44  u16 name size (1..1023)
 *                              46  u16 flags: bit 0 PRIOR (G6),
 *                                      the others reserved (0)
 *                              48  name, then zero padding to 8 bytes
 *
 * Invariants:
 *   G1. A loaded bitmap takes a recorded generation only if it loads as
 *       consistent, the autoclear bit QCOW2_AUTOCLEAR_BITBACK_GENERATIONS
 *       is set (qcow2.c drops the records otherwise), and its directory
 *       entry's table offset is non-zero and equal to the record's.  Any
 *       other bitmap (inconsistent ones included) loads with an *unknown*
 *       generation, the empty string: bitback cannot vouch for its
 *       history, so a backup chain does not compare it (the bitmap is
 *       trusted as QEMU and libvirt trust it: it exists and is
 *       consistent).  A fresh random one would force a full backup after
 *       every QEMU session on the image.
 *   G2. Why both checks: QEMU rewrites every bitmap's table whenever it
 *       stores bitmaps, so a cleared bitmap moves; but after two QEMU
 *       sessions a table can land at its old offset again (QEMU allocates
 *       the first free clusters).  QEMU clears unknown autoclear bits when
 *       it opens an image for writing, so any such session invalidates
 *       every record, whatever the offsets.
 *   G3. Every directory write (open's in_use marking, store, add, remove)
 *       rebuilds the records from the entries it publishes, with the
 *       generations read after the bits were written (a clear in between
 *       can only leave extra dirty bits under a newer generation), and the
 *       header update that publishes the directory also publishes them.
 *   G4. Records that do not parse (bad version, truncated, a record past
 *       the end, a bad name size, a NUL in a name, an invalid UUID,
 *       duplicate names, bytes after the last record) are all ignored: the
 *       extension is an optimization and must never make an image
 *       unusable.  Bitmaps that would not fit the first cluster get no
 *       record.
 *   G5. Only a known generation is recorded as current: a bitmap whose
 *       generation is unknown ("") gets no current record, so it stays
 *       unknown after reopen until a clear (ours) starts a new, known
 *       generation.
 *   G6. What bitback last knew is kept.  When G1 refuses a record (the
 *       autoclear bit was clear, or the offsets differ), the record's
 *       generation becomes the bitmap's *prior* generation: the one it had
 *       when bitback last stored it, before another program wrote it.  A
 *       bitmap with an unknown generation and a prior one is recorded with
 *       the PRIOR flag, so the knowledge survives later sessions; a PRIOR
 *       record never makes a generation current.  A backup chain whose
 *       manifest names a different generation than the prior one knows the
 *       bitmap was cleared (by bitback) after that backup, whatever
 *       happened since; an equal one proves nothing and is not compared,
 *       as G1 says.
 */

#define GEN_EXT_VERSION 1
#define GEN_EXT_HEADER_SIZE 8
#define GEN_REC_HEADER_SIZE 48
#define GEN_UUID_LEN 36
#define GEN_REC_FLAG_PRIOR 0x1
#define GEN_MAX_RECORDS QCOW2_MAX_BITMAPS

typedef struct Qcow2GenRecord {
    const char *name;              /* into the payload, not NUL-terminated */
    uint16_t name_size;
    uint64_t table_offset;
    char generation[UUID_STR_LEN];
    bool prior;                    /* GEN_REC_FLAG_PRIOR */
} Qcow2GenRecord;

static uint64_t gen_rec_size(size_t name_len)
{
    return ROUND_UP((uint64_t)GEN_REC_HEADER_SIZE + name_len, 8);
}

/* Parse a generations payload.  Returns the records (caller frees; they
 * point into buf) or NULL with errp set when the payload is bad (G4). */
static Qcow2GenRecord *gen_parse(const uint8_t *buf, uint32_t len,
                                 size_t *ret_n, Error **errp)
{
    uint32_t version, nb;
    uint64_t pos = GEN_EXT_HEADER_SIZE;

    if (!buf || len < GEN_EXT_HEADER_SIZE) {
        error_setg(errp, "bitmap generations extension: too short (%u bytes)",
                   len);
        return NULL;
    }
    version = ld_be32(buf);
    nb = ld_be32(buf + 4);
    if (version != GEN_EXT_VERSION) {
        error_setg(errp, "bitmap generations extension: unknown version %u",
                   version);
        return NULL;
    }
    if (nb > GEN_MAX_RECORDS ||
        (uint64_t)nb * GEN_REC_HEADER_SIZE > len - GEN_EXT_HEADER_SIZE) {
        error_setg(errp, "bitmap generations extension: %u records do not "
                   "fit in %u bytes", nb, len);
        return NULL;
    }
    Qcow2GenRecord *recs = calloc(nb ? nb : 1, sizeof(*recs));
    if (!recs) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    for (uint32_t i = 0; i < nb; i++) {
        Qcow2GenRecord *r = &recs[i];
        const uint8_t *p = buf + pos;
        uint16_t name_size, flags;

        if (len - pos < GEN_REC_HEADER_SIZE) {
            error_setg(errp, "bitmap generations extension: record %u lies "
                       "past the end", i);
            goto fail;
        }
        r->table_offset = ld_be64(p);
        memcpy(r->generation, p + 8, GEN_UUID_LEN);
        r->generation[GEN_UUID_LEN] = '\0';
        name_size = ld_be16(p + 44);
        flags = ld_be16(p + 46);
        r->prior = flags & GEN_REC_FLAG_PRIOR;
        if (name_size == 0 || name_size > QCOW2_BITMAP_MAX_NAME) {
            error_setg(errp, "bitmap generations extension: record %u has a "
                       "bad name size %u (must be 1 to %d)", i, name_size,
                       QCOW2_BITMAP_MAX_NAME);
            goto fail;
        }
        if (gen_rec_size(name_size) > len - pos) {
            error_setg(errp, "bitmap generations extension: record %u lies "
                       "past the end", i);
            goto fail;
        }
        if ((flags & ~GEN_REC_FLAG_PRIOR) ||
            memchr(p + GEN_REC_HEADER_SIZE, 0, name_size)) {
            error_setg(errp, "bitmap generations extension: record %u has "
                       "reserved bits set or a NUL in its name", i);
            goto fail;
        }
        if (!uuid_is_valid_str(r->generation)) {
            error_setg(errp, "bitmap generations extension: record %u has an "
                       "invalid generation UUID", i);
            goto fail;
        }
        r->name = (const char *)p + GEN_REC_HEADER_SIZE;
        r->name_size = name_size;
        for (uint32_t j = 0; j < i; j++) {
            if (recs[j].name_size == name_size &&
                memcmp(recs[j].name, r->name, name_size) == 0) {
                error_setg(errp, "bitmap generations extension: bitmap '%.*s' "
                           "appears twice", (int)name_size, r->name);
                goto fail;
            }
        }
        pos += gen_rec_size(name_size);
    }
    if (pos != len) {
        error_setg(errp, "bitmap generations extension: %" PRIu64 " bytes "
                   "after the last record", len - pos);
        goto fail;
    }
    *ret_n = nb;
    return recs;

fail:
    free(recs);
    return NULL;
}

/* The record for bitmap `name`, or NULL. */
static const Qcow2GenRecord *gen_find(const Qcow2GenRecord *recs, size_t n,
                                      const char *name)
{
    size_t len = strlen(name);
    for (size_t i = 0; recs && i < n; i++) {
        if (recs[i].name_size == len && memcmp(recs[i].name, name, len) == 0) {
            return &recs[i];
        }
    }
    return NULL;
}

/* The current generation recorded for entry e, or NULL (G1). */
static const char *gen_lookup(const Qcow2GenRecord *recs, size_t n,
                              const Qcow2BitmapEntry *e)
{
    const Qcow2GenRecord *r = gen_find(recs, n, e->name);
    return r && !r->prior && e->table_offset &&
           r->table_offset == e->table_offset ? r->generation : NULL;
}

/* The prior generation of entry e when it has no current one (G6): its
 * record in the trusted payload (PRIOR, or refused by G1), else its record
 * in a stale one.  NULL when bitback never recorded one. */
static const char *gen_lookup_prior(const Qcow2GenRecord *recs, size_t n,
                                    const Qcow2GenRecord *stale, size_t n_stale,
                                    const Qcow2BitmapEntry *e)
{
    const Qcow2GenRecord *r = gen_find(recs, n, e->name);
    if (!r) {
        r = gen_find(stale, n_stale, e->name);
    }
    return r ? r->generation : NULL;
}

/* Build the payload describing `entries` with the current generations of
 * their bitmaps (G3): consistent entries with a table only, as many as fit
 * in `budget` bytes.  *ret_buf is NULL (no extension) when no record
 * results.  false only when memory is short.  s->lock held, not bs->lock. */
static bool gen_build_locked(BlockDriverState *bs,
                             const Qcow2BitmapEntry *entries, size_t nb,
                             uint64_t budget, uint8_t **ret_buf,
                             uint32_t *ret_len)
{
    uint64_t size = GEN_EXT_HEADER_SIZE;
    uint32_t nrec = 0;

    *ret_buf = NULL;
    *ret_len = 0;
    if (budget < GEN_EXT_HEADER_SIZE) {
        return true;
    }
    budget = MIN(budget, (uint64_t)UINT32_MAX);
    uint8_t *buf = calloc(1, budget);
    if (!buf) {
        return false;
    }
    pthread_mutex_lock(&bs->lock);
    for (size_t i = 0; i < nb; i++) {
        const Qcow2BitmapEntry *e = &entries[i];
        size_t name_len = strlen(e->name);
        uint64_t rsize = gen_rec_size(name_len);
        if (e->inconsistent || !e->table_offset || rsize > budget - size) {
            continue;
        }
        BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap_locked(bs, e->name);
        if (!bm || !bm->persistent || bm->inconsistent) {
            continue;
        }
        /* G5: "" (unknown) is not valid; G6: then the prior one, if any. */
        bool prior = !uuid_is_valid_str(bm->generation);
        const char *gen = prior ? bm->prior_generation : bm->generation;
        if (!uuid_is_valid_str(gen)) {
            continue;
        }
        uint8_t *p = buf + size;
        st_be64(p, e->table_offset);
        memcpy(p + 8, gen, GEN_UUID_LEN);
        st_be16(p + 44, (uint16_t)name_len);
        st_be16(p + 46, prior ? GEN_REC_FLAG_PRIOR : 0);
        memcpy(p + GEN_REC_HEADER_SIZE, e->name, name_len);
        size += rsize;
        nrec++;
    }
    pthread_mutex_unlock(&bs->lock);
    if (nrec == 0) {
        free(buf);
        return true;
    }
    st_be32(buf, GEN_EXT_VERSION);
    st_be32(buf + 4, nrec);
    *ret_buf = buf;
    *ret_len = (uint32_t)size;
    return true;
}

/* ---- writing ---- */

/* Free the table and data clusters of an entry as they are on disk.
 * Entries that look wrong are skipped (a leak, never a wrong free).
 * s->lock held. */
static void entry_free_clusters_locked(BlockDriverState *bs,
                                       const Qcow2BitmapEntry *e)
{
    BDRVQcow2State *s = bs->opaque;
    int64_t file_len = bdrv_getlength(bs->file);
    if (!e->table_size || file_len < 0) {
        return;
    }
    uint64_t *table = table_read(bs, e, NULL);
    if (!table) {
        return;
    }
    for (uint32_t j = 0; j < e->table_size; j++) {
        uint64_t off = table[j] & BME_TABLE_OFFSET_MASK;
        if (off && table_entry_check(s, e, j, table[j], (uint64_t)file_len, NULL)) {
            qcow2_free_clusters_locked(bs, off, s->cluster_size);
        }
    }
    free(table);
    qcow2_free_clusters_locked(bs, e->table_offset,
                               ROUND_UP((uint64_t)e->table_size * 8,
                                        s->cluster_size));
}

/* Free a table we wrote ourselves (still in memory) and its data. */
static void table_free_clusters_locked(BlockDriverState *bs, const uint64_t *table,
                                       uint32_t table_size, uint64_t table_offset)
{
    BDRVQcow2State *s = bs->opaque;
    for (uint32_t j = 0; j < table_size; j++) {
        uint64_t off = table[j] & BME_TABLE_OFFSET_MASK;
        if (off) {
            qcow2_free_clusters_locked(bs, off, s->cluster_size);
        }
    }
    if (table_offset) {
        qcow2_free_clusters_locked(bs, table_offset,
                                   ROUND_UP((uint64_t)table_size * 8,
                                            s->cluster_size));
    }
}

/* Write bm's bits: data clusters (none for all-zero or all-one clusters),
 * then the table.  Fills e's table_offset/table_size/granularity_bits and
 * returns the table (host order) so the caller can free the clusters if
 * the directory update fails.  Not flushed.  s->lock held. */
static uint64_t *bitmap_write_locked(BlockDriverState *bs, BdrvDirtyBitmap *bm,
                                     Qcow2BitmapEntry *e, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t bpc = cs * 8;
    unsigned gb = (unsigned)gran_bits(bm->granularity);
    uint64_t nb_bits, size, table_bytes;
    uint64_t *table = NULL;
    _cleanup_free_ uint8_t *buf = NULL;
    _cleanup_free_ uint64_t *be = NULL;
    uint32_t table_size;
    int64_t off;
    int r;

    pthread_mutex_lock(&bs->lock);
    nb_bits = hbitmap_nb_bits(bm->hb);
    size = hbitmap_size(bm->hb);
    pthread_mutex_unlock(&bs->lock);
    if (DIV_ROUND_UP(nb_bits, 8) > QCOW2_BITMAP_MAX_DATA) {
        error_setg(errp, "bitmap '%s' is too large to store", bm->name);
        return NULL;
    }
    table_size = (uint32_t)DIV_ROUND_UP(DIV_ROUND_UP(nb_bits, 8), cs);
    table_bytes = ROUND_UP((uint64_t)table_size * 8, cs);
    table = calloc(table_size ? table_size : 1, sizeof(uint64_t));
    buf = malloc(cs);
    if (!table || !buf) {
        error_setg(errp, "out of memory");
        free(table);
        return NULL;
    }
    for (uint32_t j = 0; j < table_size; j++) {
        uint64_t first = (uint64_t)j * bpc;
        uint64_t n = MIN(bpc, nb_bits - first);
        uint64_t start = first << gb;
        uint64_t len = MIN(n << gb, size - start);

        pthread_mutex_lock(&bs->lock);
        if (hbitmap_next_dirty(bm->hb, start, len) < 0) {
            pthread_mutex_unlock(&bs->lock);
            continue;                        /* entry 0: all zeroes */
        }
        if (n == bpc && hbitmap_next_zero(bm->hb, start, len) < 0) {
            pthread_mutex_unlock(&bs->lock);
            table[j] = BME_TABLE_ALL_ONES;
            continue;
        }
        memset(buf, 0, cs);
        hbitmap_serialize_part(bm->hb, buf, first, n);
        pthread_mutex_unlock(&bs->lock);

        off = qcow2_alloc_clusters_locked(bs, cs);
        if (off < 0) {
            error_setg_errno(errp, (int)-off, "cannot allocate a cluster for "
                             "bitmap '%s'", bm->name);
            goto fail;
        }
        table[j] = (uint64_t)off;
        r = bdrv_pwrite(bs->file, (uint64_t)off, buf, cs, 0);
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot write the data of bitmap '%s'",
                             bm->name);
            goto fail;
        }
    }

    e->table_size = table_size;
    e->granularity_bits = (uint8_t)gb;
    e->table_offset = 0;
    if (table_size) {
        be = calloc(table_bytes / 8, sizeof(uint64_t));
        if (!be) {
            error_setg(errp, "out of memory");
            goto fail;
        }
        for (uint32_t j = 0; j < table_size; j++) {
            be[j] = htobe64(table[j]);
        }
        off = qcow2_alloc_clusters_locked(bs, table_bytes);
        if (off < 0) {
            error_setg_errno(errp, (int)-off, "cannot allocate the table of "
                             "bitmap '%s'", bm->name);
            goto fail;
        }
        e->table_offset = (uint64_t)off;
        r = bdrv_pwrite(bs->file, (uint64_t)off, be, table_bytes, 0);
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot write the table of bitmap '%s'",
                             bm->name);
            goto fail;
        }
    }
    return table;

fail:
    table_free_clusters_locked(bs, table, table_size, e->table_offset);
    e->table_offset = 0;
    free(table);
    return NULL;
}

/* Publish `entries` as the directory (invariant 1): write a new directory,
 * flush, rewrite the header, then free the old directory (unless
 * keep_old: an untrusted one, invariant 5).  With no entries, the
 * extension goes away and the autoclear bit is cleared.  s->lock held. */
static bool dir_write_locked(BlockDriverState *bs, const Qcow2BitmapEntry *entries,
                             size_t nb, bool keep_old, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    uint64_t size = 0, alloc_size, pos = 0;
    uint64_t old_offset = s->bitmap_directory_offset;
    uint64_t old_size = s->bitmap_directory_size;
    uint32_t old_nb = s->nb_bitmaps;
    uint64_t old_autoclear = s->autoclear_features;
    uint8_t *old_gen = s->gen_ext;
    uint32_t old_gen_len = s->gen_ext_len;
    uint8_t *gen = NULL;
    uint32_t gen_len = 0;
    _cleanup_free_ uint8_t *buf = NULL;
    int64_t off = 0;
    int r;

    if (nb > QCOW2_MAX_BITMAPS) {
        error_setg(errp, "too many bitmaps (at most %d)", QCOW2_MAX_BITMAPS);
        return false;
    }
    for (size_t i = 0; i < nb; i++) {
        size += entry_disk_size(entries[i].extra_data_size,
                                strlen(entries[i].name));
    }
    if (size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
        error_setg(errp, "the bitmap directory would exceed %llu bytes",
                   QCOW2_MAX_BITMAP_DIRECTORY_SIZE);
        return false;
    }
    if (nb) {
        alloc_size = ROUND_UP(size, s->cluster_size);
        buf = calloc(1, alloc_size);
        if (!buf) {
            error_setg(errp, "out of memory");
            return false;
        }
        for (size_t i = 0; i < nb; i++) {
            const Qcow2BitmapEntry *e = &entries[i];
            uint8_t *p = buf + pos;
            size_t name_len = strlen(e->name);

            st_be64(p, e->table_offset);
            st_be32(p + 8, e->table_size);
            st_be32(p + 12, e->flags);
            p[16] = BME_TYPE_DIRTY_TRACKING;
            p[17] = e->granularity_bits;
            st_be16(p + 18, (uint16_t)name_len);
            st_be32(p + 20, e->extra_data_size);
            if (e->extra_data_size) {
                memcpy(p + BME_HEADER_SIZE, e->extra_data, e->extra_data_size);
            }
            memcpy(p + BME_HEADER_SIZE + e->extra_data_size, e->name, name_len);
            pos += entry_disk_size(e->extra_data_size, name_len);
        }
        off = qcow2_alloc_clusters_locked(bs, alloc_size);
        if (off < 0) {
            error_setg_errno(errp, (int)-off, "cannot allocate the bitmap "
                             "directory");
            return false;
        }
        r = bdrv_pwrite(bs->file, (uint64_t)off, buf, alloc_size, 0);
        if (r >= 0) {
            r = bdrv_flush(bs->file);
        }
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot write the bitmap directory");
            qcow2_free_clusters_locked(bs, (uint64_t)off, alloc_size);
            return false;
        }
    }

    /* G3: the records for these entries, in the same header update.  Out
     * of memory here only costs the records (unknown generations later). */
    if (nb && !gen_build_locked(bs, entries, nb, qcow2_gen_ext_space_locked(bs),
                                &gen, &gen_len)) {
        gen = NULL;
        gen_len = 0;
    }
    s->gen_ext = gen;
    s->gen_ext_len = gen_len;
    if (gen_len) {
        s->autoclear_features |= QCOW2_AUTOCLEAR_BITBACK_GENERATIONS;
    } else {
        s->autoclear_features &= ~QCOW2_AUTOCLEAR_BITBACK_GENERATIONS;
    }

    s->nb_bitmaps = (uint32_t)nb;
    s->bitmap_directory_offset = (uint64_t)off;
    s->bitmap_directory_size = size;
    if (nb) {
        s->autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
    } else {
        s->autoclear_features &= ~(uint64_t)QCOW2_AUTOCLEAR_BITMAPS;
    }
    r = qcow2_update_header_locked(bs);
    if (r < 0) {
        s->nb_bitmaps = old_nb;
        s->bitmap_directory_offset = old_offset;
        s->bitmap_directory_size = old_size;
        s->autoclear_features = old_autoclear;
        free(s->gen_ext);                    /* gen, unless dropped */
        s->gen_ext = old_gen;
        s->gen_ext_len = old_gen_len;
        if (nb) {
            qcow2_free_clusters_locked(bs, (uint64_t)off,
                                       ROUND_UP(size, s->cluster_size));
        }
        error_setg_errno(errp, -r, "cannot update the qcow2 header");
        return false;
    }
    free(old_gen);
    if (old_offset && old_size && !keep_old) {
        qcow2_free_clusters_locked(bs, old_offset,
                                   ROUND_UP(old_size, s->cluster_size));
    }
    return true;
}

static Qcow2Bitmaps *bitmaps_state(BDRVQcow2State *s)
{
    if (!s->bitmaps) {
        s->bitmaps = calloc(1, sizeof(*s->bitmaps));
    }
    return s->bitmaps;
}

static Qcow2BitmapEntry *entry_find(Qcow2Bitmaps *bms, const char *name,
                                    size_t *ret_idx)
{
    for (size_t i = 0; bms && i < bms->nb; i++) {
        if (strcmp(bms->entries[i].name, name) == 0) {
            if (ret_idx) {
                *ret_idx = i;
            }
            return &bms->entries[i];
        }
    }
    return NULL;
}

/* ---- open ---- */

static void release_loaded(BlockDriverState *bs, Qcow2BitmapEntry *entries,
                           size_t nb)
{
    for (size_t i = 0; i < nb; i++) {
        BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, entries[i].name);
        if (bm) {
            bdrv_release_dirty_bitmap(bm);
        }
    }
}

bool qcow2_load_bitmaps(BlockDriverState *bs, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    Qcow2Bitmaps *bms = bitmaps_state(s);
    Qcow2BitmapEntry *entries = NULL;
    _cleanup_free_ uint8_t *buf = NULL;
    _cleanup_free_ Qcow2GenRecord *gens = NULL, *stale = NULL;
    size_t created = 0, nb_gens = 0, nb_stale = 0;
    uint32_t nb = s->nb_bitmaps;
    bool trusted = s->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS;
    /* For the write-intent log (write-intent.h): only when our own
     * autoclear bit survived can no other program have written the image
     * since bitback last had it open for writing. */
    bs->bitmaps_foreign_writes =
        !trusted || !(s->autoclear_features & QCOW2_AUTOCLEAR_BITBACK_GENERATIONS);
    int64_t file_len;
    int r;

    if (!bms) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (nb == 0 && s->bitmap_directory_offset == 0 &&
        s->bitmap_directory_size == 0) {
        return true;                         /* no extension */
    }
    LOCK_GUARD(&s->lock);
    file_len = bdrv_getlength(bs->file);
    if (file_len < 0) {
        error_setg_errno(errp, (int)-file_len, "cannot get the file length");
        return false;
    }
    if (nb == 0 || nb > QCOW2_MAX_BITMAPS) {
        error_setg(errp, "bitmaps extension: bad number of bitmaps %u (must be "
                   "1 to %d)", nb, QCOW2_MAX_BITMAPS);
        return false;
    }
    if (s->bitmap_directory_size < (uint64_t)nb * BME_HEADER_SIZE ||
        s->bitmap_directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
        error_setg(errp, "bitmaps extension: bad bitmap directory size %" PRIu64
                   " for %u bitmaps (at most %llu bytes)",
                   s->bitmap_directory_size, nb, QCOW2_MAX_BITMAP_DIRECTORY_SIZE);
        return false;
    }
    if (s->bitmap_directory_offset == 0 ||
        s->bitmap_directory_offset % s->cluster_size ||
        !range_in_file(s->bitmap_directory_offset, s->bitmap_directory_size,
                       (uint64_t)file_len)) {
        error_setg(errp, "bitmaps extension: the bitmap directory (offset 0x%"
                   PRIx64 ", %" PRIu64 " bytes) is not cluster-aligned or lies "
                   "outside the file (%" PRId64 " bytes)",
                   s->bitmap_directory_offset, s->bitmap_directory_size,
                   file_len);
        return false;
    }
    buf = malloc(s->bitmap_directory_size);
    if (!buf) {
        error_setg(errp, "out of memory");
        return false;
    }
    r = bdrv_pread(bs->file, s->bitmap_directory_offset, buf,
                   s->bitmap_directory_size);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot read the bitmap directory");
        return false;
    }
    if (!dir_parse(bs, buf, s->bitmap_directory_size, nb, (uint64_t)file_len,
                   &entries, errp)) {
        return false;
    }
    if (trusted && s->gen_ext) {
        /* G4: bad records are ignored (gens stays NULL). */
        gens = gen_parse(s->gen_ext, s->gen_ext_len, &nb_gens, NULL);
    }
    if (trusted && s->gen_ext_stale) {
        stale = gen_parse(s->gen_ext_stale, s->gen_ext_stale_len, &nb_stale,
                          NULL);
    }

    /* bdrv_create_dirty_bitmap sizes bitmaps by the node's length, which
     * block.c caches only after open returns. */
    bs->size = s->size;
    for (created = 0; created < nb; created++) {
        Qcow2BitmapEntry *e = &entries[created];
        BdrvDirtyBitmap *bm = bdrv_create_dirty_bitmap(
            bs, UINT32_C(1) << e->granularity_bits, e->name, errp);
        if (!bm) {
            error_prepend(errp, "cannot load bitmap '%s': ", e->name);
            goto fail;
        }
        bdrv_dirty_bitmap_set_persistent(bm, true);
        if (!(e->flags & BME_FLAG_AUTO)) {
            bm->disabled = true;
        }
        if (!trusted) {
            e->inconsistent = true;
            bdrv_dirty_bitmap_set_inconsistent(bm, "the qcow2 image was "
                "modified by a program without bitmap support (bitmaps "
                "autoclear bit clear)");
        } else if (e->flags & BME_FLAG_IN_USE) {
            e->inconsistent = true;
            bdrv_dirty_bitmap_set_inconsistent(bm, "the bitmap is marked in-use "
                "in the qcow2 image (it was not stored cleanly: the image was "
                "open for writing when its process stopped)");
        } else if (!bitmap_load_data(bs, e, bm, (uint64_t)file_len, errp)) {
            created++;
            goto fail;
        }
        /* G1: the recorded generation, or unknown.  bm is already on the
         * node's list, hence the lock. */
        const char *gen = e->inconsistent ? NULL
                                          : gen_lookup(gens, nb_gens, e);
        const char *prior = gen ? NULL : gen_lookup_prior(gens, nb_gens, stale,
                                                          nb_stale, e);
        pthread_mutex_lock(&bs->lock);
        if (gen) {
            memcpy(bm->generation, gen, UUID_STR_LEN);
        } else {
            bm->generation[0] = '\0';
        }
        if (prior) {
            memcpy(bm->prior_generation, prior, UUID_STR_LEN);
        } else {
            bm->prior_generation[0] = '\0';
        }
        pthread_mutex_unlock(&bs->lock);
    }

    if (!bs->read_only) {
        /* Invariant 3: in_use on disk before any guest write; invariant 5:
         * an untrusted directory is dropped, never freed. */
        for (size_t i = 0; trusted && i < nb; i++) {
            entries[i].flags |= BME_FLAG_IN_USE;
        }
        if (!dir_write_locked(bs, entries, trusted ? nb : 0, !trusted, errp)) {
            error_prepend(errp, "cannot mark the qcow2 bitmaps in use: ");
            created = nb;
            goto fail;
        }
        if (!trusted) {
            entries_free(entries, nb);
            entries = NULL;
            nb = 0;
        }
    }
    entries_free(bms->entries, bms->nb);
    bms->entries = entries;
    bms->nb = nb;
    return true;

fail:
    release_loaded(bs, entries, created);
    entries_free(entries, nb);
    return false;
}

/* ---- store ---- */

typedef struct NewBitmap {
    uint64_t *table;               /* what we wrote, to undo */
} NewBitmap;

/* Store every persistent bitmap.  When `closing`, in_use is cleared on the
 * stored entries; otherwise the image stays open for writing and in_use
 * stays set (invariant 3).  s->lock held. */
static bool store_locked(BlockDriverState *bs, bool closing, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    Qcow2Bitmaps *bms = bitmaps_state(s);
    size_t nb_persistent = 0, nb_new = 0, cap;
    _cleanup_free_ BdrvDirtyBitmap **persistent = NULL;
    _cleanup_free_ bool *old_dropped = NULL;   /* old entry's clusters to free */
    Qcow2BitmapEntry *entries = NULL;
    NewBitmap *written = NULL;
    bool ok = false;
    int r;

    if (!bms) {
        error_setg(errp, "out of memory");
        return false;
    }
    pthread_mutex_lock(&bs->lock);
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        nb_persistent += bm->persistent;
    }
    persistent = calloc(nb_persistent + 1, sizeof(*persistent));
    if (persistent) {
        size_t i = 0;
        for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
            if (bm->persistent) {
                persistent[i++] = bm;
            }
        }
    }
    pthread_mutex_unlock(&bs->lock);

    cap = bms->nb + nb_persistent + 1;
    entries = calloc(cap, sizeof(*entries));
    written = calloc(cap, sizeof(*written));
    old_dropped = calloc(bms->nb + 1, sizeof(bool));
    if (!persistent || !entries || !written || !old_dropped) {
        error_setg(errp, "out of memory");
        goto out;
    }

    for (size_t i = 0; i < bms->nb; i++) {
        Qcow2BitmapEntry *old = &bms->entries[i];
        BdrvDirtyBitmap *bm = NULL;
        for (size_t k = 0; k < nb_persistent; k++) {
            if (strcmp(persistent[k]->name, old->name) == 0) {
                bm = persistent[k];
            }
        }
        if (old->inconsistent || (bm && bm->inconsistent)) {
            /* Invariant 4: kept as it is on disk, in_use set. */
            if (!entry_copy(&entries[nb_new], old)) {
                error_setg(errp, "out of memory");
                goto out;
            }
            entries[nb_new].flags |= BME_FLAG_IN_USE;
            entries[nb_new++].inconsistent = true;
            continue;
        }
        old_dropped[i] = true;
        if (!bm) {
            continue;                        /* no longer persistent */
        }
        Qcow2BitmapEntry *e = &entries[nb_new];
        if (!entry_copy(e, old)) {
            error_setg(errp, "out of memory");
            goto out;
        }
        e->flags &= BME_FLAG_EXTRA_DATA_COMPATIBLE;
        written[nb_new].table = bitmap_write_locked(bs, bm, e, errp);
        if (!written[nb_new].table) {
            entry_clear(e);
            goto out;
        }
        nb_new++;
        /* flags below, once every bitmap is written */
    }
    for (size_t k = 0; k < nb_persistent; k++) {
        BdrvDirtyBitmap *bm = persistent[k];
        if (bm->inconsistent || entry_find(bms, bm->name, NULL)) {
            continue;      /* inconsistent ones without an entry: invariant 5 */
        }
        Qcow2BitmapEntry *e = &entries[nb_new];
        e->name = strdup(bm->name);
        if (!e->name) {
            error_setg(errp, "out of memory");
            goto out;
        }
        written[nb_new].table = bitmap_write_locked(bs, bm, e, errp);
        if (!written[nb_new].table) {
            entry_clear(e);
            goto out;
        }
        nb_new++;
    }
    for (size_t i = 0; i < nb_new; i++) {
        Qcow2BitmapEntry *e = &entries[i];
        if (e->inconsistent) {
            continue;
        }
        BdrvDirtyBitmap *bm = NULL;
        for (size_t k = 0; k < nb_persistent; k++) {
            if (strcmp(persistent[k]->name, e->name) == 0) {
                bm = persistent[k];
            }
        }
        pthread_mutex_lock(&bs->lock);
        if (bm && !bm->disabled) {
            e->flags |= BME_FLAG_AUTO;
        }
        pthread_mutex_unlock(&bs->lock);
        if (!closing) {
            e->flags |= BME_FLAG_IN_USE;
        }
    }

    /* Invariant 2: data and tables durable before the directory. */
    r = bdrv_flush(bs->file);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot flush the bitmap data");
        goto out;
    }
    if (!dir_write_locked(bs, entries, nb_new, false, errp)) {
        goto out;
    }
    for (size_t i = 0; i < bms->nb; i++) {
        if (old_dropped[i]) {
            entry_free_clusters_locked(bs, &bms->entries[i]);
        }
    }
    entries_free(bms->entries, bms->nb);
    bms->entries = steal_pointer(&entries);
    bms->nb = nb_new;
    ok = true;

out:
    for (size_t i = 0; written && i < nb_new; i++) {
        if (written[i].table && !ok) {
            table_free_clusters_locked(bs, written[i].table,
                                       entries[i].table_size,
                                       entries[i].table_offset);
        }
        free(written[i].table);
    }
    free(written);
    if (entries) {
        entries_free(entries, nb_new);
    }
    return ok;
}

bool qcow2_store_bitmaps(BlockDriverState *bs, Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    if (bs->read_only) {
        return true;
    }
    if (!s->bitmaps || (s->bitmaps->nb == 0 && !s->nb_bitmaps)) {
        /* Nothing on disk: only store if some bitmap is persistent. */
        bool any = false;
        pthread_mutex_lock(&bs->lock);
        for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
            any |= bm->persistent && !bm->inconsistent;
        }
        pthread_mutex_unlock(&bs->lock);
        if (!any) {
            return true;
        }
    }
    /* Guest data (and qcow2 metadata) durable before bitmaps that claim to
     * describe it. */
    int r = bdrv_flush(bs);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot flush the image before storing "
                         "bitmaps");
        return false;
    }
    /* bdrv_close() drops the last reference before it stores: only then can
     * no further write come, so only then may in_use be cleared. */
    bool closing = __atomic_load_n(&bs->refcnt, __ATOMIC_SEQ_CST) == 0;
    LOCK_GUARD(&s->lock);
    return store_locked(bs, closing, errp);
}

/* ---- add / remove ---- */

bool qcow2_bitmaps_resizable(BlockDriverState *bs, uint64_t size,
                             Error **errp)
{
    BDRVQcow2State *s = bs->opaque;

    LOCK_GUARD(&bs->lock);
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        uint64_t bytes = DIV_ROUND_UP(DIV_ROUND_UP(size, bm->granularity), 8);
        if (bm->persistent && bytes > QCOW2_BITMAP_MAX_DATA) {
            error_setg(errp, "Cannot resize to %" PRIu64 " bytes: bitmap '%s' "
                       "would need %" PRIu64 " bytes of bits (at most %llu)",
                       size, bm->name, bytes, QCOW2_BITMAP_MAX_DATA);
            return false;
        }
    }
    for (size_t i = 0; s->bitmaps && i < s->bitmaps->nb; i++) {
        if (s->bitmaps->entries[i].inconsistent) {
            error_setg(errp, "Cannot resize qcow2 with bitmap '%s', which is "
                       "inconsistent (remove it first)",
                       s->bitmaps->entries[i].name);
            return false;
        }
    }
    return true;
}

bool qcow2_persistent_bitmap_add(BlockDriverState *bs, BdrvDirtyBitmap *bm,
                                 Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    int gb = gran_bits(bm->granularity);

    if (s->version < 3) {
        error_setg(errp, "Cannot store dirty bitmaps in qcow2 v2 files");
        return false;
    }
    if (bs->read_only) {
        error_setg(errp, "Cannot add persistent bitmap '%s': the image is "
                   "read-only", bm->name);
        return false;
    }
    if (strlen(bm->name) > QCOW2_BITMAP_MAX_NAME) {
        error_setg(errp, "bitmap name '%s' is too long (at most %d bytes)",
                   bm->name, QCOW2_BITMAP_MAX_NAME);
        return false;
    }
    if (gb < BME_MIN_GRANULARITY_BITS || gb > BME_MAX_GRANULARITY_BITS) {
        error_setg(errp, "Granularity %u of bitmap '%s' is out of range for "
                   "qcow2 (512 B to 2 GiB)", bm->granularity, bm->name);
        return false;
    }
    if (bitmap_data_bytes(s, (unsigned)gb) > QCOW2_BITMAP_MAX_DATA) {
        error_setg(errp, "Bitmap '%s' would be too large: use a larger "
                   "granularity", bm->name);
        return false;
    }
    LOCK_GUARD(&s->lock);
    Qcow2Bitmaps *bms = bitmaps_state(s);
    if (!bms) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (entry_find(bms, bm->name, NULL)) {
        error_setg(errp, "Bitmap '%s' already exists in the image", bm->name);
        return false;
    }
    if (bms->nb >= QCOW2_MAX_BITMAPS) {
        error_setg(errp, "Cannot add bitmap '%s': the image already has %d "
                   "bitmaps", bm->name, QCOW2_MAX_BITMAPS);
        return false;
    }
    /* Store right away (in_use set: the image is open for writing).  bm is
     * already in bs's list as persistent, so the store writes it. */
    if (!store_locked(bs, false, errp)) {
        error_prepend(errp, "Cannot store bitmap '%s': ", bm->name);
        return false;
    }
    return true;
}

bool qcow2_persistent_bitmap_remove(BlockDriverState *bs, const char *name,
                                    Error **errp)
{
    BDRVQcow2State *s = bs->opaque;
    if (bs->read_only) {
        error_setg(errp, "Cannot remove persistent bitmap '%s': the image is "
                   "read-only", name);
        return false;
    }
    LOCK_GUARD(&s->lock);
    Qcow2Bitmaps *bms = s->bitmaps;
    size_t idx;
    Qcow2BitmapEntry *e = entry_find(bms, name, &idx);
    if (!e) {
        return true;                         /* not in the image */
    }
    Qcow2BitmapEntry *entries = calloc(bms->nb, sizeof(*entries));
    if (!entries) {
        error_setg(errp, "out of memory");
        return false;
    }
    size_t n = 0;
    for (size_t i = 0; i < bms->nb; i++) {
        if (i != idx) {
            entries[n++] = bms->entries[i];   /* shallow: same owner below */
        }
    }
    if (!dir_write_locked(bs, entries, n, false, errp)) {
        free(entries);
        error_prepend(errp, "Cannot remove bitmap '%s' from the image: ", name);
        return false;
    }
    Qcow2BitmapEntry gone = bms->entries[idx];
    free(bms->entries);
    bms->entries = entries;
    bms->nb = n;
    entry_free_clusters_locked(bs, &gone);
    entry_clear(&gone);
    return true;
}

/* ---- info / free ---- */

void qcow2_bitmaps_info(BlockDriverState *bs, struct json_object *data)
{
    BDRVQcow2State *s = bs->opaque;
    LOCK_GUARD(&s->lock);
    Qcow2Bitmaps *bms = s->bitmaps;
    if (!bms || bms->nb == 0) {
        return;
    }
    struct json_object *arr = json_object_new_array();
    for (size_t i = 0; i < bms->nb; i++) {
        const Qcow2BitmapEntry *e = &bms->entries[i];
        struct json_object *o = json_object_new_object();
        struct json_object *flags = json_object_new_array();
        if (e->flags & BME_FLAG_IN_USE) {
            json_object_array_add(flags, json_object_new_string("in-use"));
        }
        if (e->flags & BME_FLAG_AUTO) {
            json_object_array_add(flags, json_object_new_string("auto"));
        }
        json_object_object_add(o, "flags", flags);
        json_object_object_add(o, "name", json_object_new_string(e->name));
        json_object_object_add(o, "granularity",
                               json_object_new_int64(INT64_C(1) <<
                                                     e->granularity_bits));
        json_object_array_add(arr, o);
    }
    json_object_object_add(data, "bitmaps", arr);
}

void qcow2_bitmaps_free(BlockDriverState *bs)
{
    BDRVQcow2State *s = bs->opaque;
    if (!s->bitmaps) {
        return;
    }
    entries_free(s->bitmaps->entries, s->bitmaps->nb);
    free(s->bitmaps);
    s->bitmaps = NULL;
}
