/*
 * Unit tests for the backup repository library (src/repo/,
 * docs/specs/repository.md):
 *  - the Merkle root against a naive recursive model, n = 0..40 leaves;
 *  - the zero-cluster hash against hashing a zero buffer;
 *  - manifests: to_json -> text -> from_json round trip, and from_json
 *    rejecting every kind of damage with an error;
 *  - backup IDs: repo_parse_id;
 *  - repo_open: create, attempt markers and tmp files raising max_seq, a
 *    folder that is not a repository refused;
 *  - repo_scan_backup / repo_scan_node on a qcow2 overlay built with the
 *    block library, against hashes of a flat in-memory model of the image
 *    (a file whose backing link is not its manifest's parent refused); on
 *    a pool of 1, 2, 3, 8 threads: byte-identical results, progress,
 *    errors;
 *  - repo_commit: the files appear, the marker goes, repo_find and
 *    repo_chain see the backups.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
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

#include <openssl/sha.h>
#include <xxhash.h>

#include "repo/repo.h"
#include "util/cleanup.h"
#include "test-util.h"
#include "util/cutils.h"

#define CL REPO_CLUSTER_SIZE

static void fill_random(void *buf, size_t len)
{
    uint8_t *p = buf;
    for (size_t i = 0; i < len; i++) {
        p[i] = (uint8_t)random();
    }
}

/* ---- Merkle root: a naive recursive model ---- */

typedef struct Digest {
    uint8_t b[32];
} Digest;

/* Root of the nodes list: pair neighbours into a new list (an odd last one
 * is carried), recurse until one node is left. */
static Digest model_root_of(const Digest *nodes, size_t n)
{
    if (n == 1) {
        return nodes[0];
    }
    size_t m = (n + 1) / 2;
    Digest *up = calloc(m, sizeof(*up));
    for (size_t i = 0; i < m; i++) {
        if (2 * i + 1 < n) {
            uint8_t pair[64];
            memcpy(pair, nodes[2 * i].b, 32);
            memcpy(pair + 32, nodes[2 * i + 1].b, 32);
            SHA256(pair, 64, up[i].b);
        } else {
            up[i] = nodes[2 * i];
        }
    }
    Digest r = model_root_of(up, m);
    free(up);
    return r;
}

static Digest model_root(const RepoHash *h, size_t n)
{
    Digest r;
    if (n == 0) {
        SHA256((const uint8_t *)"", 0, r.b);
        return r;
    }
    Digest *leaves = calloc(n, sizeof(*leaves));
    for (size_t i = 0; i < n; i++) {
        uint8_t buf[24];
        uint64_t c = h[i].cluster;
        for (int k = 0; k < 8; k++) {
            buf[k] = (uint8_t)(c >> (8 * k));      /* le64 */
        }
        memcpy(buf + 8, h[i].hash, 16);
        SHA256(buf, sizeof(buf), leaves[i].b);
    }
    r = model_root_of(leaves, n);
    free(leaves);
    return r;
}

static void test_merkle(void **state)
{
    RepoHash h[40] = { 0 };
    for (size_t n = 0; n <= 40; n++) {
        uint64_t c = 0;
        for (size_t i = 0; i < n; i++) {
            c += 1 + (uint64_t)(random() % 5);
            h[i].cluster = c;
            fill_random(h[i].hash, sizeof(h[i].hash));
        }
        uint8_t root[REPO_ROOT_LEN];
        repo_merkle_root(h, n, root);
        Digest want = model_root(h, n);
        assert_memory_equal(root, want.b, 32);
    }
    /* n = 3 by hand: SHA(SHA(l0 || l1) || l2). */
    Digest l[3];
    for (int i = 0; i < 3; i++) {
        l[i] = model_root(&h[i], 1);
    }
    uint8_t pair[64], root[32], want[32];
    memcpy(pair, l[0].b, 32);
    memcpy(pair + 32, l[1].b, 32);
    SHA256(pair, 64, pair);
    memcpy(pair + 32, l[2].b, 32);
    SHA256(pair, 64, want);
    repo_merkle_root(h, 3, root);
    assert_memory_equal(root, want, 32);
    /* Changing one hash changes the root. */
    h[1].hash[5] ^= 1;
    repo_merkle_root(h, 3, pair);
    assert_memory_not_equal(root, pair, 32);
}

/* ---- Cluster hashes ---- */

static void canonical_xxh(const void *buf, size_t len, uint8_t out[16])
{
    XXH128_hash_t x = XXH3_128bits(buf, len);
    /* Big endian high64 then low64: the standard text form. */
    for (int i = 0; i < 8; i++) {
        out[i] = (uint8_t)(x.high64 >> (56 - 8 * i));
        out[8 + i] = (uint8_t)(x.low64 >> (56 - 8 * i));
    }
}

static void test_hash_zero(void **state)
{
    static const size_t lens[] = { 0, 1, 512, 3000, CL - 1, CL, 3 * CL + 7 };
    for (size_t i = 0; i < ARRAY_SIZE(lens); i++) {
        uint8_t *z = calloc(1, lens[i] + 1);
        uint8_t a[16], b[16], c[16];
        repo_hash_zero_cluster(lens[i], a);
        repo_hash_cluster(z, lens[i], b);
        canonical_xxh(z, lens[i], c);
        assert_memory_equal(a, b, 16);
        assert_memory_equal(a, c, 16);
        free(z);
    }
    uint8_t buf[100], a[16], b[16];
    fill_random(buf, sizeof(buf));
    repo_hash_cluster(buf, sizeof(buf), a);
    canonical_xxh(buf, sizeof(buf), b);
    assert_memory_equal(a, b, 16);
}

/* ---- Manifests ---- */

static RepoManifest *sample_manifest(void)
{
    RepoManifest *m = calloc(1, sizeof(*m));
    m->version = 1;
    m->seq = 7;
    repo_format_id(7, m->id);
    m->node = strdup("disk0");
    m->time = strdup("2026-11-23T15:11:32Z");
    m->level = REPO_LEVEL_INC;
    m->parent_seq = 3;
    m->image_size = 100 * (uint64_t)CL + 4096;     /* 101 clusters */
    m->granularity = 65536;
    m->cluster_size = CL;
    m->bitmap = strdup("bitback-7");
    m->generation = strdup("2b7e1516-28ae-42a6-abf7-158809cf4f3c");
    m->n_bitmap_counts = 2;
    m->bitmap_counts = calloc(2, sizeof(*m->bitmap_counts));
    m->bitmap_counts[0] = (RepoBitmapCount){ strdup("bitback-3"), 5 * CL };
    m->bitmap_counts[1] = (RepoBitmapCount){ strdup("bitback-7"), 0 };
    m->n_extents = 2;
    m->extents = calloc(2, sizeof(*m->extents));
    m->extents[0] = (RepoExtent){ 2 * CL, 3 * CL };
    m->extents[1] = (RepoExtent){ 100 * CL, 4096 };
    m->changed_bytes = 3 * CL + 4096;
    m->stored_bytes = 12345;
    m->n_hashes = 4;
    m->hashes = calloc(4, sizeof(*m->hashes));
    uint64_t cl[] = { 2, 3, 4, 100 };
    for (int i = 0; i < 4; i++) {
        m->hashes[i].cluster = cl[i];
        fill_random(m->hashes[i].hash, 16);
    }
    repo_merkle_root(m->hashes, m->n_hashes, m->merkle_root);
    return m;
}

