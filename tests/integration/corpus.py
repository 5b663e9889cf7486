"""Build a corpus of small disk images with qemu-img/qemu-io.

The corpus is the input of the integration tests: every entry is an image (or
a chain of images) made by qemu itself, so that qemu-img can serve as the
independent oracle for what siphon must report and read.

    entries = corpus.build("/tmp/somedir")
    for e in entries:
        e.name, e.top, e.fmt, e.files

Every layer and every write uses a distinct data pattern (qemu-io write -P),
so that reading a cluster from the wrong layer or the wrong offset shows up as
a content mismatch. Images are a few MiB each; the whole corpus takes a few
seconds to build.

Run as a script to build a corpus into a directory and check it with
`qemu-img check` / `qemu-img info` alone:

    python3 tests/integration/corpus.py [DIR]

Stdlib only (python 3.11).
"""

from __future__ import annotations

import dataclasses
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

TIMEOUT = 60  # seconds, per qemu-img/qemu-io invocation


class CorpusError(RuntimeError):
    """A qemu tool failed while building an image."""


@dataclasses.dataclass
class Entry:
    name: str           # short unique name, e.g. "cluster-512"
    top: str            # path of the image to open
    fmt: str            # format of top: "qcow2" or "raw"
    files: list[str]    # every file that belongs to the entry, top first
    note: str = ""      # what the entry covers
    dirty: bool = False  # qcow2 dirty bit set on purpose (check reports errors)


def have_qemu() -> bool:
    return shutil.which("qemu-img") is not None and \
        shutil.which("qemu-io") is not None


def _no_core():
    # qemu-io's "abort" command is used on purpose; no core files please.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(argv: list[str], ok=(0,), timeout=TIMEOUT) -> subprocess.CompletedProcess:
    """Run a qemu tool; raise CorpusError unless its exit code is in ok."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True,
                           timeout=timeout, preexec_fn=_no_core)
    except subprocess.TimeoutExpired as e:
        raise CorpusError(f"timeout after {timeout}s: {' '.join(argv)}") from e
    if p.returncode not in ok:
        raise CorpusError(f"exit {p.returncode}: {' '.join(argv)}\n"
                          f"{p.stdout}{p.stderr}")
    # qemu-io reports failed commands on stdout/stderr but exits 0.
    if argv[0] == "qemu-io":
        for line in (p.stdout + p.stderr).splitlines():
            low = line.lower()
            if "error" in low or "failed" in low or "unknown command" in low:
                raise CorpusError(f"qemu-io: {line}\n  in: {' '.join(argv)}")
    return p


def qemu_img(*args: str, ok=(0,)) -> subprocess.CompletedProcess:
    return run(["qemu-img", *args], ok=ok)


def qemu_io(path: str, fmt: str, *cmds: str, ok=(0,)) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(path)
    return run(argv, ok=ok)


def pat(layer: int, i: int) -> str:
    """A pattern byte distinct per (layer, i): layer in 0..7, i in 0..31."""
    return f"0x{(layer * 32 + i) % 255 + 1:02x}"


def create_qcow2(path: str, size: int | str, opts: str = "",
                 backing: str | None = None, backing_fmt: str = "qcow2",
                 unsafe: bool = False, relative: bool = False) -> None:
    """relative: store the backing name relative to the image's directory
    (readers must resolve it against the image, not the working directory)."""
    argv = ["create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing is not None:
        if relative:
            backing = os.path.relpath(backing, os.path.dirname(path))
        argv += ["-b", backing, "-F", backing_fmt]
        if unsafe:
            argv.append("-u")
    argv += [path, str(size)]
    qemu_img(*argv)


def create_raw(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def fill_bytes(seed: int, size: int, kind: str) -> bytes:
    """Deterministic content: "text" compresses well, "random" does not."""
    rnd = random.Random(seed)
    if kind == "random":
        return rnd.randbytes(size)
    out = bytearray()
    n = 0
    while len(out) < size:
        out += (f"siphon corpus seed {seed} line {n} "
                f"{rnd.randrange(1 << 30):08x}\n").encode()
        n += 1
    return bytes(out[:size])


def write_raw(path: str, size: int, pieces: list[tuple[int, bytes]]) -> None:
    """A sparse raw file of size bytes with pieces written at their offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)


