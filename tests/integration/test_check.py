#!/usr/bin/env python3
"""`siphon check` against `qemu-img check`, the oracle.

1. corpus: every qcow2 file the corpus builds (corpus.py): the same exit code
   and the same leak and corruption counts as qemu-img check.
2. faults injected into a small image written by qemu-io (a refcount
   lowered, a refcount raised, an L2 entry pointing into the refcount table,
   two L2 entries sharing a cluster, an L2 table past the end of the file, a
   truncated file, an unaligned L2 entry, a refcount block named by two
   refcount table entries (found by fuzzing), an L2 entry pointing at a
   refcount block, leaks in a second window; from a differential run of
   bit flips against qemu: reserved bits in an empty refcount table entry,
   COPIED set on an entry past the end, a compressed entry with COPIED):
   the same
   exit code as qemu and the same classification (leaks vs corruptions, and
   the count where both count per cluster); then `siphon check -r leaks` /
   `-r all` on a copy: what qemu-img check says afterwards (exit 0 where the
   repair is possible, the image content unchanged as qemu-img compare
   reads it).
3. a window smaller than the file (--window): the same findings in several
   passes.
4. an image in use (qemu-io holds it open for writing): -r and a plain
   check are refused with a message, nothing written; -U checks it anyway,
   as qemu-img check -U does.
5. a crashed writer's image (leaks, dirty bit): a restarted `siphon stream`
   leaves it clean (qemu-img check exit 0), dirty bit cleared, content
   that of the chain.
6. random bit flips in the metadata of images qemu wrote (seeded): the
   same exit code and counts as qemu-img check, but for one documented
   difference (case_flips()).
7. -r all leaving corruption in a version 2 image (no corrupt bit): said
   in the JSON and the text, exit 2, the header untouched.
8. raw: exit 63, as qemu-img check.

Exit 0 all passed, 1 any failure, 77 skipped. Env: SIPHON, SIPHON_SRC.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile

import corpus
import harness
from harness import run

KiB = 1024
MiB = 1024 * KiB


def qemu_check(path: str, repair: str | None = None) -> tuple[int, dict]:
    argv = ["qemu-img", "check", "--output=json", "-f", "qcow2"]
    if repair:
        argv += ["-r", repair]
    p = subprocess.run(argv + [path], capture_output=True, text=True,
                       timeout=120)
    try:
        out = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {}
    return p.returncode, out


def siphon_check(siphon: str, path: str, *extra: str) -> tuple[int, dict, str]:
    r = run([siphon, "check", "--output=json", "-f", "qcow2", *extra, path],
            timeout=120)
    why = r.crashed()
    if why and r.rc != 3:
        return -1000, {}, f"{why}: {r.describe()}"
    try:
        out = json.loads(r.out) if r.out.strip() else {}
    except json.JSONDecodeError as e:
        return -1000, {}, f"bad JSON ({e}): {r.out[:300]!r}"
    return r.rc, out, r.err


def agree(siphon: str, path: str, counts: bool = True) -> list[str]:
    """siphon check and qemu-img check agree on path."""
    qrc, q = qemu_check(path)
    src, s, err = siphon_check(siphon, path)
    if src == -1000:
        return [err]
    probs = []
    if src != qrc:
        probs.append(f"exit {src}, qemu-img check exits {qrc}: "
                     f"siphon {summary(s)} qemu {summary(q)} {err.strip()}")
    elif counts:
        for key in ("leaks", "corruptions", "allocated-clusters",
                    "fragmented-clusters", "compressed-clusters",
                    "total-clusters"):
            if s.get(key, 0) != q.get(key, 0):
                probs.append(f"{key}: siphon {s.get(key, 0)}, qemu "
                             f"{q.get(key, 0)}: {findings(s)}")
        # qemu reports the end only where refcounts and references agree.
        if not q.get("corruptions") and not q.get("leaks") and \
                s.get("image-end-offset") != q.get("image-end-offset"):
            probs.append(f"image-end-offset: siphon "
                         f"{s.get('image-end-offset')}, qemu "
                         f"{q.get('image-end-offset')}")
    return probs


def summary(d: dict) -> str:
    return f"leaks={d.get('leaks', 0)} corruptions={d.get('corruptions', 0)}"


def findings(d: dict) -> str:
    return "; ".join(f"{f['kind']}: {f['message']}"
                     for f in d.get("findings", [])[:6])


# --- qcow2 structure, enough to place faults --------------------------------

class Q:
    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            h = f.read(104)
        self.cluster_bits = struct.unpack_from(">I", h, 20)[0]
        self.cs = 1 << self.cluster_bits
        self.l1_size = struct.unpack_from(">I", h, 36)[0]
        self.l1_off = struct.unpack_from(">Q", h, 40)[0]
        self.rt_off = struct.unpack_from(">Q", h, 48)[0]
        self.rt_clusters = struct.unpack_from(">I", h, 56)[0]
        self.order = struct.unpack_from(">I", h, 96)[0]
        assert self.order == 4, "faults assume 16-bit refcounts"

    def u64(self, off: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(off)
            return struct.unpack(">Q", f.read(8))[0]

    def put64(self, off: int, v: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(struct.pack(">Q", v))

    def l2_off(self, i: int) -> int:
        return self.u64(self.l1_off + 8 * i) & 0x00fffffffffffe00

    def l2e_addr(self, guest: int) -> int:
        per = self.cs // 8
        c = guest >> self.cluster_bits
        return self.l2_off(c // per) + 8 * (c % per)

    def data_off(self, guest: int) -> int:
        return self.u64(self.l2e_addr(guest)) & 0x00fffffffffffe00

    def rc_addr(self, host: int) -> int:
        per = self.cs // 2
        c = host >> self.cluster_bits
        blk = self.u64(self.rt_off + 8 * (c // per)) & ~0x1ff
        return blk + 2 * (c % per)

    def rc(self, host: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.rc_addr(host))
            return struct.unpack(">H", f.read(2))[0]

    def set_rc(self, host: int, v: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.rc_addr(host))
            f.write(struct.pack(">H", v))


def base_image(path: str, cluster_size: int = 4096) -> None:
    """8 MiB, 4 KiB clusters: data in four L2 tables' ranges."""
    corpus.create_qcow2(path, 8 * MiB, f"cluster_size={cluster_size}")
    corpus.qemu_io(path, "qcow2", "write -P 0x11 0 256k",
                   "write -P 0x22 2M 64k", "write -P 0x33 4M 8k",
                   "write -z 5M 64k", "write -P 0x44 6M 4k")


