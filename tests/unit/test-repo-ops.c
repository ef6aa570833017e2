/*
 * Unit tests of the repository's operations (src/repo/ops.h: restore,
 * verify, prune), called directly, without the CLI.  Each builds a small
 * chain with the library (scan + commit) while keeping a naive model: a
 * byte array per point in time, written the same way as the image.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "repo/ops.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "test-util.h"

#define CL REPO_CLUSTER_SIZE
#define NCL 24
#define IMG_SIZE ((uint64_t)NCL * CL + 3072)   /* last cluster is short */
#define POINTS 3

/* model[p]: the image at backup p + 1. */
static uint8_t model[POINTS][IMG_SIZE];

static void fill_random(uint8_t *buf, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        buf[i] = (uint8_t)(random() >> 7);
    }
}

/* Write len bytes at off into the image and into the model of point p
 * (random data, or zeroes). */
static void img_write(BlockDriverState *bs, unsigned p, uint64_t off,
                      uint64_t len, bool zero)
{
    if (zero) {
        memset(model[p] + off, 0, len);
        assert_int_equal(bdrv_pwrite_zeroes(bs, off, len, 0), 0);
    } else {
        fill_random(model[p] + off, len);
        assert_int_equal(bdrv_pwrite(bs, off, model[p] + off, len, 0), 0);
    }
}

/* Commit backup seq of disk0 (a full when seq == 1, else an inc over
 * seq - 1) whose writes are `write`'s, into the model of point seq - 1. */
static void make_backup(Repo *r, unsigned seq,
                        void (*write)(BlockDriverState *bs, unsigned p))
{
    Error *err = NULL;
    _cleanup_free_ char *tmp = repo_tmp_data_path(r, "disk0", seq);
    struct json_object *opts = json_object_new_object();
    char parent[32];

    if (seq > 1) {
        snprintf(parent, sizeof(parent), "%06u.qcow2", seq - 1);
        json_object_object_add(opts, "backing_file",
                               json_object_new_string(parent));
        json_object_object_add(opts, "backing_fmt",
                               json_object_new_string("qcow2"));
        memcpy(model[seq - 1], model[seq - 2], IMG_SIZE);
    }
    assert_true(repo_mark_attempt(r, "disk0", seq, &err));
    assert_true(bdrv_img_create(tmp, "qcow2", IMG_SIZE, opts, &err));
    die_on(err);
    json_object_put(opts);
    BlockDriverState *bs = bdrv_open_image(tmp, "qcow2", BDRV_O_RDWR, &err);
    die_on(err);
    write(bs, seq - 1);
    bdrv_unref(bs);

    RepoManifest *m = calloc(1, sizeof(*m));
    m->seq = seq;
    m->node = strdup("disk0");
    m->time = strdup("2026-01-01T00:00:00Z");
    m->level = seq > 1 ? REPO_LEVEL_INC : REPO_LEVEL_FULL;
    m->parent_seq = seq - 1;
    m->granularity = CL;
    assert_true(repo_scan_backup(r, tmp, m, 0, NULL, NULL, &err));
    die_on(err);
    assert_true(repo_commit(r, m, &err));
    die_on(err);
    repo_manifest_free(m);
}

/* Point 1: data everywhere but a zero cluster and a hole. */
static void write_full(BlockDriverState *bs, unsigned p)
{
    img_write(bs, p, 0, 6 * CL, false);
    img_write(bs, p, 6 * CL, CL, true);
    img_write(bs, p, 9 * CL, IMG_SIZE - 9 * CL, false);
}

/* Point 2: a whole cluster, a partial one, a zeroed one, the short tail. */
static void write_inc1(BlockDriverState *bs, unsigned p)
{
    img_write(bs, p, 2 * CL, CL, false);
    img_write(bs, p, 4 * CL + 100, 300, false);
    img_write(bs, p, 10 * CL, CL, true);
    img_write(bs, p, NCL * CL + 10, 1000, false);
}

/* Point 3: a run over clusters, into the hole of point 1. */
static void write_inc2(BlockDriverState *bs, unsigned p)
{
    img_write(bs, p, 7 * CL + 4096, 2 * CL, false);
    img_write(bs, p, 3 * CL, 512, false);
}

static Repo *make_repo(const char *name, unsigned points)
{
    static void (*const writes[POINTS])(BlockDriverState *, unsigned) = {
        write_full, write_inc1, write_inc2,
    };
    _cleanup_free_ char *rp = tpath(name);
    Error *err = NULL;
    Repo *r = repo_open(rp, true, &err);

    die_on(err);
    memset(model, 0, sizeof(model));
    for (unsigned s = 1; s <= points; s++) {
        make_backup(r, s, writes[s - 1]);
    }
    return r;
}

