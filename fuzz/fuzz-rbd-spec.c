/*
 * libFuzzer target: the `rbd:` name parser (rbd_spec_parse in
 * src/block/drivers/rbd.c), the one parser of RBD disk names
 * ("rbd:POOL/[NS/]IMAGE[@SNAP][:key=value...]", from --blockdev filename=,
 * qemu-img style arguments and `bitback img`) and of cluster repositories
 * (`--repo rbd:POOL[/NS]`).  No cluster is contacted.
 *
 * Input: one byte whose low bit says whether an image is required (disk
 * names) or not (repository names), then the name; names that do not
 * start with "rbd:" get it prepended half of the time (the second bit), so
 * the fuzzer spends its time past the prefix.
 *
 * Checked on every accepted name: the parts the name must have are there,
 * each is no longer than the name, and the Ceph options are an object of
 * strings.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <json-c/json.h>

#include "block/drivers/rbd.h"
#include "util/cleanup.h"
#include "util/error.h"
#include "fuzz-util.h"

static void check_part(const char *part, size_t max, bool required)
{
    if (!part) {
        if (required) {
            abort();
        }
        return;
    }
    if (strlen(part) > max) {
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    bool image_required = data[0] & 1;
    bool prefix = data[0] & 2;
    _cleanup_free_ char *body = fuzz_strndup(data + 1, size - 1);
    if (!body) {
        return 0;
    }
    _cleanup_free_ char *name = malloc(strlen(body) + 5);
    if (!name) {
        return 0;
    }
    strcpy(name, prefix && strncmp(body, "rbd:", 4) ? "rbd:" : "");
    strcat(name, body);

    RBDSpec sp = { 0 };
    Error *err = NULL;
    size_t max = strlen(name);
    if (rbd_spec_parse(name, image_required, &sp, &err)) {
        check_part(sp.pool, max, true);
        check_part(sp.image, max, image_required);
        check_part(sp.ns, max, false);
        check_part(sp.snap, max, false);
        check_part(sp.conf, max, false);
        check_part(sp.user, max, false);
        if (sp.conf_pairs) {
            if (!json_object_is_type(sp.conf_pairs, json_type_object)) {
                abort();
            }
            json_object_object_foreach(sp.conf_pairs, k, v) {
                check_part(k, max, true);
                if (!json_object_is_type(v, json_type_string)) {
                    abort();
                }
                check_part(json_object_get_string(v), max, true);
            }
        }
    } else {
        (void)error_get_pretty(err);
        error_free(err);
    }
    rbd_spec_clear(&sp);
    return 0;
}
