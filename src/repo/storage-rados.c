/*
 * The rados storage backend (storage.h): a repository in a Ceph pool and
 * namespace, named "rbd:POOL[/NAMESPACE][:conf=PATH][:id=USER]" (parsed by
 * the rbd driver's rbd_spec_parse: one parser of rbd: names).
 *
 * A repository's paths stay "ROOT/NODE/NAME" with ROOT = "rbd:POOL[/NS]"
 * (repo->path); ROOT is registered here with its cluster connection by
 * repo_storage_rados_attach(), and every operation finds the connection
 * of the root its path starts with, so the vtable keeps its signatures.
 *
 *   - Metadata (manifests, markers, bitback-repo.json, indexes): one RADOS
 *     object per file, named by the path inside the repository
 *     ("NODE/000001.json").  write_tmp and replace are rados_write_full
 *     (atomic); a rename is read + write_full(to) + remove(from), since
 *     RADOS has no rename (see the crash analysis in
 *     docs/specs/repository.md, "Storage backends").
 *   - Data (ID.qcow2, .ID.qcow2.tmp): one RBD image per file, holding the
 *     qcow2 bytes, named by rrepo_image_name(): the path inside the
 *     repository with '%' as "%25" and '/' as "%2F" (RBD names cannot hold
 *     '/'; the encoding is reversible).  The block layer opens it as
 *     "rbd:POOL/[NS/]IMAGE:conf=...:id=..." (block_name); renames are
 *     rbd_rename.
 *   - Folders do not exist in RADOS: the root and each "ROOT/NODE" are
 *     folders, listed from the names of the objects and images under them;
 *     the root lists only the marker and folders, so RBD's own objects of
 *     the pool (rbd_directory, rbd_header.*, ...) are not the repository's.
 *
 * Durability: RADOS acknowledges a write once every replica has persisted
 * it (rados-obj.h), so sync and sync_dir have nothing left to do.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <json-c/json.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

#include "block/drivers/rbd.h"
#include "block/rados-obj.h"
#include "repo/repo-internal.h"
#include "repo/storage.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/log.h"

/* One attached repository. */
typedef struct RadosRepo {
    struct RadosRepo *next;
    char *root;                        /* "rbd:POOL[/NS]" */
    char *opts;                        /* ":conf=..:id=.." for block names */
    rados_t cluster;
    rados_ioctx_t io;
} RadosRepo;

static pthread_mutex_t rrepo_repos_lock = PTHREAD_MUTEX_INITIALIZER;
static RadosRepo *rrepo_repos;

/* The repository whose root path lies in, and in *ret_name the part of
 * path inside it ("" for the root itself); NULL when none. */
static RadosRepo *rrepo_find(const char *path, const char **ret_name)
{
    RadosRepo *r;

    pthread_mutex_lock(&rrepo_repos_lock);
    for (r = rrepo_repos; r; r = r->next) {
        size_t n = strlen(r->root);
        if (!strncmp(path, r->root, n) && (path[n] == '/' || !path[n])) {
            *ret_name = path[n] ? path + n + 1 : path + n;
            break;
        }
    }
    pthread_mutex_unlock(&rrepo_repos_lock);
    return r;
}

/* Is name (inside the repository) a data file, kept as an RBD image? */
static bool rrepo_is_data(const char *name)
{
    const char *base = strrchr(name, '/');
    unsigned seq;
    RepoFileKind k = repo_file_kind(base ? base + 1 : name, &seq);
    return k == REPO_FILE_DATA || k == REPO_FILE_TMP_DATA;
}

/* The RBD image name of data file name: '%' -> "%25", '/' -> "%2F". */
static char *rrepo_image_name(const char *name)
{
    char *out = malloc(strlen(name) * 3 + 1), *w = out;
    if (!out) {
        abort();
    }
    for (; *name; name++) {
        if (*name == '%' || *name == '/') {
            w += sprintf(w, "%%%02X", (unsigned char)*name);
        } else {
            *w++ = *name;
        }
    }
    *w = '\0';
    return out;
}

