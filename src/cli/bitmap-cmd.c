/*
 * `bitback bitmap`: change an image's persistent bitmaps offline, with
 * qemu-img bitmap's flags.
 *
 *   bitback bitmap (--add [-g G] [--disable] | --remove | --clear | --enable
 *                  | --disable | --merge SRC [-b SRCFILE [-F SRCFMT]])...
 *                  [-f FMT] FILE NAME
 *
 * Several operations may be given; they run in command-line order on the
 * bitmap NAME, and the first failure stops the rest (earlier ones stay
 * done, as with qemu-img).  The image is opened read-write so the driver
 * stores the result when it is closed; a failure to store is reported and
 * gives a non-zero exit.  A --merge from another file opens that file
 * read-only.  No operation here touches guest data (DESIGN.md D4).
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "util/cleanup.h"

typedef enum BitmapActionKind {
    BITMAP_ADD,
    BITMAP_REMOVE,
    BITMAP_CLEAR,
    BITMAP_ENABLE,
    BITMAP_DISABLE,
    BITMAP_MERGE,
} BitmapActionKind;

typedef struct BitmapAction {
    BitmapActionKind kind;
    const char *src;          /* --merge: source bitmap name */
} BitmapAction;

enum {
    OPT_ADD = 256,
    OPT_REMOVE,
    OPT_CLEAR,
    OPT_ENABLE,
    OPT_DISABLE,
    OPT_MERGE,
};

/* Upper bound on operations in one call: more is certainly a mistake. */
#define BITMAP_MAX_ACTIONS 64

void cli_bitmap_usage(FILE *out)
{
    fprintf(out,
            "Usage: bitback bitmap OPERATION... [-f FMT] FILE NAME\n"
            "\n"
            "Operations (applied in order to bitmap NAME of FILE):\n"
            "  --add [-g GRANULARITY] [--disable]\n"
            "                  create a persistent bitmap (default granularity 64K),\n"
            "                  recording writes unless --disable follows\n"
            "  --remove        delete the bitmap (also an inconsistent one)\n"
            "  --clear         clear every bit (starts a new generation)\n"
            "  --enable        start recording writes\n"
            "  --disable       stop recording writes\n"
            "  --merge SRC [-b SRCFILE [-F SRCFMT]]\n"
            "                  OR bitmap SRC (of FILE, or of SRCFILE) into NAME\n"
            "Options:\n"
            "  -f FMT          format of FILE (default: probe)\n"
            "  -g GRANULARITY  with --add: bytes per bit, a power of two 512..2G\n"
            "  -b SRCFILE      with --merge: the file holding SRC\n"
            "  -F SRCFMT       with -b: the format of SRCFILE\n");
}

static const char *action_name(BitmapActionKind k)
{
    switch (k) {
    case BITMAP_ADD: return "--add";
    case BITMAP_REMOVE: return "--remove";
    case BITMAP_CLEAR: return "--clear";
    case BITMAP_ENABLE: return "--enable";
    case BITMAP_DISABLE: return "--disable";
    case BITMAP_MERGE: return "--merge";
    }
    return "?";
}

/* Merge bitmap src_name of src_bs (or of bs when src_bs is NULL) into dst. */
static bool do_merge(BlockDriverState *bs, BdrvDirtyBitmap *dst,
                     const char *src_name, const char *src_file,
                     const char *src_fmt, Error **errp)
{
    BlockDriverState *src_bs = NULL;
    BdrvDirtyBitmap *src;
    bool ok;

    if (src_file) {
        src_bs = cli_open_image(src_file, src_fmt, 0, errp);
        if (!src_bs) {
            return false;
        }
    }
    src = bdrv_find_dirty_bitmap(src_bs ? src_bs : bs, src_name);
    if (!src) {
        error_setg(errp, "Bitmap '%s' not found in '%s'", src_name,
                   src_file ? src_file : "the image");
        bdrv_close(src_bs, NULL);
        return false;
    }
    ok = bdrv_merge_dirty_bitmaps(dst, &src, 1, errp);
    if (src_bs) {
        bdrv_close(src_bs, NULL);
    }
    return ok;
}

