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
 * COPY runs become extents of up to extent_bytes, several in flight at once
 * on the owner's queue: READ (every piece of the chain that makes up the
 * range, the whole chain down to the bottom, since a copied cluster must be
 * complete) -> WRITE (clusters that turned out all-zero are not written as
 * data) -> commit (the driver links the host run; its L2 updates reach the
 * disk only after the data does).
 *
 * Locks (optional hooks, for owners that serve guest I/O too): an extent
 * holds its range from before its reads until it retires; ZERO and PARTIAL
 * runs, done synchronously, only check that nobody holds theirs.
 *
 * Invariants: extents are kept in planning order; the cursor is the start of
 * the oldest unfinished extent (or the planner's position when none is in
 * flight), so every cluster below it is done. The first error wins and stops
 * planning; what was committed stays committed.
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
#include "formats/image.h"
#include "io/io.h"
#include "io/pool.h"
#include "inflate.h"
#include "meta_ahead.h"
#include "stream.h"

enum run_kind {
	RUN_LOCAL,
	RUN_SKIP,
	RUN_ZERO,
	RUN_COPY,
	RUN_PARTIAL,
};

/* A host run allocated for part of an extent. */
struct ex_run {
	uint64_t off; /* guest offset */
	uint64_t n; /* clusters */
	uint64_t host; /* host offset */
};

struct extent {
	struct stream *s;
	struct extent *next;
	uint64_t off; /* guest offset, cluster aligned */
	uint64_t len; /* whole clusters */
	uint8_t *buf;
	unsigned pending;
	int err;
	bool writing;
	struct sio_req *reqs;
	unsigned nreqs;
	unsigned reqcap;
	struct ex_run *runs;
	unsigned nruns;
	unsigned runcap;
	uint64_t copied; /* bytes written as data */
	bool committed; /* commit_run was called for its runs */
	void *lock; /* token of the range lock, or NULL */
};

struct stream {
	struct img *top;
	struct img *base;
	struct sio_queue *q;
	struct sio_pool *pool; /* extent buffers */
	struct inflater *inflater; /* started on the first compressed piece */
	struct meta_ahead *ahead; /* L2 read-ahead, or NULL */
	unsigned max_inflight;
	uint64_t extent_bytes;
	unsigned opt_inflight; /* as created: stream_set_limits(0) */
	uint64_t opt_extent;
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

	int err;
	char errmsg[SX_ERROR_MAX];
	uint64_t failed_at; /* first cluster of failed work, or UINT64_MAX */

