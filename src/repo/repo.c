/*
 * The backup repository (docs/specs/repository.md): a folder of standard
 * qcow2 files with one JSON manifest each.  This file reads and validates
 * manifests, keeps the list of committed backups, computes the per-cluster
 * XXH3-128 hashes and the SHA-256 Merkle root, and commits a backup with
 * the two-phase order the spec requires.
 *
 * Invariants of the on-disk repository that this code keeps:
 *   1. A backup exists if and only if NODE/ID.json exists, and that file
 *      parses and validates; anything else in the folder is ignored by
 *      readers (it may still raise max_seq, see 3).
 *   2. ID.json appears only after ID.qcow2 is durable and in place: commit
 *      is fsync(tmp data), write+fsync(tmp manifest), rename data, rename
 *      manifest, fsync(folder), unlink(ID.attempt).
 *   3. A new ID is above every ID that any file of any node names:
 *      manifests, attempt markers, temporary files and qcow2 files (a
 *      qcow2 renamed into place whose manifest was not yet renamed when
 *      the run died).
 *   4. A chain is exactly the one its manifests describe: every chain is
 *      opened by repo_open_chain()/repo_open_new() ("Chains" below), which
 *      check each file's recorded backing reference against its manifest
 *      and attach the parent themselves; a header's backing name is never
 *      followed.
 *
 * Everything here is control code: functions take Error **errp last and
 * report nothing themselves.  The manifest is read with explicit size
 * limits before json-c allocates anything for it.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/sha.h>
#include <xxhash.h>

#include "repo/repo.h"
#include "util/cleanup.h"
#include "util/cutils.h"

#define REPO_MARKER_NAME   "bitback-repo.json"
#define REPO_FORMAT_NAME   "bitback-repository"
#define MANIFEST_FORMAT    "bitback-manifest"
#define HASH_ALGORITHM     "xxh3-128"
/* Largest ID: nine digits keeps "%06u" and the file names short. */
#define REPO_MAX_SEQ       999999999u
/* A manifest of a 4 TiB disk with every cluster listed is ~3.5 GiB of
 * text... we cap at 1 GiB (about 1 TiB fully changed per backup). */
#define REPO_MAX_MANIFEST  (UINT64_C(1) << 30)
#define REPO_MAX_MARKER    (64u * 1024)
/* Reads of repo_scan_backup: many clusters per request. */
#define SCAN_BATCH         (4u * 1024 * 1024)

/* ---- Small helpers ---- */

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

void repo_format_id(unsigned seq, char *buf)
{
    snprintf(buf, REPO_ID_LEN, "%06u", seq);
}

/* Parse 1..9 decimal digits (no sign, no spaces) ending at `end` (or at
 * the NUL when end is NULL).  0 on anything else. */
static unsigned parse_seq_digits(const char *s, const char *end)
{
    uint64_t v = 0;
    size_t n = 0;

    if (!end) {
        end = s + strlen(s);
    }
    if (s == end) {
        return 0;
    }
    for (const char *p = s; p < end; p++, n++) {
        if (*p < '0' || *p > '9') {
            return 0;
        }
        v = v * 10 + (unsigned)(*p - '0');
        if (v > REPO_MAX_SEQ) {
            return 0;
        }
    }
    return (unsigned)v;
}

bool repo_parse_id(const char *s, unsigned *ret_seq, Error **errp)
{
    if (!s || !*s) {
        error_setg(errp, "invalid backup ID '': expected a number or 'latest'");
        return false;
    }
    if (!strcmp(s, "latest")) {
        *ret_seq = 0;
        return true;
    }
    /* Leading zeros may be as many as the user likes. */
    const char *p = s;
    while (*p == '0' && p[1]) {
        p++;
    }
    unsigned seq = parse_seq_digits(p, NULL);
    if (!seq) {
        error_setg(errp, "invalid backup ID '%s': expected a number from 1 "
                   "to %u or 'latest'", s, REPO_MAX_SEQ);
        return false;
    }
    *ret_seq = seq;
    return true;
}

/* A node folder name: not empty, no '/', does not start with '.', short. */
static bool node_name_valid(const char *name)
{
    size_t n = strlen(name);
    return n > 0 && n <= REPO_MAX_NODE_NAME && name[0] != '.' &&
           !strchr(name, '/');
}

/* If name is "%06u" of some seq followed exactly by suffix (and prefix
 * before it), return seq; else 0. */
static unsigned match_seq_name(const char *name, const char *prefix,
                               const char *suffix)
{
    size_t lp = strlen(prefix), ls = strlen(suffix), ln = strlen(name);
    char buf[REPO_ID_LEN];

    if (ln <= lp + ls || strncmp(name, prefix, lp) ||
        strcmp(name + ln - ls, suffix)) {
        return 0;
    }
    unsigned seq = parse_seq_digits(name + lp, name + ln - ls);
    if (!seq) {
        return 0;
    }
    repo_format_id(seq, buf);
    if (strlen(buf) != ln - lp - ls || strncmp(buf, name + lp, ln - lp - ls)) {
        return 0;                          /* "7.json": not ours */
    }
    return seq;
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

static int hex_value(char c)
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
        int hi = hex_value(s[2 * i]), lo = hex_value(s[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            return false;
        }
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return true;
}

/* ---- Hashes ---- */

void repo_hash_cluster(const void *buf, size_t len, uint8_t out[REPO_HASH_LEN])
{
    XXH128_hash_t h = XXH3_128bits(buf, len);
    XXH128_canonical_t c;

    XXH128_canonicalFromHash(&c, h);
    memcpy(out, c.digest, REPO_HASH_LEN);
}

void repo_hash_zero_cluster(size_t len, uint8_t out[REPO_HASH_LEN])
{
    static const uint8_t zeroes[REPO_CLUSTER_SIZE];

    if (len <= sizeof(zeroes)) {
        repo_hash_cluster(zeroes, len, out);
        return;
    }
    /* Longer than a cluster (not used by the repository itself). */
    XXH3_state_t *st = XXH3_createState();
    XXH128_canonical_t c;
    if (!st) {
        abort();
    }
    XXH3_128bits_reset(st);
    for (size_t done = 0; done < len; done += sizeof(zeroes)) {
        XXH3_128bits_update(st, zeroes, MIN(sizeof(zeroes), len - done));
    }
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(st));
    XXH3_freeState(st);
    memcpy(out, c.digest, REPO_HASH_LEN);
}

