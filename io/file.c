/*
 * Files and the synchronous I/O helpers.
 *
 * A sio_file is opened buffered and then switched to O_DIRECT with fcntl()
 * unless the caller asked for buffered I/O: doing it in two steps means a
 * filesystem that refuses O_DIRECT (EINVAL) never leaves a half-created file
 * behind, which an O_CREAT|O_EXCL|O_DIRECT open() followed by a retry would.
 *
 * The synchronous helpers run on an io_uring private to the calling thread
 * (created on first use, torn down by a pthread key destructor at thread
 * exit). Each helper has at most one request in that ring and reaps it before
 * returning, so the ring is always empty between calls and never runs anyone
 * else's callbacks.
 *
 * Invariants:
 *  - f->align and f->mem_align are powers of two; both are 1 for buffered
 *    files.
 *  - Only direct_rw() talks to the kernel for reads and writes; on a direct
 *    file every request it issues is aligned. Unaligned caller requests go
 *    through an aligned bounce buffer.
 *  - A read never returns short: end of file reads as zeros. On a direct file
 *    a short read that ends off the alignment grid can only be end of file.
 *  - A memory file (f->mem, io/mem.c) never reaches the ring: every helper
 *    hands it to sio_mem_io() after the checks, fault rules and before the
 *    write log, which stay the same for both.
 *  - An NBD export (f->nbd, io/nbd.c) never reaches the ring either: reads
 *    go to sio_nbd_pread() after the same checks and fault rules; anything
 *    that would change it is -EROFS before any of them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <liburing.h>

#include "common/checked.h"
#include "common/error.h"
#include "io/fault.h"
#include "io/io.h"
#include "io/iolog.h"
#include "io/mem.h"
#include "io/nbd_priv.h"
#include "io/ring.h"

/* One request at a time; a few spare entries cost nothing. */
#define SYNC_RING_ENTRIES 16

/* Largest single read/write handed to the kernel (it caps near 2 GiB). */
#define SYNC_MAX_IO (1ULL << 30)

/* Bounce buffer for unaligned requests on direct files. */
#define BOUNCE_MAX (1U << 20)

/* Alignment when O_DIRECT works but the kernel does not say what it needs. */
#define DEFAULT_DIRECT_ALIGN 4096

struct sync_ring {
	struct io_uring ring;
	bool ready;
};

static _Thread_local struct sync_ring tl_ring;
/* Device round trips this thread waited for (sio_sync_waits()). */
static _Thread_local uint64_t tl_sync_waits;

uint64_t sio_sync_waits(void)
{
	return tl_sync_waits;
}

void sio_count_sync_wait(void)
{
	tl_sync_waits++;
}
static pthread_key_t ring_key;
static pthread_once_t ring_once = PTHREAD_ONCE_INIT;
static int ring_key_err;

int sio_ring_init(struct io_uring *ring, unsigned entries, const char *what)
{
	int ret;

	ret = io_uring_queue_init(
		entries, ring, IORING_SETUP_CLAMP | IORING_SETUP_COOP_TASKRUN);
	/* COOP_TASKRUN needs 5.19; older kernels say EINVAL. */
	if (ret == -EINVAL)
		ret = io_uring_queue_init(entries, ring, IORING_SETUP_CLAMP);
	if (ret < 0)
		ret = sx_error(
			ret,
			"%s: io_uring is unavailable on this host "
			"(io_uring_queue_init: %s); siphon needs io_uring "
			"(check sysctl kernel.io_uring_disabled, seccomp)",
			what, strerror(-ret));
	return ret;
}

static void sync_ring_destroy(void *arg)
{
	struct sync_ring *sr = arg;

	if (sr->ready) {
		io_uring_queue_exit(&sr->ring);
		sr->ready = false;
	}
}

/*
 * A forked child would share the parent's ring memory; it drops its copy
 * (the parent's ring is untouched) and makes its own on first use.
 */
static void sync_ring_atfork_child(void)
{
	sync_ring_destroy(&tl_ring);
}

static void sync_ring_key_init(void)
{
	ring_key_err = pthread_key_create(&ring_key, sync_ring_destroy);
	if (!ring_key_err)
		ring_key_err =
			pthread_atfork(NULL, NULL, sync_ring_atfork_child);
}