/* The inverse of rrepo_image_name, or NULL for a name it cannot make. */
static char *rrepo_image_decode(const char *img)
{
    char *out = strdup(img), *w = out;
    if (!out) {
        abort();
    }
    for (const char *p = img; *p; p++) {
        if (*p != '%') {
            *w++ = *p;
        } else if (!strncmp(p, "%25", 3) || !strncmp(p, "%2F", 3)) {
            *w++ = p[2] == '5' ? '%' : '/';
            p += 2;
        } else {
            free(out);
            return NULL;
        }
    }
    *w = '\0';
    return out;
}

bool repo_storage_rados_attach(const char *spec, char **ret_root,
                               Error **errp)
{
    _cleanup_(rbd_spec_clear) RBDSpec sp = { 0 };
    static const char usage[] = "rbd:POOL[/NAMESPACE][:conf=PATH][:id=USER]";

    if (!rbd_spec_parse(spec, false, &sp, errp)) {
        error_prepend(errp, "invalid repository '%s': ", spec);
        return false;
    }
    if (sp.snap || (sp.ns && sp.image)) {
        error_setg(errp, "invalid repository '%s': expected %s", spec, usage);
        return false;
    }
    if (sp.image) {                    /* "rbd:POOL/NS": the namespace */
        sp.ns = steal_pointer(&sp.image);
    }
    if (!sp.pool[0] || (sp.ns && (!sp.ns[0] || strpbrk(sp.ns, "/@:\\")))
        || strpbrk(sp.pool, "/@:\\")) {
        error_setg(errp, "invalid repository '%s': expected %s (pool and "
                   "namespace not empty, without '/', '@', ':' or '\\')",
                   spec, usage);
        return false;
    }
    RadosRepo *r = calloc(1, sizeof(*r));
    if (!r) {
        abort();
    }
    r->root = repo_path_printf("rbd:%s%s%s", sp.pool, sp.ns ? "/" : "",
                               sp.ns ? sp.ns : "");
    /* conf and user pass to the block layer's names; paths with ':' or
     * '\' would need escaping, refused instead. */
    if ((sp.conf && strpbrk(sp.conf, ":@\\")) ||
        (sp.user && strpbrk(sp.user, ":@\\"))) {
        error_setg(errp, "invalid repository '%s': conf and id must not "
                   "contain ':', '@' or '\\'", spec);
        goto fail;
    }
    r->opts = repo_path_printf("%s%s%s%s", sp.conf ? ":conf=" : "",
                               sp.conf ? sp.conf : "", sp.user ? ":id=" : "",
                               sp.user ? sp.user : "");
    if (!rbd_spec_connect(&sp, &r->cluster, &r->io, errp)) {
        error_prepend(errp, "cannot open repository '%s': ", spec);
        goto fail;
    }
    *ret_root = strdup(r->root);
    if (!*ret_root) {
        abort();
    }
    pthread_mutex_lock(&rrepo_repos_lock);
    r->next = rrepo_repos;
    rrepo_repos = r;
    pthread_mutex_unlock(&rrepo_repos_lock);
    return true;

fail:
    free(r->root);
    free(r->opts);
    free(r);
    return false;
}

void repo_storage_rados_detach(const char *root)
{
    RadosRepo **pp, *r = NULL;

    pthread_mutex_lock(&rrepo_repos_lock);
    for (pp = &rrepo_repos; *pp; pp = &(*pp)->next) {
        if (!strcmp((*pp)->root, root)) {
            r = *pp;
            *pp = r->next;
            break;
        }
    }
    pthread_mutex_unlock(&rrepo_repos_lock);
    if (r) {
        rbd_spec_disconnect(r->cluster, r->io);
        free(r->root);
        free(r->opts);
        free(r);
    }
}

