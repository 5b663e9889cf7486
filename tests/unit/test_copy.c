/*
 * The copy pipeline (engine/copy.c): its contract tested directly, on small
 * qcow2 chains made with img_create in a temp dir. A copied range reads as
 * the chain did and is held by the top; clusters the top holds are never
 * rewritten; a cluster allocated by someone else between the read and the
 * commit keeps its data (and fails a verifying op with -EIO); a failed
 * write gives its runs back (qemu-img check finds no leak); compressed
 * backing clusters go through the inflater; caller data laid over the
 * chain's ends up in the image, and the clusters it covers are not read.
 *
 * Exits 77 when io_uring is refused or qemu-img/qemu-io are missing (the
 * oracle for leaks, and the maker of compressed clusters).
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/error.h"
#include "engine/copy.h"
#include "formats/image.h"
#include "io/io.h"
#include "testutil.h"

#define KiB 1024ull
#define CS (64 * KiB)
#define SIZE (1024 * KiB)

static char tmpdir[] = "/tmp/siphon-copy-XXXXXX";

static const char *tpath(const char *name)
{
	return dir_path(tmpdir, name);
}

/* A qcow2 image of SIZE bytes, 64 KiB clusters, on backing (or none). */
static void create(const char *path, const char *backing, const char *fmt)
{
	struct img_create_opts o = {
		.size = SIZE,
		.cluster_size = CS,
		.backing = backing,
		.backing_fmt = fmt,
	};

	ck_assert_msg(img_create(path, "qcow2", &o) == 0, "%s",
		      sx_last_error());
}

static struct img *open_img(const char *path, unsigned flags)
{
	struct img *img = NULL;
	int ret = img_open(path, "qcow2", flags, &img);

	ck_assert_msg(ret == 0, "open %s: %s", path, sx_last_error());
	return img;
}

static void fill(uint8_t *p, size_t len, unsigned seed)
{
	size_t i;

	for (i = 0; i < len; i++)
		p[i] = (uint8_t)(seed * 37 + i * 13 + (i >> 10) + 1);
}

/* Write cluster cl of path with pattern seed (through the driver). */
static void write_cluster(struct img *img, uint64_t cl, unsigned seed)
{
	uint8_t *b = malloc(CS);

	fill(b, CS, seed);
	ck_assert_msg(img_pwrite(img, b, CS, cl * CS) == 0, "%s",
		      sx_last_error());
	free(b);
}

/*
 * base.qcow2 with data in clusters 0-7 but 3 (left as zeros) and top.qcow2
 * on it, empty; returns the top's path.
 */
static const char *make_chain(const char *name)
{
	char base[64], top[64];
	struct img *b;
	uint64_t cl;

	snprintf(base, sizeof(base), "%s.base.qcow2", name);
	snprintf(top, sizeof(top), "%s.qcow2", name);
	create(tpath(base), NULL, NULL);
	b = open_img(tpath(base), IMG_OPEN_RDWR);
	for (cl = 0; cl < 8; cl++)
		if (cl != 3)
			write_cluster(b, cl, (unsigned)cl + 1);
	ck_assert_int_eq(img_flush(b), 0);
	img_close(b);
	create(tpath(top), base, "qcow2");
	return tpath(top);
}

/* One disk: the top, its queue and copier. */
struct disk {
	struct img *top;
	struct sio_queue *q;
	struct copier *c;
};

static void disk_open(struct disk *d, const char *path)
{
	d->top = open_img(path, IMG_OPEN_RDWR);
	ck_assert_int_eq(sio_queue_create(32, &d->q), 0);
	ck_assert_int_eq(copier_create(d->top, d->q, &d->c), 0);
}

static void disk_close(struct disk *d)
{
	ck_assert_uint_eq(copier_inflight(d->c), 0);
	copier_destroy(d->c);
	sio_queue_destroy(d->q);
	ck_assert_int_eq(img_flush(d->top), 0);
	img_close(d->top);
}

