/*
 * The copy pipeline (see copy.h for the contract).
 *
 * An op moves through read -> ready -> write -> commit -> done. `pending`
 * counts what is out (queued I/O, inflate jobs) plus one hold while a phase
 * is being built, so a phase ends exactly once, in op_put(), whichever
 * completion comes last; requests are only submitted once a phase's array
 * is complete (it may move while it grows).
 *
 * Invariants: runs are recorded as soon as they are allocated, and
 * `linked` says how many went through commit_run, so every failure path
 * gives back exactly the runs nothing may point at. The first error wins;
 * its message is kept with the op, since later completions on the thread
 * may record others before done() runs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "common/error.h"
#include "copy.h"
#include "formats/image.h"
#include "inflate.h"
#include "io/io.h"

struct copier {
	struct img *top;
	struct sio_queue *q;
	struct inflater *z; /* started on the first compressed piece */
	unsigned inflight;
	struct copier_stats st;
};

/* One request of a copy never grows past this (sio_req: <= INT_MAX). */
#define COPY_REQ_MAX (64ull * 1024 * 1024)

bool copy_is_zero(const void *p, size_t len)
{
	static const uint8_t zeros[16];
	const uint8_t *b = p;

	if (len < 16)
		return memcmp(b, zeros, len) == 0;
	return memcmp(b, zeros, 16) == 0 && memcmp(b, b + 16, len - 16) == 0;
}

int copier_create(struct img *top, struct sio_queue *q, struct copier **out)
{
	struct copier *c;

	if (!top || !q || !out)
		return sx_error(EINVAL, "copier: missing image or queue");
	c = calloc(1, sizeof(*c));
	if (!c)
		return sx_error(ENOMEM, "copier: out of memory");
	c->top = top;
	c->q = q;
	*out = c;
	return 0;
}

void copier_destroy(struct copier *c)
{
	if (!c)
		return;
	inflater_destroy(c->z);
	free(c);
}

bool copier_serves(const struct copier *c, const struct img *top,
		   const struct sio_queue *q)
{
	return c->top == top && c->q == q;
}

unsigned copier_inflight(const struct copier *c)
{
	return c->inflight;
}

void copier_get_stats(const struct copier *c, struct copier_stats *st)
{
	*st = c->st;
}

int copier_inflate(struct copier *c, const struct img_piece *pc, void *dst,
		   inflate_done_fn done, void *opaque)
{
	int ret;

	if (!c->z) {
		ret = inflater_create(c->q, &c->z);
		if (ret < 0)
			return ret;
	}
	return inflater_submit(c->z, pc->layer, pc->cluster_off, pc->from,
			       pc->len, dst, done, opaque);
}

/* Record the op's first error; err's message was just recorded. */
static void op_fail(struct copy_op *op, int err)
{
	if (op->err)
		return;
	op->err = err;
	op->msg = strdup(sx_last_error()[0] ? sx_last_error() : strerror(-err));
}

/* Give back what nothing points at, free the op's arrays, call done. */
static void op_finish(struct copy_op *op)
{
	struct copier *c = op->c;
	struct img *top = c->top;
	int err = op->err;
	uint8_t *held;
	unsigned r;

	if (err) {
		for (r = op->linked; r < op->nruns; r++)
			img_release_run(top, op->runs[r].host, op->runs[r].n);
		sx_error(err, "%s", op->msg ? op->msg : strerror(-err));
	}
	free(op->msg);
	free(op->reqs);
	free(op->runs);
	free(op->iovs);
	op->msg = NULL;
	op->reqs = NULL;
	op->runs = NULL;
	op->iovs = NULL;
	c->inflight--;
	/* op->top stays for done() (copy.h); done() may free the op. */
	held = op->top;
	op->done(op, err);
	free(held);
}

static void op_write(struct copy_op *op);
static void op_commit(struct copy_op *op);
static void op_prepare(struct copy_op *op);

/* One piece of the current phase ended: on the last, go to the next. */
static void op_put(struct copy_op *op)
{
	if (--op->pending)
		return;
	if (op->err)
		op_finish(op);
	else if (!op->writing)
		op_prepare(op);
	else
		op_commit(op);
}

