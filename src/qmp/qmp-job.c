/*
 * QMP commands for jobs, with QEMU 7.2's names, arguments and errors:
 * query-jobs, query-block-jobs, job-{pause,resume,cancel,complete,finalize,
 * dismiss} {id} and block-job-{cancel,pause,resume,complete,set-speed,
 * finalize,dismiss}.  The job-* commands report an unknown id as
 * GenericError "Job not found"; the block-job-* ones as DeviceNotActive
 * "Block job 'X' not found".  A verb that the job's state does not allow
 * fails with job.c's "Job 'X' in state 'S' cannot accept command verb 'V'".
 * The lifecycle itself lives in job.c; this file only looks jobs up and
 * calls it.
 */
#include <stdio.h>
#include <string.h>

#include "qmp/qmp-internal.h"
#include "util/cleanup.h"

static Job *find_job(const char *id, Error **errp)
{
    Job *job = job_find(id);
    if (!job) {
        error_setg(errp, "Job not found");
    }
    return job;
}

static Job *find_block_job(const char *id, Error **errp)
{
    Job *job = job_find(id);
    if (!job) {
        error_set(errp, ERROR_CLASS_DEVICE_NOT_ACTIVE,
                  "Block job '%s' not found", id);
    }
    return job;
}

/* QEMU's job_complete: only a ready job with a .complete callback (none of
 * ours) can be completed. */
static bool job_complete(Job *job, Error **errp)
{
    if (!job_apply_verb(job, JOB_VERB_COMPLETE, errp)) {
        return false;
    }
    error_setg(errp, "The active block job '%s' cannot be completed", job->id);
    return false;
}

