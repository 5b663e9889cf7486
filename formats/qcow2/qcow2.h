/*
 * qcow2 driver internals, private to formats/qcow2/.
 *
 * The driver is split by concern: header.c parses and validates the header,
 * its extensions and the feature-name table; cluster.c decodes L1/L2 entries
 * and answers block_status; l2cache.c keeps a bounded LRU cache of L2 slices;
 * compress.c inflates one compressed cluster; refcount.c knows the refcount
 * geometry, reads and updates refcounts and allocates host clusters;
 * write.c holds the guest-facing write operations; flush.c the
 * crash-consistent flush order; header_write.c builds cluster 0; create.c
 * makes new images; bitmap.c keeps persistent dirty bitmaps; qcow2.c is
 * the vtable glue.
 *
 * Invariants kept once qcow2_open() succeeded:
 *  - every header field has been range-checked; the struct qcow2_header holds
 *    host-endian copies, hdr_raw the header bytes as read (unknown trailing
 *    header bytes included) so that a later header rewrite can preserve them;
 *  - exts[] lists every header extension in file order with its raw payload,
 *    unknown ones included, so a rewrite can keep them verbatim;
 *  - l1[] holds the whole active L1 table, host-endian; its entries are only
 *    checked when used (an unused corrupt entry does not prevent open);
 *  - L2 slices in the cache hold the on-disk (big-endian) bytes, so a later
 *    write path can modify and write them back as they are.
 *
 * Thread safety: block_status, read_compressed and every write-path entry
 * point take s->lock around every use of the L1 table, the L2 cache and the
 * refcount state.
 */
#ifndef SIPHON_FORMATS_QCOW2_QCOW2_H
#define SIPHON_FORMATS_QCOW2_QCOW2_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "formats/format.h"

struct img;
struct img_port;
struct sio_file;

#define QCOW2_MAGIC 0x514649fbu /* "QFI\xfb" */

#define QCOW2_V2_HEADER_LEN 72u
#define QCOW2_V3_HEADER_LEN 104u

#define QCOW2_MIN_CLUSTER_BITS 9u
#define QCOW2_MAX_CLUSTER_BITS 21u
#define QCOW2_MIN_EXT_L2_CLUSTER_BITS 14u

/* Limits qemu applies too: refusing larger tables bounds our memory. */
#define QCOW2_MAX_L1_BYTES (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_SNAPSHOTS 65536u
#define QCOW2_MAX_BACKING_NAME 1023u
#define QCOW2_MAX_EXT_NAME 4095u

/* Incompatible feature bits. */
#define QCOW2_INCOMPAT_DIRTY (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ull << 4)
#define QCOW2_INCOMPAT_MASK ((1ull << 5) - 1)

/* Compatible feature bits. */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)

/* Autoclear feature bits. */
#define QCOW2_AUTOCLEAR_BITMAPS (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)
#define QCOW2_AUTOCLEAR_MASK ((1ull << 2) - 1)

/* Header extension magics. */
#define QCOW2_EXT_END 0x00000000u
#define QCOW2_EXT_BACKING_FMT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857u
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_EXT_CRYPTO 0x0537be77u
#define QCOW2_EXT_DATA_FILE 0x44415441u

#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

/* L1 and standard L2 entry layout. */
#define QCOW2_OFLAG_COPIED (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO (1ull << 0)
#define QCOW2_L1E_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_L2E_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_REFT_OFFSET_MASK 0xfffffffffffffe00ull

#define QCOW2_SUBCLUSTERS 32u
#define QCOW2_COMPRESSED_SECTOR 512u

/* The header fields, host-endian. v2 images get v3 defaults for the rest. */
struct qcow2_header {
	uint32_t magic;
	uint32_t version;
	uint64_t backing_file_offset;
	uint32_t backing_file_size;
	uint32_t cluster_bits;
	uint64_t size;
	uint32_t crypt_method;
	uint32_t l1_size;
	uint64_t l1_table_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	uint32_t refcount_order;
	uint32_t header_length;
	uint8_t compression_type;
};

/* One header extension, in file order. Unknown ones are kept verbatim. */
struct qcow2_ext {
	uint32_t magic;
	uint32_t len; /* payload bytes, without padding */
	uint8_t *data; /* len bytes (malloc'd, NULL when len is 0) */
};

/* One entry of the feature-name table extension. */
struct qcow2_feature {
	uint8_t type; /* 0 incompatible, 1 compatible, 2 autoclear */
	uint8_t bit;
	char name[47]; /* 46 bytes on disk, NUL added */
};

