/*
 * Helpers shared by the unit test programs: running a shell command (the
 * qemu-img/qemu-io oracle) and asserting that it succeeded, probing for what
 * a test needs, and the main() most programs share (run_suite()).
 *
 * A program whose host lacks something it needs (io_uring refused, no
 * qemu-img/qemu-io) exits 77, which meson reports as skipped, never passed.
 *
 * Include it from a .c file that defines _GNU_SOURCE (mkdtemp(), and
 * liburing.h needs AT_FDCWD).
 */
#ifndef SIPHON_TESTS_TESTUTIL_H
#define SIPHON_TESTS_TESTUTIL_H

#include <check.h>
#include <liburing.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

/* Run a printf-formatted shell command; its exit status, 128 if killed. */
static inline int sh(const char *fmt, ...)
	__attribute__((format(printf, 1, 2)));
static inline int sh(const char *fmt, ...)
{
	char cmd[8192];
	va_list ap;
	int rc;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	rc = system(cmd);
	return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

/*
 * The command must succeed (Check assertion, reported at the caller's line
 * with the command that failed).
 */
#define RUN(...)                                                             \
	do {                                                                 \
		char run_cmd_[8192];                                         \
                                                                             \
		snprintf(run_cmd_, sizeof(run_cmd_), __VA_ARGS__);           \
		ck_assert_msg(sh("%s", run_cmd_) == 0, "command failed: %s", \
			      run_cmd_);                                     \
	} while (0)

/*
 * Whether this host lets us set up an io_uring; when not, says so on stderr
 * (the caller skips). Probes with a ring of its own, not siphon's
 * per-thread state, which must not be inherited by the tests' forks.
 */
static inline bool have_uring(void)
{
	struct io_uring ring;
	int ret;

	/* The host may refuse io_uring (sysctl, seccomp): skip, not fail. */
	ret = io_uring_queue_init(4, &ring, 0);
	if (ret < 0) {
		fprintf(stderr, "io_uring unavailable (%s): skipping\n",
			strerror(-ret));
		return false;
	}
	io_uring_queue_exit(&ring);
	return true;
}

/* Whether qemu-img and qemu-io (the oracle) are on PATH; prints nothing. */
static inline bool have_qemu_tools(void)
{
	return sh("qemu-img --version >/dev/null 2>&1 && "
		  "qemu-io --version >/dev/null 2>&1") == 0;
}

/*
 * Run every test of s, printing Check's summary (CK_VERBOSITY); returns how
 * many failed. Takes s (Check frees it with its runner).
 */
static inline int run_checks(Suite *s)
{
	SRunner *sr = srunner_create(s);
	int failed;

	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed;
}

/* What run_suite() checks before running, and what it keeps after. */
enum run_flags {
	RUN_URING = 1 << 0, /* skip (77) when io_uring is refused */
	RUN_QEMU = 1 << 1, /* skip (77) without qemu-img and qemu-io */
	RUN_KEEP_FAILED = 1 << 2, /* keep tmpdir when a test failed */
};

/*
 * The main() of a unit test program. First what flags asks for: without
 * it, say why on stderr and return 77. Then, when tmpdir is not NULL (a
 * mkdtemp() template in the program's own buffer, which its tests build
 * paths from), create that directory; run s (run_checks()); remove the
 * directory with everything in it, unless RUN_KEEP_FAILED and a test failed
 * (then its name is printed, for a post-mortem).
 *
 * Returns the exit code: 0 every test passed, 1 one failed or the directory
 * could not be made, 77 skipped. Takes s, whether it runs or not.
 */
static inline int run_suite(Suite *s, char *tmpdir, unsigned flags)
{
	int ret = 77;

	if ((flags & RUN_URING) && !have_uring())
		goto out;
	if ((flags & RUN_QEMU) && !have_qemu_tools()) {
		fprintf(stderr, "qemu-img/qemu-io missing: skipping\n");
		goto out;
	}
	ret = 1;
	if (tmpdir && !mkdtemp(tmpdir)) {
		perror("mkdtemp");
		goto out;
	}
	ret = run_checks(s) ? 1 : 0;
	s = NULL;
	if (!tmpdir)
		goto out;
	if (ret && (flags & RUN_KEEP_FAILED))
		fprintf(stderr, "images kept in %s\n", tmpdir);
	else if (sh("rm -rf '%s'", tmpdir) != 0)
		fprintf(stderr, "could not remove %s\n", tmpdir);
out:
	/* Not run: Check frees a suite only through a runner. */
	if (s)
		srunner_free(srunner_create(s));
	return ret;
}

/*
 * dir/name in one of four rotating static buffers, so a call can take a
 * few paths at once (a test's temp dir and an image name in it).
 */
static inline const char *dir_path(const char *dir, const char *name)
{
	static char buf[4][512];
	static int i;

	i = (i + 1) % 4;
	snprintf(buf[i], sizeof(buf[i]), "%s/%s", dir, name);
	return buf[i];
}

#endif
