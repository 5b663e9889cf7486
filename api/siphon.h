/*
 * siphon — stream disk images from their backing chain into the local image.
 *
 * Public API. Every function returns int: >= 0 on success, -errno on
 * failure, and leaves its outputs untouched on failure. A failing call also
 * records a message for the calling thread, read with siphon_get_error().
 *
 * The model: a domain (siphon_domain, one per VMM or tool) holds disks,
 * attached by the absolute path of their top image, which is also their
 * name. Each attached disk is assigned to one of the domain's worker
 * threads (a fixed pool, see siphon_domain_opts.workers), which owns all of
 * its I/O for its whole life; API calls may come from any thread and are
 * handed to that worker. A worker runs many disks; streams of its disks
 * share it in turn.
 *
 * A disk streams in one of two modes (the block-streaming proposal):
 *  - CONTINUOUS: the whole disk, in the background, until done, aborted or
 *    failed; the end is announced by an event (callback or event fd).
 *  - incremental: each siphon_block_stream() call without the flag moves an
 *    opaque cursor by a bounded step; the call that brings the cursor to its
 *    end finalizes the disk (the backing reference is dropped, or set to the
 *    base) exactly as CONTINUOUS does.
 *
 * Cursors are opaque 64-bit values. 0 means "open a new incremental stream";
 * every other cursor belongs to one stream of one disk, and a cursor from
 * another disk or stream is refused with -EINVAL. cur / end (as reported by
 * siphon_get_block_stream_info) approximates the fraction done.
 *
 * Structs that cross the API start with a `size` member that the caller sets
 * to sizeof(the struct it was compiled with); they only grow at the end.
 */
#ifndef SIPHON_H
#define SIPHON_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define SIPHON_API __attribute__((visibility("default")))
#else
#define SIPHON_API
#endif

#define SIPHON_VERSION_MAJOR 0
#define SIPHON_VERSION_MINOR 1
#define SIPHON_VERSION_PATCH 0

/* Longest disk path, terminating NUL included (the proposal's PATH_MAX). */
#define SIPHON_PATH_MAX 1024

/* Longest error message carried in events and extended info, NUL included. */
#define SIPHON_MESSAGE_MAX 256

/* Defaults of an incremental step (struct siphon_block_stream_params). */
#define SIPHON_STREAM_DEFAULT_MAX_BYTES (64ull * 1024 * 1024)
#define SIPHON_STREAM_DEFAULT_MAX_CLUSTERS 65536ull

/*
 * The library's version as MAJOR * 10000 + MINOR * 100 + PATCH. Thread safe.
 */
SIPHON_API int siphon_version(void);

/*
 * The message recorded by the last failing siphon call on this thread ("" if
 * none). The pointer is valid until the next siphon call on this thread.
 * Thread safe: each thread has its own message.
 */
SIPHON_API const char *siphon_get_error(void);

/* ------------------------------------------------------------------------
 * Domains and events
 */

typedef struct siphon_domain siphon_domain;

enum siphon_event_kind {
	SIPHON_EVENT_STREAM_COMPLETED = 1, /* finalized: backing dropped */
	SIPHON_EVENT_STREAM_CANCELLED = 2, /* aborted (abort, detach, close) */
	SIPHON_EVENT_STREAM_FAILED = 3, /* stopped by an error */
	/*
	 * Since 0.1.4: paused by an error (on_error SIPHON_ON_ERROR_PAUSE);
	 * not an end: the stream is still there, and resumes with
	 * siphon_block_stream_resume(). Only streams started with that
	 * option send it.
	 */
	SIPHON_EVENT_STREAM_PAUSED = 4,
};

/*
 * A stream ended: one event per stream, CONTINUOUS or incremental. A stream
 * with on_error SIPHON_ON_ERROR_PAUSE also sends a PAUSED event each time it
 * pauses, before its one end event.
 */
struct siphon_event {
	size_t size; /* caller: sizeof(struct siphon_event) */
	int kind; /* enum siphon_event_kind */
	int error; /* positive errno; 0 when completed */
	char path[SIPHON_PATH_MAX]; /* the disk */
	/* why it failed or paused (naming the image and offset), or "" */
	char message[SIPHON_MESSAGE_MAX];
	uint64_t bytes_copied; /* by the whole stream */
};

