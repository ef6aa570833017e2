/*
 * Unit tests for the qbm driver's paths that the CLI cannot reach:
 *  - many threads doing allocating writes into the same unallocated
 *    clusters of an overlay at once (copy-on-write must be serialized and
 *    never lose a neighbour's data), checked against an in-memory model;
 *  - random writes, zero writes and reads on an overlay against the model,
 *    also after a reopen;
 *  - invariant 7: an allocation bit reaches the file only on flush;
 *  - a store while the image stays open sets CLEAN, and the next write
 *    clears it again before the data lands (invariant 1 of qbm.md);
 *  - the check counts every problem but keeps no more messages than the
 *    result's bound;
 *  - the bitmap-file loader on an already-open fd (a memfd): a good file
 *    loads its bits, one corrupted bit is a checksum mismatch.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include <xxhash.h>

#include "bitmap/hbitmap.h"
#include "block/block.h"
#include "block/drivers/qbm/qbm-format.h"
#include "util/cleanup.h"
#include "test-util.h"
#include "util/cutils.h"

#define SIZE (4u * 1024 * 1024)
#define CLUSTER (64u * 1024)

static uint8_t model[SIZE];

/* base.raw with a pattern (the model starts equal to it), and ov.qbm over it. */
static char *make_overlay(const char *stem)
{
    _cleanup_free_ char *base = tpath("base.raw");
    int fd = open(base, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    for (uint32_t i = 0; i < SIZE; i++) {
        model[i] = (uint8_t)(i / 4096 * 7 + 1);
    }
    assert_int_equal(pwrite_full(fd, model, SIZE, 0), 0);
    close(fd);
    char name[64];
    snprintf(name, sizeof(name), "%s.qbm", stem);
    char *img = tpath(name);
    struct json_object *opts = json_object_new_object();
    json_object_object_add(opts, "backing", json_object_new_string("base.raw"));
    json_object_object_add(opts, "backing-format", json_object_new_string("raw"));
    Error *err = NULL;
    bool ok = bdrv_img_create(img, "qbm", 0, opts, &err);
    die_on(err);
    assert_true(ok);
    json_object_put(opts);
    return img;
}

static BlockDriverState *open_img(const char *img, int flags)
{
    Error *err = NULL;
    BlockDriverState *bs = bdrv_open_image(img, NULL, flags, &err);
    die_on(err);
    assert_non_null(bs);
    assert_string_equal(bs->drv->format_name, "qbm");
    return bs;
}

static void verify(BlockDriverState *bs)
{
    _cleanup_free_ uint8_t *buf = malloc(SIZE);
    assert_int_equal(bdrv_pread(bs, 0, buf, SIZE), 0);
    for (uint32_t i = 0; i < SIZE; i++) {
        if (buf[i] != model[i]) {
            fail_msg("byte %u: got 0x%02x, expected 0x%02x", i, buf[i], model[i]);
        }
    }
}

/* Close bs (it must close cleanly), reopen img read-only and check it
 * still reads as the model. */
static void close_reopen_verify(BlockDriverState *bs, const char *img)
{
    Error *err = NULL;
    assert_true(bdrv_close(bs, &err));
    die_on(err);
    bs = open_img(img, 0);
    verify(bs);
    bdrv_unref(bs);
}

static uint8_t alloc_file_byte(const char *stem, uint32_t cluster, uint32_t *flags)
{
    char name[64];
    snprintf(name, sizeof(name), "%s.alloc.bm", stem);
    _cleanup_free_ char *p = tpath(name);
    _cleanup_close_ int fd = open(p, O_RDONLY);
    assert_true(fd >= 0);
    uint8_t b;
    assert_int_equal(pread_full(fd, &b, 1, 4096 + cluster / 8), 0);
    if (flags) {
        assert_int_equal(pread_full(fd, flags, 4, 16), 0);
    }
    return (uint8_t)((b >> (cluster % 8)) & 1);
}

/* ---- concurrent allocating writes ---- */

#define NTHREADS 8
#define CHUNK 4096u

typedef struct Worker {
    BlockDriverState *bs;
    int id;
    int err;
} Worker;

static void *worker(void *opaque)
{
    Worker *w = opaque;
    uint8_t buf[CHUNK];
    /* Chunks i with i % NTHREADS == id, in the first 1 MiB: every cluster
     * is allocated by several threads at once. */
    for (uint32_t i = (uint32_t)w->id; i < (1024 * 1024) / CHUNK; i += NTHREADS) {
        memset(buf, 0x80 + w->id, sizeof(buf));
        int r = bdrv_pwrite(w->bs, i * CHUNK, buf, CHUNK, 0);
        if (r < 0) {
            w->err = r;
        }
    }
    return NULL;
}

static void test_concurrent_allocating_writes(void **state)
{
    _cleanup_free_ char *img = make_overlay("conc");
    BlockDriverState *bs = open_img(img, BDRV_O_RDWR);
    pthread_t th[NTHREADS];
    Worker w[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) {
        w[t] = (Worker){ .bs = bs, .id = t };
        assert_int_equal(pthread_create(&th[t], NULL, worker, &w[t]), 0);
    }
    for (int t = 0; t < NTHREADS; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(w[t].err, 0);
    }
    for (uint32_t i = 0; i < (1024 * 1024) / CHUNK; i++) {
        memset(model + i * CHUNK, 0x80 + (int)(i % NTHREADS), CHUNK);
    }
    verify(bs);
    close_reopen_verify(bs, img);
}

/* ---- random I/O against the model ---- */

static void test_random_overlay_io(void **state)
{
    _cleanup_free_ char *img = make_overlay("rand");
    BlockDriverState *bs = open_img(img, BDRV_O_RDWR);
    srand(1234);
    _cleanup_free_ uint8_t *buf = malloc(256 * 1024);
    for (int n = 0; n < 400; n++) {
        uint32_t off = (uint32_t)rand() % SIZE;
        uint32_t len = 1 + (uint32_t)rand() % (256 * 1024);
        if (off + len > SIZE) {
            len = SIZE - off;
        }
        int op = rand() % 4;
        if (op == 0) {
            assert_int_equal(bdrv_pwrite_zeroes(bs, off, len, 0), 0);
            memset(model + off, 0, len);
        } else if (op == 1) {
            assert_int_equal(bdrv_pread(bs, off, buf, len), 0);
            assert_memory_equal(buf, model + off, len);
        } else if (op == 2 && n % 10 == 0) {
            assert_int_equal(bdrv_flush(bs), 0);
        } else {
            memset(buf, n & 0xff, len);
            assert_int_equal(bdrv_pwrite(bs, off, buf, len,
                                         n % 7 == 0 ? BDRV_REQ_FUA : 0), 0);
            memcpy(model + off, buf, len);
        }
    }
    verify(bs);
    /* block_status agrees with reads: unallocated ranges come from base. */
    uint64_t pos = 0;
    while (pos < SIZE) {
        uint64_t pnum;
        int r = bdrv_block_status(bs, pos, SIZE - pos, &pnum);
        assert_true(r >= 0);
        assert_true(pnum > 0);
        pos += pnum;
    }
    close_reopen_verify(bs, img);
}

/* ---- invariant 7: allocation bits reach the file only on flush ---- */

static void test_allocation_bits_on_flush(void **state)
{
    _cleanup_free_ char *img = make_overlay("flush");
    BlockDriverState *bs = open_img(img, BDRV_O_RDWR);
    uint32_t flags;
    uint8_t buf[512];
    memset(buf, 0x5a, sizeof(buf));
    assert_int_equal(alloc_file_byte("flush", 3, &flags), 0);
    assert_int_equal(flags & 1, 0);      /* open for writing: not CLEAN */
    assert_int_equal(bdrv_pwrite(bs, 3 * CLUSTER + 100, buf, sizeof(buf), 0), 0);
    assert_int_equal(alloc_file_byte("flush", 3, NULL), 0);   /* still pending */
    assert_int_equal(bdrv_flush(bs), 0);
    assert_int_equal(alloc_file_byte("flush", 3, NULL), 1);
    /* A FUA write is durable, allocation included, on return. */
    assert_int_equal(bdrv_pwrite(bs, 9 * CLUSTER, buf, sizeof(buf), BDRV_REQ_FUA), 0);
    assert_int_equal(alloc_file_byte("flush", 9, NULL), 1);
    Error *err = NULL;
    assert_true(bdrv_close(bs, &err));
    die_on(err);
    assert_int_equal(alloc_file_byte("flush", 3, &flags), 1);
    assert_int_equal(flags, 1);          /* CLEAN after close */
}

/* ---- store while open, then write again ---- */

static uint32_t bitmap_flags(const char *file)
{
    _cleanup_free_ char *p = tpath(file);
    _cleanup_close_ int fd = open(p, O_RDONLY);
    assert_true(fd >= 0);
    uint32_t f;
    assert_int_equal(pread_full(fd, &f, 4, 16), 0);
    return f;
}

static void test_store_then_write_reclears_clean(void **state)
{
    _cleanup_free_ char *img = make_image(tpath("st.qbm"), "qbm", SIZE);
    Error *err = NULL;
    BlockDriverState *bs = open_img(img, BDRV_O_RDWR);
    BdrvDirtyBitmap *bm = bdrv_dirty_bitmap_add(bs, "b0", 0, true, false, &err);
    die_on(err);
    assert_non_null(bm);
    assert_int_equal(bitmap_flags("st.b0.bm") & 1, 0);
    assert_true(bdrv_store_bitmaps(bs, &err));
    die_on(err);
    assert_int_equal(bitmap_flags("st.b0.bm") & 1, 1);
    uint8_t buf[4096] = { 1 };
    assert_int_equal(bdrv_pwrite(bs, 0, buf, sizeof(buf), 0), 0);
    assert_int_equal(bitmap_flags("st.b0.bm") & 1, 0);
    assert_true(bdrv_close(bs, &err));
    die_on(err);
    assert_int_equal(bitmap_flags("st.b0.bm") & 1, 1);
    bs = open_img(img, 0);
    bm = bdrv_find_dirty_bitmap(bs, "b0");
    assert_non_null(bm);
    assert_false(bm->inconsistent);
    assert_int_equal(bdrv_dirty_bitmap_count(bm), 64 * 1024);
    bdrv_unref(bs);
}

/* Five problems (an empty descriptor, four truncated bitmap files) found
 * by a check whose result keeps two messages. */
static void test_check_messages_bounded(void **state)
{
    _cleanup_free_ char *img = make_image(tpath("ck.qbm"), "qbm", SIZE);
    Error *err = NULL;
    BlockDriverState *bs = open_img(img, BDRV_O_RDWR);
    static const char *const names[] = { "b0", "b1", "b2", "b3" };
    for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
        assert_non_null(bdrv_dirty_bitmap_add(bs, names[i], 0, true, false, &err));
        die_on(err);
    }
    assert_true(bdrv_close(bs, &err));
    die_on(err);

    bs = open_img(img, 0);
    assert_int_equal(truncate(img, 0), 0);
    for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
        char name[64];
        snprintf(name, sizeof(name), "ck.%s.bm", names[i]);
        _cleanup_free_ char *p = tpath(name);
        assert_int_equal(truncate(p, 0), 0);
    }
    BdrvCheckResult res = { .max_messages = 2 };
    assert_int_equal(bs->drv->check(bs, &res), 0);
    assert_int_equal(res.corruptions, 1 + ARRAY_SIZE(names));
    assert_int_equal(res.leaks + res.check_errors, 0);
    assert_int_equal(res.nb_messages, 2);
    assert_int_equal(res.messages_dropped, ARRAY_SIZE(names) - 1);
    assert_non_null(strstr(res.messages[0], "ck.qbm"));
    assert_non_null(strstr(res.messages[1], "bitmap 'b0'"));
    bdrv_check_result_clear(&res);
    bdrv_unref(bs);
}

