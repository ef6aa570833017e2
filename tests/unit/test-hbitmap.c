/*
 * Unit tests for src/bitmap/hbitmap.c.
 *
 * The core test drives an HBitmap and a naive model (one byte per cluster)
 * through thousands of random operations and compares every answer: set,
 * reset, reset_all, set_all, merge, copy, serialize/deserialize, get,
 * next_dirty, next_zero, next_dirty_area, count_bits, count_bytes.  It runs
 * with a fixed seed plus a few more (HBITMAP_SEED=N in the environment adds
 * one), over sizes that are and are not multiples of the granularity,
 * granularities from 512 B to 2 GiB and offsets past 4 TiB.
 *
 * Boundary tests cover the last partial cluster, offsets around 2^32 bytes
 * and cluster indexes past 2^31, images of 8..64 TiB, size 0 (allowed: an
 * empty bitmap where everything is a no-op), and rejected granularities.
 * The huge sparse test proves the search cost follows the dirty data by
 * counting the words the searches examine (hbitmap_stat_words_visited), not
 * by timing.
 */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "bitmap/hbitmap.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)
#define TiB (UINT64_C(1) << 40)

/* Context printed with a failed check, so a failure names seed and step. */
static char ctx[256];

#define EXPECT_EQ(a, b)                                                       \
    do {                                                                      \
        uint64_t a_ = (uint64_t)(a), b_ = (uint64_t)(b);                      \
        if (a_ != b_) {                                                       \
            fail_msg("%s: %s = %" PRIu64 " (%" PRId64 ") but %s = %" PRIu64   \
                     " (%" PRId64 ")", ctx, #a, a_, (int64_t)a_, #b, b_,       \
                     (int64_t)b_);                                            \
        }                                                                     \
    } while (0)

/* ---- deterministic PRNG (splitmix64) ---- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

/* Uniform-ish in [0, n), n > 0. */
static uint64_t rnd_below(uint64_t n)
{
    return rnd() % n;
}

/* ---- naive model: one byte per cluster ---- */

typedef struct {
    uint64_t size;
    unsigned shift;
    uint64_t nb_bits;
    uint8_t *bits;
} Model;

static void model_init(Model *m, uint64_t size, unsigned shift)
{
    m->size = size;
    m->shift = shift;
    m->nb_bits = (size + (UINT64_C(1) << shift) - 1) >> shift;
    m->bits = calloc(m->nb_bits ? m->nb_bits : 1, 1);
    assert_non_null(m->bits);
}

static void model_free(Model *m)
{
    free(m->bits);
    m->bits = NULL;
}

/* Clusters overlapped by [offset, offset+bytes) clipped to the size. */
static bool model_range(const Model *m, uint64_t offset, uint64_t bytes,
                        uint64_t *first, uint64_t *last, uint64_t *end)
{
    if (bytes == 0 || offset >= m->size) {
        return false;
    }
    uint64_t e = bytes > m->size - offset ? m->size : offset + bytes;
    *first = offset >> m->shift;
    *last = (e - 1) >> m->shift;
    *end = e;
    return true;
}

static void model_fill(Model *m, uint64_t offset, uint64_t bytes, uint8_t v)
{
    uint64_t first, last, end;
    if (model_range(m, offset, bytes, &first, &last, &end)) {
        memset(m->bits + first, v, last - first + 1);
    }
}

static int64_t model_next(const Model *m, uint64_t offset, uint64_t bytes,
                          uint8_t want)
{
    uint64_t first, last, end;
    if (!model_range(m, offset, bytes, &first, &last, &end)) {
        return -1;
    }
    for (uint64_t c = first; c <= last; c++) {
        if (m->bits[c] == want) {
            uint64_t s = c << m->shift;
            return (int64_t)(s > offset ? s : offset);
        }
    }
    return -1;
}

static bool model_next_area(const Model *m, uint64_t offset, uint64_t bytes,
                            uint64_t max_bytes, uint64_t *ret_off,
                            uint64_t *ret_len)
{
    uint64_t first = 0, last = 0, end = 0;
    int64_t start = model_next(m, offset, bytes, 1);
    if (start < 0) {
        return false;
    }
    model_range(m, offset, bytes, &first, &last, &end);
    uint64_t c = (uint64_t)start >> m->shift;
    while (c <= last && m->bits[c]) {
        c++;
    }
    uint64_t area_end = c > last ? end : c << m->shift;
    uint64_t len = area_end - (uint64_t)start;
    if (max_bytes && len > max_bytes) {
        len = max_bytes;
    }
    *ret_off = (uint64_t)start;
    *ret_len = len;
    return true;
}

static uint64_t model_count_bits(const Model *m)
{
    uint64_t n = 0;
    for (uint64_t c = 0; c < m->nb_bits; c++) {
        n += m->bits[c];
    }
    return n;
}

static uint64_t model_count_bytes(const Model *m)
{
    uint64_t n = 0;
    for (uint64_t c = 0; c < m->nb_bits; c++) {
        if (m->bits[c]) {
            uint64_t s = c << m->shift;
            uint64_t e = s + (UINT64_C(1) << m->shift);
            n += (e > m->size ? m->size : e) - s;
        }
    }
    return n;
}

/* Model bit of cluster c; 0 past the end. */
static unsigned model_bit(const Model *m, uint64_t c)
{
    return c < m->nb_bits ? m->bits[c] : 0;
}

