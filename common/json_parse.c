/*
 * The strict JSON parser of json_parse.h: recursive descent, one pass.
 *
 * Invariants:
 *  - The recursion is bounded by SX_JSON_MAX_DEPTH, so hostile nesting
 *    cannot exhaust the stack; the text by SX_JSON_MAX_SIZE, so the tree's
 *    size and the duplicate-key scan (quadratic in an object's members)
 *    stay bounded too.
 *  - Every read of the text is checked against its length first: the text
 *    needs no NUL terminator and the parser never reads past it.
 *  - A value being parsed is either complete or, on failure, freed and
 *    zeroed before the error returns, so a container only ever holds
 *    complete children and one free walk cleans any partial tree.
 *  - A string's decoded form is never longer than its raw form (an escape
 *    never decodes to more bytes than it is written with), so one buffer
 *    of the raw length holds it.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/json_parse.h"

struct parser {
	const unsigned char *s;
	size_t len;
	size_t pos;
};

/* Record "JSON: what at byte off" and return -EINVAL. */
static int bad(size_t off, const char *what)
{
	return sx_error(-EINVAL, "JSON: %s at byte %zu", what, off);
}

static int no_memory(void)
{
	return sx_error(-ENOMEM, "JSON: out of memory");
}

static void skip_ws(struct parser *p)
{
	while (p->pos < p->len &&
	       (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' ||
		p->s[p->pos] == '\n' || p->s[p->pos] == '\r'))
		p->pos++;
}

/* Free what v holds (not v itself) and zero it. */
static void free_value(struct sx_json *v)
{
	size_t i;

	switch (v->type) {
	case SX_JSON_ARRAY:
		for (i = 0; i < v->count; i++)
			free_value(&v->items[i]);
		free(v->items);
		break;
	case SX_JSON_OBJECT:
		for (i = 0; i < v->count; i++) {
			free(v->members[i].key);
			free_value(&v->members[i].value);
		}
		free(v->members);
		break;
	default:
		free(v->str);
		break;
	}
	memset(v, 0, sizeof(*v));
}

int sx_hex_digit(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * The four hex digits at p->pos (the XXXX of \uXXXX) into *cp, advancing
 * past them. 0 or -EINVAL.
 */
static int parse_hex4(struct parser *p, unsigned *cp)
{
	unsigned v = 0;
	int i, d;

	if (p->len - p->pos < 4)
		return bad(p->pos, "truncated \\u escape");
	for (i = 0; i < 4; i++) {
		d = sx_hex_digit(p->s[p->pos + i]);
		if (d < 0)
			return bad(p->pos + i, "bad hex digit in \\u escape");
		v = v << 4 | (unsigned)d;
	}
	p->pos += 4;
	*cp = v;
	return 0;
}

/* Append code point cp (valid, not a surrogate) to out as UTF-8. */
static size_t put_utf8(char *out, unsigned cp)
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xc0 | cp >> 6);
		out[1] = (char)(0x80 | (cp & 0x3f));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xe0 | cp >> 12);
		out[1] = (char)(0x80 | (cp >> 6 & 0x3f));
		out[2] = (char)(0x80 | (cp & 0x3f));
		return 3;
	}
	out[0] = (char)(0xf0 | cp >> 18);
	out[1] = (char)(0x80 | (cp >> 12 & 0x3f));
	out[2] = (char)(0x80 | (cp >> 6 & 0x3f));
	out[3] = (char)(0x80 | (cp & 0x3f));
	return 4;
}

/*
 * Length of the valid UTF-8 sequence at s[0..n) (n >= 1, s[0] >= 0x80), or
 * 0 when it is not one (overlong, surrogate, above U+10FFFF, truncated).
 */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
	unsigned char lo = 0x80, hi = 0xbf;
	size_t need, i;

	if (s[0] >= 0xc2 && s[0] <= 0xdf) {
		need = 2;
	} else if (s[0] >= 0xe0 && s[0] <= 0xef) {
		need = 3;
		if (s[0] == 0xe0)
			lo = 0xa0;
		else if (s[0] == 0xed)
			hi = 0x9f;
	} else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
		need = 4;
		if (s[0] == 0xf0)
			lo = 0x90;
		else if (s[0] == 0xf4)
			hi = 0x8f;
	} else {
		return 0;
	}
	if (n < need)
		return 0;
	if (s[1] < lo || s[1] > hi)
		return 0;
	for (i = 2; i < need; i++)
		if (s[i] < 0x80 || s[i] > 0xbf)
			return 0;
	return need;
}

