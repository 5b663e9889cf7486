/*
 * libFuzzer target: the qcow2 writer (issue 14). An input is the bytes of
 * a qcow2 image followed by WORKLOAD bytes that drive up to NR_OPS guest
 * operations (writes, write_zeroes, discards, flushes) at offsets spread
 * over its virtual size. The image goes into a memory file (io.h
 * sio_mem_create, no io_uring), is opened read-write as one layer without
 * its backing chain, takes the workload and is closed (which flushes);
 * then the bytes left are opened again read-only and read where the
 * workload wrote. Either the first open refuses the image, or the
 * operations succeed or fail with -errno, and nothing crashes, leaks or
 * hangs.
 *
 * The image is also checked (img_check) before and after: when the
 * input had no corruption and the writer accepted it, the image it leaves
 * must have none either, must open again, and must read back what the
 * workload wrote (a corrupt input may stay corrupt: two L2 entries sharing
 * a cluster are written through each other, as in qemu).
 *
 * Workload format, NR_OPS records of 4 bytes each:
 *   byte 0: bits 0-1 the op (write, write_zeroes, discard, flush); bit 2
 *           the length in units of 8 sectors; bit 3 write_zeroes with
 *           IMG_WZ_NO_FALLBACK; bits 4 and 5 both set: an unaligned
 *           offset (refused); bits 6 and 7 both set in the first
 *           record: the file takes fallocate (else it says EOPNOTSUPP,
 *           as some filesystems do)
 *   bytes 1-2: the offset, as a fraction of the virtual size (/65536)
 *   byte 3: the length, (n + 1) sectors of 512 bytes (or 8 sectors)
 *
 * Build: meson setup -Dfuzz=true (clang; see meson_options.txt), then
 *   build/fuzz/fuzz_qcow2_write -max_total_time=60 CORPUS_DIR
 * Seeds: fuzz/qcow2_seeds.py --workload CORPUS_DIR (qemu-img).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "formats/image.h"
#include "io/io.h"

#define PATH "/siphon-fuzz/qcow2-write.qcow2"
#define MAX_INPUT (1u << 20)
#define NR_OPS 8
#define WORKLOAD (NR_OPS * 4)
#define SECTOR 512u
#define MAX_LEN (256u * 8 * SECTOR) /* 1 MiB */

enum op_kind {
	OP_WRITE,
	OP_ZEROES,
	OP_DISCARD,
	OP_FLUSH,
};

