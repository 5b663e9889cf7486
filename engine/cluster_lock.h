/*
 * In-flight cluster range locks of one disk.
 *
 * Whoever is about to change what a guest range of the top image holds, or
 * to copy into it, takes a lock on the cluster-aligned range first: a stream
 * extent from the start of its reads to its commit, a copy-on-read from its
 * read of the chain to its commit, a guest write that is in flight
 * asynchronously. All locks are exclusive. Nobody ever blocks on a lock:
 * the stream and copy-on-read try and back off, guest writes are queued by
 * engine/guest.c and resumed when a lock drops.
 *
 * Threads: a table belongs to the disk's worker thread; no locking inside.
 */
#ifndef SIPHON_ENGINE_CLUSTER_LOCK_H
#define SIPHON_ENGINE_CLUSTER_LOCK_H

#include <stdbool.h>
#include <stdint.h>

struct cl_lock {
	struct cl_lock *next;
	uint64_t start; /* bytes, [start, end) */
	uint64_t end;
};

struct cl_locks {
	struct cl_lock *head;
	unsigned count;
	uint64_t generation; /* bumped on every unlock */
};

/* True when [start, end) overlaps a held lock. */
bool cl_locks_busy(const struct cl_locks *t, uint64_t start, uint64_t end);

/*
 * Lock [start, end) if nothing overlaps it. Returns 0 and *out, -EBUSY when
 * something overlaps, -ENOMEM.
 */
int cl_lock_try(struct cl_locks *t, uint64_t start, uint64_t end,
		struct cl_lock **out);

/* Drop a lock from cl_lock_try(). NULL is a no-op. */
void cl_unlock(struct cl_locks *t, struct cl_lock *l);

#endif
