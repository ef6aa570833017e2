/*
 * Small helpers on librados for one object of an I/O context (a pool and
 * namespace): what the block layer keeps next to an RBD image as RADOS
 * objects (the write-intent log, wil-store.h).  The data path returns
 * -errno; the lock and read_full, used on open, take Error **errp.
 *
 * Durability: RADOS acknowledges a write (rados_write, rados_write_full,
 * rados_trunc) only once every replica of the object's placement group
 * has applied it to its object store, i.e. once it is persistent on all
 * of them ("librados (C)", docs.ceph.com/en/latest/rados/api/librados/:
 * the synchronous calls return when the operation is complete; and the
 * RADOS architecture page, "Data Consistency": the primary replies after
 * all replicas have persisted the write).  So a write that returned here
 * is durable: there is no separate sync to call.
 */
#ifndef BITBACK_RADOS_OBJ_H
#define BITBACK_RADOS_OBJ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <rados/librados.h>

#include "util/error.h"

/* One read or write operation moves at most this much (the OSD refuses
 * writes above osd_max_write_size, 90 MiB by default): longer I/O is
 * split.  rados_obj_write_full, atomic, refuses longer data (-EFBIG). */
#define RADOS_OBJ_MAX_OP (16u << 20)
#define RADOS_OBJ_MAX_WRITE_FULL (64u << 20)

/* Read len bytes at off into buf.  The part of [off, off+len) past the
 * object's end (all of it when the object does not exist) reads as
 * zeroes.  Returns how many bytes came from the object (0..len), or
 * -errno. */
ssize_t rados_obj_pread(rados_ioctx_t io, const char *oid, void *buf,
                        size_t len, uint64_t off);

/* Write len bytes at off (the object is created or extended as needed):
 * 0 or -errno.  Durable once it returns (see above); a write longer than
 * RADOS_OBJ_MAX_OP is several operations, each durable, not atomic. */
int rados_obj_pwrite(rados_ioctx_t io, const char *oid, const void *buf,
                     size_t len, uint64_t off);

/* Replace the whole object with buf[0..len) atomically: 0 or -errno
 * (-EFBIG above RADOS_OBJ_MAX_WRITE_FULL). */
int rados_obj_write_full(rados_ioctx_t io, const char *oid, const void *buf,
                         size_t len);

/* Set the object's size (creating it when missing): 0 or -errno. */
int rados_obj_truncate(rados_ioctx_t io, const char *oid, uint64_t size);

/* The object's size in *ret_size: 0, -ENOENT when it does not exist, or
 * -errno. */
int rados_obj_stat(rados_ioctx_t io, const char *oid, uint64_t *ret_size);

/* Remove the object: 0 (also when it did not exist) or -errno. */
int rados_obj_remove(rados_ioctx_t io, const char *oid);

/* The whole object, malloc'ed into *ret_buf (the caller frees it), its
 * size in *ret_len.  An object larger than max_len is refused before
 * anything is allocated: what a cluster holds is input like any file
 * (DESIGN.md D5).  False with errp set on failure, ENOENT included. */
bool rados_obj_read_full(rados_ioctx_t io, const char *oid, size_t max_len,
                         uint8_t **ret_buf, size_t *ret_len, Error **errp);

/* An advisory exclusive lock named `name` on the object (RADOS's lock
 * class, rados_lock_exclusive: no expiry), held by this client with
 * `cookie` until rados_obj_unlock or until the cluster drops the client.
 * Another holder (another process, or this one with another cookie) makes
 * it fail with a message that names the object and the holder.  The
 * object is created if missing.  False with errp set on failure. */
bool rados_obj_lock(rados_ioctx_t io, const char *oid, const char *name,
                    const char *cookie, const char *desc, Error **errp);

/* Break every holder's lock `name` on the object (rados_break_lock of
 * each locker rados_list_lockers gives): 0 (also when none held it or the
 * object does not exist) or -errno.  Only for a caller that knows every
 * other holder is stale (rbd-bitmaps.c: it holds the image's exclusive
 * lock, which any writer of the object would need). */
int rados_obj_break_locks(rados_ioctx_t io, const char *oid, const char *name);

/* Release a lock rados_obj_lock took: 0 or -errno (-ENOENT: not held). */
int rados_obj_unlock(rados_ioctx_t io, const char *oid, const char *name,
                     const char *cookie);

/* A cookie for a RADOS lock, unique to this process and call, that says
 * who holds it to whoever finds the lock taken: "WHO, pid PID on HOST, #N"
 * (N counts calls), malloc'ed, NULL when out of memory. */
char *rados_obj_new_cookie(const char *who);

/* Every holder of lock `name` on the object, "CLIENT at ADDR (cookie
 * COOKIE)" joined by ", ", malloc'ed; NULL when nobody holds it or the
 * holders cannot be listed. */
char *rados_obj_lock_holders(rados_ioctx_t io, const char *oid,
                             const char *name);

#endif
