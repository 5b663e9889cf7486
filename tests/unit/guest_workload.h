/*
 * The randomized guest workload shared by test_guest_stress.c and its
 * crash helper: a seeded, reproducible sequence of operations per thread,
 * each thread confined to its own stripes of the disk (STRIPE bytes, every
 * nthreads-th one) so that an in-memory model of every byte is exact
 * whatever the interleaving. Header-only: each program has one copy.
 */
#ifndef SIPHON_TESTS_GUEST_WORKLOAD_H
#define SIPHON_TESTS_GUEST_WORKLOAD_H

#include <stdint.h>
#include <string.h>

#include "siphon.h"

#define WL_STRIPE (256u * 1024)

enum wl_kind {
	WL_READ,
	WL_WRITE,
	WL_DISCARD,
	WL_ZEROES,
	WL_FLUSH,
};

struct wl_op {
	enum wl_kind kind;
	uint64_t off;
	uint64_t len;
	uint32_t pat;
};

static inline uint64_t wl_rand(uint64_t *s)
{
	/* splitmix64: tiny and good enough for a test. */
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline uint64_t wl_seed(uint64_t seed, unsigned t)
{
	return seed * 1000003ull + t * 7919ull + 1;
}

/* The next op of thread t of nthreads on a disk of size bytes. */
static inline void wl_next(uint64_t *rng, unsigned t, unsigned nthreads,
			   uint64_t size, struct wl_op *op)
{
	uint64_t nstripes = size / WL_STRIPE / nthreads, stripe, blocks;
	unsigned r = (unsigned)(wl_rand(rng) % 100);

	stripe = (t + nthreads * (wl_rand(rng) % nstripes)) * WL_STRIPE;
	blocks = WL_STRIPE / 512;
	op->off = stripe + (wl_rand(rng) % blocks) * 512;
	/* Mostly small (partial clusters), some up to a whole stripe. */
	if (wl_rand(rng) % 4)
		op->len = (1 + wl_rand(rng) % 16) * 512;
	else
		op->len = (1 + wl_rand(rng) % blocks) * 512;
	if (op->off + op->len > stripe + WL_STRIPE)
		op->len = stripe + WL_STRIPE - op->off;
	op->pat = (uint32_t)wl_rand(rng);
	if (r < 40)
		op->kind = WL_READ;
	else if (r < 75)
		op->kind = WL_WRITE;
	else if (r < 84)
		op->kind = WL_DISCARD;
	else if (r < 93)
		op->kind = WL_ZEROES;
	else
		op->kind = WL_FLUSH;
}

/* The data a write puts at [op->off, +op->len): varies per 512 bytes. */
static inline void wl_fill(uint8_t *buf, const struct wl_op *op)
{
	uint64_t b;

	for (b = 0; b < op->len / 512; b++)
		memset(buf + b * 512,
		       (int)(((op->pat >> 8) + b * 37 + op->off / 512) % 255) +
			       1,
		       512);
}

/*
 * What the op does to the model. Discard zeros the whole clusters (of cs
 * bytes) inside the range only.
 */
static inline void wl_apply(uint8_t *model, const struct wl_op *op, uint64_t cs)
{
	uint64_t a, b;

	switch (op->kind) {
	case WL_WRITE:
		wl_fill(model + op->off, op);
		break;
	case WL_ZEROES:
		memset(model + op->off, 0, op->len);
		break;
	case WL_DISCARD:
		a = (op->off + cs - 1) / cs * cs;
		b = (op->off + op->len) / cs * cs;
		if (a < b)
			memset(model + a, 0, b - a);
		break;
	default:
		break;
	}
}

/*
 * Issue op on disk through the synchronous API: a read lands in buf, a
 * write's data (wl_fill()) is made there first. 0 or -errno.
 */
static inline int wl_issue(siphon_disk *disk, const struct wl_op *op,
			   uint8_t *buf)
{
	switch (op->kind) {
	case WL_READ:
		return siphon_disk_pread(disk, buf, op->len, op->off, 0);
	case WL_WRITE:
		wl_fill(buf, op);
		return siphon_disk_pwrite(disk, buf, op->len, op->off, 0);
	case WL_DISCARD:
		return siphon_disk_discard(disk, op->off, op->len, 0);
	case WL_ZEROES:
		return siphon_disk_write_zeroes(disk, op->off, op->len, 0);
	default:
		return siphon_disk_flush(disk, 0);
	}
}

/* Bytes the op may change (for the crash check): [*a, *b). */
static inline int wl_touches(const struct wl_op *op, uint64_t *a, uint64_t *b)
{
	if (op->kind == WL_READ || op->kind == WL_FLUSH)
		return 0;
	*a = op->off;
	*b = op->off + op->len;
	return 1;
}

#endif
