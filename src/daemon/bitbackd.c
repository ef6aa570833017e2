/*
 * bitbackd: the storage daemon.  It serves block nodes over NBD and is
 * controlled over QMP, with qemu-storage-daemon's command line:
 *
 *   bitbackd [--object OPTS] --blockdev OPTS --nbd-server OPTS --export OPTS
 *            --chardev socket,path=P,server=on,wait=off,id=ID --monitor ID
 *            (or --chardev socket,host=H,port=P,...[,tls-creds=ID])
 *            (or --chardev socket,id=ID,fd=N|NAME,server=on: a passed socket)
 *            [--pidfile F] [--daemonize] [--socket-mode 0600|0660]
 *            [--log-level LEVEL] [--metrics addr=HOST:PORT]
 *            [--config FILE]
 *
 * Each option is dotted key=value (util/keyval.h) or JSON, and is processed
 * in command-line order by running the same code as the matching QMP
 * command (object-add, blockdev-add, nbd-server-start, block-export-add), so the two
 * interfaces cannot drift apart.  Errors name the option.
 *
 * Under a service manager (service.c): `--config FILE` options are
 * expanded in place first, sockets passed by socket activation are
 * registered for addr.type=fd / fd=, and readiness and shutdown are
 * announced with sd_notify.
 *
 * Life cycle:
 *   1. (--daemonize) fork before anything opens a file or starts a thread;
 *      the parent waits on a pipe and exits 0 once the child is ready, or
 *      with the child's status if it fails.
 *   2. Options are processed in order; any failure exits 1.
 *   3. Ready: the pidfile is written, the parent is released, READY=1 is
 *      sent, the main loop (qmp_main_loop) runs until `quit`, SIGTERM or
 *      SIGINT; then STOPPING=1.
 *   4. Shutdown: the NBD server stops (clients are disconnected after their
 *      in-flight requests are answered), then every node is closed from the
 *      top of the graph down with bdrv_close(), which stores persistent
 *      bitmaps and marks them clean.  A failure there, or a write-intent
 *      log that still cannot record a bitmap change, is reported on stderr
 *      and the exit status is 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "block/block.h"
#include "daemon/service.h"
#include "block/write-intent.h"
#include "crypto/object.h"
#include "nbd/server.h"
#include "qmp/metrics.h"
#include "qmp/qmp.h"
#include "job/job.h"
#include "util/cleanup.h"
#include "util/keyval.h"
#include "util/log.h"
#include "util/listen-fds.h"
#include "util/osdep.h"

#define BITBACKD_MAX_CHARDEVS 64

typedef struct Chardev {
    char *id;
    struct json_object *opts;  /* checked by opt_chardev; read by opt_monitor */
    bool used;
} Chardev;

static Chardev chardevs[BITBACKD_MAX_CHARDEVS];
static int nchardevs;
static char *pidfile_path;     /* absolute, for unlink at exit */
static int pidfile_fd = -1;    /* holds the pidfile's lock while we run */
static int daemon_ready_fd = -1;
static uint64_t nbd_max_request_memory = NBD_DEFAULT_MAX_REQUEST_MEMORY;
static unsigned nbd_max_workers = NBD_DEFAULT_MAX_EXTRA_WORKERS;

/* A decimal count 0..max. */
static bool parse_count(const char *str, const char *what, unsigned max,
                        unsigned *ret, Error **errp)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(str, &end, 10);
    if (!*str || *end || errno || *str == '-' || v > max) {
        error_setg(errp, "%s: '%s' is not a number from 0 to %u", what, str, max);
        return false;
    }
    *ret = (unsigned)v;
    return true;
}

