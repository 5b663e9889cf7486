/*
 * Guest I/O API (api/guest_io.c, engine/guest.c): every call and its
 * errors, reads and writes against qemu-io on the same chain, and qemu's
 * copy-on-read scenarios (allocated clusters never rewritten, zero-length
 * reads, the last partial cluster, subclusters, reads that span allocated
 * and unallocated clusters, copy-on-read off).
 *
 * Images are made with qemu-img/qemu-io in a fresh directory; the oracle
 * for content is qemu-img compare against a raw copy that received the same
 * writes through qemu-io, for layout qemu-img map. Exits 77 when io_uring
 * or qemu-img is unavailable.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io/io.h"
#include "testutil.h"
#include "siphon.h"

static char tmpdir[] = "/tmp/siphon-guest-XXXXXX";

/*
 * name.base.raw (4 MiB of 0x11, a zero hole at 1 MiB) <- name.qcow2
 * (cluster 64 KiB, size given; 0x22 written at [0, 64K) and [512K, 576K)),
 * plus name.ref.raw, what the chain reads. Extra qemu-img create options in
 * opts. Returns the top's path (static).
 */
static const char *make_chain(const char *name, const char *size,
			      const char *opts)
{
	static char top[512];
	const char *d = tmpdir;

	RUN("cd %s && qemu-img create -q -f raw %s.base.raw 4M && "
	    "qemu-io -f raw -c 'write -P 0x11 0 4M' "
	    "-c 'write -z 1M 128k' %s.base.raw >/dev/null && "
	    "qemu-img create -q -f qcow2 -o cluster_size=65536%s "
	    "-b %s.base.raw -F raw %s.qcow2 %s && "
	    "qemu-io -f qcow2 -c 'write -P 0x22 0 64k' "
	    "-c 'write -P 0x22 512k 64k' %s.qcow2 >/dev/null && "
	    "qemu-img convert -f qcow2 -O raw %s.qcow2 %s.ref.raw",
	    d, name, name, opts, name, name, size, name, name, name);
	snprintf(top, sizeof(top), "%s/%s.qcow2", d, name);
	return top;
}

/* What the chain `name` reads (name.ref.raw, 4 MiB), malloc'd. */
static uint8_t *load_ref(const char *name)
{
	uint8_t *ref = malloc(4 << 20);
	char path[600];
	FILE *fp;

	snprintf(path, sizeof(path), "%s/%s.ref.raw", tmpdir, name);
	fp = fopen(path, "r");
	ck_assert_ptr_nonnull(fp);
	ck_assert_int_eq(fread(ref, 1, 4 << 20, fp), 4 << 20);
	fclose(fp);
	return ref;
}

/* name.qcow2 is consistent (qemu-img check) and reads as its chain did. */
static void check_matches_chain(const char *name)
{
	RUN("cd %s && qemu-img check -q %s.qcow2 && "
	    "qemu-img compare -q -f qcow2 -F raw %s.qcow2 %s.ref.raw",
	    tmpdir, name, name, name);
}

/* Map entry of the top covering off: "depth offset" (offset or -1). */
static void map_at(const char *path, uint64_t off, char *out, size_t n)
{
	char cmd[1024];
	FILE *p;

	snprintf(cmd, sizeof(cmd),
		 "qemu-img map -f qcow2 --output=json %s | python3 -c '"
		 "import json,sys\n"
		 "for e in json.load(sys.stdin):\n"
		 "  if e[\"start\"] <= %llu < e[\"start\"] + e[\"length\"]:\n"
		 "    print(e[\"depth\"], e.get(\"offset\", -1), e[\"data\"])'",
		 path, (unsigned long long)off);
	p = popen(cmd, "r");
	ck_assert_ptr_nonnull(p);
	out[0] = '\0';
	if (!fgets(out, (int)n, p))
		out[0] = '\0';
	pclose(p);
}

struct fixture {
	siphon_domain *dom;
	siphon_disk *disk;
};

static void open_disk(struct fixture *f, const char *path)
{
	ck_assert_int_eq(siphon_domain_create(NULL, &f->dom), 0);
	ck_assert_int_eq(siphon_disk_attach(f->dom, path, NULL), 0);
	ck_assert_int_eq(siphon_disk_get(f->dom, path, &f->disk), 0);
}

static void close_disk(struct fixture *f)
{
	siphon_disk_put(f->disk);
	siphon_domain_close(f->dom);
}

static void dummy_cb(siphon_disk *disk, int ret, void *opaque)
{
	(void)disk;
	(void)ret;
	(void)opaque;
}

