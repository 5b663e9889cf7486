/*
 * Unit tests for the chain layer (formats/image.c) and the raw driver.
 *
 * Raw-only tests build their files with plain syscalls. The chain tests
 * (relative backing names, loops, missing backing files, depth) need qcow2
 * images; they are built with qemu-img and skipped (not passed) when qemu-img
 * or the qcow2 driver is missing. The whole program exits 77 when io_uring
 * cannot be set up.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"

static char tmpdir[] = "/tmp/siphon-test-image-XXXXXX";

static char *tpath(const char *name)
{
	static char buf[8][512];
	static int i;
	char *p = buf[i++ % 8];

	snprintf(p, sizeof(buf[0]), "%s/%s", tmpdir, name);
	return p;
}

/* A size-byte file with `fill` at each [off, off + len) in `data`. */
static void make_file(const char *path, uint64_t size, const uint64_t *data,
		      int n, int fill)
{
	char buf[65536];
	int fd, i;

	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)size), 0);
	memset(buf, fill, sizeof(buf));
	for (i = 0; i < n; i += 2) {
		uint64_t off = data[i], len = data[i + 1];

		while (len) {
			size_t k = len < sizeof(buf) ? len : sizeof(buf);

			ck_assert_int_eq(pwrite(fd, buf, k, (off_t)off),
					 (ssize_t)k);
			off += k;
			len -= k;
		}
	}
	ck_assert_int_eq(fsync(fd), 0);
	close(fd);
}

static bool seek_data_works(const char *path)
{
	int fd = open(path, O_RDONLY);
	off_t r;

	if (fd < 0)
		return false;
	r = lseek(fd, 0, SEEK_DATA);
	close(fd);
	return r >= 0 || errno == ENXIO;
}

START_TEST(test_find_driver)
{
	ck_assert_ptr_eq(img_find_driver("raw"), &img_driver_raw);
	ck_assert_ptr_null(img_find_driver("vmdk"));
	ck_assert_ptr_null(img_find_driver(NULL));
	img_close(NULL);
}
END_TEST

START_TEST(test_probe_fallback_raw)
{
	const uint64_t data[] = {0, 8192};
	const char *p = tpath("probe.raw");
	const struct img_driver *drv;
	struct img *img = NULL;
	int err = -1;

	make_file(p, 1 << 20, data, 2, 0x5a);
	drv = img_probe_file(p, &err);
	ck_assert_int_eq(err, 0);
	ck_assert_ptr_eq(drv, &img_driver_raw);

	ck_assert_int_eq(img_open(p, NULL, 0, &img), 0);
	ck_assert_ptr_eq(img->drv, &img_driver_raw);
	ck_assert_uint_eq(img->size, 1 << 20);
	ck_assert_uint_eq(img->cluster_size, 512);
	ck_assert_ptr_null(img->backing);
	ck_assert_uint_eq(img->depth, 0);
	ck_assert(!img->writable);
	img_close(img);

	/* An empty file is raw too. */
	make_file(tpath("empty.raw"), 0, NULL, 0, 0);
	ck_assert_int_eq(img_open(tpath("empty.raw"), NULL, 0, &img), 0);
	ck_assert_uint_eq(img->size, 0);
	img_close(img);
}
END_TEST

START_TEST(test_unknown_format)
{
	const char *p = tpath("fmt.raw");
	struct img *img = NULL;

	make_file(p, 4096, NULL, 0, 0);
	ck_assert_int_eq(img_open(p, "nosuchfmt", 0, &img), -EINVAL);
	ck_assert_ptr_null(img);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "unknown format"));
	ck_assert_int_eq(img_open(p, NULL, 1u << 20, &img), -EINVAL);
	ck_assert_int_eq(img_open(NULL, NULL, 0, &img), -EINVAL);
}
END_TEST

START_TEST(test_missing_file)
{
	const char *p = tpath("does-not-exist.raw");
	struct img *img = NULL;
	int err = 0;

	ck_assert_int_eq(img_open(p, NULL, 0, &img), -ENOENT);
	ck_assert_ptr_null(img);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "does-not-exist.raw"));
	ck_assert_ptr_null(img_probe_file(p, &err));
	ck_assert_int_eq(err, -ENOENT);
}
END_TEST

