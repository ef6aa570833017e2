/*
 * Unit tests for drained sections and I/O hooks (block.c):
 *  - writer threads hammer a raw-over-file node while the main thread
 *    drains it again and again: inside each drained section nothing is in
 *    flight, no write completes and the file's bytes stay frozen; after
 *    the section the writers go on;
 *  - a before_write hook sees every write, zero write and discard before
 *    its data lands: it reads the old data through the node and compares it
 *    with each writer's model, and checks the dirty bit is already set;
 *  - hooks that issue nested I/O (to another node and to the same node)
 *    and requests made with bdrv_* (not bdrv_client_*) never wait for a
 *    drained section, so draining while they run does not deadlock;
 *  - a node opened inside a drained section leaves the section balanced.
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
#include <time.h>
#include <unistd.h>
#include <sys/uio.h>
#include <cmocka.h>

#include "block/block.h"
#include "util/cleanup.h"
#include "test-util.h"

#define IMG_SIZE    (4u * 1024 * 1024)
#define NWRITERS    4
#define REGION      (IMG_SIZE / NWRITERS)

static BlockDriverState *open_raw(const char *path)
{
    _cleanup_json_ struct json_object *opts = json_object_new_object();
    struct json_object *file = json_object_new_object();
    json_object_object_add(file, "driver", json_object_new_string("file"));
    json_object_object_add(file, "filename", json_object_new_string(path));
    json_object_object_add(opts, "driver", json_object_new_string("raw"));
    json_object_object_add(opts, "file", file);
    Error *err = NULL;
    BlockDriverState *bs = bdrv_open_options(opts, BDRV_O_RDWR, &err);
    if (!bs) {
        fail_msg("open: %s", error_get_pretty(err));
    }
    return bs;
}

/* ---- writers ---- */

typedef struct Writer {
    BlockDriverState *bs;
    int id;                       /* owns [id * REGION, (id + 1) * REGION) */
    unsigned seed;
    bool internal;                /* bdrv_* requests, not bdrv_client_* */
    bool mixed;                   /* also zero writes and discards */
    uint8_t *model;               /* the region's content, when tracked */
    uint64_t done;                /* writes completed (atomic) */
    int errors;
    pthread_t thread;
} Writer;

static bool writers_stop;
static __thread bool tl_internal;   /* this writer makes bdrv_* requests */

static void *writer_main(void *opaque)
{
    Writer *w = opaque;
    uint8_t *buf = malloc(64 * 1024);
    tl_internal = w->internal;
    while (!__atomic_load_n(&writers_stop, __ATOMIC_ACQUIRE)) {
        uint64_t len = 1 + (uint64_t)rand_r(&w->seed) % (64 * 1024);
        uint64_t rel = (uint64_t)rand_r(&w->seed) % (REGION - len);
        uint64_t off = (uint64_t)w->id * REGION + rel;
        int op = w->mixed ? rand_r(&w->seed) % 4 : 0;
        int r;
        if (op == 2) {
            r = w->internal ? bdrv_pwrite_zeroes(w->bs, off, len, 0)
                            : bdrv_client_pwrite_zeroes(w->bs, off, len, 0);
            if (r == 0 && w->model) {
                memset(w->model + rel, 0, len);
            }
        } else if (op == 3) {
            r = w->internal ? bdrv_pdiscard(w->bs, off, len)
                            : bdrv_client_pdiscard(w->bs, off, len);
            if (r == 0 && w->model) {
                /* Discard is a hint: learn what it left. */
                r = bdrv_pread(w->bs, off, w->model + rel, len);
            }
        } else {
            memset(buf, (int)(rand_r(&w->seed) & 0xff), len);
            buf[0] = (uint8_t)w->id;
            struct iovec iov = { .iov_base = buf, .iov_len = len };
            r = w->internal ? bdrv_pwritev(w->bs, off, len, &iov, 1, 0)
                            : bdrv_client_pwritev(w->bs, off, len, &iov, 1, 0);
            if (r == 0 && w->model) {
                memcpy(w->model + rel, buf, len);
            }
        }
        if (r < 0) {
            w->errors++;
        }
        __atomic_add_fetch(&w->done, 1, __ATOMIC_RELEASE);
    }
    free(buf);
    return NULL;
}