START_TEST(test_errors)
{
	const char *top = make_chain("err", "4M", "");
	struct siphon_disk_stats st = {.size = 4};
	struct fixture f;
	siphon_disk *h = NULL;
	uint8_t buf[4096];
	struct iovec v = {buf, sizeof(buf)};
	uint64_t size = 0;

	open_disk(&f, top);
	ck_assert_int_eq(siphon_disk_get(NULL, top, &h), -EINVAL);
	ck_assert_int_eq(siphon_disk_get(f.dom, NULL, &h), -EINVAL);
	ck_assert_int_eq(siphon_disk_get(f.dom, "rel", &h), -EINVAL);
	ck_assert_int_eq(siphon_disk_get(f.dom, "/no/such", &h), -ENOENT);
	ck_assert_ptr_null(h);
	siphon_disk_put(NULL);
	ck_assert_int_eq(siphon_disk_get_size(f.disk, &size), 0);
	ck_assert_uint_eq(size, 4u << 20);
	ck_assert_int_eq(siphon_disk_get_size(NULL, &size), -EINVAL);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, 7), -EINVAL);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(NULL, 0), -EINVAL);
	ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), -EINVAL);
	ck_assert_int_eq(siphon_disk_get_stats(f.disk, NULL), -EINVAL);

	ck_assert_int_eq(siphon_disk_pread(NULL, buf, 512, 0, 0), -EINVAL);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 512, 100, 0), -EINVAL);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 100, 0, 0), -EINVAL);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 1024, size - 512, 0),
			 -EINVAL);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 512, size, 0), -EINVAL);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 512, 0, 1u << 7),
			 -EINVAL);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 512, 0, SIPHON_IO_FUA),
			 -EINVAL);
	ck_assert_int_eq(
		siphon_disk_pwrite(f.disk, buf, 512, 0, SIPHON_IO_NO_COR),
		-EINVAL);
	ck_assert_int_eq(siphon_disk_flush(f.disk, SIPHON_IO_FUA), -EINVAL);
	ck_assert_int_eq(siphon_disk_discard(f.disk, 0, 512, SIPHON_IO_FUA),
			 -EINVAL);
	ck_assert_int_eq(siphon_disk_discard(f.disk, 1, 512, 0), -EINVAL);
	ck_assert_int_eq(siphon_disk_write_zeroes(f.disk, 0, size + 512, 0),
			 -EINVAL);
	ck_assert_int_eq(siphon_disk_read(f.disk, NULL, 1, 0, 0), -EINVAL);
	ck_assert_int_eq(siphon_disk_read(f.disk, &v, -1, 0, 0), -EINVAL);
	ck_assert_int_eq(
		siphon_disk_read(f.disk, &v, SIPHON_IO_MAX_IOV + 1, 0, 0),
		-EINVAL);
	ck_assert_int_eq(siphon_disk_aio_read(f.disk, &v, 1, 0, 0, NULL, NULL),
			 -EINVAL);
	ck_assert_int_eq(siphon_disk_aio_flush(NULL, 0, dummy_cb, NULL),
			 -EINVAL);
	/* Too long for one request. */
	ck_assert_int_eq(siphon_disk_write_zeroes(
				 f.disk, 0, SIPHON_IO_MAX_BYTES + 512ull, 0),
			 -EINVAL);

	/* A detached disk: the handle stays, requests fail. */
	ck_assert_int_eq(siphon_disk_detach(f.dom, top, 0), 0);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 512, 0, 0), -ENOENT);
	ck_assert_int_eq(siphon_disk_aio_flush(f.disk, 0, dummy_cb, NULL),
			 -ENOENT);
	st.size = sizeof(st);
	ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), -ENOENT);
	close_disk(&f);
}
END_TEST

/* Reads match the chain; writes, zeroes and discards match qemu-io's. */
START_TEST(test_read_write)
{
	const char *top = make_chain("rw", "4M", "");
	const uint64_t len = 3 * 65536 + 1024;
	struct siphon_disk_stats st = {.size = sizeof(st)};
	uint8_t *buf = malloc(4 << 20), *ref, *raw;
	struct iovec v[3];
	struct fixture f;
	int i;

	ref = load_ref("rw");
	open_disk(&f, top);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_OFF),
			 0);
	/* Whole disk, then misaligned vectored pieces across pieces. */
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 4 << 20, 0, 0), 0);
	ck_assert_mem_eq(buf, ref, 4 << 20);
	raw = malloc(len + 16);
	v[0] = (struct iovec){raw + 1, 1536};
	v[1] = (struct iovec){raw + 1537, 65536};
	v[2] = (struct iovec){raw + 67073, len - 1536 - 65536};
	ck_assert_int_eq(siphon_disk_read(f.disk, v, 3, 512 * 1024 - 512, 0),
			 0);
	ck_assert_mem_eq(raw + 1, ref + 512 * 1024 - 512, len);
	/* A zero-length read is a no-op. */
	ck_assert_int_eq(siphon_disk_read(f.disk, v, 0, 65536, 0), 0);

	/* Writes: in place, partial over backing, vectored misaligned. */
	memset(buf, 0x33, 65536);
	ck_assert_int_eq(siphon_disk_pwrite(f.disk, buf, 4096, 4096, 0), 0);
	ck_assert_int_eq(
		siphon_disk_pwrite(f.disk, buf, 512, 2 * 65536 + 1024, 0), 0);
	for (i = 0; i < 3; i++)
		memset(v[i].iov_base, 0x44 + i, v[i].iov_len);
	ck_assert_int_eq(
		siphon_disk_write(f.disk, v, 3, 3 * 65536 + 512, SIPHON_IO_FUA),
		0);
	ck_assert_int_eq(
		siphon_disk_write_zeroes(f.disk, 1536 * 1024, 65536 + 1024, 0),
		0);
	ck_assert_int_eq(siphon_disk_discard(f.disk, 2 << 20, 128 * 1024, 0),
			 0);
	ck_assert_int_eq(siphon_disk_flush(f.disk, 0), 0);
	ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), 0);
	ck_assert_uint_eq(st.size, sizeof(st));
	ck_assert_uint_eq(st.cor_bytes, 0);
	close_disk(&f);

	RUN("cd %s && qemu-io -f raw -c 'write -P 0x33 4096 4096' "
	    "-c 'write -P 0x33 %d 512' -c 'write -P 0x44 %d 1536' "
	    "-c 'write -P 0x45 %d 65536' -c 'write -P 0x46 %d %llu' "
	    "-c 'write -z %d %d' -c 'write -z %d %d' rw.ref.raw >/dev/null",
	    tmpdir, 2 * 65536 + 1024, 3 * 65536 + 512, 3 * 65536 + 2048,
	    4 * 65536 + 2048, (unsigned long long)(len - 1536 - 65536),
	    1536 * 1024, 65536 + 1024, 2 << 20, 128 * 1024);
	check_matches_chain("rw");
	free(raw);
	free(buf);
	free(ref);
}
END_TEST

