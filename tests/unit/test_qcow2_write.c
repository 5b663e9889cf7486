/*
 * qcow2 write path: allocating writes, copy-on-write over a backing file,
 * write_zeroes, discard, overwriting compressed clusters, refcount-table
 * growth, every refcount width, extended L2 subclusters, the stream
 * engine's alloc_run/commit_run, set_backing keeping unknown extensions,
 * and crashes simulated by failing every write from the k-th on.
 *
 * Each test keeps the expected guest content in memory; the image is read
 * back through img_pread and, when qemu-img is installed, checked with
 * `qemu-img check` (clean, or leaks only after a crash) and compared with
 * a raw file holding the expected bytes (`qemu-img compare`).
 *
 * Images and their backing files are memory files (memfile.h), saved to
 * the temp dir before each qemu-img call, so everything but the flush on
 * a queue runs where io_uring is refused; that one uses real files and is
 * left out (said on stderr) without io_uring. A memory file's own fault
 * rule (sio_mem_fail) fails one chosen write or sync of a workload.
 */
#define _GNU_SOURCE
#include <check.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"
#include "memfile.h"
#include "common/error.h"
#include "formats/image.h"
#include "formats/port.h"
#include "formats/qcow2/qcow2.h"
#include "io/io.h"

static char tmpdir[] = "/tmp/siphon-q2w-XXXXXX";
static bool have_qemu;

#define KiB 1024ull
#define MiB (1024ull * 1024)

static const char *tpath(const char *name)
{
	return dir_path(tmpdir, name);
}

struct opts {
	uint64_t size;
	uint32_t cs;
	unsigned rbits;
	bool v2;
	bool extl2;
	const char *backing;
	const char *backing_fmt;
};

/* Create a qcow2 image at path: a memory file, or with real on disk. */
static void create_in(const char *path, const struct opts *o, bool real)
{
	struct img_create_opts co = {0};
	int ret;

	co.size = o->size;
	co.cluster_size = o->cs;
	co.refcount_bits = o->rbits;
	co.compat_v2 = o->v2;
	co.extended_l2 = o->extl2;
	co.backing = o->backing;
	co.backing_fmt = o->backing_fmt;
	if (!real)
		mem_put(path, NULL, 0);
	ret = img_create(path, "qcow2", &co);
	ck_assert_msg(ret == 0, "create %s: %d %s", path, ret, sx_last_error());
}

static void create(const char *path, const struct opts *o)
{
	create_in(path, o, false);
}

static struct img *open_rw(const char *path)
{
	struct img *img = NULL;
	int ret = img_open(path, "qcow2", IMG_OPEN_RDWR, &img);

	ck_assert_msg(ret == 0, "open %s: %d %s", path, ret, sx_last_error());
	ck_assert(img_can_alloc(img));
	return img;
}

static void fill(uint8_t *p, size_t len, unsigned seed)
{
	size_t i;

	for (i = 0; i < len; i++)
		p[i] = (uint8_t)(seed * 31 + i * 7 + (i >> 9));
}

/* The expected guest content, kept alongside the image. */
struct model {
	uint8_t *b;
	uint64_t size;
};

static void model_init(struct model *m, uint64_t size, const char *raw)
{
	m->size = size;
	m->b = calloc(1, size);
	ck_assert_ptr_nonnull(m->b);
	if (raw) {
		FILE *f = fopen(raw, "rb");
		size_t n;

		ck_assert_ptr_nonnull(f);
		n = fread(m->b, 1, size, f);
		(void)n;
		fclose(f);
	}
}

static void do_write(struct img *img, struct model *m, uint64_t off,
		     uint64_t len, unsigned seed)
{
	uint8_t *buf = malloc(len);
	int ret;

	fill(buf, len, seed);
	ret = img_pwrite(img, buf, len, off);
	ck_assert_msg(ret == 0, "pwrite %llu+%llu: %d %s",
		      (unsigned long long)off, (unsigned long long)len, ret,
		      sx_last_error());
	memcpy(m->b + off, buf, len);
	free(buf);
}

static void verify(struct img *img, const struct model *m)
{
	uint8_t *buf = malloc(m->size);
	uint64_t i;

	ck_assert_int_eq(img_pread(img, buf, m->size, 0), 0);
	for (i = 0; i < m->size; i++)
		if (buf[i] != m->b[i])
			break;
	ck_assert_msg(i == m->size, "content differs at %llu: %02x != %02x",
		      (unsigned long long)i, buf[i], m->b[i]);
	free(buf);
}

static int qcheck(const char *path)
{
	mem_save_all();
	return sh("qemu-img check -q '%s' >/dev/null 2>&1", path);
}

/* qemu-img check clean, and qemu's view equals the model. */
static void oracle(const char *path, const struct model *m)
{
	const char *raw = tpath("expected.raw");
	FILE *f;
	int st;

	if (!have_qemu)
		return;
	st = qcheck(path); /* saves the memory files first */
	if (st != 0)
		sh("qemu-img check '%s' >&2", path);
	ck_assert_msg(st == 0, "qemu-img check %s: exit %d", path, st);
	f = fopen(raw, "wb");
	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fwrite(m->b, 1, m->size, f), m->size);
	fclose(f);
	st = sh("qemu-img compare -q -f raw -F qcow2 '%s' '%s'", raw, path);
	ck_assert_msg(st == 0, "qemu-img compare %s: exit %d", path, st);
}

static void reopen_verify(const char *path, const struct model *m)
{
	struct img *img = NULL;

	ck_assert_int_eq(img_open(path, "qcow2", 0, &img), 0);
	verify(img, m);
	img_close(img);
	oracle(path, m);
}

/* A tiny L2 cache, so that dirty slices get evicted (white box). */
static void shrink_l2cache(struct img *img, uint32_t nslots)
{
	struct qcow2 *s = img->priv;
	struct qcow2_l2cache *c = &s->l2cache;
	qcow2_l2cache_io_fn load = c->load, store = c->store;
	void *opaque = c->opaque;
	size_t slice = c->slice_size;

	ck_assert_int_eq(qcow2_l2cache_flush(c), 0);
	qcow2_l2cache_fini(c);
	ck_assert_int_eq(
		qcow2_l2cache_init(c, slice, nslots, load, store, opaque), 0);
}

/* ---- tests ---- */

START_TEST(t_alloc_write_read)
{
	const char *p = tpath("a.qcow2");
	struct opts o = {.size = 16 * MiB + 1536};
	struct model m;
	struct img *img;

	create(p, &o);
	model_init(&m, o.size, NULL);
	img = open_rw(p);
	do_write(img, &m, 0, 64 * KiB, 1);
	do_write(img, &m, 512, 512, 2); /* in place */
	do_write(img, &m, 1 * MiB + 4096, 200 * KiB, 3); /* partial ends */
	do_write(img, &m, 8 * MiB - 512, 1024, 4); /* across clusters */
	do_write(img, &m, 16 * MiB, 1536, 5); /* to the unaligned end */
	verify(img, &m);
	ck_assert_int_eq(img_flush(img), 0);
	do_write(img, &m, 3 * MiB, 3 * MiB, 6);
	verify(img, &m);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);
}
END_TEST

