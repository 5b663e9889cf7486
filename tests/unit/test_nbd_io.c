/*
 * Unit tests for NBD exports as sio_files (io/nbd.c, issue 12): opening,
 * synchronous and queued reads, block status, read-only behaviour, and
 * what a user sees when the server fails, against real servers (qemu-nbd
 * and nbdkit on Unix sockets, started and stopped by each test).
 *
 * Oracles: the bytes of the file qemu-nbd exports; for nbdkit's plugins,
 * what qemu-img convert copies out of the same export; for block status,
 * qemu-img map of the exported file.
 *
 * Exits 77 without io_uring, qemu-img, qemu-nbd or nbdkit.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"
#include "nbdserver.h"
#include "common/error.h"
#include "io/io.h"
#include "io/lock.h"
#include "io/nbd.h"

static char tmpdir[] = "/tmp/siphon-test-nbd-XXXXXX";
static char base_path[256];

/* The exported file: data, holes and written zeros, 4 KiB granular. */
#define KIB 1024ULL
#define MIB (1024 * KIB)
#define RAW_SIZE (4 * MIB + 12 * KIB)
static unsigned char *raw; /* its bytes */

static const struct {
	uint64_t off, len;
	bool zeros; /* written zeros: allocated, not a hole */
} raw_runs[] = {
	{0, 64 * KIB, false},
	{1 * MIB, 512 * KIB, false},
	{1 * MIB + 512 * KIB, 512 * KIB, true},
	{3 * MIB + 4 * KIB, 8 * KIB, false},
	{RAW_SIZE - 4 * KIB, 4 * KIB, false},
};

static void fill(unsigned char *p, size_t len, uint64_t off)
{
	size_t i;

	for (i = 0; i < len; i++)
		p[i] = (unsigned char)(((off + i) * 131 + ((off + i) >> 9)) |
				       1);
}

/* Write the exported file (untimed fixture, before the tests fork). */
static void make_base(void)
{
	unsigned i;
	int fd;

	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		exit(1);
	}
	snprintf(base_path, sizeof(base_path), "%s/base.raw", tmpdir);
	raw = calloc(1, RAW_SIZE);
	fd = open(base_path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (!raw || fd < 0 || ftruncate(fd, RAW_SIZE) < 0) {
		perror(base_path);
		exit(1);
	}
	for (i = 0; i < sizeof(raw_runs) / sizeof(raw_runs[0]); i++) {
		unsigned char *p = raw + raw_runs[i].off;

		if (!raw_runs[i].zeros)
			fill(p, raw_runs[i].len, raw_runs[i].off);
		if (pwrite(fd, p, raw_runs[i].len, (off_t)raw_runs[i].off) !=
		    (ssize_t)raw_runs[i].len) {
			perror("pwrite");
			exit(1);
		}
	}
	close(fd);
}

/* What a read of [off, off + len) of bytes (size bytes) must give. */
static void expect(const unsigned char *bytes, uint64_t size,
		   unsigned char *out, uint64_t len, uint64_t off)
{
	uint64_t avail = off >= size ? 0 : size - off;

	if (avail > len)
		avail = len;
	memcpy(out, bytes + off, avail);
	memset(out + avail, 0, len - avail);
}

static void check_bytes(const unsigned char *bytes, uint64_t size,
			const unsigned char *got, uint64_t len, uint64_t off)
{
	unsigned char *want = malloc(len ? len : 1);
	uint64_t i;

	ck_assert_ptr_nonnull(want);
	expect(bytes, size, want, len, off);
	for (i = 0; i < len && got[i] == want[i]; i++)
		;
	ck_assert_msg(i == len,
		      "read of %llu at %llu differs at byte %llu: %u != %u",
		      (unsigned long long)len, (unsigned long long)off,
		      (unsigned long long)i, got[i], want[i]);
	free(want);
}

static int open_addr(const char *sock, const char *export, unsigned flags,
		     struct sio_file **f)
{
	struct sio_nbd_addr a = {
		.transport = SIO_NBD_UNIX,
		.socket = (char *)sock,
		.export_name = (char *)export,
	};

	return sio_nbd_open(&a, flags, f);
}

static struct sio_file *open_unix(const char *sock, const char *export)
{
	struct sio_file *f = NULL;
	int ret = open_addr(sock, export, SIO_RDONLY, &f);

	ck_assert_msg(ret == 0, "sio_nbd_open %s: %s", sock, sx_last_error());
	ck_assert(sio_file_is_nbd(f));
	return f;
}

static void start_qemu(struct nbd_server *s)
{
	ck_assert_int_eq(nbd_server_qemu(s, tmpdir, "qemu.sock", base_path), 0);
}

static void start_kit(struct nbd_server *s, const char *name,
		      const char *const args[])
{
	ck_assert_int_eq(nbd_server_nbdkit(s, tmpdir, name, args), 0);
}

/* The export behind sock copied out by qemu-img (the oracle), size bytes. */
static unsigned char *dump_export(const char *sock, uint64_t size)
{
	char out[PATH_MAX];
	unsigned char *bytes = malloc(size);
	int fd;

	ck_assert_ptr_nonnull(bytes);
	snprintf(out, sizeof(out), "%s/dump-%d.raw", tmpdir, (int)getpid());
	RUN("qemu-img convert -f raw -O raw 'nbd+unix:///?socket=%s' '%s'",
	    sock, out);
	fd = open(out, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, bytes, size, 0), (ssize_t)size);
	close(fd);
	unlink(out);
	return bytes;
}

struct done_rec {
	int res;
	int calls;
};

static void on_done(struct sio_req *req, int res)
{
	struct done_rec *d = req->priv;

	d->res = res;
	d->calls++;
}

/* A read of len bytes at off of f into buf, its result into rec. */
static struct sio_req read_req(struct sio_file *f, void *buf, uint64_t off,
			       uint64_t len, struct done_rec *rec)
{
	return (struct sio_req){.op = SIO_OP_READ,
				.file = f,
				.buf = buf,
				.off = off,
				.len = len,
				.done = on_done,
				.priv = rec};
}

static void drain(struct sio_queue *q)
{
	while (sio_queue_inflight(q))
		ck_assert_int_ge(sio_queue_run(q, 1), 0);
}

