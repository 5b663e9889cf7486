/*
 * JSON output helpers (see json.h). Strings are escaped per RFC 8259: quote,
 * backslash and control characters; other bytes pass through unchanged, so
 * UTF-8 file names stay readable. The writer indents by four spaces, like
 * qemu-img's JSON output.
 */
#include <inttypes.h>
#include <stdio.h>

#include "json.h"

void json_string(FILE *f, const char *s)
{
	const unsigned char *p = (const unsigned char *)(s ? s : "");

	fputc('"', f);
	for (; *p; p++) {
		switch (*p) {
		case '"':
			fputs("\\\"", f);
			break;
		case '\\':
			fputs("\\\\", f);
			break;
		case '\n':
			fputs("\\n", f);
			break;
		case '\r':
			fputs("\\r", f);
			break;
		case '\t':
			fputs("\\t", f);
			break;
		case '\b':
			fputs("\\b", f);
			break;
		case '\f':
			fputs("\\f", f);
			break;
		default:
			if (*p < 0x20)
				fprintf(f, "\\u%04x", *p);
			else
				fputc(*p, f);
		}
	}
	fputc('"', f);
}

void json_init(struct json_out *j, FILE *f)
{
	j->f = f;
	j->depth = 0;
	j->need_comma[0] = false;
}

/* Comma, newline and indentation before a member, then its key. */
static void json_member(struct json_out *j, const char *key)
{
	int i;

	if (j->depth > 0) {
		if (j->need_comma[j->depth])
			fputc(',', j->f);
		fputc('\n', j->f);
		for (i = 0; i < j->depth; i++)
			fputs("    ", j->f);
	}
	j->need_comma[j->depth] = true;
	if (key) {
		json_string(j->f, key);
		fputs(": ", j->f);
	}
}

static void json_open(struct json_out *j, const char *key, char c)
{
	json_member(j, key);
	fputc(c, j->f);
	if (j->depth < JSON_MAX_NEST - 1)
		j->depth++;
	j->need_comma[j->depth] = false;
}

static void json_close(struct json_out *j, char c)
{
	bool had = j->need_comma[j->depth];
	int i;

	if (j->depth > 0)
		j->depth--;
	if (had) {
		fputc('\n', j->f);
		for (i = 0; i < j->depth; i++)
			fputs("    ", j->f);
	}
	fputc(c, j->f);
}

void json_begin_object(struct json_out *j, const char *key)
{
	json_open(j, key, '{');
}

void json_end_object(struct json_out *j)
{
	json_close(j, '}');
}

void json_begin_array(struct json_out *j, const char *key)
{
	json_open(j, key, '[');
}

void json_end_array(struct json_out *j)
{
	json_close(j, ']');
}

void json_str(struct json_out *j, const char *key, const char *v)
{
	json_member(j, key);
	json_string(j->f, v);
}

void json_u64(struct json_out *j, const char *key, uint64_t v)
{
	json_member(j, key);
	fprintf(j->f, "%" PRIu64, v);
}

void json_bool(struct json_out *j, const char *key, bool v)
{
	json_member(j, key);
	fputs(v ? "true" : "false", j->f);
}

void json_finish(struct json_out *j)
{
	fputc('\n', j->f);
}
