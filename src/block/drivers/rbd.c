/*
 * The "rbd" protocol driver: a node whose content is a Ceph RBD image,
 * reached through librbd (and librados for the cluster connection), with
 * QEMU's blockdev-add options:
 *
 *   {"driver": "rbd", "pool": "rbd", "namespace": "ns", "image": "disk0",
 *    "conf": "/etc/ceph/ceph.conf", "user": "admin", "snapshot": "s1",
 *    "locking": "on" | "off" | "auto"}
 *   or {"driver": "rbd", "filename": "rbd:pool/[ns/]image[@snap][:key=value...]"}
 *
 * The filename form is QEMU's: parts are split at unescaped '/', '@' and
 * ':' ('\' escapes the next character), "conf=PATH" names the Ceph
 * configuration file, "id=USER" the client name, and every other
 * "key=value" is a Ceph option set on the client (rados_conf_set).
 *
 * Requests go through librbd's asynchronous API: each call submits one
 * rbd_aio_* and waits for its completion in the calling thread, so requests
 * from the block layer's many threads overlap in librbd and on the OSDs
 * (librbd image handles are thread-safe).  Plain writes in the image's
 * range can also go without a waiting thread (aio_pwritev, which the NBD
 * server uses: invariant 9 of nbd-internal.h): librbd's completion thread
 * then finishes them.
 *
 * Invariants:
 *   R1. A read-write node holds the image's exclusive lock (RBD's
 *       exclusive-lock feature) from open to close, taken with
 *       rbd_lock_acquire, which makes librbd's lock "managed": librbd
 *       refuses another client's request for it instead of handing it over
 *       as it does by default, so a second writer (another bitbackd, or
 *       QEMU) fails rather than taking the image from under us.  An image
 *       without the feature is opened read-write only with locking=off.
 *       Read-only nodes and snapshots take no lock.
 *   R2. Block status never reports ZERO for a range that may hold data:
 *       everything rbd_diff_iterate2 (against no snapshot, parent included)
 *       reports as existing is DATA; with whole_object (only when the
 *       image's fast-diff is enabled and valid) it reports whole objects,
 *       a superset of what was written.
 *   R3. A write or write-zeroes past the image's end first grows the image
 *       to the request's end (rbd_resize, one at a time under grow_lock,
 *       never shrinking), as QEMU's rbd driver does, so the node grows like
 *       a file (a qcow2 on it, a repository's backup file); reads and
 *       discards past the end fail with -EINVAL instead of being sent.
 *   R5. The image's persistent bitmaps (rbd-bitmaps.c) are loaded after
 *       R1's lock is taken, by their owner: this node when the user opened
 *       it (depth 0), else the raw node over it; so a refused writer never
 *       touches their objects.
 *   R4. Opening is bounded in time: the client's mount timeout is
 *       RBD_MOUNT_TIMEOUT seconds unless the configuration sets another.
 *   R6. While R1's lock is held nobody else can resize the image, so the
 *       requests' range check (R3) uses the size this node last read or
 *       set (s->size, updated under grow_lock), not a librbd call per
 *       request; a range past it asks librbd again before it is refused.
 *       Nodes without the lock ask librbd every time.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/uio.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "block/block.h"
#include "block/drivers/rbd.h"
#include "block/drivers/rbd-bitmaps.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/iov.h"

/* Seconds a client waits for the monitors at open (R4), as a string for
 * rados_conf_set. */
#define RBD_MOUNT_TIMEOUT "15"
/* The largest range one block status call asks librbd about. */
#define RBD_STATUS_MAX_BYTES (UINT64_C(1) << 30)
/* The longest image id rbd_get_id gives (ids are ~12 hex digits). */
#define RBD_ID_MAX 64
/* Requests of up to this many pieces slice their iovec on the stack. */
#define RBD_SMALL_IOV 8

typedef struct BDRVRBDState {
    rados_t cluster;
    rados_ioctx_t io;
    rbd_image_t image;
    char *image_id;
    char *desc;              /* "pool/[ns/]image[@snap]" for messages */
    bool fast_diff;          /* the image has fast-diff (R2) */
    bool locked;             /* we hold the exclusive lock (R1) */
    RbdBitmaps *bitmaps;     /* persistent bitmaps (R5), NULL: none loaded */
    pthread_mutex_t grow_lock; /* serializes R3's resizes */
    /* R6: the image's size as this lock holder last set or read it (0:
     * not known); read and written atomically. */
    uint64_t size;
} BDRVRBDState;

void rbd_spec_clear(RBDSpec *sp)
{
    free(sp->pool);
    free(sp->ns);
    free(sp->image);
    free(sp->snap);
    free(sp->conf);
    free(sp->user);
    json_object_put(sp->conf_pairs);
    memset(sp, 0, sizeof(*sp));
}

/* Splits s at its first unescaped delim: returns s (now ending there) and
 * sets *ret_rest past the delimiter, or to NULL when there is none. */
static char *rbd_next_tok(char *s, char delim, char **ret_rest)
{
    for (char *q = s; *q; q++) {
        if (*q == '\\') {
            if (!q[1]) {
                break;
            }
            q++;
        } else if (*q == delim) {
            *q = '\0';
            *ret_rest = q + 1;
            return s;
        }
    }
    *ret_rest = NULL;
    return s;
}

