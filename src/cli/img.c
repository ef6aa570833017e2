/*
 * `bitback img create|info|map|check`: the qemu-img-like sub-commands.
 *
 * create  asks the format driver to make the image (bdrv_img_create) and
 *         removes every file it made if that fails, so a failed create never
 *         leaves a half-made image behind.
 * info    opens the image read-only (it never changes the image) and prints
 *         qemu-img info's JSON shape, with the node's bitmaps under
 *         format-specific.data.bitmaps.
 * map     prints allocation (qemu-img map's shape, depth computed down the
 *         backing chain) or, with --bitmap, a bitmap's dirty and clean
 *         extents covering the whole image.
 * check   runs the driver's check hook read-only.  Inconsistent bitmaps are
 *         reported too, as warnings: they are not corruption (the data is
 *         intact) but they can only be removed, so the exit status is 3
 *         (qemu-img check's "leaks only") when they and leaked clusters are
 *         the only problems.
 *
 * Output is streamed: a map with millions of extents is printed as it is
 * computed, never built in memory as one JSON document.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "util/cleanup.h"
#include "util/cutils.h"

enum {
    OPT_OUTPUT = 256,
    OPT_BITMAP,
    OPT_START_OFFSET,
    OPT_MAX_LENGTH,
    OPT_BACKING_CHAIN,
};

void cli_img_usage(FILE *out)
{
    fprintf(out,
            "Usage:\n"
            "  bitback img create [-f FMT] [-o KEY=VAL[,KEY=VAL...]] [-b BACKING [-F BACKING_FMT]] FILE [SIZE]\n"
            "      FMT is raw (default), qcow2 or qbm.  qbm options: data-file, data-format,\n"
            "      backing, backing-format, granularity.  qcow2 options: cluster_size,\n"
            "      backing_file, backing_fmt, compression_type.  -o may be repeated.\n"
            "  bitback img info [--output=human|json] [--backing-chain] [-f FMT] [-U] FILE\n"
            "  bitback img map [--output=human|json] [--bitmap NAME] [--start-offset OFF]\n"
            "                  [--max-length LEN] [-f FMT] [-U] FILE\n"
            "  bitback img check [--output=human|json] [-f FMT] [-U] FILE\n"
            "\n"
            "Images are locked as QEMU locks them: an image another process (bitbackd,\n"
            "qemu-io, qemu-storage-daemon...) holds for writing cannot be opened.\n"
            "-U, --force-share opens it anyway (read-only; what it shows may be stale).\n"
            "\n"
            "img check exits 0 when the image is consistent, 2 when it is corrupt,\n"
            "3 when only bitmaps are inconsistent (data intact; remove them),\n"
            "1 when the check could not run.\n");
}

/* ---------------------------------------------------------------- create */

/* Add "k=v,k2=v2" to opts; ",," stands for a literal comma in a value. */
static bool parse_create_opts(const char *arg, struct json_object *opts,
                              Error **errp)
{
    size_t len = strlen(arg);
    _cleanup_free_ char *buf = malloc(len + 1);
    const char *p = arg;

    if (!buf) {
        error_setg(errp, "Out of memory");
        return false;
    }
    while (*p) {
        size_t n = 0;
        char *eq;

        /* Copy one item, unescaping ",,". */
        while (*p) {
            if (*p == ',') {
                if (p[1] == ',') {
                    buf[n++] = ',';
                    p += 2;
                    continue;
                }
                p++;
                break;
            }
            buf[n++] = *p++;
        }
        buf[n] = '\0';
        if (n == 0) {
            continue;
        }
        eq = strchr(buf, '=');
        if (!eq || eq == buf) {
            error_setg(errp, "Invalid option '%s' in -o: expected KEY=VALUE",
                       buf);
            return false;
        }
        *eq = '\0';
        json_object_object_add(opts, buf, json_object_new_string(eq + 1));
    }
    return true;
}

static bool path_exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* The data file a qbm create makes when -o data-file is not given. */
static char *default_qbm_data_file(const char *filename)
{
    size_t len = strlen(filename);
    char *s;

    if (len > 4 && !strcmp(filename + len - 4, ".qbm")) {
        s = strdup(filename);
        if (s) {
            strcpy(s + len - 4, ".raw");
        }
        return s;
    }
    if (asprintf(&s, "%s.raw", filename) < 0) {
        return NULL;
    }
    return s;
}

