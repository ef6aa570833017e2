/*
 * test-write-intent.c's checks with the log in a RADOS object
 * (test-wil-backend.h), and checks of the RADOS store itself: the
 * rados-obj helpers' bounds and short reads, a corrupt object, and the
 * object's lock.  Needs a cluster: BITBACK_TEST_CEPH_CONF names its conf
 * and BITBACK_TEST_CEPH_POOL a pool; without them it fails (it is run by
 * tests/integration/test_rados_wil.py, never skipped).
 *
 * No block driver in the tree keeps its log in RADOS yet, so a node is a
 * qbm node opened with crash-safe off, then given a copy of the qbm
 * driver whose open_intent_store puts the log in the object "wil:IMAGE",
 * and write_intent_open is called on it: what block.c does right after
 * a driver's open.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <rados/librados.h>

#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "block/rados-obj.h"
#include "block/wil-store.h"
#include "block/write-intent.h"
#include "util/cleanup.h"
#include "test-util.h"
#include "test-wil-backend.h"

/* Every log of this test is far smaller (16 MiB images). */
#define LOG_MAX (4u << 20)

const char *const wil_backend_name = "rados";

static rados_t cluster;
static rados_ioctx_t io;
static const char *pool;
static BlockDriver qbm_rados;          /* qbm, its log in RADOS */

static char *oid_of(const char *img)
{
    char *oid = NULL;

    assert_true(asprintf(&oid, "wil:%s", img) > 0);
    return oid;
}

static bool open_store(BlockDriverState *bs, bool create, WilStore **ret,
                       Error **errp)
{
    _cleanup_free_ char *oid = oid_of(bs->filename);

    return wil_store_rados_open(io, oid, create, ret, errp);
}

int wil_backend_init(void)
{
    const char *conf = getenv("BITBACK_TEST_CEPH_CONF");
    int r;

    pool = getenv("BITBACK_TEST_CEPH_POOL");
    if (!conf || !*conf || !pool || !*pool) {
        fprintf(stderr, "test-wil-rados: BITBACK_TEST_CEPH_CONF and "
                "BITBACK_TEST_CEPH_POOL must name a Ceph cluster's conf and "
                "a pool (tests/integration/test_rados_wil.py runs it)\n");
        return -1;
    }
    if ((r = rados_create(&cluster, NULL)) < 0 ||
        (r = rados_conf_read_file(cluster, conf)) < 0 ||
        (r = rados_conf_set(cluster, "client_mount_timeout", "30")) < 0 ||
        (r = rados_connect(cluster)) < 0 ||
        (r = rados_ioctx_create(cluster, pool, &io)) < 0) {
        fprintf(stderr, "test-wil-rados: cannot use pool '%s' of the cluster "
                "of '%s': %s\n", pool, conf, strerror(-r));
        return -1;
    }
    qbm_rados = *bdrv_find_format("qbm");
    qbm_rados.open_intent_store = open_store;
    return 0;
}

int wil_backend_done(int r)
{
    rados_ioctx_destroy(io);
    rados_shutdown(cluster);
    return r;
}

/* wil_backend_open, with the error of write_intent_open returned. */
static BlockDriverState *open_node(const char *img, bool writable,
                                   uint64_t region_size, Error **errp)
{
    Error *err = NULL;
    _cleanup_json_ struct json_object *o = json_object_new_object();
    BlockDriverState *bs;

    json_object_object_add(o, "driver", json_object_new_string("qbm"));
    json_object_object_add(o, "filename", json_object_new_string(img));
    json_object_object_add(o, "crash-safe", json_object_new_boolean(false));
    json_object_object_add(o, "crash-safe-region-size",
                           json_object_new_int64((int64_t)region_size));
    bs = bdrv_open_options(o, writable ? BDRV_O_RDWR : 0, &err);
    die_on(err);
    bs->drv = &qbm_rados;
    bs->crash_safe = true;
    if (!write_intent_open(bs, errp)) {
        bdrv_close(bs, NULL);
        return NULL;
    }
    return bs;
}

BlockDriverState *wil_backend_open(const char *img, bool writable,
                                   uint64_t region_size)
{
    Error *err = NULL;
    BlockDriverState *bs = open_node(img, writable, region_size, &err);

    die_on(err);
    return bs;
}