/*
 * The escape after a backslash at p->pos (already past the '\\') into out;
 * *n = bytes written. 0 or -EINVAL.
 */
static int parse_escape(struct parser *p, char *out, size_t *n)
{
	size_t start = p->pos - 1;
	unsigned cp, lo;
	int ret;

	if (p->pos >= p->len)
		return bad(start, "truncated escape");
	switch (p->s[p->pos++]) {
	case '"':
		*out = '"';
		break;
	case '\\':
		*out = '\\';
		break;
	case '/':
		*out = '/';
		break;
	case 'b':
		*out = '\b';
		break;
	case 'f':
		*out = '\f';
		break;
	case 'n':
		*out = '\n';
		break;
	case 'r':
		*out = '\r';
		break;
	case 't':
		*out = '\t';
		break;
	case 'u':
		ret = parse_hex4(p, &cp);
		if (ret)
			return ret;
		if (cp >= 0xdc00 && cp <= 0xdfff)
			return bad(start, "lone low surrogate");
		if (cp >= 0xd800 && cp <= 0xdbff) {
			if (p->len - p->pos < 2 || p->s[p->pos] != '\\' ||
			    p->s[p->pos + 1] != 'u')
				return bad(start, "lone high surrogate");
			p->pos += 2;
			ret = parse_hex4(p, &lo);
			if (ret)
				return ret;
			if (lo < 0xdc00 || lo > 0xdfff)
				return bad(start, "lone high surrogate");
			cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
		}
		*n = put_utf8(out, cp);
		return 0;
	default:
		return bad(start, "unknown escape");
	}
	*n = 1;
	return 0;
}

/*
 * The string whose opening quote is at p->pos into a new buffer: *out
 * (NUL-terminated), *len its bytes. 0, -EINVAL or -ENOMEM.
 */
static int parse_string(struct parser *p, char **out, size_t *len)
{
	size_t start = p->pos, end, n = 0, k = 0;
	char *buf = NULL;
	unsigned char c;
	int ret;

	/* Find the closing quote first, to size the buffer. */
	end = start + 1;
	for (;;) {
		if (end >= p->len)
			return bad(start, "unterminated string");
		if (p->s[end] == '"')
			break;
		end += p->s[end] == '\\' ? 2 : 1;
	}
	buf = malloc(end - start);
	if (!buf)
		return no_memory();
	p->pos = start + 1;
	while (p->pos < end) {
		c = p->s[p->pos];
		if (c == '\\') {
			p->pos++;
			ret = parse_escape(p, buf + n, &k);
			if (ret)
				goto out;
			n += k;
		} else if (c < 0x20) {
			ret = bad(p->pos, "control character in string");
			goto out;
		} else if (c < 0x80) {
			buf[n++] = (char)c;
			p->pos++;
		} else {
			k = utf8_seq(p->s + p->pos, end - p->pos);
			if (!k) {
				ret = bad(p->pos, "invalid UTF-8 in string");
				goto out;
			}
			memcpy(buf + n, p->s + p->pos, k);
			n += k;
			p->pos += k;
		}
	}
	/*
	 * An escape's hex digits cannot hold the quote that ended the scan,
	 * but a surrogate pair's second half could reach past it: refuse.
	 */
	if (p->pos != end) {
		ret = bad(start, "unterminated string");
		goto out;
	}
	p->pos = end + 1;
	buf[n] = '\0';
	*out = buf;
	*len = n;
	buf = NULL;
	ret = 0;
out:
	free(buf);
	return ret;
}

static bool is_digit(const struct parser *p, size_t i)
{
	return i < p->len && p->s[i] >= '0' && p->s[i] <= '9';
}

