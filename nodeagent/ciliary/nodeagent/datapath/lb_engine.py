"""The socket load balancer of one node: ten cgroup programs and their LB maps.

``SocketLB(node, cgroup=..., bpffs=..., netns=...)`` renders ``programs/sock_<hook>.c.j2`` (one
program per hook: connect4, sendmsg4, recvmsg4, getpeername4, their IPv6 twins for IPv4-mapped
destinations of IPv6 sockets, and bind4/bind6, the NodePort bind guard,
which needs the cookie of the node's network namespace ``netns``), adopts the programs pinned under their hash in
``<bpffs>/ciliary/<node>/`` (as ``lbprog_<hook>_<hash>``) or compiles them in the compiler child (``compiling``, as
``CGROUP_SOCK_ADDR`` with their expected attach type), and attaches each to the cgroup v2
directory with ``bpf_prog_attach`` (flags 0: a second attach replaces ours atomically; the
attachment outlives the agent, like the pins). ``apply(intent)`` plans against what the maps hold
(``lb_incremental``: the kernel's contents read at the first apply after a start or a failed write, then
what this engine wrote) and writes the difference, undoing it when a write fails.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from ciliary.nodeagent import lb_incremental, lb_planning, netns_sockets, rendering
from ciliary.nodeagent.datapath import compiling, errors, libbpf, loading, maps
from ciliary.nodeagent.datapath.icmp_limits import IcmpLimits
from ciliary.operator.services.intent import NodeLBIntent

log = logging.getLogger(__name__)

HOOKS: Mapping[str, tuple[str, int]] = {
    "connect4": ("CGROUP_SOCK_ADDR", 10),  # BPF_CGROUP_INET4_CONNECT
    "sendmsg4": ("CGROUP_SOCK_ADDR", 14),  # BPF_CGROUP_UDP4_SENDMSG
    "recvmsg4": ("CGROUP_SOCK_ADDR", 19),  # BPF_CGROUP_UDP4_RECVMSG
    "getpeername4": ("CGROUP_SOCK_ADDR", 29),  # BPF_CGROUP_INET4_GETPEERNAME
    "bind4": ("CGROUP_SOCK_ADDR", 8),  # BPF_CGROUP_INET4_BIND
    "connect6": ("CGROUP_SOCK_ADDR", 11),  # BPF_CGROUP_INET6_CONNECT
    "sendmsg6": ("CGROUP_SOCK_ADDR", 15),  # BPF_CGROUP_UDP6_SENDMSG
    "recvmsg6": ("CGROUP_SOCK_ADDR", 20),  # BPF_CGROUP_UDP6_RECVMSG
    "getpeername6": ("CGROUP_SOCK_ADDR", 30),  # BPF_CGROUP_INET6_GETPEERNAME
    "bind6": ("CGROUP_SOCK_ADDR", 9),  # BPF_CGROUP_INET6_BIND
}
"""hook -> (bcc program type, kernel attach type)."""
MAP_NAMES = ("cy_lb4_svc", "cy_lb4_be", "cy_lb4_revsk", "cy_lb4_aff", "cy_lb4_nodeport", "cy_lb4_srcrange")
TRAIL_MAP_NAMES = tuple(maps.TRAIL_MAPS)
"""Maps the socket programs share with the pod programs (include/lb_trail_maps.h): the policy engine
(``datapath.engine``) owns their pins and fills ``cy_lb4_podns``; this engine's teardown leaves them."""
PIN_PREFIX = "lbprog_"
"""Program pins are ``lbprog_<hook>_<hash16>``: never ``prog_*``, which the policy engine owns (and prunes)."""

libbpf.lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
libbpf.lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]


@dataclasses.dataclass(frozen=True)
class LBRenderContext:
    pin_dir: str
    services_size: int = 65536
    backends_size: int = 65536
    revsk_size: int = 65536
    affinity_size: int = 65536
    nat_size: int = 65536
    """cy_lb4_nat: two entries per north-south connection."""
    snat_ports: tuple[int, int] = (61000, 65535)
    """Source ports of SNATed north-south connections: above Linux's default ephemeral range."""
    host_netns_cookie: int = 0
    """Cookie of the node's network namespace (the bind guard's); 0 until ``start`` reads it."""
    icmp_limits: IcmpLimits = IcmpLimits()
    """The node's ICMP error rate limits (the north-south refusals'); ``DeviceLB.start`` reads them."""


class ServiceKeyC(ct.Structure):
    _fields_ = [("address", ct.c_uint32), ("dport", ct.c_uint16), ("proto", ct.c_uint8), ("scope", ct.c_uint8),
                ("slot", ct.c_uint16), ("pad2", ct.c_uint16)]


