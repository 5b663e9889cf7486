/*
 * The shared extent buffer pool (engine/extent_pool.c) on its own: no I/O,
 * no threads, no clock. Each test names the rule of extent_pool.h it checks:
 * the budget, waiters served in turn, the per-user share, and nothing lost
 * when a user leaves with buffers out (ASan reports a leak otherwise).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/extent_pool.h"
#include "testutil.h"

#define MIB (1024u * 1024)

static struct extent_pool_stats stats(const struct extent_pool *p)
{
	struct extent_pool_stats st;

	extent_pool_get_stats(p, &st);
	return st;
}

/* Bytes made never pass the budget, whatever the order of gets and puts. */
START_TEST(test_budget)
{
	struct extent_pool *p;
	struct extent_pool_user *u[3];
	void *held[3][8] = {{0}};
	unsigned n[3] = {0}, i, k, step;
	struct extent_pool_stats st;
	uint32_t x = 12345;
	int ret;

	ck_assert_int_eq(extent_pool_create(4 * MIB, &p), 0);
	for (i = 0; i < 3; i++)
		ck_assert_int_eq(extent_pool_join(p, &u[i]), 0);
	for (step = 0; step < 2000; step++) {
		x = x * 1103515245u + 12345u;
		i = (x >> 8) % 3;
		if ((x >> 16) % 2 && n[i] < 8) {
			ret = extent_pool_get(u[i], MIB, &held[i][n[i]]);
			ck_assert(ret == 0 || ret == -EAGAIN);
			if (ret == 0) {
				/* The buffer is usable, all of it. */
				memset(held[i][n[i]], (int)i, MIB);
				n[i]++;
			}
		} else if (n[i]) {
			n[i]--;
			extent_pool_put(u[i], held[i][n[i]], MIB);
			extent_pool_unwait(u[i]);
		}
		st = stats(p);
		ck_assert_uint_le(st.out, 4 * MIB);
		ck_assert_uint_eq(st.out, (uint64_t)(n[0] + n[1] + n[2]) * MIB);
	}
	ck_assert_uint_le(stats(p).peak, 4 * MIB);
	for (i = 0; i < 3; i++) {
		for (k = 0; k < n[i]; k++)
			extent_pool_put(u[i], held[i][k], MIB);
		extent_pool_leave(u[i]);
	}
	st = stats(p);
	ck_assert_uint_eq(st.out, 0);
	/* No user left: the arena is unmapped. */
	ck_assert_uint_eq(st.arena, 0);
	ck_assert_uint_eq(st.users, 0);
	extent_pool_destroy(p);
}
END_TEST

/* Buffers that come back go to the oldest waiter first. */
START_TEST(test_waiters_in_turn)
{
	struct extent_pool *p;
	struct extent_pool_user *a, *b, *c;
	void *a1, *a2, *b1, *c1, *x;

	ck_assert_int_eq(extent_pool_create(2 * MIB, &p), 0);
	ck_assert_int_eq(extent_pool_join(p, &a), 0);
	ck_assert_int_eq(extent_pool_join(p, &b), 0);
	ck_assert_int_eq(extent_pool_join(p, &c), 0);
	/* Nobody else wants any: a may take the whole budget. */
	ck_assert_int_eq(extent_pool_get(a, MIB, &a1), 0);
	ck_assert_int_eq(extent_pool_get(a, MIB, &a2), 0);
	/* b then c are refused and queue in that order. */
	ck_assert_int_eq(extent_pool_get(b, MIB, &x), -EAGAIN);
	ck_assert_int_eq(extent_pool_get(c, MIB, &x), -EAGAIN);
	ck_assert_uint_eq(stats(p).waiting, 2);

	/* One comes back: c asks first, but b is ahead of it. */
	extent_pool_put(a, a1, MIB);
	ck_assert_int_eq(extent_pool_get(c, MIB, &x), -EAGAIN);
	ck_assert_int_eq(extent_pool_get(b, MIB, &b1), 0);
	ck_assert_uint_eq(stats(p).waiting, 1);

	/* The next one is c's, even before a that gave it back. */
	extent_pool_put(a, a2, MIB);
	ck_assert_int_eq(extent_pool_get(a, MIB, &x), -EAGAIN);
	ck_assert_int_eq(extent_pool_get(c, MIB, &c1), 0);
	ck_assert_uint_eq(extent_pool_user_grants(a), 2);
	ck_assert_uint_eq(extent_pool_user_grants(b), 1);
	ck_assert_uint_eq(extent_pool_user_grants(c), 1);

	/* a waits; it leaves the queue when it stops wanting. */
	ck_assert_uint_eq(stats(p).waiting, 1);
	extent_pool_unwait(a);
	ck_assert_uint_eq(stats(p).waiting, 0);

	extent_pool_put(b, b1, MIB);
	extent_pool_put(c, c1, MIB);
	extent_pool_leave(a);
	extent_pool_leave(b);
	extent_pool_leave(c);
	extent_pool_destroy(p);
}
END_TEST

