/*
 * The shared extent buffer pool (see extent_pool.h for the contract).
 *
 * Buffers come from an arena (see buf_map()); users are on a list of
 * their own; waiters on a FIFO threaded through the users.
 *
 * Invariants: out <= budget, except for a lone oversized grant (out was
 * 0); arena_used counts the units of the buffers out of the arena; out is the sum of the users' held bytes (left users
 * included); a user is queued iff its `queued` flag is set, and then holds
 * its wanted size in `want`; nactive counts the users not left that hold
 * bytes or are queued; a left user is off every list but the user list until its
 * held bytes are back, then freed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "engine/extent_pool.h"
#include "io/io.h"

#define ARENA_UNIT 4096u
#define ARENA_ALIGN (2u << 20) /* a transparent huge page on x86-64 */

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
	uint64_t peak;
	struct extent_pool_user *users;
	struct extent_pool_user *wait_head, *wait_tail;
	unsigned nusers; /* not left */
	unsigned nwaiting;
	unsigned nactive;
	uint64_t grants;
	uint64_t refusals;
	uint64_t mapped; /* buffers mapped outside the arena */
	/* The arena (see buf_map()); NULL until the first buffer. */
	uint8_t *arena;
	size_t arena_size;
	size_t arena_units;
	size_t arena_used; /* units */
	uint64_t *used; /* bitmap of units */
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
 * Where buffers live: an arena, one mapping of the budget (rounded up to
 * ARENA_ALIGN, at an ARENA_ALIGN boundary) advised for transparent huge
 * pages, carved in ARENA_UNIT units by first fit on a bitmap.
 *
 * Why: an O_DIRECT request is built from its buffer's physical pages, and
 * a device takes a bounded number of segments per request (virtio-blk:
 * max_segments 254 here). Buffers of scattered 4 KiB pages cap a request
 * at about 1 MiB and keep the block layer from merging neighbours beyond
 * that, whatever size the stream asks for; measured 2026-12-02 on this
 * project's cloud disk, 2 GiB streamed with 4 MiB extents: device requests
 * averaged 0.5-1.8 MiB from page-backed buffers and 3-3.7 MiB from huge
 * pages, 3.5-3.7 s against 2.5-2.7 s (fio, whose reads merge to 2-3 MiB:
 * 2.6-3.0 s). Huge pages are physically contiguous 2 MiB.
 *
 * The arena is mapped at the first buffer, its pages fault in as buffers
 * first use them and stay (no refault and zeroing per extent, as a mapping
 * per buffer had), and it is unmapped when the pool is idle: no user and
 * nothing out of it. A request the arena cannot hold (a lone grant over
 * the budget, units rounded past it, or fragmentation) gets a mapping of
 * its own: the arena is where buffers should be, never a reason to refuse.
 * Neither comes from the heap: glibc raises its mmap threshold after
 * freeing a large mapped chunk, after which buffers came from the heap and
 * their frees left it fragmented and resident (seen: 37 MiB peak RSS for a
 * 16 MiB budget). Buffers are page aligned, which is SIO_BUF_ALIGN.
 */
_Static_assert(SIO_BUF_ALIGN <= ARENA_UNIT, "pool buffers are unit aligned");

#define WORD_BITS 64

static bool arena_has(const struct extent_pool *p, const void *b)
{
	const uint8_t *c = b;

	return p->arena && c >= p->arena && c < p->arena + p->arena_size;
}