class Builder:
    def __init__(self, root: str):
        self.root = root
        self.entries: list[Entry] = []

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def add(self, name: str, top: str, files: list[str], fmt: str = "qcow2",
            note: str = "", dirty: bool = False) -> None:
        assert all(e.name != name for e in self.entries), name
        self.entries.append(Entry(name, top, fmt, files, note, dirty))


# ---------------------------------------------------------------------------
# The cases. Each takes a Builder and adds one or more entries.


def case_cluster_sizes(b: Builder) -> None:
    """Every cluster size from 512 to 2M, with writes that straddle clusters,
    partial clusters, zeroed and discarded ranges."""
    for label, cs, size in (("512", 512, 2 * MiB), ("4k", 4 * KiB, 4 * MiB),
                            ("64k", 64 * KiB, 4 * MiB),
                            ("2M", 2 * MiB, 8 * MiB)):
        p = b.path(f"cluster-{label}.qcow2")
        create_qcow2(p, size, f"cluster_size={cs}")
        qemu_io(p, "qcow2",
                f"write -P {pat(1, 0)} 0 {cs}",
                f"write -P {pat(1, 1)} {cs + 512} {cs}",      # straddles
                f"write -P {pat(1, 2)} {size // 2 - 1024} 3k",
                f"write -P {pat(1, 3)} {size - 512} 512",     # last sector
                f"write -z {size // 4} {2 * cs}",
                f"write -P {pat(1, 4)} {size // 8} {min(4 * cs, size // 4)}",
                f"discard {size // 8 + cs} {cs}")
        b.add(f"cluster-{label}", p, [p], note=f"cluster_size={cs}")


def case_compat(b: Builder) -> None:
    """v2 (0.10) and v3 (1.1), alone and over a backing file, with zeroed and
    discarded clusters (v3 has zero clusters, v2 must write zeros)."""
    for compat in ("0.10", "1.1"):
        tag = "v2" if compat == "0.10" else "v3"
        # Alone.
        p = b.path(f"{tag}-zero-discard.qcow2")
        create_qcow2(p, 4 * MiB, f"compat={compat}")
        qemu_io(p, "qcow2",
                f"write -P {pat(2, 0)} 0 1M",
                f"write -z 128k 128k",
                f"discard 512k 128k",
                f"write -z -u 768k 64k",
                f"write -P {pat(2, 1)} 2M 256k",
                f"write -z 3M 64k")
        b.add(f"{tag}-zero-discard", p, [p], note=f"compat={compat}")

        # Over a backing file: zeroing/discarding must hide (or, for v2
        # discard, may reveal) backing data; qemu decides, we compare.
        base = b.path(f"{tag}-backed-base.qcow2")
        top = b.path(f"{tag}-backed-top.qcow2")
        create_qcow2(base, 4 * MiB, f"compat={compat}")
        qemu_io(base, "qcow2", f"write -P {pat(3, 0)} 0 4M")
        create_qcow2(top, 4 * MiB, f"compat={compat}", backing=base)
        qemu_io(top, "qcow2",
                f"write -P {pat(3, 1)} 64k 64k",
                f"write -z 256k 128k",
                f"write -z -u 512k 64k",
                f"discard 1M 128k",
                f"write -P {pat(3, 2)} 1M 4k",           # COW from backing
                f"write -z 2M 4k",                       # partial-cluster zero
                f"write -P {pat(3, 3)} 3M 1k")
        b.add(f"{tag}-backed-zero-discard", top, [top, base],
              note=f"compat={compat} with qcow2 backing")


