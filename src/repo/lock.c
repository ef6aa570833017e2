/*
 * Per-disk locks of a repository in a folder (docs/specs/repository.md,
 * "Locks"): flock(2) locks, taken at once or refused, on two objects:
 *
 *   NODE/.lock, "write": exclusive for backup and prune, so two runs never
 *           write one disk's folder (its sequence numbers, attempt
 *           markers and temporary files) at once;
 *   NODE/ itself, "read": shared for restore, verify and serve, exclusive
 *           for prune, so prune never deletes or rewrites a file a reader
 *           has open.  Readers lock the folder, which exists, so they
 *           never write anything (not even the lock file).
 *
 * A backup does not take the read lock: it only adds files, which
 * readers ignore until they are committed.  The kernel drops the locks
 * with the last descriptor, so a killed run leaves no stale lock.  Where
 * the filesystem has no flock (EOPNOTSUPP, ENOLCK, or NFS's emulation
 * refusing an exclusive lock on a folder with EBADF), the run goes on
 * unlocked.
 *
 * A repository in a Ceph pool has no folders to flock: the storage's own
 * locks (storage.h; RADOS object locks in storage-rados.c) stand in, two
 * named locks on the object NODE/.lock, "write" and "read", taken as
 * above.  They expire unless renewed, so repo_lock_verify renews and
 * checks a writer's lock before it commits (spec, "Locks", L5).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "repo/repo-internal.h"
#include "repo/storage.h"
#include "util/cleanup.h"

#define LOCK_NAME ".lock"

struct RepoLock {
    RepoLock *next;             /* repo->locks */
    Repo *repo;
    char *node;
    int write_fd;               /* NODE/.lock, or -1 */
    int read_fd;                /* NODE/, or -1 */
    RepoStorageLock *write_sl;  /* the storage's: "write" on NODE/.lock */
    RepoStorageLock *read_sl;   /* the storage's: "read" on NODE/.lock */
};

/* flock(fd, op | LOCK_NB): 0 held (or no locks on this filesystem: the
 * fd is closed and *fd set to -1), -EWOULDBLOCK held by someone else,
 * else -errno. */
static int try_lock(int *fd, int op)
{
    if (flock(*fd, op | LOCK_NB) == 0) {
        return 0;
    }
    int e = errno;
    if (e == EOPNOTSUPP || e == ENOLCK || e == EBADF || e == EINVAL) {
        close(*fd);
        *fd = -1;
        return 0;
    }
    return e == EWOULDBLOCK ? -EWOULDBLOCK : -e;
}

static const char *mode_name(RepoLockMode mode)
{
    return mode == REPO_LOCK_READ ? "read" :
           mode == REPO_LOCK_BACKUP ? "back up" : "prune";
}

static const char *busy_writing = "another bitback backup or prune is "
                                  "writing it";
static const char *busy_reading(RepoLockMode mode)
{
    return mode == REPO_LOCK_PRUNE
        ? "a bitback restore, verify or serve is reading it"
        : "a bitback prune is changing it";
}

/* One of the storage's locks: 0 held, -EWOULDBLOCK held by someone else
 * (*holder says who), or -1 with errp set. */
static int storage_lock(Repo *repo, const char *path, const char *name,
                        bool exclusive, RepoLockMode mode,
                        RepoStorageLock **ret, char **holder, Error **errp)
{
    char who[32];

    snprintf(who, sizeof(who), "bitback %s", mode == REPO_LOCK_READ ? "read" :
             mode == REPO_LOCK_BACKUP ? "backup" : "prune");
    int r = repo->storage->lock(path, name, exclusive, who, ret, holder);
    if (r == -EBUSY) {
        return -EWOULDBLOCK;
    }
    /* A reader the storage does not let lock (a read-only key) reads
     * unlocked, as on a filesystem without flock. */
    if (r < 0 && mode == REPO_LOCK_READ && (r == -EPERM || r == -EACCES)) {
        return 0;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot lock '%s'", path);
        return -1;
    }
    return 0;
}

/* repo_lock_node where the storage has its own locks. */
static bool lock_by_storage(RepoLock *l, RepoLockMode mode, Error **errp)
{
    Repo *repo = l->repo;
    _cleanup_free_ char *dir = repo_node_dir(repo, l->node);
    _cleanup_free_ char *path = repo_path_printf("%s/" LOCK_NAME, dir);
    _cleanup_free_ char *holder = NULL;
    const char *busy = NULL;
    RepoStat st;
    int r = 0;

    if (mode == REPO_LOCK_READ && repo->storage->stat(dir, &st) == -ENOENT) {
        return true;          /* no such disk: the caller says so */
    }
    if (mode != REPO_LOCK_READ) {
        r = storage_lock(repo, path, "write", true, mode, &l->write_sl,
                         &holder, errp);
        busy = busy_writing;
    }
    if (r == 0 && mode != REPO_LOCK_BACKUP) {
        r = storage_lock(repo, path, "read", mode == REPO_LOCK_PRUNE, mode,
                         &l->read_sl, &holder, errp);
        busy = busy_reading(mode);
    }
    if (r == -EWOULDBLOCK) {
        error_setg(errp, "cannot %s disk '%s' of %s now: %s (lock on %s, "
                   "held by %s)", mode_name(mode), l->node, repo->path, busy,
                   path, holder ? holder : "another client");
    }
    return r == 0;
}