/* A malloc'd copy of s without its escaping backslashes. */
static char *rbd_unescape(const char *s)
{
    char *out = malloc(strlen(s) + 1), *w = out;
    if (!out) {
        return NULL;
    }
    for (; *s; s++) {
        if (*s == '\\' && !*++s) {
            break;
        }
        *w++ = *s;
    }
    *w = '\0';
    return out;
}

/* The ":key=value..." part of filename (opts: its text after the first
 * ':', modified; NULL for none) into sp: conf=, id= and Ceph options. */
static bool rbd_parse_opts(const char *filename, char *opts, RBDSpec *sp,
                           Error **errp)
{
    while (opts) {
        char *key = rbd_next_tok(opts, '=', &opts);
        if (!opts) {
            error_setg(errp, "rbd: option '%s' in '%s' has no value", key,
                       filename);
            return false;
        }
        char *value = rbd_next_tok(opts, ':', &opts);
        _cleanup_free_ char *k = rbd_unescape(key);
        char *v = rbd_unescape(value);
        if (!k || !v) {
            free(v);
            error_setg(errp, "out of memory");
            return false;
        }
        if (!strcmp(k, "conf")) {
            free(sp->conf);
            sp->conf = v;
        } else if (!strcmp(k, "id")) {
            free(sp->user);
            sp->user = v;
        } else {
            if (!sp->conf_pairs) {
                sp->conf_pairs = json_object_new_object();
            }
            json_object_object_add(sp->conf_pairs, k,
                                   json_object_new_string(v));
            free(v);
        }
    }
    return true;
}

bool rbd_spec_parse(const char *filename, bool image_required, RBDSpec *sp,
                    Error **errp)
{
    static const char usage[] =
        "rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:conf=PATH][:id=USER]";
    if (!bdrv_filename_is_rbd(filename)) {
        error_setg(errp, "rbd: '%s' is not an rbd filename (%s)", filename,
                   usage);
        return false;
    }
    _cleanup_free_ char *buf = strdup(filename + 4);
    if (!buf) {
        error_setg(errp, "out of memory");
        return false;
    }
    char *rest, *opts = NULL, *snap, *img, *head = buf;
    if (!image_required) {
        /* No image: the options start at the first ':' (a conf path may
         * hold '/'). */
        head = rbd_next_tok(buf, ':', &opts);
    }
    char *pool = rbd_next_tok(head, '/', &rest);
    if (!rest && image_required) {
        error_setg(errp, "rbd: '%s' names no image (%s)", filename, usage);
        return false;
    }
    if (!rest) {
        if (!(sp->pool = rbd_unescape(pool))) {
            error_setg(errp, "out of memory");
            return false;
        }
        return rbd_parse_opts(filename, opts, sp, errp);
    }
    img = image_required ? rbd_next_tok(rest, ':', &opts) : rest;
    img = rbd_next_tok(img, '@', &snap);
    char *image = rbd_next_tok(img, '/', &rest);
    char *ns = NULL;
    if (rest) {
        ns = image;
        image = rest;
    }
    sp->pool = rbd_unescape(pool);
    sp->ns = ns ? rbd_unescape(ns) : NULL;
    sp->image = rbd_unescape(image);
    sp->snap = snap ? rbd_unescape(snap) : NULL;
    if (!sp->pool || (ns && !sp->ns) || !sp->image || (snap && !sp->snap)) {
        error_setg(errp, "out of memory");
        return false;
    }
    return rbd_parse_opts(filename, opts, sp, errp);
}

/* *ret: a malloc'd copy of options' string member key, NULL when absent. */
static bool rbd_opt_dup(struct json_object *options, const char *key,
                        char **ret, Error **errp)
{
    struct json_object *v;
    *ret = NULL;
    if (!json_object_object_get_ex(options, key, &v) || !v) {
        return true;
    }
    if (!json_object_is_type(v, json_type_string)) {
        error_setg(errp, "rbd: parameter '%s' expects a string", key);
        return false;
    }
    if (!(*ret = strdup(json_object_get_string(v)))) {
        error_setg(errp, "out of memory");
        return false;
    }
    return true;
}

/* Refuse a name part that is missing or empty (when required) or holds
 * '/' or '@'. */
static bool rbd_check_part(const char *what, const char *value, bool required,
                           Error **errp)
{
    if (required && (!value || !*value)) {
        error_setg(errp, "rbd: the %s name is %s", what,
                   value ? "empty" : "missing");
        return false;
    }
    if (value && strpbrk(value, "/@")) {
        error_setg(errp, "rbd: the %s name '%s' contains '/' or '@'", what,
                   value);
        return false;
    }
    return true;
}

