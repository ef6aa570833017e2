/*
 * `bitback backup --connect`: a live backup through bitbackd (or
 * qemu-storage-daemon) over QMP.  Steps 1-7 of backup-cmd.c's opening
 * comment: clean up what a killed run left, one `transaction` that adds
 * and freezes the bitmaps and starts the drive-backup jobs, waiting for
 * the jobs, and the cleanup after SIGINT/SIGTERM (live_interrupted).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "cli/backup-internal.h"
#include "cli/progress.h"
#include "client/qmp-client.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/json-opts.h"
#include "util/osdep.h"

/* SIGINT / SIGTERM while a live backup runs: the signal number.  The
 * handler only records it (SA_RESETHAND: a second signal kills as usual);
 * the run notices it between QMP messages (live_wait_jobs polls every
 * 250 ms) and stops cleanly (live_interrupted). */
static volatile sig_atomic_t backup_signal;

static void backup_on_signal(int sig)
{
    backup_signal = sig;
}

/* Catch SIGINT and SIGTERM (install) or give them back (!install). */
static void backup_catch_signals(bool install)
{
    static struct sigaction old_int, old_term;

    if (install) {
        struct sigaction sa = { .sa_handler = backup_on_signal,
                                .sa_flags = SA_RESETHAND };

        sigemptyset(&sa.sa_mask);
        backup_signal = 0;
        sigaction(SIGINT, &sa, &old_int);
        sigaction(SIGTERM, &sa, &old_term);
    } else {
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
    }
}

static struct json_object *bitmap_args(const char *node, const char *name)
{
    struct json_object *a = json_object_new_object();

    json_object_object_add(a, "node", json_object_new_string(node));
    json_object_object_add(a, "name", json_object_new_string(name));
    return a;
}

static void add_action(struct json_object *actions, const char *type,
                       struct json_object *data)
{
    struct json_object *a = json_object_new_object();

    json_object_object_add(a, "type", json_object_new_string(type));
    json_object_object_add(a, "data", data);
    json_object_array_add(actions, a);
}

/* Fill d->size and d->bitmaps from query-named-block-nodes. */
static bool live_query_disk(QmpConn *qmp, Disk *d, Error **errp)
{
    _cleanup_json_ struct json_object *nodes =
        qmp_conn_execute(qmp, "query-named-block-nodes", NULL, errp);
    struct json_object *node = NULL, *img, *bms;

    if (!nodes) {
        return false;
    }
    for (size_t i = 0; i < json_object_array_length(nodes); i++) {
        struct json_object *n = json_object_array_get_idx(nodes, i);
        const char *name = json_opt_str(n, "node-name");

        if (name && !strcmp(name, d->node)) {
            node = n;
            break;
        }
    }
    if (!node) {
        error_setg(errp, "no block node named '%s' in the daemon", d->node);
        return false;
    }
    if (!json_object_object_get_ex(node, "image", &img) ||
        json_opt_int(img, "virtual-size", -1) < 0) {
        error_setg(errp, "%s: the daemon did not report its size", d->node);
        return false;
    }
    d->size = (uint64_t)json_opt_int(img, "virtual-size", -1);
    free(d->image_file);
    d->image_file = json_opt_str(node, "file")
                    ? backup_strdup(json_opt_str(node, "file")) : NULL;
    /* A node without a backing chain: its top layer is all of it. */
    d->no_backing = json_opt_int(node, "backing_file_depth", -1) == 0;
    free(d->drv);
    d->drv = backup_strdup(json_opt_str(node, "drv"));
    /* An RBD image: an rbd node, or raw over one (bitbackd names both
     * "rbd:POOL/IMAGE"). */
    bool rbd = d->ours && d->image_file && !strncmp(d->image_file, "rbd:", 4) &&
               (!strcmp(d->drv, "rbd") || !strcmp(d->drv, "raw"));
    /* bitbackd says whether the node stores persistent bitmaps (qcow2,
     * qbm, an RBD image through its owner node).  QEMU stores them in
     * qcow2 only; on any other node ours must be non-persistent. */
    struct json_object *pb;
    if (d->ours && json_object_object_get_ex(node, "persistent-bitmaps", &pb)) {
        d->volatile_bitmaps = !json_object_get_boolean(pb);
    } else {
        d->volatile_bitmaps = json_opt_str(node, "drv") &&
                              strcmp(d->drv, "qcow2") && strcmp(d->drv, "qbm");
    }
    backup_disk_clear_bitmaps(d);
    /* The run decides whether the daemon snapshots an RBD image. */
    d->rbd_snapshots = rbd;
    if (json_object_object_get_ex(img, "snapshots", &bms) &&
        json_object_is_type(bms, json_type_array)) {
        size_t n = json_object_array_length(bms);

        d->snapshots = calloc(n ? n : 1, sizeof(*d->snapshots));
        if (!d->snapshots) {
            abort();
        }
        for (size_t i = 0; i < n; i++) {
            const char *sn = json_opt_str(json_object_array_get_idx(bms, i),
                                          "name");
            if (sn) {
                d->snapshots[d->n_snapshots++] = backup_strdup(sn);
            }
        }
    }
    if (json_object_object_get_ex(node, "dirty-bitmaps", &bms) &&
        json_object_is_type(bms, json_type_array)) {
        size_t n = json_object_array_length(bms);

        d->bitmaps = calloc(n ? n : 1, sizeof(*d->bitmaps));
        if (!d->bitmaps) {
            abort();
        }
        for (size_t i = 0; i < n; i++) {
            struct json_object *b = json_object_array_get_idx(bms, i);
            BitmapInfo *bi = &d->bitmaps[d->n_bitmaps];

            if (!json_opt_str(b, "name")) {
                continue;
            }
            bi->name = backup_strdup(json_opt_str(b, "name"));
            bi->recording = json_opt_bool(b, "recording", false);
            bi->inconsistent = json_opt_bool(b, "inconsistent", false);
            bi->busy = json_opt_bool(b, "busy", false);
            bi->granularity = (uint32_t)json_opt_int(b, "granularity", -1);
            bi->count = json_opt_int(b, "count", -1);
            bi->generation =
                json_opt_str(b, "generation")
                ? backup_strdup(json_opt_str(b, "generation")) : NULL;
            bi->prior_generation =
                json_opt_str(b, "prior-generation")
                ? backup_strdup(json_opt_str(b, "prior-generation")) : NULL;
            d->n_bitmaps++;
        }
    }
    return true;
}

static bool live_job_exists(QmpConn *qmp, const char *id, const char **ret_status,
                            struct json_object **ret_jobs, Error **errp)
{
    struct json_object *jobs = qmp_conn_execute(qmp, "query-jobs", NULL, errp);

    *ret_status = NULL;
    if (!jobs) {
        return false;
    }
    for (size_t i = 0; i < json_object_array_length(jobs); i++) {
        struct json_object *j = json_object_array_get_idx(jobs, i);
        const char *jid = json_opt_str(j, "id");

        if (jid && !strcmp(jid, id)) {
            *ret_status = json_opt_str(j, "status");
            break;
        }
    }
    *ret_jobs = jobs;
    return true;
}

/* Step 1: a killed run may have left its job running, and its temporary
 * bitmaps.  Cancel and dismiss the job, remove PREFIX-*.src. */
/* Cancel (or finalize) and dismiss the job d->job_id until the daemon
 * has none by that ID (bounded: 60 s). */