def case_refcount_bits(b: Builder) -> None:
    clusters = {1: 4096, 2: 512, 4: 65536, 8: 4096, 16: 65536, 32: 512,
                64: 65536}
    for i, (bits, cs) in enumerate(sorted(clusters.items())):
        p = b.path(f"refcount-{bits}.qcow2")
        create_qcow2(p, 2 * MiB, f"refcount_bits={bits},cluster_size={cs}")
        qemu_io(p, "qcow2",
                f"write -P {pat(4, i)} 0 64k",
                f"write -P {pat(4, i + 8)} 1M 192k",
                f"write -z 1088k 64k")
        b.add(f"refcount-{bits}", p, [p],
              note=f"refcount_bits={bits} cluster_size={cs}")


def _mixed_raw(path: str, size: int, seed: int) -> None:
    """Compressible text, incompressible random data, zeros and holes."""
    pieces = []
    off = 0
    i = 0
    while off < size:
        kind = ("text", "random", "zero", "text", "hole")[i % 5]
        n = min(size - off, (i % 3 + 1) * 96 * KiB)
        if kind in ("text", "random"):
            pieces.append((off, fill_bytes(seed + i, n, kind)))
        elif kind == "zero":
            pieces.append((off, bytes(n)))
        off += n
        i += 1
    write_raw(path, size, pieces)


def case_compressed(b: Builder) -> None:
    """Compressed clusters (zlib, zstd) made by convert -c, at several
    cluster sizes (the descriptor layout depends on cluster_bits), and
    compressed writes into an overlay (qemu-io write -c)."""
    variants = (("zlib", 64 * KiB, 4 * MiB), ("zlib", 4 * KiB, 2 * MiB),
                ("zlib", 512, 1 * MiB), ("zstd", 64 * KiB, 4 * MiB),
                ("zstd", 2 * MiB, 8 * MiB))
    for i, (ctype, cs, size) in enumerate(variants):
        src = b.path(f"compressed-src-{i}.raw")
        _mixed_raw(src, size, 1000 + i)
        name = f"compressed-{ctype}-{cs // KiB if cs >= KiB else cs}" + \
            ("k" if cs >= KiB else "")
        p = b.path(f"{name}.qcow2")
        qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"compression_type={ctype},cluster_size={cs}", src, p)
        os.unlink(src)
        b.add(name, p, [p], note=f"convert -c {ctype} cluster_size={cs}")

    for ctype in ("zlib", "zstd"):
        base = b.path(f"cwrite-{ctype}-base.qcow2")
        top = b.path(f"cwrite-{ctype}-top.qcow2")
        create_qcow2(base, 2 * MiB)
        qemu_io(base, "qcow2", f"write -P {pat(5, 0)} 0 2M")
        create_qcow2(top, 2 * MiB, f"compression_type={ctype}", backing=base)
        qemu_io(top, "qcow2",
                f"write -c -P {pat(5, 1)} 0 64k",
                f"write -c -P {pat(5, 2)} 192k 128k",
                f"write -P {pat(5, 3)} 512k 64k",
                f"write -c -P {pat(5, 4)} 1M 64k",
                f"write -P {pat(5, 5)} 1M 4k")  # overwrite compressed: COW
        b.add(f"compressed-write-{ctype}", top, [top, base],
              note=f"qemu-io write -c ({ctype}) over a backing file")


def case_extended_l2(b: Builder) -> None:
    """extended_l2=on over a backing file: subcluster-granular allocation,
    partial subcluster writes (COW from backing inside a subcluster),
    zeroed subclusters."""
    for cs in (64 * KiB, 32 * KiB):
        sc = cs // 32
        tag = f"{cs // KiB}k"
        base = b.path(f"extl2-{tag}-base.qcow2")
        top = b.path(f"extl2-{tag}-top.qcow2")
        create_qcow2(base, 2 * MiB, f"cluster_size={cs}")
        qemu_io(base, "qcow2", f"write -P {pat(6, 0)} 0 2M")
        create_qcow2(top, 2 * MiB, f"extended_l2=on,cluster_size={cs}",
                     backing=base)
        qemu_io(top, "qcow2",
                f"write -P {pat(6, 1)} {3 * sc} {sc}",          # 1 subcluster
                f"write -P {pat(6, 2)} {cs + 100 * 512} 1k",    # partial sc
                f"write -P {pat(6, 3)} {2 * cs + 5 * sc} {3 * sc}",
                f"write -z {2 * cs + 20 * sc} {2 * sc}",        # zero sc
                f"write -z -u {4 * cs} {sc}",
                f"write -P {pat(6, 4)} {6 * cs} {cs}",          # full cluster
                f"write -P {pat(6, 5)} {8 * cs - sc // 2} {sc}",  # straddles
                f"discard {6 * cs} {cs}")
        b.add(f"extended-l2-{tag}", top, [top, base],
              note=f"extended_l2=on cluster_size={cs} over qcow2 backing")


