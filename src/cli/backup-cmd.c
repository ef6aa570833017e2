/*
 * `bitback backup`: take a backup of one or more disks into a repository
 * (docs/specs/repository.md).
 *
 *   live     --connect QMP --node NODE [--node NODE2 ...]
 *            bitbackd (or qemu-storage-daemon) pushes the data with one
 *            single `transaction` of drive-backup jobs, so a multi-disk set
 *            shares one point in time; the tool then hashes what landed.
 *            With --pull (and for a full from qemu-storage-daemon) the
 *            transaction starts fleecing jobs instead and the tool reads
 *            the point in time over NBD (backup-live.c, Pull).
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
#include <fcntl.h>
#include <inttypes.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/backup-internal.h"
#include "cli/progress.h"
#include "client/qmp-client.h"
#include "util/cleanup.h"
#include "util/cutils.h"

static void usage(FILE *out)
{
    fprintf(out,
            "Usage:\n"
            "  bitback backup --connect QMP_SOCKET --node NODE [--node NODE2 ...] --repo DIR\n"
            "                 [--level full|inc|diff|auto] [--bitmap NAME] [--speed BYTES]\n"
            "                 [--compress=off|zstd[:LEVEL]] [--pull] [--nbd-socket PATH]\n"
            "                 [--granularity SIZE] [-t|--cache none|writeback]\n"
            "  bitback backup --connect HOST:PORT --nbd-server HOST:PORT --node NODE ...\n"
            "                 --repo DIR [--object tls-creds-x509,id=ID,dir=D,endpoint=client\n"
            "                 --tls-creds ID] [--fleece-dir DIR] [options as above]\n"
            "  bitback backup --image FILE [-f FMT] [--node NAME] --repo DIR\n"
            "                 [--level full|inc|diff|auto] [--bitmap NAME]\n"
            "                 [--compress=off|zstd[:LEVEL]] [--granularity SIZE]\n"
            "\n"
            "Take a backup into the repository DIR (created when missing): a folder,\n"
            "or rbd:POOL[/NS][:conf=PATH][:id=USER], a repository in a Ceph pool\n"
            "(docs/specs/repository.md, \"Storage backends\").\n"
            "\n"
            "  --connect QMP_SOCKET  a running bitbackd: one transaction over all\n"
            "                        --node disks, so they share one point in time\n"
            "  --connect HOST:PORT   the same over TCP (also tcp:HOST:PORT, [IPv6]:PORT),\n"
            "                        e.g. a daemon on another host: every disk is then\n"
            "                        pulled (--pull is implied; the daemon writes no file\n"
            "                        of the repository)\n"
            "  --object tls-creds-x509,id=ID,dir=DIR,endpoint=client\n"
            "  --object tls-creds-psk,id=ID,dir=DIR,endpoint=client,username=NAME\n"
            "                        TLS credentials, as QEMU's tools take them\n"
            "  --tls-creds ID        use them for QMP over TCP (TLS from the first byte;\n"
            "                        the daemon's certificate must name the host of\n"
            "                        --connect) and for the NBD reads (--nbd-server)\n"
            "  --nbd-server HOST:PORT\n"
            "                        with --connect HOST:PORT: the NBD server the daemon\n"
            "                        runs (with tls-creds when --tls-creds is given)\n"
            "  --fleece-dir DIR      with --connect HOST:PORT: the folder ON THE DAEMON'S\n"
            "                        HOST where the daemon creates the fleecing overlays\n"
            "                        (blockdev-create); default: the folder of each\n"
            "                        disk's image.  bitbackd removes them when the run\n"
            "                        ends; qemu-storage-daemon leaves one per disk there\n"
            "                        (bbf-*.qcow2), which the next run overwrites\n"
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
            "  --compress=off|zstd[:LEVEL]\n"
            "                        store the backup's data clusters zstd-compressed in\n"
            "                        its qcow2 (qemu-img reads them); clusters that do not\n"
            "                        shrink are stored plain.  LEVEL (1..22, default 3) is\n"
            "                        honoured where bitback writes the data: offline and\n"
            "                        with bitbackd; qemu-storage-daemon uses its own.\n"
            "                        Default: %s\n"
            "  --granularity SIZE    the dirty bitmap's granularity when a chain starts (a\n"
            "                        full; 4K to 2G, default the daemon's, 64K for qcow2);\n"
            "                        its incrementals keep it and store it in clusters as\n"
            "                        small, so scattered small writes store what changed\n"
            "                        (bitbackd and offline; qemu-storage-daemon's backup\n"
            "                        job copies at least 64K per write)\n"
            "  -t, --cache none|writeback\n"
            "                        how a backup into a folder writes and then hashes\n"
            "                        its data file: writeback (default) through the\n"
            "                        host's page cache, none with O_DIRECT, leaving the\n"
            "                        cache to the VMs (an error where the filesystem\n"
            "                        refuses O_DIRECT; best uncompressed)\n"
            "  --pull                live: read every disk's backup, full or incremental,\n"
            "                        over NBD and write it here (see below); the daemon\n"
            "                        writes no file of the repository\n"
            "  --nbd-socket PATH     live, pulling: the UNIX socket of the daemon's running\n"
            "                        NBD server (default: bitback starts one on a socket in\n"
            "                        $TMPDIR/bitback-pull-UID and stops it after)\n"
            "  --output=human|json   the result as text or as a JSON list of backups\n"
            "  --progress            draw progress even when stdout is not a terminal\n"
            "\n"
            "When an incremental or differential cannot be trusted (the bitmap is missing,\n"
            "inconsistent, or was cleared by someone else) a full backup is taken instead,\n"
            "with one line saying why.  A clear is seen by the bitmap's generation (bitbackd)\n"
            "or by its dirty count falling below the one the last backup recorded\n"
            "(qemu-storage-daemon reports no generation); a clear followed by as many new\n"
            "writes cannot be detected there: after clearing a bitmap by hand, run with\n"
            "--level full.  A disk bitbackd serves from Ceph RBD keeps an RBD snapshot of\n"
            "the newest backup: with its bitmap lost, the run takes an incremental from\n"
            "RBD's fast-diff since that snapshot instead of a full, saying so.\n"
            "\n"
            "Live, the target files are sent to the daemon as absolute paths.  A node that\n"
            "cannot store persistent bitmaps (raw) gets one kept in the daemon's memory:\n"
            "incrementals work while the daemon runs, the first run after it restarts is a\n"
            "full backup.  SIGINT or SIGTERM cancels the backup jobs and removes what the\n"
            "run made (the bitmaps stay able to give the next incremental).\n"
            "\n"
            "A full backup from a daemon other than bitbackd (qemu-storage-daemon) is\n"
            "pulled: the transaction starts a fleecing job (blockdev-backup sync=none into a\n"
            "temporary overlay), bitback reads the point in time over NBD, only the ranges\n"
            "block status reports as data, and writes the backup itself; QEMU's own full\n"
            "backup job visits every 1 MiB of the virtual size.  Incrementals, and runs\n"
            "with --speed (QEMU's job honours it), are pushed unless --pull is given.\n"
            "With --pull every disk is pulled from bitbackd or qemu-storage-daemon: an\n"
            "incremental's export carries its frozen bitmap, and only the extents its\n"
            "qemu:dirty-bitmap:NAME context marks dirty are read; several connections\n"
            "read at once when the server offers multi-conn.  The fleecing node and\n"
            "export (bbf-UUID-HASH), the overlay file (in $TMPDIR/bitback-pull-UID) and\n"
            "the NBD server bitback started are removed after the run, after SIGINT or\n"
            "SIGTERM too, and by the next run after a SIGKILL.\n"
            "\n"
            "Exit status: 0 ok, 1 failure, 128 + N after signal N (130 SIGINT, 143 SIGTERM).\n"
            "\n"
            "Environment (for tests only): BITBACK_FAKE_NOW=2026-01-05T10:00:00Z records\n"
            "that time (ISO 8601 UTC) as the backup's time instead of the clock's, so tests\n"
            "can lay backups out on a calendar for prune's retention rules; a malformed\n"
            "value is refused.\n",
            BACKUP_COMPRESS_DEFAULT ? "zstd" : "off");
}

static void bitmap_info_clear(BitmapInfo *b)
{
    free(b->name);
    free(b->generation);
    free(b->prior_generation);
}

/* Forget what the last query said about the disk's bitmaps. */
void backup_disk_clear_bitmaps(Disk *d)
{
    for (size_t i = 0; i < d->n_bitmaps; i++) {
        bitmap_info_clear(&d->bitmaps[i]);
    }
    free(d->bitmaps);
    d->bitmaps = NULL;
    d->n_bitmaps = 0;
    repo_plan_free_names(d->snapshots, d->n_snapshots);
    d->snapshots = NULL;
    d->n_snapshots = 0;
}