static bool live_end_job(QmpConn *qmp, Disk *d, Error **errp)
{
    for (int tries = 0; tries < 6000; tries++) {
        const char *status;
        _cleanup_json_ struct json_object *jobs = NULL;
        struct json_object *r = NULL;

        if (!live_job_exists(qmp, d->job_id, &status, &jobs, errp)) {
            return false;
        }
        if (!status) {
            break;
        }
        if (!strcmp(status, "concluded")) {
            struct json_object *a = json_object_new_object();
            json_object_object_add(a, "id", json_object_new_string(d->job_id));
            r = qmp_conn_execute(qmp, "job-dismiss", a, NULL);
        } else if (!strcmp(status, "pending")) {
            struct json_object *a = json_object_new_object();
            json_object_object_add(a, "id", json_object_new_string(d->job_id));
            r = qmp_conn_execute(qmp, "job-finalize", a, NULL);
        } else if (tries == 0 || strcmp(status, "aborting")) {
            struct json_object *a = json_object_new_object();
            json_object_object_add(a, "id", json_object_new_string(d->job_id));
            r = qmp_conn_execute(qmp, "job-cancel", a, NULL);
        }
        json_object_put(r);
        usleep(10000);
    }
    return true;
}

static void pull_remove_export_and_node(QmpConn *qmp, Disk *d, bool quiet);
static bool live_is_bitbackd(QmpConn *qmp);
static struct json_object *one_arg(const char *key, const char *value);

/* Bounds of live_del_target's wait for the finished job to let go of the
 * target node (the daemon drops its reference after the completion event). */
#define TARGET_DEL_TRIES 500
#define TARGET_DEL_WAIT_US 10000

/* Remove d's target node from the daemon (blockdev-del flushes and closes
 * it: only then is the qcow2 in the image complete) when this run added
 * it, retrying while the finished job still holds it (bounded); quiet:
 * a killed run's node, absent or not, errors ignored.  False with errp
 * set when the node could not be removed. */
static bool live_del_node(QmpConn *qmp, Disk *d, const char *node, bool quiet,
                          Error **errp);

static bool live_del_target(QmpConn *qmp, Disk *d, bool quiet, Error **errp)
{
    if (!quiet && !d->target_added) {
        return true;
    }
    bool ok = live_del_node(qmp, d, d->target, quiet, errp);
    char parent[sizeof(d->target) + 2];
    snprintf(parent, sizeof(parent), "%s-p", d->target);
    /* The parent node goes once the target no longer holds it. */
    return live_del_node(qmp, d, parent, true, NULL) && ok;
}

/* blockdev-del of node, as live_del_target describes. */
static bool live_del_node(QmpConn *qmp, Disk *d, const char *node, bool quiet,
                          Error **errp)
{
    for (int i = 0;; i++) {
        Error *err = NULL;
        struct json_object *r = qmp_conn_execute(
            qmp, "blockdev-del", one_arg("node-name", node), &err);
        if (r || quiet) {
            json_object_put(r);
            error_free(err);
            d->target_added = false;
            return true;
        }
        const char *msg = error_get_pretty(err);
        if (i + 1 >= TARGET_DEL_TRIES ||
            (!strstr(msg, "in use") && !strstr(msg, "busy"))) {
            error_prepend(&err, "%s: cannot close the node %s: ",
                          d->node, node);
            error_propagate(errp, err);
            return false;
        }
        error_free(err);
        usleep(TARGET_DEL_WAIT_US);
    }
}

/* A push into a repository whose files the daemon cannot open by name (a
 * rados repository: the target's header records its parent as
 * "ID.qcow2", which resolves to no image next to an rbd: name): the
 * daemon gets the target as a node of its own, opened with the
 * repository's options (repo_overlay_options: its parent attached
 * read-only), and the job writes into that node.  Nothing for
 * repositories opened by name. */
static bool live_add_target(QmpConn *qmp, Disk *d, Error **errp)
{
    if (d->pull || !d->tmp_options) {
        return true;
    }
    struct json_object *a = NULL;
    if (json_object_deep_copy(d->tmp_options, &a, NULL) < 0) {
        error_setg(errp, "out of memory");
        return false;
    }
    /* The parent first, as a node of its own that the target names:
     * QEMU computes a backing file name for a nested definition, which an
     * rbd node cannot give. */
    struct json_object *parent = NULL, *r;
    if (json_object_object_get_ex(a, "backing", &parent) && parent) {
        char name[sizeof(d->target) + 2];
        snprintf(name, sizeof(name), "%s-p", d->target);
        parent = json_object_get(parent);
        json_object_object_add(parent, "node-name", json_object_new_string(name));
        json_object_object_add(parent, "read-only", json_object_new_boolean(true));
        json_object_object_add(a, "backing", json_object_new_string(name));
        r = qmp_conn_execute(qmp, "blockdev-add", parent, errp);
        if (!r) {
            json_object_put(a);
            error_prepend(errp, "%s: cannot open the parent of %s: ", d->node,
                          d->tmp_block);
            return false;
        }
        json_object_put(r);
        d->target_added = true;        /* live_del_target removes both */
    }
    json_object_object_add(a, "node-name", json_object_new_string(d->target));
    r = qmp_conn_execute(qmp, "blockdev-add", a, errp);
    if (!r) {
        error_prepend(errp, "%s: cannot open the target %s: ", d->node,
                      d->tmp_block);
        return false;
    }
    json_object_put(r);
    d->target_added = true;
    return true;
}

static bool live_cleanup(QmpConn *qmp, const BackupOpts *o, Disk *d,
                         Error **errp)
{
    if (!live_end_job(qmp, d, errp)) {
        return false;
    }
    /* A killed pull's fleecing export and node, a killed push's target
     * node (absent: nothing). */
    pull_remove_export_and_node(qmp, d, true);
    live_del_target(qmp, d, true, NULL);
    if (!live_query_disk(qmp, d, errp)) {
        return false;
    }
    for (size_t i = 0; i < d->n_bitmaps; i++) {
        const char *name = d->bitmaps[i].name;
        size_t len = strlen(name);
        char base[BDRV_BITMAP_MAX_NAME + 1];

        /* Only PREFIX-N.src: another repository's run may be using its
         * own temporary bitmap right now. */
        if (len <= 4 || len > BDRV_BITMAP_MAX_NAME ||
            strcmp(name + len - 4, ".src")) {
            continue;
        }
        memcpy(base, name, len - 4);
        base[len - 4] = '\0';
        if (repo_bitmap_seq(o->prefix, base)) {
            struct json_object *r = qmp_conn_execute(
                qmp, "block-dirty-bitmap-remove", bitmap_args(d->node, name),
                errp);
            if (!r) {
                return false;
            }
            json_object_put(r);
        }
    }
    return live_query_disk(qmp, d, errp);
}

/* Keep, of this repository's RBD snapshots of d's image (PREFIX-N), only
 * the newest committed backup's: a killed run's, and those of older
 * backups, are deleted (step 1 and step 7).  A failed delete is reported,
 * not fatal: the next run tries again. */
static void live_prune_snapshots(QmpConn *qmp, Repo *repo, const BackupOpts *o,
                                 Disk *d)
{
    RepoManifest *latest = repo_latest(repo, d->node);

    for (size_t i = 0; d->ours && i < d->n_snapshots; i++) {
        unsigned seq = repo_bitmap_seq(o->prefix, d->snapshots[i]);
        Error *err = NULL;

        if (!seq || (latest && seq == latest->seq)) {
            continue;
        }
        struct json_object *a = json_object_new_object();
        json_object_object_add(a, "device", json_object_new_string(d->node));
        json_object_object_add(a, "name", json_object_new_string(d->snapshots[i]));
        struct json_object *r = qmp_conn_execute(
            qmp, "blockdev-snapshot-delete-internal-sync", a, &err);
        if (!r) {
            error_prepend(&err, "%s: cannot delete snapshot '%s': ", d->node,
                          d->snapshots[i]);
            error_report_err(err);
        }
        json_object_put(r);
    }
}

