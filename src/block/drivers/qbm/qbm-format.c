/*
 * QBM on-disk format: parsing and writing the JSON descriptor and the bitmap
 * files' fixed header and bits (docs/specs/qbm.md, sections 1 and 2).
 *
 * Everything read from disk is validated here before it is used: the
 * descriptor's length, field types and ranges, file names that must stay in
 * the descriptor's folder, and each bitmap file's header against the length
 * of the file, before any allocation sized by those fields (Q6).
 * A bitmap file problem is reported as a reason string, not as an Error,
 * because the caller turns it into an *inconsistent* bitmap rather than a
 * failed open (Q2).
 */
#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>
#include <json-c/json.h>

#include "block/block.h"
#include "block/wil-store.h"
#include "block/drivers/file-lock.h"
#include "block/drivers/qbm/qbm-format.h"
#include "util/bswap.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/osdep.h"

#define QBM_IO_CHUNK (1024 * 1024)

uint64_t qbm_data_size(uint64_t image_size, unsigned shift)
{
    uint64_t clusters = (image_size >> shift) +
                        ((image_size & ((UINT64_C(1) << shift) - 1)) ? 1 : 0);
    return DIV_ROUND_UP(clusters, 8);
}

int qbm_granularity_shift(uint64_t granularity)
{
    if (!IS_POW2(granularity) ||
        granularity < (UINT64_C(1) << HBITMAP_MIN_GRANULARITY_SHIFT) ||
        granularity > (UINT64_C(1) << HBITMAP_MAX_GRANULARITY_SHIFT)) {
        return -1;
    }
    return __builtin_ctzll(granularity);
}

/* ---- header ---- */


#define OFF_MAGIC       0
#define OFF_VERSION     8
#define OFF_HEADER_SIZE 12
#define OFF_FLAGS       16
#define OFF_SHIFT       20
#define OFF_IMAGE_SIZE  24
#define OFF_DATA_SIZE   32
#define OFF_CHECKSUM    40
#define OFF_GENERATION  48
#define GENERATION_LEN  36

void qbm_header_encode(const QbmHeader *h, uint8_t buf[QBM_HEADER_SIZE])
{
    memset(buf, 0, QBM_HEADER_SIZE);
    memcpy(buf + OFF_MAGIC, QBM_BITMAP_MAGIC, 8);
    st_le32(buf + OFF_VERSION, h->version);
    st_le32(buf + OFF_HEADER_SIZE, h->header_size);
    st_le32(buf + OFF_FLAGS, h->flags);
    st_le32(buf + OFF_SHIFT, h->granularity_shift);
    st_le64(buf + OFF_IMAGE_SIZE, h->image_size);
    st_le64(buf + OFF_DATA_SIZE, h->data_size);
    st_le64(buf + OFF_CHECKSUM, h->checksum);
    memcpy(buf + OFF_GENERATION, h->generation,
           strnlen(h->generation, GENERATION_LEN));
}

static char *reasonf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *reasonf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = vstrprintf(fmt, ap);
    va_end(ap);
    return s ? s : strdup("out of memory");
}

/* Structural header checks that need nothing but the header itself. */
static char *header_decode(const uint8_t *buf, const char *display, QbmHeader *h)
{
    if (memcmp(buf + OFF_MAGIC, QBM_BITMAP_MAGIC, 8) != 0) {
        return reasonf("bitmap file '%s' has wrong magic (not a QBM bitmap file)",
                       display);
    }
    h->version = ld_le32(buf + OFF_VERSION);
    h->header_size = ld_le32(buf + OFF_HEADER_SIZE);
    h->flags = ld_le32(buf + OFF_FLAGS);
    h->granularity_shift = ld_le32(buf + OFF_SHIFT);
    h->image_size = ld_le64(buf + OFF_IMAGE_SIZE);
    h->data_size = ld_le64(buf + OFF_DATA_SIZE);
    h->checksum = ld_le64(buf + OFF_CHECKSUM);
    memcpy(h->generation, buf + OFF_GENERATION, GENERATION_LEN);
    h->generation[GENERATION_LEN] = '\0';

    if (h->version != QBM_VERSION) {
        return reasonf("bitmap file '%s' has unsupported version %u", display,
                       h->version);
    }
    if (h->header_size != QBM_HEADER_SIZE) {
        return reasonf("bitmap file '%s' has header size %u, expected %u",
                       display, h->header_size, QBM_HEADER_SIZE);
    }
    if (h->flags & ~QBM_KNOWN_FLAGS) {
        return reasonf("bitmap file '%s' has unknown flags 0x%x", display,
                       h->flags & ~QBM_KNOWN_FLAGS);
    }
    if (h->granularity_shift < HBITMAP_MIN_GRANULARITY_SHIFT ||
        h->granularity_shift > HBITMAP_MAX_GRANULARITY_SHIFT) {
        return reasonf("bitmap file '%s' has invalid granularity shift %u "
                       "(must be %d..%d)", display, h->granularity_shift,
                       HBITMAP_MIN_GRANULARITY_SHIFT, HBITMAP_MAX_GRANULARITY_SHIFT);
    }
    if (!uuid_is_valid_str(h->generation)) {
        return reasonf("bitmap file '%s' has an invalid generation UUID", display);
    }
    return NULL;
}

