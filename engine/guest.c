/*
 * Guest I/O on the disk's worker (see guest.h for the contract).
 *
 * A request becomes a struct gio while it runs:
 *  - READ: the chain's pieces, from the top down: data is read
 *    asynchronously straight into the guest's iovec (through an aligned
 *    bounce buffer where direct I/O needs one), zeros are filled in,
 *    compressed clusters are decompressed on the disk's inflater (off the
 *    worker). With copy-on-read and clusters the top does not hold, the
 *    read is one op of the copy pipeline (copy.h) over whole clusters,
 *    under a cluster lock: the guest gets its part as soon as the chain is
 *    read (cor_ready()), then the pipeline writes the clusters the top did
 *    not hold (and that are not all zeros) into fresh host clusters and
 *    links them, skipping any allocated meanwhile. Nothing of the copy can
 *    fail the guest's read.
 *  - WRITE: into each run of clusters the top lacks entirely, one op of
 *    the copy pipeline (see aw_plan()). Pieces the top holds as data are
 *    written in place asynchronously, and every other piece (zero,
 *    compressed, shared with a snapshot, partly allocated, misaligned for
 *    direct I/O) goes through
 *    the driver's synchronous pwrite, which copies the rest of a partial
 *    cluster from the chain. The synchronous pieces are written before any
 *    asynchronous one is submitted, so a bounce read-modify-write never
 *    races our own write.
 *  - DISCARD, WRITE_ZEROES: under a cluster lock, the driver first brings
 *    the metadata they touch into memory on the disk's port
 *    (img_prepare_discard(); the request parks meanwhile and comes back
 *    when it is in), then the driver's operation runs, changing only
 *    cached metadata. It turns clusters into zero clusters while a backing
 *    exists; the host clusters it frees are queued until a flush has made
 *    the change durable (the flush applies them). The partial clusters at
 *    the edges of a write-zeroes are writes of zeros under its lock (see
 *    zd_zeroes()), which the driver would otherwise read-modify-write.
 *  - FLUSH, and FUA: a round of the guest's flush (see gflush_round()):
 *    an fdatasync of the top on the queue for the in-place writes, then
 *    the driver's flush on the port (img_flush_start()), each finishing
 *    by continuation. A flush request is answered by the first round that
 *    started after it arrived, so everything completed before it is
 *    durable; requests that arrive while a round runs share the next one.
 *    When someone else's flush (the stream's) is in flight, the round
 *    waits for it to end (guest_kick() tries again) and then runs its own.
 *
 * Metadata: reads (plain and copy-on-read) look the chain up with the
 * nowait calls, in every layer; where an L2 slice is not cached the
 * request parks (it keeps its building hold, and its cluster lock if it
 * has one), the slice is read on the queue and installed (meta_fetch.h),
 * and the request goes on where it stopped. A write first brings the top's
 * slices for its clusters in the same way, so its status walk finds them
 * cached. On the path where everything is cached this costs nothing more
 * than the lookups it always made.
 *
 * Copy-on-read yields to a deep guest queue while a stream runs: a
 * cluster-sized read and a write per 4 KiB guest read multiply the device's
 * work (at QD 32 on a virtio disk, 64 KiB reads alone double p50 latency),
 * and the stream copies the same clusters anyway. So then a read copies
 * only while the guest kept at most GUEST_COR_MAX_DEPTH requests in flight
 * during the last window (GUEST_DEPTH_WINDOW_NS, this one or the one
 * before) and fewer than GUEST_COR_MAX_COPIES copies are under way;
 * otherwise it is a plain read and counts as skipped (busy). Without a
 * stream (copy-on-read set on by the owner) every such read copies.
 *
 * Locks: a write, discard or write-zeroes starts only when no lock overlaps
 * its clusters and no earlier waiting request does (FIFO, so the guest's own
 * order of overlapping writes is kept); a write holds its clusters until
 * its asynchronous part completes. The stream and copy-on-read never wait:
 * they try and back off. A lock is only held while I/O is in flight, so
 * every wait ends.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cluster_lock.h"
#include "common/checked.h"
#include "common/error.h"
#include "copy.h"
#include "formats/image.h"
#include "guest.h"
#include "io/io.h"
#include "meta_fetch.h"

struct gio;

/*
 * Preparation rounds (metadata reads) a discard or write-zeroes waits for
 * before it lets the driver do the rest synchronously: only reached when
 * the cache cannot hold the range's metadata.
 */
#define GUEST_PREP_ROUNDS 4096u

/* Copy-on-read only at a shallow guest queue (see the top of the file). */
#define GUEST_COR_MAX_DEPTH 4
#define GUEST_COR_MAX_COPIES 2
#define GUEST_DEPTH_WINDOW_NS (20ull * 1000 * 1000)

/* One asynchronous read or write of a request. */
struct gio_io {
	struct sio_req req;
	struct gio *gio;
	uint8_t *bounce; /* aligned copy, or NULL */
	uint64_t bounce_skip; /* reads: bytes in bounce before the data */
	uint64_t toff; /* offset of the data in the gio's target iovec */
	uint64_t len;
	struct iovec one; /* the slice, when it is one element */
	struct iovec *iov; /* the slice, malloc'd, when longer */
	bool is_inline; /* gio->first: not freed */
};

struct gio {
	struct guest *g;
	struct guest_req *req; /* NULL once completed (copy-on-read goes on) */
	const struct iovec *tiov; /* where read data goes / write data is */
	int tiovcnt;
	unsigned pending; /* I/O in flight, plus one while building */
	int err;
	bool first_used;
	struct gio_io first;
	struct cl_lock *lock;

	/* Metadata: a nowait lookup missed, the request is parked. */
	struct meta_fetch mf;
	unsigned prep_rounds; /* discard, write-zeroes: img_prepare_discard */
	bool zeroing; /* a write of zeros (write-zeroes' partial clusters) */
	bool nolock; /* ... whose lock its write-zeroes holds */
	bool decided; /* reads: plain or copy-on-read, chosen */
	uint64_t rpos; /* plain reads: where the walk resumes */

	/* copy-on-read: one op of copy.h (allocating writes: struct gio_aw) */
	bool cor;
	uint8_t *cbuf; /* the op's buffer */
	struct copy_op cop;
};

/* Where the guest's flush is (gflush_round()). */
enum gflush_state {
	GF_IDLE,
	GF_SYNC, /* the fdatasync of in-place writes is on the queue */
	GF_AGAIN, /* someone else's flush is in flight: ours goes after it */
	GF_META, /* the driver's flush is on the port */
};