typedef struct ProgressLog {
    unsigned begins, ends;
    uint64_t last_done, total;
} ProgressLog;

static void *log_begin(void *opaque, const char *label, uint64_t total)
{
    ProgressLog *l = opaque;

    l->begins++;
    l->total = total;
    return l;
}

static void log_update(void *opaque, uint64_t done, uint64_t total)
{
    ProgressLog *l = opaque;

    assert_true(done >= l->last_done);
    l->last_done = done;
}

static void log_end(void *step)
{
    ((ProgressLog *)step)->ends++;
}

/* Restore point seq as raw and compare it with the model. */
static void check_restore(Repo *r, unsigned seq, const uint8_t *want)
{
    _cleanup_free_ char *out = tpath_unique("restored");
    ProgressLog log = { 0 };
    RepoProgressOps ops = { log_begin, log_update, log_end, &log };
    Error *err = NULL;
    uint64_t written = 0;
    RepoManifest *m = repo_find(r, "disk0", seq, &err);

    die_on(err);
    assert_true(repo_restore(r, m, out, "raw", &ops, &written, &err));
    die_on(err);
    assert_int_equal(log.begins, 1);
    assert_int_equal(log.ends, 1);
    assert_int_equal(log.last_done, IMG_SIZE);
    assert_true(written > 0 && written <= IMG_SIZE);
    _cleanup_free_ uint8_t *got = read_file(out, IMG_SIZE);
    assert_memory_equal(got, want, IMG_SIZE);
    unlink(out);
}

static void test_restore_chain(void **state)
{
    Repo *r = make_repo("restore", 2);
    Error *err = NULL;

    check_restore(r, 1, model[0]);
    check_restore(r, 2, model[1]);
    /* The points differ, so each restore really read its own chain. */
    assert_memory_not_equal(model[0], model[1], IMG_SIZE);

    /* An existing output is replaced only by the caller's choice: the
     * library writes a tmp file and renames over it. */
    assert_string_equal(repo_pick_node(r, NULL, &err), "disk0");
    assert_null(repo_pick_node(r, "nope", &err));
    expect_error(false, &err, "no backups of disk 'nope'");
    repo_free(r);
}

/* What a verification found. */
typedef struct Found {
    RepoVerify v;
    unsigned n;
    int64_t offset;
    char kind[32];
    char id[REPO_ID_LEN];
} Found;

static void found_problem(RepoVerify *v, const RepoManifest *m,
                          int64_t offset, const char *kind, const char *msg)
{
    Found *f = (Found *)v;

    if (f->n++ == 0) {
        f->offset = offset;
        snprintf(f->kind, sizeof(f->kind), "%s", kind);
        snprintf(f->id, sizeof(f->id), "%s", m->id);
    }
}

static uint64_t verify_all(Repo *r, Found *f)
{
    *f = (Found){ .v.problem = found_problem };
    for (size_t i = 0; i < r->n_backups; i++) {
        repo_verify_stored(&f->v, r, r->backups[i]);
    }
    assert_int_equal(f->v.backups_checked, r->n_backups);
    assert_int_equal(f->v.problems, f->n);
    return f->n;
}

