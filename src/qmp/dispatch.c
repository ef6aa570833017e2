/*
 * QMP command registry, argument checking and dispatch.
 *
 * A request is one JSON object {"execute": NAME, "arguments": {...},
 * "id": ANY}.  qmp_dispatch() validates its shape, finds the handler,
 * checks the arguments against the command's spec (QmpArgSpec) and turns
 * the result into {"return": R, "id": ID} or
 * {"error": {"class": C, "desc": D}, "id": ID}.  This file is the only place
 * where an Error becomes a QMP error object (DESIGN.md).
 *
 * Capabilities negotiation is per connection and lives in monitor.c; the
 * registry is filled at start-up and read-only afterwards, so no lock.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/qmp-internal.h"
#include "util/cleanup.h"
#include "util/json-opts.h"
#include "util/keyval.h"
#include "util/log.h"

typedef struct QmpCommand {
    char *name;
    QmpCommandFunc fn;
    const QmpArgSpec *spec;
    const QmpUnion *args_union;    /* the arguments are this union */
    bool union_checked;            /* dispatch checks them against it */
    const char *union_member;      /* the union is this member of spec */
    QmpArgPrecheck precheck;
} QmpCommand;

static QmpCommand *qmp_commands;
static size_t qmp_ncommands;

void qmp_register_command_checked(const char *name, QmpCommandFunc fn,
                                  const QmpArgSpec *spec,
                                  QmpArgPrecheck precheck)
{
    for (size_t i = 0; i < qmp_ncommands; i++) {
        if (strcmp(qmp_commands[i].name, name) == 0) {
            qmp_commands[i].fn = fn;      /* re-registration replaces */
            qmp_commands[i].spec = spec;
            qmp_commands[i].args_union = NULL;
            qmp_commands[i].union_checked = false;
            qmp_commands[i].union_member = NULL;
            qmp_commands[i].precheck = precheck;
            return;
        }
    }
    QmpCommand *n = realloc(qmp_commands, (qmp_ncommands + 1) * sizeof(*n));
    if (!n) {
        abort();
    }
    qmp_commands = n;
    qmp_commands[qmp_ncommands].name = strdup(name);
    qmp_commands[qmp_ncommands].fn = fn;
    qmp_commands[qmp_ncommands].spec = spec;
    qmp_commands[qmp_ncommands].args_union = NULL;
    qmp_commands[qmp_ncommands].union_checked = false;
    qmp_commands[qmp_ncommands].union_member = NULL;
    qmp_commands[qmp_ncommands].precheck = precheck;
    if (!qmp_commands[qmp_ncommands].name) {
        abort();
    }
    qmp_ncommands++;
}

void qmp_register_command_spec(const char *name, QmpCommandFunc fn,
                               const QmpArgSpec *spec)
{
    qmp_register_command_checked(name, fn, spec, NULL);
}

void qmp_register_command(const char *name, QmpCommandFunc fn)
{
    qmp_register_command_spec(name, fn, NULL);
}

static const QmpCommand *qmp_find_command(const char *name)
{
    for (size_t i = 0; i < qmp_ncommands; i++) {
        if (strcmp(qmp_commands[i].name, name) == 0) {
            return &qmp_commands[i];
        }
    }
    return NULL;
}

const QmpArgSpec qmp_spec_none[] = {
    { NULL },
};

static QmpCommand *qmp_find_registered(const char *name)
{
    QmpCommand *c = (QmpCommand *)qmp_find_command(name);
    if (!c) {
        abort();  /* a programming error: register the command first */
    }
    return c;
}

void qmp_set_command_schema(const char *name, const char *member,
                            const QmpUnion *u)
{
    QmpCommand *c = qmp_find_registered(name);
    c->args_union = u;
    c->union_member = member;
}

void qmp_register_command_union(const char *name, QmpCommandFunc fn,
                                const QmpUnion *u, QmpArgPrecheck precheck)
{
    qmp_register_command_checked(name, fn, NULL, precheck);
    QmpCommand *c = qmp_find_registered(name);
    c->args_union = u;
    c->union_checked = true;
}

const QmpArgSpec *qmp_union_find(const QmpUnion *u, const char *name)
{
    const char *case_name;
    const QmpArgSpec *members;
    for (size_t i = 0; (members = u->variant(i, &case_name)); i++) {
        if (strcmp(case_name, name) == 0) {
            return members;
        }
    }
    return NULL;
}