struct aio_state {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int left;
	int errors;
};

static void aio_cb(siphon_disk *disk, int ret, void *opaque)
{
	struct aio_state *s = opaque;

	(void)disk;
	pthread_mutex_lock(&s->lock);
	if (ret < 0)
		s->errors++;
	if (--s->left == 0)
		pthread_cond_signal(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

/* Wait until every request counted in s->left completed, none failing. */
static void aio_wait(struct aio_state *s)
{
	pthread_mutex_lock(&s->lock);
	while (s->left)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	ck_assert_int_eq(s->errors, 0);
}

START_TEST(test_aio)
{
	const char *top = make_chain("aio", "4M", "");
	struct aio_state s = {PTHREAD_MUTEX_INITIALIZER,
			      PTHREAD_COND_INITIALIZER, 0, 0};
	static uint8_t bufs[64][8192];
	struct iovec v[64];
	struct fixture f;
	int i;

	open_disk(&f, top);
	s.left = 64 + 2;
	for (i = 0; i < 64; i++) {
		v[i] = (struct iovec){bufs[i], sizeof(bufs[i])};
		memset(bufs[i], i, sizeof(bufs[i]));
		ck_assert_int_eq(siphon_disk_aio_write(f.disk, &v[i], 1,
						       (uint64_t)i * 32768, 0,
						       aio_cb, &s),
				 0);
	}
	ck_assert_int_eq(
		siphon_disk_aio_discard(f.disk, 3 << 20, 65536, 0, aio_cb, &s),
		0);
	ck_assert_int_eq(siphon_disk_aio_write_zeroes(f.disk, 62 * 65536, 4096,
						      SIPHON_IO_FUA, aio_cb,
						      &s),
			 0);
	aio_wait(&s);
	s.left = 65;
	for (i = 0; i < 64; i++) {
		memset(bufs[i], 0xee, sizeof(bufs[i]));
		ck_assert_int_eq(siphon_disk_aio_read(f.disk, &v[i], 1,
						      (uint64_t)i * 32768, 0,
						      aio_cb, &s),
				 0);
	}
	ck_assert_int_eq(siphon_disk_aio_flush(f.disk, 0, aio_cb, &s), 0);
	aio_wait(&s);
	for (i = 0; i < 64; i++) {
		uint8_t want[8192];

		memset(want, i, sizeof(want));
		ck_assert_mem_eq(bufs[i], want, sizeof(want));
	}
	close_disk(&f);
	RUN("qemu-img check -q %s", top);
}
END_TEST

/*
 * Copy-on-read set on by the owner, no stream: every read of clusters the
 * top lacks copies them, however deep the guest's queue (only a running
 * stream, which copies them anyway, lets copy-on-read yield to load).
 */
START_TEST(test_cor_on_deep_queue)
{
	const char *top = make_chain("cdq", "4M", "");
	struct siphon_disk_stats st = {.size = sizeof(st)};
	struct aio_state s = {PTHREAD_MUTEX_INITIALIZER,
			      PTHREAD_COND_INITIALIZER, 0, 0};
	static uint8_t bufs[32][4096];
	struct iovec v[32];
	struct fixture f;
	char m[128];
	int i;

	open_disk(&f, top);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_ON),
			 0);
	s.left = 32;
	for (i = 0; i < 32; i++) {
		v[i] = (struct iovec){bufs[i], sizeof(bufs[i])};
		ck_assert_int_eq(
			siphon_disk_aio_read(f.disk, &v[i], 1,
					     (2u << 20) + (uint64_t)i * 65536,
					     0, aio_cb, &s),
			0);
	}
	aio_wait(&s);
	/* The copies finish after the guest has its data. */
	for (i = 0; i < 1000; i++) {
		ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), 0);
		if (st.cor_bytes + st.cor_skipped * 65536 >= 32 * 65536)
			break;
		usleep(5000);
	}
	ck_assert_uint_eq(st.cor_skipped, 0);
	ck_assert_uint_eq(st.cor_bytes, 32 * 65536);
	close_disk(&f);
	map_at(top, (2u << 20) + 31 * 65536, m, sizeof(m));
	ck_assert_msg(m[0] == '0', "not copied: %s", m);
	check_matches_chain("cdq");
}
END_TEST

/*
 * A copy-on-read whose write fails: the guest still gets its data, and the
 * clusters allocated for the copy are given back (no leak in qemu-img
 * check), so a failed copy costs nothing but the copy.
 */
