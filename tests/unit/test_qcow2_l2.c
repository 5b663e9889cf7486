/*
 * qcow2 L2 entries: decoding of standard and extended entries and of
 * compressed descriptors (pure functions), then block_status and
 * read_compressed on crafted images: merging of contiguous runs, zero and
 * compressed clusters, subclusters, an external data file, fast sparse maps,
 * and the errors for unaligned or out-of-file offsets.
 *
 * The crafted images are memory files (memfile.h), opened through the
 * facade's single-layer entry (img_open_layer), so all of this runs where
 * io_uring is refused; only the read-ahead test, which needs a queue, uses
 * a real file and is left out (said on stderr) without io_uring.
 */
#define _GNU_SOURCE
#include <check.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "testutil.h"
#include "memfile.h"
#include "common/error.h"
#include "engine/meta_ahead.h"
#include "formats/image.h"
#include "formats/qcow2/qcow2.h"
#include "io/io.h"

static char tmpdir[] = "/tmp/siphon-q2l-XXXXXX";
static int img_seq;

#define C64K 65536ull

/* ---- image builder ---- */

struct ib {
	uint8_t *b;
	size_t len;
	uint64_t cs;
	unsigned esize; /* L2 entry size */
};

static void ib_grow(struct ib *ib, size_t len)
{
	if (len <= ib->len)
		return;
	ib->b = realloc(ib->b, len);
	ck_assert_ptr_nonnull(ib->b);
	memset(ib->b + ib->len, 0, len - ib->len);
	ib->len = len;
}

static void put32(struct ib *ib, size_t off, uint32_t v)
{
	v = htobe32(v);
	ib_grow(ib, off + 4);
	memcpy(ib->b + off, &v, 4);
}

static void put64(struct ib *ib, size_t off, uint64_t v)
{
	v = htobe64(v);
	ib_grow(ib, off + 8);
	memcpy(ib->b + off, &v, 8);
}

/* Store len bytes at off, growing the image first like put32/put64. */
static void put_bytes(struct ib *ib, size_t off, const void *buf, size_t len)
{
	ib_grow(ib, off + len);
	memcpy(ib->b + off, buf, len);
}

/*
 * Cluster 0 header, 1 refcount table, 2 refcount block, 3 L1 table (one
 * cluster), 4 the L2 table of L1 entry 0 (when size > 0), data from 5.
 */
static struct ib build(unsigned version, unsigned cb, uint64_t size,
		       uint64_t incompat)
{
	struct ib ib = {0};
	uint64_t cs = 1ull << cb;
	bool ext = incompat & QCOW2_INCOMPAT_EXTL2;
	uint64_t per_l1 = cs * (cs / (ext ? 16 : 8));
	uint32_t l1_size = (uint32_t)((size + per_l1 - 1) / per_l1);

	ib.cs = cs;
	ib.esize = ext ? 16 : 8;
	ib_grow(&ib, 5 * cs);
	put32(&ib, 0, QCOW2_MAGIC);
	put32(&ib, 4, version);
	put32(&ib, 20, cb);
	put64(&ib, 24, size);
	put32(&ib, 36, l1_size);
	put64(&ib, 40, 3 * cs);
	put64(&ib, 48, cs);
	put32(&ib, 56, 1);
	if (version >= 3) {
		put64(&ib, 72, incompat);
		put32(&ib, 96, 4);
		put32(&ib, 100, 104);
	}
	put64(&ib, cs, 2 * cs);
	if (l1_size)
		put64(&ib, 3 * cs, (4 * cs) | QCOW2_OFLAG_COPIED);
	return ib;
}

/* L2 entry i of the table at cluster 4. */
static void set_l2(struct ib *ib, unsigned i, uint64_t word, uint64_t bitmap)
{
	put64(ib, 4 * ib->cs + i * ib->esize, word);
	if (ib->esize == 16)
		put64(ib, 4 * ib->cs + i * ib->esize + 8, bitmap);
}

