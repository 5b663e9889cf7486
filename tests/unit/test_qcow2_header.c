/*
 * qcow2 header parsing: valid v2/v3 headers, extensions kept in order, and
 * the refusal of every malformed or unsupported header field. Images are
 * built byte by byte in memory files (memfile.h) and opened through the
 * facade's single-layer entry (img_open_layer); no qemu and no io_uring
 * needed.
 */
#define _GNU_SOURCE
#include <check.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"
#include "memfile.h"
#include "common/error.h"
#include "formats/image.h"
#include "formats/qcow2/qcow2.h"
#include "io/io.h"

static char tmpdir[] = "/tmp/siphon-q2h-XXXXXX";
static int img_seq;

/* ---- image builder ---- */

struct ib {
	uint8_t *b;
	size_t len;
	size_t cs; /* cluster size */
	size_t ext_off; /* where the next header extension goes */
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

/*
 * A valid image: cluster 0 header, 1 refcount table, 2 refcount block,
 * 3 L1 table, 4 L2 table (v3 header_length 112 unless version 2).
 */
static struct ib build(unsigned version, unsigned cb, uint64_t size)
{
	struct ib ib = {0};
	uint64_t cs = 1ull << cb;
	uint64_t per_l1 = cs * (cs / 8);
	uint32_t l1_size = (uint32_t)((size + per_l1 - 1) / per_l1);
	unsigned i;

	ib.cs = cs;
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
		put32(&ib, 96, 4);
		put32(&ib, 100, 112);
		ib.ext_off = 112;
	} else {
		ib.ext_off = 72;
	}
	put64(&ib, cs, 2 * cs);
	for (i = 0; i < 5; i++) {
		uint16_t one = htobe16(1);

		memcpy(ib.b + 2 * cs + 2 * i, &one, 2);
	}
	if (l1_size)
		put64(&ib, 3 * cs, (4 * cs) | QCOW2_OFLAG_COPIED);
	return ib;
}

static void add_ext(struct ib *ib, uint32_t magic, const void *data,
		    uint32_t len)
{
	put32(ib, ib->ext_off, magic);
	put32(ib, ib->ext_off + 4, len);
	memcpy(ib->b + ib->ext_off + 8, data, len);
	ib->ext_off += 8 + ((len + 7) & ~7u);
	put32(ib, ib->ext_off, 0);
	put32(ib, ib->ext_off + 4, 0);
}

static void set_backing(struct ib *ib, const char *name, size_t len)
{
	size_t off = ib->cs - 2048;

	put64(ib, 8, off);
	put32(ib, 16, (uint32_t)len);
	memcpy(ib->b + off, name, len);
}

static void add_feature(uint8_t *tab, int i, uint8_t type, uint8_t bit,
			const char *name)
{
	memset(tab + i * 48, 0, 48);
	tab[i * 48] = type;
	tab[i * 48 + 1] = bit;
	memcpy(tab + i * 48 + 2, name, strlen(name));
}

/* The first len bytes of the image, as a memory file; its path. */
static char *write_img(const struct ib *ib, size_t len)
{
	char *path;

	ck_assert_int_gt(asprintf(&path, "%s/img%d.qcow2", tmpdir, img_seq++),
			 0);
	mem_put(path, ib->b, len);
	return path;
}

/*
 * Open one qcow2 layer (no chain), as the chain layer would. A layer the
 * driver refused comes back too, as the driver left it.
 */
static int open_img(const char *path, bool writable, struct img **out)
{
	int ret;

	sx_error_clear();
	ret = img_open_layer(path, "qcow2", writable ? IMG_OPEN_RDWR : 0, out);
	ck_assert_msg(*out != NULL, "%s: not opened at all: %d %s", path, ret,
		      sx_last_error());
	return ret;
}

static void close_img(struct img *img)
{
	img_close(img);
}

/* Open an image that must be refused with err and a message with `want`. */
static void expect_refused(struct ib *ib, size_t len, bool writable, int err,
			   const char *want)
{
	char *path = write_img(ib, len ? len : ib->len);
	struct img *img;
	int ret = open_img(path, writable, &img);

	ck_assert_msg(ret == err, "%s: got %d (%s), want %d", path, ret,
		      sx_last_error(), err);
	if (want)
		ck_assert_msg(strstr(sx_last_error(), want),
			      "message '%s' lacks '%s'", sx_last_error(), want);
	ck_assert_ptr_null(img->backing_name);
	close_img(img);
	free(path);
	free(ib->b);
}