class ServiceValueC(ct.Structure):
    _fields_ = [("backend_id", ct.c_uint32), ("count", ct.c_uint16), ("flags", ct.c_uint16),
                ("affinity_timeout", ct.c_uint32), ("pad", ct.c_uint32)]


class BackendC(ct.Structure):
    _fields_ = [("address", ct.c_uint32), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("flags", ct.c_uint8)]


class BackendIdC(ct.Structure):
    _fields_ = [("id", ct.c_uint32)]


class NodePortKeyC(ct.Structure):
    _fields_ = [("port", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8)]


class FlagC(ct.Structure):
    _fields_ = [("value", ct.c_uint8)]


class SourceRangeKeyC(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("frontend_id", ct.c_uint32), ("addr", ct.c_uint32)]


SERVICES: maps.Codec[lb_planning.ServiceKey, lb_planning.ServiceValue] = maps.Codec(
    "cy_lb4_svc", ServiceKeyC, ServiceValueC,
    lambda k: ServiceKeyC(maps.addr_to_u32(k.address), socket.htons(k.port), k.proto, k.scope, k.slot, 0),
    lambda c: lb_planning.ServiceKey(maps.u32_to_addr(c.address), socket.ntohs(c.dport), c.proto, c.slot,
                                     c.scope),
    lambda v: ServiceValueC(v.backend_id, v.count, v.flags, v.affinity_timeout, 0),
    lambda c: lb_planning.ServiceValue(c.backend_id, c.count, c.flags, c.affinity_timeout))

BACKENDS: maps.Codec[int, lb_planning.Backend] = maps.Codec(
    "cy_lb4_be", BackendIdC, BackendC, lambda i: BackendIdC(i), lambda c: int(c.id),
    lambda b: BackendC(maps.addr_to_u32(b.address), socket.htons(b.port), b.proto, b.flags),
    lambda c: lb_planning.Backend(maps.u32_to_addr(c.address), socket.ntohs(c.port), c.proto, c.flags))


NODEPORTS: maps.Codec[lb_planning.NodePortKey, int] = maps.Codec(
    "cy_lb4_nodeport", NodePortKeyC, FlagC,
    lambda k: NodePortKeyC(socket.htons(k.port), k.proto, 0),
    lambda c: lb_planning.NodePortKey(socket.ntohs(c.port), c.proto),
    lambda v: FlagC(v), lambda c: int(c.value))


SOURCE_RANGES: maps.Codec[lb_planning.SourceRangeKey, int] = maps.Codec(
    "cy_lb4_srcrange", SourceRangeKeyC, FlagC,
    lambda k: SourceRangeKeyC(32 + k.network.prefixlen, k.frontend_id, maps.addr_to_u32(k.network.network_address)),
    lambda c: lb_planning.SourceRangeKey(c.frontend_id, IPv4Network((maps.u32_to_addr(c.addr), c.prefixlen - 32))),
    lambda v: FlagC(v), lambda c: int(c.value))


@dataclasses.dataclass(frozen=True)
class LBApplyResult:
    map_writes: int
    frontends: int
    backends: int
    plan_ms: float = 0.0
    write_ms: float = 0.0


