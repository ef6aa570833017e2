/*
 * libFuzzer target: the binary index reader of a backup (src/repo/index.c,
 * docs/specs/repository.md "Index").  The input is the index file.  The
 * backup it must belong to (seq, image size, hash block size) is taken
 * from the input's own header when it has the magic, so the fuzzer can
 * reach the records; the record count is what the input's size implies
 * (the manifest's "index-records" in real use), or one more when its low
 * bit says so.  The file is read through the repository's storage from a
 * memfd.  Every record the reader accepts must re-encode to exactly its
 * bytes, and must follow the one before (ascending, no overlap, zero runs
 * merged, inside the image); the streaming Merkle root of an accepted
 * file is computed as verify does.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "repo/repo.h"
#include "repo/repo-internal.h"
#include "util/bswap.h"
#include "util/cleanup.h"
#include "util/cutils.h"
#include "util/error.h"
#include "fuzz-util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned seq = 1;
    uint64_t image_size = 1ull << 30;
    uint32_t hash_size = REPO_MIN_HASH_SIZE;

    if (size >= REPO_INDEX_HEADER && !memcmp(data, "BBKINDEX", 8)) {
        uint32_t h = ld_le32(data + 12);
        seq = ld_le32(data + 24);
        image_size = ld_le64(data + 16) % (UINT64_C(1) << 62);
        if (IS_POW2(h) && h >= REPO_MIN_HASH_SIZE && h <= REPO_MAX_HASH_SIZE) {
            hash_size = h;
        }
    }
    uint64_t n_records = size >= REPO_INDEX_HEADER
        ? (size - REPO_INDEX_HEADER) / REPO_INDEX_RECORD : 0;
    if (size & 1) {
        n_records++;                /* a count the file does not hold */
    }

    int fd = memfd_create("fuzz-index", MFD_CLOEXEC);
    if (fd < 0 || pwrite_full(fd, data, size, 0) < 0) {
        abort();
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);

    Error *err = NULL;
    RepoIndexReader *r = repo_index_open_file(&repo_storage_local, path, seq,
                                              image_size, hash_size,
                                              n_records, &err);
    if (!r) {
        error_free(err);
        close(fd);
        return 0;
    }
    uint64_t n_blocks = DIV_ROUND_UP(image_size, hash_size);
    RepoIndexRecord rec, prev = { 0 };
    RepoMerkle mk;
    uint64_t i = 0;
    int got;
    uint8_t enc[REPO_INDEX_RECORD];

    repo_merkle_init(&mk);
    while ((got = repo_index_next(r, &rec, &err)) > 0) {
        repo_index_record_encode(&rec, enc);
        if (memcmp(enc, data + REPO_INDEX_HEADER + i * REPO_INDEX_RECORD,
                   sizeof(enc))) {
            fprintf(stderr, "record %llu does not re-encode to its bytes\n",
                    (unsigned long long)i);
            abort();
        }
        if (rec.count < 1 || rec.block >= n_blocks ||
            rec.count > n_blocks - rec.block ||
            (i && rec.block < prev.block + prev.count) ||
            (i && rec.zero && prev.zero &&
             rec.block == prev.block + prev.count)) {
            fprintf(stderr, "record %llu accepted out of order or bounds\n",
                    (unsigned long long)i);
            abort();
        }
        repo_merkle_add_record(&mk, &rec);
        prev = rec;
        i++;
    }
    if (got == 0 && i != n_records) {
        fprintf(stderr, "the reader ended after %llu of %llu records\n",
                (unsigned long long)i, (unsigned long long)n_records);
        abort();
    }
    uint8_t root[REPO_ROOT_LEN];
    repo_merkle_final(&mk, root);
    error_free(err);
    repo_index_close(r);
    close(fd);
    return 0;
}