void backup_disk_free(Disk *d)
{
    backup_disk_clear_bitmaps(d);
    for (size_t i = 0; i < d->n_counts; i++) {
        free(d->counts[i].name);
    }
    free(d->counts);
    free(d->drv);
    repo_plan_free_names(d->sources, d->n_sources);
    repo_plan_free_names(d->freeze, d->n_freeze);
    free(d->tmp_path);
    free(d->tmp_block);
    json_object_put(d->tmp_options);
    free(d->generation);
    free(d->job_error);
    free(d->fleece_path);
    free(d->image_file);
    free(d->since_snapshot);
    free(d->node);
}

char *backup_strdup(const char *s)
{
    char *r = strdup(s ? s : "");

    if (!r) {
        abort();
    }
    return r;
}

const BitmapInfo *backup_disk_bitmap(const Disk *d, const char *name)
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
    if (!d->granularity) {
        d->granularity = o->granularity;   /* a new chain: --granularity */
    }
    d->sources = steal_pointer(&plan.sources);
    d->n_sources = plan.n_sources;
    d->freeze = steal_pointer(&plan.freeze);
    d->n_freeze = plan.n_freeze;
    *ret_reason = steal_pointer(&plan.reason);
    plan.n_sources = plan.n_freeze = 0;
    repo_plan_clear(&plan);
    return true;
}