/* ---- Pull: the backup read over NBD (docs/specs/repository.md, Pull) ----
 *
 * A full from a daemon other than bitbackd is pulled (QEMU's full backup
 * job visits every 1 MiB of the virtual size: a 1 TiB empty disk took
 * 98 s, a 64 TiB one hours); with --pull every disk is, fulls and
 * incrementals, from any daemon.  QEMU's documented image fleecing: a
 * temporary qcow2 overlay node whose backing is the disk, a
 * blockdev-backup sync=none job into it in the run's transaction (so the
 * overlay keeps the point in time: the job copies old data there before a
 * guest write lands), the overlay exported read-only over NBD (an
 * incremental's with its frozen PREFIX-N.src bitmap), and bitback reads
 * it -- a full's data ranges by block status, an incremental's dirty
 * extents from qemu:dirty-bitmap:PREFIX-N.src (pull_probe_export) --
 * writing the backup's qcow2 itself (backup_copy_extents).  Then the job
 * is cancelled and the export, node, files and the NBD server (when no
 * other run uses it) removed.  The fleecing node is "bbf-" + 8 hex digits
 * of the repository's UUID + a hash of the disk name, its overlay file
 * that name in a fixed per-user folder: a killed run's are found and
 * removed by the next (live_cleanup), and never another repository's. */

typedef struct Pull {
    char *dir;                  /* PULL_DIR_FMT: overlays, our socket */
    char *sock;                 /* the NBD server's UNIX socket */
    bool ours;                  /* the server is bitback's (at sock in dir,
                                 * started by this run or a killed one) */
    /* A remote daemon (QMP over TCP, docs/specs/repository.md "Pull"):
     * its NBD server at nbd_host:nbd_port (--nbd-server); the overlays
     * are the daemon's files, made with blockdev-create. */
    bool remote;
    char *nbd_host, *nbd_port;
    const TLSCreds *tls;        /* --tls-creds: NBD reads with TLS */
    const char *tls_id;
} Pull;

/* The per-user folder of the pulls' overlays and sockets, under $TMPDIR
 * (or /tmp).  Fixed, so that the next run finds what a killed run left
 * there (pull_remove_export_and_node unlinks its overlay, pull_setup
 * reuses its NBD server). */
#define PULL_DIR_FMT "%s/bitback-pull-%u"

static uint32_t name_hash(const char *s)
{
    uint32_t h = 2166136261u;            /* FNV-1a */
    for (; *s; s++) {
        h = (h ^ (uint8_t)*s) * 16777619u;
    }
    return h;
}

/* d's fleecing node name ("bbf-" + 8 hex digits of the repository's UUID
 * + a hash of the disk name: another repository's live fleecing of the
 * same disk has another name) and its overlay's path in dir. */
static void pull_name(const Repo *repo, const char *dir, Disk *d)
{
    snprintf(d->fleece, sizeof(d->fleece), "bbf-%.8s-%08x", repo->uuid,
             name_hash(d->node));
    snprintf(d->target, sizeof(d->target), "bbt-%s", d->fleece + 4);
    free(d->fleece_path);
    d->fleece_path = NULL;
    if (dir && asprintf(&d->fleece_path, "%s/%s.qcow2", dir, d->fleece) < 0) {
        abort();
    }
}

/* The name of a remote overlay's file node (ret: 40 bytes). */
static void pull_file_node(const Disk *d, char *ret)
{
    snprintf(ret, 40, "%s-f", d->fleece);
}

/* PULL_DIR_FMT for this user (caller frees); not created. */
static char *pull_dir_name(void)
{
    const char *tmpdir = getenv("TMPDIR");
    char *dir;

    if (asprintf(&dir, PULL_DIR_FMT, tmpdir && *tmpdir ? tmpdir : "/tmp",
                 (unsigned)getuid()) < 0) {
        abort();
    }
    return dir;
}

/* Create pl->dir when missing; refuse one that is not a private folder
 * of this user (another user could swap the overlays). */
static bool pull_make_dir(const Pull *pl, Error **errp)
{
    struct stat st;

    if (mkdir(pl->dir, 0700) < 0 && errno != EEXIST) {
        error_setg_errno(errp, errno, "cannot create %s", pl->dir);
        return false;
    }
    if (lstat(pl->dir, &st) < 0) {
        error_setg_errno(errp, errno, "%s", pl->dir);
        return false;
    }
    if (!S_ISDIR(st.st_mode) || st.st_uid != getuid() ||
        (st.st_mode & 077)) {
        error_setg(errp, "%s is not a private folder of this user", pl->dir);
        return false;
    }
    return true;
}

/* The NBD URI of export name on the server pl reads from (the one place
 * it is built): the UNIX socket (--nbd-socket or bitback's) or the TCP
 * server of --nbd-server; nbds (TLS) with --tls-creds, whose files the
 * readers give libnbd (pull_open_source, pull_probe_export). */
static char *pull_uri(const Pull *pl, const char *name)
{
    const char *tls = pl->tls ? "s" : "";
    char *uri;
    int r;

    if (pl->nbd_host) {
        bool v6 = strchr(pl->nbd_host, ':') != NULL;
        r = asprintf(&uri, "nbd%s://%s%s%s:%s/%s", tls, v6 ? "[" : "",
                     pl->nbd_host, v6 ? "]" : "", pl->nbd_port, name);
    } else {
        r = asprintf(&uri, "nbd%s+unix:///%s?socket=%s", tls, name, pl->sock);
    }
    if (r < 0) {
        abort();
    }
    return uri;
}

/* A read-only node on the export at uri: the nbd driver, with the
 * tls-creds object when pl has one. */
static BlockDriverState *pull_open_source(const Pull *pl, const char *uri,
                                          Error **errp)
{
    if (!pl->tls) {
        return bdrv_open_image(uri, "raw", 0, errp);
    }
    _cleanup_json_ struct json_object *opts = json_object_new_object();
    json_object_object_add(opts, "driver", json_object_new_string("nbd"));
    json_object_object_add(opts, "filename", json_object_new_string(uri));
    json_object_object_add(opts, "tls-creds", json_object_new_string(pl->tls_id));
    json_object_object_add(opts, "read-only", json_object_new_boolean(true));
    return bdrv_open_options(opts, 0, errp);
}

static struct json_object *one_arg(const char *key, const char *value)
{
    struct json_object *a = json_object_new_object();
    json_object_object_add(a, key, json_object_new_string(value));
    return a;
}

/* Wait (bounded: 10 s) until the daemon lists no export with ID id. */
static void pull_wait_export_gone(QmpConn *qmp, const char *id)
{
    for (int tries = 0; tries < 1000; tries++) {
        _cleanup_json_ struct json_object *ex =
            qmp_conn_execute(qmp, "query-block-exports", NULL, NULL);
        bool found = false;

        for (size_t i = 0; ex && i < json_object_array_length(ex); i++) {
            const char *eid = json_opt_str(json_object_array_get_idx(ex, i), "id");
            found |= eid && !strcmp(eid, id);
        }
        if (!found) {
            return;
        }
        usleep(10000);
    }
}

/* Remove d's fleecing export and node, best effort (quiet: whether they
 * exist is not known, as for a killed run's). */
