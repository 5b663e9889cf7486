/*
 * qcow2 write ordering: the flush that makes metadata durable in an order
 * that leaves at most leaked clusters after a crash at any instant, and the
 * write state of an image opened for writing.
 *
 * One flush covers everything written since the last one:
 *  1. fdatasync the data (guest data, copy-on-write data, stream data);
 *  2. write dirty refcount blocks, fdatasync; then the dirty refcount table
 *     entries, fdatasync (a new block is durable before the entry that
 *     points at it);
 *  3. write dirty L2 slices, fdatasync (new L2 tables were zero-filled
 *     before and are covered by this sync too);
 *  4. write dirty L1 entries, fdatasync;
 *  5. apply the queued refcount decreases in memory; they reach the disk in
 *     step 2 of a later flush (or when their block is evicted). The
 *     refcount blocks they decrease that are not cached are read first,
 *     through the port like every other step (FL_RC_LOAD: a read that
 *     fails only leaves the decrease to read its block itself).
 * Persistent bitmaps are not part of a flush: they stay IN_USE while the
 * image is open and are stored once, at a clean close (bitmap.c).
 * A step that wrote nothing skips its fdatasync. Refcount increases may
 * reach the disk at any time (a crash then leaks, never corrupts). Evicting
 * a dirty L2 slice from the cache runs steps 1 and 2 before the slice is
 * written, so an L2 entry never reaches the disk before its data and
 * refcounts; the slice is synced in step 3 of the next flush, before L1.
 *
 * ONE implementation of that order: a state machine whose I/O goes through
 * a port (formats/port.h). qcow2_flush() runs it on the synchronous port
 * (every op completes inside submit, so it runs to the end in one call);
 * qcow2_flush_start() runs it on the caller's port, e.g. the disk's queue,
 * continuing from each completion.
 *
 * Writes that go on while an asynchronous flush is in flight: SNAPSHOT for
 * the in-memory work, WAIT (-EAGAIN) for the rare metadata write-backs.
 * At its start the flush copies everything dirty (refcount blocks, L2
 * slices, the dirty refcount-table and L1 entries, the data/rc/L2 "unsynced"
 * flags, the number of queued frees) and clears it, so changes made
 * afterwards stay dirty for the next flush: an L2 entry pointing at data
 * written after the data sync was submitted is never written by this one.
 * The copied cache slots are pinned (never evicted) until the flush ends, so
 * a slice cannot be reloaded from disk before its copy is there, and
 * frees[0, frees_frozen) are neither merged with new frees nor applied by
 * anyone else. Why not make every writer wait: the engine's guest writes
 * and copy completions change metadata all the time, and refusing them
 * would stall exactly the guest I/O this exists for; snapshot copies cost a
 * memcpy of the dirty slices. What must wait are the paths that would
 * write metadata synchronously and could race with the flush's writes of
 * the same blocks: a dirty L2 eviction (a clean unpinned victim is taken
 * instead, -EAGAIN if none), refcount-table growth, set_backing (-EAGAIN)
 * and a synchronous flush (img_flush waits for the asynchronous one on its
 * port, running only its completions). A refcount block eviction writes the
 * unpinned victim, which is safe at any time. A failed flush puts back
 * everything it took as dirty.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "formats/port.h"
#include "io/io.h"
#include "qcow2.h"

/* Steps 1 and 2: what any L2 write must wait for. */
static int order_before_l2(struct img *img, struct qcow2 *s)
{
	int ret;

	if (s->w.data_dirty) {
		ret = sio_fdatasync(img->file);
		if (ret)
			return sx_error(ret, "%s: cannot sync data: %s",
					img->path, strerror(-ret));
		s->w.data_dirty = false;
	}
	return qcow2_rc_flush(img, s);
}