static void assert_manifest_equal(const RepoManifest *a, const RepoManifest *b)
{
    assert_int_equal(a->version ? a->version : 2, b->version);
    assert_int_equal(a->seq, b->seq);
    assert_string_equal(a->id, b->id);
    assert_string_equal(a->node, b->node);
    assert_string_equal(a->time, b->time);
    assert_int_equal(a->level, b->level);
    assert_int_equal(a->synthetic, b->synthetic);
    assert_int_equal(a->parent_seq, b->parent_seq);
    assert_int_equal(a->image_size, b->image_size);
    assert_int_equal(a->granularity, b->granularity);
    assert_int_equal(a->cluster_size, b->cluster_size);
    if (a->bitmap || b->bitmap) {
        assert_string_equal(a->bitmap, b->bitmap);
    }
    if (a->generation || b->generation) {
        assert_string_equal(a->generation, b->generation);
    }
    assert_int_equal(a->n_bitmap_counts, b->n_bitmap_counts);
    for (size_t i = 0; i < a->n_bitmap_counts; i++) {
        assert_string_equal(a->bitmap_counts[i].name, b->bitmap_counts[i].name);
        assert_int_equal(a->bitmap_counts[i].count, b->bitmap_counts[i].count);
    }
    assert_int_equal(a->changed_bytes, b->changed_bytes);
    assert_int_equal(a->stored_bytes, b->stored_bytes);
    assert_memory_equal(a->merkle_root, b->merkle_root, 32);
    if (b->version == 2) {
        assert_int_equal(a->index_records, b->index_records);
        return;                 /* the hashes are in the index */
    }
    assert_int_equal(a->n_extents, b->n_extents);
    for (size_t i = 0; i < a->n_extents; i++) {
        assert_int_equal(a->extents[i].start, b->extents[i].start);
        assert_int_equal(a->extents[i].length, b->extents[i].length);
    }
    assert_int_equal(a->n_hashes, b->n_hashes);
    for (size_t i = 0; i < a->n_hashes; i++) {
        assert_int_equal(a->hashes[i].cluster, b->hashes[i].cluster);
        assert_memory_equal(a->hashes[i].hash, b->hashes[i].hash, 16);
    }
    assert_memory_equal(a->merkle_root, b->merkle_root, 32);
}

/* The version-1 JSON of m (its inline extents and hashes), as bitback
 * wrote it before version 2: the version-2 form with version 1,
 * "cluster-size" for "hash-size" and the lists for "index-records". */
static struct json_object *manifest_v1_json(const RepoManifest *m)
{
    struct json_object *o = repo_manifest_to_json(m, true);
    struct json_object *ext = json_object_new_array();
    struct json_object *hs = json_object_new_array();

    json_object_object_add(o, "version", json_object_new_int(1));
    json_object_object_del(o, "hash-size");
    json_object_object_del(o, "index-records");
    json_object_object_add(o, "cluster-size",
                           json_object_new_int64(m->cluster_size));
    for (size_t i = 0; i < m->n_extents; i++) {
        struct json_object *e = json_object_new_array();
        json_object_array_add(e, json_object_new_int64((int64_t)m->extents[i].start));
        json_object_array_add(e, json_object_new_int64((int64_t)m->extents[i].length));
        json_object_array_add(ext, e);
    }
    for (size_t i = 0; i < m->n_hashes; i++) {
        struct json_object *e = json_object_new_array();
        char hex[33];
        for (int k = 0; k < 16; k++) {
            sprintf(hex + 2 * k, "%02x", m->hashes[i].hash[k]);
        }
        json_object_array_add(e, json_object_new_int64((int64_t)m->hashes[i].cluster));
        json_object_array_add(e, json_object_new_string(hex));
        json_object_array_add(hs, e);
    }
    json_object_object_add(o, "extents", ext);
    json_object_object_add(o, "hashes", hs);
    return o;
}

/* to_json (version 1 or 2 as m says), print, parse the text, from_json. */
static RepoManifest *round_trip(const RepoManifest *m, Error **errp)
{
    struct json_object *o = m->version == 1 ? manifest_v1_json(m)
                                            : repo_manifest_to_json(m, true);
    char *text = strdup(json_object_to_json_string(o));
    json_object_put(o);
    o = json_tokener_parse(text);
    assert_non_null(o);
    free(text);
    RepoManifest *r = repo_manifest_from_json(o, "x.json", errp);
    json_object_put(o);
    return r;
}

/* The writer refuses a manifest longer than readers accept (it would commit
 * a backup nobody can read), and the text it accepts is what it writes. */
static void test_manifest_text_limit(void **state)
{
    Error *err = NULL;
    RepoManifest *m = sample_manifest();
    m->version = 2;
    m->index_records = 3;
    char *text = repo_manifest_text(m, "x.json", UINT64_MAX, &err);
    die_on(err);
    size_t len = strlen(text);
    assert_true(len > 2 && text[len - 1] == '\n');

    char *same = repo_manifest_text(m, "x.json", len, &err);
    die_on(err);
    assert_string_equal(same, text);
    free(same);

    assert_null(repo_manifest_text(m, "x.json", len - 1, &err));
    assert_non_null(err);
    assert_non_null(strstr(error_get_pretty(err), "x.json"));
    assert_non_null(strstr(error_get_pretty(err), "more than"));
    error_free(err);
    free(text);
    repo_manifest_free(m);
}

static void set2(struct json_object *o, const char *key, struct json_object *v)
{
    json_object_object_add(o, key, v);
}

static void test_manifest_round_trip(void **state)
{
    Error *err = NULL;
    RepoManifest *m = sample_manifest();
    RepoManifest *r = round_trip(m, &err);
    die_on(err);
    assert_manifest_equal(m, r);
    repo_manifest_free(r);

    /* A full backup: parent null, bitmap and generation null, no hashes. */
    m->level = REPO_LEVEL_FULL;
    m->parent_seq = 0;
    m->synthetic = true;
    free(m->bitmap);
    m->bitmap = NULL;
    free(m->generation);
    m->generation = NULL;
    m->n_hashes = 0;
    m->n_extents = 0;
    m->changed_bytes = 0;
    repo_merkle_root(m->hashes, 0, m->merkle_root);
    r = round_trip(m, &err);
    die_on(err);
    assert_manifest_equal(m, r);
    assert_null(r->bitmap);
    repo_manifest_free(r);

    /* Version 2: the same fields, hash-size and index-records for the
     * lists; what it refuses. */
    m->version = 2;
    m->index_records = 101;                /* every block */
    r = round_trip(m, &err);
    die_on(err);
    assert_manifest_equal(m, r);
    repo_manifest_free(r);
    static const struct { const char *key; int64_t v; } bad2[] = {
        { "hash-size", 4096 }, { "hash-size", 3 * CL }, { "hash-size", 8 << 20 },
        { "index-records", 102 }, { "index-records", -1 }, { "version", 3 },
    };
    for (size_t i = 0; i <= ARRAY_SIZE(bad2) + 1; i++) {
        struct json_object *o2 = repo_manifest_to_json(m, true);
        if (i < ARRAY_SIZE(bad2)) {
            set2(o2, bad2[i].key, json_object_new_int64(bad2[i].v));
        } else if (i == ARRAY_SIZE(bad2)) {
            set2(o2, "hashes", json_object_new_array());   /* v1's list */
        } else {
            json_object_object_del(o2, "index-records");
        }
        assert_null(repo_manifest_from_json(o2, "m2.json", &err));
        assert_non_null(err);
        assert_non_null(strstr(error_get_pretty(err), "m2.json"));
        error_free(err);
        err = NULL;
        json_object_put(o2);
    }

    /* The short form for `list`. */
    struct json_object *o = repo_manifest_to_json(m, false), *v;
    assert_true(json_object_object_get_ex(o, "id", &v));
    assert_string_equal(json_object_get_string(v), "000007");
    assert_true(json_object_object_get_ex(o, "parent", &v));
    assert_null(v);
    assert_true(json_object_object_get_ex(o, "changed-bytes", &v));
    assert_true(json_object_object_get_ex(o, "stored-bytes", &v));
    assert_false(json_object_object_get_ex(o, "hashes", &v));
    json_object_put(o);
    repo_manifest_free(m);
}

/* Apply one damage to the good manifest's JSON and expect a rejection. */
typedef void Damage(struct json_object *o);

static void set(struct json_object *o, const char *key, struct json_object *v)
{
    json_object_object_add(o, key, v);
}

