/*
 * One metadata read for a parked request (see meta_fetch.h).
 *
 * Invariants: at most one read per struct meta_fetch in flight (busy); the
 * read covers the missing range rounded out to the file's direct-I/O
 * alignment, so any slice size works on any file; its buffer lives from
 * meta_fetch_start() to just before done runs. A miss of kind
 * IMG_META_NBD_STATUS is a block status request on the queue instead,
 * into a zeroed array of extents (one more than asked: the end marker).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>

#include "common/checked.h"
#include "common/error.h"
#include "io/nbd.h"
#include "meta_fetch.h"

/* A block status answer: the extents asked for and the end marker. */
#define STATUS_BYTES ((IMG_META_EXTENTS + 1) * sizeof(struct sio_nbd_extent))

static void fetch_done(struct sio_req *io, int res)
{
	struct meta_fetch *f = io->priv;

	if (res >= 0) {
		img_meta_fill(f->miss.layer, &f->miss.req, f->buf + f->skip);
		res = 0;
	} else {
		/*
		 * A local file: the synchronous retry meets the error again
		 * and reports it with its message. A server's: this is the
		 * answer (meta_fetch.h).
		 */
		f->misses = META_FETCH_TRIES;
		if (sio_file_is_nbd(io->file))
			f->err = res;
	}
	sio_buf_free(f->buf);
	f->buf = NULL;
	f->busy = false;
	f->done(f, res);
}

int meta_fetch_start(struct meta_fetch *f, struct sio_queue *q,
		     meta_fetch_fn done, void *priv)
{
	const struct img_meta_req *r = &f->miss.req;
	struct sio_file *file = r->file;
	uint64_t a, b, bytes;
	int ret;

	if (f->busy || !f->miss.layer || !file || !r->len)
		return -EINVAL;
	f->misses++;
	if (r->kind == IMG_META_NBD_STATUS) {
		/* The server's extents, into room for them and the end. */
		a = r->host_off;
		b = a + r->len;
		bytes = STATUS_BYTES;
	} else {
		/* The slice, rounded out to the file's alignment. */
		a = sx_align_down(r->host_off, file->align);
		if (sx_align_up(r->host_off + r->len, file->align, &b) < 0)
			return -EOVERFLOW;
		bytes = b - a;
	}
	f->buf = sio_buf_alloc(bytes);
	if (!f->buf)
		return -ENOMEM;
	/* Zeroed: an extent of length 0 ends what the server said. */
	if (r->kind == IMG_META_NBD_STATUS)
		memset(f->buf, 0, bytes);
	f->skip = r->host_off - a;
	f->done = done;
	f->priv = priv;
	f->io = (struct sio_req){
		.op = r->kind == IMG_META_NBD_STATUS ? SIO_OP_NBD_STATUS
						     : SIO_OP_READ,
		.file = file,
		.buf = f->buf,
		.off = a,
		.len = b - a,
		.mode = IMG_META_EXTENTS, /* NBD_STATUS only */
		.done = fetch_done,
		.priv = f,
	};
	ret = sio_queue_submit(q, &f->io);
	if (ret < 0) {
		sio_buf_free(f->buf);
		f->buf = NULL;
		return ret;
	}
	f->busy = true;
	return 0;
}

bool meta_fetch_park(struct meta_fetch *f, int ret, struct sio_queue *q,
		     meta_fetch_fn done, void *priv)
{
	if (ret != -EAGAIN || !f->miss.layer) {
		meta_fetch_hit(f);
		return false;
	}
	if (meta_fetch_start(f, q, done, priv) == 0)
		return true;
	f->misses = META_FETCH_TRIES;
	return false;
}

bool meta_fetch_sync(const struct meta_fetch *f)
{
	return f->misses >= META_FETCH_TRIES;
}
