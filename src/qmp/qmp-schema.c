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
 *     a command whose arguments are a union (blockdev-add, object-add,
 *     block-export-add; blockdev-create's "options") has an "object" with
 *     the common members, a "tag" whose type is an "enum" of the cases,
 *     and a "variant" per case, its type an "object" with the case's own
 *     members (blockdev-add's: each block driver's open_opts);
 *   - an "enum" for each member whose values are a fixed set;
 *   - an "event" per event the daemon emits, with its data's members;
 *   - the "builtin" types the members use (str, int, uint64, bool, any)
 *     and the "array" type [any].
 * As QEMU does, the names of object types are masked as numbers ("0" is
 * the empty object).  Members the specs know only as free-form objects
 * are "any" here, strings whose values the spec does not list "str"
 * (docs/qmp.md).
 */
#include <stdio.h>
#include <string.h>

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

/* The list being made, and the number that names its next object type. */
typedef struct Schema {
    struct json_object *arr;
    unsigned next;
} Schema;

static struct json_object *schema_info(const char *name, const char *meta)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "name", json_object_new_string(name));
    json_object_object_add(o, "meta-type", json_object_new_string(meta));
    return o;
}

/* Append a new entry of meta-type meta named by the next number; returns
 * it (owned by the list: its name lives as long as the list). */
static struct json_object *schema_add_numbered(Schema *sc, const char *meta)
{
    char name[16];
    snprintf(name, sizeof(name), "%u", sc->next++);
    struct json_object *o = schema_info(name, meta);
    json_object_array_add(sc->arr, o);
    return o;
}

static const char *schema_name_of(struct json_object *o)
{
    return json_object_get_string(json_object_object_get(o, "name"));
}

/* An enum type whose values are the strings of the array values (taken). */
static const char *schema_add_enum(Schema *sc, struct json_object *values)
{
    struct json_object *o = schema_add_numbered(sc, "enum");
    struct json_object *members = json_object_new_array();
    for (size_t i = 0; i < json_object_array_length(values); i++) {
        struct json_object *m = json_object_new_object();
        json_object_object_add(m, "name", json_object_get(
                                   json_object_array_get_idx(values, i)));
        json_object_array_add(members, m);
    }
    json_object_object_add(o, "members", members);
    json_object_object_add(o, "values", values);
    return schema_name_of(o);
}

static const char *schema_add_object(Schema *sc, const QmpArgSpec *spec,
                                     const QmpArgSpec *skip,
                                     const char *special,
                                     const char *special_type);

/* The schema type of member a. */
static const char *schema_member_type(Schema *sc, const QmpArgSpec *a)
{
    switch (a->type) {
    case JSON_OPT_STR:
        if (a->values) {
            struct json_object *values = json_object_new_array();
            for (const char *const *v = a->values; *v; v++) {
                json_object_array_add(values, json_object_new_string(*v));
            }
            return schema_add_enum(sc, values);
        }
        return "str";
    case JSON_OPT_BOOL: return "bool";
    case JSON_OPT_INT: return "int";
    case JSON_OPT_UINT: return "uint64";
    case JSON_OPT_ARRAY: return "[any]";
    case JSON_OPT_OBJECT:
        if (a->members) {
            return schema_add_object(sc, a->members, NULL, NULL, NULL);
        }
        return "any";
    case JSON_OPT_ANY:
    case JSON_OPT_REF: return "any";
    }
    return "any";
}

/* The members array of spec (an optional member with "default": null),
 * leaving out those skip names; member special, when not NULL, has type
 * special_type. */
static struct json_object *schema_members(Schema *sc, const QmpArgSpec *spec,
                                          const QmpArgSpec *skip,
                                          const char *special,
                                          const char *special_type)
{
    struct json_object *members = json_object_new_array();
    for (const QmpArgSpec *a = spec; a && a->name; a++) {
        if (json_opts_find(&skip, 1, a->name)) {
            continue;
        }
        const char *type = special && strcmp(a->name, special) == 0
                               ? special_type : schema_member_type(sc, a);
        struct json_object *m = json_object_new_object();
        json_object_object_add(m, "name", json_object_new_string(a->name));
        json_object_object_add(m, "type", json_object_new_string(type));
        if (a->optional) {
            json_object_object_add(m, "default", NULL);
        }
        json_object_array_add(members, m);
    }
    return members;
}

