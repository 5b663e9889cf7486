/*
 * Crash helper for test_guest_stress: runs the guest workload
 * (guest_workload.h) on a disk while a CONTINUOUS stream runs, forever,
 * until the test SIGKILLs it. Each thread appends to LOGDIR/log.T the
 * index of every op once it completed (bit 31 set for flushes), with one
 * write(2) each, so the record survives the kill; the test then replays
 * the sequence and checks that every write completed before the last
 * completed flush reads back.
 *
 * usage: guest_crash_helper TOP NTHREADS SEED LOGDIR
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "guest_workload.h"
#include "siphon.h"

static siphon_disk *disk;
static uint64_t disk_size, seed;
static unsigned nthreads;
static const char *logdir;

static void *worker(void *arg)
{
	unsigned t = (unsigned)(uintptr_t)arg;
	uint64_t rng = wl_seed(seed, t);
	uint8_t *buf = malloc(WL_STRIPE);
	char path[1024];
	struct wl_op op;
	uint32_t i, rec;
	int fd, ret = 0;

	snprintf(path, sizeof(path), "%s/log.%u", logdir, t);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
	if (fd < 0 || !buf)
		exit(2);
	for (i = 0;; i++) {
		wl_next(&rng, t, nthreads, disk_size, &op);
		ret = wl_issue(disk, &op, buf);
		if (ret < 0) {
			fprintf(stderr, "op %u failed: %s\n", i,
				siphon_get_error());
			exit(3);
		}
		rec = i | (op.kind == WL_FLUSH ? 1u << 31 : 0);
		if (write(fd, &rec, sizeof(rec)) != sizeof(rec))
			exit(4);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct siphon_block_stream_params p = {.size = sizeof(p),
					       .bandwidth = 4 << 20};
	siphon_domain *dom;
	pthread_t th[16];
	unsigned t;

	if (argc != 5)
		return 1;
	nthreads = (unsigned)atoi(argv[2]);
	seed = strtoull(argv[3], NULL, 0);
	logdir = argv[4];
	if (nthreads < 1 || nthreads > 16)
		return 1;
	if (siphon_domain_create(NULL, &dom) < 0 ||
	    siphon_disk_attach(dom, argv[1], NULL) < 0 ||
	    siphon_disk_get(dom, argv[1], &disk) < 0 ||
	    siphon_disk_get_size(disk, &disk_size) < 0 ||
	    siphon_block_stream_ex(dom, argv[1], NULL, SIPHON_STREAM_CONTINUOUS,
				   &p) < 0) {
		fprintf(stderr, "setup: %s\n", siphon_get_error());
		return 1;
	}
	for (t = 0; t < nthreads; t++)
		pthread_create(&th[t], NULL, worker, (void *)(uintptr_t)t);
	for (t = 0; t < nthreads; t++)
		pthread_join(th[t], NULL);
	return 0;
}
