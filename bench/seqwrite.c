/*
 * seqwrite: sequential allocating writes into an image through siphon's
 * write path, the way the stream engine writes: for each chunk, host
 * clusters from img_alloc_run(), the data written there with asynchronous
 * sio_queue writes (several chunks in flight), img_commit_run() once a
 * chunk's data is written, img_flush() every --flush-every bytes and at
 * the end. Prints the throughput, the final flush included.
 *
 * Usage: seqwrite [--size 1G] [--chunk 2M] [--depth 8] [--flush-every 256M]
 *                 IMAGE
 * IMAGE must exist (e.g. `siphon create IMAGE 1G`); it is opened read-write.
 * Last line of output: "MiB/s <value>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"

/* Host runs one chunk may need (alloc_run may return short runs). */
#define MAX_RUNS 64

struct slot {
	struct seq *sq;
	bool busy;
	uint8_t *buf;
	uint64_t off; /* guest offset of the chunk */
	uint64_t len;
	unsigned nruns, pending;
	struct {
		uint64_t off, n, host;
	} runs[MAX_RUNS];
	struct sio_req reqs[MAX_RUNS];
};

struct seq {
	struct img *img;
	struct sio_queue *q;
	int err;
	uint64_t since_flush, flush_every;
};

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int parse_bytes(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;
	switch (*end) {
	case 'k':
	case 'K':
		v <<= 10;
		end++;
		break;
	case 'm':
	case 'M':
		v <<= 20;
		end++;
		break;
	case 'g':
	case 'G':
		v <<= 30;
		end++;
		break;
	default:
		break;
	}
	if (*end)
		return -EINVAL;
	*out = v;
	return 0;
}

/* All of a chunk's data is on disk: link it, maybe flush, free the slot. */
static void slot_done(struct slot *sl)
{
	struct seq *sq = sl->sq;
	struct img *img = sq->img;
	unsigned r;
	int ret = 0;

	for (r = 0; r < sl->nruns && ret >= 0; r++)
		ret = img_commit_run(img, sl->runs[r].off, sl->runs[r].n,
				     sl->runs[r].host, 0);
	sq->since_flush += sl->len;
	if (ret >= 0 && sq->flush_every && sq->since_flush >= sq->flush_every) {
		ret = img_flush(img);
		sq->since_flush = 0;
	}
	if (ret < 0 && !sq->err)
		sq->err = ret;
	sl->busy = false;
}

static void write_done(struct sio_req *req, int res)
{
	struct slot *sl = req->priv;

	if (res < 0 && !sl->sq->err)
		sl->sq->err = res;
	if (--sl->pending == 0)
		slot_done(sl);
}

