/*
 * A bounded LRU cache of L2 table slices.
 *
 * The cache holds at most nslots slices of slice_size bytes, however large
 * the image; slice buffers are allocated the first time a slot is used.
 * Slices are found through a small chained hash table keyed by the slice's
 * host offset, and kept on a doubly linked LRU list (head = most recently
 * used). The bytes are the on-disk bytes: the cache does not interpret them.
 *
 * Invariants: a slot is on the LRU list and in exactly one hash chain iff
 * it is used; nused <= nslots; a dirty slot is written back (store) before
 * its buffer is reused; a pinned slot (a flush is writing a copy of it) is
 * never evicted, and while no_writeback is set nothing is written back
 * (a flush is in flight). Not thread-safe: the caller serialises.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "io/io.h"
#include "qcow2.h"

#define NONE QCOW2_L2CACHE_NONE

static uint32_t hash_key(const struct qcow2_l2cache *c, uint64_t key)
{
	uint64_t h = (key / c->slice_size) * 0x9e3779b97f4a7c15ull;

	return (uint32_t)(h >> (64 - c->hash_bits));
}

int qcow2_l2cache_init(struct qcow2_l2cache *c, size_t slice_size,
		       uint32_t nslots, qcow2_l2cache_io_fn load,
		       qcow2_l2cache_io_fn store, void *opaque)
{
	uint32_t i, nb;

	memset(c, 0, sizeof(*c));
	if (!sx_is_pow2(slice_size) || slice_size < 512 || !nslots ||
	    nslots >= NONE / 2 || !load)
		return -EINVAL;
	c->hash_bits = 1;
	while ((1u << c->hash_bits) < nslots * 2u)
		c->hash_bits++;
	nb = 1u << c->hash_bits;
	c->slots = calloc(nslots, sizeof(*c->slots));
	c->buckets = malloc(nb * sizeof(*c->buckets));
	if (!c->slots || !c->buckets) {
		free(c->slots);
		free(c->buckets);
		memset(c, 0, sizeof(*c));
		return -ENOMEM;
	}
	for (i = 0; i < nb; i++)
		c->buckets[i] = NONE;
	c->slice_size = slice_size;
	c->nslots = nslots;
	c->lru_head = NONE;
	c->lru_tail = NONE;
	c->load = load;
	c->store = store;
	c->opaque = opaque;
	return 0;
}

void qcow2_l2cache_fini(struct qcow2_l2cache *c)
{
	uint32_t i;

	if (!c || !c->slots)
		return;
	for (i = 0; i < c->nslots; i++)
		sio_buf_free(c->slots[i].data);
	free(c->slots);
	free(c->buckets);
	memset(c, 0, sizeof(*c));
}

static void lru_unlink(struct qcow2_l2cache *c, uint32_t i)
{
	struct qcow2_l2slot *s = &c->slots[i];

	if (s->prev != NONE)
		c->slots[s->prev].next = s->next;
	else
		c->lru_head = s->next;
	if (s->next != NONE)
		c->slots[s->next].prev = s->prev;
	else
		c->lru_tail = s->prev;
	s->prev = s->next = NONE;
}

static void lru_push_head(struct qcow2_l2cache *c, uint32_t i)
{
	struct qcow2_l2slot *s = &c->slots[i];

	s->prev = NONE;
	s->next = c->lru_head;
	if (c->lru_head != NONE)
		c->slots[c->lru_head].prev = i;
	c->lru_head = i;
	if (c->lru_tail == NONE)
		c->lru_tail = i;
}

static void hash_remove(struct qcow2_l2cache *c, uint32_t i)
{
	uint32_t *p = &c->buckets[hash_key(c, c->slots[i].key)];

	while (*p != NONE) {
		if (*p == i) {
			*p = c->slots[i].hnext;
			break;
		}
		p = &c->slots[*p].hnext;
	}
	c->slots[i].hnext = NONE;
}

static void hash_insert(struct qcow2_l2cache *c, uint32_t i)
{
	uint32_t b = hash_key(c, c->slots[i].key);

	c->slots[i].hnext = c->buckets[b];
	c->buckets[b] = i;
}

static uint32_t lookup(const struct qcow2_l2cache *c, uint64_t key)
{
	uint32_t i = c->buckets[hash_key(c, key)];

	while (i != NONE && c->slots[i].key != key)
		i = c->slots[i].hnext;
	return i;
}

/* A key's slice on disk changed: reads of it planned before are stale. */
static void mark_stale(struct qcow2_l2cache *c, uint64_t key)
{
	c->stale_gen[(key / c->slice_size) % QCOW2_L2CACHE_STALE_BUCKETS] =
		++c->gen;
}