/* Fill sp from a node's options: "filename" or the separate members. */
static bool rbd_parse_options(struct json_object *options, RBDSpec *sp,
                              Error **errp)
{
    _cleanup_free_ char *filename = NULL;
    if (!rbd_opt_dup(options, "filename", &filename, errp)) {
        return false;
    }
    if (filename) {
        static const char *const members[] = { "pool", "namespace", "image",
                                               "snapshot" };
        for (size_t i = 0; i < ARRAY_SIZE(members); i++) {
            if (json_object_object_get_ex(options, members[i], NULL)) {
                error_setg(errp, "rbd: give either 'filename' or '%s', not "
                           "both", members[i]);
                return false;
            }
        }
        if (!rbd_spec_parse(filename, true, sp, errp)) {
            return false;
        }
        /* conf and user given as options win over the filename's. */
        char *conf, *user;
        if (!rbd_opt_dup(options, "conf", &conf, errp) ||
            !rbd_opt_dup(options, "user", &user, errp)) {
            return false;
        }
        if (conf) {
            free(sp->conf);
            sp->conf = conf;
        }
        if (user) {
            free(sp->user);
            sp->user = user;
        }
        return true;
    }
    return rbd_opt_dup(options, "pool", &sp->pool, errp) &&
           rbd_opt_dup(options, "namespace", &sp->ns, errp) &&
           rbd_opt_dup(options, "image", &sp->image, errp) &&
           rbd_opt_dup(options, "snapshot", &sp->snap, errp) &&
           rbd_opt_dup(options, "conf", &sp->conf, errp) &&
           rbd_opt_dup(options, "user", &sp->user, errp);
}

static bool rbd_spec_check(const RBDSpec *sp, Error **errp)
{
    return rbd_check_part("pool", sp->pool, true, errp) &&
           rbd_check_part("namespace", sp->ns, false, errp) &&
           rbd_check_part("image", sp->image, true, errp) &&
           rbd_check_part("snapshot", sp->snap, sp->snap != NULL, errp);
}

/* "pool/[ns/]image[@snap]", malloc'd (NULL when out of memory). */
static char *rbd_spec_desc(const RBDSpec *sp)
{
    char *d;
    bool has_ns = sp->ns && *sp->ns;
    if (asprintf(&d, "%s/%s%s%s%s%s", sp->pool, has_ns ? sp->ns : "",
                 has_ns ? "/" : "", sp->image, sp->snap ? "@" : "",
                 sp->snap ? sp->snap : "") < 0) {
        return NULL;
    }
    return d;
}

/* Connect to the cluster sp names and open the I/O context of its pool
 * and namespace.  On success the caller owns *ret_cluster and *ret_io
 * (rbd_disconnect). */
bool rbd_spec_connect(const RBDSpec *sp, rados_t *ret_cluster,
                      rados_ioctx_t *ret_io, Error **errp)
{
    rados_t cluster;
    int r = rados_create(&cluster, sp->user);
    if (r < 0) {
        error_setg_errno(errp, -r, "rbd: cannot create a Ceph client%s%s",
                         sp->user ? " for user " : "",
                         sp->user ? sp->user : "");
        return false;
    }
    /* R4: set first, so that a configuration file may override it. */
    rados_conf_set(cluster, "client_mount_timeout", RBD_MOUNT_TIMEOUT);
    r = rados_conf_read_file(cluster, sp->conf);
    if (r < 0 && sp->conf) {
        error_setg_errno(errp, -r, "rbd: cannot read the Ceph configuration "
                         "file '%s'", sp->conf);
        goto fail;
    }
    if (sp->conf_pairs) {
        json_object_object_foreach(sp->conf_pairs, key, val) {
            r = rados_conf_set(cluster, key, json_object_get_string(val));
            if (r < 0) {
                error_setg_errno(errp, -r, "rbd: invalid Ceph option '%s=%s'",
                                 key, json_object_get_string(val));
                goto fail;
            }
        }
    }
    r = rados_connect(cluster);
    if (r < 0) {
        error_setg_errno(errp, -r, "rbd: cannot connect to the Ceph cluster%s%s",
                         sp->conf ? " of " : "", sp->conf ? sp->conf : "");
        goto fail;
    }
    rados_ioctx_t io;
    r = rados_ioctx_create(cluster, sp->pool, &io);
    if (r < 0) {
        error_setg_errno(errp, -r, "rbd: cannot open pool '%s'", sp->pool);
        goto fail;
    }
    rados_ioctx_set_namespace(io, sp->ns && *sp->ns ? sp->ns : "");
    *ret_io = io;
    *ret_cluster = cluster;
    return true;

fail:
    rados_shutdown(cluster);
    return false;
}

void rbd_spec_disconnect(rados_t cluster, rados_ioctx_t io)
{
    if (io) {
        rados_ioctx_destroy(io);
    }
    if (cluster) {
        rados_shutdown(cluster);
    }
}

/* The "locking" option (R1): on (default) or off. */
static bool rbd_opt_locking(struct json_object *options, int flags,
                            bool *ret_on, Error **errp)
{
    return bdrv_opt_locking(options, !(flags & BDRV_O_NO_LOCK), ret_on, errp);
}

/* The address (malloc'd) of a live client holding the exclusive lock of
 * s->image: a lock owner that still watches the image header, as librbd
 * tells the living from the dead.  NULL when nobody holds it, its holder
 * is gone (librbd breaks such a lock) or out of memory. */
