/*
 * The asynchronous queue: one io_uring per engine thread, requests with
 * completion callbacks, batched submission.
 *
 * A request is in exactly one of these places until its callback runs:
 *  - the backlog (q->backlog_*): queued, no SQE yet, because the ring had
 *    no room (more requests than depth) or because a short transfer or
 *    EAGAIN sent it back for another round;
 *  - the ring: it owns one SQE, prepared or in the kernel (q->in_ring
 *    counts these, never more than q->depth, so the completion ring, twice
 *    as large, cannot overflow);
 *  - the finished list (q->finished_*): done without the kernel (an injected
 *    fault, a zero-length request); its result waits in _done_bytes.
 * A request held by an injected delay (sio_fault_add_delay()) first takes
 * the backlog or the ring as a timeout SQE (tagged user_data, _done_bytes
 * QUEUE_HELD, the timespec in _iov_tmp, which only a transfer's resume
 * uses), then goes round again as itself.
 * q->pending counts all three: the requests whose callback has not run.
 *
 * sio_queue_submit() never talks to the kernel: it takes an SQE if there is
 * room, else it appends to the backlog. sio_queue_run() hands the batch over
 * with one io_uring_submit_and_wait() per round.
 *
 * A transfer resumes where the last one stopped: _done_bytes counts the bytes
 * moved so far. With an iovec the caller's array is passed to the kernel as
 * is for whole elements; a partly consumed (or, by len, partly wanted)
 * element goes alone through _iov_tmp. So no allocation per request.
 *
 * A read of an NBD export (io/nbd.h) takes a fourth place instead of the
 * ring: the queue's connection to that export (struct queue_nbd, one per
 * file, made at the file's first request), which holds it until libnbd
 * has answered every part; then it goes to the finished list like any
 * other. The connection's socket is polled on this ring: a POLL_ADD for
 * POLLIN and one for POLLOUT, each armed when the connection asks for it
 * and not armed yet (tagged user_data, counted in q->nbd_polls, not in
 * in_ring). While a connection holds requests it has a poll armed, so
 * waiting for completions always has something that will wake it.
 * q->nbd_busy counts the requests the connections hold.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <liburing.h>

#include "common/checked.h"
#include "common/error.h"
#include "io/fault.h"
#include "io/io.h"
#include "io/iolog.h"
#include "io/nbd_priv.h"
#include "io/reqlist.h"
#include "io/ring.h"

/* Largest single transfer handed to the kernel; it caps near 2 GiB. */
#define QUEUE_MAX_IO (1U << 30)

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* _done_bytes of a request held by an injected delay, before its issue. */
#define QUEUE_HELD UINT64_MAX
/* user_data of a hold's timeout SQE: the request's address, tagged. */
#define QUEUE_HOLD_TAG ((uintptr_t)1)
/*
 * user_data of an NBD socket poll or timer: its struct queue_nbd's
 * address, tagged with what it is and, for a poll, the parity of the
 * connection's handle it was armed for (a poll of the handle before
 * tells nothing about the current one: see nbd_poll_over()).
 */
#define QUEUE_NBD_IN_TAG ((uintptr_t)2) /* | parity */
#define QUEUE_NBD_OUT_TAG ((uintptr_t)4) /* | parity */
#define QUEUE_NBD_TIMER_TAG ((uintptr_t)6)
#define QUEUE_TAG_MASK ((uintptr_t)7)
/* Longest an NBD timer sleeps: a deadline that comes nearer is seen. */
#define QUEUE_NBD_TICK_NS (250ull * 1000 * 1000)

_Static_assert(sizeof(((struct sio_req *)0)->_iov_tmp) >=
		       sizeof(struct __kernel_timespec),
	       "a hold's timespec lives in _iov_tmp");

/* The queue's connection to one NBD file, and its socket's polls. */
struct queue_nbd {
	struct sio_nbd_conn *conn;
	bool in_armed, out_armed; /* for the handle of in_gen, out_gen */
	unsigned in_gen, out_gen;
	bool timer_armed;
	struct __kernel_timespec ts; /* the timer's, while armed */
	struct queue_nbd *next;
};

