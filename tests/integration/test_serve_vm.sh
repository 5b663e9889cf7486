#!/bin/sh
# A real VM on `siphon serve` (issue 13): qemu-system-x86_64 (KVM where
# /dev/kvm can be opened, TCG otherwise) boots Debian's kernel with a
# busybox initramfs built here; its virtio disk is
# `-drive file=nbd+unix:///disk?socket=...,format=raw` on a served overlay
# that streams (slowly) the whole time. The guest writes a pattern at
# 1 MiB, drops its page cache, reads it back through the export, and
# prints the md5 of the whole disk on its serial console, then powers off.
# The host then checks: the pattern read back right; the guest's md5 is
# the md5 of the image's content (qemu-img convert) and of the model (the
# chain before, with the pattern laid in); after SIGTERM a second
# `serve --stream` finishes the stream: no backing left, qemu-img check
# clean, content unchanged.
# Usage: test_serve_vm.sh SIPHON. Exits 77 without qemu-system-x86_64,
# busybox (static), a kernel in /boot with its virtio modules, or qemu-img.
# The server and the VM are killed by the EXIT trap whatever happens.
set -u
siphon=$(realpath "$1") || exit 1
for t in qemu-system-x86_64 qemu-img qemu-io python3 cpio md5sum; do
	command -v $t >/dev/null || { echo "$t missing: skipped"; exit 77; }
done
busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! ldd "$busybox" 2>&1 | grep -q "not a dynamic"; then
	echo "a static busybox is missing (busybox-static): skipped"
	exit 77
