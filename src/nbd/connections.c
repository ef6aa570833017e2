/*
 * NBD server connections: the life of one client's connection.  Its
 * thread negotiates (handshake.c) and then serves as worker 0; workers take
 * turns at reading one request under recv_lock (the leader/follower
 * pattern described in nbd-internal.h), and a worker that takes a request
 * while no other is idle starts another, up to nbd_srv.max_workers.
 *
 * Contract: a connection is in nbd_srv.clients and counts in
 * nbd_srv.nclients from nbd_client_start until its thread has joined every
 * worker, closed the socket and dropped its export pin (invariants 3 and
 * 4 in nbd-internal.h).  The bytes of requests in flight stay under
 * NBD_MAX_INFLIGHT_BYTES (invariant 5).  A connection still negotiating
 * at its handshake deadline is shut (invariant 7); disconnecting clients
 * takes bounded time (invariant 3).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "nbd/nbd-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define NBD_KEEP_BUF           (4u * 1024 * 1024)   /* larger buffers are freed after use */
#define NBD_BUF_ALIGN          4096
#define NBD_STOP_GRACE_SEC     5    /* then replies in progress are cut off */

void nbd_client_set_closing(NBDClient *c)
{
    LOCK_GUARD(&c->lock);
    c->closing = true;
    pthread_cond_broadcast(&c->cond);
}

/* Make w->buf hold at least len bytes.  0 or -ENOMEM. */
int nbd_worker_buf(NBDWorker *w, size_t len)
{
    if (len <= w->cap) {
        return 0;
    }
    free(w->buf);
    w->buf = NULL;
    w->cap = 0;
    size_t cap = ROUND_UP(MAX(len, (size_t)65536), (size_t)65536);
    void *p = NULL;
    if (posix_memalign(&p, NBD_BUF_ALIGN, cap) != 0) {
        return -ENOMEM;
    }
    w->buf = p;
    w->cap = cap;
    return 0;
}

static void *worker_main(void *opaque);

/* Start one more worker if every current one is busy (c->lock held). */
static void maybe_spawn_worker_locked(NBDClient *c)
{
    if (c->closing || c->busy < c->nworkers || c->nworkers >= nbd_srv.max_workers) {
        return;
    }
    NBDWorker *w = &c->workers[c->nworkers];
    *w = (NBDWorker){ .c = c };
    if (pthread_create(&w->thread, NULL, worker_main, w) == 0) {
        c->nworkers++;
    }
}

/* Read the next request under recv_lock.  Returns 1 with *req filled (and
 * its payload in w->buf), or 0 when the connection is closing. */
static int receive_request(NBDClient *c, NBDWorker *w, NBDRequest *req)
{
    LOCK_GUARD(&c->recv_lock);
next:
    {
        LOCK_GUARD(&c->lock);
        if (c->closing) {
            return 0;
        }
    }
    uint8_t h[NBD_REQUEST_SIZE];
    if (nbd_client_recv(c, h, sizeof(h)) < 0 ||
        ld_be32(h) != NBD_REQUEST_MAGIC) {
        nbd_client_set_closing(c);
        return 0;
    }
    *req = (NBDRequest){
        .flags = ld_be16(h + 4),
        .type = ld_be16(h + 6),
        .handle = ld_be64(h + 8),
        .offset = ld_be64(h + 16),
        .len = ld_be32(h + 24),
    };
    if (nbd_try_read_inline(c, w, req)) {
        goto next;
    }
    if (req->type == NBD_CMD_DISC) {
        nbd_client_set_closing(c);
        return 0;
    }
    if (req->type == NBD_CMD_WRITE && req->len > NBD_MAX_PAYLOAD) {
        /* Skipping up to 4 GiB is not worth it: drop the client. */
        nbd_client_set_closing(c);
        return 0;
    }
    bool payload = req->type == NBD_CMD_WRITE ||
                   (req->type == NBD_CMD_READ && req->len <= NBD_MAX_PAYLOAD);
    req->budget = payload ? req->len : 0;
    {
        LOCK_GUARD(&c->lock);
        while (!c->closing && c->inflight_bytes > 0 &&
               c->inflight_bytes + req->budget > NBD_MAX_INFLIGHT_BYTES) {
            pthread_cond_wait(&c->cond, &c->lock);
        }
        if (c->closing) {
            return 0;
        }
        c->inflight_bytes += req->budget;
        c->busy++;
    }
    if (req->type == NBD_CMD_WRITE && req->len > 0) {
        int r = nbd_worker_buf(w, req->len);
        int rr = r < 0 ? nbd_client_recv_discard(c, req->len)
                       : nbd_client_recv(c, w->buf, req->len);
        if (rr < 0) {
            /* Disconnected mid-payload: this request was never accepted. */
            LOCK_GUARD(&c->lock);
            c->inflight_bytes -= req->budget;
            c->busy--;
            c->closing = true;
            pthread_cond_broadcast(&c->cond);
            return 0;
        }
        req->early_err = r < 0 ? -r : 0;
    }
    LOCK_GUARD(&c->lock);
    maybe_spawn_worker_locked(c);
    return 1;
}

static void worker_loop(NBDWorker *w)
{
    NBDClient *c = w->c;
    NBDRequest req;
    while (receive_request(c, w, &req)) {
        nbd_handle_request(c, w, &req);
        if (w->cap > NBD_KEEP_BUF) {
            free(w->buf);
            w->buf = NULL;
            w->cap = 0;
        }
        LOCK_GUARD(&c->lock);
        c->inflight_bytes -= req.budget;
        c->busy--;
        pthread_cond_broadcast(&c->cond);
    }
}

static void *worker_main(void *opaque)
{
    worker_loop(opaque);
    return NULL;
}

