/*
 * The QMP monitor: listening sockets (UNIX, or TCP with optional TLS),
 * their clients, event delivery and the daemon's main loop.
 *
 * Everything here runs on the main thread except qmp_event_emit() and
 * qmp_request_quit(), which only touch the event queue (under its mutex)
 * and the wake pipe.  The main loop is a single poll() over the wake pipe
(util/main-loop.h, which also holds the calls it runs for jobs),
 * every listening socket and every client; command handlers run inline, one
 * at a time.
 *
 * Per-client state machine:
 *   0. TLS (clients of a listener with tls-creds only): the TLS handshake
 *      runs step by step on the nonblocking socket (tls_session_handshake,
 *      polled for the direction it waits for), then the tls-authz check;
 *      nothing is queued or read as QMP before it succeeds (TLS from the
 *      first byte, no STARTTLS, as QEMU's chardev).  A failure closes the
 *      client with one line on stderr.  The greeting is queued when the
 *      handshake is done.  The negotiation deadline below covers this
 *      state too, so a client that stalls the handshake is dropped.
 *   1. CONNECTED: greeting queued; only qmp_capabilities is accepted
 *      (others get CommandNotFound "Expecting capabilities negotiation...").
 *      A client still here QMP_NEGOTIATION_SEC after it was accepted is
 *      closed, so idle sockets cannot hold the QMP_MAX_CLIENTS slots.
 *   2. NEGOTIATED: after a successful qmp_capabilities; every command runs
 *      and events are delivered.
 *   3. DEAD: EOF, a read/write error or an output backlog over
 *      QMP_MAX_OUTPUT; the client is closed at the end of the iteration.
 * Input invariants:
 *   a. The byte stream is parsed with one json_tokener per client, so an
 *      object may span reads and one read may hold several objects.
 *   b. A parse error gets one GenericError reply; the tokener is reset and
 *      the rest of that line in the current chunk is dropped, so the
 *      connection stays usable.
 *   c. A single object larger than QMP_MAX_REQUEST bytes is refused the same
 *      way, bounding memory per client.
 * The main loop never blocks on one client: sockets are nonblocking and
 * every send and recv uses MSG_DONTWAIT; output waits in the client's
 * buffer (bounded by QMP_MAX_OUTPUT) until poll() says it can go.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "crypto/authz.h"
#include "crypto/tls-creds.h"
#include "qmp/qmp-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/listen-fds.h"
#include "util/log.h"
#include "util/main-loop.h"
#include "util/osdep.h"

#define QMP_MAX_REQUEST   (16u * 1024 * 1024)
#define QMP_MAX_OUTPUT    (64u * 1024 * 1024)
#define QMP_MAX_CLIENTS   64
#define QMP_MAX_DEPTH     64
#define QMP_NEGOTIATION_SEC 10     /* to send qmp_capabilities, from accept */

typedef struct QmpListener {
    int fd;
    char *path;                /* UNIX socket file; NULL for TCP */
    TLSCreds *tls_creds;       /* referenced; NULL: no TLS */
    Authz *tls_authz;          /* referenced; NULL: every verified peer */
} QmpListener;

typedef struct QmpClient {
    int fd;
    TLSSession *tls;           /* NULL: plain socket */
    bool handshaking;          /* state 0 (TLS handshake) */
    const Authz *tls_authz;    /* the listener's (it outlives its clients) */
    size_t tls_send_len;       /* a TLS send of out[0..len) waits (EAGAIN) */
    struct json_tokener *tok;
    size_t pending;            /* bytes fed to tok since the last object */
    bool negotiated;
    uint64_t deadline_ns;      /* CLOCK_MONOTONIC; closed if not negotiated by then */
    bool dead;
    uint64_t serial;           /* unique per client ever added */
    char *out;
    size_t out_len, out_cap;
} QmpClient;

typedef struct QmpEvent {
    char *text;                /* serialized, with "\r\n" */
    struct QmpEvent *next;
} QmpEvent;

static QmpListener *listeners;
static size_t nlisteners;
static QmpClient **clients;
static size_t nclients;

/* Set once a monitor socket exists; until then (and in programs without a
 * monitor, like the CLI) events are dropped instead of queued. */
