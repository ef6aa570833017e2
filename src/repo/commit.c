/*
 * The write side of the repository's crash protocol
 * (docs/specs/repository.md, "Commit" and "Attempts"): attempt markers
 * (NODE/ID.attempt, written and synced before a backup's transaction), the
 * cleanup of what a killed run left, and the two-phase commit
 * (invariant 2, repo-internal.h).  Every file operation goes through the
 * repository's storage backend (storage.h).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

/* ---- Attempt markers and leftovers ---- */

bool repo_ensure_node_dir(Repo *repo, const char *node, Error **errp)
{
    if (!repo_check_node_name(node, errp)) {
        return false;
    }
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    int r = repo->storage->mkdir(dir);
    if (r > 0) {
        return repo->storage->sync_dir(repo->path, errp);
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot create '%s'", dir);
        return false;
    }
    return true;
}

/* Write NODE/N.attempt as {"id": N, "started": started}: through a
 * temporary file and a rename, so a reader sees the old or the new
 * content, then sync the folder. */
static bool write_attempt(Repo *repo, const char *node, unsigned seq,
                          bool started, Error **errp)
{
    if (!repo_ensure_node_dir(repo, node, errp)) {
        return false;
    }
    _cleanup_free_ char *path = repo_attempt_path(repo, node, seq);
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    _cleanup_free_ char *tmp = repo_tmp_attempt_path(repo, node, seq);
    char text[64];
    int len = snprintf(text, sizeof(text), "{\"id\": \"%06u\", \"started\": %s}\n",
                       seq, started ? "true" : "false");

    if (!repo->storage->write_tmp(tmp, text, (size_t)len, errp)) {
        return false;
    }
    int r = repo->storage->rename(tmp, path);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot write '%s'", path);
        repo->storage->remove(tmp);
        return false;
    }
    if (!repo->storage->sync_dir(dir, errp)) {
        return false;
    }
    repo->max_seq = MAX(repo->max_seq, seq);
    return true;
}

bool repo_mark_attempt(Repo *repo, const char *node, unsigned seq,
                       Error **errp)
{
    return write_attempt(repo, node, seq, false, errp);
}

bool repo_mark_attempt_started(Repo *repo, const char *node, unsigned seq,
                               Error **errp)
{
    return write_attempt(repo, node, seq, true, errp);
}

bool repo_attempt_started(Repo *repo, const char *node, unsigned seq)
{
    _cleanup_free_ char *path = repo_attempt_path(repo, node, seq);
    _cleanup_json_ struct json_object *obj =
        repo_parse_json_file(repo->storage, path, 4096, NULL);
    struct json_object *v;

    /* Unreadable or without the key: assume it started (the safe side:
     * its bitmap is then required). */
    if (!obj || !json_object_object_get_ex(obj, "started", &v) ||
        !json_object_is_type(v, json_type_boolean)) {
        return true;
    }
    return json_object_get_boolean(v);
}

static int cmp_unsigned(const void *a, const void *b)
{
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return x < y ? -1 : x > y;
}

static void seq_push(unsigned **seqs, size_t *n, unsigned seq)
{
    unsigned *ns = realloc(*seqs, (*n + 1) * sizeof(*ns));
    if (!ns) {
        abort();
    }
    *seqs = ns;
    ns[(*n)++] = seq;
}

/* A listing of a node folder: the names of one kind of file, with their
 * seqs, or (with a remove kind) removing them. */
typedef struct NodeScan {
    Repo *repo;
    const char *node;
    const char *dir;
    unsigned *seqs;
    size_t n;
    unsigned below;                    /* remove_attempts_below */
    bool removed;
} NodeScan;

static bool collect_attempt(void *opaque, const char *name)
{
    NodeScan *ns = opaque;
    unsigned seq;

    if (repo_file_kind(name, &seq) == REPO_FILE_ATTEMPT &&
        !repo_lookup(ns->repo, ns->node, seq)) {
        seq_push(&ns->seqs, &ns->n, seq);
    }
    return true;
}

