"""What this machine offers real lab nodes, detected, and the per-node cgroup roots on it.

Detection reads /proc (pure functions take the text, so they are unit-tested on other layouts):
- cgroup layout: ``v2`` (cgroup2 at /sys/fs/cgroup), ``hybrid`` (v1 controllers plus cgroup2 at
  e.g. /sys/fs/cgroup/unified) or ``v1``;
- cgroup driver: ``systemd`` only when PID 1 is systemd, else ``cgroupfs``;
- CAP_SYS_RESOURCE: without it runc cannot lower oom_score_adj, so containerd must restrict it.

A node's cgroup root (``/ciliary-<prefix>-<node>``) is created in every hierarchy the kubelet
uses (each v1 controller and cgroup2), with cpuset.cpus/mems copied from the parent, since a new
v1 cpuset group starts empty. Removal kills everything inside (containers, shims, containerd,
kubelet: all of them live under it) and removes the directories, deepest first; bounded in time.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ciliary.lab.nodeconfig import Host

CAP_SYS_RESOURCE = 24
#: v1 controllers kubelet's cgroupfs manager expects the cgroup root in
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "name=systemd")


@dataclass(frozen=True)
class CgroupLayout:
    """The mounted hierarchies: v1 controller → mount point, and the cgroup2 mount (if any)."""

    v1: dict[str, Path]
    unified: Path | None

    @property
    def kind(self) -> str:
        if not self.v1:
            return "v2"
        return "hybrid" if self.unified else "v1"

    def hierarchies(self) -> list[Path]:
        """Every distinct mount point a node's cgroup root must exist in."""
        seen: list[Path] = []
        for path in [*self.v1.values(), *([self.unified] if self.unified else [])]:
            if path not in seen:
                seen.append(path)
        return seen


def parse_cgroup_mounts(mounts: str) -> CgroupLayout:
    """From /proc/self/mounts: which controller is mounted where."""
    v1: dict[str, Path] = {}
    unified: Path | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint, fstype, options = Path(fields[1]), fields[2], fields[3].split(",")
        if fstype == "cgroup2" and unified is None:
            unified = mountpoint
        elif fstype == "cgroup":
            for option in options:
                if option in V1_CONTROLLERS or option.startswith("name=") or option in ("hugetlb", "net_cls",
                                                                                          "net_prio", "perf_event",
                                                                                          "rdma", "misc"):
                    v1.setdefault(option, mountpoint)
    return CgroupLayout(v1=v1, unified=unified)


def has_capability(status: str, cap: int) -> bool:
    """From /proc/self/status: whether bit ``cap`` is in CapEff."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def detect_host(*, mounts: str | None = None, status: str | None = None, pid1: str | None = None) -> Host:
    mounts = mounts if mounts is not None else Path("/proc/self/mounts").read_text()
    status = status if status is not None else Path("/proc/self/status").read_text()
    pid1 = pid1 if pid1 is not None else Path("/proc/1/comm").read_text()
    layout = parse_cgroup_mounts(mounts)
    return Host(
        cgroup_driver="systemd" if pid1.strip() == "systemd" else "cgroupfs",
        cgroup_v1=layout.kind != "v2",
        restrict_oom_score_adj=not has_capability(status, CAP_SYS_RESOURCE),
    )


def cgroup_layout() -> CgroupLayout:
    return parse_cgroup_mounts(Path("/proc/self/mounts").read_text())


def ensure_cgroup_root(layout: CgroupLayout, root: str) -> None:
    """Create ``root`` in every hierarchy; seed cpuset.cpus/mems so tasks may join it."""
    for mount in layout.hierarchies():
        path = mount / root.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            own = path / knob
            if own.exists() and not own.read_text().strip():
                own.write_text((mount / knob).read_text().strip() or "0")


def join_cgroup_root(layout: CgroupLayout, root: str, leaf: str, pid: int) -> None:
    """Move ``pid`` into ``<root>/<leaf>`` of every hierarchy (the node's own processes live there)."""
    for mount in layout.hierarchies():
        path = mount / root.lstrip("/") / leaf
        path.mkdir(parents=True, exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            own = path / knob
            if own.exists() and not own.read_text().strip():
                own.write_text((path.parent / knob).read_text().strip())
        (path / "cgroup.procs").write_text(str(pid))


def pids_under(layout: CgroupLayout, root: str) -> set[int]:
    found: set[int] = set()
    for mount in layout.hierarchies():
        base = mount / root.lstrip("/")
        if not base.exists():
            continue
        for procs in base.rglob("cgroup.procs"):
            try:
                found.update(int(p) for p in procs.read_text().split())
            except (OSError, ValueError):
                continue
    return found


def remove_cgroup_root(layout: CgroupLayout, root: str, *, timeout: float = 10.0) -> list[int]:
    """Kill every process under ``root`` (SIGKILL; it is a teardown) and remove it everywhere."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while (pids := pids_under(layout, root)) and time.monotonic() < deadline:
        for pid in pids - {os.getpid()}:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    for mount in layout.hierarchies():
        base = mount / root.lstrip("/")
        if not base.exists():
            continue
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, base]:
            for _ in range(20):  # a group empties shortly after its last task is reaped
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
    return sorted(killed)