static char *rbd_live_lock_owner(BDRVRBDState *s)
{
    char *owners[8], *ret = NULL;
    size_t n_owners = ARRAY_SIZE(owners);
    rbd_lock_mode_t mode;
    if (rbd_lock_get_owners(s->image, &mode, owners, &n_owners) < 0 ||
        n_owners == 0) {
        return NULL;
    }
    rbd_image_watcher_t watchers[64];
    size_t n_watchers = ARRAY_SIZE(watchers);
    bool listed = rbd_watchers_list(s->image, watchers, &n_watchers) == 0;
    for (size_t i = 0; i < n_owners && !ret; i++) {
        /* Watchers we cannot list: count the owner as alive. */
        bool alive = !listed;
        for (size_t k = 0; listed && k < n_watchers && !alive; k++) {
            alive = !strcmp(watchers[k].addr, owners[i]);
        }
        if (alive) {
            ret = strdup(owners[i]);
        }
    }
    if (listed) {
        rbd_watchers_list_cleanup(watchers, n_watchers);
    }
    rbd_lock_get_owners_cleanup(owners, n_owners);
    return ret;
}

/* R1: take the exclusive lock of s->image, managed (never handed over).
 * A live holder is refused here first: librbd would otherwise ask a
 * holder with the automatic policy (QEMU) to hand the lock over. */
static bool rbd_lock(BDRVRBDState *s, Error **errp)
{
    _cleanup_free_ char *owner = rbd_live_lock_owner(s);
    int r = owner ? -EBUSY : rbd_lock_acquire(s->image, RBD_LOCK_MODE_EXCLUSIVE);
    int is_owner = 0;
    if (r == 0 && rbd_is_exclusive_lock_owner(s->image, &is_owner) == 0 &&
        is_owner) {
        s->locked = true;
        return true;
    }
    if (!owner) {
        owner = rbd_live_lock_owner(s);
    }
    if (owner) {
        error_setg(errp, "rbd: image '%s' is locked for writing by another "
                   "client (%s); open it read-only, or stop that client",
                   s->desc, owner);
    } else {
        error_setg_errno(errp, r < 0 ? -r : EBUSY,
                         "rbd: cannot take the exclusive lock of image '%s'",
                         s->desc);
    }
    return false;
}

static void rbd_drv_close(BlockDriverState *bs)
{
    BDRVRBDState *s = bs->opaque;
    rbd_bitmaps_free(s->bitmaps);
    s->bitmaps = NULL;
    if (s->image) {
        if (s->locked) {
            rbd_lock_release(s->image);
        }
        rbd_close(s->image);
        s->image = NULL;
    }
    rbd_spec_disconnect(s->cluster, s->io);
    s->cluster = NULL;
    s->io = NULL;
    free(s->image_id);
    free(s->desc);
    s->image_id = s->desc = NULL;
    pthread_mutex_destroy(&s->grow_lock);
}

static bool rbd_drv_open(BlockDriverState *bs, struct json_object *options,
                         int flags, Error **errp)
{
    BDRVRBDState *s = bs->opaque;
    _cleanup_(rbd_spec_clear) RBDSpec sp = { 0 };
    bool locking;
    int r;

    pthread_mutex_init(&s->grow_lock, NULL);
    if (!rbd_parse_options(options, &sp, errp) || !rbd_spec_check(&sp, errp) ||
        !rbd_opt_locking(options, flags, &locking, errp)) {
        return false;
    }
    if (!(s->desc = rbd_spec_desc(&sp))) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (sp.snap && (flags & BDRV_O_RDWR)) {
        error_setg(errp, "rbd: snapshot '%s' is read-only; open it with "
                   "read-only=on", s->desc);
        goto fail;
    }
    if (!rbd_spec_connect(&sp, &s->cluster, &s->io, errp)) {
        goto fail;
    }
    if (flags & BDRV_O_RDWR) {
        r = rbd_open(s->io, sp.image, &s->image, NULL);
    } else {
        r = rbd_open_read_only(s->io, sp.image, &s->image, sp.snap);
    }
    if (r < 0) {
        s->image = NULL;
        error_setg_errno(errp, -r, "rbd: cannot open image '%s'%s", s->desc,
                         r == -ENOENT ? (sp.snap ? " (no such image or "
                                         "snapshot)" : " (no such image)") : "");
        goto fail;
    }
    uint64_t features = 0;
    r = rbd_get_features(s->image, &features);
    if (r < 0) {
        error_setg_errno(errp, -r, "rbd: cannot read the features of '%s'",
                         s->desc);
        goto fail;
    }
    s->fast_diff = features & RBD_FEATURE_FAST_DIFF;
    if ((flags & BDRV_O_RDWR) && locking) {
        if (!(features & RBD_FEATURE_EXCLUSIVE_LOCK)) {
            error_setg(errp, "rbd: image '%s' has no exclusive-lock feature, "
                       "so another writer could not be kept out; enable it "
                       "(rbd feature enable %s exclusive-lock) or open with "
                       "locking=off", s->desc, s->desc);
            goto fail;
        }
        if (!rbd_lock(s, errp)) {
            goto fail;
        }
    }
    char id[RBD_ID_MAX];
    r = rbd_get_id(s->image, id, sizeof(id));
    if (r < 0 || !(s->image_id = strdup(id))) {
        error_setg_errno(errp, r < 0 ? -r : ENOMEM,
                         "rbd: cannot read the id of image '%s'", s->desc);
        goto fail;
    }
    if (!bs->filename && asprintf(&bs->filename, "rbd:%s", s->desc) < 0) {
        bs->filename = NULL;
    }
    if (bs->open_depth == 0 &&
        !rbd_bitmaps_attach(bs, (flags & BDRV_O_RDWR) != 0, errp)) {
        goto fail;
    }
    return true;

fail:
    rbd_drv_close(bs);
    return false;
}

