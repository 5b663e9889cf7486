#!/usr/bin/env python3
"""siphon's write path against qemu's: the same seeded workload applied by
`siphon io` and by `qemu-io` to two copies of the same image must leave
images that `qemu-img compare` finds equal, and siphon's copy must pass
`qemu-img check` (exit 0).

Image variants: every entry of the integration corpus (corpus.py: cluster
sizes, v2/v3, refcount widths, compressed clusters, extended L2, raw and
qcow2 backing files, chains, preallocation, bitmaps, ...) plus freshly
created images (allocation from empty, for every refcount width, over
backing files, a cluster_size=512 refcount_bits=64 image that must grow its
refcount table). Images siphon refuses to write (external data files)
must be refused with a message that says why; images with internal
snapshots are written like any other (test_snapshots.py checks that the
snapshots survive); a dirty
image (qemu's lazy refcounts after a crash) is repaired on open, as qemu
does, and then written like any other.

Also `siphon create` (qemu-img check/info on the result, overlay size and
probed backing format), `siphon rebase -u` (unknown header extensions kept,
qemu-img info shows the new backing file) and `siphon io read -P`.

Workloads: allocating full-cluster writes, overwrites, partial-cluster
writes (copy-on-write over a backing file, writes into compressed clusters),
write-zeroes (aligned and not), cluster-aligned discards (not on v2 images
with a backing file, where qemu lets the backing data show through).

Closing line: "N passed, N failed[, N skipped]"; exit 1 on failure, 77 when
qemu-img/qemu-io are missing.

Usage: test_write.py [-v] [-k SUBSTRING]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
import tempfile
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402
import harness  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

VERBOSE = "-v" in sys.argv
ONLY = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else None

# Corpus entries siphon may refuse to write, and a word its message must
# contain when it does.
MAY_REFUSE = {
    "external-data-file-raw-off": ("data file", "data_file"),
    "external-data-file-raw-on": ("data file", "data_file"),
}

UNKNOWN_EXT_MAGIC = 0x5150A000


def info(path: str, fmt: str | None = None) -> dict:
    argv = ["qemu-img", "info", "-U", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    p = corpus.run(argv + [path])
    return json.loads(p.stdout)


def check(path: str) -> harness.Result:
    return harness.run(["qemu-img", "check", "-f", "qcow2", path])


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def workload(rnd: random.Random, size: int, cs: int, backing: bool,
             v2: bool, n: int = 28) -> list[str]:
    """n qemu-io commands; every offset and length 512-aligned."""
    cmds: list[str] = []
    written: list[tuple[int, int]] = []
    nclusters = max(1, size // cs)
    big = min(4 * MiB, max(cs, size // 8))

    def clip(off: int, length: int) -> tuple[int, int]:
        return off, min(length, size - off) // 512 * 512

    for i in range(n):
        pattern = f"0x{(i * 37 + 0x11) % 255 + 1:02x}"
        kind = rnd.choices(["alloc", "over", "partial", "zero", "discard"],
                           weights=[4, 2, 5, 2, 1])[0]
        if kind == "over" and not written:
            kind = "alloc"
        if kind == "discard" and v2 and backing:
            kind = "zero"
        if kind == "alloc":
            k = rnd.randint(1, max(1, big // cs))
            off, length = clip(rnd.randrange(nclusters) * cs, k * cs)
            cmd = f"write -P {pattern} {off} {length}"
        elif kind == "over":
            woff, wlen = rnd.choice(written)
            shift = rnd.randrange(0, max(1, wlen // 512)) * 512
            off, length = clip(woff + shift,
                               rnd.randint(1, max(1, wlen // 512)) * 512)
            cmd = f"write -P {pattern} {off} {length}"
        elif kind == "partial":
            base = rnd.randrange(nclusters) * cs
            inner = rnd.randrange(0, max(1, cs // 512)) * 512
            length = rnd.randint(1, max(1, min(2 * cs, 256 * KiB) // 512)) \
                * 512
            off, length = clip(min(base + inner, (size - 512) // 512 * 512),
                               length)
            cmd = f"write -P {pattern} {off} {length}"
        elif kind == "zero":
            if rnd.random() < 0.5:
                off, length = clip(rnd.randrange(nclusters) * cs,
                                   rnd.randint(1, 3) * cs)
            else:
                off = rnd.randrange(0, size // 512) * 512
                off, length = clip(off, rnd.randint(1, 64) * 512)
            cmd = f"write -z {off} {length}"
        else:
            off = rnd.randrange(nclusters) * cs
            length = min(rnd.randint(1, 3) * cs, size - off)
            if length % cs and off + length != size:
                length -= length % cs
            if length <= 0:
                continue
            cmd = f"discard {off} {length}"
        if length <= 0:
            continue
        if kind in ("alloc", "over", "partial"):
            written.append((off, length))
        cmds.append(cmd)
        if rnd.random() < 0.1:
            cmds.append("flush")
    return cmds


def growth_workload(size: int) -> list[str]:
    """Sequential 64k writes over 6 MiB, then overwrites: at cluster_size
    512 with 64-bit refcounts one refcount table cluster covers 2 MiB."""
    cmds = []
    for i, off in enumerate(range(0, 6 * MiB, 64 * KiB)):
        cmds.append(f"write -P 0x{i % 250 + 3:02x} {off} 64k")
    cmds += ["flush", "write -P 0xee 1M 3584", "write -z 2M 64k",
             "discard 3M 128k", f"write -P 0x5a {size - 4096} 4k"]
    return cmds


def copy_top(top: str, tag: str) -> str:
    """A copy of the top file next to it (so relative backing names still
    resolve); the backing files are shared, read-only."""
    d, b = os.path.split(top)
    dst = os.path.join(d, f"{tag}-{b}")
    shutil.copyfile(top, dst)
    return dst


def apply_and_compare(siphon: str, name: str, top: str, fmt: str,
                      cmds: list[str], may_refuse=(), post=None) \
        -> tuple[list[str], str | None]:
    """Run cmds through siphon and qemu-io on copies of top; return
    (problems, info). post(siphon_copy) may add problems or info. With
    SIPHON_KEEP=DIR, the copies of a failing case are kept in DIR."""
    a = copy_top(top, "siphon")
    b = copy_top(top, "qemu")
    # qemu repairs a dirty image when it opens it and says so on stderr,
    # which qemu_io counts as a failure: repair the oracle's copy first.
    harness.run(["qemu-img", "check", "-q", "-r", "all", "-f", fmt, b])
    try:
        problems, note = _apply(siphon, a, b, fmt, cmds, may_refuse, post)
        if problems and os.environ.get("SIPHON_KEEP"):
            keep = os.path.join(os.environ["SIPHON_KEEP"],
                                name.replace("/", "_"))
            os.makedirs(keep, exist_ok=True)
            for p in (a, b):
                shutil.copy(p, keep)
            problems.append(f"kept in {keep}")
        return problems, note
    finally:
        for p in (a, b):
            if os.path.exists(p):
                os.unlink(p)


def _apply(siphon, a, b, fmt, cmds, may_refuse, post):
    problems: list[str] = []
    r = harness.run([siphon, "io", "-q", "-f", fmt, a, *cmds], timeout=120)
    why = r.crashed()
    if why:
        return [f"siphon io crashed ({why})", r.describe()], None
    if r.rc != 0:
        low = r.err.lower()
        if may_refuse:
            if any(w in low for w in may_refuse) and \
                    low.startswith("siphon:"):
                return [], "refused: " + r.err.strip()
            return [f"refused without saying why (want one of "
                    f"{may_refuse})", r.describe()], None
        return ["siphon io failed", r.describe(),
                "workload: " + " ; ".join(cmds)], None
    try:
        corpus.qemu_io(b, fmt, *cmds)
    except corpus.CorpusError as e:
        return [f"qemu-io failed on the same workload: {e}"], None
    c = harness.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, a, b])
    if c.rc != 0:
        problems.append(f"qemu-img compare siphon qemu: exit {c.rc}: "
                        f"{c.out.decode(errors='replace').strip()} "
                        f"{c.err.strip()}")
        problems.append(first_difference(a, b, fmt))
    if fmt == "qcow2":
        # Persistent bitmaps are kept (not invalidated): clean too.
        k = check(a)
        if k.rc != 0:
            problems.append(f"qemu-img check on siphon's image: exit "
                            f"{k.rc}\n"
                            f"{k.out.decode(errors='replace').strip()}"
                            f"\n{k.err.strip()}")
    note = f"{len(cmds)} commands"
    if post and not problems:
        more, extra = post(a)
        problems += more
        if extra:
            note += "; " + extra
    if problems:
        problems.append("workload: " + " ; ".join(cmds))
    return problems, note


def first_difference(a: str, b: str, fmt: str) -> str:
    """Where two images first differ (converted to raw)."""
    d = os.path.dirname(a)
    ra, rb = os.path.join(d, "diff-a.raw"), os.path.join(d, "diff-b.raw")
    try:
        corpus.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", a,
                    ra])
        corpus.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", b,
                    rb])
        with open(ra, "rb") as fa, open(rb, "rb") as fb:
            da, db = fa.read(), fb.read()
        for off in range(0, min(len(da), len(db)), 512):
            if da[off:off + 512] != db[off:off + 512]:
                return (f"first differing sector at offset {off}: siphon "
                        f"{da[off:off + 8].hex()} qemu {db[off:off + 8].hex()}")
        return f"sizes {len(da)} vs {len(db)}"
    except (corpus.CorpusError, OSError) as e:
        return f"(could not locate the difference: {e})"
    finally:
        for p in (ra, rb):
            if os.path.exists(p):
                os.unlink(p)


def image_geometry(top: str, fmt: str) -> tuple[int, int, bool, bool]:
    """(virtual size, cluster size, has backing, v2)."""
    i = info(top, fmt)
    cs = i.get("cluster-size", 64 * KiB) if fmt == "qcow2" else 64 * KiB
    v2 = i.get("format-specific", {}).get("data", {}).get("compat") == "0.10"
    return i["virtual-size"], cs, "backing-filename" in i, v2


def run_corpus(siphon: str, tmp: str, rep: harness.Report) -> None:
    root = os.path.join(tmp, "corpus")
    os.mkdir(root)
    errors: list[str] = []
    entries = corpus.build(root, errors)
    for e in errors:
        rep.emit("corpus-build", [e])
    for e in entries:
        name = f"corpus/{e.name}"
        if ONLY and ONLY not in name:
            continue
        size, cs, backing, v2 = image_geometry(e.top, e.fmt)
        rnd = random.Random(seed_of(e.name))
        cmds = workload(rnd, size, cs, backing, v2)
        problems, note = apply_and_compare(siphon, name, e.top, e.fmt, cmds,
                                           MAY_REFUSE.get(e.name, ()))
        rep.emit(name, problems, info=note)


# (name, create options, size, backing kind: None | "qcow2" | "raw" |
#  "qcow2-v2")
FRESH = [
    ("fresh-512", "cluster_size=512", 2 * MiB, None),
    ("fresh-4k", "cluster_size=4k", 4 * MiB, None),
    ("fresh-64k", "cluster_size=64k", 8 * MiB, None),
    ("fresh-2M", "cluster_size=2M", 16 * MiB, None),
    ("fresh-v2", "compat=0.10", 4 * MiB, None),
    ("fresh-v2-512", "compat=0.10,cluster_size=512", 2 * MiB, None),
    ("fresh-extl2", "extended_l2=on", 4 * MiB, None),
    ("fresh-lazy", "lazy_refcounts=on", 4 * MiB, None),
    ("fresh-rc1", "refcount_bits=1,cluster_size=512", 2 * MiB, None),
    ("fresh-rc2", "refcount_bits=2,cluster_size=4k", 4 * MiB, None),
    ("fresh-rc4", "refcount_bits=4,cluster_size=512", 2 * MiB, None),
    ("fresh-rc8", "refcount_bits=8,cluster_size=4k", 4 * MiB, None),
    ("fresh-rc16", "refcount_bits=16,cluster_size=512", 2 * MiB, None),
    ("fresh-rc32", "refcount_bits=32,cluster_size=4k", 4 * MiB, None),
    ("fresh-rc64", "refcount_bits=64,cluster_size=512", 2 * MiB, None),
    ("over-qcow2-64k", "cluster_size=64k", 4 * MiB, "qcow2"),
    ("over-qcow2-4k", "cluster_size=4k", 4 * MiB, "qcow2"),
    ("over-qcow2-2M", "cluster_size=2M", 8 * MiB, "qcow2"),
    ("over-raw-64k", "cluster_size=64k", 4 * MiB, "raw"),
    ("over-raw-512", "cluster_size=512", 2 * MiB, "raw"),
    ("over-qcow2-v2", "compat=0.10", 4 * MiB, "qcow2-v2"),
    ("over-qcow2-extl2-64k", "extended_l2=on", 4 * MiB, "qcow2"),
    ("over-qcow2-extl2-32k", "extended_l2=on,cluster_size=32k", 4 * MiB,
     "raw"),
    ("over-qcow2-lazy", "lazy_refcounts=on", 4 * MiB, "qcow2"),
]


def make_backing(d: str, kind: str, size: int, seed: int) -> str:
    if kind == "raw":
        p = os.path.join(d, "base.raw")
        corpus.write_raw(p, size, [(0, corpus.fill_bytes(seed, size,
                                                         "random"))])
        return p
    p = os.path.join(d, "base.qcow2")
    corpus.create_qcow2(p, size, "compat=0.10" if kind == "qcow2-v2" else "")
    corpus.qemu_io(p, "qcow2", f"write -P 0x71 0 {size}",
                   f"write -P 0x72 {size // 4} {size // 8}",
                   f"write -z {size // 2} 64k")
    return p


def run_fresh(siphon: str, tmp: str, rep: harness.Report) -> None:
    for name, opts, size, bkind in FRESH:
        if ONLY and ONLY not in name:
            continue
        d = os.path.join(tmp, name)
        os.mkdir(d)
        try:
            top = os.path.join(d, "top.qcow2")
            if bkind:
                base = make_backing(d, bkind, size, seed_of(name))
                corpus.create_qcow2(top, size, opts, backing=base,
                                    backing_fmt="raw" if bkind == "raw"
                                    else "qcow2", relative=True)
            else:
                corpus.create_qcow2(top, size, opts)
            _, cs, backing, v2 = image_geometry(top, "qcow2")
            cmds = workload(random.Random(seed_of(name)), size, cs, backing,
                            v2, n=36)
            problems, note = apply_and_compare(siphon, name, top, "qcow2",
                                               cmds)
        except corpus.CorpusError as e:
            problems, note = [f"setup: {e}"], None
        rep.emit(name, problems, info=note)
        shutil.rmtree(d, ignore_errors=True)

    name = "refcount-table-growth-512-rc64"
    if ONLY and ONLY not in name:
        return
    d = os.path.join(tmp, name)
    os.mkdir(d)
    top = os.path.join(d, "top.qcow2")
    size = 8 * MiB
    corpus.create_qcow2(top, size, "cluster_size=512,refcount_bits=64")
    def grown(path):
        # The table must really have grown past its first cluster.
        rt = refcount_table_clusters(path)
        if rt < 2:
            return [f"refcount table still {rt} cluster(s): the workload "
                    f"did not force growth"], None
        return [], f"siphon's refcount table: {rt} clusters"
    problems, note = apply_and_compare(siphon, name, top, "qcow2",
                                       growth_workload(size), post=grown)
    rep.emit(name, problems, info=note)
    shutil.rmtree(d, ignore_errors=True)


def refcount_table_clusters(path: str) -> int:
    with open(path, "rb") as f:
        hdr = f.read(64)
    return struct.unpack_from(">I", hdr, 56)[0]


# ---------------------------------------------------------------------------
# siphon create


CREATE_CASES = [
    ("", {}),
    ("cluster_size=512", {"cluster-size": 512}),
    ("cluster_size=4k", {"cluster-size": 4096}),
    ("cluster_size=2M", {"cluster-size": 2 * MiB}),
    ("compat=0.10", {"compat": "0.10"}),
    ("compat=1.1", {"compat": "1.1"}),
    ("refcount_bits=1", {"refcount-bits": 1}),
    ("refcount_bits=8,cluster_size=4k", {"refcount-bits": 8,
                                         "cluster-size": 4096}),
    ("refcount_bits=64", {"refcount-bits": 64}),
    ("extended_l2=on", {"extended-l2": True}),
    ("extended_l2=on,cluster_size=16k", {"extended-l2": True,
                                         "cluster-size": 16384}),
    ("lazy_refcounts=on", {"lazy-refcounts": True}),
    ("compat=0.10,cluster_size=512,refcount_bits=16",
     {"compat": "0.10", "cluster-size": 512}),
]


def info_field(i: dict, key: str):
    if key in i:
        return i[key]
    return i.get("format-specific", {}).get("data", {}).get(key)


def run_create(siphon: str, tmp: str, rep: harness.Report) -> None:
    d = os.path.join(tmp, "create")
    os.mkdir(d)
    for n, (opts, want) in enumerate(CREATE_CASES):
        name = f"create/{opts or 'default'}"
        if ONLY and ONLY not in name:
            continue
        p = os.path.join(d, f"c{n}.qcow2")
        argv = [siphon, "create"] + (["-o", opts] if opts else []) + \
            [p, "1536M"]
        problems = []
        r = harness.run(argv)
        if r.rc != 0:
            problems.append(r.describe())
        else:
            problems += check_created(p, 1536 * MiB, want)
        rep.emit(name, problems)
        if os.path.exists(p):
            os.unlink(p)

    # Suffixes and raw.
    for fmt, size_arg, size in (("raw", "10M", 10 * MiB),
                                ("qcow2", "3T", 3 << 40),
                                ("qcow2", "1536k", 1536 * KiB),
                                ("qcow2", "100000", 100352),
                                ("raw", "100000", 100352),
                                ("raw", "7G", 7 << 30)):
        name = f"create/{fmt}-{size_arg}"
        if ONLY and ONLY not in name:
            continue
        p = os.path.join(d, f"s.{fmt}")
        r = harness.run([siphon, "create", "-q", "-f", fmt, p, size_arg])
        problems = [] if r.rc == 0 else [r.describe()]
        if not problems:
            i = info(p, fmt)
            # qemu rounds a qcow2 size up to 512 bytes.
            if i["virtual-size"] != size:
                problems.append(f"virtual-size {i['virtual-size']}, "
                                f"want {size}")
            if fmt == "qcow2" and check(p).rc != 0:
                problems.append(check(p).describe())
        rep.emit(name, problems)
        if os.path.exists(p):
            os.unlink(p)

    run_create_overlay(siphon, d, rep)
    run_create_errors(siphon, d, rep)
    shutil.rmtree(d, ignore_errors=True)


def check_created(p: str, size: int, want: dict) -> list[str]:
    problems = []
    k = check(p)
    if k.rc != 0:
        problems.append("qemu-img check: " + k.describe())
    try:
        i = info(p, "qcow2")
    except corpus.CorpusError as e:
        return problems + [f"qemu-img info: {e}"]
    if i.get("format") != "qcow2" or i.get("virtual-size") != size:
        problems.append(f"info: format {i.get('format')} virtual-size "
                        f"{i.get('virtual-size')}, want qcow2 {size}")
    for key, val in want.items():
        got = info_field(i, key)
        if got != val:
            problems.append(f"info {key}: {got!r}, want {val!r}")
    # qemu can use it.
    try:
        corpus.qemu_io(p, "qcow2", "write -P 0x3c 1M 128k",
                       "read -P 0x3c 1M 128k")
    except corpus.CorpusError as e:
        problems.append(f"qemu-io on the created image: {e}")
    k = check(p)
    if k.rc != 0:
        problems.append("qemu-img check after qemu-io: " + k.describe())
    return problems


def run_create_overlay(siphon: str, d: str, rep: harness.Report) -> None:
    base = os.path.join(d, "base.qcow2")
    corpus.create_qcow2(base, 5 * MiB + 512 * KiB)
    corpus.qemu_io(base, "qcow2", "write -P 0x44 0 1M")
    rbase = os.path.join(d, "rbase.raw")
    corpus.write_raw(rbase, 3 * MiB, [(0, b"\x55" * 65536)])
    sub = os.path.join(d, "sub")
    os.mkdir(sub)

    cases = [
        # name, argv tail, cwd, image, want size, want backing, fmt,
        # probed
        ("create/overlay-default-size-probed",
         ["-b", "base.qcow2", os.path.join(d, "ov1.qcow2")], None,
         os.path.join(d, "ov1.qcow2"), 5 * MiB + 512 * KiB, "base.qcow2",
         "qcow2", True),
        ("create/overlay-raw-F",
         ["-b", "rbase.raw", "-F", "raw", os.path.join(d, "ov2.qcow2")],
         None, os.path.join(d, "ov2.qcow2"), 3 * MiB, "rbase.raw", "raw",
         False),
        ("create/overlay-relative-from-other-cwd",
         ["-b", "../base.qcow2", "sub/ov3.qcow2"], d,
         os.path.join(sub, "ov3.qcow2"), 5 * MiB + 512 * KiB,
         "../base.qcow2", "qcow2", True),
        ("create/overlay-explicit-size",
         ["-b", os.path.join(d, "base.qcow2"), "-F", "qcow2",
          os.path.join(d, "ov4.qcow2"), "64M"], None,
         os.path.join(d, "ov4.qcow2"), 64 * MiB,
         os.path.join(d, "base.qcow2"), "qcow2", False),
    ]
    for name, tail, cwd, img, size, bname, bfmt, probed in cases:
        if ONLY and ONLY not in name:
            continue
        problems = []
        r = harness.run([siphon, "create", *tail], cwd=cwd or "/")
        out = r.out.decode(errors="replace")
        if r.rc != 0:
            rep.emit(name, [r.describe()])
            continue
        if probed and "probed" not in out:
            problems.append(f"output does not say the format was probed: "
                            f"{out!r}")
        if not probed and "probed" in out:
            problems.append(f"output says probed although -F was given: "
                            f"{out!r}")
        k = check(img)
        if k.rc != 0:
            problems.append(k.describe())
        i = info(img, "qcow2")
        if i["virtual-size"] != size:
            problems.append(f"virtual-size {i['virtual-size']}, want {size}")
        if i.get("backing-filename") != bname:
            problems.append(f"backing-filename {i.get('backing-filename')!r}"
                            f", want {bname!r}")
        if i.get("backing-filename-format") != bfmt:
            problems.append(f"backing format "
                            f"{i.get('backing-filename-format')!r}, want "
                            f"{bfmt!r}")
        # The overlay reads its backing file's data.
        try:
            corpus.qemu_io(img, "qcow2", "read -P 0x44 0 1M"
                           if bfmt == "qcow2" else "read -P 0x55 0 64k")
        except corpus.CorpusError as e:
            problems.append(f"reading the overlay: {e}")
        rep.emit(name, problems, info=out.strip().splitlines()[0]
                 if out.strip() else None)


def run_create_errors(siphon: str, d: str, rep: harness.Report) -> None:
    cases = [
        ("create/error-missing-backing",
         ["-b", "nope.qcow2", os.path.join(d, "e1.qcow2")], 1, "nope"),
        ("create/error-no-size", [os.path.join(d, "e2.qcow2")], 2, "size"),
        ("create/error-bad-option",
         ["-o", "cluster_size=64k,bogus=1", os.path.join(d, "e3.qcow2"),
          "1M"], 2, "bogus"),
        ("create/error-bad-cluster-size",
         ["-o", "cluster_size=3000", os.path.join(d, "e4.qcow2"), "1M"], 1,
         "cluster"),
        ("create/error-bad-size", [os.path.join(d, "e5.qcow2"), "12Q"], 2,
         "size"),
        ("create/error-own-backing",
         ["-b", "e6.qcow2", "-F", "qcow2", os.path.join(d, "e6.qcow2")], 1,
         ""),
    ]
    corpus.create_qcow2(os.path.join(d, "e6.qcow2"), MiB)
    for name, tail, rc, word in cases:
        if ONLY and ONLY not in name:
            continue
        r = harness.run([siphon, "create", *tail])
        problems = []
        if r.rc != rc or r.crashed():
            problems.append(f"want exit {rc}: " + r.describe())
        elif word and word not in r.err.lower():
            problems.append(f"message lacks {word!r}: {r.err!r}")
        elif not r.err.startswith("siphon"):
            problems.append(f"message does not start with 'siphon': "
                            f"{r.err!r}")
        rep.emit(name, problems)


# ---------------------------------------------------------------------------
# siphon rebase -u


def header_extensions(path: str) -> list[tuple[int, bytes]]:
    with open(path, "rb") as f:
        hdr = f.read(2 * MiB)
    version = struct.unpack_from(">I", hdr, 4)[0]
    cs = 1 << struct.unpack_from(">I", hdr, 20)[0]
    off = struct.unpack_from(">I", hdr, 100)[0] if version >= 3 else 72
    exts = []
    while off + 8 <= cs:
        magic, length = struct.unpack_from(">II", hdr, off)
        if magic == 0:
            break
        exts.append((magic, hdr[off + 8:off + 8 + length]))
        off += 8 + (length + 7) // 8 * 8
    return exts


def run_rebase(siphon: str, tmp: str, rep: harness.Report) -> None:
    d = os.path.join(tmp, "rebase")
    os.mkdir(d)
    b1 = os.path.join(d, "base1.qcow2")
    b2 = os.path.join(d, "base2.qcow2")
    rb = os.path.join(d, "base3.raw")
    corpus.create_qcow2(b1, 2 * MiB)
    corpus.qemu_io(b1, "qcow2", "write -P 0x31 0 2M")
    corpus.create_qcow2(b2, 2 * MiB)
    corpus.qemu_io(b2, "qcow2", "write -P 0x32 0 2M")
    corpus.write_raw(rb, 2 * MiB, [(0, b"\x33" * (2 * MiB))])

    def fresh_top(name: str, opts: str = "") -> str:
        t = os.path.join(d, name)
        corpus.create_qcow2(t, 2 * MiB, opts, backing=b1, relative=True)
        corpus.qemu_io(t, "qcow2", "write -P 0x34 64k 64k")
        return t

    def expect(name, argv, rc, top, bname, bfmt, word=None, extra=None):
        if ONLY and ONLY not in name:
            return
        r = harness.run(argv)
        problems = []
        if r.rc != rc or r.crashed():
            problems.append(f"want exit {rc}: " + r.describe())
        elif word and word not in (r.err + r.out.decode()).lower():
            problems.append(f"output lacks {word!r}: {r.describe()}")
        if not problems and rc == 0:
            k = check(top)
            if k.rc != 0:
                problems.append(k.describe())
            i = info(top, "qcow2")
            if i.get("backing-filename") != bname:
                problems.append(f"backing-filename "
                                f"{i.get('backing-filename')!r}, want "
                                f"{bname!r}")
            if bname and i.get("backing-filename-format") != bfmt:
                problems.append(f"backing format "
                                f"{i.get('backing-filename-format')!r}, "
                                f"want {bfmt!r}")
            # Data the top holds stays; the rest comes from the new base.
            try:
                corpus.qemu_io(top, "qcow2", "read -P 0x34 64k 64k")
                fill = {"base2.qcow2": "0x32", "base3.raw": "0x33",
                        None: "0"}[bname]
                corpus.qemu_io(top, "qcow2", f"read -P {fill} 0 64k",
                               f"read -P {fill} 1M 1M")
            except corpus.CorpusError as e:
                problems.append(f"content after rebase: {e}")
        if extra and not problems:
            problems += extra()
        rep.emit(name, problems)

    t = fresh_top("t1.qcow2")
    expect("rebase/to-qcow2-with-F", [siphon, "rebase", "-u", "-b",
                                      "base2.qcow2", "-F", "qcow2", t],
           0, t, "base2.qcow2", "qcow2")
    t = fresh_top("t2.qcow2")
    expect("rebase/to-raw-probed", [siphon, "rebase", "-u", "-b",
                                    "base3.raw", t],
           0, t, "base3.raw", "raw", word="probed")
    t = fresh_top("t3.qcow2")
    expect("rebase/remove-backing", [siphon, "rebase", "-u", "-b", "", t],
           0, t, None, None)
    t = fresh_top("t4.qcow2", "compat=0.10")
    expect("rebase/v2-to-qcow2", [siphon, "rebase", "-u", "-b",
                                  "base2.qcow2", "-F", "qcow2", t],
           0, t, "base2.qcow2", "qcow2")
    t = fresh_top("t5.qcow2")
    expect("rebase/refuses-safe-mode", [siphon, "rebase", "-b",
                                        "base2.qcow2", t],
           2, t, None, None, word="stream --base")
    expect("rebase/needs-b", [siphon, "rebase", "-u", t], 2, t, None, None)

    # The old base is gone: rebase -u must not need it.
    t = fresh_top("t6.qcow2")
    gone = os.path.join(d, "gone.qcow2")
    corpus.create_qcow2(gone, 2 * MiB)
    corpus.qemu_img("rebase", "-u", "-f", "qcow2", "-b", "gone.qcow2",
                    "-F", "qcow2", t)
    os.unlink(gone)
    expect("rebase/old-backing-missing", [siphon, "rebase", "-u", "-b",
                                          "base2.qcow2", "-F", "qcow2", t],
           0, t, "base2.qcow2", "qcow2")

    # Unknown header extension: kept byte for byte.
    t = fresh_top("t7.qcow2")
    corpus._insert_unknown_extension(t)
    before = [e for e in header_extensions(t) if e[0] == UNKNOWN_EXT_MAGIC]

    def ext_kept():
        after = [e for e in header_extensions(t)
                 if e[0] == UNKNOWN_EXT_MAGIC]
        if not before:
            return ["test setup: the extension was not inserted"]
        if after != before:
            return [f"unknown extension changed: before {before!r}, "
                    f"after {after!r}"]
        return []
    expect("rebase/keeps-unknown-extension",
           [siphon, "rebase", "-u", "-b", "base2.qcow2", "-F", "qcow2", t],
           0, t, "base2.qcow2", "qcow2", extra=ext_kept)
    t2 = os.path.join(d, "t7.qcow2")
    expect("rebase/keeps-unknown-extension-remove",
           [siphon, "rebase", "-u", "-b", "", t2], 0, t2, None, None,
           extra=ext_kept)
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# siphon io itself


def run_io_cli(siphon: str, tmp: str, rep: harness.Report) -> None:
    d = os.path.join(tmp, "io")
    os.mkdir(d)
    for fmt in ("raw", "qcow2"):
        name = f"io/read-verify-{fmt}"
        if ONLY and ONLY not in name:
            continue
        p = os.path.join(d, f"img.{fmt}")
        if fmt == "raw":
            corpus.create_raw(p, 4 * MiB)
        else:
            corpus.create_qcow2(p, 4 * MiB)
        problems = []
        r = harness.run([siphon, "io", "-f", fmt, p, "write -P 0xab 0 64k",
                         "write 64k 4k", "read -P 0xab 0 64k",
                         "read -P 0xcd 64k 4k", "read -P 0 68k 4k"])
        if r.rc != 0:
            problems.append(r.describe())
        elif b"wrote 65536/65536 bytes at offset 0" not in r.out:
            problems.append(f"unexpected output {r.out!r}")
        r = harness.run([siphon, "io", "-f", fmt, p, "read -P 0xab 0 68k"])
        if r.rc != 1 or "65536" not in r.err:
            problems.append("a mismatch must exit 1 naming offset 65536: " +
                            r.describe())
        r = harness.run([siphon, "io", "-f", fmt, p, "write -P 0xab"])
        if r.rc != 2:
            problems.append("a bad command must exit 2: " + r.describe())
        r = harness.run([siphon, "io", "-f", fmt, p, "write 4M 512"])
        if r.rc != 1 or "end" not in r.err:
            problems.append("a write past the end must exit 1: " +
                            r.describe())
        r = harness.run(["qemu-io", "-f", fmt, "-c", "read -P 0xab 0 64k",
                         p])
        if r.rc != 0 or b"Pattern verification failed" in r.out:
            problems.append("qemu-io does not read siphon's data")
        rep.emit(name, problems)
    shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="siphon-write-") as tmp:
        siphon = harness.preflight(tmp)
        rep = harness.Report()
        run_io_cli(siphon, tmp, rep)
        run_create(siphon, tmp, rep)
        run_rebase(siphon, tmp, rep)
        run_fresh(siphon, tmp, rep)
        run_corpus(siphon, tmp, rep)
        return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
