/*
 * `bitback serve`: instant restore.  Exports one backup point of a
 * repository (docs/specs/repository.md) over NBD at once, so a VM can boot
 * from its backup (or nbdcopy/qemu-img read it) while a full restore runs.
 *
 *   bitback serve --repo DIR [--at ID|latest] [--node NODE]
 *                 (--socket PATH | --bind ADDR:PORT)
 *                 [--writable] [--export-name NAME]
 *
 * The point's chain opens read-only through repo_open_chain(), exactly as
 * restore opens it (backing names checked, never followed), and the
 * project's NBD server (src/nbd, as in bitbackd: several clients at once,
 * base:allocation block status) exports its top node.  Read-only by
 * default: the export has NBD_FLAG_READ_ONLY and writes get EPERM.
 *
 * --writable: a throw-away qcow2 overlay in a private folder (mkdtemp
 * under $TMPDIR or /tmp) is exported instead.  It is created without a
 * backing file name and the chain's top node is attached in memory
 * (bdrv_set_backing), so no file names the repository and no repository
 * file is ever opened writable.  The overlay and its folder are unlinked
 * as soon as the overlay is open: they are gone when the process ends,
 * however it ends.
 *
 * Ready: one line on stdout ("serving disk0 backup 000003 on
 * nbd+unix:///disk0?socket=PATH"), flushed, so scripts can wait for it.
 * SIGINT or SIGTERM stops the server (clients are disconnected, the UNIX
 * socket removed) and exits 0.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "nbd/server.h"
#include "repo/ops.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/main-loop.h"

static void serve_usage(FILE *out)
{
    fprintf(out,
            "Usage: bitback serve --repo DIR [--at ID|latest] [--node NODE]\n"
            "                     (--socket PATH | --bind ADDR:PORT)\n"
            "                     [--writable] [--export-name NAME]\n"
            "\n"
            "Export the disk NODE as it was at backup ID over NBD, at once (instant\n"
            "restore: a VM or nbdcopy reads it while a restore runs), until SIGINT\n"
            "or SIGTERM.  One line is printed when the server is ready:\n"
            "  serving NODE backup ID on URI\n"
            "\n"
            "Options:\n"
            "  --repo DIR         the backup repository: a folder, or\n"
            "                     rbd:POOL[/NS][:conf=PATH][:id=USER] in Ceph\n"
            "  --node NODE        the disk (may be omitted when the repository has one)\n"
            "  --at ID|latest     the backup to serve (default: latest)\n"
            "  --socket PATH      listen on the UNIX socket PATH (removed on exit)\n"
            "  --bind ADDR:PORT   listen on TCP, on ADDR only ([ADDR] for IPv6);\n"
            "                     port 0 picks a free port (the ready line says which)\n"
            "  --writable         accept writes into a throw-away qcow2 overlay in a\n"
            "                     private folder under $TMPDIR (or /tmp), deleted on\n"
            "                     exit; the repository is never written\n"
            "  --export-name NAME the NBD export name (default: NODE)\n"
            "\n"
            "Without --writable the export is read-only: writes fail with EPERM.\n"
            "Several clients may connect at once.  The backup's chain is opened\n"
            "as its manifests describe it, as restore opens it.\n");
}

static volatile sig_atomic_t serve_quit;

static void serve_on_signal(int sig)
{
    serve_quit = sig;
    main_loop_wake();
}

/* --bind ADDR:PORT as a QAPI inet SocketAddress (new object); "[v6]:port"
 * for IPv6 addresses.  NULL with errp set. */
static struct json_object *serve_parse_bind(const char *arg, Error **errp)
{
    _cleanup_free_ char *host = NULL;
    const char *colon = strrchr(arg, ':');
    uint64_t port;