QbmLoadResult qbm_bitmap_file_load(const char *path, const char *display,
                                   uint64_t image_size, unsigned shift,
                                   HBitmap *hb, QbmHeader *ret_hdr,
                                   char **ret_reason)
{
    Error *err = NULL;
    _cleanup_wil_store_ WilStore *st = qbm_bitmap_file_open(path, display,
                                                            false, &err);
    if (!st) {
        *ret_reason = strdup(error_get_pretty(err));
        error_free(err);
        return QBM_LOAD_BAD;
    }
    return qbm_bitmap_store_load(st, display, image_size, shift, hb, ret_hdr,
                                 ret_reason);
}

QbmLoadResult qbm_bitmap_fd_load(int fd, const char *display,
                                 uint64_t image_size, unsigned shift,
                                 HBitmap *hb, QbmHeader *ret_hdr,
                                 char **ret_reason)
{
    _cleanup_wil_store_ WilStore *st = wil_store_fd(fd);
    if (!st) {
        *ret_reason = reasonf("out of memory reading bitmap file '%s'", display);
        return QBM_LOAD_BAD;
    }
    return qbm_bitmap_store_load(st, display, image_size, shift, hb, ret_hdr,
                                 ret_reason);
}

QbmLoadResult qbm_bitmap_store_load(WilStore *st, const char *display,
                                    uint64_t image_size, unsigned shift,
                                    HBitmap *hb, QbmHeader *ret_hdr,
                                    char **ret_reason)
{
    *ret_reason = NULL;
    uint64_t expect_data = qbm_data_size(image_size, shift);
    uint64_t expect_len = QBM_HEADER_SIZE + expect_data;

    uint64_t flen;
    int r = wil_store_get_size(st, &flen);
    if (r == -ENOENT) {
        *ret_reason = reasonf("bitmap file '%s' is missing", display);
        return QBM_LOAD_BAD;
    }
    if (r < 0) {
        *ret_reason = reasonf("cannot stat bitmap file '%s': %s", display,
                              strerror(-r));
        return QBM_LOAD_BAD;
    }
    if (flen < QBM_HEADER_SIZE) {
        *ret_reason = reasonf("bitmap file '%s' is truncated: %llu bytes, "
                              "expected %llu (header incomplete)", display,
                              (unsigned long long)flen,
                              (unsigned long long)expect_len);
        return QBM_LOAD_BAD;
    }
    uint8_t hbuf[QBM_HEADER_SIZE];
    r = wil_store_pread(st, hbuf, sizeof(hbuf), 0);
    if (r < 0) {
        *ret_reason = reasonf("cannot read bitmap file '%s': %s", display,
                              strerror(-r));
        return QBM_LOAD_BAD;
    }
    QbmHeader h;
    memset(&h, 0, sizeof(h));
    char *why = header_decode(hbuf, display, &h);
    if (why) {
        *ret_reason = why;
        return QBM_LOAD_BAD;
    }
    if (ret_hdr) {
        *ret_hdr = h;
    }
    if (h.granularity_shift != shift) {
        *ret_reason = reasonf("bitmap file '%s' has granularity %llu, but the "
                              "descriptor says %llu", display,
                              1ULL << h.granularity_shift, 1ULL << shift);
        return QBM_LOAD_BAD;
    }
    if (h.image_size != image_size) {
        *ret_reason = reasonf("bitmap file '%s' size mismatch: it covers %llu "
                              "bytes, the image is %llu bytes", display,
                              (unsigned long long)h.image_size,
                              (unsigned long long)image_size);
        return QBM_LOAD_BAD;
    }
    if (h.data_size != expect_data) {
        *ret_reason = reasonf("bitmap file '%s' size mismatch: header says "
                              "%llu bytes of bits, expected %llu", display,
                              (unsigned long long)h.data_size,
                              (unsigned long long)expect_data);
        return QBM_LOAD_BAD;
    }
    if (flen < expect_len) {
        *ret_reason = reasonf("bitmap file '%s' is truncated: %llu bytes, "
                              "expected %llu", display, (unsigned long long)flen,
                              (unsigned long long)expect_len);
        return QBM_LOAD_BAD;
    }
    if (flen > expect_len) {
        *ret_reason = reasonf("bitmap file '%s' size mismatch: %llu bytes, "
                              "expected %llu", display, (unsigned long long)flen,
                              (unsigned long long)expect_len);
        return QBM_LOAD_BAD;
    }
    if (expect_data > QBM_MAX_BITMAP_DATA) {
        *ret_reason = reasonf("bitmap file '%s' is too large (%llu bytes of "
                              "bits, limit %llu)", display,
                              (unsigned long long)expect_data,
                              (unsigned long long)QBM_MAX_BITMAP_DATA);
        return QBM_LOAD_BAD;
    }

    XXH3_state_t *xs = XXH3_createState();
    _cleanup_free_ uint8_t *buf = malloc(QBM_IO_CHUNK);
    if (!xs || !buf) {
        XXH3_freeState(xs);
        *ret_reason = reasonf("out of memory reading bitmap file '%s'", display);
        return QBM_LOAD_BAD;
    }
    XXH3_64bits_reset(xs);
    uint64_t nb_bits = hb ? hbitmap_nb_bits(hb) : 0;
    for (uint64_t off = 0; off < expect_data; off += QBM_IO_CHUNK) {
        uint64_t n = MIN((uint64_t)QBM_IO_CHUNK, expect_data - off);
        r = wil_store_pread(st, buf, n, QBM_HEADER_SIZE + off);
        if (r < 0) {
            XXH3_freeState(xs);
            *ret_reason = reasonf("cannot read bitmap file '%s': %s", display,
                                  strerror(-r));
            return QBM_LOAD_BAD;
        }
        XXH3_64bits_update(xs, buf, n);
        if (hb) {
            uint64_t first = off * 8;
            uint64_t nbits = MIN(n * 8, nb_bits - first);
            hbitmap_deserialize_part(hb, buf, first, nbits);
        }
    }
    uint64_t sum = XXH3_64bits_digest(xs);
    XXH3_freeState(xs);
    if (!(h.flags & QBM_FLAG_CLEAN)) {
        return QBM_LOAD_NOT_CLEAN;
    }
    if (sum != h.checksum) {
        *ret_reason = reasonf("bitmap file '%s' checksum mismatch: stored "
                              "%016llx, computed %016llx (the bits are corrupt)",
                              display, (unsigned long long)h.checksum,
                              (unsigned long long)sum);
        return QBM_LOAD_BAD;
    }
    return QBM_LOAD_OK;
}