/*
 * buf as the file tmpdir/name (name NULL: a fresh image name): a memory
 * file, or with real a file on disk. Returns its path.
 */
static char *write_file(const char *name, const void *buf, size_t len,
			bool real)
{
	char *path;
	int fd;

	if (name)
		ck_assert_int_gt(asprintf(&path, "%s/%s", tmpdir, name), 0);
	else
		ck_assert_int_gt(
			asprintf(&path, "%s/img%d.qcow2", tmpdir, img_seq++),
			0);
	if (!real) {
		mem_put(path, buf, len);
		return path;
	}
	fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, buf, len), (ssize_t)len);
	close(fd);
	return path;
}

/* One read-only qcow2 layer, no chain (a refused one comes back too). */
static int open_img(const char *path, struct img **out)
{
	int ret = img_open_layer(path, "qcow2", 0, out);

	ck_assert_msg(*out != NULL, "%s: not opened at all: %d %s", path, ret,
		      sx_last_error());
	return ret;
}

static void close_img(struct img *img)
{
	img_close(img);
}

static struct img *open_ib_in(struct ib *ib, bool real)
{
	char *path = write_file(NULL, ib->b, ib->len, real);
	struct img *img;
	int ret = open_img(path, &img);

	ck_assert_msg(ret == 0, "open %s: %d %s", path, ret, sx_last_error());
	free(path);
	return img;
}

static struct img *open_ib(struct ib *ib)
{
	return open_ib_in(ib, false);
}

static void expect_ext(struct img *img, uint64_t off, uint64_t len,
		       enum img_status st, uint64_t elen, bool hv,
		       uint64_t host)
{
	struct img_extent e;
	int ret = img_block_status(img, off, len, &e);

	ck_assert_msg(ret == 0, "block_status(%llu): %d %s",
		      (unsigned long long)off, ret, sx_last_error());
	ck_assert_msg(e.status == st && e.len == elen && e.host_valid == hv,
		      "at %llu: status %d len %llu hv %d, want %d %llu %d",
		      (unsigned long long)off, e.status,
		      (unsigned long long)e.len, e.host_valid, st,
		      (unsigned long long)elen, hv);
	if (hv) {
		ck_assert_uint_eq(e.host_off, host);
		ck_assert_ptr_nonnull(e.file);
	}
}

static void expect_bs_error(struct ib *ib, uint64_t off, const char *want)
{
	struct img *img = open_ib(ib);
	struct img_extent e;
	int ret;

	sx_error_clear();
	ret = img_block_status(img, off, img->size - off, &e);
	ck_assert_msg(ret == -EINVAL, "got %d", ret);
	ck_assert_msg(strstr(sx_last_error(), want), "'%s' lacks '%s'",
		      sx_last_error(), want);
	ck_assert_msg(strstr(sx_last_error(), img->path), "'%s' lacks path",
		      sx_last_error());
	ck_assert_msg(strstr(sx_last_error(), "guest offset"),
		      "'%s' lacks guest offset", sx_last_error());
	close_img(img);
	free(ib->b);
}

/* ---- pure decoding ---- */

static void geom(struct qcow2 *s, unsigned version, unsigned cb, bool ext)
{
	memset(s, 0, sizeof(*s));
	s->hdr.version = version;
	qcow2_set_geometry(s, cb, ext);
}

