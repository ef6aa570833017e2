/*
 * bitback: the command-line tool.
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

/* The backup tools: each prints its own --help. */
static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
} backup_cmds[] = {
    { "backup", cli_cmd_backup },
    { "restore", cli_cmd_restore },
    { "serve", cli_cmd_serve },
    { "verify", cli_cmd_verify },
    { "list", cli_cmd_list },
    { "prune", cli_cmd_prune },
};

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
            "                         create an image (raw, qcow2, or a qbm overlay)\n"
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
            "  backup --repo DIR (--connect QMP --node NODE... | --image FILE)\n"
            "         [--level full|inc|diff|auto] [--bitmap NAME]\n"
            "                         take a backup into a repository\n"
            "  restore --repo DIR [--node NODE] [--at ID|latest] OUTPUT [-f raw|qcow2]\n"
            "          [--force | --existing [--sparse]]\n"
            "                         write the image as it was at a backup\n"
            "  serve --repo DIR [--at ID|latest] [--node NODE] (--socket PATH |\n"
            "        --bind ADDR:PORT) [--writable] [--export-name NAME]\n"
            "                         export a backup point over NBD at once\n"
            "  verify --repo DIR [--at ID|all] [--against NBD_URI|FILE]\n"
            "                         re-read and check backups against their hashes\n"
            "  list --repo DIR [--output=human|json]\n"
            "                         the backups, oldest first\n"
            "  prune --repo DIR --keep N\n"
            "                         keep the newest N backups, merging older ones\n"
            "  help                   show this help\n"
            "\n"
            "Options:\n"
            "  -h, --help             show this help\n"
            "  -V, --version          show the version\n"
            "\n"
            "A repository DIR is a folder, or rbd:POOL[/NS][:conf=PATH][:id=USER]: one\n"
            "in a Ceph pool (RADOS objects and an RBD image per backup).\n"
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
    for (size_t i = 0; i < sizeof(backup_cmds) / sizeof(backup_cmds[0]); i++) {
        if (!strcmp(cmd, backup_cmds[i].name)) {
            return backup_cmds[i].fn(argc - 1, argv + 1);
        }
    }
    error_report("unknown command '%s' (try 'bitback --help')", cmd);
    return CLI_EXIT_ERROR;
}
