/*
 * The in-flight controller (see inflight.h for the contract).
 *
 * What it steers: W, the bytes a stream keeps in flight (a window, bounded
 * by [one extent or the owner's floor, the memory bound]), and S, the
 * request size (a power of two in [min_extent, max_extent]). Both fixed by
 * the owner's overrides, or found here.
 *
 * Why a measured hill-climb and not a model: a device's throughput as a
 * function of (W, S) has a knee, but where it sits depends on things no
 * formula in the engine knows: parallelism (an SSD wants many requests, a
 * disk one large one), per-request cost (large requests pay off on virtio),
 * base latency (a remote layer needs a deep window), and other tenants. A
 * Vegas/BBR-like estimate (W = bandwidth x min latency) is right only where
 * requests overlap freely and cannot choose S; and the min latency is
 * invisible once a queue forms. So the controller measures throughput at its
 * configuration and at a neighbour, and keeps the neighbour only when it pays:
 *
 *  - Measurement: a window of completions. It opens when an extent started
 *    after the configuration changed completes (so the device works under
 *    the new configuration, not the old one) and closes after max(8, 2 x
 *    depth) completions: at least two round trips, enough samples to average
 *    jitter. Throughput by Little's law: the time-averaged bytes in flight
 *    over the window / the byte-weighted mean latency of its completions.
 *    Counting bytes over time instead is fooled by requests that complete
 *    in bursts (a device serving many at once ends them together): a
 *    window that starts or ends inside a burst is off by the burst, where
 *    the averages are not. Mean and minimum latency are kept for the
 *    report. A window whose bytes in flight averaged less than 3/4 of what
 *    the target can hold (the stream had less to send, or the scheduler
 *    held it for the guest) says nothing about the device: it is measured
 *    again. What it can hold is the target rounded down to the largest
 *    extent started since the window began: an extent is admitted only
 *    whole (ifc_may_start()), so a 1 MiB window holds one extent of 576
 *    KiB (the runs between the local clusters of a top that holds every
 *    tenth), and measured against the whole 1 MiB no window was ever full:
 *    the controller stayed at its first window for the whole stream. (Per
 *    completion "was there room?" would be fooled by completions reaped in
 *    a batch before the stream refills.)
 *  - Startup: W doubles each window (S stays at its start size) while
 *    throughput grows by 10% over the best so far (a cloud volume keeps
 *    gaining 10-20% per doubling long after the first extents); after two
 *    windows without, W becomes the smallest window seen that reached 95%
 *    of the best
 *    throughput: past the knee only latency grows.
 *  - Steady state: a cruise window measures the baseline X of the adopted
 *    (W, S), then probes run one window each, in turn:
 *      W up    W x 5/4 (at least one extent more): kept if X gains 8%;
 *      W down  W x 4/5 (at least one extent less): kept if X loses less than
 *              5% against the best of the recent baselines (so a run of small
 *              losses cannot drift it down the curve);
 *      S up    2S at the same W (2S when W held one extent): kept if X gains
 *              8%; not tried when it would leave a window of more than two
 *              extents with fewer than four (a window of a few large
 *              requests swings with every completion: measured noise, and
 *              nothing a deeper device gains from);
 *      S down  S/2 at the same W: kept if X gains 8%.
 *    A probe kept is tried again at once (a step change is followed in a few
 *    windows, not a few rounds); one refused gives way to the next kind, and
 *    after the last one cruise windows refresh the baseline. Probing costs
 *    (three of the four neighbours are worse at the optimum), so a round
 *    that changed nothing doubles the cruise windows before the next one,
 *    up to 16; a cruise window whose throughput moved by 15% from the
 *    baseline (the device changed) starts a round at once.
 *    Noise: every cruise window measures the adopted configuration again;
 *    the mean relative change between them is the noise. A gain must be
 *    at least twice that as well as 8%, and a smaller window is kept only
 *    if it lost less than 5% minus the noise, or gained the noise beyond
 *    that (a shared cloud volume moves
 *    by 10-30% from one window to the next; with fixed thresholds the
 *    probes were a random walk there, which went down to 256 KiB extents
 *    and a few MiB in flight). So where measurements cannot tell, the
 *    controller keeps what startup found.
 *    Hysteresis: growing must gain clearly (8%) while shrinking may cost a
 *    little (5%), so at the knee neither probe flips the window back and
 *    forth; a change of S needs a clear gain either way, so equal throughput
 *    keeps the size the device liked so far.
 *    The device changing under the stream is followed by the same probes:
 *    less bandwidth (another tenant) makes W down free; more latency makes W
 *    up pay; both back lets them move back.
 *  - Never starve: an extent may start whenever nothing is in flight.
 *
 * Parameters (the IFC_* below) were chosen on the simulated devices of
 * tests/unit/test_inflight.c: fast parallel SSD, slow disk, remote with a
 * high base latency, steps of bandwidth and latency, jitter.
 *
 * Invariants: base_target and target are multiples of their extent sizes
 * (adaptive depth), within [max(extent, min_bytes rounded up to it),
 * max_bytes]; extents are powers of two in [min_extent, max_extent]
 * (adaptive size); inflight_* count what was started and has not completed
 * or been cancelled.
 */
