/*
 * libFuzzer target: write-intent log recovery (src/block/write-intent.c,
 * docs/specs/write-intent.md) -- the header decoder, the choice of the
 * newest valid snapshot slot, the intent map, and the snapshot payload
 * decoder that rebuilds a crashed image's bitmaps.
 *
 * Once per process, in one temporary folder (removed at exit): a 4 MiB qbm
 * image with a persistent bitmap "b" (granularity 64 KiB), left as a crash
 * leaves it -- a child process opens it read-write, adds the bitmap and
 * exits without closing -- so the bitmap is unclean and recovery runs.
 * Per input: the input becomes disk.qbm.wil (the loader takes the log by
 * name next to the image and refuses links, so no memfd), and the image is
 * opened read-only, which recovers from the log and writes nothing, then
 * closed.  Before writing, the harness recomputes the XXH64 of the header
 * (bytes 0..47) and of each snapshot slot's payload whose header and length
 * lie inside the input, so that mutations reach the decoders behind the
 * checksums; an input shorter than a field is left as it is.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "util/bswap.h"
#include "util/error.h"
#include "fuzz-util.h"

#define FUZZ_IMAGE_SIZE (4u << 20)
#define WIL_HEADER_CHECKED 48     /* bytes under the header checksum */
#define WIL_SLOT_HEADER    32

static char dir[64], image[96], wil[112];

/* Remove the folder and every file the image and the log made in it. */
static void remove_tmp(void)
{
    DIR *dp = opendir(dir);
    if (dp) {
        struct dirent *e;
        while ((e = readdir(dp))) {
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                unlinkat(dirfd(dp), e->d_name, 0);
            }
        }
        closedir(dp);
    }
    rmdir(dir);
}

static void die(const char *what, Error *err)
{
    fprintf(stderr, "fuzz-write-intent: %s: %s\n", what,
            err ? error_get_pretty(err) : "failed");
    abort();
}

/* In a child: create the image, open it, add bitmap b, write, crash. */
static void make_crashed_image(void)
{
    Error *err = NULL;
    if (!bdrv_img_create(image, "qbm", FUZZ_IMAGE_SIZE, NULL, &err)) {
        die("creating the image", err);
    }
    BlockDriverState *bs = bdrv_open_image(image, "qbm", BDRV_O_RDWR, &err);
    if (!bs || !bdrv_dirty_bitmap_add(bs, "b", 65536, true, false, &err)) {
        die("opening the image or adding bitmap b", err);
    }
    static uint8_t buf[65536];
    if (bdrv_pwrite(bs, 0, buf, sizeof(buf), 0) < 0) {
        die("writing", NULL);
    }
    _exit(0);   /* no close: the bitmap stays unclean */
}

static void setup(void)
{
    if (dir[0]) {
        return;
    }
    const char *t = getenv("TMPDIR");
    snprintf(dir, sizeof(dir), "%s/fuzz-wil.XXXXXX",
             t && *t && strlen(t) < 40 ? t : "/tmp");
    if (!mkdtemp(dir)) {
        die("mkdtemp", NULL);
    }
    snprintf(image, sizeof(image), "%s/disk.qbm", dir);
    snprintf(wil, sizeof(wil), "%s.wil", image);
    atexit(remove_tmp);
    pid_t pid = fork();
    if (pid == 0) {
        make_crashed_image();
    }
    int st;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) ||
        WEXITSTATUS(st) != 0) {
        die("the child that makes the image", NULL);
    }
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
    uint8_t *d = malloc(size ? size : 1);
    if (!d) {
        return 0;
    }
    memcpy(d, data, size);
    fix_checksums(d, size);
    int fd = open(wil, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, d, size) != (ssize_t)size) {
        die("writing the log", NULL);
    }
    close(fd);
    free(d);

    Error *err = NULL;
    BlockDriverState *bs = bdrv_open_image(image, "qbm", 0, &err);
    if (!bs) {
        die("opening the image read-only", err);
    }
    bdrv_unref(bs);
    return 0;
}
