/*
 * Unit tests of util/osdep.c's TCP helpers.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inet_connect_nodelay),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