enum {
    OPT_BLOCKDEV = 256,
    OPT_CHARDEV,
    OPT_MONITOR,
    OPT_NBD_SERVER,
    OPT_EXPORT,
    OPT_OBJECT,
    OPT_PIDFILE,
    OPT_DAEMONIZE,
    OPT_SOCKET_MODE,
    OPT_NBD_MAX_REQUEST_MEMORY,
    OPT_NBD_MAX_WORKERS,
    OPT_LOG_LEVEL,
    OPT_METRICS,
    OPT_CONFIG,
};

static const struct option long_options[] = {
    { "blockdev", required_argument, NULL, OPT_BLOCKDEV },
    { "chardev", required_argument, NULL, OPT_CHARDEV },
    { "monitor", required_argument, NULL, OPT_MONITOR },
    { "nbd-server", required_argument, NULL, OPT_NBD_SERVER },
    { "export", required_argument, NULL, OPT_EXPORT },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "pidfile", required_argument, NULL, OPT_PIDFILE },
    { "daemonize", no_argument, NULL, OPT_DAEMONIZE },
    { "socket-mode", required_argument, NULL, OPT_SOCKET_MODE },
    { "nbd-max-request-memory", required_argument, NULL, OPT_NBD_MAX_REQUEST_MEMORY },
    { "nbd-max-workers", required_argument, NULL, OPT_NBD_MAX_WORKERS },
    { "log-level", required_argument, NULL, OPT_LOG_LEVEL },
    { "metrics", required_argument, NULL, OPT_METRICS },
    { "config", required_argument, NULL, OPT_CONFIG },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
};

static void usage(void)
{
    printf(
"Usage: bitbackd [options]\n"
"The bitback storage daemon: serves block nodes over NBD, tracks writes in\n"
"persistent dirty bitmaps, and is controlled over QMP like qemu-storage-daemon.\n"
"\n"
"  --object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client\n"
"           [,verify-peer=on|off]\n"
"  --object tls-creds-psk,id=ID,dir=DIR,endpoint=server|client[,username=NAME]\n"
"  --object authz-simple,id=ID,identity=DN-OR-USERNAME\n"
"  --object authz-list,id=ID,policy=deny,rules.0.match=M,rules.0.policy=allow\n"
"                         TLS credentials (QEMU's folder layout: ca-cert.pem,\n"
"                         server-*.pem, client-*.pem; keys.psk for PSK)\n"
"                         and who may connect (object-add)\n"
"  --object iothread,id=ID[,poll-max-ns=NS,...]\n"
"                         an iothread exports may name (iothread=ID)\n"
"  --object secret,id=ID,data=SECRET|file=FILE[,format=raw|base64]\n"
"                         a secret, by id, for features that need one\n"
"  --blockdev [driver=]DRIVER,node-name=NAME[,file.driver=file,file.filename=F...]\n"
"                         open a block node (blockdev-add; dotted keys or JSON)\n"
"  --chardev socket,id=ID,path=PATH,server=on[,wait=off]\n"
"                         a UNIX socket for a monitor\n"
"  --chardev socket,id=ID,fd=N|NAME,server=on[,wait=off]\n"
"                         a listening socket passed to the daemon (fd number,\n"
"                         or its name in LISTEN_FDNAMES: socket activation)\n"
"  --chardev socket,id=ID,host=HOST,port=PORT,server=on[,wait=off]\n"
"           [,tls-creds=ID[,tls-authz=ID]]\n"
"                         a TCP socket for a monitor; with tls-creds every\n"
"                         client does TLS from its first byte and authz\n"
"                         checks its certificate's DN or PSK username\n"
"                         (without TLS off loopback: a warning)\n"
"  --monitor [chardev=]ID[,mode=control][,pretty=on|off]\n"
"                         serve QMP on that socket\n"
"  --nbd-server addr.type=unix,addr.path=PATH[,max-connections=N]\n"
"  --nbd-server addr.type=inet,addr.host=HOST,addr.port=PORT\n"
"  --nbd-server addr.type=fd,addr.str=N|NAME\n"
"                         (a passed listening socket, as for --chardev fd=)\n"
"                         start the NBD server (nbd-server-start);\n"
"                         also [,max-connections=N (default 100)]\n"
"                         [,handshake-max-seconds=S (default 10)]\n"
"                         [,tls-creds=ID[,tls-authz=ID]]: every client must\n"
"                         do TLS (STARTTLS); authz checks its certificate's\n"
"                         DN or PSK username\n"
"  --export [type=]nbd,id=ID,node-name=NODE[,name=NAME][,writable=on]\n"
"           [,description=TEXT][,bitmaps.0=BITMAP...]\n"
"                         export a node over NBD (block-export-add)\n"
"  --nbd-max-request-memory SIZE\n"
"                         NBD request buffers of all clients together (default\n"
"                         1G, at least 32M); requests over it wait, never fail;\n"
"                         each connection may exceed it by at most 1M\n"
"  --nbd-max-workers N    extra NBD worker threads of all connections together\n"
"                         (default 64; each connection also has its own thread)\n"
"  --log-level err|warning|notice|info|debug\n"
"                         the least important events logged to stderr\n"
"                         (default info; under systemd with \"<N>\" levels)\n"
"  --metrics addr=HOST:PORT\n"
"  --metrics addr.type=inet,addr.host=HOST,addr.port=PORT\n"
"  --metrics addr.type=unix,addr.path=PATH\n"
"                         serve Prometheus metrics at http://HOST:PORT/metrics\n"
"                         (any address; off loopback anyone reaching it\n"
"                         reads them)\n"
"  --pidfile FILE         write the process id to FILE once ready\n"
"  --daemonize            run in the background once ready\n"
"  --config FILE          read options from FILE, one a line, in place of\n"
"                         this option: 'blockdev driver=...' ('--' optional,\n"
"                         NAME VALUE or NAME=VALUE), '#' comments\n"
"  --socket-mode MODE     mode of every UNIX socket the daemon creates (QMP\n"
"                         monitors, NBD servers, also nbd-server-start):\n"
"                         0600 (default) or 0660; the umask does not apply\n"
"  -h, --help             show this help\n"
"  -V, --version          show the version\n"
"\n"
"Options are processed in order.  SIGTERM, SIGINT and the QMP command 'quit'\n"
"shut down cleanly, storing persistent bitmaps.  With $NOTIFY_SOCKET set,\n"
"READY=1 and STOPPING=1 are sent (systemd Type=notify); sockets passed with\n"
"LISTEN_FDS are used where an option names them.  See bitbackd(8).\n");
}

