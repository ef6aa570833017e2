/*
 * The registry of user-creatable objects (object.h): a list of (id, type,
 * state, users), on the main thread only.  Each type is a class: its
 * qom-type name, the properties it takes, its constructor and destructor.
 * Property checks follow QEMU's messages ("Property 'T.P' not found").
 */
#include <stdlib.h>
#include <string.h>

#include "crypto/crypto-internal.h"
#include "crypto/object.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/json-opts.h"
#include "util/keyval.h"

typedef struct ObjectClass {
    const char *type;
    const JsonOptSpec *props;      /* besides qom-type and id */
    void *(*create)(const char *id, struct json_object *props, Error **errp);
    void (*destroy)(void *impl);
} ObjectClass;

struct Object {
    char *id;
    const ObjectClass *cls;
    void *impl;
    unsigned users;
    Object *next;
};

/* The properties of each type besides qom-type and id, with the types
 * object_prop_* read them as (query-qmp-schema lists them). */
static const char *const endpoint_values[] = { "client", "server", NULL };
static const JsonOptSpec x509_props[] = {
    { "dir", JSON_OPT_STR, true },
    { "endpoint", JSON_OPT_STR, true, NULL, endpoint_values },
    { "verify-peer", JSON_OPT_BOOL, true },
    { "priority", JSON_OPT_STR, true },
    { "sanity-check", JSON_OPT_BOOL, true },
    { "loaded", JSON_OPT_BOOL, true },
    { NULL },
};
static const JsonOptSpec psk_props[] = {
    { "dir", JSON_OPT_STR, true },
    { "endpoint", JSON_OPT_STR, true, NULL, endpoint_values },
    { "username", JSON_OPT_STR, true },
    { "priority", JSON_OPT_STR, true },
    { "verify-peer", JSON_OPT_BOOL, true },
    { "loaded", JSON_OPT_BOOL, true },
    { NULL },
};
static const JsonOptSpec authz_simple_props[] = {
    { "identity", JSON_OPT_STR, true },
    { NULL },
};
static const char *const policy_values[] = { "allow", "deny", NULL };
static const JsonOptSpec authz_list_props[] = {
    { "policy", JSON_OPT_STR, true, NULL, policy_values },
    { "rules", JSON_OPT_ARRAY, true },
    { NULL },
};
static const JsonOptSpec iothread_props[] = {
    { "poll-max-ns", JSON_OPT_INT, true },
    { "poll-grow", JSON_OPT_INT, true },
    { "poll-shrink", JSON_OPT_INT, true },
    { "aio-max-batch", JSON_OPT_INT, true },
    { "thread-pool-min", JSON_OPT_INT, true },
    { "thread-pool-max", JSON_OPT_INT, true },
    { NULL },
};
static const char *const secret_format_values[] = { "raw", "base64", NULL };
static const JsonOptSpec secret_props[] = {
    { "data", JSON_OPT_STR, true },
    { "file", JSON_OPT_STR, true },
    { "format", JSON_OPT_STR, true, NULL, secret_format_values },
    { "keyid", JSON_OPT_STR, true },
    { "iv", JSON_OPT_STR, true },
    { "loaded", JSON_OPT_BOOL, true },
    { NULL },
};

static const ObjectClass object_classes[] = {
    { "tls-creds-x509", x509_props, tls_creds_x509_new, tls_creds_free },
    { "tls-creds-psk", psk_props, tls_creds_psk_new, tls_creds_free },
    { "authz-simple", authz_simple_props, authz_simple_new, authz_free },
    { "authz-list", authz_list_props, authz_list_new, authz_free },
    { "iothread", iothread_props, iothread_new, iothread_free },
    { "secret", secret_props, secret_new, secret_free },
};

static Object *objects;

bool object_prop_str(struct json_object *props, const char *key,
                     const char *dflt, const char **ret, Error **errp)
{
    struct json_object *v;
    *ret = dflt;
    if (!json_object_object_get_ex(props, key, &v)) {
        return true;
    }
    if (!json_object_is_type(v, json_type_string)) {
        error_setg(errp, "Invalid parameter type for '%s', expected: string",
                   key);
        return false;
    }
    *ret = json_object_get_string(v);
    return true;
}

bool object_prop_bool(struct json_object *props, const char *key, bool dflt,
                      bool *ret, Error **errp)
{
    if (keyval_member_bool(props, key, dflt, ret)) {
        return true;
    }
    error_setg(errp, "Invalid parameter type for '%s', expected: boolean", key);
    return false;
}

