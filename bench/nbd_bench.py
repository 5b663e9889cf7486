#!/usr/bin/env python3
"""Streaming from an NBD backing layer: siphon against qemu and nbdcopy.

Issue 12's performance section. A raw base of incompressible data is
exported over a Unix socket in the bench directory, and a qcow2 overlay
(64 KiB clusters, every tenth cluster already local: 90% to move) has the
export as its backing file, `nbd+unix:///base?socket=SOCK`, format raw.
Chains (each row repeated --reps times, page cache dropped before every
timed run, medians reported):

  qemu-nbd      `qemu-nbd -r -f raw -x base --shared=16 --persistent`,
                base of --size
      siphon      siphon stream --output=json --no-progress TOP
      qsd-stream  qemu-storage-daemon: the overlay (file + qcow2) over an
                  nbd blockdev + raw; QMP block-stream, timed to the
                  daemon's exit after quit
      nbdcopy     nbdcopy --flush URI OUT.raw: the whole export to a
                  local file (its ratio is scaled to the bytes the stream
                  must move)
      fio-both    fio reading the bytes that must move from the base file
                  and writing them to a new local file, together (O_DIRECT,
                  1 MiB, QD 32, io_uring, fsync): what the disk under both
                  the server and the overlay moves with no server between;
                  a reference for the disk, not a hard ceiling (a better
                  request shape can beat fio's fixed one). qsd-stream's
                  rate is printed as a fraction of it
  delay-1ms     `nbdkit -r -U SOCK --filter=delay file BASE rdelay=1ms`,
  delay-10ms    base of --delay-size: siphon and qsd-stream as above

  --guest       guest 4 KiB random reads (QD 32) of not-yet-local data,
                1 ms server: siphon's API (copy-on-read off and on)
                against fio's nbd engine at the server
  --sparse-tib  siphon streaming 1 GiB of data from a dense base and
                spread over a 1 TiB sparse one (block status)

Every siphon and qsd-stream result is checked: qemu-img compare against
the pristine chain (read through the same server) and qemu-img check, and
the streamed overlay must have no backing file left. The servers are
started and stopped by the script and killed on any exit.

Usage: bench/nbd_bench.py [--size 4G] [--delay-size 512M] [--reps 3]
       [--delays 1ms,10ms] [--only siphon,qsd-stream,nbdcopy]
       [--guest [--guest-secs 10]] [--sparse-tib [--sparse-data 1G]]
       [--siphon build-release/tools/siphon] [--json FILE]
       [--dir /var/tmp/siphon-bench]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import (MiB, bytes_to_move, human, make_overlay, make_raw_base,
                      need_tools, parse_size, rss_kib, run,
                      timed, verify, warn_if_warm)
import stream_bench
from stream_bench import fresh_top

ROWS = ("siphon", "qsd-stream", "nbdcopy", "fio-both")
FIO_DEPTH = 32
CLUSTER = 65536

# (peer, target for the peer's time / siphon's time) per kind of chain
TARGETS = {"qemu-nbd": (("qsd-stream", 2.0), ("nbdcopy", 0.9),
                        ("fio-both", None)),
           "delay-1ms": (("qsd-stream", None),),
           "delay-10ms": (("qsd-stream", 4.0),),
           "dense": (),
           "sparse": ()}
# --sparse-tib: the 1 TiB sparse base's stream may take this much longer
# than the dense base holding the same data ("about the time", issue 12)
SPARSE_TARGET = 1.2
TIB = 1 << 40

# the fields of siphon's JSON summary kept for diagnosis
SIPHON_FIELDS = ("bytes_copied", "bytes_skipped", "bytes_zero",
                 "window_bytes", "request_bytes", "read_request_bytes",
                 "write_request_bytes", "device_rate", "latency_us",
                 "seconds")


class Server:
    """An NBD server on a Unix socket, run in the foreground as a child."""

    def __init__(self, cmd, sock):
        self.cmd, self.sock, self.p = cmd, sock, None

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.p = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        for _ in range(200):
            if self.p.poll() is not None:
                raise RuntimeError("%s exited: %s" %
                                   (self.cmd[0], self.p.stderr.read()))
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(self.sock)
                return self
            except OSError:
                time.sleep(0.05)
            finally:
                s.close()
        raise RuntimeError("%s never listened on %s" %
                           (self.cmd[0], self.sock))

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.p = None


def qemu_nbd(base, sock):
    """qemu-nbd exporting the raw file base as "base" on sock, for up to 16
    clients (so with multi-conn), surviving their disconnects."""
    return ["qemu-nbd", "-r", "-f", "raw", "-x", "base", "--shared=16",
            "-k", sock, "--persistent", base]


def uri(sock):
    return "nbd+unix:///base?socket=" + sock


def no_backing(img):
    """The image names no backing file any more."""
    info = json.loads(run(["qemu-img", "info", "--output=json", "-U",
                           img]).stdout)
    return "backing-filename" not in info and \
        "full-backing-filename" not in info


def siphon_stream(binary, top):
    """One timed siphon stream: (seconds, peak RSS KiB, summary fields)."""
    el, p = timed(["/usr/bin/time", "-v", binary, "stream", "--output=json",
                   "--no-progress", top])
    done = {}
    for line in p.stdout.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") in ("done", "failed", "aborted"):
            done = ev
    if done.get("event") != "done":
        raise RuntimeError("siphon stream: " + json.dumps(done))
    return el, rss_kib(p.stderr), {k: done.get(k) for k in SIPHON_FIELDS}


def qsd_blockdevs(top, sock):
    """The overlay over an nbd blockdev (export base) with a raw node."""
    nbd = {"driver": "nbd", "node-name": "nbd0", "read-only": True,
           "server": {"type": "unix", "path": sock}, "export": "base"}
    raw = {"driver": "raw", "node-name": "base0", "file": "nbd0",
           "read-only": True}
    return ["--blockdev", json.dumps(nbd), "--blockdev", json.dumps(raw),
            "--blockdev", "driver=file,filename=%s,node-name=file0" % top,
            "--blockdev", "driver=qcow2,file=file0,node-name=top0,"
            "backing=base0"]


def run_qsd(d, top, sock):
    """Seconds from block-stream to the daemon's exit after quit."""
    return stream_bench.qsd_stream_time(d, qsd_blockdevs(top, sock),
                                        timeout=7200)