START_TEST(test_open_and_info)
{
	struct nbd_server srv;
	struct sio_nbd_info info;
	struct sio_file *f;
	char uri[PATH_MAX], server[PATH_MAX];
	uint64_t size = 0;

	start_qemu(&srv);
	f = open_unix(srv.sock, "exp");
	snprintf(uri, sizeof(uri), "nbd+unix:///exp?socket=%s", srv.sock);
	snprintf(server, sizeof(server), "unix:%s", srv.sock);
	ck_assert_str_eq(f->path, uri);
	ck_assert_int_eq(f->fd, -1);
	ck_assert(!f->direct);
	ck_assert(!f->writable);
	ck_assert_uint_eq(f->align, 1);
	ck_assert_uint_eq(f->mem_align, 1);
	ck_assert_int_eq(sio_file_size(f, &size), 0);
	ck_assert_uint_eq(size, RAW_SIZE);
	ck_assert_int_eq(sio_nbd_get_info(f, &info), 0);
	ck_assert_str_eq(info.uri, uri);
	ck_assert_str_eq(info.server, server);
	ck_assert_str_eq(info.export_name, "exp");
	ck_assert_uint_eq(info.size, RAW_SIZE);
	ck_assert(info.block_status);
	ck_assert_uint_gt(info.max_request, 0);
	ck_assert_uint_le(info.max_request, 64 * MIB);
	/* Not an NBD file, or none at all. */
	ck_assert(!sio_file_is_nbd(NULL));
	ck_assert_int_eq(sio_nbd_get_info(NULL, &info), -EINVAL);
	ck_assert(info.can_multi_conn);
	ck_assert_uint_eq(info.connections, SIO_NBD_DEFAULT_CONNECTIONS);
	sio_file_close(f);

	/* Settings of the export's own: held by it, checked. */
	{
		struct sio_nbd_addr a = {.transport = SIO_NBD_UNIX,
					 .socket = srv.sock,
					 .export_name = "exp"};
		struct sio_nbd_opts o = {.connections = 2};

		ck_assert_int_eq(sio_nbd_open_opts(&a, SIO_RDONLY, &o, &f), 0);
		ck_assert_int_eq(sio_nbd_get_info(f, &info), 0);
		ck_assert_uint_eq(info.connections, 2);
		sio_file_close(f);
		f = NULL;
		o.connections = SIO_NBD_MAX_CONNECTIONS + 1;
		ck_assert_int_eq(sio_nbd_open_opts(&a, SIO_RDONLY, &o, &f),
				 -EINVAL);
		ck_assert_ptr_null(f);
	}
	nbd_server_stop(&srv);
}
END_TEST

