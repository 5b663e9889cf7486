/*
 * A program written only against the proposal's header
 * (api/virdomain_stream.h), as code written for the proposal would be: the
 * incremental loop `while (cur != end) virDomainBlockStream(...)` and a
 * CONTINUOUS stream polled with virDomainGetBlockStreamInfo and aborted with
 * virDomainBlockStreamAbort. Only the domain and the disk come from siphon
 * (the proposal has no calls for them). Linked against the public library.
 *
 * Images come from qemu-img/qemu-io; results are checked with `qemu-img
 * compare` against a raw copy of the chain and with `qemu-img check`.
 * Exits 77 when qemu-img or io_uring is unavailable, or when the qcow2
 * driver cannot be streamed into yet (the error says so).
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"
#include "virdomain_stream.h"

static char tmpdir[] = "/tmp/siphon-test-virdomain-XXXXXX";

/* name.base.raw (data) <- name.qcow2; name.ref.raw: what the chain reads. */
static int make_disk(const char *name, unsigned mib, char *top, size_t len)
{
	snprintf(top, len, "%s/%s.qcow2", tmpdir, name);
	return sh("cd %s && qemu-img create -q -f raw %s.base.raw %uM && "
		  "qemu-io -f raw -c 'write -P 0x61 0 %uM' %s.base.raw "
		  ">/dev/null && qemu-img create -q -f qcow2 -b %s.base.raw "
		  "-F raw %s.qcow2 && qemu-io -f qcow2 -c 'write -P 0x62 "
		  "64k 64k' %s.qcow2 >/dev/null && qemu-img convert -f qcow2 "
		  "-O raw %s.qcow2 %s.ref.raw",
		  tmpdir, name, mib, mib - 1, name, name, name, name, name,
		  name);
}

static int compare_check(const char *name)
{
	if (sh("qemu-img check -q %s/%s.qcow2", tmpdir, name))
		return -1;
	return sh("qemu-img compare -q -f qcow2 -F raw %s/%s.qcow2 "
		  "%s/%s.ref.raw",
		  tmpdir, name, tmpdir, name);
}

/* The stream of path in the info list: 1 and *out, 0 if not listed. */
static int find_info(virDomainPtr dom, const char *path,
		     virDomainBlockStreamInfo *out)
{
	virDomainBlockStreamInfo info[4];
	int n, i;

	n = virDomainGetBlockStreamInfo(dom, info, 4, 0);
	ck_assert_msg(n >= 0, "info: %s", strerror(errno));
	for (i = 0; i < n; i++) {
		if (!strcmp(info[i].path, path)) {
			*out = info[i];
			return 1;
		}
	}
	return 0;
}

static virDomainPtr open_domain(const char *path)
{
	siphon_domain *dom = NULL;

	ck_assert_int_eq(siphon_domain_create(NULL, &dom), 0);
	ck_assert_msg(siphon_disk_attach(dom, path, NULL) == 0, "attach: %s",
		      siphon_get_error());
	return dom;
}

START_TEST(test_incremental_loop)
{
	char path[512];
	virDomainPtr dom;
	virDomainBlockStreamInfo info;
	virDomainBlockStreamCursor cur = 0, end;
	unsigned calls = 0;

	ck_assert_int_eq(make_disk("loop", 16, path, sizeof(path)), 0);
	dom = open_domain(path);

	/* The opening call: then info knows the end. */
	ck_assert_msg(virDomainBlockStream(dom, path, &cur, 0) == 0, "%s",
		      siphon_get_error());
	ck_assert_int_eq(find_info(dom, path, &info), 1);
	end = info.end;
	ck_assert(info.cur == cur);

	while (cur != end) {
		ck_assert_msg(virDomainBlockStream(dom, path, &cur, 0) == 0,
			      "%s", siphon_get_error());
		ck_assert(cur <= end);
		calls++;
	}
	ck_assert_uint_gt(calls, 0);
	ck_assert_int_eq(find_info(dom, path, &info), 0);
	/* Abort with nothing running: -1 and errno. */
	ck_assert_int_eq(virDomainBlockStreamAbort(dom, path, 0), -1);
	ck_assert_int_eq(errno, ESRCH);
	siphon_domain_close(dom);
	ck_assert_int_eq(compare_check("loop"), 0);
	ck_assert_int_ne(sh("qemu-img info --output=json %s | grep -q "
			    "backing-filename",
			    path),
			 0);
}
END_TEST

