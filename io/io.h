/*
 * io/ — the only place that does data and metadata I/O, on io_uring.
 *
 * Three pieces:
 *  - sio_file: an open file or block device, opened O_DIRECT where the
 *    filesystem allows it (buffered otherwise, e.g. tmpfs), with the offset
 *    and length alignment that direct I/O demands on it.
 *  - synchronous helpers (sio_pread, sio_pwrite, sio_fsync, ...) for metadata
 *    and tools. They run on a small io_uring private to the calling thread,
 *    created on first use and torn down when the thread exits, so they never
 *    run anybody else's completion callbacks. They accept any offset, length
 *    and buffer: unaligned requests on a direct file go through an aligned
 *    bounce buffer (writes read-modify-write the partial edge blocks, so the
 *    caller must not write the same block from two places at once).
 *  - sio_queue: an asynchronous queue for the bulk data path, one per engine
 *    thread. Requests carry a completion callback that runs from
 *    sio_queue_run() on the owning thread. Async requests must be aligned to
 *    the file's alignment (-EINVAL otherwise).
 *
 * Reads are never short: a short read is resubmitted for the rest, and the
 * part past end of file reads as zeros (images read past EOF as zeros).
 * Writes are never short: the rest is resubmitted; a write that makes no
 * progress fails with -EIO (or the kernel's error, e.g. -ENOSPC).
 *
 * When io_uring cannot be set up (kernel too old, disabled by sysctl
 * kernel.io_uring_disabled, blocked by seccomp), every function fails with
 * the kernel's errno and records a message that says io_uring is unavailable
 * and why; there is no silent fallback.
 *
 * Memory files (sio_mem_create(), for tests) are sio_files whose bytes live
 * in memory and whose synchronous I/O never touches io_uring.
 *
 * NBD exports (sio_nbd_open(), io/nbd.h) are read-only sio_files whose
 * bytes live on an NBD server: the synchronous helpers read them over a
 * connection of their own, a sio_queue over one connection per queue,
 * its socket polled on the queue's ring.
 *
 * Threads: a sio_file may be used from any thread; a sio_queue only from the
 * thread that runs it.
 */
#ifndef SIPHON_IO_IO_H
#define SIPHON_IO_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "io/nbd.h"

/* Alignment of every buffer sio_buf_alloc() returns. */
#define SIO_BUF_ALIGN 4096

enum sio_open_flags {
	SIO_RDONLY = 0,
	SIO_RDWR = 1 << 0,
	SIO_CREATE = 1 << 1, /* create if missing (with SIO_RDWR) */
	SIO_EXCL = 1 << 2, /* with SIO_CREATE: fail if it exists */
	SIO_TRUNC = 1 << 3, /* with SIO_RDWR: truncate to 0 */
	SIO_BUFFERED = 1 << 4, /* never use O_DIRECT */
	SIO_OPEN_MASK = (1 << 5) - 1,
};

struct sio_mem;
struct sio_nbd;

struct sio_file {
	int fd;
	char *path; /* as given to sio_file_open, owned */
	bool direct; /* opened with O_DIRECT */
	bool writable;
	bool is_blockdev;
	uint32_t
		align; /* offset/length alignment for async I/O (1 if buffered) */
	uint32_t mem_align; /* buffer alignment for async I/O (1 if buffered) */
	struct sio_mem *mem; /* a memory file (sio_mem_create), or NULL */
	struct sio_nbd *nbd; /* an NBD export (sio_nbd_open), or NULL */
};

/*
 * Open path. Tries O_DIRECT unless SIO_BUFFERED; falls back to buffered I/O
 * where the filesystem refuses O_DIRECT (EINVAL). Returns 0 and *out, or
 * -errno with a message naming the path.
 */
int sio_file_open(const char *path, unsigned flags, struct sio_file **out);

/* Close and free. NULL is a no-op. */
void sio_file_close(struct sio_file *f);