/* Full comparison: counts, every dirty area, the whole serialized form. */
static void check_full(const HBitmap *hb, const Model *m)
{
    EXPECT_EQ(hbitmap_count_bits(hb), model_count_bits(m));
    EXPECT_EQ(hbitmap_count_bytes(hb), model_count_bytes(m));
    EXPECT_EQ(hbitmap_is_empty(hb), model_count_bits(m) == 0);
    EXPECT_EQ(hbitmap_nb_bits(hb), m->nb_bits);

    /* Walk all dirty areas and compare them with the model's. */
    uint64_t off = 0, areas = 0;
    for (;;) {
        uint64_t ho = 0, hl = 0, mo = 0, ml = 0;
        bool h = hbitmap_next_dirty_area(hb, off, m->size - off, 0, &ho, &hl);
        bool mm = model_next_area(m, off, m->size - off, 0, &mo, &ml);
        EXPECT_EQ(h, mm);
        if (!h) {
            break;
        }
        EXPECT_EQ(ho, mo);
        EXPECT_EQ(hl, ml);
        off = ho + hl;
        areas++;
        if (off >= m->size) {
            break;
        }
    }
    (void)areas;

    uint64_t n = hbitmap_serialized_size(hb);
    EXPECT_EQ(n, (m->nb_bits + 7) / 8);
    uint8_t *buf = malloc(n + 1);
    assert_non_null(buf);
    buf[n] = 0xa5;
    hbitmap_serialize_part(hb, buf, 0, m->nb_bits);
    for (uint64_t c = 0; c < m->nb_bits; c++) {
        EXPECT_EQ((buf[c / 8] >> (c % 8)) & 1, m->bits[c]);
    }
    if (m->nb_bits % 8) {
        EXPECT_EQ(buf[n - 1] >> (m->nb_bits % 8), 0);
    }
    EXPECT_EQ(buf[n], 0xa5);
    free(buf);
}

/* ---- random operations ---- */

static uint64_t rnd_offset(const Model *m)
{
    uint64_t cl = UINT64_C(1) << m->shift;
    switch (rnd_below(10)) {
    case 0:
        return 0;
    case 1:
        return m->size ? m->size - 1 : 0;
    case 2:
        return m->size;
    case 3:
        return UINT64_MAX - rnd_below(1000);
    case 4: case 5:   /* cluster aligned */
        return rnd_below(m->nb_bits + 2) << m->shift;
    case 6:           /* next to a cluster boundary */
        return (rnd_below(m->nb_bits + 1) << m->shift) + cl - 1 - rnd_below(3);
    default:
        return rnd_below(m->size + 2 * cl);
    }
}

static uint64_t rnd_len(const Model *m, uint64_t offset)
{
    uint64_t cl = UINT64_C(1) << m->shift;
    switch (rnd_below(10)) {
    case 0:
        return 0;
    case 1:
        return 1;
    case 2:
        return UINT64_MAX;
    case 3:
        return UINT64_MAX - offset;
    case 4:
        return rnd_below(m->size + 1);
    case 5: case 6:
        return rnd_below(8) * cl;
    default:
        return rnd_below(64 * cl) + 1;
    }
}

/* A random bitmap of the same geometry, for merge and deserialize. */
static void random_fill(HBitmap *hb, Model *m, unsigned nops)
{
    for (unsigned i = 0; i < nops; i++) {
        uint64_t o = rnd_offset(m), l = rnd_len(m, o);
        if (rnd_below(3)) {
            hbitmap_set(hb, o, l);
            model_fill(m, o, l, 1);
        } else {
            hbitmap_reset(hb, o, l);
            model_fill(m, o, l, 0);
        }
    }
}

static void check_queries(const HBitmap *hb, const Model *m)
{
    for (int q = 0; q < 4; q++) {
        uint64_t o = rnd_offset(m), l = rnd_len(m, o);
        uint64_t maxb = rnd_below(2) ? 0 : rnd_below(UINT64_C(10) << m->shift) + 1;
        EXPECT_EQ(hbitmap_get(hb, o), model_bit(m, o >> m->shift) && o < m->size);
        EXPECT_EQ(hbitmap_next_dirty(hb, o, l), model_next(m, o, l, 1));
        EXPECT_EQ(hbitmap_next_zero(hb, o, l), model_next(m, o, l, 0));
        uint64_t ho = 7, hl = 7, mo = 7, ml = 7;
        bool h = hbitmap_next_dirty_area(hb, o, l, maxb, &ho, &hl);
        bool mm = model_next_area(m, o, l, maxb, &mo, &ml);
        EXPECT_EQ(h, mm);
        if (h) {
            EXPECT_EQ(ho, mo);
            EXPECT_EQ(hl, ml);
            assert_true(hl > 0);
        }
    }
}

/* Serialize a random 8-aligned part and compare with the model, padding
 * included; then deserialize random bytes into a random part. */
static void check_serialize(HBitmap *hb, Model *m)
{
    uint64_t first = rnd_below(m->nb_bits / 8 + 2) * 8;
    uint64_t nbits = rnd_below(m->nb_bits + 70) + 1;
    uint64_t n = (nbits + 7) / 8;
    uint8_t *buf = malloc(n + 1);
    assert_non_null(buf);
    memset(buf, 0x5a, n + 1);
    hbitmap_serialize_part(hb, buf, first, nbits);
    for (uint64_t i = 0; i < n * 8; i++) {
        unsigned want = i < nbits ? model_bit(m, first + i) : 0;
        EXPECT_EQ((buf[i / 8] >> (i % 8)) & 1, want);
    }
    EXPECT_EQ(buf[n], 0x5a);

    /* Round trip: writing back what was read changes nothing. */
    uint64_t before = hbitmap_count_bits(hb);
    hbitmap_deserialize_part(hb, buf, first, nbits);
    EXPECT_EQ(hbitmap_count_bits(hb), before);

    /* Load random bits; the header asks for 8-aligned first_bit, but any
     * alignment works and is exercised too. */
    if (rnd_below(4) == 0) {
        first = rnd_below(m->nb_bits + 2);
    }
    for (uint64_t i = 0; i < n; i++) {
        buf[i] = (uint8_t)rnd();
        if (rnd_below(3) == 0) {
            buf[i] = rnd_below(2) ? 0xff : 0;
        }
    }
    hbitmap_deserialize_part(hb, buf, first, nbits);
    for (uint64_t i = 0; i < nbits && first + i < m->nb_bits; i++) {
        m->bits[first + i] = (buf[i / 8] >> (i % 8)) & 1;
    }
    free(buf);
}