/*
 * Bounded LRU cache of L2 table slices, keyed by the host offset of the
 * slice. Generic over its I/O so it can be unit-tested: load() fills a
 * slice on a miss, store() (optional, for the write path) writes back a
 * dirty one before it is evicted or on flush.
 */
typedef int (*qcow2_l2cache_io_fn)(void *opaque, uint64_t key, void *buf,
				   size_t len);

#define QCOW2_L2CACHE_STALE_BUCKETS 64u

struct qcow2_l2slot {
	uint64_t key;
	uint8_t *data; /* slice_size bytes, allocated on first use */
	uint32_t prev, next; /* LRU list: head is the most recently used */
	uint32_t hnext; /* hash chain */
	bool used;
	bool dirty;
	bool written; /* dirtied since it was loaded */
	bool pinned; /* its bytes are being written by a flush: keep it */
};

struct qcow2_l2cache {
	size_t slice_size;
	uint32_t nslots;
	uint32_t nused;
	struct qcow2_l2slot *slots;
	uint32_t *buckets;
	uint32_t hash_bits;
	uint32_t lru_head;
	uint32_t lru_tail;
	qcow2_l2cache_io_fn load;
	qcow2_l2cache_io_fn store;
	/*
	 * Optional: write back n slices at once (keys[i], bufs[i]); used
	 * by flush instead of n store() calls.
	 */
	int (*store_many)(void *opaque, const uint64_t *keys,
			  uint8_t *const *bufs, unsigned n, size_t len);
	void *opaque;
	/*
	 * Read-ahead validity. A slice that is not cached has its latest bytes
	 * on disk, so a read of it planned then is good unless the slice was
	 * loaded, changed, written back and evicted (or dropped) before the
	 * read is installed. Each such event bumps gen and stamps the key's
	 * bucket in stale_gen; qcow2_l2cache_insert() refuses bytes planned at
	 * a generation older than their bucket's stamp.
	 */
	uint64_t gen;
	uint64_t stale_gen[QCOW2_L2CACHE_STALE_BUCKETS];
	uint64_t hits;
	uint64_t misses;
	uint64_t evictions;
	uint64_t inserts; /* read-ahead slices installed */
	/*
	 * An asynchronous flush is in flight: no slice may be written back
	 * (a victim must be clean and unpinned, else -EAGAIN).
	 */
	bool no_writeback;
	uint32_t npinned;
};

/*
 * Copies of dirty cached blocks taken by a flush (flush.c): slot i of the
 * cache held keys[i] (its host offset) whose bytes were copied to bufs[i].
 */
struct qcow2_snap {
	unsigned n;
	uint64_t *keys;
	uint8_t **bufs;
	uint32_t *slots;
};

#define QCOW2_L2CACHE_NONE UINT32_MAX
#define QCOW2_L2CACHE_DEFAULT_BYTES (4u << 20)
/*
 * Writable images get more: every eviction of a dirty slice costs an
 * ordered write-back batch (fdatasyncs), and a stream over many L2 tables
 * dirties one slice after another.
 */
#define QCOW2_L2CACHE_WRITE_BYTES (16u << 20)
#define QCOW2_L2CACHE_MAX_SLICE (32u << 10)
#define QCOW2_L2CACHE_MIN_SLOTS 4u

/* Refcount geometry and the refcount table (host-endian, loaded whole). */
struct qcow2_refcount {
	unsigned order; /* refcount_bits = 1 << order */
	unsigned bits;
	uint64_t block_entries; /* refcounts per refcount block */
	uint64_t table_offset;
	uint64_t table_entries;
	uint64_t *table;
	/*
	 * The refcount blocks' offsets, sorted, for the overlap check (a
	 * search instead of a walk of the table on every write); rebuilt
	 * when blocks_stale (any change of table[]).
	 */
	uint64_t *blocks;
	uint64_t n_blocks;
	bool blocks_stale;
};

/*
 * Write path: a small LRU cache of refcount blocks (on-disk layout), bounded
 * in bytes like the L2 cache. A dirty block may be written back at any time:
 * it only ever holds increases (leaks at worst) and decreases whose reference
 * removal is already durable.
 */
struct qcow2_rcslot {
	uint64_t t_idx; /* refcount table index of the block */
	uint8_t *data; /* cluster_size bytes, allocated on first use */
	uint64_t stamp; /* LRU clock */
	bool used;
	bool dirty;
	bool written; /* dirtied since it was loaded */
	bool pinned; /* its bytes are being written by a flush: keep it */
};

#define QCOW2_RCACHE_BYTES (1u << 20)
#define QCOW2_RCACHE_MIN_SLOTS 4u
#define QCOW2_RCACHE_MAX_SLOTS 64u