/* A read or write of the op completed (sio_queue callback). */
static void op_io_done(struct sio_req *req, int res)
{
	struct copy_op *op = req->priv;

	const char *why = res < 0 ? sio_req_error(req) : NULL;

	if (res < 0 && !op->err)
		op_fail(op, sx_error(res, "%s: %s at offset %llu: %s",
				     req->file->path,
				     req->op == SIO_OP_READ ? "read" : "write",
				     (unsigned long long)req->off,
				     why ? why : strerror(-res)));
	op_put(op);
}

/* A decompressed piece arrived (see inflate.h). */
static void op_inflated(void *opaque, int res, const char *msg)
{
	struct copy_op *op = opaque;

	if (res < 0 && !op->err)
		op_fail(op, sx_error(res, "%s", msg[0] ? msg : strerror(-res)));
	op_put(op);
}

/*
 * One read or write of the op: queued when it meets the file's direct-I/O
 * alignment, done at once through the sync helpers (which bounce)
 * otherwise. Queued requests go out in op_submit().
 */
static int op_add_io(struct copy_op *op, enum sio_op kind, struct sio_file *f,
		     uint8_t *buf, uint64_t len, uint64_t off)
{
	struct sio_req *r;

	if (!sx_is_aligned(off | len, f->align) ||
	    !sx_is_aligned((uintptr_t)buf, f->mem_align)) {
		if (kind == SIO_OP_READ)
			return sio_pread(f, buf, len, off);
		return sio_pwrite(f, buf, len, off);
	}
	/* Continues the last request in the file and in memory: grow it. */
	r = op->nreqs ? &op->reqs[op->nreqs - 1] : NULL;
	if (r && r->op == kind && r->file == f && r->off + r->len == off &&
	    (uint8_t *)r->buf + r->len == buf && r->len + len <= COPY_REQ_MAX) {
		r->len += len;
		return 0;
	}
	if (op->nreqs == op->reqcap) {
		unsigned cap = op->reqcap ? op->reqcap * 2 : 8;

		r = realloc(op->reqs, cap * sizeof(*r));
		if (!r)
			return sx_error(ENOMEM, "copy: out of memory");
		op->reqs = r;
		op->reqcap = cap;
	}
	r = &op->reqs[op->nreqs++];
	*r = (struct sio_req){
		.op = kind,
		.file = f,
		.buf = buf,
		.off = off,
		.len = len,
		.done = op_io_done,
		.priv = op,
	};
	return 0;
}

/* Queue the phase's requests; each one holds the op until it completes. */
static int op_submit(struct copy_op *op)
{
	struct sio_queue *q = op->c->q;
	unsigned i;
	int ret;

	for (i = 0; i < op->nreqs; i++) {
		if (op->reqs[i].op == SIO_OP_READ) {
			op->c->st.reads++;
			op->c->st.read_bytes += op->reqs[i].len;
		} else {
			op->c->st.writes++;
			op->c->st.write_bytes += op->reqs[i].len;
		}
		op->pending++;
		ret = sio_queue_submit(q, &op->reqs[i]);
		if (ret < 0) {
			op->pending--;
			return sx_error(ret, "%s: cannot queue I/O: %s",
					op->reqs[i].file->path, strerror(-ret));
		}
	}
	return 0;
}

/* Remember that the top held part of the clusters of [pos, pos + len). */
static int mark_top(struct copy_op *op, uint64_t pos, uint64_t len)
{
	uint64_t cs = op->c->top->cluster_size;
	uint64_t c0 = (pos - op->off) / cs, c1 = (pos + len - 1 - op->off) / cs;

	if (!op->top) {
		op->top = calloc(op->len / cs, 1);
		if (!op->top)
			return sx_error(ENOMEM, "copy: out of memory");
	}
	memset(op->top + c0, 1, c1 - c0 + 1);
	return 0;
}