void repo_merkle_root(const RepoHash *hashes, size_t n,
                      uint8_t out[REPO_ROOT_LEN])
{
    if (n == 0) {
        SHA256((const unsigned char *)"", 0, out);
        return;
    }
    uint8_t *level = malloc(n * REPO_ROOT_LEN);
    if (!level) {
        abort();
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t leaf[8 + REPO_HASH_LEN];
        for (int b = 0; b < 8; b++) {
            leaf[b] = (uint8_t)(hashes[i].cluster >> (8 * b));
        }
        memcpy(leaf + 8, hashes[i].hash, REPO_HASH_LEN);
        SHA256(leaf, sizeof(leaf), level + i * REPO_ROOT_LEN);
    }
    /* Pair neighbours in place; an odd last node moves up unchanged. */
    while (n > 1) {
        size_t m = 0;
        for (size_t i = 0; i + 1 < n; i += 2, m++) {
            SHA256(level + i * REPO_ROOT_LEN, 2 * REPO_ROOT_LEN,
                   level + m * REPO_ROOT_LEN);
        }
        if (n & 1) {
            memmove(level + m * REPO_ROOT_LEN, level + (n - 1) * REPO_ROOT_LEN,
                    REPO_ROOT_LEN);
            m++;
        }
        n = m;
    }
    memcpy(out, level, REPO_ROOT_LEN);
    free(level);
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
        json_object_object_add(o, "version", json_object_new_int(1));
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
        json_object_object_add(o, "cluster-size",
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
    struct json_object *ext = json_object_new_array_ext((int)m->n_extents);
    for (size_t i = 0; i < m->n_extents; i++) {
        struct json_object *e = json_object_new_array_ext(2);
        json_object_array_add(e, json_object_new_int64((int64_t)m->extents[i].start));
        json_object_array_add(e, json_object_new_int64((int64_t)m->extents[i].length));
        json_object_array_add(ext, e);
    }
    json_object_object_add(o, "extents", ext);
    json_object_object_add(o, "hash-algorithm", json_object_new_string(HASH_ALGORITHM));
    struct json_object *hs = json_object_new_array_ext((int)m->n_hashes);
    for (size_t i = 0; i < m->n_hashes; i++) {
        struct json_object *e = json_object_new_array_ext(2);
        hex_encode(m->hashes[i].hash, REPO_HASH_LEN, hex);
        json_object_array_add(e, json_object_new_int64((int64_t)m->hashes[i].cluster));
        json_object_array_add(e, json_object_new_string(hex));
        json_object_array_add(hs, e);
    }
    json_object_object_add(o, "hashes", hs);
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
    unsigned seq = parse_seq_digits(s, NULL);
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
    if (u != 1) {
        error_setg(errp, "%s: manifest version %" PRIu64 " is not supported "
                   "(this bitback reads version 1)", what, u);
        return NULL;
    }

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
    if (!node_name_valid(m->node)) {
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
    if (!get_uint(obj, "cluster-size", UINT32_MAX, &u, what, errp)) {
        return NULL;
    }
    if (u != REPO_CLUSTER_SIZE) {
        error_setg(errp, "%s: 'cluster-size' must be %u, not %" PRIu64, what,
                   REPO_CLUSTER_SIZE, u);
        return NULL;
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

    free(str);
    str = NULL;
    if (!get_string(obj, "hash-algorithm", false, 64, &str, what, errp)) {
        return NULL;
    }
    if (strcmp(str, HASH_ALGORITHM)) {
        error_setg(errp, "%s: unsupported hash algorithm '%s' (expected '"
                   HASH_ALGORITHM "')", what, str);
        return NULL;
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

    if (!get_key(obj, "merkle-root", &v, what, errp)) {
        return NULL;
    }
    if (!json_object_is_type(v, json_type_string) ||
        !hex_decode(json_object_get_string(v),
                    (size_t)json_object_get_string_len(v), m->merkle_root,
                    REPO_ROOT_LEN)) {
        error_setg(errp, "%s: 'merkle-root' must be 64 hex digits", what);
        return NULL;
    }
    return steal_pointer(&m);
}

/* Read a whole small file (at most max bytes) as a NUL-terminated string. */
static char *read_file_limited(const char *path, uint64_t max, Error **errp)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;

    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot open '%s'", path);
        return NULL;
    }
    if (fstat(fd, &st) < 0) {
        error_setg_errno(errp, errno, "cannot stat '%s'", path);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        error_setg(errp, "'%s' is not a regular file", path);
        return NULL;
    }
    if ((uint64_t)st.st_size > max) {
        error_setg(errp, "'%s' is too large (%" PRIu64 " bytes, at most %"
                   PRIu64 ")", path, (uint64_t)st.st_size, max);
        return NULL;
    }
    _cleanup_free_ char *buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        error_setg(errp, "out of memory reading '%s'", path);
        return NULL;
    }
    int r = pread_full(fd, buf, (size_t)st.st_size, 0);
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot read '%s'", path);
        return NULL;
    }
    buf[st.st_size] = '\0';
    return steal_pointer(&buf);
}

static struct json_object *parse_json_file(const char *path, uint64_t max,
                                           Error **errp)
{
    _cleanup_free_ char *text = read_file_limited(path, max, errp);
    if (!text) {
        return NULL;
    }
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
        error_setg(errp, "%s: invalid JSON: %s", path,
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
                       path);
            json_object_put(obj);
            return NULL;
        }
    }
    return obj;
}

static RepoManifest *manifest_load(const char *path, Error **errp)
{
    _cleanup_json_ struct json_object *obj =
        parse_json_file(path, REPO_MAX_MANIFEST, errp);
    if (!obj) {
        return NULL;
    }
    return repo_manifest_from_json(obj, path, errp);
}

/* ---- The repository ---- */

static void repo_clear_backups(Repo *repo)
{
    for (size_t i = 0; i < repo->n_backups; i++) {
        repo_manifest_free(repo->backups[i]);
    }
    free(repo->backups);
    repo->backups = NULL;
    repo->n_backups = 0;
}

void repo_free(Repo *repo)
{
    if (!repo) {
        return;
    }
    repo_clear_backups(repo);
    free(repo->path);
    free(repo);
}

static void repo_freep(Repo **p)
{
    repo_free(*p);
}

static void closedirp(DIR **d)
{
    if (*d) {
        closedir(*d);
    }
}

static int manifest_cmp(const void *a, const void *b)
{
    const RepoManifest *x = *(RepoManifest *const *)a;
    const RepoManifest *y = *(RepoManifest *const *)b;
    if (x->seq != y->seq) {
        return x->seq < y->seq ? -1 : 1;
    }
    return strcmp(x->node, y->node);
}

static bool is_dir_at(const char *dir, const char *name)
{
    _cleanup_free_ char *p = NULL;
    struct stat st;
    if (asprintf(&p, "%s/%s", dir, name) < 0) {
        return false;
    }
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Load one node folder: its manifests into repo, every seq it names into
 * max_seq. */
static bool repo_load_node(Repo *repo, const char *node, Error **errp)
{
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    _cleanup_(closedirp) DIR *d = opendir(dir);
    struct dirent *de;

    if (!d) {
        error_setg_errno(errp, errno, "cannot read '%s'", dir);
        return false;
    }
    while ((errno = 0, de = readdir(d))) {
        const char *name = de->d_name;
        unsigned seq;
        if ((seq = match_seq_name(name, "", ".json"))) {
            _cleanup_free_ char *path = NULL;
            if (asprintf(&path, "%s/%s", dir, name) < 0) {
                error_setg(errp, "out of memory");
                return false;
            }
            RepoManifest *m = manifest_load(path, errp);
            if (!m) {
                return false;
            }
            if (m->seq != seq || strcmp(m->node, node)) {
                error_setg(errp, "%s: the manifest says backup %s of '%s', "
                           "but its file name says %06u of '%s'", path, m->id,
                           m->node, seq, node);
                repo_manifest_free(m);
                return false;
            }
            RepoManifest **nb = realloc(repo->backups,
                                        (repo->n_backups + 1) * sizeof(*nb));
            if (!nb) {
                repo_manifest_free(m);
                error_setg(errp, "out of memory");
                return false;
            }
            repo->backups = nb;
            repo->backups[repo->n_backups++] = m;
        } else if (!(seq = match_seq_name(name, "", ".attempt")) &&
                   !(seq = match_seq_name(name, "", ".qcow2")) &&
                   !(seq = match_seq_name(name, ".", ".qcow2.tmp")) &&
                   !(seq = match_seq_name(name, ".", ".json.tmp"))) {
            continue;                      /* not ours: ignored */
        }
        repo->max_seq = MAX(repo->max_seq, seq);
    }
    if (errno) {
        error_setg_errno(errp, errno, "cannot read '%s'", dir);
        return false;
    }
    return true;
}

bool repo_reload(Repo *repo, Error **errp)
{
    _cleanup_(closedirp) DIR *d = opendir(repo->path);
    struct dirent *de;

    repo_clear_backups(repo);
    repo->max_seq = 0;
    if (!d) {
        error_setg_errno(errp, errno, "cannot read repository '%s'", repo->path);
        return false;
    }
    while ((errno = 0, de = readdir(d))) {
        if (!node_name_valid(de->d_name) || !is_dir_at(repo->path, de->d_name)) {
            continue;
        }
        if (!repo_load_node(repo, de->d_name, errp)) {
            repo_clear_backups(repo);
            return false;
        }
    }
    if (errno) {
        error_setg_errno(errp, errno, "cannot read repository '%s'", repo->path);
        repo_clear_backups(repo);
        return false;
    }
    if (repo->n_backups) {
        qsort(repo->backups, repo->n_backups, sizeof(*repo->backups),
              manifest_cmp);
    }
    return true;
}

/* Is the folder empty (only "." and "..")?  -errno on error. */
static int dir_is_empty(const char *path)
{
    _cleanup_(closedirp) DIR *d = opendir(path);
    struct dirent *de;
    if (!d) {
        return -errno;
    }
    while ((errno = 0, de = readdir(d))) {
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
            return 0;
        }
    }
    return errno ? -errno : 1;
}