/* --cache=none (docs/specs/repository.md, "Writing a backup"): the data
 * file of a backup into a folder is written with O_DIRECT (probed on the
 * new file: a filesystem that refuses it is an error), and hashed the same
 * way after, so that the backup does not fill the host's page cache.  A
 * rados repository has no page cache to bypass: nothing changes there. */
static bool target_direct(Repo *repo, const BackupOpts *o)
{
    return o->cache_none && repo_opens_by_name(repo);
}

static bool target_cache(Repo *repo, const BackupOpts *o, Disk *d,
                         Error **errp)
{
    if (!target_direct(repo, o)) {
        return true;
    }
    int fd = open(d->tmp_path, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0) {
        error_setg_errno(errp, errno, "%s: --cache=none: cannot open %s "
                         "with O_DIRECT", d->node, d->tmp_path);
        return false;
    }
    close(fd);
    struct json_object *file = json_object_new_object();
    struct json_object *cache = json_object_new_object();
    json_object_object_add(cache, "direct", json_object_new_boolean(true));
    json_object_object_add(file, "driver", json_object_new_string("file"));
    json_object_object_add(file, "filename", json_object_new_string(d->tmp_block));
    json_object_object_add(file, "cache", cache);
    d->tmp_options = json_object_new_object();
    json_object_object_add(d->tmp_options, "driver", json_object_new_string("qcow2"));
    json_object_object_add(d->tmp_options, "file", file);
    return true;
}

/* Create the target: a qcow2 with the parent's file as backing, zstd as
 * its compression type when the run compresses. */