/* ---- option handlers: each returns false with errp set ---- */

/* Keys that block drivers read as booleans; keyval gives strings. */
static const char *const blockdev_bool_keys[] = {
    "read-only", "auto-read-only", "force-share", "direct", "no-flush",
    "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
    "pass-discard-other", "drop-cache",
};

static bool blockdev_fix_keyval(struct json_object *obj, Error **errp)
{
    json_object_object_foreach(obj, key, val) {
        if (json_object_is_type(val, json_type_object)) {
            if (!blockdev_fix_keyval(val, errp)) {
                return false;
            }
            continue;
        }
        if (!json_object_is_type(val, json_type_string)) {
            continue;
        }
        for (size_t i = 0; i < ARRAY_SIZE(blockdev_bool_keys); i++) {
            if (strcmp(key, blockdev_bool_keys[i]) == 0) {
                bool b;
                if (!keyval_str_to_bool(json_object_get_string(val), &b)) {
                    error_setg(errp, "Parameter '%s' expects 'on' or 'off'", key);
                    return false;
                }
                json_object_object_add(obj, key, json_object_new_boolean(b));
                break;
            }
        }
    }
    return true;
}

static bool opt_blockdev(const char *arg, Error **errp)
{
    _cleanup_json_ struct json_object *opts = keyval_parse_or_json(arg, "driver", errp);
    if (!opts) {
        return false;
    }
    if (arg[0] != '{' && !blockdev_fix_keyval(opts, errp)) {
        return false;
    }
    _cleanup_json_ struct json_object *ret =
        qmp_execute("blockdev-add", opts, false, errp);
    return ret != NULL;
}