size_t qmp_command_count(void)
{
    return qmp_ncommands;
}

const char *qmp_command_get(size_t i, const QmpArgSpec **ret_spec,
                            const QmpUnion **ret_union,
                            const char **ret_member)
{
    const QmpCommand *c = &qmp_commands[i];
    *ret_spec = c->spec;
    *ret_union = c->args_union;
    *ret_member = c->union_member;
    return c->name;
}

/* Check (after converting keyval strings, from_keyval) args against the
 * union u: the common members, the tag's case and that case's members. */
static bool qmp_check_union_args(struct json_object *args, const QmpUnion *u,
                                 bool from_keyval, Error **errp)
{
    const QmpArgSpec *specs[2] = { u->common, NULL };
    const char *tag = json_opt_str(args, u->tag);
    if (tag && !(specs[1] = qmp_union_find(u, tag))) {
        error_setg(errp, "Parameter '%s' does not accept value '%s'", u->tag,
                   tag);
        return false;
    }
    for (size_t i = 0; i < ARRAY_SIZE(specs); i++) {
        if (from_keyval && specs[i] &&
            !qmp_coerce_keyval_args(args, specs[i], errp)) {
            return false;
        }
    }
    return json_opts_check(args, specs, ARRAY_SIZE(specs), "", 0, errp);
}

/* query-commands: [{"name": ...}, ...] */
struct json_object *qmp_query_commands_list(void)
{
    struct json_object *arr = json_object_new_array();
    for (size_t i = 0; i < qmp_ncommands; i++) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "name",
                               json_object_new_string(qmp_commands[i].name));
        json_object_array_add(arr, o);
    }
    return arr;
}

void *qmp_array_alloc(size_t n, size_t max, size_t elem_size,
                      const char *what, Error **errp)
{
    if (n > max) {
        error_setg(errp, "Too many %s (at most %zu)", what, max);
        return NULL;
    }
    void *a = calloc(n ? n : 1, elem_size);
    if (!a) {
        abort();
    }
    return a;
}

bool qmp_check_args(struct json_object *args, const QmpArgSpec *spec,
                    Error **errp)
{
    return json_opts_check(args, &spec, 1, "", 0, errp);
}

bool qmp_coerce_keyval_args(struct json_object *args, const QmpArgSpec *spec,
                            Error **errp)
{
    for (const QmpArgSpec *a = spec; a->name; a++) {
        struct json_object *v;
        if (!json_object_object_get_ex(args, a->name, &v) ||
            !json_object_is_type(v, json_type_string)) {
            continue;
        }
        const char *s = json_object_get_string(v);
        if (a->type == QMP_ARG_BOOL) {
            bool b;
            if (!keyval_str_to_bool(s, &b)) {
                error_setg(errp, "Parameter '%s' expects 'on' or 'off'",
                           a->name);
                return false;
            }
            json_object_object_add(args, a->name, json_object_new_boolean(b));
        } else if (a->type == QMP_ARG_INT || a->type == QMP_ARG_UINT) {
            int64_t i;
            if (!keyval_str_to_int(s, &i)) {
                error_setg(errp, "Parameter '%s' expects an integer", a->name);
                return false;
            }
            json_object_object_add(args, a->name, json_object_new_int64(i));
        }
    }
    return true;
}

bool qmp_arg_has(struct json_object *args, const char *name)
{
    return json_object_object_get_ex(args, name, NULL);
}

/* Refuse any string in v (at any depth) that holds a NUL byte: C code
 * sees such a string cut at the NUL, so "b\u0000x" would silently name
 * bitmap "b" (or a node, a file ...).  path names v in the message. */
static bool qmp_check_no_nul(struct json_object *v, const char *path,
                             Error **errp)
{
    switch (json_object_get_type(v)) {
    case json_type_string:
        if (strlen(json_object_get_string(v)) !=
            (size_t)json_object_get_string_len(v)) {
            error_setg(errp, "Parameter '%s' must not contain a NUL character",
                       path);
            return false;
        }
        return true;
    case json_type_object: {
        json_object_object_foreach(v, key, val) {
            _cleanup_free_ char *sub = NULL;
            if (asprintf(&sub, "%s%s%s", path, *path ? "." : "", key) < 0) {
                abort();
            }
            if (!qmp_check_no_nul(val, sub, errp)) {
                return false;
            }
        }
        return true;
    }
    case json_type_array:
        for (size_t i = 0; i < json_object_array_length(v); i++) {
            _cleanup_free_ char *sub = NULL;
            if (asprintf(&sub, "%s[%zu]", path, i) < 0) {
                abort();
            }
            if (!qmp_check_no_nul(json_object_array_get_idx(v, i), sub, errp)) {
                return false;
            }
        }
        return true;
    default:
        return true;
    }
}

