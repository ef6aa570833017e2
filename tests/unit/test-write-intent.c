/*
 * Unit tests for the write-intent log (block/write-intent.c) against the
 * format as docs/specs/write-intent.md states it, read back with a parser
 * written here from the spec (not the one in write-intent.c).
 *
 *  - coverage: writer threads write at random through bdrv_pwrite while
 *    another thread forces snapshots; the moment a write returns, the log
 *    on disk (the intent map read first, then the newest valid snapshot
 *    slot) must cover every byte it wrote (invariants 1 to 5);
 *  - reset: after a snapshot and no further writes the map is empty, and
 *    a later write to one region marks exactly that region;
 *  - recovery model: SIGKILL is simulated by reading the files while the
 *    node is still open (nothing is stored cleanly), opening a copy, and
 *    comparing the recovered bitmap with snapshot | regions computed here;
 *  - the same recovery called directly on the log in a memfd
 *    (write_intent_recover_fd), with a corrupt and with a good log;
 *  - clean close: the header goes inactive, and a reopen is not "recovered";
 *  - W9: adding, clearing, disabling and merging into a persistent bitmap
 *    through the bitmap API alone (no monitor) is in the log's snapshot
 *    when the call returns; inside a batch only at the batch's end.
 *
 * Where the log lives is test-wil-backend.h's: this file links with
 * test-wil-file.c as test-write-intent (IMAGE.wil) and with
 * test-wil-rados.c as test-wil-rados (a RADOS object), which adds its
 * own tests.
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
#include <unistd.h>
#include <cmocka.h>
#include <xxhash.h>

#include "block/dirty-bitmap.h"
#include "block/block.h"
#include "block/write-intent.h"
#include "util/cleanup.h"
#include "test-util.h"
#include "test-wil-backend.h"
#include "util/cutils.h"

#define IMG_SIZE   (16u * 1024 * 1024)
#define GRAN       (64u * 1024)
#define REGION     (64u * 1024)
#define NREGIONS   (IMG_SIZE / REGION)

static int counter;

static uint64_t ld64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = v << 8 | p[i];
    }
    return v;
}

static uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

/* What the spec says the file holds: the map and b0's bits in the newest
 * valid snapshot (NULL bits when none). */
typedef struct WilState {
    bool valid;
    uint32_t state;
    uint8_t map[NREGIONS / 8];
    bool have_bits;
    uint32_t flags;               /* b0's flags in the snapshot */
    char generation[37];          /* b0's generation in the snapshot */
    uint8_t bits[IMG_SIZE / GRAN / 8];
} WilState;

/* len bytes of the log (log_len of them) at off into buf: false when
 * the log ends before. */
static bool log_read(const uint8_t *log, size_t log_len, void *buf,
                     uint64_t len, uint64_t off)
{
    if (off > log_len || len > log_len - off) {
        return false;
    }
    memcpy(buf, log + off, len);
    return true;
}

