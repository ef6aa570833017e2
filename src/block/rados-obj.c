/*
 * Helpers on librados for one object (rados-obj.h): positioned reads that
 * zero-fill past the object's end, writes split into bounded operations,
 * atomic replacement, a bounded whole-object read, and the advisory
 * exclusive lock with a message that names its holder.  librados does the
 * work; this file only fixes the contracts the block layer relies on.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/rados-obj.h"
#include "util/cleanup.h"

ssize_t rados_obj_pread(rados_ioctx_t io, const char *oid, void *buf,
                        size_t len, uint64_t off)
{
    char *p = buf;
    size_t done = 0;

    while (done < len) {
        size_t n = MIN(len - done, (size_t)RADOS_OBJ_MAX_OP);
        int r = rados_read(io, oid, p + done, n, off + done);

        if (r == -ENOENT) {
            r = 0;
        }
        if (r < 0) {
            return r;
        }
        done += (size_t)r;
        if ((size_t)r < n) {
            break;                     /* the object ends here */
        }
    }
    memset(p + done, 0, len - done);
    return (ssize_t)done;
}

int rados_obj_pwrite(rados_ioctx_t io, const char *oid, const void *buf,
                     size_t len, uint64_t off)
{
    const char *p = buf;

    for (size_t done = 0; done < len;) {
        size_t n = MIN(len - done, (size_t)RADOS_OBJ_MAX_OP);
        int r = rados_write(io, oid, p + done, n, off + done);

        if (r < 0) {
            return r;
        }
        done += n;
    }
    return 0;
}

int rados_obj_write_full(rados_ioctx_t io, const char *oid, const void *buf,
                         size_t len)
{
    if (len > RADOS_OBJ_MAX_WRITE_FULL) {
        return -EFBIG;
    }
    return rados_write_full(io, oid, buf, len);
}

int rados_obj_truncate(rados_ioctx_t io, const char *oid, uint64_t size)
{
    return rados_trunc(io, oid, size);
}

int rados_obj_stat(rados_ioctx_t io, const char *oid, uint64_t *ret_size)
{
    time_t mtime;

    return rados_stat(io, oid, ret_size, &mtime);
}

int rados_obj_remove(rados_ioctx_t io, const char *oid)
{
    int r = rados_remove(io, oid);

    return r == -ENOENT ? 0 : r;
}

bool rados_obj_read_full(rados_ioctx_t io, const char *oid, size_t max_len,
                         uint8_t **ret_buf, size_t *ret_len, Error **errp)
{
    _cleanup_free_ uint8_t *buf = NULL;
    uint64_t size;
    ssize_t n;
    int r = rados_obj_stat(io, oid, &size);

    if (r < 0) {
        error_setg_errno(errp, -r, "cannot stat the RADOS object '%s'", oid);
        return false;
    }
    if (size > max_len) {
        error_setg(errp, "the RADOS object '%s' is %llu bytes, more than the "
                   "%zu it may hold", oid, (unsigned long long)size, max_len);
        return false;
    }
    buf = malloc(size ? size : 1);
    if (!buf) {
        error_setg(errp, "out of memory");
        return false;
    }
    n = rados_obj_pread(io, oid, buf, size, 0);
    if (n < 0) {
        error_setg_errno(errp, (int)-n, "cannot read the RADOS object '%s'", oid);
        return false;
    }
    /* It may have shrunk since the stat: what was read is the object. */
    *ret_len = (size_t)n;
    *ret_buf = steal_pointer(&buf);
    return true;
}

char *rados_obj_lock_holders(rados_ioctx_t io, const char *oid,
                             const char *name)
{
    char tag[256], clients[4096], cookies[4096], addrs[4096];
    size_t tag_len = sizeof(tag), clients_len = sizeof(clients);
    size_t cookies_len = sizeof(cookies), addrs_len = sizeof(addrs);
    int exclusive;
    char *s = NULL;
    ssize_t n = rados_list_lockers(io, oid, name, &exclusive, tag, &tag_len,
                                   clients, &clients_len, cookies, &cookies_len,
                                   addrs, &addrs_len);

    if (n <= 0) {
        return NULL;
    }
    clients[sizeof(clients) - 1] = cookies[sizeof(cookies) - 1] = '\0';
    addrs[sizeof(addrs) - 1] = '\0';
    const char *c = clients, *k = cookies, *a = addrs;
    for (ssize_t i = 0; i < n && c < clients + sizeof(clients) &&
                        k < cookies + sizeof(cookies) &&
                        a < addrs + sizeof(addrs); i++) {
        char *next;
        if (asprintf(&next, "%s%s%s at %s (cookie %s)", s ? s : "",
                     s ? ", " : "", c, a, k) < 0) {
            break;
        }
        free(s);
        s = next;
        c += strlen(c) + 1;
        k += strlen(k) + 1;
        a += strlen(a) + 1;
    }
    return s;
}

bool rados_obj_lock(rados_ioctx_t io, const char *oid, const char *name,
                    const char *cookie, const char *desc, Error **errp)
{
    int r = rados_lock_exclusive(io, oid, name, cookie, desc, NULL, 0);

    if (r == -EBUSY) {
        _cleanup_free_ char *holder = rados_obj_lock_holders(io, oid, name);

        error_setg(errp, "the RADOS object '%s' is locked by another "
                   "process (%s): is the image open elsewhere?", oid,
                   holder ? holder : "holder unknown");
        return false;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot lock the RADOS object '%s'", oid);
        return false;
    }
    return true;
}

int rados_obj_break_locks(rados_ioctx_t io, const char *oid, const char *name)
{
    /* A bounded number of rounds: each breaks the holder listed first. */
    for (int round = 0; round < 16; round++) {
        char tag[256], clients[256], cookies[256], addrs[256];
        size_t tag_len = sizeof(tag), clients_len = sizeof(clients);
        size_t cookies_len = sizeof(cookies), addrs_len = sizeof(addrs);
        int exclusive;
        ssize_t n = rados_list_lockers(io, oid, name, &exclusive, tag, &tag_len,
                                       clients, &clients_len, cookies,
                                       &cookies_len, addrs, &addrs_len);

        if (n == -ENOENT || n == 0) {
            return 0;
        }
        if (n < 0) {
            return (int)n;
        }
        clients[sizeof(clients) - 1] = cookies[sizeof(cookies) - 1] = '\0';
        int r = rados_break_lock(io, oid, name, clients, cookies);
        if (r < 0 && r != -ENOENT) {
            return r;
        }
    }
    return -EBUSY;
}

int rados_obj_unlock(rados_ioctx_t io, const char *oid, const char *name,
                     const char *cookie)
{
    return rados_unlock(io, oid, name, cookie);
}

char *rados_obj_new_cookie(const char *who)
{
    static unsigned counter;
    char host[64] = "";
    char *s = NULL;

    (void)gethostname(host, sizeof(host) - 1);
    if (asprintf(&s, "%s, pid %ld on %s, #%u", who, (long)getpid(), host,
                 __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED)) < 0) {
        return NULL;
    }
    return s;
}
