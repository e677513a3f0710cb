"""cgroup v2 directories for the lab and the processes in them.

The lab's subtree is ``<cgroup2 mount>/ciliary-<prefix>``; ``<node>`` below it is where a node agent
started by the lab (real nodes without the chart) attaches socket-level load balancing, and ``lab down``
kills whatever runs below it and removes it. Where the machine has no cgroup2 mount (pure v1 hosts), one
is mounted at ``/run/ciliary/cgroup2``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

FALLBACK_MOUNT = Path("/run/ciliary/cgroup2")


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted (mounting it if it nowhere is)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    FALLBACK_MOUNT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "cgroup2", "none", str(FALLBACK_MOUNT)], check=True, timeout=10)
    return FALLBACK_MOUNT


def lab_root(cgroup_name: str) -> Path:
    return cgroup2_root() / cgroup_name


def ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def pids(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def kill_all(path: Path, *, timeout: float = 5.0) -> None:
    """Stop every process in ``path`` (SIGTERM, then SIGKILL), bounded in time."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 3.0)):
        for pid in pids(path):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pids(path):
            return


def remove_tree(path: Path) -> None:
    """Kill everything below ``path`` and remove the directories, deepest first."""
    if not path.exists():
        return
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for d in [*dirs, path]:
        kill_all(d)
        try:
            d.rmdir()
        except OSError:
            pass