int qcow2_write_table_range(struct img *img, const uint64_t *table, uint64_t lo,
			    uint64_t hi, uint64_t table_offset)
{
	uint64_t *be, i;
	int ret;

	be = malloc((hi - lo) * 8);
	if (!be)
		return -ENOMEM;
	for (i = lo; i < hi; i++)
		be[i - lo] = htobe64(table[i]);
	ret = sio_pwrite(img->file, be, (hi - lo) * 8, table_offset + lo * 8);
	free(be);
	if (!ret)
		ret = sio_fdatasync(img->file);
	return ret;
}

int qcow2_l2_store(void *opaque, uint64_t key, void *buf, size_t len)
{
	struct img *img = opaque;
	struct qcow2 *s = img->priv;
	int ret;

	ret = order_before_l2(img, s);
	if (ret)
		return ret;
	ret = qcow2_check_overlap(img, s, key, len, "an L2 table");
	if (ret)
		return ret;
	ret = sio_pwrite(img->file, buf, len, key);
	if (ret)
		return sx_error(ret, "%s: cannot write L2 table at 0x%llx: %s",
				img->path, (unsigned long long)key,
				strerror(-ret));
	s->w.l2_unsynced = true;
	return 0;
}

int qcow2_l2_store_many(void *opaque, const uint64_t *keys,
			uint8_t *const *bufs, unsigned n, size_t len)
{
	struct img *img = opaque;
	struct qcow2 *s = img->priv;
	struct sio_wvec v[64];
	unsigned i;
	int ret;

	if (n > 64)
		return -EINVAL;
	ret = order_before_l2(img, s);
	if (ret)
		return ret;
	for (i = 0; i < n; i++) {
		ret = qcow2_check_overlap(img, s, keys[i], len, "an L2 table");
		if (ret)
			return ret;
		v[i] = (struct sio_wvec){bufs[i], len, keys[i]};
	}
	ret = sio_pwrite_many(img->file, v, n);
	if (ret)
		return sx_error(ret, "%s: cannot write L2 tables: %s",
				img->path, strerror(-ret));
	s->w.l2_unsynced = true;
	return 0;
}

/* ---- the flush state machine ---- */

enum fl_step {
	FL_DATA_SYNC,
	FL_RC_WRITE,
	FL_RC_SYNC,
	FL_RT_WRITE,
	FL_RT_SYNC,
	FL_L2_WRITE,
	FL_L2_SYNC,
	FL_L1_WRITE,
	FL_L1_SYNC,
	FL_RC_LOAD,
	FL_FREES,
	FL_END,
};

#define FL_BATCH 64u

struct qcow2_flush {
	struct img *img;
	struct img_port *port;
	bool busy;
	enum fl_step step;
	enum fl_step cur; /* the step whose op is in flight */
	int err;
	struct img_port_op op;
	struct sio_wvec vec[FL_BATCH];
	unsigned pos; /* next snapshot entry of a batched write step */
	bool in_run; /* fl_run is submitting: completions only record */
	bool completed;
	int res;
	void (*done)(void *opaque, int res);
	void *opaque;
	/* The snapshot taken at the start. */
	bool data, rc_unsynced, l2_unsynced;
	struct qcow2_snap rc, l2;
	uint64_t rt_lo, rt_hi, rt_base;
	uint8_t *rt_buf;
	uint64_t l1_lo, l1_hi, l1_base;
	uint8_t *l1_buf;
	size_t frees;
	/* FL_RC_LOAD: the block read into rc_buf, loads left. */
	uint8_t *rc_buf;
	uint64_t load_t;
	uint64_t load_wgen; /* s->w.rc_wgen when the read was submitted */
	bool load_pending;
	unsigned loads_left;
};

bool qcow2_flush_busy_locked(const struct qcow2 *s)
{
	return s->w.fl && s->w.fl->busy;
}

/* Entries [lo, hi) of a host-endian table, big-endian, in a new buffer. */
static uint8_t *table_copy(const uint64_t *table, uint64_t lo, uint64_t hi)
{
	uint8_t *be = sio_buf_alloc((hi - lo) * 8);
	uint64_t i, v;

	if (!be)
		return NULL;
	for (i = lo; i < hi; i++) {
		v = htobe64(table[i]);
		memcpy(be + (i - lo) * 8, &v, 8);
	}
	return be;
}

