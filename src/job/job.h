/*
 * Jobs: long-running background operations (backups) with QEMU's job
 * lifecycle (qapi/job.json), so that scripts written for
 * qemu-storage-daemon drive them unchanged.
 *
 * States and the transitions job.c allows (QEMU's JobSTT):
 *
 *   from \ to   C  R  P  Y  S  W  D  X  E  N
 *   created     .  x  .  .  .  .  .  x  .  x
 *   running     .  .  x  x  .  x  .  x  .  .
 *   paused      .  x  .  .  .  .  .  .  .  .
 *   ready       .  .  .  .  x  x  .  x  .  .
 *   standby     .  .  .  x  .  .  .  .  .  .
 *   waiting     .  .  .  .  .  .  x  x  .  .
 *   pending     .  .  .  .  .  .  .  x  x  .
 *   aborting    .  .  .  .  .  .  .  x  x  .
 *   concluded   .  .  .  .  .  .  .  .  .  x
 *   (C created, R running, P paused, Y ready, S standby, W waiting,
 *    D pending, X aborting, E concluded, N null)
 *
 * Verbs allowed per state (else "Job 'ID' in state 'S' cannot accept
 * command verb 'V'"):
 *   cancel     created running paused ready standby waiting pending
 *   pause      created running paused ready standby
 *   resume     created running paused ready standby
 *   set-speed  created running paused ready standby
 *   complete   ready
 *   finalize   pending
 *   dismiss    concluded
 *   change     running paused ready standby
 *
 * The normal path of a backup: created -> running -> waiting (its
 * transaction's other jobs are still running) -> pending (auto-finalize, or
 * job-finalize) -> concluded (after commit/abort and clean) -> null
 * (auto-dismiss, or job-dismiss).  A failure or cancel passes through
 * aborting.  Every change emits JOB_STATUS_CHANGE {"id", "status"}.
 * BLOCK_JOB_COMPLETED / BLOCK_JOB_CANCELLED are emitted when the job
 * finalizes (between pending/aborting and concluded), as QEMU does;
 * BLOCK_JOB_PENDING {"type", "id"} when a job with auto-finalize=false
 * reaches pending.  query-jobs' "error" of a cancelled job is
 * strerror(ECANCELED), "Operation canceled", as in QEMU.
 *
 * Threads: each job's run() executes in its own thread (marked internal for
 * drains, see block.h).  Every state change, the driver's commit / abort /
 * clean, and all graph changes happen on the main thread: when run()
 * returns, the job thread schedules its completion on the main loop
 * (main_loop_schedule).  The job list and the fields marked (L) are
 * protected by a global job mutex; run() reads them through the accessors
 * below.
 *
 * Transactions: jobs in one JobTxn complete together (QMP transaction with
 * completion-mode "grouped").  When one fails or is cancelled, the others
 * are cancelled; only when all have finished running do they move on, and
 * then either every job commits or every job aborts.  A job alone gets a
 * transaction of its own.
 */
#ifndef BITBACK_JOB_H
#define BITBACK_JOB_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <json-c/json.h>
#include "util/error.h"

typedef enum JobStatus {
    JOB_STATUS_UNDEFINED,
    JOB_STATUS_CREATED,
    JOB_STATUS_RUNNING,
    JOB_STATUS_PAUSED,
    JOB_STATUS_READY,
    JOB_STATUS_STANDBY,
    JOB_STATUS_WAITING,
    JOB_STATUS_PENDING,
    JOB_STATUS_ABORTING,
    JOB_STATUS_CONCLUDED,
    JOB_STATUS_NULL,
    JOB_STATUS__MAX,
} JobStatus;

typedef enum JobVerb {
    JOB_VERB_CANCEL,
    JOB_VERB_PAUSE,
    JOB_VERB_RESUME,
    JOB_VERB_SET_SPEED,
    JOB_VERB_COMPLETE,
    JOB_VERB_FINALIZE,
    JOB_VERB_DISMISS,
    JOB_VERB_CHANGE,
    JOB_VERB__MAX,
} JobVerb;

