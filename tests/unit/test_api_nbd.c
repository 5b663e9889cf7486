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
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "nbdserver.h"
#include "guest_workload.h"
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

/*
 * qemu-img check of the qcow2 image at path without its backing file (its
 * server may be gone): the test fails unless it is clean.
 */
static void check_alone(const char *path)
{
	ck_assert_msg(sh("qemu-img check -q 'json:{\"driver\": \"qcow2\", "
			 "\"file\": {\"driver\": \"file\", \"filename\": "
			 "\"%s\"}, \"backing\": null}'",
			 path) == 0,
		      "qemu-img check %s fails", path);
}

/*
 * A chain in the test's directory: NAME.raw (16 MiB, written by the
 * qemu-io options base_io) exported by qemu-nbd on NAME.sock into *srv,
 * under NAME.qcow2 (its clusters written by top_io, NULL: none), and
 * NAME.ref.raw, qemu-img convert of the chain. The image's path into top.
 */
static void serve_chain(const char *name, const char *base_io,
			const char *top_io, struct nbd_server *srv, char *top,
			size_t top_len)
{
	char base[512], sock[64];

	RUN("cd %s && qemu-img create -q -f raw %s.raw 16M && "
	    "qemu-io -f raw %s %s.raw >/dev/null",
	    tmpdir, name, base_io, name);
	snprintf(base, sizeof(base), "%s/%s.raw", tmpdir, name);
	snprintf(sock, sizeof(sock), "%s.sock", name);
	ck_assert_int_eq(nbd_server_qemu(srv, tmpdir, sock, base), 0);
	RUN("cd %s && qemu-img create -q -f qcow2 "
	    "-b 'nbd+unix:///exp?socket=%s' -F raw %s.qcow2",
	    tmpdir, srv->sock, name);
	if (top_io)
		RUN("cd %s && qemu-io -f qcow2 %s %s.qcow2 >/dev/null", tmpdir,
		    top_io, name);
	RUN("cd %s && qemu-img convert -O raw %s.qcow2 %s.ref.raw", tmpdir,
	    name, name);
	snprintf(top, top_len, "%s/%s.qcow2", tmpdir, name);
}

