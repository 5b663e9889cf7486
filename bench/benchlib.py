"""What the Python benchmarks share: sizes, running commands, cold caches."""
import argparse
import os
import re
import subprocess

MiB = 1 << 20


def parse_size(s):
    """'64M', '1G', '4096': bytes (binary suffixes k, M, G, T)."""
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)", s)
    if not m:
        raise argparse.ArgumentTypeError("bad size: " + s)
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    return int(m.group(1)) * mult[m.group(2).lower()]


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
