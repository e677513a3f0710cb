"""Where a node's datapath differs from the operator's intent for it (pure).

``ciliary policy get|trace`` read what the datapath holds (the agent decodes its
maps into a ``NodeIntent``: ``ciliary.nodeagent.kernelview``) and compare it with
the intent the operator published, with :func:`differences`. The comparison is by
meaning, not by wording: per endpoint and direction, whether it is enforced, and
for each (verdict, peer identity, protocol) the set of ports covered (ranges merged,
"any port" as 0-65535, an ICMP type as a one-port range); the ipcache as the
address -> identity map the datapath consults (local endpoints first). Rule names
are not compared: they come from the agent's last applied intent. What the agent
adds on its own for ``toFQDNs`` (addresses learnt from DNS answers, with their
node-local identities, ``identities.FIRST_LEARNT_IDENTITY``..``MAX_LEARNT_IDENTITY``,
and their entries) is not the operator's and is left out of the comparison.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable

from ciliary.operator.intents import DirectionPolicy, EndpointIntent, NodeIntent, PolicyEntry, Protocol
from ciliary.operator.policy.identities import FIRST_LEARNT_IDENTITY, MAX_LEARNT_IDENTITY

Coverage = dict[tuple[str, int, int], list[tuple[int, int]]]


def port_span(entry: PolicyEntry) -> tuple[int, int]:
    """The ports (ICMP: types) an entry covers, as one inclusive range."""
    if entry.icmp_type is not None:
        return entry.icmp_type, entry.icmp_type
    if entry.port_low == 0:
        return 0, 0xFFFF
    return entry.port_low, entry.port_high or entry.port_low


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def coverage(policy: DirectionPolicy) -> Coverage:
    """(verdict, identity, protocol) -> merged port ranges."""
    spans: dict[tuple[str, int, int], list[tuple[int, int]]] = defaultdict(list)
    for entry in policy.entries:
        spans[(entry.verdict.value, entry.identity, int(entry.protocol))].append(port_span(entry))
    return {key: _merge(ranges) for key, ranges in spans.items()}


def _describe(key: tuple[str, int, int], ranges: list[tuple[int, int]]) -> str:
    verdict, identity, protocol = key
    peer = "any peer" if identity == 0 else f"identity {identity}"
    proto = Protocol(protocol).name if protocol in {int(p) for p in Protocol} else str(protocol)
    ports = ", ".join("any" if r == (0, 0xFFFF) else str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"
                      for r in ranges)
    return f"{verdict} {peer} {proto} {'type' if protocol == Protocol.ICMP else 'port'} {ports}"


def effective_ipcache(intent: NodeIntent) -> dict[str, int]:
    """CIDR -> identity as the datapath resolves peers: the ipcache, local endpoints (/32) first."""
    out = {str(ipaddress.IPv4Network(e.cidr)): e.identity for e in intent.ipcache}
    out.update({f"{e.ipv4}/32": e.identity for e in intent.endpoints})
    return out


def _name(endpoint: EndpointIntent) -> str:
    return f"{endpoint.namespace}/{endpoint.pod}" if endpoint.namespace else endpoint.ipv4


def endpoint_differences(wanted: EndpointIntent, held: EndpointIntent | None) -> list[str]:
    """How the datapath's entries for one endpoint differ from the intent's (empty when they agree)."""
    name = f"{_name(wanted)} ({wanted.ipv4})"
    if held is None:
        return [f"{name} is not in the datapath's endpoint map: none of its traffic is enforced"]
    out = []
    if held.identity != wanted.identity:
        out.append(f"{name}: identity {held.identity} in the datapath, {wanted.identity} in the intent")
    for direction in ("ingress", "egress"):
        want, have = getattr(wanted, direction), getattr(held, direction)
        if want.enforced != have.enforced:
            out.append(f"{name} {direction}: {'enforced' if have.enforced else 'not enforced'} in the datapath, "
                       f"{'enforced' if want.enforced else 'not enforced'} in the intent")
        want_cov, have_cov = coverage(want), coverage(have)
        for key in sorted(set(want_cov) | set(have_cov)):
            if want_cov.get(key) != have_cov.get(key):
                held_text = _describe(key, have_cov[key]) if key in have_cov else "nothing"
                wanted_text = _describe(key, want_cov[key]) if key in want_cov else "nothing"
                out.append(f"{name} {direction}: the datapath holds {held_text}; the intent wants {wanted_text}")
    return out


def _identity_of(cache: dict[str, int], address: str) -> int | None:
    """Longest-prefix identity of ``address`` in an effective ipcache (None: no entry, i.e. world)."""
    ip = ipaddress.IPv4Address(address)
    best: tuple[int, int] | None = None
    for cidr, identity in cache.items():
        net = ipaddress.IPv4Network(cidr)
        if ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, identity)
    return None if best is None else best[1]


def _learnt(identity: int) -> bool:
    return FIRST_LEARNT_IDENTITY <= identity <= MAX_LEARNT_IDENTITY


def operator_part(held: NodeIntent) -> NodeIntent:
    """``held`` without what the agent learnt for toFQDNs (learnt identities' ipcache entries and entries)."""
    if not any(_learnt(e.identity) for e in held.ipcache):
        return held

    def strip(policy: DirectionPolicy) -> DirectionPolicy:
        return policy.model_copy(update={"entries": tuple(e for e in policy.entries if not _learnt(e.identity))})

    endpoints = tuple(e.model_copy(update={"ingress": strip(e.ingress), "egress": strip(e.egress)})
                      for e in held.endpoints)
    return held.model_copy(update={"endpoints": endpoints,
                                   "ipcache": tuple(e for e in held.ipcache if not _learnt(e.identity))})


def differences(wanted: NodeIntent, held: NodeIntent, *, endpoints: Iterable[str] | None = None,
                peers: Iterable[str] | None = None) -> list[str]:
    """Every way ``held`` (the datapath's view) differs from ``wanted`` (the operator's intent).

    ``endpoints`` (IPv4 strings) limits the endpoint comparison to those pods, and ``peers``
    the ipcache comparison to the identities those addresses resolve to (``trace``).
    """
    only = set(endpoints) if endpoints is not None else None
    held = operator_part(held)
    by_ip = {e.ipv4: e for e in held.endpoints}
    out: list[str] = []
    for endpoint in wanted.endpoints:
        if only is None or endpoint.ipv4 in only:
            out.extend(endpoint_differences(endpoint, by_ip.get(endpoint.ipv4)))
    wanted_ips = {e.ipv4 for e in wanted.endpoints}
    for endpoint in held.endpoints:
        if endpoint.ipv4 not in wanted_ips and (only is None or endpoint.ipv4 in only):
            out.append(f"{_name(endpoint)} ({endpoint.ipv4}) is in the datapath but not in the intent")
    want_cache, have_cache = effective_ipcache(wanted), effective_ipcache(held)
    if peers is not None:
        for address in sorted(set(peers)):
            want_id, have_id = _identity_of(want_cache, address), _identity_of(have_cache, address)
            if want_id != have_id:
                out.append(f"{address} resolves to identity {have_id or 'world (no entry)'} in the datapath, "
                           f"{want_id or 'world (no entry)'} in the intent")
        return out
    for cidr in sorted(set(want_cache) | set(have_cache)):
        if want_cache.get(cidr) != have_cache.get(cidr):
            have = have_cache.get(cidr, "no entry")
            want = want_cache.get(cidr, "no entry")
            out.append(f"ipcache {cidr}: identity {have} in the datapath, {want} in the intent")
    return out
