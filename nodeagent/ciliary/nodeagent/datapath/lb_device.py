"""North-south load balancing: the tc programs on the node's external devices and their maps.

``DeviceLB(node, devices=..., bpffs=..., netns=..., context=...)`` renders
``programs/tc_lb_{ingress,egress}.c.j2`` (logic in ``lib/lb_nodeport.h``) with the socket load
balancer's render context (the two share ``cy_lb4_svc`` and ``cy_lb4_be``, which ``lb_engine``
fills), adopts the programs pinned under their hash (``nsprog_<hook>_<hash16>``: neither the
policy engine's ``prog_*`` nor the socket load balancer's ``lbprog_*``, which each prune their own)
or compiles them, writes each device's SNAT address into ``cy_lb4_dev`` and attaches the programs
at the device's clsact ingress and egress with a handle of their own (the policy engine's tc code
never lists or detaches them). Devices: the names given, or ``auto`` (:func:`choose_devices`).
The attachments and pins outlive the agent, like the policy programs.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import errno as errno_mod
import ipaddress
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from ciliary.nodeagent import rendering
from ciliary.nodeagent.datapath import compiling, errors, icmp_limits, loading, maps
from ciliary.nodeagent.datapath.lb_engine import LBRenderContext
from ciliary.nodeagent.planning import diff_map

log = logging.getLogger(__name__)

HOOKS: Mapping[str, int] = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
"""hook -> clsact parent (ingress: packets arriving on the device; egress: leaving)."""
TC_HANDLE = 0xC2
TC_PRIO = 1
ETH_P_ALL = 0x0003
PIN_PREFIX = "nsprog_"
MAP_NAMES = ("cy_lb4_dev", "cy_lb4_nat", "cy_lb4_nsct", "cy_lb4_icmppeer", "cy_lb4_icmpnode")
AUTO = "auto"

NS_REASONS: Mapping[int, str] = {
    1: "new", 2: "forward", 3: "reply", 4: "no-backend", 5: "drop-no-local-backend", 6: "drop-fragment",
    7: "drop-no-snat-port", 8: "drop-no-route", 9: "drop-rewrite-failed", 10: "rst-sent",
    11: "icmp-sent", 12: "drop-source-range", 13: "icmp-rate-limited", 14: "dsr-learnt", 15: "drop-dsr"}
"""``include/lb_ns_reasons.h``: index of ``cy_lb4_nsct`` -> name."""
NS_REASON_MAX = 16


class DeviceC(ct.Structure):
    _fields_ = [("snat_addr", ct.c_uint32), ("flags", ct.c_uint32)]


class NatKeyC(ct.Structure):
    _fields_ = [("saddr", ct.c_uint32), ("daddr", ct.c_uint32), ("sport", ct.c_uint16), ("dport", ct.c_uint16),
                ("proto", ct.c_uint8), ("hook", ct.c_uint8), ("pad", ct.c_uint16)]


class U64C(ct.Structure):
    _fields_ = [("value", ct.c_uint64)]


class IfindexC(ct.Structure):
    _fields_ = [("ifindex", ct.c_uint32)]


DEVICES: maps.Codec[int, ipaddress.IPv4Address] = maps.Codec(
    "cy_lb4_dev", IfindexC, DeviceC, lambda i: IfindexC(i), lambda c: int(c.ifindex),
    lambda a: DeviceC(maps.addr_to_u32(a), 0), lambda c: maps.u32_to_addr(c.snat_addr))


@dataclasses.dataclass(frozen=True)
class LinkInfo:
    """What device selection needs to know about one link of the node's network namespace."""

    name: str
    index: int
    addresses: tuple[ipaddress.IPv4Interface, ...] = ()
    default_route: bool = False
    loopback: bool = False


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    index: int
    snat_address: ipaddress.IPv4Address


class DeviceSelectionError(ValueError):
    """A configured device does not exist or has no IPv4 address to SNAT to (carries its name)."""

    def __init__(self, device: str, message: str) -> None:
        super().__init__(f"--lb-devices {device!r}: {message}")
        self.device = device


