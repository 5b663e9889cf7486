/*
 * Randomized guest I/O against a disk that streams (seeded, reproducible:
 * SIPHON_STRESS_SEED=N reruns a failure). Several threads run the workload
 * of guest_workload.h (reads, writes, partial writes, discards,
 * write-zeroes, flushes) while a CONTINUOUS stream runs; every read is
 * checked against an in-memory model of every byte. At the end the disk
 * reads as the model through siphon and through qemu-img convert,
 * qemu-img check passes and the backing is gone. Repeated with copy-on-read
 * on, off and auto, with the stream aborted and restarted, with subclusters.
 *
 * Crash: guest_crash_helper runs the same workload and is SIGKILLed at
 * random moments; the image must pass qemu-img check (0 or 3) and every
 * write completed before its thread's last completed flush must read back.
 *
 * Exits 77 when io_uring or qemu-img is unavailable.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"
#include "guest_workload.h"
#include "siphon.h"

#define DISK_MB 16
#define DISK_SIZE ((uint64_t)DISK_MB << 20)
#define CLUSTER 65536

static char tmpdir[] = "/tmp/siphon-gstress-XXXXXX";
static uint64_t seed;
static const char *helper;

static void load(const char *path, uint8_t *buf, uint64_t len)
{
	FILE *f = fopen(path, "r");

	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fread(buf, 1, len, f), len);
	fclose(f);
}

/*
 * name.base.raw: a pattern per MiB with a zero hole; name.qcow2 on it with
 * a few clusters of its own; the model gets what the chain reads.
 */
static const char *make_chain(const char *name, const char *opts,
			      uint8_t *model)
{
	static char top[512];
	char cmds[4096] = "", ref[600];
	size_t n = 0;
	int k;

	for (k = 0; k < DISK_MB; k++)
		if (k != 5)
			n += (size_t)snprintf(cmds + n, sizeof(cmds) - n,
					      "-c 'write -P 0x%02x %dM 1M' ",
					      0x10 + k, k);
	RUN("cd %s && qemu-img create -q -f raw %s.base.raw %dM && "
	    "qemu-io -f raw %s %s.base.raw >/dev/null && "
	    "qemu-img create -q -f qcow2 -o cluster_size=%d%s -b %s.base.raw "
	    "-F raw %s.qcow2 && qemu-io -f qcow2 -c 'write -P 0x77 0 64k' "
	    "-c 'write -P 0x78 3M 192k' -c 'write -z 7M 64k' %s.qcow2 "
	    ">/dev/null && qemu-img convert -f qcow2 -O raw %s.qcow2 "
	    "%s.ref.raw",
	    tmpdir, name, DISK_MB, cmds, name, CLUSTER, opts, name, name, name,
	    name, name);
	snprintf(ref, sizeof(ref), "%s/%s.ref.raw", tmpdir, name);
	load(ref, model, DISK_SIZE);
	snprintf(top, sizeof(top), "%s/%s.qcow2", tmpdir, name);
	return top;
}

struct stress {
	siphon_disk *disk;
	uint8_t *model;
	unsigned nthreads;
	unsigned ops;
	atomic_uint errors;
	atomic_uint mismatches;
	atomic_bool done;
	char msg[256];
};

struct thread_arg {
	struct stress *s;
	unsigned t;
};

static void *stress_thread(void *arg)
{
	struct thread_arg *ta = arg;
	struct stress *s = ta->s;
	uint64_t rng = wl_seed(seed, ta->t);
	uint8_t *buf = malloc(WL_STRIPE + 1);
	struct wl_op op;
	unsigned i;
	int ret = 0;

	for (i = 0; i < s->ops; i++) {
		wl_next(&rng, ta->t, s->nthreads, DISK_SIZE, &op);
		/* Reads at odd addresses too: the bounce path. */
		ret = wl_issue(s->disk, &op,
			       op.kind == WL_READ ? buf + (i & 1) : buf);
		if (op.kind == WL_READ && ret == 0 &&
		    memcmp(buf + (i & 1), s->model + op.off, op.len) &&
		    atomic_fetch_add(&s->mismatches, 1) == 0)
			snprintf(
				s->msg, sizeof(s->msg),
				"thread %u op %u: read of [%llu, +%llu) differs",
				ta->t, i, (unsigned long long)op.off,
				(unsigned long long)op.len);
		if (ret < 0 && atomic_fetch_add(&s->errors, 1) == 0)
			snprintf(s->msg, sizeof(s->msg), "thread %u op %u: %s",
				 ta->t, i, siphon_get_error());
		wl_apply(s->model, &op, CLUSTER);
	}
	free(buf);
	return NULL;
}

/* Drain events until the stream completes (or fails: returned). */
static int wait_completed(siphon_domain *dom)
{
	struct siphon_event ev = {.size = sizeof(ev)};

	for (;;) {
		if (siphon_domain_next_event(dom, &ev) == 1) {
			if (ev.kind == SIPHON_EVENT_STREAM_COMPLETED)
				return 0;
			if (ev.kind == SIPHON_EVENT_STREAM_FAILED) {
				fprintf(stderr, "stream failed: %s\n",
					ev.message);
				return -ev.error;
			}
			continue;
		}
		usleep(5000);
	}
}

