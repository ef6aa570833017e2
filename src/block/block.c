/*
 * The block layer core: the node graph, opening nodes from blockdev-add
 * style options, and the generic I/O path every request goes through.
 *
 * The generic write path is where DESIGN.md D1 lives: every write,
 * zero write and discard marks the node's enabled dirty bitmaps before the
 * driver sees it, so a bitmap can never miss a write that reached the disk.
 *
 * Request alignment is handled here and only here: a driver that sets
 * bs->request_alignment > 1 (O_DIRECT files) only ever sees aligned offsets,
 * lengths and buffers.  Unaligned writes become read-modify-write cycles that
 * exclude other writes to the node through bs->rmw_lock.
 *
 * Graph changes (open, close, find) happen on one thread at a time (the
 * daemon's main thread or the CLI); I/O may come from any thread.
 *
 * Backup jobs fix a point in time with drained sections (client writes,
 * bdrv_client_*, wait at their entry, before their dirty bits are set)
 * and see every write before its data lands through I/O hooks, which run
 * after the dirty bitmaps are marked and before the driver.  The write
 * path is therefore: (client: gate,) check, mark bitmaps, hooks,
 * alignment, driver.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/block.h"
#include "block/write-intent.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/iov.h"
#include "util/keyval.h"
#include "util/log.h"
#include "util/osdep.h"

extern const BlockDriver bdrv_file;
extern const BlockDriver bdrv_raw;
extern const BlockDriver bdrv_qbm;
extern const BlockDriver bdrv_nbd;
extern const BlockDriver bdrv_rbd;
extern const BlockDriver bdrv_qcow2;
extern const BlockDriver bdrv_blkdebug;

/* Probing order matters: specific formats first, raw last. */
static const BlockDriver *const drivers[] = {
    &bdrv_qbm,
    &bdrv_qcow2,
    &bdrv_nbd,
    &bdrv_rbd,
    &bdrv_raw,
    &bdrv_file,
    &bdrv_blkdebug,
    NULL,
};

#define BDRV_MAX_BACKING_DEPTH 64
#define BDRV_NODE_NAME_MAX 127

static BlockDriverState *all_nodes;
static unsigned auto_name_counter;
/* Nesting of bdrv_drain_all_begin (main thread only). */
static int drain_all_depth;

const BlockDriver *bdrv_find_format(const char *name)
{
    for (int i = 0; drivers[i]; i++) {
        if (strcmp(drivers[i]->format_name, name) == 0) {
            return drivers[i];
        }
    }
    return NULL;
}

const char *const *bdrv_format_names(void)
{
    static const char *names[ARRAY_SIZE(drivers)];
    for (size_t i = 0; drivers[i]; i++) {
        names[i] = drivers[i]->format_name;
    }
    return names;
}

const char *bdrv_node_label(const BlockDriverState *bs)
{
    return bs->node_name ? bs->node_name : "(anonymous)";
}

BlockDriverState *bdrv_find_node(const char *node_name)
{
    for (BlockDriverState *bs = all_nodes; bs; bs = bs->next_node) {
        if (strcmp(bs->node_name, node_name) == 0) {
            return bs;
        }
    }
    return NULL;
}

BlockDriverState *bdrv_next_node(BlockDriverState *bs)
{
    return bs ? bs->next_node : all_nodes;
}

static bool node_name_is_valid(const char *name)
{
    size_t len = strlen(name);
    if (len == 0 || len > BDRV_NODE_NAME_MAX) {
        return false;
    }
    if (!((name[0] >= 'a' && name[0] <= 'z') || (name[0] >= 'A' && name[0] <= 'Z'))) {
        return false;
    }
    for (size_t i = 1; i < len; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.')) {
            return false;
        }
    }
    return true;
}

static void graph_link(BlockDriverState *bs)
{
    BlockDriverState **p = &all_nodes;
    while (*p) {
        p = &(*p)->next_node;
    }
    bs->next_node = NULL;
    *p = bs;
}

static void graph_unlink(BlockDriverState *bs)
{
    for (BlockDriverState **p = &all_nodes; *p; p = &(*p)->next_node) {
        if (*p == bs) {
            *p = bs->next_node;
            return;
        }
    }
}

/* A power of two in [min, max], as a JSON integer or a decimal string. */
static bool opt_pow2(struct json_object *opts, const char *key, uint64_t def,
                     uint64_t min, uint64_t max, uint64_t *ret, Error **errp)
{
    struct json_object *v;
    uint64_t val;
    *ret = def;
    if (!json_object_object_get_ex(opts, key, &v) || !v) {
        return true;
    }
    if (json_object_is_type(v, json_type_int)) {
        int64_t i = json_object_get_int64(v);
        val = i < 0 ? 0 : (uint64_t)i;
    } else if (json_object_is_type(v, json_type_string)) {
        const char *s = json_object_get_string(v);
        char *end;
        errno = 0;
        val = strtoull(s, &end, 10);
        if (!*s || *end || errno) {
            val = 0;
        }
    } else {
        val = 0;
    }
    if (val < min || val > max || (val & (val - 1))) {
        error_setg(errp, "Parameter '%s' expects a power of two between %llu "
                   "and %llu", key, (unsigned long long)min,
                   (unsigned long long)max);
        return false;
    }
    *ret = val;
    return true;
}

bool bdrv_opt_bool(struct json_object *opts, const char *key, bool def,
                   bool *ret, Error **errp)
{
    if (keyval_member_bool(opts, key, def, ret)) {
        return true;
    }
    error_setg(errp, "Parameter '%s' expects 'on' or 'off'", key);
    return false;
}

bool bdrv_opt_locking(struct json_object *opts, bool def, bool *ret_on,
                      Error **errp)
{
    struct json_object *v;
    *ret_on = def;
    if (!json_object_object_get_ex(opts, "locking", &v) || !v) {
        return true;
    }
    const char *s = json_object_is_type(v, json_type_string)
                    ? json_object_get_string(v) : "";
    if (!strcmp(s, "on") || !strcmp(s, "auto")) {
        *ret_on = true;
    } else if (!strcmp(s, "off")) {
        *ret_on = false;
    } else {
        error_setg(errp, "Parameter 'locking' expects 'on', 'off' or 'auto'");
        return false;
    }
    return true;
}

bool bdrv_opt_enum(struct json_object *opts, const char *key,
                   const char *const *values, const char *def,
                   const char **ret, Error **errp)
{
    struct json_object *v;
    *ret = def;
    if (!json_object_object_get_ex(opts, key, &v) || !v) {
        return true;
    }
    const char *s = json_object_is_type(v, json_type_string)
                    ? json_object_get_string(v) : NULL;
    for (size_t i = 0; s && values[i]; i++) {
        if (!strcmp(s, values[i])) {
            *ret = values[i];
            return true;
        }
    }
    if (!s) {
        error_setg(errp, "Invalid parameter type for '%s', expected: string",
                   key);
    } else {
        error_setg(errp, "Parameter '%s' does not accept value '%s'", key, s);
    }
    return false;
}

bool bdrv_opt_uint(struct json_object *opts, const char *key, uint64_t def,
                   uint64_t max, uint64_t *ret, Error **errp)
{
    struct json_object *v;
    int64_t i = -1;
    *ret = def;
    if (!json_object_object_get_ex(opts, key, &v) || !v) {
        return true;
    }
    if (json_object_is_type(v, json_type_int)) {
        i = json_object_get_int64(v);
    } else if (!json_object_is_type(v, json_type_string) ||
               !keyval_str_to_int(json_object_get_string(v), &i)) {
        i = -1;
    }
    if (i < 0 || (uint64_t)i > max) {
        error_setg(errp, "Parameter '%s' expects an integer between 0 and "
                   "%llu", key, (unsigned long long)max);
        return false;
    }
    *ret = (uint64_t)i;
    return true;
}

static void bdrv_free(BlockDriverState *bs)
{
    if (!bs) {
        return;
    }
    free(bs->opaque);
    free(bs->node_name);
    free(bs->filename);
    free(bs->backing_file);
    free(bs->backing_format);
    pthread_mutex_destroy(&bs->lock);
    pthread_rwlock_destroy(&bs->rmw_lock);
    pthread_mutex_destroy(&bs->drain_lock);
    pthread_cond_destroy(&bs->drain_cond);
    pthread_rwlock_destroy(&bs->hooks_lock);
    free(bs);
}