static void client_free(NBDClient *c)
{
    pthread_mutex_destroy(&c->recv_lock);
    pthread_mutex_destroy(&c->send_lock);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c->bitmap_ids);
    free(c->rbuf);
    free(c);
}

/* Take c out of nbd_srv.clients, close its socket, drop its export pin
 * and free it (the end of a connection, invariants 3 and 4). */
static void client_remove(NBDClient *c)
{
    pthread_mutex_lock(&nbd_srv.lock);
    for (NBDClient **pp = &nbd_srv.clients; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    close(c->fd);
    if (c->exp) {
        c->exp->nclients--;
    }
    nbd_srv.nclients--;
    pthread_cond_broadcast(&nbd_srv.cond);
    pthread_mutex_unlock(&nbd_srv.lock);
    client_free(c);
}

/* The connection thread: negotiate, serve as worker 0, then wait for the
 * other workers (each answers its request first) and close. */
static void *client_main(void *opaque)
{
    NBDClient *c = opaque;
    c->workers[0] = (NBDWorker){ .c = c, .thread = pthread_self() };
    c->nworkers = 1;
    c->rbuf = malloc(NBD_RECV_BUF);
    if (c->rbuf && nbd_negotiate(c) == OPT_TRANSMIT) {
        {
            LOCK_GUARD(&nbd_srv.lock);
            c->handshake_deadline_ns = 0;   /* invariant 7 no longer applies */
        }
        worker_loop(&c->workers[0]);
    }
    nbd_client_set_closing(c);
    int n;
    {
        LOCK_GUARD(&c->lock);
        n = c->nworkers;
    }
    for (int i = 1; i < n; i++) {
        pthread_join(c->workers[i].thread, NULL);
    }
    for (int i = 0; i < n; i++) {
        free(c->workers[i].buf);
    }

    client_remove(c);
    return NULL;
}

/* A new connection for the socket fd (owned from here on), counted in
 * nbd_srv.clients and nclients, with its handshake deadline set; NULL
 * (fd closed) when over max_connections or out of memory. */
static NBDClient *client_add(int fd, bool inet)
{
    nbd_socket_setup(fd, inet);

    NBDClient *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return NULL;
    }
    c->fd = fd;
    c->inet = inet;
    /* Adaptive mutexes spin a little before sleeping: the socket locks
     * are held for one recv()/send() at a time. */
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
    pthread_mutex_init(&c->recv_lock, &ma);
    pthread_mutex_init(&c->send_lock, &ma);
    pthread_mutexattr_destroy(&ma);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);

    LOCK_GUARD(&nbd_srv.lock);
    if (nbd_srv.max_connections && nbd_srv.nclients >= nbd_srv.max_connections) {
        close(fd);
        client_free(c);
        return NULL;
    }
    if (nbd_srv.handshake_max_ns) {
        c->handshake_deadline_ns = clock_monotonic_ns() + nbd_srv.handshake_max_ns;
    }
    c->next = nbd_srv.clients;
    nbd_srv.clients = c;
    nbd_srv.nclients++;
    return c;
}

void nbd_client_start(int fd, bool inet)
{
    NBDClient *c = client_add(fd, inet);
    if (!c) {
        return;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    if (pthread_create(&t, &attr, client_main, c) != 0) {
        client_remove(c);
    }
    pthread_attr_destroy(&attr);
}

void nbd_server_serve_fd(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    bool inet = getsockname(fd, (struct sockaddr *)&ss, &len) == 0 &&
                (ss.ss_family == AF_INET || ss.ss_family == AF_INET6);
    NBDClient *c = client_add(fd, inet);
    if (c) {
        client_main(c);
    }
}

uint64_t nbd_clients_expire_handshakes(void)
{
    uint64_t now = clock_monotonic_ns();
    uint64_t next = 0;
    LOCK_GUARD(&nbd_srv.lock);
    for (NBDClient *c = nbd_srv.clients; c; c = c->next) {
        if (!c->handshake_deadline_ns) {
            continue;
        }
        if (c->handshake_deadline_ns <= now) {
            /* Unblocks the connection thread's recv() or send(); it then
             * ends the connection as on EOF and frees its slot. */
            shutdown(c->fd, SHUT_RDWR);
            c->handshake_deadline_ns = 0;
        } else if (!next || c->handshake_deadline_ns < next) {
            next = c->handshake_deadline_ns;
        }
    }
    return next;
}

/* Shut the sockets of e's connections (every one when e is NULL). */
static void clients_shutdown_locked(const NBDExport *e, int how)
{
    for (NBDClient *c = nbd_srv.clients; c; c = c->next) {
        if (!e || c->exp == e) {
            shutdown(c->fd, how);
        }
    }
}

void nbd_clients_disconnect_locked(const NBDExport *e, const unsigned *count)
{
    /* Requests already read are answered first (invariant 3)... */
    clients_shutdown_locked(e, SHUT_RD);
    struct timespec grace;
    clock_gettime(CLOCK_REALTIME, &grace);   /* nbd_srv.cond's clock */
    grace.tv_sec += NBD_STOP_GRACE_SEC;
    while (*count > 0) {
        if (pthread_cond_timedwait(&nbd_srv.cond, &nbd_srv.lock,
                                   &grace) == ETIMEDOUT) {
            break;
        }
    }
    /* ...but a peer that reads a large reply slowly, or not at all until
     * the send timeout, must not hold the stop up: cut its replies off. */
    if (*count > 0) {
        clients_shutdown_locked(e, SHUT_RDWR);
    }
    while (*count > 0) {
        pthread_cond_wait(&nbd_srv.cond, &nbd_srv.lock);
    }
}
