/*
 * The format driver interface.
 *
 * A driver translates guest offsets of one image (one layer of a chain) into
 * host offsets and allocation status, and owns that image's metadata. It
 * knows nothing of the layers below it: the chain layer (image.h) asks the
 * next layer down where this one reports IMG_UNALLOC.
 *
 * All offsets and lengths are in bytes. A driver never prints; it returns
 * -errno and records a message with sx_error() naming the image's path.
 *
 * New fields are only ever added at the end.
 */
#ifndef SIPHON_FORMATS_FORMAT_H
#define SIPHON_FORMATS_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct img;
struct img_port;
struct sio_file;

/* Where the bytes of a guest range of one layer live. */
enum img_status {
	IMG_UNALLOC = 0, /* not in this layer: read the layer below */
	IMG_DATA, /* at host_off in file */
	IMG_ZERO, /* reads as zeros (host_off valid if allocated) */
	IMG_COMPRESSED, /* use read_compressed(); one cluster */
};

struct img_extent {
	enum img_status status;
	uint64_t len; /* bytes from the queried offset, > 0 */
	struct sio_file *file; /* IMG_DATA (and ZERO with host_valid) */
	uint64_t host_off; /* valid when host_valid */
	bool host_valid;
	/*
	 * IMG_DATA only: the host file's own status (holes) is worth asking
	 * for whether the run reads as zeros. qcow2 sets it for images that
	 * look metadata-preallocated, as qemu does (its BLOCK_RECURSE).
	 */
	bool host_refine;
	/*
	 * IMG_ZERO only: the layer stores these zeros as allocated data (an
	 * NBD export's run that is ZERO but not a HOLE); `qemu-img map` shows
	 * such a run as "data": true. Readers need not read it.
	 */
	bool zero_data;
	/*
	 * IMG_DATA only: the layer does not own the host data alone (a qcow2
	 * cluster shared with an internal snapshot). Writing it in place
	 * would change the snapshot too: writes go through the driver's
	 * pwrite, which copies it. Runs never mix shared and owned data.
	 */
	bool shared;
};

/* What a struct img_meta_req asks of its file. */
enum img_meta_kind {
	/* Read len bytes at host_off; meta_fill gets them. */
	IMG_META_READ = 0,
	/*
	 * The allocation of [host_off, host_off + len) of an NBD export
	 * (SIO_OP_NBD_STATUS); meta_fill gets up to IMG_META_EXTENTS struct
	 * sio_nbd_extent from host_off, ended by one of length 0 when fewer.
	 */
	IMG_META_NBD_STATUS,
};

#define IMG_META_EXTENTS 16

/*
 * A metadata read that block_status will need, planned ahead of use so the
 * caller can do it asynchronously (see meta_want and meta_fill).
 */
struct img_meta_req {
	struct sio_file *file;
	uint64_t host_off;
	uint64_t len;
	uint64_t guest_off; /* the first guest byte the metadata describes */
	uint64_t tag; /* the driver's, for meta_fill */
	enum img_meta_kind kind;
};

/* Flags of write_zeroes. */
enum img_wz_flags {
	/* Fail with -ENOTSUP rather than write zero data (v2 qcow2, raw). */
	IMG_WZ_NO_FALLBACK = 1 << 0,
};

/* What to create: see img_create() in image.h. */
struct img_create_opts {
	uint64_t size; /* virtual size in bytes */
	const char *backing; /* backing file name to store, or NULL */
	const char *backing_fmt; /* its format, or NULL */
	uint32_t cluster_size; /* 0: the format's default */
	unsigned refcount_bits; /* 0: default (16) */
	bool compat_v2; /* qcow2 version 2 (compat=0.10) */
	bool extended_l2; /* qcow2 subclusters */
	bool lazy_refcounts; /* qcow2 compatible bit 0 */
};

/* One name/value line for `siphon info` (format-specific facts). */
struct img_info_item {
	char key[48];
	char value[208];
};

/*
 * An internal snapshot (img_snapshots() in image.h), with what qemu-img
 * snapshot -l shows. The strings belong to the image and live as long as
 * it is open.
 */
