/*
 * Unit tests for job/job.c: QEMU's job lifecycle.  A dummy JobDriver whose
 * run() loops on job_pause_point()/job_sleep_ns() until the test releases
 * it (or makes it fail) records commit/abort/clean/free calls and every
 * status change (through job_set_status_hook) by job id, so the records
 * outlive auto-dismissed jobs.  The test is the "main loop": it calls
 * main_loop_run_pending() until a condition holds, with a bound.
 * Verbs are checked against a naive table written out here for every state
 * the jobs reach.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "job/job.h"
#include "util/cleanup.h"
#include "util/main-loop.h"

#define MAX_RECS 16
#define MAX_SEQ 64

typedef struct Rec {
    char id[32];
    JobStatus seq[MAX_SEQ];
    int nseq;
    int commit, abort, clean, freed;
    int error_action_result;        /* -1: not called */
} Rec;

static pthread_mutex_t rec_lock = PTHREAD_MUTEX_INITIALIZER;
static Rec recs[MAX_RECS];
static int nrecs;

typedef enum TestMode {
    MODE_WAIT,          /* loop until released or cancelled */
    MODE_IGNORE_CANCEL, /* loop until released, even when cancelled */
    MODE_RATE_LIMIT,    /* account 1 MiB per step through job_rate_limit */
    MODE_ERROR_STOP,    /* one job_error_action(STOP) then wait */
} TestMode;

typedef struct TestJob {
    Job job;
    TestMode mode;
    int release;        /* atomic: 1 = finish */
    int fail;           /* atomic: 1 = finish with an error */
} TestJob;

static Rec *rec_get_locked(const char *id)
{
    for (int i = 0; i < nrecs; i++) {
        if (strcmp(recs[i].id, id) == 0) {
            return &recs[i];
        }
    }
    assert_true(nrecs < MAX_RECS);
    Rec *r = &recs[nrecs++];
    memset(r, 0, sizeof(*r));
    snprintf(r->id, sizeof(r->id), "%s", id);
    r->error_action_result = -1;
    return r;
}

static void status_hook(Job *job, JobStatus s, void *opaque)
{
    (void)opaque;
    pthread_mutex_lock(&rec_lock);
    Rec *r = rec_get_locked(job->id);
    if (r->nseq < MAX_SEQ) {
        r->seq[r->nseq++] = s;
    }
    pthread_mutex_unlock(&rec_lock);
}

/* Snapshot of the record of `id`. */
static Rec rec(const char *id)
{
    pthread_mutex_lock(&rec_lock);
    Rec r = *rec_get_locked(id);
    pthread_mutex_unlock(&rec_lock);
    return r;
}

static JobStatus last_status(const char *id)
{
    Rec r = rec(id);
    return r.nseq ? r.seq[r.nseq - 1] : JOB_STATUS_UNDEFINED;
}

#define COUNT(field) \
    static void count_##field(Job *job) \
    { \
        pthread_mutex_lock(&rec_lock); \
        rec_get_locked(job->id)->field++; \
        pthread_mutex_unlock(&rec_lock); \
    }
COUNT(commit)
COUNT(abort)
COUNT(clean)
COUNT(freed)

static int test_run(Job *job, Error **errp)
{
    TestJob *t = (TestJob *)job;
    switch (t->mode) {
    case MODE_RATE_LIMIT:
        while (!job_is_cancelled(job)) {
            job_progress_update(job, 1024 * 1024);
            job_rate_limit(job, 1024 * 1024);
            job_pause_point(job);
        }
        return -ECANCELED;
    case MODE_ERROR_STOP: {
        JobErrorAction a = job_error_action(job, BLOCKDEV_ON_ERROR_STOP,
                                            false, -EIO);
        pthread_mutex_lock(&rec_lock);
        rec_get_locked(job->id)->error_action_result = (int)a;
        pthread_mutex_unlock(&rec_lock);
        if (a == JOB_ERROR_ACTION_REPORT) {
            error_setg(errp, "write failed");
            return -EIO;
        }
        break;
    }
    default:
        break;
    }
    while (!__atomic_load_n(&t->release, __ATOMIC_ACQUIRE)) {
        job_pause_point(job);
        if (t->mode != MODE_IGNORE_CANCEL && job_is_cancelled(job)) {
            return -ECANCELED;
        }
        job_sleep_ns(job, 1000000);
    }
    job_progress_update(job, 10);
    if (__atomic_load_n(&t->fail, __ATOMIC_ACQUIRE)) {
        error_setg(errp, "injected failure");
        return -EIO;
    }
    return 0;
}

