#!/usr/bin/env python3
"""What the stream engine does over time: one siphon stream, traced.

Builds one chain as stream_bench.py does (or takes IMAGE, which it streams
in place), runs `siphon stream --output=json --progress` once with a cold
page cache and prints, per JSON progress line (the tool writes one every
500 ms), the time, the MiB/s copied over the interval since the line
before, and the engine's own fields when the line has them:

  rate                 the engine's copy rate (bytes/s)
  inflight_bytes       bytes of reads and writes in flight
  window_bytes         the controller's bound on bytes in flight
  request_bytes        request size it chose
  read_request_bytes   read request size
  write_request_bytes  write request size
  device_rate          what it measures the device delivering (bytes/s)
  latency_us           mean latency of its requests (microseconds)

A field a line lacks prints as "-". Sizes print in KiB, rates in MiB/s
(--raw: the numbers as the line has them). --png FILE plots the series with
matplotlib when it is installed (this interpreter's, or Debian's
/usr/bin/python3 with python3-matplotlib), and skips the plot otherwise.
--save FILE keeps the JSON lines; --from FILE prints (and plots) saved
lines without streaming. A chain the script built is checked with qemu-img
compare and check after the stream.

Usage: bench/stream_trace.py [--size 1G] [--layout tenth|empty]
       [--base-format raw|qcow2] [--cluster-size 64k]
       [--siphon build/tools/siphon] [--siphon-args "-q 32 -e 2M"]
       [--png FILE] [--save FILE] [--raw] [--dir /var/tmp/siphon-bench]
       [IMAGE | --from FILE]
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchlib import (BASE_FORMATS, LAYOUTS, MiB, bytes_to_move,
                      default_siphon, drop_caches, make_overlay,
                      make_qcow2_base, make_raw_base, need_tools, parse_size,
                      verify, warn_if_warm)

# (JSON field, column title, unit: "B" size, "B/s" rate, "us")
FIELDS = (("rate", "eng", "B/s"),
          ("inflight_bytes", "inflight", "B"),
          ("window_bytes", "window", "B"),
          ("request_bytes", "req", "B"),
          ("read_request_bytes", "rd req", "B"),
          ("write_request_bytes", "wr req", "B"),
          ("device_rate", "dev", "B/s"),
          ("latency_us", "lat", "us"))


def title(name, unit, raw):
    """A column's title with the unit its cells are printed in."""
    if raw or unit == "us":
        return name + " " + unit
    return name + (" MiB/s" if unit == "B/s" else " K")


def cell(v, unit, raw):
    """One table cell: '-' when absent, else scaled to the column's unit."""
    if v is None:
        return "-"
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return json.dumps(v, separators=(",", ":"))
    if raw:
        return str(v)
    if unit == "B/s":
        return "%.1f" % (v / MiB)
    if unit == "B":
        return "%.0f" % (v / 1024)
    return str(v)


class Table:
    """Prints lines as they come; keeps the series for the summary and plot."""

    def __init__(self, raw, quiet=False):
        self.raw, self.quiet = raw, quiet
        self.rows = []      # (seconds, interval MiB/s, event dict)
        self.prev = (0.0, 0)
        titles = ["t s", "%", "MiB/s"] + [title(t, u, raw)
                                          for _, t, u in FIELDS]
        if not quiet:
            print("  ".join("%10s" % t for t in titles), flush=True)

    def add(self, ev):
        if ev.get("event") not in ("progress", "done", "aborted", "failed"):
            return
        t = float(ev.get("seconds", 0.0))
        b = int(ev.get("bytes_copied", 0))
        dt = t - self.prev[0]
        # a line right after the one before (the last progress line, then
        # the summary) gives no rate worth printing
        mibs = (b - self.prev[1]) / MiB / dt if dt >= 0.05 else None
        self.prev = (t, b)
        self.rows.append((t, mibs, ev))
        if self.quiet:
            return
        cells = ["%.3f" % t, "%.1f" % ev.get("percent", 0),
                 "-" if mibs is None else "%.1f" % mibs]
        cells += [cell(ev.get(k), unit, self.raw) for k, _, unit in FIELDS]
        print("  ".join("%10s" % c for c in cells), flush=True)

    def summary(self):
        if not self.rows:
            print("no progress lines")
            return
        t, _, last = self.rows[-1]
        ts = [r[0] for r in self.rows]
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        print()
        print("%d lines, %s after %.3f s: %.1f MiB copied, %.1f MiB/s "
              "on average" % (len(self.rows), last.get("event"), t,
                              last.get("bytes_copied", 0) / MiB,
                              last.get("bytes_copied", 0) / MiB / t
                              if t > 0 else 0.0))
        if gaps:
            print("interval between lines: median %.3f s, max %.3f s" %
                  (statistics.median(gaps), max(gaps)))
        missing = [k for k, _, _ in FIELDS
                   if all(k not in r[2] for r in self.rows)]
        if missing:
            print("fields no line had: " + ", ".join(missing))


