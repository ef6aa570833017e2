/*
 * libFuzzer target: the two QBM on-disk structures a hostile image file can
 * supply (docs/specs/qbm.md), both in block/drivers/qbm/qbm-format.c:
 *   - input starting with the bitmap magic "QBMBITS\n": a bitmap file,
 *     loaded by qbm_bitmap_file_load() (header decoder, size checks,
 *     checksum, the bits into an HBitmap) with the image size and
 *     granularity its own header claims, as when the descriptor agrees;
 *   - anything else: descriptor text, parsed by qbm_descriptor_parse(); a
 *     descriptor it accepts is serialized (qbm_descriptor_to_json) and must
 *     parse again to the same JSON.
 * The bitmap file is written to one temporary file (the loader takes a
 * path and refuses symbolic links, so /proc/self/fd/N cannot be used); the
 * file and its folder are removed at exit.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>

#include "bitmap/hbitmap.h"
#include "block/drivers/qbm/qbm-format.h"
#include "util/bswap.h"
#include "util/cleanup.h"
#include "util/error.h"
#include "fuzz-util.h"

/* Bits loaded at most: keeps one execution fast and small. */
#define FUZZ_MAX_DATA (256u * 1024)

static char tmp_dir[64];
static char tmp_path[96];

static void remove_tmp(void)
{
    unlink(tmp_path);
    rmdir(tmp_dir);
}

static bool make_tmp(void)
{
    if (tmp_path[0]) {
        return true;
    }
    const char *t = getenv("TMPDIR");
    snprintf(tmp_dir, sizeof(tmp_dir), "%s/fuzz-qbm.XXXXXX",
             t && *t && strlen(t) < 40 ? t : "/tmp");
    if (!mkdtemp(tmp_dir)) {
        perror("fuzz-qbm-descriptor: mkdtemp");
        abort();
    }
    snprintf(tmp_path, sizeof(tmp_path), "%s/bitmap", tmp_dir);
    atexit(remove_tmp);
    return true;
}

static void fuzz_bitmap_file(const uint8_t *data, size_t size)
{
    make_tmp();
    int fd = open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, data, size) != (ssize_t)size) {
        perror("fuzz-qbm-descriptor: writing the bitmap file");
        abort();
    }
    close(fd);

    /* The size and granularity the header claims (offsets: qbm.md 2). */
    unsigned shift = size >= 24 ? ld_le32(data + 20) : 9;
    uint64_t image_size = size >= 32 ? ld_le64(data + 24) : 0;
    if (shift < HBITMAP_MIN_GRANULARITY_SHIFT ||
        shift > HBITMAP_MAX_GRANULARITY_SHIFT) {
        shift = HBITMAP_MIN_GRANULARITY_SHIFT;
    }
    if (qbm_data_size(image_size, shift) > FUZZ_MAX_DATA) {
        image_size = 0;
    }
    HBitmap *hb = hbitmap_new(image_size, shift);
    QbmHeader hdr;
    char *reason = NULL;
    (void)qbm_bitmap_file_load(tmp_path, "fuzz", image_size, shift, hb, &hdr,
                               &reason);
    free(reason);
    hbitmap_free(hb);
}

static void fuzz_descriptor(const uint8_t *data, size_t size)
{
    QbmDescriptor d;
    Error *err = NULL;
    if (!qbm_descriptor_parse((const char *)data, size, "fuzz", &d, &err)) {
        error_free(err);
        return;
    }
    _cleanup_free_ char *json = qbm_descriptor_to_json(&d);
    if (!json) {
        abort();
    }
    QbmDescriptor d2;
    if (!qbm_descriptor_parse(json, strlen(json), "fuzz", &d2, &err)) {
        fprintf(stderr, "descriptor does not re-parse: %s\n%s\n",
                error_get_pretty(err), json);
        abort();
    }
    _cleanup_free_ char *json2 = qbm_descriptor_to_json(&d2);
    if (!json2 || strcmp(json, json2) != 0) {
        fprintf(stderr, "descriptor round trip differs:\n%s\n%s\n", json,
                json2 ? json2 : "(null)");
        abort();
    }
    qbm_descriptor_clear(&d2);
    qbm_descriptor_clear(&d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size >= 8 && memcmp(data, QBM_BITMAP_MAGIC, 8) == 0) {
        fuzz_bitmap_file(data, size);
    } else {
        fuzz_descriptor(data, size);
    }
    return 0;
}
