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
 * unlocked.  A rados repository is not locked (yet): repo_lock_node gives
 * a lock that holds nothing there.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "repo/repo-internal.h"
#include "util/cleanup.h"

#define LOCK_NAME ".lock"

struct RepoLock {
    int write_fd;               /* NODE/.lock, or -1 */
    int read_fd;                /* NODE/, or -1 */
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

RepoLock *repo_lock_node(Repo *repo, const char *node, RepoLockMode mode,
                         Error **errp)
{
    if (!repo_check_node_name(node, errp)) {
        return NULL;
    }
    RepoLock *l = calloc(1, sizeof(*l));
    if (!l) {
        abort();
    }
    l->write_fd = l->read_fd = -1;
    if (!repo_opens_by_name(repo)) {
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
        busy = "another bitback backup or prune is writing it";
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
        busy = mode == REPO_LOCK_PRUNE
            ? "a bitback restore, verify or serve is reading it"
            : "a bitback prune is changing it";
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

void repo_unlock(RepoLock *l)
{
    if (l) {
        if (l->write_fd >= 0) {
            close(l->write_fd);
        }
        if (l->read_fd >= 0) {
            close(l->read_fd);
        }
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
