/*
 * The "blkdebug" filter driver (blkdebug.h): requests pass to the child
 * node named by the "image" option, as raw.c passes them to its file,
 * unless a rule fails them first.
 *
 * A rule matches the requests of one kind (its event: read, write, flush,
 * discard, write-zeroes) that cover its sector when it has one.  It lets
 * the first `after` matching requests through (counting from when it was
 * armed), then fails every later one with -errno, or only the next one
 * when `once` is set (the rule is then spent).  The rules are checked in
 * the order they were armed; the first one that fails a request wins, and
 * every matching rule counts the request.
 *
 * Thread safety: requests come from any thread; `lock` guards the rule
 * list and counters and is never held across I/O (a leaf lock, DESIGN.md
 * "Locks").
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "block/drivers/blkdebug.h"
#include "util/cleanup.h"
#include "util/json-opts.h"

typedef enum BlkdebugEvent {
    BLKDBG_READ,
    BLKDBG_WRITE,
    BLKDBG_FLUSH,
    BLKDBG_DISCARD,
    BLKDBG_WRITE_ZEROES,
    BLKDBG__MAX,
} BlkdebugEvent;

static const char *const event_names[BLKDBG__MAX] = {
    [BLKDBG_READ] = "read",
    [BLKDBG_WRITE] = "write",
    [BLKDBG_FLUSH] = "flush",
    [BLKDBG_DISCARD] = "discard",
    [BLKDBG_WRITE_ZEROES] = "write-zeroes",
};

typedef struct BlkdebugRule {
    BlkdebugEvent event;
    int error;                 /* positive errno */
    bool once;
    uint64_t after;            /* matching requests let through first */
    int64_t sector;            /* 512-byte sector a request must cover;
                                  -1: any request */
    uint64_t seen;             /* matching requests so far */
    struct BlkdebugRule *next;
} BlkdebugRule;

typedef struct BDRVBlkdebugState {
    pthread_mutex_t lock;
    BlkdebugRule *rules;       /* in arming order */
} BDRVBlkdebugState;

extern const BlockDriver bdrv_blkdebug;

/* The errno a rule gives as -errno; keeps out 0 and values no errno has. */
#define BLKDBG_MAX_ERRNO 4095

static bool parse_rule(struct json_object *obj, BlkdebugRule *r, Error **errp)
{
    static const char *const known[] = {
        "event", "errno", "once", "immediately", "after", "sector",
    };
    if (!json_object_is_type(obj, json_type_object)) {
        error_setg(errp, "blkdebug: an inject-error rule must be an object");
        return false;
    }
    json_object_object_foreach(obj, key, val) {
        (void)val;
        size_t i = 0;
        while (i < sizeof(known) / sizeof(known[0]) && strcmp(known[i], key)) {
            i++;
        }
        if (i == sizeof(known) / sizeof(known[0])) {
            error_setg(errp, "blkdebug: unknown inject-error parameter '%s'",
                       key);
            return false;
        }
    }
    const char *ev = json_opt_str(obj, "event");
    if (!ev) {
        error_setg(errp, "blkdebug: inject-error parameter 'event' is missing");
        return false;
    }
    int e = 0;
    while (e < BLKDBG__MAX && strcmp(event_names[e], ev)) {
        e++;
    }
    if (e == BLKDBG__MAX) {
        error_setg(errp, "blkdebug: unknown event '%s' (read, write, flush, "
                   "discard or write-zeroes)", ev);
        return false;
    }
    uint64_t err, sector;
    bool immediately;
    *r = (BlkdebugRule){ .event = (BlkdebugEvent)e };
    if (!bdrv_opt_uint(obj, "errno", EIO, BLKDBG_MAX_ERRNO, &err, errp) ||
        !bdrv_opt_bool(obj, "once", false, &r->once, errp) ||
        !bdrv_opt_bool(obj, "immediately", false, &immediately, errp) ||
        !bdrv_opt_uint(obj, "after", 0, UINT64_MAX, &r->after, errp) ||
        !bdrv_opt_uint(obj, "sector", UINT64_MAX, INT64_MAX, &sector, errp)) {
        error_prepend(errp, "blkdebug: ");
        return false;
    }
    if (err == 0) {
        error_setg(errp, "blkdebug: inject-error 'errno' must not be 0");
        return false;
    }
    r->error = (int)err;
    r->sector = sector == UINT64_MAX ? -1 : (int64_t)sector;
    return true;
}

static void free_rules(BlkdebugRule *r)
{
    while (r) {
        BlkdebugRule *next = r->next;
        free(r);
        r = next;
    }
}

/* Append a parsed copy of obj to s's rules. */
static bool add_rule(BDRVBlkdebugState *s, struct json_object *obj,
                     Error **errp)
{
    BlkdebugRule parsed;
    if (!parse_rule(obj, &parsed, errp)) {
        return false;
    }
    BlkdebugRule *r = malloc(sizeof(*r));
    if (!r) {
        error_setg(errp, "out of memory");
        return false;
    }
    *r = parsed;
    pthread_mutex_lock(&s->lock);
    BlkdebugRule **p = &s->rules;
    while (*p) {
        p = &(*p)->next;
    }
    *p = r;
    pthread_mutex_unlock(&s->lock);
    return true;
}

/* 0 to let a request of kind ev on [offset, offset+bytes) through, or the
 * -errno of the first rule that fails it. */
