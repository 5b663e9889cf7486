/*
 * The L2 slice cache: hits and misses, LRU eviction order, bounded
 * capacity, write-back of dirty slices, load errors, and slices read ahead
 * of use (installed only while they cannot be stale). A fake loader stands in
 * for the image file and counts what the cache asks of it.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "formats/qcow2/qcow2.h"

#define SLICE 4096u

struct fake {
	unsigned loads;
	unsigned stores;
	uint64_t last_store;
	uint64_t fail_key; /* load of this key fails (0: none) */
};

static int fake_load(void *opaque, uint64_t key, void *buf, size_t len)
{
	struct fake *f = opaque;

	if (f->fail_key && key == f->fail_key)
		return -EIO;
	f->loads++;
	/* Every byte of a slice says which slice it is. */
	memset(buf, (int)(key / SLICE) & 0xff, len);
	return 0;
}

static int fake_store(void *opaque, uint64_t key, void *buf, size_t len)
{
	struct fake *f = opaque;

	(void)buf;
	(void)len;
	f->stores++;
	f->last_store = key;
	return 0;
}

static void get(struct qcow2_l2cache *c, uint64_t idx, bool wr)
{
	uint8_t *d = NULL;

	ck_assert_int_eq(qcow2_l2cache_get(c, idx * SLICE, wr, &d), 0);
	ck_assert_ptr_nonnull(d);
	ck_assert_uint_eq(d[0], idx & 0xff);
	ck_assert_uint_eq(d[SLICE - 1], idx & 0xff);
}

START_TEST(test_hit_miss)
{
	struct qcow2_l2cache c;
	struct fake f = {0};

	ck_assert_int_eq(qcow2_l2cache_init(&c, SLICE, 4, fake_load, NULL, &f),
			 0);
	get(&c, 1, false);
	ck_assert_uint_eq(f.loads, 1);
	get(&c, 1, false);
	ck_assert_uint_eq(f.loads, 1);
	ck_assert_uint_eq(c.hits, 1);
	ck_assert_uint_eq(c.misses, 1);
	get(&c, 2, false);
	ck_assert_uint_eq(f.loads, 2);
	qcow2_l2cache_fini(&c);
	qcow2_l2cache_fini(&c); /* twice is harmless */
}
END_TEST

/* get_cached: a hit like get (LRU bumped), a miss loads nothing. */
START_TEST(test_get_cached)
{
	struct qcow2_l2cache c;
	struct fake f = {0};
	uint8_t *d = NULL;

	ck_assert_int_eq(qcow2_l2cache_init(&c, SLICE, 2, fake_load, NULL, &f),
			 0);
	ck_assert_int_eq(qcow2_l2cache_get_cached(&c, 1 * SLICE, &d), -EAGAIN);
	ck_assert_ptr_null(d);
	ck_assert_uint_eq(f.loads, 0);
	get(&c, 1, false);
	get(&c, 2, false);
	ck_assert_int_eq(qcow2_l2cache_get_cached(&c, 1 * SLICE, &d), 0);
	ck_assert_ptr_nonnull(d);
	ck_assert_uint_eq(d[0], 1);
	/* 1 was used last: loading 3 evicts 2. */
	get(&c, 3, false);
	ck_assert(qcow2_l2cache_has(&c, 1 * SLICE));
	ck_assert(!qcow2_l2cache_has(&c, 2 * SLICE));
	ck_assert_int_eq(qcow2_l2cache_get_cached(&c, 7, &d), -EINVAL);
	ck_assert_uint_eq(f.loads, 3);
	qcow2_l2cache_fini(&c);
}
END_TEST

