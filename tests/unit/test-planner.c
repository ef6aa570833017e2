/*
 * Unit tests for the backup planner (src/repo/planner.c), table driven:
 * a repository built with repo_commit (manifests with their bitmaps,
 * generations and counts, attempt markers), a disk's bitmaps as the disk
 * reports them, the run's options -> the plan.  The cases are the
 * decisions tests/integration/test_backup_cli.py, test_backup_safety.py
 * and test_qcow2_generation.py drive through a daemon: first run full,
 * incremental, diff, full asked for, a missing / cleared / inconsistent /
 * stopped bitmap, counts lower than recorded, a resized disk, a run killed
 * before its transaction, a bitmap busy in a job; and the stale bitmaps
 * a full makes removable.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "repo/planner.h"
#include "repo/repo.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "test-util.h"

#define SIZE   (16 * REPO_CLUSTER_SIZE)
#define GRAN   65536u
#define PREFIX "bitback-0a1b2c3d"

static unsigned n_repos;

/* A committed backup of disk0 for the table. */
typedef struct Backup {
    unsigned seq;
    RepoLevel level;
    unsigned parent;
    uint64_t size;                     /* 0: SIZE */
    const char *generation;            /* of its bitmap PREFIX-seq */
    int64_t count;                     /* its bitmap's count; -1: none */
} Backup;

/* A bitmap on the disk; name "" ends the list. */
typedef struct Bitmap {
    const char *name;
    bool stopped;                      /* not recording */
    bool inconsistent;
    bool busy;
    int64_t count;
    const char *generation;
} Bitmap;

typedef struct Case {
    const char *what;
    Backup backups[4];                 /* seq 0 ends the list */
    unsigned attempt;                  /* an attempt marker, not started */
    Bitmap bitmaps[4];
    bool level_auto;
    RepoLevel level;
    /* Expected */
    bool fails;
    RepoLevel want_level;
    unsigned want_parent;
    const char *want_sources;          /* names joined with ',' */
    const char *want_freeze;
    const char *want_reason;           /* a part of it; NULL: no reason */
} Case;

static Repo *make_repo(const Case *c)
{
    Error *err = NULL;
    char *path = NULL;

    assert_true(asprintf(&path, "%s/repo%u", tmpdir, n_repos++) > 0);
    Repo *repo = repo_open(path, true, &err);
    die_on(err);
    free(path);
    for (const Backup *b = c->backups; b->seq; b++) {
        RepoManifest *m = calloc(1, sizeof(*m));
        char bitmap[BDRV_BITMAP_MAX_NAME + 1];

        assert_non_null(m);
        repo_bitmap_name(bitmap, PREFIX, b->seq, "");
        m->seq = b->seq;
        m->node = strdup("disk0");
        m->time = strdup("2026-11-23T15:11:32Z");
        m->level = b->level;
        m->parent_seq = b->parent;
        m->image_size = b->size ? b->size : SIZE;
        m->granularity = GRAN;
        m->cluster_size = REPO_CLUSTER_SIZE;
        m->bitmap = strdup(bitmap);
        m->generation = b->generation ? strdup(b->generation) : NULL;
        if (b->count >= 0) {
            m->bitmap_counts = calloc(1, sizeof(*m->bitmap_counts));
            m->bitmap_counts[0].name = strdup(bitmap);
            m->bitmap_counts[0].count = (uint64_t)b->count;
            m->n_bitmap_counts = 1;
        }
        m->version = 2;                /* no index records (none read) */
        repo_merkle_root(NULL, 0, m->merkle_root);
        assert_true(repo_mark_attempt(repo, "disk0", b->seq, &err));
        die_on(err);
        /* The data file: commit only syncs it and counts its bytes. */
        char *tmp = repo_tmp_data_path(repo, "disk0", b->seq);
        FILE *f = fopen(tmp, "w");
        assert_non_null(f);
        fclose(f);
        free(tmp);
        assert_true(repo_commit(repo, m, &err));
        die_on(err);
        repo_manifest_free(m);
    }
    if (c->attempt) {
        assert_true(repo_mark_attempt(repo, "disk0", c->attempt, &err));
        die_on(err);
    }
    return repo;
}

static void join(char *buf, size_t len, char **names, size_t n)
{
    buf[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        if (i) {
            strncat(buf, ",", len - strlen(buf) - 1);
        }
        strncat(buf, names[i], len - strlen(buf) - 1);
    }
}

