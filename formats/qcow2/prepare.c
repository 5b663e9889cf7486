/*
 * qcow2 write preparation: bring into memory, through the image's port,
 * the metadata an allocation (alloc_run) of a few clusters and the commit
 * (commit_run) of a guest range would otherwise read or write
 * synchronously, so that the engine's worker never waits for them:
 *  - the refcount blocks the allocation scans (read, installed clean), up
 *    to the first free cluster, so that its start is known;
 *  - the growth of the file ahead of allocation (fallocate);
 *  - a new L2 table for an empty L1 entry (a cluster allocated in memory,
 *    its zeros written, then the L1 entry set in memory);
 *  - the copy of an L2 table shared with a snapshot (read, a cluster
 *    allocated, the copy written there, then the L1 entry set in memory
 *    and the shared table's reference dropped through the deferred-free
 *    queue), as cluster.c's copy_shared_l2() would do synchronously;
 *  - the L2 slices of the range (read, installed through the read-ahead
 *    path, which refuses bytes gone stale meanwhile).
 * The same for discard and write-zeroes (qcow2_prepare_discard): the L2
 * tables and slices of their range, nothing allocated for data.
 *
 * Crash order is the flush's (flush.c): a new table's L1 entry is set only
 * once its zeros are written, with l2_unsynced set, so the L2 sync of the
 * next flush covers them before that flush writes L1. Were the entry set
 * by someone else meanwhile (a synchronous write path), the new cluster is
 * given back: nothing ever pointed at it.
 *
 * Invariants: s->w.prep lists every preparation I/O in flight, one per
 * (kind, key); a caller that needs one in flight waits on it instead of
 * starting another. Everything here runs under s->lock, the completions
 * too. A prepared item may be evicted again before use: the write path
 * then does the I/O itself, as before (correct, only slower).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "formats/port.h"
#include "io/io.h"
#include "qcow2.h"

enum prep_kind { P_RC, P_GROW, P_NEWL2, P_L2, P_COWL2 };

struct prep_waiter {
	void (*done)(void *opaque, int res);
	void *opaque;
	struct prep_waiter *next;
};

struct qcow2_prep {
	struct img_port_op op;
	struct img *img;
	enum prep_kind kind;
	/* P_RC: table index; P_NEWL2, P_COWL2: L1 index; P_L2: slice */
	uint64_t key;
	/* P_NEWL2, P_COWL2 writing: the new table; P_GROW: the target size */
	uint64_t host;
	uint64_t
		old; /* P_COWL2: the shared table (its L1 entry, COPIED clear) */
	bool writing; /* P_COWL2: its copy is being written (else read) */
	/* P_L2: the cache's generation at submit; P_RC: s->w.rc_wgen then */
	uint64_t gen;
	uint8_t *buf; /* P_RC, P_L2 */
	struct prep_waiter *waiters;
	struct qcow2_prep *next;
};

static struct qcow2_prep *find(struct qcow2 *s, enum prep_kind kind,
			       uint64_t key)
{
	struct qcow2_prep *p;

	for (p = s->w.prep; p; p = p->next)
		if (p->kind == kind && p->key == key)
			return p;
	return NULL;
}