unsigned *repo_attempts(Repo *repo, const char *node, size_t *ret_n)
{
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    NodeScan ns = { .repo = repo, .node = node, .dir = dir };

    repo->storage->list(dir, collect_attempt, &ns);
    if (ns.n) {
        qsort(ns.seqs, ns.n, sizeof(*ns.seqs), cmp_unsigned);
    }
    *ret_n = ns.n;
    return ns.seqs;
}

unsigned *repo_seqs_since(Repo *repo, const char *node, unsigned from,
                          size_t *ret_n)
{
    unsigned *seqs = NULL;
    size_t n = 0, n_att = 0;
    _cleanup_free_ unsigned *att = repo_attempts(repo, node, &n_att);

    for (size_t i = 0; i < repo->n_backups; i++) {
        const RepoManifest *m = repo->backups[i];
        if (!strcmp(m->node, node) && m->seq >= from) {
            seq_push(&seqs, &n, m->seq);
        }
    }
    for (size_t i = 0; i < n_att; i++) {
        if (att[i] > from) {
            seq_push(&seqs, &n, att[i]);
        }
    }
    if (n) {
        qsort(seqs, n, sizeof(*seqs), cmp_unsigned);
    }
    *ret_n = n;
    return seqs;
}

static bool remove_attempt_below(void *opaque, const char *name)
{
    NodeScan *ns = opaque;
    unsigned seq;

    if (repo_file_kind(name, &seq) == REPO_FILE_ATTEMPT && seq < ns->below) {
        _cleanup_free_ char *p = repo_path_printf("%s/%s", ns->dir, name);
        ns->removed |= ns->repo->storage->remove(p) == 0;
    }
    return true;
}

void repo_remove_attempts_below(Repo *repo, const char *node, unsigned below)
{
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    NodeScan ns = { .repo = repo, .node = node, .dir = dir, .below = below };

    repo->storage->list(dir, remove_attempt_below, &ns);
    if (ns.removed) {
        repo->storage->sync_dir(dir, NULL);
    }
}

bool repo_remove_attempt(Repo *repo, const char *node, unsigned seq,
                         Error **errp)
{
    _cleanup_free_ char *path = repo_attempt_path(repo, node, seq);
    _cleanup_free_ char *dir = repo_node_dir(repo, node);

    int r = repo->storage->remove(path);

    if (r < 0 && r != -ENOENT) {
        error_setg_errno(errp, -r, "cannot remove '%s'", path);
        return false;
    }
    return repo->storage->sync_dir(dir, errp);
}

static bool remove_tmp_file(void *opaque, const char *name)
{
    NodeScan *ns = opaque;
    unsigned seq;
    RepoFileKind kind = repo_file_kind(name, &seq);

    if (kind == REPO_FILE_TMP_DATA || kind == REPO_FILE_TMP_MANIFEST ||
        kind == REPO_FILE_TMP_INDEX) {
        _cleanup_free_ char *p = repo_path_printf("%s/%s", ns->dir, name);
        ns->repo->storage->remove(p);
    }
    return true;
}

void repo_remove_tmp_files(Repo *repo, const char *node)
{
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    NodeScan ns = { .repo = repo, .node = node, .dir = dir };

    repo->storage->list(dir, remove_tmp_file, &ns);
}

/* An index file nothing refers to: its backup is gone, or a prune made it
 * a synthetic full with a new index.  The indexes of a backup with a
 * pending manifest (.ID.json.tmp: a prune or a commit under way or
 * interrupted) or an attempt marker (ID.attempt: a backup run that has
 * not finished its commit, perhaps right now in another process) all
 * stay; a killed run's go once its marker does. */