def plot(rows, png):
    """Write png: throughput, bytes in flight and request sizes over time.
    Returns False when this interpreter has no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [r[0] for r in rows]

    def series(k, scale):
        return [r[2][k] / scale if isinstance(r[2].get(k), (int, float))
                else float("nan") for r in rows]

    fig, ax = plt.subplots(3, 1, sharex=True, figsize=(9, 9))
    ax[0].plot(t, [r[1] if r[1] is not None else float("nan")
                   for r in rows], marker=".", drawstyle="steps-pre",
               label="copied (interval)")
    for k, label in (("rate", "engine rate"), ("device_rate", "device rate")):
        if any(k in r[2] for r in rows):
            ax[0].plot(t, series(k, MiB), marker=".", label=label)
    ax[0].set_ylabel("MiB/s")
    for k in ("inflight_bytes", "window_bytes"):
        if any(k in r[2] for r in rows):
            ax[1].plot(t, series(k, MiB), marker=".", label=k)
    ax[1].set_ylabel("MiB")
    for k in ("request_bytes", "read_request_bytes", "write_request_bytes"):
        if any(k in r[2] for r in rows):
            ax[2].plot(t, series(k, 1024), marker=".", label=k)
    ax[2].set_ylabel("KiB")
    ax[2].set_xlabel("seconds")
    for x in ax:
        if x.get_legend_handles_labels()[0]:
            x.legend(loc="best", fontsize="small")
        x.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def plot_elsewhere(saved, png):
    """Plot with Debian's python3 (python3-matplotlib) when this interpreter
    has no matplotlib: rerun this script there on the saved lines."""
    other = "/usr/bin/python3"
    if not os.access(other, os.X_OK) or \
            os.path.realpath(other) == os.path.realpath(sys.executable):
        return False
    p = subprocess.run([other, "-c", "import matplotlib"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if p.returncode != 0:
        return False
    p = subprocess.run([other, os.path.abspath(__file__), "--from", saved,
                        "--png", png, "--quiet"],
                       stdout=subprocess.DEVNULL)
    return p.returncode == 0


def replay(a):
    """--from: the table (and plot) of saved JSON lines."""
    tab = Table(a.raw, quiet=a.quiet)
    with open(a.from_file) as f:
        for line in f:
            try:
                tab.add(json.loads(line))
            except ValueError:
                continue
    if not a.quiet:
        tab.summary()
    if not a.png:
        return 0
    if plot(tab.rows, a.png):
        ok = True
    else:
        # --quiet is the rerun under another interpreter: no further one
        ok = not a.quiet and plot_elsewhere(a.from_file, a.png)
    if a.quiet:
        return 0 if ok else 1
    print("plot: " + a.png if ok else "no matplotlib: plot skipped")
    return 0


def trace(a, top, saved):
    """Stream top once, printing the table as the lines arrive."""
    cmd = [os.path.abspath(a.siphon), "stream", "--output=json",
           "--progress"] + shlex.split(a.siphon_args) + [top]
    drop_caches()
    tab = Table(a.raw)
    with open(saved, "w") as keep:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in p.stdout:
            keep.write(line)
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            tab.add(ev)
        rc = p.wait()
    tab.summary()
    if rc != 0:
        print("siphon stream exited %d" % rc, file=sys.stderr)
    return rc, tab.rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image", nargs="?", help="stream this image (in place) "
                    "instead of building a chain")
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--cluster-size", type=parse_size, default=65536)
    ap.add_argument("--layout", choices=LAYOUTS, default="tenth")
    ap.add_argument("--base-format", choices=BASE_FORMATS, default="raw")
    ap.add_argument("--dir", default=os.environ.get(
        "BENCH_DIR", "/var/tmp/siphon-bench"))
    ap.add_argument("--siphon", default=default_siphon())
    ap.add_argument("--siphon-args", default="",
                    help="extra arguments for `siphon stream`")
    ap.add_argument("--png", default="", help="plot into this PNG file")
    ap.add_argument("--save", default="", help="keep the JSON lines here")
    ap.add_argument("--from", dest="from_file", default="",
                    help="print saved JSON lines instead of streaming")
    ap.add_argument("--raw", action="store_true",
                    help="the fields' numbers unscaled")
    ap.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.from_file:
        return replay(a)

    need_tools("qemu-img", "qemu-io")
    if not os.access(a.siphon, os.X_OK):
        sys.exit("no siphon binary at %s (build it, or --siphon)" % a.siphon)
    warn_if_warm()
    os.makedirs(a.dir, exist_ok=True)
    d = tempfile.mkdtemp(prefix="trace.", dir=os.path.abspath(a.dir))
    try:
        saved = a.save or os.path.join(d, "trace.jsonl")
        if a.image:
            rc, rows = trace(a, os.path.abspath(a.image), saved)
            ok = True
        else:
            raw = os.path.join(d, "base.raw")
            make_raw_base(raw, a.size)
            base = raw
            if a.base_format == "qcow2":
                base = os.path.join(d, "base.qcow2")
                make_qcow2_base(raw, base, a.cluster_size)
            pristine = os.path.join(d, "top.pristine.qcow2")
            make_overlay(pristine, base, a.base_format, a.size,
                         a.cluster_size, a.layout)
            top = os.path.join(d, "top.qcow2")
            shutil.copyfile(pristine, top)
            print("%s base, %s overlay, %d MiB, %.1f MiB to move" %
                  (a.base_format, a.layout, a.size // MiB,
                   bytes_to_move(a.size, a.cluster_size, a.layout) / MiB),
                  flush=True)
            rc, rows = trace(a, top, saved)
            ok = rc == 0 and verify(d, top, pristine)
            print("qemu-img compare and check: %s" %
                  ("ok" if ok else "FAILED"))
        if a.png and rows:
            if plot(rows, a.png) or plot_elsewhere(saved, a.png):
                print("plot: " + a.png)
            else:
                print("no matplotlib: plot skipped")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0 if rc == 0 and ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # the table piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
