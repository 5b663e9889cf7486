/*
 * Guest random-read benchmark: 4 KiB random reads at queue depth 32, IOPS
 * and p50/p99 latency, either through siphon's guest I/O API or with
 * io_uring directly on a file (O_DIRECT), the device-level reference.
 *
 *   guest_randread raw FILE SECONDS
 *   guest_randread siphon IMAGE SECONDS [stream]
 *
 * With "stream", a CONTINUOUS stream runs on IMAGE during the measurement
 * and the program then waits for it to complete (and says so). With
 * GUEST_BENCH_WRITE=1 in the environment the siphon mode issues 4 KiB
 * random writes instead (on an overlay: allocating, copy-on-write).
 * Not a test: run by bench/guest_bench.sh.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "siphon.h"

#define QD 32
#define BS 4096
#define MAX_SAMPLES (8u << 20)

static uint64_t *lat, *when; /* latency and completion time per read */
static size_t nlat;
static uint64_t rng = 88172645463325252ull;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void print_stats(const char *what, uint64_t *v, size_t n, double secs)
{
	qsort(v, n, sizeof(*v), cmp_u64);
	printf("%-28s iops %8.0f  p50 %7.1f us  p99 %7.1f us\n", what,
	       secs > 0 ? (double)n / secs : 0.0, n ? v[n / 2] / 1e3 : 0.0,
	       n ? v[n * 99 / 100] / 1e3 : 0.0);
}

/*
 * The latencies of the reads completed in [a, b) (times since t0), into
 * tmp; returns how many.
 */
static size_t window(uint64_t *tmp, uint64_t t0, uint64_t a, uint64_t b)
{
	size_t i, n = 0;

	for (i = 0; i < nlat; i++)
		if (when[i] - t0 >= a && when[i] - t0 < b)
			tmp[n++] = lat[i];
	return n;
}

/*
 * The whole run; with GUEST_BENCH_TIMELINE=1 also p50/p99 per 250 ms, and
 * with a stream that completed during the reads, the reads up to then.
 */
static void report(const char *what, uint64_t t0, uint64_t t1, uint64_t t_end)
{
	const char *tl = getenv("GUEST_BENCH_TIMELINE");
	uint64_t *tmp = malloc(nlat * sizeof(*tmp) + 1), a, step = 250000000;
	char name[64];
	size_t n;

	if (tmp && tl && *tl == '1') {
		for (a = 0; a < t1 - t0; a += step) {
			n = window(tmp, t0, a, a + step);
			snprintf(name, sizeof(name), "  %5.2f-%5.2f s", a / 1e9,
				 (a + step) / 1e9);
			print_stats(name, tmp, n, step / 1e9);
		}
	}
	if (tmp && t_end && t_end < t1) {
		n = window(tmp, t0, 0, t_end - t0);
		print_stats("  while the stream ran", tmp, n,
			    (t_end - t0) / 1e9);
		n = window(tmp, t0, t_end - t0, t1 - t0);
		print_stats("  after the stream", tmp, n, (t1 - t_end) / 1e9);
	}
	free(tmp);
	print_stats(what, lat, nlat, (double)(t1 - t0) / 1e9);
}

static int run_raw(const char *path, double secs)
{
	struct io_uring ring;
	uint64_t start[QD], t0, end, blocks;
	struct stat st;
	void *bufs[QD];
	int fd, i;

	fd = open(path, O_RDONLY | O_DIRECT);
	if (fd < 0 || fstat(fd, &st) < 0 || io_uring_queue_init(QD, &ring, 0))
		return 1;
	blocks = (uint64_t)st.st_size / BS;
	t0 = now_ns();
	end = t0 + (uint64_t)(secs * 1e9);
	for (i = 0; i < QD; i++) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);

		if (posix_memalign(&bufs[i], 4096, BS))
			return 1;
		io_uring_prep_read(sqe, fd, bufs[i], BS, rnd() % blocks * BS);
		sqe->user_data = (uint64_t)i;
		start[i] = now_ns();
	}
	io_uring_submit(&ring);
	for (;;) {
		struct io_uring_cqe *cqe;
		struct io_uring_sqe *sqe;
		uint64_t t;

		if (io_uring_wait_cqe(&ring, &cqe))
			return 1;
		i = (int)cqe->user_data;
		if (cqe->res != BS)
			return 1;
		io_uring_cqe_seen(&ring, cqe);
		t = now_ns();
		if (nlat < MAX_SAMPLES) {
			when[nlat] = t;
			lat[nlat++] = t - start[i];
		}
		if (t >= end)
			break;
		sqe = io_uring_get_sqe(&ring);
		io_uring_prep_read(sqe, fd, bufs[i], BS, rnd() % blocks * BS);
		sqe->user_data = (uint64_t)i;
		start[i] = t;
		io_uring_submit(&ring);
	}
	report("io_uring raw file", t0, now_ns(), 0);
	return 0;
}

