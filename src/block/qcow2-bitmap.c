/* placeholder: being written (qcow2 bitmaps extension) */
#include "block/qcow2.h"

bool qcow2_load_bitmaps(BlockDriverState *bs, Error **errp)
{
    return true;
}

bool qcow2_persistent_bitmap_add(BlockDriverState *bs, BdrvDirtyBitmap *bm,
                                 Error **errp)
{
    error_setg(errp, "qcow2: persistent bitmaps are not supported yet");
    return false;
}

bool qcow2_persistent_bitmap_remove(BlockDriverState *bs, const char *name,
                                    Error **errp)
{
    error_setg(errp, "qcow2: persistent bitmaps are not supported yet");
    return false;
}

bool qcow2_store_bitmaps(BlockDriverState *bs, Error **errp)
{
    return true;
}

void qcow2_bitmaps_info(BlockDriverState *bs, struct json_object *data)
{
}

void qcow2_bitmaps_free(BlockDriverState *bs)
{
}