START_TEST(test_raw_status_holes)
{
	const uint64_t data[] = {65536, 65536, 512 * 1024, 4096};
	const char *p = tpath("holes.raw");
	struct img_extent e;
	struct img *img;
	unsigned depth = 99;

	make_file(p, 1 << 20, data, 4, 0x11);
	ck_assert_int_eq(img_open(p, "raw", 0, &img), 0);
	if (!seek_data_works(p)) {
		ck_assert_int_eq(
			img_chain_status(img, NULL, 0, 1 << 20, &e, &depth), 0);
		ck_assert_int_eq(e.status, IMG_DATA);
		ck_assert_uint_eq(e.len, 1 << 20);
		img_close(img);
		return;
	}

	ck_assert_int_eq(img_chain_status(img, NULL, 0, 1 << 20, &e, &depth),
			 0);
	ck_assert_uint_eq(depth, 0);
	ck_assert_int_eq(e.status, IMG_ZERO);
	ck_assert(e.host_valid);
	ck_assert_uint_eq(e.host_off, 0);
	ck_assert_uint_eq(e.len, 65536);

	ck_assert_int_eq(
		img_chain_status(img, NULL, 65536, 1 << 20, &e, &depth), 0);
	ck_assert_int_eq(e.status, IMG_DATA);
	ck_assert_ptr_eq(e.file, img->file);
	ck_assert_uint_eq(e.host_off, 65536);
	ck_assert_uint_eq(e.len, 65536);

	/* A request shorter than the run is clipped to the request. */
	ck_assert_int_eq(img_chain_status(img, NULL, 70000, 1000, &e, &depth),
			 0);
	ck_assert_int_eq(e.status, IMG_DATA);
	ck_assert_uint_eq(e.len, 1000);

	/* And a request past the end to the size. */
	ck_assert_int_eq(
		img_chain_status(img, NULL, 600 * 1024, 1ULL << 40, &e, &depth),
		0);
	ck_assert_int_eq(e.status, IMG_ZERO);
	ck_assert_uint_eq(e.host_off, 600 * 1024);
	ck_assert_uint_eq(e.len, (1 << 20) - 600 * 1024);

	ck_assert_int_eq(img_chain_status(img, NULL, 1 << 20, 512, &e, &depth),
			 -EINVAL);
	img_close(img);
}
END_TEST

START_TEST(test_raw_pread)
{
	const uint64_t data[] = {4096, 8192, 200000, 100};
	const char *p = tpath("read.raw");
	uint8_t *buf, *want;
	struct img *img;
	size_t size = 256 * 1024;

	make_file(p, size, data, 4, 0xc3);
	buf = malloc(size);
	want = calloc(1, size);
	ck_assert_ptr_nonnull(buf);
	memset(want + 4096, 0xc3, 8192);
	memset(want + 200000, 0xc3, 100);

	ck_assert_int_eq(img_open(p, NULL, 0, &img), 0);
	memset(buf, 0xee, size);
	ck_assert_int_eq(img_pread(img, buf, size, 0), 0);
	ck_assert_int_eq(memcmp(buf, want, size), 0);

	/* Unaligned, across data and holes. */
	memset(buf, 0xee, size);
	ck_assert_int_eq(img_pread(img, buf, 10000, 3000), 0);
	ck_assert_int_eq(memcmp(buf, want + 3000, 10000), 0);
	ck_assert_int_eq(img_pread(img, buf, 333, 199900), 0);
	ck_assert_int_eq(memcmp(buf, want + 199900, 333), 0);

	/* Past the end is refused, with the path. */
	ck_assert_int_eq(img_pread(img, buf, 2, size - 1), -EINVAL);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "read.raw"));
	ck_assert_int_eq(img_pread(img, buf, 0, size), 0);
	img_close(img);
	free(buf);
	free(want);
}
END_TEST

