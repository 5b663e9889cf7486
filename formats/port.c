/*
 * The metadata I/O ports of formats/port.h: the synchronous one (io/'s
 * per-thread sync ring, completing before submit returns) and the one on
 * an engine's sio_queue.
 *
 * Queue port invariants: every op becomes one struct qop holding its
 * sio_reqs; the op's done runs exactly once, after the last of them
 * completed, and the qop is freed before it runs. The units of an op (the
 * buffer of READ/WRITE, each vec entry of WRITEV) go in flight together
 * when every unit is aligned for the file; otherwise one after another,
 * each unaligned unit by read-modify-write of its covering blocks through
 * an aligned bounce buffer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/port.h"

/* ---- synchronous ---- */

static int sync_submit(struct img_port *port, struct img_port_op *op)
{
	int ret;

	(void)port;
	switch (op->kind) {
	case IMG_PORT_READ:
		ret = sio_pread(op->file, op->buf, op->len, op->off);
		break;
	case IMG_PORT_WRITE:
		ret = sio_pwrite(op->file, op->buf, op->len, op->off);
		break;
	case IMG_PORT_WRITEV:
		ret = sio_pwrite_many(op->file, op->vec, op->n);
		break;
	case IMG_PORT_FDATASYNC:
		ret = sio_fdatasync(op->file);
		break;
	case IMG_PORT_FALLOCATE:
		ret = sio_fallocate(op->file, 0, op->off, op->len);
		break;
	default:
		return -EINVAL;
	}
	op->done(op, ret);
	return 0;
}

static struct img_port sync_port = {.submit = sync_submit};

struct img_port *img_port_sync(void)
{
	return &sync_port;
}

/* ---- on a sio_queue ---- */

struct pq {
	struct img_port port;
	struct sio_queue *q;
	pthread_t owner;
};

struct qop {
	struct img_port_op *op;
	struct pq *p;
	unsigned n; /* units */
	unsigned left; /* parallel: requests not completed */
	unsigned next; /* sequential: the unit in flight */
	bool seq;
	bool rmw_write; /* sequential: the write half of a read-modify-write */
	int err;
	uint8_t *bounce;
	uint64_t b_off, b_len;
	struct sio_req reqs[];
};

static void unit(const struct img_port_op *op, unsigned i, void **buf,
		 uint64_t *len, uint64_t *off)
{
	if (op->kind == IMG_PORT_WRITEV) {
		*buf = (void *)op->vec[i].buf;
		*len = op->vec[i].len;
		*off = op->vec[i].off;
		return;
	}
	*buf = op->buf;
	*len = op->len;
	*off = op->off;
}

static bool unit_aligned(const struct sio_file *f, const void *buf,
			 uint64_t len, uint64_t off)
{
	return !f->direct ||
	       (sx_is_aligned(off, f->align) && sx_is_aligned(len, f->align) &&
		sx_is_aligned((uintptr_t)buf, f->mem_align));
}

static void q_done(struct sio_req *req, int res);

static void qop_finish(struct qop *o)
{
	struct img_port_op *op = o->op;
	int err = o->err;

	sio_buf_free(o->bounce);
	free(o);
	op->done(op, err);
}

static int q_send(struct qop *o, struct sio_req *r, enum sio_op kind, void *buf,
		  uint64_t len, uint64_t off)
{
	*r = (struct sio_req){
		.op = kind,
		.file = o->op->file,
		.buf = buf,
		.off = off,
		.len = len,
		.done = q_done,
		.priv = o,
	};
	return sio_queue_submit(o->p->q, r);
}

/*
 * Start unit o->next of a sequential op (or the write half of its
 * read-modify-write). 1: a request is in flight; 0: nothing left; -errno.
 */
static int seq_step(struct qop *o)
{
	struct img_port_op *op = o->op;
	const struct sio_file *f = op->file;
	enum sio_op kind;
	uint64_t len, off, end;
	void *buf;

	if (o->rmw_write)
		return q_send(o, &o->reqs[0], SIO_OP_WRITE, o->bounce, o->b_len,
			      o->b_off)
			       ?: 1;
	if (o->next >= o->n)
		return 0;
	unit(op, o->next, &buf, &len, &off);
	kind = op->kind == IMG_PORT_READ ? SIO_OP_READ : SIO_OP_WRITE;
	if (!len) {
		o->next++;
		return seq_step(o);
	}
	if (unit_aligned(f, buf, len, off))
		return q_send(o, &o->reqs[0], kind, buf, len, off) ?: 1;
	/* Read the covering blocks first, for both reads and writes. */
	o->b_off = sx_align_down(off, f->align);
	if (sx_align_up(off + len, f->align, &end))
		return -EOVERFLOW;
	o->b_len = end - o->b_off;
	sio_buf_free(o->bounce);
	o->bounce = sio_buf_alloc(o->b_len);
	if (!o->bounce)
		return -ENOMEM;
	return q_send(o, &o->reqs[0], SIO_OP_READ, o->bounce, o->b_len,
		      o->b_off)
		       ?: 1;
}

