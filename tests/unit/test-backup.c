/*
 * Unit tests for the backup job (job/backup.c) on raw-over-file nodes in a
 * temporary folder, driven the way bitbackd drives it: the job is created
 * inside a drained section and the test is the main loop, calling
 * main_loop_run_pending() until the job concludes.
 *  - point in time: writer threads write at random while a rate-limited
 *    full backup runs; the target equals the snapshot copied from the
 *    source file inside the drained section;
 *  - sparseness: zero areas of the source become holes in the target;
 *  - incremental: a counting hook on the target proves that exactly the
 *    dirty clusters were copied;
 *  - bitmaps (models of cluster sets): on-success/never/always after
 *    success, cancel and a target write error (injected by a failing hook
 *    on the target), always == what was not copied | new writes;
 *  - fleecing: sync=none into a qbm overlay backed by the live source; the
 *    overlay reads as the snapshot while writers keep writing.
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
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <sys/uio.h>
#include <cmocka.h>

#include "block/block.h"
#include "job/backup.h"
#include "job/job.h"
#include "util/cleanup.h"
#include "test-util.h"
#include "util/main-loop.h"

#define IMG_SIZE  (8u * 1024 * 1024)
#define CLUSTER   (64u * 1024)
#define NCLUSTERS (IMG_SIZE / CLUSTER)

static BlockDriverState *open_raw(const char *path, const char *node_name)
{
    _cleanup_json_ struct json_object *opts = json_object_new_object();
    struct json_object *file = json_object_new_object();
    json_object_object_add(file, "driver", json_object_new_string("file"));
    json_object_object_add(file, "filename", json_object_new_string(path));
    json_object_object_add(opts, "driver", json_object_new_string("raw"));
    json_object_object_add(opts, "node-name", json_object_new_string(node_name));
    json_object_object_add(opts, "file", file);
    Error *err = NULL;
    BlockDriverState *bs = bdrv_open_options(opts, BDRV_O_RDWR, &err);
    die_on(err);
    return bs;
}

/* A new raw image of size bytes (tmpdir/STEM-N) opened as node_name; its
 * path in *path (the caller frees it). */
static BlockDriverState *new_raw(const char *stem, uint64_t size,
                                 const char *node_name, char **path)
{
    *path = make_image(tpath_unique(stem), "raw", size);
    return open_raw(*path, node_name);
}

static void fill_random(BlockDriverState *bs, uint64_t off, uint64_t len,
                        unsigned seed)
{
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    for (uint64_t i = 0; i < len; i++) {
        buf[i] = (uint8_t)(rand_r(&seed) | 1);
    }
    assert_int_equal(bdrv_pwrite(bs, off, buf, len, 0), 0);
    free(buf);
}

/* ---- the main loop ---- */

static pthread_mutex_t st_lock = PTHREAD_MUTEX_INITIALIZER;
static Job *watched;
static JobStatus watched_status;

static void status_hook(Job *job, JobStatus s, void *opaque)
{
    (void)opaque;
    pthread_mutex_lock(&st_lock);
    if (job == watched) {
        watched_status = s;
    }
    pthread_mutex_unlock(&st_lock);
}

static JobStatus status_of_watched(void)
{
    pthread_mutex_lock(&st_lock);
    JobStatus s = watched_status;
    pthread_mutex_unlock(&st_lock);
    return s;
}

static Job *create_job(const char *id, BlockDriverState *src,
                       BlockDriverState *tgt, BackupOptions *opts,
                       uint8_t **ret_snapshot, const char *src_path)
{
    Error *err = NULL;
    bdrv_drain_all_begin();
    if (ret_snapshot) {
        *ret_snapshot = read_file(src_path, IMG_SIZE);
    }
    pthread_mutex_lock(&st_lock);
    watched = NULL;
    pthread_mutex_unlock(&st_lock);
    Job *job = backup_job_create(id, src, tgt, opts, NULL, &err);
    bdrv_drain_all_end();
    die_on(err);
    assert_non_null(job);
    pthread_mutex_lock(&st_lock);
    watched = job;
    watched_status = job->status;
    pthread_mutex_unlock(&st_lock);
    return job;
}

