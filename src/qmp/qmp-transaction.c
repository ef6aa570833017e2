/*
 * QMP `transaction` (qapi/transaction.json): several actions that succeed
 * or fail together, at one point in time.
 *
 * Every action type is a row of one table with four steps:
 *   prepare  do the action, keeping what is needed to undo it; may fail
 *   commit   make it final (start a job, release a removed bitmap)
 *   abort    undo what prepare did
 *   clean    free what prepare kept
 *
 * Running a transaction:
 *   1. check every action's arguments (nothing has happened yet);
 *   2. bdrv_drain_all_begin(): no client write is in flight or can start;
 *   3. prepare the actions in order;
 *   4. if action i fails: abort actions i-1 .. 0 (reverse order), clean
 *      them, end the drain and return action i's error, unprefixed, as
 *      QEMU 7.2 does;
 *   5. else commit every action in order, clean them, end the drain.
 *
 * Invariants:
 *   I1  prepare either succeeds or leaves nothing behind;
 *   I2  commit and abort never fail (a late failure is logged);
 *   I3  exactly one of commit/abort runs for each prepared action, then
 *       clean runs once;
 *   I4  everything between drain begin and end is atomic with respect to
 *       writers: a bitmap clear and a backup's point in time coincide.
 *
 * completion-mode "grouped" puts every job of the transaction in one
 * JobTxn (they then finish together); the bitmap actions refuse it, as in
 * QEMU.  The standalone blockdev-backup / drive-backup commands run here as
 * a transaction of one action, so they too are drained.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "job/job.h"
#include "qmp/qmp-internal.h"
#include "util/cleanup.h"

#define TXN_MAX_ACTIONS 1024

typedef struct TxnActionType TxnActionType;

/* One action of a running transaction. */
typedef struct TxnAction {
    const TxnActionType *type;
    struct json_object *data;           /* borrowed from the request */
    JobTxn *txn;                        /* grouped: shared; else NULL */
    bool grouped;
    BlockDriverState *bs;
    BdrvDirtyBitmap *bm;
    BdrvDirtyBitmapBackup *backup;      /* undo data, owned until clean */
    Job *job;
} TxnAction;

struct TxnActionType {
    const char *name;
    const QmpArgSpec *spec;
    bool grouped_ok;                    /* supports completion-mode grouped */
    /* Extra argument checks before anything runs (enum values). */
    bool (*check)(struct json_object *data, Error **errp);
    bool (*prepare)(TxnAction *a, Error **errp);
    void (*commit)(TxnAction *a);
    void (*abort)(TxnAction *a);
    void (*clean)(TxnAction *a);
};

/* ---- abort ---- */

static bool abort_prepare(TxnAction *a, Error **errp)
{
    error_setg(errp, "Transaction aborted using Abort action");
    return false;
}

/* ---- bitmap actions ---- */

static bool bitmap_add_prepare(TxnAction *a, Error **errp)
{
    a->bm = qmp_bitmap_add(a->data, errp);
    if (!a->bm) {
        return false;
    }
    a->bs = a->bm->bs;
    return true;
}

static void bitmap_add_abort(TxnAction *a)
{
    Error *err = NULL;
    if (!bdrv_dirty_bitmap_remove(a->bs, a->bm->name, &err)) {
        error_prepend(&err, "transaction abort: ");
        error_report_err(err);
    }
}

/* Clear, enable, disable and merge keep a backup of the bitmap (bits,
 * generation, recording state) and put it back on abort. */
static bool bitmap_take_backup(TxnAction *a, Error **errp)
{
    a->bm = qmp_lookup_bitmap(json_opt_str(a->data, "node"),
                              json_opt_str(a->data, "name"), &a->bs, errp);
    if (!a->bm) {
        return false;
    }
    a->backup = bdrv_dirty_bitmap_backup(a->bm, errp);
    return a->backup != NULL;
}

static void bitmap_drop_backup(TxnAction *a)
{
    bdrv_dirty_bitmap_backup_free(a->backup);
    a->backup = NULL;
}

/* Back the bitmap up, then apply op to it; no backup is kept on failure. */
static bool bitmap_change_prepare(TxnAction *a,
                                  bool (*op)(BdrvDirtyBitmap *, Error **),
                                  Error **errp)
{
    if (!bitmap_take_backup(a, errp)) {
        return false;
    }
    if (!op(a->bm, errp)) {
        bitmap_drop_backup(a);
        return false;
    }
    return true;
}

