/*
 * QMP blockdev-backup and drive-backup (qapi/block-core.json).
 *
 * Both commands run as a transaction of one action (qmp-transaction.c
 * registers them), so the job is created inside a drained section and its
 * point in time is exact, as in QEMU.  This file holds the part the
 * transaction's backup actions share with the standalone commands, and
 * calls nothing of qmp-transaction.c: argument parsing, QEMU's
 * checks with QEMU's messages (do_backup_common), all made before anything
 * is created or opened (backup_validate), and for drive-backup the
 * target image: created unless mode=existing, opened as an auto-named node
 * that the job owns (the job's reference is the only one once the job
 * exists, so the node goes away when the job does).
 *
 * drive-backup's target (QEMU's drive_backup_prepare):
 *   - format defaults to the source's driver (probed with mode=existing);
 *   - sync=top on a source without backing becomes sync=full;
 *   - a created image gets a backing file when its format takes one: the
 *     source's backing image for sync=top, the source itself for sync=none;
 *   - for sync=none the target's backing is the live source node, so reads
 *     of what was not copied yet see the source (image fleecing);
 *   - an NBD URI is never created: it is opened as it is and must have the
 *     source's size.
 */
#include <limits.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>

#include "job/backup.h"
#include "qmp/qmp-internal.h"
#include "util/cleanup.h"

/* Enum values, in the order of the C enums they map to. */
static const char *const sync_names[] = {
    [MIRROR_SYNC_MODE_TOP] = "top",
    [MIRROR_SYNC_MODE_FULL] = "full",
    [MIRROR_SYNC_MODE_NONE] = "none",
    [MIRROR_SYNC_MODE_INCREMENTAL] = "incremental",
    [MIRROR_SYNC_MODE_BITMAP] = "bitmap",
    NULL,
};
static const char *const bitmap_mode_names[] = {
    [BITMAP_SYNC_MODE_ON_SUCCESS] = "on-success",
    [BITMAP_SYNC_MODE_NEVER] = "never",
    [BITMAP_SYNC_MODE_ALWAYS] = "always",
    NULL,
};
static const char *const on_error_names[] = {
    [BLOCKDEV_ON_ERROR_REPORT] = "report",
    [BLOCKDEV_ON_ERROR_IGNORE] = "ignore",
    [BLOCKDEV_ON_ERROR_ENOSPC] = "enospc",
    [BLOCKDEV_ON_ERROR_STOP] = "stop",
    [BLOCKDEV_ON_ERROR_AUTO] = "auto",
    NULL,
};
/* NewImageMode */
enum { NEW_IMAGE_MODE_EXISTING, NEW_IMAGE_MODE_ABSOLUTE_PATHS };
static const char *const image_mode_names[] = {
    "existing", "absolute-paths", NULL,
};

/* Common arguments, parsed and checked (backup_validate). */
typedef struct BackupArgs {
    MirrorSyncMode sync;
    bool has_bitmap_mode;
    BitmapSyncMode bitmap_mode;
    BlockdevOnError on_source_error;
    BlockdevOnError on_target_error;
    int image_mode;                 /* drive-backup only */
    BlockDriverState *bs;           /* the source (device) */
    BdrvDirtyBitmap *bm;            /* NULL: none */
    uint64_t speed;
    int compress_level;             /* x-compress-level, 0: default */
} BackupArgs;

/* Look up enum member `key` of args in names[]; absent: *ret = dflt and
 * *ret_given = false.  QEMU's message for an unknown value (which names
 * the bare member, also inside a transaction). */
static bool parse_enum(struct json_object *args, const char *key,
                       const char *const *names, int dflt, int *ret,
                       bool *ret_given, Error **errp)
{
    const char *v = json_opt_str(args, key);
    *ret = dflt;
    if (ret_given) {
        *ret_given = v != NULL;
    }
    if (!v) {
        return true;
    }
    for (int i = 0; names[i]; i++) {
        if (strcmp(names[i], v) == 0) {
            *ret = i;
            return true;
        }
    }
    error_setg(errp, "Parameter '%s' does not accept value '%s'", key, v);
    return false;
}