START_TEST(test_lru_eviction)
{
	struct qcow2_l2cache c;
	struct fake f = {0};

	ck_assert_int_eq(qcow2_l2cache_init(&c, SLICE, 4, fake_load, NULL, &f),
			 0);
	get(&c, 0, false);
	get(&c, 1, false);
	get(&c, 2, false);
	get(&c, 3, false);
	ck_assert_uint_eq(f.loads, 4);
	get(&c, 0, false); /* 0 becomes most recent; 1 is the LRU */
	get(&c, 4, false); /* evicts 1 */
	ck_assert_uint_eq(c.evictions, 1);
	ck_assert_uint_eq(f.loads, 5);
	get(&c, 0, false);
	get(&c, 2, false);
	get(&c, 3, false);
	get(&c, 4, false);
	ck_assert_uint_eq(f.loads, 5);
	get(&c, 1, false); /* miss again; evicts 0, the LRU now */
	ck_assert_uint_eq(f.loads, 6);
	get(&c, 0, false);
	ck_assert_uint_eq(f.loads, 7);
	ck_assert_uint_eq(c.nused, 4);
	qcow2_l2cache_fini(&c);
}
END_TEST

START_TEST(test_bounded)
{
	struct qcow2_l2cache c;
	struct fake f = {0};
	unsigned i, slots = 0;

	ck_assert_int_eq(qcow2_l2cache_init(&c, SLICE, 8, fake_load, NULL, &f),
			 0);
	for (i = 0; i < 1000; i++)
		get(&c, i * 7 + 3, false);
	ck_assert_uint_eq(c.nused, 8);
	ck_assert_uint_eq(c.evictions, 992);
	for (i = 0; i < c.nslots; i++)
		slots += c.slots[i].data != NULL;
	ck_assert_uint_eq(slots, 8);
	/* The last eight are still there. */
	for (i = 992; i < 1000; i++)
		get(&c, i * 7 + 3, false);
	ck_assert_uint_eq(f.loads, 1000);
	qcow2_l2cache_fini(&c);
}
END_TEST

START_TEST(test_dirty_writeback)
{
	struct qcow2_l2cache c;
	struct fake f = {0};
	uint8_t *d;

	ck_assert_int_eq(
		qcow2_l2cache_init(&c, SLICE, 2, fake_load, fake_store, &f), 0);
	get(&c, 5, true);
	get(&c, 6, false);
	get(&c, 7, false); /* evicts dirty 5: written back first */
	ck_assert_uint_eq(f.stores, 1);
	ck_assert_uint_eq(f.last_store, 5 * SLICE);
	get(&c, 7, true);
	ck_assert_int_eq(qcow2_l2cache_flush(&c), 0);
	ck_assert_uint_eq(f.stores, 2);
	ck_assert_int_eq(qcow2_l2cache_flush(&c), 0);
	ck_assert_uint_eq(f.stores, 2);
	qcow2_l2cache_fini(&c);

	/* No store function: a dirty slice cannot be evicted. */
	ck_assert_int_eq(qcow2_l2cache_init(&c, SLICE, 1, fake_load, NULL, &f),
			 0);
	get(&c, 1, true);
	ck_assert_int_eq(qcow2_l2cache_get(&c, 2 * SLICE, false, &d), -EIO);
	get(&c, 1, false);
	qcow2_l2cache_fini(&c);
}
END_TEST

START_TEST(test_errors_and_drop)
{
	struct qcow2_l2cache c;
	struct fake f = {0};
	uint8_t *d;

	ck_assert_int_eq(qcow2_l2cache_init(&c, 3000, 4, fake_load, NULL, &f),
			 -EINVAL);
	ck_assert_int_eq(qcow2_l2cache_init(&c, SLICE, 0, fake_load, NULL, &f),
			 -EINVAL);
	ck_assert_int_eq(qcow2_l2cache_init(&c, SLICE, 4, fake_load, NULL, &f),
			 0);
	ck_assert_int_eq(qcow2_l2cache_get(&c, 100, false, &d), -EINVAL);
	f.fail_key = 9 * SLICE;
	ck_assert_int_eq(qcow2_l2cache_get(&c, 9 * SLICE, false, &d), -EIO);
	ck_assert_uint_eq(c.nused, 0);
	f.fail_key = 0;
	get(&c, 9, false);
	get(&c, 10, false);
	get(&c, 11, false);
	qcow2_l2cache_drop(&c, 10 * SLICE, 2 * SLICE);
	ck_assert_uint_eq(c.nused, 1);
	get(&c, 9, false);
	ck_assert_uint_eq(f.loads, 3);
	get(&c, 10, false);
	ck_assert_uint_eq(f.loads, 4);
	qcow2_l2cache_fini(&c);
}
END_TEST

