/*
 * keyval: QEMU's dotted key=value option syntax -> json-c objects.
 *
 * qemu-storage-daemon reads --blockdev, --nbd-server, --export and friends
 * in this form; bitbackd must accept the same strings.  Parsing runs in two
 * passes: the first builds nested objects from the dotted keys (every value
 * a string), the second turns objects whose keys are all list indexes into
 * arrays.  See keyval.h for the numbered rules; error messages name the
 * parameter so that the daemon can report "--export: ...".
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "util/cleanup.h"
#include "util/keyval.h"

/* Longest option string we parse: bounds every allocation below. */
#define KEYVAL_MAX_LEN (1024 * 1024)
#define KEYVAL_MAX_DEPTH 32        /* nesting of a JSON option */

static bool keyval_fragment_char(char c)
{
    return isalnum((unsigned char)c) || c == '_' || c == '-';
}

/* Read a value starting at *ps up to an unescaped ',' (rule 1).  Advances *ps
 * past the terminating ',' (if any).  Returns a malloc'd string. */
static char *keyval_read_value(const char **ps)
{
    const char *s = *ps;
    size_t cap = strlen(s) + 1;
    char *out = malloc(cap);
    size_t n = 0;

    if (!out) {
        abort();
    }
    while (*s) {
        if (*s == ',') {
            if (s[1] == ',') {
                out[n++] = ',';
                s += 2;
                continue;
            }
            s++;        /* the separator */
            break;
        }
        out[n++] = *s++;
    }
    out[n] = '\0';
    *ps = s;
    return out;
}

/* Store value (a string) at the dotted key (rule 2 and 5). */
static bool keyval_put(struct json_object *root, const char *key,
                       const char *value, Error **errp)
{
    struct json_object *obj = root;
    const char *frag = key;

    for (;;) {
        const char *end = frag;
        while (keyval_fragment_char(*end)) {
            end++;
        }
        if (end == frag || (*end != '.' && *end != '\0')) {
            error_setg(errp, "Invalid parameter '%s'", key);
            return false;
        }
        _cleanup_free_ char *name = strndup(frag, end - frag);
        if (!name) {
            abort();
        }
        struct json_object *old = NULL;
        bool have = json_object_object_get_ex(obj, name, &old);

        if (*end == '\0') {
            if (have && json_object_is_type(old, json_type_object)) {
                error_setg(errp, "Parameters '%.*s.*' used inconsistently",
                           (int)(end - key), key);
                return false;
            }
            json_object_object_add(obj, name, json_object_new_string(value));
            return true;
        }
        if (have && !json_object_is_type(old, json_type_object)) {
            error_setg(errp, "Parameters '%.*s.*' used inconsistently",
                       (int)(end - key), key);
            return false;
        }
        if (!have) {
            old = json_object_new_object();
            json_object_object_add(obj, name, old);
        }
        obj = old;
        frag = end + 1;
    }
}

/* Is name a canonical list index ("0", "1", "17"; no sign, no leading 0)?
 * Sets *ret_index. */
static bool keyval_is_index(const char *name, size_t *ret_index)
{
    if (!isdigit((unsigned char)name[0]) ||
        (name[0] == '0' && name[1] != '\0') || strlen(name) > 9) {
        return false;
    }
    for (const char *p = name; *p; p++) {
        if (!isdigit((unsigned char)*p)) {
            return false;
        }
    }
    *ret_index = strtoul(name, NULL, 10);
    return true;
}

/* Rule 3: replace *pobj by an array when all its keys are indexes.
 * path is the dotted key of *pobj ("" at the top). */
static bool keyval_listify(struct json_object **pobj, const char *path,
                           Error **errp)
{
    struct json_object *obj = *pobj;
    size_t nkeys = 0, nindex = 0, idx;

    json_object_object_foreach(obj, name, child) {
        nkeys++;
        if (keyval_is_index(name, &idx)) {
            nindex++;
        }
        if (json_object_is_type(child, json_type_object)) {
            _cleanup_free_ char *sub = NULL;
            if (asprintf(&sub, "%s%s%s", path, *path ? "." : "", name) < 0) {
                abort();
            }
            struct json_object *newchild = child;
            if (!keyval_listify(&newchild, sub, errp)) {
                return false;
            }
            if (newchild != child) {
                /* Replacing the value of the current key is safe during
                 * iteration: json-c keeps the entry, only its value changes. */
                json_object_object_add(obj, name, newchild);
            }
        }
    }
    if (nindex == 0 || *path == '\0') {
        if (nindex && *path == '\0') {
            error_setg(errp, "Invalid parameter '%s'", "0");
            return false;
        }
        return true;
    }
    if (nindex != nkeys) {
        error_setg(errp, "Parameter '%s' mixes list indexes and names", path);
        return false;
    }
    struct json_object *arr = json_object_new_array_ext(nkeys);
    for (size_t i = 0; i < nkeys; i++) {
        char idx_name[24];
        struct json_object *elem;
        snprintf(idx_name, sizeof(idx_name), "%zu", i);
        if (!json_object_object_get_ex(obj, idx_name, &elem)) {
            error_setg(errp, "Parameter '%s.%zu' missing", path, i);
            json_object_put(arr);
            return false;
        }
        json_object_array_add(arr, json_object_get(elem));
    }
    /* obj itself is released by the caller when it stores arr in its
     * place (the parent holds the only reference). */
    *pobj = arr;
    return true;
}

