/*
 * The in-flight controller (engine/inflight.c) against a simulated device:
 * a discrete-event simulation in simulated time, no threads, no I/O, no
 * clock, deterministic (a fixed-seed generator for the jitter).
 *
 * The device: slots requests are served at once, the rest wait in FIFO
 * order. A request in a slot first waits its access latency (lat), then
 * transfers its bytes at min(req_bw, cap_bw / transfers running): a cap
 * shared by the requests in flight. Jitter scales each access latency and
 * each request's rate by 1 +- jitter (uniform). At step_t the bandwidths
 * are multiplied by step_bw and the latency by step_lat, at back_t back.
 *
 * The stream on top keeps starting extents of ifc_extent_bytes() while
 * ifc_may_start() allows, at time 0 and after each completion.
 *
 * What "optimal" means is measured on the same simulator: every fixed
 * configuration (depth x size, 256 KiB .. 8 MiB, within the memory bound)
 * runs with the overrides; the best throughput is the optimum, and the knee
 * is the smallest window that reached 90% of it (its mean latency is the
 * bound the controller's latency is held to).
 *
 * Each test names the property it checks and fails if it is broken.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>

#include "engine/inflight.h"
#include "testutil.h"

#define KIB (1024ull)
#define MIB (1024ull * 1024)
#define MAX_REQS 1024
#define BUCKET 0.1 /* seconds per measurement bucket */
#define MAX_BUCKETS 800

struct dev {
	unsigned slots;
	double lat; /* s */
	double req_bw; /* B/s */
	double cap_bw; /* B/s */
	double jitter;
	double step_t, step_bw, step_lat; /* step_t 0: none */
	double back_t; /* 0: no step back */
};

enum { R_FREE, R_QUEUED, R_ACCESS, R_XFER };

struct req {
	int state;
	double start;
	double access_end;
	double left;
	double rate_f;
	uint64_t bytes;
	uint64_t seq;
};

struct sim {
	struct dev d;
	struct ifc c;
	struct req r[MAX_REQS];
	unsigned hi; /* r[hi..] are all free */
	uint64_t seq;
	uint64_t rng;
	double t;
	/* Measurements per bucket. */
	double bytes[MAX_BUCKETS];
	double lat_sum[MAX_BUCKETS];
	unsigned done[MAX_BUCKETS];
	double target_dt[MAX_BUCKETS]; /* integral of the window over time */
	uint64_t max_inflight; /* bytes, over the run */
	bool check_fixed; /* assert today's fixed 8 x 1 MiB behaviour */
	uint64_t cap_extent; /* the stream's extents at most this, 0: no cap */
	unsigned fixed_violations;
	unsigned max_count;
};

static double rnd(struct sim *s)
{
	s->rng ^= s->rng << 13;
	s->rng ^= s->rng >> 7;
	s->rng ^= s->rng << 17;
	return (double)(s->rng >> 11) / (double)(1ull << 53);
}

static double jit(struct sim *s)
{
	return 1.0 + s->d.jitter * (2.0 * rnd(s) - 1.0);
}

static bool stepped(const struct sim *s, double t)
{
	return s->d.step_t > 0 && t >= s->d.step_t &&
	       !(s->d.back_t > 0 && t >= s->d.back_t);
}

static double cur_lat(const struct sim *s)
{
	return s->d.lat * (stepped(s, s->t) ? s->d.step_lat : 1.0);
}

static double cur_bw_f(const struct sim *s)
{
	return stepped(s, s->t) ? s->d.step_bw : 1.0;
}

static uint64_t ns(double t)
{
	return (uint64_t)llround(t * 1e9);
}

static unsigned busy_slots(const struct sim *s)
{
	unsigned i, n = 0;

	for (i = 0; i < s->hi; i++)
		n += s->r[i].state == R_ACCESS || s->r[i].state == R_XFER;
	return n;
}