static void pull_remove_export_and_node(QmpConn *qmp, Disk *d, bool quiet)
{
    if (!d->fleece[0] || (!quiet && !d->export_added && !d->fleece_added &&
                          !d->fleece_file_added)) {
        return;
    }
    if (quiet || d->export_added) {
        struct json_object *a = one_arg("id", d->fleece);
        json_object_object_add(a, "mode", json_object_new_string("hard"));
        json_object_put(qmp_conn_execute(qmp, "block-export-del", a, NULL));
        pull_wait_export_gone(qmp, d->fleece);
        d->export_added = false;
    }
    if (quiet || d->fleece_added) {
        json_object_put(qmp_conn_execute(qmp, "blockdev-del",
                                         one_arg("node-name", d->fleece), NULL));
        d->fleece_added = false;
    }
    if (d->fleece_remote && (quiet || d->fleece_file_added)) {
        /* bitbackd removes the file with the node (x-remove-on-close) */
        char fnode[40];
        pull_file_node(d, fnode);
        json_object_put(qmp_conn_execute(qmp, "blockdev-del",
                                         one_arg("node-name", fnode), NULL));
        d->fleece_file_added = false;
    }
    if (d->fleece_path) {
        unlink(d->fleece_path);
    }
}

/* Start the daemon's NBD server on pl->sock (nbd-server-start). */
static bool pull_start_server(QmpConn *qmp, const Pull *pl, Error **errp)
{
    struct json_object *addr = one_arg("type", "unix");
    struct json_object *a = json_object_new_object();
    struct json_object *r;

    json_object_object_add(addr, "data", one_arg("path", pl->sock));
    json_object_object_add(a, "addr", addr);
    r = qmp_conn_execute(qmp, "nbd-server-start", a, errp);
    json_object_put(r);
    return r != NULL;
}

/* Whether a server listens on the UNIX socket path.  A stale socket file
 * (its daemon is gone) is removed: it must not make a server the daemon
 * runs elsewhere look like bitback's (which the run would then stop). */
static bool pull_socket_answers(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct stat st;
    int fd;
    bool ok;

    if (lstat(path, &st) < 0 || !S_ISSOCK(st.st_mode) ||
        strlen(path) >= sizeof(sa.sun_path)) {
        return false;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return false;
    }
    ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    if (!ok && errno == ECONNREFUSED) {
        unlink(path);
    }
    close(fd);
    return ok;
}

/* Run blockdev-create with options (taken) as job job_id, wait for it to
 * conclude (bounded: PULL_CREATE_WAIT_MS) and dismiss it.  false with
 * errp set (the job's error, or a timeout). */
#define PULL_CREATE_WAIT_MS 60000
static bool pull_blockdev_create(QmpConn *qmp, const char *job_id,
                                 struct json_object *options, Error **errp)
{
    struct json_object *a = one_arg("job-id", job_id);
    json_object_object_add(a, "options", options);
    struct json_object *r = qmp_conn_execute(qmp, "blockdev-create", a, errp);
    if (!r) {
        return false;
    }
    json_object_put(r);
    _cleanup_free_ char *job_error = NULL;
    bool concluded = false;
    for (int ms = 0; !concluded && ms < PULL_CREATE_WAIT_MS; ms += 10) {
        _cleanup_json_ struct json_object *jobs =
            qmp_conn_execute(qmp, "query-jobs", NULL, errp);
        if (!jobs) {
            return false;
        }
        for (size_t i = 0; i < json_object_array_length(jobs); i++) {
            struct json_object *j = json_object_array_get_idx(jobs, i);
            const char *id = json_opt_str(j, "id");
            const char *st = json_opt_str(j, "status");
            if (id && st && !strcmp(id, job_id) && !strcmp(st, "concluded")) {
                concluded = true;
                if (json_opt_str(j, "error")) {
                    job_error = backup_strdup(json_opt_str(j, "error"));
                }
            }
        }
        if (!concluded) {
            usleep(10000);
        }
    }
    if (!concluded) {
        json_object_put(qmp_conn_execute(qmp, "job-cancel",
                                         one_arg("id", job_id), NULL));
        error_setg(errp, "blockdev-create: job %s did not end in %d s",
                   job_id, PULL_CREATE_WAIT_MS / 1000);
        return false;
    }
    json_object_put(qmp_conn_execute(qmp, "job-dismiss", one_arg("id", job_id),
                                     NULL));
    if (job_error) {
        error_setg(errp, "blockdev-create: %s", job_error);
        return false;
    }
    return true;
}

/* The folder on the daemon's host for d's overlay: --fleece-dir, else the
 * folder of the disk's image (where the disk already has room and the
 * daemon may write); a new string, or NULL with errp set. */
static char *pull_remote_dir(const BackupOpts *o, const Disk *d, Error **errp)
{
    if (o->fleece_dir) {
        if (o->fleece_dir[0] != '/') {
            error_setg(errp, "--fleece-dir must be an absolute path on the "
                       "daemon's host, not '%s'", o->fleece_dir);
            return NULL;
        }
        return backup_strdup(o->fleece_dir);
    }
    if (!d->image_file || d->image_file[0] != '/') {
        error_setg(errp, "%s: the daemon reports no absolute image file name "
                   "to put the fleecing overlay next to; give --fleece-dir",
                   d->node);
        return NULL;
    }
    char *dir = path_dirname(d->image_file);
    if (!dir) {
        abort();
    }
    return dir;
}

/* Before the transaction, with a remote daemon: each pulled disk's
 * overlay, made by the daemon in its folder (pull_remote_dir) as QEMU's
 * blockdev-create recipe does it: a file, its file node (bitbackd:
 * removed with the node), a qcow2 in it (1 MiB clusters, see
 * pull_setup), the fleecing node over it with the disk as backing.  The
 * NBD server is the daemon's own (--nbd-server). */
static bool pull_setup_remote(QmpConn *qmp, const BackupOpts *o, Disk *disks,
                              size_t n, Pull *pl, Error **errp)
{
    for (size_t i = 0; i < n; i++) {
        Disk *d = &disks[i];
        char fnode[40], job[64];

        if (!d->pull) {
            continue;
        }
        _cleanup_free_ char *dir = pull_remote_dir(o, d, errp);
        _cleanup_free_ char *path = NULL;
        if (!dir) {
            return false;
        }
        if (asprintf(&path, "%s/%s.qcow2", dir, d->fleece) < 0) {
            abort();
        }
        pull_file_node(d, fnode);
        snprintf(job, sizeof(job), "%s-create", d->fleece);
        struct json_object *fo = one_arg("driver", "file");
        json_object_object_add(fo, "filename", json_object_new_string(path));
        json_object_object_add(fo, "size", json_object_new_int64(0));
        if (!pull_blockdev_create(qmp, job, fo, errp)) {
            error_prepend(errp, "%s: cannot create %s on the daemon's host: ",
                          d->node, path);
            return false;
        }
        struct json_object *a = one_arg("driver", "file");
        json_object_object_add(a, "node-name", json_object_new_string(fnode));
        json_object_object_add(a, "filename", json_object_new_string(path));
        if (d->ours) {
            json_object_object_add(a, "x-remove-on-close",
                                   json_object_new_boolean(true));
        }
        struct json_object *r = qmp_conn_execute(qmp, "blockdev-add", a, errp);
        if (!r) {
            error_prepend(errp, "%s: cannot open the overlay's file: ", d->node);
            return false;
        }
        json_object_put(r);
        d->fleece_file_added = true;
        struct json_object *qo = one_arg("driver", "qcow2");
        json_object_object_add(qo, "file", json_object_new_string(fnode));
        json_object_object_add(qo, "size", json_object_new_int64((int64_t)d->size));
        json_object_object_add(qo, "cluster-size", json_object_new_int64(1 << 20));
        if (!pull_blockdev_create(qmp, job, qo, errp)) {
            error_prepend(errp, "%s: cannot format the overlay: ", d->node);
            return false;
        }
        a = one_arg("driver", "qcow2");
        json_object_object_add(a, "node-name", json_object_new_string(d->fleece));
        json_object_object_add(a, "file", json_object_new_string(fnode));
        json_object_object_add(a, "backing", json_object_new_string(d->node));
        r = qmp_conn_execute(qmp, "blockdev-add", a, errp);
        if (!r) {
            error_prepend(errp, "%s: cannot add the fleecing node: ", d->node);
            return false;
        }
        json_object_put(r);
        d->fleece_added = true;
    }
    return true;
}

