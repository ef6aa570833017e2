/*
 * Prune (docs/specs/repository.md): retention for one disk of a
 * repository.  `bitback prune` is its front end.
 *
 * Which backups stay is the retention rules' decision (retention.c,
 * docs/specs/retention.md; `--keep N` is keep-last N), always including
 * the newest.  A kept backup whose parent does not
 * stay becomes a synthetic full: the image at its point in time is
 * written (repo_restore_image, the restore code) into a qcow2 with no
 * backing file, scanned for its hashes (a full lists every cluster
 * allocated in its file) and put in place of the old file and manifest,
 * under the same ID.  A forever-incremental chain therefore never has to
 * re-read the source.  Then the pruned backups are deleted.  Dirty bitmaps
 * are not touched: the newest backup's bitmap stays valid, since the
 * newest backup always stays.
 *
 * Crash safety.  The order of the steps, and why a kill anywhere leaves
 * every remaining backup restorable bit for bit:
 *   1. Synthesize, oldest kept first, before anything is deleted, so the
 *      chains being read are complete.  For backup B: write
 *      .B.qcow2.tmp, fsync it, scan it, write .B.json.tmp, fsync it.
 *      (A kill here leaves tmp files that readers ignore and the next
 *      backup or prune removes.)
 *   2. rename .B.qcow2.tmp over B.qcow2, then .B.json.tmp over B.json,
 *      fsync the folder.  The new B.qcow2 shows exactly the content of the
 *      old one at B's point in time, so B and every backup whose chain
 *      goes through B (their backing file names "B.qcow2") restore the same
 *      bytes before and after each rename.  The one window where B's
 *      manifest does not describe its file lies between the two renames:
 *      B.qcow2 is already a full while B.json is still the old one.  In it
 *      .B.json.tmp (synced in 1) holds the new manifest; verify then
 *      checks B against that pending manifest, and the next prune rolls
 *      the change forward (step 0) -- so verify stays clean too.
 *   3. Delete the pruned backups (kept ones may lie between them), newest first, each by unlinking its
 *      manifest (the backup stops existing: a backup exists iff its
 *      manifest does), syncing the folder, then unlinking its qcow2.  No
 *      kept backup reads a pruned file any more (1-2 made every kept
 *      backup's parent kept, or made it a full), and deleting newest first
 *      keeps the chain of every pruned backup still present complete.
 *   0. At start, roll forward: a backup whose manifest names a parent but
 *      whose file has no backing file, while its synthetic full's manifest
 *      is pending (.B.json.tmp, repo_pending_manifest), is a step 2 that was
 *      cut short; its file is rescanned and its manifest rewritten as a
 *      synthetic full.  (Without the pending manifest a missing link is
 *      damage, which repo_open_chain refuses, never a prune to finish.)
 *
 * Every chain is opened by repo_open_chain(), exactly as the manifests
 * describe it: a backing link that differs (swapped, removed, added,
 * pointing out of the repository) stops prune before it writes anything
 * for that backup.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "repo/ops.h"
#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

/* A synthetic full manifest for the point of m (its hashes still empty). */
static RepoManifest *synthetic_manifest(const RepoManifest *m)
{
    RepoManifest *n = calloc(1, sizeof(*n));

    if (!n) {
        return NULL;
    }
    n->seq = m->seq;
    memcpy(n->id, m->id, sizeof(n->id));
    n->node = strdup(m->node);
    n->time = strdup(m->time);
    n->level = REPO_LEVEL_FULL;
    n->synthetic = true;
    n->parent_seq = 0;
    n->image_size = m->image_size;
    n->granularity = m->granularity;
    n->cluster_size = m->cluster_size;
    n->bitmap = m->bitmap ? strdup(m->bitmap) : NULL;
    n->generation = m->generation ? strdup(m->generation) : NULL;
    if (!n->node || !n->time || (m->bitmap && !n->bitmap) ||
        (m->generation && !n->generation)) {
        repo_manifest_free(n);
        return NULL;
    }
    /* The counts stay: the next run still checks the bitmaps against them. */
    n->bitmap_counts = calloc(m->n_bitmap_counts + 1, sizeof(*n->bitmap_counts));
    if (!n->bitmap_counts) {
        repo_manifest_free(n);
        return NULL;
    }
    for (size_t i = 0; i < m->n_bitmap_counts; i++) {
        n->bitmap_counts[i].name = strdup(m->bitmap_counts[i].name);
        n->bitmap_counts[i].count = m->bitmap_counts[i].count;
        n->n_bitmap_counts = i + 1;
        if (!n->bitmap_counts[i].name) {
            repo_manifest_free(n);
            return NULL;
        }
    }
    return n;
}

