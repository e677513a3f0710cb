"""Attach programs to host veths with tc, and pin/adopt bpffs objects.

Called by ``engine``. Every tc operation runs inside the node's network
namespace (``netns=None``: the current one) through pyroute2, with an
explicit handle/prio/protocol so ``replace-filter`` swaps a program
atomically instead of stacking a second filter (pyroute2 pitfall P3).
Programs are pinned (by ``compiler``, in its child process) so the datapath
survives a ``kill -9`` of the agent; an agent re-opens them with ``bpf_obj_get``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_mod
import os
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import sched_bpf

from ciliary.nodeagent.datapath import errors, libbpf

TC_HANDLE = 0xC1
TC_PRIO = 1
ETH_P_ALL = 0x0003
PARENTS = {"from_pod": 0xFFFFFFF2, "to_pod": 0xFFFFFFF3}
"""from_pod: clsact ingress of the host veth (the pod's egress); to_pod: clsact egress."""

# pyroute2 0.9.7 decodes a bpf filter's options only up to TCA_BPF_FLAGS (8); the kernel also
# sends TCA_BPF_FLAGS_GEN (9), TCA_BPF_TAG (10) and TCA_BPF_ID (11), the attached program's id,
# which is what tells our program from another one at the same handle and prio.
if "TCA_BPF_ID" not in (name for name, _ in sched_bpf.options.nla_map):
    sched_bpf.options.nla_map = tuple(sched_bpf.options.nla_map)[:9] + (
        ("TCA_BPF_FLAGS_GEN", "uint32"), ("TCA_BPF_TAG", "hex"), ("TCA_BPF_ID", "uint32"))

# ---------------------------------------------------------------- bpffs


def ensure_bpffs(root: Path = Path("/sys/fs/bpf")) -> None:
    """Mount bpffs at ``root`` unless ``root`` already is, or lies under, a bpffs mount.

    A directory inside a mounted bpffs (e.g. a lab's ``/sys/fs/bpf/ciliary/<prefix>/<node>``)
    is used as it is: mounting a second bpffs instance there would hide the pins from
    everyone else and keep the directory busy.
    """
    target = os.path.abspath(root)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "bpf":
                mount_point = fields[1]
                if target == mount_point or target.startswith(mount_point.rstrip("/") + "/"):
                    return
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True, timeout=10)


def pin(fd: int, path: Path) -> None:
    libbpf.obj_pin(fd, path)


def ensure_pinned_maps(pin_dir: Path, shapes: Mapping[str, tuple[int, int, int, int]]) -> None:
    """Create and pin each map of ``shapes`` (name -> type, key size, value size, entries) not pinned with that
    shape yet (one of another shape, an older layout, is unpinned first), before a compile: maps two engines'
    programs share would otherwise be created by both their compiles at once, and the second pin fails."""
    with _PIN_LOCK:  # the two engines start in two threads: one checks, replaces and pins at a time
        for name, shape in shapes.items():
            _ensure_pinned_map(pin_dir / name, name, *shape)


_PIN_LOCK = threading.Lock()


def _ensure_pinned_map(path: Path, name: str, map_type: int, key_size: int, value_size: int, entries: int) -> None:
    info = pinned_map_info(path)
    if info is not None and (info.type, info.key_size, info.value_size, info.max_entries) == (
            map_type, key_size, value_size, entries):
        return
    if info is not None:  # an older layout: bcc would reuse it silently
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    fd = libbpf.map_create(map_type, name, key_size, value_size, entries)
    try:
        libbpf.obj_pin(fd, path)
    except OSError as exc:
        if exc.errno != errno_mod.EEXIST:  # another process pinned one meanwhile: as good
            raise
    finally:
        os.close(fd)


def open_pinned(path: Path) -> int:
    """An fd for a pinned object (caller closes it)."""
    return libbpf.obj_get(path)


def prog_id(fd: int) -> int:
    return libbpf.prog_info(fd).id


def pinned_map_info(path: Path) -> libbpf.MapInfo | None:
    """Shape of a pinned map, or None if nothing is pinned there."""
    if not path.exists():
        return None
    fd = open_pinned(path)
    try:
        return libbpf.map_info(fd)
    finally:
        os.close(fd)