/*
 * While another holds or waits, a user holding buffers gets at most its
 * share (budget / users holding or waiting); one holding none is never
 * refused for its share; one alone may take the whole budget.
 */
START_TEST(test_share)
{
	struct extent_pool *p;
	struct extent_pool_user *a, *b;
	void *ab[8], *bb[8], *x;
	unsigned i, na = 0, nb = 0;

	ck_assert_int_eq(extent_pool_create(8 * MIB, &p), 0);
	ck_assert_int_eq(extent_pool_join(p, &a), 0);
	ck_assert_int_eq(extent_pool_join(p, &b), 0);
	for (; na < 6; na++)
		ck_assert_int_eq(extent_pool_get(a, MIB, &ab[na]), 0);
	/* b takes what is left, then waits: a is over its share of 4. */
	for (; nb < 2; nb++)
		ck_assert_int_eq(extent_pool_get(b, MIB, &bb[nb]), 0);
	ck_assert_int_eq(extent_pool_get(b, MIB, &x), -EAGAIN);
	/* a gives back two; b waits, and a is over its share of 4. */
	extent_pool_put(a, ab[--na], MIB);
	extent_pool_put(a, ab[--na], MIB);
	ck_assert_int_eq(extent_pool_get(a, MIB, &x), -EAGAIN);
	for (; nb < 4; nb++)
		ck_assert_int_eq(extent_pool_get(b, MIB, &bb[nb]), 0);
	/* Each holds its share of 4; b waits for more. */
	ck_assert_uint_eq(extent_pool_user_held(a), 4 * MIB);
	ck_assert_uint_eq(extent_pool_user_held(b), 4 * MIB);
	ck_assert_int_eq(extent_pool_get(b, MIB, &x), -EAGAIN);
	/* a holds 3 and b 4: b is still over its share of 4. */
	extent_pool_put(a, ab[--na], MIB);
	ck_assert_int_eq(extent_pool_get(b, MIB, &x), -EAGAIN);
	/* Once a holds nothing b is alone: the whole budget is its. */
	for (i = 0; i < na; i++)
		extent_pool_put(a, ab[i], MIB);
	for (; nb < 8; nb++)
		ck_assert_int_eq(extent_pool_get(b, MIB, &bb[nb]), 0);
	for (i = 0; i < nb; i++)
		extent_pool_put(b, bb[i], MIB);
	extent_pool_leave(a);
	extent_pool_leave(b);
	extent_pool_destroy(p);
}
END_TEST

/* A user that leaves with buffers out stays accounted until they return. */
START_TEST(test_leave_with_buffers_out)
{
	struct extent_pool *p;
	struct extent_pool_user *a, *b;
	void *a1, *a2, *b1, *x;
	struct extent_pool_stats st;

	ck_assert_int_eq(extent_pool_create(3 * MIB, &p), 0);
	ck_assert_int_eq(extent_pool_join(p, &a), 0);
	ck_assert_int_eq(extent_pool_join(p, &b), 0);
	ck_assert_int_eq(extent_pool_get(a, MIB, &a1), 0);
	ck_assert_int_eq(extent_pool_get(a, MIB, &a2), 0);
	ck_assert_int_eq(extent_pool_get(b, MIB, &b1), 0);
	ck_assert_int_eq(extent_pool_get(b, MIB, &x), -EAGAIN);
	/* a leaves (a stream destroyed) with both buffers out. */
	extent_pool_leave(a);
	st = stats(p);
	ck_assert_uint_eq(st.users, 1);
	ck_assert_uint_eq(st.out, 3 * MIB);
	ck_assert_int_eq(extent_pool_get(b, MIB, &x), -EAGAIN);
	/* They come back later: the budget is whole again. */
	extent_pool_put(a, a1, MIB);
	ck_assert_int_eq(extent_pool_get(b, MIB, &x), 0);
	extent_pool_put(a, a2, MIB);
	st = stats(p);
	ck_assert_uint_eq(st.out, 2 * MIB);
	extent_pool_put(b, x, MIB);
	extent_pool_put(b, b1, MIB);
	extent_pool_leave(b);
	st = stats(p);
	ck_assert_uint_eq(st.out, 0);
	ck_assert_uint_eq(st.arena, 0);
	extent_pool_destroy(p);
}
END_TEST