static int arena_map(struct extent_pool *p)
{
	size_t size = (p->budget + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
	size_t units = size / ARENA_UNIT;
	uint8_t *m, *a;

	p->used = calloc((units + WORD_BITS - 1) / WORD_BITS, sizeof(uint64_t));
	if (!p->used)
		return -ENOMEM;
	m = mmap(NULL, size + ARENA_ALIGN, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (m == MAP_FAILED) {
		free(p->used);
		p->used = NULL;
		return -ENOMEM;
	}
	a = (uint8_t *)(((uintptr_t)m + ARENA_ALIGN - 1) &
			~(uintptr_t)(ARENA_ALIGN - 1));
	if (a > m)
		munmap(m, (size_t)(a - m));
	if (m + ARENA_ALIGN > a)
		munmap(a + size, (size_t)(m + ARENA_ALIGN - a));
	/* Advice only: without huge pages the arena still works. */
	(void)madvise(a, size, MADV_HUGEPAGE);
	p->arena = a;
	p->arena_size = size;
	p->arena_units = units;
	return 0;
}

static void arena_unmap(struct extent_pool *p)
{
	if (!p->arena)
		return;
	munmap(p->arena, p->arena_size);
	free(p->used);
	p->arena = NULL;
	p->used = NULL;
	p->arena_size = 0;
	p->arena_units = 0;
}

static bool unit_used(const struct extent_pool *p, size_t i)
{
	return p->used[i / WORD_BITS] >> (i % WORD_BITS) & 1;
}

static void units_set(struct extent_pool *p, size_t i, size_t n, bool on)
{
	for (; n; i++, n--) {
		if (on)
			p->used[i / WORD_BITS] |= 1ull << (i % WORD_BITS);
		else
			p->used[i / WORD_BITS] &= ~(1ull << (i % WORD_BITS));
	}
}

/* First fit of n free units: the index, or arena_units when none. */
static size_t units_find(const struct extent_pool *p, size_t n)
{
	size_t i = 0, run = 0;

	while (i < p->arena_units) {
		if (!(i % WORD_BITS) && p->used[i / WORD_BITS] == UINT64_MAX) {
			i += WORD_BITS; /* a full word: no run through it */
			run = 0;
			continue;
		}
		run = unit_used(p, i) ? 0 : run + 1;
		i++;
		if (run == n)
			return i - n;
	}
	return p->arena_units;
}

static void *arena_get(struct extent_pool *p, size_t size)
{
	size_t n = (size + ARENA_UNIT - 1) / ARENA_UNIT, i;

	if (!p->arena && arena_map(p) < 0)
		return NULL;
	if (n > p->arena_units - p->arena_used)
		return NULL;
	i = units_find(p, n);
	if (i == p->arena_units)
		return NULL;
	units_set(p, i, n, true);
	p->arena_used += n;
	return p->arena + i * ARENA_UNIT;
}

static void *buf_map(struct extent_pool *p, size_t size)
{
	void *b = arena_get(p, size);

	if (b)
		return b;
	b = mmap(NULL, size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (b == MAP_FAILED)
		return NULL;
	p->mapped++;
	return b;
}

/* The arena goes when the pool is idle: no user and nothing in it. */
static void arena_trim(struct extent_pool *p)
{
	if (!p->nusers && !p->arena_used)
		arena_unmap(p);
}

static void buf_unmap(struct extent_pool *p, void *b, size_t size)
{
	if (arena_has(p, b)) {
		size_t n = (size + ARENA_UNIT - 1) / ARENA_UNIT;

		units_set(p, (size_t)((uint8_t *)b - p->arena) / ARENA_UNIT, n,
			  false);
		p->arena_used -= n;
		arena_trim(p);
		return;
	}
	munmap(b, size);
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
	arena_unmap(p);
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
	arena_trim(p); /* idle: give the memory back */
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
	b = buf_map(p, size);
	if (!b)
		return -ENOMEM;
	extent_pool_unwait(u);
	u->held += size;
	u->grants++;
	u->served += size;
	update_active(u);
	p->out += size;
	p->grants++;
	if (p->out > p->peak)
		p->peak = p->out;
	*buf = b;
	return 0;
}

void extent_pool_put(struct extent_pool_user *u, void *buf, size_t size)
{
	struct extent_pool *p = u->p;

	if (!buf)
		return;
	u->held -= size;
	p->out -= size;
	update_active(u);
	buf_unmap(p, buf, size);
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
	st->peak = p->peak;
	st->users = p->nusers;
	st->waiting = p->nwaiting;
	st->grants = p->grants;
	st->refusals = p->refusals;
	st->arena = p->arena_size;
	st->mapped = p->mapped;
}
