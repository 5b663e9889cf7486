/*
 * `siphon dump`: write the guest content of an image chain into a new raw
 * file, sparse wherever the chain reads as zeros.
 *
 * The copy is a pipeline of NCHUNKS buffers of CHUNK bytes. The planner
 * (on this thread, synchronous metadata) skips runs that read as zeros, then
 * fills a buffer with one guest window: DATA runs become asynchronous reads
 * from the layer's file, zero runs a memset, compressed clusters a
 * synchronous decompression. When a window's reads have completed, its
 * non-zero blocks are written asynchronously; all-zero blocks are left as
 * holes. The output is truncated to the virtual size at the end.
 *
 * Invariants: a window starts at a multiple of `gran` (the zero-detection
 * and write unit, a multiple of the output's direct-I/O alignment), so every
 * write is aligned; a buffer is reused only when all its requests are done;
 * on failure the partial output is removed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "io/nbd.h"
#include "cmd.h"

#define CHUNK (1U << 20)
#define NCHUNKS 16
#define QUEUE_DEPTH 128
#define MIN_GRAN 4096

struct dump;

struct chunk {
	struct dump *d;
	uint8_t *buf; /* CHUNK bytes, SIO_BUF_ALIGN aligned */
	uint64_t start; /* guest offset, multiple of d->gran */
	uint64_t len; /* guest bytes in this window */
	unsigned pending; /* requests in flight */
	struct chunk *next_free;
};

struct dump_req {
	struct sio_req req;
	struct chunk *c;
};

struct dump {
	struct img *img;
	struct sio_file *out;
	struct sio_queue *q;
	uint64_t pos; /* next guest offset to plan */
	uint32_t gran;
	struct chunk chunks[NCHUNKS];
	struct chunk *free_list;
	uint8_t *cbuf; /* one decompressed cluster */
	size_t cbuf_size;
	int err; /* first failure */
};

static void chunk_put(struct chunk *c)
{
	c->next_free = c->d->free_list;
	c->d->free_list = c;
}

static void dump_fail(struct dump *d, int err)
{
	if (!d->err)
		d->err = err;
}

static void write_done(struct sio_req *req, int res)
{
	struct dump_req *r = (struct dump_req *)req;
	struct chunk *c = r->c;

	if (res < 0)
		dump_fail(c->d,
			  sx_error(res, "%s: write at %" PRIu64 ": %s",
				   req->file->path, req->off, strerror(-res)));
	free(r);
	if (--c->pending == 0)
		chunk_put(c);
}

static int submit(struct dump *d, struct chunk *c, enum sio_op op,
		  struct sio_file *f, void *buf, uint64_t len, uint64_t off,
		  sio_done_fn done)
{
	struct dump_req *r;
	int ret;

	r = calloc(1, sizeof(*r));
	if (!r)
		return sx_error(-ENOMEM, "out of memory");
	r->c = c;
	r->req.op = op;
	r->req.file = f;
	r->req.buf = buf;
	r->req.off = off;
	r->req.len = len;
	r->req.done = done;
	ret = sio_queue_submit(d->q, &r->req);
	if (ret < 0) {
		free(r);
		return sx_error(ret, "%s: cannot queue I/O at %" PRIu64 ": %s",
				f->path, off, strerror(-ret));
	}
	c->pending++;
	return 0;
}

static bool all_zero(const uint8_t *p, size_t len)
{
	/* memcmp against itself shifted by one is vectorised by libc. */
	return p[0] == 0 && !memcmp(p, p + 1, len - 1);
}