/* Find path's repository or set errp. */
static RadosRepo *rrepo_find_err(const char *path, const char **ret_name,
                                 Error **errp)
{
    RadosRepo *r = rrepo_find(path, ret_name);
    if (!r) {
        error_setg(errp, "'%s' is not in an open rados repository", path);
    }
    return r;
}

static char *rrepo_read(const char *path, uint64_t max, size_t *ret_len,
                        Error **errp)
{
    const char *name;
    RadosRepo *r = rrepo_find_err(path, &name, errp);
    uint8_t *buf;
    size_t len;

    if (!r || !rados_obj_read_full(r->io, name, (size_t)MIN(max, SIZE_MAX - 1),
                                   &buf, &len, errp)) {
        return NULL;
    }
    char *s = realloc(buf, len + 1);
    if (!s) {
        abort();
    }
    s[len] = '\0';
    *ret_len = len;
    return s;
}

static bool rrepo_write_full_err(const char *path, const void *data,
                                 size_t len, Error **errp)
{
    const char *name;
    RadosRepo *r = rrepo_find_err(path, &name, errp);
    int ret = r ? rados_obj_write_full(r->io, name, data, len) : -EINVAL;

    if (r && ret < 0) {
        error_setg_errno(errp, -ret, "cannot write '%s'", path);
    }
    return ret == 0;
}

/* Data images are sized up to a multiple of this at sync (thin
 * provisioning: it costs nothing): QEMU's rbd driver asserts that a
 * qcow2's block-status requests, whole clusters (at most 2 MiB), lie
 * inside the image, and a compressed qcow2 may end inside a cluster. */
#define RREPO_DATA_ALIGN (UINT64_C(2) << 20)

static bool rrepo_sync(const char *path, Error **errp)
{
    const char *name;
    RadosRepo *r = rrepo_find_err(path, &name, errp);
    rbd_image_t image;
    uint64_t size;
    int ret;

    if (!r) {
        return false;
    }
    if (!rrepo_is_data(name)) {
        return true;                   /* acknowledged writes are durable */
    }
    _cleanup_free_ char *img = rrepo_image_name(name);
    ret = rbd_open(r->io, img, &image, NULL);
    if (ret == 0) {
        ret = rbd_get_size(image, &size);
        if (ret == 0 && size % RREPO_DATA_ALIGN) {
            ret = rbd_resize(image, ROUND_UP(size, RREPO_DATA_ALIGN));
        }
        int c = rbd_flush(image);
        ret = ret < 0 ? ret : c;
        rbd_close(image);
    }
    if (ret < 0) {
        error_setg_errno(errp, -ret, "cannot sync '%s'", path);
        return false;
    }
    return true;
}

static int rrepo_remove_name(RadosRepo *r, const char *name)
{
    if (rrepo_is_data(name)) {
        _cleanup_free_ char *img = rrepo_image_name(name);
        return rbd_remove(r->io, img);
    }
    return rados_remove(r->io, name);
}

/* The longest RBD image id (rbd_get_id: about 12 hex digits). */
#define RREPO_IMAGE_ID_MAX 64

/* Rename image a to b, replacing b.  rbd_rename refuses an existing
 * target and RBD has no atomic replace, so an existing b is first moved
 * to the pool's RBD trash (keeping its content: a crash before the rename
 * leaves it there, and `rbd trash restore` brings it back), then a takes
 * its name, then the trashed image is removed.  0 or -errno. */
static int rrepo_rename_image(RadosRepo *r, const char *a, const char *b)
{
    char id[RREPO_IMAGE_ID_MAX] = "";
    rbd_image_t image;
    int ret = rbd_open_read_only(r->io, b, &image, NULL);

    if (ret == 0) {
        ret = rbd_get_id(image, id, sizeof(id));
        rbd_close(image);
        if (ret == 0) {
            ret = rbd_trash_move(r->io, b, 0);
        }
        if (ret < 0) {
            return ret;
        }
    } else if (ret != -ENOENT) {
        return ret;
    }
    ret = rbd_rename(r->io, a, b);
    if (ret == 0 && id[0]) {
        rbd_trash_remove(r->io, id, true);   /* a leftover costs space only */
    }
    return ret;
}