static bool bitmap_clear_prepare(TxnAction *a, Error **errp)
{
    return bitmap_change_prepare(a, bdrv_clear_dirty_bitmap, errp);
}

static bool bitmap_enable_prepare(TxnAction *a, Error **errp)
{
    return bitmap_change_prepare(a, bdrv_enable_dirty_bitmap, errp);
}

static bool bitmap_disable_prepare(TxnAction *a, Error **errp)
{
    return bitmap_change_prepare(a, bdrv_disable_dirty_bitmap, errp);
}

static bool bitmap_merge_prepare(TxnAction *a, Error **errp)
{
    _cleanup_free_ BdrvDirtyBitmap **srcs = NULL;
    size_t n = 0;
    a->bm = qmp_bitmap_merge_lookup(a->data, &srcs, &n, errp);
    if (!a->bm) {
        return false;
    }
    a->bs = a->bm->bs;
    a->backup = bdrv_dirty_bitmap_backup(a->bm, errp);
    if (!a->backup) {
        return false;
    }
    if (!bdrv_merge_dirty_bitmaps(a->bm, srcs, (int)n, errp)) {
        bitmap_drop_backup(a);
        return false;
    }
    return true;
}

static void bitmap_restore_backup(TxnAction *a)
{
    bdrv_dirty_bitmap_restore(a->bm, a->backup);    /* frees it */
    a->backup = NULL;
}

/* Remove: prepare checks that it can go and marks it busy, so later
 * actions of the same transaction cannot use it (QEMU hides it); commit
 * removes it (from the image too when persistent). */
static bool bitmap_remove_prepare(TxnAction *a, Error **errp)
{
    a->bm = qmp_bitmap_remove_check(a->data, &a->bs, errp);
    if (!a->bm) {
        return false;
    }
    bdrv_dirty_bitmap_set_busy(a->bm, true);
    return true;
}

static void bitmap_remove_commit(TxnAction *a)
{
    Error *err = NULL;
    bdrv_dirty_bitmap_set_busy(a->bm, false);
    if (!bdrv_dirty_bitmap_remove(a->bs, a->bm->name, &err)) {
        error_prepend(&err, "transaction: ");
        error_report_err(err);
    }
}

static void bitmap_remove_abort(TxnAction *a)
{
    bdrv_dirty_bitmap_set_busy(a->bm, false);
}

/* ---- internal snapshot ---- */

static bool snapshot_internal_prepare(TxnAction *a, Error **errp)
{
    return qmp_snapshot_internal(a->data, &a->bs, errp);
}

static void snapshot_internal_abort(TxnAction *a)
{
    Error *err = NULL;
    BdrvSnapshotInfo si;
    if (!bdrv_snapshot_delete(a->bs, json_opt_str(a->data, "name"), &si,
                              &err)) {
        error_prepend(&err, "transaction abort: ");
        error_report_err(err);
    }
}

/* ---- backup actions ---- */

static bool blockdev_backup_check(struct json_object *data, Error **errp)
{
    return qmp_backup_check_args(data, false, errp);
}

static bool drive_backup_check(struct json_object *data, Error **errp)
{
    return qmp_backup_check_args(data, true, errp);
}

static bool blockdev_backup_prepare(TxnAction *a, Error **errp)
{
    a->job = qmp_backup_prepare(a->data, false, a->txn, errp);
    return a->job != NULL;
}

static bool drive_backup_prepare(TxnAction *a, Error **errp)
{
    a->job = qmp_backup_prepare(a->data, true, a->txn, errp);
    return a->job != NULL;
}

static void backup_commit(TxnAction *a)
{
    job_start(a->job);
}

static void backup_abort(TxnAction *a)
{
    job_early_fail(a->job);
}