static const JobDriver test_driver = {
    .type = "backup",
    .instance_size = sizeof(TestJob),
    .run = test_run,
    .commit = count_commit,
    .abort = count_abort,
    .clean = count_clean,
    .free = count_freed,
};

/* ---- helpers ---- */

static void pump(void)
{
    if (main_loop_run_pending() == 0) {
        usleep(1000);
    }
}

/* Run the main loop until last_status(id) == s (at most ~20 s). */
static void wait_status(const char *id, JobStatus s)
{
    for (int i = 0; i < 20000; i++) {
        if (last_status(id) == s) {
            return;
        }
        pump();
    }
    fail_msg("job %s: status %s, want %s", id,
             job_status_name(last_status(id)), job_status_name(s));
}

/* Pump a while and check nothing moves on its own. */
static void settle(void)
{
    for (int i = 0; i < 30; i++) {
        main_loop_run_pending();
        usleep(1000);
    }
}

static TestJob *create(const char *id, JobTxn *txn, bool af, bool ad,
                       TestMode mode)
{
    Error *err = NULL;
    Job *job = job_create(&test_driver, id, NULL, txn, af, ad, 0, &err);
    if (!job) {
        fail_msg("job_create %s: %s", id, error_get_pretty(err));
    }
    TestJob *t = (TestJob *)job;
    t->mode = mode;
    return t;
}

static void release(TestJob *t, bool fail)
{
    __atomic_store_n(&t->fail, fail ? 1 : 0, __ATOMIC_RELEASE);
    __atomic_store_n(&t->release, 1, __ATOMIC_RELEASE);
}

static void assert_seq(const char *id, const JobStatus *want, int n)
{
    Rec r = rec(id);
    bool same = r.nseq == n;
    for (int i = 0; same && i < n; i++) {
        same = r.seq[i] == want[i];
    }
    if (!same) {
        char buf[1024] = "";
        for (int i = 0; i < r.nseq; i++) {
            strncat(buf, job_status_name(r.seq[i]), sizeof(buf) - strlen(buf) - 2);
            strncat(buf, " ", sizeof(buf) - strlen(buf) - 1);
        }
        fail_msg("job %s: status sequence %s", id, buf);
    }
}

static void assert_error(Error *err, const char *want)
{
    assert_non_null(err);
    assert_string_equal(error_get_pretty(err), want);
    error_free(err);
}

static const char *info_str(Job *job, const char *key)
{
    static char buf[256];
    struct json_object *o = job_query_info(job), *v;
    buf[0] = 0;
    if (json_object_object_get_ex(o, key, &v)) {
        snprintf(buf, sizeof(buf), "%s", json_object_get_string(v));
    }
    json_object_put(o);
    return buf;
}

static const char *block_info_str(Job *job, const char *key)
{
    static char buf[256];
    struct json_object *o = job_query_block_info(job), *v;
    buf[0] = 0;
    if (json_object_object_get_ex(o, key, &v)) {
        snprintf(buf, sizeof(buf), "%s", json_object_get_string(v));
    }
    json_object_put(o);
    return buf;
}

static int setup(void **state)
{
    (void)state;
    pthread_mutex_lock(&rec_lock);
    nrecs = 0;
    pthread_mutex_unlock(&rec_lock);
    job_set_status_hook(status_hook, NULL);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    job_cancel_sync_all();
    assert_null(job_next(NULL));
    return 0;
}

/* ---- tests ---- */

static void test_lifecycle(void **state)
{
    (void)state;
    TestJob *t = create("j1", NULL, true, true, MODE_WAIT);
    job_progress_set_total(&t->job, 10);
    assert_ptr_equal(job_find("j1"), &t->job);
    job_start(&t->job);
    wait_status("j1", JOB_STATUS_RUNNING);
    assert_string_equal(block_info_str(&t->job, "io-status"), "ok");
    release(t, false);
    wait_status("j1", JOB_STATUS_NULL);
    static const JobStatus want[] = {
        JOB_STATUS_CREATED, JOB_STATUS_RUNNING, JOB_STATUS_WAITING,
        JOB_STATUS_PENDING, JOB_STATUS_CONCLUDED, JOB_STATUS_NULL,
    };
    assert_seq("j1", want, (int)ARRAY_SIZE(want));
    Rec r = rec("j1");
    assert_int_equal(r.commit, 1);
    assert_int_equal(r.abort, 0);
    assert_int_equal(r.clean, 1);
    assert_int_equal(r.freed, 1);
    assert_null(job_find("j1"));
}

