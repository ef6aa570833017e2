/*
 * Declarations shared between the files of src/qmp (not a public API).
 */
#ifndef BITBACK_QMP_INTERNAL_H
#define BITBACK_QMP_INTERNAL_H

#include <json-c/json.h>
#include "block/block.h"
#include "job/job.h"
#include "qmp/qmp.h"

/* BITBACK_VERSION: the project's version, defined by meson.build. */

/* query-version's "qemu" triple: the QEMU release whose QMP interface
 * bitbackd follows and is tested against (qemu-storage-daemon 7.2, the
 * job API of qapi/job.json included), so that clients which gate features
 * on QEMU's version (libvirt) expect what is there.  bitback's own version
 * is in "package" ("bitback X.Y.Z"). */
#define QMP_QEMU_COMPAT_MAJOR 7
#define QMP_QEMU_COMPAT_MINOR 2
#define QMP_QEMU_COMPAT_MICRO 0

/* qmp-commands.c: the query-version reply, also the QMP greeting's
 * "version" member; a new reference. */
struct json_object *qmp_version_info(void);

/* dispatch.c: a zeroed array for the n elements of an array argument
 * (room for one when n is 0; free() it), or NULL with errp set to
 * "Too many <what> (at most <max>)" when n > max (DESIGN.md D7). */
void *qmp_array_alloc(size_t n, size_t max, size_t elem_size,
                      const char *what, Error **errp);

/* dispatch.c: the spec of a command that takes no arguments. */
extern const QmpArgSpec qmp_spec_none[];

/* dispatch.c: [{"name": ...}] for query-commands. */
struct json_object *qmp_query_commands_list(void);

/* A flat union (QAPI's): the members of every case, one of them the tag
 * whose value picks the case, and each case's own members.
 * query-qmp-schema lists it as QEMU does (an object with "tag" and
 * "variants", the tag's type an enum of the cases). */
typedef struct QmpUnion {
    const QmpArgSpec *common;
    const char *tag;
    /* The i-th case: its tag value in *ret_name and its own members (one
     * named as a common member is left out); NULL after the last. */
    const QmpArgSpec *(*variant)(size_t i, const char **ret_name);
} QmpUnion;
/* The case of u whose tag value is name, or NULL. */
const QmpArgSpec *qmp_union_find(const QmpUnion *u, const char *name);

/* Register a command whose arguments are the union u: before fn runs (and
 * after precheck, when not NULL), the tag must name a case ("Parameter
 * 'T' does not accept value 'V'") and the members must be the common ones
 * and that case's, checked as qmp_register_command_spec does. */
void qmp_register_command_union(const char *name, QmpCommandFunc fn,
                                const QmpUnion *u, QmpArgPrecheck precheck);
/* For query-qmp-schema only, of registered command name whose handler
 * checks its own arguments: member NULL: its arguments are the union u;
 * else its spec's member `member` is (blockdev-create's "options"). */
void qmp_set_command_schema(const char *name, const char *member,
                            const QmpUnion *u);

/* dispatch.c: for query-qmp-schema.  The number of registered commands;
 * the name of the i-th (i < count), in *ret_spec its spec (NULL for a
 * command whose arguments are a union), in *ret_union the union
 * qmp_register_command_union or qmp_set_command_schema gave (else NULL)
 * and in *ret_member the member of the spec that the union is (NULL: the
 * union is the arguments). */
size_t qmp_command_count(void);
const char *qmp_command_get(size_t i, const QmpArgSpec **ret_spec,
                            const QmpUnion **ret_union,
                            const char **ret_member);

/* Registration of each file's commands (called by qmp_init_commands). */
void qmp_register_control_commands(void);
void qmp_register_block_commands(void);
void qmp_register_export_commands(void);
void qmp_register_object_commands(void);      /* qmp-object.c */
/* qmp-job.c: query-jobs, query-block-jobs, job-pause, job-resume,
 * job-cancel, job-finalize, job-dismiss, job-complete, block-job-cancel,
 * block-job-pause, block-job-resume, block-job-set-speed,
 * block-job-finalize, block-job-dismiss, block-job-complete. */