/* The object oid's bytes in one read (one RADOS operation: atomic). */
static uint8_t *read_object(const char *oid, size_t *ret_len)
{
    uint8_t *buf = malloc(LOG_MAX);
    uint64_t size;
    ssize_t n;

    assert_non_null(buf);
    n = rados_obj_pread(io, oid, buf, LOG_MAX, 0);
    assert_true(n >= 0 && n < (ssize_t)LOG_MAX);
    if (n == 0 && rados_obj_stat(io, oid, &size) == -ENOENT) {
        free(buf);
        return NULL;
    }
    *ret_len = (size_t)n;
    return buf;
}

uint8_t *wil_backend_read_log(const char *img, size_t *ret_len)
{
    _cleanup_free_ char *oid = oid_of(img);

    return read_object(oid, ret_len);
}

void wil_backend_remove_log(const char *img)
{
    _cleanup_free_ char *oid = oid_of(img);
    uint64_t size;

    assert_int_equal(rados_obj_remove(io, oid), 0);
    assert_int_equal(rados_obj_stat(io, oid, &size), -ENOENT);
}

void wil_backend_copy_log(const char *from, const char *to)
{
    _cleanup_free_ char *from_oid = oid_of(from);
    _cleanup_free_ char *to_oid = oid_of(to);
    size_t len = 0;
    _cleanup_free_ uint8_t *log = read_object(from_oid, &len);

    assert_non_null(log);
    assert_int_equal(rados_obj_write_full(io, to_oid, log, len), 0);
}

/* ---- the store's own checks ---- */

/* rados-obj: read_full's bound, zero-filled short reads, replacement. */
static void test_rados_obj(void **state)
{
    const char *oid = "bitback-test-rados-obj";
    uint8_t data[100], buf[200];
    _cleanup_free_ uint8_t *all = NULL;
    size_t len = 0;
    uint64_t size;
    Error *err = NULL;

    for (size_t i = 0; i < sizeof(data); i++) {
        data[i] = (uint8_t)(i + 1);
    }
    assert_int_equal(rados_obj_remove(io, oid), 0);
    /* Missing: reads as zeroes, stat and read_full say ENOENT. */
    memset(buf, 0xff, sizeof(buf));
    assert_int_equal(rados_obj_pread(io, oid, buf, sizeof(buf), 0), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        assert_int_equal(buf[i], 0);
    }
    assert_int_equal(rados_obj_stat(io, oid, &size), -ENOENT);
    expect_error(rados_obj_read_full(io, oid, 1000, &all, &len, &err), &err,
                 "cannot stat");

    assert_int_equal(rados_obj_write_full(io, oid, data, sizeof(data)), 0);
    assert_int_equal(rados_obj_stat(io, oid, &size), 0);
    assert_int_equal(size, sizeof(data));
    /* Past the end: what the object has, then zeroes. */
    memset(buf, 0xff, sizeof(buf));
    assert_int_equal(rados_obj_pread(io, oid, buf, sizeof(buf), 50), 50);
    assert_memory_equal(buf, data + 50, 50);
    for (size_t i = 50; i < sizeof(buf); i++) {
        assert_int_equal(buf[i], 0);
    }
    memset(buf, 0xff, sizeof(buf));
    assert_int_equal(rados_obj_pread(io, oid, buf, sizeof(buf), 4096), 0);
    assert_int_equal(buf[0], 0);
    assert_int_equal(buf[sizeof(buf) - 1], 0);
    /* read_full refuses an object one byte over its bound, before
     * allocating, and reads one at its bound. */
    expect_error(rados_obj_read_full(io, oid, sizeof(data) - 1, &all, &len, &err),
                 &err, "more than the 99");
    assert_null(all);
    assert_true(rados_obj_read_full(io, oid, sizeof(data), &all, &len, &err));
    assert_int_equal(len, sizeof(data));
    assert_memory_equal(all, data, sizeof(data));

    /* pwrite past the end leaves a zeroed gap; write_full replaces all. */
    assert_int_equal(rados_obj_pwrite(io, oid, data, 10, 200), 0);
    assert_int_equal(rados_obj_stat(io, oid, &size), 0);
    assert_int_equal(size, 210);
    assert_int_equal(rados_obj_pread(io, oid, buf, 100, 100), 100);
    for (size_t i = 0; i < 100; i++) {
        assert_int_equal(buf[i], 0);
    }
    assert_int_equal(rados_obj_write_full(io, oid, "abc", 3), 0);
    assert_int_equal(rados_obj_stat(io, oid, &size), 0);
    assert_int_equal(size, 3);
    assert_int_equal(rados_obj_write_full(io, oid, data,
                                          RADOS_OBJ_MAX_WRITE_FULL + 1ul), -EFBIG);
    assert_int_equal(rados_obj_truncate(io, oid, 8192), 0);
    assert_int_equal(rados_obj_stat(io, oid, &size), 0);
    assert_int_equal(size, 8192);
    assert_int_equal(rados_obj_remove(io, oid), 0);
    assert_int_equal(rados_obj_stat(io, oid, &size), -ENOENT);
    assert_int_equal(rados_obj_remove(io, oid), 0);
}