/* An op and what its callbacks saw. */
struct run {
	struct copy_op op;
	struct disk *d;
	bool ready_called;
	bool done;
	int err;
	/* ready(): lay `over` over [over_off, over_off + over_len) */
	const uint8_t *over;
	uint64_t over_off, over_len;
	/* ready(): write cluster race_cl of the top with race_seed */
	int64_t race_cl;
	unsigned race_seed;
};

static int run_ready(struct copy_op *op)
{
	struct run *r = op->priv;

	r->ready_called = true;
	if (r->over)
		memcpy(op->buf + (r->over_off - op->off), r->over, r->over_len);
	/* Someone else allocates a cluster between the read and commit. */
	if (r->race_cl >= 0)
		write_cluster(r->d->top, (uint64_t)r->race_cl, r->race_seed);
	return 0;
}

static void run_done(struct copy_op *op, int err)
{
	struct run *r = op->priv;

	r->done = true;
	r->err = err;
}

static void run_init(struct run *r, struct disk *d, uint64_t off, uint64_t len,
		     unsigned flags)
{
	memset(r, 0, sizeof(*r));
	r->d = d;
	r->race_cl = -1;
	r->op.off = off;
	r->op.len = len;
	r->op.buf = sio_buf_alloc(len);
	ck_assert_ptr_nonnull(r->op.buf);
	r->op.flags = flags;
	r->op.ready = run_ready;
	r->op.done = run_done;
	r->op.priv = r;
}

/* Drive the owner's queue until the op is done. */
static void run_wait(struct run *r)
{
	int ret;

	while (!r->done) {
		ret = sio_queue_run(r->d->q, 1);
		ck_assert_int_ge(ret, 0);
		ck_assert_msg(ret > 0 || r->done || sio_queue_inflight(r->d->q),
			      "op stuck with nothing in flight");
	}
	sio_buf_free(r->op.buf);
	r->op.buf = NULL;
}

/* The top itself holds cluster cl as data; its host offset. */
static uint64_t top_host(struct img *top, uint64_t cl)
{
	struct img_extent e;

	ck_assert_int_eq(img_block_status(top, cl * CS, CS, &e), 0);
	ck_assert_msg(e.status == IMG_DATA, "cluster %llu: status %d",
		      (unsigned long long)cl, (int)e.status);
	return e.host_off;
}

static bool top_lacks(struct img *top, uint64_t cl)
{
	return img_lacks_all(top, cl * CS, CS);
}

/* The chain's [0, len), read the synchronous way. */
static uint8_t *chain_read(struct img *top, uint64_t len)
{
	uint8_t *b = malloc(len);

	ck_assert_int_eq(img_pread(top, b, len, 0), 0);
	return b;
}

static void assert_chain_is(struct img *top, const uint8_t *want, uint64_t len)
{
	uint8_t *now = chain_read(top, len);

	ck_assert_msg(memcmp(now, want, len) == 0, "the image reads otherwise");
	free(now);
}

/* The image is consistent and leaks nothing. */
static void check_image(const char *path)
{
	RUN("qemu-img check -q -f qcow2 '%s'", path);
}

START_TEST(t_reads_as_chain)
{
	const char *p = make_chain("rc");
	struct disk d;
	struct run r;
	uint8_t *before;
	struct img *alone;
	uint8_t *b0, *b1;
	uint64_t cl;

	disk_open(&d, p);
	before = chain_read(d.top, SIZE);
	run_init(&r, &d, 0, 8 * CS, 0);
	copy_start(d.c, &r.op);
	run_wait(&r);
	ck_assert_msg(r.err == 0, "copy: %s", sx_last_error());
	ck_assert(r.ready_called);
	ck_assert_uint_eq(r.op.written, 7 * CS);
	for (cl = 0; cl < 8; cl++)
		if (cl == 3)
			ck_assert(top_lacks(d.top, cl)); /* zeros: skipped */
		else
			top_host(d.top, cl);
	assert_chain_is(d.top, before, SIZE);
	disk_close(&d);

	/* The data is the top's own, not the backing's showing through. */
	alone = open_img(p, IMG_OPEN_NO_BACKING);
	b0 = malloc(8 * CS);
	b1 = malloc(8 * CS);
	ck_assert_int_eq(img_pread(alone, b0, 8 * CS, 0), 0);
	memcpy(b1, before, 8 * CS);
	ck_assert(memcmp(b0, b1, 8 * CS) == 0);
	img_close(alone);
	check_image(p);
	free(b0);
	free(b1);
	free(before);
}
END_TEST