static void start_writers(Writer *w, int n, BlockDriverState *bs, bool internal,
                          bool mixed, bool model)
{
    writers_stop = false;
    for (int i = 0; i < n; i++) {
        w[i] = (Writer) { .bs = bs, .id = i, .seed = 1000u + (unsigned)i,
                          .internal = internal, .mixed = mixed };
        if (model) {
            w[i].model = calloc(1, REGION);
            assert_non_null(w[i].model);
        }
        assert_int_equal(pthread_create(&w[i].thread, NULL, writer_main, &w[i]), 0);
    }
}

static void stop_writers(Writer *w, int n)
{
    __atomic_store_n(&writers_stop, true, __ATOMIC_RELEASE);
    for (int i = 0; i < n; i++) {
        pthread_join(w[i].thread, NULL);
        assert_int_equal(w[i].errors, 0);
    }
}

/* Remove hook from bs inside a drained section of all nodes, so that no
 * request is between the hook's calls when it goes. */
static void remove_hook_drained(BlockDriverState *bs, BdrvIoHook *hook)
{
    bdrv_drain_all_begin();
    bdrv_remove_io_hook(bs, hook);
    bdrv_drain_all_end();
}

static uint64_t total_done(Writer *w, int n)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++) {
        t += __atomic_load_n(&w[i].done, __ATOMIC_ACQUIRE);
    }
    return t;
}

/* Inside a drained section no client request is in flight.  A client
 * that arrives meanwhile counts itself for an instant before it sees the
 * section and uncounts itself to wait (the gate protocol in block.c), so
 * the count must fall to 0 at once (within 1 s), not read 0 every time. */
static void assert_none_in_flight(BlockDriverState *bs)
{
    for (int spin = 0; spin < 1000 &&
         __atomic_load_n(&bs->in_flight, __ATOMIC_SEQ_CST) != 0; spin++) {
        sleep_ms(1);
    }
    assert_int_equal(__atomic_load_n(&bs->in_flight, __ATOMIC_SEQ_CST), 0);
}

/* ---- drain freezes external writers ---- */

static void test_drain_freezes_writers(void **state)
{
    (void)state;
    _cleanup_free_ char *path = make_image(tpath("freeze.raw"), "raw", IMG_SIZE);
    BlockDriverState *bs = open_raw(path);
    Writer w[NWRITERS];
    start_writers(w, NWRITERS, bs, false, true, false);

    uint64_t progress_outside = 0;
    for (int round = 0; round < 15; round++) {
        uint64_t before = total_done(w, NWRITERS);
        sleep_ms(5);
        bdrv_drain_all_begin();
        assert_none_in_flight(bs);
        assert_none_in_flight(bs->file);
        assert_true(bs->quiesce_counter > 0 && bs->file->quiesce_counter > 0);
        uint64_t frozen = total_done(w, NWRITERS);
        _cleanup_free_ uint8_t *a = read_file(path, IMG_SIZE);
        sleep_ms(20);
        _cleanup_free_ uint8_t *b = read_file(path, IMG_SIZE);
        uint64_t after = total_done(w, NWRITERS);
        bool same = memcmp(a, b, IMG_SIZE) == 0;
        if (!same || after > frozen + NWRITERS) {
            bdrv_drain_all_end();         /* let the writers go before failing */
            stop_writers(w, NWRITERS);
            fail_msg("writes landed inside a drained section");
        }
        /* A writer may count, just after the drain began, one write that
         * completed before it: at most one per writer. */
        /* Reads are never blocked. */
        uint8_t x[512];
        assert_int_equal(bdrv_pread(bs, 0, x, sizeof(x)), 0);
        bdrv_drain_all_end();
        progress_outside += frozen - before;
    }
    assert_int_equal(bs->quiesce_counter, 0);
    stop_writers(w, NWRITERS);
    /* The writers were really running between the sections. */
    assert_true(progress_outside > 0);
    assert_true(total_done(w, NWRITERS) > progress_outside);
    bdrv_unref(bs);
}

