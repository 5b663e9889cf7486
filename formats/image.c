/*
 * Images and backing chains: open a layer by path and format, follow its
 * backing references down to the base, answer chain-wide status and reads.
 *
 * Invariants:
 *  - only the top (depth 0) may be writable; every backing layer is opened
 *    read-only, and with an absolute path;
 *  - a backing name resolves relative to the directory of the image that
 *    names it, never relative to the current directory;
 *  - no file appears twice in a chain (compared by device and inode, so a
 *    loop is caught whatever the names look like), and a chain has at most
 *    IMG_MAX_DEPTH layers below the top;
 *  - drv->close runs only for layers whose drv->open succeeded (a layer
 *    img_open_layer() hands back after a refused open has open_failed);
 *  - a writable open holds qemu-compatible image locks (io/lock.h) on the
 *    top as a writer and on every backing layer as a reader, taken before
 *    the driver reads any metadata; read-only opens (info, map, dump) take
 *    none, like `qemu-img -U`, so they can look at images in use;
 *  - a layer whose name is an NBD name (io/nbd_name.h) is an export opened
 *    with sio_nbd_open(): never resolved against a directory, never
 *    stat'ed, never locked, always read-only; its path is the export's
 *    canonical URI, and two layers with the same URI are a loop. Nothing
 *    here touches an NBD file's descriptor (it has none).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/format.h"
#include "formats/image.h"
#include "formats/port.h"
#include "io/io.h"
#include "io/lock.h"
#include "io/nbd.h"
#include "io/nbd_name.h"

/* How much of a file the probes see. */
#define PROBE_LEN 4096

/* Probe order does not matter (best score wins); raw is the fallback. */
static const struct img_driver *const drivers[] = {
	&img_driver_qcow2,
	&img_driver_raw,
};

#define N_DRIVERS (sizeof(drivers) / sizeof(drivers[0]))

const struct img_driver *img_find_driver(const char *name)
{
	size_t i;

	if (!name)
		return NULL;
	for (i = 0; i < N_DRIVERS; i++) {
		if (drivers[i]->name && !strcmp(drivers[i]->name, name) &&
		    drivers[i]->open)
			return drivers[i];
	}
	return NULL;
}

/*
 * Pick the driver for an open file from its first bytes. A driver that is
 * still a stub (no probe or open) never wins.
 */
static int probe_open_file(struct sio_file *f, const struct img_driver **out)
{
	uint8_t buf[PROBE_LEN];
	const struct img_driver *best = &img_driver_raw;
	int best_score = 0;
	uint64_t size;
	size_t len, i;
	int ret;

	ret = sio_file_size(f, &size);
	if (ret < 0)
		return ret;
	len = (size_t)sx_min(size, PROBE_LEN);
	if (len) {
		ret = sio_pread(f, buf, len, 0);
		if (ret < 0)
			return ret;
	}
	for (i = 0; i < N_DRIVERS; i++) {
		int score;

		if (!drivers[i]->probe || !drivers[i]->open)
			continue;
		score = drivers[i]->probe(buf, len);
		if (score > best_score) {
			best_score = score;
			best = drivers[i];
		}
	}
	*out = best;
	return 0;
}

/*
 * Open the file of layer `name`: a local file, or, for an NBD name, the
 * export it names (read-only: SIO_RDWR is refused with -EROFS). Errors
 * keep the transport's message; names that do not parse say why.
 */
static int layer_file_open(const char *name, unsigned sflags,
			   const struct sio_nbd_opts *nbd,
			   struct sio_file **out)
{
	struct sio_nbd_addr a;
	int ret;

	if (!sio_nbd_name_is_remote(name))
		return sio_file_open(name, sflags, out);
	if (sflags & SIO_RDWR)
		return sx_error(-EROFS,
				"%s: NBD exports are read-only; open it "
				"read-only (as a backing file, or with "
				"info, map, dump)",
				name);
	ret = sio_nbd_name_parse(name, &a);
	if (ret < 0)
		return ret;
	ret = sio_nbd_open_opts(&a, sflags, nbd, out);
	sio_nbd_addr_free(&a);
	return ret;
}

const struct img_driver *img_probe_file(const char *path, int *err)
{
	const struct img_driver *drv = NULL;
	struct sio_file *f = NULL;
	int ret;

	if (!path) {
		ret = sx_error(-EINVAL, "no image path given");
		goto out;
	}
	ret = layer_file_open(path, SIO_RDONLY | SIO_BUFFERED, NULL, &f);
	if (ret < 0)
		goto out;
	ret = probe_open_file(f, &drv);
out:
	sio_file_close(f);
	if (err)
		*err = ret < 0 ? ret : 0;
	return ret < 0 ? NULL : drv;
}

/* Free one layer (not the ones below it). */
static void layer_free(struct img *img, bool opened)
{
	if (!img)
		return;
	if (opened && img->drv && img->drv->close)
		img->drv->close(img);
	free(img->priv);
	sio_file_close(img->file);
	free(img->path);
	free(img->backing_name);
	free(img->backing_fmt);
	free(img);
}

void img_close(struct img *img)
{
	while (img) {
		struct img *next = img->backing;

		/* A flush in flight still uses the layer: let it end. */
		if (img->drv && img->drv->flush_wait && !img->open_failed)
			(void)img->drv->flush_wait(img);
		layer_free(img, !img->open_failed);
		img = next;
	}
}