/*
 * Event callback. Called on the domain's event thread (one per domain with a
 * callback, never a disk's worker), one event at a time, with no siphon lock
 * held: it may call any siphon function except siphon_domain_close() on its
 * own domain (-EDEADLK). ev is valid only during the call.
 */
typedef void (*siphon_event_fn)(siphon_domain *dom,
				const struct siphon_event *ev, void *opaque);

struct siphon_domain_opts {
	size_t size; /* sizeof(struct siphon_domain_opts) */
	siphon_event_fn event_cb; /* NULL: events are queued for the event fd */
	void *event_opaque; /* passed to event_cb */
	unsigned queue_depth; /* per-disk I/O queue depth, 0: default */
	/*
	 * Worker threads that run the domain's disks (each disk stays on one
	 * for its life), 0: the number of online CPUs. At most
	 * SIPHON_MAX_WORKERS (-EINVAL above).
	 */
	unsigned workers;
	/*
	 * Bytes of stream copy buffers per worker, shared by the streams of
	 * its disks in turn (a stream that gets none waits, it never fails
	 * for that), 0: the default (32 MiB). Guest I/O is not counted.
	 */
	uint64_t stream_buffer_bytes;
};

#define SIPHON_MAX_WORKERS 1024

/*
 * Create a domain. opts may be NULL (defaults: no callback, events queued).
 * With a callback, every event goes to the callback and the event fd never
 * becomes readable; without one, events queue until read with
 * siphon_domain_next_event().
 * Worker threads start as disks are attached (at most opts->workers).
 * Returns 0 and *out. Errors: -EINVAL (out NULL, opts->size too small or
 * larger than this library knows with non-zero unknown bytes, workers above
 * SIPHON_MAX_WORKERS), -ENOMEM, -EMFILE/-ENFILE (no fd for the event fd or
 * a worker's), -EAGAIN (no thread).
 * Ownership: the caller owns *out and frees it with siphon_domain_close().
 * Thread safe.
 */
SIPHON_API int siphon_domain_create(const struct siphon_domain_opts *opts,
				    siphon_domain **out);

/*
 * Abort every running stream (cleanly: in-flight work completes, images are
 * flushed and consistent), wait for them, deliver the remaining events to
 * the callback if there is one, detach every disk and free the domain. NULL
 * is a no-op. Must not race with other calls on the same domain; must not be
 * called from the domain's event callback (it returns without closing).
 */
SIPHON_API void siphon_domain_close(siphon_domain *dom);

/*
 * A file descriptor that polls readable (POLLIN) while events are queued.
 * Returns the fd (>= 0). Errors: -EINVAL (dom NULL). Ownership: the domain
 * owns the fd; do not read or close it. Thread safe.
 */
SIPHON_API int siphon_domain_event_fd(siphon_domain *dom);

/*
 * Take the oldest queued event into *ev (ev->size set by the caller; at
 * most ev->size bytes are written). Returns 1 when an event was stored, 0
 * when none is queued. Errors: -EINVAL (dom or ev NULL, ev->size smaller
 * than the first version of the struct). Thread safe.
 */
SIPHON_API int siphon_domain_next_event(siphon_domain *dom,
					struct siphon_event *ev);

/* ------------------------------------------------------------------------
 * Disks
 */

enum siphon_attach_flags {
	SIPHON_ATTACH_BUFFERED = 1 << 0, /* never O_DIRECT */
	SIPHON_ATTACH_MASK = (1 << 1) - 1,
};

/*
 * Backing layers on an NBD server (nbd://, nbd+unix://, json:{...} backing
 * names). A connection that drops is connected again, with a backoff, for
 * up to the reconnect window; meanwhile the stream pauses and guest reads
 * wait. Past it their reads fail with -EIO and a stream ends FAILED. A
 * read unanswered for the request timeout counts as a dropped connection.
 * Each worker reading the disk opens up to nbd_connections connections to
 * a server that allows multi-conn (one otherwise).
 */
