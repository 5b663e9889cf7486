/*
 * In-flight cluster range locks (see cluster_lock.h).
 *
 * A plain list: the number held at once is bounded by the stream's extents
 * in flight plus the guest's queue depth, a few dozen at most, so a linear
 * overlap check costs less than keeping a tree balanced.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>

#include "cluster_lock.h"

bool cl_locks_busy(const struct cl_locks *t, uint64_t start, uint64_t end)
{
	const struct cl_lock *l;

	for (l = t->head; l; l = l->next)
		if (l->start < end && start < l->end)
			return true;
	return false;
}

int cl_lock_try(struct cl_locks *t, uint64_t start, uint64_t end,
		struct cl_lock **out)
{
	struct cl_lock *l;

	if (cl_locks_busy(t, start, end))
		return -EBUSY;
	l = malloc(sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->start = start;
	l->end = end;
	l->next = t->head;
	t->head = l;
	t->count++;
	*out = l;
	return 0;
}

void cl_unlock(struct cl_locks *t, struct cl_lock *l)
{
	struct cl_lock **pp;

	if (!l)
		return;
	for (pp = &t->head; *pp && *pp != l; pp = &(*pp)->next)
		;
	if (*pp) {
		*pp = l->next;
		t->count--;
	}
	t->generation++;
	free(l);
}