struct img_snapshot {
	const char *id;
	const char *name;
	uint64_t vm_state_size; /* bytes of saved VM state */
	uint64_t date_sec; /* when it was taken, since the epoch */
	uint32_t date_nsec;
	uint64_t vm_clock_nsec; /* the guest's clock then */
	uint64_t disk_size; /* virtual size then; UINT64_MAX: not recorded */
	uint64_t icount; /* instructions executed; UINT64_MAX: not recorded */
};

/*
 * A consistency check (img_check() in image.h): what a format's metadata
 * says against what its reference counts say. Each finding is a leak
 * (a refcount higher than the references: space wasted, nothing wrong
 * read) or a corruption (everything else), as qemu-img check counts them.
 */
enum img_check_repair {
	IMG_CHECK_NO_REPAIR = 0,
	IMG_CHECK_REPAIR_LEAKS = 1, /* lower refcounts of leaked clusters */
	/* also raise refcounts that are too low and fix COPIED flags */
	IMG_CHECK_REPAIR_ALL = 2,
};

enum img_check_kind {
	IMG_CK_LEAK = 0, /* refcount above the references */
	IMG_CK_REFCOUNT_LOW, /* refcount below the references */
	IMG_CK_OVERLAP, /* a cluster used twice (metadata and data, or two L2s) */
	IMG_CK_UNALIGNED, /* a table or cluster pointer not cluster aligned */
	IMG_CK_PAST_EOF, /* a reference past the end of the file */
	IMG_CK_RESERVED, /* reserved bits set in a table entry */
	IMG_CK_BAD_ENTRY, /* an L2 entry that cannot be valid */
	IMG_CK_COPIED, /* a COPIED flag set on a shared cluster (refcount > 1) */
	IMG_CK_OVERFLOW, /* more references than the refcount width holds */
	IMG_CK_BAD_TABLE, /* a snapshot table or bitmap directory unreadable */
	/*
	 * A COPIED flag clear on a cluster of refcount 1. Counted as
	 * corruption, as qemu-img check does, but harmless: the writer copies
	 * that cluster before its next write instead of writing in place.
	 * What a writer leaves when a reference to a cluster that two entries
	 * share goes away (qemu's as well as siphon's: neither looks for the
	 * other referrer).
	 */
	IMG_CK_COPIED_CLEAR,
	IMG_CK_NKINDS
};

#define IMG_CHECK_MAX_FINDINGS 32

struct img_check_opts {
	unsigned repair; /* enum img_check_repair */
	/*
	 * Host clusters whose references are counted at once (memory: four
	 * bytes each); 0: the default (4 Mi). Larger files take more passes.
	 */
	uint64_t window;
	/*
	 * Check without the image lock, as qemu-img check -U: an image a
	 * writer holds open may be checked (read-only; what it finds may be
	 * the writer's work in flight, not damage). Refused with repair.
	 */
	bool force_share;
};

struct img_check_finding {
	uint8_t kind; /* enum img_check_kind */
	bool repaired;
	uint64_t offset; /* host offset in the image file */
	char what[120];
};

struct img_check_report {
	/* What the check found (before any repair). */
	uint64_t found_leaks;
	uint64_t found_corruptions;
	uint64_t kinds[IMG_CK_NKINDS];
	/* What is left: after a repair, what the second check found. */
	uint64_t leaks;
	uint64_t corruptions;
	uint64_t leaks_fixed;
	uint64_t corruptions_fixed;
	/* Statistics of the active layer, as qemu-img check reports them. */
	uint64_t total_clusters; /* guest clusters of the virtual size */
	uint64_t allocated_clusters;
	uint64_t fragmented_clusters;
	uint64_t compressed_clusters;
	uint64_t image_end_offset; /* end of the last cluster in use */
	uint64_t file_size; /* file size when the check ended */
	uint64_t trimmed_bytes; /* free tail cut by a repair */
	unsigned passes; /* windows of the host file counted (memory bound) */
	bool marked_corrupt; /* -r all left corruption: corrupt bit set */
	/* -r all left corruption in a version 2 image: no bit to set */
	bool unmarkable;
	bool cleared_dirty; /* the dirty bit was cleared after a repair */
	unsigned n_findings; /* first findings (of the first check) */
	struct img_check_finding findings[IMG_CHECK_MAX_FINDINGS];
};

struct img_driver {
	/* Required. "qcow2", "raw". */
	const char *name;