_Static_assert(_Alignof(struct sio_req) > QUEUE_TAG_MASK &&
		       _Alignof(struct queue_nbd) > QUEUE_TAG_MASK,
	       "user_data tags live in the low bits of the addresses");

struct sio_queue {
	struct io_uring ring;
	unsigned depth;
	unsigned in_ring;
	unsigned pending;
	struct sio_req *backlog_head, *backlog_tail;
	struct sio_req *finished_head, *finished_tail;
	struct queue_nbd *nbd; /* connections, one per NBD file */
	unsigned nbd_polls; /* polls and timers armed */
	unsigned nbd_busy; /* requests the connections hold */
};

static bool is_rw(const struct sio_req *req)
{
	return req->op == SIO_OP_READ || req->op == SIO_OP_WRITE;
}

static uint64_t iov_total(const struct sio_req *req)
{
	uint64_t sum = 0;
	int i;

	for (i = 0; i < req->iovcnt; i++)
		sum += req->iov[i].iov_len;
	return sum;
}

/* Bytes a read or write moves: len, or with an iovec and len 0, its sum. */
static uint64_t req_len(const struct sio_req *req)
{
	if (!req->buf && req->iov && req->len == 0)
		return iov_total(req);
	return req->len;
}

/* Zero [from, len) of the request's memory: the part past end of file. */
static void zero_tail(struct sio_req *req, uint64_t from, uint64_t len)
{
	uint64_t pos = 0, n, skip;
	int i;

	if (req->buf) {
		memset((char *)req->buf + from, 0, len - from);
		return;
	}
	for (i = 0; i < req->iovcnt && pos < len; i++) {
		n = sx_min(req->iov[i].iov_len, len - pos);
		if (pos + n > from) {
			skip = from > pos ? from - pos : 0;
			memset((char *)req->iov[i].iov_base + skip, 0,
			       n - skip);
		}
		pos += n;
	}
}

/*
 * Point sqe at the next part of the iovec transfer: the caller's whole
 * elements from the resume point, or the one partial element alone.
 */
static void prep_iov(struct io_uring_sqe *sqe, struct sio_req *req,
		     uint64_t len)
{
	uint64_t pos = 0, left = len - req->_done_bytes, got = 0;
	const struct iovec *first;
	int i = 0, n = 0;

	while (pos + req->iov[i].iov_len <= req->_done_bytes) {
		pos += req->iov[i].iov_len;
		i++;
	}
	first = &req->iov[i];
	if (pos == req->_done_bytes) {
		while (i + n < req->iovcnt && n < IOV_MAX &&
		       got + req->iov[i + n].iov_len <= left &&
		       got + req->iov[i + n].iov_len <= QUEUE_MAX_IO) {
			got += req->iov[i + n].iov_len;
			n++;
		}
	}
	if (n == 0) {
		req->_iov_tmp[0].iov_base =
			(char *)first->iov_base + (req->_done_bytes - pos);
		req->_iov_tmp[0].iov_len = (size_t)sx_min(
			sx_min(first->iov_len - (req->_done_bytes - pos), left),
			QUEUE_MAX_IO);
		first = req->_iov_tmp;
		n = 1;
	}
	if (req->op == SIO_OP_READ)
		io_uring_prep_readv(sqe, req->file->fd, first, (unsigned)n,
				    req->off + req->_done_bytes);
	else
		io_uring_prep_writev(sqe, req->file->fd, first, (unsigned)n,
				     req->off + req->_done_bytes);
}

