"""Shared plumbing for the integration tests: find the siphon binary, run
commands with timeouts, recognise crashes and sanitizer reports, decide
whether to skip (exit 77), and count and report results.

Stdlib only (python 3.11).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

SKIP = 77
TIMEOUT = 60  # seconds per command

# What sanitizers print when they find something; such a run is a crash even
# if the exit code looks like a clean error (ASan exits 1 by default).
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer",
                   "UndefinedBehaviorSanitizer", "runtime error:")


@dataclasses.dataclass
class Result:
    argv: list[str]
    rc: int | None          # None on timeout
    out: bytes
    err: str

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    def crashed(self) -> str | None:
        """Why this run counts as a crash (signal, timeout, sanitizer), or
        None."""
        if self.rc is None:
            return "timed out"
        if self.rc < 0:
            return f"killed by signal {-self.rc}"
        if self.rc > 2 and self.rc != 0:
            return f"unexpected exit code {self.rc}"
        for m in SANITIZER_MARKS:
            if m in self.err:
                return f"sanitizer report ({m})"
        return None

    def describe(self) -> str:
        cmd = " ".join(self.argv)
        rc = "timeout" if self.rc is None else self.rc
        err = self.err.strip()
        if len(err) > 2000:
            err = err[:2000] + " [...]"
        return f"$ {cmd}\n  exit {rc}; stderr: {err!r}"


def run(argv: list[str], timeout: int = TIMEOUT, cwd: str | None = None) \
        -> Result:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout,
                           cwd=cwd)
    except subprocess.TimeoutExpired as e:
        return Result(argv, None, e.stdout or b"",
                      (e.stderr or b"").decode(errors="replace"))
    return Result(argv, p.returncode, p.stdout,
                  p.stderr.decode(errors="replace"))


def wait_path(path: str, proc: subprocess.Popen, timeout: float = 60) \
        -> bool:
    """Poll until path exists (a server's socket), proc exits or the
    deadline passes; whether path exists."""
    end = time.monotonic() + timeout
    while not os.path.exists(path) and proc.poll() is None and \
            time.monotonic() < end:
        time.sleep(0.05)
    return os.path.exists(path)


def stop(proc: subprocess.Popen, timeout: float = 60) -> int | None:
    """SIGTERM proc (a server the test started) and wait for it; SIGKILL
    if it does not exit in time. Its exit code, None when it was
    killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def siphon_binary() -> str | None:
    """$SIPHON (set by meson), else <src>/build/tools/siphon."""
    path = os.environ.get("SIPHON")
    if not path:
        src = os.environ.get("SIPHON_SRC") or \
            os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
        path = os.path.join(src, "build", "tools", "siphon")
    return path if os.access(path, os.X_OK) else None


def have_qemu() -> bool:
    return shutil.which("qemu-img") is not None and \
        shutil.which("qemu-io") is not None


def io_uring_skip_reason(siphon: str, tmpdir: str) -> str | None:
    """Run siphon on a tiny raw image. If it fails saying io_uring is
    unavailable, return the message (the caller skips); else None."""
    probe = os.path.join(tmpdir, "io-uring-probe.raw")
    with open(probe, "wb") as f:
        f.write(b"\xa5" * 65536)
    r = run([siphon, "info", "-f", "raw", probe])
    os.unlink(probe)
    if r.rc != 0 and "io_uring" in r.err.lower().replace("io-uring",
                                                          "io_uring"):
        return r.err.strip()
    return None


def preflight(tmpdir: str) -> str:
    """Return the siphon binary path, or exit: 77 if qemu is missing or
    io_uring is unavailable, 1 if the binary is missing."""
    if not have_qemu():
        print("SKIP: qemu-img/qemu-io not found (install qemu-utils)")
        sys.exit(SKIP)
    siphon = siphon_binary()
    if siphon is None:
        print(f"FAIL: siphon binary not found (SIPHON={os.environ.get('SIPHON')!r})")
        print("0 passed, 1 failed")
        sys.exit(1)
    why = io_uring_skip_reason(siphon, tmpdir)
    if why is not None:
        print(f"SKIP: io_uring unavailable: {why}")
        sys.exit(SKIP)
    return siphon


class Report:
    """Counts results; prints one line per case and the closing line."""

    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.failures: list[str] = []

    def emit(self, name: str, problems: list[str], skip: str | None = None,
             info: str | None = None) -> None:
        if skip is not None:
            self.skipped += 1
            print(f"SKIP {name}: {skip}", flush=True)
        elif problems:
            self.failed += 1
            self.failures.append(name)
            print(f"FAIL {name}", flush=True)
            for p in problems:
                for line in p.rstrip("\n").splitlines():
                    print(f"    {line}")
            sys.stdout.flush()
        else:
            self.passed += 1
            tail = f"  ({info})" if info else ""
            print(f"PASS {name}{tail}", flush=True)

    def finish(self) -> int:
        if self.failures:
            print("failed: " + " ".join(self.failures))
        line = f"{self.passed} passed, {self.failed} failed"
        if self.skipped:
            line += f", {self.skipped} skipped"
        print(line, flush=True)
        if self.failed:
            return 1
        if self.passed == 0 and self.skipped:
            return SKIP
        return 0
