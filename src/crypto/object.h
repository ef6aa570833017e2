/*
 * User-creatable objects: QEMU's --object and object-add / object-del for
 * the types bitbackd needs: tls-creds-x509, tls-creds-psk (tls-creds.h),
 * authz-simple and authz-list (authz.h), iothread (iothread.h) and secret
 * (secret.h).
 *
 * Properties come as one json-c object, {"qom-type": TYPE, "id": ID, ...}
 * (QMP object-add's flat form; --object's keyval gives strings, which the
 * typed properties also accept: "on"/"off" for booleans).  An object is
 * checked completely when it is created (files readable, certificates and
 * keys parse), so a bad one is refused there, never at first use.
 *
 * Threads: objects are added, looked up, referenced and deleted on the
 * main thread only.  A user (the NBD server, an nbd node) takes a
 * reference with tls_creds_get / authz_get and may then use the object
 * from any thread until it drops it; object_del refuses an object with
 * users, so nothing in use is ever freed.
 */
#ifndef BITBACK_CRYPTO_OBJECT_H
#define BITBACK_CRYPTO_OBJECT_H

#include <stdbool.h>
#include <json-c/json.h>
#include "util/error.h"
#include "util/json-opts.h"

typedef struct Object Object;

/* Create the object props describes and register it under its id.
 * false with errp set: unknown qom-type, missing or taken id, unknown or
 * mistyped property, or the type's own checks (tls-creds.h, authz.h). */
bool object_add(struct json_object *props, Error **errp);
/* Delete an object; fails for an unknown id or an object in use. */
bool object_del(const char *id, Error **errp);
/* Delete every object (daemon exit); objects still in use are kept. */
void object_del_all(void);

/* The i-th object type object_add takes: its qom-type in *ret_type and
 * its properties besides qom-type and id; NULL after the last. */
const JsonOptSpec *object_class_get(size_t i, const char **ret_type);

/* The object registered under id, or NULL. */
Object *object_find(const char *id);
/* Its qom-type ("tls-creds-x509", ...) and its type's state. */
const char *object_type(const Object *o);
void *object_impl(const Object *o);
/* Count a user of o (object_del refuses it until the last unref). */
void object_ref(Object *o);
void object_unref(Object *o);

#endif
