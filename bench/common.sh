# shellcheck shell=bash
#
# Shared by the bench/*.sh scripts (source it): where temporary files go,
# which siphon binary runs, page-cache dropping and small number helpers.

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Not tmpfs: the point is to measure the disk.
BENCH_DIR=${BENCH_DIR:-/var/tmp/siphon-bench}
SIPHON=${SIPHON:-$src/build/tools/siphon}

bench_need() {
	local tool
	for tool in "$@"; do
		if ! command -v "$tool" >/dev/null 2>&1; then
			echo "bench: $tool not found (run tools/demo.sh or" \
				"tests/run-all.sh once to install packages)" >&2
			exit 1
		fi
	done
	if [[ ! -x $SIPHON ]]; then
		echo "bench: no siphon binary at $SIPHON (build first:" \
			"meson setup build && ninja -C build, or set SIPHON)" >&2
		exit 1
	fi
}

# A fresh work directory under BENCH_DIR, removed on exit unless
# BENCH_KEEP=1. Sets $work.
bench_workdir() {
	mkdir -p "$BENCH_DIR"
	work=$(mktemp -d "$BENCH_DIR/$1.XXXXXX")
	local fstype
	fstype=$(stat -f -c %T "$work")
	if [[ $fstype == tmpfs || $fstype == ramfs ]]; then
		echo "bench: warning: $work is on $fstype; set BENCH_DIR to a" \
			"directory on the disk under test" >&2
	fi
	trap bench_cleanup EXIT
}

bench_cleanup() {
	if [[ ${BENCH_KEEP:-0} == 1 ]]; then
		echo "bench: kept $work"
	else
		rm -rf -- "$work"
	fi
}

# Drop the page cache when root (so reads come from the device); say so
# once when not.
drop_caches() {
	sync
	if [[ $(id -u) -eq 0 && -w /proc/sys/vm/drop_caches ]]; then
		echo 3 >/proc/sys/vm/drop_caches
	elif [[ -z ${_warned_caches:-} ]]; then
		echo "bench: not root: page cache NOT dropped between runs" >&2
		_warned_caches=1
	fi
}

now() {
	date +%s.%N
}

# bench_time NAME CMD...: run CMD with the page cache dropped under GNU
# time -v, stdout to $work/NAME.json, stderr to $work/NAME.err; sets
# $wall (seconds), $rss (max RSS, KiB) and $code (CMD's exit code).
# With BENCH_WARM=1, `CMD --version` runs first, after the drop: the
# program and its libraries come from the page cache, the data from the
# device (what a check or map costs, not what loading the program does).
bench_time() {
	local name=$1
	shift
	drop_caches
	if [[ ${BENCH_WARM:-0} == 1 ]]; then
		"$1" --version >/dev/null 2>&1 || true
	fi
	local t0 t1
	set +e
	t0=$(now)
	/usr/bin/time -v -o "$work/$name.time" "$@" >"$work/$name.json" \
		2>"$work/$name.err"
	code=$?
	t1=$(now)
	set -e
	# Not time's own wall clock: it has hundredths of a second only.
	wall=$(calc "$t1 - $t0")
	rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' \
		"$work/$name.time")
}

# calc EXPR: floating point arithmetic with awk.
calc() {
	awk "BEGIN { printf \"%.3f\", $1 }"
}

# median of the arguments
median() {
	printf '%s\n' "$@" | sort -g | awk '
		{ v[NR] = $1 }
		END { if (NR % 2) print v[(NR + 1) / 2];
		      else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
