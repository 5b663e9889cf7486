/*
 * The per-disk scheduler (engine/sched.c) on its own: synthetic events and
 * times, no threads, no I/O, no clock. Each test names the rule it checks
 * and fails if that rule is broken.
 */
#define _GNU_SOURCE
#include <stdint.h>

#include "engine/sched.h"
#include "siphon.h"
#include "testutil.h"

#define MS (1000ull * 1000)
/* A time far from 0, like CLOCK_MONOTONIC on a machine that has run. */
#define T0 (1000000ull * MS)

/* A scheduler with a stream started. */
static void stream_sched(struct sched *s)
{
	sched_init(s);
	sched_stream_started(s);
}

/* One burst of stream I/O from t to t + len, drained at its end. */
static void burst(struct sched *s, uint64_t t, uint64_t len)
{
	sched_stream_io_started(s, t);
	sched_stream_io_drained(s, t + len);
}

START_TEST(test_quiet_full_depth_no_pause)
{
	struct sched s;
	struct sched_limits l;
	uint64_t until = 12345;

	stream_sched(&s);
	l = sched_stream_limits(&s, T0);
	ck_assert_uint_eq(l.max_inflight, 0);
	ck_assert_uint_eq(l.extent_bytes, 0);
	/* Bursts one after another never pause a stream with no guest. */
	burst(&s, T0, 5 * MS);
	ck_assert(sched_stream_may_issue(&s, T0 + 5 * MS, false, &until));
	ck_assert_uint_eq(until, 12345);

	/* Guest activity long enough ago is quiet again. */
	sched_guest_submitted(&s, T0);
	sched_guest_drained(&s);
	ck_assert(!sched_guest_busy(&s, T0 + SCHED_GUEST_RECENT_NS));
	l = sched_stream_limits(&s, T0 + SCHED_GUEST_RECENT_NS);
	ck_assert_uint_eq(l.max_inflight, 0);
	ck_assert_uint_eq(l.extent_bytes, 0);
}
END_TEST

START_TEST(test_busy_reduced_limits)
{
	struct sched s;
	struct sched_limits l;

	stream_sched(&s);
	/* Busy while a request is outstanding, whatever the time. */
	sched_guest_submitted(&s, T0);
	l = sched_stream_limits(&s, T0 + 10 * SCHED_GUEST_RECENT_NS);
	ck_assert_uint_eq(l.max_inflight, SCHED_STREAM_INFLIGHT);
	ck_assert_uint_eq(l.extent_bytes, SCHED_STREAM_EXTENT);
	/* Drained, still busy within the recent window ... */
	sched_guest_drained(&s);
	l = sched_stream_limits(&s, T0 + SCHED_GUEST_RECENT_NS - 1);
	ck_assert_uint_eq(l.max_inflight, SCHED_STREAM_INFLIGHT);
	ck_assert_uint_eq(l.extent_bytes, SCHED_STREAM_EXTENT);
	/* ... and not after it. */
	l = sched_stream_limits(&s, T0 + SCHED_GUEST_RECENT_NS);
	ck_assert_uint_eq(l.max_inflight, 0);
	/* The reduced values are the documented ones. */
	ck_assert_uint_eq(SCHED_STREAM_INFLIGHT, 1);
	ck_assert_uint_eq(SCHED_STREAM_EXTENT, 64 * 1024);
}
END_TEST

/* The pause after a burst of len with a busy guest, or 0. */
static uint64_t gap_after(uint64_t len)
{
	struct sched s;
	uint64_t until = 0, end = T0 + len;

	stream_sched(&s);
	sched_guest_submitted(&s, T0); /* outstanding all along */
	burst(&s, T0, len);
	if (sched_stream_may_issue(&s, end, false, &until))
		return 0;
	ck_assert_uint_gt(until, end);
	/* Exactly at the end of the gap, and after, it issues. */
	ck_assert(sched_stream_may_issue(&s, until, false, &until));
	return until - end;
}

START_TEST(test_gap_scales_and_clamps)
{
	uint64_t mid = SCHED_GAP_MIN_NS / SCHED_GAP_FACTOR * 2;

	ck_assert_uint_eq(SCHED_GAP_FACTOR, 4);
	/* Inside the clamp: factor x duration. */
	ck_assert_uint_eq(gap_after(mid), mid * SCHED_GAP_FACTOR);
	ck_assert_uint_eq(gap_after(mid + MS / 4),
			  (mid + MS / 4) * SCHED_GAP_FACTOR);
	/* Short bursts: at least the minimum. */
	ck_assert_uint_eq(gap_after(0), SCHED_GAP_MIN_NS);
	ck_assert_uint_eq(gap_after(1000), SCHED_GAP_MIN_NS);
	/* Long bursts: at most the maximum. */
	ck_assert_uint_eq(gap_after(SCHED_GAP_MAX_NS), SCHED_GAP_MAX_NS);
	ck_assert_uint_eq(gap_after(1000 * MS), SCHED_GAP_MAX_NS);
	ck_assert_uint_eq(SCHED_GAP_MIN_NS, 2 * MS);
	ck_assert_uint_eq(SCHED_GAP_MAX_NS, 20 * MS);
}
END_TEST