static void d_id_short(struct json_object *o) { set(o, "id", json_object_new_string("7")); }
static void d_id_abc(struct json_object *o) { set(o, "id", json_object_new_string("abc")); }
static void d_id_zero(struct json_object *o) { set(o, "id", json_object_new_string("000000")); }
static void d_id_int(struct json_object *o) { set(o, "id", json_object_new_int(7)); }
static void d_parent_bad(struct json_object *o) { set(o, "parent", json_object_new_string("x")); }
static void d_parent_newer(struct json_object *o) { set(o, "parent", json_object_new_string("000008")); }
static void d_parent_null(struct json_object *o) { set(o, "parent", NULL); }
static void d_level(struct json_object *o) { set(o, "level", json_object_new_string("weekly")); }
static void d_time(struct json_object *o) { set(o, "time", json_object_new_string("yesterday")); }
static void d_node_slash(struct json_object *o) { set(o, "node", json_object_new_string("a/b")); }
static void d_node_dot(struct json_object *o) { set(o, "node", json_object_new_string(".x")); }
static void d_node_int(struct json_object *o) { set(o, "node", json_object_new_int(1)); }
static void d_size_neg(struct json_object *o) { set(o, "image-size", json_object_new_int(-1)); }
static void d_size_str(struct json_object *o) { set(o, "image-size", json_object_new_string("1")); }
static void d_size_small(struct json_object *o) { set(o, "image-size", json_object_new_int64(4 * CL)); }
static void d_gran(struct json_object *o) { set(o, "granularity", json_object_new_int(1000)); }
static void d_cs(struct json_object *o) { set(o, "cluster-size", json_object_new_int(4096)); }
static void d_synth(struct json_object *o) { set(o, "synthetic", json_object_new_int(0)); }
static void d_format(struct json_object *o) { set(o, "format", json_object_new_string("other")); }
static void d_version(struct json_object *o) { set(o, "version", json_object_new_int(2)); }
static void d_algo(struct json_object *o) { set(o, "hash-algorithm", json_object_new_string("md5")); }
static void d_gen_int(struct json_object *o) { set(o, "generation", json_object_new_int(3)); }
static void d_changed_big(struct json_object *o) { set(o, "changed-bytes", json_object_new_int64(200 * (int64_t)CL)); }
static void d_root_short(struct json_object *o) { set(o, "merkle-root", json_object_new_string("abcd")); }
static void d_root_hex(struct json_object *o)
{
    set(o, "merkle-root", json_object_new_string(
        "zz00000000000000000000000000000000000000000000000000000000000000"));
}
static void d_root_null(struct json_object *o) { set(o, "merkle-root", NULL); }
static void d_id_null(struct json_object *o) { set(o, "id", NULL); }
static void d_hashes_null(struct json_object *o) { set(o, "hashes", NULL); }
static void d_extents_null(struct json_object *o) { set(o, "extents", NULL); }
static void d_synth_null(struct json_object *o) { set(o, "synthetic", NULL); }
static void d_size_null(struct json_object *o) { set(o, "image-size", NULL); }
static void d_node_null(struct json_object *o) { set(o, "node", NULL); }
static void d_counts_arr(struct json_object *o) { set(o, "bitmap-counts", json_object_new_array()); }

/* "bitmap-counts": {name: value} with one bad entry. */
static void set_count(struct json_object *o, const char *name,
                      struct json_object *v)
{
    struct json_object *c = json_object_new_object();
    json_object_object_add(c, name, v);
    set(o, "bitmap-counts", c);
}
static void d_counts_neg(struct json_object *o) { set_count(o, "b", json_object_new_int(-1)); }
static void d_counts_str(struct json_object *o) { set_count(o, "b", json_object_new_string("12")); }
static void d_counts_noname(struct json_object *o) { set_count(o, "", json_object_new_int(1)); }

static struct json_object *hash_entry(struct json_object *o, size_t i)
{
    struct json_object *hs;
    assert_true(json_object_object_get_ex(o, "hashes", &hs));
    return json_object_array_get_idx(hs, i);
}

static void d_hash_unsorted(struct json_object *o)
{
    json_object_array_put_idx(hash_entry(o, 1), 0, json_object_new_int(9));
}
static void d_hash_dup(struct json_object *o)
{
    json_object_array_put_idx(hash_entry(o, 1), 0, json_object_new_int(2));
}
static void d_hash_outside(struct json_object *o)
{
    json_object_array_put_idx(hash_entry(o, 3), 0, json_object_new_int(101));
}
static void d_hash_hex(struct json_object *o)
{
    json_object_array_put_idx(hash_entry(o, 0), 1,
                              json_object_new_string("0123456789abcdef0123456789abcdeg"));
}
static void d_hash_len(struct json_object *o)
{
    json_object_array_put_idx(hash_entry(o, 0), 1, json_object_new_string("0123"));
}
static void d_hash_notarray(struct json_object *o)
{
    struct json_object *hs;
    assert_true(json_object_object_get_ex(o, "hashes", &hs));
    json_object_array_put_idx(hs, 0, json_object_new_string("x"));
}
static void d_hashes_obj(struct json_object *o) { set(o, "hashes", json_object_new_object()); }
static void d_ext_outside(struct json_object *o)
{
    struct json_object *ex, *e;
    assert_true(json_object_object_get_ex(o, "extents", &ex));
    e = json_object_array_get_idx(ex, 1);
    json_object_array_put_idx(e, 1, json_object_new_int(8192));
}
static void d_ext_unsorted(struct json_object *o)
{
    struct json_object *ex, *e;
    assert_true(json_object_object_get_ex(o, "extents", &ex));
    e = json_object_array_get_idx(ex, 1);
    json_object_array_put_idx(e, 0, json_object_new_int(CL));
}
static void d_ext_empty(struct json_object *o)
{
    struct json_object *ex, *e;
    assert_true(json_object_object_get_ex(o, "extents", &ex));
    e = json_object_array_get_idx(ex, 0);
    json_object_array_put_idx(e, 1, json_object_new_int(0));
}

static void test_manifest_rejects(void **state)
{
    static const char *const keys[] = {
        "format", "version", "id", "node", "time", "level", "parent",
        "synthetic", "image-size", "granularity", "cluster-size", "bitmap",
        "generation", "changed-bytes", "stored-bytes", "extents",
        "hash-algorithm", "hashes", "merkle-root",
    };
    static Damage *const damages[] = {
        d_id_short, d_id_abc, d_id_zero, d_id_int, d_parent_bad, d_parent_newer,
        d_parent_null, d_level, d_time, d_node_slash, d_node_dot, d_node_int,
        d_size_neg, d_size_str, d_size_small, d_gran, d_cs, d_synth, d_format,
        d_version, d_algo, d_gen_int, d_changed_big, d_root_short, d_root_hex,
        d_root_null, d_hash_unsorted, d_hash_dup, d_hash_outside, d_hash_hex,
        d_hash_len, d_hash_notarray, d_hashes_obj, d_ext_outside,
        d_ext_unsorted, d_ext_empty, d_id_null, d_hashes_null,
        d_extents_null, d_synth_null, d_size_null, d_node_null,
        d_counts_arr, d_counts_neg, d_counts_str, d_counts_noname,
    };
    RepoManifest *m = sample_manifest();
    struct json_object *good = manifest_v1_json(m);

    /* Every key is required. */
    for (size_t i = 0; i < ARRAY_SIZE(keys); i++) {
        struct json_object *o = NULL;
        Error *err = NULL;
        assert_int_equal(json_object_deep_copy(good, &o, NULL), 0);
        assert_true(json_object_object_get_ex(o, keys[i], NULL));
        json_object_object_del(o, keys[i]);
        assert_null(repo_manifest_from_json(o, "m.json", &err));
        assert_non_null(err);
        assert_non_null(strstr(error_get_pretty(err), "m.json"));
        assert_non_null(strstr(error_get_pretty(err), keys[i]));
        error_free(err);
        json_object_put(o);
    }
    for (size_t i = 0; i < ARRAY_SIZE(damages); i++) {
        struct json_object *o = NULL;
        Error *err = NULL;
        assert_int_equal(json_object_deep_copy(good, &o, NULL), 0);
        damages[i](o);
        RepoManifest *r = repo_manifest_from_json(o, "m.json", &err);
        if (r) {
            fail_msg("damage %zu accepted", i);
        }
        assert_non_null(err);
        assert_non_null(strstr(error_get_pretty(err), "m.json"));
        error_free(err);
        json_object_put(o);
    }
    /* Not an object at all. */
    Error *err = NULL;
    struct json_object *arr = json_object_new_array();
    assert_null(repo_manifest_from_json(arr, "m.json", &err));
    assert_non_null(err);
    error_free(err);
    err = NULL;
    json_object_put(arr);
    /* And the undamaged one still parses (so the checks above mean it). */
    RepoManifest *r = repo_manifest_from_json(good, "m.json", &err);
    die_on(err);
    repo_manifest_free(r);
    /* "bitmap-counts" is optional (manifests written before it). */
    json_object_object_del(good, "bitmap-counts");
    r = repo_manifest_from_json(good, "m.json", &err);
    die_on(err);
    assert_int_equal(r->n_bitmap_counts, 0);
    repo_manifest_free(r);
    json_object_put(good);
    repo_manifest_free(m);
}

