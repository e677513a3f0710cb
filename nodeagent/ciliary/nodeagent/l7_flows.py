"""L7 flows: one line of the node's Envoy access log as a flow of the agent's flow ring (pure).

Envoy writes one JSON object per HTTP request (``envoy_config.ACCESS_LOG_FORMAT``): time,
method, path, host, status, the route that decided (named after its policy rule, or
``cy-default-deny``), the listener's direction (``ingress``: the pod is the destination;
``egress``: the pod is the client) and the connection's original addresses (the listeners are
transparent, so the downstream local address is the original destination). :func:`parse_line` turns it into an
:class:`L7Event`, which has the attributes of ``datapath.flows.FlowEvent`` the flow ring,
``flowapi.enrich``, ``hubble_convert.to_flow`` and the metrics read, plus ``http`` and ``rule``.

Verdicts: a request answered by the default-deny route (403 ``Access denied``) is ``dropped``
with reason ``L7_DENIED``; a request forwarded by a rule's route is ``forwarded``
(``L7_ALLOWED``) whatever status the pod answered. Identities come from the intent in force
(``identity_of``: ipcache longest prefix, world when none).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
from collections.abc import Callable
from typing import Any

from ciliary.nodeagent import envoy_config
from ciliary.operator import intents

WORLD = 2
_IPV4 = functools.lru_cache(maxsize=4096)(ipaddress.IPv4Address)
"""Parsed addresses (every line names two; a node sees few distinct ones)."""
_RULE_OF_ROUTE = functools.lru_cache(maxsize=1024)(envoy_config.rule_of_route)
"""Route name -> its (frozen) rule: a route name is a policy rule as JSON, parsed once."""


@dataclasses.dataclass(frozen=True)
class HttpInfo:
    method: str
    url: str
    host: str
    code: int
    protocol: str
    duration_ms: int
    mismatch: str = ""
    """headerMatches that did not match, with their action: ``"Name:ACTION,..."`` (empty: none)."""

    def as_json(self) -> dict[str, Any]:
        found = {"method": self.method, "url": self.url, "host": self.host, "code": self.code,
                 "protocol": self.protocol, "latency_ms": self.duration_ms}
        return {**found, "header_mismatch": self.mismatch} if self.mismatch else found


@dataclasses.dataclass(frozen=True)
class L7Event:
    """One HTTP request judged by the node's proxy."""

    time: float
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    sport: int
    dport: int
    verdict: str
    reason: str
    src_identity: int
    dst_identity: int
    http: HttpInfo
    rule: intents.RuleRef | None
    direction: str = "ingress"
    protocol: int = 6
    tcp_flags: int = 0
    is_reply: bool = False
    ep_id: int = 0
    cookie: int = 0
    ifindex: int = 0
    length: int = 0


class BadLogLine(ValueError):
    def __init__(self, line: str, why: str) -> None:
        super().__init__(f"access log line not understood ({why}): {line[:200]!r}")
        self.line = line


def _address(raw: Any) -> tuple[str, ipaddress.IPv4Address, int]:
    host, _, port = str(raw).rpartition(":")
    return host, _IPV4(host), int(port)


def _int(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def parse_line(line: str, identity_of: Callable[[str], int]) -> L7Event:
    """One access log line as an :class:`L7Event`; ``identity_of`` maps an address to its identity."""
    try:
        data = json.loads(line)
        src_host, src, sport = _address(data["src"])
        dst_host, dst, dport = _address(data["dst"])
        when = float(data["time"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadLogLine(line, str(exc)) from exc
    route = str(data.get("route") or "")
    denied = route == envoy_config.DENY_ROUTE
    rule = _RULE_OF_ROUTE(route)
    info = HttpInfo(method=str(data.get("method") or ""), url=str(data.get("path") or ""),
                    host=str(data.get("host") or ""), code=_int(data.get("status")),
                    protocol=str(data.get("protocol") or ""), duration_ms=_int(data.get("duration_ms")),
                    mismatch="" if data.get("mismatch") in (None, "", "-") else str(data["mismatch"]))
    direction = "egress" if data.get("direction") == "egress" else "ingress"
    return L7Event(time=when, src=src, dst=dst, sport=sport, dport=dport,
                   verdict="dropped" if denied else "forwarded", reason="L7_DENIED" if denied else "L7_ALLOWED",
                   src_identity=identity_of(src_host), dst_identity=identity_of(dst_host), http=info, rule=rule,
                   direction=direction)


def identity_lookup(intent: intents.NodeIntent | None) -> Callable[[str], int]:
    """Address -> identity by the intent's ipcache (longest prefix; world when none)."""
    if intent is None:
        return lambda _ip: WORLD
    nets = sorted(((ipaddress.IPv4Network(e.cidr), e.identity) for e in intent.ipcache),
                  key=lambda pair: -pair[0].prefixlen)
    local = {e.ipv4: e.identity for e in intent.endpoints}

    @functools.lru_cache(maxsize=4096)  # one per intent: its answers never change
    def lookup(ip: str) -> int:
        if ip in local:
            return local[ip]
        address = ipaddress.IPv4Address(ip)
        return next((identity for net, identity in nets if address in net), WORLD)

    return lookup
