/*
 * The raw format: guest offset == host offset, no metadata, no backing.
 *
 * Allocation status comes from the filesystem (lseek SEEK_DATA/SEEK_HOLE),
 * which is metadata and so allowed outside io/. Holes are reported as
 * IMG_ZERO with a valid host offset, the way qemu reports raw holes, so that
 * `siphon map` matches `qemu-img map`. Where the file (or block device) cannot
 * answer SEEK_DATA, everything is data.
 *
 * Over an NBD export (io/nbd.h) the server's base:allocation answers
 * instead, as qemu's nbd driver reads it: a run that reads as zeros
 * (NBD_STATE_ZERO, with or without HOLE) is IMG_ZERO with a valid host
 * offset, never transferred; `qemu-img map` shows it "zero": true and
 * "data": false when it is a HOLE too, "data": true when not (zero_data
 * says which). A hole without ZERO has unspecified contents and stays
 * data. A server without block status: all data.
 *
 * Invariants: img->size is the file size at open rounded up to a sector (as
 * qemu does); block_status never looks past it (the chain layer clips
 * requests to the size), and the partial sector past EOF is a hole.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/format.h"
#include "formats/image.h"
#include "io/io.h"
#include "io/nbd.h"

static int raw_probe(const uint8_t *buf, size_t len)
{
	(void)buf;
	(void)len;
	/* Anything is a raw image; every other format must score higher. */
	return 1;
}

static int raw_open(struct img *img)
{
	uint64_t size;
	int ret;

	ret = sio_file_size(img->file, &size);
	if (ret < 0)
		return ret;
	/*
	 * qemu sizes raw images in whole sectors; the partial sector past EOF
	 * reads as zeros. Matching it keeps `map` and `dump` identical.
	 */
	ret = sx_align_up(size, 512, &img->size);
	if (ret < 0)
		return sx_error(ret, "%s: size %llu too large", img->path,
				(unsigned long long)size);
	img->cluster_size = 512;
	img->backing_name = NULL;
	img->backing_fmt = NULL;
	return 0;
}

static void raw_close(struct img *img)
{
	(void)img;
}

/*
 * The last runs that lseek or the NBD server reported: consecutive runs
 * from lo, run[i] ending at run[i].hi, with one status each. The stream
 * planner and the reader ask about neighbouring ranges of a run many
 * times; answering from here saves two lseeks each (thousands on a sparse
 * 1 TiB base), or a round trip to the server. Several runs, because one
 * cluster may hold several (qemu-nbd reports the first 4 KiB of a raw
 * file as data apart): a planner that asks about each piece of the
 * cluster and parks for each answer would otherwise replace the run it
 * needs next, forever. Only for read-only images: a backing file is
 * locked against writers (an NBD export is read-only), and a writable
 * raw image changes under its own writes.
 */
#define RAW_RUNS IMG_META_EXTENTS

struct raw_run {
	uint64_t hi;
	enum img_status status;
	bool zero_data; /* img_extent.zero_data of the run */
};

struct raw_state {
	uint64_t lo;
	unsigned n; /* runs held; 0: nothing */
	struct raw_run run[RAW_RUNS];
};

/* Forget the runs; the next ones held start at lo. */
static void forget(struct img *img, uint64_t lo)
{
	struct raw_state *r = img->priv;

	r->n = 0;
	r->lo = lo;
}

/* Hold the run [end of the last one (or lo), hi) with status. */
static void remember_run(struct img *img, uint64_t hi, enum img_status status,
			 bool zero_data)
{
	struct raw_state *r = img->priv;

	if (img->writable || r->n == RAW_RUNS ||
	    hi <= (r->n ? r->run[r->n - 1].hi : r->lo))
		return;
	r->run[r->n++] = (struct raw_run){hi, status, zero_data};
}

/* Hold [lo, hi) with status, and nothing else. */
static void remember(struct img *img, uint64_t lo, uint64_t hi,
		     enum img_status status)
{
	forget(img, lo);
	remember_run(img, hi, status, false);
}

/* The run held that covers off, or NULL. */
static const struct raw_run *held(const struct img *img, uint64_t off)
{
	const struct raw_state *r = img->priv;
	unsigned i;

	if (!r->n || off < r->lo || off >= r->run[r->n - 1].hi)
		return NULL;
	for (i = 0; off >= r->run[i].hi; i++)
		;
	return &r->run[i];
}

/* Answer [off, off + len) from the runs held: true when they cover off. */
static bool recall(struct img *img, uint64_t off, uint64_t len,
		   struct img_extent *ext)
{
	const struct raw_run *run = held(img, off);

