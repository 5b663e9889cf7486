#!/usr/bin/env python3
"""Seed images for fuzz_qcow2_read and fuzz_qcow2_write, made by qemu-img
and qemu-io (the independent writer): small cluster sizes and virtual
sizes so that each file stays a few KiB, in the variants the reader has
to know (v2 and v3, extended L2, zlib and zstd compressed clusters, a
backing name (a file, an nbd:// URI, a json: name), data and zero clusters, refcount widths 1 and 64, a
snapshot, a bitmap, preallocated metadata), one file each in DIR.

With --workload, each image is followed by the fuzz_qcow2_write workload
(fuzz/fuzz_qcow2_write.c: 8 records of 4 bytes), a few of them per image.

Without qemu-img nothing is made and the exit status is 0 (the fuzzer then
starts from its regression inputs). A variant this qemu cannot make is
left out. Usage: qcow2_seeds.py [--workload] DIR"""
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

K = 1024

# name: (create options, size, qemu-io commands, extra step)
VARIANTS = {
    "v3-empty": ("cluster_size=512", "64K", [], None),
    "v3-data": ("cluster_size=512", "64K",
                ["write -P 0xab 0 4k", "write -P 0x5a 33k 3k"], None),
    "v3-zero": ("cluster_size=4096", "1M",
                ["write -P 0xab 0 16k", "write -z 8k 16k",
                 "write -z 512k 64k", "discard 4k 4k"], None),
    "v2-data": ("compat=0.10,cluster_size=512", "64K",
                ["write -P 0xab 0 4k", "write -z 8k 4k"], None),
    "v3-l2-4k": ("cluster_size=4096", "1M",
                 ["write -P 0x11 0 4k", "write -P 0x22 1020k 4k"], None),
    # (qemu wants 16 KiB clusters at least for subclusters)
    "extended-l2": ("extended_l2=on,cluster_size=16384", "256K",
                    ["write -P 0xab 0 1k", "write -P 0xcd 17k 2k",
                     "write -z 64k 4k", "write -z 3k 1k"], None),
    "refcount1": ("refcount_bits=1,cluster_size=512", "64K",
                  ["write -P 0xab 0 4k"], None),
    "refcount64": ("refcount_bits=64,cluster_size=512", "64K",
                   ["write -P 0xab 4k 4k"], None),
    "lazy": ("lazy_refcounts=on,cluster_size=512", "64K",
             ["write -P 0xab 0 2k"], None),
    "prealloc": ("preallocation=metadata,cluster_size=512", "16K", [],
                 None),
    "backing": ("cluster_size=512", "64K", ["write -P 0xab 1k 2k"],
                "backing"),
    "backing-nbd": ("cluster_size=512", "64K", ["write -P 0xab 0 1k"],
                    "nbd://localhost:10810/disk"),
    "backing-json": ("cluster_size=512", "64K", [],
                     'json:{"file": {"driver": "nbd", "server": {"type": '
                     '"unix", "path": "/run/s"}, "export": "disk"}}'),
    "snapshot": ("cluster_size=512", "64K", ["write -P 0xab 0 4k"],
                 "snapshot"),
    "bitmap": ("cluster_size=4096", "256K", ["write -P 0xab 0 8k"],
               "bitmap"),
    "zlib": (None, "256K", None, "zlib"),
    "zstd": (None, "256K", None, "zstd"),
}


def run(*args):
    return subprocess.run(args, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def make(tmp, name, opts, size, cmds, extra):
    path = os.path.join(tmp, name + ".qcow2")
    if extra in ("zlib", "zstd"):
        raw = os.path.join(tmp, name + ".raw")
        with open(raw, "wb") as f:
            for i in range(64):  # compressible, not all alike
                f.write(bytes([i]) * 2 * K + bytes(range(256)) * 8)
        ctype = "compression_type=zstd," if extra == "zstd" else ""
        return path if run("qemu-img", "convert", "-c", "-f", "raw", "-O",
                           "qcow2", "-o", ctype + "cluster_size=4096",
                           raw, path) else None
    create = ["qemu-img", "create", "-f", "qcow2", "-o", opts]
    if extra == "backing":
        base = os.path.join(tmp, "base.qcow2")
        if not run("qemu-img", "create", "-f", "qcow2", base, size):
            return None
        create += ["-b", "base.qcow2", "-F", "qcow2"]
    if not run(*create, path, size):
        return None
    for c in cmds:
        if not run("qemu-io", "-f", "qcow2", "-c", c, path):
            return None
    if extra and extra.startswith(("nbd:", "json:")):
        # An NBD backing name, set last and unsafely: stored, never opened.
        if not run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", extra,
                   "-F", "raw", path):
            return None
    if extra == "snapshot":
        if not (run("qemu-img", "snapshot", "-c", "snap1", path) and
                run("qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 0 1k",
                    path)):
            return None
    if extra == "bitmap":
        if not run("qemu-img", "bitmap", "--add", path, "b0"):
            return None
    return path


def workloads(seed):
    """A few workloads: random records, and one of each op over the image."""
    rnd = random.Random(seed)
    out = [bytes(rnd.randrange(256) for _ in range(32)) for _ in range(2)]
    plain = b""
    for op, frac, n in ((0, 0, 7), (1, 0x4000, 15), (2, 0x8000, 127),
                        (0, 0x8100, 3), (3, 0, 0), (0, 0xfff0, 255),
                        (2 | 4, 0x2000, 1), (0 | 4, 0x6000, 255)):
        plain += struct.pack(">BHB", op, frac, n)
    return [plain] + out


def main():
    args = sys.argv[1:]
    wl = "--workload" in args
    args = [a for a in args if a != "--workload"]
    if len(args) != 1:
        sys.exit(__doc__)
    out = args[0]
    os.makedirs(out, exist_ok=True)
    if not shutil.which("qemu-img") or not shutil.which("qemu-io"):
        print("qcow2_seeds: no qemu-img/qemu-io, no seeds", file=sys.stderr)
        return
    made = 0
    with tempfile.TemporaryDirectory(prefix="siphon-qcow2-seeds-") as tmp:
        for i, (name, v) in enumerate(sorted(VARIANTS.items())):
            path = make(tmp, name, *v)
            if not path:
                print("qcow2_seeds: %s: qemu could not make it" % name,
                      file=sys.stderr)
                continue
            with open(path, "rb") as f:
                data = f.read()
            tails = workloads(i) if wl else [b""]
            for j, t in enumerate(tails):
                suffix = "-w%d" % j if wl else ""
                with open(os.path.join(out, name + suffix), "wb") as f:
                    f.write(data + t)
            made += 1
    print("qcow2_seeds: %d images in %s" % (made, out), file=sys.stderr)


main()