START_TEST(test_stream_nbd_base_guest_reads)
{
	char top[512], ref[512];
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
	serve_chain("top",
		    "-c 'write -P 0x11 0 3M' -c 'write -P 0 4M 1M' "
		    "-c 'write -P 0x12 7M 2M' -c 'write -P 0x13 15M 1M'",
		    "-c 'write -P 0x21 1M 128k' -c 'write -z 8M 64k' "
		    "-c 'write -P 0x22 12M 64k'",
		    &srv, top, sizeof(top));
	snprintf(ref, sizeof(ref), "%s/top.ref.raw", tmpdir);
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
	char *d = tmpdir, top[512];
	struct siphon_disk_stats st = {.size = sizeof(st)};
	struct nbd_server srv;
	struct siphon_event ev;
	siphon_domain *dom = NULL;
	siphon_disk *disk = NULL;
	int ret;

	/* Data in a few places, holes between: many runs to ask about. */
	serve_chain("sp",
		    "-c 'write -P 0x31 1M 64k' -c 'write -P 0x32 3M 4k' "
		    "-c 'write -P 0x33 5M 192k' -c 'write -P 0x34 9M 64k' "
		    "-c 'write -P 0 11M 1M' -c 'write -P 0x35 16320k 64k'",
		    "-c 'write -P 0x41 2M 64k'", &srv, top, sizeof(top));

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

/*
 * A disk's own NBD settings (siphon_attach_opts): a VMM sets the reconnect
 * window and the request timeout per disk, and they hold for its stream
 * (the FAILED event names the value set, not the default's 10 s window or
 * 30 s timeout) and its guest reads (-EIO, the message naming the server
 * and the window); a connection count above the
 * limit is refused before anything is opened.
 */
START_TEST(test_attach_nbd_settings)
{
	const char *slow[] = {"--filter=delay", "file", NULL, "rdelay=20",
			      NULL};
	struct siphon_block_stream_params prm = {.size = sizeof(prm),
						 .bandwidth = 1 * MiB};
	char *d = tmpdir, top[512], base[512], arg[600];
	struct siphon_attach_opts ao = {.size = sizeof(ao)};
	struct nbd_server srv;
	struct siphon_event ev;
	siphon_domain *dom = NULL;
	siphon_disk *disk = NULL;
	uint8_t *buf = malloc(READ_LEN);
	int ret;

	ck_assert_ptr_nonnull(buf);
	serve_chain("st", "-c 'write -P 0x51 0 16M'", NULL, &srv, top,
		    sizeof(top));
	snprintf(base, sizeof(base), "%s/st.raw", tmpdir);
	ck_assert_int_eq(siphon_domain_create(NULL, &dom), 0);

	ao.nbd_connections = SIPHON_NBD_MAX_CONNECTIONS + 1;
	ret = siphon_disk_attach(dom, top, &ao);
	ck_assert_int_eq(ret, -EINVAL);
	ck_assert_ptr_nonnull(strstr(siphon_get_error(), "at most 16"));

	/* A 300 ms window: the server gone, the stream gives up after it. */
	ao.nbd_connections = 2;
	ao.nbd_reconnect_ms = 300;
	ret = siphon_disk_attach(dom, top, &ao);
	ck_assert_msg(ret == 0, "attach: %d %s", ret, siphon_get_error());
	ck_assert_int_eq(siphon_disk_get(dom, top, &disk), 0);
	ret = siphon_disk_pread(disk, buf, READ_LEN, 0, 0);
	ck_assert_msg(ret == 0, "read: %d %s", ret, siphon_get_error());
	ck_assert_uint_eq(buf[0], 0x51);
	ret = siphon_block_stream_ex(dom, top, NULL, SIPHON_STREAM_CONTINUOUS,
				     &prm);
	ck_assert_msg(ret == 0, "stream: %d %s", ret, siphon_get_error());
	nbd_server_stop(&srv);
	ret = siphon_disk_pread(disk, buf, READ_LEN, 12 * MiB, 0);
	ck_assert_int_eq(ret, -EIO);
	/* The read's message says what failed below it, not just EIO. */
	ck_assert_msg(strstr(siphon_get_error(), "guest read at 12582912") &&
			      strstr(siphon_get_error(), srv.sock) &&
			      strstr(siphon_get_error(), "300 ms"),
		      "%s", siphon_get_error());
	ev = next_event(dom);
	ck_assert_msg(ev.kind == SIPHON_EVENT_STREAM_FAILED, "event %d: %s",
		      ev.kind, ev.message);
	ck_assert_msg(strstr(ev.message, "no connection for 300 ms"), "%s",
		      ev.message);
	siphon_disk_put(disk);
	ck_assert_int_eq(siphon_disk_detach(dom, top, 0), 0);

	/* A 300 ms timeout and no window: a slow server fails the stream. */
	if (system("nbdkit --version >/dev/null 2>&1") == 0) {
		snprintf(arg, sizeof(arg), "file=%s", base);
		slow[2] = arg;
		ck_assert_int_eq(nbd_server_nbdkit(&srv, d, "st.sock", slow),
				 0);
		ao = (struct siphon_attach_opts){.size = sizeof(ao),
						 .nbd_reconnect_ms =
							 SIPHON_NBD_OFF,
						 .nbd_timeout_ms = 300};
		ret = siphon_disk_attach(dom, top, &ao);
		ck_assert_msg(ret == 0, "attach: %d %s", ret,
			      siphon_get_error());
		ret = siphon_block_stream(dom, top, NULL,
					  SIPHON_STREAM_CONTINUOUS);
		ck_assert_msg(ret == 0, "stream: %d %s", ret,
			      siphon_get_error());
		ev = next_event(dom);
		ck_assert_msg(ev.kind == SIPHON_EVENT_STREAM_FAILED,
			      "event %d: %s", ev.kind, ev.message);
		ck_assert_msg(strstr(ev.message, "did not answer for 300 ms"),
			      "%s", ev.message);
		ck_assert_int_eq(siphon_disk_detach(dom, top, 0), 0);
		nbd_server_stop(&srv);
	}
	siphon_domain_close(dom);
	/* Whatever the failed reads left, the overlay is clean. */
	check_alone(top);
	free(buf);
}
END_TEST

/*
 * Guest I/O through the API while the NBD base misbehaves (issue 12,
 * faults), checked against a model of every byte (guest_workload.h: two
 * threads, each on its own stripes, so the model is exact whatever the
 * interleaving) while a throttled stream runs:
 *  A. the server killed and started again inside the reconnect window:
 *     every guest read and write succeeds (they wait), the stream
 *     completes, the disk reads as the model;
 *  B. the server killed for good (a 500 ms window): guest reads fail with
 *     -EIO or return the model's bytes, the stream ends
 *     FAILED naming the server, the image is clean; with the server back a
 *     new stream completes and everything written before the kill is there;
 *  C. nbdkit's error filter failing every read while a trigger file
 *     exists: as B (-EIO or the model's bytes; FAILED); the trigger gone,
 *     a new stream completes;
 *  D. nbdkit's delay filter making every read slow: all succeeds.
 * After each: qemu-img compare of the image with the model, qemu-img check,
 * no backing file left.
 */
#define FDISK (32 * MiB)

/* The first n bytes of the file at path into buf. */
static void load(const char *path, uint8_t *buf, size_t n)
{
	FILE *f = fopen(path, "rb");

	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fread(buf, 1, n, f), n);
	fclose(f);
}