static void release(struct qcow2_l2cache *c, uint32_t i)
{
	if (c->slots[i].written)
		mark_stale(c, c->slots[i].key);
	if (c->slots[i].pinned) {
		c->slots[i].pinned = false;
		c->npinned--;
	}
	lru_unlink(c, i);
	hash_remove(c, i);
	c->slots[i].used = false;
	c->slots[i].dirty = false;
	c->slots[i].written = false;
	c->nused--;
}

/* A free slot: an unused one, or the LRU one evicted (after write-back). */
static int take_slot(struct qcow2_l2cache *c, uint32_t *out)
{
	uint32_t i;
	int ret;

	if (c->nused < c->nslots) {
		for (i = 0; i < c->nslots; i++) {
			if (!c->slots[i].used)
				break;
		}
	} else if (c->no_writeback) {
		/*
		 * A flush is in flight: writing a slice back now could race
		 * with its writes. Take the least recently used clean one.
		 */
		for (i = c->lru_tail; i != NONE; i = c->slots[i].prev) {
			if (!c->slots[i].dirty && !c->slots[i].pinned)
				break;
		}
		if (i == NONE)
			return -EAGAIN;
		release(c, i);
		c->evictions++;
	} else {
		i = c->lru_tail;
		if (c->slots[i].dirty) {
			/*
			 * Write back every dirty slice, not just this one: the
			 * store has to order data and refcounts before any L2
			 * write (fdatasyncs), and paying that once per batch
			 * instead of once per slice is what keeps a long
			 * stream over many L2 tables fast.
			 */
			ret = qcow2_l2cache_flush(c);
			if (ret)
				return ret;
		}
		release(c, i);
		c->evictions++;
	}
	if (!c->slots[i].data) {
		/* Aligned, so O_DIRECT loads and write-backs need no bounce. */
		c->slots[i].data = sio_buf_alloc(c->slice_size);
		if (!c->slots[i].data)
			return -ENOMEM;
	}
	*out = i;
	return 0;
}

/* Make slot i hold key (data already in place) as the most recent. */
static void install(struct qcow2_l2cache *c, uint32_t i, uint64_t key)
{
	c->slots[i].key = key;
	c->slots[i].used = true;
	c->slots[i].dirty = false;
	c->slots[i].written = false;
	c->slots[i].pinned = false;
	c->nused++;
	hash_insert(c, i);
	lru_push_head(c, i);
}

int qcow2_l2cache_get(struct qcow2_l2cache *c, uint64_t key, bool for_write,
		      uint8_t **data)
{
	uint32_t i;
	int ret;

	if (!sx_is_aligned(key, c->slice_size))
		return -EINVAL;
	i = lookup(c, key);
	if (i != NONE) {
		c->hits++;
		lru_unlink(c, i);
		lru_push_head(c, i);
		goto found;
	}
	c->misses++;
	ret = take_slot(c, &i);
	if (ret)
		return ret;
	ret = c->load(c->opaque, key, c->slots[i].data, c->slice_size);
	if (ret)
		return ret;
	install(c, i, key);
found:
	if (for_write)
		c->slots[i].dirty = c->slots[i].written = true;
	*data = c->slots[i].data;
	return 0;
}

/* Batches of at most this many slices per store_many() call. */
#define STORE_BATCH 64

static int flush_batched(struct qcow2_l2cache *c)
{
	uint64_t keys[STORE_BATCH];
	uint8_t *bufs[STORE_BATCH];
	uint32_t slots[STORE_BATCH];
	uint32_t i = 0, n, k;
	int ret;

	while (i < c->nslots) {
		for (n = 0; i < c->nslots && n < STORE_BATCH; i++) {
			if (!c->slots[i].used || !c->slots[i].dirty)
				continue;
			keys[n] = c->slots[i].key;
			bufs[n] = c->slots[i].data;
			slots[n++] = i;
		}
		if (!n)
			break;
		ret = c->store_many(c->opaque, keys, bufs, n, c->slice_size);
		if (ret)
			return ret;
		for (k = 0; k < n; k++)
			c->slots[slots[k]].dirty = false;
	}
	return 0;
}

int qcow2_l2cache_flush(struct qcow2_l2cache *c)
{
	uint32_t i;
	int ret;

	if (c->store_many)
		return flush_batched(c);

	for (i = 0; i < c->nslots; i++) {
		struct qcow2_l2slot *s = &c->slots[i];

		if (!s->used || !s->dirty)
			continue;
		if (!c->store)
			return -EIO;
		ret = c->store(c->opaque, s->key, s->data, c->slice_size);
		if (ret)
			return ret;
		s->dirty = false;
	}
	return 0;
}

