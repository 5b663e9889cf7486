/*
 * Unit tests for common/json_parse.h: what a strict RFC 8259 parser accepts
 * and refuses (escapes, surrogates, UTF-8, numbers, nesting and size
 * limits, duplicate keys, trailing garbage, every truncation of a valid
 * text), the byte offsets in its messages, and sx_json_int64() at the
 * edges of int64_t.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "common/error.h"
#include "common/json_parse.h"

/* Parse a C string; the tree or NULL (then ret says why). */
static struct sx_json *parse(const char *s, int *ret)
{
	struct sx_json *v = NULL;

	*ret = sx_json_parse(s, strlen(s), &v);
	return v;
}

/* s must be refused with -EINVAL and a message holding word. */
static void refused(const char *s, size_t len, const char *word)
{
	struct sx_json *v = (struct sx_json *)0x1;
	int ret;

	sx_error_clear();
	ret = sx_json_parse(s, len, &v);
	ck_assert_msg(ret == -EINVAL, "accepted (%d): %.*s", ret, (int)len, s);
	ck_assert_msg(v == (struct sx_json *)0x1, "*out written on failure");
	ck_assert_msg(strstr(sx_last_error(), word),
		      "message \"%s\" lacks \"%s\" for %.*s", sx_last_error(),
		      word, (int)len, s);
	ck_assert_msg(strstr(sx_last_error(), "at byte"), "no offset in \"%s\"",
		      sx_last_error());
}

static void refused_str(const char *s, const char *word)
{
	refused(s, strlen(s), word);
}

/* s must parse to one string of exactly the n bytes at want. */
static void string_is(const char *s, const char *want, size_t n)
{
	struct sx_json *v;
	int ret;

	v = parse(s, &ret);
	ck_assert_msg(ret == 0, "refused: %s (%s)", s, sx_last_error());
	ck_assert_int_eq(v->type, SX_JSON_STRING);
	ck_assert_uint_eq(v->len, n);
	ck_assert_msg(!memcmp(v->str, want, n), "wrong bytes for %s", s);
	ck_assert_int_eq(v->str[n], '\0');
	sx_json_free(v);
}

START_TEST(test_scalars)
{
	static const struct {
		const char *text;
		enum sx_json_type type;
		const char *num;
	} cases[] = {
		{"null", SX_JSON_NULL, NULL},
		{" true ", SX_JSON_TRUE, NULL},
		{"\t\r\nfalse\n", SX_JSON_FALSE, NULL},
		{"0", SX_JSON_NUMBER, "0"},
		{"-0", SX_JSON_NUMBER, "-0"},
		{"12.5e-3", SX_JSON_NUMBER, "12.5e-3"},
		{"-1E+9", SX_JSON_NUMBER, "-1E+9"},
		{"  42  ", SX_JSON_NUMBER, "42"},
		{"0.0", SX_JSON_NUMBER, "0.0"},
	};
	struct sx_json *v;
	size_t i;
	int ret;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		v = parse(cases[i].text, &ret);
		ck_assert_msg(ret == 0, "refused %s: %s", cases[i].text,
			      sx_last_error());
		ck_assert_int_eq(v->type, cases[i].type);
		if (cases[i].num)
			ck_assert_str_eq(v->str, cases[i].num);
		sx_json_free(v);
	}
}
END_TEST

START_TEST(test_bad_numbers)
{
	static const char *const bad[] = {
		"01",  "-",   "1.",	  ".5",	 "1e",	 "+1",	"0x10",
		"1e+", "-01", "Infinity", "NaN", "1.e5", "--1", "- 1",
	};
	size_t i;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		refused_str(bad[i], "");
}
END_TEST