#include <errno.h>
#include <string.h>

#include "inflight.h"

enum ifc_phase {
	IFC_STARTUP,
	IFC_CRUISE,
	IFC_PROBE,
	IFC_FIXED, /* depth and size fixed: measure only */
};

enum ifc_probe {
	IFC_W_UP,
	IFC_W_DOWN,
	IFC_S_UP,
	IFC_S_DOWN,
	IFC_NPROBES,
};

#define IFC_MIN_SAMPLES 16
#define IFC_MIN_WINDOW_NS (20ull * 1000 * 1000)
#define IFC_STARTUP_GROWTH 1.10
#define IFC_STARTUP_FAILS 2
#define IFC_STARTUP_KEEP 0.95
#define IFC_GAIN 1.08
#define IFC_KEEP 0.95
#define IFC_S_DOWN_GAIN 1.15
#define IFC_NOISE_SIGMAS 2.0
#define IFC_FULL 0.75
#define IFC_MAX_CRUISE 16
#define IFC_MIN_DEPTH 4
#define IFC_CHANGED 0.15

static bool is_pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

/* The largest power of two <= v (v > 0). */
static uint64_t pow2_floor(uint64_t v)
{
	uint64_t p = 1;

	while (p <= v / 2)
		p *= 2;
	return p;
}

static uint64_t round_down(uint64_t v, uint64_t m)
{
	return v - v % m;
}

