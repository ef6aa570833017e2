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
#include <json-c/json.h>

#include "block/block.h"

/* What names an image (or, for a repository, a pool and namespace): the
 * options of one node or one rbd: filename.  Strings are malloc'd (NULL
 * when absent); conf_pairs holds the filename's other key=value pairs
 * (Ceph options), in order, as a JSON object of strings, or NULL. */
typedef struct RBDSpec {
    char *pool, *ns, *image, *snap, *conf, *user;
    struct json_object *conf_pairs;
} RBDSpec;

/* Free sp's members and zero it. */
void rbd_spec_clear(RBDSpec *sp);
/* The one parser of rbd: names, QEMU's form
 * "rbd:POOL/[NS/]IMAGE[@SNAP][:conf=PATH][:id=USER][:key=value...]": parts
 * split at unescaped '/', '@' and ':' ('\' escapes the next character).
 * image_required false also accepts "rbd:POOL[:key=value...]" and
 * "rbd:POOL/PART[:...]" (PART in sp->image: the caller decides what it
 * names).  Parts are not checked for emptiness here.  False with errp set
 * on a malformed name. */
bool rbd_spec_parse(const char *filename, bool image_required, RBDSpec *sp,
                    Error **errp);
/* Connect to the cluster sp names (its conf, user and Ceph options) and
 * open the I/O context of its pool and namespace, with a bounded mount
 * timeout.  The caller owns *ret_cluster and *ret_io and releases them
 * with rbd_spec_disconnect. */
bool rbd_spec_connect(const RBDSpec *sp, rados_t *ret_cluster,
                      rados_ioctx_t *ret_io, Error **errp);
/* Release what rbd_spec_connect gave (NULLs are fine). */
void rbd_spec_disconnect(rados_t cluster, rados_ioctx_t io);

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