/* Run QMP command `cmd` with the option's arguments; implied_key names
 * the key of a leading bare value (qsd's `--export nbd,...` is
 * `type=nbd,...`), or is NULL. */
static bool opt_command(const char *cmd, const char *arg,
                        const char *implied_key, Error **errp)
{
    _cleanup_json_ struct json_object *args =
        keyval_parse_or_json(arg, implied_key, errp);
    if (!args) {
        return false;
    }
    _cleanup_json_ struct json_object *ret =
        qmp_execute(cmd, args, arg[0] != '{', errp);
    return ret != NULL;
}

static bool opt_chardev(const char *arg, Error **errp)
{
    static const QmpArgSpec spec[] = {
        { "backend", QMP_ARG_STR, false },
        { "id", QMP_ARG_STR, false },
        { "path", QMP_ARG_STR, true },
        { "host", QMP_ARG_STR, true },
        { "port", QMP_ARG_STR, true },
        { "fd", QMP_ARG_STR, true },
        { "server", QMP_ARG_BOOL, true },
        { "wait", QMP_ARG_BOOL, true },
        { "tls-creds", QMP_ARG_STR, true },
        { "tls-authz", QMP_ARG_STR, true },
        { NULL },
    };
    _cleanup_json_ struct json_object *o =
        keyval_parse_or_json(arg, "backend", errp);
    if (!o || !qmp_coerce_keyval_args(o, spec, errp) ||
        !qmp_check_args(o, spec, errp)) {
        return false;
    }
    const char *backend = json_opt_str(o, "backend");
    const char *id = json_opt_str(o, "id");
    const char *path = json_opt_str(o, "path");
    const char *host = json_opt_str(o, "host");
    const char *port = json_opt_str(o, "port");
    const char *fd = json_opt_str(o, "fd");
    if (strcmp(backend, "socket") != 0) {
        error_setg(errp, "chardev backend '%s' is not supported (only 'socket')",
                   backend);
        return false;
    }
    /* QEMU's messages for a socket chardev's address */
    if (path && (host || port)) {
        error_setg(errp, "chardev: socket: 'host'/'port' are not allowed "
                   "with 'path'");
        return false;
    }
    if (fd && (path || host || port)) {
        error_setg(errp, "chardev: socket: 'fd' is not allowed with "
                   "'path', 'host' or 'port'");
        return false;
    }
    if (!path && !host && !fd) {
        error_setg(errp, "chardev: socket: no host given (give path=PATH, "
                   "host=HOST,port=PORT or fd=N)");
        return false;
    }
    if (host && !port) {
        error_setg(errp, "chardev: socket: no port given");
        return false;
    }
    if (path && json_opt_str(o, "tls-creds")) {
        error_setg(errp, "TLS can only be used over TCP socket");
        return false;
    }
    if (!json_opt_bool(o, "server", false)) {
        error_setg(errp, "only server=on is supported");
        return false;
    }
    for (int i = 0; i < nchardevs; i++) {
        if (strcmp(chardevs[i].id, id) == 0) {
            error_setg(errp, "attempt to add duplicate property '%s'", id);
            return false;
        }
    }
    if (nchardevs == BITBACKD_MAX_CHARDEVS) {
        error_setg(errp, "too many chardevs (at most %d)", BITBACKD_MAX_CHARDEVS);
        return false;
    }
    chardevs[nchardevs].id = strdup(id);
    chardevs[nchardevs].opts = json_object_get(o);
    if (!chardevs[nchardevs].id) {
        abort();
    }
    nchardevs++;
    return true;
}

