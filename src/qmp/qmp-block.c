/*
 * QMP block commands (qapi/block-core.json): blockdev-add, blockdev-del,
 * query-named-block-nodes, query-block and the block-dirty-bitmap-* family
 * with x-debug-block-dirty-bitmap-sha256.
 *
 * Argument names, reply shapes and error messages follow QEMU so that a
 * qemu-storage-daemon script runs unchanged.  Handlers run on the main
 * thread, which is also the only thread that changes the node graph or a
 * node's bitmap list and flags; other threads only set bits.  So, as
 * block.h's rules for bs->lock allow, the bitmap lists and flags are read
 * here without bs->lock, and the per-bitmap functions that read or change
 * bits (count, sha256, clear, ...) take it themselves.
 *
 * The checks of add, remove and merge are helpers (qmp-internal.h) that
 * `transaction` (qmp-transaction.c) shares, so a bitmap action fails with
 * the same message whether it runs alone or in a transaction.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "block/drivers/blkdebug.h"
#include "block/write-intent.h"
#include "nbd/server.h"
#include "qmp/qmp-internal.h"
#include "util/cleanup.h"

/* Largest number of source bitmaps one merge accepts. */
#define QMP_MERGE_MAX_SOURCES 1024

BlockDriverState *qmp_lookup_node(const char *name, Error **errp)
{
    BlockDriverState *bs = bdrv_find_node(name);
    if (!bs) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'",
                   name, name);
    }
    return bs;
}

BdrvDirtyBitmap *qmp_lookup_bitmap(const char *node, const char *name,
                                   BlockDriverState **ret_bs, Error **errp)
{
    BlockDriverState *bs = qmp_lookup_node(node, errp);
    if (!bs) {
        return NULL;
    }
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, name);
    if (!bm) {
        error_setg(errp, "Dirty bitmap '%s' not found", name);
        return NULL;
    }
    if (ret_bs) {
        *ret_bs = bs;
    }
    return bm;
}

/* ---- queries ---- */

static struct json_object *qmp_bitmap_info(BdrvDirtyBitmap *bm)
{
    struct json_object *o = json_object_new_object();
    bool recording = !bm->disabled ||
                     (bm->successor && !bm->successor->disabled);
    json_object_object_add(o, "name", json_object_new_string(bm->name));
    json_object_object_add(o, "recording", json_object_new_boolean(recording));
    json_object_object_add(o, "persistent",
                           json_object_new_boolean(bm->persistent));
    json_object_object_add(o, "busy",
                           json_object_new_boolean(bm->busy || bm->successor));
    json_object_object_add(o, "granularity",
                           json_object_new_int64(bm->granularity));
    json_object_object_add(o, "count",
                           json_object_new_int64(bdrv_dirty_bitmap_count(bm)));
    json_object_object_add(o, "inconsistent",
                           json_object_new_boolean(bm->inconsistent));
    /* bitback extensions: the UUID that changes on every clear (backup
     * chains compare it), present only when known (not ""); and, from
     * docs/specs/write-intent.md, whether the bitmap was rebuilt from the
     * write-intent log after a crash, and what that added. */
    BdrvDirtyBitmapHistory h;
    bdrv_dirty_bitmap_history(bm, &h);
    json_object_object_add(o, "recovered", json_object_new_boolean(h.recovered));
    if (h.recovered) {
        json_object_object_add(o, "recovered-bytes",
                               json_object_new_int64((int64_t)h.recovered_bytes));
    }
    if (h.generation[0]) {
        json_object_object_add(o, "generation",
                               json_object_new_string(h.generation));
    } else if (h.prior_generation[0]) {
        /* Unknown now, but bitback knew it before another program wrote
         * the image (qcow2-bitmap.c G6). */
        json_object_object_add(o, "prior-generation",
                               json_object_new_string(h.prior_generation));
    }
    return o;
}