static void run_random(uint64_t seed, uint64_t size, unsigned shift,
                       unsigned nops)
{
    rng_state = seed;
    Model m;
    model_init(&m, size, shift);
    HBitmap *hb = hbitmap_new(size, shift);
    assert_non_null(hb);
    EXPECT_EQ(hbitmap_size(hb), size);
    EXPECT_EQ(hbitmap_granularity_shift(hb), shift);

    for (unsigned i = 0; i < nops; i++) {
        snprintf(ctx, sizeof(ctx), "seed=%#" PRIx64 " size=%" PRIu64
                 " shift=%u op=%u", seed, size, shift, i);
        unsigned op = (unsigned)rnd_below(100);
        uint64_t o = rnd_offset(&m), l = rnd_len(&m, o);
        if (op < 35) {
            hbitmap_set(hb, o, l);
            model_fill(&m, o, l, 1);
        } else if (op < 65) {
            hbitmap_reset(hb, o, l);
            model_fill(&m, o, l, 0);
        } else if (op < 66) {
            hbitmap_reset_all(hb);
            memset(m.bits, 0, m.nb_bits);
        } else if (op < 67) {
            hbitmap_set_all(hb);
            memset(m.bits, 1, m.nb_bits);
        } else if (op < 72) {
            Model m2;
            model_init(&m2, size, shift);
            HBitmap *src = hbitmap_new(size, shift);
            assert_non_null(src);
            random_fill(src, &m2, 4);
            assert_true(hbitmap_merge(hb, src));
            for (uint64_t c = 0; c < m.nb_bits; c++) {
                m.bits[c] |= m2.bits[c];
            }
            /* src itself is untouched by the merge */
            check_full(src, &m2);
            hbitmap_free(src);
            model_free(&m2);
        } else if (op < 75) {
            HBitmap *c = hbitmap_copy(hb);
            assert_non_null(c);
            /* Changing the copy leaves the original alone. */
            hbitmap_set_all(c);
            check_full(hb, &m);
            hbitmap_reset_all(c);
            hbitmap_merge(c, hb);
            hbitmap_free(hb);
            hb = c;
        } else if (op < 80) {
            check_serialize(hb, &m);
        } else {
            check_queries(hb, &m);
        }
        EXPECT_EQ(hbitmap_count_bits(hb), model_count_bits(&m));
        EXPECT_EQ(hbitmap_count_bytes(hb), model_count_bytes(&m));
        if (i % 50 == 0 || i + 1 == nops) {
            check_full(hb, &m);
        }
    }
    hbitmap_free(hb);
    model_free(&m);
}

typedef struct {
    uint64_t size;
    unsigned shift;
    unsigned nops;
} RandomConfig;

static const RandomConfig random_configs[] = {
    { 1, 9, 400 },                                  /* one partial cluster */
    { 512, 9, 400 },                                /* one full cluster */
    { 512 * 64, 9, 1500 },                          /* exactly one word */
    { 512 * 1000, 9, 3000 },                        /* multiple of gran */
    { 512 * 1000 + 1, 9, 3000 },                    /* partial last cluster */
    { 4096 * (64 * 3 + 5) + 17, 12, 3000 },
    { 65536 * 5000 - 3, 16, 3000 },
    { (UINT64_C(1) << 32) + 777, 22, 3000 },        /* around 2^32 bytes */
    { (UINT64_C(1) << 40) + 12345, 31, 3000 },      /* 2 GiB, past 1 TiB */
    { 5 * TiB + 4097, 30, 3000 },                   /* past 4 TiB */
    { (UINT64_C(1) << 45) + 3, 31, 2000 },          /* 32 TiB at 2 GiB */
    { 512 * (64 * 64 * 64 + 1), 9, 300 },           /* four levels */
};

static const uint64_t seeds[] = {
    0x5eed, 1, 2, 0xdeadbeefcafe, 0x123456789,
};

static void test_random_vs_model(void **state)
{
    (void)state;
    for (size_t s = 0; s < sizeof(seeds) / sizeof(seeds[0]); s++) {
        for (size_t c = 0; c < sizeof(random_configs) / sizeof(random_configs[0]); c++) {
            const RandomConfig *rc = &random_configs[c];
            run_random(seeds[s] * 1000 + c, rc->size, rc->shift, rc->nops);
        }
    }
    const char *env = getenv("HBITMAP_SEED");
    if (env) {
        uint64_t seed = strtoull(env, NULL, 0);
        print_message("extra seed %#" PRIx64 "\n", seed);
        for (size_t c = 0; c < sizeof(random_configs) / sizeof(random_configs[0]); c++) {
            const RandomConfig *rc = &random_configs[c];
            run_random(seed * 1000 + c, rc->size, rc->shift, rc->nops);
        }
    }
}

/* Every run of non-zero words, checked against the serialized form (the
 * naive model): maximal, in order, and together exactly the non-zero words. */
static void check_nonzero_runs(const HBitmap *hb)
{
    uint64_t nwords = hbitmap_nb_words(hb), from = 0, first, count, next = 0;
    uint8_t *all = calloc(nwords ? nwords : 1, 8);
    assert_non_null(all);
    hbitmap_serialize_part(hb, all, 0, nwords * 64);
    while (hbitmap_next_nonzero_words(hb, from, &first, &count)) {
        assert_true(count >= 1 && first >= next && first + count <= nwords);
        for (uint64_t w = next; w < first; w++) {       /* zero words between */
            for (int k = 0; k < 8; k++) {
                assert_int_equal(all[w * 8 + k], 0);
            }
        }
        for (uint64_t w = first; w < first + count; w++) {
            uint64_t v = 0;
            for (int k = 0; k < 8; k++) {
                v |= (uint64_t)all[w * 8 + k] << (8 * k);
            }
            assert_true(v != 0);
        }
        next = from = first + count;
    }
    for (uint64_t w = next; w < nwords; w++) {
        for (int k = 0; k < 8; k++) {
            assert_int_equal(all[w * 8 + k], 0);
        }
    }
    free(all);
}

