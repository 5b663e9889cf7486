/*
 * The shared extent buffer pool (see extent_pool.h for the contract).
 *
 * Free buffers are kept on one list threaded through the buffers, each
 * with its size; users on a list of their own; waiters on a FIFO threaded
 * through the users.
 *
 * Invariants: out + kept <= budget, except for a lone oversized grant
 * (out was 0); out is the sum of the users' held bytes (left users
 * included); a user is queued iff its `queued` flag is set, and then holds
 * its wanted size in `want`; nactive counts the users not left that hold
 * bytes or are queued; a left user is off every list but the user list until its
 * held bytes are back, then freed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "engine/extent_pool.h"
#include "io/io.h"

struct kept_buf {
	struct kept_buf *next;
	size_t size;
};

struct extent_pool_user {
	struct extent_pool *p;
	struct extent_pool_user *next; /* p->users */
	struct extent_pool_user *wnext; /* p->wait_head FIFO */
	uint64_t held;
	uint64_t want;
	uint64_t grants;
	uint64_t served; /* bytes granted, from the start it joined with */
	bool queued;
	bool active; /* counted in p->nactive */
	bool left;
};

struct extent_pool {
	uint64_t budget;
	uint64_t out;
	uint64_t kept;
	uint64_t peak;
	struct kept_buf *free;
	struct extent_pool_user *users;
	struct extent_pool_user *wait_head, *wait_tail;
	unsigned nusers; /* not left */
	unsigned nwaiting;
	unsigned nactive;
	uint64_t grants;
	uint64_t refusals;
};

/* Keep nactive in step with u's held bytes, queue state and leaving. */
static void update_active(struct extent_pool_user *u)
{
	bool active = !u->left && (u->held || u->queued);

	if (active == u->active)
		return;
	u->active = active;
	if (active)
		u->p->nactive++;
	else
		u->p->nactive--;
}

/*
 * Buffers are mappings of their own, not heap memory: extents come in
 * several sizes (the controller changes them), and glibc raises its mmap
 * threshold after freeing a large mapped chunk, after which such buffers
 * come from the heap and their frees leave it fragmented and resident
 * (seen: 37 MiB peak RSS for a 16 MiB budget). A mapping returns its pages
 * when it is unmapped. Page aligned, which is SIO_BUF_ALIGN.
 */
_Static_assert(SIO_BUF_ALIGN <= 4096, "pool buffers are page aligned");

static void *buf_map(size_t size)
{
	void *b = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return b == MAP_FAILED ? NULL : b;
}

static void buf_unmap(void *b, size_t size)
{
	munmap(b, size);
}

static void free_kept(struct extent_pool *p)
{
	struct kept_buf *b;

	while ((b = p->free)) {
		p->free = b->next;
		p->kept -= b->size;
		buf_unmap(b, b->size);
	}
}

int extent_pool_create(uint64_t budget, struct extent_pool **out)
{
	struct extent_pool *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	p->budget = budget ? budget : EXTENT_POOL_DEFAULT_BUDGET;
	*out = p;
	return 0;
}

void extent_pool_destroy(struct extent_pool *p)
{
	struct extent_pool_user *u;

	if (!p)
		return;
	free_kept(p);
	/* Only left users with buffers out can remain: a caller's bug. */
	while ((u = p->users)) {
		p->users = u->next;
		free(u);
	}
	free(p);
}

/*
 * Where a new user's service count starts: at most one budget behind the
 * least served user still here, so a stream that starts a little after the
 * others catches up with them (equal disks finish together) but one that
 * comes hours later does not take the pool for hours.
 */
static uint64_t join_served(const struct extent_pool *p)
{
	const struct extent_pool_user *w;
	uint64_t least = UINT64_MAX;

	for (w = p->users; w; w = w->next)
		if (!w->left && w->served < least)
			least = w->served;
	if (least == UINT64_MAX || least < p->budget)
		return 0;
	return least - p->budget;
}

int extent_pool_join(struct extent_pool *p, struct extent_pool_user **out)
{
	struct extent_pool_user *u = calloc(1, sizeof(*u));

	if (!u)
		return -ENOMEM;
	u->p = p;
	u->served = join_served(p);
	u->next = p->users;
	p->users = u;
	p->nusers++;
	*out = u;
	return 0;
}

/* Take u off the user list and free it. */
static void user_free(struct extent_pool_user *u)
{
	struct extent_pool_user **pp;

	for (pp = &u->p->users; *pp != u; pp = &(*pp)->next)
		;
	*pp = u->next;
	free(u);
}

void extent_pool_unwait(struct extent_pool_user *u)
{
	struct extent_pool *p = u->p;
	struct extent_pool_user **pp, *prev = NULL;

	if (!u->queued)
		return;
	for (pp = &p->wait_head; *pp != u; pp = &(*pp)->wnext)
		prev = *pp;
	*pp = u->wnext;
	if (p->wait_tail == u)
		p->wait_tail = prev;
	u->wnext = NULL;
	u->queued = false;
	u->want = 0;
	p->nwaiting--;
	update_active(u);
}