def case_raw_backing(b: Builder) -> None:
    base = b.path("rawback-base.raw")
    top = b.path("rawback-top.qcow2")
    write_raw(base, 4 * MiB, [(0, fill_bytes(7, 512 * KiB, "random")),
                              (2 * MiB, fill_bytes(8, 256 * KiB, "text"))])
    create_qcow2(top, 4 * MiB, backing=base, backing_fmt="raw",
                 relative=True)
    qemu_io(top, "qcow2",
            f"write -P {pat(7, 1)} 64k 64k",
            f"write -P {pat(7, 2)} 2M 1k",
            f"write -z 256k 64k",
            f"write -P {pat(7, 3)} 3M 64k")
    b.add("raw-backing", top, [top, base], note="qcow2 over sparse raw")

    # A v2 top over raw, the oldest combination in the wild.
    # In a subdirectory, naming its backing file "../rawback-base.raw".
    os.makedirs(b.path("sub"), exist_ok=True)
    top2 = b.path("sub/rawback-v2-top.qcow2")
    create_qcow2(top2, 4 * MiB, "compat=0.10", backing=base,
                 backing_fmt="raw", relative=True)
    qemu_io(top2, "qcow2", f"write -P {pat(7, 4)} 100k 200k",
            "write -z 2M 64k")
    b.add("raw-backing-v2", top2, [top2, base], note="v2 qcow2 over raw")


def case_chain_depth4(b: Builder) -> None:
    """base <- mid1 <- mid2 <- top, distinct patterns per layer, overlapping
    writes, a zeroed range and a discard in the middle of the chain."""
    names = [b.path(f"chain4-{n}.qcow2") for n in ("base", "mid1", "mid2",
                                                    "top")]
    create_qcow2(names[0], 4 * MiB)
    qemu_io(names[0], "qcow2", f"write -P {pat(0, 0)} 0 4M")
    for layer in (1, 2, 3):
        create_qcow2(names[layer], 4 * MiB, backing=names[layer - 1],
                     relative=True)
    qemu_io(names[1], "qcow2",
            f"write -P {pat(1, 10)} 0 1M",
            f"write -z 2M 256k",
            f"write -P {pat(1, 11)} 3M 128k")
    qemu_io(names[2], "qcow2",
            f"write -P {pat(2, 10)} 512k 1M",
            f"discard 3M 64k",
            f"write -P {pat(2, 11)} 2M 64k")
    qemu_io(names[3], "qcow2",
            f"write -P {pat(3, 10)} 768k 4k",
            f"write -P {pat(3, 11)} 1M 64k",
            f"write -z 1536k 64k",
            f"write -P {pat(3, 12)} {4 * MiB - 64 * KiB} 64k")
    b.add("chain-depth-4", names[3], names[::-1],
          note="qcow2 chain of depth 4")

    # The same idea with a raw base and v2/v3 mixed above it.
    rb = b.path("chain4r-base.raw")
    write_raw(rb, 4 * MiB, [(0, fill_bytes(11, 4 * MiB, "random"))])
    m1 = b.path("chain4r-mid1.qcow2")
    m2 = b.path("chain4r-mid2.qcow2")
    t = b.path("chain4r-top.qcow2")
    create_qcow2(m1, 4 * MiB, "compat=0.10", backing=rb, backing_fmt="raw")
    create_qcow2(m2, 4 * MiB, "cluster_size=4096", backing=m1)
    create_qcow2(t, 4 * MiB, "cluster_size=2M", backing=m2)
    qemu_io(m1, "qcow2", f"write -P {pat(4, 20)} 1M 1M")
    qemu_io(m2, "qcow2", f"write -P {pat(5, 20)} 1536k 8k", "write -z 0 4k")
    qemu_io(t, "qcow2", f"write -P {pat(6, 20)} 3M 512")
    b.add("chain-depth-4-mixed", t, [t, m2, m1, rb],
          note="raw <- v2 <- 4k <- 2M clusters")


