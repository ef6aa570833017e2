/*
 * The binary index of a backup (docs/specs/repository.md, "Index"): one
 * 24-byte record per hashed block or per run of zero blocks, sorted, after
 * a 64-byte header, in NODE/ID-ROOT.idx where ROOT is the first 16 hex
 * digits of the backup's Merkle root.  The streaming Merkle root, the
 * writer (scan of a backup, prune) and the reader (verify, pending
 * manifests), which also presents a version-1 manifest's inline hash list
 * as records, so every consumer reads one way.
 *
 * Memory is bounded whatever the index's size: the writer and the reader
 * each hold one buffer of INDEX_BUF bytes, the Merkle state one node per
 * tree level (at most 64).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "repo/repo-internal.h"
#include "util/bswap.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define INDEX_MAGIC        "BBKINDEX"
#define INDEX_VERSION      1
#define INDEX_BUF          (64u * 1024 / REPO_INDEX_RECORD * REPO_INDEX_RECORD)
#define INDEX_ZERO_FLAG    (UINT64_C(1) << 63)

/* ---- records ---- */

void repo_index_record_encode(const RepoIndexRecord *r,
                              uint8_t out[REPO_INDEX_RECORD])
{
    if (r->zero) {
        st_le64(out, r->block | INDEX_ZERO_FLAG);
        st_le64(out + 8, r->count);
        st_le64(out + 16, 0);
    } else {
        st_le64(out, r->block);
        memcpy(out + 8, r->hash, REPO_HASH_LEN);
    }
}

/* Decode one record and check it on its own (invariant I4): inside the
 * image's n_blocks, a zero run of at least one block, reserved bytes 0. */
static bool record_decode(const uint8_t in[REPO_INDEX_RECORD],
                          uint64_t n_blocks, RepoIndexRecord *r)
{
    uint64_t key = ld_le64(in);

    memset(r, 0, sizeof(*r));
    r->zero = key & INDEX_ZERO_FLAG;
    r->block = key & ~INDEX_ZERO_FLAG;
    if (r->zero) {
        r->count = ld_le64(in + 8);
        return ld_le64(in + 16) == 0 && r->count >= 1 &&
               r->block < n_blocks && r->count <= n_blocks - r->block;
    }
    r->count = 1;
    memcpy(r->hash, in + 8, REPO_HASH_LEN);
    return r->block < n_blocks;
}

/* Order (invariant I3): records ascend without overlap, and a zero run
 * never starts where the previous zero run ends (runs are merged). */
static bool record_follows(const RepoIndexRecord *prev, bool have_prev,
                           const RepoIndexRecord *r)
{
    if (!have_prev) {
        return true;
    }
    uint64_t end = prev->block + prev->count;
    return r->block > end || (r->block == end && !(r->zero && prev->zero));
}

/* ---- the Merkle root, streaming ---- */

void repo_merkle_init(RepoMerkle *mk)
{
    memset(mk, 0, sizeof(*mk));
}

void repo_merkle_add_leaf(RepoMerkle *mk, const uint8_t *data, size_t len)
{
    uint8_t node[REPO_ROOT_LEN];
    uint8_t pair[2 * REPO_ROOT_LEN];

    SHA256(data, len, node);
    /* A binary counter: level l holds a full subtree of 2^l leaves. */
    for (unsigned l = 0; l < REPO_MERKLE_LEVELS; l++) {
        if (!(mk->present & (UINT64_C(1) << l))) {
            memcpy(mk->level[l], node, REPO_ROOT_LEN);
            mk->present |= UINT64_C(1) << l;
            mk->n_leaves++;
            return;
        }
        memcpy(pair, mk->level[l], REPO_ROOT_LEN);
        memcpy(pair + REPO_ROOT_LEN, node, REPO_ROOT_LEN);
        SHA256(pair, sizeof(pair), node);
        mk->present &= ~(UINT64_C(1) << l);
    }
    abort();                  /* 2^64 leaves: cannot happen */
}

