/*
 * The rados storage backend of the repository (src/repo/storage-rados.c)
 * against a real cluster: BITBACK_TEST_CEPH_CONF names its conf and
 * BITBACK_TEST_CEPH_POOL a pool; without them it fails (it is run by
 * tests/integration/test_rados_repo.py, never skipped, and not registered
 * in meson's test list).
 *
 * Checked against a naive model (the bytes written): small files through
 * write_tmp/read/replace/rename, a streamed object larger than one atomic
 * write renamed piece by piece (rrepo_copy_large), the folder listing
 * (the marker and folders at the root, no RBD object), bounded reads, and
 * names outside the attached root refused.
 */
#include <errno.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "block/rados-obj.h"
#include "repo/storage.h"
#include "util/cleanup.h"

static char *root;
static const RepoStorage *st = &repo_storage_rados;

static char *path_of(const char *name)
{
    char *p;
    assert_true(asprintf(&p, "%s/%s", root, name) > 0);
    return p;
}

static void test_small_files(void **state)
{
    _cleanup_free_ char *a = path_of("n/.000001.json.tmp");
    _cleanup_free_ char *b = path_of("n/000001.json");
    Error *err = NULL;
    size_t len;
    RepoStat rs;

    assert_true(st->write_tmp(a, "{\"x\":1}", 7, &err));
    assert_int_equal(st->rename(a, b), 0);
    assert_int_equal(st->stat(a, &rs), -ENOENT);
    assert_int_equal(st->stat(b, &rs), 0);
    assert_true(rs.is_regular && rs.size == 7);
    char *text = st->read(b, 64, &len, &err);
    assert_non_null(text);
    assert_int_equal(len, 7);
    assert_string_equal(text, "{\"x\":1}");
    free(text);
    /* Bounded: a file above max is refused, nothing allocated for it. */
    assert_null(st->read(b, 6, &len, &err));
    assert_non_null(err);
    error_free(err);
    err = NULL;
    assert_true(st->replace(b, "{}", 2, &err));
    text = st->read(b, 64, &len, &err);
    assert_string_equal(text, "{}");
    free(text);
    /* The folder "n" exists and lists the file. */
    _cleanup_free_ char *n = path_of("n");
    assert_int_equal(st->stat(n, &rs), 0);
    assert_true(rs.is_dir);
    assert_int_equal(st->remove(b), 0);
    assert_int_equal(st->remove(b), -ENOENT);
}

typedef struct Names {
    char seen[8][64];
    int n;
} Names;

static bool collect(void *opaque, const char *name)
{
    Names *ns = opaque;
    if (ns->n < 8) {
        snprintf(ns->seen[ns->n++], 64, "%s", name);
    }
    return true;
}

static void test_listing(void **state)
{
    _cleanup_free_ char *m = path_of("bitback-repo.json");
    _cleanup_free_ char *f = path_of("node1/000001.json");
    Error *err = NULL;
    Names ns = { .n = 0 };

    assert_true(st->write_tmp(m, "{}", 2, &err));
    assert_true(st->write_tmp(f, "{}", 2, &err));
    assert_int_equal(st->list(root, collect, &ns), 0);
    /* The marker and the folder only: rbd_directory and other objects
     * without '/' are RBD's, not the repository's. */
    assert_int_equal(ns.n, 2);
    bool marker = false, node = false;
    for (int i = 0; i < ns.n; i++) {
        marker |= !strcmp(ns.seen[i], "bitback-repo.json");
        node |= !strcmp(ns.seen[i], "node1");
    }
    assert_true(marker && node);
    ns.n = 0;
    _cleanup_free_ char *dir = path_of("node1");
    assert_int_equal(st->list(dir, collect, &ns), 0);
    assert_int_equal(ns.n, 1);
    assert_string_equal(ns.seen[0], "000001.json");
    assert_int_equal(st->remove(m), 0);
    assert_int_equal(st->remove(f), 0);
}

