/*
 * Manifests (docs/specs/repository.md, "Manifest"): the JSON form, the
 * validation every reader applies (repo_manifest_from_json), the reader
 * with explicit size and nesting limits applied before json-c allocates
 * anything, and the one durable writer (repo_manifest_write) that commit
 * and prune both use.  Invariant 1 (repo-internal.h): a manifest that
 * does not validate is never written.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define MANIFEST_FORMAT    "bitback-manifest"
#define HASH_ALGORITHM     "xxh3-128"
/* The largest manifest written or read.  A manifest holds one hash entry
 * (about 50 bytes) per stored cluster, so 128 MiB is ~2.7 M clusters: about
 * 170 GiB changed per backup at the default 64 KiB clusters.  json-c needs
 * about 8 times the text while parsing, so reading one stays under ~1 GiB.
 * A bigger file is refused before it is read, and a backup whose manifest
 * would be bigger is refused before it is committed (never a backup the
 * readers refuse).  Repository format 2 (issue 18) moves hashes out of the
 * JSON to lift this. */
#define REPO_MAX_MANIFEST  (UINT64_C(128) << 20)

const char *repo_level_name(RepoLevel level)
{
    switch (level) {
    case REPO_LEVEL_FULL: return "full";
    case REPO_LEVEL_INC:  return "inc";
    case REPO_LEVEL_DIFF: return "diff";
    }
    return "?";
}

bool repo_level_parse(const char *s, RepoLevel *ret)
{
    static const RepoLevel all[] = {
        REPO_LEVEL_FULL, REPO_LEVEL_INC, REPO_LEVEL_DIFF,
    };
    for (size_t i = 0; s && i < ARRAY_SIZE(all); i++) {
        if (!strcmp(s, repo_level_name(all[i]))) {
            *ret = all[i];
            return true;
        }
    }
    return false;
}