void repo_merkle_add_record(RepoMerkle *mk, const RepoIndexRecord *r)
{
    uint8_t rec[REPO_INDEX_RECORD];

    repo_index_record_encode(r, rec);
    repo_merkle_add_leaf(mk, rec, sizeof(rec));
}

void repo_merkle_final(const RepoMerkle *mk, uint8_t out[REPO_ROOT_LEN])
{
    uint8_t acc[REPO_ROOT_LEN];
    uint8_t pair[2 * REPO_ROOT_LEN];
    bool have = false;

    if (!mk->present) {
        SHA256((const unsigned char *)"", 0, out);
        return;
    }
    /* Level by level, an odd last node moves up unchanged: the partial
     * subtrees, smallest first, each join the bigger one to their left. */
    for (unsigned l = 0; l < REPO_MERKLE_LEVELS; l++) {
        if (!(mk->present & (UINT64_C(1) << l))) {
            continue;
        }
        if (!have) {
            memcpy(acc, mk->level[l], REPO_ROOT_LEN);
            have = true;
            continue;
        }
        memcpy(pair, mk->level[l], REPO_ROOT_LEN);
        memcpy(pair + REPO_ROOT_LEN, acc, REPO_ROOT_LEN);
        SHA256(pair, sizeof(pair), acc);
    }
    memcpy(out, acc, REPO_ROOT_LEN);
}

void repo_merkle_root(const RepoHash *hashes, size_t n,
                      uint8_t out[REPO_ROOT_LEN])
{
    RepoMerkle mk;

    repo_merkle_init(&mk);
    for (size_t i = 0; i < n; i++) {
        RepoIndexRecord r = { .block = hashes[i].cluster, .count = 1 };
        memcpy(r.hash, hashes[i].hash, REPO_HASH_LEN);
        repo_merkle_add_record(&mk, &r);
    }
    repo_merkle_final(&mk, out);
}

/* ---- names ---- */

char *repo_index_path(Repo *repo, const char *node, unsigned seq,
                      const uint8_t root[REPO_ROOT_LEN])
{
    char id[REPO_ID_LEN];

    repo_format_id(seq, id);
    return repo_path_printf("%s/%s/%s-%02x%02x%02x%02x%02x%02x%02x%02x.idx",
                            repo->path, node, id, root[0], root[1], root[2],
                            root[3], root[4], root[5], root[6], root[7]);
}

/* ---- the writer ---- */

struct RepoIndexWriter {
    Repo *repo;
    char *node;
    unsigned seq;
    uint64_t n_blocks;
    RepoFile *f;
    char *tmp_path;
    uint8_t buf[INDEX_BUF];
    size_t used;
    RepoMerkle mk;
    RepoIndexRecord prev;
    bool have_prev;
    uint64_t n_records;
    int err;                     /* the first append error */
};

static void index_header(uint8_t out[REPO_INDEX_HEADER], unsigned seq,
                         uint64_t image_size, uint32_t hash_size)
{
    memset(out, 0, REPO_INDEX_HEADER);
    memcpy(out, INDEX_MAGIC, 8);
    st_le32(out + 8, INDEX_VERSION);
    st_le32(out + 12, hash_size);
    st_le64(out + 16, image_size);
    st_le32(out + 24, seq);
}

RepoIndexWriter *repo_index_writer_new(Repo *repo, const char *node,
                                       unsigned seq, uint64_t image_size,
                                       uint32_t hash_size, Error **errp)
{
    RepoIndexWriter *w = calloc(1, sizeof(*w));
    uint8_t hdr[REPO_INDEX_HEADER];

    if (!w) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    w->repo = repo;
    w->node = strdup(node);
    w->seq = seq;
    w->n_blocks = DIV_ROUND_UP(image_size, hash_size);
    w->tmp_path = repo_tmp_index_path(repo, node, seq);
    repo_merkle_init(&w->mk);
    if (!w->node) {
        error_setg(errp, "out of memory");
        repo_index_writer_abort(w);
        return NULL;
    }
    w->f = repo->storage->create(w->tmp_path, errp);
    if (!w->f) {
        repo_index_writer_abort(w);
        return NULL;
    }
    index_header(hdr, seq, image_size, hash_size);
    int r = repo->storage->append(w->f, hdr, sizeof(hdr));
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot write '%s'", w->tmp_path);
        repo_index_writer_abort(w);
        return NULL;
    }
    return w;
}