static int64_t rbd_drv_getlength(BlockDriverState *bs)
{
    BDRVRBDState *s = bs->opaque;
    uint64_t size;
    int r = rbd_get_size(s->image, &size);
    return r < 0 ? r : (int64_t)size;
}

/* R3: is [offset, +bytes) inside the image?  R6: a lock holder first
 * checks the size it knows. */
static bool rbd_in_range(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    BDRVRBDState *s = bs->opaque;
    uint64_t known = __atomic_load_n(&s->size, __ATOMIC_ACQUIRE);

    if (s->locked && offset <= known && bytes <= known - offset) {
        return true;
    }
    int64_t size = rbd_drv_getlength(bs);
    if (size >= 0 && s->locked) {
        __atomic_store_n(&s->size, (uint64_t)size, __ATOMIC_RELEASE);
    }
    return size >= 0 && offset <= (uint64_t)size &&
           bytes <= (uint64_t)size - offset;
}

typedef enum { RBD_AIO_READ, RBD_AIO_WRITE, RBD_AIO_DISCARD,
               RBD_AIO_WRITE_ZEROES, RBD_AIO_FLUSH } RBDAioOp;

/* Submit one asynchronous librbd request and wait for it in this thread
 * (other threads' requests run meanwhile).  iov must describe exactly
 * `bytes` bytes for reads and writes.  0 or -errno. */
static int rbd_aio_run(BDRVRBDState *s, RBDAioOp op, uint64_t offset,
                       uint64_t bytes, const struct iovec *iov, int niov,
                       int zero_flags)
{
    rbd_completion_t c;
    int r = rbd_aio_create_completion(NULL, NULL, &c);
    if (r < 0) {
        return r;
    }
    switch (op) {
    case RBD_AIO_READ:
        r = rbd_aio_readv(s->image, iov, niov, offset, c);
        break;
    case RBD_AIO_WRITE:
        r = rbd_aio_writev(s->image, iov, niov, offset, c);
        break;
    case RBD_AIO_DISCARD:
        r = rbd_aio_discard(s->image, offset, bytes, c);
        break;
    case RBD_AIO_WRITE_ZEROES:
#ifdef LIBRBD_SUPPORTS_WRITE_ZEROES
        r = rbd_aio_write_zeroes(s->image, offset, bytes, c, zero_flags, 0);
#else
        r = -ENOTSUP;
#endif
        break;
    case RBD_AIO_FLUSH:
        r = rbd_aio_flush(s->image, c);
        break;
    }
    if (r == 0) {
        rbd_aio_wait_for_complete(c);
        ssize_t ret = rbd_aio_get_return_value(c);
        r = ret < 0 ? (int)ret : 0;
    }
    rbd_aio_release(c);
    return r;
}

/* R3: make the image at least offset + bytes long.  0 or -errno. */
static int rbd_grow(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    BDRVRBDState *s = bs->opaque;
    uint64_t size;
    int r;

    if (rbd_in_range(bs, offset, bytes)) {
        return 0;
    }
    if (offset > UINT64_MAX - bytes) {
        return -EINVAL;
    }
    pthread_mutex_lock(&s->grow_lock);
    r = rbd_get_size(s->image, &size);
    if (r == 0 && size < offset + bytes) {
        r = rbd_resize(s->image, offset + bytes);
        size = offset + bytes;
    }
    if (r == 0 && s->locked) {
        __atomic_store_n(&s->size, size, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&s->grow_lock);
    return r;
}

/* A read or write of [offset, +bytes) from/to iov. */
static int rbd_rw(BlockDriverState *bs, RBDAioOp op, uint64_t offset,
                  uint64_t bytes, const struct iovec *iov, int niov)
{
    /* rbd_grow checked the range, or made it. */
    int r = op == RBD_AIO_WRITE ? rbd_grow(bs, offset, bytes) : 0;
    if (r < 0) {
        return r;
    }
    if ((op != RBD_AIO_WRITE && !rbd_in_range(bs, offset, bytes)) ||
        niov < 1 || niov > IOV_MAX || iov_size(iov, niov) < bytes) {
        return -EINVAL;
    }
    if (bytes == 0) {
        return 0;
    }
    struct iovec small[RBD_SMALL_IOV];
    _cleanup_free_ struct iovec *big = NULL;
    struct iovec *v = small;
    if (niov > RBD_SMALL_IOV) {
        v = big = malloc(sizeof(*v) * (size_t)niov);
        if (!v) {
            return -ENOMEM;
        }
    }
    int n = iov_slice(iov, niov, 0, bytes, v, niov);
    if (n < 0) {
        return -EINVAL;
    }
    return rbd_aio_run(bs->opaque, op, offset, bytes, v, n, 0);
}

static int rbd_drv_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                          const struct iovec *iov, int niov, int flags)
{
    return rbd_rw(bs, RBD_AIO_READ, offset, bytes, iov, niov);
}

static int rbd_drv_flush(BlockDriverState *bs)
{
    return rbd_aio_run(bs->opaque, RBD_AIO_FLUSH, 0, 0, NULL, 0, 0);
}

/* librbd has no FUA: a flush after the request gives its guarantee. */
static int rbd_fua(BlockDriverState *bs, int r, int flags)
{
    return r == 0 && (flags & BDRV_REQ_FUA) ? rbd_drv_flush(bs) : r;
}