#define SIPHON_NBD_DEFAULT_RECONNECT_MS 10000u
#define SIPHON_NBD_DEFAULT_TIMEOUT_MS 30000u
#define SIPHON_NBD_DEFAULT_CONNECTIONS 4u
#define SIPHON_NBD_MAX_CONNECTIONS 16u
#define SIPHON_NBD_OFF 0xffffffffu /* no reconnect window, no timeout */

struct siphon_attach_opts {
	size_t size; /* sizeof(struct siphon_attach_opts) */
	const char *format; /* "qcow2", "raw", or NULL: probe */
	unsigned flags; /* enum siphon_attach_flags */
	/*
	 * This disk's NBD layers (above), 0 for the default of each; the
	 * window and the timeout in ms, or SIPHON_NBD_OFF. At most
	 * SIPHON_NBD_MAX_CONNECTIONS connections (-EINVAL above).
	 */
	unsigned nbd_reconnect_ms;
	unsigned nbd_timeout_ms;
	unsigned nbd_connections;
};

/*
 * Attach the image at path: the top is opened read-write (and locked against
 * other writers), its backing chain read-only, and the disk's worker thread
 * started. path must be absolute and shorter than SIPHON_PATH_MAX; the exact
 * string is the disk's name in every later call. opts may be NULL.
 * Returns 0. Errors: -EINVAL (NULL, relative path, bad opts, unknown flags),
 * -ENAMETOOLONG, -EEXIST (a disk of that name is attached), -ENOENT (a file
 * of the chain is missing), -ELOOP, -ENOTSUP, -EACCES, -EROFS, -EBUSY or
 * -EAGAIN (locked by another writer), -ENOMEM, and any error opening the
 * image (the message names the file). Thread safe.
 */
SIPHON_API int siphon_disk_attach(siphon_domain *dom, const char *path,
				  const struct siphon_attach_opts *opts);

/*
 * Detach the disk: a stream on it is aborted cleanly first (a CANCELLED
 * event follows), then its worker stops and the images are closed. flags:
 * none yet, must be 0. Returns 0. Errors: -EINVAL (NULL, bad path, flags),
 * -ENAMETOOLONG, -ENOENT (not attached), -EDEADLK (called from the event
 * callback while that disk's stream is being torn down by close). Thread safe.
 */
SIPHON_API int siphon_disk_detach(siphon_domain *dom, const char *path,
				  unsigned flags);

/* ------------------------------------------------------------------------
 * Streaming
 */

enum siphon_stream_flags {
	SIPHON_STREAM_CONTINUOUS = 1 << 0,
	SIPHON_STREAM_MASK = (1 << 1) - 1,
};

/*
 * What a stream does when its own I/O (a copy, its flush: never a guest
 * request) fails (siphon_block_stream_params.on_error).
 */
enum siphon_on_error {
	SIPHON_ON_ERROR_STOP = 0, /* the stream ends FAILED (the default) */
	/*
	 * On ENOSPC, EDQUOT or EIO the stream pauses instead: state
	 * SIPHON_STREAM_PAUSED, a SIPHON_EVENT_STREAM_PAUSED event with the
	 * errno and a message. What it copied stays (the extents that failed
	 * gave back their clusters; the cursor stays at the first cluster
	 * not copied), guest I/O goes on being served, and the stream waits
	 * for siphon_block_stream_resume() or an abort. Other errors end it
	 * FAILED as with STOP.
	 */
	SIPHON_ON_ERROR_PAUSE = 1,
};

struct siphon_block_stream_params {
	size_t size; /* sizeof(struct siphon_block_stream_params) */
	const char *base; /* stream down to this layer of the chain: data
			       above it is copied, the top ends up backed by
			       it. NULL: the whole chain, backing dropped. */
	uint64_t bandwidth; /* bytes/s copied, 0: unlimited */
	uint64_t max_bytes; /* incremental: bytes copied per call (about;
			       one extent more at most), 0: default */
	uint64_t max_clusters; /* incremental: clusters scanned per call,
				  0: default */
	/* Since 0.1.1: fixed pipeline shape (0: the engine's default). */
	unsigned queue_depth; /* copy extents in flight, at most 1024 */
	uint64_t extent_size; /* bytes per copy extent, 512 B .. 64 MiB */
	/* Since 0.1.4: enum siphon_on_error, read when a stream opens. */
	unsigned on_error;
};