static void zero_serialize(void *opaque, uint8_t *buf, uint64_t off, uint64_t len)
{
    memset(buf, 0, len);
}

uint64_t qbm_checksum_bits(uint64_t data_size, QbmSerializeFn *fn, void *opaque)
{
    XXH3_state_t *xs = XXH3_createState();
    uint8_t *buf = malloc(QBM_IO_CHUNK);
    uint64_t sum = 0;
    if (xs && buf) {
        XXH3_64bits_reset(xs);
        for (uint64_t off = 0; off < data_size; off += QBM_IO_CHUNK) {
            uint64_t n = MIN((uint64_t)QBM_IO_CHUNK, data_size - off);
            fn(opaque, buf, off, n);
            XXH3_64bits_update(xs, buf, n);
        }
        sum = XXH3_64bits_digest(xs);
    }
    XXH3_freeState(xs);
    free(buf);
    return sum;
}

/* Write the header into st and sync: 0, or -errno with errp set. */
static int write_header_store(WilStore *st, const char *display,
                              const QbmHeader *h, Error **errp)
{
    uint8_t hbuf[QBM_HEADER_SIZE];
    qbm_header_encode(h, hbuf);
    int r = wil_store_pwrite(st, hbuf, sizeof(hbuf), 0);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot write bitmap file '%s'", display);
        return r;
    }
    r = wil_store_sync(st);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot sync bitmap file '%s'", display);
        return r;
    }
    return 0;
}

