/*
 * Unit tests for common/checked.h: every helper at the edges where wrapping
 * would turn a hostile number into a small, valid-looking one, and *out left
 * untouched on failure.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "testutil.h"
#include "common/checked.h"

#define SENTINEL 0x5a5a5a5a5a5a5a5aULL

START_TEST(test_add)
{
	uint64_t r = SENTINEL;

	ck_assert_int_eq(sx_add(1, 2, &r), 0);
	ck_assert_uint_eq(r, 3);
	ck_assert_int_eq(sx_add(UINT64_MAX - 1, 1, &r), 0);
	ck_assert_uint_eq(r, UINT64_MAX);
	ck_assert_int_eq(sx_add(0, UINT64_MAX, &r), 0);
	ck_assert_uint_eq(r, UINT64_MAX);
	r = SENTINEL;
	ck_assert_int_eq(sx_add(UINT64_MAX, 1, &r), -EOVERFLOW);
	ck_assert_int_eq(sx_add(1, UINT64_MAX, &r), -EOVERFLOW);
	ck_assert_int_eq(sx_add(UINT64_MAX, UINT64_MAX, &r), -EOVERFLOW);
	ck_assert_int_eq(sx_add(1ULL << 63, 1ULL << 63, &r), -EOVERFLOW);
	ck_assert_uint_eq(r, SENTINEL);
}
END_TEST

START_TEST(test_mul)
{
	uint64_t r = SENTINEL;

	ck_assert_int_eq(sx_mul(0, UINT64_MAX, &r), 0);
	ck_assert_uint_eq(r, 0);
	ck_assert_int_eq(sx_mul(1ULL << 32, (1ULL << 32) - 1, &r), 0);
	ck_assert_uint_eq(r, (1ULL << 63) * 2 - (1ULL << 32));
	ck_assert_int_eq(sx_mul(UINT64_MAX, 1, &r), 0);
	ck_assert_uint_eq(r, UINT64_MAX);
	r = SENTINEL;
	ck_assert_int_eq(sx_mul(1ULL << 32, 1ULL << 32, &r), -EOVERFLOW);
	ck_assert_int_eq(sx_mul(UINT64_MAX, 2, &r), -EOVERFLOW);
	ck_assert_int_eq(sx_mul(3, (UINT64_MAX / 3) + 1, &r), -EOVERFLOW);
	ck_assert_uint_eq(r, SENTINEL);
}
END_TEST

START_TEST(test_pow2_aligned)
{
	ck_assert(!sx_is_pow2(0));
	ck_assert(sx_is_pow2(1));
	ck_assert(sx_is_pow2(4096));
	ck_assert(sx_is_pow2(1ULL << 63));
	ck_assert(!sx_is_pow2(3));
	ck_assert(!sx_is_pow2(UINT64_MAX));
	ck_assert(!sx_is_pow2((1ULL << 63) + 1));

	ck_assert(sx_is_aligned(0, 512));
	ck_assert(sx_is_aligned(4096, 512));
	ck_assert(!sx_is_aligned(4097, 512));
	ck_assert(sx_is_aligned(UINT64_MAX, 1));
	ck_assert(!sx_is_aligned(UINT64_MAX, 2));
	ck_assert(sx_is_aligned(1ULL << 63, 1ULL << 63));
}
END_TEST

START_TEST(test_align_down)
{
	ck_assert_uint_eq(sx_align_down(0, 4096), 0);
	ck_assert_uint_eq(sx_align_down(4095, 4096), 0);
	ck_assert_uint_eq(sx_align_down(4096, 4096), 4096);
	ck_assert_uint_eq(sx_align_down(8191, 4096), 4096);
	ck_assert_uint_eq(sx_align_down(UINT64_MAX, 4096), UINT64_MAX - 4095);
	ck_assert_uint_eq(sx_align_down(UINT64_MAX, 1), UINT64_MAX);
	ck_assert_uint_eq(sx_align_down(UINT64_MAX, 1ULL << 63), 1ULL << 63);
}
END_TEST

START_TEST(test_align_up)
{
	uint64_t r = SENTINEL;

	ck_assert_int_eq(sx_align_up(0, 4096, &r), 0);
	ck_assert_uint_eq(r, 0);
	ck_assert_int_eq(sx_align_up(1, 4096, &r), 0);
	ck_assert_uint_eq(r, 4096);
	ck_assert_int_eq(sx_align_up(4096, 4096, &r), 0);
	ck_assert_uint_eq(r, 4096);
	ck_assert_int_eq(sx_align_up(UINT64_MAX, 1, &r), 0);
	ck_assert_uint_eq(r, UINT64_MAX);
	/* The last aligned value is reachable; one past it is not. */
	ck_assert_int_eq(sx_align_up(UINT64_MAX - 4095, 4096, &r), 0);
	ck_assert_uint_eq(r, UINT64_MAX - 4095);
	ck_assert_int_eq(sx_align_up(1ULL << 63, 1ULL << 63, &r), 0);
	ck_assert_uint_eq(r, 1ULL << 63);
	r = SENTINEL;
	ck_assert_int_eq(sx_align_up(UINT64_MAX - 4094, 4096, &r), -EOVERFLOW);
	ck_assert_int_eq(sx_align_up(UINT64_MAX, 4096, &r), -EOVERFLOW);
	ck_assert_int_eq(sx_align_up(UINT64_MAX, 2, &r), -EOVERFLOW);
	ck_assert_int_eq(sx_align_up((1ULL << 63) + 1, 1ULL << 63, &r),
			 -EOVERFLOW);
	ck_assert_int_eq(sx_align_up(5, 0, &r), -EINVAL);
	ck_assert_int_eq(sx_align_up(5, 3, &r), -EINVAL);
	ck_assert_int_eq(sx_align_up(5, UINT64_MAX, &r), -EINVAL);
	ck_assert_uint_eq(r, SENTINEL);
}
END_TEST