/*
 * siphon_block_stream_ex() with default params (whole chain, unlimited).
 */
SIPHON_API int siphon_block_stream(siphon_domain *dom, const char *path,
				   uint64_t *cursor, unsigned flags);

/*
 * Stream the disk at path.
 *
 * With SIPHON_STREAM_CONTINUOUS: start streaming the whole disk on its
 * worker and return at once; cursor may be NULL, otherwise it receives the
 * stream's start cursor. The end comes as an event.
 *
 * Without: one bounded increment. *cursor == 0 opens an incremental stream
 * (the disk shows in siphon_get_block_stream_info from then on, with its
 * end) and sets *cursor to its start, copying nothing. Any other *cursor
 * must come from this stream: one step is copied from there (at most
 * max_bytes copied, max_clusters scanned) and *cursor is set to the new
 * position. The step that reaches the end finalizes the disk; then *cursor
 * equals the end that info reported, and the stream is over (a COMPLETED
 * event is queued). A cursor behind the stream's position rescans from
 * there (cheap: local clusters are skipped). params (may be NULL) are read
 * when a stream opens; bandwidth also on every step.
 *
 * Returns 0. Errors: -EINVAL (NULL dom/path, relative path, unknown flags,
 * bad params->size, incremental with cursor NULL, a cursor of another disk
 * or stream, past the end or ahead of the stream, base not in the chain),
 * -ENAMETOOLONG, -ENOENT (not attached), -EBUSY (a stream already runs on
 * the disk, or an incremental stream is open and *cursor is 0, or an
 * incremental step while a CONTINUOUS stream runs), -ENOTSUP (the top's
 * format cannot be written), -EROFS, -ECANCELED (the incremental stream was
 * aborted during the step), -EFBIG (too many clusters for a cursor), -EIO,
 * -ENOSPC and other I/O errors (the incremental stream then ends as FAILED;
 * with SIPHON_ON_ERROR_PAUSE and ENOSPC, EDQUOT or EIO it stays open,
 * PAUSED, and the step returns that error), -EAGAIN (a step of a paused
 * incremental stream: resume it first).
 * Thread safe; an incremental step blocks the calling thread, not others.
 */
SIPHON_API int
siphon_block_stream_ex(siphon_domain *dom, const char *path, uint64_t *cursor,
		       unsigned flags,
		       const struct siphon_block_stream_params *params);

enum siphon_abort_flags {
	SIPHON_ABORT_ASYNC = 1 << 0, /* return at once; the event follows */
	SIPHON_ABORT_MASK = (1 << 1) - 1,
};

/*
 * Abort the stream of the disk at path (CONTINUOUS, or an open incremental
 * stream). Without SIPHON_ABORT_ASYNC, returns once the stream has stopped
 * and the image is flushed and consistent; with it, at once. A CANCELLED
 * event follows (COMPLETED if the stream finished first). A paused stream
 * is aborted the same way (CANCELLED; should its flush fail again, the
 * event's message says so and the metadata stays for the next flush).
 * Returns 0. Errors: -EINVAL (NULL, bad path, unknown flags),
 * -ENAMETOOLONG, -ENOENT (not attached), -ESRCH (no stream on the disk).
 * Thread safe.
 */
SIPHON_API int siphon_block_stream_abort(siphon_domain *dom, const char *path,
					 unsigned flags);

/*
 * Resume the disk's paused stream (SIPHON_ON_ERROR_PAUSE): it plans again
 * from its cursor, copying what failed and skipping what is local. A
 * CONTINUOUS stream goes on in the background (it may pause again: another
 * PAUSED event); an incremental one takes steps again. flags: none yet,
 * must be 0. Returns 0 once the stream runs again. Errors: -EINVAL (NULL,
 * bad path, flags, or the stream is not paused), -ENAMETOOLONG, -ENOENT
 * (not attached), -ESRCH (no stream on the disk), -ECANCELED (the stream
 * is being aborted). Thread safe.
 */