/* A refcount decrease waiting until the reference removal is durable. */
struct qcow2_free {
	uint64_t cluster; /* host cluster index */
	uint64_t count; /* clusters from there */
};

/* Everything the write path keeps between flushes. */
struct qcow2_wstate {
	bool on; /* image opened for writing, state initialised */
	struct qcow2_rcslot *rc_slots;
	unsigned rc_nslots;
	uint64_t rc_tick;
	/* Evicted refcount blocks written back: a read from before is stale. */
	uint64_t rc_wgen;
	uint64_t rt_dirty_lo, rt_dirty_hi; /* refcount table entries [lo, hi) */
	uint64_t l1_dirty_lo, l1_dirty_hi; /* L1 entries [lo, hi) */
	bool data_dirty; /* data written since the last data fdatasync */
	bool rc_unsynced; /* refcount blocks written, not yet synced */
	bool l2_unsynced; /* L2 slices / new tables written, not yet synced */
	uint64_t free_hint; /* first cluster index worth scanning */
	struct qcow2_free *frees; /* deferred decreases */
	size_t n_frees, cap_frees;
	/* frees[0, frees_frozen) belong to the flush in flight: no merging */
	size_t frees_frozen;
	struct qcow2_flush *fl; /* the flush state machine (flush.c) */
	uint8_t *zero_cluster; /* cluster_size zero bytes (aligned) */
	/*
	 * The file is extended (fallocated) ahead of allocation, so data
	 * writes land in allocated blocks inside the file: extending or
	 * allocating direct writes are punted to io_uring's workers, which
	 * serialise them per file. Trimmed back at close.
	 */
	uint64_t open_size; /* file size when opened for writing */
	uint64_t grown_to; /* size extended to, 0 if never */
	bool grow_sync; /* the asynchronous growth failed: grow_ahead() */
	bool no_grow; /* prepare.c allocates: it grows the file itself */
	struct qcow2_prep *prep; /* prepare.c: metadata I/O in flight */
};

/* The kinds of cluster an L2 entry can describe. */
enum qcow2_ctype {
	QCOW2_C_UNALLOC = 0, /* offset 0: read the layer below */
	QCOW2_C_ZERO_PLAIN, /* reads zero, no host cluster */
	QCOW2_C_ZERO_ALLOC, /* reads zero, host cluster kept */
	QCOW2_C_NORMAL, /* data at host_off */
	QCOW2_C_COMPRESSED, /* compressed at coff, csize bytes */
};

/*
 * A decoded L2 entry. For extended L2, alloc/zero are the subcluster
 * bitmaps; for standard L2 they are synthesised (all or nothing) so that
 * callers can treat both layouts alike, one unit per subcluster.
 */
struct qcow2_l2e {
	enum qcow2_ctype type;
	bool copied;
	uint64_t host_off; /* NORMAL and ZERO_ALLOC: cluster aligned */
	uint64_t coff; /* COMPRESSED: host byte offset */
	uint64_t csize; /* COMPRESSED: bytes to read from coff */
	uint32_t alloc; /* extended L2: allocated subclusters */
	uint32_t zero; /* extended L2: reads-as-zero subclusters */
};

/* One internal snapshot (snapshot.c). */
struct qcow2_snapshot {
	struct img_snapshot pub; /* id and name point at the two below */
	char *id;
	char *name;
	uint64_t l1_offset;
	uint32_t l1_size;
};

/* One entry of the bitmap directory (bitmap.c), host-endian. */
struct qcow2_bitmap {
	char *name; /* name_size bytes and a NUL (no NUL inside) */
	uint64_t entry_pos; /* where its entry starts in the directory */
	uint64_t table_off;
	uint32_t table_size; /* entries (data clusters) */
	uint32_t flags;
	uint8_t type;
	uint8_t gran_bits;
	uint32_t extra_size;
	/*
	 * Tracked: enabled (auto), consistent (not IN_USE when opened) and
	 * opened read-write. Then table (host-endian) and data (data_bytes:
	 * every bit of the virtual size, no more) are in memory, changed[i]
	 * says data cluster i got bits since it was loaded.
	 */
	bool tracked;
	uint64_t *table;
	uint8_t *data;
	uint64_t data_bytes;
	uint8_t *changed;
};

/* A host range of bitmap metadata (the overlap check). */
struct qcow2_range {
	uint64_t off;
	uint64_t len;
};

/* The bitmaps of a read-write open (bitmap.c). */
struct qcow2_bitmaps {
	bool on; /* this writer maintains them: autoclear bit 0 is kept */
	bool in_use; /* IN_USE of the tracked bitmaps is on disk */
	uint32_t n;
	unsigned ntracked;
	uint64_t dir_off, dir_size;
	uint8_t *dir; /* the directory as on disk */
	struct qcow2_bitmap *bms;
	struct qcow2_range *meta; /* sorted, disjoint */
	size_t nmeta;
};

