/*
 * Unit tests for the block layer core (block.c, file.c, raw.c) and named
 * dirty bitmaps (dirty-bitmap.c):
 *  - random unaligned reads and writes, buffered and O_DIRECT, against a
 *    plain in-memory model of the image;
 *  - invariant 1: the bitmap bit is set before the driver sees the write
 *    (a wrapping driver checks it on every write);
 *  - bitmap states: disabled bitmaps do not record, merge leaves the target
 *    untouched when it fails, busy/inconsistent bitmaps refuse changes;
 *  - bdrv_dirty_bitmap_extents with a limit, against a naive model on
 *    random fragmented bitmaps: the first extents of the full list;
 *  - block status on a sparse file;
 *  - BDRV_O_NO_BACKING records the header's backing name without opening
 *    it; bdrv_set_backing attaches the caller's node, refuses a loop;
 *  - BDRV_REQ_NOWAIT reads: -EAGAIN for O_DIRECT nodes and while hooks are
 *    installed; on evicted data -EAGAIN or (when the kernel's readahead was
 *    quicker) the right bytes, never an error; the right bytes once cached;
 *  - the qcow2 check on an image with more problems than
 *    BDRV_CHECK_MAX_MESSAGES: every problem is counted, the messages kept
 *    are capped and the rest counted as dropped.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "block/block.h"
#include "util/bswap.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "test-util.h"

#define IMG_SIZE (8u * 1024 * 1024)

static BlockDriverState *open_raw(const char *path, bool direct)
{
    _cleanup_json_ struct json_object *opts = json_object_new_object();
    struct json_object *file = json_object_new_object();
    json_object_object_add(file, "driver", json_object_new_string("file"));
    json_object_object_add(file, "filename", json_object_new_string(path));
    if (direct) {
        struct json_object *cache = json_object_new_object();
        json_object_object_add(cache, "direct", json_object_new_boolean(true));
        json_object_object_add(file, "cache", cache);
    }
    json_object_object_add(opts, "driver", json_object_new_string("raw"));
    json_object_object_add(opts, "file", file);
    Error *err = NULL;
    BlockDriverState *bs = bdrv_open_options(opts, BDRV_O_RDWR, &err);
    if (!bs && direct) {
        error_free(err);
        return NULL;    /* this filesystem has no O_DIRECT */
    }
    if (!bs) {
        fail_msg("open: %s", error_get_pretty(err));
    }
    return bs;
}

static void random_io(BlockDriverState *bs)
{
    uint8_t *model = calloc(1, IMG_SIZE);
    uint8_t *buf = malloc(256 * 1024);
    assert_non_null(model);
    assert_non_null(buf);
    srand(42);
    for (int i = 0; i < 400; i++) {
        uint64_t len = 1 + (uint64_t)rand() % (200 * 1024);
        uint64_t off = (uint64_t)rand() % (IMG_SIZE - len);
        int op = rand() % 3;
        if (op == 0) {
            for (uint64_t j = 0; j < len; j++) {
                buf[j] = (uint8_t)rand();
            }
            assert_int_equal(bdrv_pwrite(bs, off, buf, len, 0), 0);
            memcpy(model + off, buf, len);
        } else if (op == 1) {
            int flags = (rand() & 1) ? BDRV_REQ_MAY_UNMAP : 0;
            assert_int_equal(bdrv_pwrite_zeroes(bs, off, len, flags), 0);
            memset(model + off, 0, len);
        } else {
            assert_int_equal(bdrv_pread(bs, off, buf, len), 0);
            assert_memory_equal(buf, model + off, len);
        }
    }
    /* Whole-image check at the end, through odd-sized reads. */
    for (uint64_t off = 0; off < IMG_SIZE; off += 100000) {
        uint64_t len = MIN((uint64_t)100000, IMG_SIZE - off);
        assert_int_equal(bdrv_pread(bs, off, buf, len), 0);
        assert_memory_equal(buf, model + off, len);
    }
    free(model);
    free(buf);
}

static void test_random_io_buffered(void **state)
{
    _cleanup_free_ char *path = make_image(tpath("buffered.raw"), "raw", IMG_SIZE);
    BlockDriverState *bs = open_raw(path, false);
    random_io(bs);
    assert_true(bdrv_close(bs, NULL));
}