/* Write the non-zero blocks of a filled window; zero blocks stay holes. */
static void chunk_write(struct chunk *c)
{
	struct dump *d = c->d;
	uint64_t wlen, b, run = 0;
	bool in_run = false;
	int ret;

	if (sx_align_up(c->len, d->gran, &wlen) < 0)
		wlen = c->len;
	/* Keep the window busy until every write of it is queued. */
	c->pending++;
	for (b = 0; b <= wlen; b += d->gran) {
		bool data = b < wlen && !all_zero(c->buf + b, d->gran);

		if (data && !in_run) {
			run = b;
			in_run = true;
		} else if (!data && in_run) {
			in_run = false;
			ret = submit(d, c, SIO_OP_WRITE, d->out, c->buf + run,
				     b - run, c->start + run, write_done);
			if (ret < 0) {
				dump_fail(d, ret);
				break;
			}
		}
	}
	if (--c->pending == 0)
		chunk_put(c);
}

static void read_done(struct sio_req *req, int res)
{
	struct dump_req *r = (struct dump_req *)req;
	struct chunk *c = r->c;
	struct dump *d = c->d;

	if (res < 0)
		dump_fail(d,
			  sx_error(res, "%s: read at %" PRIu64 ": %s",
				   req->file->path, req->off, strerror(-res)));
	free(r);
	if (--c->pending)
		return;
	if (d->err)
		chunk_put(c);
	else
		chunk_write(c);
}

static bool can_async(struct sio_file *f, const void *buf, uint64_t len,
		      uint64_t off)
{
	uint64_t a = f->direct ? f->align : 1;
	uint64_t ma = f->direct ? f->mem_align : 1;

	if (!a)
		a = 1;
	if (!ma)
		ma = 1;
	return !(off % a) && !(len % a) && !((uintptr_t)buf % ma);
}

/* Bytes [p->from, p->from + p->len) of a compressed cluster into dst. */
static int read_compressed(struct dump *d, const struct img_piece *p,
			   uint8_t *dst)
{
	int ret;

	if (d->cbuf_size < p->layer->cluster_size) {
		free(d->cbuf);
		d->cbuf_size = p->layer->cluster_size;
		d->cbuf = malloc(d->cbuf_size);
		if (!d->cbuf) {
			d->cbuf_size = 0;
			return sx_error(-ENOMEM, "out of memory");
		}
	}
	ret = img_read_compressed(p->layer, p->cluster_off, d->cbuf);
	if (ret < 0)
		return ret;
	memcpy(dst, d->cbuf + p->from, p->len);
	return 0;
}

/*
 * Plan the next window into c. Returns 1 when a window was started, 0 when
 * nothing is left to copy, -errno on failure.
 */
static int chunk_plan(struct dump *d, struct chunk *c)
{
	uint64_t size = d->img->size, end, p, wlen;
	struct img_extent e;
	struct img_piece pc;
	unsigned depth;
	int ret;

	/* Skip whole blocks that read as zeros. */
	while (d->pos < size) {
		ret = img_chain_status(d->img, NULL, d->pos, size - d->pos, &e,
				       &depth);
		if (ret < 0)
			return ret;
		if (e.status != IMG_ZERO && e.status != IMG_UNALLOC)
			break;
		if (d->pos + e.len >= size) {
			d->pos = size;
			break;
		}
		end = sx_align_down(d->pos + e.len, d->gran);
		if (end <= d->pos)
			break;
		d->pos = end;
	}
	if (d->pos >= size)
		return 0;

	c->start = d->pos;
	end = sx_min(c->start + CHUNK, size);
	c->pending = 1; /* the planner's own hold */
	for (p = c->start; p < end;) {
		uint8_t *dst = c->buf + (p - c->start);
		uint64_t n;

		ret = img_chain_piece(d->img, p, end - p, &pc);
		if (ret < 0)
			goto fail;
		n = pc.len;
		switch (pc.status) {
		case IMG_DATA:
			if (can_async(pc.file, dst, n, pc.host_off)) {
				ret = submit(d, c, SIO_OP_READ, pc.file, dst, n,
					     pc.host_off, read_done);
			} else {
				ret = sio_pread(pc.file, dst, n, pc.host_off);
			}
			if (ret < 0)
				goto fail;
			break;
		case IMG_COMPRESSED:
			ret = read_compressed(d, &pc, dst);
			if (ret < 0)
				goto fail;
			break;
		default:
			/*
			 * Zeros to the end of the window: end the window at
			 * the next block boundary so the next plan skips
			 * the rest without touching memory.
			 */
			if (p + n == end && end < size) {
				uint64_t b;

				if (sx_align_up(p, d->gran, &b) == 0 &&
				    b > c->start && b < end) {
					memset(dst, 0, b - p);
					end = b;
					n = b - p;
					break;
				}
			}
			memset(dst, 0, n);
			break;
		}
		p += n;
	}
	c->len = end - c->start;
	d->pos = end;
	/* The last window's tail up to the block is written, then cut off. */
	if (sx_align_up(c->len, d->gran, &wlen) == 0 && wlen > c->len)
		memset(c->buf + c->len, 0, wlen - c->len);
	if (--c->pending == 0)
		chunk_write(c);
	return 1;

fail:
	/* Reads already queued finish into this buffer before it is reused. */
	if (--c->pending == 0)
		chunk_put(c);
	return ret;
}

