/*
 * The metadata I/O port: how a format driver submits its metadata I/O (a
 * read, a write, a batch of writes, an fdatasync) with a completion
 * callback, so that the same driver code runs synchronously (tools, open,
 * close: img_port_sync()) or on an engine's sio_queue, completing from that
 * queue's sio_queue_run() on the owner's thread (img_port_queue_create()).
 *
 * Contract of submit(): 0 means op->done(op, res) will be called exactly
 * once, possibly before submit() returns (the synchronous port always does
 * so); -errno means the op was not started and done is not called. res is
 * 0 on success or -errno. The op and every buffer it names belong to the
 * port until done runs. Ops of one batch target distinct ranges.
 *
 * A port has no alignment demands: the queue port reads and writes
 * unaligned ranges of a direct file by read-modify-write of the covering
 * blocks (one unaligned unit at a time, so two units of a batch never
 * race on a shared block). The caller must not write those blocks from
 * elsewhere meanwhile, as with sio_pwrite().
 *
 * Fault injection and the write log (io/) apply to both ports, since both
 * end in io/'s requests.
 */
#ifndef SIPHON_FORMATS_PORT_H
#define SIPHON_FORMATS_PORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/io.h"

enum img_port_kind {
	IMG_PORT_READ = 1,
	IMG_PORT_WRITE,
	IMG_PORT_WRITEV, /* vec[0..n): independent writes, in flight together */
	IMG_PORT_FDATASYNC,
	IMG_PORT_FALLOCATE, /* allocate [off, off + len), mode 0 */
};

struct img_port_op;
typedef void (*img_port_done_fn)(struct img_port_op *op, int res);

struct img_port_op {
	enum img_port_kind kind;
	struct sio_file *file;
	void *buf; /* READ, WRITE */
	uint64_t len;
	uint64_t off;
	const struct sio_wvec *vec; /* WRITEV */
	unsigned n;
	img_port_done_fn done;
	void *opaque; /* the submitter's */
	void *_port; /* private to the port */
};

struct img_port {
	/* Required. See the contract above. */
	int (*submit)(struct img_port *port, struct img_port_op *op);
	/*
	 * Optional. Run completions of this port's ops only (nobody else's
	 * callbacks) until busy(arg) is false. -EAGAIN when the port cannot
	 * (not its owner's thread, nothing in flight that could end it).
	 * What a synchronous caller uses when it must wait for work that an
	 * asynchronous one has in flight on the port.
	 */
	int (*wait)(struct img_port *port, bool (*busy)(void *arg), void *arg);
	void *priv;
};

/* The synchronous port (per-thread sync ring of io/); never NULL. */
struct img_port *img_port_sync(void);

/*
 * A port on q: ops become sio_reqs on q, completed from sio_queue_run() on
 * q's thread. q must outlive the port; destroy the port only when none of
 * its ops is in flight.
 */
int img_port_queue_create(struct sio_queue *q, struct img_port **out);
void img_port_queue_destroy(struct img_port *port);

#endif