/* Put the oldest queued requests into free slots. */
static void dispatch(struct sim *s)
{
	unsigned busy = busy_slots(s);

	while (busy < s->d.slots) {
		struct req *best = NULL;
		unsigned i;

		for (i = 0; i < s->hi; i++)
			if (s->r[i].state == R_QUEUED &&
			    (!best || s->r[i].seq < best->seq))
				best = &s->r[i];
		if (!best)
			break;
		best->state = R_ACCESS;
		best->access_end = s->t + cur_lat(s) * jit(s);
		busy++;
	}
}

/* The stream: start extents while the controller allows. */
static void fill(struct sim *s)
{
	for (;;) {
		uint64_t b = ifc_extent_bytes(&s->c);
		bool may;
		unsigned i;

		/* Runs shorter than the request size (local clusters). */
		if (s->cap_extent && b > s->cap_extent)
			b = s->cap_extent;
		may = ifc_may_start(&s->c, b);

		if (s->check_fixed) {
			if (b != 1 * MIB || may != (s->c.inflight_count < 8))
				s->fixed_violations++;
		}
		if (!may)
			break;
		for (i = 0; i < MAX_REQS && s->r[i].state != R_FREE; i++)
			;
		ck_assert_uint_lt(i, MAX_REQS);
		if (i >= s->hi)
			s->hi = i + 1;
		s->r[i].state = R_QUEUED;
		s->r[i].start = s->t;
		s->r[i].bytes = b;
		s->r[i].left = (double)b;
		s->r[i].rate_f = jit(s);
		s->r[i].seq = s->seq++;
		ifc_started(&s->c, b, ns(s->t));
		if (s->c.inflight_bytes > s->max_inflight)
			s->max_inflight = s->c.inflight_bytes;
		if (s->c.inflight_count > s->max_count)
			s->max_count = s->c.inflight_count;
	}
	dispatch(s);
}

static void sim_init(struct sim *s, const struct dev *d,
		     const struct ifc_opts *o)
{
	memset(s, 0, sizeof(*s));
	s->d = *d;
	s->rng = 0x9e3779b97f4a7c15ull;
	ck_assert_int_eq(ifc_init(&s->c, o, 0), 0);
}

/* SIM_TRACE=1: the controller's state every 0.5 s, on stderr. */
static void trace(struct sim *s)
{
	static double next;
	struct ifc_stats st;

	if (!getenv("SIM_TRACE") || s->check_fixed || s->c.fixed_depth)
		return;
	if (s->t < next - 1)
		next = 0;
	if (s->t < next)
		return;
	next = s->t + 0.5;
	ifc_stats(&s->c, &st);
	fprintf(stderr,
		"  t %6.2f W %8.2f MiB S %5llu KiB x %7.1f MB/s lat %7.2f ms "
		"phase %d probe %d\n",
		s->t, (double)st.target_bytes / MIB,
		(unsigned long long)st.extent_bytes / KIB,
		(double)st.throughput / 1e6, (double)st.latency_ns / 1e6,
		s->c.phase, s->c.probe);
}

/* Run the simulation until t_end (seconds). */
static void sim_run(struct sim *s, double t_end)
{
	fill(s);
	while (s->t < t_end) {
		double next = t_end, rate[MAX_REQS], dt;
		unsigned i, nx = 0, b;

		if (s->d.step_t > s->t && s->d.step_t < next)
			next = s->d.step_t;
		if (s->d.back_t > s->t && s->d.back_t < next)
			next = s->d.back_t;
		for (i = 0; i < s->hi; i++)
			nx += s->r[i].state == R_XFER;
		for (i = 0; i < s->hi; i++) {
			struct req *q = &s->r[i];

			if (q->state == R_ACCESS && q->access_end < next)
				next = q->access_end;
			if (q->state != R_XFER)
				continue;
			rate[i] = s->d.req_bw * cur_bw_f(s) * q->rate_f;
			if (rate[i] > s->d.cap_bw * cur_bw_f(s) / nx)
				rate[i] = s->d.cap_bw * cur_bw_f(s) / nx;
			if (s->t + q->left / rate[i] < next)
				next = s->t + q->left / rate[i];
		}
		dt = next - s->t;
		b = (unsigned)(s->t / BUCKET);
		if (b < MAX_BUCKETS)
			s->target_dt[b] += (double)s->c.target * dt;
		for (i = 0; i < s->hi; i++)
			if (s->r[i].state == R_XFER)
				s->r[i].left -= rate[i] * dt;
		s->t = next;
		for (i = 0; i < s->hi; i++) {
			struct req *q = &s->r[i];

			if (q->state == R_ACCESS && q->access_end <= s->t) {
				q->state = R_XFER;
			} else if (q->state == R_XFER && q->left < 0.5) {
				double lat = s->t - q->start;

				q->state = R_FREE;
				b = (unsigned)(s->t / BUCKET);
				if (b < MAX_BUCKETS) {
					s->bytes[b] += (double)q->bytes;
					s->lat_sum[b] += lat;
					s->done[b]++;
				}
				ifc_completed(&s->c, q->bytes, ns(q->start),
					      ns(s->t));
				trace(s);
				fill(s);
			}
		}
		dispatch(s);
	}
}

