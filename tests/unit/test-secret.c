/*
 * Unit tests for src/crypto/secret.c through the object registry: the
 * bytes secret_lookup returns for data and file secrets, raw and base64
 * (against the plain bytes they encode), and its errors.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "crypto/object.h"
#include "crypto/secret.h"

static void add(const char *json)
{
    Error *err = NULL;
    struct json_object *o = json_tokener_parse(json);
    assert_non_null(o);
    bool ok = object_add(o, &err);
    if (!ok) {
        fail_msg("object_add %s: %s", json, error_get_pretty(err));
    }
    json_object_put(o);
}

static void expect(const char *id, const void *bytes, size_t len)
{
    Error *err = NULL;
    uint8_t *data = NULL;
    size_t n = 0;
    assert_true(secret_lookup(id, &data, &n, &err));
    assert_null(err);
    assert_int_equal(n, len);
    assert_memory_equal(data, bytes, len);
    assert_int_equal(data[n], 0);
    free(data);
}

static void test_lookup(void **state)
{
    char path[] = "/tmp/test-secret-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    /* base64 of the bytes 00 ff 10 'a' */
    assert_int_equal(write(fd, "AP8QYQ==", 8), 8);
    close(fd);

    add("{\"qom-type\": \"secret\", \"id\": \"s0\", \"data\": \"pass word\"}");
    add("{\"qom-type\": \"secret\", \"id\": \"s1\", \"data\": \"AP8QYQ==\","
        " \"format\": \"base64\"}");
    char json[256];
    snprintf(json, sizeof(json), "{\"qom-type\": \"secret\", \"id\": \"s2\","
             " \"file\": \"%s\", \"format\": \"base64\"}", path);
    add(json);
    snprintf(json, sizeof(json), "{\"qom-type\": \"secret\", \"id\": \"s3\","
             " \"file\": \"%s\"}", path);
    add(json);
    add("{\"qom-type\": \"secret\", \"id\": \"s4\", \"data\": \"\"}");
    add("{\"qom-type\": \"authz-simple\", \"id\": \"a0\", "
        "\"identity\": \"x\"}");
    unlink(path);

    expect("s0", "pass word", 9);
    expect("s1", "\x00\xff\x10" "a", 4);
    expect("s2", "\x00\xff\x10" "a", 4);
    expect("s3", "AP8QYQ==", 8);      /* read once, at creation */
    expect("s4", "", 0);

    Error *err = NULL;
    uint8_t *data = NULL;
    size_t n = 0;
    assert_false(secret_lookup("nope", &data, &n, &err));
    assert_string_equal(error_get_pretty(err), "No secret with id 'nope'");
    error_free(err);
    err = NULL;
    assert_false(secret_lookup("a0", &data, &n, &err));
    assert_string_equal(error_get_pretty(err),
                        "Object with id 'a0' is not a secret");
    error_free(err);
    assert_null(data);

    err = NULL;
    assert_true(object_del("s0", &err));
    err = NULL;
    assert_false(secret_lookup("s0", &data, &n, &err));
    error_free(err);
    object_del_all();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lookup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
