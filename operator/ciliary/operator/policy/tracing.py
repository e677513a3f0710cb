"""``ciliary policy trace``: would a packet pass, and which rule decides?

Owns :func:`trace`, :func:`trace_datapath` and their result types. :func:`trace`
evaluates a set of ``NodeIntent``s: the published ones, or the ones each node's
agent decoded from its maps (``/v1/datapath``), which :func:`trace_datapath` uses
to answer from what the kernel holds, and to say where that differs from the
operator's intent or cannot be known (a node whose agent did not answer is never
replaced by the intent: its direction is UNKNOWN). The peer's identity comes from the
evaluating node's ipcache (longest prefix match; no match means ``world``), as
the datapath looks it up; then ``intents.evaluate_entries`` runs on the source
endpoint's egress (on the source's node) and on the destination endpoint's
ingress (on the destination's node). A packet passes when both directions
allow it; a side that is not a local endpoint (an external address) is not
evaluated. For ICMP, ``dport`` is the ICMP type.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from ciliary.operator.intents import (
    ANY_IDENTITY,
    Direction,
    EndpointIntent,
    NodeIntent,
    PolicyEntry,
    Protocol,
    RuleRef,
    evaluate_entries,
)
from ciliary.operator.intents import Verdict as PolicyVerdict
from ciliary.operator.policy import divergence
from ciliary.operator.policy.identities import Reserved
from ciliary.operator.policy.resolution import ClusterState, Resolution, resolve_cluster
from ciliary.operator.policy.visibility import deciding_entries

Verdict = Literal["ALLOWED", "DENIED"]


class TraceError(ValueError):
    """The source or destination names no known endpoint or address."""


@dataclass(frozen=True)
class DirectionTrace:
    """The decision of one direction at one endpoint."""

    direction: Direction
    node: str
    endpoint: str
    peer_identity: int
    verdict: Verdict
    reason: Literal["allowed", "denied-by-rule", "default-deny", "not-enforced"]
    rules: tuple[RuleRef, ...] = ()
    http: bool = False
    """The deciding entry hands the connection to the node's HTTP proxy: only matching requests pass."""
    visibility: bool = False
    """The deciding entry is a proxy-visibility redirect: observed at L7, every request allowed."""
    match: str = ""
    """Hubble's name of the kind of entry the datapath's lookup finds first among the traced entries
    (:func:`match_kind`: ``l3-l4``, ``l3-only``, ...); empty when no entry decided. Entries read back from a
    node's maps keep an any-port key apart from the port keys beside it (``kernelview.merge_blocks``), so the
    kind is the one the kernel's flow records."""

    def describe(self) -> str:
        if self.reason == "not-enforced":
            why = "no policy selects the endpoint in this direction"
        elif self.reason == "default-deny":
            why = "default deny"
        elif self.rules:
            why = "; ".join(r.describe() for r in self.rules)
        elif self.visibility:
            why = "no rule denies it"
        elif self.peer_identity == Reserved.HOST and self.direction is Direction.INGRESS:
            why = "traffic from the local host is always allowed"
        else:
            why = "enableDefaultDeny is false for this direction"
        l7 = "; at L7 only the HTTP requests its rules allow, judged by the node's Envoy (others get 403)" \
            if self.http else ""
        if self.visibility:
            l7 = "; observed at L7 by the node's proxy (the pod's proxy-visibility annotation), every request allowed"
        kind = f"; matched {self.match}" if self.match else ""
        return f"{self.direction.value} at {self.endpoint} ({self.node}), peer identity {self.peer_identity}: " \
               f"{self.verdict} ({why}{l7}{kind})"


@dataclass(frozen=True)
class TraceResult:
    """Both directions and the overall verdict."""

    verdict: Verdict
    source_identity: int
    destination_identity: int
    egress: DirectionTrace | None
    ingress: DirectionTrace | None

    @property
    def allowed(self) -> bool:
        return self.verdict == "ALLOWED"

    def describe(self) -> str:
        lines = [f"{self.verdict}"]
        for part in (self.egress, self.ingress):
            if part is not None:
                lines.append("  " + part.describe())
        return "\n".join(lines)