START_TEST(test_escapes)
{
	string_is("\"\"", "", 0);
	string_is("\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\"", "a\"b\\c/d\b\f\n\r\t",
		  12);
	string_is("\"\\u0041\\u00e9\\u20AC\"", "A\xc3\xa9\xe2\x82\xac", 6);
	/* A surrogate pair is one code point, four bytes of UTF-8. */
	string_is("\"\\ud83d\\ude00\"", "\xf0\x9f\x98\x80", 4);
	string_is("\"\\uDBFF\\uDFFF\"", "\xf4\x8f\xbf\xbf", 4);
	/* \u0000 is a NUL inside the string, counted by len. */
	string_is("\"a\\u0000b\"", "a\0b", 3);
	/* Raw UTF-8 passes through, DEL too. */
	string_is("\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\x7f\"",
		  "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\x7f", 10);

	refused_str("\"\\x\"", "unknown escape");
	refused_str("\"\\u12\"", "\\u escape");
	refused_str("\"\\u12g4\"", "hex digit");
	refused_str("\"\\u12", "unterminated");
	refused_str("\"\\ud800\"", "surrogate");
	refused_str("\"\\ud800\\u0041\"", "surrogate");
	refused_str("\"\\ud800x\"", "surrogate");
	refused_str("\"\\udc00\"", "surrogate");
	refused_str("\"\\ude00\\ud83d\"", "surrogate");
	refused_str("\"\\", "unterminated");
	refused_str("\"abc", "unterminated");
	refused_str("\"abc\\\"", "unterminated");
}
END_TEST

START_TEST(test_raw_bytes)
{
	refused_str("\"a\nb\"", "control character");
	refused_str("\"a\tb\"", "control character");
	refused("\"a\0b\"", 5, "control character");
	refused_str("\"\xc0\x80\"", "UTF-8"); /* overlong NUL */
	refused_str("\"\xe0\x80\xaf\"", "UTF-8"); /* overlong '/' */
	refused_str("\"\xed\xa0\x80\"", "UTF-8"); /* a surrogate */
	refused_str("\"\xf4\x90\x80\x80\"", "UTF-8"); /* above U+10FFFF */
	refused_str("\"\xe2\x82\"", "UTF-8"); /* truncated */
	refused_str("\"\x80\"", "UTF-8"); /* lone continuation */
	refused_str("\"\xff\"", "UTF-8");
	refused_str("\"\xf5\x80\x80\x80\"", "UTF-8");
	/* Outside a string, a NUL or any non-ASCII byte is garbage. */
	refused("1\0", 2, "trailing garbage");
	refused("\0", 1, "unexpected character");
	refused_str("\xc3\xa9", "unexpected character");
}
END_TEST

START_TEST(test_containers)
{
	const char *text = " { \"a\" : [1, \"two\", {}, [], null] ,"
			   "\"b\":{\"c\":true}, \"\":false } ";
	const struct sx_json *a, *b;
	struct sx_json *v;
	int ret;

	v = parse(text, &ret);
	ck_assert_msg(ret == 0, "%s", sx_last_error());
	ck_assert_int_eq(v->type, SX_JSON_OBJECT);
	ck_assert_uint_eq(v->offset, 1);
	ck_assert_uint_eq(v->count, 3);
	/* Members keep their order. */
	ck_assert_str_eq(v->members[0].key, "a");
	ck_assert_str_eq(v->members[1].key, "b");
	ck_assert_str_eq(v->members[2].key, "");
	a = sx_json_get(v, "a");
	ck_assert_ptr_nonnull(a);
	ck_assert_int_eq(a->type, SX_JSON_ARRAY);
	ck_assert_uint_eq(a->count, 5);
	ck_assert_uint_eq(a->offset, 9);
	ck_assert_str_eq(a->items[0].str, "1");
	ck_assert_str_eq(a->items[1].str, "two");
	ck_assert_uint_eq(a->items[1].offset, 13);
	ck_assert_int_eq(a->items[2].type, SX_JSON_OBJECT);
	ck_assert_uint_eq(a->items[2].count, 0);
	ck_assert_int_eq(a->items[3].type, SX_JSON_ARRAY);
	ck_assert_int_eq(a->items[4].type, SX_JSON_NULL);
	b = sx_json_get(v, "b");
	ck_assert_int_eq(sx_json_get(b, "c")->type, SX_JSON_TRUE);
	ck_assert_int_eq(sx_json_get(v, "")->type, SX_JSON_FALSE);
	ck_assert_ptr_null(sx_json_get(v, "c"));
	ck_assert_ptr_null(sx_json_get(a, "a"));
	ck_assert_ptr_null(sx_json_get(NULL, "a"));
	sx_json_free(v);

	/* A key holding a NUL is not the C string before it. */
	v = parse("{\"a\\u0000\":1}", &ret);
	ck_assert_int_eq(ret, 0);
	ck_assert_uint_eq(v->members[0].key_len, 2);
	ck_assert_ptr_null(sx_json_get(v, "a"));
	sx_json_free(v);
	sx_json_free(NULL);
}
END_TEST