/* Per-image state: img->priv. */
struct qcow2 {
	struct qcow2_header hdr;
	uint8_t *hdr_raw; /* header bytes [0, header_length) as on disk */

	struct qcow2_ext *exts;
	size_t n_exts;
	struct qcow2_feature *features;
	size_t n_features;

	/* geometry */
	unsigned cluster_bits;
	uint64_t cluster_size;
	bool extended_l2;
	unsigned l2_entry_size; /* 8, or 16 with extended L2 */
	unsigned l2_bits; /* log2(entries per L2 table) */
	uint64_t l2_entries;
	uint64_t
		subcluster_size; /* cluster_size / 32 (extended), else cluster */
	unsigned csize_shift; /* compressed descriptor layout */
	uint64_t csize_mask;
	uint64_t coff_mask;

	/* state */
	uint64_t *l1; /* l1_size entries, host-endian */
	uint64_t l1_size;
	uint64_t file_size; /* image file size seen at open (refreshed) */
	uint64_t data_file_size; /* external data file, or = file_size */
	struct sio_file *data_file; /* external data file (owned) or NULL */
	char *data_file_name; /* as stored in the extension */
	char *data_file_path; /* resolved path */
	bool dirty;
	bool corrupt;
	bool has_bitmaps;
	/* Metadata-preallocated, as qemu judges it: 0 unknown, 1 no, 2 yes. */
	int prealloc;
	/* The snapshot table as read at open (snapshot.c). */
	struct qcow2_snapshot *snaps;
	uint32_t n_snaps;
	uint64_t snap_table_bytes; /* the entries read, from its offset */
	char snap_bad[160]; /* why the table could not be read whole, or "" */
	struct qcow2_refcount rc;
	struct qcow2_l2cache l2cache;
	struct qcow2_wstate w;
	struct qcow2_bitmaps bm;
	bool lock_init;
	pthread_mutex_t lock;
};

/* ---- qcow2.c ---- */

/* Refresh s->file_size (and the data file's) from the files. */
int qcow2_refresh_file_size(struct img *img, struct qcow2 *s);

/* ---- header.c ---- */

/*
 * Parse and validate cluster 0 (buf, len bytes: at least the header, up to
 * one cluster) of an image whose file is file_size bytes long. Fills s->hdr,
 * s->hdr_raw, the geometry, exts[] and features[]; sets img->size,
 * img->cluster_size, img->backing_name and img->backing_fmt. Does not touch
 * I/O. -EINVAL (corrupt), -ENOTSUP (unsupported feature), -EROFS (corrupt
 * bit on a writable open), -ENOMEM; a message names img->path.
 */
int qcow2_parse_header(struct img *img, struct qcow2 *s, const uint8_t *buf,
		       size_t len, uint64_t file_size);

/* Set the cluster/L2 geometry derived from cluster_bits and extended L2. */
void qcow2_set_geometry(struct qcow2 *s, unsigned cluster_bits,
			bool extended_l2);

/* The feature-table name of (type, bit), or NULL. */
const char *qcow2_feature_name(const struct qcow2 *s, unsigned type,
			       unsigned bit);

/* The first extension with magic, or NULL. */
const struct qcow2_ext *qcow2_find_ext(const struct qcow2 *s, uint32_t magic);

/* Free what qcow2_parse_header allocated in s (not img's strings). */
void qcow2_header_free(struct qcow2 *s);

/* ---- snapshot.c ---- */

/*
 * Read the snapshot table (after qcow2_parse_header and with s->file_size
 * set). A damaged table is not an error: s->snap_bad says what is wrong.
 * -EIO or -ENOMEM otherwise, with a message.
 */
int qcow2_snapshots_load(struct img *img, struct qcow2 *s);
void qcow2_snapshots_free(struct qcow2 *s);

/* drv->snapshots. */
int qcow2_snapshots(struct img *img, struct img_snapshot *out, int n);

/* Whether [off, off + len) overlaps the snapshot table or a snapshot L1. */
bool qcow2_snapshots_overlap(const struct qcow2 *s, uint64_t off, uint64_t len,
			     const char **hit);

/* ---- cluster.c ---- */

/*
 * Decode one L2 entry (word: the first 64 bits, bitmap: the second word of
 * an extended entry, 0 otherwise). Pure: no I/O and no range check against
 * the file. Returns 0, or -EINVAL with *why set to a static reason.
 */
int qcow2_l2e_decode(const struct qcow2 *s, uint64_t word, uint64_t bitmap,
		     struct qcow2_l2e *out, const char **why);

