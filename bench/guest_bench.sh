#!/bin/sh
# Guest 4 KiB random reads at QD 32: siphon on a fully local qcow2 vs
# io_uring on a raw file of the same size, then siphon while a CONTINUOUS
# stream runs on an overlay. Usage: bench/guest_bench.sh BUILD_DIR [DIR] [MB]
# (DIR must be on the disk to measure; default /var/tmp).
set -eu
B=${1:?build dir}; D=${2:-/var/tmp}/siphon-guest-bench; MB=${3:-1024}; S=${SECS:-10}
P=$B/bench/guest_randread
rm -rf "$D"; mkdir -p "$D"; trap 'rm -rf "$D"' EXIT
run() { echo "\$ $*"; "$@"; }
# Data everywhere, so that every read goes to the device.
head -c "$((MB << 20))" /dev/urandom > "$D/raw.img"
qemu-img convert -O qcow2 -o cluster_size=65536 "$D/raw.img" "$D/local.qcow2"
cp "$D/raw.img" "$D/base.raw"
qemu-img create -q -f qcow2 -b "$D/base.raw" -F raw "$D/overlay.qcow2"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
run "$P" raw "$D/raw.img" "$S"
run "$P" siphon "$D/local.qcow2" "$S"
run "$P" siphon "$D/overlay.qcow2" "$S" stream
qemu-img check -q "$D/overlay.qcow2" && echo "overlay: qemu-img check ok"