/* An object type with spec's members (none for NULL; as schema_members). */
static const char *schema_add_object(Schema *sc, const QmpArgSpec *spec,
                                     const QmpArgSpec *skip,
                                     const char *special,
                                     const char *special_type)
{
    struct json_object *o = schema_add_numbered(sc, "object");
    json_object_object_add(o, "members", schema_members(sc, spec, skip,
                                                        special, special_type));
    return schema_name_of(o);
}

/* The object type of union u: its common members, the tag (an enum of the
 * cases) and a variant per case whose type has the case's own members. */
static const char *schema_add_union(Schema *sc, const QmpUnion *u)
{
    struct json_object *cases = json_object_new_array();
    struct json_object *variants = json_object_new_array();
    const QmpArgSpec *members;
    const char *case_name;
    for (size_t i = 0; (members = u->variant(i, &case_name)); i++) {
        struct json_object *v = json_object_new_object();
        json_object_object_add(v, "case", json_object_new_string(case_name));
        json_object_object_add(v, "type", json_object_new_string(
            schema_add_object(sc, members, u->common, NULL, NULL)));
        json_object_array_add(variants, v);
        json_object_array_add(cases, json_object_new_string(case_name));
    }
    const char *tag_type = schema_add_enum(sc, cases);
    struct json_object *o = schema_add_numbered(sc, "object");
    json_object_object_add(o, "members", schema_members(sc, u->common, NULL,
                                                        u->tag, tag_type));
    json_object_object_add(o, "tag", json_object_new_string(u->tag));
    json_object_object_add(o, "variants", variants);
    return schema_name_of(o);
}

static void schema_add_builtin(struct json_object *arr, const char *name,
                               const char *json_type)
{
    struct json_object *o = schema_info(name, "builtin");
    json_object_object_add(o, "json-type", json_object_new_string(json_type));
    json_object_array_add(arr, o);
}

/* A command's arg-type: its spec's members, or its union (the whole
 * arguments, or the spec's member `member`). */
static const char *schema_add_arg_type(Schema *sc, const char *empty,
                                       const QmpArgSpec *spec,
                                       const QmpUnion *u, const char *member)
{
    if (u && !member) {
        return schema_add_union(sc, u);
    }
    if (!spec || !spec->name) {
        return empty;
    }
    const char *union_type = u ? schema_add_union(sc, u) : NULL;
    return schema_add_object(sc, spec, NULL, member, union_type);
}

static struct json_object *qmp_cmd_query_qmp_schema(struct json_object *args,
                                                    Error **errp)
{
    Schema sc = { json_object_new_array(), 0 };
    const char *empty = schema_add_object(&sc, NULL, NULL, NULL, NULL);
    for (size_t i = 0; i < qmp_command_count(); i++) {
        const QmpArgSpec *spec;
        const QmpUnion *u;
        const char *member;
        const char *cmd = qmp_command_get(i, &spec, &u, &member);
        const char *arg_type = schema_add_arg_type(&sc, empty, spec, u, member);
        struct json_object *c = schema_info(cmd, "command");
        json_object_object_add(c, "arg-type", json_object_new_string(arg_type));
        json_object_object_add(c, "ret-type", json_object_new_string("any"));
        json_object_array_add(sc.arr, c);
    }
    for (size_t i = 0; i < ARRAY_SIZE(schema_events); i++) {
        const char *data = schema_add_object(&sc, schema_events[i].data, NULL,
                                             NULL, NULL);
        struct json_object *e = schema_info(schema_events[i].name, "event");
        json_object_object_add(e, "arg-type", json_object_new_string(data));
        json_object_array_add(sc.arr, e);
    }
    schema_add_builtin(sc.arr, "str", "string");
    schema_add_builtin(sc.arr, "int", "int");
    schema_add_builtin(sc.arr, "uint64", "int");
    schema_add_builtin(sc.arr, "bool", "boolean");
    schema_add_builtin(sc.arr, "any", "value");
    struct json_object *a = schema_info("[any]", "array");
    json_object_object_add(a, "element-type", json_object_new_string("any"));
    json_object_array_add(sc.arr, a);
    return sc.arr;
}

void qmp_register_schema_commands(void)
{
    qmp_register_command_spec("query-qmp-schema", qmp_cmd_query_qmp_schema,
                              qmp_spec_none);
}