static bool opt_monitor(const char *arg, Error **errp)
{
    static const QmpArgSpec spec[] = {
        { "chardev", QMP_ARG_STR, false },
        { "id", QMP_ARG_STR, true },
        { "mode", QMP_ARG_STR, true },
        { "pretty", QMP_ARG_BOOL, true },
        { NULL },
    };
    _cleanup_json_ struct json_object *o =
        keyval_parse_or_json(arg, "chardev", errp);
    if (!o || !qmp_coerce_keyval_args(o, spec, errp) ||
        !qmp_check_args(o, spec, errp)) {
        return false;
    }
    const char *mode = json_opt_str(o, "mode");
    if (mode && strcmp(mode, "control") != 0) {
        error_setg(errp, "only mode=control is supported");
        return false;
    }
    const char *id = json_opt_str(o, "chardev");
    for (int i = 0; i < nchardevs; i++) {
        if (strcmp(chardevs[i].id, id) == 0) {
            if (chardevs[i].used) {
                error_setg(errp, "chardev '%s' is already in use", id);
                return false;
            }
            chardevs[i].used = true;
            struct json_object *co = chardevs[i].opts;
            const char *path = json_opt_str(co, "path");
            if (path) {
                return qmp_monitor_add_unix(path, errp);
            }
            if (json_opt_str(co, "fd")) {
                return qmp_monitor_add_fd(json_opt_str(co, "fd"),
                                          json_opt_str(co, "tls-creds"),
                                          json_opt_str(co, "tls-authz"), errp);
            }
            return qmp_monitor_add_inet(json_opt_str(co, "host"),
                                        json_opt_str(co, "port"),
                                        json_opt_str(co, "tls-creds"),
                                        json_opt_str(co, "tls-authz"), errp);
        }
    }
    error_setg(errp, "chardev \"%s\" not found", id);
    return false;
}

/* Write our pid to `path` and hold a lock on it for the life of the
 * process, as qemu-storage-daemon does (a POSIX record lock, lockf): a
 * second daemon with the same pidfile -- bitbackd or qemu-storage-daemon --
 * is refused and leaves the file alone.  The file is truncated only once
 * it is ours, and a file unlinked by its previous owner between our open
 * and our lock is not taken for the one at `path`. */
static bool write_pidfile(const char *path, Error **errp)
{
    char buf[32];
    int len = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
    for (int tries = 0; ; tries++) {
        struct stat st_fd, st_path;
        int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) {
            error_setg_errno(errp, errno, "cannot create pid file '%s'", path);
            return false;
        }
        if (lockf(fd, F_TLOCK, 0) < 0) {
            int e = errno;
            close(fd);
            if (e == EAGAIN || e == EACCES) {
                error_setg(errp, "cannot lock pid file '%s': is another daemon "
                           "using it?", path);
            } else {
                error_setg_errno(errp, e, "cannot lock pid file '%s'", path);
            }
            return false;
        }
        if (fstat(fd, &st_fd) == 0 && stat(path, &st_path) == 0 &&
            st_fd.st_dev == st_path.st_dev && st_fd.st_ino == st_path.st_ino) {
            if (ftruncate(fd, 0) < 0 || write(fd, buf, len) != len) {
                error_setg_errno(errp, errno, "cannot write pid file '%s'", path);
                close(fd);
                return false;
            }
            pidfile_fd = fd;
            return true;
        }
        close(fd);
        if (tries == 10) {
            error_setg(errp, "pid file '%s' keeps being replaced", path);
            return false;
        }
    }
}

/* ---- daemonizing ---- */

/* Fork; only the child returns.  The parent exits when the child reports
 * ready (status 0) or dies (its status). */