/*
 * Size in bytes (st_size, the device size for block devices, the export's
 * size for NBD).
 */
int sio_file_size(struct sio_file *f, uint64_t *size);

/* ftruncate (regular files only; -EROFS on NBD exports). */
int sio_file_truncate(struct sio_file *f, uint64_t size);

/* An aligned buffer of len bytes (len rounded up to SIO_BUF_ALIGN), or NULL. */
void *sio_buf_alloc(size_t len);
void sio_buf_free(void *buf);

/*
 * How many times the calling thread has waited for the device in the
 * synchronous helpers below (one per request or batch, truncates
 * included). An engine thread that must never wait for I/O reads it before
 * and after its work to prove it (or to report what still waits).
 */
uint64_t sio_sync_waits(void);

/* Synchronous helpers: 0 on success (never short), -errno on failure. */
int sio_pread(struct sio_file *f, void *buf, size_t len, uint64_t off);
int sio_pwrite(struct sio_file *f, const void *buf, size_t len, uint64_t off);

/* One write of a batch (sio_pwrite_many). */
struct sio_wvec {
	const void *buf;
	size_t len;
	uint64_t off;
};

/*
 * n independent writes to distinct ranges of f, in flight together (one
 * device round trip instead of n). Same contract as sio_pwrite for each;
 * the first error wins and the other writes may or may not have happened.
 */
int sio_pwrite_many(struct sio_file *f, const struct sio_wvec *v, unsigned n);
int sio_fsync(struct sio_file *f);
int sio_fdatasync(struct sio_file *f);
/* fallocate(2) with mode (0, FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE, ...). */
int sio_fallocate(struct sio_file *f, int mode, uint64_t off, uint64_t len);

/*
 * Asynchronous queue.
 */
enum sio_op {
	SIO_OP_READ = 1,
	SIO_OP_WRITE,
	SIO_OP_FSYNC,
	SIO_OP_FDATASYNC,
	SIO_OP_FALLOCATE,
	/*
	 * Wait until file->fd (any pollable fd: eventfd, timerfd, ...) is
	 * readable; res is the revents mask (POLLIN). One shot: submit it
	 * again to wait again. Lets an engine thread that sleeps in
	 * sio_queue_run() also wake for commands or timers.
	 */
	SIO_OP_POLL,
	/*
	 * The allocation of [off, off + len) of an NBD export (sio_nbd_open,
	 * io/nbd.h: base:allocation), asked on one of the queue's
	 * connections like a read: buf has room for `mode` struct
	 * sio_nbd_extent, filled in order from off, neighbours of equal
	 * flags merged; res is how many (they may end before off + len:
	 * ask again from there; 0 at or past the export's end) or -errno
	 * (-EIO also for a reply that describes nothing). A server without
	 * block status answers one extent of data (flags 0) at once, with
	 * no round trip. NBD files only (-EINVAL otherwise).
	 */
	SIO_OP_NBD_STATUS,
};

struct sio_req;
typedef void (*sio_done_fn)(struct sio_req *req, int res);

/*
 * A request, owned by the caller until its callback runs. Fill the public
 * fields, then sio_queue_submit(). res passed to done is 0 (or, for reads and
 * writes, the full length) on success, -errno on failure.
 */
struct sio_req {
	enum sio_op op;
	struct sio_file *file;
	void *buf; /* single buffer, or NULL to use iov */
	const struct iovec *iov;
	int iovcnt;
	uint64_t off;
	/*
	 * Bytes for READ/WRITE/FALLOCATE, at most INT_MAX for READ/WRITE.
	 * With iov: len 0 means the sum of the iov lengths; a smaller len
	 * uses only the first len bytes; a larger one is -EINVAL.
	 */
	uint64_t len;
	int mode; /* FALLOCATE mode; NBD_STATUS: extents buf holds */
	sio_done_fn done;
	void *priv; /* caller's */