/* Run the main loop until the job concludes; returns its ret. */
static int wait_concluded(Job *job)
{
    for (int i = 0; i < 60000; i++) {
        main_loop_run_pending();
        if (status_of_watched() == JOB_STATUS_CONCLUDED) {
            return job->ret;
        }
        sleep_ms(2);
    }
    fail_msg("job %s did not conclude", job->id);
    return 0;
}

static void dismiss(Job *job)
{
    Error *err = NULL;
    job_dismiss(job, &err);
    die_on(err);
    main_loop_run_pending();
}

static BackupOptions default_opts(MirrorSyncMode sync)
{
    return (BackupOptions) {
        .sync = sync,
        .bitmap_mode = BITMAP_SYNC_MODE_ON_SUCCESS,
        .on_source_error = BLOCKDEV_ON_ERROR_REPORT,
        .on_target_error = BLOCKDEV_ON_ERROR_REPORT,
        .auto_finalize = true,
        .auto_dismiss = false,
    };
}

/* ---- writers ---- */

typedef struct Writer {
    BlockDriverState *bs;
    unsigned seed;
    uint64_t done;                /* atomic */
    int errors;
    pthread_t thread;
} Writer;

static bool writers_stop;

static void *writer_main(void *opaque)
{
    Writer *w = opaque;
    uint8_t *buf = malloc(64 * 1024);
    while (!__atomic_load_n(&writers_stop, __ATOMIC_ACQUIRE)) {
        uint64_t len = 1 + (uint64_t)rand_r(&w->seed) % (64 * 1024);
        uint64_t off = (uint64_t)rand_r(&w->seed) % (IMG_SIZE - len);
        memset(buf, (int)(rand_r(&w->seed) & 0xff), len);
        /* Client requests, as the NBD server makes: a drained section
         * holds them back. */
        struct iovec iov = { .iov_base = buf, .iov_len = len };
        int r = (rand_r(&w->seed) % 8 == 0)
                ? bdrv_client_pwrite_zeroes(w->bs, off, len, BDRV_REQ_MAY_UNMAP)
                : bdrv_client_pwritev(w->bs, off, len, &iov, 1, 0);
        if (r < 0) {
            w->errors++;
        }
        __atomic_add_fetch(&w->done, 1, __ATOMIC_RELEASE);
        if (rand_r(&w->seed) % 4 == 0) {
            sleep_ms(1);
        }
    }
    free(buf);
    return NULL;
}

static void start_writers(Writer *w, int n, BlockDriverState *bs)
{
    writers_stop = false;
    for (int i = 0; i < n; i++) {
        w[i] = (Writer) { .bs = bs, .seed = 4242u + (unsigned)i };
        assert_int_equal(pthread_create(&w[i].thread, NULL, writer_main, &w[i]), 0);
    }
}

static uint64_t stop_writers(Writer *w, int n)
{
    __atomic_store_n(&writers_stop, true, __ATOMIC_RELEASE);
    uint64_t done = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(w[i].thread, NULL);
        assert_int_equal(w[i].errors, 0);
        done += w[i].done;
    }
    return done;
}

/* ---- point in time ---- */

