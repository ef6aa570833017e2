/*
 * Named dirty bitmaps on block nodes: creation, lookup, the user operations
 * (clear, enable, disable, merge), and marking writes.
 *
 * All bitmaps of a node are guarded by bs->lock (see block.h).  Marking
 * (bdrv_set_dirty) is on the write path of every request, so it first checks
 * without the lock whether the node has any bitmap at all: a bitmap added
 * while a write is in flight need not see that write, exactly as in QEMU.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/evp.h>

#include "block/dirty-bitmap.h"
#include "block/block.h"
#include "block/write-intent.h"
#include "util/cleanup.h"

/* ---- W9: a change is durable before the call that made it returns ---- */

static unsigned batch_depth;        /* open batches (main thread) */

void bdrv_dirty_bitmap_batch_begin(void)
{
    __atomic_add_fetch(&batch_depth, 1, __ATOMIC_SEQ_CST);
}

bool bdrv_dirty_bitmap_batch_end(void)
{
    if (__atomic_sub_fetch(&batch_depth, 1, __ATOMIC_SEQ_CST) > 0) {
        return true;
    }
    return write_intent_sync_all_changed();
}

/* The end of every public function that changes a node's bitmaps, called
 * without bs->lock: outside a batch the change is made durable now. */
static void change_made(BlockDriverState *bs)
{
    if (__atomic_load_n(&batch_depth, __ATOMIC_SEQ_CST) == 0) {
        write_intent_sync_changed(bs);
    }
}

static unsigned granularity_shift(uint32_t granularity)
{
    return (unsigned)__builtin_ctz(granularity);
}

BdrvDirtyBitmap *bdrv_find_dirty_bitmap_locked(BlockDriverState *bs,
                                               const char *name)
{
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        if (strcmp(bm->name, name) == 0) {
            return bm;
        }
    }
    return NULL;
}

BdrvDirtyBitmap *bdrv_find_dirty_bitmap(BlockDriverState *bs, const char *name)
{
    LOCK_GUARD(&bs->lock);
    return bdrv_find_dirty_bitmap_locked(bs, name);
}

bool bdrv_dirty_bitmap_check_new_name(const char *name, Error **errp)
{
    for (size_t i = 0; name && name[i]; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c < 0x20 || c == 0x7f) {
            error_setg(errp, "Bitmap name must not contain control characters "
                       "(byte 0x%02x at offset %zu)", c, i);
            return false;
        }
    }
    return true;
}

/* Append bm to bs's list (listings keep creation order), unless its name
 * is taken. */
static bool append_bitmap(BlockDriverState *bs, BdrvDirtyBitmap *bm)
{
    LOCK_GUARD(&bs->lock);
    if (bdrv_find_dirty_bitmap_locked(bs, bm->name)) {
        return false;
    }
    BdrvDirtyBitmap **p = &bs->dirty_bitmaps;
    while (*p) {
        p = &(*p)->next;
    }
    __atomic_store_n(p, bm, __ATOMIC_RELEASE);
    bdrv_dirty_bitmaps_changed(bs);
    return true;
}

