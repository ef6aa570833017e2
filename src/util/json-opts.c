/*
 * Getters for checked members of a json-c object (json-opts.h).
 */
#include <json-c/json.h>

#include "util/json-opts.h"

/* The member key of obj when it has type t, else NULL. */
static struct json_object *member_of_type(struct json_object *obj,
                                          const char *key, json_type t)
{
    struct json_object *v;
    if (!obj || !json_object_object_get_ex(obj, key, &v) ||
        !json_object_is_type(v, t)) {
        return NULL;
    }
    return v;
}

const char *json_opt_str(struct json_object *obj, const char *key)
{
    struct json_object *v = member_of_type(obj, key, json_type_string);
    return v ? json_object_get_string(v) : NULL;
}

bool json_opt_bool(struct json_object *obj, const char *key, bool dflt)
{
    struct json_object *v = member_of_type(obj, key, json_type_boolean);
    return v ? json_object_get_boolean(v) : dflt;
}

int64_t json_opt_int(struct json_object *obj, const char *key, int64_t dflt)
{
    struct json_object *v = member_of_type(obj, key, json_type_int);
    return v ? json_object_get_int64(v) : dflt;
}
