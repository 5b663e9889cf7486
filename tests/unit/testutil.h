/*
 * Helpers shared by the unit test programs: running a shell command (the
 * qemu-img/qemu-io oracle) and asserting that it succeeded.
 */
#ifndef SIPHON_TESTS_TESTUTIL_H
#define SIPHON_TESTS_TESTUTIL_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
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

/* The command must succeed (Check assertion). */
#define RUN(...) ck_assert_msg(sh(__VA_ARGS__) == 0, "command failed")

#endif
