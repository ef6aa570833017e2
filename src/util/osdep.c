/*
 * See osdep.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/osdep.h"

static const char *file_type_name(mode_t m)
{
    return S_ISDIR(m) ? "a directory" : S_ISFIFO(m) ? "a FIFO"
         : S_ISSOCK(m) ? "a socket" : S_ISCHR(m) ? "a character device"
         : S_ISBLK(m) ? "a block device" : S_ISLNK(m) ? "a symbolic link"
         : "not a regular file";
}

static bool type_ok(mode_t m, unsigned how)
{
    return S_ISREG(m) || ((how & OPEN_BLOCKDEV) && S_ISBLK(m));
}

static void set_type_error(Error **errp, const char *path, mode_t m,
                           unsigned how)
{
    error_setg(errp, "'%s' is %s, not a regular file%s: refused", path,
               file_type_name(m), (how & OPEN_BLOCKDEV) ? " or block device" : "");
}

int open_checked(const char *path, int oflags, mode_t mode, unsigned how,
                 Error **errp)
{
    int fl = oflags | O_CLOEXEC | O_NONBLOCK |
             ((how & OPEN_NOFOLLOW) ? O_NOFOLLOW : 0);
    int fd = open(path, fl, mode);
    if (fd < 0) {
        int e = errno;
        struct stat st;
        if ((e == ELOOP || e == ENXIO || e == EISDIR) && lstat(path, &st) == 0 &&
            ((how & OPEN_NOFOLLOW) || !S_ISLNK(st.st_mode)) &&
            !type_ok(st.st_mode, how)) {
            /* O_NOFOLLOW on a link, a FIFO without a reader opened for
             * writing, a directory opened for writing: say which. */
            if (S_ISLNK(st.st_mode)) {
                error_setg(errp, "'%s' is a symbolic link: refused (the files "
                           "an image names are opened without following "
                           "links)", path);
            } else {
                set_type_error(errp, path, st.st_mode, how);
            }
        } else {
            error_setg_errno(errp, e, "Could not open '%s'", path);
        }
        errno = e;
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        error_setg_errno(errp, e, "Could not stat '%s'", path);
        close(fd);
        errno = e;
        return -1;
    }
    if (!type_ok(st.st_mode, how)) {
        set_type_error(errp, path, st.st_mode, how);
        close(fd);
        errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        return -1;
    }
    int cur = fcntl(fd, F_GETFL);
    if (!(oflags & O_NONBLOCK) &&
        (cur < 0 || fcntl(fd, F_SETFL, cur & ~O_NONBLOCK) < 0)) {
        int e = errno;
        error_setg_errno(errp, e, "Could not clear O_NONBLOCK on '%s'", path);
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static mode_t socket_mode = 0600;

void unix_socket_mode_set(mode_t mode)
{
    socket_mode = mode;
}

mode_t unix_socket_mode(void)
{
    return socket_mode;
}

bool unix_bind_private(int fd, const char *path, Error **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    _cleanup_free_ char *dir = path_dirname(path);
    _cleanup_free_ char *tmpl = NULL;
    if (!dir || asprintf(&tmpl, "%s/.bitback-sock-XXXXXX", dir) < 0) {
        tmpl = NULL;
        error_setg(errp, "out of memory");
        return false;
    }
    /* mkdtemp makes the folder 0700: nobody else can reach the socket
     * while it still has the umask's mode. */
    if (!mkdtemp(tmpl)) {
        error_setg_errno(errp, errno, "Could not create a private folder "
                         "next to '%s'", path);
        return false;
    }
    bool ok = false;
    int dfd = open(tmpl, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        error_setg_errno(errp, errno, "Could not open '%s'", tmpl);
        rmdir(tmpl);
        return false;
    }
    /* Bound through the folder's fd, so the length limit of sun_path
     * applies to `path` only (checked by the caller), not to tmpl. */
    snprintf(sa.sun_path, sizeof(sa.sun_path), "/proc/self/fd/%d/s", dfd);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        error_setg_errno(errp, errno, "Failed to bind socket to %s", path);
    } else if (fchmodat(dfd, "s", socket_mode, 0) < 0) {
        error_setg_errno(errp, errno, "Could not set the mode of '%s'", path);
        unlinkat(dfd, "s", 0);
    } else if (renameat2(dfd, "s", AT_FDCWD, path, RENAME_NOREPLACE) < 0) {
        error_setg_errno(errp, errno, "Failed to bind socket to %s", path);
        unlinkat(dfd, "s", 0);
    } else {
        ok = true;
    }
    close(dfd);
    rmdir(tmpl);
    return ok;
}

