/*
 * multi_stream: many disks streaming at once in one domain, through the
 * public API only (the side of bench/multi_bench.py that runs siphon).
 *
 *   multi_stream [--workers N] IMAGE...
 *
 * Attaches every IMAGE (absolute paths) to one domain, starts a CONTINUOUS
 * stream on each at the same instant, waits for every end event, and prints
 * one JSON object on stdout: wall seconds for all of them, each disk's
 * seconds to its COMPLETED event, the bytes copied, the most threads the
 * process had while streaming (sampled from /proc/self/task every 10 ms),
 * and the peak RSS (getrusage). Exit 0 when every stream completed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "siphon.h"

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * Threads of the process (/proc/self/task), and of them io_uring's kernel
 * workers (iou-wrk-*: the kernel's, started for requests it cannot issue
 * without blocking, not the engine's) into *kernel.
 */
static int count_threads(int *kernel)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	char path[300], comm[32];
	int n = 0;
	FILE *f;

	*kernel = 0;
	if (!d)
		return -1;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		n++;
		snprintf(path, sizeof(path), "/proc/self/task/%s/comm",
			 e->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(comm, sizeof(comm), f) &&
		    !strncmp(comm, "iou-wrk", 7))
			(*kernel)++;
		fclose(f);
	}
	closedir(d);
	return n;
}

int main(int argc, char **argv)
{
	struct siphon_domain_opts dopt = {.size = sizeof(dopt)};
	struct siphon_event ev = {.size = sizeof(ev)};
	siphon_domain *dom = NULL;
	double t0, *done_at = NULL;
	uint64_t copied = 0;
	int first = 1, n, i, left, ret, maxthreads = 0, maxown = 0, failed = 0;
	struct rusage ru;
	struct pollfd pfd;

	if (argc > 2 && !strcmp(argv[1], "--workers")) {
		dopt.workers = (unsigned)strtoul(argv[2], NULL, 0);
		first = 3;
	}
	n = argc - first;
	if (n < 1) {
		fprintf(stderr, "usage: multi_stream [--workers N] IMAGE...\n");
		return 2;
	}
	done_at = calloc((size_t)n, sizeof(*done_at));
	if (!done_at)
		return 1;
	ret = siphon_domain_create(&dopt, &dom);
	if (ret < 0) {
		fprintf(stderr, "domain: %s\n", siphon_get_error());
		return 1;
	}
	for (i = 0; i < n; i++) {
		ret = siphon_disk_attach(dom, argv[first + i], NULL);
		if (ret < 0) {
			fprintf(stderr, "attach: %s\n", siphon_get_error());
			return 1;
		}
	}
	t0 = now_s();
	for (i = 0; i < n; i++) {
		ret = siphon_block_stream(dom, argv[first + i], NULL,
					  SIPHON_STREAM_CONTINUOUS);
		if (ret < 0) {
			fprintf(stderr, "stream: %s\n", siphon_get_error());
			return 1;
		}
	}
	pfd.fd = siphon_domain_event_fd(dom);
	pfd.events = POLLIN;
	for (left = n; left > 0;) {
		int k, t = count_threads(&k);

		if (t > maxthreads)
			maxthreads = t;
		if (t - k > maxown)
			maxown = t - k;
		while (left > 0 && siphon_domain_next_event(dom, &ev) > 0) {
			for (i = 0; i < n; i++)
				if (!strcmp(ev.path, argv[first + i]))
					done_at[i] = now_s() - t0;
			if (ev.kind != SIPHON_EVENT_STREAM_COMPLETED) {
				fprintf(stderr, "%s: %s\n", ev.path,
					ev.message);
				failed++;
			}
			copied += ev.bytes_copied;
			left--;
		}
		if (left > 0 && poll(&pfd, 1, 10) < 0 && errno != EINTR)
			return 1;
	}
	printf("{\"disks\": %d, \"seconds\": %.3f, \"bytes_copied\": %" PRIu64
	       ", \"max_threads\": %d, \"max_own_threads\": %d, "
	       "\"per_disk\": [",
	       n, now_s() - t0, copied, maxthreads, maxown);
	for (i = 0; i < n; i++)
		printf("%s%.3f", i ? ", " : "", done_at[i]);
	for (i = 0; i < n; i++)
		siphon_disk_detach(dom, argv[first + i], 0);
	siphon_domain_close(dom);
	getrusage(RUSAGE_SELF, &ru);
	printf("], \"max_rss_kib\": %ld}\n", ru.ru_maxrss);
	free(done_at);
	return failed ? 1 : 0;
}