START_TEST(test_cor_write_error)
{
	const char *top = make_chain("cwe", "4M", "");
	struct siphon_disk_stats st = {.size = sizeof(st)};
	uint8_t *buf = malloc(65536), *ref;
	struct fixture f;
	int i;

	ref = load_ref("cwe");
	open_disk(&f, top);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_ON),
			 0);
	/* The next write to the top (the copy's data) fails. */
	ck_assert_int_eq(
		sio_fault_add(SIO_OP_WRITE, "cwe.qcow2", 0, 0, EIO, 1, 0), 0);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 65536, 2 << 20, 0), 0);
	ck_assert_mem_eq(buf, ref + (2 << 20), 65536);
	for (i = 0; i < 1000; i++) {
		ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), 0);
		if (st.cor_skipped)
			break;
		usleep(5000);
	}
	sio_fault_clear();
	ck_assert_uint_eq(st.cor_skipped, 1);
	ck_assert_uint_eq(st.cor_bytes, 0);
	close_disk(&f);
	check_matches_chain("cwe");
	free(buf);
	free(ref);
}
END_TEST

/*
 * Writes into clusters the top lacks (the asynchronous allocating path):
 * partial first and last clusters keep the chain's bytes around the
 * guest's, whole clusters are the guest's, the image's last, partial
 * cluster works. The oracle is qemu-io doing the same writes on a copy.
 */
START_TEST(test_allocating_writes)
{
	static const struct {
		uint64_t off, len;
		int pat;
	} w[] = {
		{3997696 + 512, 1024,
		 0xa1}, /* inside the last, partial cluster */
		{10 * 65536 + 512, 3 * 65536 + 1024, 0xa2}, /* partial ends */
		{20 * 65536, 65536, 0xa3}, /* one whole cluster */
		{30 * 65536 + 65024, 512, 0xa4}, /* a cluster's last sector */
		{40 * 65536, 2 * 65536 + 4096, 0xa5}, /* whole, then partial */
	};
	const char *top = make_chain("awr", "3999744", "");
	uint8_t *buf = malloc(4 << 20);
	struct fixture f;
	unsigned i;

	RUN("cp %s %s/awr.oracle.qcow2", top, tmpdir);
	open_disk(&f, top);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_OFF),
			 0);
	for (i = 0; i < sizeof(w) / sizeof(w[0]); i++) {
		memset(buf, w[i].pat, w[i].len);
		ck_assert_int_eq(
			siphon_disk_pwrite(f.disk, buf, w[i].len, w[i].off, 0),
			0);
		RUN("qemu-io -f qcow2 -c 'write -P %d %llu %llu' "
		    "%s/awr.oracle.qcow2 >/dev/null",
		    w[i].pat, (unsigned long long)w[i].off,
		    (unsigned long long)w[i].len, tmpdir);
	}
	close_disk(&f);
	RUN("cd %s && qemu-img check -q awr.qcow2 && "
	    "qemu-img compare -q awr.qcow2 awr.oracle.qcow2",
	    tmpdir);
	free(buf);
}
END_TEST

/*
 * Writes that span clusters the top holds and clusters it lacks: each run
 * of lacking clusters goes through the copy pipeline, the held data
 * clusters are written in place (they keep their host offset), and the
 * worker waits for none of it; a zero cluster of the top in the middle
 * still takes the driver's synchronous path. The result is qemu-io's.
 * The top holds data at [0, 64K) and [512K, 576K), a zero cluster at 2M.
 */
START_TEST(test_allocating_writes_mixed)
{
	static const struct {
		uint64_t off, len;
		int pat;
		bool no_waits; /* every cluster is data or lacking */
	} w[] = {
		/* held, then lacking (partial end) */
		{32768, 65536 + 4096, 0xb1, true},
		/* lacking (partial start), held, lacking (partial end) */
		{7 * 65536 + 4096, 3 * 65536 - 8192, 0xb2, true},
		/* lacking, the top's zero cluster, lacking */
		{31 * 65536 + 512, 2 * 65536 + 1024, 0xb3, false},
	};
	const char *top = make_chain("awm", "4M", "");
	struct siphon_disk_stats st = {.size = sizeof(st)};
	uint8_t *buf = malloc(4 << 20);
	char before[128], after[128];
	struct fixture f;
	uint64_t w0;
	unsigned i;

	RUN("qemu-io -f qcow2 -c 'write -z 2M 64k' %s >/dev/null && "
	    "cp %s %s/awm.oracle.qcow2",
	    top, top, tmpdir);
	map_at(top, 512 * 1024, before, sizeof(before));
	open_disk(&f, top);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_OFF),
			 0);
	for (i = 0; i < sizeof(w) / sizeof(w[0]); i++) {
		memset(buf, w[i].pat, w[i].len);
		ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), 0);
		w0 = st.sync_waits;
		ck_assert_int_eq(
			siphon_disk_pwrite(f.disk, buf, w[i].len, w[i].off, 0),
			0);
		ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), 0);
		if (w[i].no_waits)
			ck_assert_msg(st.sync_waits == w0,
				      "write %u: the worker waited %llu times",
				      i,
				      (unsigned long long)(st.sync_waits - w0));
		RUN("qemu-io -f qcow2 -c 'write -P %d %llu %llu' "
		    "%s/awm.oracle.qcow2 >/dev/null",
		    w[i].pat, (unsigned long long)w[i].off,
		    (unsigned long long)w[i].len, tmpdir);
	}
	close_disk(&f);
	map_at(top, 512 * 1024, after, sizeof(after));
	ck_assert_str_eq(before, after);
	RUN("cd %s && qemu-img check -q awm.qcow2 && "
	    "qemu-img compare -q awm.qcow2 awm.oracle.qcow2",
	    tmpdir);
	free(buf);
}
END_TEST