def leak_at_end(path: str, n: int) -> None:
    """n leaked clusters: the file grown and refcounted, nothing points."""
    q = Q(path)
    end = os.path.getsize(path)
    end = (end + q.cs - 1) // q.cs * q.cs
    with open(path, "r+b") as f:
        f.truncate(end + n * q.cs)
    for i in range(n):
        q.set_rc(end + i * q.cs, 1)


# Each fault: (name, patch function, repair that fixes it or None, whether
# leak/corruption counts must equal qemu's).
def f_rc_lowered(p: str) -> None:
    q = Q(p)
    off = q.data_off(2 * MiB)
    q.set_rc(off, 0)


def f_rc_raised(p: str) -> None:
    q = Q(p)
    for g in (0, 4 * KiB, 2 * MiB):
        q.set_rc(q.data_off(g), 2)


def f_l2_into_reftable(p: str) -> None:
    q = Q(p)
    a = q.l2e_addr(4 * MiB)
    q.put64(a, (q.u64(a) & ~0x00fffffffffffe00) | q.rt_off)


def f_shared_cluster(p: str) -> None:
    q = Q(p)
    a = q.l2e_addr(6 * MiB)
    b = q.l2e_addr(4 * MiB)
    q.put64(a, (q.u64(a) & ~0x00fffffffffffe00) | q.data_off(4 * MiB))
    _ = b


def f_l2_past_eof(p: str) -> None:
    q = Q(p)
    size = os.path.getsize(p)
    l1e = q.l1_off + 8 * 3  # guest 6 MiB's L2 table
    q.put64(l1e, (q.u64(l1e) & ~0x00fffffffffffe00) |
            ((size + 64 * q.cs) & ~(q.cs - 1)))


def f_truncated(p: str) -> None:
    q = Q(p)
    cut = q.data_off(2 * MiB) + 16 * KiB
    with open(p, "r+b") as f:
        f.truncate(cut)


