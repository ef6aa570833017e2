/*
 * Where test-write-intent.c's checks find the write-intent log of an
 * image: one implementation per store (block/wil-store.h).
 * test-wil-file.c (the test test-write-intent): IMAGE.wil, opened as
 * every node opens it.  test-wil-rados.c (test-wil-rados, run by
 * tests/integration/test_rados_wil.py): a RADOS object per image, through
 * BlockDriver.open_intent_store, plus checks of its own.
 * Every function fails the running test instead of returning an error.
 */
#ifndef BITBACK_TEST_WIL_BACKEND_H
#define BITBACK_TEST_WIL_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "block/block.h"

/* The store's name for messages ("file", "rados"). */
extern const char *const wil_backend_name;

/* Before any test: 0, or -1 with a message on stderr (the RADOS backend
 * without a cluster: it fails, never skips). */
int wil_backend_init(void);
/* After the tests, with their result r (0: all passed): r, or 1 if the
 * backend's own cleanup failed. */
int wil_backend_done(int r);

/* The qbm image at img opened crash-safe, its log in this store: writable
 * (BDRV_O_RDWR, 64 KiB regions: region_size) or read-only (recovery
 * only). */
BlockDriverState *wil_backend_open(const char *img, bool writable,
                                   uint64_t region_size);

/* The bytes of img's log now (malloc'ed, *ret_len), NULL when it has
 * none. */
uint8_t *wil_backend_read_log(const char *img, size_t *ret_len);

/* Remove img's log. */
void wil_backend_remove_log(const char *img);

/* After the image's files were copied from `from` to `to` as a crash
 * leaves them: give `to` a copy of from's log as it is now. */
void wil_backend_copy_log(const char *from, const char *to);

/* Helpers of test-write-intent.c for the backends' own tests: a new qbm
 * image of 16 MiB (its path, malloc'ed); a writable node on img with the
 * persistent bitmap b0 (64 KiB) and its log started; a "crash" copy of
 * the newest image's files and log into tmpdir/DIR (the copy's path). */
char *wil_test_new_image(void);
BlockDriverState *wil_test_open_with_b0(const char *img);
char *wil_test_crash_copy(const char *dir);

/* The backend's own tests (may be none). */
const struct CMUnitTest *wil_backend_tests(size_t *ret_count);

#endif