/* The number at p->pos into v (its text). 0, -EINVAL or -ENOMEM. */
static int parse_number(struct parser *p, struct sx_json *v)
{
	size_t start = p->pos, i = p->pos;

	if (i < p->len && p->s[i] == '-')
		i++;
	if (!is_digit(p, i))
		return bad(i, "bad number");
	if (p->s[i] == '0') {
		i++;
		if (is_digit(p, i))
			return bad(start, "number with a leading zero");
	} else {
		while (is_digit(p, i))
			i++;
	}
	if (i < p->len && p->s[i] == '.') {
		i++;
		if (!is_digit(p, i))
			return bad(i, "bad number: no digit after '.'");
		while (is_digit(p, i))
			i++;
	}
	if (i < p->len && (p->s[i] == 'e' || p->s[i] == 'E')) {
		i++;
		if (i < p->len && (p->s[i] == '+' || p->s[i] == '-'))
			i++;
		if (!is_digit(p, i))
			return bad(i, "bad number: no digit in exponent");
		while (is_digit(p, i))
			i++;
	}
	v->str = malloc(i - start + 1);
	if (!v->str)
		return no_memory();
	memcpy(v->str, p->s + start, i - start);
	v->str[i - start] = '\0';
	v->len = i - start;
	v->type = SX_JSON_NUMBER;
	p->pos = i;
	return 0;
}

/* The literal word at p->pos, as type t. 0 or -EINVAL. */
static int parse_literal(struct parser *p, const char *word,
			 enum sx_json_type t, struct sx_json *v)
{
	size_t n = strlen(word);

	if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n))
		return bad(p->pos, "unexpected character");
	p->pos += n;
	v->type = t;
	return 0;
}

/*
 * Make room for one more element in *arr (of *cap elements of size sz,
 * count used). 0 or -ENOMEM. The text's size bounds count, so the
 * doubling cannot overflow.
 */
static int grow(void **arr, size_t *cap, size_t count, size_t sz)
{
	size_t ncap;
	void *n;

	if (count < *cap)
		return 0;
	ncap = *cap ? *cap * 2 : 4;
	n = realloc(*arr, ncap * sz);
	if (!n)
		return no_memory();
	*arr = n;
	*cap = ncap;
	return 0;
}

static int parse_value(struct parser *p, struct sx_json *v, int depth);

/* The array whose '[' is at p->pos into v. */
static int parse_array(struct parser *p, struct sx_json *v, int depth)
{
	size_t cap = 0;
	void *arr;
	int ret;

	v->type = SX_JSON_ARRAY;
	p->pos++;
	skip_ws(p);
	if (p->pos < p->len && p->s[p->pos] == ']') {
		p->pos++;
		return 0;
	}
	for (;;) {
		arr = v->items;
		ret = grow(&arr, &cap, v->count, sizeof(*v->items));
		v->items = arr;
		if (ret)
			return ret;
		ret = parse_value(p, &v->items[v->count], depth);
		if (ret)
			return ret;
		v->count++;
		skip_ws(p);
		if (p->pos >= p->len)
			return bad(p->pos, "unexpected end of input in array");
		if (p->s[p->pos] == ']') {
			p->pos++;
			return 0;
		}
		if (p->s[p->pos] != ',')
			return bad(p->pos, "expected ',' or ']'");
		p->pos++;
	}
}

/* The object whose '{' is at p->pos into v. */
static int parse_object(struct parser *p, struct sx_json *v, int depth)
{
	struct sx_json_member *m;
	size_t cap = 0, key_off, i;
	void *arr;
	int ret;

	v->type = SX_JSON_OBJECT;
	p->pos++;
	skip_ws(p);
	if (p->pos < p->len && p->s[p->pos] == '}') {
		p->pos++;
		return 0;
	}
	for (;;) {
		skip_ws(p);
		if (p->pos >= p->len)
			return bad(p->pos, "unexpected end of input in object");
		if (p->s[p->pos] != '"')
			return bad(p->pos, "expected a string key");
		arr = v->members;
		ret = grow(&arr, &cap, v->count, sizeof(*v->members));
		v->members = arr;
		if (ret)
			return ret;
		m = &v->members[v->count];
		memset(m, 0, sizeof(*m));
		key_off = p->pos;
		ret = parse_string(p, &m->key, &m->key_len);
		if (ret)
			return ret;
		for (i = 0; i < v->count; i++) {
			if (v->members[i].key_len == m->key_len &&
			    !memcmp(v->members[i].key, m->key, m->key_len)) {
				free(m->key);
				return bad(key_off, "duplicate key");
			}
		}
		skip_ws(p);
		if (p->pos >= p->len || p->s[p->pos] != ':') {
			free(m->key);
			return bad(p->pos, "expected ':'");
		}
		p->pos++;
		ret = parse_value(p, &m->value, depth);
		if (ret) {
			free(m->key);
			return ret;
		}
		v->count++;
		skip_ws(p);
		if (p->pos >= p->len)
			return bad(p->pos, "unexpected end of input in object");
		if (p->s[p->pos] == '}') {
			p->pos++;
			return 0;
		}
		if (p->s[p->pos] != ',')
			return bad(p->pos, "expected ',' or '}'");
		p->pos++;
	}
}