bool qbm_bitmap_check_size(uint64_t image_size, unsigned shift,
                           uint64_t max_len, Error **errp)
{
    uint64_t data_size = qbm_data_size(image_size, shift);
    uint64_t limit = MIN(QBM_MAX_BITMAP_DATA, max_len - QBM_HEADER_SIZE);
    if (max_len <= QBM_HEADER_SIZE || data_size > limit) {
        error_setg(errp, "bitmap for %llu bytes at granularity %llu would need "
                   "%llu bytes (limit %llu): use a larger granularity",
                   (unsigned long long)image_size, 1ULL << shift,
                   (unsigned long long)data_size,
                   (unsigned long long)(max_len > QBM_HEADER_SIZE ? limit : 0));
        return false;
    }
    return true;
}

int qbm_bitmap_store_init(WilStore *st, const char *display,
                          uint64_t image_size, unsigned shift,
                          const char *generation, uint32_t flags,
                          QbmHeader *ret_hdr, Error **errp)
{
    if (!qbm_bitmap_check_size(image_size, shift, UINT64_MAX, errp)) {
        return -EFBIG;
    }
    uint64_t data_size = qbm_data_size(image_size, shift);
    /* Cut first: no old bit survives the new header. */
    int r = wil_store_set_size(st, 0);
    if (r == 0) {
        r = wil_store_set_size(st, QBM_HEADER_SIZE + data_size);
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot size bitmap file '%s'", display);
        return r;
    }
    QbmHeader h = {
        .version = QBM_VERSION,
        .header_size = QBM_HEADER_SIZE,
        .flags = flags,
        .granularity_shift = shift,
        .image_size = image_size,
        .data_size = data_size,
        .checksum = qbm_checksum_bits(data_size, zero_serialize, NULL),
    };
    snprintf(h.generation, sizeof(h.generation), "%s", generation);
    r = write_header_store(st, display, &h, errp);
    if (r < 0) {
        return r;
    }
    if (ret_hdr) {
        *ret_hdr = h;
    }
    return 0;
}

int qbm_bitmap_file_create(const char *path, uint64_t image_size,
                           unsigned shift, const char *generation,
                           uint32_t flags, bool exclusive, QbmHeader *ret_hdr,
                           Error **errp)
{
    if (!qbm_bitmap_check_size(image_size, shift, UINT64_MAX, errp)) {
        return -EFBIG;
    }
    int oflags = O_RDWR | O_CREAT | (exclusive ? O_EXCL : O_TRUNC);
    int fd = open_checked(path, oflags, 0644, OPEN_NOFOLLOW, errp);
    if (fd < 0) {
        int e = errno;
        error_prepend(errp, "cannot create bitmap file: ");
        return -e;
    }
    _cleanup_wil_store_ WilStore *st = wil_store_fd_own(fd, path);
    int r = -ENOMEM;
    if (!st) {
        error_setg(errp, "out of memory");
    } else {
        r = qbm_bitmap_store_init(st, path, image_size, shift, generation,
                                  flags, ret_hdr, errp);
    }
    if (r == 0 && fsync_parent_dir(path) < 0) {
        r = -errno;
        error_setg_errno(errp, -r, "cannot sync the folder of '%s'", path);
    }
    if (r < 0 && exclusive) {
        /* O_EXCL: the file is ours, so a failure leaves nothing behind. */
        unlink(path);
    }
    return r;
}

WilStore *qbm_bitmap_file_open(const char *path, const char *display,
                               bool writable, Error **errp)
{
    Error *err = NULL;
    int fd = open_checked(path, writable ? O_RDWR : O_RDONLY, 0, OPEN_NOFOLLOW,
                          &err);
    if (fd < 0) {
        if (errno == ENOENT) {
            error_setg(errp, "bitmap file '%s' is missing", display);
        } else {
            error_setg(errp, "cannot open bitmap file '%s': %s", display,
                       error_get_pretty(err));
        }
        error_free(err);
        return NULL;
    }
    WilStore *st = wil_store_fd_own(fd, path);
    if (!st) {
        error_setg(errp, "out of memory");
    }
    return st;
}

bool qbm_bitmap_store_write_header(WilStore *st, const char *display,
                                   const QbmHeader *h, Error **errp)
{
    return write_header_store(st, display, h, errp) == 0;
}