struct guest {
	struct img *top;
	struct sio_queue *q;
	struct cl_locks locks;
	struct copier *copier; /* the disk's copy pipeline and inflater */
	uint64_t kick_gen;
	bool kick_hold; /* hold was released: kick everything */
	struct guest_req *wait_head, **wait_tail;
	unsigned nwait;
	unsigned inflight;
	unsigned ncor; /* copy-on-read gios not freed yet */
	unsigned depth_peak; /* most requests in flight in this window */
	unsigned depth_prev; /* ... and in the one before */
	uint64_t depth_t0; /* start of this window */
	bool cor;
	bool cor_yield; /* a stream copies too: copies may be skipped */
	bool hold;
	bool dirty; /* in-place writes since the last flush */
	uint8_t *zeros; /* a cluster of zeros, for zd_part(); or NULL */
	/* Flush requests (and FUA writes done but for the flush). */
	struct guest_req *fl_wait, **fl_wait_tail; /* for the next round */
	struct guest_req *fl_cur; /* answered by the round in flight */
	enum gflush_state fl_state;
	struct sio_req fl_sync;
	uint64_t last_ns;
	struct guest_stats st;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- iovec helpers ---- */

/* Visit [skip, skip + n) of an iovec as flat pieces. */
#define IOV_WALK(iov, cnt, skip, n, BODY)                                    \
	do {                                                                 \
		uint64_t _skip = (skip), _left = (n);                        \
		for (int _i = 0; _i < (cnt) && _left; _i++) {                \
			uint64_t _l = (iov)[_i].iov_len;                     \
			if (_skip >= _l) {                                   \
				_skip -= _l;                                 \
				continue;                                    \
			}                                                    \
			uint8_t *p_ = (uint8_t *)(iov)[_i].iov_base + _skip; \
			uint64_t l_ = sx_min(_l - _skip, _left);             \
			_skip = 0;                                           \
			_left -= l_;                                         \
			BODY;                                                \
		}                                                            \
	} while (0)

static void iov_memset0(const struct iovec *iov, int cnt, uint64_t skip,
			uint64_t n)
{
	IOV_WALK(iov, cnt, skip, n, memset(p_, 0, l_));
}

static void iov_from_buf(const struct iovec *iov, int cnt, uint64_t skip,
			 const uint8_t *buf, uint64_t n)
{
	IOV_WALK(iov, cnt, skip, n, {
		memcpy(p_, buf, l_);
		buf += l_;
	});
}

static void iov_to_buf(const struct iovec *iov, int cnt, uint64_t skip,
		       uint8_t *buf, uint64_t n)
{
	IOV_WALK(iov, cnt, skip, n, {
		memcpy(buf, p_, l_);
		buf += l_;
	});
}

/*
 * The slice [skip, skip + n) of an iovec as its own iovec: *out is `one`
 * when the slice is one element, else a malloc'd array. *aligned says
 * whether every element suits direct I/O (addresses to mem_align, lengths
 * to align).
 */
static int iov_slice(const struct iovec *iov, int cnt, uint64_t skip,
		     uint64_t n, struct iovec *one, struct iovec **out,
		     int *outcnt, uint32_t align, uint32_t mem_align,
		     bool *aligned)
{
	struct iovec *v = NULL;
	int k = 0, cap = 0;

	*aligned = true;
	IOV_WALK(iov, cnt, skip, n, {
		if (k == cap) {
			struct iovec *nv;

			cap = cap ? cap * 2 : 4;
			nv = realloc(v, (size_t)cap * sizeof(*v));
			if (!nv) {
				free(v);
				return -ENOMEM;
			}
			v = nv;
		}
		v[k].iov_base = p_;
		v[k].iov_len = l_;
		if (!sx_is_aligned((uintptr_t)p_, mem_align) ||
		    !sx_is_aligned(l_, align))
			*aligned = false;
		k++;
	});
	if (k == 1) {
		*one = v[0];
		free(v);
		v = one;
	}
	*out = v;
	*outcnt = k;
	return 0;
}

/* ---- requests ---- */

static void cluster_range(const struct guest *g, uint64_t off, uint64_t len,
			  uint64_t *a, uint64_t *b)
{
	uint64_t cs = g->top->cluster_size;

	*a = off - off % cs;
	*b = off + len;
	if (*b % cs)
		*b += cs - *b % cs;
}

static bool needs_lock(const struct guest_req *r)
{
	return r->len && (r->op == GUEST_WRITE || r->op == GUEST_DISCARD ||
			  r->op == GUEST_WRITE_ZEROES);
}

/* ---- flushes ---- */

static void gflush_round(struct guest *g);

/* The round ended with ret: answer every request it covers. */
static void gflush_end(struct guest *g, int ret)
{
	struct guest_req *r = g->fl_cur, *next;

	g->fl_cur = NULL;
	g->fl_state = GF_IDLE;
	for (; r; r = next) {
		next = r->next;
		r->next = NULL;
		g->inflight--;
		/* May submit again: that flush waits for the next round. */
		r->complete(r, ret < 0 ? ret : 0);
	}
	if (g->fl_wait && g->fl_state == GF_IDLE)
		gflush_round(g);
}

static void gflush_meta_done(void *opaque, int res)
{
	gflush_end(opaque, res);
}

/*
 * The metadata part of the round: the driver's flush on the disk's port.
 * Someone else's in flight (-EAGAIN) began before the round, so it may
 * miss what the round must cover: wait for it to end (guest_kick() calls
 * this again), then start ours.
 */
static void gflush_meta(struct guest *g)
{
	int ret;

	g->fl_state = GF_META;
	ret = img_flush_start(g->top, NULL, gflush_meta_done, g);
	if (ret == -EAGAIN)
		g->fl_state = GF_AGAIN;
	else if (ret < 0)
		gflush_end(g, ret);
}

static void gflush_synced(struct sio_req *sreq, int res)
{
	struct guest *g = sreq->priv;

	if (res < 0) {
		g->dirty = true;
		gflush_end(g, sx_error(res, "%s: cannot sync data: %s",
				       g->top->path, strerror(-res)));
		return;
	}
	gflush_meta(g);
}

/*
 * Start a round for the requests waiting: in-place writes (which change
 * no metadata, so the driver may not sync them) are synced on the queue,
 * then the driver flushes. Writes that complete meanwhile are left for
 * the next round.
 */
static void gflush_round(struct guest *g)
{
	int ret;

	g->fl_cur = g->fl_wait;
	g->fl_wait = NULL;
	g->fl_wait_tail = &g->fl_wait;
	if (!g->dirty || !g->top->writable) {
		gflush_meta(g);
		return;
	}
	g->dirty = false;
	g->fl_state = GF_SYNC;
	g->fl_sync = (struct sio_req){
		.op = SIO_OP_FDATASYNC,
		.file = g->top->file,
		.done = gflush_synced,
		.priv = g,
	};
	if (sio_queue_submit(g->q, &g->fl_sync) == 0)
		return;
	/* Not queued: the synchronous sync, as a last resort. */
	ret = sio_fdatasync(g->top->file);
	if (ret < 0) {
		g->dirty = true;
		gflush_end(g, ret);
		return;
	}
	gflush_meta(g);
}

/*
 * req (a flush, or a FUA write done but for the flush) completes after
 * the first round that starts from now on; it counts as in flight.
 */
static void gflush_add(struct guest *g, struct guest_req *req)
{
	req->next = NULL;
	*g->fl_wait_tail = req;
	g->fl_wait_tail = &req->next;
	g->inflight++;
	if (g->fl_state == GF_IDLE)
		gflush_round(g);
}

static struct gio *gio_new(struct guest *g, struct guest_req *req)
{
	struct gio *gio = calloc(1, sizeof(*gio));