static BlockDriverState *bdrv_new(const BlockDriver *drv)
{
    BlockDriverState *bs = calloc(1, sizeof(*bs));
    if (!bs) {
        return NULL;
    }
    bs->drv = drv;
    bs->refcnt = 1;
    bs->request_alignment = 1;
    pthread_mutex_init(&bs->lock, NULL);
    pthread_rwlock_init(&bs->rmw_lock, NULL);
    pthread_mutex_init(&bs->drain_lock, NULL);
    pthread_cond_init(&bs->drain_cond, NULL);
    /* Hooks may issue nested requests that take the lock shared again
     * while a remover waits: readers must win (glibc's default, made
     * explicit). */
    pthread_rwlockattr_t hattr;
    pthread_rwlockattr_init(&hattr);
    pthread_rwlockattr_setkind_np(&hattr, PTHREAD_RWLOCK_PREFER_READER_NP);
    pthread_rwlock_init(&bs->hooks_lock, &hattr);
    pthread_rwlockattr_destroy(&hattr);
    /* A node opened inside a drained section starts drained, so that
     * bdrv_drain_all_end() leaves every node's counter at zero. */
    bs->quiesce_counter = drain_all_depth;
    if (drv->instance_size) {
        bs->opaque = calloc(1, drv->instance_size);
        if (!bs->opaque) {
            bdrv_free(bs);
            return NULL;
        }
    }
    return bs;
}

static BlockDriverState *open_child(struct json_object *ref, int flags, int depth,
                                    Error **errp);
static BlockDriverState *open_options_depth(struct json_object *options, int flags,
                                            int depth, Error **errp);

BlockDriverState *bdrv_open_options(struct json_object *options, int flags,
                                    Error **errp)
{
    BlockDriverState *bs = open_options_depth(options, flags, 0, errp);
    if (bs) {
        bs->user_owned = true;
    }
    return bs;
}

bool bdrv_filename_is_rbd(const char *filename)
{
    return strncmp(filename, "rbd:", 4) == 0;
}

/* The protocol driver a user-given filename opens with: "rbd" for an RBD
 * name, else "file". */
static const char *filename_protocol(const char *filename)
{
    return bdrv_filename_is_rbd(filename) ? "rbd" : "file";
}

static BlockDriverState *open_options_depth(struct json_object *options, int flags,
                                            int depth, Error **errp)
{
    if (!json_object_is_type(options, json_type_object)) {
        error_setg(errp, "block options must be a JSON object");
        return NULL;
    }
    if (depth > BDRV_MAX_BACKING_DEPTH) {
        error_setg(errp, "block graph is nested more than %d levels deep "
                   "(a cyclic backing chain?)", BDRV_MAX_BACKING_DEPTH);
        return NULL;
    }
    struct json_object *v;
    if (!json_object_object_get_ex(options, "driver", &v) ||
        !json_object_is_type(v, json_type_string)) {
        error_setg(errp, "Parameter 'driver' is missing");
        return NULL;
    }
    const char *drvname = json_object_get_string(v);
    const BlockDriver *drv = bdrv_find_format(drvname);
    if (!drv) {
        error_setg(errp, "Unknown driver '%s'", drvname);
        return NULL;
    }

    const char *node_name = NULL;
    if (json_object_object_get_ex(options, "node-name", &v) && v) {
        if (!json_object_is_type(v, json_type_string)) {
            error_setg(errp, "Parameter 'node-name' expects a string");
            return NULL;
        }
        node_name = json_object_get_string(v);
        if (!node_name_is_valid(node_name)) {
            error_setg(errp, "Invalid node-name: '%s'", node_name);
            return NULL;
        }
        if (bdrv_find_node(node_name)) {
            error_setg(errp, "Duplicate nodes with node-name='%s'", node_name);
            return NULL;
        }
    }

    bool ro, crash_safe, force_share;
    uint64_t region;
    if (!bdrv_opt_bool(options, "read-only", !(flags & BDRV_O_RDWR), &ro, errp) ||
        !bdrv_opt_bool(options, "force-share", (flags & BDRV_O_FORCE_SHARE) != 0,
                  &force_share, errp) ||
        !bdrv_opt_bool(options, "crash-safe", true, &crash_safe, errp) ||
        !opt_pow2(options, "crash-safe-region-size",
                  1ull << WIL_DEFAULT_REGION_SHIFT, 1ull << WIL_MIN_REGION_SHIFT,
                  1ull << WIL_MAX_REGION_SHIFT, &region, errp)) {
        return NULL;
    }
    /* "crash-safe*" are the block layer's (write-intent.h): drivers do not
     * see them. */
    _cleanup_json_ struct json_object *drv_options = NULL;
    if (json_object_object_get_ex(options, "crash-safe", NULL) ||
        json_object_object_get_ex(options, "crash-safe-region-size", NULL)) {
        if (json_object_deep_copy(options, &drv_options, NULL) < 0) {
            error_setg(errp, "out of memory");
            return NULL;
        }
        json_object_object_del(drv_options, "crash-safe");
        json_object_object_del(drv_options, "crash-safe-region-size");
        options = drv_options;
    }
    if (force_share && !ro) {
        error_setg(errp, "force-share=on can only be used with read-only images");
        return NULL;
    }
    flags = ro ? (flags & ~BDRV_O_RDWR) : (flags | BDRV_O_RDWR);
    flags = force_share ? (flags | BDRV_O_FORCE_SHARE)
                        : (flags & ~BDRV_O_FORCE_SHARE);
    struct json_object *cache;
    if (json_object_object_get_ex(options, "cache", &cache) && cache) {
        bool direct, no_flush;
        if (!bdrv_opt_bool(cache, "direct", false, &direct, errp) ||
            !bdrv_opt_bool(cache, "no-flush", false, &no_flush, errp)) {
            return NULL;
        }
        if (no_flush) {
            error_setg(errp, "cache.no-flush=on is not supported: bitback "
                       "never drops a flush");
            return NULL;
        }
        if (direct) {
            flags |= BDRV_O_NOCACHE;
        }
    }
    /* QEMU's members libvirt sends (docs/qmp.md, blockdev-add). */
    const char *discard, *detect_zeroes;
    bool auto_ro;
    if (!bdrv_opt_enum(options, "discard", bdrv_discard_values, "unmap",
                       &discard, errp) ||
        !bdrv_opt_enum(options, "detect-zeroes", bdrv_detect_zeroes_values,
                       "off", &detect_zeroes, errp) ||
        !bdrv_opt_bool(options, "auto-read-only", false, &auto_ro, errp)) {
        return NULL;
    }
    if (strcmp(detect_zeroes, "off")) {
        error_setg(errp, "detect-zeroes '%s' is not supported (only 'off')",
                   detect_zeroes);
        return NULL;
    }

    BlockDriverState *bs = bdrv_new(drv);
    if (!bs) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    bs->read_only = ro;
    bs->discard_ignore = !strcmp(discard, "ignore");
    bs->crash_safe = crash_safe;
    bs->wil_region_shift = (unsigned)__builtin_ctzll(region);
    bs->open_flags = flags;
    if (node_name) {
        bs->node_name = strdup(node_name);
    } else {
        if (asprintf(&bs->node_name, "#block%03u", auto_name_counter++) < 0) {
            bs->node_name = NULL;
        }
        bs->auto_node_name = true;
    }

    if (!drv->is_protocol) {
        const char *child_key = drv->child_key ? drv->child_key : "file";
        struct json_object *file = NULL;
        _cleanup_json_ struct json_object *shorthand = NULL;
        if (!json_object_object_get_ex(options, child_key, &file) || !file) {
            if (json_object_object_get_ex(options, "filename", &v) &&
                json_object_is_type(v, json_type_string)) {
                shorthand = json_object_new_object();
                json_object_object_add(shorthand, "driver", json_object_new_string(
                    filename_protocol(json_object_get_string(v))));
                json_object_object_add(shorthand, "filename", json_object_get(v));
                file = shorthand;
            } else {
                error_setg(errp, "Parameter '%s' is missing", child_key);
                goto fail;
            }
        }
        bs->file = open_child(file, flags & ~BDRV_O_NO_BACKING, depth + 1, errp);
        if (!bs->file) {
            error_prepend(errp, "%s: ", drvname);
            goto fail;
        }
        if (bs->file->filename) {
            bs->filename = strdup(bs->file->filename);
        }
        bs->locking = bs->file->locking;
    } else if (json_object_object_get_ex(options, "filename", &v) &&
               json_object_is_type(v, json_type_string)) {
        bs->filename = strdup(json_object_get_string(v));
    }

    /* Tell bdrv_open_backing how deep we are, through the driver's open. */
    bs->open_depth = depth;
    if (!drv->open(bs, options, flags, errp)) {
        goto fail;
    }
    int64_t len = drv->getlength(bs);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "cannot get the length of '%s'",
                         bs->filename ? bs->filename : bs->node_name);
        if (drv->close) {
            drv->close(bs);
        }
        goto fail;
    }
    bs->size = (uint64_t)len;
    if (!write_intent_open(bs, errp)) {
        if (drv->close) {
            drv->close(bs);
        }
        goto fail;
    }
    graph_link(bs);
    return bs;

fail:
    bdrv_release_all_dirty_bitmaps(bs);
    if (bs->backing) {
        bdrv_unref(bs->backing);
    }
    if (bs->file) {
        bdrv_unref(bs->file);
    }
    bdrv_free(bs);
    return NULL;
}