START_TEST(test_continuous_poll_abort)
{
	char path[512];
	virDomainPtr dom;
	virDomainBlockStreamInfo info;
	virDomainBlockStreamCursor cur = 0;
	struct timespec ts = {0, 20000000};
	int polls = 0, r;

	ck_assert_int_eq(make_disk("cont", 64, path, sizeof(path)), 0);
	dom = open_domain(path);
	/* Slow it down through siphon so the abort finds it running. */
	ck_assert_int_eq(
		virDomainBlockStream(dom, path, NULL,
				     VIR_DOMAIN_BLOCK_STREAM_CONTINUOUS),
		0);
	ck_assert_int_eq(siphon_block_stream_set_speed(dom, path, 4 << 20, 0),
			 0);
	ck_assert_int_eq(
		virDomainBlockStream(dom, path, &cur,
				     VIR_DOMAIN_BLOCK_STREAM_CONTINUOUS),
		-1);
	ck_assert_int_eq(errno, EBUSY);
	ck_assert_int_eq(virDomainBlockStream(dom, path, &cur, 0), -1);
	ck_assert_int_eq(errno, EBUSY);
	/* Poll progress a few times, then abort. */
	while (polls < 5) {
		r = find_info(dom, path, &info);
		ck_assert_int_eq(r, 1);
		ck_assert(info.cur <= info.end);
		polls++;
		nanosleep(&ts, NULL);
	}
	ck_assert_int_eq(virDomainBlockStreamAbort(dom, path, 0), 0);
	ck_assert_int_eq(find_info(dom, path, &info), 0);
	ck_assert_int_eq(virDomainGetBlockStreamInfo(dom, &info, 1, 0), 0);
	/* Bad arguments: -1 with errno. */
	ck_assert_int_eq(virDomainBlockStream(dom, "relative", &cur, 0), -1);
	ck_assert_int_eq(errno, EINVAL);
	ck_assert_int_eq(virDomainGetBlockStreamInfo(dom, NULL, 1, 0), -1);
	ck_assert_int_eq(errno, EINVAL);
	siphon_domain_close(dom);
	/* Consistent after the abort, still reading the chain's data. */
	ck_assert_int_eq(compare_check("cont"), 0);

	/* Restart CONTINUOUS, poll until it leaves the list: done. */
	dom = open_domain(path);
	ck_assert_int_eq(
		virDomainBlockStream(dom, path, NULL,
				     VIR_DOMAIN_BLOCK_STREAM_CONTINUOUS),
		0);
	for (polls = 0; find_info(dom, path, &info) && polls < 6000; polls++)
		nanosleep(&ts, NULL);
	ck_assert_int_eq(find_info(dom, path, &info), 0);
	siphon_domain_close(dom);
	ck_assert_int_eq(compare_check("cont"), 0);
	ck_assert_int_ne(sh("qemu-img info --output=json %s | grep -q "
			    "backing-filename",
			    path),
			 0);
}
END_TEST

/* True when a stream can run here; false with the reason on stderr. */
static bool can_stream(int *skip)
{
	char path[512];
	siphon_domain *dom = NULL;
	virDomainBlockStreamCursor cur = 0;
	int ret;

	*skip = 0;
	if (!have_qemu_tools()) {
		fprintf(stderr, "qemu-img/qemu-io missing: skipping\n");
		*skip = 1;
		return false;
	}
	if (make_disk("probe", 2, path, sizeof(path)) ||
	    siphon_domain_create(NULL, &dom) < 0)
		return false;
	ret = siphon_disk_attach(dom, path, NULL);
	if (ret == 0 && virDomainBlockStream(dom, path, &cur, 0) < 0)
		ret = -errno;
	if (ret < 0) {
		fprintf(stderr, "probe: %s\n", siphon_get_error());
		/* io_uring refused, or qcow2 has no write path yet. */
		*skip = strstr(siphon_get_error(), "io_uring") ||
			strstr(siphon_get_error(), "cannot be streamed into");
	}
	siphon_domain_close(dom);
	return ret == 0;
}

int main(void)
{
	Suite *s;
	TCase *tc;
	int failed, skip;
	pid_t pid;
	int st;

	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	/* Probe in a child: siphon's per-thread rings must not be forked. */
	pid = fork();
	if (pid == 0) {
		bool ok = can_stream(&skip);

		_exit(ok ? 0 : skip ? 77 : 1);
	}
	waitpid(pid, &st, 0);
	if (!WIFEXITED(st) || WEXITSTATUS(st)) {
		sh("rm -rf %s", tmpdir);
		return WIFEXITED(st) && WEXITSTATUS(st) == 77 ? 77 : 1;
	}

	s = suite_create("virdomain");
	tc = tcase_create("proposal");
	tcase_set_timeout(tc, 180);
	tcase_add_test(tc, test_incremental_loop);
	tcase_add_test(tc, test_continuous_poll_abort);
	suite_add_tcase(s, tc);
	failed = run_checks(s);
	sh("rm -rf %s", tmpdir);
	return failed ? 1 : 0;
}