START_TEST(t_refuse_bad_ranges)
{
	const char *p = tpath("r.qcow2");
	struct opts o = {.size = 1 * MiB};
	struct img *img;
	uint8_t buf[1024] = {0};

	create(p, &o);
	img = open_rw(p);
	ck_assert_int_eq(img_pwrite(img, buf, 512, 100), -EINVAL);
	ck_assert_int_eq(img_pwrite(img, buf, 1024, 1 * MiB - 512), -EINVAL);
	ck_assert_int_eq(img_write_zeroes(img, 0, 512, 0x80), -EINVAL);
	img_close(img);
}
END_TEST

/*
 * A raw base with a pattern, for a qcow2 overlay on it: a memory file,
 * and the same bytes on disk (what model_init and qemu-img read).
 */
static void make_base(const char *path, uint64_t size, unsigned seed)
{
	uint8_t *b = malloc(size);
	FILE *f = fopen(path, "wb");

	fill(b, size, seed);
	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fwrite(b, 1, size, f), size);
	fclose(f);
	mem_put(path, b, size);
	free(b);
}

START_TEST(t_cow_backing)
{
	const char *base = tpath("base.raw"), *p = tpath("cow.qcow2");
	struct opts o = {.size = 4 * MiB, .cs = 65536};
	struct model m;
	struct img *img;

	/* The base is shorter than the overlay: zeros past its end. */
	make_base(base, 3 * MiB + 4096, 77);
	o.backing = "base.raw";
	o.backing_fmt = "raw";
	create(p, &o);
	model_init(&m, o.size, base);
	img = open_rw(p);
	ck_assert_ptr_nonnull(img->backing);
	do_write(img, &m, 4096, 512, 1);
	do_write(img, &m, 100 * KiB, 40 * KiB, 2);
	do_write(img, &m, 3 * MiB, 8192, 3); /* cluster straddles base end */
	do_write(img, &m, 4 * MiB - 1024, 1024, 4);
	verify(img, &m);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);
}
END_TEST

START_TEST(t_write_zeroes)
{
	const char *base = tpath("zb.raw"), *p = tpath("z.qcow2");
	struct opts o = {.size = 2 * MiB + 512, .cs = 65536};
	struct model m;
	struct img *img;

	make_base(base, o.size, 9);
	o.backing = "zb.raw";
	o.backing_fmt = "raw";
	create(p, &o);
	model_init(&m, o.size, base);
	img = open_rw(p);
	do_write(img, &m, 0, 256 * KiB, 1);
	/* Whole allocated clusters (kept), whole unallocated, partial. */
	ck_assert_int_eq(img_write_zeroes(img, 64 * KiB, 128 * KiB, 0), 0);
	ck_assert_int_eq(
		img_write_zeroes(img, 1 * MiB, 192 * KiB, IMG_WZ_NO_FALLBACK),
		0);
	ck_assert_int_eq(img_write_zeroes(img, 300 * KiB, 4096, 0), 0);
	/* The last, partial cluster counts as whole. */
	ck_assert_int_eq(img_write_zeroes(img, 2 * MiB, 512, 0), 0);
	memset(m.b + 64 * KiB, 0, 128 * KiB);
	memset(m.b + 1 * MiB, 0, 192 * KiB);
	memset(m.b + 300 * KiB, 0, 4096);
	memset(m.b + 2 * MiB, 0, 512);
	/* Writes into zero-allocated and zero clusters. */
	do_write(img, &m, 64 * KiB + 512, 512, 2);
	do_write(img, &m, 1 * MiB + 4096, 512, 3);
	verify(img, &m);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);
}
END_TEST

START_TEST(t_write_zeroes_v2)
{
	const char *base = tpath("z2b.raw"), *p = tpath("z2.qcow2");
	struct opts o = {.size = 1 * MiB, .cs = 65536, .v2 = true};
	struct model m;
	struct img *img;

	make_base(base, o.size, 5);
	o.backing = "z2b.raw";
	o.backing_fmt = "raw";
	create(p, &o);
	model_init(&m, o.size, base);
	img = open_rw(p);
	ck_assert_int_eq(img_write_zeroes(img, 0, 64 * KiB, IMG_WZ_NO_FALLBACK),
			 -ENOTSUP);
	ck_assert_int_eq(img_write_zeroes(img, 0, 192 * KiB, 0), 0);
	memset(m.b, 0, 192 * KiB);
	/* discard on v2 with a backing file: nothing may show through. */
	ck_assert_int_eq(img_discard(img, 0, 1 * MiB), 0);
	verify(img, &m);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);
}
END_TEST

START_TEST(t_discard)
{
	const char *base = tpath("db.raw"), *p = tpath("d.qcow2");
	const char *q = tpath("d2.qcow2");
	struct opts o = {.size = 2 * MiB, .cs = 65536};
	struct model m;
	struct img *img;

	/* With a backing file: zero clusters. */
	make_base(base, o.size, 3);
	o.backing = "db.raw";
	o.backing_fmt = "raw";
	create(p, &o);
	model_init(&m, o.size, base);
	img = open_rw(p);
	do_write(img, &m, 0, 512 * KiB, 1);
	ck_assert_int_eq(img_discard(img, 64 * KiB, 128 * KiB), 0);
	memset(m.b + 64 * KiB, 0, 128 * KiB);
	/* Partial clusters: no-op. Unallocated ones: zeroed too. */
	ck_assert_int_eq(img_discard(img, 300 * KiB, 4096), 0);
	ck_assert_int_eq(img_discard(img, 1 * MiB, 64 * KiB), 0);
	memset(m.b + 1 * MiB, 0, 64 * KiB);
	ck_assert_int_eq(img_flush(img), 0);
	/* Freed clusters get reused after the flush applied the frees. */
	do_write(img, &m, 1536 * KiB, 128 * KiB, 2);
	verify(img, &m);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);

	/* Without a backing file: unallocated. */
	o.backing = o.backing_fmt = NULL;
	create(q, &o);
	model_init(&m, o.size, NULL);
	img = open_rw(q);
	do_write(img, &m, 0, 1 * MiB, 4);
	ck_assert_int_eq(img_discard(img, 0, 2 * MiB), 0);
	memset(m.b, 0, 1 * MiB);
	verify(img, &m);
	img_close(img);
	reopen_verify(q, &m);
	free(m.b);
}
END_TEST

START_TEST(t_compressed)
{
	const char *raw = tpath("c.raw"), *p = tpath("c.qcow2");
	const char *types[] = {"zlib", "zstd"};
	struct model m;
	struct img *img;
	int i;

	if (!have_qemu)
		return;
	for (i = 0; i < 2; i++) {
		make_base(raw, 1 * MiB, 11);
		ck_assert_int_eq(
			sh("qemu-img convert -c -O qcow2 -o cluster_size=65536,compression_type=%s '%s' '%s'",
			   types[i], raw, p),
			0);
		mem_load(p);
		model_init(&m, 1 * MiB, raw);
		img = open_rw(p);
		do_write(img, &m, 64 * KiB + 512, 4096, 1);
		do_write(img, &m, 0, 64 * KiB, 2);
		do_write(img, &m, 512 * KiB - 512, 1024, 3);
		ck_assert_int_eq(img_write_zeroes(img, 192 * KiB, 64 * KiB, 0),
				 0);
		memset(m.b + 192 * KiB, 0, 64 * KiB);
		ck_assert_int_eq(img_discard(img, 256 * KiB, 64 * KiB), 0);
		memset(m.b + 256 * KiB, 0, 64 * KiB);
		verify(img, &m);
		img_close(img);
		reopen_verify(p, &m);
		free(m.b);
	}
}
END_TEST