static void test_full_point_in_time(void **state)
{
    (void)state;
    _cleanup_free_ char *sp = NULL, *tp = NULL;
    BlockDriverState *src = new_raw("src", IMG_SIZE, "src", &sp);
    BlockDriverState *tgt = new_raw("tgt", IMG_SIZE, "tgt", &tp);
    fill_random(src, 0, IMG_SIZE / 2, 1);

    Writer w[3];
    start_writers(w, 3, src);
    sleep_ms(20);

    BackupOptions opts = default_opts(MIRROR_SYNC_MODE_FULL);
    opts.speed = 8 * 1024 * 1024;      /* about a second: writers overlap */
    _cleanup_free_ uint8_t *snap = NULL;
    Job *job = create_job("full0", src, tgt, &opts, &snap, sp);
    assert_string_equal(src->job_blocker, "full0");
    assert_string_equal(tgt->job_blocker, "full0");
    uint64_t before = __atomic_load_n(&w[0].done, __ATOMIC_ACQUIRE);
    job_start(job);
    int ret = wait_concluded(job);
    uint64_t during = __atomic_load_n(&w[0].done, __ATOMIC_ACQUIRE) - before;
    stop_writers(w, 3);

    assert_int_equal(ret, 0);
    assert_true(during > 0);           /* the writers really overlapped */
    assert_int_equal(job->progress_current, IMG_SIZE);
    assert_int_equal(job->progress_total, IMG_SIZE);
    _cleanup_free_ uint8_t *got = read_file(tp, IMG_SIZE);
    for (uint32_t c = 0; c < NCLUSTERS; c++) {
        if (memcmp(got + c * CLUSTER, snap + c * CLUSTER, CLUSTER) != 0) {
            fail_msg("cluster %u of the backup differs from the snapshot", c);
        }
    }
    /* The source moved on. */
    _cleanup_free_ uint8_t *now = read_file(sp, IMG_SIZE);
    assert_true(memcmp(now, snap, IMG_SIZE) != 0);
    dismiss(job);
    assert_null(src->job_blocker);
    assert_null(src->hooks);
    assert_int_equal(src->refcnt, 1);
    assert_int_equal(tgt->refcnt, 1);
    bdrv_unref(src);
    bdrv_unref(tgt);
}

/* ---- sparse target ---- */

static void test_full_sparse(void **state)
{
    (void)state;
    _cleanup_free_ char *sp = NULL, *tp = NULL;
    BlockDriverState *src = new_raw("sparse-src", IMG_SIZE, "ssrc", &sp);
    BlockDriverState *tgt = new_raw("sparse-tgt", IMG_SIZE, "stgt", &tp);
    fill_random(src, 1024 * 1024, 1024 * 1024, 2);
    /* The target starts fully allocated with garbage. */
    _cleanup_free_ uint8_t *ff = malloc(IMG_SIZE);
    memset(ff, 0xff, IMG_SIZE);
    assert_int_equal(bdrv_pwrite(tgt, 0, ff, IMG_SIZE, 0), 0);

    BackupOptions opts = default_opts(MIRROR_SYNC_MODE_FULL);
    Job *job = create_job("sparse0", src, tgt, &opts, NULL, NULL);
    job_start(job);
    assert_int_equal(wait_concluded(job), 0);
    assert_int_equal(job->progress_current, IMG_SIZE);
    dismiss(job);

    _cleanup_free_ uint8_t *a = read_file(sp, IMG_SIZE);
    _cleanup_free_ uint8_t *b = read_file(tp, IMG_SIZE);
    assert_memory_equal(a, b, IMG_SIZE);
    struct stat st;
    assert_int_equal(stat(tp, &st), 0);
    /* Holes where the source is zero (some filesystems allocate a little
     * around the data: allow a quarter MiB). */
    if ((uint64_t)st.st_blocks * 512 > 1024 * 1024 + 256 * 1024) {
        fail_msg("target has %llu bytes allocated for 1 MiB of data",
                 (unsigned long long)st.st_blocks * 512);
    }
    bdrv_unref(src);
    bdrv_unref(tgt);
}

/* ---- incremental and bitmap modes ---- */

/* Hook on the target: records which clusters were written and fails
 * writes that touch `fail_cluster` (if >= 0). */
typedef struct TargetSpy {
    BdrvIoHook hook;
    pthread_mutex_t lock;
    bool written[NCLUSTERS];
    uint64_t bytes;
    int fail_cluster;
} TargetSpy;

static int spy_before_write(BdrvIoHook *hook, BlockDriverState *bs,
                            uint64_t offset, uint64_t bytes)
{
    (void)bs;
    TargetSpy *spy = hook->opaque;
    uint64_t first = offset / CLUSTER, last = (offset + bytes - 1) / CLUSTER;
    if (spy->fail_cluster >= 0 && first <= (uint64_t)spy->fail_cluster &&
        (uint64_t)spy->fail_cluster <= last) {
        return -EIO;
    }
    pthread_mutex_lock(&spy->lock);
    for (uint64_t c = first; c <= last; c++) {
        spy->written[c] = true;
    }
    spy->bytes += bytes;
    pthread_mutex_unlock(&spy->lock);
    return 0;
}