BdrvDirtyBitmap *bdrv_create_dirty_bitmap(BlockDriverState *bs,
                                          uint32_t granularity,
                                          const char *name, Error **errp)
{
    if (!name || !*name) {
        error_setg(errp, "Bitmap name cannot be empty");
        return NULL;
    }
    if (strlen(name) > BDRV_BITMAP_MAX_NAME) {
        error_setg(errp, "Bitmap name is too long (at most %d bytes)",
                   BDRV_BITMAP_MAX_NAME);
        return NULL;
    }
    if (granularity < 512 || !IS_POW2(granularity) ||
        granularity_shift(granularity) > HBITMAP_MAX_GRANULARITY_SHIFT) {
        error_setg(errp, "Granularity must be a power of two between 512 and "
                   "2147483648 (2 GiB), got %u", granularity);
        return NULL;
    }
    int64_t len = bdrv_getlength(bs);
    if (len < 0) {
        error_setg(errp, "Cannot get the size of node '%s'", bs->node_name);
        return NULL;
    }
    BdrvDirtyBitmap *bm = calloc(1, sizeof(*bm));
    if (!bm) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    bm->hb = hbitmap_new((uint64_t)len, granularity_shift(granularity));
    bm->name = strdup(name);
    if (!bm->hb || !bm->name) {
        hbitmap_free(bm->hb);
        free(bm->name);
        free(bm);
        error_setg(errp, "Cannot allocate a dirty bitmap for %lld bytes at "
                   "granularity %u", (long long)len, granularity);
        return NULL;
    }
    bm->bs = bs;
    bm->granularity = granularity;
    uuid_generate_str(bm->generation);

    if (!append_bitmap(bs, bm)) {
        hbitmap_free(bm->hb);
        free(bm->name);
        free(bm);
        error_setg(errp, "Bitmap already exists: %s", name);
        return NULL;
    }
    change_made(bs);
    return bm;
}

bool bdrv_dirty_bitmaps_truncate(BlockDriverState *bs, uint64_t size,
                                 Error **errp)
{
    size_t n = 0, i = 0;
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        n += bm->successor ? 2 : 1;
    }
    if (n == 0) {
        return true;
    }
    HBitmap **copies = calloc(n, sizeof(*copies));
    if (!copies) {
        error_setg(errp, "out of memory");
        return false;
    }
    bool ok = true;
    pthread_mutex_lock(&bs->lock);
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm && ok; bm = bm->next) {
        for (BdrvDirtyBitmap *b = bm; b && ok; b = b == bm ? bm->successor
                                                            : NULL) {
            copies[i] = hbitmap_resized_copy(b->hb, size);
            ok = copies[i++] != NULL;
        }
    }
    if (ok) {
        i = 0;
        for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
            for (BdrvDirtyBitmap *b = bm; b; b = b == bm ? bm->successor
                                                          : NULL) {
                HBitmap *old = b->hb;
                b->hb = copies[i];
                copies[i++] = old;      /* freed below */
            }
        }
    }
    pthread_mutex_unlock(&bs->lock);
    for (i = 0; i < n; i++) {
        hbitmap_free(copies[i]);
    }
    free(copies);
    if (!ok) {
        error_setg(errp, "Cannot allocate the dirty bitmaps of node '%s' for "
                   "%llu bytes", bs->node_name, (unsigned long long)size);
    }
    return ok;
}

static void dirty_bitmap_free(BdrvDirtyBitmap *bm)
{
    if (!bm) {
        return;
    }
    dirty_bitmap_free(bm->successor);
    hbitmap_free(bm->hb);
    free(bm->name);
    free(bm->inconsistent_reason);
    free(bm);
}

void bdrv_release_dirty_bitmap(BdrvDirtyBitmap *bm)
{
    if (!bm) {
        return;
    }
    BlockDriverState *bs = bm->bs;
    pthread_mutex_lock(&bs->lock);
    for (BdrvDirtyBitmap **p = &bs->dirty_bitmaps; *p; p = &(*p)->next) {
        if (*p == bm) {
            *p = bm->next;
            break;
        }
    }
    pthread_mutex_unlock(&bs->lock);
    dirty_bitmap_free(bm);
    bdrv_dirty_bitmaps_changed(bs);
    change_made(bs);
}

void bdrv_release_all_dirty_bitmaps(BlockDriverState *bs)
{
    pthread_mutex_lock(&bs->lock);
    BdrvDirtyBitmap *bm = bs->dirty_bitmaps;
    bs->dirty_bitmaps = NULL;
    pthread_mutex_unlock(&bs->lock);
    while (bm) {
        BdrvDirtyBitmap *next = bm->next;
        dirty_bitmap_free(bm);
        bm = next;
    }
}