static bool have_monitor;
static volatile sig_atomic_t quit_flag;

static pthread_mutex_t event_lock = PTHREAD_MUTEX_INITIALIZER;
static QmpEvent *event_head, **event_tail = &event_head;

void qmp_request_quit(void)
{
    quit_flag = 1;
    main_loop_wake();
}

bool qmp_quit_requested(void)
{
    return quit_flag != 0;
}

/* ---- output ---- */

static void qmp_client_queue(QmpClient *c, const char *text, size_t len)
{
    if (c->dead) {
        return;
    }
    if (c->out_len + len > QMP_MAX_OUTPUT) {
        c->dead = true;            /* the client does not read: drop it */
        return;
    }
    if (c->out_len + len > c->out_cap) {
        size_t cap = MAX(c->out_cap * 2, c->out_len + len + 4096);
        char *n = realloc(c->out, cap);
        if (!n) {
            c->dead = true;
            return;
        }
        c->out = n;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, text, len);
    c->out_len += len;
}

static void qmp_client_send_json(QmpClient *c, struct json_object *obj)
{
    size_t len;
    const char *s = json_object_to_json_string_length(
        obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    qmp_client_queue(c, s, len);
    qmp_client_queue(c, "\r\n", 2);
}

/* After a failed send/recv on c's nonblocking socket: true to retry
 * (EINTR); else false, and c is dead unless the socket would block. */
static bool qmp_client_retry(QmpClient *c)
{
    if (errno == EINTR) {
        return true;
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
        c->dead = true;
    }
    return false;
}

/* One nonblocking send of the head of c's output: bytes sent, or -1 with
 * errno set.  A TLS send that would block is repeated with the same
 * length, as GnuTLS requires. */
static ssize_t qmp_client_send_some(QmpClient *c)
{
    if (!c->tls) {
        return send(c->fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    size_t len = c->tls_send_len ? c->tls_send_len : MIN(c->out_len, 16384);
    ssize_t n = tls_session_send(c->tls, c->out, len);
    c->tls_send_len = n < 0 && errno == EAGAIN ? len : 0;
    return n;
}

static void qmp_client_flush(QmpClient *c)
{
    while (!c->dead && !c->handshaking && c->out_len > 0) {
        ssize_t n = qmp_client_send_some(c);
        if (n < 0) {
            if (qmp_client_retry(c)) {
                continue;
            }
            return;
        }
        memmove(c->out, c->out + n, c->out_len - n);
        c->out_len -= n;
    }
}

/* ---- events ---- */

void qmp_event_emit(const char *name, struct json_object *data)
{
    struct timeval tv;
    if (!__atomic_load_n(&have_monitor, __ATOMIC_ACQUIRE)) {
        json_object_put(data);
        return;
    }
    gettimeofday(&tv, NULL);

    _cleanup_json_ struct json_object *ev = json_object_new_object();
    struct json_object *ts = json_object_new_object();
    json_object_object_add(ts, "seconds", json_object_new_int64(tv.tv_sec));
    json_object_object_add(ts, "microseconds", json_object_new_int64(tv.tv_usec));
    json_object_object_add(ev, "timestamp", ts);
    json_object_object_add(ev, "event", json_object_new_string(name));
    if (data) {
        json_object_object_add(ev, "data", data);
    }
    QmpEvent *e = calloc(1, sizeof(*e));
    if (!e || asprintf(&e->text, "%s\r\n", json_object_to_json_string_ext(
                           ev, JSON_C_TO_STRING_PLAIN |
                           JSON_C_TO_STRING_NOSLASHESCAPE)) < 0) {
        abort();
    }
    {
        LOCK_GUARD(&event_lock);
        *event_tail = e;
        event_tail = &e->next;
    }
    main_loop_wake();
}

static void qmp_deliver_events(void)
{
    QmpEvent *list;
    {
        LOCK_GUARD(&event_lock);
        list = event_head;
        event_head = NULL;
        event_tail = &event_head;
    }
    while (list) {
        QmpEvent *next = list->next;
        for (size_t i = 0; i < nclients; i++) {
            if (clients[i]->negotiated) {
                qmp_client_queue(clients[i], list->text, strlen(list->text));
            }
        }
        free(list->text);
        free(list);
        list = next;
    }
}

/* ---- input ---- */

static void qmp_client_error(QmpClient *c, const char *cls, const char *desc,
                             struct json_object *id)
{
    _cleanup_json_ struct json_object *reply = json_object_new_object();
    struct json_object *e = json_object_new_object();
    json_object_object_add(e, "class", json_object_new_string(cls));
    json_object_object_add(e, "desc", json_object_new_string(desc));
    json_object_object_add(reply, "error", e);
    if (id) {
        json_object_object_add(reply, "id", json_object_get(id));
    }
    qmp_client_send_json(c, reply);
}

static void qmp_client_handle(QmpClient *c, struct json_object *req)
{
    struct json_object *exec = NULL, *id = NULL;
    const char *name = NULL;

    if (json_object_is_type(req, json_type_object)) {
        json_object_object_get_ex(req, "id", &id);
        if (json_object_object_get_ex(req, "execute", &exec) &&
            json_object_is_type(exec, json_type_string)) {
            name = json_object_get_string(exec);
        }
    }
    bool is_caps = name && strcmp(name, "qmp_capabilities") == 0;
    if (name && !c->negotiated && !is_caps) {
        qmp_client_error(c, "CommandNotFound",
                         "Expecting capabilities negotiation with "
                         "'qmp_capabilities'", id);
        return;
    }
    if (is_caps && c->negotiated) {
        qmp_client_error(c, "CommandNotFound",
                         "Capabilities negotiation is already complete, "
                         "command ignored", id);
        return;
    }
    /* Bitmap changes the command makes (add, clear, a transaction, ...) are
     * one change, durable before the reply (write-intent.md W9). */
    bdrv_dirty_bitmap_batch_begin();
    _cleanup_json_ struct json_object *reply = qmp_dispatch(req);
    bdrv_dirty_bitmap_batch_end();
    /* Events emitted before or while the command ran go out before its
     * reply (QEMU emits them synchronously), so a client that sees a job's
     * new status in a reply has already received its JOB_STATUS_CHANGE. */
    qmp_deliver_events();
    if (is_caps && json_object_object_get_ex(reply, "return", NULL)) {
        c->negotiated = true;
    }
    qmp_client_send_json(c, reply);
}

static void qmp_client_feed(QmpClient *c, const char *buf, size_t len)
{
    size_t off = 0;

    while (off < len && !c->dead) {
        struct json_object *obj =
            json_tokener_parse_ex(c->tok, buf + off, (int)(len - off));
        enum json_tokener_error jerr = json_tokener_get_error(c->tok);
        size_t used = json_tokener_get_parse_end(c->tok);

        if (jerr == json_tokener_continue) {
            c->pending += len - off;
            if (c->pending > QMP_MAX_REQUEST) {
                qmp_client_error(c, "GenericError",
                                 "JSON parse error, request too large", NULL);
                json_tokener_reset(c->tok);
                c->pending = 0;
            }
            return;
        }
        if (jerr != json_tokener_success) {
            char desc[256];
            snprintf(desc, sizeof(desc), "JSON parse error, %s",
                     json_tokener_error_desc(jerr));
            qmp_client_error(c, "GenericError", desc, NULL);
            json_tokener_reset(c->tok);
            c->pending = 0;
            /* Invariant b: drop the rest of this line of the chunk. */
            const char *nl = memchr(buf + off + used, '\n', len - off - used);
            off = nl ? (size_t)(nl - buf) + 1 : len;
            continue;
        }
        off += used;
        c->pending = 0;
        /* json-c keeps state after an object only for a trailing number;
         * start each request from a clean tokener. */
        json_tokener_reset(c->tok);
        qmp_client_handle(c, obj);
        json_object_put(obj);
    }
}

/* ---- sockets ---- */

static void qmp_client_free(QmpClient *c)
{
    if (!c) {
        return;
    }
    tls_session_free(c->tls);
    if (c->fd >= 0) {
        close(c->fd);
    }
    json_tokener_free(c->tok);
    free(c->out);
    free(c);
}

static void qmp_greet(QmpClient *c)
{
    _cleanup_json_ struct json_object *g = json_object_new_object();
    struct json_object *qmp = json_object_new_object();
    json_object_object_add(qmp, "version", qmp_version_info());
    json_object_object_add(qmp, "capabilities", json_object_new_array());
    json_object_object_add(g, "QMP", qmp);
    qmp_client_send_json(c, g);
}

/* A new client for the nonblocking socket fd (owned from here on), its
 * greeting queued, or, for a listener l with TLS, in state 0; NULL (fd
 * closed) over QMP_MAX_CLIENTS or out of memory. */
static QmpClient *qmp_client_add(int fd, const QmpListener *l)
{
    static uint64_t next_serial;

    if (nclients >= QMP_MAX_CLIENTS) {
        close(fd);
        return NULL;
    }
    QmpClient *c = calloc(1, sizeof(*c));
    QmpClient **n = realloc(clients, (nclients + 1) * sizeof(*n));
    if (!c || !n) {
        free(c);
        close(fd);
        if (n) {
            clients = n;
        }
        return NULL;
    }
    clients = n;
    c->fd = fd;
    c->serial = ++next_serial;
    c->deadline_ns = clock_monotonic_ns() + QMP_NEGOTIATION_SEC * UINT64_C(1000000000);
    c->tok = json_tokener_new_ex(QMP_MAX_DEPTH);
    if (!c->tok) {
        qmp_client_free(c);
        return NULL;
    }
    if (l && l->tls_creds) {
        Error *err = NULL;
        c->tls = tls_session_new(l->tls_creds, fd, NULL, &err);
        if (!c->tls) {
            error_report_err(err);
            qmp_client_free(c);
            return NULL;
        }
        c->handshaking = true;
        c->tls_authz = l->tls_authz;
    }
    clients[nclients++] = c;
    if (!c->handshaking) {
        qmp_greet(c);
    }
    return c;
}

static void qmp_accept(QmpListener *l)
{
    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {                 /* else EAGAIN, ECONNABORTED, EMFILE: retry later */
        /* TCP: replies and events go out at once, not after the client's
         * delayed ACK (fails harmlessly on a UNIX socket). */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        qmp_client_add(fd, l);
    }
}

/* State 0: one step of c's TLS handshake; the greeting once it is done. */
static void qmp_client_handshake(QmpClient *c)
{
    Error *err = NULL;
    int r = tls_session_handshake(c->tls, c->tls_authz, &err);
    if (r < 0) {
        log_msg(LOG_LEVEL_WARNING, "QMP: client refused: %s",
                error_get_pretty(err));
        error_free(err);
        c->dead = true;
    } else if (r > 0) {
        c->handshaking = false;
        qmp_greet(c);
    }
}

/* Register listener fd (owned from here on) and make the monitor the
 * event sink. */
static void qmp_listener_add(int fd, char *path, TLSCreds *creds, Authz *authz)
{
    QmpListener *n = realloc(listeners, (nlisteners + 1) * sizeof(*n));
    if (!n) {
        abort();
    }
    listeners = n;
    listeners[nlisteners] = (QmpListener){
        .fd = fd, .path = path, .tls_creds = creds, .tls_authz = authz,
    };
    __atomic_store_n(&have_monitor, true, __ATOMIC_RELEASE);
    event_sink_set(qmp_event_emit);
    nlisteners++;
}

/* The main loop must never block in accept(): make listening socket fd
 * nonblocking (for a passed socket the flag is shared with its maker,
 * whose only user is the daemon).  false with errp set. */
static bool listener_set_nonblocking(int fd, const char *what, Error **errp)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        error_setg_errno(errp, errno, "cannot make socket '%s' nonblocking",
                         what);
        return false;
    }
    return true;
}

bool qmp_monitor_add_unix(const char *path, Error **errp)
{
    main_loop_wake_fd();
    /* unix_listen replaces a stale socket (QEMU does too) and never
     * removes anything that is not a socket. */
    _cleanup_close_ int fd = unix_listen(path, errp);
    if (fd < 0) {
        return false;
    }
    if (!listener_set_nonblocking(fd, path, errp)) {
        unlink(path);
        return false;
    }
    char *p = strdup(path);
    if (!p) {
        abort();
    }
    qmp_listener_add(fd, p, NULL, NULL);
    fd = -1;                       /* now owned by the listener */
    return true;
}

bool qmp_monitor_add_inet(const char *host, const char *port,
                          const char *tls_creds, const char *tls_authz,
                          Error **errp)
{
    main_loop_wake_fd();
    _cleanup_(tls_creds_putp) TLSCreds *creds = NULL;
    _cleanup_(authz_putp) Authz *authz = NULL;
    if (!tls_server_objects_get(tls_creds, tls_authz, &creds, &authz, errp)) {
        return false;
    }
    int fd = inet_listen(host, port, SOCK_NONBLOCK, errp);
    if (fd < 0) {
        return false;
    }
    if (!creds && !inet_host_is_loopback(host)) {
        /* Allowed, as QEMU allows it, but anyone who reaches the port
         * controls the daemon. */
        log_msg(LOG_LEVEL_WARNING, "QMP monitor on %s:%s without "
                "TLS: anyone who can reach it controls the daemon "
                "(add tls-creds=ID)", host && *host ? host : "*", port);
    }
    qmp_listener_add(fd, NULL, steal_pointer(&creds), steal_pointer(&authz));
    return true;
}

bool qmp_monitor_add_fd(const char *str, const char *tls_creds,
                        const char *tls_authz, Error **errp)
{
    main_loop_wake_fd();
    _cleanup_(tls_creds_putp) TLSCreds *creds = NULL;
    _cleanup_(authz_putp) Authz *authz = NULL;
    if (!tls_server_objects_get(tls_creds, tls_authz, &creds, &authz, errp)) {
        return false;
    }
    int family;
    _cleanup_close_ int fd = listen_fds_resolve(str, &family, errp);
    if (fd < 0) {
        return false;
    }
    if (!listener_set_nonblocking(fd, str, errp)) {
        return false;
    }
    /* Its file, if any, belongs to whoever made the socket: path NULL. */
    qmp_listener_add(fd, NULL, steal_pointer(&creds), steal_pointer(&authz));
    fd = -1;                       /* now owned by the listener */
    return true;
}

static void qmp_reap_clients(void)
{
    size_t j = 0;
    for (size_t i = 0; i < nclients; i++) {
        if (clients[i]->dead) {
            qmp_client_free(clients[i]);
        } else {
            clients[j++] = clients[i];
        }
    }
    nclients = j;
}

/* Mark dead every client that missed its negotiation deadline; return the
 * poll() timeout until the nearest deadline still ahead (-1: none). */
static int qmp_expire_clients(void)
{
    uint64_t now = clock_monotonic_ns();
    uint64_t next = UINT64_MAX;
    for (size_t i = 0; i < nclients; i++) {
        QmpClient *c = clients[i];
        if (c->negotiated || c->dead) {
            continue;
        }
        if (c->deadline_ns <= now) {
            c->dead = true;
        } else {
            next = MIN(next, c->deadline_ns);
        }
    }
    return next == UINT64_MAX ? -1 : clock_ms_until(next);
}

static void qmp_client_read(QmpClient *c)
{
    char buf[65536];
    for (;;) {
        ssize_t n = c->tls ? tls_session_recv(c->tls, buf, sizeof(buf))
                           : recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n < 0) {
            if (qmp_client_retry(c)) {
                continue;
            }
            return;
        }
        if (n == 0) {
            c->dead = true;
            return;
        }
        qmp_client_feed(c, buf, n);
        /* One chunk per wakeup keeps other clients served (and a handler
         * that requested quit is noticed promptly). */
        return;
    }
}

