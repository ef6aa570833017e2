/*
 * `bitback backup`: take a backup of one or more disks into a repository
 * (docs/specs/repository.md).
 *
 *   live     --connect QMP --node NODE [--node NODE2 ...]
 *            bitbackd (or qemu-storage-daemon) pushes the data with one
 *            single `transaction` of drive-backup jobs, so a multi-disk set
 *            shares one point in time; the tool then hashes what landed.
 *   offline  --image FILE: the same steps done on the image directly.
 *
 * Both share the planner (repo_plan_disk, src/repo/planner.c): which
 * level the run can really take and which bitmaps hold the changes since
 * the parent.  Bitmaps are never
 * cleared: each backup N adds `PREFIX-N` and freezes the older ones, so a
 * run killed at any point loses no write (the spec's "Bitmaps" section).
 * When the chain cannot be trusted (bitmap missing, cleared behind our
 * back, inconsistent after a crash, disk resized), the run takes a full
 * backup and prints one line saying why -- never a failure that needs
 * manual bitmap surgery.
 *
 * Steps of one run, in order (a kill between any two leaves the repository
 * readable and the next run correct):
 *   1. clean up what a killed run left (its job, temporary bitmaps, .tmp files)
 *   2. plan each disk; pick the ID; write and sync NODE/ID.attempt
 *   3. create the target qcow2 files (.ID.qcow2.tmp, backing = parent)
 *   4. one transaction: add PREFIX-ID, freeze older bitmaps, merge the
 *      sources into PREFIX-ID.src, start the jobs
 *   5. wait for the jobs; remove PREFIX-ID.src
 *   6. hash each target and commit it (repo_commit)
 *   7. remove bitmaps older than the newest full backup
 *
 * Bitmaps are this repository's: PREFIX defaults to bitback-<8 hex of the
 * repository's UUID>, and steps 1 and 7 touch PREFIX-* only.  Live, a
 * SIGINT/SIGTERM before step 6 cancels the jobs, folds PREFIX-ID back
 * into the bitmaps step 4 froze and removes the run's files
 * (live_interrupted); the exit status is then 128 + the signal.
 */
#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "util/cutils.h"
#include "cli/progress.h"
#include "cli/qmp-client.h"
#include "repo/planner.h"
#include "repo/repo.h"
#include "util/cleanup.h"
#include "util/json-opts.h"

#define BACKUP_MAX_DISKS 64
#define BACKUP_COPY_CHUNK (4u << 20)

/* A bitmap of a disk as the planner sees it. */
typedef RepoPlanBitmap BitmapInfo;

typedef struct Disk {
    char *node;                        /* node name / disk name in the repo */
    uint64_t size;
    bool volatile_bitmaps;             /* live: the node cannot store
                                        * persistent bitmaps (raw) */
    char *drv;                         /* live: the node's driver */
    BitmapInfo *bitmaps;
    size_t n_bitmaps;

    /* The plan */
    RepoLevel level;
    unsigned parent_seq;               /* 0 for a full (not a pointer: a
                                        * commit reloads the repo's list) */
    char **sources;                    /* bitmaps whose union is the change */
    size_t n_sources;
    char **freeze;                     /* recording PREFIX-* bitmaps to disable */
    size_t n_freeze;
    uint32_t granularity;              /* 0: the default */
    char id[REPO_ID_LEN];              /* this run's backup ID */
    char new_bitmap[BDRV_BITMAP_MAX_NAME + 1];
    char src_bitmap[BDRV_BITMAP_MAX_NAME + 1];
    char *tmp_path;
    char *generation;                  /* of new_bitmap, after step 4 */
    char job_id[REPO_MAX_NODE_NAME + 32];
    RepoBitmapCount *counts;           /* for the manifest, at commit */
    size_t n_counts;
    bool job_failed;
    char *job_error;
    double copy_seconds;               /* point in time -> data written */
    double hash_seconds;               /* the hashing pass alone */
    double sync_seconds;               /* fsync of the data + commit */
} Disk;

typedef struct BackupOpts {
    const char *repo_path;
    const char *connect;
    const char *image;
    const char *format;
    const char *prefix;                /* --bitmap, or the repository's */
    bool prefix_given;                 /* --bitmap: the pre-UUID behaviour */
    char prefix_buf[32];               /* "bitback-" + 8 hex of the UUID */
    const char *nodes[BACKUP_MAX_DISKS];
    size_t n_nodes;
    bool level_auto;
    RepoLevel level;
    uint64_t speed;
    bool json;
    bool progress;
} BackupOpts;

