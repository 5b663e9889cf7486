/*
 * libFuzzer target: the qcow2 reader (issue 14). Each input is the bytes of
 * one qcow2 image, put in a memory file (io.h sio_mem_create, no io_uring)
 * and opened read-only as one layer, without its backing chain. Then what
 * a reader does: the probe, the backing name as the chain would take it
 * when it names an NBD export (parsed, never connected to: the chain is
 * not opened), the info lines, block status from the start (a bounded
 * number of extents) and at points spread over the virtual size, the
 * metadata read-ahead (meta_want, meta_fill, nowait status), reads of a few
 * bounded ranges, and a decompression of the compressed clusters met.
 * Then the consistency check, in one pass and in the smallest windows
 * (the two must agree), and its repairs.
 * Any return value is fine; a crash, a leak, undefined behaviour, a hang
 * or an extent that breaks block_status's contract (format.h) is a bug.
 *
 * The work per input is bounded whatever the header claims (a virtual size
 * of 1 EiB, 2 MiB clusters): at most MAX_STEPS extents, MAX_READS reads of
 * at most READ_LEN bytes, MAX_COMPRESSED decompressions.
 *
 * Build: meson setup -Dfuzz=true (clang; see meson_options.txt), then
 *   build/fuzz/fuzz_qcow2_read -max_total_time=60 CORPUS_DIR
 * Seeds: fuzz/qcow2_seeds.py CORPUS_DIR (qemu-img).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "formats/image.h"
#include "io/io.h"
#include "io/nbd_name.h"

#define PATH "/siphon-fuzz/qcow2-read.qcow2"
#define MAX_INPUT (1u << 20)
#define MAX_STEPS 256
#define SPREAD 16
#define MAX_READS 8
#define READ_LEN (16u * 1024)
#define MAX_COMPRESSED 8
#define MAX_META 8
#define META_LEN (4u << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A broken contract of the facade: abort, so libFuzzer keeps the input. */
static void contract(const char *what, uint64_t off)
{
	fprintf(stderr, "fuzz_qcow2_read: %s at %llu\n", what,
		(unsigned long long)off);
	abort();
}

/* Decompress the cluster at guest offset off, once per cluster. */
static void read_compressed(struct img *img, uint64_t off, unsigned *left)
{
	void *buf;

	if (!*left || !img->cluster_size)
		return;
	(*left)--;
	buf = malloc(img->cluster_size);
	if (!buf)
		abort();
	img_read_compressed(img, off, buf);
	free(buf);
}

/* One extent at off: its contract checked, compressed clusters read. */
static int status_at(struct img *img, uint64_t off, unsigned *compressed,
		     uint64_t *len)
{
	struct img_extent e;
	int ret;

	ret = img_block_status(img, off, img->size - off, &e);
	if (ret < 0)
		return ret;
	if (e.len == 0 || e.len > img->size - off)
		contract("extent length out of range", off);
	if (e.status > IMG_COMPRESSED)
		contract("unknown status", off);
	if (e.status == IMG_DATA && !e.file)
		contract("data without a file", off);
	if (e.status == IMG_COMPRESSED)
		read_compressed(img, off, compressed);
	*len = e.len;
	return 0;
}

/* Status from 0 for MAX_STEPS extents, then at SPREAD points. */
static void walk_status(struct img *img, unsigned *compressed)
{
	uint64_t off = 0, len;
	unsigned i;

	for (i = 0; i < MAX_STEPS && off < img->size; i++) {
		if (status_at(img, off, compressed, &len) < 0)
			break;
		off += len;
	}
	for (i = 1; i < SPREAD; i++) {
		off = img->size / SPREAD * i + i * 4096 % img->size;
		if (off < img->size)
			status_at(img, off, compressed, &len);
	}
}

/*
 * The read-ahead path: what meta_want asks for, read as the engine reads
 * it and handed to meta_fill, then the nowait status of its range.
 */
static void read_ahead(struct img *img)
{
	struct img_meta_req reqs[MAX_META];
	struct img_extent e;
	struct img_meta_req miss;
	uint64_t next = 0;
	unsigned n, i;
	void *buf;

	if (!img_can_read_ahead(img))
		return;
	n = img_meta_want(img, 0, reqs, MAX_META, &next);
	if (n > MAX_META)
		contract("meta_want overflowed its array", 0);
	for (i = 0; i < n; i++) {
		if (reqs[i].kind != IMG_META_READ || !reqs[i].len ||
		    reqs[i].len > META_LEN)
			continue;
		buf = malloc(reqs[i].len);
		if (!buf)
			abort();
		if (sio_pread(img->file, buf, reqs[i].len, reqs[i].host_off) ==
		    0)
			img_meta_fill(img, &reqs[i], buf);
		free(buf);
		if (reqs[i].guest_off < img->size)
			img_block_status_nowait(img, reqs[i].guest_off,
						img->size - reqs[i].guest_off,
						&e, &miss);
	}
}