def case_short_backing(b: Builder) -> None:
    """A backing file shorter than the top: past its end the chain reads as
    zeros (and map reports what qemu reports)."""
    base = b.path("short-base.qcow2")
    top = b.path("short-top.qcow2")
    create_qcow2(base, 1 * MiB + 192 * KiB)   # not a multiple of 64k*16
    qemu_io(base, "qcow2", f"write -P {pat(7, 10)} 0 1216k")
    create_qcow2(top, 4 * MiB, backing=base)
    qemu_io(top, "qcow2", f"write -P {pat(7, 11)} 1M 64k",
            f"write -P {pat(7, 12)} 3M 64k")
    b.add("short-backing", top, [top, base], note="backing 1.19 MiB, top 4")

    rbase = b.path("short-base.raw")
    rtop = b.path("short-rawtop.qcow2")
    # Not even a multiple of 512: qemu's view of the tail is the oracle.
    write_raw(rbase, 700 * KiB + 100, [(0, fill_bytes(12, 700 * KiB + 100,
                                                      "random"))])
    create_qcow2(rtop, 2 * MiB, backing=rbase, backing_fmt="raw")
    qemu_io(rtop, "qcow2", f"write -P {pat(7, 13)} 1M 4k")
    b.add("short-raw-backing", rtop, [rtop, rbase],
          note="raw backing of 700k+100 bytes under a 2 MiB top")


def case_snapshots(b: Builder) -> None:
    """Internal snapshots: shared clusters (COPIED clear) in the active L1."""
    p = b.path("snapshots.qcow2")
    create_qcow2(p, 4 * MiB)
    qemu_io(p, "qcow2", f"write -P {pat(0, 5)} 0 2M")
    qemu_img("snapshot", "-c", "snap1", p)
    qemu_io(p, "qcow2", f"write -P {pat(0, 6)} 64k 64k",
            f"write -P {pat(0, 7)} 1M 4k", "write -z 1536k 128k",
            "discard 512k 64k")
    qemu_img("snapshot", "-c", "snap2", p)
    qemu_io(p, "qcow2", f"write -P {pat(0, 8)} 3M 64k",
            f"write -P {pat(0, 9)} 0 512")
    b.add("internal-snapshots", p, [p], note="two internal snapshots")


def case_bitmaps(b: Builder) -> None:
    p = b.path("bitmaps.qcow2")
    create_qcow2(p, 4 * MiB)
    qemu_io(p, "qcow2", f"write -P {pat(1, 20)} 0 1M")
    qemu_img("bitmap", "--add", p, "b0")
    qemu_img("bitmap", "--add", "-g", "512k", p, "b1")
    qemu_img("bitmap", "--disable", p, "b1")
    qemu_io(p, "qcow2", f"write -P {pat(1, 21)} 2M 64k", "write -z 3M 64k")
    b.add("persistent-bitmaps", p, [p], note="two persistent bitmaps")


def case_prealloc(b: Builder) -> None:
    for mode in ("metadata", "falloc", "full"):
        p = b.path(f"prealloc-{mode}.qcow2")
        create_qcow2(p, 2 * MiB, f"preallocation={mode}")
        qemu_io(p, "qcow2", f"write -P {pat(2, 20)} 64k 64k",
                "write -z 1M 64k", "discard 1536k 64k")
        b.add(f"prealloc-{mode}", p, [p], note=f"preallocation={mode}")
    p = b.path("prealloc-metadata-v2.qcow2")
    create_qcow2(p, 2 * MiB, "preallocation=metadata,compat=0.10")
    qemu_io(p, "qcow2", f"write -P {pat(2, 21)} 128k 4k")
    b.add("prealloc-metadata-v2", p, [p], note="v2 preallocation=metadata")


