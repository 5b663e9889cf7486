/*
 * nbd_name_probe NAME: print what siphon's parser reads in an NBD backing
 * name, one "field=value" per line (transport, host, port, socket, export,
 * uri: the canonical URI), for test_nbd_name.sh to compare with the server
 * QEMU reached through the same name. Exit 0; 1 with the parser's message
 * on stderr when the name is refused.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>

#include "common/error.h"
#include "io/nbd_name.h"

int main(int argc, char **argv)
{
	struct sio_nbd_addr a;
	char *uri;
	int ret;

	if (argc != 2) {
		fprintf(stderr, "usage: nbd_name_probe NAME\n");
		return 2;
	}
	ret = sio_nbd_name_parse(argv[1], &a);
	if (ret) {
		fprintf(stderr, "%s\n", sx_last_error());
		return 1;
	}
	uri = sio_nbd_addr_uri(&a);
	if (!uri) {
		fprintf(stderr, "out of memory\n");
		sio_nbd_addr_free(&a);
		return 1;
	}
	if (a.transport == SIO_NBD_UNIX)
		printf("transport=unix\nsocket=%s\n", a.socket);
	else
		printf("transport=tcp\nhost=%s\nport=%s\n", a.host, a.port);
	printf("export=%s\nuri=%s\n", a.export_name, uri);
	free(uri);
	sio_nbd_addr_free(&a);
	return 0;
}