/* The calling thread's ring, created on first use. */
static int sync_ring_get(const char *path, struct io_uring **out)
{
	int ret = 0;

	if (tl_ring.ready)
		goto out;
	pthread_once(&ring_once, sync_ring_key_init);
	if (ring_key_err) {
		ret = sx_error(ring_key_err, "%s: pthread_key_create: %s", path,
			       strerror(ring_key_err));
		goto out;
	}
	ret = sio_ring_init(&tl_ring.ring, SYNC_RING_ENTRIES, path);
	if (ret < 0)
		goto out;
	/* The value only has to be non-NULL for the destructor to run. */
	ret = pthread_setspecific(ring_key, &tl_ring);
	if (ret) {
		io_uring_queue_exit(&tl_ring.ring);
		ret = sx_error(ret, "%s: pthread_setspecific: %s", path,
			       strerror(ret));
		goto out;
	}
	tl_ring.ready = true;
out:
	if (ret == 0)
		*out = &tl_ring.ring;
	return ret;
}

/*
 * Issue one request and wait for it. Returns the completion's res.
 * EINTR/EAGAIN from the ring itself are retried; the request's own result is
 * the caller's to judge.
 */
static int sync_op(struct io_uring *ring, enum sio_op op, int fd, void *buf,
		   uint64_t len, uint64_t off, int mode)
{
	struct io_uring_sqe *sqe;
	struct io_uring_cqe *cqe;
	int ret;

	/* SIO_OP_POLL and the like have no synchronous form. */
	if (op < SIO_OP_READ || op > SIO_OP_FALLOCATE)
		return -EINVAL;
	sqe = io_uring_get_sqe(ring);
	if (!sqe)
		return -EBUSY; /* cannot happen: the ring is empty here */
	switch (op) {
	case SIO_OP_READ:
		io_uring_prep_read(sqe, fd, buf, (unsigned)len, off);
		break;
	case SIO_OP_WRITE:
		io_uring_prep_write(sqe, fd, buf, (unsigned)len, off);
		break;
	case SIO_OP_FSYNC:
		io_uring_prep_fsync(sqe, fd, 0);
		break;
	case SIO_OP_FDATASYNC:
		io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
		break;
	case SIO_OP_FALLOCATE:
		io_uring_prep_fallocate(sqe, fd, mode, off, len);
		break;
	default:
		/* Unreachable: checked above. */
		io_uring_prep_nop(sqe);
		break;
	}
	tl_sync_waits++;
	do {
		ret = io_uring_submit_and_wait(ring, 1);
	} while (ret == -EINTR || ret == -EAGAIN || ret == -EBUSY);
	if (ret < 0)
		return ret;
	do {
		ret = io_uring_wait_cqe(ring, &cqe);
	} while (ret == -EINTR);
	if (ret < 0)
		return ret;
	ret = cqe->res;
	io_uring_cqe_seen(ring, cqe);
	return ret;
}

/*
 * Read or write [off, off + len) with buf, resubmitting after short
 * transfers. On a direct file off, len and buf must already be aligned.
 * Reads past end of file fill the rest of buf with zeros.
 */
static int direct_rw(struct io_uring *ring, struct sio_file *f, bool write,
		     void *buf, uint64_t len, uint64_t off)
{
	uint64_t done = 0, pos;
	char *p = buf;
	int res;

	while (done < len) {
		res = sync_op(ring, write ? SIO_OP_WRITE : SIO_OP_READ, f->fd,
			      p + done, sx_min(len - done, SYNC_MAX_IO),
			      off + done, 0);
		if (res == -EINTR || res == -EAGAIN)
			continue;
		if (res < 0)
			return res;
		pos = done + (uint64_t)res;
		if (!write) {
			/*
			 * A direct read only ends off the grid at end of
			 * file; resubmitting there would be misaligned.
			 */
			if (res == 0 || (f->direct &&
					 !sx_is_aligned(off + pos, f->align))) {
				memset(p + pos, 0, len - pos);
				pos = len;
			}
		} else if (f->direct) {
			/* Rewrite a partial block rather than misalign. */
			pos = sx_align_down(off + pos, f->align) - off;
		}
		if (pos <= done)
			return -EIO; /* a write that made no progress */
		done = pos;
	}
	return 0;
}

