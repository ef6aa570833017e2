/*
 * The repository itself (docs/specs/repository.md, "Layout"): open and
 * create, the marker file bitback-repo.json and its UUID, and the list of
 * committed backups (invariant 1, repo-internal.h: a backup exists if and
 * only if its manifest does and validates) with the lookups over it.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define REPO_FORMAT_NAME   "bitback-repository"
#define REPO_MAX_MARKER    (64u * 1024)

static void repo_clear_backups(Repo *repo)
{
    for (size_t i = 0; i < repo->n_backups; i++) {
        repo_manifest_free(repo->backups[i]);
    }
    free(repo->backups);
    repo->backups = NULL;
    repo->n_backups = 0;
}

void repo_free(Repo *repo)
{
    if (!repo) {
        return;
    }
    repo_clear_backups(repo);
    if (repo->storage == &repo_storage_rados && repo->path) {
        repo_storage_rados_detach(repo->path);
    }
    free(repo->path);
    free(repo);
}

static void repo_freep(Repo **p)
{
    repo_free(*p);
}

static int manifest_cmp(const void *a, const void *b)
{
    const RepoManifest *x = *(RepoManifest *const *)a;
    const RepoManifest *y = *(RepoManifest *const *)b;
    if (x->seq != y->seq) {
        return x->seq < y->seq ? -1 : 1;
    }
    return strcmp(x->node, y->node);
}

static bool is_dir_at(Repo *repo, const char *name)
{
    _cleanup_free_ char *p = repo_node_dir(repo, name);
    RepoStat st;

    return repo->storage->stat(p, &st) == 0 && st.is_dir;
}

/* A listing of a folder of the repository, loading what it finds;
 * err is the first error (the listing stops there). */
typedef struct RepoLoad {
    Repo *repo;
    const char *node;
    const char *dir;
    Error *err;
} RepoLoad;

/* One name of a node folder: a manifest goes into repo; every seq a name
 * of the protocol names goes into max_seq (invariant 3). */
static bool load_node_entry(void *opaque, const char *name)
{
    RepoLoad *l = opaque;
    Repo *repo = l->repo;
    unsigned seq;
    RepoFileKind kind = repo_file_kind(name, &seq);

    if (kind == REPO_FILE_OTHER) {
        return true;                       /* not ours: ignored */
    }
    if (kind == REPO_FILE_MANIFEST) {
        _cleanup_free_ char *path = repo_path_printf("%s/%s", l->dir, name);
        RepoManifest *m = repo_manifest_load(repo->storage, path, &l->err);
        if (!m) {
            return false;
        }
        if (m->seq != seq || strcmp(m->node, l->node)) {
            error_setg(&l->err, "%s: the manifest says backup %s of '%s', "
                       "but its file name says %06u of '%s'", path, m->id,
                       m->node, seq, l->node);
            repo_manifest_free(m);
            return false;
        }
        RepoManifest **nb = realloc(repo->backups,
                                    (repo->n_backups + 1) * sizeof(*nb));
        if (!nb) {
            repo_manifest_free(m);
            error_setg(&l->err, "out of memory");
            return false;
        }
        repo->backups = nb;
        repo->backups[repo->n_backups++] = m;
    }
    repo->max_seq = MAX(repo->max_seq, seq);
    return true;
}

/* Load one node folder: its manifests into repo, every seq it names into
 * max_seq. */
static bool repo_load_node(Repo *repo, const char *node, Error **errp)
{
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    RepoLoad l = { .repo = repo, .node = node, .dir = dir };
    int r = repo->storage->list(dir, load_node_entry, &l);

    if (l.err) {
        error_propagate(errp, l.err);
        return false;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot read '%s'", dir);
        return false;
    }
    return true;
}

static bool load_repo_entry(void *opaque, const char *name)
{
    RepoLoad *l = opaque;

    if (!repo_node_name_valid(name) || !is_dir_at(l->repo, name)) {
        return true;
    }
    return repo_load_node(l->repo, name, &l->err);
}

