"""Plan the socket load balancer's map contents from a load-balancing intent (pure).

:func:`plan` takes the node's ``NodeLBIntent`` and what the LB maps hold and returns the writes
from scratch (``lb_incremental`` gives the same plan from what changed; ``datapath.lb_engine`` uses
that), ordered so a program reading concurrently never sees a frontend whose slots are not written
yet: backends first, then backend slots, then each frontend's own entry (its count), then deletions
(a frontend's own entry before its slots), unused backends last. Frontend and backend ids the maps
hold are kept (open sockets and affinity entries refer to them); a backend whose flags alone changed
keeps its id; other new ids are above every id the maps hold. The NodePorts of the intent's frontends
(port, protocol) go to the bind guard's map.

North-south (``lb_device``): frontends of kind NodePort, ExternalIP and LoadBalancer carry
``FLAG_EXTERNAL`` (the device programs serve only those); a backend running on this node
(``BackendIntent.node`` is the intent's node) carries ``BACKEND_LOCAL`` (reached without SNAT); one whose
endpoint names a node carries ``BACKEND_ON_NODE`` (that node's programs can answer it by DSR; a backend outside
the cluster always gets SNAT).
An external frontend whose ``traffic_policy`` is ``Local`` also gets entries of scope
``SCOPE_EXTERNAL``: the backends of its set that run on this node, ``FLAG_NO_LOCAL`` when there
are endpoints but none here; its own entry carries ``FLAG_EXT_LOCAL`` and is written after them.
Socket clients (pods and the host) keep the whole set, as kube-proxy treats pod traffic.
A LoadBalancer frontend with ``source_ranges`` carries ``FLAG_SOURCE_RANGES`` and its IPv4 ranges go to
``cy_lb4_srcrange`` under its frontend id (written before the entry that turns the check on); the
device programs drop a new connection from any other client (an IPv6-only list admits no IPv4
client: the flag with no IPv4 range drops them all). An external frontend with ``dsr`` carries ``FLAG_DSR``:
its clients from outside reach backends on other nodes by direct server return (``lib/lb_dsr.h``); its
NodePort's entry in the bind guard's map carries ``NODEPORT_DSR`` (the backend's node believes a DSR option
naming it only then).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, ip_network

from ciliary.nodeagent.planning import MapDiff, diff_map
from ciliary.operator.services.intent import PROTOCOL_NUMBERS, FrontendIntent, FrontendKind, NodeLBIntent

FLAG_NO_LOCAL = 0x1
FLAG_AFFINITY = 0x2
FLAG_EXTERNAL = 0x4
FLAG_EXT_LOCAL = 0x8
FLAG_SOURCE_RANGES = 0x10
FLAG_DSR = 0x20
BACKEND_LOCAL = 0x1
BACKEND_ON_NODE = 0x2
NODEPORT_DSR = 0x2
SCOPE_EXTERNAL = 1


@functools.lru_cache(maxsize=1 << 17)
def _address(text: str) -> IPv4Address:
    """Parsed once per address string: at 10,000 Services a plan parses ~40,000 of them, the same each time."""
    return IPv4Address(text)


@dataclasses.dataclass(frozen=True, order=True)
class ServiceKey:
    address: IPv4Address
    port: int
    proto: int
    slot: int = 0
    scope: int = 0
    """0: every client; ``SCOPE_EXTERNAL``: clients from outside the node (externalTrafficPolicy Local)."""


@dataclasses.dataclass(frozen=True)
class ServiceValue:
    backend_id: int
    """slot 0: the frontend's id; slot n: the backend's id."""
    count: int = 0
    flags: int = 0
    affinity_timeout: int = 0


@dataclasses.dataclass(frozen=True, order=True)
class Backend:
    address: IPv4Address
    port: int
    proto: int
    flags: int = 0
    """``BACKEND_LOCAL``: runs on this node."""


@dataclasses.dataclass(frozen=True, order=True)
class NodePortKey:
    port: int
    proto: int


@dataclasses.dataclass(frozen=True, order=True)
class SourceRangeKey:
    frontend_id: int
    network: IPv4Network


@dataclasses.dataclass(frozen=True)
class LBState:
    services: Mapping[ServiceKey, ServiceValue] = dataclasses.field(default_factory=dict)
    backends: Mapping[int, Backend] = dataclasses.field(default_factory=dict)
    nodeports: Mapping[NodePortKey, int] = dataclasses.field(default_factory=dict)
    """NodePorts host processes may not bind (value always 1)."""
    source_ranges: Mapping[SourceRangeKey, int] = dataclasses.field(default_factory=dict)
    """Clients a frontend with ``FLAG_SOURCE_RANGES`` admits from outside the node (value always 1)."""


@dataclasses.dataclass(frozen=True)
class LBPlan:
    desired: LBState
    backend_upserts: MapDiff[int, Backend]
    service_writes: MapDiff[ServiceKey, ServiceValue]
    backend_deletes: MapDiff[int, Backend]
    nodeport_writes: MapDiff[NodePortKey, int] = dataclasses.field(default_factory=MapDiff)
    source_range_writes: MapDiff[SourceRangeKey, int] = dataclasses.field(default_factory=MapDiff)
    """Upserts go before the service writes (a frontend's check never runs against a missing range);
    deletions after them."""

    def __len__(self) -> int:
        return (len(self.backend_upserts) + len(self.service_writes) + len(self.backend_deletes)
                + len(self.nodeport_writes) + len(self.source_range_writes))


class LBCapacityError(ValueError):
    """The intent needs more entries than an LB map holds (carries the map and the numbers)."""

    def __init__(self, map_name: str, wanted: int, capacity: int) -> None:
        super().__init__(f"{map_name}: {wanted} entries wanted, {capacity} fit")
        self.map_name, self.wanted, self.capacity = map_name, wanted, capacity


Place = tuple[IPv4Address, int, int]
"""A backend's (address, port, protocol): its identity apart from its flags."""


def places(backends: Mapping[int, Backend]) -> dict[Place, list[int]]:
    """Ids of ``backends`` by place, lowest first (the candidates a backend whose flags changed takes over)."""
    out: dict[Place, list[int]] = {}
    for ident in sorted(backends):
        be = backends[ident]
        out.setdefault((be.address, be.port, be.proto), []).append(ident)
    return out


def assign_backend_ids(wanted: list[Backend], known: Callable[[Backend], int | None],
                       by_place: Mapping[Place, list[int]], next_id: int) -> tuple[dict[Backend, int], int]:
    """Ids of the backends ``wanted`` (distinct): the one ``known`` gives for the same value; else, for a backend
    whose flags alone changed, the lowest id of its place in ``by_place`` that no other wanted value holds (the
    flags are rewritten in place: renumbering would move established north-south connections and affinity
    entries to other backends); else a new one."""
    ids = {}
    for be in wanted:
        ident = known(be)
        if ident is not None:
            ids[be] = ident
    taken = set(ids.values())
    for be in wanted:
        if be in ids:
            continue
        moved = next((i for i in by_place.get((be.address, be.port, be.proto), ()) if i not in taken), None)
        if moved is not None:
            ids[be] = moved
        else:
            ids[be] = next_id
            next_id += 1
        taken.add(ids[be])
    return ids, next_id


def frontend_backends(fe: FrontendIntent, node: str) -> tuple[Backend, ...]:
    """The backends ``fe`` wants on ``node``, in slot order, with their flags."""
    proto = PROTOCOL_NUMBERS[fe.protocol]
    return tuple(Backend(_address(be.address), be.port, proto,
                         (BACKEND_LOCAL if be.node and be.node == node else 0) | (BACKEND_ON_NODE if be.node else 0))
                 for be in fe.backends)


def frontend_key(fe: FrontendIntent) -> ServiceKey:
    """The frontend's own entry (slot 0, every client): its value holds the frontend's id."""
    return ServiceKey(_address(fe.address), fe.port, PROTOCOL_NUMBERS[fe.protocol])


@dataclasses.dataclass(frozen=True)
class FrontendPart:
    """What one frontend puts in the maps: its entries, the backends its slots name, its source ranges."""

    fe: FrontendIntent
    ident: int
    services: Mapping[ServiceKey, ServiceValue]
    backends: Mapping[int, Backend]
    ranges: Mapping[SourceRangeKey, int]


def frontend_part(fe: FrontendIntent, ident: int, wanted: tuple[Backend, ...],
                  be_ids: Mapping[Backend, int]) -> FrontendPart:
    """The entries of ``fe`` under frontend id ``ident``, its backends ``wanted`` numbered by ``be_ids``."""
    key = frontend_key(fe)
    address, port, proto = key.address, key.port, key.proto
    external = fe.kind != FrontendKind.CLUSTER_IP
    ext_local = external and fe.traffic_policy == "Local"
    restricted = external and bool(fe.source_ranges)
    flags = ((FLAG_NO_LOCAL if fe.no_local_backends else 0) | (FLAG_AFFINITY if fe.affinity_timeout else 0)
             | (FLAG_EXTERNAL if external else 0) | (FLAG_EXT_LOCAL if ext_local else 0)
             | (FLAG_SOURCE_RANGES if restricted else 0) | (FLAG_DSR if external and fe.dsr else 0))
    ranges: dict[SourceRangeKey, int] = {}
    if restricted:
        for cidr in fe.source_ranges:
            network = ip_network(cidr)
            if isinstance(network, IPv4Network):
                ranges[SourceRangeKey(ident, network)] = 1
    services = {key: ServiceValue(ident, len(fe.backends), flags, fe.affinity_timeout)}
    backends: dict[int, Backend] = {}
    local = []
    for slot, backend in enumerate(wanted, start=1):
        bid = be_ids[backend]
        backends[bid] = backend
        services[ServiceKey(address, port, proto, slot)] = ServiceValue(bid)
        if backend.flags & BACKEND_LOCAL:
            local.append(bid)
    if ext_local:
        no_local = FLAG_NO_LOCAL if wanted and not local else 0
        services[ServiceKey(address, port, proto, 0, SCOPE_EXTERNAL)] = ServiceValue(
            ident, len(local), FLAG_EXTERNAL | no_local | (FLAG_AFFINITY if fe.affinity_timeout else 0),
            fe.affinity_timeout)
        for slot, bid in enumerate(local, start=1):
            services[ServiceKey(address, port, proto, slot, SCOPE_EXTERNAL)] = ServiceValue(bid)
    return FrontendPart(fe, ident, services, backends, ranges)


def nodeports_of(intent: NodeLBIntent) -> dict[NodePortKey, int]:
    return {NodePortKey(fe.port, PROTOCOL_NUMBERS[fe.protocol]): 1 | (NODEPORT_DSR if fe.dsr else 0)
            for fe in intent.frontends if fe.kind == FrontendKind.NODE_PORT}


def desired_parts(intent: NodeLBIntent, observed: LBState) -> tuple[LBState, list[FrontendPart]]:
    """The maps' contents ``intent`` wants, planned from scratch against ``observed`` (ids it holds are kept), and
    each frontend's part of them, in intent order."""
    fe_ids = {k: v.backend_id for k, v in observed.services.items() if k.slot == 0 and k.scope == 0}
    next_id = max([0, *fe_ids.values(), *observed.backends]) + 1
    chosen = [frontend_backends(fe, intent.node) for fe in intent.frontends]
    by_value = {be: ident for ident, be in observed.backends.items()}
    be_ids, next_id = assign_backend_ids(list(dict.fromkeys(be for items in chosen for be in items)),
                                         by_value.get, places(observed.backends), next_id)
    services: dict[ServiceKey, ServiceValue] = {}
    backends: dict[int, Backend] = {}
    ranges: dict[SourceRangeKey, int] = {}
    parts = []
    for fe, wanted in zip(intent.frontends, chosen, strict=True):
        key = frontend_key(fe)
        ident = fe_ids.get(key)
        if ident is None:
            ident = fe_ids[key] = next_id
            next_id += 1
        part = frontend_part(fe, ident, wanted, be_ids)
        services.update(part.services)
        backends.update(part.backends)
        ranges.update(part.ranges)
        parts.append(part)
    return LBState(services, backends, nodeports_of(intent), ranges), parts


def desired_state(intent: NodeLBIntent, observed: LBState) -> LBState:
    return desired_parts(intent, observed)[0]


def check_capacity(desired: LBState, *, backend_peak: int, range_peak: int, services_size: int,
                   backends_size: int, source_ranges_size: int) -> None:
    """Refuse a plan whose maps would not hold it (unused backends and ranges are deleted last: their peak)."""
    if len(desired.services) > services_size:
        raise LBCapacityError("cy_lb4_svc", len(desired.services), services_size)
    if range_peak > source_ranges_size:
        raise LBCapacityError("cy_lb4_srcrange", range_peak, source_ranges_size)
    if backend_peak > backends_size:
        raise LBCapacityError("cy_lb4_be", backend_peak, backends_size)


def ordered_service_writes(changed: Mapping[ServiceKey, ServiceValue],
                           gone: Iterable[ServiceKey]) -> MapDiff[ServiceKey, ServiceValue]:
    """Slots before the entries that count them; an external scope's own entry before the frontend's (whose
    ``FLAG_EXT_LOCAL`` sends external clients to it); deletions: a frontend's own entry before its slots."""
    svc_up = dict(sorted(changed.items(), key=lambda kv: (kv[0].slot == 0, kv[0].scope == 0, kv[0])))
    return MapDiff(svc_up, tuple(sorted(gone, key=lambda k: (k.slot != 0, k.scope, k))))


def plan(intent: NodeLBIntent, observed: LBState, *, services_size: int, backends_size: int,
         source_ranges_size: int = 65536) -> LBPlan:
    """Plan from scratch: every entry of ``observed`` compared (``lb_incremental`` plans only what changed)."""
    return plan_towards(desired_state(intent, observed), observed, services_size=services_size,
                        backends_size=backends_size, source_ranges_size=source_ranges_size)


def plan_towards(desired: LBState, observed: LBState, *, services_size: int, backends_size: int,
                 source_ranges_size: int = 65536) -> LBPlan:
    check_capacity(desired, backend_peak=len(set(desired.backends) | set(observed.backends)),
                   range_peak=len(set(desired.source_ranges) | set(observed.source_ranges)),
                   services_size=services_size, backends_size=backends_size, source_ranges_size=source_ranges_size)
    be_up = {k: v for k, v in sorted(desired.backends.items()) if observed.backends.get(k) != v}
    changed = {k: v for k, v in desired.services.items() if observed.services.get(k) != v}
    gone = [k for k in observed.services if k not in desired.services]
    be_del = tuple(sorted(k for k in observed.backends if k not in desired.backends))
    return LBPlan(desired, MapDiff(be_up, ()), ordered_service_writes(changed, gone), MapDiff({}, be_del),
                  diff_map(observed.nodeports, desired.nodeports),
                  sorted_diff(diff_map(observed.source_ranges, desired.source_ranges)))


def sorted_diff(diff: MapDiff[SourceRangeKey, int]) -> MapDiff[SourceRangeKey, int]:
    return MapDiff(dict(sorted(diff.upserts.items())), tuple(sorted(diff.deletes)))