@dataclass(frozen=True)
class _Side:
    ip: ipaddress.IPv4Address
    node: str | None
    endpoint: EndpointIntent | None


def trace(
    source: Mapping[str, NodeIntent] | Resolution | ClusterState,
    src: str,
    dst: str,
    dport: int,
    protocol: Protocol | int | str = Protocol.TCP,
) -> TraceResult:
    """Trace one packet from ``src`` to ``dst`` (each ``namespace/pod`` or an IPv4 address)."""
    intents = _intents(source)
    proto = _protocol(protocol)
    src_side, dst_side = _side(intents, src), _side(intents, dst)
    egress = ingress = None
    dst_identity = src_identity = 0
    if src_side.endpoint is not None and src_side.node is not None:
        src_identity = src_side.endpoint.identity
        dst_identity = lookup_identity(intents[src_side.node], dst_side.ip)
        egress = _evaluate(Direction.EGRESS, src_side, dst_identity, proto, dport)
    if dst_side.endpoint is not None and dst_side.node is not None:
        dst_identity = dst_side.endpoint.identity
        src_identity = lookup_identity(intents[dst_side.node], src_side.ip)
        ingress = _evaluate(Direction.INGRESS, dst_side, src_identity, proto, dport)
    allowed = all(part is None or part.verdict == "ALLOWED" for part in (egress, ingress))
    return TraceResult("ALLOWED" if allowed else "DENIED", src_identity, dst_identity, egress, ingress)


def lookup_identity(intent: NodeIntent, ip: ipaddress.IPv4Address) -> int:
    """The identity of ``ip`` in a node's ipcache: longest prefix wins; no match is world."""
    best_len, best = -1, int(Reserved.WORLD)
    for entry in intent.ipcache:
        net = ipaddress.IPv4Network(entry.cidr)
        if net.prefixlen > best_len and ip in net:
            best_len, best = net.prefixlen, entry.identity
    return best


def match_kind(entries: Sequence[PolicyEntry], peer: int, proto: int, port: int) -> str:
    """Hubble's match type of the entry the datapath finds among ``entries`` (all of one verdict) for the packet:
    in the first group of :func:`deciding_entries` the longest port prefix wins, so an entry naming a port (or an
    ICMP type) beats one of any port. l3 = the peer's identity, l4 = a port, proto = a protocol with any port;
    "" when no entry covers the packet."""
    group = deciding_entries(entries, peer, proto, port)
    if not group:
        return ""
    l3 = group[0].identity != ANY_IDENTITY
    if any(e.port_low != 0 or e.icmp_type is not None for e in group):
        return "l3-l4" if l3 else "l4-only"
    if group[0].protocol is not Protocol.ANY:
        return "l3-proto" if l3 else "proto-only"
    return "l3-only" if l3 else "all"


def _evaluate(direction: Direction, side: _Side, peer: int, proto: int, dport: int) -> DirectionTrace:
    assert side.endpoint is not None and side.node is not None
    policy = side.endpoint.direction(direction)
    decision = evaluate_entries(policy, identity=peer, protocol=proto, port=dport)
    entry, seen = decision.entry, False
    if decision.allowed and policy.enforced and proto in (int(Protocol.TCP), int(Protocol.UDP)):
        # the datapath's pick among the allow entries (most specific first): a visibility redirect?
        allows = [e for e in policy.entries if e.verdict is PolicyVerdict.ALLOW]
        found = [e for e in deciding_entries(allows, peer, Protocol(proto), dport) if e.visibility]
        if found:
            entry, seen = found[0], True
    return DirectionTrace(
        direction=direction,
        node=side.node,
        endpoint=f"{side.endpoint.namespace}/{side.endpoint.pod}",
        peer_identity=peer,
        verdict="ALLOWED" if decision.allowed else "DENIED",
        reason=decision.reason,
        rules=entry.rules if entry is not None else (),
        http=decision.allowed and entry is not None and entry.http is not None and not seen,
        visibility=seen,
        match=match_kind([e for e in policy.entries if e.verdict is (
            PolicyVerdict.DENY if decision.reason == "denied-by-rule" else PolicyVerdict.ALLOW)], peer, proto, dport)
        if decision.reason in ("allowed", "denied-by-rule") else "",
    )


