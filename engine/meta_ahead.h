/*
 * Metadata read-ahead for the stream's planner.
 *
 * The planner asks the chain where every cluster lives, in guest order. For
 * a qcow2 layer that means one L2 slice after another, and a slice the
 * driver has not cached is a synchronous read on the owner's thread: on a
 * large sparse image, where the planner crosses thousands of L2 tables
 * while copying little, those reads are most of the stream's time. A
 * meta_ahead asks each layer's driver (meta_want) which slices lie just
 * ahead of the planner and are not cached, reads them asynchronously on
 * the owner's queue, and hands them to the driver (meta_fill), so the
 * planner finds them cached.
 *
 * Bounded: at most META_AHEAD_READS reads in flight, and per layer at most
 * META_AHEAD_SLICES planned slices that the planner has not passed yet, so
 * read-ahead never pushes out of a cache what the planner still needs.
 *
 * Threads: the owner's only (callbacks run from sio_queue_run()).
 */
#ifndef SIPHON_ENGINE_META_AHEAD_H
#define SIPHON_ENGINE_META_AHEAD_H

#include <stdint.h>

struct img;
struct sio_queue;
struct meta_ahead;

#define META_AHEAD_READS 8u
#define META_AHEAD_SLICES 32u

/*
 * Read-ahead for the layers the planner asks: top down to, not including,
 * base (NULL: the whole chain). *out is NULL when no layer's driver can
 * read ahead. -errno with a message.
 */
int meta_ahead_create(struct img *top, struct img *base, struct sio_queue *q,
		      struct meta_ahead **out);

/* Start what reads are allowed for guest offsets from pos on. */
void meta_ahead_pump(struct meta_ahead *m, uint64_t pos);

/* Reads whose callback has not run. */
unsigned meta_ahead_inflight(const struct meta_ahead *m);

/* Free. Only with nothing in flight (NULL is fine). */
void meta_ahead_destroy(struct meta_ahead *m);

#endif