START_TEST(test_gap_only_when_busy_or_idle_stream)
{
	struct sched s;
	uint64_t until = 0;

	stream_sched(&s);
	sched_guest_submitted(&s, T0);
	/* While its I/O is in flight the stream is not paused. */
	sched_stream_io_started(&s, T0);
	ck_assert(sched_stream_may_issue(&s, T0 + MS, false, &until));
	sched_stream_io_drained(&s, T0 + MS);
	ck_assert(!sched_stream_may_issue(&s, T0 + MS, false, &until));
	/* An aborting stream winds down without a pause. */
	ck_assert(sched_stream_may_issue(&s, T0 + MS, true, &until));
	/* The guest going quiet ends the pause. */
	sched_guest_drained(&s);
	ck_assert(!sched_stream_may_issue(&s, T0 + 2 * MS, false, &until));
	ck_assert(sched_stream_may_issue(&s, T0 + MS + SCHED_GUEST_RECENT_NS,
					 false, &until));
}
END_TEST

START_TEST(test_no_starvation)
{
	struct sched s;
	uint64_t t = T0, until, issued = 0, i;

	stream_sched(&s);
	/*
	 * The guest submits every 100 us and never drains, for 2 s; the
	 * stream asks at every submission and issues a 1 ms burst whenever
	 * it may. It must keep getting turns, one per gap at least.
	 */
	for (i = 0; i < 20000; i++, t += MS / 10) {
		sched_guest_submitted(&s, t);
		if (!sched_stream_may_issue(&s, t, false, &until)) {
			ck_assert_uint_le(until - t, SCHED_GAP_MAX_NS);
			continue;
		}
		issued++;
		burst(&s, t, MS);
	}
	/* 2 s with gaps of 4 ms after 1 ms bursts: hundreds of turns. */
	ck_assert_uint_ge(issued, 2000 * MS / (SCHED_GAP_MAX_NS + MS));
	ck_assert_uint_le(issued, 2000 * MS / (4 * MS));
}
END_TEST

START_TEST(test_cor_modes)
{
	struct sched s;
	struct sched_cor c;

	ck_assert_int_eq(SCHED_COR_AUTO, SIPHON_COR_AUTO);
	ck_assert_int_eq(SCHED_COR_ON, SIPHON_COR_ON);
	ck_assert_int_eq(SCHED_COR_OFF, SIPHON_COR_OFF);

	sched_init(&s);
	/* AUTO: off without a stream, on (may yield) with one. */
	c = sched_cor(&s);
	ck_assert(!c.on);
	ck_assert(!c.may_yield);
	sched_stream_started(&s);
	c = sched_cor(&s);
	ck_assert(c.on);
	ck_assert(c.may_yield);
	sched_stream_ended(&s);
	c = sched_cor(&s);
	ck_assert(!c.on);
	ck_assert(!c.may_yield);

	/* ON: always on; may yield only while a stream runs. */
	sched_set_cor_mode(&s, SCHED_COR_ON);
	c = sched_cor(&s);
	ck_assert(c.on);
	ck_assert(!c.may_yield);
	sched_stream_started(&s);
	c = sched_cor(&s);
	ck_assert(c.on);
	ck_assert(c.may_yield);

	/* OFF: never, stream or not. */
	sched_set_cor_mode(&s, SCHED_COR_OFF);
	c = sched_cor(&s);
	ck_assert(!c.on);
	sched_stream_ended(&s);
	c = sched_cor(&s);
	ck_assert(!c.on);
	ck_assert(!c.may_yield);

	/* An unknown mode changes nothing. */
	sched_set_cor_mode(&s, 7);
	ck_assert_int_eq(s.cor_mode, SCHED_COR_OFF);
}
END_TEST

static Suite *sched_suite(void)
{
	Suite *s = suite_create("sched");
	TCase *tc = tcase_create("policy");

	tcase_add_test(tc, test_quiet_full_depth_no_pause);
	tcase_add_test(tc, test_busy_reduced_limits);
	tcase_add_test(tc, test_gap_scales_and_clamps);
	tcase_add_test(tc, test_gap_only_when_busy_or_idle_stream);
	tcase_add_test(tc, test_no_starvation);
	tcase_add_test(tc, test_cor_modes);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return run_suite(sched_suite(), NULL, 0);
}