/* Steps 1-2 for backup m: replace its file and manifest by a synthetic
 * full.  m is invalid afterwards (the repo is reloaded). */
static bool synthesize(Repo *repo, RepoManifest *m,
                       const RepoProgressOps *progress, Error **errp)
{
    _cleanup_free_ char *data = repo_data_path(repo, m->node, m->seq);
    _cleanup_free_ char *json = repo_manifest_path(repo, m->node, m->seq);
    _cleanup_free_ char *tmp = repo_tmp_data_path(repo, m->node, m->seq);
    _cleanup_free_ char *tmp_json = repo_tmp_manifest_path(repo, m->node,
                                                           m->seq);
    _cleanup_free_ char *dir = repo_node_dir(repo, m->node);
    RepoManifest *nm = synthetic_manifest(m);
    const RepoStorage *fs = repo->storage;
    _cleanup_free_ char *tmp_block = NULL;
    BlockDriverState *src = NULL;
    RepoStat st;
    int r;
    bool ok = false;

    if (!data || !json || !tmp || !tmp_json || !dir || !nm) {
        error_setg(errp, "out of memory");
        goto out;
    }
    if (!(tmp_block = repo_block_name(repo, tmp, errp))) {
        goto out;
    }
    /* Merge the chain the manifests describe, nothing else. */
    src = repo_open_chain(repo, m, errp);
    if (!src) {
        goto out;
    }
    fs->remove(tmp);    /* leftovers of an interrupted run */
    fs->remove(tmp_json);

    char label[REPO_MAX_NODE_NAME + 32];
    snprintf(label, sizeof(label), "%s merge %s", m->node, m->id);
    void *step = repo_progress_begin(progress, label, m->image_size);
    ok = repo_restore_image(src, data, tmp_block, "qcow2",
                            repo_progress_fn(progress), step, NULL, errp);
    repo_progress_end(progress, step);
    bdrv_unref(steal_pointer(&src));
    if (!ok) {
        goto out;
    }
    ok = false;
    if (!repo_scan_backup(repo, tmp, nm, 0, NULL, NULL, errp)) {
        goto out_unlink;
    }
    if (!fs->sync(tmp, errp)) {
        goto out_unlink;
    }
    if ((r = fs->stat(tmp, &st)) < 0) {
        error_setg_errno(errp, -r, "cannot stat %s", tmp);
        goto out_unlink;
    }
    nm->stored_bytes = st.allocated;
    if (!repo_manifest_write(repo, tmp_json, nm, errp) ||
        !fs->sync_dir(dir, errp)) {
        goto out_unlink;
    }
    /* Step 2: the window between these renames is covered (see top). */
    if ((r = fs->rename(tmp, data)) < 0) {
        error_setg_errno(errp, -r, "cannot rename %s to %s", tmp, data);
        goto out_unlink;
    }
    if ((r = fs->rename(tmp_json, json)) < 0) {
        error_setg_errno(errp, -r, "cannot rename %s to %s", tmp_json,
                         json);
        goto out;
    }
    if (!fs->sync_dir(dir, errp)) {
        goto out;
    }
    ok = repo_reload(repo, errp);
    goto out;

out_unlink:
    fs->remove(tmp);
    fs->remove(tmp_json);
out:
    bdrv_unref(src);
    repo_manifest_free(nm);
    return ok;
}

