/*
 * authz-simple and authz-list (authz.h).  State is fixed once created, so
 * connection threads read it without a lock while they hold a reference.
 */
#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>

#include "crypto/authz.h"
#include "crypto/crypto-internal.h"
#include "crypto/object.h"
#include "util/cleanup.h"

#define AUTHZ_MAX_RULES 1024

typedef struct AuthzRule {
    char *match;
    bool allow;
    bool glob;
} AuthzRule;

struct Authz {
    Object *obj;            /* set by authz_get (the registry owns us) */
    bool allow_default;     /* authz-list's policy */
    size_t nrules;
    AuthzRule *rules;       /* authz-simple: one exact allow rule */
};

void authz_free(void *opaque)
{
    Authz *a = opaque;
    if (!a) {
        return;
    }
    for (size_t i = 0; i < a->nrules; i++) {
        free(a->rules[i].match);
    }
    free(a->rules);
    free(a);
}

static void authz_freep(Authz **a)
{
    authz_free(*a);
}

/* "allow" -> true, "deny" -> false; anything else is an error. */
static bool authz_policy(const char *key, const char *s, bool *ret,
                         Error **errp)
{
    if (strcmp(s, "allow") == 0 || strcmp(s, "deny") == 0) {
        *ret = s[0] == 'a';
        return true;
    }
    error_setg(errp, "Parameter '%s' does not accept value '%s'", key, s);
    return false;
}

static Authz *authz_new(size_t nrules, Error **errp)
{
    Authz *a = calloc(1, sizeof(*a));
    if (a && nrules) {
        a->rules = calloc(nrules, sizeof(*a->rules));
    }
    if (!a || (nrules && !a->rules)) {
        free(a);
        error_setg(errp, "out of memory");
        return NULL;
    }
    return a;
}

void *authz_simple_new(const char *id, struct json_object *props, Error **errp)
{
    const char *identity;
    if (!object_prop_str(props, "identity", NULL, &identity, errp)) {
        return NULL;
    }
    if (!identity) {
        error_setg(errp, "authz-simple '%s': 'identity' is required", id);
        return NULL;
    }
    Authz *a = authz_new(1, errp);
    if (!a) {
        return NULL;
    }
    a->nrules = 1;
    a->rules[0] = (AuthzRule){ .match = strdup(identity), .allow = true };
    if (!a->rules[0].match) {
        authz_free(a);
        error_setg(errp, "out of memory");
        return NULL;
    }
    return a;
}

/* One member of authz-list's rules: {match, policy, format}. */
static bool authz_rule_parse(struct json_object *r, size_t i, AuthzRule *rule,
                             Error **errp)
{
    const char *match, *policy, *format;
    if (!json_object_is_type(r, json_type_object)) {
        error_setg(errp, "Invalid parameter type for 'rules[%zu]', expected: "
                   "object", i);
        return false;
    }
    if (!object_prop_str(r, "match", NULL, &match, errp) ||
        !object_prop_str(r, "policy", NULL, &policy, errp) ||
        !object_prop_str(r, "format", "exact", &format, errp)) {
        return false;
    }
    if (!match || !policy) {
        error_setg(errp, "Parameter 'rules[%zu].%s' is missing", i,
                   match ? "policy" : "match");
        return false;
    }
    if (!authz_policy("policy", policy, &rule->allow, errp)) {
        return false;
    }
    if (strcmp(format, "exact") != 0 && strcmp(format, "glob") != 0) {
        error_setg(errp, "Parameter 'format' does not accept value '%s'",
                   format);
        return false;
    }
    rule->glob = format[0] == 'g';
    rule->match = strdup(match);
    if (!rule->match) {
        error_setg(errp, "out of memory");
        return false;
    }
    return true;
}

void *authz_list_new(const char *id, struct json_object *props, Error **errp)
{
    const char *policy;
    struct json_object *rules = NULL;
    if (!object_prop_str(props, "policy", "deny", &policy, errp)) {
        return NULL;
    }
    json_object_object_get_ex(props, "rules", &rules);
    if (rules && !json_object_is_type(rules, json_type_array)) {
        error_setg(errp, "Invalid parameter type for 'rules', expected: array");
        return NULL;
    }
    size_t n = rules ? json_object_array_length(rules) : 0;
    if (n > AUTHZ_MAX_RULES) {
        error_setg(errp, "authz-list '%s': more than %d rules", id,
                   AUTHZ_MAX_RULES);
        return NULL;
    }
    _cleanup_(authz_freep) Authz *a = authz_new(n, errp);
    if (!a || !authz_policy("policy", policy, &a->allow_default, errp)) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (!authz_rule_parse(json_object_array_get_idx(rules, i), i,
                              &a->rules[i], errp)) {
            return NULL;
        }
        a->nrules++;
    }
    return steal_pointer(&a);
}

bool authz_is_allowed(const Authz *a, const char *identity)
{
    for (size_t i = 0; i < a->nrules; i++) {
        const AuthzRule *r = &a->rules[i];
        if (r->glob ? fnmatch(r->match, identity, 0) == 0
                    : strcmp(r->match, identity) == 0) {
            return r->allow;
        }
    }
    return a->allow_default;
}

Authz *authz_get(const char *id, Error **errp)
{
    Object *o = object_find(id);
    if (!o) {
        error_setg(errp, "No authorization object with id '%s'", id);
        return NULL;
    }
    if (strncmp(object_type(o), "authz-", 6) != 0) {
        error_setg(errp, "Object with id '%s' is not an authorization object",
                   id);
        return NULL;
    }
    Authz *a = object_impl(o);
    a->obj = o;
    object_ref(o);
    return a;
}

void authz_put(Authz *a)
{
    if (a) {
        object_unref(a->obj);
    }
}