/* Read one piece of the chain into dst. */
static int read_piece(struct copy_op *op, const struct img_piece *pc,
		      uint8_t *dst)
{
	int ret;

	switch (pc->status) {
	case IMG_DATA:
		return op_add_io(op, SIO_OP_READ, pc->file, dst, pc->len,
				 pc->host_off);
	case IMG_COMPRESSED:
		/* On the inflater's thread: the device keeps working. */
		ret = copier_inflate(op->c, pc, dst, op_inflated, op);
		if (ret >= 0)
			op->pending++;
		return ret;
	default:
		memset(dst, 0, pc->len);
		return 0;
	}
}

/*
 * The whole clusters [*ca, *cb) of the op that the caller's data covers
 * (empty when ca >= cb). A cover that reaches the image's end covers the
 * last cluster.
 */
static void covered(const struct copy_op *op, uint64_t lim, uint64_t *ca,
		    uint64_t *cb)
{
	uint64_t cs = op->c->top->cluster_size;
	uint64_t end = op->cover_off + op->cover_len;

	*ca = *cb = 0;
	if (!op->cover_len || sx_align_up(op->cover_off, cs, ca) < 0)
		return;
	*cb = end >= lim ? op->off + op->len : sx_align_down(end, cs);
}

/* A lookup of the read phase parked the op (see op_read()). */
#define OP_PARKED 1

static void op_read_go(struct copy_op *op);

/* The metadata a lookup missed is in (or the retry is synchronous). */
static void op_fetched(struct meta_fetch *f, int res)
{
	(void)res;
	op_read_go(f->priv);
}

/*
 * The chain's piece at pos without waiting for metadata: 0 and *pc,
 * OP_PARKED (op_fetched() resumes), -errno.
 */
static int op_piece(struct copy_op *op, uint64_t pos, uint64_t len,
		    struct img_piece *pc)
{
	struct img *top = op->c->top;
	int ret;

	if (!meta_fetch_sync(&op->mf)) {
		ret = img_chain_piece_nowait(top, pos, len, pc, &op->mf.miss);
		if (meta_fetch_park(&op->mf, ret, op->c->q, op_fetched, op))
			return OP_PARKED;
		if (!meta_fetch_sync(&op->mf))
			return ret;
	}
	ret = meta_fetch_take_error(&op->mf);
	if (ret < 0)
		return ret;
	return img_chain_piece(top, pos, len, pc);
}

/*
 * Plan the reads of every piece of the op's range the caller needs, from
 * op->rpos on: 0, OP_PARKED (op->rpos is where it goes on), -errno.
 */
static int op_read(struct copy_op *op)
{
	struct img *top = op->c->top;
	uint64_t end = op->off + op->len, lim = sx_min(end, top->size);
	uint64_t pos = op->rpos, ca, cb, stop, gap = 0;
	bool bridge = false; /* the last piece went into the last request */
	struct img_piece pc;
	struct sio_req *last;
	uint8_t *dst;
	int ret = 0;

	if (lim < end)
		memset(op->buf + (lim - op->off), 0, end - lim);
	covered(op, lim, &ca, &cb);
	while (pos < lim) {
		if (pos >= ca && pos < cb) {
			pos = cb;
			continue;
		}
		stop = pos < ca && ca < cb ? sx_min(ca, lim) : lim;
		ret = op_piece(op, pos, stop - pos, &pc);
		if (ret == OP_PARKED) {
			op->rpos = pos;
			goto out;
		}
		if (ret < 0)
			goto out;
		dst = op->buf + (pos - op->off);
		/* A shared cluster of the top is copied like a missing one. */
		if (pc.shared && (op->flags & COPY_REPLACE_SHARED))
			pc.top = false;
		if (pc.top && (op->flags & COPY_SKIP_TOP)) {
			/* Never written: not read either, maybe read over. */
			ret = mark_top(op, pos, pc.len);
			if (ret < 0)
				goto out;
			gap += pc.len;
			pos += pc.len;
			continue;
		}
		last = op->nreqs ? &op->reqs[op->nreqs - 1] : NULL;
		if (bridge && gap && gap <= op->gap_max &&
		    pc.status == IMG_DATA && last->file == pc.file &&
		    last->off + last->len + gap == pc.host_off &&
		    (uint8_t *)last->buf + last->len + gap == dst &&
		    last->len + gap + pc.len <= COPY_REQ_MAX)
			last->len += gap; /* read_piece() then extends it */
		gap = 0;
		ret = read_piece(op, &pc, dst);
		if (ret >= 0 && pc.top)
			ret = mark_top(op, pos, pc.len);
		if (ret < 0)
			goto out;
		bridge = pc.status == IMG_DATA && op->nreqs;
		pos += pc.len;
	}
out:
	return ret;
}