/* img's log, as the backend reads it now (the whole of it at once). */
static void read_wil(const char *img, WilState *st)
{
    size_t log_len = 0;
    _cleanup_free_ uint8_t *log = wil_backend_read_log(img, &log_len);
    uint8_t h[4096];
    uint64_t best_seq = 0;

    memset(st, 0, sizeof(*st));
    if (!log) {
        return;
    }
    if (!log_read(log, log_len, h, sizeof(h), 0) ||
        memcmp(h, "BBWIL\0v2", 8) || ld64(h + 48) != XXH64(h, 48, 0)) {
        return;
    }
    st->valid = true;
    st->state = ld32(h + 8);
    assert_int_equal(ld32(h + 12), 16);              /* 64 KiB regions */
    /* The map first: a reset only follows a durable newer snapshot. */
    assert_true(log_read(log, log_len, st->map, sizeof(st->map), 4096));
    for (int i = 0; i < 2; i++) {
        uint64_t off = ld64(h + 24 + 8 * i), size = ld64(h + 40);
        uint8_t sh[32];
        if (size < 32 || !log_read(log, log_len, sh, 32, off) ||
            memcmp(sh, "BBWSNAP2", 8)) {
            continue;
        }
        uint64_t len = ld64(sh + 16);
        if (len > size - 32 || (st->have_bits && ld64(sh + 8) <= best_seq)) {
            continue;
        }
        uint8_t *p = malloc(len ? len : 1);
        assert_non_null(p);
        if (!log_read(log, log_len, p, len, off + 32) ||
            XXH64(p, len, 0) != ld64(sh + 24)) {
            free(p);
            continue;
        }
        /* count, then {u16 name len, name, u32 gran, u32 flags, 36 gen,
         * u64 nb_bits, u64 runs, runs of {u64 first word, u64 words,
         * words}}; find b0. */
        const uint8_t *q = p + 4, *end = p + len;
        for (uint32_t k = 0; k < ld32(p) && q + 2 <= end; k++) {
            uint16_t nl = (uint16_t)(q[0] | q[1] << 8);
            const uint8_t *name = q + 2;
            q += 2 + nl;
            const uint8_t *hdr = q;
            uint64_t nb_bits = ld64(q + 44), runs = ld64(q + 52);
            q += 60;
            bool is_b0 = nl == 2 && !memcmp(name, "b0", 2);
            if (is_b0) {
                assert_int_equal(ld32(hdr), GRAN);
                assert_int_equal(nb_bits, IMG_SIZE / GRAN);
                memset(st->bits, 0, sizeof(st->bits));
            }
            for (uint64_t run = 0; run < runs; run++) {
                uint64_t first = ld64(q), count = ld64(q + 8);
                assert_true(first * 8 + count * 8 <= sizeof(st->bits));
                if (is_b0) {
                    memcpy(st->bits + first * 8, q + 16, count * 8);
                }
                q += 16 + count * 8;
            }
            if (is_b0) {
                st->flags = ld32(hdr + 4);
                memcpy(st->generation, hdr + 8, 36);
                st->generation[36] = 0;
                st->have_bits = true;
                best_seq = ld64(sh + 8);
            }
        }
        free(p);
    }
}

static bool covered(const WilState *st, uint64_t off, uint64_t len)
{
    for (uint64_t b = off / GRAN; b <= (off + len - 1) / GRAN; b++) {
        uint64_t r = b * GRAN / REGION;
        bool in_map = st->map[r / 8] & (1u << (r % 8));
        bool in_snap = st->have_bits && (st->bits[b / 8] & (1u << (b % 8)));
        if (!in_map && !in_snap) {
            return false;
        }
    }
    return true;
}

static BlockDriverState *open_qbm(const char *path)
{
    return wil_backend_open(path, true, REGION);
}

/* Opened read-only: what a crash left is recovered, nothing written. */
static BlockDriverState *open_ro(const char *path)
{
    return wil_backend_open(path, false, REGION);
}

static char *new_image(void)
{
    char name[32];
    snprintf(name, sizeof(name), "img%d.qbm", counter++);
    return make_image(tpath(name), "qbm", IMG_SIZE);
}

/* ---- coverage under concurrency ---- */

typedef struct Shared {
    BlockDriverState *bs;
    const char *img;
    volatile bool stop;
    int failures;
    pthread_mutex_t lock;
} Shared;

static void *writer(void *opaque)
{
    Shared *s = opaque;
    unsigned seed = (unsigned)(uintptr_t)pthread_self();
    static uint8_t buf[256 * 1024];

    for (int i = 0; i < 300; i++) {
        uint64_t len = 512 * (1 + rand_r(&seed) % 400);
        uint64_t off = (uint64_t)(rand_r(&seed) % ((IMG_SIZE - len) / 512)) * 512;
        WilState st;

        assert_int_equal(bdrv_pwrite(s->bs, off, buf, len, 0), 0);
        read_wil(s->img, &st);
        if (!st.valid || st.state != 1 || !covered(&st, off, len)) {
            pthread_mutex_lock(&s->lock);
            s->failures++;
            pthread_mutex_unlock(&s->lock);
        }
    }
    return NULL;
}

static void *snapshotter(void *opaque)
{
    Shared *s = opaque;
    while (!s->stop) {
        Error *err = NULL;
        assert_true(write_intent_snapshot(s->bs, &err));
        usleep(500);
    }
    return NULL;
}