def _snat_address(link: LinkInfo) -> ipaddress.IPv4Address | None:
    usable = [i for i in link.addresses if i.network.prefixlen < 32] or list(link.addresses)
    return usable[0].ip if usable else None


def choose_devices(links: Sequence[LinkInfo], wanted: Sequence[str] | None) -> list[Device]:
    """The external devices (pure). ``wanted`` None (``auto``): the links carrying an IPv4 default
    route; without one, every non-loopback link with an IPv4 address whose prefix is shorter than /32
    (a pod's host veth carries only the /32 gateway address). Each device SNATs to its first such
    address. A name given that is missing or has no IPv4 address is an error."""
    by_name = {link.name: link for link in links}
    if wanted is not None:
        chosen = []
        for name in wanted:
            link = by_name.get(name)
            if link is None:
                raise DeviceSelectionError(name, "no such device in the node's network namespace")
            address = _snat_address(link)
            if address is None:
                raise DeviceSelectionError(name, "the device has no IPv4 address")
            chosen.append(Device(name, link.index, address))
        return chosen
    candidates = [link for link in links if link.default_route and not link.loopback] or [
        link for link in links if not link.loopback and any(i.network.prefixlen < 32 for i in link.addresses)]
    return [Device(link.name, link.index, address) for link in sorted(candidates, key=lambda x: x.name)
            if (address := _snat_address(link)) is not None]


def read_links(netns: str | None) -> list[LinkInfo]:
    """Links, IPv4 addresses and default routes of ``netns``, by netlink."""
    with loading._ipr(netns) as ipr:
        addresses: dict[int, list[ipaddress.IPv4Interface]] = {}
        for msg in ipr.get_addr(family=2):
            addresses.setdefault(int(msg["index"]), []).append(
                ipaddress.IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"))
        defaults = {int(r.get_attr("RTA_OIF") or 0) for r in ipr.get_routes(family=2, table=254)
                    if r["dst_len"] == 0}
        return [LinkInfo(str(link.get_attr("IFLA_IFNAME")), int(link["index"]),
                         tuple(addresses.get(int(link["index"]), ())), int(link["index"]) in defaults,
                         bool(link["flags"] & 0x8))  # IFF_LOOPBACK
                for link in ipr.get_links()]


def _attach(netns: str | None, ifindex: int, hook: str, prog_fd: int, name: str) -> None:
    try:
        with loading._ipr(netns) as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code != errno_mod.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", ifindex, handle=TC_HANDLE, prio=TC_PRIO, protocol=ETH_P_ALL,
                   fd=prog_fd, name=name, parent=HOOKS[hook], classid=1, direct_action=True)
    except (NetlinkError, OSError) as exc:
        raise errors.AttachFailed(str(ifindex), f"tc_lb_{hook}", str(exc)) from exc


def _detach(netns: str | None, ifindex: int, hook: str) -> None:
    with contextlib.suppress(NetlinkError, OSError), loading._ipr(netns) as ipr:
        ipr.tc("del-filter", "bpf", ifindex, handle=TC_HANDLE, prio=TC_PRIO, protocol=ETH_P_ALL, parent=HOOKS[hook])