static void usage(FILE *out)
{
    fprintf(out,
            "Usage:\n"
            "  bitback backup --connect QMP_SOCKET --node NODE [--node NODE2 ...] --repo DIR\n"
            "                 [--level full|inc|diff|auto] [--bitmap NAME] [--speed BYTES]\n"
            "  bitback backup --image FILE [-f FMT] [--node NAME] --repo DIR\n"
            "                 [--level full|inc|diff|auto] [--bitmap NAME]\n"
            "\n"
            "Take a backup into the repository DIR (created when missing).\n"
            "\n"
            "  --connect QMP_SOCKET  a running bitbackd: one transaction over all\n"
            "                        --node disks, so they share one point in time\n"
            "  --image FILE          an image no daemon has open (qbm or qcow2), using its\n"
            "                        persistent bitmaps directly; --node names the disk in\n"
            "                        the repository (default: FILE's base name)\n"
            "  --level LEVEL         full, inc (changes since the latest backup), diff\n"
            "                        (changes since the latest full) or auto (default: a full\n"
            "                        into an empty repository, an incremental after that)\n"
            "  --bitmap NAME         prefix of the dirty bitmaps bitback keeps; backup ID adds\n"
            "                        NAME-ID to each disk.  Default: bitback-XXXXXXXX, the first\n"
            "                        8 hex digits of the repository's UUID, so that several\n"
            "                        repositories back up one disk independently\n"
            "  --speed BYTES         live: the backup jobs' rate limit (bytes per second)\n"
            "  --output=human|json   the result as text or as a JSON list of backups\n"
            "  --progress            draw progress even when stdout is not a terminal\n"
            "\n"
            "When an incremental or differential cannot be trusted (the bitmap is missing,\n"
            "inconsistent, or was cleared by someone else) a full backup is taken instead,\n"
            "with one line saying why.  A clear is seen by the bitmap's generation (bitbackd)\n"
            "or by its dirty count falling below the one the last backup recorded\n"
            "(qemu-storage-daemon reports no generation); a clear followed by as many new\n"
            "writes cannot be detected there: after clearing a bitmap by hand, run with\n"
            "--level full.\n"
            "\n"
            "Live, the target files are sent to the daemon as absolute paths.  A node that\n"
            "cannot store persistent bitmaps (raw) gets one kept in the daemon's memory:\n"
            "incrementals work while the daemon runs, the first run after it restarts is a\n"
            "full backup.  SIGINT or SIGTERM cancels the backup jobs and removes what the\n"
            "run made (the bitmaps stay able to give the next incremental).\n"
            "\n"
            "Exit status: 0 ok, 1 failure, 128 + N after signal N (130 SIGINT, 143 SIGTERM).\n");
}

static void bitmap_info_clear(BitmapInfo *b)
{
    free(b->name);
    free(b->generation);
    free(b->prior_generation);
}

/* Forget what the last query said about the disk's bitmaps. */
static void disk_clear_bitmaps(Disk *d)
{
    for (size_t i = 0; i < d->n_bitmaps; i++) {
        bitmap_info_clear(&d->bitmaps[i]);
    }
    free(d->bitmaps);
    d->bitmaps = NULL;
    d->n_bitmaps = 0;
}

static void disk_free(Disk *d)
{
    disk_clear_bitmaps(d);
    for (size_t i = 0; i < d->n_counts; i++) {
        free(d->counts[i].name);
    }
    free(d->counts);
    free(d->drv);
    repo_plan_free_names(d->sources, d->n_sources);
    repo_plan_free_names(d->freeze, d->n_freeze);
    free(d->tmp_path);
    free(d->generation);
    free(d->job_error);
    free(d->node);
}

static char *xstrdup(const char *s)
{
    char *r = strdup(s ? s : "");

    if (!r) {
        abort();
    }
    return r;
}

static const BitmapInfo *disk_bitmap(const Disk *d, const char *name)
{
    return repo_plan_find_bitmap(d->bitmaps, d->n_bitmaps, name);
}

/* The planner's view of disk d. */
static RepoPlanDisk plan_input(const Disk *d)
{
    return (RepoPlanDisk){
        .node = d->node,
        .size = d->size,
        .volatile_bitmaps = d->volatile_bitmaps,
        .bitmaps = d->bitmaps,
        .n_bitmaps = d->n_bitmaps,
    };
}

static RepoPlanOpts plan_opts(const BackupOpts *o)
{
    return (RepoPlanOpts){
        .prefix = o->prefix,
        .level_auto = o->level_auto,
        .level = o->level,
    };
}

/* Plan disk d (repo_plan_disk) and take the plan into d.  *ret_reason:
 * why a requested inc/diff must be a full, or NULL (caller frees). */
static bool plan_disk(Repo *repo, const BackupOpts *o, Disk *d,
                      char **ret_reason, Error **errp)
{
    RepoPlanDisk in = plan_input(d);
    RepoPlanOpts po = plan_opts(o);
    RepoPlan plan;

    *ret_reason = NULL;
    if (!repo_plan_disk(repo, &po, &in, &plan, errp)) {
        repo_plan_clear(&plan);
        return false;
    }
    d->level = plan.level;
    d->parent_seq = plan.parent_seq;
    d->granularity = plan.granularity;
    d->sources = steal_pointer(&plan.sources);
    d->n_sources = plan.n_sources;
    d->freeze = steal_pointer(&plan.freeze);
    d->n_freeze = plan.n_freeze;
    *ret_reason = steal_pointer(&plan.reason);
    plan.n_sources = plan.n_freeze = 0;
    repo_plan_clear(&plan);
    return true;
}