struct faults {
	siphon_disk *disk;
	uint8_t *model;
	bool reads_only; /* reads may fail (-EIO), nothing is written */
	unsigned max_ops; /* per thread and run, 0: until stopped */
	atomic_bool stop;
	atomic_uint ops, errors, eio, mismatches;
	char msg[640];
};

struct faults_arg {
	struct faults *f;
	unsigned t;
	uint64_t seed;
};

static void *faults_guest(void *arg)
{
	struct faults_arg *a = arg;
	struct faults *f = a->f;
	uint8_t *buf = malloc(WL_STRIPE);
	uint64_t rng = wl_seed(a->seed, a->t);
	struct wl_op op;
	unsigned n = 0;
	int ret;

	ck_assert_ptr_nonnull(buf);
	while (!atomic_load(&f->stop) && (!f->max_ops || n++ < f->max_ops)) {
		wl_next(&rng, a->t, 2, FDISK, &op);
		if (f->reads_only && op.kind != WL_READ)
			continue;
		ret = wl_issue(f->disk, &op, buf);
		if (op.kind == WL_READ && ret == 0 &&
		    memcmp(buf, f->model + op.off, op.len) &&
		    atomic_fetch_add(&f->mismatches, 1) == 0)
			snprintf(f->msg, sizeof(f->msg),
				 "read of [%llu, +%llu) differs from the model",
				 (unsigned long long)op.off,
				 (unsigned long long)op.len);
		atomic_fetch_add(&f->ops, 1);
		if (ret == -EIO && f->reads_only)
			atomic_fetch_add(&f->eio, 1);
		else if (ret < 0) {
			if (atomic_fetch_add(&f->errors, 1) == 0)
				snprintf(f->msg, sizeof(f->msg),
					 "guest op %d: %s", op.kind,
					 siphon_get_error());
		} else {
			wl_apply(f->model, &op, 65536);
		}
	}
	free(buf);
	return NULL;
}

/* Guest threads on f for ms milliseconds, with `during` run halfway. */
static void faults_run(struct faults *f, unsigned ms, void (*during)(void *),
		       void *arg, uint64_t seed)
{
	struct faults_arg a[2];
	pthread_t th[2];
	unsigned t;

	atomic_store(&f->stop, false);
	for (t = 0; t < 2; t++) {
		a[t] = (struct faults_arg){.f = f, .t = t, .seed = seed};
		ck_assert_int_eq(
			pthread_create(&th[t], NULL, faults_guest, &a[t]), 0);
	}
	usleep(ms * 500);
	if (during)
		during(arg);
	usleep(ms * 500);
	atomic_store(&f->stop, true);
	for (t = 0; t < 2; t++)
		pthread_join(th[t], NULL);
	ck_assert_msg(atomic_load(&f->errors) == 0 &&
			      atomic_load(&f->mismatches) == 0,
		      "%u errors, %u mismatches: %s", atomic_load(&f->errors),
		      atomic_load(&f->mismatches), f->msg);
}

struct restart {
	struct nbd_server *srv;
	const char *dir, *base;
};

