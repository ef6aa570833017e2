/*
 * The generic job lifecycle: QEMU's job state machine (qapi/job.json) for
 * the backup jobs of bitbackd.  job.h holds the contract (the transition
 * and verb tables, threads, transactions); this file implements it.
 *
 * Each job's run() executes in a thread of its own.  Everything else -- the
 * QMP verbs, completion, commit/abort/clean, dismissal -- happens on the main
 * thread: when run() returns, the job thread schedules job_completed_bh()
 * with main_loop_schedule() and exits.  One global mutex (job_lock)
 * protects the job list, every (L) field of every job and every JobTxn; one
 * global condition variable (job_cond, CLOCK_MONOTONIC) wakes job threads
 * that sleep in job_pause_point() or job_sleep_ns().
 *
 * Invariants:
 *   1. job->status only changes through job_transition_locked(), which
 *      checks the transition table, emits JOB_STATUS_CHANGE when the status
 *      really changes, and runs under job_lock.
 *   2. A job thread only moves its job between running and paused (or
 *      ready and standby); every other transition happens on the main
 *      thread, after the thread was joined (or before it was created).
 *   3. A job has finished running (job_finished_locked) exactly when its
 *      status is waiting, pending, aborting or concluded.  A job reaches
 *      waiting only with ret == 0 and its transaction not aborting.
 *   4. A transaction is finalized once (txn->finalized), when every member
 *      has finished running: commit for all (all waiting -> pending, then
 *      auto-finalize or job-finalize) or abort for all (any member failed or
 *      was cancelled; no job-finalize needed).  Every member of an aborting
 *      transaction that had not failed on its own is cancelled.
 *   5. Jobs are removed from the list and freed only on the main thread,
 *      after their thread was joined: QMP handlers may use a Job pointer
 *      without references.
 *   6. user_paused implies one unit of pause_count; cancel and resume give
 *      it back.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "block/block.h"
#include "job/job.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/main-loop.h"

#define JOB_SLICE_NS 100000000ULL      /* rate-limit time slice: 100 ms */

struct JobTxn {
    int refcnt;                         /* (L) one per job + the creator's */
    bool aborting;                      /* (L) a member failed/was cancelled */
    bool finalized;                     /* (L) commit/abort already ran */
};

static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_cond;
static pthread_once_t job_once = PTHREAD_ONCE_INIT;
static Job *job_list;                   /* (L) newest first, as QEMU lists */
static JobStatusHook *status_hook;      /* (L) */
static void *status_hook_opaque;        /* (L) */

/* QEMU's JobSTT: may a job go from [row] to [column]? */
static const bool job_stt[JOB_STATUS__MAX][JOB_STATUS__MAX] = {
    /*                          U  C  R  P  Y  S  W  D  X  E  N */
    [JOB_STATUS_UNDEFINED] = { 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
    [JOB_STATUS_CREATED]   = { 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1 },
    [JOB_STATUS_RUNNING]   = { 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0 },
    [JOB_STATUS_PAUSED]    = { 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0 },
    [JOB_STATUS_READY]     = { 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0 },
    [JOB_STATUS_STANDBY]   = { 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
    [JOB_STATUS_WAITING]   = { 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0 },
    [JOB_STATUS_PENDING]   = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
    [JOB_STATUS_ABORTING]  = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
    [JOB_STATUS_CONCLUDED] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 },
    [JOB_STATUS_NULL]      = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
};

/* QEMU's JobVerbTable: may [verb] be applied in [status]? */
static const bool job_verb_table[JOB_VERB__MAX][JOB_STATUS__MAX] = {
    /*                          U  C  R  P  Y  S  W  D  X  E  N */
    [JOB_VERB_CANCEL]      = { 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0 },
    [JOB_VERB_PAUSE]       = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
    [JOB_VERB_RESUME]      = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
    [JOB_VERB_SET_SPEED]   = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
    [JOB_VERB_COMPLETE]    = { 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
    [JOB_VERB_FINALIZE]    = { 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0 },
    [JOB_VERB_DISMISS]     = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0 },
    [JOB_VERB_CHANGE]      = { 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
};

static const char *const job_status_names[JOB_STATUS__MAX] = {
    [JOB_STATUS_UNDEFINED] = "undefined",
    [JOB_STATUS_CREATED] = "created",
    [JOB_STATUS_RUNNING] = "running",
    [JOB_STATUS_PAUSED] = "paused",
    [JOB_STATUS_READY] = "ready",
    [JOB_STATUS_STANDBY] = "standby",
    [JOB_STATUS_WAITING] = "waiting",
    [JOB_STATUS_PENDING] = "pending",
    [JOB_STATUS_ABORTING] = "aborting",
    [JOB_STATUS_CONCLUDED] = "concluded",
    [JOB_STATUS_NULL] = "null",
};

static const char *const job_verb_names[JOB_VERB__MAX] = {
    [JOB_VERB_CANCEL] = "cancel",
    [JOB_VERB_PAUSE] = "pause",
    [JOB_VERB_RESUME] = "resume",
    [JOB_VERB_SET_SPEED] = "set-speed",
    [JOB_VERB_COMPLETE] = "complete",
    [JOB_VERB_FINALIZE] = "finalize",
    [JOB_VERB_DISMISS] = "dismiss",
    [JOB_VERB_CHANGE] = "change",
};

static void job_init_once(void)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&job_cond, &attr);
    pthread_condattr_destroy(&attr);
}