static void test_random_io_direct(void **state)
{
    _cleanup_free_ char *path = make_image(tpath("direct.raw"), "raw", IMG_SIZE);
    BlockDriverState *bs = open_raw(path, true);
    if (!bs) {
        skip();
    }
    assert_int_equal(bs->request_alignment, 4096);
    random_io(bs);
    assert_true(bdrv_close(bs, NULL));
}

static void test_out_of_range(void **state)
{
    _cleanup_free_ char *path = make_image(tpath("range.raw"), "raw", 1024 * 1024);
    BlockDriverState *bs = open_raw(path, false);
    uint8_t buf[512] = { 0 };
    assert_int_equal(bdrv_pread(bs, 1024 * 1024 - 256, buf, 512), -EINVAL);
    assert_int_equal(bdrv_pwrite(bs, 1024 * 1024, buf, 1, 0), -EINVAL);
    assert_int_equal(bdrv_pwrite(bs, UINT64_MAX - 10, buf, 100, 0), -EINVAL);
    assert_int_equal(bdrv_pwrite_zeroes(bs, 1024 * 1024 - 1, 2, 0), -EINVAL);
    assert_int_equal(bdrv_pdiscard(bs, 1024 * 1024 - 1, 2), -EINVAL);
    /* Empty requests that pass the checks change nothing. */
    assert_int_equal(bdrv_pwrite(bs, 1024 * 1024, buf, 0, 0), 0);
    assert_int_equal(bdrv_pwrite_zeroes(bs, 1024 * 1024, 0, 0), 0);
    assert_int_equal(bdrv_pdiscard(bs, 1024 * 1024, 0), 0);
    assert_true(bdrv_close(bs, NULL));

    bs = bdrv_open_image(path, "raw", 0, NULL);
    assert_non_null(bs);
    assert_true(bs->read_only);
    assert_int_equal(bdrv_pwrite(bs, 0, buf, 512, 0), -EPERM);
    assert_int_equal(bdrv_pdiscard(bs, 0, 512), -EPERM);
    assert_int_equal(bdrv_pwrite_zeroes(bs, 0, 512, 0), -EPERM);
    /* The checks come first, even for an empty request. */
    assert_int_equal(bdrv_pwrite(bs, 0, buf, 0, 0), -EPERM);
    assert_int_equal(bdrv_pwrite_zeroes(bs, 0, 0, 0), -EPERM);
    assert_int_equal(bdrv_pdiscard(bs, 0, 0), -EPERM);
    assert_true(bdrv_close(bs, NULL));
}

/* ---- invariant 1: a wrapping driver checks the bit before each write ---- */

static BlockDriverState *checked_top;
static int checked_writes;
static const BlockDriver *real_file_drv;

static void assert_marked(uint64_t offset, uint64_t bytes)
{
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(checked_top, "b0");
    assert_non_null(bm);
    pthread_mutex_lock(&checked_top->lock);
    for (uint64_t o = offset; o < offset + bytes; o += bm->granularity) {
        assert_true(hbitmap_get(bm->hb, o));
    }
    assert_true(hbitmap_get(bm->hb, offset + bytes - 1));
    pthread_mutex_unlock(&checked_top->lock);
    checked_writes++;
}

static int checking_pwritev(BlockDriverState *bs, uint64_t offset, uint64_t bytes,
                            const struct iovec *iov, int niov, int flags)
{
    assert_marked(offset, bytes);
    return real_file_drv->pwritev(bs, offset, bytes, iov, niov, flags);
}

static int checking_pwrite_zeroes(BlockDriverState *bs, uint64_t offset,
                                  uint64_t bytes, int flags)
{
    assert_marked(offset, bytes);
    return real_file_drv->pwrite_zeroes(bs, offset, bytes, flags);
}