/*
 * The status of unit `sc` (a subcluster index; 0 for standard L2) of a
 * decoded entry. *host is the host offset of the unit when *host_valid.
 */
enum img_status qcow2_l2e_unit_status(const struct qcow2 *s,
				      const struct qcow2_l2e *e, unsigned sc,
				      uint64_t *host, bool *host_valid);

/* Decode a compressed descriptor (the entry without flag bits 62/63). */
void qcow2_decode_compressed(const struct qcow2 *s, uint64_t word,
			     uint64_t *coff, uint64_t *csize);

/* Load the active L1 table (after qcow2_parse_header). */
int qcow2_load_l1(struct img *img, struct qcow2 *s);

/*
 * Look up the L2 entry of the cluster containing guest offset off.
 * Takes no lock: callers hold s->lock.
 */
int qcow2_get_l2e(struct img *img, struct qcow2 *s, uint64_t off,
		  struct qcow2_l2e *out);

/* drv->block_status. */
unsigned qcow2_meta_want(struct img *img, uint64_t off,
			 struct img_meta_req *reqs, unsigned n, uint64_t *next);
void qcow2_meta_fill(struct img *img, const struct img_meta_req *req,
		     const void *buf);
int qcow2_block_status(struct img *img, uint64_t off, uint64_t len,
		       struct img_extent *ext);

/* ---- l2cache.c ---- */

/*
 * A cache of at most nslots slices of slice_size bytes each (a power of
 * two, >= 512). Slice memory is allocated on first use, so a small image
 * costs little. Returns 0 or -EINVAL/-ENOMEM.
 */
int qcow2_l2cache_init(struct qcow2_l2cache *c, size_t slice_size,
		       uint32_t nslots, qcow2_l2cache_io_fn load,
		       qcow2_l2cache_io_fn store, void *opaque);

/* Free everything (dirty slices are dropped: flush first). NULL-safe. */
void qcow2_l2cache_fini(struct qcow2_l2cache *c);

/*
 * The slice at host offset key (slice aligned). *data stays valid until the
 * next get/flush/drop on the cache. for_write marks the slice dirty. On a
 * miss the least recently used slice is evicted (written back first when
 * dirty). Returns 0, or the load/store error.
 */
int qcow2_l2cache_get(struct qcow2_l2cache *c, uint64_t key, bool for_write,
		      uint8_t **data);

/* Write back every dirty slice. */
int qcow2_l2cache_flush(struct qcow2_l2cache *c);

/* Forget the slices in [off, off + len) without writing them back. */
void qcow2_l2cache_drop(struct qcow2_l2cache *c, uint64_t off, uint64_t len);

/*
 * qcow2_l2cache_get for reading that never loads: -EAGAIN when the slice
 * is not cached (one lookup either way).
 */
int qcow2_l2cache_get_cached(struct qcow2_l2cache *c, uint64_t key,
			     uint8_t **data);

/* Whether the slice at key is cached (no LRU update, no I/O). */
bool qcow2_l2cache_has(const struct qcow2_l2cache *c, uint64_t key);

/*
 * Install a slice read ahead of use (buf: slice_size bytes read from key
 * when the cache's generation was gen). Nothing happens if the slice is
 * cached already or the generation moved on (the bytes may be stale).
 * Returns 1 if installed, 0 if not, -errno if evicting a dirty slice to make
 * room failed (the slice is then not installed).
 */
int qcow2_l2cache_insert(struct qcow2_l2cache *c, uint64_t key, const void *buf,
			 uint64_t gen);

/*
 * Copy every dirty slice into snap (fresh aligned buffers), mark them clean
 * and pinned (never evicted) until qcow2_l2cache_unpin(). -ENOMEM.
 */
int qcow2_l2cache_snapshot(struct qcow2_l2cache *c, struct qcow2_snap *snap);

/*
 * End of a flush's use of snap: unpin its slots (dirty again when failed:
 * their bytes may not be on disk) and free the copies.
 */
void qcow2_l2cache_unpin(struct qcow2_l2cache *c, struct qcow2_snap *snap,
			 bool failed);

/* ---- compress.c ---- */

/*
 * Inflate src (src_len bytes, possibly followed by padding) into exactly
 * dst_len bytes. type: QCOW2_COMPRESSION_ZLIB (raw deflate) or _ZSTD.
 * Returns 0, or -EIO (corrupt data or wrong output size), -ENOTSUP
 * (unknown type), -ENOMEM, with *why set to a static reason. No message.
 */
int qcow2_decompress(int type, const void *src, size_t src_len, void *dst,
		     size_t dst_len, const char **why);