void qmp_register_job_commands(void);
/* qmp-create.c: blockdev-create (file, qcow2, qbm). */
void qmp_register_create_commands(void);
/* qmp-stats.c: query-blockstats. */
void qmp_register_stats_commands(void);
/* qmp-schema.c: query-qmp-schema, made from the registry; register it
 * last (after every other command). */
void qmp_register_schema_commands(void);
/* qmp-resize.c: block_resize. */
void qmp_register_resize_commands(void);

/* qmp-block.c: find a node as the bitmap/export commands do, with QEMU's
 * "Cannot find device='X' nor node-name='X'" error. */
BlockDriverState *qmp_lookup_node(const char *name, Error **errp);

/* qmp-export.c: block-export-add with or without QEMU's "NBD server not
 * running" check (the command line may give --export before
 * --nbd-server). */
struct json_object *qmp_export_add(struct json_object *args,
                                   bool require_server, Error **errp);

/* qmp-export.c: true with errp set when an export names iothread id
 * (object-del refuses to delete it). */
bool qmp_iothread_in_use(const char *id, Error **errp);

/* ---- Shared by the standalone commands and `transaction` (h3) ---- */

/* qmp-block.c: argument specs of the bitmap commands. */
extern const QmpArgSpec qmp_spec_bitmap[];          /* node, name */
extern const QmpArgSpec qmp_spec_bitmap_add[];
extern const QmpArgSpec qmp_spec_snapshot_internal[];
extern const QmpArgSpec qmp_spec_bitmap_merge[];
/* The bitmap `name` on node `node` ("Dirty bitmap 'X' not found"). */
BdrvDirtyBitmap *qmp_lookup_bitmap(const char *node, const char *name,
                                   BlockDriverState **ret_bs, Error **errp);
/* block-dirty-bitmap-add: checks and adds; returns the new bitmap. */
BdrvDirtyBitmap *qmp_bitmap_add(struct json_object *args, Error **errp);
/* blockdev-snapshot-internal-sync's work (callers drain): the snapshot
 * "name" of node "device" (bdrv_snapshot_create); *ret_bs the node. */
bool qmp_snapshot_internal(struct json_object *args, BlockDriverState **ret_bs,
                           Error **errp);
/* block-dirty-bitmap-remove's checks: the bitmap exists, is not busy, and
 * a persistent one is on a writable node.  Returns it. */
BdrvDirtyBitmap *qmp_bitmap_remove_check(struct json_object *args,
                                         BlockDriverState **ret_bs,
                                         Error **errp);
/* block-dirty-bitmap-merge's lookups: the target, and the sources in
 * *ret_srcs (malloc'd, caller frees) with their count in *ret_n. */
BdrvDirtyBitmap *qmp_bitmap_merge_lookup(struct json_object *args,
                                         BdrvDirtyBitmap ***ret_srcs,
                                         size_t *ret_n, Error **errp);

/* qmp-backup.c: the arguments and the job of blockdev-backup (drive
 * false) and drive-backup (true), for qmp-transaction.c, which runs them. */
extern const QmpArgSpec qmp_spec_blockdev_backup[];
extern const QmpArgSpec qmp_spec_drive_backup[];
/* Check the enum-valued arguments (sync, bitmap-mode, ...). */
bool qmp_backup_check_args(struct json_object *args, bool drive, Error **errp);
/* Create the job (state created, not started) inside a drained section:
 * the prepare step of the backup transaction actions. */
Job *qmp_backup_prepare(struct json_object *args, bool drive, JobTxn *txn,
                        Error **errp);

/* qmp-transaction.c: register `transaction`, and blockdev-backup and
 * drive-backup, which run as a transaction of one action. */
void qmp_register_transaction_commands(void);

#endif