def f_unaligned_l2e(p: str) -> None:
    q = Q(p)
    a = q.l2e_addr(4 * KiB)
    q.put64(a, q.u64(a) + 512)


def f_refblock_twice(p: str) -> None:
    """A second refcount table entry naming the first one's block."""
    q = Q(p)
    q.put64(q.rt_off + 8, q.u64(q.rt_off))


def f_l2_into_refblock(p: str) -> None:
    q = Q(p)
    a = q.l2e_addr(4 * MiB)
    q.put64(a, (q.u64(a) & ~0x00fffffffffffe00) |
            (q.u64(q.rt_off) & ~0x1ff))


def f_leaks(p: str) -> None:
    leak_at_end(p, 5)


def f_leak_inside(p: str) -> None:
    """A cluster dropped from an L2 table (its refcount stays 1)."""
    q = Q(p)
    q.put64(q.l2e_addr(6 * MiB), 0)


def f_refblock_missing(p: str) -> None:
    """The refcount table's second entry cleared while the clusters it
    covered (the file past 8 MiB, 4 KiB clusters) are in use: -r all
    must write a new refcount block for them."""
    corpus.qemu_io(p, "qcow2", "write -P 0x55 0 8M")
    q = Q(p)
    if os.path.getsize(p) <= 2048 * q.cs or not q.u64(q.rt_off + 8):
        raise RuntimeError("the image does not reach a second refcount "
                           "block")
    q.put64(q.rt_off + 8, 0)


def f_first_refblock_missing(p: str) -> None:
    """The first refcount block gone: header, tables and data all at
    refcount 0."""
    q = Q(p)
    q.put64(q.rt_off, 0)


def f_copied_cleared(p: str) -> None:
    """A data cluster of refcount 1 whose COPIED flag is clear (what a
    writer leaves when another reference to a shared cluster goes away)."""
    q = Q(p)
    a = q.l2e_addr(4 * KiB)
    q.put64(a, q.u64(a) & ~(1 << 63))


def f_copied_on_shared(p: str) -> None:
    """A data cluster with COPIED set that a second L2 entry also names,
    refcount 2: written in place, it would change both."""
    q = Q(p)
    a = q.l2e_addr(6 * MiB)
    host = q.data_off(4 * MiB)
    q.put64(a, (q.u64(a) & ~0x00fffffffffffe00) | host)
    q.set_rc(host, 2)


def f_reftable_reserved_empty(p: str) -> None:
    """Reserved bits in an empty refcount table entry (found by a
    differential run of bit flips against qemu-img check)."""
    q = Q(p)
    q.put64(q.rt_off + 8 * 7, 0x100)


def f_copied_past_eof(p: str) -> None:
    """An L2 entry with COPIED set naming a cluster far past the end of
    the file: no refcount block covers it (refcount 0), so the flag is
    wrong as well as the pointer."""
    q = Q(p)
    a = q.l2e_addr(6 * MiB)
    q.put64(a, (1 << 63) | (os.path.getsize(p) + 4096 * q.cs) &
            ~(q.cs - 1))


def f_compressed_copied(p: str) -> None:
    """A compressed cluster's entry with COPIED set: a corruption, the
    cluster still referenced."""
    corpus.qemu_io(p, "qcow2", "write -c -P 0x66 7M 4k")
    q = Q(p)
    a = q.l2e_addr(7 * MiB)
    q.put64(a, q.u64(a) | (1 << 63))


FAULTS = [
    ("refcount-lowered", f_rc_lowered, "all", True),
    ("refcount-raised", f_rc_raised, "leaks", True),
    ("l2-entry-into-refcount-table", f_l2_into_reftable, None, True),
    ("two-l2-entries-share-a-cluster", f_shared_cluster, None, True),
    ("l2-table-past-eof", f_l2_past_eof, None, False),
    ("truncated-file", f_truncated, None, False),
    ("unaligned-l2-entry", f_unaligned_l2e, None, True),
    ("refcount-block-in-two-table-entries", f_refblock_twice, None, True),
    ("l2-entry-into-refcount-block", f_l2_into_refblock, None, True),
    ("leaked-tail", f_leaks, "leaks", True),
    ("leaked-inside", f_leak_inside, "leaks", True),
    ("refcount-block-missing", f_refblock_missing, "all", True),
    ("first-refcount-block-missing", f_first_refblock_missing, "all", True),
    ("copied-flag-cleared", f_copied_cleared, "all", True),
    ("copied-flag-on-shared-cluster", f_copied_on_shared, None, True),
    ("reserved-bits-in-empty-refcount-table-entry",
     f_reftable_reserved_empty, None, True),
    ("copied-flag-past-eof", f_copied_past_eof, None, True),
    ("compressed-entry-with-copied", f_compressed_copied, None, True),
]