def uses_only(prog_fd: int, map_paths: list[Path]) -> bool:
    """Whether every map of the program is one of the maps pinned at ``map_paths``.

    A program pinned by a previous agent is adopted only then: if one of its maps
    was unpinned (and a fresh one pinned), it would write to a map nobody reads.
    """
    pinned: set[int] = set()
    for path in map_paths:
        info = pinned_map_info(path)
        if info is not None:
            pinned.add(info.id)
    return set(libbpf.prog_info(prog_fd).map_ids) <= pinned


def program_pin_path(pin_dir: Path, hook: str, sha256: str) -> Path:
    """Pins are named after the rendered hash (bpffs names may not contain dots)."""
    return pin_dir / f"prog_{hook}_{sha256[:16]}"


# ---------------------------------------------------------------- tc


@contextlib.contextmanager
def _ipr(netns: str | None) -> Iterator[IPRoute]:
    # flags=0: never create a missing netns (pitfall P2).
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def attach(netns: str | None, ifindex: int, hook: str, prog_fd: int, prog_name: str) -> None:
    """Attach (or atomically replace) our filter for ``hook`` on ``ifindex``."""
    try:
        with _ipr(netns) as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code != errno_mod.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", ifindex, handle=TC_HANDLE, prio=TC_PRIO, protocol=ETH_P_ALL,
                   fd=prog_fd, name=prog_name, parent=PARENTS[hook], classid=1, direct_action=True)
    except (NetlinkError, OSError) as exc:
        raise errors.AttachFailed(str(ifindex), hook, str(exc)) from exc


def detach(netns: str | None, ifindex: int, hook: str) -> None:
    """Remove our filter; a veth that is already gone counts as detached."""
    try:
        with _ipr(netns) as ipr:
            ipr.tc("del-filter", "bpf", ifindex, handle=TC_HANDLE, prio=TC_PRIO, protocol=ETH_P_ALL,
                   parent=PARENTS[hook])
    except NetlinkError as exc:
        if exc.code not in (errno_mod.ENOENT, errno_mod.ENODEV, errno_mod.EINVAL):
            raise errors.AttachFailed(str(ifindex), hook, str(exc)) from exc


def _our_filters(ipr: IPRoute, index: int, hook: str) -> list[tuple[int, str]]:
    """(program id, filter name) of each filter with our kind/handle/prio on ``hook`` of ``index``."""
    found = []
    for msg in ipr.get_filters(index=index, parent=PARENTS[hook]):
        options = msg.get_attr("TCA_OPTIONS")
        if msg.get_attr("TCA_KIND") == "bpf" and (msg["info"] >> 16) == TC_PRIO and \
                msg["handle"] == TC_HANDLE and options is not None:
            found.append((int(options.get_attr("TCA_BPF_ID") or 0), str(options.get_attr("TCA_BPF_NAME") or "")))
    return found


def attached_hooks(netns: str | None, ifindexes: Iterable[int]) -> tuple[dict[tuple[int, str], int], set[int]]:
    """({(ifindex, hook): id of the program our filter runs}, ifindexes that no longer exist), by netlink."""
    found: dict[tuple[int, str], int] = {}
    gone: set[int] = set()
    with _ipr(netns) as ipr:
        for index in ifindexes:
            try:
                ipr.link("get", index=index)
            except NetlinkError:
                gone.add(index)
                continue
            for hook in PARENTS:
                try:
                    filters = _our_filters(ipr, index, hook)
                except NetlinkError:
                    continue
                for prog, _name in filters:
                    found[(index, hook)] = prog
    return found, gone


@dataclasses.dataclass(frozen=True)
class TcFilter:
    ifname: str
    ifindex: int
    hook: str
    prog_id: int
    name: str


def list_filters(netns: str | None) -> list[TcFilter]:
    """Our bpf filters (handle/prio of this module) on every link of the netns, by netlink."""
    found: list[TcFilter] = []
    with _ipr(netns) as ipr:
        links = [(int(link["index"]), str(link.get_attr("IFLA_IFNAME"))) for link in ipr.get_links()]
        for index, name in links:
            for hook in PARENTS:
                try:
                    filters = _our_filters(ipr, index, hook)
                except NetlinkError:
                    continue
                found += [TcFilter(name, index, hook, prog, prog_name) for prog, prog_name in filters]
    return found
