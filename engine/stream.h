/*
 * The stream engine: pull every cluster the top image does not hold from its
 * backing chain (down to `base`) into the top image, then drop the backing
 * reference (or point it at `base`).
 *
 * The engine is a state machine driven by its owner's thread: stream_pump()
 * plans and submits work on the owner's sio_queue without ever waiting, the
 * completions run from the owner's sio_queue_run(), and stream_finish()
 * flushes and, when the cursor has reached the end, finalizes the header.
 * stream_run() is that loop for owners with nothing else to do (the tool,
 * incremental calls).
 *
 * The cursor is a cluster index of the top image: every cluster below
 * `cur` is local (or needs nothing), `end` is the number of clusters.
 *
 * Crash safety comes from the copy pipeline (copy.h) and the driver's
 * contract (format.h): data is written into freshly allocated host clusters
 * and linked only by commit_run, whose L2 updates reach the disk after the
 * data does. At any instant the image reads the same as the chain did.
 *
 * Guest I/O: an owner that also serves guest requests passes lock hooks;
 * every extent holds a lock on its cluster range from before its reads until
 * its commit, and a synchronous fill (zero or partial clusters) checks the
 * range is free first. When a range is busy the planner stops there until
 * the next pump. commit_run links only clusters still unallocated, so a
 * guest write that got in first always stays.
 *
 * Threads: everything runs on the owner's thread, except
 * stream_request_abort(), stream_set_speed() and stream_get_progress(),
 * which may be called from any thread.
 */
#ifndef SIPHON_ENGINE_STREAM_H
#define SIPHON_ENGINE_STREAM_H

#include <stdbool.h>
#include <stdint.h>

struct copier;
struct extent_pool;
struct img;
struct sio_queue;

struct stream_progress {
	uint64_t cur; /* clusters below cur are local */
	uint64_t end; /* number of clusters of the top image */
	uint64_t bytes_copied; /* data read from the chain and written */
	uint64_t bytes_skipped; /* already local in the top */
	uint64_t bytes_zero; /* read as zero: not written as data */
	uint64_t rate; /* bytes copied per second, recent */
	bool finalized; /* backing dropped (or set to base) */
	/* What the pipeline does now (the in-flight controller, copier). */
	uint64_t inflight_bytes; /* extents in flight, bytes */
	uint64_t window_bytes; /* the controller's target in flight */
	uint64_t request_bytes; /* the extent size chosen */
	uint64_t device_rate; /* bytes/s the controller last measured */
	uint64_t latency_us; /* mean extent latency it last measured */
	uint64_t read_request_bytes; /* mean read request sent, so far */
	uint64_t write_request_bytes; /* mean write request sent, so far */
};

/* What a stream does when its own I/O fails (stream_opts.on_error). */
enum stream_on_error {
	STREAM_ON_ERROR_STOP = 0, /* it fails: stream_finish() says why */
	/*
	 * On -ENOSPC, -EDQUOT or -EIO it pauses (stream_paused()) until
	 * stream_resume(); any other error fails it as STOP does.
	 */
	STREAM_ON_ERROR_PAUSE = 1,
};

struct stream_opts {
	struct img *top; /* opened read-write, with its chain */
	struct img *base; /* a layer of top's chain, or NULL: everything */
	struct sio_queue *q; /* the owner's queue */
	/*
	 * Overrides of the in-flight controller (inflight.h): a fixed number
	 * of extents in flight and a fixed extent size; 0: the controller
	 * finds them from what the device delivers.
	 */
	unsigned max_inflight;
	uint64_t extent_bytes;
	uint64_t speed; /* bytes/s copied, 0 = unlimited */
	uint64_t flush_bytes; /* commit metadata every this many bytes */
	/*
	 * Called by stream_run() on the owner's thread about every
	 * progress_ms (0: 500 ms) and once at the end. Optional.
	 */
	void (*progress)(void *opaque, const struct stream_progress *p);
	void *progress_opaque;
	unsigned progress_ms;
	/*
	 * Optional cluster range locks (both or neither), called on the
	 * owner's thread. lock() returns 0 and a token, or -EBUSY when the
	 * range is in use (-ENOMEM fails the stream); unlock() releases it.
	 */
	int (*lock)(void *opaque, uint64_t off, uint64_t len, void **token);
	void (*unlock)(void *opaque, void *token);
	void *lock_opaque;
	/*
	 * Optional: the disk's copy pipeline (copy.h), shared with guest
	 * I/O (one inflater per disk); it must serve top on q (-EINVAL).
	 * NULL: the stream makes its own.
	 */
	struct copier *copier;
	/*
	 * Optional: where the extent buffers come from (extent_pool.h), shared
	 * with the other streams of the owner's loop; it belongs to the
	 * owner's thread. A stream that gets no buffer plans later (it never
	 * fails for that). NULL: a pool of its own, of max_inflight buffers
	 * of extent_bytes when both are fixed, else of
	 * EXTENT_POOL_DEFAULT_BUDGET. The controller keeps at most the
	 * pool's budget in flight.
	 */
	struct extent_pool *pool;
	int on_error; /* enum stream_on_error */
};

