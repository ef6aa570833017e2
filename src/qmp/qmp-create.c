/*
 * blockdev-create: QEMU's image creation job, for the drivers "file" (an
 * empty file of `size` bytes at `filename`), "qcow2" (a qcow2 image of
 * `size` written into the existing protocol node `file`) and bitback's
 * "qbm" (a QBM descriptor at `filename` with its data image, as
 * `bitback img create -f qbm` makes it: its files sit next to each other,
 * so it is made from a file name, not in a node).  As in QEMU the
 * command only starts a job of type "create" (auto-dismiss off: the
 * client waits for it to conclude, reads its error in query-jobs, then
 * job-dismiss); the writing happens in the job's thread.  It is how a
 * client on another host makes the daemon's files, e.g. the fleecing
 * overlay of `bitback backup --pull` (docs/qmp.md, "blockdev-create").
 *
 * Arguments and errors follow QEMU's BlockdevCreateOptions:
 *   file:  filename, size, [preallocation: off], [nocow], [extent-size-hint]
 *   qcow2: file (a node name), size, [version: v3], [cluster-size],
 *          [backing-file], [backing-fmt], [lazy-refcounts: false],
 *          [refcount-bits: 16], [compression-type: zlib|zstd],
 *          [preallocation: off]
 *   qbm:   filename, size, [data-file], [data-format: raw], [backing],
 *          [backing-format], [granularity: 65536]
 * The qcow2 job holds a reference to its file node until it ends.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/qmp-internal.h"
#include "util/cleanup.h"

typedef struct CreateJob {
    Job job;
    char *filename;                /* file */
    BlockDriverState *file;        /* qcow2: referenced */
    const char *format;            /* "raw" (for file), "qcow2", "qbm" */
    uint64_t size;
    struct json_object *opts;      /* the driver's create options */
} CreateJob;

static int create_run(Job *job, Error **errp)
{
    CreateJob *s = (CreateJob *)job;
    job_progress_set_total(job, 1);
    bool ok = s->file
              ? bdrv_img_create_on_node(s->file, s->format, s->size, s->opts,
                                        errp)
              : bdrv_img_create(s->filename, s->format, s->size, s->opts, errp);
    if (!ok) {
        return -EIO;
    }
    job_progress_update(job, 1);
    return 0;
}

static void create_free(Job *job)
{
    CreateJob *s = (CreateJob *)job;
    free(s->filename);
    if (s->file) {
        bdrv_unref(s->file);
    }
    json_object_put(s->opts);
}

static const JobDriver create_job_driver = {
    .type = "create",
    .instance_size = sizeof(CreateJob),
    .run = create_run,
    .free = create_free,
};

static const QmpArgSpec spec_file[] = {
    { "driver", QMP_ARG_STR, false },
    { "filename", QMP_ARG_STR, false },
    { "size", QMP_ARG_UINT, false },
    { "preallocation", QMP_ARG_STR, true },
    { "nocow", QMP_ARG_BOOL, true },
    { "extent-size-hint", QMP_ARG_UINT, true },
    { NULL },
};

static const QmpArgSpec spec_qcow2[] = {
    { "driver", QMP_ARG_STR, false },
    { "file", QMP_ARG_STR, false },
    { "size", QMP_ARG_UINT, false },
    { "version", QMP_ARG_STR, true },
    { "cluster-size", QMP_ARG_UINT, true },
    { "backing-file", QMP_ARG_STR, true },
    { "backing-fmt", QMP_ARG_STR, true },
    { "lazy-refcounts", QMP_ARG_BOOL, true },
    { "refcount-bits", QMP_ARG_UINT, true },
    { "compression-type", QMP_ARG_STR, true },
    { "preallocation", QMP_ARG_STR, true },
    { NULL },
};

static const QmpArgSpec spec_qbm[] = {
    { "driver", QMP_ARG_STR, false },
    { "filename", QMP_ARG_STR, false },
    { "size", QMP_ARG_UINT, false },
    { "data-file", QMP_ARG_STR, true },
    { "data-format", QMP_ARG_STR, true },
    { "backing", QMP_ARG_STR, true },
    { "backing-format", QMP_ARG_STR, true },
    { "granularity", QMP_ARG_UINT, true },
    { NULL },
};

/* opts[key] = str (a create option, as img create's -o gives them). */
static void opt_set(struct json_object *opts, const char *key, const char *str)
{
    json_object_object_add(opts, key, json_object_new_string(str));
}

/* The qcow2 driver's create options for QMP's qcow2 members; the
 * driver checks the values (its messages). */
static struct json_object *qcow2_create_opts(struct json_object *o)
{
    struct json_object *opts = json_object_new_object();
    char num[32];
    const char *v;
    if (json_object_object_get_ex(o, "cluster-size", NULL)) {
        snprintf(num, sizeof(num), "%" PRId64, json_opt_int(o, "cluster-size", 0));
        opt_set(opts, "cluster_size", num);
    }
    if (json_object_object_get_ex(o, "refcount-bits", NULL)) {
        snprintf(num, sizeof(num), "%" PRId64, json_opt_int(o, "refcount-bits", 0));
        opt_set(opts, "refcount_bits", num);
    }
    if ((v = json_opt_str(o, "version"))) {
        opt_set(opts, "compat", strcmp(v, "v3") == 0 ? "v3" : v);
    }
    if ((v = json_opt_str(o, "backing-file"))) {
        opt_set(opts, "backing_file", v);
    }
    if ((v = json_opt_str(o, "backing-fmt"))) {
        opt_set(opts, "backing_fmt", v);
    }
    if ((v = json_opt_str(o, "compression-type"))) {
        opt_set(opts, "compression_type", v);
    }
    if ((v = json_opt_str(o, "preallocation"))) {
        opt_set(opts, "preallocation", v);
    }
    if (json_object_object_get_ex(o, "lazy-refcounts", NULL)) {
        opt_set(opts, "lazy_refcounts",
                json_opt_bool(o, "lazy-refcounts", false) ? "on" : "off");
    }
    return opts;
}