/* Step 0: is m in the window of step 2 -- its manifest names a parent, its
 * file is the synthetic full (no backing file) and that full's manifest is
 * pending?  Then *ret_bs is its chain (the file alone).  The chain opens
 * through repo_open_chain(), which accepts exactly this difference. */
static bool in_prune_window(Repo *repo, const RepoManifest *m,
                            BlockDriverState **ret_bs, Error **errp)
{
    RepoManifest *pending;
    BlockDriverState *bs;

    *ret_bs = NULL;
    if (!m->parent_seq || !(pending = repo_pending_manifest(repo, m))) {
        return true;
    }
    repo_manifest_free(pending);
    bs = repo_open_chain(repo, m, errp);
    if (!bs) {
        return false;
    }
    if (bs->backing) {
        bdrv_unref(bs);       /* killed in step 1: still the old file */
    } else {
        *ret_bs = bs;
    }
    return true;
}

static bool roll_forward(Repo *repo, const char *node, RepoPruneEventFn *event,
                         void *opaque, unsigned *ret_done, Error **errp)
{
    for (size_t i = 0; i < repo->n_backups; i++) {
        RepoManifest *m = repo->backups[i];
        BlockDriverState *bs;

        if (strcmp(m->node, node)) {
            continue;
        }
        if (!in_prune_window(repo, m, &bs, errp)) {
            return false;
        }
        if (!bs) {
            continue;
        }
        _cleanup_free_ char *data = repo_data_path(repo, node, m->seq);
        _cleanup_free_ char *json = repo_manifest_path(repo, node, m->seq);
        _cleanup_free_ char *tmp_json = repo_tmp_manifest_path(repo, node,
                                                               m->seq);
        RepoManifest *nm = synthetic_manifest(m);
        _cleanup_free_ char *dir = repo_node_dir(repo, node);
        RepoStat st;
        int r = 0;
        bool ok = nm && data && json && tmp_json;

        if (!ok) {
            error_setg(errp, "out of memory");
        }
        ok = ok && repo_scan_to_index(repo, bs, data, nm, NULL, NULL, errp);
        bdrv_unref(bs);
        if (ok && repo->storage->stat(data, &st) == 0) {
            nm->stored_bytes = st.allocated;
        }
        ok = ok && repo_manifest_write(repo, tmp_json, nm, errp);
        if (ok && (r = repo->storage->rename(tmp_json, json)) < 0) {
            error_setg_errno(errp, -r, "cannot rename %s to %s", tmp_json,
                             json);
            repo->storage->remove(tmp_json);
            ok = false;
        }
        if (ok) {
            repo->storage->sync_dir(dir, NULL);
            if (event) {
                event(opaque, REPO_PRUNE_ROLLED, node, nm->id);
            }
        }
        repo_manifest_free(nm);
        if (!ok || !repo_reload(repo, errp)) {
            return false;
        }
        (*ret_done)++;
        i = (size_t)-1;   /* the list was reloaded: start over */
    }
    return true;
}

bool repo_prune_plan(Repo *repo, const char *node,
                     const RepoKeepOptions *keep,
                     RepoRetentionItem **ret_items, size_t *ret_n,
                     Error **errp)
{
    _cleanup_free_ RepoRetentionItem *items = NULL;
    size_t n = 0;

    items = calloc(repo->n_backups + 1, sizeof(*items));
    if (!items) {
        error_setg(errp, "out of memory");
        return false;
    }
    for (size_t i = 0; i < repo->n_backups; i++) {
        if (!strcmp(repo->backups[i]->node, node)) {
            items[n].seq = repo->backups[i]->seq;     /* ascending */
            items[n++].time = repo->backups[i]->time;
        }
    }
    if (!repo_retention_compute(items, n, keep, errp)) {
        error_prepend(errp, "%s: ", node);
        return false;
    }
    /* Invariant 8 of retention.md: a rule that keeps anything keeps the
     * newest backup first, and the newest one holds the bitmaps' base. */
    if (n && items[n - 1].kept_by == REPO_KEEP_NONE) {
        error_setg(errp, "%s: the retention rules would remove the newest "
                   "backup", node);
        return false;
    }
    *ret_items = steal_pointer(&items);
    *ret_n = n;
    return true;
}