	/* Required. Bytes of private state allocated for img->priv. */
	size_t priv_size;

	/*
	 * Required. How sure the driver is that buf (the first len bytes of
	 * the file, len <= 4096, fewer for small files) is its format:
	 * 0 no, 1 maybe (raw), 100 certain.
	 */
	int (*probe)(const uint8_t *buf, size_t len);

	/*
	 * Required. img->file, img->path, img->writable are set. Read and
	 * check the metadata; set img->size, img->backing_name and
	 * img->backing_fmt (malloc'd, or NULL), img->cluster_size (the
	 * allocation unit; 512 for raw).
	 */
	int (*open)(struct img *img);

	/* Required. Free img->priv's contents. Must not fail. */
	void (*close)(struct img *img);

	/*
	 * Required. Status of [off, off + len) in this layer: fills *ext for
	 * the longest prefix with one status (and, for IMG_DATA, contiguous
	 * host offsets). off < img->size; len > 0 and clipped to the size.
	 */
	int (*block_status)(struct img *img, uint64_t off, uint64_t len,
			    struct img_extent *ext);

	/*
	 * Optional (required if block_status can return IMG_COMPRESSED).
	 * Decompress the cluster containing guest offset off into buf
	 * (img->cluster_size bytes).
	 */
	int (*read_compressed)(struct img *img, uint64_t off, void *buf);

	/*
	 * Optional. Format-specific lines for `siphon info`; returns how many
	 * items were stored (at most n).
	 */
	int (*info)(struct img *img, struct img_info_item *items, int n);
	/* Optional: the internal snapshots, as img_snapshots(). */
	int (*snapshots)(struct img *img, struct img_snapshot *out, int n);

	/* ---- write path: Optional, NULL for read-only drivers ---- */

	/*
	 * Allocate up to nclusters contiguous host clusters for the guest
	 * clusters starting at off (cluster aligned), refcounted but not yet
	 * linked. *host_off and *got (>= 1) describe the run.
	 */
	int (*alloc_run)(struct img *img, uint64_t off, uint64_t nclusters,
			 uint64_t *host_off, uint64_t *got);

	/*
	 * Link guest clusters [off, off + n clusters) to host clusters
	 * starting at host_off (from alloc_run, data already written), where
	 * they are still unallocated, and with IMG_COMMIT_REPLACE_SHARED
	 * also where they hold data shared with a snapshot (the old cluster
	 * then loses a reference). Any other cluster is given back. The
	 * data is made durable before the L2 entries are (batched: the
	 * driver may defer until flush).
	 */
	int (*commit_run)(struct img *img, uint64_t off, uint64_t nclusters,
			  uint64_t host_off, unsigned flags);

	/*
	 * Optional (recommended with alloc_run). Give back host clusters from
	 * alloc_run that were never committed (their data write failed).
	 */
	void (*release_run)(struct img *img, uint64_t host_off,
			    uint64_t nclusters);

	/*
	 * Guest write of any 512-aligned range, with copy-on-write from the
	 * chain for partial clusters. Synchronous.
	 */
	int (*pwrite)(struct img *img, const void *buf, uint64_t len,
		      uint64_t off);

	/*
	 * Make [off, off + len) read as zeros, never exposing backing data
	 * (zero clusters rather than unallocation). flags: img_wz_flags.
	 */
	int (*write_zeroes)(struct img *img, uint64_t off, uint64_t len,
			    unsigned flags);

	/*
	 * Advisory discard of the whole clusters in [off, off + len) (the
	 * image's last cluster counts as whole when the range reaches the
	 * end); partial clusters are left alone. Never exposes backing data:
	 * with a backing file the clusters become zero clusters (qcow2 v3;
	 * nothing happens on v2), without one they are unallocated. Their
	 * host space is freed either way.
	 */
	int (*discard)(struct img *img, uint64_t off, uint64_t len);

	/* Rewrite the backing reference (name NULL: remove). */
	int (*set_backing)(struct img *img, const char *name, const char *fmt);

	/* Everything written so far durable, metadata included. */
	int (*flush)(struct img *img);

	/*
	 * Optional. Write a new, empty image into f (opened read-write,
	 * empty) as o describes. Validates o: -EINVAL with a message.
	 */
	int (*create)(struct sio_file *f, const struct img_create_opts *o);

