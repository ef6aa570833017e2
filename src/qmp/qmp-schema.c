/*
 * query-qmp-schema (qapi/introspect.json): the daemon's QMP schema as a
 * list of QEMU's SchemaInfo objects, made from the command registry
 * (dispatch.c) at each call, so it lists exactly the registered commands
 * with exactly the arguments their specs check.
 *
 * What it holds, in QEMU's shapes:
 *   - a "command" per registered command, its "arg-type" an "object" whose
 *     members are the spec's (an optional one with "default": null) and
 *     its "ret-type" "any" (the registry does not know return types);
 *   - an "event" per event the daemon emits, with its data's members;
 *   - the "builtin" types the members use (str, int, uint64, bool, any)
 *     and the "array" type [any].
 * As QEMU does, the names of object types are masked as numbers ("0" is
 * the empty object).  Argument types the registry knows only as "object"
 * are "any" here, enum-valued ones "str" (docs/qmp.md).
 */
#include <stdio.h>

#include "qmp/qmp-internal.h"
#include "util/cleanup.h"

/* The events of src/job and src/nbd (event_emit), with their data. */
static const QmpArgSpec ev_export_deleted[] = {
    { "id", QMP_ARG_STR, false },
    { NULL },
};
static const QmpArgSpec ev_job_cancelled[] = {
    { "type", QMP_ARG_STR, false },
    { "device", QMP_ARG_STR, false },
    { "len", QMP_ARG_INT, false },
    { "offset", QMP_ARG_INT, false },
    { "speed", QMP_ARG_INT, false },
    { NULL },
};
static const QmpArgSpec ev_job_completed[] = {
    { "type", QMP_ARG_STR, false },
    { "device", QMP_ARG_STR, false },
    { "len", QMP_ARG_INT, false },
    { "offset", QMP_ARG_INT, false },
    { "speed", QMP_ARG_INT, false },
    { "error", QMP_ARG_STR, true },
    { NULL },
};
static const QmpArgSpec ev_job_error[] = {
    { "device", QMP_ARG_STR, false },
    { "operation", QMP_ARG_STR, false },
    { "action", QMP_ARG_STR, false },
    { NULL },
};
static const QmpArgSpec ev_job_pending[] = {
    { "type", QMP_ARG_STR, false },
    { "id", QMP_ARG_STR, false },
    { NULL },
};
static const QmpArgSpec ev_job_status_change[] = {
    { "id", QMP_ARG_STR, false },
    { "status", QMP_ARG_STR, false },
    { NULL },
};

static const struct {
    const char *name;
    const QmpArgSpec *data;
} schema_events[] = {
    { "BLOCK_EXPORT_DELETED", ev_export_deleted },
    { "BLOCK_JOB_CANCELLED", ev_job_cancelled },
    { "BLOCK_JOB_COMPLETED", ev_job_completed },
    { "BLOCK_JOB_ERROR", ev_job_error },
    { "BLOCK_JOB_PENDING", ev_job_pending },
    { "JOB_STATUS_CHANGE", ev_job_status_change },
};

/* The schema type of an argument type. */
static const char *schema_type_name(QmpArgType t)
{
    switch (t) {
    case QMP_ARG_STR: return "str";
    case QMP_ARG_BOOL: return "bool";
    case QMP_ARG_INT: return "int";
    case QMP_ARG_UINT: return "uint64";
    case QMP_ARG_ARRAY: return "[any]";
    case QMP_ARG_OBJECT:
    case QMP_ARG_ANY: return "any";
    }
    return "any";
}

static struct json_object *schema_info(const char *name, const char *meta)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "name", json_object_new_string(name));
    json_object_object_add(o, "meta-type", json_object_new_string(meta));
    return o;
}

/* Append an object type with spec's members (none for NULL) to arr, named
 * by the next number *next; returns its name in buf. */
static const char *schema_add_object(struct json_object *arr, unsigned *next,
                                     const QmpArgSpec *spec, char *buf,
                                     size_t len)
{
    snprintf(buf, len, "%u", (*next)++);
    struct json_object *o = schema_info(buf, "object");
    struct json_object *members = json_object_new_array();
    for (const QmpArgSpec *a = spec; a && a->name; a++) {
        struct json_object *m = json_object_new_object();
        json_object_object_add(m, "name", json_object_new_string(a->name));
        json_object_object_add(m, "type", json_object_new_string(
                                   schema_type_name(a->type)));
        if (a->optional) {
            json_object_object_add(m, "default", NULL);
        }
        json_object_array_add(members, m);
    }
    json_object_object_add(o, "members", members);
    json_object_array_add(arr, o);
    return buf;
}

static void schema_add_builtin(struct json_object *arr, const char *name,
                               const char *json_type)
{
    struct json_object *o = schema_info(name, "builtin");
    json_object_object_add(o, "json-type", json_object_new_string(json_type));
    json_object_array_add(arr, o);
}

static struct json_object *qmp_cmd_query_qmp_schema(struct json_object *args,
                                                    Error **errp)
{
    struct json_object *arr = json_object_new_array();
    unsigned next = 0;
    char empty[16], name[16];
    schema_add_object(arr, &next, NULL, empty, sizeof(empty));
    for (size_t i = 0; i < qmp_command_count(); i++) {
        const QmpArgSpec *spec;
        const char *cmd = qmp_command_get(i, &spec);
        const char *arg_type = empty;
        if (spec && spec->name) {
            arg_type = schema_add_object(arr, &next, spec, name, sizeof(name));
        }
        struct json_object *c = schema_info(cmd, "command");
        json_object_object_add(c, "arg-type", json_object_new_string(arg_type));
        json_object_object_add(c, "ret-type", json_object_new_string("any"));
        json_object_array_add(arr, c);
    }
    for (size_t i = 0; i < ARRAY_SIZE(schema_events); i++) {
        const char *data = schema_add_object(arr, &next, schema_events[i].data,
                                             name, sizeof(name));
        struct json_object *e = schema_info(schema_events[i].name, "event");
        json_object_object_add(e, "arg-type", json_object_new_string(data));
        json_object_array_add(arr, e);
    }
    schema_add_builtin(arr, "str", "string");
    schema_add_builtin(arr, "int", "int");
    schema_add_builtin(arr, "uint64", "int");
    schema_add_builtin(arr, "bool", "boolean");
    schema_add_builtin(arr, "any", "value");
    struct json_object *a = schema_info("[any]", "array");
    json_object_object_add(a, "element-type", json_object_new_string("any"));
    json_object_array_add(arr, a);
    return arr;
}

void qmp_register_schema_commands(void)
{
    qmp_register_command_spec("query-qmp-schema", qmp_cmd_query_qmp_schema,
                              qmp_spec_none);
}
