/*
 * libFuzzer target: the QMP monitor's stream handling (src/qmp/monitor.c)
 * -- the greeting, capabilities negotiation, requests split across reads
 * or several in one read, parse errors and the rest-of-line skip, the
 * request size limit, replies and their ids -- through
 * qmp_monitor_serve_fd() on one end of a socketpair, the real dispatcher
 * behind it.
 *
 * Only harmless commands exist: the real qmp_capabilities, query-version
 * and query-commands, the bitmap and backup stubs of fuzz-qmp-stubs.h, and
 * a stub "quit" registered over the real one (re-registration replaces),
 * so no input stops the loop, touches a node or writes a file.
 * Per input: a socketpair; a thread plays the client (writes the input,
 * shuts its side for writing, drops the replies until the monitor closes);
 * the monitor serves the other end on this thread until the client is
 * gone; the thread is joined.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "qmp/qmp.h"
#include "qmp/qmp-internal.h"
#include "fuzz-util.h"
#include "fuzz-qmp-stubs.h"

typedef struct Client {
    int fd;
    const uint8_t *data;
    size_t size;
} Client;

static void *client_main(void *opaque)
{
    Client *cl = opaque;
    fuzz_exchange(cl->fd, cl->data, cl->size);
    return NULL;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    qmp_register_control_commands();
    qmp_register_command("quit", stub);     /* replaces the real quit */
    fuzz_qmp_register_stubs();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        perror("fuzz-qmp-monitor: socketpair");
        abort();
    }
    Client cl = { .fd = sv[1], .data = data, .size = size };
    pthread_t t;
    if (pthread_create(&t, NULL, client_main, &cl) != 0) {
        perror("fuzz-qmp-monitor: pthread_create");
        abort();
    }
    qmp_monitor_serve_fd(sv[0]);   /* closes sv[0] when the client is gone */
    pthread_join(t, NULL);
    close(sv[1]);
    return 0;
}