static void hex_encode(const uint8_t *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

int repo_hex_value(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/* Exactly 2*n hex digits into out. */
static bool hex_decode(const char *s, size_t len, uint8_t *out, size_t n)
{
    if (len != 2 * n) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        int hi = repo_hex_value(s[2 * i]), lo = repo_hex_value(s[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            return false;
        }
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return true;
}

/* ---- Manifests: JSON ---- */

void repo_manifest_free(RepoManifest *m)
{
    if (!m) {
        return;
    }
    free(m->node);
    free(m->time);
    free(m->bitmap);
    free(m->generation);
    for (size_t i = 0; i < m->n_bitmap_counts; i++) {
        free(m->bitmap_counts[i].name);
    }
    free(m->bitmap_counts);
    free(m->extents);
    free(m->hashes);
    free(m);
}

static void repo_manifest_freep(RepoManifest **p)
{
    repo_manifest_free(*p);
}

static struct json_object *json_id_or_null(unsigned seq)
{
    char id[REPO_ID_LEN];
    if (!seq) {
        return NULL;
    }
    repo_format_id(seq, id);
    return json_object_new_string(id);
}

static struct json_object *json_str_or_null(const char *s)
{
    return s ? json_object_new_string(s) : NULL;
}

struct json_object *repo_manifest_to_json(const RepoManifest *m, bool full)
{
    struct json_object *o = json_object_new_object();
    char hex[2 * REPO_ROOT_LEN + 1];
    char id[REPO_ID_LEN];

    repo_format_id(m->seq, id);
    if (full) {
        json_object_object_add(o, "format", json_object_new_string(MANIFEST_FORMAT));
        json_object_object_add(o, "version", json_object_new_int(2));
    }
    json_object_object_add(o, "id", json_object_new_string(id));
    json_object_object_add(o, "node", json_str_or_null(m->node));
    json_object_object_add(o, "level",
                           json_object_new_string(repo_level_name(m->level)));
    json_object_object_add(o, "time", json_str_or_null(m->time));
    json_object_object_add(o, "parent", json_id_or_null(m->parent_seq));
    json_object_object_add(o, "synthetic", json_object_new_boolean(m->synthetic));
    if (full) {
        json_object_object_add(o, "image-size",
                               json_object_new_int64((int64_t)m->image_size));
        json_object_object_add(o, "granularity",
                               json_object_new_int64(m->granularity));
        json_object_object_add(o, "hash-size",
                               json_object_new_int64(m->cluster_size));
        json_object_object_add(o, "bitmap", json_str_or_null(m->bitmap));
        json_object_object_add(o, "generation", json_str_or_null(m->generation));
        if (m->n_bitmap_counts) {
            struct json_object *c = json_object_new_object();

            for (size_t i = 0; i < m->n_bitmap_counts; i++) {
                json_object_object_add(
                    c, m->bitmap_counts[i].name,
                    json_object_new_int64((int64_t)m->bitmap_counts[i].count));
            }
            json_object_object_add(o, "bitmap-counts", c);
        }
    }
    json_object_object_add(o, "changed-bytes",
                           json_object_new_int64((int64_t)m->changed_bytes));
    json_object_object_add(o, "stored-bytes",
                           json_object_new_int64((int64_t)m->stored_bytes));
    if (!full) {
        return o;
    }
    json_object_object_add(o, "hash-algorithm", json_object_new_string(HASH_ALGORITHM));
    json_object_object_add(o, "index-records",
                           json_object_new_int64((int64_t)m->index_records));
    hex_encode(m->merkle_root, REPO_ROOT_LEN, hex);
    json_object_object_add(o, "merkle-root", json_object_new_string(hex));
    return o;
}

/* Lookup helpers: each sets an error naming the file and the key.
 * get_key: false when the key is missing; *ret may be NULL (JSON null). */
static bool get_key(struct json_object *obj, const char *key,
                    struct json_object **ret, const char *what, Error **errp)
{
    if (!json_object_object_get_ex(obj, key, ret)) {
        error_setg(errp, "%s: missing key '%s'", what, key);
        return false;
    }
    return true;
}

static bool get_string(struct json_object *obj, const char *key, bool nullable,
                       size_t max_len, char **ret, const char *what,
                       Error **errp)
{
    struct json_object *v;
    if (!json_object_object_get_ex(obj, key, &v)) {
        error_setg(errp, "%s: missing key '%s'", what, key);
        return false;
    }
    if (!v && nullable) {
        *ret = NULL;
        return true;
    }
    if (!json_object_is_type(v, json_type_string)) {
        error_setg(errp, "%s: '%s' must be a string%s", what, key,
                   nullable ? " or null" : "");
        return false;
    }
    size_t len = (size_t)json_object_get_string_len(v);
    if (len == 0 || len > max_len || memchr(json_object_get_string(v), 0, len)) {
        error_setg(errp, "%s: '%s' must be 1 to %zu characters", what, key,
                   max_len);
        return false;
    }
    *ret = strdup(json_object_get_string(v));
    if (!*ret) {
        error_setg(errp, "out of memory");
        return false;
    }
    return true;
}

/* A non-negative integer of JSON value v, at most max. */
static bool json_uint(struct json_object *v, uint64_t max, uint64_t *ret)
{
    if (!v || !json_object_is_type(v, json_type_int)) {
        return false;
    }
    errno = 0;
    int64_t s = json_object_get_int64(v);
    if (s < 0) {
        return false;
    }
    if (s == INT64_MAX) {
        /* json-c keeps values above INT64_MAX as uint64. */
        uint64_t u = json_object_get_uint64(v);
        if (u > max) {
            return false;
        }
        *ret = u;
        return true;
    }
    if ((uint64_t)s > max) {
        return false;
    }
    *ret = (uint64_t)s;
    return true;
}

static bool get_uint(struct json_object *obj, const char *key, uint64_t max,
                     uint64_t *ret, const char *what, Error **errp)
{
    struct json_object *v;
    if (!get_key(obj, key, &v, what, errp)) {
        return false;
    }
    if (!json_uint(v, max, ret)) {
        error_setg(errp, "%s: '%s' must be an integer from 0 to %" PRIu64,
                   what, key, max);
        return false;
    }
    return true;
}

/* "YYYY-MM-DDTHH:MM:SSZ" */
static bool time_valid(const char *t)
{
    static const char pattern[] = "dddd-dd-ddTdd:dd:ddZ";
    if (strlen(t) != sizeof(pattern) - 1) {
        return false;
    }
    for (size_t i = 0; pattern[i]; i++) {
        if (pattern[i] == 'd' ? (t[i] < '0' || t[i] > '9') : t[i] != pattern[i]) {
            return false;
        }
    }
    return true;
}

static bool parse_id_value(struct json_object *v, unsigned *ret)
{
    if (!v || !json_object_is_type(v, json_type_string)) {
        return false;
    }
    const char *s = json_object_get_string(v);
    unsigned seq = repo_parse_seq_digits(s, NULL);
    char buf[REPO_ID_LEN];
    if (!seq) {
        return false;
    }
    repo_format_id(seq, buf);
    if (strcmp(buf, s)) {
        return false;                      /* canonical form only */
    }
    *ret = seq;
    return true;
}

/* The optional "bitmap-counts": {"NAME": count, ...}, names of 1 to
 * BDRV_BITMAP_MAX_NAME bytes, at most REPO_MAX_BITMAP_COUNTS entries. */
static bool get_bitmap_counts(struct json_object *obj, RepoManifest *m,
                              const char *what, Error **errp)
{
    struct json_object *v;
    size_t n = 0;

    if (!json_object_object_get_ex(obj, "bitmap-counts", &v)) {
        return true;
    }
    if (!json_object_is_type(v, json_type_object) ||
        json_object_object_length(v) > REPO_MAX_BITMAP_COUNTS) {
        error_setg(errp, "%s: 'bitmap-counts' must be an object of at most "
                   "%u entries", what, REPO_MAX_BITMAP_COUNTS);
        return false;
    }
    m->bitmap_counts = calloc(json_object_object_length(v) + 1,
                              sizeof(*m->bitmap_counts));
    if (!m->bitmap_counts) {
        error_setg(errp, "out of memory");
        return false;
    }
    json_object_object_foreach(v, key, val) {
        uint64_t count;

        if (!*key || strlen(key) > BDRV_BITMAP_MAX_NAME ||
            !json_uint(val, BDRV_MAX_LENGTH, &count)) {
            error_setg(errp, "%s: 'bitmap-counts' entries must map a bitmap "
                       "name to a byte count", what);
            return false;
        }
        m->bitmap_counts[n].name = strdup(key);
        if (!m->bitmap_counts[n].name) {
            error_setg(errp, "out of memory");
            return false;
        }
        m->bitmap_counts[n++].count = count;
        m->n_bitmap_counts = n;
    }
    return true;
}

/* The hash algorithm (the one we know) and the Merkle root, last keys of
 * both versions. */
static bool get_algorithm_and_root(struct json_object *obj, RepoManifest *m,
                                   const char *what, Error **errp)
{
    _cleanup_free_ char *str = NULL;
    struct json_object *v;

    if (!get_string(obj, "hash-algorithm", false, 64, &str, what, errp)) {
        return false;
    }
    if (strcmp(str, HASH_ALGORITHM)) {
        error_setg(errp, "%s: unsupported hash algorithm '%s' (expected '"
                   HASH_ALGORITHM "')", what, str);
        return false;
    }
    if (!get_key(obj, "merkle-root", &v, what, errp)) {
        return false;
    }
    if (!json_object_is_type(v, json_type_string) ||
        !hex_decode(json_object_get_string(v),
                    (size_t)json_object_get_string_len(v), m->merkle_root,
                    REPO_ROOT_LEN)) {
        error_setg(errp, "%s: 'merkle-root' must be 64 hex digits", what);
        return false;
    }
    return true;
}

/* Version 2: the hashes are in the index file; the manifest has its
 * record count, which cannot exceed the image's blocks.  Version 1's
 * inline lists are refused, so no reader takes them for the truth. */
static RepoManifest *manifest_v2_tail(struct json_object *obj, RepoManifest *m,
                                      const char *what, Error **errp)
{
    _cleanup_(repo_manifest_freep) RepoManifest *mp = m;
    uint64_t n_blocks = DIV_ROUND_UP(m->image_size, m->cluster_size);

    if (json_object_object_get_ex(obj, "extents", NULL) ||
        json_object_object_get_ex(obj, "hashes", NULL)) {
        error_setg(errp, "%s: a version 2 manifest keeps its hashes in the "
                   "index, not in 'extents' or 'hashes'", what);
        return NULL;
    }
    if (!get_uint(obj, "index-records", n_blocks, &m->index_records, what,
                  errp) ||
        !get_algorithm_and_root(obj, m, what, errp)) {
        return NULL;
    }
    return steal_pointer(&mp);
}

RepoManifest *repo_manifest_from_json(struct json_object *obj,
                                      const char *what, Error **errp)
{
    _cleanup_(repo_manifest_freep) RepoManifest *m = NULL;
    struct json_object *v;
    _cleanup_free_ char *str = NULL;
    uint64_t u;

    if (!json_object_is_type(obj, json_type_object)) {
        error_setg(errp, "%s: a manifest must be a JSON object", what);
        return NULL;
    }
    m = calloc(1, sizeof(*m));
    if (!m) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    if (!get_string(obj, "format", false, 64, &str, what, errp)) {
        return NULL;
    }
    if (strcmp(str, MANIFEST_FORMAT)) {
        error_setg(errp, "%s: 'format' is '%s', not '" MANIFEST_FORMAT "'",
                   what, str);
        return NULL;
    }
    if (!get_uint(obj, "version", UINT32_MAX, &u, what, errp)) {
        return NULL;
    }
    if (u != 1 && u != 2) {
        error_setg(errp, "%s: manifest version %" PRIu64 " is not supported "
                   "(this bitback reads versions 1 and 2)", what, u);
        return NULL;
    }
    m->version = (unsigned)u;

    if (!get_key(obj, "id", &v, what, errp)) {
        return NULL;
    }
    if (!parse_id_value(v, &m->seq)) {
        error_setg(errp, "%s: 'id' must be a backup ID such as \"000001\"", what);
        return NULL;
    }
    repo_format_id(m->seq, m->id);

    if (!get_string(obj, "node", false, REPO_MAX_NODE_NAME, &m->node, what, errp)) {
        return NULL;
    }
    if (!repo_node_name_valid(m->node)) {
        error_setg(errp, "%s: invalid node name '%s'", what, m->node);
        return NULL;
    }
    if (!get_string(obj, "time", false, 64, &m->time, what, errp)) {
        return NULL;
    }
    if (!time_valid(m->time)) {
        error_setg(errp, "%s: 'time' must be ISO 8601 UTC like "
                   "2026-11-23T15:11:32Z, not '%s'", what, m->time);
        return NULL;
    }
    free(str);
    str = NULL;
    if (!get_string(obj, "level", false, 16, &str, what, errp)) {
        return NULL;
    }
    if (!repo_level_parse(str, &m->level)) {
        error_setg(errp, "%s: 'level' must be full, inc or diff, not '%s'",
                   what, str);
        return NULL;
    }
    if (!get_key(obj, "parent", &v, what, errp)) {
        return NULL;
    }
    if (v && !parse_id_value(v, &m->parent_seq)) {
        error_setg(errp, "%s: 'parent' must be a backup ID or null", what);
        return NULL;
    }
    if (m->level == REPO_LEVEL_FULL && m->parent_seq) {
        error_setg(errp, "%s: a full backup has no parent", what);
        return NULL;
    }
    if (m->level != REPO_LEVEL_FULL && !m->parent_seq) {
        error_setg(errp, "%s: an %s backup needs a parent", what,
                   repo_level_name(m->level));
        return NULL;
    }
    if (m->parent_seq >= m->seq) {
        error_setg(errp, "%s: parent %06u is not older than backup %s", what,
                   m->parent_seq, m->id);
        return NULL;
    }
    if (!get_key(obj, "synthetic", &v, what, errp)) {
        return NULL;
    }
    if (!json_object_is_type(v, json_type_boolean)) {
        error_setg(errp, "%s: 'synthetic' must be true or false", what);
        return NULL;
    }
    m->synthetic = json_object_get_boolean(v);
    if (!get_uint(obj, "image-size", BDRV_MAX_LENGTH, &m->image_size, what, errp)) {
        return NULL;
    }
    if (!get_uint(obj, "granularity", UINT32_MAX, &u, what, errp)) {
        return NULL;
    }
    if (!IS_POW2(u) || u < 512 || u > (UINT64_C(1) << 31)) {
        error_setg(errp, "%s: 'granularity' must be a power of two from 512 "
                   "to 2 GiB, not %" PRIu64, what, u);
        return NULL;
    }
    m->granularity = (uint32_t)u;
    if (m->version == 1) {
        if (!get_uint(obj, "cluster-size", UINT32_MAX, &u, what, errp)) {
            return NULL;
        }
        if (u != REPO_CLUSTER_SIZE) {
            error_setg(errp, "%s: 'cluster-size' must be %u, not %" PRIu64,
                       what, REPO_CLUSTER_SIZE, u);
            return NULL;
        }
    } else {
        if (!get_uint(obj, "hash-size", UINT32_MAX, &u, what, errp)) {
            return NULL;
        }
        if (!IS_POW2(u) || u < REPO_MIN_HASH_SIZE || u > REPO_MAX_HASH_SIZE) {
            error_setg(errp, "%s: 'hash-size' must be a power of two from "
                       "%u to %u, not %" PRIu64, what, REPO_MIN_HASH_SIZE,
                       REPO_MAX_HASH_SIZE, u);
            return NULL;
        }
    }
    m->cluster_size = (uint32_t)u;
    if (!get_string(obj, "bitmap", true, 1023, &m->bitmap, what, errp) ||
        !get_string(obj, "generation", true, 128, &m->generation, what, errp)) {
        return NULL;
    }
    if (!get_bitmap_counts(obj, m, what, errp)) {
        return NULL;
    }
    if (!get_uint(obj, "changed-bytes", m->image_size, &m->changed_bytes,
                  what, errp) ||
        !get_uint(obj, "stored-bytes", INT64_MAX, &m->stored_bytes, what, errp)) {
        return NULL;
    }

    if (m->version == 2) {
        return manifest_v2_tail(obj, steal_pointer(&m), what, errp);
    }

    uint64_t n_clusters = DIV_ROUND_UP(m->image_size, REPO_CLUSTER_SIZE);

    /* extents: sorted, merged (gaps between them), inside the image. */
    if (!get_key(obj, "extents", &v, what, errp)) {
        return NULL;
    }
    if (!json_object_is_type(v, json_type_array)) {
        error_setg(errp, "%s: 'extents' must be an array", what);
        return NULL;
    }
    size_t n = json_object_array_length(v);
    if (n > n_clusters) {
        error_setg(errp, "%s: 'extents' has %zu entries, more than the "
                   "image's %" PRIu64 " clusters", what, n, n_clusters);
        return NULL;
    }
    m->extents = calloc(n ? n : 1, sizeof(*m->extents));
    if (!m->extents) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    m->n_extents = n;
    uint64_t prev_end = 0;
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(v, i);
        uint64_t start, len;
        if (!json_object_is_type(e, json_type_array) ||
            json_object_array_length(e) != 2 ||
            !json_uint(json_object_array_get_idx(e, 0), BDRV_MAX_LENGTH, &start) ||
            !json_uint(json_object_array_get_idx(e, 1), BDRV_MAX_LENGTH, &len) ||
            len == 0) {
            error_setg(errp, "%s: extent %zu must be [offset, length] with "
                       "length > 0", what, i);
            return NULL;
        }
        if (start > m->image_size || len > m->image_size - start) {
            error_setg(errp, "%s: extent %zu [%" PRIu64 ", %" PRIu64 "] ends "
                       "past the image size %" PRIu64, what, i, start, len,
                       m->image_size);
            return NULL;
        }
        if (i > 0 && start <= prev_end) {
            error_setg(errp, "%s: extents are not sorted and merged at "
                       "entry %zu", what, i);
            return NULL;
        }
        m->extents[i].start = start;
        m->extents[i].length = len;
        prev_end = start + len;
    }

    /* hashes: strictly increasing cluster indexes inside the image. */
    if (!get_key(obj, "hashes", &v, what, errp)) {
        return NULL;
    }
    if (!json_object_is_type(v, json_type_array)) {
        error_setg(errp, "%s: 'hashes' must be an array", what);
        return NULL;
    }
    n = json_object_array_length(v);
    if (n > n_clusters) {
        error_setg(errp, "%s: 'hashes' has %zu entries, more than the "
                   "image's %" PRIu64 " clusters", what, n, n_clusters);
        return NULL;
    }
    m->hashes = calloc(n ? n : 1, sizeof(*m->hashes));
    if (!m->hashes) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    m->n_hashes = n;
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(v, i);
        struct json_object *h = NULL;
        uint64_t c;
        if (!json_object_is_type(e, json_type_array) ||
            json_object_array_length(e) != 2 ||
            !json_uint(json_object_array_get_idx(e, 0), BDRV_MAX_LENGTH, &c) ||
            !(h = json_object_array_get_idx(e, 1)) ||
            !json_object_is_type(h, json_type_string) ||
            !hex_decode(json_object_get_string(h),
                        (size_t)json_object_get_string_len(h),
                        m->hashes[i].hash, REPO_HASH_LEN)) {
            error_setg(errp, "%s: hash entry %zu must be [cluster-index, "
                       "\"32 hex digits\"]", what, i);
            return NULL;
        }
        if (c >= n_clusters) {
            error_setg(errp, "%s: hash entry %zu names cluster %" PRIu64
                       ", outside the image (%" PRIu64 " clusters)", what, i,
                       c, n_clusters);
            return NULL;
        }
        if (i > 0 && c <= m->hashes[i - 1].cluster) {
            error_setg(errp, "%s: hashes are not sorted by cluster or repeat "
                       "a cluster at entry %zu", what, i);
            return NULL;
        }
        m->hashes[i].cluster = c;
    }

    if (!get_algorithm_and_root(obj, m, what, errp)) {
        return NULL;
    }
    return steal_pointer(&m);
}

struct json_object *repo_parse_json_text(const char *text, const char *what,
                                         Error **errp)
{
    size_t len = strlen(text);
    struct json_tokener *tok = json_tokener_new_ex(64);
    if (!tok) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    struct json_object *obj = json_tokener_parse_ex(tok, text, (int)len);
    enum json_tokener_error jerr = json_tokener_get_error(tok);
    size_t used = json_tokener_get_parse_end(tok);
    if (!obj || jerr != json_tokener_success) {
        error_setg(errp, "%s: invalid JSON: %s", what,
                   jerr == json_tokener_continue ? "unexpected end of file"
                                                 : json_tokener_error_desc(jerr));
        json_object_put(obj);
        json_tokener_free(tok);
        return NULL;
    }
    json_tokener_free(tok);
    for (; used < len; used++) {
        if (!strchr(" \t\r\n", text[used])) {
            error_setg(errp, "%s: invalid JSON: trailing data after the object",
                       what);
            json_object_put(obj);
            return NULL;
        }
    }
    return obj;
}

struct json_object *repo_parse_json_file(const RepoStorage *st,
                                         const char *path, uint64_t max,
                                         Error **errp)
{
    size_t len = 0;
    _cleanup_free_ char *text = st->read(path, max, &len, errp);
    if (!text) {
        return NULL;
    }
    return repo_parse_json_text(text, path, errp);
}

RepoManifest *repo_manifest_load(const RepoStorage *st, const char *path,
                                 Error **errp)
{
    _cleanup_json_ struct json_object *obj =
        repo_parse_json_file(st, path, REPO_MAX_MANIFEST, errp);
    if (!obj) {
        return NULL;
    }
    return repo_manifest_from_json(obj, path, errp);
}

char *repo_manifest_text(const RepoManifest *m, const char *path,
                         uint64_t max, Error **errp)
{
    _cleanup_json_ struct json_object *obj = NULL;
    char *text = NULL;

    if (m->version != 2) {
        error_setg(errp, "manifest '%s': only version 2 is written", path);
        return NULL;
    }
    obj = repo_manifest_to_json(m, true);
    /* Never write a manifest that readers would refuse. */
    RepoManifest *check = repo_manifest_from_json(obj, path, errp);

    if (!check) {
        return NULL;
    }
    repo_manifest_free(check);
    if (asprintf(&text, "%s\n", json_object_to_json_string_ext(
                     obj, JSON_C_TO_STRING_SPACED |
                          JSON_C_TO_STRING_NOSLASHESCAPE)) < 0) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    size_t len = strlen(text);
    if (len > max) {
        error_setg(errp, "manifest '%s' would be %zu bytes, more than the "
                   "%" PRIu64 " a reader accepts", path, len, max);
        free(text);
        return NULL;
    }
    return text;
}

bool repo_manifest_write(Repo *repo, const char *path, const RepoManifest *m,
                         Error **errp)
{
    if (!repo_upgrade(repo, errp)) {
        return false;
    }
    _cleanup_free_ char *text =
        repo_manifest_text(m, path, REPO_MAX_MANIFEST, errp);
    return text && repo->storage->write_tmp(path, text, strlen(text), errp);
}
