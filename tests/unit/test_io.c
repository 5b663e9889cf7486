/*
 * Unit tests for io/: files (direct and buffered), the synchronous helpers
 * with any alignment, the async queue, and fault injection.
 *
 * Files live in a fresh directory under $TMPDIR (or /tmp) and one under
 * /dev/shm (tmpfs: no or unknown direct I/O alignment), both removed at the
 * end. Exits 77 when the host refuses io_uring.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <liburing.h>

#include "testutil.h"
#include "common/error.h"
#include "io/fault.h"
#include "io/io.h"

static char disk_dir[PATH_MAX];
static char shm_dir[PATH_MAX];

static void path_in(char *out, const char *dir, const char *name)
{
	int n = snprintf(out, PATH_MAX, "%s/%s", dir, name);

	ck_assert_int_lt(n, PATH_MAX);
}

static struct sio_file *open_new(const char *dir, const char *name,
				 unsigned extra)
{
	char path[PATH_MAX];
	struct sio_file *f = NULL;
	int ret;

	path_in(path, dir, name);
	ret = sio_file_open(path, SIO_RDWR | SIO_CREATE | SIO_TRUNC | extra,
			    &f);
	ck_assert_msg(ret == 0, "open %s: %s", path, sx_last_error());
	return f;
}

static void fill(unsigned char *p, size_t len, unsigned seed)
{
	size_t i;

	for (i = 0; i < len; i++)
		p[i] = (unsigned char)((i * 131 + seed * 7 + (i >> 9)) | 1);
}

static bool all_zero(const unsigned char *p, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++) {
		if (p[i])
			return false;
	}
	return true;
}

static uint64_t file_size(struct sio_file *f)
{
	uint64_t sz = 0;

	ck_assert_int_eq(sio_file_size(f, &sz), 0);
	return sz;
}

START_TEST(test_open_flags)
{
	char path[PATH_MAX];
	struct sio_file *f = NULL;

	path_in(path, disk_dir, "flags.img");
	ck_assert_int_eq(sio_file_open(path, 1u << 10, &f), -EINVAL);
	ck_assert_int_eq(sio_file_open(path, SIO_CREATE, &f), -EINVAL);
	ck_assert_int_eq(sio_file_open(path, SIO_RDWR | SIO_EXCL, &f), -EINVAL);
	ck_assert_ptr_null(f);
	ck_assert_int_eq(sio_file_open(path, SIO_RDONLY, &f), -ENOENT);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), path));
	ck_assert_int_eq(
		sio_file_open(path, SIO_RDWR | SIO_CREATE | SIO_EXCL, &f), 0);
	sio_file_close(f);
	f = NULL;
	ck_assert_int_eq(
		sio_file_open(path, SIO_RDWR | SIO_CREATE | SIO_EXCL, &f),
		-EEXIST);
	ck_assert_int_eq(sio_file_open(disk_dir, SIO_RDONLY, &f), -EINVAL);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), disk_dir));
	ck_assert_ptr_null(f);
	sio_file_close(NULL);
}
END_TEST

static void check_alignment(const struct sio_file *f)
{
	if (f->direct) {
		ck_assert(f->align >= 512 && !(f->align & (f->align - 1)));
		ck_assert(f->mem_align >= 1 &&
			  !(f->mem_align & (f->mem_align - 1)));
		ck_assert_uint_le(f->mem_align, SIO_BUF_ALIGN);
	} else {
		ck_assert_uint_eq(f->align, 1);
		ck_assert_uint_eq(f->mem_align, 1);
	}
}

START_TEST(test_open_direct_buffered)
{
	struct sio_file *f;

	f = open_new(disk_dir, "direct.img", 0);
	check_alignment(f);
	ck_assert(f->writable);
	ck_assert(!f->is_blockdev);
	sio_file_close(f);

	f = open_new(disk_dir, "buffered.img", SIO_BUFFERED);
	ck_assert(!f->direct);
	check_alignment(f);
	sio_file_close(f);

	/* tmpfs: direct I/O on new kernels, with no alignment reported. */
	f = open_new(shm_dir, "shm.img", 0);
	check_alignment(f);
	sio_file_close(f);
}
END_TEST

/* Unaligned and aligned writes, checked against a model of the file. */
static void roundtrip(struct sio_file *f)
{
	static const struct {
		uint64_t off;
		size_t len;
		size_t buf_skew;
	} cases[] = {
		{0, 4096, 0},	      {1, 1, 0},       {511, 2, 3},
		{4000, 200, 1},	      {8192, 8192, 0}, {8192, 8192, 7},
		{12345, 6789, 5},     {65536, 512, 0}, {65537, 511, 0},
		{100000, 3 << 20, 9}, {70000, 1, 0},
	};
	const size_t model_len = 100000 + (3 << 20) + 8192;
	unsigned char *model, *buf, *back;
	size_t i, max_end = 0;

	model = calloc(1, model_len);
	buf = malloc((4 << 20) + 16);
	back = malloc(model_len + 4096);
	ck_assert(model && buf && back);
	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		unsigned char *p = buf + cases[i].buf_skew;
		int ret;

		fill(p, cases[i].len, (unsigned)i + 1);
		ret = sio_pwrite(f, p, cases[i].len, cases[i].off);
		ck_assert_msg(ret == 0, "case %zu: %s", i, sx_last_error());
		memcpy(model + cases[i].off, p, cases[i].len);
		if (cases[i].off + cases[i].len > max_end)
			max_end = cases[i].off + cases[i].len;
		/* Rounding to blocks must not grow the file. */
		ck_assert_uint_eq(file_size(f), max_end);

		memset(back, 0xaa, cases[i].len + 1);
		ret = sio_pread(f, back + 1, cases[i].len, cases[i].off);
		ck_assert_msg(ret == 0, "case %zu: %s", i, sx_last_error());
		ck_assert_msg(!memcmp(back + 1, p, cases[i].len),
			      "case %zu: data differs", i);
	}
	/* The whole file, from an odd offset, past its end. */
	ck_assert_int_eq(sio_pread(f, back + 3, model_len - 7, 7), 0);
	ck_assert(!memcmp(back + 3, model + 7, max_end - 7));
	ck_assert(all_zero(back + 3 + max_end - 7, model_len - max_end));
	free(model);
	free(buf);
	free(back);
}