/* A child reference: a node name (string) or options (object). */
static BlockDriverState *open_child(struct json_object *ref, int flags, int depth,
                                    Error **errp)
{
    if (json_object_is_type(ref, json_type_string)) {
        const char *name = json_object_get_string(ref);
        BlockDriverState *bs = bdrv_find_node(name);
        if (!bs) {
            error_set(errp, ERROR_CLASS_DEVICE_NOT_FOUND,
                      "Cannot find device='' nor node-name='%s'", name);
            return NULL;
        }
        if ((flags & BDRV_O_RDWR) && bs->read_only) {
            error_setg(errp, "Node '%s' is read-only", name);
            return NULL;
        }
        bdrv_ref(bs);
        return bs;
    }
    return open_options_depth(ref, flags, depth, errp);
}

BlockDriverState *bdrv_open_child(BlockDriverState *parent,
                                  struct json_object *ref, int flags,
                                  Error **errp)
{
    return open_child(ref, flags, parent->open_depth + 1, errp);
}

static int probe_format(const char *filename, const BlockDriver **ret_drv,
                        Error **errp)
{
    uint8_t buf[4096];
    /* As the file driver will: a FIFO is refused, not waited on. */
    _cleanup_close_ int fd = open_checked(filename, O_RDONLY, 0, OPEN_BLOCKDEV,
                                          errp);
    if (fd < 0) {
        return -1;
    }
    ssize_t n = pread(fd, buf, sizeof(buf), 0);
    if (n < 0) {
        error_setg_errno(errp, errno, "Could not read '%s'", filename);
        return -1;
    }
    int best = 0;
    const BlockDriver *best_drv = &bdrv_raw;
    for (int i = 0; drivers[i]; i++) {
        if (drivers[i]->probe && !drivers[i]->is_protocol) {
            int score = drivers[i]->probe(buf, (size_t)n, filename);
            if (score > best) {
                best = score;
                best_drv = drivers[i];
            }
        }
    }
    *ret_drv = best_drv;
    return 0;
}

static struct json_object *image_options(const char *filename, const char *format,
                                         const char *protocol)
{
    struct json_object *file = json_object_new_object();
    json_object_object_add(file, "driver", json_object_new_string(protocol));
    json_object_object_add(file, "filename", json_object_new_string(filename));
    struct json_object *opts = json_object_new_object();
    json_object_object_add(opts, "driver", json_object_new_string(format));
    json_object_object_add(opts, "file", file);
    return opts;
}

bool bdrv_filename_is_nbd_uri(const char *filename)
{
    static const char *const schemes[] = {
        "nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://",
        "nbds+vsock://",
    };
    for (size_t i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++) {
        if (strncmp(filename, schemes[i], strlen(schemes[i])) == 0) {
            return true;
        }
    }
    return false;
}

static BlockDriverState *open_image_depth(const char *filename, const char *format,
                                          int flags, int depth, Error **errp)
{
    if (bdrv_filename_is_nbd_uri(filename)) {
        /* An NBD export: raw data over the nbd protocol node, as QEMU
         * opens "nbd+unix:///x?socket=..." filenames. */
        if (format && strcmp(format, "raw") != 0 && strcmp(format, "nbd") != 0) {
            error_setg(errp, "Format '%s' over an NBD URI is not supported; "
                       "use raw", format);
            return NULL;
        }
        _cleanup_json_ struct json_object *opts = json_object_new_object();
        json_object_object_add(opts, "driver", json_object_new_string("nbd"));
        json_object_object_add(opts, "filename", json_object_new_string(filename));
        return open_options_depth(opts, flags, depth, errp);
    }
    if (!format) {
        const BlockDriver *drv;
        if (probe_format(filename, &drv, errp) < 0) {
            return NULL;
        }
        format = drv->format_name;
    } else {
        const BlockDriver *drv = bdrv_find_format(format);
        if (!drv) {
            error_setg(errp, "Unknown driver '%s'", format);
            return NULL;
        }
        if (drv->is_protocol) {
            /* -f file: the protocol node itself. */
            _cleanup_json_ struct json_object *opts = json_object_new_object();
            json_object_object_add(opts, "driver", json_object_new_string(format));
            json_object_object_add(opts, "filename", json_object_new_string(filename));
            return open_options_depth(opts, flags, depth, errp);
        }
    }
    _cleanup_json_ struct json_object *opts = image_options(filename, format,
                                                            "file");
    return open_options_depth(opts, flags, depth, errp);
}

/* An RBD image the user named (bdrv_open_image): a format node (raw
 * unless format says otherwise: nothing is probed) over an rbd node, or
 * the rbd node itself with format "rbd". */
static BlockDriverState *open_rbd_image(const char *filename, const char *format,
                                        int flags, Error **errp)
{
    const BlockDriver *drv = bdrv_find_format(format ? format : "raw");
    if (!drv) {
        error_setg(errp, "Unknown driver '%s'", format);
        return NULL;
    }
    _cleanup_json_ struct json_object *opts = NULL;
    if (drv->is_protocol) {
        if (strcmp(format, "rbd") != 0) {
            error_setg(errp, "Protocol '%s' cannot open the rbd image '%s'",
                       format, filename);
            return NULL;
        }
        opts = json_object_new_object();
        json_object_object_add(opts, "driver", json_object_new_string("rbd"));
        json_object_object_add(opts, "filename", json_object_new_string(filename));
    } else {
        opts = image_options(filename, drv->format_name, "rbd");
    }
    return open_options_depth(opts, flags, 0, errp);
}

BlockDriverState *bdrv_open_image(const char *filename, const char *format,
                                  int flags, Error **errp)
{
    /* Only a name the user gave opens an RBD image: the backing file names
     * images record go through open_image_depth, which never does
     * (DESIGN.md invariant 6). */
    BlockDriverState *bs = bdrv_filename_is_rbd(filename)
        ? open_rbd_image(filename, format, flags, errp)
        : open_image_depth(filename, format, flags, 0, errp);
    if (bs) {
        bs->user_owned = true;
    }
    return bs;
}

bool bdrv_open_backing(BlockDriverState *bs, struct json_object *options,
                       const char *backing_name, const char *backing_fmt,
                       Error **errp)
{
    struct json_object *v = NULL;
    int depth = bs->open_depth + 1;

    if (backing_name && *backing_name) {
        free(bs->backing_file);
        free(bs->backing_format);
        bs->backing_file = strdup(backing_name);
        bs->backing_format = backing_fmt ? strdup(backing_fmt) : NULL;
        if (!bs->backing_file || (backing_fmt && !bs->backing_format)) {
            error_setg(errp, "out of memory");
            return false;
        }
    }
    if (options && json_object_object_get_ex(options, "backing", &v)) {
        if (!v) {
            return true;   /* "backing": null: no backing file */
        }
        bs->backing = open_child(v, bs->open_flags & ~BDRV_O_RDWR, depth, errp);
        if (!bs->backing) {
            error_prepend(errp, "Could not open backing of '%s': ", bs->node_name);
            return false;
        }
        return true;
    }
    if (!backing_name || !*backing_name || (bs->open_flags & BDRV_O_NO_BACKING)) {
        return true;
    }
    _cleanup_free_ char *dir = path_dirname(bs->filename ? bs->filename : ".");
    _cleanup_free_ char *path = path_join(dir, backing_name);
    if (!dir || !path) {
        error_setg(errp, "out of memory");
        return false;
    }
    bs->backing = open_image_depth(path, backing_fmt,
                                   bs->open_flags & ~(BDRV_O_RDWR | BDRV_O_NO_BACKING),
                                   depth, errp);
    if (!bs->backing) {
        error_prepend(errp, "Could not open backing file '%s': ", backing_name);
        return false;
    }
    return true;
}

bool bdrv_set_backing(BlockDriverState *bs, BlockDriverState *backing,
                      Error **errp)
{
    int depth = 1;

    if (!bs->drv->supports_backing) {
        error_setg(errp, "'%s' (%s) cannot have a backing node", bs->node_name,
                   bs->drv->format_name);
        return false;
    }
    if (bs->backing) {
        error_setg(errp, "'%s' already has a backing node", bs->node_name);
        return false;
    }
    for (BlockDriverState *b = backing; b; b = b->backing) {
        if (b == bs) {
            error_setg(errp, "'%s' cannot be the backing of '%s': it would "
                       "make a loop", backing->node_name, bs->node_name);
            return false;
        }
        if (++depth > BDRV_MAX_BACKING_DEPTH) {
            error_setg(errp, "a backing chain under '%s' would be more than "
                       "%d levels deep", bs->node_name, BDRV_MAX_BACKING_DEPTH);
            return false;
        }
    }
    bdrv_ref(backing);
    bs->backing = backing;
    if (bs->drv->backing_attached && !bs->drv->backing_attached(bs, errp)) {
        bs->backing = NULL;
        bdrv_unref(backing);
        return false;
    }
    return true;
}

void bdrv_ref(BlockDriverState *bs)
{
    __atomic_add_fetch(&bs->refcnt, 1, __ATOMIC_SEQ_CST);
}