	/* ---- metadata read-ahead: Optional ---- */

	/*
	 * The metadata that block_status will need for guest offsets from off
	 * on and that is not cached: up to n reads, in guest order, that the
	 * caller may do asynchronously and hand to meta_fill. *next is where
	 * a later call should go on (the scan may stop early; img->size when
	 * it reached the end). Returns how many reqs were filled. Never fails:
	 * anything doubtful is left for block_status to find and report.
	 */
	unsigned (*meta_want)(struct img *img, uint64_t off,
			      struct img_meta_req *reqs, unsigned n,
			      uint64_t *next);

	/*
	 * Install a read planned by meta_want or asked by
	 * block_status_nowait (buf holds req->len bytes read from
	 * req->host_off, or the extents of an IMG_META_NBD_STATUS). Ignored
	 * when the metadata may have changed since the read was planned or
	 * is cached already. Never fails.
	 */
	void (*meta_fill)(struct img *img, const struct img_meta_req *req,
			  const void *buf);

	/* ---- metadata I/O through a port (formats/port.h): Optional ---- */

	/*
	 * Start a flush (the same order as flush) whose I/O goes through
	 * port; done(opaque, res) runs once it ended, from the port's
	 * completion (possibly before flush_start returns, never with the
	 * driver's lock held). 0: done will run; -errno: it will not
	 * (-EAGAIN: a flush is in flight already).
	 */
	int (*flush_start)(struct img *img, struct img_port *port,
			   void (*done)(void *opaque, int res), void *opaque);

	/*
	 * Wait until no flush started by flush_start is in flight, running
	 * only that flush's completions. 0, or -EAGAIN when it cannot wait
	 * here (not on the port's thread).
	 */
	int (*flush_wait)(struct img *img);

	/*
	 * block_status that never reads metadata: where it would (an L2
	 * slice not cached) it returns -EAGAIN and describes the read in
	 * *req, for meta_fill; the caller reads it, fills, and asks again.
	 */
	int (*block_status_nowait)(struct img *img, uint64_t off, uint64_t len,
				   struct img_extent *ext,
				   struct img_meta_req *req);

	/*
	 * Optional. Bring into memory, on img's port, the metadata that
	 * alloc_run of up to nclusters clusters and commit_run of guest
	 * [off, off + nclusters clusters) would read or write: 0 when
	 * nothing is missing now; 1 when I/O was started and done(opaque,
	 * res) will run once it ended (from the port's completion; ask
	 * again then); -errno. Only a hint for correctness: what was brought
	 * in may be evicted again, and the write path then does the I/O.
	 */
	int (*prepare_write)(struct img *img, uint64_t off, uint64_t nclusters,
			     void (*done)(void *opaque, int res), void *opaque);

	/*
	 * Optional. The same for discard of [off, off + len), or
	 * write_zeroes of it with IMG_PREP_ZEROES in flags (image.h): bring
	 * in the metadata they would read or create (L2 tables and slices),
	 * so that they then only change memory. Returns as prepare_write;
	 * equally only a hint.
	 */
	int (*prepare_discard)(struct img *img, uint64_t off, uint64_t len,
			       unsigned flags,
			       void (*done)(void *opaque, int res),
			       void *opaque);

	/*
	 * Optional. Check the layer's metadata (opened read-only, without
	 * its chain) into r; with repair, write the repairs through wfile
	 * (the same file opened read-write under the writer lock). -errno
	 * only when the check could not be completed (I/O error, memory).
	 */
	int (*check)(struct img *img, struct sio_file *wfile,
		     const struct img_check_opts *o,
		     struct img_check_report *r);

	/*
	 * Optional (NULL: the format keeps no dirty bitmaps, raw). The guest
	 * wrote, zeroed or discarded [off, off + len) (any alignment; clipped
	 * to the size): set the bits of the image's enabled persistent dirty
	 * bitmaps that cover it. Called by the guest entry points only, when
	 * a request is accepted, never for copies (stream, copy-on-read).
	 * Memory only, never fails; thread safe.
	 */
	void (*mark_dirty)(struct img *img, uint64_t off, uint64_t len);
};

extern const struct img_driver img_driver_raw;
extern const struct img_driver img_driver_qcow2;

#endif