static bool is_kept(const RepoRetentionItem *items, size_t n, unsigned seq)
{
    for (size_t i = 0; i < n; i++) {
        if (items[i].seq == seq) {
            return items[i].kept_by != REPO_KEEP_NONE;
        }
    }
    return false;
}

bool repo_prune_node(Repo *repo, const char *node_name,
                     const RepoKeepOptions *keep,
                     const RepoProgressOps *progress, RepoPruneEventFn *event,
                     void *opaque, RepoPruneResult *ret, Error **errp)
{
    _cleanup_free_ char *node = strdup(node_name);  /* survives reloads */
    _cleanup_free_ RepoRetentionItem *items = NULL;
    RepoPruneResult res = { 0 };
    size_t n = 0;

    if (!node) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (!repo_keep_options_any(keep)) {
        error_setg(errp, "no retention rule keeps anything (give --keep-last, "
                   "--keep-hourly, --keep-daily, --keep-weekly, "
                   "--keep-monthly or --keep-yearly of at least 1)");
        return false;
    }
    if (!repo_lock_verify(repo, node, errp) ||
        !roll_forward(repo, node, event, opaque, &res.rolled, errp) ||
        !repo_prune_plan(repo, node, keep, &items, &n, errp)) {
        return false;
    }
    /* The times point into manifests a reload frees: only seq and
     * kept_by are used from here on. */
    for (size_t k = 0; k < n; k++) {
        items[k].time = NULL;
        res.kept += items[k].kept_by != REPO_KEEP_NONE;
    }

    /* Steps 1-2, oldest kept first. */
    for (size_t k = 0; k < n; k++) {
        if (items[k].kept_by == REPO_KEEP_NONE) {
            continue;
        }
        RepoManifest *m = repo_find(repo, node, items[k].seq, errp);
        if (!m) {
            return false;
        }
        if (!m->parent_seq || is_kept(items, n, m->parent_seq)) {
            continue;
        }
        char id[REPO_ID_LEN];
        memcpy(id, m->id, sizeof(id));
        if (!repo_lock_verify(repo, node, errp) ||
            !synthesize(repo, m, progress, errp)) {
            error_prepend(errp, "cannot merge backup %s of %s into a full: ",
                          id, node);
            return false;
        }
        res.merged++;
        if (event) {
            event(opaque, REPO_PRUNE_MERGED, node, id);
        }
    }

    /* Step 3, newest first. */
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    for (size_t k = n; k-- > 0;) {
        if (items[k].kept_by != REPO_KEEP_NONE) {
            continue;
        }
        _cleanup_free_ char *json = repo_manifest_path(repo, node,
                                                       items[k].seq);
        _cleanup_free_ char *data = repo_data_path(repo, node, items[k].seq);
        char id[REPO_ID_LEN];

        repo_format_id(items[k].seq, id);
        if (!json || !data) {
            error_setg(errp, "out of memory");
            return false;
        }
        if (!repo_lock_verify(repo, node, errp)) {
            return false;
        }
        int r = repo->storage->remove(json);
        if (r < 0 && r != -ENOENT) {
            error_setg_errno(errp, -r, "cannot delete %s", json);
            return false;
        }
        if (!repo->storage->sync_dir(dir, errp)) {
            return false;
        }
        r = repo->storage->remove(data);
        if (r < 0 && r != -ENOENT) {
            error_setg_errno(errp, -r, "cannot delete %s", data);
            return false;
        }
        res.deleted++;
        if (event) {
            event(opaque, REPO_PRUNE_DELETED, node, id);
        }
    }
    if (res.deleted) {
        repo->storage->sync_dir(dir, NULL);
    }
    if (!repo_reload(repo, errp)) {
        return false;
    }
    repo_remove_stale_indexes(repo, node);
    if (ret) {
        *ret = res;
    }
    return true;
}