/* ---- hooks see every write before the data lands ---- */

typedef struct CheckHook {
    BdrvIoHook hook;
    Writer *writers;
    BdrvDirtyBitmap *bm;
    uint64_t calls;               /* atomic */
    int mismatches;               /* atomic */
} CheckHook;

static int check_before_write(BdrvIoHook *hook, BlockDriverState *bs,
                              uint64_t offset, uint64_t bytes)
{
    CheckHook *c = hook->opaque;
    __atomic_add_fetch(&c->calls, 1, __ATOMIC_RELAXED);
    int id = (int)(offset / REGION);
    Writer *w = &c->writers[id];
    uint64_t rel = offset - (uint64_t)id * REGION;
    uint8_t *old = malloc(bytes);
    if (!old) {
        return -ENOMEM;
    }
    /* A nested read of the same node: the data has not landed yet. */
    int r = bdrv_pread(bs, offset, old, bytes);
    if (r < 0 || memcmp(old, w->model + rel, bytes) != 0) {
        __atomic_add_fetch(&c->mismatches, 1, __ATOMIC_RELAXED);
    }
    free(old);
    /* Invariant 1: the bitmap already knows. */
    pthread_mutex_lock(&bs->lock);
    bool dirty = hbitmap_get(c->bm->hb, offset) &&
                 hbitmap_get(c->bm->hb, offset + bytes - 1);
    pthread_mutex_unlock(&bs->lock);
    if (!dirty) {
        __atomic_add_fetch(&c->mismatches, 1, __ATOMIC_RELAXED);
    }
    return 0;
}

static int failing_before_write(BdrvIoHook *hook, BlockDriverState *bs,
                                uint64_t offset, uint64_t bytes)
{
    (void)hook; (void)bs; (void)offset; (void)bytes;
    return -EIO;
}

static void test_hook_sees_writes_first(void **state)
{
    (void)state;
    _cleanup_free_ char *path = make_image(tpath("hook.raw"), "raw", IMG_SIZE);
    BlockDriverState *bs = open_raw(path);
    Error *err = NULL;
    BdrvDirtyBitmap *bm = bdrv_dirty_bitmap_add(bs, "b0", 4096, false, false, &err);
    assert_non_null(bm);

    Writer w[NWRITERS];
    CheckHook c = { .writers = w, .bm = bm };
    c.hook = (BdrvIoHook) { .before_write = check_before_write, .opaque = &c };
    bdrv_drain_all_begin();
    bdrv_add_io_hook(bs, &c.hook);
    bdrv_drain_all_end();

    start_writers(w, NWRITERS, bs, false, true, true);
    for (int round = 0; round < 10; round++) {
        sleep_ms(10);
        bdrv_drain_all_begin();
        bdrv_drain_all_end();
    }
    stop_writers(w, NWRITERS);

    remove_hook_drained(bs, &c.hook);

    assert_int_equal(c.mismatches, 0);
    assert_int_equal(c.calls, total_done(w, NWRITERS));
    assert_true(c.calls > 0);
    /* The final content is the models'. */
    _cleanup_free_ uint8_t *img = read_file(path, IMG_SIZE);
    for (int i = 0; i < NWRITERS; i++) {
        assert_memory_equal(img + (size_t)i * REGION, w[i].model, REGION);
        free(w[i].model);
    }

    /* A failing hook fails the request before the data lands. */
    BdrvIoHook fail = { .before_write = failing_before_write };
    bdrv_drain_all_begin();
    bdrv_add_io_hook(bs, &fail);
    bdrv_drain_all_end();
    uint8_t buf[4096];
    memset(buf, 0xaa, sizeof(buf));
    uint8_t before[4096], after[4096];
    assert_int_equal(bdrv_pread(bs, 8192, before, sizeof(before)), 0);
    assert_int_equal(bdrv_pwrite(bs, 8192, buf, sizeof(buf), 0), -EIO);
    assert_int_equal(bdrv_pwrite_zeroes(bs, 8192, sizeof(buf), 0), -EIO);
    assert_int_equal(bdrv_pread(bs, 8192, after, sizeof(after)), 0);
    assert_memory_equal(before, after, sizeof(before));
    remove_hook_drained(bs, &fail);
    assert_int_equal(bdrv_pwrite(bs, 8192, buf, sizeof(buf), 0), 0);
    assert_null(bs->hooks);
    bdrv_unref(bs);
}