	if (!gio)
		return NULL;
	gio->g = g;
	gio->req = req;
	gio->tiov = req->iov;
	gio->tiovcnt = req->iovcnt;
	gio->pending = 1;
	g->inflight++;
	if (g->inflight > g->depth_peak)
		g->depth_peak = g->inflight;
	return gio;
}

static void gio_free(struct gio *gio)
{
	struct guest *g = gio->g;

	cl_unlock(&g->locks, gio->lock);
	if (gio->cor)
		g->ncor--;
	sio_buf_free(gio->cbuf);
	g->inflight--;
	free(gio);
}

static void req_complete(struct gio *gio, int ret)
{
	struct guest_req *req = gio->req;

	gio->req = NULL;
	if (req)
		req->complete(req, ret);
}

static void gio_put(struct gio *gio);

static void gio_io_done(struct sio_req *sreq, int res)
{
	struct gio_io *io = sreq->priv;
	struct gio *gio = io->gio;

	if (res < 0) {
		if (!gio->err)
			gio->err = res;
	} else if (io->bounce && sreq->op == SIO_OP_READ) {
		iov_from_buf(gio->tiov, gio->tiovcnt, io->toff,
			     io->bounce + io->bounce_skip, io->len);
	}
	sio_buf_free(io->bounce);
	if (io->iov != &io->one)
		free(io->iov);
	if (!io->is_inline)
		free(io);
	gio_put(gio);
}

static struct gio_io *gio_io_get(struct gio *gio)
{
	struct gio_io *io;

	if (!gio->first_used) {
		gio->first_used = true;
		io = &gio->first;
		memset(io, 0, sizeof(*io));
		io->is_inline = true;
	} else {
		io = calloc(1, sizeof(*io));
		if (!io)
			return NULL;
	}
	io->gio = gio;
	return io;
}

/*
 * Submit a read (into the target iovec at toff) or a write (from it) of n
 * bytes at host offset host of f. Host ranges not aligned for direct I/O
 * are only accepted for reads (rounded out into a bounce buffer).
 */
static int gio_add_io(struct gio *gio, enum sio_op op, struct sio_file *f,
		      uint64_t host, uint64_t toff, uint64_t n)
{
	struct gio_io *io = gio_io_get(gio);
	struct sio_req *r;
	bool aligned = false;
	int ret, cnt;

	if (!io)
		return sx_error(ENOMEM, "guest I/O: out of memory");
	r = &io->req;
	io->toff = toff;
	io->len = n;
	if (sx_is_aligned(host | n, f->align)) {
		ret = iov_slice(gio->tiov, gio->tiovcnt, toff, n, &io->one,
				&io->iov, &cnt, f->align, f->mem_align,
				&aligned);
		if (ret < 0)
			goto fail;
	}
	if (aligned) {
		r->iov = io->iov;
		r->iovcnt = cnt;
		r->off = host;
		r->len = n;
	} else {
		uint64_t h0 = host - host % f->align, h1 = host + n;

		if (io->iov && io->iov != &io->one)
			free(io->iov);
		io->iov = NULL;
		if (h1 % f->align)
			h1 += f->align - h1 % f->align;
		if (op == SIO_OP_WRITE && (h0 != host || h1 != host + n)) {
			ret = -EINVAL;
			goto fail;
		}
		io->bounce = sio_buf_alloc(h1 - h0);
		if (!io->bounce) {
			ret = -ENOMEM;
			goto fail;
		}
		io->bounce_skip = host - h0;
		if (op == SIO_OP_WRITE)
			iov_to_buf(gio->tiov, gio->tiovcnt, toff, io->bounce,
				   n);
		r->buf = io->bounce;
		r->off = h0;
		r->len = h1 - h0;
	}
	r->op = op;
	r->file = f;
	r->done = gio_io_done;
	r->priv = io;
	gio->pending++;
	ret = sio_queue_submit(gio->g->q, r);
	if (ret < 0) {
		gio->pending--;
		goto fail;
	}
	return 0;
fail:
	sio_buf_free(io->bounce);
	if (io->iov && io->iov != &io->one)
		free(io->iov);
	if (!io->is_inline)
		free(io);
	return sx_error(ret, "%s: guest %s at host offset %llu: %s", f->path,
			op == SIO_OP_READ ? "read" : "write",
			(unsigned long long)host, strerror(-ret));
}

/* ---- metadata that is not in memory ---- */

/* Lookups parked the request: a fetch resumes it (gio_fetched()). */
#define GIO_PARKED 2

static void read_go(struct gio *gio);
static void write_go(struct gio *gio);
static void zd_go(struct gio *gio);
static void status_go(struct gio *gio);

/* The missing metadata is in (or failed: the retry is synchronous). */
static void gio_fetched(struct meta_fetch *f, int res)
{
	struct gio *gio = f->priv;

	(void)res;
	gio->g->st.meta_fetches++;
	if (gio->req && gio->req->op == GUEST_READ)
		read_go(gio);
	else if (gio->req && gio->req->op == GUEST_STATUS)
		status_go(gio);
	else
		write_go(gio);
}

/* A nowait lookup returned ret: park the request if it missed. */
static bool gio_park(struct gio *gio, int ret)
{
	return meta_fetch_park(&gio->mf, ret, gio->g->q, gio_fetched, gio);
}

/*
 * The chain's piece at pos, without waiting for metadata: 0 and *pc,
 * GIO_PARKED, or -errno. Synchronous after repeated misses (meta_fetch.h).
 */
static int gio_piece(struct gio *gio, uint64_t pos, uint64_t len,
		     struct img_piece *pc)
{
	struct img *top = gio->g->top;
	int ret;