static void test_nonzero_words(void **state)
{
    (void)state;
    uint64_t rng = 0x5eed;
    for (int round = 0; round < 40; round++) {
        uint64_t size = 512 * (1 + (rng = rng * 6364136223846793005ull + 1) % 70000);
        HBitmap *hb = hbitmap_new(size, 9);
        assert_non_null(hb);
        check_nonzero_runs(hb);
        for (int i = 0; i < round; i++) {
            uint64_t off = (rng = rng * 6364136223846793005ull + 1) % size;
            uint64_t len = 1 + (rng >> 20) % (512 * 200);
            hbitmap_set(hb, off, len);
        }
        check_nonzero_runs(hb);
        hbitmap_set_all(hb);
        check_nonzero_runs(hb);
        hbitmap_free(hb);
    }
}

/* On a sparse 64 TiB bitmap, walking its runs costs what is dirty (few
 * words visited), and a copy (which now copies every level but the top
 * word by word where the level above is set) keeps every level right. */
static void test_huge_sparse_runs_and_copy(void **state)
{
    (void)state;
    const uint64_t size = 64 * TiB;
    HBitmap *hb = hbitmap_new(size, 16);
    assert_non_null(hb);
    for (uint64_t i = 0; i < 64; i++) {
        hbitmap_set(hb, i * TiB + i * 40 * MiB, 4 * MiB);  /* word-aligned */
    }
    uint64_t v0 = hbitmap_stat_words_visited(), from = 0, first, count, runs = 0;
    while (hbitmap_next_nonzero_words(hb, from, &first, &count)) {
        EXPECT_EQ(count, 1);                    /* 4 MiB: 64 clusters */
        runs++;
        from = first + count;
    }
    EXPECT_EQ(runs, 64);
    assert_true(hbitmap_stat_words_visited() - v0 < 20 * 65);

    HBitmap *c = hbitmap_copy(hb);
    assert_non_null(c);
    for (uint64_t i = 0; i < 64; i++) {
        EXPECT_EQ(hbitmap_next_dirty(c, i * TiB, UINT64_MAX), i * TiB + i * 40 * MiB);
    }
    EXPECT_EQ(hbitmap_count_bits(c), hbitmap_count_bits(hb));
    check_nonzero_runs(c);
    hbitmap_free(c);
    hbitmap_free(hb);
}

/* ---- constructor ---- */

static void test_new_rejects_bad_args(void **state)
{
    (void)state;
    static const unsigned bad[] = { 0, 1, 8, 32, 33, 63, 64, 65, 1000, ~0u };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_null(hbitmap_new(1 * MiB, bad[i]));
    }
    /* Offsets come back as int64_t: larger sizes are refused. */
    assert_null(hbitmap_new((uint64_t)INT64_MAX + 1, 16));
    assert_null(hbitmap_new(UINT64_MAX, 31));

    for (unsigned s = HBITMAP_MIN_GRANULARITY_SHIFT;
         s <= HBITMAP_MAX_GRANULARITY_SHIFT; s++) {
        HBitmap *hb = hbitmap_new(1 * GiB + 1, s);
        assert_non_null(hb);
        EXPECT_EQ(hbitmap_granularity_shift(hb), s);
        EXPECT_EQ(hbitmap_nb_bits(hb), ((1 * GiB) >> s) + 1);
        hbitmap_free(hb);
    }
    hbitmap_free(NULL);
    HBitmap *hb = hbitmap_new(4096, 9);
    hbitmap_freep(&hb);
    assert_null(hb);
    hbitmap_freep(&hb);
}

/* Size 0 is allowed: an empty bitmap on which everything is a no-op. */
static void test_size_zero(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "size 0");
    HBitmap *hb = hbitmap_new(0, 16);
    assert_non_null(hb);
    EXPECT_EQ(hbitmap_nb_bits(hb), 0);
    EXPECT_EQ(hbitmap_serialized_size(hb), 0);
    hbitmap_set(hb, 0, 100);
    hbitmap_set_all(hb);
    EXPECT_EQ(hbitmap_count_bits(hb), 0);
    EXPECT_EQ(hbitmap_count_bytes(hb), 0);
    assert_true(hbitmap_is_empty(hb));
    assert_false(hbitmap_get(hb, 0));
    EXPECT_EQ(hbitmap_next_dirty(hb, 0, UINT64_MAX), -1);
    EXPECT_EQ(hbitmap_next_zero(hb, 0, UINT64_MAX), -1);
    uint64_t o, l;
    assert_false(hbitmap_next_dirty_area(hb, 0, UINT64_MAX, 0, &o, &l));
    hbitmap_reset(hb, 0, 1);
    hbitmap_reset_all(hb);
    uint8_t buf[2] = { 0xff, 0xff };
    hbitmap_deserialize_part(hb, buf, 0, 16);
    EXPECT_EQ(hbitmap_count_bits(hb), 0);
    hbitmap_serialize_part(hb, buf, 0, 16);
    EXPECT_EQ(buf[0], 0);
    EXPECT_EQ(buf[1], 0);
    HBitmap *c = hbitmap_copy(hb);
    assert_non_null(c);
    assert_true(hbitmap_merge(c, hb));
    hbitmap_free(c);
    hbitmap_free(hb);
}

/* ---- boundaries ---- */