/* qemu sizes raw files in sectors; the tail past EOF reads as zeros. */
START_TEST(test_raw_partial_sector)
{
	const uint64_t data[] = {0, 1000};
	const char *p = tpath("odd.raw");
	struct img_extent e;
	uint8_t buf[1024];
	struct img *img;
	unsigned depth;
	int i;

	make_file(p, 1000, data, 2, 0x77);
	ck_assert_int_eq(img_open(p, NULL, 0, &img), 0);
	ck_assert_uint_eq(img->size, 1024);
	ck_assert_int_eq(img_pread(img, buf, 1024, 0), 0);
	for (i = 0; i < 1024; i++)
		ck_assert_int_eq(buf[i], i < 1000 ? 0x77 : 0);
	ck_assert_int_eq(img_chain_status(img, NULL, 1000, 24, &e, &depth), 0);
	if (seek_data_works(p))
		ck_assert_int_eq(e.status, IMG_ZERO);
	img_close(img);
}
END_TEST

START_TEST(test_rdwr_top)
{
	const char *p = tpath("rw.raw");
	uint8_t buf[512];
	struct img *img;

	make_file(p, 65536, NULL, 0, 0);
	ck_assert_int_eq(
		img_open(p, "raw", IMG_OPEN_RDWR | IMG_OPEN_BUFFERED, &img), 0);
	ck_assert(img->writable);
	memset(buf, 0x42, sizeof(buf));
	ck_assert_int_eq(img_pwrite(img, buf, sizeof(buf), 4096), 0);
	memset(buf, 0, sizeof(buf));
	ck_assert_int_eq(img_pread(img, buf, sizeof(buf), 4096), 0);
	ck_assert_int_eq(buf[0], 0x42);
	ck_assert_int_eq(buf[511], 0x42);
	img_close(img);
}
END_TEST

/* ---- chains (qcow2 built by qemu-img) ---- */

START_TEST(test_chain_relative)
{
	struct img_extent e;
	uint8_t buf[4096];
	struct img *img;
	unsigned depth;
	char *cwd;

	RUN("cd %s && mkdir -p rel/sub && qemu-img create -q -f raw "
	    "rel/sub/base.raw 1M && qemu-io -f raw -c 'write -P 0x33 0 64k' "
	    "rel/sub/base.raw >/dev/null && cd rel && qemu-img create -q -f "
	    "qcow2 -b sub/base.raw -F raw mid.qcow2 1M && qemu-img create -q "
	    "-f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 2M && perl -0777 -pi -e "
	    "'s/\\xe2\\x79\\x2a\\xca/\\x7a\\x7a\\x7a\\x7a/' top.qcow2",
	    tmpdir);

	/*
	 * top's backing-format extension was renamed to an unknown one above,
	 * so mid's format is probed. Open from elsewhere: names resolve
	 * against the image, not the current directory.
	 */
	cwd = getcwd(NULL, 0);
	ck_assert_int_eq(chdir("/"), 0);
	ck_assert_int_eq(img_open(tpath("rel/top.qcow2"), NULL, 0, &img), 0);
	ck_assert_int_eq(chdir(cwd), 0);
	free(cwd);

	ck_assert_ptr_nonnull(img->backing);
	ck_assert_ptr_nonnull(img->backing->backing);
	ck_assert_str_eq(img->backing->path, tpath("rel/mid.qcow2"));
	ck_assert_str_eq(img->backing->backing->path,
			 tpath("rel/sub/base.raw"));
	ck_assert(img->backing_fmt_probed);
	ck_assert(!img->backing->backing_fmt_probed);
	ck_assert_uint_eq(img->backing->depth, 1);
	ck_assert_uint_eq(img->backing->backing->depth, 2);
	ck_assert(!img->backing->writable);

	ck_assert_int_eq(img_chain_status(img, NULL, 0, 2 << 20, &e, &depth),
			 0);
	ck_assert_uint_eq(depth, 2);
	ck_assert_int_eq(e.status, IMG_DATA);
	ck_assert_int_eq(img_pread(img, buf, sizeof(buf), 4096), 0);
	ck_assert_int_eq(buf[0], 0x33);

	/* With stop = mid: nothing above mid holds it; the search reached
	 * stop, so depth is stop's (the data is in mid or below). */
	ck_assert_int_eq(
		img_chain_status(img, img->backing, 0, 4096, &e, &depth), 0);
	ck_assert_int_eq(e.status, IMG_UNALLOC);
	ck_assert_uint_eq(depth, img->backing->depth);

	/* Past the backing chain's end: unallocated at the top. */
	ck_assert_int_eq(
		img_chain_status(img, NULL, 1 << 20, 1 << 20, &e, &depth), 0);
	ck_assert_int_eq(e.status, IMG_UNALLOC);
	ck_assert_uint_eq(depth, 0);
	ck_assert_uint_eq(e.len, 1 << 20);
	img_close(img);

	ck_assert_int_eq(img_open(tpath("rel/top.qcow2"), NULL,
				  IMG_OPEN_NO_BACKING, &img),
			 0);
	ck_assert_ptr_null(img->backing);
	img_close(img);
}
END_TEST