/* ---- tests ---- */

START_TEST(test_probe)
{
	const uint8_t good[] = {'Q', 'F', 'I', 0xfb, 0, 0, 0, 3};
	const uint8_t bad[] = {'Q', 'F', 'I', 0xfa};

	ck_assert_int_eq(img_driver_qcow2.probe(good, sizeof(good)), 100);
	ck_assert_int_eq(img_driver_qcow2.probe(bad, sizeof(bad)), 0);
	ck_assert_int_eq(img_driver_qcow2.probe(good, 3), 0);
}
END_TEST

START_TEST(test_valid_v2)
{
	struct ib ib = build(2, 16, 10 << 20);
	struct img *img;
	struct qcow2 *s;
	char *path;

	set_backing(&ib, "base.raw", 8);
	path = write_img(&ib, ib.len);
	ck_assert_int_eq(open_img(path, false, &img), 0);
	s = img->priv;
	ck_assert_uint_eq(img->size, 10 << 20);
	ck_assert_uint_eq(img->cluster_size, 65536);
	ck_assert_str_eq(img->backing_name, "base.raw");
	ck_assert_ptr_null(img->backing_fmt);
	ck_assert_uint_eq(s->hdr.version, 2);
	ck_assert_uint_eq(s->hdr.refcount_order, 4);
	ck_assert_uint_eq(s->hdr.header_length, 72);
	ck_assert_uint_eq(s->n_exts, 0);
	ck_assert(!s->extended_l2);
	ck_assert_uint_eq(s->l1_size, 1);
	ck_assert_uint_eq(s->l1[0], (4 * 65536) | QCOW2_OFLAG_COPIED);
	close_img(img);
	free(path);
	free(ib.b);
}
END_TEST

START_TEST(test_valid_v3_extensions)
{
	struct ib ib = build(3, 16, 1 << 30);
	static const uint8_t unknown[] = {1, 2, 3, 4, 5};
	uint8_t tab[3 * 48];
	struct img_info_item items[64];
	struct img *img;
	struct qcow2 *s;
	char *path;
	int n, i;
	bool seen = false;

	add_ext(&ib, QCOW2_EXT_BACKING_FMT, "qcow2", 5);
	add_feature(tab, 0, 0, 0, "dirty bit");
	add_feature(tab, 1, 0, 4, "extended L2 entries");
	add_feature(tab, 2, 1, 0, "lazy refcounts");
	add_ext(&ib, QCOW2_EXT_FEATURE_TABLE, tab, sizeof(tab));
	add_ext(&ib, 0x12345678, unknown, sizeof(unknown));
	set_backing(&ib, "dir/base image.qcow2", 20);
	put64(&ib, 80, QCOW2_COMPAT_LAZY_REFCOUNTS);
	put64(&ib, 72, QCOW2_INCOMPAT_DIRTY);
	path = write_img(&ib, ib.len);
	ck_assert_int_eq(open_img(path, false, &img), 0);
	s = img->priv;
	ck_assert_uint_eq(img->size, 1 << 30);
	ck_assert_str_eq(img->backing_name, "dir/base image.qcow2");
	ck_assert_str_eq(img->backing_fmt, "qcow2");
	ck_assert(s->dirty);
	ck_assert_uint_eq(s->l1_size, 2);
	/* Extensions kept in file order, the unknown one verbatim. */
	ck_assert_uint_eq(s->n_exts, 3);
	ck_assert_uint_eq(s->exts[0].magic, QCOW2_EXT_BACKING_FMT);
	ck_assert_uint_eq(s->exts[1].magic, QCOW2_EXT_FEATURE_TABLE);
	ck_assert_uint_eq(s->exts[2].magic, 0x12345678);
	ck_assert_uint_eq(s->exts[2].len, 5);
	ck_assert_mem_eq(s->exts[2].data, unknown, 5);
	ck_assert_uint_eq(s->n_features, 3);
	ck_assert_str_eq(qcow2_feature_name(s, 0, 4), "extended L2 entries");
	ck_assert_ptr_null(qcow2_feature_name(s, 2, 4));
	ck_assert_mem_eq(s->hdr_raw, ib.b, 112);

	n = img_get_info(img, items, 64);
	ck_assert_int_gt(n, 10);
	for (i = 0; i < n; i++) {
		if (!strcmp(items[i].key, "compat"))
			ck_assert_str_eq(items[i].value, "1.1");
		if (!strcmp(items[i].key, "lazy_refcounts"))
			ck_assert_str_eq(items[i].value, "true");
		if (!strcmp(items[i].key, "incompatible_features"))
			ck_assert_str_eq(items[i].value, "0 (dirty bit)");
		if (!strcmp(items[i].key, "unknown_extension")) {
			ck_assert(strstr(items[i].value, "0x12345678"));
			seen = true;
		}
	}
	ck_assert(seen);
	ck_assert_int_eq(img_get_info(img, items, 2), 2);
	close_img(img);
	free(path);
	free(ib.b);
}
END_TEST

