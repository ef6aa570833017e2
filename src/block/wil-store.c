/*
 * The file backend of the write-intent log's store (wil-store.h):
 * IMAGE.wil opened with the checks and lock a file of the image gets, or
 * a caller's fd.  Durability is fdatasync, exactly as the log had it
 * before it could live elsewhere.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/drivers/file-lock.h"
#include "block/wil-store.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/osdep.h"

typedef struct WilFileStore {
    WilStore s;
    int fd;
    bool own_fd;
} WilFileStore;

static int file_pread(WilStore *s, void *buf, size_t len, uint64_t off)
{
    return pread_full(((WilFileStore *)s)->fd, buf, len, (off_t)off);
}

static int file_pwrite(WilStore *s, const void *buf, size_t len, uint64_t off)
{
    return pwrite_full(((WilFileStore *)s)->fd, buf, len, (off_t)off);
}

static int file_sync(WilStore *s)
{
    return fdatasync(((WilFileStore *)s)->fd) < 0 ? -errno : 0;
}

static int file_get_size(WilStore *s, uint64_t *ret_size)
{
    struct stat st;

    if (fstat(((WilFileStore *)s)->fd, &st) < 0) {
        return -errno;
    }
    *ret_size = (uint64_t)st.st_size;
    return 0;
}

static int file_set_size(WilStore *s, uint64_t size)
{
    return ftruncate(((WilFileStore *)s)->fd, (off_t)size) < 0 ? -errno : 0;
}

static void file_close(WilStore *s)
{
    WilFileStore *f = (WilFileStore *)s;

    if (f->own_fd && f->fd >= 0) {
        close(f->fd);
    }
    free(s->name);
    free(f);
}

static const WilStoreOps wil_file_ops = {
    .pread = file_pread,
    .pwrite = file_pwrite,
    .sync = file_sync,
    .get_size = file_get_size,
    .set_size = file_set_size,
    .close = file_close,
};

void wil_store_close(WilStore *s)
{
    if (s) {
        s->ops->close(s);
    }
}

/* A store on fd, named name in messages, closing fd on close when own_fd:
 * NULL when out of memory (fd is then left open). */
static WilStore *file_store_new(int fd, bool own_fd, const char *name)
{
    WilFileStore *f = calloc(1, sizeof(*f));

    if (!f || !(f->s.name = strdup(name))) {
        free(f);
        return NULL;
    }
    f->s.ops = &wil_file_ops;
    f->fd = fd;
    f->own_fd = own_fd;
    return &f->s;
}

WilStore *wil_store_fd_own(int fd, const char *name)
{
    WilStore *s = file_store_new(fd, true, name);

    if (!s) {
        close(fd);
    }
    return s;
}

WilStore *wil_store_fd(int fd)
{
    return file_store_new(fd, false, "(fd)");
}

bool wil_store_file_open(const char *path, bool create, bool lock,
                         int lock_flags, WilStore **ret, Error **errp)
{
    _cleanup_close_ int fd = -1;

    *ret = NULL;
    if (!create) {
        /* A link or a FIFO at IMAGE.wil is not our log (and is not waited
         * on); the writable open then refuses it with the reason. */
        fd = open_checked(path, O_RDONLY, 0, OPEN_NOFOLLOW, NULL);
        if (fd < 0) {
            return true;
        }
    } else {
        /* Named from the image: no link followed, regular only (qbm.md
         * Q9, Q10 apply to it as to the files a descriptor names). */
        fd = open_checked(path, O_RDWR | O_CREAT, 0644, OPEN_NOFOLLOW, errp);
        if (fd < 0) {
            error_prepend(errp, "cannot open the write-intent log: ");
            return false;
        }
        /* The log is a file of the image: locked as the image is. */
        if (lock && !file_lock_fd(fd, path, lock_flags, errp)) {
            return false;
        }
    }
    *ret = file_store_new(fd, true, path);
    if (!*ret) {
        error_setg(errp, "out of memory");
        return false;
    }
    fd = -1;                           /* the store's now */
    return true;
}