START_TEST(test_sync_read)
{
	static const struct {
		uint64_t off, len;
	} reads[] = {
		{0, 1},
		{0, 4096},
		{1, 4095},
		{65535, 3},
		{60000, 200000},
		{1 * MIB, 512 * KIB},
		{1 * MIB + 500 * KIB, 100 * KIB},
		{RAW_SIZE - 100, 100},
		{RAW_SIZE - 100, 5000}, /* past the end: zeros */
		{RAW_SIZE, 4096},
		{RAW_SIZE + MIB, 10},
		{0, RAW_SIZE + 8192},
	};
	struct nbd_server srv;
	struct sio_file *f;
	unsigned char *buf;
	uint64_t waits;
	unsigned i;

	start_qemu(&srv);
	f = open_unix(srv.sock, "exp");
	for (i = 0; i < sizeof(reads) / sizeof(reads[0]); i++) {
		buf = malloc(reads[i].len);
		ck_assert_ptr_nonnull(buf);
		memset(buf, 0xAA, reads[i].len);
		waits = sio_sync_waits();
		ck_assert_msg(sio_pread(f, buf, reads[i].len, reads[i].off) ==
				      0,
			      "read %u: %s", i, sx_last_error());
		ck_assert_uint_gt(sio_sync_waits(), waits);
		check_bytes(raw, RAW_SIZE, buf, reads[i].len, reads[i].off);
		free(buf);
	}
	ck_assert_int_eq(sio_pread(f, NULL, 0, 0), 0);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/*
 * Many reads in flight on one queue, of various sizes and offsets
 * (past the end too), some through an iovec, against the file's bytes.
 */
static void async_reads(struct sio_file *f, const unsigned char *bytes,
			uint64_t size, unsigned nreq, unsigned seed)
{
	struct sio_req *reqs = calloc(nreq, sizeof(*reqs));
	struct done_rec *recs = calloc(nreq, sizeof(*recs));
	unsigned char **bufs = calloc(nreq, sizeof(*bufs));
	struct iovec(*iovs)[3] = calloc(nreq, sizeof(*iovs));
	struct sio_queue *q = NULL;
	uint64_t len, cut1, cut2;
	unsigned i;

	ck_assert(reqs && recs && bufs && iovs);
	ck_assert_int_eq(sio_queue_create(64, &q), 0);
	for (i = 0; i < nreq; i++) {
		len = 1 + (uint64_t)rand_r(&seed) % (256 * KIB);
		reqs[i].op = SIO_OP_READ;
		reqs[i].file = f;
		reqs[i].off = (uint64_t)rand_r(&seed) % (size + 64 * KIB);
		if (i % 7 == 0)
			reqs[i].off &= ~(uint64_t)4095;
		reqs[i].len = len;
		reqs[i].done = on_done;
		reqs[i].priv = &recs[i];
		bufs[i] = malloc(len);
		ck_assert_ptr_nonnull(bufs[i]);
		memset(bufs[i], 0xAA, len);
		if (i % 5 == 0 && len >= 3) {
			cut1 = 1 + (uint64_t)rand_r(&seed) % (len - 2);
			cut2 = cut1 + 1 +
			       (uint64_t)rand_r(&seed) % (len - cut1 - 1);
			iovs[i][0] = (struct iovec){bufs[i], cut1};
			iovs[i][1] =
				(struct iovec){bufs[i] + cut1, cut2 - cut1};
			iovs[i][2] = (struct iovec){bufs[i] + cut2, len - cut2};
			reqs[i].iov = iovs[i];
			reqs[i].iovcnt = 3;
			reqs[i].len = i % 10 == 0 ? 0 : len;
		} else {
			reqs[i].buf = bufs[i];
		}
		ck_assert_msg(sio_queue_submit(q, &reqs[i]) == 0, "submit: %s",
			      sx_last_error());
	}
	ck_assert_uint_eq(sio_queue_inflight(q), nreq);
	drain(q);
	for (i = 0; i < nreq; i++) {
		len = reqs[i].len ? reqs[i].len
				  : iovs[i][0].iov_len + iovs[i][1].iov_len +
					    iovs[i][2].iov_len;
		ck_assert_int_eq(recs[i].calls, 1);
		ck_assert_msg(recs[i].res == (int)len, "req %u: %d (%s)", i,
			      recs[i].res, sx_last_error());
		check_bytes(bytes, size, bufs[i], len, reqs[i].off);
		free(bufs[i]);
	}
	sio_queue_destroy(q);
	free(iovs);
	free(bufs);
	free(recs);
	free(reqs);
}

START_TEST(test_async_read)
{
	struct nbd_server srv;
	struct sio_file *f;

	start_qemu(&srv);
	f = open_unix(srv.sock, "exp");
	async_reads(f, raw, RAW_SIZE, 300, 1);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* nbdkit's sparse-random data, judged by what qemu-img copies out. */
START_TEST(test_sparse_random)
{
	static const char *const args[] = {"sparse-random", "16M", "seed=42",
					   NULL};
	struct nbd_server srv;
	struct sio_file *f;
	unsigned char *bytes, *buf;
	uint64_t off;

	start_kit(&srv, "kit.sock", args);
	bytes = dump_export(srv.sock, 16 * MIB);
	f = open_unix(srv.sock, "");
	buf = malloc(3 * MIB);
	ck_assert_ptr_nonnull(buf);
	for (off = 0; off < 16 * MIB; off += 3 * MIB) {
		ck_assert_int_eq(sio_pread(f, buf, 3 * MIB, off + 7), 0);
		check_bytes(bytes, 16 * MIB, buf, 3 * MIB, off + 7);
	}
	free(buf);
	async_reads(f, bytes, 16 * MIB, 200, 2);
	free(bytes);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* A server whose maximum block is 64 KiB: larger reads are split. */
START_TEST(test_split_max_block)
{
	static const char *const args[] = {"--filter=blocksize-policy",
					   "pattern",
					   "8M",
					   "blocksize-maximum=65536",
					   "blocksize-error-policy=error",
					   NULL};
	struct nbd_server srv;
	struct sio_nbd_info info;
	struct sio_req req = {0};
	struct done_rec rec = {0};
	struct sio_queue *q;
	struct sio_file *f;
	unsigned char *bytes, *buf;

	start_kit(&srv, "kit.sock", args);
	bytes = dump_export(srv.sock, 8 * MIB);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_nbd_get_info(f, &info), 0);
	ck_assert_uint_eq(info.max_block, 65536);
	ck_assert_uint_eq(info.max_request, 65536);
	buf = malloc(2 * MIB);
	ck_assert_ptr_nonnull(buf);
	ck_assert_msg(sio_pread(f, buf, 2 * MIB, 3 * MIB + 5) == 0, "%s",
		      sx_last_error());
	check_bytes(bytes, 8 * MIB, buf, 2 * MIB, 3 * MIB + 5);

	ck_assert_int_eq(sio_queue_create(8, &q), 0);
	memset(buf, 0, 2 * MIB);
	req = read_req(f, buf, MIB + 3, 2 * MIB, &rec);
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(rec.calls, 1);
	ck_assert_msg(rec.res == (int)(2 * MIB), "%d: %s", rec.res,
		      sx_last_error());
	check_bytes(bytes, 8 * MIB, buf, 2 * MIB, MIB + 3);
	async_reads(f, bytes, 8 * MIB, 100, 3);
	sio_queue_destroy(q);
	free(buf);
	free(bytes);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* A server with a 4 KiB minimum block: the file's alignment follows. */
START_TEST(test_min_block)
{
	static const char *const args[] = {"--filter=blocksize-policy",
					   "pattern",
					   "4M",
					   "blocksize-minimum=4096",
					   "blocksize-error-policy=error",
					   NULL};
	struct nbd_server srv;
	struct sio_req req;
	struct done_rec rec = {0};
	struct sio_queue *q;
	struct sio_file *f;
	unsigned char *bytes, *buf;

	start_kit(&srv, "kit.sock", args);
	bytes = dump_export(srv.sock, 4 * MIB);
	f = open_unix(srv.sock, "");
	ck_assert_uint_eq(f->align, 4096);
	buf = malloc(64 * KIB);
	ck_assert_ptr_nonnull(buf);
	/* Unaligned synchronous reads go through a bounce buffer. */
	ck_assert_msg(sio_pread(f, buf, 5000, 100) == 0, "%s", sx_last_error());
	check_bytes(bytes, 4 * MIB, buf, 5000, 100);
	ck_assert_int_eq(sio_pread(f, buf, 64 * KIB, 4 * MIB - 10), 0);
	check_bytes(bytes, 4 * MIB, buf, 64 * KIB, 4 * MIB - 10);
	/* Queued reads must be aligned, as on direct files. */
	ck_assert_int_eq(sio_queue_create(8, &q), 0);
	req = read_req(f, buf, 100, 4096, &rec);
	ck_assert_int_eq(sio_queue_submit(q, &req), -EINVAL);
	req.off = 8192;
	req.len = 16384;
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(rec.res, 16384);
	check_bytes(bytes, 4 * MIB, buf, 16384, 8192);
	sio_queue_destroy(q);
	free(buf);
	free(bytes);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

#define BLOCKS (RAW_SIZE / (4 * KIB))

/* qemu-img map of the exported file, per 4 KiB block: data?, zero? */
static void qemu_map(bool *data, bool *zero)
{
	unsigned long long start, length, b;
	char map[256];
	int z, d, n = 0;
	FILE *fp;

	snprintf(map, sizeof(map), "%s/map-%d.txt", tmpdir, (int)getpid());
	RUN("qemu-img map --output=json -f raw '%s' | python3 -c '"
	    "import json, sys\n"
	    "for e in json.load(sys.stdin):\n"
	    "    print(e[\"start\"], e[\"length\"], int(e[\"zero\"]), "
	    "int(e[\"data\"]))' > '%s'",
	    base_path, map);
	fp = fopen(map, "r");
	ck_assert_ptr_nonnull(fp);
	while (fscanf(fp, "%llu %llu %d %d", &start, &length, &z, &d) == 4) {
		ck_assert(start % 4096 == 0 && length % 4096 == 0);
		for (b = start / 4096; b < (start + length) / 4096; b++) {
			ck_assert_uint_lt(b, BLOCKS);
			data[b] = d;
			zero[b] = z;
			n++;
		}
	}
	fclose(fp);
	unlink(map);
	ck_assert_int_eq(n, BLOCKS);
}

START_TEST(test_block_status)
{
	static bool qdata[BLOCKS], qzero[BLOCKS], data[BLOCKS], zero[BLOCKS];
	struct sio_nbd_extent v[4];
	struct nbd_server srv;
	struct sio_file *f;
	uint64_t off = 0, b, sum;
	unsigned n, i, calls = 0;

	qemu_map(qdata, qzero);
	start_qemu(&srv);
	f = open_unix(srv.sock, "exp");
	/* Few extents a call: the walk goes on where the last one ended. */
	while (off < RAW_SIZE) {
		ck_assert_msg(sio_nbd_block_status(f, off, RAW_SIZE - off, v, 4,
						   &n) == 0,
			      "%s", sx_last_error());
		ck_assert_uint_gt(n, 0);
		for (i = 0; i < n; i++) {
			ck_assert_uint_gt(v[i].len, 0);
			ck_assert(off % 4096 == 0 && v[i].len % 4096 == 0);
			for (b = off / 4096; b < (off + v[i].len) / 4096; b++) {
				data[b] = !(v[i].flags & SIO_NBD_HOLE);
				zero[b] = v[i].flags & SIO_NBD_ZERO;
			}
			if (i)
				ck_assert_uint_ne(v[i].flags, v[i - 1].flags);
			off += v[i].len;
		}
		calls++;
	}
	ck_assert_uint_eq(off, RAW_SIZE);
	ck_assert_uint_gt(calls, 1);
	for (b = 0; b < BLOCKS; b++) {
		ck_assert_msg(data[b] == qdata[b] && zero[b] == qzero[b],
			      "block %llu: data %d zero %d, qemu-img map says "
			      "data %d zero %d",
			      (unsigned long long)b, data[b], zero[b], qdata[b],
			      qzero[b]);
	}
	/* Clipped to the export; nothing at or past its end. */
	ck_assert_int_eq(
		sio_nbd_block_status(f, RAW_SIZE - 4096, MIB, v, 4, &n), 0);
	for (i = 0, sum = 0; i < n; i++)
		sum += v[i].len;
	ck_assert_uint_eq(sum, 4096);
	ck_assert_int_eq(sio_nbd_block_status(f, RAW_SIZE, MIB, v, 4, &n), 0);
	ck_assert_uint_eq(n, 0);
	ck_assert_int_eq(sio_nbd_block_status(f, 0, MIB, v, 0, &n), -EINVAL);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* One SIO_OP_NBD_STATUS of [off, off + len) on q: its result, into v[4]. */
static int queue_status(struct sio_queue *q, struct sio_file *f, uint64_t off,
			uint64_t len, struct sio_nbd_extent *v)
{
	struct done_rec rec = {0};
	struct sio_req req = {.op = SIO_OP_NBD_STATUS,
			      .file = f,
			      .buf = v,
			      .off = off,
			      .len = len,
			      .mode = 4,
			      .done = on_done,
			      .priv = &rec};

	ck_assert_msg(sio_queue_submit(q, &req) == 0, "%s", sx_last_error());
	drain(q);
	ck_assert_int_eq(rec.calls, 1);
	return rec.res;
}

/*
 * The same walk on a queue (SIO_OP_NBD_STATUS, the engine's way: the
 * worker never waits for the server), against qemu-img map; and what the
 * queue refuses.
 */
START_TEST(test_block_status_queue)
{
	static bool qdata[BLOCKS], qzero[BLOCKS], data[BLOCKS], zero[BLOCKS];
	struct sio_nbd_extent v[4];
	struct nbd_server srv;
	struct sio_queue *q;
	struct sio_file *f, *plain;
	uint64_t off = 0, b, waits;
	int i, n;

	qemu_map(qdata, qzero);
	start_qemu(&srv);
	f = open_unix(srv.sock, "exp");
	ck_assert_int_eq(sio_queue_create(16, &q), 0);
	waits = sio_sync_waits();
	while (off < RAW_SIZE) {
		n = queue_status(q, f, off, RAW_SIZE - off, v);
		ck_assert_msg(n > 0 && n <= 4, "status at %llu: %d %s",
			      (unsigned long long)off, n, sx_last_error());
		for (i = 0; i < n; i++) {
			ck_assert_uint_gt(v[i].len, 0);
			for (b = off / 4096; b < (off + v[i].len) / 4096; b++) {
				data[b] = !(v[i].flags & SIO_NBD_HOLE);
				zero[b] = v[i].flags & SIO_NBD_ZERO;
			}
			off += v[i].len;
		}
	}
	ck_assert_uint_eq(off, RAW_SIZE);
	ck_assert_uint_eq(sio_sync_waits(), waits);
	for (b = 0; b < BLOCKS; b++)
		ck_assert_msg(data[b] == qdata[b] && zero[b] == qzero[b],
			      "block %llu: data %d zero %d, qemu-img map says "
			      "data %d zero %d",
			      (unsigned long long)b, data[b], zero[b], qdata[b],
			      qzero[b]);
	ck_assert_int_eq(queue_status(q, f, RAW_SIZE, MIB, v), 0);
	{
		struct sio_req req = {.op = SIO_OP_NBD_STATUS,
				      .file = f,
				      .buf = v,
				      .len = MIB,
				      .mode = 0,
				      .done = on_done};

		ck_assert_int_eq(sio_queue_submit(q, &req), -EINVAL);
		ck_assert_int_eq(sio_file_open(base_path, SIO_RDONLY, &plain),
				 0);
		req.file = plain;
		req.mode = 4;
		ck_assert_int_eq(sio_queue_submit(q, &req), -EINVAL);
		sio_file_close(plain);
	}
	sio_queue_destroy(q);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/*
 * Without base:allocation on the server, everything is data. (nbdkit
 * without structured replies cannot offer any meta context; its
 * noextents filter still offers base:allocation, all data.)
 */
START_TEST(test_block_status_unsupported)
{
	static const char *const args[] = {"--no-sr", "memory", "1M", NULL};
	struct sio_nbd_extent v[4];
	struct sio_nbd_info info;
	struct nbd_server srv;
	struct sio_file *f;
	unsigned n;

	start_kit(&srv, "kit.sock", args);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_nbd_get_info(f, &info), 0);
	ck_assert(!info.block_status);
	ck_assert_int_eq(sio_nbd_block_status(f, 4096, 2 * MIB, v, 4, &n), 0);
	ck_assert_uint_eq(n, 1);
	ck_assert_uint_eq(v[0].len, MIB - 4096);
	ck_assert_uint_eq(v[0].flags, 0);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

START_TEST(test_writes_refused)
{
	struct nbd_server srv;
	struct sio_wvec wv;
	struct sio_req req;
	struct done_rec rec = {0};
	struct sio_queue *q;
	struct sio_file *f = NULL;
	char buf[4096] = {0};

	start_qemu(&srv);
	ck_assert_int_eq(open_addr(srv.sock, "exp", SIO_RDWR, &f), -EROFS);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "read-only"));
	ck_assert_ptr_null(f);
	ck_assert_int_eq(open_addr(srv.sock, "exp", 1u << 20, &f), -EINVAL);
	f = open_unix(srv.sock, "exp");
	ck_assert_int_eq(sio_pwrite(f, buf, sizeof(buf), 0), -EROFS);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), srv.sock));
	wv = (struct sio_wvec){buf, sizeof(buf), 0};
	ck_assert_int_eq(sio_pwrite_many(f, &wv, 1), -EROFS);
	ck_assert_int_eq(sio_file_truncate(f, 0), -EROFS);
	ck_assert_int_eq(sio_fallocate(f, 0, 0, 4096), -EROFS);
	ck_assert_int_eq(sio_fsync(f), 0);
	ck_assert_int_eq(sio_fdatasync(f), 0);
	ck_assert_int_eq(sio_file_lock(f, SIO_LOCK_READER_PERM,
				       SIO_LOCK_READER_UNSHARED),
			 0);

	ck_assert_int_eq(sio_queue_create(8, &q), 0);
	req = (struct sio_req){.op = SIO_OP_WRITE,
			       .file = f,
			       .buf = buf,
			       .len = sizeof(buf),
			       .done = on_done,
			       .priv = &rec};
	ck_assert_int_eq(sio_queue_submit(q, &req), -EROFS);
	req.op = SIO_OP_FALLOCATE;
	ck_assert_int_eq(sio_queue_submit(q, &req), -EROFS);
	req.op = SIO_OP_POLL;
	ck_assert_int_eq(sio_queue_submit(q, &req), -EINVAL);
	req.op = SIO_OP_FDATASYNC;
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(rec.calls, 1);
	ck_assert_int_eq(rec.res, 0);
	sio_queue_destroy(q);
	/* The export is unchanged. */
	ck_assert_int_eq(sio_pread(f, buf, sizeof(buf), 0), 0);
	check_bytes(raw, RAW_SIZE, (unsigned char *)buf, sizeof(buf), 0);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* Reads nbdkit's log filter saw start (lines "... Read id=N ..."). */
static unsigned logged_reads(const char *log)
{
	char line[1024];
	unsigned n = 0;
	FILE *fp = fopen(log, "r");

	if (!fp)
		return 0;
	while (fgets(line, sizeof(line), fp)) {
		if (strstr(line, "Read id=") && !strstr(line, "return="))
			n++;
	}
	fclose(fp);
	return n;
}

/*
 * N reads on one queue all reach the server at once (nbdkit's delay
 * filter holds each for a minute, on enough threads, its log filter
 * counts them); then the server is killed while they wait: every one
 * completes with -EIO, naming the server, and the queue drains; later
 * reads fail at once.
 */
START_TEST(test_server_killed)
{
	enum { N = 100 };
	static unsigned char bufs[N][64 * KIB];
	struct timespec nap = {.tv_nsec = 10 * 1000 * 1000};
	const char *args[] = {"--threads=128",
			      "--filter=log",
			      "--filter=delay",
			      "memory",
			      "16M",
			      "rdelay=60",
			      NULL,
			      NULL};
	struct sio_req reqs[N + 1];
	struct done_rec recs[N + 1] = {{0}};
	char log[PATH_MAX], logarg[PATH_MAX + 16];
	struct nbd_server srv;
	struct sio_queue *q;
	struct sio_file *f;
	unsigned i;

	sio_nbd_set_timeouts(0, 0); /* no reconnect: fail at once */
	snprintf(log, sizeof(log), "%s/delay-%d.log", tmpdir, (int)getpid());
	snprintf(logarg, sizeof(logarg), "logfile=%s", log);
	args[6] = logarg;
	start_kit(&srv, "kit.sock", args);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_queue_create(32, &q), 0);
	for (i = 0; i < N; i++) {
		reqs[i] =
			read_req(f, bufs[i], i * 64 * KIB, 64 * KIB, &recs[i]);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	/* Until the server has them all (bounded: a stuck one fails). */
	for (i = 0; i < 3000 && logged_reads(log) < N; i++) {
		ck_assert_int_eq(sio_queue_run(q, 0), 0);
		nanosleep(&nap, NULL);
	}
	ck_assert_uint_eq(logged_reads(log), N);
	ck_assert_uint_eq(sio_queue_inflight(q), N);
	nbd_server_stop(&srv);
	drain(q);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(recs[i].calls, 1);
		ck_assert_int_eq(recs[i].res, -EIO);
	}
	ck_assert_ptr_nonnull(strstr(sx_last_error(), srv.sock));
	reqs[N] = reqs[0];
	reqs[N].priv = &recs[N];
	ck_assert_int_eq(sio_queue_submit(q, &reqs[N]), 0);
	drain(q);
	ck_assert_int_eq(recs[N].res, -EIO);
	ck_assert_int_eq(sio_pread(f, bufs[0], 4096, 0), -EIO);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), srv.sock));
	sio_queue_destroy(q);
	sio_file_close(f);
}
END_TEST