/* QMP's BlockdevOnError. */
typedef enum BlockdevOnError {
    BLOCKDEV_ON_ERROR_REPORT,   /* fail the job */
    BLOCKDEV_ON_ERROR_IGNORE,   /* retry the operation */
    BLOCKDEV_ON_ERROR_ENOSPC,   /* stop on ENOSPC, else report */
    BLOCKDEV_ON_ERROR_STOP,     /* pause the job; resume retries */
    BLOCKDEV_ON_ERROR_AUTO,     /* as report for jobs */
} BlockdevOnError;

/* What run() should do after an I/O error (job_error_action). */
typedef enum JobErrorAction {
    JOB_ERROR_ACTION_REPORT,    /* give up: return the error from run() */
    JOB_ERROR_ACTION_RETRY,     /* try the same operation again */
} JobErrorAction;

typedef struct Job Job;
typedef struct JobTxn JobTxn;

typedef struct JobDriver {
    const char *type;           /* QMP JobType: "backup" */
    size_t instance_size;       /* bytes allocated for the job, >= sizeof(Job);
                                   the driver's struct starts with a Job */

    /* The work, in the job's thread.  Returns 0 on success, -ECANCELED
     * when it stopped because job_is_cancelled(), or another -errno with
     * errp set (the message shown in BLOCK_JOB_COMPLETED "error" and
     * query-jobs "error").  Call job_pause_point() often. */
    int (*run)(Job *job, Error **errp);

    /* Main thread, after every job of the transaction finished running:
     * exactly one of commit (all succeeded) or abort (any failed or was
     * cancelled), then clean.  All optional. */
    void (*commit)(Job *job);
    void (*abort)(Job *job);
    void (*clean)(Job *job);
    /* Free the driver's resources (main thread; the Job itself is freed by
     * job.c).  Also runs for jobs that never started (job_early_fail). */
    void (*free)(Job *job);
    /* Called (any thread, job lock held) when the job is cancelled, paused
     * or resumed, so run() can be woken from a driver-specific wait. */
    void (*kick)(Job *job);
} JobDriver;

struct Job {
    const JobDriver *driver;
    char *id;
    JobStatus status;               /* (L) */
    bool auto_finalize;
    bool auto_dismiss;
    /* Block jobs (all of ours): the "device" shown by query-block-jobs and
     * BLOCK_JOB_* events, usually the job id. */
    char *device;

    /* Progress, bytes (atomic): exact -- current == total on success. */
    uint64_t progress_current;
    uint64_t progress_total;
    uint64_t speed;                 /* (L) bytes/s, 0 = unlimited */

    /* (L) state driven by the QMP verbs */
    bool cancelled;
    bool force_cancel;              /* block-job-cancel force=true */
    int pause_count;                /* > 0: the job should pause */
    bool paused;                    /* the job thread sits in a pause point */
    bool user_paused;
    int ret;                        /* result of run(), when finished */
    char *error;                    /* message when ret < 0 and not cancelled */
    bool io_error_stopped;          /* paused by on-*-error=stop */

    JobTxn *txn;
    pthread_t thread;
    bool thread_started;
    Job *next;                      /* global list (L) */

    /* (L) private to job.c */
    bool sleeping;                  /* a thread sits in job_sleep_ns() */
    bool io_error_nospace;          /* stopped on ENOSPC: io-status nospace */
    int pause_waiters;              /* threads parked in job_pause_point() */
    unsigned wake_gen;              /* bumped to end job_sleep_ns() early */
    uint64_t rl_slice_start;        /* rate limit: current slice, ns */
    uint64_t rl_slice_end;
    uint64_t rl_dispatched;         /* bytes accounted in the slice */
};

/* ---- creating and starting (main thread) ---- */

/* A new transaction for grouped completion (refcounted: each job in it
 * holds one reference, the creator the first). */
JobTxn *job_txn_new(void);
void job_txn_unref(JobTxn *txn);

/* The checks job_create() makes on an id (job_id NULL: `device`): present,
 * a valid QMP id, not in use.  For commands that must refuse a bad id
 * before they change anything.  Returns false with errp set. */