/*
 * img->read_below: what the layers under img show at [off, off + len),
 * zeros past a shorter backing file's end and where nothing holds data.
 */
static int chain_read_below(struct img *img, void *buf, uint64_t len,
			    uint64_t off)
{
	struct img *b = img->backing;
	uint64_t n = 0;
	int ret;

	if (img->backing_name && !b)
		return sx_error(-ENOTSUP,
				"%s: copy-on-write needs the backing file, "
				"which is not open",
				img->path);
	if (img->backing_name && off < b->size)
		n = sx_min(len, b->size - off);
	if (n) {
		ret = img_pread(b, buf, n, off);
		if (ret)
			return ret;
	}
	memset((uint8_t *)buf + n, 0, len - n);
	return 0;
}

/*
 * Open one layer. drv is the named driver, or NULL to probe (then *probed is
 * set). The file is opened before probing so that a missing file reports
 * -ENOENT from sio_file_open, with its path. With failed, a layer that the
 * driver's open refused goes to *failed (open_failed set) instead of being
 * freed.
 */
static int layer_open(const char *path, const struct img_driver *drv,
		      bool writable, bool buffered, bool lock, unsigned depth,
		      const struct sio_nbd_opts *nbd, struct img **out,
		      struct img **failed)
{
	unsigned sflags = SIO_RDONLY;
	struct img *img;
	int ret;

	img = calloc(1, sizeof(*img));
	if (!img)
		return sx_error(-ENOMEM, "%s: out of memory", path);
	img->writable = writable;
	img->depth = depth;
	img->read_below = chain_read_below;

	if (writable)
		sflags |= SIO_RDWR;
	if (buffered)
		sflags |= SIO_BUFFERED;
	ret = layer_file_open(path, sflags, nbd, &img->file);
	if (ret < 0)
		goto fail;
	/* An export goes by its canonical URI, whatever name found it. */
	img->path = strdup(sio_file_is_nbd(img->file) ? img->file->path : path);
	if (!img->path) {
		ret = sx_error(-ENOMEM, "%s: out of memory", path);
		goto fail;
	}
	if (sio_file_is_nbd(img->file))
		ret = 0; /* no image locks on a server's export */
	else if (writable)
		ret = sio_file_lock(img->file, SIO_LOCK_WRITER_PERM,
				    SIO_LOCK_WRITER_UNSHARED);
	else if (lock)
		ret = sio_file_lock(img->file, SIO_LOCK_READER_PERM,
				    SIO_LOCK_READER_UNSHARED);
	if (ret < 0)
		goto fail;

	if (!drv) {
		ret = probe_open_file(img->file, &drv);
		if (ret < 0)
			goto fail;
	}
	img->drv = drv;
	if (drv->priv_size) {
		img->priv = calloc(1, drv->priv_size);
		if (!img->priv) {
			ret = sx_error(-ENOMEM, "%s: out of memory", path);
			goto fail;
		}
	}
	ret = drv->open(img);
	if (ret < 0 && failed) {
		img->open_failed = true;
		*failed = img;
		return ret;
	}
	if (ret < 0)
		goto fail;
	if (img->backing_name && !img->backing_name[0]) {
		free(img->backing_name);
		img->backing_name = NULL;
	}
	*out = img;
	return 0;

fail:
	/*
	 * The driver cleans up after its own failed open; what it reported
	 * through the struct before failing is ours to free.
	 */
	layer_free(img, false);
	return ret;
}

/* Collapse "//" and "/./" so that messages show readable paths. */
static void path_tidy(char *p)
{
	char *r = p, *w = p;

	while (*r) {
		if (r[0] == '/' && r[1] == '/') {
			r++;
			continue;
		}
		if (r[0] == '/' && r[1] == '.' && (r[2] == '/' || !r[2]) &&
		    r != p) {
			r += 2;
			continue;
		}
		*w++ = *r++;
	}
	*w = '\0';
	if (w - p > 1 && w[-1] == '/')
		w[-1] = '\0';
}

/*
 * The absolute path of backing file `name` named by the image at `parent`:
 * relative names are relative to parent's directory.
 */
static int resolve_backing(const char *parent, const char *name, char **out)
{
	char cwd[4096];
	const char *slash;
	int dirlen, ret;
	char *p = NULL;

	if (name[0] == '/') {
		p = strdup(name);
		if (!p)
			return sx_error(-ENOMEM, "%s: out of memory", parent);
		goto done;
	}

	slash = strrchr(parent, '/');
	dirlen = slash ? (int)(slash - parent) : 0;
	if (parent[0] == '/') {
		ret = asprintf(&p, "%.*s/%s", dirlen, parent, name);
	} else {
		if (!getcwd(cwd, sizeof(cwd)))
			return sx_error(-errno,
					"%s: cannot resolve backing "
					"file '%s': getcwd: %s",
					parent, name, strerror(errno));
		if (slash)
			ret = asprintf(&p, "%s/%.*s/%s", cwd, dirlen, parent,
				       name);
		else
			ret = asprintf(&p, "%s/%s", cwd, name);
	}
	if (ret < 0)
		return sx_error(-ENOMEM, "%s: out of memory", parent);
done:
	path_tidy(p);
	*out = p;
	return 0;
}

struct file_id {
	dev_t dev;
	ino_t ino;
};