	if (!run)
		return false;
	ext->status = run->status;
	ext->zero_data = run->zero_data;
	ext->len = sx_min(run->hi - off, len);
	return true;
}

/* The status of an NBD extent's flags, and its zero_data. */
static enum img_status nbd_status_of(uint32_t flags, bool *zero_data)
{
	*zero_data = (flags & (SIO_NBD_ZERO | SIO_NBD_HOLE)) == SIO_NBD_ZERO;
	return flags & SIO_NBD_ZERO ? IMG_ZERO : IMG_DATA;
}

/*
 * Hold the extents v[0..n) a server reported from off (n > 0; an extent
 * of length 0 ends them early): their statuses as runs, clipped to end.
 */
static void remember_extents(struct img *img, uint64_t off, uint64_t end,
			     const struct sio_nbd_extent *v, unsigned n)
{
	uint64_t at = off;
	enum img_status st;
	bool zd;
	unsigned i;

	forget(img, off);
	for (i = 0; i < n && at < end && v[i].len; i++) {
		st = nbd_status_of(v[i].flags, &zd);
		at = sx_min(at + v[i].len, end);
		remember_run(img, at, st, zd);
	}
}

/*
 * What to ask a server about from off when [off, off + len) is wanted: at
 * least RAW_NBD_AHEAD (to the export's end), so that the runs it answers
 * cover what the caller asks next. A chain asks the base about the run
 * the layers above lack, which over a top holding every tenth cluster is
 * 576 KiB: asked for exactly that, each next run was a round trip, and
 * the stream's extents could not read over the local clusters (the
 * lookup would have waited).
 */
#define RAW_NBD_AHEAD (256ull << 20)
static uint64_t nbd_ask_len(const struct img *img, uint64_t off, uint64_t len)
{
	uint64_t ahead = off < img->size ? img->size - off : 0;

	return sx_max(len, sx_min(ahead, RAW_NBD_AHEAD));
}

/*
 * Status of [off, off + len) of an NBD export from the server,
 * synchronously: the first extent (the chain layer asks again from where
 * it ends; the next ones are remembered). The bytes of the last 512-byte
 * sector past the export's end read as zeros.
 */
static int raw_nbd_status(struct img *img, uint64_t off, uint64_t len,
			  struct img_extent *ext)
{
	uint64_t ask = nbd_ask_len(img, off, len);
	struct sio_nbd_extent v[RAW_RUNS];
	unsigned n = 0;
	int ret;

	ret = sio_nbd_block_status(img->file, off, ask, v, RAW_RUNS, &n);
	if (ret < 0)
		return ret;
	if (n == 0 || v[0].len == 0) {
		/* At or past the export's end: the sector's zero tail. */
		ext->status = IMG_ZERO;
		ext->len = len;
		return 0;
	}
	ext->status = nbd_status_of(v[0].flags, &ext->zero_data);
	ext->len = sx_min(v[0].len, len);
	remember_extents(img, off, off + ask, v, n);
	return 0;
}

/* The tag of raw's block status requests (img_meta_req.tag). */
#define RAW_META_STATUS 1

static int raw_block_status(struct img *img, uint64_t off, uint64_t len,
			    struct img_extent *ext);

/*
 * block_status without waiting: over an NBD export with block status, a
 * run that the last answer does not cover is asked on the caller's queue
 * (-EAGAIN, *req an IMG_META_NBD_STATUS) and comes back through
 * raw_meta_fill(). Anything else answers as raw_block_status (lseek is
 * the filesystem's metadata, no device round trip).
 */
static int raw_block_status_nowait(struct img *img, uint64_t off, uint64_t len,
				   struct img_extent *ext,
				   struct img_meta_req *req)
{
	if (!sio_nbd_has_block_status(img->file) || held(img, off))
		return raw_block_status(img, off, len, ext);
	*req = (struct img_meta_req){
		.file = img->file,
		.host_off = off,
		.len = nbd_ask_len(img, off, len),
		.guest_off = off,
		.tag = RAW_META_STATUS,
		.kind = IMG_META_NBD_STATUS,
	};
	return -EAGAIN;
}

/*
 * The server's answer to a request of raw_block_status_nowait(): its
 * extents become the runs held, as raw_nbd_status() would have made them
 * (no extent: past the export's end, the zero tail).
 */
static void raw_meta_fill(struct img *img, const struct img_meta_req *req,
			  const void *buf)
{
	const struct sio_nbd_extent *v = buf;

	if (req->tag != RAW_META_STATUS || req->kind != IMG_META_NBD_STATUS)
		return;
	if (v[0].len)
		remember_extents(img, req->host_off, req->host_off + req->len,
				 v, IMG_META_EXTENTS);
	else
		remember(img, req->host_off, req->host_off + req->len,
			 IMG_ZERO);
}

