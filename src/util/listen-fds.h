/*
 * Listening sockets a program was given already open: by systemd's
 * socket activation (LISTEN_FDS, with names from LISTEN_FDNAMES) or
 * inherited from whoever started it.  QEMU's SocketAddress of type "fd"
 * ({"type": "fd", "str": "3"}) names one by number, or here also by its
 * activation name ("nbd").
 */
#ifndef BITBACK_LISTEN_FDS_H
#define BITBACK_LISTEN_FDS_H

#include <stdbool.h>
#include <stddef.h>
#include "util/error.h"

/* At most this many activated sockets are registered. */
#define LISTEN_FDS_MAX 64

/* Record that fd was passed to the program under `name` (NULL or "": no
 * name).  Main thread, at start-up.  false with errp set over
 * LISTEN_FDS_MAX. */
bool listen_fds_register(int fd, const char *name, Error **errp);

/* The socket `str` names: a decimal fd number, or the name of a
 * registered socket.  It must be an open, listening stream socket (else
 * a clear error: never a socket that would make accept() wait forever).
 * Returns a new close-on-exec duplicate the caller owns (the original
 * stays open, so a server can be stopped and started again on it), and
 * its address family in *ret_family; -1 with errp set.  Main thread. */
int listen_fds_resolve(const char *str, int *ret_family, Error **errp);

/* How many sockets were registered, and the i-th one: its fd, name (""
 * if none) and whether listen_fds_resolve has handed it out. */
size_t listen_fds_count(void);
void listen_fds_get(size_t i, int *ret_fd, const char **ret_name,
                    bool *ret_used);

/* Forget every registered socket (the fds stay open). */
void listen_fds_clear(void);

#endif