static void spy_install(TargetSpy *spy, BlockDriverState *tgt, int fail_cluster)
{
    memset(spy, 0, sizeof(*spy));
    pthread_mutex_init(&spy->lock, NULL);
    spy->fail_cluster = fail_cluster;
    spy->hook = (BdrvIoHook) { .before_write = spy_before_write, .opaque = spy };
    bdrv_drain_all_begin();
    bdrv_add_io_hook(tgt, &spy->hook);
    bdrv_drain_all_end();
}

static void spy_remove(TargetSpy *spy, BlockDriverState *tgt)
{
    bdrv_drain_all_begin();
    bdrv_remove_io_hook(tgt, &spy->hook);
    bdrv_drain_all_end();
    pthread_mutex_destroy(&spy->lock);
}

/* Write 4 KiB into the middle of cluster c. */
static void dirty_cluster(BlockDriverState *bs, uint32_t c, unsigned seed)
{
    fill_random(bs, (uint64_t)c * CLUSTER + 8192, 4096, seed);
}

static void assert_bitmap_is(BdrvDirtyBitmap *bm, const bool *want)
{
    assert_false(bm->busy);
    assert_null(bm->successor);
    for (uint32_t c = 0; c < NCLUSTERS; c++) {
        pthread_mutex_lock(&bm->bs->lock);
        bool got = hbitmap_get(bm->hb, (uint64_t)c * CLUSTER);
        pthread_mutex_unlock(&bm->bs->lock);
        if (got != want[c]) {
            fail_msg("bitmap cluster %u: got %d, want %d", c, got, want[c]);
        }
    }
}

static void test_incremental_copies_dirty_only(void **state)
{
    (void)state;
    _cleanup_free_ char *sp = NULL, *tp = NULL;
    BlockDriverState *src = new_raw("inc-src", IMG_SIZE, "isrc", &sp);
    BlockDriverState *tgt = new_raw("inc-tgt", IMG_SIZE, "itgt", &tp);
    fill_random(src, 0, IMG_SIZE, 3);
    Error *err = NULL;
    BdrvDirtyBitmap *bm = bdrv_dirty_bitmap_add(src, "b0", CLUSTER, false, false, &err);
    die_on(err);
    bool dirty[NCLUSTERS] = { false };
    unsigned seed = 99;
    for (int i = 0; i < 20; i++) {
        uint32_t c = (uint32_t)rand_r(&seed) % NCLUSTERS;
        dirty_cluster(src, c, (unsigned)i);
        dirty[c] = true;
    }
    uint64_t ndirty = 0;
    for (uint32_t c = 0; c < NCLUSTERS; c++) {
        ndirty += dirty[c];
    }

    TargetSpy spy;
    spy_install(&spy, tgt, -1);
    BackupOptions opts = default_opts(MIRROR_SYNC_MODE_INCREMENTAL);
    opts.bitmap = bm;
    Job *job = create_job("inc0", src, tgt, &opts, NULL, NULL);
    assert_true(bm->busy);
    /* A busy bitmap refuses a second job. */
    Job *job2 = backup_job_create("inc1", src, tgt, &opts, NULL, &err);
    assert_null(job2);
    assert_non_null(err);
    error_free(err);
    err = NULL;
    job_start(job);
    assert_int_equal(wait_concluded(job), 0);
    assert_int_equal(job->progress_total, ndirty * CLUSTER);
    assert_int_equal(job->progress_current, ndirty * CLUSTER);
    dismiss(job);
    spy_remove(&spy, tgt);

    for (uint32_t c = 0; c < NCLUSTERS; c++) {
        if (spy.written[c] != dirty[c]) {
            fail_msg("cluster %u: written %d, dirty %d", c, spy.written[c], dirty[c]);
        }
    }
    assert_int_equal(spy.bytes, ndirty * CLUSTER);
    _cleanup_free_ uint8_t *a = read_file(sp, IMG_SIZE);
    _cleanup_free_ uint8_t *b = read_file(tp, IMG_SIZE);
    static const uint8_t zero[CLUSTER];
    for (uint32_t c = 0; c < NCLUSTERS; c++) {
        const uint8_t *want = dirty[c] ? a + c * CLUSTER : zero;
        assert_memory_equal(b + c * CLUSTER, want, CLUSTER);
    }
    /* on-success: the bitmap is now empty and records again. */
    bool none[NCLUSTERS] = { false };
    assert_bitmap_is(bm, none);
    dirty_cluster(src, 5, 1);
    none[5] = true;
    assert_bitmap_is(bm, none);
    bdrv_unref(src);
    bdrv_unref(tgt);
}

