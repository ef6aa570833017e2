/*
 * The single-connection entry points: nbd_server_serve_fd() serves one
 * connected socket with the normal NBD client path (a real client, libnbd,
 * on the other end negotiates, writes, reads back and disconnects), and
 * qmp_monitor_serve_fd() runs the monitor for one connected socket until
 * it is gone (greeting, negotiation, a command, EOF).  Neither needs a
 * listener; both return once the peer has gone.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <fcntl.h>
#include <libnbd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "block/block.h"
#include "nbd/server.h"
#include "qmp/qmp.h"
#include "qmp/qmp-internal.h"
#include "test-util.h"

#define SIZE (1u << 20)

static void *nbd_serve(void *opaque)
{
    nbd_server_serve_fd(*(int *)opaque);
    return NULL;
}

static void test_nbd_serve_fd(void **state)
{
    int mfd = memfd_create("test-serve-fd", MFD_CLOEXEC);
    assert_true(mfd >= 0);
    assert_int_equal(ftruncate(mfd, SIZE), 0);
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", mfd);
    Error *err = NULL;
    BlockDriverState *bs = bdrv_open_image(path, "raw", BDRV_O_RDWR, &err);
    die_on(err);
    assert_non_null(nbd_export_add("e0", bs, "disk0", NULL, true, NULL, 0,
                                   &err));
    die_on(err);

    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, nbd_serve, &sv[0]), 0);

    struct nbd_handle *h = nbd_create();
    assert_non_null(h);
    assert_int_equal(nbd_set_export_name(h, "disk0"), 0);
    assert_int_equal(nbd_connect_socket(h, sv[1]), 0);   /* h owns sv[1] */
    assert_int_equal(nbd_get_size(h), SIZE);
    char wbuf[4096], rbuf[4096];
    memset(wbuf, 0x5a, sizeof(wbuf));
    assert_int_equal(nbd_pwrite(h, wbuf, sizeof(wbuf), 8192, 0), 0);
    assert_int_equal(nbd_pread(h, rbuf, sizeof(rbuf), 8192, 0), 0);
    assert_memory_equal(wbuf, rbuf, sizeof(rbuf));
    assert_int_equal(nbd_shutdown(h, 0), 0);
    nbd_close(h);
    pthread_join(t, NULL);   /* returns once the client has gone */

    /* The write reached the node. */
    assert_int_equal(pread(mfd, rbuf, sizeof(rbuf), 8192), (ssize_t)sizeof(rbuf));
    assert_memory_equal(wbuf, rbuf, sizeof(rbuf));
    assert_true(nbd_export_del("e0", false, &err));
    die_on(err);
    bdrv_unref(bs);
    close(mfd);
}

typedef struct QmpPeer {
    int fd;
    char reply[8192];
} QmpPeer;

/* The client side: send two requests, close for writing, read to EOF. */
static void *qmp_peer(void *opaque)
{
    QmpPeer *p = opaque;
    static const char req[] = "{\"execute\":\"qmp_capabilities\"}\r\n"
                              "{\"execute\":\"query-version\",\"id\":5}";
    assert_int_equal(send(p->fd, req, strlen(req), MSG_NOSIGNAL),
                     (ssize_t)strlen(req));
    shutdown(p->fd, SHUT_WR);
    size_t len = 0;
    ssize_t n;
    while ((n = recv(p->fd, p->reply + len, sizeof(p->reply) - 1 - len, 0)) > 0) {
        len += (size_t)n;
    }
    p->reply[len] = '\0';
    return NULL;
}

static void test_qmp_monitor_serve_fd(void **state)
{
    qmp_register_control_commands();
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    QmpPeer p = { .fd = sv[1] };
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, qmp_peer, &p), 0);
    qmp_monitor_serve_fd(sv[0]);   /* returns once the client has gone */
    pthread_join(t, NULL);
    close(sv[1]);
    assert_non_null(strstr(p.reply, "\"QMP\""));
    assert_non_null(strstr(p.reply, "{\"return\":{}}"));
    assert_non_null(strstr(p.reply, "\"package\""));
    assert_non_null(strstr(p.reply, "\"id\":5"));
    qmp_monitor_cleanup();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nbd_serve_fd),
        cmocka_unit_test(test_qmp_monitor_serve_fd),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