/* While a node writes the log, its object is locked: a second writer
 * (here a second store on the object; in another process or host the
 * same) is refused with a message naming the holder.  Once closed, the
 * lock is free again. */
static void test_rados_lock(void **state)
{
    _cleanup_free_ char *img = wil_test_new_image();
    _cleanup_free_ char *oid = oid_of(img);
    BlockDriverState *bs = wil_test_open_with_b0(img);
    WilStore *s = NULL;
    Error *err = NULL;

    expect_error(wil_store_rados_open(io, oid, true, &s, &err), &err,
                 "is locked by another process");
    assert_null(s);
    /* A reader (recovery) takes no lock. */
    assert_true(wil_store_rados_open(io, oid, false, &s, &err));
    assert_non_null(s);
    wil_store_close(s);
    assert_true(bdrv_close(bs, &err));
    assert_true(wil_store_rados_open(io, oid, true, &s, &err));
    die_on(err);
    wil_store_close(s);
}

/* A crash leaves an active log; garbage over its object is not used: the
 * bitmap stays inconsistent (the safe side), its reason names the object
 * and why, nothing crashes; a writable open starts a new log over it. */
static void test_rados_corrupt_log(void **state)
{
    _cleanup_free_ char *img = wil_test_new_image();
    BlockDriverState *bs = wil_test_open_with_b0(img);
    uint8_t buf[4096] = { 9 };
    Error *err = NULL;

    assert_int_equal(bdrv_pwrite(bs, 3 * 65536, buf, sizeof(buf), 0), 0);
    _cleanup_free_ char *copy = wil_test_crash_copy("crash-garbage");
    assert_true(bdrv_close(bs, &err));

    for (int variant = 0; variant < 2; variant++) {
        _cleanup_free_ char *copy_oid = oid_of(copy);
        uint8_t garbage[65536];
        unsigned seed = 7;
        size_t glen = variant ? sizeof(garbage) : 5;

        for (size_t i = 0; i < sizeof(garbage); i++) {
            garbage[i] = (uint8_t)rand_r(&seed);
        }
        assert_int_equal(rados_obj_write_full(io, copy_oid, garbage, glen), 0);
        BlockDriverState *rb = wil_backend_open(copy, false, 64 * 1024);
        BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(rb, "b0");
        assert_non_null(bm);
        assert_true(bm->inconsistent);
        assert_false(bm->recovered);
        assert_non_null(strstr(bm->inconsistent_reason, "was not used: it has "
                               "no valid version-2 header"));
        assert_non_null(strstr(bm->inconsistent_reason, copy_oid));
        assert_non_null(strstr(bm->inconsistent_reason, pool));
        bdrv_close(rb, NULL);
    }
    /* Writable: the garbage is replaced by a new, valid log. */
    BlockDriverState *wb = wil_backend_open(copy, true, 64 * 1024);
    size_t len = 0;
    _cleanup_free_ uint8_t *log = wil_backend_read_log(copy, &len);
    assert_non_null(log);
    assert_true(len >= 8192);
    assert_memory_equal(log, "BBWIL\0v2", 8);
    assert_true(bdrv_close(wb, &err));
}

const struct CMUnitTest *wil_backend_tests(size_t *ret_count)
{
    static const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rados_obj),
        cmocka_unit_test(test_rados_lock),
        cmocka_unit_test(test_rados_corrupt_log),
    };

    *ret_count = ARRAY_SIZE(tests);
    return tests;
}
