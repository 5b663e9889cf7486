/*
 * The in-flight controller of the copy pipeline: how many bytes a stream
 * keeps in flight and how large its extents are, found by measuring what the
 * device delivers (issue 11). Pure policy: no I/O, no threads, no clock;
 * every time is passed in as CLOCK_MONOTONIC nanoseconds.
 *
 * The stream asks before it starts an extent (ifc_may_start()) and how large
 * to make it (ifc_extent_bytes()), and reports each extent's start and end
 * with its bytes (ifc_started(), ifc_completed(), ifc_cancelled()). The
 * controller keeps a window (target bytes in flight) in [one extent, the
 * memory bound] and a request size from the powers of two in [min_extent,
 * max_extent]; see inflight.c for the algorithm.
 *
 * Overrides: a fixed depth counts extents, not bytes, exactly as the stream
 * did before the controller (ifc_may_start() is "fewer than depth in
 * flight"); a fixed extent size is returned unchanged. Both fixed: the
 * controller measures and reports but decides nothing.
 *
 * Invariants: with adaptive depth, the window is never below min_bytes
 * (rounded up to whole extents, within max_bytes); bytes in flight never
 * exceed max_bytes as
 * long as each extent is at most ifc_extent_bytes() (which never exceeds
 * it); whatever the state, an extent may always start when nothing is in
 * flight, so a stream never starves.
 *
 * Threads: none; the owner serializes calls.
 */
#ifndef SIPHON_ENGINE_INFLIGHT_H
#define SIPHON_ENGINE_INFLIGHT_H

#include <stdbool.h>
#include <stdint.h>

#define IFC_MIN_EXTENT (256ull * 1024)
#define IFC_MAX_EXTENT (8ull * 1024 * 1024)
/* The size a controller starts from: the stream's fixed default before. */
#define IFC_START_EXTENT (1024ull * 1024)
/* Startup history: enough doublings from one extent to any memory bound. */
#define IFC_STARTUP_STEPS 40

struct ifc_opts {
	uint64_t max_bytes; /* memory bound on bytes in flight; required */
	unsigned fixed_depth; /* extents in flight; 0: adaptive */
	uint64_t fixed_extent; /* bytes per extent; 0: adaptive */
	uint64_t min_extent; /* power of two; 0: IFC_MIN_EXTENT */
	uint64_t max_extent; /* power of two; 0: IFC_MAX_EXTENT */
	/*
	 * Adaptive depth: the window never goes below this many bytes (rounded
	 * up to whole extents, at most the memory bound), and starts there.
	 * 0: one extent. A remote layer's owner sets it (see stream.c): what a
	 * network path needs in flight is not what the measured knee of one
	 * window says when the server's latency swings.
	 */
	uint64_t min_bytes;
};

/* What a user should see (siphon stream --output=json). */
struct ifc_stats {
	uint64_t target_bytes; /* window now (a probe's, while one runs) */
	uint64_t inflight_bytes;
	unsigned inflight_count; /* extents */
	uint64_t extent_bytes; /* request size now */
	uint64_t throughput; /* bytes/s over the last measured window */
	uint64_t latency_ns; /* mean extent latency, same window */
	uint64_t min_latency_ns; /* lowest extent latency, same window */
	unsigned windows; /* measured windows so far */
	bool startup; /* still doubling from the first window */
};

/* One measurement window (inflight.c). */
struct ifc_window {
	uint64_t t0; /* extents started from here on belong to it */
	bool armed; /* one of them completed: counting from t_first */
	uint64_t t_first;
	uint64_t t_last;
	double area; /* integral of bytes in flight over time, from t_first */
	double lat_bytes; /* sum of bytes x latency of the samples */
	uint64_t bytes; /* of the samples */
	unsigned samples; /* completions counted, the first one included */
	uint64_t max_len; /* largest extent started since t0 */
	uint64_t lat_sum;
	uint64_t lat_min;
};

struct ifc {
	/* Configuration. */
	uint64_t max_bytes;
	unsigned fixed_depth;
	uint64_t fixed_extent;
	uint64_t min_extent;
	uint64_t max_extent;
	uint64_t min_bytes;

	/* Accounting. */
	uint64_t inflight_bytes;
	unsigned inflight_count;
	uint64_t t_event; /* last start or completion */

	/* Adopted configuration and the one applied now (a probe's). */
	uint64_t base_target;
	uint64_t base_extent;
	uint64_t target;
	uint64_t extent;

	/* Control state (inflight.c). */
	int phase;
	int probe;
	int next_probe;
	double x_base; /* throughput of the adopted configuration */
	double x_ref[2]; /* the last two baselines: no slow drift down */
	double x_run; /* reference of a run of W down probes */
	double noise; /* mean relative change between cruise windows */
	unsigned cruise_len; /* cruise windows between rounds of probes */
	unsigned cruise_left; /* of this cruise */
	bool changed; /* a probe of this round was kept */
	unsigned startup_n;
	unsigned startup_fails;
	double startup_best;
	uint64_t startup_w[IFC_STARTUP_STEPS];
	uint64_t startup_s[IFC_STARTUP_STEPS];
	double startup_x[IFC_STARTUP_STEPS];
	struct ifc_window win;

	/* Last measured window, for ifc_stats(). */
	double x_last;
	uint64_t lat_last;
	uint64_t lat_min_last;
	unsigned windows;
};

/*
 * Set c up at now. The window starts at one extent of IFC_START_EXTENT
 * (clamped into [min_extent, max_extent], or the fixed size), or at
 * min_bytes when that is more. max_extent is
 * lowered to the largest power of two that the memory bound holds.
 * Returns 0, or -EINVAL: o NULL; max_bytes 0 while the depth is adaptive;
 * min_extent or max_extent not a power of two, or min above max; the memory
 * bound below min_extent (adaptive size), below the fixed size (adaptive
 * depth) or below fixed_depth extents of min_extent (adaptive size, fixed
 * depth). c is untouched on failure.
 */
int ifc_init(struct ifc *c, const struct ifc_opts *o, uint64_t now);

/*
 * Whether an extent of bytes may start now: always when nothing is in
 * flight; with a fixed depth when fewer than that many extents are; else
 * when bytes in flight plus bytes stay within the window.
 */
bool ifc_may_start(const struct ifc *c, uint64_t bytes);

/* The request size to use for the next extent (bytes, > 0). */
uint64_t ifc_extent_bytes(const struct ifc *c);

/* An extent of bytes started at now. */
void ifc_started(struct ifc *c, uint64_t bytes, uint64_t now);

/*
 * An extent of bytes that ifc_started() at started_ns completed at now
 * (its data delivered): accounting, measurement, and maybe a new window or
 * request size, effective for the next ifc_may_start().
 */
void ifc_completed(struct ifc *c, uint64_t bytes, uint64_t started_ns,
		   uint64_t now);

/* An extent of bytes ended without delivering (error, abort): accounting. */
void ifc_cancelled(struct ifc *c, uint64_t bytes);

/* What the controller does now, into *st. */
void ifc_stats(const struct ifc *c, struct ifc_stats *st);

#endif