struct json_object *keyval_parse(const char *params, const char *implied_key,
                                 Error **errp)
{
    if (strlen(params) > KEYVAL_MAX_LEN) {
        error_setg(errp, "Option string too long (over %d bytes)",
                   KEYVAL_MAX_LEN);
        return NULL;
    }
    _cleanup_json_ struct json_object *root = json_object_new_object();
    const char *s = params;
    bool first = true;

    while (*s) {
        const char *key_start = s;
        while (*s && *s != '=' && *s != ',') {
            s++;
        }
        _cleanup_free_ char *key = NULL;
        _cleanup_free_ char *value = NULL;
        if (*s == '=') {
            key = strndup(key_start, s - key_start);
            s++;
            value = keyval_read_value(&s);
        } else if (first && implied_key) {
            key = strdup(implied_key);
            s = key_start;
            value = keyval_read_value(&s);
        } else {
            error_setg(errp, "Expected '=' after parameter '%.*s'",
                       (int)(s - key_start), key_start);
            return NULL;
        }
        if (!key) {
            abort();
        }
        if (!keyval_put(root, key, value, errp)) {
            return NULL;
        }
        first = false;
    }
    if (!keyval_listify(&root, "", errp)) {
        return NULL;
    }
    return steal_pointer(&root);
}

struct json_object *keyval_parse_or_json(const char *arg,
                                         const char *implied_key, Error **errp)
{
    if (arg[0] != '{') {
        return keyval_parse(arg, implied_key, errp);
    }
    size_t len = strlen(arg);
    if (len > KEYVAL_MAX_LEN) {
        error_setg(errp, "JSON option too long (at most %d bytes)",
                   KEYVAL_MAX_LEN);
        return NULL;
    }
    struct json_tokener *tok = json_tokener_new_ex(KEYVAL_MAX_DEPTH);
    if (!tok) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    struct json_object *obj = json_tokener_parse_ex(tok, arg, (int)len);
    enum json_tokener_error jerr = json_tokener_get_error(tok);
    size_t end = json_tokener_get_parse_end(tok);
    json_tokener_free(tok);
    if (obj && jerr == json_tokener_success &&
        arg[end + strspn(arg + end, " \t\r\n")] != '\0') {
        json_object_put(obj);
        error_setg(errp, "JSON parse error, text after the object");
        return NULL;
    }
    if (!obj || jerr != json_tokener_success) {
        json_object_put(obj);
        error_setg(errp, "JSON parse error, %s",
                   jerr == json_tokener_continue ? "unexpected end of input"
                                                 : json_tokener_error_desc(jerr));
        return NULL;
    }
    if (!json_object_is_type(obj, json_type_object)) {
        json_object_put(obj);
        error_setg(errp, "JSON option must be an object");
        return NULL;
    }
    return obj;
}

bool keyval_str_to_bool(const char *s, bool *ret)
{
    static const char *const yes[] = { "on", "yes", "true" };
    static const char *const no[] = { "off", "no", "false" };

    for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
        if (strcmp(s, yes[i]) == 0) {
            *ret = true;
            return true;
        }
        if (strcmp(s, no[i]) == 0) {
            *ret = false;
            return true;
        }
    }
    return false;
}

bool keyval_member_bool(struct json_object *obj, const char *key, bool dflt,
                        bool *ret)
{
    struct json_object *v;
    *ret = dflt;
    if (!json_object_object_get_ex(obj, key, &v) || !v) {
        return true;
    }
    if (json_object_is_type(v, json_type_boolean)) {
        *ret = json_object_get_boolean(v);
        return true;
    }
    return json_object_is_type(v, json_type_string) &&
           keyval_str_to_bool(json_object_get_string(v), ret);
}

bool keyval_str_to_int(const char *s, int64_t *ret)
{
    char *end;
    long long v;

    if (!*s || isspace((unsigned char)*s)) {
        return false;
    }
    errno = 0;
    v = strtoll(s, &end, 0);
    if (errno || *end) {
        return false;
    }
    *ret = v;
    return true;
}
