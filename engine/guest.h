/*
 * Guest I/O on one disk: reads, writes, flush, discard, write-zeroes and
 * block status of a top image and its backing chain, served on the disk's
 * worker thread next to the stream engine (engine/stream.c), with
 * copy-on-read.
 *
 * Requests come in with guest_submit() and finish with their complete()
 * callback, called on the worker thread, from guest_submit() itself or from
 * a completion of the worker's sio_queue. The engine never waits for I/O:
 * reads of data and in-place writes of allocated clusters go through the
 * queue, compressed clusters through the disk's inflater, copy-on-read and
 * writes into clusters the top lacks entirely through the copy pipeline
 * (copy.h). Discard and write-zeroes have the driver bring their metadata
 * in on the disk's port first (the request parks meanwhile), then change
 * it in memory; flush (and FUA) runs an fdatasync on the queue and the
 * driver's flush on the port, by continuation; the partial clusters at
 * the edges of a write-zeroes are writes of zeros. Still synchronous:
 * writes into zero, compressed or partly allocated (subcluster) clusters
 * of the top (the driver's copy-on-write), and whatever metadata the cache
 * could not keep for the operation (it then does the I/O itself, correct
 * but waiting).
 *
 * Safety next to a stream: the engine owns the disk's cluster locks
 * (cluster_lock.h) and hands the stream its lock hooks (guest_stream_lock,
 * guest_stream_unlock). A guest write, discard or write-zeroes whose
 * clusters are locked waits in a FIFO and starts when the locks drop (the
 * owner calls guest_kick()); copy-on-read only takes free clusters and
 * otherwise leaves the read plain.
 *
 * Threads: everything here runs on the worker thread.
 */
#ifndef SIPHON_ENGINE_GUEST_H
#define SIPHON_ENGINE_GUEST_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

struct copier;
struct img;
struct sio_queue;

enum guest_op {
	GUEST_READ = 1,
	GUEST_WRITE,
	GUEST_FLUSH,
	GUEST_DISCARD,
	GUEST_WRITE_ZEROES,
	GUEST_STATUS, /* what a reader of [off, off + len) gets, as extents */
};

/* A run of a GUEST_STATUS answer. */
enum guest_ext_flags {
	GUEST_EXT_HOLE = 1 << 0, /* no layer stores data here */
	GUEST_EXT_ZERO = 1 << 1, /* reads as zeros */
};

struct guest_extent {
	uint64_t len;
	unsigned flags; /* enum guest_ext_flags */
};

enum guest_flags {
	GUEST_F_FUA = 1 << 0, /* durable (flushed) before completion */
	GUEST_F_NO_COR = 1 << 1, /* this read never copies */
	GUEST_F_FAST_ZERO = 1 << 2, /* write-zeroes: metadata only, or
				       -ENOTSUP with nothing done */
};

struct guest_req {
	enum guest_op op;
	unsigned flags; /* enum guest_flags */
	const struct iovec *iov; /* READ, WRITE: len bytes in all */
	int iovcnt;
	uint64_t off; /* 512-aligned */
	uint64_t len; /* 512-aligned or up to the end of the image */
	/*
	 * STATUS: room for ext_max extents; on completion ext_n of them (at
	 * least one unless ret < 0), adjacent ones with different flags,
	 * covering [off, off + their lengths) within the range.
	 */
	struct guest_extent *ext;
	unsigned ext_max;
	unsigned ext_n;
	/* Called once on the worker thread; ret 0 or -errno. */
	void (*complete)(struct guest_req *req, int ret);
	void *priv;
	struct guest_req *next; /* free for the owner until submitted */
};

struct guest_stats {
	uint64_t cor_bytes; /* copied into the top by copy-on-read */
	uint64_t cor_skipped; /* reads that could not copy (busy, error) */
	uint64_t waits; /* requests that waited for a lock */
	uint64_t meta_fetches; /* metadata reads a parked request waited for */
};

struct guest;

/*
 * Guest I/O on top, on the worker's queue q, with the disk's copy pipeline
 * (guest_copier()). -ENOMEM, -EINVAL with a message.
 */
int guest_create(struct img *top, struct sio_queue *q, struct guest **out);

/* Free; the owner has drained everything (guest_idle()). NULL ok. */
void guest_destroy(struct guest *g);

/* Start (or queue) a request. Its complete() runs exactly once. */
void guest_submit(struct guest *g, struct guest_req *req);

/*
 * Copy-on-read for the next reads. With may_yield (a stream runs and will
 * copy the clusters anyway) copies are skipped while the guest keeps a deep
 * queue; without it every read of clusters the top lacks copies them.
 */
void guest_set_cor(struct guest *g, bool on, bool may_yield);

/*
 * Hold new requests (queued, not started) while hold is true, e.g. while
 * the owner swaps the backing chain; guest_kick() starts them once false.
 */
void guest_hold(struct guest *g, bool hold);

/* Start waiting requests whose locks dropped. Cheap when nothing did. */
void guest_kick(struct guest *g);

/* Requests started and not completed, copy-on-read work included. */
unsigned guest_inflight(const struct guest *g);

/* Nothing in flight and nothing waiting. */
bool guest_idle(const struct guest *g);

/* Guest requests were seen within the last recent_ns (or are in flight). */
bool guest_busy(const struct guest *g, uint64_t recent_ns);

void guest_get_stats(const struct guest *g, struct guest_stats *st);

/*
 * The disk's copy pipeline (copy.h), owned by g: for struct stream_opts, so
 * that the stream and guest I/O share one inflater. Valid until
 * guest_destroy().
 */
struct copier *guest_copier(struct guest *g);

/* Lock hooks for struct stream_opts (opaque: the struct guest). */
int guest_stream_lock(void *opaque, uint64_t off, uint64_t len, void **token);
void guest_stream_unlock(void *opaque, void *token);

#endif
