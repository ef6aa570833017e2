/*
 * Shared between the files of `bitback backup` (not a public API):
 *   backup-cmd.c      options, main, the Disk helpers and the steps both
 *                     modes share (plan, target, commit, result)
 *   backup-live.c     live: the QMP transaction, job waiting, cleanup
 *   backup-offline.c  offline: the same steps done on the image itself
 * backup-cmd.c's opening comment describes a run.
 */
#ifndef BITBACK_CLI_BACKUP_INTERNAL_H
#define BITBACK_CLI_BACKUP_INTERNAL_H

#include <signal.h>
#include <time.h>

#include "cli/cli.h"
#include "crypto/tls-creds.h"
#include "repo/planner.h"
#include "repo/repo.h"

#define BACKUP_MAX_DISKS 64

/* A bitmap of a disk as the planner sees it. */
typedef RepoPlanBitmap BitmapInfo;

typedef struct Disk {
    char *node;                        /* node name / disk name in the repo */
    uint64_t size;
    bool no_backing;                   /* live: backing_file_depth 0 */
    bool volatile_bitmaps;             /* live: the node cannot store
                                        * persistent bitmaps (raw) */
    char *drv;                         /* live: the node's driver */
    BitmapInfo *bitmaps;
    size_t n_bitmaps;
    /* Live, bitbackd serving an RBD image (an rbd node, or raw over one):
     * each run snapshots the image at its point in time (PREFIX-ID, as
     * its bitmap), keeping only the newest backup's, so that a run whose
     * bitmaps are lost takes an incremental from RBD's fast-diff since
     * that snapshot (docs/specs/repository.md, "RBD snapshots"). */
    bool ours;                         /* live: the daemon is bitbackd */
    bool rbd_snapshots;
    char **snapshots;                  /* the image's snapshots (names) */
    size_t n_snapshots;
    char *since_snapshot;              /* the plan: the change is the diff
                                        * since this snapshot (no bitmap) */

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
    char *tmp_path;                    /* .ID.qcow2.tmp in the repository */
    char *tmp_block;                   /* its name for the block layer */
    /* the options that open it for writing when the repository's files
     * are not opened by name (repo_overlay_options), else NULL */
    struct json_object *tmp_options;
    char *generation;                  /* of new_bitmap, after step 4 */
    char job_id[REPO_MAX_NODE_NAME + 32];
    RepoBitmapCount *counts;           /* for the manifest, at commit */
    size_t n_counts;
    bool job_failed;
    char *job_error;
    /* Live pull (--pull, or a full from a daemon other than bitbackd):
     * the fleecing node, named "bbf-UUID8-HASH" (also its export's ID and
     * name), the file under it (its path is set for every disk, so a
     * killed run's is found), and what of it exists. */
    bool pull;
    char fleece[32];
    /* push into a rados repository: the daemon's node of the target
     * ("bbt-" + the fleece name's suffix), added with no backing file */
    char target[32];
    bool target_added;
    char *fleece_path;                 /* local daemons: bitback's file */
    bool fleece_added, export_added;
    /* Remote daemons (QMP over TCP): the overlay is made by the daemon
     * (blockdev-create) under a file node "FLEECE-f", on its host. */
    bool fleece_remote;
    bool fleece_file_added;
    char *image_file;                  /* the disk's image, as the daemon
                                        * reports it (query-named-block-nodes
                                        * "file") */
    double copy_seconds;               /* point in time -> data written */
    double hash_seconds;               /* the hashing pass alone */
    double sync_seconds;               /* fsync of the data + commit */
} Disk;

/* Whether `bitback backup` compresses without --compress (the one place
 * the default lives). */
#define BACKUP_COMPRESS_DEFAULT true

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
    bool compress;                     /* zstd compressed target clusters */
    bool cache_none;                   /* --cache=none: O_DIRECT target */
    int compress_level;                /* --compress=zstd:LEVEL, 0: default */
    bool json;
    bool progress;
    bool fake_now_set;                 /* BITBACK_FAKE_NOW (tests only) */
    const char *nbd_socket;            /* --nbd-socket: the daemon's NBD server */
    const char *nbd_server;            /* --nbd-server HOST:PORT: the same on TCP */
    const char *tls_creds;             /* --tls-creds: a client tls-creds object's
                                        * id, for QMP over TCP and NBD reads */
    const char *fleece_dir;            /* --fleece-dir: overlays, on the daemon's
                                        * host (remote daemons) */
    bool pull;                         /* --pull: every disk read over NBD */
    uint32_t granularity;              /* --granularity: a new chain's bitmap */
    time_t fake_now;
} BackupOpts;

/* backup-cmd.c */

/* Forget what the last query said about the disk's bitmaps. */
void backup_disk_clear_bitmaps(Disk *d);

void backup_disk_free(Disk *d);

char *backup_strdup(const char *s);

const BitmapInfo *backup_disk_bitmap(const Disk *d, const char *name);

