/*
 * What every container of QBM bitmaps does with the entries of its
 * descriptor, whatever holds the bytes: the qbm driver (bitmap files in
 * the descriptor's folder, qbm.c) and the RBD bitmaps (RADOS objects next
 * to an RBD image, rbd-bitmaps.c).  Load every entry onto the node (Q2:
 * a problem makes the bitmap inconsistent with a reason, never a failed
 * open), clear CLEAN before the first write (Q1), store with the
 * protocol of qbm-format.c, and keep the descriptor's list.  The caller
 * says where an entry's bytes are through a callback that opens its store.
 */
#ifndef BITBACK_QBM_BITMAPS_H
#define BITBACK_QBM_BITMAPS_H

#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"
#include "block/drivers/qbm/qbm-format.h"
#include "block/wil-store.h"

/* Open the store of e's bytes, for writing or only reading: NULL with
 * errp set when it cannot be (for a load, errp's message becomes the
 * bitmap's inconsistent reason). */
typedef WilStore *QbmEntryOpenFn(void *opaque, const QbmBitmapEntry *e,
                                 bool writable, Error **errp);

/* Create a persistent BdrvDirtyBitmap on bs for every entry of d (an image
 * of d->size bytes) and load its bits: consistent when the bytes are CLEAN
 * and match their checksum, otherwise inconsistent with the reason (and
 * e->inconsistent set).  False with errp set only when a bitmap cannot be
 * created on bs (a bad name, out of memory). */
bool qbm_entries_load(BlockDriverState *bs, QbmDescriptor *d,
                      QbmEntryOpenFn *open, void *opaque, Error **errp);

/* Clear CLEAN durably in every consistent entry that has it set. */
bool qbm_entries_mark_dirty(QbmDescriptor *d, QbmEntryOpenFn *open,
                            void *opaque, Error **errp);

/* Store every consistent entry's bitmap of bs (Q2: inconsistent ones are
 * never rewritten) with the store protocol; *ret_desc_changed is set when
 * a bitmap's recording state changed, so the caller rewrites d. */
bool qbm_entries_store(BlockDriverState *bs, QbmDescriptor *d,
                       QbmEntryOpenFn *open, void *opaque,
                       bool *ret_desc_changed, Error **errp);

/* The entry named name (its index in *ret_idx unless NULL), or NULL. */
QbmBitmapEntry *qbm_entry_find(QbmDescriptor *d, const char *name,
                               size_t *ret_idx);

/* Append an entry for bm stored in `file` (copied) with header hdr: the
 * new entry, or NULL when out of memory. */
QbmBitmapEntry *qbm_entry_append(QbmDescriptor *d, const BdrvDirtyBitmap *bm,
                                 const char *file, const QbmHeader *hdr);

/* Take entry idx out of d into *ret_saved, and put it back (at the same
 * index) when the descriptor could not be written. */
void qbm_entry_take(QbmDescriptor *d, size_t idx, QbmBitmapEntry *ret_saved);
void qbm_entry_put_back(QbmDescriptor *d, size_t idx,
                        const QbmBitmapEntry *saved);

/* For QbmSerializeFn: the bits of hb, read under *lock. */
typedef struct QbmSerializeCtx {
    HBitmap *hb;
    pthread_mutex_t *lock;
} QbmSerializeCtx;
void qbm_serialize_hbitmap(void *opaque, uint8_t *buf, uint64_t byte_off,
                           uint64_t len);

#endif