static uint64_t max_u64(uint64_t a, uint64_t b)
{
	return a > b ? a : b;
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static double max_d(double a, double b)
{
	return a > b ? a : b;
}

/* The largest window of extents of size s (adaptive depth). */
static uint64_t cap_for(const struct ifc *c, uint64_t s)
{
	return round_down(c->max_bytes, s);
}

/* The smallest window of extents of size s (adaptive depth). */
static uint64_t floor_for(const struct ifc *c, uint64_t s)
{
	uint64_t w = round_down(c->min_bytes + s - 1, s);

	return max_u64(s, min_u64(w, cap_for(c, s)));
}

/* The window of a configuration with extents of s and target w. */
static uint64_t window_of(const struct ifc *c, uint64_t w, uint64_t s)
{
	return c->fixed_depth ? (uint64_t)c->fixed_depth * s
			      : max_u64(w, floor_for(c, s));
}

/* Start measuring anew at now: only extents started from now on open it. */
static void window_reset(struct ifc *c, uint64_t now)
{
	memset(&c->win, 0, sizeof(c->win));
	c->win.t0 = now;
	c->win.lat_min = UINT64_MAX;
}

/* Run target w with extents of s from now. */
static void apply(struct ifc *c, uint64_t w, uint64_t s, uint64_t now)
{
	c->extent = s;
	c->target = window_of(c, w, s);
	window_reset(c, now);
}

/* Adopt the configuration applied now, measured at x. */
static void adopt(struct ifc *c, double x)
{
	c->base_target = c->target;
	c->base_extent = c->extent;
	c->x_base = x;
	c->x_ref[1] = c->x_ref[0];
	c->x_ref[0] = x;
}

/*
 * The configuration probe p would try from the adopted one, into *w and *s.
 * Returns false when p cannot move from there (a bound, an override).
 */
static bool probe_config(const struct ifc *c, int p, uint64_t *w, uint64_t *s)
{
	uint64_t bw = c->base_target, bs = c->base_extent;

	*w = bw;
	*s = bs;
	switch (p) {
	case IFC_W_UP:
		if (c->fixed_depth || bw >= cap_for(c, bs))
			return false;
		*w = min_u64(cap_for(c, bs),
			     round_down(max_u64(bw + bw / 4, bw + bs), bs));
		return true;
	case IFC_W_DOWN:
		if (c->fixed_depth || bw <= floor_for(c, bs))
			return false;
		*w = max_u64(bs, round_down(min_u64(bw - bw / 5, bw - bs), bs));
		return true;
	case IFC_S_UP:
		if (c->fixed_extent || bs >= c->max_extent)
			return false;
		*s = bs * 2;
		/*
		 * Few large requests, or many: not a window of a few large
		 * ones, whose throughput swings with every completion.
		 */
		if (!c->fixed_depth && bw / bs > 2 && bw / *s < IFC_MIN_DEPTH)
			return false;
		if (c->fixed_depth)
			return (uint64_t)c->fixed_depth * *s <= c->max_bytes;
		/* The same bytes in flight, rounded up to whole extents. */
		*w = min_u64(cap_for(c, *s), round_down(bw + *s - 1, *s));
		return true;
	case IFC_S_DOWN:
		if (c->fixed_extent || bs <= c->min_extent)
			return false;
		*s = bs / 2;
		return true;
	}
	return false;
}

/* Start the next probe that can move, from p on; or a cruise window. */
static void next_probe(struct ifc *c, int p, bool wrapped, uint64_t now)
{
	uint64_t w, s;
	int i;

	for (i = 0; i < IFC_NPROBES; i++, p++) {
		if (p == IFC_NPROBES) {
			p = 0;
			wrapped = true;
		}
		if (wrapped && c->phase == IFC_PROBE)
			break; /* a full round: refresh the baseline first */
		if (probe_config(c, p, &w, &s)) {
			c->phase = IFC_PROBE;
			c->probe = p;
			c->x_run = max_d(c->x_base,
					 max_d(c->x_ref[0], c->x_ref[1]));
			apply(c, w, s, now);
			return;
		}
	}
	if (c->phase == IFC_PROBE) {
		/* A round ended: back off if it changed nothing. */
		if (!c->changed && c->cruise_len < IFC_MAX_CRUISE)
			c->cruise_len *= 2;
		c->cruise_left = c->cruise_len;
	}
	c->phase = IFC_CRUISE;
	c->next_probe = p % IFC_NPROBES;
	apply(c, c->base_target, c->base_extent, now);
}

/* Startup measured x at the current window: double or settle. */
static void startup_step(struct ifc *c, double x, uint64_t now)
{
	uint64_t w = c->target, s = c->extent;
	double best = 0;
	unsigned i, n;
	bool at_cap;

	if (c->startup_n < IFC_STARTUP_STEPS) {
		c->startup_w[c->startup_n] = c->target;
		c->startup_x[c->startup_n] = x;
		c->startup_s[c->startup_n] = c->extent;
		c->startup_n++;
	}
	if (x >= IFC_STARTUP_GROWTH * c->startup_best) {
		c->startup_best = x;
		c->startup_fails = 0;
	} else {
		c->startup_fails++;
	}
	if (c->fixed_depth)
		at_cap =
			c->extent >= c->max_extent ||
			(uint64_t)c->fixed_depth * c->extent * 2 > c->max_bytes;
	else
		at_cap = c->target >= cap_for(c, c->extent);
	if (c->startup_fails < IFC_STARTUP_FAILS && !at_cap &&
	    c->startup_n < IFC_STARTUP_STEPS) {
		if (c->fixed_depth)
			apply(c, 0, c->extent * 2, now);
		else
			apply(c, min_u64(cap_for(c, s), w * 2), s, now);
		return;
	}
	/* Settle on the smallest window that came close to the best. */
	n = c->startup_n;
	for (i = 0; i < n; i++)
		best = max_d(best, c->startup_x[i]);
	for (i = 0; i < n; i++)
		if (c->startup_x[i] >= IFC_STARTUP_KEEP * best)
			break;
	apply(c, c->startup_w[i], c->startup_s[i], now);
	c->base_target = c->target;
	c->base_extent = c->extent;
	c->x_ref[0] = c->x_ref[1] = 0;
	c->phase = IFC_CRUISE;
	c->next_probe = IFC_W_UP;
	c->cruise_len = 1;
	c->cruise_left = 1;
}

/*
 * A cruise window measured x at the adopted configuration. After a round of
 * probes that changed nothing, the next round waits twice as many cruise
 * windows (up to IFC_MAX_CRUISE): at the optimum every probe costs. A
 * baseline that moved by IFC_CHANGED says the device changed: probe now,
 * against the new baseline only.
 */
static void cruise_step(struct ifc *c, double x, uint64_t now)
{
	bool changed = c->x_base > 0 && (x > (1 + IFC_CHANGED) * c->x_base ||
					 x < (1 - IFC_CHANGED) * c->x_base);

	if (c->x_base > 0) {
		/* The same configuration measured again: how noisy is it? */
		double dev =
			x > c->x_base ? x / c->x_base - 1 : 1 - x / c->x_base;

		c->noise = c->noise > 0 ? 0.75 * c->noise + 0.25 * dev : dev;
	}
	if (changed) {
		c->cruise_len = 1;
		c->cruise_left = 0;
		c->x_ref[0] = c->x_ref[1] = x;
	}
	adopt(c, x);
	if (c->cruise_left > 1) {
		c->cruise_left--;
		window_reset(c, now);
		return;
	}
	c->cruise_left = 0;
	c->changed = false;
	c->phase = IFC_PROBE; /* so next_probe() stops after a round */
	next_probe(c, c->next_probe, false, now);
}

/* A probe measured x: keep it or go back. */
static void probe_step(struct ifc *c, double x, uint64_t now)
{
	double run = c->x_run;
	uint64_t w, s;
	bool keep;

	/*
	 * A gain must stand out of the noise the cruise windows measured
	 * (twice their mean relative change: on a shared cloud volume one
	 * window differs from the next by 10-30%, and a fixed 8% made the
	 * probes a random walk, which went down to 256 KiB extents). A
	 * smaller window must not lose more than 5% against the best recent
	 * baseline, less the noise: where the noise hides a loss, the larger
	 * window stays (in flight costs memory within the bound; too little
	 * costs throughput; on that volume 1 MiB in flight was kept on noise
	 * where 32 MiB moved 7-15% more in wall-clock runs).
	 */
	if (c->probe == IFC_W_DOWN)
		keep = x >= (IFC_KEEP + c->noise) * c->x_run;
	else
		keep = x >= max_d(IFC_GAIN, 1 + IFC_NOISE_SIGMAS * c->noise) *
				    c->x_base;
	if (keep) {
		adopt(c, x);
		c->changed = true;
		c->cruise_len = 1;
		/* Again at once, with the run's reference kept. */
		if (probe_config(c, c->probe, &w, &s)) {
			apply(c, w, s, now);
			if (c->probe == IFC_W_DOWN)
				c->x_run = run;
			return;
		}
		next_probe(c, c->probe + 1, false, now);
		return;
	}
	next_probe(c, c->probe + 1, false, now);
}

/*
 * The bytes the window can hold in flight: extents are admitted whole, so
 * with adaptive depth the target rounded down to the largest extent
 * started in it (the target itself if none was or one exceeds it); with a
 * fixed depth, that many extents of the mean length completed.
 */
static uint64_t holds(const struct ifc *c)
{
	const struct ifc_window *win = &c->win;
	uint64_t len = win->max_len;

	if (c->fixed_depth)
		return win->samples
			       ? c->fixed_depth * (win->bytes / win->samples)
			       : c->target;
	if (!len || len >= c->target)
		return c->target;
	return round_down(c->target, len);
}

/* The window closed: update the report and decide. */
static void window_end(struct ifc *c, uint64_t now)
{
	struct ifc_window *win = &c->win;
	double x;

	/*
	 * Less than IFC_FULL of what the window holds used on average: the
	 * stream had less to send, or was held back; that says nothing about
	 * the device.
	 */
	if (win->area < IFC_FULL * (double)holds(c) *
				(double)(win->t_last - win->t_first)) {
		window_reset(c, now);
		return;
	}
	/* bytes x ns / ns over bytes x ns / bytes: bytes per ns. */
	x = win->area / (double)(win->t_last - win->t_first) /
	    (win->lat_bytes / (double)win->bytes) * 1e9;
	c->x_last = x;
	c->lat_last = win->lat_sum / win->samples;
	c->lat_min_last = win->lat_min;
	c->windows++;
	switch (c->phase) {
	case IFC_STARTUP:
		startup_step(c, x, now);
		break;
	case IFC_CRUISE:
		cruise_step(c, x, now);
		break;
	case IFC_PROBE:
		probe_step(c, x, now);
		break;
	default:
		window_reset(c, now);
		break;
	}
}

int ifc_init(struct ifc *c, const struct ifc_opts *o, uint64_t now)
{
	uint64_t min_e, max_e, s;
	bool fixed = false;

	if (!o)
		return -EINVAL;
	min_e = o->min_extent ? o->min_extent : IFC_MIN_EXTENT;
	max_e = o->max_extent ? o->max_extent : IFC_MAX_EXTENT;
	if (!is_pow2(min_e) || !is_pow2(max_e) || min_e > max_e)
		return -EINVAL;
	if (o->fixed_depth && o->fixed_extent) {
		fixed = true;
	} else if (!o->max_bytes) {
		return -EINVAL;
	} else if (o->fixed_extent) {
		if (o->fixed_extent > o->max_bytes)
			return -EINVAL;
	} else {
		max_e = min_u64(max_e, pow2_floor(o->max_bytes /
						  max_u64(o->fixed_depth, 1)));
		if (max_e < min_e)
			return -EINVAL;
	}
	if (o->fixed_extent)
		s = o->fixed_extent;
	else
		s = min_u64(max_u64(IFC_START_EXTENT, min_e), max_e);

	memset(c, 0, sizeof(*c));
	c->max_bytes = o->max_bytes;
	c->fixed_depth = o->fixed_depth;
	c->fixed_extent = o->fixed_extent;
	c->min_extent = min_e;
	c->max_extent = max_e;
	c->min_bytes = o->fixed_depth ? 0 : min_u64(o->min_bytes, o->max_bytes);
	c->phase = fixed ? IFC_FIXED : IFC_STARTUP;
	apply(c, s, s, now);
	c->base_target = c->target;
	c->base_extent = c->extent;
	return 0;
}

bool ifc_may_start(const struct ifc *c, uint64_t bytes)
{
	if (!c->inflight_count)
		return true;
	if (c->fixed_depth)
		return c->inflight_count < c->fixed_depth;
	return c->inflight_bytes + bytes <= c->target;
}

uint64_t ifc_extent_bytes(const struct ifc *c)
{
	return c->extent;
}

/* Account for the bytes in flight from the last event until now. */
static void integrate(struct ifc *c, uint64_t now)
{
	if (c->win.armed && now > c->t_event)
		c->win.area +=
			(double)c->inflight_bytes * (double)(now - c->t_event);
	if (now > c->t_event)
		c->t_event = now;
}

void ifc_started(struct ifc *c, uint64_t bytes, uint64_t now)
{
	integrate(c, now);
	if (bytes > c->win.max_len)
		c->win.max_len = bytes;
	c->inflight_bytes += bytes;
	c->inflight_count++;
}

/* Take an extent of bytes out of the accounting. */
static void retire(struct ifc *c, uint64_t bytes)
{
	c->inflight_bytes -= min_u64(bytes, c->inflight_bytes);
	if (c->inflight_count)
		c->inflight_count--;
}

void ifc_completed(struct ifc *c, uint64_t bytes, uint64_t started_ns,
		   uint64_t now)
{
	struct ifc_window *win = &c->win;
	uint64_t lat = now > started_ns ? now - started_ns : 0;
	unsigned need;

	integrate(c, now);
	retire(c, bytes);

	if (!win->armed) {
		if (started_ns < win->t0)
			return; /* still the previous configuration's */
		win->armed = true;
		win->t_first = now;
	}
	win->t_last = now;
	win->bytes += bytes;
	win->lat_bytes += (double)bytes * (double)lat;
	win->samples++;
	win->lat_sum += lat;
	if (lat < win->lat_min)
		win->lat_min = lat;

	need = c->fixed_depth
		       ? c->fixed_depth
		       : (unsigned)min_u64(c->target / c->extent, 1u << 20);
	need = need * 2 > IFC_MIN_SAMPLES ? need * 2 : IFC_MIN_SAMPLES;
	if (win->samples >= need &&
	    win->t_last >= win->t_first + IFC_MIN_WINDOW_NS && win->bytes &&
	    win->lat_bytes > 0)
		window_end(c, now);
}

void ifc_cancelled(struct ifc *c, uint64_t bytes)
{
	retire(c, bytes);
}

void ifc_stats(const struct ifc *c, struct ifc_stats *st)
{
	memset(st, 0, sizeof(*st));
	st->target_bytes = c->target;
	st->inflight_bytes = c->inflight_bytes;
	st->inflight_count = c->inflight_count;
	st->extent_bytes = c->extent;
	st->throughput = (uint64_t)c->x_last;
	st->latency_ns = c->lat_last;
	st->min_latency_ns = c->lat_min_last;
	st->windows = c->windows;
	st->startup = c->phase == IFC_STARTUP;
}