static const TxnActionType txn_action_types[] = {
    {
        .name = "abort",
        .spec = qmp_spec_none,
        .grouped_ok = true,
        .prepare = abort_prepare,
    },
    {
        .name = "block-dirty-bitmap-add",
        .spec = qmp_spec_bitmap_add,
        .prepare = bitmap_add_prepare,
        .abort = bitmap_add_abort,
    },
    {
        .name = "block-dirty-bitmap-remove",
        .spec = qmp_spec_bitmap,
        .prepare = bitmap_remove_prepare,
        .commit = bitmap_remove_commit,
        .abort = bitmap_remove_abort,
    },
    {
        .name = "block-dirty-bitmap-clear",
        .spec = qmp_spec_bitmap,
        .prepare = bitmap_clear_prepare,
        .abort = bitmap_restore_backup,
        .clean = bitmap_drop_backup,
    },
    {
        .name = "block-dirty-bitmap-enable",
        .spec = qmp_spec_bitmap,
        .prepare = bitmap_enable_prepare,
        .abort = bitmap_restore_backup,
        .clean = bitmap_drop_backup,
    },
    {
        .name = "block-dirty-bitmap-disable",
        .spec = qmp_spec_bitmap,
        .prepare = bitmap_disable_prepare,
        .abort = bitmap_restore_backup,
        .clean = bitmap_drop_backup,
    },
    {
        .name = "block-dirty-bitmap-merge",
        .spec = qmp_spec_bitmap_merge,
        .prepare = bitmap_merge_prepare,
        .abort = bitmap_restore_backup,
        .clean = bitmap_drop_backup,
    },
    {
        .name = "blockdev-snapshot-internal-sync",
        .spec = qmp_spec_snapshot_internal,
        .prepare = snapshot_internal_prepare,
        .abort = snapshot_internal_abort,
    },
    {
        .name = "blockdev-backup",
        .spec = qmp_spec_blockdev_backup,
        .grouped_ok = true,
        .check = blockdev_backup_check,
        .prepare = blockdev_backup_prepare,
        .commit = backup_commit,
        .abort = backup_abort,
    },
    {
        .name = "drive-backup",
        .spec = qmp_spec_drive_backup,
        .grouped_ok = true,
        .check = drive_backup_check,
        .prepare = drive_backup_prepare,
        .commit = backup_commit,
        .abort = backup_abort,
    },
};

static const TxnActionType *txn_find_type(const char *name)
{
    for (size_t i = 0; i < ARRAY_SIZE(txn_action_types); i++) {
        if (strcmp(txn_action_types[i].name, name) == 0) {
            return &txn_action_types[i];
        }
    }
    return NULL;
}

/* qmp_check_args() names the member as 'x'; inside a transaction QEMU
 * names it with its path ('actions[0].data.x').  Re-issue err with the
 * path inserted after the first quote. */
static void txn_prefix_error(Error *err, const char *prefix, Error **errp)
{
    const char *msg = error_get_pretty(err);
    const char *q = strchr(msg, '\'');
    if (!q || !*prefix) {
        error_propagate(errp, err);
        return;
    }
    error_setg(errp, "%.*s'%s%s", (int)(q - msg), msg, prefix, q + 1);
    error_free(err);
}

static bool txn_check_data(const TxnActionType *type, struct json_object *data,
                           const char *prefix, Error **errp)
{
    Error *err = NULL;
    if (!qmp_check_args(data, type->spec, &err)) {
        txn_prefix_error(err, prefix, errp);
        return false;
    }
    return !type->check || type->check(data, errp);
}

/* Run prepared-checked actions (steps 2-5 of the file comment). */
static bool txn_run(TxnAction *actions, size_t n, bool grouped, Error **errp)
{
    JobTxn *txn = grouped ? job_txn_new() : NULL;
    size_t prepared = 0;
    bool ok = true;

    bdrv_drain_all_begin();
    for (; prepared < n; prepared++) {
        TxnAction *a = &actions[prepared];
        a->txn = txn;
        a->grouped = grouped;
        if (grouped && !a->type->grouped_ok) {
            error_setg(errp, "Action '%s' does not support Transaction "
                       "property completion-mode = grouped", a->type->name);
            ok = false;
            break;
        }
        if (!a->type->prepare(a, errp)) {
            ok = false;
            break;
        }
    }
    if (ok) {
        for (size_t i = 0; i < n; i++) {
            if (actions[i].type->commit) {
                actions[i].type->commit(&actions[i]);
            }
        }
    } else {
        for (size_t i = prepared; i-- > 0;) {
            if (actions[i].type->abort) {
                actions[i].type->abort(&actions[i]);
            }
        }
    }
    for (size_t i = 0; i < prepared; i++) {
        if (actions[i].type->clean) {
            actions[i].type->clean(&actions[i]);
        }
    }
    bdrv_drain_all_end();
    if (txn) {
        job_txn_unref(txn);
    }
    return ok;
}

static bool qmp_transaction_run_single(const char *type_name,
                                       struct json_object *data,
                                       Error **errp)
{
    const TxnActionType *type = txn_find_type(type_name);
    if (!type) {
        error_setg(errp, "Parameter 'type' does not accept value '%s'",
                   type_name);
        return false;
    }
    if (!txn_check_data(type, data, "", errp)) {
        return false;
    }
    TxnAction a = { .type = type, .data = data };
    return txn_run(&a, 1, false, errp);
}

