#!/usr/bin/env python3
"""Streaming throughput: siphon against qemu and against the device limit.

Builds a matrix of chains and measures every method on each, in one run,
several repetitions each, with the page cache dropped before every timed run
(when root). A chain is a base of incompressible data, raw or qcow2 (qemu-img
convert of the raw one), under a qcow2 overlay that is empty (everything to
move) or already holds every tenth cluster (90% to move):

  fio-seq            fio reads the bytes that must move, then writes them
  fio-both           fio reading and writing those bytes together
                     (both: O_DIRECT, 1 MiB, --fio-depth, io_uring, fsync)
  qsd-stream         qemu-storage-daemon block-stream, its default options
  qsd-stream-direct  the same with cache.direct=on,aio=io_uring on every file
  img-rebase         qemu-img rebase -f qcow2 -b '' -t none -T none
  img-convert        qemu-img convert -O qcow2 -t none -T none
  siphon             siphon stream (with --siphon-args)
  siphon-ref         another build (--siphon-ref), e.g. the previous
                     commit's, to compare two versions in one run

The fio rows move exactly the bytes the stream moves on that chain. Every
siphon and qemu result is checked with qemu-img compare (against the
original chain) and qemu-img check. Prints per chain a table of median
seconds, spread and MiB/s, the ratios the issue sets as targets and siphon's
peak RSS (/usr/bin/time -v), then the ratios of every chain side by side.
--json writes every timing and median. With --sparse-tib, also streams a
1 TiB overlay over a sparse raw base holding the same amount of data.

Usage: bench/stream_bench.py [--size 2G[,4G]] [--cluster-size 64k]
       [--reps 3] [--base-format raw|qcow2|both] [--layout tenth|empty|both]
       [--chains tenth:2G,empty:2G,...] [--fio-depth 32]
       [--siphon build/tools/siphon] [--siphon-args "-q 32 -e 2M"]
       [--siphon-ref OTHER/build/tools/siphon] [--only ROW,...]
       [--json FILE] [--sparse-tib] [--dir /var/tmp/siphon-bench]
"""
import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import (BASE_FORMATS, LAYOUTS, MiB, bytes_to_move,
                      default_siphon, drop_caches, human, make_overlay,
                      make_qcow2_base, make_raw_base, need_tools, parse_size,
                      rss_kib, run, timed, verify, warn_if_warm)

ROWS = ("fio-seq", "fio-both", "qsd-stream", "qsd-stream-direct",
        "img-rebase", "img-convert", "siphon", "siphon-ref")

# (peer, target for peer's time / siphon's time), issue 11's list first.
TARGETS = (("fio-both", 0.9), ("img-rebase", 1.5), ("qsd-stream", 1.5),
           ("qsd-stream-direct", 1.5), ("fio-seq", 0.9),
           ("siphon-ref", 1.0))

RSS_TARGET_MIB = 64


def fresh_top(d, pristine):
    top = os.path.join(d, "top.qcow2")
    shutil.copyfile(pristine, top)
    return top


def qmp(sock_path):
    """Connect to a QMP socket: (socket, cmd(name, **args), event(name))."""
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(sock_path)
            break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    backlog = []

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "error" in msg:
                raise RuntimeError("QMP %s: %s" % (name, msg["error"]))
            if "return" in msg:
                return msg
            backlog.append(msg)

    def event(name):
        while True:
            msg = backlog.pop(0) if backlog else json.loads(f.readline())
            if msg.get("event") == name:
                return msg
    return s, cmd, event


def qsd_blockdevs(top, base, base_fmt, direct):
    """--blockdev arguments: the top alone, its backing opened by qemu from
    the header with default options; or, direct, every file node explicit
    with cache.direct=on,aio=io_uring."""
    if not direct:
        return ["--blockdev", "driver=file,filename=%s,node-name=file0" % top,
                "--blockdev", "driver=qcow2,file=file0,node-name=top0"]
    fast = "cache.direct=on,aio=io_uring"
    return ["--blockdev", "driver=file,filename=%s,node-name=bfile0,"
            "read-only=on,%s" % (base, fast),
            "--blockdev", "driver=%s,file=bfile0,node-name=base0,"
            "read-only=on" % base_fmt,
            "--blockdev", "driver=file,filename=%s,node-name=file0,%s" %
            (top, fast),
            "--blockdev", "driver=qcow2,file=file0,node-name=top0,"
            "backing=base0"]