/*
 * qemu-nbd killed with many reads queued and not yet collected: each
 * completes once, with its bytes or -EIO; nothing hangs.
 */
START_TEST(test_server_killed_qemu)
{
	enum { N = 200 };
	static unsigned char bufs[N][16 * KIB];
	struct sio_req reqs[N];
	struct done_rec recs[N] = {{0}};
	struct nbd_server srv;
	struct sio_queue *q;
	struct sio_file *f;
	unsigned i;

	sio_nbd_set_timeouts(0, 0); /* no reconnect: fail at once */
	start_qemu(&srv);
	f = open_unix(srv.sock, "exp");
	ck_assert_int_eq(sio_queue_create(64, &q), 0);
	for (i = 0; i < N; i++) {
		reqs[i] = read_req(f, bufs[i], (i * 20 * KIB) % RAW_SIZE,
				   16 * KIB, &recs[i]);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	nbd_server_stop(&srv);
	drain(q);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(recs[i].calls, 1);
		if (recs[i].res == -EIO)
			continue;
		ck_assert_int_eq(recs[i].res, 16 * KIB);
		check_bytes(raw, RAW_SIZE, bufs[i], 16 * KIB, reqs[i].off);
	}
	/* The connection is gone: a new read cannot succeed. */
	recs[0].calls = 0;
	ck_assert_int_eq(sio_queue_submit(q, &reqs[0]), 0);
	drain(q);
	ck_assert_int_eq(recs[0].calls, 1);
	ck_assert_int_eq(recs[0].res, -EIO);
	sio_queue_destroy(q);
	sio_file_close(f);
}
END_TEST