/* Reads of at most READ_LEN bytes at MAX_READS points, some unaligned. */
static void read_ranges(struct img *img)
{
	uint64_t off, len;
	unsigned i;
	void *buf;

	buf = malloc(READ_LEN);
	if (!buf)
		abort();
	for (i = 0; i < MAX_READS; i++) {
		off = img->size / MAX_READS * i;
		if (i & 1)
			off += 512 * i + i; /* unaligned, mid cluster */
		if (i == MAX_READS - 1)
			off = img->size - sx_min(img->size, READ_LEN / 2);
		if (off >= img->size)
			continue;
		len = sx_min(READ_LEN - i * 1000, img->size - off);
		img_pread(img, buf, len, off);
	}
	free(buf);
}

/*
 * The backing name as img_open() would resolve it, short of opening
 * anything: an NBD name (json: included) parsed into its canonical URI.
 */
static void backing_name(const struct img *img)
{
	struct sio_nbd_addr a;
	char *uri;

	if (!img->backing_name || !sio_nbd_name_is_remote(img->backing_name))
		return;
	if (sio_nbd_name_parse(img->backing_name, &a) < 0)
		return;
	uri = sio_nbd_addr_uri(&a);
	free(uri);
	sio_nbd_addr_free(&a);
}

/*
 * The same check in the smallest windows (one refcount block's clusters
 * each: several passes for any image past that): the memory-bounded way a
 * large file is checked, its window masks and the later windows' replay
 * of recorded L2 tables (check.c). It must find what one pass finds.
 */
static void check_windows(const struct img_check_report *one)
{
	struct img_check_opts o = {.repair = IMG_CHECK_NO_REPAIR, .window = 1};
	struct img_check_report r;
	unsigned i;

	if (img_check(PATH, "qcow2", &o, &r) < 0)
		contract("the check failed in small windows only", 0);
	if (r.passes < 2)
		return;
	if (r.found_leaks != one->found_leaks ||
	    r.found_corruptions != one->found_corruptions ||
	    r.image_end_offset != one->image_end_offset ||
	    r.allocated_clusters != one->allocated_clusters)
		contract("small windows found other counts", r.passes);
	for (i = 0; i < IMG_CK_NKINDS; i++)
		if (r.kinds[i] != one->kinds[i])
			contract("small windows found other kinds", i);
}

/*
 * The consistency check reads the same untrusted bytes. Where it found
 * only leaks, -r leaks must leave none and make no corruption; anything
 * else gets -r all, which must not crash either.
 */
static void check_image(void)
{
	struct img_check_opts o = {.repair = IMG_CHECK_NO_REPAIR};
	struct img_check_report r;

	if (img_check(PATH, "qcow2", &o, &r) < 0)
		return;
	check_windows(&r);
	if (r.found_corruptions || !r.found_leaks) {
		/* Whatever it repairs or marks, it must not crash. */
		o.repair = IMG_CHECK_REPAIR_ALL;
		img_check(PATH, "qcow2", &o, &r);
		return;
	}
	o.repair = IMG_CHECK_REPAIR_LEAKS;
	if (img_check(PATH, "qcow2", &o, &r) < 0)
		return;
	if (r.leaks || r.corruptions)
		contract("-r leaks left leaks or made corruption", r.leaks);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct img_info_item items[32];
	struct img *img = NULL;
	struct sio_mem *m;
	unsigned compressed = MAX_COMPRESSED;
	int err;

	if (size > MAX_INPUT)
		size = MAX_INPUT;
	if (sio_mem_create(PATH, data, size, &m) < 0)
		abort();
	img_probe_format(PATH, &err);
	if (img_open_layer(PATH, "qcow2", 0, &img) < 0)
		goto out;
	backing_name(img);
	if (img_get_info(img, items, 32) > 32)
		contract("info overflowed its array", 0);
	if (img->size) {
		walk_status(img, &compressed);
		read_ahead(img);
		read_ranges(img);
	}
	img_close(img);
	img = NULL;
	check_image();
out:
	img_close(img);
	sio_mem_destroy(m);
	return 0;
}