bool qbm_bitmap_file_write_header(const char *path, const QbmHeader *h,
                                  Error **errp)
{
    _cleanup_wil_store_ WilStore *st = qbm_bitmap_file_open(path, path, true,
                                                            errp);
    return st && qbm_bitmap_store_write_header(st, path, h, errp);
}

bool qbm_bitmap_file_store(const char *path, QbmHeader *h,
                           QbmSerializeFn *fn, void *opaque, Error **errp)
{
    _cleanup_wil_store_ WilStore *st = qbm_bitmap_file_open(path, path, true,
                                                            errp);
    return st && qbm_bitmap_store_save(st, path, h, fn, opaque, errp);
}

bool qbm_bitmap_store_save(WilStore *st, const char *display, QbmHeader *h,
                           QbmSerializeFn *fn, void *opaque, Error **errp)
{
    XXH3_state_t *xs = XXH3_createState();
    _cleanup_free_ uint8_t *buf = malloc(QBM_IO_CHUNK);
    if (!xs || !buf) {
        XXH3_freeState(xs);
        error_setg(errp, "out of memory storing bitmap file '%s'", display);
        return false;
    }
    XXH3_64bits_reset(xs);
    for (uint64_t off = 0; off < h->data_size; off += QBM_IO_CHUNK) {
        uint64_t n = MIN((uint64_t)QBM_IO_CHUNK, h->data_size - off);
        fn(opaque, buf, off, n);
        XXH3_64bits_update(xs, buf, n);
        int r = wil_store_pwrite(st, buf, n, QBM_HEADER_SIZE + off);
        if (r < 0) {
            XXH3_freeState(xs);
            error_setg_errno(errp, -r, "cannot write bitmap file '%s'", display);
            return false;
        }
    }
    h->checksum = XXH3_64bits_digest(xs);
    XXH3_freeState(xs);
    int r = wil_store_set_size(st, QBM_HEADER_SIZE + h->data_size);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot size bitmap file '%s'", display);
        return false;
    }
    /* Bits and checksum durable first, with CLEAN still clear ... */
    h->flags &= ~QBM_FLAG_CLEAN;
    if (write_header_store(st, display, h, errp) < 0) {
        return false;
    }
    /* ... and only then CLEAN. */
    h->flags |= QBM_FLAG_CLEAN;
    if (write_header_store(st, display, h, errp) < 0) {
        h->flags &= ~QBM_FLAG_CLEAN;
        return false;
    }
    return true;
}

/* ---- descriptor ---- */

void qbm_bitmap_entry_clear(QbmBitmapEntry *e)
{
    free(e->name);
    free(e->file);
    memset(e, 0, sizeof(*e));
}

void qbm_descriptor_clear(QbmDescriptor *d)
{
    free(d->data_file);
    free(d->data_format);
    free(d->backing_file);
    free(d->backing_format);
    free(d->alloc_file);
    for (size_t i = 0; i < d->nb_bitmaps; i++) {
        qbm_bitmap_entry_clear(&d->bitmaps[i]);
    }
    free(d->bitmaps);
    memset(d, 0, sizeof(*d));
}

/* Fetch key from obj with the given type; *ret NULL when absent. */
static bool get_field(struct json_object *obj, const char *where, const char *key,
                      json_type type, bool required, struct json_object **ret,
                      Error **errp)
{
    struct json_object *v = NULL;
    *ret = NULL;
    if (!json_object_object_get_ex(obj, key, &v) || !v) {
        if (required) {
            error_setg(errp, "%s: '%s' is missing", where, key);
            return false;
        }
        return true;
    }
    if (!json_object_is_type(v, type)) {
        error_setg(errp, "%s: '%s' must be %s", where, key,
                   type == json_type_string ? "a string" :
                   type == json_type_int ? "an integer" :
                   type == json_type_boolean ? "a boolean" :
                   type == json_type_array ? "an array" : "an object");
        return false;
    }
    *ret = v;
    return true;
}

static bool get_string(struct json_object *obj, const char *where, const char *key,
                       bool required, char **ret, Error **errp)
{
    struct json_object *v;
    *ret = NULL;
    if (!get_field(obj, where, key, json_type_string, required, &v, errp)) {
        return false;
    }
    if (v) {
        const char *s = json_object_get_string(v);
        size_t n = (size_t)json_object_get_string_len(v);
        if (n == 0 || strlen(s) != n) {
            error_setg(errp, "%s: '%s' must be a non-empty string without NUL",
                       where, key);
            return false;
        }
        *ret = strdup(s);
        if (!*ret) {
            error_setg(errp, "out of memory");
            return false;
        }
    }
    return true;
}

