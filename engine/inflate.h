/*
 * Decompressing backing clusters off the owner's thread.
 *
 * A compressed cluster costs a small read and then CPU (inflate or zstd);
 * done on the engine's thread it stalls the pipeline, so the device idles
 * while the CPU works. An inflater is one worker thread that takes jobs from
 * the owner, decompresses, and hands each result back through the owner's
 * sio_queue: a SIO_OP_POLL on an eventfd, armed while jobs are out, wakes
 * sio_queue_run(), and the job's callback then runs on the owner's thread
 * like any I/O completion.
 *
 * The worker only calls layer->drv->read_compressed(), which is safe next
 * to the owner's use of the same read-only layer (the qcow2 driver locks its
 * metadata; the worker has its own synchronous io_uring).
 *
 * Threads: everything but the worker runs on the owner's thread.
 */
#ifndef SIPHON_ENGINE_INFLATE_H
#define SIPHON_ENGINE_INFLATE_H

#include <stdint.h>

struct img;
struct sio_queue;
struct inflater;

/* res: 0 or -errno; msg: the worker's message for a failure, else "". */
typedef void (*inflate_done_fn)(void *opaque, int res, const char *msg);

/* An inflater whose completions arrive on q. -errno with a message. */
int inflater_create(struct sio_queue *q, struct inflater **out);

/*
 * Stop the worker and free. Jobs not started are completed with
 * -ECANCELED. The caller has drained the queue of the poll first (no job
 * outstanding: inflater_outstanding() == 0), or destroys the queue after.
 */
void inflater_destroy(struct inflater *z);

/*
 * Decompress the cluster of `layer` that starts at guest offset
 * cluster_off and copy its bytes [from, from + len) to dst; then
 * done(opaque, res, msg) runs on the owner's thread from sio_queue_run().
 * Returns 0, or -errno (nothing queued).
 */
int inflater_submit(struct inflater *z, struct img *layer, uint64_t cluster_off,
		    uint64_t from, uint64_t len, void *dst,
		    inflate_done_fn done, void *opaque);

/* Jobs submitted whose callback has not run. */
unsigned inflater_outstanding(const struct inflater *z);

#endif
