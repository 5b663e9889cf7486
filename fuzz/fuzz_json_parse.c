/*
 * libFuzzer target: the strict JSON parser (common/json_parse.h), which
 * reads json:{...} backing names out of untrusted images. Each input is
 * one text: it must parse into a tree or fail with -EINVAL/-ENOMEM, never
 * crash, leak or hang. A tree is walked (every member looked up by its
 * key, every number converted) and checked against the header's promises:
 * offsets inside the text, keys unique, NUL-terminated strings.
 *
 * Build: meson setup -Dfuzz=true (clang; see meson_options.txt), then
 *   build/fuzz/fuzz_json_parse -max_total_time=60 CORPUS_DIR
 * Seeds: fuzz/text_seeds.py json CORPUS_DIR.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/json_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void broken(const char *what, size_t off)
{
	fprintf(stderr, "fuzz_json_parse: %s at byte %zu\n", what, off);
	abort();
}

/* Walk v (depth levels down from the root), checking what it promises. */
static void walk(const struct sx_json *v, size_t size, unsigned depth)
{
	const struct sx_json *got;
	int64_t n;
	size_t i;

	if (v->offset >= size)
		broken("offset past the text", v->offset);
	if (depth > SX_JSON_MAX_DEPTH + 1)
		broken("deeper than SX_JSON_MAX_DEPTH", v->offset);
	switch (v->type) {
	case SX_JSON_NUMBER:
		if (!v->str || v->str[v->len] != '\0')
			broken("number text not terminated", v->offset);
		sx_json_int64(v, &n);
		break;
	case SX_JSON_STRING:
		if (!v->str || v->str[v->len] != '\0')
			broken("string not terminated", v->offset);
		break;
	case SX_JSON_ARRAY:
		for (i = 0; i < v->count; i++)
			walk(&v->items[i], size, depth + 1);
		break;
	case SX_JSON_OBJECT:
		for (i = 0; i < v->count; i++) {
			const struct sx_json_member *m = &v->members[i];

			if (m->key[m->key_len] != '\0')
				broken("key not terminated", v->offset);
			/* Keys are unique: a key without NULs finds its own. */
			got = sx_json_get(v, m->key);
			if (strlen(m->key) == m->key_len && got != &m->value)
				broken("key found elsewhere", m->value.offset);
			walk(&m->value, size, depth + 1);
		}
		break;
	case SX_JSON_NULL:
	case SX_JSON_FALSE:
	case SX_JSON_TRUE:
		break;
	default:
		broken("unknown type", v->offset);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct sx_json *root = NULL;
	int ret;

	ret = sx_json_parse((const char *)data, size, &root);
	if (ret == 0) {
		walk(root, size, 0);
		sx_json_free(root);
	} else if (ret != -EINVAL && ret != -ENOMEM) {
		broken("unexpected error", (size_t)-ret);
	} else if (root) {
		broken("tree set on failure", 0);
	}
	return 0;
}
