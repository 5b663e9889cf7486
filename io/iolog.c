/*
 * The write log: see io/iolog.h for what it records and the record layout.
 * The library never reads the environment: sio_iolog_start() (a test, or
 * the siphon tool for its SIPHON_IO_LOG) turns it on.
 *
 * Invariants: the log file is opened once per process, with O_APPEND; a record is written whole under `log_lock`, so records of
 * different threads never interleave; a failure to log fails the request
 * that was being logged (a silently short log would make a crash test pass
 * on states that were never checked).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/checked.h"
#include "common/error.h"
#include "io/iolog.h"

/* Segments per writev(): header, path, then data. */
#define IOLOG_IOV 64

struct iolog_hdr {
	char magic[4];
	uint8_t op;
	uint8_t pad[3];
	uint32_t mode;
	uint32_t path_len;
	uint64_t off;
	uint64_t len;
};

_Static_assert(sizeof(struct iolog_hdr) == 32, "record header is 32 bytes");

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic bool log_on; /* sio_iolog_start() succeeded */
static int log_fd = -1;

int sio_iolog_start(const char *path)
{
	int fd, ret = 0;

	if (!path || !path[0])
		return sx_error(-EINVAL, "write log: no path");
	pthread_mutex_lock(&log_lock);
	if (log_fd >= 0) {
		ret = sx_error(-EBUSY, "write log: already started");
		goto out;
	}
	fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (fd < 0) {
		ret = sx_error(-errno, "write log %s: %s", path,
			       strerror(errno));
		goto out;
	}
	log_fd = fd;
	atomic_store(&log_on, true);
out:
	pthread_mutex_unlock(&log_lock);
	return ret;
}

bool sio_iolog_wanted(const struct sio_file *f)
{
	return atomic_load(&log_on) && f && f->writable;
}

/* writev() all of iov[0..n), resuming after short writes and EINTR. */
static int write_all(struct iovec *iov, int n)
{
	ssize_t done;

	while (n > 0) {
		done = writev(log_fd, iov, n);
		if (done < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		while (n > 0 && (size_t)done >= iov->iov_len) {
			done -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = (char *)iov->iov_base + done;
			iov->iov_len -= (size_t)done;
		}
	}
	return 0;
}

/*
 * Append one record: header, path, then len bytes of data from buf or iov.
 * Called with nothing held; takes log_lock.
 */
static int append(const struct sio_file *f, int op, int mode, uint64_t off,
		  uint64_t len, const void *buf, const struct iovec *data,
		  int ndata)
{
	struct iolog_hdr h = {.magic = {'S', 'X', 'I', 'O'}};
	struct iovec iov[IOLOG_IOV];
	uint64_t want = buf || data ? len : 0, n;
	int cnt, i = 0, ret = 0;

	h.op = (uint8_t)op;
	h.mode = (uint32_t)mode;
	h.path_len = (uint32_t)strlen(f->path);
	h.off = off;
	h.len = len;

	pthread_mutex_lock(&log_lock);
	iov[0] = (struct iovec){&h, sizeof(h)};
	iov[1] = (struct iovec){f->path, h.path_len};
	cnt = 2;
	if (buf && want) {
		iov[cnt++] = (struct iovec){(void *)(uintptr_t)buf, want};
		want = 0;
	}
	for (;;) {
		/* Fill the rest of the batch from the caller's iovec. */
		while (want && cnt < IOLOG_IOV && i < ndata) {
			n = sx_min(data[i].iov_len, want);
			if (n)
				iov[cnt++] =
					(struct iovec){data[i].iov_base, n};
			want -= n;
			i++;
		}
		ret = write_all(iov, cnt);
		if (ret < 0 || !want || i >= ndata)
			break;
		cnt = 0;
	}
	pthread_mutex_unlock(&log_lock);
	if (ret < 0)
		return sx_error(ret, "write log: %s", strerror(-ret));
	if (want)
		return sx_error(-EINVAL,
				"write log: %s: write record longer than "
				"its iovec",
				f->path);
	return 0;
}

int sio_iolog_write(const struct sio_file *f, const void *buf,
		    const struct iovec *iov, int iovcnt, uint64_t len,
		    uint64_t off)
{
	if (!sio_iolog_wanted(f))
		return 0;
	if (!buf && len && (!iov || iovcnt <= 0))
		return sx_error(-EINVAL, "write log: %s: write without data",
				f->path);
	return append(f, SIO_OP_WRITE, 0, off, len, buf, iov, buf ? 0 : iovcnt);
}

int sio_iolog_op(const struct sio_file *f, int op, int mode, uint64_t off,
		 uint64_t len)
{
	if (!sio_iolog_wanted(f))
		return 0;
	return append(f, op, mode, off, len, NULL, NULL, 0);
}