START_TEST(test_zstd_ok)
{
	struct ib ib = build(3, 16, 1 << 20);
	struct img *img;
	char *path;

	ib.b[104] = QCOW2_COMPRESSION_ZSTD;
	put64(&ib, 72, QCOW2_INCOMPAT_COMPRESSION);
	path = write_img(&ib, ib.len);
	ck_assert_int_eq(open_img(path, false, &img), 0);
	ck_assert_uint_eq(((struct qcow2 *)img->priv)->hdr.compression_type, 1);
	close_img(img);
	free(path);
	free(ib.b);
}
END_TEST

START_TEST(test_bad_magic)
{
	struct ib ib = build(3, 16, 1 << 20);

	ib.b[3] = 0xfa;
	expect_refused(&ib, 0, false, -EINVAL, "magic");
}
END_TEST

START_TEST(test_truncated)
{
	struct ib ib = build(3, 16, 1 << 20);

	expect_refused(&ib, 60, false, -EINVAL, "truncated");
	ib = build(3, 16, 1 << 20);
	expect_refused(&ib, 90, false, -EINVAL, "truncated");
}
END_TEST

START_TEST(test_header_length)
{
	struct ib ib = build(3, 16, 1 << 20);

	put32(&ib, 100, 100);
	expect_refused(&ib, 0, false, -EINVAL, "header_length");
	ib = build(3, 16, 1 << 20);
	put32(&ib, 100, 116);
	expect_refused(&ib, 0, false, -EINVAL, "header_length");
}
END_TEST

START_TEST(test_versions)
{
	struct ib ib = build(3, 16, 1 << 20);

	put32(&ib, 4, 1);
	expect_refused(&ib, 0, false, -ENOTSUP, "version 1");
	ib = build(3, 16, 1 << 20);
	put32(&ib, 4, 4);
	expect_refused(&ib, 0, false, -ENOTSUP, "version 4");
}
END_TEST

START_TEST(test_cluster_bits)
{
	struct ib ib = build(3, 16, 1 << 20);

	put32(&ib, 20, 8);
	expect_refused(&ib, 0, false, -EINVAL, "cluster_bits 8");
	ib = build(3, 16, 1 << 20);
	put32(&ib, 20, 22);
	expect_refused(&ib, 0, false, -EINVAL, "cluster_bits 22");
}
END_TEST

START_TEST(test_cluster_bits_limits_ok)
{
	unsigned cbs[] = {9, 21};
	unsigned i;

	for (i = 0; i < 2; i++) {
		struct ib ib = build(3, cbs[i], 1 << 20);
		struct img *img;
		char *path = write_img(&ib, ib.len);

		ck_assert_msg(open_img(path, false, &img) == 0, "%s",
			      sx_last_error());
		ck_assert_uint_eq(img->cluster_size, 1u << cbs[i]);
		close_img(img);
		free(path);
		free(ib.b);
	}
}
END_TEST