/* Copy object nf (size bytes, above what one atomic write may hold: a
 * large index) to nt piece by piece.  Not atomic: a crash leaves a
 * partial nt, which is safe for the one kind of file this large, an
 * index, since an index is renamed into place before the manifest that
 * names it is committed (a partial one is named by no manifest, and the
 * next run's stale-index cleanup removes it).  0 or -errno. */
static int rrepo_copy_large(RadosRepo *r, const char *nf, const char *nt,
                            uint64_t size)
{
    _cleanup_free_ uint8_t *buf = malloc(RADOS_OBJ_MAX_OP);
    int ret;

    if (!buf) {
        return -ENOMEM;
    }
    if ((ret = rados_obj_truncate(r->io, nt, 0)) < 0) {
        return ret;
    }
    for (uint64_t off = 0; off < size;) {
        size_t n = (size_t)MIN(size - off, (uint64_t)RADOS_OBJ_MAX_OP);
        ssize_t got = rados_obj_pread(r->io, nf, buf, n, off);
        if (got < 0 || (size_t)got != n) {
            return got < 0 ? (int)got : -EIO;
        }
        if ((ret = rados_obj_pwrite(r->io, nt, buf, n, off)) < 0) {
            return ret;
        }
        off += n;
    }
    return 0;
}

static int rrepo_rename(const char *from, const char *to)
{
    const char *nf, *nt;
    RadosRepo *r = rrepo_find(from, &nf);

    if (!r || rrepo_find(to, &nt) != r || rrepo_is_data(nf) != rrepo_is_data(nt)) {
        return -EXDEV;
    }
    if (rrepo_is_data(nf)) {
        _cleanup_free_ char *a = rrepo_image_name(nf);
        _cleanup_free_ char *b = rrepo_image_name(nt);
        return rrepo_rename_image(r, a, b);
    }
    /* Copy, then remove: readers see the old name, then both with the
     * same content, then the new name only (docs/specs/repository.md). */
    uint64_t size;
    int ret = rados_obj_stat(r->io, nf, &size);
    if (ret < 0) {
        return ret;
    }
    if (size > RADOS_OBJ_MAX_WRITE_FULL) {
        ret = rrepo_copy_large(r, nf, nt, size);
    } else {
        uint8_t *buf;
        size_t len;
        if (!rados_obj_read_full(r->io, nf, RADOS_OBJ_MAX_WRITE_FULL, &buf,
                                 &len, NULL)) {
            return -EIO;
        }
        ret = rados_obj_write_full(r->io, nt, buf, len);
        free(buf);
    }
    return ret < 0 ? ret : rados_remove(r->io, nf);
}

static int rrepo_remove_path(const char *path)
{
    const char *name;
    RadosRepo *r = rrepo_find(path, &name);
    return r ? rrepo_remove_name(r, name) : -ENOENT;
}

static int rrepo_mkdir(const char *dir)
{
    const char *name;
    return rrepo_find(dir, &name) ? 0 : -ENOENT;   /* folders always exist */
}

static int rrepo_stat(const char *path, RepoStat *ret)
{
    const char *name;
    RadosRepo *r = rrepo_find(path, &name);
    uint64_t size;
    int ret_r;

    if (!r) {
        return -ENOENT;
    }
    if (rrepo_is_data(name)) {
        _cleanup_free_ char *img = rrepo_image_name(name);
        rbd_image_t image;
        ret_r = rbd_open_read_only(r->io, img, &image, NULL);
        if (ret_r < 0) {
            return ret_r;
        }
        ret_r = rbd_get_size(image, &size);
        rbd_close(image);
        if (ret_r < 0) {
            return ret_r;
        }
        *ret = (RepoStat){ .is_regular = true, .size = size,
                           .allocated = size };
        return 0;
    }
    ret_r = *name ? rados_obj_stat(r->io, name, &size) : -ENOENT;
    if (ret_r == 0) {
        *ret = (RepoStat){ .is_regular = true, .size = size,
                           .allocated = size };
        return 0;
    }
    /* The root and "NODE" (no '/', not the marker): folders. */
    if (ret_r == -ENOENT && (!*name || (!strchr(name, '/') &&
                                        strcmp(name, REPO_MARKER_NAME)))) {
        *ret = (RepoStat){ .is_dir = true };
        return 0;
    }
    return ret_r;
}