/*
 * qemu's copy-on-read scenarios: a read spanning allocated and unallocated
 * clusters copies only the unallocated ones (the allocated cluster keeps its
 * host offset); the data matches the chain; then copy-on-read off and auto
 * (no stream) copy nothing.
 */
START_TEST(test_cor)
{
	const char *top = make_chain("cor", "4M", "");
	struct siphon_disk_stats st = {.size = sizeof(st)};
	char before[128], after[128], m[128];
	uint8_t *buf = malloc(1 << 20);
	struct fixture f;

	map_at(top, 0, before, sizeof(before));
	ck_assert_str_ne(before, "");
	open_disk(&f, top);
	/* Auto without a stream: nothing copied. */
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 1 << 20, 2 << 20, 0),
			 0);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_OFF),
			 0);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 1 << 20, 2 << 20, 0),
			 0);
	ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), 0);
	ck_assert_uint_eq(st.cor_bytes, 0);
	/* On: [0, 256K) holds allocated cluster 0 and unallocated ones. */
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_ON),
			 0);
	/*
	 * The copy goes on after the read completes and a read that meets
	 * it does not copy: let each one finish first.
	 */
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 65536, 0, 0), 0);
	usleep(100000);
	ck_assert_int_eq(
		siphon_disk_pread(f.disk, buf, 4096, 256 * 1024 - 4096, 0), 0);
	usleep(100000);
	/* Unaligned to clusters, spanning 0x22 at 512K. */
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 448 * 1024 + 1024,
					   100 * 1024, 0),
			 0);
	usleep(100000);
	/* Zeros in the backing are not copied as data. */
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 1 << 20, 128 * 1024, 0),
			 0);
	usleep(100000);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 0, 65536 * 2, 0), 0);
	ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), 0);
	/* Clusters 3, then 1-2 and 4-7, then 9-15 (16-17 are zeros). */
	ck_assert_uint_eq(st.cor_bytes, 14 * 65536);
	close_disk(&f);

	map_at(top, 0, after, sizeof(after));
	ck_assert_str_eq(before, after);
	map_at(top, 512 * 1024, after, sizeof(after));
	map_at(top, 512 * 1024, m, sizeof(m));
	ck_assert_str_eq(after, m);
	ck_assert_int_eq(strncmp(after, "0 ", 2), 0);
	map_at(top, 192 * 1024, m, sizeof(m));
	ck_assert_int_eq(strncmp(m, "0 ", 2), 0); /* copied */
	map_at(top, 1 << 20, m, sizeof(m));
	ck_assert_int_eq(strncmp(m, "1 ", 2), 0); /* zeros: left alone */
	map_at(top, 2 << 20, m, sizeof(m));
	ck_assert_int_eq(strncmp(m, "1 ", 2), 0); /* off: not copied */
	check_matches_chain("cor");
	free(buf);
}
END_TEST

/* The last cluster is partial: a read across it copies it whole. */
START_TEST(test_cor_last_partial)
{
	const char *top = make_chain("tail", "4193792", "");
	uint8_t *buf = malloc(1 << 20);
	uint64_t size = 0;
	struct fixture f;
	char m[128];

	open_disk(&f, top);
	ck_assert_int_eq(siphon_disk_get_size(f.disk, &size), 0);
	ck_assert_uint_eq(size, 4193792);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_ON),
			 0);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 128 * 1024,
					   size - 128 * 1024, 0),
			 0);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 512, size - 512, 0), 0);
	close_disk(&f);
	map_at(top, size - 512, m, sizeof(m));
	ck_assert_int_eq(strncmp(m, "0 ", 2), 0);
	check_matches_chain("tail");
	free(buf);
}
END_TEST

/*
 * Subclusters: a cluster of which the top holds one subcluster is never
 * overwritten by copy-on-read; reads and partial writes still match.
 */
START_TEST(test_cor_subclusters)
{
	const char *top = make_chain("sub", "4M", ",extended_l2=on");
	uint8_t *buf = malloc(1 << 20);
	char before[128], after[128];
	struct fixture f;

	RUN("cd %s && qemu-io -f qcow2 -c 'write -P 0x55 %d 2048' sub.qcow2 "
	    ">/dev/null && qemu-io -f raw -c 'write -P 0x55 %d 2048' "
	    "sub.ref.raw >/dev/null",
	    tmpdir, 1024 * 1024 + 65536 * 4 + 2048,
	    1024 * 1024 + 65536 * 4 + 2048);
	map_at(top, 1024 * 1024 + 65536 * 4 + 2048, before, sizeof(before));
	open_disk(&f, top);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_ON),
			 0);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 1 << 20, 1 << 20, 0),
			 0);
	memset(buf, 0x66, 4096);
	ck_assert_int_eq(siphon_disk_pwrite(f.disk, buf, 1024,
					    3 * 1024 * 1024 + 5 * 1024, 0),
			 0);
	close_disk(&f);
	map_at(top, 1024 * 1024 + 65536 * 4 + 2048, after, sizeof(after));
	ck_assert_str_eq(before, after);
	RUN("cd %s && qemu-io -f raw -c 'write -P 0x66 %d 1024' sub.ref.raw "
	    ">/dev/null && qemu-img check -q sub.qcow2 && "
	    "qemu-img compare -q -f qcow2 -F raw sub.qcow2 sub.ref.raw",
	    tmpdir, 3 * 1024 * 1024 + 5 * 1024);
	free(buf);
}
END_TEST