/*
 * Status of [off, off + len). SEEK_DATA from off tells whether off is in a
 * hole (the result is beyond off) and SEEK_HOLE where its data ends.
 */
static int raw_block_status(struct img *img, uint64_t off, uint64_t len,
			    struct img_extent *ext)
{
	int fd = img->file->fd;
	off_t data, hole;
	uint64_t run;

	ext->file = img->file;
	ext->host_off = off;
	ext->host_valid = true;

	if (img->file->is_blockdev)
		goto all_data;
	if (recall(img, off, len, ext))
		return 0;
	if (sio_file_is_nbd(img->file))
		return raw_nbd_status(img, off, len, ext);

	data = lseek(fd, (off_t)off, SEEK_DATA);
	if (data < 0) {
		if (errno == ENXIO) {
			/* No data from off to the end of the file. */
			ext->status = IMG_ZERO;
			ext->len = len;
			remember(img, off, img->size, IMG_ZERO);
			return 0;
		}
		/* EINVAL/ENOTSUP etc: no information, pretend no holes. */
		goto all_data;
	}
	if ((uint64_t)data > off) {
		ext->status = IMG_ZERO;
		ext->len = sx_min((uint64_t)data - off, len);
		remember(img, off, (uint64_t)data, IMG_ZERO);
		return 0;
	}

	hole = lseek(fd, (off_t)off, SEEK_HOLE);
	if (hole < 0 || (uint64_t)hole <= off)
		goto all_data;
	run = (uint64_t)hole - off;
	ext->status = IMG_DATA;
	ext->len = sx_min(run, len);
	remember(img, off, (uint64_t)hole, IMG_DATA);
	return 0;

all_data:
	ext->status = IMG_DATA;
	ext->len = len;
	return 0;
}

static int raw_info(struct img *img, struct img_info_item *items, int n)
{
	const char *what = "regular file";

	if (n < 1)
		return 0;
	snprintf(items[0].key, sizeof(items[0].key), "file type");
	if (sio_file_is_nbd(img->file))
		what = "NBD export";
	else if (img->file->is_blockdev)
		what = "block device";
	snprintf(items[0].value, sizeof(items[0].value), "%s", what);
	return 1;
}

static int raw_pwrite(struct img *img, const void *buf, uint64_t len,
		      uint64_t off)
{
	if (!sx_range_within(off, len, img->size))
		return sx_error(-EINVAL, "%s: write [%llu, +%llu) past the end",
				img->path, (unsigned long long)off,
				(unsigned long long)len);
	return sio_pwrite(img->file, buf, len, off);
}

/*
 * Zeroing and discard both punch a hole: a raw file has no backing that could
 * show through, and a hole reads as zeros.
 */
static int raw_punch(struct img *img, uint64_t off, uint64_t len)
{
	if (!sx_range_within(off, len, img->size))
		return sx_error(-EINVAL, "%s: range [%llu, +%llu) past the end",
				img->path, (unsigned long long)off,
				(unsigned long long)len);
	return sio_fallocate(img->file,
			     FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off,
			     len);
}

static int raw_write_zeroes(struct img *img, uint64_t off, uint64_t len,
			    unsigned flags)
{
	(void)flags;
	return raw_punch(img, off, len);
}

static int raw_discard(struct img *img, uint64_t off, uint64_t len)
{
	return raw_punch(img, off, len);
}

static int raw_flush(struct img *img)
{
	return sio_fdatasync(img->file);
}

static int raw_create(struct sio_file *f, const struct img_create_opts *o)
{
	int ret;

	if (o->backing)
		return sx_error(EINVAL, "%s: raw images have no backing file",
				f->path);
	if (o->cluster_size || o->refcount_bits || o->compat_v2 ||
	    o->extended_l2 || o->lazy_refcounts)
		return sx_error(EINVAL, "%s: raw images take no options",
				f->path);
	ret = sio_file_truncate(f, 0);
	if (ret == 0)
		ret = sio_file_truncate(f, o->size);
	return ret;
}

const struct img_driver img_driver_raw = {
	.name = "raw",
	.priv_size = sizeof(struct raw_state),
	.probe = raw_probe,
	.open = raw_open,
	.close = raw_close,
	.block_status = raw_block_status,
	.block_status_nowait = raw_block_status_nowait,
	.meta_fill = raw_meta_fill,
	.info = raw_info,
	.pwrite = raw_pwrite,
	.write_zeroes = raw_write_zeroes,
	.discard = raw_discard,
	.flush = raw_flush,
	.create = raw_create,
};