START_TEST(test_div_round_up)
{
	uint64_t r = SENTINEL;

	ck_assert_int_eq(sx_div_round_up(0, 7, &r), 0);
	ck_assert_uint_eq(r, 0);
	ck_assert_int_eq(sx_div_round_up(1, 7, &r), 0);
	ck_assert_uint_eq(r, 1);
	ck_assert_int_eq(sx_div_round_up(14, 7, &r), 0);
	ck_assert_uint_eq(r, 2);
	ck_assert_int_eq(sx_div_round_up(15, 7, &r), 0);
	ck_assert_uint_eq(r, 3);
	/* No a + b - 1 overflow at the top of the range. */
	ck_assert_int_eq(sx_div_round_up(UINT64_MAX, 2, &r), 0);
	ck_assert_uint_eq(r, 1ULL << 63);
	ck_assert_int_eq(sx_div_round_up(UINT64_MAX, UINT64_MAX, &r), 0);
	ck_assert_uint_eq(r, 1);
	ck_assert_int_eq(sx_div_round_up(UINT64_MAX, 1, &r), 0);
	ck_assert_uint_eq(r, UINT64_MAX);
	ck_assert_int_eq(sx_div_round_up(1, UINT64_MAX, &r), 0);
	ck_assert_uint_eq(r, 1);
	r = SENTINEL;
	ck_assert_int_eq(sx_div_round_up(5, 0, &r), -EINVAL);
	ck_assert_uint_eq(r, SENTINEL);
}
END_TEST

START_TEST(test_range_within)
{
	ck_assert(sx_range_within(0, 0, 0));
	ck_assert(sx_range_within(0, 10, 10));
	ck_assert(sx_range_within(10, 0, 10));
	ck_assert(sx_range_within(5, 5, 10));
	ck_assert(!sx_range_within(5, 6, 10));
	ck_assert(!sx_range_within(11, 0, 10));
	ck_assert(!sx_range_within(0, 11, 10));
	/* off + len would wrap to something small. */
	ck_assert(!sx_range_within(UINT64_MAX, 2, 10));
	ck_assert(!sx_range_within(2, UINT64_MAX, 10));
	ck_assert(!sx_range_within(1, UINT64_MAX, UINT64_MAX));
	ck_assert(sx_range_within(0, UINT64_MAX, UINT64_MAX));
	ck_assert(sx_range_within(UINT64_MAX, 0, UINT64_MAX));
	ck_assert(sx_range_within(UINT64_MAX - 1, 1, UINT64_MAX));
}
END_TEST

START_TEST(test_min_max)
{
	ck_assert_uint_eq(sx_min(0, UINT64_MAX), 0);
	ck_assert_uint_eq(sx_min(UINT64_MAX, 3), 3);
	ck_assert_uint_eq(sx_max(0, UINT64_MAX), UINT64_MAX);
	ck_assert_uint_eq(sx_max(7, 7), 7);
}
END_TEST

static Suite *checked_suite(void)
{
	Suite *s = suite_create("checked");
	TCase *tc = tcase_create("arith");

	tcase_add_test(tc, test_add);
	tcase_add_test(tc, test_mul);
	tcase_add_test(tc, test_pow2_aligned);
	tcase_add_test(tc, test_align_down);
	tcase_add_test(tc, test_align_up);
	tcase_add_test(tc, test_div_round_up);
	tcase_add_test(tc, test_range_within);
	tcase_add_test(tc, test_min_max);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return run_suite(checked_suite(), NULL, 0);
}