static void test_parse_id(void **state)
{
    unsigned seq = 99;
    Error *err = NULL;
    assert_true(repo_parse_id("latest", &seq, &err));
    assert_int_equal(seq, 0);
    assert_true(repo_parse_id("7", &seq, &err));
    assert_int_equal(seq, 7);
    assert_true(repo_parse_id("000007", &seq, &err));
    assert_int_equal(seq, 7);
    assert_true(repo_parse_id("0000000000000123", &seq, &err));
    assert_int_equal(seq, 123);
    die_on(err);
    static const char *const bad[] = {
        "", "abc", "-1", "0", "000000", "99999999999999999999", "4294967297",
        "7x", " 7", "+7", "latest2",
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        seq = 42;
        assert_false(repo_parse_id(bad[i], &seq, &err));
        assert_non_null(err);
        assert_int_equal(seq, 42);
        error_free(err);
        err = NULL;
    }
    char buf[REPO_ID_LEN];
    repo_format_id(12, buf);
    assert_string_equal(buf, "000012");
    RepoLevel l;
    assert_true(repo_level_parse("diff", &l));
    assert_int_equal(l, REPO_LEVEL_DIFF);
    assert_false(repo_level_parse("weekly", &l));
    assert_string_equal(repo_level_name(REPO_LEVEL_INC), "inc");
}

/* ---- repo_open ---- */

static void touch(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    close(fd);
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "r");
    char *buf = calloc(1, 4096);

    assert_non_null(f);
    assert_true(fread(buf, 1, 4095, f) > 0);
    fclose(f);
    return buf;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* bitback-repo.json's UUID: made with the repository, given once to a
 * repository without one (only when opened to write), refused when bad. */
static void test_open_uuid(void **state)
{
    Error *err = NULL;
    _cleanup_free_ char *rp = tpath("ru");
    _cleanup_free_ char *marker = tpath("ru/bitback-repo.json");
    char uuid[REPO_UUID_LEN];
    Repo *r = repo_open(rp, true, &err);

    die_on(err);
    assert_int_equal(strlen(r->uuid), 36);
    memcpy(uuid, r->uuid, sizeof(uuid));
    repo_free(r);
    r = repo_open(rp, false, &err);
    die_on(err);
    assert_string_equal(r->uuid, uuid);
    repo_free(r);

    /* Made before UUIDs: readers leave it alone ... */
    static const char old[] =
        "{\"format\": \"bitback-repository\", \"version\": 1, \"x\": 5}\n";
    write_text(marker, old);
    r = repo_open(rp, false, &err);
    die_on(err);
    assert_string_equal(r->uuid, "");
    repo_free(r);
    _cleanup_free_ char *same = read_text(marker);
    assert_string_equal(same, old);
    /* ... a writer gives it one, once, keeping the other keys. */
    r = repo_open(rp, true, &err);
    die_on(err);
    assert_int_equal(strlen(r->uuid), 36);
    assert_string_not_equal(r->uuid, uuid);
    memcpy(uuid, r->uuid, sizeof(uuid));
    repo_free(r);
    _cleanup_free_ char *text = read_text(marker);
    assert_non_null(strstr(text, uuid));
    assert_non_null(strstr(text, "\"x\": 5"));
    _cleanup_free_ char *tmp = tpath("ru/bitback-repo.json.tmp");
    assert_int_equal(access(tmp, F_OK), -1);
    r = repo_open(rp, true, &err);
    die_on(err);
    assert_string_equal(r->uuid, uuid);
    repo_free(r);

    /* A uuid that is not one is refused. */
    write_text(marker, "{\"format\": \"bitback-repository\", \"version\": 1, "
                       "\"uuid\": \"not-a-uuid\"}\n");
    assert_null(repo_open(rp, true, &err));
    assert_non_null(err);
    assert_non_null(strstr(error_get_pretty(err), "uuid"));
    error_free(err);
}

static void test_open(void **state)
{
    Error *err = NULL;
    _cleanup_free_ char *rp = tpath("r1");
    _cleanup_free_ char *marker = tpath("r1/bitback-repo.json");

    /* Missing, create = false: refused. */
    assert_null(repo_open(rp, false, &err));
    assert_non_null(err);
    error_free(err);
    err = NULL;

    Repo *r = repo_open(rp, true, &err);
    die_on(err);
    assert_non_null(r);
    assert_int_equal(access(marker, F_OK), 0);
    assert_int_equal(r->n_backups, 0);
    assert_int_equal(r->max_seq, 0);
    _cleanup_free_ const char **nodes = repo_nodes(r);
    assert_null(nodes[0]);
    assert_null(repo_latest(r, "disk0"));
    assert_null(repo_find(r, "disk0", 0, &err));
    assert_non_null(err);
    error_free(err);
    err = NULL;

    /* Markers and tmp files of any node raise max_seq; unknown files
     * are ignored. */
    assert_true(repo_mark_attempt(r, "disk0", 3, &err));
    die_on(err);
    assert_int_equal(r->max_seq, 3);
    repo_free(r);
    _cleanup_free_ char *d1 = tpath("r1/disk1");
    assert_int_equal(mkdir(d1, 0755), 0);
    _cleanup_free_ char *t1 = tpath("r1/disk1/.000005.qcow2.tmp");
    touch(t1);
    _cleanup_free_ char *junk = tpath("r1/disk1/12.json");
    touch(junk);
    _cleanup_free_ char *junk2 = tpath("r1/disk1/notes.txt");
    touch(junk2);
    _cleanup_free_ char *junkdir = tpath("r1/.hidden");
    assert_int_equal(mkdir(junkdir, 0755), 0);
    _cleanup_free_ char *junk3 = tpath("r1/.hidden/000099.attempt");
    touch(junk3);

    r = repo_open(rp, false, &err);
    die_on(err);
    assert_int_equal(r->max_seq, 5);
    assert_int_equal(r->n_backups, 0);
    size_t n;
    unsigned *att = repo_attempts(r, "disk0", &n);
    assert_int_equal(n, 1);
    assert_int_equal(att[0], 3);
    free(att);
    _cleanup_free_ char *t2 = tpath("r1/disk0/.000009.json.tmp");
    touch(t2);
    assert_true(repo_reload(r, &err));
    die_on(err);
    assert_int_equal(r->max_seq, 9);
    repo_remove_tmp_files(r, "disk0");
    repo_remove_tmp_files(r, "disk1");
    assert_int_equal(access(t1, F_OK), -1);
    assert_int_equal(access(t2, F_OK), -1);
    assert_int_equal(access(junk2, F_OK), 0);
    repo_remove_attempts_below(r, "disk0", 4);
    assert_true(repo_reload(r, &err));
    assert_int_equal(r->max_seq, 0);
    att = repo_attempts(r, "disk0", &n);
    assert_int_equal(n, 0);
    free(att);
    /* Bad node names are refused. */
    assert_false(repo_mark_attempt(r, "a/b", 10, &err));
    assert_non_null(err);
    error_free(err);
    err = NULL;
    repo_free(r);

    /* A broken manifest is an error naming the file. */
    _cleanup_free_ char *bad = tpath("r1/disk1/000004.json");
    FILE *f = fopen(bad, "w");
    fputs("{\"format\": \"bitback-manifest\", ", f);
    fclose(f);
    assert_null(repo_open(rp, false, &err));
    assert_non_null(err);
    assert_non_null(strstr(error_get_pretty(err), "000004.json"));
    error_free(err);
    err = NULL;
    unlink(bad);

    /* A folder with files but no bitback-repo.json is refused, even with
     * create; an empty one is adopted. */
    _cleanup_free_ char *other = tpath("other");
    _cleanup_free_ char *ofile = tpath("other/data.bin");
    assert_int_equal(mkdir(other, 0755), 0);
    touch(ofile);
    assert_null(repo_open(other, true, &err));
    assert_non_null(err);
    assert_non_null(strstr(error_get_pretty(err), "not a bitback repository"));
    error_free(err);
    err = NULL;
    unlink(ofile);
    r = repo_open(other, true, &err);
    die_on(err);
    repo_free(r);
    /* A damaged repository marker. */
    _cleanup_free_ char *omarker = tpath("other/bitback-repo.json");
    f = fopen(omarker, "w");
    fputs("{\"format\": \"bitback-repository\", \"version\": 3}", f);
    fclose(f);
    assert_null(repo_open(other, false, &err));
    assert_non_null(err);
    error_free(err);
}

