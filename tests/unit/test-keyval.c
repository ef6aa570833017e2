/*
 * Unit tests for util/keyval: QEMU's dotted key=value syntax.  Each case
 * parses an option string and compares the result with the JSON it must
 * equal (parsed by json-c, compared structurally), or checks that the
 * error names the offending parameter.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "util/keyval.h"

static void assert_parses_to(const char *params, const char *implied,
                             const char *expect_json)
{
    Error *err = NULL;
    struct json_object *got = keyval_parse(params, implied, &err);
    if (!got) {
        fail_msg("'%s' failed: %s", params, error_get_pretty(err));
    }
    struct json_object *want = json_tokener_parse(expect_json);
    assert_non_null(want);
    if (!json_object_equal(got, want)) {
        fail_msg("'%s' gave %s, want %s", params,
                 json_object_to_json_string(got), expect_json);
    }
    json_object_put(got);
    json_object_put(want);
}

static void assert_fails_with(const char *params, const char *implied,
                              const char *substr)
{
    Error *err = NULL;
    struct json_object *got = keyval_parse(params, implied, &err);
    if (got) {
        fail_msg("'%s' should fail, gave %s", params,
                 json_object_to_json_string(got));
    }
    assert_non_null(err);
    if (!strstr(error_get_pretty(err), substr)) {
        fail_msg("'%s': error '%s' lacks '%s'", params, error_get_pretty(err),
                 substr);
    }
    error_free(err);
}

static void test_flat(void **state)
{
    assert_parses_to("", NULL, "{}");
    assert_parses_to("a=1", NULL, "{\"a\":\"1\"}");
    assert_parses_to("a=1,b=two", NULL, "{\"a\":\"1\",\"b\":\"two\"}");
    assert_parses_to("a=", NULL, "{\"a\":\"\"}");
    assert_parses_to("a=1,", NULL, "{\"a\":\"1\"}");
    assert_parses_to("node-name=d_0", NULL, "{\"node-name\":\"d_0\"}");
}

static void test_nested(void **state)
{
    assert_parses_to("driver=qbm,node-name=disk0,file.driver=file,"
                     "file.filename=disk.qbm", NULL,
                     "{\"driver\":\"qbm\",\"node-name\":\"disk0\","
                     "\"file\":{\"driver\":\"file\",\"filename\":\"disk.qbm\"}}");
    assert_parses_to("a.b.c=1,a.b.d=2,a.e=3", NULL,
                     "{\"a\":{\"b\":{\"c\":\"1\",\"d\":\"2\"},\"e\":\"3\"}}");
    assert_parses_to("addr.type=unix,addr.path=/run/x/nbd.sock", NULL,
                     "{\"addr\":{\"type\":\"unix\",\"path\":\"/run/x/nbd.sock\"}}");
}

static void test_escape(void **state)
{
    assert_parses_to("filename=a,,b.qbm", NULL, "{\"filename\":\"a,b.qbm\"}");
    assert_parses_to("x=,,,,,y=1", NULL, "{\"x\":\",,\",\"y\":\"1\"}");
    assert_parses_to("x=a=b", NULL, "{\"x\":\"a=b\"}");
}

static void test_lists(void **state)
{
    assert_parses_to("bitmaps.0=b0,bitmaps.1=b1", NULL,
                     "{\"bitmaps\":[\"b0\",\"b1\"]}");
    /* Order of the indexes on the command line does not matter. */
    assert_parses_to("bitmaps.1=b1,bitmaps.0=b0", NULL,
                     "{\"bitmaps\":[\"b0\",\"b1\"]}");
    assert_parses_to("l.0.node=n,l.0.name=b", NULL,
                     "{\"l\":[{\"node\":\"n\",\"name\":\"b\"}]}");
    assert_parses_to("m.0.0=x,m.0.1=y,m.1.0=z", NULL,
                     "{\"m\":[[\"x\",\"y\"],[\"z\"]]}");
    assert_fails_with("bitmaps.0=b0,bitmaps.2=b2", NULL, "'bitmaps.1' missing");
    assert_fails_with("l.0=a,l.x=b", NULL, "'l'");
    assert_fails_with("0=a", NULL, "Invalid parameter");
}

static void test_implied(void **state)
{
    assert_parses_to("socket,path=/tmp/q.sock,server=on,wait=off,id=m0",
                     "backend",
                     "{\"backend\":\"socket\",\"path\":\"/tmp/q.sock\","
                     "\"server\":\"on\",\"wait\":\"off\",\"id\":\"m0\"}");
    assert_parses_to("m0", "chardev", "{\"chardev\":\"m0\"}");
    assert_parses_to("chardev=m0", "chardev", "{\"chardev\":\"m0\"}");
    /* Only the first parameter may omit its key. */
    assert_fails_with("a=1,socket", "backend", "'socket'");
    assert_fails_with("socket", NULL, "Expected '=' after parameter 'socket'");
}

