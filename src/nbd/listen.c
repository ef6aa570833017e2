/*
 * NBD server listening: the server state (nbd_srv), the listening UNIX or
 * TCP socket (made here, or passed to the daemon: type "fd"), the accept thread, and server start and stop.
 *
 * Contract: nbd_server_start either leaves a running server (listening
 * socket, wake pipe and accept thread) or nothing at all.
 * nbd_server_stop stops accepting, disconnects every client (requests
 * already read are answered, invariant 3 in nbd-internal.h), waits for
 * them, and frees every export.  The accept thread hands each accepted
 * socket to connections.c, which enforces max_connections.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "nbd/nbd-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/listen-fds.h"
#include "util/osdep.h"

NBDServer nbd_srv = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .cond = PTHREAD_COND_INITIALIZER,
    .listen_fd = -1,
    .wake_pipe = { -1, -1 },
};

/* The accept thread: accepts connections and enforces the handshake
 * deadline (invariant 7), waking up for the nearest one.  Every connection
 * is added by this thread, so a new deadline is seen on the next turn. */
static void *accept_main(void *opaque)
{
    for (;;) {
        struct pollfd p[2] = {
            { .fd = nbd_srv.listen_fd, .events = POLLIN },
            { .fd = nbd_srv.wake_pipe[0], .events = POLLIN },
        };
        uint64_t next = nbd_clients_expire_handshakes();
        int timeout = next ? clock_ms_until(next) : -1;
        if (poll(p, 2, timeout) < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        if (p[1].revents) {
            break;
        }
        if (!(p[0].revents & POLLIN)) {
            continue;
        }
        int fd = accept4(nbd_srv.listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
                errno == ENOMEM) {
                poll(NULL, 0, 100);   /* let resources come back */
            }
            continue;
        }
        nbd_client_start(fd, nbd_srv.inet);
    }
    return NULL;
}

static const char *addr_str(struct json_object *o, const char *key)
{
    struct json_object *v;
    if (!json_object_object_get_ex(o, key, &v)) {
        return NULL;
    }
    if (json_object_is_type(v, json_type_string)) {
        return json_object_get_string(v);
    }
    return NULL;
}

/* Close the listening socket and the wake pipe and remove the UNIX socket
 * file (nbd_srv.lock held, no accept thread running). */
static void listener_close_locked(void)
{
    close(nbd_srv.listen_fd);
    close(nbd_srv.wake_pipe[0]);
    close(nbd_srv.wake_pipe[1]);
    nbd_srv.listen_fd = nbd_srv.wake_pipe[0] = nbd_srv.wake_pipe[1] = -1;
    if (nbd_srv.unix_path) {
        unlink(nbd_srv.unix_path);
    }
    free(nbd_srv.unix_path);
    nbd_srv.unix_path = NULL;
}

bool nbd_server_start(struct json_object *addr, unsigned max_connections,
                      unsigned handshake_max_seconds, Error **errp)
{
    return nbd_server_start_tls(addr, max_connections, handshake_max_seconds,
                                NULL, NULL, errp);
}