def case_lazy_refcounts(b: Builder) -> None:
    p = b.path("lazy.qcow2")
    create_qcow2(p, 2 * MiB, "lazy_refcounts=on")
    qemu_io(p, "qcow2", f"write -P {pat(3, 20)} 0 128k", "write -z 1M 64k")
    b.add("lazy-refcounts", p, [p], note="lazy_refcounts=on, clean")

    # qemu-io's "abort" leaves the dirty bit set with stale refcounts: the
    # image must still be readable (read-only access needs no repair).
    p = b.path("lazy-dirty.qcow2")
    create_qcow2(p, 2 * MiB, "lazy_refcounts=on")
    qemu_io(p, "qcow2", f"write -P {pat(3, 21)} 0 64k",
            f"write -P {pat(3, 22)} 1M 128k", "abort", ok=(0, -6, 134))
    b.add("lazy-refcounts-dirty", p, [p], note="dirty bit set", dirty=True)


def case_data_file(b: Builder) -> None:
    help_text = run(["qemu-img", "create", "-f", "qcow2", "-o", "help",
                     "x"]).stdout
    if "data_file" not in help_text:
        return
    for raw_flag in ("off", "on"):
        p = b.path(f"datafile-{raw_flag}.qcow2")
        d = b.path(f"datafile-{raw_flag}.data")
        create_qcow2(p, 4 * MiB, f"data_file={d},data_file_raw={raw_flag}")
        qemu_io(p, "qcow2", f"write -P {pat(4, 30)} 0 128k",
                f"write -P {pat(4, 31)} 2M 4k", "write -z 3M 64k")
        b.add(f"external-data-file-raw-{raw_flag}", p, [p, d],
              note=f"data_file, data_file_raw={raw_flag}")


def _insert_unknown_extension(path: str) -> None:
    """Add a header extension of an unknown type before the end marker.
    Readers must skip it. The backing file name (which follows the
    extensions in cluster 0) is moved down and its offset updated."""
    with open(path, "r+b") as f:
        hdr = f.read(4096)
        version = struct.unpack_from(">I", hdr, 4)[0]
        assert version == 3
        bf_off, bf_size = struct.unpack_from(">QI", hdr, 8)
        hlen = struct.unpack_from(">I", hdr, 100)[0]
        off = hlen
        while True:
            etype, elen = struct.unpack_from(">II", hdr, off)
            if etype == 0:
                break
            off += 8 + (elen + 7) // 8 * 8
        payload = b"siphon!\0unknown-extension-data\0\0"  # 32 bytes
        ext = struct.pack(">II", 0x5150A000, len(payload)) + payload
        backing = hdr[bf_off:bf_off + bf_size] if bf_off else b""
        new = bytearray(hdr[:off]) + ext + struct.pack(">II", 0, 0)
        new_bf_off = len(new)
        new += backing
        if len(new) > 4096:
            raise CorpusError("no room for an extra header extension")
        if bf_off:
            struct.pack_into(">Q", new, 8, new_bf_off)
        new += bytes(len(hdr) - len(new)) if len(new) < len(hdr) else b""
        f.seek(0)
        f.write(bytes(new[:max(len(hdr), len(new))]))


def case_unknown_extension(b: Builder) -> None:
    base = b.path("unkext-base.qcow2")
    top = b.path("unkext-top.qcow2")
    create_qcow2(base, 2 * MiB)
    qemu_io(base, "qcow2", f"write -P {pat(5, 30)} 0 2M")
    create_qcow2(top, 2 * MiB, backing=base)
    qemu_io(top, "qcow2", f"write -P {pat(5, 31)} 64k 64k")
    _insert_unknown_extension(top)
    b.add("unknown-header-extension", top, [top, base],
          note="unknown header extension type 0x5150a000")