struct json_object *qmp_execute(const char *name, struct json_object *args,
                                bool from_keyval, Error **errp)
{
    const QmpCommand *cmd = qmp_find_command(name);
    if (!cmd) {
        error_set(errp, ERROR_CLASS_COMMAND_NOT_FOUND,
                  "The command %s has not been found", name);
        return NULL;
    }
    if (!qmp_check_no_nul(args, "", errp)) {
        return NULL;
    }
    if (cmd->precheck && !cmd->precheck(args, errp)) {
        return NULL;
    }
    if (cmd->union_checked &&
        !qmp_check_union_args(args, cmd->args_union, from_keyval, errp)) {
        return NULL;
    }
    if (cmd->spec) {
        if (from_keyval && !qmp_coerce_keyval_args(args, cmd->spec, errp)) {
            return NULL;
        }
        if (!qmp_check_args(args, cmd->spec, errp)) {
            return NULL;
        }
    }
    return cmd->fn(args, errp);
}

static struct json_object *qmp_error_reply(Error *err)
{
    struct json_object *reply = json_object_new_object();
    struct json_object *e = json_object_new_object();
    json_object_object_add(e, "class", json_object_new_string(
                               error_class_name(error_get_class(err))));
    json_object_object_add(e, "desc",
                           json_object_new_string(error_get_pretty(err)));
    json_object_object_add(reply, "error", e);
    error_free(err);
    return reply;
}

/* Check the request's own members; returns the command name or NULL. */
static const char *qmp_check_request(struct json_object *request,
                                     struct json_object **ret_args,
                                     Error **errp)
{
    struct json_object *exec = NULL;

    *ret_args = NULL;
    if (!json_object_is_type(request, json_type_object)) {
        error_setg(errp, "QMP input must be a JSON object");
        return NULL;
    }
    json_object_object_foreach(request, key, val) {
        if (strcmp(key, "execute") == 0) {
            if (!json_object_is_type(val, json_type_string) ||
                !qmp_check_no_nul(val, "execute", NULL)) {
                error_setg(errp, "QMP input member 'execute' must be a string");
                return NULL;
            }
            exec = val;
        } else if (strcmp(key, "arguments") == 0) {
            if (!json_object_is_type(val, json_type_object)) {
                error_setg(errp,
                           "QMP input member 'arguments' must be an object");
                return NULL;
            }
            *ret_args = val;
        } else if (strcmp(key, "id") != 0) {
            error_setg(errp, "QMP input member '%s' is unexpected", key);
            return NULL;
        }
    }
    if (!exec) {
        error_setg(errp, "QMP input lacks member 'execute'");
        return NULL;
    }
    return json_object_get_string(exec);
}

struct json_object *qmp_dispatch(struct json_object *request)
{
    Error *err = NULL;
    struct json_object *args = NULL, *reply, *ret, *id = NULL;
    const char *name = qmp_check_request(request, &args, &err);

    if (json_object_is_type(request, json_type_object)) {
        json_object_object_get_ex(request, "id", &id);
    }
    if (!name) {
        log_msg(LOG_LEVEL_WARNING, "QMP request refused: %s",
                error_get_pretty(err));
        reply = qmp_error_reply(err);
    } else {
        _cleanup_json_ struct json_object *empty = NULL;
        if (!args) {
            args = empty = json_object_new_object();
        }
        ret = qmp_execute(name, args, false, &err);
        if (ret) {
            reply = json_object_new_object();
            json_object_object_add(reply, "return", ret);
        } else {
            if (!err) {
                error_setg(&err, "Command %s failed", name);
            }
            log_msg(LOG_LEVEL_WARNING, "QMP command '%s' failed: %s", name,
                    error_get_pretty(err));
            reply = qmp_error_reply(err);
        }
    }
    if (id) {
        json_object_object_add(reply, "id", json_object_get(id));
    }
    return reply;
}