static void daemonize_start(void)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) < 0) {
        error_report("pipe: %s", strerror(errno));
        exit(1);
    }
    pid_t pid = fork();
    if (pid < 0) {
        error_report("fork: %s", strerror(errno));
        exit(1);
    }
    if (pid > 0) {
        char c;
        ssize_t n;
        close(fds[1]);
        do {
            n = read(fds[0], &c, 1);
        } while (n < 0 && errno == EINTR);
        if (n == 1) {
            _exit(0);
        }
        int status;
        if (waitpid(pid, &status, 0) == pid && WIFEXITED(status)) {
            _exit(WEXITSTATUS(status) ? WEXITSTATUS(status) : 1);
        }
        _exit(1);
    }
    close(fds[0]);
    daemon_ready_fd = fds[1];
    setsid();
}

static void daemonize_finish(void)
{
    if (daemon_ready_fd < 0) {
        return;
    }
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        dup2(null, STDOUT_FILENO);
        dup2(null, STDERR_FILENO);
        if (null > STDERR_FILENO) {
            close(null);
        }
    }
    ssize_t r = write(daemon_ready_fd, "R", 1);
    (void)r;
    close(daemon_ready_fd);
    daemon_ready_fd = -1;
}

/* ---- shutdown ---- */

/* Close every node the user opened (--blockdev, blockdev-add), parents
 * before children, so that each node's bitmaps are stored when its last
 * reference goes and errors reach the exit status.  Nodes opened as
 * children are closed by their parents.  Returns false if storing bitmaps
 * failed anywhere (already reported). */
static bool close_all_nodes(void)
{
    size_t n = 0, cap = 0;
    BlockDriverState **owned = NULL;
    bool ok = true;

    for (BlockDriverState *bs = bdrv_next_node(NULL); bs; bs = bdrv_next_node(bs)) {
        if (!bs->user_owned) {
            continue;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            BlockDriverState **p = realloc(owned, cap * sizeof(*p));
            if (!p) {
                abort();
            }
            owned = p;
        }
        owned[n++] = bs;
    }
    /* Each entry holds its owner reference until closed, so the pointers of
     * the entries still pending stay valid. */
    while (n > 0) {
        size_t pick = 0;
        for (size_t i = 0; i < n; i++) {
            bool has_parent = false;
            for (size_t j = 0; j < n; j++) {
                if (j != i && (owned[j]->file == owned[i] ||
                               owned[j]->backing == owned[i])) {
                    has_parent = true;
                    break;
                }
            }
            if (!has_parent) {
                pick = i;
                break;
            }
        }
        BlockDriverState *bs = owned[pick];
        owned[pick] = owned[--n];
        _cleanup_free_ char *name = strdup(bs->node_name ? bs->node_name : "?");
        Error *err = NULL;
        if (!bdrv_close(bs, &err)) {
            log_msg(LOG_LEVEL_ERR, "closing node '%s': %s", name,
                    error_get_pretty(err));
            error_free(err);
            ok = false;
        }
    }
    free(owned);
    return ok;
}

static volatile sig_atomic_t quit_signal;

static void on_signal(int sig)
{
    quit_signal = sig;
    qmp_request_quit();
}

static void setup_signals(void)
{
    struct sigaction sa = { .sa_handler = on_signal };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
}

/* For options that apply wherever they are on the command line: the value
 * of the next `--NAME VALUE` or `--NAME=VALUE` from argv[*i] on (*i moves
 * past it), or NULL at the end. */
static const char *prescan_option(int argc, char **argv, int *i,
                                  const char *name)
{
    size_t len = strlen(name);
    for (; *i < argc; (*i)++) {
        const char *a = argv[*i];
        if (strcmp(a, name) == 0 && *i + 1 < argc) {
            *i += 2;
            return argv[*i - 1];
        }
        if (strncmp(a, name, len) == 0 && a[len] == '=') {
            (*i)++;
            return a + len + 1;
        }
    }
    return NULL;
}

/* --socket-mode, wherever it is on the command line: it applies to every
 * socket, including those of options before it.  false with errp set. */