static void test_coverage(void **state)
{
    _cleanup_free_ char *img = new_image();
    Error *err = NULL;
    BlockDriverState *bs = open_qbm(img);
    Shared s = { .bs = bs, .img = img };
    pthread_t w[3], snap;

    pthread_mutex_init(&s.lock, NULL);
    assert_non_null(bdrv_dirty_bitmap_add(bs, "b0", GRAN, true, false, &err));
    die_on(err);
    assert_true(write_intent_sync_metadata(bs, &err));
    pthread_create(&snap, NULL, snapshotter, &s);
    for (int i = 0; i < 3; i++) {
        pthread_create(&w[i], NULL, writer, &s);
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(w[i], NULL);
    }
    s.stop = true;
    pthread_join(snap, NULL);
    assert_int_equal(s.failures, 0);
    assert_true(bdrv_close(bs, &err));
    WilState st;
    read_wil(img, &st);
    assert_true(st.valid);
    assert_int_equal(st.state, 0);                  /* invariant 7 */
}

/* A new node on img with persistent bitmap b0, its log started. */
static BlockDriverState *open_with_b0(const char *img)
{
    Error *err = NULL;
    BlockDriverState *bs = open_qbm(img);

    assert_non_null(bdrv_dirty_bitmap_add(bs, "b0", GRAN, true, false, &err));
    die_on(err);
    assert_true(write_intent_sync_metadata(bs, &err));
    return bs;
}

/* ---- reset, and the recovery model ---- */

/* "Crash" now: copy the files of the newest image (new_image) and its log
 * as they are, while its node is still open, into tmpdir/DIR.  The copy's
 * image path. */
static char *crash_copy(const char *dir)
{
    char cmd[4096];
    char *copy = NULL;
    _cleanup_free_ char *img = NULL;

    snprintf(cmd, sizeof(cmd), "mkdir %s/%s && cp -a %s/img%d* %s/%s/",
             tmpdir, dir, tmpdir, counter - 1, tmpdir, dir);
    assert_int_equal(system(cmd), 0);
    assert_true(asprintf(&img, "%s/img%d.qbm", tmpdir, counter - 1) > 0);
    assert_true(asprintf(&copy, "%s/%s/img%d.qbm", tmpdir, dir, counter - 1) > 0);
    wil_backend_copy_log(img, copy);
    return copy;
}

static void test_reset_and_recovery(void **state)
{
    _cleanup_free_ char *img = new_image();
    Error *err = NULL;
    BlockDriverState *bs = open_with_b0(img);
    uint8_t buf[4096] = { 1 };
    WilState st;

    for (int i = 0; i < 10; i++) {
        assert_int_equal(bdrv_pwrite(bs, (uint64_t)i * 1024 * 1024, buf, 4096, 0), 0);
    }
    read_wil(img, &st);
    for (int i = 0; i < 10; i++) {
        uint64_t r = (uint64_t)i * 1024 * 1024 / REGION;
        assert_true(st.map[r / 8] & (1u << (r % 8)));
    }
    /* One snapshot keeps regions written in the period before it (hot
     * regions pay no new sync); a second one, with no writes between,
     * clears them (invariant 3). */
    assert_true(write_intent_snapshot(bs, &err));
    read_wil(img, &st);
    assert_true(st.map[(1024 * 1024 / REGION) / 8] & (1u << ((1024 * 1024 / REGION) % 8)));
    assert_int_equal(write_intent_marked_regions(bs), 10);
    assert_true(write_intent_snapshot(bs, &err));
    read_wil(img, &st);
    for (size_t i = 0; i < sizeof(st.map); i++) {
        assert_int_equal(st.map[i], 0);
    }
    assert_true(covered(&st, 0, 4096));
    assert_int_equal(write_intent_marked_regions(bs), 0);
    assert_int_equal(bdrv_pwrite(bs, 5 * REGION + 100, buf, 100, 0), 0);
    assert_int_equal(write_intent_marked_regions(bs), 1);
    read_wil(img, &st);
    for (uint64_t r = 0; r < NREGIONS; r++) {
        assert_int_equal(!!(st.map[r / 8] & (1u << (r % 8))), r == 5);
    }

    _cleanup_free_ char *copy = crash_copy("crash");
    assert_true(bdrv_close(bs, &err));
    WilState cst;
    read_wil(copy, &cst);
    assert_int_equal(cst.state, 1);
    BlockDriverState *rb = open_ro(copy);
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(rb, "b0");
    assert_non_null(bm);
    assert_false(bm->inconsistent);
    assert_true(bm->recovered);
    /* The model: snapshot bits | every marked region at granularity. */
    for (uint64_t b = 0; b < IMG_SIZE / GRAN; b++) {
        uint64_t r = b * GRAN / REGION;
        bool want = (cst.bits[b / 8] & (1u << (b % 8))) ||
                    (cst.map[r / 8] & (1u << (r % 8)));
        assert_int_equal(hbitmap_get(bm->hb, b * GRAN), want);
    }
    /* Exactly the region the last write marked was added. */
    assert_int_equal(bm->recovered_bytes, REGION);
    bdrv_close(rb, NULL);
}

