/*
 * The entries of a QBM descriptor on a node: load, mark in use, store,
 * add to and take from the list (qbm-bitmaps.h).  Shared by the qbm
 * driver and the RBD bitmaps, so the Q-invariants are kept in one place.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/drivers/qbm/qbm-bitmaps.h"
#include "util/cleanup.h"

void qbm_serialize_hbitmap(void *opaque, uint8_t *buf, uint64_t byte_off,
                           uint64_t len)
{
    QbmSerializeCtx *c = opaque;
    pthread_mutex_lock(c->lock);
    uint64_t nb = hbitmap_nb_bits(c->hb);
    uint64_t first = byte_off * 8;
    uint64_t nbits = first < nb ? MIN(len * 8, nb - first) : 0;
    memset(buf, 0, len);
    if (nbits) {
        hbitmap_serialize_part(c->hb, buf, first, nbits);
    }
    pthread_mutex_unlock(c->lock);
}

/* Load e's bytes into bm->hb: the result and, unless OK, *ret_reason. */
static QbmLoadResult entry_load(BlockDriverState *bs, QbmBitmapEntry *e,
                                uint64_t size, BdrvDirtyBitmap *bm,
                                QbmEntryOpenFn *open, void *opaque,
                                char **ret_reason)
{
    unsigned shift = (unsigned)qbm_granularity_shift(e->granularity);
    Error *err = NULL;
    if (qbm_data_size(size, shift) > QBM_MAX_BITMAP_DATA) {
        if (asprintf(ret_reason, "bitmap '%s' is too large for this image at "
                     "granularity %u", e->name, e->granularity) < 0) {
            *ret_reason = NULL;
        }
        return QBM_LOAD_BAD;
    }
    _cleanup_wil_store_ WilStore *st = open(opaque, e, false, &err);
    if (!st) {
        *ret_reason = strdup(error_get_pretty(err));
        error_free(err);
        return QBM_LOAD_BAD;
    }
    pthread_mutex_lock(&bs->lock);
    QbmLoadResult lr = qbm_bitmap_store_load(st, e->file, size, shift, bm->hb,
                                             &e->hdr, ret_reason);
    pthread_mutex_unlock(&bs->lock);
    if (lr == QBM_LOAD_NOT_CLEAN) {
        free(*ret_reason);
        if (asprintf(ret_reason, "bitmap file '%s' was not closed cleanly (the "
                     "image was open for writing when its process stopped)",
                     e->file) < 0) {
            *ret_reason = NULL;
        }
    }
    return lr;
}

bool qbm_entries_load(BlockDriverState *bs, QbmDescriptor *d,
                      QbmEntryOpenFn *open, void *opaque, Error **errp)
{
    for (size_t i = 0; i < d->nb_bitmaps; i++) {
        QbmBitmapEntry *e = &d->bitmaps[i];
        BdrvDirtyBitmap *bm = bdrv_create_dirty_bitmap(bs, e->granularity,
                                                       e->name, errp);
        if (!bm) {
            error_prepend(errp, "cannot load bitmap '%s': ", e->name);
            return false;
        }
        bdrv_dirty_bitmap_set_persistent(bm, true);
        _cleanup_free_ char *reason = NULL;
        if (entry_load(bs, e, d->size, bm, open, opaque, &reason) ==
            QBM_LOAD_OK) {
            snprintf(bm->generation, sizeof(bm->generation), "%s",
                     e->hdr.generation);
            if (!e->recording) {
                bm->disabled = true;
            }
            continue;
        }
        e->inconsistent = true;
        if (uuid_is_valid_str(e->hdr.generation)) {
            /* Show which generation the broken bitmap belonged to. */
            snprintf(bm->generation, sizeof(bm->generation), "%s",
                     e->hdr.generation);
        }
        pthread_mutex_lock(&bs->lock);
        hbitmap_reset_all(bm->hb);
        pthread_mutex_unlock(&bs->lock);
        bdrv_dirty_bitmap_set_inconsistent(bm, reason ? reason : "out of memory");
    }
    return true;
}