static void test_bitmap_marked_before_write(void **state)
{
    _cleanup_free_ char *path = make_image(tpath("order.raw"), "raw", IMG_SIZE);
    BlockDriverState *bs = open_raw(path, false);
    static BlockDriver checking;
    real_file_drv = bs->file->drv;
    checking = *real_file_drv;
    checking.pwritev = checking_pwritev;
    checking.pwrite_zeroes = checking_pwrite_zeroes;
    bs->file->drv = &checking;
    checked_top = bs;
    checked_writes = 0;

    Error *err = NULL;
    BdrvDirtyBitmap *bm = bdrv_dirty_bitmap_add(bs, "b0", 65536, false, false, &err);
    assert_non_null(bm);
    uint8_t buf[4096];
    memset(buf, 0x5a, sizeof(buf));
    assert_int_equal(bdrv_pwrite(bs, 65536 * 3 + 17, buf, sizeof(buf), 0), 0);
    assert_int_equal(bdrv_pwrite(bs, 65536 * 10 - 1, buf, 2, BDRV_REQ_FUA), 0);
    assert_int_equal(bdrv_pwrite_zeroes(bs, 65536 * 20, 65536 * 2, 0), 0);
    assert_int_equal(checked_writes, 3);
    /* Exactly the touched clusters: 3, 9, 10, 20, 21. */
    BdrvDirtyExtent ext[4];
    size_t n = bdrv_dirty_bitmap_extents(bm, 0, IMG_SIZE, true, ext, 4);
    assert_int_equal(n, 3);
    assert_int_equal(ext[0].start, 65536 * 3);
    assert_int_equal(ext[0].length, 65536);
    assert_int_equal(ext[1].start, 65536 * 9);
    assert_int_equal(ext[1].length, 65536 * 2);
    assert_int_equal(ext[2].start, 65536 * 20);
    assert_int_equal(ext[2].length, 65536 * 2);
    assert_int_equal(bdrv_dirty_bitmap_count(bm), 65536 * 5);
    bs->file->drv = real_file_drv;
    assert_true(bdrv_close(bs, NULL));
}

static void test_bitmap_states(void **state)
{
    _cleanup_free_ char *path = make_image(tpath("states.raw"), "raw", IMG_SIZE);
    BlockDriverState *bs = open_raw(path, false);
    Error *err = NULL;
    uint8_t buf[512] = { 1 };

    BdrvDirtyBitmap *a = bdrv_dirty_bitmap_add(bs, "a", 65536, false, false, &err);
    BdrvDirtyBitmap *d = bdrv_dirty_bitmap_add(bs, "d", 65536, false, true, &err);
    BdrvDirtyBitmap *g = bdrv_dirty_bitmap_add(bs, "g", 4096, false, false, &err);
    assert_non_null(a);
    assert_non_null(d);
    assert_non_null(g);
    /* Duplicate names, bad granularities and persistence on raw fail. */
    assert_null(bdrv_dirty_bitmap_add(bs, "a", 65536, false, false, &err));
    error_freep(&err);
    assert_null(bdrv_dirty_bitmap_add(bs, "x", 3000, false, false, &err));
    error_freep(&err);
    assert_null(bdrv_dirty_bitmap_add(bs, "x", 256, false, false, &err));
    error_freep(&err);
    assert_null(bdrv_dirty_bitmap_add(bs, "p", 65536, true, false, &err));
    assert_non_null(strstr(error_get_pretty(err), "persistent"));
    error_freep(&err);

    assert_int_equal(bdrv_pwrite(bs, 0, buf, sizeof(buf), 0), 0);
    assert_int_equal(bdrv_dirty_bitmap_count(a), 65536);
    assert_int_equal(bdrv_dirty_bitmap_count(d), 0);     /* not recording */

    /* Merge with mismatched granularity fails and leaves d untouched. */
    BdrvDirtyBitmap *srcs[2] = { a, g };
    assert_false(bdrv_merge_dirty_bitmaps(d, srcs, 2, &err));
    error_freep(&err);
    assert_int_equal(bdrv_dirty_bitmap_count(d), 0);
    assert_true(bdrv_merge_dirty_bitmaps(d, srcs, 1, &err));
    assert_int_equal(bdrv_dirty_bitmap_count(d), 65536);

    /* Clear changes the generation; busy and inconsistent refuse. */
    char gen[UUID_STR_LEN];
    memcpy(gen, a->generation, sizeof(gen));
    assert_true(bdrv_clear_dirty_bitmap(a, &err));
    assert_string_not_equal(gen, a->generation);
    assert_int_equal(bdrv_dirty_bitmap_count(a), 0);
    bdrv_dirty_bitmap_set_busy(a, true);
    assert_false(bdrv_clear_dirty_bitmap(a, &err));
    error_freep(&err);
    assert_false(bdrv_dirty_bitmap_remove(bs, "a", &err));
    error_freep(&err);
    bdrv_dirty_bitmap_set_busy(a, false);
    bdrv_dirty_bitmap_set_inconsistent(g, "test");
    assert_false(bdrv_enable_dirty_bitmap(g, &err));
    assert_non_null(strstr(error_get_pretty(err), "inconsistent"));
    error_freep(&err);
    assert_true(bdrv_dirty_bitmap_remove(bs, "g", &err));
    assert_null(bdrv_find_dirty_bitmap(bs, "g"));
    assert_true(bdrv_disable_dirty_bitmap(a, &err));
    assert_int_equal(bdrv_pwrite(bs, 1 << 20, buf, sizeof(buf), 0), 0);
    assert_int_equal(bdrv_dirty_bitmap_count(a), 0);
    assert_true(bdrv_close(bs, NULL));
}