static void prep(struct io_uring_sqe *sqe, struct sio_req *req)
{
	int fd = req->file->fd;
	uint64_t len, off;
	unsigned n;

	if (req->_done_bytes == QUEUE_HELD) {
		io_uring_prep_timeout(
			sqe, (struct __kernel_timespec *)(void *)req->_iov_tmp,
			0, 0);
		io_uring_sqe_set_data(
			sqe, (void *)((uintptr_t)req | QUEUE_HOLD_TAG));
		return;
	}
	switch (req->op) {
	case SIO_OP_READ:
	case SIO_OP_WRITE:
		len = req_len(req);
		if (!req->buf) {
			prep_iov(sqe, req, len);
			break;
		}
		off = req->off + req->_done_bytes;
		n = (unsigned)sx_min(len - req->_done_bytes, QUEUE_MAX_IO);
		if (req->op == SIO_OP_READ)
			io_uring_prep_read(sqe, fd,
					   (char *)req->buf + req->_done_bytes,
					   n, off);
		else
			io_uring_prep_write(sqe, fd,
					    (char *)req->buf + req->_done_bytes,
					    n, off);
		break;
	case SIO_OP_FSYNC:
		io_uring_prep_fsync(sqe, fd, 0);
		break;
	case SIO_OP_FDATASYNC:
		io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
		break;
	case SIO_OP_FALLOCATE:
		io_uring_prep_fallocate(sqe, fd, req->mode, req->off, req->len);
		break;
	case SIO_OP_POLL:
		io_uring_prep_poll_add(sqe, fd, POLLIN);
		break;
	case SIO_OP_NBD_STATUS:
		/* Unreachable: NBD files go to nbd_enqueue(). */
		io_uring_prep_nop(sqe);
		break;
	}
	io_uring_sqe_set_data(sqe, req);
}

static void nbd_enqueue(struct sio_queue *q, struct sio_req *req);

/*
 * Give req an SQE now if the ring has room, else put it in the backlog;
 * an NBD request (unless held) goes to its connection instead.
 */
static void enqueue(struct sio_queue *q, struct sio_req *req)
{
	struct io_uring_sqe *sqe = NULL;

	if (req->file->nbd && req->_done_bytes != QUEUE_HELD) {
		nbd_enqueue(q, req);
		return;
	}
	if (q->in_ring < q->depth && !q->backlog_head)
		sqe = io_uring_get_sqe(&q->ring);
	if (!sqe) {
		list_append(&q->backlog_head, &q->backlog_tail, req);
		return;
	}
	prep(sqe, req);
	q->in_ring++;
}

/* Move backlog into the ring while it has room, oldest first. */
static void fill_ring(struct sio_queue *q)
{
	struct io_uring_sqe *sqe;

	while (q->backlog_head && q->in_ring < q->depth) {
		sqe = io_uring_get_sqe(&q->ring);
		if (!sqe)
			break;
		prep(sqe, list_pop(&q->backlog_head, &q->backlog_tail));
		q->in_ring++;
	}
}

static void finish_now(struct sio_queue *q, struct sio_req *req, int res)
{
	/* _done_bytes is free once a request is finished: it keeps res. */
	req->_done_bytes = (uint64_t)(int64_t)res;
	list_append(&q->finished_head, &q->finished_tail, req);
}

/*
 * Arm a poll for events on l's socket. false when the submission ring
 * has no room even after handing it over (the next sio_queue_run() tries
 * again, before it waits).
 */
static struct io_uring_sqe *nbd_sqe(struct sio_queue *q)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);

	if (!sqe) {
		io_uring_submit(&q->ring);
		sqe = io_uring_get_sqe(&q->ring);
	}
	return sqe;
}

static bool nbd_poll_add(struct sio_queue *q, struct queue_nbd *l,
			 unsigned events, uintptr_t tag)
{
	struct io_uring_sqe *sqe = nbd_sqe(q);

	if (!sqe)
		return false;
	io_uring_prep_poll_add(sqe, sio_nbd_conn_fd(l->conn), events);
	tag |= sio_nbd_conn_gen(l->conn) & 1;
	io_uring_sqe_set_data(sqe, (void *)((uintptr_t)l | tag));
	q->nbd_polls++;
	return true;
}

/*
 * A timer until l's connection's deadline, QUEUE_NBD_TICK_NS at most (a
 * deadline that moves nearer meanwhile is seen at the next tick).
 */
static void nbd_timer_add(struct sio_queue *q, struct queue_nbd *l,
			  uint64_t deadline)
{
	struct io_uring_sqe *sqe;
	struct timespec now;
	uint64_t t, wait;

	clock_gettime(CLOCK_MONOTONIC, &now);
	t = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
	wait = deadline > t ? deadline - t : 0;
	wait = sx_max(sx_min(wait, QUEUE_NBD_TICK_NS), 1000000ull);
	sqe = nbd_sqe(q);
	if (!sqe)
		return;
	l->ts.tv_sec = (long long)(wait / 1000000000u);
	l->ts.tv_nsec = (long long)(wait % 1000000000u);
	io_uring_prep_timeout(sqe, &l->ts, 0, 0);
	io_uring_sqe_set_data(sqe,
			      (void *)((uintptr_t)l | QUEUE_NBD_TIMER_TAG));
	l->timer_armed = true;
	q->nbd_polls++;
}

