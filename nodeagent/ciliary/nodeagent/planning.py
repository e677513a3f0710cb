"""Plan what the datapath must change to enforce a NodeIntent (pure).

Called by ``ciliary.nodeagent.datapath.engine.Datapath.apply``: the engine
observes what is loaded (:class:`DatapathState`: program hashes from the
pins, tc attachments, the contents of every policy-related map as typed
keys and values), and :func:`plan` returns the difference to the intent as a
:class:`Plan`: programs to compile (only when a rendered hash changed), veths
to attach or detach, and upserts/deletes per map, written in the order of
:func:`write_order`.

This module also owns the typed encoding of intents into map entries (port
ranges as LPM prefix blocks, rule cookies, endpoint ids, endpoint flags); the
Python model of the datapath's lookup over them is ``lookup_model``.
No bcc, no netlink: ``datapath/maps.py`` turns these types into ctypes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import zlib
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Generic, Literal, TypeVar

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
EP_INGRESS_DENY = 1 << 2
EP_EGRESS_DENY = 1 << 3
EP_DENY_FLAGS = EP_INGRESS_DENY | EP_EGRESS_DENY
"""``CY_EP_*_DENY``: cy_policy_deny holds entries of the endpoint and direction."""
POLICY_DENY = 1 << 0
POLICY_HTTP = 1 << 1
"""consts.h CY_POLICY_HTTP: an ingress allow entry with HTTP rules, redirected to the node's proxy."""
POLICY_NO_PROXY = 1 << 2
"""consts.h CY_POLICY_NO_PROXY: an allow entry whose L7 rules need a proxy this node does not run: its
packets are dropped (``PROXY_UNAVAILABLE``), never passed as a plain L3/L4 allow."""
POLICY_ANY_PORT = 1 << 3
"""consts.h CY_POLICY_ANY_PORT: the key's port block is "any port" (no port bits); the datapath tells
Hubble's match types apart with it (an entry naming a port vs one naming a protocol or nothing)."""


def enforced_flag(direction: MapDirection) -> int:
    return EP_INGRESS_ENFORCED if direction is MapDirection.INGRESS else EP_EGRESS_ENFORCED


def deny_flag(direction: MapDirection) -> int:
    return EP_INGRESS_DENY if direction is MapDirection.INGRESS else EP_EGRESS_DENY


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
    proxy_port: int = 0
    """!= 0: matching packets go to the node-local proxy on this port (egress entries only)."""


@dataclasses.dataclass(frozen=True, order=True)
class EndpointValue:
    """``struct endpoint_info`` (key: the pod's IPv4)."""

    ep_id: int
    identity: int
    flags: int
    ifindex: int
    revision: int = 0
    """Intent revision (mod 2**32) stamped after every write of that revision: see :func:`write_order`."""


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
    netns_cookie: int = 0
    """The pod's network namespace cookie (0: unknown), for ``cy_lb4_podns``."""


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
    if entry.protocol is intents.Protocol.ICMP and entry.icmp_type == 0:
        # ICMP type 0 (echo reply) is one exact "port" 0, not the (0, 0) of "any port"
        # (the differential test found this widening: a type-0 entry allowed every type)
        blocks: tuple[tuple[int, int], ...] = ((0, PORT_BITS),)
    else:
        blocks = port_blocks(low, high)
    return tuple(
        PolicyKey(ep_id, direction, entry.identity, int(entry.protocol), start, bits)
        for start, bits in blocks
    )


PolicyMap = dict[PolicyKey, PolicyValue]


ProxyPorts = Mapping[str, int]
"""L7 parser (``PolicyEntry.l7_parser``: "dns", "http", ...) -> port of the node-local proxy running it."""


def needed_proxy(entry: intents.PolicyEntry) -> intents.L7Parser | None:
    """The kind of node-local proxy an allow entry's traffic must go through (None: a plain L3/L4 entry).

    The kind is the entry's L7 parser (``"dns"``, ``"http"``, ``"kafka"``, ...): whatever the
    direction, an entry carrying L7 rules is enforced as written only by such a proxy.
    """
    if entry.verdict is not intents.Verdict.ALLOW or not entry.l7_redirect or entry.l7_parser is None:
        return None
    return entry.l7_parser


def proxy_port_of(direction: MapDirection, entry: intents.PolicyEntry, proxy_ports: ProxyPorts) -> int:
    """The proxy port an allow entry redirects to (0: none).

    Only egress entries redirect through a port (``bpf_sk_assign`` works at tc ingress of the
    host veth, which is the pod's egress); only entries flagged ``l7_redirect`` whose parser has
    a running proxy. An entry whose parser has no proxy here is dropped (:func:`entry_flags`), and
    so is an HTTP entry whose rules Envoy cannot read (``http`` None: HTTP inside TLS).
    """
    kind = needed_proxy(entry)
    if direction is not MapDirection.EGRESS or kind is None or (kind == "http" and entry.http is None):
        return 0
    return proxy_ports.get(kind, 0)