/* Is s a UUID in its text form (8-4-4-4-12 hex digits)? */
static bool uuid_valid(const char *s)
{
    if (strlen(s) != REPO_UUID_LEN - 1) {
        return false;
    }
    for (size_t i = 0; i < REPO_UUID_LEN - 1; i++) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;

        if (dash ? s[i] != '-' : hex_value(s[i]) < 0) {
            return false;
        }
    }
    return true;
}

/* Write the marker of a repository: format, version and uuid, one line. */
static bool repo_write_marker(const char *path, struct json_object *obj,
                              Error **errp)
{
    _cleanup_free_ char *text = NULL;

    if (asprintf(&text, "%s\n", json_object_to_json_string_ext(
                     obj, JSON_C_TO_STRING_SPACED)) < 0) {
        error_setg(errp, "out of memory");
        return false;
    }
    return file_replace_atomic(path, text, strlen(text), errp);
}

/* Check bitback-repo.json and read its UUID into uuid ("" when it has
 * none).  create: give a marker without a UUID a new one, written once
 * (temporary file, fsync, rename, folder fsync), keeping its other keys. */
static bool repo_check_marker(const char *path, bool create,
                              char uuid[REPO_UUID_LEN], Error **errp)
{
    _cleanup_json_ struct json_object *obj =
        parse_json_file(path, REPO_MAX_MARKER, errp);
    struct json_object *v;

    uuid[0] = '\0';
    if (!obj) {
        return false;
    }
    if (!json_object_is_type(obj, json_type_object) ||
        !json_object_object_get_ex(obj, "format", &v) ||
        !json_object_is_type(v, json_type_string) ||
        strcmp(json_object_get_string(v), REPO_FORMAT_NAME)) {
        error_setg(errp, "%s: 'format' must be \"" REPO_FORMAT_NAME "\"", path);
        return false;
    }
    if (!json_object_object_get_ex(obj, "version", &v) ||
        !json_object_is_type(v, json_type_int)) {
        error_setg(errp, "%s: 'version' must be an integer", path);
        return false;
    }
    if (json_object_get_int64(v) != 1) {
        error_setg(errp, "%s: repository version %" PRId64 " is not supported "
                   "(this bitback reads version 1)", path,
                   json_object_get_int64(v));
        return false;
    }
    if (json_object_object_get_ex(obj, "uuid", &v)) {
        if (!json_object_is_type(v, json_type_string) ||
            !uuid_valid(json_object_get_string(v))) {
            error_setg(errp, "%s: 'uuid' must be a UUID "
                       "(xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)", path);
            return false;
        }
        memcpy(uuid, json_object_get_string(v), REPO_UUID_LEN);
        return true;
    }
    if (!create) {
        return true;
    }
    uuid_generate_str(uuid);
    json_object_object_add(obj, "uuid", json_object_new_string(uuid));
    if (!repo_write_marker(path, obj, errp)) {
        error_prepend(errp, "cannot give the repository a UUID: ");
        uuid[0] = '\0';
        return false;
    }
    return true;
}