static int img_create(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"options", required_argument, NULL, 'o'},
        {"quiet", no_argument, NULL, 'q'},
        {NULL, 0, NULL, 0},
    };
    _cleanup_json_ struct json_object *opts = json_object_new_object();
    const char *fmt = "raw";
    const char *filename;
    const char *backing = NULL, *backing_fmt = NULL;
    bool quiet = false, have_size = false;
    uint64_t size = 0;
    Error *err = NULL;
    /* Files this create may make; removed on failure if they are new. */
    char *made[4] = {NULL, NULL, NULL, NULL};
    bool existed[4] = {false, false, false, false};
    bool ok;
    int c;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:o:b:F:q", long_opts, NULL)) != -1) {
        switch (c) {
        case 'h':
            cli_img_usage(stdout);
            return CLI_EXIT_OK;
        case 'f':
            fmt = optarg;
            break;
        case 'o':
            if (!parse_create_opts(optarg, opts, &err)) {
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            break;
        case 'b':
            backing = optarg;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        default:
            return CLI_EXIT_ERROR;
        }
    }
    if (optind >= argc) {
        error_report("img create: expecting a file name (try 'bitback img --help')");
        return CLI_EXIT_ERROR;
    }
    filename = argv[optind++];
    if (optind < argc) {
        if (!cli_parse_size(argv[optind], "image size", &size, &err)) {
            error_report_err(err);
            return CLI_EXIT_ERROR;
        }
        have_size = true;
        optind++;
    }
    if (optind < argc) {
        error_report("img create: unexpected argument '%s'", argv[optind]);
        return CLI_EXIT_ERROR;
    }
    if (backing) {
        json_object_object_add(opts, "backing", json_object_new_string(backing));
    }
    if (backing_fmt) {
        json_object_object_add(opts, "backing-format",
                               json_object_new_string(backing_fmt));
    }
    if (!bdrv_find_format(fmt) || !strcmp(fmt, "file")) {
        error_report("Unknown file format '%s'", fmt);
        return CLI_EXIT_ERROR;
    }
    if (!strcmp(fmt, "raw")) {
        if (!have_size) {
            error_report("Image creation needs a size parameter");
            return CLI_EXIT_ERROR;
        }
        if (json_object_object_length(opts) > 0) {
            json_object_object_foreach(opts, key, val) {
                (void)val;
                error_report("Format 'raw' does not support the option '%s'",
                             key);
                return CLI_EXIT_ERROR;
            }
        }
    }
    if (!strcmp(fmt, "qbm") && !have_size &&
        !json_object_object_get_ex(opts, "backing", NULL)) {
        /* Without SIZE the size comes from an existing data file (or the
         * backing image); a new, empty data file is never what was meant. */
        struct json_object *df;
        bool known = false;

        if (json_object_object_get_ex(opts, "data-file", &df)) {
            _cleanup_free_ char *dir = path_dirname(filename);
            _cleanup_free_ char *path = dir ? path_join(dir, json_object_get_string(df))
                                            : NULL;
            known = path && path_exists(path);
        }
        if (!known) {
            error_report("Image creation needs a size parameter (or -o data-file= "
                         "naming an existing image, or -o backing=)");
            return CLI_EXIT_ERROR;
        }
    }
    if (!*filename) {
        error_report("img create: the file name is empty");
        return CLI_EXIT_ERROR;
    }

    made[0] = strdup(filename);
    if (asprintf(&made[1], "%s.tmp", filename) < 0) {
        made[1] = NULL;
    }
    if (!strcmp(fmt, "qbm") && !json_object_object_get_ex(opts, "data-file", NULL)) {
        made[2] = default_qbm_data_file(filename);
    }
    if (!strcmp(fmt, "qbm") && json_object_object_get_ex(opts, "backing", NULL)) {
        /* The allocation bitmap of an overlay: STEM.alloc.bm. */
        size_t flen = strlen(filename);
        size_t stem = flen > 4 && !strcmp(filename + flen - 4, ".qbm") ? flen - 4 : flen;
        if (asprintf(&made[3], "%.*s.alloc.bm", (int)stem, filename) < 0) {
            made[3] = NULL;
        }
    }
    for (size_t i = 0; i < ARRAY_SIZE(made); i++) {
        existed[i] = made[i] && path_exists(made[i]);
    }

    ok = bdrv_img_create(filename, fmt, have_size ? size : 0, opts, &err);
    if (!ok) {
        /* Nothing half-made: remove every file that did not exist before. */
        for (size_t i = 0; i < ARRAY_SIZE(made); i++) {
            if (made[i] && !existed[i] && path_exists(made[i])) {
                unlink(made[i]);
            }
        }
        if (!strstr(error_get_pretty(err), filename)) {
            error_prepend(&err, "%s: ", filename);
        }
        error_report_err(err);
    } else if (!quiet) {
        /* Report the size the image really has (a qbm over an existing
         * data file takes that file's size). */
        BlockDriverState *bs = bdrv_open_image(filename, fmt, 0, NULL);
        uint64_t real = size;

        if (bs) {
            int64_t len = bdrv_getlength(bs);
            if (len >= 0) {
                real = (uint64_t)len;
            }
            bdrv_close(bs, NULL);
        }
        printf("Formatting '%s', fmt=%s size=%" PRIu64, filename, fmt, real);
        json_object_object_foreach(opts, key, val) {
            printf(" %s=%s", key, json_object_get_string(val));
        }
        printf("\n");
    }
    for (size_t i = 0; i < ARRAY_SIZE(made); i++) {
        free(made[i]);
    }
    return ok ? CLI_EXIT_OK : CLI_EXIT_ERROR;
}

/* ------------------------------------------------------------------ info */