static bool parse_backup_args(struct json_object *args, bool drive,
                              BackupArgs *a, Error **errp)
{
    int v;
    if (!parse_enum(args, "sync", sync_names, MIRROR_SYNC_MODE_FULL,
                    &v, NULL, errp)) {
        return false;
    }
    a->sync = (MirrorSyncMode)v;
    if (!parse_enum(args, "bitmap-mode", bitmap_mode_names,
                    BITMAP_SYNC_MODE_ON_SUCCESS, &v,
                    &a->has_bitmap_mode, errp)) {
        return false;
    }
    a->bitmap_mode = (BitmapSyncMode)v;
    if (!parse_enum(args, "on-source-error", on_error_names,
                    BLOCKDEV_ON_ERROR_REPORT, &v, NULL, errp)) {
        return false;
    }
    a->on_source_error = (BlockdevOnError)v;
    if (!parse_enum(args, "on-target-error", on_error_names,
                    BLOCKDEV_ON_ERROR_REPORT, &v, NULL, errp)) {
        return false;
    }
    a->on_target_error = (BlockdevOnError)v;
    a->image_mode = NEW_IMAGE_MODE_ABSOLUTE_PATHS;
    if (drive && !parse_enum(args, "mode", image_mode_names,
                             NEW_IMAGE_MODE_ABSOLUTE_PATHS,
                             &a->image_mode, NULL, errp)) {
        return false;
    }
    return true;
}

bool qmp_backup_check_args(struct json_object *args, bool drive, Error **errp)
{
    BackupArgs a;
    return parse_backup_args(args, drive, &a, errp);
}

/* QEMU's do_backup_common checks on the bitmap and the sync mode; sets
 * a->bm.  May turn sync=incremental into bitmap + on-success. */
static bool check_bitmap_args(struct json_object *args, BackupArgs *a,
                              Error **errp)
{
    const char *bitmap_name = json_opt_str(args, "bitmap");

    if ((a->sync == MIRROR_SYNC_MODE_BITMAP ||
         a->sync == MIRROR_SYNC_MODE_INCREMENTAL) && !bitmap_name) {
        error_setg(errp, "must provide a valid bitmap name for '%s' sync mode",
                   sync_names[a->sync]);
        return false;
    }
    if (a->sync == MIRROR_SYNC_MODE_INCREMENTAL) {
        if (a->has_bitmap_mode &&
            a->bitmap_mode != BITMAP_SYNC_MODE_ON_SUCCESS) {
            error_setg(errp, "Bitmap sync mode must be '%s' when using sync "
                       "mode '%s'",
                       bitmap_mode_names[BITMAP_SYNC_MODE_ON_SUCCESS],
                       sync_names[a->sync]);
            return false;
        }
        /* incremental is bitmap with on-success */
        a->has_bitmap_mode = true;
        a->bitmap_mode = BITMAP_SYNC_MODE_ON_SUCCESS;
        a->sync = MIRROR_SYNC_MODE_BITMAP;
    }
    a->bm = NULL;
    if (!bitmap_name) {
        if (a->has_bitmap_mode) {
            error_setg(errp, "Cannot specify bitmap sync mode without a bitmap");
            return false;
        }
        return true;
    }
    a->bm = bdrv_find_dirty_bitmap(a->bs, bitmap_name);
    if (!a->bm) {
        error_setg(errp, "Bitmap '%s' could not be found", bitmap_name);
        return false;
    }
    if (!a->has_bitmap_mode) {
        error_setg(errp, "Bitmap sync mode must be given when providing a "
                   "bitmap");
        return false;
    }
    if (!bdrv_dirty_bitmap_check(a->bm, BDRV_BITMAP_DEFAULT |
                                 BDRV_BITMAP_ALLOW_RO, errp)) {
        return false;
    }
    if (a->sync == MIRROR_SYNC_MODE_NONE) {
        error_setg(errp, "sync mode '%s' does not produce meaningful "
                   "bitmap outputs", sync_names[a->sync]);
        return false;
    }
    if (a->bitmap_mode == BITMAP_SYNC_MODE_NEVER &&
        a->sync != MIRROR_SYNC_MODE_BITMAP) {
        error_setg(errp, "Bitmap sync mode '%s' has no meaningful effect "
                   "when combined with sync mode '%s'",
                   bitmap_mode_names[a->bitmap_mode], sync_names[a->sync]);
        return false;
    }
    return true;
}