# The kind each of these faults must be reported as (siphon check's JSON
# "kinds"): the two COPIED cases are told apart (one is harmless).
KINDS = {"copied-flag-cleared": "copied_flag_clear",
         "copied-flag-on-shared-cluster": "copied_flag"}


def compare_content(a: str, b: str) -> str | None:
    p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                        a, b], capture_output=True, text=True, timeout=120)
    return None if p.returncode == 0 else \
        f"qemu-img compare: {p.stdout.strip()} {p.stderr.strip()}"


def case_fault(siphon: str, tmp: str, name: str, patch, repair, counts,
               rep: harness.Report) -> None:
    d = os.path.join(tmp, name)
    os.mkdir(d)
    good = os.path.join(d, "good.qcow2")
    base_image(good)
    bad = os.path.join(d, "bad.qcow2")
    shutil.copy(good, bad)
    patch(bad)
    probs = agree(siphon, bad, counts)
    if name in KINDS:
        _, js, _ = siphon_check(siphon, bad)
        got = js.get("kinds", {}).get(KINDS[name], 0)
        if got < 1:
            probs.append(f"reported as {js.get('kinds')}, not as "
                         f"{KINDS[name]}")
    qrc, _ = qemu_check(bad)
    if qrc == 0:
        probs.append("the fault is not a fault: qemu-img check exits 0")
    # The same repair in siphon and in qemu, on copies.
    for mode in ("leaks", "all"):
        mine = os.path.join(d, f"siphon-r{mode}.qcow2")
        theirs = os.path.join(d, f"qemu-r{mode}.qcow2")
        shutil.copy(bad, mine)
        shutil.copy(bad, theirs)
        src, s, err = siphon_check(siphon, mine, "-r", mode)
        if src == -1000:
            probs.append(f"-r {mode}: {err}")
            continue
        after_rc, after = qemu_check(mine)
        q_rc, _ = qemu_check(theirs, mode)
        q_after, _ = qemu_check(theirs)
        if src != after_rc:
            probs.append(f"-r {mode}: siphon exits {src} but qemu-img check "
                         f"of the result exits {after_rc} ({summary(after)})")
        fixable = repair == mode or (repair == "leaks" and mode == "all")
        if fixable and after_rc != 0:
            probs.append(f"-r {mode} left {summary(after)} (qemu-img check "
                         f"exit {after_rc}): {findings(s)}")
        if fixable and q_after == 0:
            why = compare_content(mine, theirs)
            if why:
                probs.append(f"-r {mode}: content differs from qemu's "
                             f"repair: {why}")
        if after_rc == 2 and mode == "all" and not s.get("marked-corrupt") \
                and q_after != 0:
            probs.append("-r all left corruption but did not mark the "
                         "image corrupt")
        if fixable and after_rc == 0 and mode == "leaks":
            why = compare_content(mine, bad)
            if why:
                probs.append(f"-r leaks changed the content: {why}")
    rep.emit(f"fault {name}", probs)


def case_corpus(siphon: str, tmp: str, rep: harness.Report) -> None:
    root = os.path.join(tmp, "corpus")
    os.mkdir(root)
    errors: list[str] = []
    entries = corpus.build(root, errors)
    if errors:
        rep.emit("corpus build", errors)
    seen = set()
    for e in entries:
        for f in e.files:
            if f in seen or not f.endswith(".qcow2"):
                continue
            seen.add(f)
            rep.emit(f"corpus {e.name}: {os.path.basename(f)}",
                     agree(siphon, f))