static struct json_object *qmp_node_bitmaps(BlockDriverState *bs)
{
    struct json_object *arr = json_object_new_array();
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        json_object_array_add(arr, qmp_bitmap_info(bm));
    }
    return arr;
}

static const char *qmp_node_filename(BlockDriverState *bs)
{
    if (bs->filename) {
        return bs->filename;
    }
    if (bs->file && bs->file->filename) {
        return bs->file->filename;
    }
    return "";
}

/* QEMU's SnapshotInfo of si (no VM state, no VM clock). */
static struct json_object *qmp_snapshot_info(const BdrvSnapshotInfo *si)
{
    struct json_object *r = json_object_new_object();
    json_object_object_add(r, "id", json_object_new_string(si->id));
    json_object_object_add(r, "name", json_object_new_string(si->name));
    json_object_object_add(r, "vm-state-size", json_object_new_int64(0));
    json_object_object_add(r, "date-sec", json_object_new_int64(si->date_sec));
    json_object_object_add(r, "date-nsec", json_object_new_int64(si->date_nsec));
    json_object_object_add(r, "vm-clock-sec", json_object_new_int64(0));
    json_object_object_add(r, "vm-clock-nsec", json_object_new_int64(0));
    return r;
}

/* BlockDeviceInfo (as query-named-block-nodes and query-block show it). */
static struct json_object *qmp_node_info(BlockDriverState *bs)
{
    struct json_object *o = json_object_new_object();
    struct json_object *img = json_object_new_object();
    struct json_object *cache = json_object_new_object();
    const char *filename = qmp_node_filename(bs);
    int64_t len = bdrv_getlength(bs);
    int depth = 0;
    struct stat st;

    for (BlockDriverState *b = bs->backing; b; b = b->backing) {
        depth++;
    }
    json_object_object_add(o, "file", json_object_new_string(filename));
    json_object_object_add(o, "node-name", json_object_new_string(bs->node_name));
    json_object_object_add(o, "ro", json_object_new_boolean(bs->read_only));
    json_object_object_add(o, "drv",
                           json_object_new_string(bs->drv->format_name));
    if (bs->backing) {
        json_object_object_add(o, "backing_file", json_object_new_string(
                                   qmp_node_filename(bs->backing)));
    }
    json_object_object_add(o, "backing_file_depth", json_object_new_int(depth));
    json_object_object_add(o, "encrypted", json_object_new_boolean(false));
    json_object_object_add(o, "detect_zeroes", json_object_new_string("off"));
    static const char *const zero_fields[] = {
        "bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr",
    };
    for (size_t i = 0; i < ARRAY_SIZE(zero_fields); i++) {
        json_object_object_add(o, zero_fields[i], json_object_new_int(0));
    }
    json_object_object_add(img, "filename", json_object_new_string(filename));
    json_object_object_add(img, "format",
                           json_object_new_string(bs->drv->format_name));
    json_object_object_add(img, "virtual-size",
                           json_object_new_int64(len < 0 ? 0 : len));
    if (*filename && stat(filename, &st) == 0 && S_ISREG(st.st_mode)) {
        json_object_object_add(img, "actual-size",
                               json_object_new_int64((int64_t)st.st_blocks * 512));
    }
    if (bs->backing) {
        json_object_object_add(img, "backing-filename", json_object_new_string(
                                   qmp_node_filename(bs->backing)));
    }
    json_object_object_add(img, "dirty-flag", json_object_new_boolean(false));
    /* QEMU's ImageInfo: the format's cluster size and its own fields. */
    uint64_t cluster = bdrv_get_cluster_size(bs);
    if (cluster) {
        json_object_object_add(img, "cluster-size",
                               json_object_new_int64((int64_t)cluster));
    }
    if (bs->drv->info) {
        struct json_object *data = json_object_new_object();
        bs->drv->info(bs, data);
        struct json_object *fs = json_object_new_object();
        json_object_object_add(fs, "type",
                               json_object_new_string(bs->drv->format_name));
        json_object_object_add(fs, "data", data);
        json_object_object_add(img, "format-specific", fs);
    }
    BdrvSnapshotInfo *snaps = NULL;
    int nsnaps = bdrv_snapshot_list(bs, &snaps);
    if (nsnaps > 0) {
        struct json_object *arr = json_object_new_array();
        for (int i = 0; i < nsnaps; i++) {
            json_object_array_add(arr, qmp_snapshot_info(&snaps[i]));
        }
        json_object_object_add(img, "snapshots", arr);
    }
    free(snaps);
    json_object_object_add(o, "image", img);
    json_object_object_add(cache, "writeback", json_object_new_boolean(true));
    json_object_object_add(cache, "direct", json_object_new_boolean(
                               (bs->open_flags & BDRV_O_NOCACHE) != 0));
    json_object_object_add(cache, "no-flush", json_object_new_boolean(false));
    json_object_object_add(o, "cache", cache);
    json_object_object_add(o, "write_threshold", json_object_new_int(0));
    json_object_object_add(o, "dirty-bitmaps", qmp_node_bitmaps(bs));
    json_object_object_add(o, "persistent-bitmaps", json_object_new_boolean(
                               bdrv_can_store_persistent_bitmaps(bs)));
    WriteIntentStats ws;
    if (write_intent_stats(bs, &ws)) {
        struct json_object *cs = json_object_new_object();
        const struct { const char *key; uint64_t v; } f[] = {
            { "region-size", ws.region_size },
            { "marked-regions", ws.marked_regions },
            { "intent-syncs", ws.intent_syncs },
            { "writer-waits", ws.writer_waits },
            { "writer-wait-ns", ws.writer_wait_ns },
            { "snapshots", ws.snapshots },
        };
        for (size_t i = 0; i < ARRAY_SIZE(f); i++) {
            json_object_object_add(cs, f[i].key, json_object_new_int64((int64_t)f[i].v));
        }
        json_object_object_add(o, "crash-safe", cs);
    }
    return o;
}