/*
 * Arm the polls that l's connection waits for and that are not armed for
 * its current handle, and a timer when it has a deadline.
 */
static void nbd_arm(struct sio_queue *q, struct queue_nbd *l)
{
	unsigned ev = sio_nbd_conn_events(l->conn);
	unsigned gen = sio_nbd_conn_gen(l->conn);
	uint64_t deadline = sio_nbd_conn_deadline(l->conn);

	if ((ev & POLLIN) && !(l->in_armed && l->in_gen == gen)) {
		l->in_armed = nbd_poll_add(q, l, POLLIN, QUEUE_NBD_IN_TAG);
		l->in_gen = gen;
	}
	if ((ev & POLLOUT) && !(l->out_armed && l->out_gen == gen)) {
		l->out_armed = nbd_poll_add(q, l, POLLOUT, QUEUE_NBD_OUT_TAG);
		l->out_gen = gen;
	}
	if (deadline && !l->timer_armed)
		nbd_timer_add(q, l, deadline);
}

/* nbd_arm() for every connection: none may wait without a poll. */
static void nbd_arm_all(struct sio_queue *q)
{
	struct queue_nbd *l;

	for (l = q->nbd; l; l = l->next)
		nbd_arm(q, l);
}

/*
 * Move what l's connection has finished to the finished list (a read's
 * result is its full length, as for files), then arm what it waits for.
 */
static void nbd_service(struct sio_queue *q, struct queue_nbd *l)
{
	struct sio_req *req;
	int res;

	while ((req = sio_nbd_conn_pop(l->conn, &res))) {
		q->nbd_busy--;
		if (res >= 0 && req->op == SIO_OP_READ)
			res = (int)req_len(req);
		finish_now(q, req, res);
	}
	nbd_arm(q, l);
}

/*
 * The queue's connection to the NBD file f, made now if it has none.
 * NULL and *err (message recorded) when connecting fails.
 */
static struct queue_nbd *nbd_link(struct sio_queue *q, struct sio_file *f,
				  int *err)
{
	struct queue_nbd *l, *best = NULL, *first = NULL;
	unsigned have = 0;

	/*
	 * The least loaded of the file's connections that are up (the first
	 * one also while it connects: requests wait for it). While every
	 * one holds requests and the server takes more (multi-conn), one
	 * more is opened; it gets requests once it is up, and one that never
	 * comes up (a server with fewer slots than it says) just stays out.
	 */
	for (l = q->nbd; l; l = l->next) {
		if (!sio_nbd_conn_owns(l->conn, f))
			continue;
		have++;
		first = l; /* the list is newest first */
		if (!sio_nbd_conn_up(l->conn))
			continue;
		if (!best ||
		    sio_nbd_conn_held(l->conn) < sio_nbd_conn_held(best->conn))
			best = l;
	}
	if (!best)
		best = first;
	if (best &&
	    (!sio_nbd_conn_held(best->conn) || have >= sio_nbd_conns_wanted(f)))
		return best;
	l = calloc(1, sizeof(*l));
	if (!l) {
		if (best)
			return best;
		*err = sx_error(-ENOMEM, "%s: out of memory", f->path);
		return NULL;
	}
	*err = sio_nbd_conn_open(f, &l->conn);
	if (*err < 0) {
		free(l);
		return best;
	}
	l->next = q->nbd;
	q->nbd = l;
	return best ? best : l;
}

/* Give the first n bytes of req to a connection of its file. */
static void nbd_hand_over(struct sio_queue *q, struct sio_req *req, uint64_t n)
{
	struct queue_nbd *l;
	int err;

	l = nbd_link(q, req->file, &err);
	if (!l) {
		finish_now(q, req, err);
		return;
	}
	q->nbd_busy++;
	sio_nbd_conn_submit(l->conn, req, n);
	nbd_service(q, l);
}

/*
 * A block status request: to a connection when the server answers
 * base:allocation and the range is in the export; else answered now (all
 * data, or nothing past the end).
 */