static void test_partial_last_cluster(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "partial last cluster");
    uint64_t size = 3 * 4096 + 100;
    HBitmap *hb = hbitmap_new(size, 12);
    assert_non_null(hb);
    EXPECT_EQ(hbitmap_nb_bits(hb), 4);

    hbitmap_set(hb, size, 10);              /* past the end: no-op */
    hbitmap_set(hb, 100, 0);                /* zero bytes: no-op */
    assert_true(hbitmap_is_empty(hb));

    hbitmap_set(hb, size - 1, 1);
    assert_true(hbitmap_get(hb, 3 * 4096));
    assert_false(hbitmap_get(hb, size));
    EXPECT_EQ(hbitmap_count_bits(hb), 1);
    EXPECT_EQ(hbitmap_count_bytes(hb), 100);
    uint64_t o = 0, l = 0;
    assert_true(hbitmap_next_dirty_area(hb, 0, UINT64_MAX, 0, &o, &l));
    EXPECT_EQ(o, 3 * 4096);
    EXPECT_EQ(l, 100);
    assert_true(hbitmap_next_dirty_area(hb, size - 10, 5, 0, &o, &l));
    EXPECT_EQ(o, size - 10);
    EXPECT_EQ(l, 5);
    EXPECT_EQ(hbitmap_next_zero(hb, 3 * 4096, UINT64_MAX), -1);

    /* A byte range touching a cluster partially marks all of it. */
    hbitmap_set(hb, 4095, 2);
    EXPECT_EQ(hbitmap_count_bits(hb), 3);
    EXPECT_EQ(hbitmap_count_bytes(hb), 2 * 4096 + 100);
    EXPECT_EQ(hbitmap_next_dirty(hb, 0, UINT64_MAX), 0);
    EXPECT_EQ(hbitmap_next_dirty(hb, 10, UINT64_MAX), 10);
    EXPECT_EQ(hbitmap_next_zero(hb, 0, UINT64_MAX), 2 * 4096);
    EXPECT_EQ(hbitmap_next_zero(hb, 0, 2 * 4096), -1);
    EXPECT_EQ(hbitmap_next_zero(hb, 0, 2 * 4096 + 1), 2 * 4096);

    /* Reset of one byte clears the whole cluster. */
    hbitmap_reset(hb, 4096 + 7, 1);
    EXPECT_EQ(hbitmap_count_bits(hb), 2);
    assert_false(hbitmap_get(hb, 4096));

    hbitmap_set_all(hb);
    EXPECT_EQ(hbitmap_count_bytes(hb), size);
    uint8_t b = 0xff;
    hbitmap_serialize_part(hb, &b, 0, 8);
    EXPECT_EQ(b, 0x0f);                     /* padding past nb_bits is zero */
    hbitmap_free(hb);
}

static void test_serialize_bit_order(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "bit order");
    HBitmap *hb = hbitmap_new(16 * 512, 9);
    assert_non_null(hb);
    hbitmap_set(hb, 0 * 512, 1);
    hbitmap_set(hb, 3 * 512, 1);
    hbitmap_set(hb, 9 * 512, 1);
    hbitmap_set(hb, 15 * 512, 512);
    uint8_t buf[2];
    hbitmap_serialize_part(hb, buf, 0, 16);
    EXPECT_EQ(buf[0], 0x09);
    EXPECT_EQ(buf[1], 0x82);
    hbitmap_serialize_part(hb, buf, 8, 8);
    EXPECT_EQ(buf[0], 0x82);
    hbitmap_serialize_part(hb, buf, 8, 3);
    EXPECT_EQ(buf[0], 0x02);

    /* Deserialize replaces exactly the named clusters. */
    buf[0] = 0xff;
    hbitmap_deserialize_part(hb, buf, 8, 4);        /* clusters 8..11 */
    hbitmap_serialize_part(hb, buf, 0, 16);
    EXPECT_EQ(buf[0], 0x09);
    EXPECT_EQ(buf[1], 0x8f);
    EXPECT_EQ(hbitmap_count_bits(hb), 7);
    buf[0] = 0x00;
    hbitmap_deserialize_part(hb, buf, 0, 8);
    EXPECT_EQ(hbitmap_count_bits(hb), 5);
    EXPECT_EQ(hbitmap_next_dirty(hb, 0, UINT64_MAX), 8 * 512);
    hbitmap_free(hb);

    /* Bits past nb_bits in the buffer are ignored. */
    hb = hbitmap_new(10 * 512, 9);
    assert_non_null(hb);
    uint8_t ones[2] = { 0xff, 0xff };
    hbitmap_deserialize_part(hb, ones, 0, 16);
    EXPECT_EQ(hbitmap_count_bits(hb), 10);
    hbitmap_serialize_part(hb, buf, 0, 16);
    EXPECT_EQ(buf[0], 0xff);
    EXPECT_EQ(buf[1], 0x03);
    hbitmap_free(hb);
}

static void test_merge_copy(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "merge/copy");
    HBitmap *a = hbitmap_new(1 * GiB, 16);
    HBitmap *b = hbitmap_new(1 * GiB, 16);
    HBitmap *other_gran = hbitmap_new(1 * GiB, 17);
    HBitmap *other_size = hbitmap_new(1 * GiB + 1, 16);
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(other_gran);
    assert_non_null(other_size);
    hbitmap_set(a, 0, 1);
    hbitmap_set(b, 512 * MiB, 3 * 65536);
    hbitmap_set_all(other_gran);
    hbitmap_set_all(other_size);

    assert_false(hbitmap_merge(a, other_gran));
    assert_false(hbitmap_merge(a, other_size));
    EXPECT_EQ(hbitmap_count_bits(a), 1);        /* unchanged */
    assert_true(hbitmap_merge(a, b));
    EXPECT_EQ(hbitmap_count_bits(a), 4);
    EXPECT_EQ(hbitmap_count_bits(b), 3);
    assert_true(hbitmap_merge(a, a));
    EXPECT_EQ(hbitmap_count_bits(a), 4);

    HBitmap *c = hbitmap_copy(a);
    assert_non_null(c);
    EXPECT_EQ(hbitmap_count_bits(c), 4);
    EXPECT_EQ(hbitmap_next_dirty(c, 65536, UINT64_MAX), 512 * MiB);
    hbitmap_reset_all(c);
    EXPECT_EQ(hbitmap_count_bits(a), 4);
    assert_true(hbitmap_is_empty(c));
    EXPECT_EQ(hbitmap_next_dirty(c, 0, UINT64_MAX), -1);

    hbitmap_free(a);
    hbitmap_free(b);
    hbitmap_free(c);
    hbitmap_free(other_gran);
    hbitmap_free(other_size);
}

