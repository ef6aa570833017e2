/*
 * A small interface of positioned I/O on one byte array, with two
 * backends: where a write-intent log lives (write-intent.c,
 * docs/specs/write-intent.md), and where a QBM bitmap's bytes live
 * (qbm-format.c loads and stores a bitmap file or a RADOS object through
 * it: docs/specs/rbd-bitmaps.md).  The byte layout is the same in both.
 *
 *   file   IMAGE.wil next to the image (wil_store_file_open), or a log a
 *          caller opened (wil_store_fd: a regular file or a memfd, for
 *          tools and tests).  sync is fdatasync.
 *   rados  one RADOS object next to an RBD image (wil_store_rados_open):
 *          RADOS acknowledges a write only once it is persistent on every
 *          replica (rados-obj.h), so a write is durable when it returns and
 *          sync has nothing left to do (W1 holds as for a file).
 *
 * A driver whose images are not files (BlockDriver.open_intent_store)
 * returns its own store; every other node gets IMAGE.wil.  The ops are on
 * the data path: 0 or -errno, never a message.  Calls on one store are
 * serialized by its user (write-intent.c's io_lock and snap_lock) except
 * that reads at open come before any write.
 */
#ifndef BITBACK_WIL_STORE_H
#define BITBACK_WIL_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <rados/librados.h>

#include "util/error.h"

typedef struct WilStore WilStore;

typedef struct WilStoreOps {
    /* Read len bytes at off: 0, -EIO when the log ends before off+len, or
     * -errno. */
    int (*pread)(WilStore *s, void *buf, size_t len, uint64_t off);
    /* Write len bytes at off, growing the log as needed: 0 or -errno. */
    int (*pwrite)(WilStore *s, const void *buf, size_t len, uint64_t off);
    /* Make every write that returned durable: 0 or -errno. */
    int (*sync)(WilStore *s);
    /* The log's size in bytes: 0 or -errno. */
    int (*get_size)(WilStore *s, uint64_t *ret_size);
    /* Cut or extend (with zeroes) the log to size bytes, durably when the
     * next sync returns: 0 or -errno. */
    int (*set_size)(WilStore *s, uint64_t size);
    /* Release what the store holds (fd, lock) and free it. */
    void (*close)(WilStore *s);
} WilStoreOps;

/* Every backend's state starts with this. */
struct WilStore {
    const WilStoreOps *ops;
    char *name;                    /* for messages: a path, "rados:POOL/OID" */
};

static inline int wil_store_pread(WilStore *s, void *buf, size_t len,
                                  uint64_t off)
{
    return s->ops->pread(s, buf, len, off);
}

static inline int wil_store_pwrite(WilStore *s, const void *buf, size_t len,
                                   uint64_t off)
{
    return s->ops->pwrite(s, buf, len, off);
}

static inline int wil_store_sync(WilStore *s)
{
    return s->ops->sync(s);
}

static inline int wil_store_get_size(WilStore *s, uint64_t *ret_size)
{
    return s->ops->get_size(s, ret_size);
}

static inline int wil_store_set_size(WilStore *s, uint64_t size)
{
    return s->ops->set_size(s, size);
}

/* Close s (NULL is fine). */
void wil_store_close(WilStore *s);
static inline void wil_store_closep(WilStore **s)
{
    wil_store_close(*s);
}
#define _cleanup_wil_store_ __attribute__((cleanup(wil_store_closep)))

/* The file at path.  create false: opened read-only to recover from, no
 * lock; *ret is NULL (and the result true) when there is no file or it
 * cannot be our log (a link, a FIFO: refused without waiting).  create
 * true: opened read-write, created 0644 if missing, never through a link
 * and only a regular file (qbm.md Q9, Q10); with lock, it takes QEMU's
 * lock bytes for an open with lock_flags (file-lock.h), as its image.
 * False with errp set on failure; *ret is then NULL. */
bool wil_store_file_open(const char *path, bool create, bool lock,
                         int lock_flags, WilStore **ret, Error **errp);

/* A store on fd, which stays the caller's (closing the store leaves it
 * open): NULL when out of memory. */
WilStore *wil_store_fd(int fd);

/* A store on fd that owns it (closing the store closes fd, also when the
 * result is NULL: out of memory), named `name` in messages. */
WilStore *wil_store_fd_own(int fd, const char *name);

/* The name of the object lock a writable RADOS log holds. */
#define WIL_RADOS_LOCK_NAME "bitback.wil"

/* The RADOS object oid in io as a plain store, no lock taken (the caller
 * owns the right to write it): a missing object has no size (get_size
 * -ENOENT) and reads short (-EIO); a write creates it.  io must outlive
 * the store.  NULL when out of memory. */
WilStore *wil_store_rados_object(rados_ioctx_t io, const char *oid);

/* The RADOS object oid in io (the caller's I/O context, which must outlive
 * the store).  create false: to recover from, no lock; *ret is NULL (and
 * the result true) when the object does not exist.  create true: takes
 * the object's exclusive lock "bitback.wil" (rados_obj_lock: a second
 * opener, in any process or host, fails with a clear message) and holds
 * it until the store is closed; the object is created if missing.  False
 * with errp set on failure; *ret is then NULL. */
bool wil_store_rados_open(rados_ioctx_t io, const char *oid, bool create,
                          WilStore **ret, Error **errp);

#endif
