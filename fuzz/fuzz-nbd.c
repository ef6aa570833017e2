/*
 * libFuzzer target: the NBD server (src/nbd), handshake and transmission
 * phases, through nbd_server_serve_fd() on one end of a socketpair -- the
 * same connection code an accepted client runs, without a listener.
 *
 * Once per process: a 1 MiB raw node over a memfd (opened by its
 * /proc/self/fd/N name, so no file is written), with a dirty bitmap "b",
 * exported writable as "disk0" (also the default export "") with
 * qemu:dirty-bitmap:b.  No server is started, so there is no handshake
 * deadline and each connection is served by one thread.
 * Per input: a socketpair; the server end is served on a thread; the input
 * is written to the other end, which is then shut for writing, while
 * everything the server sends is read and dropped until it closes; then
 * the thread is joined.  The node's contents and bitmap carry over from
 * one input to the next.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "block/block.h"
#include "nbd/server.h"
#include "util/error.h"
#include "fuzz-util.h"

#define FUZZ_IMAGE_SIZE (1u << 20)

static void die(const char *what, Error *err)
{
    fprintf(stderr, "fuzz-nbd: %s: %s\n", what,
            err ? error_get_pretty(err) : strerror(errno));
    abort();
}

static void setup(void)
{
    static bool done;
    if (done) {
        return;
    }
    done = true;
    int mfd = memfd_create("fuzz-nbd", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, FUZZ_IMAGE_SIZE) < 0) {
        die("memfd", NULL);
    }
    /* Some data in the first half, so reads and block status see both. */
    static uint8_t pattern[FUZZ_IMAGE_SIZE / 2];
    memset(pattern, 0xa5, sizeof(pattern));
    if (pwrite(mfd, pattern, sizeof(pattern), 0) != (ssize_t)sizeof(pattern)) {
        die("memfd write", NULL);
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", mfd);
    Error *err = NULL;
    /* The node keeps its own descriptor; mfd stays open for the process. */
    BlockDriverState *bs = bdrv_open_image(path, "raw", BDRV_O_RDWR, &err);
    if (!bs) {
        die("opening the memfd node", err);
    }
    if (!bdrv_dirty_bitmap_add(bs, "b", 65536, false, false, &err)) {
        die("adding bitmap b", err);
    }
    const char *const bitmaps[] = { "b" };
    if (!nbd_export_add("disk0", bs, "disk0", "fuzz", true, bitmaps, 1,
                        &err)) {
        die("adding the export", err);
    }
    bdrv_unref(bs);   /* the export holds its own reference */
}

static void *serve(void *opaque)
{
    nbd_server_serve_fd(*(int *)opaque);
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        die("socketpair", NULL);
    }
    pthread_t t;
    if (pthread_create(&t, NULL, serve, &sv[0]) != 0) {
        die("pthread_create", NULL);
    }
    fuzz_exchange(sv[1], data, size);
    pthread_join(t, NULL);   /* the server closed sv[0] */
    close(sv[1]);
    return 0;
}
