/*
 * The names of the repository (docs/specs/repository.md, "Layout"): every
 * file name the repository protocol uses is built and recognised here, and
 * only here:
 *   REPO/NODE/ID.qcow2, REPO/NODE/ID.json           a committed backup
 *   REPO/NODE/.ID.qcow2.tmp, REPO/NODE/.ID.json.tmp the same, not committed
 *   REPO/NODE/ID.attempt, REPO/NODE/.ID.attempt.tmp a run's attempt marker
 * with ID the "%06u" of the backup's number.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/cutils.h"

void repo_format_id(unsigned seq, char *buf)
{
    snprintf(buf, REPO_ID_LEN, "%06u", seq);
}

unsigned repo_parse_seq_digits(const char *s, const char *end)
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
    unsigned seq = repo_parse_seq_digits(p, NULL);
    if (!seq) {
        error_setg(errp, "invalid backup ID '%s': expected a number from 1 "
                   "to %u or 'latest'", s, REPO_MAX_SEQ);
        return false;
    }
    *ret_seq = seq;
    return true;
}

bool repo_node_name_valid(const char *name)
{
    size_t n = strlen(name);
    return n > 0 && n <= REPO_MAX_NODE_NAME && name[0] != '.' &&
           !strchr(name, '/');
}

bool repo_check_node_name(const char *name, Error **errp)
{
    if (!repo_node_name_valid(name)) {
        error_setg(errp, "invalid disk name '%s' for a repository folder "
                   "(1 to %d characters, no '/', not starting with '.')",
                   name, REPO_MAX_NODE_NAME);
        return false;
    }
    return true;
}

unsigned repo_match_seq_name(const char *name, const char *prefix,
                             const char *suffix)
{
    size_t lp = strlen(prefix), ls = strlen(suffix), ln = strlen(name);
    char buf[REPO_ID_LEN];

    if (ln <= lp + ls || strncmp(name, prefix, lp) ||
        strcmp(name + ln - ls, suffix)) {
        return 0;
    }
    unsigned seq = repo_parse_seq_digits(name + lp, name + ln - ls);
    if (!seq) {
        return 0;
    }
    repo_format_id(seq, buf);
    if (strlen(buf) != ln - lp - ls || strncmp(buf, name + lp, ln - lp - ls)) {
        return 0;                          /* "7.json": not ours */
    }
    return seq;
}

char *repo_path_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *p = vstrprintf(fmt, ap);
    va_end(ap);
    if (!p) {
        abort();
    }
    return p;
}

char *repo_node_dir(Repo *repo, const char *node)
{
    return repo_path_printf("%s/%s", repo->path, node);
}

/* REPO/NODE/<prefix>ID<suffix>: the one place a backup's file names are
 * built (repo_file_kind recognises the same names). */
static char *seq_path(Repo *repo, const char *node, const char *prefix,
                      unsigned seq, const char *suffix)
{
    return repo_path_printf("%s/%s/%s%06u%s", repo->path, node, prefix, seq,
                            suffix);
}

/* The named paths of a backup's files, each one seq_path. */
#define SEQ_PATH_FN(fn, prefix, suffix)                         \
    char *fn(Repo *repo, const char *node, unsigned seq)        \
    {                                                           \
        return seq_path(repo, node, prefix, seq, suffix);       \
    }

SEQ_PATH_FN(repo_data_path, "", ".qcow2")
SEQ_PATH_FN(repo_manifest_path, "", ".json")
SEQ_PATH_FN(repo_tmp_data_path, ".", ".qcow2.tmp")
SEQ_PATH_FN(repo_tmp_manifest_path, ".", ".json.tmp")
SEQ_PATH_FN(repo_attempt_path, "", ".attempt")
SEQ_PATH_FN(repo_tmp_attempt_path, ".", ".attempt.tmp")
SEQ_PATH_FN(repo_tmp_index_path, ".", ".idx.tmp")

/* "ID-XXXXXXXXXXXXXXXX.idx" (16 lower-case hex digits): an index file
 * (index.c names it after its backup's Merkle root).  Its seq, or 0. */
static unsigned index_name_seq(const char *name)
{
    static const char tail[] = "-XXXXXXXXXXXXXXXX.idx";
    size_t ln = strlen(name), lt = sizeof(tail) - 1;
    char id[REPO_ID_LEN];

    if (ln <= lt || ln - lt >= sizeof(id) || strcmp(name + ln - 4, ".idx") ||
        name[ln - lt] != '-') {
        return 0;
    }
    for (size_t i = ln - lt + 1; i < ln - 4; i++) {
        if (!strchr("0123456789abcdef", name[i])) {
            return 0;
        }
    }
    memcpy(id, name, ln - lt);
    id[ln - lt] = '\0';
    return repo_match_seq_name(id, "", "");
}

RepoFileKind repo_file_kind(const char *name, unsigned *ret_seq)
{
    static const struct {
        RepoFileKind kind;
        const char *prefix, *suffix;
    } names[] = {
        { REPO_FILE_MANIFEST, "", ".json" },
        { REPO_FILE_ATTEMPT, "", ".attempt" },
        { REPO_FILE_DATA, "", ".qcow2" },
        { REPO_FILE_TMP_DATA, ".", ".qcow2.tmp" },
        { REPO_FILE_TMP_MANIFEST, ".", ".json.tmp" },
        { REPO_FILE_TMP_INDEX, ".", ".idx.tmp" },
    };

    for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
        unsigned seq = repo_match_seq_name(name, names[i].prefix,
                                           names[i].suffix);
        if (seq) {
            *ret_seq = seq;
            return names[i].kind;
        }
    }
    *ret_seq = index_name_seq(name);
    return *ret_seq ? REPO_FILE_INDEX : REPO_FILE_OTHER;
}
