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
 * A name of an NBD export (io/nbd_name.h: nbd://, nbd+unix://, json:), as
 * a backing name or as the image itself, opens the export read-only over
 * the network (io/nbd.h) and never resolves against a directory; its
 * layer's path is the export's canonical URI. Opening one read-write, or
 * creating an image on one, is -EROFS.
 *
 * Invariants: every layer below the top is read-only; img->depth is 0 for
 * the top and grows by one per layer.
 */
#ifndef SIPHON_FORMATS_IMAGE_H
#define SIPHON_FORMATS_IMAGE_H

#include <stdbool.h>
#include <stdint.h>

#include "format.h"

struct img_port;

#define IMG_MAX_DEPTH 64

enum img_open_flags {
	IMG_OPEN_RDWR = 1 << 0, /* top read-write (chain stays read-only) */
	IMG_OPEN_NO_BACKING = 1 << 1, /* do not open the backing chain */
	IMG_OPEN_BUFFERED = 1 << 2, /* never O_DIRECT */
	IMG_OPEN_MASK = (1 << 3) - 1,
};

struct img {
	/* Private to formats/: above it, use the img_* calls below. */
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
	/*
	 * How a driver reads what the layers below it hold (guest bytes
	 * [off, off + len) of the chain under img, zeros where nothing
	 * does): set by the chain layer, so a driver never walks
	 * img->backing itself. NULL for a layer opened without its chain
	 * (then everything below reads as zeros).
	 */
	int (*read_below)(struct img *img, void *buf, uint64_t len,
			  uint64_t off);
	/*
	 * The port (formats/port.h) asynchronous metadata work of this layer
	 * goes through by default: set by the engine on the disk's queue
	 * (img_set_port), NULL for the synchronous port.
	 */
	struct img_port *port;
	/* img_open_layer() kept it after drv->open refused it. */
	bool open_failed;
};

/*
 * Open path as format fmt (NULL: probe) and its chain. Returns 0 and *out,
 * or -errno with a message: -ENOENT (missing file, named), -ELOOP (loop or
 * too deep), -EINVAL (corrupt image), -ENOTSUP (unsupported feature), ...
 */
int img_open(const char *path, const char *fmt, unsigned flags,
	     struct img **out);

/*
 * img_open() with settings of the chain's NBD layers' own (io/nbd.h); nbd
 * NULL: the process-wide ones. -EINVAL for settings io/ refuses.
 */
struct sio_nbd_opts;
int img_open_nbd(const char *path, const char *fmt, unsigned flags,
		 const struct sio_nbd_opts *nbd, struct img **out);

/*
 * For the format unit tests: open the file at path as one layer of format
 * fmt (named, never probed), without its chain and without image locks
 * unless IMG_OPEN_RDWR (the only flags, with IMG_OPEN_BUFFERED, taken).
 * Returns 0 or the -errno of the open, as img_open(). Where the file opened
 * but the driver refused it, *out is still the layer, as the driver left it
 * (open_failed set), so a test can see what a refused open leaves behind;
 * otherwise *out is NULL on failure. img_close() it either way (a refused
 * layer gets no drv->close).
 */
int img_open_layer(const char *path, const char *fmt, unsigned flags,
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
 * Where a nowait call met metadata that is not in memory: the layer, and
 * the read to do (on a queue, say) and hand to img_meta_fill(layer, ...).
 */
struct img_meta_miss {
	struct img *layer;
	struct img_meta_req req;
};

/*
 * img_chain_status that reads no metadata: where some layer would have to
 * (an L2 slice not cached), -EAGAIN with *miss filled (miss->layer set);
 * read it, img_meta_fill() it and ask again. Otherwise as
 * img_chain_status (miss->layer NULL).
 */
int img_chain_status_nowait(struct img *img, struct img *stop, uint64_t off,
			    uint64_t len, struct img_extent *ext,
			    unsigned *depth, struct img_meta_miss *miss);

/*
 * What the host file says about data stored at host_off of file (an
 * IMG_DATA run whose host_refine is set): true when its first *len bytes
 * start in a hole of the file or past its end (they read as zeros), with
 * *len clipped to where the answer may change. False for an NBD export
 * (qemu asks it nothing more) or when the file cannot tell.
 */
bool img_host_hole(struct sio_file *file, uint64_t host_off, uint64_t *len);

/*
 * Read guest data [off, off + len) of the chain into buf, synchronously.
 * Unallocated everywhere reads as zeros.
 */
int img_pread(struct img *img, void *buf, uint64_t len, uint64_t off);

/*
 * Check the image at path (format fmt, NULL: probe) against its own
 * metadata, without its backing chain (formats/format.h: struct
 * img_check_report), as qemu-img check does. With o->repair, repair what
 * it allows and check again: r->leaks and r->corruptions are then what is
 * left, r->found_* what was found. The image lock is held throughout (a
 * writer's for a repair), so an image in use is refused (-EAGAIN/-EBUSY
 * with a message). Returns 0 with r filled (whatever it found), or -errno
 * when the check could not be done: -ENOTSUP (a format without metadata,
 * raw), -EROFS (repairing an NBD export), I/O errors.
 */
int img_check(const char *path, const char *fmt, const struct img_check_opts *o,
	      struct img_check_report *r);

/* Whether format fmt has metadata img_check can check (qcow2, not raw). */
bool img_format_checks(const char *fmt);

/* "leak", "overlap", ... for enum img_check_kind (JSON keys). */
const char *img_check_kind_name(unsigned kind);

/*
 * ---- The facade: the only way above formats/ to reach a driver. ----
 *
 * Each call checks the optional vtable entries itself, so callers never
 * look at img->drv. Same returns and messages as the driver's entry
 * (format.h); a missing entry is -ENOTSUP (writes) or a no-op where the
 * entry is advisory (discard, release_run, meta_fill).
 */

/* Probe the file at path: its format's name, or NULL with -errno in *err. */
const char *img_probe_format(const char *path, int *err);

/* The format's name ("qcow2", "raw"). */
const char *img_format(const struct img *img);

/* The layer `depth` levels below img (0: img itself), or NULL. */
struct img *img_layer(struct img *img, unsigned depth);

/*
 * The layer of top's backing chain (not top itself) that is the file at
 * path (same path, or same device and inode), or NULL.
 */
struct img *img_find_backing(struct img *top, const char *path);

/* This layer's status only (drv->block_status), arguments checked. */
int img_block_status(struct img *img, uint64_t off, uint64_t len,
		     struct img_extent *ext);

/* The top holds nothing of [off, off + len) (an error counts as "holds"). */
bool img_lacks_all(struct img *img, uint64_t off, uint64_t len);

/* The top lacks some byte of [off, off + len) (an error: false). */
bool img_lacks_any(struct img *img, uint64_t off, uint64_t len);

/*
 * img_lacks_all (all) or img_lacks_any (!all) that reads no metadata: 1 or
 * 0 as they answer (an error counts as they count it), or -EAGAIN with
 * *miss filled (see img_chain_status_nowait).
 */
int img_lacks_nowait(struct img *img, uint64_t off, uint64_t len, bool all,
		     struct img_meta_miss *miss);

/*
 * Decompress the cluster of this layer that holds guest offset off into buf
 * (img->cluster_size bytes). -EIO when the format has no compression.
 */
int img_read_compressed(struct img *img, uint64_t off, void *buf);

/* Format-specific lines for `siphon info` (0 when the format has none). */
int img_get_info(struct img *img, struct img_info_item *items, int n);

/*
 * The image's internal snapshots, in table order: up to n copied into
 * out; returns how many there are (0 when the format has none).
 */
int img_snapshots(struct img *img, struct img_snapshot *out, int n);

/* Writable, with the allocation entries the copy pipeline needs. */
bool img_can_alloc(const struct img *img);

/* Writable and can be streamed into (alloc, commit, set_backing, flush). */
bool img_can_stream(const struct img *img);

/* Can express zeros as metadata (has write_zeroes). */
bool img_has_zero_clusters(const struct img *img);

int img_alloc_run(struct img *img, uint64_t off, uint64_t nclusters,
		  uint64_t *host_off, uint64_t *got);
/* commit_run's flags (format.h). */
enum img_commit_flags {
	/* Also replace data the top shares with a snapshot (its copy). */
	IMG_COMMIT_REPLACE_SHARED = 1 << 0,
};
int img_commit_run(struct img *img, uint64_t off, uint64_t nclusters,
		   uint64_t host_off, unsigned flags);
/* No-op when the driver cannot give clusters back (a leak at worst). */
void img_release_run(struct img *img, uint64_t host_off, uint64_t nclusters);
int img_pwrite(struct img *img, const void *buf, uint64_t len, uint64_t off);
int img_write_zeroes(struct img *img, uint64_t off, uint64_t len,
		     unsigned flags);
/* Advisory: 0 when the format cannot discard. */
int img_discard(struct img *img, uint64_t off, uint64_t len);
/*
 * The guest changed [off, off + len): dirty the image's enabled persistent
 * bitmaps there (format.h mark_dirty). Call it for every guest write,
 * write-zeroes and discard when the request is accepted, before it is
 * acknowledged; never for what a stream or copy-on-read copies (that is
 * data the guest saw already). A no-op for formats without bitmaps and
 * for read-only images.
 */
void img_mark_dirty(struct img *img, uint64_t off, uint64_t len);
int img_set_backing(struct img *img, const char *name, const char *fmt);
/*
 * -EROFS on an image that cannot be written. Waits for a flush started
 * with img_flush_start() first (running only its completions), so call it
 * on the port's thread while one may be in flight (else -EAGAIN).
 */
int img_flush(struct img *img);

/* The default port of img's asynchronous metadata work (NULL: synchronous). */
void img_set_port(struct img *img, struct img_port *port);
struct img_port *img_get_port(const struct img *img);

/*
 * Start a flush whose I/O goes through port (NULL: img's port): the same
 * crash-safe order as img_flush(), as a continuation on the port. It makes
 * durable what was written before the call; writes made meanwhile stay
 * for the next flush. done(opaque, res) runs exactly once when it ended
 * (from the port's completion, maybe before img_flush_start returns).
 * 0: done will run; -errno: it will not (-EAGAIN: one is in flight).
 */
int img_flush_start(struct img *img, struct img_port *port,
		    void (*done)(void *opaque, int res), void *opaque);

/* Wait for a flush started by img_flush_start() to end (see img_flush). */
int img_flush_wait(struct img *img);

/*
 * img_block_status that does no metadata I/O: where it would have to read
 * (an L2 slice not cached) it returns -EAGAIN and fills *req with the
 * read; do it (e.g. on a queue), hand it to img_meta_fill() and ask again.
 * Formats without metadata I/O (or without this entry) answer as
 * img_block_status.
 */
int img_block_status_nowait(struct img *img, uint64_t off, uint64_t len,
			    struct img_extent *ext, struct img_meta_req *req);

/*
 * Make alloc_run/commit_run of [off, off + nclusters clusters) need no
 * metadata I/O, doing it on img's port (format.h prepare_write): 0 ready,
 * 1 started (done(opaque, res) runs later: ask again), -errno. 0 for
 * formats without metadata or on the synchronous port.
 */
int img_prepare_write(struct img *img, uint64_t off, uint64_t nclusters,
		      void (*done)(void *opaque, int res), void *opaque);

/* img_prepare_discard() flags. */
enum img_prep_flags {
	IMG_PREP_ZEROES = 1 << 0, /* for write_zeroes, not discard */
};

/*
 * Make img_discard (or, with IMG_PREP_ZEROES, img_write_zeroes) of [off,
 * off + len) need no metadata I/O, doing it on img's port (format.h
 * prepare_discard): 0 ready, 1 started (done(opaque, res) runs later: ask
 * again), -errno. 0 for formats without metadata or on the synchronous
 * port. A hint: the call itself still does any I/O left to do.
 */
int img_prepare_discard(struct img *img, uint64_t off, uint64_t len,
			unsigned flags, void (*done)(void *opaque, int res),
			void *opaque);

/* Metadata read-ahead (format.h meta_want / meta_fill). */
bool img_can_read_ahead(const struct img *img);
unsigned img_meta_want(struct img *img, uint64_t off, struct img_meta_req *reqs,
		       unsigned n, uint64_t *next);
void img_meta_fill(struct img *img, const struct img_meta_req *req,
		   const void *buf);

/*
 * One piece of a chain range as a reader must fetch it (img_chain_piece):
 * IMG_DATA (len bytes at host_off of file), IMG_ZERO (zeros, whatever the
 * reason) or IMG_COMPRESSED (bytes [from, from + len) of the compressed
 * cluster of `layer` that starts at guest offset cluster_off; len never
 * crosses that cluster's end).
 */
struct img_piece {
	enum img_status status;
	uint64_t len;
	struct sio_file *file; /* IMG_DATA */
	uint64_t host_off; /* IMG_DATA */
	struct img *layer; /* IMG_COMPRESSED: the layer to decompress */
	uint64_t cluster_off; /* IMG_COMPRESSED */
	uint64_t from; /* IMG_COMPRESSED */
	unsigned depth; /* the layer that decides (0 = img) */
	bool top; /* img itself holds the piece (depth 0, allocated) */
	bool shared; /* top, IMG_DATA shared with a snapshot (img_extent) */
};

/*
 * The piece of img's chain at off (at most len bytes, off < img->size):
 * what a reader of [off, off + len) gets first. -errno with a message.
 */
int img_chain_piece(struct img *img, uint64_t off, uint64_t len,
		    struct img_piece *p);

/*
 * img_chain_piece that reads no metadata in any layer: -EAGAIN with *miss
 * filled where it would (see img_chain_status_nowait). As cheap as
 * img_chain_piece when everything is cached.
 */
int img_chain_piece_nowait(struct img *img, uint64_t off, uint64_t len,
			   struct img_piece *p, struct img_meta_miss *miss);

/*
 * Chain surgery after a stream: point top's backing reference at base (a
 * layer of its chain; NULL: no backing) in the image and flush. The name
 * stored is the one base's parent used when that parent is top, else
 * base's path. Returns 0 or -errno; the open chain is unchanged.
 */
int img_rebase_onto(struct img *top, struct img *base);

/*
 * Close the layers between top and base (base stays open, NULL: all of
 * them), so that the open chain matches what img_rebase_onto() wrote.
 * Nobody may be reading them.
 */
void img_drop_layers(struct img *top, struct img *base);

#endif