def _intents(source: Mapping[str, NodeIntent] | Resolution | ClusterState) -> Mapping[str, NodeIntent]:
    if isinstance(source, ClusterState):
        return resolve_cluster(source)
    if isinstance(source, Resolution):
        return source.intents
    return source


def _protocol(value: Protocol | int | str) -> int:
    if isinstance(value, str):
        try:
            return int(Protocol[value.upper()])
        except KeyError:
            raise TraceError(f"unknown protocol {value!r}") from None
    return int(value)


def _side(intents: Mapping[str, NodeIntent], name: str) -> _Side:
    try:
        ip = ipaddress.IPv4Address(name)
    except ValueError:
        ip = None
    for node, intent in intents.items():
        for endpoint in intent.endpoints:
            if (ip is not None and endpoint.ipv4 == str(ip)) or (
                ip is None and f"{endpoint.namespace}/{endpoint.pod}" == name
            ):
                return _Side(ipaddress.IPv4Address(endpoint.ipv4), node, endpoint)
    if ip is None:
        raise TraceError(f"{name!r} is neither a known endpoint (namespace/pod) nor an IPv4 address")
    return _Side(ip, None, None)


# ---------------------------------------------------------------- from the datapath

DatapathVerdict = Literal["ALLOWED", "DENIED", "UNKNOWN"]


@dataclass(frozen=True)
class DatapathDirection:
    """One direction as the node's datapath decides it (``trace`` is None when it cannot be known)."""

    direction: Direction
    node: str
    endpoint: str
    source: Literal["datapath", "unreachable", "not-in-datapath"]
    trace: DirectionTrace | None
    intent: DirectionTrace | None
    """The same direction evaluated on the operator's intent, for comparison."""
    error: str = ""

    @property
    def verdict(self) -> DatapathVerdict:
        return "UNKNOWN" if self.trace is None else self.trace.verdict

    def describe(self) -> str:
        if self.source == "unreachable":
            return (f"{self.direction.value} at {self.endpoint} ({self.node}): UNKNOWN (the node's datapath could "
                    f"not be read: {self.error})")
        assert self.trace is not None
        if self.source == "not-in-datapath":
            return (f"{self.direction.value} at {self.endpoint} ({self.node}): ALLOWED (the endpoint is not in the "
                    "datapath's endpoint map: nothing is enforced for it)")
        return self.trace.describe()


@dataclass(frozen=True)
class DatapathTrace:
    verdict: DatapathVerdict
    source_identity: int
    destination_identity: int
    directions: tuple[DatapathDirection, ...]
    intent: TraceResult
    """The verdict the operator's intent gives."""
    differences: tuple[str, ...]
    """Where the involved nodes' datapaths differ from the intent (endpoints involved, ipcache)."""
    unreachable: Mapping[str, str]

    def describe(self) -> str:
        nodes = sorted({d.node for d in self.directions if d.source != "unreachable"})
        where = f" (from the datapath of {', '.join(nodes)})" if nodes else ""
        lines = [f"{self.verdict}{where}"]
        lines += ["  " + d.describe() for d in self.directions]
        if self.unreachable:
            lines.append("the verdict of " + ", ".join(sorted(self.unreachable)) + " is not known; "
                         f"the operator's intent would say {self.intent.verdict}, which is not what a kernel holds")
        if self.differences:
            lines.append(f"WARNING: the datapath differs from the operator's intent (which says "
                         f"{self.intent.verdict}):")
            lines += ["  " + d for d in self.differences]
        return "\n".join(lines)


