/*
 * Getters for checked members of a json-c object, and the check of an
 * object's members against specs (json-opts.h).
 */
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/cleanup.h"
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

/* ---- member specs ---- */

/* The JSON type QEMU's messages name for t. */
static const char *json_opt_type_name(JsonOptType t)
{
    switch (t) {
    case JSON_OPT_STR: return "string";
    case JSON_OPT_BOOL: return "boolean";
    case JSON_OPT_INT:
    case JSON_OPT_UINT: return "integer";
    case JSON_OPT_OBJECT: return "object";
    case JSON_OPT_ARRAY: return "array";
    case JSON_OPT_ANY:
    case JSON_OPT_REF: return "any";
    }
    return "?";
}

static bool json_opt_type_ok(struct json_object *v, JsonOptType t,
                             unsigned flags)
{
    bool str = json_object_is_type(v, json_type_string);
    switch (t) {
    case JSON_OPT_STR: return str;
    case JSON_OPT_BOOL:
        return json_object_is_type(v, json_type_boolean) ||
               (str && (flags & JSON_OPTS_SCALAR_STRINGS));
    case JSON_OPT_INT:
    case JSON_OPT_UINT:
        return json_object_is_type(v, json_type_int) ||
               (str && (flags & JSON_OPTS_SCALAR_STRINGS));
    case JSON_OPT_OBJECT: return json_object_is_type(v, json_type_object);
    case JSON_OPT_ARRAY: return json_object_is_type(v, json_type_array);
    case JSON_OPT_ANY: return true;
    case JSON_OPT_REF:
        return !v || str || json_object_is_type(v, json_type_object);
    }
    return false;
}

const JsonOptSpec *json_opts_find(const JsonOptSpec *const *specs,
                                  size_t nspecs, const char *name)
{
    for (size_t i = 0; i < nspecs; i++) {
        for (const JsonOptSpec *a = specs[i]; a && a->name; a++) {
            if (strcmp(a->name, name) == 0) {
                return a;
            }
        }
    }
    return NULL;
}

char *json_opts_path(const char *prefix, const char *name)
{
    char *p;
    if (asprintf(&p, "%s%s%s", prefix, *prefix ? "." : "", name) < 0) {
        abort();
    }
    return p;
}

bool json_opts_check(struct json_object *obj, const JsonOptSpec *const *specs,
                     size_t nspecs, const char *prefix, unsigned flags,
                     Error **errp)
{
    for (size_t i = 0; i < nspecs; i++) {
        for (const JsonOptSpec *a = specs[i]; a && a->name; a++) {
            struct json_object *v;
            if (!json_object_object_get_ex(obj, a->name, &v)) {
                if (!a->optional) {
                    _cleanup_free_ char *p = json_opts_path(prefix, a->name);
                    error_setg(errp, "Parameter '%s' is missing", p);
                    return false;
                }
                continue;
            }
            if (!json_opt_type_ok(v, a->type, flags)) {
                _cleanup_free_ char *p = json_opts_path(prefix, a->name);
                error_setg(errp, "Invalid parameter type for '%s', expected: %s",
                           p, json_opt_type_name(a->type));
                return false;
            }
            if (a->type == JSON_OPT_UINT &&
                json_object_is_type(v, json_type_int) &&
                json_object_get_int64(v) < 0) {
                _cleanup_free_ char *p = json_opts_path(prefix, a->name);
                error_setg(errp, "Parameter '%s' expects uint64", p);
                return false;
            }
            if (a->type == JSON_OPT_OBJECT && a->members) {
                _cleanup_free_ char *p = json_opts_path(prefix, a->name);
                if (!json_opts_check(v, &a->members, 1, p, flags, errp)) {
                    return false;
                }
            }
        }
    }
    json_object_object_foreach(obj, key, val) {
        (void)val;
        if (!json_opts_find(specs, nspecs, key)) {
            _cleanup_free_ char *p = json_opts_path(prefix, key);
            error_setg(errp, "Parameter '%s' is unexpected", p);
            return false;
        }
    }
    return true;
}