static void test_block_status_sparse(void **state)
{
    _cleanup_free_ char *path = make_image(tpath("sparse.raw"), "raw", IMG_SIZE);
    BlockDriverState *bs = open_raw(path, false);
    uint8_t buf[65536];
    memset(buf, 7, sizeof(buf));
    assert_int_equal(bdrv_pwrite(bs, 1 << 20, buf, sizeof(buf), 0), 0);
    uint64_t pnum;
    int r = bdrv_block_status(bs, 0, IMG_SIZE, &pnum);
    assert_true(r & BDRV_BLOCK_ZERO);
    assert_false(r & BDRV_BLOCK_DATA);
    assert_true(pnum <= (1 << 20));
    r = bdrv_block_status(bs, 1 << 20, IMG_SIZE - (1 << 20), &pnum);
    assert_true(r & BDRV_BLOCK_DATA);
    assert_true(r & BDRV_BLOCK_ALLOCATED);
    assert_true(pnum >= 65536);
    assert_true(bdrv_close(bs, NULL));
}

static void evict(const char *path)
{
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(fdatasync(fd), 0);
    assert_int_equal(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    close(fd);
}

static int hook_noop_read(BdrvIoHook *h, BlockDriverState *bs, uint64_t offset,
                          uint64_t bytes)
{
    return 0;
}

/* A qcow2 image named `name` in tmpdir, with backing file `backing`
 * (format qcow2) when not NULL.  Returns its path (caller frees). */
static char *make_qcow2(const char *name, const char *backing)
{
    return make_qcow2_image(tpath(name), 1 << 20, backing, "qcow2", NULL);
}

/* BDRV_O_NO_BACKING opens nothing the header names but records it;
 * bdrv_set_backing attaches the backing the caller chose, and refuses a
 * second backing, a loop and a driver without backing. */
static void test_set_backing(void **state)
{
    _cleanup_free_ char *base = make_qcow2("sb-base.qcow2", NULL);
    _cleanup_free_ char *top = make_qcow2("sb-top.qcow2", "elsewhere.qcow2");
    _cleanup_free_ char *raw = make_image(tpath("sb.raw"), "raw", 1 << 20);
    uint8_t buf[4096], pattern[4096];
    Error *err = NULL;

    /* The header's name is not opened (the file does not exist). */
    BlockDriverState *t = bdrv_open_image(top, "qcow2", BDRV_O_NO_BACKING,
                                          &err);
    assert_non_null(t);
    assert_null(t->backing);
    assert_string_equal(t->backing_file, "elsewhere.qcow2");
    assert_string_equal(t->backing_format, "qcow2");
    BlockDriverState *b = bdrv_open_image(base, "qcow2", BDRV_O_RDWR, &err);
    assert_non_null(b);
    assert_null(b->backing_file);
    memset(pattern, 0x5a, sizeof(pattern));
    assert_int_equal(bdrv_pwrite(b, 8192, pattern, sizeof(pattern), 0), 0);

    assert_true(bdrv_set_backing(t, b, &err));
    assert_ptr_equal(t->backing, b);
    /* t reads b's data where it has none of its own. */
    assert_int_equal(bdrv_pread(t, 8192, buf, sizeof(buf)), 0);
    assert_memory_equal(buf, pattern, sizeof(buf));

    bool ok = bdrv_set_backing(t, b, &err);
    expect_error(ok, &err, "already has");
    ok = bdrv_set_backing(b, t, &err);
    expect_error(ok, &err, "loop");
    BlockDriverState *r = bdrv_open_image(raw, "raw", 0, &err);
    assert_non_null(r);
    ok = bdrv_set_backing(r, b, &err);
    expect_error(ok, &err, "cannot have");
    bdrv_unref(r);

    /* t holds its own reference to b. */
    bdrv_unref(b);
    bdrv_unref(t);
}

static void test_read_nowait(void **state)
{
    enum { LEN = 65536 };
    _cleanup_free_ char *path = make_image(tpath("nowait.raw"), "raw", IMG_SIZE);
    BlockDriverState *bs = open_raw(path, false);
    assert_true(bs->supported_read_flags & BDRV_REQ_NOWAIT);
    uint8_t pat[LEN], buf[LEN];
    for (int i = 0; i < LEN; i++) {
        pat[i] = (uint8_t)(i * 7 + 3);
    }
    assert_int_equal(bdrv_pwrite(bs, 1 << 20, pat, LEN, 0), 0);
    assert_int_equal(bdrv_flush(bs), 0);
    struct iovec iov = { buf, LEN };

    /* Cold: the read must not wait for the disk.  RWF_NOWAIT lets the
     * kernel start readahead without waiting for it, and on a virtual disk
     * with a host cache that readahead can finish before the read looks
     * again, so a cold read either refuses (-EAGAIN) or returns the right
     * data: never an error, never other bytes.  (Where bitback itself
     * decides to refuse, O_DIRECT and installed hooks below, the refusal is
     * asserted exactly.) */
    int refused = 0;
    for (int round = 0; round < 3; round++) {
        evict(path);
        memset(buf, 0, LEN);
        int rc = bdrv_preadv(bs, 1 << 20, LEN, &iov, 1, BDRV_REQ_NOWAIT);
        if (rc == -EAGAIN) {
            refused++;
        } else {
            assert_int_equal(rc, 0);
            assert_memory_equal(buf, pat, LEN);
        }
    }
    if (!refused) {
        print_message("cold NOWAIT reads were all served: the kernel's "
                      "readahead finished first\n");
    }
    /* Warm: an ordinary read caches the data; NOWAIT then returns it.  The
     * kernel may refuse a NOWAIT read once more where the ordinary read left
     * a readahead mark (it would have to start the next readahead), so a
     * refusal is followed by another ordinary read: at most three rounds,
     * and the data must come back by NOWAIT in one of them. */
    int r = -EAGAIN;
    for (int round = 0; round < 3 && r == -EAGAIN; round++) {
        assert_int_equal(bdrv_pread(bs, 1 << 20, buf, LEN), 0);
        memset(buf, 0, LEN);
        r = bdrv_preadv(bs, 1 << 20, LEN, &iov, 1, BDRV_REQ_NOWAIT);
    }
    assert_int_equal(r, 0);
    assert_memory_equal(buf, pat, LEN);

    /* Hooks may wait for a job: no NOWAIT read while one is installed. */
    BdrvIoHook hook = { .before_read = hook_noop_read };
    bdrv_add_io_hook(bs, &hook);
    assert_int_equal(bdrv_preadv(bs, 1 << 20, LEN, &iov, 1, BDRV_REQ_NOWAIT),
                     -EAGAIN);
    assert_int_equal(bdrv_preadv(bs, 1 << 20, LEN, &iov, 1, 0), 0);
    bdrv_remove_io_hook(bs, &hook);
    assert_int_equal(bdrv_preadv(bs, 1 << 20, LEN, &iov, 1, BDRV_REQ_NOWAIT), 0);
    assert_true(bdrv_close(bs, NULL));

    /* O_DIRECT would still wait for the device. */
    bs = open_raw(path, true);
    if (bs) {
        assert_false(bs->supported_read_flags & BDRV_REQ_NOWAIT);
        assert_int_equal(bdrv_preadv(bs, 1 << 20, LEN, &iov, 1, BDRV_REQ_NOWAIT),
                         -EAGAIN);
        assert_true(bdrv_close(bs, NULL));
    }
}

/* Run the driver's check on `path` read-only into *res (0 expected). */
static void run_check(const char *path, BdrvCheckResult *res)
{
    Error *err = NULL;
    BlockDriverState *bs = bdrv_open_image(path, "qcow2", 0, &err);
    if (!bs) {
        fail_msg("open: %s", error_get_pretty(err));
    }
    assert_int_equal(bs->drv->check(bs, res), 0);
    assert_true(bdrv_close(bs, NULL));
}

/* A refcount of 1 for every other cluster the first refcount block covers
 * past the end of the file.  Up to 1 GiB past the end they are leaks (what
 * a crash leaves, qcow2.md B3): one each, one message per run, far more
 * than the messages a result keeps.  Beyond, the block is a corruption,
 * counted once (K1). */
static void test_qcow2_check_bounded(void **state)
{
    _cleanup_free_ char *path = make_qcow2("check.qcow2", NULL);
    BdrvCheckResult res = BDRV_CHECK_RESULT_INIT;
    run_check(path, &res);
    assert_int_equal(bdrv_check_problems(&res), 0);
    assert_int_equal(res.nb_messages, 0);
    bdrv_check_result_clear(&res);

    _cleanup_close_ int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    uint8_t hdr[104], ent[8];
    assert_int_equal(pread_full(fd, hdr, sizeof(hdr), 0), 0);
    assert_int_equal(ld_be32(hdr + 96), 4);            /* 16-bit refcounts */
    uint64_t csz = UINT64_C(1) << ld_be32(hdr + 20);
    assert_int_equal(pread_full(fd, ent, 8, (off_t)ld_be64(hdr + 48)), 0);
    uint64_t block = ld_be64(ent);
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    uint64_t in_file = DIV_ROUND_UP((uint64_t)st.st_size, csz);
    uint64_t per_block = csz / 2;
    uint64_t leak_end = in_file + (UINT64_C(1) << 30) / csz;
    assert_true(leak_end < per_block);
    _cleanup_free_ uint8_t *refs = malloc(csz);
    assert_non_null(refs);
    assert_int_equal(pread_full(fd, refs, csz, (off_t)block), 0);
    for (uint64_t c = in_file; c < per_block; c += 2) {
        st_be16(refs + 2 * c, 1);
    }
    assert_int_equal(pwrite_full(fd, refs, csz, (off_t)block), 0);
    uint64_t leaks = DIV_ROUND_UP(leak_end - in_file, 2);
    assert_true(leaks > BDRV_CHECK_MAX_MESSAGES);

    run_check(path, &res);
    assert_int_equal(res.leaks, leaks);
    assert_int_equal(res.corruptions, 1);
    assert_int_equal(res.check_errors, 0);
    assert_int_equal(res.nb_messages, BDRV_CHECK_MAX_MESSAGES);
    assert_int_equal(res.messages_dropped, leaks + 1 - BDRV_CHECK_MAX_MESSAGES);
    char want[128];
    snprintf(want, sizeof(want), "Leaked cluster %" PRIu64 " (past the end "
             "of the file) reference=0", in_file);
    assert_string_equal(res.messages[0], want);
    assert_int_equal(res.total_clusters, DIV_ROUND_UP(1 << 20, csz));
    assert_int_equal(res.allocated_clusters, 0);
    assert_true(res.image_end_offset > 0 &&
                res.image_end_offset <= (uint64_t)st.st_size);
    bdrv_check_result_clear(&res);
}

/* ---- bdrv_dirty_bitmap_extents: bounded, against a naive model ---- */

#define EXT_IMG_SIZE (64u * 1024 * 1024)

/* The full extent list of [offset, offset+bytes) by a cluster-by-cluster
 * walk of model (one bool per cluster), clipped to size; dirty_only keeps
 * only the dirty ones.  Returns the count. */
static size_t model_extents(const bool *model, unsigned shift, uint64_t size,
                            uint64_t offset, uint64_t bytes, bool dirty_only,
                            BdrvDirtyExtent *out)
{
    uint64_t end = MIN(size, offset + bytes), pos = offset;
    size_t n = 0;
    while (pos < end) {
        bool d = model[pos >> shift];
        uint64_t e = pos;
        while (e < end && model[e >> shift] == d) {
            e = MIN(end, ((e >> shift) + 1) << shift);
        }
        if (d || !dirty_only) {
            out[n++] = (BdrvDirtyExtent){ pos, e - pos, d };
        }
        pos = e;
    }
    return n;
}

static void assert_extents_equal(const BdrvDirtyExtent *a,
                                 const BdrvDirtyExtent *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(a[i].start, b[i].start);
        assert_int_equal(a[i].length, b[i].length);
        assert_int_equal(a[i].dirty, b[i].dirty);
    }
}

