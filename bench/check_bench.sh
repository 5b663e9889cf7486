#!/bin/bash
#
# siphon check against qemu-img check on large images: wall time and peak
# memory, and whether the two agree (exit code, leaks, corruptions).
#
#   bash bench/check_bench.sh [SIZE [REPS]]          (default 1T 3)
#
# Images (64 KiB clusters, SIZE virtual):
#   prealloc  preallocation=metadata: every L2 table and every data cluster
#             referenced, the host file SIZE long (sparse): the most
#             metadata a SIZE image can hold (128 MiB of L2 per TiB) and a
#             host file of SIZE / 64 KiB clusters, so siphon counts it in
#             several windows (4 Mi clusters each by default);
#   leaky     the same with 1000 leaked clusters and a refcount lowered,
#             so both tools have something to report.
# Also what each check read from the device (GNU time's file system
# inputs, the page cache dropped before each run) and that over its wall
# time: the rate it reads metadata at.
#
# Env: BENCH_DIR (default /var/tmp/siphon-bench), SIPHON, BENCH_KEEP=1.
set -euo pipefail

# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

size=${1:-1T}
reps=${2:-3}
bench_need qemu-img qemu-io python3 awk /usr/bin/time
bench_workdir check

echo "bench: $size images in $work"
qemu-img create -q -f qcow2 -o cluster_size=64k,preallocation=metadata \
	"$work/prealloc.qcow2" "$size"
cp --sparse=always "$work/prealloc.qcow2" "$work/leaky.qcow2"
# 1000 leaked clusters past the end, one data cluster's refcount lowered.
python3 - "$work/leaky.qcow2" <<'PY'
import os, struct, sys
p = sys.argv[1]
with open(p, "r+b") as f:
    h = f.read(104)
    cs = 1 << struct.unpack_from(">I", h, 20)[0]
    l1_off = struct.unpack_from(">Q", h, 40)[0]
    rt_off = struct.unpack_from(">Q", h, 48)[0]
    per = cs // 2
    def rc_addr(host):
        c = host // cs
        f.seek(rt_off + 8 * (c // per))
        blk = struct.unpack(">Q", f.read(8))[0] & ~0x1ff
        return blk + 2 * (c % per)
    end = (os.path.getsize(p) + cs - 1) // cs * cs
    f.truncate(end + 1000 * cs)
    for i in range(1000):
        a = rc_addr(end + i * cs)
        assert a > 0x1ff, "no refcount block for the tail"
        f.seek(a)
        f.write(struct.pack(">H", 1))
    f.seek(l1_off)
    l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2 + 8 * 5)
    data = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(rc_addr(data))
    f.write(struct.pack(">H", 0))
PY
ls -ls "$work"


field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], 0))' "$1" "$2"; }

printf '\n%-9s %-4s %-9s %8s %12s %5s %6s %6s %7s %9s %7s\n' image rep tool \
	"wall s" "max RSS MiB" exit leaks corr passes "read MiB" "MiB/s"
for img in prealloc leaky; do
	for ((rep = 1; rep <= reps; rep++)); do
		for tool in qemu-img siphon; do
			if [[ $tool == siphon ]]; then
				bench_time "$img-$tool" "$SIPHON" check --output=json \
					"$work/$img.qcow2"
				passes=$(field "$work/$img-$tool.json" passes)
			else
				bench_time "$img-$tool" qemu-img check --output=json \
					"$work/$img.qcow2"
				passes=-
			fi
			inputs=$(awk -F': ' '/File system inputs/ { print $2 }' \
				"$work/$img-$tool.time")
			printf '%-9s %-4s %-9s %8s %12s %5s %6s %6s %7s %9s %7s\n' "$img" \
				"$rep" "$tool" "$wall" "$(calc "$rss / 1024")" "$code" \
				"$(field "$work/$img-$tool.json" leaks)" \
				"$(field "$work/$img-$tool.json" corruptions)" "$passes" \
				"$(calc "$inputs * 512 / 1048576")" \
				"$(calc "$inputs * 512 / 1048576 / $wall")"
		done
	done
done
bench_cleanup
