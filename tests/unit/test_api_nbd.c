/*
 * A stream through the public API over an NBD base (issue 12): qemu-nbd
 * exports a raw base on a Unix socket, a local qcow2 overlay names it as
 * nbd+unix:///exp?socket=..., and the disk streams (throttled, so that it
 * is surely running) while the guest reads all over the disk. Every guest
 * read must return what the chain held before (qemu-img convert of the
 * chain, taken before the stream: the base where the overlay has nothing);
 * afterwards the image has no backing file, qemu-img compare finds it
 * identical to that copy and qemu-img check finds it clean.
 *
 * Exits 77 without io_uring, qemu-img, qemu-io or qemu-nbd.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "nbdserver.h"
#include "formats/format.h"
#include "siphon.h"

#define MiB (1024ull * 1024)
#define SIZE (16 * MiB)
#define READ_LEN (64 * 1024)
#define NREADS 96

static char tmpdir[] = "/tmp/siphon-test-api-nbd-XXXXXX";

/* The whole of the file at path, SIZE bytes (the test fails otherwise). */
static uint8_t *slurp(const char *path)
{
	uint8_t *p = malloc(SIZE);
	FILE *f = fopen(path, "rb");

	ck_assert_ptr_nonnull(p);
	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fread(p, 1, SIZE, f), SIZE);
	fclose(f);
	return p;
}

/* The next event within 60 s (the test fails without one). */
static struct siphon_event next_event(siphon_domain *dom)
{
	struct pollfd pfd = {.fd = siphon_domain_event_fd(dom),
			     .events = POLLIN};
	struct siphon_event ev = {.size = sizeof(ev)};
	int ret, spins;

	for (spins = 0; spins < 600; spins++) {
		ret = siphon_domain_next_event(dom, &ev);
		ck_assert_int_ge(ret, 0);
		if (ret == 1)
			return ev;
		poll(&pfd, 1, 100);
	}
	ck_abort_msg("no event within 60 s");
	return ev;
}

START_TEST(test_stream_nbd_base_guest_reads)
{
	char *d = tmpdir, top[512], ref[512], base[512];
	struct siphon_block_stream_params prm = {.size = sizeof(prm),
						 .bandwidth = 8 * MiB};
	struct nbd_server srv;
	struct siphon_event ev;
	siphon_domain *dom = NULL;
	siphon_disk *disk = NULL;
	uint8_t *want, *buf = malloc(READ_LEN);
	uint64_t seed = 12345;
	unsigned i;
	int ret;

	ck_assert_ptr_nonnull(buf);
	/* Data, a written zero run and holes in the base. */
	RUN("cd %s && qemu-img create -q -f raw base.raw 16M && "
	    "qemu-io -f raw -c 'write -P 0x11 0 3M' -c 'write -P 0 4M 1M' "
	    "-c 'write -P 0x12 7M 2M' -c 'write -P 0x13 15M 1M' base.raw "
	    ">/dev/null",
	    d);
	snprintf(base, sizeof(base), "%s/base.raw", d);
	ck_assert_int_eq(nbd_server_qemu(&srv, d, "b.sock", base), 0);
	RUN("cd %s && qemu-img create -q -f qcow2 "
	    "-b 'nbd+unix:///exp?socket=%s' -F raw top.qcow2 && "
	    "qemu-io -f qcow2 -c 'write -P 0x21 1M 128k' "
	    "-c 'write -z 8M 64k' -c 'write -P 0x22 12M 64k' top.qcow2 "
	    ">/dev/null && "
	    "qemu-img convert -O raw top.qcow2 ref.raw",
	    d, srv.sock);
	snprintf(top, sizeof(top), "%s/top.qcow2", d);
	snprintf(ref, sizeof(ref), "%s/ref.raw", d);
	want = slurp(ref);

	ck_assert_int_eq(siphon_domain_create(NULL, &dom), 0);
	ret = siphon_disk_attach(dom, top, NULL);
	ck_assert_msg(ret == 0, "attach: %d %s", ret, siphon_get_error());
	ck_assert_int_eq(siphon_disk_get(dom, top, &disk), 0);
	ret = siphon_block_stream_ex(dom, top, NULL, SIPHON_STREAM_CONTINUOUS,
				     &prm);
	ck_assert_msg(ret == 0, "stream: %d %s", ret, siphon_get_error());
	for (i = 0; i < NREADS; i++) {
		uint64_t off;

		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		off = (seed >> 20) % (SIZE - READ_LEN);
		off &= ~511ull;
		ret = siphon_disk_pread(disk, buf, READ_LEN, off, 0);
		ck_assert_msg(ret == 0, "read at %llu: %d %s",
			      (unsigned long long)off, ret, siphon_get_error());
		ck_assert_msg(!memcmp(buf, want + off, READ_LEN),
			      "guest read at %llu differs from the chain",
			      (unsigned long long)off);
	}
	siphon_disk_put(disk);
	ck_assert_int_eq(siphon_block_stream_set_speed(dom, top, 0, 0), 0);
	ev = next_event(dom);
	ck_assert_str_eq(ev.path, top);
	ck_assert_msg(ev.kind == SIPHON_EVENT_STREAM_COMPLETED, "event %d: %s",
		      ev.kind, ev.message);
	ck_assert_int_eq(siphon_disk_detach(dom, top, 0), 0);
	siphon_domain_close(dom);
	nbd_server_stop(&srv);

	/* Without the server: the image stands alone. */
	ck_assert_int_ne(sh("qemu-img info --output=json %s | "
			    "grep -q backing-filename",
			    top),
			 0);
	ck_assert_int_eq(
		sh("qemu-img compare -q -f raw -F qcow2 %s %s", ref, top), 0);
	ck_assert_int_eq(sh("qemu-img check -q %s", top), 0);
	free(want);
	free(buf);
}
END_TEST

