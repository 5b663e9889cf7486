/*
 * The engine side of one attached disk: its open img chain, its guest I/O
 * engine (engine/guest.c), the stream of its current job with the cluster
 * lock wiring between the two, its scheduler (engine/sched.c) and the chain
 * swap after a stream finalizes.
 *
 * The owner (api/) runs it from one event loop thread (engine/worker.h):
 * each turn it submits guest requests (edisk_guest_submit), then calls
 * edisk_kick() and, when a stream has work, edisk_stream_pump(), then
 * edisk_kick() again, and waits on the loop. Guest requests always go
 * before stream work; the scheduler decides how much stream work goes on
 * the device and when.
 *
 * Finalize swap: when a completed stream is destroyed, new guest requests
 * are held until no guest I/O is in flight, then the layers the stream made
 * unnecessary are closed (img_drop_layers) and the requests released.
 *
 * Threads: edisk_open() and edisk_size() on any thread; everything else on
 * the loop thread the disk was bound to. Only forward declarations here, so
 * api/ does not see formats/ or io/.
 */
#ifndef SIPHON_ENGINE_DISK_H
#define SIPHON_ENGINE_DISK_H

#include <stdbool.h>
#include <stdint.h>

struct edisk;
struct extent_pool;
struct guest_req;
struct guest_stats;
struct sio_queue;
struct stream;

/* How edisk_open() opens a disk's chain. */
struct edisk_opts {
	const char *fmt; /* the top's format, NULL: probe */
	bool buffered; /* never O_DIRECT */
	/*
	 * The chain's NBD layers (io/nbd.h's sio_nbd_opts: 0 for the
	 * process-wide value, SIO_NBD_OFF for off).
	 */
	unsigned nbd_reconnect_ms, nbd_timeout_ms, nbd_connections;
};

/*
 * Open the image at path read-write with its backing chain, as o says (NULL:
 * probe, defaults). -errno with a message.
 */
int edisk_open(const char *path, const struct edisk_opts *o,
	       struct edisk **out);

/* Virtual size in bytes. */
uint64_t edisk_size(const struct edisk *e);

/* The top's cluster size in bytes (any thread, like edisk_size()). */
uint64_t edisk_cluster_size(const struct edisk *e);

/* Loop thread: start the guest engine on the loop's queue. -errno. */
int edisk_bind(struct edisk *e, struct sio_queue *q);

/*
 * Loop thread: the loop's shared pool of extent buffers (extent_pool.h)
 * for the streams created from now on; NULL: each stream has its own.
 */
void edisk_set_extent_pool(struct edisk *e, struct extent_pool *pool);

/*
 * Close the images and free. After edisk_bind() only on the loop thread,
 * with no stream and edisk_idle(). NULL ok.
 */
void edisk_close(struct edisk *e);

/* Start (or queue) a guest request at time now; complete() runs once. */
void edisk_guest_submit(struct edisk *e, struct guest_req *req, uint64_t now);

void edisk_guest_stats(const struct edisk *e, struct guest_stats *st);

/* Copy-on-read mode (SIPHON_COR_*), applied to the next reads. */
void edisk_set_cor_mode(struct edisk *e, int mode);

/* Swap the chain if due and possible; start guest requests that can go. */
void edisk_kick(struct edisk *e);

/* No guest request in flight or waiting, no swap pending. */
bool edisk_idle(const struct edisk *e);

/* What a new stream job asks for (edisk_stream_create). */
struct edisk_stream_params {
	const char *base; /* the file of the chain to stop at, NULL: all */
	uint64_t speed; /* bytes/s, 0: unlimited */
	unsigned queue_depth; /* extents in flight, 0: the engine's */
	uint64_t extent_size; /* bytes per extent, 0: the engine's */
	int on_error; /* enum stream_on_error (stream.h) */
};

/*
 * The stream of a new job over the whole chain, or down to the layer that
 * is the file p->base. -EBUSY if one exists, -EINVAL if base is not in the
 * backing chain. The edisk owns it; the caller may use the engine/stream.h
 * calls on it until edisk_stream_destroy().
 */
int edisk_stream_create(struct edisk *e, const struct edisk_stream_params *p,
			struct stream **out);

/*
 * Free the stream (nothing in flight). completed: it finalized, so drop
 * the layers above its base from the open chain once guest I/O allows.
 */
void edisk_stream_destroy(struct edisk *e, bool completed);

/*
 * One turn of stream work up to cluster limit at time now, as the
 * scheduler allows (aborting: wind down, no pacing). Returns true when
 * nothing is in flight and the planner is done with limit (or aborted or
 * failed): the owner ends the step or the stream. *timer_ns: 0, or when the
 * owner must wake the loop to pump again although nothing completes.
 */
bool edisk_stream_pump(struct edisk *e, uint64_t limit, bool aborting,
		       uint64_t now, uint64_t *timer_ns);

/*
 * stream_finish() on the disk's stream (nothing in flight): the flush is
 * normally done by then (the pump flushes on the queue before it reports
 * the end), what is left is the chain rewrite when the stream reached the
 * end (img_rebase_onto: synchronous, counted in EDISK_FINAL).
 */
int edisk_stream_finish(struct edisk *e);

/*
 * Synchronous device round trips (io/io.h sio_sync_waits()) the worker
 * waited for on this disk's behalf, per phase:
 *  EDISK_ATTACH  edisk_bind() (the open itself runs on the attaching
 *                thread, not the worker);
 *  EDISK_RUN     guest submissions, kicks, stream creation and pumps, and
 *                the waits of the loop's completions (edisk_loop_waits());
 *  EDISK_FINAL   stream_finish (chain rewrite), the swap, stream
 *                destruction, and edisk_close().
 * Each edisk entry point measures the delta of the calling thread's
 * counter around its own work. Completions run from the worker's
 * sio_queue_run() cannot be told apart per disk; the owner measures the
 * delta around its wait and hands it to every disk bound to the worker
 * (edisk_loop_waits()), so a wait is never missed, at worst blamed on a
 * neighbour as well.
 */
enum edisk_phase {
	EDISK_ATTACH,
	EDISK_RUN,
	EDISK_FINAL,
	EDISK_PHASES,
};

/* Add n waits the loop's completions took to the EDISK_RUN phase. */
void edisk_loop_waits(struct edisk *e, uint64_t n);

uint64_t edisk_sync_waits(const struct edisk *e, enum edisk_phase phase);

/*
 * Test-only (tests link the internal library; libsiphon exports siphon_*
 * only): the flush_bytes (engine/stream.h) of streams created from now on,
 * 0: the engine's default. Any thread.
 */
void edisk_test_set_flush_bytes(uint64_t bytes);

#endif
