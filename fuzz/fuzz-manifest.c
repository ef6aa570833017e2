/*
 * libFuzzer target: the repository manifest reader (src/repo/manifest.c,
 * docs/specs/repository.md): the text of NODE/ID.json as
 * repo_manifest_load() sees it, parsed by repo_parse_json_text() and
 * validated by repo_manifest_from_json().  A manifest it accepts is
 * serialized again (repo_manifest_to_json, full) and must validate again
 * to the same JSON: the writer never writes what the reader refuses.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <json-c/json.h>

#include "repo/repo.h"
#include "repo/repo-internal.h"
#include "util/cleanup.h"
#include "util/error.h"
#include "fuzz-util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    _cleanup_free_ char *text = fuzz_strndup(data, size);
    if (!text) {
        return 0;
    }
    Error *err = NULL;
    _cleanup_json_ struct json_object *obj =
        repo_parse_json_text(text, "fuzz", &err);
    if (!obj) {
        error_free(err);
        return 0;
    }
    RepoManifest *m = repo_manifest_from_json(obj, "fuzz", &err);
    if (!m) {
        error_free(err);
        return 0;
    }
    _cleanup_json_ struct json_object *out = repo_manifest_to_json(m, true);
    RepoManifest *m2 = repo_manifest_from_json(out, "fuzz (re-read)", &err);
    if (!m2) {
        fprintf(stderr, "manifest does not re-validate: %s\n%s\n",
                error_get_pretty(err), json_object_to_json_string(out));
        abort();
    }
    _cleanup_json_ struct json_object *out2 = repo_manifest_to_json(m2, true);
    if (!json_object_equal(out, out2)) {
        fprintf(stderr, "manifest round trip differs:\n%s\n%s\n",
                json_object_to_json_string(out),
                json_object_to_json_string(out2));
        abort();
    }
    repo_manifest_free(m2);
    repo_manifest_free(m);
    return 0;
}