	if (!meta_fetch_sync(&gio->mf)) {
		ret = img_chain_piece_nowait(top, pos, len, pc, &gio->mf.miss);
		if (gio_park(gio, ret))
			return GIO_PARKED;
		if (!meta_fetch_sync(&gio->mf))
			return ret;
	}
	ret = meta_fetch_take_error(&gio->mf);
	if (ret < 0)
		return ret;
	return img_chain_piece(top, pos, len, pc);
}

/*
 * Whether the top lacks all (or any) byte of [off, off + len), without
 * waiting for metadata: 1, 0, or GIO_PARKED. Errors count as in
 * img_lacks_all() / img_lacks_any().
 */
static int gio_lacks(struct gio *gio, uint64_t off, uint64_t len, bool all)
{
	struct img *top = gio->g->top;
	int ret;

	if (!meta_fetch_sync(&gio->mf)) {
		ret = img_lacks_nowait(top, off, len, all, &gio->mf.miss);
		if (gio_park(gio, ret))
			return GIO_PARKED;
		if (!meta_fetch_sync(&gio->mf))
			return ret;
	}
	ret = meta_fetch_take_error(&gio->mf);
	if (ret < 0)
		return ret;
	return all ? img_lacks_all(top, off, len)
		   : img_lacks_any(top, off, len);
}

/*
 * Bring the top's metadata for [off, off + len) into memory, so that the
 * synchronous status calls of a write that follow (in this same turn,
 * nothing evicts meanwhile) find it: 0, GIO_PARKED, or the error of a
 * failed fetch from a server (meta_fetch_take_error()). Lookup errors are
 * left for those calls to meet and report.
 */
static int gio_warm_top(struct gio *gio, uint64_t off, uint64_t len)
{
	struct img *top = gio->g->top;
	uint64_t pos = off, end = sx_min(off + len, top->size);
	struct img_extent e;
	int ret;

	if (meta_fetch_sync(&gio->mf))
		return meta_fetch_take_error(&gio->mf);
	for (; pos < end; pos += e.len) {
		ret = img_block_status_nowait(top, pos, end - pos, &e,
					      &gio->mf.miss.req);
		gio->mf.miss.layer = ret == -EAGAIN ? top : NULL;
		if (gio_park(gio, ret))
			return GIO_PARKED;
		if (ret < 0 || !e.len)
			break;
	}
	return 0;
}

/* ---- reads ---- */

/* A compressed piece of a plain read, decompressed off the worker. */
struct gio_inflate {
	struct gio *gio;
	uint64_t toff; /* where it goes in the target iovec */
	uint64_t len;
	uint8_t buf[];
};

/* The piece is decompressed (see inflate.h): into the target iovec. */
static void gio_inflated(void *opaque, int res, const char *msg)
{
	struct gio_inflate *j = opaque;
	struct gio *gio = j->gio;

	if (res < 0 && !gio->err)
		gio->err = sx_error(res, "%s", msg[0] ? msg : strerror(-res));
	else if (res >= 0)
		iov_from_buf(gio->tiov, gio->tiovcnt, j->toff, j->buf, j->len);
	free(j);
	gio_put(gio);
}

/* Decompress piece pc on the disk's inflater into the target at toff. */
static int gio_inflate(struct gio *gio, const struct img_piece *pc,
		       uint64_t toff)
{
	struct gio_inflate *j = malloc(sizeof(*j) + pc->len);
	int ret;

	if (!j)
		return sx_error(ENOMEM, "guest read: no memory");
	j->gio = gio;
	j->toff = toff;
	j->len = pc->len;
	ret = copier_inflate(gio->g->copier, pc, j->buf, gio_inflated, j);
	if (ret < 0) {
		free(j);
		return ret;
	}
	gio->pending++;
	return 0;
}

/*
 * Read the chain's [off, off + len) into the request's iovec, from
 * gio->rpos on: 0, GIO_PARKED (a fetch resumes the walk at rpos), -errno.
 */
static int read_plain(struct gio *gio, uint64_t off, uint64_t len)
{
	uint64_t pos = gio->rpos, end = off + len;
	struct img_piece pc;
	int ret = 0;

	for (; pos < end && ret >= 0; pos += pc.len) {
		ret = gio_piece(gio, pos, end - pos, &pc);
		if (ret == GIO_PARKED) {
			gio->rpos = pos;
			return ret;
		}
		if (ret < 0)
			break;
		if (pc.status == IMG_DATA)
			ret = gio_add_io(gio, SIO_OP_READ, pc.file, pc.host_off,
					 pos - off, pc.len);
		else if (pc.status == IMG_COMPRESSED)
			ret = gio_inflate(gio, &pc, pos - off);
		else
			iov_memset0(gio->tiov, gio->tiovcnt, pos - off, pc.len);
	}
	return ret;
}

/*
 * Copy now: always when nothing else would copy the clusters; otherwise
 * only while the guest's queue is shallow and few copies are under way.
 */
static bool cor_allowed(const struct guest *g)
{
	return !g->cor_yield || (g->ncor < GUEST_COR_MAX_COPIES &&
				 g->depth_peak <= GUEST_COR_MAX_DEPTH &&
				 g->depth_prev <= GUEST_COR_MAX_DEPTH);
}

/*
 * Turn the read into a copy-on-read if the top lacks some of its clusters
 * and nobody holds them: the read then covers whole clusters [a, b), locked,
 * into the op's buffer. GIO_PARKED when the top's metadata must be read
 * first, else 0.
 */
static int cor_prepare(struct gio *gio, uint64_t *a, uint64_t *b)
{
	struct guest *g = gio->g;
	struct guest_req *req = gio->req;
	int ret;

	ret = gio_lacks(gio, req->off, req->len, false);
	if (ret != 1)
		return ret == GIO_PARKED ? ret : 0;
	if (!cor_allowed(g)) {
		g->st.cor_skipped++;
		return 0;
	}
	cluster_range(g, req->off, req->len, a, b);
	if (cl_lock_try(&g->locks, *a, *b, &gio->lock) < 0) {
		g->st.cor_skipped++;
		return 0;
	}
	gio->cbuf = sio_buf_alloc(*b - *a);
	if (!gio->cbuf) {
		cl_unlock(&g->locks, gio->lock);
		gio->lock = NULL;
		g->st.cor_skipped++;
		return 0;
	}
	gio->cor = true;
	g->ncor++;
	return 0;
}

/* The chain is read: the guest gets its part now, the copy goes on. */
static int cor_ready(struct copy_op *op)
{
	struct gio *gio = op->priv;
	struct guest_req *req = gio->req;

	iov_from_buf(req->iov, req->iovcnt, 0, op->buf + (req->off - op->off),
		     req->len);
	req_complete(gio, 0);
	return 0;
}

/* Nothing of the copy fails the guest's read, unless the read failed. */
static void cor_done(struct copy_op *op, int err)
{
	struct gio *gio = op->priv;
	struct guest *g = gio->g;

	req_complete(gio, err);
	if (err < 0)
		g->st.cor_skipped++;
	else
		g->st.cor_bytes += op->written;
	gio_free(gio);
}

static void read_done(struct gio *gio)
{
	req_complete(gio, gio->err);
	gio_free(gio);
}

/* Writes, discards and write-zeroes: FUA ones complete after a flush. */
static void write_done(struct gio *gio)
{
	struct guest *g = gio->g;
	struct guest_req *req = gio->req;
	int ret = gio->err;

	gio->req = NULL;
	gio_free(gio);
	if (ret >= 0 && (req->flags & GUEST_F_FUA))
		gflush_add(g, req);
	else
		req->complete(req, ret);
}

static void gio_put(struct gio *gio)
{
	if (--gio->pending)
		return;
	if (gio->req &&
	    (gio->req->op == GUEST_READ || gio->req->op == GUEST_STATUS))
		read_done(gio);
	else
		write_done(gio);
}

/*
 * Run a read as far as it goes: choose plain or copy-on-read, then walk
 * the pieces. A lookup that misses parks it (the building hold stays),
 * and gio_fetched() calls this again to go on where it stopped.
 */
static void read_go(struct gio *gio)
{
	struct guest *g = gio->g;
	struct guest_req *req = gio->req;
	uint64_t a = 0, b = 0;
	int ret;

	if (gio->decided)
		goto plain;
	if (g->cor && !(req->flags & GUEST_F_NO_COR) && g->top->backing &&
	    img_can_alloc(g->top) && cor_prepare(gio, &a, &b) == GIO_PARKED)
		return;
	gio->decided = true;
	gio->rpos = req->off;
	if (gio->cor) {
		gio->cop = (struct copy_op){
			.off = a,
			.len = b - a,
			.buf = gio->cbuf,
			.ready = cor_ready,
			.done = cor_done,
			.priv = gio,
		};
		copy_start(g->copier, &gio->cop);
		return;
	}
plain:
	ret = read_plain(gio, req->off, req->len);
	if (ret == GIO_PARKED)
		return;
	if (ret < 0 && !gio->err)
		gio->err = ret;
	gio_put(gio);
}

static void read_start(struct guest *g, struct guest_req *req)
{
	struct gio *gio = gio_new(g, req);

	if (!gio) {
		req->complete(req, -ENOMEM);
		return;
	}
	read_go(gio);
}

/* ---- block status ---- */

/*
 * The chain's status at pos, without waiting for metadata: 0 and *e,
 * GIO_PARKED, or -errno (as gio_piece()).
 */
static int gio_status(struct gio *gio, uint64_t pos, uint64_t len,
		      struct img_extent *e)
{
	struct img *top = gio->g->top;
	unsigned depth;
	int ret;