/*
 * Whether the local file st is among ids[0..n): a loop. NBD layers have
 * no id; their loops are found by URI (nbd_in_chain()).
 */
static bool id_in_chain(const struct file_id *ids, unsigned n,
			const struct stat *st)
{
	unsigned i;

	for (i = 0; i < n; i++)
		if (ids[i].dev == st->st_dev && ids[i].ino == st->st_ino)
			return true;
	return false;
}

/* Whether the export with canonical URI uri is a layer of top's chain. */
static bool nbd_in_chain(struct img *top, const char *uri)
{
	struct img *l;

	for (l = top; l; l = l->backing)
		if (sio_file_is_nbd(l->file) && !strcmp(l->path, uri))
			return true;
	return false;
}

/*
 * Prefix the message recorded for err with the layer that names the
 * backing file and the name, so that "which layer" is never lost.
 */
static int backing_error(int err, const struct img *cur)
{
	char msg[SX_ERROR_MAX];

	snprintf(msg, sizeof(msg), "%s", sx_last_error());
	return sx_error(err, "%s: backing file '%s': %s", cur->path,
			cur->backing_name, msg[0] ? msg : strerror(-err));
}

/*
 * The canonical URI of the NBD name cur has as its backing name (malloc'd
 * into *uri), or -errno with a message naming cur.
 */
static int backing_nbd_uri(const struct img *cur, char **uri)
{
	struct sio_nbd_addr a;
	int ret;

	ret = sio_nbd_name_parse(cur->backing_name, &a);
	if (ret < 0)
		return backing_error(ret, cur);
	*uri = sio_nbd_addr_uri(&a);
	sio_nbd_addr_free(&a);
	if (!*uri)
		return sx_error(-ENOMEM, "%s: out of memory", cur->path);
	return 0;
}

/*
 * Where the backing file of cur is: an NBD name's canonical URI (*remote
 * set), or the absolute path of a local file, which must exist (its id in
 * *st). Refuses a layer already in the chain (-ELOOP). *path is malloc'd.
 */
static int backing_locate(struct img *top, const struct img *cur,
			  const struct file_id *ids, unsigned nids, char **path,
			  bool *remote, struct stat *st)
{
	int ret;

	*path = NULL;
	*remote = sio_nbd_name_is_remote(cur->backing_name);
	if (*remote) {
		ret = backing_nbd_uri(cur, path);
		if (ret < 0)
			return ret;
		if (nbd_in_chain(top, *path))
			return sx_error(-ELOOP,
					"%s: backing file '%s' (%s) is "
					"already in the chain: loop",
					cur->path, cur->backing_name, *path);
		return 0;
	}
	if (sio_file_is_nbd(cur->file) && cur->backing_name[0] != '/')
		return sx_error(-EINVAL,
				"%s: backing file '%s' is relative, and an "
				"NBD export has no directory to resolve it in",
				cur->path, cur->backing_name);
	ret = resolve_backing(cur->path, cur->backing_name, path);
	if (ret < 0)
		return ret;
	ret = sio_stat(*path, st);
	if (ret == -ENOENT)
		return sx_error(-ENOENT, "%s: backing file '%s' (%s) not found",
				cur->path, cur->backing_name, *path);
	if (ret < 0)
		return sx_error(ret, "%s: backing file '%s' (%s): %s",
				cur->path, cur->backing_name, *path,
				strerror(-ret));
	if (id_in_chain(ids, nids, st))
		return sx_error(-ELOOP,
				"%s: backing file '%s' (%s) is already in "
				"the chain: loop",
				cur->path, cur->backing_name, *path);
	return 0;
}

/* Open the layers below top, one at a time, refusing loops and depth. */
static int open_chain(struct img *top, bool buffered,
		      const struct sio_nbd_opts *nbd)
{
	struct file_id ids[IMG_MAX_DEPTH + 1];
	unsigned nids = 0;
	struct img *cur = top;
	struct stat st;
	int ret = 0;

	if (!sio_file_is_nbd(top->file)) {
		if (fstat(top->file->fd, &st) < 0)
			return sx_error(-errno, "%s: fstat: %s", top->path,
					strerror(errno));
		ids[nids++] = (struct file_id){st.st_dev, st.st_ino};
	}

	while (cur->backing_name) {
		const struct img_driver *drv = NULL;
		struct img *next = NULL;
		char *path = NULL;
		bool remote;

		if (cur->depth + 1 > IMG_MAX_DEPTH)
			return sx_error(-ELOOP,
					"%s: backing chain is deeper "
					"than %d layers (at '%s')",
					top->path, IMG_MAX_DEPTH,
					cur->backing_name);

		ret = backing_locate(top, cur, ids, nids, &path, &remote, &st);
		if (ret < 0)
			goto next_out;

		if (cur->backing_fmt) {
			drv = img_find_driver(cur->backing_fmt);
			if (!drv) {
				ret = sx_error(-ENOTSUP,
					       "%s: backing file "
					       "'%s' has unsupported format "
					       "'%s'",
					       cur->path, cur->backing_name,
					       cur->backing_fmt);
				goto next_out;
			}
		}
		ret = layer_open(path, drv, false, buffered, top->writable,
				 cur->depth + 1, nbd, &next, NULL);
		if (ret < 0) {
			/* The transport's message lacks the naming layer. */
			if (remote)
				ret = backing_error(ret, cur);
			goto next_out;
		}
		cur->backing_fmt_probed = !drv;
		cur->backing = next;
		if (remote)
			goto next_layer;

		/* The file we opened may differ from the one we stat'ed. */
		if (fstat(next->file->fd, &st) < 0) {
			ret = sx_error(-errno, "%s: fstat: %s", next->path,
				       strerror(errno));
			goto next_out;
		}
		if (id_in_chain(ids, nids, &st)) {
			ret = sx_error(-ELOOP,
				       "%s: backing file '%s' (%s) is already "
				       "in the chain: loop",
				       cur->path, cur->backing_name, path);
			goto next_out;
		}
		ids[nids++] = (struct file_id){st.st_dev, st.st_ino};
	next_layer:
		cur = next;
	next_out:
		free(path);
		if (ret < 0)
			return ret;
	}
	return 0;
}

