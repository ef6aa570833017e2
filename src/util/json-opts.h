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
#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

struct json_object;

/* The string member key of obj (owned by obj), or NULL. */
const char *json_opt_str(struct json_object *obj, const char *key);
/* The boolean member key of obj, or dflt. */
bool json_opt_bool(struct json_object *obj, const char *key, bool dflt);
/* The integer member key of obj, or dflt. */
int64_t json_opt_int(struct json_object *obj, const char *key, int64_t dflt);

/* ---- Member specs: what an options object may hold ----
 * One spec is an array of JsonOptSpec ended by {NULL}.  It is the single
 * description of a QMP command's arguments (qmp.h's QmpArgSpec is this
 * type), of a block driver's open options (block.h) and of the members
 * query-qmp-schema lists. */
typedef enum JsonOptType {
    JSON_OPT_STR,
    JSON_OPT_BOOL,
    JSON_OPT_INT,       /* int64 */
    JSON_OPT_UINT,      /* uint64 (non-negative) */
    JSON_OPT_OBJECT,    /* members: its members (checked); NULL: any */
    JSON_OPT_ARRAY,
    JSON_OPT_ANY,
    JSON_OPT_REF,       /* a name (string), or an object the caller checks
                           itself (a block node's own options), or null */
} JsonOptType;

typedef struct JsonOptSpec {
    const char *name;
    JsonOptType type;
    bool optional;
    /* JSON_OPT_OBJECT: its members (NULL: a free-form object). */
    const struct JsonOptSpec *members;
    /* JSON_OPT_STR: the values it takes, NULL-ended, when they are a fixed
     * set (query-qmp-schema lists an enum); NULL: any string.  The value
     * itself is checked by the code that reads it. */
    const char *const *values;
} JsonOptSpec;

/* Flags of json_opts_check. */
#define JSON_OPTS_SCALAR_STRINGS 0x1  /* a string is accepted for a bool or
                                         int member (command-line values;
                                         the reader parses it) */

/* Check obj's members against the union of the nspecs specs: a missing
 * required member, a mistyped one (at any depth of JSON_OPT_OBJECT members
 * with a spec) and a member no spec names fail with QEMU's GenericError
 * texts ("Parameter 'P' is missing", "Invalid parameter type for 'P',
 * expected: T", "Parameter 'P' is unexpected"), P the member's path below
 * prefix ("" at the top, "file" for the node's file child: "file.x"). */
bool json_opts_check(struct json_object *obj, const JsonOptSpec *const *specs,
                     size_t nspecs, const char *prefix, unsigned flags,
                     Error **errp);
/* A member's path: "prefix.name", or name when prefix is "" (caller
 * frees). */
char *json_opts_path(const char *prefix, const char *name);
/* The member named name in the nspecs specs, or NULL. */
const JsonOptSpec *json_opts_find(const JsonOptSpec *const *specs,
                                  size_t nspecs, const char *name);

#endif
