#!/bin/bash
#
# siphon dump vs qemu-img convert -O raw: read a fully allocated qcow2 image
# of incompressible data and write it out as raw.
#
#   bash bench/dump_vs_convert.sh [SIZE_MIB [REPS]]     (default 1024 3)
#
# Env: BENCH_DIR (default /var/tmp/siphon-bench, must not be tmpfs),
# SIPHON (binary, default build/tools/siphon), BENCH_KEEP=1 keeps the files.
# Needs about 3x SIZE of free space. Each run: drop page cache (root only),
# run the tool, then `sync` (inside the timing, so that tools that leave
# dirty pages behind pay for them), verify the output with cmp.
set -euo pipefail

# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

size_mib=${1:-1024}
reps=${2:-3}
bench_need qemu-img cmp awk
bench_workdir dump-vs-convert

echo "bench: $size_mib MiB, $reps repetitions, in $work"
echo "bench: writing $size_mib MiB of /dev/urandom into src.raw"
head -c "$((size_mib * 1024 * 1024))" /dev/urandom >"$work/src.raw"
qemu-img convert -f raw -O qcow2 "$work/src.raw" "$work/img.qcow2"
qemu-img info "$work/img.qcow2" | grep -E 'virtual size|disk size|cluster'

declare -A cmds=(
	[qemu-direct]="qemu-img convert -f qcow2 -O raw -t none -T none"
	[qemu-buffered]="qemu-img convert -f qcow2 -O raw"
	[siphon]="$SIPHON dump -f qcow2"
)
order=(qemu-direct qemu-buffered siphon)
declare -A times=()
out=$work/out.raw

for ((rep = 1; rep <= reps; rep++)); do
	# Rotate who goes first: the VM's host caches the virtual disk, so
	# the first reader of a repetition is the one that pays for it.
	n=${#order[@]}
	run_order=()
	for ((i = 0; i < n; i++)); do
		run_order+=("${order[$(((i + rep - 1) % n))]}")
	done
	for name in "${run_order[@]}"; do
		rm -f -- "$out"
		drop_caches
		read -r -a argv <<<"${cmds[$name]}"
		t0=$(now)
		"${argv[@]}" "$work/img.qcow2" "$out"
		sync
		t1=$(now)
		t=$(calc "$t1 - $t0")
		if ! cmp -s "$out" "$work/src.raw"; then
			echo "bench: $name wrote different data (rep $rep)" >&2
			exit 1
		fi
		echo "rep $rep: $name: $t s (output verified)"
		times[$name]="${times[$name]:-} $t"
	done
done
rm -f -- "$out"

echo
printf '%-14s %10s %10s %10s %12s\n' tool "median s" "min s" "MiB/s" \
	"vs qemu-direct"
declare -A rate=()
for name in "${order[@]}"; do
	# shellcheck disable=SC2086 # word splitting of the list is wanted
	med=$(median ${times[$name]})
	# shellcheck disable=SC2086
	min=$(printf '%s\n' ${times[$name]} | sort -g | head -n1)
	rate[$name]=$(calc "$size_mib / $med")
	printf '%-14s %10s %10s %10s %12s\n' "$name" "$med" "$min" \
		"${rate[$name]}" "$(calc "${rate[$name]} / ${rate[qemu-direct]}")"
done
echo
echo "throughput ratio siphon/qemu-img (-t none -T none): $(calc \
	"${rate[siphon]} / ${rate[qemu-direct]}")"
echo "throughput ratio siphon/qemu-img (default cache):   $(calc \
	"${rate[siphon]} / ${rate[qemu-buffered]}")"