/* Add to `seen` the entry of folder prefix (ending in '/', or "" for the
 * root) that name (inside the repository) lies in. */
static void rrepo_list_add(struct json_object *seen, const char *prefix,
                           const char *name)
{
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) || !name[n]) {
        return;
    }
    const char *slash = strchr(name + n, '/');
    if (!n && !slash && strcmp(name, REPO_MARKER_NAME)) {
        return;        /* RBD's own objects (rbd_directory, rbd_header.*) */
    }
    _cleanup_free_ char *entry = slash ? strndup(name + n, (size_t)(slash - name - n))
                                       : strdup(name + n);
    if (!entry) {
        abort();
    }
    if (*entry) {
        json_object_object_add(seen, entry, NULL);
    }
}

static int rrepo_list(const char *dir, RepoListFn *fn, void *opaque)
{
    const char *name;
    RadosRepo *r = rrepo_find(dir, &name);
    _cleanup_json_ struct json_object *seen = json_object_new_object();
    _cleanup_free_ char *prefix = NULL;
    rados_list_ctx_t ctx;
    const char *entry;
    int ret;

    if (!r) {
        return -ENOENT;
    }
    prefix = *name ? repo_path_printf("%s/", name) : strdup("");
    if (!prefix) {
        abort();
    }
    if ((ret = rados_nobjects_list_open(r->io, &ctx)) < 0) {
        return ret;
    }
    while ((ret = rados_nobjects_list_next(ctx, &entry, NULL, NULL)) == 0) {
        rrepo_list_add(seen, prefix, entry);
    }
    rados_nobjects_list_close(ctx);
    if (ret != -ENOENT) {
        return ret;
    }
    /* The images: rbd_list2 with a growing buffer. */
    size_t max = 64;
    rbd_image_spec_t *imgs = NULL;
    for (;;) {
        imgs = realloc(imgs, max * sizeof(*imgs));
        if (!imgs) {
            abort();
        }
        ret = rbd_list2(r->io, imgs, &max);
        if (ret != -ERANGE) {
            break;
        }
    }
    if (ret >= 0) {
        for (size_t i = 0; i < max; i++) {
            _cleanup_free_ char *dec = rrepo_image_decode(imgs[i].name);
            if (dec && rrepo_is_data(dec)) {
                rrepo_list_add(seen, prefix, dec);
            }
        }
        rbd_image_spec_list_cleanup(imgs, max);
    }
    free(imgs);
    if (ret < 0) {
        return ret;
    }
    json_object_object_foreach(seen, key, val) {
        (void)val;
        if (!fn(opaque, key)) {
            break;
        }
    }
    return 0;
}

/* ---- streaming files: one object, written at offsets ---- */

struct RepoFile {
    RadosRepo *r;
    bool writing;
    uint64_t size;
    char name[];
};

static RepoFile *rrepo_file_new(RadosRepo *r, const char *name, bool writing)
{
    RepoFile *f = malloc(sizeof(*f) + strlen(name) + 1);
    if (!f) {
        abort();
    }
    *f = (RepoFile){ .r = r, .writing = writing };
    strcpy(f->name, name);
    return f;
}

/* Start a streaming file: writing, an empty object (create); else an
 * existing one, *ret_size its size (open). */
