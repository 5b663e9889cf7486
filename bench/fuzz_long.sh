#!/bin/bash
# Long fuzzing runs (issues 13 and 14): each libFuzzer target named (all of
# fuzz/targets.sh by default) for SECS seconds (default 1800), from its
# seeds and its regression inputs, one target after the other, on JOBS
# cores (default 2: -jobs/-workers, each job a fresh process when one
# stops). Prints, per target, the executions, the coverage (libFuzzer's
# cov: edges and ft: features at the end), the peak RSS and the crash,
# leak, timeout and out-of-memory inputs found. Those inputs are kept in the
# work directory (/var/tmp/siphon-fuzz-long-*): add each to
# fuzz/regress/TARGET/ once the bug is fixed. Exit 1 if any target found
# one.
# Usage: bench/fuzz_long.sh [SECS [TARGET...]] (needs clang; builds
# build-fuzz/ or $SIPHON_BUILD_FUZZ; JOBS=1 on a shared machine).
# FUZZ_FROM=DIR also loads the inputs of DIR/TARGET (an earlier run's
# corpus: a run that goes on where that one stopped). FUZZ_KEEP=1 keeps
# every work directory (its corpus/ for a later FUZZ_FROM), not only those
# of targets that found something.
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$src"
# shellcheck source=fuzz/targets.sh
source fuzz/targets.sh
secs=${1:-1800}
shift || true
targets=("$@")
((${#targets[@]})) || targets=("${fuzz_targets[@]}")
jobs=${JOBS:-2}
dir=${SIPHON_BUILD_FUZZ:-build-fuzz}
if [[ ! -f $dir/meson-private/coredata.dat ]]; then
	CC=clang meson setup "$dir" -Dfuzz=true -Dtests=false \
		-Db_sanitize=address,undefined -Db_lundef=false
fi
ninja -C "$dir"
bad=0
summary=()
for t in "${targets[@]}"; do
	work=$(mktemp -d /var/tmp/siphon-fuzz-long-XXXXXX)
	fuzz_seed "$t" "$work/corpus"
	mkdir -p "fuzz/regress/$t"
	echo "fuzz_$t: ${secs}s on $jobs core(s), work dir $work"
	par=()
	if ((jobs > 1)); then
		# Each job logs to fuzz-N.log in the current directory.
		par=(-jobs="$jobs" -workers="$jobs")
	fi
	rc=0
	t0=$SECONDS
	(cd "$work" && UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		"$src/$dir/fuzz/fuzz_$t" -max_total_time="$secs" \
		-timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
		-artifact_prefix="$work/" "${par[@]}" "$work/corpus" \
		${FUZZ_FROM:+"$FUZZ_FROM/$t"} \
		"$src/fuzz/regress/$t" >"$work/log" 2>&1) || rc=$?
	cat "$work"/fuzz-*.log >>"$work/log" 2>/dev/null || true
	execs=$(grep -h '^stat::number_of_executed_units' "$work/log" |
		awk '{n += $2} END {print n + 0}')
	last=$(grep -hE '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' \
		"$work/log" | tail -1)
	cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$last")
	ft=$(sed -nE 's/.*ft: ([0-9]+).*/\1/p' <<<"$last")
	rss=$(grep -h '^stat::peak_rss_mb' "$work/log" |
		awk '$2 > m {m = $2} END {print m + 0}')
	found=$(find "$work" -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' \
		-o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
	# The time it ran (less than SECS when interrupted).
	ran=$((SECONDS - t0 > 0 ? SECONDS - t0 : 1))
	line="fuzz_$t: exit $rc, $execs execs in ${ran}s ($((execs / ran))/s)"
	line+=", cov ${cov:-?} ft ${ft:-?}, peak RSS ${rss} MB"
	line+=", $found crash/leak/timeout/oom inputs"
	echo "$line"
	summary+=("$line")
	if ((rc != 0 || found != 0)); then
		bad=1
		echo "fuzz_$t: inputs kept in $work"
	elif [[ ${FUZZ_KEEP:-0} == 1 ]]; then
		echo "fuzz_$t: corpus kept in $work/corpus"
	else
		rm -rf "$work"
	fi
done
echo
printf '%s\n' "${summary[@]}"
exit $bad
