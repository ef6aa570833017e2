/*
 * Chains: the one way a backup's chain is opened.
 *
 * Invariant 4 (repo-internal.h; repository.md "Invariants"): a chain is exactly the
 * one its manifests describe.  A backup's qcow2 header names a backing
 * file, but that name is data from a file, not an instruction: every layer
 * is opened with its backing disabled (BDRV_O_NO_BACKING), the name it
 * records is checked against its manifest's parent, and the parent's
 * layer, which bitback opened itself from the manifests, is attached with
 * bdrv_set_backing().  Nothing the header names is ever opened.
 *
 * The layers are opened by the block layer (bdrv_open_image) by the name
 * contained_path() gives: a local path resolved with realpath() and
 * checked to lie in the repository folder, or the backend's block_name
 * (storage.h), checked to lie in its pool and namespace.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

/* Longest piece of a recorded backing name quoted in an error. */
#define LINK_QUOTE_MAX 160

/* name, quoted for an error message: printable ASCII only (anything else
 * becomes '?'), cut at LINK_QUOTE_MAX bytes.  Caller frees. */
static char *quote_name(const char *name)
{
    size_t n = strnlen(name, LINK_QUOTE_MAX + 1);
    char *q = malloc(LINK_QUOTE_MAX + 4);

    if (!q) {
        abort();
    }
    for (size_t i = 0; i < n && i < LINK_QUOTE_MAX; i++) {
        q[i] = name[i] >= 0x20 && name[i] < 0x7f ? name[i] : '?';
    }
    strcpy(q + MIN(n, (size_t)LINK_QUOTE_MAX), n > LINK_QUOTE_MAX ? "..." : "");
    return q;
}

/* What kind of reference a recorded backing name that is not the expected
 * one is, for errors: the ways out of the repository first. */
static void describe_backing_name(const char *name, char *buf, size_t len)
{
    const char *colon = strchr(name, ':'), *slash = strchr(name, '/');
    unsigned seq;

    if (!strncmp(name, "json:", 5)) {
        snprintf(buf, len, "a json: filename");
    } else if (colon && (!slash || colon < slash)) {
        snprintf(buf, len, "a protocol prefix");
    } else if (name[0] == '/') {
        snprintf(buf, len, "an absolute path");
    } else if (!strcmp(name, "..") || !strncmp(name, "../", 3) ||
               strstr(name, "/../") ||
               (strlen(name) >= 3 && !strcmp(name + strlen(name) - 3, "/.."))) {
        snprintf(buf, len, "a path with '..'");
    } else if (!path_is_simple_name(name)) {
        snprintf(buf, len, "not a plain file name in the backup's folder");
    } else if (repo_file_kind(name, &seq) == REPO_FILE_DATA) {
        snprintf(buf, len, "the file of backup %06u", seq);
    } else {
        snprintf(buf, len, "not a backup's file");
    }
}

typedef enum LinkCheck {
    LINK_OK,
    LINK_MISSING,                /* no backing file, the manifest names one */
    LINK_WRONG,                  /* any other difference */
} LinkCheck;

/* Check the backing reference bs's header records against the manifest of
 * backup `id` of `node` (parent_seq 0: a full, which has no backing file;
 * else exactly the parent's file name, "PARENT.qcow2", as backup writes
 * it, with backing format qcow2).  Sets errp unless LINK_OK. */
static LinkCheck check_link(const BlockDriverState *bs, const char *node,
                            const char *id, unsigned parent_seq, Error **errp)
{
    const char *name = bs->backing_file, *fmt = bs->backing_format;
    char want[REPO_ID_LEN + 8], pid[REPO_ID_LEN], what[64];
    _cleanup_free_ char *q = NULL;

    if (!parent_seq) {
        if (!name) {
            return LINK_OK;
        }
        q = quote_name(name);
        describe_backing_name(name, what, sizeof(what));
        error_setg(errp, "backup %s of %s is a full backup (its manifest names "
                   "no parent), but its file names the backing file '%s' (%s): "
                   "a full backup has no backing file", id, node, q, what);
        return LINK_WRONG;
    }
    repo_format_id(parent_seq, pid);
    snprintf(want, sizeof(want), "%s.qcow2", pid);
    if (!name) {
        error_setg(errp, "backup %s of %s: its file has no backing file, but "
                   "its manifest's parent is backup %s (expected backing "
                   "file '%s')", id, node, pid, want);
        return LINK_MISSING;
    }
    if (strcmp(name, want)) {
        q = quote_name(name);
        describe_backing_name(name, what, sizeof(what));
        error_setg(errp, "backup %s of %s: its file names the backing file "
                   "'%s' (%s), but its manifest's parent is backup %s: the "
                   "backing file must be '%s'", id, node, q, what, pid, want);
        return LINK_WRONG;
    }
    if (!fmt || strcmp(fmt, "qcow2")) {
        q = quote_name(fmt ? fmt : "none");
        error_setg(errp, "backup %s of %s: its file records the backing "
                   "format '%s' for '%s', not qcow2", id, node, q, want);
        return LINK_WRONG;
    }
    return LINK_OK;
}

/* path (a file of the repository) with symlinks resolved, when it is a
 * regular file inside the repository; an error otherwise.  Caller frees. */