/* write_intent_recover_fd, on a crashed image's log in a memfd: a log
 * whose header is corrupt recovers nothing and leaves the bitmap
 * inconsistent; the log as the crash left it recovers the bitmap, with the
 * region written since the last snapshot. */
static void test_recover_fd(void **state)
{
    _cleanup_free_ char *img = new_image();
    Error *err = NULL;
    BlockDriverState *bs = open_with_b0(img);
    uint8_t buf[4096] = { 1 };
    uint64_t seq = 99;

    assert_true(write_intent_snapshot(bs, &err));
    assert_int_equal(bdrv_pwrite(bs, 7 * REGION + 10, buf, sizeof(buf), 0), 0);
    _cleanup_free_ char *copy = crash_copy("crash-fd");
    assert_true(bdrv_close(bs, &err));

    /* The log goes into a memfd; without its log the open recovers
     * nothing by itself. */
    size_t log_len = 0;
    _cleanup_free_ uint8_t *log = wil_backend_read_log(copy, &log_len);
    assert_non_null(log);
    wil_backend_remove_log(copy);
    BlockDriverState *rb = open_ro(copy);
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(rb, "b0");
    assert_non_null(bm);
    assert_true(bm->inconsistent);

    log[20] ^= 0x01;                   /* under the header checksum */
    int fd = memfd_with("bad-log", log, log_len);
    assert_int_equal(write_intent_recover_fd(rb, fd, &seq), 0);
    assert_int_equal(seq, 0);
    assert_true(bm->inconsistent);
    assert_false(bm->recovered);
    close(fd);

    log[20] ^= 0x01;
    fd = memfd_with("log", log, log_len);
    assert_int_equal(write_intent_recover_fd(rb, fd, &seq), 1);
    assert_true(seq > 0);
    assert_false(bm->inconsistent);
    assert_true(bm->recovered);
    assert_true(hbitmap_get(bm->hb, 7 * REGION));
    assert_int_equal(hbitmap_count_bytes(bm->hb), REGION);
    assert_int_equal(bm->recovered_bytes, REGION);
    close(fd);
    bdrv_close(rb, NULL);
}

char *wil_test_new_image(void)
{
    return new_image();
}

BlockDriverState *wil_test_open_with_b0(const char *img)
{
    return open_with_b0(img);
}

char *wil_test_crash_copy(const char *dir)
{
    return crash_copy(dir);
}

static bool map_has(const WilState *st, uint64_t r)
{
    return st->map[r / 8] & (1u << (r % 8));
}

/* Invariant 10: a sequential writer nearing the end of a region gets the
 * next region made durable in the background; a write that is not near a
 * region's end does not. */