class SocketLB:
    """One node's socket load balancer. Not thread-safe: drive it from one thread."""

    def __init__(self, node: str, *, cgroup: Path, bpffs: Path = Path("/sys/fs/bpf"), netns: str | None = None,
                 context: LBRenderContext | None = None, template_root: Path = rendering.DATAPATH_C_DIR) -> None:
        self.node = node
        self.netns = netns
        self.cgroup = cgroup
        self.bpffs = bpffs
        self.pin_dir = bpffs / "ciliary" / node
        self.context = context or LBRenderContext(pin_dir=str(self.pin_dir))
        self._root = template_root
        self._prog_fds: dict[str, int] = {}
        self._map_fds: dict[str, int] = {}
        self._planner: lb_incremental.LBPlanner | None = None
        """What the maps hold, as this engine wrote them (read from the kernel at the first apply after a start
        or a failed write): one change plans only what changed."""
        self._write_failed = False
        """The last apply's write failed (its rollback may have been partial): ``resync`` says apply again."""
        self.started = False

    def render(self) -> dict[str, rendering.RenderedProgram]:
        return {hook: rendering.render_template(f"programs/sock_{hook}.c.j2", self.context, hook=f"sock_{hook}",
                                                name=f"cy_sock_{hook}", prog_type=prog_type, attach_type=attach,
                                                root=self._root)
                for hook, (prog_type, attach) in HOOKS.items()}

    def start(self) -> None:
        """Adopt or compile the programs, open the maps, attach to the cgroup. Idempotent."""
        loading.ensure_bpffs(self.bpffs)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        if not self.context.host_netns_cookie:
            self.context = dataclasses.replace(self.context, host_netns_cookie=netns_sockets.netns_cookie(self.netns))
        programs = self.render()
        jobs: list[tuple[rendering.RenderedProgram, Path]] = []
        paths: dict[str, Path] = {}
        for hook, program in programs.items():
            path = paths[hook] = self.pin_dir / f"{PIN_PREFIX}{hook}_{program.sha256[:16]}"
            if path.exists() and self._uses_our_maps(path):
                continue
            jobs.append((program, path))
        if jobs:
            loading.ensure_pinned_maps(self.pin_dir, maps.TRAIL_MAPS)
        compiling.compile_and_pin(jobs)
        self.close()
        self._prog_fds = {hook: loading.open_pinned(path) for hook, path in paths.items()}
        self._map_fds = {name: loading.open_pinned(self.pin_dir / name) for name in MAP_NAMES}
        self.cgroup = cgroup2_dir(self.cgroup)
        cg = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook, (_, attach) in HOOKS.items():
                res = libbpf.lib.bpf_prog_attach(self._prog_fds[hook], cg, attach, 0)
                if res < 0:
                    err = libbpf.last_errno(res)
                    raise errors.AttachFailed(str(self.cgroup), f"sock_{hook}", os.strerror(err))
        finally:
            os.close(cg)
        for stale in set(self.pin_dir.glob(f"{PIN_PREFIX}*")) - set(paths.values()):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # an older render's program (no longer attached: ours replaced it)
        self.started = True
        log.info("Socket load balancer attached", extra={"node": self.node, "cgroup": str(self.cgroup),
                                                         "compiled": [p.hook for p, _ in jobs]})

    def _uses_our_maps(self, path: Path) -> bool:
        fd = loading.open_pinned(path)
        try:
            return loading.uses_only(fd, [self.pin_dir / name for name in (*MAP_NAMES, *TRAIL_MAP_NAMES)])
        finally:
            os.close(fd)

    def observe(self) -> lb_planning.LBState:
        return lb_planning.LBState(maps.read_map(self._map_fds["cy_lb4_svc"], SERVICES),
                                   maps.read_map(self._map_fds["cy_lb4_be"], BACKENDS),
                                   maps.read_map(self._map_fds["cy_lb4_nodeport"], NODEPORTS),
                                   maps.read_map(self._map_fds["cy_lb4_srcrange"], SOURCE_RANGES))

    def resync(self) -> bool:
        """Read the maps; True when they no longer hold what this engine wrote (someone else wrote or deleted
        entries; or the last apply's write failed): its record is dropped, so the next apply plans against what
        the kernel holds."""
        if self._planner is None:
            return self._write_failed  # the maps hold what a partial rollback left: apply again
        if self.observe() == self._planner.state:
            return False
        self._planner = None
        return True

    def apply(self, intent: NodeLBIntent, shards: lb_incremental.Shards | None = None) -> LBApplyResult:
        """Write the maps towards ``intent`` (``shards``: its shards, see ``lb_incremental``)."""
        if self._planner is None:
            self._planner = lb_incremental.LBPlanner(self.observe(), services_size=self.context.services_size,
                                                     backends_size=self.context.backends_size,
                                                     source_ranges_size=self.context.services_size)
        observed = self._planner.state
        t0 = time.perf_counter()
        step = self._planner.plan(intent, shards)
        t1 = time.perf_counter()
        undo = maps.UndoLog()
        svc_fd, be_fd = self._map_fds["cy_lb4_svc"], self._map_fds["cy_lb4_be"]
        np_fd, sr_fd = self._map_fds["cy_lb4_nodeport"], self._map_fds["cy_lb4_srcrange"]
        try:
            maps.apply_upserts(sr_fd, SOURCE_RANGES, observed.source_ranges, step.source_range_writes, undo)
            maps.apply_upserts(be_fd, BACKENDS, observed.backends, step.backend_upserts, undo)
            maps.apply_upserts(svc_fd, SERVICES, observed.services, step.service_writes, undo)
            maps.apply_deletes(svc_fd, SERVICES, observed.services, step.service_writes, undo)
            maps.apply_deletes(be_fd, BACKENDS, observed.backends, step.backend_deletes, undo)
            maps.apply_upserts(np_fd, NODEPORTS, observed.nodeports, step.nodeport_writes, undo)
            maps.apply_deletes(np_fd, NODEPORTS, observed.nodeports, step.nodeport_writes, undo)
            maps.apply_deletes(sr_fd, SOURCE_RANGES, observed.source_ranges, step.source_range_writes, undo)
        except errors.MapWriteFailed:
            undo.rollback()
            self._planner = None  # the rollback may have been partial: read the kernel again next time
            self._write_failed = True
            raise
        self._planner.commit(step)
        self._write_failed = False
        t2 = time.perf_counter()
        return LBApplyResult(len(step), len(intent.frontends), len(step.desired.backends), round((t1 - t0) * 1000, 1),
                             round((t2 - t1) * 1000, 1))

    def close(self) -> None:
        for fd in (*self._prog_fds.values(), *self._map_fds.values()):
            os.close(fd)
        self._prog_fds.clear()
        self._map_fds.clear()
        self._planner = None
        self.started = False

    def teardown(self) -> None:
        """Detach from the cgroup and unpin the programs and LB maps."""
        with contextlib.suppress(OSError):
            cg = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for hook, (_, attach) in HOOKS.items():
                    if hook in self._prog_fds:
                        libbpf.lib.bpf_prog_detach2(self._prog_fds[hook], cg, attach)
            finally:
                os.close(cg)
        self.close()
        for pinned in list(self.pin_dir.glob(f"{PIN_PREFIX}*")) + [self.pin_dir / n for n in MAP_NAMES]:
            with contextlib.suppress(FileNotFoundError):
                pinned.unlink()


