"""Starting, finding and stopping the lab's long-running processes.

Each process gets a pid file (pid and kernel start time, so a recycled pid is never
killed by mistake) under ``<lab>/run`` and a log under ``<lab>/logs``. Processes
start in their own session, so stopping one stops its process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ciliary.lab.layout import LabLayout


class ProcessStartError(RuntimeError):
    """A lab process exited while starting; carries its name and log tail."""

    def __init__(self, name: str, log: Path) -> None:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        super().__init__(f"{name} exited during start-up; last log lines ({log}):\n{tail}")
        self.name = name


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def spawn(
    layout: LabLayout,
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` in the background as lab process ``name``; return its pid."""
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    log = layout.log_dir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=full_env, cwd=cwd, start_new_session=True,
        )
    record = {"pid": proc.pid, "start": _start_time(proc.pid), "argv": list(argv)}
    (layout.run_dir / f"{name}.pid").write_text(json.dumps(record))
    return proc.pid


def running_pid(layout: LabLayout, name: str) -> int | None:
    """The pid of lab process ``name`` if it is still the process we started."""
    try:
        record = json.loads((layout.run_dir / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None
    pid = int(record["pid"])
    start = _start_time(pid)
    if start is None or start != record.get("start"):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # it exited since its start time was read
        return None
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return None
    return pid


def names(layout: LabLayout) -> list[str]:
    if not layout.run_dir.exists():
        return []
    return sorted(p.stem for p in layout.run_dir.glob("*.pid"))


def stop(layout: LabLayout, name: str, *, timeout: float = 10.0) -> bool:
    """SIGTERM the process group, then SIGKILL after ``timeout``; True if it was running."""
    pid = running_pid(layout, name)
    pidfile = layout.run_dir / f"{name}.pid"
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and running_pid(layout, name) is not None:
            _reap(pid)
            time.sleep(0.05)
        if running_pid(layout, name) is None:
            break
    pidfile.unlink(missing_ok=True)
    return True


def terminate(proc: subprocess.Popen[Any], *, timeout: float = 10.0) -> None:
    """A child this process started: SIGTERM, then SIGKILL after ``timeout``; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_alive(layout: LabLayout, name: str, seconds: float) -> None:
    """Fail fast if process ``name`` dies within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if running_pid(layout, name) is None:
            raise ProcessStartError(name, layout.log_dir / f"{name}.log")
        time.sleep(0.1)


def wait_for_line(layout: LabLayout, name: str, text: str, seconds: float, poll: float = 0.1) -> bool:
    """Wait until lab process ``name``'s log contains ``text``: True when it does, False after ``seconds``;
    :class:`ProcessStartError` as soon as the process is gone."""
    log = layout.log_dir / f"{name}.log"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not running_pid(layout, name):
            raise ProcessStartError(name, log)
        if log.exists() and text in log.read_text(errors="replace"):
            return True
        time.sleep(poll)
    return False
