/*
 * Unit tests of util/log.c: level names, the threshold, the readable and
 * the journal prefixes (JOURNAL_STREAM must name stderr itself), one line
 * per event even with embedded newlines or concurrent threads, and the
 * rate limit's count of suppressed lines.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util/error.h"
#include "util/log.h"

#define THREADS 4
#define LINES_PER_THREAD 2000

static int saved_stderr = -1;
static char path[64];

/* Send stderr to a fresh temporary file. */
static int capture_start(void **state)
{
    (void)state;
    snprintf(path, sizeof(path), "/tmp/test-log-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    fflush(stderr);
    saved_stderr = dup(STDERR_FILENO);
    assert_true(dup2(fd, STDERR_FILENO) >= 0);
    close(fd);
    unsetenv("JOURNAL_STREAM");
    log_init("tlog");
    log_set_level(LOG_LEVEL_DEFAULT);
    return 0;
}

static int capture_stop(void **state)
{
    (void)state;
    fflush(stderr);
    dup2(saved_stderr, STDERR_FILENO);
    close(saved_stderr);
    unlink(path);
    return 0;
}

/* What was written to stderr so far (free it). */
static char *captured(void)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char *buf = calloc(1, 1 << 20);
    assert_non_null(buf);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static void test_level_names(void **state)
{
    (void)state;
    static const char *names[] = { "err", "warning", "notice", "info", "debug" };
    for (int i = 0; i < 5; i++) {
        LogLevel l;
        Error *err = NULL;
        assert_true(log_level_parse(names[i], &l, &err));
        assert_int_equal(l, LOG_LEVEL_ERR + i);
    }
    static const char *bad[] = { "", "INFO", "6", "warn", "debug " };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        LogLevel l = LOG_LEVEL_INFO;
        Error *err = NULL;
        assert_false(log_level_parse(bad[i], &l, &err));
        assert_non_null(err);
        assert_non_null(strstr(error_get_pretty(err), "unknown log level"));
        error_free(err);
    }
}

static void test_prefix_and_threshold(void **state)
{
    (void)state;
    log_set_level(LOG_LEVEL_NOTICE);
    log_msg(LOG_LEVEL_INFO, "hidden %d", 1);
    log_msg(LOG_LEVEL_NOTICE, "shown %d", 2);
    log_msg(LOG_LEVEL_ERR, "two\nlines");
    assert_false(log_enabled(LOG_LEVEL_INFO));
    assert_true(log_enabled(LOG_LEVEL_WARNING));
    char *out = captured();
    assert_string_equal(out, "tlog: notice: shown 2\ntlog: err: two lines\n");
    free(out);
}

static void test_journal_prefix(void **state)
{
    (void)state;
    struct stat st;
    char env[64];
    assert_int_equal(fstat(STDERR_FILENO, &st), 0);
    /* Another file's dev:ino: ignored. */
    snprintf(env, sizeof(env), "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino + 1);
    setenv("JOURNAL_STREAM", env, 1);
    log_init("tlog");
    log_msg(LOG_LEVEL_WARNING, "plain");
    snprintf(env, sizeof(env), "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
    setenv("JOURNAL_STREAM", env, 1);
    log_init("tlog");
    log_msg(LOG_LEVEL_WARNING, "journal");
    log_msg(LOG_LEVEL_INFO, "info");
    setenv("JOURNAL_STREAM", "garbage", 1);
    log_init("tlog");
    log_msg(LOG_LEVEL_ERR, "plain again");
    unsetenv("JOURNAL_STREAM");
    char *out = captured();
    assert_string_equal(out, "tlog: warning: plain\n<4>journal\n<6>info\n"
                             "tlog: err: plain again\n");
    free(out);
}

static void test_long_line_cut(void **state)
{
    (void)state;
    char *big = malloc(10000);
    assert_non_null(big);
    memset(big, 'x', 9999);
    big[9999] = '\0';
    log_msg(LOG_LEVEL_INFO, "%s", big);
    free(big);
    char *out = captured();
    size_t len = strlen(out);
    assert_true(len > 1000 && len <= 4096);
    assert_int_equal(out[len - 1], '\n');
    assert_ptr_equal(strchr(out, '\n'), out + len - 1);   /* one line */
    free(out);
}

static void test_ratelimit(void **state)
{
    (void)state;
    LogRatelimit rl = LOG_RATELIMIT_INIT(3600, 2);
    for (int i = 0; i < 5; i++) {
        log_msg_ratelimited(&rl, LOG_LEVEL_WARNING, "e%d", i);
    }
    struct timespec ts;       /* as if the hour had passed */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    rl.window_start_ns = (uint64_t)ts.tv_sec * 1000000000ull +
                         (uint64_t)ts.tv_nsec - 3601ull * 1000000000ull;
    log_msg_ratelimited(&rl, LOG_LEVEL_WARNING, "e%d", 5);
    char *out = captured();
    assert_string_equal(out, "tlog: warning: e0\ntlog: warning: e1\n"
                             "tlog: warning: e5 (3 similar messages "
                             "suppressed)\n");
    free(out);
}

static void *writer(void *opaque)
{
    long t = (long)opaque;
    for (int i = 0; i < LINES_PER_THREAD; i++) {
        log_msg(LOG_LEVEL_INFO, "thread %ld line %d "
                "................................................", t, i);
    }
    return NULL;
}

/* Concurrent lines never mix: every line is whole. */
static void test_threads(void **state)
{
    (void)state;
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++) {
        assert_int_equal(pthread_create(&th[t], NULL, writer, (void *)t), 0);
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
    }
    char *out = captured();
    int lines = 0;
    for (char *save = NULL, *l = strtok_r(out, "\n", &save); l;
         l = strtok_r(NULL, "\n", &save)) {
        long t;
        int i, n = 0;
        assert_int_equal(sscanf(l, "tlog: info: thread %ld line %d %n", &t,
                                &i, &n), 2);
        assert_int_equal(strspn(l + n, "."), 48);
        assert_int_equal(l[n + 48], '\0');
        lines++;
    }
    assert_int_equal(lines, THREADS * LINES_PER_THREAD);
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_level_names),
        cmocka_unit_test_setup_teardown(test_prefix_and_threshold,
                                        capture_start, capture_stop),
        cmocka_unit_test_setup_teardown(test_journal_prefix, capture_start,
                                        capture_stop),
        cmocka_unit_test_setup_teardown(test_long_line_cut, capture_start,
                                        capture_stop),
        cmocka_unit_test_setup_teardown(test_ratelimit, capture_start,
                                        capture_stop),
        cmocka_unit_test_setup_teardown(test_threads, capture_start,
                                        capture_stop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