int unix_listen(const char *path, Error **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(sa.sun_path)) {
        error_setg(errp, "UNIX socket path '%s' is too long (max %zu bytes)",
                   path, sizeof(sa.sun_path) - 1);
        return -1;
    }
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(path);   /* a stale socket from an earlier run */
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot create socket");
        return -1;
    }
    /* Mode 0600 (or --socket-mode) whatever the umask. */
    if (!unix_bind_private(fd, path, errp)) {
        close(fd);
        return -1;
    }
    if (listen(fd, 128) < 0) {
        error_setg_errno(errp, errno, "cannot listen on '%s'", path);
        close(fd);
        unlink(path);
        return -1;
    }
    return fd;
}

/* A TCP socket on the first address of host:port that works: bound and
 * listening (listening: host NULL or "" is every address), or connected
 * with TCP_NODELAY (its users speak request and reply: Nagle would hold a
 * request's second write for the peer's delayed ACK, 40 ms); close-on-exec
 * plus flags.  The fd, or -1 with errp set. */
static int inet_open(const char *host, const char *port, bool listening,
                     int flags, Error **errp)
{
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC,
        .ai_socktype = SOCK_STREAM,
        .ai_flags = listening ? AI_PASSIVE : 0,
    };
    struct addrinfo *res = NULL;
    const char *h = host && *host ? host : NULL;
    int r = getaddrinfo(h, port, &hints, &res);
    if (r != 0) {
        error_setg(errp, "cannot resolve '%s:%s': %s", host ? host : "",
                   port, gai_strerror(r));
        return -1;
    }
    int err = 0;
    int fd = -1;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | flags,
                    ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        if (listening) {
            int one = 1;
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
            r = bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 ? listen(fd, 128)
                                                           : -1;
        } else {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            do {
                r = connect(fd, ai->ai_addr, ai->ai_addrlen);
            } while (r < 0 && errno == EINTR);
        }
        if (r == 0) {
            break;
        }
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        error_setg_errno(errp, err, "cannot %s '%s:%s'",
                         listening ? "listen on" : "connect to",
                         host ? host : "", port);
    }
    return fd;
}

int inet_listen(const char *host, const char *port, int flags, Error **errp)
{
    return inet_open(host, port, true, flags, errp);
}

int inet_connect(const char *host, const char *port, Error **errp)
{
    return inet_open(host, port, false, 0, errp);
}

bool inet_host_is_loopback(const char *host)
{
    if (!host || !*host) {
        return false;
    }
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM };
    struct addrinfo *res = NULL;
    if (getaddrinfo(host, NULL, &hints, &res) != 0) {
        return false;
    }
    bool loop = res != NULL;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET) {
            const struct sockaddr_in *in = (const void *)ai->ai_addr;
            loop &= (ntohl(in->sin_addr.s_addr) >> 24) == 127;
        } else if (ai->ai_family == AF_INET6) {
            const struct sockaddr_in6 *in6 = (const void *)ai->ai_addr;
            loop &= IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr);
        } else {
            loop = false;
        }
    }
    freeaddrinfo(res);
    return loop;
}

bool inet_parse_host_port(const char *s, char **ret_host, char **ret_port,
                          Error **errp)
{
    const char *colon;
    const char *h = s;
    size_t hlen;
    if (*s == '[') {
        const char *close_br = strchr(s, ']');
        if (!close_br || close_br[1] != ':') {
            error_setg(errp, "'%s': expected [ADDRESS]:PORT", s);
            return false;
        }
        h = s + 1;
        hlen = close_br - h;
        colon = close_br + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon || memchr(s, ':', colon - s)) {
            error_setg(errp, "'%s': expected HOST:PORT (IPv6: [ADDRESS]:PORT)",
                       s);
            return false;
        }
        hlen = colon - s;
    }
    if (hlen == 0 || colon[1] == '\0') {
        error_setg(errp, "'%s': expected HOST:PORT", s);
        return false;
    }
    *ret_host = strndup(h, hlen);
    *ret_port = strdup(colon + 1);
    if (!*ret_host || !*ret_port) {
        free(*ret_host);
        free(*ret_port);
        *ret_host = *ret_port = NULL;
        error_setg(errp, "out of memory");
        return false;
    }
    return true;
}
