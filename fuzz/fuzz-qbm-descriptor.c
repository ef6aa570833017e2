/*
 * libFuzzer target: the two QBM on-disk structures a hostile image file can
 * supply (docs/specs/qbm.md), both in block/drivers/qbm/qbm-format.c:
 *   - input starting with the bitmap magic "QBMBITS\n": a bitmap file,
 *     written to a memfd and loaded by qbm_bitmap_fd_load() (the loader of
 *     qbm_bitmap_file_load() after its O_NOFOLLOW open: header decoder,
 *     size checks, checksum, the bits into an HBitmap) with the image size
 *     and granularity its own header claims, as when the descriptor agrees;
 *   - anything else: descriptor text, parsed by qbm_descriptor_parse(); a
 *     descriptor it accepts is serialized (qbm_descriptor_to_json) and must
 *     parse again to the same JSON.
 * The target writes no file.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>

#include "bitmap/hbitmap.h"
#include "block/drivers/qbm/qbm-format.h"
#include "util/bswap.h"
#include "util/cleanup.h"
#include "util/error.h"
#include "fuzz-util.h"

/* Bits loaded at most: keeps one execution fast and small. */
#define FUZZ_MAX_DATA (256u * 1024)

static void fuzz_bitmap_file(const uint8_t *data, size_t size)
{
    _cleanup_close_ int fd = memfd_create("fuzz-qbm-bitmap", MFD_CLOEXEC);
    if (fd < 0 || write(fd, data, size) != (ssize_t)size) {
        perror("fuzz-qbm-descriptor: writing the bitmap file to a memfd");
        abort();
    }

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
    (void)qbm_bitmap_fd_load(fd, "fuzz", image_size, shift, hb, &hdr,
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