static void nbd_status(struct sio_queue *q, struct sio_req *req)
{
	struct sio_nbd_extent *v = req->buf;
	uint64_t size = sio_nbd_size(req->file), n;

	n = req->off >= size ? 0 : sx_min(req->len, size - req->off);
	if (!n) {
		finish_now(q, req, 0);
		return;
	}
	if (!sio_nbd_has_block_status(req->file)) {
		v[0] = (struct sio_nbd_extent){.len = n, .flags = 0};
		finish_now(q, req, 1);
		return;
	}
	nbd_hand_over(q, req, n);
}

/*
 * An NBD request: a read goes to the connection (the part past the
 * export's end is zeros at once), a block status too (nbd_status()), a
 * sync completes now (nothing to flush on a read-only export).
 */
static void nbd_enqueue(struct sio_queue *q, struct sio_req *req)
{
	uint64_t len, size, avail;

	req->_nbd.msg = NULL;
	req->_nbd.walk = NULL;
	if (req->op == SIO_OP_NBD_STATUS) {
		nbd_status(q, req);
		return;
	}
	if (req->op != SIO_OP_READ) {
		finish_now(q, req, 0);
		return;
	}
	len = req_len(req);
	size = sio_nbd_size(req->file);
	avail = req->off >= size ? 0 : sx_min(len, size - req->off);
	if (avail < len)
		zero_tail(req, avail, len);
	if (!avail) {
		finish_now(q, req, (int)len);
		return;
	}
	nbd_hand_over(q, req, avail);
}

/*
 * The completion cqe_data (just seen, result res) was a poll of an NBD
 * socket: tell its connection and collect what that finished. false when
 * it is another completion.
 */
static bool nbd_poll_over(struct sio_queue *q, void *cqe_data, int res)
{
	uintptr_t tag = (uintptr_t)cqe_data & QUEUE_TAG_MASK;
	uintptr_t kind = tag & ~(uintptr_t)1, parity = tag & 1;
	struct queue_nbd *l;
	unsigned gen;

	if (tag == QUEUE_NBD_TIMER_TAG) {
		l = (struct queue_nbd *)((uintptr_t)cqe_data & ~QUEUE_TAG_MASK);
		q->nbd_polls--;
		l->timer_armed = false;
		sio_nbd_conn_tick(l->conn);
		nbd_service(q, l);
		return true;
	}
	if (kind != QUEUE_NBD_IN_TAG && kind != QUEUE_NBD_OUT_TAG)
		return false;
	l = (struct queue_nbd *)((uintptr_t)cqe_data & ~QUEUE_TAG_MASK);
	q->nbd_polls--;
	gen = sio_nbd_conn_gen(l->conn);
	/*
	 * A poll of a handle closed since (its socket hung up): nothing for
	 * the current one, whose own poll is armed apart.
	 */
	if (parity != (gen & 1)) {
		nbd_service(q, l);
		return true;
	}
	if (kind == QUEUE_NBD_IN_TAG)
		l->in_armed = false;
	else
		l->out_armed = false;
	sio_nbd_conn_notify(l->conn, res);
	nbd_service(q, l);
	return true;
}

static int check_aligned(const struct sio_req *req, uint64_t len)
{
	const struct sio_file *f = req->file;
	int i;

	/* An NBD export's minimum block size applies as direct I/O's. */
	if (!f->direct && !f->nbd)
		return 0;
	if (!sx_is_aligned(req->off, f->align) || !sx_is_aligned(len, f->align))
		return -EINVAL;
	if (req->buf)
		return sx_is_aligned((uintptr_t)req->buf, f->mem_align)
			       ? 0
			       : -EINVAL;
	for (i = 0; i < req->iovcnt; i++) {
		if (!sx_is_aligned((uintptr_t)req->iov[i].iov_base,
				   f->mem_align) ||
		    !sx_is_aligned(req->iov[i].iov_len, f->align))
			return -EINVAL;
	}
	return 0;
}