	if (!meta_fetch_sync(&gio->mf)) {
		ret = img_chain_status_nowait(top, NULL, pos, len, e, &depth,
					      &gio->mf.miss);
		if (gio_park(gio, ret))
			return GIO_PARKED;
		if (!meta_fetch_sync(&gio->mf))
			return ret;
	}
	ret = meta_fetch_take_error(&gio->mf);
	if (ret < 0)
		return ret;
	return img_chain_status(top, NULL, pos, len, e, &depth);
}

/*
 * What a reader of the first *len bytes of e gets, as GUEST_EXT_* flags
 * (*len clipped where the host file's holes change the answer). As qemu
 * reports them: zeros a layer stores as data (an NBD export's) are data.
 */
static unsigned status_flags(const struct img_extent *e, uint64_t *len)
{
	switch (e->status) {
	case IMG_DATA:
		if (e->host_valid && e->file && e->host_refine &&
		    img_host_hole(e->file, e->host_off, len))
			return GUEST_EXT_HOLE | GUEST_EXT_ZERO;
		return 0;
	case IMG_COMPRESSED:
		return 0;
	case IMG_ZERO:
		return e->zero_data ? GUEST_EXT_ZERO
				    : GUEST_EXT_HOLE | GUEST_EXT_ZERO;
	case IMG_UNALLOC:
	default:
		return GUEST_EXT_HOLE | GUEST_EXT_ZERO;
	}
}

/*
 * Walk the chain's status from gio->rpos, merging runs with the same
 * flags, until the range or the room for extents ends. A lookup that
 * misses parks the request and gio_fetched() resumes the walk.
 */
static void status_go(struct gio *gio)
{
	struct guest_req *req = gio->req;
	uint64_t pos = gio->rpos, end = req->off + req->len, len;
	struct guest_extent *last;
	struct img_extent e;
	unsigned flags;
	int ret = 0;

	while (pos < end) {
		ret = gio_status(gio, pos, end - pos, &e);
		if (ret == GIO_PARKED) {
			gio->rpos = pos;
			return;
		}
		if (ret < 0) {
			gio->err = ret;
			break;
		}
		len = sx_min(e.len, end - pos);
		flags = status_flags(&e, &len);
		last = req->ext_n ? &req->ext[req->ext_n - 1] : NULL;
		if (last && last->flags == flags) {
			last->len += len;
		} else {
			if (req->ext_n == req->ext_max)
				break;
			req->ext[req->ext_n++] = (struct guest_extent){
				.len = len, .flags = flags};
		}
		pos += len;
	}
	gio_put(gio);
}

static void status_start(struct guest *g, struct guest_req *req)
{
	struct gio *gio;

	req->ext_n = 0;
	if (!req->ext_max || !req->ext) {
		req->complete(req, sx_error(EINVAL, "%s: no room for extents",
					    g->top->path));
		return;
	}
	gio = gio_new(g, req);
	if (!gio) {
		req->complete(req, -ENOMEM);
		return;
	}
	gio->rpos = req->off;
	status_go(gio);
}

/* ---- writes ---- */

/*
 * One op of the copy pipeline for a run of clusters the top lacks
 * entirely, of a write (a write may have several, between clusters the top
 * holds).
 */
struct gio_aw {
	struct copy_op cop;
	struct gio *gio;
	struct gio_aw *next;
};

/* The chain's part is in the buffer: lay the guest's data over it. */
static int aw_ready(struct copy_op *op)
{
	struct gio_aw *aw = op->priv;
	struct guest_req *req = aw->gio->req;

	iov_to_buf(req->iov, req->iovcnt, op->cover_off - req->off,
		   op->buf + (op->cover_off - op->off), op->cover_len);
	return 0;
}

/* Written and linked (or failed, nothing leaked): answer the guest. */
static void aw_done(struct copy_op *op, int err)
{
	struct gio_aw *aw = op->priv;
	struct gio *gio = aw->gio;

	if (err < 0 && !gio->err)
		gio->err = err;
	sio_buf_free(op->buf);
	free(aw);
	gio_put(gio);
}

/*
 * An op for the write's part in clusters [ca, cb), which the top lacks
 * entirely, appended to *list (unstarted): 0, or -ENOMEM (the clusters
 * then take the synchronous path).
 */
static int aw_add(struct gio *gio, uint64_t ca, uint64_t cb,
		  struct gio_aw ***list)
{
	struct guest_req *req = gio->req;
	uint64_t s0 = sx_max(ca, req->off);
	uint64_t s1 = sx_min(cb, req->off + req->len);
	struct gio_aw *aw = calloc(1, sizeof(*aw));

