#!/bin/sh
# Run examples/vmm_embed on a qcow2 over a raw base, the way a VMM embeds
# the API, and check the result with qemu-img. $1: the vmm_embed binary.
# Exits 77 when qemu-img is missing, io_uring is refused, or the qcow2
# driver cannot be streamed into yet.
set -u
exe=$(realpath "$1") || exit 1
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || {
	echo "qemu-img/qemu-io missing: skipped"; exit 77; }
dir=$(mktemp -d /tmp/siphon-test-vmm-XXXXXX) || exit 1
trap 'rm -rf "$dir"' EXIT
cd "$dir" || exit 1
qemu-img create -q -f raw base.raw 16M &&
qemu-io -f raw -c 'write -P 0x71 0 12M' base.raw >/dev/null &&
qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 &&
qemu-io -f qcow2 -c 'write -P 0x72 4M 256k' top.qcow2 >/dev/null &&
qemu-img convert -f qcow2 -O raw top.qcow2 ref.raw || exit 1

"$exe" -b 33554432 "$dir/top.qcow2" >out.txt 2>err.txt
rc=$?
cat out.txt err.txt
if [ $rc -ne 0 ]; then
	if [ $rc -eq 77 ] || grep -q "cannot be streamed into" err.txt; then
		echo "skipped"; exit 77
	fi
	echo "vmm_embed exited $rc"; exit 1
fi
grep -q '^completed' out.txt || { echo "no completion"; exit 1; }
qemu-img check -q top.qcow2 || { echo "qemu-img check failed"; exit 1; }
qemu-img compare -q -f qcow2 -F raw top.qcow2 ref.raw ||
	{ echo "content differs"; exit 1; }
if qemu-img info --output=json top.qcow2 | grep -q backing-filename; then
	echo "backing still set"; exit 1
fi
echo ok