/* Copy-on-read while a stream runs (auto), and the stream finishes. */
START_TEST(test_cor_with_stream)
{
	const char *top = make_chain("cs", "4M", "");
	struct siphon_event ev = {.size = sizeof(ev)};
	uint8_t *buf = malloc(4 << 20), *ref;
	struct siphon_block_stream_params p = {.size = sizeof(p),
					       .bandwidth = 2 << 20};
	struct fixture f;
	int i;

	ref = load_ref("cs");
	open_disk(&f, top);
	ck_assert_int_eq(siphon_block_stream_ex(f.dom, top, NULL,
						SIPHON_STREAM_CONTINUOUS, &p),
			 0);
	for (i = 0; i < 4; i++) {
		ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 4 << 20, 0, 0),
				 0);
		ck_assert_mem_eq(buf, ref, 4 << 20);
	}
	/* Copy-on-read may have left the stream nothing to do already. */
	i = siphon_block_stream_set_speed(f.dom, top, 0, 0);
	ck_assert(i == 0 || i == -ESRCH);
	while (siphon_domain_next_event(f.dom, &ev) == 0)
		usleep(10000);
	ck_assert_int_eq(ev.kind, SIPHON_EVENT_STREAM_COMPLETED);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 4 << 20, 0, 0), 0);
	ck_assert_mem_eq(buf, ref, 4 << 20);
	close_disk(&f);
	RUN("cd %s && qemu-img check -q cs.qcow2 && "
	    "qemu-img compare -q -f qcow2 -F raw cs.qcow2 cs.ref.raw && "
	    "! qemu-img info cs.qcow2 | grep -q backing",
	    tmpdir);
	free(buf);
	free(ref);
}
END_TEST

struct step_arg {
	siphon_domain *dom;
	const char *path;
	uint64_t cursor;
	int ret;
	atomic_bool done;
};

/* One slow incremental step: 2 MiB at 1 MiB/s. */
static void *slow_step(void *opaque)
{
	struct step_arg *a = opaque;
	struct siphon_block_stream_params p = {
		.size = sizeof(p), .bandwidth = 1 << 20, .max_bytes = 2 << 20};

	a->ret = siphon_block_stream_ex(a->dom, a->path, &a->cursor, 0, &p);
	atomic_store(&a->done, true);
	return NULL;
}

/*
 * An incremental step runs on the disk's worker between guest requests:
 * guest reads and writes issued while a slow step is copying complete
 * before the step returns, and the step's copy never overwrites them.
 */
START_TEST(test_step_does_not_block_guest)
{
	const char *top = make_chain("sg", "4M", "");
	uint8_t *buf = malloc(65536), *ref;
	struct step_arg a = {.cursor = 0};
	struct siphon_block_stream_info info[1];
	struct fixture f;
	pthread_t th;
	int i;

	ref = load_ref("sg");
	open_disk(&f, top);
	a.dom = f.dom;
	a.path = top;
	ck_assert_int_eq(siphon_block_stream(f.dom, top, &a.cursor, 0), 0);
	ck_assert_int_eq(pthread_create(&th, NULL, slow_step, &a), 0);
	/* Wait until the step has copied something. */
	for (i = 0; i < 500; i++) {
		ck_assert_int_eq(
			siphon_get_block_stream_info(f.dom, info, 1, 0), 1);
		if (info[0].cur > 0)
			break;
		usleep(2000);
	}
	ck_assert_int_gt(info[0].cur, 0);
	/* A local read and a write at the far end, while the step runs. */
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 65536, 0, 0), 0);
	ck_assert_mem_eq(buf, ref, 65536);
	memset(buf, 0x77, 65536);
	ck_assert_int_eq(siphon_disk_pwrite(f.disk, buf, 65536, 3 << 20, 0), 0);
	memset(ref + (3 << 20), 0x77, 65536);
	ck_assert_msg(!atomic_load(&a.done),
		      "guest I/O waited for the incremental step");
	pthread_join(th, NULL);
	ck_assert_int_eq(a.ret, 0);
	/* Finish the stream with unlimited default steps. */
	for (i = 0; i < 100 && a.ret == 0; i++) {
		a.ret = siphon_block_stream(f.dom, top, &a.cursor, 0);
		if (siphon_get_block_stream_info(f.dom, info, 1, 0) == 0)
			break;
	}
	ck_assert_int_eq(a.ret, 0);
	ck_assert_int_eq(siphon_get_block_stream_info(f.dom, info, 1, 0), 0);
	free(buf);
	buf = malloc(4 << 20);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 4 << 20, 0, 0), 0);
	ck_assert_mem_eq(buf, ref, 4 << 20);
	close_disk(&f);
	RUN("cd %s && qemu-img check -q sg.qcow2 && "
	    "! qemu-img info sg.qcow2 | grep -q backing",
	    tmpdir);
	free(buf);
	free(ref);
}
END_TEST

/*
 * A backing of compressed clusters: plain reads (vectored, misaligned),
 * copy-on-read and an allocating write into a compressed cluster all
 * decompress on the disk's inflater and read as qemu does.
 */