def involved_nodes(published: Mapping[str, NodeIntent], src: str, dst: str) -> set[str]:
    """The nodes hosting ``src`` or ``dst`` (whose datapaths decide the packet)."""
    return {side.node for side in (_side(published, src), _side(published, dst)) if side.node is not None}


def trace_datapath(
    published: Mapping[str, NodeIntent],
    held: Mapping[str, NodeIntent | str],
    src: str,
    dst: str,
    dport: int,
    protocol: Protocol | int | str = Protocol.TCP,
) -> DatapathTrace:
    """Trace one packet on what the datapaths hold.

    ``published`` locates the endpoints (and gives the intent's verdict to compare with);
    ``held[node]`` is the node's decoded datapath, or why it could not be read.
    """
    proto = _protocol(protocol)
    intent_result = trace(published, src, dst, dport, proto)
    src_side, dst_side = _side(published, src), _side(published, dst)
    views = {node: view for node, view in held.items() if isinstance(view, NodeIntent)}
    unreachable = {node: view for node, view in held.items() if isinstance(view, str)}
    directions: list[DatapathDirection] = []
    identities = [src_side.endpoint.identity if src_side.endpoint else 0,
                  dst_side.endpoint.identity if dst_side.endpoint else 0]
    for direction, side, peer, intent_part in ((Direction.EGRESS, src_side, dst_side, intent_result.egress),
                                               (Direction.INGRESS, dst_side, src_side, intent_result.ingress)):
        if side.endpoint is None or side.node is None:
            continue
        name = f"{side.endpoint.namespace}/{side.endpoint.pod}"
        view = views.get(side.node)
        if view is None:
            reason = unreachable.get(side.node, "no answer from the node's agent")
            directions.append(DatapathDirection(direction, side.node, name, "unreachable", None, intent_part, reason))
            unreachable.setdefault(side.node, reason)
            continue
        peer_identity = lookup_identity(view, peer.ip)
        identities[1 if direction is Direction.EGRESS else 0] = peer_identity
        held_endpoint = next((e for e in view.endpoints if e.ipv4 == str(side.ip)), None)
        if held_endpoint is None:
            passed = DirectionTrace(direction, side.node, name, peer_identity, "ALLOWED", "not-enforced")
            directions.append(DatapathDirection(direction, side.node, name, "not-in-datapath", passed, intent_part))
            continue
        identities[0 if direction is Direction.EGRESS else 1] = held_endpoint.identity
        part = _evaluate(direction, _Side(side.ip, side.node, held_endpoint), peer_identity, proto, dport)
        part = replace(part, endpoint=name)
        directions.append(DatapathDirection(direction, side.node, name, "datapath", part, intent_part))
    verdicts = {d.verdict for d in directions}
    verdict: DatapathVerdict = "DENIED" if "DENIED" in verdicts else "UNKNOWN" if "UNKNOWN" in verdicts \
        else "ALLOWED"
    diffs: list[str] = []
    for node in sorted({d.node for d in directions if d.node in views}):
        involved = [str(s.ip) for s in (src_side, dst_side) if s.node == node]
        diffs += [f"{node}: {d}" for d in divergence.differences(
            published[node], views[node], endpoints=involved, peers=[str(src_side.ip), str(dst_side.ip)])]
    for d in directions:
        if d.trace is not None and d.intent is not None and (d.trace.verdict, d.trace.reason) != (
                d.intent.verdict, d.intent.reason) and not diffs:
            diffs.append(f"{d.node}: {d.direction.value} at {d.endpoint}: the datapath says {d.trace.verdict} "
                         f"({d.trace.reason}), the intent {d.intent.verdict} ({d.intent.reason})")
    return DatapathTrace(verdict, identities[0], identities[1], tuple(directions), intent_result, tuple(diffs),
                         dict(unreachable))