/* Best effort: give replies (e.g. quit's) up to 1 s to reach the clients. */
static void qmp_flush_all_blocking(void)
{
    for (int round = 0; round < 100; round++) {
        bool pending = false;
        for (size_t i = 0; i < nclients; i++) {
            qmp_client_flush(clients[i]);
            pending |= !clients[i]->dead && clients[i]->out_len > 0;
        }
        if (!pending) {
            return;
        }
        poll(NULL, 0, 10);
    }
}

/* One turn of the main loop: wait for the wake pipe, a listener or a
 * client, then serve what is ready. */
static void qmp_main_loop_once(void)
{
    int wake_fd = main_loop_wake_fd();
    main_loop_run_pending();   /* what was scheduled before the pipe */
    int timeout = qmp_expire_clients();
    qmp_reap_clients();
    size_t nfds = 1 + nlisteners + nclients;
    _cleanup_free_ struct pollfd *pfd = calloc(nfds, sizeof(*pfd));
    if (!pfd) {
        abort();
    }
    pfd[0].fd = wake_fd;
    pfd[0].events = POLLIN;
    for (size_t i = 0; i < nlisteners; i++) {
        pfd[1 + i].fd = listeners[i].fd;
        pfd[1 + i].events = POLLIN;
    }
    size_t ncl = nclients;     /* clients accepted below are polled next time */
    for (size_t i = 0; i < ncl; i++) {
        QmpClient *c = clients[i];
        pfd[1 + nlisteners + i].fd = c->fd;
        if (c->handshaking) {
            pfd[1 + nlisteners + i].events =
                tls_session_wants_write(c->tls) ? POLLOUT : POLLIN;
        } else {
            pfd[1 + nlisteners + i].events =
                POLLIN | (c->out_len ? POLLOUT : 0);
        }
        if (c->tls && !c->handshaking && tls_session_pending(c->tls)) {
            timeout = 0;       /* decrypted input poll() cannot see */
        }
    }
    if (poll(pfd, nfds, timeout) < 0) {
        if (errno == EINTR) {
            return;
        }
        perror("poll");
        abort();
    }
    if (pfd[0].revents & POLLIN) {
        main_loop_wake_drain();
    }
    for (size_t i = 0; i < ncl && !quit_flag; i++) {
        QmpClient *c = clients[i];
        short re = pfd[1 + nlisteners + i].revents;
        if (c->handshaking) {
            if (re) {
                qmp_client_handshake(c);
            }
        } else if ((re & (POLLIN | POLLHUP | POLLERR)) ||
                   (c->tls && tls_session_pending(c->tls))) {
            qmp_client_read(c);
        }
    }
    for (size_t i = 0; i < nlisteners; i++) {
        if (pfd[1 + i].revents & POLLIN) {
            qmp_accept(&listeners[i]);
        }
    }
    main_loop_run_pending();
    qmp_deliver_events();
    for (size_t i = 0; i < nclients; i++) {
        qmp_client_flush(clients[i]);
    }
    qmp_reap_clients();
}