static bool create_target(Repo *repo, const BackupOpts *o, Disk *d,
                          unsigned seq, Error **errp)
{
    _cleanup_json_ struct json_object *opts = json_object_new_object();

    if (o->compress) {
        json_object_object_add(opts, "compression_type",
                               json_object_new_string("zstd"));
    }
    /* Clusters as small as the bitmap's granularity (below the default
     * 64 KiB), so scattered small writes store what changed; never so
     * small that the L1 table would pass QEMU's 32 MiB (4 Mi entries of
     * cluster / 8 entries of cluster bytes each). */
    if (d->granularity && d->granularity < 65536) {
        uint64_t cs = MAX(d->granularity, 4096u);
        while (cs < 65536 && d->size / (cs * (cs / 8)) >= (UINT64_C(4) << 20)) {
            cs *= 2;
        }
        char buf[24];

        snprintf(buf, sizeof(buf), "%" PRIu64, cs);
        json_object_object_add(opts, "cluster_size", json_object_new_string(buf));
    }
    d->tmp_path = repo_tmp_data_path(repo, d->node, seq);
    repo->storage->remove(d->tmp_path);
    if (!(d->tmp_block = repo_block_name(repo, d->tmp_path, errp))) {
        return false;
    }
    if (!repo_opens_by_name(repo) &&
        !(d->tmp_options = repo_overlay_options(repo, d->node, seq,
                                                d->parent_seq, errp))) {
        return false;
    }
    if (d->parent_seq) {
        char name[REPO_ID_LEN + 8];

        repo_format_id(d->parent_seq, name);
        strcat(name, ".qcow2");
        json_object_object_add(opts, "backing_file", json_object_new_string(name));
        json_object_object_add(opts, "backing_fmt", json_object_new_string("qcow2"));
    }
    if (!bdrv_img_create(d->tmp_block, "qcow2", d->size, opts, errp)) {
        error_prepend(errp, "%s: cannot create %s: ", d->node, d->tmp_path);
        return false;
    }
    return target_cache(repo, o, d, errp);
}

bool backup_read_clock_override(BackupOpts *o, Error **errp)
{
    const char *v = getenv("BITBACK_FAKE_NOW");

    o->fake_now_set = false;
    if (!v || !*v) {
        return true;
    }
    if (!iso8601_utc_parse(v, &o->fake_now)) {
        error_setg(errp, "BITBACK_FAKE_NOW must be a time in ISO 8601 UTC "
                   "like 2026-01-05T10:00:00Z, not '%s'", v);
        return false;
    }
    o->fake_now_set = true;
    return true;
}

char *backup_now_iso(const BackupOpts *o)
{
    char buf[ISO8601_UTC_BUF];

    iso8601_utc_format(o->fake_now_set ? o->fake_now : time(NULL), buf);
    return backup_strdup(buf);
}

/* The counts of the bitmaps this backup relied on (its sources) and of
 * the one it started, as d->bitmaps (queried after the job) reports
 * them; backup_commit_disk puts them in the manifest (spec, Bitmaps 3). */
static void disk_record_counts(Disk *d)
{
    for (size_t i = 0; i <= d->n_sources; i++) {
        const char *name = i < d->n_sources ? d->sources[i] : d->new_bitmap;
        const BitmapInfo *b = backup_disk_bitmap(d, name);
        RepoBitmapCount *c;

        if (!b || b->count < 0) {
            continue;
        }
        c = realloc(d->counts, (d->n_counts + 1) * sizeof(*c));
        if (!c) {
            abort();
        }
        d->counts = c;
        c[d->n_counts].name = backup_strdup(name);
        c[d->n_counts++].count = (uint64_t)b->count;
    }
}