/* A granularity: integer, power of two in [512, max]. */
static bool get_granularity(struct json_object *obj, const char *where,
                            uint64_t max, uint32_t *ret, Error **errp)
{
    struct json_object *v;
    if (!get_field(obj, where, "granularity", json_type_int, true, &v, errp)) {
        return false;
    }
    int64_t g = json_object_get_int64(v);
    if (g <= 0 || qbm_granularity_shift((uint64_t)g) < 0) {
        error_setg(errp, "%s: granularity %lld is not a power of two between "
                   "512 and 2147483648", where, (long long)g);
        return false;
    }
    if ((uint64_t)g > max) {
        error_setg(errp, "%s: granularity %lld is larger than %llu", where,
                   (long long)g, (unsigned long long)max);
        return false;
    }
    *ret = (uint32_t)g;
    return true;
}

static bool check_simple_name(const char *where, const char *name, Error **errp)
{
    if (!path_is_simple_name(name)) {
        error_setg(errp, "%s: file name '%s' is not a plain name in the "
                   "descriptor's folder ('/' and '..' are not allowed)",
                   where, name);
        return false;
    }
    return true;
}

static bool parse_bitmap_entry(struct json_object *o, size_t idx, const char *display,
                               QbmBitmapEntry *e, Error **errp)
{
    char where[64];
    snprintf(where, sizeof(where), "bitmaps[%zu]", idx);
    if (!json_object_is_type(o, json_type_object)) {
        error_setg(errp, "%s: must be an object", where);
        return false;
    }
    if (!get_string(o, where, "name", true, &e->name, errp) ||
        !get_string(o, where, "file", true, &e->file, errp)) {
        return false;
    }
    if (strlen(e->name) > BDRV_BITMAP_MAX_NAME) {
        error_setg(errp, "%s: name is longer than %d bytes", where,
                   BDRV_BITMAP_MAX_NAME);
        return false;
    }
    char where2[BDRV_BITMAP_MAX_NAME + 16];
    snprintf(where2, sizeof(where2), "bitmap '%s'", e->name);
    if (!check_simple_name(where2, e->file, errp) ||
        !get_granularity(o, where2, UINT64_C(1) << HBITMAP_MAX_GRANULARITY_SHIFT,
                         &e->granularity, errp)) {
        return false;
    }
    struct json_object *v;
    if (!get_field(o, where2, "recording", json_type_boolean, false, &v, errp)) {
        return false;
    }
    e->recording = v ? json_object_get_boolean(v) : true;
    return true;
}