/* Before the transaction: the NBD server, and each pulled disk's overlay
 * file and node.  The server: --nbd-socket's, else one bitback starts on
 * its socket in pl->dir (named by the QMP socket, so a run after a
 * killed one finds and reuses the server that one started).  When the
 * daemon already runs a server elsewhere, a full backup without --pull
 * is pushed instead; with --pull that is an error. */
static bool pull_setup(QmpConn *qmp, const BackupOpts *o, Disk *disks,
                       size_t n, Pull *pl, Error **errp)
{
    if (pl->remote) {
        return pull_setup_remote(qmp, o, disks, n, pl, errp);
    }
    if (!pull_make_dir(pl, errp)) {
        return false;
    }
    if (o->nbd_socket) {
        pl->sock = backup_strdup(o->nbd_socket);
    } else {
        _cleanup_free_ char *qmp_abs = realpath(o->connect, NULL);
        Error *err = NULL;

        if (asprintf(&pl->sock, "%s/nbd-%08x.sock", pl->dir,
                     name_hash(qmp_abs ? qmp_abs : o->connect)) < 0) {
            abort();
        }
        if (pull_start_server(qmp, pl, &err)) {
            pl->ours = true;
        } else if (pull_socket_answers(pl->sock)) {
            /* A server bitback started for this daemon (a killed run's,
             * or a concurrent run's of another repository): use it. */
            error_free(err);
            pl->ours = true;
        } else if (o->pull) {
            error_prepend(&err, "the daemon runs its own NBD server; give "
                          "its socket with --nbd-socket: ");
            error_propagate(errp, err);
            return false;
        } else {
            /* It runs its own server, whose address QMP does not tell:
             * push as before rather than fail. */
            for (size_t i = 0; i < n; i++) {
                if (disks[i].pull) {
                    fprintf(stderr, "%s: the daemon runs its own NBD server "
                            "(%s): pushing this full backup (QEMU's job visits "
                            "the whole virtual size); give the server's socket "
                            "with --nbd-socket to pull only the data\n",
                            disks[i].node, error_get_pretty(err));
                    disks[i].pull = false;
                }
            }
            error_free(err);
            return true;
        }
    }
    for (size_t i = 0; i < n; i++) {
        Disk *d = &disks[i];
        struct json_object *a, *file, *r;

        if (!d->pull) {
            continue;
        }
        /* 1 MiB clusters: QEMU's fleecing job copies (before a guest
         * write) and tracks in clusters of the overlay, at least 64 KiB;
         * at 64 KiB its copy bitmap of a 64 TiB disk is 128 MiB set at
         * once (0.3 s in the transaction), at 1 MiB 8 MiB. */
        _cleanup_json_ struct json_object *copts = one_arg("cluster_size",
                                                           "1048576");
        if (!bdrv_img_create(d->fleece_path, "qcow2", d->size, copts, errp)) {
            error_prepend(errp, "%s: ", d->node);
            return false;
        }
        a = one_arg("driver", "qcow2");
        file = one_arg("driver", "file");
        json_object_object_add(file, "filename",
                               json_object_new_string(d->fleece_path));
        json_object_object_add(a, "node-name", json_object_new_string(d->fleece));
        json_object_object_add(a, "file", file);
        json_object_object_add(a, "backing", json_object_new_string(d->node));
        r = qmp_conn_execute(qmp, "blockdev-add", a, errp);
        if (!r) {
            unlink(d->fleece_path);
            error_prepend(errp, "%s: cannot add the fleecing node: ", d->node);
            return false;
        }
        json_object_put(r);
        d->fleece_added = true;
    }
    return true;
}

/* block-export-add of d's fleecing node (read-only; an incremental's
 * also carries its frozen bitmap d->src_bitmap, found down the node's
 * backing chain, as qemu:dirty-bitmap:NAME). */
static struct json_object *pull_export_add(QmpConn *qmp, const Disk *d,
                                           Error **errp)
{
    struct json_object *a = one_arg("type", "nbd");

    json_object_object_add(a, "id", json_object_new_string(d->fleece));
    json_object_object_add(a, "node-name", json_object_new_string(d->fleece));
    json_object_object_add(a, "name", json_object_new_string(d->fleece));
    json_object_object_add(a, "writable", json_object_new_boolean(false));
    if (d->level != REPO_LEVEL_FULL) {
        struct json_object *bms = json_object_new_array();

        json_object_array_add(bms, json_object_new_string(d->src_bitmap));
        json_object_object_add(a, "bitmaps", bms);
    }
    return qmp_conn_execute(qmp, "block-export-add", a, errp);
}

/* After the transaction: export each pulled disk's point in time, read it
 * over NBD into its target (a full: what block status reports as data;
 * else the extents the exported bitmap marks dirty), through
 * BACKUP_MAX_COPY_CONNS connections when the server allows multi-conn,
 * check the fleecing job still runs (else the point in time may be
 * broken), then end the job and remove the export and node.  A SIGINT or
 * SIGTERM stops the copy (the error says "interrupted"). */
static bool pull_copy(QmpConn *qmp, const BackupOpts *o, Disk *d,
                      const Pull *pl, Error **errp)
{
    struct json_object *r;
    _cleanup_free_ char *uri = NULL;
    _cleanup_json_ struct json_object *jobs = NULL;
    BlockDriverState *srcs[BACKUP_MAX_COPY_CONNS] = { 0 };
    size_t n_src = 0;
    BdrvDirtyExtent *ext = NULL;
    size_t n_ext = 0;
    const char *status = NULL;
    bool multi = false, ok;

    r = pull_export_add(qmp, d, errp);
    if (!r && pl->ours) {
        /* A concurrent run of another repository may have stopped the
         * server it shared with this one: start it again, once. */
        Error *err = NULL;

        if (pull_start_server(qmp, pl, &err)) {
            error_free(*errp);
            *errp = NULL;
            r = pull_export_add(qmp, d, errp);
        } else {
            error_free(err);
        }
    }
    if (!r) {
        error_prepend(errp, "%s: cannot export the point in time: ", d->node);
        return false;
    }
    json_object_put(r);
    d->export_added = true;
    uri = pull_uri(pl, d->fleece);
    if (!pull_probe_export(uri, pl->tls, d->level == REPO_LEVEL_FULL ? NULL
                                                            : d->src_bitmap,
                           d->size, &multi, &ext, &n_ext, errp)) {
        error_prepend(errp, "%s: ", d->node);
        return false;
    }
    for (n_src = 0; n_src < (multi ? BACKUP_MAX_COPY_CONNS : 1); n_src++) {
        Error *err = NULL;

        /* Past the first, fewer connections than asked: still correct. */
        srcs[n_src] = pull_open_source(pl, uri, n_src ? &err : errp);
        if (!srcs[n_src]) {
            error_free(err);
            break;
        }
    }
    ok = n_src > 0;
    if (ok && d->level == REPO_LEVEL_FULL) {
        ok = backup_data_extents(srcs[0], d, &ext, &n_ext, errp);
    }
    if (ok) {
        ok = backup_copy_extents(o, srcs, n_src, d, ext, n_ext, &backup_signal,
                                 errp);
    } else {
        free(ext);
    }
    for (size_t i = 0; i < n_src; i++) {
        bdrv_unref(srcs[i]);
    }
    if (!ok) {
        error_prepend(errp, "%s: ", d->node);
        return false;
    }
    if (!live_job_exists(qmp, d->job_id, &status, &jobs, errp)) {
        return false;
    }
    if (!status || strcmp(status, "running")) {
        error_setg(errp, "%s: the fleecing job ended before the copy did "
                   "(%s): the point in time cannot be vouched for", d->node,
                   status ? status : "gone");
        return false;
    }
    if (!live_end_job(qmp, d, errp)) {
        return false;
    }
    pull_remove_export_and_node(qmp, d, false);
    return true;
}