/* A streamed file larger than one atomic write, renamed: every byte
 * arrives (the model: a counter pattern), the source is gone. */
static void test_large_rename(void **state)
{
    _cleanup_free_ char *a = path_of("n/.000002.idx.tmp");
    _cleanup_free_ char *b = path_of("n/000002-0123456789abcdef.idx");
    const size_t piece = 1u << 20;
    const uint64_t size = RADOS_OBJ_MAX_WRITE_FULL + 3 * piece + 123;
    _cleanup_free_ uint8_t *buf = malloc(piece);
    Error *err = NULL;
    uint64_t got_size;

    RepoFile *f = st->create(a, &err);
    assert_non_null(f);
    for (uint64_t off = 0; off < size; off += piece) {
        size_t n = (size_t)(size - off < piece ? size - off : piece);
        for (size_t i = 0; i < n; i++) {
            buf[i] = (uint8_t)((off + i) * 7 / 3);
        }
        assert_int_equal(st->append(f, buf, n), 0);
    }
    assert_true(st->finish(f, &err));
    assert_int_equal(st->rename(a, b), 0);
    RepoStat rs;
    assert_int_equal(st->stat(a, &rs), -ENOENT);
    f = st->open(b, &got_size, &err);
    assert_non_null(f);
    assert_int_equal(got_size, size);
    for (uint64_t off = 0; off < size; off += piece) {
        size_t n = (size_t)(size - off < piece ? size - off : piece);
        assert_int_equal(st->pread(f, buf, n, off), 0);
        for (size_t i = 0; i < n; i++) {
            if (buf[i] != (uint8_t)((off + i) * 7 / 3)) {
                fail_msg("byte %" PRIu64 " differs", off + i);
            }
        }
    }
    /* Past the end: -EIO, as for a short local file. */
    assert_int_equal(st->pread(f, buf, 16, size - 8), -EIO);
    st->close(f);
    assert_int_equal(st->remove(b), 0);
}

static void test_outside_root(void **state)
{
    Error *err = NULL;
    RepoStat rs;
    size_t len;

    assert_int_equal(st->stat("rbd:otherpool/n/000001.json", &rs), -ENOENT);
    assert_null(st->read("/etc/passwd", 64, &len, &err));
    assert_non_null(err);
    error_free(err);
    err = NULL;
    /* block_name: only data files of this repository. */
    _cleanup_free_ char *j = path_of("n/000001.json");
    assert_null(st->block_name(root, j, &err));
    error_free(err);
    err = NULL;
    assert_null(st->block_name(root, "rbd:otherpool/n/000001.qcow2", &err));
    error_free(err);
    err = NULL;
    _cleanup_free_ char *q = path_of("a:b@c/000001.qcow2");
    _cleanup_free_ char *name = st->block_name(root, q, &err);
    assert_non_null(name);
    /* '/' encoded, ':' and '@' escaped for the rbd: parser. */
    assert_non_null(strstr(name, "/a\\:b\\@c%2F000001.qcow2:conf="));
}

int main(void)
{
    const char *conf = getenv("BITBACK_TEST_CEPH_CONF");
    const char *pool = getenv("BITBACK_TEST_CEPH_POOL");
    Error *err = NULL;
    _cleanup_free_ char *spec = NULL;

    if (!conf || !pool) {
        fprintf(stderr, "BITBACK_TEST_CEPH_CONF and BITBACK_TEST_CEPH_POOL "
                "must name a cluster's conf and a pool\n");
        return 1;
    }
    if (asprintf(&spec, "rbd:%s:conf=%s", pool, conf) < 0 ||
        !repo_storage_rados_attach(spec, &root, &err)) {
        error_report_err(err);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_small_files),
        cmocka_unit_test(test_listing),
        cmocka_unit_test(test_large_rename),
        cmocka_unit_test(test_outside_root),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    repo_storage_rados_detach(root);
    free(root);
    return r;
}