static size_t bounce_size(const struct sio_file *f, uint64_t span)
{
	uint64_t n = sx_max(sx_align_down(BOUNCE_MAX, f->align), f->align);

	return (size_t)sx_min(n, span);
}

static void *bounce_alloc(const struct sio_file *f, size_t len)
{
	void *p = NULL;
	size_t a = sx_max(f->mem_align, SIO_BUF_ALIGN);

	if (posix_memalign(&p, a, len))
		return NULL;
	return p;
}

/* Unaligned read on a direct file: aligned chunks through a bounce buffer. */
static int bounce_read(struct io_uring *ring, struct sio_file *f, void *buf,
		       uint64_t len, uint64_t off)
{
	uint64_t start, end, pos, from, to;
	size_t bsz, n;
	char *bounce = NULL;
	int ret;

	start = sx_align_down(off, f->align);
	ret = sx_align_up(off + len, f->align, &end);
	if (ret < 0)
		goto out;
	bsz = bounce_size(f, end - start);
	bounce = bounce_alloc(f, bsz);
	if (!bounce) {
		ret = -ENOMEM;
		goto out;
	}
	for (pos = start; pos < end; pos += n) {
		n = (size_t)sx_min(bsz, end - pos);
		ret = direct_rw(ring, f, false, bounce, n, pos);
		if (ret < 0)
			goto out;
		from = sx_max(pos, off);
		to = sx_min(pos + n, off + len);
		memcpy((char *)buf + (from - off), bounce + (from - pos),
		       to - from);
	}
out:
	free(bounce);
	return ret;
}

/*
 * Unaligned write on a direct file: read-modify-write of the partial blocks
 * at either edge, then the file is cut back if the rounding grew it.
 */
static int bounce_write(struct io_uring *ring, struct sio_file *f,
			const void *buf, uint64_t len, uint64_t off)
{
	uint64_t start, end, pos, from, to, old_size = 0;
	size_t bsz, n;
	char *bounce = NULL;
	struct stat st;
	int ret;

	start = sx_align_down(off, f->align);
	ret = sx_align_up(off + len, f->align, &end);
	if (ret < 0)
		goto out;
	if (!f->is_blockdev) {
		if (fstat(f->fd, &st) < 0) {
			ret = -errno;
			goto out;
		}
		old_size = (uint64_t)st.st_size;
	}
	bsz = bounce_size(f, end - start);
	bounce = bounce_alloc(f, bsz);
	if (!bounce) {
		ret = -ENOMEM;
		goto out;
	}
	for (pos = start; pos < end; pos += n) {
		n = (size_t)sx_min(bsz, end - pos);
		from = sx_max(pos, off);
		to = sx_min(pos + n, off + len);
		if (from > pos) {
			ret = direct_rw(ring, f, false, bounce, f->align, pos);
			if (ret < 0)
				goto out;
		}
		/* The tail block, unless the head read just fetched it. */
		if (to < pos + n && !(from > pos && n == f->align)) {
			ret = direct_rw(ring, f, false, bounce + n - f->align,
					f->align, pos + n - f->align);
			if (ret < 0)
				goto out;
		}
		memcpy(bounce + (from - pos), (const char *)buf + (from - off),
		       to - from);
		ret = direct_rw(ring, f, true, bounce, n, pos);
		if (ret < 0)
			goto out;
	}
	/*
	 * Rounding up past the old end of file grew it by up to a block of
	 * zeros; cut it back unless someone else has grown it further since.
	 */
	if (!f->is_blockdev && end > old_size && end > off + len) {
		if (fstat(f->fd, &st) < 0) {
			ret = -errno;
			goto out;
		}
		if ((uint64_t)st.st_size == end &&
		    ftruncate(f->fd, (off_t)sx_max(old_size, off + len)) < 0) {
			ret = -errno;
			goto out;
		}
	}
out:
	free(bounce);
	return ret;
}