/* A slice "read from disk" ahead of use: every byte says which slice. */
static int insert(struct qcow2_l2cache *c, uint64_t idx, uint64_t gen)
{
	static uint8_t buf[SLICE];

	memset(buf, (int)idx & 0xff, sizeof(buf));
	return qcow2_l2cache_insert(c, idx * SLICE, buf, gen);
}

START_TEST(test_read_ahead)
{
	struct qcow2_l2cache c;
	struct fake f = {0};
	uint64_t gen;
	uint8_t *d;

	ck_assert_int_eq(
		qcow2_l2cache_init(&c, SLICE, 2, fake_load, fake_store, &f), 0);

	/* Planned and installed: the next get is a hit, no load. */
	gen = c.gen;
	ck_assert(!qcow2_l2cache_has(&c, 1 * SLICE));
	ck_assert_int_eq(insert(&c, 1, gen), 1);
	ck_assert(qcow2_l2cache_has(&c, 1 * SLICE));
	get(&c, 1, false);
	ck_assert_uint_eq(f.loads, 0);
	ck_assert_uint_eq(c.hits, 1);

	/* Already cached (maybe changed since): the cached bytes win. */
	ck_assert_int_eq(qcow2_l2cache_get(&c, 1 * SLICE, true, &d), 0);
	d[0] = 0xee;
	ck_assert_int_eq(insert(&c, 1, c.gen), 0);
	ck_assert_int_eq(qcow2_l2cache_get(&c, 1 * SLICE, false, &d), 0);
	ck_assert_uint_eq(d[0], 0xee);

	/*
	 * A read of slice 1 planned now, then slice 1 (changed) is written
	 * back and evicted: the planned bytes may predate the write.
	 */
	gen = c.gen;
	get(&c, 2, false);
	get(&c, 3, false); /* evicts 1 after writing it back */
	ck_assert_uint_eq(f.stores, 1);
	ck_assert(!qcow2_l2cache_has(&c, 1 * SLICE));
	ck_assert_int_eq(insert(&c, 1, gen), 0);
	ck_assert(!qcow2_l2cache_has(&c, 1 * SLICE));

	/* Clean evictions do not make other planned reads stale. */
	gen = c.gen;
	get(&c, 4, false); /* evicts 2, clean */
	ck_assert_int_eq(insert(&c, 5, gen), 1); /* evicts 3, clean */
	get(&c, 5, false);
	ck_assert_uint_eq(f.loads, 3); /* 2, 3, 4: not 5 */

	/* Installing makes room like a load: a dirty slice is written back. */
	ck_assert_int_eq(qcow2_l2cache_get(&c, 4 * SLICE, true, &d), 0);
	get(&c, 5, false); /* 4 is now the LRU one */
	ck_assert_int_eq(insert(&c, 6, c.gen), 1);
	ck_assert_uint_eq(f.stores, 2);
	ck_assert_uint_eq(f.last_store, 4 * SLICE);

	/* A drop makes every planned read stale. */
	gen = c.gen;
	qcow2_l2cache_drop(&c, 100 * SLICE, SLICE);
	ck_assert_int_eq(insert(&c, 7, gen), 0);
	qcow2_l2cache_fini(&c);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("l2cache");
	TCase *tc = tcase_create("l2cache");

	tcase_add_test(tc, test_hit_miss);
	tcase_add_test(tc, test_get_cached);
	tcase_add_test(tc, test_lru_eviction);
	tcase_add_test(tc, test_bounded);
	tcase_add_test(tc, test_dirty_writeback);
	tcase_add_test(tc, test_errors_and_drop);
	tcase_add_test(tc, test_read_ahead);
	suite_add_tcase(s, tc);
	return run_suite(s, NULL, 0);
}
