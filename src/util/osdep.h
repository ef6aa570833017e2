/*
 * Opening files that must be what they claim to be (files, not FIFOs), and
 * creating UNIX socket paths with a mode that does not depend on the umask,
 * and the TCP sockets of listeners and clients.
 */
#ifndef BITBACK_OSDEP_H
#define BITBACK_OSDEP_H

#include <stdbool.h>
#include <sys/socket.h>
#include <sys/types.h>
#include "util/error.h"

/* open_checked's `how` bits. */
#define OPEN_NOFOLLOW   0x1   /* refuse a symbolic link as the last component */
#define OPEN_BLOCKDEV   0x2   /* accept a block device as well */

/* open(path, oflags, mode) that never blocks on, and never returns, anything
 * but a regular file (or, with OPEN_BLOCKDEV, a block device): the open
 * itself is O_NONBLOCK (so a FIFO cannot hang it), the type is checked with
 * fstat on the fd that was opened (no race with a rename), then O_NONBLOCK
 * is cleared.  With OPEN_NOFOLLOW the open is O_NOFOLLOW.  O_CLOEXEC is
 * always added.  Returns the fd, or -1 with errno set and errp naming the
 * file and why (a symbolic link, a FIFO, a directory, ...). */
int open_checked(const char *path, int oflags, mode_t mode, unsigned how,
                 Error **errp);

/* The mode of the UNIX sockets unix_bind_private creates: 0600 unless the
 * program chose another (bitbackd --socket-mode 0660) before it creates
 * any socket. */
void unix_socket_mode_set(mode_t mode);
mode_t unix_socket_mode(void);

/* bind() the UNIX socket `fd` to `path` (shorter than sun_path: checked by
 * the caller) so that the socket file has exactly unix_socket_mode(),
 * whatever the process umask, and never appears at `path` with another
 * mode: it is bound in a private 0700 folder next to `path`, chmod'ed
 * there, then renamed into place.  No umask change, so it is safe while
 * other threads create files (nbd-server-start runs while workers do).
 * Like bind(), it fails (EEXIST) when something is already at `path`:
 * callers remove a stale socket first.  false with errp set. */
bool unix_bind_private(int fd, const char *path, Error **errp);
/* A UNIX socket listening at `path` (bound with unix_bind_private, so
 * its mode is 0600 or the program's choice), close-on-exec; a stale
 * socket at `path` is replaced, anything else there is an error.  The
 * fd, or -1 with errp set. */
int unix_listen(const char *path, Error **errp);

/* A TCP socket listening on host:port (host NULL or "": every address),
 * SO_REUSEADDR, close-on-exec, plus `flags` (SOCK_NONBLOCK) on the
 * socket; the first address getaddrinfo gives that binds.  The fd, or -1
 * with errp set. */
int inet_listen(const char *host, const char *port, int flags, Error **errp);
/* A blocking TCP socket connected to host:port (each address getaddrinfo
 * gives, in order), close-on-exec.  The fd, or -1 with errp set. */
int inet_connect(const char *host, const char *port, Error **errp);
/* True when host names only loopback addresses (every address it
 * resolves to is 127.0.0.0/8 or ::1); false for "" / NULL (every
 * address) and for a name that does not resolve. */
bool inet_host_is_loopback(const char *host);
/* Split "HOST:PORT", "[V6ADDR]:PORT" (brackets removed) into new strings;
 * false with errp set when there is no port or the brackets are not
 * closed. */
bool inet_parse_host_port(const char *s, char **ret_host, char **ret_port,
                          Error **errp);

#endif