static bool bdrv_do_close(BlockDriverState *bs, Error **errp)
{
    bool ok = true;
    write_intent_close_begin(bs);
    if (!bs->read_only && bs->drv->store_bitmaps) {
        Error *err = NULL;
        if (!bs->drv->store_bitmaps(bs, &err)) {
            error_prepend(&err, "Failed to store persistent bitmaps of '%s': ",
                          bs->node_name);
            error_propagate(errp, err);
            ok = false;
        }
    }
    /* W7 (write-intent.md): the log goes inactive only once the
     * format holds the bitmaps. */
    write_intent_close_end(bs, ok);
    if (bs->drv->close) {
        bs->drv->close(bs);
    }
    bdrv_release_all_dirty_bitmaps(bs);
    graph_unlink(bs);
    if (bs->backing) {
        bdrv_unref(bs->backing);
    }
    if (bs->file) {
        bdrv_unref(bs->file);
    }
    bdrv_free(bs);
    return ok;
}

void bdrv_unref(BlockDriverState *bs)
{
    if (!bs) {
        return;
    }
    if (__atomic_sub_fetch(&bs->refcnt, 1, __ATOMIC_SEQ_CST) == 0) {
        Error *err = NULL;
        if (!bdrv_do_close(bs, &err)) {
            log_msg(LOG_LEVEL_ERR, "%s", error_get_pretty(err));
            error_free(err);
        }
    }
}

bool bdrv_close(BlockDriverState *bs, Error **errp)
{
    if (!bs) {
        return true;
    }
    if (__atomic_sub_fetch(&bs->refcnt, 1, __ATOMIC_SEQ_CST) == 0) {
        return bdrv_do_close(bs, errp);
    }
    return true;
}

uint64_t bdrv_get_cluster_size(BlockDriverState *bs)
{
    return bs->drv->get_cluster_size ? bs->drv->get_cluster_size(bs) : 0;
}

int64_t bdrv_getlength(BlockDriverState *bs)
{
    return (int64_t)__atomic_load_n(&bs->size, __ATOMIC_RELAXED);
}

int64_t bdrv_refresh_length(BlockDriverState *bs)
{
    int64_t len = bs->drv->getlength(bs);
    if (len >= 0) {
        __atomic_store_n(&bs->size, (uint64_t)len, __ATOMIC_RELAXED);
    }
    return len;
}

/* ---- block_resize ---- */

bool bdrv_truncate_child(BlockDriverState *bs, uint64_t size, Error **errp)
{
    if (!bs->drv->truncate) {
        error_setg(errp, "Driver '%s' does not support resize",
                   bs->drv->format_name);
        return false;
    }
    if (!bs->drv->truncate(bs, size, errp)) {
        return false;
    }
    int64_t len = bdrv_refresh_length(bs);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "Cannot get the new size of node "
                         "'%s'", bs->node_name);
        return false;
    }
    Error *err = NULL;
    if (!bdrv_dirty_bitmaps_truncate(bs, (uint64_t)len, &err)) {
        /* The image changed but its bitmaps could not: say so on each
         * rather than let them claim what they do not know (D2). */
        for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
            bdrv_dirty_bitmap_set_inconsistent(bm, "not resized with its "
                                               "node");
        }
        error_propagate(errp, err);
        return false;
    }
    /* After the bitmaps: an active log is rewritten for the new size with
     * a snapshot of them (write-intent.md, W11). */
    return write_intent_resize(bs, (uint64_t)len, errp);
}

/* As QEMU (qcow2_truncate_bitmaps_check): every bitmap on bs or the
 * children a resize of bs reaches is resized in memory, and a persistent
 * one is stored at its new size by its driver, so none may be busy (a
 * job's) or inconsistent (its driver keeps such an entry as it found it,
 * sized for the old length). */
static bool truncate_check_bitmaps(BlockDriverState *bs, Error **errp)
{
    for (BlockDriverState *n = bs; n; n = n->file) {
        LOCK_GUARD(&n->lock);
        for (BdrvDirtyBitmap *bm = n->dirty_bitmaps; bm; bm = bm->next) {
            if (!bdrv_dirty_bitmap_check(bm, BDRV_BITMAP_DEFAULT |
                                         BDRV_BITMAP_ALLOW_RO, errp)) {
                error_prepend(errp, "Cannot resize node '%s': ",
                              n->node_name);
                return false;
            }
        }
    }
    return true;
}

bool bdrv_truncate(BlockDriverState *bs, uint64_t size, Error **errp)
{
    if (size > BDRV_MAX_LENGTH) {
        error_setg(errp, "Image size too large (at most %llu bytes)",
                   (unsigned long long)BDRV_MAX_LENGTH);
        return false;
    }
    if (bs->read_only) {
        error_setg(errp, "Image is read-only");
        return false;
    }
    if (bs->job_blocker) {
        error_setg(errp, "Node '%s' is busy: block device is in use by block "
                   "job: %s", bs->node_name, bs->job_blocker);
        return false;
    }
    for (BlockDriverState *p = all_nodes; p; p = p->next_node) {
        if (p->file == bs || p->backing == bs) {
            error_setg(errp, "Node '%s' is a child of node '%s': resize "
                       "that one", bs->node_name, p->node_name);
            return false;
        }
    }
    if (!bs->drv->truncate) {
        error_setg(errp, "Driver '%s' does not support resize",
                   bs->drv->format_name);
        return false;
    }
    if (!truncate_check_bitmaps(bs, errp)) {
        return false;
    }
    bdrv_drain_all_begin();
    bool ok = bdrv_truncate_child(bs, size, errp);
    bdrv_drain_all_end();
    return ok;
}

/* ---- the I/O path ---- */

/* Validate a request.  Data transfers are limited to BDRV_MAX_REQUEST bytes;
 * zero writes and discards carry no payload and may be larger. */
/* Does bs grow on writes past its end: a protocol node, or a filter
 * over one (blkdebug under a qcow2)? */
static bool node_grows(BlockDriverState *bs)
{
    while (bs->drv->is_filter && bs->file) {
        bs = bs->file;
    }
    return bs->drv->is_protocol;
}

static int check_request(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                         bool write, bool has_payload)
{
    if (has_payload && bytes > BDRV_MAX_REQUEST) {
        return -EINVAL;
    }
    if (offset > BDRV_MAX_LENGTH || bytes > BDRV_MAX_LENGTH - offset) {
        return -EINVAL;
    }
    if (write && bs->read_only) {
        return -EPERM;
    }
    /* Protocol nodes grow on writes past the end (qcow2 appends clusters). */
    if (!(write && node_grows(bs)) && offset + bytes > (uint64_t)bdrv_getlength(bs)) {
        return -EINVAL;
    }
    return 0;
}

/* I/O errors a failing disk repeats for every request: at most
 * BDRV_IO_ERROR_LOG_BURST lines per BDRV_IO_ERROR_LOG_SEC over all nodes. */
#define BDRV_IO_ERROR_LOG_SEC   10
#define BDRV_IO_ERROR_LOG_BURST 20
static LogRatelimit io_error_rl =
    LOG_RATELIMIT_INIT(BDRV_IO_ERROR_LOG_SEC, BDRV_IO_ERROR_LOG_BURST);

/* Log a failed request (the driver's error, not a refused one): the only
 * line the data path writes, and only on failure, rate-limited. */
static void bdrv_log_io_error(BlockDriverState *bs, const char *what,
                              uint64_t offset, uint64_t bytes, int r)
{
    log_msg_ratelimited(&io_error_rl, LOG_LEVEL_WARNING,
                        "I/O error on node '%s': %s offset %llu length %llu: "
                        "%s (errno %d)",
                        bdrv_node_label(bs), what,
                        (unsigned long long)offset, (unsigned long long)bytes,
                        strerror(-r), -r);
}

static void note_growth(BlockDriverState *bs, uint64_t end)
{
    uint64_t cur = __atomic_load_n(&bs->size, __ATOMIC_RELAXED);
    while (end > cur &&
           !__atomic_compare_exchange_n(&bs->size, &cur, end, false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
}

static bool iov_is_aligned(const struct iovec *iov, int niov, uint32_t align)
{
    for (int i = 0; i < niov; i++) {
        if (((uintptr_t)iov[i].iov_base | iov[i].iov_len) & (align - 1)) {
            return false;
        }
    }
    return true;
}

static void *aligned_alloc_bytes(uint32_t align, uint64_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, MAX(align, sizeof(void *)), bytes) != 0) {
        return NULL;
    }
    return p;
}

/* ---- drained sections and I/O hooks ----
 *
 * Gate protocol for client requests (bdrv_client_*; all on SEQ_CST
 * atomics, so the two sides cannot both miss each other):
 *   client:   in_flight++; if quiesce_counter > 0: in_flight--, wake the
 *             drainer, sleep until quiesce_counter == 0, start over
 *   drainer:  quiesce_counter++ on every node; then per node sleep until
 *             in_flight == 0
 * A client request that saw quiesce_counter == 0 is counted before the
 * drainer reads in_flight, so the drainer waits for it; one that arrives
 * later sees the counter and waits.  The fast path costs one atomic
 * increment, one load and one decrement; drain_lock is only taken while a
 * drain is going on.  Requests made with bdrv_* (drivers, hooks, jobs, the
 * monitor) are never gated: which kind a request is, is said by the
 * function its caller chose, not by the calling thread.
 */