static void test_manual_finalize_dismiss(void **state)
{
    (void)state;
    Error *err = NULL;
    TestJob *t = create("j1", NULL, false, false, MODE_WAIT);
    job_progress_set_total(&t->job, 10);
    job_start(&t->job);
    job_finalize(&t->job, &err);
    assert_error(err, "Job 'j1' in state 'running' cannot accept command verb 'finalize'");
    release(t, false);
    wait_status("j1", JOB_STATUS_PENDING);
    settle();
    assert_int_equal(last_status("j1"), JOB_STATUS_PENDING);
    assert_int_equal(rec("j1").commit, 0);
    err = NULL;
    job_dismiss(&t->job, &err);
    assert_error(err, "Job 'j1' in state 'pending' cannot accept command verb 'dismiss'");
    job_finalize(&t->job, NULL);
    assert_int_equal(last_status("j1"), JOB_STATUS_CONCLUDED);
    assert_int_equal(rec("j1").commit, 1);
    assert_int_equal(rec("j1").clean, 1);
    assert_string_equal(info_str(&t->job, "current-progress"), "10");
    assert_string_equal(info_str(&t->job, "total-progress"), "10");
    assert_string_equal(info_str(&t->job, "error"), "");
    settle();
    assert_int_equal(last_status("j1"), JOB_STATUS_CONCLUDED);
    assert_int_equal(rec("j1").freed, 0);
    job_dismiss(&t->job, NULL);
    assert_int_equal(last_status("j1"), JOB_STATUS_NULL);
    assert_int_equal(rec("j1").freed, 1);
    assert_null(job_next(NULL));
}

static void test_pause_resume_cancel(void **state)
{
    (void)state;
    Error *err = NULL;
    TestJob *t = create("j1", NULL, true, false, MODE_WAIT);
    job_start(&t->job);
    wait_status("j1", JOB_STATUS_RUNNING);
    job_user_resume(&t->job, &err);
    assert_error(err, "Can't resume a job that was not paused");
    job_user_pause(&t->job, NULL);
    wait_status("j1", JOB_STATUS_PAUSED);
    assert_string_equal(block_info_str(&t->job, "paused"), "true");
    err = NULL;
    job_user_pause(&t->job, &err);
    assert_error(err, "Job is already paused");
    job_user_resume(&t->job, NULL);
    wait_status("j1", JOB_STATUS_RUNNING);
    assert_string_equal(block_info_str(&t->job, "paused"), "false");
    job_user_pause(&t->job, NULL);
    wait_status("j1", JOB_STATUS_PAUSED);
    job_user_cancel(&t->job, true, NULL);        /* cancel wakes it */
    wait_status("j1", JOB_STATUS_CONCLUDED);
    static const JobStatus want[] = {
        JOB_STATUS_CREATED, JOB_STATUS_RUNNING, JOB_STATUS_PAUSED,
        JOB_STATUS_RUNNING, JOB_STATUS_PAUSED, JOB_STATUS_RUNNING,
        JOB_STATUS_ABORTING, JOB_STATUS_CONCLUDED,
    };
    assert_seq("j1", want, (int)ARRAY_SIZE(want));
    assert_string_equal(info_str(&t->job, "error"), "Operation canceled");
    assert_int_equal(rec("j1").abort, 1);
    assert_int_equal(rec("j1").commit, 0);
    assert_int_equal(rec("j1").clean, 1);
    job_dismiss(&t->job, NULL);
}

static void test_pause_before_start(void **state)
{
    (void)state;
    TestJob *t = create("j1", NULL, true, true, MODE_WAIT);
    job_user_pause(&t->job, NULL);
    job_start(&t->job);
    wait_status("j1", JOB_STATUS_PAUSED);
    release(t, false);
    settle();
    assert_int_equal(last_status("j1"), JOB_STATUS_PAUSED);
    job_user_resume(&t->job, NULL);
    wait_status("j1", JOB_STATUS_NULL);
    assert_int_equal(rec("j1").commit, 1);
}