/* True when another node has bs as its file or backing child.  (Children a
 * driver keeps privately, like QBM's data image, are not user_owned.) */
static bool qmp_node_has_parent(BlockDriverState *bs)
{
    for (BlockDriverState *n = bdrv_next_node(NULL); n; n = bdrv_next_node(n)) {
        if (n != bs && (n->file == bs || n->backing == bs)) {
            return true;
        }
    }
    return false;
}

/* A backup job's source carries its copy-before-write hook (a
 * before_write hook); its target does not.  Hooks change only on the main
 * thread, where this runs. */
static bool qmp_node_is_job_source(BlockDriverState *bs)
{
    for (BdrvIoHook *h = bs->hooks; h; h = h->next) {
        if (h->before_write) {
            return true;
        }
    }
    return false;
}

static struct json_object *qmp_cmd_query_named_block_nodes(
    struct json_object *args, Error **errp)
{
    struct json_object *arr = json_object_new_array();
    for (BlockDriverState *bs = bdrv_next_node(NULL); bs;
         bs = bdrv_next_node(bs)) {
        json_object_array_add(arr, qmp_node_info(bs));
    }
    return arr;
}

static struct json_object *qmp_cmd_query_block(struct json_object *args,
                                               Error **errp)
{
    struct json_object *arr = json_object_new_array();
    for (BlockDriverState *bs = bdrv_next_node(NULL); bs;
         bs = bdrv_next_node(bs)) {
        if (!bs->user_owned || qmp_node_has_parent(bs)) {
            continue;           /* children are shown inside their parent */
        }
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "device", json_object_new_string(""));
        json_object_object_add(o, "type", json_object_new_string("unknown"));
        json_object_object_add(o, "removable", json_object_new_boolean(false));
        json_object_object_add(o, "locked", json_object_new_boolean(false));
        json_object_object_add(o, "inserted", qmp_node_info(bs));
        json_object_array_add(arr, o);
    }
    return arr;
}

