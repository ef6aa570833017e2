/*
 * libFuzzer target: write-intent log recovery (src/block/write-intent.c,
 * docs/specs/write-intent.md) -- the header decoder, the choice of the
 * newest valid snapshot slot, the intent map, and the snapshot payload
 * decoder that rebuilds a crashed image's bitmaps.
 *
 * Once per process, in a memfd: a 64 MiB qcow2 image with a persistent
 * bitmap "b" (granularity 64 KiB), left as a crash leaves it -- a child
 * process opens it read-write (through /proc/self/fd/N, without a log),
 * adds the bitmap, writes and exits without closing -- so the bitmap's
 * directory entry stays in_use with the image's autoclear bits set, and
 * every open loads it inconsistent with bitmaps_foreign_writes clear:
 * recovery may run (W6).  The harness checks that once.
 * Per input: the input is written to a second memfd, the image is opened
 * read-only (without a log of its own: crash-safe=off), and
 * write_intent_recover_fd() -- the recovery write_intent_open() runs on
 * IMAGE.wil -- reads the log from that memfd; then the image is closed.
 * Before writing, the harness recomputes the XXH64 of the header (bytes
 * 0..47) and of each snapshot slot's payload whose header and length lie
 * inside the input, so that mutations reach the decoders behind the
 * checksums; an input shorter than a field is left as it is.  The target
 * writes no file.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <json-c/json.h>
#include <xxhash.h>

#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "block/write-intent.h"
#include "util/bswap.h"
#include "util/cleanup.h"
#include "util/error.h"
#include "fuzz-util.h"

#define FUZZ_IMAGE_SIZE (64u << 20)
#define WIL_HEADER_CHECKED 48     /* bytes under the header checksum */
#define WIL_SLOT_HEADER    32

static char image[32];            /* /proc/self/fd/N of the image's memfd */
static int log_fd = -1;           /* the log's memfd */

static void die(const char *what, Error *err)
{
    fprintf(stderr, "fuzz-write-intent: %s: %s\n", what,
            err ? error_get_pretty(err) : "failed");
    abort();
}

/* The image as a node: no backing file, no locks, no log of its own. */
static BlockDriverState *open_image(bool rw, Error **errp)
{
    _cleanup_json_ struct json_object *o = json_object_new_object();
    json_object_object_add(o, "driver", json_object_new_string("qcow2"));
    json_object_object_add(o, "filename", json_object_new_string(image));
    json_object_object_add(o, "crash-safe", json_object_new_boolean(false));
    return bdrv_open_options(o, (rw ? BDRV_O_RDWR : 0) | BDRV_O_NO_BACKING |
                             BDRV_O_NO_LOCK, errp);
}

/* In a child: create the image, open it, add bitmap b, write, crash. */
static void make_crashed_image(void)
{
    Error *err = NULL;
    if (!bdrv_img_create(image, "qcow2", FUZZ_IMAGE_SIZE, NULL, &err)) {
        die("creating the image", err);
    }
    BlockDriverState *bs = open_image(true, &err);
    if (!bs || !bdrv_dirty_bitmap_add(bs, "b", 65536, true, false, &err)) {
        die("opening the image or adding bitmap b", err);
    }
    static uint8_t buf[65536];
    if (bdrv_pwrite(bs, 0, buf, sizeof(buf), 0) < 0) {
        die("writing", NULL);
    }
    _exit(0);   /* no close: the bitmap stays in_use */
}

static void setup(void)
{
    if (log_fd >= 0) {
        return;
    }
    int img_fd = memfd_create("fuzz-wil-image", MFD_CLOEXEC);
    log_fd = memfd_create("fuzz-wil-log", MFD_CLOEXEC);
    if (img_fd < 0 || log_fd < 0) {
        die("memfd_create", NULL);
    }
    snprintf(image, sizeof(image), "/proc/self/fd/%d", img_fd);
    pid_t pid = fork();
    if (pid == 0) {
        make_crashed_image();
    }
    int st;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) ||
        WEXITSTATUS(st) != 0) {
        die("the child that makes the image", NULL);
    }
    /* The harness is worth running only if recovery may run. */
    Error *err = NULL;
    BlockDriverState *bs = open_image(false, &err);
    if (!bs) {
        die("opening the image read-only", err);
    }
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, "b");
    if (!bm || !bm->persistent || !bm->inconsistent ||
        bs->bitmaps_foreign_writes) {
        die("the crashed image: bitmap b is not an inconsistent persistent "
            "bitmap that recovery may rebuild", NULL);
    }
    bdrv_unref(bs);
}

/* Make the checksums of the header and of the slots in d[0..size) right. */
static void fix_checksums(uint8_t *d, size_t size)
{
    if (size < WIL_HEADER_CHECKED + 8) {
        return;
    }
    st_le64(d + WIL_HEADER_CHECKED, XXH64(d, WIL_HEADER_CHECKED, 0));
    for (int i = 0; i < 2; i++) {
        uint64_t off = ld_le64(d + 24 + 8 * i);
        if (off > size || size - off < WIL_SLOT_HEADER) {
            continue;
        }
        uint64_t len = ld_le64(d + off + 16);
        if (len <= size - off - WIL_SLOT_HEADER) {
            st_le64(d + off + 24, XXH64(d + off + WIL_SLOT_HEADER, len, 0));
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    _cleanup_free_ uint8_t *d = malloc(size ? size : 1);
    if (!d) {
        return 0;
    }
    memcpy(d, data, size);
    fix_checksums(d, size);
    if (ftruncate(log_fd, 0) < 0 ||
        pwrite(log_fd, d, size, 0) != (ssize_t)size) {
        die("writing the log", NULL);
    }

    Error *err = NULL;
    BlockDriverState *bs = open_image(false, &err);
    if (!bs) {
        die("opening the image read-only", err);
    }
    uint64_t seq;
    (void)write_intent_recover_fd(bs, log_fd, &seq);
    bdrv_unref(bs);
    return 0;
}