/* Whether the daemon has a fleecing node of bitback's ("bbf-"), another
 * repository's run's: the NBD server they share then stays. */
static bool pull_others_fleecing(QmpConn *qmp)
{
    _cleanup_json_ struct json_object *nodes =
        qmp_conn_execute(qmp, "query-named-block-nodes", NULL, NULL);

    for (size_t i = 0; nodes && i < json_object_array_length(nodes); i++) {
        const char *name = json_opt_str(json_object_array_get_idx(nodes, i),
                                        "node-name");
        if (name && !strncmp(name, "bbf-", 4)) {
            return true;
        }
    }
    return !nodes;                      /* unknown: leave it */
}

/* Undo pull_setup and what pull_copy left (every exit path): the NBD
 * server bitback runs is stopped once no run uses it.  pl->dir stays
 * (empty): another run may be using it. */
static void pull_finish(QmpConn *qmp, Disk *disks, size_t n, Pull *pl)
{
    for (size_t i = 0; i < n; i++) {
        if (disks[i].pull) {
            if (disks[i].fleece_added || disks[i].export_added) {
                live_end_job(qmp, &disks[i], NULL);
            }
            pull_remove_export_and_node(qmp, &disks[i], false);
        }
    }
    if (pl->ours && !pull_others_fleecing(qmp)) {
        json_object_put(qmp_conn_execute(qmp, "nbd-server-stop", NULL, NULL));
        unlink(pl->sock);
    }
    free(pl->dir);
    free(pl->sock);
    free(pl->nbd_host);
    free(pl->nbd_port);
    *pl = (Pull){ 0 };
}

/* Step 4: one transaction over every disk. */
/* The daemon is bitbackd (its query-version package), which takes
 * x-compress-level; qemu-storage-daemon would refuse the argument. */
static bool live_is_bitbackd(QmpConn *qmp)
{
    struct json_object *r = qmp_conn_execute(qmp, "query-version", NULL, NULL);
    const char *pkg = r ? json_opt_str(r, "package") : NULL;
    bool ours = pkg && !strncmp(pkg, "bitback", 7);
    json_object_put(r);
    return ours;
}

static bool live_transaction(QmpConn *qmp, const BackupOpts *o, Disk *disks,
                             size_t n, Error **errp)
{
    /* The run asked the daemon once (Disk.ours). */
    bool send_level = o->compress && o->compress_level && n && disks[0].ours;

    struct json_object *args = json_object_new_object();
    struct json_object *actions = json_object_new_array();
    struct json_object *r;

    for (size_t i = 0; i < n; i++) {
        Disk *d = &disks[i];
        struct json_object *a = bitmap_args(d->node, d->new_bitmap);
        struct json_object *job = json_object_new_object();

        json_object_object_add(a, "persistent",
                               json_object_new_boolean(!d->volatile_bitmaps));
        if (d->volatile_bitmaps) {
            fprintf(stderr, "%s: a %s node cannot store persistent bitmaps: "
                    "'%s' lives in the daemon's memory, so the first run "
                    "after the daemon restarts takes a full backup\n",
                    d->node, d->drv, d->new_bitmap);
        }
        if (d->granularity) {
            json_object_object_add(a, "granularity",
                                   json_object_new_int64(d->granularity));
        }
        add_action(actions, "block-dirty-bitmap-add", a);
        for (size_t j = 0; j < d->n_freeze; j++) {
            add_action(actions, "block-dirty-bitmap-disable",
                       bitmap_args(d->node, d->freeze[j]));
        }
        if (d->rbd_snapshots) {
            /* The image at this point in time, named as the new bitmap:
             * the next run's fallback when bitmaps are lost. */
            a = json_object_new_object();
            json_object_object_add(a, "device", json_object_new_string(d->node));
            json_object_object_add(a, "name", json_object_new_string(d->new_bitmap));
            add_action(actions, "blockdev-snapshot-internal-sync", a);
        }
        if (d->level != REPO_LEVEL_FULL) {
            a = bitmap_args(d->node, d->src_bitmap);
            json_object_object_add(a, "persistent", json_object_new_boolean(false));
            json_object_object_add(a, "disabled", json_object_new_boolean(true));
            json_object_object_add(a, "granularity",
                                   json_object_new_int64(d->granularity));
            if (d->since_snapshot) {
                /* No bitmap holds the change: RBD's diff since the
                 * parent's snapshot does, at this same point. */
                json_object_object_add(a, "x-changed-since-snapshot",
                                       json_object_new_string(d->since_snapshot));
            }
            add_action(actions, "block-dirty-bitmap-add", a);
        }
        if (d->level != REPO_LEVEL_FULL && !d->since_snapshot) {
            struct json_object *srcs = json_object_new_array();

            for (size_t j = 0; j < d->n_sources; j++) {
                json_object_array_add(srcs, json_object_new_string(d->sources[j]));
            }
            a = json_object_new_object();
            json_object_object_add(a, "node", json_object_new_string(d->node));
            json_object_object_add(a, "target", json_object_new_string(d->src_bitmap));
            json_object_object_add(a, "bitmaps", srcs);
            add_action(actions, "block-dirty-bitmap-merge", a);
        }
        json_object_object_add(job, "job-id", json_object_new_string(d->job_id));
        json_object_object_add(job, "device", json_object_new_string(d->node));
        if (d->pull) {
            json_object_object_add(job, "target", json_object_new_string(d->fleece));
            json_object_object_add(job, "sync", json_object_new_string("none"));
            add_action(actions, "blockdev-backup", job);
            continue;
        }
        if (d->target_added) {
            json_object_object_add(job, "target", json_object_new_string(d->target));
        } else {
            json_object_object_add(job, "target", json_object_new_string(d->tmp_block));
            json_object_object_add(job, "format", json_object_new_string("qcow2"));
            json_object_object_add(job, "mode", json_object_new_string("existing"));
        }
        if (d->level == REPO_LEVEL_FULL) {
            /* Without a backing chain "top" copies the same bytes, and
             * QEMU then skips what the image does not allocate in big
             * block status steps; "full" makes it visit every 1 MiB of
             * the virtual size (a 1 TiB empty disk took 98 s). */
            json_object_object_add(job, "sync", json_object_new_string(
                                       d->no_backing ? "top" : "full"));
        } else {
            json_object_object_add(job, "sync", json_object_new_string("bitmap"));
            json_object_object_add(job, "bitmap", json_object_new_string(d->src_bitmap));
            json_object_object_add(job, "bitmap-mode", json_object_new_string("never"));
        }
        if (o->speed) {
            json_object_object_add(job, "speed", json_object_new_int64((int64_t)o->speed));
        }
        if (o->compress) {
            /* The target was created with compression_type=zstd. */
            json_object_object_add(job, "compress", json_object_new_boolean(true));
        }
        if (send_level) {
            json_object_object_add(job, "x-compress-level",
                                   json_object_new_int(o->compress_level));
        }
        add_action(actions, d->target_added ? "blockdev-backup" : "drive-backup", job);
    }
    /* Not completion-mode "grouped": QEMU refuses it next to bitmap
     * actions.  The transaction alone fixes one point in time for every
     * disk; a failed job cancels the others (live_wait_jobs) and nothing
     * of the run is committed. */
    json_object_object_add(args, "actions", actions);
    r = qmp_conn_execute(qmp, "transaction", args, errp);
    if (!r) {
        return false;
    }
    json_object_put(r);
    return true;
}

