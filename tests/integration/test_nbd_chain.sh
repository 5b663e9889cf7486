#!/bin/sh
# Chains with NBD layers through every command (issue 12), QEMU the oracle.
# qemu-nbd serves, on Unix sockets in a temp dir: a raw base (export
# "base"), a qcow2 base exported as bytes (export "qbase", read as qcow2
# above the transport), and a sparse raw base (export "sparse"); nbdkit's
# memory plugin serves a sparse export too when nbdkit is there. Overlays
# come from `qemu-img create -b NAME` and from `siphon create -b NAME`,
# the raw and qcow2 bases served over TCP on 127.0.0.1 as well, one by a
# qemu-nbd that takes a single client,
# with clusters written by qemu-io; one chain has a local qcow2 layer
# between the overlay and the NBD base, one names its base with json:.
# For each chain:
#  - `siphon map --output=json` prints what `qemu-img map --output=json`
#    prints, and so the same (zero, data) for every byte;
#  - `siphon dump` equals `qemu-img convert -O raw` of the chain;
#  - `siphon stream` leaves an overlay with no backing that `qemu-img
#    compare` finds identical to a raw copy of the chain taken before and
#    `qemu-img check` finds clean.
# The sparse bases: stream copies only their data (bytes_copied).
# Errors (server down, unknown export, unknown query parameter, TLS
# option, a server demanding TLS, a loop through the same export twice, a
# relative backing name inside an export) exit 1 from map, stream, info
# and dump with a message saying what is wrong, and leave the overlay's
# bytes unchanged. Writing to an export (stream, io, create, dump onto it)
# is refused as read-only.
# Servers are killed by the EXIT trap whatever happens.
# Usage: test_nbd_chain.sh SIPHON. Exits 77 without qemu-nbd, qemu-img,
# qemu-io.
set -u
siphon=$(realpath "$1") || exit 1
for t in qemu-nbd qemu-img qemu-io python3; do
	command -v $t >/dev/null || { echo "$t missing: skipped"; exit 77; }
done
dir=$(mktemp -d /tmp/siphon-test-nbdchain-XXXXXX) || exit 1
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

# wait_sock SOCK PID: until the server logging to SOCK.log listens.
wait_sock() {
	nbd_wait_unix "$1" "$2" "$1.log"
}

# serve SOCK EXPORT FILE [FMT]: qemu-nbd serving FILE read-only, its bytes
# (FMT raw, the default) or the guest content of its format FMT.
serve() {
	qemu-nbd -f "${4:-raw}" -r -t -e 8 -x "$2" -k "$1" "$3" >"$1.log" 2>&1 &
	pids="$pids $!"
	wait_sock "$1" $!
}

S=$dir/s.sock
# Base contents: data, a zero run written as data, holes.
qemu-img create -q -f raw "$dir/base.raw" 4M || exit 1
qemu-io -f raw -c 'write -P 0x11 0 192k' -c 'write -P 0 1M 64k' \
	-c 'write -P 0x12 2M 320k' -c 'write -P 0x13 4032k 64k' \
	"$dir/base.raw" >/dev/null || exit 1
# A qcow2 base with data, zero clusters and a compressed cluster.
qemu-img create -q -f qcow2 "$dir/qbase.qcow2" 4M || exit 1
qemu-io -f qcow2 -c 'write -P 0x21 0 128k' -c 'write -z 1M 128k' \
	-c 'write -c -P 0x22 2M 64k' -c 'write -P 0x23 3M 64k' \
	"$dir/qbase.qcow2" >/dev/null || exit 1
# A sparse base: 64 MiB, 512 KiB of data.
qemu-img create -q -f raw "$dir/sparse.raw" 64M || exit 1
qemu-io -f raw -c 'write -P 0x31 8M 256k' -c 'write -P 0x32 40M 256k' \
	"$dir/sparse.raw" >/dev/null || exit 1
serve "$S" base "$dir/base.raw"
serve "$dir/q.sock" qbase "$dir/qbase.qcow2"
serve "$dir/sp.sock" sparse "$dir/sparse.raw"
U="nbd+unix:///base?socket=$S"
QU="nbd+unix:///qbase?socket=$dir/q.sock"
SU="nbd+unix:///sparse?socket=$dir/sp.sock"