/*
 * A request larger than the whole budget goes alone, so a tiny budget
 * never blocks a stream for good; buffers of one size come back as room
 * for another.
 */
START_TEST(test_oversized_and_sizes)
{
	struct extent_pool *p;
	struct extent_pool_user *a, *b;
	void *big, *s1, *s2, *x;
	struct extent_pool_stats st;

	ck_assert_int_eq(extent_pool_create(2 * MIB, &p), 0);
	ck_assert_int_eq(extent_pool_join(p, &a), 0);
	ck_assert_int_eq(extent_pool_join(p, &b), 0);
	ck_assert_int_eq(extent_pool_get(a, MIB, &s1), 0);
	/* Not while something is out. */
	ck_assert_int_eq(extent_pool_get(b, 4 * MIB, &x), -EAGAIN);
	/* Nor for someone behind b, once it is all back. */
	extent_pool_put(a, s1, MIB);
	ck_assert_int_eq(extent_pool_get(a, MIB, &x), -EAGAIN);
	ck_assert_int_eq(extent_pool_get(b, 4 * MIB, &big), 0);
	/* The budget holds again once it is back. */
	extent_pool_put(b, big, 4 * MIB);
	st = stats(p);
	ck_assert_uint_eq(st.out, 0);
	/* Sizes: a 2 MiB buffer back makes room for two of 1 MiB. */
	ck_assert_int_eq(extent_pool_get(a, 2 * MIB, &s1), 0);
	extent_pool_put(a, s1, 2 * MIB);
	ck_assert_int_eq(extent_pool_get(a, MIB, &s1), 0);
	ck_assert_int_eq(extent_pool_get(a, MIB, &s2), 0);
	st = stats(p);
	ck_assert_uint_eq(st.out, 2 * MIB);
	ck_assert_uint_eq(st.mapped, 1); /* the 4 MiB one only */
	extent_pool_put(a, s1, MIB);
	extent_pool_put(a, s2, MIB);
	extent_pool_leave(a);
	extent_pool_leave(b);
	extent_pool_destroy(p);
}
END_TEST

/*
 * Where buffers come from: the arena, whatever their sizes, without
 * overlapping; a buffer it cannot place (fragmented, or a lone one over
 * the budget) still granted, from a mapping of its own; the arena gone
 * once the pool is idle.
 */