int cli_cmd_bitmap(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"add", no_argument, NULL, OPT_ADD},
        {"remove", no_argument, NULL, OPT_REMOVE},
        {"clear", no_argument, NULL, OPT_CLEAR},
        {"enable", no_argument, NULL, OPT_ENABLE},
        {"disable", no_argument, NULL, OPT_DISABLE},
        {"merge", required_argument, NULL, OPT_MERGE},
        {"granularity", required_argument, NULL, 'g'},
        {"source-file", required_argument, NULL, 'b'},
        {"source-format", required_argument, NULL, 'F'},
        {NULL, 0, NULL, 0},
    };
    BitmapAction actions[BITMAP_MAX_ACTIONS];
    int nactions = 0;
    const char *fmt = NULL, *filename, *name;
    const char *src_file = NULL, *src_fmt = NULL, *gran_str = NULL;
    uint32_t granularity = 0;
    bool add = false, merge = false, ok = true;
    BlockDriverState *bs;
    Error *err = NULL;
    int c, ret = CLI_EXIT_OK;

    cli_reset_getopt();
    while ((c = getopt_long(argc, argv, "hf:g:b:F:", long_opts, NULL)) != -1) {
        BitmapActionKind kind;

        switch (c) {
        case 'h':
            cli_bitmap_usage(stdout);
            return CLI_EXIT_OK;
        case 'f':
            fmt = optarg;
            continue;
        case 'g':
            gran_str = optarg;
            continue;
        case 'b':
            src_file = optarg;
            continue;
        case 'F':
            src_fmt = optarg;
            continue;
        case OPT_ADD:
            kind = BITMAP_ADD;
            add = true;
            break;
        case OPT_REMOVE:
            kind = BITMAP_REMOVE;
            break;
        case OPT_CLEAR:
            kind = BITMAP_CLEAR;
            break;
        case OPT_ENABLE:
            kind = BITMAP_ENABLE;
            break;
        case OPT_DISABLE:
            kind = BITMAP_DISABLE;
            break;
        case OPT_MERGE:
            kind = BITMAP_MERGE;
            merge = true;
            break;
        default:
            return CLI_EXIT_ERROR;
        }
        if (nactions == BITMAP_MAX_ACTIONS) {
            error_report("bitmap: too many operations (at most %d)",
                         BITMAP_MAX_ACTIONS);
            return CLI_EXIT_ERROR;
        }
        actions[nactions].kind = kind;
        actions[nactions].src = kind == BITMAP_MERGE ? optarg : NULL;
        nactions++;
    }
    if (nactions == 0) {
        error_report("bitmap: need at least one of --add, --remove, --clear, "
                     "--enable, --disable, or --merge");
        return CLI_EXIT_ERROR;
    }
    if (gran_str && !add) {
        error_report("bitmap: -g is only valid with --add");
        return CLI_EXIT_ERROR;
    }
    if (src_file && !merge) {
        error_report("bitmap: -b is only valid with --merge");
        return CLI_EXIT_ERROR;
    }
    if (src_fmt && !src_file) {
        error_report("bitmap: -F is only valid with -b");
        return CLI_EXIT_ERROR;
    }
    if (argc - optind != 2) {
        error_report("bitmap: expecting a file name and a bitmap name");
        return CLI_EXIT_ERROR;
    }
    filename = argv[optind];
    name = argv[optind + 1];
    if (gran_str) {
        uint64_t g;
        if (!cli_parse_size(gran_str, "granularity", &g, &err)) {
            error_report_err(err);
            return CLI_EXIT_ERROR;
        }
        if (g < 512 || g > (UINT64_C(1) << 31) || !IS_POW2(g)) {
            error_report("Invalid granularity '%s': must be a power of two "
                         "from 512 to 2G", gran_str);
            return CLI_EXIT_ERROR;
        }
        granularity = (uint32_t)g;
    }

    bs = cli_open_image(filename, fmt, BDRV_O_RDWR, &err);
    if (!bs) {
        error_report_err(err);
        return CLI_EXIT_ERROR;
    }
    if (!granularity) {
        granularity = bdrv_default_bitmap_granularity(bs);
    }

    for (int i = 0; i < nactions && ok; i++) {
        const BitmapAction *a = &actions[i];
        BdrvDirtyBitmap *bm = NULL;

        if (a->kind == BITMAP_ADD) {
            /* "--add --disable" creates the bitmap disabled in one step. */
            bool disabled = i + 1 < nactions &&
                            actions[i + 1].kind == BITMAP_DISABLE;
            ok = bdrv_dirty_bitmap_add(bs, name, granularity, true, disabled,
                                       &err) != NULL;
            if (disabled) {
                i++;
            }
        } else if (a->kind == BITMAP_REMOVE) {
            ok = bdrv_dirty_bitmap_remove(bs, name, &err);
        } else {
            bm = bdrv_find_dirty_bitmap(bs, name);
            if (!bm) {
                error_setg(&err, "Bitmap '%s' not found", name);
                ok = false;
            } else switch (a->kind) {
            case BITMAP_CLEAR:
                ok = bdrv_clear_dirty_bitmap(bm, &err);
                break;
            case BITMAP_ENABLE:
                ok = bdrv_enable_dirty_bitmap(bm, &err);
                break;
            case BITMAP_DISABLE:
                ok = bdrv_disable_dirty_bitmap(bm, &err);
                break;
            case BITMAP_MERGE:
                ok = do_merge(bs, bm, a->src, src_file, src_fmt, &err);
                break;
            default:
                break;
            }
        }
        if (!ok) {
            error_prepend(&err, "%s %s: ", action_name(a->kind), name);
        }
    }
    if (!ok) {
        error_prepend(&err, "%s: ", filename);
        error_report_err(err);
        ret = CLI_EXIT_ERROR;
    }
    /* Store what was done, even after a failure (earlier operations
     * stand); a store error is an error of the whole command. */
    if (!cli_close_image(bs)) {
        ret = CLI_EXIT_ERROR;
    }
    return ret;
}