# overlay FILE qemu-io-commands...: clusters of the overlay FILE written.
overlay() {
	f=$1
	shift
	for c in "$@"; do
		qemu-io -f qcow2 -c "$c" "$f" >/dev/null ||
			{ bad "qemu-io $c on $f"; return 1; }
	done
}

# map_same IMAGE: siphon and qemu agree on (zero, data) of every byte.
map_same() {
	qemu-img map --output=json "$1" >"$dir/q.map" 2>"$dir/q.err" ||
		{ bad "qemu-img map $1: $(cat "$dir/q.err")"; return; }
	"$siphon" map --output=json "$1" >"$dir/s.map" 2>"$dir/s.err" ||
		{ bad "siphon map $1: $(cat "$dir/s.err")"; return; }
	# Byte for byte, as the corpus test compares (depth, offset too) ...
	cmp -s "$dir/q.map" "$dir/s.map" || bad "map of $1 differs from qemu's:
$(diff "$dir/q.map" "$dir/s.map")"
	# ... and, to say what differs, (zero, data) of every byte.
	python3 - "$dir/q.map" "$dir/s.map" <<'EOF' || bad "map of $1 differs"
import json, sys

def runs(path):
    out = []
    for e in json.load(open(path)):
        key = (e["zero"], e["data"])
        if out and out[-1][2] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], key])
    return out

q, s = runs(sys.argv[1]), runs(sys.argv[2])
if q != s:
    print("qemu:  ", q)
    print("siphon:", s)
    sys.exit(1)
EOF
}

# dump_same IMAGE: siphon dump == qemu-img convert -O raw.
dump_same() {
	rm -f "$dir/d.raw" "$dir/c.raw"
	"$siphon" dump "$1" "$dir/d.raw" 2>"$dir/s.err" ||
		{ bad "siphon dump $1: $(cat "$dir/s.err")"; return; }
	qemu-img convert -O raw "$1" "$dir/c.raw" ||
		{ bad "qemu-img convert $1"; return; }
	cmp -s "$dir/d.raw" "$dir/c.raw" || bad "dump of $1 differs from qemu"
}

# stream_ok IMAGE [EXPECTED_BYTES_COPIED]: stream a copy of IMAGE; it ends
# with no backing, identical to the chain, clean.
stream_ok() {
	cp "$1" "$dir/st.qcow2" || return
	qemu-img convert -O raw "$1" "$dir/ref.raw" ||
		{ bad "qemu-img convert $1"; return; }
	"$siphon" stream --output=json "$dir/st.qcow2" >"$dir/st.json" \
		2>"$dir/s.err" ||
		{ bad "siphon stream $1: $(cat "$dir/s.err")"; return; }
	if qemu-img info "$dir/st.qcow2" | grep -q '^backing file'; then
		bad "stream of $1 left a backing file"
	fi
	qemu-img compare -q -f raw -F qcow2 "$dir/ref.raw" "$dir/st.qcow2" ||
		bad "stream of $1: content differs from the chain"
	qemu-img check -q "$dir/st.qcow2" || bad "stream of $1: check fails"
	if [ $# -gt 1 ]; then
		got=$(python3 -c 'import json,sys
print([json.loads(l) for l in open(sys.argv[1])][-1]["bytes_copied"])' \
			"$dir/st.json")
		[ "$got" = "$2" ] ||
			bad "stream of $1 copied $got bytes, not $2"
	fi
}

# chain_ok IMAGE [EXPECTED_BYTES_COPIED]: all three checks.
chain_ok() {
	f0=$fail
	map_same "$1"
	dump_same "$1"
	stream_ok "$@"
	[ $fail -eq $f0 ] && echo "ok: $(basename "$1") ($(qemu-img info \
		--output=json "$1" | sed -n 's/.*"backing-filename": "\(.*\)",/\1/p' |
		head -1))"
}