/* Copy fields the driver put in its own bitmap entries (e.g. the bitmap's
 * file name) into ours, without overriding what the node reports. */
static void merge_driver_bitmap_fields(struct json_object *mine,
                                       struct json_object *driver_list)
{
    const char *name = json_object_get_string(
        json_object_object_get(mine, "name"));

    if (!json_object_is_type(driver_list, json_type_array) || !name) {
        return;
    }
    for (size_t i = 0; i < json_object_array_length(driver_list); i++) {
        struct json_object *d = json_object_array_get_idx(driver_list, i);
        struct json_object *dname;

        if (!json_object_object_get_ex(d, "name", &dname) ||
            strcmp(json_object_get_string(dname), name)) {
            continue;
        }
        json_object_object_foreach(d, key, val) {
            if (!json_object_object_get_ex(mine, key, NULL)) {
                json_object_object_add(mine, key, json_object_get(val));
            }
        }
    }
}

/* backing-filename (as the image names it), full-backing-filename and
 * backing-filename-format.  The name as written comes from the driver's
 * info ("backing"/"backing-format", as qbm reports them); the open backing
 * node fills in what the driver does not say.  This also describes a
 * backing file that could not be opened (info falls back to opening the
 * image without it). */
static void add_backing_info(struct json_object *o, BlockDriverState *bs,
                             const char *filename, struct json_object *data)
{
    struct json_object *v;
    const char *name = NULL, *fmt = NULL;
    char full[PATH_MAX];
    _cleanup_free_ char *joined = NULL;

    if (json_object_object_get_ex(data, "backing", &v) &&
        json_object_is_type(v, json_type_string)) {
        name = json_object_get_string(v);
    }
    if (json_object_object_get_ex(data, "backing-format", &v) &&
        json_object_is_type(v, json_type_string)) {
        fmt = json_object_get_string(v);
    }
    if (bs->backing) {
        if (!name) {
            name = bs->backing->filename ? bs->backing->filename : "";
        }
        fmt = bs->backing->drv->format_name;
    }
    if (!name) {
        return;
    }
    json_object_object_add(o, "backing-filename", json_object_new_string(name));
    if (bs->backing && bs->backing->filename &&
        realpath(bs->backing->filename, full)) {
        json_object_object_add(o, "full-backing-filename",
                               json_object_new_string(full));
    } else {
        _cleanup_free_ char *dir = path_dirname(filename);
        joined = dir ? path_join(dir, name) : NULL;
        json_object_object_add(o, "full-backing-filename",
                               json_object_new_string(
                                   joined && realpath(joined, full) ? full :
                                   joined ? joined : name));
    }
    if (fmt) {
        json_object_object_add(o, "backing-filename-format",
                               json_object_new_string(fmt));
    }
}

/* qemu-img info's object for one node.  `filename` is the name to show. */
static struct json_object *image_info(BlockDriverState *bs,
                                      const char *filename, Error **errp)
{
    _cleanup_json_ struct json_object *o = json_object_new_object();
    struct json_object *data, *bitmaps, *driver_bitmaps = NULL;
    int64_t len = bdrv_getlength(bs);
    struct stat st;

    if (len < 0) {
        error_setg_errno(errp, (int)-len, "Could not get the size of '%s'",
                         filename);
        return NULL;
    }
    json_object_object_add(o, "filename", json_object_new_string(filename));
    json_object_object_add(o, "format",
                           json_object_new_string(bs->drv->format_name));
    json_object_object_add(o, "virtual-size", json_object_new_int64(len));
    if (stat(filename, &st) == 0) {
        json_object_object_add(o, "actual-size",
                               json_object_new_int64((int64_t)st.st_blocks * 512));
    }
    json_object_object_add(o, "dirty-flag", json_object_new_boolean(false));

    data = json_object_new_object();
    if (bs->drv->info) {
        bs->drv->info(bs, data);
    }
    if (json_object_object_get_ex(data, "bitmaps", &driver_bitmaps)) {
        json_object_get(driver_bitmaps);
    }
    /* Only this thread changes the list (block.h's rules for bs->lock), so
     * we walk it without the lock; the per-bitmap helpers take it
     * themselves. */
    if (bdrv_can_store_persistent_bitmaps(bs) || bs->dirty_bitmaps) {
        bitmaps = json_object_new_array();
        for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
            struct json_object *b = cli_bitmap_info(bm);
            merge_driver_bitmap_fields(b, driver_bitmaps);
            json_object_array_add(bitmaps, b);
        }
        json_object_object_add(data, "bitmaps", bitmaps);
    }
    json_object_put(driver_bitmaps);
    add_backing_info(o, bs, filename, data);
    if (json_object_object_length(data) > 0) {
        struct json_object *fs = json_object_new_object();
        json_object_object_add(fs, "type",
                               json_object_new_string(bs->drv->format_name));
        json_object_object_add(fs, "data", data);
        json_object_object_add(o, "format-specific", fs);
    } else {
        json_object_put(data);
    }
    return steal_pointer(&o);
}