int img_create(const char *path, const char *fmt,
	       const struct img_create_opts *o)
{
	const struct img_driver *drv = img_find_driver(fmt ? fmt : "");
	struct sio_file *f = NULL;
	int ret;

	if (!drv)
		return sx_error(EINVAL, "%s: unknown format '%s'", path,
				fmt ? fmt : "");
	if (!drv->create)
		return sx_error(ENOTSUP, "%s: format %s cannot create images",
				path, drv->name);
	if (sio_nbd_name_is_remote(path))
		return sx_error(-EROFS,
				"%s: cannot create an image on an NBD "
				"export (exports are read-only)",
				path);
	ret = sio_file_open(path, SIO_RDWR | SIO_CREATE, &f);
	if (ret < 0)
		return ret;
	ret = sio_file_lock(f, SIO_LOCK_WRITER_PERM, SIO_LOCK_WRITER_UNSHARED);
	if (ret == 0)
		ret = drv->create(f, o);
	sio_file_close(f);
	return ret;
}

int img_open(const char *path, const char *fmt, unsigned flags,
	     struct img **out)
{
	return img_open_nbd(path, fmt, flags, NULL, out);
}

int img_open_nbd(const char *path, const char *fmt, unsigned flags,
		 const struct sio_nbd_opts *nbd, struct img **out)
{
	const struct img_driver *drv = NULL;
	bool buffered = flags & IMG_OPEN_BUFFERED;
	struct img *top = NULL;
	int ret;

	if (!path || !out)
		return sx_error(-EINVAL, "img_open: no path or result");
	if (flags & ~(unsigned)IMG_OPEN_MASK)
		return sx_error(-EINVAL, "%s: unknown open flags 0x%x", path,
				flags & ~(unsigned)IMG_OPEN_MASK);
	if (fmt) {
		drv = img_find_driver(fmt);
		if (!drv)
			return sx_error(-EINVAL, "%s: unknown format '%s'",
					path, fmt);
	}

	ret = layer_open(path, drv, flags & IMG_OPEN_RDWR, buffered, false, 0,
			 nbd, &top, NULL);
	if (ret < 0)
		return ret;
	if (!(flags & IMG_OPEN_NO_BACKING)) {
		ret = open_chain(top, buffered, nbd);
		if (ret < 0)
			goto out;
	}
	*out = top;
out:
	if (ret < 0)
		img_close(top);
	return ret;
}

int img_open_layer(const char *path, const char *fmt, unsigned flags,
		   struct img **out)
{
	const struct img_driver *drv;

	if (!path || !fmt || !out)
		return sx_error(-EINVAL, "img_open_layer: NULL argument");
	*out = NULL;
	if (flags & ~(unsigned)(IMG_OPEN_RDWR | IMG_OPEN_BUFFERED))
		return sx_error(-EINVAL, "%s: unknown open flags 0x%x", path,
				flags);
	drv = img_find_driver(fmt);
	if (!drv)
		return sx_error(-EINVAL, "%s: unknown format '%s'", path, fmt);
	return layer_open(path, drv, flags & IMG_OPEN_RDWR,
			  flags & IMG_OPEN_BUFFERED, false, 0, NULL, out, out);
}

/*
 * One layer's status for the chain walks: the driver's block_status, or,
 * with miss, its nowait entry (a missing slice: -EAGAIN, miss filled).
 */
static int layer_status(struct img *cur, uint64_t off, uint64_t len,
			struct img_extent *e, struct img_meta_miss *miss)
{
	int ret;

	memset(e, 0, sizeof(*e));
	if (!miss || !cur->drv->block_status_nowait)
		return cur->drv->block_status(cur, off, len, e);
	ret = cur->drv->block_status_nowait(cur, off, len, e, &miss->req);
	if (ret == -EAGAIN)
		miss->layer = cur;
	return ret;
}

/* img_chain_status, and with miss its nowait form. */
static int chain_status(struct img *img, struct img *stop, uint64_t off,
			uint64_t len, struct img_extent *ext, unsigned *depth,
			struct img_meta_miss *miss)
{
	struct img *cur = img;
	struct img_extent e;
	unsigned d = 0;
	int ret;

	if (!img || !ext || !depth || !len)
		return sx_error(-EINVAL, "img_chain_status: bad arguments");
	if (off >= img->size)
		return sx_error(-EINVAL,
				"%s: status at %llu, past the end "
				"(%llu)",
				img->path, (unsigned long long)off,
				(unsigned long long)img->size);
	len = sx_min(len, img->size - off);
	if (miss)
		miss->layer = NULL;