START_TEST(test_decode_standard)
{
	struct qcow2 s;
	struct qcow2_l2e e;
	const char *why = NULL;
	uint64_t host;
	bool hv;

	geom(&s, 3, 16, false);
	ck_assert_uint_eq(s.l2_entries, 8192);
	ck_assert_int_eq(qcow2_l2e_decode(&s, 0, 0, &e, &why), 0);
	ck_assert_int_eq(e.type, QCOW2_C_UNALLOC);
	ck_assert_int_eq(qcow2_l2e_unit_status(&s, &e, 0, &host, &hv),
			 IMG_UNALLOC);

	ck_assert_int_eq(
		qcow2_l2e_decode(&s, 0x50000 | QCOW2_OFLAG_COPIED, 0, &e, &why),
		0);
	ck_assert_int_eq(e.type, QCOW2_C_NORMAL);
	ck_assert(e.copied);
	ck_assert_uint_eq(e.host_off, 0x50000);
	ck_assert_int_eq(qcow2_l2e_unit_status(&s, &e, 0, &host, &hv),
			 IMG_DATA);
	ck_assert(hv);
	ck_assert_uint_eq(host, 0x50000);

	ck_assert_int_eq(qcow2_l2e_decode(&s, QCOW2_OFLAG_ZERO, 0, &e, &why),
			 0);
	ck_assert_int_eq(e.type, QCOW2_C_ZERO_PLAIN);
	ck_assert_int_eq(qcow2_l2e_unit_status(&s, &e, 0, &host, &hv),
			 IMG_ZERO);
	ck_assert(!hv);

	ck_assert_int_eq(
		qcow2_l2e_decode(&s, 0x70000 | QCOW2_OFLAG_ZERO, 0, &e, &why),
		0);
	ck_assert_int_eq(e.type, QCOW2_C_ZERO_ALLOC);
	ck_assert_int_eq(qcow2_l2e_unit_status(&s, &e, 0, &host, &hv),
			 IMG_ZERO);
	ck_assert(hv);
	ck_assert_uint_eq(host, 0x70000);

	/* Host offset not cluster aligned. */
	ck_assert_int_eq(qcow2_l2e_decode(&s, 0x50200, 0, &e, &why), -EINVAL);
	ck_assert(strstr(why, "unaligned"));
	/* Compressed with COPIED is invalid. */
	ck_assert_int_eq(qcow2_l2e_decode(&s,
					  QCOW2_OFLAG_COMPRESSED |
						  QCOW2_OFLAG_COPIED | 0x1234,
					  0, &e, &why),
			 -EINVAL);

	/* v2 has no zero flag. */
	geom(&s, 2, 16, false);
	ck_assert_int_eq(qcow2_l2e_decode(&s, QCOW2_OFLAG_ZERO, 0, &e, &why),
			 -EINVAL);
	ck_assert(strstr(why, "version 2"));
	ck_assert_int_eq(qcow2_l2e_decode(&s, 0x50000, 0, &e, &why), 0);
	ck_assert_int_eq(e.type, QCOW2_C_NORMAL);
}
END_TEST

START_TEST(test_decode_extended)
{
	struct qcow2 s;
	struct qcow2_l2e e;
	const char *why = NULL;
	uint64_t host;
	bool hv;
	/* subcluster 0 allocated, 1 zero, 2 neither, 31 allocated */
	uint64_t bitmap = 1ull | (1ull << 31) | (1ull << (32 + 1));

	geom(&s, 3, 16, true);
	ck_assert_uint_eq(s.l2_entries, 4096);
	ck_assert_uint_eq(s.subcluster_size, 2048);
	ck_assert_int_eq(qcow2_l2e_decode(&s, 0x50000, bitmap, &e, &why), 0);
	ck_assert_int_eq(e.type, QCOW2_C_NORMAL);
	ck_assert_int_eq(qcow2_l2e_unit_status(&s, &e, 0, &host, &hv),
			 IMG_DATA);
	ck_assert_uint_eq(host, 0x50000);
	ck_assert_int_eq(qcow2_l2e_unit_status(&s, &e, 1, &host, &hv),
			 IMG_ZERO);
	ck_assert(hv);
	ck_assert_uint_eq(host, 0x50000 + 2048);
	ck_assert_int_eq(qcow2_l2e_unit_status(&s, &e, 2, &host, &hv),
			 IMG_UNALLOC);
	ck_assert(!hv);
	ck_assert_int_eq(qcow2_l2e_unit_status(&s, &e, 31, &host, &hv),
			 IMG_DATA);
	ck_assert_uint_eq(host, 0x50000 + 31 * 2048);

	/* Unallocated cluster whose subclusters read as zero. */
	ck_assert_int_eq(
		qcow2_l2e_decode(&s, 0, 0xffffffff00000000ull, &e, &why), 0);
	ck_assert_int_eq(qcow2_l2e_unit_status(&s, &e, 5, &host, &hv),
			 IMG_ZERO);
	ck_assert(!hv);

	/* Invalid combinations. */
	ck_assert_int_eq(qcow2_l2e_decode(&s, 0, 1, &e, &why), -EINVAL);
	ck_assert_int_eq(
		qcow2_l2e_decode(&s, 0x50000, 1 | (1ull << 32), &e, &why),
		-EINVAL);
	ck_assert_int_eq(qcow2_l2e_decode(&s, QCOW2_OFLAG_COMPRESSED | 0x1000,
					  1, &e, &why),
			 -EINVAL);
	ck_assert_int_eq(qcow2_l2e_decode(&s, QCOW2_OFLAG_COMPRESSED | 0x1000,
					  0, &e, &why),
			 0);
	ck_assert_int_eq(e.type, QCOW2_C_COMPRESSED);
}
END_TEST

