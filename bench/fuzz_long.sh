#!/bin/bash
# Long fuzzing runs (issue 13, and issue 14's harness): each libFuzzer target
# for SECS seconds (default 1800) on both cores (-jobs=2), from its seeds
# and regression inputs; prints executions, coverage and crashes. A crash
# input is kept under the work directory: add it to fuzz/regress/TARGET/.
# Usage: bench/fuzz_long.sh [SECS] (needs clang; builds build-fuzz/).
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$src"
secs=${1:-1800}
dir=${SIPHON_BUILD_FUZZ:-build-fuzz}
if [[ ! -f $dir/meson-private/coredata.dat ]]; then
	CC=clang meson setup "$dir" -Dfuzz=true -Dtests=false \
		-Db_sanitize=address,undefined -Db_lundef=false
fi
ninja -C "$dir"
for t in nbd_server; do
	work=$(mktemp -d /var/tmp/siphon-fuzz-long-XXXXXX)
	python3 fuzz/nbd_seeds.py "$work/corpus"
	echo "fuzz_$t: ${secs}s, work dir $work"
	rc=0
	"$dir/fuzz/fuzz_$t" -max_total_time="$secs" -timeout=10 \
		-rss_limit_mb=4096 -print_final_stats=1 \
		-artifact_prefix="$work/" "$work/corpus" "fuzz/regress/$t" \
		>"$work/log" 2>&1 || rc=$?
	grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|DONE|^Done" \
		"$work/log" | tail -4
	crashes=$(ls "$work" | grep -cE '^(crash|leak|timeout|oom)-' || true)
	echo "fuzz_$t: exit $rc, $crashes crash/leak/timeout inputs in $work"
done