static void print_human_value(const char *key, struct json_object *val,
                              int indent)
{
    if (json_object_is_type(val, json_type_object)) {
        printf("%*s%s:\n", indent, "", key);
        json_object_object_foreach(val, k, v) {
            print_human_value(k, v, indent + 4);
        }
    } else if (json_object_is_type(val, json_type_array)) {
        printf("%*s%s:\n", indent, "", key);
        for (size_t i = 0; i < json_object_array_length(val); i++) {
            char idx[32];
            snprintf(idx, sizeof(idx), "[%zu]", i);
            print_human_value(idx, json_object_array_get_idx(val, i),
                              indent + 4);
        }
    } else {
        printf("%*s%s: %s\n", indent, "", key, json_object_get_string(val));
    }
}

static void print_info_human(struct json_object *o)
{
    struct json_object *v, *fs, *data, *bitmaps = NULL;
    char buf[32];

    printf("image: %s\n",
           json_object_get_string(json_object_object_get(o, "filename")));
    printf("file format: %s\n",
           json_object_get_string(json_object_object_get(o, "format")));
    v = json_object_object_get(o, "virtual-size");
    printf("virtual size: %s (%" PRId64 " bytes)\n",
           cli_size_to_str((uint64_t)json_object_get_int64(v), buf, sizeof(buf)),
           json_object_get_int64(v));
    if (json_object_object_get_ex(o, "actual-size", &v)) {
        printf("disk size: %s\n",
               cli_size_to_str((uint64_t)json_object_get_int64(v), buf,
                               sizeof(buf)));
    }
    if (json_object_object_get_ex(o, "backing-filename", &v)) {
        printf("backing file: %s", json_object_get_string(v));
        if (json_object_object_get_ex(o, "full-backing-filename", &v)) {
            printf(" (actual path: %s)", json_object_get_string(v));
        }
        printf("\n");
    }
    if (json_object_object_get_ex(o, "backing-filename-format", &v)) {
        printf("backing file format: %s\n", json_object_get_string(v));
    }
    if (!json_object_object_get_ex(o, "format-specific", &fs) ||
        !json_object_object_get_ex(fs, "data", &data)) {
        return;
    }
    if (json_object_object_length(data) >
        (json_object_object_get_ex(data, "bitmaps", NULL) ? 1 : 0)) {
        printf("Format specific information:\n");
        json_object_object_foreach(data, key, val) {
            if (strcmp(key, "bitmaps")) {
                print_human_value(key, val, 4);
            }
        }
    }
    if (!json_object_object_get_ex(data, "bitmaps", &bitmaps)) {
        return;
    }
    printf("Bitmaps:%s\n",
           json_object_array_length(bitmaps) ? "" : " none");
    for (size_t i = 0; i < json_object_array_length(bitmaps); i++) {
        struct json_object *b = json_object_array_get_idx(bitmaps, i);
        struct json_object *flags = json_object_object_get(b, "flags");
        uint64_t count = (uint64_t)json_object_get_int64(
            json_object_object_get(b, "count"));

        printf("    %s:\n",
               json_object_get_string(json_object_object_get(b, "name")));
        printf("        granularity: %" PRId64 "\n",
               json_object_get_int64(json_object_object_get(b, "granularity")));
        printf("        flags:");
        if (json_object_array_length(flags) == 0) {
            printf(" (none: not recording)");
        }
        for (size_t j = 0; j < json_object_array_length(flags); j++) {
            printf(" %s",
                   json_object_get_string(json_object_array_get_idx(flags, j)));
        }
        printf("\n");
        printf("        count: %" PRIu64 " bytes (%s)\n", count,
               cli_size_to_str(count, buf, sizeof(buf)));
        printf("        persistent: %s\n",
               json_object_get_boolean(json_object_object_get(b, "persistent"))
               ? "true" : "false");
        const char *gen =
            json_object_get_string(json_object_object_get(b, "generation"));
        const char *prior = json_object_get_string(
            json_object_object_get(b, "prior-generation"));
        if (gen || !prior) {
            printf("        generation: %s\n", gen ? gen : "unknown");
        } else {
            printf("        generation: unknown (was %s before another "
                   "program wrote the image)\n", prior);
        }
        if (json_object_get_boolean(json_object_object_get(b, "recovered"))) {
            uint64_t added = (uint64_t)json_object_get_int64(
                json_object_object_get(b, "recovered-bytes"));
            printf("        recovered: after a crash, from the write-intent log "
                   "(%s added)\n", cli_size_to_str(added, buf, sizeof(buf)));
        }
        if (json_object_get_boolean(json_object_object_get(b, "inconsistent"))) {
            printf("        inconsistent: %s (the bitmap can only be removed)\n",
                   json_object_get_string(
                       json_object_object_get(b, "inconsistent-reason")));
        }
    }
}

/* The options img info, map and check share. */
typedef struct ImgOpts {
    const char *fmt;                    /* -f, NULL: probe */
    int open_flags;                     /* -U: BDRV_O_FORCE_SHARE */
    bool json;                          /* --output=json */
} ImgOpts;