void extent_pool_leave(struct extent_pool_user *u)
{
	struct extent_pool *p;

	if (!u)
		return;
	p = u->p;
	extent_pool_unwait(u);
	u->left = true;
	update_active(u);
	p->nusers--;
	if (!p->nusers)
		free_kept(p); /* idle: give the memory back */
	if (!u->held)
		user_free(u);
}

/*
 * Queue u behind every waiter served as much or less (ties: first come,
 * first served), or update what it wants if queued already.
 */
static void enqueue(struct extent_pool_user *u, size_t size)
{
	struct extent_pool *p = u->p;
	struct extent_pool_user **pp;

	u->want = size;
	if (u->queued)
		return;
	u->queued = true;
	for (pp = &p->wait_head; *pp && (*pp)->served <= u->served;
	     pp = &(*pp)->wnext)
		;
	u->wnext = *pp;
	*pp = u;
	if (!u->wnext)
		p->wait_tail = u;
	p->nwaiting++;
	update_active(u);
}

/* What the rules of extent_pool.h say to a request. */
enum verdict {
	GRANT,
	WAIT_TURN, /* budget or turn: queue for it */
	OVER_SHARE, /* others wait: come back with fewer buffers held */
};

static enum verdict judge(const struct extent_pool_user *u, uint64_t size)
{
	const struct extent_pool *p = u->p;
	const struct extent_pool_user *w;
	uint64_t ahead = 0;
	unsigned nactive = p->nactive + (u->active ? 0 : 1);

	/*
	 * Whenever another user holds or waits, not only while one waits:
	 * with about as many buffers as users the queue is mostly empty, and
	 * a user that could take more whenever it is pumped at that moment
	 * would keep far more than the others.
	 */
	if (u->held && nactive > 1 && u->held + size > p->budget / nactive)
		return OVER_SHARE;
	/* Those it is queued behind, or would be. */
	for (w = p->wait_head; w && w != u; w = w->wnext) {
		if (!u->queued && w->served > u->served)
			break;
		ahead += w->want;
	}
	if (size > p->budget)
		return !p->out && !ahead ? GRANT : WAIT_TURN;
	return p->out + ahead + size <= p->budget ? GRANT : WAIT_TURN;
}

/* A free buffer of exactly size bytes, or a new one with room made. */
static void *take_buf(struct extent_pool *p, size_t size)
{
	struct kept_buf **pp, *b;

	for (pp = &p->free; (b = *pp); pp = &b->next) {
		if (b->size == size) {
			*pp = b->next;
			p->kept -= size;
			return b;
		}
	}
	/* Make room: other sizes go first, in list order. */
	while (p->free && p->out + p->kept + size > p->budget) {
		b = p->free;
		p->free = b->next;
		p->kept -= b->size;
		buf_unmap(b, b->size);
	}
	return buf_map(size < sizeof(*b) ? sizeof(*b) : size);
}

int extent_pool_get(struct extent_pool_user *u, size_t size, void **buf)
{
	struct extent_pool *p = u->p;
	void *b;

	switch (judge(u, size)) {
	case GRANT:
		break;
	case WAIT_TURN:
		enqueue(u, size);
		p->refusals++;
		return -EAGAIN;
	case OVER_SHARE:
		/*
		 * Not queued: its buffers coming back bring it here again,
		 * and a turn it reserved would hold back those under theirs.
		 */
		extent_pool_unwait(u);
		p->refusals++;
		return -EAGAIN;
	}
	b = take_buf(p, size);
	if (!b)
		return -ENOMEM;
	extent_pool_unwait(u);
	u->held += size;
	u->grants++;
	u->served += size;
	update_active(u);
	p->out += size;
	p->grants++;
	if (p->out + p->kept > p->peak)
		p->peak = p->out + p->kept;
	*buf = b;
	return 0;
}

void extent_pool_put(struct extent_pool_user *u, void *buf, size_t size)
{
	struct extent_pool *p = u->p;
	struct kept_buf *b = buf;

	if (!buf)
		return;
	u->held -= size;
	p->out -= size;
	update_active(u);
	if (!p->nusers || p->out + p->kept + size > p->budget) {
		buf_unmap(buf, size < sizeof(*b) ? sizeof(*b) : size);
	} else {
		b->size = size;
		b->next = p->free;
		p->free = b;
		p->kept += size;
	}
	if (u->left && !u->held)
		user_free(u);
}

uint64_t extent_pool_user_grants(const struct extent_pool_user *u)
{
	return u->grants;
}

uint64_t extent_pool_user_held(const struct extent_pool_user *u)
{
	return u->held;
}

void extent_pool_get_stats(const struct extent_pool *p,
			   struct extent_pool_stats *st)
{
	st->budget = p->budget;
	st->out = p->out;
	st->kept = p->kept;
	st->peak = p->peak;
	st->users = p->nusers;
	st->waiting = p->nwaiting;
	st->grants = p->grants;
	st->refusals = p->refusals;
}