bool qbm_entries_mark_dirty(QbmDescriptor *d, QbmEntryOpenFn *open,
                            void *opaque, Error **errp)
{
    for (size_t i = 0; i < d->nb_bitmaps; i++) {
        QbmBitmapEntry *e = &d->bitmaps[i];
        if (e->inconsistent || !(e->hdr.flags & QBM_FLAG_CLEAN)) {
            continue;
        }
        QbmHeader h = e->hdr;
        h.flags &= ~QBM_FLAG_CLEAN;
        _cleanup_wil_store_ WilStore *st = open(opaque, e, true, errp);
        if (!st || !qbm_bitmap_store_write_header(st, e->file, &h, errp)) {
            error_prepend(errp, "cannot mark bitmap '%s' in use: ", e->name);
            return false;
        }
        e->hdr = h;
    }
    return true;
}

bool qbm_entries_store(BlockDriverState *bs, QbmDescriptor *d,
                       QbmEntryOpenFn *open, void *opaque,
                       bool *ret_desc_changed, Error **errp)
{
    *ret_desc_changed = false;
    for (size_t i = 0; i < d->nb_bitmaps; i++) {
        QbmBitmapEntry *e = &d->bitmaps[i];
        if (e->inconsistent) {
            continue;   /* Q2: never rewritten */
        }
        BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, e->name);
        if (!bm || bm->inconsistent) {
            continue;
        }
        if (e->recording == bm->disabled) {
            e->recording = !bm->disabled;
            *ret_desc_changed = true;
        }
        QbmHeader h = e->hdr;
        pthread_mutex_lock(&bs->lock);
        snprintf(h.generation, sizeof(h.generation), "%s", bm->generation);
        pthread_mutex_unlock(&bs->lock);
        QbmSerializeCtx ctx = { .hb = bm->hb, .lock = &bs->lock };
        _cleanup_wil_store_ WilStore *st = open(opaque, e, true, errp);
        if (!st || !qbm_bitmap_store_save(st, e->file, &h,
                                          qbm_serialize_hbitmap, &ctx, errp)) {
            error_prepend(errp, "bitmap '%s': ", e->name);
            return false;
        }
        e->hdr = h;
    }
    return true;
}

QbmBitmapEntry *qbm_entry_find(QbmDescriptor *d, const char *name,
                               size_t *ret_idx)
{
    for (size_t i = 0; i < d->nb_bitmaps; i++) {
        if (strcmp(d->bitmaps[i].name, name) == 0) {
            if (ret_idx) {
                *ret_idx = i;
            }
            return &d->bitmaps[i];
        }
    }
    return NULL;
}

QbmBitmapEntry *qbm_entry_append(QbmDescriptor *d, const BdrvDirtyBitmap *bm,
                                 const char *file, const QbmHeader *hdr)
{
    QbmBitmapEntry *arr = realloc(d->bitmaps, (d->nb_bitmaps + 1) * sizeof(*arr));
    char *name = strdup(bm->name);
    char *file_copy = strdup(file);
    if (arr) {
        d->bitmaps = arr;
    }
    if (!arr || !name || !file_copy) {
        free(name);
        free(file_copy);
        return NULL;
    }
    QbmBitmapEntry *e = &arr[d->nb_bitmaps++];
    *e = (QbmBitmapEntry){
        .name = name,
        .file = file_copy,
        .granularity = bm->granularity,
        .recording = !bm->disabled,
        .hdr = *hdr,
    };
    return e;
}

void qbm_entry_take(QbmDescriptor *d, size_t idx, QbmBitmapEntry *ret_saved)
{
    *ret_saved = d->bitmaps[idx];
    memmove(&d->bitmaps[idx], &d->bitmaps[idx + 1],
            (d->nb_bitmaps - idx - 1) * sizeof(*d->bitmaps));
    d->nb_bitmaps--;
}

void qbm_entry_put_back(QbmDescriptor *d, size_t idx,
                        const QbmBitmapEntry *saved)
{
    memmove(&d->bitmaps[idx + 1], &d->bitmaps[idx],
            (d->nb_bitmaps - idx) * sizeof(*d->bitmaps));
    d->bitmaps[idx] = *saved;
    d->nb_bitmaps++;
}