/* qbm_bitmap_fd_load: the loader without a path, on a memfd. */
static void test_bitmap_fd_load(void **state)
{
    const uint64_t size = 1024 * 1024;       /* 16 clusters: 2 bytes of bits */
    const unsigned shift = 16;
    uint8_t file[QBM_HEADER_SIZE + 2];
    const uint8_t bits[2] = { 0x05, 0x80 };  /* clusters 0, 2 and 15 */
    QbmHeader h = {
        .version = QBM_VERSION, .header_size = QBM_HEADER_SIZE,
        .flags = QBM_FLAG_CLEAN, .granularity_shift = shift,
        .image_size = size, .data_size = sizeof(bits),
        .checksum = XXH3_64bits(bits, sizeof(bits)),
        .generation = "0b3c7a52-5a6e-4f1e-9a0c-3d2b1e4f5a6b",
    };
    qbm_header_encode(&h, file);
    memcpy(file + QBM_HEADER_SIZE, bits, sizeof(bits));

    int fd = memfd_with("good", file, sizeof(file));
    HBitmap *hb = hbitmap_new(size, shift);
    QbmHeader got;
    char *reason = NULL;
    assert_int_equal(qbm_bitmap_fd_load(fd, "good", size, shift, hb, &got,
                                        &reason), QBM_LOAD_OK);
    assert_null(reason);
    assert_string_equal(got.generation, h.generation);
    assert_true(hbitmap_get(hb, 0));
    assert_false(hbitmap_get(hb, CLUSTER));
    assert_true(hbitmap_get(hb, 2 * CLUSTER));
    assert_true(hbitmap_get(hb, 15 * CLUSTER));
    assert_int_equal(hbitmap_count_bytes(hb), 3 * CLUSTER);
    close(fd);

    file[QBM_HEADER_SIZE] ^= 0x02;           /* one bit flipped */
    fd = memfd_with("bad", file, sizeof(file));
    assert_int_equal(qbm_bitmap_fd_load(fd, "bad", size, shift, hb, &got,
                                        &reason), QBM_LOAD_BAD);
    assert_non_null(reason);
    assert_non_null(strstr(reason, "bitmap file 'bad' checksum mismatch"));
    free(reason);
    close(fd);
    hbitmap_free(hb);
}

int main(void)
{
    error_progname = "test-qbm";
    if (tmpdir_create("qbm") < 0) {
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_allocating_writes),
        cmocka_unit_test(test_random_overlay_io),
        cmocka_unit_test(test_allocation_bits_on_flush),
        cmocka_unit_test(test_store_then_write_reclears_clean),
        cmocka_unit_test(test_check_messages_bounded),
        cmocka_unit_test(test_bitmap_fd_load),
    };
    int r = cmocka_run_group_tests(tests, NULL, tmpdir_teardown);
    return r;
}