static int dump_run(struct dump *d)
{
	uint64_t size = d->img->size;
	int ret;

	for (;;) {
		while (!d->err && d->pos < size && d->free_list) {
			struct chunk *c = d->free_list;

			d->free_list = c->next_free;
			ret = chunk_plan(d, c);
			if (ret <= 0) {
				if (ret < 0)
					dump_fail(d, ret);
				else
					chunk_put(c);
				break;
			}
			/* Start the reads while the next window is planned. */
			ret = sio_queue_run(d->q, 0);
			if (ret < 0)
				dump_fail(d, ret);
		}
		if (!sio_queue_inflight(d->q)) {
			/* Every busy window has a request in flight. */
			if (!d->err && d->pos < size && !d->free_list)
				dump_fail(d, sx_error(-EIO,
						      "dump: stalled "
						      "at %" PRIu64,
						      d->pos));
			if (d->err || d->pos >= size)
				break;
			continue;
		}
		ret = sio_queue_run(d->q, 1);
		if (ret < 0) {
			dump_fail(d, ret);
			break;
		}
	}
	return d->err;
}

/* Refuse to write over any file of the chain, whatever its name. */
static int check_not_in_chain(struct img *img, const char *out,
			      const struct stat *ost)
{
	struct stat st;

	for (; img; img = img->backing) {
		/* An export is not a local file that out could be. */
		if (sio_file_is_nbd(img->file))
			continue;
		if (fstat(img->file->fd, &st) < 0)
			continue;
		if (st.st_dev == ost->st_dev && st.st_ino == ost->st_ino)
			return sx_error(-EINVAL,
					"%s: is %s, part of the "
					"image chain; refusing to overwrite",
					out, img->path);
	}
	return 0;
}