static int rbd_drv_pwritev(BlockDriverState *bs, uint64_t offset,
                           uint64_t bytes, const struct iovec *iov, int niov,
                           int flags)
{
    return rbd_fua(bs, rbd_rw(bs, RBD_AIO_WRITE, offset, bytes, iov, niov),
                   flags);
}

/* An aio_pwritev in flight: the block layer's completion. */
typedef struct RBDAioWrite {
    void (*cb)(void *opaque, int ret);
    void *opaque;
} RBDAioWrite;

/* librbd's completion callback (one of librbd's threads). */
static void rbd_aio_write_cb(rbd_completion_t c, void *arg)
{
    RBDAioWrite *a = arg;
    ssize_t ret = rbd_aio_get_return_value(c);

    rbd_aio_release(c);
    a->cb(a->opaque, ret < 0 ? (int)ret : 0);
    free(a);
}

/* A write that waits for nothing here: librbd calls back when it is done.
 * Writes that would grow the image (R3) go through rbd_drv_pwritev. */
static int rbd_drv_aio_pwritev(BlockDriverState *bs, uint64_t offset,
                               uint64_t bytes, const struct iovec *iov,
                               int niov, void (*cb)(void *opaque, int ret),
                               void *opaque)
{
    BDRVRBDState *s = bs->opaque;
    struct iovec v[RBD_SMALL_IOV];

    if (!rbd_in_range(bs, offset, bytes) || niov < 1 || niov > RBD_SMALL_IOV ||
        iov_size(iov, niov) < bytes) {
        return -EAGAIN;
    }
    int n = iov_slice(iov, niov, 0, bytes, v, niov);
    if (n < 0) {
        return -EAGAIN;
    }
    RBDAioWrite *a = malloc(sizeof(*a));
    if (!a) {
        return -ENOMEM;
    }
    *a = (RBDAioWrite){ .cb = cb, .opaque = opaque };
    rbd_completion_t c;
    int r = rbd_aio_create_completion(a, rbd_aio_write_cb, &c);
    if (r < 0) {
        free(a);
        return r;
    }
    r = rbd_aio_writev(s->image, v, n, offset, c);
    if (r < 0) {
        rbd_aio_release(c);
        free(a);
    }
    return r;
}

/* librbd's write-zeroes deallocates whole objects and zeroes the rest
 * (THICK_PROVISION keeps everything allocated, for callers that may not
 * unmap).  Not offered as a fast zero (NO_FALLBACK): it may write data.
 * Without it in librbd, -ENOTSUP: the block layer writes zero buffers. */
static int rbd_drv_pwrite_zeroes(BlockDriverState *bs, uint64_t offset,
                                 uint64_t bytes, int flags)
{
    if (flags & BDRV_REQ_NO_FALLBACK) {
        return -ENOTSUP;
    }
    int r = rbd_grow(bs, offset, bytes);
    if (r < 0) {
        return r;
    }
    int zero_flags = 0;
#ifdef LIBRBD_SUPPORTS_WRITE_ZEROES
    if (!(flags & BDRV_REQ_MAY_UNMAP)) {
        zero_flags = RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
    }
#endif
    return rbd_fua(bs, rbd_aio_run(bs->opaque, RBD_AIO_WRITE_ZEROES, offset,
                                   bytes, NULL, 0, zero_flags), flags);
}

static int rbd_drv_pdiscard(BlockDriverState *bs, uint64_t offset,
                            uint64_t bytes)
{
    if (!rbd_in_range(bs, offset, bytes)) {
        return -EINVAL;
    }
    return rbd_aio_run(bs->opaque, RBD_AIO_DISCARD, offset, bytes, NULL, 0, 0);
}

/* The existing extents rbd_diff_iterate2 reported for [start, end). */
typedef struct RBDExtents {
    uint64_t start, end;
    struct { uint64_t off, end; } *v;
    size_t n, cap;
} RBDExtents;

static int rbd_status_cb(uint64_t off, size_t len, int exists, void *opaque)
{
    RBDExtents *e = opaque;
    uint64_t s = MAX(off, e->start), t = MIN(off + len, e->end);
    if (!exists || s >= t) {
        return 0;      /* a hole: reads as zeroes */
    }
    if (e->n == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 16;
        void *v = realloc(e->v, cap * sizeof(*e->v));
        if (!v) {
            return -ENOMEM;
        }
        e->v = v;
        e->cap = cap;
    }
    e->v[e->n].off = s;
    e->v[e->n].end = t;
    e->n++;
    return 0;
}