static const Case cases[] = {
    {
        .what = "first run, auto: full, no reason",
        .level_auto = true,
        .want_level = REPO_LEVEL_FULL,
    },
    {
        .what = "first run, inc asked: full with a reason",
        .level = REPO_LEVEL_INC,
        .want_level = REPO_LEVEL_FULL,
        .want_reason = "no earlier backup of disk0",
    },
    {
        .what = "incremental since the full",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 100 } },
        .bitmaps = { { PREFIX "-000001", .count = 200, .generation = "g1" } },
        .level_auto = true,
        .want_level = REPO_LEVEL_INC, .want_parent = 1,
        .want_sources = PREFIX "-000001", .want_freeze = PREFIX "-000001",
    },
    {
        .what = "incremental: the union since the parent, others ignored",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 10 },
                     { 2, REPO_LEVEL_INC, 1, 0, "g2", 10 } },
        .bitmaps = { { PREFIX "-000001", .stopped = true, .count = 10,
                       .generation = "g1" },
                     { PREFIX "-000002", .count = 10, .generation = "g2" },
                     { "user-bitmap", .count = 1 } },
        .level_auto = true,
        .want_level = REPO_LEVEL_INC, .want_parent = 2,
        .want_sources = PREFIX "-000002", .want_freeze = PREFIX "-000002",
    },
    {
        .what = "diff: since the latest full",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 10 },
                     { 2, REPO_LEVEL_INC, 1, 0, "g2", 10 } },
        .bitmaps = { { PREFIX "-000001", .stopped = true, .count = 10,
                       .generation = "g1" },
                     { PREFIX "-000002", .count = 10, .generation = "g2" } },
        .level = REPO_LEVEL_DIFF,
        .want_level = REPO_LEVEL_DIFF, .want_parent = 1,
        .want_sources = PREFIX "-000001," PREFIX "-000002",
        .want_freeze = PREFIX "-000002",
    },
    {
        .what = "full asked for: full, no reason, still freezes",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 100 } },
        .bitmaps = { { PREFIX "-000001", .count = 200, .generation = "g1" } },
        .level = REPO_LEVEL_FULL,
        .want_level = REPO_LEVEL_FULL, .want_freeze = PREFIX "-000001",
    },
    {
        .what = "bitmap missing: full with the reason",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 100 } },
        .level = REPO_LEVEL_INC,
        .want_level = REPO_LEVEL_FULL,
        .want_reason = "bitmap '" PREFIX "-000001' is missing on disk0",
    },
    {
        .what = "count lower than recorded: cleared behind bitback's back",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 100 } },
        .bitmaps = { { PREFIX "-000001", .count = 50, .generation = "g1" } },
        .level_auto = true,
        .want_level = REPO_LEVEL_FULL, .want_freeze = PREFIX "-000001",
        .want_reason = "cleared behind bitback's back (it marks 50 bytes, "
                       "a backup recorded 100)",
    },
    {
        .what = "generation changed: cleared or replaced",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 100 } },
        .bitmaps = { { PREFIX "-000001", .count = 200, .generation = "g9" } },
        .level_auto = true,
        .want_level = REPO_LEVEL_FULL, .want_freeze = PREFIX "-000001",
        .want_reason = "was cleared or replaced since backup 000001",
    },
    {
        .what = "inconsistent bitmap",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 100 } },
        .bitmaps = { { PREFIX "-000001", .inconsistent = true, .count = 200,
                       .generation = "g1" } },
        .level_auto = true,
        .want_level = REPO_LEVEL_FULL, .want_freeze = PREFIX "-000001",
        .want_reason = "is inconsistent",
    },
    {
        .what = "newest bitmap stopped recording",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 100 } },
        .bitmaps = { { PREFIX "-000001", .stopped = true, .count = 200,
                       .generation = "g1" } },
        .level_auto = true,
        .want_level = REPO_LEVEL_FULL,
        .want_reason = "stopped recording",
    },
    {
        .what = "disk resized",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 2 * SIZE, "g1", 100 } },
        .bitmaps = { { PREFIX "-000001", .count = 200, .generation = "g1" } },
        .level_auto = true,
        .want_level = REPO_LEVEL_FULL, .want_freeze = PREFIX "-000001",
        .want_reason = "the disk's size changed",
    },
    {
        .what = "a run killed before its transaction adds nothing",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 100 } },
        .attempt = 2,
        .bitmaps = { { PREFIX "-000001", .count = 200, .generation = "g1" } },
        .level_auto = true,
        .want_level = REPO_LEVEL_INC, .want_parent = 1,
        .want_sources = PREFIX "-000001", .want_freeze = PREFIX "-000001",
    },
    {
        .what = "a bitmap of ours busy in another job: fails",
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 100 } },
        .bitmaps = { { PREFIX "-000001", .busy = true, .count = 200,
                       .generation = "g1" } },
        .level_auto = true,
        .fails = true,
    },
};