fi
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -1)
[ -n "$kernel" ] || { echo "no kernel in /boot (linux-image-amd64): skipped"; exit 77; }
kver=${kernel#/boot/vmlinuz-}
mods=/lib/modules/$kver/kernel/drivers
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev \
	virtio/virtio_pci_modern_dev virtio/virtio_pci block/virtio_blk; do
	[ -f "$mods/$m.ko" ] || { echo "$mods/$m.ko missing: skipped"; exit 77; }
done

dir=$(mktemp -d /tmp/siphon-test-vm-XXXXXX) || exit 1
pids=
cleanup() {
	for p in $pids; do
		kill "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM
. "$(dirname "$0")/nbdlib.sh"

# --- the initramfs: busybox, the virtio modules, the pattern, init ---
root=$dir/root
mkdir -p "$root/bin" "$root/lib" "$root/proc" "$root/sys" "$root/dev"
cp "$busybox" "$root/bin/busybox"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev \
	virtio_pci; do
	cp "$mods/virtio/$m.ko" "$root/lib/"
done
cp "$mods/block/virtio_blk.ko" "$root/lib/"
python3 -c 'import random, sys
r = random.Random(1313)
sys.stdout.buffer.write(bytes(r.getrandbits(8) for _ in range(65536)))' \
	>"$root/pattern"
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev \
	virtio_pci virtio_blk; do
	insmod /lib/$m.ko
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then
	echo "GUEST: no /dev/vda"
	poweroff -f
fi
dd if=/pattern of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null
sync
echo 3 >/proc/sys/vm/drop_caches
want=$(md5sum /pattern | cut -d' ' -f1)
got=$(dd if=/dev/vda bs=4096 skip=256 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
if [ "$want" = "$got" ]; then echo "GUEST: PATTERN OK"; else echo "GUEST: PATTERN BAD $got"; fi
echo "GUEST: DISKSUM $(md5sum /dev/vda | cut -d' ' -f1)"
sync
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip) >"$dir/initrd.gz" ||
	{ echo "cpio failed"; exit 1; }

# --- the chain: 32 MiB raw base with data, an overlay holding a little ---
qemu-img create -q -f raw "$dir/base.raw" 32M
qemu-io -f raw -c 'write -P 0x41 0 24M' -c 'write -P 0x42 28M 2M' \
	"$dir/base.raw" >/dev/null || exit 1
qemu-img create -q -f qcow2 -b "$dir/base.raw" -F raw "$dir/top.qcow2" ||
	exit 1
qemu-io -f qcow2 -c 'write -P 0x51 4M 1M' "$dir/top.qcow2" >/dev/null ||
	exit 1
qemu-img convert -O raw "$dir/top.qcow2" "$dir/model.raw" || exit 1
cp "$dir/top.qcow2" "$dir/fuse.qcow2" # for the boot from the FUSE file
dd if="$root/pattern" of="$dir/model.raw" bs=4096 seek=256 conv=notrunc \
	2>/dev/null
model_sum=$(md5sum "$dir/model.raw" | cut -d' ' -f1)

# KVM when it works: some hosts give /dev/kvm whose guests hang (nested
# virtualization); a 20 s boot of a tiny initramfs tells. TCG otherwise
# (SIPHON_VM_ACCEL=kvm|tcg chooses).
accel=${SIPHON_VM_ACCEL:-}
if [ -z "$accel" ]; then
	accel=tcg
	if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
		probe=$dir/probe
		mkdir -p "$probe/bin"
		cp "$busybox" "$probe/bin/busybox"
		printf '#!/bin/busybox sh\n/bin/busybox echo GUEST: HELLO\n/bin/busybox poweroff -f\n' \
			>"$probe/init"
		chmod +x "$probe/init"
		(cd "$probe" && find . | cpio -o -H newc 2>/dev/null | gzip) \
			>"$dir/probe.gz"
		if timeout 20 qemu-system-x86_64 -machine accel=kvm -cpu host \
			-m 128 -nographic -no-reboot -nodefaults -serial stdio \
			-kernel "$kernel" -initrd "$dir/probe.gz" \
			-append "console=ttyS0 panic=-1 quiet" 2>&1 |
			grep -q "GUEST: HELLO"; then
			accel=kvm
		else
			echo "note: /dev/kvm is there but a KVM guest did not boot in 20 s; using TCG"
		fi
	fi
fi
cpu=
[ "$accel" = kvm ] && cpu="-cpu host"

# --- serve it, streaming slowly, and boot ---
sock=$dir/nbd.sock
"$siphon" serve --stream --speed 2M --listen "unix:$sock" \
	"$dir/top.qcow2=disk" >"$dir/console.log.serve" 2>&1 &
spid=$!
pids="$pids $spid"
nbd_wait_unix "$sock" $spid "$dir/console.log.serve"
# boot DRIVE LOG: boot the guest on DRIVE (a -drive file=...), check what
# it printed on LOG's console against the model.
boot() {
	# The stream runs while the guest boots (its reads of the whole disk
	# copy what is left: then the stream completes too, before or after).
	grep -q "stream completed" "$2.serve" &&
		bad "$2: the stream ended before the VM started"
	# shellcheck disable=SC2086 # $cpu is empty or two words
	timeout 300 qemu-system-x86_64 -machine "accel=$accel" $cpu -m 256 \
		-smp 1 -nographic -no-reboot -nodefaults -serial stdio \
		-kernel "$kernel" -initrd "$dir/initrd.gz" \
		-append "console=ttyS0 panic=-1 quiet" \
		-drive "$1,format=raw,if=virtio" >"$2" 2>&1
	vmrc=$?
	tr -d '\r' <"$2" | grep "GUEST:" || true
	if [ $vmrc -ne 0 ]; then
		bad "$2: qemu-system-x86_64 exited $vmrc (accel $accel)"
		tail -30 "$2"
	fi
	grep -q "GUEST: PATTERN OK" "$2" ||
		bad "$2: the guest did not read its pattern back"
	guest_sum=$(tr -d '\r' <"$2" | sed -n 's/^GUEST: DISKSUM //p')
	[ "$guest_sum" = "$model_sum" ] ||
		bad "$2: guest md5 '$guest_sum', model's $model_sum"
}
boot "file=nbd+unix:///disk?socket=$sock,cache=none" "$dir/console.log"

kill -TERM $spid
wait $spid
rc=$?
pids=
[ $rc -eq 0 ] || { bad "siphon serve exited $rc after SIGTERM"; cat "$dir/console.log.serve"; }
qemu-img check -q "$dir/top.qcow2" || bad "qemu-img check after SIGTERM"
qemu-img convert -O raw "$dir/top.qcow2" "$dir/now.raw" || exit 1
img_sum=$(md5sum "$dir/now.raw" | cut -d' ' -f1)
[ "$img_sum" = "$model_sum" ] || bad "image md5 $img_sum, model's $model_sum"

# --- the stream resumes and finishes ---
"$siphon" serve --stream --listen "unix:$sock" "$dir/top.qcow2=disk" \
	>"$dir/serve2.log" 2>&1 &
spid=$!
pids="$spid"
i=0
while ! grep -q "stream completed" "$dir/serve2.log" && [ $i -lt 600 ]; do
	kill -0 $spid 2>/dev/null || break
	sleep 0.1
	i=$((i + 1))
done
grep -q "stream completed" "$dir/serve2.log" ||
	{ bad "the resumed stream did not complete"; cat "$dir/serve2.log"; }
kill -TERM $spid
wait $spid
pids=
qemu-img check -q "$dir/top.qcow2" || bad "qemu-img check after the stream"
qemu-img info --output=json "$dir/top.qcow2" | grep -q backing-filename &&
	bad "a backing file is left"
rm -f "$dir/now.raw"
qemu-img convert -O raw "$dir/top.qcow2" "$dir/now.raw" || exit 1
img_sum=$(md5sum "$dir/now.raw" | cut -d' ' -f1)
[ "$img_sum" = "$model_sum" ] || bad "flat image md5 $img_sum, model's $model_sum"

# --- the same VM from the FUSE file (skipped where FUSE cannot mount) ---
mnt=$dir/mnt
mkdir -p "$mnt"
"$siphon" serve --stream --speed 2M --listen "unix:$dir/f.sock" \
	--fuse "$mnt" "$dir/fuse.qcow2=disk" >"$dir/fuse.log.serve" 2>&1 &
spid=$!
pids="$spid"
i=0
while [ ! -f "$mnt/disk" ] && kill -0 $spid 2>/dev/null && [ $i -lt 600 ]; do
	sleep 0.1
	i=$((i + 1))
done
fuse=skipped
if [ -f "$mnt/disk" ]; then
	fuse=ok
	boot "file=$mnt/disk" "$dir/fuse.log"
	kill -TERM $spid
	wait $spid || bad "serve --fuse exited $? after SIGTERM"
	pids=
	qemu-img check -q "$dir/fuse.qcow2" || bad "qemu-img check (FUSE)"
	rm -f "$dir/now.raw"
	qemu-img convert -O raw "$dir/fuse.qcow2" "$dir/now.raw" || exit 1
	img_sum=$(md5sum "$dir/now.raw" | cut -d' ' -f1)
	[ "$img_sum" = "$model_sum" ] ||
		bad "FUSE image md5 $img_sum, model's $model_sum"
elif grep -q "cannot mount a FUSE" "$dir/fuse.log.serve"; then
	echo "SKIP: the boot from the FUSE file: $(tail -1 "$dir/fuse.log.serve")"
else
	bad "serve --fuse: no file"
	cat "$dir/fuse.log.serve"
fi

if [ $fail -eq 0 ]; then
	echo "PASS: VM (accel $accel) booted on siphon serve over NBD and" \
		"from the FUSE file ($fuse), its writes and md5 match"
fi
exit $fail
