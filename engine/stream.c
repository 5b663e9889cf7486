/*
 * The stream engine (see stream.h for the contract).
 *
 * The planner walks the top image's clusters from the cursor and sorts each
 * run into one of:
 *   LOCAL    the top holds it: skip;
 *   SKIP     nothing above base holds it and it will read the same once the
 *            backing is dropped (zeros with no base, base's data with one);
 *   ZERO     reads as zeros now but would not after the backing changes:
 *            a zero cluster (metadata only);
 *   COPY     data above base: read it from the chain, write it into fresh
 *            host clusters, link them;
 *   PARTIAL  the top holds part of the cluster (extended L2 subclusters):
 *            fill the rest through the driver's write path (slow, rare).
 * COPY runs become extents, several in flight at once on the owner's
 * queue; how many bytes are in flight and how large an extent is are the
 * in-flight controller's (inflight.h: measured on the device, bounded by
 * the buffer pool; fixed by the overrides; the owner's limits while the
 * guest is busy). An extent runs on over short LOCAL runs between COPY
 * runs (at most an eighth of its size): the copy does not read or write
 * those clusters but lets one read cover them, so scattered local clusters
 * do not split the device's requests. Each extent is one op of the copy
 * pipeline (copy.h): it reads
 * every piece of the chain that makes up the range (the whole chain down to
 * the bottom, since a copied cluster must be complete), writes the clusters
 * that are not all zeros into fresh host clusters and links them. What is
 * left here is policy: what to copy, how fast, zero clusters with a base
 * (written as zero clusters after the commit), the cursor and the flushes.
 *
 * Locks (optional hooks, for owners that serve guest I/O too): an extent
 * holds its range from before its reads until it retires; ZERO and PARTIAL
 * runs, done synchronously, only check that nobody holds theirs.
 *
 * Invariants: extents are kept in planning order; the cursor is the start of
 * the oldest unfinished extent (or the planner's position when none is in
 * flight), so every cluster below it is done. The first error wins and stops
 * planning; what was committed stays committed. A pause (on_error) is that
 * same stop, kept open: resuming clears the error and plans again from the
 * cursor, which never passed failed work, so nothing is skipped, and what
 * completed above it is local by then, so nothing is copied twice.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/checked.h"
#include "common/error.h"
#include "copy.h"
#include "extent_pool.h"
#include "formats/image.h"
#include "inflight.h"
#include "formats/port.h"
#include "io/io.h"
#include "meta_ahead.h"
#include "meta_fetch.h"
#include "stream.h"

enum run_kind {
	RUN_LOCAL,
	RUN_SKIP,
	RUN_ZERO,
	RUN_COPY,
	RUN_PARTIAL,
};

/* A COPY run in flight: one copy op under its range lock. */
struct extent {
	struct copy_op op;
	struct stream *s;
	struct extent *next; /* planning order */
	void *lock; /* token of the range lock, or NULL */
	size_t buf_bytes; /* op.buf's size, for the pool */
	uint64_t t0; /* started (ns) */
	uint64_t ifc_bytes; /* reported to the controller, or 0 */
};

struct stream {
	struct img *top;
	struct img *base;
	struct sio_queue *q;
	struct extent_pool *own_pool; /* without a shared one, or NULL */
	struct extent_pool_user *pu; /* where the extent buffers come from */
	bool starved; /* the last pump got no buffer: plans again later */
	struct copier *copier; /* the disk's, or our own */
	bool own_copier;
	struct meta_ahead *ahead; /* L2 read-ahead, or NULL */
	struct meta_fetch mf; /* the planner missed a slice: read on q */
	struct ifc ifc; /* extents in flight and their size */
	bool limited; /* stream_set_limits(): the owner's bounds rule */
	unsigned max_inflight; /* the owner's bounds, while limited */
	uint64_t extent_bytes;
	uint64_t flush_bytes;
	int (*lock)(void *opaque, uint64_t off, uint64_t len, void **token);
	void (*unlock)(void *opaque, void *token);
	void *lock_opaque;
	bool blocked; /* the planner waits for a locked range */
	uint32_t cs; /* top cluster size */
	uint64_t end; /* clusters */

	uint64_t planner; /* next cluster to plan */
	struct extent *head; /* in flight, planning order */
	struct extent *tail;
	unsigned inflight;
	uint64_t plan_budget; /* bytes the planner may still copy */
	bool zero_clusters; /* top can express zeros as metadata */
	uint64_t since_flush;
	uint64_t next_ok_ns; /* speed limit: earliest next copy start */
	/* Data sync ahead of a flush, on the queue (see presync_start()). */
	struct sio_req presync;
	bool presync_busy;
	bool presync_done; /* everything copied before it is durable */
	/* The flush, on the port (img_flush_start(); see flush_start()). */
	struct img_port *port; /* the top's, or own_port */
	struct img_port *own_port;
	bool flush_busy;

	int err;
	char errmsg[SX_ERROR_MAX];
	uint64_t failed_at; /* first cluster of failed work, or UINT64_MAX */
	int on_error; /* enum stream_on_error */
	bool pause_flushed; /* pausing: its best-effort flush was started */

