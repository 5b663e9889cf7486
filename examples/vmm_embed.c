/*
 * vmm_embed: embed libsiphon the way a VMM would.
 *
 * Usage: vmm_embed [-q] [-b BYTES_PER_SEC] IMAGE
 *
 * Creates a domain, attaches IMAGE (an absolute path; a relative one is
 * made absolute here, since disks are named by their absolute path), starts
 * a CONTINUOUS stream, and then runs an event loop the way a VMM's main
 * loop would: poll(2) on the domain's event fd with a timeout, drawing
 * progress from siphon_get_block_stream_info() on every timeout, until the
 * completion event arrives. Exits 0 when the stream completed, 1 on any
 * failure or cancellation, 77 when io_uring is unavailable on this host.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "siphon.h"

static void draw_progress(siphon_domain *dom, const char *path, bool quiet)
{
	struct siphon_block_stream_info info[8];
	int n, i;

	n = siphon_get_block_stream_info(dom, info, 8, 0);
	if (n < 0 || quiet)
		return;
	for (i = 0; i < n && i < 8; i++) {
		if (strcmp(info[i].path, path))
			continue;
		/* cur/end approximates progress; the cursor is opaque. */
		printf("progress: %5.1f%%\n",
		       info[i].end ? 100.0 * (double)info[i].cur /
					     (double)info[i].end
				   : 100.0);
		fflush(stdout);
	}
}

int main(int argc, char **argv)
{
	struct siphon_event ev = {.size = sizeof(ev)};
	struct siphon_block_stream_params prm = {.size = sizeof(prm)};
	char path[PATH_MAX];
	siphon_domain *dom = NULL;
	struct pollfd pfd;
	bool quiet = false, done = false;
	int ret, opt, status = 1;

	while ((opt = getopt(argc, argv, "qb:")) != -1) {
		switch (opt) {
		case 'q':
			quiet = true;
			break;
		case 'b':
			prm.bandwidth = strtoull(optarg, NULL, 0);
			break;
		default:
			goto usage;
		}
	}
	if (optind != argc - 1)
		goto usage;
	if (!realpath(argv[optind], path)) {
		fprintf(stderr, "vmm_embed: %s: %s\n", argv[optind],
			strerror(errno));
		return 1;
	}

	ret = siphon_domain_create(NULL, &dom);
	if (ret < 0)
		goto fail;
	ret = siphon_disk_attach(dom, path, NULL);
	if (ret < 0)
		goto fail;
	ret = siphon_block_stream_ex(dom, path, NULL, SIPHON_STREAM_CONTINUOUS,
				     &prm);
	if (ret < 0)
		goto fail;

	pfd.fd = siphon_domain_event_fd(dom);
	pfd.events = POLLIN;
	while (!done) {
		ret = poll(&pfd, 1, 100);
		if (ret < 0 && errno != EINTR) {
			perror("vmm_embed: poll");
			goto out;
		}
		if (ret == 0) {
			draw_progress(dom, path, quiet);
			continue;
		}
		while (!done &&
		       (ret = siphon_domain_next_event(dom, &ev)) > 0) {
			if (strcmp(ev.path, path))
				continue;
			done = true;
			if (ev.kind == SIPHON_EVENT_STREAM_COMPLETED) {
				if (!quiet)
					printf("completed: %llu bytes copied\n",
					       (unsigned long long)
						       ev.bytes_copied);
				status = 0;
			} else {
				fprintf(stderr,
					"vmm_embed: %s: stream %s: %s\n", path,
					ev.kind == SIPHON_EVENT_STREAM_CANCELLED
						? "cancelled"
						: "failed",
					ev.message);
			}
		}
		if (ret < 0)
			goto fail;
	}
	goto out;
fail:
	fprintf(stderr, "vmm_embed: %s\n", siphon_get_error());
	if (strstr(siphon_get_error(), "io_uring"))
		status = 77;
out:
	siphon_domain_close(dom);
	return status;
usage:
	fprintf(stderr, "usage: vmm_embed [-q] [-b BYTES_PER_SEC] IMAGE\n");
	return 2;
}