SIPHON_API int siphon_block_stream_resume(siphon_domain *dom, const char *path,
					  unsigned flags);

/*
 * Change the bandwidth limit of the disk's stream (bytes/s, 0: unlimited),
 * effective for the next extents. flags: must be 0.
 * Returns 0. Errors: -EINVAL, -ENAMETOOLONG, -ENOENT (not attached), -ESRCH
 * (no stream). Thread safe.
 */
SIPHON_API int siphon_block_stream_set_speed(siphon_domain *dom,
					     const char *path, uint64_t bps,
					     unsigned flags);

/* The proposal's info struct. */
struct siphon_block_stream_info {
	char path[SIPHON_PATH_MAX];
	uint64_t cur; /* 0 <= cur <= end; cur/end approximates progress */
	uint64_t end; /* final cursor position: completion */
};

/*
 * Fill info[0 .. min(nr, count)) with the domain's active streams (running
 * or paused CONTINUOUS streams and open incremental ones), in attach order. info may
 * be NULL when nr is 0. flags: must be 0.
 * Returns count, the number of active streams (may exceed nr). Errors:
 * -EINVAL (dom NULL, info NULL with nr > 0, flags). Thread safe: a snapshot.
 */
SIPHON_API int
siphon_get_block_stream_info(siphon_domain *dom,
			     struct siphon_block_stream_info *info, unsigned nr,
			     unsigned flags);

enum siphon_stream_state {
	SIPHON_STREAM_RUNNING = 1, /* CONTINUOUS running, incremental open */
	SIPHON_STREAM_COMPLETED = 2, /* finalized */
	SIPHON_STREAM_CANCELLED = 3,
	SIPHON_STREAM_FAILED = 4,
	/*
	 * Since 0.1.4: paused by an error (SIPHON_ON_ERROR_PAUSE), error and
	 * message say which; active, like RUNNING, until resumed or aborted.
	 */
	SIPHON_STREAM_PAUSED = 5,
};

/*
 * "running", "paused", "completed", "cancelled", "failed" for an enum
 * siphon_stream_state value ("unknown" otherwise): the names the tools and
 * the control socket report. Since 0.1.4.
 */
SIPHON_API const char *siphon_stream_state_name(int state);

enum siphon_info_flags {
	/* Also list the last, ended stream of each disk without one running. */
	SIPHON_INFO_ALL = 1 << 0,
	SIPHON_INFO_MASK = (1 << 1) - 1,
};

struct siphon_block_stream_info_ex {
	size_t size; /* caller: sizeof(the struct) */
	char path[SIPHON_PATH_MAX];
	char base[SIPHON_PATH_MAX]; /* "" when streaming the whole chain */
	int state; /* enum siphon_stream_state */
	unsigned flags; /* SIPHON_STREAM_CONTINUOUS or 0 */
	int error; /* positive errno once FAILED or while PAUSED, else 0 */
	char message[SIPHON_MESSAGE_MAX];
	uint64_t cur; /* cursors, as in the proposal's info */
	uint64_t end;
	uint64_t bytes_copied; /* read from the chain and written */
	uint64_t bytes_skipped; /* already local */
	uint64_t bytes_zero; /* zeros: not written as data */
	uint64_t rate; /* bytes/s copied, recent */
	uint64_t bandwidth; /* the limit, 0: unlimited */
	/* Since 0.1.1: progress in the top's clusters (cur/end decoded). */
	uint64_t clusters_done; /* every cluster below this one is local */
	uint64_t clusters; /* the top's clusters */
	uint64_t cluster_size; /* bytes */
	/*
	 * Since 0.1.2: what the copy pipeline does now. Its depth and
	 * request size are found from what the device delivers (or fixed by
	 * block_stream_params' queue_depth/extent_size); 0 while nothing ran.
	 */
	uint64_t inflight_bytes; /* extents in flight */
	uint64_t window_bytes; /* the target of bytes in flight */
	uint64_t request_bytes; /* the extent size chosen now */
	uint64_t device_rate; /* bytes/s the controller last measured */
	uint64_t latency_us; /* mean extent latency, same measurement */
	uint64_t read_request_bytes; /* mean read request sent, so far */
	uint64_t write_request_bytes; /* mean write request sent, so far */
};

