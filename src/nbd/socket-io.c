/*
 * NBD server socket I/O: how bytes cross a client's socket.
 *
 * nbd_recv_full / nbd_send_iov / nbd_send_buf move whole buffers on a bare
 * fd; nbd_conn_* do the same on a connection, through its TLS session
 * once STARTTLS made one (the handshake uses these).  With TLS every read
 * and write of the connection goes through the session; without it the
 * only cost is one test of c->tls per call.  In the transmission phase a
 * connection reads through nbd_client_recv, which serves pipelined request
 * headers from the connection's buffer and busy-polls the socket briefly
 * while requests arrive close together; the caller holds recv_lock
 * (invariant 1 in nbd-internal.h).  Every reply goes out through
 * nbd_client_send, whole, under send_lock; a failed send shuts the socket
 * and ends the connection (invariant 3).  nbd_socket_setup sets the
 * options of an accepted socket, among them the send timeout that drops a
 * peer which stops reading.  The busy poll lives here rather than with the
 * connection threads because it is how one receive is done, not a thread's
 * business.
 */
#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "nbd/nbd-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define NBD_SEND_TIMEOUT_SEC   60                   /* a peer that stops reading is dropped */
#define NBD_SOCKET_SNDBUF      (4 * 1024 * 1024)
#define NBD_POLL_MAX_NS        32000                /* busy-poll at most this long */
#define NBD_POLL_START_NS      4000                 /* first busy-poll time once it pays */

/* Read exactly len bytes: 0, or -1 on EOF / error. */
int nbd_recv_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* One recv() into the empty c->rbuf (recv_lock held), with adaptive busy
 * polling, the scheme of QEMU's iothread poll-max-ns: when the client's
 * requests arrive at short intervals, poll the socket for up to c->poll_ns
 * before sleeping in recv().  A sleeping server thread must be woken by
 * the client's send(), and that wake-up is paid on the client's CPU.  The
 * poll time doubles (from NBD_POLL_START_NS to NBD_POLL_MAX_NS) while the
 * sleeps it failed to avoid were short, and drops to 0 after a longer one,
 * so an idle or slow client costs no polling. */
static ssize_t client_fill(NBDClient *c)
{
    if (c->tls) {
        return tls_session_recv(c->tls, c->rbuf, NBD_RECV_BUF);
    }
    if (c->poll_ns > 0) {
        uint64_t start = clock_monotonic_ns();
        do {
            ssize_t n = recv(c->fd, c->rbuf, NBD_RECV_BUF, MSG_DONTWAIT);
            if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
                return n;
            }
        } while (clock_monotonic_ns() - start < c->poll_ns);
    }
    uint64_t start = clock_monotonic_ns();
    ssize_t n = recv(c->fd, c->rbuf, NBD_RECV_BUF, 0);
    uint64_t slept = clock_monotonic_ns() - start;
    if (slept > NBD_POLL_MAX_NS) {
        c->poll_ns = 0;
    } else if (slept > c->poll_ns) {
        c->poll_ns = c->poll_ns ? MIN(2 * c->poll_ns, (uint64_t)NBD_POLL_MAX_NS)
                                : NBD_POLL_START_NS;
    }
    return n;
}

/* Transmission-phase reads (recv_lock held): serve from the connection's
 * buffer first, so that one recv() picks up many pipelined request headers;
 * large payloads go straight to their destination. */
int nbd_client_recv(NBDClient *c, void *dst, size_t len)
{
    uint8_t *p = dst;
    while (len > 0) {
        if (c->rpos < c->rlen) {
            size_t n = MIN(len, c->rlen - c->rpos);
            memcpy(p, c->rbuf + c->rpos, n);
            c->rpos += n;
            p += n;
            len -= n;
            continue;
        }
        if (len >= NBD_RECV_BUF / 2) {
            return nbd_conn_recv_full(c, p, len);
        }
        ssize_t n = client_fill(c);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        c->rpos = 0;
        c->rlen = (size_t)n;
    }
    return 0;
}

int nbd_client_recv_discard(NBDClient *c, uint64_t len)
{
    uint8_t tmp[16384];
    while (len > 0) {
        size_t n = MIN(len, sizeof(tmp));
        if (nbd_client_recv(c, tmp, n) < 0) {
            return -1;
        }
        len -= n;
    }
    return 0;
}