struct op {
	enum op_kind kind;
	uint64_t off, len;
	unsigned wz_flags;
	int ret;
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The fraction v/65536 of size, without overflow, sector aligned. */
static uint64_t fraction(uint64_t size, unsigned v)
{
	uint64_t off = (size >> 16) * v + ((size & 0xffff) * v >> 16);

	return sx_align_down(off, SECTOR);
}

/* Decode the workload w (WORKLOAD bytes) for an image of size bytes. */
static unsigned decode(const uint8_t *w, uint64_t size, struct op *ops)
{
	unsigned i, n = 0;

	for (i = 0; i < NR_OPS; i++, w += 4) {
		struct op *o = &ops[n];

		o->kind = (enum op_kind)(w[0] & 3);
		o->off = fraction(size, (unsigned)w[1] << 8 | w[2]);
		o->len = ((uint64_t)w[3] + 1) * SECTOR * (w[0] & 4 ? 8 : 1);
		o->wz_flags = w[0] & 8 ? IMG_WZ_NO_FALLBACK : 0;
		if (o->off >= size)
			continue;
		o->len = sx_min(o->len, size - o->off);
		if ((w[0] & 0x30) == 0x30)
			o->off++;
		o->ret = 0;
		n++;
	}
	return n;
}

/* The byte op i writes: never 0, so zeros and data differ. */
static uint8_t pattern(unsigned i)
{
	return (uint8_t)(0x11 * (i + 1) | 1);
}

static void run(struct img *img, struct op *ops, unsigned n, uint8_t *buf)
{
	unsigned i;

	for (i = 0; i < n; i++) {
		struct op *o = &ops[i];

		/* As a guest does: the bitmap path runs on fuzzed images too. */
		if (o->kind != OP_FLUSH)
			img_mark_dirty(img, o->off, o->len);
		switch (o->kind) {
		case OP_WRITE:
			memset(buf, pattern(i), o->len);
			o->ret = img_pwrite(img, buf, o->len, o->off);
			break;
		case OP_ZEROES:
			o->ret = img_write_zeroes(img, o->off, o->len,
						  o->wz_flags);
			break;
		case OP_DISCARD:
			o->ret = img_discard(img, o->off, o->len);
			break;
		case OP_FLUSH:
			o->ret = img_flush(img);
			break;
		}
	}
}

/*
 * Corruptions img_check() finds in the image at PATH, or -errno. A COPIED
 * flag left clear at refcount 1 is not counted: an input may share a data
 * cluster between entries with consistent refcounts (a data cluster that
 * also holds compressed clusters: qemu-img check finds that clean), and
 * freeing the other references leaves the last one's flag clear, in qemu's
 * writer as in siphon's; it costs a copy at the next write, never data
 * (format.h, IMG_CK_COPIED_CLEAR).
 */
static long long corruptions(void)
{
	const struct img_check_opts o = {.repair = IMG_CHECK_NO_REPAIR};
	struct img_check_report r;
	int ret;

	ret = img_check(PATH, "qcow2", &o, &r);
	if (ret < 0)
		return ret;
	return (long long)(r.corruptions - r.kinds[IMG_CK_COPIED_CLEAR]);
}

static void fail(const char *what, uint64_t a, long long b)
{
	fprintf(stderr, "fuzz_qcow2_write: %s (%llu, %lld)\n", what,
		(unsigned long long)a, b);
	abort();
}

/*
 * What a sector at off must read after the workload: 1 and *byte when
 * some op that succeeded decides it (a later discard, a failed op or an
 * unaligned one leaves it undecided: 0).
 */
static int expected(const struct op *ops, unsigned n, uint64_t off,
		    uint8_t *byte)
{
	unsigned i = n;

	while (i--) {
		const struct op *o = &ops[i];

		if (o->kind == OP_FLUSH || off + SECTOR <= o->off ||
		    off >= o->off + o->len)
			continue;
		if (o->ret < 0 || o->kind == OP_DISCARD || o->off % SECTOR != 0)
			return 0;
		*byte = o->kind == OP_WRITE ? pattern(i) : 0;
		return 1;
	}
	return 0;
}

/* Reopen the image the workload left and read back what it wrote. */
static void verify(const struct op *ops, unsigned n, uint8_t *buf)
{
	struct img *img = NULL;
	uint64_t s, j;
	unsigned i;
	uint8_t byte;
	int ret;

	ret = img_open_layer(PATH, "qcow2", 0, &img);
	if (ret < 0)
		fail("the image written does not open again", 0, ret);
	for (i = 0; i < n; i++) {
		if (ops[i].kind == OP_FLUSH || ops[i].ret < 0)
			continue;
		for (s = sx_align_down(ops[i].off, SECTOR);
		     s < ops[i].off + ops[i].len; s += SECTOR) {
			if (!expected(ops, n, s, &byte) ||
			    s + SECTOR > img->size)
				continue;
			ret = img_pread(img, buf, SECTOR, s);
			if (ret < 0)
				fail("read back failed", s, ret);
			for (j = 0; j < SECTOR; j++)
				if (buf[j] != byte)
					fail("read back differs", s + j,
					     buf[j]);
		}
	}
	img_close(img);
}

/* The image a clean input left: no corruption, and what was written. */
static void check_after(const struct op *ops, unsigned n, uint8_t *buf)
{
	long long c = corruptions();

	if (c != 0)
		fail("the writer left corruptions", n, c);
	verify(ops, n, buf);
}

/* Whatever a doubtful input left must still be safe to open and read. */
static void read_left(const struct op *ops, unsigned n, uint8_t *buf)
{
	struct img *img = NULL;
	unsigned i;

	if (img_open_layer(PATH, "qcow2", 0, &img) < 0)
		goto out;
	for (i = 0; i < n; i++)
		if (ops[i].off < img->size)
			img_pread(img, buf,
				  sx_min(ops[i].len, img->size - ops[i].off),
				  ops[i].off);
out:
	img_close(img);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct op ops[NR_OPS];
	struct img *img = NULL;
	struct sio_mem *m = NULL;
	uint8_t *buf = NULL;
	unsigned n = 0;
	bool clean = false;

	if (size > MAX_INPUT + WORKLOAD)
		size = MAX_INPUT + WORKLOAD;
	if (size < WORKLOAD)
		return 0;
	if (sio_mem_create(PATH, data, size - WORKLOAD, &m) < 0)
		abort();
	/*
	 * The writer grows its file 8 MiB ahead with fallocate, which on a
	 * memory file fills pages: ten times slower per input. Without
	 * fallocate it only truncates (the same paths, the fallback's).
	 */
	if ((data[size - WORKLOAD] & 0xc0) != 0xc0 &&
	    sio_mem_fail(m, SIO_OP_FALLOCATE, 0, 0, EOPNOTSUPP) < 0)
		abort();
	clean = corruptions() == 0;
	if (img_open_layer(PATH, "qcow2", IMG_OPEN_RDWR, &img) < 0)
		goto out;
	buf = malloc(MAX_LEN);
	if (!buf)
		abort();
	n = decode(data + size - WORKLOAD, img->size, ops);
	run(img, ops, n, buf);
	img_flush(img);
	img_close(img);
	img = NULL;
	if (clean)
		check_after(ops, n, buf);
	else
		read_left(ops, n, buf);
out:
	img_close(img);
	free(buf);
	sio_mem_destroy(m);
	return 0;
}