/*
 * The worker never waits for the server while streaming (issue 12: a
 * remote layer must never stall the disk's event loop): over a sparse base
 * the planner asks the server for block status many times, on the queue;
 * siphon_disk_stats.sync_waits (round trips the worker waited for) stays
 * 0 from the stream's start to its end. Then the result is qemu's copy.
 */
START_TEST(test_stream_nbd_sparse_no_waits)
{
	char *d = tmpdir, top[512], base[512];
	struct siphon_disk_stats st = {.size = sizeof(st)};
	struct nbd_server srv;
	struct siphon_event ev;
	siphon_domain *dom = NULL;
	siphon_disk *disk = NULL;
	int ret;

	/* Data in a few places, holes between: many runs to ask about. */
	RUN("cd %s && qemu-img create -q -f raw sparse.raw 16M && "
	    "qemu-io -f raw -c 'write -P 0x31 1M 64k' "
	    "-c 'write -P 0x32 3M 4k' -c 'write -P 0x33 5M 192k' "
	    "-c 'write -P 0x34 9M 64k' -c 'write -P 0 11M 1M' "
	    "-c 'write -P 0x35 16320k 64k' sparse.raw >/dev/null",
	    d);
	snprintf(base, sizeof(base), "%s/sparse.raw", d);
	ck_assert_int_eq(nbd_server_qemu(&srv, d, "sp.sock", base), 0);
	RUN("cd %s && qemu-img create -q -f qcow2 "
	    "-b 'nbd+unix:///exp?socket=%s' -F raw sp.qcow2 && "
	    "qemu-io -f qcow2 -c 'write -P 0x41 2M 64k' sp.qcow2 "
	    ">/dev/null && qemu-img convert -O raw sp.qcow2 sp.ref.raw",
	    d, srv.sock);
	snprintf(top, sizeof(top), "%s/sp.qcow2", d);

	ck_assert_int_eq(siphon_domain_create(NULL, &dom), 0);
	ret = siphon_disk_attach(dom, top, NULL);
	ck_assert_msg(ret == 0, "attach: %d %s", ret, siphon_get_error());
	ret = siphon_block_stream(dom, top, NULL, SIPHON_STREAM_CONTINUOUS);
	ck_assert_msg(ret == 0, "stream: %d %s", ret, siphon_get_error());
	ev = next_event(dom);
	ck_assert_msg(ev.kind == SIPHON_EVENT_STREAM_COMPLETED, "event %d: %s",
		      ev.kind, ev.message);
	ck_assert_int_eq(siphon_disk_get(dom, top, &disk), 0);
	ck_assert_int_eq(siphon_disk_get_stats(disk, &st), 0);
	siphon_disk_put(disk);
	ck_assert_msg(st.sync_waits == 0,
		      "the worker waited %llu times for the server while "
		      "streaming",
		      (unsigned long long)st.sync_waits);
	ck_assert_int_eq(siphon_disk_detach(dom, top, 0), 0);
	siphon_domain_close(dom);
	nbd_server_stop(&srv);
	ck_assert_int_eq(sh("qemu-img compare -q -f raw -F qcow2 %s/sp.ref.raw "
			    "%s",
			    d, top),
			 0);
	ck_assert_int_eq(sh("qemu-img check -q %s", top), 0);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("api_nbd");
	TCase *tc = tcase_create("stream");

	if (system("qemu-nbd --version >/dev/null 2>&1") != 0) {
		fprintf(stderr, "qemu-nbd missing: skipping\n");
		return 77;
	}
	if (!img_driver_qcow2.alloc_run) {
		fprintf(stderr, "qcow2 driver cannot write: skipping\n");
		return 77;
	}
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_stream_nbd_base_guest_reads);
	tcase_add_test(tc, test_stream_nbd_sparse_no_waits);
	suite_add_tcase(s, tc);
	return run_suite(s, tmpdir, RUN_URING | RUN_QEMU);
}