	if (!aw)
		return -ENOMEM;
	aw->cop.buf = sio_buf_alloc(cb - ca);
	if (!aw->cop.buf) {
		free(aw);
		return -ENOMEM;
	}
	aw->gio = gio;
	aw->cop.off = ca;
	aw->cop.len = cb - ca;
	aw->cop.flags = COPY_WRITE_ZEROS | COPY_VERIFY | COPY_REPLACE_SHARED;
	aw->cop.cover_off = s0;
	aw->cop.cover_len = s1 - s0;
	aw->cop.ready = aw_ready;
	aw->cop.done = aw_done;
	aw->cop.priv = aw;
	**list = aw;
	*list = &aw->next;
	return 0;
}

/*
 * Allocating writes. The write's clusters [a, b) that the top lacks
 * entirely (every byte unallocated: no zero, compressed or partly
 * allocated cluster), and those it holds only as data shared with a
 * snapshot (their copy-on-write), go, one run of them at a time, through
 * an op of the copy pipeline: the rest of a partly written first or last
 * cluster is read from the chain (a shared cluster from itself), the
 * guest's data laid over it, every cluster written into fresh host
 * clusters and linked, verified (COPY_VERIFY: the guest's data must be
 * where the L2 points), then the request completes. The clusters stay
 * locked throughout, so nothing else can allocate them meanwhile, and
 * commit_run links only what is still unallocated or still shared (the
 * old cluster then loses its reference: IMG_COMMIT_REPLACE_SHARED). Zero
 * and compressed clusters and partly allocated ones (subclusters) take
 * the driver's synchronous pwrite: relinking them is not what commit_run
 * may do. Fills *list with the ops (not started); 0 or -errno from the
 * status calls (the top's metadata is cached: gio_warm_top()).
 */
static int aw_plan(struct gio *gio, uint64_t a, uint64_t b,
		   struct gio_aw **list)
{
	struct img *top = gio->g->top;
	uint64_t cs = top->cluster_size, lim = sx_min(b, top->size);
	uint64_t pos, cl, next = a, ra = 0, rb = 0;
	struct gio_aw **tail = list;
	struct img_extent e;
	int ret = 0;