class Chain:
    """One served base, its overlay, and what was measured on it."""

    def __init__(self, kind, size, sparse_total=None):
        """size: the data; sparse_total: the virtual size of a sparse base
        whose `size` bytes of data are spread over it."""
        self.kind, self.size, self.sparse_total = kind, size, sparse_total
        self.moved = bytes_to_move(size, CLUSTER, "tenth")
        self.times, self.ok, self.rss, self.siphon = {}, {}, 0, []

    @property
    def name(self):
        if self.sparse_total:
            return "%s/%s-in-%s" % (self.kind, human(self.size),
                                    human(self.sparse_total))
        return "%s/%s" % (self.kind, human(self.size))

    def record(self, row, secs, ok=True):
        self.times.setdefault(row, []).append(secs)
        self.ok.setdefault(row, []).append(ok)
        print("  %-16s %-11s %9.3f s%s" % (self.name, row, secs,
                                           "" if ok else "  VERIFY FAILED"),
              flush=True)

    def moves(self, row):
        """Bytes the row transfers: nbdcopy copies the whole export."""
        return self.size if row == "nbdcopy" else self.moved

    def medians(self):
        return {r: statistics.median(v) for r, v in self.times.items()}

    def ratios(self):
        """Peer's median / siphon's, nbdcopy's scaled to the bytes the
        stream moves (its time at its own rate for those bytes)."""
        med = self.medians()
        if "siphon" not in med:
            return {}
        out = {}
        for peer, _ in TARGETS[self.kind]:
            if peer in med:
                t = med[peer] * self.moved / self.moves(peer)
                out[peer] = t / med["siphon"]
        return out

    def qsd_of_fio(self):
        """qsd-stream's rate as a fraction of fio-both's, or None."""
        med = self.medians()
        if "qsd-stream" in med and "fio-both" in med:
            return med["fio-both"] / med["qsd-stream"]
        return None

    def to_json(self):
        med = self.medians()
        return {
            "name": self.name, "server": self.kind, "size": self.size,
            "virtual_size": self.sparse_total or self.size,
            "cluster_size": CLUSTER, "bytes_to_move": self.moved,
            "rows": {r: {"seconds": v, "verified": self.ok[r],
                         "median": med[r], "spread": max(v) - min(v),
                         "bytes": self.moves(r),
                         "mib_s": self.moves(r) / MiB / med[r]}
                     for r, v in self.times.items()},
            "ratios": self.ratios(),
            "qsd_of_fio_both": self.qsd_of_fio(),
            "targets": {p: t for p, t in TARGETS[self.kind]},
            "siphon_peak_rss_kib": self.rss,
            "siphon_summaries": self.siphon,
        }