/* drive-backup's target, before anything is created: the format exists
 * (and can create images unless mode=existing), and a new image would not
 * replace the image of an open node (creating truncates). */
static bool check_drive_target(struct json_object *args, BackupArgs *a,
                               Error **errp)
{
    const char *filename = json_opt_str(args, "target");
    const char *format = json_opt_str(args, "format");

    if (bdrv_filename_is_nbd_uri(filename)) {
        return true;    /* opened as it is, never created */
    }
    if (format && !bdrv_find_format(format)) {
        error_setg(errp, "Unknown file format '%s'", format);
        return false;
    }
    if (a->image_mode == NEW_IMAGE_MODE_EXISTING) {
        return true;    /* only opened: the open checks the rest */
    }
    const BlockDriver *drv = bdrv_find_format(format ? format
                                                     : a->bs->drv->format_name);
    if (!drv || !drv->create) {
        error_setg(errp, "Format driver '%s' does not support image creation",
                   format ? format : a->bs->drv->format_name);
        return false;
    }
    struct stat st;
    if (stat(filename, &st) < 0) {
        return true;    /* a new file */
    }
    for (BlockDriverState *n = bdrv_next_node(NULL); n; n = bdrv_next_node(n)) {
        struct stat nst;
        if (n->drv->is_protocol && n->filename && stat(n->filename, &nst) == 0 &&
            nst.st_dev == st.st_dev && nst.st_ino == st.st_ino) {
            error_setg(errp, "Cannot create '%s': it is the image of node '%s', "
                       "which is open", filename, n->node_name);
            return false;
        }
    }
    return true;
}

/* Every check a backup makes before it changes anything, for blockdev-backup
 * and drive-backup alike and for their transaction actions (the standalone
 * commands run as transactions of one action): the arguments (enum values,
 * speed, compress, job id), the source node, the bitmap and sync mode, and
 * for drive-backup the target file (check_drive_target).  What is left for
 * backup_job_create needs the target node (sizes, read-only, busy target).
 * drive-backup's sync=top on a source without backing becomes full here,
 * as QEMU does before its checks. */