static void test_cancel_created(void **state)
{
    (void)state;
    TestJob *t = create("j1", NULL, true, true, MODE_WAIT);
    job_user_cancel(&t->job, false, NULL);
    static const JobStatus want[] = {
        JOB_STATUS_CREATED, JOB_STATUS_ABORTING, JOB_STATUS_CONCLUDED,
        JOB_STATUS_NULL,
    };
    assert_seq("j1", want, (int)ARRAY_SIZE(want));
    assert_int_equal(rec("j1").abort, 1);
    assert_int_equal(rec("j1").freed, 1);
}

/* The naive model: verbs allowed in each state (job.h's table). */
static bool model_allows(JobVerb v, JobStatus s)
{
    switch (v) {
    case JOB_VERB_CANCEL:
        return s == JOB_STATUS_CREATED || s == JOB_STATUS_RUNNING ||
               s == JOB_STATUS_PAUSED || s == JOB_STATUS_READY ||
               s == JOB_STATUS_STANDBY || s == JOB_STATUS_WAITING ||
               s == JOB_STATUS_PENDING;
    case JOB_VERB_PAUSE:
    case JOB_VERB_RESUME:
    case JOB_VERB_SET_SPEED:
        return s == JOB_STATUS_CREATED || s == JOB_STATUS_RUNNING ||
               s == JOB_STATUS_PAUSED || s == JOB_STATUS_READY ||
               s == JOB_STATUS_STANDBY;
    case JOB_VERB_COMPLETE:
        return s == JOB_STATUS_READY;
    case JOB_VERB_FINALIZE:
        return s == JOB_STATUS_PENDING;
    case JOB_VERB_DISMISS:
        return s == JOB_STATUS_CONCLUDED;
    case JOB_VERB_CHANGE:
        return s == JOB_STATUS_RUNNING || s == JOB_STATUS_PAUSED ||
               s == JOB_STATUS_READY || s == JOB_STATUS_STANDBY;
    default:
        return false;
    }
}

static const char *const verb_names[JOB_VERB__MAX] = {
    "cancel", "pause", "resume", "set-speed", "complete", "finalize",
    "dismiss", "change",
};

static void check_verbs(Job *job, JobStatus s, bool *seen)
{
    assert_int_equal(last_status(job->id), s);
    seen[s] = true;
    for (int v = 0; v < JOB_VERB__MAX; v++) {
        Error *err = NULL;
        bool ok = job_apply_verb(job, (JobVerb)v, &err);
        if (ok != model_allows((JobVerb)v, s)) {
            fail_msg("verb %s in state %s: got %d", verb_names[v],
                     job_status_name(s), ok);
        }
        if (!ok) {
            char want[256];
            snprintf(want, sizeof(want),
                     "Job '%s' in state '%s' cannot accept command verb '%s'",
                     job->id, job_status_name(s), verb_names[v]);
            assert_error(err, want);
        }
    }
}

static void test_verbs_vs_states(void **state)
{
    (void)state;
    bool seen[JOB_STATUS__MAX] = { false };

    /* created, running, paused, waiting, pending, concluded: a txn of two
     * jobs where a finishes first and waits for b. */
    JobTxn *txn = job_txn_new();
    TestJob *a = create("a", txn, false, false, MODE_WAIT);
    TestJob *b = create("b", txn, false, false, MODE_WAIT);
    job_txn_unref(txn);
    check_verbs(&a->job, JOB_STATUS_CREATED, seen);
    job_start(&a->job);
    job_start(&b->job);
    wait_status("a", JOB_STATUS_RUNNING);
    check_verbs(&a->job, JOB_STATUS_RUNNING, seen);
    job_user_pause(&a->job, NULL);
    wait_status("a", JOB_STATUS_PAUSED);
    check_verbs(&a->job, JOB_STATUS_PAUSED, seen);
    job_user_resume(&a->job, NULL);
    release(a, false);
    wait_status("a", JOB_STATUS_WAITING);
    settle();
    check_verbs(&a->job, JOB_STATUS_WAITING, seen);
    release(b, false);
    wait_status("b", JOB_STATUS_PENDING);
    check_verbs(&a->job, JOB_STATUS_PENDING, seen);
    check_verbs(&b->job, JOB_STATUS_PENDING, seen);
    job_finalize(&b->job, NULL);            /* finalizes the whole txn */
    check_verbs(&a->job, JOB_STATUS_CONCLUDED, seen);
    check_verbs(&b->job, JOB_STATUS_CONCLUDED, seen);
    assert_int_equal(rec("a").commit, 1);
    assert_int_equal(rec("b").commit, 1);
    job_dismiss(&a->job, NULL);
    job_dismiss(&b->job, NULL);

    /* aborting: c fails while d ignores the cancel for a while. */
    txn = job_txn_new();
    TestJob *c = create("c", txn, true, false, MODE_WAIT);
    TestJob *d = create("d", txn, true, false, MODE_IGNORE_CANCEL);
    job_txn_unref(txn);
    job_start(&c->job);
    job_start(&d->job);
    release(c, true);
    wait_status("c", JOB_STATUS_ABORTING);
    settle();
    check_verbs(&c->job, JOB_STATUS_ABORTING, seen);
    release(d, false);
    wait_status("d", JOB_STATUS_CONCLUDED);
    job_dismiss(&c->job, NULL);
    job_dismiss(&d->job, NULL);

    assert_true(seen[JOB_STATUS_CREATED] && seen[JOB_STATUS_RUNNING] &&
                seen[JOB_STATUS_PAUSED] && seen[JOB_STATUS_WAITING] &&
                seen[JOB_STATUS_PENDING] && seen[JOB_STATUS_ABORTING] &&
                seen[JOB_STATUS_CONCLUDED]);
}