/* Throughput (B/s) over [a, b) seconds. */
static double sim_x(const struct sim *s, double a, double b)
{
	unsigned i, i0 = (unsigned)llround(a / BUCKET),
		    i1 = (unsigned)llround(b / BUCKET);
	double sum = 0;

	for (i = i0; i < i1 && i < MAX_BUCKETS; i++)
		sum += s->bytes[i];
	return i1 > i0 ? sum / ((i1 - i0) * BUCKET) : 0;
}

/* Mean completion latency (s) over [a, b). */
static double sim_lat(const struct sim *s, double a, double b)
{
	unsigned i, n = 0, i0 = (unsigned)llround(a / BUCKET),
		    i1 = (unsigned)llround(b / BUCKET);
	double sum = 0;

	for (i = i0; i < i1 && i < MAX_BUCKETS; i++) {
		sum += s->lat_sum[i];
		n += s->done[i];
	}
	return n ? sum / n : 0;
}

/* Mean window (bytes) over [a, b). */
static double sim_w(const struct sim *s, double a, double b)
{
	unsigned i, i0 = (unsigned)llround(a / BUCKET),
		    i1 = (unsigned)llround(b / BUCKET);
	double sum = 0;

	for (i = i0; i < i1 && i < MAX_BUCKETS; i++)
		sum += s->target_dt[i];
	return i1 > i0 ? sum / ((i1 - i0) * BUCKET) : 0;
}

/*
 * The time (from a) after which every 1 s average of throughput until b
 * stays at or above frac * x_opt; b when it never settles.
 */
static double sim_settled(const struct sim *s, double a, double b, double x_opt,
			  double frac)
{
	double t, settled = a;

	for (t = a; t + 1.0 <= b + 1e-9; t += BUCKET)
		if (sim_x(s, t, t + 1.0) < frac * x_opt)
			settled = t + BUCKET;
	return settled - a;
}

/* What the best fixed configurations give on a device. */
struct optimum {
	double x; /* best throughput */
	double w_knee; /* smallest window with >= 90% of it */
	double lat_knee; /* mean latency there */
};

static void optimum(const struct dev *dev, uint64_t max_bytes,
		    struct optimum *o)
{
	static struct sim s; /* large: not on the stack */
	struct dev d = *dev;
	double xs[16][8], lats[16][8], t_run;
	unsigned di, si;