/* Read BITBACK_FAKE_NOW into o (the one place it is read): unset or
 * empty leaves the real clock; a value that is not ISO 8601 UTC
 * ("2026-01-05T10:00:00Z") is refused.  Test-only: it lets the tests
 * lay backups out on a synthetic calendar (docs/specs/retention.md). */
bool backup_read_clock_override(BackupOpts *o, Error **errp);

/* The backup's time for its manifest, ISO 8601 UTC: the override of
 * backup_read_clock_override, else the clock.  Caller frees. */
char *backup_now_iso(const BackupOpts *o);

/* Step 6: hash the target and commit it. */
RepoManifest *backup_commit_disk(Repo *repo, const BackupOpts *o, Disk *d,
                                 unsigned seq, const char *time_iso,
                                 Error **errp);

/* The result: one line per disk, or a JSON list of the backups as `list`
 * shows them plus where the time went (for bench/): copy-seconds (the
 * job or the offline copy), hash-seconds (the hashing pass alone) and
 * sync-seconds (making the data durable and committing). */
void backup_print_result(const BackupOpts *o, const Disk *disks,
                         RepoManifest **made, size_t n);

/* After the transaction: the attempt markers say its bitmaps exist.  A
 * failure only costs a full backup if the bitmap later goes missing, so
 * it is a warning. */
void backup_mark_started(Repo *repo, const Disk *disks, size_t n);

/* Once the point in time is fixed, say so on stderr (scripts and tests
 * may wait for this line before letting writers go on). */
void backup_announce(const Disk *disks, size_t n);

/* Steps 2 and 3 for every disk, and the bitmap names. */
bool backup_prepare_disks(Repo *repo, const BackupOpts *o, Disk *disks,
                          size_t n, unsigned *ret_seq, Error **errp);

/* Bitmaps of d the run may remove (repo_plan_stale_bitmaps). */
char **backup_stale_bitmaps(Repo *repo, const BackupOpts *o, Disk *d,
                            size_t *ret_n);

/* backup-live.c: the run for --connect; a CLI exit status. */
int backup_live(const BackupOpts *o, Repo *repo);

/* backup-offline.c: the run for --image; a CLI exit status. */
int backup_offline(const BackupOpts *o, Repo *repo);
/* The disk's name in the repository for --image: --node, else the
 * image's base name without its extension.  Malloc'd. */
char *backup_offline_node(const BackupOpts *o);
/* Most source connections one copy reads through (backup_copy_extents). */
#define BACKUP_MAX_COPY_CONNS 4

/* Copy the content of src that d's backup stores into d->tmp_path: for a
 * full, the ranges block status does not report as zeroes (asked in the
 * biggest steps src gives); else the union of d's source bitmaps in src.
 * Compressed as o says.  (backup-offline.c.) */
bool backup_copy_image(const BackupOpts *o, BlockDriverState *src, Disk *d,
                       Error **errp);

/* A growing array of extents added in increasing order; an extent that
 * starts where the last one ends extends it.  Grows geometrically; out of
 * memory aborts, as the copy's other lists do.  Caller frees l->ext. */
typedef struct ExtentList {
    BdrvDirtyExtent *ext;
    size_t n, cap;
} ExtentList;
void extent_list_add(ExtentList *l, uint64_t off, uint64_t len);

/* The ranges of [0, d->size) that block status of src does not report as
 * zeroes, sorted and merged, in a malloc'd array *ret_ext (caller frees). */
bool backup_data_extents(BlockDriverState *src, const Disk *d,
                         BdrvDirtyExtent **ret_ext, size_t *ret_n,
                         Error **errp);

/* Copy the sorted extents ext[0..n_ext) (taken: freed here) of the
 * source into d->tmp_path, reading through srcs[0..n_src) (1 to
 * BACKUP_MAX_COPY_CONNS views of the same content, e.g. connections to one
 * multi-conn NBD export) in parallel, one BACKUP_COPY_CHUNK buffer each,
 * writing one piece at a time; ranges that read as zeroes become zero
 * writes.  Stops with an "interrupted" error once *stop (when given) is
 * non-zero.  The target is flushed before it is closed. */
bool backup_copy_extents(const BackupOpts *o, BlockDriverState **srcs,
                         size_t n_src, Disk *d, BdrvDirtyExtent *ext,
                         size_t n_ext, const volatile sig_atomic_t *stop,
                         Error **errp);
/* backup-pull.c: connect to the NBD export at uri (whose size must be
 * size), with TLS when tls (a client tls-creds object).  *ret_multi_conn: the server advertises multi-conn, so more
 * connections to it see the same content.  bitmap non-NULL: *ret_ext
 * (caller frees) gets the extents its qemu:dirty-bitmap:BITMAP context
 * reports dirty, sorted and merged; NULL: *ret_ext is NULL. */
bool pull_probe_export(const char *uri, const TLSCreds *tls,
                       const char *bitmap, uint64_t size,
                       bool *ret_multi_conn, BdrvDirtyExtent **ret_ext,
                       size_t *ret_n, Error **errp);

#endif
