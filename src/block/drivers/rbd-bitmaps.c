/*
 * Persistent bitmaps of RBD images in RADOS (rbd-bitmaps.h,
 * docs/specs/rbd-bitmaps.md).  The formats are QBM's, unchanged: the
 * descriptor object holds QBM's JSON descriptor (its bitmaps' "file"
 * fields name objects of the image's pool and namespace), written whole
 * and atomically (rados_obj_write_full); each bitmap object has a QBM
 * bitmap file's bytes and is loaded and stored through the same code as a
 * file (qbm-format.c on a WilStore, qbm-bitmaps.c for the entries).
 *
 * Ownership: only a node holding the image's exclusive lock (rbd.c R1)
 * writes these objects, except with locking=off, where the user vouches
 * for a single writer.  A read-only owner loads and never writes.
 * Calls come from the main thread (open, QMP, close), as qbm's do.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/drivers/qbm/qbm-bitmaps.h"
#include "block/drivers/rbd-bitmaps.h"
#include "block/drivers/rbd.h"
#include "block/rados-obj.h"
#include "util/cleanup.h"

/* The OSD's default osd_max_object_size, when the option cannot be read. */
#define RBD_BITMAPS_DEFAULT_MAX_OBJECT (UINT64_C(128) << 20)

struct RbdBitmaps {
    BlockDriverState *owner;
    BlockDriverState *image;       /* the rbd node (owner or its file) */
    rados_ioctx_t io;              /* the image's pool and namespace */
    char *desc_oid;                /* bitback_qbm.ID */
    char *wil_oid;                 /* bitback_wil.ID */
    char *bitmap_prefix;           /* bitback_bitmap.ID. */
    QbmDescriptor desc;            /* what desc_oid holds (or will) */
    bool rw;
};

/* The rbd node under bs: bs itself or its file child; NULL when none. */
static BlockDriverState *rbd_image_node(BlockDriverState *bs)
{
    if (bdrv_rbd_ioctx(bs)) {
        return bs;
    }
    return bs->file && bdrv_rbd_ioctx(bs->file) ? bs->file : NULL;
}

/* The bitmaps bs owns, or NULL. */
static RbdBitmaps *rbd_bitmaps_of(BlockDriverState *bs)
{
    BlockDriverState *img = rbd_image_node(bs);
    RbdBitmaps *b = img ? *bdrv_rbd_bitmaps_slot(img) : NULL;
    return b && b->owner == bs ? b : NULL;
}

void rbd_bitmaps_free(RbdBitmaps *b)
{
    if (b) {
        qbm_descriptor_clear(&b->desc);
        free(b->desc_oid);
        free(b->wil_oid);
        free(b->bitmap_prefix);
        free(b);
    }
}

void rbd_bitmaps_detach(BlockDriverState *owner)
{
    RbdBitmaps *b = rbd_bitmaps_of(owner);
    if (b) {
        *bdrv_rbd_bitmaps_slot(b->image) = NULL;
        rbd_bitmaps_free(b);
    }
}

/* QbmEntryOpenFn: the entry's object (a store without a lock: the image's
 * exclusive lock is what keeps other writers out). */
static WilStore *rbd_entry_open(void *opaque, const QbmBitmapEntry *e,
                                bool writable, Error **errp)
{
    RbdBitmaps *b = opaque;
    WilStore *st = wil_store_rados_object(b->io, e->file);
    if (!st) {
        error_setg(errp, "out of memory");
    }
    return st;
}

/* Replace the descriptor object with b->desc, atomically (R-B2). */
static bool rbd_write_descriptor(RbdBitmaps *b, Error **errp)
{
    _cleanup_free_ char *text = qbm_descriptor_to_json(&b->desc);
    if (!text) {
        error_setg(errp, "out of memory");
        return false;
    }
    int r = rados_obj_write_full(b->io, b->desc_oid, text, strlen(text));
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot write the bitmap descriptor "
                         "(RADOS object '%s')", b->desc_oid);
        return false;
    }
    return true;
}

/* Read and check the descriptor object into b->desc; a missing object is
 * an image without bitmaps. */