#define IMG_OPT_PARSED  (-1)            /* a shared option, taken into o */

/* Take getopt's option c, one the command does not handle itself, into
 * o: IMG_OPT_PARSED for a shared option (-f, -U, --output), else the exit
 * status the command ends with (--help: usage printed, CLI_EXIT_OK; a bad
 * --output: reported, CLI_EXIT_ERROR; an unknown option, which getopt has
 * reported: CLI_EXIT_ERROR). */
static int img_parse_opt(int c, ImgOpts *o)
{
    switch (c) {
    case 'h':
        cli_img_usage(stdout);
        return CLI_EXIT_OK;
    case 'f':
        o->fmt = optarg;
        return IMG_OPT_PARSED;
    case 'U':
        o->open_flags |= BDRV_O_FORCE_SHARE;
        return IMG_OPT_PARSED;
    case OPT_OUTPUT:
        return cli_output_opt(optarg, &o->json) ? IMG_OPT_PARSED
                                                : CLI_EXIT_ERROR;
    default:
        return CLI_EXIT_ERROR;
    }
}

/* The one file name after the options of `img cmd`, or NULL (reported). */
static const char *img_one_file(const char *cmd, int argc, char **argv)
{
    if (optind != argc - 1) {
        error_report("img %s: expecting exactly one file name", cmd);
        return NULL;
    }
    return argv[optind];
}

/* Open for reading; if the backing chain can not be opened, retry without
 * it so info still describes the image itself. */
static BlockDriverState *open_read_only(const char *filename, const char *fmt,
                                        int flags, Error **errp)
{
    Error *err = NULL;
    BlockDriverState *bs = cli_open_image(filename, fmt, flags, &err);

    if (!bs) {
        BlockDriverState *nb = cli_open_image(filename, fmt,
                                              flags | BDRV_O_NO_BACKING, NULL);
        if (nb) {
            error_free(err);
            return nb;
        }
        error_propagate(errp, err);
    }
    return bs;
}

static int img_info(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"backing-chain", no_argument, NULL, OPT_BACKING_CHAIN},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    _cleanup_json_ struct json_object *chain = json_object_new_array();
    ImgOpts io = {0};
    const char *filename;
    bool backing_chain = false;
    BlockDriverState *bs;
    Error *err = NULL;
    int c, r;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:U", long_opts, NULL)) != -1) {
        switch (c) {
        case OPT_BACKING_CHAIN:
            backing_chain = true;
            continue;
        }
        r = img_parse_opt(c, &io);
        if (r != IMG_OPT_PARSED) {
            return r;
        }
    }
    filename = img_one_file("info", argc, argv);
    if (!filename) {
        return CLI_EXIT_ERROR;
    }

    bs = open_read_only(filename, io.fmt, io.open_flags, &err);
    if (!bs) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    for (BlockDriverState *cur = bs; cur; cur = backing_chain ? cur->backing : NULL) {
        struct json_object *o = image_info(
            cur, cur == bs ? filename : (cur->filename ? cur->filename : ""),
            &err);
        if (!o) {
            error_report_err(err);
            bdrv_close(bs, NULL);
            return CLI_EXIT_ERROR;
        }
        json_object_array_add(chain, o);
    }
    /* Read-only: there is nothing to store, but report it if the close
     * complains. */
    if (!cli_close_image(bs)) {
        return CLI_EXIT_ERROR;
    }

    if (io.json) {
        cli_print_json(backing_chain ? chain
                                     : json_object_array_get_idx(chain, 0));
    } else {
        for (size_t i = 0; i < json_object_array_length(chain); i++) {
            if (i > 0) {
                printf("\n");
            }
            print_info_human(json_object_array_get_idx(chain, i));
        }
    }
    return CLI_EXIT_OK;
}

/* ------------------------------------------------------------------- map */

typedef struct MapExtent {
    uint64_t start, length;
    int depth;
    bool present, zero, data;
    bool has_offset;
    uint64_t offset;
} MapExtent;

static void print_map_extent(const MapExtent *e, bool json, bool *first)
{
    if (json) {
        printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
               ", \"depth\": %d, \"present\": %s, \"zero\": %s, \"data\": %s",
               *first ? "[" : ",\n", e->start, e->length, e->depth,
               e->present ? "true" : "false", e->zero ? "true" : "false",
               e->data ? "true" : "false");
        if (e->has_offset) {
            printf(", \"offset\": %" PRIu64, e->offset);
        }
        printf("}");
    } else {
        if (*first) {
            printf("%-20s%-20s%-8s%s\n", "Offset", "Length", "Depth", "Status");
        }
        printf("0x%-18" PRIx64 "0x%-18" PRIx64 "%-8d%s\n", e->start,
               e->length, e->depth,
               !e->present ? "unallocated" : e->data ? (e->zero ? "data (zero)" : "data")
               : e->zero ? "zero" : "allocated");
    }
    *first = false;
}