/* A void verb's result as a QMP reply. */
static struct json_object *verb_reply(Error *err, Error **errp)
{
    if (err) {
        error_propagate(errp, err);
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_query_jobs(struct json_object *args, Error **errp)
{
    (void)args;
    (void)errp;
    struct json_object *list = json_object_new_array();
    for (Job *job = job_next(NULL); job; job = job_next(job)) {
        json_object_array_add(list, job_query_info(job));
    }
    return list;
}

static struct json_object *qmp_query_block_jobs(struct json_object *args,
                                                Error **errp)
{
    (void)args;
    (void)errp;
    struct json_object *list = json_object_new_array();
    for (Job *job = job_next(NULL); job; job = job_next(job)) {
        json_object_array_add(list, job_query_block_info(job));
    }
    return list;
}

/* ---- job-* {id} ---- */

static struct json_object *qmp_job_pause(struct json_object *args, Error **errp)
{
    Error *err = NULL;
    Job *job = find_job(json_opt_str(args, "id"), errp);
    if (!job) {
        return NULL;
    }
    job_user_pause(job, &err);
    return verb_reply(err, errp);
}

static struct json_object *qmp_job_resume(struct json_object *args, Error **errp)
{
    Error *err = NULL;
    Job *job = find_job(json_opt_str(args, "id"), errp);
    if (!job) {
        return NULL;
    }
    job_user_resume(job, &err);
    return verb_reply(err, errp);
}

static struct json_object *qmp_job_cancel(struct json_object *args, Error **errp)
{
    Error *err = NULL;
    Job *job = find_job(json_opt_str(args, "id"), errp);
    if (!job) {
        return NULL;
    }
    job_user_cancel(job, true, &err);
    return verb_reply(err, errp);
}

static struct json_object *qmp_job_complete(struct json_object *args, Error **errp)
{
    Job *job = find_job(json_opt_str(args, "id"), errp);
    if (!job || !job_complete(job, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_job_finalize(struct json_object *args, Error **errp)
{
    Error *err = NULL;
    Job *job = find_job(json_opt_str(args, "id"), errp);
    if (!job) {
        return NULL;
    }
    job_finalize(job, &err);
    return verb_reply(err, errp);
}

static struct json_object *qmp_job_dismiss(struct json_object *args, Error **errp)
{
    Error *err = NULL;
    Job *job = find_job(json_opt_str(args, "id"), errp);
    if (!job) {
        return NULL;
    }
    job_dismiss(job, &err);
    return verb_reply(err, errp);
}

/* ---- block-job-* ---- */

static struct json_object *qmp_block_job_cancel(struct json_object *args,
                                                Error **errp)
{
    Error *err = NULL;
    const char *device = json_opt_str(args, "device");
    bool force = json_opt_bool(args, "force", false);
    Job *job = find_block_job(device, errp);
    if (!job) {
        return NULL;
    }
    if (job_user_paused(job) && !force) {
        error_setg(errp, "The block job for device '%s' is currently paused",
                   device);
        return NULL;
    }
    job_user_cancel(job, force, &err);
    return verb_reply(err, errp);
}

static struct json_object *qmp_block_job_pause(struct json_object *args,
                                               Error **errp)
{
    Error *err = NULL;
    Job *job = find_block_job(json_opt_str(args, "device"), errp);
    if (!job) {
        return NULL;
    }
    job_user_pause(job, &err);
    return verb_reply(err, errp);
}

static struct json_object *qmp_block_job_resume(struct json_object *args,
                                                Error **errp)
{
    Error *err = NULL;
    Job *job = find_block_job(json_opt_str(args, "device"), errp);
    if (!job) {
        return NULL;
    }
    job_user_resume(job, &err);
    return verb_reply(err, errp);
}

static struct json_object *qmp_block_job_complete(struct json_object *args,
                                                  Error **errp)
{
    Job *job = find_block_job(json_opt_str(args, "device"), errp);
    if (!job || !job_complete(job, errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_block_job_set_speed(struct json_object *args,
                                                   Error **errp)
{
    Job *job = find_block_job(json_opt_str(args, "device"), errp);
    if (!job || !job_set_speed(job, json_opt_int(args, "speed", 0), errp)) {
        return NULL;
    }
    return json_object_new_object();
}

static struct json_object *qmp_block_job_finalize(struct json_object *args,
                                                  Error **errp)
{
    Error *err = NULL;
    Job *job = find_block_job(json_opt_str(args, "id"), errp);
    if (!job) {
        return NULL;
    }
    job_finalize(job, &err);
    return verb_reply(err, errp);
}

static struct json_object *qmp_block_job_dismiss(struct json_object *args,
                                                 Error **errp)
{
    Error *err = NULL;
    Job *job = find_block_job(json_opt_str(args, "id"), errp);
    if (!job) {
        return NULL;
    }
    job_dismiss(job, &err);
    return verb_reply(err, errp);
}

static const QmpArgSpec no_args[] = { { NULL } };
static const QmpArgSpec id_args[] = {
    { "id", QMP_ARG_STR, false },
    { NULL },
};
static const QmpArgSpec device_args[] = {
    { "device", QMP_ARG_STR, false },
    { NULL },
};
static const QmpArgSpec cancel_args[] = {
    { "device", QMP_ARG_STR, false },
    { "force", QMP_ARG_BOOL, true },
    { NULL },
};
static const QmpArgSpec speed_args[] = {
    { "device", QMP_ARG_STR, false },
    { "speed", QMP_ARG_INT, false },
    { NULL },
};

void qmp_register_job_commands(void)
{
    qmp_register_command_spec("query-jobs", qmp_query_jobs, no_args);
    qmp_register_command_spec("query-block-jobs", qmp_query_block_jobs, no_args);
    qmp_register_command_spec("job-pause", qmp_job_pause, id_args);
    qmp_register_command_spec("job-resume", qmp_job_resume, id_args);
    qmp_register_command_spec("job-cancel", qmp_job_cancel, id_args);
    qmp_register_command_spec("job-complete", qmp_job_complete, id_args);
    qmp_register_command_spec("job-finalize", qmp_job_finalize, id_args);
    qmp_register_command_spec("job-dismiss", qmp_job_dismiss, id_args);
    qmp_register_command_spec("block-job-cancel", qmp_block_job_cancel, cancel_args);
    qmp_register_command_spec("block-job-pause", qmp_block_job_pause, device_args);
    qmp_register_command_spec("block-job-resume", qmp_block_job_resume, device_args);
    qmp_register_command_spec("block-job-complete", qmp_block_job_complete,
                              device_args);
    qmp_register_command_spec("block-job-set-speed", qmp_block_job_set_speed,
                              speed_args);
    qmp_register_command_spec("block-job-finalize", qmp_block_job_finalize, id_args);
    qmp_register_command_spec("block-job-dismiss", qmp_block_job_dismiss, id_args);
}