	/* The device as it is after its step, if any, without the step. */
	if (d.step_t > 0) {
		d.lat *= d.step_lat;
		d.req_bw *= d.step_bw;
		d.cap_bw *= d.step_bw;
		d.step_t = d.back_t = 0;
	}
	t_run = 200 * (d.lat + 8 * MIB / d.req_bw) > 2
			? 2
			: 200 * (d.lat + 8 * MIB / d.req_bw);
	if (t_run < 1)
		t_run = 1;
	memset(o, 0, sizeof(*o));
	memset(xs, 0, sizeof(xs));
	for (di = 0; di < 9; di++) {
		for (si = 0; si < 6; si++) {
			struct ifc_opts opts = {
				.fixed_depth = 1u << di,
				.fixed_extent = (256 * KIB) << si,
			};

			if ((uint64_t)opts.fixed_depth * opts.fixed_extent >
			    max_bytes)
				continue;
			sim_init(&s, &d, &opts);
			sim_run(&s, t_run);
			xs[di][si] = sim_x(&s, t_run / 2, t_run);
			lats[di][si] = sim_lat(&s, t_run / 2, t_run);
			if (xs[di][si] > o->x)
				o->x = xs[di][si];
		}
	}
	o->w_knee = INFINITY;
	for (di = 0; di < 9; di++) {
		for (si = 0; si < 6; si++) {
			double w = (double)((256 * KIB) << si) * (1u << di);

			if (xs[di][si] >= 0.9 * o->x && w < o->w_knee) {
				o->w_knee = w;
				o->lat_knee = lats[di][si];
			}
		}
	}
}

/*
 * Device shapes. Each has a little jitter, as any real device: requests
 * started together in a noise-free simulation would stay in lockstep
 * forever, which no device does.
 */
static const struct dev ssd = {
	.slots = 32,
	.lat = 100e-6,
	.req_bw = 1e9,
	.cap_bw = 2e9,
};
static const struct dev disk = {
	.slots = 1,
	.lat = 8e-3,
	.req_bw = 150e6,
	.cap_bw = 150e6,
};
static const struct dev remote = {
	.slots = 64,
	.lat = 20e-3,
	.req_bw = 200e6,
	.cap_bw = 500e6,
};
/* Few slots, slow per request: only large requests reach the cap. */
static const struct dev virtio = {
	.slots = 8,
	.lat = 500e-6,
	.req_bw = 250e6,
	.cap_bw = 1.8e9,
};

/*
 * A cloud volume behind virtio (as measured on this project's machines):
 * a few ms per request whatever its size, many in parallel, a volume cap;
 * throughput keeps growing with the window long after one extent's worth.
 */
static const struct dev cloud = {
	.slots = 64,
	.lat = 4e-3,
	.req_bw = 400e6,
	.cap_bw = 1.0e9,
	.jitter = 0.3,
};

static struct sim sim; /* one at a time, large */

/*
 * Check one segment [a, b) of a run against the optimum of the device
 * shape it had then: within max_settle seconds every 1 s average of
 * throughput stays >= 70% of the optimum (probes cost a little), the
 * throughput over its last half is >= 80%, the mean latency there at most
 * 2.5x the knee's. Prints the row of the report table.
 */
static void check_segment(const char *name, const struct sim *s,
			  const struct dev *shape, uint64_t max_bytes, double a,
			  double b, double max_settle)
{
	struct optimum o;
	double mid = a + (b - a) / 2, x, lat, w, settle;

	optimum(shape, max_bytes, &o);
	x = sim_x(s, mid, b);
	lat = sim_lat(s, mid, b);
	w = sim_w(s, mid, b);
	settle = sim_settled(s, a, b, o.x, 0.7);
	fprintf(stderr,
		"%-16s [%5.1f,%5.1f) x %7.1f MB/s opt %7.1f (%3.0f%%) "
		"W %6.2f MiB knee %6.2f lat %7.2f ms knee %7.2f settle %.1f s\n",
		name, a, b, x / 1e6, o.x / 1e6, 100 * x / o.x, w / MIB,
		o.w_knee / MIB, lat * 1e3, o.lat_knee * 1e3, settle);
	ck_assert_msg(x >= 0.8 * o.x, "%s: %.0f of %.0f", name, x, o.x);
	ck_assert_msg(lat <= 2.5 * o.lat_knee, "%s: latency %.2f ms, knee %.2f",
		      name, lat * 1e3, o.lat_knee * 1e3);
	ck_assert_msg(settle <= max_settle, "%s: settled after %.1f s", name,
		      settle);
	ck_assert_uint_le(s->max_inflight, max_bytes);
}

