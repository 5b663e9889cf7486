#!/bin/bash
#
# Everything the project tests, as the README's test command: install the
# packages (root on Debian 12; skipped when not root or SIPHON_NO_APT=1),
# build and run every meson test (unit + integration) in a normal build, then
# again in an ASan/UBSan build, then the threaded API suite under TSan.
# Exits non-zero if any suite fails.
#
# Build directories (reused when they exist): build/ and build-asan/, or
# $SIPHON_BUILD and $SIPHON_BUILD_ASAN. Extra arguments go to `meson test`
# (e.g. --suite unit).
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$src"
# shellcheck source=tools/deps.sh
source tools/deps.sh

build=${SIPHON_BUILD:-build}
build_asan=${SIPHON_BUILD_ASAN:-build-asan}
build_tsan=${SIPHON_BUILD_TSAN:-build-tsan}

siphon_install_deps

failed=()

# run_suite NAME DIR [MESON SETUP OPTIONS...]
run_suite() {
	local name=$1 dir=$2
	shift 2
	echo "=== $name: configure $dir"
	if ! siphon_setup_build "$dir" "$@"; then
		failed+=("$name (configure)")
		return 0
	fi
	echo "=== $name: build"
	if ! ninja -C "$dir"; then
		failed+=("$name (build)")
		return 0
	fi
	echo "=== $name: test"
	if ! meson test -C "$dir" --print-errorlogs "${test_args[@]}"; then
		failed+=("$name (tests)")
	fi
}

test_args=("$@")
run_suite normal "$build"
run_suite asan "$build_asan" -Db_sanitize=address,undefined -Db_lundef=false
# ThreadSanitizer for what runs threads: the API (one worker per disk) and
# guest I/O from several threads, unless the caller chose suites.
if ((${#test_args[@]} == 0)); then
	test_args=(--suite api --suite guest)
	run_suite tsan "$build_tsan" -Db_sanitize=thread
fi

echo
if ((${#failed[@]})); then
	echo "run-all: FAILED: ${failed[*]}"
	exit 1
fi
echo "run-all: all suites passed (normal, ASan/UBSan, TSan)"