def case_window(siphon: str, tmp: str, rep: harness.Report) -> None:
    # 512-byte clusters: a refcount block covers 256 clusters (128 KiB), the
    # smallest window; the file holds some 800 clusters.
    p = os.path.join(tmp, "window.qcow2")
    base_image(p, 512)
    f_leak_inside(p)
    leak_at_end(p, 3)
    f_rc_lowered(p)
    # COPIED flags wrong in the first window and in later ones (a later
    # window counts most L2 tables from the runs the first one recorded,
    # not from the tables: these must be found there too).
    q = Q(p)
    for g in (4 * KiB, 2 * MiB + 512, 4 * MiB):
        a = q.l2e_addr(g)
        q.put64(a, q.u64(a) & ~(1 << 63))
    q.set_rc(q.data_off(2 * MiB), 2)
    probs = []
    _, one, err1 = siphon_check(siphon, p)
    n, many, err2 = siphon_check(siphon, p, "--window", "256")
    if n == -1000:
        probs.append(err2)
    elif many.get("passes", 0) < 2:
        probs.append(f"--window 256 took {many.get('passes')} passes")
    for key in ("leaks", "corruptions", "image-end-offset",
                "allocated-clusters", "fragmented-clusters", "kinds"):
        if one.get(key) != many.get(key):
            probs.append(f"{key}: {one.get(key)} in one pass, "
                         f"{many.get(key)} in {many.get('passes')}")
    if not one.get("kinds", {}).get("copied_flag_clear") or \
            not one.get("kinds", {}).get("copied_flag"):
        probs.append(f"the COPIED faults were not found: {one.get('kinds')}")
    probs += agree(siphon, p)
    rep.emit("several windows", probs,
             info=f"{many.get('passes')} passes")


def case_in_use(siphon: str, tmp: str, rep: harness.Report) -> None:
    p = os.path.join(tmp, "inuse.qcow2")
    base_image(p)
    leak_at_end(p, 2)
    before = open(p, "rb").read()
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", p],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    probs = []
    try:
        # qemu-io prints its prompt once the image is open (and locked).
        holder.stdin.write(b"help\n")
        holder.stdin.flush()
        ready, _, _ = select.select([holder.stdout], [], [], 60)
        if not ready:
            raise RuntimeError("qemu-io did not open the image in 60 s")
        holder.stdout.readline()
        r = run([siphon, "check", "-r", "leaks", p])
        if r.rc != 1 or not r.err.strip():
            probs.append(f"-r on an image in use: {r.describe()}")
        elif p not in r.err:
            probs.append(f"message does not name the image: {r.err!r}")
        r = run([siphon, "check", "-q", p])
        if r.rc != 1 or p not in r.err:
            probs.append(f"check of an image in use: {r.describe()}")
        # -U: read-only, without the lock, like qemu-img check -U.
        r = run([siphon, "check", "-U", p])
        q = subprocess.run(["qemu-img", "check", "-U", p],
                           capture_output=True, timeout=60).returncode
        if r.rc != q:
            probs.append(f"check -U exits {r.rc}, qemu-img check -U {q}: "
                         f"{r.describe()}")
    except RuntimeError as e:
        probs.append(str(e))
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    if open(p, "rb").read() != before:
        probs.append("the image in use was written")
    rep.emit("image in use", probs)