/* The size of the first version of struct siphon_block_stream_info_ex. */
#define SIPHON_BLOCK_STREAM_INFO_EX_V1_SIZE                        \
	(offsetof(struct siphon_block_stream_info_ex, bandwidth) + \
	 sizeof(uint64_t))

/*
 * Like siphon_get_block_stream_info, with more per stream. The array's
 * element size is info[0].size (set by the caller; at least
 * SIPHON_BLOCK_STREAM_INFO_EX_V1_SIZE); each element's size member is set to
 * the bytes written (a caller's older, shorter struct gets its own fields).
 * flags: SIPHON_INFO_ALL adds the ended streams.
 * Returns the number of matching streams (may exceed nr). Errors: -EINVAL
 * (dom NULL, info NULL with nr > 0, info[0].size too small, flags).
 * Thread safe: a snapshot.
 */
SIPHON_API int
siphon_get_block_stream_info_ex(siphon_domain *dom,
				struct siphon_block_stream_info_ex *info,
				unsigned nr, unsigned flags);

/* ------------------------------------------------------------------------
 * Guest I/O
 *
 * A VMM serves its guest's disk through these calls while the disk streams.
 * Requests run on the disk's worker thread, ahead of stream work; while the
 * guest is active the stream keeps little I/O in flight.
 *
 * Semantics: a read returns what the chain shows (the top, else the
 * backing layers); with copy-on-read, clusters the top does not hold are
 * written into it on the way (the read never fails because of the copy).
 * A write lands in the top (partial clusters are completed from the chain).
 * Nothing the guest wrote is ever replaced by a stream's or a copy-on-read's
 * older copy. Write-zeroes makes the range read as zeros. Discard is
 * advisory: the whole clusters in the range read as zeros afterwards (the
 * image's last cluster counts as whole when the range reaches the end);
 * partial clusters at its edges are left as they are. Neither ever makes
 * backing data visible. A flush makes every write completed before it
 * started durable, metadata included.
 *
 * Ranges: off and the length must be multiples of 512 (the length may
 * instead end exactly at the end of the disk), within the disk, the length
 * at most SIPHON_IO_MAX_BYTES; a zero length is a no-op that completes.
 * Buffers need no alignment (misaligned ones are bounced).
 *
 * Overlapping requests in flight at the same time complete in any order;
 * a write, discard or write-zeroes that overlaps an earlier one still
 * waiting for clusters the stream is copying keeps its order behind it.
 */

typedef struct siphon_disk siphon_disk;

/* Largest request, in bytes, and most iovec elements. */
#define SIPHON_IO_MAX_BYTES (64u * 1024 * 1024)
#define SIPHON_IO_MAX_IOV 1024

enum siphon_io_flags {
	SIPHON_IO_FUA = 1 << 0, /* write, write-zeroes: durable when done */
	SIPHON_IO_NO_COR = 1 << 1, /* read: never copy into the top */
	/*
	 * write-zeroes: only as metadata (zero clusters of a qcow2 v3 top,
	 * whole clusters): -ENOTSUP rather than writing zeros, nothing done
	 * (NBD's FAST_ZERO). Since 0.1.3.
	 */
	SIPHON_IO_FAST_ZERO = 1 << 2,
	SIPHON_IO_MASK = (1 << 3) - 1,
};

enum siphon_cor_mode {
	SIPHON_COR_AUTO = 0, /* on while a stream runs or is open (default);
				copies yield to a deep guest queue then, the
				stream copying those clusters instead */
	SIPHON_COR_ON = 1, /* always (while the disk has a backing file); with
			      a stream running, as AUTO */
	SIPHON_COR_OFF = 2, /* never */
};