static int validate(const struct sio_req *req, uint64_t *lenp)
{
	const char *path = req->file ? req->file->path : "sio_queue_submit";
	uint64_t len = 0, end;

	if (!req->file || !req->done)
		return sx_error(-EINVAL, "%s: request without file or callback",
				path);
	if (req->file->mem)
		return sx_error(-EOPNOTSUPP,
				"%s: a memory file cannot go on a queue", path);
	if (req->file->nbd &&
	    (req->op == SIO_OP_WRITE || req->op == SIO_OP_FALLOCATE))
		return sx_error(
			-EROFS, "%s: %s: NBD exports are read-only", path,
			req->op == SIO_OP_WRITE ? "write" : "fallocate");
	if (req->file->nbd && req->op == SIO_OP_POLL)
		return sx_error(-EINVAL,
				"%s: an NBD export has no descriptor to poll",
				path);
	switch (req->op) {
	case SIO_OP_READ:
	case SIO_OP_WRITE:
		if (!req->buf && (!req->iov || req->iovcnt <= 0))
			return sx_error(-EINVAL, "%s: request without memory",
					path);
		len = req_len(req);
		if (!req->buf && len > iov_total(req))
			return sx_error(-EINVAL,
					"%s: len %" PRIu64
					" is more than the iovec holds",
					path, len);
		if (len > INT_MAX)
			return sx_error(-EINVAL,
					"%s: request of %" PRIu64
					" bytes is too large",
					path, len);
		if (req->op == SIO_OP_WRITE && !req->file->writable)
			return sx_error(-EBADF,
					"%s: write: file is open read-only",
					path);
		if (check_aligned(req, len) < 0)
			return sx_error(-EINVAL,
					"%s: misaligned direct request "
					"(%" PRIu64 " bytes at offset %" PRIu64
					", alignment %u, memory %u)",
					path, len, req->off, req->file->align,
					req->file->mem_align);
		break;
	case SIO_OP_FALLOCATE:
		len = req->len;
		break;
	case SIO_OP_FSYNC:
	case SIO_OP_FDATASYNC:
	case SIO_OP_POLL:
		break;
	case SIO_OP_NBD_STATUS:
		if (!req->file->nbd || !req->buf || req->mode <= 0)
			return sx_error(-EINVAL, "%s: block status: %s", path,
					!req->file->nbd
						? "not an NBD export"
						: "no room for extents");
		len = req->len;
		break;
	default:
		return sx_error(-EINVAL, "%s: unknown request op %d", path,
				(int)req->op);
	}
	/* off means nothing to FSYNC, FDATASYNC and POLL. */
	if ((is_rw(req) || req->op == SIO_OP_FALLOCATE ||
	     req->op == SIO_OP_NBD_STATUS) &&
	    (sx_add(req->off, len, &end) < 0 || end > INT64_MAX))
		return sx_error(-EOVERFLOW,
				"%s: request of %" PRIu64
				" bytes at offset %" PRIu64 " overflows",
				path, len, req->off);
	*lenp = len;
	return 0;
}

int sio_queue_create(unsigned depth, struct sio_queue **out)
{
	struct sio_queue *q;
	int ret;

	if (!out || depth == 0)
		return sx_error(-EINVAL, "sio_queue_create: bad argument");
	q = calloc(1, sizeof(*q));
	if (!q)
		return sx_error(-ENOMEM, "sio_queue_create: out of memory");
	ret = sio_ring_init(&q->ring, depth, "sio_queue_create");
	if (ret < 0) {
		free(q);
		return ret;
	}
	q->depth = q->ring.sq.ring_entries;
	*out = q;
	return 0;
}

/* Hold req for delay_ns on a timer in the ring, then issue it. */
static void hold(struct sio_queue *q, struct sio_req *req, uint64_t delay_ns)
{
	struct __kernel_timespec ts = {
		.tv_sec = (long long)(delay_ns / 1000000000u),
		.tv_nsec = (long long)(delay_ns % 1000000000u),
	};

	memcpy(req->_iov_tmp, &ts, sizeof(ts));
	req->_done_bytes = QUEUE_HELD;
	enqueue(q, req);
}

/*
 * The completion cqe_data (just seen) was a hold's timer: issue its
 * request now. false when it is an ordinary completion.
 */
static bool hold_over(struct sio_queue *q, void *cqe_data)
{
	struct sio_req *req;

	if (!((uintptr_t)cqe_data & QUEUE_HOLD_TAG))
		return false;
	req = (struct sio_req *)((uintptr_t)cqe_data & ~QUEUE_HOLD_TAG);
	req->_done_bytes = 0;
	sio_fault_release();
	enqueue(q, req);
	return true;
}