static bool txn_parse_mode(struct json_object *args, bool *ret_grouped,
                           Error **errp)
{
    struct json_object *props, *mode;
    *ret_grouped = false;
    if (!json_object_object_get_ex(args, "properties", &props)) {
        return true;
    }
    json_object_object_foreach(props, key, val) {
        (void)val;
        if (strcmp(key, "completion-mode") != 0) {
            error_setg(errp, "Parameter 'properties.%s' is unexpected", key);
            return false;
        }
    }
    if (!json_object_object_get_ex(props, "completion-mode", &mode)) {
        return true;
    }
    if (!json_object_is_type(mode, json_type_string)) {
        error_setg(errp, "Invalid parameter type for "
                   "'properties.completion-mode', expected: string");
        return false;
    }
    const char *m = json_object_get_string(mode);
    if (strcmp(m, "grouped") == 0) {
        *ret_grouped = true;
    } else if (strcmp(m, "individual") != 0) {
        error_setg(errp, "Parameter 'completion-mode' does not accept "
                   "value '%s'", m);
        return false;
    }
    return true;
}

static struct json_object *qmp_cmd_transaction(struct json_object *args,
                                               Error **errp)
{
    struct json_object *list;
    json_object_object_get_ex(args, "actions", &list);
    size_t n = json_object_array_length(list);
    _cleanup_free_ TxnAction *actions = qmp_array_alloc(
        n, TXN_MAX_ACTIONS, sizeof(*actions), "actions in one transaction",
        errp);
    if (!actions) {
        return NULL;
    }

    /* Step 1: check everything before anything happens. */
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(list, i);
        struct json_object *jtype, *data;
        char prefix[64];
        if (!json_object_is_type(e, json_type_object)) {
            error_setg(errp, "Invalid parameter type for 'actions[%zu]', "
                       "expected: object", i);
            return NULL;
        }
        if (!json_object_object_get_ex(e, "type", &jtype)) {
            error_setg(errp, "Parameter 'actions[%zu].type' is missing", i);
            return NULL;
        }
        if (!json_object_is_type(jtype, json_type_string)) {
            error_setg(errp, "Invalid parameter type for 'actions[%zu].type', "
                       "expected: string", i);
            return NULL;
        }
        const char *type_name = json_object_get_string(jtype);
        const TxnActionType *type = txn_find_type(type_name);
        if (!type) {
            error_setg(errp, "Parameter 'type' does not accept value '%s'",
                       type_name);
            return NULL;
        }
        if (!json_object_object_get_ex(e, "data", &data)) {
            error_setg(errp, "Parameter 'actions[%zu].data' is missing", i);
            return NULL;
        }
        if (!json_object_is_type(data, json_type_object)) {
            error_setg(errp, "Invalid parameter type for 'actions[%zu].data', "
                       "expected: object", i);
            return NULL;
        }
        json_object_object_foreach(e, key, val) {
            (void)val;
            if (strcmp(key, "type") != 0 && strcmp(key, "data") != 0) {
                error_setg(errp, "Parameter 'actions[%zu].%s' is unexpected",
                           i, key);
                return NULL;
            }
        }
        snprintf(prefix, sizeof(prefix), "actions[%zu].data.", i);
        if (!txn_check_data(type, data, prefix, errp)) {
            return NULL;
        }
        actions[i] = (TxnAction) { .type = type, .data = data };
    }
    bool grouped;
    if (!txn_parse_mode(args, &grouped, errp)) {
        return NULL;
    }
    if (!txn_run(actions, n, grouped, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static const QmpArgSpec spec_transaction[] = {
    { "actions", QMP_ARG_ARRAY, false },
    { "properties", QMP_ARG_OBJECT, true },
    { NULL },
};

static struct json_object *qmp_cmd_blockdev_backup(struct json_object *args,
                                                   Error **errp)
{
    if (!qmp_transaction_run_single("blockdev-backup", args, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_cmd_drive_backup(struct json_object *args,
                                                Error **errp)
{
    if (!qmp_transaction_run_single("drive-backup", args, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

void qmp_register_transaction_commands(void)
{
    qmp_register_command_spec("blockdev-backup", qmp_cmd_blockdev_backup,
                              qmp_spec_blockdev_backup);
    qmp_register_command_spec("drive-backup", qmp_cmd_drive_backup,
                              qmp_spec_drive_backup);
    qmp_register_command_spec("transaction", qmp_cmd_transaction,
                              spec_transaction);
}