static void fl_free_snapshot(struct qcow2 *s, struct qcow2_flush *f,
			     bool failed)
{
	qcow2_rc_unpin(s, &f->rc, failed);
	qcow2_l2cache_unpin(&s->l2cache, &f->l2, failed);
	sio_buf_free(f->rt_buf);
	sio_buf_free(f->l1_buf);
	f->rt_buf = f->l1_buf = NULL;
}

static void mark_range(uint64_t *lo, uint64_t *hi, uint64_t a, uint64_t b)
{
	if (a >= b)
		return;
	if (*lo >= *hi) {
		*lo = a;
		*hi = b;
		return;
	}
	*lo = sx_min(*lo, a);
	*hi = sx_max(*hi, b);
}

/*
 * Take what this flush makes durable: everything dirty now. Changes made
 * after this point stay dirty for the next flush.
 */
static int fl_snapshot(struct img *img, struct qcow2 *s, struct qcow2_flush *f)
{
	struct qcow2_wstate *w = &s->w;
	int ret;

	ret = qcow2_rc_snapshot(s, &f->rc);
	if (!ret)
		ret = qcow2_l2cache_snapshot(&s->l2cache, &f->l2);
	if (!ret && w->rt_dirty_lo < w->rt_dirty_hi) {
		f->rt_lo = w->rt_dirty_lo;
		f->rt_hi = w->rt_dirty_hi;
		f->rt_base = s->rc.table_offset;
		f->rt_buf = table_copy(s->rc.table, f->rt_lo, f->rt_hi);
		if (!f->rt_buf)
			ret = -ENOMEM;
	}
	if (!ret && w->l1_dirty_lo < w->l1_dirty_hi) {
		f->l1_lo = w->l1_dirty_lo;
		f->l1_hi = w->l1_dirty_hi;
		f->l1_base = s->hdr.l1_table_offset;
		f->l1_buf = table_copy(s->l1, f->l1_lo, f->l1_hi);
		if (!f->l1_buf)
			ret = -ENOMEM;
	}
	if (ret) {
		fl_free_snapshot(s, f, true);
		return sx_error(ret, "%s: cannot flush: out of memory",
				img->path);
	}
	f->data = w->data_dirty;
	f->rc_unsynced = w->rc_unsynced;
	f->l2_unsynced = w->l2_unsynced;
	w->data_dirty = w->rc_unsynced = w->l2_unsynced = false;
	w->rt_dirty_lo = w->rt_dirty_hi = 0;
	w->l1_dirty_lo = w->l1_dirty_hi = 0;
	f->frees = w->n_frees;
	w->frees_frozen = w->n_frees;
	return 0;
}

/* A failed flush: everything it took is dirty again. */
static void fl_restore(struct qcow2 *s, struct qcow2_flush *f)
{
	struct qcow2_wstate *w = &s->w;

	w->data_dirty |= f->data;
	w->rc_unsynced |= f->rc_unsynced || f->rc.n;
	w->l2_unsynced |= f->l2_unsynced || f->l2.n;
	if (f->rt_buf)
		mark_range(&w->rt_dirty_lo, &w->rt_dirty_hi, f->rt_lo,
			   f->rt_hi);
	if (f->l1_buf)
		mark_range(&w->l1_dirty_lo, &w->l1_dirty_hi, f->l1_lo,
			   f->l1_hi);
}

static void fl_op_done(struct img_port_op *op, int res);

/* Submit f->op as kind; 1 when it is in flight (or done), -errno if not. */
static int fl_submit(struct qcow2_flush *f, enum img_port_kind kind, void *buf,
		     uint64_t len, uint64_t off, unsigned n)
{
	int ret;

	f->op = (struct img_port_op){
		.kind = kind,
		.file = f->img->file,
		.buf = buf,
		.len = len,
		.off = off,
		.vec = f->vec,
		.n = n,
		.done = fl_op_done,
		.opaque = f,
	};
	f->completed = false;
	ret = f->port->submit(f->port, &f->op);
	return ret ? ret : 1;
}