bool repo_reload(Repo *repo, Error **errp)
{
    RepoLoad l = { .repo = repo };
    int r;

    repo_clear_backups(repo);
    repo->max_seq = 0;
    r = repo->storage->list(repo->path, load_repo_entry, &l);
    if (l.err || r < 0) {
        if (l.err) {
            error_propagate(errp, l.err);
        } else {
            error_setg_errno(errp, -r, "cannot read repository '%s'",
                             repo->path);
        }
        repo_clear_backups(repo);
        return false;
    }
    if (repo->n_backups) {
        qsort(repo->backups, repo->n_backups, sizeof(*repo->backups),
              manifest_cmp);
    }
    return true;
}

static bool found_name(void *opaque, const char *name)
{
    *(bool *)opaque = true;
    return false;
}

/* Is the folder empty?  1 yes, 0 no, -errno on error. */
static int dir_is_empty(const RepoStorage *st, const char *path)
{
    bool found = false;
    int r = st->list(path, found_name, &found);

    return r < 0 ? r : !found;
}

/* Is s a UUID in its text form (8-4-4-4-12 hex digits)? */
static bool uuid_valid(const char *s)
{
    if (strlen(s) != REPO_UUID_LEN - 1) {
        return false;
    }
    for (size_t i = 0; i < REPO_UUID_LEN - 1; i++) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;

        if (dash ? s[i] != '-' : repo_hex_value(s[i]) < 0) {
            return false;
        }
    }
    return true;
}

/* Write the marker of a repository: format, version and uuid, one line. */
static bool repo_write_marker(const RepoStorage *st, const char *path, struct json_object *obj,
                              Error **errp)
{
    _cleanup_free_ char *text = NULL;

    if (asprintf(&text, "%s\n", json_object_to_json_string_ext(
                     obj, JSON_C_TO_STRING_SPACED)) < 0) {
        error_setg(errp, "out of memory");
        return false;
    }
    return st->replace(path, text, strlen(text), errp);
}

/* Check bitback-repo.json and read its UUID into uuid ("" when it has
 * none).  create: give a marker without a UUID a new one, written once
 * (temporary file, fsync, rename, folder fsync), keeping its other keys. */
static bool repo_check_marker(const RepoStorage *st, const char *path,
                              bool create, char uuid[REPO_UUID_LEN],
                              unsigned *ret_version, Error **errp)
{
    _cleanup_json_ struct json_object *obj =
        repo_parse_json_file(st, path, REPO_MAX_MARKER, errp);
    struct json_object *v;

    uuid[0] = '\0';
    if (!obj) {
        return false;
    }
    if (!json_object_is_type(obj, json_type_object) ||
        !json_object_object_get_ex(obj, "format", &v) ||
        !json_object_is_type(v, json_type_string) ||
        strcmp(json_object_get_string(v), REPO_FORMAT_NAME)) {
        error_setg(errp, "%s: 'format' must be \"" REPO_FORMAT_NAME "\"", path);
        return false;
    }
    if (!json_object_object_get_ex(obj, "version", &v) ||
        !json_object_is_type(v, json_type_int)) {
        error_setg(errp, "%s: 'version' must be an integer", path);
        return false;
    }
    if (json_object_get_int64(v) != 1 && json_object_get_int64(v) != 2) {
        error_setg(errp, "%s: repository version %" PRId64 " is not supported "
                   "(this bitback reads versions 1 and 2)", path,
                   json_object_get_int64(v));
        return false;
    }
    *ret_version = (unsigned)json_object_get_int64(v);
    if (json_object_object_get_ex(obj, "uuid", &v)) {
        if (!json_object_is_type(v, json_type_string) ||
            !uuid_valid(json_object_get_string(v))) {
            error_setg(errp, "%s: 'uuid' must be a UUID "
                       "(xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)", path);
            return false;
        }
        memcpy(uuid, json_object_get_string(v), REPO_UUID_LEN);
        return true;
    }
    if (!create) {
        return true;
    }
    uuid_generate_str(uuid);
    json_object_object_add(obj, "uuid", json_object_new_string(uuid));
    if (!repo_write_marker(st, path, obj, errp)) {
        error_prepend(errp, "cannot give the repository a UUID: ");
        uuid[0] = '\0';
        return false;
    }
    return true;
}