/* drv->read_compressed. */
int qcow2_read_compressed(struct img *img, uint64_t off, void *buf);

/* read_compressed for a decoded entry e; the caller holds s->lock. */
int qcow2_read_compressed_entry(struct img *img, struct qcow2 *s,
				const struct qcow2_l2e *e, uint64_t off,
				void *buf);

/* ---- refcount.c ---- */

/*
 * Check the refcount geometry (order, table location) and load the
 * refcount table. After qcow2_parse_header.
 */
int qcow2_refcount_init(struct img *img, struct qcow2 *s);
void qcow2_refcount_free(struct qcow2 *s);

/* Refcount entry idx of a refcount block in on-disk layout. */
uint64_t qcow2_refcount_entry_get(const uint8_t *block, unsigned order,
				  uint64_t idx);
void qcow2_refcount_entry_set(uint8_t *block, unsigned order, uint64_t idx,
			      uint64_t value);

/* The refcount of the host cluster with index cluster (host_off >> bits). */
int qcow2_refcount_get(struct img *img, struct qcow2 *s, uint64_t cluster,
		       uint64_t *refcount);

/* ---- header_write.c ---- */

/*
 * Build cluster 0 into buf (cs bytes): h's fields over hdr_raw (the header
 * as read, header_length bytes, so unknown trailing fields survive; NULL
 * for a new image), then exts in order (END entries skipped), the end
 * marker and the backing name (NULL: none; backing_file_offset/size are
 * derived). -ENOSPC when it does not fit, -ENAMETOOLONG, -EINVAL.
 */
int qcow2_build_cluster0(const struct qcow2_header *h, const uint8_t *hdr_raw,
			 const struct qcow2_ext *exts, size_t n_exts,
			 const char *backing, uint8_t *buf, size_t cs);

/* ---- create.c ---- */

/* drv->create. */
int qcow2_create(struct sio_file *f, const struct img_create_opts *o);

/* ---- write path (refcount.c) ---- */

/* Set up / free the refcount-block cache and the deferred-free list. */
int qcow2_rc_init_write(struct img *img, struct qcow2 *s);
void qcow2_rc_fini_write(struct qcow2 *s);

/*
 * Add delta (+1 or -1) to the refcount of host cluster index cluster, in
 * memory (the block becomes dirty). +1 creates the refcount block (and
 * grows the table) when needed. -EINVAL on overflow of the refcount width,
 * -EIO when a refcount would drop below zero.
 */
int qcow2_rc_update(struct img *img, struct qcow2 *s, uint64_t cluster,
		    int delta);

/*
 * First-fit allocation of up to n contiguous free host clusters from the
 * free hint, growing the file at the end. *host, *got (>= 1): the run,
 * refcounted in memory. Fewer than n only when the free run is shorter.
 */
/* Refcount block t (a refcount-table index) is cached. */
bool qcow2_rc_cached(const struct qcow2 *s, uint64_t t);

/*
 * Move the free hint up to the first free cluster from it, reading only
 * cached refcount blocks: true when it is there; false and *t when block t
 * (on disk, not cached) must be read first. Clusters below the first free
 * one are all in use, so the hint stays a valid lower bound; what it buys
 * is an allocation whose start is known before it runs (prepare.c).
 */
bool qcow2_rc_advance_hint(struct qcow2 *s, uint64_t *t);

/*
 * A refcount block that applying frees[0, n) would read (on disk, not
 * cached): true and *t (its table index), else false. No I/O.
 */
bool qcow2_rc_frees_missing(const struct qcow2 *s, size_t n, uint64_t *t);

/*
 * Cache refcount block t from buf (its bytes as read from the disk), clean;
 * nothing when it is cached already. May write a dirty victim back.
 */
int qcow2_rc_install(struct img *img, struct qcow2 *s, uint64_t t,
		     const void *buf);

/*
 * The size the file grows to when an allocation ends at byte end (*from:
 * where the growth starts), or 0 when it need not grow.
 */
uint64_t qcow2_grow_target(const struct qcow2 *s, uint64_t end, uint64_t *from);

/* Trim the file's sparse tail after the final flush (close). */
void qcow2_trim_tail(struct img *img, struct qcow2 *s);

int qcow2_alloc_clusters(struct img *img, struct qcow2 *s, uint64_t n,
			 uint64_t *host, uint64_t *got);

/*
 * Queue a decrease of every host cluster that [off, off + len) touches,
 * applied by qcow2_rc_apply_frees once the reference removal is durable.
 */
int qcow2_free_deferred(struct img *img, struct qcow2 *s, uint64_t off,
			uint64_t len);
