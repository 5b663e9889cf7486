#!/usr/bin/env bash
#
# Sequential allocating writes: siphon's qcow2 write path against fio.
#
#   siphon  bench/seqwrite (built by meson) writes SIZE of incompressible
#           data into a fresh qcow2 image (`siphon create`), the streaming
#           way: drv->alloc_run, async O_DIRECT writes on an sio_queue
#           (DEPTH chunks of CHUNK in flight), drv->commit_run, drv->flush
#           every 256 MiB and at the end.
#   fio     sequential O_DIRECT writes of SIZE to a fresh raw file on the same
#           filesystem (io_uring, bs=CHUNK, iodepth=DEPTH, fsync at the end,
#           no preallocation).
#
# Both are timed as whole processes (wall clock, final flush included); each
# side runs REPS times, alternating, and the median counts. Prints MiB/s and
# the ratio siphon/fio (target >= 0.9). Files go under $BENCH_DIR (default
# /var/tmp/siphon-bench: not tmpfs).
#
# Usage: bench/write_bench.sh [SIZE_MiB (1024)] [REPS (3)]
# Env:   CHUNK (2M), DEPTH (8), CLUSTER (64k), SIPHON, SEQWRITE, BENCH_KEEP=1
set -euo pipefail

# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

size_mib=${1:-1024}
reps=${2:-3}
chunk=${CHUNK:-2M}
depth=${DEPTH:-8}
cluster=${CLUSTER:-64k}
SEQWRITE=${SEQWRITE:-$(dirname "$SIPHON")/../bench/seqwrite}

bench_need fio python3
if [[ ! -x $SEQWRITE ]]; then
	echo "bench: no seqwrite at $SEQWRITE (ninja -C build; or set SEQWRITE)" >&2
	exit 1
fi
bench_workdir write

secs() { date +%s.%N; }

run_fio() {
	rm -f "$work/fio.raw"
	drop_caches
	local t0 t1
	t0=$(secs)
	fio --name=seqwrite --filename="$work/fio.raw" --rw=write \
		--bs="$chunk" --iodepth="$depth" --ioengine=io_uring --direct=1 \
		--size="${size_mib}M" --end_fsync=1 --fallocate=none \
		--output=/dev/null
	t1=$(secs)
	echo "$t0 $t1"
}

run_siphon() {
	rm -f "$work/img.qcow2"
	"$SIPHON" create -q -o "cluster_size=$cluster" "$work/img.qcow2" \
		"${size_mib}M"
	drop_caches
	local t0 t1
	t0=$(secs)
	"$SEQWRITE" --size "${size_mib}M" --chunk "$chunk" --depth "$depth" \
		"$work/img.qcow2" >"$work/seqwrite.out"
	t1=$(secs)
	echo "$t0 $t1"
}

fio_t=()
sip_t=()
for ((i = 1; i <= reps; i++)); do
	read -r a b < <(run_fio)
	fio_t+=("$(python3 -c "print($b - $a)")")
	read -r a b < <(run_siphon)
	sip_t+=("$(python3 -c "print($b - $a)")")
	echo "rep $i: fio ${fio_t[-1]} s, siphon ${sip_t[-1]} s" \
		"($(tail -1 "$work/seqwrite.out") internal)" >&2
done
# Every rep's image must be sound.
qemu-img check -q "$work/img.qcow2" || {
	echo "bench: qemu-img check failed on siphon's image" >&2
	exit 1
}

python3 - "$size_mib" "${fio_t[*]}" "${sip_t[*]}" <<'PY'
import statistics, sys
mib = int(sys.argv[1])
fio = [float(x) for x in sys.argv[2].split()]
sip = [float(x) for x in sys.argv[3].split()]
fm, sm = statistics.median(fio), statistics.median(sip)
print(f"sequential allocating writes, {mib} MiB, {len(fio)} reps (median)")
print(f"  fio raw O_DIRECT   {fm:7.3f} s  {mib / fm:8.1f} MiB/s")
print(f"  siphon qcow2       {sm:7.3f} s  {mib / sm:8.1f} MiB/s")
ratio = fm / sm
print(f"  ratio siphon/fio   {ratio:.3f}  (target >= 0.9: "
      f"{'met' if ratio >= 0.9 else 'NOT met'})")
PY