int sio_queue_submit(struct sio_queue *q, struct sio_req *req)
{
	uint64_t len = 0, delay = 0;
	int ret;

	if (!q || !req)
		return sx_error(-EINVAL, "sio_queue_submit: NULL argument");
	ret = validate(req, &len);
	if (ret < 0)
		return ret;
	req->_done_bytes = 0;
	req->_next = NULL;
	q->pending++;
	if (is_rw(req)) {
		/* An injected fault completes through the callback. */
		ret = sio_fault_check_delay(req->file, req->op, req->off, len,
					    &delay);
		if (ret < 0 || len == 0) {
			if (delay)
				sio_fault_release();
			finish_now(q, req, ret);
			return 0;
		}
	}
	if (delay)
		hold(q, req, delay);
	else
		enqueue(q, req);
	return 0;
}

/*
 * Judge one completion. Returns true when req is finished (*res is what its
 * callback gets), false when it went back for another round.
 */
static bool complete_one(struct sio_queue *q, struct sio_req *req, int res,
			 int *out)
{
	const struct sio_file *f = req->file;
	uint64_t len, pos;

	if (res == -EAGAIN || res == -EINTR)
		goto again;
	if (res < 0 || !is_rw(req)) {
		*out = res;
		return true;
	}
	len = req_len(req);
	pos = req->_done_bytes + (uint64_t)res;
	if (req->op == SIO_OP_READ) {
		/* A direct read only ends off the grid at end of file. */
		if (res == 0 ||
		    (f->direct && !sx_is_aligned(req->off + pos, f->align))) {
			zero_tail(req, pos, len);
			pos = len;
		}
	} else if (f->direct) {
		/* Rewrite a partial block rather than misalign. */
		pos = sx_align_down(req->off + pos, f->align) - req->off;
	}
	if (pos <= req->_done_bytes) {
		*out = -EIO; /* a write that made no progress */
		return true;
	}
	req->_done_bytes = pos;
	if (pos >= len) {
		*out = (int)len;
		return true;
	}
again:
	enqueue(q, req);
	return false;
}

static void run_callback(struct sio_queue *q, struct sio_req *req, int res)
{
	q->pending--;
	req->_next = NULL;
	req->done(req, res);
}

/* Callbacks of the requests finished without the kernel. */
static unsigned run_finished(struct sio_queue *q)
{
	struct sio_req *req;
	unsigned ran = 0;

	while ((req = list_pop(&q->finished_head, &q->finished_tail))) {
		run_callback(q, req, (int)(int64_t)req->_done_bytes);
		ran++;
	}
	return ran;
}

/* Record a finished request in the write log (io/iolog.h), if one is kept. */
static int log_done(const struct sio_req *req, int res)
{
	int ret = 0;

	if (!sio_iolog_wanted(req->file))
		return res;
	switch (req->op) {
	case SIO_OP_WRITE:
		ret = sio_iolog_write(req->file, req->buf, req->iov,
				      req->iovcnt, req_len(req), req->off);
		break;
	case SIO_OP_FSYNC:
	case SIO_OP_FDATASYNC:
	case SIO_OP_FALLOCATE:
		ret = sio_iolog_op(req->file, (int)req->op, req->mode, req->off,
				   req->len);
		break;
	default:
		break;
	}
	return ret < 0 ? ret : res;
}

/*
 * Reap what the kernel has completed. A finished request that only accepts
 * (every one when only is NULL) gets its callback now; any other keeps its
 * result on the finished list for the next sio_queue_run(). Returns the
 * callbacks run.
 */
static unsigned reap(struct sio_queue *q, bool (*only)(struct sio_req *req))
{
	struct io_uring_cqe *cqe;
	struct sio_req *req;
	unsigned ran = 0;
	int res;

	while (io_uring_peek_cqe(&q->ring, &cqe) == 0) {
		req = io_uring_cqe_get_data(cqe);
		res = cqe->res;
		/* Free the slot first: the callback may submit more. */
		io_uring_cqe_seen(&q->ring, cqe);
		if (nbd_poll_over(q, req, res))
			continue;
		q->in_ring--;
		if (hold_over(q, req))
			continue;
		if (!complete_one(q, req, res, &res))
			continue;
		if (res >= 0)
			res = log_done(req, res);
		if (only && !only(req)) {
			finish_now(q, req, res);
			continue;
		}
		run_callback(q, req, res);
		ran++;
	}
	return ran;
}