static void writer_flush(RepoIndexWriter *w)
{
    if (w->used && !w->err) {
        w->err = w->repo->storage->append(w->f, w->buf, w->used);
    }
    w->used = 0;
}

void repo_index_writer_add(RepoIndexWriter *w, const RepoIndexRecord *r)
{
    /* The scan produces records in order; anything else is a bug. */
    if (!record_follows(&w->prev, w->have_prev, r) || r->block >= w->n_blocks ||
        (r->zero && (r->count < 1 || r->count > w->n_blocks - r->block))) {
        abort();
    }
    repo_index_record_encode(r, w->buf + w->used);
    repo_merkle_add_leaf(&w->mk, w->buf + w->used, REPO_INDEX_RECORD);
    w->used += REPO_INDEX_RECORD;
    w->n_records++;
    w->prev = *r;
    w->have_prev = true;
    if (w->used == sizeof(w->buf)) {
        writer_flush(w);
    }
}

bool repo_index_writer_finish(RepoIndexWriter *w, uint8_t root[REPO_ROOT_LEN],
                              uint64_t *ret_records, Error **errp)
{
    const RepoStorage *st = w->repo->storage;
    bool ok = false;

    writer_flush(w);
    repo_merkle_final(&w->mk, root);
    if (w->err) {
        error_setg_errno(errp, -w->err, "cannot write '%s'", w->tmp_path);
        goto out;
    }
    ok = st->finish(steal_pointer(&w->f), errp);
    if (ok) {
        _cleanup_free_ char *path = repo_index_path(w->repo, w->node, w->seq,
                                                    root);
        _cleanup_free_ char *dir = repo_node_dir(w->repo, w->node);
        int r = st->rename(w->tmp_path, path);

        if (r < 0) {
            error_setg_errno(errp, -r, "cannot rename '%s' to '%s'",
                             w->tmp_path, path);
            st->remove(w->tmp_path);
            ok = false;
        } else {
            ok = st->sync_dir(dir, errp);
        }
    }
    *ret_records = w->n_records;
out:
    repo_index_writer_abort(w);
    return ok;
}

void repo_index_writer_abort(RepoIndexWriter *w)
{
    if (!w) {
        return;
    }
    if (w->f) {
        w->repo->storage->close(w->f);     /* removes the temporary file */
    }
    free(w->tmp_path);
    free(w->node);
    free(w);
}

/* ---- the reader ---- */

struct RepoIndexReader {
    const RepoStorage *st;
    RepoFile *f;
    char *path;
    const RepoHash *v1;          /* a version-1 manifest's list, or NULL */
    uint64_t n_blocks;
    uint64_t n_records, next;    /* records in all, the next one to read */
    uint8_t buf[INDEX_BUF];
    size_t buf_used, buf_pos;
    RepoIndexRecord prev;
    bool have_prev;
};

RepoIndexReader *repo_index_open_file(const RepoStorage *st, const char *path,
                                      unsigned seq, uint64_t image_size,
                                      uint32_t hash_size, uint64_t n_records,
                                      Error **errp)
{
    _cleanup_free_ RepoIndexReader *r = calloc(1, sizeof(*r));
    uint8_t hdr[REPO_INDEX_HEADER], want[REPO_INDEX_HEADER];
    uint64_t size = 0;

    if (!r || !(r->path = strdup(path))) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    r->st = st;
    r->n_blocks = DIV_ROUND_UP(image_size, hash_size);
    r->n_records = n_records;
    r->f = st->open(path, &size, errp);
    if (!r->f) {
        free(r->path);
        return NULL;
    }
    /* I1, I2: exactly the size the manifest's count says, and the header
     * of this backup (before any record is read). */
    if (n_records > r->n_blocks ||
        size != REPO_INDEX_HEADER + n_records * REPO_INDEX_RECORD) {
        error_setg(errp, "%s: the index is %" PRIu64 " bytes, the manifest "
                   "lists %" PRIu64 " records", path, size, n_records);
        goto fail;
    }
    int e = st->pread(r->f, hdr, sizeof(hdr), 0);
    if (e < 0) {
        error_setg_errno(errp, -e, "cannot read '%s'", path);
        goto fail;
    }
    index_header(want, seq, image_size, hash_size);
    if (memcmp(hdr, want, sizeof(hdr))) {
        error_setg(errp, "%s: the index header is not the one of backup %06u "
                   "(%" PRIu64 " bytes, %" PRIu32 "-byte blocks)", path, seq,
                   image_size, hash_size);
        goto fail;
    }
    return steal_pointer(&r);

fail:
    st->close(r->f);
    free(r->path);
    return NULL;
}

