#!/bin/bash
#
# siphon map on a huge, sparsely allocated chain: a 1 TiB qcow2 overlay over
# a sparse 1 TiB raw base, with data scattered across the whole disk in both.
# Map time and memory should follow the allocated data, not the virtual size.
#
#   bash bench/map_1tib.sh [TOP_WRITES [BASE_WRITES [REPS]]]
#                                              (default 4096 1024 3)
#
# Env: BENCH_DIR (default /var/tmp/siphon-bench), SIPHON, BENCH_KEEP=1.
# Needs about TOP_WRITES * 128 KiB of space (data + L2 tables).
set -euo pipefail

# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

top_writes=${1:-4096}
base_writes=${2:-1024}
reps=${3:-3}
bench_need qemu-img qemu-io awk cmp /usr/bin/time
bench_workdir map-1tib

size=$((1 << 40))
cluster=$((64 * 1024))
nclusters=$((size / cluster))
batch=256

# write_scattered IMAGE FMT COUNT SEED PATTERN: COUNT 64 KiB writes at
# pseudo-random cluster-aligned offsets, in qemu-io batches.
write_scattered() {
	local img=$1 fmt=$2 count=$3 seed=$4 pattern=$5 i args=()
	RANDOM=$seed
	for ((i = 0; i < count; i++)); do
		# 30 random bits: enough for 2^24 clusters of 64 KiB.
		local c=$((((RANDOM << 15) | RANDOM) % nclusters))
		args+=(-c "write -q -P $pattern $((c * cluster)) 64k")
		if ((${#args[@]} >= 2 * batch)); then
			qemu-io -f "$fmt" "${args[@]}" "$img"
			args=()
		fi
	done
	if ((${#args[@]})); then
		qemu-io -f "$fmt" "${args[@]}" "$img"
	fi
}

echo "bench: 1 TiB chain in $work ($base_writes base writes," \
	"$top_writes top writes of 64 KiB)"
truncate -s 1T "$work/base.raw"
write_scattered "$work/base.raw" raw "$base_writes" 1 0x11
qemu-img create -q -f qcow2 -b base.raw -F raw "$work/top.qcow2" 1T
write_scattered "$work/top.qcow2" qcow2 "$top_writes" 2 0x22
ls -ls "$work"


printf '\n%-6s %-10s %10s %14s %10s\n' rep tool "wall s" "max RSS MiB" \
	extents
for ((rep = 1; rep <= reps; rep++)); do
	for name in qemu-img siphon; do
		if [[ $name == siphon ]]; then
			bench_time siphon "$SIPHON" map --output=json "$work/top.qcow2"
		else
			bench_time qemu-img qemu-img map --output=json "$work/top.qcow2"
		fi
		extents=$(grep -c '"start"' "$work/$name.json" || true)
		printf '%-6s %-10s %10s %14s %10s\n' "$rep" "$name" "$wall" \
			"$(calc "$rss / 1024")" "$extents"
	done
	if cmp -s "$work/siphon.json" "$work/qemu-img.json"; then
		echo "       outputs identical"
	else
		echo "       outputs DIFFER (first lines of diff follow)"
		diff "$work/qemu-img.json" "$work/siphon.json" | head -n 10 || true
	fi
done