/* Random fragmented bitmaps (runs from one cluster to longer than one
 * search window of the walk), random ranges and limits: the answer is the
 * first min(limit, all) extents of the model's full list, and going on
 * from the last one's end gives the rest of the list exactly. */
static void test_bitmap_extents_bounded(void **state)
{
    _cleanup_free_ char *path = make_image(tpath("extents.raw"), "raw",
                                           EXT_IMG_SIZE);
    BlockDriverState *bs = open_raw(path, false);
    static const uint32_t grans[] = { 512, 4096, 65536 };
    static const size_t limits[] = { 1, 2, 3, 7, 64, 1000, 16384 };
    uint64_t nb_max = EXT_IMG_SIZE / 512;
    _cleanup_free_ bool *model = calloc(nb_max, sizeof(bool));
    _cleanup_free_ BdrvDirtyExtent *want = calloc(nb_max + 1, sizeof(*want));
    _cleanup_free_ BdrvDirtyExtent *got = calloc(nb_max + 1, sizeof(*got));
    assert_non_null(model);
    assert_non_null(want);
    assert_non_null(got);
    srand(17);

    for (int round = 0; round < 24; round++) {
        uint32_t gran = grans[round % 3];
        unsigned shift = (unsigned)__builtin_ctz(gran);
        uint64_t nb = EXT_IMG_SIZE >> shift;
        Error *err = NULL;
        BdrvDirtyBitmap *bm = bdrv_create_dirty_bitmap(bs, gran, "x", &err);
        die_on(err);
        /* Alternating runs; short ones mostly, some past a search window
         * (512 words = 32768 clusters) so a run is found in pieces. */
        bool d = rand() & 1;
        for (uint64_t c = 0; c < nb; d = !d) {
            uint64_t run = rand() % 8 ? 1 + (uint64_t)rand() % 6
                                      : 1 + (uint64_t)rand() % 70000;
            run = MIN(run, nb - c);
            for (uint64_t i = c; i < c + run; i++) {
                model[i] = d;
            }
            if (d) {
                hbitmap_set(bm->hb, c << shift, run << shift);
            }
            c += run;
        }
        for (int q = 0; q < 20; q++) {
            uint64_t off = (uint64_t)rand() % EXT_IMG_SIZE;
            uint64_t len = q % 5 == 0 ? EXT_IMG_SIZE * 2    /* past the end */
                                      : 1 + (uint64_t)rand() % (EXT_IMG_SIZE - off);
            bool dirty_only = q % 3 == 0;
            size_t limit = limits[rand() % ARRAY_SIZE(limits)];
            size_t all = model_extents(model, shift, EXT_IMG_SIZE, off, len,
                                       dirty_only, want);

            size_t n = bdrv_dirty_bitmap_extents(bm, off, len, dirty_only,
                                                 got, limit);
            assert_int_equal(n, MIN(limit, all));
            assert_extents_equal(got, want, n);
            if (!dirty_only && n > 0) {
                assert_int_equal(got[0].start, off);     /* a prefix */
            }

            /* Going on from the end of each answer: the whole list. */
            size_t total = n;
            while (total < all) {
                uint64_t pos = got[total - 1].start + got[total - 1].length;
                size_t k = bdrv_dirty_bitmap_extents(bm, pos, off + len - pos,
                                                     dirty_only, got + total,
                                                     limit);
                assert_true(k > 0);
                total += k;
            }
            assert_extents_equal(got, want, all);
            uint64_t pos = total ? got[total - 1].start + got[total - 1].length
                                 : off;
            assert_int_equal(bdrv_dirty_bitmap_extents(bm, pos,
                                                       off + len - pos,
                                                       dirty_only, got, limit),
                             0);
        }
        /* max 0 and an empty range: nothing. */
        assert_int_equal(bdrv_dirty_bitmap_extents(bm, 0, EXT_IMG_SIZE, false,
                                                   got, 0), 0);
        assert_int_equal(bdrv_dirty_bitmap_extents(bm, 4096, 0, false, got, 8),
                         0);
        bdrv_release_dirty_bitmap(bm);
    }
    assert_true(bdrv_close(bs, NULL));
}

int main(void)
{
    if (tmpdir_create("block") < 0) {
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_io_buffered),
        cmocka_unit_test(test_random_io_direct),
        cmocka_unit_test(test_out_of_range),
        cmocka_unit_test(test_bitmap_marked_before_write),
        cmocka_unit_test(test_bitmap_states),
        cmocka_unit_test(test_bitmap_extents_bounded),
        cmocka_unit_test(test_block_status_sparse),
        cmocka_unit_test(test_read_nowait),
        cmocka_unit_test(test_set_backing),
        cmocka_unit_test(test_qcow2_check_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, tmpdir_teardown);
}