static void converges(const char *name, const struct dev *d, uint64_t max_bytes,
		      double t_end, double max_settle)
{
	struct ifc_opts o = {.max_bytes = max_bytes};

	sim_init(&sim, d, &o);
	sim_run(&sim, t_end);
	check_segment(name, &sim, d, max_bytes, 0, t_end, max_settle);
}

/* (a) Near the optimum and near the knee, within a few seconds. */
START_TEST(test_converge_ssd)
{
	converges("ssd", &ssd, 64 * MIB, 10, 3);
}
END_TEST

START_TEST(test_converge_disk)
{
	converges("disk", &disk, 64 * MIB, 20, 6);
}
END_TEST

START_TEST(test_converge_remote)
{
	converges("remote", &remote, 64 * MIB, 10, 3);
}
END_TEST

START_TEST(test_converge_virtio)
{
	converges("virtio", &virtio, 64 * MIB, 10, 3);
}
END_TEST

START_TEST(test_converge_cloud)
{
	converges("cloud", &cloud, 16 * MIB, 10, 3);
	converges("cloud 64 MiB", &cloud, 64 * MIB, 10, 3);
}
END_TEST

/* (b) A step (bandwidth or latency) at 15 s and back at 30 s is followed. */
static void follows(const char *name, const struct dev *base, double bw_f,
		    double lat_f, double max_settle)
{
	struct ifc_opts o = {.max_bytes = 64 * MIB};
	struct dev d = *base, shape = *base;
	char label[64];

	d.step_t = 15;
	d.back_t = 30;
	d.step_bw = bw_f;
	d.step_lat = lat_f;
	shape.step_t = 1; /* optimum() applies the step from the start */
	shape.step_bw = bw_f;
	shape.step_lat = lat_f;
	sim_init(&sim, &d, &o);
	sim_run(&sim, 45);
	snprintf(label, sizeof(label), "%s before", name);
	check_segment(label, &sim, base, 64 * MIB, 0, 15, max_settle);
	snprintf(label, sizeof(label), "%s step", name);
	check_segment(label, &sim, &shape, 64 * MIB, 15, 30, max_settle);
	snprintf(label, sizeof(label), "%s back", name);
	check_segment(label, &sim, base, 64 * MIB, 30, 45, max_settle);
}

START_TEST(test_step_bandwidth_remote)
{
	follows("remote bw/2", &remote, 0.5, 1, 5);
}
END_TEST

START_TEST(test_step_latency_remote)
{
	/*
	 * Known weakness: a window of few large extents measures noisily, and
	 * the doubled knee is found in about 12 s here, not in a few.
	 */
	follows("remote lat*2", &remote, 1, 2, 13);
}
END_TEST

START_TEST(test_step_bandwidth_ssd)
{
	follows("ssd bw/2", &ssd, 0.5, 1, 5);
}
END_TEST

START_TEST(test_step_latency_disk)
{
	follows("disk lat*2", &disk, 1, 2, 8);
}
END_TEST

/*
 * (c) The memory bound: a remote device that would like 3x more than the
 * bound never gets more in flight, and still does as well as the best
 * configuration within it.
 */
START_TEST(test_memory_bound)
{
	struct ifc_opts o = {.max_bytes = 4 * MIB};
	struct ifc c;

	converges("remote 4 MiB", &remote, 4 * MIB, 10, 3);
	ck_assert_uint_le(sim.max_inflight, 4 * MIB);
	ck_assert_uint_le(ifc_extent_bytes(&sim.c), 4 * MIB);

	/* A bound below one extent of the smallest size is refused. */
	o.max_bytes = 100 * KIB;
	ck_assert_int_eq(ifc_init(&c, &o, 0), -EINVAL);
	o.max_bytes = 0;
	ck_assert_int_eq(ifc_init(&c, &o, 0), -EINVAL);
	/* A bound that is not a power of two caps the size below it. */
	o.max_bytes = 3 * MIB;
	ck_assert_int_eq(ifc_init(&c, &o, 0), 0);
	ck_assert_uint_eq(c.max_extent, 2 * MIB);
}
END_TEST