static void drain_wake(BlockDriverState *bs)
{
    pthread_mutex_lock(&bs->drain_lock);
    pthread_cond_broadcast(&bs->drain_cond);
    pthread_mutex_unlock(&bs->drain_lock);
}

/* Enter a client request: wait while bs is drained, then count it in
 * bs->in_flight (client_leave uncounts it). */
static void client_enter(BlockDriverState *bs)
{
    for (;;) {
        __atomic_add_fetch(&bs->in_flight, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&bs->quiesce_counter, __ATOMIC_SEQ_CST) == 0) {
            return;
        }
        pthread_mutex_lock(&bs->drain_lock);
        __atomic_sub_fetch(&bs->in_flight, 1, __ATOMIC_SEQ_CST);
        pthread_cond_broadcast(&bs->drain_cond);
        while (__atomic_load_n(&bs->quiesce_counter, __ATOMIC_SEQ_CST) > 0) {
            pthread_cond_wait(&bs->drain_cond, &bs->drain_lock);
        }
        pthread_mutex_unlock(&bs->drain_lock);
    }
}

static int client_leave(BlockDriverState *bs, int r)
{
    if (__atomic_sub_fetch(&bs->in_flight, 1, __ATOMIC_SEQ_CST) == 0 &&
        __atomic_load_n(&bs->quiesce_counter, __ATOMIC_SEQ_CST) > 0) {
        drain_wake(bs);
    }
    return r;
}

void bdrv_drain_all_begin(void)
{
    /* Every node, children included, is on the all_nodes list: graph_link
     * runs for each node open_options_depth creates, whether it is opened
     * by the user or as a file/backing child. */
    drain_all_depth++;
    for (BlockDriverState *bs = all_nodes; bs; bs = bs->next_node) {
        pthread_mutex_lock(&bs->drain_lock);
        __atomic_add_fetch(&bs->quiesce_counter, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&bs->drain_lock);
    }
    for (BlockDriverState *bs = all_nodes; bs; bs = bs->next_node) {
        pthread_mutex_lock(&bs->drain_lock);
        while (__atomic_load_n(&bs->in_flight, __ATOMIC_SEQ_CST) > 0) {
            pthread_cond_wait(&bs->drain_cond, &bs->drain_lock);
        }
        pthread_mutex_unlock(&bs->drain_lock);
    }
}

void bdrv_drain_all_end(void)
{
    if (drain_all_depth == 0) {
        return;    /* unbalanced: nothing to end */
    }
    drain_all_depth--;
    for (BlockDriverState *bs = all_nodes; bs; bs = bs->next_node) {
        pthread_mutex_lock(&bs->drain_lock);
        if (__atomic_load_n(&bs->quiesce_counter, __ATOMIC_SEQ_CST) > 0 &&
            __atomic_sub_fetch(&bs->quiesce_counter, 1, __ATOMIC_SEQ_CST) == 0) {
            pthread_cond_broadcast(&bs->drain_cond);
        }
        pthread_mutex_unlock(&bs->drain_lock);
    }
}

void bdrv_add_io_hook(BlockDriverState *bs, BdrvIoHook *hook)
{
    pthread_rwlock_wrlock(&bs->hooks_lock);
    hook->next = NULL;
    BdrvIoHook **p = &bs->hooks;
    while (*p) {
        p = &(*p)->next;
    }
    __atomic_store_n(p, hook, __ATOMIC_RELEASE);
    pthread_rwlock_unlock(&bs->hooks_lock);
}

void bdrv_remove_io_hook(BlockDriverState *bs, BdrvIoHook *hook)
{
    /* Exclusive: waits until no request is inside a hook of this node. */
    pthread_rwlock_wrlock(&bs->hooks_lock);
    for (BdrvIoHook **p = &bs->hooks; *p; p = &(*p)->next) {
        if (*p == hook) {
            __atomic_store_n(p, hook->next, __ATOMIC_RELEASE);
            hook->next = NULL;
            break;
        }
    }
    pthread_rwlock_unlock(&bs->hooks_lock);
}

bool bdrv_chain_contains(BlockDriverState *bs, BlockDriverState *base)
{
    for (int depth = 0; bs && depth <= BDRV_MAX_BACKING_DEPTH; depth++) {
        if (bs == base) {
            return true;
        }
        bs = bs->backing;
    }
    return false;
}

/* ---- internal snapshots ---- */

/* The node whose driver keeps bs's internal snapshots: bs, or through raw
 * (which maps offsets 1:1) and filters, its file child.  NULL with QEMU's
 * message when none has them. */
static BlockDriverState *snapshot_node(BlockDriverState *bs, Error **errp)
{
    BlockDriverState *b = bs;
    while (!b->drv->snapshot_create && b->file &&
           (b->drv->is_filter || b->drv == &bdrv_raw)) {
        b = b->file;
    }
    if (!b->drv->snapshot_create) {
        error_setg(errp, "Block format '%s' used by device '%s' does not "
                   "support internal snapshots", bs->drv->format_name,
                   bs->node_name);
        return NULL;
    }
    return b;
}

static bool snapshot_name_ok(const char *name, Error **errp)
{
    if (!name || !*name) {
        error_setg(errp, "Name can't be empty");
        return false;
    }
    if (strlen(name) >= sizeof(((BdrvSnapshotInfo *)0)->name)) {
        error_setg(errp, "Snapshot name '%.32s...' is too long", name);
        return false;
    }
    return true;
}

/* snapshot_node() for a change of snapshot `name`: refused on read-only
 * nodes. */
static BlockDriverState *snapshot_node_rw(BlockDriverState *bs,
                                          const char *name, Error **errp)
{
    BlockDriverState *b = snapshot_node(bs, errp);
    if (!b || !snapshot_name_ok(name, errp)) {
        return NULL;
    }
    if (bs->read_only || b->read_only) {
        error_setg(errp, "Device '%s' is read only", bs->node_name);
        return NULL;
    }
    return b;
}

bool bdrv_snapshot_create(BlockDriverState *bs, const char *name, Error **errp)
{
    BlockDriverState *b = snapshot_node_rw(bs, name, errp);
    return b && b->drv->snapshot_create(b, name, errp);
}

bool bdrv_snapshot_delete(BlockDriverState *bs, const char *name,
                          BdrvSnapshotInfo *ret, Error **errp)
{
    BlockDriverState *b = snapshot_node_rw(bs, name, errp);
    return b && b->drv->snapshot_delete(b, name, ret, errp);
}

bool bdrv_snapshot_changed(BlockDriverState *bs, const char *name,
                           BdrvExtentFn *fn, void *opaque, Error **errp)
{
    BlockDriverState *b = snapshot_node(bs, errp);
    if (!b || !snapshot_name_ok(name, errp)) {
        return false;
    }
    return b->drv->snapshot_changed(b, name, fn, opaque, errp);
}

int bdrv_snapshot_list(BlockDriverState *bs, BdrvSnapshotInfo **ret)
{
    BlockDriverState *b = snapshot_node(bs, NULL);
    *ret = NULL;
    return b ? b->drv->snapshot_list(b, ret) : 0;
}

/* Run every before_write hook (called after bdrv_set_dirty, before the
 * driver).  The first error fails the request. */
static int run_write_hooks(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    if (!__atomic_load_n(&bs->hooks, __ATOMIC_ACQUIRE)) {
        return 0;
    }
    int r = 0;
    pthread_rwlock_rdlock(&bs->hooks_lock);
    for (BdrvIoHook *h = bs->hooks; h && r == 0; h = h->next) {
        if (h->before_write) {
            r = h->before_write(h, bs, offset, bytes);
        }
    }
    pthread_rwlock_unlock(&bs->hooks_lock);
    return r < 0 ? r : 0;
}

static int do_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                     const struct iovec *iov, int niov, int flags);

/* A read bracketed by the node's read hooks.  hooks_lock stays shared for
 * the whole read, so a hook cannot be removed between before_read and
 * after_read. */
static int preadv_hooked(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                         const struct iovec *iov, int niov, int flags)
{
    pthread_rwlock_rdlock(&bs->hooks_lock);
    BdrvIoHook *h;
    int r = 0;
    for (h = bs->hooks; h; h = h->next) {
        if (h->before_read) {
            r = h->before_read(h, bs, offset, bytes);
            if (r < 0) {
                break;
            }
        }
    }
    if (r == 0) {
        r = do_preadv(bs, offset, bytes, iov, niov, flags);
    }
    /* after_read for exactly the hooks whose before_read succeeded (or
     * that have none): those before h. */
    for (BdrvIoHook *a = bs->hooks; a != h; a = a->next) {
        if (a->after_read) {
            a->after_read(a, bs, offset, bytes);
        }
    }
    pthread_rwlock_unlock(&bs->hooks_lock);
    return r;
}

