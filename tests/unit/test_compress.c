/*
 * Inflating one compressed cluster: zlib raw deflate (window bits -12, as
 * qemu writes it) and zstd, with sector padding after the data, for several
 * cluster sizes; corrupt input and input that inflates to less than a
 * cluster are errors.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "testutil.h"
#include "formats/qcow2/qcow2.h"

static uint8_t *pattern(size_t len)
{
	uint8_t *p = malloc(len);
	size_t i;

	ck_assert_ptr_nonnull(p);
	for (i = 0; i < len; i++)
		p[i] = (uint8_t)((i * 31) / 97 + (i >> 12));
	return p;
}

/* Raw deflate of src, followed by zero padding up to the next sector. */
static uint8_t *deflate_raw(const uint8_t *src, size_t len, size_t *out_len)
{
	size_t cap = compressBound(len) + 1024;
	uint8_t *out = calloc(1, cap);
	z_stream z;

	memset(&z, 0, sizeof(z));
	ck_assert_int_eq(
		deflateInit2(&z, 6, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY),
		Z_OK);
	z.next_in = (Bytef *)src;
	z.avail_in = len;
	z.next_out = out;
	z.avail_out = cap;
	ck_assert_int_eq(deflate(&z, Z_FINISH), Z_STREAM_END);
	*out_len = (z.total_out + 511) / 512 * 512;
	deflateEnd(&z);
	return out;
}

static uint8_t *zstd_frames(const uint8_t *src, size_t len, int frames,
			    size_t *out_len)
{
	size_t cap = ZSTD_compressBound(len) * 2 + 1024, used = 0;
	uint8_t *out = calloc(1, cap);
	int i;

	for (i = 0; i < frames; i++) {
		size_t part = len / frames;
		size_t r = ZSTD_compress(out + used, cap - used, src + i * part,
					 part, 3);

		ck_assert(!ZSTD_isError(r));
		used += r;
	}
	*out_len = (used + 511) / 512 * 512;
	return out;
}

START_TEST(test_zlib_clusters)
{
	size_t sizes[] = {512, 4096, 65536, 2u << 20};
	unsigned i;

	for (i = 0; i < 4; i++) {
		size_t cs = sizes[i], clen;
		uint8_t *plain = pattern(cs), *out = malloc(cs);
		uint8_t *comp = deflate_raw(plain, cs, &clen);
		const char *why = NULL;

		ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZLIB, comp,
						  clen, out, cs, &why),
				 0);
		ck_assert_mem_eq(out, plain, cs);
		free(plain);
		free(out);
		free(comp);
	}
}
END_TEST

START_TEST(test_zlib_errors)
{
	size_t cs = 65536, clen;
	uint8_t *plain = pattern(cs), *out = malloc(cs);
	uint8_t *comp = deflate_raw(plain, cs / 2, &clen);
	const char *why = NULL;

	/* Inflates to half a cluster only. */
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZLIB, comp, clen,
					  out, cs, &why),
			 -EIO);
	ck_assert(strstr(why, "less than"));
	free(comp);

	/* Truncated input. */
	comp = deflate_raw(plain, cs, &clen);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZLIB, comp, 10, out,
					  cs, &why),
			 -EIO);
	/* Garbage (block type 3 is invalid). */
	memset(comp, 0xff, 16);
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZLIB, comp, clen,
					  out, cs, &why),
			 -EIO);
	ck_assert(strstr(why, "corrupt"));
	free(plain);
	free(out);
	free(comp);
}
END_TEST

START_TEST(test_zstd_clusters)
{
	size_t sizes[] = {512, 65536, 2u << 20};
	unsigned i;
	int frames;

	for (i = 0; i < 3; i++) {
		for (frames = 1; frames <= 2; frames++) {
			size_t cs = sizes[i], clen;
			uint8_t *plain = pattern(cs), *out = malloc(cs);
			uint8_t *comp = zstd_frames(plain, cs, frames, &clen);
			const char *why = NULL;

			ck_assert_int_eq(
				qcow2_decompress(QCOW2_COMPRESSION_ZSTD, comp,
						 clen, out, cs, &why),
				0);
			ck_assert_mem_eq(out, plain, cs);
			free(plain);
			free(out);
			free(comp);
		}
	}
}
END_TEST

START_TEST(test_zstd_errors)
{
	size_t cs = 65536, clen;
	uint8_t *plain = pattern(cs), *out = malloc(cs);
	uint8_t *comp = zstd_frames(plain, cs / 2, 1, &clen);
	const char *why = NULL;

	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, comp, clen,
					  out, cs, &why),
			 -EIO);
	free(comp);
	comp = zstd_frames(plain, cs, 1, &clen);
	memset(comp, 0x5a, 8); /* break the frame magic */
	ck_assert_int_eq(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, comp, clen,
					  out, cs, &why),
			 -EIO);
	ck_assert(strstr(why, "corrupt"));
	ck_assert_int_eq(qcow2_decompress(7, comp, clen, out, cs, &why),
			 -ENOTSUP);
	free(plain);
	free(out);
	free(comp);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("compress");
	TCase *tc = tcase_create("compress");

	tcase_add_test(tc, test_zlib_clusters);
	tcase_add_test(tc, test_zlib_errors);
	tcase_add_test(tc, test_zstd_clusters);
	tcase_add_test(tc, test_zstd_errors);
	suite_add_tcase(s, tc);
	return run_suite(s, NULL, 0);
}