START_TEST(test_decode_compressed)
{
	unsigned cbs[] = {9, 12, 16, 21};
	unsigned i;

	for (i = 0; i < 4; i++) {
		struct qcow2 s;
		struct qcow2_l2e e;
		const char *why = NULL;
		unsigned cb = cbs[i];
		unsigned shift = 62 - (cb - 8);
		uint64_t max_sect = 1ull << (cb - 8);
		uint64_t coff = 0x123456789ull + 100; /* not sector aligned */
		uint64_t word;

		geom(&s, 3, cb, false);
		ck_assert_uint_eq(s.csize_shift, shift);
		/* 2 sectors stored as 1 additional (fits even for 512 B) */
		word = QCOW2_OFLAG_COMPRESSED | (1ull << shift) | coff;
		ck_assert_int_eq(qcow2_l2e_decode(&s, word, 0, &e, &why), 0);
		ck_assert_int_eq(e.type, QCOW2_C_COMPRESSED);
		ck_assert_uint_eq(e.coff, coff);
		ck_assert_uint_eq(e.csize, 2 * 512 - (coff & 511));
		/* The largest sector count: twice the cluster size. */
		word = QCOW2_OFLAG_COMPRESSED | ((max_sect - 1) << shift) |
		       1024;
		ck_assert_int_eq(qcow2_l2e_decode(&s, word, 0, &e, &why), 0);
		ck_assert_uint_eq(e.coff, 1024);
		ck_assert_uint_eq(e.csize, max_sect * 512);
		ck_assert_uint_eq(e.csize, 2 * s.cluster_size);
		/* The highest offset bit stays in the offset. */
		word = QCOW2_OFLAG_COMPRESSED | (1ull << (shift - 1));
		ck_assert_int_eq(qcow2_l2e_decode(&s, word, 0, &e, &why), 0);
		ck_assert_uint_eq(e.coff, 1ull << (shift - 1));
		ck_assert_uint_eq(e.csize, 512);
	}
}
END_TEST

/* ---- block_status on crafted images ---- */

