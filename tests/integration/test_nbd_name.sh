#!/bin/sh
# QEMU as the oracle for siphon's NBD names (issue 12). qemu-nbd serves a
# raw file as export "my exp" on a Unix socket in a directory whose name
# has a space (so percent-decoding and JSON escapes matter). For each form
# of name meant to name that export: qemu-img must read the export through
# the name, siphon's parser ($1, nbd_name_probe) must find the same socket
# and export, and siphon's canonical URI for it must name the same export
# for QEMU too. Names of another export must fail in QEMU (so a match means
# something), and names QEMU refuses siphon refuses too.
# Exits 77 without qemu-nbd or qemu-img.
set -u
probe=$(realpath "$1") || exit 1
for t in qemu-nbd qemu-img; do
	command -v $t >/dev/null || { echo "$t missing: skipped"; exit 77; }
done
dir=$(mktemp -d /tmp/siphon-test-nbdname-XXXXXX) || exit 1
pid=
cleanup() {
	if [ -n "$pid" ]; then
		kill "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	fi
	rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

mkdir "$dir/s d" || exit 1
sock="$dir/s d/nbd.sock"
sock_enc=$(printf %s "$sock" | sed 's/ /%20/g')
exp="my exp"
size=3145728
qemu-img create -q -f raw "$dir/base.raw" $size || exit 1
qemu-nbd -k "$sock" -x "$exp" -f raw -r -t "$dir/base.raw" \
	2>"$dir/nbd.err" &
pid=$!
. "$(dirname "$0")/nbdlib.sh"
nbd_wait_unix "$sock" "$pid" "$dir/nbd.err"

# qemu_reads NAME: qemu-img opens NAME and sees the served export's size.
qemu_reads() {
	qemu-img info --output=json "$1" >"$dir/info.json" 2>"$dir/info.err" &&
		grep -q "\"virtual-size\": $size," "$dir/info.json"
}

# field NAME: the value of "NAME=" in the probe's output.
field() {
	sed -n "s/^$1=//p" "$dir/probe.out"
}

# same NAME: QEMU and siphon agree that NAME names "$exp" at "$sock".
same() {
	if ! qemu_reads "$1"; then
		echo "FAIL: qemu-img cannot read $1:"
		cat "$dir/info.err"
		fail=1
		return
	fi
	if ! "$probe" "$1" >"$dir/probe.out" 2>"$dir/probe.err"; then
		echo "FAIL: siphon refuses $1: $(cat "$dir/probe.err")"
		fail=1
		return
	fi
	if [ "$(field transport)" != unix ] ||
		[ "$(field socket)" != "$sock" ] ||
		[ "$(field export)" != "$exp" ]; then
		echo "FAIL: $1: siphon reads socket '$(field socket)'" \
			"export '$(field export)'"
		fail=1
		return
	fi
	uri=$(field uri)
	if ! qemu_reads "$uri"; then
		echo "FAIL: qemu-img cannot read siphon's URI $uri for $1:"
		cat "$dir/info.err"
		fail=1
		return
	fi
	mv "$dir/probe.out" "$dir/probe1.out"
	if ! "$probe" "$uri" >"$dir/probe.out" ||
		! cmp -s "$dir/probe1.out" "$dir/probe.out"; then
		echo "FAIL: siphon reads its own URI $uri differently"
		fail=1
		return
	fi
	echo "ok: $1 (as $uri)"
}

# other NAME EXPORT: NAME names EXPORT (not served): QEMU fails, siphon
# reads EXPORT at the same socket.
other() {
	if qemu_reads "$1"; then
		echo "FAIL: qemu-img reads $1, which names another export"
		fail=1
		return
	fi
	if ! "$probe" "$1" >"$dir/probe.out" 2>"$dir/probe.err" ||
		[ "$(field socket)" != "$sock" ] ||
		[ "$(field export)" != "$2" ]; then
		echo "FAIL: $1: siphon reads socket '$(field socket)'" \
			"export '$(field export)', want '$2'"
		fail=1
		return
	fi
	echo "ok: $1 names export '$2', QEMU agrees it is not served"
}

# refused NAME: QEMU and siphon both refuse NAME.
refused() {
	if qemu_reads "$1"; then
		echo "FAIL: qemu-img reads $1, which siphon should refuse"
		fail=1
		return
	fi
	if "$probe" "$1" >"$dir/probe.out" 2>"$dir/probe.err"; then
		echo "FAIL: siphon accepts $1, which QEMU refuses"
		fail=1
		return
	fi
	echo "ok: both refuse $1 ($(cat "$dir/probe.err"))"
}

same "nbd+unix:///my%20exp?socket=$sock_enc"
same "nbd+unix:///my%20ex%70?socket=$sock_enc"
same "json:{\"file.driver\":\"nbd\",\"file.server.type\":\"unix\",\"file.server.path\":\"$sock\",\"file.export\":\"$exp\"}"
same "json:{\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"$sock\"},\"export\":\"$exp\"}}"
same "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"nbd\",\"path\":\"$sock\",\"export\":\"$exp\"}}"
same "json:{\"driver\":\"nbd\",\"server.type\":\"unix\",\"server.path\":\"$sock\",\"export\":\"$exp\"}"
same "json:{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"$sock\"},\"export\":\"my\\u0020exp\"}"

other "nbd+unix:///other?socket=$sock_enc" "other"
other "nbd+unix:///my%2520exp?socket=$sock_enc" "my%20exp"
other "nbd+unix:///?socket=$sock_enc" ""
other "json:{\"file.driver\":\"nbd\",\"file.server.type\":\"unix\",\"file.server.path\":\"$sock\"}" ""

refused "nbd+unix:///my%20exp?socket=$sock_enc&foo=1"
refused "nbd+unix://localhost/my%20exp?socket=$sock_enc"
refused "nbd+unix:///my%20exp"
refused "json:{\"driver\":\"nbd\",\"server.type\":\"unix\",\"server.path\":\"$sock\",\"export\":\"$exp\",\"bogus\":1}"
refused "json:{\"driver\":\"nbd\",\"path\":\"$sock\",\"server.type\":\"unix\",\"server.path\":\"$sock\",\"export\":\"$exp\"}"

[ $fail -eq 0 ] && echo "all names agree"
exit $fail