static Disk *disk_by_job(Disk *disks, size_t n, const char *job_id)
{
    for (size_t i = 0; i < n && job_id; i++) {
        if (!strcmp(disks[i].job_id, job_id)) {
            return &disks[i];
        }
    }
    return NULL;
}

/* Step 5: wait for BLOCK_JOB_COMPLETED / BLOCK_JOB_CANCELLED of every job,
 * drawing progress from query-block-jobs. */
static bool live_wait_jobs(QmpConn *qmp, const BackupOpts *o, Disk *disks,
                           size_t n, Error **errp)
{
    size_t left = 0;
    CliProgress *p = cli_progress_new("backup", 0, cli_progress_wanted(o->progress));

    for (size_t i = 0; i < n; i++) {
        left += !disks[i].pull;          /* a pulled disk's job was ended */
    }
    bool want_progress = cli_progress_wanted(o->progress);

    while (left) {
        Error *err = NULL;
        struct json_object *ev;

        if (backup_signal) {
            error_setg(errp, "interrupted by %s", strsignal(backup_signal));
            cli_progress_finish(p);
            return false;
        }
        ev = qmp_conn_next_event(qmp, 250, &err);

        if (!ev && err) {
            error_propagate(errp, err);
            cli_progress_finish(p);
            return false;
        }
        if (ev) {
            const char *name = json_opt_str(ev, "event");
            struct json_object *data = NULL;
            Disk *d;

            json_object_object_get_ex(ev, "data", &data);
            d = disk_by_job(disks, n, json_opt_str(data, "device"));
            if (d && !d->pull && name && (!strcmp(name, "BLOCK_JOB_COMPLETED") ||
                              !strcmp(name, "BLOCK_JOB_CANCELLED"))) {
                const char *msg = json_opt_str(data, "error");

                if (!strcmp(name, "BLOCK_JOB_CANCELLED") || msg) {
                    d->job_failed = true;
                    d->job_error = backup_strdup(msg ? msg : "the job was cancelled");
                    /* The set fails as a whole: stop the other jobs. */
                    for (size_t i = 0; i < n; i++) {
                        if (&disks[i] != d) {
                            struct json_object *a = json_object_new_object();

                            json_object_object_add(
                                a, "id", json_object_new_string(disks[i].job_id));
                            json_object_put(qmp_conn_execute(qmp, "job-cancel",
                                                             a, NULL));
                        }
                    }
                }
                left--;
            }
            json_object_put(ev);
        }
        if (want_progress && left) {
            _cleanup_json_ struct json_object *jobs =
                qmp_conn_execute(qmp, "query-block-jobs", NULL, NULL);
            uint64_t done = 0, total = 0;

            for (size_t i = 0; jobs && i < json_object_array_length(jobs); i++) {
                struct json_object *j = json_object_array_get_idx(jobs, i);

                if (disk_by_job(disks, n, json_opt_str(j, "device"))) {
                    done += (uint64_t)MAX(json_opt_int(j, "offset", -1), 0);
                    total += (uint64_t)MAX(json_opt_int(j, "len", -1), 0);
                }
            }
            cli_progress_update(p, done, total);
        }
    }
    cli_progress_finish(p);
    return true;
}

static void live_remove_bitmaps(QmpConn *qmp, const char *node, char **names,
                                size_t n)
{
    for (size_t i = 0; i < n; i++) {
        Error *err = NULL;
        struct json_object *r = qmp_conn_execute(
            qmp, "block-dirty-bitmap-remove", bitmap_args(node, names[i]), &err);

        if (!r) {
            /* Harmless: the next run removes it. */
            error_report("warning: %s: %s", node, error_get_pretty(err));
            error_free(err);
        }
        json_object_put(r);
    }
}

/* Fold this run's bitmaps back (after its jobs ended, not committed): one
 * transaction merges PREFIX-N into every bitmap the run froze, enables
 * them again and removes PREFIX-N.  The older bitmaps then hold every
 * write since their own start, as if the run had never been. */
static bool live_undo_bitmaps(QmpConn *qmp, Disk *disks, size_t n,
                              Error **errp)
{
    struct json_object *args = json_object_new_object();
    struct json_object *actions = json_object_new_array();
    struct json_object *r;

    for (size_t i = 0; i < n; i++) {
        Disk *d = &disks[i];

        for (size_t j = 0; j < d->n_freeze; j++) {
            struct json_object *a = json_object_new_object();
            struct json_object *srcs = json_object_new_array();

            json_object_array_add(srcs, json_object_new_string(d->new_bitmap));
            json_object_object_add(a, "node", json_object_new_string(d->node));
            json_object_object_add(a, "target",
                                   json_object_new_string(d->freeze[j]));
            json_object_object_add(a, "bitmaps", srcs);
            add_action(actions, "block-dirty-bitmap-merge", a);
            add_action(actions, "block-dirty-bitmap-enable",
                       bitmap_args(d->node, d->freeze[j]));
        }
        add_action(actions, "block-dirty-bitmap-remove",
                   bitmap_args(d->node, d->new_bitmap));
    }
    json_object_object_add(args, "actions", actions);
    r = qmp_conn_execute(qmp, "transaction", args, errp);
    json_object_put(r);
    return r != NULL;
}

/*
 * A signal stopped the run before disks[0..n) were committed.  started:
 * their transaction ran.  Cancel the jobs and wait for them to end
 * (live_cleanup, bounded), fold the bitmaps back (live_undo_bitmaps),
 * remove the temporary files and, when no bitmap of the run is left, the
 * attempt markers.  When the jobs or the bitmaps cannot be put back, the
 * bitmap and its marker stay: the next run counts the attempt, exactly as
 * after a failed job (spec, Bitmaps 2-3), so no write is lost either way.
 * Returns the exit status, 128 + the signal.
 */
static int live_interrupted(QmpConn *qmp, Repo *repo, const BackupOpts *o,
                            Disk *disks, size_t n, unsigned seq, bool started)
{
    int sig = backup_signal;
    bool undone = !started;

    if (started) {
        Error *err = NULL;

        undone = true;
        for (size_t i = 0; i < n && undone; i++) {
            undone = live_cleanup(qmp, o, &disks[i], &err);
        }
        undone = undone && live_undo_bitmaps(qmp, disks, n, &err);
        if (!undone) {
            error_prepend(&err, "warning: cannot fold this run's bitmaps "
                          "back; the next run counts them: ");
            error_report_err(err);
        }
    }
    for (size_t i = 0; i < n; i++) {
        Error *err = NULL;

        if (disks[i].tmp_path) {
            repo->storage->remove(disks[i].tmp_path);
        }
        if (undone && !repo_remove_attempt(repo, disks[i].node, seq, &err)) {
            error_prepend(&err, "warning: ");
            error_report_err(err);
        }
        error_report("%s: backup %s interrupted by %s; nothing was committed",
                     disks[i].node, disks[i].id, strsignal(sig));
    }
    return 128 + sig;
}