static bool opt_socket_mode(int argc, char **argv, Error **errp)
{
    const char *v;
    for (int i = 1; (v = prescan_option(argc, argv, &i, "--socket-mode")); ) {
        if (strcmp(v, "0600") == 0 || strcmp(v, "600") == 0) {
            unix_socket_mode_set(0600);
        } else if (strcmp(v, "0660") == 0 || strcmp(v, "660") == 0) {
            unix_socket_mode_set(0660);
        } else {
            error_setg(errp, "--socket-mode: expected 0600 or 0660, not '%s'", v);
            return false;
        }
    }
    return true;
}

/* --log-level, wherever it is on the command line: it applies to the
 * events of options before it too.  false with errp set. */
static bool opt_log_level(int argc, char **argv, Error **errp)
{
    LogLevel level = LOG_LEVEL_DEFAULT;
    const char *v;
    for (int i = 1; (v = prescan_option(argc, argv, &i, "--log-level")); ) {
        if (!log_level_parse(v, &level, errp)) {
            error_prepend(errp, "--log-level: ");
            return false;
        }
    }
    log_set_level(level);
    return true;
}

static bool want_daemonize(int argc, char **argv)
{
    bool daemonize = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0 ||
            strcmp(argv[i], "--version") == 0 || strcmp(argv[i], "-V") == 0) {
            return false;
        }
        if (strcmp(argv[i], "--daemonize") == 0) {
            daemonize = true;
        }
    }
    return daemonize;
}

/* The command line with --config files expanded (service.h); static
 * so that they stay reachable until freed at exit. */
static int cmd_argc;
static char **cmd_argv, **cmd_origin;

static void free_cmdline(void)
{
    config_argv_free(cmd_argc, cmd_argv, cmd_origin);
    cmd_argv = cmd_origin = NULL;
    cmd_argc = 0;
    listen_fds_clear();
}