static bool rbd_read_descriptor(RbdBitmaps *b, uint64_t size, Error **errp)
{
    _cleanup_free_ uint8_t *buf = NULL;
    size_t len;
    uint64_t osize;
    Error *err = NULL;
    int r = rados_obj_stat(b->io, b->desc_oid, &osize);
    if (r == -ENOENT) {
        goto empty;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot read the bitmap descriptor (RADOS "
                         "object '%s')", b->desc_oid);
        return false;
    }
    if (!rados_obj_read_full(b->io, b->desc_oid, QBM_MAX_DESCRIPTOR_SIZE,
                             &buf, &len, &err) ||
        !qbm_descriptor_parse((const char *)buf, len, b->desc_oid, &b->desc,
                              &err)) {
        goto bad;
    }
    if (b->desc.backing_file || b->desc.alloc_file) {
        error_setg(&err, "the bitmap descriptor '%s' names a backing or "
                   "allocation file, which an RBD image's has not",
                   b->desc_oid);
        goto bad;
    }
    for (size_t i = 0; i < b->desc.nb_bitmaps; i++) {
        const char *f = b->desc.bitmaps[i].file;
        if (strncmp(f, b->bitmap_prefix, strlen(b->bitmap_prefix)) != 0) {
            error_setg(&err, "the bitmap descriptor '%s' names the object "
                       "'%s', which is not one of this image's bitmap "
                       "objects (%s*)", b->desc_oid, f, b->bitmap_prefix);
            goto bad;
        }
    }
    /* The image's size now: a bitmap made for another size loads
     * inconsistent (its header says so), never misread. */
    b->desc.size = size;
    return true;

bad:
    qbm_descriptor_clear(&b->desc);
    error_setg(errp, "%s (the image's data is intact; to drop its bitmaps, "
               "remove that object: rados -p POOL rm %s)",
               error_get_pretty(err), b->desc_oid);
    error_free(err);
    return false;
empty:
    b->desc.size = size;
    if (!(b->desc.data_format = strdup("raw")) ||
        !(b->desc.data_file = strdup(bdrv_rbd_image_id(b->image)))) {
        error_setg(errp, "out of memory");
        return false;
    }
    return true;
}

bool rbd_bitmaps_attach(BlockDriverState *owner, bool rw, Error **errp)
{
    BlockDriverState *img = rbd_image_node(owner);
    if (!img || *bdrv_rbd_bitmaps_slot(img)) {
        return true;
    }
    const char *id = bdrv_rbd_image_id(img);
    /* The driver's length: when owner is img itself, its open has not
     * returned, so block.c has not cached bs->size yet. */
    int64_t len = bdrv_refresh_length(img);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "cannot get the size of '%s'",
                         img->filename);
        return false;
    }
    RbdBitmaps *b = calloc(1, sizeof(*b));
    if (!b || !(b->desc_oid = strprintf("bitback_qbm.%s", id)) ||
        !(b->wil_oid = strprintf("bitback_wil.%s", id)) ||
        !(b->bitmap_prefix = strprintf("bitback_bitmap.%s.", id))) {
        error_setg(errp, "out of memory");
        rbd_bitmaps_free(b);
        return false;
    }
    b->owner = owner;
    b->image = img;
    b->io = bdrv_rbd_ioctx(img);
    b->rw = rw;
    if (!rbd_read_descriptor(b, (uint64_t)len, errp)) {
        rbd_bitmaps_free(b);
        return false;
    }
    *bdrv_rbd_bitmaps_slot(img) = b;
    /* bdrv_create_dirty_bitmap sizes bitmaps by the node's length, which
     * block.c caches only after open returns. */
    owner->size = (uint64_t)len;
    if (!qbm_entries_load(owner, &b->desc, rbd_entry_open, b, errp) ||
        (rw && !qbm_entries_mark_dirty(&b->desc, rbd_entry_open, b, errp))) {
        bdrv_release_all_dirty_bitmaps(owner);
        rbd_bitmaps_detach(owner);
        return false;
    }
    return true;
}

bool rbd_bitmaps_can_store(BlockDriverState *bs)
{
    return rbd_bitmaps_of(bs) != NULL;
}

/* The largest object the OSDs take (osd_max_object_size, as the client's
 * configuration gives it). */
static uint64_t rbd_max_object_size(RbdBitmaps *b)
{
    char buf[32];
    rados_t cluster = rados_ioctx_get_cluster(b->io);
    if (rados_conf_get(cluster, "osd_max_object_size", buf, sizeof(buf)) == 0) {
        char *end;
        unsigned long long v = strtoull(buf, &end, 10);
        if (end != buf && *end == '\0' && v > 0) {
            return v;
        }
    }
    return RBD_BITMAPS_DEFAULT_MAX_OBJECT;
}

