/*
 * libFuzzer target: a hostile qcow2 image (docs/specs/qcow2.md, O1-O3,
 * B1-B3, K1).  The input is the whole image file, put in a memfd and opened
 * writable through /proc/self/fd/N by the real open path (header,
 * extensions, refcount table, bitmaps), without a backing file (a fuzzed
 * header must not open other files) and without locks.  Then, on the
 * guest disk: reads, a write in place, an allocating unaligned write, a
 * discard, a zero write, a flush, the check routine and a last read; and
 * the close, which stores bitmaps and flushes.  Every operation may fail;
 * none may crash, leak, hang or grow the file past FUZZ_MAX_FILE (the
 * target aborts then: B3 says the allocator stays within 1 GiB of the
 * end of the file).  The second input byte picks the guest offsets.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/block.h"
#include "block/check.h"
#include "util/cleanup.h"
#include "util/error.h"
#include "fuzz-util.h"

#define FUZZ_MAX_INPUT (1u << 20)
/* Bytes the operations below can add to a sane file, with room for a new
 * refcount table and blocks, past the 1 GiB that B3 lets the refcounts
 * count beyond the end (a crash's leaks): anything beyond is an allocation
 * past B3. */
#define FUZZ_MAX_FILE (FUZZ_MAX_INPUT + (1ull << 30) + (64u << 20))

static void guest_ops(BlockDriverState *bs, uint8_t pick)
{
    int64_t len = bdrv_getlength(bs);
    if (len <= 0) {
        return;
    }
    uint64_t size = (uint64_t)len;
    /* Offsets: the start, or somewhere picked by the input. */
    uint64_t off = (size / 256) * pick;
    static uint8_t buf[3 * 65536 + 512];
    uint64_t n = MIN(size - off, sizeof(buf));
    uint64_t small = MIN(size, 4096);

    (void)bdrv_pread(bs, 0, buf, small);
    (void)bdrv_pread(bs, off, buf, n);
    memset(buf, 0x5a, sizeof(buf));
    (void)bdrv_pwrite(bs, 0, buf, small, 0);
    if (off + 512 < size) {
        uint64_t m = MIN(size - off - 512, 65536 + 1024);
        (void)bdrv_pwrite(bs, off + 512, buf, m, 0);
    }
    (void)bdrv_pdiscard(bs, off, MIN(size - off, 131072));
    (void)bdrv_pwrite_zeroes(bs, size / 2, MIN(size - size / 2, 65536), 0);
    (void)bdrv_flush(bs);
}

static void check(BlockDriverState *bs)
{
    if (!bs->drv->check) {
        return;
    }
    BdrvCheckResult res = BDRV_CHECK_RESULT_INIT;
    (void)bs->drv->check(bs, &res);
    bdrv_check_result_clear(&res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > FUZZ_MAX_INPUT) {
        return 0;
    }
    int fd = memfd_create("fuzz-qcow2", MFD_CLOEXEC);
    if (fd < 0) {
        perror("fuzz-qcow2: memfd_create");
        abort();
    }
    if (size && write(fd, data, size) != (ssize_t)size) {
        perror("fuzz-qcow2: write");
        abort();
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    Error *err = NULL;
    BlockDriverState *bs = bdrv_open_image(path, "qcow2", BDRV_O_RDWR |
                                           BDRV_O_NO_BACKING | BDRV_O_NO_LOCK,
                                           &err);
    if (!bs) {
        error_free(err);
        close(fd);
        return 0;
    }
    guest_ops(bs, size > 1 ? data[1] : 0);
    check(bs);
    uint8_t b[4096];
    (void)bdrv_pread(bs, 0, b, (uint64_t)MIN(bdrv_getlength(bs) > 0 ?
                                             bdrv_getlength(bs) : 0, 4096));
    bdrv_unref(bs);
    struct stat st;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size > FUZZ_MAX_FILE) {
        fprintf(stderr, "fuzz-qcow2: the file grew to %lld bytes\n",
                (long long)st.st_size);
        abort();
    }
    close(fd);
    return 0;
}