START_TEST(test_duplicates)
{
	struct sx_json *v;
	int ret;

	refused_str("{\"a\":1,\"a\":2}", "duplicate key");
	refused_str("{\"a\":1,\"b\":2,\"a\":{}}", "duplicate key at byte 13");
	/* Keys compare decoded. */
	refused_str("{\"\\u0061\":1,\"a\":2}", "duplicate key");
	/* Same key in different objects, and near-equal keys, are fine. */
	v = parse("{\"a\":1,\"b\":{\"a\":2},\"a\\u0000\":3,\"A\":4}", &ret);
	ck_assert_msg(ret == 0, "%s", sx_last_error());
	sx_json_free(v);
}
END_TEST

START_TEST(test_garbage)
{
	static const struct {
		const char *text;
		const char *word;
	} cases[] = {
		{"", "end of input at byte 0"},
		{"   ", "end of input at byte 3"},
		{"{} x", "trailing garbage at byte 3"},
		{"1 2", "trailing garbage at byte 2"},
		{"truex", "trailing garbage"},
		{"[1,]", "unexpected character at byte 3"},
		{"[,1]", "unexpected character at byte 1"},
		{"[1 2]", "expected ',' or ']' at byte 3"},
		{"{\"a\"}", "expected ':' at byte 4"},
		{"{\"a\":}", "unexpected character at byte 5"},
		{"{a:1}", "expected a string key at byte 1"},
		{"{\"a\":1,}", "expected a string key at byte 7"},
		{"{\"a\":1 \"b\":2}", "expected ',' or '}'"},
		{"{1:2}", "expected a string key"},
		{"'a'", "unexpected character"},
		{"tru", "unexpected character"},
		{"nul", "unexpected character"},
		{"True", "unexpected character"},
		{"[1]]", "trailing garbage"},
		{"/* c */ 1", "unexpected character"},
		{"\xef\xbb\xbf{}", "unexpected character at byte 0"},
	};
	size_t i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		refused_str(cases[i].text, cases[i].word);
}
END_TEST

START_TEST(test_truncated)
{
	const char *text =
		"{\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":"
		"\"unix\",\"path\":\"/tmp/s\\u00e9\"},\"port\":-1.5e3,"
		"\"l\":[true,false,null,\"\\ud83d\\ude00\"]}}";
	struct sx_json *v;
	size_t i, n = strlen(text);
	int ret;

	v = parse(text, &ret);
	ck_assert_msg(ret == 0, "%s", sx_last_error());
	sx_json_free(v);
	/* Every proper prefix of an object is refused, none crashes. */
	for (i = 0; i < n; i++)
		refused(text, i, "");
}
END_TEST