/* Send every byte of iov (which is consumed).  0, or -1 on error. */
int nbd_send_iov(int fd, struct iovec *iov, int niov)
{
    while (niov > 0) {
        struct msghdr msg = {
            .msg_iov = iov,
            .msg_iovlen = (size_t)MIN(niov, IOV_MAX),
        };
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        size_t left = (size_t)n;
        while (niov > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            niov--;
        }
        if (niov > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

int nbd_send_buf(int fd, const void *buf, size_t len)
{
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    return nbd_send_iov(fd, &iov, 1);
}

int nbd_conn_recv_full(NBDClient *c, void *buf, size_t len)
{
    if (!c->tls) {
        return nbd_recv_full(c->fd, buf, len);
    }
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = tls_session_recv(c->tls, p, len);
        if (n <= 0) {
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Every byte of iov, one TLS record (at most) per piece and per 16 KiB. */
static int tls_send_iov(TLSSession *s, const struct iovec *iov, int niov)
{
    for (int i = 0; i < niov; i++) {
        const uint8_t *p = iov[i].iov_base;
        size_t len = iov[i].iov_len;
        while (len > 0) {
            ssize_t n = tls_session_send(s, p, len);
            if (n <= 0) {
                return -1;
            }
            p += n;
            len -= (size_t)n;
        }
    }
    return 0;
}

int nbd_conn_send_iov(NBDClient *c, struct iovec *iov, int niov)
{
    return c->tls ? tls_send_iov(c->tls, iov, niov)
                  : nbd_send_iov(c->fd, iov, niov);
}

int nbd_conn_send_buf(NBDClient *c, const void *buf, size_t len)
{
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    return nbd_conn_send_iov(c, &iov, 1);
}

/* A send failed (send_lock held): the connection ends (the caller calls
 * nbd_client_set_closing once the lock is dropped). */
static void send_failed_locked(NBDClient *c)
{
    if (!c->send_failed) {
        nbd_client_note_close(c, LOG_LEVEL_WARNING, "I/O error: sending a "
                              "reply failed: %s", strerror(errno));
        c->send_failed = true;
        shutdown(c->fd, SHUT_RDWR);
    }
}

/* The oldest deferred reply, or NULL.  defer_head is stored (under
 * defer_lock) with release order, so a reader without the lock sees the
 * reply it points to whole; only the send_lock holder removes replies. */
static NBDDeferred *defer_first(NBDClient *c)
{
    return __atomic_load_n(&c->defer_head, __ATOMIC_ACQUIRE);
}

static void defer_set_head(NBDClient *c, NBDDeferred *d)
{
    __atomic_store_n(&c->defer_head, d, __ATOMIC_RELEASE);
}

/* Send what is left of buf from *off on (send_lock held), without waiting
 * for room unless `wait`.  1: all sent; 0: the socket is full; -1: the
 * send failed (the connection is ending). */
static int send_rest_locked(NBDClient *c, const uint8_t *buf, size_t len,
                            size_t *off, bool wait)
{
    while (!c->send_failed && *off < len) {
        ssize_t n = send(c->fd, buf + *off, len - *off,
                         MSG_NOSIGNAL | (wait ? 0 : MSG_DONTWAIT));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && !wait && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        }
        if (n <= 0) {
            send_failed_locked(c);
            break;
        }
        *off += (size_t)n;
    }
    return c->send_failed ? -1 : 1;
}

static void defer_pop(NBDClient *c)
{
    NBDDeferred *d;
    {
        LOCK_GUARD(&c->defer_lock);
        d = c->defer_head;
        defer_set_head(c, d->next);
        if (!d->next) {
            c->defer_tail = NULL;
        }
    }
    free(d);
}

/* Send the deferred replies, oldest first (send_lock held, invariant 9);
 * a partly sent one is always first, so the stream stays whole.  With
 * `wait` false, stop where the socket is full.  True when none is left. */
static bool defer_drain_locked(NBDClient *c, bool wait)
{
    NBDDeferred *d;
    while ((d = defer_first(c))) {
        size_t off = d->off;
        int r = send_rest_locked(c, d->data, d->len, &off, wait);
        d->off = (uint16_t)off;
        if (r == 0) {
            return false;
        }
        defer_pop(c);       /* sent, or dropped with the connection */
    }
    return true;
}

/* send_lock was just dropped: replies deferred while it was held are sent
 * by this thread if it can take the lock now (else by the holder, which
 * checks after its own unlock).  Left over with `wait` false: the
 * connection's sender thread takes them. */
static void defer_after_unlock(NBDClient *c, bool wait)
{
    while (defer_first(c) && pthread_mutex_trylock(&c->send_lock) == 0) {
        bool empty = defer_drain_locked(c, wait);
        bool failed = c->send_failed;
        pthread_mutex_unlock(&c->send_lock);
        if (failed) {
            nbd_client_set_closing(c);
        }
        if (!empty) {
            nbd_client_kick_flusher(c);
            return;
        }
    }
}

/* Send one whole reply (invariant 1), after any deferred ones (invariant
 * 9).  A failed send ends the connection. */
void nbd_client_send(NBDClient *c, struct iovec *iov, int niov)
{
    bool failed = false;
    pthread_mutex_lock(&c->send_lock);
    defer_drain_locked(c, true);
    if (!c->send_failed && nbd_conn_send_iov(c, iov, niov) < 0) {
        send_failed_locked(c);
    }
    failed = c->send_failed;
    pthread_mutex_unlock(&c->send_lock);
    if (failed) {
        nbd_client_set_closing(c);
    }
    defer_after_unlock(c, true);
}

void nbd_client_send_nowait(NBDClient *c, const void *reply, size_t len)
{
    size_t off = 0;
    bool failed = false, locked = false;

    assert(len <= NBD_DEFERRED_MAX && !c->tls);
    /* At once when nothing is deferred and the socket takes it all. */
    if (!defer_first(c) && pthread_mutex_trylock(&c->send_lock) == 0) {
        locked = true;
        if (send_rest_locked(c, reply, len, &off, false) != 0) {
            failed = c->send_failed;
            pthread_mutex_unlock(&c->send_lock);
            if (failed) {
                nbd_client_set_closing(c);
            }
            defer_after_unlock(c, false);
            return;
        }
        /* The rest goes first in the list, send_lock still held. */
    }
    NBDDeferred *d = malloc(sizeof(*d));
    if (!d) {
        /* Cannot keep the reply: the client would wait for it forever. */
        if (locked) {
            pthread_mutex_unlock(&c->send_lock);
        }
        nbd_client_note_close(c, LOG_LEVEL_WARNING, "out of memory for a "
                              "reply");
        shutdown(c->fd, SHUT_RDWR);
        nbd_client_set_closing(c);
        return;
    }
    *d = (NBDDeferred){ .len = (uint16_t)len, .off = (uint16_t)off };
    memcpy(d->data, reply, len);
    {
        LOCK_GUARD(&c->defer_lock);
        if (locked) {
            /* send_lock held, the socket full, maybe partly sent: it must
             * go on first, before any reply deferred meanwhile. */
            d->next = c->defer_head;
            if (!c->defer_tail) {
                c->defer_tail = d;
            }
            defer_set_head(c, d);
        } else if (c->defer_tail) {
            c->defer_tail->next = d;
            c->defer_tail = d;
        } else {
            c->defer_tail = d;
            defer_set_head(c, d);
        }
    }
    if (locked) {
        /* The socket is full: the sender thread waits for room. */
        pthread_mutex_unlock(&c->send_lock);
        nbd_client_kick_flusher(c);
        return;
    }
    defer_after_unlock(c, false);
}

bool nbd_client_deferred_empty(NBDClient *c)
{
    return defer_first(c) == NULL;
}

/* The connection's sender thread (nbd_client_kick_flusher): sends what is
 * deferred, waiting for room in the socket. */
void nbd_client_flush_deferred(NBDClient *c)
{
    pthread_mutex_lock(&c->send_lock);
    defer_drain_locked(c, true);
    bool failed = c->send_failed;
    pthread_mutex_unlock(&c->send_lock);
    if (failed) {
        nbd_client_set_closing(c);
    }
}

/* Options of an accepted connection: no Nagle delay on TCP, a send timeout
 * (a peer that stops reading is dropped), and a large send buffer. */
void nbd_socket_setup(int fd, bool inet)
{
    if (inet) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    struct timeval tv = { .tv_sec = NBD_SEND_TIMEOUT_SEC };
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    /* Room for a few large read replies without blocking on every one
     * (the kernel caps it at net.core.wmem_max). */
    int sndbuf = NBD_SOCKET_SNDBUF;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
}