static void test_max_bytes(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "max_bytes");
    HBitmap *hb = hbitmap_new(100 * MiB, 16);
    assert_non_null(hb);
    hbitmap_set(hb, 10 * MiB, 10 * MiB);
    uint64_t o, l;
    assert_true(hbitmap_next_dirty_area(hb, 0, UINT64_MAX, 1 * MiB, &o, &l));
    EXPECT_EQ(o, 10 * MiB);
    EXPECT_EQ(l, 1 * MiB);
    assert_true(hbitmap_next_dirty_area(hb, 0, 15 * MiB, 0, &o, &l));
    EXPECT_EQ(l, 5 * MiB);
    assert_true(hbitmap_next_dirty_area(hb, 19 * MiB + 1, UINT64_MAX, 0, &o, &l));
    EXPECT_EQ(o, 19 * MiB + 1);
    EXPECT_EQ(l, 1 * MiB - 1);
    assert_false(hbitmap_next_dirty_area(hb, 20 * MiB, UINT64_MAX, 0, &o, &l));
    assert_false(hbitmap_next_dirty_area(hb, 0, 10 * MiB, 0, &o, &l));
    hbitmap_free(hb);
}

/* Byte offsets just below and above 2^32 at 512 B granularity. */
static void test_near_4g(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "near 4 GiB");
    const uint64_t g4 = UINT64_C(1) << 32;
    HBitmap *hb = hbitmap_new(g4 + 1 * MiB, 9);
    assert_non_null(hb);
    hbitmap_set(hb, g4 - 1, 2);
    EXPECT_EQ(hbitmap_count_bits(hb), 2);
    assert_true(hbitmap_get(hb, g4 - 512));
    assert_true(hbitmap_get(hb, g4 + 511));
    assert_false(hbitmap_get(hb, g4 + 512));
    uint64_t o, l;
    assert_true(hbitmap_next_dirty_area(hb, 0, UINT64_MAX, 0, &o, &l));
    EXPECT_EQ(o, g4 - 512);
    EXPECT_EQ(l, 1024);
    EXPECT_EQ(hbitmap_next_zero(hb, g4 - 512, UINT64_MAX), g4 + 512);
    hbitmap_reset(hb, g4, 1);
    EXPECT_EQ(hbitmap_count_bits(hb), 1);
    EXPECT_EQ(hbitmap_next_zero(hb, g4 - 512, UINT64_MAX), g4);
    EXPECT_EQ(hbitmap_next_dirty(hb, g4, UINT64_MAX), -1);
    hbitmap_free(hb);
}

/* 16 TiB at 64 KiB: 2^28 clusters, byte offsets far past 4 TiB. */
static void test_16tib_64k(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "16 TiB");
    const uint64_t size = 16 * TiB;
    HBitmap *hb = hbitmap_new(size, 16);
    assert_non_null(hb);
    EXPECT_EQ(hbitmap_nb_bits(hb), UINT64_C(1) << 28);
    uint64_t off = 15 * TiB + 3;
    hbitmap_set(hb, off, 1);
    assert_true(hbitmap_get(hb, 15 * TiB));
    EXPECT_EQ(hbitmap_next_dirty(hb, 0, UINT64_MAX), 15 * TiB);
    EXPECT_EQ(hbitmap_next_dirty(hb, 15 * TiB + 100, UINT64_MAX), 15 * TiB + 100);
    EXPECT_EQ(hbitmap_next_dirty(hb, 0, 15 * TiB), -1);
    EXPECT_EQ(hbitmap_next_zero(hb, 15 * TiB, 65536), -1);
    EXPECT_EQ(hbitmap_next_zero(hb, 15 * TiB, 65537), 15 * TiB + 65536);
    EXPECT_EQ(hbitmap_count_bytes(hb), 65536);

    hbitmap_set(hb, size - 1, 1);
    EXPECT_EQ(hbitmap_next_dirty(hb, 15 * TiB + 65536, UINT64_MAX), size - 65536);

    /* Serialize the byte that holds cluster 15 TiB / 64 KiB. */
    uint64_t bit = (15 * TiB) >> 16;
    uint8_t b[2];
    hbitmap_serialize_part(hb, b, bit - 8, 16);
    EXPECT_EQ(b[0], 0);
    EXPECT_EQ(b[1], 1);
    hbitmap_serialize_part(hb, b, hbitmap_nb_bits(hb) - 8, 16);
    EXPECT_EQ(b[0], 0x80);
    EXPECT_EQ(b[1], 0);
    b[0] = 0xf0;
    hbitmap_deserialize_part(hb, b, bit, 8);
    EXPECT_EQ(hbitmap_count_bits(hb), 5);
    EXPECT_EQ(hbitmap_next_dirty(hb, 0, UINT64_MAX), 15 * TiB + 4 * 65536);
    hbitmap_free(hb);
}