START_TEST(t_reftable_growth)
{
	const char *p = tpath("g.qcow2");
	struct opts o = {.size = 8 * MiB, .cs = 512, .rbits = 64};
	struct model m;
	struct img *img;
	struct qcow2 *s;
	uint64_t off, t0;

	create(p, &o);
	model_init(&m, o.size, NULL);
	img = open_rw(p);
	s = img->priv;
	t0 = s->rc.table_offset;
	for (off = 0; off < 6 * MiB; off += 96 * KiB)
		do_write(img, &m, off, 64 * KiB, (unsigned)(off >> 10));
	ck_assert_int_eq(img_flush(img), 0);
	ck_assert_uint_ne(s->rc.table_offset, t0);
	verify(img, &m);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);
}
END_TEST

START_TEST(t_refcount_widths)
{
	static const unsigned widths[] = {1, 2, 4, 8, 16, 32, 64};
	char name[32];
	struct model m;
	unsigned i;

	for (i = 0; i < sizeof(widths) / sizeof(widths[0]); i++) {
		struct opts o = {
			.size = 4 * MiB, .cs = 4096, .rbits = widths[i]};
		const char *p;
		struct img *img;

		snprintf(name, sizeof(name), "w%u.qcow2", widths[i]);
		p = tpath(name);
		create(p, &o);
		model_init(&m, o.size, NULL);
		img = open_rw(p);
		do_write(img, &m, 0, 1 * MiB, 1);
		do_write(img, &m, 2 * MiB + 512, 700 * KiB, 2);
		ck_assert_int_eq(img_discard(img, 256 * KiB, 256 * KiB), 0);
		memset(m.b + 256 * KiB, 0, 256 * KiB);
		ck_assert_int_eq(img_flush(img), 0);
		do_write(img, &m, 3 * MiB, 512 * KiB, 3);
		verify(img, &m);
		img_close(img);
		reopen_verify(p, &m);
		free(m.b);
	}
}
END_TEST

START_TEST(t_extl2)
{
	const char *base = tpath("eb.raw"), *p = tpath("e.qcow2");
	struct opts o = {.size = 4 * MiB, .cs = 65536, .extl2 = true};
	struct model m;
	struct img *img;
	struct img_extent e;

	make_base(base, o.size, 21);
	o.backing = "eb.raw";
	o.backing_fmt = "raw";
	create(p, &o);
	model_init(&m, o.size, base);
	img = open_rw(p);
	/* Subcluster 1 only (2 KiB each): the rest stays unallocated. */
	do_write(img, &m, 2048 + 512, 512, 1);
	ck_assert_int_eq(img_block_status(img, 0, 64 * KiB, &e), 0);
	ck_assert_int_eq(e.status, IMG_UNALLOC);
	ck_assert_uint_eq(e.len, 2048);
	ck_assert_int_eq(img_block_status(img, 2048, 64 * KiB, &e), 0);
	ck_assert_int_eq(e.status, IMG_DATA);
	ck_assert_uint_eq(e.len, 2048);
	/* Partial subclusters on both sides, in an allocated cluster. */
	do_write(img, &m, 6 * 2048 + 1024, 3 * 2048, 2);
	/* Whole subclusters zeroed, partial ones written as zeros. */
	ck_assert_int_eq(img_write_zeroes(img, 128 * KiB + 1024, 8 * 2048, 0),
			 0);
	memset(m.b + 128 * KiB + 1024, 0, 8 * 2048);
	do_write(img, &m, 1 * MiB, 200 * KiB, 3);
	ck_assert_int_eq(img_discard(img, 1 * MiB, 64 * KiB), 0);
	memset(m.b + 1 * MiB, 0, 64 * KiB);
	verify(img, &m);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);
}
END_TEST

START_TEST(t_stream_runs)
{
	const char *p = tpath("s.qcow2");
	struct opts o = {.size = 8 * MiB, .cs = 65536};
	struct model m;
	struct img *img;
	uint64_t off = 0, host, got, total = 0;
	uint8_t *buf = sio_buf_alloc(2 * MiB);

	create(p, &o);
	model_init(&m, o.size, NULL);
	img = open_rw(p);
	while (off < 2 * MiB) {
		ck_assert_int_eq(img_alloc_run(img, off, 16, &host, &got), 0);
		ck_assert_uint_ge(got, 1);
		fill(buf, got * 65536, (unsigned)off);
		ck_assert_int_eq(sio_pwrite(img->file, buf, got * 65536, host),
				 0);
		ck_assert_int_eq(img_commit_run(img, off, got, host, 0), 0);
		memcpy(m.b + off, buf, got * 65536);
		off += got * 65536;
		total++;
	}
	/* Contiguous runs: 2 MiB in two allocations of 16 clusters. */
	ck_assert_uint_eq(total, 2);
	/* A cluster written meanwhile keeps the newer data. */
	do_write(img, &m, 4 * MiB, 65536, 9);
	ck_assert_int_eq(img_alloc_run(img, 4 * MiB, 1, &host, &got), 0);
	ck_assert_int_eq(img_commit_run(img, 4 * MiB, 1, host, 0), 0);
	ck_assert_int_eq(img_flush(img), 0);
	verify(img, &m);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);
	sio_buf_free(buf);
}
END_TEST

/*
 * commit_run over a cluster shared with an internal snapshot: without
 * IMG_COMMIT_REPLACE_SHARED the cluster keeps its data and the copy goes
 * back; with it the copy replaces it. qemu-img check is clean and the
 * snapshot reads as before either way.
 */
START_TEST(t_commit_replace)
{
	const char *p = tpath("cr.qcow2"), *snap = tpath("snap.raw");
	const char *after = tpath("snap-after.raw");
	struct opts o = {.size = 1 * MiB, .cs = 65536};
	uint8_t *buf = sio_buf_alloc(65536);
	uint64_t host, got;
	struct model m;
	struct img *img;

	if (!have_qemu) {
		sio_buf_free(buf);
		return;
	}
	create(p, &o);
	model_init(&m, o.size, NULL);
	img = open_rw(p);
	do_write(img, &m, 0, 2 * 65536, 3);
	img_close(img);
	mem_save_all();
	ck_assert_int_eq(sh("qemu-img snapshot -c snap '%s'", p), 0);
	ck_assert_int_eq(
		sh("qemu-img convert -O raw -l snap '%s' '%s'", p, snap), 0);
	mem_load(p);
	img = open_rw(p);
	fill(buf, 65536, 11);
	ck_assert_int_eq(img_alloc_run(img, 0, 1, &host, &got), 0);
	ck_assert_int_eq(sio_pwrite(img->file, buf, 65536, host), 0);
	ck_assert_int_eq(img_commit_run(img, 0, 1, host, 0), 0);
	ck_assert_int_eq(img_alloc_run(img, 65536, 1, &host, &got), 0);
	ck_assert_int_eq(sio_pwrite(img->file, buf, 65536, host), 0);
	ck_assert_int_eq(
		img_commit_run(img, 65536, 1, host, IMG_COMMIT_REPLACE_SHARED),
		0);
	memcpy(m.b + 65536, buf, 65536);
	ck_assert_int_eq(img_flush(img), 0);
	verify(img, &m);
	img_close(img);
	oracle(p, &m);
	ck_assert_int_eq(sh("qemu-img convert -O raw -l snap '%s' '%s' && "
			    "cmp -s '%s' '%s'",
			    p, after, snap, after),
			 0);
	free(m.b);
	sio_buf_free(buf);
}
END_TEST