RepoIndexReader *repo_index_open(Repo *repo, const RepoManifest *m,
                                 Error **errp)
{
    if (m->version < 2) {
        RepoIndexReader *r = calloc(1, sizeof(*r));
        if (!r) {
            error_setg(errp, "out of memory");
            return NULL;
        }
        r->v1 = m->hashes;
        r->n_records = m->n_hashes;
        r->n_blocks = DIV_ROUND_UP(m->image_size, m->cluster_size);
        return r;
    }
    _cleanup_free_ char *path = repo_index_path(repo, m->node, m->seq,
                                                m->merkle_root);
    return repo_index_open_file(repo->storage, path, m->seq, m->image_size,
                                m->cluster_size, m->index_records, errp);
}

int repo_index_next(RepoIndexReader *r, RepoIndexRecord *rec, Error **errp)
{
    if (r->next == r->n_records) {
        return 0;
    }
    if (r->v1) {
        const RepoHash *h = &r->v1[r->next++];
        memset(rec, 0, sizeof(*rec));
        rec->block = h->cluster;
        rec->count = 1;
        memcpy(rec->hash, h->hash, REPO_HASH_LEN);
        return 1;                /* validated when the manifest was parsed */
    }
    if (r->buf_pos == r->buf_used) {
        uint64_t left = (r->n_records - r->next) * REPO_INDEX_RECORD;
        size_t len = (size_t)MIN(left, (uint64_t)sizeof(r->buf));
        int e = r->st->pread(r->f, r->buf, len,
                             REPO_INDEX_HEADER + r->next * REPO_INDEX_RECORD);
        if (e < 0) {
            error_setg_errno(errp, -e, "cannot read '%s'", r->path);
            return -1;
        }
        r->buf_used = len;
        r->buf_pos = 0;
    }
    if (!record_decode(r->buf + r->buf_pos, r->n_blocks, rec)) {
        error_setg(errp, "%s: record %" PRIu64 " is malformed or outside the "
                   "image", r->path, r->next);
        return -1;
    }
    if (!record_follows(&r->prev, r->have_prev, rec)) {
        error_setg(errp, "%s: record %" PRIu64 " is out of order or overlaps "
                   "the one before", r->path, r->next);
        return -1;
    }
    r->buf_pos += REPO_INDEX_RECORD;
    r->next++;
    r->prev = *rec;
    r->have_prev = true;
    return 1;
}

void repo_index_close(RepoIndexReader *r)
{
    if (!r) {
        return;
    }
    if (r->f) {
        r->st->close(r->f);
    }
    free(r->path);
    free(r);
}

bool repo_index_root(Repo *repo, const RepoManifest *m,
                     uint8_t root[REPO_ROOT_LEN], Error **errp)
{
    RepoIndexReader *r = repo_index_open(repo, m, errp);
    RepoIndexRecord rec;
    RepoMerkle mk;
    int got;

    if (!r) {
        return false;
    }
    repo_merkle_init(&mk);
    while ((got = repo_index_next(r, &rec, errp)) > 0) {
        repo_merkle_add_record(&mk, &rec);
    }
    repo_index_close(r);
    repo_merkle_final(&mk, root);
    return got == 0;
}