static int check_rules(BlockDriverState *bs, BlkdebugEvent ev,
                       uint64_t offset, uint64_t bytes)
{
    BDRVBlkdebugState *s = bs->opaque;
    int ret = 0;
    pthread_mutex_lock(&s->lock);
    for (BlkdebugRule **p = &s->rules; *p; ) {
        BlkdebugRule *r = *p;
        uint64_t sec_off = (uint64_t)r->sector * 512;
        bool covers = r->sector < 0 ||
            (ev != BLKDBG_FLUSH && sec_off < offset + bytes &&
             offset < sec_off + 512);
        if (r->event != ev || !covers || r->seen++ < r->after || ret) {
            p = &r->next;
            continue;
        }
        ret = -r->error;
        if (r->once) {
            *p = r->next;
            free(r);
        } else {
            p = &r->next;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static bool blkdebug_open(BlockDriverState *bs, struct json_object *options,
                          int flags, Error **errp)
{
    BDRVBlkdebugState *s = bs->opaque;
    pthread_mutex_init(&s->lock, NULL);
    bs->request_alignment = bs->file->request_alignment;
    bs->supported_read_flags = bs->file->supported_read_flags;
    struct json_object *list = json_object_object_get(options, "inject-error");
    if (!list) {
        return true;
    }
    if (!json_object_is_type(list, json_type_array)) {
        error_setg(errp, "blkdebug: 'inject-error' must be a list of rules");
        goto fail;
    }
    for (size_t i = 0; i < json_object_array_length(list); i++) {
        if (!add_rule(s, json_object_array_get_idx(list, i), errp)) {
            goto fail;
        }
    }
    return true;

fail:
    free_rules(s->rules);
    pthread_mutex_destroy(&s->lock);
    return false;
}

static void blkdebug_close(BlockDriverState *bs)
{
    BDRVBlkdebugState *s = bs->opaque;
    free_rules(s->rules);
    pthread_mutex_destroy(&s->lock);
}

static int64_t blkdebug_getlength(BlockDriverState *bs)
{
    return bdrv_getlength(bs->file);
}

static int blkdebug_preadv(BlockDriverState *bs, uint64_t offset,
                           uint64_t bytes, const struct iovec *iov, int niov,
                           int flags)
{
    int r = check_rules(bs, BLKDBG_READ, offset, bytes);
    return r ? r : bdrv_preadv(bs->file, offset, bytes, iov, niov, flags);
}

static int blkdebug_pwritev(BlockDriverState *bs, uint64_t offset,
                            uint64_t bytes, const struct iovec *iov, int niov,
                            int flags)
{
    int r = check_rules(bs, BLKDBG_WRITE, offset, bytes);
    return r ? r : bdrv_pwritev(bs->file, offset, bytes, iov, niov, flags);
}

static int blkdebug_pwrite_zeroes(BlockDriverState *bs, uint64_t offset,
                                  uint64_t bytes, int flags)
{
    int r = check_rules(bs, BLKDBG_WRITE_ZEROES, offset, bytes);
    return r ? r : bdrv_pwrite_zeroes(bs->file, offset, bytes, flags);
}

static int blkdebug_pdiscard(BlockDriverState *bs, uint64_t offset,
                             uint64_t bytes)
{
    int r = check_rules(bs, BLKDBG_DISCARD, offset, bytes);
    return r ? r : bdrv_pdiscard(bs->file, offset, bytes);
}

static int blkdebug_flush(BlockDriverState *bs)
{
    int r = check_rules(bs, BLKDBG_FLUSH, 0, 0);
    return r ? r : bdrv_flush(bs->file);
}

static BDRVBlkdebugState *blkdebug_state(BlockDriverState *bs, Error **errp)
{
    if (bs->drv != &bdrv_blkdebug) {
        error_setg(errp, "Node '%s' is not a blkdebug node", bs->node_name);
        return NULL;
    }
    return bs->opaque;
}

bool blkdebug_inject(BlockDriverState *bs, struct json_object *rule,
                     Error **errp)
{
    BDRVBlkdebugState *s = blkdebug_state(bs, errp);
    return s && add_rule(s, rule, errp);
}

bool blkdebug_clear(BlockDriverState *bs, Error **errp)
{
    BDRVBlkdebugState *s = blkdebug_state(bs, errp);
    if (!s) {
        return false;
    }
    pthread_mutex_lock(&s->lock);
    BlkdebugRule *rules = s->rules;
    s->rules = NULL;
    pthread_mutex_unlock(&s->lock);
    free_rules(rules);
    return true;
}

/* blockdev-add's members of a blkdebug node: its child "image" (or the
 * "filename" shorthand) and the rules (block.h: open_opts). */
static const JsonOptSpec blkdebug_open_opts[] = {
    { "image", JSON_OPT_REF, true },
    { "filename", JSON_OPT_STR, true },
    { "inject-error", JSON_OPT_ARRAY, true },
    { NULL },
};

const BlockDriver bdrv_blkdebug = {
    .format_name = "blkdebug",
    .instance_size = sizeof(BDRVBlkdebugState),
    .child_key = "image",
    .is_filter = true,
    .open = blkdebug_open,
    .open_opts = blkdebug_open_opts,
    .close = blkdebug_close,
    .getlength = blkdebug_getlength,
    .preadv = blkdebug_preadv,
    .pwritev = blkdebug_pwritev,
    .pwrite_zeroes = blkdebug_pwrite_zeroes,
    .pdiscard = blkdebug_pdiscard,
    .flush = blkdebug_flush,
    .block_status = bdrv_block_status_from_file,
};