/* Wait on p (done NULL: nobody waits): 1, or -ENOMEM. */
static int add_waiter(struct qcow2_prep *p, void (*done)(void *, int),
		      void *opaque)
{
	struct prep_waiter *w;

	if (!done)
		return 1;
	w = malloc(sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->done = done;
	w->opaque = opaque;
	w->next = p->waiters;
	p->waiters = w;
	return 1;
}

/*
 * L1 entry i names the new table at host from now on (its bytes, written
 * already, are also cached). Synced with the L2 writes of the next flush,
 * before L1.
 */
static void link_table(struct qcow2 *s, uint64_t i, uint64_t host,
		       const uint8_t *bytes)
{
	uint64_t t;

	s->w.l2_unsynced = true;
	s->l1[i] = host | QCOW2_OFLAG_COPIED;
	qcow2_l1_mark_dirty(s, i);
	for (t = 0; t < s->cluster_size; t += s->l2cache.slice_size)
		qcow2_l2cache_insert(&s->l2cache, host + t, bytes + t,
				     s->l2cache.gen);
}

/* The I/O of p ended: install what it brought, under the lock. */
static int install(struct img *img, struct qcow2 *s, struct qcow2_prep *p,
		   int res)
{
	switch (p->kind) {
	case P_RC:
		/* A block written back since the read may be newer. */
		if (res || p->gen != s->w.rc_wgen)
			return res;
		return qcow2_rc_install(img, s, p->key, p->buf);
	case P_GROW:
		if (res)
			s->w.grow_sync = true; /* grow_ahead() tries again */
		else if (p->host > s->w.grown_to)
			s->w.grown_to = p->host;
		return 0;
	case P_NEWL2:
		if (res || s->l1[p->key]) {
			/* Nothing points at it: give it back. */
			qcow2_rc_update(img, s, p->host >> s->cluster_bits, -1);
			return res;
		}
		link_table(s, p->key, p->host, s->w.zero_cluster);
		return 0;
	case P_L2:
		if (!res)
			qcow2_l2cache_insert(&s->l2cache, p->key, p->buf,
					     p->gen);
		return res;
	case P_COWL2:
		if (res || s->l1[p->key] != p->old) {
			/* Failed, or done meanwhile: nothing points at it. */
			if (p->writing)
				qcow2_rc_update(img, s,
						p->host >> s->cluster_bits, -1);
			return res;
		}
		res = qcow2_free_deferred(img, s, p->old, s->cluster_size);
		if (res) {
			qcow2_rc_update(img, s, p->host >> s->cluster_bits, -1);
			return res;
		}
		link_table(s, p->key, p->host, p->buf);
		return 0;
	}
	return 0;
}

/*
 * The shared table of a P_COWL2 is read: write its copy to a new cluster,
 * the same prep going on (its waiters wait for the write). true when the
 * write is under way; false to finish the prep as it is.
 */
static bool cow_write(struct img *img, struct qcow2 *s, struct qcow2_prep *p,
		      int res)
{
	struct img_port *port = img_get_port(img);
	uint64_t host, got;

	if (p->kind != P_COWL2 || p->writing || res || s->l1[p->key] != p->old)
		return false;
	s->w.no_grow = true;
	res = qcow2_alloc_clusters(img, s, 1, &host, &got);
	s->w.no_grow = false;
	if (res)
		return false; /* the write path copies it itself */
	qcow2_l2cache_drop(&s->l2cache, host, s->cluster_size);
	p->writing = true;
	p->host = host;
	p->op.kind = IMG_PORT_WRITE;
	p->op.off = host;
	p->next = s->w.prep;
	s->w.prep = p;
	if (port->submit(port, &p->op) < 0) {
		s->w.prep = p->next;
		p->writing = false;
		qcow2_rc_update(img, s, host >> s->cluster_bits, -1);
		return false;
	}
	return true;
}

static void prep_done(struct img_port_op *op, int res)
{
	struct qcow2_prep *p = op->opaque, **pp;
	struct img *img = p->img;
	struct qcow2 *s = img->priv;
	struct prep_waiter *w, *next;
	int ret;

	pthread_mutex_lock(&s->lock);
	for (pp = &s->w.prep; *pp != p; pp = &(*pp)->next)
		;
	*pp = p->next;
	if (cow_write(img, s, p, res)) {
		pthread_mutex_unlock(&s->lock);
		return;
	}
	ret = install(img, s, p, res);
	pthread_mutex_unlock(&s->lock);
	if (ret)
		sx_error(ret, "%s: cannot prepare metadata: %s", img->path,
			 strerror(-ret));
	/* A failed read-ahead is only a hint lost: the write path retries. */
	if (p->kind == P_RC || p->kind == P_L2 || p->kind == P_GROW ||
	    p->kind == P_COWL2)
		ret = 0;
	sio_buf_free(p->buf);
	for (w = p->waiters; w; w = next) {
		next = w->next;
		w->done(w->opaque, ret);
		free(w);
	}
	free(p);
}

/*
 * Start p's I/O (kind and key set) with one waiter. 1, or -errno with p
 * freed.
 */
static int start(struct img *img, struct qcow2 *s, struct qcow2_prep *p,
		 void (*done)(void *, int), void *opaque)
{
	struct img_port *port = img_get_port(img);
	int ret;

	p->img = img;
	p->op.file = img->file;
	p->op.done = prep_done;
	p->op.opaque = p;
	ret = add_waiter(p, done, opaque);
	if (ret < 0) {
		sio_buf_free(p->buf);
		free(p);
		return ret;
	}
	p->next = s->w.prep;
	s->w.prep = p;
	ret = port->submit(port, &p->op);
	if (ret < 0) {
		s->w.prep = p->next;
		free(p->waiters);
		sio_buf_free(p->buf);
		free(p);
		return ret;
	}
	return 1;
}

static struct qcow2_prep *new_prep(enum prep_kind kind, uint64_t key,
				   uint64_t buflen)
{
	struct qcow2_prep *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	p->kind = kind;
	p->key = key;
	if (buflen) {
		p->buf = sio_buf_alloc(buflen);
		if (!p->buf) {
			free(p);
			return NULL;
		}
	}
	return p;
}

/* Refcount block t is cached, or being read (1), or nothing to read. */
static int need_rc(struct img *img, struct qcow2 *s, uint64_t t,
		   void (*done)(void *, int), void *opaque)
{
	struct qcow2_prep *p;
	uint64_t off;

	if (t >= s->rc.table_entries || qcow2_rc_cached(s, t))
		return 0;
	off = s->rc.table[t] & QCOW2_REFT_OFFSET_MASK;
	if (!off || !sx_is_aligned(off, s->cluster_size))
		return 0; /* created in memory, or an error for the write path */
	p = find(s, P_RC, t);
	if (p)
		return add_waiter(p, done, opaque);
	p = new_prep(P_RC, t, s->cluster_size);
	if (!p)
		return -ENOMEM;
	p->gen = s->w.rc_wgen;
	p->op.kind = IMG_PORT_READ;
	p->op.buf = p->buf;
	p->op.len = s->cluster_size;
	p->op.off = off;
	return start(img, s, p, done, opaque);
}

/* What an allocation of n clusters from the free hint needs. */
static int need_alloc(struct img *img, struct qcow2 *s, uint64_t n,
		      void (*done)(void *, int), void *opaque)
{
	uint64_t E = s->rc.block_entries, c, t, target, from = 0;
	struct qcow2_prep *p;
	int ret;

	/*
	 * Where the allocation starts: the first free cluster, which may be
	 * well past the hint (just after open the hint is 1), so that the
	 * growth below covers where it really ends.
	 */
	while (!qcow2_rc_advance_hint(s, &t)) {
		ret = need_rc(img, s, t, done, opaque);
		if (ret)
			return ret;
		if (!qcow2_rc_cached(s, t))
			break; /* nothing to read: the write path reports it */
	}
	c = sx_max(s->w.free_hint, 1);
	for (t = c / E; t <= (c + n) / E; t++) {
		ret = need_rc(img, s, t, done, opaque);
		if (ret)
			return ret;
	}
	if (s->w.grow_sync)
		return 0;
	target = qcow2_grow_target(s, (c + n) * s->cluster_size, &from);
	if (!target)
		return 0;
	p = s->w.prep;
	for (; p && p->kind != P_GROW; p = p->next)
		;
	if (p)
		return add_waiter(p, done, opaque);
	p = new_prep(P_GROW, 0, 0);
	if (!p)
		return -ENOMEM;
	p->host = target;
	p->op.kind = IMG_PORT_FALLOCATE;
	p->op.off = from;
	p->op.len = target - from;
	return start(img, s, p, done, opaque);
}

/*
 * L1 entry i names a table shared with a snapshot (COPIED clear, refcount
 * above 1, its refcount block cached or brought in first): copy it (1),
 * or nothing to do (0; a table whose refcount is 1 only has a stale flag,
 * which the write path sets).
 */
static int need_cow(struct img *img, struct qcow2 *s, uint64_t i,
		    void (*done)(void *, int), void *opaque)
{
	uint64_t e = s->l1[i] & QCOW2_L1E_OFFSET_MASK, c, rc;
	struct qcow2_prep *p;
	int ret;

	if (s->l1[i] & QCOW2_OFLAG_COPIED)
		return 0;
	p = find(s, P_COWL2, i);
	if (p)
		return add_waiter(p, done, opaque);
	c = e >> s->cluster_bits;
	ret = need_rc(img, s, c / s->rc.block_entries, done, opaque);
	if (ret)
		return ret;
	if (!qcow2_rc_cached(s, c / s->rc.block_entries) ||
	    qcow2_refcount_get(img, s, c, &rc) < 0 || rc < 2)
		return 0;
	ret = need_alloc(img, s, 1, done, opaque);
	if (ret)
		return ret;
	p = new_prep(P_COWL2, i, s->cluster_size);
	if (!p)
		return -ENOMEM;
	p->old = s->l1[i];
	p->op.kind = IMG_PORT_READ;
	p->op.buf = p->buf;
	p->op.len = s->cluster_size;
	p->op.off = e;
	return start(img, s, p, done, opaque);
}

/*
 * The L2 table of L1 entry i and the slice of cluster cl in it. create:
 * an empty L1 entry gets a new table (else nothing is needed there).
 */
static int need_l2(struct img *img, struct qcow2 *s, uint64_t cl, bool create,
		   void (*done)(void *, int), void *opaque)
{
	uint64_t i = cl >> s->l2_bits, e, key, host, got;
	uint64_t per_slice = s->l2cache.slice_size / s->l2_entry_size;
	struct qcow2_prep *p;
	int ret;

	if (i >= s->l1_size)
		return 0;
	e = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
	if (!e && !create)
		return 0;
	if (!e) {
		p = find(s, P_NEWL2, i);
		if (p)
			return add_waiter(p, done, opaque);
		ret = need_alloc(img, s, 2, done, opaque);
		if (ret)
			return ret;
		p = new_prep(P_NEWL2, i, 0);
		if (!p)
			return -ENOMEM;
		s->w.no_grow = true;
		ret = qcow2_alloc_clusters(img, s, 1, &host, &got);
		s->w.no_grow = false;
		if (ret) {
			free(p);
			return ret;
		}
		qcow2_l2cache_drop(&s->l2cache, host, s->cluster_size);
		p->host = host;
		p->op.kind = IMG_PORT_WRITE;
		p->op.buf = s->w.zero_cluster;
		p->op.len = s->cluster_size;
		p->op.off = host;
		ret = start(img, s, p, done, opaque);
		if (ret < 0) {
			qcow2_rc_update(img, s, host >> s->cluster_bits, -1);
			return ret;
		}
		/* The growth past the table, alongside its zeros. */
		need_alloc(img, s, 1, NULL, NULL);
		return 1;
	}
	if (!sx_is_aligned(e, s->cluster_size))
		return 0; /* the write path reports it */
	ret = need_cow(img, s, i, done, opaque);
	if (ret)
		return ret;
	key = e +
	      ((cl & (s->l2_entries - 1)) / per_slice) * s->l2cache.slice_size;
	if (qcow2_l2cache_has(&s->l2cache, key))
		return 0;
	p = find(s, P_L2, key);
	if (p)
		return add_waiter(p, done, opaque);
	p = new_prep(P_L2, key, s->l2cache.slice_size);
	if (!p)
		return -ENOMEM;
	p->gen = s->l2cache.gen;
	p->op.kind = IMG_PORT_READ;
	p->op.buf = p->buf;
	p->op.len = s->l2cache.slice_size;
	p->op.off = key;
	return start(img, s, p, done, opaque);
}

/*
 * The L2 tables and slices of guest clusters [first, last), one I/O at a
 * time (the caller asks again after each): 0, 1, or -errno. Under s->lock.
 */
static int need_range(struct img *img, struct qcow2 *s, uint64_t first,
		      uint64_t last, bool create, void (*done)(void *, int),
		      void *opaque)
{
	uint64_t per_slice = s->l2cache.slice_size / s->l2_entry_size, cl;
	int ret = 0;

	for (cl = first; !ret && cl < last; cl += per_slice) {
		ret = need_l2(img, s, cl, create, done, opaque);
		/* The next slice boundary. */
		cl -= cl % per_slice;
	}
	if (!ret && last > first)
		ret = need_l2(img, s, last - 1, create, done, opaque);
	return ret;
}

int qcow2_prepare_write(struct img *img, uint64_t off, uint64_t nclusters,
			void (*done)(void *opaque, int res), void *opaque)
{
	struct qcow2 *s = img->priv;
	uint64_t first, last;
	int ret = 0;

	/* Synchronous: the write path does the same I/O just as well. */
	if (!s->w.on || !nclusters || off >= img->size ||
	    img_get_port(img) == img_port_sync())
		return 0;
	first = off >> s->cluster_bits;
	last = sx_min(first + nclusters, (img->size - 1) / s->cluster_size + 1);
	pthread_mutex_lock(&s->lock);
	ret = need_alloc(img, s, nclusters, done, opaque);
	if (!ret)
		ret = need_range(img, s, first, last, true, done, opaque);
	pthread_mutex_unlock(&s->lock);
	return ret;
}

/*
 * Discard and write-zeroes change the L2 entries of the clusters the range
 * touches (partial clusters included: write-zeroes rewrites them), and set
 * zero flags, which need a table under an empty L1 entry, when zeroing or
 * when a backing file could show through. The host clusters they free are
 * only queued (write.c); the refcount blocks those frees decrease are
 * brought in by the flush that applies them (flush.c, FL_RC_LOAD), since
 * anything loaded here could be evicted again before then.
 */
int qcow2_prepare_discard(struct img *img, uint64_t off, uint64_t len,
			  unsigned flags, void (*done)(void *opaque, int res),
			  void *opaque)
{
	struct qcow2 *s = img->priv;
	bool create = (flags & IMG_PREP_ZEROES) || img->backing_name;
	uint64_t first, last;
	int ret;

	if (!s->w.on || !len || off >= img->size ||
	    img_get_port(img) == img_port_sync())
		return 0;
	first = off >> s->cluster_bits;
	last = (sx_min(off + len, img->size) - 1) / s->cluster_size + 1;
	pthread_mutex_lock(&s->lock);
	ret = need_range(img, s, first, last, create, done, opaque);
	pthread_mutex_unlock(&s->lock);
	return ret;
}
