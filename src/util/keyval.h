/*
 * Dotted key=value option strings, as qemu-storage-daemon's command line
 * takes them (QEMU's keyval syntax), turned into json-c objects.
 *
 *   driver=qbm,node-name=d0,file.driver=file,file.filename=a,,b.qbm
 *   -> {"driver":"qbm","node-name":"d0",
 *       "file":{"driver":"file","filename":"a,b.qbm"}}
 *
 * Rules:
 *   1. Parameters are separated by ','; inside a value ",," is a literal ','.
 *   2. A key is one or more fragments [A-Za-z0-9_-]+ separated by '.';
 *      each '.' opens a nested object.
 *   3. When every key of an object is a decimal index (0, 1, ...), the
 *      object becomes an array; the indexes must run 0..n-1 without gaps.
 *   4. Values stay strings: callers convert to bool/int where their schema
 *      says so (keyval_str_to_bool and friends).
 *   5. The same key given twice: the last value wins.  A key used both as a
 *      value and as an object ("a=1,a.b=2") is an error.
 *   6. With an implied key, a first parameter without '=' is the value of
 *      that key (--chardev socket,... -> {"backend":"socket",...}).
 */
#ifndef BITBACK_KEYVAL_H
#define BITBACK_KEYVAL_H

#include <stdbool.h>
#include <stdint.h>
#include <json-c/json.h>
#include "util/error.h"

/* Parse params; implied_key may be NULL.  Returns a new object or NULL with
 * errp set (the message names the offending parameter). */
struct json_object *keyval_parse(const char *params, const char *implied_key,
                                 Error **errp);

/* JSON when arg starts with '{' (it must be one object), keyval otherwise. */
struct json_object *keyval_parse_or_json(const char *arg,
                                         const char *implied_key, Error **errp);

/* "on"/"yes"/"true" -> true, "off"/"no"/"false" -> false.  False on other
 * strings (ret untouched). */
bool keyval_str_to_bool(const char *s, bool *ret);
/* The boolean member key of obj: a JSON boolean or a string
 * keyval_str_to_bool takes.  Absent or null: *ret = dflt.  False (*ret =
 * dflt) when the member has another type or value; the caller says so in
 * its own words. */
bool keyval_member_bool(struct json_object *obj, const char *key, bool dflt,
                        bool *ret);
/* Decimal (or 0x hex) integer that fits int64_t, nothing after it. */
bool keyval_str_to_int(const char *s, int64_t *ret);

#endif