static int rbd_extent_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* R2: DATA where librbd reports existing extents, ZERO elsewhere. */
static int rbd_drv_block_status(BlockDriverState *bs, uint64_t offset,
                                uint64_t bytes, uint64_t *pnum)
{
    BDRVRBDState *s = bs->opaque;
    if (bytes == 0 || !rbd_in_range(bs, offset, bytes)) {
        return -EINVAL;
    }
    uint64_t flags = 0;
    bool whole_object = s->fast_diff && rbd_get_flags(s->image, &flags) == 0 &&
                        !(flags & RBD_FLAG_FAST_DIFF_INVALID);
    RBDExtents e = { .start = offset,
                     .end = offset + MIN(bytes, RBD_STATUS_MAX_BYTES) };
    int r = rbd_diff_iterate2(s->image, NULL, e.start, e.end - e.start, 1,
                              whole_object, rbd_status_cb, &e);
    if (r < 0) {
        free(e.v);
        return r;
    }
    /* The callbacks' order is not promised: sort, then follow the run
     * that starts at offset. */
    if (e.n > 1) {
        qsort(e.v, e.n, sizeof(*e.v), rbd_extent_cmp);
    }
    uint64_t data_end = offset, next_data = e.end;
    for (size_t i = 0; i < e.n; i++) {
        if (e.v[i].off <= data_end) {
            data_end = MAX(data_end, e.v[i].end);
        } else {
            next_data = e.v[i].off;
            break;
        }
    }
    free(e.v);
    if (data_end > offset) {
        *pnum = data_end - offset;
        return BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
    }
    *pnum = next_data - offset;
    return BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED;
}

static void rbd_drv_info(BlockDriverState *bs, struct json_object *data)
{
    BDRVRBDState *s = bs->opaque;
    json_object_object_add(data, "image", json_object_new_string(s->desc));
    json_object_object_add(data, "id", json_object_new_string(s->image_id));
    json_object_object_add(data, "exclusive-lock",
                           json_object_new_boolean(s->locked));
    json_object_object_add(data, "fast-diff",
                           json_object_new_boolean(s->fast_diff));
    rbd_bitmaps_info(bs, data);
}

/* img create: a new image of `size` bytes with the cluster's default
 * features (rbd_create4 with no options), as qemu-img create does. */
static bool rbd_drv_create(const char *filename, uint64_t size,
                           struct json_object *opts, Error **errp)
{
    _cleanup_(rbd_spec_clear) RBDSpec sp = { 0 };
    if (!bdrv_check_create_opts(opts, NULL, 0, "rbd", errp) ||
        !rbd_spec_parse(filename, true, &sp, errp) || !rbd_spec_check(&sp, errp)) {
        return false;
    }
    if (sp.snap) {
        error_setg(errp, "rbd: cannot create a snapshot ('%s'); name an image",
                   filename);
        return false;
    }
    rados_t cluster = NULL;
    rados_ioctx_t io = NULL;
    if (!rbd_spec_connect(&sp, &cluster, &io, errp)) {
        return false;
    }
    rbd_image_options_t o;
    rbd_image_options_create(&o);
    int r = rbd_create4(io, sp.image, size, o);
    rbd_image_options_destroy(o);
    rbd_spec_disconnect(cluster, io);
    if (r < 0) {
        error_setg_errno(errp, -r, "rbd: cannot create image '%s'%s",
                         filename + 4, r == -EEXIST ? " (it exists)" : "");
        return false;
    }
    return true;
}

/* ---- internal snapshots: RBD snapshots of the image ---- */

static bool rbd_snap_check(BDRVRBDState *s, const char *name, bool want,
                           Error **errp)
{
    bool exists = false;
    int r = rbd_snap_exists(s->image, name, &exists);
    if (r < 0) {
        error_setg_errno(errp, -r, "rbd: cannot list the snapshots of '%s'",
                         s->desc);
        return false;
    }
    if (exists != want) {
        error_setg(errp, want ? "Snapshot with name '%s' not found on '%s'"
                              : "Snapshot with name '%s' already exists on '%s'",
                   name, s->desc);
        return false;
    }
    return true;
}

static bool rbd_drv_snapshot_create(BlockDriverState *bs, const char *name,
                                    Error **errp)
{
    BDRVRBDState *s = bs->opaque;
    if (!rbd_snap_check(s, name, false, errp)) {
        return false;
    }
    int r = rbd_snap_create(s->image, name);
    if (r < 0) {
        error_setg_errno(errp, -r, "rbd: cannot create snapshot '%s' of '%s'",
                         name, s->desc);
        return false;
    }
    return true;
}

static bool rbd_drv_snapshot_delete(BlockDriverState *bs, const char *name,
                                    BdrvSnapshotInfo *ret, Error **errp)
{
    BDRVRBDState *s = bs->opaque;
    uint64_t id = 0;
    struct timespec ts = { 0 };
    if (!rbd_snap_check(s, name, true, errp)) {
        return false;
    }
    if (rbd_snap_get_id(s->image, name, &id) == 0) {
        rbd_snap_get_timestamp(s->image, id, &ts);
    }
    *ret = (BdrvSnapshotInfo){ .date_sec = ts.tv_sec, .date_nsec = ts.tv_nsec };
    snprintf(ret->id, sizeof(ret->id), "%" PRIu64, id);
    snprintf(ret->name, sizeof(ret->name), "%s", name);
    int r = rbd_snap_remove(s->image, name);
    if (r < 0) {
        error_setg_errno(errp, -r, "rbd: cannot delete snapshot '%s' of '%s'",
                         name, s->desc);
        return false;
    }
    return true;
}

