/*
 * QMP control commands (qapi/control.json): qmp_capabilities,
 * query-version, query-commands and quit, plus qmp_init_commands(), which
 * registers every command implemented in src/qmp.
 *
 * Capabilities negotiation state is per connection and is handled by the
 * monitor (monitor.c); the handler here only validates the arguments.
 */
#include <string.h>

#include "job/job.h"
#include "qmp/qmp-internal.h"

static struct json_object *qmp_cmd_capabilities(struct json_object *args,
                                                Error **errp)
{
    struct json_object *enable;
    if (json_object_object_get_ex(args, "enable", &enable)) {
        size_t n = json_object_array_length(enable);
        for (size_t i = 0; i < n; i++) {
            struct json_object *cap = json_object_array_get_idx(enable, i);
            error_setg(errp, "Capability '%s' is not available",
                       json_object_get_string(cap));
            return NULL;
        }
    }
    return json_object_new_object();
}

struct json_object *qmp_version_info(void)
{
    struct json_object *ret = json_object_new_object();
    struct json_object *q = json_object_new_object();
    json_object_object_add(q, "micro",
                           json_object_new_int(QMP_QEMU_COMPAT_MICRO));
    json_object_object_add(q, "minor",
                           json_object_new_int(QMP_QEMU_COMPAT_MINOR));
    json_object_object_add(q, "major",
                           json_object_new_int(QMP_QEMU_COMPAT_MAJOR));
    json_object_object_add(ret, "qemu", q);
    json_object_object_add(ret, "package",
                           json_object_new_string("bitback " BITBACK_VERSION));
    return ret;
}

static struct json_object *qmp_cmd_query_version(struct json_object *args,
                                                 Error **errp)
{
    return qmp_version_info();
}

static struct json_object *qmp_cmd_query_commands(struct json_object *args,
                                                  Error **errp)
{
    return qmp_query_commands_list();
}

static struct json_object *qmp_cmd_quit(struct json_object *args, Error **errp)
{
    qmp_request_quit();
    return json_object_new_object();
}

static const QmpArgSpec spec_capabilities[] = {
    { "enable", QMP_ARG_ARRAY, true },
    { NULL },
};

void qmp_register_control_commands(void)
{
    qmp_register_command_spec("qmp_capabilities", qmp_cmd_capabilities,
                              spec_capabilities);
    qmp_register_command_spec("query-version", qmp_cmd_query_version,
                              qmp_spec_none);
    qmp_register_command_spec("query-commands", qmp_cmd_query_commands,
                              qmp_spec_none);
    qmp_register_command_spec("quit", qmp_cmd_quit, qmp_spec_none);
}

void qmp_init_commands(void)
{
    qmp_register_control_commands();
    qmp_register_stats_commands();
    qmp_register_block_commands();
    qmp_register_export_commands();
    qmp_register_object_commands();
    qmp_register_transaction_commands();
    qmp_register_job_commands();
    qmp_register_create_commands();
    qmp_register_resize_commands();
    qmp_register_schema_commands();
}