START_TEST(t_top_held_kept)
{
	const char *p = make_chain("th");
	uint64_t host2;
	struct disk d;
	struct run r;
	uint8_t *before;

	disk_open(&d, p);
	write_cluster(d.top, 2, 99);
	host2 = top_host(d.top, 2);
	before = chain_read(d.top, SIZE);
	run_init(&r, &d, 0, 4 * CS, 0);
	copy_start(d.c, &r.op);
	run_wait(&r);
	ck_assert_msg(r.err == 0, "copy: %s", sx_last_error());
	/* Clusters 0, 1, 3 (zeros skipped): 2 was not written again. */
	ck_assert_uint_eq(r.op.written, 2 * CS);
	ck_assert_uint_eq(top_host(d.top, 2), host2);
	top_host(d.top, 0);
	top_host(d.top, 1);
	assert_chain_is(d.top, before, SIZE);
	disk_close(&d);
	check_image(p);
	free(before);
}
END_TEST

/* _i: 0 plain commit, 1 COPY_VERIFY. */
START_TEST(t_race_before_commit)
{
	const char *p = make_chain(_i ? "rv" : "rp");
	struct disk d;
	struct run r;
	uint8_t *want;

	disk_open(&d, p);
	want = chain_read(d.top, SIZE);
	fill(want + 1 * CS, CS, 77); /* what the other writer wrote */
	run_init(&r, &d, 0, 4 * CS, _i ? COPY_VERIFY : 0);
	r.race_cl = 1;
	r.race_seed = 77;
	copy_start(d.c, &r.op);
	run_wait(&r);
	if (_i)
		ck_assert_int_eq(r.err, -EIO);
	else
		ck_assert_msg(r.err == 0, "copy: %s", sx_last_error());
	/* Either way the other writer's cluster keeps its data. */
	assert_chain_is(d.top, want, SIZE);
	top_host(d.top, 0);
	top_host(d.top, 2);
	disk_close(&d);
	check_image(p);
	free(want);
}
END_TEST

START_TEST(t_failed_write_releases)
{
	const char *p = make_chain("fw");
	struct disk d;
	struct run r;
	struct stat st;
	uint8_t *before;
	uint64_t cl;

	disk_open(&d, p);
	before = chain_read(d.top, SIZE);
	ck_assert_int_eq(stat(p, &st), 0);
	/* The data write goes past the file's end: fail it, once. */
	ck_assert_int_eq(sio_fault_add(SIO_OP_WRITE, "fw.qcow2",
				       (uint64_t)st.st_size, 0, EIO, 1, 0),
			 0);
	run_init(&r, &d, 0, 8 * CS, 0);
	copy_start(d.c, &r.op);
	run_wait(&r);
	sio_fault_clear();
	ck_assert_int_eq(r.err, -EIO);
	/* The data write failed, after its run was allocated. */
	ck_assert_msg(strstr(sx_last_error(), "write at offset"), "%s",
		      sx_last_error());
	for (cl = 0; cl < 8; cl++)
		ck_assert(top_lacks(d.top, cl));
	assert_chain_is(d.top, before, SIZE);
	disk_close(&d);
	/* Exit 3 would be leaked clusters: the runs were given back. */
	check_image(p);
	free(before);
}
END_TEST

