/*
 * Unit tests of util/osdep.c's TCP helpers, and of cutils' read_upto on
 * a pipe (reads come back short there).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#include "util/cutils.h"
#include "util/error.h"
#include "util/osdep.h"

/* A connected socket has TCP_NODELAY: QMP sends a request in two writes
 * (the JSON, then its newline), and with Nagle the second waited for the
 * server's delayed ACK, 40 ms a command over TCP. */
static void test_inet_connect_nodelay(void **state)
{
    (void)state;
    Error *err = NULL;
    int l = inet_listen("127.0.0.1", "0", 0, &err);
    assert_true(l >= 0);
    struct sockaddr_in a;
    socklen_t alen = sizeof(a);
    assert_int_equal(getsockname(l, (struct sockaddr *)&a, &alen), 0);
    char port[16];
    snprintf(port, sizeof(port), "%u", ntohs(a.sin_port));

    int c = inet_connect("127.0.0.1", port, &err);
    assert_true(c >= 0);
    int v = 0;
    socklen_t vlen = sizeof(v);
    assert_int_equal(getsockopt(c, IPPROTO_TCP, TCP_NODELAY, &v, &vlen), 0);
    assert_int_not_equal(v, 0);
    close(c);
    close(l);
}

/* read_upto gathers short reads up to end of file, and stops at max. */
static void test_read_upto(void **state)
{
    int p[2];
    char buf[16];
    assert_int_equal(pipe(p), 0);
    assert_int_equal(write(p[1], "abc", 3), 3);
    assert_int_equal(write(p[1], "defgh", 5), 5);
    assert_int_equal(read_upto(p[0], buf, 6), 6);       /* stops at max */
    assert_memory_equal(buf, "abcdef", 6);
    close(p[1]);
    assert_int_equal(read_upto(p[0], buf, sizeof(buf)), 2);   /* to EOF */
    assert_memory_equal(buf, "gh", 2);
    assert_int_equal(read_upto(p[0], buf, sizeof(buf)), 0);
    close(p[0]);
    assert_int_equal(read_upto(p[0], buf, sizeof(buf)), -EBADF);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inet_connect_nodelay),
        cmocka_unit_test(test_read_upto),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