START_TEST(test_unknown_incompat)
{
	struct ib ib = build(3, 16, 1 << 20);
	uint8_t tab[2 * 48];

	add_feature(tab, 0, 0, 0, "dirty bit");
	add_feature(tab, 1, 0, 7, "frobnicated clusters");
	add_ext(&ib, QCOW2_EXT_FEATURE_TABLE, tab, sizeof(tab));
	put64(&ib, 72, 1ull << 7);
	expect_refused(&ib, 0, false, -ENOTSUP, "bit 7 (frobnicated clusters)");

	/* Without a name in the table the bit number still shows. */
	ib = build(3, 16, 1 << 20);
	put64(&ib, 72, 1ull << 40);
	expect_refused(&ib, 0, false, -ENOTSUP, "bit 40");
}
END_TEST

START_TEST(test_crypt)
{
	struct ib ib = build(3, 16, 1 << 20);

	put32(&ib, 32, 2);
	expect_refused(&ib, 0, false, -ENOTSUP,
		       "encrypted images are not supported");
}
END_TEST

START_TEST(test_l1_too_large)
{
	struct ib ib = build(3, 16, 1 << 20);

	put32(&ib, 36, 0x10000000);
	expect_refused(&ib, 0, false, -EINVAL, "L1 table too large");
}
END_TEST

START_TEST(test_l1_too_small)
{
	struct ib ib = build(3, 16, 1 << 20);

	/* 1 TiB needs 2048 L1 entries with 64 KiB clusters. */
	put64(&ib, 24, 1ull << 40);
	expect_refused(&ib, 0, false, -EINVAL, "too small");
}
END_TEST

START_TEST(test_l1_beyond_eof)
{
	struct ib ib = build(3, 16, 1 << 20);

	put64(&ib, 40, 100 * 65536);
	expect_refused(&ib, 0, false, -EINVAL, "beyond the end");
	ib = build(3, 16, 1 << 20);
	put64(&ib, 40, 3 * 65536 + 8);
	expect_refused(&ib, 0, false, -EINVAL, "unaligned");
}
END_TEST

START_TEST(test_refcount_table)
{
	struct ib ib = build(3, 16, 1 << 20);

	put64(&ib, 48, 50 * 65536);
	expect_refused(&ib, 0, false, -EINVAL, "refcount table");
	ib = build(3, 16, 1 << 20);
	put64(&ib, 48, 65536 + 512);
	expect_refused(&ib, 0, false, -EINVAL, "unaligned");
	ib = build(3, 16, 1 << 20);
	put32(&ib, 96, 7);
	expect_refused(&ib, 0, false, -EINVAL, "refcount_order 7");
}
END_TEST

START_TEST(test_backing_name_too_long)
{
	struct ib ib = build(3, 16, 1 << 20);
	char name[1024];

	memset(name, 'a', sizeof(name));
	set_backing(&ib, name, sizeof(name));
	expect_refused(&ib, 0, false, -EINVAL, "too long");
	/* Past cluster 0. */
	ib = build(3, 16, 1 << 20);
	set_backing(&ib, "x", 1);
	put64(&ib, 8, 65536 - 4);
	put32(&ib, 16, 10);
	expect_refused(&ib, 0, false, -EINVAL, "first cluster");
}
END_TEST

START_TEST(test_zstd_without_bit)
{
	struct ib ib = build(3, 16, 1 << 20);

	ib.b[104] = QCOW2_COMPRESSION_ZSTD;
	expect_refused(&ib, 0, false, -EINVAL, "bit 3");
	ib = build(3, 16, 1 << 20);
	put64(&ib, 72, QCOW2_INCOMPAT_COMPRESSION);
	expect_refused(&ib, 0, false, -EINVAL, "bit 3");
	ib = build(3, 16, 1 << 20);
	ib.b[104] = 9;
	put64(&ib, 72, QCOW2_INCOMPAT_COMPRESSION);
	expect_refused(&ib, 0, false, -ENOTSUP, "compression type 9");
}
END_TEST

START_TEST(test_corrupt_bit)
{
	struct ib ib = build(3, 16, 1 << 20);
	struct img *img;
	char *path;

	put64(&ib, 72, QCOW2_INCOMPAT_CORRUPT);
	path = write_img(&ib, ib.len);
	ck_assert_int_eq(open_img(path, false, &img), 0);
	ck_assert(((struct qcow2 *)img->priv)->corrupt);
	close_img(img);
	ck_assert_int_eq(open_img(path, true, &img), -EROFS);
	ck_assert(strstr(sx_last_error(), "corrupt"));
	close_img(img);
	free(path);
	free(ib.b);
}
END_TEST

