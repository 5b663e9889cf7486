/*
 * Memory files: images that live only in memory, for the format unit
 * tests, so that formats/ can be opened, read, written and flushed on a
 * host that refuses io_uring. See sio_mem_create() in io.h.
 *
 * The bytes live in an anonymous memfd rather than a malloc'd buffer: it
 * grows and shrinks with ftruncate, keeps holes (fallocate punches them),
 * and answers fstat, SEEK_DATA, OFD locks and st_blocks as a file on tmpfs
 * does, so the code above io/ that asks the file such things (chain loop
 * checks by inode, image locks, the preallocation guess) sees what it
 * would see on a real file. The I/O itself is pread/pwrite on it, never
 * io_uring.
 *
 * Invariants:
 *  - A memory file is reachable by path while it is registered (from
 *    sio_mem_create to sio_mem_destroy); registry, references, fault rule
 *    and counters are only touched under mem_lock, and nr_mem mirrors the
 *    registry's length so that sio_file_open() of an ordinary path costs
 *    one atomic load.
 *  - m->refs counts the registration and every open sio_file on it; the
 *    memfd is closed and m freed when it drops to 0, so an open file keeps
 *    working after sio_mem_destroy().
 *  - Each sio_file has a descriptor of its own (a reopen of the memfd
 *    through /proc/self/fd), hence its own open file description: OFD
 *    locks conflict between two opens as they do on a real file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/checked.h"
#include "common/error.h"
#include "io/io.h"
#include "io/mem.h"

/* Largest piece copied by sio_mem_save() at a time. */
#define SAVE_CHUNK (1U << 20)

struct sio_mem {
	char *path;
	int fd; /* the memfd holding the bytes */
	unsigned refs;
	bool registered;
	/* The one fault rule (sio_mem_fail); fail_op 0: none. */
	enum sio_op fail_op;
	unsigned fail_after;
	unsigned fail_count; /* 0: every one from then on */
	int fail_err; /* positive */
	uint64_t counts[SIO_OP_FALLOCATE + 1];
	struct sio_mem *next;
};

static pthread_mutex_t mem_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sio_mem *mems;
static atomic_uint nr_mem;

/* The registered memory file at path, or NULL. Caller holds mem_lock. */
static struct sio_mem *find_locked(const char *path)
{
	struct sio_mem *m;

	for (m = mems; m; m = m->next)
		if (!strcmp(m->path, path))
			return m;
	return NULL;
}

/* Drop a reference; the last one frees. Caller holds mem_lock. */
static void put_locked(struct sio_mem *m)
{
	if (--m->refs)
		return;
	close(m->fd);
	free(m->path);
	free(m);
}

static bool all_zero(const char *p, size_t len)
{
	return !len || (!p[0] && !memcmp(p, p + 1, len - 1));
}