# Raw base, overlay by qemu-img.
qemu-img create -q -f qcow2 -b "$U" -F raw "$dir/a.qcow2" || exit 1
overlay "$dir/a.qcow2" 'write -P 0x41 64k 64k' 'write -P 0x42 1M 128k' \
	'write -z 2112k 64k'
chain_ok "$dir/a.qcow2"

# qcow2 base exported as bytes.
qemu-img create -q -f qcow2 -b "$QU" -F qcow2 "$dir/b.qcow2" || exit 1
overlay "$dir/b.qcow2" 'write -P 0x51 64k 64k' 'write -P 0x52 3M 32k'
chain_ok "$dir/b.qcow2"

# Overlay by siphon create: the size comes from the server.
"$siphon" create -q -f qcow2 -b "$U" -F raw "$dir/c.qcow2" 2>"$dir/s.err" ||
	bad "siphon create -b $U: $(cat "$dir/s.err")"
qemu-img info --output=json "$dir/c.qcow2" >"$dir/info.json"
grep -q '"virtual-size": 4194304,' "$dir/info.json" ||
	bad "siphon create: size not taken from the server"
grep -q "\"backing-filename\": \"nbd+unix:///base?socket=$S\"" \
	"$dir/info.json" || bad "siphon create: backing name not kept as given"
overlay "$dir/c.qcow2" 'write -P 0x61 2M 64k'
chain_ok "$dir/c.qcow2"
# ... and the format probed over the export.
"$siphon" create -q -f qcow2 -b "$QU" "$dir/c2.qcow2" 2>"$dir/s.err" ||
	bad "siphon create -b $QU: $(cat "$dir/s.err")"
qemu-img info --output=json "$dir/c2.qcow2" |
	grep -q '"backing-filename-format": "qcow2"' ||
	bad "siphon create: backing format not probed over the export"
chain_ok "$dir/c2.qcow2"

# A local qcow2 layer between the overlay and the NBD base.
qemu-img create -q -f qcow2 -b "$U" -F raw "$dir/mid.qcow2" || exit 1
overlay "$dir/mid.qcow2" 'write -P 0x71 128k 64k' 'write -P 0x72 3M 64k'
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$dir/d.qcow2" || exit 1
overlay "$dir/d.qcow2" 'write -P 0x73 3M 32k'
chain_ok "$dir/d.qcow2"
# stream --base URI keeps the export as the backing.
cp "$dir/d.qcow2" "$dir/db.qcow2"
qemu-img convert -O raw "$dir/d.qcow2" "$dir/ref.raw"
if "$siphon" stream -b "$U" "$dir/db.qcow2" >/dev/null 2>"$dir/s.err"; then
	qemu-img info "$dir/db.qcow2" |
		grep -q "^backing file: nbd+unix:///base?socket=$S" ||
		bad "stream --base: backing is not the export"
	qemu-img compare -q -f raw -F qcow2 "$dir/ref.raw" "$dir/db.qcow2" ||
		bad "stream --base: content differs"
	map_same "$dir/db.qcow2"
else
	bad "siphon stream -b $U: $(cat "$dir/s.err")"
fi

# A json: backing name.
J="json:{\"file.driver\":\"nbd\",\"file.server.type\":\"unix\",\"file.server.path\":\"$S\",\"file.export\":\"base\"}"
qemu-img create -q -f qcow2 -u -b "$J" -F raw "$dir/e.qcow2" 4M || exit 1
overlay "$dir/e.qcow2" 'write -P 0x81 0 64k'
chain_ok "$dir/e.qcow2"