static void seq_done(struct qop *o, int res)
{
	struct img_port_op *op = o->op;
	uint64_t len, off;
	void *buf;
	int ret;

	if (res < 0) {
		o->err = res;
		qop_finish(o);
		return;
	}
	unit(op, o->next, &buf, &len, &off);
	if (o->bounce && !o->rmw_write) {
		/* The covering blocks are in: finish a read, patch a write. */
		if (op->kind == IMG_PORT_READ) {
			memcpy(buf, o->bounce + (off - o->b_off), len);
		} else {
			memcpy(o->bounce + (off - o->b_off), buf, len);
			o->rmw_write = true;
			goto step;
		}
	}
	o->rmw_write = false;
	sio_buf_free(o->bounce);
	o->bounce = NULL;
	o->next++;
step:
	ret = seq_step(o);
	if (ret <= 0) {
		o->err = ret;
		qop_finish(o);
	}
}

static void q_done(struct sio_req *req, int res)
{
	struct qop *o = req->priv;

	if (o->seq) {
		seq_done(o, res < 0 ? res : 0);
		return;
	}
	if (res < 0 && !o->err)
		o->err = res;
	if (--o->left == 0)
		qop_finish(o);
}

static int q_submit(struct img_port *port, struct img_port_op *op)
{
	struct pq *p = port->priv;
	unsigned n = op->kind == IMG_PORT_WRITEV ? op->n : 1, i, sent = 0;
	uint64_t len, off;
	struct qop *o;
	bool seq = false;
	void *buf;
	int ret = 0;

	if (!op->file || !op->done || (op->kind == IMG_PORT_WRITEV && !op->vec))
		return -EINVAL;
	for (i = 0; op->kind != IMG_PORT_FDATASYNC &&
		    op->kind != IMG_PORT_FALLOCATE && i < n && !seq;
	     i++) {
		unit(op, i, &buf, &len, &off);
		seq = !len || !unit_aligned(op->file, buf, len, off);
	}
	o = calloc(1, sizeof(*o) + (seq ? 1 : n) * sizeof(o->reqs[0]));
	if (!o)
		return -ENOMEM;
	o->op = op;
	o->p = p;
	o->n = n;
	o->seq = seq;
	if (seq) {
		ret = seq_step(o);
		if (ret <= 0) {
			free(o);
			if (ret == 0) /* nothing to do */
				op->done(op, 0);
			return ret;
		}
		return 0;
	}
	o->left = n;
	for (i = 0; i < n; i++) {
		if (op->kind == IMG_PORT_FDATASYNC) {
			ret = q_send(o, &o->reqs[i], SIO_OP_FDATASYNC, NULL, 0,
				     0);
		} else if (op->kind == IMG_PORT_FALLOCATE) {
			ret = q_send(o, &o->reqs[i], SIO_OP_FALLOCATE, NULL,
				     op->len, op->off);
		} else {
			unit(op, i, &buf, &len, &off);
			ret = q_send(o, &o->reqs[i],
				     op->kind == IMG_PORT_READ ? SIO_OP_READ
							       : SIO_OP_WRITE,
				     buf, len, off);
		}
		if (ret)
			break;
		sent++;
	}
	if (!sent) {
		free(o);
		return ret;
	}
	if (ret) {
		/* The ones in flight end the op, with this error. */
		o->err = ret;
		o->left -= n - sent;
	}
	return 0;
}

static bool port_done_only(struct sio_req *req)
{
	return req->done == q_done;
}

static int q_wait(struct img_port *port, bool (*busy)(void *arg), void *arg)
{
	struct pq *p = port->priv;

	if (!pthread_equal(p->owner, pthread_self()))
		return -EAGAIN;
	return sio_queue_run_only(p->q, port_done_only, busy, arg);
}

int img_port_queue_create(struct sio_queue *q, struct img_port **out)
{
	struct pq *p;

	if (!q || !out)
		return -EINVAL;
	p = calloc(1, sizeof(*p));
	if (!p)
		return sx_error(-ENOMEM,
				"img_port_queue_create: out of memory");
	p->q = q;
	p->owner = pthread_self();
	p->port.submit = q_submit;
	p->port.wait = q_wait;
	p->port.priv = p;
	*out = &p->port;
	return 0;
}

void img_port_queue_destroy(struct img_port *port)
{
	if (port)
		free(port->priv);
}
