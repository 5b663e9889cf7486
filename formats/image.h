/*
 * Images and backing chains.
 *
 * img_open() opens one image by path with a named or probed format, then its
 * backing chain read-only: top -> backing -> ... -> base. Backing names
 * resolve relative to the directory of the image that names them. The
 * backing format comes from the image (qcow2's backing-format extension);
 * where it is missing the file is probed and img->backing_fmt_probed says so.
 * A chain that loops, is deeper than IMG_MAX_DEPTH, or names a missing file
 * is refused with a message naming the offending path.
 *
 * Invariants: every layer below the top is read-only; img->depth is 0 for
 * the top and grows by one per layer.
 */
#ifndef SIPHON_FORMATS_IMAGE_H
#define SIPHON_FORMATS_IMAGE_H

#include <stdbool.h>
#include <stdint.h>

#include "format.h"

#define IMG_MAX_DEPTH 64

enum img_open_flags {
	IMG_OPEN_RDWR = 1 << 0, /* top read-write (chain stays read-only) */
	IMG_OPEN_NO_BACKING = 1 << 1, /* do not open the backing chain */
	IMG_OPEN_BUFFERED = 1 << 2, /* never O_DIRECT */
	IMG_OPEN_MASK = (1 << 3) - 1,
};

struct img {
	const struct img_driver *drv;
	void *priv; /* drv->priv_size bytes, zeroed */
	struct sio_file *file;
	char *path; /* as opened (absolute for backing layers) */
	bool writable;
	unsigned depth; /* 0 = top */

	/* set by drv->open */
	uint64_t size; /* virtual size in bytes */
	uint32_t cluster_size;
	char *backing_name; /* as stored in the image, or NULL */
	char *backing_fmt; /* as stored, or NULL */

	/* set by the chain layer */
	struct img *backing; /* next layer down, or NULL */
	bool backing_fmt_probed; /* backing format was probed */
};

/*
 * Open path as format fmt (NULL: probe) and its chain. Returns 0 and *out,
 * or -errno with a message: -ENOENT (missing file, named), -ELOOP (loop or
 * too deep), -EINVAL (corrupt image), -ENOTSUP (unsupported feature), ...
 */
int img_open(const char *path, const char *fmt, unsigned flags,
	     struct img **out);

/*
 * Create an image at path in format fmt ("qcow2", "raw") as o describes,
 * replacing an existing file (which must not be in use: the writer lock is
 * taken before anything is truncated). o->backing is stored as given; it is
 * not opened here. Returns 0, or -errno with a message: -EINVAL (bad
 * options), -ENOTSUP (format cannot create), -EBUSY (in use), ...
 */
int img_create(const char *path, const char *fmt,
	       const struct img_create_opts *o);

/* Close an image and every layer below it. NULL is a no-op. */
void img_close(struct img *img);

/* The driver named name, or NULL. */
const struct img_driver *img_find_driver(const char *name);

/* Probe the file at path; returns the driver or NULL with -errno in *err. */
const struct img_driver *img_probe_file(const char *path, int *err);

/*
 * Chain status: like drv->block_status, but an unallocated run of a layer
 * is resolved in the layers below, down to (not including) `stop` (NULL:
 * the whole chain). *depth is the layer that decides (0 = img).
 * When no layer above `stop` holds the range, ext->status is IMG_UNALLOC
 * and *depth tells why: stop->depth when the search reached `stop` (the
 * data is in `stop` or below); otherwise the depth of the layer where the
 * search ended, the bottom layer or a layer whose backing file ends before
 * off, and the range reads as zeros. ext->len is clipped so that the whole
 * run has one answer.
 */
int img_chain_status(struct img *img, struct img *stop, uint64_t off,
		     uint64_t len, struct img_extent *ext, unsigned *depth);

/*
 * Read guest data [off, off + len) of the chain into buf, synchronously.
 * Unallocated everywhere reads as zeros.
 */
int img_pread(struct img *img, void *buf, uint64_t len, uint64_t off);

#endif