# Over TCP on 127.0.0.1 (never another address): nbd://HOST:PORT/EXPORT
# and the json: inet form. A free port is asked of the kernel; should
# another program take it before qemu-nbd does, the next one is tried.
# serve_tcp EXPORT FILE [FMT]: sets PORT.
serve_tcp() {
	for try in 1 2 3 4 5; do
		PORT=$(nbd_free_port)
		log=$dir/tcp-$1.log
		qemu-nbd -f "${3:-raw}" -r -t -e 8 -x "$1" -b 127.0.0.1 \
			-p "$PORT" "$2" >"$log" 2>&1 &
		p=$!
		pids="$pids $p"
		nbd_wait_tcp "$PORT" "$p" && return 0
		kill "$p" 2>/dev/null
	done
	echo "qemu-nbd on 127.0.0.1: never listened:"
	cat "$log"
	exit 1
}
serve_tcp base "$dir/base.raw"
TPORT=$PORT
TU="nbd://127.0.0.1:$TPORT/base"
qemu-img create -q -f qcow2 -b "$TU" -F raw "$dir/t1.qcow2" || exit 1
overlay "$dir/t1.qcow2" 'write -P 0xc1 64k 64k' 'write -z 2112k 64k'
chain_ok "$dir/t1.qcow2"
"$siphon" info "$TU" >"$dir/info.txt" 2>"$dir/s.err" ||
	bad "siphon info $TU: $(cat "$dir/s.err")"
grep -qF "nbd server: 127.0.0.1:$TPORT" "$dir/info.txt" ||
	bad "siphon info $TU: no 'nbd server: 127.0.0.1:$TPORT'"
J="json:{\"file.driver\":\"nbd\",\"file.server.type\":\"inet\",\"file.server.host\":\"127.0.0.1\",\"file.server.port\":\"$TPORT\",\"file.export\":\"base\"}"
qemu-img create -q -f qcow2 -u -b "$J" -F raw "$dir/t2.qcow2" 4M || exit 1
overlay "$dir/t2.qcow2" 'write -P 0xc2 3M 64k'
chain_ok "$dir/t2.qcow2"
serve_tcp qbase "$dir/qbase.qcow2"
qemu-img create -q -f qcow2 -b "nbd://127.0.0.1:$PORT/qbase" -F qcow2 \
	"$dir/t3.qcow2" || exit 1
overlay "$dir/t3.qcow2" 'write -P 0xc3 1M 64k'
chain_ok "$dir/t3.qcow2"

# A server that takes one client at a time (qemu-nbd without --shared, so
# no multi-conn): siphon's own connection makes way for the worker's.
qemu-nbd -f raw -r -t -x base -k "$dir/one.sock" "$dir/base.raw" \
	>"$dir/one.sock.log" 2>&1 &
pids="$pids $!"
wait_sock "$dir/one.sock" $!
qemu-img create -q -f qcow2 -b "nbd+unix:///base?socket=$dir/one.sock" \
	-F raw "$dir/one.qcow2" || exit 1
overlay "$dir/one.qcow2" 'write -P 0xd1 1M 64k'
chain_ok "$dir/one.qcow2"

# The export itself, read-only: info, map, dump.
"$siphon" info "$U" >"$dir/info.txt" 2>"$dir/s.err" ||
	bad "siphon info $U: $(cat "$dir/s.err")"
for want in "nbd uri: $U" "nbd server: unix:$S" "nbd export: 'base'" \
	"nbd export size: 4 MiB" "nbd multi-conn: yes" \
	"nbd connections: 4 per worker" "nbd block status: yes"; do
	grep -qF "$want" "$dir/info.txt" || bad "siphon info: no '$want'"
done
"$siphon" info --output=json "$dir/a.qcow2" >"$dir/info.json" ||
	bad "siphon info --output=json a.qcow2"
python3 - "$dir/info.json" "$U" "unix:$S" <<'EOF' || bad "info json of the NBD layer"
import json, sys
j = json.load(open(sys.argv[1]))
n = j["chain"][1]["nbd"]
assert n["uri"] == sys.argv[2] and n["server"] == sys.argv[3], n
assert n["export"] == "base" and n["size"] == 4194304, n
assert n["multi-conn"] is True and n["block-status"] is True, n
assert n["connections"] == 4, n
EOF
map_same "$U"
rm -f "$dir/d.raw"
"$siphon" dump "$U" "$dir/d.raw" && cmp -s "$dir/d.raw" "$dir/base.raw" ||
	bad "siphon dump $U differs from the base"
