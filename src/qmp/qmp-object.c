/*
 * QMP object-add and object-del (qapi/qom.json), for the object types of
 * src/crypto (object.h): TLS credentials and authorization objects.  The
 * arguments are QEMU's flat form, {"qom-type": T, "id": ID, ...props};
 * src/crypto checks the properties of each type.
 */
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
    return object_del(json_opt_str(args, "id"), errp)
           ? json_object_new_object() : NULL;
}

static const QmpArgSpec spec_object_del[] = {
    { "id", QMP_ARG_STR, false },
    { NULL },
};

void qmp_register_object_commands(void)
{
    /* The properties depend on qom-type: object_add checks them. */
    qmp_register_command_spec("object-add", qmp_cmd_object_add, NULL);
    qmp_register_command_spec("object-del", qmp_cmd_object_del,
                              spec_object_del);
}