static RepoFile *rrepo_file_start(const char *path, bool writing,
                                  uint64_t *ret_size, Error **errp)
{
    const char *name;
    RadosRepo *r = rrepo_find_err(path, &name, errp);
    if (!r) {
        return NULL;
    }
    int ret = writing ? rados_obj_write_full(r->io, name, "", 0)
                      : rados_obj_stat(r->io, name, ret_size);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "cannot %s '%s'",
                         writing ? "create" : "open", path);
        return NULL;
    }
    return rrepo_file_new(r, name, writing);
}

static RepoFile *rrepo_create(const char *path, Error **errp)
{
    return rrepo_file_start(path, true, NULL, errp);
}

static int rrepo_append(RepoFile *f, const void *buf, size_t len)
{
    int ret = rados_obj_pwrite(f->r->io, f->name, buf, len, f->size);
    if (ret == 0) {
        f->size += len;
    }
    return ret;
}

static void rrepo_close(RepoFile *f)
{
    if (f && f->writing) {
        rados_remove(f->r->io, f->name);
    }
    free(f);
}

static bool rrepo_finish(RepoFile *f, Error **errp)
{
    f->writing = false;                /* durable: every append was */
    rrepo_close(f);
    return true;
}

static RepoFile *rrepo_open(const char *path, uint64_t *ret_size, Error **errp)
{
    return rrepo_file_start(path, false, ret_size, errp);
}

static int rrepo_pread_file(RepoFile *f, void *buf, size_t len, uint64_t off)
{
    ssize_t got = rados_obj_pread(f->r->io, f->name, buf, len, off);
    return got < 0 ? (int)got : (size_t)got < len ? -EIO : 0;
}

/* The block layer's name of data file path: "rbd:POOL/[NS/]IMAGE" plus
 * the repository's conf and id; only names under the attached root whose
 * last part is a data file of the layout, so always inside the pool and
 * namespace of the repository: nothing a manifest supplies is followed
 * elsewhere. */
static char *rrepo_block_name(const char *root, const char *path,
                              Error **errp)
{
    const char *name;
    RadosRepo *r = rrepo_find(path, &name);

    if (!r || strcmp(r->root, root) || !rrepo_is_data(name)) {
        error_setg(errp, "'%s' is not a backup file of the repository %s",
                   path, root);
        return NULL;
    }
    _cleanup_free_ char *img = rrepo_image_name(name);
    /* '@', ':' and '\' in an image name are escaped for the parser. */
    _cleanup_free_ char *esc = malloc(strlen(img) * 2 + 1);
    char *w = esc;
    if (!esc) {
        abort();
    }
    for (const char *p = img; *p; p++) {
        if (strchr("@:\\", *p)) {
            *w++ = '\\';
        }
        *w++ = *p;
    }
    *w = '\0';
    return repo_path_printf("%s/%s%s", r->root, esc, r->opts);
}

/* The rbd protocol node's options (QEMU's) of data file path. */
static struct json_object *rrepo_rbd_options(const char *root,
                                             const char *path, Error **errp)
{
    _cleanup_free_ char *name = rrepo_block_name(root, path, errp);
    _cleanup_(rbd_spec_clear) RBDSpec sp = { 0 };

    if (!name || !rbd_spec_parse(name, true, &sp, errp)) {
        return NULL;
    }
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "driver", json_object_new_string("rbd"));
    json_object_object_add(o, "pool", json_object_new_string(sp.pool));
    if (sp.ns) {
        json_object_object_add(o, "namespace", json_object_new_string(sp.ns));
    }
    json_object_object_add(o, "image", json_object_new_string(sp.image));
    if (sp.conf) {
        json_object_object_add(o, "conf", json_object_new_string(sp.conf));
    }
    if (sp.user) {
        json_object_object_add(o, "user", json_object_new_string(sp.user));
    }
    return o;
}

/* {"driver": "qcow2", "file": RBD, "backing": null}. */
static struct json_object *rrepo_qcow2_options(const char *root,
                                               const char *path, Error **errp)
{
    struct json_object *file = rrepo_rbd_options(root, path, errp);
    if (!file) {
        return NULL;
    }
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "driver", json_object_new_string("qcow2"));
    json_object_object_add(o, "file", file);
    json_object_object_add(o, "backing", NULL);
    return o;
}

