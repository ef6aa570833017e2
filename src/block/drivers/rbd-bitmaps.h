/*
 * Persistent, crash-safe dirty bitmaps of an RBD image, kept as RADOS
 * objects next to the image (docs/specs/rbd-bitmaps.md, invariants
 * R-B1..): a QBM descriptor object, one QBM bitmap object per bitmap, and
 * the write-intent log object, all named by the image's id.
 *
 * The bitmaps belong to one node, their owner: the rbd node when the user
 * opened it directly, or the raw node directly over it (what an `rbd:`
 * name opens).  The functions below with a BlockDriver hook's signature
 * are the hooks of both drivers: on a node that does not own the image's
 * bitmaps they act as for a driver without persistent bitmaps.
 */
#ifndef BITBACK_BLOCK_DRIVERS_RBD_BITMAPS_H
#define BITBACK_BLOCK_DRIVERS_RBD_BITMAPS_H

#include <stdbool.h>
#include <json-c/json.h>

#include "block/block.h"
#include "block/wil-store.h"

typedef struct RbdBitmaps RbdBitmaps;

/* Make owner (an rbd node, or a node whose file child is one) the owner
 * of the image's bitmaps and load them onto it: a no-op (true) when there
 * is no rbd node there or its bitmaps already have an owner.  rw: the
 * owner is opened for writing: the objects are then marked in use (CLEAN
 * cleared) before this returns, so before any write (R-B3).  False with
 * errp set when the descriptor object is unreadable or invalid, or the
 * marking fails. */
bool rbd_bitmaps_attach(BlockDriverState *owner, bool rw, Error **errp);
/* Free what attach kept, when owner owns it (any node: a no-op else). */
void rbd_bitmaps_detach(BlockDriverState *owner);
/* Free the state kept in an rbd node's slot (its close). */
void rbd_bitmaps_free(RbdBitmaps *b);

/* BlockDriver hooks (block.h). */
bool rbd_bitmaps_can_store(BlockDriverState *bs);
bool rbd_bitmaps_add(BlockDriverState *bs, BdrvDirtyBitmap *bm, Error **errp);
bool rbd_bitmaps_remove(BlockDriverState *bs, const char *name, Error **errp);
/* Store every consistent bitmap and set CLEAN (block.c calls it when the
 * node closes: the objects stay CLEAN, so no write may follow). */
bool rbd_bitmaps_store(BlockDriverState *bs, Error **errp);
bool rbd_bitmaps_open_intent_store(BlockDriverState *bs, bool create,
                                   WilStore **ret, Error **errp);
/* Add "bitmap-objects" (descriptor, log and bitmap object names) to an
 * info object, when bs owns bitmaps. */
void rbd_bitmaps_info(BlockDriverState *bs, struct json_object *data);

#endif