START_TEST(t_l2_eviction)
{
	const char *p = tpath("ev.qcow2");
	struct opts o = {.size = 8 * MiB, .cs = 512};
	struct model m;
	struct img *img;
	uint64_t off;

	create(p, &o);
	model_init(&m, o.size, NULL);
	img = open_rw(p);
	shrink_l2cache(img, 4);
	/* One L2 table covers 32 KiB: touch many of them, twice. */
	for (off = 0; off < o.size; off += 40 * KiB)
		do_write(img, &m, off, 1024, (unsigned)(off >> 9));
	ck_assert_int_eq(img_discard(img, 0, 1 * MiB), 0);
	memset(m.b, 0, 1 * MiB);
	for (off = 512; off < o.size; off += 24 * KiB)
		do_write(img, &m, off, 512, (unsigned)(off >> 9) + 1);
	verify(img, &m);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);
}
END_TEST

START_TEST(t_set_backing)
{
	const char *p = tpath("h.qcow2"), *base = tpath("hb.raw");
	static const uint8_t unknown[5] = {1, 2, 3, 4, 5};
	struct opts o = {
		.size = 1 * MiB, .backing = "old.raw", .backing_fmt = "raw"};
	struct qcow2_ext *exts;
	struct img *img = NULL;
	struct qcow2 *s;
	uint8_t *c0;
	size_t i;
	bool seen = false;

	make_base(base, 1 * MiB, 1);
	make_base(tpath("old.raw"), 1 * MiB, 2);
	create(p, &o);
	/* Add an unknown extension by rebuilding cluster 0. */
	ck_assert_int_eq(
		img_open(p, "qcow2", IMG_OPEN_RDWR | IMG_OPEN_NO_BACKING, &img),
		0);
	s = img->priv;
	exts = calloc(s->n_exts + 1, sizeof(*exts));
	memcpy(exts, s->exts, s->n_exts * sizeof(*exts));
	exts[s->n_exts].magic = 0x12345678;
	exts[s->n_exts].len = sizeof(unknown);
	exts[s->n_exts].data = (uint8_t *)unknown;
	c0 = calloc(1, s->cluster_size);
	ck_assert_int_eq(qcow2_build_cluster0(&s->hdr, s->hdr_raw, exts,
					      s->n_exts + 1, "old.raw", c0,
					      s->cluster_size),
			 0);
	ck_assert_int_eq(sio_pwrite(img->file, c0, s->cluster_size, 0), 0);
	free(exts);
	free(c0);
	img_close(img);

	img = open_rw(p);
	ck_assert_int_eq(img_set_backing(img, "hb.raw", "raw"), 0);
	ck_assert_str_eq(img->backing_name, "hb.raw");
	img_close(img);

	ck_assert_int_eq(img_open(p, "qcow2", 0, &img), 0);
	s = img->priv;
	ck_assert_str_eq(img->backing_name, "hb.raw");
	ck_assert_str_eq(img->backing_fmt, "raw");
	ck_assert_uint_eq(s->exts[0].magic, QCOW2_EXT_BACKING_FMT);
	for (i = 0; i < s->n_exts; i++) {
		if (s->exts[i].magic != 0x12345678)
			continue;
		seen = true;
		ck_assert_uint_eq(s->exts[i].len, sizeof(unknown));
		ck_assert_mem_eq(s->exts[i].data, unknown, sizeof(unknown));
	}
	ck_assert(seen);
	img_close(img);
	if (have_qemu) {
		ck_assert_int_eq(qcheck(p), 0);
		ck_assert_int_eq(
			sh("qemu-img info '%s' | grep -q '^backing file: hb.raw'",
			   p),
			0);
	}

	/* Remove the backing file; a too long name does not fit. */
	img = open_rw(p);
	ck_assert_int_eq(img_set_backing(img, NULL, "raw"), 0);
	ck_assert_ptr_null(img->backing_name);
	ck_assert_ptr_null(img->backing_fmt);
	img_close(img);
	ck_assert_int_eq(img_open(p, "qcow2", 0, &img), 0);
	ck_assert_ptr_null(img->backing_name);
	ck_assert_ptr_null(img->backing);
	img_close(img);
	if (have_qemu)
		ck_assert_int_eq(qcheck(p), 0);
}
END_TEST

START_TEST(t_set_backing_nospace)
{
	const char *p = tpath("n.qcow2");
	struct opts o = {.size = 1 * MiB, .cs = 512};
	struct img *img;
	char name[600];

	create(p, &o);
	img = open_rw(p);
	memset(name, 'x', sizeof(name) - 1);
	name[sizeof(name) - 1] = '\0';
	ck_assert_int_eq(img_set_backing(img, name, "raw"), -ENOSPC);
	ck_assert_ptr_null(img->backing_name);
	img_close(img);
}
END_TEST

/* Write a qcow2 header field (big-endian) in place. */
static void poke64(const char *path, off_t off, uint64_t v)
{
	struct sio_file *f;

	v = htobe64(v);
	ck_assert_int_eq(sio_file_open(path, SIO_RDWR, &f), 0);
	ck_assert_int_eq(sio_pwrite(f, &v, 8, (uint64_t)off), 0);
	sio_file_close(f);
}

static uint64_t peek64(const char *path, uint64_t off)
{
	struct sio_file *f;
	uint64_t v;

	ck_assert_int_eq(sio_file_open(path, SIO_RDONLY | SIO_BUFFERED, &f), 0);
	ck_assert_int_eq(sio_pread(f, &v, 8, off), 0);
	sio_file_close(f);
	return be64toh(v);
}