	/* private to io/ */
	uint64_t _done_bytes;
	struct sio_req *_next;
	struct iovec _iov_tmp[1];
	/* NBD reads (io/nbd.c): _done_bytes counts the bytes asked for */
	struct {
		void *conn; /* the connection that has it */
		uint64_t end; /* bytes read from the server (past: zeros) */
		uint32_t parts; /* reads in flight for it */
		int err; /* first error, -errno */
		const char *msg; /* why it failed (the connection's), or NULL */
		void *walk; /* NBD_STATUS: the answer being collected */
	} _nbd;
};

/*
 * Why the request req failed, when io/ knows more than its errno (an NBD
 * read: the server, and the connection lost or given up), or NULL. Valid
 * in req's callback, until its queue is destroyed.
 */
const char *sio_req_error(const struct sio_req *req);

struct sio_queue;

/* A queue with room for depth requests in flight (rounded to a power of 2). */
int sio_queue_create(unsigned depth, struct sio_queue **out);

/* Waits for every request in flight, runs their callbacks, frees. NULL ok. */
void sio_queue_destroy(struct sio_queue *q);

/*
 * Queue req. It is handed to the kernel at the next sio_queue_run() (or
 * earlier when the submission ring is full). Never blocks on completions.
 * Returns 0, or -EINVAL for a misaligned direct request.
 *
 * On an NBD export (io/nbd.h) only READ, FSYNC and FDATASYNC (which
 * complete at once with 0) are accepted: writes and fallocates are
 * -EROFS, polls -EINVAL. A read goes to the queue's own connection to
 * the export, opened (synchronously) at the first request; a failure to
 * connect, like any NBD error, completes the request with -errno.
 */
int sio_queue_submit(struct sio_queue *q, struct sio_req *req);

/*
 * Submit what is queued, then wait until at least min_complete requests have
 * completed (0: do not wait), running each callback. Callbacks may submit new
 * requests. Returns the number of callbacks run (fewer than min_complete
 * only when nothing else is pending), or -errno.
 */
int sio_queue_run(struct sio_queue *q, unsigned min_complete);

/*
 * Run only the callbacks of requests that only(req) accepts, waiting as
 * needed, until busy(arg) is false; other requests that complete meanwhile
 * keep their result and get their callback at the next sio_queue_run().
 * For a synchronous caller on the owner's thread that must wait for some
 * of its own requests without running anybody else's callbacks. Returns
 * 0, -EAGAIN when busy(arg) holds but nothing is in flight, or -errno.
 */
int sio_queue_run_only(struct sio_queue *q, bool (*only)(struct sio_req *req),
		       bool (*busy)(void *arg), void *arg);

/* Requests submitted whose callback has not run yet. */
unsigned sio_queue_inflight(const struct sio_queue *q);

/*
 * Fault injection, for tests only: the next `count` requests (sync or async)
 * of kind op (SIO_OP_READ or SIO_OP_WRITE) on a file whose path ends with
 * path_suffix and that touch [off, off + len) fail with -err. after: let this
 * many matching requests pass first. count 0: every matching request until
 * cleared; len 0: from off to end of file. Process-wide; sio_fault_clear()
 * removes every rule. The library never reads the environment; the siphon
 * tool turns its SIPHON_FAULT into rules with sio_fault_parse().
 */
int sio_fault_add(enum sio_op op, const char *path_suffix, uint64_t off,
		  uint64_t len, int err, unsigned count, unsigned after);
void sio_fault_clear(void);

/*
 * Add the rules of spec: one or more
 * "read|write:SUFFIX:OFF:LEN:ERRNO[:COUNT[:AFTER]]" separated by ';'
 * (ERRNO a number or a name such as EIO, or "delayMS": hold the requests
 * MS milliseconds, as sio_fault_add_delay(), instead of failing them). Returns 0, -EINVAL for a
 * malformed spec (no rule added, message recorded), or -ENOMEM.
 */
