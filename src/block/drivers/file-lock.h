/*
 * Image locking with QEMU's own protocol (block/file-posix.c), so that
 * bitback, bitbackd, qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon
 * all see each other's locks (DESIGN.md D8).
 *
 * The protocol: every open file description (OFD) of an image file holds
 * shared OFD locks (F_OFD_SETLK, F_RDLCK) on single bytes:
 *   byte FILE_LOCK_PERM_BASE + N    "this fd uses permission N"
 *   byte FILE_LOCK_SHARED_BASE + N  "this fd does not let others use N"
 * A new opener first takes its bytes, then asks (F_OFD_GETLK, F_WRLCK)
 * whether any other OFD holds a byte that conflicts: the "does not share"
 * byte of a permission it wants, or the "uses" byte of a permission it does
 * not share.  Locks held by the same OFD never conflict; two fds opened
 * separately -- even in one process -- do.  Closing the fd drops its locks.
 *
 * Only plain reads of other files are unaffected: a lock is advisory and
 * binds only programs that follow the protocol.
 */
#ifndef BITBACK_FILE_LOCK_H
#define BITBACK_FILE_LOCK_H

#include <stdbool.h>
#include <stdint.h>

#include "util/error.h"

/* QEMU's permissions (include/block/block-common.h, BLK_PERM_*). */
#define FILE_PERM_CONSISTENT_READ  0x01u
#define FILE_PERM_WRITE            0x02u
#define FILE_PERM_WRITE_UNCHANGED  0x04u
#define FILE_PERM_RESIZE           0x08u
#define FILE_PERM_GRAPH_MOD        0x10u   /* QEMU before 7.1 only: bitback
                                              never takes it and always
                                              shares it */
#define FILE_PERM_ALL              0x1fu
#define FILE_PERM_COUNT            5

#define FILE_LOCK_PERM_BASE   100
#define FILE_LOCK_SHARED_BASE 200

/* What an open with BDRV_O_* `flags` uses and shares, as QEMU's format
 * drivers do on their file child:
 *   writable (BDRV_O_RDWR)   uses consistent-read, write, resize; shares
 *                            everything but write and resize.
 *   read-only                uses consistent-read; shares the same (a
 *                            reader needs the file not to change under it).
 *   read-only + BDRV_O_FORCE_SHARE (-U, force-share=on)
 *                            uses consistent-read; shares everything. */
void file_lock_perms(int flags, uint32_t *ret_perm, uint32_t *ret_shared);

/* Take the lock bytes for an open with `flags` on fd (which must be open
 * for reading) and check that no other OFD holds a conflicting byte.
 * On a conflict: false, no byte held by this call is kept, and errp says
 * 'Failed to get "write" lock: is another process using the image
 * [FILENAME]?' (QEMU's words).  `filename` only names the file in errors. */
bool file_lock_fd(int fd, const char *filename, int flags, Error **errp);

/* Open `filename` read-only just to hold its lock bytes for an open with
 * `flags` (for files a driver otherwise reads and writes with short-lived
 * fds).  It must be a regular file (open_checked with `how`: OPEN_NOFOLLOW
 * for a file an image names).  Returns the fd (the caller closes it to
 * drop the locks), or -1 with errp set. */
int file_lock_open(const char *filename, int flags, unsigned how, Error **errp);

/* Open `filename` read-write, creating it, to write a new image into it,
 * as QEMU's create does: the lock bytes of a writer that does not share
 * resize are taken BEFORE the file is truncated to 0 bytes, so an image in
 * use is refused rather than destroyed.  Returns the fd (the lock lasts
 * until it is closed), or -1 with errp set. */
int file_lock_create(const char *filename, Error **errp);

#endif