/* Status of [off, off+bytes): fills e and returns its length, or -errno. */
static int64_t map_one(BlockDriverState *bs, uint64_t off, uint64_t bytes,
                       MapExtent *e)
{
    BlockDriverState *cur = bs;
    uint64_t n = bytes, pnum = 0;
    int depth = 0, ret;
    bool present;

    /* Walk down the chain to the layer that holds this range. */
    for (;;) {
        ret = bdrv_is_allocated(cur, off, n, &pnum);
        if (ret < 0) {
            return ret;
        }
        if (pnum == 0 && cur != bs) {
            /* Past the end of a shorter backing image: reads as zeroes
             * that no layer holds. */
            present = false;
            break;
        }
        if (pnum == 0 || pnum > n) {
            return -EIO;
        }
        n = pnum;
        if (ret > 0) {
            present = true;
            break;
        }
        if (!cur->backing) {
            /* Nothing holds it.  A format without backing support (raw)
             * always decides its own content, holes included. */
            present = !cur->drv->supports_backing;
            break;
        }
        cur = cur->backing;
        depth++;
    }
    /* What a read returns, following the chain. */
    ret = bdrv_block_status(bs, off, n, &pnum);
    if (ret < 0) {
        return ret;
    }
    if (pnum == 0 || pnum > n) {
        return -EIO;
    }
    n = pnum;
    e->start = off;
    e->length = n;
    e->depth = depth;
    e->present = present;
    e->zero = (ret & BDRV_BLOCK_ZERO) != 0;
    e->data = (ret & BDRV_BLOCK_DATA) != 0;
    /* A raw layer maps byte for byte onto its file. */
    e->has_offset = present && !strcmp(cur->drv->format_name, "raw");
    e->offset = off;
    return (int64_t)n;
}

static bool map_can_merge(const MapExtent *a, const MapExtent *b)
{
    return a->depth == b->depth && a->present == b->present &&
           a->zero == b->zero && a->data == b->data &&
           a->has_offset == b->has_offset &&
           (!a->has_offset || a->offset + a->length == b->offset) &&
           a->start + a->length == b->start;
}

static int map_allocation(BlockDriverState *bs, uint64_t start, uint64_t end,
                          bool json, const char *filename)
{
    MapExtent cur = {0}, next;
    bool have = false, first = true;
    uint64_t off = start;

    while (off < end) {
        int64_t n = map_one(bs, off, end - off, &next);
        if (n < 0) {
            if (!first && json) {
                printf("]\n");
            }
            fflush(stdout);
            error_report("Could not get the status of '%s' at offset %" PRIu64
                         ": %s", filename, off, strerror((int)-n));
            return CLI_EXIT_ERROR;
        }
        if (have && map_can_merge(&cur, &next)) {
            cur.length += next.length;
        } else {
            if (have) {
                print_map_extent(&cur, json, &first);
            }
            cur = next;
            have = true;
        }
        off += (uint64_t)n;
    }
    if (have) {
        print_map_extent(&cur, json, &first);
    }
    if (json) {
        printf("%s]\n", first ? "[" : "");
    }
    return CLI_EXIT_OK;
}

#define MAP_BITMAP_BATCH 1024     /* extents asked of the bitmap at once */

static int map_bitmap(BlockDriverState *bs, const char *name, uint64_t start,
                      uint64_t end, bool json)
{
    BdrvDirtyBitmap *bm = bdrv_find_dirty_bitmap(bs, name);
    BdrvDirtyExtent ext[MAP_BITMAP_BATCH];
    uint64_t dirty = 0, ndirty = 0;

    if (!bm) {
        error_report("Bitmap '%s' not found in '%s'", name,
                     bs->filename ? bs->filename : "the image");
        return CLI_EXIT_ERROR;
    }
    if (bm->inconsistent) {
        /* Its bits are not trustworthy; say so instead of printing them as
         * if they were a valid answer. */
        error_report("Bitmap '%s' is inconsistent (%s); it can only be removed",
                     name, bm->inconsistent_reason ? bm->inconsistent_reason
                                                   : "unknown reason");
        return CLI_EXIT_ERROR;
    }
    if (json) {
        printf("[");
    } else {
        printf("%-20s%-20s%s\n", "Offset", "Length", "Dirty");
    }
    /* Streamed in batches of MAP_BITMAP_BATCH extents: memory stays the
     * same whatever the bitmap's fragmentation. */
    size_t i = 0, n;
    uint64_t pos = start;
    while (pos < end &&
           (n = bdrv_dirty_bitmap_extents(bm, pos, end - pos, false, ext,
                                          MAP_BITMAP_BATCH)) > 0) {
        for (size_t j = 0; j < n; j++, i++) {
            if (json) {
                printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
                       ", \"dirty\": %s}", i ? ",\n" : "", ext[j].start,
                       ext[j].length, ext[j].dirty ? "true" : "false");
            } else {
                printf("0x%-18" PRIx64 "0x%-18" PRIx64 "%s\n", ext[j].start,
                       ext[j].length, ext[j].dirty ? "dirty" : "clean");
            }
            if (ext[j].dirty) {
                dirty += ext[j].length;
                ndirty++;
            }
        }
        pos = ext[n - 1].start + ext[n - 1].length;
    }
    if (json) {
        printf("]\n");
    } else {
        char buf[32];
        printf("Bitmap '%s': %" PRIu64 " dirty bytes (%s) in %" PRIu64
               " extents, granularity %" PRIu32 "\n", name, dirty,
               cli_size_to_str(dirty, buf, sizeof(buf)), ndirty,
               bm->granularity);
    }
    return CLI_EXIT_OK;
}