	for (;;) {
		struct img *next;

		ret = layer_status(cur, off, len, &e, miss);
		if (ret < 0)
			return ret;
		if (e.len == 0)
			return sx_error(-EIO, "%s: no status at %llu",
					cur->path, (unsigned long long)off);
		/* One answer for the whole run, whatever layer gave it. */
		len = sx_min(len, e.len);
		e.len = len;
		if (e.status != IMG_UNALLOC)
			break;
		next = cur->backing;
		if (next && next == stop) {
			/* Reached stop: the data is in stop or below. */
			d++;
			break;
		}
		if (!next || off >= next->size)
			break;
		len = sx_min(len, next->size - off);
		cur = next;
		d++;
	}
	*ext = e;
	*depth = d;
	return 0;
}

int img_chain_status(struct img *img, struct img *stop, uint64_t off,
		     uint64_t len, struct img_extent *ext, unsigned *depth)
{
	return chain_status(img, stop, off, len, ext, depth, NULL);
}

int img_chain_status_nowait(struct img *img, struct img *stop, uint64_t off,
			    uint64_t len, struct img_extent *ext,
			    unsigned *depth, struct img_meta_miss *miss)
{
	return chain_status(img, stop, off, len, ext, depth, miss);
}

struct img *img_layer(struct img *img, unsigned depth)
{
	while (img && depth--)
		img = img->backing;
	return img;
}

/* img_chain_piece, and with miss its nowait form. */
static int chain_piece(struct img *img, uint64_t off, uint64_t len,
		       struct img_piece *p, struct img_meta_miss *miss)
{
	struct img_extent e;
	unsigned depth;
	int ret;

	ret = chain_status(img, NULL, off, len, &e, &depth, miss);
	if (ret < 0)
		return ret;
	memset(p, 0, sizeof(*p));
	p->len = e.len;
	p->depth = depth;
	p->top = depth == 0 && e.status != IMG_UNALLOC;
	p->shared = p->top && e.status == IMG_DATA && e.shared;
	switch (e.status) {
	case IMG_DATA:
		p->status = IMG_DATA;
		p->file = e.file;
		p->host_off = e.host_off;
		break;
	case IMG_COMPRESSED: {
		struct img *layer = img_layer(img, depth);
		uint64_t ccs = layer->cluster_size;

		if (!layer->drv->read_compressed)
			return sx_error(-EIO,
					"%s: compressed cluster but no "
					"decompressor",
					layer->path);
		/* A compressed cluster may start before off. */
		p->status = IMG_COMPRESSED;
		p->layer = layer;
		p->from = off % ccs;
		p->cluster_off = off - p->from;
		p->len = sx_min(e.len, ccs - p->from);
		break;
	}
	case IMG_ZERO:
	case IMG_UNALLOC:
	default:
		p->status = IMG_ZERO;
		break;
	}
	return 0;
}

int img_chain_piece(struct img *img, uint64_t off, uint64_t len,
		    struct img_piece *p)
{
	return chain_piece(img, off, len, p, NULL);
}

int img_chain_piece_nowait(struct img *img, uint64_t off, uint64_t len,
			   struct img_piece *p, struct img_meta_miss *miss)
{
	return chain_piece(img, off, len, p, miss);
}

int img_pread(struct img *img, void *buf, uint64_t len, uint64_t off)
{
	uint8_t *p = buf;
	uint8_t *cbuf = NULL;
	size_t cbuf_size = 0;
	int ret = 0;

	if (!img || (!buf && len))
		return sx_error(-EINVAL, "img_pread: bad arguments");
	if (!sx_range_within(off, len, img->size))
		return sx_error(-EINVAL,
				"%s: read [%llu, +%llu) past the end "
				"(%llu)",
				img->path, (unsigned long long)off,
				(unsigned long long)len,
				(unsigned long long)img->size);

	while (len) {
		struct img_piece pc;

		ret = img_chain_piece(img, off, len, &pc);
		if (ret < 0)
			goto out;
		switch (pc.status) {
		case IMG_DATA:
			ret = sio_pread(pc.file, p, pc.len, pc.host_off);
			break;
		case IMG_COMPRESSED:
			if (cbuf_size < pc.layer->cluster_size) {
				free(cbuf);
				cbuf_size = pc.layer->cluster_size;
				cbuf = malloc(cbuf_size);
				if (!cbuf) {
					cbuf_size = 0;
					ret = sx_error(-ENOMEM,
						       "%s: out of memory",
						       pc.layer->path);
					break;
				}
			}
			ret = img_read_compressed(pc.layer, pc.cluster_off,
						  cbuf);
			if (ret >= 0)
				memcpy(p, cbuf + pc.from, pc.len);
			break;
		default:
			memset(p, 0, pc.len);
			break;
		}
		if (ret < 0)
			goto out;
		p += pc.len;
		off += pc.len;
		len -= pc.len;
	}
out:
	free(cbuf);
	return ret;
}

/* ---- the facade ---- */

const char *img_probe_format(const char *path, int *err)
{
	const struct img_driver *drv = img_probe_file(path, err);

	return drv ? drv->name : NULL;
}

const char *img_format(const struct img *img)
{
	return img->drv->name;
}

/* The canonical URI of NBD name name (malloc'd), NULL if it does not parse. */
static char *nbd_canon(const char *name)
{
	struct sio_nbd_addr a;
	char *uri;

	if (sio_nbd_name_parse(name, &a) < 0)
		return NULL;
	uri = sio_nbd_addr_uri(&a);
	sio_nbd_addr_free(&a);
	return uri;
}

