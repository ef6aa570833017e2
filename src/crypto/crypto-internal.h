/*
 * What the object types of src/crypto share with the registry (object.c):
 * each type's constructor and destructor, and the property readers they
 * use.  Not for other layers.
 */
#ifndef BITBACK_CRYPTO_INTERNAL_H
#define BITBACK_CRYPTO_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <json-c/json.h>
#include "util/error.h"

/* Constructors: the object's state, or NULL with errp set.  props holds
 * only the properties the type's class lists (object.c checked). */
void *tls_creds_x509_new(const char *id, struct json_object *props,
                         Error **errp);
void *tls_creds_psk_new(const char *id, struct json_object *props,
                        Error **errp);
void tls_creds_free(void *creds);
void *authz_simple_new(const char *id, struct json_object *props,
                       Error **errp);
void *authz_list_new(const char *id, struct json_object *props, Error **errp);
void authz_free(void *authz);
void *iothread_new(const char *id, struct json_object *props, Error **errp);
void iothread_free(void *iothread);
void *secret_new(const char *id, struct json_object *props, Error **errp);
void secret_free(void *secret);

/* Property readers: true with *ret set (to dflt when absent), false with
 * errp set when the member has the wrong type.  Booleans take JSON
 * booleans and keyval's strings ("on", "off", ...). */
bool object_prop_str(struct json_object *props, const char *key,
                     const char *dflt, const char **ret, Error **errp);
bool object_prop_int(struct json_object *props, const char *key,
                     int64_t dflt, int64_t *ret, Error **errp);
bool object_prop_bool(struct json_object *props, const char *key, bool dflt,
                      bool *ret, Error **errp);

/* The state of every object of qom-type type: stores at most max of them
 * in ret[] and returns how many there are. */
size_t object_list_impls(const char *type, void **ret, size_t max);

#endif
