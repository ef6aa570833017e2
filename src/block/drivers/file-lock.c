/*
 * QEMU's image lock bytes (see file-lock.h for the protocol).  The same
 * two steps as QEMU's file-posix: take our own bytes, then look for a
 * conflicting byte held by any other open file description.
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "block/block.h"
#include "block/drivers/file-lock.h"
#include "util/osdep.h"

/* QEMU's names for the permissions, as its messages print them. */
static const char *const perm_names[FILE_PERM_COUNT] = {
    "consistent read", "write", "write unchanged", "resize", "change children",
};

void file_lock_perms(int flags, uint32_t *ret_perm, uint32_t *ret_shared)
{
    *ret_perm = FILE_PERM_CONSISTENT_READ;
    *ret_shared = FILE_PERM_ALL & ~(FILE_PERM_WRITE | FILE_PERM_RESIZE);
    if (flags & BDRV_O_RDWR) {
        *ret_perm |= FILE_PERM_WRITE | FILE_PERM_RESIZE;
    } else if (flags & BDRV_O_FORCE_SHARE) {
        *ret_shared = FILE_PERM_ALL;
    }
}

/* fcntl on one byte: 0 or -errno. */
static int lock_byte(int fd, int cmd, short type, int off, short *ret_type)
{
    struct flock fl = {
        .l_type = type,
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
        .l_pid = 0,            /* must be 0 for OFD locks */
    };
    if (fcntl(fd, cmd, &fl) < 0) {
        return -errno;
    }
    if (ret_type) {
        *ret_type = fl.l_type;
    }
    return 0;
}

/* Drop every lock byte this OFD may hold. */
static void unlock_all(int fd)
{
    struct flock fl = {
        .l_type = F_UNLCK,
        .l_whence = SEEK_SET,
        .l_start = FILE_LOCK_PERM_BASE,
        .l_len = FILE_LOCK_SHARED_BASE + FILE_PERM_COUNT - FILE_LOCK_PERM_BASE,
    };
    (void)fcntl(fd, F_OFD_SETLK, &fl);
}

/* Does another OFD hold byte `off`?  1 yes, 0 no, -errno. */
static int byte_held_by_other(int fd, int off)
{
    short type = F_UNLCK;
    int r = lock_byte(fd, F_OFD_GETLK, F_WRLCK, off, &type);
    return r < 0 ? r : type != F_UNLCK;
}

static void set_conflict(Error **errp, int r, const char *what, unsigned i,
                         const char *filename)
{
    if (r < 0) {
        error_setg_errno(errp, -r, "Failed to check the \"%s\" lock of '%s'",
                         perm_names[i], filename);
        return;
    }
    error_setg(errp, "Failed to get %s\"%s\" lock: is another process using "
               "the image [%s]?", what, perm_names[i], filename);
}

/* Take the bytes of (perm, shared) on fd and check for conflicts. */
static bool lock_perms_fd(int fd, const char *filename, uint32_t perm,
                          uint32_t shared, Error **errp)
{
    /* Step one: announce what we use and what we do not share. */
    for (unsigned i = 0; i < FILE_PERM_COUNT; i++) {
        uint32_t bit = 1u << i;
        int r = 0, off = 0;
        if (perm & bit) {
            off = FILE_LOCK_PERM_BASE + (int)i;
            r = lock_byte(fd, F_OFD_SETLK, F_RDLCK, off, NULL);
        }
        if (r == 0 && !(shared & bit)) {
            off = FILE_LOCK_SHARED_BASE + (int)i;
            r = lock_byte(fd, F_OFD_SETLK, F_RDLCK, off, NULL);
        }
        if (r < 0) {
            unlock_all(fd);
            if (r == -EAGAIN || r == -EACCES) {
                error_setg(errp, "Failed to lock byte %d: is another process "
                           "using the image [%s]?", off, filename);
            } else {
                error_setg_errno(errp, -r, "Failed to lock byte %d of '%s'",
                                 off, filename);
            }
            return false;
        }
    }
    /* Step two: nobody else may refuse to share what we use ... */
    for (unsigned i = 0; i < FILE_PERM_COUNT; i++) {
        if (perm & (1u << i)) {
            int r = byte_held_by_other(fd, FILE_LOCK_SHARED_BASE + (int)i);
            if (r != 0) {
                unlock_all(fd);
                set_conflict(errp, r, "", i, filename);
                return false;
            }
        }
    }
    /* ... nor use what we do not share. */
    for (unsigned i = 0; i < FILE_PERM_COUNT; i++) {
        if (!(shared & (1u << i))) {
            int r = byte_held_by_other(fd, FILE_LOCK_PERM_BASE + (int)i);
            if (r != 0) {
                unlock_all(fd);
                set_conflict(errp, r, "shared ", i, filename);
                return false;
            }
        }
    }
    return true;
}

bool file_lock_fd(int fd, const char *filename, int flags, Error **errp)
{
    uint32_t perm, shared;
    file_lock_perms(flags, &perm, &shared);
    return lock_perms_fd(fd, filename, perm, shared, errp);
}

int file_lock_create(const char *filename, Error **errp)
{
    int fd = open(filename, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        error_setg_errno(errp, errno, "Could not create '%s'", filename);
        return -1;
    }
    /* QEMU's create: write and resize, sharing all but resize. */
    if (!lock_perms_fd(fd, filename, FILE_PERM_WRITE | FILE_PERM_RESIZE,
                       FILE_PERM_ALL & ~FILE_PERM_RESIZE, errp)) {
        close(fd);
        return -1;
    }
    if (ftruncate(fd, 0) < 0) {
        error_setg_errno(errp, errno, "Could not truncate '%s'", filename);
        close(fd);
        return -1;
    }
    return fd;
}

int file_lock_open(const char *filename, int flags, unsigned how, Error **errp)
{
    int fd = open_checked(filename, O_RDONLY, 0, how, errp);
    if (fd < 0) {
        return -1;
    }
    if (!file_lock_fd(fd, filename, flags, errp)) {
        close(fd);
        return -1;
    }
    return fd;
}