static int rbd_drv_snapshot_list(BlockDriverState *bs, BdrvSnapshotInfo **ret)
{
    BDRVRBDState *s = bs->opaque;
    int max = 16, n;
    rbd_snap_info_t *snaps = NULL;
    /* rbd_snap_list asks for a bigger array with -ERANGE and max set. */
    for (;;) {
        free(snaps);
        snaps = calloc((size_t)max, sizeof(*snaps));
        if (!snaps) {
            return -ENOMEM;
        }
        n = rbd_snap_list(s->image, snaps, &max);
        if (n != -ERANGE) {
            break;
        }
    }
    if (n < 0) {
        free(snaps);
        return n;
    }
    BdrvSnapshotInfo *out = calloc((size_t)n + 1, sizeof(*out));
    if (!out) {
        rbd_snap_list_end(snaps);
        free(snaps);
        return -ENOMEM;
    }
    for (int i = 0; i < n; i++) {
        struct timespec ts = { 0 };
        rbd_snap_get_timestamp(s->image, snaps[i].id, &ts);
        snprintf(out[i].id, sizeof(out[i].id), "%" PRIu64, snaps[i].id);
        snprintf(out[i].name, sizeof(out[i].name), "%s", snaps[i].name);
        out[i].date_sec = ts.tv_sec;
        out[i].date_nsec = ts.tv_nsec;
    }
    rbd_snap_list_end(snaps);
    free(snaps);
    *ret = out;
    return n;
}

typedef struct RBDChanged {
    BdrvExtentFn *fn;
    void *opaque;
} RBDChanged;

/* Written and removed extents alike differ from the snapshot. */
static int rbd_changed_cb(uint64_t off, size_t len, int exists, void *opaque)
{
    RBDChanged *c = opaque;
    (void)exists;
    return c->fn(c->opaque, off, len) ? 0 : -ENOMEM;
}

/* rbd_diff_iterate2 from the snapshot to the image's head: with a valid
 * fast-diff object map it reads no data (whole objects, a superset). */
static bool rbd_drv_snapshot_changed(BlockDriverState *bs, const char *name,
                                     BdrvExtentFn *fn, void *opaque,
                                     Error **errp)
{
    BDRVRBDState *s = bs->opaque;
    if (!rbd_snap_check(s, name, true, errp)) {
        return false;
    }
    uint64_t flags = 0;
    bool whole_object = s->fast_diff && rbd_get_flags(s->image, &flags) == 0 &&
                        !(flags & RBD_FLAG_FAST_DIFF_INVALID);
    RBDChanged c = { fn, opaque };
    int r = rbd_diff_iterate2(s->image, name, 0, bs->size, 1, whole_object,
                              rbd_changed_cb, &c);
    if (r < 0) {
        error_setg_errno(errp, -r, "rbd: cannot diff '%s' against snapshot "
                         "'%s'", s->desc, name);
        return false;
    }
    return true;
}

/* blockdev-add's members of an rbd node (block.h: open_opts):
 * rbd_parse_options's and the locking option. */
static const JsonOptSpec rbd_open_opts[] = {
    { "filename", JSON_OPT_STR, true },
    { "pool", JSON_OPT_STR, true },
    { "namespace", JSON_OPT_STR, true },
    { "image", JSON_OPT_STR, true },
    { "snapshot", JSON_OPT_STR, true },
    { "conf", JSON_OPT_STR, true },
    { "user", JSON_OPT_STR, true },
    { "locking", JSON_OPT_STR, true, NULL, bdrv_locking_values },
    { NULL },
};

const BlockDriver bdrv_rbd = {
    .format_name = "rbd",
    .instance_size = sizeof(BDRVRBDState),
    .is_protocol = true,
    .open = rbd_drv_open,
    .open_opts = rbd_open_opts,
    .close = rbd_drv_close,
    .getlength = rbd_drv_getlength,
    .preadv = rbd_drv_preadv,
    .pwritev = rbd_drv_pwritev,
    .aio_pwritev = rbd_drv_aio_pwritev,
    .pwrite_zeroes = rbd_drv_pwrite_zeroes,
    .pdiscard = rbd_drv_pdiscard,
    .flush = rbd_drv_flush,
    .block_status = rbd_drv_block_status,
    .info = rbd_drv_info,
    .create = rbd_drv_create,
    .snapshot_create = rbd_drv_snapshot_create,
    .snapshot_delete = rbd_drv_snapshot_delete,
    .snapshot_changed = rbd_drv_snapshot_changed,
    .snapshot_list = rbd_drv_snapshot_list,
    .can_store_persistent_bitmaps = rbd_bitmaps_can_store,
    .persistent_bitmap_add = rbd_bitmaps_add,
    .persistent_bitmap_remove = rbd_bitmaps_remove,
    .store_bitmaps = rbd_bitmaps_store,
    .open_intent_store = rbd_bitmaps_open_intent_store,
};

rados_ioctx_t bdrv_rbd_ioctx(BlockDriverState *bs)
{
    return bs && bs->drv == &bdrv_rbd ? ((BDRVRBDState *)bs->opaque)->io
                                      : NULL;
}

const char *bdrv_rbd_image_id(BlockDriverState *bs)
{
    return bs && bs->drv == &bdrv_rbd ? ((BDRVRBDState *)bs->opaque)->image_id
                                      : NULL;
}

bool bdrv_rbd_holds_lock(BlockDriverState *bs)
{
    return bs && bs->drv == &bdrv_rbd && ((BDRVRBDState *)bs->opaque)->locked;
}

RbdBitmaps **bdrv_rbd_bitmaps_slot(BlockDriverState *bs)
{
    return bs && bs->drv == &bdrv_rbd ? &((BDRVRBDState *)bs->opaque)->bitmaps
                                      : NULL;
}