bool bdrv_dirty_bitmap_check(const BdrvDirtyBitmap *bm, unsigned flags,
                             Error **errp)
{
    if ((flags & BDRV_BITMAP_BUSY) && bm->busy) {
        error_setg(errp, "Bitmap '%s' is currently in use by another operation "
                   "and cannot be used", bm->name);
        return false;
    }
    if ((flags & BDRV_BITMAP_INCONSISTENT) && bm->inconsistent) {
        error_setg(errp, "Bitmap '%s' is inconsistent and cannot be used "
                   "(%s); it can only be removed, e.g. with "
                   "block-dirty-bitmap-remove", bm->name,
                   bm->inconsistent_reason ? bm->inconsistent_reason : "no reason recorded");
        return false;
    }
    if (!(flags & BDRV_BITMAP_ALLOW_RO) && bm->bs->read_only && bm->persistent) {
        error_setg(errp, "Bitmap '%s' is persistent on a read-only node and "
                   "cannot be modified", bm->name);
        return false;
    }
    return true;
}

void bdrv_dirty_bitmaps_changed(BlockDriverState *bs)
{
    __atomic_store_n(&bs->bitmaps_changed, true, __ATOMIC_SEQ_CST);
}

void bdrv_set_dirty(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    if (!__atomic_load_n(&bs->dirty_bitmaps, __ATOMIC_ACQUIRE)) {
        return;
    }
    LOCK_GUARD(&bs->lock);
    bdrv_set_dirty_locked(bs, offset, bytes);
}

void bdrv_set_dirty_locked(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        if (!bm->disabled) {
            hbitmap_set(bm->hb, offset, bytes);
        }
        if (bm->successor && !bm->successor->disabled) {
            hbitmap_set(bm->successor->hb, offset, bytes);
        }
    }
}

bool bdrv_clear_dirty_bitmap(BdrvDirtyBitmap *bm, Error **errp)
{
    if (!bdrv_dirty_bitmap_check(bm, BDRV_BITMAP_DEFAULT, errp)) {
        return false;
    }
    pthread_mutex_lock(&bm->bs->lock);
    hbitmap_reset_all(bm->hb);
    uuid_generate_str(bm->generation);
    bdrv_dirty_bitmaps_changed(bm->bs);
    pthread_mutex_unlock(&bm->bs->lock);
    change_made(bm->bs);
    return true;
}

bool bdrv_enable_dirty_bitmap(BdrvDirtyBitmap *bm, Error **errp)
{
    if (!bdrv_dirty_bitmap_check(bm, BDRV_BITMAP_DEFAULT, errp)) {
        return false;
    }
    pthread_mutex_lock(&bm->bs->lock);
    bm->disabled = false;
    bdrv_dirty_bitmaps_changed(bm->bs);
    pthread_mutex_unlock(&bm->bs->lock);
    change_made(bm->bs);
    return true;
}

bool bdrv_disable_dirty_bitmap(BdrvDirtyBitmap *bm, Error **errp)
{
    if (!bdrv_dirty_bitmap_check(bm, BDRV_BITMAP_DEFAULT, errp)) {
        return false;
    }
    pthread_mutex_lock(&bm->bs->lock);
    bm->disabled = true;
    bdrv_dirty_bitmaps_changed(bm->bs);
    pthread_mutex_unlock(&bm->bs->lock);
    change_made(bm->bs);
    return true;
}