/*
 * The base file served by nbdkit (file plugin, read-only) on "re.sock",
 * with nbdkit's delay filter holding each read rdelay seconds when rdelay
 * is not NULL, and its log filter writing log.
 */
static void start_file_kit(struct nbd_server *s, const char *rdelay,
			   const char *log)
{
	static char filearg[PATH_MAX + 8], logarg[PATH_MAX + 16], delayarg[64];
	const char *args[17];
	unsigned n = 0;

	snprintf(filearg, sizeof(filearg), "file=%s", base_path);
	snprintf(logarg, sizeof(logarg), "logfile=%s", log);
	args[n++] = "-r";
	args[n++] = "--threads=128";
	args[n++] = "--filter=log";
	if (rdelay)
		args[n++] = "--filter=delay";
	args[n++] = "file";
	args[n++] = filearg;
	args[n++] = logarg;
	if (rdelay) {
		snprintf(delayarg, sizeof(delayarg), "rdelay=%s", rdelay);
		args[n++] = delayarg;
	}
	args[n] = NULL;
	start_kit(s, "re.sock", args);
}

/* Run q until the server's log shows n reads started (bounded). */
static void wait_logged(struct sio_queue *q, const char *log, unsigned n)
{
	struct timespec nap = {.tv_nsec = 10 * 1000 * 1000};
	unsigned i;

	for (i = 0; i < 3000 && logged_reads(log) < n; i++) {
		ck_assert_int_ge(sio_queue_run(q, 0), 0);
		nanosleep(&nap, NULL);
	}
	ck_assert_uint_ge(logged_reads(log), n);
}

/*
 * The server killed while N reads wait on it, and started again within
 * the reconnect window: every read completes once, with the right bytes
 * (sent again whole on the new connection, into the same memory); the
 * file's own connection (synchronous reads) comes back too.
 */
START_TEST(test_reconnect)
{
	enum { N = 64 };
	static unsigned char bufs[N][32 * KIB];
	struct sio_req reqs[N];
	struct done_rec recs[N] = {{0}};
	char log[PATH_MAX], log2[PATH_MAX];
	unsigned char sync_buf[8 * KIB];
	struct nbd_server srv;
	struct sio_queue *q;
	struct sio_file *f;
	unsigned i;

	sio_nbd_set_timeouts(20000, 0);
	snprintf(log, sizeof(log), "%s/re-%d.log", tmpdir, (int)getpid());
	snprintf(log2, sizeof(log2), "%s/re2-%d.log", tmpdir, (int)getpid());
	start_file_kit(&srv, "60", log);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_queue_create(32, &q), 0);
	for (i = 0; i < N; i++) {
		memset(bufs[i], 0xee, sizeof(bufs[i]));
		reqs[i] = read_req(f, bufs[i],
				   (i * 60 * KIB) % (RAW_SIZE - 32 * KIB),
				   32 * KIB, &recs[i]);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	wait_logged(q, log, N);
	nbd_server_stop(&srv);
	/* The reads wait for a new server rather than fail. */
	for (i = 0; i < 20; i++)
		ck_assert_int_ge(sio_queue_run(q, 0), 0);
	ck_assert_uint_eq(sio_queue_inflight(q), N);
	start_file_kit(&srv, NULL, log2);
	drain(q);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(recs[i].calls, 1);
		ck_assert_msg(recs[i].res == 32 * KIB, "read %u: %d (%s)", i,
			      recs[i].res, sx_last_error());
		check_bytes(raw, RAW_SIZE, bufs[i], 32 * KIB, reqs[i].off);
	}
	ck_assert_int_eq(sio_pread(f, sync_buf, sizeof(sync_buf), 12345), 0);
	check_bytes(raw, RAW_SIZE, sync_buf, sizeof(sync_buf), 12345);
	sio_queue_destroy(q);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/*
 * Killed for good: past the window the reads fail with -EIO, naming the
 * server and saying it gave up; a read after a new server came up gets
 * a window of its own and succeeds.
 */