/* ---- repo_scan_backup and repo_commit ---- */

#define NCL 20
#define IMG_SIZE ((uint64_t)NCL * CL + 3072)   /* last cluster is short */

static uint8_t model[IMG_SIZE];

static void create_qcow2(const char *path, const char *backing,
                         const char *backing_fmt, const char *cluster_size)
{
    make_qcow2_image((char *)path, IMG_SIZE, backing, backing_fmt, cluster_size);
}

/* Write zeroes (zero) or random bytes through the block layer and into
 * the flat model mdl (the image's bytes). */
static void model_write(BlockDriverState *bs, uint8_t *mdl, uint64_t off,
                        uint64_t len, bool zero)
{
    if (zero) {
        memset(mdl + off, 0, len);
        assert_int_equal(bdrv_pwrite_zeroes(bs, off, len, 0), 0);
    } else {
        fill_random(mdl + off, len);
        assert_int_equal(bdrv_pwrite(bs, off, mdl + off, len, 0), 0);
    }
}

/* Write through the block layer and into the model. */
static void img_write(BlockDriverState *bs, uint64_t off, uint64_t len, bool zero)
{
    model_write(bs, model, off, len, zero);
}

/* The zero runs of the last index read by expand_record's callers. */
static size_t last_zero_runs;

/* Append rec's blocks to m->hashes (a zero run's blocks with the hash of
 * their zeroes, so the list reads as the old per-cluster one). */
static void expand_record(RepoManifest *m, const RepoIndexRecord *rec)
{
    uint64_t cs = m->cluster_size;

    last_zero_runs += rec->zero;
    for (uint64_t b = rec->block; b < rec->block + rec->count; b++) {
        m->hashes = realloc(m->hashes, (m->n_hashes + 1) * sizeof(*m->hashes));
        assert_non_null(m->hashes);
        RepoHash *h = &m->hashes[m->n_hashes++];
        h->cluster = b;
        if (rec->zero) {
            repo_hash_zero_cluster(MIN(cs, m->image_size - b * cs), h->hash);
        } else {
            memcpy(h->hash, rec->hash, 16);
        }
    }
}

/* Read back the index a scan of m just wrote into m->hashes (expanded);
 * its root must be m's, and equal the model's when it has no zero run. */
static void load_index(Repo *r, RepoManifest *m)
{
    Error *err = NULL;
    RepoIndexReader *rd = repo_index_open(r, m, &err);
    RepoIndexRecord rec;
    RepoMerkle mk;
    uint8_t root[32];
    int got;

    die_on(err);
    free(m->hashes);
    m->hashes = NULL;
    m->n_hashes = 0;
    last_zero_runs = 0;
    repo_merkle_init(&mk);
    while ((got = repo_index_next(rd, &rec, &err)) > 0) {
        repo_merkle_add_record(&mk, &rec);
        expand_record(m, &rec);
    }
    die_on(err);
    assert_int_equal(got, 0);
    repo_index_close(rd);
    repo_merkle_final(&mk, root);
    assert_memory_equal(root, m->merkle_root, 32);
    if (!last_zero_runs) {
        Digest d = model_root(m->hashes, m->n_hashes);
        assert_memory_equal(root, d.b, 32);
    }
}

/* m holds the hashes of clusters cl[0..n) of the flat model mdl (an image
 * of size bytes). */
static void check_hashes(const RepoManifest *m, const uint8_t *mdl,
                         uint64_t size, const uint64_t *cl, size_t n)
{
    assert_int_equal(m->n_hashes, n);
    for (size_t i = 0; i < n; i++) {
        uint64_t off = cl[i] * CL;
        uint64_t len = MIN((uint64_t)CL, size - off);
        uint8_t want[16];
        canonical_xxh(mdl + off, len, want);
        assert_int_equal(m->hashes[i].cluster, cl[i]);
        assert_memory_equal(m->hashes[i].hash, want, 16);
    }
}

/* The sum of the lengths of clusters cl[0..n) of an image of size bytes. */
static uint64_t clusters_bytes(uint64_t size, const uint64_t *cl, size_t n)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++) {
        sum += MIN((uint64_t)CL, size - cl[i] * CL);
    }
    return sum;
}

/* Expected hashes of clusters `cl` from the flat model. */
static void check_scan(const RepoManifest *m, const uint64_t *cl, size_t n)
{
    check_hashes(m, model, IMG_SIZE, cl, n);
}

typedef struct ProgressLog {
    unsigned calls;
    uint64_t last_done, total;
} ProgressLog;

/* The thread that runs the tests: progress comes from it only. */
static pthread_t test_thread;

static void progress_cb(void *opaque, uint64_t done, uint64_t total)
{
    ProgressLog *p = opaque;
    assert_true(pthread_equal(pthread_self(), test_thread));
    assert_true(done >= p->last_done);
    assert_true(done <= total);
    p->calls++;
    p->last_done = done;
    p->total = total;
}

/* A new manifest of backup seq of node, taken at time (not set if NULL),
 * at level, over parent_seq, with granularity. */
static RepoManifest *new_manifest(unsigned seq, const char *node,
                                  const char *time, RepoLevel level,
                                  unsigned parent_seq, uint32_t granularity)
{
    RepoManifest *m = calloc(1, sizeof(*m));
    assert_non_null(m);
    m->seq = seq;
    m->node = strdup(node);
    if (time) {
        m->time = strdup(time);
    }
    m->level = level;
    m->parent_seq = parent_seq;
    m->granularity = granularity;
    return m;
}