struct slot {
	struct iovec iov;
	uint64_t start;
};

static siphon_disk *disk;
static uint64_t disk_blocks, end_ns;
static struct slot slots[QD];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int active;
static bool writes; /* GUEST_BENCH_WRITE: writes instead of reads */

static int submit(siphon_disk *d, struct slot *s, siphon_io_fn cb)
{
	uint64_t off = rnd() % disk_blocks * BS;

	if (writes)
		return siphon_disk_aio_write(d, &s->iov, 1, off, 0, cb, s);
	return siphon_disk_aio_read(d, &s->iov, 1, off, 0, cb, s);
}

static void read_done(siphon_disk *d, int ret, void *opaque)
{
	struct slot *s = opaque;
	uint64_t t = now_ns();

	if (ret < 0)
		fprintf(stderr, "read failed: %d\n", ret);
	/* Runs on the disk's worker only: no lock needed for the samples. */
	if (nlat < MAX_SAMPLES) {
		when[nlat] = t;
		lat[nlat++] = t - s->start;
	}
	if (t < end_ns && ret == 0) {
		s->start = t;
		if (submit(d, s, read_done) == 0)
			return;
	}
	pthread_mutex_lock(&lock);
	if (--active == 0)
		pthread_cond_signal(&cond);
	pthread_mutex_unlock(&lock);
}

static int run_siphon(const char *path, double secs, int stream)
{
	struct siphon_event ev = {.size = sizeof(ev)};
	siphon_domain *dom;
	uint64_t size, t0, t1, t_end = 0;
	bool got = false;
	int i;

	if (siphon_domain_create(NULL, &dom) ||
	    siphon_disk_attach(dom, path, NULL) ||
	    siphon_disk_get(dom, path, &disk) ||
	    siphon_disk_get_size(disk, &size)) {
		fprintf(stderr, "%s\n", siphon_get_error());
		return 1;
	}
	disk_blocks = size / BS;
	if (getenv("GUEST_BENCH_COR")) {
		const char *c = getenv("GUEST_BENCH_COR");

		siphon_disk_set_copy_on_read(
			disk, !strcmp(c, "on")	  ? SIPHON_COR_ON
			      : !strcmp(c, "off") ? SIPHON_COR_OFF
						  : SIPHON_COR_AUTO);
	}
	if (stream &&
	    siphon_block_stream(dom, path, NULL, SIPHON_STREAM_CONTINUOUS)) {
		fprintf(stderr, "%s\n", siphon_get_error());
		return 1;
	}
	writes = getenv("GUEST_BENCH_WRITE") &&
		 !strcmp(getenv("GUEST_BENCH_WRITE"), "1");
	t0 = now_ns();
	end_ns = t0 + (uint64_t)(secs * 1e9);
	active = QD;
	for (i = 0; i < QD; i++) {
		if (posix_memalign(&slots[i].iov.iov_base, 4096, BS))
			return 1;
		slots[i].iov.iov_len = BS;
		slots[i].start = now_ns();
		memset(slots[i].iov.iov_base, 0x5a, BS);
		if (submit(disk, &slots[i], read_done))
			return 1;
	}
	/* Watch for the stream's end while the reads run. */
	pthread_mutex_lock(&lock);
	while (active) {
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += 10000000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		pthread_cond_timedwait(&cond, &lock, &ts);
		if (stream && !got && siphon_domain_next_event(dom, &ev) > 0) {
			got = true;
			t_end = now_ns();
		}
	}
	pthread_mutex_unlock(&lock);
	t1 = now_ns();
	report(stream ? "siphon, stream running" : "siphon, idle", t0, t1,
	       t_end);
	if (stream) {
		while (!got && siphon_domain_next_event(dom, &ev) == 0)
			usleep(10000);
		if (!got)
			t_end = now_ns();
		printf("%-28s %s after %.2f s (%s the reads)\n", "stream",
		       ev.kind == SIPHON_EVENT_STREAM_COMPLETED
			       ? "completed"
			       : "DID NOT complete",
		       (t_end - t0) / 1e9, got ? "during" : "after");
	}
	siphon_disk_put(disk);
	siphon_domain_close(dom);
	return 0;
}

int main(int argc, char **argv)
{
	double secs;

	if (argc < 4) {
		fprintf(stderr, "usage: %s raw|siphon PATH SECONDS [stream]\n",
			argv[0]);
		return 2;
	}
	secs = atof(argv[3]);
	lat = malloc(MAX_SAMPLES * sizeof(*lat));
	when = malloc(MAX_SAMPLES * sizeof(*when));
	if (!lat || !when)
		return 1;
	if (!strcmp(argv[1], "raw"))
		return run_raw(argv[2], secs);
	return run_siphon(argv[2], secs,
			  argc > 4 && !strcmp(argv[4], "stream"));
}
