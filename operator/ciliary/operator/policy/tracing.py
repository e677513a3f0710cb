"""``ciliary policy trace``: would a packet pass, and which rule decides?

Owns :func:`trace` and its result types. It evaluates exactly what the
datapath gets: the published ``NodeIntent``s. The peer's identity comes from the
evaluating node's ipcache (longest prefix match; no match means ``world``), as
the datapath looks it up; then ``intents.evaluate_entries`` runs on the source
endpoint's egress (on the source's node) and on the destination endpoint's
ingress (on the destination's node). A packet passes when both directions
allow it; a side that is not a local endpoint (an external address) is not
evaluated. For ICMP, ``dport`` is the ICMP type.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ciliary.operator.intents import (
    Direction,
    EndpointIntent,
    NodeIntent,
    Protocol,
    RuleRef,
    evaluate_entries,
)
from ciliary.operator.policy.identities import Reserved
from ciliary.operator.policy.resolution import ClusterState, Resolution, resolve_cluster

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

    def describe(self) -> str:
        if self.reason == "not-enforced":
            why = "no policy selects the endpoint in this direction"
        elif self.reason == "default-deny":
            why = "default deny"
        elif self.rules:
            why = "; ".join(r.describe() for r in self.rules)
        elif self.peer_identity == Reserved.HOST and self.direction is Direction.INGRESS:
            why = "traffic from the local host is always allowed"
        else:
            why = "enableDefaultDeny is false for this direction"
        return f"{self.direction.value} at {self.endpoint} ({self.node}), peer identity {self.peer_identity}: " \
               f"{self.verdict} ({why})"


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


def _evaluate(direction: Direction, side: _Side, peer: int, proto: int, dport: int) -> DirectionTrace:
    assert side.endpoint is not None and side.node is not None
    decision = evaluate_entries(side.endpoint.direction(direction), identity=peer, protocol=proto, port=dport)
    return DirectionTrace(
        direction=direction,
        node=side.node,
        endpoint=f"{side.endpoint.namespace}/{side.endpoint.pod}",
        peer_identity=peer,
        verdict="ALLOWED" if decision.allowed else "DENIED",
        reason=decision.reason,
        rules=decision.entry.rules if decision.entry is not None else (),
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