typedef enum Outcome { OUT_SUCCESS, OUT_CANCEL, OUT_TARGET_ERROR } Outcome;

/* One incremental job with bitmap mode `mode` that ends as `outcome`.
 * Dirty set A: every third cluster of the first 40 (isolated clusters);
 * set B: clusters written after the job was created. */
static void run_bitmap_case(BitmapSyncMode mode, Outcome outcome)
{
    _cleanup_free_ char *sp = NULL, *tp = NULL;
    BlockDriverState *src = new_raw("bm-src", IMG_SIZE, "bsrc", &sp);
    BlockDriverState *tgt = new_raw("bm-tgt", IMG_SIZE, "btgt", &tp);
    fill_random(src, 0, IMG_SIZE, 5);
    Error *err = NULL;
    BdrvDirtyBitmap *bm = bdrv_dirty_bitmap_add(src, "b0", CLUSTER, false, false, &err);
    die_on(err);
    bool a[NCLUSTERS] = { false }, b[NCLUSTERS] = { false };
    int last_a = 0;
    for (int c = 0; c < 120; c += 3) {
        dirty_cluster(src, (uint32_t)c, (unsigned)c);
        a[c] = true;
        last_a = c;
    }

    TargetSpy spy;
    spy_install(&spy, tgt, outcome == OUT_TARGET_ERROR ? last_a : -1);
    BackupOptions opts = default_opts(MIRROR_SYNC_MODE_BITMAP);
    opts.bitmap = bm;
    opts.bitmap_mode = mode;
    if (outcome == OUT_CANCEL) {
        opts.speed = 64 * 1024;        /* the job is still running at cancel */
    }
    _cleanup_free_ uint8_t *snap = NULL;
    Job *job = create_job("bm0", src, tgt, &opts, &snap, sp);
    /* Writes after the point in time: some over A (copy-before-write),
     * some elsewhere. */
    for (int c = 0; c < 12; c++) {
        uint32_t cl = (uint32_t)(c * 7 + 1);
        dirty_cluster(src, cl, 1000u + (unsigned)c);
        b[cl] = true;
    }
    job_start(job);
    if (outcome == OUT_CANCEL) {
        sleep_ms(50);
        main_loop_run_pending();
        job_user_cancel(job, false, &err);
        die_on(err);
    }
    int ret = wait_concluded(job);
    switch (outcome) {
    case OUT_SUCCESS:
        assert_int_equal(ret, 0);
        break;
    case OUT_CANCEL:
        assert_int_equal(ret, -ECANCELED);
        break;
    case OUT_TARGET_ERROR:
        assert_int_equal(ret, -EIO);
        assert_string_equal(job->error, "Input/output error");
        break;
    }
    dismiss(job);
    spy_remove(&spy, tgt);

    /* Whatever the outcome, every cluster the target got holds the
     * point-in-time data. */
    _cleanup_free_ uint8_t *got = read_file(tp, IMG_SIZE);
    for (uint32_t c = 0; c < NCLUSTERS; c++) {
        if (spy.written[c]) {
            assert_memory_equal(got + c * CLUSTER, snap + c * CLUSTER, CLUSTER);
        }
    }

    bool want[NCLUSTERS];
    for (uint32_t c = 0; c < NCLUSTERS; c++) {
        bool keep_old;
        if (outcome == OUT_SUCCESS) {
            keep_old = mode == BITMAP_SYNC_MODE_NEVER;
        } else if (mode == BITMAP_SYNC_MODE_ALWAYS) {
            keep_old = !spy.written[c];           /* what was not copied */
        } else {
            keep_old = true;
        }
        want[c] = b[c] || (a[c] && keep_old);
    }
    if (outcome == OUT_TARGET_ERROR && mode == BITMAP_SYNC_MODE_ALWAYS) {
        /* Only the failing cluster was not copied. */
        for (uint32_t c = 0; c < NCLUSTERS; c++) {
            assert_int_equal(want[c], b[c] || (int)c == last_a);
        }
    }
    assert_bitmap_is(bm, want);
    bdrv_unref(src);
    bdrv_unref(tgt);
}