static void job_init(void)
{
    pthread_once(&job_once, job_init_once);
}

static uint64_t job_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void *job_xmalloc0(size_t size)
{
    void *p = calloc(1, size);
    if (!p) {
        abort();
    }
    return p;
}

static char *job_xstrdup(const char *s)
{
    char *p = strdup(s);
    if (!p) {
        abort();
    }
    return p;
}

const char *job_status_name(JobStatus s)
{
    if ((int)s < 0 || s >= JOB_STATUS__MAX) {
        return "undefined";
    }
    return job_status_names[s];
}

void job_set_status_hook(JobStatusHook *fn, void *opaque)
{
    LOCK_GUARD(&job_lock);
    status_hook = fn;
    status_hook_opaque = opaque;
}

/* Invariant 1.  A forbidden transition is a bug in this file. */
static void job_transition_locked(Job *job, JobStatus to)
{
    JobStatus from = job->status;
    if (!job_stt[from][to]) {
        fprintf(stderr, "job '%s': invalid transition %s -> %s\n",
                job->id, job_status_name(from), job_status_name(to));
        abort();
    }
    job->status = to;
    if (from == to) {
        return;
    }
    if (job->ret < 0 && job->error && !job->cancelled &&
        (to == JOB_STATUS_ABORTING || to == JOB_STATUS_CONCLUDED)) {
        log_msg(LOG_LEVEL_WARNING, "job '%s' (%s): %s -> %s: %s", job->id,
                job->driver->type, job_status_name(from), job_status_name(to),
                job->error);
    } else {
        log_msg(LOG_LEVEL_INFO, "job '%s' (%s): %s -> %s", job->id,
                job->driver->type, job_status_name(from), job_status_name(to));
    }
    struct json_object *data = json_object_new_object();
    json_object_object_add(data, "id", json_object_new_string(job->id));
    json_object_object_add(data, "status",
                           json_object_new_string(job_status_name(to)));
    event_emit("JOB_STATUS_CHANGE", data);
    if (status_hook) {
        status_hook(job, to, status_hook_opaque);
    }
}

/* Wake every sleeper of this job (pause points, sleeps, driver waits). */
static void job_kick_locked(Job *job)
{
    job->wake_gen++;
    pthread_cond_broadcast(&job_cond);
    if (job->driver->kick) {
        job->driver->kick(job);
    }
}

/* Invariant 3. */
static bool job_finished_locked(Job *job)
{
    switch (job->status) {
    case JOB_STATUS_WAITING:
    case JOB_STATUS_PENDING:
    case JOB_STATUS_ABORTING:
    case JOB_STATUS_CONCLUDED:
    case JOB_STATUS_NULL:
        return true;
    default:
        return false;
    }
}

/* ---- transactions ---- */

JobTxn *job_txn_new(void)
{
    JobTxn *txn = job_xmalloc0(sizeof(*txn));
    txn->refcnt = 1;
    return txn;
}

static void job_txn_unref_locked(JobTxn *txn)
{
    if (txn && --txn->refcnt == 0) {
        free(txn);
    }
}