static bool backup_validate(struct json_object *args, bool drive,
                            BackupArgs *a, Error **errp)
{
    if (!parse_backup_args(args, drive, a, errp)) {
        return false;
    }
    a->bs = qmp_lookup_node(json_opt_str(args, "device"), errp);
    if (!a->bs) {
        return false;
    }
    if (drive && a->sync == MIRROR_SYNC_MODE_TOP && !a->bs->backing) {
        a->sync = MIRROR_SYNC_MODE_FULL;
    }
    if (!check_bitmap_args(args, a, errp)) {
        return false;
    }
    int64_t speed = json_opt_int(args, "speed", 0);
    if (speed < 0) {
        error_setg(errp, "Parameter 'speed' expects a non-negative value");
        return false;
    }
    a->speed = (uint64_t)speed;
    int64_t level = json_opt_int(args, "x-compress-level", 0);
    if (level < 0 || level > BDRV_MAX_COMPRESS_LEVEL) {
        error_setg(errp, "Parameter 'x-compress-level' expects a value "
                   "between 1 and %d", BDRV_MAX_COMPRESS_LEVEL);
        return false;
    }
    a->compress_level = (int)level;
    if (drive && json_opt_bool(args, "compress", false) &&
        a->image_mode != NEW_IMAGE_MODE_EXISTING &&
        !bdrv_filename_is_nbd_uri(json_opt_str(args, "target"))) {
        /* Before the image is created; backup_job_create checks the
         * opened target in the other cases. */
        const char *format = json_opt_str(args, "format");
        const BlockDriver *drv = bdrv_find_format(format ? format
                                                         : a->bs->drv->format_name);
        if (drv && !drv->supports_compressed_writes) {
            error_setg(errp, "Compression is not supported for this drive %s",
                       json_opt_str(args, "target"));
            return false;
        }
    }
    if (!job_check_new_id(json_opt_str(args, "job-id"), a->bs->node_name, errp) ||
        !backup_check_not_busy(a->bs, errp)) {
        return false;
    }
    return !drive || check_drive_target(args, a, errp);
}

/* The job, from validated arguments (backup_validate). */
static Job *backup_common(struct json_object *args, BackupArgs *a,
                          BlockDriverState *target, JobTxn *txn, Error **errp)
{
    BackupOptions opts = {
        .sync = a->sync,
        .bitmap = a->bm,
        .bitmap_mode = a->bitmap_mode,
        .speed = a->speed,
        .on_source_error = a->on_source_error,
        .on_target_error = a->on_target_error,
        .auto_finalize = json_opt_bool(args, "auto-finalize", true),
        .auto_dismiss = json_opt_bool(args, "auto-dismiss", true),
        .compress = json_opt_bool(args, "compress", false),
        .compress_level = a->compress_level,
    };
    /* filter-node-name and x-perf are accepted and ignored: our
     * copy-before-write is a hook, not a node, and the copy engine tunes
     * itself. */
    return backup_job_create(json_opt_str(args, "job-id"), a->bs, target, &opts,
                             txn, errp);
}

/* The backing file name recorded in a new drive-backup target: absolute,
 * so the target may live in another folder than the source. */
static char *backing_file_name(BlockDriverState *backing)
{
    const char *name = backing->filename;
    if (!name || !*name || bdrv_filename_is_nbd_uri(name)) {
        return NULL;
    }
    char *abs = realpath(name, NULL);
    return abs ? abs : strdup(name);
}

/* drive-backup: create (unless existing) and open the target, from
 * validated arguments.  Returns a new reference. */
static BlockDriverState *drive_backup_target(struct json_object *args,
                                             BackupArgs *a, Error **errp)
{
    const char *filename = json_opt_str(args, "target");
    const char *format = json_opt_str(args, "format");
    BlockDriverState *bs = a->bs;
    BlockDriverState *target;

    if (bdrv_filename_is_nbd_uri(filename)) {
        /* A remote export: nothing to create, the server owns the image. */
        target = bdrv_open_image(filename, format, BDRV_O_RDWR, errp);
        if (target) {
            target->user_owned = false;
        }
        return target;
    }

    if (!format && a->image_mode != NEW_IMAGE_MODE_EXISTING) {
        format = bs->drv->format_name;
    }
    BlockDriverState *backing_src = NULL;
    int flags = BDRV_O_RDWR;
    if (a->sync == MIRROR_SYNC_MODE_TOP) {
        backing_src = bs->backing;
    }
    if (a->sync == MIRROR_SYNC_MODE_NONE) {
        backing_src = bs;
        flags |= BDRV_O_NO_BACKING;   /* the live source becomes its backing */
    }

    if (a->image_mode != NEW_IMAGE_MODE_EXISTING) {
        const BlockDriver *drv = bdrv_find_format(format);
        _cleanup_json_ struct json_object *opts = json_object_new_object();
        if (backing_src && drv && drv->supports_backing) {
            _cleanup_free_ char *bname = backing_file_name(backing_src);
            if (bname) {
                json_object_object_add(opts, "backing",
                                       json_object_new_string(bname));
                json_object_object_add(opts, "backing-format",
                                       json_object_new_string(
                                           backing_src->drv->format_name));
            }
        }
        int64_t size = bdrv_getlength(bs);
        if (size < 0) {
            error_setg_errno(errp, (int)-size, "Cannot get the length of '%s'",
                             bs->node_name);
            return NULL;
        }
        if (!bdrv_img_create(filename, format, (uint64_t)size, opts, errp)) {
            return NULL;
        }
    }

    target = bdrv_open_image(filename, format, flags, errp);
    if (!target) {
        return NULL;
    }
    target->user_owned = false;
    if (a->sync == MIRROR_SYNC_MODE_NONE && target->drv->supports_backing &&
        !target->backing && !bdrv_set_backing(target, bs, errp)) {
        bdrv_unref(target);
        return NULL;
    }
    return target;
}