	*list = NULL;
	/* Zeros over what reads as zeros: nothing to copy. */
	if (!img_can_alloc(top) || (gio->zeroing && !top->backing_name))
		return 0;
	for (pos = a; pos < lim; pos += e.len) {
		ret = img_block_status(top, pos, lim - pos, &e);
		if (ret < 0 || !e.len)
			return ret;
		if (e.status != IMG_UNALLOC &&
		    !(e.status == IMG_DATA && e.shared))
			continue;
		/* Each cluster this extent touches, once. */
		for (cl = sx_max(pos - pos % cs, next); cl < pos + e.len;
		     cl += cs) {
			next = cl + cs;
			/* Shared with a snapshot: copied like a missing one. */
			if (e.status == IMG_UNALLOC &&
			    !img_lacks_all(top, cl, sx_min(cs, lim - cl)))
				continue;
			if (rb == cl) {
				rb = cl + cs;
				continue;
			}
			if (rb > ra && aw_add(gio, ra, rb, &tail) < 0)
				return 0; /* the rest goes synchronously */
			ra = cl;
			rb = cl + cs;
		}
	}
	/* The last cluster may pass the image's end: the op's length too. */
	if (rb > ra)
		aw_add(gio, ra, rb >= lim ? b : rb, &tail);
	return 0;
}

/* Where the first op of list that ends after pos starts, and ends. */
static bool aw_find(const struct gio_aw *list, uint64_t pos, uint64_t *ca,
		    uint64_t *cb)
{
	for (; list; list = list->next) {
		if (list->cop.off + list->cop.len <= pos)
			continue;
		*ca = list->cop.off;
		*cb = list->cop.off + list->cop.len;
		return true;
	}
	return false;
}

/* A write of zeros may leave e alone: it reads as zeros already. */
static bool reads_zero(const struct img *top, const struct img_extent *e)
{
	return e->status == IMG_ZERO ||
	       (e->status == IMG_UNALLOC && !top->backing_name);
}

struct wpiece {
	uint64_t pos;
	uint64_t n;
	uint64_t host;
};

static int write_sync(struct guest *g, struct guest_req *req, uint64_t pos,
		      uint64_t n)
{
	struct img *top = g->top;
	uint8_t *buf;
	int ret;

	buf = malloc(n);
	if (!buf)
		return sx_error(ENOMEM, "guest write: out of memory");
	iov_to_buf(req->iov, req->iovcnt, pos - req->off, buf, n);
	ret = img_pwrite(top, buf, n, pos);
	free(buf);
	return ret;
}

/*
 * Run a write: lock its clusters, bring the top's metadata for them in
 * (parking the request while it is read: gio_fetched() calls this again,
 * the lock still held), then the allocating, synchronous and in-place
 * pieces: the synchronous ones first (a bounce read-modify-write of the
 * driver never races our own asynchronous writes), then the in-place
 * writes and the copy pipeline's ops, on clusters disjoint from them.
 */
static void write_go(struct gio *gio)
{
	struct guest *g = gio->g;
	struct guest_req *req = gio->req;
	struct img *top = g->top;
	struct wpiece *pc = NULL, *np;
	struct gio_aw *aws = NULL, *aw;
	unsigned npc = 0, cap = 0, i;
	uint64_t pos, end, stop, a, b, ca, cb;
	struct img_extent e;
	int ret = 0;

	if (!top->writable) {
		ret = sx_error(EROFS, "%s: read-only", top->path);
		goto out;
	}
	cluster_range(g, req->off, req->len, &a, &b);
	if (!gio->lock && !gio->nolock) {
		ret = cl_lock_try(&g->locks, a, b, &gio->lock);
		if (ret < 0)
			goto out;
	}
	ret = gio_warm_top(gio, a, b - a);
	if (ret == GIO_PARKED)
		return;
	if (ret < 0)
		goto out;
	ret = aw_plan(gio, a, b, &aws);
	if (ret < 0)
		goto out;
	for (pos = req->off, end = req->off + req->len; pos < end;
	     pos += e.len) {
		stop = end;
		if (aw_find(aws, pos, &ca, &cb)) {
			if (ca <= pos) {
				/* The copy pipeline's: skip its clusters. */
				e.len = sx_min(cb, end) - pos;
				continue;
			}
			stop = sx_min(ca, end);
		}
		ret = img_block_status(top, pos, stop - pos, &e);
		if (ret < 0)
			goto out;
		if (gio->zeroing && reads_zero(top, &e))
			continue;
		if (e.status != IMG_DATA || !e.host_valid || e.shared ||
		    !sx_is_aligned(e.host_off | e.len, top->file->align)) {
			ret = write_sync(g, req, pos, e.len);
			if (ret < 0)
				goto out;
			continue;
		}
		if (npc == cap) {
			cap = cap ? cap * 2 : 4;
			np = realloc(pc, cap * sizeof(*pc));
			if (!np) {
				ret = sx_error(ENOMEM,
					       "guest write: no memory");
				goto out;
			}
			pc = np;
		}
		pc[npc++] = (struct wpiece){pos, e.len, e.host_off};
	}
	for (i = 0; i < npc && ret >= 0; i++) {
		g->dirty = true;
		ret = gio_add_io(gio, SIO_OP_WRITE, top->file, pc[i].host,
				 pc[i].pos - req->off, pc[i].n);
	}
	/* Once an op starts, its done() answers for it. */
	while (ret >= 0 && (aw = aws)) {
		aws = aw->next;
		gio->pending++;
		copy_start(g->copier, &aw->cop);
	}
out:
	while ((aw = aws)) {
		aws = aw->next;
		sio_buf_free(aw->cop.buf);
		free(aw);
	}
	free(pc);
	if (ret < 0 && !gio->err)
		gio->err = ret;
	gio_put(gio);
}

static void write_start(struct guest *g, struct guest_req *req)
{
	struct gio *gio = gio_new(g, req);

	if (!gio) {
		req->complete(req, -ENOMEM);
		return;
	}
	write_go(gio);
}

/* ---- discard, write-zeroes ---- */

/* A partial cluster of a write-zeroes, written as zeros (zd_part()). */
struct gio_zpart {
	struct guest_req req;
	struct iovec iov;
	struct gio *parent;
};

static void zpart_done(struct guest_req *req, int ret)
{
	struct gio_zpart *zp = req->priv;
	struct gio *gio = zp->parent;

	if (ret < 0 && !gio->err)
		gio->err = ret;
	free(zp);
	gio_put(gio);
}

/*
 * Write zeros over [pos, pos + n), inside one cluster, as a guest write
 * under gio's lock (the clusters are gio's): in place where the top holds
 * the data, through the copy pipeline where it lacks the cluster, left
 * alone where it reads as zeros, the driver's synchronous pwrite for the
 * rest. Its completion counts in gio->pending. 0 or -ENOMEM.
 */
static int zd_part(struct gio *gio, uint64_t pos, uint64_t n)
{
	struct guest *g = gio->g;
	struct gio_zpart *zp;
	struct gio *sub;

	if (!g->zeros) {
		g->zeros = sio_buf_alloc(g->top->cluster_size);
		if (!g->zeros)
			return sx_error(ENOMEM, "write zeroes: no memory");
		memset(g->zeros, 0, g->top->cluster_size);
	}
	zp = calloc(1, sizeof(*zp));
	if (!zp)
		return sx_error(ENOMEM, "write zeroes: no memory");
	zp->iov = (struct iovec){g->zeros, n};
	zp->req = (struct guest_req){
		.op = GUEST_WRITE,
		.iov = &zp->iov,
		.iovcnt = 1,
		.off = pos,
		.len = n,
		.complete = zpart_done,
		.priv = zp,
	};
	zp->parent = gio;
	sub = gio_new(g, &zp->req);
	if (!sub) {
		free(zp);
		return sx_error(ENOMEM, "write zeroes: no memory");
	}
	sub->zeroing = true;
	sub->nolock = true;
	gio->pending++;
	write_go(sub);
	return 0;
}

/*
 * Write-zeroes, its metadata in memory: the whole clusters are the
 * driver's (zero clusters, a change in memory); a partial cluster at an
 * edge would have it read-modify-write the cluster synchronously, so the
 * partial ones are writes of zeros instead (zd_part()). The image's last
 * cluster counts as whole when the range reaches the end, as for the
 * driver. 0 or -errno.
 */
static int zd_zeroes(struct gio *gio)
{
	struct guest_req *req = gio->req;
	struct img *top = gio->g->top;
	uint64_t cs = top->cluster_size, off = req->off, end = off + req->len;
	uint64_t wa, wb;
	int ret = 0;

	unsigned wz = (req->flags & GUEST_F_FAST_ZERO) ? IMG_WZ_NO_FALLBACK : 0;

	if (!img_can_alloc(top) || !req->len)
		return img_write_zeroes(top, off, req->len, wz);
	wa = sx_min(off % cs ? off + cs - off % cs : off, end);
	wb = sx_max(end == top->size ? end : end - end % cs, wa);
	/* Fast: whole clusters only (the edges would be writes of data). */
	if (wz && (off < wa || wb < end))
		return sx_error(-ENOTSUP,
				"%s: write-zeroes of [%llu, +%llu) is not "
				"whole clusters: not fast",
				top->path, (unsigned long long)off,
				(unsigned long long)req->len);
	if (wb > wa)
		ret = img_write_zeroes(top, wa, wb - wa, wz);
	if (ret >= 0 && off < wa)
		ret = zd_part(gio, off, wa - off);
	if (ret >= 0 && wb < end)
		ret = zd_part(gio, wb, end - wb);
	return ret;
}

/* The metadata asked for is in (or not: the driver then reads it). */
static void zd_prepared(void *opaque, int res)
{
	struct gio *gio = opaque;

	(void)res;
	gio->g->st.meta_fetches++;
	zd_go(gio);
}

/*
 * Run a discard or write-zeroes: lock its clusters (a stream or a
 * copy-on-read must not copy into them while it waits), have the driver
 * bring in the metadata it touches (parking while it is read: zd_prepared()
 * calls this again, the lock still held), then the driver's operation,
 * which now only changes cached metadata.
 */
static void zd_go(struct gio *gio)
{
	struct guest *g = gio->g;
	struct guest_req *req = gio->req;
	struct img *top = g->top;
	bool zeroes = req->op == GUEST_WRITE_ZEROES;
	uint64_t a, b;
	int ret = 0;

	if (!zeroes && !top->writable) {
		ret = sx_error(EROFS, "%s: read-only", top->path);
		goto out;
	}
	if (!gio->lock && req->len) {
		cluster_range(g, req->off, req->len, &a, &b);
		ret = cl_lock_try(&g->locks, a, b, &gio->lock);
		if (ret < 0)
			goto out;
	}
	if (gio->prep_rounds < GUEST_PREP_ROUNDS) {
		/* Errors are the operation's to meet and report. */
		ret = img_prepare_discard(top, req->off, req->len,
					  zeroes ? IMG_PREP_ZEROES : 0,
					  zd_prepared, gio);
		if (ret == 1) {
			gio->prep_rounds++;
			return;
		}
	}
	if (zeroes)
		ret = zd_zeroes(gio);
	else
		ret = img_discard(top, req->off, req->len);
out:
	if (ret < 0 && !gio->err)
		gio->err = ret;
	gio_put(gio);
}

static void zd_start(struct guest *g, struct guest_req *req)
{
	struct gio *gio = gio_new(g, req);

	if (!gio) {
		req->complete(req, -ENOMEM);
		return;
	}
	zd_go(gio);
}

static void start(struct guest *g, struct guest_req *req)
{
	if (req->len && req->off + req->len > g->top->size) {
		req->complete(req, sx_error(EINVAL, "%s: beyond the end",
					    g->top->path));
		return;
	}
	/*
	 * Accepted: what the guest changes dirties the persistent bitmaps
	 * now, before it can be acknowledged. Only here: the stream and
	 * copy-on-read write through the same driver calls but copy what
	 * the guest saw already.
	 */
	if (req->len && (req->op == GUEST_WRITE || req->op == GUEST_DISCARD ||
			 req->op == GUEST_WRITE_ZEROES))
		img_mark_dirty(g->top, req->off, req->len);
	switch (req->op) {
	case GUEST_READ:
		if (!req->len)
			req->complete(req, 0);
		else
			read_start(g, req);
		break;
	case GUEST_WRITE:
		if (!req->len)
			req->complete(req, 0);
		else
			write_start(g, req);
		break;
	case GUEST_FLUSH:
		gflush_add(g, req);
		break;
	case GUEST_DISCARD:
	case GUEST_WRITE_ZEROES:
		zd_start(g, req);
		break;
	case GUEST_STATUS:
		if (!req->len) {
			req->ext_n = 0;
			req->complete(req, 0);
		} else {
			status_start(g, req);
		}
		break;
	default:
		req->complete(req, sx_error(EINVAL, "unknown guest op %d",
					    (int)req->op));
		break;
	}
}

/* ---- waiting ---- */

/* Overlaps a waiting request before `stop` that needs a lock. */
static bool waiter_overlap(struct guest *g, struct guest_req *stop, uint64_t a,
			   uint64_t b)
{
	struct guest_req *w;
	uint64_t wa, wb;

	for (w = g->wait_head; w && w != stop; w = w->next) {
		if (!needs_lock(w))
			continue;
		cluster_range(g, w->off, w->len, &wa, &wb);
		if (wa < b && a < wb)
			return true;
	}
	return false;
}

static bool must_wait(struct guest *g, struct guest_req *req,
		      struct guest_req *stop)
{
	uint64_t a, b;