static void run_stress(const char *name, const char *opts, int cor,
		       unsigned aborts)
{
	struct siphon_block_stream_params p = {.size = sizeof(p),
					       .bandwidth = 6 << 20};
	struct stress s = {.nthreads = 4, .ops = 300};
	struct thread_arg ta[8];
	pthread_t th[8];
	siphon_domain *dom;
	const char *top;
	uint8_t *img;
	char raw[600];
	unsigned t, k;

	s.model = malloc(DISK_SIZE);
	img = malloc(DISK_SIZE);
	top = make_chain(name, opts, s.model);
	ck_assert_int_eq(siphon_domain_create(NULL, &dom), 0);
	ck_assert_int_eq(siphon_disk_attach(dom, top, NULL), 0);
	ck_assert_int_eq(siphon_disk_get(dom, top, &s.disk), 0);
	ck_assert_int_eq(siphon_disk_set_copy_on_read(s.disk, cor), 0);
	ck_assert_int_eq(siphon_block_stream_ex(dom, top, NULL,
						SIPHON_STREAM_CONTINUOUS, &p),
			 0);
	for (t = 0; t < s.nthreads; t++) {
		ta[t] = (struct thread_arg){&s, t};
		pthread_create(&th[t], NULL, stress_thread, &ta[t]);
	}
	for (k = 0; k < aborts; k++) {
		int ret;

		usleep(150000);
		ret = siphon_block_stream_abort(dom, top, 0);
		ck_assert_msg(ret == 0 || ret == -ESRCH, "abort: %d", ret);
		ret = siphon_block_stream_ex(dom, top, NULL,
					     SIPHON_STREAM_CONTINUOUS, &p);
		ck_assert_msg(ret == 0, "restart: %d", ret);
	}
	for (t = 0; t < s.nthreads; t++)
		pthread_join(th[t], NULL);
	ck_assert_msg(s.errors == 0 && s.mismatches == 0,
		      "%u errors, %u mismatches: %s (seed %llu)", s.errors,
		      s.mismatches, s.msg, (unsigned long long)seed);
	if (siphon_block_stream_set_speed(dom, top, 0, 0) < 0)
		ck_assert_int_eq(siphon_block_stream(dom, top, NULL,
						     SIPHON_STREAM_CONTINUOUS),
				 0);
	ck_assert_int_eq(wait_completed(dom), 0);
	ck_assert_int_eq(siphon_disk_pread(s.disk, img, DISK_SIZE, 0, 0), 0);
	ck_assert_msg(!memcmp(img, s.model, DISK_SIZE),
		      "disk differs from the model (seed %llu)",
		      (unsigned long long)seed);
	siphon_disk_put(s.disk);
	siphon_domain_close(dom);
	RUN("cd %s && qemu-img check -q %s.qcow2 && "
	    "! qemu-img info %s.qcow2 | grep -q backing && "
	    "qemu-img convert -f qcow2 -O raw %s.qcow2 %s.out.raw",
	    tmpdir, name, name, name, name);
	snprintf(raw, sizeof(raw), "%s/%s.out.raw", tmpdir, name);
	load(raw, img, DISK_SIZE);
	ck_assert_msg(!memcmp(img, s.model, DISK_SIZE),
		      "image differs from the model (seed %llu)",
		      (unsigned long long)seed);
	sh("cd %s && rm -f %s.*", tmpdir, name);
	free(img);
	free(s.model);
}

START_TEST(test_stress_cor_auto)
{
	run_stress("auto", "", SIPHON_COR_AUTO, 0);
}
END_TEST

START_TEST(test_stress_cor_off)
{
	run_stress("off", "", SIPHON_COR_OFF, 0);
}
END_TEST

START_TEST(test_stress_aborts_cor_on)
{
	run_stress("abort_on", "", SIPHON_COR_ON, 4);
}
END_TEST

START_TEST(test_stress_aborts_cor_off)
{
	run_stress("abort_off", "", SIPHON_COR_OFF, 4);
}
END_TEST

START_TEST(test_stress_subclusters)
{
	run_stress("sub", ",extended_l2=on", SIPHON_COR_AUTO, 2);
}
END_TEST

