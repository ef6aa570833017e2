/*
 * Shared helpers of the cmocka unit tests: see test-util.h.
 */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "block/block.h"
#include "util/cleanup.h"
#include "test-util.h"

char tmpdir[64];
static int unique_counter;

int tmpdir_create(const char *name)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/bitback-test-%s-XXXXXX", name);
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return -1;
    }
    return 0;
}

int tmpdir_remove(void)
{
    char cmd[sizeof(tmpdir) + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) {
        fprintf(stderr, "could not remove %s\n", tmpdir);
        return -1;
    }
    return 0;
}

int tmpdir_teardown(void **state)
{
    (void)state;
    return tmpdir_remove();
}

char *tpath(const char *name)
{
    char *p = NULL;
    assert_true(asprintf(&p, "%s/%s", tmpdir, name) > 0);
    return p;
}

char *tpath_unique(const char *stem)
{
    char *p = NULL;
    assert_true(asprintf(&p, "%s/%s-%d", tmpdir, stem, unique_counter++) > 0);
    return p;
}

void die_on(Error *err)
{
    if (err) {
        fail_msg("%s", error_get_pretty(err));
    }
}

char *make_image(char *path, const char *fmt, uint64_t size)
{
    Error *err = NULL;
    bool ok = bdrv_img_create(path, fmt, size, NULL, &err);
    die_on(err);
    assert_true(ok);
    return path;
}

char *make_qcow2_image(char *path, uint64_t size, const char *backing,
                       const char *backing_fmt, const char *cluster_size)
{
    _cleanup_json_ struct json_object *opts = json_object_new_object();
    Error *err = NULL;

    if (backing) {
        json_object_object_add(opts, "backing_file", json_object_new_string(backing));
        json_object_object_add(opts, "backing_fmt", json_object_new_string(backing_fmt));
    }
    if (cluster_size) {
        json_object_object_add(opts, "cluster_size", json_object_new_string(cluster_size));
    }
    bool ok = bdrv_img_create(path, "qcow2", size, opts, &err);
    die_on(err);
    assert_true(ok);
    return path;
}

void expect_error(bool ok, Error **errp, const char *part)
{
    assert_false(ok);
    assert_non_null(*errp);
    if (!strstr(error_get_pretty(*errp), part)) {
        fail_msg("'%s' lacks '%s'", error_get_pretty(*errp), part);
    }
    error_free(*errp);
    *errp = NULL;
}

uint8_t *read_file(const char *path, size_t size)
{
    uint8_t *buf = malloc(size);
    assert_non_null(buf);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(pread(fd, buf, size, 0), (ssize_t)size);
    close(fd);
    return buf;
}

int memfd_with(const char *name, const void *data, size_t size)
{
    int fd = memfd_create(name, MFD_CLOEXEC);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, data, size, 0), (ssize_t)size);
    return fd;
}

void sleep_ms(int ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000 };
    nanosleep(&ts, NULL);
}