/* The next batch of snap's writes (L2 slices get the overlap check). */
static int fl_write_batch(struct qcow2 *s, struct qcow2_flush *f,
			  struct qcow2_snap *snap, size_t len, bool l2)
{
	unsigned n = 0;
	int ret;

	while (f->pos < snap->n && n < FL_BATCH) {
		if (l2) {
			ret = qcow2_check_overlap(f->img, s, snap->keys[f->pos],
						  len, "an L2 table");
			if (ret)
				return ret;
		}
		f->vec[n++] = (struct sio_wvec){snap->bufs[f->pos], len,
						snap->keys[f->pos]};
		f->pos++;
	}
	return fl_submit(f, IMG_PORT_WRITEV, NULL, 0, 0, n);
}

/*
 * FL_RC_LOAD: install the block the last read brought (when it worked),
 * then read the next one the frees of this flush need: 1 (a read is in
 * flight) or 0 (none left: FL_FREES). At most rc_nslots reads, so a cache
 * too small for all of them cannot make it go round: the frees then read
 * what is left themselves. Failures are only a hint lost.
 */
static int fl_rc_load(struct qcow2 *s, struct qcow2_flush *f)
{
	uint64_t off;

	if (f->load_pending) {
		f->load_pending = false;
		/* A block written back meanwhile may be newer than the read. */
		if (f->res < 0 || f->load_wgen != s->w.rc_wgen ||
		    qcow2_rc_install(f->img, s, f->load_t, f->rc_buf))
			f->loads_left = 0;
	}
	if (!f->loads_left || !qcow2_rc_frees_missing(s, f->frees, &f->load_t))
		return 0;
	if (!f->rc_buf) {
		f->rc_buf = sio_buf_alloc(s->cluster_size);
		if (!f->rc_buf)
			return 0;
	}
	f->loads_left--;
	f->load_pending = true;
	f->load_wgen = s->w.rc_wgen;
	f->cur = FL_RC_LOAD;
	off = s->rc.table[f->load_t] & QCOW2_REFT_OFFSET_MASK;
	return fl_submit(f, IMG_PORT_READ, f->rc_buf, s->cluster_size, off, 0);
}

/*
 * Start the I/O of the current step, moving over steps with nothing to
 * do. 1: an op was submitted; 0: the flush reached FL_END; -errno.
 */
