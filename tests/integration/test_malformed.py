#!/usr/bin/env python3
"""siphon on malformed and unsupported images: a clean error, never a crash.

Each case crafts one bad image (patching fields of a good qemu-img image with
struct, or using qemu-img -u to make impossible chains), then runs
`siphon info`, `siphon map --output=json` and `siphon dump` on it, always
with -f qcow2 (without -f a broken qcow2 may rightly probe as raw).

For a command the case expects to fail, the run must:
  - exit 1 (a signal, a timeout, a sanitizer report or any other code fails);
  - print a message on stderr naming the image (or the backing file at
    fault) and containing, case-insensitively, one keyword of the case.
Commands that cannot be expected to notice the damage (e.g. map does not
inflate compressed clusters, info need not read L2 tables) must merely not
crash: exit 0 or 1 with a message. The actual message is printed for every
run so that wording mismatches are easy to fix; qemu-img's own reaction is
printed as context.

Exit 0 all passed, 1 any failure, 77 skipped. Env: SIPHON, SIPHON_SRC.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import sys
import tempfile

import corpus
import harness
from harness import run

KiB = 1024
MiB = 1024 * KiB

# Header field offsets (big-endian), qcow2 spec.
H_MAGIC, H_VERSION, H_BF_OFF, H_BF_SIZE, H_CLUSTER_BITS = 0, 4, 8, 16, 20
H_SIZE, H_CRYPT, H_L1_SIZE, H_L1_OFF = 24, 32, 36, 40
H_INCOMPAT, H_REFCOUNT_ORDER, H_HDR_LEN, H_COMPRESSION = 72, 96, 100, 104

MUST = "must-fail"      # exit 1 with a matching message
MAY = "may-fail"        # exit 0, or exit 1 with a message; never a crash


@dataclasses.dataclass
class Case:
    name: str
    path: str                   # image to open
    keywords: tuple[str, ...]   # one of these must appear (case-insensitive)
    expect: dict[str, str]      # command -> MUST / MAY
    names: tuple[str, ...] = ()  # file names one of which the message names


def everything(info: str = MUST, map_: str = MUST,
               dump: str = MUST) -> dict[str, str]:
    return {"info": info, "map": map_, "dump": dump}


# --- byte patching helpers -------------------------------------------------

def rd(path: str, off: int, fmt: str):
    with open(path, "rb") as f:
        f.seek(off)
        data = f.read(struct.calcsize(fmt))
    return struct.unpack(">" + fmt, data)[0]


def wr(path: str, off: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">" + fmt, value))


def wbytes(path: str, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def good_image(path: str, size: int = 2 * MiB, opts: str = "",
               data: bool = True) -> None:
    corpus.create_qcow2(path, size, opts)
    if data:
        corpus.qemu_io(path, "qcow2", "write -P 0x5a 0 128k",
                       "write -P 0x6b 1M 64k")


def l2_entry_offset(path: str, index: int = 0) -> int:
    """File offset of the L2 entry for guest cluster `index` (which must be
    in the first L2 table), for standard 8-byte entries."""
    l1_off = rd(path, H_L1_OFF, "Q")
    l1e = rd(path, l1_off, "Q")
    l2_off = l1e & 0x00fffffffffffe00
    assert l2_off, "L1[0] not allocated"
    return l2_off + 8 * index


def compressed_image(path: str, ctype: str = "zlib") -> int:
    """A 64k-cluster image whose first cluster is compressed; returns the
    host offset of the compressed data."""
    src = path + ".src"
    corpus.write_raw(src, 1 * MiB, [(0, corpus.fill_bytes(3, 64 * KiB,
                                                          "text"))])
    corpus.qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                    f"compression_type={ctype}", src, path)
    os.unlink(src)
    ent = rd(path, l2_entry_offset(path), "Q")
    assert ent & (1 << 62), "first cluster not compressed"
    cluster_bits = rd(path, H_CLUSTER_BITS, "I")
    x = 62 - (cluster_bits - 8)
    return ent & ((1 << x) - 1)


# --- the cases ---------------------------------------------------------------

def make_cases(d: str, skipped: list[tuple[str, str]]) -> list[Case]:
    """Craft the images under d. Cases that cannot be built here are
    appended to skipped as (name, why)."""
    cases: list[Case] = []

    def p(name: str) -> str:
        return os.path.join(d, name)

    def add(name, path, keywords, expect=None, names=()):
        cases.append(Case(name, path, tuple(keywords),
                          expect or everything(),
                          names or (os.path.basename(path),)))

    good = p("good.qcow2")
    good_image(good)
    with open(good, "rb") as f:
        good_bytes = f.read()

    def copy_of(name: str) -> str:
        path = p(name)
        with open(path, "wb") as f:
            f.write(good_bytes)
        return path

    # Header.
    path = p("truncated-header.qcow2")
    with open(path, "wb") as f:
        f.write(good_bytes[:40])
    add("truncated-header", path,
        ["truncat", "short", "header", "end of file", "eof", "small"])

    path = copy_of("bad-magic.qcow2")
    wbytes(path, H_MAGIC, b"QFI\xfa")
    add("bad-magic", path, ["magic", "not a qcow2", "not qcow2"])

    for v in (1, 4):
        path = copy_of(f"version-{v}.qcow2")
        wr(path, H_VERSION, "I", v)
        add(f"version-{v}", path, ["version"])

    for bits in (8, 22):
        path = copy_of(f"cluster-bits-{bits}.qcow2")
        wr(path, H_CLUSTER_BITS, "I", bits)
        add(f"cluster-bits-{bits}", path, ["cluster"])

    path = copy_of("refcount-order-7.qcow2")
    wr(path, H_REFCOUNT_ORDER, "I", 7)
    add("refcount-order-7", path, ["refcount"])

    path = copy_of("header-length-100.qcow2")
    wr(path, H_HDR_LEN, "I", 100)
    add("header-length-100", path, ["header", "length"])

    # compression_type zstd without incompatible bit 3.
    path = copy_of("compression-type-no-bit.qcow2")
    assert rd(path, H_HDR_LEN, "I") > 104
    wr(path, H_COMPRESSION, "B", 1)
    add("compression-type-without-bit", path, ["compression"])

    path = copy_of("incompatible-bit-10.qcow2")
    wr(path, H_INCOMPAT, "Q", rd(path, H_INCOMPAT, "Q") | (1 << 10))
    add("unknown-incompatible-bit", path,
        ["incompatible", "feature", "unsupported"])

    path = copy_of("crypt-aes.qcow2")
    wr(path, H_CRYPT, "I", 1)
    # info may describe an encrypted image instead of refusing it.
    add("encrypted-aes", path, ["encrypt", "aes", "crypt"],
        everything(info=MAY))

    # LUKS creation benchmarks the PBKDF and fails now and then under load
    # ("Unable to get accurate CPU usage"): retry, then skip the case.
    path = p("luks.qcow2")
    for attempt in range(4):
        try:
            corpus.qemu_img("create", "-q", "-f", "qcow2", "--object",
                            "secret,id=sec0,data=siphon", "-o",
                            "encrypt.format=luks,encrypt.key-secret=sec0,"
                            f"encrypt.iter-time={50 * (attempt + 1)}",
                            path, "1M")
            break
        except corpus.CorpusError as e:
            if os.path.exists(path):
                os.unlink(path)
            why = str(e).strip().splitlines()[-1]
    if os.path.exists(path):
        add("encrypted-luks", path, ["encrypt", "luks", "crypt"],
            everything(info=MAY))
    else:
        skipped.append(("encrypted-luks", f"qemu-img could not create it: "
                        f"{why}"))

    # L1 table.
    path = copy_of("l1-beyond-eof.qcow2")
    wr(path, H_L1_OFF, "Q", 1 << 40)
    add("l1-beyond-eof", path, ["l1"])

    path = copy_of("l1-size-absurd.qcow2")
    wr(path, H_L1_SIZE, "I", 0x7fffffff)
    add("l1-size-absurd", path, ["l1"])

    path = copy_of("l1-size-too-small.qcow2")
    wr(path, H_L1_SIZE, "I", 0)
    add("l1-size-too-small", path, ["l1"])

    path = copy_of("l1-unaligned-offset.qcow2")
    wr(path, H_L1_OFF, "Q", rd(path, H_L1_OFF, "Q") + 8)
    add("l1-unaligned-offset", path, ["l1", "align"])

    # L2 tables and entries: a correct open need not read them (info MAY).
    l2_only = everything(info=MAY)

    path = copy_of("l2-unaligned.qcow2")
    l1_off = rd(path, H_L1_OFF, "Q")
    wr(path, l1_off, "Q", rd(path, l1_off, "Q") + 512)
    add("l2-offset-unaligned", path, ["l2", "align"], l2_only)

    path = copy_of("l2-beyond-eof.qcow2")
    l1_off = rd(path, H_L1_OFF, "Q")
    wr(path, l1_off, "Q", (1 << 63) | (1 << 40))
    add("l2-table-beyond-eof", path, ["l2"], l2_only)

    path = copy_of("l2-entry-past-eof.qcow2")
    wr(path, l2_entry_offset(path), "Q", (1 << 63) | (1 << 40))
    add("l2-entry-past-eof", path, ["l2", "end of file", "eof", "beyond",
                                     "past"], l2_only)

    path = copy_of("l2-entry-unaligned.qcow2")
    e = l2_entry_offset(path)
    wr(path, e, "Q", rd(path, e, "Q") + 512)
    add("l2-entry-unaligned", path, ["l2", "align"], l2_only)

    # Compressed clusters.
    path = p("compressed-past-eof.qcow2")
    compressed_image(path)
    e = l2_entry_offset(path)
    ent = rd(path, e, "Q")
    x = 62 - (16 - 8)
    wr(path, e, "Q", (ent & ~((1 << x) - 1)) | (1 << 40))
    add("compressed-descriptor-past-eof", path,
        ["compress", "l2", "end of file", "eof", "beyond", "past"], l2_only)

    # Damaged compressed data: only reading the data can notice.
    data_only = everything(info=MAY, map_=MAY)
    for ctype in ("zlib", "zstd"):
        path = p(f"corrupt-{ctype}.qcow2")
        off = compressed_image(path, ctype)
        wbytes(path, off, b"\xff" * 64)
        add(f"corrupt-{ctype}-data", path,
            ["compress", "inflate", "deflate", "zlib", "zstd", "decompress",
             "corrupt"], data_only)

    # Backing chains.
    a, b = p("loop-a.qcow2"), p("loop-b.qcow2")
    corpus.create_qcow2(a, 1 * MiB)
    corpus.create_qcow2(b, 1 * MiB, backing=a)
    corpus.qemu_img("rebase", "-u", "-f", "qcow2", "-b", b, "-F", "qcow2", a)
    add("backing-loop", b, ["loop", "cycle", "circular", "recurs", "depth",
                            "deep"], names=("loop-a.qcow2", "loop-b.qcow2"))

    s = p("self-loop.qcow2")
    corpus.create_qcow2(s, 1 * MiB)
    corpus.qemu_img("rebase", "-u", "-f", "qcow2", "-b", s, "-F", "qcow2", s)
    add("backing-self-loop", s, ["loop", "cycle", "circular", "recurs",
                                 "depth", "deep", "itself"])

    path = p("missing-backing.qcow2")
    corpus.create_qcow2(path, 1 * MiB, backing=p("no-such-base.qcow2"),
                        unsafe=True)
    add("missing-backing", path, ["backing", "no such file", "not found",
                                  "missing"],
        names=("missing-backing.qcow2", "no-such-base.qcow2"))

    path = p("long-backing-name.qcow2")
    corpus.create_qcow2(path, 1 * MiB, backing=p("base.qcow2"), unsafe=True)
    bf_off = rd(path, H_BF_OFF, "Q")
    wbytes(path, bf_off, b"b" * 2000)
    wr(path, H_BF_SIZE, "I", 2000)
    add("backing-name-too-long", path, ["backing", "name", "long", "1023"])

    path = p("backing-name-offset-bad.qcow2")
    corpus.create_qcow2(path, 1 * MiB, backing=p("base.qcow2"), unsafe=True)
    wr(path, H_BF_OFF, "Q", 1 << 40)
    add("backing-name-beyond-eof", path, ["backing"])

    # Header extensions (qemu refuses both on open; found by bit flips).
    path = copy_of("extension-end-marker-long.qcow2")
    off = rd(path, H_HDR_LEN, "I")
    while rd(path, off, "I") != 0:  # to the end-of-extensions marker
        off += 8 + (rd(path, off + 4, "I") + 7) // 8 * 8
    wr(path, off + 4, "I", 2 * MiB)
    add("extension-end-marker-length-past-cluster", path,
        ["extension", "past"])

    path = p("bitmaps-reserved.qcow2")
    good_image(path)
    corpus.qemu_img("bitmap", "--add", "-f", "qcow2", path, "b0")
    off = rd(path, H_HDR_LEN, "I")
    while rd(path, off, "I") not in (0, 0x23852875):  # bitmaps extension
        off += 8 + (rd(path, off + 4, "I") + 7) // 8 * 8
    assert rd(path, off, "I") == 0x23852875, "no bitmaps extension"
    wr(path, off + 8 + 4, "I", 1)
    add("bitmaps-extension-reserved-field", path, ["bitmaps", "reserved"])

    return cases


def matches(c: Case, r: harness.Result) -> list[str]:
    problems = []
    err = r.err.lower()
    if not r.err.strip():
        return ["empty stderr"]
    if not any(k.lower() in err for k in c.keywords):
        problems.append(f"message has none of the keywords {list(c.keywords)}")
    if not any(n.lower() in err for n in c.names):
        problems.append(f"message names none of {list(c.names)}")
    return problems


def check(siphon: str, c: Case, cmd: str, work: str) -> tuple[list[str], str]:
    out = os.path.join(work, f"{c.name}.raw")
    if cmd == "info":
        argv = [siphon, "info", "-f", "qcow2", c.path]
    elif cmd == "map":
        argv = [siphon, "map", "-f", "qcow2", "--output=json", c.path]
    else:
        argv = [siphon, "dump", "-f", "qcow2", c.path, out]
    r = run(argv, timeout=60, cwd="/")
    msg = r.err.strip().replace("\n", " | ")
    if os.path.exists(out):
        os.unlink(out)
        if r.rc != 0:
            msg += " [note: the failed dump left its output file behind]"
    why = r.crashed()
    if why:
        return [f"CRASH: {why}\n{r.describe()}"], msg
    if r.rc == 2:
        return [f"exit 2 (usage error?)\n{r.describe()}"], msg
    expect = c.expect[cmd]
    if r.rc == 0:
        if expect == MUST:
            return [f"exit 0, expected 1\n{r.describe()}"], msg
        return [], "(exit 0, acceptable here)"
    problems = matches(c, r)
    if problems:
        problems.append(r.describe())
    return problems, msg


def qemu_reaction(c: Case) -> str:
    """How qemu-img map takes the image (context only: qemu 7.2 reads some of
    these as zeros, and loops forever on a backing loop)."""
    q = run(["qemu-img", "map", "-f", "qcow2", "--output=json", c.path],
            timeout=5)
    if q.timed_out:
        return "qemu-img map: timed out"
    first = (q.err.strip().splitlines() or [""])[0]
    return f"qemu-img map: exit {q.rc} {first}"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="siphon-bad-") as tmp:
        siphon = harness.preflight(tmp)
        d = os.path.join(tmp, "images")
        work = os.path.join(tmp, "work")
        os.makedirs(d)
        os.makedirs(work)
        report = harness.Report()
        skipped: list[tuple[str, str]] = []
        try:
            cases = make_cases(d, skipped)
        except (corpus.CorpusError, AssertionError, OSError) as e:
            report.emit("build-malformed-images", [str(e)])
            return report.finish()
        for name, why in skipped:
            report.emit(name, [], skip=why)
        for c in cases:
            print(f"# {c.name}: {qemu_reaction(c)}", flush=True)
            for cmd in ("info", "map", "dump"):
                problems, msg = check(siphon, c, cmd, work)
                report.emit(f"{c.name}/{cmd}", problems, info=msg)
        return report.finish()


if __name__ == "__main__":
    sys.exit(main())
