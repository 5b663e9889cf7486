/*
 * Minimal JSON output for the tools: string escaping and a small indenting
 * writer that keeps track of commas. Output only; no parsing.
 */
#ifndef SIPHON_TOOLS_JSON_H
#define SIPHON_TOOLS_JSON_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define JSON_MAX_NEST 16

/* Write s as a JSON string literal (quotes included). */
void json_string(FILE *f, const char *s);

struct json_out {
	FILE *f;
	int depth;
	bool need_comma[JSON_MAX_NEST];
};

void json_init(struct json_out *j, FILE *f);
/* key is NULL at the top level and inside arrays. */
void json_begin_object(struct json_out *j, const char *key);
void json_end_object(struct json_out *j);
void json_begin_array(struct json_out *j, const char *key);
void json_end_array(struct json_out *j);
void json_str(struct json_out *j, const char *key, const char *v);
void json_u64(struct json_out *j, const char *key, uint64_t v);
void json_bool(struct json_out *j, const char *key, bool v);
/* Ends the document with a newline. */
void json_finish(struct json_out *j);

#endif
