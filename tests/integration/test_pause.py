#!/usr/bin/env python3
"""Streams that run out of space: `siphon stream --on-error=pause|stop`.

The top overlay lives on a small tmpfs mounted for the test (MOUNT_SIZE),
its raw backing file (BASE_SIZE of random data) elsewhere; a filler file
leaves only ROOM bytes free on the tmpfs, so the stream hits ENOSPC part way.

- pause, human output: the tool prints "paused: IMAGE: No space left on
  device at offset N; retrying every 2 s" and keeps running; once the filler
  is removed it completes (exit 0), `qemu-img compare` finds the top
  identical to the backing file and `qemu-img check` exits 0 (the extents
  that failed gave their clusters back: no leak);
- pause, --output=json: a {"event": "paused", "errno": "ENOSPC", ...} line,
  progress lines with "state": "paused" while it waits, and a "done"
  summary with "pauses" >= 1 once the filler is gone;
- pause, then SIGINT while paused: exit 130, the image consistent (check:
  no corruption) and still reading as the chain;
- stop: exit 1 with "No space left on device" on stderr; the image checks
  without corruption (exit 0 or leaks only, reported), reads as the chain,
  and a later stream with room completes it;
- the daemon: `siphon serve --control`, `siphon ctl stream DISK
  --on-error=pause` (and `siphon serve --stream --on-error=pause` from the
  start, the pause then in its log): info reports state "paused" with
  errno ENOSPC, the
  events connection gets a "paused" event, `siphon ctl resume DISK` once
  the filler is gone leads to "completed" (identical, check clean), and
  resume with no stream is refused with ESRCH.

Every wait is a poll with a generous deadline (to never hang), not a timed
assertion. The tmpfs is unmounted and everything removed in any case.

Closing line: "N passed, N failed[, N skipped]"; exit 1 on failure, 77 when
qemu-img/qemu-io or io_uring are missing or the tmpfs cannot be mounted
(not root, no permission).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

MiB = 1024 * 1024
MOUNT_SIZE = "40m"
BASE_SIZE = 32 * MiB
ROOM = 8 * MiB
DEADLINE = 120  # seconds: only so that a broken build cannot hang


class Proc:
    """A background siphon whose stdout and stderr are collected as they
    come."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.out = b""
        self.err = b""

    def pump(self, timeout: float) -> None:
        fds = [f for f in (self.p.stdout, self.p.stderr) if not f.closed]
        if not fds:
            time.sleep(timeout)
            return
        r, _, _ = select.select(fds, [], [], timeout)
        for f in r:
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                f.close()
            elif f is self.p.stdout:
                self.out += chunk
            else:
                self.err += chunk

    def wait_for(self, pred, deadline: float = DEADLINE) -> bool:
        """Collect output until pred(self) holds or the process ended (and
        its output is drained); pred's last value."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if pred(self):
                return True
            if self.p.poll() is not None and self.p.stdout.closed and \
                    self.p.stderr.closed:
                return pred(self)
            self.pump(0.2)
        return pred(self)

    def finish(self, deadline: float = DEADLINE) -> int | None:
        self.wait_for(lambda s: False, deadline)
        try:
            return self.p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        for f in (self.p.stdout, self.p.stderr):
            if not f.closed:
                f.close()

    def describe(self) -> str:
        return (f"$ {' '.join(self.argv)}\n  exit {self.p.poll()}\n"
                f"  stdout: {self.out[-1500:]!r}\n"
                f"  stderr: {self.err[-1500:]!r}")

    def json_lines(self) -> list[dict]:
        lines = []
        for line in self.out.decode(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
        return lines


def mount_tmpfs(path: str) -> str | None:
    """Mount a MOUNT_SIZE tmpfs at path: None, or why it could not."""
    r = harness.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_SIZE}",
                     "tmpfs", path])
    if r.rc != 0:
        return f"mount -t tmpfs failed (exit {r.rc}): {r.err.strip()}"
    return None


def umount(path: str) -> None:
    for _ in range(50):
        if harness.run(["umount", path]).rc == 0:
            return
        time.sleep(0.1)  # a killed siphon's ring may hold the file a moment
    harness.run(["umount", "-l", path])


def make_top(mnt: str, base: str, name: str) -> str:
    top = os.path.join(mnt, name)
    r = harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base,
                     "-F", "raw", top])
    if r.rc != 0:
        raise RuntimeError(r.describe())
    return top


def fill(mnt: str, room: int) -> str:
    """A file that leaves about room bytes free on mnt (written, so its
    pages are really taken)."""
    st = os.statvfs(mnt)
    left = st.f_bavail * st.f_frsize - room
    path = os.path.join(mnt, "filler")
    chunk = b"\xee" * MiB
    with open(path, "wb") as f:
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
    return path


def qemu_check(top: str) -> harness.Result:
    return harness.run(["qemu-img", "check", top])


def compare(top: str, base: str) -> list[str]:
    r = harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", top,
                     base])
    return [] if r.rc == 0 else ["qemu-img compare: " + r.describe()]


def has_backing(top: str) -> bool:
    r = harness.run(["qemu-img", "info", "--output=json", top])
    return "backing-filename" in r.out.decode(errors="replace")


def paused_msg(p: Proc) -> bool:
    return b"paused: " in p.err and b"retrying every" in p.err


def case_pause_human(siphon, mnt, base, rep: harness.Report) -> None:
    problems: list[str] = []
    top = make_top(mnt, base, "pause.qcow2")
    filler = fill(mnt, ROOM)
    p = Proc([siphon, "stream", "--on-error=pause", "--no-progress", top])
    try:
        if not p.wait_for(paused_msg):
            problems.append("no pause message: " + p.describe())
        else:
            err = p.err.decode(errors="replace")
            want = f"paused: {top}: No space left on device at offset "
            if want not in err or "retrying every 2 s" not in err:
                problems.append(f"pause message: want {want!r}...; "
                                f"got {err!r}")
            if p.p.poll() is not None:
                problems.append("exited while paused: " + p.describe())
        os.unlink(filler)
        rc = p.finish()
        if rc != 0:
            problems.append("want exit 0 once space is back: " +
                            p.describe())
    finally:
        p.kill()
        if os.path.exists(filler):
            os.unlink(filler)
    info = None
    if not problems:
        problems += compare(top, base)
        r = qemu_check(top)
        if r.rc != 0:
            problems.append("qemu-img check must be clean: " + r.describe() +
                            f"\n  stdout: {r.out!r}")
        if has_backing(top):
            problems.append("backing reference still there")
        info = "paused at ENOSPC, resumed, identical, check clean"
    os.unlink(top)
    rep.emit("pause_human", problems, info=info)


def case_pause_json(siphon, mnt, base, rep: harness.Report) -> None:
    problems: list[str] = []
    top = make_top(mnt, base, "pjson.qcow2")
    filler = fill(mnt, ROOM)
    p = Proc([siphon, "stream", "--on-error=pause", "--output=json", top])

    def paused_progress(s: Proc) -> bool:
        return any(j.get("event") == "progress" and
                   j.get("state") == "paused" for j in s.json_lines())
    try:
        if not p.wait_for(paused_progress):
            problems.append("no progress line with state paused: " +
                            p.describe())
        ev = [j for j in p.json_lines() if j.get("event") == "paused"]
        if not ev:
            problems.append("no paused event: " + p.describe())
        elif ev[0].get("errno") != "ENOSPC" or \
                ev[0].get("image") != top or \
                "offset" not in ev[0] or \
                "No space left" not in ev[0].get("error", ""):
            problems.append(f"paused event: {ev[0]!r}")
        os.unlink(filler)
        rc = p.finish()
        if rc != 0:
            problems.append("want exit 0: " + p.describe())
    finally:
        p.kill()
        if os.path.exists(filler):
            os.unlink(filler)
    if not problems:
        last = p.json_lines()[-1] if p.json_lines() else {}
        if last.get("event") != "done" or last.get("pauses", 0) < 1 or \
                last.get("state") != "completed":
            problems.append(f"summary: {last!r}")
        problems += compare(top, base)
        r = qemu_check(top)
        if r.rc != 0:
            problems.append("qemu-img check must be clean: " + r.describe())
    os.unlink(top)
    rep.emit("pause_json", problems)


def case_pause_sigint(siphon, mnt, base, rep: harness.Report) -> None:
    problems: list[str] = []
    top = make_top(mnt, base, "pint.qcow2")
    filler = fill(mnt, ROOM)
    p = Proc([siphon, "stream", "--on-error=pause", "--no-progress", top])
    try:
        if not p.wait_for(paused_msg):
            problems.append("no pause message: " + p.describe())
        p.p.send_signal(signal.SIGINT)
        rc = p.finish()
        if rc != 130:
            problems.append("want exit 130 after SIGINT while paused: " +
                            p.describe())
    finally:
        p.kill()
        os.unlink(filler)
    r = qemu_check(top)
    if r.rc not in (0, 3):
        problems.append("aborted while paused: corrupt: " + r.describe())
    problems += compare(top, base)
    info = f"qemu-img check exit {r.rc}"
    os.unlink(top)
    rep.emit("pause_sigint", problems, info=info)


def case_stop(siphon, mnt, base, rep: harness.Report) -> None:
    problems: list[str] = []
    top = make_top(mnt, base, "stop.qcow2")
    filler = fill(mnt, ROOM)
    try:
        r = harness.run([siphon, "stream", "--on-error=stop", "--no-progress",
                         top], timeout=DEADLINE)
        if r.rc != 1 or "No space left on device" not in r.err:
            problems.append("want exit 1 and ENOSPC's message: " +
                            r.describe())
    finally:
        os.unlink(filler)
    c = qemu_check(top)
    if c.rc not in (0, 3):
        problems.append("failed stream left corruption: " + c.describe())
    problems += compare(top, base)
    r = harness.run([siphon, "stream", "--no-progress", top],
                    timeout=DEADLINE)
    if r.rc != 0:
        problems.append("a later stream must complete: " + r.describe())
    else:
        problems += compare(top, base)
        c2 = qemu_check(top)
        if c2.rc not in (0, 3):
            problems.append("after the second stream: " + c2.describe())
    info = f"qemu-img check exit {c.rc} after the failure"
    os.unlink(top)
    rep.emit("stop", problems, info=info)


def ctl(siphon: str, csock: str, *args: str) -> tuple[int | None, dict]:
    r = harness.run([siphon, "ctl", "--output=json", csock] + list(args))
    try:
        return r.rc, json.loads(r.out.decode(errors="replace")
                                .splitlines()[0])
    except (ValueError, IndexError):
        return r.rc, {"unparsed": r.out.decode(errors="replace"),
                      "stderr": r.err}


def ctl_stream_state(siphon: str, csock: str) -> dict:
    _, r = ctl(siphon, csock, "info")
    disks = r.get("disks") or [{}]
    return disks[0].get("stream", {})


def poll_state(siphon: str, csock: str, want: str, on_paused=None) -> dict:
    """Poll the daemon's info until the stream's state is want (calling
    on_paused() whenever it is paused); the last stream member seen."""
    end = time.monotonic() + DEADLINE
    st: dict = {}
    while time.monotonic() < end:
        st = ctl_stream_state(siphon, csock)
        if st.get("state") == want:
            break
        if st.get("state") == "paused" and on_paused:
            on_paused()
        time.sleep(0.2)
    return st


def case_serve(siphon, tmp, mnt, base, rep: harness.Report,
               startup: bool = False) -> None:
    """The daemon: stream with "on_error": "pause" on the control socket
    (or from the start: serve --stream --on-error=pause), info says paused
    (ENOSPC), a paused event (in the log when it came before the events
    connection), resume once there is room, completed; resume with no
    stream is ESRCH."""
    problems: list[str] = []
    top = make_top(mnt, base, "serve.qcow2")
    filler = fill(mnt, ROOM)
    csock = os.path.join(tmp, "ctl.sock")
    logpath = os.path.join(tmp, "serve.log")
    log = open(logpath, "wb")
    extra = ["--stream", "--on-error=pause"] if startup else []
    srv = subprocess.Popen([siphon, "serve", "--listen",
                            "unix:" + os.path.join(tmp, "nbd.sock"),
                            "--control", csock] + extra + [top + "=d"],
                           stdout=log, stderr=subprocess.STDOUT)
    ev = None
    resumed = []
    try:
        end = time.monotonic() + DEADLINE
        while not os.path.exists(csock) and srv.poll() is None and \
                time.monotonic() < end:
            time.sleep(0.05)
        ev = Proc([siphon, "ctl", "--output=json", csock, "events"])
        ev.wait_for(lambda s: b'"ok": true' in s.out or b'"ok":true' in
                    s.out, 10)
        if not startup:
            rc, r = ctl(siphon, csock, "stream", "d", "--on-error=pause")
            if rc != 0 or not r.get("ok"):
                problems.append(f"stream --on-error=pause: {rc} {r!r}")
        st = poll_state(siphon, csock, "paused")
        if st.get("state") != "paused" or st.get("errno") != "ENOSPC" or \
                "paused at offset" not in st.get("message", ""):
            problems.append(f"info while paused: {st!r}")
        if startup:
            with open(logpath, "rb") as f:
                if b"siphon ctl SOCKET resume" not in f.read():
                    problems.append("the log does not say the stream "
                                    "paused and how to resume it")
        elif not ev.wait_for(lambda s: any(j.get("event") == "paused" and
                                           j.get("errno") == "ENOSPC"
                                           for j in s.json_lines())):
            problems.append("no paused event: " + ev.describe())
        os.unlink(filler)

        def resume():
            rc, r = ctl(siphon, csock, "resume", "d")
            resumed.append((rc, r.get("ok"), r.get("errno")))
        st = poll_state(siphon, csock, "completed", on_paused=resume)
        if st.get("state") != "completed":
            problems.append(f"not completed after resume: {st!r} "
                            f"{resumed!r}")
        if not any(x[1] for x in resumed):
            problems.append(f"no resume answered ok: {resumed!r}")
        rc, r = ctl(siphon, csock, "resume", "d")
        if rc != 1 or r.get("errno") != "ESRCH":
            problems.append(f"resume with no stream: {rc} {r!r}")
    finally:
        if ev:
            ev.kill()
        harness.stop(srv, DEADLINE)
        log.close()
        if os.path.exists(filler):
            os.unlink(filler)
    if srv.returncode != 0:
        problems.append(f"serve exit {srv.returncode}")
    if not problems:
        problems += compare(top, base)
        r = qemu_check(top)
        if r.rc != 0:
            problems.append("qemu-img check must be clean: " + r.describe())
    os.unlink(top)
    rep.emit("serve_startup" if startup else "serve_control", problems,
             info=f"{len(resumed)} resume(s) sent")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="siphon-pause-") as tmp:
        siphon = harness.preflight(tmp)
        rep = harness.Report()
        base = os.path.join(tmp, "base.raw")
        with open(base, "wb") as f:
            f.write(os.urandom(BASE_SIZE))
        mnt = os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        why = mount_tmpfs(mnt)
        if why is not None:
            print(f"SKIP: {why}")
            return harness.SKIP
        try:
            for case in (case_pause_human, case_pause_json,
                         case_pause_sigint, case_stop):
                case(siphon, mnt, base, rep)
            case_serve(siphon, tmp, mnt, base, rep)
            case_serve(siphon, tmp, mnt, base, rep, startup=True)
        finally:
            umount(mnt)
        return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