START_TEST(test_reconnect_gives_up)
{
	enum { N = 16 };
	static unsigned char bufs[N][16 * KIB];
	struct sio_req reqs[N + 1];
	struct done_rec recs[N + 1] = {{0}};
	char log[PATH_MAX];
	struct nbd_server srv;
	struct sio_queue *q;
	struct sio_file *f;
	unsigned i;

	sio_nbd_set_timeouts(500, 0);
	snprintf(log, sizeof(log), "%s/gu-%d.log", tmpdir, (int)getpid());
	start_file_kit(&srv, "60", log);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_queue_create(32, &q), 0);
	for (i = 0; i < N; i++) {
		reqs[i] =
			read_req(f, bufs[i], i * 16 * KIB, 16 * KIB, &recs[i]);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	wait_logged(q, log, N);
	nbd_server_stop(&srv);
	drain(q);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(recs[i].calls, 1);
		ck_assert_int_eq(recs[i].res, -EIO);
	}
	ck_assert_ptr_nonnull(strstr(sx_last_error(), srv.sock));
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "giving up"));
	/* A server again, and a new read: it connects and reads. */
	start_file_kit(&srv, NULL, log);
	reqs[N] = reqs[3];
	reqs[N].priv = &recs[N];
	ck_assert_int_eq(sio_queue_submit(q, &reqs[N]), 0);
	drain(q);
	ck_assert_int_eq(recs[N].res, 16 * KIB);
	check_bytes(raw, RAW_SIZE, bufs[3], 16 * KIB, reqs[N].off);
	sio_queue_destroy(q);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/*
 * The server comes back with another export (a different size) on the
 * same socket: the layer is refused, its reads fail, nothing is read
 * from the wrong export.
 */
START_TEST(test_reconnect_other_export)
{
	enum { N = 8 };
	static unsigned char bufs[N][16 * KIB];
	const char *mem[17] = {"--filter=log", "memory", "8M", NULL, NULL};
	struct sio_req reqs[N];
	struct done_rec recs[N] = {{0}};
	char log[PATH_MAX], logarg[PATH_MAX + 16];
	struct nbd_server srv;
	struct sio_queue *q;
	struct sio_file *f;
	unsigned i;

	sio_nbd_set_timeouts(20000, 0);
	snprintf(log, sizeof(log), "%s/oe-%d.log", tmpdir, (int)getpid());
	start_file_kit(&srv, "60", log);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_queue_create(32, &q), 0);
	for (i = 0; i < N; i++) {
		reqs[i] =
			read_req(f, bufs[i], i * 16 * KIB, 16 * KIB, &recs[i]);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	wait_logged(q, log, N);
	nbd_server_stop(&srv);
	snprintf(logarg, sizeof(logarg), "logfile=%s", log);
	mem[3] = logarg;
	start_kit(&srv, "re.sock", mem);
	drain(q);
	for (i = 0; i < N; i++)
		ck_assert_int_eq(recs[i].res, -EIO);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "not the same export"));
	ck_assert_int_eq(sio_pread(f, bufs[0], 4096, 0), -EIO);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "not the same export"));
	sio_queue_destroy(q);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/*
 * A server that accepts reads and never answers: the request timeout
 * ends them with -EIO saying so (no reconnect window here), the queue
 * drains instead of waiting for ever.
 */
START_TEST(test_hung_server)
{
	enum { N = 4 };
	static unsigned char bufs[N][16 * KIB];
	struct sio_req reqs[N];
	struct done_rec recs[N] = {{0}};
	char log[PATH_MAX];
	struct nbd_server srv;
	struct sio_queue *q;
	struct sio_file *f;
	unsigned i;

	sio_nbd_set_timeouts(0, 300);
	snprintf(log, sizeof(log), "%s/hung-%d.log", tmpdir, (int)getpid());
	start_file_kit(&srv, "600", log);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_queue_create(32, &q), 0);
	for (i = 0; i < N; i++) {
		reqs[i] =
			read_req(f, bufs[i], i * 16 * KIB, 16 * KIB, &recs[i]);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	drain(q);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(recs[i].calls, 1);
		ck_assert_int_eq(recs[i].res, -EIO);
	}
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "did not answer"));
	sio_queue_destroy(q);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/*
 * qemu-nbd as users start it, one client at a time (no --shared, and so
 * no multi-conn): the file's own connection is that client, and a second
 * open gets no handshake and ends with a message saying why instead of
 * waiting for ever (the request timeout bounds handshakes). A queue's
 * connection gets the client's place (the file's own makes way), and the
 * file's own comes back when the queue is gone; a synchronous read while
 * the queue holds the place fails with that message.
 */
START_TEST(test_one_client_server)
{
	static unsigned char buf[16 * KIB];
	struct sio_req req;
	struct done_rec rec = {0};
	struct nbd_server srv;
	struct sio_queue *q;
	struct sio_file *f, *g = NULL;
	char sock[PATH_MAX];
	char *argv[] = {"qemu-nbd",	"-k",	   sock,  "-x",
			"exp",		"-f",	   "raw", "-r",
			"--persistent", base_path, NULL};

	sio_nbd_set_timeouts(0, 500);
	snprintf(sock, sizeof(sock), "%s/one.sock", tmpdir);
	ck_assert_int_eq(nbd_server_start(&srv, sock, argv), 0);
	f = open_unix(srv.sock, "exp");
	ck_assert_int_eq(sio_pread(f, buf, sizeof(buf), 0), 0);
	check_bytes(raw, RAW_SIZE, buf, sizeof(buf), 0);
	ck_assert_int_eq(open_addr(srv.sock, "exp", SIO_RDONLY, &g),
			 -ETIMEDOUT);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "--shared"));
	ck_assert_int_eq(sio_queue_create(8, &q), 0);
	memset(buf, 0, sizeof(buf));
	req = read_req(f, buf, 4096, sizeof(buf), &rec);
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(rec.calls, 1);
	ck_assert_msg(rec.res == (int)sizeof(buf), "%d: %s", rec.res,
		      sx_last_error());
	check_bytes(raw, RAW_SIZE, buf, sizeof(buf), 4096);
	ck_assert_int_eq(sio_pread(f, buf, sizeof(buf), 0), -ETIMEDOUT);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "--shared"));
	sio_queue_destroy(q);
	memset(buf, 0, sizeof(buf));
	ck_assert_int_eq(sio_pread(f, buf, sizeof(buf), 8192), 0);
	check_bytes(raw, RAW_SIZE, buf, sizeof(buf), 8192);
	/* Made way again, and the server gone meanwhile: a dropped one. */
	ck_assert_int_eq(sio_queue_create(8, &q), 0);
	rec = (struct done_rec){0};
	req = read_req(f, buf, 0, sizeof(buf), &rec);
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(rec.res, (int)sizeof(buf));
	sio_queue_destroy(q);
	nbd_server_stop(&srv);
	ck_assert_int_eq(sio_pread(f, buf, sizeof(buf), 0), -EIO);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "lost"));
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* nbdkit's error filter fails every read: -EIO, sync and queued. */
START_TEST(test_server_errors)
{
	static const char *const args[] = {
		"--filter=error",	 "memory", "1M", "error-pread=EIO",
		"error-pread-rate=100%", NULL};
	struct sio_nbd_extent v[4];
	struct nbd_server srv;
	struct sio_req req;
	struct done_rec rec = {0};
	struct sio_queue *q;
	struct sio_file *f;
	char buf[4096];
	unsigned n;

	start_kit(&srv, "kit.sock", args);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_pread(f, buf, sizeof(buf), 0), -EIO);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), srv.sock));
	ck_assert_int_eq(sio_queue_create(8, &q), 0);
	req = read_req(f, buf, 4096, sizeof(buf), &rec);
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(rec.calls, 1);
	ck_assert_int_eq(rec.res, -EIO);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), srv.sock));
	/* The connection survives a failed read. */
	ck_assert_int_eq(sio_nbd_block_status(f, 0, MIB, v, 4, &n), 0);
	ck_assert_int_eq(sio_pread(f, buf, sizeof(buf), 0), -EIO);
	sio_queue_destroy(q);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

