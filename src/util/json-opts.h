/*
 * Getters for members of a json-c options object (block options, QMP
 * arguments) that a schema or the caller has already checked, or that the
 * caller treats as absent when mistyped: each returns its default (NULL
 * for strings) when obj is NULL, the member is absent, or the member has
 * another type.  No errors: callers that must refuse a mistyped member
 * check it first (qmp_check_args, bdrv_check_create_opts).
 */
#ifndef BITBACK_JSON_OPTS_H
#define BITBACK_JSON_OPTS_H

#include <stdbool.h>
#include <stdint.h>

struct json_object;

/* The string member key of obj (owned by obj), or NULL. */
const char *json_opt_str(struct json_object *obj, const char *key);
/* The boolean member key of obj, or dflt. */
bool json_opt_bool(struct json_object *obj, const char *key, bool dflt);
/* The integer member key of obj, or dflt. */
int64_t json_opt_int(struct json_object *obj, const char *key, int64_t dflt);

#endif