START_TEST(test_sync_roundtrip)
{
	struct sio_file *f;

	f = open_new(disk_dir, "rt_direct.img", 0);
	roundtrip(f);
	sio_file_close(f);
	f = open_new(disk_dir, "rt_buffered.img", SIO_BUFFERED);
	roundtrip(f);
	sio_file_close(f);
	f = open_new(shm_dir, "rt_shm.img", 0);
	roundtrip(f);
	sio_file_close(f);
}
END_TEST

/* Every synchronous round trip counts, and only on its own thread. */
static void *count_in_thread(void *arg)
{
	struct sio_file *f = arg;
	uint64_t w0 = sio_sync_waits();
	unsigned char b[512];

	ck_assert_int_eq(sio_pread(f, b, sizeof(b), 0), 0);
	return (void *)(uintptr_t)(sio_sync_waits() - w0);
}

START_TEST(test_sync_waits_counted)
{
	struct sio_file *f = open_new(disk_dir, "waits.img", 0);
	unsigned char *buf = sio_buf_alloc(8192);
	struct sio_wvec v[2];
	uint64_t w0;
	pthread_t t;
	void *res;

	ck_assert_ptr_nonnull(buf);
	memset(buf, 7, 8192);
	w0 = sio_sync_waits();
	ck_assert_int_eq(sio_pwrite(f, buf, 4096, 0), 0);
	ck_assert_uint_eq(sio_sync_waits() - w0, 1);
	ck_assert_int_eq(sio_pread(f, buf, 4096, 0), 0);
	ck_assert_int_eq(sio_fdatasync(f), 0);
	ck_assert_uint_eq(sio_sync_waits() - w0, 3);
	/* A batch is one round trip. */
	v[0] = (struct sio_wvec){buf, 4096, 0};
	v[1] = (struct sio_wvec){buf + 4096, 4096, 8192};
	ck_assert_int_eq(sio_pwrite_many(f, v, 2), 0);
	ck_assert_uint_eq(sio_sync_waits() - w0, 4);
	ck_assert_int_eq(sio_file_truncate(f, 16384), 0);
	ck_assert_uint_eq(sio_sync_waits() - w0, 5);
	/* Another thread's waits are its own. */
	ck_assert_int_eq(pthread_create(&t, NULL, count_in_thread, f), 0);
	ck_assert_int_eq(pthread_join(t, &res), 0);
	ck_assert_uint_eq((uintptr_t)res, 1);
	ck_assert_uint_eq(sio_sync_waits() - w0, 5);
	sio_buf_free(buf);
	sio_file_close(f);
}
END_TEST

static void past_eof(struct sio_file *f)
{
	unsigned char data[1000], *buf;
	size_t n = 3 * 4096;

	fill(data, sizeof(data), 3);
	ck_assert_int_eq(sio_pwrite(f, data, sizeof(data), 0), 0);
	buf = sio_buf_alloc(n);
	ck_assert_ptr_nonnull(buf);

	/* Aligned: a direct read that ends off the grid at end of file. */
	memset(buf, 0xff, n);
	ck_assert_int_eq(sio_pread(f, buf, n, 0), 0);
	ck_assert(!memcmp(buf, data, sizeof(data)));
	ck_assert(all_zero(buf + sizeof(data), n - sizeof(data)));

	/* Unaligned, through the bounce buffer. */
	memset(buf, 0xff, n);
	ck_assert_int_eq(sio_pread(f, buf + 1, 2000, 500), 0);
	ck_assert(!memcmp(buf + 1, data + 500, 500));
	ck_assert(all_zero(buf + 501, 1500));

	/* Wholly past end of file. */
	memset(buf, 0xff, n);
	ck_assert_int_eq(sio_pread(f, buf, 4096, 1 << 20), 0);
	ck_assert(all_zero(buf, 4096));
	ck_assert_uint_eq(file_size(f), sizeof(data));
	sio_buf_free(buf);
}

START_TEST(test_sync_past_eof)
{
	struct sio_file *f;

	f = open_new(disk_dir, "eof_direct.img", 0);
	past_eof(f);
	sio_file_close(f);
	f = open_new(disk_dir, "eof_buffered.img", SIO_BUFFERED);
	past_eof(f);
	sio_file_close(f);
	f = open_new(shm_dir, "eof_shm.img", 0);
	past_eof(f);
	sio_file_close(f);
}
END_TEST

START_TEST(test_sync_errors)
{
	char path[PATH_MAX];
	struct sio_file *f, *ro;
	char c = 1;

	f = open_new(disk_dir, "errors.img", 0);
	ck_assert_int_eq(sio_pwrite(f, &c, 1, 0), 0);
	ck_assert_int_eq(sio_pread(f, NULL, 1, 0), -EINVAL);
	ck_assert_int_eq(sio_pread(f, &c, 2, UINT64_MAX), -EOVERFLOW);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "errors.img"));
	ck_assert_int_eq(sio_pread(f, NULL, 0, 0), 0);
	path_in(path, disk_dir, "errors.img");
	ck_assert_int_eq(sio_file_open(path, SIO_RDONLY, &ro), 0);
	ck_assert(!ro->writable);
	ck_assert_int_eq(sio_pwrite(ro, &c, 1, 0), -EBADF);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), path));
	sio_file_close(ro);
	sio_file_close(f);
}
END_TEST

START_TEST(test_size_truncate)
{
	struct sio_file *f = open_new(disk_dir, "trunc.img", 0);

	ck_assert_uint_eq(file_size(f), 0);
	ck_assert_int_eq(sio_file_truncate(f, 12345), 0);
	ck_assert_uint_eq(file_size(f), 12345);
	ck_assert_int_eq(sio_file_truncate(f, 0), 0);
	ck_assert_uint_eq(file_size(f), 0);
	ck_assert_int_eq(sio_file_truncate(f, UINT64_MAX), -EFBIG);
	sio_file_close(f);
}
END_TEST