static bool descriptor_parse_obj(struct json_object *root, QbmDescriptor *d,
                                 Error **errp)
{
    struct json_object *q, *v;
    if (!json_object_is_type(root, json_type_object) ||
        !json_object_object_get_ex(root, "QBM", &q) ||
        !json_object_is_type(q, json_type_object)) {
        error_setg(errp, "not a QBM descriptor (no \"QBM\" object)");
        return false;
    }
    if (!get_field(q, "QBM", "version", json_type_int, true, &v, errp)) {
        return false;
    }
    int64_t ver = json_object_get_int64(v);
    if (ver != QBM_VERSION) {
        error_setg(errp, "unsupported QBM version %lld (this program reads "
                   "version %d)", (long long)ver, QBM_VERSION);
        return false;
    }
    if (!get_field(q, "QBM", "size", json_type_int, true, &v, errp)) {
        return false;
    }
    int64_t size = json_object_get_int64(v);
    if (size < 0 || (uint64_t)size > BDRV_MAX_LENGTH) {
        error_setg(errp, "QBM: size %lld is out of range (0..%llu)",
                   (long long)size, (unsigned long long)BDRV_MAX_LENGTH);
        return false;
    }
    d->size = (uint64_t)size;

    if (!get_field(q, "QBM", "data", json_type_object, true, &v, errp) ||
        !get_string(v, "data", "file", true, &d->data_file, errp) ||
        !get_string(v, "data", "format", false, &d->data_format, errp)) {
        return false;
    }
    if (!d->data_format && !(d->data_format = strdup("raw"))) {
        error_setg(errp, "out of memory");
        return false;
    }
    if (strcmp(d->data_format, "qbm") == 0) {
        error_setg(errp, "data: format 'qbm' cannot be nested");
        return false;
    }
    if (!get_field(q, "QBM", "backing", json_type_object, false, &v, errp)) {
        return false;
    }
    if (v && (!get_string(v, "backing", "file", true, &d->backing_file, errp) ||
              !get_string(v, "backing", "format", false, &d->backing_format, errp))) {
        return false;
    }
    if (!get_field(q, "QBM", "allocation", json_type_object, false, &v, errp)) {
        return false;
    }
    if (v) {
        if (!get_string(v, "allocation", "file", true, &d->alloc_file, errp) ||
            !check_simple_name("allocation", d->alloc_file, errp) ||
            !get_granularity(v, "allocation", QBM_MAX_ALLOC_GRANULARITY,
                             &d->alloc_granularity, errp)) {
            return false;
        }
    } else if (d->backing_file) {
        error_setg(errp, "QBM: a backing image needs an 'allocation' bitmap");
        return false;
    }

    if (!get_field(q, "QBM", "bitmaps", json_type_array, false, &v, errp)) {
        return false;
    }
    size_t n = v ? json_object_array_length(v) : 0;
    if (n > QBM_MAX_BITMAPS) {
        error_setg(errp, "QBM: %zu bitmaps, at most %d are allowed", n,
                   QBM_MAX_BITMAPS);
        return false;
    }
    if (n) {
        d->bitmaps = calloc(n, sizeof(*d->bitmaps));
        if (!d->bitmaps) {
            error_setg(errp, "out of memory");
            return false;
        }
    }
    for (size_t i = 0; i < n; i++) {
        QbmBitmapEntry *e = &d->bitmaps[i];
        d->nb_bitmaps = i + 1;
        if (!parse_bitmap_entry(json_object_array_get_idx(v, i), i, NULL, e, errp)) {
            return false;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(d->bitmaps[j].name, e->name) == 0) {
                error_setg(errp, "QBM: duplicate bitmap name '%s'", e->name);
                return false;
            }
            if (strcmp(d->bitmaps[j].file, e->file) == 0) {
                error_setg(errp, "QBM: bitmaps '%s' and '%s' share the file '%s'",
                           d->bitmaps[j].name, e->name, e->file);
                return false;
            }
        }
        if (d->alloc_file && strcmp(d->alloc_file, e->file) == 0) {
            error_setg(errp, "QBM: bitmap '%s' uses the allocation file '%s'",
                       e->name, e->file);
            return false;
        }
    }
    return true;
}

bool qbm_descriptor_parse(const char *text, size_t len, const char *display,
                          QbmDescriptor *d, Error **errp)
{
    memset(d, 0, sizeof(*d));
    if (len > QBM_MAX_DESCRIPTOR_SIZE) {
        error_setg(errp, "QBM descriptor '%s' is too large (%zu bytes, limit %d)",
                   display, len, QBM_MAX_DESCRIPTOR_SIZE);
        return false;
    }
    if (memchr(text, '\0', len)) {
        error_setg(errp, "malformed JSON in QBM descriptor '%s': NUL byte",
                   display);
        return false;
    }
    struct json_tokener *tok = json_tokener_new_ex(QBM_MAX_DESCRIPTOR_DEPTH);
    if (!tok) {
        error_setg(errp, "out of memory");
        return false;
    }
    _cleanup_json_ struct json_object *root =
        json_tokener_parse_ex(tok, text, (int)len);
    enum json_tokener_error jerr = json_tokener_get_error(tok);
    size_t used = tok->char_offset;
    json_tokener_free(tok);
    if (!root || jerr != json_tokener_success) {
        error_setg(errp, "malformed JSON in QBM descriptor '%s' near byte %zu: %s",
                   display, used,
                   jerr == json_tokener_continue ? "unexpected end of file"
                                                 : json_tokener_error_desc(jerr));
        return false;
    }
    for (size_t i = used; i < len; i++) {
        if (!strchr(" \t\r\n", text[i])) {
            error_setg(errp, "malformed JSON in QBM descriptor '%s': trailing "
                       "data at byte %zu", display, i);
            return false;
        }
    }
    Error *err = NULL;
    if (!descriptor_parse_obj(root, d, &err)) {
        error_prepend(&err, "invalid QBM descriptor '%s': ", display);
        error_propagate(errp, err);
        qbm_descriptor_clear(d);
        return false;
    }
    return true;
}