static bool needs_bounce(const struct sio_file *f, const void *buf,
			 uint64_t len, uint64_t off)
{
	return f->direct && (!sx_is_aligned(off, f->align) ||
			     !sx_is_aligned(len, f->align) ||
			     !sx_is_aligned((uintptr_t)buf, f->mem_align));
}

/* What every change to an NBD export gets. */
static int nbd_read_only(const struct sio_file *f, const char *what)
{
	return sx_error(-EROFS, "%s: %s: NBD exports are read-only", f->path,
			what);
}

static int check_range(const struct sio_file *f, const void *buf, size_t len,
		       uint64_t off, const char *what)
{
	uint64_t end;

	if (!buf && len)
		return sx_error(-EINVAL, "%s: %s: NULL buffer", f->path, what);
	if (sx_add(off, len, &end) < 0 || end > INT64_MAX)
		return sx_error(-EOVERFLOW,
				"%s: %s of %zu bytes at offset %" PRIu64
				": range overflows",
				f->path, what, len, off);
	return 0;
}

int sio_pread(struct sio_file *f, void *buf, size_t len, uint64_t off)
{
	struct io_uring *ring;
	int ret;

	if (!f)
		return sx_error(-EINVAL, "sio_pread: NULL file");
	ret = check_range(f, buf, len, off, "read");
	if (ret < 0 || len == 0)
		goto out;
	ret = sio_fault_check(f, SIO_OP_READ, off, len);
	if (ret < 0)
		goto out;
	if (f->mem) {
		ret = sio_mem_io(f, SIO_OP_READ, buf, len, off, 0);
		goto out;
	}
	if (f->nbd) {
		tl_sync_waits++;
		ret = sio_nbd_pread(f, buf, len, off);
		goto out;
	}
	ret = sync_ring_get(f->path, &ring);
	if (ret < 0)
		goto out;
	if (needs_bounce(f, buf, len, off))
		ret = bounce_read(ring, f, buf, len, off);
	else
		ret = direct_rw(ring, f, false, buf, len, off);
	if (ret < 0)
		sx_error(ret, "%s: read of %zu bytes at offset %" PRIu64 ": %s",
			 f->path, len, off, strerror(-ret));
out:
	return ret;
}

int sio_pwrite(struct sio_file *f, const void *buf, size_t len, uint64_t off)
{
	struct io_uring *ring;
	int ret;

	if (!f)
		return sx_error(-EINVAL, "sio_pwrite: NULL file");
	if (f->nbd)
		return nbd_read_only(f, "write");
	ret = check_range(f, buf, len, off, "write");
	if (ret < 0 || len == 0)
		goto out;
	if (!f->writable) {
		ret = sx_error(-EBADF, "%s: write: file is open read-only",
			       f->path);
		goto out;
	}
	ret = sio_fault_check(f, SIO_OP_WRITE, off, len);
	if (ret < 0)
		goto out;
	if (f->mem) {
		/* sio_mem_io only reads through buf when writing. */
		ret = sio_mem_io(f, SIO_OP_WRITE, (void *)(uintptr_t)buf, len,
				 off, 0);
		goto logged;
	}
	ret = sync_ring_get(f->path, &ring);
	if (ret < 0)
		goto out;
	if (needs_bounce(f, buf, len, off))
		ret = bounce_write(ring, f, buf, len, off);
	else
		/* direct_rw only reads through buf when writing. */
		ret = direct_rw(ring, f, true, (void *)(uintptr_t)buf, len,
				off);
	if (ret < 0)
		sx_error(ret,
			 "%s: write of %zu bytes at offset %" PRIu64 ": %s",
			 f->path, len, off, strerror(-ret));
logged:
	if (ret == 0)
		ret = sio_iolog_write(f, buf, NULL, 0, len, off);
out:
	return ret;
}

/*
 * Write items [from, from + n) (n <= SYNC_RING_ENTRIES, all aligned, none
 * faulted) in one submission. Items that came back short are redone with
 * sio_pwrite. Returns 0 or the first error.
 */