/* A bounce buffer for the range [offset, offset + bytes) rounded out to
 * bs's request alignment: that aligned range is [*ret_start, *ret_end)
 * and the buffer (aligned too, free() it) covers it; NULL on ENOMEM. */
static uint8_t *bounce_alloc(BlockDriverState *bs, uint64_t offset,
                             uint64_t bytes, uint64_t *ret_start,
                             uint64_t *ret_end)
{
    uint32_t align = bs->request_alignment;
    *ret_start = ROUND_DOWN(offset, align);
    *ret_end = ROUND_UP(offset + bytes, align);
    return aligned_alloc_bytes(align, *ret_end - *ret_start);
}

/* Read through a bounce buffer covering the aligned superset of the range. */
static int preadv_bounce(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                         const struct iovec *iov, int niov, int flags)
{
    uint64_t start, end;
    _cleanup_free_ uint8_t *buf = bounce_alloc(bs, offset, bytes, &start, &end);
    if (!buf) {
        return -ENOMEM;
    }
    struct iovec b = { .iov_base = buf, .iov_len = end - start };
    int r = bs->drv->preadv(bs, start, end - start, &b, 1, flags);
    if (r < 0) {
        return r;
    }
    iov_from_buf(iov, niov, 0, buf + (offset - start), bytes);
    return 0;
}

int bdrv_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                const struct iovec *iov, int niov, int flags)
{
    int r = check_request(bs, offset, bytes, false, true);
    if (r < 0) {
        return block_acct_invalid(&bs->stats, BDRV_ACCT_READ, r);
    }
    if (bytes == 0) {
        return 0;
    }
    /* A read that must not wait goes only where every layer can promise
     * that: no hooks (they may wait for a job), no bounce buffer.  Not
     * counted: the caller asks again without NOWAIT. */
    if ((flags & BDRV_REQ_NOWAIT) &&
        (!(bs->supported_read_flags & BDRV_REQ_NOWAIT) ||
         __atomic_load_n(&bs->hooks, __ATOMIC_ACQUIRE))) {
        return -EAGAIN;
    }
    uint64_t t0 = block_acct_start();
    if (__atomic_load_n(&bs->hooks, __ATOMIC_ACQUIRE)) {
        r = preadv_hooked(bs, offset, bytes, iov, niov, flags);
    } else {
        r = do_preadv(bs, offset, bytes, iov, niov, flags);
    }
    if (r == -EAGAIN && (flags & BDRV_REQ_NOWAIT)) {
        return r;
    }
    if (r < 0) {
        bdrv_log_io_error(bs, "read", offset, bytes, r);
    }
    return block_acct_done(&bs->stats, BDRV_ACCT_READ, offset, bytes, t0, r);
}

static int do_preadv(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                     const struct iovec *iov, int niov, int flags)
{
    uint32_t align = bs->request_alignment;
    if (align > 1 && ((offset | bytes) & (align - 1) || !iov_is_aligned(iov, niov, align))) {
        return preadv_bounce(bs, offset, bytes, iov, niov, flags);
    }
    return bs->drv->preadv(bs, offset, bytes, iov, niov, flags);
}

/* Unaligned write: read the covering aligned blocks, patch, write back,
 * holding rmw_lock exclusively so no other write interleaves. */
static int pwritev_rmw(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                       const struct iovec *iov, int niov, int flags)
{
    uint32_t align = bs->request_alignment;
    uint64_t start, end;
    _cleanup_free_ uint8_t *buf = bounce_alloc(bs, offset, bytes, &start, &end);
    if (!buf) {
        return -ENOMEM;
    }
    struct iovec b = { .iov_base = buf, .iov_len = end - start };
    pthread_rwlock_wrlock(&bs->rmw_lock);
    int r = 0;
    bool partial = (offset != start) || (offset + bytes != end);
    if (partial) {
        uint64_t len = bdrv_getlength(bs);
        uint64_t readable = end <= len ? end - start : (len > start ? len - start : 0);
        memset(buf, 0, end - start);
        if (readable) {
            uint64_t rd = ROUND_UP(readable, align);
            struct iovec rb = { .iov_base = buf, .iov_len = rd };
            r = bs->drv->preadv(bs, start, rd, &rb, 1, 0);
        }
    }
    if (r == 0) {
        iov_to_buf(iov, niov, 0, buf + (offset - start), bytes);
        r = bs->drv->pwritev(bs, start, end - start, &b, 1, flags);
    }
    pthread_rwlock_unlock(&bs->rmw_lock);
    return r;
}

/* The one prologue of every request that changes data (write, write
 * zeroes, discard; QEMU's write_req_prepare): DESIGN.md D1, marked in the
 * bitmaps before the data can land (and, crash-safe, durably:
 * write-intent.h), then shown to a backup job's I/O hooks so
 * copy-before-write saves the old data first.  0 or -errno (the request
 * must then fail without touching data). */
static int write_req_prepare(BlockDriverState *bs, uint64_t offset,
                             uint64_t bytes)
{
    int r = write_intent_mark(bs, offset, bytes);
    return r < 0 ? r : run_write_hooks(bs, offset, bytes);
}

/* The start of a request that changes data: check_request, then, unless
 * it changes nothing (bytes == 0), write_req_prepare.  Returns 1 with the
 * request begun (write_req_finish ends it), 0 when there is nothing to do,
 * or -errno with nothing begun. */
static int write_req_begin(BlockDriverState *bs, uint64_t offset,
                           uint64_t bytes, bool has_payload, BdrvAcctType type,
                           uint64_t t0)
{
    int r = check_request(bs, offset, bytes, true, has_payload);
    if (r < 0) {
        return block_acct_invalid(&bs->stats, type, r);
    }
    if (bytes == 0) {
        return 0;
    }
    r = write_req_prepare(bs, offset, bytes);
    if (r < 0) {
        return block_acct_done(&bs->stats, type, offset, bytes, t0, r);
    }
    return 1;
}

/* The epilogue matching write_req_prepare: a node that grows that wrote up to
 * `end` (0: nothing to note, as for discard) notes its growth, and the
 * request of `type` on [offset, offset + bytes) begun at t0 is counted.
 * Returns r as the request's result (0 or -errno). */
static int write_req_finish(BlockDriverState *bs, uint64_t end, int r,
                            BdrvAcctType type, uint64_t offset,
                            uint64_t bytes, uint64_t t0)
{
    if (r >= 0 && end && node_grows(bs)) {
        note_growth(bs, end);
    }
    if (r < 0) {
        bdrv_log_io_error(bs, type == BDRV_ACCT_UNMAP ? "discard" : "write",
                          offset, bytes, r);
    }
    return block_acct_done(&bs->stats, type, offset, bytes, t0, r < 0 ? r : 0);
}

/* Hand a write to the driver: unaligned to the node's request alignment
 * it goes through read-modify-write, aligned it holds the RMW lock shared
 * so that no read-modify-write of the same block runs across it. */
static int drv_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                       const struct iovec *iov, int niov, int flags)
{
    uint32_t align = bs->request_alignment;
    if (align <= 1) {
        return bs->drv->pwritev(bs, offset, bytes, iov, niov, flags);
    }
    if ((offset | bytes) & (align - 1) || !iov_is_aligned(iov, niov, align)) {
        return pwritev_rmw(bs, offset, bytes, iov, niov, flags);
    }
    pthread_rwlock_rdlock(&bs->rmw_lock);
    int r = bs->drv->pwritev(bs, offset, bytes, iov, niov, flags);
    pthread_rwlock_unlock(&bs->rmw_lock);
    return r;
}

int bdrv_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                 const struct iovec *iov, int niov, int flags)
{
    if ((flags & BDRV_REQ_WRITE_COMPRESSED) &&
        !bs->drv->supports_compressed_writes) {
        return -ENOTSUP;
    }
    uint64_t t0 = block_acct_start();
    int r = write_req_begin(bs, offset, bytes, true, BDRV_ACCT_WRITE, t0);
    if (r <= 0) {
        return r;
    }
    r = drv_pwritev(bs, offset, bytes, iov, niov, flags);
    return write_req_finish(bs, offset + bytes, r, BDRV_ACCT_WRITE, offset,
                            bytes, t0);
}

int bdrv_preadv_zero_tail(BlockDriverState *child, uint64_t offset,
                          uint64_t bytes, uint64_t avail,
                          const struct iovec *iov, int niov, size_t iov_off)
{
    uint64_t part = MIN(bytes, avail);
    if (part) {
        _cleanup_free_ struct iovec *sub = calloc((size_t)niov, sizeof(*sub));
        if (!sub) {
            return -ENOMEM;
        }
        int n = iov_slice(iov, niov, iov_off, part, sub, niov);
        if (n < 0) {
            return -EINVAL;
        }
        int r = bdrv_preadv(child, offset, part, sub, n, 0);
        if (r < 0) {
            return r;
        }
    }
    if (part < bytes) {
        iov_memset(iov, niov, iov_off + part, 0, bytes - part);
    }
    return 0;
}