RepoLock *repo_lock_node(Repo *repo, const char *node, RepoLockMode mode,
                         Error **errp)
{
    if (!repo_check_node_name(node, errp)) {
        return NULL;
    }
    RepoLock *l = calloc(1, sizeof(*l));
    if (!l || !(l->node = strdup(node))) {
        abort();
    }
    l->repo = repo;
    l->write_fd = l->read_fd = -1;
    l->next = repo->locks;
    repo->locks = l;
    if (!repo_opens_by_name(repo)) {
        if (repo->storage->lock && !lock_by_storage(l, mode, errp)) {
            repo_unlock(l);
            return NULL;
        }
        return l;
    }
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    _cleanup_free_ char *path = repo_path_printf("%s/" LOCK_NAME, dir);
    const char *busy = NULL, *what = path;
    int r = 0;

    if (mode == REPO_LOCK_BACKUP && !repo_ensure_node_dir(repo, node, errp)) {
        goto fail;
    }
    if (mode != REPO_LOCK_READ) {
        l->write_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW,
                           0644);
        if (l->write_fd < 0) {
            error_setg_errno(errp, errno, "cannot open the lock file '%s'",
                             path);
            goto fail;
        }
        r = try_lock(&l->write_fd, LOCK_EX);
        busy = busy_writing;
    }
    if (r == 0 && mode != REPO_LOCK_BACKUP) {
        l->read_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC |
                          O_NOFOLLOW);
        if (l->read_fd < 0 && errno == ENOENT && mode == REPO_LOCK_READ) {
            return l;         /* no such disk: the caller says so */
        }
        if (l->read_fd < 0) {
            error_setg_errno(errp, errno, "cannot open '%s'", dir);
            goto fail;
        }
        r = try_lock(&l->read_fd, mode == REPO_LOCK_PRUNE ? LOCK_EX : LOCK_SH);
        what = dir;
        busy = busy_reading(mode);
    }
    if (r == -EWOULDBLOCK) {
        error_setg(errp, "cannot %s disk '%s' of %s now: %s (lock on %s)",
                   mode_name(mode), node, repo->path, busy, what);
        goto fail;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot lock '%s'", what);
        goto fail;
    }
    return l;

fail:
    repo_unlock(l);
    return NULL;
}

bool repo_lock_verify(Repo *repo, const char *node, Error **errp)
{
    for (RepoLock *l = repo->locks; l; l = l->next) {
        if (l->write_sl && !strcmp(l->node, node) &&
            !repo->storage->lock_check(l->write_sl, errp)) {
            error_prepend(errp, "disk '%s' of %s: ", node, repo->path);
            return false;
        }
    }
    return true;
}

void repo_unlock(RepoLock *l)
{
    if (l) {
        for (RepoLock **pp = &l->repo->locks; *pp; pp = &(*pp)->next) {
            if (*pp == l) {
                *pp = l->next;
                break;
            }
        }
        if (l->write_fd >= 0) {
            close(l->write_fd);
        }
        if (l->read_fd >= 0) {
            close(l->read_fd);
        }
        if (l->read_sl) {
            l->repo->storage->unlock(l->read_sl);
        }
        if (l->write_sl) {
            l->repo->storage->unlock(l->write_sl);
        }
        free(l->node);
        free(l);
    }
}

RepoLock **repo_lock_nodes(Repo *repo, const char *const *nodes,
                           RepoLockMode mode, Error **errp)
{
    size_t n = 0;
    while (nodes[n]) {
        n++;
    }
    RepoLock **locks = calloc(n + 1, sizeof(*locks));
    if (!locks) {
        abort();
    }
    for (size_t i = 0; i < n; i++) {
        if (!(locks[i] = repo_lock_node(repo, nodes[i], mode, errp))) {
            repo_unlock_nodes(locks);
            return NULL;
        }
    }
    return locks;
}

void repo_unlock_nodes(RepoLock **locks)
{
    for (size_t i = 0; locks && locks[i]; i++) {
        repo_unlock(locks[i]);
    }
    free(locks);
}