void job_txn_unref(JobTxn *txn)
{
    LOCK_GUARD(&job_lock);
    job_txn_unref_locked(txn);
}

/* The members of txn still in the list, oldest first (caller frees the
 * array); *ret_n gets their number. */
static Job **job_txn_members_locked(JobTxn *txn, size_t *ret_n)
{
    size_t n = 0;
    for (Job *j = job_list; j; j = j->next) {
        n += j->txn == txn;
    }
    Job **v = job_xmalloc0((n ? n : 1) * sizeof(*v));
    size_t i = n;
    for (Job *j = job_list; j; j = j->next) {
        if (j->txn == txn) {
            v[--i] = j;
        }
    }
    *ret_n = n;
    return v;
}

/* ---- creating, starting, freeing ---- */

static bool job_id_wellformed(const char *id)
{
    if (!((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z'))) {
        return false;
    }
    for (const char *p = id + 1; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_')) {
            return false;
        }
    }
    return true;
}

static Job *job_find_locked(const char *id)
{
    for (Job *j = job_list; j; j = j->next) {
        if (strcmp(j->id, id) == 0) {
            return j;
        }
    }
    return NULL;
}

/* The id job_create() would use, checked except for uniqueness. */
static const char *job_id_or_device(const char *job_id, const char *device,
                                    Error **errp)
{
    if (!job_id) {
        job_id = device;
    }
    if (!job_id) {
        error_setg(errp, "An explicit job ID is required");
        return NULL;
    }
    if (!job_id_wellformed(job_id)) {
        error_setg(errp, "Invalid job ID '%s'", job_id);
        return NULL;
    }
    return job_id;
}

static bool job_id_free_locked(const char *job_id, Error **errp)
{
    if (job_find_locked(job_id)) {
        error_setg(errp, "Job ID '%s' already in use", job_id);
        return false;
    }
    return true;
}

bool job_check_new_id(const char *job_id, const char *device, Error **errp)
{
    job_init();
    job_id = job_id_or_device(job_id, device, errp);
    if (!job_id) {
        return false;
    }
    LOCK_GUARD(&job_lock);
    return job_id_free_locked(job_id, errp);
}

Job *job_create(const JobDriver *driver, const char *job_id, const char *device,
                JobTxn *txn, bool auto_finalize, bool auto_dismiss,
                uint64_t speed, Error **errp)
{
    job_init();
    job_id = job_id_or_device(job_id, device, errp);
    if (!job_id) {
        return NULL;
    }
    if (driver->instance_size < sizeof(Job)) {
        error_setg(errp, "Job driver '%s' has a bad instance size",
                   driver->type);
        return NULL;
    }

    LOCK_GUARD(&job_lock);
    if (!job_id_free_locked(job_id, errp)) {
        return NULL;
    }
    Job *job = job_xmalloc0(driver->instance_size);
    job->driver = driver;
    job->id = job_xstrdup(job_id);
    job->device = job_xstrdup(job_id);   /* QEMU: "device" is the job id */
    job->auto_finalize = auto_finalize;
    job->auto_dismiss = auto_dismiss;
    job->speed = speed;
    job->status = JOB_STATUS_UNDEFINED;
    if (txn) {
        txn->refcnt++;
        job->txn = txn;
    } else {
        job->txn = job_txn_new();
    }
    job->next = job_list;
    job_list = job;
    job_transition_locked(job, JOB_STATUS_CREATED);
    return job;
}

/* Unlink a job from the list and move it to null (main thread). */
static void job_remove_locked(Job *job)
{
    job_transition_locked(job, JOB_STATUS_NULL);
    for (Job **pp = &job_list; *pp; pp = &(*pp)->next) {
        if (*pp == job) {
            *pp = job->next;
            break;
        }
    }
    job->next = NULL;
}

/* Free a removed job: the driver's part first (main thread, unlocked). */
static void job_free(Job *job)
{
    if (job->driver->free) {
        job->driver->free(job);
    }
    {
        LOCK_GUARD(&job_lock);
        job_txn_unref_locked(job->txn);
    }
    free(job->id);
    free(job->device);
    free(job->error);
    free(job);
}

static void job_completed_bh(void *opaque);

static void *job_thread_main(void *opaque)
{
    Job *job = opaque;
    Error *err = NULL;

    job_pause_point(job);           /* a pause before start is honoured */
    int ret = job->driver->run(job, &err);
    {
        LOCK_GUARD(&job_lock);
        job->ret = ret;
        if (ret < 0 && err && !job->error) {
            job->error = job_xstrdup(error_get_pretty(err));
        }
    }
    error_free(err);
    /* The main thread joins this thread before it touches the job. */
    main_loop_schedule(job_completed_bh, job);
    return NULL;
}

void job_start(Job *job)
{
    LOCK_GUARD(&job_lock);
    if (job->status != JOB_STATUS_CREATED || job->thread_started) {
        return;             /* cancelled before it started: nothing to run */
    }
    job_transition_locked(job, JOB_STATUS_RUNNING);
    job->thread_started = true;
    int r = pthread_create(&job->thread, NULL, job_thread_main, job);
    if (r != 0) {
        job->thread_started = false;
        job->ret = -r;
        job->error = job_xstrdup("Cannot start the job thread");
        main_loop_schedule(job_completed_bh, job);
    }
}

void job_early_fail(Job *job)
{
    if (!job) {
        return;
    }
    if (job->driver->abort) {
        job->driver->abort(job);
    }
    if (job->driver->clean) {
        job->driver->clean(job);
    }
    {
        LOCK_GUARD(&job_lock);
        job_remove_locked(job);
    }
    job_free(job);
}

/* ---- completion and finalization (main thread) ---- */

static void job_update_rc_locked(Job *job)
{
    if (job->ret == 0 && job->cancelled) {
        job->ret = -ECANCELED;
    }
    if (job->ret < 0 && !job->error) {
        job->error = job_xstrdup(strerror(-job->ret));
    }
}

/* Mark a job of an aborting transaction as cancelled.  A running job is
 * woken so that run() sees it; one that has not started (or has already
 * finished) moves to aborting at once. */
static void job_cancel_member_locked(Job *job)
{
    if (job->status == JOB_STATUS_CONCLUDED) {
        return;
    }
    if (!(job_finished_locked(job) && job->ret < 0)) {
        job->cancelled = true;      /* not a job that failed on its own */
    }
    if (job->user_paused) {
        job->user_paused = false;
        job->pause_count--;
        job->io_error_stopped = false;
        job->io_error_nospace = false;
    }
    if (job->status == JOB_STATUS_CREATED && !job->thread_started) {
        job_update_rc_locked(job);
        job_transition_locked(job, JOB_STATUS_ABORTING);
    } else if (job->status == JOB_STATUS_WAITING ||
               job->status == JOB_STATUS_PENDING) {
        job_update_rc_locked(job);
        job_transition_locked(job, JOB_STATUS_ABORTING);
    } else if (!job_finished_locked(job)) {
        job_kick_locked(job);
    }
}

static void job_txn_abort_locked(JobTxn *txn)
{
    size_t n;
    _cleanup_free_ Job **v = job_txn_members_locked(txn, &n);
    txn->aborting = true;
    for (size_t i = 0; i < n; i++) {
        job_cancel_member_locked(v[i]);
    }
}

static void job_emit_done_locked(Job *job)
{
    struct json_object *data = json_object_new_object();
    json_object_object_add(data, "type", json_object_new_string(job->driver->type));
    json_object_object_add(data, "device", json_object_new_string(job->device));
    json_object_object_add(data, "len", json_object_new_uint64(
        __atomic_load_n(&job->progress_total, __ATOMIC_RELAXED)));
    json_object_object_add(data, "offset", json_object_new_uint64(
        __atomic_load_n(&job->progress_current, __ATOMIC_RELAXED)));
    json_object_object_add(data, "speed", json_object_new_uint64(job->speed));
    if (job->cancelled) {
        event_emit("BLOCK_JOB_CANCELLED", data);
        return;
    }
    if (job->ret < 0 && job->error) {
        json_object_object_add(data, "error", json_object_new_string(job->error));
    }
    event_emit("BLOCK_JOB_COMPLETED", data);
}

/* Invariant 4: commit or abort every member, then clean every member, then
 * conclude (and maybe dismiss) each. */
static void job_txn_finalize(JobTxn *txn)
{
    size_t n;
    bool success;
    _cleanup_free_ Job **v = NULL;
    {
        LOCK_GUARD(&job_lock);
        if (txn->finalized) {
            return;
        }
        txn->finalized = true;
        success = !txn->aborting;
        v = job_txn_members_locked(txn, &n);
        txn->refcnt++;              /* keep txn alive while we work */
    }
    for (size_t i = 0; i < n; i++) {
        void (*fn)(Job *) = success ? v[i]->driver->commit : v[i]->driver->abort;
        if (fn) {
            fn(v[i]);
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (v[i]->driver->clean) {
            v[i]->driver->clean(v[i]);
        }
    }
    for (size_t i = 0; i < n; i++) {
        Job *job = v[i];
        bool removed = false;
        {
            LOCK_GUARD(&job_lock);
            job_emit_done_locked(job);
            job_transition_locked(job, JOB_STATUS_CONCLUDED);
            if (job->auto_dismiss) {
                job_remove_locked(job);
                removed = true;
            }
        }
        if (removed) {
            job_free(job);
        }
    }
    job_txn_unref(txn);
}

/* Move the transaction on once every member has finished running. */
static void job_txn_progress(JobTxn *txn)
{
    bool finalize = false;
    {
        LOCK_GUARD(&job_lock);
        if (txn->finalized) {
            return;
        }
        size_t n;
        _cleanup_free_ Job **v = job_txn_members_locked(txn, &n);
        for (size_t i = 0; i < n; i++) {
            if (!job_finished_locked(v[i])) {
                return;
            }
        }
        if (txn->aborting) {
            finalize = true;
        } else {
            bool all_auto = true;
            for (size_t i = 0; i < n; i++) {
                Job *job = v[i];
                all_auto &= job->auto_finalize;
                if (job->status != JOB_STATUS_WAITING) {
                    continue;
                }
                job_transition_locked(job, JOB_STATUS_PENDING);
                if (!job->auto_finalize) {
                    struct json_object *data = json_object_new_object();
                    json_object_object_add(data, "type",
                        json_object_new_string(job->driver->type));
                    json_object_object_add(data, "id",
                        json_object_new_string(job->id));
                    event_emit("BLOCK_JOB_PENDING", data);
                }
            }
            finalize = all_auto;
        }
    }
    if (finalize) {
        job_txn_finalize(txn);
    }
}

/* run() returned (or the job never ran): decide waiting vs aborting. */
static void job_completed(Job *job)
{
    JobTxn *txn;
    {
        LOCK_GUARD(&job_lock);
        txn = job->txn;
        job_update_rc_locked(job);
        if (job->ret < 0) {
            job_transition_locked(job, JOB_STATUS_ABORTING);
            job_txn_abort_locked(txn);
        } else {
            job_transition_locked(job, JOB_STATUS_WAITING);
        }
    }
    job_txn_progress(txn);
}

static void job_completed_bh(void *opaque)
{
    Job *job = opaque;
    if (job->thread_started) {
        pthread_join(job->thread, NULL);
        LOCK_GUARD(&job_lock);
        job->thread_started = false;
        job->sleeping = false;
    }
    /* The job's end changes bitmaps (successors merged or abdicated): one
     * change, durable once made (W9). */
    bdrv_dirty_bitmap_batch_begin();
    job_completed(job);
    bdrv_dirty_bitmap_batch_end();
}

/* ---- in the job's thread ---- */

void job_pause_point(Job *job)
{
    LOCK_GUARD(&job_lock);
    if (job->pause_count <= 0 || job->cancelled) {
        return;
    }
    if (job->status == JOB_STATUS_RUNNING) {
        job_transition_locked(job, JOB_STATUS_PAUSED);
        job->paused = true;
    } else if (job->status == JOB_STATUS_READY) {
        job_transition_locked(job, JOB_STATUS_STANDBY);
        job->paused = true;
    }
    job->pause_waiters++;
    while (job->pause_count > 0 && !job->cancelled) {
        pthread_cond_wait(&job_cond, &job_lock);
    }
    job->pause_waiters--;
    if (job->paused) {
        /* the first thread out resumes the job for everyone */
        job->paused = false;
        job_transition_locked(job, job->status == JOB_STATUS_STANDBY ?
                              JOB_STATUS_READY : JOB_STATUS_RUNNING);
    }
}

bool job_is_cancelled(Job *job)
{
    LOCK_GUARD(&job_lock);
    return job->cancelled;
}

void job_sleep_ns(Job *job, int64_t ns)
{
    if (ns <= 0) {
        return;
    }
    uint64_t deadline = job_now_ns() + (uint64_t)ns;
    struct timespec ts = {
        .tv_sec = (time_t)(deadline / 1000000000ULL),
        .tv_nsec = (long)(deadline % 1000000000ULL),
    };
    LOCK_GUARD(&job_lock);
    unsigned gen = job->wake_gen;
    job->sleeping = true;
    while (!job->cancelled && job->pause_count == 0 && job->wake_gen == gen) {
        if (pthread_cond_timedwait(&job_cond, &job_lock, &ts) == ETIMEDOUT) {
            break;
        }
    }
    job->sleeping = false;
}

/* QEMU's ratelimit: a quota of speed/10 bytes per 100 ms slice; using more
 * than the quota stretches the slice in proportion, and the caller waits
 * until the stretched slice ends. */
static uint64_t job_rate_limit_delay_locked(Job *job, uint64_t bytes,
                                            uint64_t now)
{
    if (job->speed == 0) {
        return 0;
    }
    uint64_t quota = (uint64_t)((double)job->speed * JOB_SLICE_NS / 1e9);
    if (quota == 0) {
        quota = 1;
    }
    if (job->rl_slice_end < now) {
        job->rl_slice_start = now;
        job->rl_slice_end = now + JOB_SLICE_NS;
        job->rl_dispatched = 0;
    }
    job->rl_dispatched += bytes;
    if (job->rl_dispatched < quota) {
        return 0;
    }
    double slices = (double)job->rl_dispatched / (double)quota;
    job->rl_slice_end = job->rl_slice_start + (uint64_t)(slices * JOB_SLICE_NS);
    return job->rl_slice_end > now ? job->rl_slice_end - now : 0;
}

uint64_t job_rate_limit_delay_ns(Job *job, uint64_t bytes, uint64_t now_ns)
{
    LOCK_GUARD(&job_lock);
    return job_rate_limit_delay_locked(job, bytes, now_ns);
}

void job_rate_limit(Job *job, uint64_t bytes)
{
    uint64_t delay = job_rate_limit_delay_ns(job, bytes, job_now_ns());
    while (delay > 0 && !job_is_cancelled(job)) {
        job_sleep_ns(job, (int64_t)MIN(delay, (uint64_t)INT64_MAX));
        job_pause_point(job);
        delay = job_rate_limit_delay_ns(job, 0, job_now_ns());
    }
}

void job_progress_set_total(Job *job, uint64_t total)
{
    __atomic_store_n(&job->progress_total, total, __ATOMIC_RELAXED);
}

void job_progress_add_total(Job *job, uint64_t bytes)
{
    __atomic_add_fetch(&job->progress_total, bytes, __ATOMIC_RELAXED);
}

void job_progress_update(Job *job, uint64_t done)
{
    __atomic_add_fetch(&job->progress_current, done, __ATOMIC_RELAXED);
}

JobErrorAction job_error_action(Job *job, BlockdevOnError on_err,
                                bool is_read, int error)
{
    const char *action;
    bool stop = false;
    int errnum = error < 0 ? -error : error;

    switch (on_err) {
    case BLOCKDEV_ON_ERROR_IGNORE:
        action = "ignore";
        break;
    case BLOCKDEV_ON_ERROR_STOP:
        stop = true;
        action = "stop";
        break;
    case BLOCKDEV_ON_ERROR_ENOSPC:
        stop = errnum == ENOSPC;
        action = stop ? "stop" : "report";
        break;
    case BLOCKDEV_ON_ERROR_REPORT:
    case BLOCKDEV_ON_ERROR_AUTO:
    default:
        action = "report";
        break;
    }

    {
        LOCK_GUARD(&job_lock);
        struct json_object *data = json_object_new_object();
        json_object_object_add(data, "device", json_object_new_string(job->device));
        json_object_object_add(data, "operation",
                               json_object_new_string(is_read ? "read" : "write"));
        json_object_object_add(data, "action", json_object_new_string(action));
        event_emit("BLOCK_JOB_ERROR", data);
        if (stop) {
            if (job->cancelled) {
                return JOB_ERROR_ACTION_REPORT;
            }
            if (!job->user_paused) {
                job->user_paused = true;
                job->pause_count++;
            }
            job->io_error_stopped = true;
            job->io_error_nospace = errnum == ENOSPC;
        }
    }
    if (!stop) {
        return on_err == BLOCKDEV_ON_ERROR_IGNORE ? JOB_ERROR_ACTION_RETRY
                                                  : JOB_ERROR_ACTION_REPORT;
    }
    job_pause_point(job);
    return job_is_cancelled(job) ? JOB_ERROR_ACTION_REPORT
                                 : JOB_ERROR_ACTION_RETRY;
}

/* ---- QMP-facing (main thread) ---- */

Job *job_find(const char *id)
{
    LOCK_GUARD(&job_lock);
    return id ? job_find_locked(id) : NULL;
}

Job *job_next(Job *job)
{
    LOCK_GUARD(&job_lock);
    return job ? job->next : job_list;
}

static bool job_apply_verb_locked(Job *job, JobVerb verb, Error **errp)
{
    if ((int)verb >= 0 && verb < JOB_VERB__MAX &&
        job_verb_table[verb][job->status]) {
        return true;
    }
    error_setg(errp, "Job '%s' in state '%s' cannot accept command verb '%s'",
               job->id, job_status_name(job->status),
               (int)verb >= 0 && verb < JOB_VERB__MAX ? job_verb_names[verb]
                                                      : "unknown");
    return false;
}

bool job_apply_verb(Job *job, JobVerb verb, Error **errp)
{
    LOCK_GUARD(&job_lock);
    return job_apply_verb_locked(job, verb, errp);
}

bool job_user_paused(Job *job)
{
    LOCK_GUARD(&job_lock);
    return job->user_paused;
}

void job_user_pause(Job *job, Error **errp)
{
    LOCK_GUARD(&job_lock);
    if (!job_apply_verb_locked(job, JOB_VERB_PAUSE, errp)) {
        return;
    }
    if (job->user_paused) {
        error_setg(errp, "Job is already paused");
        return;
    }
    job->user_paused = true;
    job->pause_count++;
    job_kick_locked(job);
}

void job_user_resume(Job *job, Error **errp)
{
    LOCK_GUARD(&job_lock);
    if (!job->user_paused) {
        error_setg(errp, "Can't resume a job that was not paused");
        return;
    }
    if (!job_apply_verb_locked(job, JOB_VERB_RESUME, errp)) {
        return;
    }
    job->user_paused = false;
    job->pause_count--;
    job->io_error_stopped = false;
    job->io_error_nospace = false;
    job_kick_locked(job);
}

/* Cancel without the verb check (job_user_cancel and shutdown). */
static void job_cancel(Job *job, bool force)
{
    JobTxn *txn;
    {
        LOCK_GUARD(&job_lock);
        if (job->status == JOB_STATUS_CONCLUDED ||
            job->status == JOB_STATUS_ABORTING || job->txn->finalized) {
            return;
        }
        job->force_cancel |= force;
        txn = job->txn;
        if (job_finished_locked(job) ||
            (job->status == JOB_STATUS_CREATED && !job->thread_started)) {
            /* Nothing runs: the transaction aborts now. */
            job->cancelled = true;
            job_txn_abort_locked(txn);
        } else {
            /* run() sees it and returns; job_completed() aborts the txn. */
            job->cancelled = true;
            if (job->user_paused) {
                job->user_paused = false;
                job->pause_count--;
                job->io_error_stopped = false;
                job->io_error_nospace = false;
            }
            job_kick_locked(job);
            return;
        }
    }
    job_txn_progress(txn);
}

void job_user_cancel(Job *job, bool force, Error **errp)
{
    if (!job_apply_verb(job, JOB_VERB_CANCEL, errp)) {
        return;
    }
    job_cancel(job, force);
}

void job_finalize(Job *job, Error **errp)
{
    if (!job_apply_verb(job, JOB_VERB_FINALIZE, errp)) {
        return;
    }
    job_txn_finalize(job->txn);
}

void job_dismiss(Job *job, Error **errp)
{
    {
        LOCK_GUARD(&job_lock);
        if (!job_apply_verb_locked(job, JOB_VERB_DISMISS, errp)) {
            return;
        }
        job_remove_locked(job);
    }
    job_free(job);
}

bool job_set_speed(Job *job, int64_t speed, Error **errp)
{
    LOCK_GUARD(&job_lock);
    if (!job_apply_verb_locked(job, JOB_VERB_SET_SPEED, errp)) {
        return false;
    }
    if (speed < 0) {
        error_setg(errp, "Parameter 'speed' expects a non-negative value");
        return false;
    }
    uint64_t old = job->speed;
    job->speed = (uint64_t)speed;
    if (speed == 0 || (uint64_t)speed > old) {
        /* faster (or unlimited): end a rate-limit sleep now */
        job->wake_gen++;
        pthread_cond_broadcast(&job_cond);
    }
    return true;
}

void job_cancel_sync_all(void)
{
    job_init();
    for (;;) {
        Job *victim = NULL;
        bool dismiss = false;
        bool any = false;
        {
            LOCK_GUARD(&job_lock);
            for (Job *j = job_list; j; j = j->next) {
                any = true;
                if (j->status == JOB_STATUS_CONCLUDED) {
                    victim = j;
                    dismiss = true;
                    break;
                }
                if (!j->cancelled && !j->txn->finalized &&
                    job_verb_table[JOB_VERB_CANCEL][j->status]) {
                    victim = j;
                    break;
                }
            }
        }
        if (!any) {
            return;
        }
        if (victim && dismiss) {
            job_dismiss(victim, NULL);
            continue;
        }
        if (victim) {
            job_cancel(victim, true);
            continue;
        }
        if (main_loop_run_pending() == 0) {
            usleep(2000);
        }
    }
}

/* ---- query-jobs / query-block-jobs ---- */

struct json_object *job_query_info(Job *job)
{
    LOCK_GUARD(&job_lock);
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "id", json_object_new_string(job->id));
    json_object_object_add(o, "type", json_object_new_string(job->driver->type));
    json_object_object_add(o, "status",
                           json_object_new_string(job_status_name(job->status)));
    json_object_object_add(o, "current-progress", json_object_new_uint64(
        __atomic_load_n(&job->progress_current, __ATOMIC_RELAXED)));
    json_object_object_add(o, "total-progress", json_object_new_uint64(
        __atomic_load_n(&job->progress_total, __ATOMIC_RELAXED)));
    if (job->ret < 0 && job->error) {
        json_object_object_add(o, "error", json_object_new_string(job->error));
    }
    return o;
}

struct json_object *job_query_block_info(Job *job)
{
    LOCK_GUARD(&job_lock);
    bool busy = (job->status == JOB_STATUS_RUNNING ||
                 job->status == JOB_STATUS_READY) &&
                job->thread_started && !job->sleeping && !job->paused;
    const char *io_status = !job->io_error_stopped ? "ok" :
                            job->io_error_nospace ? "nospace" : "failed";
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "type", json_object_new_string(job->driver->type));
    json_object_object_add(o, "device", json_object_new_string(job->device));
    json_object_object_add(o, "len", json_object_new_uint64(
        __atomic_load_n(&job->progress_total, __ATOMIC_RELAXED)));
    json_object_object_add(o, "offset", json_object_new_uint64(
        __atomic_load_n(&job->progress_current, __ATOMIC_RELAXED)));
    json_object_object_add(o, "busy", json_object_new_boolean(busy));
    json_object_object_add(o, "paused", json_object_new_boolean(job->pause_count > 0));
    json_object_object_add(o, "speed", json_object_new_uint64(job->speed));
    json_object_object_add(o, "io-status", json_object_new_string(io_status));
    json_object_object_add(o, "ready", json_object_new_boolean(
        job->status == JOB_STATUS_READY || job->status == JOB_STATUS_STANDBY));
    json_object_object_add(o, "status",
                           json_object_new_string(job_status_name(job->status)));
    json_object_object_add(o, "auto-finalize",
                           json_object_new_boolean(job->auto_finalize));
    json_object_object_add(o, "auto-dismiss",
                           json_object_new_boolean(job->auto_dismiss));
    if (job->ret < 0 && job->error) {
        json_object_object_add(o, "error", json_object_new_string(job->error));
    }
    return o;
}