def bench_chain(a, d, ch, server, want, base=None):
    """All repetitions of the wanted rows on one chain, server running."""
    sock = server.sock
    pristine = os.path.join(d, "top.pristine.qcow2")
    make_overlay(pristine, uri(sock), "raw", ch.size, CLUSTER, "tenth",
                 sparse_total=ch.sparse_total)
    siphon = os.path.abspath(a.siphon)
    for rep in range(a.reps):
        print("%s: repetition %d/%d" % (ch.name, rep + 1, a.reps),
              flush=True)
        if want("siphon"):
            top = fresh_top(d, pristine)
            el, rss, summ = siphon_stream(siphon, top)
            ch.rss = max(ch.rss, rss)
            ch.siphon.append(summ)
            ok = verify(d, top, pristine) and no_backing(top)
            ch.record("siphon", el, ok)
            if summ["bytes_copied"] != ch.moved:
                print("  note: siphon copied %s bytes, %d to move" %
                      (summ["bytes_copied"], ch.moved))
        if want("qsd-stream"):
            top = fresh_top(d, pristine)
            el = run_qsd(d, top, sock)
            ch.record("qsd-stream", el,
                      verify(d, top, pristine) and no_backing(top))
        if want("nbdcopy") and ch.kind == "qemu-nbd":
            out = os.path.join(d, "out.raw")
            el, _ = timed(["nbdcopy", "--flush", uri(sock), out])
            ch.record("nbdcopy", el, os.path.getsize(out) == ch.size)
            os.unlink(out)
        if want("fio-both") and base and ch.kind == "qemu-nbd":
            # fio_copy checks that fio moved exactly these bytes
            el, _ = stream_bench.fio_copy(d, base, ch.moved, FIO_DEPTH, True)
            ch.record("fio-both", el)
    for f in ("top.qcow2", "top.pristine.qcow2"):
        if os.path.exists(os.path.join(d, f)):
            os.unlink(os.path.join(d, f))


