/*
 * Stub QMP commands for the fuzz targets (docs/fuzzing.md): the bitmap and
 * backup commands under their real names with their real QmpArgSpec
 * tables, so argument checking runs, but no command does anything (the
 * backup stubs run qmp_backup_check_args and return {}).  Header-only, for
 * the targets that link the qmp layer.
 */
#ifndef BITBACK_FUZZ_QMP_STUBS_H
#define BITBACK_FUZZ_QMP_STUBS_H

#include <json-c/json.h>

#include "qmp/qmp.h"
#include "qmp/qmp-internal.h"
#include "util/error.h"

static inline struct json_object *stub(struct json_object *args, Error **errp)
{
    return json_object_new_object();
}

static inline struct json_object *stub_blockdev_backup(struct json_object *args,
                                                       Error **errp)
{
    return qmp_backup_check_args(args, false, errp) ? json_object_new_object()
                                                    : NULL;
}

static inline struct json_object *stub_drive_backup(struct json_object *args,
                                                    Error **errp)
{
    return qmp_backup_check_args(args, true, errp) ? json_object_new_object()
                                                   : NULL;
}

/* Register the stubs, plus "fuzz-no-spec" (a command without a spec). */
static inline void fuzz_qmp_register_stubs(void)
{
    qmp_register_command_spec("block-dirty-bitmap-add", stub,
                              qmp_spec_bitmap_add);
    qmp_register_command_spec("block-dirty-bitmap-remove", stub,
                              qmp_spec_bitmap);
    qmp_register_command_spec("block-dirty-bitmap-clear", stub,
                              qmp_spec_bitmap);
    qmp_register_command_spec("block-dirty-bitmap-enable", stub,
                              qmp_spec_bitmap);
    qmp_register_command_spec("block-dirty-bitmap-disable", stub,
                              qmp_spec_bitmap);
    qmp_register_command_spec("block-dirty-bitmap-merge", stub,
                              qmp_spec_bitmap_merge);
    qmp_register_command_spec("blockdev-backup", stub_blockdev_backup,
                              qmp_spec_blockdev_backup);
    qmp_register_command_spec("drive-backup", stub_drive_backup,
                              qmp_spec_drive_backup);
    qmp_register_command("fuzz-no-spec", stub);
}

#endif
