/*
 * bitback: the offline command-line tool.
 *
 * It works on images directly through the block library (src/block), the
 * same code the daemon uses, so a write made with `bitback io` marks the
 * image's enabled persistent bitmaps exactly as a write through bitbackd
 * would.  Flags follow qemu-img and qemu-io wherever those tools have one.
 *
 *   bitback img create|info|map|check ...
 *   bitback bitmap --add|--remove|--clear|--enable|--disable|--merge ...
 *   bitback io [-f FMT] [-r] FILE -c CMD [-c CMD ...]
 *
 * This file only dispatches; each sub-command parses its own options.
 */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/cli-version.h"

static void usage(FILE *out)
{
    const char *const *names = bdrv_format_names();

    fprintf(out,
            "Usage: bitback COMMAND [ARGS...]\n"
            "\n"
            "Offline tool for block images with persistent dirty bitmaps.\n"
            "\n"
            "Commands:\n"
            "  img create [-f FMT] [-o OPTIONS] FILE [SIZE]\n"
            "                         create an image (raw, or a qbm overlay)\n"
            "  img info [--output=human|json] [-f FMT] FILE\n"
            "                         show size, format and bitmaps\n"
            "  img map [--output=human|json] [--bitmap NAME] [-f FMT] FILE\n"
            "                         show allocation, or a bitmap's extents\n"
            "  img check [-f FMT] FILE\n"
            "                         check the image's metadata\n"
            "  bitmap OPERATIONS [-f FMT] FILE NAME\n"
            "                         change persistent bitmaps (see 'bitback bitmap --help')\n"
            "  io [-f FMT] [-r] FILE -c CMD [-c CMD ...]\n"
            "                         read and write the image (see 'bitback io --help')\n"
            "  help                   show this help\n"
            "\n"
            "Options:\n"
            "  -h, --help             show this help\n"
            "  -V, --version          show the version\n"
            "\n"
            "Sizes and offsets accept the suffixes K, M, G, T, P, E (powers of 1024).\n");
    if (names) {
        fprintf(out, "\nSupported formats:");
        for (size_t i = 0; names[i]; i++) {
            const BlockDriver *drv = bdrv_find_format(names[i]);
            if (drv && !drv->is_protocol) {
                fprintf(out, " %s", names[i]);
            }
        }
        fprintf(out, "\n");
    }
}

int main(int argc, char **argv)
{
    const char *cmd;

    error_progname = "bitback";
    if (argc < 2) {
        usage(stderr);
        return CLI_EXIT_ERROR;
    }
    cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        if (argc > 2 && !strcmp(cmd, "help")) {
            if (!strcmp(argv[2], "img")) {
                cli_img_usage(stdout);
                return CLI_EXIT_OK;
            } else if (!strcmp(argv[2], "bitmap")) {
                cli_bitmap_usage(stdout);
                return CLI_EXIT_OK;
            } else if (!strcmp(argv[2], "io")) {
                cli_io_usage(stdout);
                return CLI_EXIT_OK;
            }
        }
        usage(stdout);
        return CLI_EXIT_OK;
    }
    if (!strcmp(cmd, "-V") || !strcmp(cmd, "--version") ||
        !strcmp(cmd, "version")) {
        printf("bitback version %s\n", BITBACK_VERSION);
        return CLI_EXIT_OK;
    }
    if (!strcmp(cmd, "img")) {
        return cli_cmd_img(argc - 1, argv + 1);
    }
    if (!strcmp(cmd, "bitmap")) {
        return cli_cmd_bitmap(argc - 1, argv + 1);
    }
    if (!strcmp(cmd, "io")) {
        return cli_cmd_io(argc - 1, argv + 1);
    }
    error_report("unknown command '%s' (try 'bitback --help')", cmd);
    return CLI_EXIT_ERROR;
}