START_TEST(test_connect_errors)
{
	static const char *const tls_args[] = {"--tls=require", NULL, "memory",
					       "1M", NULL};
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	const char *tls[5];
	char path[sizeof(sa.sun_path)], psk[128], tlsarg[sizeof(psk) + 16];
	struct sio_nbd_addr a = {.transport = SIO_NBD_UNIX};
	struct nbd_server srv;
	struct sio_file *f = NULL;
	int fd, ret;

	/* No socket there. */
	snprintf(path, sizeof(path), "%s/nosuch.sock", tmpdir);
	ret = open_addr(path, "exp", SIO_RDONLY, &f);
	ck_assert_int_lt(ret, 0);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), path));
	ck_assert_ptr_null(f);

	/* A socket nobody listens on. */
	snprintf(path, sizeof(path), "%s/deaf.sock", tmpdir);
	unlink(path);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ret = open_addr(path, "exp", SIO_RDONLY, &f);
	ck_assert_msg(ret == -ECONNREFUSED, "%d: %s", ret, sx_last_error());
	ck_assert_ptr_nonnull(strstr(sx_last_error(), path));
	close(fd);

	/* No such export. */
	start_qemu(&srv);
	ret = open_addr(srv.sock, "nosuch", SIO_RDONLY, &f);
	ck_assert_int_lt(ret, 0);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "'nosuch'"));
	ck_assert_ptr_nonnull(strstr(sx_last_error(), srv.sock));
	ck_assert_ptr_null(f);
	nbd_server_stop(&srv);

	/* A server that demands TLS. */
	snprintf(psk, sizeof(psk), "%s/psk", tmpdir);
	RUN("echo alice:000102030405060708090a0b0c0d0e0f > '%s'", psk);
	snprintf(tlsarg, sizeof(tlsarg), "--tls-psk=%s", psk);
	memcpy(tls, tls_args, sizeof(tls));
	tls[1] = tlsarg;
	start_kit(&srv, "secure.sock", tls);
	ret = open_addr(srv.sock, "", SIO_RDONLY, &f);
	ck_assert_msg(ret == -EOPNOTSUPP, "%d: %s", ret, sx_last_error());
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "TLS is not supported"));
	ck_assert_ptr_nonnull(strstr(sx_last_error(), srv.sock));
	nbd_server_stop(&srv);

	/* Addresses that say too little. */
	ck_assert_int_eq(sio_nbd_open(NULL, 0, &f), -EINVAL);
	ck_assert_int_eq(sio_nbd_open(&a, 0, &f), -EINVAL);
	a.transport = SIO_NBD_TCP;
	ck_assert_int_eq(sio_nbd_open(&a, 0, &f), -EINVAL);
	ck_assert_ptr_null(f);
}
END_TEST