/* Read miss->req and install it in miss->layer (what the engine does). */
static void fill_miss(const struct img_meta_miss *m)
{
	uint8_t *buf = malloc(m->req.len);

	ck_assert_ptr_nonnull(buf);
	ck_assert_int_eq(
		sio_pread(m->req.file, buf, m->req.len, m->req.host_off), 0);
	img_meta_fill(m->layer, &m->req, buf);
	free(buf);
}

/*
 * The nowait chain calls miss in each layer whose slice is not cached, in
 * order from the top, and answer as the synchronous ones once filled.
 */
START_TEST(test_chain_nowait)
{
	struct img_meta_miss miss;
	struct img_extent e;
	struct img_piece pc;
	struct img *img;
	unsigned depth;

	RUN("cd %s && qemu-img create -q -f raw nw.raw 4M && qemu-img create "
	    "-q -f qcow2 -b nw.raw -F raw nw.mid.qcow2 && qemu-io -f qcow2 "
	    "-c 'write -P 0x44 1M 64k' nw.mid.qcow2 >/dev/null && "
	    "qemu-img create -q -f qcow2 -b nw.mid.qcow2 -F qcow2 nw.qcow2 && "
	    "qemu-io -f qcow2 -c 'write -P 0x55 0 64k' nw.qcow2 >/dev/null",
	    tmpdir);
	ck_assert_int_eq(img_open(tpath("nw.qcow2"), NULL, 0, &img), 0);

	/* mid's cluster: the top's slice first, then mid's. */
	ck_assert_int_eq(img_chain_piece_nowait(img, 1 << 20, 4096, &pc, &miss),
			 -EAGAIN);
	ck_assert_ptr_eq(miss.layer, img);
	fill_miss(&miss);
	ck_assert_int_eq(img_chain_piece_nowait(img, 1 << 20, 4096, &pc, &miss),
			 -EAGAIN);
	ck_assert_ptr_eq(miss.layer, img->backing);
	fill_miss(&miss);
	ck_assert_int_eq(img_chain_piece_nowait(img, 1 << 20, 4096, &pc, &miss),
			 0);
	ck_assert_ptr_null(miss.layer);
	ck_assert_int_eq(pc.status, IMG_DATA);
	ck_assert_uint_eq(pc.depth, 1);

	/* Everything cached now: the same answers without I/O. */
	ck_assert_int_eq(img_chain_status_nowait(img, NULL, 0, 4 << 20, &e,
						 &depth, &miss),
			 0);
	ck_assert_int_eq(e.status, IMG_DATA);
	ck_assert_uint_eq(depth, 0);
	ck_assert_int_eq(img_lacks_nowait(img, 0, 4096, false, &miss), 0);
	ck_assert_int_eq(img_lacks_nowait(img, 1 << 20, 4096, true, &miss), 1);
	ck_assert_int_eq(img_lacks_nowait(img, 0, 128 << 10, false, &miss), 1);
	ck_assert_int_eq(img_lacks_nowait(img, 0, 128 << 10, true, &miss), 0);
	img_close(img);
}
END_TEST

