/*
 * QBM on-disk structures: the JSON descriptor and the bitmap file header
 * (docs/specs/qbm.md is the authority; section numbers below refer to it).
 * This module knows the bytes; qbm.c knows the block layer.
 */
#ifndef BITBACK_QBM_FORMAT_H
#define BITBACK_QBM_FORMAT_H

#include <stdbool.h>
#include <stdint.h>

#include "bitmap/hbitmap.h"
#include "util/cutils.h"
#include "util/error.h"
#include "block/wil-store.h"

#define QBM_VERSION             1
#define QBM_BITMAP_MAGIC        "QBMBITS\n"      /* 8 bytes */
#define QBM_HEADER_SIZE         4096u
#define QBM_FLAG_CLEAN          0x1u
#define QBM_KNOWN_FLAGS         QBM_FLAG_CLEAN
#define QBM_MAX_DESCRIPTOR_SIZE (1024 * 1024)
#define QBM_MAX_BITMAPS         65535
#define QBM_MAX_DESCRIPTOR_DEPTH 16     /* JSON nesting; a valid one needs 4 */
/* Bytes of bits in one bitmap file: 1 GiB covers 512 TiB at 64 KiB. */
#define QBM_MAX_BITMAP_DATA     (UINT64_C(1) << 30)
/* Allocation clusters are copied whole on copy-on-write: at most one
 * block-layer request. */
#define QBM_MAX_ALLOC_GRANULARITY (64u * 1024 * 1024)

/* Header fields (section 2), host byte order in memory. */
typedef struct QbmHeader {
    uint32_t version;
    uint32_t header_size;
    uint32_t flags;
    uint32_t granularity_shift;
    uint64_t image_size;
    uint64_t data_size;
    uint64_t checksum;
    char generation[UUID_STR_LEN];
} QbmHeader;

/* One entry of the descriptor's "bitmaps" array, plus run-time state that
 * qbm.c keeps next to it (not serialized). */
typedef struct QbmBitmapEntry {
    char *name;
    char *file;
    uint32_t granularity;
    bool recording;
    /* run time */
    bool inconsistent;      /* loaded inconsistent: never rewritten */
    QbmHeader hdr;          /* last header written or read */
} QbmBitmapEntry;

typedef struct QbmDescriptor {
    uint64_t size;
    char *data_file;
    char *data_format;              /* never NULL after parse ("raw") */
    char *backing_file;             /* NULL: none */
    char *backing_format;           /* NULL: probe */
    char *alloc_file;               /* NULL: none */
    uint32_t alloc_granularity;
    QbmBitmapEntry *bitmaps;
    size_t nb_bitmaps;
} QbmDescriptor;

/* Serialized size of the bits of an image_size-byte image: ceil(clusters/8). */
uint64_t qbm_data_size(uint64_t image_size, unsigned granularity_shift);
/* log2 of a granularity that is a power of two in [512, 2^31], else -1. */
int qbm_granularity_shift(uint64_t granularity);

void qbm_header_encode(const QbmHeader *h, uint8_t buf[QBM_HEADER_SIZE]);

/* Outcome of reading a bitmap file. */
typedef enum QbmLoadResult {
    QBM_LOAD_OK,          /* structurally valid, CLEAN, checksum matches */
    QBM_LOAD_NOT_CLEAN,   /* structurally valid, CLEAN not set (bits read) */
    QBM_LOAD_BAD,         /* unusable: *ret_reason says why */
} QbmLoadResult;

/* Read and validate the bitmap file at `path` (shown as `display`) against
 * the expected image size and granularity.  If hb is not NULL the bits are
 * loaded into it (hb must cover image_size at that granularity).  Fills
 * *ret_hdr when the header could be parsed.  On QBM_LOAD_BAD, *ret_reason
 * is a malloc'd sentence naming the problem (caller frees). */
QbmLoadResult qbm_bitmap_file_load(const char *path, const char *display,
                                   uint64_t image_size, unsigned shift,
                                   HBitmap *hb, QbmHeader *ret_hdr,
                                   char **ret_reason);
/* The same on a file the caller opened: fd is read with pread from offset
 * 0 and its length taken from fstat, so it must be a regular file or a
 * memfd (the caller's open is where links and FIFOs are refused: the
 * path-opening loader above does it with O_NOFOLLOW).  fd stays open.
 * For qbm_bitmap_file_load, and for harnesses and tests that load from a
 * memfd. */
QbmLoadResult qbm_bitmap_fd_load(int fd, const char *display,
                                 uint64_t image_size, unsigned shift,
                                 HBitmap *hb, QbmHeader *ret_hdr,
                                 char **ret_reason);

/* The same on any positioned-I/O store (wil-store.h): a file, or a RADOS
 * object (rbd-bitmaps.c).  Its size is get_size's (a missing object:
 * "missing"); the header is checked against it before anything sized by
 * the header is read.  This is the one loader: the two above call it. */