bool bdrv_merge_dirty_bitmaps(BdrvDirtyBitmap *target,
                              BdrvDirtyBitmap *const *srcs, int nsrcs,
                              Error **errp)
{
    if (!bdrv_dirty_bitmap_check(target, BDRV_BITMAP_DEFAULT, errp)) {
        return false;
    }
    for (int i = 0; i < nsrcs; i++) {
        const BdrvDirtyBitmap *src = srcs[i];
        if (!bdrv_dirty_bitmap_check(src, BDRV_BITMAP_INCONSISTENT | BDRV_BITMAP_ALLOW_RO,
                                     errp)) {
            return false;
        }
        if (src->granularity != target->granularity ||
            hbitmap_size(src->hb) != hbitmap_size(target->hb)) {
            error_setg(errp, "Bitmap '%s' (granularity %u, %llu bytes) does not "
                       "match bitmap '%s' (granularity %u, %llu bytes)",
                       src->name, src->granularity,
                       (unsigned long long)hbitmap_size(src->hb), target->name,
                       target->granularity,
                       (unsigned long long)hbitmap_size(target->hb));
            return false;
        }
    }
    /* Merge into a copy first, so the target is untouched on failure. */
    pthread_mutex_lock(&target->bs->lock);
    HBitmap *acc = hbitmap_copy(target->hb);
    pthread_mutex_unlock(&target->bs->lock);
    if (!acc) {
        error_setg(errp, "out of memory");
        return false;
    }
    for (int i = 0; i < nsrcs; i++) {
        pthread_mutex_lock(&srcs[i]->bs->lock);
        bool ok = hbitmap_merge(acc, srcs[i]->hb);
        pthread_mutex_unlock(&srcs[i]->bs->lock);
        if (!ok) {
            hbitmap_free(acc);
            error_setg(errp, "Cannot merge bitmap '%s'", srcs[i]->name);
            return false;
        }
    }
    /* Writes that marked the target since the copy are merged in too. */
    pthread_mutex_lock(&target->bs->lock);
    hbitmap_merge(acc, target->hb);
    HBitmap *old = target->hb;
    target->hb = acc;
    bdrv_dirty_bitmaps_changed(target->bs);
    pthread_mutex_unlock(&target->bs->lock);
    hbitmap_free(old);
    change_made(target->bs);
    return true;
}

void bdrv_dirty_bitmap_set_persistent(BdrvDirtyBitmap *bm, bool persistent)
{
    pthread_mutex_lock(&bm->bs->lock);
    bm->persistent = persistent;
    bdrv_dirty_bitmaps_changed(bm->bs);
    pthread_mutex_unlock(&bm->bs->lock);
    change_made(bm->bs);
}

void bdrv_dirty_bitmap_set_busy(BdrvDirtyBitmap *bm, bool busy)
{
    LOCK_GUARD(&bm->bs->lock);
    bm->busy = busy;
}

void bdrv_dirty_bitmap_set_inconsistent(BdrvDirtyBitmap *bm, const char *reason)
{
    LOCK_GUARD(&bm->bs->lock);
    bm->inconsistent = true;
    bm->disabled = true;
    free(bm->inconsistent_reason);
    bm->inconsistent_reason = strdup(reason ? reason : "unknown");
}

void bdrv_dirty_bitmap_history(BdrvDirtyBitmap *bm, BdrvDirtyBitmapHistory *out)
{
    LOCK_GUARD(&bm->bs->lock);
    memcpy(out->generation, bm->generation, sizeof(out->generation));
    memcpy(out->prior_generation, bm->prior_generation,
           sizeof(out->prior_generation));
    out->recovered = bm->recovered;
    out->recovered_bytes = bm->recovered_bytes;
}

uint64_t bdrv_dirty_bitmap_count(BdrvDirtyBitmap *bm)
{
    LOCK_GUARD(&bm->bs->lock);
    return hbitmap_count_bytes(bm->hb);
}

uint64_t bdrv_dirty_bitmap_size(const BdrvDirtyBitmap *bm)
{
    return hbitmap_size(bm->hb);
}

/* The walk of bdrv_dirty_bitmap_extents holds bs->lock for at most
 * EXTENTS_SEARCHES_PER_LOCK searches, each over at most EXTENTS_SEARCH_WORDS
 * words of bits (hbitmap_next_dirty_area: the summary levels find the next
 * set bit in O(levels), the end of a dirty run is a scan of level-0 words),
 * then lets go of it so that writers (bdrv_set_dirty) get their turn.  An
 * area longer than one search is found in pieces, merged again on push. */
#define EXTENTS_SEARCHES_PER_LOCK 128
#define EXTENTS_SEARCH_WORDS      512

/* Append e to ext[0..*n), merged into the last extent when it continues it
 * with the same state; false (nothing changed) when it needs a new slot and
 * all max are used. */