def entry_flags(direction: MapDirection, entry: intents.PolicyEntry, proxy_ports: ProxyPorts) -> int:
    """``CY_POLICY_*`` of one entry's map values on a node running the proxies ``proxy_ports``.

    Fail closed: an allow entry that needs a proxy kind (:func:`needed_proxy`) the node cannot
    hand it to gets :data:`POLICY_NO_PROXY` (the datapath drops its packets with
    ``PROXY_UNAVAILABLE``). Egress: the kind must have a port in ``proxy_ports``. Ingress: only
    HTTP rules the node's Envoy reads (``entry.http`` set) have a proxy, through
    :data:`POLICY_HTTP` (whose redirect the datapath itself drops when the node has no Envoy
    device); any other ingress L7 entry (TLS-wrapped HTTP, Kafka, ...) has none.

    A visibility entry (``entry.visibility``: a pod's proxy-visibility annotation, whose L7 rules
    allow everything) whose proxy kind the node does not run is a plain allow (0): seeing the
    traffic must never change its verdict.
    """
    if entry.verdict is intents.Verdict.DENY:
        return POLICY_DENY
    if entry.visibility and (entry.l7_parser is None or entry.l7_parser not in proxy_ports):
        return 0
    if direction is MapDirection.INGRESS and entry.http is not None:
        return POLICY_HTTP
    if needed_proxy(entry) is not None and not proxy_port_of(direction, entry, proxy_ports):
        return POLICY_NO_PROXY
    return 0


def direction_maps(ep_id: int, direction: MapDirection, policy: intents.DirectionPolicy,
                   proxy_ports: ProxyPorts | None = None) -> tuple[PolicyMap, PolicyMap]:
    """(allow, deny) map contents of one endpoint direction.

    Several entries may share a key (same verdict map): the smallest cookie wins, so
    the contents do not depend on entry order; the HTTP redirect and no-proxy flags stay
    only if every entry of the key has them (an L4 allow wins over L7 rules); a redirecting
    egress entry beats a plain one only through its cookie (the operator never emits both
    for one key).
    """
    allow: PolicyMap = {}
    deny: PolicyMap = {}
    ports = proxy_ports or {}
    for entry in policy.entries:
        is_deny = entry.verdict is intents.Verdict.DENY
        target = deny if is_deny else allow
        port = 0 if is_deny else proxy_port_of(direction, entry, ports)
        value = PolicyValue(rule_cookie(entry.rules), entry_flags(direction, entry, ports), port)
        for key in entry_keys(ep_id, direction, entry):
            keyed = value if key.port_bits else dataclasses.replace(value, flags=value.flags | POLICY_ANY_PORT)
            old = target.get(key)
            target[key] = keyed if old is None else _merged(old, keyed)
    return allow, deny


def _merged(old: PolicyValue, new: PolicyValue) -> PolicyValue:
    """One key's value from two entries (port ranges of different entries can share an LPM key).

    A no-proxy value never wins over one that passes or redirects (AND-ing its flags with the HTTP
    flag, or taking its port 0 beside a redirect, would turn L7 entries into a plain allow that skips
    the proxy); between two others the smaller cookie wins and the HTTP flag stays only if both have it
    (an L4 allow wins over L7 rules); between two no-proxy values the smaller cookie.
    """
    old_np, new_np = bool(old.flags & POLICY_NO_PROXY), bool(new.flags & POLICY_NO_PROXY)
    if old_np != new_np:
        return new if old_np else old
    winner = new if new.cookie < old.cookie else old
    return dataclasses.replace(winner, flags=old.flags & new.flags)