static void test_txn_failure(void **state)
{
    (void)state;
    JobTxn *txn = job_txn_new();
    TestJob *a = create("a", txn, true, false, MODE_WAIT);
    TestJob *b = create("b", txn, true, false, MODE_WAIT);
    job_txn_unref(txn);
    job_start(&a->job);
    job_start(&b->job);
    wait_status("b", JOB_STATUS_RUNNING);
    release(a, true);
    wait_status("a", JOB_STATUS_CONCLUDED);
    wait_status("b", JOB_STATUS_CONCLUDED);
    for (const char *id = "a"; id; id = strcmp(id, "a") == 0 ? "b" : NULL) {
        Rec r = rec(id);
        assert_int_equal(r.commit, 0);
        assert_int_equal(r.abort, 1);
        assert_int_equal(r.clean, 1);
    }
    static const JobStatus want[] = {
        JOB_STATUS_CREATED, JOB_STATUS_RUNNING, JOB_STATUS_ABORTING,
        JOB_STATUS_CONCLUDED,
    };
    assert_seq("a", want, (int)ARRAY_SIZE(want));
    assert_seq("b", want, (int)ARRAY_SIZE(want));
    assert_string_equal(info_str(&a->job, "error"), "injected failure");
    assert_string_equal(info_str(&b->job, "error"), "Operation canceled");
    assert_true(b->job.cancelled);
    assert_false(a->job.cancelled);
    job_dismiss(&a->job, NULL);
    job_dismiss(&b->job, NULL);
}

static void test_txn_success(void **state)
{
    (void)state;
    JobTxn *txn = job_txn_new();
    TestJob *a = create("a", txn, true, true, MODE_WAIT);
    TestJob *b = create("b", txn, true, true, MODE_WAIT);
    job_txn_unref(txn);
    job_start(&a->job);
    job_start(&b->job);
    release(a, false);
    wait_status("a", JOB_STATUS_WAITING);
    settle();
    assert_int_equal(last_status("a"), JOB_STATUS_WAITING);
    assert_int_equal(rec("a").commit, 0);
    release(b, false);
    wait_status("a", JOB_STATUS_NULL);
    wait_status("b", JOB_STATUS_NULL);
    assert_int_equal(rec("a").commit, 1);
    assert_int_equal(rec("b").commit, 1);
    assert_int_equal(rec("a").abort + rec("b").abort, 0);
    assert_int_equal(rec("a").freed + rec("b").freed, 2);
}

static void test_txn_cancel_pending(void **state)
{
    (void)state;
    JobTxn *txn = job_txn_new();
    TestJob *a = create("a", txn, false, true, MODE_WAIT);
    TestJob *b = create("b", txn, true, true, MODE_WAIT);
    job_txn_unref(txn);
    job_start(&a->job);
    job_start(&b->job);
    release(a, false);
    release(b, false);
    wait_status("a", JOB_STATUS_PENDING);
    wait_status("b", JOB_STATUS_PENDING);
    settle();
    assert_int_equal(last_status("b"), JOB_STATUS_PENDING);
    job_user_cancel(&a->job, true, NULL);
    assert_int_equal(last_status("a"), JOB_STATUS_NULL);
    assert_int_equal(last_status("b"), JOB_STATUS_NULL);
    assert_int_equal(rec("a").abort + rec("b").abort, 2);
    assert_int_equal(rec("a").commit + rec("b").commit, 0);
}

