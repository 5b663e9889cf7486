/*
 * libFuzzer target: the parser of NBD export names (io/nbd_name.h:
 * nbd://, nbd+tcp://, nbd+unix://, json:), which reads backing names out
 * of untrusted images. Each input, NUL-terminated, is one name: it must
 * parse or be refused with -EINVAL/-ENOMEM, never crash, leak or hang.
 * A name that parses must be remote by its form, and its canonical URI
 * must parse back into the same address (the header's promise).
 *
 * Build: meson setup -Dfuzz=true (clang; see meson_options.txt), then
 *   build/fuzz/fuzz_nbd_name -max_total_time=60 CORPUS_DIR
 * Seeds: fuzz/text_seeds.py nbd_name CORPUS_DIR.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "io/nbd_name.h"

/* Longer names are only longer copies of paths the parser has seen. */
#define MAX_INPUT (16u * 1024)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void broken(const char *what, const char *name)
{
	fprintf(stderr, "fuzz_nbd_name: %s: %s (%s)\n", what, name,
		sx_last_error());
	abort();
}

static int same(const char *a, const char *b)
{
	return (!a && !b) || (a && b && !strcmp(a, b));
}

/* The canonical URI of a must parse back into a. */
static void round_trip(const struct sio_nbd_addr *a, const char *name)
{
	struct sio_nbd_addr b;
	char *uri;

	uri = sio_nbd_addr_uri(a);
	if (!uri)
		broken("no URI for a parsed address", name);
	if (!sio_nbd_name_is_remote(uri))
		broken("URI not remote", uri);
	if (sio_nbd_name_parse(uri, &b) < 0)
		broken("URI does not parse back", uri);
	if (b.transport != a->transport || !same(a->host, b.host) ||
	    !same(a->port, b.port) || !same(a->socket, b.socket) ||
	    !same(a->export_name, b.export_name))
		broken("URI parses into another address", uri);
	sio_nbd_addr_free(&b);
	free(uri);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct sio_nbd_addr a;
	char *name;
	int ret;

	if (size > MAX_INPUT)
		size = MAX_INPUT;
	name = malloc(size + 1);
	if (!name)
		abort();
	memcpy(name, data, size);
	name[size] = '\0';
	ret = sio_nbd_name_parse(name, &a);
	if (ret == 0) {
		if (!sio_nbd_name_is_remote(name))
			broken("parsed but not remote", name);
		round_trip(&a, name);
		sio_nbd_addr_free(&a);
	} else if (ret != -EINVAL && ret != -ENOMEM) {
		broken("unexpected error", name);
	} else {
		sio_nbd_name_is_remote(name);
	}
	free(name);
	return 0;
}