/* Two queues reading one file: each has its own connection. */
START_TEST(test_two_queues)
{
	enum { N = 64 };
	static unsigned char bufs[2][N][32 * KIB];
	struct sio_req reqs[2][N];
	struct done_rec recs[2][N] = {{{0}}};
	struct sio_queue *q[2];
	struct nbd_server srv;
	struct sio_file *f;
	unsigned i, k;

	start_qemu(&srv);
	f = open_unix(srv.sock, "exp");
	for (k = 0; k < 2; k++) {
		ck_assert_int_eq(sio_queue_create(16, &q[k]), 0);
		for (i = 0; i < N; i++) {
			reqs[k][i] = (struct sio_req){.op = SIO_OP_READ,
						      .file = f,
						      .buf = bufs[k][i],
						      .off = (k * 7 + i) * 48 *
							     KIB % RAW_SIZE,
						      .len = 32 * KIB,
						      .done = on_done,
						      .priv = &recs[k][i]};
			ck_assert_int_eq(sio_queue_submit(q[k], &reqs[k][i]),
					 0);
		}
	}
	/* Turn by turn, so both have reads in flight at once. */
	while (sio_queue_inflight(q[0]) || sio_queue_inflight(q[1])) {
		for (k = 0; k < 2; k++) {
			if (sio_queue_inflight(q[k]))
				ck_assert_int_ge(sio_queue_run(q[k], 1), 0);
		}
	}
	for (k = 0; k < 2; k++) {
		for (i = 0; i < N; i++) {
			ck_assert_int_eq(recs[k][i].res, 32 * KIB);
			check_bytes(raw, RAW_SIZE, bufs[k][i], 32 * KIB,
				    reqs[k][i].off);
		}
		sio_queue_destroy(q[k]);
	}
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* sio_queue_destroy() waits for NBD reads still in flight. */
START_TEST(test_destroy_drains)
{
	enum { N = 50 };
	static unsigned char bufs[N][8 * KIB];
	struct sio_req reqs[N];
	struct done_rec recs[N] = {{0}};
	struct nbd_server srv;
	struct sio_queue *q;
	struct sio_file *f;
	unsigned i;

	start_qemu(&srv);
	f = open_unix(srv.sock, "exp");
	ck_assert_int_eq(sio_queue_create(16, &q), 0);
	for (i = 0; i < N; i++) {
		reqs[i] = read_req(f, bufs[i], i * 8 * KIB, 8 * KIB, &recs[i]);
		ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
	}
	sio_queue_destroy(q);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(recs[i].calls, 1);
		ck_assert_int_eq(recs[i].res, 8 * KIB);
		check_bytes(raw, RAW_SIZE, bufs[i], 8 * KIB, reqs[i].off);
	}
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* Fault rules match an NBD file by its URI, as any file by its path. */
START_TEST(test_fault_rules)
{
	struct nbd_server srv;
	struct sio_req req;
	struct done_rec rec = {0};
	struct sio_queue *q;
	struct sio_file *f;
	char buf[4096];

	start_qemu(&srv);
	f = open_unix(srv.sock, "exp");
	ck_assert_int_eq(
		sio_fault_add(SIO_OP_READ, "qemu.sock", 0, 4096, EIO, 0, 0), 0);
	ck_assert_int_eq(sio_pread(f, buf, sizeof(buf), 0), -EIO);
	ck_assert_int_eq(sio_pread(f, buf, sizeof(buf), 8192), 0);
	check_bytes(raw, RAW_SIZE, (unsigned char *)buf, sizeof(buf), 8192);
	ck_assert_int_eq(sio_queue_create(8, &q), 0);
	req = read_req(f, buf, 0, sizeof(buf), &rec);
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(rec.res, -EIO);
	sio_fault_clear();
	ck_assert_int_eq(sio_queue_submit(q, &req), 0);
	drain(q);
	ck_assert_int_eq(rec.res, (int)sizeof(buf));
	check_bytes(raw, RAW_SIZE, (unsigned char *)buf, sizeof(buf), 0);
	sio_queue_destroy(q);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* What `siphon info` shows of multi-conn follows the server. */
START_TEST(test_multi_conn)
{
	static const char *const yes[] = {"memory", "1M", NULL};
	static const char *const no[] = {"--filter=multi-conn", "memory", "1M",
					 "multi-conn-mode=disable", NULL};
	struct sio_nbd_info info;
	struct nbd_server srv;
	struct sio_file *f;

	start_kit(&srv, "yes.sock", yes);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_nbd_get_info(f, &info), 0);
	ck_assert(info.can_multi_conn);
	sio_file_close(f);
	nbd_server_stop(&srv);

	start_kit(&srv, "no.sock", no);
	f = open_unix(srv.sock, "");
	ck_assert_int_eq(sio_nbd_get_info(f, &info), 0);
	ck_assert(!info.can_multi_conn);
	sio_file_close(f);
	nbd_server_stop(&srv);
}
END_TEST

/* Distinct connections that nbdkit's log shows reading. */
static unsigned logged_read_conns(const char *log)
{
	char line[1024], *c;
	unsigned seen[64], n = 0, id, i;
	FILE *fp = fopen(log, "r");

	if (!fp)
		return 0;
	while (fgets(line, sizeof(line), fp)) {
		if (!strstr(line, "Read id=") || strstr(line, "return="))
			continue;
		c = strstr(line, "connection=");
		if (!c || sscanf(c, "connection=%u", &id) != 1)
			continue;
		for (i = 0; i < n && seen[i] != id; i++)
			;
		if (i == n && n < 64)
			seen[n++] = id;
	}
	fclose(fp);
	return n;
}

/*
 * Reads of one queue spread over several connections when the server
 * allows it (multi-conn), and stay on one when it does not; the bytes
 * are right either way.
 */
START_TEST(test_multi_conn_reads)
{
	enum { N = 64 };
	static unsigned char bufs[N][64 * KIB];
	char log[PATH_MAX], logarg[PATH_MAX + 16], filearg[PATH_MAX + 8];
	struct sio_req reqs[N];
	struct done_rec recs[N];
	struct nbd_server srv;
	struct sio_nbd_info info;
	struct sio_queue *q;
	struct sio_file *f;
	unsigned i, round;

	sio_nbd_set_connections(4);
	snprintf(filearg, sizeof(filearg), "file=%s", base_path);
	for (round = 0; round < 2; round++) {
		/* Round 1: the multi-conn filter hides the flag. */
		const char *multi[17] = {"-r",
					 "--threads=64",
					 "--filter=log",
					 "--filter=delay",
					 "file",
					 filearg,
					 logarg,
					 "rdelay=50ms",
					 NULL};
		const char *single[17] = {"-r",
					  "--threads=64",
					  "--filter=log",
					  "--filter=multi-conn",
					  "--filter=delay",
					  "file",
					  filearg,
					  logarg,
					  "rdelay=50ms",
					  "multi-conn-mode=disable",
					  NULL};

		snprintf(log, sizeof(log), "%s/mc%u-%d.log", tmpdir, round,
			 (int)getpid());
		snprintf(logarg, sizeof(logarg), "logfile=%s", log);
		start_kit(&srv, "mc.sock", round ? single : multi);
		f = open_unix(srv.sock, "");
		ck_assert_int_eq(sio_nbd_get_info(f, &info), 0);
		ck_assert(info.can_multi_conn == !round);
		ck_assert_uint_eq(info.connections, (round ? 1 : 4));
		ck_assert_int_eq(sio_queue_create(64, &q), 0);
		memset(recs, 0, sizeof(recs));
		/* As a stream does: 16 in flight, one more as one ends. */
		for (i = 0; i < N; i++) {
			reqs[i] = read_req(f, bufs[i],
					   i * 64 * KIB % (RAW_SIZE - 64 * KIB),
					   64 * KIB, &recs[i]);
			while (sio_queue_inflight(q) >= 16)
				ck_assert_int_ge(sio_queue_run(q, 1), 0);
			ck_assert_int_eq(sio_queue_submit(q, &reqs[i]), 0);
		}
		drain(q);
		for (i = 0; i < N; i++) {
			ck_assert_int_eq(recs[i].res, 64 * KIB);
			check_bytes(raw, RAW_SIZE, bufs[i], 64 * KIB,
				    reqs[i].off);
		}
		ck_assert_uint_eq(logged_read_conns(log), (round ? 1 : 4));
		sio_queue_destroy(q);
		sio_file_close(f);
		nbd_server_stop(&srv);
	}
}
END_TEST

static Suite *nbd_suite(void)
{
	Suite *s = suite_create("nbd_io");
	TCase *tc;

	tc = tcase_create("read");
	tcase_add_test(tc, test_open_and_info);
	tcase_add_test(tc, test_sync_read);
	tcase_add_test(tc, test_async_read);
	tcase_add_test(tc, test_sparse_random);
	tcase_add_test(tc, test_split_max_block);
	tcase_add_test(tc, test_min_block);
	tcase_add_test(tc, test_two_queues);
	tcase_add_test(tc, test_destroy_drains);
	tcase_add_test(tc, test_multi_conn);
	tcase_add_test(tc, test_multi_conn_reads);
	suite_add_tcase(s, tc);

	tc = tcase_create("status");
	tcase_add_test(tc, test_block_status);
	tcase_add_test(tc, test_block_status_queue);
	tcase_add_test(tc, test_block_status_unsupported);
	suite_add_tcase(s, tc);

	tc = tcase_create("errors");
	tcase_add_test(tc, test_writes_refused);
	tcase_add_test(tc, test_server_killed);
	tcase_add_test(tc, test_server_killed_qemu);
	tcase_add_test(tc, test_server_errors);
	tcase_add_test(tc, test_connect_errors);
	tcase_add_test(tc, test_fault_rules);
	suite_add_tcase(s, tc);

	tc = tcase_create("reconnect");
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_reconnect);
	tcase_add_test(tc, test_reconnect_gives_up);
	tcase_add_test(tc, test_reconnect_other_export);
	tcase_add_test(tc, test_hung_server);
	tcase_add_test(tc, test_one_client_server);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	int failed;

	if (!have_uring())
		return 77;
	if (!have_qemu_tools() || !have_nbd_servers()) {
		fprintf(stderr, "qemu-img, qemu-nbd or nbdkit missing: "
				"skipping\n");
		return 77;
	}
	unsetenv("SIPHON_FAULT");
	make_base();
	failed = run_checks(nbd_suite());
	if (sh("rm -rf '%s'", tmpdir) != 0)
		fprintf(stderr, "could not remove %s\n", tmpdir);
	free(raw);
	return failed ? 1 : 0;
}