Repo *repo_open(const char *path, bool create, Error **errp)
{
    _cleanup_(repo_freep) Repo *repo = NULL;
    _cleanup_free_ char *marker = NULL;
    char uuid[REPO_UUID_LEN] = "";
    struct stat st;

    if (!path || !*path) {
        error_setg(errp, "the repository path is empty");
        return NULL;
    }
    if (create && mkdir(path, 0777) < 0 && errno != EEXIST) {
        error_setg_errno(errp, errno, "cannot create repository '%s'", path);
        return NULL;
    }
    if (stat(path, &st) < 0) {
        error_setg_errno(errp, errno, "cannot open repository '%s'", path);
        return NULL;
    }
    if (!S_ISDIR(st.st_mode)) {
        error_setg(errp, "'%s' is not a bitback repository (not a folder)", path);
        return NULL;
    }
    if (asprintf(&marker, "%s/" REPO_MARKER_NAME, path) < 0) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    if (access(marker, F_OK) < 0) {
        int empty = dir_is_empty(path);
        if (empty < 0) {
            error_setg_errno(errp, -empty, "cannot read '%s'", path);
            return NULL;
        }
        if (!create || !empty) {
            error_setg(errp, "'%s' is not a bitback repository (no "
                       REPO_MARKER_NAME ")", path);
            return NULL;
        }
        _cleanup_json_ struct json_object *obj = json_object_new_object();

        uuid_generate_str(uuid);
        json_object_object_add(obj, "format",
                               json_object_new_string(REPO_FORMAT_NAME));
        json_object_object_add(obj, "version", json_object_new_int(1));
        json_object_object_add(obj, "uuid", json_object_new_string(uuid));
        if (!repo_write_marker(marker, obj, errp)) {
            return NULL;
        }
    } else if (!repo_check_marker(marker, create, uuid, errp)) {
        return NULL;
    }
    repo = calloc(1, sizeof(*repo));
    if (!repo || !(repo->path = strdup(path))) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    memcpy(repo->uuid, uuid, REPO_UUID_LEN);
    /* Drop trailing slashes (not a lone "/") so paths print cleanly. */
    for (size_t n = strlen(repo->path); n > 1 && repo->path[n - 1] == '/'; n--) {
        repo->path[n - 1] = '\0';
    }
    if (!repo_reload(repo, errp)) {
        return NULL;
    }
    return steal_pointer(&repo);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

const char **repo_nodes(Repo *repo)
{
    const char **names = calloc(repo->n_backups + 1, sizeof(*names));
    size_t n = 0;
    if (!names) {
        abort();
    }
    for (size_t i = 0; i < repo->n_backups; i++) {
        names[n++] = repo->backups[i]->node;
    }
    if (n) {
        qsort(names, n, sizeof(*names), cmp_str);
    }
    size_t out = 0;
    for (size_t i = 0; i < n; i++) {
        if (out == 0 || strcmp(names[out - 1], names[i])) {
            names[out++] = names[i];
        }
    }
    names[out] = NULL;
    return names;
}

/* node == NULL picks the only node of the repository (an error when there
 * are several). */
static bool resolve_node(Repo *repo, const char **node, Error **errp)
{
    if (*node) {
        return true;
    }
    _cleanup_free_ const char **names = repo_nodes(repo);
    if (!names[0]) {
        error_setg(errp, "no backups in %s", repo->path);
        return false;
    }
    if (names[1]) {
        error_setg(errp, "%s holds backups of several disks (%s, %s%s): "
                   "choose one with --node", repo->path, names[0], names[1],
                   names[2] ? ", ..." : "");
        return false;
    }
    *node = names[0];
    return true;
}

RepoManifest *repo_latest(Repo *repo, const char *node)
{
    for (size_t i = repo->n_backups; i-- > 0;) {
        if (!node || !strcmp(repo->backups[i]->node, node)) {
            return repo->backups[i];
        }
    }
    return NULL;
}

RepoManifest *repo_latest_full(Repo *repo, const char *node)
{
    for (size_t i = repo->n_backups; i-- > 0;) {
        RepoManifest *m = repo->backups[i];
        if ((!node || !strcmp(m->node, node)) && m->level == REPO_LEVEL_FULL) {
            return m;
        }
    }
    return NULL;
}

static RepoManifest *repo_lookup(Repo *repo, const char *node, unsigned seq)
{
    for (size_t i = 0; i < repo->n_backups; i++) {
        RepoManifest *m = repo->backups[i];
        if (m->seq == seq && !strcmp(m->node, node)) {
            return m;
        }
    }
    return NULL;
}

RepoManifest *repo_find(Repo *repo, const char *node, unsigned seq,
                        Error **errp)
{
    RepoManifest *m;

    if (!resolve_node(repo, &node, errp)) {
        return NULL;
    }
    m = seq ? repo_lookup(repo, node, seq) : repo_latest(repo, node);
    if (!m) {
        if (seq) {
            error_setg(errp, "no backup %06u of %s in %s", seq, node, repo->path);
        } else {
            error_setg(errp, "no backup of %s in %s", node, repo->path);
        }
    }
    return m;
}

RepoManifest *repo_parent(Repo *repo, const RepoManifest *m)
{
    return m->parent_seq ? repo_lookup(repo, m->node, m->parent_seq) : NULL;
}

RepoManifest **repo_chain(Repo *repo, const RepoManifest *m, size_t *ret_n,
                          Error **errp)
{
    size_t n = 0, cap = repo->n_backups + 1;
    _cleanup_free_ RepoManifest **rev = calloc(cap, sizeof(*rev));
    RepoManifest *cur = (RepoManifest *)m;

    if (!rev) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    for (;;) {
        if (n == cap) {
            error_setg(errp, "backup %s of %s: the chain of parents loops",
                       m->id, m->node);
            return NULL;
        }
        rev[n++] = cur;
        if (!cur->parent_seq) {
            break;
        }
        RepoManifest *p = repo_parent(repo, cur);
        if (!p) {
            error_setg(errp, "backup %s of %s: its parent %06u is missing "
                       "from %s", cur->id, cur->node, cur->parent_seq,
                       repo->path);
            return NULL;
        }
        if (p->seq >= cur->seq) {
            error_setg(errp, "backup %s of %s: the chain of parents loops",
                       m->id, m->node);
            return NULL;
        }
        cur = p;
    }
    RepoManifest **chain = calloc(n, sizeof(*chain));
    if (!chain) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        chain[i] = rev[n - 1 - i];
    }
    *ret_n = n;
    return chain;
}

/* ---- Paths ---- */

static char *path_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *path_printf(const char *fmt, ...)
{
    va_list ap;
    char *p = NULL;
    va_start(ap, fmt);
    if (vasprintf(&p, fmt, ap) < 0) {
        abort();
    }
    va_end(ap);
    return p;
}

char *repo_node_dir(Repo *repo, const char *node)
{
    return path_printf("%s/%s", repo->path, node);
}

char *repo_data_path(Repo *repo, const char *node, unsigned seq)
{
    return path_printf("%s/%s/%06u.qcow2", repo->path, node, seq);
}

char *repo_manifest_path(Repo *repo, const char *node, unsigned seq)
{
    return path_printf("%s/%s/%06u.json", repo->path, node, seq);
}

char *repo_tmp_data_path(Repo *repo, const char *node, unsigned seq)
{
    return path_printf("%s/%s/.%06u.qcow2.tmp", repo->path, node, seq);
}

char *repo_tmp_manifest_path(Repo *repo, const char *node, unsigned seq)
{
    return path_printf("%s/%s/.%06u.json.tmp", repo->path, node, seq);
}

static char *repo_attempt_path(Repo *repo, const char *node, unsigned seq)
{
    return path_printf("%s/%s/%06u.attempt", repo->path, node, seq);
}

/* ---- Chains: the one way a backup's chain is opened ----
 *
 * Invariant 4 (above; repository.md "Invariants"): a chain is exactly the
 * one its manifests describe.  A backup's qcow2 header names a backing
 * file, but that name is data from a file, not an instruction: every layer
 * is opened with its backing disabled (BDRV_O_NO_BACKING), the name it
 * records is checked against its manifest's parent, and the parent's
 * layer, which bitback opened itself from the manifests, is attached with
 * bdrv_set_backing().  Nothing the header names is ever opened.
 */

/* Longest piece of a recorded backing name quoted in an error. */
#define LINK_QUOTE_MAX 160

/* name, quoted for an error message: printable ASCII only (anything else
 * becomes '?'), cut at LINK_QUOTE_MAX bytes.  Caller frees. */
static char *quote_name(const char *name)
{
    size_t n = strnlen(name, LINK_QUOTE_MAX + 1);
    char *q = malloc(LINK_QUOTE_MAX + 4);

    if (!q) {
        abort();
    }
    for (size_t i = 0; i < n && i < LINK_QUOTE_MAX; i++) {
        q[i] = name[i] >= 0x20 && name[i] < 0x7f ? name[i] : '?';
    }
    strcpy(q + MIN(n, (size_t)LINK_QUOTE_MAX), n > LINK_QUOTE_MAX ? "..." : "");
    return q;
}

/* What kind of reference a recorded backing name that is not the expected
 * one is, for errors: the ways out of the repository first. */
static void describe_backing_name(const char *name, char *buf, size_t len)
{
    const char *colon = strchr(name, ':'), *slash = strchr(name, '/');
    unsigned seq;

    if (!strncmp(name, "json:", 5)) {
        snprintf(buf, len, "a json: filename");
    } else if (colon && (!slash || colon < slash)) {
        snprintf(buf, len, "a protocol prefix");
    } else if (name[0] == '/') {
        snprintf(buf, len, "an absolute path");
    } else if (!strcmp(name, "..") || !strncmp(name, "../", 3) ||
               strstr(name, "/../") ||
               (strlen(name) >= 3 && !strcmp(name + strlen(name) - 3, "/.."))) {
        snprintf(buf, len, "a path with '..'");
    } else if (!path_is_simple_name(name)) {
        snprintf(buf, len, "not a plain file name in the backup's folder");
    } else if ((seq = match_seq_name(name, "", ".qcow2"))) {
        snprintf(buf, len, "the file of backup %06u", seq);
    } else {
        snprintf(buf, len, "not a backup's file");
    }
}

typedef enum LinkCheck {
    LINK_OK,
    LINK_MISSING,                /* no backing file, the manifest names one */
    LINK_WRONG,                  /* any other difference */
} LinkCheck;