static int img_map(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"bitmap", required_argument, NULL, OPT_BITMAP},
        {"start-offset", required_argument, NULL, OPT_START_OFFSET},
        {"max-length", required_argument, NULL, OPT_MAX_LENGTH},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    ImgOpts io = {0};
    const char *filename, *bitmap = NULL;
    uint64_t start = 0, max_len = UINT64_MAX, end;
    BlockDriverState *bs;
    Error *err = NULL;
    int64_t len;
    int c, ret;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:U", long_opts, NULL)) != -1) {
        switch (c) {
        case OPT_BITMAP:
            bitmap = optarg;
            continue;
        case OPT_START_OFFSET:
            if (!cli_parse_size(optarg, "start offset", &start, &err)) {
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            continue;
        case OPT_MAX_LENGTH:
            if (!cli_parse_size(optarg, "max length", &max_len, &err)) {
                error_report_err(err);
                return CLI_EXIT_ERROR;
            }
            continue;
        }
        ret = img_parse_opt(c, &io);
        if (ret != IMG_OPT_PARSED) {
            return ret;
        }
    }
    filename = img_one_file("map", argc, argv);
    if (!filename) {
        return CLI_EXIT_ERROR;
    }

    /* No fallback without the backing file here: the map of an overlay
     * depends on it. */
    bs = cli_open_image(filename, io.fmt, io.open_flags, &err);
    if (!bs) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    len = bdrv_getlength(bs);
    if (len < 0) {
        error_report("Could not get the size of '%s': %s", filename,
                     strerror((int)-len));
        bdrv_close(bs, NULL);
        return CLI_EXIT_ERROR;
    }
    end = (uint64_t)len;
    if (start > end) {
        start = end;
    }
    if (max_len < end - start) {
        end = start + max_len;
    }
    if (bitmap) {
        ret = map_bitmap(bs, bitmap, start, end, io.json);
    } else {
        ret = map_allocation(bs, start, end, io.json, filename);
    }
    fflush(stdout);
    if (!cli_close_image(bs) && ret == CLI_EXIT_OK) {
        ret = CLI_EXIT_ERROR;
    }
    return ret;
}

/* ----------------------------------------------------------------- check */

/* The driver's messages, one per line, for the JSON "problems" string;
 * NULL when there are none (caller frees). */
static char *check_messages_text(const BdrvCheckResult *res)
{
    size_t len = 0;
    for (size_t i = 0; i < res->nb_messages; i++) {
        len += strlen(res->messages[i]) + 1;
    }
    if (!len) {
        return NULL;
    }
    char *text = malloc(len + 1), *p = text;
    if (!text) {
        return NULL;
    }
    for (size_t i = 0; i < res->nb_messages; i++) {
        p = stpcpy(p, res->messages[i]);
        *p++ = '\n';
    }
    *p = '\0';
    return text;
}

/*
 * Print a finished check as qemu-img check does: JSON on stdout, or the
 * messages and warnings on stderr and the verdict on stdout.  `problems` is
 * every corruption and check error the driver counted (check errors count
 * as corruption here; qemu-img check would exit 1 on them).  Leaked
 * clusters are reported apart, as qemu-img does: harmless, exit status 3
 * when they are the only problem.  The numbers qemu-img adds to its JSON
 * are added when known.
 */
static void check_print(const char *filename, const char *format,
                        const BdrvCheckResult *res,
                        struct json_object *bad_bitmaps, bool json)
{
    uint64_t problems = res->corruptions + res->check_errors;
    size_t nb_bad = json_object_array_length(bad_bitmaps);

