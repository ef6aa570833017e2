/*
 * libFuzzer target: a QMP request from a client, after the monitor's JSON
 * parser (json-c, nesting limited as src/qmp/monitor.c limits it), through
 * qmp_dispatch(): the request's own members, the NUL check of every string,
 * the argument checks against the QmpArgSpec tables of the bitmap and
 * backup commands, the enum checks of the backup arguments, and the reply.
 * The same arguments also go through qmp_execute() as the command line's
 * keyval values do (string coercion first).
 *
 * No command runs: only stubs are registered, under the real names and
 * with the real specs; a stub returns {} (the backup stubs after
 * qmp_backup_check_args).  qmp_init_commands() is never called, so any
 * other name is CommandNotFound and no daemon state is touched.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <json-c/json.h>

#include "qmp/qmp.h"
#include "qmp/qmp-internal.h"
#include "util/cleanup.h"
#include "util/error.h"
#include "fuzz-util.h"
#include "fuzz-qmp-stubs.h"

#define FUZZ_QMP_MAX_DEPTH 64   /* QMP_MAX_DEPTH of monitor.c */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_qmp_register_stubs();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct json_tokener *tok = json_tokener_new_ex(FUZZ_QMP_MAX_DEPTH);
    if (!tok) {
        return 0;
    }
    _cleanup_json_ struct json_object *req =
        json_tokener_parse_ex(tok, (const char *)data, (int)size);
    json_tokener_free(tok);
    if (!req) {
        return 0;
    }
    _cleanup_json_ struct json_object *reply = qmp_dispatch(req);
    (void)json_object_to_json_string(reply);

    /* The command line's path: keyval strings coerced by the spec. */
    struct json_object *exec, *args;
    if (json_object_is_type(req, json_type_object) &&
        json_object_object_get_ex(req, "execute", &exec) &&
        json_object_is_type(exec, json_type_string) &&
        json_object_object_get_ex(req, "arguments", &args) &&
        json_object_is_type(args, json_type_object)) {
        _cleanup_json_ struct json_object *copy = NULL;
        if (json_object_deep_copy(args, &copy, NULL) != 0) {
            return 0;
        }
        Error *err = NULL;
        _cleanup_json_ struct json_object *ret =
            qmp_execute(json_object_get_string(exec), copy, true, &err);
        if (!ret) {
            error_free(err);
        }
    }
    return 0;
}