/* Write all of buf at off of fd. 0 or -errno. */
static int write_all(int fd, const void *buf, size_t len, uint64_t off)
{
	const char *p = buf;
	ssize_t n;

	while (len) {
		n = pwrite(fd, p, len, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

int sio_mem_create(const char *path, const void *buf, size_t len,
		   struct sio_mem **out)
{
	struct sio_mem *m = NULL;
	int ret = 0;

	if (!path || !out || (len && !buf))
		return sx_error(-EINVAL, "sio_mem_create: bad arguments");
	m = calloc(1, sizeof(*m));
	if (m) {
		m->fd = -1;
		m->path = strdup(path);
	}
	if (!m || !m->path) {
		ret = sx_error(-ENOMEM, "%s: memory file: out of memory", path);
		goto out;
	}
	m->fd = memfd_create("siphon-mem", MFD_CLOEXEC);
	if (m->fd < 0) {
		ret = sx_error(-errno, "%s: memfd_create: %s", path,
			       strerror(errno));
		goto out;
	}
	if (len)
		ret = write_all(m->fd, buf, len, 0);
	if (ret < 0) {
		ret = sx_error(ret, "%s: memory file: %s", path,
			       strerror(-ret));
		goto out;
	}
	m->refs = 1;
	m->registered = true;
	pthread_mutex_lock(&mem_lock);
	if (find_locked(path)) {
		ret = sx_error(-EEXIST, "%s: a memory file is registered there",
			       path);
	} else {
		m->next = mems;
		mems = m;
		atomic_fetch_add(&nr_mem, 1);
	}
	pthread_mutex_unlock(&mem_lock);
out:
	if (ret < 0 && m) {
		if (m->fd >= 0)
			close(m->fd);
		free(m->path);
		free(m);
	} else if (ret == 0) {
		*out = m;
	}
	return ret;
}

void sio_mem_destroy(struct sio_mem *m)
{
	struct sio_mem **pp;

	if (!m)
		return;
	pthread_mutex_lock(&mem_lock);
	for (pp = &mems; *pp; pp = &(*pp)->next) {
		if (*pp == m) {
			*pp = m->next;
			atomic_fetch_sub(&nr_mem, 1);
			break;
		}
	}
	m->registered = false;
	put_locked(m);
	pthread_mutex_unlock(&mem_lock);
}

int sio_mem_save(struct sio_mem *m, const char *path)
{
	char *buf = NULL;
	struct stat st;
	uint64_t off, size;
	ssize_t n;
	int fd = -1, ret = 0;

	if (!m || !path)
		return sx_error(-EINVAL, "sio_mem_save: NULL argument");
	if (fstat(m->fd, &st) < 0) {
		ret = sx_error(-errno, "%s: fstat: %s", m->path,
			       strerror(errno));
		goto out;
	}
	size = (uint64_t)st.st_size;
	buf = malloc(SAVE_CHUNK);
	if (!buf) {
		ret = sx_error(-ENOMEM, "%s: save: out of memory", m->path);
		goto out;
	}
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		ret = sx_error(-errno, "%s: open: %s", path, strerror(errno));
		goto out;
	}
	/* The holes stay holes: only what the memfd holds is copied. */
	for (off = 0; off < size; off += (uint64_t)n) {
		n = pread(m->fd, buf, (size_t)sx_min(SAVE_CHUNK, size - off),
			  (off_t)off);
		if (n < 0 && errno == EINTR) {
			n = 0;
			continue;
		}
		if (n <= 0) {
			ret = sx_error(n < 0 ? -errno : -EIO,
				       "%s: read at %" PRIu64 ": %s", m->path,
				       off, n < 0 ? strerror(errno) : "short");
			goto out;
		}
		if (all_zero(buf, (size_t)n))
			continue;
		ret = write_all(fd, buf, (size_t)n, off);
		if (ret < 0) {
			ret = sx_error(ret, "%s: write: %s", path,
				       strerror(-ret));
			goto out;
		}
	}
	if (ftruncate(fd, (off_t)size) < 0)
		ret = sx_error(-errno, "%s: truncate: %s", path,
			       strerror(errno));
out:
	if (fd >= 0)
		close(fd);
	free(buf);
	return ret;
}

int sio_mem_fail(struct sio_mem *m, enum sio_op op, unsigned after,
		 unsigned count, int err)
{
	if (!m || err <= 0 ||
	    (op != 0 && (op < SIO_OP_READ || op > SIO_OP_FALLOCATE)))
		return sx_error(-EINVAL, "sio_mem_fail: bad arguments");
	pthread_mutex_lock(&mem_lock);
	m->fail_op = op;
	m->fail_after = after;
	m->fail_count = count;
	m->fail_err = err;
	pthread_mutex_unlock(&mem_lock);
	return 0;
}

uint64_t sio_mem_count(struct sio_mem *m, enum sio_op op)
{
	uint64_t n = 0;

	if (!m || op < SIO_OP_READ || op > SIO_OP_FALLOCATE)
		return 0;
	pthread_mutex_lock(&mem_lock);
	n = m->counts[op];
	pthread_mutex_unlock(&mem_lock);
	return n;
}

int sio_mem_open(const char *path, unsigned flags, struct sio_file **out)
{
	struct sio_file *f = NULL;
	struct sio_mem *m = NULL;
	char proc[64];
	int oflags = O_CLOEXEC, ret = 0;

	if (!atomic_load(&nr_mem))
		return 0;
	pthread_mutex_lock(&mem_lock);
	m = find_locked(path);
	if (m)
		m->refs++;
	pthread_mutex_unlock(&mem_lock);
	if (!m)
		return 0;
	if ((flags & SIO_CREATE) && (flags & SIO_EXCL)) {
		ret = sx_error(-EEXIST, "%s: open: %s", path, strerror(EEXIST));
		goto out;
	}
	f = calloc(1, sizeof(*f));
	if (!f || !(f->path = strdup(path))) {
		ret = sx_error(-ENOMEM, "%s: open: out of memory", path);
		goto out;
	}
	oflags |= (flags & SIO_RDWR) ? O_RDWR : O_RDONLY;
	if (flags & SIO_TRUNC)
		oflags |= O_TRUNC;
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", m->fd);
	f->fd = open(proc, oflags);
	if (f->fd < 0) {
		ret = sx_error(-errno, "%s: open (memory file, %s): %s", path,
			       proc, strerror(errno));
		goto out;
	}
	f->mem = m;
	f->writable = flags & SIO_RDWR;
	f->align = f->mem_align = 1;
	ret = 1;
out:
	if (ret < 0) {
		if (f)
			free(f->path);
		free(f);
		pthread_mutex_lock(&mem_lock);
		put_locked(m);
		pthread_mutex_unlock(&mem_lock);
	} else {
		*out = f;
	}
	return ret;
}

void sio_mem_put(struct sio_mem *m)
{
	if (!m)
		return;
	pthread_mutex_lock(&mem_lock);
	put_locked(m);
	pthread_mutex_unlock(&mem_lock);
}

/* Count op and apply the file's fault rule: 0, or -err when it fails. */
static int count_and_check(struct sio_mem *m, enum sio_op op)
{
	int ret = 0;

	pthread_mutex_lock(&mem_lock);
	m->counts[op]++;
	if (!m->fail_op || m->fail_op != op)
		goto out;
	if (m->fail_after) {
		m->fail_after--;
		goto out;
	}
	ret = -m->fail_err;
	if (m->fail_count && --m->fail_count == 0)
		m->fail_op = 0;
out:
	pthread_mutex_unlock(&mem_lock);
	return ret;
}

static int mem_read(int fd, char *p, uint64_t len, uint64_t off)
{
	ssize_t n;

	while (len) {
		n = pread(fd, p, (size_t)sx_min(len, SSIZE_MAX), (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0) {
			memset(p, 0, len); /* past the end of the file */
			break;
		}
		p += n;
		len -= (uint64_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

int sio_mem_io(struct sio_file *f, enum sio_op op, void *buf, uint64_t len,
	       uint64_t off, int mode)
{
	static const char *const names[] = {
		[SIO_OP_READ] = "read",
		[SIO_OP_WRITE] = "write",
		[SIO_OP_FSYNC] = "fsync",
		[SIO_OP_FDATASYNC] = "fdatasync",
		[SIO_OP_FALLOCATE] = "fallocate",
	};
	int ret;

	if (op < SIO_OP_READ || op > SIO_OP_FALLOCATE)
		return sx_error(-EINVAL, "%s: memory file: op %d", f->path,
				(int)op);
	ret = count_and_check(f->mem, op);
	if (ret < 0)
		goto out;
	switch (op) {
	case SIO_OP_READ:
		ret = mem_read(f->fd, buf, len, off);
		break;
	case SIO_OP_WRITE:
		ret = write_all(f->fd, buf, (size_t)len, off);
		break;
	case SIO_OP_FALLOCATE:
		if (fallocate(f->fd, mode, (off_t)off, (off_t)len) < 0)
			ret = -errno;
		break;
	default:
		break; /* memory is as durable as it gets */
	}
out:
	if (ret < 0)
		sx_error(ret,
			 "%s: %s of %" PRIu64 " bytes at offset %" PRIu64
			 ": %s",
			 f->path, names[op], len, off, strerror(-ret));
	return ret;
}

int sio_mem_stat(const char *path, struct stat *st)
{
	struct sio_mem *m;
	int ret = 0;

	if (!atomic_load(&nr_mem))
		return 0;
	pthread_mutex_lock(&mem_lock);
	m = find_locked(path);
	if (m)
		ret = fstat(m->fd, st) < 0 ? -errno : 1;
	pthread_mutex_unlock(&mem_lock);
	return ret;
}

int sio_stat(const char *path, struct stat *st)
{
	int ret;

	if (!path || !st)
		return -EINVAL;
	ret = sio_mem_stat(path, st);
	if (ret == 0 && stat(path, st) < 0)
		ret = -errno;
	return ret < 0 ? ret : 0;
}
