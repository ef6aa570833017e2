/*
 * The local storage backend (storage.h): the repository is a folder of
 * POSIX files.  Durability is fsync of the file, then of its folder.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "repo/storage.h"
#include "util/cleanup.h"
#include "util/cutils.h"

static char *local_read(const char *path, uint64_t max, size_t *ret_len,
                        Error **errp)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;

    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot open '%s'", path);
        return NULL;
    }
    if (fstat(fd, &st) < 0) {
        error_setg_errno(errp, errno, "cannot stat '%s'", path);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        error_setg(errp, "'%s' is not a regular file", path);
        return NULL;
    }
    if ((uint64_t)st.st_size > max) {
        error_setg(errp, "'%s' is too large (%" PRIu64 " bytes, at most %"
                   PRIu64 ")", path, (uint64_t)st.st_size, max);
        return NULL;
    }
    _cleanup_free_ char *buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        error_setg(errp, "out of memory reading '%s'", path);
        return NULL;
    }
    int r = pread_full(fd, buf, (size_t)st.st_size, 0);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot read '%s'", path);
        return NULL;
    }
    buf[st.st_size] = '\0';
    *ret_len = (size_t)st.st_size;
    return steal_pointer(&buf);
}

static bool local_write_tmp(const char *path, const void *data, size_t len,
                            Error **errp)
{
    _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC |
                                  O_CLOEXEC, 0644);
    int r;

    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot create '%s'", path);
        return false;
    }
    r = pwrite_full(fd, data, len, 0);
    if (r == 0 && fsync(fd) < 0) {
        r = -errno;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot write '%s'", path);
        unlink(path);
        return false;
    }
    return true;
}

static bool local_sync(const char *path, Error **errp)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot open '%s'", path);
        return false;
    }
    if (fsync(fd) < 0) {
        error_setg_errno(errp, errno, "cannot sync '%s'", path);
        return false;
    }
    return true;
}

static bool local_sync_dir(const char *dir, Error **errp)
{
    _cleanup_close_ int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    if (fd < 0 || fsync(fd) < 0) {
        error_setg_errno(errp, errno, "cannot sync folder '%s'", dir);
        return false;
    }
    return true;
}

static bool local_replace(const char *path, const void *data, size_t len,
                          Error **errp)
{
    return file_replace_atomic(path, data, len, errp);
}

static int local_rename(const char *from, const char *to)
{
    return rename(from, to) < 0 ? -errno : 0;
}

static int local_remove(const char *path)
{
    return unlink(path) < 0 ? -errno : 0;
}

static int local_mkdir(const char *dir)
{
    if (mkdir(dir, 0777) == 0) {
        return 1;
    }
    return errno == EEXIST ? 0 : -errno;
}

static int local_stat(const char *path, RepoStat *ret)
{
    struct stat st;

    if (stat(path, &st) < 0) {
        return -errno;
    }
    *ret = (RepoStat){
        .is_dir = S_ISDIR(st.st_mode),
        .is_regular = S_ISREG(st.st_mode),
        .size = (uint64_t)st.st_size,
        .allocated = (uint64_t)st.st_blocks * 512,
    };
    return 0;
}

static void closedirp(DIR **d)
{
    if (*d) {
        closedir(*d);
    }
}

static int local_list(const char *dir, RepoListFn *fn, void *opaque)
{
    _cleanup_(closedirp) DIR *d = opendir(dir);
    struct dirent *de;

    if (!d) {
        return -errno;
    }
    while ((errno = 0, de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) {
            continue;
        }
        if (!fn(opaque, de->d_name)) {
            return 0;
        }
    }
    return errno ? -errno : 0;
}

/* ---- streaming files ---- */

struct RepoFile {
    int fd;
    bool writing;
    uint64_t size;               /* writing: bytes appended so far */
    char path[];                 /* writing: removed unless finished */
};

static RepoFile *local_file_new(int fd, bool writing, const char *path)
{
    RepoFile *f = malloc(sizeof(*f) + strlen(path) + 1);

    if (!f) {
        abort();
    }
    f->fd = fd;
    f->writing = writing;
    f->size = 0;
    strcpy(f->path, path);
    return f;
}

static RepoFile *local_create(const char *path, Error **errp)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
                  0644);

    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot create '%s'", path);
        return NULL;
    }
    return local_file_new(fd, true, path);
}

static int local_append(RepoFile *f, const void *buf, size_t len)
{
    int r = pwrite_full(f->fd, buf, len, (off_t)f->size);

    if (r == 0) {
        f->size += len;
    }
    return r;
}

static void local_close(RepoFile *f)
{
    if (!f) {
        return;
    }
    close(f->fd);
    if (f->writing) {
        unlink(f->path);
    }
    free(f);
}

static bool local_finish(RepoFile *f, Error **errp)
{
    if (fsync(f->fd) < 0) {
        error_setg_errno(errp, errno, "cannot sync '%s'", f->path);
        local_close(f);
        return false;
    }
    f->writing = false;
    local_close(f);
    return true;
}

static RepoFile *local_open(const char *path, uint64_t *ret_size, Error **errp)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;

    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot open '%s'", path);
        return NULL;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        error_setg(errp, "'%s' is not a regular file", path);
        close(fd);
        return NULL;
    }
    *ret_size = (uint64_t)st.st_size;
    return local_file_new(fd, false, path);
}

static int local_pread(RepoFile *f, void *buf, size_t len, uint64_t off)
{
    return pread_full(f->fd, buf, len, (off_t)off);
}

const RepoStorage repo_storage_local = {
    .name = "local",
    .read = local_read,
    .write_tmp = local_write_tmp,
    .sync = local_sync,
    .sync_dir = local_sync_dir,
    .replace = local_replace,
    .rename = local_rename,
    .remove = local_remove,
    .mkdir = local_mkdir,
    .stat = local_stat,
    .list = local_list,
    .create = local_create,
    .append = local_append,
    .finish = local_finish,
    .open = local_open,
    .pread = local_pread,
    .close = local_close,
};
