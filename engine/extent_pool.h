/*
 * Extent buffers shared by the streams of one event loop, under one byte
 * budget, handed out in turn.
 *
 * A stream copies through extent buffers (engine/stream.c). With one pool
 * per stream, memory grows with the number of disks (64 disks x 8 extents
 * x 1 MiB = 512 MiB), while the device gains nothing past a few dozen
 * extents in flight. An extent_pool bounds the bytes of all buffers it has
 * handed out (out with a user) by its budget, and
 * a stream that gets no buffer now plans later: it never fails for that.
 *
 * Contract of extent_pool_get() (every rule is about bytes):
 *  - budget: out + size <= budget, or the request is larger than the whole
 *    budget, nothing is out and nobody waits ahead (it goes alone, so a
 *    small budget never blocks a stream for good);
 *  - turns: a refused user is queued with the size it wants, behind every
 *    waiter served as many bytes or fewer (ties: first come first served);
 *    a user is granted only if the bytes wanted by the waiters ahead of it
 *    fit too, so buffers that come back go to the least served waiter. A
 *    new user starts at most one budget behind the least served one, so a
 *    stream started a little late catches up, one started much later does
 *    not take the pool for long;
 *  - share: while another user holds buffers or waits, a user that
 *    already holds some gets no more than budget / (users holding or
 *    waiting), so one disk cannot keep the budget while others starve;
 *    refused for that it is not queued (its own buffers coming back bring
 *    it back). A user holding nothing is never refused for its share, only
 *    for the budget; a user alone may have all of it.
 * A granted user leaves the queue; extent_pool_unwait() takes a user out
 * that no longer wants a buffer (its waiting turn reserves bytes).
 *
 * Liveness: buffers are only out while their I/O is in flight on the
 * owner's queue, so a refused stream is pumped again after a completion
 * frees a buffer (the owner's loop wakes on it).
 *
 * Buffers are SIO_BUF_ALIGN aligned and come from one arena of the budget
 * backed by transparent huge pages where the kernel has them, so a large
 * extent is a few physically contiguous segments (a device's limit on
 * segments per request then does not cut it into small requests); a
 * buffer the arena cannot place gets a mapping of its own. A returned
 * buffer goes back to the arena, whose pages stay for the next one (no
 * fault and zeroing per extent); the arena is unmapped once the pool is
 * idle (no user, nothing out). A user that leaves with buffers out stays
 * accounted until the last of them comes back.
 *
 * Threads: none; a pool belongs to one thread (the loop's), like its queue.
 */
#ifndef SIPHON_ENGINE_EXTENT_POOL_H
#define SIPHON_ENGINE_EXTENT_POOL_H

#include <stddef.h>
#include <stdint.h>

/*
 * Default budget of a worker's pool. The in-flight controller of one
 * stream keeps at most the budget in flight, and a cloud volume gains from
 * every doubling up to about that (measured 2026-12-02 on a 2 GiB stream,
 * medians of 4: 8 MiB in flight 5.3 s, 16 MiB 5.1 s, 32 MiB 4.4-4.7 s;
 * fio with 64 MiB in flight 3.1 s); peak RSS stays near 36 MiB. At two
 * workers 64 disks get 64 MiB of buffers in all, inside the 64 MiB + 1 MiB
 * per disk of issue #10. Smaller than one extent per disk there on
 * purpose: with some streams waiting, the queue's order (least served
 * first) decides who copies, not which extents the device happens to
 * finish first.
 */
#define EXTENT_POOL_DEFAULT_BUDGET (32ull * 1024 * 1024)

struct extent_pool;
struct extent_pool_user;

struct extent_pool_stats {
	uint64_t budget;
	uint64_t out; /* bytes of buffers held by users */
	uint64_t peak; /* the most out so far */
	unsigned users; /* joined and not left */
	unsigned waiting; /* users queued for a buffer */
	uint64_t grants; /* buffers handed out */
	uint64_t refusals; /* requests refused (budget, turn or share) */
	uint64_t arena; /* bytes of the arena mapped now (0: idle) */
	uint64_t mapped; /* buffers that got a mapping outside the arena */
};

/* A pool of budget bytes (0: EXTENT_POOL_DEFAULT_BUDGET). -ENOMEM. */
int extent_pool_create(uint64_t budget, struct extent_pool **out);

/* Free: every user has left and every buffer came back. NULL ok. */
void extent_pool_destroy(struct extent_pool *p);

/* A new user of p (one stream). -ENOMEM. */
int extent_pool_join(struct extent_pool *p, struct extent_pool_user **out);

/*
 * The user is done: out of the queue; freed now, or when its last buffer
 * comes back through extent_pool_put(). NULL ok.
 */
void extent_pool_leave(struct extent_pool_user *u);

/*
 * A buffer of size bytes for u, under the rules above. Returns 0 and *buf,
 * -EAGAIN when not now (u is queued for its turn), -ENOMEM when the
 * allocation failed (u keeps its place).
 */
int extent_pool_get(struct extent_pool_user *u, size_t size, void **buf);

/* Give back a buffer u got with the same size. NULL buf is a no-op. */
void extent_pool_put(struct extent_pool_user *u, void *buf, size_t size);

/* u does not want a buffer any more: out of the queue if it was in it. */
void extent_pool_unwait(struct extent_pool_user *u);

/* The buffers u was granted so far (a count, for fairness checks). */
uint64_t extent_pool_user_grants(const struct extent_pool_user *u);

/* Bytes u holds now. */
uint64_t extent_pool_user_held(const struct extent_pool_user *u);

void extent_pool_get_stats(const struct extent_pool *p,
			   struct extent_pool_stats *st);

#endif
