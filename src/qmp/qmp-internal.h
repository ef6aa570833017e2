/*
 * Declarations shared between the files of src/qmp (not a public API).
 */
#ifndef BITBACK_QMP_INTERNAL_H
#define BITBACK_QMP_INTERNAL_H

#include <json-c/json.h>
#include "block/block.h"
#include "qmp/qmp.h"

#ifndef BITBACK_VERSION
#define BITBACK_VERSION "0.1.0"
#endif

/* dispatch.c: [{"name": ...}] for query-commands. */
struct json_object *qmp_query_commands_list(void);

/* Registration of each file's commands (called by qmp_init_commands). */
void qmp_register_control_commands(void);
void qmp_register_block_commands(void);
void qmp_register_export_commands(void);
/* qmp-backup.c: blockdev-backup, drive-backup, transaction. */
void qmp_register_backup_commands(void);

/* qmp-block.c: find a node as the bitmap/export commands do, with QEMU's
 * "Cannot find device='X' nor node-name='X'" error. */
BlockDriverState *qmp_lookup_node(const char *name, Error **errp);

/* qmp-export.c: block-export-add with or without QEMU's "NBD server not
 * running" check (the command line may give --export before
 * --nbd-server). */
struct json_object *qmp_export_add(struct json_object *args,
                                   bool require_server, Error **errp);

#endif