int bdrv_preadv_backing(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                        const struct iovec *iov, int niov, size_t iov_off)
{
    uint64_t avail = 0;
    if (bs->backing) {
        int64_t blen = bdrv_getlength(bs->backing);
        if (blen < 0) {
            return (int)blen;
        }
        avail = offset < (uint64_t)blen ? (uint64_t)blen - offset : 0;
    }
    return bdrv_preadv_zero_tail(bs->backing, offset, bytes, avail, iov, niov,
                                 iov_off);
}

int bdrv_pread(BlockDriverState *bs, uint64_t offset, void *buf, uint64_t bytes)
{
    struct iovec iov = { .iov_base = buf, .iov_len = bytes };
    return bdrv_preadv(bs, offset, bytes, &iov, 1, 0);
}

int bdrv_pwrite(BlockDriverState *bs, uint64_t offset, const void *buf,
                uint64_t bytes, int flags)
{
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = bytes };
    return bdrv_pwritev(bs, offset, bytes, &iov, 1, flags);
}

/* 1 MiB of zeroes, page aligned, for zero-write fallbacks. */
#define ZERO_BUF_SIZE (1024 * 1024)
static uint8_t zero_buf[ZERO_BUF_SIZE] __attribute__((aligned(4096)));

static int write_zero_buffers(BlockDriverState *bs, uint64_t offset,
                              uint64_t bytes, int flags)
{
    while (bytes > 0) {
        uint64_t n = MIN(bytes, (uint64_t)ZERO_BUF_SIZE);
        struct iovec iov = { .iov_base = zero_buf, .iov_len = n };
        int r = drv_pwritev(bs, offset, n, &iov, 1, flags & BDRV_REQ_FUA);
        if (r < 0) {
            return r;
        }
        offset += n;
        bytes -= n;
    }
    return 0;
}

int bdrv_pwrite_zeroes(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                       int flags)
{
    uint64_t t0 = block_acct_start();
    int r = write_req_begin(bs, offset, bytes, false, BDRV_ACCT_WRITE, t0);
    if (r <= 0) {
        return r;
    }
    r = -ENOTSUP;
    uint32_t align = bs->request_alignment;
    if (bs->drv->pwrite_zeroes &&
        (align == 1 || !((offset | bytes) & (align - 1)))) {
        r = bs->drv->pwrite_zeroes(bs, offset, bytes, flags);
    }
    if (r == -ENOTSUP && !(flags & BDRV_REQ_NO_FALLBACK)) {
        r = write_zero_buffers(bs, offset, bytes, flags);
    }
    return write_req_finish(bs, offset + bytes, r, BDRV_ACCT_WRITE, offset,
                            bytes, t0);
}

int bdrv_pdiscard(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    if (!bs->drv->pdiscard || bs->discard_ignore) {
        return check_request(bs, offset, bytes, true, false);  /* or 0 */
    }
    /* Discarded data may read back differently: that is a change. */
    uint64_t t0 = block_acct_start();
    int r = write_req_begin(bs, offset, bytes, false, BDRV_ACCT_UNMAP, t0);
    if (r <= 0) {
        return r;
    }
    uint64_t asked = bytes;
    uint32_t align = bs->request_alignment;
    if (align > 1) {
        /* Discard is advisory: shrink to whole aligned blocks. */
        uint64_t start = ROUND_UP(offset, align);
        uint64_t end = ROUND_DOWN(offset + bytes, align);
        if (end <= start) {
            return write_req_finish(bs, 0, 0, BDRV_ACCT_UNMAP, offset, asked,
                                    t0);
        }
        offset = start;
        bytes = end - start;
    }
    return write_req_finish(bs, 0, bs->drv->pdiscard(bs, offset, bytes),
                            BDRV_ACCT_UNMAP, offset, asked, t0);
}

int bdrv_client_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                        const struct iovec *iov, int niov, int flags)
{
    client_enter(bs);
    return client_leave(bs, bdrv_pwritev(bs, offset, bytes, iov, niov, flags));
}

int bdrv_client_pwrite_zeroes(BlockDriverState *bs, uint64_t offset,
                              uint64_t bytes, int flags)
{
    client_enter(bs);
    return client_leave(bs, bdrv_pwrite_zeroes(bs, offset, bytes, flags));
}

int bdrv_client_pdiscard(BlockDriverState *bs, uint64_t offset, uint64_t bytes)
{
    client_enter(bs);
    return client_leave(bs, bdrv_pdiscard(bs, offset, bytes));
}

/* A write bdrv_aio_pwritev submitted, until its driver's cb. */
typedef struct BdrvAioWrite {
    BlockDriverState *bs;
    uint64_t offset, bytes, t0;
    bool client;                  /* counted in bs->in_flight */
    BdrvAioCb *cb;
    void *opaque;
} BdrvAioWrite;

/* The driver's completion: the epilogue of bdrv_pwritev, the drain count
 * of a client request, then the caller's cb.  bs is not touched after
 * that: once cb ran, the caller may drop what keeps bs open. */
static void aio_write_done(void *opaque, int r)
{
    BdrvAioWrite *a = opaque;
    BdrvAioCb *cb = a->cb;
    void *cb_opaque = a->opaque;

    r = write_req_finish(a->bs, a->offset + a->bytes, r, BDRV_ACCT_WRITE,
                         a->offset, a->bytes, a->t0);
    if (a->client) {
        client_leave(a->bs, r);
    }
    free(a);
    cb(cb_opaque, r);
}

/* Whether bs's driver (and each node it passes writes to) can write
 * asynchronously. */
static bool aio_capable(BlockDriverState *bs)
{
    while (bs->drv->aio_pwritev_via_file && bs->file) {
        bs = bs->file;
    }
    return bs->drv->aio_pwritev != NULL;
}

bool bdrv_can_aio_pwritev(BlockDriverState *bs)
{
    return aio_capable(bs) && bs->request_alignment <= 1;
}

/* bdrv_aio_pwritev, for a client request when `client` (the caller
 * counted it in bs->in_flight; aio_write_done uncounts it). */
static int aio_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                       const struct iovec *iov, int niov, bool client,
                       BdrvAioCb *cb, void *opaque)
{
    /* Hooks change only inside a drained section, which waits for the
     * client request this is (part of): none now means none until it
     * ends. */
    if (!bdrv_can_aio_pwritev(bs) || bytes == 0 ||
        __atomic_load_n(&bs->hooks, __ATOMIC_ACQUIRE)) {
        return 0;
    }
    uint64_t t0 = block_acct_start();
    int r = check_request(bs, offset, bytes, true, true);
    if (r < 0) {
        return block_acct_invalid(&bs->stats, BDRV_ACCT_WRITE, r);
    }
    r = write_intent_mark_nowait(bs, offset, bytes);
    if (r == -EAGAIN) {
        return 0;
    }
    BdrvAioWrite *a = r < 0 ? NULL : malloc(sizeof(*a));
    if (a) {
        *a = (BdrvAioWrite){ .bs = bs, .offset = offset, .bytes = bytes,
                             .t0 = t0, .client = client, .cb = cb,
                             .opaque = opaque };
        r = bs->drv->aio_pwritev(bs, offset, bytes, iov, niov, aio_write_done,
                                 a);
        if (r == 0) {
            return 1;
        }
        free(a);
        if (r == -EAGAIN) {
            return 0;             /* its bits stay set: harmless */
        }
    } else if (r == 0) {
        r = -ENOMEM;
    }
    return write_req_finish(bs, offset + bytes, r, BDRV_ACCT_WRITE, offset,
                            bytes, t0);
}

int bdrv_aio_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                     const struct iovec *iov, int niov, BdrvAioCb *cb,
                     void *opaque)
{
    return aio_pwritev(bs, offset, bytes, iov, niov, false, cb, opaque);
}

int bdrv_client_aio_pwritev(BlockDriverState *bs, uint64_t offset,
                            uint64_t bytes, const struct iovec *iov, int niov,
                            BdrvAioCb *cb, void *opaque)
{
    /* client_enter without its wait: a drain in progress means later. */
    __atomic_add_fetch(&bs->in_flight, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&bs->quiesce_counter, __ATOMIC_SEQ_CST) != 0) {
        return client_leave(bs, 0);
    }
    int r = aio_pwritev(bs, offset, bytes, iov, niov, true, cb, opaque);
    return r == 1 ? 1 : client_leave(bs, r);
}

int bdrv_flush(BlockDriverState *bs)
{
    uint64_t t0 = block_acct_start();
    if (bs->read_only || !bs->drv->flush) {
        return block_acct_done(&bs->stats, BDRV_ACCT_FLUSH, 0, 0, t0, 0);
    }
    int r = bs->drv->flush(bs);
    if (r == 0) {
        write_intent_flushed(bs);
    } else {
        bdrv_log_io_error(bs, "flush", 0, 0, r);
    }
    return block_acct_done(&bs->stats, BDRV_ACCT_FLUSH, 0, 0, t0, r);
}

static int layer_status(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                        uint64_t *pnum)
{
    if (!bs->drv->block_status) {
        *pnum = bytes;
        return BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
    }
    int r = bs->drv->block_status(bs, offset, bytes, pnum);
    if (r >= 0 && (*pnum == 0 || *pnum > bytes)) {
        *pnum = bytes;   /* defensive: a driver must make progress */
    }
    return r;
}