static void test_scan_and_commit(void **state)
{
    Error *err = NULL;
    _cleanup_free_ char *rp = tpath("r2");
    Repo *r = repo_open(rp, true, &err);
    die_on(err);

    /* A base image outside the repository (its full backup comes first). */
    for (uint64_t i = 0; i < IMG_SIZE; i++) {
        model[i] = (uint8_t)(i / 4096 * 13 + 5);
    }

    /* Backup 1, full: a qcow2 without backing holding the whole image. */
    assert_true(repo_mark_attempt(r, "disk0", 1, &err));
    die_on(err);
    _cleanup_free_ char *tmp1 = repo_tmp_data_path(r, "disk0", 1);
    create_qcow2(tmp1, NULL, NULL, NULL);
    BlockDriverState *bs = bdrv_open_image(tmp1, "qcow2", BDRV_O_RDWR, &err);
    die_on(err);
    assert_int_equal(bdrv_pwrite(bs, 0, model, IMG_SIZE, 0), 0);
    bdrv_unref(bs);

    RepoManifest *m = new_manifest(1, "disk0", "2026-01-01T00:00:00Z",
                                   REPO_LEVEL_FULL, 0, 65536);
    ProgressLog log = { 0 };
    assert_true(repo_scan_backup(r, tmp1, m, 0, progress_cb, &log, &err));
    die_on(err);
    assert_int_equal(m->image_size, IMG_SIZE);
    assert_int_equal(m->cluster_size, CL);
    load_index(r, m);
    uint64_t all[NCL + 1];
    for (uint64_t i = 0; i <= NCL; i++) {
        all[i] = i;
    }
    check_scan(m, all, NCL + 1);
    assert_int_equal(m->changed_bytes, IMG_SIZE);
    assert_true(log.calls >= 2);
    assert_int_equal(log.last_done, IMG_SIZE);
    assert_int_equal(log.total, IMG_SIZE);

    assert_true(repo_commit(r, m, &err));
    die_on(err);
    _cleanup_free_ char *data1 = repo_data_path(r, "disk0", 1);
    _cleanup_free_ char *man1 = repo_manifest_path(r, "disk0", 1);
    _cleanup_free_ char *att1 = tpath("r2/disk0/000001.attempt");
    assert_int_equal(access(data1, F_OK), 0);
    assert_int_equal(access(man1, F_OK), 0);
    assert_int_equal(access(tmp1, F_OK), -1);
    assert_int_equal(access(att1, F_OK), -1);
    assert_int_equal(r->n_backups, 1);
    RepoManifest *f1 = repo_find(r, "disk0", 1, &err);
    die_on(err);
    assert_non_null(f1);
    assert_true(f1->stored_bytes > 0);
    m->stored_bytes = f1->stored_bytes;
    assert_manifest_equal(m, f1);
    assert_ptr_equal(repo_find(r, NULL, 0, &err), f1);   /* the only node */
    /* Committing the same ID again is refused. */
    assert_false(repo_commit(r, m, &err));
    assert_non_null(err);
    error_free(err);
    err = NULL;
    repo_manifest_free(m);

    /* Backup 2, inc: an overlay over 000001.qcow2 with a few clusters:
     * a full cluster, a partial write (COW fills the rest from the
     * backing), a zero write, a run over three clusters, and the short last
     * cluster. */
    assert_true(repo_mark_attempt(r, "disk0", 2, &err));
    die_on(err);
    _cleanup_free_ char *tmp2 = repo_tmp_data_path(r, "disk0", 2);
    create_qcow2(tmp2, "000001.qcow2", "qcow2", NULL);
    bs = bdrv_open_image(tmp2, "qcow2", BDRV_O_RDWR, &err);
    die_on(err);
    img_write(bs, 2 * CL, CL, false);
    img_write(bs, 5 * CL + 100, 100, false);
    img_write(bs, 8 * CL, CL, true);
    img_write(bs, 10 * CL + 4096, 2 * CL, false);
    img_write(bs, 20 * CL + 1024, 1024, false);
    bdrv_unref(bs);

    m = new_manifest(2, "disk0", "2026-01-02T00:00:00Z", REPO_LEVEL_INC, 1,
                     65536);
    m->image_size = IMG_SIZE;
    assert_true(repo_scan_backup(r, tmp2, m, 0, NULL, NULL, &err));
    die_on(err);
    load_index(r, m);
    static const uint64_t inc_cl[] = { 2, 5, 8, 10, 11, 12, 20 };
    check_scan(m, inc_cl, ARRAY_SIZE(inc_cl));
    assert_int_equal(m->changed_bytes,
                     clusters_bytes(IMG_SIZE, inc_cl, ARRAY_SIZE(inc_cl)));
    /* The zero cluster is a zero run (its blocks read as zeroes). */
    assert_int_equal(last_zero_runs, 1);
    assert_int_equal(m->index_records, ARRAY_SIZE(inc_cl));
    uint8_t z[16];
    repo_hash_zero_cluster(CL, z);
    assert_memory_equal(m->hashes[2].hash, z, 16);
    assert_true(repo_commit(r, m, &err));
    die_on(err);
    repo_manifest_free(m);

    /* A size mismatch is refused. */
    _cleanup_free_ char *data2 = repo_data_path(r, "disk0", 2);
    m = new_manifest(2, "disk0", NULL, REPO_LEVEL_FULL, 1, 0);
    m->image_size = IMG_SIZE + CL;
    assert_false(repo_scan_backup(r, data2, m, 0, NULL, NULL, &err));
    assert_non_null(strstr(error_get_pretty(err), "expected"));
    assert_non_null(err);
    error_free(err);
    err = NULL;
    repo_manifest_free(m);

    /* Backup 3 of disk0 with qcow2 clusters of 4 KiB: one small write makes
     * its whole 64 KiB repository cluster count, read through the chain. */
    _cleanup_free_ char *tmp3 = repo_tmp_data_path(r, "disk0", 3);
    create_qcow2(tmp3, "000002.qcow2", "qcow2", "4096");
    bs = bdrv_open_image(tmp3, "qcow2", BDRV_O_RDWR, &err);
    die_on(err);
    img_write(bs, 15 * CL + 8192, 4096, false);
    img_write(bs, 16 * CL + CL - 4096, 8192, false);      /* crosses into 17 */
    bdrv_unref(bs);
    m = new_manifest(3, "disk0", "2026-01-03T00:00:00Z", REPO_LEVEL_DIFF, 1,
                     4096);
    /* Its file names 000002.qcow2: not the chain this manifest describes
     * (repository.md invariant 4), so nothing is read. */
    assert_false(repo_scan_backup(r, tmp3, m, 0, NULL, NULL, &err));
    assert_non_null(err);
    assert_non_null(strstr(error_get_pretty(err),
                           "backup 000003 of disk0: its file names the "
                           "backing file '000002.qcow2' (the file of backup "
                           "000002), but its manifest's parent is backup "
                           "000001: the backing file must be '000001.qcow2'"));
    error_free(err);
    err = NULL;
    m->level = REPO_LEVEL_INC;
    m->parent_seq = 2;
    assert_true(repo_scan_backup(r, tmp3, m, 0, NULL, NULL, &err));
    die_on(err);
    load_index(r, m);
    static const uint64_t diff_cl[] = { 15, 16, 17 };
    check_scan(m, diff_cl, ARRAY_SIZE(diff_cl));
    /* It stores what was written: three 4 KiB clusters. */
    assert_int_equal(m->changed_bytes, 3 * 4096);
    /* A crash before commit: the tmp file and a marker bump max_seq. */
    repo_manifest_free(m);
    assert_true(repo_reload(r, &err));
    assert_int_equal(r->max_seq, 3);
    assert_int_equal(r->n_backups, 2);

    /* Another node in the same repository. */
    assert_true(repo_mark_attempt(r, "disk1", 4, &err));
    _cleanup_free_ char *tmp4 = repo_tmp_data_path(r, "disk1", 4);
    create_qcow2(tmp4, NULL, NULL, NULL);
    m = new_manifest(4, "disk1", "2026-01-04T00:00:00Z", REPO_LEVEL_FULL, 0,
                     65536);
    assert_true(repo_scan_backup(r, tmp4, m, 0, NULL, NULL, &err));
    die_on(err);
    assert_int_equal(m->index_records, 0);
    /* A manifest readers would refuse is not committed. */
    free(m->time);
    m->time = strdup("now");
    assert_false(repo_commit(r, m, &err));
    assert_non_null(err);
    error_free(err);
    err = NULL;
    assert_int_equal(access(tmp4, F_OK), 0);
    free(m->time);
    m->time = strdup("2026-01-04T00:00:00Z");
    assert_true(repo_commit(r, m, &err));
    die_on(err);
    repo_manifest_free(m);

    /* Lookups. */
    assert_int_equal(r->n_backups, 3);
    assert_int_equal(r->max_seq, 4);
    _cleanup_free_ const char **nodes = repo_nodes(r);
    assert_string_equal(nodes[0], "disk0");
    assert_string_equal(nodes[1], "disk1");
    assert_null(nodes[2]);
    RepoManifest *l0 = repo_latest(r, "disk0");
    assert_int_equal(l0->seq, 2);
    assert_int_equal(repo_latest_full(r, "disk0")->seq, 1);
    assert_int_equal(repo_latest(r, "disk1")->seq, 4);
    assert_ptr_equal(repo_parent(r, l0), repo_find(r, "disk0", 1, &err));
    assert_null(repo_find(r, "disk1", 2, &err));
    assert_non_null(strstr(error_get_pretty(err), "no backup 000002 of disk1"));
    error_free(err);
    err = NULL;
    assert_null(repo_find(r, NULL, 0, &err));          /* two nodes */
    assert_non_null(err);
    error_free(err);
    err = NULL;
    size_t n = 0;
    RepoManifest **chain = repo_chain(r, l0, &n, &err);
    die_on(err);
    assert_int_equal(n, 2);
    assert_int_equal(chain[0]->seq, 1);
    assert_int_equal(chain[1]->seq, 2);
    free(chain);
    size_t na;
    unsigned *att = repo_attempts(r, "disk0", &na);
    assert_int_equal(na, 0);       /* 3 never marked; 1, 2 committed */
    free(att);

    /* A missing parent is an error. */
    unlink(man1);
    assert_true(repo_reload(r, &err));
    l0 = repo_latest(r, "disk0");
    assert_null(repo_chain(r, l0, &n, &err));
    assert_non_null(err);
    assert_non_null(strstr(error_get_pretty(err), "missing"));
    error_free(err);
    repo_free(r);
}

