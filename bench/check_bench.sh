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
# The device's own rate for that work: fio (io_uring, O_DIRECT, 32 deep)
# replays the reads a one-pass check needs at the least (each L2 table,
# refcount block and the L1 and refcount tables, a cluster per request, in
# file order) from a log made from the image's tables; its row gives the
# time fio spent on that I/O, and "vs fio" is each check's wall time over
# it (the check's whole run, process start and open included, against
# fio's I/O only). Each program's binary and libraries are loaded once
# after the page cache is dropped (BENCH_WARM), so what is timed is the
# check, not the dynamic loader.
#
# Env: BENCH_DIR (default /var/tmp/siphon-bench), SIPHON, BENCH_KEEP=1.
set -euo pipefail

# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

size=${1:-1T}
reps=${2:-3}
bench_need qemu-img qemu-io python3 awk /usr/bin/time fio
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

# The reads a one-pass check of IMAGE needs at the least, as a fio log.
fio_log() {
	python3 - "$1" >"$2" <<'PY'
import struct, sys
p = sys.argv[1]
with open(p, "rb") as f:
    h = f.read(104)
    cs = 1 << struct.unpack_from(">I", h, 20)[0]
    l1n, l1_off = struct.unpack_from(">IQ", h, 36)
    rt_off, rt_cl = struct.unpack_from(">QI", h, 48)
    f.seek(l1_off)
    l1 = struct.unpack(">%dQ" % l1n, f.read(8 * l1n))
    f.seek(rt_off)
    rt = struct.unpack(">%dQ" % (rt_cl * cs // 8), f.read(rt_cl * cs))
mask = 0x00FFFFFFFFFFFE00
reads = {rt_off: rt_cl * cs, l1_off: max(4096, (8 * l1n + 4095) // 4096 * 4096)}
for e in list(l1) + list(rt):
    if e & mask:
        reads[e & mask] = cs
print("fio version 2 iolog")
print(p, "add")
print(p, "open")
for off in sorted(reads):
    print(p, "read", off, reads[off])
print(p, "close")
PY
}


field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], 0))' "$1" "$2"; }

printf '\n%-9s %-4s %-9s %8s %12s %5s %6s %6s %7s %9s %7s %6s\n' image rep \
	tool "wall s" "max RSS MiB" exit leaks corr passes "read MiB" "MiB/s" \
	"vs fio"
export BENCH_WARM=1
for img in prealloc leaky; do
	fio_log "$work/$img.qcow2" "$work/$img.iolog"
	for ((rep = 1; rep <= reps; rep++)); do
		drop_caches
		fio --name=check --read_iolog="$work/$img.iolog" \
			--replay_no_stall=1 --ioengine=io_uring --iodepth=32 \
			--direct=1 --output-format=json >"$work/$img-fio.json"
		read -r fio_s fio_mib < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["jobs"][0]["read"]
print(r["runtime"] / 1000, r["io_bytes"] / 1048576)' "$work/$img-fio.json")
		printf '%-9s %-4s %-9s %8s %12s %5s %6s %6s %7s %9s %7s %6s\n' \
			"$img" "$rep" fio "$fio_s" - - - - - \
			"$(calc "$fio_mib")" "$(calc "$fio_mib / $fio_s")" 1.00
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
			printf '%-9s %-4s %-9s %8s %12s %5s %6s %6s %7s %9s %7s %6s\n' \
				"$img" "$rep" "$tool" "$wall" "$(calc "$rss / 1024")" \
				"$code" "$(field "$work/$img-$tool.json" leaks)" \
				"$(field "$work/$img-$tool.json" corruptions)" "$passes" \
				"$(calc "$inputs * 512 / 1048576")" \
				"$(calc "$inputs * 512 / 1048576 / $wall")" \
				"$(calc "$wall / $fio_s")"
		done
	done
done
bench_cleanup