class DeviceLB:
    """The north-south programs of one node. Not thread-safe: drive it from one thread."""

    def __init__(self, node: str, *, devices: Sequence[str] | None, bpffs: Path = Path("/sys/fs/bpf"),
                 netns: str | None = None, context: LBRenderContext | None = None,
                 template_root: Path = rendering.DATAPATH_C_DIR) -> None:
        self.node = node
        self.wanted = None if devices is None else tuple(devices)
        self.netns = netns
        self.pin_dir = bpffs / "ciliary" / node
        self.bpffs = bpffs
        self.context = context or LBRenderContext(pin_dir=str(self.pin_dir))
        self._root = template_root
        self._prog_fds: dict[str, int] = {}
        self._map_fds: dict[str, int] = {}
        self.devices: list[Device] = []
        self.started = False

    def render(self) -> dict[str, rendering.RenderedProgram]:
        return {hook: rendering.render_template(f"programs/tc_lb_{hook}.c.j2", self.context, hook=f"tc_lb_{hook}",
                                                name=f"cy_lb_{hook}", root=self._root)
                for hook in HOOKS}

    def start(self, context: LBRenderContext | None = None) -> None:
        """Adopt or compile, open the maps, write ``cy_lb4_dev`` and attach to every device. Idempotent."""
        if context is not None:
            self.context = context
        self.context = dataclasses.replace(self.context, icmp_limits=icmp_limits.read(self.netns))
        loading.ensure_bpffs(self.bpffs)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        devices = choose_devices(read_links(self.netns), self.wanted)
        paths: dict[str, Path] = {}
        jobs: list[tuple[rendering.RenderedProgram, Path]] = []
        for hook, program in self.render().items():
            path = paths[hook] = self.pin_dir / f"{PIN_PREFIX}{hook}_{program.sha256[:16]}"
            if not (path.exists() and self._uses_our_maps(path)):
                jobs.append((program, path))
        compiling.compile_and_pin(jobs)
        self.close()
        self._prog_fds = {hook: loading.open_pinned(path) for hook, path in paths.items()}
        self._map_fds = {name: loading.open_pinned(self.pin_dir / name) for name in MAP_NAMES}
        wanted = {d.index: d.snat_address for d in devices}
        dev_fd = self._map_fds["cy_lb4_dev"]
        held = maps.read_map(dev_fd, DEVICES)
        diff = diff_map(held, wanted)
        undo = maps.UndoLog()
        maps.apply_upserts(dev_fd, DEVICES, held, diff, undo)
        for d in devices:
            for hook in HOOKS:
                _attach(self.netns, d.index, hook, self._prog_fds[hook], f"cy_lb_{hook}")
        maps.apply_deletes(dev_fd, DEVICES, held, diff, undo)  # a device no longer ours: its programs pass all
        for index in set(held) - set(wanted):
            for hook in HOOKS:
                _detach(self.netns, index, hook)
        for stale in set(self.pin_dir.glob(f"{PIN_PREFIX}*")) - set(paths.values()):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self.devices = devices
        self.started = True
        log.info("North-south load balancer attached", extra={
            "node": self.node, "devices": {d.name: str(d.snat_address) for d in devices},
            "compiled": [p.hook for p, _ in jobs]})

    def _uses_our_maps(self, path: Path) -> bool:
        fd = loading.open_pinned(path)
        try:
            return loading.uses_only(fd, [self.pin_dir / n for n in (*MAP_NAMES, "cy_lb4_svc", "cy_lb4_be")])
        finally:
            os.close(fd)

    def counters(self) -> dict[str, int]:
        """Packets per outcome (``cy_lb4_nsct`` summed over CPUs), by name."""
        fd = self._map_fds["cy_lb4_nsct"]
        return {name: sum(v.value for v in maps.read_percpu(fd, index, U64C)) for index, name in NS_REASONS.items()}

    def connections(self) -> int:
        """Entries of ``cy_lb4_nat`` (two per connection; expired ones until reused or evicted)."""
        return maps.count_entries(self._map_fds["cy_lb4_nat"], NatKeyC)

    def document(self) -> dict[str, Any]:
        return {"devices": [{"name": d.name, "ifindex": d.index, "snat_address": str(d.snat_address)}
                            for d in self.devices],
                "counters": self.counters(), "nat_entries": self.connections()}

    def close(self) -> None:
        for fd in (*self._prog_fds.values(), *self._map_fds.values()):
            os.close(fd)
        self._prog_fds.clear()
        self._map_fds.clear()
        self.started = False

    def teardown(self, indexes: Iterable[int] = ()) -> None:
        """Detach from the devices and unpin the programs and north-south maps."""
        for index in {*indexes, *(d.index for d in self.devices)}:
            for hook in HOOKS:
                _detach(self.netns, index, hook)
        self.close()
        for pinned in list(self.pin_dir.glob(f"{PIN_PREFIX}*")) + [self.pin_dir / n for n in MAP_NAMES]:
            with contextlib.suppress(FileNotFoundError):
                pinned.unlink()

