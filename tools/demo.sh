#!/bin/bash
#
# The README's main-job command: install the packages (root on Debian 12;
# skipped when not root or SIPHON_NO_APT=1), build siphon, make an example
# backing chain and show what siphon sees in it:
#
#   base.raw (raw, 48 MiB)  <-  mid.qcow2  <-  top.qcow2
#
# then check that `siphon dump` reads the same guest content as qemu does,
# stream the chain into top.qcow2 with progress, and verify the result with
# qemu-img compare (against the original chain), qemu-img check and siphon
# check.
# Files go to a temporary directory under $DEMO_DIR (default /var/tmp),
# removed at the end unless DEMO_KEEP=1.
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$src"
# shellcheck source=tools/deps.sh
source tools/deps.sh

build=${SIPHON_BUILD:-build}

siphon_install_deps
# The project's defaults, warnings not errors (-Dwerror=true is the
# development and CI setting, which tests/run-all.sh uses on the same build
# directory; say so explicitly, since a reconfigure keeps the old value).
siphon_setup_build "$build" -Dwerror=false
ninja -C "$build"
siphon=$src/$build/tools/siphon

mkdir -p "${DEMO_DIR:-/var/tmp}"
work=$(mktemp -d "${DEMO_DIR:-/var/tmp}/siphon-demo.XXXXXX")
cleanup() {
	if [[ ${DEMO_KEEP:-0} == 1 ]]; then
		echo "demo: kept $work"
	else
		rm -rf -- "$work"
	fi
}
trap cleanup EXIT

step() {
	if [[ -t 1 ]]; then
		printf '\n\033[1m== %s\033[0m\n' "$*"
	else
		printf '\n== %s\n' "$*"
	fi
}

show() {
	printf '$ %s\n' "$*"
	"$@"
}

step "building an example chain in $work"
cd "$work"
# Base: a sparse raw disk with some random data and some patterned data.
truncate -s 48M base.raw
head -c 8M /dev/urandom | dd of=base.raw bs=1M seek=0 conv=notrunc status=none
head -c 4M /dev/urandom | dd of=base.raw bs=1M seek=20 conv=notrunc status=none
qemu-io -f raw -c 'write -P 0xb0 40M 2M' base.raw >/dev/null
# Middle: qcow2 over the raw base (relative backing name), overwrites,
# zeroes and new data.
qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 48M
qemu-io -f qcow2 -c 'write -P 0x1a 4M 2M' -c 'write -z 21M 1M' \
	-c 'write -P 0x1b 30M 512k' mid.qcow2 >/dev/null
# Top: qcow2 over mid, small writes scattered across the disk.
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 48M
qemu-io -f qcow2 -c 'write -P 0x2a 0 64k' -c 'write -P 0x2b 5M 4k' \
	-c 'write -P 0x2c 30M 1M' -c 'write -z 41M 256k' \
	-c 'write -P 0x2d 47M 1M' top.qcow2 >/dev/null
ls -ls "$work"

step "siphon info"
show "$siphon" info top.qcow2

step "siphon map (which layer holds each range)"
show "$siphon" map top.qcow2
show "$siphon" map --output=json top.qcow2
if cmp -s <("$siphon" map --output=json top.qcow2) \
	<(qemu-img map --output=json top.qcow2); then
	echo "map: identical to qemu-img map --output=json"
else
	echo "map: DIFFERS from qemu-img map --output=json" >&2
	diff -u <(qemu-img map --output=json top.qcow2) \
		<("$siphon" map --output=json top.qcow2) >&2 || true
	exit 1
fi

step "siphon dump (guest content of the chain into a sparse raw file)"
show "$siphon" dump top.qcow2 dump.raw
ls -ls dump.raw
show qemu-img compare -f raw -F qcow2 dump.raw top.qcow2

step "siphon stream (copy what top.qcow2 lacks from its chain, drop the backing)"
cp --sparse=always top.qcow2 top.orig.qcow2 # the chain as it was, to compare
show "$siphon" stream --progress top.qcow2
show "$siphon" info top.qcow2
if qemu-img info --output=json top.qcow2 | grep -q '"backing-filename"'; then
	echo "stream: top.qcow2 still has a backing file" >&2
	exit 1
fi

step "verify: the streamed image reads exactly as the chain did, and is clean"
show qemu-img compare top.qcow2 top.orig.qcow2
show qemu-img check top.qcow2
show "$siphon" check top.qcow2
show "$siphon" map top.qcow2

step "demo finished: top.qcow2 is standalone and reads as its chain did"