START_TEST(t_open_checks)
{
	const char *p = tpath("o.qcow2");
	struct opts o = {.size = 1 * MiB};
	struct img *img = NULL;
	uint8_t buf[4096];

	/*
	 * A dirty image is repaired when opened for writing; while open it
	 * is dirty, and a clean close clears the bit.
	 */
	create(p, &o);
	poke64(p, 72, QCOW2_INCOMPAT_DIRTY);
	ck_assert_int_eq(img_open(p, "qcow2", IMG_OPEN_RDWR, &img), 0);
	ck_assert_uint_eq(peek64(p, 72) & QCOW2_INCOMPAT_DIRTY,
			  QCOW2_INCOMPAT_DIRTY);
	img_close(img);
	ck_assert_uint_eq(peek64(p, 72), 0);
	if (have_qemu)
		ck_assert_int_eq(qcheck(p), 0);

	/* Unknown autoclear bits and the bitmaps bit are cleared. */
	create(p, &o);
	poke64(p, 88, 0x8000000000000001ull);
	img = open_rw(p);
	ck_assert_uint_eq(((struct qcow2 *)img->priv)->hdr.autoclear_features,
			  0);
	img_close(img);
	ck_assert_int_eq(img_open(p, "qcow2", 0, &img), 0);
	ck_assert_uint_eq(((struct qcow2 *)img->priv)->hdr.autoclear_features,
			  0);
	img_close(img);

	/*
	 * A refcount block past the end of the file (found by
	 * fuzz_qcow2_write): refused for writing, where it was loaded as
	 * zeros and written back there, growing the file to 5 EiB.
	 */
	create(p, &o);
	{
		struct sio_file *f;
		uint64_t rt, size0, size1;

		ck_assert_int_eq(sio_file_open(p, SIO_RDONLY, &f), 0);
		ck_assert_int_eq(sio_pread(f, &rt, 8, 48), 0);
		ck_assert_int_eq(sio_file_size(f, &size0), 0);
		sio_file_close(f);
		poke64(p, (off_t)be64toh(rt) + 8, 0x514649fb00000000ull);
		ck_assert_int_eq(img_open(p, "qcow2", IMG_OPEN_RDWR, &img),
				 -EINVAL);
		ck_assert_ptr_nonnull(
			strstr(sx_last_error(), "beyond the end of the file"));
		ck_assert_int_eq(sio_file_open(p, SIO_RDONLY, &f), 0);
		ck_assert_int_eq(sio_file_size(f, &size1), 0);
		sio_file_close(f);
		ck_assert_uint_eq(size1, size0);
		ck_assert_int_eq(img_open(p, "qcow2", 0, &img), 0);
		img_close(img);
	}

	if (have_qemu) {
		create(p, &o);
		mem_save_all();
		ck_assert_int_eq(sh("qemu-img snapshot -c snap '%s'", p), 0);
		mem_load(p);
		/* Snapshots are kept: the write copies the shared cluster. */
		ck_assert_int_eq(img_open(p, "qcow2", IMG_OPEN_RDWR, &img), 0);
		fill(buf, sizeof(buf), 0x5a);
		ck_assert_int_eq(img_pwrite(img, buf, sizeof(buf), 0), 0);
		img_close(img);
		mem_save_all();
		ck_assert_int_eq(sh("qemu-img check -q '%s'", p), 0);
	}
}
END_TEST

/*
 * The overlap check: an L2 entry pointing at a refcount block (the first,
 * and one of several in an image of 512-byte clusters) must not let a
 * guest write land on it.
 */
START_TEST(t_overlap_refblock)
{
	const char *p = tpath("ov.qcow2");
	struct opts o = {.size = 4 * MiB, .cs = 512, .rbits = 16};
	uint64_t l1, l2, rt, blk, t;
	struct img *img = NULL;
	uint8_t buf[512];

	fill(buf, sizeof(buf), 7);
	create(p, &o);
	ck_assert_int_eq(img_open(p, "qcow2", IMG_OPEN_RDWR, &img), 0);
	/* Enough clusters for several refcount blocks (256 each). */
	for (t = 0; t < 2 * MiB; t += 4096)
		ck_assert_int_eq(img_pwrite(img, buf, sizeof(buf), t), 0);
	img_close(img);
	l1 = peek64(p, 40);
	rt = peek64(p, 48);
	for (t = 0; t < 2; t++) {
		l2 = peek64(p, l1) & QCOW2_L1E_OFFSET_MASK;
		blk = peek64(p, rt + 8 * t) & QCOW2_REFT_OFFSET_MASK;
		ck_assert_uint_ne(blk, 0);
		poke64(p, (off_t)l2, blk | QCOW2_OFLAG_COPIED);
		ck_assert_int_eq(img_open(p, "qcow2", IMG_OPEN_RDWR, &img), 0);
		ck_assert_int_eq(img_pwrite(img, buf, sizeof(buf), 0), -EIO);
		ck_assert_ptr_nonnull(
			strstr(sx_last_error(), "overlaps the refcount block"));
		img_close(img);
		ck_assert_uint_eq(peek64(p, l2), blk | QCOW2_OFLAG_COPIED);
	}
}
END_TEST

/*
 * Persistent bitmaps (bitmap.c, white box): a read-only open maintains
 * nothing; a read-write one keeps autoclear bit 0, tracks the enabled
 * bitmap only and has it IN_USE on disk before it returns; img_mark_dirty
 * sets bits at its granularity (clipped to the size); the overlap check
 * refuses its directory and table; a clean close stores the bits (a fresh
 * data cluster: the bitmap had none) and clears IN_USE, and qemu agrees.
 */
START_TEST(t_bitmaps)
{
	const char *p = tpath("bm.qcow2");
	struct opts o = {.size = 4 * MiB};
	const struct qcow2_bitmap *en = NULL, *dis = NULL;
	struct img *img = NULL;
	struct qcow2 *s;
	uint64_t dir, ent, tab, data;
	uint32_t i;

	if (!have_qemu)
		return;
	create(p, &o);
	mem_save_all();
	ck_assert_int_eq(sh("qemu-img bitmap --add -g 64k '%s' en && "
			    "qemu-img bitmap --add --disable '%s' dis",
			    p, p),
			 0);
	mem_load(p);

	ck_assert_int_eq(img_open(p, "qcow2", 0, &img), 0);
	ck_assert(!((struct qcow2 *)img->priv)->bm.on);
	img_mark_dirty(img, 0, 4 * MiB); /* read-only: nothing */
	img_close(img);

	img = open_rw(p);
	s = img->priv;
	ck_assert(s->bm.on);
	ck_assert_uint_eq(s->bm.n, 2);
	ck_assert_uint_eq(s->bm.ntracked, 1);
	ck_assert_uint_eq(s->hdr.autoclear_features, QCOW2_AUTOCLEAR_BITMAPS);
	ck_assert_uint_eq(peek64(p, 88), QCOW2_AUTOCLEAR_BITMAPS);
	for (i = 0; i < s->bm.n; i++) {
		if (!strcmp(s->bm.bms[i].name, "en"))
			en = &s->bm.bms[i];
		else if (!strcmp(s->bm.bms[i].name, "dis"))
			dis = &s->bm.bms[i];
	}
	ck_assert(en && dis && en->tracked && !dis->tracked && !dis->data);
	dir = s->bm.dir_off;
	ent = dir + en->entry_pos;
	tab = en->table_off;
	/* flags: the low half of the 8 bytes at entry + 8 */
	ck_assert_uint_eq(peek64(p, ent + 8) & 0xffffffffu,
			  3); /* auto, in use */
	ck_assert_uint_eq(en->table[0], 0);

	img_mark_dirty(img, 3 * 64 * KiB + 512, 512);
	img_mark_dirty(img, 4 * MiB - 512, 64 * KiB);
	img_mark_dirty(img, 0, 0);
	ck_assert_uint_eq(en->data[0], 0x08);
	ck_assert_uint_eq(en->data[7], 0x80);
	ck_assert_uint_eq(en->data_bytes, 8);

	ck_assert_int_eq(qcow2_check_overlap(img, s, dir, 512, "x"), -EIO);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "bitmap metadata"));
	ck_assert_int_eq(qcow2_check_overlap(img, s, tab + 8, 8, "x"), -EIO);
	img_close(img);

	ck_assert_uint_eq(peek64(p, ent + 8) & 0xffffffffu, 2); /* auto */
	ck_assert_uint_eq(peek64(p, 88), QCOW2_AUTOCLEAR_BITMAPS);
	data = peek64(p, tab);
	ck_assert_uint_ne(data, 0);
	ck_assert_uint_eq(peek64(p, data), 0x0800000000000080ull);
	ck_assert_int_eq(qcheck(p), 0);
	ck_assert_int_eq(sh("qemu-img info --output=json '%s' | "
			    "grep -q in-use",
			    p),
			 1);
}
END_TEST

/*
 * Crash simulation: every write from the k-th on fails, as if the process
 * died there (syncs have no effect then). The image must check clean or
 * with leaks only and read either the old or the new content.
 */