/* ---- repo_scan_backup on a pool of threads ----
 *
 * A 37 MiB + 4 KiB image (the last repository cluster is 4 KiB) with
 * scattered allocation: runs of several 4 MiB batches, single clusters, a
 * partial write, a zero write and the short tail.  The scan must equal the
 * flat model with 1, 2, 3 and 8 threads and the default, and be
 * byte-identical to the one-thread result; a top layer with fewer batches
 * than threads and an empty one too; and a read error in the backing chain
 * names the lowest failed batch whatever the thread count.
 */

#define BIG_SIZE ((uint64_t)37 * 1024 * 1024 + 4096)

static uint8_t *big_model;

static void create_sized(const char *path, uint64_t size, const char *backing,
                         const char *cluster_size)
{
    make_qcow2_image((char *)path, size, backing, "qcow2", cluster_size);
}

static void big_write(BlockDriverState *bs, uint64_t off, uint64_t len, bool zero)
{
    assert_true(off + len <= BIG_SIZE);
    model_write(bs, big_model, off, len, zero);
}

typedef struct Collect {
    RepoManifest *m;
    RepoMerkle mk;
} Collect;

static bool collect_sink(void *opaque, const RepoIndexRecord *rec,
                         Error **errp)
{
    Collect *c = opaque;

    repo_merkle_add_record(&c->mk, rec);
    expand_record(c->m, rec);
    return true;
}

/* repo_scan_layer on an image outside a repository, opened with the
 * backing chain its header names (these tests are about hashing), into m
 * (hashes expanded, root, changed bytes). */
static bool scan_file(const char *path, RepoManifest *m, unsigned threads,
                      RepoProgressFn *progress, void *opaque, Error **errp)
{
    BlockDriverState *bs = bdrv_open_image(path, "qcow2", 0, errp);
    Collect c = { .m = m };
    bool ok = false;

    if (bs) {
        m->image_size = bdrv_getlength(bs);
        m->cluster_size = CL;
        repo_merkle_init(&c.mk);
        last_zero_runs = 0;
        ok = repo_scan_layer(bs, path, m->image_size, CL, threads,
                             collect_sink, &c, progress, opaque,
                             &m->changed_bytes, NULL, errp);
        repo_merkle_final(&c.mk, m->merkle_root);
    }
    bdrv_unref(bs);
    return ok;
}

/* The scan of path with `threads` threads (0: the default). */
static RepoManifest *scan_with(const char *path, unsigned threads,
                               ProgressLog *log)
{
    Error *err = NULL;
    RepoManifest *m = calloc(1, sizeof(*m));
    assert_non_null(m);
    bool ok = scan_file(path, m, threads, log ? progress_cb : NULL, log, &err);
    die_on(err);
    assert_true(ok);
    return m;
}

/* m against the flat model: cl[] are the expected cluster indexes. */
static void check_big(const RepoManifest *m, const uint64_t *cl, size_t n)
{
    assert_int_equal(m->image_size, BIG_SIZE);
    check_hashes(m, big_model, BIG_SIZE, cl, n);
    if (!last_zero_runs) {
        Digest d = model_root(m->hashes, m->n_hashes);
        assert_memory_equal(m->merkle_root, d.b, 32);
    }
}

static void assert_scan_identical(const RepoManifest *a, const RepoManifest *b)
{
    assert_int_equal(a->n_hashes, b->n_hashes);
    assert_int_equal(a->n_extents, b->n_extents);
    assert_int_equal(a->changed_bytes, b->changed_bytes);
    if (a->n_hashes) {
        assert_memory_equal(a->hashes, b->hashes, a->n_hashes * sizeof(*a->hashes));
    }
    if (a->n_extents) {
        assert_memory_equal(a->extents, b->extents, a->n_extents * sizeof(*a->extents));
    }
    assert_memory_equal(a->merkle_root, b->merkle_root, 32);
}

/* Make the L2 entry of guest cluster `cl` in the (64 KiB cluster, L1 entry
 * 0) qcow2 at path point to an unaligned host offset: reads there fail
 * with -EIO. */
static void corrupt_l2_entry(const char *path, uint64_t cl)
{
    int fd = open(path, O_RDWR);
    uint8_t b[8];
    assert_true(fd >= 0);
    assert_int_equal(pread(fd, b, 8, 40), 8);            /* l1_table_offset */
    uint64_t l1 = 0, l2 = 0, e = 0;
    for (int i = 0; i < 8; i++) {
        l1 = l1 << 8 | b[i];
    }
    assert_int_equal(pread(fd, b, 8, (off_t)l1), 8);
    for (int i = 0; i < 8; i++) {
        l2 = l2 << 8 | b[i];
    }
    l2 &= UINT64_C(0x00fffffffffffe00);
    assert_true(l2 != 0);
    assert_int_equal(pread(fd, b, 8, (off_t)(l2 + 8 * cl)), 8);
    for (int i = 0; i < 8; i++) {
        e = e << 8 | b[i];
    }
    assert_true((e & UINT64_C(0x00fffffffffffe00)) != 0);
    e |= 0x200;
    for (int i = 7; i >= 0; i--) {
        b[i] = (uint8_t)e;
        e >>= 8;
    }
    assert_int_equal(pwrite(fd, b, 8, (off_t)(l2 + 8 * cl)), 8);
    close(fd);
}