/*
 * Completion of an asynchronous request: ret is 0 or -errno (-EIO and
 * other I/O errors, -ENOSPC, -ENOMEM, -EROFS, -ENOENT when the disk was
 * being detached). Called exactly once, on the disk's worker thread, with
 * no siphon lock held. It must not block for long (it delays every request
 * of the disk and of the other disks on that worker) and must not call the
 * synchronous guest I/O functions of the same disk, nor of another disk on
 * the same worker thread (-EDEADLK); it may submit new asynchronous
 * requests. To wake an
 * event loop, write to an eventfd of your own from here. When ret < 0,
 * siphon_get_error() called from the callback says why (naming the disk,
 * the request, and what failed below it: a file, an NBD server).
 */
typedef void (*siphon_io_fn)(siphon_disk *disk, int ret, void *opaque);

/*
 * A handle on the attached disk at path, for guest I/O without looking the
 * path up each time. Returns 0 and *out. Errors: -EINVAL (NULL), -ENAMETOOLONG,
 * -ENOENT (not attached). Ownership: release it with siphon_disk_put(),
 * before siphon_domain_close(). After the disk is detached the handle stays
 * valid but every request fails with -ENOENT. Thread safe.
 */
SIPHON_API int siphon_disk_get(siphon_domain *dom, const char *path,
			       siphon_disk **out);

/* Release a handle. NULL is a no-op. Thread safe. */
SIPHON_API void siphon_disk_put(siphon_disk *disk);

/*
 * The disk's virtual size in bytes. Errors: -EINVAL (NULL). Thread safe.
 */
SIPHON_API int siphon_disk_get_size(siphon_disk *disk, uint64_t *size);

/*
 * Copy-on-read mode (enum siphon_cor_mode), for reads that start from now
 * on. Returns 0. Errors: -EINVAL (NULL, unknown mode). Thread safe.
 */
SIPHON_API int siphon_disk_set_copy_on_read(siphon_disk *disk, int mode);

struct siphon_disk_stats {
	size_t size; /* caller: sizeof(struct siphon_disk_stats) */
	uint64_t cor_bytes; /* copied into the top by copy-on-read */
	uint64_t cor_skipped; /* reads that did not copy: busy or error */
	uint64_t lock_waits; /* requests that waited for locked clusters */
	/*
	 * Device round trips the disk's worker thread waited for (a
	 * synchronous read, write, fdatasync or truncate on the worker) on
	 * this disk's behalf outside attach and detach: serving guest
	 * requests and streaming. The engine keeps it at 0: its metadata
	 * I/O goes on the disk's queue. Completions cannot be told apart per
	 * disk, so a wait they take counts for every disk of that worker.
	 */
	uint64_t sync_waits;
	/* The same, while the worker took the disk on at attach. */
	uint64_t sync_waits_attach;
	/*
	 * The same, finalizing completed streams (the chain rewrite,
	 * img_rebase_onto: synchronous) and dropping the old layers.
	 */
	uint64_t sync_waits_finalize;
};

/*
 * Guest I/O counters. stats->size is set by the caller; at most that many
 * bytes are written. Errors: -EINVAL (NULL, size too small), -ENOENT
 * (detached), -EDEADLK (from a completion callback). Thread safe.
 */
SIPHON_API int siphon_disk_get_stats(siphon_disk *disk,
				     struct siphon_disk_stats *stats);

/*
 * Asynchronous guest I/O. Each returns 0 when the request was queued (cb
 * then runs exactly once) or -errno when it was not (cb never runs):
 * -EINVAL (disk or cb NULL, iov NULL with iovcnt > 0, iovcnt negative or
 * above SIPHON_IO_MAX_IOV, unknown flags or flags the operation does not
 * take, misaligned or out-of-range offset or length, length above
 * SIPHON_IO_MAX_BYTES), -ENOMEM, -ENOENT (disk detached).
 * read: SIPHON_IO_NO_COR; write: SIPHON_IO_FUA; write_zeroes: SIPHON_IO_FUA
 * and SIPHON_IO_FAST_ZERO; discard and flush: no flags. Ownership: the iov array is copied; the buffers it
 * points at belong to the caller and must stay valid (and, for reads,
 * untouched) until cb runs. Thread safe: any thread, including a
 * completion callback.
 */
