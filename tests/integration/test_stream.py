#!/usr/bin/env python3
"""`siphon stream` (offline population, issue 4) against qemu as the oracle.

Sections (select with -k SUBSTRING on the case names):

corpus/   every corpus entry (corpus.py) is streamed on a copy of its chain:
          the result has no backing file, `qemu-img check` exits 0, and
          `qemu-img compare` against the untouched original chain says
          identical; a second stream is a no-op. Entries siphon refuses to
          write must be refused with exit 1 and a message that says why,
          leaving the file untouched.
base/     every corpus chain streamed with --base set to each layer below the
          top: the backing becomes that layer (name and format), top clusters
          whose data all came from base or below were not copied (map depth
          >= 1), clusters with data from above base are local, the content
          equals the original chain.
qemu030/  qemu's streaming test scenarios (iotests 030) rebuilt with
          qemu-img/qemu-io: raw backing <- mid <- top (full stream; base=mid
          leaves top's allocation unchanged; base=the raw makes top hold
          mid's allocation); a chain of 9 images with 0xFF patterns in
          alternate layers, streamed in sub-chains (intermediate nodes too:
          every image above must still read the same); backing files smaller
          than the top (and a short middle layer under --base).
errors/   a read error injected once in the backing at 512 KiB, ENOSPC
          injected while writing the top, and a real ENOSPC on a small tmpfs
          (skipped when mount fails): exit 1 naming the file and the error,
          image consistent (check 0 or 3), backing kept, content unchanged;
          a restart without the fault completes, without new leaks.
abort/    SIGINT during a throttled stream: exit 130, "aborted at", image
          clean and unchanged in content, backing kept; the restart completes
          and reports the bytes already local.
speed/    a stream of N bytes at R bytes/s takes at least (N - 1 extent)/R;
          the limit counts copied bytes, not skipped ones. --output=json:
          every line is JSON, progress events then one "done" with cur == end.
crash/    SIGKILL at seeded random moments (some runs resuming an aborted
          stream): every survivor passes check (0 or 3) and reads as the
          original chain; a restarted stream completes, check 0 (the
          leaks the kill left are reclaimed), identical.
usage/    bad options and arguments: exit 2 (usage) or 1 (a --base that is
          not in the chain, missing files), each with a message, and the
          image untouched.

Closing line: "N passed, N failed[, N skipped]"; exit 1 on failure, 77 when
qemu-img/qemu-io are missing or io_uring is unavailable.

Usage: test_stream.py [-v] [-k SUBSTRING] [--seed N] [--kills N]
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402
import harness  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

VERBOSE = "-v" in sys.argv
ONLY = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else None
SEED = int(sys.argv[sys.argv.index("--seed") + 1]) \
    if "--seed" in sys.argv else 20240917
KILLS = int(sys.argv[sys.argv.index("--kills") + 1]) \
    if "--kills" in sys.argv else 10

SIPHON = ""  # set by main()

# Corpus entries siphon may refuse to stream into, and a word its message
# must contain when it does.
MAY_REFUSE = {
    "external-data-file-raw-off": ("data file", "data_file"),
    "external-data-file-raw-on": ("data file", "data_file"),
    "raw-alone": ("raw",),
}


def wanted(name: str) -> bool:
    return ONLY is None or ONLY in name


# ---------------------------------------------------------------------------
# Plumbing


def srun(args: list[str], env: dict | None = None,
         timeout: int = 120) -> harness.Result:
    """Run siphon with args; env adds to (not replaces) the environment.
    SIPHON_FAULT is never inherited unless given."""
    e = dict(os.environ)
    e.pop("SIPHON_FAULT", None)
    if env:
        e.update(env)
    argv = [SIPHON, *args]
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout,
                           env=e)
    except subprocess.TimeoutExpired as x:
        return harness.Result(argv, None, x.stdout or b"",
                              (x.stderr or b"").decode(errors="replace"))
    return harness.Result(argv, p.returncode, p.stdout,
                          p.stderr.decode(errors="replace"))


def describe(r: harness.Result) -> str:
    out = r.out.decode(errors="replace").strip()
    if len(out) > 1500:
        out = out[:700] + " [...] " + out[-700:]
    return r.describe() + (f"\n  stdout: {out!r}" if out else "")


def json_lines(r: harness.Result) -> tuple[list[dict], list[str]]:
    """The JSON events of a --output=json run, and problems."""
    events, problems = [], []
    for n, line in enumerate(r.out.decode(errors="replace").splitlines()):
        try:
            v = json.loads(line)
        except ValueError:
            problems.append(f"stdout line {n + 1} is not JSON: {line!r}")
            continue
        if not isinstance(v, dict) or "event" not in v:
            problems.append(f"stdout line {n + 1} has no event: {line!r}")
            continue
        events.append(v)
    return events, problems


def last_event(r: harness.Result) -> dict:
    events, _ = json_lines(r)
    return events[-1] if events else {}


def info(path: str, chain: bool = False):
    argv = ["qemu-img", "info", "-U", "--output=json"]
    if chain:
        argv.append("--backing-chain")
    return json.loads(corpus.run(argv + [path]).stdout)


def check(path: str, fmt: str = "qcow2") -> tuple[int | None, dict, str]:
    """(exit code, parsed JSON report, text for messages)."""
    r = harness.run(["qemu-img", "check", "--output=json", "-f", fmt, path])
    try:
        rep = json.loads(r.out)
    except ValueError:
        rep = {}
    text = f"qemu-img check {path}: exit {r.rc}: " + \
        json.dumps({k: v for k, v in rep.items()
                    if k in ("leaks", "corruptions", "check-errors",
                             "image-end-offset")}) + \
        (f" {r.err.strip()[:300]}" if r.rc not in (0, 3) else "")
    return r.rc, rep, text


def compare(orig: str, new: str, fmt_orig: str = "qcow2",
            fmt_new: str = "qcow2") -> str | None:
    """None when qemu-img compare says identical, else a message."""
    r = harness.run(["qemu-img", "compare", "-U", "-f", fmt_orig, "-F",
                     fmt_new, orig, new], timeout=120)
    if r.rc == 0:
        return None
    return (f"qemu-img compare {orig} {new}: exit {r.rc}: "
            f"{r.out.decode(errors='replace').strip()} {r.err.strip()}")


def qmap(path: str) -> list[dict]:
    return json.loads(corpus.run(["qemu-img", "map", "-U", "--output=json",
                                  path]).stdout)


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def backing_of(path: str) -> tuple[str | None, str | None, str | None]:
    """(backing-filename, full path, format) from qemu-img info."""
    i = info(path)
    return (i.get("backing-filename"), i.get("full-backing-filename"),
            i.get("backing-filename-format"))


def same_file(a: str | None, b: str) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def copy_entry(root: str, files: list[str], dst: str) -> dict[str, str]:
    """Copy the files of a chain, keeping their layout under root (so that
    relative backing names still resolve). Backing names that are absolute
    keep pointing at the originals, which are only ever read."""
    out = {}
    for f in files:
        rel = os.path.relpath(f, root)
        d = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        shutil.copy2(f, d)
        out[f] = d
    return out


def dense_raw(path: str, size: int, seed: int) -> None:
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(size))


def stream_ok(path: str, args: list[str] = (), env=None) \
        -> tuple[list[str], dict]:
    """Stream with --output=json; problems unless it exits 0 with a final
    "done" event, cur == end, finalized."""
    r = srun(["stream", "--no-progress", "--output=json", *args, path],
             env=env)
    problems: list[str] = []
    if r.crashed() or r.rc != 0:
        return [f"stream failed ({r.crashed() or 'exit ' + str(r.rc)})",
                describe(r)], {}
    events, bad = json_lines(r)
    problems += bad
    ev = events[-1] if events else {}
    if ev.get("event") != "done" or ev.get("cur") != ev.get("end") or \
            ev.get("finalized") is not True:
        problems.append(f"final event is not a finalized done with cur == "
                        f"end: {ev}")
    return problems, ev


def verify_full(orig: str, new: str, fmt_orig: str = "qcow2",
                allow_leaks: int = 0) -> list[str]:
    """After a full stream: no backing, check 0, identical. allow_leaks: a
    crash inside a metadata flush may leave leaked clusters (refcounts reach
    the disk before the L2 entries, as in qemu); a restart keeps them
    (check exit 3) but must not add any."""
    problems = []
    name, _, _ = backing_of(new)
    if name is not None:
        problems.append(f"result still has a backing file: {name!r}")
    rc, rep, text = check(new)
    if rc != 0 and not (rc == 3 and allow_leaks and
                        rep.get("corruptions", 0) == 0 and
                        rep.get("leaks", 0) <= allow_leaks):
        problems.append(text)
    c = compare(orig, new, fmt_orig)
    if c:
        problems.append(c)
    return problems


# ---------------------------------------------------------------------------
# Allocation maps


class Map:
    """qemu-img map --output=json ranges, searchable by offset."""

    def __init__(self, ranges: list[dict]):
        self.r = sorted(ranges, key=lambda x: x["start"])
        self.starts = [x["start"] for x in self.r]

    def pieces(self, lo: int, hi: int) -> list[dict]:
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        out = []
        while i < len(self.r) and self.r[i]["start"] < hi:
            x = self.r[i]
            if x["start"] + x["length"] > lo:
                out.append(x)
            i += 1
        return out

    def local(self) -> list[tuple[int, int]]:
        """Merged [start, end) ranges at depth 0."""
        out: list[tuple[int, int]] = []
        for x in self.r:
            if x["depth"] != 0 or not x.get("present", True):
                continue
            s, e = x["start"], x["start"] + x["length"]
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out


def is_local(x: dict) -> bool:
    """Allocated in the top itself (data or a zero cluster). qemu reports
    what lies past the end of a short backing file as depth 0 but not
    present: that is not local."""
    return x["depth"] == 0 and x.get("present", True)


def fmt_range(x: dict) -> str:
    return (f"[{x['start']}, +{x['length']}) depth {x['depth']} "
            f"data {x['data']} zero {x['zero']}")


def base_map_problems(orig: Map, new: Map, size: int, cs: int,
                      kb: int) -> list[str]:
    """Cluster by cluster of the top (cluster size cs) after a stream with
    base at depth kb of the original chain:
      every byte from base or below (depth >= kb)            -> not copied;
      any data from a layer above base (1 <= depth < kb)     -> local;
      everything local before                                -> still local.
    """
    problems: list[str] = []
    bad = 0
    for c in range((size + cs - 1) // cs):
        lo, hi = c * cs, min(size, (c + 1) * cs)
        op = orig.pieces(lo, hi)
        np_ = new.pieces(lo, hi)
        why = None
        if op and all(p["depth"] >= kb for p in op):
            if any(is_local(p) for p in np_):
                why = "came from base or below but was copied"
        elif any(p["data"] and 1 <= p["depth"] < kb for p in op):
            if not all(is_local(p) for p in np_):
                why = "holds data from above base but is not local"
        elif op and all(is_local(p) for p in op):
            if not all(is_local(p) for p in np_):
                why = "was local and is not any more"
        if why:
            bad += 1
            if bad <= 3:
                problems.append(
                    f"cluster {c} (offset {lo}) {why}: before "
                    f"{'; '.join(fmt_range(p) for p in op)}; after "
                    f"{'; '.join(fmt_range(p) for p in np_)}")
    if bad > 3:
        problems.append(f"... {bad} clusters in all")
    return problems


# ---------------------------------------------------------------------------
# 1. The corpus, full stream


def run_corpus(tmp: str, rep: harness.Report) -> None:
    root = os.path.join(tmp, "corpus")
    os.mkdir(root)
    errors: list[str] = []
    entries = corpus.build(root, errors)
    for e in errors:
        rep.emit("corpus-build", [e])
    for e in entries:
        name = f"corpus/{e.name}"
        if wanted(name):
            stream_corpus_entry(tmp, root, e, name, rep)
    for e in entries:
        if e.fmt != "qcow2" or e.name in MAY_REFUSE:
            continue
        try:
            chain = info(e.top, chain=True)
        except corpus.CorpusError as x:
            rep.emit(f"base/{e.name}", [str(x)])
            continue
        for k in range(1, len(chain)):
            name = f"base/{e.name}@{k}"
            if wanted(name):
                stream_corpus_base(tmp, root, e, chain, k, name, rep)


def stream_corpus_entry(tmp, root, e, name, rep) -> None:
    work = os.path.join(tmp, "work")
    try:
        top = copy_entry(root, e.files, work)[e.top]
        before = file_hash(top)
        r = srun(["stream", "--no-progress", "--output=json", "-f", e.fmt,
                  top])
        why = r.crashed()
        if why:
            rep.emit(name, [f"stream crashed ({why})", describe(r)])
            return
        if r.rc != 0:
            words = MAY_REFUSE.get(e.name)
            low = r.err.lower()
            if words is None:
                rep.emit(name, ["stream failed", describe(r)])
            elif r.rc != 1 or not low.startswith("siphon:") or \
                    not any(w in low for w in words):
                rep.emit(name, [f"refused without a clear message (want "
                                f"exit 1, 'siphon:' and one of {words})",
                                describe(r)])
            elif file_hash(top) != before:
                rep.emit(name, ["refused, but the image was modified"])
            else:
                rep.emit(name, [], info="refused: " + r.err.strip()[:100])
            return
        problems: list[str] = []
        events, bad = json_lines(r)
        problems += bad
        ev = events[-1] if events else {}
        if ev.get("event") != "done" or ev.get("cur") != ev.get("end") or \
                not ev.get("finalized"):
            problems.append(f"final event: {ev}")
        bname, _, _ = backing_of(top)
        if bname is not None:
            problems.append(f"result still has a backing file: {bname!r}")
        note = None
        if e.fmt == "qcow2":
            # Persistent bitmaps are kept (not invalidated): clean too.
            rc, _, text = check(top)
            if rc != 0:
                problems.append(text)
        c = compare(e.top, top, e.fmt, e.fmt)
        if c:
            problems.append(c)
        if not problems:
            # A second stream over a finished image copies nothing.
            p2, ev2 = stream_ok(top, ["-f", e.fmt])
            problems += ["second stream: " + p for p in p2]
            if ev2 and ev2.get("bytes_copied"):
                problems.append(f"second stream copied "
                                f"{ev2['bytes_copied']} bytes")
            c = compare(e.top, top, e.fmt, e.fmt)
            if c:
                problems.append("after a second stream: " + c)
        if not note:
            note = (f"{ev.get('bytes_copied', 0) // KiB} KiB copied, "
                    f"{ev.get('bytes_skipped', 0) // KiB} KiB local, "
                    f"{ev.get('bytes_zero', 0) // KiB} KiB zero")
        rep.emit(name, problems, info=note)
    except (corpus.CorpusError, OSError, ValueError) as x:
        rep.emit(name, [f"{type(x).__name__}: {x}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------
# 2. --base


def stream_corpus_base(tmp, root, e, chain, k, name, rep) -> None:
    work = os.path.join(tmp, "work")
    try:
        top = copy_entry(root, e.files, work)[e.top]
        # The layer as the copy's chain names it (the copy may share the
        # lower layers with the original through absolute backing names).
        wchain = info(top, chain=True)
        base = wchain[k]["filename"]
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(top), base)
        problems = base_case(e.top, top, base, k, wchain[k]["format"])
        rep.emit(name, problems,
                 info=f"base {os.path.basename(base)} (depth {k} of "
                      f"{len(chain) - 1})")
    except (corpus.CorpusError, OSError, ValueError, KeyError) as x:
        rep.emit(name, [f"{type(x).__name__}: {x}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def base_case(orig_top: str, top: str, base: str, kb: int,
              base_fmt: str) -> list[str]:
    """Stream top with --base base (depth kb of the original chain) and
    check the header, the map rules and the content."""
    orig_map = Map(qmap(orig_top))
    i = info(orig_top)
    size, cs = i["virtual-size"], i.get("cluster-size", 64 * KiB)
    problems, ev = stream_ok(top, ["--base", base])
    if problems:
        return problems
    bname, bfull, bfmt = backing_of(top)
    if not same_file(bfull, base):
        problems.append(f"backing is {bname!r} ({bfull!r}), want {base!r}")
    if bfmt != base_fmt:
        problems.append(f"backing format {bfmt!r}, want {base_fmt!r}")
    rc, _, text = check(top)
    if rc != 0:
        problems.append(text)
    c = compare(orig_top, top)
    if c:
        problems.append(c)
    problems += base_map_problems(orig_map, Map(qmap(top)), size, cs, kb)
    return problems


# ---------------------------------------------------------------------------
# 3. qemu's streaming scenarios (iotests 030)


def build_three(d: str) -> tuple[str, str, str]:
    """raw backing <- mid.qcow2 <- top.qcow2, 4 MiB, relative names."""
    os.makedirs(d)
    b, m, t = (os.path.join(d, n) for n in ("backing.raw", "mid.qcow2",
                                           "top.qcow2"))
    corpus.qemu_img("create", "-q", "-f", "raw", b, "4M")
    corpus.qemu_io(b, "raw", "write -P 0x1 0 512", "write -P 0x5 2M 1M",
                   "write -P 0x7 3712k 128k")
    corpus.create_qcow2(m, 4 * MiB, backing=b, backing_fmt="raw",
                        relative=True)
    corpus.qemu_io(m, "qcow2", "write -P 0x2 512k 512",
                   "write -P 0x6 1M 256k", "write -z 2560k 64k",
                   "write -P 0x8 3840k 64k")
    corpus.create_qcow2(t, 4 * MiB, backing=m, relative=True)
    corpus.qemu_io(t, "qcow2", "write -P 0x3 3M 64k", "write -P 0x4 1088k 4k")
    return b, m, t


def run_qemu030(tmp: str, rep: harness.Report) -> None:
    d = os.path.join(tmp, "q030")
    orig = os.path.join(d, "orig")
    try:
        ob, om, ot = build_three(orig)
    except corpus.CorpusError as x:
        rep.emit("qemu030/setup", [str(x)])
        return

    def fresh(tag: str) -> tuple[str, str, str]:
        w = os.path.join(d, tag)
        shutil.copytree(orig, w)
        return tuple(os.path.join(w, os.path.basename(p))
                     for p in (ob, om, ot))

    name = "qemu030/full-stream"
    if wanted(name):
        _, _, t = fresh("full")
        problems, ev = stream_ok(t)
        if not problems:
            problems += verify_full(ot, t)
        rep.emit(name, problems)

    name = "qemu030/base-mid-no-op"
    if wanted(name):
        _, m, t = fresh("nop")
        before = Map(qmap(t)).local()
        problems = base_case(ot, t, m, 1, "qcow2")
        if not problems:
            after = Map(qmap(t)).local()
            if after != before:
                problems.append(f"top's allocation changed: {before} -> "
                                f"{after}")
        rep.emit(name, problems)

    name = "qemu030/base-backing-equals-mid"
    if wanted(name):
        b, m, t = fresh("partial")
        om_ = Map(qmap(ot))
        problems = base_case(ot, t, b, 2, "raw")
        if not problems:
            # Top now holds exactly its own clusters and mid's.
            cs = 64 * KiB
            want: list[tuple[int, int]] = []
            for x in om_.r:
                if x["depth"] in (0, 1) and x.get("present", True):
                    s = x["start"] // cs * cs
                    e = -(-(x["start"] + x["length"]) // cs) * cs
                    if want and want[-1][1] >= s:
                        want[-1] = (want[-1][0], max(want[-1][1], e))
                    else:
                        want.append((s, e))
            got = Map(qmap(t)).local()
            if got != want:
                problems.append(f"top's local ranges {got}, want mid's and "
                                f"top's {want}")
            c = compare(om, t, "qcow2")
            if c is None:
                problems.append("top reads like mid alone (its own data "
                                "was lost?)")
        rep.emit(name, problems)

    run_chain9(d, rep)
    run_short(d, rep)
    shutil.rmtree(d, ignore_errors=True)


def run_chain9(d: str, rep: harness.Report) -> None:
    """030 TestParallelOps: img0 (raw) <- img1 <- ... <- img8, 2 MiB; the odd
    layers, from the top down, hold 0xFF at 0k+256k, 512k+512k, 1024k+256k,
    1536k+512k. Each case streams one node of a fresh copy down to a base;
    the node and every node above it must read as before."""
    n = 9
    size = 2 * MiB
    orig = os.path.join(d, "chain9")
    os.makedirs(orig)
    imgs = [os.path.join(orig, "img0.raw")] + \
        [os.path.join(orig, f"img{i}.qcow2") for i in range(1, n)]
    try:
        dense_raw(imgs[0], size, 9)
        for i in range(1, n):
            corpus.create_qcow2(imgs[i], size, backing=imgs[i - 1],
                                backing_fmt="raw" if i == 1 else "qcow2",
                                relative=True)
        odd = [x for x in reversed(range(n)) if x % 2 == 1]
        for i, layer in enumerate(odd):
            kb = 256 + 256 * (i % 2)
            corpus.qemu_io(imgs[layer], "qcow2",
                           f"write -P 0xFF {i * 512}k {kb}k")
        # Even layers get a little data too, so that every layer matters.
        for layer in range(2, n, 2):
            corpus.qemu_io(imgs[layer], "qcow2",
                           f"write -P {corpus.pat(layer % 8, 3)} "
                           f"{layer * 192}k 64k")
    except corpus.CorpusError as x:
        rep.emit("qemu030/chain9/setup", [str(x)])
        return

    def paths(w: str) -> list[str]:
        return [os.path.join(w, os.path.basename(p)) for p in imgs]

    def fmt_of(i: int) -> str:
        return "raw" if i == 0 else "qcow2"

    def one(w: str, node: int, base: int | None) -> list[str]:
        p = paths(w)
        args = ["--base", p[base]] if base is not None else []
        problems, _ = stream_ok(p[node], args)
        if problems:
            return problems
        bname, bfull, bfmt = backing_of(p[node])
        if base is None:
            if bname is not None:
                problems.append(f"img{node} still has backing {bname!r}")
        elif not same_file(bfull, p[base]) or bfmt != fmt_of(base):
            problems.append(f"img{node} backing {bname!r} ({bfmt}), want "
                            f"img{base} ({fmt_of(base)})")
        rc, _, text = check(p[node])
        if rc != 0:
            problems.append(text)
        for i in range(node, n):
            c = compare(imgs[i], p[i])
            if c:
                problems.append(f"img{i} after streaming img{node}: {c}")
        return problems

    # The parallel set of 030 (node 2i from base 2i-2), done in sequence on
    # one copy, then sub-chains each on a fresh copy.
    name = "qemu030/chain9/parallel-set"
    if wanted(name):
        w = os.path.join(d, "c9-par")
        shutil.copytree(orig, w)
        problems = []
        for node in range(2, n, 2):
            problems += [f"img{node} --base img{node - 2}: {p}"
                         for p in one(w, node, node - 2)]
        rep.emit(name, problems)
        shutil.rmtree(w, ignore_errors=True)
    for node, base in ((8, 3), (8, 7), (8, 0), (8, None), (5, 1), (5, 0),
                       (4, None), (7, 2), (1, None), (2, 1)):
        name = f"qemu030/chain9/img{node}-base-" + \
            (f"img{base}" if base is not None else "none")
        if not wanted(name):
            continue
        w = os.path.join(d, f"c9-{node}-{base}")
        shutil.copytree(orig, w)
        problems = []
        if base is not None:
            # The map rules, for the node as the top of its own chain.
            om = Map(qmap(imgs[node]))
            problems += one(w, node, base)
            if not problems:
                problems += base_map_problems(om, Map(qmap(paths(w)[node])),
                                              size, 64 * KiB, node - base)
        else:
            problems += one(w, node, base)
        rep.emit(name, problems)
        shutil.rmtree(w, ignore_errors=True)


def run_short(d: str, rep: harness.Report) -> None:
    """Backing files smaller than the top."""
    # (a) qcow2 backing of 1 MiB under a 4 MiB top.
    name = "qemu030/short-backing"
    if wanted(name):
        w = os.path.join(d, "short-a")
        os.makedirs(w)
        try:
            b, t = os.path.join(w, "b.qcow2"), os.path.join(w, "t.qcow2")
            corpus.create_qcow2(b, 1 * MiB)
            corpus.qemu_io(b, "qcow2", "write -P 0x11 0 1M")
            corpus.create_qcow2(t, 4 * MiB, backing=b, relative=True)
            corpus.qemu_io(t, "qcow2", "write -P 0x12 3M 64k",
                           "write -P 0x13 960k 128k")
            o = os.path.join(w, "orig.qcow2")
            corpus.qemu_img("convert", "-O", "qcow2", t, o)
            problems, _ = stream_ok(t)
            if not problems:
                problems += verify_full(o, t)
                r = corpus.run(["qemu-io", "-f", "qcow2", "-c",
                                "read -P 0 1088k 1984k", "-c",
                                "read -P 0 3136k 960k", t], ok=(0, 1))
                if "pattern verification failed" in r.stdout + r.stderr:
                    problems.append("past the backing's end does not read "
                                    "zero")
        except corpus.CorpusError as x:
            problems = [str(x)]
        rep.emit(name, problems)

    # (b) a top grown past its backing with qemu-img resize.
    name = "qemu030/short-backing-resized-top"
    if wanted(name):
        w = os.path.join(d, "short-b")
        os.makedirs(w)
        try:
            b, t = os.path.join(w, "b.raw"), os.path.join(w, "t.qcow2")
            dense_raw(b, 1 * MiB + 4096, 21)
            corpus.create_qcow2(t, 1 * MiB + 4096, backing=b,
                                backing_fmt="raw", relative=True)
            corpus.qemu_io(t, "qcow2", "write -P 0x21 64k 64k")
            corpus.qemu_img("resize", "-q", t, "3M")
            corpus.qemu_io(t, "qcow2", "write -P 0x22 2M 4k")
            o = os.path.join(w, "orig.qcow2")
            corpus.qemu_img("convert", "-O", "qcow2", t, o)
            problems, _ = stream_ok(t)
            if not problems:
                problems += verify_full(o, t)
        except corpus.CorpusError as x:
            problems = [str(x)]
        rep.emit(name, problems)

    # (c) a short middle layer under --base: past its end the chain reads
    # zero, so once top points at base those clusters must be zero in top.
    name = "qemu030/short-mid-with-base"
    if wanted(name):
        w = os.path.join(d, "short-c")
        os.makedirs(w)
        try:
            b, m, t = (os.path.join(w, x) for x in ("b.qcow2", "m.qcow2",
                                                    "t.qcow2"))
            corpus.create_qcow2(b, 4 * MiB)
            corpus.qemu_io(b, "qcow2", "write -P 0x44 0 4M")
            corpus.create_qcow2(m, 1 * MiB, backing=b, relative=True)
            corpus.qemu_io(m, "qcow2", "write -P 0x55 0 512k")
            corpus.create_qcow2(t, 4 * MiB, backing=m, relative=True)
            corpus.qemu_io(t, "qcow2", "write -P 0x66 3M 64k")
            o = os.path.join(w, "orig.qcow2")
            corpus.qemu_img("convert", "-O", "qcow2", t, o)
            problems, _ = stream_ok(t, ["--base", b])
            if not problems:
                bname, bfull, _ = backing_of(t)
                if not same_file(bfull, b):
                    problems.append(f"backing {bname!r}, want {b!r}")
                rc, _, text = check(t)
                if rc != 0:
                    problems.append(text)
                c = compare(o, t)
                if c:
                    problems.append(c)
        except corpus.CorpusError as x:
            problems = [str(x)]
        rep.emit(name, problems)


# ---------------------------------------------------------------------------
# 4. Errors


def build_err_chain(d: str, size: int = 24 * MiB) -> tuple[str, str]:
    """base.raw (dense, incompressible) <- top.qcow2, relative name; top
    holds a few clusters (none at 512 KiB)."""
    os.makedirs(d)
    b, t = os.path.join(d, "base.raw"), os.path.join(d, "top.qcow2")
    dense_raw(b, size, 4)
    corpus.create_qcow2(t, size, backing=b, backing_fmt="raw", relative=True)
    corpus.qemu_io(t, "qcow2", "write -P 0x31 2M 64k",
                   "write -P 0x32 10M 128k", "write -z 12M 64k")
    return b, t


def after_failure(orig_top: str, top: str, r: harness.Result, fname: str,
                  words: tuple[str, ...]) -> tuple[list[str], dict]:
    """The common expectations on a stream that hit an I/O error."""
    problems: list[str] = []
    if r.crashed() or r.rc != 1:
        problems.append(f"want exit 1, got {r.rc}")
        problems.append(describe(r))
    low = r.err.lower()
    if fname.lower() not in low or not any(w.lower() in low for w in words):
        problems.append(f"the message should name {fname} and the error "
                        f"({' or '.join(words)}): {r.err.strip()!r}")
    ev = last_event(r)
    if ev.get("event") != "failed" or ev.get("finalized") is not False:
        problems.append(f"final JSON event: {ev}")
    rc, rep_, text = check(top)
    if rc not in (0, 3):
        problems.append(text)
    bname, _, _ = backing_of(top)
    if bname is None:
        problems.append("the backing reference was dropped")
    c = compare(orig_top, top)
    if c:
        problems.append(c)
    rep_["rc"] = rc
    return problems, rep_


def cursor_problems(top: str, ev: dict, cs: int) -> list[str]:
    """The engine's contract: every cluster below cur is local (or needs
    nothing). After a failure or an abort, the reported cur must not be past
    the first cluster that still reads data from the backing."""
    cur = ev.get("cur")
    if not isinstance(cur, int):
        return [f"no cursor in the final event: {ev}"]
    first = None
    for x in Map(qmap(top)).r:
        if x["depth"] >= 1 and x.get("present", True) and x["data"]:
            first = x["start"] // cs
            break
    if first is not None and cur > first:
        return [f"final event reports cur={cur} of {ev.get('end')} "
                f"({ev.get('percent')}%), but cluster {first} (offset "
                f"{first * cs}) still reads data from the backing: clusters "
                f"below cur must be local ({ev.get('bytes_copied')} bytes "
                f"copied)"]
    return []


def restart_after(orig_top: str, top: str, failed: dict,
                  strict: bool) -> list[str]:
    """A restart without the fault completes: no backing, identical. strict:
    check must exit 0 (the failure wrote nothing it did not link, so a
    completed stream must be clean); otherwise no more leaks than the failed
    run left."""
    problems, _ = stream_ok(top)
    if problems:
        return problems
    bname, _, _ = backing_of(top)
    if bname is not None:
        problems.append(f"still has a backing file {bname!r}")
    rc, got, text = check(top)
    if (strict and rc != 0) or rc not in (0, 3) or \
            got.get("leaks", 0) > failed.get("leaks", 0):
        problems.append(f"after the restart: {text}; the failed run left "
                        f"{failed.get('leaks', 0)} leaked clusters (check "
                        f"exit {failed.get('rc')})")
    c = compare(orig_top, top)
    if c:
        problems.append(c)
    return problems


def run_errors(tmp: str, rep: harness.Report) -> None:
    d = os.path.join(tmp, "errors")
    os.makedirs(d)
    orig = os.path.join(d, "orig")
    try:
        ob, ot = build_err_chain(orig)
    except corpus.CorpusError as x:
        rep.emit("errors/setup", [str(x)])
        return
    cs = 64 * KiB

    # (a) EIO reading the backing at 512 KiB, once.
    if wanted("errors/eio"):
        w = os.path.join(d, "eio")
        shutil.copytree(orig, w)
        t = os.path.join(w, "top.qcow2")
        r = srun(["stream", "--no-progress", "--output=json", t],
                 env={"SIPHON_FAULT": "read:base.raw:524288:4096:EIO:1"})
        problems, failed = after_failure(ot, t, r, "base.raw",
                                         ("Input/output error", "EIO"))
        # The stream stopped there: the failed cluster is not local.
        for x in Map(qmap(t)).pieces(512 * KiB, 512 * KiB + 4096):
            if is_local(x):
                problems.append(f"512 KiB is local after a failed read: "
                                f"{fmt_range(x)}")
        rep.emit("errors/eio-fails-cleanly", problems,
                 info=r.err.strip()[:120])
        rep.emit("errors/eio-cursor", cursor_problems(t, last_event(r), cs))
        if r.rc == 1:
            rep.emit("errors/eio-restart",
                     restart_after(ot, t, failed, strict=True))
        shutil.rmtree(w, ignore_errors=True)

    # (b) ENOSPC writing the top, injected from 2 MiB past its end: the
    # writes below succeed (and are linked), every write above fails.
    if wanted("errors/enospc-injected"):
        w = os.path.join(d, "enospc")
        shutil.copytree(orig, w)
        t = os.path.join(w, "top.qcow2")
        off = os.path.getsize(t) + 2 * MiB
        r = srun(["stream", "--no-progress", "--output=json", t],
                 env={"SIPHON_FAULT": f"write:top.qcow2:{off}:0:ENOSPC"})
        problems, failed = after_failure(ot, t, r, "top.qcow2",
                                         ("No space left", "ENOSPC"))
        rep.emit("errors/enospc-injected", problems,
                 info=r.err.strip()[:120])
        rep.emit("errors/enospc-injected-cursor",
                 cursor_problems(t, last_event(r), cs))
        if r.rc == 1:
            rep.emit("errors/enospc-injected-restart",
                     restart_after(ot, t, failed, strict=True))
        shutil.rmtree(w, ignore_errors=True)

    # (c) ENOSPC for real: the top on a 4 MiB tmpfs.
    if wanted("errors/enospc-tmpfs"):
        run_enospc_tmpfs(d, ob, ot, rep)
    shutil.rmtree(d, ignore_errors=True)


def run_enospc_tmpfs(d: str, ob: str, ot: str, rep: harness.Report) -> None:
    """The top on a 4 MiB tmpfs, its backing outside. After the failure the
    filesystem grows to what a clean stream of the same chain needs (its
    final file size) plus 4 MiB: a restart must fit in that."""
    name = "errors/enospc-tmpfs"
    mnt = os.path.join(d, "mnt")
    os.makedirs(mnt)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        rep.emit(name, [], skip="needs root to mount a small tmpfs")
        return
    # What a clean stream needs.
    ref = os.path.join(d, "ref")
    shutil.copytree(os.path.dirname(ot), ref)
    problems, _ = stream_ok(os.path.join(ref, "top.qcow2"))
    if problems:
        rep.emit(name, ["reference stream: " + x for x in problems])
        return
    need = os.path.getsize(os.path.join(ref, "top.qcow2"))
    shutil.rmtree(ref)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m",
                        "siphon-test", mnt], capture_output=True, text=True)
    if m.returncode != 0:
        rep.emit(name, [], skip=f"mount tmpfs failed: {m.stderr.strip()}")
        return
    try:
        t = os.path.join(mnt, "top.qcow2")
        shutil.copyfile(ot, t)
        # The backing stays outside the small filesystem.
        corpus.qemu_img("rebase", "-u", "-f", "qcow2", "-F", "raw", "-b",
                        ob, t)
        r = srun(["stream", "--no-progress", "--output=json", t])
        problems, failed = after_failure(ot, t, r, "top.qcow2",
                                         ("No space left", "ENOSPC"))
        rep.emit(name, problems, info=r.err.strip()[:120])
        rep.emit(name + "-cursor", cursor_problems(t, last_event(r),
                                                   64 * KiB))
        if r.rc == 1:
            size = (need + 4 * MiB) // KiB
            g = subprocess.run(["mount", "-o", f"remount,size={size}k", mnt],
                               capture_output=True, text=True)
            if g.returncode != 0:
                rep.emit(name + "-restart", [], skip="remount failed: " +
                         g.stderr.strip())
            else:
                problems = restart_after(ot, t, failed, strict=False)
                if problems:
                    problems.append(
                        f"the filesystem was grown to {size} KiB: a clean "
                        f"stream of this chain ends with a {need // KiB} "
                        f"KiB file; the failed run left "
                        f"{failed.get('leaks', 0)} leaked clusters")
                rep.emit(name + "-restart", problems,
                         info=f"fs grown to {size} KiB")
    except corpus.CorpusError as x:
        rep.emit(name, [str(x)])
    finally:
        u = subprocess.run(["umount", mnt], capture_output=True)
        if u.returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)


# ---------------------------------------------------------------------------
# 5. Abort and resume


def run_abort(tmp: str, rep: harness.Report) -> None:
    name = "abort/sigint-then-resume"
    if not wanted(name):
        return
    d = os.path.join(tmp, "abort")
    try:
        ob, ot = build_err_chain(os.path.join(d, "orig"), 16 * MiB)
    except corpus.CorpusError as x:
        rep.emit(name, [str(x)])
        return
    # What a whole run copies.
    ref = os.path.join(d, "ref")
    shutil.copytree(os.path.join(d, "orig"), ref)
    problems, full = stream_ok(os.path.join(ref, "top.qcow2"))
    if problems:
        rep.emit(name, ["reference run: " + p for p in problems])
        return
    w = os.path.join(d, "w")
    shutil.copytree(os.path.join(d, "orig"), w)
    t = os.path.join(w, "top.qcow2")
    env = dict(os.environ)
    env.pop("SIPHON_FAULT", None)
    # Human output: the abort message goes to stderr.
    p = subprocess.Popen([SIPHON, "stream", "--no-progress", "--speed", "4M",
                          t], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env)
    time.sleep(0.5)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    stop = time.monotonic() - t0
    r = harness.Result(p.args, p.returncode, out, err.decode(errors="replace"))
    problems = []
    if r.rc != 130:
        problems += [f"want exit 130 after SIGINT, got {r.rc}", describe(r)]
    m = re.search(r"aborted at [0-9.]+% \(cluster (\d+) of (\d+)\)", r.err)
    if not m:
        problems.append(f"no 'aborted at N% (cluster C of E)' message: "
                        f"{r.err.strip()!r}")
    elif not 0 < int(m.group(1)) < int(m.group(2)):
        problems.append(f"aborted at cluster {m.group(1)} of "
                        f"{m.group(2)}: not a partial run")
    rc, _, text = check(t)
    if rc != 0:
        problems.append(text)
    bname, _, _ = backing_of(t)
    if bname is None:
        problems.append("the backing reference was dropped by an abort")
    c = compare(ot, t)
    if c:
        problems.append(c)
    rep.emit(name, problems,
             info=f"stopped in {stop:.2f} s: {r.err.strip()[:90]}")

    # The resume skips what the aborted run copied, and copies the rest
    # only: the extra bytes skipped are exactly the bytes not copied again.
    name2 = "abort/resume-skips-local"
    problems, ev2 = stream_ok(t)
    if not problems:
        problems += verify_full(ot, t)
        gained = ev2.get("bytes_skipped", 0) - full.get("bytes_skipped", 0)
        saved = full.get("bytes_copied", 0) - ev2.get("bytes_copied", 0)
        if not gained > 0:
            problems.append(f"resume reports {ev2.get('bytes_skipped')} "
                            f"bytes already local; a whole run finds "
                            f"{full.get('bytes_skipped')}: the aborted "
                            f"run's work was not kept")
        elif gained != saved:
            problems.append(f"resume skipped {gained} more bytes than a "
                            f"whole run but copied {saved} fewer")
    rep.emit(name2, problems,
             info=f"skipped {ev2.get('bytes_skipped', 0) // KiB} KiB, "
                  f"copied {ev2.get('bytes_copied', 0) // KiB} KiB")

    # The same abort in JSON mode ends with an "aborted" event.
    name3 = "abort/json-aborted-event"
    w = os.path.join(d, "w3")
    shutil.copytree(os.path.join(d, "orig"), w)
    t = os.path.join(w, "top.qcow2")
    p = subprocess.Popen([SIPHON, "stream", "--output=json", "--speed", "8M",
                          t], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env)
    time.sleep(0.4)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    r = harness.Result(p.args, p.returncode, out, err.decode(errors="replace"))
    events, problems = json_lines(r)
    ev = events[-1] if events else {}
    if r.rc != 130:
        problems.append(f"want exit 130, got {r.rc}")
    if ev.get("event") != "aborted" or ev.get("finalized") is not False or \
            not 0 < ev.get("cur", 0) < ev.get("end", 0) or \
            "aborted at" not in str(ev.get("error", "")):
        problems.append(f"final event: {ev}")
    problems += cursor_problems(t, ev, 64 * KiB)
    c = compare(ot, t)
    if c:
        problems.append(c)
    if problems:
        problems.append(describe(r))
    rep.emit(name3, problems)
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# 6, 7. Speed limit, --output=json


def json_stream_problems(r: harness.Result, size: int, cs: int) -> list[str]:
    events, problems = json_lines(r)
    if not events:
        return problems + ["no JSON output"]
    kinds = [e["event"] for e in events]
    if kinds[-1] != "done" or kinds.count("done") != 1 or \
            any(k != "progress" for k in kinds[:-1]):
        problems.append(f"want progress events then one done, got {kinds}")
    prog = [e for e in events if e["event"] == "progress"]
    if not prog:
        problems.append("no progress event")
    prev = None
    for e in events:
        for k in ("cur", "end", "percent", "bytes_copied", "bytes_skipped",
                  "bytes_zero", "rate", "seconds"):
            if not isinstance(e.get(k), (int, float)):
                problems.append(f"event without numeric {k}: {e}")
                return problems
        if prev and (e["cur"] < prev["cur"] or
                     e["bytes_copied"] < prev["bytes_copied"]):
            problems.append(f"counters went backwards: {prev} -> {e}")
        prev = e
    done = events[-1]
    end = -(-size // cs)
    if done.get("cur") != done.get("end") or done.get("end") != end or \
            done.get("percent") != 100 or done.get("finalized") is not True:
        problems.append(f"done event: want cur == end == {end}, 100%, "
                        f"finalized: {done}")
    total = done["bytes_copied"] + done["bytes_skipped"] + done["bytes_zero"]
    if total != end * cs:
        problems.append(f"copied + skipped + zero = {total}, want "
                        f"{end * cs}")
    return problems


def run_speed(tmp: str, rep: harness.Report) -> None:
    d = os.path.join(tmp, "speed")
    os.makedirs(d)
    size, rate, extent = 8 * MiB, 4 * MiB, 1 * MiB
    b = os.path.join(d, "base.raw")
    dense_raw(b, size, 66)

    def top(tag: str, local: bool) -> str:
        t = os.path.join(d, f"{tag}.qcow2")
        corpus.create_qcow2(t, size, backing=b, backing_fmt="raw",
                            relative=True)
        if local:   # every other MiB already in the top
            corpus.qemu_io(t, "qcow2", *[f"write -P 0x5{i} {i}M 1M"
                                         for i in range(0, 8, 2)])
        return t

    name = "speed/limit-honoured+json"
    if wanted(name):
        t = top("a", False)
        t0 = time.monotonic()
        # No --no-progress: with --output=json it silences progress events.
        r = srun(["stream", "--output=json", "--speed", "4M", t])
        el = time.monotonic() - t0
        problems = [] if r.rc == 0 else [describe(r)]
        low = (size - extent) / rate
        if el < 0.95 * low:
            problems.append(f"{size} bytes at {rate} B/s took {el:.2f} s, "
                            f"want >= {low:.2f} s")
        if el > size / rate + 4:
            problems.append(f"took {el:.2f} s, far above {size / rate} s")
        problems += json_stream_problems(r, size, 64 * KiB)
        events, _ = json_lines(r)
        nprog = sum(1 for e in events if e.get("event") == "progress")
        if nprog < 2:
            problems.append(f"{nprog} progress event(s) in {el:.1f} s")
        fast = [e["rate"] for e in events if e.get("rate", 0) > 2.5 * rate]
        if fast:
            problems.append(f"reported rates {fast} exceed the limit "
                            f"{rate} by far")
        if events and events[-1].get("bytes_copied") != size:
            problems.append(f"copied {events[-1].get('bytes_copied')}, "
                            f"want {size}")
        problems += verify_full(b, t, "raw")
        rep.emit(name, problems, info=f"{size // MiB} MiB at "
                 f"{rate // MiB} MiB/s in {el:.2f} s; {nprog} progress "
                 f"events")

    name = "speed/counts-copied-not-skipped"
    if wanted(name):
        t = top("b", True)
        o = os.path.join(d, "b-orig.qcow2")
        shutil.copyfile(t, o)
        t0 = time.monotonic()
        r = srun(["stream", "--no-progress", "--output=json", "--speed",
                  "4M", t])
        el = time.monotonic() - t0
        problems = [] if r.rc == 0 else [describe(r)]
        copied = size // 2
        low, high = (copied - extent) / rate, (size - extent) / rate
        if el < 0.95 * low:
            problems.append(f"{copied} bytes at {rate} B/s took {el:.2f} s,"
                            f" want >= {low:.2f} s")
        if el > 0.85 * high:
            problems.append(f"took {el:.2f} s: skipped bytes seem to count "
                            f"against the limit ({high:.2f} s if they did)")
        problems += json_stream_problems(r, size, 64 * KiB)
        problems += verify_full(o, t)
        rep.emit(name, problems, info=f"{el:.2f} s")

    # Single local clusters, which extents read over: the planner meets
    # them again each time the limit makes it wait, and they are still
    # counted once (copied + skipped + zero is the image's size).
    name = "speed/scattered-local-counted-once"
    if wanted(name):
        t = os.path.join(d, "e.qcow2")
        corpus.create_qcow2(t, size, backing=b, backing_fmt="raw",
                            relative=True)
        corpus.qemu_io(t, "qcow2", *[f"write -P 0x6{i % 10} {i * 640}K 64K"
                                     for i in range(size // (640 * KiB))])
        o = os.path.join(d, "e-orig.qcow2")
        shutil.copyfile(t, o)
        r = srun(["stream", "--no-progress", "--output=json", "--speed",
                  "8M", t])
        problems = [] if r.rc == 0 else [describe(r)]
        problems += json_stream_problems(r, size, 64 * KiB)
        problems += verify_full(o, t)
        rep.emit(name, problems)

    name = "speed/unlimited"
    if wanted(name):
        t = top("c", False)
        t0 = time.monotonic()
        problems, _ = stream_ok(t, ["--speed", "0", "--queue-depth", "3",
                                    "--extent-size", "192K"])
        el = time.monotonic() - t0
        problems += verify_full(b, t, "raw")
        rep.emit(name, problems, info=f"{el:.2f} s")
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# 7b. The pipeline: large requests over scattered local clusters, reported

PIPE_FIELDS = ("inflight_bytes", "window_bytes", "request_bytes",
               "device_rate", "latency_us", "read_request_bytes",
               "write_request_bytes")


def run_pipeline(tmp: str, rep: harness.Report) -> None:
    d = os.path.join(tmp, "pipeline")
    os.makedirs(d)
    size, cs = 16 * MiB, 64 * KiB
    b = os.path.join(d, "base.raw")
    dense_raw(b, size, 77)

    def top(tag: str) -> tuple[str, str]:
        t = os.path.join(d, f"{tag}.qcow2")
        corpus.create_qcow2(t, size, backing=b, backing_fmt="raw",
                            relative=True)
        # Every tenth cluster already local: runs of 9 to copy.
        corpus.qemu_io(t, "qcow2", *[f"write -P 0x3{i % 10} {i * cs} {cs}"
                                     for i in range(0, size // cs, 10)])
        o = os.path.join(d, f"{tag}-orig.qcow2")
        shutil.copyfile(t, o)
        return t, o

    name = "pipeline/reads-over-local-clusters"
    if wanted(name):
        t, o = top("a")
        problems, ev = stream_ok(t, ["--extent-size", "1M"])
        for k in PIPE_FIELDS:
            if not isinstance(ev.get(k), int):
                problems.append(f"done event without integer {k}: {ev}")
        if not problems:
            # 1 MiB extents read over the local cluster inside them and
            # write their runs as one request: no 576 KiB pieces.
            for k in ("read_request_bytes", "write_request_bytes"):
                if ev[k] < 768 * KiB:
                    problems.append(f"{k} {ev[k]}: the local clusters "
                                    f"split the requests (want >= 768 KiB "
                                    f"with 1 MiB extents)")
            if ev["request_bytes"] != MiB:
                problems.append(f"request_bytes {ev['request_bytes']}, "
                                f"want the fixed 1 MiB")
        problems += verify_full(o, t)
        rep.emit(name, problems, info=f"reads {ev.get('read_request_bytes')}"
                 f" B, writes {ev.get('write_request_bytes')} B on average")

    name = "pipeline/adaptive-within-buffer-size"
    if wanted(name):
        # 64 MiB: enough completions for the controller's startup to grow
        # its window past one 1 MiB extent when nothing bounds it.
        big = os.path.join(d, "base64.raw")
        dense_raw(big, 64 * MiB, 78)
        t = os.path.join(d, "b.qcow2")
        corpus.create_qcow2(t, 64 * MiB, backing=big, backing_fmt="raw",
                            relative=True)
        bound = 1 * MiB
        r = srun(["stream", "--output=json", "--buffer-size", "1M", t])
        problems = [] if r.rc == 0 else [describe(r)]
        problems += json_stream_problems(r, 64 * MiB, cs)
        events, _ = json_lines(r)
        ev = events[-1] if events else {}
        for e in events:
            for k in PIPE_FIELDS:
                if not isinstance(e.get(k), int):
                    problems.append(f"event without integer {k}: {e}")
                    break
        if not problems:
            # The memory bound holds at every report, whatever the
            # controller chose; it chose a size of its range.
            for e in events:
                if e["inflight_bytes"] > bound or \
                        e["window_bytes"] > bound or \
                        e["request_bytes"] > bound:
                    problems.append(f"past --buffer-size {bound}: {e}")
                    break
            rb = ev["request_bytes"]
            if rb < 256 * KiB or rb & (rb - 1):
                problems.append(f"request_bytes {rb}: want a power of two "
                                f">= 256 KiB")
            if ev["window_bytes"] < rb:
                problems.append(f"window {ev['window_bytes']} below one "
                                f"extent {rb}")
            if ev["inflight_bytes"] != 0:
                problems.append(f"{ev['inflight_bytes']} bytes in flight "
                                f"after the end")
        problems += verify_full(big, t, "raw")
        rep.emit(name, problems, info=f"window {ev.get('window_bytes')} B, "
                 f"extent {ev.get('request_bytes')} B")
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# 8. Crash: SIGKILL at random moments


def build_crash_chain(d: str) -> str:
    """base.raw (16 MiB, incompressible, a hole) <- mid.qcow2 (data, zeros,
    4k clusters) <- top.qcow2 (some data). Relative names."""
    os.makedirs(d)
    size = 16 * MiB
    b, m, t = (os.path.join(d, n) for n in ("base.raw", "mid.qcow2",
                                           "top.qcow2"))
    rnd = random.Random(88)
    corpus.write_raw(b, size, [(0, rnd.randbytes(10 * MiB)),
                               (12 * MiB, rnd.randbytes(4 * MiB))])
    corpus.create_qcow2(m, size, "cluster_size=4k", backing=b,
                        backing_fmt="raw", relative=True)
    corpus.qemu_io(m, "qcow2", "write -P 0x61 1M 1M", "write -z 4M 256k",
                   "write -P 0x62 13M 12k")
    corpus.create_qcow2(t, size, backing=m, relative=True)
    corpus.qemu_io(t, "qcow2", "write -P 0x71 0 64k", "write -P 0x72 5M 1M",
                   "write -z 12M 64k")
    return t


def wait_lock_release(path: str) -> float:
    """A SIGKILLed process's io_uring is torn down asynchronously by the
    kernel and may keep the file, and its OFD locks, a moment longer (see
    test_lock.py). Wait until qemu can take the lock; the seconds waited."""
    t0 = time.monotonic()
    for _ in range(60):
        r = harness.run(["qemu-img", "info", path])
        if "lock" not in r.err:
            break
        time.sleep(0.05)
    return time.monotonic() - t0 if time.monotonic() - t0 > 0.2 else 0.0


def run_crash(tmp: str, rep: harness.Report) -> None:
    if not wanted("crash/"):
        return
    d = os.path.join(tmp, "crash")
    orig = os.path.join(d, "orig")
    try:
        ot = build_crash_chain(orig)
    except corpus.CorpusError as x:
        rep.emit("crash/setup", [str(x)])
        return
    env = dict(os.environ)
    env.pop("SIPHON_FAULT", None)
    variants = [[], ["--extent-size", "64k", "--queue-depth", "2"],
                ["--speed", "48M"], ["--extent-size", "256k"]]
    # Calibrate each variant's whole-run time.
    times = []
    for v in variants:
        w = os.path.join(d, "cal")
        shutil.copytree(orig, w)
        t0 = time.monotonic()
        problems, _ = stream_ok(os.path.join(w, "top.qcow2"), v)
        times.append(time.monotonic() - t0)
        shutil.rmtree(w)
        if problems:
            rep.emit("crash/calibrate", problems)
            return
    rnd = random.Random(SEED)
    for i in range(KILLS):
        name = f"crash/{i:02d}"
        w = os.path.join(d, f"run{i}")
        shutil.copytree(orig, w)
        t = os.path.join(w, "top.qcow2")
        vi = rnd.randrange(len(variants))
        pre = ""
        problems: list[str] = []
        if rnd.random() < 0.3:
            # Resume an aborted stream: part of the image is committed.
            p = subprocess.Popen([SIPHON, "stream", "--no-progress",
                                  "--speed", "8M", t], env=env,
                                 stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            time.sleep(rnd.uniform(0.2, 0.8))
            p.send_signal(signal.SIGINT)
            p.wait(timeout=30)
            pre = f"after an abort (exit {p.returncode}), "
        # Nothing is committed before the end (or before flush_bytes):
        # favour the end, where the metadata and the header are written.
        delay = rnd.uniform(0.0, times[vi]) if rnd.random() < 0.3 else \
            rnd.uniform(0.6 * times[vi], 1.15 * times[vi])
        p = subprocess.Popen([SIPHON, "stream", "--no-progress",
                              *variants[vi], t], env=env,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=30)
        state = "killed" if p.returncode == -signal.SIGKILL else \
            f"exited {p.returncode} first"
        if p.returncode not in (0, -signal.SIGKILL):
            problems.append(f"stream exit {p.returncode}: "
                            f"{err.decode(errors='replace')}")
        waited = wait_lock_release(t)
        rc, srep, text = check(t)
        if rc not in (0, 3):
            problems.append("survivor: " + text)
        c = compare(ot, t)
        if c:
            problems.append("survivor: " + c)
        survivor = text
        leaks = srep.get("leaks", 0)
        if leaks:
            state += f", {leaks} leaked clusters"
        if rc in (0, 3):
            more, _ = stream_ok(t)
            problems += ["restart: " + x for x in more]
            if not more:
                # The restart repairs what the kill leaked (the dirty
                # bit marks a writer that did not close): check exits 0.
                problems += ["restart: " + x for x in verify_full(ot, t)]
        if problems:
            problems.append(f"{pre}{state} after {delay:.3f} s (run "
                            f"{' '.join(variants[vi]) or 'default'}); "
                            f"survivor {survivor}")
        if problems and os.environ.get("SIPHON_KEEP"):
            keep = os.path.join(os.environ["SIPHON_KEEP"], f"crash-{i}")
            shutil.copytree(w, keep, dirs_exist_ok=True)
            problems.append(f"kept in {keep}")
        if waited:
            state += f", lock released {waited:.2f} s later"
        rep.emit(name, problems, info=f"{pre}{state} after {delay:.3f} s "
                 f"(run {' '.join(variants[vi]) or 'default'}, whole "
                 f"{times[vi]:.3f} s)")
        shutil.rmtree(w, ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# 9. Usage errors


def run_usage(tmp: str, rep: harness.Report) -> None:
    d = os.path.join(tmp, "usage")
    os.makedirs(d)
    try:
        b = os.path.join(d, "b.qcow2")
        t = os.path.join(d, "t.qcow2")
        other = os.path.join(d, "other.qcow2")
        corpus.create_qcow2(b, 1 * MiB)
        corpus.qemu_io(b, "qcow2", "write -P 0x9 0 1M")
        corpus.create_qcow2(t, 1 * MiB, backing=b, relative=True)
        corpus.create_qcow2(other, 1 * MiB)
    except corpus.CorpusError as x:
        rep.emit("usage/setup", [str(x)])
        return
    missing = os.path.join(d, "nonexistent.qcow2")
    cases = [
        ("bad-speed-word", ["--speed", "fast", t], 2, ("speed",)),
        ("bad-speed-negative", ["--speed", "-5M", t], 2, ("speed",)),
        ("bad-speed-suffix", ["--speed", "10X", t], 2, ("speed",)),
        ("bad-speed-empty", ["--speed", "", t], 2, ("speed",)),
        ("bad-queue-depth", ["--queue-depth", "0", t], 2, ("queue-depth",)),
        ("bad-extent-size", ["--extent-size", "100", t], 2,
         ("extent-size",)),
        ("bad-buffer-size", ["--buffer-size", "64K", t], 2,
         ("buffer-size",)),
        ("bad-output", ["--output=xml", t], 2, ("output", "xml")),
        ("unknown-option", ["--frobnicate", t], 2, ("option", "frobnicate")),
        ("missing-image", [], 2, ("image",)),
        ("two-images", [t, b], 2, ("image",)),
        ("base-not-in-chain", ["--base", other, t], 1,
         ("not in the backing chain", "not in")),
        ("base-is-top", ["--base", t, t], 1, ("not in",)),
        ("base-missing", ["--base", missing, t], 1,
         ("nonexistent.qcow2",)),
        ("base-without-backing", ["--base", b, other], 1, ("not in",)),
        ("image-missing", [missing], 1, ("nonexistent.qcow2",)),
    ]
    before = {p: file_hash(p) for p in (b, t, other)}
    for tag, args, want, words in cases:
        name = f"usage/{tag}"
        if not wanted(name):
            continue
        r = srun(["stream", "--no-progress", *args])
        problems = []
        if r.crashed() or r.rc != want:
            problems.append(f"want exit {want}, got {r.rc}")
        low = r.err.lower()
        if not low.startswith("siphon") or \
                not any(w.lower() in low for w in words):
            problems.append(f"message should start with 'siphon' and say "
                            f"one of {words}: {r.err.strip()!r}")
        changed = [os.path.basename(p) for p, h in before.items()
                   if file_hash(p) != h]
        if changed:
            problems.append(f"modified {changed}")
            before = {p: file_hash(p) for p in (b, t, other)}
        if problems:
            problems.append(describe(r))
        rep.emit(name, problems, info=r.err.strip().splitlines()[0][:90]
                 if r.err.strip() else None)
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------


def main() -> int:
    global SIPHON
    with tempfile.TemporaryDirectory(prefix="siphon-stream-",
                                     dir=os.environ.get("TMPDIR")) as tmp:
        SIPHON = harness.preflight(tmp)
        rep = harness.Report()
        t0 = time.monotonic()
        for section in (run_usage, run_corpus, run_qemu030, run_errors,
                        run_abort, run_speed, run_pipeline, run_crash):
            try:
                section(tmp, rep)
            except Exception as x:  # a bug in a section: report, go on
                import traceback
                rep.emit(f"{section.__name__}/internal",
                         [traceback.format_exc()])
            if VERBOSE:
                print(f"# {section.__name__} done at "
                      f"{time.monotonic() - t0:.1f} s", flush=True)
        return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