void qmp_main_loop(void)
{
    while (!quit_flag) {
        qmp_main_loop_once();
    }
    qmp_deliver_events();
    qmp_flush_all_blocking();
}

static bool qmp_client_listed(uint64_t serial)
{
    for (size_t i = 0; i < nclients; i++) {
        if (clients[i]->serial == serial) {
            return true;
        }
    }
    return false;
}

void qmp_monitor_serve_fd(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        close(fd);
        return;
    }
    QmpClient *c = qmp_client_add(fd, NULL);
    if (!c) {
        return;
    }
    uint64_t serial = c->serial;
    while (!quit_flag && qmp_client_listed(serial)) {
        qmp_main_loop_once();
    }
}

void qmp_monitor_cleanup(void)
{
    for (size_t i = 0; i < nclients; i++) {
        qmp_client_free(clients[i]);
    }
    free(clients);
    clients = NULL;
    nclients = 0;
    for (size_t i = 0; i < nlisteners; i++) {
        close(listeners[i].fd);
        if (listeners[i].path) {
            unlink(listeners[i].path);
        }
        free(listeners[i].path);
        tls_creds_put(listeners[i].tls_creds);
        authz_put(listeners[i].tls_authz);
    }
    free(listeners);
    listeners = NULL;
    nlisteners = 0;
    LOCK_GUARD(&event_lock);
    while (event_head) {
        QmpEvent *e = event_head;
        event_head = e->next;
        free(e->text);
        free(e);
    }
    event_tail = &event_head;
}