/* (d) Both overrides: exactly the stream's old 8 extents of 1 MiB. */
START_TEST(test_fixed_overrides)
{
	struct ifc_opts o = {.fixed_depth = 8, .fixed_extent = 1 * MIB};
	struct dev d = remote;
	struct ifc_stats st;

	d.jitter = 0.5;
	sim_init(&sim, &d, &o);
	sim.check_fixed = true;
	sim_run(&sim, 10);
	ck_assert_uint_eq(sim.fixed_violations, 0);
	ck_assert_uint_eq(sim.max_count, 8);
	ck_assert_uint_eq(sim.max_inflight, 8 * MIB);
	/* It still measures, for the report. */
	ifc_stats(&sim.c, &st);
	ck_assert_uint_gt(st.windows, 0);
	ck_assert_uint_gt(st.throughput, 0);
	ck_assert_uint_eq(st.extent_bytes, 1 * MIB);
}
END_TEST

/* A fixed size alone: the window adapts, the size never changes. */
START_TEST(test_fixed_extent_only)
{
	struct ifc_opts o = {.max_bytes = 64 * MIB, .fixed_extent = 512 * KIB};
	unsigned i;

	sim_init(&sim, &disk, &o);
	for (i = 1; i <= 50; i++) {
		sim_run(&sim, i * 0.2);
		ck_assert_uint_eq(ifc_extent_bytes(&sim.c), 512 * KIB);
	}
	/* A fixed size above the bound is refused. */
	o.max_bytes = 256 * KIB;
	ck_assert_int_eq(ifc_init(&sim.c, &o, 0), -EINVAL);
}
END_TEST

/* A fixed depth alone: never more extents than that, the size adapts. */
START_TEST(test_fixed_depth_only)
{
	struct ifc_opts o = {.max_bytes = 64 * MIB, .fixed_depth = 2};

	sim_init(&sim, &disk, &o);
	sim_run(&sim, 20);
	ck_assert_uint_le(sim.max_count, 2);
	/* The disk wants large requests: the size grew to get them. */
	ck_assert_uint_ge(ifc_extent_bytes(&sim.c), 4 * MIB);
	ck_assert_uint_le(sim.max_inflight, 64 * MIB);
}
END_TEST

/* (e) Jitter of +-50% in service time: no collapse, latency bounded. */
START_TEST(test_noise)
{
	struct ifc_opts o = {.max_bytes = 64 * MIB};
	const struct dev *shapes[] = {&ssd, &remote, &virtio};
	const char *names[] = {"ssd jitter", "remote jitter", "virtio jitter"};
	unsigned i;

	for (i = 0; i < 3; i++) {
		struct dev d = *shapes[i];

		d.jitter = 0.5;
		sim_init(&sim, &d, &o);
		sim_run(&sim, 20);
		check_segment(names[i], &sim, &d, 64 * MIB, 0, 20, 5);
	}
}
END_TEST

/*
 * Extents shorter than the request size (the 576 KiB runs between the
 * local clusters of a top holding every tenth, which no request size
 * merges): admitted whole, they never fill a window to its byte target,
 * and the controller must still measure and grow where depth pays. On the
 * remote device one 576 KiB extent at a time moves about 25 MB/s of its
 * 500 MB/s.
 */
START_TEST(test_short_extents)
{
	struct ifc_opts o = {.max_bytes = 64 * MIB};
	struct ifc_stats st;
	double x;

	sim_init(&sim, &remote, &o);
	sim.cap_extent = 576 * KIB;
	sim_run(&sim, 10);
	ifc_stats(&sim.c, &st);
	x = sim_x(&sim, 5, 10);
	ck_assert_msg(st.windows >= 4, "%u windows measured", st.windows);
	ck_assert_msg(st.target_bytes >= 4 * MIB, "window %llu KiB",
		      (unsigned long long)st.target_bytes / KIB);
	ck_assert_msg(x >= 0.5 * remote.cap_bw, "%.1f MB/s", x / 1e6);
}
END_TEST

/*
 * The owner's floor (a remote layer's, stream.c): the window starts there
 * and never goes below it, even on a device whose knee is one extent (the
 * single-slot disk); it is rounded up to whole extents, held within the
 * memory bound, and a fixed depth ignores it.
 */
