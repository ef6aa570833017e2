/*
 * Helpers shared by the `bitback` sub-commands: size parsing with the
 * limits the block layer enforces, qemu-img style human sizes, JSON output,
 * and opening / closing images with errors reported once.
 *
 * The CLI is single-threaded: nothing here takes locks except through the
 * block-layer functions it calls.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/progress.h"
#include "crypto/object.h"
#include "repo/ops.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/keyval.h"

void cli_reset_getopt(void)
{
    /* optind = 0 makes glibc's getopt re-initialise its internal state
     * (including the permutation of arguments) for a new argv. */
    optind = 0;
    opterr = 1;
}

bool cli_parse_size(const char *str, const char *what, uint64_t *ret,
                    Error **errp)
{
    uint64_t v;

    if (!str || !*str) {
        error_setg(errp, "Invalid %s: empty value", what);
        return false;
    }
    if (*str == '-') {
        error_setg(errp, "Invalid %s '%s': must not be negative", what, str);
        return false;
    }
    if (!parse_size(str, what, &v, errp)) {
        return false;
    }
    if (v > BDRV_MAX_LENGTH) {
        error_setg(errp, "Invalid %s '%s': larger than the maximum of %" PRIu64
                   " bytes", what, str, (uint64_t)BDRV_MAX_LENGTH);
        return false;
    }
    *ret = v;
    return true;
}

bool cli_parse_output(const char *arg, bool *ret_json, Error **errp)
{
    if (!strcmp(arg, "json")) {
        *ret_json = true;
    } else if (!strcmp(arg, "human")) {
        *ret_json = false;
    } else {
        error_setg(errp, "--output must be either 'human' or 'json', not '%s'",
                   arg);
        return false;
    }
    return true;
}

bool cli_output_opt(const char *arg, bool *ret_json)
{
    Error *err = NULL;

    if (!cli_parse_output(arg, ret_json, &err)) {
        error_report_err(err);
        return false;
    }
    return true;
}

bool cli_repo_opt(int c, CliRepoOpts *o, void (*usage)(FILE *out))
{
    switch (c) {
    case CLI_OPT_REPO:
        o->repo = optarg;
        return true;
    case CLI_OPT_NODE:
        o->node = optarg;
        return true;
    case CLI_OPT_AT:
        o->at = optarg;
        return true;
    case CLI_OPT_PROGRESS:
        o->progress = true;
        return true;
    case CLI_OPT_OUTPUT:
        return cli_output_opt(optarg, &o->json);
    default:
        if (usage) {
            usage(stderr);
        }
        return false;
    }
}

static void *progress_begin(void *opaque, const char *label, uint64_t total)
{
    return cli_progress_new(label, total, opaque != NULL);
}

static void progress_end(void *step)
{
    cli_progress_finish(step);
}

void cli_progress_ops(RepoProgressOps *ops, bool enabled)
{
    *ops = (RepoProgressOps){
        .begin = progress_begin,
        .update = cli_progress_cb,
        .end = progress_end,
        .opaque = enabled ? ops : NULL,   /* any non-NULL pointer: on */
    };
}

char *cli_size_to_str(uint64_t bytes, char *buf, size_t len)
{
    static const char *const units[] = {
        "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB",
    };
    double v = (double)bytes;
    size_t i = 0;

    if (bytes < 1024) {
        snprintf(buf, len, "%" PRIu64 " B", bytes);
        return buf;
    }
    while (v >= 1024 && i + 1 < ARRAY_SIZE(units)) {
        v /= 1024;
        i++;
    }
    /* Three significant digits, as qemu-img: "1 MiB", "2.93 KiB". */
    snprintf(buf, len, "%.3g %s", v, units[i]);
    return buf;
}

void cli_print_json(struct json_object *obj)
{
    printf("%s\n", json_object_to_json_string_ext(
               obj, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
               JSON_C_TO_STRING_NOSLASHESCAPE));
}

BlockDriverState *cli_open_image(const char *filename, const char *format,
                                 int flags, Error **errp)
{
    BlockDriverState *bs;

    if (format && !bdrv_find_format(format)) {
        error_setg(errp, "Unknown file format '%s'", format);
        return NULL;
    }
    if (format && !strcmp(format, "file")) {
        error_setg(errp, "'file' is a protocol, not an image format; "
                   "use -f raw");
        return NULL;
    }
    bs = bdrv_open_image(filename, format, flags, errp);
    /* Name the file, unless the block layer's message already does. */
    if (!bs && errp && *errp && !strstr(error_get_pretty(*errp), filename)) {
        error_prepend(errp, "Could not open '%s': ", filename);
    }
    return bs;
}

bool cli_close_image(BlockDriverState *bs)
{
    Error *err = NULL;

    if (!bs) {
        return true;
    }
    if (!bdrv_close(bs, &err)) {
        error_prepend(&err, "Could not store the bitmaps: ");
        error_report_err(err);
        return false;
    }
    return true;
}

struct json_object *cli_bitmap_info(BdrvDirtyBitmap *bm)
{
    struct json_object *o = json_object_new_object();
    struct json_object *flags = json_object_new_array();

    json_object_object_add(o, "name", json_object_new_string(bm->name));
    json_object_object_add(o, "granularity",
                           json_object_new_int64(bm->granularity));
    /* qemu-img's flags: "in-use" means the stored bits can not be trusted
     * (the image was not closed cleanly); "auto" means recording. */
    if (bm->inconsistent) {
        json_object_array_add(flags, json_object_new_string("in-use"));
    }
    if (!bm->disabled && !bm->inconsistent) {
        json_object_array_add(flags, json_object_new_string("auto"));
    }
    json_object_object_add(o, "flags", flags);
    json_object_object_add(o, "count",
                           json_object_new_int64(
                               (int64_t)bdrv_dirty_bitmap_count(bm)));
    json_object_object_add(o, "inconsistent",
                           json_object_new_boolean(bm->inconsistent));
    if (bm->inconsistent) {
        json_object_object_add(o, "inconsistent-reason",
                               json_object_new_string(
                                   bm->inconsistent_reason ?
                                   bm->inconsistent_reason : "unknown"));
    }
    json_object_object_add(o, "recording",
                           json_object_new_boolean(!bm->disabled &&
                                                   !bm->inconsistent));
    json_object_object_add(o, "busy", json_object_new_boolean(bm->busy));
    /* null when unknown (""): bitback cannot vouch for its history. */
    json_object_object_add(o, "generation",
                           bm->generation[0]
                           ? json_object_new_string(bm->generation) : NULL);
    /* While unknown: the one bitback recorded before another program
     * wrote the image (docs/specs/qcow2.md, rule 6). */
    if (!bm->generation[0] && bm->prior_generation[0]) {
        json_object_object_add(o, "prior-generation",
                               json_object_new_string(bm->prior_generation));
    }
    json_object_object_add(o, "persistent",
                           json_object_new_boolean(bm->persistent));
    /* Rebuilt after a crash from the write-intent log, and what that added
     * (docs/specs/write-intent.md). */
    json_object_object_add(o, "recovered", json_object_new_boolean(bm->recovered));
    if (bm->recovered) {
        json_object_object_add(o, "recovered-bytes",
                               json_object_new_int64((int64_t)bm->recovered_bytes));
    }
    return o;
}

bool cli_object_add(const char *arg, Error **errp)
{
    _cleanup_json_ struct json_object *props =
        keyval_parse_or_json(arg, "qom-type", errp);
    return props && object_add(props, errp);
}