int qcow2_rc_apply_frees(struct img *img, struct qcow2 *s);
/* Apply frees[0, n) only (those a flush made durable), keep the rest. */
int qcow2_rc_apply_frees_upto(struct img *img, struct qcow2 *s, size_t n);

/*
 * A flush's snapshot bookkeeping (l2cache.c): room for n entries (none
 * when n is 0); one copy of len bytes of data under key and slot (room
 * must be left); everything freed and zeroed. -ENOMEM.
 */
int qcow2_snap_alloc(struct qcow2_snap *snap, unsigned n);
int qcow2_snap_add(struct qcow2_snap *snap, uint64_t key, uint32_t slot,
		   const void *data, size_t len);
void qcow2_snap_free(struct qcow2_snap *snap);

/* Refcount-block counterparts of qcow2_l2cache_snapshot / _unpin. */
int qcow2_rc_snapshot(struct qcow2 *s, struct qcow2_snap *snap);
void qcow2_rc_unpin(struct qcow2 *s, struct qcow2_snap *snap, bool failed);

/* Whether an asynchronous flush is in flight (flush.c). */
bool qcow2_flush_busy_locked(const struct qcow2 *s);

/* Write dirty refcount blocks, sync, then dirty table entries, sync. */
int qcow2_rc_flush(struct img *img, struct qcow2 *s);

/*
 * -EIO with a message when [off, off + len) overlaps the header, the L1
 * table, the refcount table, a refcount block or bitmap metadata (the
 * directory, tables and data clusters of the bitmaps this writer keeps).
 */
int qcow2_check_overlap(struct img *img, struct qcow2 *s, uint64_t off,
			uint64_t len, const char *what);

/*
 * What of the header, L1 table, refcount table and blocks, snapshot table
 * and snapshot L1 tables [off, off + len) overlaps ("header", ...), or
 * NULL; qcow2_check_overlap also checks the bitmaps' metadata. Not const:
 * it keeps a sorted copy of the refcount blocks' offsets.
 */
const char *qcow2_overlap_core(struct qcow2 *s, uint64_t off, uint64_t len);

/* ---- write path (cluster.c) ---- */

/*
 * Set the L2 entry of the guest cluster containing guest_off (bitmap: the
 * second word for extended L2), in the cache; creates the L2 table when
 * the L1 entry is empty. Caller holds s->lock.
 */
int qcow2_l2_set(struct img *img, struct qcow2 *s, uint64_t guest_off,
		 uint64_t word, uint64_t bitmap);

/* L1 entry i changed in memory: written by the next flush. */
void qcow2_l1_mark_dirty(struct qcow2 *s, uint64_t i);

/* Write the dirty L1 entries and sync. */
int qcow2_l1_flush(struct img *img, struct qcow2 *s);

/* ---- write path (header.c) ---- */

/* Refuse images the write path cannot write (-ENOTSUP, -EUCLEAN). */
int qcow2_check_writable(struct img *img, struct qcow2 *s);

/*
 * Clear unknown autoclear bits on disk (v3), and the bitmaps bit unless
 * s->bm.on (this writer keeps the bitmaps).
 */
int qcow2_clear_autoclear(struct img *img, struct qcow2 *s);

/* drv->set_backing. */
int qcow2_set_backing(struct img *img, const char *name, const char *fmt);

/* ---- write path (flush.c) ---- */

/* Set up / tear down the write state of an image opened for writing. */
int qcow2_write_open(struct img *img, struct qcow2 *s);
void qcow2_write_close(struct img *img, struct qcow2 *s);

/* The L2 cache's store hook: orders data and refcounts first. */
/*
 * Write entries [lo, hi) of a host-endian table of 64-bit entries (L1,
 * refcount table) to its big-endian copy at table_offset, then fdatasync.
 * 0 or -errno, no message.
 */
int qcow2_write_table_range(struct img *img, const uint64_t *table, uint64_t lo,
			    uint64_t hi, uint64_t table_offset);
int qcow2_l2_store(void *opaque, uint64_t key, void *buf, size_t len);
/* The L2 cache's batched write-back (store_many): one ordering, n writes. */
int qcow2_l2_store_many(void *opaque, const uint64_t *keys,
			uint8_t *const *bufs, unsigned n, size_t len);

/* The full flush order; caller holds s->lock. */
int qcow2_flush_locked(struct img *img, struct qcow2 *s);

/* drv->flush. */
int qcow2_flush(struct img *img);

/* drv->flush_start, drv->flush_wait (format.h). */
int qcow2_flush_start(struct img *img, struct img_port *port,
		      void (*done)(void *opaque, int res), void *opaque);
int qcow2_flush_wait(struct img *img);