START_TEST(test_arena)
{
	static const size_t sz[] = {MIB,  256 * 1024, 512 * 1024, 2 * MIB,
				    4096, 64 * 1024,  3 * MIB / 2};
	enum { N = sizeof(sz) / sizeof(sz[0]) };
	struct extent_pool *p;
	struct extent_pool_user *a;
	void *b[N], *big, *x, *y;
	struct extent_pool_stats st;
	size_t i, k;

	ck_assert_int_eq(extent_pool_create(8 * MIB, &p), 0);
	ck_assert_uint_eq(stats(p).arena, 0); /* mapped at the first buffer */
	ck_assert_int_eq(extent_pool_join(p, &a), 0);
	for (i = 0; i < N; i++) {
		ck_assert_int_eq(extent_pool_get(a, sz[i], &b[i]), 0);
		ck_assert_uint_eq((uintptr_t)b[i] % 4096, 0);
		memset(b[i], (int)i + 1, sz[i]);
	}
	st = stats(p);
	ck_assert_uint_eq(st.arena, 8 * MIB);
	ck_assert_uint_eq(st.mapped, 0);
	/* No buffer wrote over another. */
	for (i = 0; i < N; i++)
		for (k = 0; k < sz[i]; k += 512)
			ck_assert_int_eq(((unsigned char *)b[i])[k],
					 (int)i + 1);
	for (i = 0; i < N; i++)
		extent_pool_put(a, b[i], sz[i]);

	/*
	 * Fragmented: four 2 MiB buffers fill it; two that are not
	 * neighbours come back, which leaves 4 MiB free but no 4 MiB run.
	 */
	for (i = 0; i < 4; i++)
		ck_assert_int_eq(extent_pool_get(a, 2 * MIB, &b[i]), 0);
	ck_assert_uint_eq(stats(p).mapped, 0);
	extent_pool_put(a, b[0], 2 * MIB);
	extent_pool_put(a, b[2], 2 * MIB);
	ck_assert_int_eq(extent_pool_get(a, 4 * MIB, &big), 0);
	memset(big, 0x5a, 4 * MIB);
	st = stats(p);
	ck_assert_uint_eq(st.mapped, 1);
	ck_assert_uint_eq(st.out, 8 * MIB);
	/* Back: its own mapping goes, the others to the arena. */
	extent_pool_put(a, big, 4 * MIB);
	extent_pool_put(a, b[1], 2 * MIB);
	extent_pool_put(a, b[3], 2 * MIB);
	/* Now the arena holds it. */
	ck_assert_int_eq(extent_pool_get(a, 4 * MIB, &x), 0);
	ck_assert_uint_eq(stats(p).mapped, 1);
	extent_pool_put(a, x, 4 * MIB);
	/* A lone request over the budget: a mapping of its own. */
	ck_assert_int_eq(extent_pool_get(a, 9 * MIB, &y), 0);
	memset(y, 1, 9 * MIB);
	ck_assert_uint_eq(stats(p).mapped, 2);
	extent_pool_put(a, y, 9 * MIB);
	extent_pool_leave(a);
	st = stats(p);
	ck_assert_uint_eq(st.arena, 0);
	ck_assert_uint_eq(st.out, 0);
	extent_pool_destroy(p);
}
END_TEST

/* The line of /proc/self/smaps's entry for the mapping holding addr. */
static bool smaps_field(const void *addr, const char *field, long *val)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[256];
	bool in = false, found = false;
	size_t flen = strlen(field);

	if (!f)
		return false;
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;

		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 &&
		    strchr(line, '-') < strchr(line, ' ')) {
			in = (uintptr_t)addr >= lo && (uintptr_t)addr < hi;
			continue;
		}
		if (in && !strncmp(line, field, flen) && line[flen] == ':') {
			*val = strtol(line + flen + 1, NULL, 10);
			found = true;
			break;
		}
	}
	fclose(f);
	return found;
}

/* Whether the kernel gives transparent huge pages to madvised memory. */
static bool thp_offered(void)
{
	FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
	char line[128] = "";
	bool ok;

	if (!f)
		return false;
	ok = fgets(line, sizeof(line), f) && !strstr(line, "[never]");
	fclose(f);
	return ok;
}

/*
 * The arena may have huge pages (physically contiguous buffers, which is
 * what makes a large extent one large device request): the kernel says
 * its mapping is eligible. Where it offers none, there is nothing to
 * check and the test says so.
 */
START_TEST(test_arena_huge_pages)
{
	struct extent_pool *p;
	struct extent_pool_user *a;
	void *b;
	long eligible = -1;

	ck_assert_int_eq(extent_pool_create(8 * MIB, &p), 0);
	ck_assert_int_eq(extent_pool_join(p, &a), 0);
	ck_assert_int_eq(extent_pool_get(a, 4 * MIB, &b), 0);
	memset(b, 1, 4 * MIB);
	if (!thp_offered() || !smaps_field(b, "THPeligible", &eligible))
		fprintf(stderr, "no transparent huge pages here: "
				"eligibility not checked\n");
	else
		ck_assert_int_eq(eligible, 1);
	extent_pool_put(a, b, 4 * MIB);
	extent_pool_leave(a);
	extent_pool_destroy(p);
}
END_TEST

static Suite *extent_pool_suite(void)
{
	Suite *s = suite_create("extent_pool");
	TCase *tc = tcase_create("contract");

	tcase_add_test(tc, test_budget);
	tcase_add_test(tc, test_waiters_in_turn);
	tcase_add_test(tc, test_share);
	tcase_add_test(tc, test_leave_with_buffers_out);
	tcase_add_test(tc, test_oversized_and_sizes);
	tcase_add_test(tc, test_arena);
	tcase_add_test(tc, test_arena_huge_pages);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return run_suite(extent_pool_suite(), NULL, 0);
}