/* ---- graph changes ---- */

static struct json_object *qmp_cmd_blockdev_add(struct json_object *args,
                                                Error **errp)
{
    struct json_object *v;
    int flags = BDRV_O_RDWR;

    if (!json_object_object_get_ex(args, "driver", &v)) {
        error_setg(errp, "Parameter 'driver' is missing");
        return NULL;
    }
    if (!json_object_is_type(v, json_type_string)) {
        error_setg(errp, "Invalid parameter type for 'driver', expected: string");
        return NULL;
    }
    if (!json_object_object_get_ex(args, "node-name", &v)) {
        error_setg(errp, "'node-name' must be specified for the root node");
        return NULL;
    }
    if (!json_object_is_type(v, json_type_string)) {
        error_setg(errp,
                   "Invalid parameter type for 'node-name', expected: string");
        return NULL;
    }
    if (!bdrv_check_options(args, errp)) {
        return NULL;
    }
    const char *node_name = json_object_get_string(v);
    if (bdrv_find_node(node_name)) {
        error_setg(errp, "Duplicate nodes with node-name='%s'", node_name);
        return NULL;
    }
    if (json_object_object_get_ex(args, "read-only", &v)) {
        if (!json_object_is_type(v, json_type_boolean)) {
            error_setg(errp,
                       "Invalid parameter type for 'read-only', expected: boolean");
            return NULL;
        }
        if (json_object_get_boolean(v)) {
            flags &= ~BDRV_O_RDWR;
        }
    }
    struct json_object *cache, *direct;
    if (json_object_object_get_ex(args, "cache", &cache) &&
        json_object_is_type(cache, json_type_object) &&
        json_object_object_get_ex(cache, "direct", &direct) &&
        json_object_is_type(direct, json_type_boolean) &&
        json_object_get_boolean(direct)) {
        flags |= BDRV_O_NOCACHE;
    }
    if (!bdrv_open_options(args, flags, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_blockdev_del(struct json_object *args,
                                                Error **errp)
{
    const char *name = json_opt_str(args, "node-name");
    BlockDriverState *bs = bdrv_find_node(name);

    if (!bs) {
        error_setg(errp, "Failed to find node with node-name='%s'", name);
        return NULL;
    }
    /* QEMU's order: an export (a BlockBackend) first, then the job's op
     * blocker (on a job's target; QEMU's source sits under the job's
     * copy-before-write filter and only counts as referenced), then
     * ownership, then other references. */
    if (nbd_node_is_exported(bs)) {
        error_setg(errp, "Node %s is in use", name);
        return NULL;
    }
    if (bs->job_blocker && !qmp_node_is_job_source(bs)) {
        Job *job = job_find(bs->job_blocker);
        error_setg(errp, "Node '%s' is busy: block device is in use by block "
                   "job: %s", name, job ? job->driver->type : "backup");
        return NULL;
    }
    if (!bs->user_owned) {
        error_setg(errp, "Node %s is not owned by the monitor", name);
        return NULL;
    }
    if (bs->job_blocker || bs->refcnt > 1 || qmp_node_has_parent(bs)) {
        error_setg(errp, "Block device %s is in use", name);
        return NULL;
    }
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        if (bm->busy || bm->successor) {
            error_setg(errp, "Node %s is in use (bitmap '%s' is busy)",
                       name, bm->name);
            return NULL;
        }
    }
    if (!bdrv_close(bs, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

/* ---- dirty bitmaps ---- */

static bool since_snapshot_set(void *opaque, uint64_t offset, uint64_t len)
{
    HBitmap *bits = opaque;
    uint64_t size = hbitmap_size(bits);
    if (offset < size) {
        hbitmap_set(bits, offset, MIN(len, size - offset));
    }
    return true;
}

/* x-changed-since-snapshot (bitback's): the new bitmap bm gets every
 * cluster that differs between the node's internal snapshot snap and now,
 * from the driver's own diff (rbd: fast-diff), so an incremental backup
 * can follow that snapshot without a bitmap that covered the time since.
 * Called with no write in flight. */
static bool bitmap_fill_since_snapshot(BdrvDirtyBitmap *bm, const char *snap,
                                       Error **errp)
{
    HBitmap *bits = hbitmap_new(bdrv_dirty_bitmap_size(bm),
                                (unsigned)__builtin_ctz(bm->granularity));
    if (!bits) {
        error_setg(errp, "out of memory");
        return false;
    }
    bool ok = bdrv_snapshot_changed(bm->bs, snap, since_snapshot_set, bits,
                                    errp);
    if (ok) {
        bdrv_dirty_bitmap_merge_bits(bm, bits);
    }
    hbitmap_free(bits);
    return ok;
}

BdrvDirtyBitmap *qmp_bitmap_add(struct json_object *args, Error **errp)
{
    const char *name = json_opt_str(args, "name");
    BlockDriverState *bs = qmp_lookup_node(json_opt_str(args, "node"), errp);
    uint32_t granularity;

    if (!bs) {
        return NULL;
    }
    if (!*name) {
        error_setg(errp, "Bitmap name cannot be empty");
        return NULL;
    }
    if (qmp_arg_has(args, "granularity")) {
        int64_t g = json_opt_int(args, "granularity", 0);
        if (g < 512 || g > (INT64_C(1) << 31) || !IS_POW2((uint64_t)g)) {
            error_setg(errp, "Granularity must be power of 2 and at least 512");
            return NULL;
        }
        granularity = (uint32_t)g;
    } else {
        granularity = bdrv_default_bitmap_granularity(bs);
    }
    if (bdrv_find_dirty_bitmap(bs, name)) {
        error_setg(errp, "Bitmap already exists: %s", name);
        return NULL;
    }
    BdrvDirtyBitmap *bm = bdrv_dirty_bitmap_add(bs, name, granularity,
                              json_opt_bool(args, "persistent", false),
                              json_opt_bool(args, "disabled", false), errp);
    const char *snap = json_opt_str(args, "x-changed-since-snapshot");
    if (bm && snap && !bitmap_fill_since_snapshot(bm, snap, errp)) {
        bdrv_dirty_bitmap_remove(bs, name, NULL);
        return NULL;
    }
    return bm;
}

static struct json_object *qmp_cmd_bitmap_add(struct json_object *args,
                                              Error **errp)
{
    /* x-changed-since-snapshot: the diff and the new bitmap must meet at
     * one point, with no write in flight (a transaction is drained). */
    bool drain = qmp_arg_has(args, "x-changed-since-snapshot");
    if (drain) {
        bdrv_drain_all_begin();
    }
    BdrvDirtyBitmap *bm = qmp_bitmap_add(args, errp);
    if (drain) {
        bdrv_drain_all_end();
    }
    return bm ? json_object_new_object() : NULL;
}

/* ---- internal snapshots (QEMU's blockdev-snapshot-internal-sync) ---- */

bool qmp_snapshot_internal(struct json_object *args, BlockDriverState **ret_bs,
                           Error **errp)
{
    BlockDriverState *bs = qmp_lookup_node(json_opt_str(args, "device"), errp);
    if (!bs || !bdrv_snapshot_create(bs, json_opt_str(args, "name"), errp)) {
        return false;
    }
    *ret_bs = bs;
    return true;
}

static struct json_object *qmp_cmd_snapshot_internal(struct json_object *args,
                                                     Error **errp)
{
    BlockDriverState *bs;
    bdrv_drain_all_begin();     /* the snapshot holds every completed write */
    bool ok = qmp_snapshot_internal(args, &bs, errp);
    bdrv_drain_all_end();
    return ok ? json_object_new_object() : NULL;
}

static struct json_object *qmp_cmd_snapshot_delete_internal(
    struct json_object *args, Error **errp)
{
    BlockDriverState *bs = qmp_lookup_node(json_opt_str(args, "device"), errp);
    const char *name = json_opt_str(args, "name");
    BdrvSnapshotInfo si;
    if (!bs) {
        return NULL;
    }
    if (!name) {
        error_setg(errp, "Parameter 'name' is missing (snapshots are deleted "
                   "by name)");
        return NULL;
    }
    bdrv_drain_all_begin();
    bool ok = bdrv_snapshot_delete(bs, name, &si, errp);
    bdrv_drain_all_end();
    if (!ok) {
        return NULL;
    }
    return qmp_snapshot_info(&si);
}

BdrvDirtyBitmap *qmp_bitmap_remove_check(struct json_object *args,
                                         BlockDriverState **ret_bs,
                                         Error **errp)
{
    BlockDriverState *bs;
    BdrvDirtyBitmap *bm = qmp_lookup_bitmap(json_opt_str(args, "node"),
                                            json_opt_str(args, "name"), &bs,
                                            errp);
    if (!bm || !bdrv_dirty_bitmap_check(bm, BDRV_BITMAP_BUSY, errp)) {
        return NULL;
    }
    if (bm->persistent && bs->read_only) {
        error_setg(errp, "Cannot remove persistent bitmap '%s': node '%s' is "
                   "read-only", bm->name, bs->node_name);
        return NULL;
    }
    *ret_bs = bs;
    return bm;
}

static struct json_object *qmp_cmd_bitmap_remove(struct json_object *args,
                                                 Error **errp)
{
    BlockDriverState *bs;
    BdrvDirtyBitmap *bm = qmp_bitmap_remove_check(args, &bs, errp);
    if (!bm || !bdrv_dirty_bitmap_remove(bs, bm->name, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_bitmap_clear(struct json_object *args,
                                                Error **errp)
{
    BdrvDirtyBitmap *bm = qmp_lookup_bitmap(json_opt_str(args, "node"),
                                            json_opt_str(args, "name"), NULL,
                                            errp);
    if (!bm || !bdrv_clear_dirty_bitmap(bm, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_bitmap_enable(struct json_object *args,
                                                 Error **errp)
{
    BdrvDirtyBitmap *bm = qmp_lookup_bitmap(json_opt_str(args, "node"),
                                            json_opt_str(args, "name"), NULL,
                                            errp);
    if (!bm || !bdrv_enable_dirty_bitmap(bm, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_bitmap_disable(struct json_object *args,
                                                  Error **errp)
{
    BdrvDirtyBitmap *bm = qmp_lookup_bitmap(json_opt_str(args, "node"),
                                            json_opt_str(args, "name"), NULL,
                                            errp);
    if (!bm || !bdrv_disable_dirty_bitmap(bm, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

BdrvDirtyBitmap *qmp_bitmap_merge_lookup(struct json_object *args,
                                         BdrvDirtyBitmap ***ret_srcs,
                                         size_t *ret_n, Error **errp)
{
    const char *node = json_opt_str(args, "node");
    BdrvDirtyBitmap *target = qmp_lookup_bitmap(node, json_opt_str(args, "target"),
                                                NULL, errp);
    struct json_object *list;

    if (!target) {
        return NULL;
    }
    json_object_object_get_ex(args, "bitmaps", &list);
    size_t n = json_object_array_length(list);
    _cleanup_free_ BdrvDirtyBitmap **srcs = qmp_array_alloc(
        n, QMP_MERGE_MAX_SOURCES, sizeof(*srcs), "bitmaps to merge", errp);
    if (!srcs) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(list, i);
        const char *src_node = node, *src_name = NULL;
        if (json_object_is_type(e, json_type_string)) {
            src_name = json_object_get_string(e);
        } else if (json_object_is_type(e, json_type_object)) {
            struct json_object *jn, *jm;
            if (!json_object_object_get_ex(e, "node", &jn) ||
                !json_object_is_type(jn, json_type_string) ||
                !json_object_object_get_ex(e, "name", &jm) ||
                !json_object_is_type(jm, json_type_string)) {
                error_setg(errp, "Invalid parameter type for 'bitmaps[%zu]', "
                           "expected: {\"node\": string, \"name\": string}", i);
                return NULL;
            }
            src_node = json_object_get_string(jn);
            src_name = json_object_get_string(jm);
        } else {
            error_setg(errp, "Invalid parameter type for 'bitmaps[%zu]', "
                       "expected: string or object", i);
            return NULL;
        }
        srcs[i] = qmp_lookup_bitmap(src_node, src_name, NULL, errp);
        if (!srcs[i]) {
            return NULL;
        }
    }
    *ret_srcs = steal_pointer(&srcs);
    *ret_n = n;
    return target;
}

static struct json_object *qmp_cmd_bitmap_merge(struct json_object *args,
                                                Error **errp)
{
    _cleanup_free_ BdrvDirtyBitmap **srcs = NULL;
    size_t n = 0;
    BdrvDirtyBitmap *target = qmp_bitmap_merge_lookup(args, &srcs, &n, errp);

    if (!target || !bdrv_merge_dirty_bitmaps(target, srcs, (int)n, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_bitmap_sha256(struct json_object *args,
                                                 Error **errp)
{
    char hex[65];
    BdrvDirtyBitmap *bm = qmp_lookup_bitmap(json_opt_str(args, "node"),
                                            json_opt_str(args, "name"), NULL,
                                            errp);
    if (!bm) {
        return NULL;
    }
    bdrv_dirty_bitmap_sha256(bm, hex);
    struct json_object *ret = json_object_new_object();
    json_object_object_add(ret, "sha256", json_object_new_string(hex));
    return ret;
}

/* x-blkdebug-inject: the arguments but node-name are one inject-error
 * rule of the blkdebug node (blkdebug.h checks them). */
static struct json_object *qmp_cmd_blkdebug_inject(struct json_object *args,
                                                   Error **errp)
{
    BlockDriverState *bs = qmp_lookup_node(json_opt_str(args, "node-name"),
                                           errp);
    _cleanup_json_ struct json_object *rule = json_object_new_object();
    if (!bs || !rule) {
        if (bs) {
            error_setg(errp, "out of memory");
        }
        return NULL;
    }
    json_object_object_foreach(args, key, val) {
        if (strcmp(key, "node-name")) {
            json_object_object_add(rule, key, json_object_get(val));
        }
    }
    if (!blkdebug_inject(bs, rule, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_blkdebug_clear(struct json_object *args,
                                                  Error **errp)
{
    BlockDriverState *bs = qmp_lookup_node(json_opt_str(args, "node-name"),
                                           errp);
    if (!bs || !blkdebug_clear(bs, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static const QmpArgSpec spec_blockdev_del[] = {
    { "node-name", QMP_ARG_STR, false },
    { NULL },
};
static const QmpArgSpec spec_blkdebug_inject[] = {
    { "node-name", QMP_ARG_STR, false },
    { "event", QMP_ARG_STR, false },
    { "errno", QMP_ARG_UINT, true },
    { "once", QMP_ARG_BOOL, true },
    { "immediately", QMP_ARG_BOOL, true },
    { "after", QMP_ARG_UINT, true },
    { "sector", QMP_ARG_UINT, true },
    { NULL },
};
static const QmpArgSpec spec_query_named[] = {
    { "flat", QMP_ARG_BOOL, true },
    { NULL },
};
const QmpArgSpec qmp_spec_bitmap_add[] = {
    { "node", QMP_ARG_STR, false },
    { "name", QMP_ARG_STR, false },
    { "granularity", QMP_ARG_UINT, true },
    { "persistent", QMP_ARG_BOOL, true },
    { "disabled", QMP_ARG_BOOL, true },
    { "x-changed-since-snapshot", QMP_ARG_STR, true },
    { NULL },
};
const QmpArgSpec qmp_spec_snapshot_internal[] = {
    { "device", QMP_ARG_STR, false },
    { "name", QMP_ARG_STR, false },
    { NULL },
};
static const QmpArgSpec spec_snapshot_delete[] = {
    { "device", QMP_ARG_STR, false },
    { "id", QMP_ARG_STR, true },
    { "name", QMP_ARG_STR, true },
    { NULL },
};
const QmpArgSpec qmp_spec_bitmap[] = {
    { "node", QMP_ARG_STR, false },
    { "name", QMP_ARG_STR, false },
    { NULL },
};
const QmpArgSpec qmp_spec_bitmap_merge[] = {
    { "node", QMP_ARG_STR, false },
    { "target", QMP_ARG_STR, false },
    { "bitmaps", QMP_ARG_ARRAY, false },
    { NULL },
};

/* blockdev-add's arguments: a union on "driver" of every block driver,
 * with the block layer's members (bdrv_check_options checks them). */
static const QmpArgSpec *blockdev_add_variant(size_t i, const char **ret_name)
{
    const char *const *names = bdrv_format_names();
    for (size_t j = 0; j < i; j++) {
        if (!names[j]) {
            return NULL;
        }
    }
    if (!names[i]) {
        return NULL;
    }
    *ret_name = names[i];
    const BlockDriver *drv = bdrv_find_format(names[i]);
    return drv->open_opts ? drv->open_opts : qmp_spec_none;
}
static const QmpUnion union_blockdev_add = {
    .common = bdrv_common_opts,
    .tag = "driver",
    .variant = blockdev_add_variant,
};

void qmp_register_block_commands(void)
{
    qmp_register_command_spec("blockdev-add", qmp_cmd_blockdev_add, NULL);
    qmp_set_command_schema("blockdev-add", NULL, &union_blockdev_add);
    qmp_register_command_spec("blockdev-del", qmp_cmd_blockdev_del,
                              spec_blockdev_del);
    qmp_register_command_spec("query-named-block-nodes",
                              qmp_cmd_query_named_block_nodes, spec_query_named);
    qmp_register_command_spec("query-block", qmp_cmd_query_block,
                              qmp_spec_none);
    qmp_register_command_spec("block-dirty-bitmap-add", qmp_cmd_bitmap_add,
                              qmp_spec_bitmap_add);
    qmp_register_command_spec("blockdev-snapshot-internal-sync",
                              qmp_cmd_snapshot_internal,
                              qmp_spec_snapshot_internal);
    qmp_register_command_spec("blockdev-snapshot-delete-internal-sync",
                              qmp_cmd_snapshot_delete_internal,
                              spec_snapshot_delete);
    qmp_register_command_spec("block-dirty-bitmap-remove",
                              qmp_cmd_bitmap_remove, qmp_spec_bitmap);
    qmp_register_command_spec("block-dirty-bitmap-clear", qmp_cmd_bitmap_clear,
                              qmp_spec_bitmap);
    qmp_register_command_spec("block-dirty-bitmap-enable",
                              qmp_cmd_bitmap_enable, qmp_spec_bitmap);
    qmp_register_command_spec("block-dirty-bitmap-disable",
                              qmp_cmd_bitmap_disable, qmp_spec_bitmap);
    qmp_register_command_spec("block-dirty-bitmap-merge", qmp_cmd_bitmap_merge,
                              qmp_spec_bitmap_merge);
    qmp_register_command_spec("x-debug-block-dirty-bitmap-sha256",
                              qmp_cmd_bitmap_sha256, qmp_spec_bitmap);
    qmp_register_command_spec("x-blkdebug-inject", qmp_cmd_blkdebug_inject,
                              spec_blkdebug_inject);
    qmp_register_command_spec("x-blkdebug-clear", qmp_cmd_blkdebug_clear,
                              spec_blockdev_del);
}