static void test_rate_limit(void **state)
{
    (void)state;
    Error *err = NULL;
    TestJob *t = create("j1", NULL, true, true, MODE_WAIT);
    const uint64_t ms = 1000000, t0 = 1000 * ms;

    assert_int_equal(job_rate_limit_delay_ns(&t->job, 1 << 30, t0), 0);
    assert_true(job_set_speed(&t->job, 10 * 1024 * 1024, NULL));
    /* quota: 1 MiB per 100 ms slice */
    assert_int_equal(job_rate_limit_delay_ns(&t->job, 512 * 1024, t0 + 1), 0);
    assert_int_equal(job_rate_limit_delay_ns(&t->job, 512 * 1024 - 1, t0 + 2), 0);
    assert_int_equal(job_rate_limit_delay_ns(&t->job, 1, t0 + 3), 100 * ms - 2);
    assert_int_equal(job_rate_limit_delay_ns(&t->job, 0, t0 + 50 * ms + 1),
                     50 * ms);
    /* a new slice after the stretched one ended */
    assert_int_equal(job_rate_limit_delay_ns(&t->job, 0, t0 + 200 * ms), 0);
    /* three quotas at once: wait three slices */
    assert_int_equal(job_rate_limit_delay_ns(&t->job, 3 * 1024 * 1024,
                                             t0 + 200 * ms), 300 * ms);
    /* about S bytes per second: 10 slices' worth at 10 MiB/s is 1 s */
    uint64_t now = t0 + 10000 * ms, total = 0, waited = 0;
    while (total < 10 * 1024 * 1024) {
        uint64_t d = job_rate_limit_delay_ns(&t->job, 64 * 1024, now);
        total += 64 * 1024;
        now += d + 1;
        waited += d + 1;
    }
    assert_in_range(waited, 900 * ms, 1100 * ms);

    assert_false(job_set_speed(&t->job, -1, &err));
    assert_error(err, "Parameter 'speed' expects a non-negative value");
    assert_string_equal(block_info_str(&t->job, "speed"), "10485760");
    job_early_fail(&t->job);
    static const JobStatus want[] = { JOB_STATUS_CREATED, JOB_STATUS_NULL };
    assert_seq("j1", want, (int)ARRAY_SIZE(want));
    assert_int_equal(rec("j1").abort, 1);
    assert_int_equal(rec("j1").clean, 1);
    assert_int_equal(rec("j1").freed, 1);

    /* a job sleeping in job_rate_limit wakes on cancel */
    t = create("j2", NULL, true, true, MODE_RATE_LIMIT);
    assert_true(job_set_speed(&t->job, 1, NULL));
    job_start(&t->job);
    wait_status("j2", JOB_STATUS_RUNNING);
    for (int i = 0; i < 10000 &&
         __atomic_load_n(&t->job.progress_current, __ATOMIC_RELAXED) == 0; i++) {
        usleep(1000);
    }
    settle();
    /* 1 MiB at 1 byte/s: it sleeps in the first step's slice */
    assert_int_equal(__atomic_load_n(&t->job.progress_current,
                                     __ATOMIC_RELAXED), 1024 * 1024);
    job_user_cancel(&t->job, true, NULL);
    wait_status("j2", JOB_STATUS_NULL);
    assert_int_equal(rec("j2").abort, 1);
}

static void test_error_stop(void **state)
{
    (void)state;
    TestJob *t = create("j1", NULL, true, false, MODE_ERROR_STOP);
    job_start(&t->job);
    wait_status("j1", JOB_STATUS_PAUSED);
    assert_string_equal(block_info_str(&t->job, "io-status"), "failed");
    assert_true(job_user_paused(&t->job));
    Error *err = NULL;
    job_user_pause(&t->job, &err);
    assert_error(err, "Job is already paused");
    job_user_resume(&t->job, NULL);
    wait_status("j1", JOB_STATUS_RUNNING);
    assert_string_equal(block_info_str(&t->job, "io-status"), "ok");
    release(t, false);
    wait_status("j1", JOB_STATUS_CONCLUDED);
    assert_int_equal(rec("j1").error_action_result, JOB_ERROR_ACTION_RETRY);
    assert_int_equal(rec("j1").commit, 1);
    job_dismiss(&t->job, NULL);

    /* cancelled while stopped: REPORT */
    t = create("j2", NULL, true, false, MODE_ERROR_STOP);
    job_start(&t->job);
    wait_status("j2", JOB_STATUS_PAUSED);
    job_user_cancel(&t->job, true, NULL);
    wait_status("j2", JOB_STATUS_CONCLUDED);
    assert_int_equal(rec("j2").error_action_result, JOB_ERROR_ACTION_REPORT);
    assert_int_equal(rec("j2").abort, 1);
    job_dismiss(&t->job, NULL);
}