Job *qmp_backup_prepare(struct json_object *args, bool drive, JobTxn *txn,
                        Error **errp)
{
    BackupArgs a;
    /* Nothing is created or opened before every argument is checked: a
     * rejected drive-backup leaves an existing target file untouched. */
    if (!backup_validate(args, drive, &a, errp)) {
        return NULL;
    }
    if (!drive) {
        BlockDriverState *target = qmp_lookup_node(json_opt_str(args, "target"),
                                                   errp);
        return target ? backup_common(args, &a, target, txn, errp) : NULL;
    }
    BlockDriverState *target = drive_backup_target(args, &a, errp);
    if (!target) {
        return NULL;
    }
    Job *job = backup_common(args, &a, target, txn, errp);
    /* The job holds the target now; without a job this closes it. */
    bdrv_unref(target);
    return job;
}

const QmpArgSpec qmp_spec_blockdev_backup[] = {
    { "job-id", QMP_ARG_STR, true },
    { "device", QMP_ARG_STR, false },
    { "target", QMP_ARG_STR, false },
    { "sync", QMP_ARG_STR, false },
    { "speed", QMP_ARG_INT, true },
    { "bitmap", QMP_ARG_STR, true },
    { "bitmap-mode", QMP_ARG_STR, true },
    { "compress", QMP_ARG_BOOL, true },
    { "x-compress-level", QMP_ARG_INT, true },
    { "on-source-error", QMP_ARG_STR, true },
    { "on-target-error", QMP_ARG_STR, true },
    { "auto-finalize", QMP_ARG_BOOL, true },
    { "auto-dismiss", QMP_ARG_BOOL, true },
    { "filter-node-name", QMP_ARG_STR, true },
    { "x-perf", QMP_ARG_OBJECT, true },
    { NULL },
};

const QmpArgSpec qmp_spec_drive_backup[] = {
    { "job-id", QMP_ARG_STR, true },
    { "device", QMP_ARG_STR, false },
    { "target", QMP_ARG_STR, false },
    { "format", QMP_ARG_STR, true },
    { "sync", QMP_ARG_STR, false },
    { "mode", QMP_ARG_STR, true },
    { "speed", QMP_ARG_INT, true },
    { "bitmap", QMP_ARG_STR, true },
    { "bitmap-mode", QMP_ARG_STR, true },
    { "compress", QMP_ARG_BOOL, true },
    { "x-compress-level", QMP_ARG_INT, true },
    { "on-source-error", QMP_ARG_STR, true },
    { "on-target-error", QMP_ARG_STR, true },
    { "auto-finalize", QMP_ARG_BOOL, true },
    { "auto-dismiss", QMP_ARG_BOOL, true },
    { "filter-node-name", QMP_ARG_STR, true },
    { "x-perf", QMP_ARG_OBJECT, true },
    { NULL },
};