START_TEST(t_compressed_inflater)
{
	const char *raw = tpath("cz.raw"), *base = tpath("cz.base.qcow2");
	const char *p = tpath("cz.qcow2");
	struct img_extent e;
	struct disk d;
	struct run r;
	unsigned depth;
	uint8_t *before;
	uint64_t cl;

	RUN("qemu-img create -q -f raw '%s' 1M && "
	    "qemu-io -f raw -c 'write -P 0x5a 0 256k' -c 'write -P 0x3c 256k 64k'"
	    " '%s' >/dev/null && "
	    "qemu-img convert -c -O qcow2 -o cluster_size=65536 '%s' '%s'",
	    raw, raw, raw, base);
	create(p, "cz.base.qcow2", "qcow2");
	disk_open(&d, p);
	ck_assert_int_eq(img_chain_status(d.top, NULL, 0, CS, &e, &depth), 0);
	ck_assert_int_eq(e.status, IMG_COMPRESSED);
	before = chain_read(d.top, SIZE);
	run_init(&r, &d, 0, 8 * CS, 0);
	copy_start(d.c, &r.op);
	/* Only compressed pieces: nothing could be read on this thread. */
	ck_assert(!r.ready_called);
	ck_assert(!r.done);
	run_wait(&r);
	ck_assert_msg(r.err == 0, "copy: %s", sx_last_error());
	ck_assert(r.ready_called);
	ck_assert_uint_eq(r.op.written, 5 * CS);
	for (cl = 0; cl < 5; cl++)
		top_host(d.top, cl);
	assert_chain_is(d.top, before, SIZE);
	disk_close(&d);
	check_image(p);
	free(before);
}
END_TEST

START_TEST(t_caller_data)
{
	const char *p = make_chain("cd");
	struct img_extent e;
	struct img *base;
	struct disk d;
	struct run r;
	uint8_t *want, over[128 * KiB];

	disk_open(&d, p);
	want = chain_read(d.top, SIZE);
	fill(over, sizeof(over), 55);
	memcpy(want + 32 * KiB, over, sizeof(over));
	/*
	 * Cluster 1 lies wholly under the caller's data: reading it would
	 * fail, so the op must not read it.
	 */
	base = img_layer(d.top, 1);
	ck_assert_int_eq(img_block_status(base, CS, CS, &e), 0);
	ck_assert_int_eq(e.status, IMG_DATA);
	ck_assert_int_eq(sio_fault_add(SIO_OP_READ, "cd.base.qcow2", e.host_off,
				       CS, EIO, 0, 0),
			 0);
	run_init(&r, &d, 0, 3 * CS, COPY_WRITE_ZEROS | COPY_VERIFY);
	r.op.cover_off = 32 * KiB;
	r.op.cover_len = sizeof(over);
	r.over = over;
	r.over_off = 32 * KiB;
	r.over_len = sizeof(over);
	copy_start(d.c, &r.op);
	run_wait(&r);
	sio_fault_clear();
	ck_assert_msg(r.err == 0, "copy: %s", sx_last_error());
	ck_assert_uint_eq(r.op.written, 3 * CS);
	assert_chain_is(d.top, want, SIZE);
	disk_close(&d);
	check_image(p);
	free(want);
}
END_TEST

/* What done() saw of op->top (valid in done() only). */
static uint8_t held_seen[16];

static void held_done(struct copy_op *op, int err)
{
	uint64_t i;

	for (i = 0; i < op->len / CS && i < sizeof(held_seen); i++)
		held_seen[i] = op->top ? op->top[i] : 0;
	run_done(op, err);
}

/*
 * COPY_SKIP_TOP: the clusters the top holds are not read, one read runs
 * over them when they are short gaps in a contiguous base, and the runs
 * between them (allocated one after the other) go out as one vectored
 * write: a few local clusters do not split the device's requests. With
 * gap_max below the gap, the read splits around it.
 */