bool job_check_new_id(const char *job_id, const char *device, Error **errp);

/* Create a job in state "created" (emits JOB_STATUS_CHANGE created).
 * job_id NULL means: use `device` (QEMU's default for block jobs).  The id
 * must be a valid QMP id and unique among jobs ("Job ID 'x' already in use").
 * txn NULL gives the job a transaction of its own.  The job is not running
 * until job_start(). */
Job *job_create(const JobDriver *driver, const char *job_id, const char *device,
                JobTxn *txn, bool auto_finalize, bool auto_dismiss,
                uint64_t speed, Error **errp);
/* Start run() in a new thread (created -> running). */
void job_start(Job *job);
/* A job that never started (a failed transaction): runs abort, clean and
 * free silently, and removes the job (no events besides the status changes
 * to null). */
void job_early_fail(Job *job);

/* ---- called from run() (the job's thread) ---- */

/* Blocks while the job is paused (status paused); returns at once
 * otherwise. */
void job_pause_point(Job *job);
bool job_is_cancelled(Job *job);
/* Sleep up to ns nanoseconds; returns early on cancel or pause request. */
void job_sleep_ns(Job *job, int64_t ns);
/* Rate limiting: account `bytes` just done and sleep so that throughput
 * stays at job->speed (no-op when speed is 0).  Uses time slices of 100 ms
 * like QEMU's ratelimit.  Wakes early on cancel, a faster set-speed, and
 * parks in job_pause_point() when a pause is requested meanwhile. */
void job_rate_limit(Job *job, uint64_t bytes);
void job_progress_set_total(Job *job, uint64_t total);
void job_progress_add_total(Job *job, uint64_t bytes);
void job_progress_update(Job *job, uint64_t done);
/* An I/O error happened: applies `on_err` as QEMU's block_job_error_action
 * does.  Emits BLOCK_JOB_ERROR {"device", "operation": "read"|"write",
 * "action": "report"|"ignore"|"stop"}.  For stop, the job pauses (status
 * paused, io-status "failed") and this returns RETRY once the user resumes
 * it, or REPORT when it is cancelled meanwhile.  For ignore: RETRY. */
JobErrorAction job_error_action(Job *job, BlockdevOnError on_err,
                                bool is_read, int error);

/* ---- QMP-facing (main thread) ---- */

Job *job_find(const char *id);
/* Iterate: first with NULL. */
Job *job_next(Job *job);
/* Checks that `verb` is allowed in the job's state (QEMU's message). */
bool job_apply_verb(Job *job, JobVerb verb, Error **errp);
/* Paused by job-pause (or on-*-error=stop) and not resumed yet. */
bool job_user_paused(Job *job);
void job_user_pause(Job *job, Error **errp);
void job_user_resume(Job *job, Error **errp);
void job_user_cancel(Job *job, bool force, Error **errp);
void job_finalize(Job *job, Error **errp);
void job_dismiss(Job *job, Error **errp);
bool job_set_speed(Job *job, int64_t speed, Error **errp);
/* Cancel every job and wait for each to conclude (daemon shutdown); jobs
 * end as cancelled and are dismissed. */
void job_cancel_sync_all(void);

const char *job_status_name(JobStatus s);
/* query-jobs / query-block-jobs entries (new references). */
struct json_object *job_query_info(Job *job);
struct json_object *job_query_block_info(Job *job);

/* ---- for tests ---- */

/* Called under the job lock on every status change (any thread), after the
 * JOB_STATUS_CHANGE event is emitted.  NULL removes the hook. */
typedef void JobStatusHook(Job *job, JobStatus new_status, void *opaque);
void job_set_status_hook(JobStatusHook *fn, void *opaque);
/* The rate limiter's arithmetic (job_rate_limit uses it): account `bytes`
 * at time now_ns (CLOCK_MONOTONIC) and return how many ns to wait before
 * more I/O, 0 when the slice's quota (speed / 10 per 100 ms) is not used
 * up.  Thread-safe. */
uint64_t job_rate_limit_delay_ns(Job *job, uint64_t bytes, uint64_t now_ns);

#endif