/* ---- nested requests under drain ---- */

typedef struct NestHook {
    BdrvIoHook hook;
    BlockDriverState *other;
    uint64_t calls;               /* atomic */
    uint64_t external_calls;      /* atomic: from threads not internal */
    uint64_t reads;               /* atomic: read hooks */
    int errors;                   /* atomic */
} NestHook;

static int nest_before_write(BdrvIoHook *hook, BlockDriverState *bs,
                             uint64_t offset, uint64_t bytes)
{
    NestHook *n = hook->opaque;
    uint64_t len = MIN(bytes, (uint64_t)65536);
    uint8_t *buf = malloc(len);
    if (!buf) {
        return -ENOMEM;
    }
    /* Copy the old data to the other node (as copy-before-write does)
     * and read it back: nested writes and reads while a drain may wait
     * for this very request. */
    int r = bdrv_pread(bs, offset, buf, len);
    if (r == 0) {
        r = bdrv_pwrite(n->other, offset, buf, len, 0);
    }
    if (r == 0) {
        r = bdrv_pread(n->other, offset, buf, len);
    }
    free(buf);
    if (r < 0) {
        __atomic_add_fetch(&n->errors, 1, __ATOMIC_RELAXED);
    }
    __atomic_add_fetch(&n->calls, 1, __ATOMIC_RELAXED);
    if (!tl_internal) {
        __atomic_add_fetch(&n->external_calls, 1, __ATOMIC_RELEASE);
    }
    return 0;
}

static int nest_before_read(BdrvIoHook *hook, BlockDriverState *bs,
                            uint64_t offset, uint64_t bytes)
{
    (void)bs;
    NestHook *n = hook->opaque;
    /* A read hook that writes elsewhere (fleecing copies on read). */
    uint8_t z[512] = { 0 };
    int r = bdrv_pwrite(n->other, ROUND_DOWN(offset, 512), z,
                        MIN((uint64_t)512, bytes), 0);
    if (r < 0) {
        __atomic_add_fetch(&n->errors, 1, __ATOMIC_RELAXED);
    }
    return 0;
}

static void nest_after_read(BdrvIoHook *hook, BlockDriverState *bs,
                            uint64_t offset, uint64_t bytes)
{
    (void)bs; (void)offset; (void)bytes;
    NestHook *n = hook->opaque;
    __atomic_add_fetch(&n->reads, 1, __ATOMIC_RELAXED);
}

static void *reader_main(void *opaque)
{
    BlockDriverState *bs = opaque;
    uint8_t buf[4096];
    unsigned seed = 7;
    while (!__atomic_load_n(&writers_stop, __ATOMIC_ACQUIRE)) {
        uint64_t off = (uint64_t)rand_r(&seed) % (IMG_SIZE - sizeof(buf));
        if (bdrv_pread(bs, off, buf, sizeof(buf)) < 0) {
            abort();
        }
    }
    return NULL;
}