/* Check one thread's stripes of a crashed image against its log. */
static void check_thread(const uint8_t *img, uint8_t *model, unsigned t,
			 unsigned nthreads, uint64_t sd, unsigned round)
{
	char path[600];
	uint32_t *recs;
	uint8_t *unsure;
	long n = 0, i, last_flush = -1, last_done = -1;
	uint64_t rng = wl_seed(sd, t), a, b, off;
	struct wl_op op;
	FILE *f;

	snprintf(path, sizeof(path), "%s/log.%u", tmpdir, t);
	f = fopen(path, "r");
	ck_assert_ptr_nonnull(f);
	recs = malloc(1 << 24);
	n = (long)fread(recs, sizeof(*recs), (1 << 24) / sizeof(*recs), f);
	fclose(f);
	for (i = 0; i < n; i++) {
		long idx = (long)(recs[i] & ~(1u << 31));

		last_done = idx;
		if (recs[i] >> 31)
			last_flush = idx;
	}
	free(recs);
	unsure = calloc(DISK_SIZE / 512, 1);
	for (i = 0; i <= last_done + 1; i++) {
		wl_next(&rng, t, nthreads, DISK_SIZE, &op);
		if (i <= last_flush) {
			wl_apply(model, &op, CLUSTER);
		} else if (wl_touches(&op, &a, &b)) {
			for (off = a / 512; off < (b + 511) / 512; off++)
				unsure[off] = 1;
		}
	}
	for (off = 0; off < DISK_SIZE; off += 512) {
		if ((off / WL_STRIPE) % nthreads != t || unsure[off / 512])
			continue;
		ck_assert_msg(!memcmp(img + off, model + off, 512),
			      "round %u thread %u: [%llu, +512) lost (last "
			      "flush at op %ld, last done %ld, seed %llu)",
			      round, t, (unsigned long long)off, last_flush,
			      last_done, (unsigned long long)sd);
	}
	free(unsure);
}

START_TEST(test_crash)
{
	const unsigned nthreads = 3, rounds = 5;
	uint64_t rng = seed ^ 0xc0ffee;
	uint8_t *model = malloc(DISK_SIZE), *img = malloc(DISK_SIZE);
	char nt[16], sd[32], raw[600];
	unsigned round, t, tries;

	for (round = 0; round < rounds; round++) {
		const char *top = make_chain("crash", "", model);
		uint64_t rseed = seed + round;
		int status, rc;
		pid_t pid;

		snprintf(nt, sizeof(nt), "%u", nthreads);
		snprintf(sd, sizeof(sd), "%llu", (unsigned long long)rseed);
		pid = fork();
		ck_assert_int_ge(pid, 0);
		if (pid == 0) {
			execl(helper, helper, top, nt, sd, tmpdir,
			      (char *)NULL);
			_exit(127);
		}
		usleep((useconds_t)(200000 + wl_rand(&rng) % 1200000));
		kill(pid, SIGKILL);
		waitpid(pid, &status, 0);
		ck_assert_msg(WIFSIGNALED(status),
			      "helper exited early (status %d)", status);
		/*
		 * The kernel tears a dead process's io_uring down in the
		 * background: until it has, the image's files stay open and
		 * locked (and requests may still be finishing). Wait for the
		 * lock, so that what is checked is the final image.
		 */
		for (tries = 0;; tries++) {
			rc = sh("qemu-img check -q %s/crash.qcow2 "
				">%s/check.out 2>&1",
				tmpdir, tmpdir);
			if (rc != 1 || tries == 100 ||
			    sh("grep -q lock %s/check.out", tmpdir) != 0)
				break;
			usleep(100000);
		}
		if (tries)
			fprintf(stderr,
				"round %u: image locked for %u ms "
				"after the kill\n",
				round, tries * 100);
		ck_assert_msg(rc == 0 || rc == 3, "qemu-img check: %d", rc);
		RUN("qemu-img convert -f qcow2 -O raw %s/crash.qcow2 "
		    "%s/crash.out.raw",
		    tmpdir, tmpdir);
		snprintf(raw, sizeof(raw), "%s/crash.out.raw", tmpdir);
		load(raw, img, DISK_SIZE);
		for (t = 0; t < nthreads; t++) {
			char ref[600];

			snprintf(ref, sizeof(ref), "%s/crash.ref.raw", tmpdir);
			load(ref, model, DISK_SIZE);
			check_thread(img, model, t, nthreads, rseed, round);
		}
	}
	free(model);
	free(img);
}
END_TEST

static Suite *stress_suite(void)
{
	Suite *s = suite_create("guest_stress");
	TCase *tc = tcase_create("stress");

	tcase_set_timeout(tc, 300);
	tcase_add_test(tc, test_stress_cor_auto);
	tcase_add_test(tc, test_stress_cor_off);
	tcase_add_test(tc, test_stress_aborts_cor_on);
	tcase_add_test(tc, test_stress_aborts_cor_off);
	tcase_add_test(tc, test_stress_subclusters);
	suite_add_tcase(s, tc);
	if (helper) {
		tc = tcase_create("crash");
		tcase_set_timeout(tc, 300);
		tcase_add_test(tc, test_crash);
		suite_add_tcase(s, tc);
	}
	return s;
}

int main(int argc, char **argv)
{
	const char *env = getenv("SIPHON_STRESS_SEED");

	seed = env ? strtoull(env, NULL, 0) : 20240611;
	helper = argc > 1 ? argv[1] : getenv("GUEST_CRASH_HELPER");
	fprintf(stderr, "seed %llu (SIPHON_STRESS_SEED)\n",
		(unsigned long long)seed);
	return run_suite(stress_suite(), tmpdir,
			 RUN_URING | RUN_QEMU | RUN_KEEP_FAILED);
}
