/*
 * Shared helpers of the cmocka unit tests (tests/unit/test-*.c): the
 * test's temporary folder and paths in it, image creation, and error
 * checks.  Every helper that checks something fails the running test
 * (cmocka's fail_msg and assert_*) instead of returning an error.
 * Include it after <cmocka.h>.
 */
#ifndef BITBACK_TEST_UTIL_H
#define BITBACK_TEST_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

/* The test's temporary folder, set by tmpdir_create(). */
extern char tmpdir[64];

/* Create /tmp/bitback-test-NAME-XXXXXX as tmpdir: 0, or -1 (with perror). */
int tmpdir_create(const char *name);

/* Remove tmpdir and all in it: 0, or -1 (with a message). */
int tmpdir_remove(void);

/* A cmocka group teardown that only calls tmpdir_remove(). */
int tmpdir_teardown(void **state);

/* TMPDIR/NAME, malloc'ed. */
char *tpath(const char *name);

/* TMPDIR/STEM-N, malloc'ed; N counts up, so each call names a new file. */
char *tpath_unique(const char *stem);

/* Fail the test with err's message if err is set. */
void die_on(Error *err);

/* Create an image of format fmt ("raw", "qbm", ...) and size bytes at
 * path; returns path (the caller keeps owning it). */
char *make_image(char *path, const char *fmt, uint64_t size);

/* Create a qcow2 image of size bytes at path; over the backing file
 * `backing` (format backing_fmt) and with cluster_size (a size string such
 * as "4096") when they are not NULL.  Returns path (the caller keeps
 * owning it). */
char *make_qcow2_image(char *path, uint64_t size, const char *backing,
                       const char *backing_fmt, const char *cluster_size);

/* ok is false and *errp says `part`; *errp is freed and reset. */
void expect_error(bool ok, Error **errp, const char *part);

/* The first size bytes of the file at path, malloc'ed. */
uint8_t *read_file(const char *path, size_t size);

/* A memfd named `name` holding data[0..size), read/write from offset 0:
 * its fd (the caller closes it). */
int memfd_with(const char *name, const void *data, size_t size);

void sleep_ms(int ms);

#endif
