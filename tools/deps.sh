# shellcheck shell=bash
#
# Shared by tools/demo.sh and tests/run-all.sh (source it, do not run it):
# the Debian 12 packages siphon needs to build, test and benchmark, and
# helpers to install them and to set up a meson build directory.

# Build: compiler, meson/ninja, the libraries (libnbd for NBD backing
# layers); clang for the second compiler that tests/run-all.sh builds with.
# Tests: Check, qemu-img/qemu-io/qemu-nbd (the oracle and an NBD server;
# qemu-system-common carries qemu's shared data), nbdkit (NBD servers with
# fault filters), libnbd-bin (nbdinfo, nbdcopy), python3.
# The VM test of `siphon serve`: qemu-system-x86, Debian's kernel (its
# virtio modules go into an initramfs built by the test), a static
# busybox, cpio.
# Benchmarks: fio, GNU time (/usr/bin/time -v for max RSS).
SIPHON_DEPS=(
	build-essential clang meson ninja-build pkg-config
	liburing-dev zlib1g-dev libzstd-dev libnbd-dev libfuse3-dev fuse3
	check qemu-utils qemu-system-common nbdkit libnbd-bin python3
	qemu-system-x86 linux-image-amd64 busybox-static cpio
	fio time
)

# Install SIPHON_DEPS with apt-get, when running as root on a system with
# apt-get and SIPHON_NO_APT is not 1; otherwise say why not and go on.
siphon_install_deps() {
	if [[ ${SIPHON_NO_APT:-0} == 1 ]]; then
		echo "deps: SIPHON_NO_APT=1, not installing packages"
		return 0
	fi
	if [[ $(id -u) -ne 0 ]]; then
		echo "deps: not root, not installing packages" \
			"(needs: ${SIPHON_DEPS[*]})"
		return 0
	fi
	if ! command -v apt-get >/dev/null 2>&1; then
		echo "deps: no apt-get, not installing packages" \
			"(needs: ${SIPHON_DEPS[*]})"
		return 0
	fi
	echo "deps: apt-get install ${SIPHON_DEPS[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update
	apt-get install -y --no-install-recommends "${SIPHON_DEPS[@]}"
}

# siphon_setup_build DIR [MESON OPTIONS...]
# Configure DIR (relative to the source root) with the given options: a new
# directory is set up, an existing meson build directory is reconfigured
# (keeping what it built).
siphon_setup_build() {
	local dir=$1
	shift
	if [[ -f $dir/meson-private/coredata.dat ]]; then
		meson setup --reconfigure "$dir" "$@"
	else
		meson setup "$dir" "$@"
	fi
}