/* cluster size, refcount bits, extended L2, bytes written */
static const struct crash_cfg {
	uint32_t cs;
	unsigned rbits;
	bool extl2;
	uint64_t wlen;
} crash_cfgs[] = {
	{4096, 16, false, 300 * KiB},
	{1024, 64, false, 40 * KiB},
	{16384, 1, true, 100 * KiB},
};

START_TEST(t_crash_prefixes)
{
	const struct crash_cfg *cfg = &crash_cfgs[_i];
	const uint64_t wlen = cfg->wlen;
	const char *base = tpath("kb.raw"), *p = tpath("k.qcow2");
	struct opts o = {.size = 2 * MiB,
			 .cs = cfg->cs,
			 .rbits = cfg->rbits,
			 .extl2 = cfg->extl2};
	struct model old, m;
	unsigned k, done = 0;

	if (!have_qemu)
		return;
	make_base(base, o.size, 4);
	o.backing = "kb.raw";
	o.backing_fmt = "raw";
	for (k = 0; k < 4000 && !done; k++) {
		struct img *img;
		uint8_t *buf = malloc(wlen);
		int ret, st;

		create(p, &o);
		model_init(&old, o.size, base);
		img = open_rw(p);
		shrink_l2cache(img, 2);
		/* A first, durable state. */
		do_write(img, &old, 0, 64 * KiB, 1);
		ck_assert_int_eq(img_discard(img, 0, 16 * KiB), 0);
		memset(old.b, 0, 16 * KiB);
		ck_assert_int_eq(img_flush(img), 0);
		model_init(&m, o.size, NULL);
		memcpy(m.b, old.b, o.size);

		sio_fault_add(SIO_OP_WRITE, "/k.qcow2", 0, 0, EIO, 0, k);
		fill(buf, wlen, 7);
		/* m: what each attempted operation would leave. */
		memcpy(m.b + 32 * KiB + 512, buf, wlen);
		ret = img_pwrite(img, buf, wlen, 32 * KiB + 512);
		if (!ret) {
			memset(m.b + 1 * MiB, 0, 64 * KiB);
			ret = img_write_zeroes(img, 1 * MiB, 64 * KiB, 0);
		}
		if (!ret) {
			memset(m.b + 16 * KiB, 0, 16 * KiB);
			ret = img_discard(img, 16 * KiB, 16 * KiB);
		}
		if (!ret)
			ret = img_flush(img);
		if (!ret)
			done = 1; /* k writes were enough for everything */
		img_close(img);
		sio_fault_clear();

		st = qcheck(p);
		if (st != 0 && st != 3)
			sh("qemu-img check '%s' >&2", p);
		ck_assert_msg(st == 0 || st == 3, "k=%u: qemu-img check %d", k,
			      st);
		{
			struct img *r = NULL;
			uint8_t *got = malloc(o.size);
			uint64_t c;

			ck_assert_int_eq(img_open(p, "qcow2", 0, &r), 0);
			ck_assert_int_eq(img_pread(r, got, o.size, 0), 0);
			for (c = 0; c < o.size; c += 512) {
				bool is_old = !memcmp(got + c, old.b + c, 512);
				bool is_new = !memcmp(got + c, m.b + c, 512);

				ck_assert_msg(
					is_old || is_new,
					"k=%u: sector %llu neither old nor new",
					k, (unsigned long long)c / 512);
			}
			img_close(r);
			free(got);
		}
		free(old.b);
		free(m.b);
		free(buf);
	}
	ck_assert(done);
	fprintf(stderr, "crash config %d: %u crash points checked\n", _i, k);
}
END_TEST

/*
 * One failing request on a memory image (sio_mem_fail): the n-th write or
 * the n-th fdatasync of a workload (allocating writes, write_zeroes,
 * discard, flush) fails once with EIO and every other one succeeds, as a
 * transient device error does. The workload goes on whatever the calls
 * return and ends with another flush and a close. Then the image checks
 * clean or with leaks only, and every sector reads as before the workload
 * or as after it; for every n up to what the workload issues.
 */
struct fail_run {
	struct model old, m;
	unsigned failed; /* calls that returned an error */
};

static const char *const fail_ops[] = {"write", "fdatasync"};

/* The workload with the fault armed at n (n < 0: none); its op counts. */
static void fail_one_run(enum sio_op op, int n, struct fail_run *r,
			 uint64_t *writes, uint64_t *syncs)
{
	const char *base = tpath("fb.raw"), *p = tpath("f.qcow2");
	struct opts o = {.size = 2 * MiB,
			 .cs = 4096,
			 .backing = "fb.raw",
			 .backing_fmt = "raw"};
	const uint64_t wlen = 300 * KiB;
	uint64_t w0, s0;
	struct sio_mem *mem;
	struct img *img;
	uint8_t *buf = malloc(wlen);

	make_base(base, o.size, 4);
	create(p, &o);
	mem = mem_get(p);
	model_init(&r->old, o.size, base);
	img = open_rw(p);
	shrink_l2cache(img, 2);
	do_write(img, &r->old, 0, 64 * KiB, 1);
	ck_assert_int_eq(img_flush(img), 0);
	model_init(&r->m, o.size, NULL);
	memcpy(r->m.b, r->old.b, o.size);
	r->failed = 0;

	w0 = sio_mem_count(mem, SIO_OP_WRITE);
	s0 = sio_mem_count(mem, SIO_OP_FDATASYNC);
	if (n >= 0)
		ck_assert_int_eq(sio_mem_fail(mem, op, (unsigned)n, 1, EIO), 0);
	fill(buf, wlen, 7);
	memcpy(r->m.b + 32 * KiB + 512, buf, wlen);
	r->failed += img_pwrite(img, buf, wlen, 32 * KiB + 512) != 0;
	memset(r->m.b + 1 * MiB, 0, 64 * KiB);
	r->failed += img_write_zeroes(img, 1 * MiB, 64 * KiB, 0) != 0;
	memset(r->m.b + 16 * KiB, 0, 16 * KiB);
	r->failed += img_discard(img, 16 * KiB, 16 * KiB) != 0;
	r->failed += img_flush(img) != 0;
	fill(buf, 64 * KiB, 8);
	memcpy(r->m.b + 1536 * KiB, buf, 64 * KiB);
	r->failed += img_pwrite(img, buf, 64 * KiB, 1536 * KiB) != 0;
	r->failed += img_flush(img) != 0;
	/*
	 * Counted before the close: its own requests (clearing the dirty
	 * bit) cannot report a failure; one left dirty is repaired when
	 * opened next.
	 */
	*writes = sio_mem_count(mem, SIO_OP_WRITE) - w0;
	*syncs = sio_mem_count(mem, SIO_OP_FDATASYNC) - s0;
	img_close(img);
	ck_assert_int_eq(sio_mem_fail(mem, 0, 0, 0, EIO), 0);
	free(buf);
}