	_Atomic bool abort;
	_Atomic uint64_t speed;
	_Atomic uint64_t cur;
	_Atomic uint64_t bytes_copied;
	_Atomic uint64_t bytes_skipped;
	_Atomic uint64_t bytes_zero;
	_Atomic uint64_t rate;
	_Atomic bool finalized;
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

static bool is_zero(const uint8_t *p, size_t len)
{
	static const uint8_t zeros[16];

	if (len < 16)
		return memcmp(p, zeros, len) == 0;
	return memcmp(p, zeros, 16) == 0 && memcmp(p, p + 16, len - 16) == 0;
}

int stream_create(const struct stream_opts *o, struct stream **out)
{
	struct stream *s;
	struct img *l;

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
	s->max_inflight =
		o->max_inflight ? o->max_inflight : STREAM_DEFAULT_INFLIGHT;
	s->cs = o->top->cluster_size;
	s->extent_bytes =
		o->extent_bytes ? o->extent_bytes : STREAM_DEFAULT_EXTENT;
	if (s->extent_bytes < s->cs)
		s->extent_bytes = s->cs;
	s->extent_bytes -= s->extent_bytes % s->cs;
	s->opt_inflight = s->max_inflight;
	s->opt_extent = s->extent_bytes;
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
	s->pool = sio_pool_create(s->extent_bytes, s->max_inflight);
	if (!s->pool) {
		free(s);
		return sx_error(ENOMEM, "stream: out of memory");
	}
	if (meta_ahead_create(o->top, o->base, o->q, &s->ahead) < 0) {
		sio_pool_destroy(s->pool);
		free(s);
		return -ENOMEM;
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
	inflater_destroy(s->inflater);
	meta_ahead_destroy(s->ahead);
	sio_pool_destroy(s->pool);
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

/*
 * The kind of the run of clusters at `cl` and its length (<= max clusters).
 * A cluster whose pieces differ gets the kind that covers them all.
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
	ret = img_chain_status(s->top, s->base, off, len, &e, &depth);
	if (ret < 0)
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
			ret = img_chain_status(s->top, s->base, pos, cend - pos,
					       &e, &depth);
			if (ret < 0)
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
	uint64_t cur = s->head ? s->head->off / s->cs : s->planner;

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

static struct sio_req *ex_new_req(struct extent *ex)
{
	struct sio_req *r;

	if (ex->nreqs == ex->reqcap) {
		unsigned cap = ex->reqcap ? ex->reqcap * 2 : 8;

		r = realloc(ex->reqs, cap * sizeof(*r));
		if (!r)
			return NULL;
		ex->reqs = r;
		ex->reqcap = cap;
	}
	r = &ex->reqs[ex->nreqs++];
	memset(r, 0, sizeof(*r));
	return r;
}

static void ex_io_done(struct sio_req *req, int res);

/*
 * Issue one read or write for the extent: asynchronously when the request
 * meets the file's direct-I/O alignment, synchronously otherwise (the sync
 * helpers bounce). The request array may move while the extent is being
 * built, so requests are only submitted once it is complete: see
 * ex_submit_all().
 */
static int ex_add_io(struct extent *ex, enum sio_op op, struct sio_file *f,
		     uint8_t *buf, uint64_t len, uint64_t off)
{
	struct sio_req *r;

	if (!sx_is_aligned(off | len, f->align) ||
	    !sx_is_aligned((uintptr_t)buf, f->mem_align)) {
		if (op == SIO_OP_READ)
			return sio_pread(f, buf, len, off);
		return sio_pwrite(f, buf, len, off);
	}
	r = ex_new_req(ex);
	if (!r)
		return sx_error(ENOMEM, "stream: out of memory");
	r->op = op;
	r->file = f;
	r->buf = buf;
	r->off = off;
	r->len = len;
	r->done = ex_io_done;
	r->priv = ex;
	return 0;
}

static int ex_submit_all(struct extent *ex)
{
	unsigned i;
	int ret;

	for (i = 0; i < ex->nreqs; i++) {
		ex->pending++;
		ret = sio_queue_submit(ex->s->q, &ex->reqs[i]);
		if (ret < 0) {
			ex->pending--;
			return ret;
		}
	}
	return 0;
}

static void ex_finish(struct extent *ex);
static void ex_start_write(struct extent *ex);

/* One piece of the extent's work ended: on the last, go to the next step. */
static void ex_put(struct extent *ex)
{
	if (--ex->pending)
		return;
	if (!ex->writing && !ex->err)
		ex_start_write(ex);
	else
		ex_finish(ex);
}

static void ex_io_done(struct sio_req *req, int res)
{
	struct extent *ex = req->priv;

	if (res < 0 && !ex->err) {
		ex->err = res;
		sx_error(res, "%s: %s at offset %llu: %s", req->file->path,
			 req->op == SIO_OP_READ ? "read" : "write",
			 (unsigned long long)req->off, strerror(-res));
		stream_fail(ex->s, res);
	}
	ex_put(ex);
}

/* A decompressed piece arrived (see inflate.h). */
static void ex_piece_done(void *opaque, int res, const char *msg)
{
	struct extent *ex = opaque;

	if (res < 0 && !ex->err) {
		ex->err = res;
		sx_error(res, "%s", msg[0] ? msg : strerror(-res));
		stream_fail(ex->s, res);
	}
	ex_put(ex);
}

/* Read every piece of [ex->off, ex->off + ex->len) the chain holds. */
static int ex_plan_reads(struct extent *ex)
{
	struct stream *s = ex->s;
	uint64_t pos = ex->off;
	uint64_t lim = sx_min(ex->off + ex->len, s->top->size);
	struct img_piece pc;
	int ret = 0;

	if (lim < ex->off + ex->len)
		memset(ex->buf + (lim - ex->off), 0, ex->off + ex->len - lim);
	while (pos < lim) {
		uint8_t *dst = ex->buf + (pos - ex->off);

		ret = img_chain_piece(s->top, pos, lim - pos, &pc);
		if (ret < 0)
			goto out;
		switch (pc.status) {
		case IMG_DATA:
			ret = ex_add_io(ex, SIO_OP_READ, pc.file, dst, pc.len,
					pc.host_off);
			break;
		case IMG_COMPRESSED:
			/*
			 * Decompress on the inflater's thread, so the
			 * device keeps working while the CPU does.
			 */
			if (!s->inflater)
				ret = inflater_create(s->q, &s->inflater);
			if (ret >= 0)
				ret = inflater_submit(s->inflater, pc.layer,
						      pc.cluster_off, pc.from,
						      pc.len, dst,
						      ex_piece_done, ex);
			if (ret >= 0)
				ex->pending++;
			break;
		default:
			memset(dst, 0, pc.len);
			break;
		}
		if (ret < 0)
			goto out;
		pos += pc.len;
	}
out:
	return ret;
}

static int ex_add_run(struct extent *ex, uint64_t off, uint64_t n,
		      uint64_t host)
{
	if (ex->nruns == ex->runcap) {
		unsigned cap = ex->runcap ? ex->runcap * 2 : 4;
		struct ex_run *r = realloc(ex->runs, cap * sizeof(*r));

		if (!r)
			return sx_error(ENOMEM, "stream: out of memory");
		ex->runs = r;
		ex->runcap = cap;
	}
	ex->runs[ex->nruns++] = (struct ex_run){off, n, host};
	return 0;
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

/* Allocate host runs for the clusters with data and write them. */
static void ex_start_write(struct extent *ex)
{
	struct stream *s = ex->s;
	struct img *top = s->top;
	uint64_t ncl = ex->len / s->cs, i = 0, j, host, got;
	int ret = 0;

	ex->writing = true;
	ex->nreqs = 0;
	while (i < ncl) {
		bool zero = is_zero(ex->buf + i * s->cs, s->cs);

		if (zero && !zero_as_data(s)) {
			i++;
			continue;
		}
		for (j = i + 1; j < ncl; j++)
			if (is_zero(ex->buf + j * s->cs, s->cs) &&
			    !zero_as_data(s))
				break;
		while (i < j) {
			uint64_t goff = ex->off + i * s->cs;

			ret = img_alloc_run(top, goff, j - i, &host, &got);
			if (ret < 0)
				goto out;
			ret = ex_add_run(ex, goff, got, host);
			if (ret < 0)
				goto out;
			ret = ex_add_io(ex, SIO_OP_WRITE, top->file,
					ex->buf + i * s->cs, got * s->cs, host);
			if (ret < 0)
				goto out;
			ex->copied += got * s->cs;
			i += got;
		}
	}
	ret = ex_submit_all(ex);
out:
	if (ret < 0) {
		ex->err = ret;
		stream_fail(s, ret);
	}
	if (!ex->pending)
		ex_finish(ex);
}

/* Link what was written, mark zeros, retire the extent. */
static void ex_finish(struct extent *ex)
{
	struct stream *s = ex->s;
	struct img *top = s->top;
	struct extent **pp;
	uint64_t i, ncl = ex->len / s->cs, zero = 0;
	unsigned r;
	int ret = 0;

	if (ex->err || !ex->writing)
		goto failed;
	for (r = 0; r < ex->nruns && ret >= 0; r++)
		ret = img_commit_run(top, ex->runs[r].off, ex->runs[r].n,
				     ex->runs[r].host);
	/* A commit that failed half way may have linked some: keep them. */
	ex->committed = ex->nruns > 0;
	for (i = 0; i < ncl && ret >= 0; i++) {
		uint64_t goff = ex->off + i * s->cs;

		if (!is_zero(ex->buf + i * s->cs, s->cs) || zero_as_data(s))
			continue;
		zero += sx_min(s->cs, s->top->size - goff);
		if (s->base)
			ret = img_write_zeroes(
				top, goff, sx_min(s->cs, top->size - goff), 0);
	}
	if (ret < 0) {
		stream_fail(s, ret);
		goto failed;
	}
	count_copied(s, ex->copied);
	atomic_fetch_add(&s->bytes_zero, zero);
	goto retire;
failed:
	/*
	 * Host clusters allocated for writes that failed were never linked:
	 * give them back, or a failed stream (ENOSPC) would leak them.
	 */
	if (!ex->committed)
		for (r = 0; r < ex->nruns; r++)
			img_release_run(top, ex->runs[r].host, ex->runs[r].n);
	s->failed_at = sx_min(s->failed_at, ex->off / s->cs);
retire:
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
	update_cursor(s);
	if (ex->lock)
		s->unlock(s->lock_opaque, ex->lock);
	sio_pool_put(s->pool, ex->buf);
	free(ex->reqs);
	free(ex->runs);
	free(ex);
}

/* The extent takes over the range lock (token may be NULL). */
static int start_copy(struct stream *s, uint64_t cl, uint64_t n, void *token)
{
	struct extent *ex;
	int ret;

	ex = calloc(1, sizeof(*ex));
	if (!ex) {
		if (token)
			s->unlock(s->lock_opaque, token);
		return sx_error(ENOMEM, "stream: out of memory");
	}
	ex->lock = token;
	ex->s = s;
	ex->off = cl * s->cs;
	ex->len = n * s->cs;
	ex->buf = sio_pool_get(s->pool);
	if (!ex->buf) {
		free(ex);
		return sx_error(ENOMEM, "stream: out of memory");
	}
	if (s->tail)
		s->tail->next = ex;
	else
		s->head = ex;
	s->tail = ex;
	s->inflight++;

	ret = ex_plan_reads(ex);
	if (ret >= 0)
		ret = ex_submit_all(ex);
	if (ret < 0) {
		ex->err = ret;
		stream_fail(s, ret);
	}
	if (!ex->pending) {
		/* Everything was read synchronously (or failed). */
		if (ex->err)
			ex_finish(ex);
		else
			ex_start_write(ex);
	}
	return ret < 0 ? ret : 0;
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

int stream_pump(struct stream *s, uint64_t limit, uint64_t *wait_ns)
{
	enum run_kind kind;
	uint64_t n, max, wait;
	void *token;
	int ret = 0;

	*wait_ns = 0;
	s->blocked = false;
	if (limit > s->end)
		limit = s->end;
	/*
	 * Bound the metadata the driver holds back, and what a crash leaves
	 * to copy again: sync the data on the queue first, then flush.
	 */
	if (s->since_flush >= s->flush_bytes && !s->err) {
		if (s->presync_done) {
			s->presync_done = false;
			s->since_flush = 0;
			ret = img_flush(s->top);
			if (ret < 0)
				goto out;
		} else {
			presync_start(s);
		}
	}
	if (!s->err && !atomic_load(&s->abort))
		meta_ahead_pump(s->ahead, s->planner * s->cs);
	while (!s->err && !atomic_load(&s->abort) && s->planner < limit &&
	       s->inflight < s->max_inflight && s->plan_budget) {
		meta_ahead_pump(s->ahead, s->planner * s->cs);
		max = sx_min(limit - s->planner, s->extent_bytes / s->cs);
		ret = classify(s, s->planner, limit - s->planner, &kind, &n);
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
			ret = range_lock(s, s->planner, n, &token);
			if (ret <= 0)
				goto out;
			ret = 0;
			wait = copy_gate(s, n * s->cs);
			if (wait) {
				if (token)
					s->unlock(s->lock_opaque, token);
				if (!s->inflight)
					*wait_ns = wait;
				return 0;
			}
			if (s->plan_budget != UINT64_MAX)
				s->plan_budget -=
					sx_min(s->plan_budget, n * s->cs);
			/* The extent owns clusters [planner, planner + n). */
			s->planner += n;
			ret = start_copy(s, s->planner - n, n, token);
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
	/* Planned and copied: sync the data before stream_finish() flushes. */
	if (!ret && !s->inflight && s->since_flush && stream_planned(s, limit))
		presync_start(s);
out:
	if (ret < 0)
		stream_fail(s, ret);
	return s->err;
}

void stream_set_limits(struct stream *s, unsigned max_inflight,
		       uint64_t extent_bytes)
{
	s->max_inflight = max_inflight ? max_inflight : s->opt_inflight;
	if (!extent_bytes)
		extent_bytes = s->opt_extent;
	if (extent_bytes < s->cs)
		extent_bytes = s->cs;
	s->extent_bytes = extent_bytes - extent_bytes % s->cs;
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
	return s->inflight + meta_ahead_inflight(s->ahead) + s->presync_busy;
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
		/* A locked range frees when the owner's I/O completes. */
		if (stream_inflight(s) || s->blocked) {
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
}
