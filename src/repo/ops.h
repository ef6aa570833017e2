/*
 * The repository's operations (docs/specs/repository.md): restore a
 * point, verify backups (stored files, or a target against a point), and
 * prune a disk's backups (synthetic fulls, then deletion).  `bitback
 * restore`, `verify` and `prune` are thin front ends over these; bitbackd
 * and the unit tests can call them too.
 *
 * Like the rest of src/repo this is control code: functions take
 * Error **errp last, never print, and report progress and findings only
 * through the callbacks the caller passes (RepoProgressOps, RepoVerify,
 * RepoPruneEventFn).
 */
#ifndef BITBACK_REPO_OPS_H
#define BITBACK_REPO_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "repo/repo.h"
#include "repo/retention.h"

/* Progress of an operation that reads or writes images step by step:
 * begin(opaque, label, total) when a step starts ("disk0 restore 000003",
 * "disk0 verify 000003", "disk0 merge 000003"); its result is the opaque
 * of update() and end() for that step.  A NULL RepoProgressOps, or NULL
 * members, report nothing. */
typedef struct RepoProgressOps {
    void *(*begin)(void *opaque, const char *label, uint64_t total);
    RepoProgressFn *update;
    void (*end)(void *step);
    void *opaque;
} RepoProgressOps;

/* ---- restore.c ---- */

/* The node of repo to work on: `node` when given (it must have backups),
 * else the repository's only node; an error listing the nodes otherwise.
 * The result is the repository's string. */
const char *repo_pick_node(Repo *repo, const char *node, Error **errp);

/* Write the image that src shows (a backup's chain as repo_open_chain()
 * opened it; `what` names it in errors; it stays the caller's) into the
 * NEW file dst (it must not exist; O_EXCL), as "raw" (sparse: zero and
 * unallocated ranges are holes, the size set by ftruncate) or "qcow2" (no
 * backing file, 64 KiB clusters; only clusters holding non-zero data are
 * written).  dst is fsynced before returning true; on failure it is
 * removed.  dst may be an rbd: name (a rados repository's file, qcow2
 * only): the rbd driver refuses an existing image, the flush makes it
 * durable, and on failure the caller removes it through its storage.
 * progress (may be NULL) is called with the bytes scanned.
 * *ret_written (may be NULL) gets the data bytes written. */
bool repo_restore_image(BlockDriverState *src, const char *what,
                        const char *dst, const char *format,
                        RepoProgressFn *progress, void *opaque,
                        uint64_t *ret_written, Error **errp);

/* Write the image that src shows (as for repo_restore_image) in place
 * into the EXISTING file or block device dst, opened as a raw node with
 * QEMU's image locks: no truncation, no rename, every byte of the image
 * replaced, and bytes past the image's size left as they are.  dst must
 * be at least the image's size (error, nothing written, otherwise).
 * sparse: dst is read first and only the 64 KiB pieces that differ are
 * written (zeroes only where dst is not zero already); else every byte is
 * written.  Memory is bounded (two 4 MiB buffers); dst is flushed before
 * returning true.  *ret_written (may be NULL) gets the bytes written.  On
 * failure dst may hold part of the image. */
bool repo_restore_existing(BlockDriverState *src, const char *what,
                           const char *dst, bool sparse,
                           RepoProgressFn *progress, void *opaque,
                           uint64_t *ret_written, Error **errp);

/* Restore backup m of repo into output (raw or qcow2): its chain opened
 * by repo_open_chain() (a chain that differs from the manifests is refused
 * before anything is created), written to ".NAME.bitback-restore.tmp" in
 * output's folder (a leftover is replaced), synced and renamed over
 * output, then the folder synced.  Whether output may be replaced is the
 * caller's decision.  One progress step. */
bool repo_restore(Repo *repo, const RepoManifest *m, const char *output,
                  const char *format, const RepoProgressOps *progress,
                  uint64_t *ret_written, Error **errp);

