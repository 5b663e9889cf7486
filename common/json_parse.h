/*
 * A strict, small JSON parser (RFC 8259) into a tree, for the few places the
 * library reads JSON it did not write: QEMU's json:{...} backing names.
 *
 * Strict on purpose, because what it reads names a server to connect to:
 * a text is refused (-EINVAL, with a message giving the byte offset) when it
 * is not exactly one JSON value, when it nests containers deeper than
 * SX_JSON_MAX_DEPTH, when it is longer than SX_JSON_MAX_SIZE, when an object
 * repeats a key, when a string holds invalid UTF-8, a raw control character
 * or a lone surrogate. Numbers are kept as their text (sx_json_int64()
 * converts). Any input, however hostile, gives a tree or an error: never an
 * abort, a print or undefined behaviour (it is fuzzed).
 *
 * Threads: none; the tree is the caller's.
 */
#ifndef SIPHON_COMMON_JSON_PARSE_H
#define SIPHON_COMMON_JSON_PARSE_H

#include <stddef.h>
#include <stdint.h>

#define SX_JSON_MAX_DEPTH 64 /* nested arrays and objects */
#define SX_JSON_MAX_SIZE 65536 /* bytes of text */

enum sx_json_type {
	SX_JSON_NULL,
	SX_JSON_FALSE,
	SX_JSON_TRUE,
	SX_JSON_NUMBER,
	SX_JSON_STRING,
	SX_JSON_ARRAY,
	SX_JSON_OBJECT,
};

struct sx_json_member;

/* One value. Everything it points to belongs to the tree. */
struct sx_json {
	enum sx_json_type type;
	size_t offset; /* of the value's first byte in the text */
	/*
	 * NUMBER: the number's text, as written. STRING: the string decoded
	 * to UTF-8 (escapes resolved). Both NUL-terminated; a STRING may also
	 * hold NULs (\u0000), so len counts its bytes.
	 */
	char *str;
	size_t len;
	size_t count; /* ARRAY: items; OBJECT: members */
	struct sx_json *items; /* ARRAY, in text order */
	struct sx_json_member *members; /* OBJECT, in text order */
};

struct sx_json_member {
	char *key; /* decoded, NUL-terminated; may hold NULs too */
	size_t key_len;
	struct sx_json value;
};

/*
 * Parse the len bytes at text (no NUL needed; a NUL byte is just an invalid
 * character) into a tree, *out. Returns 0; -EINVAL when text is not one
 * strict JSON value (message: what is wrong and at which byte offset);
 * -ENOMEM. *out is untouched on failure. Free with sx_json_free().
 */
int sx_json_parse(const char *text, size_t len, struct sx_json **out);

/* Free a tree from sx_json_parse(). NULL ok. */
void sx_json_free(struct sx_json *root);

/*
 * The value of obj's member named key (a C string: a key holding a NUL
 * never matches), or NULL when obj is not an object or has no such member.
 */
const struct sx_json *sx_json_get(const struct sx_json *obj, const char *key);

/*
 * *out = the integer v holds. Returns 0; -EINVAL when v is not a NUMBER or
 * has a fraction or an exponent (even "1.0", "1e2"); -ERANGE when it does
 * not fit an int64_t. Records a message on failure; *out untouched then.
 */
int sx_json_int64(const struct sx_json *v, int64_t *out);

/* The value of the hex digit c (0-9, a-f, A-F), or -1. */
int sx_hex_digit(unsigned char c);

#endif