bool object_prop_int(struct json_object *props, const char *key,
                     int64_t dflt, int64_t *ret, Error **errp)
{
    struct json_object *v;
    *ret = dflt;
    if (!json_object_object_get_ex(props, key, &v)) {
        return true;
    }
    if (json_object_is_type(v, json_type_int)) {
        *ret = json_object_get_int64(v);
        return true;
    }
    if (json_object_is_type(v, json_type_string) &&
        keyval_str_to_int(json_object_get_string(v), ret)) {
        return true;
    }
    *ret = dflt;
    error_setg(errp, "Invalid parameter type for '%s', expected: integer", key);
    return false;
}

static const ObjectClass *object_class_find(const char *type)
{
    for (size_t i = 0; i < ARRAY_SIZE(object_classes); i++) {
        if (strcmp(object_classes[i].type, type) == 0) {
            return &object_classes[i];
        }
    }
    return NULL;
}

/* Refuse a property cls does not take. */
static bool object_check_props(const ObjectClass *cls,
                               struct json_object *props, Error **errp)
{
    json_object_object_foreach(props, key, val) {
        (void)val;
        if (strcmp(key, "qom-type") == 0 || strcmp(key, "id") == 0) {
            continue;
        }
        if (!json_opts_find(&cls->props, 1, key)) {
            error_setg(errp, "Property '%s.%s' not found", cls->type, key);
            return false;
        }
    }
    return true;
}

Object *object_find(const char *id)
{
    for (Object *o = objects; o; o = o->next) {
        if (strcmp(o->id, id) == 0) {
            return o;
        }
    }
    return NULL;
}

bool object_add(struct json_object *props, Error **errp)
{
    const char *type, *id;
    if (!json_object_is_type(props, json_type_object) ||
        !object_prop_str(props, "qom-type", NULL, &type, errp) ||
        !object_prop_str(props, "id", NULL, &id, errp)) {
        if (errp && !*errp) {
            error_setg(errp, "object properties must be an object");
        }
        return false;
    }
    if (!type) {
        error_setg(errp, "Parameter 'qom-type' is missing");
        return false;
    }
    if (!id) {
        error_setg(errp, "Parameter 'id' is missing");
        return false;
    }
    const ObjectClass *cls = object_class_find(type);
    if (!cls) {
        error_setg(errp, "Invalid parameter type for 'qom-type', expected: "
                   "one of tls-creds-x509, tls-creds-psk, authz-simple, "
                   "authz-list, iothread, secret (not '%s')", type);
        return false;
    }
    if (!*id || object_find(id)) {
        error_setg(errp, *id ? "attempt to add duplicate property '%s' to "
                   "object (type 'container')" : "Invalid object id '%s'", id);
        return false;
    }
    if (!object_check_props(cls, props, errp)) {
        return false;
    }
    Object *o = calloc(1, sizeof(*o));
    if (!o || !(o->id = strdup(id))) {
        free(o);
        error_setg(errp, "out of memory");
        return false;
    }
    o->impl = cls->create(id, props, errp);
    if (!o->impl) {
        free(o->id);
        free(o);
        return false;
    }
    o->cls = cls;
    o->next = objects;
    objects = o;
    return true;
}

static void object_free(Object *o)
{
    o->cls->destroy(o->impl);
    free(o->id);
    free(o);
}

bool object_del(const char *id, Error **errp)
{
    for (Object **pp = &objects; *pp; pp = &(*pp)->next) {
        Object *o = *pp;
        if (strcmp(o->id, id) != 0) {
            continue;
        }
        if (__atomic_load_n(&o->users, __ATOMIC_ACQUIRE)) {
            error_setg(errp, "object '%s' is in use, can not be deleted", id);
            return false;
        }
        *pp = o->next;
        object_free(o);
        return true;
    }
    error_setg(errp, "object '%s' not found", id);
    return false;
}

void object_del_all(void)
{
    Object **pp = &objects;
    while (*pp) {
        Object *o = *pp;
        if (__atomic_load_n(&o->users, __ATOMIC_ACQUIRE)) {
            pp = &o->next;
            continue;
        }
        *pp = o->next;
        object_free(o);
    }
}

const char *object_type(const Object *o)
{
    return o->cls->type;
}

void *object_impl(const Object *o)
{
    return o->impl;
}

size_t object_list_impls(const char *type, void **ret, size_t max)
{
    size_t n = 0;
    for (Object *o = objects; o; o = o->next) {
        if (strcmp(o->cls->type, type) == 0) {
            if (n < max) {
                ret[n] = o->impl;
            }
            n++;
        }
    }
    return n;
}

void object_ref(Object *o)
{
    __atomic_fetch_add(&o->users, 1, __ATOMIC_RELEASE);
}

void object_unref(Object *o)
{
    __atomic_fetch_sub(&o->users, 1, __ATOMIC_RELEASE);
}

const JsonOptSpec *object_class_get(size_t i, const char **ret_type)
{
    if (i >= ARRAY_SIZE(object_classes)) {
        return NULL;
    }
    *ret_type = object_classes[i].type;
    return object_classes[i].props;
}
