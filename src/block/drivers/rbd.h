/*
 * What the rbd driver (rbd.c) exposes to the rest of the block layer: the
 * RADOS handles of an open rbd node, so that objects belonging to the
 * image (persistent bitmaps, the write-intent log) can be stored next to
 * it, in the image's pool and namespace.
 */
#ifndef BITBACK_BLOCK_DRIVERS_RBD_H
#define BITBACK_BLOCK_DRIVERS_RBD_H

#include <stdbool.h>
#include <rados/librados.h>

#include "block/block.h"

/* The I/O context (the image's pool and namespace) of the rbd node bs,
 * owned by the node and valid until it closes; NULL when bs is not an rbd
 * node. */
rados_ioctx_t bdrv_rbd_ioctx(BlockDriverState *bs);
/* The image's RBD id (rbd_get_id: stable across renames), owned by the
 * node; NULL when bs is not an rbd node. */
const char *bdrv_rbd_image_id(BlockDriverState *bs);

/* Does the rbd node bs hold its image's exclusive lock (rbd.c R1)? */
bool bdrv_rbd_holds_lock(BlockDriverState *bs);
/* Where the rbd node bs keeps the state of its image's persistent bitmaps
 * (rbd-bitmaps.c; NULL until they are loaded, freed at close); NULL when
 * bs is not an rbd node. */
struct RbdBitmaps **bdrv_rbd_bitmaps_slot(BlockDriverState *bs);

#endif