/* The bitmap tests: a sync mode and whether a cancel is one of its cases. */
typedef struct BitmapModeCase {
    BitmapSyncMode mode;
    bool cancel;
} BitmapModeCase;

static const BitmapModeCase bitmap_on_success = { BITMAP_SYNC_MODE_ON_SUCCESS, true };
static const BitmapModeCase bitmap_never = { BITMAP_SYNC_MODE_NEVER, false };
static const BitmapModeCase bitmap_always = { BITMAP_SYNC_MODE_ALWAYS, true };

/* run_bitmap_case for the mode of *state (a BitmapModeCase) with each
 * outcome in turn: success, a cancel (if it has one), a target error. */
static void test_bitmap_mode(void **state)
{
    const BitmapModeCase *c = *state;

    run_bitmap_case(c->mode, OUT_SUCCESS);
    if (c->cancel) {
        run_bitmap_case(c->mode, OUT_CANCEL);
    }
    run_bitmap_case(c->mode, OUT_TARGET_ERROR);
}

/* ---- fleecing ---- */

static void test_fleecing_sync_none(void **state)
{
    (void)state;
    _cleanup_free_ char *sp = make_image(tpath_unique("fl-src"), "raw", IMG_SIZE);
    _cleanup_free_ char *op = tpath("fl-overlay.qbm");
    BlockDriverState *src = open_raw(sp, "flsrc");
    fill_random(src, 0, IMG_SIZE, 7);
    Error *err = NULL;
    _cleanup_json_ struct json_object *copts = json_object_new_object();
    json_object_object_add(copts, "backing", json_object_new_string(sp));
    json_object_object_add(copts, "backing-format", json_object_new_string("raw"));
    bdrv_img_create(op, "qbm", 0, copts, &err);
    die_on(err);
    _cleanup_json_ struct json_object *oopts = json_object_new_object();
    json_object_object_add(oopts, "driver", json_object_new_string("qbm"));
    json_object_object_add(oopts, "node-name", json_object_new_string("fleece"));
    json_object_object_add(oopts, "filename", json_object_new_string(op));
    json_object_object_add(oopts, "backing", json_object_new_string("flsrc"));
    BlockDriverState *fl = bdrv_open_options(oopts, BDRV_O_RDWR, &err);
    die_on(err);
    assert_ptr_equal(fl->backing, src);

    BackupOptions opts = default_opts(MIRROR_SYNC_MODE_NONE);
    _cleanup_free_ uint8_t *snap = NULL;
    Job *job = create_job("fleece0", src, fl, &opts, &snap, sp);
    job_start(job);
    Writer w[2];
    start_writers(w, 2, src);
    _cleanup_free_ uint8_t *buf = malloc(IMG_SIZE);
    for (int round = 0; round < 3; round++) {
        sleep_ms(30);
        main_loop_run_pending();
        for (uint32_t c = 0; c < NCLUSTERS; c += 16) {
            uint64_t n = 16 * CLUSTER;
            assert_int_equal(bdrv_pread(fl, (uint64_t)c * CLUSTER,
                                        buf + (uint64_t)c * CLUSTER, n), 0);
        }
        for (uint32_t c = 0; c < NCLUSTERS; c++) {
            if (memcmp(buf + c * CLUSTER, snap + c * CLUSTER, CLUSTER) != 0) {
                fail_msg("round %d: fleecing cluster %u is not the snapshot", round, c);
            }
        }
    }
    uint64_t writes = stop_writers(w, 2);
    assert_true(writes > 0);
    job_user_cancel(job, false, &err);
    die_on(err);
    /* Cancel is the normal end of sync=none. */
    assert_int_equal(wait_concluded(job), -ECANCELED);
    assert_int_equal(job->progress_current, job->progress_total);
    assert_true(job->progress_total > 0);
    dismiss(job);
    assert_null(fl->hooks);
    assert_null(src->hooks);
    bdrv_unref(fl);
    bdrv_unref(src);
}