def endpoint_flags(endpoint: intents.EndpointIntent, deny: Mapping[PolicyKey, PolicyValue]) -> int:
    """``CY_EP_*``: enforced directions, and directions with keys in ``deny`` (its deny map)."""
    flags = 0
    for direction in intents.Direction:
        d = MapDirection.of(direction)
        flags |= enforced_flag(d) if endpoint.direction(direction).enforced else 0
        flags |= deny_flag(d) if any(k.direction is d for k in deny) else 0
    return flags


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
    ep_ifindex: Mapping[int, IPv4Address] = dataclasses.field(default_factory=dict)
    """cy_ep_ifindex: host veth ifindex -> the pod behind it (how IPv6 finds its endpoint)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything to change, in the order the engine applies it."""

    compile: tuple[str, ...]
    """Hooks whose rendered hash differs from the loaded program."""
    ipcache: MapDiff[IPv4Network, IpcacheValue]
    endpoints: MapDiff[IPv4Address, EndpointValue]
    """Endpoints as desired, but keeping deny flags that are still set (lowered later)."""
    policy: MapDiff[PolicyKey, PolicyValue]
    policy_deny: MapDiff[PolicyKey, PolicyValue]
    raise_deny_flags: MapDiff[IPv4Address, EndpointValue]
    """Upserts only: existing endpoints gaining a deny flag, before any deny entry is written."""
    lower_deny_flags: MapDiff[IPv4Address, EndpointValue]
    """Upserts only: the final endpoint values, after the last deny entry is deleted."""
    stamps: MapDiff[IPv4Address, EndpointValue]
    """Upserts only, the very last writes: the final values with the intent's revision."""
    attach: tuple[Attachment, ...]
    """Attach, or atomically replace, these programs."""
    detach: tuple[Attachment, ...]
    endpoint_ids: Mapping[IPv4Address, int]
    """Endpoint id of every programmed endpoint (kept from observed state when known)."""
    unplaced: tuple[IPv4Address, ...]
    """Endpoints of the intent with no local veth yet (nothing to enforce them on)."""
    ep_ifindex: MapDiff[int, IPv4Address] = dataclasses.field(default_factory=MapDiff)
    """cy_ep_ifindex: the veth of every programmed endpoint."""

    @property
    def map_writes(self) -> int:
        return (len(self.ipcache) + len(self.endpoints) + len(self.policy) + len(self.policy_deny)
                + len(self.raise_deny_flags) + len(self.lower_deny_flags) + len(self.ep_ifindex)
                + len(self.stamps))

    @property
    def empty(self) -> bool:
        return not (self.compile or self.attach or self.detach or self.map_writes)


def allocate_endpoint_ids(wanted: Iterable[IPv4Address],
                          observed: Mapping[IPv4Address, EndpointValue],
                          veths: Mapping[IPv4Address, HostVeth] | None = None) -> dict[IPv4Address, int]:
    """Keep the id an endpoint already has; give new ones the smallest free id.

    An endpoint is its (address, host veth): an address now behind another veth than the one
    the kernel shows (``veths``; a new pod got the address before the old pod's removal was
    applied) is a new endpoint, and never gets the old one's id back (its conntrack entries
    are purged as another endpoint's, ``conntrack_purge``).
    """
    wanted = sorted(set(wanted))
    veths = veths or {}

    def same_endpoint(ip: IPv4Address) -> bool:
        veth = veths.get(ip)
        return veth is None or observed[ip].ifindex in (0, veth.ifindex)

    ids = {ip: observed[ip].ep_id for ip in wanted if ip in observed and same_endpoint(ip)}
    used = set(ids.values()) | {observed[ip].ep_id for ip in wanted if ip in observed and ip not in ids}
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
                 veths: Mapping[IPv4Address, HostVeth], proxy_ports: ProxyPorts | None = None) -> tuple[
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
        own_deny: PolicyMap = {}
        for direction in intents.Direction:
            a, d = direction_maps(ep_id, MapDirection.of(direction), endpoint.direction(direction), proxy_ports)
            allow.update(a)
            own_deny.update(d)
        deny.update(own_deny)
        endpoints[ip] = EndpointValue(ep_id, endpoint.identity, endpoint_flags(endpoint, own_deny),
                                      veths[ip].ifindex, revision_stamp(intent.revision))
    return ipcache, endpoints, allow, deny


def revision_stamp(revision: int) -> int:
    """An intent revision as ``endpoint_info.revision`` holds it (32 bits)."""
    return revision & 0xFFFFFFFF


def _with_deny_flags(value: EndpointValue, flags: int) -> EndpointValue:
    return dataclasses.replace(value, flags=value.flags | (flags & EP_DENY_FLAGS))


def deny_flag_steps(observed: Mapping[IPv4Address, EndpointValue],
                    desired: Mapping[IPv4Address, EndpointValue]) -> tuple[
                        dict[IPv4Address, EndpointValue], dict[IPv4Address, EndpointValue],
                        dict[IPv4Address, EndpointValue]]:
    """(raised, held, lowered): the three endpoint writes that keep every deny flag set
    while the deny map may hold entries of its endpoint and direction (see write_order).

    raised: observed endpoints with the desired deny flags added; held: the desired
    values plus the observed deny flags; lowered: the desired values where they differ.
    """
    raised = {ip: _with_deny_flags(old, desired[ip].flags) for ip, old in observed.items()
              if ip in desired and desired[ip].flags & EP_DENY_FLAGS & ~old.flags}
    held = {ip: _with_deny_flags(value, observed[ip].flags) if ip in observed else value
            for ip, value in desired.items()}
    lowered = {ip: value for ip, value in desired.items() if held[ip] != value}
    return raised, held, lowered


def plan(desired: intents.NodeIntent, observed: DatapathState, *, programs: Mapping[str, str],
         veths: Mapping[IPv4Address, HostVeth], proxy_ports: ProxyPorts | None = None) -> Plan:
    """The changes that make ``observed`` enforce ``desired``.

    ``programs`` maps each hook to the sha256 of its program rendered for this node;
    ``veths`` is the endpoint registry: pod IPv4 -> its host-side veth; ``proxy_ports``
    the node-local proxies running (:func:`proxy_port_of`).
    """
    compile_hooks = tuple(h for h in HOOKS if programs[h] != observed.programs.get(h))
    intent_ips = {IPv4Address(e.ipv4) for e in desired.endpoints}
    placed = sorted(ip for ip in intent_ips if ip in veths)
    ids = allocate_endpoint_ids(placed, observed.endpoints, veths)
    ipcache, endpoints, allow, deny = desired_maps(desired, ids, veths, proxy_ports)
    # every write but the last carries the revision the kernel already shows (0 for a new endpoint);
    # the stamps, written last, say "every write of this revision is done" (see write_order)
    unstamped = {ip: dataclasses.replace(v, revision=observed.endpoints[ip].revision if ip in observed.endpoints
                                         else 0) for ip, v in endpoints.items()}
    raised, held, lowered = deny_flag_steps(observed.endpoints, unstamped)
    stamps = {ip: v for ip, v in endpoints.items() if v != unstamped[ip]}

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
        endpoints=diff_map({**observed.endpoints, **raised}, held),
        policy=diff_map(observed.policy, allow),
        policy_deny=diff_map(observed.policy_deny, deny),
        raise_deny_flags=MapDiff(raised),
        lower_deny_flags=MapDiff(lowered),
        stamps=MapDiff(stamps),
        attach=tuple(attach),
        detach=tuple(detach),
        endpoint_ids=ids,
        unplaced=tuple(sorted(intent_ips - set(placed))),
        ep_ifindex=diff_map(observed.ep_ifindex, {value.ifindex: ip for ip, value in endpoints.items()}),
    )