out=$("$siphon" stream "$U" 2>&1)
[ $? -eq 1 ] && echo "$out" | grep -q 'read-only' ||
	bad "siphon stream $U: not refused as read-only: $out"
out=$("$siphon" io "$U" 'write 0 512' 2>&1)
[ $? -eq 1 ] && echo "$out" | grep -q 'read-only' ||
	bad "siphon io write $U: not refused as read-only: $out"
(cd "$dir" && "$siphon" dump "$dir/a.qcow2" "$U" >/dev/null 2>&1)
[ $? -eq 1 ] && [ -z "$(ls "$dir" | grep '^nbd')" ] ||
	bad "siphon dump onto $U: not refused, or a local file made"
(cd "$dir" && "$siphon" create -q -f qcow2 "$U" 1M >/dev/null 2>&1)
[ $? -eq 1 ] && [ -z "$(ls "$dir" | grep '^nbd')" ] ||
	bad "siphon create on $U: not refused, or a local file made"

# Guest content of a metadata-preallocated qcow2 (qemu-nbd -f qcow2): zero
# runs that are not holes, which qemu-img map calls data.
qemu-img create -q -f qcow2 -o preallocation=metadata "$dir/pre.qcow2" 4M ||
	exit 1
qemu-io -f qcow2 -c 'write -P 0xb1 1M 128k' "$dir/pre.qcow2" >/dev/null ||
	exit 1
serve "$dir/g.sock" guest "$dir/pre.qcow2" qcow2
qemu-img create -q -f qcow2 -b "nbd+unix:///guest?socket=$dir/g.sock" -F raw \
	"$dir/h.qcow2" || exit 1
overlay "$dir/h.qcow2" 'write -P 0xb2 3M 64k'
chain_ok "$dir/h.qcow2" 131072

# Sparse bases: map shows the holes, stream moves only the data.
qemu-img create -q -f qcow2 -b "$SU" -F raw "$dir/f.qcow2" || exit 1
chain_ok "$dir/f.qcow2" 524288
if command -v nbdkit >/dev/null; then
	nbdkit -f -U "$dir/m.sock" memory 32M >"$dir/m.sock.log" 2>&1 &
	pids="$pids $!"
	wait_sock "$dir/m.sock" $!
	MU="nbd+unix:///?socket=$dir/m.sock"
	qemu-io -f raw -c 'write -P 0x91 4M 192k' -c 'write -P 0x92 20M 64k' \
		"$MU" >/dev/null || bad "qemu-io into nbdkit memory"
	qemu-img create -q -f qcow2 -b "$MU" -F raw "$dir/g.qcow2" || exit 1
	overlay "$dir/g.qcow2" 'write -P 0x93 20M 64k'
	chain_ok "$dir/g.qcow2" 196608
else
	echo "nbdkit missing: its memory export not tested"
fi

# refused IMAGE WANT...: map and stream exit 1 with a message holding each
# WANT, and IMAGE's bytes stay as they were.
refused() {
	f=$1
	shift
	sum=$(md5sum <"$f")
	for cmd in map stream info dump; do
		if [ $cmd = dump ]; then
			out=$("$siphon" dump "$f" "$dir/x.raw" 2>&1)
		else
			out=$("$siphon" $cmd "$f" 2>&1)
		fi
		rc=$?
		[ $rc -eq 1 ] || bad "siphon $cmd $f: exit $rc, not 1: $out"
		for w in "$@"; do
			echo "$out" | grep -qF -- "$w" ||
				bad "siphon $cmd $f: no '$w' in: $out"
		done
	done
	[ "$(md5sum <"$f")" = "$sum" ] || bad "$f changed"
	echo "ok: refused $(basename "$f"): $out"
}

# (written before it names a server that is not there)
qemu-img create -q -f qcow2 "$dir/x1.qcow2" 4M || exit 1
overlay "$dir/x1.qcow2" 'write -P 0xa1 0 64k'
qemu-img rebase -q -u -f qcow2 -b "nbd+unix:///base?socket=$dir/none.sock" \
	-F raw "$dir/x1.qcow2" || exit 1