START_TEST(test_compressed_backing)
{
	const char *d = tmpdir;
	const uint64_t len = 3 * 65536 + 1024;
	struct siphon_disk_stats st = {.size = sizeof(st)};
	uint8_t *buf = malloc(4 << 20), *ref, *raw;
	char top[512], m[128];
	struct iovec v[3];
	struct fixture f;

	RUN("cd %s && qemu-img create -q -f raw cz.src.raw 4M && "
	    "qemu-io -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x5a 2M 1M' "
	    "cz.src.raw >/dev/null && "
	    "qemu-img convert -c -O qcow2 -o cluster_size=65536 cz.src.raw "
	    "cz.base.qcow2 && "
	    "qemu-img create -q -f qcow2 -o cluster_size=65536 "
	    "-b cz.base.qcow2 -F qcow2 cz.qcow2 && "
	    "qemu-io -f qcow2 -c 'write -P 0x22 0 64k' cz.qcow2 >/dev/null && "
	    "qemu-img convert -f qcow2 -O raw cz.qcow2 cz.ref.raw && "
	    "qemu-io -f raw -c 'write -P 0x33 %u 512' cz.ref.raw >/dev/null",
	    d, 3 * 65536 + 1024);
	snprintf(top, sizeof(top), "%s/cz.qcow2", d);
	ref = load_ref("cz");
	open_disk(&f, top);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_OFF),
			 0);
	raw = malloc(len + 16);
	v[0] = (struct iovec){raw + 1, 1536};
	v[1] = (struct iovec){raw + 1537, 65536};
	v[2] = (struct iovec){raw + 67073, len - 1536 - 65536};
	/* Zeros into compressed clusters; then the top and compressed. */
	ck_assert_int_eq(siphon_disk_read(f.disk, v, 3, (2 << 20) - 512, 0), 0);
	ck_assert_mem_eq(raw + 1, ref + (2 << 20) - 512, len);
	ck_assert_int_eq(siphon_disk_read(f.disk, v, 2, 0, 0), 0);
	ck_assert_mem_eq(raw + 1, ref, 1536 + 65536);
	/* Allocating write into a compressed cluster the top lacks. */
	memset(buf, 0x33, 512);
	ck_assert_int_eq(
		siphon_disk_pwrite(f.disk, buf, 512, 3 * 65536 + 1024, 0), 0);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f.disk, SIPHON_COR_ON),
			 0);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 65536, 2 << 20, 0), 0);
	ck_assert_mem_eq(buf, ref + (2 << 20), 65536);
	usleep(100000);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 4 << 20, 0, 0), 0);
	ck_assert_mem_eq(buf, ref, 4 << 20);
	ck_assert_int_eq(siphon_disk_get_stats(f.disk, &st), 0);
	ck_assert_uint_ge(st.cor_bytes, 65536);
	close_disk(&f);
	map_at(top, 2 << 20, m, sizeof(m));
	ck_assert_int_eq(strncmp(m, "0 ", 2), 0); /* copied */
	map_at(top, 3 * 65536, m, sizeof(m));
	ck_assert_int_eq(strncmp(m, "0 ", 2), 0); /* written */
	check_matches_chain("cz");
	free(raw);
	free(ref);
	free(buf);
}
END_TEST

/*
 * The chain's runs as qemu-img map shows them, merged: "start len data
 * zero" per line into runs[] (at most max); returns the count.
 */
static int qemu_runs(const char *path, uint64_t (*runs)[4], int max)
{
	char cmd[1024], line[256];
	int n = 0;
	FILE *p;

	snprintf(
		cmd, sizeof(cmd),
		"qemu-img map -U -f qcow2 --output=json %s | python3 -c '"
		"import json,sys\n"
		"o=[]\n"
		"for e in json.load(sys.stdin):\n"
		"  k=[int(e[\"data\"]),int(e[\"zero\"])]\n"
		"  if o and o[-1][2:]==k and o[-1][0]+o[-1][1]==e[\"start\"]:\n"
		"    o[-1][1]+=e[\"length\"]\n"
		"  else: o.append([e[\"start\"],e[\"length\"],k[0],k[1]])\n"
		"for r in o: print(*r)'",
		path);
	p = popen(cmd, "r");
	ck_assert_ptr_nonnull(p);
	while (n < max && fgets(line, sizeof(line), p)) {
		unsigned long long a, b, c, d;

		ck_assert_int_eq(
			sscanf(line, "%llu %llu %llu %llu", &a, &b, &c, &d), 4);
		runs[n][0] = a;
		runs[n][1] = b;
		runs[n][2] = c;
		runs[n][3] = d;
		n++;
	}
	pclose(p);
	return n;
}

/* Block status agrees with qemu-img map, run for run. */
static void check_status(siphon_disk *disk, const char *top)
{
	uint64_t runs[64][4], pos = 0;
	struct siphon_extent ext[64];
	unsigned n = 64;
	int nq, i;

	nq = qemu_runs(top, runs, 64);
	ck_assert_int_gt(nq, 1);
	ck_assert_int_eq(siphon_disk_block_status(disk, 0, 4 << 20, 0, ext, &n),
			 0);
	ck_assert_int_eq((int)n, nq);
	for (i = 0; i < nq; i++) {
		ck_assert_uint_eq(runs[i][0], pos);
		ck_assert_uint_eq(ext[i].len, runs[i][1]);
		ck_assert_uint_eq(!(ext[i].flags & SIPHON_EXTENT_HOLE),
				  runs[i][2]);
		ck_assert_uint_eq(!!(ext[i].flags & SIPHON_EXTENT_ZERO),
				  runs[i][3]);
		pos += ext[i].len;
	}
	ck_assert_uint_eq(pos, 4 << 20);
}