START_TEST(test_limits)
{
	char *buf = malloc(SX_JSON_MAX_SIZE + 2);
	struct sx_json *v;
	size_t n;
	int i, ret;

	ck_assert_ptr_nonnull(buf);
	/* 64 nested arrays are fine, 65 are not. */
	memset(buf, '[', 64);
	memset(buf + 64, ']', 64);
	ck_assert_int_eq(sx_json_parse(buf, 128, &v), 0);
	sx_json_free(v);
	memset(buf, '[', 65);
	memset(buf + 65, ']', 65);
	refused(buf, 130, "nesting deeper than 64 at byte 64");
	/* Objects count the same, and so do mixed containers. */
	buf[0] = '\0';
	for (i = 0; i < 64; i++)
		strcat(buf, i % 2 ? "[" : "{\"k\":");
	strcat(buf, "0");
	for (i = 63; i >= 0; i--)
		strcat(buf, i % 2 ? "]" : "}");
	v = parse(buf, &ret);
	ck_assert_msg(ret == 0, "%s", sx_last_error());
	sx_json_free(v);
	buf[0] = '[';
	buf[1] = '\0';
	for (i = 0; i < 64; i++)
		strcat(buf, "{\"k\":");
	refused_str(buf, "nesting deeper than 64");

	/* The whole text, white space included, is at most 64 KiB. */
	memset(buf, ' ', SX_JSON_MAX_SIZE - 1);
	buf[SX_JSON_MAX_SIZE - 1] = '0';
	ck_assert_int_eq(sx_json_parse(buf, SX_JSON_MAX_SIZE, &v), 0);
	sx_json_free(v);
	buf[SX_JSON_MAX_SIZE] = ' ';
	refused(buf, SX_JSON_MAX_SIZE + 1, "larger than 65536");
	/* A large object: many members, each checked against the others. */
	strcpy(buf, "{");
	n = 1;
	for (i = 0; i < 4000; i++)
		n += (size_t)sprintf(buf + n, "\"k%d\":%d,", i, i);
	strcpy(buf + n, "\"k0\":0}");
	refused_str(buf, "duplicate key");
	free(buf);
}
END_TEST

START_TEST(test_int64)
{
	static const struct {
		const char *text;
		int ret;
		int64_t want;
	} cases[] = {
		{"0", 0, 0},
		{"-0", 0, 0},
		{"10809", 0, 10809},
		{"9223372036854775807", 0, INT64_MAX},
		{"-9223372036854775808", 0, INT64_MIN},
		{"9223372036854775808", -ERANGE, 0},
		{"-9223372036854775809", -ERANGE, 0},
		{"99999999999999999999999", -ERANGE, 0},
		{"1.0", -EINVAL, 0},
		{"1e2", -EINVAL, 0},
		{"\"1\"", -EINVAL, 0},
		{"true", -EINVAL, 0},
	};
	struct sx_json *v;
	int64_t got;
	size_t i;
	int ret;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		v = parse(cases[i].text, &ret);
		ck_assert_int_eq(ret, 0);
		got = 77;
		ret = sx_json_int64(v, &got);
		ck_assert_msg(ret == cases[i].ret, "%s: %d", cases[i].text,
			      ret);
		ck_assert(ret ? got == 77 : got == cases[i].want);
		sx_json_free(v);
	}
	ck_assert_int_eq(sx_json_int64(NULL, &got), -EINVAL);
}
END_TEST

static Suite *json_suite(void)
{
	Suite *s = suite_create("json_parse");
	TCase *tc = tcase_create("parse");

	tcase_add_test(tc, test_scalars);
	tcase_add_test(tc, test_bad_numbers);
	tcase_add_test(tc, test_escapes);
	tcase_add_test(tc, test_raw_bytes);
	tcase_add_test(tc, test_containers);
	tcase_add_test(tc, test_duplicates);
	tcase_add_test(tc, test_garbage);
	tcase_add_test(tc, test_truncated);
	tcase_add_test(tc, test_limits);
	tcase_add_test(tc, test_int64);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return run_suite(json_suite(), NULL, 0);
}
