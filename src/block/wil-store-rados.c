/*
 * The RADOS backend of the write-intent log's store (wil-store.h): the
 * log is one object in the image's pool, so a daemon on another host
 * finds it.  RADOS acknowledges a write once it is persistent on every
 * replica (rados-obj.h), so sync is a no-op; the intent is durable when
 * the map's write returns, before the data write is issued (W1).  A
 * writable store holds the object's exclusive lock: two writers of one
 * log would break every W-invariant.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/rados-obj.h"
#include "block/wil-store.h"
#include "util/cleanup.h"

#define WIL_LOCK_NAME WIL_RADOS_LOCK_NAME

typedef struct WilRadosStore {
    WilStore s;
    rados_ioctx_t io;
    char *oid;
    char *cookie;                  /* the lock's, NULL when not locked */
} WilRadosStore;

static int rados_store_pread(WilStore *s, void *buf, size_t len, uint64_t off)
{
    WilRadosStore *r = (WilRadosStore *)s;
    ssize_t n = rados_obj_pread(r->io, r->oid, buf, len, off);

    if (n < 0) {
        return (int)n;
    }
    return (size_t)n < len ? -EIO : 0;    /* as a file's pread_full */
}

static int rados_store_pwrite(WilStore *s, const void *buf, size_t len,
                              uint64_t off)
{
    WilRadosStore *r = (WilRadosStore *)s;

    return rados_obj_pwrite(r->io, r->oid, buf, len, off);
}

static int rados_store_sync(WilStore *s)
{
    return 0;                          /* durable when acknowledged */
}

static int rados_store_get_size(WilStore *s, uint64_t *ret_size)
{
    WilRadosStore *r = (WilRadosStore *)s;

    return rados_obj_stat(r->io, r->oid, ret_size);
}

static int rados_store_set_size(WilStore *s, uint64_t size)
{
    WilRadosStore *r = (WilRadosStore *)s;

    return rados_obj_truncate(r->io, r->oid, size);
}

static void rados_store_close(WilStore *s)
{
    WilRadosStore *r = (WilRadosStore *)s;

    if (r->cookie) {
        (void)rados_obj_unlock(r->io, r->oid, WIL_LOCK_NAME, r->cookie);
    }
    free(r->cookie);
    free(r->oid);
    free(s->name);
    free(r);
}

static const WilStoreOps wil_rados_ops = {
    .pread = rados_store_pread,
    .pwrite = rados_store_pwrite,
    .sync = rados_store_sync,
    .get_size = rados_store_get_size,
    .set_size = rados_store_set_size,
    .close = rados_store_close,
};

WilStore *wil_store_rados_object(rados_ioctx_t io, const char *oid)
{
    WilRadosStore *r = calloc(1, sizeof(*r));
    char pool[256];

    if (!r) {
        return NULL;
    }
    r->s.ops = &wil_rados_ops;
    r->io = io;
    if (rados_ioctx_get_pool_name(io, pool, sizeof(pool)) < 0) {
        snprintf(pool, sizeof(pool), "?");
    }
    if (!(r->oid = strdup(oid)) ||
        asprintf(&r->s.name, "rados:%s/%s", pool, oid) < 0) {
        r->s.name = NULL;
        rados_store_close(&r->s);
        return NULL;
    }
    return &r->s;
}

bool wil_store_rados_open(rados_ioctx_t io, const char *oid, bool create,
                          WilStore **ret, Error **errp)
{
    _cleanup_wil_store_ WilStore *s = NULL;
    WilRadosStore *r;
    uint64_t size;

    *ret = NULL;
    if (!create) {
        int e = rados_obj_stat(io, oid, &size);

        if (e == -ENOENT) {
            return true;
        }
        if (e < 0) {
            error_setg_errno(errp, -e, "cannot open the write-intent log "
                             "(RADOS object '%s')", oid);
            return false;
        }
    }
    s = wil_store_rados_object(io, oid);
    if (!s) {
        error_setg(errp, "out of memory");
        return false;
    }
    r = (WilRadosStore *)s;
    if (create) {
        _cleanup_free_ char *cookie = rados_obj_new_cookie("bitback write-intent log");

        if (!cookie) {
            error_setg(errp, "out of memory");
            return false;
        }
        if (!rados_obj_lock(io, oid, WIL_LOCK_NAME, cookie,
                            "bitback write-intent log", errp)) {
            error_prepend(errp, "cannot open the write-intent log: ");
            return false;
        }
        r->cookie = steal_pointer(&cookie);
    }
    *ret = steal_pointer(&s);
    return true;
}