START_TEST(test_bad_extensions)
{
	struct ib ib = build(3, 16, 1 << 20);

	/* An extension whose length runs out of cluster 0. */
	put32(&ib, 112, 0x11111111);
	put32(&ib, 116, 70000);
	expect_refused(&ib, 0, false, -EINVAL, "extension");

	ib = build(3, 16, 1 << 20);
	put64(&ib, 72, QCOW2_INCOMPAT_DATA_FILE);
	expect_refused(&ib, 0, false, -EINVAL, "data file");

	ib = build(3, 16, 1 << 20);
	put64(&ib, 72, QCOW2_INCOMPAT_EXTL2);
	put32(&ib, 20, 12);
	expect_refused(&ib, 0, false, -EINVAL, "extended L2");
}
END_TEST

START_TEST(test_refcounts)
{
	static const uint64_t vals[7] = {
		1, 3, 9, 200, 60000, 4000000000ull, 0x0123456789abcdefull};
	uint8_t block[64];
	unsigned order, i;
	struct ib ib = build(3, 16, 1 << 20);
	struct img *img;
	uint64_t rc;
	char *path;

	/* Every width round-trips and leaves its neighbours alone. */
	for (order = 0; order <= 6; order++) {
		uint64_t max =
			order == 6 ? UINT64_MAX : (1ull << (1u << order)) - 1;

		memset(block, 0, sizeof(block));
		for (i = 0; i < 4; i++)
			qcow2_refcount_entry_set(block, order, i,
						 vals[order] + i);
		for (i = 0; i < 4; i++)
			ck_assert_uint_eq(
				qcow2_refcount_entry_get(block, order, i),
				(vals[order] + i) & max);
	}
	/* Narrow entries are packed LSB first; wide ones big-endian. */
	memset(block, 0, sizeof(block));
	qcow2_refcount_entry_set(block, 0, 1, 1);
	ck_assert_uint_eq(block[0], 2);
	qcow2_refcount_entry_set(block, 4, 1, 0x0102);
	ck_assert_uint_eq(block[2], 1);
	ck_assert_uint_eq(block[3], 2);

	/* The builder gives clusters 0..4 refcount 1. */
	path = write_img(&ib, ib.len);
	ck_assert_int_eq(open_img(path, false, &img), 0);
	ck_assert_int_eq(qcow2_refcount_get(img, img->priv, 4, &rc), 0);
	ck_assert_uint_eq(rc, 1);
	ck_assert_int_eq(qcow2_refcount_get(img, img->priv, 5, &rc), 0);
	ck_assert_uint_eq(rc, 0);
	ck_assert_int_eq(qcow2_refcount_get(img, img->priv, 1ull << 40, &rc),
			 0);
	ck_assert_uint_eq(rc, 0);
	close_img(img);
	free(path);
	free(ib.b);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("qcow2_header");
	TCase *tc = tcase_create("header");

	tcase_add_checked_fixture(tc, NULL, mem_clear);
	tcase_add_test(tc, test_probe);
	tcase_add_test(tc, test_valid_v2);
	tcase_add_test(tc, test_valid_v3_extensions);
	tcase_add_test(tc, test_zstd_ok);
	tcase_add_test(tc, test_bad_magic);
	tcase_add_test(tc, test_truncated);
	tcase_add_test(tc, test_header_length);
	tcase_add_test(tc, test_versions);
	tcase_add_test(tc, test_cluster_bits);
	tcase_add_test(tc, test_cluster_bits_limits_ok);
	tcase_add_test(tc, test_unknown_incompat);
	tcase_add_test(tc, test_crypt);
	tcase_add_test(tc, test_l1_too_large);
	tcase_add_test(tc, test_l1_too_small);
	tcase_add_test(tc, test_l1_beyond_eof);
	tcase_add_test(tc, test_refcount_table);
	tcase_add_test(tc, test_backing_name_too_long);
	tcase_add_test(tc, test_zstd_without_bit);
	tcase_add_test(tc, test_corrupt_bit);
	tcase_add_test(tc, test_bad_extensions);
	tcase_add_test(tc, test_refcounts);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	/* Memory files only: runs where io_uring is refused too. */
	return run_suite(suite(), tmpdir, 0);
}