static bool extent_push(BdrvDirtyExtent *ext, size_t *n, size_t max,
                        BdrvDirtyExtent e)
{
    if (*n > 0) {
        BdrvDirtyExtent *last = &ext[*n - 1];
        if (last->dirty == e.dirty && last->start + last->length == e.start) {
            last->length += e.length;
            return true;
        }
    }
    if (*n == max) {
        return false;
    }
    ext[(*n)++] = e;
    return true;
}

size_t bdrv_dirty_bitmap_extents(BdrvDirtyBitmap *bm, uint64_t offset,
                                 uint64_t bytes, bool dirty_only,
                                 BdrvDirtyExtent *ext, size_t max)
{
    uint64_t pos = offset;
    uint64_t end = bytes > UINT64_MAX - offset ? UINT64_MAX : offset + bytes;
    size_t n = 0;
    bool full = max == 0;

    while (pos < end && !full) {
        LOCK_GUARD(&bm->bs->lock);
        /* bm->hb may be replaced while the lock is free (abdicate, restore):
         * read it again on each hold; past its size the range ends. */
        uint64_t size = hbitmap_size(bm->hb);
        end = MIN(end, MAX(size, pos));
        uint64_t window = (uint64_t)EXTENTS_SEARCH_WORDS * 64
                          << hbitmap_granularity_shift(bm->hb);
        for (int i = 0; i < EXTENTS_SEARCHES_PER_LOCK && pos < end && !full; i++) {
            uint64_t lim = MIN(end - pos, window), dstart, dlen;
            bool found = hbitmap_next_dirty_area(bm->hb, pos, lim, 0,
                                                 &dstart, &dlen);
            uint64_t clean_end = found ? dstart : pos + lim;
            if (clean_end > pos) {
                if (!dirty_only &&
                    !extent_push(ext, &n, max, (BdrvDirtyExtent){
                                     pos, clean_end - pos, false })) {
                    full = true;
                    break;
                }
                pos = clean_end;
            }
            if (found) {
                if (!extent_push(ext, &n, max,
                                 (BdrvDirtyExtent){ dstart, dlen, true })) {
                    full = true;
                    break;
                }
                pos = dstart + dlen;
            }
        }
    }
    return n;
}

void bdrv_dirty_bitmap_sha256(BdrvDirtyBitmap *bm, char out[65])
{
    unsigned char md[32];
    unsigned int mdlen = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    uint8_t buf[64 * 1024];
    LOCK_GUARD(&bm->bs->lock);
    uint64_t nbits = hbitmap_nb_bits(bm->hb);
    for (uint64_t bit = 0; bit < nbits; bit += sizeof(buf) * 8) {
        uint64_t chunk = MIN(nbits - bit, (uint64_t)sizeof(buf) * 8);
        hbitmap_serialize_part(bm->hb, buf, bit, chunk);
        EVP_DigestUpdate(ctx, buf, DIV_ROUND_UP(chunk, 8));
    }
    EVP_DigestFinal_ex(ctx, md, &mdlen);
    EVP_MD_CTX_free(ctx);
    for (unsigned i = 0; i < 32; i++) {
        snprintf(out + 2 * i, 3, "%02x", md[i]);
    }
}

/* ---- successors for backup jobs ---- */

bool bdrv_dirty_bitmap_create_successor(BdrvDirtyBitmap *bm, Error **errp)
{
    BlockDriverState *bs = bm->bs;
    if (!bdrv_dirty_bitmap_check(bm, BDRV_BITMAP_BUSY, errp)) {
        return false;
    }
    if (bm->successor) {
        error_setg(errp, "Cannot create a successor for a bitmap that already "
                   "has one");
        return false;
    }
    BdrvDirtyBitmap *succ = calloc(1, sizeof(*succ));
    if (!succ) {
        error_setg(errp, "out of memory");
        return false;
    }
    succ->hb = hbitmap_new(hbitmap_size(bm->hb), granularity_shift(bm->granularity));
    succ->name = strdup("");
    if (!succ->hb || !succ->name) {
        dirty_bitmap_free(succ);
        error_setg(errp, "Cannot allocate a successor for bitmap '%s'", bm->name);
        return false;
    }
    succ->bs = bs;
    succ->granularity = bm->granularity;
    LOCK_GUARD(&bs->lock);
    succ->disabled = bm->disabled;
    bm->disabled = true;
    bm->busy = true;
    bm->successor = succ;
    return true;
}