def print_chain(ch, a):
    med = ch.medians()
    print()
    print("%s: %d MiB base, cluster 64 KiB, %.1f MiB to move, %d reps" %
          (ch.name, ch.size // MiB, ch.moved / MiB, a.reps))
    print("%-12s %9s %9s %9s" % ("method", "median s", "spread s", "MiB/s"))
    for row, v in ch.times.items():
        print("%-12s %9.3f %9.3f %9.1f%s%s" % (
            row, med[row], max(v) - min(v), ch.moves(row) / MiB / med[row],
            "  (whole export)" if row == "nbdcopy" else "",
            "" if all(ch.ok[row]) else "  VERIFY FAILED"))
    rat = ch.ratios()
    for peer, target in TARGETS[ch.kind]:
        if peer not in rat:
            continue
        print("siphon vs %-11s %6.2fx%s%s" % (
            peer, rat[peer],
            "  (scaled to the bytes moved)" if peer == "nbdcopy" else "",
            "" if target is None else "  (target >= %.1fx%s)" %
            (target, "" if rat[peer] >= target else ": missed")))
    if ch.qsd_of_fio():
        print("qsd-stream moves %.2fx of fio-both's rate" % ch.qsd_of_fio())
    if ch.rss:
        print("siphon peak RSS: %.1f MiB" % (ch.rss / 1024))
    if ch.siphon:
        s = ch.siphon[len(ch.siphon) // 2]
        print("siphon summary: request %s B, window %s B, latency %s us, "
              "device rate %.1f MiB/s" %
              (s["request_bytes"], s["window_bytes"], s["latency_us"],
               (s["device_rate"] or 0) / MiB))


def guest_binary(a):
    """guest_randread of the build the siphon binary comes from."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        a.siphon))), "bench", "guest_randread")


def guest_siphon(a, top, cor):
    """(iops, p50 us, p99 us) of guest_randread on top, copy-on-read cor."""
    p = subprocess.run([guest_binary(a), "siphon", top, str(a.guest_secs)],
                       env=dict(os.environ, GUEST_BENCH_COR=cor),
                       capture_output=True, text=True)
    if p.returncode != 0 or "failed" in p.stderr:
        raise RuntimeError("guest_randread: " + p.stderr)
    f = p.stdout.split()
    return (float(f[f.index("iops") + 1]), float(f[f.index("p50") + 1]),
            float(f[f.index("p99") + 1]))


def guest_fio(a, sock):
    """(iops, p50 us, p99 us) of fio's nbd engine reading the export."""
    p = run(["fio", "--name=randread", "--ioengine=nbd", "--uri=" + uri(sock),
             "--rw=randread", "--bs=4k", "--iodepth=32", "--time_based",
             "--runtime=%g" % a.guest_secs, "--output-format=json"])
    # the engine says "fio: connected to NBD server" before the JSON
    r = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]["read"]
    pct = r["clat_ns"]["percentile"]
    return (r["iops"], pct["50.000000"] / 1e3, pct["99.000000"] / 1e3)


def bench_guest(a, d, base, serve, out):
    """Guest 4 KiB random reads at QD 32 of data not yet local (an empty
    overlay) with a server adding 1 ms per request: through siphon's API
    (copy-on-read off: every read goes to the server, as fio's do; and on,
    the default for a streaming disk: a read's cluster is copied in), and
    fio's nbd engine straight at the server."""
    sock = os.path.join(d, "guest.sock")
    srv = serve(["nbdkit", "-f", "-r", "--exit-with-parent", "-U", sock,
                 "--filter=delay", "file", base, "rdelay=1ms"], sock)
    top = os.path.join(d, "guest.qcow2")
    print("guest reads (1 ms server): %g s per row" % a.guest_secs,
          flush=True)
    rows = {}
    for rep in range(a.reps):
        for row in ("siphon-cor-off", "siphon-cor-on", "fio-nbd"):
            if row == "fio-nbd":
                res = guest_fio(a, sock)
            else:
                make_overlay(top, uri(sock), "raw", a.delay_size, CLUSTER,
                             "empty")
                res = guest_siphon(a, top, row.rsplit("-", 1)[1])
                ok = subprocess.run(["qemu-img", "check", "-q", top]
                                    ).returncode == 0
                os.unlink(top)
                if not ok:
                    raise RuntimeError("qemu-img check failed after the "
                                       "guest reads")
            rows.setdefault(row, []).append(res)
            print("  guest-1ms        %-15s iops %8.0f  p50 %7.1f us  "
                  "p99 %7.1f us" % ((row,) + res), flush=True)
    srv.stop()
    for row, v in rows.items():
        out[row] = {"runs": v,
                    "iops": statistics.median(x[0] for x in v),
                    "p50_us": statistics.median(x[1] for x in v),
                    "p99_us": statistics.median(x[2] for x in v)}


def bench_sparse(a, d, chains, serve):
    """The same 1 GiB (--sparse-data) of data as a dense raw base and
    spread in 1 MiB chunks over a 1 TiB sparse one, both served by
    qemu-nbd (which answers block status): siphon streams each."""
    for kind, total in (("dense", None), ("sparse", TIB)):
        base = os.path.join(d, kind + ".raw")
        print("building a %s raw base%s" % (
            human(a.sparse_data), " in %s" % human(total) if total else ""),
            flush=True)
        make_raw_base(base, a.sparse_data, sparse_total=total)
        sock = os.path.join(d, kind + ".sock")
        srv = serve(qemu_nbd(base, sock), sock)
        ch = Chain(kind, a.sparse_data, sparse_total=total)
        chains.append(ch)
        bench_chain(a, d, ch, srv, lambda r: r == "siphon")
        srv.stop()
        os.unlink(base)


def sparse_ratio(chains):
    """The sparse chain's median over the dense one's, or None."""
    med = {c.kind: c.medians().get("siphon") for c in chains
           if c.kind in ("dense", "sparse")}
    if med.get("dense") and med.get("sparse"):
        return med["sparse"] / med["dense"]
    return None


def print_guest(g):
    print()
    print("guest 4 KiB random reads, QD 32, 1 ms server (medians):")
    for row, v in g.items():
        print("%-15s iops %8.0f  p50 %7.1f us  p99 %7.1f us" %
              (row, v["iops"], v["p50_us"], v["p99_us"]))
    if "fio-nbd" in g and "siphon-cor-off" in g:
        f, s = g["fio-nbd"], g["siphon-cor-off"]
        print("siphon (copy-on-read off) vs fio nbd: iops %.2fx, p99 %.2fx" %
              (s["iops"] / f["iops"], s["p99_us"] / f["p99_us"]))


def bench(a, d, chains, want, guest):
    servers = []

    def serve(cmd, sock):
        srv = Server(cmd, sock).start()
        servers.append(srv)
        return srv

    try:
        if a.size:
            base = os.path.join(d, "base.raw")
            print("building a %s raw base" % human(a.size), flush=True)
            make_raw_base(base, a.size)
            sock = os.path.join(d, "qemu-nbd.sock")
            srv = serve(qemu_nbd(base, sock), sock)
            ch = Chain("qemu-nbd", a.size)
            chains.append(ch)
            bench_chain(a, d, ch, srv, want, base)
            srv.stop()
            os.unlink(base)
        delays = [x for x in a.delays.split(",") if x]
        if delays:
            base = os.path.join(d, "dbase.raw")
            print("building a %s raw base" % human(a.delay_size), flush=True)
            make_raw_base(base, a.delay_size)
            for delay in delays:
                sock = os.path.join(d, "nbdkit.sock")
                srv = serve(["nbdkit", "-f", "-r", "--exit-with-parent",
                             "-U", sock, "--filter=delay", "file", base,
                             "rdelay=" + delay], sock)
                ch = Chain("delay-" + delay, a.delay_size)
                chains.append(ch)
                bench_chain(a, d, ch, srv, lambda r: r != "nbdcopy" and
                            want(r))
                srv.stop()
            if a.guest:
                bench_guest(a, d, base, serve, guest)
            os.unlink(base)
        if a.sparse_tib:
            bench_sparse(a, d, chains, serve)
    finally:
        for srv in servers:
            srv.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("4G"),
                    help="base served by qemu-nbd (default 4G; 0 skips)")
    ap.add_argument("--delay-size", type=parse_size,
                    default=parse_size("512M"),
                    help="base served by nbdkit's delay filter (512M)")
    ap.add_argument("--delays", default="1ms,10ms",
                    help="rdelay values of the delay chains ('' skips)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=os.environ.get(
        "BENCH_DIR", "/var/tmp/siphon-bench"))
    ap.add_argument("--siphon", default=os.environ.get("SIPHON") or
                    os.path.join(os.path.dirname(os.path.abspath(
                        __file__)), "..", "build-release", "tools",
                        "siphon"))
    ap.add_argument("--only", default="",
                    help="comma-separated subset of: " + ",".join(ROWS))
    ap.add_argument("--json", default="",
                    help="write every timing and median to this file")
    ap.add_argument("--guest", action="store_true",
                    help="also guest 4 KiB random reads at QD 32 with a "
                    "1 ms server: siphon's API against fio's nbd engine")
    ap.add_argument("--guest-secs", type=float, default=10)
    ap.add_argument("--sparse-tib", action="store_true",
                    help="also stream a 1 TiB sparse base holding "
                    "--sparse-data of data, and a dense base of that data")
    ap.add_argument("--sparse-data", type=parse_size,
                    default=parse_size("1G"))
    a = ap.parse_args()

    only = set(filter(None, a.only.split(",")))
    if only - set(ROWS):
        sys.exit("--only: unknown rows " + ",".join(sorted(only -
                                                            set(ROWS))))
    need_tools("qemu-img", "qemu-io", "qemu-storage-daemon", "qemu-nbd",
               "nbdkit", "nbdcopy")
    if not os.access("/usr/bin/time", os.X_OK):
        sys.exit("missing /usr/bin/time (GNU time)")
    if not os.access(a.siphon, os.X_OK):
        sys.exit("no siphon binary at %s (build it, or --siphon)" % a.siphon)
    warn_if_warm()
    # a SIGTERM or SIGHUP unwinds like Ctrl-C: the servers are stopped
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    os.makedirs(a.dir, exist_ok=True)
    d = tempfile.mkdtemp(prefix="nbd.", dir=os.path.abspath(a.dir))
    chains, guest = [], {}
    if a.guest and not a.delays:
        sys.exit("--guest reads the delay chains' base: give --delays")
    if a.guest and not os.access(guest_binary(a), os.X_OK):
        sys.exit("no %s (build bench/ next to --siphon)" % guest_binary(a))
    try:
        bench(a, d, chains, lambda row: not only or row in only, guest)
    finally:
        shutil.rmtree(d, ignore_errors=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"args": vars(a), "siphon": os.path.abspath(
                    a.siphon), "chains": [c.to_json() for c in chains],
                    "guest_1ms": guest,
                    "sparse_over_dense": sparse_ratio(chains),
                    "sparse_target": SPARSE_TARGET}, f, indent=1)
    for ch in chains:
        print_chain(ch, a)
    if guest:
        print_guest(guest)
    r = sparse_ratio(chains)
    if r is not None:
        print()
        print("1 TiB sparse base vs the dense one (same data): %.2fx the "
              "time (target <= %.2fx%s)" % (r, SPARSE_TARGET,
                                           "" if r <= SPARSE_TARGET else
                                           ": missed"))
    if any(not all(v) for c in chains for v in c.ok.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