/* Check the backing reference bs's header records against the manifest of
 * backup `id` of `node` (parent_seq 0: a full, which has no backing file;
 * else exactly the parent's file name, "PARENT.qcow2", as backup writes
 * it, with backing format qcow2).  Sets errp unless LINK_OK. */
static LinkCheck check_link(const BlockDriverState *bs, const char *node,
                            const char *id, unsigned parent_seq, Error **errp)
{
    const char *name = bs->backing_file, *fmt = bs->backing_format;
    char want[REPO_ID_LEN + 8], pid[REPO_ID_LEN], what[64];
    _cleanup_free_ char *q = NULL;

    if (!parent_seq) {
        if (!name) {
            return LINK_OK;
        }
        q = quote_name(name);
        describe_backing_name(name, what, sizeof(what));
        error_setg(errp, "backup %s of %s is a full backup (its manifest names "
                   "no parent), but its file names the backing file '%s' (%s): "
                   "a full backup has no backing file", id, node, q, what);
        return LINK_WRONG;
    }
    repo_format_id(parent_seq, pid);
    snprintf(want, sizeof(want), "%s.qcow2", pid);
    if (!name) {
        error_setg(errp, "backup %s of %s: its file has no backing file, but "
                   "its manifest's parent is backup %s (expected backing "
                   "file '%s')", id, node, pid, want);
        return LINK_MISSING;
    }
    if (strcmp(name, want)) {
        q = quote_name(name);
        describe_backing_name(name, what, sizeof(what));
        error_setg(errp, "backup %s of %s: its file names the backing file "
                   "'%s' (%s), but its manifest's parent is backup %s: the "
                   "backing file must be '%s'", id, node, q, what, pid, want);
        return LINK_WRONG;
    }
    if (!fmt || strcmp(fmt, "qcow2")) {
        q = quote_name(fmt ? fmt : "none");
        error_setg(errp, "backup %s of %s: its file records the backing "
                   "format '%s' for '%s', not qcow2", id, node, q, want);
        return LINK_WRONG;
    }
    return LINK_OK;
}

/* path (a file of the repository) with symlinks resolved, when it is a
 * regular file inside the repository; an error otherwise.  Caller frees. */
static char *contained_path(Repo *repo, const char *path, Error **errp)
{
    _cleanup_free_ char *root = realpath(repo->path, NULL);
    _cleanup_free_ char *real = NULL;
    struct stat st;
    size_t n;

    if (!root) {
        error_setg_errno(errp, errno, "cannot resolve the repository '%s'",
                         repo->path);
        return NULL;
    }
    real = realpath(path, NULL);
    if (!real) {
        error_setg_errno(errp, errno, "cannot open '%s'", path);
        return NULL;
    }
    n = strcmp(root, "/") ? strlen(root) : 0;
    if (strncmp(real, root, n) || real[n] != '/') {
        _cleanup_free_ char *q = quote_name(real);
        error_setg(errp, "'%s' leads outside the repository (to '%s'): "
                   "a symbolic link out of the repository is not followed",
                   path, q);
        return NULL;
    }
    if (stat(real, &st) < 0) {
        error_setg_errno(errp, errno, "cannot open '%s'", path);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        error_setg(errp, "'%s' is not a regular file", path);
        return NULL;
    }
    return steal_pointer(&real);
}

RepoManifest *repo_pending_manifest(Repo *repo, const RepoManifest *m)
{
    _cleanup_free_ char *path = repo_tmp_manifest_path(repo, m->node, m->seq);
    uint8_t root[REPO_ROOT_LEN];
    RepoManifest *p;

    if (access(path, F_OK) < 0) {
        return NULL;
    }
    p = manifest_load(path, NULL);
    if (!p) {
        return NULL;
    }
    repo_merkle_root(p->hashes, p->n_hashes, root);
    if (p->seq != m->seq || strcmp(p->node, m->node) || p->parent_seq ||
        !p->synthetic || memcmp(root, p->merkle_root, REPO_ROOT_LEN)) {
        repo_manifest_free(p);
        return NULL;
    }
    return p;
}

/* Open path, the file of backup `id` of `node` whose manifest names
 * parent_seq, with flags and its backing disabled, check its link and put
 * it on top of *top (the chain of parent_seq as this code opened it, or
 * NULL for none; consumed).  pending_ok: a committed backup, for which a
 * missing link is the window of an interrupted prune when
 * repo_pending_manifest() has its synthetic full: then the layer is the
 * base of the chain and *top is dropped.  On success *top is the new top;
 * on failure *top is released and NULL. */
static bool push_layer(Repo *repo, const RepoManifest *m, const char *path,
                       int flags, bool pending_ok, BlockDriverState **top,
                       Error **errp)
{
    _cleanup_free_ char *real = contained_path(repo, path, errp);
    BlockDriverState *bs = NULL;
    Error *err = NULL;
    char id[REPO_ID_LEN];

    repo_format_id(m->seq, id);      /* m->id may not be set yet (new files) */

    if (!real) {
        error_prepend(errp, "backup %s of %s: ", id, m->node);
        goto out;
    }
    bs = bdrv_open_image(real, "qcow2", flags | BDRV_O_NO_BACKING, errp);
    if (!bs) {
        error_prepend(errp, "backup %s of %s: ", id, m->node);
        goto out;
    }
    switch (check_link(bs, m->node, id, m->parent_seq, &err)) {
    case LINK_OK:
        break;
    case LINK_MISSING:
        if (pending_ok) {
            RepoManifest *p = repo_pending_manifest(repo, m);
            if (p) {
                repo_manifest_free(p);
                error_free(err);
                err = NULL;
                bdrv_unref(*top);
                *top = NULL;
                break;
            }
        }
        /* fall through */
    case LINK_WRONG:
        error_propagate(errp, err);
        goto out;
    }
    if (*top) {
        if (!bdrv_set_backing(bs, *top, errp)) {
            error_prepend(errp, "backup %s of %s: ", id, m->node);
            goto out;
        }
        (*top)->user_owned = false;       /* now a child of bs */
        bdrv_unref(*top);
    }
    *top = steal_pointer(&bs);
    return true;
out:
    bdrv_unref(bs);
    bdrv_unref(*top);
    *top = NULL;
    return false;
}

BlockDriverState *repo_open_chain(Repo *repo, const RepoManifest *m,
                                  Error **errp)
{
    _cleanup_free_ RepoManifest **chain = NULL;
    BlockDriverState *top = NULL;
    size_t n;

    chain = repo_chain(repo, m, &n, errp);
    if (!chain) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        _cleanup_free_ char *path = repo_data_path(repo, m->node,
                                                   chain[i]->seq);
        if (!push_layer(repo, chain[i], path, 0, true, &top, errp)) {
            return NULL;
        }
    }
    return top;
}

BlockDriverState *repo_open_new(Repo *repo, const RepoManifest *m,
                                const char *path, int flags, Error **errp)
{
    BlockDriverState *top = NULL;

    if (m->parent_seq) {
        RepoManifest *p = repo_parent(repo, m);
        if (!p) {
            error_setg(errp, "backup %06u of %s: its parent %06u is missing "
                       "from %s", m->seq, m->node, m->parent_seq, repo->path);
            return NULL;
        }
        top = repo_open_chain(repo, p, errp);
        if (!top) {
            return NULL;
        }
    }
    return push_layer(repo, m, path, flags, false, &top, errp) ? top : NULL;
}

/* ---- Attempt markers and leftovers ---- */

static bool fsync_dir(const char *dir, Error **errp)
{
    _cleanup_close_ int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) < 0) {
        error_setg_errno(errp, errno, "cannot sync folder '%s'", dir);
        return false;
    }
    return true;
}