def run_qsd(d, top, base, base_fmt, direct):
    """Seconds from block-stream to the daemon's exit after quit (its close
    flushes what the page cache still holds: the data is on disk)."""
    return qsd_stream_time(d, qsd_blockdevs(top, base, base_fmt, direct))


def qsd_stream_time(d, blockdevs, timeout=600):
    """qemu-storage-daemon with blockdevs (the overlay's node is top0):
    seconds from block-stream to the daemon's exit after quit."""
    sock = os.path.join(d, "qmp.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    drop_caches()
    p = subprocess.Popen([
        "qemu-storage-daemon",
        "--chardev", "socket,path=%s,server=on,wait=off,id=qmp0" % sock,
        "--monitor", "chardev=qmp0"] + blockdevs,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        s, cmd, event = qmp(sock)
        cmd("qmp_capabilities")
        t = time.monotonic()
        cmd("block-stream", **{"job-id": "s0", "device": "top0"})
        ev = event("BLOCK_JOB_COMPLETED")
        if "error" in ev.get("data", {}):
            raise RuntimeError("block-stream: " + ev["data"]["error"])
        cmd("quit")
        s.close()
        p.wait(timeout=timeout)
        el = time.monotonic() - t
    finally:
        if p.poll() is None:
            p.kill()
        err = p.communicate()[1]
    if p.returncode != 0:
        raise RuntimeError("qemu-storage-daemon failed: " + err.strip())
    return el


def fio_jobs(prefix, rw, path, nbytes):
    """Job options moving exactly nbytes of path: 1 MiB requests, and a job
    of one smaller request for a tail (fio rounds sizes down to bs)."""
    whole = nbytes // MiB * MiB
    tail = nbytes - whole
    jobs = []
    if whole:
        jobs += ["--name=" + prefix, "--rw=" + rw, "--filename=" + path,
                 "--bs=1M", "--size=%d" % whole]
    if tail:
        # its own file when writing: fio may truncate a file it lays out
        tpath = path if rw == "read" else path + ".tail"
        jobs += ["--name=%s-tail" % prefix, "--rw=" + rw,
                 "--filename=" + tpath, "--bs=%d" % tail,
                 "--size=%d" % tail,
                 "--offset=%d" % (whole if rw == "read" else 0)]
    return jobs


def fio_run(jobs, depth):
    """Run one fio process: (bytes read, bytes written, seconds of its
    longest job as fio reports it) from its JSON report."""
    p = run(["fio", "--ioengine=io_uring", "--direct=1",
             "--iodepth=%d" % depth, "--end_fsync=1",
             "--output-format=json"] + jobs)
    rep = json.loads(p.stdout[p.stdout.index("{"):])
    return (sum(j["read"]["io_bytes"] for j in rep["jobs"]),
            sum(j["write"]["io_bytes"] for j in rep["jobs"]),
            max(j["job_runtime"] for j in rep["jobs"]) / 1000.0)


def fio_copy(d, src, nbytes, depth, together):
    """Read nbytes of src and write nbytes to a new file, together
    (fio-both) or read then write (fio-seq): (wall seconds, fio's own
    runtime). The wall time includes fio's start (about 0.4 s)."""
    dst = os.path.join(d, "fio.dst")
    r = fio_jobs("r", "read", src, nbytes)
    w = fio_jobs("w", "write", dst, nbytes)
    drop_caches()
    t = time.monotonic()
    if together:
        got_r, got_w, own = fio_run(r + w, depth)
    else:
        got_r, _, own_r = fio_run(r, depth)
        _, got_w, own_w = fio_run(w, depth)
        own = own_r + own_w
    el = time.monotonic() - t
    for f in (dst, dst + ".tail"):
        if os.path.exists(f):
            os.unlink(f)
    if got_r != nbytes or got_w != nbytes:
        raise RuntimeError("fio moved %d/%d bytes, not %d" %
                           (got_r, got_w, nbytes))
    return el, own


def siphon_stream(binary, extra, top):
    """Time one siphon stream: (seconds, peak RSS KiB, bytes it copied)."""
    el, p = timed(["/usr/bin/time", "-v", binary, "stream", "--output=json",
                   "--no-progress"] + extra + [top])
    copied = -1
    for line in p.stdout.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "done":
            copied = ev.get("bytes_copied", -1)
    return el, rss_kib(p.stderr), copied


class Chain:
    """One chain of the matrix and what was measured on it."""

    def __init__(self, base_fmt, layout, size, cs, sparse_total=None):
        self.base_fmt, self.layout, self.size = base_fmt, layout, size
        self.cs = cs
        self.sparse_total = sparse_total
        self.moved = bytes_to_move(size, cs, layout)
        self.times = {}     # row: [seconds]
        self.ok = {}        # row: [verified]
        self.rss = {}       # row: peak RSS KiB over the repetitions
        self.copied = {}    # row: [bytes siphon reported copying]
        self.fio_runtime = {}  # row: [seconds fio reported for its jobs]

    @property
    def name(self):
        if self.sparse_total:
            return "%s/%s/%s-sparse" % (self.base_fmt, self.layout,
                                        human(self.sparse_total))
        return "%s/%s/%s" % (self.base_fmt, self.layout, human(self.size))

    def record(self, row, secs, ok=True):
        self.times.setdefault(row, []).append(secs)
        self.ok.setdefault(row, []).append(ok)
        print("  %-22s %-18s %8.3f s%s" % (self.name, row, secs,
                                           "" if ok else "  VERIFY FAILED"),
              flush=True)

    def medians(self):
        return {r: statistics.median(v) for r, v in self.times.items()}

    def verified(self, *rows):
        """Every repetition of these rows passed compare and check."""
        return all(all(self.ok.get(r, [])) for r in rows)

    def failed(self):
        return any(not all(v) for v in self.ok.values())

    def ratios(self):
        """peer median / siphon median, for each peer measured."""
        med = self.medians()
        if "siphon" not in med:
            return {}
        return {peer: med[peer] / med["siphon"]
                for peer, _ in TARGETS if peer in med}

    def to_json(self):
        med = self.medians()
        return {
            "name": self.name, "base_format": self.base_fmt,
            "layout": self.layout, "size": self.size,
            "virtual_size": self.sparse_total or self.size,
            "cluster_size": self.cs, "bytes_to_move": self.moved,
            "rows": {r: {"seconds": v, "verified": self.ok[r],
                         "median": med[r], "spread": max(v) - min(v),
                         "mib_s": self.moved / MiB / med[r]}
                     for r, v in self.times.items()},
            "ratios": self.ratios(),
            "peak_rss_kib": self.rss,
            "bytes_copied": self.copied,
            "fio_runtime": self.fio_runtime,
        }


def bench_chain(a, d, ch, base, want):
    """All repetitions of the wanted rows on one chain (base already made)."""
    siphon = os.path.abspath(a.siphon)
    extra = shlex.split(a.siphon_args)
    pristine = os.path.join(d, "top.pristine.qcow2")
    make_overlay(pristine, base, ch.base_fmt, ch.size, ch.cs, ch.layout)
    # fio reads the raw base: the same random bytes, as many as move
    raw = os.path.join(d, "base.raw")

    def stream(row, binary, args):
        top = fresh_top(d, pristine)
        el, rss, copied = siphon_stream(binary, args, top)
        ch.rss[row] = max(ch.rss.get(row, 0), rss)
        ch.copied.setdefault(row, []).append(copied)
        ch.record(row, el, verify(d, top, pristine))
        if copied >= 0 and copied != ch.moved:
            print("  note: %s copied %d bytes, the chain has %d to move" %
                  (row, copied, ch.moved))

    for rep in range(a.reps):
        print("%s: repetition %d/%d" % (ch.name, rep + 1, a.reps),
              flush=True)
        for row, together in (("fio-seq", False), ("fio-both", True)):
            if want(row):
                el, own = fio_copy(d, raw, ch.moved, a.fio_depth, together)
                ch.fio_runtime.setdefault(row, []).append(own)
                ch.record(row, el)
        for row, direct in (("qsd-stream", False),
                            ("qsd-stream-direct", True)):
            if want(row):
                top = fresh_top(d, pristine)
                el = run_qsd(d, top, base, ch.base_fmt, direct)
                ch.record(row, el, verify(d, top, pristine))
        if want("img-rebase"):
            top = fresh_top(d, pristine)
            el, _ = timed(["qemu-img", "rebase", "-f", "qcow2", "-b", "",
                           "-t", "none", "-T", "none", top])
            ch.record("img-rebase", el, verify(d, top, pristine))
        if want("img-convert"):
            top = fresh_top(d, pristine)
            out = os.path.join(d, "conv.qcow2")
            el, _ = timed(["qemu-img", "convert", "-O", "qcow2", "-t",
                           "none", "-T", "none", top, out])
            ch.record("img-convert", el, verify(d, out, pristine))
            os.unlink(out)
        if want("siphon"):
            stream("siphon", siphon, extra)
        if a.siphon_ref and want("siphon-ref"):
            stream("siphon-ref", os.path.abspath(a.siphon_ref), [])
    for f in ("top.qcow2", "top.pristine.qcow2"):
        if os.path.exists(os.path.join(d, f)):
            os.unlink(os.path.join(d, f))


def bench_sparse(a, d, size):
    """siphon on a 1 TiB overlay over a sparse base holding `size` bytes."""
    ch = Chain("raw", "tenth", size, a.cluster_size, sparse_total=1 << 40)
    sd = os.path.join(d, "sparse")
    os.makedirs(sd)
    base = os.path.join(sd, "base.raw")
    make_raw_base(base, size, sparse_total=1 << 40)
    pristine = os.path.join(sd, "top.pristine.qcow2")
    make_overlay(pristine, base, "raw", size, a.cluster_size, "tenth",
                 sparse_total=1 << 40)
    for rep in range(a.reps):
        top = fresh_top(sd, pristine)
        el, rss, copied = siphon_stream(os.path.abspath(a.siphon),
                                        shlex.split(a.siphon_args), top)
        ch.rss["siphon"] = max(ch.rss.get("siphon", 0), rss)
        ch.copied.setdefault("siphon", []).append(copied)
        ch.record("siphon", el, verify(sd, top, pristine))
    shutil.rmtree(sd)
    return ch


def chain_list(a):
    """(layout, size) pairs: --chains, else every --layout x --size."""
    if a.chains:
        out = []
        for item in a.chains.split(","):
            layout, _, size = item.partition(":")
            if layout not in LAYOUTS or not size:
                sys.exit("--chains: expected LAYOUT:SIZE, got " + item)
            out.append((layout, parse_size(size)))
        return out
    layouts = LAYOUTS if a.layout == "both" else (a.layout,)
    return [(lay, sz) for sz in a.size for lay in layouts]


def print_chain(ch, a):
    med = ch.medians()
    print()
    print("%s: %d MiB, cluster %d KiB, %.1f MiB to move, %d reps" %
          (ch.name, ch.size // MiB, ch.cs // 1024, ch.moved / MiB, a.reps))
    print("%-18s %9s %9s %9s" % ("method", "median s", "spread s", "MiB/s"))
    for row, v in ch.times.items():
        print("%-18s %9.3f %9.3f %9.1f%s" % (
            row, med[row], max(v) - min(v), ch.moved / MiB / med[row],
            "" if all(ch.ok[row]) else "  VERIFY FAILED"))
    for row, v in ch.fio_runtime.items():
        print("(%s as fio reports its jobs' runtime: %.3f s)" %
              (row, statistics.median(v)))
    rat = ch.ratios()
    for peer, target in TARGETS:
        if peer in rat:
            print("siphon vs %-18s %5.2fx  (target >= %.1fx%s)%s" %
                  (peer, rat[peer], target,
                   "" if rat[peer] >= target else ": missed",
                   "" if ch.verified("siphon", peer) else
                   "  UNVERIFIED"))
    for row, kib in ch.rss.items():
        print("%s peak RSS: %.1f MiB  (target < %d MiB)" %
              (row, kib / 1024, RSS_TARGET_MIB))


def print_matrix(chains):
    """One line per chain: siphon's ratios against each peer, and its RSS."""
    peers = [p for p, _ in TARGETS if any(p in c.ratios() for c in chains)]
    if not peers:
        return
    print()
    print("siphon vs peer (peer's median time / siphon's; targets: %s; "
          "! = a verify failed)" %
          ", ".join("%s %.1fx" % (p, t) for p, t in TARGETS if p in peers))
    print("%-22s" % "chain" + "".join(" %17s" % p for p in peers) +
          " %9s" % "RSS MiB")
    for c in chains:
        r = c.ratios()
        print("%-22s" % c.name + "".join(
            " %17s" % ("%.2fx%s" % (r[p], "" if c.verified("siphon", p)
                                    else "!") if p in r else "-")
            for p in peers) +
            " %9s" % ("%.1f" % (c.rss["siphon"] / 1024)
                      if "siphon" in c.rss else "-"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=lambda s: [parse_size(x)
                                              for x in s.split(",")],
                    default=[parse_size("1G")],
                    help="virtual size of each chain; a comma-separated "
                    "list runs each (default 1G)")
    ap.add_argument("--cluster-size", type=parse_size, default=65536)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--base-format", choices=BASE_FORMATS + ("both",),
                    default="both")
    ap.add_argument("--layout", choices=LAYOUTS + ("both",), default="both",
                    help="overlay holding every tenth cluster, or empty")
    ap.add_argument("--chains", default="",
                    help="explicit LAYOUT:SIZE list instead of --layout x "
                    "--size, e.g. empty:2G,tenth:2G,tenth:4G")
    ap.add_argument("--fio-depth", type=int, default=32)
    ap.add_argument("--dir", default=os.environ.get(
        "BENCH_DIR", "/var/tmp/siphon-bench"))
    ap.add_argument("--siphon", default=default_siphon())
    ap.add_argument("--siphon-args", default="",
                    help="extra arguments for the siphon row's "
                    "`siphon stream`, e.g. \"-q 32 -e 2M\"")
    ap.add_argument("--siphon-ref", default="",
                    help="another siphon binary, timed the same way "
                    "(row siphon-ref, without --siphon-args)")
    ap.add_argument("--sparse-tib", action="store_true",
                    help="also stream a 1 TiB sparse overlay with the same "
                    "amount of data as the first --size")
    ap.add_argument("--only", default="",
                    help="comma-separated subset of the rows: " +
                    ",".join(ROWS))
    ap.add_argument("--json", default="",
                    help="write every timing and median to this file")
    a = ap.parse_args()

    only = set(filter(None, a.only.split(",")))
    if only - set(ROWS):
        sys.exit("--only: unknown rows %s (known: %s)" %
                 (",".join(sorted(only - set(ROWS))), ",".join(ROWS)))
    need_tools("qemu-img", "qemu-io", "qemu-storage-daemon", "fio")
    if not os.access("/usr/bin/time", os.X_OK):
        sys.exit("missing /usr/bin/time (GNU time)")
    if not os.access(a.siphon, os.X_OK):
        sys.exit("no siphon binary at %s (build it, or --siphon)" % a.siphon)
    warn_if_warm()
    os.makedirs(a.dir, exist_ok=True)
    d = tempfile.mkdtemp(prefix="stream.", dir=os.path.abspath(a.dir))
    chains = []
    try:
        bench(a, d, chains, lambda row: not only or row in only)
    finally:
        shutil.rmtree(d, ignore_errors=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"args": vars(a), "siphon": os.path.abspath(
                    a.siphon), "chains": [c.to_json() for c in chains]},
                    f, indent=1)
    for ch in chains:
        print_chain(ch, a)
    print_matrix([c for c in chains if not c.sparse_total])
    sparse = [c for c in chains if c.sparse_total]
    for sp in sparse:
        dense = [c for c in chains if c.base_fmt == "raw" and
                 c.layout == "tenth" and c.size == sp.size and
                 not c.sparse_total and "siphon" in c.times]
        if dense and "siphon" in sp.times:
            print("1 TiB sparse / dense time: %.2fx  (target <= 1.2x)" %
                  (sp.medians()["siphon"] / dense[0].medians()["siphon"]))
    if any(c.failed() for c in chains):
        sys.exit(1)


def bench(a, d, chains, want):
    formats = BASE_FORMATS if a.base_format == "both" else (a.base_format,)
    pairs = chain_list(a)
    for size in dict.fromkeys(sz for _, sz in pairs):
        raw = os.path.join(d, "base.raw")
        print("building a %s raw base" % human(size), flush=True)
        make_raw_base(raw, size)
        for fmt in formats:
            base = raw
            if fmt == "qcow2":
                base = os.path.join(d, "base.qcow2")
                make_qcow2_base(raw, base, a.cluster_size)
            for layout, sz in pairs:
                if sz != size:
                    continue
                ch = Chain(fmt, layout, size, a.cluster_size)
                chains.append(ch)
                bench_chain(a, d, ch, base, want)
            if base != raw:
                os.unlink(base)
        os.unlink(raw)
    if a.sparse_tib and want("siphon"):
        chains.append(bench_sparse(a, d, pairs[0][1]))


if __name__ == "__main__":
    main()