static void test_nested_requests_under_drain(void **state)
{
    (void)state;
    _cleanup_free_ char *path = make_image(tpath("nest-a.raw"), "raw", IMG_SIZE);
    _cleanup_free_ char *path2 = make_image(tpath("nest-b.raw"), "raw", IMG_SIZE);
    BlockDriverState *a = open_raw(path);
    BlockDriverState *b = open_raw(path2);
    NestHook n = { .other = b };
    n.hook = (BdrvIoHook) { .before_write = nest_before_write,
                            .before_read = nest_before_read,
                            .after_read = nest_after_read, .opaque = &n };
    bdrv_drain_all_begin();
    bdrv_add_io_hook(a, &n.hook);
    bdrv_drain_all_end();

    /* A deadlock would hang here: the test runner's timeout catches it. */
    alarm(120);
    Writer w[NWRITERS];
    start_writers(w, 2, a, false, false, false);          /* external */
    for (int i = 2; i < NWRITERS; i++) {                  /* internal */
        w[i] = (Writer) { .bs = a, .id = i, .seed = 77u + (unsigned)i,
                          .internal = true };
        assert_int_equal(pthread_create(&w[i].thread, NULL, writer_main, &w[i]), 0);
    }
    pthread_t reader;
    assert_int_equal(pthread_create(&reader, NULL, reader_main, a), 0);

    for (int round = 0; round < 20; round++) {
        sleep_ms(5);
        bdrv_drain_all_begin();
        assert_none_in_flight(a);
        /* Internal writers keep going inside the section. */
        uint64_t internal0 = __atomic_load_n(&w[2].done, __ATOMIC_ACQUIRE) +
                             __atomic_load_n(&w[3].done, __ATOMIC_ACQUIRE);
        /* External requests run the hook before they finish, and none
         * is in flight now: their count is frozen. */
        uint64_t external0 = __atomic_load_n(&n.external_calls, __ATOMIC_ACQUIRE);
        for (int spin = 0; spin < 2000 &&
             __atomic_load_n(&w[2].done, __ATOMIC_ACQUIRE) +
             __atomic_load_n(&w[3].done, __ATOMIC_ACQUIRE) == internal0; spin++) {
            sleep_ms(1);
        }
        assert_true(__atomic_load_n(&w[2].done, __ATOMIC_ACQUIRE) +
                    __atomic_load_n(&w[3].done, __ATOMIC_ACQUIRE) > internal0);
        assert_int_equal(__atomic_load_n(&n.external_calls, __ATOMIC_ACQUIRE),
                         external0);
        bdrv_drain_all_end();
    }
    stop_writers(w, NWRITERS);
    pthread_join(reader, NULL);
    alarm(0);

    remove_hook_drained(a, &n.hook);
    assert_int_equal(n.errors, 0);
    assert_int_equal(n.calls, total_done(w, NWRITERS));
    assert_true(n.reads > 0);
    bdrv_unref(a);
    bdrv_unref(b);
}

/* ---- balance ---- */

static void test_open_inside_drain(void **state)
{
    (void)state;
    _cleanup_free_ char *p1 = make_image(tpath("bal1.raw"), "raw", 65536);
    _cleanup_free_ char *p2 = make_image(tpath("bal2.raw"), "raw", 65536);
    BlockDriverState *a = open_raw(p1);
    bdrv_drain_all_begin();
    bdrv_drain_all_begin();               /* sections nest */
    BlockDriverState *b = open_raw(p2);
    assert_int_equal(b->quiesce_counter, 2);
    assert_int_equal(b->file->quiesce_counter, 2);
    bdrv_drain_all_end();
    assert_int_equal(a->quiesce_counter, 1);
    assert_int_equal(b->quiesce_counter, 1);
    bdrv_drain_all_end();
    assert_int_equal(a->quiesce_counter, 0);
    assert_int_equal(b->quiesce_counter, 0);
    assert_int_equal(b->file->quiesce_counter, 0);
    uint8_t buf[512] = { 1 };
    assert_int_equal(bdrv_pwrite(b, 0, buf, sizeof(buf), 0), 0);

    /* chain_contains walks backing links. */
    assert_true(bdrv_chain_contains(a, a));
    assert_false(bdrv_chain_contains(a, b));
    a->backing = b;
    assert_true(bdrv_chain_contains(a, b));
    assert_false(bdrv_chain_contains(b, a));
    a->backing = NULL;
    bdrv_unref(a);
    bdrv_unref(b);
}

static int setup(void **state)
{
    (void)state;
    return tmpdir_create("drain");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_drain_freezes_writers),
        cmocka_unit_test(test_hook_sees_writes_first),
        cmocka_unit_test(test_nested_requests_under_drain),
        cmocka_unit_test(test_open_inside_drain),
    };
    return cmocka_run_group_tests(tests, setup, tmpdir_teardown);
}
