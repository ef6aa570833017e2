/*
 * block_resize (qapi/block-core.json): change a node's length, by its
 * `node-name` or `device` (bitbackd has no devices apart from its nodes,
 * so both name a node), to `size` bytes.  The block layer does the work
 * (bdrv_truncate: drained, bitmaps resized with the node); which drivers
 * can resize and what is refused is in docs/qmp.md ("block_resize").
 * As in QEMU, whose NBD exports do not share the resize permission, a
 * node that is exported (or whose file child is) is not resized.
 */
#include "nbd/server.h"
#include "qmp/qmp-internal.h"

static struct json_object *qmp_cmd_block_resize(struct json_object *args,
                                                Error **errp)
{
    const char *device = json_opt_str(args, "device");
    const char *node = json_opt_str(args, "node-name");
    int64_t size = json_opt_int(args, "size", 0);
    /* QEMU's bdrv_lookup_bs: device first, then node-name. */
    BlockDriverState *bs = device ? bdrv_find_node(device) : NULL;
    if (!bs && node) {
        bs = bdrv_find_node(node);
    }
    if (!bs) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'",
                   device ? device : "", node ? node : "");
        return NULL;
    }
    if (size < 0) {
        error_setg(errp, "Parameter 'size' expects a >0 size");
        return NULL;
    }
    for (BlockDriverState *n = bs; n; n = n->file) {
        if (nbd_node_is_exported(n)) {
            error_setg(errp, "Permission conflict on node '%s': permissions "
                       "'resize' are both required by block_resize and "
                       "unshared by an NBD export of node '%s'", bs->node_name,
                       n->node_name);
            return NULL;
        }
    }
    if (!bdrv_truncate(bs, (uint64_t)size, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static const QmpArgSpec spec_block_resize[] = {
    { "device", QMP_ARG_STR, true },
    { "node-name", QMP_ARG_STR, true },
    { "size", QMP_ARG_INT, false },
    { NULL },
};

void qmp_register_resize_commands(void)
{
    qmp_register_command_spec("block_resize", qmp_cmd_block_resize,
                              spec_block_resize);
}