def _slots(state: lb_planning.LBState, key: lb_planning.ServiceKey, count: int) -> list[dict[str, Any]]:
    backends = []
    for slot in range(1, count + 1):
        slot_entry = state.services.get(dataclasses.replace(key, slot=slot))
        be = state.backends.get(slot_entry.backend_id) if slot_entry else None
        backends.append({"slot": slot, "id": slot_entry.backend_id if slot_entry else None,
                         "address": str(be.address) if be else None, "port": be.port if be else None,
                         "local": bool(be.flags & lb_planning.BACKEND_LOCAL) if be else None})
    return backends


FLAG_NAMES = (("no-local-backends", lb_planning.FLAG_NO_LOCAL), ("affinity", lb_planning.FLAG_AFFINITY),
              ("external", lb_planning.FLAG_EXTERNAL), ("external-local", lb_planning.FLAG_EXT_LOCAL),
              ("source-ranges", lb_planning.FLAG_SOURCE_RANGES), ("dsr", lb_planning.FLAG_DSR))


def cgroup2_dir(path: Path) -> Path:
    """``path`` if it is a cgroup v2 directory, else its ``unified/`` (the cgroup2 mount of a hybrid host's
    /sys/fs/cgroup) when that is one; a path that is neither is returned as given (attaching then fails)."""
    if not (path / "cgroup.controllers").exists() and (path / "unified" / "cgroup.controllers").exists():
        return path / "unified"
    return path


def document(node: str, state: lb_planning.LBState, intent: NodeLBIntent | None, error: str = "") -> dict[str, Any]:
    """What the kernel's maps hold, frontend by frontend (``GET /v1/services``, ``ciliary service list``).

    A frontend with externalTrafficPolicy Local also shows ``external_backends``: the set clients from
    outside the node get on the external devices (its scope-external entries)."""
    names = {(IPv4Address(fe.address), fe.port, fe.protocol): fe for fe in (intent.frontends if intent else ())}
    protos = {6: "TCP", 17: "UDP", 132: "SCTP"}
    rows = []
    for key in sorted(k for k in state.services if k.slot == 0 and k.scope == 0):
        entry = state.services[key]
        proto = protos.get(key.proto, str(key.proto))
        fe = names.get((key.address, key.port, proto))
        row = {"id": entry.backend_id, "address": str(key.address), "port": key.port, "protocol": proto,
               "service": fe.service if fe else "", "kind": str(fe.kind) if fe else "",
               "flags": [n for n, bit in FLAG_NAMES if entry.flags & bit],
               "affinity_timeout": entry.affinity_timeout, "backends": _slots(state, key, entry.count)}
        if entry.flags & lb_planning.FLAG_SOURCE_RANGES:
            row["source_ranges"] = sorted(str(k.network) for k in state.source_ranges
                                          if k.frontend_id == entry.backend_id)
        ext_key = dataclasses.replace(key, scope=lb_planning.SCOPE_EXTERNAL)
        ext = state.services.get(ext_key)
        if ext is not None:
            row["external_backends"] = _slots(state, ext_key, ext.count)
            row["external_flags"] = [n for n, bit in FLAG_NAMES if ext.flags & bit]
        rows.append(row)
    return {"node": node, "frontends": rows,
            "problems": [p.model_dump() for p in intent.problems] if intent else [], "error": error}