static bool remove_stale_index(void *opaque, const char *name)
{
    NodeScan *ns = opaque;
    unsigned seq;
    RepoStat st;

    if (repo_file_kind(name, &seq) != REPO_FILE_INDEX) {
        return true;
    }
    _cleanup_free_ char *pending = repo_tmp_manifest_path(ns->repo, ns->node,
                                                          seq);
    _cleanup_free_ char *attempt = repo_attempt_path(ns->repo, ns->node, seq);
    if (ns->repo->storage->stat(pending, &st) == 0 ||
        ns->repo->storage->stat(attempt, &st) == 0) {
        return true;
    }
    RepoManifest *m = repo_lookup(ns->repo, ns->node, seq);
    _cleanup_free_ char *p = repo_path_printf("%s/%s", ns->dir, name);
    _cleanup_free_ char *want = m && m->version >= 2
        ? repo_index_path(ns->repo, ns->node, seq, m->merkle_root) : NULL;
    if (!want || strcmp(want, p)) {
        ns->removed |= ns->repo->storage->remove(p) == 0;
    }
    return true;
}

void repo_remove_stale_indexes(Repo *repo, const char *node)
{
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    NodeScan ns = { .repo = repo, .node = node, .dir = dir };

    repo->storage->list(dir, remove_stale_index, &ns);
    if (ns.removed) {
        repo->storage->sync_dir(dir, NULL);
    }
}

/* ---- Commit (invariant 2, repo-internal.h) ---- */

bool repo_fsync_path(const char *path, Error **errp)
{
    return repo_storage_local.sync(path, errp);
}

bool repo_commit(Repo *repo, RepoManifest *m, Error **errp)
{
    if (!m->seq || m->seq > REPO_MAX_SEQ || !m->node || !repo_node_name_valid(m->node)) {
        error_setg(errp, "cannot commit: the backup has no valid ID or disk name");
        return false;
    }
    if (!repo_lock_verify(repo, m->node, errp)) {
        return false;
    }
    repo_format_id(m->seq, m->id);
    if (!m->cluster_size) {
        m->cluster_size = REPO_CLUSTER_SIZE;
    }
    _cleanup_free_ char *dir = repo_node_dir(repo, m->node);
    _cleanup_free_ char *tmp_data = repo_tmp_data_path(repo, m->node, m->seq);
    _cleanup_free_ char *tmp_json = repo_tmp_manifest_path(repo, m->node, m->seq);
    _cleanup_free_ char *data = repo_data_path(repo, m->node, m->seq);
    _cleanup_free_ char *json = repo_manifest_path(repo, m->node, m->seq);
    _cleanup_free_ char *attempt = repo_attempt_path(repo, m->node, m->seq);
    RepoStat st;
    int r;

    if (repo->storage->stat(json, &st) == 0) {
        error_setg(errp, "cannot commit backup %s of %s: %s already exists",
                   m->id, m->node, json);
        return false;
    }
    /* 1. The data is durable. */
    if (!repo->storage->sync(tmp_data, errp)) {
        return false;
    }
    r = repo->storage->stat(tmp_data, &st);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot stat '%s'", tmp_data);
        return false;
    }
    m->stored_bytes = st.allocated;

    /* 2. The manifest, in its temporary file, is durable. */
    if (!repo_manifest_write(repo, tmp_json, m, errp)) {
        error_prepend(errp, "cannot commit backup %s of %s: ", m->id, m->node);
        return false;
    }

    /* 3. Data, then manifest, into place; the folder is durable. */
    if ((r = repo->storage->rename(tmp_data, data)) < 0) {
        error_setg_errno(errp, -r, "cannot rename '%s' to '%s'", tmp_data,
                         data);
        return false;
    }
    if ((r = repo->storage->rename(tmp_json, json)) < 0) {
        error_setg_errno(errp, -r, "cannot rename '%s' to '%s'", tmp_json,
                         json);
        return false;
    }
    if (!repo->storage->sync_dir(dir, errp)) {
        return false;
    }
    /* 4. The backup exists: its attempt marker is no longer needed. */
    repo->storage->remove(attempt);
    return repo_reload(repo, errp);
}