/* ---- errors at creation ---- */

static void test_create_errors(void **state)
{
    (void)state;
    _cleanup_free_ char *sp = NULL, *tp = NULL;
    BlockDriverState *src = new_raw("err-src", IMG_SIZE, "esrc", &sp);
    BlockDriverState *tgt = new_raw("err-tgt", IMG_SIZE / 2, "etgt", &tp);
    _cleanup_free_ char *tp2 = NULL;
    BlockDriverState *tgt2 = new_raw("err-tgt2", IMG_SIZE, "etgt2", &tp2);
    Error *err = NULL;
    BackupOptions opts = default_opts(MIRROR_SYNC_MODE_FULL);

    bdrv_drain_all_begin();
    assert_null(backup_job_create("e0", src, tgt, &opts, NULL, &err));
    assert_string_equal(error_get_pretty(err), "Source and target image have different sizes");
    error_free(err);
    err = NULL;
    assert_null(backup_job_create("e0", src, src, &opts, NULL, &err));
    assert_string_equal(error_get_pretty(err), "Source and target cannot be the same");
    error_free(err);
    err = NULL;
    opts.sync = MIRROR_SYNC_MODE_INCREMENTAL;
    assert_null(backup_job_create("e0", src, tgt2, &opts, NULL, &err));
    assert_string_equal(error_get_pretty(err),
                        "must provide a valid bitmap name for 'incremental' sync mode");
    error_free(err);
    err = NULL;
    opts.sync = MIRROR_SYNC_MODE_FULL;
    opts.compress = true;
    assert_null(backup_job_create("e0", src, tgt2, &opts, NULL, &err));
    assert_string_equal(error_get_pretty(err),
                        "Compression is not supported for this drive etgt2");
    error_free(err);
    err = NULL;
    opts.compress = false;
    /* A node used by a job refuses a second one. */
    Job *job = backup_job_create("e1", src, tgt2, &opts, NULL, &err);
    die_on(err);
    assert_null(backup_job_create("e2", tgt2, src, &opts, NULL, &err));
    assert_string_equal(error_get_pretty(err),
                        "Node 'etgt2' is busy: block device is in use by block job: backup");
    error_free(err);
    err = NULL;
    job_early_fail(job);
    bdrv_drain_all_end();
    assert_null(tgt2->hooks);
    assert_null(tgt2->job_blocker);
    assert_int_equal(tgt2->refcnt, 1);
    bdrv_unref(tgt2);
    assert_null(src->hooks);
    assert_int_equal(src->refcnt, 1);
    bdrv_unref(src);
    bdrv_unref(tgt);
}

static int setup(void **state)
{
    (void)state;
    job_set_status_hook(status_hook, NULL);
    return tmpdir_create("backup");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_point_in_time),
        cmocka_unit_test(test_full_sparse),
        cmocka_unit_test(test_incremental_copies_dirty_only),
        /* test_bitmap_MODE: test_bitmap_mode with that mode's case. */
        { "test_bitmap_on_success", test_bitmap_mode, NULL, NULL, (void *)&bitmap_on_success },
        { "test_bitmap_never", test_bitmap_mode, NULL, NULL, (void *)&bitmap_never },
        { "test_bitmap_always", test_bitmap_mode, NULL, NULL, (void *)&bitmap_always },
        cmocka_unit_test(test_fleecing_sync_none),
        cmocka_unit_test(test_create_errors),
    };
    return cmocka_run_group_tests(tests, setup, tmpdir_teardown);
}