/* Create the target: a qcow2 with the parent's file as backing. */
static bool create_target(Repo *repo, Disk *d, unsigned seq, Error **errp)
{
    _cleanup_json_ struct json_object *opts = json_object_new_object();

    d->tmp_path = repo_tmp_data_path(repo, d->node, seq);
    unlink(d->tmp_path);
    if (d->parent_seq) {
        char name[REPO_ID_LEN + 8];

        repo_format_id(d->parent_seq, name);
        strcat(name, ".qcow2");
        json_object_object_add(opts, "backing_file", json_object_new_string(name));
        json_object_object_add(opts, "backing_fmt", json_object_new_string("qcow2"));
    }
    if (!bdrv_img_create(d->tmp_path, "qcow2", d->size, opts, errp)) {
        error_prepend(errp, "%s: cannot create %s: ", d->node, d->tmp_path);
        return false;
    }
    return true;
}

static char *now_iso(void)
{
    char buf[32];
    time_t t = time(NULL);
    struct tm tm;

    gmtime_r(&t, &tm);
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
    return xstrdup(buf);
}

/* The counts of the bitmaps this backup relied on (its sources) and of
 * the one it started, as d->bitmaps (queried after the job) reports
 * them; commit_disk puts them in the manifest (spec, Bitmaps 3). */
static void disk_record_counts(Disk *d)
{
    for (size_t i = 0; i <= d->n_sources; i++) {
        const char *name = i < d->n_sources ? d->sources[i] : d->new_bitmap;
        const BitmapInfo *b = disk_bitmap(d, name);
        RepoBitmapCount *c;

        if (!b || b->count < 0) {
            continue;
        }
        c = realloc(d->counts, (d->n_counts + 1) * sizeof(*c));
        if (!c) {
            abort();
        }
        d->counts = c;
        c[d->n_counts].name = xstrdup(name);
        c[d->n_counts++].count = (uint64_t)b->count;
    }
}

/* Step 6: hash the target and commit it. */
static RepoManifest *commit_disk(Repo *repo, const BackupOpts *o, Disk *d,
                                 unsigned seq, const char *time_iso,
                                 Error **errp)
{
    RepoManifest *m = calloc(1, sizeof(*m));
    CliProgress *p;
    bool ok;
    double t0, t1, t2;

    if (!m) {
        abort();
    }
    m->seq = seq;
    repo_format_id(seq, m->id);
    m->node = xstrdup(d->node);
    m->time = xstrdup(time_iso);
    m->level = d->level;
    m->parent_seq = d->parent_seq;
    m->image_size = d->size;
    m->granularity = d->granularity;
    m->cluster_size = REPO_CLUSTER_SIZE;
    m->bitmap = xstrdup(d->new_bitmap);
    m->generation = d->generation ? xstrdup(d->generation) : NULL;
    disk_record_counts(d);
    m->bitmap_counts = steal_pointer(&d->counts);
    m->n_bitmap_counts = d->n_counts;
    d->n_counts = 0;

    t0 = clock_monotonic_seconds();
    ok = repo_fsync_path(d->tmp_path, errp);
    t1 = clock_monotonic_seconds();
    p = cli_progress_new("hashing", d->size, cli_progress_wanted(o->progress));
    ok = ok && repo_scan_backup(repo, d->tmp_path, m, cli_progress_cb, p, errp);
    cli_progress_finish(p);
    t2 = clock_monotonic_seconds();
    ok = ok && repo_commit(repo, m, errp);
    d->hash_seconds = t2 - t1;
    d->sync_seconds = (t1 - t0) + (clock_monotonic_seconds() - t2);
    if (!ok) {
        error_prepend(errp, "%s: ", d->node);
        repo_manifest_free(m);
        return NULL;
    }
    return m;
}

/* The result: one line per disk, or a JSON list of the backups as `list`
 * shows them plus where the time went (for bench/): copy-seconds (the
 * job or the offline copy), hash-seconds (the hashing pass alone) and
 * sync-seconds (making the data durable and committing). */
static void print_result(const BackupOpts *o, const Disk *disks,
                         RepoManifest **made, size_t n)
{
    if (o->json) {
        _cleanup_json_ struct json_object *arr = json_object_new_array();

        for (size_t i = 0; i < n; i++) {
            struct json_object *b = repo_manifest_to_json(made[i], false);

            json_object_object_add(b, "copy-seconds",
                                   json_object_new_double(disks[i].copy_seconds));
            json_object_object_add(b, "hash-seconds",
                                   json_object_new_double(disks[i].hash_seconds));
            json_object_object_add(b, "sync-seconds",
                                   json_object_new_double(disks[i].sync_seconds));
            json_object_array_add(arr, b);
        }
        cli_print_json(arr);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        char changed[32], stored[32], parent[REPO_ID_LEN + 16] = "";

        if (made[i]->parent_seq) {
            char pid[REPO_ID_LEN];

            repo_format_id(made[i]->parent_seq, pid);
            snprintf(parent, sizeof(parent), ", parent %s", pid);
        }
        cli_size_to_str(made[i]->changed_bytes, changed, sizeof(changed));
        cli_size_to_str(made[i]->stored_bytes, stored, sizeof(stored));
        printf("%s: backup %s (%s%s): %s changed, %s stored\n", made[i]->node,
               made[i]->id, repo_level_name(made[i]->level), parent, changed,
               stored);
    }
}

