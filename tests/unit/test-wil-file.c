/*
 * test-write-intent.c's log in the file IMAGE.wil (test-wil-backend.h):
 * nodes open as bitbackd opens them, nothing redirected.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <cmocka.h>

#include "block/block.h"
#include "util/cleanup.h"
#include "test-util.h"
#include "test-wil-backend.h"

const char *const wil_backend_name = "file";

int wil_backend_init(void)
{
    return 0;
}

int wil_backend_done(int r)
{
    return r;
}

BlockDriverState *wil_backend_open(const char *img, bool writable,
                                   uint64_t region_size)
{
    Error *err = NULL;
    BlockDriverState *bs;

    if (writable) {
        _cleanup_json_ struct json_object *o = json_object_new_object();

        json_object_object_add(o, "driver", json_object_new_string("qbm"));
        json_object_object_add(o, "filename", json_object_new_string(img));
        json_object_object_add(o, "crash-safe-region-size",
                               json_object_new_int64((int64_t)region_size));
        bs = bdrv_open_options(o, BDRV_O_RDWR, &err);
    } else {
        bs = bdrv_open_image(img, "qbm", 0, &err);
    }
    die_on(err);
    return bs;
}

static char *wil_of(const char *img)
{
    char *p = NULL;

    assert_true(asprintf(&p, "%s.wil", img) > 0);
    return p;
}

/* Read to the end of the file, front to back (so the map before the
 * slots, as a reader of the spec must), whatever it grew to meanwhile. */
uint8_t *wil_backend_read_log(const char *img, size_t *ret_len)
{
    _cleanup_free_ char *path = wil_of(img);
    _cleanup_close_ int fd = open(path, O_RDONLY);
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;

    if (fd < 0) {
        return NULL;
    }
    for (;;) {
        ssize_t n;

        if (cap - len < 65536) {
            cap = cap * 2 + 65536;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
        n = read(fd, buf + len, cap - len);
        assert_true(n >= 0);
        if (n == 0) {
            break;
        }
        len += (size_t)n;
    }
    *ret_len = len;
    return buf;
}

void wil_backend_remove_log(const char *img)
{
    _cleanup_free_ char *path = wil_of(img);

    assert_int_equal(unlink(path), 0);
}

void wil_backend_copy_log(const char *from, const char *to)
{
    /* The crash copy (cp -a of the image's files) took IMAGE.wil too;
     * from's log as it is now replaces it (it may be another image's
     * copy: a log from an earlier moment). */
    _cleanup_free_ char *path = wil_of(to);
    size_t len = 0;
    _cleanup_free_ uint8_t *log = wil_backend_read_log(from, &len);
    int fd = open(path, O_WRONLY | O_TRUNC);

    assert_non_null(log);
    assert_true(fd >= 0);
    assert_true(write(fd, log, len) == (ssize_t)len);
    assert_int_equal(close(fd), 0);
}

const struct CMUnitTest *wil_backend_tests(size_t *ret_count)
{
    *ret_count = 0;
    return NULL;
}