static void test_readahead(void **state)
{
    _cleanup_free_ char *img = new_image();
    Error *err = NULL;
    BlockDriverState *bs = open_with_b0(img);
    uint8_t buf[4096] = { 3 };
    WilState st;


    /* Not near the end of region 2: nothing ahead. */
    assert_int_equal(bdrv_pwrite(bs, 2 * REGION, buf, 4096, 0), 0);
    usleep(200 * 1000);
    read_wil(img, &st);
    assert_true(map_has(&st, 2));
    assert_false(map_has(&st, 3));
    assert_int_equal(write_intent_marked_regions(bs), 1);

    /* Sequential through region 8 and not beyond: region 9 follows. */
    for (uint64_t off = 8 * REGION; off < 9 * REGION; off += sizeof(buf)) {
        assert_int_equal(bdrv_pwrite(bs, off, buf, sizeof(buf), 0), 0);
    }
    /* The count of durable regions grows once the background sync is
     * done; then the file must say so. */
    for (int i = 0; i < 500 && write_intent_marked_regions(bs) < 3; i++) {
        usleep(10 * 1000);
    }
    assert_int_equal(write_intent_marked_regions(bs), 3);
    read_wil(img, &st);
    assert_true(map_has(&st, 9));
    assert_true(map_has(&st, 8));
    assert_false(map_has(&st, 10));
    /* Region 9 was never written: b0 does not have it, and a snapshot
     * pair with no writes clears it like any other region (invariant 3). */
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, "b0");
    assert_false(hbitmap_get(bm->hb, 9 * REGION));
    assert_true(write_intent_snapshot(bs, &err));
    assert_true(write_intent_snapshot(bs, &err));
    read_wil(img, &st);
    assert_false(map_has(&st, 9));
    assert_true(bdrv_close(bs, &err));
}

/* Invariant 10, the stream rule: random writes in a small span also
 * "continue" each other, but their stream never moves on
 * WIL_READAHEAD_STREAM_MIN, so they never get more than half a region of
 * read-ahead, however fast they come. */
static void test_readahead_not_for_random(void **state)
{
    _cleanup_free_ char *img = new_image();
    Error *err = NULL;
    BlockDriverState *bs = open_with_b0(img);
    uint8_t buf[4096] = { 5 };
    const uint64_t lo = 4u << 20, span = WIL_READAHEAD_WINDOW;
    uint64_t x = 12345, until = clock_monotonic_ns() + 300000000ull;
    WilState st;

    while (clock_monotonic_ns() < until) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t off = lo + ((x >> 33) % (span / sizeof(buf))) * sizeof(buf);
        assert_int_equal(bdrv_pwrite(bs, off, buf, sizeof(buf), 0), 0);
    }
    usleep(200 * 1000);                    /* any read-ahead sync is done */
    read_wil(img, &st);
    assert_true(map_has(&st, lo / REGION));
    /* The last region of the span may ask for the next one (half a region
     * of lead); nothing beyond. */
    for (uint64_t r = (lo + span) / REGION + 1; r < NREGIONS; r++) {
        if (map_has(&st, r)) {
            fail_msg("region %llu is marked", (unsigned long long)r);
        }
    }
    assert_true(bdrv_close(bs, &err));
}

static void test_clean_close_not_recovered(void **state)
{
    _cleanup_free_ char *img = new_image();
    Error *err = NULL;
    BlockDriverState *bs = open_qbm(img);
    uint8_t buf[512] = { 7 };

    assert_non_null(bdrv_dirty_bitmap_add(bs, "b0", GRAN, true, false, &err));
    assert_int_equal(bdrv_pwrite(bs, 3 * REGION, buf, 512, 0), 0);
    assert_true(bdrv_close(bs, &err));
    bs = open_ro(img);
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, "b0");
    assert_non_null(bm);
    assert_false(bm->recovered);
    assert_false(bm->inconsistent);
    assert_true(hbitmap_get(bm->hb, 3 * REGION));
    bdrv_close(bs, NULL);
}

/* ---- W9: metadata durable at once, through the bitmap API alone ---- */

static bool bits_all_zero(const WilState *st)
{
    for (size_t i = 0; i < sizeof(st->bits); i++) {
        if (st->bits[i]) {
            return false;
        }
    }
    return true;
}