static void test_scan_threads(void **state)
{
    static const unsigned threads[] = { 1, 2, 3, 8, 0 };
    Error *err = NULL;
    _cleanup_free_ char *dir = tpath("threads");
    _cleanup_free_ char *base = tpath("threads/base.qcow2");
    _cleanup_free_ char *top = tpath("threads/top.qcow2");
    _cleanup_free_ char *few = tpath("threads/few.qcow2");
    _cleanup_free_ char *none = tpath("threads/none.qcow2");
    _cleanup_free_ char *small = tpath("threads/small.qcow2");
    BlockDriverState *bs;

    assert_int_equal(mkdir(dir, 0755), 0);
    big_model = malloc(BIG_SIZE);
    assert_non_null(big_model);
    assert_true(repo_hash_threads() >= 1);
    assert_true(repo_hash_threads() <= REPO_DEFAULT_HASH_THREADS);

    /* The base: every cluster written, so all of it is one extent. */
    create_sized(base, BIG_SIZE, NULL, NULL);
    bs = bdrv_open_image(base, "qcow2", BDRV_O_RDWR, &err);
    die_on(err);
    big_write(bs, 0, BIG_SIZE, false);
    bdrv_unref(bs);

    ProgressLog log = { 0 };
    RepoManifest *ref = scan_with(base, 1, &log);
    uint64_t n_all = DIV_ROUND_UP(BIG_SIZE, CL);
    uint64_t *all = calloc(n_all, sizeof(*all));
    for (uint64_t i = 0; i < n_all; i++) {
        all[i] = i;
    }
    check_big(ref, all, n_all);
    assert_int_equal(log.last_done, BIG_SIZE);
    for (size_t t = 1; t < ARRAY_SIZE(threads); t++) {
        ProgressLog tl = { 0 };
        RepoManifest *m = scan_with(base, threads[t], &tl);
        assert_scan_identical(ref, m);
        /* Progress: from the caller's thread (progress_cb asserts that
         * done never goes back), ending at the total. */
        assert_true(tl.calls >= 2);
        assert_int_equal(tl.last_done, BIG_SIZE);
        assert_int_equal(tl.total, BIG_SIZE);
        repo_manifest_free(m);
    }
    repo_manifest_free(ref);
    free(all);

    /* The scattered overlay (64 KiB clusters). */
    create_sized(top, BIG_SIZE, "base.qcow2", NULL);
    bs = bdrv_open_image(top, "qcow2", BDRV_O_RDWR, &err);
    die_on(err);
    big_write(bs, 0, 9 * 1024 * 1024 + CL, false);            /* 3 batches */
    big_write(bs, 12 * 1024 * 1024 + 3 * CL, CL, false);
    big_write(bs, 13 * 1024 * 1024 + 5 * CL, 2 * CL, false);
    big_write(bs, 16 * 1024 * 1024 - CL, 8 * 1024 * 1024 + 2 * CL, false);
    big_write(bs, 26 * 1024 * 1024 + 7 * CL, 5 * CL, false);
    big_write(bs, 33 * 1024 * 1024 + 100, 100, false);          /* COW */
    big_write(bs, 35 * 1024 * 1024, 3 * CL, true);              /* zeroes */
    big_write(bs, BIG_SIZE - 4096, 4096, false);                /* the tail */
    bdrv_unref(bs);

    uint64_t *cl = calloc(n_all, sizeof(*cl));
    size_t n = 0;
    for (uint64_t i = 0; i < (9 * 1024 * 1024 + CL) / CL; i++) {
        cl[n++] = i;
    }
    cl[n++] = 12 * 16 + 3;
    cl[n++] = 13 * 16 + 5;
    cl[n++] = 13 * 16 + 6;
    for (uint64_t i = 16 * 16 - 1; i < 16 * 16 - 1 + 8 * 16 + 2; i++) {
        cl[n++] = i;
    }
    for (uint64_t i = 26 * 16 + 7; i < 26 * 16 + 12; i++) {
        cl[n++] = i;
    }
    cl[n++] = 33 * 16;
    cl[n++] = 35 * 16;
    cl[n++] = 35 * 16 + 1;
    cl[n++] = 35 * 16 + 2;
    cl[n++] = 37 * 16;
    ref = scan_with(top, 1, NULL);
    check_big(ref, cl, n);
    assert_int_equal(last_zero_runs, 1);      /* the three zero clusters */
    assert_int_equal(ref->changed_bytes, clusters_bytes(BIG_SIZE, cl, n));
    for (size_t t = 1; t < ARRAY_SIZE(threads); t++) {
        ProgressLog tl = { 0 };
        RepoManifest *m = scan_with(top, threads[t], &tl);
        assert_scan_identical(ref, m);
        /* Progress counts the bytes read, not the zero run's. */
        assert_int_equal(tl.last_done, m->changed_bytes - 3 * CL);
        assert_int_equal(tl.total, m->changed_bytes - 3 * CL);
        repo_manifest_free(m);
    }
    repo_manifest_free(ref);

    /* Fewer batches than threads: two single clusters, then nothing. */
    create_sized(few, BIG_SIZE, "base.qcow2", NULL);
    bs = bdrv_open_image(few, "qcow2", BDRV_O_RDWR, &err);
    die_on(err);
    big_write(bs, 5 * CL, CL, false);
    big_write(bs, BIG_SIZE - 4096, 4096, false);
    bdrv_unref(bs);
    static const uint64_t few_cl[] = { 5, 37 * 16 };
    for (size_t t = 0; t < ARRAY_SIZE(threads); t++) {
        ProgressLog tl = { 0 };
        RepoManifest *m = scan_with(few, threads[t], &tl);
        check_big(m, few_cl, ARRAY_SIZE(few_cl));
        assert_int_equal(tl.last_done, CL + 4096);
        repo_manifest_free(m);
    }
    create_sized(none, BIG_SIZE, "base.qcow2", NULL);
    for (size_t t = 0; t < ARRAY_SIZE(threads); t++) {
        ProgressLog tl = { 0 };
        RepoManifest *m = scan_with(none, threads[t], &tl);
        assert_int_equal(m->n_hashes, 0);
        assert_int_equal(m->n_extents, 0);
        assert_int_equal(tl.last_done, 0);
        repo_manifest_free(m);
    }

    /* A read error in the backing file: an overlay with 4 KiB clusters
     * reads the rest of each 64 KiB cluster from the base, where two L2
     * entries are corrupt.  The error names the lower one's batch. */
    create_sized(small, BIG_SIZE, "base.qcow2", "4096");
    bs = bdrv_open_image(small, "qcow2", BDRV_O_RDWR, &err);
    die_on(err);
    for (uint64_t c = 3; c < 37 * 16; c += 29) {
        big_write(bs, c * CL + 8192, 4096, false);
    }
    bdrv_unref(bs);
    corrupt_l2_entry(base, 3 + 29 * 7);
    corrupt_l2_entry(base, 3 + 29 * 15);
    for (size_t t = 0; t < ARRAY_SIZE(threads); t++) {
        RepoManifest *m = calloc(1, sizeof(*m));
        assert_false(scan_file(small, m, threads[t], NULL, NULL, &err));
        assert_non_null(err);
        char want[64];
        snprintf(want, sizeof(want), "read error at offset %" PRIu64,
                 (uint64_t)(3 + 29 * 7) * CL);
        if (!strstr(error_get_pretty(err), want)) {
            fail_msg("threads %u: '%s' lacks '%s'", threads[t],
                     error_get_pretty(err), want);
        }
        error_free(err);
        err = NULL;
        repo_manifest_free(m);
    }

    free(cl);
    free(big_model);
    big_model = NULL;
}

static int setup(void **state)
{
    srandom(12345);
    test_thread = pthread_self();
    return tmpdir_create("repo");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_merkle),
        cmocka_unit_test(test_hash_zero),
        cmocka_unit_test(test_manifest_round_trip),
        cmocka_unit_test(test_manifest_text_limit),
        cmocka_unit_test(test_manifest_rejects),
        cmocka_unit_test(test_parse_id),
        cmocka_unit_test(test_open),
        cmocka_unit_test(test_open_uuid),
        cmocka_unit_test(test_scan_and_commit),
        cmocka_unit_test(test_scan_threads),
    };
    return cmocka_run_group_tests(tests, setup, tmpdir_teardown);
}