static int fl_next(struct qcow2 *s, struct qcow2_flush *f)
{
	int ret;

	for (;;) {
		f->cur = f->step;
		switch (f->step) {
		case FL_DATA_SYNC:
			f->step = FL_RC_WRITE;
			if (f->data)
				return fl_submit(f, IMG_PORT_FDATASYNC, NULL, 0,
						 0, 0);
			break;
		case FL_RC_WRITE:
			if (f->pos < f->rc.n)
				return fl_write_batch(s, f, &f->rc,
						      s->cluster_size, false);
			f->pos = 0;
			f->step = FL_RC_SYNC;
			break;
		case FL_RC_SYNC:
			f->step = FL_RT_WRITE;
			if (f->rc.n || f->rc_unsynced)
				return fl_submit(f, IMG_PORT_FDATASYNC, NULL, 0,
						 0, 0);
			break;
		case FL_RT_WRITE:
			f->step = FL_RT_SYNC;
			if (f->rt_buf)
				return fl_submit(f, IMG_PORT_WRITE, f->rt_buf,
						 (f->rt_hi - f->rt_lo) * 8,
						 f->rt_base + f->rt_lo * 8, 0);
			break;
		case FL_RT_SYNC:
			f->step = FL_L2_WRITE;
			if (f->rt_buf)
				return fl_submit(f, IMG_PORT_FDATASYNC, NULL, 0,
						 0, 0);
			break;
		case FL_L2_WRITE:
			if (f->pos < f->l2.n)
				return fl_write_batch(s, f, &f->l2,
						      s->l2cache.slice_size,
						      true);
			f->pos = 0;
			f->step = FL_L2_SYNC;
			break;
		case FL_L2_SYNC:
			f->step = FL_L1_WRITE;
			if (f->l2.n || f->l2_unsynced)
				return fl_submit(f, IMG_PORT_FDATASYNC, NULL, 0,
						 0, 0);
			break;
		case FL_L1_WRITE:
			f->step = FL_L1_SYNC;
			if (f->l1_buf)
				return fl_submit(f, IMG_PORT_WRITE, f->l1_buf,
						 (f->l1_hi - f->l1_lo) * 8,
						 f->l1_base + f->l1_lo * 8, 0);
			break;
		case FL_L1_SYNC:
			f->step = FL_RC_LOAD;
			f->load_pending = false;
			f->loads_left = s->w.rc_nslots;
			if (f->l1_buf)
				return fl_submit(f, IMG_PORT_FDATASYNC, NULL, 0,
						 0, 0);
			break;
		case FL_RC_LOAD:
			ret = fl_rc_load(s, f);
			if (ret)
				return ret;
			f->step = FL_FREES;
			break;
		case FL_FREES:
			f->step = FL_END;
			/* Every reference removal taken is durable now. */
			s->w.frees_frozen = 0;
			ret = qcow2_rc_apply_frees_upto(f->img, s, f->frees);
			if (ret)
				return ret;
			break;
		case FL_END:
			return 0;
		}
	}
}

static const char *fl_what(enum fl_step step)
{
	switch (step) {
	case FL_RC_WRITE:
	case FL_RC_SYNC:
		return "write the refcount blocks";
	case FL_RT_WRITE:
	case FL_RT_SYNC:
		return "write the refcount table";
	case FL_L2_WRITE:
	case FL_L2_SYNC:
		return "write the L2 tables";
	case FL_L1_WRITE:
	case FL_L1_SYNC:
		return "write the L1 table";
	default:
		return "sync data";
	}
}

/* The flush ended (f->err set or FL_END reached): release the snapshot. */
static void fl_end(struct qcow2 *s, struct qcow2_flush *f)
{
	if (f->err) {
		fl_restore(s, f);
		s->w.frees_frozen = 0;
	}
	fl_free_snapshot(s, f, f->err != 0);
	s->l2cache.no_writeback = false;
	f->busy = false;
}

/*
 * Drive the machine with s->lock held until an op is in flight (false) or
 * the flush ended (true; the caller runs done after unlocking).
 */
static bool fl_run(struct qcow2 *s, struct qcow2_flush *f)
{
	int ret;

	for (;;) {
		f->in_run = true;
		ret = f->err ? f->err : fl_next(s, f);
		f->in_run = false;
		if (ret == 1 && f->completed && f->res < 0 &&
		    f->cur != FL_RC_LOAD)
			ret = f->err = sx_error(f->res, "%s: cannot %s: %s",
						f->img->path, fl_what(f->cur),
						strerror(-f->res));
		if (ret <= 0) {
			/* An error from fl_next has its message already. */
			if (ret < 0)
				f->err = ret;
			fl_end(s, f);
			return true;
		}
		if (!f->completed)
			return false; /* fl_op_done goes on */
	}
}

static void fl_finish(struct qcow2_flush *f)
{
	if (f->done)
		f->done(f->opaque, f->err);
}

static void fl_op_done(struct img_port_op *op, int res)
{
	struct qcow2_flush *f = op->opaque;
	struct qcow2 *s = f->img->priv;
	bool ended;

	f->completed = true;
	f->res = res;
	if (f->in_run)
		return; /* completed inside submit: fl_run goes on */
	pthread_mutex_lock(&s->lock);
	if (res < 0 && f->cur != FL_RC_LOAD)
		f->err = sx_error(res, "%s: cannot %s: %s", f->img->path,
				  fl_what(f->cur), strerror(-res));
	ended = fl_run(s, f);
	pthread_mutex_unlock(&s->lock);
	if (ended)
		fl_finish(f);
}

