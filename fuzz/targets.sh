# The fuzz targets and their seeds, for tests/run-all.sh (short runs) and
# bench/fuzz_long.sh (long ones): sourced, not run. A target TARGET is the
# program fuzz/fuzz_TARGET, its regression inputs are fuzz/regress/TARGET/.

# Every target, in the order the scripts run them.
fuzz_targets=(nbd_server qcow2_read qcow2_write json_parse nbd_name)

# fuzz_seed TARGET DIR: write TARGET's seed corpus into DIR (created). The
# qcow2 seeds need qemu-img; without it DIR stays empty (the regression
# inputs still run). Non-zero for an unknown target.
fuzz_seed() {
	local t=$1 d=$2 f
	f=$(dirname "${BASH_SOURCE[0]}")
	mkdir -p "$d"
	case $t in
	nbd_server) python3 "$f/nbd_seeds.py" "$d" ;;
	qcow2_read) python3 "$f/qcow2_seeds.py" "$d" ;;
	qcow2_write) python3 "$f/qcow2_seeds.py" --workload "$d" ;;
	json_parse) python3 "$f/text_seeds.py" json "$d" ;;
	nbd_name) python3 "$f/text_seeds.py" nbd_name "$d" ;;
	*)
		echo "fuzz_seed: unknown target $t" >&2
		return 1
		;;
	esac
}
