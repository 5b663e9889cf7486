/*
 * The copy pipeline: one range of whole clusters of a top image, read from
 * its chain and written into freshly allocated host clusters of the top.
 * The stream's extents, copy-on-read and allocating guest writes are its
 * users; they keep only their policy (what to copy, when).
 *
 * A copier belongs to one disk (top image and the owner's sio_queue) and
 * holds what its copies share: the inflater, started on the first
 * compressed piece, so that nothing is ever decompressed on the owner's
 * thread. A copy_op runs these phases, each ending in a callback on the
 * owner's thread (from sio_queue_run(), or from copy_start() itself when
 * nothing had to wait), never waiting:
 *
 *   read    every piece of [off, off + len) as the chain shows it (the
 *           top's own data included), looked up without waiting for
 *           metadata (a missing L2 slice of any layer is read on the
 *           queue while the op is parked; meta_fetch.h): DATA
 *           asynchronously on the queue
 *           (the sync helpers where direct I/O alignment is not met),
 *           COMPRESSED through the inflater, zeros filled in; clusters
 *           wholly inside [cover_off, cover_off + cover_len) are not read;
 *   ready   the caller's ready() may use the buffer and lay its own data
 *           over it (at least over the covered range);
 *   write   every cluster the top did not hold during the read, except
 *           all-zero ones unless COPY_WRITE_ZEROS, gets a fresh host run
 *           (alloc_run) and is written there asynchronously;
 *   commit  commit_run links only the clusters still unallocated: a cluster
 *           somebody allocated meanwhile keeps its data and the copy's
 *           cluster is given back. With COPY_VERIFY the op then checks
 *           that every run is linked where it wrote and fails with -EIO
 *           otherwise (a write whose data must land);
 *   done    done(op, err), exactly once. On any failure every run not
 *           linked has been given back (release_run), so a failed copy
 *           leaks nothing; a commit that failed half way may leave its run
 *           partly linked (a leak at worst, never wrong data).
 *
 * Crash safety is the driver's: data goes only into clusters nothing points
 * at, and commit_run's L2 updates reach the disk after the data does, so
 * at any instant the image reads as the chain did.
 *
 * Locks: the caller holds the cluster lock of [off, off + len) from before
 * copy_start() until done() has run (it may drop it in done()), so that no
 * guest write starts on those clusters between the read and the commit;
 * the commit rule above is the second line of defence.
 *
 * Threads: everything on the owner's thread.
 */
#ifndef SIPHON_ENGINE_COPY_H
#define SIPHON_ENGINE_COPY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "inflate.h"
#include "meta_fetch.h"

struct img;
struct img_piece;
struct sio_queue;
struct sio_req;
struct iovec;
struct copier;

enum copy_flags {
	/* Write clusters that read as all zeros too (default: skip them). */
	COPY_WRITE_ZEROS = 1 << 0,
	/* Every written cluster must end up linked to its run, or -EIO. */
	COPY_VERIFY = 1 << 1,
	/*
	 * The caller needs only what it will write: pieces the top holds
	 * are not read (their part of buf is undefined afterwards), and a
	 * read of a layer may run on over them into the next piece of the
	 * same file (up to gap_max bytes of them), so that a few local
	 * clusters do not split a large read.
	 */
	COPY_SKIP_TOP = 1 << 2,
	/*
	 * Clusters the top holds only as data shared with a snapshot count
	 * as not held: read, written into fresh clusters and committed
	 * with IMG_COMMIT_REPLACE_SHARED (a guest write's copy-on-write).
	 */
	COPY_REPLACE_SHARED = 1 << 3,
};

/* What a copier sent to the device (for the user: request sizes). */
struct copier_stats {
	uint64_t reads; /* requests */
	uint64_t read_bytes;
	uint64_t writes;
	uint64_t write_bytes;
};

/* A host run of an op: guest clusters [off, off + n clusters) at host. */
struct copy_run {
	uint64_t off;
	uint64_t n;
	uint64_t host;
};

/*
 * One copy. The caller owns the memory (embed it), fills the fields up to
 * priv, and may not touch the op between copy_start() and done().
 */
struct copy_op {
	uint64_t off; /* guest offset, cluster aligned, < top->size */
	uint64_t len; /* whole clusters (the last may pass the image's end) */
	uint8_t *buf; /* len bytes, SIO_BUF_ALIGN aligned (sio_buf_alloc) */
	unsigned flags; /* enum copy_flags */
	uint64_t cover_off; /* the caller's data: whole clusters in it */
	uint64_t cover_len; /* are not read (0: read everything) */
	uint64_t gap_max; /* COPY_SKIP_TOP: bytes a read may run over */
	/*
	 * Optional: the reads are done (buf holds the chain's data). Return
	 * 0 to go on, or -errno to fail the op (nothing was allocated yet).
	 */
	int (*ready)(struct copy_op *op);
	/* Required: the op is over; err 0 or -errno (message recorded). */
	void (*done)(struct copy_op *op, int err);
	void *priv;

	/* Out: bytes written as data (whole clusters), valid in done(). */
	uint64_t written;
	/*
	 * Out, valid in done() only: per cluster, non-zero where the top
	 * held (part of) it during the read, so the op did not write it;
	 * NULL when the top held none.
	 */
	uint8_t *top;

	/* Private to copy.c. */
	struct copier *c;
	unsigned
		pending; /* I/O and inflate jobs out, plus one while building */
	int err;
	char *msg; /* the first failure's message (malloc'd) */
	bool writing;
	struct sio_req *reqs;
	struct iovec *iovs; /* of the gathered writes (gather_writes()) */
	unsigned nreqs, reqcap;
	struct copy_run *runs;
	unsigned nruns, runcap;
	unsigned linked; /* runs [0, linked) went through commit_run */
	uint64_t rpos; /* read phase: where the walk resumes */
	struct meta_fetch mf; /* read phase: a lookup missed, parked */
};

/* A copier for top (writable, with alloc entries) on the owner's queue q. */
int copier_create(struct img *top, struct sio_queue *q, struct copier **out);

/*
 * Free. No op in flight and no inflate job outstanding (the owner has
 * drained its work). NULL is a no-op.
 */
void copier_destroy(struct copier *c);

/* Whether c copies into top on queue q (what a user of c must share). */
bool copier_serves(const struct copier *c, const struct img *top,
		   const struct sio_queue *q);

/* Ops started whose done() has not run. */
unsigned copier_inflight(const struct copier *c);

/* The requests c has sent so far, into *st. */
void copier_get_stats(const struct copier *c, struct copier_stats *st);

/*
 * Start op (fields up to priv filled). Never fails by itself: every error,
 * including bad arguments, comes through done(op, -errno), which may run
 * before copy_start() returns.
 */
void copy_start(struct copier *c, struct copy_op *op);

/*
 * Decompress bytes [pc->from, pc->from + pc->len) of the compressed piece
 * pc (from img_chain_piece) into dst on the copier's inflater; done runs on
 * the owner's thread (see inflate.h). For readers that are not ops (plain
 * guest reads). Returns 0, or -errno (nothing queued).
 */
int copier_inflate(struct copier *c, const struct img_piece *pc, void *dst,
		   inflate_done_fn done, void *opaque);

/* Whether len bytes at p are all zero. */
bool copy_is_zero(const void *p, size_t len);

#endif