	if (g->hold)
		return true;
	if (!needs_lock(req))
		return false;
	cluster_range(g, req->off, req->len, &a, &b);
	return cl_locks_busy(&g->locks, a, b) || waiter_overlap(g, stop, a, b);
}

void guest_submit(struct guest *g, struct guest_req *req)
{
	g->last_ns = now_ns();
	if (g->last_ns - g->depth_t0 >= GUEST_DEPTH_WINDOW_NS) {
		/* A window with no request at all counts as idle. */
		g->depth_prev =
			g->last_ns - g->depth_t0 < 2 * GUEST_DEPTH_WINDOW_NS
				? g->depth_peak
				: 0;
		g->depth_peak = g->inflight;
		g->depth_t0 = g->last_ns;
	}
	req->next = NULL;
	if (must_wait(g, req, NULL)) {
		g->st.waits++;
		*g->wait_tail = req;
		g->wait_tail = &req->next;
		g->nwait++;
		return;
	}
	start(g, req);
}

void guest_kick(struct guest *g)
{
	struct guest_req **pp, *req;

	/* Someone else's flush was in flight: maybe it ended. */
	if (g->fl_state == GF_AGAIN)
		gflush_meta(g);
	if (!g->wait_head || g->hold)
		return;
	if (g->locks.generation == g->kick_gen && !g->kick_hold)
		return;
	g->kick_gen = g->locks.generation;
	g->kick_hold = false;
	pp = &g->wait_head;
	while ((req = *pp)) {
		if (must_wait(g, req, req)) {
			pp = &req->next;
			continue;
		}
		*pp = req->next;
		if (!*pp)
			g->wait_tail = pp;
		g->nwait--;
		req->next = NULL;
		/* Completions only post: the list stays as it is. */
		start(g, req);
	}
}

/* ---- the rest ---- */

int guest_create(struct img *top, struct sio_queue *q, struct guest **out)
{
	struct guest *g = calloc(1, sizeof(*g));
	int ret;

	if (!g)
		return sx_error(ENOMEM, "out of memory");
	ret = copier_create(top, q, &g->copier);
	if (ret < 0) {
		free(g);
		return ret;
	}
	g->top = top;
	g->q = q;
	g->wait_tail = &g->wait_head;
	g->fl_wait_tail = &g->fl_wait;
	*out = g;
	return 0;
}

void guest_destroy(struct guest *g)
{
	if (!g)
		return;
	copier_destroy(g->copier);
	sio_buf_free(g->zeros);
	free(g);
}

struct copier *guest_copier(struct guest *g)
{
	return g->copier;
}

void guest_set_cor(struct guest *g, bool on, bool may_yield)
{
	g->cor = on;
	g->cor_yield = may_yield;
}

void guest_hold(struct guest *g, bool hold)
{
	if (g->hold && !hold)
		g->kick_hold = true;
	g->hold = hold;
}

unsigned guest_inflight(const struct guest *g)
{
	return g->inflight;
}

bool guest_idle(const struct guest *g)
{
	return !g->inflight && !g->wait_head;
}

bool guest_busy(const struct guest *g, uint64_t recent_ns)
{
	return g->inflight || g->wait_head || now_ns() - g->last_ns < recent_ns;
}

void guest_get_stats(const struct guest *g, struct guest_stats *st)
{
	*st = g->st;
}

int guest_stream_lock(void *opaque, uint64_t off, uint64_t len, void **token)
{
	struct guest *g = opaque;
	struct cl_lock *l;
	int ret;

	/* A waiting guest write goes first: the stream comes back later. */
	if (waiter_overlap(g, NULL, off, off + len))
		return -EBUSY;
	ret = cl_lock_try(&g->locks, off, off + len, &l);
	if (ret < 0)
		return ret;
	*token = l;
	return 0;
}

void guest_stream_unlock(void *opaque, void *token)
{
	struct guest *g = opaque;

	cl_unlock(&g->locks, token);
}