START_TEST(test_block_status)
{
	const char *top = make_chain("bs", "4M", "");
	static uint8_t data[512];
	struct siphon_extent ext[4];
	struct fixture f;
	unsigned n;

	/* A zero cluster in the top, beside the raw base's written zeros. */
	RUN("qemu-io -f qcow2 -c 'write -z 2M 64k' %s >/dev/null", top);
	open_disk(&f, top);
	check_status(f.disk, top);

	/* Room for one run: the first, cut at the range's end (data runs on
	   into the base). */
	n = 1;
	ck_assert_int_eq(
		siphon_disk_block_status(f.disk, 512, 65536, 0, ext, &n), 0);
	ck_assert_uint_eq(n, 1);
	ck_assert_uint_eq(ext[0].len, 65536);
	ck_assert_uint_eq(ext[0].flags, 0);
	n = 4;
	ck_assert_int_eq(
		siphon_disk_block_status(f.disk, 2 << 20, 4096, 0, ext, &n), 0);
	ck_assert_uint_eq(n, 1);
	ck_assert_uint_eq(ext[0].len, 4096);
	ck_assert_uint_eq(ext[0].flags,
			  SIPHON_EXTENT_HOLE | SIPHON_EXTENT_ZERO);

	/* Bad calls. */
	n = 0;
	ck_assert_int_eq(siphon_disk_block_status(f.disk, 0, 65536, 0, ext, &n),
			 -EINVAL);
	n = 4;
	ck_assert_int_eq(
		siphon_disk_block_status(f.disk, 0, 65536, 0, NULL, &n),
		-EINVAL);
	ck_assert_int_eq(siphon_disk_block_status(f.disk, 0, 65536, 1, ext, &n),
			 -EINVAL);
	ck_assert_int_eq(
		siphon_disk_block_status(f.disk, 100, 65536, 0, ext, &n),
		-EINVAL);
	ck_assert_int_eq(
		siphon_disk_block_status(f.disk, 512, 4 << 20, 0, ext, &n),
		-EINVAL);

	/* What siphon writes shows the same way qemu sees it. */
	ck_assert_int_eq(siphon_disk_write_zeroes(f.disk, 3 << 20, 65536, 0),
			 0);
	memset(data, 0x5a, sizeof(data));
	ck_assert_int_eq(siphon_disk_pwrite(f.disk, data, 512, 3 << 19, 0), 0);
	ck_assert_int_eq(siphon_disk_flush(f.disk, 0), 0);
	check_status(f.disk, top);
	close_disk(&f);
}
END_TEST

/* SIPHON_IO_FAST_ZERO: whole clusters of a v3 top only; else -ENOTSUP. */
START_TEST(test_fast_zero)
{
	char top[512], v2[512];
	uint8_t *buf = malloc(65536), *ref;
	struct fixture f;

	/* make_chain() returns its own static buffer. */
	snprintf(top, sizeof(top), "%s", make_chain("fz", "4M", ""));
	snprintf(v2, sizeof(v2), "%s", make_chain("fz2", "4M", ",compat=0.10"));
	ref = load_ref("fz");
	open_disk(&f, top);
	ck_assert_msg(siphon_disk_write_zeroes(f.disk, 2 << 20, 65536,
					       SIPHON_IO_FAST_ZERO) == 0,
		      "%s", siphon_get_error());
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 65536, 2 << 20, 0), 0);
	for (int i = 0; i < 65536; i++)
		ck_assert_uint_eq(buf[i], 0);
	/* A partial cluster: refused, nothing changed. */
	ck_assert_int_eq(siphon_disk_write_zeroes(f.disk, (3 << 20) + 512, 1024,
						  SIPHON_IO_FAST_ZERO),
			 -ENOTSUP);
	ck_assert_int_eq(siphon_disk_pread(f.disk, buf, 65536, 3 << 20, 0), 0);
	ck_assert_mem_eq(buf, ref + (3 << 20), 65536);
	/* Not for other operations. */
	ck_assert_int_eq(
		siphon_disk_pwrite(f.disk, buf, 512, 0, SIPHON_IO_FAST_ZERO),
		-EINVAL);
	close_disk(&f);
	/* A version 2 image has no zero clusters. */
	open_disk(&f, v2);
	ck_assert_int_eq(siphon_disk_write_zeroes(f.disk, 2 << 20, 65536,
						  SIPHON_IO_FAST_ZERO),
			 -ENOTSUP);
	ck_assert_int_eq(siphon_disk_write_zeroes(f.disk, 2 << 20, 65536, 0),
			 0);
	close_disk(&f);
	RUN("qemu-img check -q %s && qemu-img check -q %s", top, v2);
	free(buf);
	free(ref);
}
END_TEST

static Suite *guest_suite(void)
{
	Suite *s = suite_create("guest_io");
	TCase *tc = tcase_create("guest_io");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_errors);
	tcase_add_test(tc, test_read_write);
	tcase_add_test(tc, test_aio);
	tcase_add_test(tc, test_cor);
	tcase_add_test(tc, test_cor_on_deep_queue);
	tcase_add_test(tc, test_cor_write_error);
	tcase_add_test(tc, test_allocating_writes);
	tcase_add_test(tc, test_allocating_writes_mixed);
	tcase_add_test(tc, test_cor_last_partial);
	tcase_add_test(tc, test_cor_subclusters);
	tcase_add_test(tc, test_cor_with_stream);
	tcase_add_test(tc, test_step_does_not_block_guest);
	tcase_add_test(tc, test_compressed_backing);
	tcase_add_test(tc, test_block_status);
	tcase_add_test(tc, test_fast_zero);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return run_suite(guest_suite(), tmpdir, RUN_URING | RUN_QEMU);
}