/*
 * Run the read phase as far as it goes; parked, op_fetched() calls this
 * again. The requests go out once every piece is planned.
 */
static void op_read_go(struct copy_op *op)
{
	int ret = op_read(op);

	if (ret == OP_PARKED)
		return;
	if (ret >= 0)
		ret = op_submit(op);
	if (ret < 0)
		op_fail(op, ret);
	op_put(op);
}

/* Cluster i is to be written: the top lacked it, and zeros per flags. */
static bool want(const struct copy_op *op, uint64_t i)
{
	uint32_t cs = op->c->top->cluster_size;

	if (op->top && op->top[i])
		return false;
	return (op->flags & COPY_WRITE_ZEROS) ||
	       !copy_is_zero(op->buf + i * cs, cs);
}

/*
 * Allocate a host run for up to n clusters from cluster i on, record it and
 * plan its write; *got: clusters taken (0 when nothing was allocated).
 */
static int write_run(struct copy_op *op, uint64_t i, uint64_t n, uint64_t *got)
{
	struct img *top = op->c->top;
	uint64_t cs = top->cluster_size, goff = op->off + i * cs, host;
	int ret;

	*got = 0;
	ret = img_alloc_run(top, goff, n, &host, got);
	if (ret < 0) {
		*got = 0;
		return ret;
	}
	if (op->nruns == op->runcap) {
		unsigned cap = op->runcap ? op->runcap * 2 : 4;
		struct copy_run *r = realloc(op->runs, cap * sizeof(*r));

		if (!r) {
			img_release_run(top, host, *got);
			*got = 0;
			return sx_error(ENOMEM, "copy: out of memory");
		}
		op->runs = r;
		op->runcap = cap;
	}
	op->runs[op->nruns++] = (struct copy_run){goff, *got, host};
	op->written += *got * cs;
	return op_add_io(op, SIO_OP_WRITE, top->file, op->buf + i * cs,
			 *got * cs, host);
}

/* The metadata op_prepare() waited for is in (or failed: the op fails). */
static void op_prepared(void *opaque, int res)
{
	struct copy_op *op = opaque;

	if (res < 0) {
		op_fail(op, res);
		op_finish(op);
		return;
	}
	op_prepare(op);
}

/*
 * The reads are in: before the op allocates and commits, bring the
 * metadata that needs (refcount blocks, new L2 tables, L2 slices) into
 * memory on the top's port, so the worker never waits for it; then write.
 */
static void op_prepare(struct copy_op *op)
{
	struct img *top = op->c->top;
	int ret;

	ret = img_prepare_write(top, op->off, op->len / top->cluster_size,
				op_prepared, op);
	if (ret == 0) {
		op_write(op);
		return;
	}
	if (ret < 0) {
		op_fail(op, ret);
		op_finish(op);
	}
	/* 1: op_prepared() runs later. */
}

/*
 * Writes that continue each other on the device but not in the buffer
 * (runs around a cluster the top held or a zero cluster skipped, host
 * runs allocated one after the other) become one vectored request: the
 * device sees the request size the runs add up to.
 */
static void gather_writes(struct copy_op *op)
{
	struct sio_req *r = op->reqs, *w = NULL;
	struct iovec *iov;
	unsigned i, k = 0, out = 0;
	bool any = false;

	for (i = 1; i < op->nreqs && !any; i++)
		any = r[i].file == r[i - 1].file &&
		      r[i - 1].off + r[i - 1].len == r[i].off;
	if (!any)
		return;
	iov = calloc(op->nreqs, sizeof(*iov));
	if (!iov)
		return; /* one request per run: slower, as correct */
	op->iovs = iov;
	for (i = 0; i < op->nreqs; i++) {
		iov[k] = (struct iovec){r[i].buf, r[i].len};
		if (w && w->file == r[i].file && w->off + w->len == r[i].off &&
		    w->len + r[i].len <= COPY_REQ_MAX && w->iovcnt < IOV_MAX) {
			w->iovcnt++;
			w->len += r[i].len;
			k++;
			continue;
		}
		w = &r[out++];
		*w = r[i];
		w->buf = NULL;
		w->iov = &iov[k++];
		w->iovcnt = 1;
	}
	op->nreqs = out;
}