static void test_plan_table(void **state)
{
    for (size_t k = 0; k < ARRAY_SIZE(cases); k++) {
        const Case *c = &cases[k];
        RepoPlanBitmap bitmaps[4];
        size_t n = 0;
        Error *err = NULL;
        RepoPlan plan;
        char got[512];

        print_message("case: %s\n", c->what);
        for (; n < ARRAY_SIZE(c->bitmaps) && c->bitmaps[n].name; n++) {
            const Bitmap *b = &c->bitmaps[n];
            bitmaps[n] = (RepoPlanBitmap){
                .name = (char *)b->name, .recording = !b->stopped,
                .inconsistent = b->inconsistent, .busy = b->busy,
                .granularity = GRAN, .count = b->count,
                .generation = (char *)b->generation,
            };
        }
        Repo *repo = make_repo(c);
        RepoPlanDisk disk = { .node = "disk0", .size = SIZE,
                              .bitmaps = bitmaps, .n_bitmaps = n };
        RepoPlanOpts opts = { .prefix = PREFIX, .level_auto = c->level_auto,
                              .level = c->level };
        bool ok = repo_plan_disk(repo, &opts, &disk, &plan, &err);

        if (c->fails) {
            assert_false(ok);
            assert_non_null(err);
            assert_non_null(strstr(error_get_pretty(err), "in use"));
            error_free(err);
        } else {
            die_on(err);
            assert_true(ok);
            assert_int_equal(plan.level, c->want_level);
            assert_int_equal(plan.parent_seq, c->want_parent);
            join(got, sizeof(got), plan.sources, plan.n_sources);
            assert_string_equal(got, c->want_sources ? c->want_sources : "");
            join(got, sizeof(got), plan.freeze, plan.n_freeze);
            assert_string_equal(got, c->want_freeze ? c->want_freeze : "");
            if (c->want_reason) {
                assert_non_null(plan.reason);
                if (!strstr(plan.reason, c->want_reason)) {
                    fail_msg("reason '%s' lacks '%s'", plan.reason,
                             c->want_reason);
                }
            } else {
                assert_null(plan.reason);
            }
            if (plan.n_sources) {
                assert_int_equal(plan.granularity, GRAN);
            }
        }
        repo_plan_clear(&plan);
        repo_free(repo);
    }
}

/* After full 3: PREFIX-1 and PREFIX-2 may go, PREFIX-3 stays, a bitmap of
 * another prefix is never touched. */
static void test_stale_bitmaps(void **state)
{
    static const Case c = {
        .backups = { { 1, REPO_LEVEL_FULL, 0, 0, "g1", 1 },
                     { 2, REPO_LEVEL_INC, 1, 0, "g2", 1 },
                     { 3, REPO_LEVEL_FULL, 0, 0, "g3", 1 } },
    };
    RepoPlanBitmap bitmaps[] = {
        { .name = PREFIX "-000001" }, { .name = PREFIX "-000002" },
        { .name = PREFIX "-000003" }, { .name = "bitback-ffffffff-000001" },
    };
    Repo *repo = make_repo(&c);
    RepoPlanDisk disk = { .node = "disk0", .size = SIZE, .bitmaps = bitmaps,
                          .n_bitmaps = ARRAY_SIZE(bitmaps) };
    RepoPlanOpts opts = { .prefix = PREFIX, .level_auto = true };
    size_t n = 0;
    char **names = repo_plan_stale_bitmaps(repo, &opts, false, &disk, &n);
    char got[256];

    join(got, sizeof(got), names, n);
    assert_string_equal(got, PREFIX "-000001," PREFIX "-000002");
    repo_plan_free_names(names, n);
    assert_int_equal(repo_bitmap_seq(PREFIX, PREFIX "-000042"), 42);
    assert_int_equal(repo_bitmap_seq(PREFIX, PREFIX "-x"), 0);
    assert_int_equal(repo_bitmap_seq(PREFIX, "other-000042"), 0);
    repo_free(repo);
}

static int setup(void **state)
{
    return tmpdir_create("planner");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_table),
        cmocka_unit_test(test_stale_bitmaps),
    };
    return cmocka_run_group_tests(tests, setup, tmpdir_teardown);
}