int sio_fault_parse(const char *spec);

/*
 * Latency injection, for tests only: the next `count` (0: every) requests
 * of kind op (SIO_OP_READ or SIO_OP_WRITE) on a file whose path ends with
 * path_suffix and that touch [off, off + len) (len 0: to end of file) are
 * held delay_ns before they are issued. A synchronous helper sleeps (its
 * thread waits, as for a slow device); a queued request waits on a timer
 * in its queue's ring, and the submitting thread goes on. Returns 0,
 * -EINVAL, -ENOMEM. sio_fault_clear() removes these rules too.
 * sio_fault_delayed(): requests being held right now; sio_fault_delays():
 * holds started so far (both any thread).
 */
int sio_fault_add_delay(enum sio_op op, const char *path_suffix, uint64_t off,
			uint64_t len, uint64_t delay_ns, unsigned count);
unsigned sio_fault_delayed(void);
uint64_t sio_fault_delays(void);

/*
 * Write log, for crash tests: from sio_iolog_start(path) on, every
 * successful write, fsync, fdatasync, fallocate and truncate on a file
 * opened writable is appended to path (format in io/iolog.h). Once per
 * process, before any I/O; the siphon tool calls it for SIPHON_IO_LOG=PATH.
 * Returns 0, -EBUSY (already started), or -errno of the open.
 */
int sio_iolog_start(const char *path);

/*
 * Memory files, for tests: a file that lives only in memory, so that
 * format code can be opened, read, written and flushed (and judged by
 * qemu-img from a snapshot) on a host that refuses io_uring.
 *
 * sio_mem_create() registers a memory file at path holding a copy of
 * buf[0..len). From then until sio_mem_destroy(), sio_file_open(path)
 * opens it instead of the filesystem's file at that path (SIO_TRUNC
 * empties it, SIO_CREATE|SIO_EXCL says -EEXIST), and sio_stat(path)
 * answers for it, so a backing chain can be made of memory files. Its
 * sio_files are buffered (alignment 1) and do their reads, writes, syncs
 * and fallocates with plain system calls on the memory, never io_uring;
 * fault and latency rules (sio_fault_add) and the write log apply to them
 * as to any file. They cannot go on a sio_queue (-EOPNOTSUPP). Size,
 * truncate and image locks behave as on a file on tmpfs.
 * 0 and *out, or -errno with a message: -EINVAL, -EEXIST (one is already
 * registered at path), -ENOMEM, or memfd_create's error.
 *
 * sio_mem_destroy(): unregister and free m; sio_files still open on it go
 * on working until closed. NULL is a no-op.
 *
 * sio_mem_save(): copy its bytes now into the (real) file at path,
 * replaced, keeping holes: what qemu-img check/compare then judge.
 *
 * sio_mem_fail(): the memory file's one fault rule (it replaces any
 * earlier one): of the requests of kind op (SIO_OP_READ, _WRITE, _FSYNC,
 * _FDATASYNC, _FALLOCATE; 0 clears the rule) the next `after` pass, then
 * `count` of them fail with -err (count 0: every one from then on, a
 * device that died). Each write of a sio_pwrite_many batch is one
 * request. 0 or -EINVAL.
 *
 * sio_mem_count(): requests of kind op made so far on m (failed ones too).
 *
 * All of these are thread safe.
 */
int sio_mem_create(const char *path, const void *buf, size_t len,
		   struct sio_mem **out);
void sio_mem_destroy(struct sio_mem *m);
int sio_mem_save(struct sio_mem *m, const char *path);
int sio_mem_fail(struct sio_mem *m, enum sio_op op, unsigned after,
		 unsigned count, int err);
uint64_t sio_mem_count(struct sio_mem *m, enum sio_op op);

/*
 * stat(2) of path as sio_file_open() would find it: a memory file
 * registered there, else the filesystem's file. 0 or -errno.
 */
int sio_stat(const char *path, struct stat *st);

#endif