/* Step 6: hash the target and commit it. */
RepoManifest *backup_commit_disk(Repo *repo, const BackupOpts *o, Disk *d,
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
    m->node = backup_strdup(d->node);
    m->time = backup_strdup(time_iso);
    m->level = d->level;
    m->parent_seq = d->parent_seq;
    m->image_size = d->size;
    m->granularity = d->granularity;
    m->cluster_size = 0;                /* the scan picks it */
    m->bitmap = backup_strdup(d->new_bitmap);
    m->generation = d->generation ? backup_strdup(d->generation) : NULL;
    disk_record_counts(d);
    m->bitmap_counts = steal_pointer(&d->counts);
    m->n_bitmap_counts = d->n_counts;
    d->n_counts = 0;

    t0 = clock_monotonic_seconds();
    ok = repo->storage->sync(d->tmp_path, errp);
    t1 = clock_monotonic_seconds();
    p = cli_progress_new("hashing", d->size, cli_progress_wanted(o->progress));
    ok = ok && repo_scan_backup(repo, d->tmp_path, m,
                                target_direct(repo, o) ? BDRV_O_NOCACHE : 0,
                                cli_progress_cb, p, errp);
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
void backup_print_result(const BackupOpts *o, const Disk *disks,
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
void backup_mark_started(Repo *repo, const Disk *disks, size_t n)
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
void backup_announce(const Disk *disks, size_t n)
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

/* When the planner found no bitmap to trust: can the change since the
 * newest backup N come from the RBD snapshot PREFIX-N that N's run took?
 * Only for the same disk size, when that snapshot is there; then d's plan
 * becomes an incremental on N whose change is RBD's diff since it. */
static bool plan_from_snapshot(Repo *repo, const BackupOpts *o, Disk *d)
{
    RepoManifest *latest = repo_latest(repo, d->node);
    char name[BDRV_BITMAP_MAX_NAME + 1];

    if (!d->rbd_snapshots || !latest || latest->image_size != d->size ||
        (!o->level_auto && o->level != REPO_LEVEL_INC)) {
        return false;
    }
    repo_bitmap_name(name, o->prefix, latest->seq, "");
    for (size_t i = 0; i < d->n_snapshots; i++) {
        if (!strcmp(d->snapshots[i], name)) {
            d->level = REPO_LEVEL_INC;
            d->parent_seq = latest->seq;
            repo_plan_free_names(d->sources, d->n_sources);
            d->sources = NULL;
            d->n_sources = 0;
            if (!d->granularity) {
                d->granularity = o->granularity ? o->granularity : 65536;
            }
            d->since_snapshot = backup_strdup(name);
            return true;
        }
    }
    return false;
}

/* Steps 2 and 3 for every disk, and the bitmap names. */
bool backup_prepare_disks(Repo *repo, const BackupOpts *o, Disk *disks,
                          size_t n, unsigned *ret_seq, Error **errp)
{
    unsigned seq;

    for (size_t i = 0; i < n; i++) {
        char *reason = NULL;

        if (!plan_disk(repo, o, &disks[i], &reason, errp)) {
            return false;
        }
        if (reason && plan_from_snapshot(repo, o, &disks[i])) {
            fprintf(stderr, "%s: %s; RBD fast-diff since snapshot '%s' gives "
                    "the change: taking an incremental\n", disks[i].node,
                    reason, disks[i].since_snapshot);
        } else if (reason) {
            /* The one line the issue asks for; on stderr so that
             * --output=json stays parseable. */
            fprintf(stderr, "%s: taking a full backup: %s\n", disks[i].node,
                    reason);
        }
        free(reason);
    }
    seq = pick_seq(repo, o, disks, n);
    for (size_t i = 0; i < n; i++) {
        Disk *d = &disks[i];

        repo_format_id(seq, d->id);
        repo_bitmap_name(d->new_bitmap, o->prefix, seq, "");
        repo_bitmap_name(d->src_bitmap, o->prefix, seq, ".src");
        repo_remove_tmp_files(repo, d->node);
        if (!repo_mark_attempt(repo, d->node, seq, errp) ||
            !create_target(repo, o, d, seq, errp)) {
            return false;
        }
    }
    *ret_seq = seq;
    return true;
}

/* Bitmaps of d the run may remove (repo_plan_stale_bitmaps). */
char **backup_stale_bitmaps(Repo *repo, const BackupOpts *o, Disk *d,
                            size_t *ret_n)
{
    RepoPlanDisk in = plan_input(d);
    RepoPlanOpts po = plan_opts(o);

    return repo_plan_stale_bitmaps(repo, &po, o->prefix_given, &in, ret_n);
}

/* --compress=off|zstd[:LEVEL] */
static bool parse_compress(const char *arg, BackupOpts *o, Error **errp)
{
    if (!strcmp(arg, "off")) {
        o->compress = false;
        o->compress_level = 0;
        return true;
    }
    if (strncmp(arg, "zstd", 4) || (arg[4] && arg[4] != ':')) {
        error_setg(errp, "--compress must be off or zstd[:LEVEL], not '%s'", arg);
        return false;
    }
    o->compress = true;
    o->compress_level = 0;
    if (arg[4] == ':') {
        char *end;
        errno = 0;
        long v = strtol(arg + 5, &end, 10);
        if (errno || end == arg + 5 || *end || v < 1 ||
            v > BDRV_MAX_COMPRESS_LEVEL) {
            error_setg(errp, "--compress=zstd:LEVEL: LEVEL must be 1..%d, not "
                       "'%s'", BDRV_MAX_COMPRESS_LEVEL, arg + 5);
            return false;
        }
        o->compress_level = (int)v;
    }
    return true;
}

/* Lock every disk of the run for backing up (spec, "Locks"), then read
 * the repository again: a prune that ended just before may have changed
 * the chains the run will build on.  A disk named twice is locked once
 * (the run refuses it after). */
static bool lock_disks(Repo *repo, const BackupOpts *o,
                       RepoLock *locks[BACKUP_MAX_DISKS], Error **errp)
{
    _cleanup_free_ char *offline = o->n_nodes ? NULL : backup_offline_node(o);
    size_t n = o->n_nodes ? o->n_nodes : 1;

    for (size_t i = 0; i < n; i++) {
        const char *node = o->n_nodes ? o->nodes[i] : offline;
        bool seen = false;
        for (size_t j = 0; j < i; j++) {
            seen |= !strcmp(o->nodes[j], node);
        }
        if (!seen && !(locks[i] = repo_lock_node(repo, node, REPO_LOCK_BACKUP,
                                                 errp))) {
            return false;
        }
    }
    return repo_reload(repo, errp);
}

int cli_cmd_backup(int argc, char **argv)
{
    enum { OPT_OUTPUT = 256, OPT_PROGRESS, OPT_SPEED, OPT_COMPRESS,
           OPT_NBD_SOCKET, OPT_GRANULARITY, OPT_PULL, OPT_OBJECT,
           OPT_TLS_CREDS, OPT_NBD_SERVER, OPT_FLEECE_DIR, OPT_CACHE };
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
        { "compress", required_argument, NULL, OPT_COMPRESS },
        { "nbd-socket", required_argument, NULL, OPT_NBD_SOCKET },
        { "granularity", required_argument, NULL, OPT_GRANULARITY },
        { "pull", no_argument, NULL, OPT_PULL },
        { "object", required_argument, NULL, OPT_OBJECT },
        { "tls-creds", required_argument, NULL, OPT_TLS_CREDS },
        { "nbd-server", required_argument, NULL, OPT_NBD_SERVER },
        { "fleece-dir", required_argument, NULL, OPT_FLEECE_DIR },
        { "cache", required_argument, NULL, OPT_CACHE },
        { NULL, 0, NULL, 0 },
    };
    BackupOpts o = { .level_auto = true, .compress = BACKUP_COMPRESS_DEFAULT };
    Error *err = NULL;
    _cleanup_free_ char *repo_abs = NULL;
    Repo *repo;
    int c, ret;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:t:", longopts, NULL)) != -1) {
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
        case OPT_COMPRESS:
            if (!parse_compress(optarg, &o, &err)) {
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            break;
        case OPT_NBD_SOCKET:
            o.nbd_socket = optarg;
            break;
        case OPT_PULL:
            o.pull = true;
            break;
        case OPT_OBJECT:
            if (!cli_object_add(optarg, &err)) {
                error_prepend(&err, "--object: ");
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            break;
        case OPT_TLS_CREDS:
            o.tls_creds = optarg;
            break;
        case OPT_NBD_SERVER:
            o.nbd_server = optarg;
            break;
        case OPT_FLEECE_DIR:
            o.fleece_dir = optarg;
            break;
        case 't':
        case OPT_CACHE:
            if (!strcmp(optarg, "none") || !strcmp(optarg, "writeback")) {
                o.cache_none = !strcmp(optarg, "none");
            } else {
                error_report("--cache must be none or writeback, not '%s'",
                             optarg);
                return CLI_EXIT_ERROR;
            }
            break;
        case OPT_GRANULARITY: {
            uint64_t g;

            if (!cli_parse_size(optarg, "granularity", &g, &err)) {
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            if (!IS_POW2(g) || g < 4096 || g > (UINT64_C(1) << 31)) {
                error_report("--granularity must be a power of two from 4K "
                             "to 2G, not %s", optarg);
                return CLI_EXIT_ERROR;
            }
            o.granularity = (uint32_t)g;
            break;
        }
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
    if ((o.pull || o.tls_creds || o.nbd_server || o.fleece_dir ||
         o.nbd_socket) && !o.connect) {
        error_report("--pull, --tls-creds, --nbd-server, --nbd-socket and "
                     "--fleece-dir apply to --connect only");
        return CLI_EXIT_ERROR;
    }
    if (o.nbd_server && o.nbd_socket) {
        error_report("give at most one of --nbd-socket and --nbd-server");
        return CLI_EXIT_ERROR;
    }
    if (o.connect && qmp_address_is_tcp(o.connect)) {
        /* The daemon may be on another host: it must not write the
         * repository, so every disk is pulled. */
        if (o.nbd_socket) {
            error_report("--connect HOST:PORT: the daemon's NBD server is "
                         "reached over TCP too; give --nbd-server HOST:PORT, "
                         "not --nbd-socket");
            return CLI_EXIT_ERROR;
        }
        if (!o.nbd_server) {
            error_report("--connect HOST:PORT needs --nbd-server HOST:PORT "
                         "(the daemon's NBD server, read with --tls-creds)");
            return CLI_EXIT_ERROR;
        }
        o.pull = true;
    } else if (o.nbd_server || o.fleece_dir) {
        error_report("--nbd-server and --fleece-dir are for a daemon reached "
                     "over TCP (--connect HOST:PORT)");
        return CLI_EXIT_ERROR;
    }
    if (o.pull && o.speed) {
        error_report("--speed limits the daemon's backup job; --pull runs none");
        return CLI_EXIT_ERROR;
    }
    if (o.format && o.connect) {
        error_report("-f applies to --image only");
        return CLI_EXIT_ERROR;
    }
    /* The daemon opens the targets by the names we send, from its own
     * working folder (qemu-storage-daemon --daemonize runs in /): every
     * path is made absolute first. */
    if (o.repo_path[0] != '/' && !bdrv_filename_is_rbd(o.repo_path)) {
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
    if (!backup_read_clock_override(&o, &err)) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
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
    RepoLock *locks[BACKUP_MAX_DISKS] = { NULL };
    if (!lock_disks(repo, &o, locks, &err)) {
        error_report_err(err);
        ret = CLI_EXIT_ERROR;
    } else {
        ret = o.connect ? backup_live(&o, repo) : backup_offline(&o, repo);
    }
    for (size_t i = 0; i < BACKUP_MAX_DISKS; i++) {
        repo_unlock(locks[i]);
    }
    repo_free(repo);
    return ret;
}