/* The image after a run: consistent, each sector old or new. */
static void fail_one_judge(const char *what, int n, struct fail_run *r)
{
	const char *p = tpath("f.qcow2");
	struct img *img = NULL;
	uint8_t *got = malloc(r->m.size);
	uint64_t c;
	int st;

	if (have_qemu) {
		st = qcheck(p);
		if (st != 0 && st != 3)
			sh("qemu-img check '%s' >&2", p);
		ck_assert_msg(st == 0 || st == 3, "%s %d: qemu-img check %d",
			      what, n, st);
	}
	ck_assert_int_eq(img_open(p, "qcow2", 0, &img), 0);
	ck_assert_int_eq(img_pread(img, got, r->m.size, 0), 0);
	for (c = 0; c < r->m.size; c += 512)
		ck_assert_msg(!memcmp(got + c, r->old.b + c, 512) ||
				      !memcmp(got + c, r->m.b + c, 512),
			      "%s %d: sector %llu neither old nor new", what, n,
			      (unsigned long long)c / 512);
	img_close(img);
	free(got);
	free(r->old.b);
	free(r->m.b);
}

START_TEST(t_fail_one)
{
	const enum sio_op op = _i ? SIO_OP_FDATASYNC : SIO_OP_WRITE;
	uint64_t writes, syncs, total, w, sy;
	struct fail_run r;
	unsigned failures = 0;
	int n;

	/* Unfaulted: succeeds, and says how many requests there are. */
	fail_one_run(op, -1, &r, &writes, &syncs);
	ck_assert_uint_eq(r.failed, 0);
	fail_one_judge(fail_ops[_i], -1, &r);
	total = _i ? syncs : writes;
	ck_assert_uint_gt(total, 3);
	for (n = 0; (uint64_t)n < total; n++) {
		fail_one_run(op, n, &r, &w, &sy);
		failures += r.failed != 0;
		fail_one_judge(fail_ops[_i], n, &r);
	}
	/* Each fault reached the caller somewhere. */
	ck_assert_uint_eq(failures, total);
	fprintf(stderr, "%s: %llu single faults checked\n", fail_ops[_i],
		(unsigned long long)total);
}
END_TEST

/* ---- the flush through a port ---- */

enum rec_class { R_SYNC, R_RC, R_RT, R_L2, R_L1, R_OTHER };

/* A port that records each op (classified) and passes it to another. */
struct rec_port {
	struct img_port port;
	struct img_port *inner;
	struct img *img;
	enum rec_class cls[4096];
	bool frees_left[4096]; /* queued frees not applied yet at this op */
	unsigned n;
};

static enum rec_class classify_write(struct img *img, uint64_t off)
{
	struct qcow2 *s = img->priv;
	uint64_t i, b;

	if (off >= s->hdr.l1_table_offset &&
	    off < s->hdr.l1_table_offset + s->l1_size * 8)
		return R_L1;
	if (off >= s->rc.table_offset &&
	    off < s->rc.table_offset + s->rc.table_entries * 8)
		return R_RT;
	for (i = 0; i < s->rc.table_entries; i++) {
		b = s->rc.table[i] & QCOW2_REFT_OFFSET_MASK;
		if (b && off >= b && off < b + s->cluster_size)
			return R_RC;
	}
	for (i = 0; i < s->l1_size; i++) {
		b = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
		if (b && off >= b && off < b + s->cluster_size)
			return R_L2;
	}
	return R_OTHER;
}

static void rec(struct rec_port *r, enum rec_class c)
{
	struct qcow2 *s = r->img->priv;

	ck_assert_uint_lt(r->n, 4096);
	r->frees_left[r->n] = s->w.n_frees != 0;
	r->cls[r->n++] = c;
}

static int rec_submit(struct img_port *port, struct img_port_op *op)
{
	struct rec_port *r = port->priv;
	unsigned i;

	switch (op->kind) {
	case IMG_PORT_FDATASYNC:
		rec(r, R_SYNC);
		break;
	case IMG_PORT_WRITE:
		rec(r, classify_write(r->img, op->off));
		break;
	case IMG_PORT_WRITEV:
		for (i = 0; i < op->n; i++)
			rec(r, classify_write(r->img, op->vec[i].off));
		break;
	default:
		rec(r, R_OTHER);
	}
	return r->inner->submit(r->inner, op);
}

static void rec_init(struct rec_port *r, struct img *img,
		     struct img_port *inner)
{
	memset(r, 0, sizeof(*r));
	r->port.submit = rec_submit;
	r->port.priv = r;
	r->inner = inner;
	r->img = img;
}

static void store_res(void *opaque, int res)
{
	int *p = opaque;

	ck_assert_int_eq(*p, 1); /* done runs once */
	*p = res;
}

/*
 * The recorded order keeps the crash-safe sequence: every refcount-table
 * write after the sync that follows the last refcount-block write before
 * it, every L2 write after the data sync and the refcount syncs, every L1
 * write after a sync that follows the last L2 write, frees applied only
 * after the L1 sync.
 */
static void check_order(const struct rec_port *r, bool data_first)
{
	unsigned i, syncs = 0, last_rc = 0, last_l2 = 0, sync_after_rc = 0,
		    sync_after_l2 = 0, sync_after_rt = 0, rc = 0, rt = 0,
		    l2 = 0, l1 = 0;
	bool seen_rt = false;

	ck_assert_uint_gt(r->n, 0);
	if (data_first)
		ck_assert_int_eq(r->cls[0], R_SYNC);
	for (i = 0; i < r->n; i++) {
		switch (r->cls[i]) {
		case R_SYNC:
			syncs++;
			if (rc && last_rc < i + 1)
				sync_after_rc = syncs;
			if (seen_rt)
				sync_after_rt = syncs;
			if (l2)
				sync_after_l2 = syncs;
			break;
		case R_RC:
			ck_assert_msg(!rt && !l2 && !l1,
				      "refcount block written after tables");
			rc++;
			last_rc = i + 1;
			sync_after_rc = 0;
			break;
		case R_RT:
			ck_assert_msg(!rc || sync_after_rc,
				      "refcount table before the block sync");
			rt++;
			seen_rt = true;
			sync_after_rt = 0;
			break;
		case R_L2:
			ck_assert_msg(!data_first || syncs >= 1,
				      "L2 before the data sync");
			ck_assert_msg(!rc || sync_after_rc,
				      "L2 before the refcount block sync");
			ck_assert_msg(!rt || sync_after_rt,
				      "L2 before the refcount table sync");
			l2++;
			last_l2 = i + 1;
			sync_after_l2 = 0;
			break;
		case R_L1:
			ck_assert_msg(!l2 || sync_after_l2,
				      "L1 before the L2 sync");
			l1++;
			break;
		case R_OTHER:
			ck_abort_msg("unexpected op %u in a flush", i);
		}
	}
	ck_assert_uint_gt(l2, 0);
	ck_assert_uint_gt(l1, 0);
	ck_assert_int_eq(r->cls[r->n - 1], R_SYNC);
	(void)last_l2;
}

START_TEST(t_flush_order)
{
	const char *p = tpath("fo.qcow2");
	struct opts o = {.size = 64 * MiB, .cs = 4096};
	struct rec_port r;
	struct model m;
	struct img *img;
	struct qcow2 *s;
	unsigned i;
	int res = 1;

	create(p, &o);
	model_init(&m, o.size, NULL);
	img = open_rw(p);
	s = img->priv;
	/* A first state with data to discard later (queued frees). */
	do_write(img, &m, 0, 256 * KiB, 1);
	ck_assert_int_eq(img_flush(img), 0);
	/* New L2 tables, refcount blocks, table entries, frees. */
	for (i = 0; i < 8; i++)
		do_write(img, &m, i * 8 * MiB + 4096, 64 * KiB, 2 + i);
	ck_assert_int_eq(img_discard(img, 0, 64 * KiB), 0);
	memset(m.b, 0, 64 * KiB);
	ck_assert_uint_gt(s->w.n_frees, 0);
	rec_init(&r, img, img_port_sync());
	ck_assert_int_eq(img_flush_start(img, &r.port, store_res, &res), 0);
	ck_assert_int_eq(res, 0); /* the sync port ends it inside the call */
	check_order(&r, true);
	/* Frees were still queued at every write, applied at the end. */
	for (i = 0; i < r.n; i++)
		ck_assert(r.frees_left[i]);
	ck_assert_uint_eq(s->w.n_frees, 0);
	img_close(img);
	reopen_verify(p, &m);
	free(m.b);
}
END_TEST