static char *contained_path(Repo *repo, const char *path, Error **errp)
{
    if (repo->storage->block_name) {
        return repo->storage->block_name(repo->path, path, errp);
    }
    _cleanup_free_ char *root = realpath(repo->path, NULL);
    _cleanup_free_ char *real = NULL;
    struct stat st;
    size_t n;

    if (!root) {
        error_setg_errno(errp, errno, "cannot resolve the repository '%s'",
                         repo->path);
        return NULL;
    }
    real = realpath(path, NULL);
    if (!real) {
        error_setg_errno(errp, errno, "cannot open '%s'", path);
        return NULL;
    }
    n = strcmp(root, "/") ? strlen(root) : 0;
    if (strncmp(real, root, n) || real[n] != '/') {
        _cleanup_free_ char *q = quote_name(real);
        error_setg(errp, "'%s' leads outside the repository (to '%s'): "
                   "a symbolic link out of the repository is not followed",
                   path, q);
        return NULL;
    }
    if (stat(real, &st) < 0) {
        error_setg_errno(errp, errno, "cannot open '%s'", path);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        error_setg(errp, "'%s' is not a regular file", path);
        return NULL;
    }
    return steal_pointer(&real);
}

char *repo_block_name(Repo *repo, const char *path, Error **errp)
{
    if (repo->storage->block_name) {
        return repo->storage->block_name(repo->path, path, errp);
    }
    return repo_path_printf("%s", path);
}

struct json_object *repo_overlay_options(Repo *repo, const char *node,
                                         unsigned seq, unsigned parent_seq,
                                         Error **errp)
{
    if (!repo->storage->overlay_options) {
        error_setg(errp, "the %s storage opens backup files by name",
                   repo->storage->name);
        return NULL;
    }
    _cleanup_free_ char *tmp = repo_tmp_data_path(repo, node, seq);
    _cleanup_free_ char *parent = parent_seq
        ? repo_data_path(repo, node, parent_seq) : NULL;
    return repo->storage->overlay_options(repo->path, tmp, parent, errp);
}

RepoManifest *repo_pending_manifest(Repo *repo, const RepoManifest *m)
{
    _cleanup_free_ char *path = repo_tmp_manifest_path(repo, m->node, m->seq);
    uint8_t root[REPO_ROOT_LEN];
    RepoManifest *p;

    RepoStat rs;

    if (repo->storage->stat(path, &rs) < 0) {
        return NULL;
    }
    p = repo_manifest_load(repo->storage, path, NULL);
    if (!p) {
        return NULL;
    }
    if (p->seq != m->seq || strcmp(p->node, m->node) || p->parent_seq ||
        !p->synthetic || !repo_index_root(repo, p, root, NULL) ||
        memcmp(root, p->merkle_root, REPO_ROOT_LEN)) {
        repo_manifest_free(p);
        return NULL;
    }
    return p;
}

/* Open path, the file of backup `id` of `node` whose manifest names
 * parent_seq, with flags and its backing disabled, check its link and put
 * it on top of *top (the chain of parent_seq as this code opened it, or
 * NULL for none; consumed).  pending_ok: a committed backup, for which a
 * missing link is the window of an interrupted prune when
 * repo_pending_manifest() has its synthetic full: then the layer is the
 * base of the chain and *top is dropped.  On success *top is the new top;
 * on failure *top is released and NULL. */
static bool push_layer(Repo *repo, const RepoManifest *m, const char *path,
                       int flags, bool pending_ok, BlockDriverState **top,
                       Error **errp)
{
    _cleanup_free_ char *real = contained_path(repo, path, errp);
    BlockDriverState *bs = NULL;
    Error *err = NULL;
    char id[REPO_ID_LEN];

    repo_format_id(m->seq, id);      /* m->id may not be set yet (new files) */

    if (!real) {
        error_prepend(errp, "backup %s of %s: ", id, m->node);
        goto out;
    }
    bs = bdrv_open_image(real, "qcow2", flags | BDRV_O_NO_BACKING, errp);
    if (!bs) {
        error_prepend(errp, "backup %s of %s: ", id, m->node);
        goto out;
    }
    switch (check_link(bs, m->node, id, m->parent_seq, &err)) {
    case LINK_OK:
        break;
    case LINK_MISSING:
        if (pending_ok) {
            RepoManifest *p = repo_pending_manifest(repo, m);
            if (p) {
                repo_manifest_free(p);
                error_free(err);
                err = NULL;
                bdrv_unref(*top);
                *top = NULL;
                break;
            }
        }
        /* fall through */
    case LINK_WRONG:
        error_propagate(errp, err);
        goto out;
    }
    if (*top) {
        if (!bdrv_set_backing(bs, *top, errp)) {
            error_prepend(errp, "backup %s of %s: ", id, m->node);
            goto out;
        }
        (*top)->user_owned = false;       /* now a child of bs */
        bdrv_unref(*top);
    }
    *top = steal_pointer(&bs);
    return true;
out:
    bdrv_unref(bs);
    bdrv_unref(*top);
    *top = NULL;
    return false;
}

BlockDriverState *repo_open_chain(Repo *repo, const RepoManifest *m,
                                  Error **errp)
{
    _cleanup_free_ RepoManifest **chain = NULL;
    BlockDriverState *top = NULL;
    size_t n;

    chain = repo_chain(repo, m, &n, errp);
    if (!chain) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        _cleanup_free_ char *path = repo_data_path(repo, m->node,
                                                   chain[i]->seq);
        if (!push_layer(repo, chain[i], path, 0, true, &top, errp)) {
            return NULL;
        }
    }
    return top;
}

BlockDriverState *repo_open_new(Repo *repo, const RepoManifest *m,
                                const char *path, int flags, Error **errp)
{
    BlockDriverState *top = NULL;

    if (m->parent_seq) {
        RepoManifest *p = repo_parent(repo, m);
        if (!p) {
            error_setg(errp, "backup %06u of %s: its parent %06u is missing "
                       "from %s", m->seq, m->node, m->parent_seq, repo->path);
            return NULL;
        }
        top = repo_open_chain(repo, p, errp);
        if (!top) {
            return NULL;
        }
    }
    return push_layer(repo, m, path, flags, false, &top, errp) ? top : NULL;
}

