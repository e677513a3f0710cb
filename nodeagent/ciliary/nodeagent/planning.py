"""Plan what the datapath must change to enforce a NodeIntent (pure).

Called by ``ciliary.nodeagent.datapath.engine.Datapath.apply``: the engine
observes what is loaded (:class:`DatapathState`: program hashes from the
pins, tc attachments, the contents of every policy-related map as typed
keys and values), and :func:`plan` returns the difference to the intent as a
:class:`Plan`: programs to compile (only when a rendered hash changed), veths
to attach or detach, and upserts/deletes per map.

This module also owns the typed encoding of intents into map entries (port
ranges as LPM prefix blocks, rule cookies, endpoint ids) and
:func:`simulate_lookup`, the Python model of ``datapath_c/lib/policy.h``.
No bcc, no netlink: ``datapath/maps.py`` turns these types into ctypes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import zlib
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Generic, Literal, TypeVar

from ciliary.operator import intents

PORT_BITS = 16
MAX_ENDPOINT_ID = 65535
HOOKS: tuple[str, ...] = ("from_pod", "to_pod")


class MapDirection(enum.IntEnum):
    """``CY_DIR_*`` of consts.h: the pod's policy direction."""

    INGRESS = 1
    EGRESS = 2

    @classmethod
    def of(cls, direction: intents.Direction) -> MapDirection:
        return cls.INGRESS if direction is intents.Direction.INGRESS else cls.EGRESS


EP_INGRESS_ENFORCED = 1 << 0
EP_EGRESS_ENFORCED = 1 << 1
POLICY_DENY = 1 << 0


# ---------------------------------------------------------------- map types


@dataclasses.dataclass(frozen=True, order=True)
class PolicyKey:
    """``struct policy_key``: one port prefix block of one entry."""

    ep_id: int
    direction: MapDirection
    identity: int
    protocol: int
    port: int
    """First port of the block (host order); ICMP: the ICMP type."""
    port_bits: int
    """Significant high bits of ``port``: 16 = one port, 0 = any port."""

    @property
    def prefixlen(self) -> int:
        return 80 + self.port_bits

    def port_range(self) -> tuple[int, int]:
        size = 1 << (PORT_BITS - self.port_bits)
        return self.port, self.port + size - 1


@dataclasses.dataclass(frozen=True)
class PolicyValue:
    """``struct policy_value``."""

    cookie: int
    flags: int = 0


@dataclasses.dataclass(frozen=True, order=True)
class EndpointValue:
    """``struct endpoint_info`` (key: the pod's IPv4)."""

    ep_id: int
    identity: int
    flags: int
    ifindex: int


@dataclasses.dataclass(frozen=True)
class IpcacheValue:
    """``struct ipcache_value`` (key: an IPv4Network)."""

    identity: int
    flags: int = 0


@dataclasses.dataclass(frozen=True, order=True)
class HostVeth:
    """A pod's host-side veth in the node netns, as the CNI plugin reported it."""

    ifname: str
    ifindex: int


@dataclasses.dataclass(frozen=True, order=True)
class Attachment:
    """One program on one veth; ``sha256`` is the rendered program's hash ("" if unknown)."""

    ifname: str
    ifindex: int
    hook: str
    sha256: str = ""


# ---------------------------------------------------------------- encoding


def port_blocks(low: int, high: int) -> tuple[tuple[int, int], ...]:
    """Decompose [low, high] into the fewest aligned blocks ``(start, bits)``.

    ``bits`` significant high bits: the block is ``[start, start + 2**(16-bits) - 1]``.
    (0, 0) is "any port" and gives the single block (0, 0).
    """
    if low == 0 and high == 0:
        return ((0, 0),)
    high = high or low
    if not 0 < low <= high <= 0xFFFF:
        raise ValueError(f"bad port range {low}-{high}")
    blocks: list[tuple[int, int]] = []
    start = low
    while start <= high:
        size = start & -start if start else 1 << PORT_BITS
        while start + size - 1 > high:
            size >>= 1
        blocks.append((start, PORT_BITS - (size.bit_length() - 1)))
        start += size
    return tuple(blocks)


def rule_cookie(rules: Iterable[intents.RuleRef]) -> int:
    """A stable 32-bit cookie for the rules an entry derives from (0 = none)."""
    refs = sorted(json.dumps(r.model_dump(mode="json"), sort_keys=True) for r in rules)
    if not refs:
        return 0
    return zlib.crc32("\n".join(refs).encode()) or 1


def entry_port_range(entry: intents.PolicyEntry) -> tuple[int, int]:
    """The port range the datapath stores: ICMP entries with a type use (type, type)."""
    if entry.protocol is intents.Protocol.ICMP and entry.icmp_type is not None:
        return entry.icmp_type, entry.icmp_type
    return entry.port_low, entry.port_high or entry.port_low


