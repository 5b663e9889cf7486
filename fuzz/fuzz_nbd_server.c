/*
 * libFuzzer target: the NBD server's handshake and request parser, fed
 * hostile bytes as a client (issue 13). Each input is one client's whole
 * byte stream on a socketpair, served against a 1 MiB raw disk attached
 * once; the server must answer or drop it, never crash, leak, read or
 * write outside the export, or hang (libFuzzer's -timeout catches that).
 *
 * Build: meson setup -Dfuzz=true (clang; see meson_options.txt), then
 *   build/fuzz/fuzz_nbd_server -max_total_time=60 CORPUS_DIR
 * Seeds: fuzz/nbd_seeds.py CORPUS_DIR.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "server/nbd_server.h"
#include "siphon.h"

#define DISK_SIZE (1u << 20)
#define MAX_INPUT (256u * 1024)

static struct nbd_server *srv;

static void cleanup_file(const char *path)
{
	if (path)
		unlink(path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	/* tmpfs: flushes cost nothing, so the fuzzer runs at parse speed. */
	static char shm[] = "/dev/shm/siphon-fuzz-nbd-XXXXXX";
	static char tmp[] = "/tmp/siphon-fuzz-nbd-XXXXXX";
	char *path = access("/dev/shm", W_OK) == 0 ? shm : tmp;
	struct siphon_domain_opts dopt = {.size = sizeof(dopt), .workers = 1};
	struct siphon_attach_opts ao = {.size = sizeof(ao), .format = "raw"};
	struct nbd_server_opts so = {.writeback = true};
	siphon_domain *dom;
	siphon_disk *disk;
	int fd;

	(void)argc;
	(void)argv;
	fd = mkstemp(path);
	if (fd < 0 || ftruncate(fd, DISK_SIZE) < 0) {
		perror("fuzz: temp disk");
		exit(1);
	}
	close(fd);
	if (siphon_domain_create(&dopt, &dom) < 0 ||
	    siphon_disk_attach(dom, path, &ao) < 0 ||
	    siphon_disk_get(dom, path, &disk) < 0) {
		fprintf(stderr, "fuzz: attach %s: %s\n", path,
			siphon_get_error());
		exit(1);
	}
	/* The file is open: it can go now (nothing else needs its name). */
	cleanup_file(path);
	/* Write-back on: its holds and early answers are parsed paths too
	   (FUA writes and every other request take the write-through ones). */
	if (nbd_server_create(&so, &srv) < 0 ||
	    nbd_server_add_export(srv, "disk", disk, false) < 0) {
		fprintf(stderr, "fuzz: server\n");
		exit(1);
	}
	return 0;
}

/* Read and drop what the server sent (its replies). */
static void drain(int fd)
{
	char buf[65536];

	while (read(fd, buf, sizeof(buf)) > 0)
		;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int sv[2];
	size_t off = 0;
	int n;

	if (size > MAX_INPUT)
		size = MAX_INPUT;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	fcntl(sv[1], F_SETFL, O_NONBLOCK);
	if (nbd_server_add_connection(srv, sv[0]) < 0)
		abort();
	/* Feed the input while the server works through it. */
	while (off < size) {
		ssize_t w = write(sv[1], data + off, size - off);

		if (w > 0)
			off += (size_t)w;
		else if (w < 0 && errno != EAGAIN)
			break; /* the server hung up */
		nbd_server_step(srv, 0);
		drain(sv[1]);
	}
	shutdown(sv[1], SHUT_WR);
	/* Until the connection is gone and nothing is at the disk. */
	n = nbd_server_step(srv, 0);
	while (n > 0) {
		drain(sv[1]);
		n = nbd_server_step(srv, 10);
	}
	close(sv[1]);
	return 0;
}