static void test_error_actions(void **state)
{
    (void)state;
    TestJob *t = create("j1", NULL, true, true, MODE_WAIT);
    assert_int_equal(job_error_action(&t->job, BLOCKDEV_ON_ERROR_REPORT, true, -EIO),
                     JOB_ERROR_ACTION_REPORT);
    assert_int_equal(job_error_action(&t->job, BLOCKDEV_ON_ERROR_AUTO, true, -EIO),
                     JOB_ERROR_ACTION_REPORT);
    assert_int_equal(job_error_action(&t->job, BLOCKDEV_ON_ERROR_IGNORE, false, -EIO),
                     JOB_ERROR_ACTION_RETRY);
    assert_int_equal(job_error_action(&t->job, BLOCKDEV_ON_ERROR_ENOSPC, false, -EIO),
                     JOB_ERROR_ACTION_REPORT);
    job_early_fail(&t->job);
}

static void test_create_errors(void **state)
{
    (void)state;
    Error *err = NULL;
    TestJob *t = create("j1", NULL, true, true, MODE_WAIT);
    assert_null(job_create(&test_driver, "j1", NULL, NULL, true, true, 0, &err));
    assert_error(err, "Job ID 'j1' already in use");
    err = NULL;
    assert_null(job_create(&test_driver, "1bad", NULL, NULL, true, true, 0, &err));
    assert_error(err, "Invalid job ID '1bad'");
    err = NULL;
    assert_null(job_create(&test_driver, NULL, NULL, NULL, true, true, 0, &err));
    assert_error(err, "An explicit job ID is required");
    Job *d = job_create(&test_driver, NULL, "dev0", NULL, true, true, 0, NULL);
    assert_non_null(d);
    assert_string_equal(d->id, "dev0");
    assert_string_equal(d->device, "dev0");
    job_early_fail(d);
    job_early_fail(&t->job);
}

static void test_cancel_sync_all(void **state)
{
    (void)state;
    TestJob *created = create("created", NULL, true, true, MODE_WAIT);
    (void)created;
    TestJob *running = create("running", NULL, true, false, MODE_WAIT);
    job_start(&running->job);
    TestJob *paused = create("paused", NULL, true, true, MODE_WAIT);
    job_start(&paused->job);
    job_user_pause(&paused->job, NULL);
    TestJob *pending = create("pending", NULL, false, false, MODE_WAIT);
    job_start(&pending->job);
    release(pending, false);
    TestJob *concl = create("concl", NULL, true, false, MODE_WAIT);
    job_start(&concl->job);
    release(concl, false);
    wait_status("paused", JOB_STATUS_PAUSED);
    wait_status("pending", JOB_STATUS_PENDING);
    wait_status("concl", JOB_STATUS_CONCLUDED);
    job_cancel_sync_all();
    assert_null(job_next(NULL));
    const char *ids[] = { "created", "running", "paused", "pending", "concl" };
    for (size_t i = 0; i < ARRAY_SIZE(ids); i++) {
        Rec r = rec(ids[i]);
        assert_int_equal(r.freed, 1);
        assert_int_equal(r.clean, 1);
        assert_int_equal(last_status(ids[i]), JOB_STATUS_NULL);
    }
    assert_int_equal(rec("concl").commit, 1);
    assert_int_equal(rec("pending").abort, 1);
    assert_int_equal(rec("running").abort, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_lifecycle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_manual_finalize_dismiss, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pause_resume_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pause_before_start, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_created, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verbs_vs_states, setup, teardown),
        cmocka_unit_test_setup_teardown(test_txn_failure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_txn_success, setup, teardown),
        cmocka_unit_test_setup_teardown(test_txn_cancel_pending, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rate_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_error_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_error_actions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_sync_all, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