static bool ensure_node_dir(Repo *repo, const char *node, Error **errp)
{
    if (!node_name_valid(node)) {
        error_setg(errp, "invalid disk name '%s' for a repository folder "
                   "(1 to %d characters, no '/', not starting with '.')",
                   node, REPO_MAX_NODE_NAME);
        return false;
    }
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    if (mkdir(dir, 0777) == 0) {
        return fsync_dir(repo->path, errp);
    }
    if (errno != EEXIST) {
        error_setg_errno(errp, errno, "cannot create '%s'", dir);
        return false;
    }
    return true;
}

/* Write NODE/N.attempt as {"id": N, "started": started}: through a
 * temporary file and a rename, so a reader sees the old or the new
 * content, then sync the folder. */
static bool write_attempt(Repo *repo, const char *node, unsigned seq,
                          bool started, Error **errp)
{
    if (!ensure_node_dir(repo, node, errp)) {
        return false;
    }
    _cleanup_free_ char *path = repo_attempt_path(repo, node, seq);
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    _cleanup_free_ char *tmp = path_printf("%s/.%06u.attempt.tmp", dir, seq);
    _cleanup_close_ int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                                  0644);
    char text[64];
    int len = snprintf(text, sizeof(text), "{\"id\": \"%06u\", \"started\": %s}\n",
                       seq, started ? "true" : "false");

    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot create '%s'", tmp);
        return false;
    }
    int r = pwrite_full(fd, text, (size_t)len, 0);
    if (r == 0 && fsync(fd) < 0) {
        r = -errno;
    }
    if (r == 0 && rename(tmp, path) < 0) {
        r = -errno;
    }
    if (r < 0) {
        error_setg_errno(errp, -r, "cannot write '%s'", path);
        unlink(tmp);
        return false;
    }
    if (!fsync_dir(dir, errp)) {
        return false;
    }
    repo->max_seq = MAX(repo->max_seq, seq);
    return true;
}

bool repo_mark_attempt(Repo *repo, const char *node, unsigned seq,
                       Error **errp)
{
    return write_attempt(repo, node, seq, false, errp);
}

bool repo_mark_attempt_started(Repo *repo, const char *node, unsigned seq,
                               Error **errp)
{
    return write_attempt(repo, node, seq, true, errp);
}

bool repo_attempt_started(Repo *repo, const char *node, unsigned seq)
{
    _cleanup_free_ char *path = repo_attempt_path(repo, node, seq);
    _cleanup_json_ struct json_object *obj =
        parse_json_file(path, 4096, NULL);
    struct json_object *v;

    /* Unreadable or without the key: assume it started (the safe side:
     * its bitmap is then required). */
    if (!obj || !json_object_object_get_ex(obj, "started", &v) ||
        !json_object_is_type(v, json_type_boolean)) {
        return true;
    }
    return json_object_get_boolean(v);
}

static int cmp_unsigned(const void *a, const void *b)
{
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return x < y ? -1 : x > y;
}

static void seq_push(unsigned **seqs, size_t *n, unsigned seq)
{
    unsigned *ns = realloc(*seqs, (*n + 1) * sizeof(*ns));
    if (!ns) {
        abort();
    }
    *seqs = ns;
    ns[(*n)++] = seq;
}

unsigned *repo_attempts(Repo *repo, const char *node, size_t *ret_n)
{
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    _cleanup_(closedirp) DIR *d = opendir(dir);
    unsigned *seqs = NULL;
    size_t n = 0;
    struct dirent *de;

    *ret_n = 0;
    if (!d) {
        return NULL;
    }
    while ((de = readdir(d))) {
        unsigned seq = match_seq_name(de->d_name, "", ".attempt");
        if (seq && !repo_lookup(repo, node, seq)) {
            seq_push(&seqs, &n, seq);
        }
    }
    if (n) {
        qsort(seqs, n, sizeof(*seqs), cmp_unsigned);
    }
    *ret_n = n;
    return seqs;
}

unsigned *repo_seqs_since(Repo *repo, const char *node, unsigned from,
                          size_t *ret_n)
{
    unsigned *seqs = NULL;
    size_t n = 0, n_att = 0;
    _cleanup_free_ unsigned *att = repo_attempts(repo, node, &n_att);

    for (size_t i = 0; i < repo->n_backups; i++) {
        const RepoManifest *m = repo->backups[i];
        if (!strcmp(m->node, node) && m->seq >= from) {
            seq_push(&seqs, &n, m->seq);
        }
    }
    for (size_t i = 0; i < n_att; i++) {
        if (att[i] > from) {
            seq_push(&seqs, &n, att[i]);
        }
    }
    if (n) {
        qsort(seqs, n, sizeof(*seqs), cmp_unsigned);
    }
    *ret_n = n;
    return seqs;
}

void repo_remove_attempts_below(Repo *repo, const char *node, unsigned below)
{
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    _cleanup_(closedirp) DIR *d = opendir(dir);
    struct dirent *de;
    bool removed = false;

    if (!d) {
        return;
    }
    while ((de = readdir(d))) {
        unsigned seq = match_seq_name(de->d_name, "", ".attempt");
        if (seq && seq < below) {
            _cleanup_free_ char *p = path_printf("%s/%s", dir, de->d_name);
            removed |= unlink(p) == 0;
        }
    }
    if (removed) {
        fsync_dir(dir, NULL);
    }
}

bool repo_remove_attempt(Repo *repo, const char *node, unsigned seq,
                         Error **errp)
{
    _cleanup_free_ char *path = repo_attempt_path(repo, node, seq);
    _cleanup_free_ char *dir = repo_node_dir(repo, node);

    if (unlink(path) < 0 && errno != ENOENT) {
        error_setg_errno(errp, errno, "cannot remove '%s'", path);
        return false;
    }
    return fsync_dir(dir, errp);
}

void repo_remove_tmp_files(Repo *repo, const char *node)
{
    _cleanup_free_ char *dir = repo_node_dir(repo, node);
    _cleanup_(closedirp) DIR *d = opendir(dir);
    struct dirent *de;

    if (!d) {
        return;
    }
    while ((de = readdir(d))) {
        if (match_seq_name(de->d_name, ".", ".qcow2.tmp") ||
            match_seq_name(de->d_name, ".", ".json.tmp")) {
            _cleanup_free_ char *p = path_printf("%s/%s", dir, de->d_name);
            unlink(p);
        }
    }
}

/* ---- Hashing on a pool of threads ----
 *
 * repo_hash_extents splits the extents into batches of SCAN_BATCH bytes
 * (never crossing an extent) and hands them out, in order, from a cursor
 * under pool->lock.  Each thread (the caller's plus up to threads - 1
 * helpers) reads its batch with bdrv_pread into its own buffer and hashes
 * the batch's clusters into out[] at the index the cursor assigned, so the
 * result does not depend on which thread did what.
 *
 * Invariants (pool->lock protects every field below it):
 *   1. Batches are handed out in ascending offset order; batch k's hashes
 *      go to out[first_k ..], first_k = the number of clusters in batches
 *      before k.  Slots of out[] are written by exactly one thread.
 *   2. done only grows: it is the sum of the lengths of finished batches.
 *      Only the calling thread calls progress, with done under the lock
 *      read, so the callback sees a monotonic count from one thread; it
 *      reports the final done before returning, even when the helpers did
 *      every batch.
 *   3. After an error no new batch is handed out; err/err_offset keep the
 *      failed batch with the lowest offset.  Every batch below a handed
 *      out one was handed out too (1), so that is the first bad batch of
 *      the whole scan, whatever the thread count.
 *   4. The caller returns only after every helper it started has joined.
 */