QbmLoadResult qbm_bitmap_store_load(WilStore *st, const char *display,
                                    uint64_t image_size, unsigned shift,
                                    HBitmap *hb, QbmHeader *ret_hdr,
                                    char **ret_reason);

/* Is a bitmap of image_size bytes at 2^shift small enough: its bits at
 * most QBM_MAX_BITMAP_DATA, and header plus bits at most max_len (the
 * container's own limit, UINT64_MAX for none)?  False with errp set
 * (naming the remedy, a larger granularity) otherwise. */
bool qbm_bitmap_check_size(uint64_t image_size, unsigned shift,
                           uint64_t max_len, Error **errp);

/* Make st an empty bitmap (all bits clear): cut it to nothing, size it,
 * write the header with `flags` and the zero bits' checksum, and sync.
 * 0, or -errno with errp set (-EFBIG: too large). */
int qbm_bitmap_store_init(WilStore *st, const char *display,
                          uint64_t image_size, unsigned shift,
                          const char *generation, uint32_t flags,
                          QbmHeader *ret_hdr, Error **errp);

/* The existing bitmap file at path (shown as display), opened as a store,
 * read-write or read-only, no link followed, a regular file only; NULL
 * with errp set on failure ("... is missing" when there is no file). */
WilStore *qbm_bitmap_file_open(const char *path, const char *display,
                               bool writable, Error **errp);

/* Rewrite only the header in st and sync. */
bool qbm_bitmap_store_write_header(WilStore *st, const char *display,
                                   const QbmHeader *h, Error **errp);

/* Create a bitmap file with all bits clear.  exclusive: fail if it exists
 * (O_EXCL, -EEXIST), else truncate an existing file.  The header gets
 * `flags` and the checksum of the zero bits.  The file and its folder are
 * synced.  Returns 0, or -errno of the step that failed with errp set; an
 * exclusive create that fails after creating the file unlinks it. */
int qbm_bitmap_file_create(const char *path, uint64_t image_size,
                           unsigned shift, const char *generation,
                           uint32_t flags, bool exclusive, QbmHeader *ret_hdr,
                           Error **errp);

/* Rewrite only the header (e.g. to clear or set CLEAN) and fdatasync. */
bool qbm_bitmap_file_write_header(const char *path, const QbmHeader *h,
                                  Error **errp);

/* Callback that serializes bytes [byte_off, byte_off+len) of the bits into
 * buf (the caller of qbm_bitmap_file_store takes its own locks). */
typedef void QbmSerializeFn(void *opaque, uint8_t *buf, uint64_t byte_off,
                            uint64_t len);

/* Store protocol of section 2: write bits and header with CLEAN clear,
 * fdatasync, then set CLEAN and fdatasync.  h supplies size, shift and
 * generation; its checksum and flags are updated. */
bool qbm_bitmap_file_store(const char *path, QbmHeader *h,
                           QbmSerializeFn *fn, void *opaque, Error **errp);

/* The store protocol of qbm_bitmap_file_store on any store: the one
 * implementation (the file version calls it). */
bool qbm_bitmap_store_save(WilStore *st, const char *display, QbmHeader *h,
                           QbmSerializeFn *fn, void *opaque, Error **errp);

/* XXH3-64 of the serialized bits produced by fn (no file I/O). */
uint64_t qbm_checksum_bits(uint64_t data_size, QbmSerializeFn *fn, void *opaque);

/* Parse descriptor text (len bytes).  Validates every field (section 1,
 * Q5 and Q6).  `display` names the file in messages. */
bool qbm_descriptor_parse(const char *text, size_t len, const char *display,
                          QbmDescriptor *d, Error **errp);
/* Read a descriptor file (at most QBM_MAX_DESCRIPTOR_SIZE bytes) and parse. */
bool qbm_descriptor_read(const char *path, QbmDescriptor *d, Error **errp);
/* The descriptor as JSON text ("QBM" first, pretty).  Caller frees. */
char *qbm_descriptor_to_json(const QbmDescriptor *d);
/* Atomically replace the descriptor at path (Q3).  With
 * ret_lock_fd (NULL: none), the new descriptor takes the lock bytes of an
 * open with BDRV_O_* lock_flags (file-lock.h) before it replaces the old
 * one, and *ret_lock_fd gets the fd that holds them (the caller closes
 * it). */
bool qbm_descriptor_write(const char *path, const QbmDescriptor *d,
                          int lock_flags, int *ret_lock_fd, Error **errp);
void qbm_descriptor_clear(QbmDescriptor *d);
void qbm_bitmap_entry_clear(QbmBitmapEntry *e);

/* Probe score for a descriptor's first bytes: 100 or 0. */
int qbm_descriptor_probe(const uint8_t *buf, size_t len);

#endif