refused "$dir/x1.qcow2" "unix:$dir/none.sock" "x1.qcow2"
qemu-img create -q -f qcow2 -u -b "nbd+unix:///nope?socket=$S" \
	-F raw "$dir/x2.qcow2" 4M || exit 1
refused "$dir/x2.qcow2" "'nope'" "x2.qcow2"
qemu-img create -q -f qcow2 -u -b "nbd+unix:///base?socket=$S&foo=1" \
	-F raw "$dir/x3.qcow2" 4M || exit 1
refused "$dir/x3.qcow2" '"foo"' "x3.qcow2"
qemu-img create -q -f qcow2 -u \
	-b "nbd+unix:///base?socket=$S&tls-creds=tls0" -F raw \
	"$dir/x4.qcow2" 4M || exit 1
refused "$dir/x4.qcow2" "TLS" "x4.qcow2"
T="json:{\"file.driver\":\"nbd\",\"file.server.type\":\"unix\",\"file.server.path\":\"$S\",\"file.export\":\"base\",\"file.tls-creds\":\"tls0\"}"
qemu-img create -q -f qcow2 -u -b "$T" -F raw "$dir/x5.qcow2" 4M || exit 1
refused "$dir/x5.qcow2" "TLS" "x5.qcow2"
# Nothing listening on a TCP port of 127.0.0.1.
NP=$(nbd_free_port)
qemu-img create -q -f qcow2 -u -b "nbd://127.0.0.1:$NP/base" -F raw \
	"$dir/x10.qcow2" 4M || exit 1
refused "$dir/x10.qcow2" "127.0.0.1:$NP" "x10.qcow2"
# siphon create against a server that is not there changes nothing either.
out=$("$siphon" create -q -f qcow2 -b "nbd+unix:///b?socket=$dir/none.sock" \
	"$dir/x6.qcow2" 2>&1)
[ $? -eq 1 ] && [ ! -e "$dir/x6.qcow2" ] &&
	echo "$out" | grep -qF "unix:$dir/none.sock" ||
	bad "siphon create with no server: $out"

# A server that demands TLS (nbdkit with a PSK): said so, refused.
if command -v nbdkit >/dev/null; then
	printf 'alice:%s\n' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" \
		>"$dir/k.psk" && chmod 600 "$dir/k.psk"
	nbdkit -f -U "$dir/t.sock" --tls=require --tls-psk="$dir/k.psk" \
		memory 4M >"$dir/t.sock.log" 2>&1 &
	pids="$pids $!"
	wait_sock "$dir/t.sock" $!
	qemu-img create -q -f qcow2 -u -b "nbd+unix:///?socket=$dir/t.sock" \
		-F raw "$dir/x9.qcow2" 4M || exit 1
	refused "$dir/x9.qcow2" "requires TLS" "unix:$dir/t.sock" "x9.qcow2"
fi

# A loop through an export: a qcow2 export whose backing is itself.
qemu-img create -q -f qcow2 -u -b "nbd+unix:///lp?socket=$dir/l.sock" \
	-F qcow2 "$dir/lp.qcow2" 4M || exit 1
serve "$dir/l.sock" lp "$dir/lp.qcow2"
qemu-img create -q -f qcow2 -u -b "nbd+unix:///lp?socket=$dir/l.sock" \
	-F qcow2 "$dir/x7.qcow2" 4M || exit 1
refused "$dir/x7.qcow2" "loop"

# A qcow2 export naming a relative backing file: an export has no
# directory, so the name is refused, never resolved against the cwd.
qemu-img create -q -f qcow2 -u -b base.raw -F raw "$dir/rel.qcow2" 4M ||
	exit 1
serve "$dir/r.sock" rel "$dir/rel.qcow2"
qemu-img create -q -f qcow2 -u -b "nbd+unix:///rel?socket=$dir/r.sock" \
	-F qcow2 "$dir/x8.qcow2" 4M || exit 1
(cd "$dir" && refused "$dir/x8.qcow2" "'base.raw' is relative"; exit $fail) ||
	fail=1

[ $fail -eq 0 ] && echo "all NBD chains agree with qemu"
exit $fail