/* Kill the server, wait a second (reads pile up), start it again. */
static void faults_restart(void *arg)
{
	struct restart *r = arg;

	nbd_server_stop(r->srv);
	usleep(1000 * 1000);
	ck_assert_int_eq(nbd_server_qemu(r->srv, r->dir, "f.sock", r->base), 0);
}

/* The stream's end: its kind, and its message into msg. */
static int faults_end(siphon_domain *dom, char *msg, size_t len)
{
	struct siphon_event ev = next_event(dom);

	snprintf(msg, len, "%s", ev.message);
	return ev.kind;
}

/*
 * Attach path with opts and copy-on-read mode cor, stream it at 1 MiB/s;
 * the disk into f.
 */
static void faults_start(siphon_domain *dom, const char *path,
			 const struct siphon_attach_opts *ao, int cor,
			 struct faults *f)
{
	struct siphon_block_stream_params prm = {.size = sizeof(prm),
						 .bandwidth = 1 * MiB};
	int ret;

	ret = siphon_disk_attach(dom, path, ao);
	ck_assert_msg(ret == 0, "attach: %d %s", ret, siphon_get_error());
	ck_assert_int_eq(siphon_disk_get(dom, path, &f->disk), 0);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(f->disk, cor), 0);
	ret = siphon_block_stream_ex(dom, path, NULL, SIPHON_STREAM_CONTINUOUS,
				     &prm);
	ck_assert_msg(ret == 0, "stream: %d %s", ret, siphon_get_error());
}

/* Run the stream to its end at full speed: it must complete. */
static void faults_finish(siphon_domain *dom, const char *path,
			  struct faults *f)
{
	char msg[SIPHON_MESSAGE_MAX];
	int kind, ret;

	/* -ESRCH: it ended already, its event is queued. */
	ret = siphon_block_stream_set_speed(dom, path, 0, 0);
	ck_assert_msg(ret == 0 || ret == -ESRCH, "set_speed: %d", ret);
	kind = faults_end(dom, msg, sizeof(msg));
	ck_assert_msg(kind == SIPHON_EVENT_STREAM_COMPLETED, "event %d: %s",
		      kind, msg);
	siphon_disk_put(f->disk);
	ck_assert_int_eq(siphon_disk_detach(dom, path, 0), 0);
}

/* The image at path, streamed and detached, against the model. */
static void faults_check(const char *path, const uint8_t *model)
{
	char ref[600];
	FILE *fp;

	snprintf(ref, sizeof(ref), "%s.model", path);
	fp = fopen(ref, "wb");
	ck_assert_ptr_nonnull(fp);
	ck_assert_uint_eq(fwrite(model, 1, FDISK, fp), FDISK);
	ck_assert_int_eq(fclose(fp), 0);
	ck_assert_int_ne(sh("qemu-img info --output=json %s | "
			    "grep -q backing-filename",
			    path),
			 0);
	ck_assert_msg(
		sh("qemu-img compare -q -f raw -F qcow2 %s %s", ref, path) == 0,
		"%s differs from the model", path);
	ck_assert_int_eq(sh("qemu-img check -q %s", path), 0);
}

/* Reads only, the base failing: -EIO or the model's bytes; then FAILED. */
static void faults_fail(siphon_domain *dom, const char *path, struct faults *f,
			const char *want)
{
	char msg[SIPHON_MESSAGE_MAX];
	int kind;

	f->reads_only = true;
	faults_run(f, 2000, NULL, NULL, 3);
	f->reads_only = false;
	ck_assert_msg(atomic_load(&f->eio) > 0, "no guest read failed (%u ops)",
		      atomic_load(&f->ops));
	kind = faults_end(dom, msg, sizeof(msg));
	ck_assert_msg(kind == SIPHON_EVENT_STREAM_FAILED, "event %d: %s", kind,
		      msg);
	ck_assert_msg(strstr(msg, want), "'%s' not in: %s", want, msg);
	siphon_disk_put(f->disk);
	ck_assert_int_eq(siphon_disk_detach(dom, path, 0), 0);
	check_alone(path);
	atomic_store(&f->eio, 0);
}