/* The reads are in: let the caller look, then allocate and write. */
static void op_write(struct copy_op *op)
{
	uint64_t cs = op->c->top->cluster_size, ncl = op->len / cs;
	uint64_t i = 0, j, got;
	int ret = 0;

	op->writing = true;
	op->nreqs = 0;
	op->pending = 1;
	if (op->ready)
		ret = op->ready(op);
	while (i < ncl && ret >= 0) {
		if (!want(op, i)) {
			i++;
			continue;
		}
		for (j = i + 1; j < ncl && want(op, j); j++)
			;
		while (i < j && ret >= 0) {
			ret = write_run(op, i, j - i, &got);
			i += got;
		}
	}
	if (ret >= 0) {
		gather_writes(op);
		ret = op_submit(op);
	}
	if (ret < 0)
		op_fail(op, ret);
	op_put(op);
}

/* Run r is linked to its host clusters, every one of them. */
static int verify_run(struct copy_op *op, const struct copy_run *r)
{
	struct img *top = op->c->top;
	uint64_t end = sx_min(r->off + r->n * top->cluster_size, top->size);
	uint64_t pos;
	struct img_extent e;
	int ret;

	for (pos = r->off; pos < end; pos += e.len) {
		ret = img_block_status(top, pos, end - pos, &e);
		if (ret < 0)
			return ret;
		if (e.status != IMG_DATA ||
		    e.host_off != r->host + pos - r->off)
			return sx_error(EIO,
					"%s: copy at %llu lost a race: cluster "
					"%llu was allocated meanwhile",
					top->path, (unsigned long long)r->off,
					(unsigned long long)pos);
	}
	return 0;
}

/* Written: link the runs (commit_run skips clusters allocated meanwhile). */
static void op_commit(struct copy_op *op)
{
	struct img *top = op->c->top;
	unsigned r;
	int ret = 0;

	for (r = 0; r < op->nruns && ret >= 0; r++) {
		ret = img_commit_run(top, op->runs[r].off, op->runs[r].n,
				     op->runs[r].host,
				     op->flags & COPY_REPLACE_SHARED
					     ? IMG_COMMIT_REPLACE_SHARED
					     : 0);
		if (ret >= 0 && (op->flags & COPY_VERIFY))
			ret = verify_run(op, &op->runs[r]);
		/* Partly linked at worst: never given back. */
		op->linked = r + 1;
	}
	if (ret < 0)
		op_fail(op, ret);
	op_finish(op);
}

void copy_start(struct copier *c, struct copy_op *op)
{
	struct img *top = c->top;
	uint32_t cs = top->cluster_size;
	int ret;

	op->c = c;
	op->pending = 1;
	op->err = 0;
	op->msg = NULL;
	op->writing = false;
	op->top = NULL;
	op->reqs = NULL;
	op->nreqs = op->reqcap = 0;
	op->runs = NULL;
	op->nruns = op->runcap = 0;
	op->iovs = NULL;
	op->linked = 0;
	op->written = 0;
	op->rpos = op->off;
	memset(&op->mf, 0, sizeof(op->mf));
	c->inflight++;
	if (!img_can_alloc(top))
		ret = sx_error(EROFS, "%s: cannot allocate clusters",
			       top->path);
	else if (!op->buf || !op->len || op->off >= top->size ||
		 !sx_is_aligned(op->off | op->len, cs) ||
		 (op->off + op->len > top->size &&
		  op->off + op->len - top->size >= cs))
		ret = sx_error(EINVAL, "%s: bad copy of %llu bytes at %llu",
			       top->path, (unsigned long long)op->len,
			       (unsigned long long)op->off);
	else
		ret = 0;
	if (ret < 0) {
		op_fail(op, ret);
		op_put(op);
		return;
	}
	op_read_go(op);
}