/* After the transaction: the attempt markers say its bitmaps exist.  A
 * failure only costs a full backup if the bitmap later goes missing, so
 * it is a warning. */
static void mark_started(Repo *repo, const Disk *disks, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        Error *err = NULL;
        unsigned seq = (unsigned)strtoul(disks[i].id, NULL, 10);

        if (!repo_mark_attempt_started(repo, disks[i].node, seq, &err)) {
            error_prepend(&err, "warning: ");
            error_report_err(err);
        }
    }
}

/* Once the point in time is fixed, say so on stderr (scripts and tests
 * may wait for this line before letting writers go on). */
static void announce(const Disk *disks, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const Disk *d = &disks[i];
        char since[REPO_ID_LEN + 16] = "";

        if (d->parent_seq) {
            char pid[REPO_ID_LEN];

            repo_format_id(d->parent_seq, pid);
            snprintf(since, sizeof(since), " since %s", pid);
        }
        fprintf(stderr, "%s: backup %s started (%s%s)\n", d->node,
                d->id,
                repo_level_name(d->level), since);
    }
    fflush(stderr);
}

/* The ID for this run: above every ID in the repository and every
 * PREFIX-N bitmap on the disks (a marker could have been lost with a
 * folder the user deleted). */
static unsigned pick_seq(Repo *repo, const BackupOpts *o, Disk *disks,
                         size_t n)
{
    unsigned seq = repo->max_seq;

    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < disks[i].n_bitmaps; j++) {
            unsigned s = repo_bitmap_seq(o->prefix, disks[i].bitmaps[j].name);
            if (s > seq) {
                seq = s;
            }
        }
    }
    return seq + 1;
}

/* Steps 2 and 3 for every disk, and the bitmap names. */
static bool prepare_disks(Repo *repo, const BackupOpts *o, Disk *disks,
                          size_t n, unsigned *ret_seq, Error **errp)
{
    unsigned seq;

    for (size_t i = 0; i < n; i++) {
        char *reason = NULL;

        if (!plan_disk(repo, o, &disks[i], &reason, errp)) {
            return false;
        }
        if (reason) {
            /* The one line the issue asks for; on stderr so that
             * --output=json stays parseable. */
            fprintf(stderr, "%s: taking a full backup: %s\n", disks[i].node,
                    reason);
            free(reason);
        }
    }
    seq = pick_seq(repo, o, disks, n);
    for (size_t i = 0; i < n; i++) {
        Disk *d = &disks[i];

        repo_format_id(seq, d->id);
        repo_bitmap_name(d->new_bitmap, o->prefix, seq, "");
        repo_bitmap_name(d->src_bitmap, o->prefix, seq, ".src");
        repo_remove_tmp_files(repo, d->node);
        if (!repo_mark_attempt(repo, d->node, seq, errp) ||
            !create_target(repo, d, seq, errp)) {
            return false;
        }
    }
    *ret_seq = seq;
    return true;
}

/* Bitmaps of d the run may remove (repo_plan_stale_bitmaps). */
static char **stale_bitmaps(Repo *repo, const BackupOpts *o, Disk *d,
                            size_t *ret_n)
{
    RepoPlanDisk in = plan_input(d);
    RepoPlanOpts po = plan_opts(o);

    return repo_plan_stale_bitmaps(repo, &po, o->prefix_given, &in, ret_n);
}

/* ------------------------------------------------------------------ */
/* Live: bitbackd over QMP                                            */

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
    free(d->drv);
    d->drv = xstrdup(json_opt_str(node, "drv"));
    /* QEMU and bitbackd store persistent bitmaps in qcow2 (and qbm)
     * images only; on any other node ours must be non-persistent. */
    d->volatile_bitmaps = json_opt_str(node, "drv") && strcmp(d->drv, "qcow2") &&
                          strcmp(d->drv, "qbm");
    disk_clear_bitmaps(d);
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
            bi->name = xstrdup(json_opt_str(b, "name"));
            bi->recording = json_opt_bool(b, "recording", false);
            bi->inconsistent = json_opt_bool(b, "inconsistent", false);
            bi->busy = json_opt_bool(b, "busy", false);
            bi->granularity = (uint32_t)json_opt_int(b, "granularity", -1);
            bi->count = json_opt_int(b, "count", -1);
            bi->generation = json_opt_str(b, "generation")
                             ? xstrdup(json_opt_str(b, "generation")) : NULL;
            bi->prior_generation =
                json_opt_str(b, "prior-generation")
                ? xstrdup(json_opt_str(b, "prior-generation")) : NULL;
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
static bool live_cleanup(QmpConn *qmp, const BackupOpts *o, Disk *d,
                         Error **errp)
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