START_TEST(test_chain_missing_backing)
{
	struct img *img = NULL;

	RUN("cd %s && qemu-img create -q -f raw gone.raw 1M && qemu-img "
	    "create -q -f qcow2 -b gone.raw -F raw orphan.qcow2 1M && rm "
	    "gone.raw",
	    tmpdir);
	ck_assert_int_eq(img_open(tpath("orphan.qcow2"), NULL, 0, &img),
			 -ENOENT);
	ck_assert_ptr_null(img);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "orphan.qcow2"));
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "'gone.raw'"));
	ck_assert_ptr_nonnull(strstr(sx_last_error(), tpath("gone.raw")));
}
END_TEST

START_TEST(test_chain_loop)
{
	struct img *img = NULL;

	RUN("cd %s && qemu-img create -q -f qcow2 la.qcow2 1M && qemu-img "
	    "create -q -f qcow2 -b la.qcow2 -F qcow2 lb.qcow2 1M && qemu-img "
	    "rebase -q -u -b lb.qcow2 -F qcow2 la.qcow2 && ln -sf la.qcow2 "
	    "lc.qcow2",
	    tmpdir);
	ck_assert_int_eq(img_open(tpath("la.qcow2"), NULL, 0, &img), -ELOOP);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "la.qcow2"));
	ck_assert_int_eq(img_open(tpath("lc.qcow2"), NULL, 0, &img), -ELOOP);
	ck_assert_ptr_null(img);
}
END_TEST

START_TEST(test_chain_depth)
{
	struct img *img = NULL, *l;
	unsigned n = 0;

	/* d0.raw <- d1 <- ... <- d65: 65 layers below d65 is one too many. */
	RUN("cd %s && qemu-img create -q -f raw d0.raw 64k && prev=d0.raw && "
	    "f=raw && for i in $(seq 1 65); do qemu-img create -q -f qcow2 "
	    "-b $prev -F $f d$i.qcow2 64k || exit 1; prev=d$i.qcow2; "
	    "f=qcow2; done",
	    tmpdir);
	ck_assert_int_eq(img_open(tpath("d64.qcow2"), NULL, 0, &img), 0);
	for (l = img; l; l = l->backing)
		n++;
	ck_assert_uint_eq(n, IMG_MAX_DEPTH + 1);
	img_close(img);
	img = NULL;
	ck_assert_int_eq(img_open(tpath("d65.qcow2"), NULL, 0, &img), -ELOOP);
	ck_assert_ptr_null(img);
}
END_TEST

static Suite *image_suite(bool chains)
{
	Suite *s = suite_create("image");
	TCase *tc = tcase_create("raw");
	TCase *tc_chain;

	tcase_add_test(tc, test_find_driver);
	tcase_add_test(tc, test_probe_fallback_raw);
	tcase_add_test(tc, test_unknown_format);
	tcase_add_test(tc, test_missing_file);
	tcase_add_test(tc, test_raw_status_holes);
	tcase_add_test(tc, test_raw_pread);
	tcase_add_test(tc, test_raw_partial_sector);
	tcase_add_test(tc, test_rdwr_top);
	suite_add_tcase(s, tc);

	if (!chains)
		return s;
	tc_chain = tcase_create("chain");
	tcase_add_test(tc_chain, test_chain_relative);
	tcase_add_test(tc_chain, test_chain_nowait);
	tcase_add_test(tc_chain, test_chain_missing_backing);
	tcase_add_test(tc_chain, test_chain_loop);
	tcase_add_test(tc_chain, test_chain_depth);
	tcase_set_timeout(tc_chain, 60);
	suite_add_tcase(s, tc_chain);
	return s;
}

int main(void)
{
	bool chains = have_qemu_tools() && img_find_driver("qcow2");

	if (!chains)
		fprintf(stderr, "SKIP chain tests: no qemu-img/qemu-io or "
				"no qcow2 driver\n");
	return run_suite(image_suite(chains), tmpdir, RUN_URING);
}