static void test_errors(void **state)
{
    assert_fails_with("=1", NULL, "Invalid parameter ''");
    assert_fails_with("a..b=1", NULL, "Invalid parameter 'a..b'");
    assert_fails_with("a.=1", NULL, "Invalid parameter 'a.'");
    assert_fails_with("a b=1", NULL, "Invalid parameter 'a b'");
    assert_fails_with("a=1,a.b=2", NULL, "'a.*' used inconsistently");
    assert_fails_with("a.b=2,a=1", NULL, "'a.*' used inconsistently");
}

static void test_last_wins(void **state)
{
    assert_parses_to("a=1,a=2", NULL, "{\"a\":\"2\"}");
    assert_parses_to("x.a=1,x.a=2,x.b=3", NULL, "{\"x\":{\"a\":\"2\",\"b\":\"3\"}}");
}

static void test_json(void **state)
{
    Error *err = NULL;
    struct json_object *o = keyval_parse_or_json(
        "{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"d\"}}",
        NULL, &err);
    assert_non_null(o);
    struct json_object *file;
    assert_true(json_object_object_get_ex(o, "file", &file));
    assert_true(json_object_is_type(file, json_type_object));
    json_object_put(o);

    o = keyval_parse_or_json("{\"a\": ", NULL, &err);
    assert_null(o);
    assert_non_null(strstr(error_get_pretty(err), "JSON parse error"));
    error_free(err);
    err = NULL;

    /* keyval form through the same entry point */
    o = keyval_parse_or_json("a=1", NULL, &err);
    assert_non_null(o);
    json_object_put(o);

    /* Explicit limits: 31 levels of nesting parse, 32 do not (json-c keeps
     * one level of its depth 32 for itself); nor does more than 1 MiB of
     * text. */
    char deep[2 * 40 + 16];
    for (int depth = 31; depth <= 32; depth++) {
        char *p = deep;
        p += sprintf(p, "{\"a\":");
        for (int i = 1; i < depth; i++) {
            *p++ = '[';
        }
        *p++ = '1';
        for (int i = 1; i < depth; i++) {
            *p++ = ']';
        }
        strcpy(p, "}");
        o = keyval_parse_or_json(deep, NULL, &err);
        if (depth == 31) {
            assert_non_null(o);
            json_object_put(o);
        } else {
            assert_null(o);
            assert_non_null(strstr(error_get_pretty(err), "JSON parse error"));
            error_free(err);
            err = NULL;
        }
    }
    size_t big = 1024 * 1024 + 16;
    char *text = malloc(big + 1);
    assert_non_null(text);
    memset(text, ' ', big);
    memcpy(text, "{\"a\":1", 6);
    text[big - 1] = '}';
    text[big] = '\0';
    o = keyval_parse_or_json(text, NULL, &err);
    assert_null(o);
    assert_non_null(strstr(error_get_pretty(err), "too long"));
    error_free(err);
    err = NULL;
    free(text);

    /* Text after the object is an error; white space is not. */
    o = keyval_parse_or_json("{\"a\":1} \n", NULL, &err);
    assert_non_null(o);
    json_object_put(o);
    o = keyval_parse_or_json("{\"a\":1} x", NULL, &err);
    assert_null(o);
    error_free(err);
}

static void test_conversions(void **state)
{
    bool b = false;
    int64_t i = 0;
    assert_true(keyval_str_to_bool("on", &b) && b);
    assert_true(keyval_str_to_bool("yes", &b) && b);
    assert_true(keyval_str_to_bool("true", &b) && b);
    assert_true(keyval_str_to_bool("off", &b) && !b);
    assert_true(keyval_str_to_bool("no", &b) && !b);
    assert_true(keyval_str_to_bool("false", &b) && !b);
    assert_false(keyval_str_to_bool("On", &b));
    assert_false(keyval_str_to_bool("1", &b));
    assert_true(keyval_str_to_int("10809", &i) && i == 10809);
    assert_true(keyval_str_to_int("0x10", &i) && i == 16);
    assert_true(keyval_str_to_int("-5", &i) && i == -5);
    assert_false(keyval_str_to_int("", &i));
    assert_false(keyval_str_to_int("12k", &i));
    assert_false(keyval_str_to_int("99999999999999999999", &i));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flat),
        cmocka_unit_test(test_nested),
        cmocka_unit_test(test_escape),
        cmocka_unit_test(test_lists),
        cmocka_unit_test(test_implied),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_last_wins),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_conversions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