/* Step 4: one transaction over every disk. */
static bool live_transaction(QmpConn *qmp, const BackupOpts *o, Disk *disks,
                             size_t n, Error **errp)
{
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
        if (d->level != REPO_LEVEL_FULL) {
            struct json_object *srcs = json_object_new_array();

            a = bitmap_args(d->node, d->src_bitmap);
            json_object_object_add(a, "persistent", json_object_new_boolean(false));
            json_object_object_add(a, "disabled", json_object_new_boolean(true));
            json_object_object_add(a, "granularity",
                                   json_object_new_int64(d->granularity));
            add_action(actions, "block-dirty-bitmap-add", a);
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
        json_object_object_add(job, "target", json_object_new_string(d->tmp_path));
        json_object_object_add(job, "format", json_object_new_string("qcow2"));
        json_object_object_add(job, "mode", json_object_new_string("existing"));
        if (d->level == REPO_LEVEL_FULL) {
            json_object_object_add(job, "sync", json_object_new_string("full"));
        } else {
            json_object_object_add(job, "sync", json_object_new_string("bitmap"));
            json_object_object_add(job, "bitmap", json_object_new_string(d->src_bitmap));
            json_object_object_add(job, "bitmap-mode", json_object_new_string("never"));
        }
        if (o->speed) {
            json_object_object_add(job, "speed", json_object_new_int64((int64_t)o->speed));
        }
        add_action(actions, "drive-backup", job);
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
    size_t left = n;
    CliProgress *p = cli_progress_new("backup", 0, cli_progress_wanted(o->progress));
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
            if (d && name && (!strcmp(name, "BLOCK_JOB_COMPLETED") ||
                              !strcmp(name, "BLOCK_JOB_CANCELLED"))) {
                const char *msg = json_opt_str(data, "error");

                if (!strcmp(name, "BLOCK_JOB_CANCELLED") || msg) {
                    d->job_failed = true;
                    d->job_error = xstrdup(msg ? msg : "the job was cancelled");
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
            unlink(disks[i].tmp_path);
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

static int backup_live(const BackupOpts *o, Repo *repo)
{
    Error *err = NULL;
    QmpConn *qmp;
    Disk disks[BACKUP_MAX_DISKS] = {0};
    size_t n = o->n_nodes;
    RepoManifest *made[BACKUP_MAX_DISKS] = {0};
    size_t n_made = 0;
    unsigned seq = 0;
    int ret = CLI_EXIT_ERROR;
    _cleanup_free_ char *time_iso = NULL;
    bool failed = false;
    double t0;

    backup_catch_signals(true);
    qmp = qmp_conn_connect(o->connect, &err);
    if (!qmp) {
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        disks[i].node = xstrdup(o->nodes[i]);
        /* The repository's own job ID: another repository backing up the
         * same disk must never see it as a job of its killed runs. */
        snprintf(disks[i].job_id, sizeof(disks[i].job_id), "bitback-%.8s-%s",
                 repo->uuid, o->nodes[i]);
        for (size_t j = 0; j < i; j++) {
            if (!strcmp(o->nodes[i], o->nodes[j])) {
                error_setg(&err, "node '%s' given twice", o->nodes[i]);
                goto out;
            }
        }
        if (!live_cleanup(qmp, o, &disks[i], &err)) {
            goto out;
        }
    }
    /* Events so far belong to jobs of earlier runs, which live_cleanup
     * saw end: ours share their job IDs, so forget them. */
    qmp_conn_discard_events(qmp);
    if (!prepare_disks(repo, o, disks, n, &seq, &err)) {
        goto out_tmp;
    }
    if (backup_signal) {
        ret = live_interrupted(qmp, repo, o, disks, n, seq, false);
        goto out;
    }
    if (!live_transaction(qmp, o, disks, n, &err)) {
        goto out_tmp;
    }
    time_iso = now_iso();
    t0 = clock_monotonic_seconds();
    mark_started(repo, disks, n);
    announce(disks, n);
    for (size_t i = 0; i < n; i++) {
        const BitmapInfo *b;

        if (!live_query_disk(qmp, &disks[i], &err)) {
            goto out_tmp;
        }
        b = disk_bitmap(&disks[i], disks[i].new_bitmap);
        if (b) {
            disks[i].granularity = b->granularity;
            disks[i].generation = b->generation ? xstrdup(b->generation) : NULL;
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
        made[n_made] = commit_disk(repo, o, &disks[i], seq, time_iso, &err);
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
        stale = stale_bitmaps(repo, o, &disks[i], &n_stale);
        live_remove_bitmaps(qmp, disks[i].node, stale, n_stale);
        repo_plan_free_names(stale, n_stale);
        if (full) {
            repo_remove_attempts_below(repo, disks[i].node, full->seq);
        }
    }
    print_result(o, disks, made, n_made);
    ret = CLI_EXIT_OK;
    goto out;

out_tmp:
    for (size_t i = 0; i < n; i++) {
        if (disks[i].tmp_path) {
            unlink(disks[i].tmp_path);
        }
    }
out:
    if (err) {
        error_report_err(err);
    }
    for (size_t i = 0; i < n_made; i++) {
        repo_manifest_free(made[i]);
    }
    for (size_t i = 0; i < n; i++) {
        disk_free(&disks[i]);
    }
    qmp_conn_free(qmp);
    backup_catch_signals(false);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Offline: the image itself                                          */

static void offline_read_bitmaps(BlockDriverState *bs, Disk *d)
{
    size_t n = 0;

    disk_clear_bitmaps(d);
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        n++;
    }
    d->bitmaps = calloc(n ? n : 1, sizeof(*d->bitmaps));
    if (!d->bitmaps) {
        abort();
    }
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        BitmapInfo *b = &d->bitmaps[d->n_bitmaps++];

        b->name = xstrdup(bm->name);
        b->recording = !bm->disabled;
        b->inconsistent = bm->inconsistent;
        b->busy = bm->busy;
        b->granularity = bm->granularity;
        b->count = (int64_t)bdrv_dirty_bitmap_count(bm);
        /* NULL when unknown (""): plan_disk then skips the check. */
        b->generation = bm->persistent && bm->generation[0]
                        ? xstrdup(bm->generation) : NULL;
        b->prior_generation = bm->persistent && !bm->generation[0] &&
                              bm->prior_generation[0]
                              ? xstrdup(bm->prior_generation) : NULL;
    }
}

static bool buffer_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;

    return !len || (!p[0] && !memcmp(p, p + 1, len - 1));
}

/* Copy [off, off+len) of src to dst; ranges that read as zeroes become
 * zero writes, so an overlay hides its backing there. */
static int copy_range(BlockDriverState *src, BlockDriverState *dst,
                      uint64_t off, uint64_t len, void *buf)
{
    while (len) {
        uint64_t n = MIN(len, BACKUP_COPY_CHUNK);
        int r = bdrv_pread(src, off, buf, n);

        if (r < 0) {
            return r;
        }
        if (buffer_is_zero(buf, n)) {
            r = bdrv_pwrite_zeroes(dst, off, n, 0);
        } else {
            r = bdrv_pwrite(dst, off, buf, n, 0);
        }
        if (r < 0) {
            return r;
        }
        off += n;
        len -= n;
    }
    return 0;
}

/* The data of the backup: for a full, the source's data ranges (zero and
 * unallocated ranges stay holes); else the union of the source bitmaps. */
static bool offline_copy(const BackupOpts *o, BlockDriverState *src, Disk *d,
                         Error **errp)
{
    _cleanup_free_ void *buf = aligned_alloc(4096, BACKUP_COPY_CHUNK);
    BlockDriverState *dst;
    BdrvDirtyExtent *ext = NULL;
    size_t n_ext = 0;
    uint64_t done = 0;
    CliProgress *p;
    int r = 0;

    if (!buf) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (d->level == REPO_LEVEL_FULL) {
        uint64_t off = 0;

        while (off < d->size) {
            uint64_t pnum = 0;
            int st = bdrv_block_status(src, off, MIN(d->size - off, 1ull << 30),
                                       &pnum);
            if (st < 0 || pnum == 0) {
                error_setg_errno(errp, st < 0 ? -st : EIO,
                                 "%s: block status at %llu", d->node,
                                 (unsigned long long)off);
                free(ext);
                return false;
            }
            if (!(st & BDRV_BLOCK_ZERO)) {
                BdrvDirtyExtent *e = realloc(ext, (n_ext + 1) * sizeof(*ext));
                if (!e) {
                    abort();
                }
                ext = e;
                ext[n_ext++] = (BdrvDirtyExtent){ off, pnum, true };
            }
            off += pnum;
        }
    } else {
        BdrvDirtyBitmap *u = bdrv_create_dirty_bitmap(src, d->granularity,
                                                      d->src_bitmap, errp);
        BdrvDirtyBitmap *srcs[BACKUP_MAX_DISKS * 64];
        int ns = 0;

        if (!u) {
            return false;
        }
        for (size_t i = 0; i < d->n_sources && ns < (int)(sizeof(srcs) / sizeof(*srcs)); i++) {
            srcs[ns] = bdrv_find_dirty_bitmap(src, d->sources[i]);
            if (!srcs[ns]) {
                error_setg(errp, "%s: bitmap '%s' vanished", d->node, d->sources[i]);
                bdrv_release_dirty_bitmap(u);
                return false;
            }
            ns++;
        }
        if (!bdrv_merge_dirty_bitmaps(u, srcs, ns, errp)) {
            bdrv_release_dirty_bitmap(u);
            return false;
        }
        ext = bdrv_dirty_bitmap_extents(u, 0, d->size, true, &n_ext);
        bdrv_release_dirty_bitmap(u);
    }

    dst = bdrv_open_image(d->tmp_path, "qcow2", BDRV_O_RDWR, errp);
    if (!dst) {
        free(ext);
        return false;
    }
    {
        uint64_t total = 0;

        for (size_t i = 0; i < n_ext; i++) {
            total += ext[i].length;
        }
        p = cli_progress_new("backup", total, cli_progress_wanted(o->progress));
    }
    for (size_t i = 0; i < n_ext && r >= 0; i++) {
        uint64_t end = MIN(ext[i].start + ext[i].length, d->size);

        if (ext[i].start < end) {
            r = copy_range(src, dst, ext[i].start, end - ext[i].start, buf);
            done += end - ext[i].start;
            cli_progress_update(p, done, 0);
        }
    }
    cli_progress_finish(p);
    free(ext);
    if (r >= 0) {
        r = bdrv_flush(dst);
    }
    if (!bdrv_close(dst, errp)) {
        return false;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "%s: copying to %s", d->node, d->tmp_path);
        return false;
    }
    return true;
}

/* The bitmap half of the transaction, done in the image: add PREFIX-ID
 * (persistent, recording) and freeze the older ones, then close so the
 * image is stored cleanly before any data is copied. */
static bool offline_bitmaps(const BackupOpts *o, Disk *d, Error **errp)
{
    BlockDriverState *bs = cli_open_image(o->image, o->format, BDRV_O_RDWR, errp);

    if (!bs) {
        return false;
    }
    if (!bdrv_dirty_bitmap_add(bs, d->new_bitmap,
                               d->granularity ? d->granularity
                                              : bdrv_default_bitmap_granularity(bs),
                               true, false, errp)) {
        bdrv_close(bs, NULL);
        return false;
    }
    for (size_t i = 0; i < d->n_freeze; i++) {
        BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, d->freeze[i]);

        if (bm && !bdrv_disable_dirty_bitmap(bm, errp)) {
            bdrv_close(bs, NULL);
            return false;
        }
    }
    return bdrv_close(bs, errp);
}

static bool offline_remove_stale(Repo *repo, const BackupOpts *o, Disk *d,
                                 Error **errp)
{
    size_t n_stale = 0;
    char **stale = stale_bitmaps(repo, o, d, &n_stale);
    BlockDriverState *bs;
    bool ok = true;

    if (!n_stale) {
        return true;
    }
    bs = cli_open_image(o->image, o->format, BDRV_O_RDWR, errp);
    for (size_t i = 0; i < n_stale; i++) {
        if (bs && ok && !bdrv_dirty_bitmap_remove(bs, stale[i], errp)) {
            ok = false;
        }
    }
    repo_plan_free_names(stale, n_stale);
    if (!bs) {
        return false;
    }
    if (!bdrv_close(bs, ok ? errp : NULL)) {
        return false;
    }
    return ok;
}

static int backup_offline(const BackupOpts *o, Repo *repo)
{
    Error *err = NULL;
    Disk d = {0};
    BlockDriverState *bs;
    RepoManifest *made = NULL;
    unsigned seq = 0;
    int ret = CLI_EXIT_ERROR;
    _cleanup_free_ char *time_iso = NULL;
    int64_t len;

    if (o->n_nodes) {
        d.node = xstrdup(o->nodes[0]);
    } else {
        _cleanup_free_ char *copy = xstrdup(o->image);
        char *base = basename(copy), *dot = strrchr(base, '.');

        if (dot && dot != base) {
            *dot = '\0';
        }
        d.node = xstrdup(base);
    }
    /* Read-only first: plan without touching the image. */
    bs = cli_open_image(o->image, o->format, 0, &err);
    if (!bs) {
        goto out;
    }
    len = bdrv_getlength(bs);
    offline_read_bitmaps(bs, &d);
    bdrv_close(bs, NULL);
    if (len < 0) {
        error_setg_errno(&err, (int)-len, "%s: cannot get its size", o->image);
        goto out;
    }
    d.size = (uint64_t)len;
    if (!prepare_disks(repo, o, &d, 1, &seq, &err) ||
        !offline_bitmaps(o, &d, &err)) {
        goto out_tmp;
    }
    time_iso = now_iso();
    mark_started(repo, &d, 1);
    announce(&d, 1);
    bs = cli_open_image(o->image, o->format, 0, &err);
    if (!bs) {
        goto out_tmp;
    }
    {
        BdrvDirtyBitmap *nb = bdrv_find_dirty_bitmap(bs, d.new_bitmap);

        if (nb) {
            d.granularity = nb->granularity;
            d.generation = nb->generation[0] ? xstrdup(nb->generation)
                                             : NULL;
        }
    }
    d.copy_seconds = clock_monotonic_seconds();
    if (!offline_copy(o, bs, &d, &err)) {
        bdrv_close(bs, NULL);
        goto out_tmp;
    }
    offline_read_bitmaps(bs, &d);      /* the counts for the manifest */
    bdrv_close(bs, NULL);
    d.copy_seconds = clock_monotonic_seconds() - d.copy_seconds;
    made = commit_disk(repo, o, &d, seq, time_iso, &err);
    if (!made) {
        goto out_tmp;
    }
    {
        RepoManifest *full = repo_latest_full(repo, d.node);

        if (!offline_remove_stale(repo, o, &d, &err)) {
            error_prepend(&err, "warning: backup %s is committed, but removing "
                          "old bitmaps failed: ", made->id);
            error_report_err(err);
            err = NULL;
        }
        if (full) {
            repo_remove_attempts_below(repo, d.node, full->seq);
        }
    }
    print_result(o, &d, &made, 1);
    ret = CLI_EXIT_OK;
    goto out;

out_tmp:
    if (d.tmp_path) {
        unlink(d.tmp_path);
    }
out:
    if (err) {
        error_report_err(err);
    }
    repo_manifest_free(made);
    disk_free(&d);
    return ret;
}

int cli_cmd_backup(int argc, char **argv)
{
    enum { OPT_OUTPUT = 256, OPT_PROGRESS, OPT_SPEED };
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "repo", required_argument, NULL, 'r' },
        { "connect", required_argument, NULL, 'c' },
        { "node", required_argument, NULL, 'n' },
        { "image", required_argument, NULL, 'i' },
        { "level", required_argument, NULL, 'l' },
        { "bitmap", required_argument, NULL, 'b' },
        { "output", required_argument, NULL, OPT_OUTPUT },
        { "progress", no_argument, NULL, OPT_PROGRESS },
        { "speed", required_argument, NULL, OPT_SPEED },
        { NULL, 0, NULL, 0 },
    };
    BackupOpts o = { .level_auto = true };
    Error *err = NULL;
    _cleanup_free_ char *repo_abs = NULL;
    Repo *repo;
    int c, ret;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            usage(stdout);
            return CLI_EXIT_OK;
        case 'r':
            o.repo_path = optarg;
            break;
        case 'c':
            o.connect = optarg;
            break;
        case 'i':
            o.image = optarg;
            break;
        case 'f':
            o.format = optarg;
            break;
        case 'n':
            if (o.n_nodes == BACKUP_MAX_DISKS) {
                error_report("at most %d --node options", BACKUP_MAX_DISKS);
                return CLI_EXIT_ERROR;
            }
            if (!*optarg || strlen(optarg) > REPO_MAX_NODE_NAME ||
                strchr(optarg, '/') || optarg[0] == '.') {
                error_report("invalid node name '%s'", optarg);
                return CLI_EXIT_ERROR;
            }
            o.nodes[o.n_nodes++] = optarg;
            break;
        case 'l':
            if (!strcmp(optarg, "auto")) {
                o.level_auto = true;
            } else if (repo_level_parse(optarg, &o.level)) {
                o.level_auto = false;
            } else {
                error_report("--level must be full, inc, diff or auto, not '%s'",
                             optarg);
                return CLI_EXIT_ERROR;
            }
            break;
        case 'b':
            if (!*optarg || strlen(optarg) > 200 || strchr(optarg, '/')) {
                error_report("invalid --bitmap name '%s'", optarg);
                return CLI_EXIT_ERROR;
            }
            o.prefix = optarg;
            o.prefix_given = true;
            break;
        case OPT_OUTPUT:
            if (!cli_parse_output(optarg, &o.json, &err)) {
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            break;
        case OPT_PROGRESS:
            o.progress = true;
            break;
        case OPT_SPEED:
            if (!cli_parse_size(optarg, "speed", &o.speed, &err)) {
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            break;
        default:
            usage(stderr);
            return CLI_EXIT_ERROR;
        }
    }
    if (optind < argc) {
        error_report("unexpected argument '%s'", argv[optind]);
        return CLI_EXIT_ERROR;
    }
    if (!o.repo_path) {
        error_report("--repo is required");
        return CLI_EXIT_ERROR;
    }
    if (!!o.connect == !!o.image) {
        error_report("give exactly one of --connect (live) and --image (offline)");
        return CLI_EXIT_ERROR;
    }
    if (o.connect && !o.n_nodes) {
        error_report("--connect needs at least one --node");
        return CLI_EXIT_ERROR;
    }
    if (o.image && o.n_nodes > 1) {
        error_report("--image backs up one disk; give at most one --node");
        return CLI_EXIT_ERROR;
    }
    if (o.format && o.connect) {
        error_report("-f applies to --image only");
        return CLI_EXIT_ERROR;
    }
    /* The daemon opens the targets by the names we send, from its own
     * working folder (qemu-storage-daemon --daemonize runs in /): every
     * path is made absolute first. */
    if (o.repo_path[0] != '/') {
        _cleanup_free_ char *cwd = getcwd(NULL, 0);

        if (!cwd) {
            error_report("cannot resolve --repo '%s': %s", o.repo_path,
                         strerror(errno));
            return CLI_EXIT_ERROR;
        }
        repo_abs = path_join(cwd, o.repo_path);
        if (!repo_abs) {
            error_report("out of memory");
            return CLI_EXIT_ERROR;
        }
        o.repo_path = repo_abs;
    }
    repo = repo_open(o.repo_path, true, &err);
    if (!repo) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    if (!o.prefix_given) {
        /* Bitmaps belong to the repository that made them (spec,
         * Bitmaps): repo_open(create) gave it a UUID. */
        snprintf(o.prefix_buf, sizeof(o.prefix_buf), "bitback-%.8s",
                 repo->uuid);
        o.prefix = o.prefix_buf;
    }
    ret = o.connect ? backup_live(&o, repo) : backup_offline(&o, repo);
    repo_free(repo);
    return ret;
}