bool repo_upgrade(Repo *repo, Error **errp)
{
    _cleanup_free_ char *marker = NULL;
    unsigned version = 0;
    char uuid[REPO_UUID_LEN];

    if (repo->version >= REPO_VERSION) {
        return true;
    }
    marker = repo_path_printf("%s/" REPO_MARKER_NAME, repo->path);
    _cleanup_json_ struct json_object *obj =
        repo_parse_json_file(repo->storage, marker, REPO_MAX_MARKER, errp);
    if (!obj || !repo_check_marker(repo->storage, marker, false, uuid,
                                   &version, errp)) {
        return false;
    }
    json_object_object_add(obj, "version", json_object_new_int(REPO_VERSION));
    if (!repo_write_marker(repo->storage, marker, obj, errp)) {
        error_prepend(errp, "cannot mark the repository as version %d: ",
                      REPO_VERSION);
        return false;
    }
    repo->version = REPO_VERSION;
    return true;
}

/* A rados repository's root attached by repo_open that no Repo owns yet:
 * detach it and free the name. */
static void rados_root_release(char **root)
{
    if (*root) {
        repo_storage_rados_detach(*root);
        free(*root);
    }
}

Repo *repo_open(const char *path, bool create, Error **errp)
{
    _cleanup_(repo_freep) Repo *repo = NULL;
    _cleanup_free_ char *marker = NULL;
    char uuid[REPO_UUID_LEN] = "";
    unsigned version = 0;
    /* "rbd:" names a repository in a Ceph pool (storage-rados.c). */
    const RepoStorage *st = &repo_storage_local;
    _cleanup_(rados_root_release) char *rados_root = NULL;
    RepoStat rs;
    int r;

    if (!path || !*path) {
        error_setg(errp, "the repository path is empty");
        return NULL;
    }
    if (bdrv_filename_is_rbd(path)) {
        if (!repo_storage_rados_attach(path, &rados_root, errp)) {
            return NULL;
        }
        st = &repo_storage_rados;
        path = rados_root;
    }
    if (create && (r = st->mkdir(path)) < 0) {
        error_setg_errno(errp, -r, "cannot create repository '%s'", path);
        return NULL;
    }
    if ((r = st->stat(path, &rs)) < 0) {
        error_setg_errno(errp, -r, "cannot open repository '%s'", path);
        return NULL;
    }
    if (!rs.is_dir) {
        error_setg(errp, "'%s' is not a bitback repository (not a folder)", path);
        return NULL;
    }
    if (asprintf(&marker, "%s/" REPO_MARKER_NAME, path) < 0) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    if (st->stat(marker, &rs) < 0) {
        int empty = dir_is_empty(st, path);
        if (empty < 0) {
            error_setg_errno(errp, -empty, "cannot read '%s'", path);
            return NULL;
        }
        if (!create || !empty) {
            error_setg(errp, "'%s' is not a bitback repository (no "
                       REPO_MARKER_NAME ")", path);
            return NULL;
        }
        _cleanup_json_ struct json_object *obj = json_object_new_object();

        uuid_generate_str(uuid);
        json_object_object_add(obj, "format",
                               json_object_new_string(REPO_FORMAT_NAME));
        json_object_object_add(obj, "version",
                               json_object_new_int(REPO_VERSION));
        json_object_object_add(obj, "uuid", json_object_new_string(uuid));
        if (!repo_write_marker(st, marker, obj, errp)) {
            return NULL;
        }
        version = REPO_VERSION;
    } else if (!repo_check_marker(st, marker, create, uuid, &version, errp)) {
        return NULL;
    }
    repo = calloc(1, sizeof(*repo));
    if (!repo || !(repo->path = strdup(path))) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    repo->storage = st;
    free(steal_pointer(&rados_root));  /* repo_free detaches repo->path */
    repo->version = version;
    memcpy(repo->uuid, uuid, REPO_UUID_LEN);
    /* Drop trailing slashes (not a lone "/") so paths print cleanly. */
    for (size_t n = strlen(repo->path); n > 1 && repo->path[n - 1] == '/'; n--) {
        repo->path[n - 1] = '\0';
    }
    if (!repo_reload(repo, errp)) {
        return NULL;
    }
    return steal_pointer(&repo);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

const char **repo_nodes(Repo *repo)
{
    const char **names = calloc(repo->n_backups + 1, sizeof(*names));
    size_t n = 0;
    if (!names) {
        abort();
    }
    for (size_t i = 0; i < repo->n_backups; i++) {
        names[n++] = repo->backups[i]->node;
    }
    if (n) {
        qsort(names, n, sizeof(*names), cmp_str);
    }
    size_t out = 0;
    for (size_t i = 0; i < n; i++) {
        if (out == 0 || strcmp(names[out - 1], names[i])) {
            names[out++] = names[i];
        }
    }
    names[out] = NULL;
    return names;
}

/* node == NULL picks the only node of the repository (an error when there
 * are several). */
static bool resolve_node(Repo *repo, const char **node, Error **errp)
{
    if (*node) {
        return true;
    }
    _cleanup_free_ const char **names = repo_nodes(repo);
    if (!names[0]) {
        error_setg(errp, "no backups in %s", repo->path);
        return false;
    }
    if (names[1]) {
        error_setg(errp, "%s holds backups of several disks (%s, %s%s): "
                   "choose one with --node", repo->path, names[0], names[1],
                   names[2] ? ", ..." : "");
        return false;
    }
    *node = names[0];
    return true;
}

RepoManifest *repo_latest(Repo *repo, const char *node)
{
    for (size_t i = repo->n_backups; i-- > 0;) {
        if (!node || !strcmp(repo->backups[i]->node, node)) {
            return repo->backups[i];
        }
    }
    return NULL;
}

RepoManifest *repo_latest_full(Repo *repo, const char *node)
{
    for (size_t i = repo->n_backups; i-- > 0;) {
        RepoManifest *m = repo->backups[i];
        if ((!node || !strcmp(m->node, node)) && m->level == REPO_LEVEL_FULL) {
            return m;
        }
    }
    return NULL;
}

RepoManifest *repo_lookup(Repo *repo, const char *node, unsigned seq)
{
    for (size_t i = 0; i < repo->n_backups; i++) {
        RepoManifest *m = repo->backups[i];
        if (m->seq == seq && !strcmp(m->node, node)) {
            return m;
        }
    }
    return NULL;
}

RepoManifest *repo_find(Repo *repo, const char *node, unsigned seq,
                        Error **errp)
{
    RepoManifest *m;

    if (!resolve_node(repo, &node, errp)) {
        return NULL;
    }
    m = seq ? repo_lookup(repo, node, seq) : repo_latest(repo, node);
    if (!m) {
        if (seq) {
            error_setg(errp, "no backup %06u of %s in %s", seq, node, repo->path);
        } else {
            error_setg(errp, "no backup of %s in %s", node, repo->path);
        }
    }
    return m;
}

RepoManifest *repo_parent(Repo *repo, const RepoManifest *m)
{
    return m->parent_seq ? repo_lookup(repo, m->node, m->parent_seq) : NULL;
}

RepoManifest **repo_chain(Repo *repo, const RepoManifest *m, size_t *ret_n,
                          Error **errp)
{
    size_t n = 0, cap = repo->n_backups + 1;
    _cleanup_free_ RepoManifest **rev = calloc(cap, sizeof(*rev));
    RepoManifest *cur = (RepoManifest *)m;

    if (!rev) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    for (;;) {
        if (n == cap) {
            error_setg(errp, "backup %s of %s: the chain of parents loops",
                       m->id, m->node);
            return NULL;
        }
        rev[n++] = cur;
        if (!cur->parent_seq) {
            break;
        }
        RepoManifest *p = repo_parent(repo, cur);
        if (!p) {
            error_setg(errp, "backup %s of %s: its parent %06u is missing "
                       "from %s", cur->id, cur->node, cur->parent_seq,
                       repo->path);
            return NULL;
        }
        if (p->seq >= cur->seq) {
            error_setg(errp, "backup %s of %s: the chain of parents loops",
                       m->id, m->node);
            return NULL;
        }
        cur = p;
    }
    RepoManifest **chain = calloc(n, sizeof(*chain));
    if (!chain) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        chain[i] = rev[n - 1 - i];
    }
    *ret_n = n;
    return chain;
}