static void test_metadata_durable_at_once(void **state)
{
    (void)state;
    _cleanup_free_ char *img = new_image();
    Error *err = NULL;
    BlockDriverState *bs = open_qbm(img);
    WilState st;

    /* Add: the log goes active with b0 in its snapshot. */
    BdrvDirtyBitmap *bm = bdrv_dirty_bitmap_add(bs, "b0", GRAN, true, false, &err);
    die_on(err);
    read_wil(img, &st);
    assert_int_equal(st.state, 1);
    assert_true(st.have_bits);
    assert_string_equal(st.generation, bm->generation);

    uint8_t buf[4096] = { 7 };
    assert_int_equal(bdrv_pwrite(bs, 3 * GRAN, buf, sizeof(buf), 0), 0);
    assert_true(write_intent_snapshot(bs, &err));
    read_wil(img, &st);
    assert_false(bits_all_zero(&st));

    /* Clear: a new generation and no bits, on disk when the call returns. */
    assert_true(bdrv_clear_dirty_bitmap(bm, &err));
    read_wil(img, &st);
    assert_string_equal(st.generation, bm->generation);
    assert_true(bits_all_zero(&st));

    /* Disable, then merge a non-persistent bitmap into it. */
    uint32_t flags_enabled = st.flags;
    assert_true(bdrv_disable_dirty_bitmap(bm, &err));
    read_wil(img, &st);
    assert_int_not_equal(st.flags, flags_enabled);
    BdrvDirtyBitmap *tmp = bdrv_dirty_bitmap_add(bs, "tmp", GRAN, false, false, &err);
    die_on(err);
    assert_int_equal(bdrv_pwrite(bs, 5 * GRAN, buf, sizeof(buf), 0), 0);
    assert_true(bdrv_merge_dirty_bitmaps(bm, &tmp, 1, &err));
    read_wil(img, &st);
    assert_true(st.bits[5 / 8] & (1u << (5 % 8)));

    /* Inside a batch the change waits for the batch's end. */
    char before[37];
    memcpy(before, st.generation, sizeof(before));
    bdrv_dirty_bitmap_batch_begin();
    assert_true(bdrv_clear_dirty_bitmap(bm, &err));
    read_wil(img, &st);
    assert_string_equal(st.generation, before);
    assert_true(bdrv_dirty_bitmap_batch_end());
    read_wil(img, &st);
    assert_string_equal(st.generation, bm->generation);
    assert_true(bits_all_zero(&st));
    assert_true(bdrv_close(bs, &err));
}

/* W11: block_resize of a node whose log is active.  The log is rewritten
 * for the new size (header size, a snapshot at the new size), so a crash
 * after the resize recovers only what was written; and a crash between the
 * image's resize and the log's (the image resized, the log as before: W6)
 * still recovers a superset: the old bits, and a grown area whole; bits
 * past a new end go. */