START_TEST(test_guest_io_through_faults)
{
	char *d = tmpdir, base[512], img[4][512], arg[600], trig[600],
	     trigarg[700];
	const char *errs[] = {
		"--filter=error",	 "file", NULL, "error-pread=EIO",
		"error-pread-rate=100%", NULL,	 NULL};
	const char *slow[] = {"--filter=delay", "file", NULL, "rdelay=5ms",
			      NULL};
	struct siphon_attach_opts ao = {.size = sizeof(ao)};
	struct faults f = {0};
	struct nbd_server srv;
	struct restart r = {&srv, tmpdir, base};
	siphon_domain *dom = NULL;
	unsigned i;

	RUN("cd %s && head -c %llu /dev/urandom >fbase.raw", d,
	    (unsigned long long)FDISK);
	snprintf(base, sizeof(base), "%s/fbase.raw", d);
	snprintf(arg, sizeof(arg), "file=%s", base);
	ck_assert_int_eq(nbd_server_qemu(&srv, d, "f.sock", base), 0);
	for (i = 0; i < 4; i++) {
		snprintf(img[i], sizeof(img[i]), "%s/f%u.qcow2", d, i);
		RUN("qemu-img create -q -f qcow2 "
		    "-b 'nbd+unix:///exp?socket=%s' -F raw %s",
		    srv.sock, img[i]);
	}
	f.model = malloc(FDISK);
	ck_assert_ptr_nonnull(f.model);
	load(base, f.model, FDISK);
	ck_assert_int_eq(siphon_domain_create(NULL, &dom), 0);

	/* A: restarted inside a 30 s window. */
	ao.nbd_reconnect_ms = 30000;
	faults_start(dom, img[0], &ao, SIPHON_COR_ON, &f);
	faults_run(&f, 3000, faults_restart, &r, 1);
	faults_finish(dom, img[0], &f);
	faults_check(img[0], f.model);

	/* B: gone for good, then back. */
	load(base, f.model, FDISK);
	ao.nbd_reconnect_ms = 500;
	faults_start(dom, img[1], &ao, SIPHON_COR_OFF, &f);
	f.max_ops = 30; /* most of the disk still remote */
	faults_run(&f, 500, NULL, NULL, 2);
	f.max_ops = 0;
	nbd_server_stop(&srv);
	faults_fail(dom, img[1], &f, srv.sock);
	ck_assert_int_eq(nbd_server_qemu(&srv, d, "f.sock", base), 0);
	faults_start(dom, img[1], NULL, SIPHON_COR_AUTO, &f);
	faults_finish(dom, img[1], &f);
	faults_check(img[1], f.model);
	nbd_server_stop(&srv);

	if (system("nbdkit --version >/dev/null 2>&1") != 0) {
		fprintf(stderr, "nbdkit missing: error and delay filters not "
				"tested\n");
		goto out;
	}
	/* C: every read fails while the trigger file exists. */
	load(base, f.model, FDISK);
	snprintf(trig, sizeof(trig), "%s/f.trigger", d);
	snprintf(trigarg, sizeof(trigarg), "error-pread-file=%s", trig);
	errs[2] = arg;
	errs[5] = trigarg;
	ck_assert_int_eq(nbd_server_nbdkit(&srv, d, "f.sock", errs), 0);
	faults_start(dom, img[2], NULL, SIPHON_COR_OFF, &f);
	f.max_ops = 30;
	faults_run(&f, 500, NULL, NULL, 4);
	f.max_ops = 0;
	RUN("touch %s", trig);
	faults_fail(dom, img[2], &f, "f.sock");
	RUN("rm -f %s", trig);
	faults_start(dom, img[2], NULL, SIPHON_COR_AUTO, &f);
	faults_finish(dom, img[2], &f);
	faults_check(img[2], f.model);
	nbd_server_stop(&srv);

	/* D: every read 5 ms late. */
	load(base, f.model, FDISK);
	slow[2] = arg;
	ck_assert_int_eq(nbd_server_nbdkit(&srv, d, "f.sock", slow), 0);
	faults_start(dom, img[3], NULL, SIPHON_COR_AUTO, &f);
	faults_run(&f, 1000, NULL, NULL, 5);
	faults_finish(dom, img[3], &f);
	faults_check(img[3], f.model);
	nbd_server_stop(&srv);
out:
	siphon_domain_close(dom);
	free(f.model);
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
	tcase_add_test(tc, test_attach_nbd_settings);
	tcase_add_test(tc, test_guest_io_through_faults);
	suite_add_tcase(s, tc);
	return run_suite(s, tmpdir, RUN_URING | RUN_QEMU);
}