static struct json_object *rrepo_overlay_options(const char *root,
                                                 const char *path,
                                                 const char *parent_path,
                                                 Error **errp)
{
    _cleanup_json_ struct json_object *o = rrepo_qcow2_options(root, path,
                                                               errp);
    if (!o) {
        return NULL;
    }
    if (parent_path) {
        struct json_object *b = rrepo_qcow2_options(root, parent_path, errp);
        if (!b) {
            return NULL;
        }
        json_object_object_add(o, "backing", b);
    }
    return steal_pointer(&o);
}

static bool rrepo_sync_dir(const char *dir, Error **errp)
{
    return true;
}

/*
 * Per-disk locks (lock.c; docs/specs/repository.md, "Locks", L5): RADOS
 * object locks (cls_lock) on the object NODE/.lock, which expire unless
 * renewed.  A thread renews each lock every third of its duration with
 * MUST_RENEW, so a lock that expired (the process stalled longer than
 * the duration) is never silently taken again: it is marked lost, and
 * lock_check, which the commit calls, fails.  A killed holder's lock
 * expires after the duration (BITBACK_RADOS_LOCK_SECONDS, default 30).
 */
#define RRLOCK_DESC "bitback"
#define RRLOCK_TAG "bitback"
#define RRLOCK_SECONDS 30
#define RRLOCK_SECONDS_MIN 3
#define RRLOCK_SECONDS_MAX 3600

struct RepoStorageLock {
    rados_ioctx_t io;                  /* valid until detach: unlocked first */
    char *oid;
    char *name;
    char *cookie;
    bool exclusive;
    unsigned seconds;
    pthread_mutex_t mu;
    pthread_cond_t cv;                 /* CLOCK_MONOTONIC */
    bool stop;
    int lost;                          /* errno of a failed renewal, or 0 */
    bool have_renewer;
    pthread_t renewer;
};

/* The lock duration: BITBACK_RADOS_LOCK_SECONDS, else the default. */
static unsigned rrlock_seconds(void)
{
    const char *e = getenv("BITBACK_RADOS_LOCK_SECONDS");
    char *end;
    unsigned long v = e ? strtoul(e, &end, 10) : 0;

    if (!e || !*e || *end || v < RRLOCK_SECONDS_MIN || v > RRLOCK_SECONDS_MAX) {
        return RRLOCK_SECONDS;
    }
    return v;
}

static int rrlock_take(RepoStorageLock *l, uint8_t flags)
{
    struct timeval d = { .tv_sec = l->seconds };

    if (l->exclusive) {
        return rados_lock_exclusive(l->io, l->oid, l->name, l->cookie,
                                    RRLOCK_DESC, &d, flags);
    }
    return rados_lock_shared(l->io, l->oid, l->name, l->cookie, RRLOCK_TAG,
                             RRLOCK_DESC, &d, flags);
}