#define STREAM_DEFAULT_FLUSH (256ull * 1024 * 1024)

struct stream;

/*
 * A stream over o->top from cluster 0. Checks that base is in top's chain
 * (-EINVAL otherwise) and that top is writable (-EROFS).
 */
int stream_create(const struct stream_opts *o, struct stream **out);

/* Free. The caller has drained the queue (stream_inflight() == 0). */
void stream_destroy(struct stream *s);

/* Move the cursor (cluster index <= end); only while nothing is in flight. */
int stream_seek(struct stream *s, uint64_t cur);

/*
 * Plan and submit work: at most max_inflight extents, within the speed
 * limit, and not past `limit` (a cluster index; the increment's end). Never
 * waits for I/O, but flushes the top (synchronously) every flush_bytes
 * copied. Returns 0, or the stream's error once it has failed.
 * *wait_ns: when throttled with nothing in flight, how long to sleep before
 * pumping again (0 otherwise). When the pool has no buffer for it now the
 * planner stops there and keeps its turn in the pool's queue (pump again
 * after the owner's queue completes something); a pump that does not stop
 * for a buffer leaves the queue.
 */
int stream_pump(struct stream *s, uint64_t limit, uint64_t *wait_ns);

/*
 * Lower the load while the owner has other work (guest I/O): at most
 * max_inflight extents of at most extent_bytes, whatever the controller
 * says (it neither measures nor steers meanwhile); both 0 give the
 * stream back to its controller. Takes effect for the next extents.
 * Owner only.
 */
void stream_set_limits(struct stream *s, unsigned max_inflight,
		       uint64_t extent_bytes);

/*
 * Bound the bytes the planner may still copy (0: no bound), for owners that
 * drive an increment with stream_pump() themselves; stream_run() sets it.
 */
void stream_set_budget(struct stream *s, uint64_t max_bytes);

/* The last pump stopped at a range locked by someone else. */
bool stream_blocked(const struct stream *s);

/* Extents submitted whose work has not finished. */
unsigned stream_inflight(const struct stream *s);

/* True when the planner has passed `limit` or end, or was aborted/failed. */
bool stream_planned(const struct stream *s, uint64_t limit);

/*
 * With nothing in flight: flush the top and, when the cursor is at end and
 * the stream did not fail, finalize (rewrite the backing reference, flush).
 * Returns 0, or -errno (the stream's first error wins).
 */
int stream_finish(struct stream *s);

/*
 * Pump and complete until the cursor reaches `limit` (or end), the stream is
 * aborted, or fails; then stream_finish(). Returns 0 when done or limit
 * reached, -ECANCELED when aborted, -errno on failure.
 * max_bytes bounds the bytes copied in this call (0: no bound).
 */
int stream_run(struct stream *s, uint64_t limit, uint64_t max_bytes);

/*
 * Pause (STREAM_ON_ERROR_PAUSE): the stream stopped on an error that may
 * go away (no space, quota, an I/O error), like a failure: planning
 * stopped at the first error, the extents in flight completed (those that
 * failed gave back their clusters, those that succeeded stay committed),
 * and then one best-effort flush ran, so that what was copied reaches the
 * disk if the device lets it. From then on, and not before (nothing is
 * in flight), stream_paused() returns the error (-errno) and *msg (may be
 * NULL) points at its message, valid until stream_resume(); 0 otherwise
 * (running, failed for good, aborted). stream_pump() keeps returning the
 * error meanwhile, and stream_finish() too. Owner only.
 */
int stream_paused(const struct stream *s, const char **msg);

/*
 * Go on after a pause: the error is forgotten and the planner starts again
 * at the cursor (the first cluster not known to be local), so the failed
 * extents are copied again and what completed after them is found local
 * and skipped. Also for a stream aborted while it paused (stream_paused()
 * is 0 then): its error is forgotten, so stream_finish() flushes and it
 * ends as aborted. Returns 0, or -EINVAL when the stream holds no error it
 * pauses on, or has work in flight. Owner only.
 */
int stream_resume(struct stream *s);

/* Ask the stream to stop; in-flight work completes. Any thread. */
void stream_request_abort(struct stream *s);

/* Change the speed limit (bytes/s, 0 = unlimited). Any thread. */
void stream_set_speed(struct stream *s, uint64_t speed);

/* A snapshot of the progress counters. Any thread. */
void stream_get_progress(struct stream *s, struct stream_progress *p);

#endif