/* drv->prepare_write (prepare.c). */
int qcow2_prepare_write(struct img *img, uint64_t off, uint64_t nclusters,
			void (*done)(void *opaque, int res), void *opaque);

/* drv->prepare_discard (prepare.c). */
int qcow2_prepare_discard(struct img *img, uint64_t off, uint64_t len,
			  unsigned flags, void (*done)(void *opaque, int res),
			  void *opaque);

/* drv->block_status_nowait (cluster.c). */
int qcow2_block_status_nowait(struct img *img, uint64_t off, uint64_t len,
			      struct img_extent *ext, struct img_meta_req *req);

/* ---- write path (write.c) ---- */

int qcow2_alloc_run(struct img *img, uint64_t off, uint64_t nclusters,
		    uint64_t *host_off, uint64_t *got);
/* drv->release_run: give back clusters from alloc_run never committed. */
void qcow2_release_run(struct img *img, uint64_t host_off, uint64_t nclusters);
int qcow2_commit_run(struct img *img, uint64_t off, uint64_t nclusters,
		     uint64_t host_off, unsigned flags);
int qcow2_pwrite(struct img *img, const void *buf, uint64_t len, uint64_t off);
int qcow2_write_zeroes(struct img *img, uint64_t off, uint64_t len,
		       unsigned flags);
int qcow2_discard(struct img *img, uint64_t off, uint64_t len);

/* ---- bitmap.c ---- */

/*
 * Parse and validate the bitmap directory (bitmaps extension present)
 * into bm against the file: the directory and tables aligned and inside
 * it, table sizes matching the virtual size and granularity, names and
 * padding. Reads the directory only. -EINVAL (corrupt) with a message,
 * -ENOMEM, I/O errors. qcow2_bitmaps_free() it either way.
 */
/*
 * The bitmaps extension's own fields (length, count, reserved field,
 * directory size and alignment), as qemu checks them on open while the
 * bitmaps are marked consistent: 0 or -EINVAL (message set).
 */
int qcow2_bitmaps_ext_check(struct img *img, const struct qcow2 *s,
			    const struct qcow2_ext *x);
int qcow2_bitmaps_parse(struct img *img, const struct qcow2 *s,
			struct qcow2_bitmaps *bm);
void qcow2_bitmaps_free(struct qcow2_bitmaps *bm);

/*
 * Read-write open of a v3 image whose bitmaps are consistent (extension
 * and autoclear bit 0): parse them, refuse (-ENOTSUP, naming the bitmap)
 * what cannot be kept right (unknown type or flags, incompatible extra
 * data, unsupported granularity), load the tables of all and the data of
 * the tracked ones, and set s->bm.on. No writes. 0 when there is nothing
 * to do.
 */
int qcow2_bitmaps_open(struct img *img, struct qcow2 *s);

/* Write IN_USE into the tracked bitmaps' entries and sync (open). */
int qcow2_bitmaps_mark_in_use(struct img *img, struct qcow2 *s);

/*
 * Clean close, after the final flush (s->lock held): write the tracked
 * bitmaps back and clear their IN_USE (see bitmap.c for the order).
 */
int qcow2_bitmaps_store(struct img *img, struct qcow2 *s);

/* drv->mark_dirty: set the bits of [off, off + len) in tracked bitmaps. */
void qcow2_mark_dirty(struct img *img, uint64_t off, uint64_t len);

/* Which bitmap metadata [off, off + len) overlaps, or NULL. */
const char *qcow2_bitmaps_overlap(const struct qcow2 *s, uint64_t off,
				  uint64_t len);

/* `siphon info` lines of the bitmaps; returns how many (at most n). */
int qcow2_bitmaps_info(struct img *img, const struct qcow2 *s,
		       struct img_info_item *items, int n);

/* ---- check.c ---- */

/*
 * Check (and with wfile and o->repair, repair) the image whose state s
 * holds, reading through img->file: see formats/format.h. 0 with r
 * filled, -errno when the check could not be completed.
 */
int qcow2_check_image(struct img *img, struct qcow2 *s, struct sio_file *wfile,
		      const struct img_check_opts *o,
		      struct img_check_report *r);

/* drv->check: qcow2_check_image, then the dirty/corrupt bits set right. */
int qcow2_check(struct img *img, struct sio_file *wfile,
		const struct img_check_opts *o, struct img_check_report *r);

/*
 * Set and clear incompatible feature bits in the header through f, then
 * fdatasync; s follows. -ENOTSUP on a version 2 image (it has none).
 */
int qcow2_set_incompat(struct img *img, struct qcow2 *s, struct sio_file *f,
		       uint64_t set, uint64_t clear);

#endif