    if (json) {
        _cleanup_json_ struct json_object *o = json_object_new_object();
        _cleanup_free_ char *text = check_messages_text(res);
        json_object_object_add(o, "filename", json_object_new_string(filename));
        json_object_object_add(o, "format", json_object_new_string(format));
        json_object_object_add(o, "check-errors", json_object_new_int(0));
        json_object_object_add(o, "corruptions",
                               json_object_new_int64((int64_t)problems));
        if (res->leaks) {
            json_object_object_add(o, "leaks",
                                   json_object_new_int64((int64_t)res->leaks));
        }
        if (text) {
            json_object_object_add(o, "problems", json_object_new_string(text));
        }
        if (res->messages_dropped) {
            json_object_object_add(o, "problems-not-listed", json_object_new_int64(
                (int64_t)res->messages_dropped));
        }
        if (res->image_end_offset) {
            json_object_object_add(o, "image-end-offset", json_object_new_int64(
                (int64_t)res->image_end_offset));
        }
        if (res->total_clusters) {
            json_object_object_add(o, "total-clusters", json_object_new_int64(
                (int64_t)res->total_clusters));
            json_object_object_add(o, "allocated-clusters", json_object_new_int64(
                (int64_t)res->allocated_clusters));
        }
        json_object_object_add(o, "inconsistent-bitmaps",
                               json_object_get(bad_bitmaps));
        cli_print_json(o);
        return;
    }
    for (size_t i = 0; i < res->nb_messages; i++) {
        fprintf(stderr, "%s\n", res->messages[i]);
    }
    if (res->messages_dropped) {
        fprintf(stderr, "(%" PRIu64 " more problems were not listed)\n",
                res->messages_dropped);
    }
    for (size_t i = 0; i < nb_bad; i++) {
        struct json_object *b = json_object_array_get_idx(bad_bitmaps, i);
        fprintf(stderr, "Warning: bitmap '%s' is inconsistent: %s. "
                "Its dirty bits can not be trusted; remove it with "
                "'bitback bitmap --remove %s %s' and take a full backup.\n",
                json_object_get_string(json_object_object_get(b, "name")),
                json_object_get_string(json_object_object_get(b, "reason")),
                filename,
                json_object_get_string(json_object_object_get(b, "name")));
    }
    if (problems > 0) {
        fprintf(stderr, "\n%" PRIu64 " errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image "
                "may corrupt it.\n", problems);
    }
    if (res->leaks > 0) {
        fprintf(stderr, "\n%" PRIu64 " leaked clusters were found on the "
                "image.\nThis means waste of disk space, but no harm to "
                "data.\n", res->leaks);
    }
    if (problems > 0 || res->leaks > 0) {
        return;
    }
    if (nb_bad) {
        fprintf(stderr, "\n%zu inconsistent bitmap(s) were found; the "
                "image data itself is intact.\n", nb_bad);
    } else {
        printf("No errors were found on the image.\n");
    }
}

static int img_check(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    ImgOpts io = {0};
    const char *filename;
    BdrvCheckResult res = BDRV_CHECK_RESULT_INIT;
    _cleanup_json_ struct json_object *bad_bitmaps = json_object_new_array();
    BlockDriverState *bs;
    Error *err = NULL;
    int c, ret;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:Uq", long_opts, NULL)) != -1) {
        if (c == 'q') {
            continue;
        }
        ret = img_parse_opt(c, &io);
        if (ret != IMG_OPT_PARSED) {
            return ret;
        }
    }
    filename = img_one_file("check", argc, argv);
    if (!filename) {
        return CLI_EXIT_ERROR;
    }

    bs = cli_open_image(filename, io.fmt, io.open_flags, &err);
    if (!bs) {
        /* An image too broken to open is a failed check, not a crash. */
        error_prepend(&err, "Check failed: ");
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    if (bs->drv->check) {
        int r = bs->drv->check(bs, &res);
        if (r < 0) {
            error_report("Check of '%s' could not complete: %s", filename,
                         strerror(-r));
            bdrv_check_result_clear(&res);
            bdrv_close(bs, NULL);
            return CLI_EXIT_ERROR;
        }
    }
    for (BdrvDirtyBitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        if (bm->inconsistent) {
            struct json_object *b = json_object_new_object();
            json_object_object_add(b, "name", json_object_new_string(bm->name));
            json_object_object_add(b, "reason", json_object_new_string(
                bm->inconsistent_reason ? bm->inconsistent_reason : "unknown"));
            json_object_array_add(bad_bitmaps, b);
        }
    }
    ret = res.corruptions + res.check_errors > 0 ? CLI_EXIT_CORRUPT
        : res.leaks || json_object_array_length(bad_bitmaps) ? CLI_EXIT_CHECK_WARN
        : CLI_EXIT_OK;
    check_print(filename, bs->drv->format_name, &res, bad_bitmaps, io.json);
    bdrv_check_result_clear(&res);
    fflush(stdout);
    if (!cli_close_image(bs) && ret == CLI_EXIT_OK) {
        ret = CLI_EXIT_ERROR;
    }
    return ret;
}

/* ------------------------------------------------------------ dispatcher */

int cli_cmd_img(int argc, char **argv)
{
    const char *sub;

    if (argc < 2) {
        cli_img_usage(stderr);
        return CLI_EXIT_ERROR;
    }
    sub = argv[1];
    if (!strcmp(sub, "-h") || !strcmp(sub, "--help") || !strcmp(sub, "help")) {
        cli_img_usage(stdout);
        return CLI_EXIT_OK;
    }
    if (!strcmp(sub, "create")) {
        return img_create(argc - 1, argv + 1);
    }
    if (!strcmp(sub, "info")) {
        return img_info(argc - 1, argv + 1);
    }
    if (!strcmp(sub, "map")) {
        return img_map(argc - 1, argv + 1);
    }
    if (!strcmp(sub, "check")) {
        return img_check(argc - 1, argv + 1);
    }
    error_report("img: unknown sub-command '%s' (create, info, map, check)", sub);
    return CLI_EXIT_ERROR;
}