int bdrv_block_status_from_file(BlockDriverState *bs, uint64_t offset,
                                uint64_t bytes, uint64_t *pnum)
{
    int r = bdrv_block_status(bs->file, offset, bytes, pnum);
    if (r < 0) {
        return r;
    }
    return (r & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO)) | BDRV_BLOCK_ALLOCATED;
}

int bdrv_layer_status(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                      uint64_t *pnum)
{
    uint64_t len = bdrv_getlength(bs);
    if (offset >= len) {
        *pnum = 0;
        return 0;
    }
    bytes = MIN(bytes, len - offset);
    int r = layer_status(bs, offset, bytes, pnum);
    if (r < 0 || !(r & BDRV_BLOCK_ALLOCATED)) {
        return r < 0 ? r : 0;
    }
    return r & (BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO);
}

int bdrv_is_allocated(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                      uint64_t *pnum)
{
    int r = bdrv_layer_status(bs, offset, bytes, pnum);
    return r < 0 ? r : !!(r & BDRV_BLOCK_ALLOCATED);
}

int bdrv_block_status(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                      uint64_t *pnum)
{
    uint64_t len = bdrv_getlength(bs);
    if (offset >= len) {
        *pnum = 0;
        return 0;
    }
    bytes = MIN(bytes, len - offset);
    BlockDriverState *cur = bs;
    for (int depth = 0; depth <= BDRV_MAX_BACKING_DEPTH; depth++) {
        uint64_t n;
        int r = layer_status(cur, offset, bytes, &n);
        if (r < 0) {
            return r;
        }
        bytes = n;
        if (r & BDRV_BLOCK_ALLOCATED) {
            *pnum = bytes;
            r &= BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO;
            return cur == bs ? (r | BDRV_BLOCK_ALLOCATED) : r;
        }
        if (!cur->backing) {
            break;
        }
        uint64_t blen = bdrv_getlength(cur->backing);
        if (offset >= blen) {
            break;   /* past the end of the backing file: zeroes */
        }
        bytes = MIN(bytes, blen - offset);
        cur = cur->backing;
    }
    *pnum = bytes;
    return BDRV_BLOCK_ZERO;
}

/* ---- persistent bitmaps and images ---- */

bool bdrv_can_store_persistent_bitmaps(BlockDriverState *bs)
{
    if (bs->drv->can_store_persistent_bitmaps) {
        return bs->drv->can_store_persistent_bitmaps(bs);
    }
    return bs->drv->persistent_bitmap_add != NULL;
}

uint32_t bdrv_default_bitmap_granularity(BlockDriverState *bs)
{
    return 64 * 1024;
}

static BdrvDirtyBitmap *dirty_bitmap_add(BlockDriverState *bs, const char *name,
                                         uint32_t granularity, bool persistent,
                                         bool disabled, Error **errp)
{
    if (!bdrv_dirty_bitmap_check_new_name(name, errp)) {
        return NULL;
    }
    if (persistent) {
        if (!bdrv_can_store_persistent_bitmaps(bs)) {
            error_setg(errp, "Cannot store persistent bitmap '%s' in '%s': "
                       "driver '%s' has no persistent bitmap support",
                       name, bs->node_name, bs->drv->format_name);
            return NULL;
        }
        if (bs->read_only) {
            error_setg(errp, "Cannot add persistent bitmap '%s': node '%s' is "
                       "read-only", name, bs->node_name);
            return NULL;
        }
    }
    if (granularity == 0) {
        granularity = bdrv_default_bitmap_granularity(bs);
    }
    BdrvDirtyBitmap *bm = bdrv_create_dirty_bitmap(bs, granularity, name, errp);
    if (!bm) {
        return NULL;
    }
    if (disabled) {
        bm->disabled = true;
    }
    if (persistent) {
        bdrv_dirty_bitmap_set_persistent(bm, true);
        if (!bs->drv->persistent_bitmap_add(bs, bm, errp)) {
            bdrv_release_dirty_bitmap(bm);
            return NULL;
        }
    }
    return bm;
}

/* Adding is create, disable, set persistent and the driver's add: one
 * change (W9), made durable once all of it is done. */
BdrvDirtyBitmap *bdrv_dirty_bitmap_add(BlockDriverState *bs, const char *name,
                                       uint32_t granularity, bool persistent,
                                       bool disabled, Error **errp)
{
    bdrv_dirty_bitmap_batch_begin();
    BdrvDirtyBitmap *bm = dirty_bitmap_add(bs, name, granularity, persistent,
                                           disabled, errp);
    bdrv_dirty_bitmap_batch_end();
    return bm;
}

bool bdrv_dirty_bitmap_remove(BlockDriverState *bs, const char *name, Error **errp)
{
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, name);
    if (!bm) {
        error_setg(errp, "Dirty bitmap '%s' not found", name);
        return false;
    }
    /* An inconsistent bitmap can (only) be removed. */
    if (!bdrv_dirty_bitmap_check(bm, BDRV_BITMAP_BUSY, errp)) {
        return false;
    }
    if (bm->persistent) {
        if (bs->read_only) {
            error_setg(errp, "Cannot remove persistent bitmap '%s': node '%s' is "
                       "read-only", name, bs->node_name);
            return false;
        }
        if (bs->drv->persistent_bitmap_remove &&
            !bs->drv->persistent_bitmap_remove(bs, name, errp)) {
            return false;
        }
    }
    bdrv_release_dirty_bitmap(bm);
    return true;
}

bool bdrv_store_bitmaps(BlockDriverState *bs, Error **errp)
{
    if (bs->read_only || !bs->drv->store_bitmaps) {
        return true;
    }
    return bs->drv->store_bitmaps(bs, errp);
}

bool bdrv_check_create_opts(struct json_object *opts, const char *const *known,
                            size_t n, const char *format, Error **errp)
{
    json_object_object_foreach(opts, key, val) {
        bool found = false;
        for (size_t i = 0; i < n; i++) {
            found |= strcmp(key, known[i]) == 0;
        }
        if (!found) {
            error_setg(errp, "Invalid parameter '%s' for format %s", key, format);
            return false;
        }
        if (!json_object_is_type(val, json_type_string)) {
            error_setg(errp, "Parameter '%s' expects a string", key);
            return false;
        }
    }
    return true;
}

/* The driver of format when it can create an image (on a node: node
 * true) of size; NULL with errp set. */
static const BlockDriver *bdrv_create_driver(const char *format, bool node,
                                             uint64_t size, Error **errp)
{
    const BlockDriver *drv = bdrv_find_format(format);
    if (!drv) {
        error_setg(errp, "Unknown file format '%s'", format);
        return NULL;
    }
    if (node ? !drv->create_on_node : !drv->create) {
        error_setg(errp, "Format driver '%s' does not support image creation",
                   format);
        return NULL;
    }
    if (size > BDRV_MAX_LENGTH) {
        error_setg(errp, "Image size must be at most %llu bytes",
                   (unsigned long long)BDRV_MAX_LENGTH);
        return NULL;
    }
    return drv;
}

bool bdrv_img_create(const char *filename, const char *format, uint64_t size,
                     struct json_object *opts, Error **errp)
{
    const BlockDriver *drv = bdrv_create_driver(format, false, size, errp);
    if (!drv) {
        return false;
    }
    _cleanup_json_ struct json_object *empty = NULL;
    if (!opts) {
        opts = empty = json_object_new_object();
    }
    if (bdrv_filename_is_rbd(filename) && strcmp(format, "raw") != 0 &&
        strcmp(format, "rbd") != 0) {
        /* A format on an RBD image, as qemu-img create does it: an empty
         * image that grows as the format driver writes (rbd.c R3). */
        if (!drv->create_on_node) {
            error_setg(errp, "Format '%s' cannot be created on an rbd image",
                       format);
            return false;
        }
        _cleanup_json_ struct json_object *none = json_object_new_object();
        if (!bdrv_find_format("rbd")->create(filename, 0, none, errp)) {
            return false;
        }
        BlockDriverState *file = bdrv_open_image(filename, "rbd", BDRV_O_RDWR,
                                                 errp);
        bool ok = file && drv->create_on_node(file, size, opts, errp);
        bdrv_unref(file);
        return ok;
    }
    if (bdrv_filename_is_rbd(filename)) {
        drv = bdrv_find_format("rbd");      /* raw: the RBD image itself */
    }
    return drv->create(filename, size, opts, errp);
}

bool bdrv_img_create_on_node(BlockDriverState *file, const char *format,
                             uint64_t size, struct json_object *opts,
                             Error **errp)
{
    const BlockDriver *drv = bdrv_create_driver(format, true, size, errp);
    if (!drv) {
        return false;
    }
    _cleanup_json_ struct json_object *empty = NULL;
    if (!opts) {
        opts = empty = json_object_new_object();
    }
    return drv->create_on_node(file, size, opts, errp);
}