/*
 * Start a flush with s->lock held. 0: *ended says whether it ended
 * already (then run fl_finish after unlocking); -errno: not started.
 */
static int fl_start(struct img *img, struct qcow2 *s, struct img_port *port,
		    void (*done)(void *opaque, int res), void *opaque,
		    bool *ended)
{
	struct qcow2_flush *f = s->w.fl;
	int ret;

	if (f->busy)
		return sx_error(-EAGAIN, "%s: a flush is in flight already",
				img->path);
	f->img = img;
	f->port = port ? port : img_port_sync();
	f->step = FL_DATA_SYNC;
	f->err = 0;
	f->pos = 0;
	f->done = done;
	f->opaque = opaque;
	ret = fl_snapshot(img, s, f);
	if (ret)
		return ret;
	f->busy = true;
	s->l2cache.no_writeback = true;
	*ended = fl_run(s, f);
	return 0;
}

static void sync_done(void *opaque, int res)
{
	*(int *)opaque = res;
}

int qcow2_flush_locked(struct img *img, struct qcow2 *s)
{
	bool ended = false;
	int res = 0, ret;

	if (!s->w.on)
		return 0;
	ret = fl_start(img, s, img_port_sync(), sync_done, &res, &ended);
	if (ret)
		return ret;
	/* The synchronous port completes every op inside submit. */
	if (!ended)
		return sx_error(-EIO, "%s: synchronous flush did not end",
				img->path);
	fl_finish(s->w.fl);
	return res;
}

int qcow2_flush(struct img *img)
{
	struct qcow2 *s = img->priv;
	int ret;

	if (!img->writable)
		return 0;
	pthread_mutex_lock(&s->lock);
	ret = qcow2_flush_locked(img, s);
	pthread_mutex_unlock(&s->lock);
	return ret;
}

int qcow2_flush_start(struct img *img, struct img_port *port,
		      void (*done)(void *opaque, int res), void *opaque)
{
	struct qcow2 *s = img->priv;
	bool ended = false;
	int ret = 0;

	if (!img->writable)
		return sx_error(-EROFS, "%s: image is not open for writing",
				img->path);
	pthread_mutex_lock(&s->lock);
	if (s->w.on)
		ret = fl_start(img, s, port, done, opaque, &ended);
	else
		ended = true;
	pthread_mutex_unlock(&s->lock);
	if (ret)
		return ret;
	if (ended) {
		if (s->w.on)
			fl_finish(s->w.fl);
		else if (done)
			done(opaque, 0);
	}
	return 0;
}

static bool fl_busy(void *arg)
{
	struct qcow2_flush *f = arg;

	return f->busy;
}

int qcow2_flush_wait(struct img *img)
{
	struct qcow2 *s = img->priv;
	struct qcow2_flush *f = s->w.fl;

	if (!f || !f->busy)
		return 0;
	if (!f->port->wait)
		return sx_error(-EAGAIN, "%s: a flush is in flight", img->path);
	return f->port->wait(f->port, fl_busy, f);
}

/*
 * An image left dirty (a writer crashed, or qemu's lazy refcounts): count
 * every reference and set the refcounts right before anything is written,
 * as qemu does when it opens such an image. Refused when corruption is
 * left that refcounts cannot mend.
 */
static int repair_dirty(struct img *img, struct qcow2 *s)
{
	const struct img_check_opts o = {.repair = IMG_CHECK_REPAIR_ALL};
	struct img_check_report *r;
	int ret;

	if (!s->dirty)
		return 0;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	ret = qcow2_check_image(img, s, img->file, &o, r);
	if (!ret && r->found_corruptions > r->corruptions_fixed)
		ret = sx_error(
			-EUCLEAN,
			"%s: image is dirty and %llu corruptions cannot be repaired by setting refcounts; see `siphon check %s`",
			img->path,
			(unsigned long long)(r->found_corruptions -
					     r->corruptions_fixed),
			img->path);
	free(r);
	if (ret)
		return ret;
	/* Tables changed behind the cache (COPIED flags), the file may be cut. */
	qcow2_l2cache_drop(&s->l2cache, 0, UINT64_MAX);
	return qcow2_refresh_file_size(img, s);
}