static int write_batch(struct io_uring *ring, struct sio_file *f,
		       const struct sio_wvec *v, const unsigned *idx,
		       unsigned n)
{
	struct io_uring_cqe *cqe;
	unsigned i, seen = 0;
	bool redo[SYNC_RING_ENTRIES] = {false};
	int ret = 0, sret;

	for (i = 0; i < n; i++) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

		if (!sqe)
			return -EBUSY; /* cannot happen: n <= ring size */
		io_uring_prep_write(sqe, f->fd, v[idx[i]].buf,
				    (unsigned)v[idx[i]].len, v[idx[i]].off);
		io_uring_sqe_set_data64(sqe, i);
	}
	tl_sync_waits++;
	do {
		sret = io_uring_submit_and_wait(ring, n);
	} while (sret == -EINTR || sret == -EAGAIN || sret == -EBUSY);
	if (sret < 0)
		return sret;
	while (seen < n) {
		do {
			sret = io_uring_wait_cqe(ring, &cqe);
		} while (sret == -EINTR);
		if (sret < 0)
			return sret; /* the ring is unusable: nothing to save */
		i = (unsigned)io_uring_cqe_get_data64(cqe);
		if (cqe->res < 0 && cqe->res != -EINTR && cqe->res != -EAGAIN) {
			if (!ret)
				ret = sx_error(
					cqe->res,
					"%s: write of %zu bytes at offset %" PRIu64
					": %s",
					f->path, v[idx[i]].len, v[idx[i]].off,
					strerror(-cqe->res));
		} else if ((size_t)cqe->res != v[idx[i]].len) {
			redo[i] = true;
		}
		io_uring_cqe_seen(ring, cqe);
		seen++;
	}
	for (i = 0; i < n && !ret; i++) {
		if (redo[i])
			ret = sio_pwrite(f, v[idx[i]].buf, v[idx[i]].len,
					 v[idx[i]].off);
		else
			ret = sio_iolog_write(f, v[idx[i]].buf, NULL, 0,
					      v[idx[i]].len, v[idx[i]].off);
	}
	return ret;
}

int sio_pwrite_many(struct sio_file *f, const struct sio_wvec *v, unsigned n)
{
	unsigned idx[SYNC_RING_ENTRIES], nb = 0, i;
	struct io_uring *ring;
	int ret = 0;

	if (!f || (n && !v))
		return sx_error(-EINVAL, "sio_pwrite_many: bad arguments");
	if (f->nbd)
		return nbd_read_only(f, "write");
	if (!f->writable)
		return sx_error(-EBADF, "%s: write: file is open read-only",
				f->path);
	/* No device round trip to save on a memory file: one at a time. */
	for (i = 0; f->mem && i < n && ret == 0; i++)
		ret = sio_pwrite(f, v[i].buf, v[i].len, v[i].off);
	if (f->mem)
		return ret;
	ret = sync_ring_get(f->path, &ring);
	if (ret < 0)
		return ret;
	for (i = 0; i < n && ret == 0; i++) {
		ret = check_range(f, v[i].buf, v[i].len, v[i].off, "write");
		if (ret < 0 || !v[i].len)
			break;
		/* Odd ones (bounced, huge) take the single path. */
		if (needs_bounce(f, v[i].buf, v[i].len, v[i].off) ||
		    v[i].len > SYNC_MAX_IO) {
			ret = sio_pwrite(f, v[i].buf, v[i].len, v[i].off);
			continue;
		}
		ret = sio_fault_check(f, SIO_OP_WRITE, v[i].off, v[i].len);
		if (ret < 0)
			break;
		idx[nb++] = i;
		if (nb == SYNC_RING_ENTRIES) {
			ret = write_batch(ring, f, v, idx, nb);
			nb = 0;
		}
	}
	if (ret == 0 && nb)
		ret = write_batch(ring, f, v, idx, nb);
	return ret;
}