typedef struct HashPool {
    BlockDriverState *bs;
    const RepoExtent *ext;
    size_t n_ext;
    RepoHash *out;

    pthread_mutex_t lock;
    pthread_cond_t cond;          /* a batch finished */
    size_t cur_ext;               /* cursor: next batch */
    uint64_t cur_off;
    size_t cur_hash;
    uint64_t done;
    uint64_t reported;            /* done as last reported (caller only) */
    unsigned running;             /* helpers not yet finished */
    int err;
    uint64_t err_offset;
} HashPool;

static unsigned hash_threads_override;

void repo_set_hash_threads(unsigned n)
{
    hash_threads_override = MIN(n, REPO_MAX_HASH_THREADS);
}

unsigned repo_hash_threads(void)
{
    if (hash_threads_override) {
        return hash_threads_override;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) {
        return 1;
    }
    return (unsigned)MIN(n, (long)REPO_DEFAULT_HASH_THREADS);
}

/* Take the next batch: false when none is left or after an error. */
static bool hash_pool_next_locked(HashPool *p, uint64_t *ret_off,
                                  uint64_t *ret_len, size_t *ret_first)
{
    while (p->cur_ext < p->n_ext &&
           p->cur_off >= p->ext[p->cur_ext].start + p->ext[p->cur_ext].length) {
        p->cur_ext++;
        if (p->cur_ext < p->n_ext) {
            p->cur_off = p->ext[p->cur_ext].start;
        }
    }
    if (p->err || p->cur_ext == p->n_ext) {
        return false;
    }
    uint64_t end = p->ext[p->cur_ext].start + p->ext[p->cur_ext].length;
    *ret_off = p->cur_off;
    *ret_len = MIN((uint64_t)SCAN_BATCH, end - p->cur_off);
    *ret_first = p->cur_hash;
    p->cur_off += *ret_len;
    p->cur_hash += DIV_ROUND_UP(*ret_len, REPO_CLUSTER_SIZE);
    return true;
}

/* Read and hash one batch into p->out[first ..].  0 or -errno. */
static int hash_batch(HashPool *p, uint8_t *buf, uint64_t off, uint64_t len,
                      size_t first)
{
    int r = bdrv_pread(p->bs, off, buf, len);
    if (r < 0) {
        return r;
    }
    for (uint64_t c = 0; c < len; c += REPO_CLUSTER_SIZE) {
        RepoHash *h = &p->out[first++];
        h->cluster = (off + c) / REPO_CLUSTER_SIZE;
        repo_hash_cluster(buf + c, MIN(REPO_CLUSTER_SIZE, len - c), h->hash);
    }
    return 0;
}

/* Take and do batches until none is left.  progress is non-NULL only in
 * the calling thread, which reports after each of its own batches;
 * helpers wake it instead (pool->cond). */
static void hash_pool_work(HashPool *p, uint8_t *buf, RepoProgressFn *progress,
                           void *opaque, uint64_t base, uint64_t total)
{
    uint64_t off, len;
    size_t first;

    pthread_mutex_lock(&p->lock);
    while (hash_pool_next_locked(p, &off, &len, &first)) {
        pthread_mutex_unlock(&p->lock);
        int r = hash_batch(p, buf, off, len, first);
        pthread_mutex_lock(&p->lock);
        if (r < 0) {
            if (!p->err || off < p->err_offset) {
                p->err = r;
                p->err_offset = off;
            }
        } else {
            p->done += len;
        }
        if (progress) {
            uint64_t done = p->done;
            p->reported = done;
            pthread_mutex_unlock(&p->lock);
            progress(opaque, base + done, total);
            pthread_mutex_lock(&p->lock);
        } else {
            pthread_cond_broadcast(&p->cond);
        }
    }
    pthread_mutex_unlock(&p->lock);
}