START_TEST(test_status_standard)
{
	struct ib ib = build(3, 16, 4 << 20, 0);
	struct img *img;

	set_l2(&ib, 0, (5 * C64K) | QCOW2_OFLAG_COPIED, 0);
	set_l2(&ib, 1, (6 * C64K) | QCOW2_OFLAG_COPIED, 0);
	set_l2(&ib, 2, QCOW2_OFLAG_ZERO, 0);
	set_l2(&ib, 3, (7 * C64K) | QCOW2_OFLAG_ZERO, 0);
	set_l2(&ib, 4, QCOW2_OFLAG_COMPRESSED | (8 * C64K), 0);
	set_l2(&ib, 6, 9 * C64K, 0); /* not contiguous with anything */
	set_l2(&ib, 7, 11 * C64K, 0);
	ib_grow(&ib, 12 * C64K);
	img = open_ib(&ib);

	expect_ext(img, 0, img->size, IMG_DATA, 2 * C64K, true, 5 * C64K);
	expect_ext(img, 100, img->size - 100, IMG_DATA, 2 * C64K - 100, true,
		   5 * C64K + 100);
	expect_ext(img, 0, 1000, IMG_DATA, 1000, true, 5 * C64K);
	expect_ext(img, 2 * C64K, img->size, IMG_ZERO, C64K, false, 0);
	expect_ext(img, 3 * C64K, img->size, IMG_ZERO, C64K, true, 7 * C64K);
	expect_ext(img, 4 * C64K, img->size, IMG_COMPRESSED, C64K, false, 0);
	expect_ext(img, 4 * C64K + 512, 4096, IMG_COMPRESSED, 4096, false, 0);
	expect_ext(img, 5 * C64K, img->size, IMG_UNALLOC, C64K, false, 0);
	expect_ext(img, 6 * C64K, img->size, IMG_DATA, C64K, true, 9 * C64K);
	expect_ext(img, 7 * C64K, img->size - 7 * C64K, IMG_DATA, C64K, true,
		   11 * C64K);
	expect_ext(img, 8 * C64K, img->size - 8 * C64K, IMG_UNALLOC,
		   img->size - 8 * C64K, false, 0);
	close_img(img);
	free(ib.b);
}
END_TEST

START_TEST(test_status_v2)
{
	struct ib ib = build(2, 16, 1 << 20, 0);
	struct img *img;

	set_l2(&ib, 0, 5 * C64K, 0);
	ib_grow(&ib, 6 * C64K);
	img = open_ib(&ib);
	expect_ext(img, 0, img->size, IMG_DATA, C64K, true, 5 * C64K);
	close_img(img);

	set_l2(&ib, 1, QCOW2_OFLAG_ZERO, 0);
	expect_bs_error(&ib, C64K, "version 2");
}
END_TEST

START_TEST(test_status_extended)
{
	struct ib ib = build(3, 16, 4 << 20, QCOW2_INCOMPAT_EXTL2);
	struct img *img;
	const uint64_t sc = C64K / 32;
	/* cluster 0: subclusters 0-3 data, 4-5 zero, rest unallocated */
	uint64_t bm0 = 0xfull | (0x30ull << 32);

	/* cluster 1 all data, 2 zero without offset, 3 all data */
	set_l2(&ib, 0, 5 * C64K, bm0);
	set_l2(&ib, 1, 6 * C64K, 0xffffffffull);
	set_l2(&ib, 2, 0, 0xffffffff00000000ull);
	set_l2(&ib, 3, 7 * C64K, 0xffffffffull);
	ib_grow(&ib, 8 * C64K);
	img = open_ib(&ib);

	expect_ext(img, 0, img->size, IMG_DATA, 4 * sc, true, 5 * C64K);
	expect_ext(img, sc, img->size, IMG_DATA, 3 * sc, true, 5 * C64K + sc);
	expect_ext(img, 4 * sc, img->size, IMG_ZERO, 2 * sc, true,
		   5 * C64K + 4 * sc);
	expect_ext(img, 6 * sc, img->size, IMG_UNALLOC, 26 * sc, false, 0);
	/* clusters 1 and 3 are not contiguous: cluster 2 (zero) between */
	expect_ext(img, C64K, img->size, IMG_DATA, C64K, true, 6 * C64K);
	expect_ext(img, 2 * C64K, img->size, IMG_ZERO, C64K, false, 0);
	expect_ext(img, 3 * C64K + 10, img->size, IMG_DATA, C64K - 10, true,
		   7 * C64K + 10);
	expect_ext(img, 4 * C64K, img->size - 4 * C64K, IMG_UNALLOC,
		   img->size - 4 * C64K, false, 0);
	close_img(img);
	free(ib.b);
}
END_TEST