int backup_live(const BackupOpts *o, Repo *repo)
{
    Error *err = NULL;
    QmpConn *qmp = NULL;
    Disk disks[BACKUP_MAX_DISKS] = {0};
    size_t n = o->n_nodes;
    RepoManifest *made[BACKUP_MAX_DISKS] = {0};
    size_t n_made = 0;
    unsigned seq = 0;
    int ret = CLI_EXIT_ERROR;
    _cleanup_free_ char *time_iso = NULL;
    bool failed = false;
    Pull pull = { .dir = pull_dir_name() };
    _cleanup_(tls_creds_putp) TLSCreds *tls = NULL;
    double t0;

    bool ours;

    backup_catch_signals(true);
    if (o->tls_creds) {
        tls = tls_creds_get(o->tls_creds, false, &err);
        if (!tls) {
            error_prepend(&err, "--tls-creds: ");
            goto out;
        }
        pull.tls = tls;
        pull.tls_id = o->tls_creds;
    }
    /* TLS protects QMP over TCP; a UNIX socket is local (its mode). */
    qmp = qmp_conn_connect(o->connect, qmp_address_is_tcp(o->connect) ? tls
                                                                      : NULL,
                           &err);
    if (!qmp) {
        goto out;
    }
    pull.remote = qmp_conn_is_tcp(qmp);
    if (pull.remote &&
        !inet_parse_host_port(o->nbd_server, &pull.nbd_host, &pull.nbd_port,
                              &err)) {
        error_prepend(&err, "--nbd-server: ");
        goto out;
    }
    ours = live_is_bitbackd(qmp);
    for (size_t i = 0; i < n; i++) {
        disks[i].node = backup_strdup(o->nodes[i]);
        disks[i].ours = ours;
        /* The repository's own job ID: another repository backing up the
         * same disk must never see it as a job of its killed runs. */
        snprintf(disks[i].job_id, sizeof(disks[i].job_id), "bitback-%.8s-%s",
                 repo->uuid, o->nodes[i]);
        pull_name(repo, pull.remote ? NULL : pull.dir, &disks[i]);
        disks[i].fleece_remote = pull.remote;
        for (size_t j = 0; j < i; j++) {
            if (!strcmp(o->nodes[i], o->nodes[j])) {
                error_setg(&err, "node '%s' given twice", o->nodes[i]);
                goto out;
            }
        }
        if (!live_cleanup(qmp, o, &disks[i], &err)) {
            goto out;
        }
        live_prune_snapshots(qmp, repo, o, &disks[i]);
    }
    /* Events so far belong to jobs of earlier runs, which live_cleanup
     * saw end: ours share their job IDs, so forget them. */
    qmp_conn_discard_events(qmp);
    if (!backup_prepare_disks(repo, o, disks, n, &seq, &err)) {
        goto out_tmp;
    }
    if (backup_signal) {
        ret = live_interrupted(qmp, repo, o, disks, n, seq, false);
        goto out;
    }
    {
        bool any = false;

        for (size_t i = 0; i < n; i++) {
            /* --speed: QEMU's job honours the rate limit; a pull
             * would not. */
            disks[i].pull = o->pull ||
                            (disks[i].level == REPO_LEVEL_FULL && !ours &&
                             !o->speed);
            any |= disks[i].pull;
        }
        if (any && !pull_setup(qmp, o, disks, n, &pull, &err)) {
            goto out_tmp;
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (!live_add_target(qmp, &disks[i], &err)) {
            goto out_tmp;
        }
    }
    if (!live_transaction(qmp, o, disks, n, &err)) {
        goto out_tmp;
    }
    time_iso = backup_now_iso(o);
    t0 = clock_monotonic_seconds();
    backup_mark_started(repo, disks, n);
    backup_announce(disks, n);
    for (size_t i = 0; i < n; i++) {
        const BitmapInfo *b;

        if (!live_query_disk(qmp, &disks[i], &err)) {
            goto out_tmp;
        }
        b = backup_disk_bitmap(&disks[i], disks[i].new_bitmap);
        if (b) {
            disks[i].granularity = b->granularity;
            disks[i].generation = b->generation ? backup_strdup(b->generation) : NULL;
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (disks[i].pull && !pull_copy(qmp, o, &disks[i], &pull, &err)) {
            if (backup_signal) {
                error_free(err);
                err = NULL;
                ret = live_interrupted(qmp, repo, o, disks, n, seq, true);
                goto out;
            }
            goto out_tmp;
        }
    }
    if (!live_wait_jobs(qmp, o, disks, n, &err)) {
        if (backup_signal) {
            error_free(err);
            err = NULL;
            ret = live_interrupted(qmp, repo, o, disks, n, seq, true);
            goto out;
        }
        goto out_tmp;
    }
    for (size_t i = 0; i < n; i++) {
        disks[i].copy_seconds = clock_monotonic_seconds() - t0;
        if (!live_del_target(qmp, &disks[i], false, &err)) {
            goto out_tmp;
        }
    }
    for (size_t i = 0; i < n; i++) {
        char *src = disks[i].src_bitmap;

        if (disks[i].level != REPO_LEVEL_FULL) {
            live_remove_bitmaps(qmp, disks[i].node, &src, 1);
        }
        if (disks[i].job_failed) {
            error_report("%s: backup failed: %s", disks[i].node,
                         disks[i].job_error);
            failed = true;
        }
    }
    if (failed) {
        goto out_tmp;
    }
    for (size_t i = 0; i < n; i++) {
        /* The counts the manifest records are those after the job. */
        if (!live_query_disk(qmp, &disks[i], &err)) {
            goto out_tmp;
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (backup_signal) {
            ret = live_interrupted(qmp, repo, o, &disks[i], n - i, seq, true);
            goto out;
        }
        made[n_made] = backup_commit_disk(repo, o, &disks[i], seq, time_iso,
                                          &err);
        if (!made[n_made]) {
            goto out_tmp;
        }
        n_made++;
    }
    for (size_t i = 0; i < n; i++) {
        size_t n_stale = 0;
        char **stale;
        RepoManifest *full = repo_latest_full(repo, disks[i].node);

        if (!live_query_disk(qmp, &disks[i], &err)) {
            goto out;
        }
        stale = backup_stale_bitmaps(repo, o, &disks[i], &n_stale);
        live_remove_bitmaps(qmp, disks[i].node, stale, n_stale);
        repo_plan_free_names(stale, n_stale);
        live_prune_snapshots(qmp, repo, o, &disks[i]);
        if (full) {
            repo_remove_attempts_below(repo, disks[i].node, full->seq);
        }
    }
    backup_print_result(o, disks, made, n_made);
    ret = CLI_EXIT_OK;
    goto out;

out_tmp:
    for (size_t i = 0; i < n; i++) {
        if (qmp) {
            live_del_target(qmp, &disks[i], false, NULL);
        }
        if (disks[i].tmp_path) {
            repo->storage->remove(disks[i].tmp_path);
        }
    }
out:
    if (err) {
        error_report_err(err);
    }
    for (size_t i = 0; i < n_made; i++) {
        repo_manifest_free(made[i]);
    }
    if (qmp) {
        pull_finish(qmp, disks, n, &pull);
    }
    free(pull.dir);                     /* when pull_finish did not run */
    for (size_t i = 0; i < n; i++) {
        backup_disk_free(&disks[i]);
    }
    qmp_conn_free(qmp);
    backup_catch_signals(false);
    return ret;
}