static void punch(struct sio_file *f)
{
	const size_t len = 1 << 20;
	unsigned char *buf = sio_buf_alloc(len);
	struct stat st;
	int ret;

	ck_assert_ptr_nonnull(buf);
	ck_assert_int_eq(sio_fallocate(f, 0, 0, len), 0);
	ck_assert_uint_eq(file_size(f), len);
	fill(buf, len, 9);
	ck_assert_int_eq(sio_pwrite(f, buf, len, 0), 0);
	ck_assert_int_eq(sio_fdatasync(f), 0);
	ret = sio_fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			    65536, 131072);
	ck_assert_msg(ret == 0, "%s", sx_last_error());
	ck_assert_int_eq(sio_fsync(f), 0);
	ck_assert_uint_eq(file_size(f), len);
	ck_assert_int_eq(sio_pread(f, buf, len, 0), 0);
	ck_assert(all_zero(buf + 65536, 131072));
	ck_assert(!all_zero(buf, 65536));
	ck_assert(!all_zero(buf + 65536 + 131072, 4096));
	ck_assert_int_eq(fstat(f->fd, &st), 0);
	ck_assert_int_le(st.st_blocks * 512, (long)(len - 131072));
	sio_buf_free(buf);
}

START_TEST(test_fsync_fallocate)
{
	struct sio_file *f;

	f = open_new(disk_dir, "punch.img", 0);
	punch(f);
	sio_file_close(f);
	f = open_new(shm_dir, "punch_shm.img", 0);
	punch(f);
	sio_file_close(f);
}
END_TEST

static void *thread_io(void *arg)
{
	struct sio_file *f = arg;
	char buf[100];
	intptr_t ret;

	fill((unsigned char *)buf, sizeof(buf), 77);
	ret = sio_pwrite(f, buf, sizeof(buf), 12345);
	if (ret == 0)
		ret = sio_pread(f, buf, sizeof(buf), 12345);
	return (void *)ret;
}

/* Each thread gets its own ring, torn down when the thread exits. */
START_TEST(test_sync_threads)
{
	struct sio_file *f = open_new(disk_dir, "threads.img", 0);
	pthread_t t[4];
	void *res;
	int i;

	for (i = 0; i < 4; i++)
		ck_assert_int_eq(pthread_create(&t[i], NULL, thread_io, f), 0);
	for (i = 0; i < 4; i++) {
		ck_assert_int_eq(pthread_join(t[i], &res), 0);
		ck_assert_ptr_null(res);
	}
	sio_file_close(f);
}
END_TEST