static int sync_simple(struct sio_file *f, enum sio_op op, int mode,
		       uint64_t off, uint64_t len, const char *what)
{
	struct io_uring *ring;
	int ret;

	if (!f)
		return sx_error(-EINVAL, "%s: NULL file", what);
	/* Nothing to flush on a read-only export; nothing else gets here. */
	if (f->nbd)
		return op == SIO_OP_FALLOCATE ? nbd_read_only(f, what) : 0;
	if (f->mem) {
		ret = sio_mem_io(f, op, NULL, len, off, mode);
		goto logged;
	}
	ret = sync_ring_get(f->path, &ring);
	if (ret < 0)
		goto out;
	do {
		ret = sync_op(ring, op, f->fd, NULL, len, off, mode);
	} while (ret == -EINTR || ret == -EAGAIN);
	if (ret < 0)
		sx_error(ret, "%s: %s: %s", f->path, what, strerror(-ret));
logged:
	if (ret == 0)
		ret = sio_iolog_op(f, op, mode, off, len);
out:
	return ret;
}

int sio_fsync(struct sio_file *f)
{
	return sync_simple(f, SIO_OP_FSYNC, 0, 0, 0, "fsync");
}

int sio_fdatasync(struct sio_file *f)
{
	return sync_simple(f, SIO_OP_FDATASYNC, 0, 0, 0, "fdatasync");
}

int sio_fallocate(struct sio_file *f, int mode, uint64_t off, uint64_t len)
{
	uint64_t end;

	if (!f)
		return sx_error(-EINVAL, "sio_fallocate: NULL file");
	if (f->nbd)
		return nbd_read_only(f, "fallocate");
	if (sx_add(off, len, &end) < 0 || end > INT64_MAX)
		return sx_error(-EOVERFLOW,
				"%s: fallocate of %" PRIu64
				" bytes at offset %" PRIu64 ": range overflows",
				f->path, len, off);
	return sync_simple(f, SIO_OP_FALLOCATE, mode, off, len, "fallocate");
}

/*
 * Direct I/O alignment, from the most to the least authoritative source:
 * statx(STATX_DIOALIGN), the device's logical block size, a safe default.
 */