/* 5 TiB + 4097 at 64 KiB: a partial last cluster past 4 TiB. */
static void test_5tib_partial(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "5 TiB");
    const uint64_t size = 5 * TiB + 4097;
    HBitmap *hb = hbitmap_new(size, 16);
    assert_non_null(hb);
    hbitmap_set(hb, size - 1, 1);
    EXPECT_EQ(hbitmap_count_bytes(hb), 4097);
    uint64_t o, l;
    assert_true(hbitmap_next_dirty_area(hb, 0, UINT64_MAX, 0, &o, &l));
    EXPECT_EQ(o, 5 * TiB);
    EXPECT_EQ(l, 4097);
    hbitmap_set(hb, UINT64_MAX - 10, 100);          /* past the end */
    hbitmap_set(hb, 5 * TiB - 1, UINT64_MAX);       /* clipped to the size */
    EXPECT_EQ(hbitmap_count_bits(hb), 2);
    EXPECT_EQ(hbitmap_count_bytes(hb), 65536 + 4097);
    assert_true(hbitmap_next_dirty_area(hb, 0, UINT64_MAX, 0, &o, &l));
    EXPECT_EQ(o, 5 * TiB - 65536);
    EXPECT_EQ(l, 65536 + 4097);
    hbitmap_free(hb);
}

/* 8 TiB + 400 KiB at 4 KiB: cluster indexes past 2^31 (256 MiB level 0). */
static void test_8tib_4k(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "8 TiB at 4 KiB");
    const uint64_t size = 8 * TiB + 400 * KiB;
    HBitmap *hb = hbitmap_new(size, 12);
    assert_non_null(hb);
    EXPECT_EQ(hbitmap_nb_bits(hb), (UINT64_C(1) << 31) + 100);
    hbitmap_set(hb, 8 * TiB - 4096, 8192);           /* clusters 2^31-1, 2^31 */
    hbitmap_set(hb, size - 4096, 4096);               /* the last cluster */
    EXPECT_EQ(hbitmap_count_bits(hb), 3);
    uint64_t o, l;
    assert_true(hbitmap_next_dirty_area(hb, 0, UINT64_MAX, 0, &o, &l));
    EXPECT_EQ(o, 8 * TiB - 4096);
    EXPECT_EQ(l, 8192);
    assert_true(hbitmap_next_dirty_area(hb, o + l, UINT64_MAX, 0, &o, &l));
    EXPECT_EQ(o, size - 4096);
    EXPECT_EQ(l, 4096);
    EXPECT_EQ(hbitmap_next_zero(hb, 8 * TiB - 4096, UINT64_MAX), 8 * TiB + 4096);
    uint8_t b[13];
    hbitmap_serialize_part(hb, b, UINT64_C(1) << 31, 100);
    EXPECT_EQ(b[0], 0x01);
    EXPECT_EQ(b[12], 0x08);                          /* bit 99 of the part */
    hbitmap_reset(hb, 8 * TiB, UINT64_MAX);
    EXPECT_EQ(hbitmap_count_bits(hb), 1);
    hbitmap_free(hb);
}

/* Granularity 2 GiB over 2^60 + 1 bytes. */
static void test_2g_granularity(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "2 GiB granularity");
    const uint64_t g2 = UINT64_C(1) << 31;
    const uint64_t size = (UINT64_C(1) << 60) + 1;
    HBitmap *hb = hbitmap_new(size, 31);
    assert_non_null(hb);
    EXPECT_EQ(hbitmap_nb_bits(hb), (UINT64_C(1) << 29) + 1);
    hbitmap_set(hb, size - 1, 1);
    EXPECT_EQ(hbitmap_count_bytes(hb), 1);
    hbitmap_set(hb, 0, 1);
    EXPECT_EQ(hbitmap_count_bytes(hb), g2 + 1);
    EXPECT_EQ(hbitmap_next_dirty(hb, 1, UINT64_MAX), 1);
    EXPECT_EQ(hbitmap_next_dirty(hb, g2, UINT64_MAX), size - 1);
    uint64_t o, l;
    assert_true(hbitmap_next_dirty_area(hb, g2 - 5, UINT64_MAX, 0, &o, &l));
    EXPECT_EQ(o, g2 - 5);
    EXPECT_EQ(l, 5);
    assert_true(hbitmap_next_dirty_area(hb, g2, UINT64_MAX, 0, &o, &l));
    EXPECT_EQ(o, size - 1);
    EXPECT_EQ(l, 1);
    EXPECT_EQ(hbitmap_next_zero(hb, 0, UINT64_MAX), g2);
    hbitmap_free(hb);
}

/*
 * 64 TiB at 64 KiB = 2^30 clusters (128 MiB level 0) with a handful of dirty
 * areas: iterating them takes one call per area, and the searches examine a
 * few words per area instead of the 2^24 words of level 0.
 */
