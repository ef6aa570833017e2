/*
 * QMP object-add and object-del (qapi/qom.json), for the object types of
 * src/crypto (object.h): TLS credentials, authorization objects, iothreads
 * and secrets; and query-iothreads (qapi/misc.json).  The
 * arguments are QEMU's flat form, {"qom-type": T, "id": ID, ...props};
 * src/crypto checks the properties of each type.
 */
#include <string.h>

#include "crypto/iothread.h"
#include "crypto/object.h"
#include "qmp/qmp-internal.h"
#include "util/json-opts.h"

static struct json_object *qmp_cmd_object_add(struct json_object *args,
                                              Error **errp)
{
    return object_add(args, errp) ? json_object_new_object() : NULL;
}

static struct json_object *qmp_cmd_object_del(struct json_object *args,
                                              Error **errp)
{
    const char *id = json_opt_str(args, "id");
    Object *o = object_find(id);
    if (o && strcmp(object_type(o), "iothread") == 0 &&
        qmp_iothread_in_use(id, errp)) {
        return NULL;
    }
    return object_del(id, errp) ? json_object_new_object() : NULL;
}

static struct json_object *qmp_cmd_query_iothreads(struct json_object *args,
                                                   Error **errp)
{
    return iothread_query_all();
}

static const QmpArgSpec spec_object_del[] = {
    { "id", QMP_ARG_STR, false },
    { NULL },
};
/* object-add's arguments: a union on "qom-type" of src/crypto's object
 * types (object_add checks them). */
static const QmpArgSpec object_add_common[] = {
    { "qom-type", QMP_ARG_STR, false },
    { "id", QMP_ARG_STR, false },
    { NULL },
};
static const QmpUnion union_object_add = {
    .common = object_add_common,
    .tag = "qom-type",
    .variant = object_class_get,
};
void qmp_register_object_commands(void)
{
    /* The properties depend on qom-type: object_add checks them. */
    qmp_register_command_spec("object-add", qmp_cmd_object_add, NULL);
    qmp_set_command_schema("object-add", NULL, &union_object_add);
    qmp_register_command_spec("object-del", qmp_cmd_object_del,
                              spec_object_del);
    qmp_register_command_spec("query-iothreads", qmp_cmd_query_iothreads,
                              qmp_spec_none);
}