def case_large_sparse(b: Builder) -> None:
    """A large virtual size with little data: L1 with many empty entries."""
    base = b.path("sparse-base.qcow2")
    p = b.path("sparse-2g.qcow2")
    create_qcow2(base, 2 * GiB)
    qemu_io(base, "qcow2", f"write -P {pat(6, 30)} 1G 64k")
    create_qcow2(p, 2 * GiB, backing=base)
    qemu_io(p, "qcow2", f"write -P {pat(6, 31)} 0 64k",
            f"write -P {pat(6, 29)} {GiB + 32 * KiB} 64k",
            f"write -P {pat(6, 28)} {2 * GiB - 512} 512")
    b.add("sparse-2g", p, [p, base], note="2 GiB virtual, 4 writes")


def case_raw_top(b: Builder) -> None:
    p = b.path("plain.raw")
    write_raw(p, 3 * MiB, [(0, fill_bytes(20, 64 * KiB, "random")),
                           (1 * MiB, fill_bytes(21, 200 * KiB, "text")),
                           (3 * MiB - 4096, fill_bytes(22, 4096, "random"))])
    b.add("raw-alone", p, [p], fmt="raw", note="sparse raw image")

    q = b.path("odd-size.qcow2")
    create_qcow2(q, 5 * MiB + 1536)
    qemu_io(q, "qcow2", f"write -P {pat(7, 30)} 5M 1536",
            f"write -P {pat(7, 31)} 0 512")
    b.add("odd-virtual-size", q, [q], note="size = 5 MiB + 1536 bytes")


CASES = [
    case_cluster_sizes,
    case_compat,
    case_refcount_bits,
    case_compressed,
    case_extended_l2,
    case_raw_backing,
    case_chain_depth4,
    case_short_backing,
    case_snapshots,
    case_bitmaps,
    case_prealloc,
    case_lazy_refcounts,
    case_data_file,
    case_unknown_extension,
    case_large_sparse,
    case_raw_top,
]


def build(root: str, errors: list[str] | None = None) -> list[Entry]:
    """Build the corpus under root (an existing, empty directory).

    A case that qemu cannot build raises CorpusError, unless errors is a
    list: then the message is appended and the other cases still run."""
    b = Builder(root)
    for case in CASES:
        try:
            case(b)
        except CorpusError as e:
            if errors is None:
                raise
            errors.append(f"{case.__name__}: {e}")
    return b.entries


def main(argv: list[str]) -> int:
    if not have_qemu():
        print("qemu-img/qemu-io not found", file=sys.stderr)
        return 77
    with tempfile.TemporaryDirectory(prefix="siphon-corpus-") as tmp:
        root = argv[1] if len(argv) > 1 else tmp
        os.makedirs(root, exist_ok=True)
        errors: list[str] = []
        entries = build(root, errors)
        bad = len(errors)
        for e in errors:
            print(f"BUILD-ERROR {e}")
        total = 0
        for e in entries:
            total += sum(os.stat(f).st_blocks * 512 for f in e.files)
            if e.fmt == "qcow2":
                c = subprocess.run(["qemu-img", "check", "-f", e.fmt, e.top],
                                   capture_output=True, text=True,
                                   timeout=TIMEOUT)
                if c.returncode != 0 and not e.dirty:
                    print(f"CHECK-FAIL {e.name}: exit {c.returncode}\n"
                          f"{c.stdout}{c.stderr}")
                    bad += 1
                    continue
            i = subprocess.run(["qemu-img", "info", "--backing-chain",
                                "-f", e.fmt, e.top],
                               capture_output=True, text=True,
                               timeout=TIMEOUT)
            if i.returncode != 0:
                print(f"INFO-FAIL {e.name}: {i.stderr}")
                bad += 1
                continue
            print(f"ok {e.name:32} {len(e.files)} file(s)  {e.note}")
        print(f"{len(entries)} entries, {total / MiB:.1f} MiB on disk, "
              f"{bad} problem(s)")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