/* End bm's successor: abdicate (its bits replace bm's, a new generation)
 * or reclaim (its bits are merged into bm's).  Either way bm is thawed and
 * recording as the successor was; nothing happens without a successor. */
static void end_successor(BdrvDirtyBitmap *bm, bool abdicate)
{
    pthread_mutex_lock(&bm->bs->lock);
    BdrvDirtyBitmap *succ = bm->successor;
    bool ended = succ != NULL;
    if (ended) {
        if (abdicate) {
            HBitmap *old = bm->hb;
            bm->hb = succ->hb;
            succ->hb = old;
            uuid_generate_str(bm->generation);
        } else {
            hbitmap_merge(bm->hb, succ->hb);
        }
        bm->disabled = succ->disabled;
        bm->busy = false;
        bm->successor = NULL;
        dirty_bitmap_free(succ);
        bdrv_dirty_bitmaps_changed(bm->bs);
    }
    pthread_mutex_unlock(&bm->bs->lock);
    if (ended) {
        change_made(bm->bs);
    }
}

void bdrv_dirty_bitmap_abdicate(BdrvDirtyBitmap *bm)
{
    end_successor(bm, true);
}

void bdrv_dirty_bitmap_reclaim(BdrvDirtyBitmap *bm)
{
    end_successor(bm, false);
}

HBitmap *bdrv_dirty_bitmap_copy_bits(BdrvDirtyBitmap *bm)
{
    LOCK_GUARD(&bm->bs->lock);
    return hbitmap_copy(bm->hb);
}

void bdrv_dirty_bitmap_merge_bits(BdrvDirtyBitmap *bm, const HBitmap *bits)
{
    pthread_mutex_lock(&bm->bs->lock);
    hbitmap_merge(bm->hb, bits);
    bdrv_dirty_bitmaps_changed(bm->bs);
    pthread_mutex_unlock(&bm->bs->lock);
    change_made(bm->bs);
}

/* ---- transaction undo ---- */

struct BdrvDirtyBitmapBackup {
    HBitmap *hb;
    bool disabled;
    char generation[UUID_STR_LEN];
};

BdrvDirtyBitmapBackup *bdrv_dirty_bitmap_backup(BdrvDirtyBitmap *bm, Error **errp)
{
    BdrvDirtyBitmapBackup *b = calloc(1, sizeof(*b));
    if (b) {
        LOCK_GUARD(&bm->bs->lock);
        b->hb = hbitmap_copy(bm->hb);
        b->disabled = bm->disabled;
        memcpy(b->generation, bm->generation, sizeof(b->generation));
    }
    if (!b || !b->hb) {
        free(b);
        error_setg(errp, "Cannot back up bitmap '%s': out of memory", bm->name);
        return NULL;
    }
    return b;
}

void bdrv_dirty_bitmap_restore(BdrvDirtyBitmap *bm, BdrvDirtyBitmapBackup *b)
{
    {
        LOCK_GUARD(&bm->bs->lock);
        HBitmap *old = bm->hb;
        bm->hb = b->hb;
        b->hb = old;
        bm->disabled = b->disabled;
        memcpy(bm->generation, b->generation, sizeof(bm->generation));
        bdrv_dirty_bitmaps_changed(bm->bs);
    }
    bdrv_dirty_bitmap_backup_free(b);
    change_made(bm->bs);
}

void bdrv_dirty_bitmap_backup_free(BdrvDirtyBitmapBackup *b)
{
    if (b) {
        hbitmap_free(b->hb);
        free(b);
    }
}