int main(int orig_argc, char **orig_argv)
{
    int c;

    error_progname = "bitbackd";
    log_init("bitbackd");
    setup_signals();
    qmp_init_commands();
    {
        Error *err = NULL;
        if (!config_expand_argv(orig_argc, orig_argv, long_options, &cmd_argc,
                                &cmd_argv, &cmd_origin, &err) ||
            !opt_log_level(cmd_argc, cmd_argv, &err) ||
            !service_listen_fds_init(&err) ||
            !opt_socket_mode(cmd_argc, cmd_argv, &err)) {
            error_report_err(err);
            free_cmdline();
            return 1;
        }
    }
    int argc = cmd_argc;
    char **argv = cmd_argv;
    if (want_daemonize(argc, argv)) {
        daemonize_start();
    }

    /* "+": no reordering, so an option's index names its origin. */
    while ((c = getopt_long(argc, argv, "+hV", long_options, NULL)) != -1) {
        Error *err = NULL;
        bool ok = true;
        const char *optname = NULL;

        switch (c) {
        case 'h':
            usage();
            free_cmdline();
            return 0;
        case 'V':
            printf("bitbackd version %s\n", BITBACK_VERSION);
            free_cmdline();
            return 0;
        case OPT_BLOCKDEV:
            optname = "--blockdev";
            ok = opt_blockdev(optarg, &err);
            break;
        case OPT_CHARDEV:
            optname = "--chardev";
            ok = opt_chardev(optarg, &err);
            break;
        case OPT_MONITOR:
            optname = "--monitor";
            ok = opt_monitor(optarg, &err);
            break;
        case OPT_NBD_SERVER:
            optname = "--nbd-server";
            ok = opt_command("nbd-server-start", optarg, NULL, &err);
            break;
        case OPT_EXPORT:
            optname = "--export";
            ok = opt_command("block-export-add", optarg, "type", &err);
            break;
        case OPT_NBD_MAX_REQUEST_MEMORY:
            optname = "--nbd-max-request-memory";
            ok = parse_size(optarg, optname, &nbd_max_request_memory, &err);
            if (ok) {
                nbd_set_resource_limits(nbd_max_request_memory, nbd_max_workers);
            }
            break;
        case OPT_NBD_MAX_WORKERS:
            optname = "--nbd-max-workers";
            ok = parse_count(optarg, optname, 4096, &nbd_max_workers, &err);
            if (ok) {
                nbd_set_resource_limits(nbd_max_request_memory, nbd_max_workers);
            }
            break;
        case OPT_OBJECT:
            optname = "--object";
            ok = opt_command("object-add", optarg, "qom-type", &err);
            break;
        case OPT_PIDFILE: {
            _cleanup_free_ char *dir = path_dirname(optarg);
            char real[PATH_MAX];
            const char *base = strrchr(optarg, '/');
            base = base ? base + 1 : optarg;
            optname = "--pidfile";
            if (!realpath(dir, real)) {
                error_setg_errno(&err, errno, "cannot resolve '%s'", dir);
                ok = false;
                break;
            }
            free(pidfile_path);
            pidfile_path = path_join(real, base);
            break;
        }
        case OPT_METRICS:
            optname = "--metrics";
            ok = metrics_start(optarg, &err);
            break;
        case OPT_DAEMONIZE:
        case OPT_SOCKET_MODE:      /* opt_socket_mode did it */
        case OPT_LOG_LEVEL:        /* opt_log_level did it */
        case OPT_CONFIG:           /* config_expand_argv did it */
            break;
        default:
            fprintf(stderr, "Try 'bitbackd --help' for more information.\n");
            goto fail;
        }
        if (!ok) {
            error_prepend(&err, "%s: ", optname);
            /* An option from a --config file: where it is. */
            if (optind > 0 && cmd_origin[optind - 1]) {
                error_prepend(&err, "%s: ", cmd_origin[optind - 1]);
            }
            error_report_err(err);
            goto fail;
        }
    }
    if (optind < argc) {
        error_report("unexpected argument '%s'", argv[optind]);
        goto fail;
    }
    if (pidfile_path) {
        Error *err = NULL;
        if (!write_pidfile(pidfile_path, &err)) {
            error_prepend(&err, "--pidfile: ");
            error_report_err(err);
            goto fail;
        }
    }
    log_msg(LOG_LEVEL_NOTICE, "bitbackd %s started (pid %ld)",
            BITBACK_VERSION, (long)getpid());
    service_warn_unused_fds();
    daemonize_finish();
    service_notify_ready();

    qmp_main_loop();
    service_notify_stopping();
    if (quit_signal) {
        log_msg(LOG_LEVEL_NOTICE, "shutting down on %s",
                strsignal(quit_signal));
    } else {
        log_msg(LOG_LEVEL_NOTICE, "shutting down (quit)");
    }
    metrics_stop();

    /* Jobs end first (cancelled): their bitmaps get their bits back and
     * their nodes are released before the nodes are closed. */
    job_cancel_sync_all();
    nbd_server_stop();
    /* A bitmap change whose write-intent log could not be written (ENOSPC,
     * EIO) is retried once more; if it still fails, the exit status says
     * so even when the bitmaps are then stored. */
    bool ok = write_intent_sync_all_changed();
    ok = close_all_nodes() && ok;
    object_del_all();
    qmp_monitor_cleanup();
    if (pidfile_fd >= 0) {
        unlink(pidfile_path);    /* while still ours */
        close(pidfile_fd);
    }
    if (ok) {
        log_msg(LOG_LEVEL_NOTICE, "bitbackd stopped cleanly");
    } else {
        log_msg(LOG_LEVEL_ERR, "bitbackd stopped with errors (exit status 1)");
    }
    free(pidfile_path);
    free_cmdline();
    return ok ? 0 : 1;

fail:
    metrics_stop();
    nbd_server_stop();
    close_all_nodes();
    object_del_all();
    qmp_monitor_cleanup();
    free(pidfile_path);
    free_cmdline();
    return 1;
}