/* The qbm driver's create options (its -o names are the QMP names). */
static struct json_object *qbm_create_opts(struct json_object *o)
{
    static const char *const strs[] = {
        "data-file", "data-format", "backing", "backing-format",
    };
    struct json_object *opts = json_object_new_object();
    const char *v;
    for (size_t i = 0; i < ARRAY_SIZE(strs); i++) {
        if ((v = json_opt_str(o, strs[i]))) {
            opt_set(opts, strs[i], v);
        }
    }
    if (json_object_object_get_ex(o, "granularity", NULL)) {
        char num[32];
        snprintf(num, sizeof(num), "%" PRId64, json_opt_int(o, "granularity", 0));
        opt_set(opts, "granularity", num);
    }
    return opts;
}

/* A create job on file name `filename` of o (file, qbm). */
static bool create_parse_filename(struct json_object *o, CreateJob *s,
                                  const char *format, struct json_object *opts,
                                  Error **errp)
{
    s->format = format;
    s->filename = strdup(json_opt_str(o, "filename"));
    s->opts = opts;
    if (!s->filename) {
        error_setg(errp, "out of memory");
        return false;
    }
    return true;
}

/* Check the driver's members of options and fill the job s. */
static bool create_parse(struct json_object *o, CreateJob *s, Error **errp)
{
    const char *driver = json_opt_str(o, "driver");
    if (!driver) {
        error_setg(errp, "Parameter 'driver' is missing");
        return false;
    }
    if (strcmp(driver, "file") == 0) {
        if (!qmp_check_args(o, spec_file, errp)) {
            return false;
        }
        const char *prealloc = json_opt_str(o, "preallocation");
        if (prealloc && strcmp(prealloc, "off") != 0) {
            error_setg(errp, "Unsupported preallocation mode '%s'", prealloc);
            return false;
        }
        if (!create_parse_filename(o, s, "raw", json_object_new_object(),
                                   errp)) {
            return false;
        }
    } else if (strcmp(driver, "qbm") == 0) {
        if (!qmp_check_args(o, spec_qbm, errp) ||
            !create_parse_filename(o, s, "qbm", qbm_create_opts(o), errp)) {
            return false;
        }
    } else if (strcmp(driver, "qcow2") == 0) {
        if (!qmp_check_args(o, spec_qcow2, errp)) {
            return false;
        }
        BlockDriverState *file = qmp_lookup_node(json_opt_str(o, "file"), errp);
        if (!file) {
            return false;
        }
        if (!file->drv->is_protocol) {
            error_setg(errp, "Node '%s' is not a protocol node: qcow2 is "
                       "created on a file node", file->node_name);
            return false;
        }
        bdrv_ref(file);
        s->file = file;
        s->format = "qcow2";
        s->opts = qcow2_create_opts(o);
    } else {
        error_setg(errp, "Driver does not support blockdev-create");
        return false;
    }
    s->size = (uint64_t)json_opt_int(o, "size", 0);
    return true;
}

static const QmpArgSpec spec_blockdev_create[] = {
    { "job-id", QMP_ARG_STR, false },
    { "options", QMP_ARG_OBJECT, false },
    { NULL },
};

static struct json_object *qmp_blockdev_create(struct json_object *args,
                                               Error **errp)
{
    const char *id = json_opt_str(args, "job-id");
    struct json_object *o = NULL;
    json_object_object_get_ex(args, "options", &o);
    if (!job_check_new_id(id, NULL, errp)) {
        return NULL;
    }
    CreateJob parsed = { 0 };
    if (!create_parse(o, &parsed, errp)) {
        create_free(&parsed.job);
        return NULL;
    }
    CreateJob *s = (CreateJob *)job_create(&create_job_driver, id, id, NULL,
                                           true, false, 0, errp);
    if (!s) {
        create_free(&parsed.job);
        return NULL;
    }
    s->filename = parsed.filename;
    s->file = parsed.file;
    s->format = parsed.format;
    s->size = parsed.size;
    s->opts = parsed.opts;
    job_start(&s->job);
    return json_object_new_object();
}

/* blockdev-create's "options": a union on "driver" of the drivers
 * create_parse takes (query-qmp-schema; create_parse checks them). */
static const QmpArgSpec create_common[] = {
    { "driver", QMP_ARG_STR, false },
    { NULL },
};
static const QmpArgSpec *create_variant(size_t i, const char **ret_name)
{
    static const struct {
        const char *driver;
        const QmpArgSpec *spec;
    } variants[] = {
        { "file", spec_file },
        { "qbm", spec_qbm },
        { "qcow2", spec_qcow2 },
    };
    if (i >= ARRAY_SIZE(variants)) {
        return NULL;
    }
    *ret_name = variants[i].driver;
    return variants[i].spec;
}
static const QmpUnion union_create = {
    .common = create_common,
    .tag = "driver",
    .variant = create_variant,
};

void qmp_register_create_commands(void)
{
    qmp_register_command_spec("blockdev-create", qmp_blockdev_create,
                              spec_blockdev_create);
    qmp_set_command_schema("blockdev-create", "options", &union_create);
}