/* A child forked after I/O makes its own ring; the parent keeps its own. */
START_TEST(test_sync_fork)
{
	struct sio_file *f = open_new(disk_dir, "fork.img", 0);
	char a[10] = "parent", b[10] = "";
	int status;
	pid_t pid;

	ck_assert_int_eq(sio_pwrite(f, a, sizeof(a), 0), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		if (sio_pread(f, b, sizeof(b), 0) || strcmp(b, "parent") ||
		    sio_pwrite(f, "child", 6, 100))
			_exit(1);
		_exit(0);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	ck_assert_int_eq(sio_pread(f, b, 6, 100), 0);
	ck_assert_str_eq(b, "child");
	sio_file_close(f);
}
END_TEST

/* Async helpers: a request that counts its completion. */
struct counter {
	unsigned done;
	unsigned failed;
	int last_res;
};

static void count_done(struct sio_req *req, int res)
{
	struct counter *c = req->priv;

	c->done++;
	c->last_res = res;
	if (res < 0 || (req->op <= SIO_OP_WRITE && (uint64_t)res != req->len))
		c->failed++;
}

static void set_rw(struct sio_req *req, enum sio_op op, struct sio_file *f,
		   void *buf, uint64_t len, uint64_t off, struct counter *c)
{
	memset(req, 0, sizeof(*req));
	req->op = op;
	req->file = f;
	req->buf = buf;
	req->len = len;
	req->off = off;
	req->done = count_done;
	req->priv = c;
}

static void drain(struct sio_queue *q)
{
	int ret;

	while (sio_queue_inflight(q)) {
		ret = sio_queue_run(q, 1);
		ck_assert_msg(ret >= 0, "%s", sx_last_error());
	}
}

static void async_many(struct sio_file *f)
{
	enum { N = 100, BS = 8192 };
	struct sio_req *reqs = calloc(N, sizeof(*reqs));
	unsigned char *buf = sio_buf_alloc((size_t)N * BS);
	unsigned char *check = malloc(BS);
	struct counter c = {0};
	struct sio_queue *q;
	int i, ret, ran = 0;

	ck_assert(reqs && buf && check);
	ck_assert_int_eq(sio_queue_create(8, &q), 0);
	for (i = 0; i < N; i++) {
		fill(buf + (size_t)i * BS, BS, (unsigned)i);
		set_rw(&reqs[i], SIO_OP_WRITE, f, buf + (size_t)i * BS, BS,
		       (uint64_t)i * BS, &c);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	ck_assert_uint_eq(sio_queue_inflight(q), N);
	/* Submitting never completed anything: callbacks run from run(). */
	ck_assert_uint_eq(c.done, 0);
	while (sio_queue_inflight(q)) {
		ret = sio_queue_run(q, 5);
		ck_assert_int_ge(ret, 0);
		ran += ret;
	}
	ck_assert_int_eq(ran, N);
	ck_assert_uint_eq(c.done, N);
	ck_assert_uint_eq(c.failed, 0);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(sio_pread(f, check, BS, (uint64_t)i * BS), 0);
		ck_assert(!memcmp(check, buf + (size_t)i * BS, BS));
	}

	/* And read it all back asynchronously, with run(q, N) at once. */
	memset(buf, 0, (size_t)N * BS);
	c = (struct counter){0};
	for (i = 0; i < N; i++) {
		set_rw(&reqs[i], SIO_OP_READ, f, buf + (size_t)i * BS, BS,
		       (uint64_t)i * BS, &c);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	ck_assert_int_eq(sio_queue_run(q, N), N);
	ck_assert_uint_eq(c.failed, 0);
	for (i = 0; i < N; i++) {
		fill(check, BS, (unsigned)i);
		ck_assert(!memcmp(check, buf + (size_t)i * BS, BS));
	}
	sio_queue_destroy(q);
	sio_buf_free(buf);
	free(check);
	free(reqs);
}

START_TEST(test_async_many)
{
	struct sio_file *f;

	f = open_new(disk_dir, "async_direct.img", 0);
	async_many(f);
	sio_file_close(f);
	f = open_new(disk_dir, "async_buffered.img", SIO_BUFFERED);
	async_many(f);
	sio_file_close(f);
	f = open_new(shm_dir, "async_shm.img", 0);
	async_many(f);
	sio_file_close(f);
}
END_TEST

START_TEST(test_async_iov)
{
	struct sio_file *f = open_new(disk_dir, "iov.img", 0);
	unsigned char *a = sio_buf_alloc(3 * 4096), *b = sio_buf_alloc(65536);
	unsigned char *check = malloc(3 * 4096);
	struct iovec wv[3], rv[2];
	struct counter c = {0};
	struct sio_queue *q;
	struct sio_req req;

	ck_assert(a && b && check);
	ck_assert_int_eq(sio_queue_create(4, &q), 0);
	fill(a, 3 * 4096, 21);
	/* Write three blocks in reverse order through the iovec. */
	wv[0] = (struct iovec){a + 8192, 4096};
	wv[1] = (struct iovec){a + 4096, 4096};
	wv[2] = (struct iovec){a, 4096};
	set_rw(&req, SIO_OP_WRITE, f, NULL, 3 * 4096, 4096, &c);
	req.iov = wv;
	req.iovcnt = 3;
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_uint_eq(c.failed, 0);
	ck_assert_int_eq(c.last_res, 3 * 4096);
	ck_assert_int_eq(sio_pread(f, check, 3 * 4096, 4096), 0);
	ck_assert(!memcmp(check, a + 8192, 4096));
	ck_assert(!memcmp(check + 4096, a + 4096, 4096));
	ck_assert(!memcmp(check + 8192, a, 4096));

	/* len 0 with an iovec: the iovec's sum; past EOF reads as zeros. */
	memset(b, 0xee, 65536);
	rv[0] = (struct iovec){b, 8192};
	rv[1] = (struct iovec){b + 16384, 32768};
	set_rw(&req, SIO_OP_READ, f, NULL, 0, 0, &c);
	req.iov = rv;
	req.iovcnt = 2;
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(c.last_res, 40960);
	ck_assert(all_zero(b, 4096));
	ck_assert(!memcmp(b + 4096, a + 8192, 4096));
	ck_assert(!memcmp(b + 16384, a + 4096, 4096));
	ck_assert(!memcmp(b + 16384 + 4096, a, 4096));
	ck_assert(all_zero(b + 16384 + 8192, 32768 - 8192));
	ck_assert_uint_eq(b[8192], 0xee);

	/* len shorter than the iovec: only len bytes move. */
	memset(b, 0xee, 65536);
	set_rw(&req, SIO_OP_READ, f, NULL, 8192 + 4096, 4096, &c);
	req.iov = rv;
	req.iovcnt = 2;
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(c.last_res, 8192 + 4096);
	ck_assert(!memcmp(b, a + 8192, 4096));
	ck_assert(!memcmp(b + 16384, a, 4096));
	ck_assert_uint_eq(b[16384 + 4096], 0xee);

	/* len longer than the iovec holds. */
	set_rw(&req, SIO_OP_READ, f, NULL, 65536, 0, &c);
	req.iov = rv;
	req.iovcnt = 2;
	ck_assert_int_eq(sio_queue_submit(q, &req), -EINVAL);
	ck_assert_uint_eq(sio_queue_inflight(q), 0);

	sio_queue_destroy(q);
	sio_buf_free(a);
	sio_buf_free(b);
	free(check);
	sio_file_close(f);
}
END_TEST

/* A chain: each callback submits the next block until all are written. */
struct chain {
	struct sio_queue *q;
	struct sio_req req;
	unsigned char *buf;
	unsigned next, total, errors;
};

static void chain_done(struct sio_req *req, int res)
{
	struct chain *ch = req->priv;

	if (res != (int)req->len)
		ch->errors++;
	if (++ch->next == ch->total)
		return;
	req->off = (uint64_t)ch->next * 4096;
	req->buf = ch->buf + (size_t)ch->next * 4096;
	if (sio_queue_submit(ch->q, req) < 0)
		ch->errors++;
}

START_TEST(test_async_callback_submits)
{
	struct sio_file *f = open_new(disk_dir, "chain.img", 0);
	struct chain ch = {.total = 50};
	unsigned char *check = malloc(50 * 4096);
	int runs = 0;

	ck_assert_ptr_nonnull(check);
	ck_assert_int_eq(sio_queue_create(2, &ch.q), 0);
	ch.buf = sio_buf_alloc(50 * 4096);
	ck_assert_ptr_nonnull(ch.buf);
	fill(ch.buf, 50 * 4096, 5);
	ch.req.op = SIO_OP_WRITE;
	ch.req.file = f;
	ch.req.buf = ch.buf;
	ch.req.len = 4096;
	ch.req.done = chain_done;
	ch.req.priv = &ch;
	ck_assert_int_eq(sio_queue_submit(ch.q, &ch.req), 0);
	while (sio_queue_inflight(ch.q)) {
		ck_assert_int_eq(sio_queue_run(ch.q, 1), 1);
		runs++;
	}
	ck_assert_int_eq(runs, 50);
	ck_assert_uint_eq(ch.errors, 0);
	ck_assert_int_eq(sio_pread(f, check, 50 * 4096, 0), 0);
	ck_assert(!memcmp(check, ch.buf, 50 * 4096));
	/* With nothing queued, run() does not wait. */
	ck_assert_int_eq(sio_queue_run(ch.q, 3), 0);
	sio_queue_destroy(ch.q);
	sio_buf_free(ch.buf);
	free(check);
	sio_file_close(f);
}
END_TEST

START_TEST(test_async_misaligned)
{
	struct sio_file *f = open_new(shm_dir, "misaligned.img", 0);
	struct sio_file *fb =
		open_new(shm_dir, "misaligned_b.img", SIO_BUFFERED);
	unsigned char *buf = sio_buf_alloc(3 * 4096);
	struct counter c = {0};
	struct sio_queue *q;
	struct sio_req req;

	ck_assert_ptr_nonnull(buf);
	ck_assert_int_eq(sio_queue_create(4, &q), 0);
	if (f->direct) {
		set_rw(&req, SIO_OP_WRITE, f, buf, 4096, 1, &c);
		ck_assert_int_eq(sio_queue_submit(q, &req), -EINVAL);
		ck_assert_ptr_nonnull(strstr(sx_last_error(), "misaligned"));
		set_rw(&req, SIO_OP_WRITE, f, buf, 100, 0, &c);
		ck_assert_int_eq(sio_queue_submit(q, &req), -EINVAL);
		set_rw(&req, SIO_OP_READ, f, buf + f->align / 2 + 1, f->align,
		       0, &c);
		ck_assert_int_eq(sio_queue_submit(q, &req), -EINVAL);
		ck_assert_uint_eq(sio_queue_inflight(q), 0);
	}
	/* The same on a buffered file is fine. */
	fill(buf, 4096, 1);
	set_rw(&req, SIO_OP_WRITE, fb, buf + 1, 100, 1, &c);
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_uint_eq(c.failed, 0);
	ck_assert_uint_eq(file_size(fb), 101);
	sio_queue_destroy(q);
	sio_buf_free(buf);
	sio_file_close(f);
	sio_file_close(fb);
}
END_TEST

START_TEST(test_async_past_eof_and_sync_ops)
{
	struct sio_file *f = open_new(disk_dir, "async_eof.img", 0);
	unsigned char *buf = sio_buf_alloc(16384);
	unsigned char data[3000];
	struct counter c = {0};
	struct sio_queue *q;
	struct sio_req req[3];

	ck_assert_ptr_nonnull(buf);
	fill(data, sizeof(data), 2);
	ck_assert_int_eq(sio_pwrite(f, data, sizeof(data), 0), 0);
	ck_assert_int_eq(sio_queue_create(4, &q), 0);
	memset(buf, 0xff, 16384);
	set_rw(&req[0], SIO_OP_READ, f, buf, 16384, 0, &c);
	ck_assert_int_eq(sio_queue_submit(q, &req[0]), 0);
	drain(q);
	ck_assert_int_eq(c.last_res, 16384);
	ck_assert(!memcmp(buf, data, sizeof(data)));
	ck_assert(all_zero(buf + sizeof(data), 16384 - sizeof(data)));

	set_rw(&req[0], SIO_OP_FSYNC, f, NULL, 0, 0, &c);
	set_rw(&req[1], SIO_OP_FDATASYNC, f, NULL, 0, 0, &c);
	set_rw(&req[2], SIO_OP_FALLOCATE, f, NULL, 1 << 20, 0, &c);
	ck_assert_int_eq(sio_queue_submit(q, &req[0]), 0);
	ck_assert_int_eq(sio_queue_submit(q, &req[1]), 0);
	ck_assert_int_eq(sio_queue_submit(q, &req[2]), 0);
	ck_assert_int_eq(sio_queue_run(q, 3), 3);
	ck_assert_uint_eq(c.done, 4);
	ck_assert_int_eq(c.last_res, 0);
	ck_assert_uint_eq(file_size(f), 1 << 20);
	sio_queue_destroy(q);
	sio_buf_free(buf);
	sio_file_close(f);
}
END_TEST

START_TEST(test_queue_destroy_drains)
{
	struct sio_file *f = open_new(disk_dir, "destroy.img", 0);
	unsigned char *buf = sio_buf_alloc(20 * 4096);
	struct sio_req reqs[20];
	struct counter c = {0};
	struct sio_queue *q;
	int i;

	ck_assert_ptr_nonnull(buf);
	ck_assert_int_eq(sio_queue_create(4, &q), 0);
	for (i = 0; i < 20; i++) {
		set_rw(&reqs[i], SIO_OP_WRITE, f, buf + i * 4096, 4096,
		       (uint64_t)i * 4096, &c);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	/* Hand them over but do not wait; destroy must wait for them. */
	ck_assert_int_ge(sio_queue_run(q, 0), 0);
	sio_queue_destroy(q);
	ck_assert_uint_eq(c.done, 20);
	ck_assert_uint_eq(c.failed, 0);
	ck_assert_uint_eq(file_size(f), 20 * 4096);
	sio_queue_destroy(NULL);
	ck_assert_int_eq(sio_queue_create(0, &q), -EINVAL);
	sio_buf_free(buf);
	sio_file_close(f);
}
END_TEST

/*
 * A batch larger than the sync ring, with aligned writes (batched), an
 * unaligned one (bounced) and a zero-length one, reads back exactly; an
 * injected fault on one item fails the batch with that error.
 */
static void pwrite_many(struct sio_file *f)
{
	enum { N = 40, LEN = 8192 };
	struct sio_wvec v[N + 2];
	unsigned char *data, *buf;
	unsigned i;

	data = sio_buf_alloc(N * LEN);
	buf = sio_buf_alloc(N * LEN);
	ck_assert_ptr_nonnull(data);
	ck_assert_ptr_nonnull(buf);
	fill(data, N * LEN, 7);
	/* Reverse order, every other slot of the file. */
	for (i = 0; i < N; i++)
		v[i] = (struct sio_wvec){data + i * LEN, LEN,
					 (uint64_t)(N - 1 - i) * 2 * LEN};
	/* Unaligned, in a slot of its own: ranges must not overlap. */
	v[N] = (struct sio_wvec){data + 1, 100, LEN + 3};
	v[N + 1] = (struct sio_wvec){data, 0, 0};
	ck_assert_int_eq(sio_pwrite_many(f, v, N + 2), 0);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(sio_pread(f, buf, LEN, v[i].off), 0);
		ck_assert(!memcmp(buf, v[i].buf, LEN));
	}
	ck_assert_int_eq(sio_pread(f, buf, 100, LEN + 3), 0);
	ck_assert(!memcmp(buf, data + 1, 100));

	ck_assert_int_eq(
		sio_fault_add(SIO_OP_WRITE, f->path, 10 * LEN, 1, EIO, 1, 0),
		0);
	for (i = 0; i < N; i++)
		v[i].off = (uint64_t)i * LEN;
	ck_assert_int_eq(sio_pwrite_many(f, v, N), -EIO);
	sio_fault_clear();
	ck_assert_int_eq(sio_pwrite_many(f, v, N), 0);
	sio_buf_free(data);
	sio_buf_free(buf);
}

START_TEST(test_sync_pwrite_many)
{
	struct sio_file *f;

	f = open_new(disk_dir, "many_direct.img", 0);
	pwrite_many(f);
	sio_file_close(f);
	f = open_new(disk_dir, "many_buffered.img", SIO_BUFFERED);
	pwrite_many(f);
	sio_file_close(f);
}
END_TEST

START_TEST(test_fault_sync)
{
	struct sio_file *f = open_new(disk_dir, "fault1.img", 0);
	struct sio_file *other = open_new(disk_dir, "other.img", 0);
	char buf[4096];

	memset(buf, 1, sizeof(buf));
	ck_assert_int_eq(sio_pwrite(f, buf, sizeof(buf), 0), 0);
	ck_assert_int_eq(sio_pwrite(f, buf, sizeof(buf), 8192), 0);
	ck_assert_int_eq(
		sio_fault_add(SIO_OP_READ, "fault1.img", 8192, 100, EIO, 2, 1),
		0);
	/* Other files, ranges, and writes do not match. */
	ck_assert_int_eq(sio_pread(other, buf, 100, 8192), 0);
	ck_assert_int_eq(sio_pread(f, buf, 4096, 4096), 0);
	ck_assert_int_eq(sio_pwrite(f, buf, 100, 8192), 0);
	/* after = 1: one passes, then count = 2 fail, then it is gone. */
	ck_assert_int_eq(sio_pread(f, buf, 1, 8291), 0);
	ck_assert_int_eq(sio_pread(f, buf, 10, 8190), -EIO);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "fault1.img"));
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "injected"));
	ck_assert_int_eq(sx_last_errno(), EIO);
	ck_assert_int_eq(sio_pread(f, buf, 1, 8192), -EIO);
	ck_assert_int_eq(sio_pread(f, buf, 1, 8192), 0);

	/* count 0: forever, len 0: to end of file; clear removes it. */
	ck_assert_int_eq(
		sio_fault_add(SIO_OP_WRITE, ".img", 1 << 20, 0, -ENOSPC, 0, 0),
		0);
	ck_assert_int_eq(sio_pwrite(f, buf, 1, (1 << 20) - 1), 0);
	ck_assert_int_eq(sio_pwrite(f, buf, 2, (1 << 20) - 1), -ENOSPC);
	ck_assert_int_eq(sio_pwrite(other, buf, 1, 1ULL << 40), -ENOSPC);
	ck_assert_int_eq(sio_pwrite(other, buf, 1, 1ULL << 40), -ENOSPC);
	sio_fault_clear();
	ck_assert_int_eq(sio_pwrite(f, buf, 2, (1 << 20) - 1), 0);

	ck_assert_int_eq(sio_fault_add(SIO_OP_FSYNC, "x", 0, 0, EIO, 1, 0),
			 -EINVAL);
	ck_assert_int_eq(sio_fault_add(SIO_OP_READ, "x", 0, 0, 0, 1, 0),
			 -EINVAL);
	ck_assert_int_eq(sio_fault_add(SIO_OP_READ, NULL, 0, 0, EIO, 1, 0),
			 -EINVAL);
	sio_file_close(f);
	sio_file_close(other);
}
END_TEST