/*
 * The value at p->pos (after white space) into v, at nesting depth (the
 * containers around it). On failure v is left empty (zeroed).
 */
static int parse_value(struct parser *p, struct sx_json *v, int depth)
{
	int ret;

	memset(v, 0, sizeof(*v));
	skip_ws(p);
	v->offset = p->pos;
	if (p->pos >= p->len)
		return bad(p->pos, "unexpected end of input");
	switch (p->s[p->pos]) {
	case '{':
	case '[':
		if (depth >= SX_JSON_MAX_DEPTH) {
			ret = bad(p->pos, "nesting deeper than 64");
			break;
		}
		if (p->s[p->pos] == '{')
			ret = parse_object(p, v, depth + 1);
		else
			ret = parse_array(p, v, depth + 1);
		break;
	case '"':
		ret = parse_string(p, &v->str, &v->len);
		if (!ret)
			v->type = SX_JSON_STRING;
		break;
	case 't':
		ret = parse_literal(p, "true", SX_JSON_TRUE, v);
		break;
	case 'f':
		ret = parse_literal(p, "false", SX_JSON_FALSE, v);
		break;
	case 'n':
		ret = parse_literal(p, "null", SX_JSON_NULL, v);
		break;
	default:
		if (p->s[p->pos] == '-' ||
		    (p->s[p->pos] >= '0' && p->s[p->pos] <= '9'))
			ret = parse_number(p, v);
		else
			ret = bad(p->pos, "unexpected character");
		break;
	}
	if (ret)
		free_value(v);
	return ret;
}

int sx_json_parse(const char *text, size_t len, struct sx_json **out)
{
	struct parser p = {(const unsigned char *)text, len, 0};
	struct sx_json *root;
	int ret;

	if (len > SX_JSON_MAX_SIZE)
		return bad(SX_JSON_MAX_SIZE, "text larger than 65536 bytes");
	if (!text && len)
		return sx_error(-EINVAL, "JSON: no text");
	root = calloc(1, sizeof(*root));
	if (!root)
		return no_memory();
	ret = parse_value(&p, root, 0);
	if (ret)
		goto out;
	skip_ws(&p);
	if (p.pos != p.len) {
		ret = bad(p.pos, "trailing garbage");
		goto out;
	}
	*out = root;
	root = NULL;
out:
	sx_json_free(root);
	return ret;
}

void sx_json_free(struct sx_json *root)
{
	if (!root)
		return;
	free_value(root);
	free(root);
}

const struct sx_json *sx_json_get(const struct sx_json *obj, const char *key)
{
	size_t i, n;

	if (!obj || obj->type != SX_JSON_OBJECT || !key)
		return NULL;
	n = strlen(key);
	for (i = 0; i < obj->count; i++)
		if (obj->members[i].key_len == n &&
		    !memcmp(obj->members[i].key, key, n))
			return &obj->members[i].value;
	return NULL;
}

int sx_json_int64(const struct sx_json *v, int64_t *out)
{
	uint64_t mag = 0, limit;
	bool neg;
	size_t i;

	if (!v || v->type != SX_JSON_NUMBER)
		return sx_error(-EINVAL, "JSON: not a number");
	neg = v->str[0] == '-';
	/* The magnitude of INT64_MIN is one more than INT64_MAX. */
	limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
	for (i = neg ? 1 : 0; i < v->len; i++) {
		unsigned d;

		if (v->str[i] < '0' || v->str[i] > '9')
			return sx_error(
				-EINVAL,
				"JSON: number at byte %zu is not an integer",
				v->offset);
		d = (unsigned)(v->str[i] - '0');
		if (mag > (limit - d) / 10)
			return sx_error(
				-ERANGE,
				"JSON: number at byte %zu does not fit 64 bits",
				v->offset);
		mag = mag * 10 + d;
	}
	if (!neg)
		*out = (int64_t)mag;
	else if (mag == (uint64_t)INT64_MAX + 1)
		*out = INT64_MIN;
	else
		*out = -(int64_t)mag;
	return 0;
}
