/*
 * Unit tests for common/error.h: formatting, the -abs(err) return,
 * truncation at SX_ERROR_MAX, and that each thread keeps its own message.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "common/error.h"

START_TEST(test_empty)
{
	sx_error_clear();
	ck_assert_ptr_nonnull(sx_last_error());
	ck_assert_str_eq(sx_last_error(), "");
	ck_assert_int_eq(sx_last_errno(), 0);
}
END_TEST

START_TEST(test_format_and_return)
{
	ck_assert_int_eq(
		sx_error(-EINVAL, "%s: bad magic 0x%x", "a.qcow2", 0xdead),
		-EINVAL);
	ck_assert_str_eq(sx_last_error(), "a.qcow2: bad magic 0xdead");
	ck_assert_int_eq(sx_last_errno(), EINVAL);
	/* A positive errno comes back negative too. */
	ck_assert_int_eq(sx_error(ENOSPC, "full at %d%%", 100), -ENOSPC);
	ck_assert_str_eq(sx_last_error(), "full at 100%");
	ck_assert_int_eq(sx_last_errno(), ENOSPC);
	/* The last message wins. */
	sx_error(-EIO, "first");
	sx_error(-EROFS, "second");
	ck_assert_str_eq(sx_last_error(), "second");
	ck_assert_int_eq(sx_last_errno(), EROFS);
	sx_error_clear();
	ck_assert_str_eq(sx_last_error(), "");
	ck_assert_int_eq(sx_last_errno(), 0);
}
END_TEST

START_TEST(test_truncation)
{
	char *big = malloc(3 * SX_ERROR_MAX);
	const char *msg;

	ck_assert_ptr_nonnull(big);
	memset(big, 'x', 3 * SX_ERROR_MAX - 1);
	big[3 * SX_ERROR_MAX - 1] = '\0';
	ck_assert_int_eq(sx_error(-E2BIG, "<%s>", big), -E2BIG);
	msg = sx_last_error();
	ck_assert_uint_eq(strlen(msg), SX_ERROR_MAX - 1);
	ck_assert_int_eq(msg[0], '<');
	ck_assert_int_eq(msg[SX_ERROR_MAX - 2], 'x');
	ck_assert_int_eq(sx_last_errno(), E2BIG);

	/* Exactly one byte short of the limit fits whole. */
	big[SX_ERROR_MAX - 1] = '\0';
	sx_error(-EIO, "%s", big);
	ck_assert_uint_eq(strlen(sx_last_error()), SX_ERROR_MAX - 1);
	big[SX_ERROR_MAX - 2] = '\0';
	sx_error(-EIO, "%s!", big);
	ck_assert_uint_eq(strlen(sx_last_error()), SX_ERROR_MAX - 1);
	ck_assert_int_eq(sx_last_error()[SX_ERROR_MAX - 2], '!');
	free(big);
}
END_TEST

struct thread_arg {
	pthread_barrier_t *barrier;
	int err;
	const char *text;
	int ok;
};

static void *thread_main(void *p)
{
	struct thread_arg *a = p;

	/* A new thread starts with no message, whatever main recorded. */
	a->ok = sx_last_error()[0] == '\0' && sx_last_errno() == 0;
	sx_error(a->err, "thread %s", a->text);
	/* Both have recorded before either checks. */
	pthread_barrier_wait(a->barrier);
	a->ok = a->ok && !strcmp(sx_last_error() + 7, a->text) &&
		sx_last_errno() == abs(a->err);
	pthread_barrier_wait(a->barrier);
	return NULL;
}

START_TEST(test_per_thread)
{
	pthread_barrier_t barrier;
	struct thread_arg a = {&barrier, -EIO, "one", 0};
	struct thread_arg b = {&barrier, -ENOENT, "two", 0};
	pthread_t ta, tb;

	sx_error(-EPERM, "main");
	ck_assert_int_eq(pthread_barrier_init(&barrier, NULL, 2), 0);
	ck_assert_int_eq(pthread_create(&ta, NULL, thread_main, &a), 0);
	ck_assert_int_eq(pthread_create(&tb, NULL, thread_main, &b), 0);
	ck_assert_int_eq(pthread_join(ta, NULL), 0);
	ck_assert_int_eq(pthread_join(tb, NULL), 0);
	pthread_barrier_destroy(&barrier);
	ck_assert(a.ok);
	ck_assert(b.ok);
	ck_assert_str_eq(sx_last_error(), "main");
	ck_assert_int_eq(sx_last_errno(), EPERM);
}
END_TEST

static Suite *error_suite(void)
{
	Suite *s = suite_create("error");
	TCase *tc = tcase_create("messages");

	tcase_add_test(tc, test_empty);
	tcase_add_test(tc, test_format_and_return);
	tcase_add_test(tc, test_truncation);
	tcase_add_test(tc, test_per_thread);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return run_suite(error_suite(), NULL, 0);
}