bool rbd_bitmaps_add(BlockDriverState *bs, BdrvDirtyBitmap *bm, Error **errp)
{
    RbdBitmaps *b = rbd_bitmaps_of(bs);
    if (!b) {
        error_setg(errp, "cannot add persistent bitmap '%s': the RBD image's "
                   "bitmaps belong to another node", bm->name);
        return false;
    }
    if (!b->rw) {
        error_setg(errp, "cannot add bitmap '%s': image is read-only", bm->name);
        return false;
    }
    if (qbm_entry_find(&b->desc, bm->name, NULL)) {
        error_setg(errp, "bitmap '%s' already exists in '%s'", bm->name,
                   b->desc_oid);
        return false;
    }
    if (b->desc.nb_bitmaps >= QBM_MAX_BITMAPS) {
        error_setg(errp, "cannot add bitmap '%s': the image already has %d "
                   "bitmaps", bm->name, QBM_MAX_BITMAPS);
        return false;
    }
    unsigned shift = (unsigned)qbm_granularity_shift(bm->granularity);
    if (!qbm_bitmap_check_size(b->desc.size, shift, rbd_max_object_size(b),
                               errp)) {
        error_prepend(errp, "cannot add bitmap '%s' (one RADOS object, at "
                      "most osd_max_object_size): ", bm->name);
        return false;
    }
    /* A fresh object name: never one the descriptor or a leftover uses. */
    _cleanup_free_ char *oid = NULL;
    for (unsigned i = 0; i < 2 * QBM_MAX_BITMAPS && !oid; i++) {
        uint64_t osize;
        if (!(oid = strprintf("%s%u", b->bitmap_prefix, i))) {
            error_setg(errp, "out of memory");
            return false;
        }
        bool used = false;
        for (size_t k = 0; k < b->desc.nb_bitmaps && !used; k++) {
            used = strcmp(b->desc.bitmaps[k].file, oid) == 0;
        }
        if (used || rados_obj_stat(b->io, oid, &osize) != -ENOENT) {
            free(oid);
            oid = NULL;
        }
    }
    if (!oid) {
        error_setg(errp, "cannot find a free object name for bitmap '%s'",
                   bm->name);
        return false;
    }
    QbmHeader hdr;
    _cleanup_wil_store_ WilStore *st = wil_store_rados_object(b->io, oid);
    if (!st) {
        error_setg(errp, "out of memory");
        return false;
    }
    /* R-B2 (Q4): the object exists, all bits clear, before it is
     * published; not CLEAN, as the node is open for writing. */
    if (qbm_bitmap_store_init(st, oid, b->desc.size, shift, bm->generation, 0,
                              &hdr, errp) < 0) {
        error_prepend(errp, "cannot add bitmap '%s': ", bm->name);
        (void)rados_obj_remove(b->io, oid);
        return false;
    }
    QbmBitmapEntry *e = qbm_entry_append(&b->desc, bm, oid, &hdr);
    if (!e) {
        error_setg(errp, "out of memory");
        (void)rados_obj_remove(b->io, oid);
        return false;
    }
    if (!rbd_write_descriptor(b, errp)) {
        b->desc.nb_bitmaps--;
        qbm_bitmap_entry_clear(e);
        (void)rados_obj_remove(b->io, oid);
        return false;
    }
    return true;
}

bool rbd_bitmaps_remove(BlockDriverState *bs, const char *name, Error **errp)
{
    RbdBitmaps *b = rbd_bitmaps_of(bs);
    size_t idx;
    if (!b || !qbm_entry_find(&b->desc, name, &idx)) {
        return true;     /* not in the image (never stored) */
    }
    if (!b->rw) {
        error_setg(errp, "cannot remove bitmap '%s': image is read-only", name);
        return false;
    }
    QbmBitmapEntry saved;
    qbm_entry_take(&b->desc, idx, &saved);
    /* R-B2 (Q4): unpublish first, then delete. */
    if (!rbd_write_descriptor(b, errp)) {
        qbm_entry_put_back(&b->desc, idx, &saved);
        return false;
    }
    (void)rados_obj_remove(b->io, saved.file);
    qbm_bitmap_entry_clear(&saved);
    return true;
}

bool rbd_bitmaps_store(BlockDriverState *bs, Error **errp)
{
    RbdBitmaps *b = rbd_bitmaps_of(bs);
    bool desc_changed;
    if (!b || !b->rw) {
        return true;
    }
    if (!qbm_entries_store(bs, &b->desc, rbd_entry_open, b, &desc_changed,
                           errp)) {
        return false;
    }
    return !desc_changed || rbd_write_descriptor(b, errp);
}

bool rbd_bitmaps_open_intent_store(BlockDriverState *bs, bool create,
                                   WilStore **ret, Error **errp)
{
    RbdBitmaps *b = rbd_bitmaps_of(bs);
    *ret = NULL;
    if (!b) {
        if (create) {
            error_setg(errp, "node '%s' keeps no persistent bitmaps",
                       bs->node_name);
            return false;
        }
        return true;
    }
    /* R-B5: a holder of the log's lock other than us is stale when we hold
     * the image's exclusive lock, which a writer of the log needs. */
    if (create && bdrv_rbd_holds_lock(b->image)) {
        int r = rados_obj_break_locks(b->io, b->wil_oid, WIL_RADOS_LOCK_NAME);
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot break the stale lock of the "
                             "write-intent log '%s'", b->wil_oid);
            return false;
        }
    }
    return wil_store_rados_open(b->io, b->wil_oid, create, ret, errp);
}

void rbd_bitmaps_info(BlockDriverState *bs, struct json_object *data)
{
    RbdBitmaps *b = rbd_bitmaps_of(bs);
    if (!b) {
        return;
    }
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "descriptor", json_object_new_string(b->desc_oid));
    json_object_object_add(o, "write-intent-log",
                           json_object_new_string(b->wil_oid));
    struct json_object *arr = json_object_new_array();
    for (size_t i = 0; i < b->desc.nb_bitmaps; i++) {
        struct json_object *e = json_object_new_object();
        json_object_object_add(e, "name",
                               json_object_new_string(b->desc.bitmaps[i].name));
        json_object_object_add(e, "object",
                               json_object_new_string(b->desc.bitmaps[i].file));
        json_object_array_add(arr, e);
    }
    json_object_object_add(o, "bitmaps", arr);
    json_object_object_add(data, "bitmap-objects", o);
}