START_TEST(t_skip_top_large_requests)
{
	struct copier_stats st0, st1;
	uint64_t host2, host5, gap = (uint64_t)_i ? 0 : CS;
	char base[64];
	struct img *alone;
	struct disk d;
	struct run r;
	uint8_t *before, *b;
	FILE *f;

	snprintf(base, sizeof(base), "%s", tpath(_i ? "sk1.raw" : "sk0.raw"));
	f = fopen(base, "wb");
	ck_assert_ptr_nonnull(f);
	b = malloc(SIZE);
	fill(b, SIZE, 7);
	ck_assert_uint_eq(fwrite(b, 1, SIZE, f), SIZE);
	fclose(f);
	free(b);
	create(tpath(_i ? "sk1.qcow2" : "sk0.qcow2"), base, "raw");
	disk_open(&d, tpath(_i ? "sk1.qcow2" : "sk0.qcow2"));
	write_cluster(d.top, 2, 21);
	write_cluster(d.top, 5, 51);
	host2 = top_host(d.top, 2);
	host5 = top_host(d.top, 5);
	before = chain_read(d.top, SIZE);
	copier_get_stats(d.c, &st0);
	run_init(&r, &d, 0, 8 * CS, COPY_SKIP_TOP);
	r.op.gap_max = gap;
	r.op.done = held_done;
	memset(held_seen, 0, sizeof(held_seen));
	copy_start(d.c, &r.op);
	run_wait(&r);
	ck_assert_msg(r.err == 0, "copy: %s", sx_last_error());
	copier_get_stats(d.c, &st1);
	ck_assert_uint_eq(r.op.written, 6 * CS);
	ck_assert(held_seen[2] && held_seen[5]);
	ck_assert(!held_seen[0] && !held_seen[1] && !held_seen[3] &&
		  !held_seen[4] && !held_seen[6] && !held_seen[7]);
	if (gap) {
		/* One read of the 8 clusters, local ones included. */
		ck_assert_uint_eq(st1.reads - st0.reads, 1);
		ck_assert_uint_eq(st1.read_bytes - st0.read_bytes, 8 * CS);
	} else {
		ck_assert_uint_eq(st1.reads - st0.reads, 3);
		ck_assert_uint_eq(st1.read_bytes - st0.read_bytes, 6 * CS);
	}
	/* Three runs, one after the other on the device: one write. */
	ck_assert_uint_eq(st1.writes - st0.writes, 1);
	ck_assert_uint_eq(st1.write_bytes - st0.write_bytes, 6 * CS);
	ck_assert_uint_eq(top_host(d.top, 2), host2);
	ck_assert_uint_eq(top_host(d.top, 5), host5);
	assert_chain_is(d.top, before, SIZE);
	disk_close(&d);
	/* The top alone holds the chain's first 8 clusters. */
	alone = open_img(tpath(_i ? "sk1.qcow2" : "sk0.qcow2"),
			 IMG_OPEN_NO_BACKING);
	b = malloc(8 * CS);
	ck_assert_int_eq(img_pread(alone, b, 8 * CS, 0), 0);
	ck_assert(memcmp(b, before, 8 * CS) == 0);
	img_close(alone);
	free(b);
	check_image(tpath(_i ? "sk1.qcow2" : "sk0.qcow2"));
	free(before);
}
END_TEST

START_TEST(t_bad_args)
{
	const char *p = make_chain("ba");
	struct disk d;
	struct run r;

	disk_open(&d, p);
	run_init(&r, &d, 512, CS, 0);
	copy_start(d.c, &r.op);
	ck_assert(r.done); /* refused at once, through done() */
	ck_assert_int_eq(r.err, -EINVAL);
	sio_buf_free(r.op.buf);
	run_init(&r, &d, SIZE - CS, 2 * CS, 0);
	copy_start(d.c, &r.op);
	ck_assert_int_eq(r.err, -EINVAL);
	sio_buf_free(r.op.buf);
	disk_close(&d);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("copy");
	TCase *tc = tcase_create("copy");

	tcase_add_test(tc, t_reads_as_chain);
	tcase_add_test(tc, t_top_held_kept);
	tcase_add_loop_test(tc, t_race_before_commit, 0, 2);
	tcase_add_test(tc, t_failed_write_releases);
	tcase_add_test(tc, t_compressed_inflater);
	tcase_add_test(tc, t_caller_data);
	tcase_add_loop_test(tc, t_skip_top_large_requests, 0, 2);
	tcase_add_test(tc, t_bad_args);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return run_suite(suite(), tmpdir, RUN_URING | RUN_QEMU);
}