SIPHON_API int siphon_disk_aio_read(siphon_disk *disk, const struct iovec *iov,
				    int iovcnt, uint64_t off, unsigned flags,
				    siphon_io_fn cb, void *opaque);
SIPHON_API int siphon_disk_aio_write(siphon_disk *disk, const struct iovec *iov,
				     int iovcnt, uint64_t off, unsigned flags,
				     siphon_io_fn cb, void *opaque);
SIPHON_API int siphon_disk_aio_flush(siphon_disk *disk, unsigned flags,
				     siphon_io_fn cb, void *opaque);
SIPHON_API int siphon_disk_aio_discard(siphon_disk *disk, uint64_t off,
				       uint64_t len, unsigned flags,
				       siphon_io_fn cb, void *opaque);
SIPHON_API int siphon_disk_aio_write_zeroes(siphon_disk *disk, uint64_t off,
					    uint64_t len, unsigned flags,
					    siphon_io_fn cb, void *opaque);

/*
 * Block status: what a reader of [off, off + len) gets, as runs (struct
 * siphon_extent) from off on, the way an NBD server reports base:allocation.
 * SIPHON_EXTENT_HOLE: no layer of the chain stores data there (unallocated
 * everywhere, a zero cluster, a hole of a raw file); SIPHON_EXTENT_ZERO:
 * reads as zeros. Flags 0: data. The runs are adjacent, each with other
 * flags than the one before; they cover off up to at most off + len, and
 * may stop earlier (when *n runs are found); at least one run unless the
 * request fails. Status is advice, as in NBD: a stream or a guest write
 * may change it the moment after (data stays what it reads as).
 * Ranges as above, but len may exceed SIPHON_IO_MAX_BYTES (up to the end of
 * the disk). flags: none yet, must be 0. *n: room in ext (>= 1) when
 * called; the number of runs stored when cb runs with ret == 0. ext and n
 * belong to the caller and must stay valid until cb runs.
 */
struct siphon_extent {
	uint64_t len;
	uint32_t flags; /* enum siphon_extent_flags */
};

enum siphon_extent_flags {
	SIPHON_EXTENT_HOLE = 1 << 0,
	SIPHON_EXTENT_ZERO = 1 << 1,
};

SIPHON_API int siphon_disk_aio_block_status(siphon_disk *disk, uint64_t off,
					    uint64_t len, unsigned flags,
					    struct siphon_extent *ext,
					    unsigned *n, siphon_io_fn cb,
					    void *opaque);

/*
 * Synchronous guest I/O: the asynchronous call, waited for. Returns 0 or
 * -errno: every error of the asynchronous call and of its completion, and
 * -EDEADLK when called from a completion callback run by the disk's worker
 * thread (its own or another disk's on that worker). Thread
 * safe; blocks the calling thread only.
 */
SIPHON_API int siphon_disk_read(siphon_disk *disk, const struct iovec *iov,
				int iovcnt, uint64_t off, unsigned flags);
SIPHON_API int siphon_disk_write(siphon_disk *disk, const struct iovec *iov,
				 int iovcnt, uint64_t off, unsigned flags);
/* One flat buffer of len bytes. */
SIPHON_API int siphon_disk_pread(siphon_disk *disk, void *buf, size_t len,
				 uint64_t off, unsigned flags);
SIPHON_API int siphon_disk_pwrite(siphon_disk *disk, const void *buf,
				  size_t len, uint64_t off, unsigned flags);
SIPHON_API int siphon_disk_flush(siphon_disk *disk, unsigned flags);
SIPHON_API int siphon_disk_discard(siphon_disk *disk, uint64_t off,
				   uint64_t len, unsigned flags);
SIPHON_API int siphon_disk_write_zeroes(siphon_disk *disk, uint64_t off,
					uint64_t len, unsigned flags);
/* Block status, waited for (*n as above). */
SIPHON_API int siphon_disk_block_status(siphon_disk *disk, uint64_t off,
					uint64_t len, unsigned flags,
					struct siphon_extent *ext, unsigned *n);

#ifdef __cplusplus
}
#endif

#endif