void qcow2_l2cache_drop(struct qcow2_l2cache *c, uint64_t off, uint64_t len)
{
	uint32_t i;

	for (i = 0; i < QCOW2_L2CACHE_STALE_BUCKETS; i++)
		c->stale_gen[i] = c->gen + 1;
	c->gen++;

	for (i = 0; i < c->nslots; i++) {
		struct qcow2_l2slot *s = &c->slots[i];

		if (s->used && s->key >= off && s->key - off < len)
			release(c, i);
	}
}

int qcow2_l2cache_get_cached(struct qcow2_l2cache *c, uint64_t key,
			     uint8_t **data)
{
	uint32_t i;

	if (!sx_is_aligned(key, c->slice_size))
		return -EINVAL;
	i = lookup(c, key);
	if (i == NONE)
		return -EAGAIN;
	c->hits++;
	lru_unlink(c, i);
	lru_push_head(c, i);
	*data = c->slots[i].data;
	return 0;
}

bool qcow2_l2cache_has(const struct qcow2_l2cache *c, uint64_t key)
{
	return lookup(c, key) != NONE;
}

int qcow2_l2cache_insert(struct qcow2_l2cache *c, uint64_t key, const void *buf,
			 uint64_t gen)
{
	uint32_t i;
	int ret;

	if (!sx_is_aligned(key, c->slice_size) || lookup(c, key) != NONE ||
	    c->stale_gen[(key / c->slice_size) % QCOW2_L2CACHE_STALE_BUCKETS] >
		    gen)
		return 0;
	/*
	 * Making room may write slices back and evict them, but not this
	 * one: it is not cached, so its bytes stay good.
	 */
	ret = take_slot(c, &i);
	if (ret)
		return ret;
	memcpy(c->slots[i].data, buf, c->slice_size);
	install(c, i, key);
	c->inserts++;
	return 1;
}

int qcow2_snap_alloc(struct qcow2_snap *snap, unsigned n)
{
	memset(snap, 0, sizeof(*snap));
	if (!n)
		return 0;
	snap->keys = calloc(n, sizeof(*snap->keys));
	snap->bufs = calloc(n, sizeof(*snap->bufs));
	snap->slots = calloc(n, sizeof(*snap->slots));
	if (!snap->keys || !snap->bufs || !snap->slots) {
		qcow2_snap_free(snap);
		return -ENOMEM;
	}
	return 0;
}

int qcow2_snap_add(struct qcow2_snap *snap, uint64_t key, uint32_t slot,
		   const void *data, size_t len)
{
	uint8_t *copy = sio_buf_alloc(len);

	if (!copy)
		return -ENOMEM;
	memcpy(copy, data, len);
	snap->bufs[snap->n] = copy;
	snap->keys[snap->n] = key;
	snap->slots[snap->n++] = slot;
	return 0;
}

void qcow2_snap_free(struct qcow2_snap *snap)
{
	unsigned i;

	for (i = 0; snap->bufs && i < snap->n; i++)
		sio_buf_free(snap->bufs[i]);
	free(snap->keys);
	free(snap->bufs);
	free(snap->slots);
	memset(snap, 0, sizeof(*snap));
}

int qcow2_l2cache_snapshot(struct qcow2_l2cache *c, struct qcow2_snap *snap)
{
	uint32_t i, n = 0;

	for (i = 0; i < c->nslots; i++)
		n += c->slots[i].used && c->slots[i].dirty;
	if (qcow2_snap_alloc(snap, n) < 0)
		return -ENOMEM;
	for (i = 0; i < c->nslots && n; i++) {
		struct qcow2_l2slot *sl = &c->slots[i];

		if (!sl->used || !sl->dirty)
			continue;
		if (qcow2_snap_add(snap, sl->key, i, sl->data, c->slice_size) <
		    0) {
			qcow2_snap_free(snap);
			return -ENOMEM;
		}
	}
	for (i = 0; i < snap->n; i++) {
		c->slots[snap->slots[i]].dirty = false;
		c->slots[snap->slots[i]].pinned = true;
	}
	c->npinned += snap->n;
	return 0;
}

void qcow2_l2cache_unpin(struct qcow2_l2cache *c, struct qcow2_snap *snap,
			 bool failed)
{
	unsigned k;

	for (k = 0; k < snap->n; k++) {
		struct qcow2_l2slot *sl = &c->slots[snap->slots[k]];

		if (sl->used && sl->pinned && sl->key == snap->keys[k]) {
			sl->pinned = false;
			c->npinned--;
			if (failed)
				sl->dirty = true;
		}
	}
	qcow2_snap_free(snap);
}
