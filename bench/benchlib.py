"""What the Python benchmarks share: sizes, commands, cold caches, chains.

The stream benchmarks (stream_bench.py, stream_trace.py) build the same
chains: a base full of incompressible data (raw, or a qcow2 made from it by
qemu-img convert, so its clusters sit where qemu puts them) under a qcow2
overlay that is empty or already holds every tenth cluster. Building them in
one place keeps the two scripts measuring the same thing.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

MiB = 1 << 20

BASE_FORMATS = ("raw", "qcow2")
LAYOUTS = ("tenth", "empty")


def parse_size(s):
    """'64M', '1G', '4096': bytes (binary suffixes k, M, G, T)."""
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)", s)
    if not m:
        raise argparse.ArgumentTypeError("bad size: " + s)
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    return int(m.group(1)) * mult[m.group(2).lower()]


def human(n):
    """Bytes as the size arguments spell them: 64M, 2G, 192k."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20),
                         ("k", 1 << 10)):
        if n >= unit and n % unit == 0:
            return "%d%s" % (n // unit, suffix)
    return str(n)


def run(cmd, **kw):
    """Run cmd, output captured as text; raises on failure unless check=False."""
    kw.setdefault("check", True)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw)


def drop_caches():
    """Sync, then drop the page cache when root (every timed run starts cold)."""
    os.sync()
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            pass


def warn_if_warm():
    """Say once that runs start with a warm page cache when not root."""
    if os.geteuid() != 0:
        print("warning: not root, the page cache is not dropped between "
              "runs", file=sys.stderr)


def need_tools(*tools):
    """Exit with a message naming the first tool not on PATH."""
    for tool in tools:
        if not shutil.which(tool):
            sys.exit("missing %s" % tool)


def default_siphon():
    """$SIPHON, else build/tools/siphon of this checkout."""
    return os.environ.get("SIPHON") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "build", "tools",
        "siphon")


def timed(cmd, **kw):
    """Drop caches, run cmd: (seconds, CompletedProcess); raises on failure."""
    drop_caches()
    t = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, **kw)
    el = time.monotonic() - t
    if p.returncode != 0:
        raise RuntimeError("%s failed: %s" % (cmd[0], p.stderr.strip()))
    return el, p


def rss_kib(stderr):
    """Maximum resident set size from /usr/bin/time -v's report, or -1."""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(m.group(1)) if m else -1


def qemu_io_script(img, cmds, fmt="qcow2"):
    """Run many qemu-io commands in one process (stdin)."""
    p = subprocess.run(["qemu-io", "-f", fmt, img], input="\n".join(cmds) +
                       "\nquit\n", text=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    if p.returncode != 0:
        sys.exit("qemu-io failed: " + p.stderr)


def make_raw_base(path, size, sparse_total=None):
    """A raw file of `size` random bytes.

    sparse_total: the virtual size of a sparse case; the `size` bytes of
    data are then spread in 1 MiB chunks over the whole file."""
    vsize = sparse_total or size
    with open(path, "wb") as f:
        f.truncate(vsize)
        nchunks = size // MiB
        stride = vsize // nchunks
        for i in range(nchunks):
            f.seek(i * stride)
            f.write(os.urandom(MiB))
        if not sparse_total and size % MiB:
            f.seek(nchunks * MiB)
            f.write(os.urandom(size % MiB))


def make_qcow2_base(raw, path, cs):
    """qemu-img convert of `raw`: the same data, clusters where qemu puts them."""
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
         "cluster_size=%d" % cs, raw, path])


def make_overlay(top, base, base_fmt, size, cs, layout, sparse_total=None):
    """A qcow2 overlay of `base`; layout 'tenth' writes every tenth cluster.

    With sparse_total the clusters written are the tenth of the data chunks
    make_raw_base() spread, at the same offsets."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         "cluster_size=%d" % cs, "-b", base, "-F", base_fmt, top])
    if layout == "empty":
        return
    if layout != "tenth":
        raise ValueError("unknown layout " + layout)
    stride = (sparse_total or size) // max(size // MiB, 1)
    cmds = []
    for i in range(0, size // cs, 10):
        if sparse_total:
            off = (i * cs // MiB) * stride + (i * cs) % MiB
        else:
            off = i * cs
        cmds.append("write -P 0x5a %d %d" % (off, cs))
    qemu_io_script(top, cmds)


def bytes_to_move(size, cs, layout):
    """What a stream copies: everything the overlay does not hold yet."""
    if layout == "empty":
        return size
    return size - (size // cs + 9) // 10 * cs


def verify(d, top, pristine):
    """top (streamed, standalone) must read as the pristine chain, and pass
    qemu-img check. The pristine overlay is copied: comparing opens it."""
    ref = os.path.join(d, "ref.qcow2")
    shutil.copyfile(pristine, ref)
    try:
        c = subprocess.run(["qemu-img", "compare", "-q", top, ref])
        k = subprocess.run(["qemu-img", "check", "-q", top],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return c.returncode == 0 and k.returncode == 0
    finally:
        os.unlink(ref)