START_TEST(test_status_contiguous_slices)
{
	/* 512-byte clusters: 64 entries per L2 table and per slice. */
	struct ib ib = build(3, 9, 64 * 512 * 3, 0);
	struct img *img;
	unsigned i;

	/* L2 tables of L1 entries 0 and 1 at clusters 4 and 5, data from 8. */
	put64(&ib, 3 * 512 + 8, (5 * 512) | QCOW2_OFLAG_COPIED);
	for (i = 0; i < 128; i++)
		put64(&ib, 4 * 512 + i * 8, (8 + i) * 512);
	ib_grow(&ib, (8 + 128) * 512);
	img = open_ib(&ib);
	/* A run may cross L2 tables when the host offsets continue. */
	expect_ext(img, 0, img->size, IMG_DATA, 128 * 512, true, 8 * 512);
	expect_ext(img, 128 * 512, 64 * 512, IMG_UNALLOC, 64 * 512, false, 0);
	close_img(img);
	free(ib.b);
}
END_TEST

START_TEST(test_status_sparse_fast)
{
	/* 1 TiB overlay with nothing allocated: no L2 I/O at all. */
	struct ib ib = build(3, 16, 1ull << 40, 0);
	struct img *img;
	struct qcow2 *s;

	/* 2048 L1 entries fit into cluster 3; clear entry 0 too. */
	put64(&ib, 3 * C64K, 0);
	img = open_ib(&ib);
	s = img->priv;
	ck_assert_uint_eq(s->l1_size, 2048);
	expect_ext(img, 0, img->size, IMG_UNALLOC, 1ull << 40, false, 0);
	expect_ext(img, 12345, img->size - 12345, IMG_UNALLOC,
		   (1ull << 40) - 12345, false, 0);
	/* One answer for the whole span, and no L2 table read. */
	ck_assert_uint_eq(s->l2cache.misses, 0);
	close_img(img);
	free(ib.b);
}
END_TEST

/*
 * Metadata read-ahead (engine/meta_ahead.c over the driver's meta_want and
 * meta_fill): the L2 slices ahead of a position are read asynchronously and
 * installed, so block_status then finds them cached; cached slices are not
 * read again.
 */
START_TEST(test_meta_ahead)
{
	struct ib ib = build(3, 16, 4ull << 30, 0);
	struct meta_ahead *m = NULL;
	struct sio_queue *q;
	struct img *img;
	struct qcow2 *s;
	unsigned i;

	/* L2 tables for all 8 L1 entries (512 MiB each), clusters 4..11. */
	ib_grow(&ib, 12 * C64K);
	for (i = 1; i < 8; i++)
		put64(&ib, 3 * C64K + i * 8,
		      ((4 + i) * C64K) | QCOW2_OFLAG_COPIED);
	/* Read on a queue: a real file (a memory file cannot go on one). */
	img = open_ib_in(&ib, true);
	s = img->priv;
	ck_assert_int_eq(sio_queue_create(64, &q), 0);
	ck_assert_int_eq(meta_ahead_create(img, NULL, q, &m), 0);
	ck_assert_ptr_nonnull(m);

	/* From 1 GiB on: tables 2..7, two 32 KiB slices each. */
	meta_ahead_pump(m, 1ull << 30);
	ck_assert_uint_gt(meta_ahead_inflight(m), 0);
	while (meta_ahead_inflight(m)) {
		ck_assert_int_ge(sio_queue_run(q, 1), 0);
		meta_ahead_pump(m, 1ull << 30);
	}
	ck_assert_uint_eq(s->l2cache.inserts, 12);
	expect_ext(img, 1ull << 30, 3ull << 30, IMG_UNALLOC, 3ull << 30, false,
		   0);
	ck_assert_uint_eq(s->l2cache.misses, 0);

	/* Everything ahead is cached: nothing more to read. */
	meta_ahead_pump(m, 1ull << 30);
	ck_assert_uint_eq(meta_ahead_inflight(m), 0);
	ck_assert_uint_eq(s->l2cache.inserts, 12);

	meta_ahead_destroy(m);
	sio_queue_destroy(q);
	close_img(img);
	free(ib.b);
}
END_TEST