bool nbd_server_start_tls(struct json_object *addr, unsigned max_connections,
                          unsigned handshake_max_seconds, const char *tls_creds,
                          const char *tls_authz, Error **errp)
{
    if (nbd_server_is_running()) {
        error_setg(errp, "NBD server already running");
        return false;
    }
    _cleanup_(tls_creds_putp) TLSCreds *creds = NULL;
    _cleanup_(authz_putp) Authz *authz = NULL;
    if (!tls_server_objects_get(tls_creds, tls_authz, &creds, &authz, errp)) {
        return false;
    }
    if (!addr || !json_object_is_type(addr, json_type_object)) {
        error_setg(errp, "NBD server address must be an object");
        return false;
    }
    const char *type = addr_str(addr, "type");
    struct json_object *data;
    if (json_object_object_get_ex(addr, "data", &data) &&
        json_object_is_type(data, json_type_object)) {
        addr = data;   /* the legacy {"type": ..., "data": {...}} form */
    }
    if (!type) {
        error_setg(errp, "NBD server address needs 'type'");
        return false;
    }
    int fd;
    bool inet = false;
    char where[320];               /* the address, for the log */
    _cleanup_free_ char *unix_path = NULL;
    if (strcmp(type, "unix") == 0) {
        const char *path = addr_str(addr, "path");
        if (!path || !*path) {
            error_setg(errp, "NBD server address needs 'path'");
            return false;
        }
        unix_path = strdup(path);
        if (!unix_path) {
            error_setg(errp, "out of memory");
            return false;
        }
        fd = unix_listen(path, errp);
        snprintf(where, sizeof(where), "unix:%s", path);
    } else if (strcmp(type, "inet") == 0) {
        const char *host = addr_str(addr, "host");
        struct json_object *pv;
        char port[32];
        if (!json_object_object_get_ex(addr, "port", &pv)) {
            snprintf(port, sizeof(port), "10809");
        } else if (json_object_is_type(pv, json_type_int)) {
            int64_t p = json_object_get_int64(pv);
            if (p < 0 || p > 65535) {
                error_setg(errp, "bad port %lld", (long long)p);
                return false;
            }
            snprintf(port, sizeof(port), "%lld", (long long)p);
        } else if (json_object_is_type(pv, json_type_string) &&
                   strlen(json_object_get_string(pv)) < sizeof(port)) {
            snprintf(port, sizeof(port), "%s", json_object_get_string(pv));
        } else {
            error_setg(errp, "bad 'port'");
            return false;
        }
        fd = inet_listen(host, port, 0, errp);
        snprintf(where, sizeof(where), "%.256s:%s", host ? host : "*", port);
        inet = true;
    } else if (strcmp(type, "fd") == 0) {
        /* A socket the daemon was given (socket activation); its file,
         * if any, belongs to whoever made it: never unlinked here. */
        int family;
        fd = listen_fds_resolve(addr_str(addr, "str"), &family, errp);
        inet = family != AF_UNIX;
        snprintf(where, sizeof(where), "passed socket '%.256s'",
                 addr_str(addr, "str") ? addr_str(addr, "str") : "");
    } else {
        error_setg(errp, "unsupported NBD server address type '%s'", type);
        return false;
    }
    if (fd < 0) {
        return false;
    }
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        error_setg_errno(errp, errno, "cannot create pipe");
        close(fd);
        if (unix_path) {
            unlink(unix_path);
        }
        return false;
    }
    LOCK_GUARD(&nbd_srv.lock);
    nbd_srv.listen_fd = fd;
    nbd_srv.wake_pipe[0] = pfd[0];
    nbd_srv.wake_pipe[1] = pfd[1];
    nbd_srv.inet = inet;
    nbd_srv.max_connections = max_connections;
    nbd_srv.handshake_max_ns = handshake_max_seconds * UINT64_C(1000000000);
    /* More workers than CPUs only pays while requests wait for a disk; on
     * cached data extra threads just add context switches. */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    nbd_srv.max_workers = (int)MIN(MAX(4 * (ncpu > 0 ? ncpu : 1), 8L),
                               (long)NBD_MAX_WORKERS);
    nbd_srv.unix_path = steal_pointer(&unix_path);
    nbd_srv.tls_creds = creds;
    nbd_srv.tls_authz = authz;
    if (pthread_create(&nbd_srv.accept_thread, NULL, accept_main, NULL) != 0) {
        error_setg(errp, "cannot start the NBD accept thread");
        listener_close_locked();
        nbd_srv.tls_creds = NULL;
        nbd_srv.tls_authz = NULL;
        return false;
    }
    nbd_srv.running = true;
    log_msg(LOG_LEVEL_INFO, "NBD server listening on %s%s", where,
            creds ? " (TLS)" : "");
    creds = NULL;    /* the server's now, until nbd_server_stop */
    authz = NULL;
    return true;
}

int nbd_server_port(void)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    LOCK_GUARD(&nbd_srv.lock);
    if (!nbd_srv.running || !nbd_srv.inet ||
        getsockname(nbd_srv.listen_fd, (struct sockaddr *)&ss, &len) < 0) {
        return -1;
    }
    if (ss.ss_family == AF_INET) {
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
    if (ss.ss_family == AF_INET6) {
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    return -1;
}

bool nbd_server_is_running(void)
{
    LOCK_GUARD(&nbd_srv.lock);
    return nbd_srv.running;
}

void nbd_server_stop(void)
{
    pthread_mutex_lock(&nbd_srv.lock);
    if (nbd_srv.running) {
        nbd_srv.running = false;
        ssize_t w;
        do {
            w = write(nbd_srv.wake_pipe[1], "x", 1);
        } while (w < 0 && errno == EINTR);
        pthread_mutex_unlock(&nbd_srv.lock);
        pthread_join(nbd_srv.accept_thread, NULL);
        pthread_mutex_lock(&nbd_srv.lock);
        listener_close_locked();
        log_msg(LOG_LEVEL_INFO, "NBD server stopped");
    }
    /* Disconnect every client: requests already read are answered, in
     * bounded time (invariant 3). */
    nbd_clients_disconnect_locked(&nbd_srv.nclients);
    NBDExport *list = nbd_srv.exports;
    nbd_srv.exports = NULL;
    /* No connection is left to use them. */
    TLSCreds *creds = steal_pointer(&nbd_srv.tls_creds);
    Authz *authz = steal_pointer(&nbd_srv.tls_authz);
    pthread_mutex_unlock(&nbd_srv.lock);
    tls_creds_put(creds);
    authz_put(authz);
    while (list) {
        NBDExport *next = list->next;
        nbd_export_finish(list);
        list = next;
    }
}
