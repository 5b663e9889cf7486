/*
 * Checked offset and length arithmetic.
 *
 * Every offset or length that comes from an image file, a user or a request
 * goes through these helpers before it is used: they refuse overflow instead
 * of wrapping, so a hostile header can never turn into a small, valid-looking
 * number. Each helper returns 0 on success or -EOVERFLOW / -EINVAL, and leaves
 * *out untouched on failure.
 */
#ifndef SIPHON_COMMON_CHECKED_H
#define SIPHON_COMMON_CHECKED_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

/* *out = a + b */
static inline int sx_add(uint64_t a, uint64_t b, uint64_t *out)
{
	uint64_t r;

	if (__builtin_add_overflow(a, b, &r))
		return -EOVERFLOW;
	*out = r;
	return 0;
}

/* *out = a * b */
static inline int sx_mul(uint64_t a, uint64_t b, uint64_t *out)
{
	uint64_t r;

	if (__builtin_mul_overflow(a, b, &r))
		return -EOVERFLOW;
	*out = r;
	return 0;
}

/* True when align is a non-zero power of two. */
static inline bool sx_is_pow2(uint64_t align)
{
	return align && !(align & (align - 1));
}

/* True when v is a multiple of align (a power of two). */
static inline bool sx_is_aligned(uint64_t v, uint64_t align)
{
	return (v & (align - 1)) == 0;
}

/* v rounded down to align (a power of two); cannot overflow. */
static inline uint64_t sx_align_down(uint64_t v, uint64_t align)
{
	return v & ~(align - 1);
}

/* *out = v rounded up to align (a power of two). */
static inline int sx_align_up(uint64_t v, uint64_t align, uint64_t *out)
{
	uint64_t r;

	if (!sx_is_pow2(align))
		return -EINVAL;
	if (__builtin_add_overflow(v, align - 1, &r))
		return -EOVERFLOW;
	*out = r & ~(align - 1);
	return 0;
}

/* *out = ceil(a / b); b must be non-zero. */
static inline int sx_div_round_up(uint64_t a, uint64_t b, uint64_t *out)
{
	if (b == 0)
		return -EINVAL;
	*out = a / b + (a % b != 0);
	return 0;
}

/*
 * True when [off, off + len) lies inside [0, limit). A zero-length range at
 * limit is inside.
 */
static inline bool sx_range_within(uint64_t off, uint64_t len, uint64_t limit)
{
	return off <= limit && len <= limit - off;
}

static inline uint64_t sx_min(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static inline uint64_t sx_max(uint64_t a, uint64_t b)
{
	return a > b ? a : b;
}

#endif