static void test_huge_sparse_iteration(void **state)
{
    (void)state;
    snprintf(ctx, sizeof(ctx), "64 TiB sparse");
    const uint64_t size = 64 * TiB, cl = 64 * KiB;
    HBitmap *hb = hbitmap_new(size, 16);
    assert_non_null(hb);
    EXPECT_EQ(hbitmap_nb_bits(hb), UINT64_C(1) << 30);

    static const struct { uint64_t off, len, area_off, area_len; } dirty[] = {
        { 0, 1, 0, 64 * KiB },
        { 63 * 64 * KiB, 2 * 64 * KiB, 63 * 64 * KiB, 2 * 64 * KiB },  /* word edge */
        { (UINT64_C(1) << 32) + 5, 100, UINT64_C(1) << 32, 64 * KiB },
        { 17 * TiB + 1, 1 * MiB, 17 * TiB, 1 * MiB + 64 * KiB },
        { 40 * TiB - 64 * KiB, 3 * 64 * KiB, 40 * TiB - 64 * KiB, 3 * 64 * KiB },
        { 64 * TiB - 1, 1, 64 * TiB - 64 * KiB, 64 * KiB },
    };
    const size_t n = sizeof(dirty) / sizeof(dirty[0]);
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        hbitmap_set(hb, dirty[i].off, dirty[i].len);
        total += dirty[i].area_len;
    }
    EXPECT_EQ(hbitmap_count_bytes(hb), total);
    EXPECT_EQ(hbitmap_count_bits(hb), total / cl);

    uint64_t v0 = hbitmap_stat_words_visited();
    uint64_t off = 0, calls = 0, o, l;
    size_t i = 0;
    while (off < size && hbitmap_next_dirty_area(hb, off, size - off, 0, &o, &l)) {
        calls++;
        assert_true(i < n);
        EXPECT_EQ(o, dirty[i].area_off);
        EXPECT_EQ(l, dirty[i].area_len);
        i++;
        off = o + l;
    }
    EXPECT_EQ(calls, n);
    uint64_t visited = hbitmap_stat_words_visited() - v0;
    print_message("iterating %zu areas of a 64 TiB bitmap examined %" PRIu64
                  " words\n", n, visited);
    assert_true(visited < 40 * (n + 1));

    /* next_zero inside a 1 GiB dirty run scans its full words only. */
    hbitmap_set(hb, 30 * TiB, 1 * GiB);                 /* 256 full words */
    v0 = hbitmap_stat_words_visited();
    EXPECT_EQ(hbitmap_next_zero(hb, 30 * TiB, UINT64_MAX), 30 * TiB + 1 * GiB);
    visited = hbitmap_stat_words_visited() - v0;
    assert_true(visited <= 256 + 2);

    /* Copy and merge walk the dirty words only. */
    v0 = hbitmap_stat_words_visited();
    HBitmap *c = hbitmap_copy(hb);
    assert_non_null(c);
    HBitmap *d = hbitmap_new(size, 16);
    assert_non_null(d);
    assert_true(hbitmap_merge(d, c));
    EXPECT_EQ(hbitmap_count_bits(d), hbitmap_count_bits(hb));
    visited = hbitmap_stat_words_visited() - v0;
    assert_true(visited < 2 * 10 * (n + 256 + 2));

    /* reset_all too, and an empty search climbs to the top at once. */
    v0 = hbitmap_stat_words_visited();
    hbitmap_reset_all(hb);
    assert_true(hbitmap_is_empty(hb));
    EXPECT_EQ(hbitmap_next_dirty(hb, 0, UINT64_MAX), -1);
    assert_false(hbitmap_next_dirty_area(hb, 0, UINT64_MAX, 0, &o, &l));
    visited = hbitmap_stat_words_visited() - v0;
    assert_true(visited < 10 * (n + 256 + 2));

    /* The copy still has everything. */
    EXPECT_EQ(hbitmap_next_dirty(c, 1, UINT64_MAX), 1);
    EXPECT_EQ(hbitmap_next_dirty(c, 64 * KiB, UINT64_MAX), 63 * 64 * KiB);
    EXPECT_EQ(hbitmap_count_bytes(c), total + 1 * GiB);
    hbitmap_free(c);
    hbitmap_free(d);
    hbitmap_free(hb);
}

/* hbitmap_resized_copy against a model: random bits on bitmaps of sizes
 * that are and are not multiples of the granularity, copied to smaller,
 * equal and larger sizes; every cluster of the copy is set exactly when
 * it lies below min(old, new) and was set (a partial last cluster keeps
 * its bit), and the original is unchanged. */
static void test_resized_copy(void **state)
{
    static const uint64_t sizes[] = { 0, 512, 1000, 64 * KiB, 3 * MiB + 7,
                                      16 * MiB };
    srand(7);
    for (unsigned shift = 9; shift <= 16; shift += 7) {
        uint64_t g = UINT64_C(1) << shift;
        for (size_t a = 0; a < sizeof(sizes) / sizeof(sizes[0]); a++) {
            HBitmap *hb = hbitmap_new(sizes[a], shift);
            assert_non_null(hb);
            for (int i = 0; i < 40 && sizes[a]; i++) {
                uint64_t off = (uint64_t)rand() % sizes[a];
                hbitmap_set(hb, off, (uint64_t)rand() % (4 * g) + 1);
            }
            uint64_t before = hbitmap_count_bits(hb);
            for (size_t b = 0; b < sizeof(sizes) / sizeof(sizes[0]); b++) {
                HBitmap *n = hbitmap_resized_copy(hb, sizes[b]);
                assert_non_null(n);
                assert_int_equal(hbitmap_size(n), sizes[b]);
                assert_int_equal(hbitmap_granularity_shift(n), shift);
                uint64_t keep = sizes[a] < sizes[b] ? sizes[a] : sizes[b];
                for (uint64_t off = 0; off < sizes[b]; off += g) {
                    bool want = off < keep && hbitmap_get(hb, off);
                    assert_int_equal(hbitmap_get(n, off), want);
                }
                hbitmap_free(n);
            }
            assert_int_equal(hbitmap_count_bits(hb), before);
            hbitmap_free(hb);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_new_rejects_bad_args),
        cmocka_unit_test(test_size_zero),
        cmocka_unit_test(test_partial_last_cluster),
        cmocka_unit_test(test_serialize_bit_order),
        cmocka_unit_test(test_merge_copy),
        cmocka_unit_test(test_max_bytes),
        cmocka_unit_test(test_near_4g),
        cmocka_unit_test(test_16tib_64k),
        cmocka_unit_test(test_5tib_partial),
        cmocka_unit_test(test_8tib_4k),
        cmocka_unit_test(test_2g_granularity),
        cmocka_unit_test(test_huge_sparse_iteration),
        cmocka_unit_test(test_nonzero_words),
        cmocka_unit_test(test_huge_sparse_runs_and_copy),
        cmocka_unit_test(test_random_vs_model),
        cmocka_unit_test(test_resized_copy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