/*
 * Whether names a and b are the same layer: the same local file, or two
 * NBD names of the same export (by canonical URI; never stat'ed).
 */
static bool same_file(const char *a, const char *b)
{
	struct stat sa, sb;

	if (!strcmp(a, b))
		return true;
	if (sio_nbd_name_is_remote(a) || sio_nbd_name_is_remote(b)) {
		char *ua = sio_nbd_name_is_remote(a) ? nbd_canon(a) : NULL;
		char *ub = sio_nbd_name_is_remote(b) ? nbd_canon(b) : NULL;
		bool same = ua && ub && !strcmp(ua, ub);

		free(ua);
		free(ub);
		return same;
	}
	if (sio_stat(a, &sa) < 0 || sio_stat(b, &sb) < 0)
		return false;
	return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

struct img *img_find_backing(struct img *top, const char *path)
{
	struct img *l;

	for (l = top->backing; l; l = l->backing)
		if (same_file(l->path, path))
			return l;
	return NULL;
}

/* The error of a status query outside the image. */
static int status_outside(const struct img *img, uint64_t off, uint64_t len)
{
	return sx_error(-EINVAL,
			"%s: status of [%llu, +%llu) outside the image (%llu)",
			img->path, (unsigned long long)off,
			(unsigned long long)len, (unsigned long long)img->size);
}

int img_block_status(struct img *img, uint64_t off, uint64_t len,
		     struct img_extent *ext)
{
	int ret;

	if (!len || off >= img->size)
		return status_outside(img, off, len);
	memset(ext, 0, sizeof(*ext));
	ret = img->drv->block_status(img, off, sx_min(len, img->size - off),
				     ext);
	if (ret >= 0 && ext->len == 0)
		ret = sx_error(-EIO, "%s: no status at %llu", img->path,
			       (unsigned long long)off);
	return ret;
}

bool img_lacks_all(struct img *img, uint64_t off, uint64_t len)
{
	struct img_extent e;
	uint64_t lim = sx_min(off + len, img->size);

	if (off >= lim || img_block_status(img, off, lim - off, &e) < 0)
		return false;
	return e.status == IMG_UNALLOC && e.len >= lim - off;
}

bool img_lacks_any(struct img *img, uint64_t off, uint64_t len)
{
	uint64_t pos = off, end = sx_min(off + len, img->size);
	struct img_extent e;

	while (pos < end) {
		if (img_block_status(img, pos, end - pos, &e) < 0)
			return false;
		if (e.status == IMG_UNALLOC)
			return true;
		pos += e.len;
	}
	return false;
}

int img_lacks_nowait(struct img *img, uint64_t off, uint64_t len, bool all,
		     struct img_meta_miss *miss)
{
	uint64_t pos = off, end = sx_min(off + len, img->size);
	struct img_extent e;
	int ret;

	miss->layer = NULL;
	while (pos < end) {
		ret = layer_status(img, pos, end - pos, &e, miss);
		if (ret == -EAGAIN && miss->layer)
			return ret;
		if (ret < 0 || e.len == 0)
			return 0;
		if (e.status == IMG_UNALLOC && !all)
			return 1;
		if (e.status != IMG_UNALLOC && all)
			return 0;
		pos += e.len;
	}
	return all && off < end;
}

int img_read_compressed(struct img *img, uint64_t off, void *buf)
{
	if (!img->drv->read_compressed)
		return sx_error(-EIO,
				"%s: compressed cluster but no "
				"decompressor",
				img->path);
	return img->drv->read_compressed(img, off, buf);
}

int img_get_info(struct img *img, struct img_info_item *items, int n)
{
	return img->drv->info ? img->drv->info(img, items, n) : 0;
}

int img_snapshots(struct img *img, struct img_snapshot *out, int n)
{
	return img->drv->snapshots ? img->drv->snapshots(img, out, n) : 0;
}

bool img_can_alloc(const struct img *img)
{
	return img->writable && img->drv->alloc_run && img->drv->commit_run;
}

bool img_can_stream(const struct img *img)
{
	return img_can_alloc(img) && img->drv->set_backing && img->drv->flush;
}

bool img_has_zero_clusters(const struct img *img)
{
	return img->drv->write_zeroes != NULL;
}

static int cannot(struct img *img, const char *what)
{
	if (!img->writable)
		return sx_error(-EROFS, "%s: image is open read-only",
				img->path);
	return sx_error(-ENOTSUP, "%s: format %s cannot %s", img->path,
			img->drv->name, what);
}

int img_alloc_run(struct img *img, uint64_t off, uint64_t nclusters,
		  uint64_t *host_off, uint64_t *got)
{
	if (!img_can_alloc(img))
		return cannot(img, "allocate clusters");
	return img->drv->alloc_run(img, off, nclusters, host_off, got);
}

int img_commit_run(struct img *img, uint64_t off, uint64_t nclusters,
		   uint64_t host_off, unsigned flags)
{
	if (!img_can_alloc(img))
		return cannot(img, "link clusters");
	return img->drv->commit_run(img, off, nclusters, host_off, flags);
}

void img_release_run(struct img *img, uint64_t host_off, uint64_t nclusters)
{
	if (img->drv->release_run)
		img->drv->release_run(img, host_off, nclusters);
}

int img_pwrite(struct img *img, const void *buf, uint64_t len, uint64_t off)
{
	if (!img->writable || !img->drv->pwrite)
		return cannot(img, "be written");
	return img->drv->pwrite(img, buf, len, off);
}

int img_write_zeroes(struct img *img, uint64_t off, uint64_t len,
		     unsigned flags)
{
	if (!img->writable || !img->drv->write_zeroes)
		return cannot(img, "write zeroes");
	return img->drv->write_zeroes(img, off, len, flags);
}

int img_discard(struct img *img, uint64_t off, uint64_t len)
{
	if (!img->writable)
		return cannot(img, "discard");
	return img->drv->discard ? img->drv->discard(img, off, len) : 0;
}

void img_mark_dirty(struct img *img, uint64_t off, uint64_t len)
{
	if (img->writable && img->drv->mark_dirty)
		img->drv->mark_dirty(img, off, len);
}

int img_set_backing(struct img *img, const char *name, const char *fmt)
{
	int ret;

	if (!img->writable || !img->drv->set_backing)
		return cannot(img, "change its backing file");
	ret = img_flush_wait(img);
	if (ret)
		return ret;
	return img->drv->set_backing(img, name, fmt);
}

void img_set_port(struct img *img, struct img_port *port)
{
	img->port = port;
}

struct img_port *img_get_port(const struct img *img)
{
	return img->port ? img->port : img_port_sync();
}

int img_flush_wait(struct img *img)
{
	if (!img->drv->flush_wait)
		return 0;
	return img->drv->flush_wait(img);
}

/* A driver without flush_start: the synchronous flush, then done. */
int img_flush_start(struct img *img, struct img_port *port,
		    void (*done)(void *opaque, int res), void *opaque)
{
	int ret;

	if (!img->writable || !img->drv->flush)
		return cannot(img, "flush");
	if (img->drv->flush_start)
		return img->drv->flush_start(
			img, port ? port : img_get_port(img), done, opaque);
	ret = img->drv->flush(img);
	if (done)
		done(opaque, ret);
	return 0;
}

int img_prepare_write(struct img *img, uint64_t off, uint64_t nclusters,
		      void (*done)(void *opaque, int res), void *opaque)
{
	if (!img->writable || !img->drv->prepare_write)
		return 0;
	return img->drv->prepare_write(img, off, nclusters, done, opaque);
}

int img_prepare_discard(struct img *img, uint64_t off, uint64_t len,
			unsigned flags, void (*done)(void *opaque, int res),
			void *opaque)
{
	if (!img->writable || !img->drv->prepare_discard)
		return 0;
	return img->drv->prepare_discard(img, off, len, flags, done, opaque);
}

int img_block_status_nowait(struct img *img, uint64_t off, uint64_t len,
			    struct img_extent *ext, struct img_meta_req *req)
{
	if (!len || off >= img->size)
		return status_outside(img, off, len);
	memset(ext, 0, sizeof(*ext));
	if (!img->drv->block_status_nowait)
		return img_block_status(img, off, len, ext);
	return img->drv->block_status_nowait(
		img, off, sx_min(len, img->size - off), ext, req);
}

int img_flush(struct img *img)
{
	int ret;

	if (!img->writable || !img->drv->flush)
		return cannot(img, "flush");
	/* One flush at a time: an asynchronous one in flight ends first. */
	ret = img_flush_wait(img);
	if (ret)
		return ret;
	return img->drv->flush(img);
}

bool img_can_read_ahead(const struct img *img)
{
	return img->drv->meta_want && img->drv->meta_fill;
}

unsigned img_meta_want(struct img *img, uint64_t off, struct img_meta_req *reqs,
		       unsigned n, uint64_t *next)
{
	if (!img_can_read_ahead(img)) {
		*next = img->size;
		return 0;
	}
	return img->drv->meta_want(img, off, reqs, n, next);
}

void img_meta_fill(struct img *img, const struct img_meta_req *req,
		   const void *buf)
{
	if (img->drv->meta_fill)
		img->drv->meta_fill(img, req, buf);
}

int img_rebase_onto(struct img *top, struct img *base)
{
	const char *name = NULL, *fmt = NULL;
	struct img *parent = top;
	int ret;

	if (base) {
		while (parent && parent->backing != base)
			parent = parent->backing;
		if (!parent)
			return sx_error(-EINVAL,
					"%s: %s is not in its backing chain",
					top->path, base->path);
		/*
		 * The parent's name for base is valid from top only if the
		 * two live in the same directory; otherwise use the path.
		 */
		name = parent == top ? top->backing_name : base->path;
		fmt = base->drv->name;
	}
	ret = img_set_backing(top, name, fmt);
	if (ret >= 0)
		ret = img_flush(top);
	return ret;
}

void img_drop_layers(struct img *top, struct img *base)
{
	struct img *old = top->backing, *l;
	unsigned depth = 1;

	if (old == base)
		return;
	for (l = old; l && l->backing != base; l = l->backing)
		;
	if (l)
		l->backing = NULL;
	top->backing = base;
	img_close(old);
	for (l = top->backing; l; l = l->backing)
		l->depth = depth++;
}

bool img_host_hole(struct sio_file *file, uint64_t host_off, uint64_t *len)
{
	off_t data, hole;
	struct stat st;

	if (sio_file_is_nbd(file) || fstat(file->fd, &st) < 0)
		return false;
	if (host_off >= (uint64_t)st.st_size)
		return true;
	data = lseek(file->fd, (off_t)host_off, SEEK_DATA);
	if (data < 0) {
		if (errno == ENXIO)
			return true; /* a hole up to the end of the file */
		*len = sx_min(*len, (uint64_t)st.st_size - host_off);
		return false;
	}
	if ((uint64_t)data > host_off) {
		*len = sx_min(*len, (uint64_t)data - host_off);
		return true;
	}
	hole = lseek(file->fd, (off_t)host_off, SEEK_HOLE);
	if (hole > (off_t)host_off)
		*len = sx_min(*len, (uint64_t)hole - host_off);
	return false;
}

bool img_format_checks(const char *fmt)
{
	const struct img_driver *drv = fmt ? img_find_driver(fmt) : NULL;

	return drv && drv->check;
}

const char *img_check_kind_name(unsigned kind)
{
	static const char *const names[IMG_CK_NKINDS] = {
		[IMG_CK_LEAK] = "leak",
		[IMG_CK_REFCOUNT_LOW] = "refcount_low",
		[IMG_CK_OVERLAP] = "overlap",
		[IMG_CK_UNALIGNED] = "unaligned",
		[IMG_CK_PAST_EOF] = "past_eof",
		[IMG_CK_RESERVED] = "reserved_bits",
		[IMG_CK_BAD_ENTRY] = "bad_entry",
		[IMG_CK_COPIED] = "copied_flag",
		[IMG_CK_OVERFLOW] = "refcount_overflow",
		[IMG_CK_BAD_TABLE] = "bad_table",
		[IMG_CK_COPIED_CLEAR] = "copied_flag_clear",
	};

	return kind < IMG_CK_NKINDS ? names[kind] : "unknown";
}

/* One check of the layer at path (opened read-only, no chain). */
static int check_once(const char *path, const struct img_driver *drv,
		      struct sio_file *wfile, const struct img_check_opts *o,
		      struct img_check_report *r)
{
	struct img *img = NULL;
	int ret;

	memset(r, 0, sizeof(*r));
	/* Locked already (the caller's file) unless an export. */
	ret = layer_open(path, drv, false, false, false, 0, NULL, &img, NULL);
	if (ret < 0)
		return ret;
	if (!img->drv->check)
		ret = sx_error(-ENOTSUP,
			       "%s: %s images have no metadata to check", path,
			       img->drv->name);
	else
		ret = img->drv->check(img, wfile, o, r);
	layer_free(img, true);
	return ret;
}

int img_check(const char *path, const char *fmt, const struct img_check_opts *o,
	      struct img_check_report *r)
{
	const struct img_driver *drv = NULL;
	struct img_check_opts once;
	struct img_check_report again;
	struct sio_file *lf = NULL;
	bool remote;
	int ret;

	if (!path || !o || !r)
		return sx_error(-EINVAL, "img_check: NULL argument");
	if (o->repair > IMG_CHECK_REPAIR_ALL)
		return sx_error(-EINVAL, "%s: unknown repair mode %u", path,
				o->repair);
	if (fmt) {
		drv = img_find_driver(fmt);
		if (!drv)
			return sx_error(-EINVAL, "%s: unknown format '%s'",
					path, fmt);
	}
	if (o->force_share && o->repair)
		return sx_error(
			-EINVAL,
			"%s: a repair needs the image to itself: it cannot share it",
			path);
	remote = sio_nbd_name_is_remote(path);
	if (remote && o->repair)
		return sx_error(
			-EROFS,
			"%s: an NBD export cannot be repaired (it is read-only)",
			path);
	/*
	 * The image lock is held on a file of our own for the whole check,
	 * from before the metadata is read: a repair must be the only
	 * writer, and a check should not race one.
	 */
	if (!remote && !o->force_share) {
		ret = sio_file_open(path, o->repair ? SIO_RDWR : SIO_RDONLY,
				    &lf);
		if (ret < 0)
			return ret;
		ret = o->repair ? sio_file_lock(lf, SIO_LOCK_WRITER_PERM,
						SIO_LOCK_WRITER_UNSHARED)
				: sio_file_lock(lf, SIO_LOCK_READER_PERM,
						SIO_LOCK_READER_UNSHARED);
		if (ret < 0)
			goto out;
	}
	ret = check_once(path, drv, o->repair ? lf : NULL, o, r);
	if (ret < 0)
		goto out;
	r->leaks = r->found_leaks;
	r->corruptions = r->found_corruptions;
	if (!o->repair || (!r->leaks_fixed && !r->corruptions_fixed &&
			   !r->marked_corrupt && !r->cleared_dirty))
		goto out;
	/* What the repairs left: a second, read-only check. */
	once = *o;
	once.repair = IMG_CHECK_NO_REPAIR;
	ret = check_once(path, drv, NULL, &once, &again);
	if (ret < 0)
		goto out;
	r->leaks = again.found_leaks;
	r->corruptions = again.found_corruptions;
	r->allocated_clusters = again.allocated_clusters;
	r->fragmented_clusters = again.fragmented_clusters;
	r->compressed_clusters = again.compressed_clusters;
	r->image_end_offset = again.image_end_offset;
	r->file_size = again.file_size;
out:
	sio_file_close(lf);
	return ret < 0 ? ret : 0;
}