static void *rrlock_renewer(void *opaque)
{
    RepoStorageLock *l = opaque;

    pthread_mutex_lock(&l->mu);
    while (!l->stop && !l->lost) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += l->seconds / 3;
        if (pthread_cond_timedwait(&l->cv, &l->mu, &ts) != ETIMEDOUT ||
            l->stop) {
            continue;
        }
        pthread_mutex_unlock(&l->mu);
        int r = rrlock_take(l, LIBRADOS_LOCK_FLAG_MUST_RENEW);
        pthread_mutex_lock(&l->mu);
        if (r < 0 && !l->stop) {
            l->lost = -r;
            log_msg(LOG_LEVEL_WARNING, "lost the lock '%s' on %s: %s", l->name,
                    l->oid, strerror(-r));
        }
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

/* Who holds lock name on oid, for the message of a refused run. */
static char *rrlock_holders(rados_ioctx_t io, const char *oid,
                            const char *name, unsigned seconds)
{
    _cleanup_free_ char *who = rados_obj_lock_holders(io, oid, name);
    char *msg;

    if (asprintf(&msg, "%s; the lock of a run that died expires %u s after "
                 "it was last renewed", who ? who : "another client",
                 seconds) < 0) {
        msg = NULL;
    }
    return msg;
}

/* Stop and join the renewing thread, if any. */
static void rrlock_stop(RepoStorageLock *l)
{
    if (l->have_renewer) {
        pthread_mutex_lock(&l->mu);
        l->stop = true;
        pthread_cond_signal(&l->cv);
        pthread_mutex_unlock(&l->mu);
        pthread_join(l->renewer, NULL);
        l->have_renewer = false;
    }
}

static void rrlock_free(RepoStorageLock *l)
{
    rrlock_stop(l);
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
    free(l->oid);
    free(l->name);
    free(l->cookie);
    free(l);
}

static int rrepo_lock(const char *path, const char *name, bool exclusive,
                      const char *who, RepoStorageLock **ret,
                      char **ret_holder)
{
    const char *oid;
    RadosRepo *r = rrepo_find(path, &oid);
    pthread_condattr_t ca;

    *ret = NULL;
    *ret_holder = NULL;
    if (!r) {
        return -ENOENT;
    }
    RepoStorageLock *l = calloc(1, sizeof(*l));
    if (!l) {
        abort();
    }
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, &ca);
    pthread_condattr_destroy(&ca);
    l->io = r->io;
    l->exclusive = exclusive;
    l->seconds = rrlock_seconds();
    l->oid = strdup(oid);
    l->name = strdup(name);
    l->cookie = rados_obj_new_cookie(who);
    if (!l->oid || !l->name || !l->cookie) {
        abort();
    }
    int rc = rrlock_take(l, 0);
    if (rc == -EBUSY) {
        *ret_holder = rrlock_holders(r->io, oid, name, l->seconds);
    }
    if (rc == 0 && (rc = -pthread_create(&l->renewer, NULL, rrlock_renewer,
                                         l)) < 0) {
        rados_unlock(l->io, l->oid, l->name, l->cookie);
    }
    if (rc < 0) {
        rrlock_free(l);
        return rc;
    }
    l->have_renewer = true;
    *ret = l;
    return 0;
}

static bool rrepo_lock_check(RepoStorageLock *l, Error **errp)
{
    pthread_mutex_lock(&l->mu);
    int lost = l->lost;
    pthread_mutex_unlock(&l->mu);
    if (!lost) {
        int r = rrlock_take(l, LIBRADOS_LOCK_FLAG_MUST_RENEW);
        lost = r < 0 ? -r : 0;
    }
    if (lost) {
        error_setg(errp, "the lock '%s' on %s was lost (%s): another run may "
                   "have taken the disk over", l->name, l->oid,
                   strerror(lost));
        return false;
    }
    return true;
}

static void rrepo_unlock(RepoStorageLock *l)
{
    if (l) {
        rrlock_stop(l);
        rados_unlock(l->io, l->oid, l->name, l->cookie);
        rrlock_free(l);
    }
}

const RepoStorage repo_storage_rados = {
    .name = "rados",
    .read = rrepo_read,
    .write_tmp = rrepo_write_full_err,
    .sync = rrepo_sync,
    .sync_dir = rrepo_sync_dir,
    .replace = rrepo_write_full_err,
    .rename = rrepo_rename,
    .remove = rrepo_remove_path,
    .mkdir = rrepo_mkdir,
    .stat = rrepo_stat,
    .list = rrepo_list,
    .create = rrepo_create,
    .append = rrepo_append,
    .finish = rrepo_finish,
    .open = rrepo_open,
    .pread = rrepo_pread_file,
    .close = rrepo_close,
    .block_name = rrepo_block_name,
    .overlay_options = rrepo_overlay_options,
    .lock = rrepo_lock,
    .lock_check = rrepo_lock_check,
    .unlock = rrepo_unlock,
};