static void test_resize(void **state)
{
    (void)state;
    _cleanup_free_ char *img = new_image();
    Error *err = NULL;
    BlockDriverState *bs = open_with_b0(img);
    uint8_t buf[4096] = { 9 };
    size_t len = 0;

    assert_int_equal(bdrv_pwrite(bs, 5 * REGION, buf, sizeof(buf), 0), 0);
    _cleanup_free_ char *before = crash_copy("rs-before");

    assert_true(bdrv_truncate(bs, 2 * IMG_SIZE, &err));
    die_on(err);
    assert_int_equal(bdrv_getlength(bs), 2 * IMG_SIZE);
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, "b0");
    assert_int_equal(hbitmap_size(bm->hb), 2 * IMG_SIZE);
    {
        _cleanup_free_ uint8_t *log = wil_backend_read_log(img, &len);
        assert_non_null(log);
        assert_int_equal(ld32(log + 8), 1);                 /* active */
        assert_int_equal(ld64(log + 16), 2 * IMG_SIZE);     /* new size */
    }
    /* Nothing was written since the resize's snapshot: empty map. */
    assert_int_equal(write_intent_marked_regions(bs), 0);

    /* The crash between the two resizes: the image grown, the old log. */
    _cleanup_free_ char *mid = crash_copy("rs-mid");
    wil_backend_copy_log(before, mid);
    BlockDriverState *rb = open_ro(mid);
    BdrvDirtyBitmap *rbm = bdrv_find_dirty_bitmap(rb, "b0");
    assert_non_null(rbm);
    assert_false(rbm->inconsistent);
    assert_true(rbm->recovered);
    assert_int_equal(hbitmap_size(rbm->hb), 2 * IMG_SIZE);
    assert_true(hbitmap_get(rbm->hb, 5 * REGION));
    assert_int_equal(hbitmap_next_zero(rbm->hb, IMG_SIZE, IMG_SIZE), -1);
    assert_int_equal(hbitmap_count_bytes(rbm->hb), REGION + IMG_SIZE);
    bdrv_close(rb, NULL);

    /* A write in the grown area, then a crash: the rewritten log has it,
     * and no more of the grown area. */
    assert_int_equal(bdrv_pwrite(bs, IMG_SIZE + 3 * REGION, buf,
                                 sizeof(buf), 0), 0);
    _cleanup_free_ char *grown = crash_copy("rs-grown");
    rb = open_ro(grown);
    rbm = bdrv_find_dirty_bitmap(rb, "b0");
    assert_true(rbm->recovered);
    assert_true(hbitmap_get(rbm->hb, 5 * REGION));
    assert_true(hbitmap_get(rbm->hb, IMG_SIZE + 3 * REGION));
    assert_int_equal(hbitmap_count_bytes(rbm->hb), 2 * REGION);
    assert_int_equal(rbm->recovered_bytes, REGION);
    bdrv_close(rb, NULL);

    /* Shrink to half the first size; a crash with the log from before
     * keeps what lies below the new end only. */
    assert_true(bdrv_truncate(bs, IMG_SIZE / 2, &err));
    die_on(err);
    assert_int_equal(hbitmap_count_bytes(bm->hb), REGION);
    _cleanup_free_ char *shrunk = crash_copy("rs-shrunk");
    wil_backend_copy_log(grown, shrunk);
    rb = open_ro(shrunk);
    rbm = bdrv_find_dirty_bitmap(rb, "b0");
    assert_true(rbm->recovered);
    assert_int_equal(hbitmap_size(rbm->hb), IMG_SIZE / 2);
    assert_true(hbitmap_get(rbm->hb, 5 * REGION));
    assert_int_equal(hbitmap_count_bytes(rbm->hb), REGION);
    bdrv_close(rb, NULL);

    /* A clean close stores the bitmap at the new size; it reopens
     * consistent with its bits, not recovered. */
    assert_true(bdrv_close(bs, &err));
    rb = open_ro(img);
    rbm = bdrv_find_dirty_bitmap(rb, "b0");
    assert_false(rbm->inconsistent);
    assert_false(rbm->recovered);
    assert_int_equal(bdrv_getlength(rb), IMG_SIZE / 2);
    assert_int_equal(hbitmap_count_bytes(rbm->hb), REGION);
    bdrv_close(rb, NULL);
}

int main(void)
{
    static const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_coverage),
        cmocka_unit_test(test_reset_and_recovery),
        cmocka_unit_test(test_recover_fd),
        cmocka_unit_test(test_clean_close_not_recovered),
        cmocka_unit_test(test_metadata_durable_at_once),
        cmocka_unit_test(test_readahead),
        cmocka_unit_test(test_readahead_not_for_random),
        cmocka_unit_test(test_resize),
    };
    struct CMUnitTest all[ARRAY_SIZE(tests) + 16];
    size_t n_extra = 0;
    const struct CMUnitTest *extra = wil_backend_tests(&n_extra);
    size_t n = ARRAY_SIZE(tests);
    char group[64];

    if (n_extra > ARRAY_SIZE(all) - n || wil_backend_init() < 0) {
        return 1;
    }
    memcpy(all, tests, sizeof(tests));
    if (n_extra) {
        memcpy(all + n, extra, n_extra * sizeof(*extra));
    }
    n += n_extra;
    if (tmpdir_create("wil") < 0) {
        return wil_backend_done(1);
    }
    snprintf(group, sizeof(group), "write-intent log in a %s", wil_backend_name);
    int r = _cmocka_run_group_tests(group, all, n, NULL, NULL);
    tmpdir_remove();
    /* What ran, for a harness that must not take "nothing" for success. */
    printf("write-intent checks: %zu tests, store %s, %s\n", n,
           wil_backend_name, r == 0 ? "all passed" : "FAILED");
    return wil_backend_done(r);
}