START_TEST(test_floor)
{
	struct ifc_opts o = {.max_bytes = 64 * MIB, .min_bytes = 16 * MIB};
	struct ifc_stats st;
	struct ifc c;
	unsigned i;

	sim_init(&sim, &disk, &o);
	ifc_stats(&sim.c, &st);
	ck_assert_uint_eq(st.target_bytes, 16 * MIB);
	for (i = 1; i <= 100; i++) {
		sim_run(&sim, i * 0.2);
		ifc_stats(&sim.c, &st);
		ck_assert_msg(st.target_bytes >= 16 * MIB,
			      "window %llu KiB at %.1f s",
			      (unsigned long long)st.target_bytes / KIB, sim.t);
		ck_assert_uint_eq(st.target_bytes % st.extent_bytes, 0);
		ck_assert_uint_le(sim.max_inflight, 64 * MIB);
	}
	/* The controller still steered: windows measured, probes run. */
	ck_assert_uint_ge(st.windows, 8);
	/* Not a multiple of the extent: rounded up. */
	o.min_bytes = 3 * MIB + 1;
	ck_assert_int_eq(ifc_init(&c, &o, 0), 0);
	ck_assert_uint_eq(c.target, 4 * MIB);
	/* Above the bound: the bound. */
	o.max_bytes = 8 * MIB;
	o.min_bytes = 32 * MIB;
	ck_assert_int_eq(ifc_init(&c, &o, 0), 0);
	ck_assert_uint_eq(c.target, 8 * MIB);
	/* A fixed depth counts extents; the floor does not apply. */
	o.fixed_depth = 2;
	ck_assert_int_eq(ifc_init(&c, &o, 0), 0);
	ck_assert_uint_eq(c.target, 2 * c.extent);
}
END_TEST

/* Never starve: nothing in flight always allows one extent. */
START_TEST(test_never_starves)
{
	struct ifc_opts o = {.max_bytes = 1 * MIB};
	struct ifc c;

	ck_assert_int_eq(ifc_init(&c, &o, 0), 0);
	ck_assert(ifc_may_start(&c, 64 * MIB));
	ifc_started(&c, 1 * MIB, 0);
	ck_assert(!ifc_may_start(&c, 1));
	ifc_cancelled(&c, 1 * MIB);
	ck_assert_uint_eq(c.inflight_bytes, 0);
	ck_assert_uint_eq(c.inflight_count, 0);
	ck_assert(ifc_may_start(&c, 1 * MIB));
	/* A stream that stops sending does not move the window. */
	ifc_started(&c, 256 * KIB, 0);
	ifc_completed(&c, 256 * KIB, 0, 1000);
	ck_assert(ifc_may_start(&c, 1 * MIB));
	ck_assert_int_eq(ifc_init(&c, NULL, 0), -EINVAL);
}
END_TEST

static Suite *inflight_suite(void)
{
	Suite *s = suite_create("inflight");
	TCase *tc = tcase_create("simulated device");

	tcase_add_test(tc, test_converge_ssd);
	tcase_add_test(tc, test_converge_disk);
	tcase_add_test(tc, test_converge_remote);
	tcase_add_test(tc, test_converge_virtio);
	tcase_add_test(tc, test_converge_cloud);
	tcase_add_test(tc, test_step_bandwidth_remote);
	tcase_add_test(tc, test_step_latency_remote);
	tcase_add_test(tc, test_step_bandwidth_ssd);
	tcase_add_test(tc, test_step_latency_disk);
	tcase_add_test(tc, test_memory_bound);
	tcase_add_test(tc, test_fixed_overrides);
	tcase_add_test(tc, test_fixed_extent_only);
	tcase_add_test(tc, test_fixed_depth_only);
	tcase_add_test(tc, test_noise);
	tcase_add_test(tc, test_never_starves);
	tcase_add_test(tc, test_floor);
	tcase_add_test(tc, test_short_extents);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return run_suite(inflight_suite(), NULL, 0);
}