	_Atomic bool abort;
	_Atomic uint64_t speed;
	_Atomic uint64_t cur;
	_Atomic uint64_t bytes_copied;
	_Atomic uint64_t bytes_skipped;
	_Atomic uint64_t bytes_zero;
	_Atomic uint64_t rate;
	_Atomic bool finalized;
	/* What the pipeline does (stream_progress), for any thread. */
	_Atomic uint64_t inflight_bytes;
	_Atomic uint64_t window_bytes;
	_Atomic uint64_t request_bytes;
	_Atomic uint64_t device_rate;
	_Atomic uint64_t latency_us;
	_Atomic uint64_t read_request_bytes;
	_Atomic uint64_t write_request_bytes;
	uint64_t rate_t0;
	uint64_t rate_b0;

	void (*progress)(void *opaque, const struct stream_progress *p);
	void *progress_opaque;
	uint64_t progress_ns;
	uint64_t progress_last;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Record the stream's first error, keeping the message for later. */
static void stream_fail(struct stream *s, int err)
{
	if (s->err)
		return;
	s->err = err;
	snprintf(s->errmsg, sizeof(s->errmsg), "%s",
		 sx_last_error()[0] ? sx_last_error() : strerror(-err));
}

/* A fixed extent size as the stream uses it: whole clusters, one at least. */
static uint64_t whole_clusters(const struct stream *s, uint64_t bytes)
{
	if (bytes < s->cs)
		return s->cs;
	return bytes - bytes % s->cs;
}

/*
 * The window's floor for the chain between top and the stream's base: four
 * extents of the start size per connection of each NBD layer (at most half
 * the budget), so that each connection keeps requests queued at the server
 * while answers travel back, and the server's own disk sees depth (a
 * server works on several requests of a connection at once). Measured on
 * qemu-nbd over a Unix socket (bench/README.md, issue 12): left to the knee
 * of single windows, the stream settled anywhere from 4 to 10 MiB in flight
 * and took 4.2-6.2 s, where the best fixed shapes (8 x 4 MiB, 16 x 2 MiB in
 * flight) took 3.9-4.4 s; the
 * controller's windows cannot see what depth buys a server whose latency
 * swings with its own disk. With two extents per connection (8 MiB) 4.2-5.1
 * s, with four (16 MiB) 3.7-4.3 s. Above the floor the controller steers
 * as everywhere. Local chains: no floor.
 */
static uint64_t remote_floor(const struct stream *s, uint64_t budget)
{
	struct sio_nbd_info ni;
	uint64_t floor = 0, want;
	const struct img *l;

	for (l = s->top->backing; l && l != s->base; l = l->backing) {
		if (!l->file || sio_nbd_get_info(l->file, &ni) < 0)
			continue;
		want = 4ull * sx_max(ni.connections, 1u) * IFC_START_EXTENT;
		floor = sx_max(floor, want);
	}
	return sx_min(floor, budget / 2);
}

/*
 * The controller over the pool's budget (a pool of our own when the owner
 * has none: max_inflight buffers of extent_bytes when both are fixed, as
 * before the controller, else the default budget).
 */
static int controller_init(struct stream *s, const struct stream_opts *o)
{
	struct extent_pool_stats ps;
	struct ifc_opts io = {0};
	uint64_t fixed_extent = 0, budget = 0;
	int ret;

	if (o->extent_bytes)
		fixed_extent = whole_clusters(s, o->extent_bytes);
	if (o->max_inflight && fixed_extent)
		budget = o->max_inflight * fixed_extent;
	if (!o->pool && extent_pool_create(budget, &s->own_pool) < 0)
		return sx_error(ENOMEM, "stream: out of memory");
	extent_pool_get_stats(o->pool ? o->pool : s->own_pool, &ps);
	io.max_bytes = ps.budget;
	io.fixed_depth = o->max_inflight;
	io.fixed_extent = fixed_extent;
	io.min_bytes = remote_floor(s, ps.budget);
	/* Extents of whole clusters: a cluster may be larger than 256 KiB. */
	io.min_extent = IFC_MIN_EXTENT;
	while (io.min_extent < s->cs)
		io.min_extent *= 2;
	io.max_extent =
		IFC_MAX_EXTENT > io.min_extent ? IFC_MAX_EXTENT : io.min_extent;
	/* A budget below what a fixed override needs: the override wins. */
	if (io.fixed_depth && !io.fixed_extent &&
	    io.max_bytes < io.fixed_depth * io.min_extent)
		io.max_bytes = io.fixed_depth * io.min_extent;
	if (io.max_bytes < (fixed_extent ? fixed_extent : io.min_extent))
		io.max_bytes = fixed_extent ? fixed_extent : io.min_extent;
	ret = ifc_init(&s->ifc, &io, now_ns());
	if (ret < 0) {
		extent_pool_destroy(s->own_pool);
		s->own_pool = NULL;
		return sx_error(ret, "stream: bad pipeline limits");
	}
	return 0;
}

int stream_create(const struct stream_opts *o, struct stream **out)
{
	struct stream *s;
	struct img *l;
	int ret = 0;

	if (!o || !o->top || !o->q || !out)
		return sx_error(EINVAL, "stream: missing top image or queue");
	if (!o->top->writable)
		return sx_error(EROFS, "%s: image is open read-only",
				o->top->path);
	if (!img_can_stream(o->top))
		return sx_error(ENOTSUP,
				"%s: format %s cannot be streamed into",
				o->top->path, img_format(o->top));
	if (o->base) {
		for (l = o->top->backing; l && l != o->base; l = l->backing)
			;
		if (!l)
			return sx_error(
				EINVAL,
				"%s: base %s is not in its backing chain",
				o->top->path, o->base->path);
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return sx_error(ENOMEM, "stream: out of memory");
	s->top = o->top;
	s->base = o->base;
	s->q = o->q;
	s->cs = o->top->cluster_size;
	if (!o->lock != !o->unlock) {
		free(s);
		return sx_error(EINVAL, "stream: lock hooks come in pairs");
	}
	s->lock = o->lock;
	s->unlock = o->unlock;
	s->lock_opaque = o->lock_opaque;
	s->flush_bytes = o->flush_bytes ? o->flush_bytes : STREAM_DEFAULT_FLUSH;
	s->end = o->top->size / s->cs + (o->top->size % s->cs != 0);
	s->plan_budget = UINT64_MAX;
	s->failed_at = UINT64_MAX;
	s->on_error = o->on_error;
	ret = controller_init(s, o);
	if (ret < 0) {
		free(s);
		return ret;
	}
	if (extent_pool_join(o->pool ? o->pool : s->own_pool, &s->pu) < 0) {
		extent_pool_destroy(s->own_pool);
		free(s);
		return sx_error(ENOMEM, "stream: out of memory");
	}
	if (meta_ahead_create(o->top, o->base, o->q, &s->ahead) < 0) {
		extent_pool_leave(s->pu);
		extent_pool_destroy(s->own_pool);
		free(s);
		return -ENOMEM;
	}
	s->port = img_get_port(o->top);
	if (s->port == img_port_sync()) {
		ret = img_port_queue_create(o->q, &s->own_port);
		if (ret < 0) {
			meta_ahead_destroy(s->ahead);
			extent_pool_leave(s->pu);
			extent_pool_destroy(s->own_pool);
			free(s);
			return ret;
		}
		s->port = s->own_port;
	}
	s->copier = o->copier;
	if (!s->copier) {
		ret = copier_create(o->top, o->q, &s->copier);
		s->own_copier = ret >= 0;
	} else if (!copier_serves(s->copier, o->top, o->q)) {
		ret = sx_error(EINVAL, "%s: the copier is another disk's",
			       o->top->path);
	}
	if (ret < 0) {
		img_port_queue_destroy(s->own_port);
		meta_ahead_destroy(s->ahead);
		extent_pool_leave(s->pu);
		extent_pool_destroy(s->own_pool);
		free(s);
		return ret;
	}
	s->zero_clusters = img_has_zero_clusters(o->top);
	atomic_store(&s->speed, o->speed);
	s->progress = o->progress;
	s->progress_opaque = o->progress_opaque;
	s->progress_ns = (o->progress_ms ? o->progress_ms : 500) * 1000000ull;
	s->rate_t0 = now_ns();
	*out = s;
	return 0;
}

void stream_destroy(struct stream *s)
{
	if (!s)
		return;
	if (s->own_copier)
		copier_destroy(s->copier);
	meta_ahead_destroy(s->ahead);
	img_port_queue_destroy(s->own_port);
	extent_pool_leave(s->pu);
	extent_pool_destroy(s->own_pool);
	free(s);
}

int stream_seek(struct stream *s, uint64_t cur)
{
	if (stream_inflight(s))
		return sx_error(EBUSY, "%s: stream busy", s->top->path);
	if (cur > s->end)
		return sx_error(EINVAL, "%s: cursor %llu past end %llu",
				s->top->path, (unsigned long long)cur,
				(unsigned long long)s->end);
	s->planner = cur;
	atomic_store(&s->cur, cur);
	return 0;
}

/* Classify one piece reported by the chain. */
static enum run_kind kind_of(struct stream *s, const struct img_extent *e,
			     unsigned depth)
{
	if (depth == 0 && e->status != IMG_UNALLOC)
		return RUN_LOCAL;
	switch (e->status) {
	case IMG_DATA:
	case IMG_COMPRESSED:
		return RUN_COPY;
	case IMG_ZERO:
		return s->base ? RUN_ZERO : RUN_SKIP;
	case IMG_UNALLOC:
	default:
		/*
		 * Zeros because a layer above base ends early: once the top
		 * points at base, base would show through.
		 */
		if (s->base && depth != s->base->depth)
			return RUN_ZERO;
		return RUN_SKIP;
	}
}

/* classify() needs a slice that is being read: plan again later. */
#define PLAN_PARKED 1

/* The planner's slice is in; the next pump plans on (nothing to call). */
static void plan_fetched(struct meta_fetch *f, int res)
{
	(void)f;
	(void)res;
}

/*
 * The planner's chain status, never waiting for metadata: read-ahead
 * usually has the slice cached; a miss starts its read on the queue and
 * answers PLAN_PARKED (stream_inflight() counts the read, and the pump
 * after its completion asks again). Synchronous after repeated misses.
 */
static int plan_status(struct stream *s, uint64_t off, uint64_t len,
		       struct img_extent *e, unsigned *depth)
{
	int ret;

	if (!meta_fetch_sync(&s->mf)) {
		ret = img_chain_status_nowait(s->top, s->base, off, len, e,
					      depth, &s->mf.miss);
		if (meta_fetch_park(&s->mf, ret, s->q, plan_fetched, s))
			return PLAN_PARKED;
		if (!meta_fetch_sync(&s->mf))
			return ret;
	}
	ret = meta_fetch_take_error(&s->mf);
	if (ret < 0)
		return ret;
	return img_chain_status(s->top, s->base, off, len, e, depth);
}

/*
 * The kind of the run of clusters at `cl` and its length (<= max clusters).
 * A cluster whose pieces differ gets the kind that covers them all.
 * PLAN_PARKED: ask again once the planner's fetch is over.
 */
static int classify(struct stream *s, uint64_t cl, uint64_t max,
		    enum run_kind *kind, uint64_t *n)
{
	uint64_t off = cl * s->cs, len, pos, cend;
	struct img_extent e;
	enum run_kind k, acc;
	bool local = false, other = false;
	unsigned depth;
	int ret;

	len = sx_min(max * s->cs, s->top->size - off);
	ret = plan_status(s, off, len, &e, &depth);
	if (ret)
		return ret;
	k = kind_of(s, &e, depth);
	if (e.len >= s->cs || off + e.len >= s->top->size) {
		*kind = k;
		*n = e.len / s->cs +
		     (off + e.len >= s->top->size && e.len % s->cs != 0);
		if (*n == 0)
			*n = 1;
		return 0;
	}

	/* The cluster is made of several pieces: combine their kinds. */
	cend = sx_min(off + s->cs, s->top->size);
	acc = RUN_SKIP;
	for (pos = off; pos < cend; pos += e.len) {
		if (pos != off) {
			ret = plan_status(s, pos, cend - pos, &e, &depth);
			if (ret)
				return ret;
			k = kind_of(s, &e, depth);
		}
		if (k == RUN_LOCAL)
			local = true;
		else
			other = true;
		if (k == RUN_COPY || (k == RUN_ZERO && acc != RUN_COPY))
			acc = k;
	}
	if (local)
		acc = other ? RUN_PARTIAL : RUN_LOCAL;
	*kind = acc;
	*n = 1;
	return 0;
}

static uint64_t copy_gate(struct stream *s, uint64_t bytes)
{
	uint64_t speed = atomic_load(&s->speed), now = now_ns();

	if (!speed) {
		s->next_ok_ns = 0;
		return 0;
	}
	if (s->next_ok_ns > now)
		return s->next_ok_ns - now;
	if (s->next_ok_ns + 1000000000ull < now)
		s->next_ok_ns = now; /* no credit for idle time */
	s->next_ok_ns += bytes * 1000000000ull / speed;
	return 0;
}

static void update_cursor(struct stream *s)
{
	uint64_t cur = s->head ? s->head->op.off / s->cs : s->planner;

	/* Work that failed is not done: the cursor never passes it. */
	atomic_store(&s->cur, sx_min(cur, s->failed_at));
}

static void count_copied(struct stream *s, uint64_t bytes)
{
	uint64_t t = now_ns(), total;

	total = atomic_fetch_add(&s->bytes_copied, bytes) + bytes;
	s->since_flush += bytes;
	if (t - s->rate_t0 >= 500000000ull) {
		atomic_store(&s->rate, (total - s->rate_b0) * 1000000000ull /
					       (t - s->rate_t0));
		s->rate_t0 = t;
		s->rate_b0 = total;
	}
}

/*
 * Zero clusters of a COPY extent: with no base they are left unallocated
 * (nothing will show through); with a base they become zero clusters, or
 * data where the format has no zero clusters.
 */
static bool zero_as_data(struct stream *s)
{
	return s->base && !s->zero_clusters;
}

static void publish(struct stream *s);

/*
 * The extent's copy is over (copy.h): with a base, the zero clusters it did
 * not write become zero clusters; then retire the extent.
 */
static void ex_done(struct copy_op *op, int err)
{
	struct extent *ex = op->priv;
	struct stream *s = ex->s;
	struct img *top = s->top;
	struct extent **pp;
	uint64_t i, n, goff, ncl = op->len / s->cs, zero = 0;
	int ret = err;

	for (i = 0; i < ncl && ret >= 0; i++) {
		goff = op->off + i * s->cs;
		if ((op->top && op->top[i]) || (op->flags & COPY_WRITE_ZEROS) ||
		    !copy_is_zero(op->buf + i * s->cs, s->cs))
			continue;
		n = sx_min(s->cs, top->size - goff);
		zero += n;
		if (s->base)
			ret = img_write_zeroes(top, goff, n, 0);
	}
	if (ret < 0) {
		/* What was committed stays; the cursor stops here. */
		stream_fail(s, ret);
		s->failed_at = sx_min(s->failed_at, op->off / s->cs);
	} else {
		count_copied(s, op->written);
		atomic_fetch_add(&s->bytes_zero, zero);
	}
	/* Unlink: usually the head. */
	for (pp = &s->head; *pp != ex; pp = &(*pp)->next)
		;
	*pp = ex->next;
	if (s->tail == ex) {
		s->tail = NULL;
		for (struct extent *t = s->head; t; t = t->next)
			s->tail = t;
	}
	s->inflight--;
	if (ex->ifc_bytes && ret < 0)
		ifc_cancelled(&s->ifc, ex->ifc_bytes);
	else if (ex->ifc_bytes)
		ifc_completed(&s->ifc, ex->ifc_bytes, ex->t0, now_ns());
	update_cursor(s);
	if (ex->lock)
		s->unlock(s->lock_opaque, ex->lock);
	extent_pool_put(s->pu, op->buf, ex->buf_bytes);
	free(ex);
	publish(s);
}

/*
 * The extent size for the next extent: the owner's bound while it limits
 * the stream, else the controller's (whole clusters either way). An
 * extent is at most this long; its buffer is as long as the extent.
 */
static uint64_t next_extent(const struct stream *s)
{
	if (s->limited)
		return s->extent_bytes;
	return whole_clusters(s, ifc_extent_bytes(&s->ifc));
}

/*
 * Whether an extent of bytes may start now. Asked with the extent's own
 * length once it is planned: extents end where the copy work does (a local
 * run, a hole of the base), and asking for a whole next_extent() each time
 * left windows of short extents three quarters empty, which the controller
 * can never measure (it then kept its window for the rest of the stream).
 */
static bool may_start(const struct stream *s, uint64_t bytes)
{
	if (s->limited)
		return s->inflight < s->max_inflight;
	return ifc_may_start(&s->ifc, bytes);
}

/*
 * Local runs an extent reads over (bytes): what a few more bytes of a
 * large read cost, against a request more. An eighth of the extent: the
 * read grows by at most an eighth where the top already holds one
 * cluster in every few, and a run of local clusters longer than that
 * still splits the read (reading it would cost more than it saves).
 */
static uint64_t gap_bytes(const struct stream *s, uint64_t extent)
{
	return extent / 8 - extent / 8 % s->cs;
}

/* Publish what the pipeline does, for stream_get_progress(). */
static void publish(struct stream *s)
{
	struct copier_stats cs;
	struct ifc_stats st;

	ifc_stats(&s->ifc, &st);
	copier_get_stats(s->copier, &cs);
	atomic_store(&s->inflight_bytes, st.inflight_bytes);
	atomic_store(&s->window_bytes,
		     s->limited ? (uint64_t)s->max_inflight * s->extent_bytes
				: st.target_bytes);
	atomic_store(&s->request_bytes, next_extent(s));
	atomic_store(&s->device_rate, st.throughput);
	atomic_store(&s->latency_us, st.latency_ns / 1000);
	if (cs.reads)
		atomic_store(&s->read_request_bytes, cs.read_bytes / cs.reads);
	if (cs.writes)
		atomic_store(&s->write_request_bytes,
			     cs.write_bytes / cs.writes);
}

/*
 * A buffer for the next extent from the pool. Returns 1 (*buf set), 0 when
 * the pool says not now (the stream is starved: it plans again at a later
 * pump, after some extent of this loop's streams retired), -errno.
 */
static int take_buf(struct stream *s, size_t bytes, uint8_t **buf)
{
	void *b;
	int ret = extent_pool_get(s->pu, bytes, &b);

	if (ret == -EAGAIN) {
		s->starved = true;
		return 0;
	}
	if (ret < 0)
		return sx_error(ENOMEM, "stream: out of memory");
	*buf = b;
	return 1;
}

/*
 * Copy clusters [cl, cl + n) as one extent, which takes over the range lock
 * (token may be NULL) and buf (from take_buf()). A failure of the copy
 * itself comes through ex_done() (maybe before this returns); -errno here
 * only when nothing was started.
 */
static int start_copy(struct stream *s, uint64_t cl, uint64_t n, void *token,
		      uint8_t *buf, size_t bytes)
{
	struct extent *ex;

	ex = calloc(1, sizeof(*ex));
	if (!ex) {
		extent_pool_put(s->pu, buf, bytes);
		if (token)
			s->unlock(s->lock_opaque, token);
		return sx_error(ENOMEM, "stream: out of memory");
	}
	ex->buf_bytes = bytes;
	ex->lock = token;
	ex->s = s;
	ex->op = (struct copy_op){
		.off = cl * s->cs,
		.len = n * s->cs,
		.buf = buf,
		.flags = COPY_SKIP_TOP |
			 (zero_as_data(s) ? COPY_WRITE_ZEROS : 0),
		.gap_max = gap_bytes(s, bytes),
		.done = ex_done,
		.priv = ex,
	};
	ex->t0 = now_ns();
	if (!s->limited) {
		ex->ifc_bytes = n * s->cs;
		ifc_started(&s->ifc, ex->ifc_bytes, ex->t0);
	}
	if (s->tail)
		s->tail->next = ex;
	else
		s->head = ex;
	s->tail = ex;
	s->inflight++;
	copy_start(s->copier, &ex->op);
	return 0;
}

/*
 * Grow a COPY extent of n clusters at the planner over what follows, up to
 * max clusters: further COPY runs (another layer's, say), and local runs
 * of at most gap clusters between two COPY runs, which the copy reads over
 * and never writes (their bytes added to *over: skipped, once the extent
 * starts; planning may stop short and plan it again). Stops at anything else, or
 * where a lookup would wait for metadata (the next extent starts there).
 */
static uint64_t extend_extent(struct stream *s, uint64_t limit, uint64_t max,
			      uint64_t n, uint64_t gap, uint64_t *over)
{
	uint64_t at, m, m2;
	enum run_kind k;

	while (n < max && s->planner + n < limit) {
		at = s->planner + n;
		if (classify(s, at, limit - at, &k, &m) != 0)
			break;
		if (k == RUN_COPY) {
			n += sx_min(m, max - n);
			continue;
		}
		if (k != RUN_LOCAL || m > gap || n + m >= max ||
		    at + m >= limit)
			break;
		if (classify(s, at + m, limit - at - m, &k, &m2) != 0 ||
		    k != RUN_COPY)
			break;
		*over += m * s->cs;
		n += m + sx_min(m2, max - n - m);
	}
	return n;
}

/* Fill the parts of a partially local cluster through the write path. */
static int fill_partial(struct stream *s, uint64_t cl)
{
	struct img *top = s->top;
	uint64_t off = cl * s->cs, len = sx_min(s->cs, top->size - off);
	uint8_t *buf;
	int ret;

	buf = sio_buf_alloc(s->cs);
	if (!buf)
		return sx_error(ENOMEM, "stream: out of memory");
	ret = img_pread(top, buf, len, off);
	if (ret >= 0)
		ret = img_pwrite(top, buf, len, off);
	if (ret >= 0)
		count_copied(s, len);
	sio_buf_free(buf);
	return ret;
}

/*
 * Take the lock of clusters [cl, cl + n). Returns 1 when taken (*token set;
 * NULL without hooks), 0 when the range is busy, -errno.
 */
static int range_lock(struct stream *s, uint64_t cl, uint64_t n, void **token)
{
	uint64_t off = cl * s->cs;
	int ret;

	*token = NULL;
	if (!s->lock)
		return 1;
	ret = s->lock(s->lock_opaque, off, n * s->cs, token);
	if (ret == -EBUSY) {
		s->blocked = true;
		return 0;
	}
	if (ret < 0)
		return sx_error(ret, "%s: cannot lock clusters: %s",
				s->top->path, strerror(-ret));
	return 1;
}

/* The range is free right now (for work done synchronously). */
static int range_free(struct stream *s, uint64_t cl, uint64_t n)
{
	void *token;
	int ret = range_lock(s, cl, n, &token);

	if (ret > 0 && token)
		s->unlock(s->lock_opaque, token);
	return ret;
}

static void presync_done(struct sio_req *req, int res)
{
	struct stream *s = req->priv;

	s->presync_busy = false;
	if (res < 0) {
		sx_error(res, "%s: cannot sync data: %s", s->top->path,
			 strerror(-res));
		stream_fail(s, res);
		return;
	}
	s->presync_done = true;
}

/*
 * Start an fdatasync of the top on the queue. A flush begins with one, and
 * on the owner's thread it is the long part (everything copied since the
 * last flush reaches the media): done here first, while the owner goes on
 * serving guest I/O and copying, it leaves the flush only the data written
 * meanwhile and the small metadata writes.
 */
static void presync_start(struct stream *s)
{
	if (s->presync_busy || s->presync_done)
		return;
	s->presync = (struct sio_req){
		.op = SIO_OP_FDATASYNC,
		.file = s->top->file,
		.done = presync_done,
		.priv = s,
	};
	if (sio_queue_submit(s->q, &s->presync) < 0)
		return; /* the flush will sync synchronously */
	s->presync_busy = true;
}

static void flush_done(void *opaque, int res)
{
	struct stream *s = opaque;

	s->flush_busy = false;
	if (res < 0)
		stream_fail(s, res);
}

/*
 * Flush the top on the port: the driver's crash-safe order, each step a
 * continuation, so the owner never waits for it. What is copied meanwhile
 * stays for the next flush (since_flush counts it again).
 * 0 (started, or one is in flight already: retried by a later pump) or
 * -errno.
 */
static int flush_start(struct stream *s)
{
	uint64_t since = s->since_flush;
	int ret;

	if (s->flush_busy)
		return 0;
	s->flush_busy = true;
	s->presync_done = false;
	s->since_flush = 0;
	ret = img_flush_start(s->top, s->port, flush_done, s);
	if (ret == -EAGAIN) {
		/* Someone else's flush: ours goes after it. */
		s->flush_busy = false;
		s->presync_done = true;
		s->since_flush = since;
		return 0;
	}
	if (ret < 0) {
		s->flush_busy = false;
		return sx_error(ret, "%s: cannot start a flush: %s",
				s->top->path, strerror(-ret));
	}
	return 0;
}

/* The stream's error is one it pauses on rather than fails. */
static bool may_pause(const struct stream *s)
{
	return s->on_error == STREAM_ON_ERROR_PAUSE &&
	       (s->err == -ENOSPC || s->err == -EDQUOT || s->err == -EIO);
}

/*
 * Pausing, once the extents drained: one flush, so that what was copied
 * is durable while the stream waits (it may well fail for the same
 * reason: the metadata then stays dirty for a later flush, see flush.c).
 */
static void pause_flush(struct stream *s)
{
	if (s->pause_flushed || stream_inflight(s))
		return;
	s->pause_flushed = true;
	if (flush_start(s) < 0)
		sx_error_clear();
}

int stream_pump(struct stream *s, uint64_t limit, uint64_t *wait_ns)
{
	enum run_kind kind = RUN_LOCAL;
	uint64_t n = 0, max, wait, ext, len, over;
	uint8_t *buf = NULL;
	void *token;
	int ret = 0;

	*wait_ns = 0;
	s->blocked = false;
	s->starved = false;
	if (limit > s->end)
		limit = s->end;
	/*
	 * Bound the metadata the driver holds back, and what a crash leaves
	 * to copy again: sync the data on the queue first, then flush.
	 */
	if (s->since_flush >= s->flush_bytes && !s->err) {
		if (s->presync_done) {
			ret = flush_start(s);
			if (ret < 0)
				goto out;
		} else {
			presync_start(s);
		}
	}
	if (!s->err && !atomic_load(&s->abort))
		meta_ahead_pump(s->ahead, s->planner * s->cs);
	while (!s->err && !atomic_load(&s->abort) && s->planner < limit &&
	       may_start(s, s->cs) && s->plan_budget && !s->mf.busy) {
		meta_ahead_pump(s->ahead, s->planner * s->cs);
		ext = next_extent(s);
		max = sx_min(limit - s->planner, ext / s->cs);
		ret = classify(s, s->planner, limit - s->planner, &kind, &n);
		if (ret == PLAN_PARKED) {
			ret = 0;
			break;
		}
		if (ret < 0)
			break;
		switch (kind) {
		case RUN_LOCAL:
			atomic_fetch_add(&s->bytes_skipped, n * s->cs);
			break;
		case RUN_SKIP:
			atomic_fetch_add(&s->bytes_zero, n * s->cs);
			break;
		case RUN_ZERO:
			if (s->zero_clusters) {
				ret = range_free(s, s->planner, n);
				if (ret <= 0)
					goto out;
				ret = img_write_zeroes(
					s->top, s->planner * s->cs, n * s->cs,
					IMG_WZ_NO_FALLBACK);
				if (ret == -ENOTSUP) {
					s->zero_clusters = false;
					ret = 0;
					continue; /* plan it again as data */
				}
				atomic_fetch_add(&s->bytes_zero, n * s->cs);
				break;
			}
			/* zeros written as data */
			__attribute__((fallthrough));
		case RUN_COPY:
			n = sx_min(n, max);
			over = 0;
			if (kind == RUN_COPY)
				n = extend_extent(s, limit, max, n,
						  gap_bytes(s, ext) / s->cs,
						  &over);
			len = n * s->cs;
			if (!may_start(s, len))
				goto out; /* a completion makes room */
			ret = take_buf(s, len, &buf);
			if (ret <= 0)
				goto out;
			ret = range_lock(s, s->planner, n, &token);
			if (ret <= 0) {
				extent_pool_put(s->pu, buf, len);
				goto out;
			}
			ret = 0;
			wait = copy_gate(s, len);
			if (wait) {
				extent_pool_put(s->pu, buf, len);
				if (token)
					s->unlock(s->lock_opaque, token);
				if (!s->inflight)
					*wait_ns = wait;
				return 0;
			}
			atomic_fetch_add(&s->bytes_skipped, over);
			if (s->plan_budget != UINT64_MAX)
				s->plan_budget -= sx_min(s->plan_budget, len);
			/* The extent owns clusters [planner, planner + n). */
			s->planner += n;
			ret = start_copy(s, s->planner - n, n, token, buf, len);
			update_cursor(s);
			if (ret < 0)
				goto out;
			continue;
		case RUN_PARTIAL:
			ret = range_free(s, s->planner, 1);
			if (ret <= 0)
				goto out;
			ret = fill_partial(s, s->planner);
			break;
		}
		if (ret < 0)
			break;
		s->planner += n;
		update_cursor(s);
	}
	/*
	 * Planned and copied: sync the data on the queue, then flush on the
	 * port; the pump reports the end (nothing in flight) once the flush
	 * is over, so stream_finish() finds nothing to write.
	 */
	if (!ret && !s->err && !s->inflight && !s->flush_busy &&
	    s->since_flush && stream_planned(s, limit)) {
		if (s->presync_done)
			ret = flush_start(s);
		else
			presync_start(s);
	}
out:
	if (ret < 0)
		stream_fail(s, ret);
	if (s->err && may_pause(s) && !atomic_load(&s->abort))
		pause_flush(s);
	publish(s);
	/* Not waiting for a buffer: leave the queue to those who are. */
	if (!s->starved)
		extent_pool_unwait(s->pu);
	return s->err;
}

void stream_set_limits(struct stream *s, unsigned max_inflight,
		       uint64_t extent_bytes)
{
	s->limited = max_inflight || extent_bytes;
	s->max_inflight = max_inflight ? max_inflight : 1;
	s->extent_bytes = whole_clusters(
		s, extent_bytes ? extent_bytes : ifc_extent_bytes(&s->ifc));
}

void stream_set_budget(struct stream *s, uint64_t max_bytes)
{
	s->plan_budget = max_bytes ? max_bytes : UINT64_MAX;
}

bool stream_blocked(const struct stream *s)
{
	return s->blocked;
}

unsigned stream_inflight(const struct stream *s)
{
	return s->inflight + meta_ahead_inflight(s->ahead) + s->presync_busy +
	       s->flush_busy + s->mf.busy;
}

bool stream_planned(const struct stream *s, uint64_t limit)
{
	return s->err || atomic_load(&s->abort) || !s->plan_budget ||
	       s->planner >= sx_min(limit, s->end);
}

int stream_finish(struct stream *s)
{
	struct img *top = s->top;
	int ret;

	if (stream_inflight(s))
		return sx_error(EBUSY, "%s: stream busy", top->path);
	ret = img_flush(top);
	if (ret < 0)
		stream_fail(s, ret);
	if (s->err)
		return sx_error(s->err, "%s", s->errmsg);
	s->since_flush = 0;
	s->presync_done = false;
	if (atomic_load(&s->cur) < s->end || atomic_load(&s->finalized))
		return 0;
	ret = img_rebase_onto(top, s->base);
	if (ret < 0) {
		stream_fail(s, ret);
		return ret;
	}
	atomic_store(&s->finalized, true);
	return 0;
}

static void report(struct stream *s, bool force)
{
	struct stream_progress p;
	uint64_t t;

	if (!s->progress)
		return;
	t = now_ns();
	if (!force && t - s->progress_last < s->progress_ns)
		return;
	s->progress_last = t;
	stream_get_progress(s, &p);
	s->progress(s->progress_opaque, &p);
}

int stream_run(struct stream *s, uint64_t limit, uint64_t max_bytes)
{
	uint64_t wait;
	int ret;

	stream_set_budget(s, max_bytes);
	for (;;) {
		stream_pump(s, limit, &wait);
		report(s, false);
		/*
		 * A locked range frees when the owner's I/O completes, and
		 * so do the buffers of a shared pool.
		 */
		if (stream_inflight(s) || s->blocked || s->starved) {
			ret = sio_queue_run(s->q, 1);
			if (ret < 0)
				stream_fail(s, ret);
			continue;
		}
		if (stream_planned(s, limit))
			break;
		if (wait) {
			struct timespec ts = {
				.tv_sec = (time_t)(wait / 1000000000ull),
				.tv_nsec = (long)(wait % 1000000000ull),
			};
			nanosleep(&ts, NULL);
		}
	}
	stream_set_budget(s, 0);
	ret = stream_finish(s);
	report(s, true);
	if (ret < 0)
		return ret;
	if (atomic_load(&s->abort))
		return sx_error(
			ECANCELED, "%s: stream aborted at cluster %llu of %llu",
			s->top->path, (unsigned long long)atomic_load(&s->cur),
			(unsigned long long)s->end);
	return 0;
}

int stream_paused(const struct stream *s, const char **msg)
{
	if (!s->err || !may_pause(s) || !s->pause_flushed ||
	    atomic_load(&s->abort) || stream_inflight(s))
		return 0;
	if (msg)
		*msg = s->errmsg;
	return s->err;
}

int stream_resume(struct stream *s)
{
	/* Aborting while pausing: the same, so that stream_finish() flushes. */
	if (!s->err || !may_pause(s) || stream_inflight(s))
		return sx_error(EINVAL, "%s: the stream is not paused",
				s->top->path);
	s->err = 0;
	s->errmsg[0] = '\0';
	s->failed_at = UINT64_MAX;
	s->pause_flushed = false;
	s->planner = atomic_load(&s->cur);
	update_cursor(s);
	return 0;
}

void stream_request_abort(struct stream *s)
{
	atomic_store(&s->abort, true);
}

void stream_set_speed(struct stream *s, uint64_t speed)
{
	atomic_store(&s->speed, speed);
}

void stream_get_progress(struct stream *s, struct stream_progress *p)
{
	p->cur = atomic_load(&s->cur);
	p->end = s->end;
	p->bytes_copied = atomic_load(&s->bytes_copied);
	p->bytes_skipped = atomic_load(&s->bytes_skipped);
	p->bytes_zero = atomic_load(&s->bytes_zero);
	p->rate = atomic_load(&s->rate);
	p->finalized = atomic_load(&s->finalized);
	p->inflight_bytes = atomic_load(&s->inflight_bytes);
	p->window_bytes = atomic_load(&s->window_bytes);
	p->request_bytes = atomic_load(&s->request_bytes);
	p->device_rate = atomic_load(&s->device_rate);
	p->latency_us = atomic_load(&s->latency_us);
	p->read_request_bytes = atomic_load(&s->read_request_bytes);
	p->write_request_bytes = atomic_load(&s->write_request_bytes);
}