int qcow2_write_open(struct img *img, struct qcow2 *s)
{
	int ret;

	ret = qcow2_check_writable(img, s);
	if (ret)
		return ret;
	ret = repair_dirty(img, s);
	if (ret)
		return ret;
	s->w.zero_cluster = sio_buf_alloc(s->cluster_size);
	if (!s->w.zero_cluster)
		return -ENOMEM;
	memset(s->w.zero_cluster, 0, s->cluster_size);
	s->w.fl = calloc(1, sizeof(*s->w.fl));
	if (!s->w.fl)
		return -ENOMEM;
	ret = qcow2_rc_init_write(img, s);
	if (ret)
		return ret;
	ret = sio_file_size(img->file, &s->w.open_size);
	if (ret)
		return ret;
	/* Before the autoclear bits: whether bit 0 stays depends on it. */
	ret = qcow2_bitmaps_open(img, s);
	if (ret)
		return ret;
	ret = qcow2_clear_autoclear(img, s);
	if (ret)
		return ret;
	/*
	 * The dirty bit says "refcounts may be wrong" until a clean close:
	 * after a crash the next writer (this one, or qemu) repairs the
	 * leaks a crash can leave. Version 2 has no feature bits: its leaks
	 * stay for `siphon check -r leaks`.
	 */
	if (s->hdr.version >= 3) {
		ret = qcow2_set_incompat(img, s, img->file,
					 QCOW2_INCOMPAT_DIRTY, 0);
		if (ret)
			return ret;
	}
	/*
	 * Last, so that nothing after it can fail the open: a tracked
	 * bitmap is IN_USE on disk before the first guest write.
	 */
	ret = qcow2_bitmaps_mark_in_use(img, s);
	if (ret)
		return ret;
	s->w.on = true;
	return 0;
}

void qcow2_write_close(struct img *img, struct qcow2 *s)
{
	bool frees;
	int ret;

	if (qcow2_flush_busy_locked(s)) {
		/*
		 * Its ops still point at the state: leave it (and the image
		 * unflushed) rather than free what the kernel may use.
		 */
		s->w.fl = NULL;
		s->w.on = false;
		qcow2_bitmaps_free(&s->bm); /* left IN_USE: inconsistent */
		return;
	}
	if (s->w.on) {
		/*
		 * close cannot fail: errors are dropped here (callers that
		 * care flush first). A second flush writes the decreases
		 * that the first one applied, so nothing is left leaked.
		 */
		frees = s->w.n_frees != 0;
		ret = qcow2_flush_locked(img, s);
		if (!ret && frees)
			ret = qcow2_flush_locked(img, s);
		/*
		 * Bitmaps are stored here only, as qemu does (not on every
		 * flush: they stay IN_USE until then). After a failure they
		 * stay IN_USE and the image dirty: inconsistent, never wrong.
		 */
		if (!ret)
			ret = qcow2_bitmaps_store(img, s);
		qcow2_trim_tail(img, s);
		/* Everything durable and counted: clean again. */
		if (!ret && s->dirty)
			(void)qcow2_set_incompat(img, s, img->file, 0,
						 QCOW2_INCOMPAT_DIRTY);
		s->w.on = false;
	}
	qcow2_rc_fini_write(s);
	qcow2_bitmaps_free(&s->bm);
	if (s->w.fl)
		sio_buf_free(s->w.fl->rc_buf);
	free(s->w.fl);
	s->w.fl = NULL;
	sio_buf_free(s->w.zero_cluster);
	s->w.zero_cluster = NULL;
}