static void *hash_pool_helper(void *opaque)
{
    HashPool *p = opaque;
    uint8_t *buf = malloc(SCAN_BATCH);

    if (buf) {
        hash_pool_work(p, buf, NULL, NULL, 0, 0);
        free(buf);
    }
    /* Without a buffer this helper does nothing; the others cover. */
    pthread_mutex_lock(&p->lock);
    p->running--;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int repo_hash_extents(BlockDriverState *bs, const RepoExtent *ext,
                      size_t n_ext, RepoHash *out, RepoProgressFn *progress,
                      void *opaque, uint64_t base, uint64_t total,
                      uint64_t *ret_err_offset)
{
    HashPool p = {
        .bs = bs, .ext = ext, .n_ext = n_ext, .out = out,
        .cur_off = n_ext ? ext[0].start : 0,
    };
    pthread_t tids[REPO_MAX_HASH_THREADS];
    unsigned n_tids = 0;
    uint64_t n_batches = 0;
    _cleanup_free_ uint8_t *buf = malloc(SCAN_BATCH);

    if (!buf) {
        return -ENOMEM;
    }
    for (size_t i = 0; i < n_ext; i++) {
        n_batches += DIV_ROUND_UP(ext[i].length, SCAN_BATCH);
    }
    pthread_mutex_init(&p.lock, NULL);
    pthread_cond_init(&p.cond, NULL);

    /* Helpers: never more than there are batches for. */
    unsigned want = (unsigned)MIN((uint64_t)repo_hash_threads(), n_batches);
    for (unsigned i = 1; i < want; i++) {
        pthread_mutex_lock(&p.lock);
        p.running++;
        pthread_mutex_unlock(&p.lock);
        if (pthread_create(&tids[n_tids], NULL, hash_pool_helper, &p) != 0) {
            /* Fewer threads only make it slower. */
            pthread_mutex_lock(&p.lock);
            p.running--;
            pthread_mutex_unlock(&p.lock);
            break;
        }
        n_tids++;
    }

    hash_pool_work(&p, buf, progress, opaque, base, total);

    /* Wait for the helpers, reporting their progress (invariant 2). */
    pthread_mutex_lock(&p.lock);
    uint64_t reported = p.reported;
    for (;;) {
        if (progress && p.done != reported) {
            reported = p.done;
            pthread_mutex_unlock(&p.lock);
            progress(opaque, base + reported, total);
            pthread_mutex_lock(&p.lock);
            continue;            /* more may have finished meanwhile */
        }
        if (!p.running) {
            break;
        }
        pthread_cond_wait(&p.cond, &p.lock);
    }
    pthread_mutex_unlock(&p.lock);
    for (unsigned i = 0; i < n_tids; i++) {
        pthread_join(tids[i], NULL);
    }
    pthread_cond_destroy(&p.cond);
    pthread_mutex_destroy(&p.lock);
    if (p.err && ret_err_offset) {
        *ret_err_offset = p.err_offset;
    }
    return p.err;
}

/* ---- Scanning a backup file ---- */

static bool extents_append(RepoExtent **ext, size_t *n, size_t *cap,
                           uint64_t start, uint64_t end)
{
    if (*n && start <= (*ext)[*n - 1].start + (*ext)[*n - 1].length) {
        RepoExtent *last = &(*ext)[*n - 1];
        last->length = MAX(last->start + last->length, end) - last->start;
        return true;
    }
    if (*n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 16;
        RepoExtent *ne = realloc(*ext, ncap * sizeof(*ne));
        if (!ne) {
            return false;
        }
        *ext = ne;
        *cap = ncap;
    }
    (*ext)[(*n)++] = (RepoExtent){ .start = start, .length = end - start };
    return true;
}

bool repo_scan_backup(Repo *repo, const char *qcow2_path, RepoManifest *m,
                      RepoProgressFn *progress, void *opaque, Error **errp)
{
    BlockDriverState *bs = repo_open_new(repo, m, qcow2_path, 0, errp);
    bool ok;

    if (!bs) {
        error_prepend(errp, "cannot open backup '%s': ", qcow2_path);
        return false;
    }
    ok = repo_scan_node(bs, qcow2_path, m, progress, opaque, errp);
    bdrv_unref(bs);
    return ok;
}

bool repo_scan_node(BlockDriverState *bs, const char *qcow2_path,
                    RepoManifest *m, RepoProgressFn *progress, void *opaque,
                    Error **errp)
{
    _cleanup_free_ RepoExtent *ext = NULL;
    _cleanup_free_ RepoHash *hashes = NULL;
    size_t n_ext = 0, cap = 0, n_hashes = 0;
    uint64_t total = 0;
    int64_t len = bdrv_getlength(bs);
    if (len < 0) {
        error_setg_errno(errp, (int)-len, "%s: cannot get the image size",
                         qcow2_path);
        return false;
    }
    uint64_t size = (uint64_t)len;
    if (m->image_size && m->image_size != size) {
        error_setg(errp, "%s: the image is %" PRIu64 " bytes, expected %" PRIu64,
                   qcow2_path, size, m->image_size);
        return false;
    }

    /* 1. The clusters allocated in this layer, as merged extents. */
    for (uint64_t off = 0; off < size;) {
        uint64_t pnum = 0;
        int r = bdrv_is_allocated(bs, off, size - off, &pnum);
        if (r < 0) {
            error_setg_errno(errp, -r, "%s: cannot read the allocation at "
                             "offset %" PRIu64, qcow2_path, off);
            return false;
        }
        if (pnum == 0) {
            error_setg(errp, "%s: the allocation status at offset %" PRIu64
                       " makes no progress", qcow2_path, off);
            return false;
        }
        if (r) {
            uint64_t s = ROUND_DOWN(off, REPO_CLUSTER_SIZE);
            uint64_t e = MIN(ROUND_UP(off + pnum, REPO_CLUSTER_SIZE), size);
            if (!extents_append(&ext, &n_ext, &cap, s, e)) {
                error_setg(errp, "out of memory");
                return false;
            }
        }
        off += pnum;
    }
    uint64_t n_clusters = 0;
    for (size_t i = 0; i < n_ext; i++) {
        total += ext[i].length;
        n_clusters += DIV_ROUND_UP(ext[i].length, REPO_CLUSTER_SIZE);
    }
    hashes = calloc(n_clusters ? n_clusters : 1, sizeof(*hashes));
    if (!hashes) {
        error_setg(errp, "out of memory");
        return false;
    }

    /* 2. Read them through the chain in big batches and hash each cluster,
     *    on a pool of threads. */
    if (progress) {
        progress(opaque, 0, total);
    }
    uint64_t err_off = 0;
    int r = repo_hash_extents(bs, ext, n_ext, hashes, progress, opaque, 0,
                              total, &err_off);
    if (r < 0) {
        if (r == -ENOMEM) {
            error_setg(errp, "out of memory");
        } else {
            error_setg_errno(errp, -r, "%s: read error at offset %" PRIu64,
                             qcow2_path, err_off);
        }
        return false;
    }
    n_hashes = (size_t)n_clusters;

    free(m->extents);
    free(m->hashes);
    m->extents = steal_pointer(&ext);
    m->n_extents = n_ext;
    m->hashes = steal_pointer(&hashes);
    m->n_hashes = n_hashes;
    m->image_size = size;
    m->cluster_size = REPO_CLUSTER_SIZE;
    m->changed_bytes = total;
    repo_merkle_root(m->hashes, m->n_hashes, m->merkle_root);
    return true;
}

/* ---- Commit ---- */

bool repo_fsync_path(const char *path, Error **errp)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        error_setg_errno(errp, errno, "cannot open '%s'", path);
        return false;
    }
    if (fsync(fd) < 0) {
        error_setg_errno(errp, errno, "cannot sync '%s'", path);
        return false;
    }
    return true;
}

bool repo_commit(Repo *repo, RepoManifest *m, Error **errp)
{
    if (!m->seq || m->seq > REPO_MAX_SEQ || !m->node || !node_name_valid(m->node)) {
        error_setg(errp, "cannot commit: the backup has no valid ID or disk name");
        return false;
    }
    repo_format_id(m->seq, m->id);
    if (!m->cluster_size) {
        m->cluster_size = REPO_CLUSTER_SIZE;
    }
    _cleanup_free_ char *dir = repo_node_dir(repo, m->node);
    _cleanup_free_ char *tmp_data = repo_tmp_data_path(repo, m->node, m->seq);
    _cleanup_free_ char *tmp_json = repo_tmp_manifest_path(repo, m->node, m->seq);
    _cleanup_free_ char *data = repo_data_path(repo, m->node, m->seq);
    _cleanup_free_ char *json = repo_manifest_path(repo, m->node, m->seq);
    _cleanup_free_ char *attempt = repo_attempt_path(repo, m->node, m->seq);
    struct stat st;

    if (access(json, F_OK) == 0) {
        error_setg(errp, "cannot commit backup %s of %s: %s already exists",
                   m->id, m->node, json);
        return false;
    }
    /* 1. The data is durable. */
    if (!repo_fsync_path(tmp_data, errp)) {
        return false;
    }
    if (stat(tmp_data, &st) < 0) {
        error_setg_errno(errp, errno, "cannot stat '%s'", tmp_data);
        return false;
    }
    m->stored_bytes = (uint64_t)st.st_blocks * 512;

    /* 2. The manifest, in its temporary file, is durable. */
    {
        _cleanup_json_ struct json_object *obj = repo_manifest_to_json(m, true);
        /* Never write a manifest that readers would refuse. */
        RepoManifest *check = repo_manifest_from_json(obj, tmp_json, errp);
        if (!check) {
            error_prepend(errp, "cannot commit backup %s of %s: ", m->id,
                          m->node);
            return false;
        }
        repo_manifest_free(check);
        const char *text = json_object_to_json_string_ext(
            obj, JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE);
        _cleanup_close_ int fd = open(tmp_json, O_WRONLY | O_CREAT | O_TRUNC |
                                      O_CLOEXEC, 0644);
        if (fd < 0) {
            error_setg_errno(errp, errno, "cannot create '%s'", tmp_json);
            return false;
        }
        int r = pwrite_full(fd, text, strlen(text), 0);
        if (r == 0) {
            r = pwrite_full(fd, "\n", 1, (off_t)strlen(text));
        }
        if (r == 0 && fsync(fd) < 0) {
            r = -errno;
        }
        if (r < 0) {
            error_setg_errno(errp, -r, "cannot write '%s'", tmp_json);
            unlink(tmp_json);
            return false;
        }
    }

    /* 3. Data, then manifest, into place; the folder is durable. */
    if (rename(tmp_data, data) < 0) {
        error_setg_errno(errp, errno, "cannot rename '%s' to '%s'", tmp_data,
                         data);
        return false;
    }
    if (rename(tmp_json, json) < 0) {
        error_setg_errno(errp, errno, "cannot rename '%s' to '%s'", tmp_json,
                         json);
        return false;
    }
    if (!fsync_dir(dir, errp)) {
        return false;
    }
    /* 4. The backup exists: its attempt marker is no longer needed. */
    unlink(attempt);
    return repo_reload(repo, errp);
}