bool qbm_descriptor_read(const char *path, QbmDescriptor *d, Error **errp)
{
    memset(d, 0, sizeof(*d));
    /* The user's file: a link is followed, a FIFO refused (as file.c). */
    _cleanup_close_ int fd = open_checked(path, O_RDONLY, 0, OPEN_BLOCKDEV, errp);
    if (fd < 0) {
        error_prepend(errp, "cannot open QBM descriptor: ");
        return false;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        error_setg_errno(errp, errno, "cannot stat '%s'", path);
        return false;
    }
    if (st.st_size > QBM_MAX_DESCRIPTOR_SIZE) {
        error_setg(errp, "QBM descriptor '%s' is too large (%lld bytes, limit %d)",
                   path, (long long)st.st_size, QBM_MAX_DESCRIPTOR_SIZE);
        return false;
    }
    size_t len = (size_t)st.st_size;
    _cleanup_free_ char *text = malloc(len + 1);
    if (!text) {
        error_setg(errp, "out of memory");
        return false;
    }
    int r = pread_full(fd, text, len, 0);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot read QBM descriptor '%s'", path);
        return false;
    }
    text[len] = '\0';
    return qbm_descriptor_parse(text, len, path, d, errp);
}

char *qbm_descriptor_to_json(const QbmDescriptor *d)
{
    struct json_object *root = json_object_new_object();
    struct json_object *q = json_object_new_object();
    json_object_object_add(root, "QBM", q);
    json_object_object_add(q, "version", json_object_new_int(QBM_VERSION));
    json_object_object_add(q, "size", json_object_new_int64((int64_t)d->size));
    struct json_object *data = json_object_new_object();
    json_object_object_add(data, "file", json_object_new_string(d->data_file));
    json_object_object_add(data, "format", json_object_new_string(d->data_format));
    json_object_object_add(q, "data", data);
    if (d->backing_file) {
        struct json_object *b = json_object_new_object();
        json_object_object_add(b, "file", json_object_new_string(d->backing_file));
        if (d->backing_format) {
            json_object_object_add(b, "format",
                                   json_object_new_string(d->backing_format));
        }
        json_object_object_add(q, "backing", b);
    }
    if (d->alloc_file) {
        struct json_object *a = json_object_new_object();
        json_object_object_add(a, "file", json_object_new_string(d->alloc_file));
        json_object_object_add(a, "granularity",
                               json_object_new_int64(d->alloc_granularity));
        json_object_object_add(q, "allocation", a);
    }
    struct json_object *arr = json_object_new_array();
    for (size_t i = 0; i < d->nb_bitmaps; i++) {
        const QbmBitmapEntry *e = &d->bitmaps[i];
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "name", json_object_new_string(e->name));
        json_object_object_add(o, "file", json_object_new_string(e->file));
        json_object_object_add(o, "granularity",
                               json_object_new_int64(e->granularity));
        json_object_object_add(o, "recording", json_object_new_boolean(e->recording));
        json_object_array_add(arr, o);
    }
    json_object_object_add(q, "bitmaps", arr);
    const char *s = json_object_to_json_string_ext(
        root, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
              JSON_C_TO_STRING_NOSLASHESCAPE);
    char *out = NULL;
    if (s && asprintf(&out, "%s\n", s) < 0) {
        out = NULL;
    }
    json_object_put(root);
    return out;
}

static bool descriptor_lock_new(int fd, const char *tmp_path, void *opaque,
                                Error **errp)
{
    return file_lock_fd(fd, tmp_path, *(const int *)opaque, errp);
}

bool qbm_descriptor_write(const char *path, const QbmDescriptor *d,
                          int lock_flags, int *ret_lock_fd, Error **errp)
{
    _cleanup_free_ char *text = qbm_descriptor_to_json(d);
    if (!text) {
        error_setg(errp, "out of memory");
        return false;
    }
    return file_replace_atomic_full(path, text, strlen(text),
                                    ret_lock_fd ? descriptor_lock_new : NULL,
                                    &lock_flags, ret_lock_fd, errp);
}

int qbm_descriptor_probe(const uint8_t *buf, size_t len)
{
    size_t i = 0;
    while (i < len && strchr(" \t\r\n", buf[i]) && buf[i]) {
        i++;
    }
    if (i >= len || buf[i] != '{') {
        return 0;
    }
    i++;
    while (i < len && strchr(" \t\r\n", buf[i]) && buf[i]) {
        i++;
    }
    static const char marker[] = "\"QBM\"";
    if (len - i >= sizeof(marker) - 1 && memcmp(buf + i, marker, sizeof(marker) - 1) == 0) {
        return 100;
    }
    return 0;
}