START_TEST(test_status_errors)
{
	struct ib ib;

	ib = build(3, 16, 1 << 20, 0);
	put64(&ib, 3 * C64K, (4 * C64K + 0x200) | QCOW2_OFLAG_COPIED);
	expect_bs_error(&ib, 0, "L2 table offset 0x40200 unaligned");

	ib = build(3, 16, 1 << 20, 0);
	put64(&ib, 3 * C64K, (100 * C64K) | QCOW2_OFLAG_COPIED);
	expect_bs_error(&ib, 0, "beyond the end");

	ib = build(3, 16, 1 << 20, 0);
	set_l2(&ib, 3, 100 * C64K, 0);
	expect_bs_error(&ib, 3 * C64K, "data cluster at 0x640000");

	ib = build(3, 16, 1 << 20, 0);
	set_l2(&ib, 2, QCOW2_OFLAG_COMPRESSED | (200 * C64K), 0);
	expect_bs_error(&ib, 2 * C64K, "compressed cluster");

	ib = build(3, 16, 1 << 20, 0);
	set_l2(&ib, 2, 5 * C64K + 4096, 0);
	expect_bs_error(&ib, 2 * C64K, "unaligned");

	/* A good prefix is reported; the error comes with the next call. */
	ib = build(3, 16, 1 << 20, 0);
	set_l2(&ib, 2, 100 * C64K, 0);
	{
		struct img *img = open_ib(&ib);

		expect_ext(img, 0, img->size, IMG_UNALLOC, 2 * C64K, false, 0);
		close_img(img);
	}
	expect_bs_error(&ib, 2 * C64K, "beyond the end");
}
END_TEST

START_TEST(test_read_compressed)
{
	struct ib ib = build(3, 16, 1 << 20, 0);
	uint8_t *plain = malloc(C64K), *out = malloc(C64K), *comp;
	uLongf clen = compressBound(C64K);
	uint64_t coff = 5 * C64K + 1000, nsect, i;
	struct img_extent e;
	struct img *img;
	z_stream z;

	for (i = 0; i < C64K; i++)
		plain[i] = (uint8_t)(i * 7 / 300);
	comp = malloc(clen);
	memset(&z, 0, sizeof(z));
	ck_assert_int_eq(
		deflateInit2(&z, 6, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY),
		Z_OK);
	z.next_in = plain;
	z.avail_in = C64K;
	z.next_out = comp;
	z.avail_out = clen;
	ck_assert_int_eq(deflate(&z, Z_FINISH), Z_STREAM_END);
	clen = z.total_out;
	deflateEnd(&z);

	/* Starts mid-sector: the sector count covers the whole span. */
	nsect = (coff % 512 + clen + 511) / 512;
	set_l2(&ib, 1,
	       QCOW2_OFLAG_COMPRESSED | ((nsect - 1) << (62 - 8)) | coff, 0);
	ib_grow(&ib, coff + clen); /* file ends inside the last sector */
	memcpy(ib.b + coff, comp, clen);
	img = open_ib(&ib);
	ck_assert_int_eq(img_block_status(img, C64K, C64K, &e), 0);
	ck_assert_int_eq(e.status, IMG_COMPRESSED);
	ck_assert_int_eq(img_read_compressed(img, C64K + 5, out), 0);
	ck_assert_mem_eq(out, plain, C64K);
	ck_assert_int_eq(img_read_compressed(img, 0, out), -EINVAL);
	close_img(img);

	/* Corrupt the stream. */
	memset(ib.b + coff, 0xff, 64);
	img = open_ib(&ib);
	sx_error_clear();
	ck_assert_int_eq(img_read_compressed(img, C64K, out), -EIO);
	ck_assert(strstr(sx_last_error(), "guest offset 0x10000"));
	close_img(img);
	free(ib.b);
	free(plain);
	free(out);
	free(comp);
}
END_TEST