int sio_queue_run(struct sio_queue *q, unsigned min_complete)
{
	unsigned ran = 0, want;
	int ret;

	if (!q)
		return sx_error(-EINVAL, "sio_queue_run: NULL queue");
	for (;;) {
		ran += run_finished(q);
		fill_ring(q);
		nbd_arm_all(q);
		want = 0;
		/*
		 * Only wait for what is in the ring: each gives one CQE, and
		 * so does (at least) one armed poll while NBD reads wait.
		 */
		if (ran < min_complete)
			want = (unsigned)sx_min(
				min_complete - ran,
				q->in_ring +
					(q->nbd_busy && q->nbd_polls ? 1 : 0));
		ret = io_uring_submit_and_wait(&q->ring, want);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN &&
		    ret != -EBUSY && ret != -ETIME)
			return sx_error(ret, "io_uring_submit_and_wait: %s",
					strerror(-ret));
		ran += reap(q, NULL);
		if (ran >= min_complete && !q->finished_head)
			break;
		if (ran < min_complete && !q->finished_head && !q->in_ring &&
		    !q->backlog_head && !q->nbd_busy)
			break; /* nothing left that could complete */
	}
	/* Hand over what the callbacks queued without waiting for it. */
	fill_ring(q);
	nbd_arm_all(q);
	ret = io_uring_submit(&q->ring);
	if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
		return sx_error(ret, "io_uring_submit: %s", strerror(-ret));
	return (int)sx_min(ran, INT_MAX);
}

/* Unlink and return the first finished request that `only` accepts. */
static struct sio_req *pop_finished_only(struct sio_queue *q,
					 bool (*only)(struct sio_req *req))
{
	struct sio_req **pp = &q->finished_head, *prev = NULL, *req;

	for (req = *pp; req; prev = req, pp = &req->_next, req = *pp) {
		if (!only(req))
			continue;
		*pp = req->_next;
		if (q->finished_tail == req)
			q->finished_tail = prev;
		req->_next = NULL;
		return req;
	}
	return NULL;
}

int sio_queue_run_only(struct sio_queue *q, bool (*only)(struct sio_req *req),
		       bool (*busy)(void *arg), void *arg)
{
	struct sio_req *req;
	int ret;

	if (!q || !only || !busy)
		return sx_error(-EINVAL, "sio_queue_run_only: NULL argument");
	while (busy(arg)) {
		req = pop_finished_only(q, only);
		if (req) {
			run_callback(q, req, (int)(int64_t)req->_done_bytes);
			continue;
		}
		fill_ring(q);
		nbd_arm_all(q);
		if (!q->in_ring && !q->nbd_busy)
			return -EAGAIN; /* nothing in flight could end it */
		ret = io_uring_submit_and_wait(&q->ring, 1);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN &&
		    ret != -EBUSY && ret != -ETIME)
			return sx_error(ret, "io_uring_submit_and_wait: %s",
					strerror(-ret));
		reap(q, only);
	}
	ret = io_uring_submit(&q->ring);
	if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
		return sx_error(ret, "io_uring_submit: %s", strerror(-ret));
	return 0;
}

unsigned sio_queue_inflight(const struct sio_queue *q)
{
	return q ? q->pending : 0;
}

void sio_queue_destroy(struct sio_queue *q)
{
	struct queue_nbd *l;
	unsigned errors = 0;

	if (!q)
		return;
	/*
	 * Giving up early would free memory the kernel may still write, so
	 * only a ring that keeps failing is abandoned.
	 */
	while (q->pending && errors < 1000) {
		if (sio_queue_run(q, q->pending) < 0)
			errors++;
	}
	io_uring_queue_exit(&q->ring);
	while ((l = q->nbd)) {
		q->nbd = l->next;
		sio_nbd_conn_close(l->conn);
		free(l);
	}
	free(q);
}