def entry_keys(ep_id: int, direction: MapDirection, entry: intents.PolicyEntry) -> tuple[PolicyKey, ...]:
    low, high = entry_port_range(entry)
    return tuple(
        PolicyKey(ep_id, direction, entry.identity, int(entry.protocol), start, bits)
        for start, bits in port_blocks(low, high)
    )


PolicyMap = dict[PolicyKey, PolicyValue]


def direction_maps(ep_id: int, direction: MapDirection, policy: intents.DirectionPolicy) -> tuple[PolicyMap, PolicyMap]:
    """(allow, deny) map contents of one endpoint direction.

    Several entries may share a key (same verdict map): the smallest cookie wins, so
    the contents do not depend on entry order.
    """
    allow: PolicyMap = {}
    deny: PolicyMap = {}
    for entry in policy.entries:
        is_deny = entry.verdict is intents.Verdict.DENY
        target = deny if is_deny else allow
        value = PolicyValue(rule_cookie(entry.rules), POLICY_DENY if is_deny else 0)
        for key in entry_keys(ep_id, direction, entry):
            old = target.get(key)
            if old is None or value.cookie < old.cookie:
                target[key] = value
    return allow, deny


def endpoint_flags(endpoint: intents.EndpointIntent) -> int:
    return (EP_INGRESS_ENFORCED if endpoint.ingress.enforced else 0) | (
        EP_EGRESS_ENFORCED if endpoint.egress.enforced else 0
    )


# ---------------------------------------------------------------- the lookup model


@dataclasses.dataclass(frozen=True)
class LookupResult:
    allowed: bool
    reason: Literal["allowed", "denied-by-rule", "default-deny", "not-enforced"]
    cookie: int = 0


def _lpm_hit(table: Mapping[PolicyKey, PolicyValue], ep_id: int, direction: MapDirection,
             identity: int, protocol: int, port: int) -> PolicyValue | None:
    """One LPM lookup of the full-length key, as the kernel's trie answers it."""
    for bits in range(PORT_BITS, -1, -1):
        start = port & ~((1 << (PORT_BITS - bits)) - 1) & 0xFFFF
        value = table.get(PolicyKey(ep_id, direction, identity, protocol, start, bits))
        if value is not None:
            return value
    return None


def _probe(table: Mapping[PolicyKey, PolicyValue], ep_id: int, direction: MapDirection,
           identity: int, protocol: int, port: int) -> PolicyValue | None:
    identities = (identity, 0) if identity != 0 else (0,)
    protocols = (protocol, 0) if protocol != 0 else (0,)
    for ident in identities:
        for proto in protocols:
            hit = _lpm_hit(table, ep_id, direction, ident, proto, port)
            if hit is not None:
                return hit
    return None


def simulate_lookup(allow: Mapping[PolicyKey, PolicyValue], deny: Mapping[PolicyKey, PolicyValue], *,
                    enforced: bool, ep_id: int, direction: MapDirection, identity: int,
                    protocol: int, port: int) -> LookupResult:
    """What ``cy_policy_verdict`` in datapath_c/lib/policy.h decides for one packet."""
    if not enforced:
        return LookupResult(True, "not-enforced")
    hit = _probe(deny, ep_id, direction, identity, protocol, port)
    if hit is not None:
        return LookupResult(False, "denied-by-rule", hit.cookie)
    hit = _probe(allow, ep_id, direction, identity, protocol, port)
    if hit is not None:
        return LookupResult(True, "allowed", hit.cookie)
    return LookupResult(False, "default-deny")


# ---------------------------------------------------------------- state and plan

K = TypeVar("K")
V = TypeVar("V")


@dataclasses.dataclass(frozen=True)
class MapDiff(Generic[K, V]):
    """Writes that turn one map's observed contents into the desired ones."""

    upserts: Mapping[K, V] = dataclasses.field(default_factory=dict)
    deletes: tuple[K, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)


def diff_map(observed: Mapping[K, V], desired: Mapping[K, V]) -> MapDiff[K, V]:
    upserts = {k: v for k, v in desired.items() if observed.get(k) != v}
    deletes = tuple(k for k in observed if k not in desired)
    return MapDiff(upserts, deletes)