MapName = Literal["ipcache", "endpoints", "policy", "policy_deny", "ep_ifindex"]
"""A map of the plan, named as the :class:`DatapathState` field holding its contents."""
WriteStep = tuple[MapName, Literal["upserts", "deletes"], MapDiff[Any, Any]]


def write_order(p: Plan) -> tuple[WriteStep, ...]:
    """The order in which the engine writes a plan's maps (each step one element at a time).

    No intermediate state forwards a packet that neither the old nor the new state
    forwards (tests/unit/nodeagent/test_lookup_model.py walks every single write):
    1. policy entries before endpoints on the way in, endpoints before policy entries on
       the way out: a new endpoint is never enforced without its entries;
    2. deny entries are written before allow entries and deleted after them;
    3. the datapath skips the deny map of an endpoint and direction whose CY_EP_*_DENY
       flag is clear, so that flag is kept a superset of the deny map's contents: it is
       raised on existing endpoints before the first deny entry is written, held by the
       main endpoint writes, and lowered only after the last deny entry is deleted. (A
       new endpoint gets its flag with its first write, after its entries; a removed one
       is deleted before its entries.) A set flag without entries costs four missing
       lookups; a clear flag with entries would pass a denied packet that an allow covers;
    4. cy_ep_ifindex (veth -> pod) follows the endpoints: a veth whose pod is not (or no
       longer) in cy_endpoints passes IPv6 as an unknown endpoint passes IPv4;
    5. each endpoint's ``revision`` is written last (the stamps): an endpoint that shows
       revision N in the kernel has every write of revision N done, which is what the
       reporter reads back before it says a policy is enforcing.
    """
    return (
        ("ipcache", "upserts", p.ipcache),
        ("endpoints", "upserts", p.raise_deny_flags),
        ("policy_deny", "upserts", p.policy_deny),
        ("policy", "upserts", p.policy),
        ("endpoints", "upserts", p.endpoints),
        ("ep_ifindex", "upserts", p.ep_ifindex),
        ("endpoints", "deletes", p.endpoints),
        ("ep_ifindex", "deletes", p.ep_ifindex),
        ("policy", "deletes", p.policy),
        ("policy_deny", "deletes", p.policy_deny),
        ("endpoints", "upserts", p.lower_deny_flags),
        ("ipcache", "deletes", p.ipcache),
        ("endpoints", "upserts", p.stamps),
    )