/* Restore backup m of repo in place into the existing file or block
 * device output (repo_restore_existing), its chain opened as for
 * repo_restore.  One progress step. */
bool repo_restore_in_place(Repo *repo, const RepoManifest *m,
                           const char *output, bool sparse,
                           const RepoProgressOps *progress,
                           uint64_t *ret_written, Error **errp);

/* ---- verify.c ---- */

/* A verification: the caller's callbacks, and counters every call adds
 * to.  Embed it in the caller's state to reach that from the callbacks. */
typedef struct RepoVerify {
    /* One problem of backup m: kind ("data", "missing", "extra",
     * "merkle-root", "chain", "unreadable", "size", "error"), offset the
     * guest byte offset of the cluster or -1, msg one sentence.  Required. */
    void (*problem)(struct RepoVerify *v, const RepoManifest *m,
                    int64_t offset, const char *kind, const char *msg);
    /* Something worth saying that is not a problem (may be NULL). */
    void (*note)(struct RepoVerify *v, const RepoManifest *m,
                 const char *msg);
    /* Opens repo_verify_against's target read-only (NULL:
     * bdrv_open_image with the format probed). */
    BlockDriverState *(*open_target)(const char *target, Error **errp);
    RepoProgressOps progress;

    unsigned backups_checked;
    uint64_t bytes_read;
    uint64_t problems;
} RepoVerify;

/* The stored check of backup m: its manifest's hash list against its
 * Merkle root, its chain as the manifests describe it, and every cluster
 * allocated in its file re-read through that chain and compared with the
 * manifest (the same set of clusters, the same hashes, the same root).  A
 * backup in the window of an interrupted prune whose file matches the
 * pending manifest is a note, not a problem.  Everything found is a
 * problem; nothing here fails. */
void repo_verify_stored(RepoVerify *v, Repo *repo, const RepoManifest *m);

/* The target check: target (an NBD URI or an image file) must hold
 * exactly the content of point m, cluster by cluster, as m's chain's
 * manifests record it.  False on an operational error (errp set: the
 * chain's manifests, opening or reading the target); mismatches are
 * problems. */
bool repo_verify_against(RepoVerify *v, Repo *repo, const RepoManifest *m,
                         const char *target, Error **errp);

/* ---- prune.c ---- */

typedef enum RepoPruneEvent {
    REPO_PRUNE_ROLLED,         /* an interrupted prune's synthetic full finished */
    REPO_PRUNE_MERGED,         /* a kept backup is now a synthetic full */
    REPO_PRUNE_DELETED,        /* a backup was deleted */
} RepoPruneEvent;

typedef void RepoPruneEventFn(void *opaque, RepoPruneEvent ev,
                              const char *node, const char *id);

typedef struct RepoPruneResult {
    size_t kept;
    unsigned rolled, merged, deleted;
} RepoPruneResult;

/* What a prune of node with the rules keep would do, changing nothing:
 * *ret_items (caller frees) gets one item per backup of node, ascending
 * ID, with kept_by set (repo_retention_compute); their times point into
 * repo's manifests and stay valid until the repository reloads.  Fails
 * (errp set) on a bad time, or if the newest backup would go. */
bool repo_prune_plan(Repo *repo, const char *node,
                     const RepoKeepOptions *keep,
                     RepoRetentionItem **ret_items, size_t *ret_n,
                     Error **errp);

/* Keep the backups of node the retention rules keep (repo_prune_plan;
 * options that keep nothing are refused) and delete the others, in the
 * crash-safe order of prune.c's header: roll an interrupted prune
 * forward, make every kept backup whose parent goes a synthetic full
 * (oldest first), then delete (newest first).  event (may be NULL) is
 * called as each step is done; *ret (may be NULL) gets the counts.  The
 * repository is reloaded (its manifests' pointers change). */
bool repo_prune_node(Repo *repo, const char *node,
                     const RepoKeepOptions *keep,
                     const RepoProgressOps *progress, RepoPruneEventFn *event,
                     void *opaque, RepoPruneResult *ret, Error **errp);

#endif
