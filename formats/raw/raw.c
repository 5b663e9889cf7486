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
 * The last run that lseek reported, [lo, hi) with one status. The stream
 * planner and the reader ask about neighbouring ranges of a run many times;
 * answering from here saves two lseeks each (thousands on a sparse 1 TiB
 * base). Only for read-only images: a backing file is locked against
 * writers, and a writable raw image changes under its own writes.
 */
struct raw_state {
	uint64_t lo;
	uint64_t hi;
	enum img_status status;
	bool zero_data; /* img_extent.zero_data of the run */
	bool valid;
};

static void remember(struct img *img, uint64_t lo, uint64_t hi,
		     enum img_status status)
{
	struct raw_state *r = img->priv;

	if (img->writable)
		return;
	*r = (struct raw_state){lo, hi, status, false, true};
}

/*
 * Status of [off, off + len) of an NBD export from the server: the first
 * extent only (the chain layer asks again from where it ends). The bytes
 * of the last 512-byte sector past the export's end read as zeros.
 */
static int raw_nbd_status(struct img *img, uint64_t off, uint64_t len,
			  struct img_extent *ext)
{
	struct sio_nbd_extent v;
	unsigned n = 0;
	int ret;

	ret = sio_nbd_block_status(img->file, off, len, &v, 1, &n);
	if (ret < 0)
		return ret;
	if (n == 0 || v.len == 0) {
		/* At or past the export's end: the sector's zero tail. */
		ext->status = IMG_ZERO;
		ext->len = len;
		return 0;
	}
	ext->status = v.flags & SIO_NBD_ZERO ? IMG_ZERO : IMG_DATA;
	ext->zero_data =
		(v.flags & (SIO_NBD_ZERO | SIO_NBD_HOLE)) == SIO_NBD_ZERO;
	ext->len = sx_min(v.len, len);
	remember(img, off, off + ext->len, ext->status);
	((struct raw_state *)img->priv)->zero_data = ext->zero_data;
	return 0;
}

/*
 * Status of [off, off + len). SEEK_DATA from off tells whether off is in a
 * hole (the result is beyond off) and SEEK_HOLE where its data ends.
 */
static int raw_block_status(struct img *img, uint64_t off, uint64_t len,
			    struct img_extent *ext)
{
	struct raw_state *r = img->priv;
	int fd = img->file->fd;
	off_t data, hole;
	uint64_t run;

	ext->file = img->file;
	ext->host_off = off;
	ext->host_valid = true;

	if (img->file->is_blockdev)
		goto all_data;
	if (r->valid && off >= r->lo && off < r->hi) {
		ext->status = r->status;
		ext->zero_data = r->zero_data;
		ext->len = sx_min(r->hi - off, len);
		return 0;
	}
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
	.info = raw_info,
	.pwrite = raw_pwrite,
	.write_zeroes = raw_write_zeroes,
	.discard = raw_discard,
	.flush = raw_flush,
	.create = raw_create,
};