static int dump_image(struct img *img, const char *out_path, bool force)
{
	struct dump d = {.img = img};
	bool created = false;
	struct stat st;
	unsigned flags;
	int ret, i;

	/* Not a local file with an odd name either. */
	if (sio_nbd_name_is_remote(out_path))
		return sx_error(-EROFS,
				"%s: cannot dump onto an NBD export "
				"(exports are read-only)",
				out_path);
	if (stat(out_path, &st) == 0) {
		if (!force)
			return sx_error(-EEXIST,
					"%s: file exists (use --force "
					"to overwrite it)",
					out_path);
		if (!S_ISREG(st.st_mode))
			return sx_error(-EINVAL, "%s: not a regular file",
					out_path);
		ret = check_not_in_chain(img, out_path, &st);
		if (ret < 0)
			return ret;
		flags = SIO_RDWR | SIO_CREATE | SIO_TRUNC;
	} else {
		flags = SIO_RDWR | SIO_CREATE | SIO_EXCL;
	}
	/*
	 * The output is written once, front to back, and made durable by one
	 * fdatasync at the end: through the page cache the kernel merges it
	 * into large writeback. Measured on this VM (1 GiB, page cache
	 * dropped, timed to the end of sync): 1.9-2.0 s buffered against
	 * 2.4-2.7 s O_DIRECT. The image side stays O_DIRECT.
	 */
	ret = sio_file_open(out_path, flags | SIO_BUFFERED, &d.out);
	if (ret < 0)
		return ret;
	created = true;

	d.gran = MIN_GRAN;
	if (d.out->direct) {
		d.gran = (uint32_t)sx_max(d.gran, d.out->align);
		d.gran = (uint32_t)sx_max(d.gran, d.out->mem_align);
	}
	if (!sx_is_pow2(d.gran) || d.gran > CHUNK) {
		ret = sx_error(-EINVAL, "%s: unusable I/O alignment %" PRIu32,
			       out_path, d.gran);
		goto out;
	}
	for (i = 0; i < NCHUNKS; i++) {
		d.chunks[i].d = &d;
		d.chunks[i].buf = sio_buf_alloc(CHUNK);
		if (!d.chunks[i].buf) {
			ret = sx_error(-ENOMEM, "out of memory");
			goto out;
		}
		chunk_put(&d.chunks[i]);
	}
	ret = sio_queue_create(QUEUE_DEPTH, &d.q);
	if (ret < 0)
		goto out;

	ret = dump_run(&d);
	if (ret < 0)
		goto out;
	ret = sio_file_truncate(d.out, img->size);
	if (ret < 0)
		goto out;
	ret = sio_fdatasync(d.out);
out:
	sio_queue_destroy(d.q);
	for (i = 0; i < NCHUNKS; i++)
		sio_buf_free(d.chunks[i].buf);
	free(d.cbuf);
	sio_file_close(d.out);
	if (ret < 0 && created)
		unlink(out_path);
	return ret;
}

static void dump_help(FILE *f)
{
	fprintf(f,
		"Usage: siphon dump [-f FMT] [--force] IMAGE OUT.raw\n\n"
		"Write the guest content of IMAGE (through its backing chain) "
		"into the new\nraw file OUT.raw. Ranges that read as zeros, "
		"and data blocks that are all\nzeros, are left as holes. "
		"OUT.raw is removed again if the copy fails.\n\n"
		"Options:\n"
		"  -f, --format FMT    IMAGE is in format FMT (qcow2, raw) "
		"instead of probed\n"
		"      --force         overwrite OUT.raw if it exists (never "
		"a file of the chain)\n"
		"  -h, --help          this help\n\n%s",
		tool_exit_help);
}

static int dump_cmd(const struct siphon_cmd *cmd, int argc, char **argv)
{
	static const struct option opts[] = {
		{"format", required_argument, NULL, 'f'},
		{"force", no_argument, NULL, 'F'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *fmt = NULL;
	struct img *img = NULL;
	bool force = false;
	int c, ret;

	while ((c = getopt_long(argc, argv, "+:f:h", opts, NULL)) != -1) {
		switch (c) {
		case 'f':
			fmt = optarg;
			break;
		case 'F':
			force = true;
			break;
		case 'h':
			dump_help(stdout);
			return TOOL_OK;
		default:
			return tool_bad_option(cmd, c, argv);
		}
	}
	if (argc - optind != 2)
		return tool_usage(cmd, "expected IMAGE and OUT.raw");

	ret = img_open(argv[optind], fmt, 0, &img);
	if (ret < 0)
		return tool_fail(ret);
	ret = dump_image(img, argv[optind + 1], force);
	img_close(img);
	return ret < 0 ? tool_fail(ret) : TOOL_OK;
}

const struct siphon_cmd cmd_dump = {
	.name = "dump",
	.summary = "write an image chain's guest content to a raw file",
	.run = dump_cmd,
	.help = dump_help,
};
