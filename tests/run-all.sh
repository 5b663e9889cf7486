#!/bin/bash
#
# Everything the project tests, as the README's test command: install the
# packages (root on Debian 12; skipped when not root or SIPHON_NO_APT=1),
# build and run every meson test (unit + integration) in a normal build, then
# again in an ASan/UBSan build, then the threaded API suite under TSan. Every
# build is configured with -Dwerror=true (the development and CI setting; the
# project's defaults leave it off for packagers), and two more builds are
# only compiled, to catch warnings that appear with other compilers and
# optimisation: --buildtype=release with gcc and with clang. The fuzz
# targets then run for 45 s each (clang, ASan/UBSan, build-fuzz/).
# Exits non-zero if any suite or build fails.
#
# Build directories (reused when they exist): build/, build-asan/,
# build-tsan/, build-release/ and build-clang/, or $SIPHON_BUILD,
# $SIPHON_BUILD_ASAN, $SIPHON_BUILD_TSAN, $SIPHON_BUILD_RELEASE and
# $SIPHON_BUILD_CLANG. Extra arguments go to `meson test` (e.g. --suite unit).
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$src"
# shellcheck source=tools/deps.sh
source tools/deps.sh

build=${SIPHON_BUILD:-build}
build_asan=${SIPHON_BUILD_ASAN:-build-asan}
build_tsan=${SIPHON_BUILD_TSAN:-build-tsan}
build_release=${SIPHON_BUILD_RELEASE:-build-release}
build_clang=${SIPHON_BUILD_CLANG:-build-clang}

siphon_install_deps

failed=()
skipped=()
done_names=()

# build_only NAME DIR [MESON SETUP OPTIONS...]: configure (warnings are
# errors) and build every target of DIR, tests included, without running
# them. 1 if configuring or building failed (recorded in `failed`).
build_only() {
	local name=$1 dir=$2
	shift 2
	echo "=== $name: configure $dir"
	if ! siphon_setup_build "$dir" -Dwerror=true "$@"; then
		failed+=("$name (configure)")
		return 1
	fi
	echo "=== $name: build"
	if ! ninja -C "$dir"; then
		failed+=("$name (build)")
		return 1
	fi
	done_names+=("$name")
}

# run_suite NAME DIR [MESON SETUP OPTIONS...]: build_only, then meson test.
run_suite() {
	local name=$1 dir=$2
	shift 2
	build_only "$name" "$dir" "$@" || return 0
	echo "=== $name: test"
	if ! meson test -C "$dir" --print-errorlogs "${test_args[@]}"; then
		failed+=("$name (tests)")
	fi
}

# Fuzz targets (libFuzzer, clang, ASan/UBSan): a short run of each target
# of fuzz/targets.sh for SIPHON_FUZZ_SECS seconds (default 45: five
# targets, under four minutes, so that the whole command stays well under
# 20 minutes on two cores; it took 15m45s with 60 s each on a development
# machine), from its seeds and its regression inputs (fuzz/regress/TARGET/,
# every crash ever found); bench/fuzz_long.sh runs them at length.
run_fuzz() {
	local dir=${SIPHON_BUILD_FUZZ:-build-fuzz} secs=${SIPHON_FUZZ_SECS:-45}
	local t work
	if ! command -v clang >/dev/null 2>&1; then
		echo "=== fuzz: skipped, clang missing"
		skipped+=("fuzz (clang missing)")
		return 0
	fi
	CC=clang build_only fuzz "$dir" -Dfuzz=true -Dtests=false \
		-Db_sanitize=address,undefined -Db_lundef=false || return 0
	# shellcheck source=fuzz/targets.sh
	source fuzz/targets.sh
	for t in "${fuzz_targets[@]}"; do
		work=$(mktemp -d /tmp/siphon-fuzz-XXXXXX)
		fuzz_seed "$t" "$work/corpus"
		mkdir -p "fuzz/regress/$t"
		echo "=== fuzz: fuzz_$t for ${secs}s"
		# Undefined behaviour is a finding, not a note in the log.
		if ! UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
			"$dir/fuzz/fuzz_$t" -max_total_time="$secs" -timeout=10 \
			-rss_limit_mb=2048 -print_final_stats=1 \
			-artifact_prefix="$work/" "$work/corpus" \
			"fuzz/regress/$t" 2>"$work/log"; then
			tail -40 "$work/log"
			echo "=== fuzz: fuzz_$t FAILED; inputs kept in $work"
			failed+=("fuzz ($t)")
			continue
		fi
		grep -E "^stat::number_of_executed_units|^#[0-9]+.*DONE" \
			"$work/log" || true
		rm -rf "$work"
	done
}

test_args=("$@")
run_suite normal "$build"
# Compile-only: gcc at -O3 finds what debugoptimized does not (it did:
# -Wmaybe-uninitialized, -Warray-bounds), and clang warns differently
# (clang++ too, for the C++ test of the public headers).
build_only release-gcc "$build_release" --buildtype=release || true
if command -v clang >/dev/null 2>&1; then
	# CC only counts when the directory is first set up; meson keeps the
	# compiler of an existing one, so check that it is clang.
	if CC=clang CXX=clang++ build_only release-clang "$build_clang" \
		--buildtype=release &&
		! grep -q '"command": "clang' \
			"$build_clang/compile_commands.json"; then
		echo "=== release-clang: $build_clang was not set up with clang"
		failed+=("release-clang (not clang: remove $build_clang)")
	fi
else
	echo "=== release-clang: skipped, clang missing"
	skipped+=("release-clang (clang missing)")
fi
run_suite asan "$build_asan" -Db_sanitize=address,undefined -Db_lundef=false
if ((${#test_args[@]} == 0)); then
	run_fuzz
fi
# ThreadSanitizer for what runs threads: the API (one worker per disk) and
# guest I/O from several threads, unless the caller chose suites.
if ((${#test_args[@]} == 0)); then
	test_args=(--suite api --suite guest)
	run_suite tsan "$build_tsan" -Db_sanitize=thread
fi

echo
if ((${#skipped[@]})); then
	echo "run-all: skipped: ${skipped[*]}"
fi
if ((${#failed[@]})); then
	echo "run-all: FAILED: ${failed[*]}"
	exit 1
fi
echo "run-all: all suites and builds passed (${done_names[*]})"