static int slot_start(struct seq *sq, struct slot *sl, uint64_t off,
		      uint64_t len)
{
	struct img *img = sq->img;
	uint64_t cs = img->cluster_size, done = 0, host, got, n;
	unsigned r;
	int ret;

	sl->off = off;
	sl->len = len;
	sl->nruns = 0;
	while (done < len) {
		if (sl->nruns == MAX_RUNS)
			return sx_error(-E2BIG, "too many host runs per chunk");
		n = (len - done + cs - 1) / cs;
		ret = img_alloc_run(img, off + done, n, &host, &got);
		if (ret < 0)
			return ret;
		sl->runs[sl->nruns].off = off + done;
		sl->runs[sl->nruns].n = got;
		sl->runs[sl->nruns].host = host;
		sl->nruns++;
		done += sx_min(got * cs, len - done);
	}
	sl->busy = true;
	sl->pending = sl->nruns;
	done = 0;
	for (r = 0; r < sl->nruns; r++) {
		struct sio_req *req = &sl->reqs[r];
		uint64_t bytes = sx_min(sl->runs[r].n * cs, len - done);

		memset(req, 0, sizeof(*req));
		req->op = SIO_OP_WRITE;
		req->file = img->file;
		req->buf = sl->buf + done;
		req->off = sl->runs[r].host;
		req->len = bytes;
		req->done = write_done;
		req->priv = sl;
		ret = sio_queue_submit(sq->q, req);
		if (ret < 0)
			return ret;
		done += bytes;
	}
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"size", required_argument, NULL, 's'},
		{"chunk", required_argument, NULL, 'c'},
		{"depth", required_argument, NULL, 'd'},
		{"flush-every", required_argument, NULL, 'F'},
		{NULL, 0, NULL, 0},
	};
	uint64_t size = 1ULL << 30, chunk = 2u << 20, depth = 8, off = 0, i;
	struct seq sq = {.flush_every = 256u << 20};
	struct slot *slots = NULL;
	double t0, t;
	int c, ret = 0;

	while ((c = getopt_long(argc, argv, "s:c:d:F:", opts, NULL)) != -1) {
		if ((c == 's' && parse_bytes(optarg, &size) < 0) ||
		    (c == 'c' && parse_bytes(optarg, &chunk) < 0) ||
		    (c == 'd' && parse_bytes(optarg, &depth) < 0) ||
		    (c == 'F' && parse_bytes(optarg, &sq.flush_every) < 0) ||
		    c == '?') {
			fprintf(stderr, "seqwrite: bad option\n");
			return 2;
		}
	}
	if (optind != argc - 1 || !depth || depth > 256 || !chunk) {
		fprintf(stderr, "usage: seqwrite [--size N] [--chunk N] "
				"[--depth N] [--flush-every N] IMAGE\n");
		return 2;
	}
	ret = img_open(argv[optind], NULL, IMG_OPEN_RDWR, &sq.img);
	if (ret < 0)
		goto out;
	if (!img_can_alloc(sq.img)) {
		ret = sx_error(-ENOTSUP, "%s: no alloc_run/commit_run",
			       argv[optind]);
		goto out;
	}
	size = sx_min(size, sq.img->size);
	chunk = sx_max(chunk, sq.img->cluster_size);
	chunk -= chunk % sq.img->cluster_size;
	ret = sio_queue_create((unsigned)depth * 4, &sq.q);
	if (ret < 0)
		goto out;
	slots = calloc(depth, sizeof(*slots));
	if (!slots) {
		ret = -ENOMEM;
		goto out;
	}
	srand(1);
	for (i = 0; i < depth; i++) {
		uint64_t k;

		slots[i].sq = &sq;
		slots[i].buf = sio_buf_alloc(chunk);
		if (!slots[i].buf) {
			ret = -ENOMEM;
			goto out;
		}
		/* Incompressible, never zero. */
		for (k = 0; k < chunk; k++)
			slots[i].buf[k] = (uint8_t)(rand() % 255 + 1);
	}

	t0 = now();
	while ((off < size || sio_queue_inflight(sq.q)) && !sq.err) {
		for (i = 0; i < depth && off < size && !sq.err; i++) {
			if (slots[i].busy)
				continue;
			ret = slot_start(&sq, &slots[i], off,
					 sx_min(chunk, size - off));
			if (ret < 0)
				goto out;
			off += sx_min(chunk, size - off);
		}
		ret = sio_queue_run(sq.q, 1);
		if (ret < 0)
			goto out;
	}
	ret = sq.err;
	if (ret == 0)
		ret = img_flush(sq.img);
	if (ret < 0)
		goto out;
	t = now() - t0;
	printf("seqwrite: %" PRIu64 " MiB in %.3f s, chunk %" PRIu64
	       " KiB, depth %" PRIu64 ", cluster %" PRIu32 "\n",
	       size >> 20, t, chunk >> 10, depth, sq.img->cluster_size);
	printf("MiB/s %.1f\n", (double)size / 1048576.0 / t);
out:
	if (ret < 0)
		fprintf(stderr, "seqwrite: %s\n",
			sx_last_error()[0] ? sx_last_error() : strerror(-ret));
	sio_queue_destroy(sq.q);
	if (slots)
		for (i = 0; i < depth; i++)
			sio_buf_free(slots[i].buf);
	free(slots);
	img_close(sq.img);
	return ret < 0 ? 1 : 0;
}