static int probe_alignment(struct sio_file *f)
{
	struct statx stx;
	int bsz;

	if (!f->direct) {
		f->align = f->mem_align = 1;
		return 0;
	}
	if (statx(f->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
	    (stx.stx_mask & STATX_DIOALIGN) && stx.stx_dio_offset_align &&
	    stx.stx_dio_mem_align && sx_is_pow2(stx.stx_dio_offset_align) &&
	    sx_is_pow2(stx.stx_dio_mem_align)) {
		f->align = stx.stx_dio_offset_align;
		f->mem_align = stx.stx_dio_mem_align;
		return 0;
	}
	if (f->is_blockdev) {
		if (ioctl(f->fd, BLKSSZGET, &bsz) < 0)
			return sx_error(-errno, "%s: ioctl(BLKSSZGET): %s",
					f->path, strerror(errno));
		if (bsz <= 0 || !sx_is_pow2((uint64_t)bsz))
			return sx_error(-EINVAL,
					"%s: odd logical block size %d",
					f->path, bsz);
		f->align = f->mem_align = (uint32_t)bsz;
		return 0;
	}
	f->align = f->mem_align = DEFAULT_DIRECT_ALIGN;
	return 0;
}

int sio_file_open(const char *path, unsigned flags, struct sio_file **out)
{
	struct sio_file *f = NULL;
	struct io_uring *ring;
	struct stat st;
	int oflags = O_CLOEXEC, fl, ret;

	if (!path || !out)
		return sx_error(-EINVAL, "sio_file_open: NULL argument");
	if ((flags & ~(unsigned)SIO_OPEN_MASK) ||
	    ((flags & (SIO_CREATE | SIO_TRUNC)) && !(flags & SIO_RDWR)) ||
	    ((flags & SIO_EXCL) && !(flags & SIO_CREATE)))
		return sx_error(-EINVAL, "%s: open: invalid flags 0x%x", path,
				flags);
	ret = sio_mem_open(path, flags, out);
	if (ret != 0)
		return ret < 0 ? ret : 0;
	/* Fail at open, not at the first read, when io_uring is refused. */
	ret = sync_ring_get(path, &ring);
	if (ret < 0)
		return ret;

	f = calloc(1, sizeof(*f));
	if (!f) {
		ret = sx_error(-ENOMEM, "%s: open: out of memory", path);
		goto out;
	}
	f->fd = -1;
	f->path = strdup(path);
	if (!f->path) {
		ret = sx_error(-ENOMEM, "%s: open: out of memory", path);
		goto out;
	}
	oflags |= (flags & SIO_RDWR) ? O_RDWR : O_RDONLY;
	if (flags & SIO_CREATE)
		oflags |= O_CREAT;
	if (flags & SIO_EXCL)
		oflags |= O_EXCL;
	if (flags & SIO_TRUNC)
		oflags |= O_TRUNC;
	f->fd = open(path, oflags, 0644);
	if (f->fd < 0) {
		ret = sx_error(-errno, "%s: open: %s", path, strerror(errno));
		goto out;
	}
	if (fstat(f->fd, &st) < 0) {
		ret = sx_error(-errno, "%s: fstat: %s", path, strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
		ret = sx_error(-EINVAL,
			       "%s: open: not a regular file or block device",
			       path);
		goto out;
	}
	f->is_blockdev = S_ISBLK(st.st_mode);
	f->writable = flags & SIO_RDWR;
	if (!(flags & SIO_BUFFERED)) {
		fl = fcntl(f->fd, F_GETFL);
		if (fl < 0) {
			ret = sx_error(-errno, "%s: fcntl(F_GETFL): %s", path,
				       strerror(errno));
			goto out;
		}
		if (fcntl(f->fd, F_SETFL, fl | O_DIRECT) == 0) {
			f->direct = true;
		} else if (errno != EINVAL) {
			ret = sx_error(-errno, "%s: fcntl(O_DIRECT): %s", path,
				       strerror(errno));
			goto out;
		}
		/* EINVAL: the filesystem has no direct I/O; stay buffered. */
	}
	ret = probe_alignment(f);
out:
	if (ret < 0) {
		sio_file_close(f);
	} else {
		*out = f;
	}
	return ret;
}

void sio_file_close(struct sio_file *f)
{
	if (!f)
		return;
	if (f->fd >= 0)
		close(f->fd);
	sio_mem_put(f->mem);
	sio_nbd_free(f->nbd);
	free(f->path);
	free(f);
}

int sio_file_size(struct sio_file *f, uint64_t *size)
{
	struct stat st;
	uint64_t sz;

	if (!f || !size)
		return sx_error(-EINVAL, "sio_file_size: NULL argument");
	if (f->nbd) {
		*size = sio_nbd_size(f);
		return 0;
	}
	if (fstat(f->fd, &st) < 0)
		return sx_error(-errno, "%s: fstat: %s", f->path,
				strerror(errno));
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(f->fd, BLKGETSIZE64, &sz) < 0)
			return sx_error(-errno, "%s: ioctl(BLKGETSIZE64): %s",
					f->path, strerror(errno));
	} else {
		sz = (uint64_t)st.st_size;
	}
	*size = sz;
	return 0;
}

int sio_file_truncate(struct sio_file *f, uint64_t size)
{
	if (!f)
		return sx_error(-EINVAL, "sio_file_truncate: NULL file");
	if (f->nbd)
		return nbd_read_only(f, "truncate");
	if (f->is_blockdev)
		return sx_error(-EINVAL, "%s: truncate: not a regular file",
				f->path);
	if (size > INT64_MAX)
		return sx_error(-EFBIG,
				"%s: truncate to %" PRIu64 ": too large",
				f->path, size);
	if (!f->mem)
		tl_sync_waits++;
	if (ftruncate(f->fd, (off_t)size) < 0)
		return sx_error(-errno, "%s: truncate to %" PRIu64 ": %s",
				f->path, size, strerror(errno));
	return sio_iolog_op(f, SIO_IOLOG_TRUNCATE, 0, size, 0);
}

void *sio_buf_alloc(size_t len)
{
	uint64_t n;
	void *p = NULL;

	/* A zero-length request still gets a valid, freeable buffer. */
	if (sx_align_up(len ? len : 1, SIO_BUF_ALIGN, &n) < 0 || n > SIZE_MAX)
		return NULL;
	if (posix_memalign(&p, SIO_BUF_ALIGN, (size_t)n))
		return NULL;
	return p;
}

void sio_buf_free(void *buf)
{
	free(buf);
}