def case_restart_reclaims(siphon: str, tmp: str, rep: harness.Report) -> None:
    """A writer that crashed leaves the dirty bit and leaks (clusters
    refcounted, never linked): the next siphon writer reclaims them before
    it writes, so a restarted stream leaves an image qemu-img check finds
    clean, with the chain's content."""
    d = os.path.join(tmp, "restart")
    os.mkdir(d)
    base = os.path.join(d, "base.qcow2")
    top = os.path.join(d, "top.qcow2")
    corpus.create_qcow2(base, 8 * MiB, "cluster_size=4096")
    corpus.qemu_io(base, "qcow2", "write -P 0x5a 0 3M", "write -P 0x5b 5M 1M")
    corpus.create_qcow2(top, 8 * MiB, "cluster_size=4096", backing=base,
                        backing_fmt="qcow2", relative=True)
    corpus.qemu_io(top, "qcow2", "write -P 0x11 1M 64k")
    want = os.path.join(d, "want.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", top, want],
                   check=True, timeout=120)
    leak_at_end(top, 7)
    q = Q(top)
    q.put64(72, q.u64(72) | 1)  # dirty: the crashed writer's mark
    probs = []
    qrc, before = qemu_check(top)
    if qrc != 3 or before.get("leaks") != 7:
        probs.append(f"setup: qemu-img check exit {qrc} {summary(before)}")
    r = run([siphon, "stream", "--no-progress", top], timeout=120)
    if r.rc != 0:
        probs.append(f"stream: {r.describe()}")
    qrc, after = qemu_check(top)
    if qrc != 0:
        probs.append(f"after the stream: qemu-img check exit {qrc} "
                     f"{summary(after)}")
    if Q(top).u64(72) & 1:
        probs.append("the dirty bit is still set after a clean close")
    p = subprocess.run(["qemu-img", "compare", "-F", "raw", top, want],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        probs.append(f"content: {p.stdout.strip()} {p.stderr.strip()}")
    rep.emit("restart reclaims a crash's leaks", probs)


# Images qemu writes, for the bit flips: (name, create options, qemu-io
# commands, snapshot taken then more written).
FLIP_IMAGES = [
    ("v3-4k-snap", "cluster_size=4096", 8 * MiB,
     ["write -P 1 0 1M", "write -P 2 4M 512k"], True),
    ("512-rc1", "cluster_size=512,refcount_bits=1", 2 * MiB,
     ["write -P 1 0 256k", "write -z 512k 64k"], False),
    ("4k-rc64-compressed", "cluster_size=4096,refcount_bits=64", 4 * MiB,
     ["write -P 3 0 512k", "write -c -P 4 1M 64k"], True),
    ("16k-extended-l2", "cluster_size=16384,extended_l2=on", 4 * MiB,
     ["write -P 3 0 300k", "write -z 1M 64k"], False),
    ("1k-rc8-compressed", "cluster_size=1024,refcount_bits=8", 2 * MiB,
     ["write -P 3 0 100k", "write -c -P 4 512k 32k", "write -P 5 1M 2k"],
     True),
    ("v2-4k", "compat=0.10,cluster_size=4096", 4 * MiB,
     ["write -P 3 0 300k", "write -c -P 4 1M 64k"], True),
]


def case_flips(siphon: str, tmp: str, rep: harness.Report) -> None:
    """Random bit flips in the metadata of images qemu wrote (seeded:
    SIPHON_FLIP_SEED, SIPHON_FLIPS of them): siphon check and qemu-img check
    must exit alike and count alike (leaks, corruptions), with one known
    difference: for an L1 entry of reserved bits only (offset 0) qemu
    reads the header cluster as its L2 table and reports what it finds
    there (more corruptions, the same exit code). Images qemu refuses to
    open (exit 1) siphon must refuse too."""
    seed = int(os.environ.get("SIPHON_FLIP_SEED", "20261204"))
    n = int(os.environ.get("SIPHON_FLIPS", "240"))
    rng = random.Random(seed)
    d = os.path.join(tmp, "flips")
    os.mkdir(d)
    images = []
    for name, opts, size, cmds, snap in FLIP_IMAGES:
        p = os.path.join(d, name + ".qcow2")
        corpus.create_qcow2(p, size, opts)
        corpus.qemu_io(p, "qcow2", *cmds)
        if snap:
            subprocess.run(["qemu-img", "snapshot", "-c", "s1", p],
                           check=True, timeout=60)
            corpus.qemu_io(p, "qcow2", "write -P 9 0 128k")
        with open(p, "rb") as f:
            images.append((name, f.read()))
    probs = []
    flipped = os.path.join(d, "flipped.qcow2")
    found = 0
    for it in range(n):
        name, data = images[rng.randrange(len(images))]
        b = bytearray(data)
        flips = []
        for _ in range(rng.randint(1, 2)):
            # Mostly where these small images keep their metadata.
            end = min(len(b), 0x8000) if rng.random() < 0.7 else len(b)
            off = rng.randrange(0x68, end)
            bit = rng.randrange(8)
            b[off] ^= 1 << bit
            flips.append(f"0x{off:x}.{bit}")
        with open(flipped, "wb") as f:
            f.write(b)
        qrc, q = qemu_check(flipped)
        src, s, err = siphon_check(siphon, flipped)
        what = f"{name} flipped at {' '.join(flips)}"
        if src == -1000:
            probs.append(f"{what}: {err}")
            continue
        found += qrc != 0
        l1_quirk = any(
            e & 0x00fffffffffffe00 == 0 and e & ~0x80fffffffffffe00
            for e in l1_entries(b))
        if src != qrc:
            probs.append(f"{what}: exit {src}, qemu-img check {qrc}: "
                         f"siphon {summary(s)} qemu {summary(q)}: "
                         f"{findings(s)}")
        elif not l1_quirk and (s.get("leaks", 0), s.get("corruptions", 0)) \
                != (q.get("leaks", 0), q.get("corruptions", 0)):
            probs.append(f"{what}: siphon {summary(s)}, qemu {summary(q)}: "
                         f"{findings(s)}")
        if len(probs) >= 10:
            break
    rep.emit("bit flips against qemu", probs,
             info=f"{n} images, {found} faulty to qemu, seed {seed}")


def l1_entries(b: bytes) -> list[int]:
    """The active L1 table of a qcow2 image's bytes (empty if it does not
    lie within them)."""
    l1_size, l1_off = struct.unpack_from(">IQ", b, 36)
    if l1_off + 8 * l1_size > len(b):
        return []
    return list(struct.unpack_from(f">{l1_size}Q", b, l1_off))


def case_v2_unmarkable(siphon: str, tmp: str, rep: harness.Report) -> None:
    """-r all leaving corruption in a version 2 image, which has no corrupt
    bit: siphon says so (JSON and text), exit 2, the header untouched."""
    p = os.path.join(tmp, "v2.qcow2")
    corpus.create_qcow2(p, 8 * MiB, "compat=0.10,cluster_size=4096")
    corpus.qemu_io(p, "qcow2", "write -P 0x11 0 256k")
    with open(p, "rb") as f:
        h = f.read(72)
    rt_off = struct.unpack_from(">Q", h, 48)[0]
    with open(p, "r+b") as f:
        f.seek(rt_off + 8 * 3)  # a refcount block far past the end
        f.write(struct.pack(">Q", 1 << 34))
    before = open(p, "rb").read(72)
    probs = agree(siphon, p)
    src, js, _ = siphon_check(siphon, p, "-r", "all")
    if src != 2:
        probs.append(f"-r all exits {src}, not 2: {findings(js)}")
    if not js.get("corrupt-unmarkable") or js.get("marked-corrupt"):
        probs.append(f"corrupt-unmarkable {js.get('corrupt-unmarkable')}, "
                     f"marked-corrupt {js.get('marked-corrupt')}")
    r = run([siphon, "check", "-r", "all", "-f", "qcow2", p])
    if b"version 2 image has no bit" not in r.out:
        probs.append(f"the text output does not say it: {r.out!r}")
    if open(p, "rb").read(72) != before:
        probs.append("the header changed")
    qrc, _ = qemu_check(p)
    if qrc != 2:
        probs.append(f"qemu-img check exits {qrc} afterwards, not 2")
    rep.emit("version 2 image left corrupt", probs)


def case_raw(siphon: str, tmp: str, rep: harness.Report) -> None:
    p = os.path.join(tmp, "x.raw")
    with open(p, "wb") as f:
        f.truncate(MiB)
    q = subprocess.run(["qemu-img", "check", "-f", "raw", p],
                       capture_output=True, timeout=60).returncode
    r = run([siphon, "check", p])
    probs = []
    if r.rc != q:
        probs.append(f"raw: exit {r.rc}, qemu-img check {q}: {r.describe()}")
    rep.emit("raw image", probs)


def main() -> int:
    rep = harness.Report()
    with tempfile.TemporaryDirectory(prefix="siphon-check-") as tmp:
        siphon = harness.preflight(tmp)
        for name, patch, repair, counts in FAULTS:
            case_fault(siphon, tmp, name, patch, repair, counts, rep)
        case_window(siphon, tmp, rep)
        case_in_use(siphon, tmp, rep)
        case_restart_reclaims(siphon, tmp, rep)
        case_flips(siphon, tmp, rep)
        case_v2_unmarkable(siphon, tmp, rep)
        case_raw(siphon, tmp, rep)
        case_corpus(siphon, tmp, rep)
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
