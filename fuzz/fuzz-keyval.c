/*
 * libFuzzer target: util/keyval, the parser of the --blockdev, --nbd-server,
 * --export, --chardev, --monitor and -o option strings (keyval syntax, or a
 * JSON object when the string starts with '{'), and the scalar converters
 * its callers apply to the values.
 *
 * Input: one byte selecting the implied key (byte % 5: none, "driver",
 * "backend", "type", "chardev": the keys bitbackd implies), then the
 * option string.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <json-c/json.h>

#include "util/cleanup.h"
#include "util/error.h"
#include "util/keyval.h"
#include "fuzz-util.h"

/* Apply the scalar converters to every string value, as callers do. */
static void convert_values(struct json_object *obj)
{
    if (json_object_is_type(obj, json_type_object)) {
        json_object_object_foreach(obj, key, val) {
            (void)key;
            convert_values(val);
        }
    } else if (json_object_is_type(obj, json_type_array)) {
        size_t n = json_object_array_length(obj);
        for (size_t i = 0; i < n; i++) {
            convert_values(json_object_array_get_idx(obj, i));
        }
    } else if (json_object_is_type(obj, json_type_string)) {
        const char *s = json_object_get_string(obj);
        bool b;
        int64_t v;
        (void)keyval_str_to_bool(s, &b);
        (void)keyval_str_to_int(s, &v);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const implied[] = {
        NULL, "driver", "backend", "type", "chardev",
    };
    if (size < 1) {
        return 0;
    }
    const char *key = implied[data[0] % ARRAY_SIZE(implied)];
    _cleanup_free_ char *s = fuzz_strndup(data + 1, size - 1);
    if (!s) {
        return 0;
    }
    Error *err = NULL;
    struct json_object *obj = keyval_parse_or_json(s, key, &err);
    if (obj) {
        convert_values(obj);
        /* serializing walks every node the parser built */
        (void)json_object_to_json_string(obj);
        json_object_put(obj);
    } else {
        (void)error_get_pretty(err);
        error_free(err);
    }
    return 0;
}