    if (!colon || colon == arg) {
        error_setg(errp, "--bind: expected ADDR:PORT, not '%s'", arg);
        return NULL;
    }
    if (arg[0] == '[' && colon[-1] == ']') {
        host = strndup(arg + 1, (size_t)(colon - arg - 2));
    } else {
        host = strndup(arg, (size_t)(colon - arg));
    }
    if (!host || !*host) {
        error_setg(errp, "--bind: expected ADDR:PORT, not '%s'", arg);
        return NULL;
    }
    size_t n = strlen(colon + 1);
    port = n && n <= 5 && strspn(colon + 1, "0123456789") == n
               ? strtoull(colon + 1, NULL, 10) : UINT64_MAX;
    if (port > 65535) {
        error_setg(errp, "--bind: bad port '%s'", colon + 1);
        return NULL;
    }
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "type", json_object_new_string("inet"));
    json_object_object_add(o, "host", json_object_new_string(host));
    json_object_object_add(o, "port", json_object_new_int64((int64_t)port));
    return o;
}

/* The throw-away overlay of --writable over backing (the chain's top): a
 * new qcow2 file in a private folder, opened without a backing name and
 * linked to backing in memory, then unlinked with its folder.  NULL with
 * errp set (nothing left behind). */
static BlockDriverState *serve_open_overlay(BlockDriverState *backing,
                                            Error **errp)
{
    const char *tmpdir = getenv("TMPDIR");
    _cleanup_free_ char *dir = NULL, *file = NULL;
    BlockDriverState *bs = NULL;
    int64_t len = bdrv_getlength(backing);

    if (len < 0) {
        error_setg_errno(errp, (int)-len, "cannot get the backup's size");
        return NULL;
    }
    if (asprintf(&dir, "%s/bitback-serve-XXXXXX",
                 tmpdir && *tmpdir ? tmpdir : "/tmp") < 0) {
        dir = NULL;
        error_setg(errp, "out of memory");
        return NULL;
    }
    if (!mkdtemp(dir)) {
        error_setg_errno(errp, errno, "cannot create a private folder %s", dir);
        return NULL;
    }
    file = path_join(dir, "overlay.qcow2");
    if (!file) {
        error_setg(errp, "out of memory");
        goto out;
    }
    if (!bdrv_img_create(file, "qcow2", (uint64_t)len, NULL, errp)) {
        goto out;
    }
    bs = bdrv_open_image(file, "qcow2", BDRV_O_RDWR | BDRV_O_NO_BACKING, errp);
    if (bs && !bdrv_set_backing(bs, backing, errp)) {
        bdrv_unref(bs);
        bs = NULL;
    }

out:
    if (file) {
        unlink(file);
    }
    rmdir(dir);
    if (!bs) {
        error_prepend(errp, "--writable: cannot make the overlay: ");
    }
    return bs;
}

/* Run the main thread's deferred calls (the NBD server's) until a signal
 * asks to stop. */
static void serve_main_loop(void)
{
    int wake_fd = main_loop_wake_fd();

    while (!serve_quit) {
        struct pollfd p = { .fd = wake_fd, .events = POLLIN };
        if (poll(&p, 1, -1) > 0) {
            main_loop_wake_drain();
        }
        main_loop_run_pending();
    }
}