static void test_verify(void **state)
{
    Repo *r = make_repo("verify", 2);
    Found f;
    Error *err = NULL;

    /* Clean: nothing reported, every stored byte read. */
    assert_int_equal(verify_all(r, &f), 0);
    assert_true(f.v.bytes_read > 0);

    /* The target check against a restored image is clean too. */
    _cleanup_free_ char *out = tpath("verify-target.raw");
    RepoManifest *m2 = repo_find(r, "disk0", 2, &err);
    assert_true(repo_restore(r, m2, out, "raw", NULL, NULL, &err));
    die_on(err);
    f = (Found){ .v.problem = found_problem };
    assert_true(repo_verify_against(&f.v, r, m2, out, &err));
    die_on(err);
    assert_int_equal(f.n, 0);

    /* Flip one byte of cluster 11 of backup 1 inside its qcow2 file: find
     * the cluster's data by its (random) content. */
    const uint64_t cl = 11, at = 1234;
    _cleanup_free_ char *data1 = repo_data_path(r, "disk0", 1);
    int fd = open(data1, O_RDWR);
    assert_true(fd >= 0);
    off_t fsize = lseek(fd, 0, SEEK_END);
    _cleanup_free_ uint8_t *file = malloc(fsize);
    assert_int_equal(pread(fd, file, fsize, 0), fsize);
    uint8_t *hit = memmem(file, fsize, model[0] + cl * CL, CL);
    assert_non_null(hit);
    uint8_t b = hit[at] ^ 0x40;
    assert_int_equal(pwrite(fd, &b, 1, (hit - file) + at), 1);
    close(fd);

    assert_true(verify_all(r, &f) > 0);
    assert_string_equal(f.kind, "data");
    assert_string_equal(f.id, "000001");
    assert_int_equal(f.offset, cl * CL);
    /* Only backup 1's cluster: a data mismatch and the root of the data. */
    assert_int_equal(f.n, 2);

    /* The target still matches the manifests; after flipping the same
     * guest byte in it, the target check names that cluster. */
    fd = open(out, O_RDWR);
    assert_true(fd >= 0);
    b = model[1][cl * CL + at] ^ 0x40;
    assert_int_equal(pwrite(fd, &b, 1, cl * CL + at), 1);
    close(fd);
    f = (Found){ .v.problem = found_problem };
    assert_true(repo_verify_against(&f.v, r, m2, out, &err));
    die_on(err);
    assert_int_equal(f.n, 1);
    assert_int_equal(f.offset, cl * CL);
    repo_free(r);
}

typedef struct Events {
    unsigned rolled, merged, deleted;
    char merged_id[REPO_ID_LEN];
} Events;

static void count_event(void *opaque, RepoPruneEvent ev, const char *node,
                        const char *id)
{
    Events *e = opaque;

    assert_string_equal(node, "disk0");
    switch (ev) {
    case REPO_PRUNE_ROLLED:
        e->rolled++;
        break;
    case REPO_PRUNE_MERGED:
        e->merged++;
        snprintf(e->merged_id, sizeof(e->merged_id), "%s", id);
        break;
    case REPO_PRUNE_DELETED:
        e->deleted++;
        break;
    }
}

static void test_prune(void **state)
{
    Repo *r = make_repo("prune", 3);
    ProgressLog log = { 0 };
    RepoProgressOps ops = { log_begin, log_update, log_end, &log };
    RepoPruneResult res;
    Events ev = { 0 };
    Error *err = NULL;
    Found f;
    RepoKeepOptions keep2 = { .count[REPO_KEEP_LAST] = 2 };

    /* Before: every point restores as its model. */
    for (unsigned s = 1; s <= 3; s++) {
        check_restore(r, s, model[s - 1]);
    }
    assert_true(repo_prune_node(r, "disk0", &keep2, &ops, count_event, &ev,
                                &res, &err));
    die_on(err);
    assert_int_equal(res.kept, 2);
    assert_int_equal(res.merged, 1);
    assert_int_equal(res.deleted, 1);
    assert_int_equal(res.rolled, 0);
    assert_int_equal(ev.merged, 1);
    assert_int_equal(ev.deleted, 1);
    assert_string_equal(ev.merged_id, "000002");
    assert_int_equal(log.begins, 1);      /* one merge */
    assert_int_equal(log.ends, 1);

    /* After: backup 1 is gone, 2 is a synthetic full, and the kept points
     * restore exactly as before. */
    assert_int_equal(r->n_backups, 2);
    assert_null(repo_find(r, "disk0", 1, &err));
    expect_error(false, &err, "000001");
    RepoManifest *m2 = repo_find(r, "disk0", 2, &err);
    die_on(err);
    assert_true(m2->synthetic);
    assert_int_equal(m2->parent_seq, 0);
    assert_int_equal(m2->level, REPO_LEVEL_FULL);
    check_restore(r, 2, model[1]);
    check_restore(r, 3, model[2]);
    assert_int_equal(verify_all(r, &f), 0);

    /* Pruning again changes nothing. */
    ev = (Events){ 0 };
    assert_true(repo_prune_node(r, "disk0", &keep2, NULL, count_event, &ev,
                                &res, &err));
    die_on(err);
    assert_int_equal(ev.merged + ev.deleted + ev.rolled, 0);
    check_restore(r, 3, model[2]);
    repo_free(r);
}

static int setup(void **state)
{
    srandom(4242);
    return tmpdir_create("repo-ops");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_restore_chain),
        cmocka_unit_test(test_verify),
        cmocka_unit_test(test_prune),
    };
    return cmocka_run_group_tests(tests, setup, tmpdir_teardown);
}
