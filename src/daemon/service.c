/*
 * bitbackd as a service (service.h): readiness and stopping notices with
 * libsystemd's sd_notify, sockets from systemd socket activation with
 * sd_listen_fds_with_names, and `--config FILE`, the option file a unit
 * passes (bitbackd@.service: --config /etc/bitback/%i.conf).
 *
 * Activated sockets are only registered here: an option uses one by
 * naming it (--nbd-server addr.type=fd,addr.str=nbd, --chardev
 * socket,id=m0,fd=qmp,server=on), as with qemu-storage-daemon, where the
 * fd is a number.  A passed socket no option uses gets a warning, so a
 * unit and its config that disagree are seen in the journal.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <systemd/sd-daemon.h>

#include "daemon/service.h"
#include "util/listen-fds.h"
#include "util/log.h"
#include "util/optfile.h"

bool service_listen_fds_init(Error **errp)
{
    char **names = NULL;
    /* unset_environment=1: nothing started later inherits them. */
    int n = sd_listen_fds_with_names(1, &names);
    if (n < 0) {
        error_setg(errp, "LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES: %s",
                   strerror(-n));
        return false;
    }
    bool ok = true;
    for (int i = 0; i < n; i++) {
        const char *name = names ? names[i] : NULL;
        /* systemd's default name for an unnamed socket is "unknown" */
        if (name && strcmp(name, "unknown") == 0) {
            name = NULL;
        }
        if (ok && !listen_fds_register(SD_LISTEN_FDS_START + i, name, errp)) {
            ok = false;
        }
    }
    if (names) {
        for (int i = 0; i < n; i++) {
            free(names[i]);
        }
        free(names);
    }
    return ok;
}

void service_warn_unused_fds(void)
{
    for (size_t i = 0; i < listen_fds_count(); i++) {
        int fd;
        const char *name;
        bool used;
        listen_fds_get(i, &fd, &name, &used);
        if (!used) {
            log_msg(LOG_LEVEL_WARNING, "passed socket %d%s%s%s is not used "
                    "by any option (addr.type=fd,addr.str=... or --chardev "
                    "socket,fd=...)", fd, *name ? " ('" : "", name,
                    *name ? "')" : "");
        }
    }
}

void service_notify_ready(void)
{
    sd_notifyf(0, "READY=1\nMAINPID=%lu\nSTATUS=Ready", (unsigned long)getpid());
}

void service_notify_stopping(void)
{
    sd_notify(0, "STOPPING=1\nSTATUS=Shutting down");
}

/* ---- --config FILE ---- */

typedef struct ArgVec {
    char **argv;
    char **origin;
    int argc, cap;
} ArgVec;

static void argvec_push(ArgVec *v, char *arg, char *origin)
{
    if (v->argc + 1 >= v->cap) {
        v->cap = v->cap ? v->cap * 2 : 32;
        v->argv = realloc(v->argv, v->cap * sizeof(*v->argv));
        v->origin = realloc(v->origin, v->cap * sizeof(*v->origin));
        if (!v->argv || !v->origin) {
            abort();
        }
    }
    if (!arg) {
        abort();
    }
    v->origin[v->argc] = origin;
    v->argv[v->argc++] = arg;
    v->argv[v->argc] = NULL;
    v->origin[v->argc] = NULL;
}

static char *xasprintf(const char *fmt, const char *a, const char *b)
{
    char *s;
    if (asprintf(&s, fmt, a, b) < 0) {
        abort();
    }
    return s;
}

/* Check one entry of `path` against options; false with errp. */
static bool config_check_entry(const OptFileEntry *e, const char *path,
                               const struct option *options, Error **errp)
{
    if (strcmp(e->name, "config") == 0) {
        error_setg(errp, "%s:%u: --config cannot be used in a config file",
                   path, e->line);
        return false;
    }
    for (const struct option *o = options; o->name; o++) {
        if (strcmp(o->name, e->name) != 0) {
            continue;
        }
        if (o->has_arg == required_argument && !e->value) {
            error_setg(errp, "%s:%u: option '%s' needs a value", path,
                       e->line, e->name);
            return false;
        }
        if (o->has_arg == no_argument && e->value) {
            error_setg(errp, "%s:%u: option '%s' takes no value", path,
                       e->line, e->name);
            return false;
        }
        return true;
    }
    error_setg(errp, "%s:%u: unknown option '%s' (see bitbackd --help)",
               path, e->line, e->name);
    return false;
}

static bool config_expand_file(ArgVec *v, const char *path,
                               const struct option *options, Error **errp)
{
    OptFileEntry *ents;
    size_t n;
    if (!optfile_read(path, &ents, &n, errp)) {
        error_prepend(errp, "--config: ");
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        const OptFileEntry *e = &ents[i];
        if (!config_check_entry(e, path, options, errp)) {
            error_prepend(errp, "--config: ");
            optfile_free(ents, n);
            return false;
        }
        char line[16];
        snprintf(line, sizeof(line), "%u", e->line);
        argvec_push(v, e->value ? xasprintf("--%s=%s", e->name, e->value)
                                : xasprintf("--%s%s", e->name, ""),
                    xasprintf("%s:%s", path, line));
    }
    optfile_free(ents, n);
    return true;
}

bool config_expand_argv(int argc, char **argv, const struct option *options,
                        int *ret_argc, char ***ret_argv, char ***ret_origin,
                        Error **errp)
{
    ArgVec v = { 0 };
    for (int i = 0; i < argc; i++) {
        const char *file = NULL;
        if (i > 0 && strcmp(argv[i], "--config") == 0) {
            if (i + 1 == argc) {
                error_setg(errp, "--config: option requires an argument");
                config_argv_free(v.argc, v.argv, v.origin);
                return false;
            }
            file = argv[++i];
        } else if (i > 0 && strncmp(argv[i], "--config=", 9) == 0) {
            file = argv[i] + 9;
        }
        if (!file) {
            argvec_push(&v, strdup(argv[i]), NULL);
        } else if (!config_expand_file(&v, file, options, errp)) {
            config_argv_free(v.argc, v.argv, v.origin);
            return false;
        }
    }
    *ret_argc = v.argc;
    *ret_argv = v.argv;
    *ret_origin = v.origin;
    return true;
}

void config_argv_free(int argc, char **argv, char **origin)
{
    for (int i = 0; i < argc; i++) {
        free(argv[i]);
        if (origin) {
            free(origin[i]);
        }
    }
    free(argv);
    free(origin);
}