int cli_cmd_serve(int argc, char **argv)
{
    enum {
        OPT_SOCKET = CLI_OPT_FIRST_FREE, OPT_BIND, OPT_WRITABLE, OPT_EXPORT_NAME,
    };
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"repo", required_argument, NULL, CLI_OPT_REPO},
        {"node", required_argument, NULL, CLI_OPT_NODE},
        {"at", required_argument, NULL, CLI_OPT_AT},
        {"socket", required_argument, NULL, OPT_SOCKET},
        {"bind", required_argument, NULL, OPT_BIND},
        {"writable", no_argument, NULL, OPT_WRITABLE},
        {"export-name", required_argument, NULL, OPT_EXPORT_NAME},
        {NULL, 0, NULL, 0},
    };
    CliRepoOpts opts = { .at = "latest" };
    const char *socket_path = NULL, *bind = NULL, *export_name = NULL;
    bool writable = false;
    _cleanup_json_ struct json_object *addr = NULL;
    BlockDriverState *chain = NULL, *overlay = NULL;
    Repo *repo = NULL;
    RepoLock *lock = NULL;
    RepoManifest *m;
    const char *node;
    Error *err = NULL;
    int ret = CLI_EXIT_ERROR;
    unsigned seq;
    int c;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        if (c == 'h') {
            serve_usage(stdout);
            return CLI_EXIT_OK;
        } else if (c == OPT_SOCKET) {
            socket_path = optarg;
        } else if (c == OPT_BIND) {
            bind = optarg;
        } else if (c == OPT_WRITABLE) {
            writable = true;
        } else if (c == OPT_EXPORT_NAME) {
            export_name = optarg;
        } else if (!cli_repo_opt(c, &opts, serve_usage)) {
            return CLI_EXIT_ERROR;
        }
    }
    if (!opts.repo) {
        error_report("serve: --repo DIR is required (see 'bitback serve --help')");
        return CLI_EXIT_ERROR;
    }
    if (optind != argc) {
        error_report("serve: unexpected argument '%s' (see 'bitback serve --help')",
                     argv[optind]);
        return CLI_EXIT_ERROR;
    }
    if (!socket_path == !bind) {
        error_report("serve: give exactly one of --socket PATH and --bind ADDR:PORT");
        return CLI_EXIT_ERROR;
    }
    if (socket_path) {
        if (!*socket_path) {
            error_report("serve: --socket needs a path");
            return CLI_EXIT_ERROR;
        }
        addr = json_object_new_object();
        json_object_object_add(addr, "type", json_object_new_string("unix"));
        json_object_object_add(addr, "path", json_object_new_string(socket_path));
    } else {
        addr = serve_parse_bind(bind, &err);
        if (!addr) {
            error_report_err(err);
            return CLI_EXIT_ERROR;
        }
    }
    if (!repo_parse_id(opts.at, &seq, &err)) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }

    repo = repo_open(opts.repo, false, &err);
    if (!repo) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    node = repo_pick_node(repo, opts.node, &err);
    if (!node || !(lock = repo_lock_node(repo, node, REPO_LOCK_READ, &err))) {
        goto out;
    }
    m = repo_find(repo, node, seq, &err);
    if (!m) {
        goto out;
    }
    /* The chain as the manifests describe it, read-only, as restore. */
    chain = repo_open_chain(repo, m, &err);
    if (!chain) {
        error_prepend(&err, "cannot serve backup %s of %s: ", m->id, node);
        goto out;
    }
    if (writable) {
        overlay = serve_open_overlay(chain, &err);
        if (!overlay) {
            goto out;
        }
    }
    if (!export_name) {
        export_name = node;
    }

    struct sigaction sa = { .sa_handler = serve_on_signal };
    sigemptyset(&sa.sa_mask);
    main_loop_wake_fd();   /* the pipe the handler writes to */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);

    if (!nbd_export_add("serve", overlay ? overlay : chain, export_name, NULL,
                        writable, NULL, 0, &err)) {
        goto out;
    }
    if (!nbd_server_start(addr, NBD_DEFAULT_MAX_CONNECTIONS,
                          NBD_DEFAULT_HANDSHAKE_MAX_SECONDS, &err)) {
        error_prepend(&err, "serve: ");
        goto out;
    }
    if (socket_path) {
        printf("serving %s backup %s on nbd+unix:///%s?socket=%s%s\n", node,
               m->id, export_name, socket_path,
               writable ? " (writable overlay)" : "");
    } else {
        const char *host = json_object_get_string(
            json_object_object_get(addr, "host"));
        bool v6 = strchr(host, ':') != NULL;
        printf("serving %s backup %s on nbd://%s%s%s:%d/%s%s\n", node, m->id,
               v6 ? "[" : "", host, v6 ? "]" : "", nbd_server_port(),
               export_name, writable ? " (writable overlay)" : "");
    }
    fflush(stdout);

    serve_main_loop();
    ret = CLI_EXIT_OK;

out:
    /* Disconnect every client and remove the export (and the socket). */
    nbd_server_stop();
    main_loop_run_pending();
    if (err) {
        error_report_err(err);
    }
    if (overlay) {
        bdrv_unref(overlay);
    }
    if (chain) {
        bdrv_unref(chain);
    }
    repo_unlock(lock);
    repo_free(repo);
    return ret;
}
