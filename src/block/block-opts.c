/*
 * The members a node's options may hold (block.h: bdrv_common_opts, each
 * driver's open_opts) and the check of blockdev-add's arguments against
 * them (bdrv_check_options).
 */
#include <string.h>

#include "block/block.h"
#include "util/cleanup.h"

static const JsonOptSpec cache_opts[] = {
    { "direct", JSON_OPT_BOOL, true },
    { "no-flush", JSON_OPT_BOOL, true },
    { NULL },
};

const char *const bdrv_discard_values[] = { "ignore", "unmap", NULL };
const char *const bdrv_detect_zeroes_values[] = { "off", "on", "unmap", NULL };
const char *const bdrv_aio_values[] = { "threads", "native", "io_uring", NULL };

const JsonOptSpec bdrv_common_opts[] = {
    { "driver", JSON_OPT_STR, false },
    { "node-name", JSON_OPT_STR, true },
    { "read-only", JSON_OPT_BOOL, true },
    { "force-share", JSON_OPT_BOOL, true },
    { "cache", JSON_OPT_OBJECT, true, cache_opts },
    { "crash-safe", JSON_OPT_BOOL, true },
    { "crash-safe-region-size", JSON_OPT_UINT, true },
    { "discard", JSON_OPT_STR, true, NULL, bdrv_discard_values },
    { "detect-zeroes", JSON_OPT_STR, true, NULL, bdrv_detect_zeroes_values },
    { "auto-read-only", JSON_OPT_BOOL, true },
    { NULL },
};

const char *const bdrv_locking_values[] = { "on", "off", "auto", NULL };

/* The recursion follows the children given as options (file.file...):
 * as deep as the parsed arguments nest, which their parser bounds. */
static bool check_node(struct json_object *options, const char *prefix,
                       Error **errp)
{
    const char *driver = json_opt_str(options, "driver");
    const BlockDriver *drv = driver ? bdrv_find_format(driver) : NULL;
    if (!drv) {
        return true;            /* bdrv_open_options names the problem */
    }
    const JsonOptSpec *specs[] = { bdrv_common_opts, drv->open_opts };
    if (!json_opts_check(options, specs, ARRAY_SIZE(specs), prefix,
                         JSON_OPTS_SCALAR_STRINGS, errp)) {
        return false;
    }
    for (const JsonOptSpec *a = drv->open_opts; a && a->name; a++) {
        struct json_object *child;
        if (a->type != JSON_OPT_REF ||
            !json_object_object_get_ex(options, a->name, &child) ||
            !json_object_is_type(child, json_type_object)) {
            continue;
        }
        _cleanup_free_ char *path = json_opts_path(prefix, a->name);
        if (!check_node(child, path, errp)) {
            return false;
        }
    }
    return true;
}

bool bdrv_check_options(struct json_object *options, Error **errp)
{
    return check_node(options, "", errp);
}