START_TEST(test_fault_async)
{
	struct sio_file *f = open_new(disk_dir, "fault2.img", 0);
	unsigned char *buf = sio_buf_alloc(4 * 4096);
	struct sio_req reqs[4];
	struct counter c = {0};
	struct sio_queue *q;
	int i;

	ck_assert_ptr_nonnull(buf);
	ck_assert_int_eq(sio_queue_create(4, &q), 0);
	ck_assert_int_eq(sio_fault_add(SIO_OP_WRITE, "fault2.img", 4096, 4096,
				       ENOSPC, 1, 0),
			 0);
	for (i = 0; i < 4; i++) {
		set_rw(&reqs[i], SIO_OP_WRITE, f, buf + i * 4096, 4096,
		       (uint64_t)i * 4096, &c);
		/* The fault shows in the callback, not in submit. */
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	ck_assert_uint_eq(c.done, 0);
	ck_assert_int_eq(sio_queue_run(q, 4), 4);
	ck_assert_uint_eq(c.failed, 1);
	/* Used up: the same write now goes through. */
	set_rw(&reqs[1], SIO_OP_WRITE, f, buf + 4096, 4096, 4096, &c);
	ck_assert_int_eq(sio_queue_submit(q, &reqs[1]), 0);
	ck_assert_int_eq(sio_queue_run(q, 1), 1);
	ck_assert_uint_eq(c.failed, 1);
	sio_fault_clear();
	sio_queue_destroy(q);
	sio_buf_free(buf);
	sio_file_close(f);
}
END_TEST

/*
 * A delay rule holds a queued write on a timer in the ring (the submitter
 * goes on; the request counts as held until the timer ends) and makes a
 * synchronous write sleep. Order only, no timing: a held write has not
 * completed after a run that reaped an undelayed one.
 */
START_TEST(test_fault_delay)
{
	struct sio_file *f = open_new(disk_dir, "delay.img", 0);
	unsigned char *buf = sio_buf_alloc(2 * 4096), *back;
	struct sio_req reqs[2];
	struct counter c = {0};
	struct sio_queue *q;

	ck_assert_ptr_nonnull(buf);
	back = sio_buf_alloc(4096);
	ck_assert_ptr_nonnull(back);
	memset(buf, 0xd1, 2 * 4096);
	ck_assert_int_eq(sio_queue_create(4, &q), 0);
	/* Held far longer than a 4 KiB write takes; then a short one. */
	ck_assert_int_eq(sio_fault_add_delay(SIO_OP_WRITE, "delay.img", 0, 4096,
					     2000000000ull, 1),
			 0);
	ck_assert_int_eq(sio_fault_add_delay(SIO_OP_WRITE, "delay.img", 0, 4096,
					     1000000ull, 1),
			 0);
	ck_assert_int_eq(sio_fault_add_delay(SIO_OP_FSYNC, "x", 0, 0, 1, 0),
			 -EINVAL);
	ck_assert_int_eq(sio_fault_add_delay(SIO_OP_READ, "x", 0, 0, 0, 0),
			 -EINVAL);
	set_rw(&reqs[0], SIO_OP_WRITE, f, buf, 4096, 0, &c);
	set_rw(&reqs[1], SIO_OP_WRITE, f, buf + 4096, 4096, 4096, &c);
	ck_assert_int_eq(sio_queue_submit(q, &reqs[0]), 0);
	ck_assert_uint_eq(sio_fault_delayed(), 1);
	ck_assert_int_eq(sio_queue_submit(q, &reqs[1]), 0);
	ck_assert_uint_eq(sio_fault_delayed(), 1);
	ck_assert_int_eq(sio_queue_run(q, 1), 1);
	/* The undelayed one ended first; the held one is still held. */
	ck_assert_uint_eq(c.done, 1);
	ck_assert_uint_eq(sio_fault_delayed(), 1);
	ck_assert_uint_eq(sio_queue_inflight(q), 1);
	ck_assert_int_eq(sio_queue_run(q, 1), 1);
	ck_assert_uint_eq(c.done, 2);
	ck_assert_uint_eq(c.failed, 0);
	ck_assert_uint_eq(sio_fault_delayed(), 0);
	ck_assert_int_eq(sio_pread(f, back, 4096, 0), 0);
	ck_assert_uint_eq(back[0], 0xd1);
	/* The second rule: a synchronous write sleeps, then writes. */
	memset(buf, 0xd2, 4096);
	ck_assert_int_eq(sio_pwrite(f, buf, 4096, 0), 0);
	ck_assert_uint_eq(sio_fault_delayed(), 0);
	ck_assert_int_eq(sio_pread(f, back, 4096, 0), 0);
	ck_assert_uint_eq(back[4095], 0xd2);
	sio_fault_clear();
	sio_queue_destroy(q);
	sio_buf_free(back);
	sio_buf_free(buf);
	sio_file_close(f);
}
END_TEST

START_TEST(test_fault_parse)
{
	struct sio_file *f = open_new(disk_dir, "parse.img", SIO_BUFFERED);
	char buf[16] = {0};

	ck_assert_int_eq(sio_fault_parse("bogus"), -EINVAL);
	ck_assert_int_eq(sio_fault_parse("read:x:0:0"), -EINVAL);
	ck_assert_int_eq(sio_fault_parse("rea:x:0:0:5"), -EINVAL);
	ck_assert_int_eq(sio_fault_parse("read:x:zz:0:5"), -EINVAL);
	ck_assert_int_eq(sio_fault_parse("read:x:0:-1:5"), -EINVAL);
	ck_assert_int_eq(sio_fault_parse("read:x:0:0:EWHAT"), -EINVAL);
	ck_assert_int_eq(sio_fault_parse("read:x:0:0:0"), -EINVAL);
	ck_assert_int_eq(sio_fault_parse("read:x:0:0:5:1:2:3"), -EINVAL);
	ck_assert_int_eq(sio_fault_parse("read:x:0:0:5:1x"), -EINVAL);
	/* A bad rule anywhere adds none of them. */
	ck_assert_int_eq(sio_fault_parse("read:parse.img:0:0:5;nope"), -EINVAL);
	ck_assert_int_eq(sio_pread(f, buf, 1, 0), 0);

	ck_assert_int_eq(sio_fault_parse("write:parse.img:0x10:16:ENOSPC:1;"
					 "read:parse.img:0:0:5:2:1"),
			 0);
	ck_assert_int_eq(sio_pwrite(f, buf, 16, 0), 0);
	ck_assert_int_eq(sio_pwrite(f, buf, 16, 32), 0);
	ck_assert_int_eq(sio_pwrite(f, buf, 16, 8), -ENOSPC);
	ck_assert_int_eq(sio_pwrite(f, buf, 16, 8), 0);
	ck_assert_int_eq(sio_pread(f, buf, 1, 0), 0);
	ck_assert_int_eq(sio_pread(f, buf, 1, 0), -EIO);
	ck_assert_int_eq(sio_pread(f, buf, 1, 999), -EIO);
	ck_assert_int_eq(sio_pread(f, buf, 1, 0), 0);
	sio_fault_clear();
	sio_file_close(f);
}
END_TEST

/* The spec syntax the siphon tool accepts in SIPHON_FAULT. */
START_TEST(test_fault_spec)
{
	struct sio_file *f;
	char buf[16] = {0};

	ck_assert_int_eq(sio_fault_parse("read:specfault.img:0:512:EIO:1"), 0);
	f = open_new(disk_dir, "specfault.img", 0);
	ck_assert_int_eq(sio_pwrite(f, buf, sizeof(buf), 0), 0);
	ck_assert_int_eq(sio_pread(f, buf, 1, 511), -EIO);
	ck_assert_int_eq(sio_pread(f, buf, 1, 511), 0);
	sio_fault_clear();
	sio_file_close(f);
}
END_TEST

/* "delayMS" in place of the errno: the request is held, then succeeds. */
START_TEST(test_fault_spec_delay)
{
	struct sio_file *f;
	char buf[16] = {0};
	uint64_t before = sio_fault_delays();

	ck_assert_int_eq(sio_fault_parse("write:specdelay.img:0:0:delay0"),
			 -EINVAL);
	ck_assert_int_eq(sio_fault_parse("write:specdelay.img:0:0:delay1:1:1"),
			 -EINVAL);
	ck_assert_int_eq(sio_fault_parse("write:specdelay.img:0:0:delay1:1"),
			 0);
	f = open_new(disk_dir, "specdelay.img", 0);
	ck_assert_int_eq(sio_pwrite(f, buf, sizeof(buf), 0), 0);
	ck_assert_uint_eq(sio_fault_delays(), before + 1);
	/* The count ran out: the next write is not held. */
	ck_assert_int_eq(sio_pwrite(f, buf, sizeof(buf), 0), 0);
	ck_assert_uint_eq(sio_fault_delays(), before + 1);
	sio_fault_clear();
	sio_file_close(f);
}
END_TEST

START_TEST(test_fault_spec_malformed)
{
	struct sio_file *f;
	char buf[16] = {0};

	ck_assert_int_eq(sio_fault_parse("read:oops"), -EINVAL);
	ck_assert_int_eq(sio_fault_parse(NULL), -EINVAL);
	/* Nothing was added: I/O goes on as before. */
	f = open_new(disk_dir, "specbad.img", 0);
	ck_assert_int_eq(sio_pwrite(f, buf, sizeof(buf), 0), 0);
	ck_assert_int_eq(sio_pread(f, buf, 1, 0), 0);
	sio_file_close(f);
}
END_TEST

/* The library itself never reads SIPHON_FAULT. */
START_TEST(test_fault_env_ignored)
{
	struct sio_file *f;
	char buf[16] = {0};

	ck_assert_int_eq(
		setenv("SIPHON_FAULT", "read:envfault.img:0:512:EIO", 1), 0);
	f = open_new(disk_dir, "envfault.img", 0);
	ck_assert_int_eq(sio_pwrite(f, buf, sizeof(buf), 0), 0);
	ck_assert_int_eq(sio_pread(f, buf, 1, 0), 0);
	sio_file_close(f);
	unsetenv("SIPHON_FAULT");
}
END_TEST

START_TEST(test_buf_alloc)
{
	void *p = sio_buf_alloc(1);

	ck_assert_ptr_nonnull(p);
	ck_assert_uint_eq((uintptr_t)p % SIO_BUF_ALIGN, 0);
	memset(p, 0, SIO_BUF_ALIGN);
	sio_buf_free(p);
	p = sio_buf_alloc(0);
	ck_assert_ptr_nonnull(p);
	sio_buf_free(p);
	ck_assert_ptr_null(sio_buf_alloc(SIZE_MAX));
	sio_buf_free(NULL);
}
END_TEST

/*
 * io_uring refused, as seccomp or kernel.io_uring_disabled would: the filter
 * covers only the thread that installs it, and a new thread has no ring yet.
 */
static void *refused_thread(void *arg)
{
	struct sock_filter insns[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
			 offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {sizeof(insns) / sizeof(insns[0]), insns};
	char path[PATH_MAX], *msg = arg;
	struct sio_file *f = NULL;
	struct sio_queue *q = NULL;
	intptr_t bad = 0;

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
	    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
		return (void *)(intptr_t)-1;
	path_in(path, disk_dir, "refused.img");
	if (sio_file_open(path, SIO_RDWR | SIO_CREATE, &f) != -EPERM || f)
		bad |= 2;
	snprintf(msg, SX_ERROR_MAX, "%s", sx_last_error());
	if (sio_queue_create(8, &q) != -EPERM || q)
		bad |= 4;
	if (!strstr(sx_last_error(), "io_uring is unavailable"))
		bad |= 8;
	return (void *)bad;
}

START_TEST(test_io_uring_refused)
{
	char msg[SX_ERROR_MAX] = "";
	pthread_t t;
	void *res;

	ck_assert_int_eq(pthread_create(&t, NULL, refused_thread, msg), 0);
	ck_assert_int_eq(pthread_join(t, &res), 0);
	ck_assert_msg(res != (void *)(intptr_t)-1, "cannot install seccomp");
	ck_assert_msg(res == NULL, "result %ld, message: %s", (long)res, msg);
	ck_assert_ptr_nonnull(strstr(msg, "refused.img: io_uring is "
					  "unavailable on this host "
					  "(io_uring_queue_init: Operation "
					  "not permitted)"));
	ck_assert_ptr_nonnull(strstr(msg, "kernel.io_uring_disabled"));
}
END_TEST

/* POLL waits on any fd, here an eventfd wrapped in a bare sio_file. */
START_TEST(test_async_poll)
{
	struct sio_file ef = {.path = (char *)"eventfd"};
	struct counter c = {0};
	struct sio_queue *q;
	struct sio_req req;
	uint64_t one = 1;

	ef.fd = eventfd(0, EFD_CLOEXEC);
	ck_assert_int_ge(ef.fd, 0);
	ck_assert_int_eq(sio_queue_create(2, &q), 0);
	set_rw(&req, SIO_OP_POLL, &ef, NULL, 0, 0, &c);
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	ck_assert_int_eq(sio_queue_run(q, 0), 0);
	ck_assert_uint_eq(sio_queue_inflight(q), 1);
	ck_assert_int_eq(write(ef.fd, &one, sizeof(one)), sizeof(one));
	ck_assert_int_eq(sio_queue_run(q, 1), 1);
	ck_assert(c.last_res & POLLIN);
	sio_queue_destroy(q);
	close(ef.fd);
}
END_TEST

static Suite *io_suite(void)
{
	Suite *s = suite_create("io");
	TCase *tc;

	tc = tcase_create("file");
	tcase_add_test(tc, test_open_flags);
	tcase_add_test(tc, test_open_direct_buffered);
	tcase_add_test(tc, test_sync_roundtrip);
	tcase_add_test(tc, test_sync_waits_counted);
	tcase_add_test(tc, test_sync_pwrite_many);
	tcase_add_test(tc, test_sync_past_eof);
	tcase_add_test(tc, test_sync_errors);
	tcase_add_test(tc, test_size_truncate);
	tcase_add_test(tc, test_fsync_fallocate);
	tcase_add_test(tc, test_sync_threads);
	tcase_add_test(tc, test_sync_fork);
	tcase_add_test(tc, test_buf_alloc);
	tcase_add_test(tc, test_io_uring_refused);
	suite_add_tcase(s, tc);

	tc = tcase_create("queue");
	tcase_add_test(tc, test_async_many);
	tcase_add_test(tc, test_async_iov);
	tcase_add_test(tc, test_async_callback_submits);
	tcase_add_test(tc, test_async_misaligned);
	tcase_add_test(tc, test_async_past_eof_and_sync_ops);
	tcase_add_test(tc, test_queue_destroy_drains);
	tcase_add_test(tc, test_async_poll);
	suite_add_tcase(s, tc);

	tc = tcase_create("fault");
	tcase_add_test(tc, test_fault_sync);
	tcase_add_test(tc, test_fault_async);
	tcase_add_test(tc, test_fault_delay);
	tcase_add_test(tc, test_fault_parse);
	tcase_add_test(tc, test_fault_spec);
	tcase_add_test(tc, test_fault_spec_delay);
	tcase_add_test(tc, test_fault_spec_malformed);
	tcase_add_test(tc, test_fault_env_ignored);
	suite_add_tcase(s, tc);
	return s;
}

static int rm_entry(const char *path, const struct stat *st, int type,
		    struct FTW *ftw)
{
	(void)st;
	(void)type;
	(void)ftw;
	return remove(path);
}

static int make_dir(char *out, const char *base)
{
	int n = snprintf(out, PATH_MAX, "%s/siphon-test-io-XXXXXX", base);

	if (n >= PATH_MAX || !mkdtemp(out)) {
		fprintf(stderr, "mkdtemp under %s: %s\n", base,
			strerror(errno));
		return -1;
	}
	return 0;
}

int main(void)
{
	const char *tmp = getenv("TMPDIR");
	int failed;

	if (!have_uring())
		return 77;
	unsetenv("SIPHON_FAULT");

	if (make_dir(disk_dir, tmp && *tmp ? tmp : "/tmp") < 0)
		return 1;
	if (make_dir(shm_dir, "/dev/shm") < 0) {
		nftw(disk_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
		return 1;
	}
	failed = run_checks(io_suite());
	nftw(disk_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
	nftw(shm_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
	return failed ? 1 : 0;
}