/* Run q until done changed from 1, doing `between` after each completion. */
static void drive(struct sio_queue *q, int *res, struct img *img,
		  struct model *m, unsigned *seed)
{
	while (*res == 1) {
		ck_assert_int_ge(sio_queue_run(q, 1), 0);
		if (img && *res == 1) {
			uint64_t off = (uint64_t)(*seed % 60) * MiB + 512;

			do_write(img, m, off, 12 * KiB, (*seed)++);
		}
	}
}

/*
 * An asynchronous flush on a queue with writes going on meanwhile (between
 * its completions): the image stays consistent and reads as written.
 */
START_TEST(t_flush_async_concurrent)
{
	const char *p = tpath("fa.qcow2");
	struct opts o = {.size = 64 * MiB, .cs = 4096};
	struct img_port *port;
	struct sio_queue *q;
	struct rec_port r;
	struct model m;
	struct img *img;
	unsigned round, seed = 100;
	int res;

	create_in(p, &o, true); /* a queue needs a real file */
	model_init(&m, o.size, NULL);
	img = open_rw(p);
	ck_assert_int_eq(sio_queue_create(32, &q), 0);
	ck_assert_int_eq(img_port_queue_create(q, &port), 0);
	img_set_port(img, port);
	for (round = 0; round < 6; round++) {
		do_write(img, &m, round * 9 * MiB, 40 * KiB, round);
		ck_assert_int_eq(img_discard(img, round * 9 * MiB, 8 * KiB), 0);
		memset(m.b + round * 9 * MiB, 0, 8 * KiB);
		rec_init(&r, img, port);
		res = 1;
		ck_assert_int_eq(img_flush_start(img, &r.port, store_res, &res),
				 0);
		/* A second one while it is in flight is refused. */
		ck_assert_int_eq(img_flush_start(img, NULL, store_res, &res),
				 -EAGAIN);
		drive(q, &res, img, &m, &seed);
		ck_assert_msg(res == 0, "flush: %d %s", res, sx_last_error());
		check_order(&r, true);
		verify(img, &m);
	}
	/* img_flush() waits for one in flight, running only its ops. */
	do_write(img, &m, 5 * MiB, 4 * KiB, 77);
	res = 1;
	ck_assert_int_eq(img_flush_start(img, NULL, store_res, &res), 0);
	ck_assert_int_eq(img_flush(img), 0);
	ck_assert_int_eq(res, 0);
	img_close(img);
	img_port_queue_destroy(port);
	sio_queue_destroy(q);
	reopen_verify(p, &m);
	free(m.b);
}
END_TEST

/* block_status without metadata I/O: -EAGAIN and the read it needs. */
START_TEST(t_block_status_nowait)
{
	const char *p = tpath("bn.qcow2");
	struct opts o = {.size = 64 * MiB, .cs = 4096};
	struct img_extent e, want;
	struct img_meta_req req;
	struct model m;
	struct img *img, *ref;
	uint64_t off;
	uint8_t *buf;
	unsigned again = 0;
	int ret;

	create(p, &o);
	model_init(&m, o.size, NULL);
	img = open_rw(p);
	do_write(img, &m, 0, 64 * KiB, 1);
	do_write(img, &m, 40 * MiB, 64 * KiB, 2);
	img_close(img);

	ck_assert_int_eq(img_open(p, "qcow2", 0, &img), 0);
	/* The reference answers from another handle: its loads stay there. */
	ck_assert_int_eq(img_open(p, "qcow2", 0, &ref), 0);
	buf = sio_buf_alloc(1 * MiB);
	for (off = 0; off < o.size; off += e.len) {
		ret = img_block_status_nowait(img, off, o.size - off, &e, &req);
		if (ret == -EAGAIN) {
			ck_assert_uint_le(req.len, 1 * MiB);
			ck_assert_uint_le(req.guest_off, off);
			ck_assert_int_eq(
				sio_pread(req.file, buf, req.len, req.host_off),
				0);
			img_meta_fill(img, &req, buf);
			ret = img_block_status_nowait(img, off, o.size - off,
						      &e, &req);
			ck_assert_int_eq(ret, 0);
			again++;
		}
		ck_assert_int_eq(ret, 0);
		ck_assert_int_eq(
			img_block_status(ref, off, o.size - off, &want), 0);
		ck_assert_int_eq(e.status, want.status);
		ck_assert_uint_eq(e.len, want.len);
		ck_assert_uint_eq(e.host_off, want.host_off);
	}
	ck_assert_uint_ge(again, 2); /* two L2 tables, neither cached */
	sio_buf_free(buf);
	img_close(ref);
	img_close(img);
	free(m.b);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("qcow2_write");
	TCase *tc = tcase_create("write");

	tcase_set_timeout(tc, 300);
	tcase_add_checked_fixture(tc, NULL, mem_clear);
	tcase_add_test(tc, t_alloc_write_read);
	tcase_add_test(tc, t_refuse_bad_ranges);
	tcase_add_test(tc, t_cow_backing);
	tcase_add_test(tc, t_write_zeroes);
	tcase_add_test(tc, t_write_zeroes_v2);
	tcase_add_test(tc, t_discard);
	tcase_add_test(tc, t_compressed);
	tcase_add_test(tc, t_reftable_growth);
	tcase_add_test(tc, t_refcount_widths);
	tcase_add_test(tc, t_extl2);
	tcase_add_test(tc, t_stream_runs);
	tcase_add_test(tc, t_l2_eviction);
	tcase_add_test(tc, t_set_backing);
	tcase_add_test(tc, t_set_backing_nospace);
	tcase_add_test(tc, t_open_checks);
	tcase_add_test(tc, t_overlap_refblock);
	tcase_add_test(tc, t_commit_replace);
	tcase_add_test(tc, t_bitmaps);
	tcase_add_test(tc, t_flush_order);
	tcase_add_test(tc, t_block_status_nowait);
	tcase_add_loop_test(tc, t_fail_one, 0, 2);
	tcase_add_loop_test(tc, t_crash_prefixes, 0,
			    sizeof(crash_cfgs) / sizeof(crash_cfgs[0]));
	suite_add_tcase(s, tc);
	/* Everything above runs on memory files; a queue needs io_uring. */
	if (have_uring()) {
		TCase *tq = tcase_create("queue");

		tcase_set_timeout(tq, 300);
		tcase_add_test(tq, t_flush_async_concurrent);
		suite_add_tcase(s, tq);
	} else {
		fprintf(stderr, "t_flush_async_concurrent left out\n");
	}
	return s;
}

int main(void)
{
	have_qemu = sh("qemu-img --version >/dev/null 2>&1") == 0;
	return run_suite(suite(), tmpdir, 0);
}