START_TEST(test_external_data_file)
{
	struct ib ib = build(3, 16, 1 << 20, QCOW2_INCOMPAT_DATA_FILE);
	uint8_t *data = calloc(1, 1 << 20);
	struct img_extent e;
	struct img *img;
	char *dpath;

	/* data file name extension right after the 104-byte header */
	put32(&ib, 104, QCOW2_EXT_DATA_FILE);
	put32(&ib, 108, 8);
	put_bytes(&ib, 112, "data.raw", 8);
	put64(&ib, 88, QCOW2_AUTOCLEAR_DATA_FILE_RAW);
	set_l2(&ib, 0, 0 | QCOW2_OFLAG_COPIED, 0);
	set_l2(&ib, 1, C64K | QCOW2_OFLAG_COPIED, 0);
	set_l2(&ib, 2, 2 * C64K | QCOW2_OFLAG_COPIED, 0);
	set_l2(&ib, 3, 0, 0); /* offset 0 without COPIED: unallocated */
	dpath = write_file("data.raw", data, 1 << 20, false);
	img = open_ib(&ib);
	/* Offset 0 with COPIED is the data file's first cluster. */
	expect_ext(img, 0, img->size, IMG_DATA, 3 * C64K, true, 0);
	expect_ext(img, 3 * C64K, C64K, IMG_UNALLOC, C64K, false, 0);
	ck_assert_int_eq(img_block_status(img, C64K, img->size - C64K, &e), 0);
	ck_assert_int_eq(e.status, IMG_DATA);
	ck_assert_uint_eq(e.len, 2 * C64K);
	ck_assert_uint_eq(e.host_off, C64K);
	ck_assert_ptr_nonnull(e.file);
	ck_assert_ptr_ne(e.file, img->file);
	ck_assert(strstr(e.file->path, "data.raw"));
	close_img(img);

	/* A missing data file is refused with its name. */
	mem_drop(dpath);
	{
		char *path = write_file(NULL, ib.b, ib.len, false);

		ck_assert_int_lt(open_img(path, &img), 0);
		ck_assert(strstr(sx_last_error(), "data.raw"));
		close_img(img);
		free(path);
	}
	free(dpath);
	free(data);
	free(ib.b);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("qcow2_l2");
	TCase *tc = tcase_create("decode");
	TCase *ti = tcase_create("image");

	tcase_add_checked_fixture(ti, NULL, mem_clear);
	tcase_add_test(tc, test_decode_standard);
	tcase_add_test(tc, test_decode_extended);
	tcase_add_test(tc, test_decode_compressed);
	suite_add_tcase(s, tc);
	tcase_add_test(ti, test_status_standard);
	tcase_add_test(ti, test_status_v2);
	tcase_add_test(ti, test_status_extended);
	tcase_add_test(ti, test_status_contiguous_slices);
	tcase_add_test(ti, test_status_sparse_fast);
	tcase_add_test(ti, test_status_errors);
	tcase_add_test(ti, test_read_compressed);
	tcase_add_test(ti, test_external_data_file);
	suite_add_tcase(s, ti);
	/* The rest runs on memory files; a queue needs io_uring. */
	if (have_uring()) {
		TCase *tq = tcase_create("queue");

		tcase_add_test(tq, test_meta_ahead);
		suite_add_tcase(s, tq);
	} else {
		fprintf(stderr, "test_meta_ahead left out\n");
	}
	return s;
}

int main(void)
{
	return run_suite(suite(), tmpdir, 0);
}
