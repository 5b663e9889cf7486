#!/bin/sh
# A stream over an NBD base whose server goes away (issue 12, faults).
# qemu-nbd serves a raw base of random bytes on a Unix socket in a temp
# dir; `siphon stream --speed` keeps the copy going long enough to kill
# the server in the middle:
#  - killed and started again within the reconnect window: the stream
#    completes (exit 0) and `qemu-img compare` finds the overlay identical
#    to the base, `qemu-img check` clean, no backing left;
#  - killed for good: the stream ends with exit 1 and a message naming
#    the server, the overlay is clean (`qemu-img check`) and still reads
#    as the base where it is local; with the server back, a second stream
#    resumes and completes, identical to the base.
# The server is killed by the EXIT trap whatever happens. No timing is
# asserted: the waits only make the kills land mid-stream (a stream that
# finished before them fails the test as not proving anything).
# Usage: test_nbd_faults.sh SIPHON. Exits 77 without qemu-nbd, qemu-img.
set -u
siphon=$(realpath "$1") || exit 1
for t in qemu-nbd qemu-img python3; do
	command -v $t >/dev/null || { echo "$t missing: skipped"; exit 77; }
done
dir=$(mktemp -d /tmp/siphon-test-nbdfaults-XXXXXX) || exit 1
srv=
spid=
cleanup() {
	for p in $srv $spid; do
		kill -9 "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
	rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

. "$(dirname "$0")/nbdlib.sh"

S=$dir/s.sock
URI="nbd+unix:///base?socket=$S"

# start: qemu-nbd serving the base, waited for until it listens.
start() {
	rm -f "$S"
	qemu-nbd -f raw -r -t -e 8 -x base -k "$S" "$dir/base.raw" \
		>>"$dir/qemu-nbd.log" 2>&1 &
	srv=$!
	nbd_wait_unix "$S" "$srv" "$dir/qemu-nbd.log"
}

stop() {
	kill -9 "$srv" 2>/dev/null
	wait "$srv" 2>/dev/null
	srv=
}

# 16 MiB at 2 MiB/s: about 8 s of streaming to land the kills in.
python3 -c "import os,sys; sys.stdout.buffer.write(os.urandom(16 << 20))" \
	>"$dir/base.raw" || exit 1
start

overlay() {
	"$siphon" create -f qcow2 -b "$URI" -F raw "$1" >/dev/null ||
		{ echo "siphon create -b $URI failed"; exit 1; }
}

same_as_base() {
	qemu-img compare -q "$1" "$dir/base.raw" ||
		bad "$2: $1 differs from the base"
	qemu-img check -q "$1" || bad "$2: qemu-img check $1"
}

no_backing() {
	qemu-img info --output=json "$1" | python3 -c '
import json, sys
sys.exit(1 if "backing-filename" in json.load(sys.stdin) else 0)' ||
		bad "$2: $1 still has a backing file"
}

# stream_bg NAME [OPTION...]: `siphon stream` of $dir/NAME.qcow2 in the
# background (spid), slowed so the kills land mid-stream.
stream_bg() {
	name=$1
	shift
	"$siphon" stream --no-progress --speed 2M "$@" "$dir/$name.qcow2" \
		>"$dir/$name.out" 2>"$dir/$name.err" &
	spid=$!
}

# wait_stream: the stream's exit status in rc, waiting at most 120 s (a
# stream that hangs is killed and fails the test).
wait_stream() {
	i=0
	while kill -0 "$spid" 2>/dev/null; do
		i=$((i + 1))
		if [ $i -gt 1200 ]; then
			kill -9 "$spid"
			bad "the stream did not end within 120 s"
			break
		fi
		sleep 0.1
	done
	wait "$spid"
	rc=$?
	spid=
}

# 1. Killed and started again inside the window.
overlay "$dir/a.qcow2"
stream_bg a
sleep 2
kill -0 "$spid" 2>/dev/null || bad "restart: the stream ended before the kill"
stop
sleep 2
kill -0 "$spid" 2>/dev/null ||
	bad "restart: the stream ended while the server was down"
start
wait_stream
[ $rc -eq 0 ] || bad "restart: stream exit $rc: $(cat "$dir/a.err")"
same_as_base "$dir/a.qcow2" restart
no_backing "$dir/a.qcow2" restart

# 2. Killed for good: the stream fails after the window (set to 1.5 s by
# --nbd-reconnect, and the message says so), the image is clean; with the
# server back a second stream resumes and completes.
overlay "$dir/b.qcow2"
stream_bg b --nbd-reconnect 1.5
sleep 2
kill -0 "$spid" 2>/dev/null || bad "gone: the stream ended before the kill"
stop
wait_stream
[ $rc -eq 1 ] || bad "gone: stream exit $rc, not 1"
grep -q "$S" "$dir/b.err" || bad "gone: the message names no server: $(cat "$dir/b.err")"
grep -q "no connection for 1500 ms, giving up" "$dir/b.err" ||
	bad "gone: the message does not say it gave up after the window set: $(cat "$dir/b.err")"
start
# (qemu-img check opens the backing file: with the server back.)
qemu-img check -q "$dir/b.qcow2" || bad "gone: qemu-img check after the failure"
qemu-img compare -q "$dir/b.qcow2" "$dir/base.raw" ||
	bad "gone: the half-streamed overlay does not read as the base"
"$siphon" stream --no-progress --output=json "$dir/b.qcow2" >"$dir/b2.out" \
	2>"$dir/b2.err" || bad "gone: the second stream failed: $(cat "$dir/b2.err")"
python3 - "$dir/b2.out" <<'EOF' || bad "gone: the second stream did not resume"
import json, sys
done = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][-1]
assert done["event"] == "done", done
assert done["bytes_skipped"] > 0, done  # what the first one copied
assert done["bytes_copied"] < 16 << 20, done
EOF
same_as_base "$dir/b.qcow2" gone
no_backing "$dir/b.qcow2" gone

# 3. The NBD options refuse what they cannot take (usage errors, exit 2).
for o in "--nbd-reconnect -1" "--nbd-reconnect 3601" "--nbd-timeout x" \
	"--nbd-connections 0" "--nbd-connections 17"; do
	# shellcheck disable=SC2086
	"$siphon" stream $o "$dir/b.qcow2" >/dev/null 2>"$dir/u.err"
	rc=$?
	[ $rc -eq 2 ] || bad "stream $o: exit $rc, not 2: $(cat "$dir/u.err")"
	grep -q -- "${o%% *}" "$dir/u.err" ||
		bad "stream $o: the message does not name the option: $(cat "$dir/u.err")"
done

[ $fail -eq 0 ] && echo "nbd faults: ok"
exit $fail
