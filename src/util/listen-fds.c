/*
 * The registry of listening sockets passed to the program (systemd socket
 * activation or an inherited fd), and the one place that turns QEMU's
 * SocketAddress "fd" string into a checked listening socket, for the NBD
 * server and the QMP monitor alike.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "util/listen-fds.h"

typedef struct ListenFd {
    int fd;
    char *name;        /* never NULL; "" when unnamed */
    bool used;
} ListenFd;

static ListenFd listen_fds[LISTEN_FDS_MAX];
static size_t nlisten_fds;

bool listen_fds_register(int fd, const char *name, Error **errp)
{
    if (nlisten_fds == LISTEN_FDS_MAX) {
        error_setg(errp, "too many passed sockets (at most %d)", LISTEN_FDS_MAX);
        return false;
    }
    char *n = strdup(name ? name : "");
    if (!n) {
        abort();
    }
    listen_fds[nlisten_fds++] = (ListenFd){ .fd = fd, .name = n };
    return true;
}

/* The registry entry of fd, or NULL. */
static ListenFd *listen_fds_find_fd(int fd)
{
    for (size_t i = 0; i < nlisten_fds; i++) {
        if (listen_fds[i].fd == fd) {
            return &listen_fds[i];
        }
    }
    return NULL;
}

/* fd for `str`: a decimal number, or a registered name; -1 with errp. */
static int listen_fds_lookup(const char *str, Error **errp)
{
    if (!str || !*str) {
        error_setg(errp, "no file descriptor given (a number, or the name of "
                   "a socket passed in LISTEN_FDNAMES)");
        return -1;
    }
    if (str[0] >= '0' && str[0] <= '9') {
        char *end;
        errno = 0;
        long v = strtol(str, &end, 10);
        if (*end || errno || v > INT_MAX) {
            error_setg(errp, "'%s' is not a file descriptor number", str);
            return -1;
        }
        return (int)v;
    }
    for (size_t i = 0; i < nlisten_fds; i++) {
        if (strcmp(listen_fds[i].name, str) == 0) {
            return listen_fds[i].fd;
        }
    }
    error_setg(errp, "no socket named '%s' was passed (names come from "
               "LISTEN_FDNAMES with LISTEN_FDS)", str);
    return -1;
}

int listen_fds_resolve(const char *str, int *ret_family, Error **errp)
{
    int fd = listen_fds_lookup(str, errp);
    if (fd < 0) {
        return -1;
    }
    /* how errors name it: "file descriptor 3", or "... 3 ('nbd')" */
    char what[64];
    bool named = !(str[0] >= '0' && str[0] <= '9');
    snprintf(what, sizeof(what), "file descriptor %d%s%.20s%s", fd,
             named ? " ('" : "", named ? str : "", named ? "')" : "");
    if (fcntl(fd, F_GETFD) < 0) {
        error_setg(errp, "%s is not open", what);
        return -1;
    }
    int type = 0, acc = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0) {
        if (errno == ENOTSOCK) {
            error_setg(errp, "%s is not a socket", what);
        } else {
            error_setg_errno(errp, errno, "%s", what);
        }
        return -1;
    }
    if (type != SOCK_STREAM) {
        error_setg(errp, "%s is not a stream socket", what);
        return -1;
    }
    len = sizeof(acc);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &len) < 0 || !acc) {
        error_setg(errp, "%s is not a listening socket (it must be bound "
                   "and listen() called on it)", what);
        return -1;
    }
    struct sockaddr_storage ss;
    len = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0) {
        error_setg_errno(errp, errno, "%s", what);
        return -1;
    }
    int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (dup_fd < 0) {
        error_setg_errno(errp, errno, "cannot duplicate %s", what);
        return -1;
    }
    ListenFd *l = listen_fds_find_fd(fd);
    if (l) {
        l->used = true;
    }
    *ret_family = ss.ss_family;
    return dup_fd;
}

size_t listen_fds_count(void)
{
    return nlisten_fds;
}

void listen_fds_get(size_t i, int *ret_fd, const char **ret_name,
                    bool *ret_used)
{
    *ret_fd = listen_fds[i].fd;
    *ret_name = listen_fds[i].name;
    *ret_used = listen_fds[i].used;
}

void listen_fds_clear(void)
{
    for (size_t i = 0; i < nlisten_fds; i++) {
        free(listen_fds[i].name);
    }
    nlisten_fds = 0;
}