@dataclasses.dataclass(frozen=True)
class DatapathState:
    """What is loaded on the node, as observed (or remembered) by the engine."""

    programs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """hook -> sha256 of the loaded (pinned) program."""
    attachments: frozenset[Attachment] = frozenset()
    ipcache: Mapping[IPv4Network, IpcacheValue] = dataclasses.field(default_factory=dict)
    endpoints: Mapping[IPv4Address, EndpointValue] = dataclasses.field(default_factory=dict)
    policy: Mapping[PolicyKey, PolicyValue] = dataclasses.field(default_factory=dict)
    policy_deny: Mapping[PolicyKey, PolicyValue] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything to change, in the order the engine applies it."""

    compile: tuple[str, ...]
    """Hooks whose rendered hash differs from the loaded program."""
    ipcache: MapDiff[IPv4Network, IpcacheValue]
    endpoints: MapDiff[IPv4Address, EndpointValue]
    policy: MapDiff[PolicyKey, PolicyValue]
    policy_deny: MapDiff[PolicyKey, PolicyValue]
    attach: tuple[Attachment, ...]
    """Attach, or atomically replace, these programs."""
    detach: tuple[Attachment, ...]
    endpoint_ids: Mapping[IPv4Address, int]
    """Endpoint id of every programmed endpoint (kept from observed state when known)."""
    unplaced: tuple[IPv4Address, ...]
    """Endpoints of the intent with no local veth yet (nothing to enforce them on)."""

    @property
    def map_writes(self) -> int:
        return len(self.ipcache) + len(self.endpoints) + len(self.policy) + len(self.policy_deny)

    @property
    def empty(self) -> bool:
        return not (self.compile or self.attach or self.detach or self.map_writes)


def allocate_endpoint_ids(wanted: Iterable[IPv4Address],
                          observed: Mapping[IPv4Address, EndpointValue]) -> dict[IPv4Address, int]:
    """Keep the id an address already has; give new ones the smallest free id."""
    wanted = sorted(set(wanted))
    ids = {ip: observed[ip].ep_id for ip in wanted if ip in observed}
    used = set(ids.values())
    next_id = 1
    for ip in wanted:
        if ip in ids:
            continue
        while next_id in used:
            next_id += 1
        if next_id > MAX_ENDPOINT_ID:
            raise ValueError("no free endpoint id")
        ids[ip] = next_id
        used.add(next_id)
    return ids


def desired_maps(intent: intents.NodeIntent, ids: Mapping[IPv4Address, int],
                 veths: Mapping[IPv4Address, HostVeth]) -> tuple[
                     dict[IPv4Network, IpcacheValue], dict[IPv4Address, EndpointValue], PolicyMap, PolicyMap]:
    ipcache = {IPv4Network(e.cidr): IpcacheValue(e.identity) for e in intent.ipcache}
    endpoints: dict[IPv4Address, EndpointValue] = {}
    allow: PolicyMap = {}
    deny: PolicyMap = {}
    for endpoint in intent.endpoints:
        ip = IPv4Address(endpoint.ipv4)
        if ip not in ids:
            continue
        ep_id = ids[ip]
        endpoints[ip] = EndpointValue(ep_id, endpoint.identity, endpoint_flags(endpoint), veths[ip].ifindex)
        for direction in intents.Direction:
            a, d = direction_maps(ep_id, MapDirection.of(direction), endpoint.direction(direction))
            for src, dst in ((a, allow), (d, deny)):
                for key, value in src.items():
                    dst[key] = value
    return ipcache, endpoints, allow, deny


def plan(desired: intents.NodeIntent, observed: DatapathState, *, programs: Mapping[str, str],
         veths: Mapping[IPv4Address, HostVeth]) -> Plan:
    """The changes that make ``observed`` enforce ``desired``.

    ``programs`` maps each hook to the sha256 of its program rendered for this node;
    ``veths`` is the endpoint registry: pod IPv4 -> its host-side veth.
    """
    compile_hooks = tuple(h for h in HOOKS if programs[h] != observed.programs.get(h))
    intent_ips = {IPv4Address(e.ipv4) for e in desired.endpoints}
    placed = sorted(ip for ip in intent_ips if ip in veths)
    ids = allocate_endpoint_ids(placed, observed.endpoints)
    ipcache, endpoints, allow, deny = desired_maps(desired, ids, veths)

    wanted = {
        Attachment(veth.ifname, veth.ifindex, hook, programs[hook])
        for veth in set(veths.values())
        for hook in HOOKS
    }
    have = {(a.ifname, a.hook): a for a in observed.attachments}
    attach = sorted(a for a in wanted if have.get((a.ifname, a.hook)) != a)
    wanted_names = {a.ifname for a in wanted}
    detach = sorted(a for a in observed.attachments if a.ifname not in wanted_names)

    return Plan(
        compile=compile_hooks,
        ipcache=diff_map(observed.ipcache, ipcache),
        endpoints=diff_map(observed.endpoints, endpoints),
        policy=diff_map(observed.policy, allow),
        policy_deny=diff_map(observed.policy_deny, deny),
        attach=tuple(attach),
        detach=tuple(detach),
        endpoint_ids=ids,
        unplaced=tuple(sorted(intent_ips - set(placed))),
    )
