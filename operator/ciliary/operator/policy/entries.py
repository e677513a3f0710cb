"""Policy entries of one endpoint in one direction, from the rules that select it.

Owns :func:`direction_policy`: given the compiled rules selecting an endpoint
(its *subject* identity), a :class:`PeerSource` answering "which identities
does this selector / entity / CIDR stand for" and the endpoint's named ports,
it returns the :class:`~ciliary.operator.intents.DirectionPolicy` the datapath
enforces. ``resolution`` calls it per distinct (identity, named ports).

Semantics (documented for users):

- the direction is enforced as soon as a rule selecting the endpoint has an
  allow or deny section for it; it is default-deny unless every such rule says
  ``enableDefaultDeny: false`` for that direction, in which case an allow-all
  entry (identity 0, no rule) is added so only deny entries bite (and when there
  is no deny entry at all the direction is simply not enforced);
- allow entries are the union of all items; deny entries beat allow entries
  (``intents.evaluate_entries`` checks denies first);
- ``fromRequires``/``toRequires`` of every rule selecting the endpoint (allow
  and deny items alike) are ANDed into every ``fromEndpoints``/``toEndpoints``
  selector of the *allow* items of that direction; they never widen, never
  constrain entities, CIDRs or L4-only items, and never narrow deny items;
- L3-only items give protocol-ANY, any-port entries (ICMP included); L4-only
  items give identity-0 entries; L3+L4 items give the product;
- a port with protocol ANY becomes three entries, TCP, UDP and SCTP;
  ``endPort`` gives a range; a named port resolves, on ingress, against the
  endpoint's own container ports and, on egress, against the container ports
  of the pods of each destination identity: an item that selects its peers
  resolves it per selected identity, an any-peer item (L4-only, or the entity
  ``all``) gives one entry per identity whose pods declare the name, with that
  identity's numbers (never identity 0, never the cross product); non-pod peers
  (world, CIDRs, host, remote nodes) declare no named ports; a name that
  resolves nowhere gives no entry;
- ICMP types give protocol-ICMP entries with ``icmp_type`` set;
- a ``toFQDNs`` selector is one peer identity (its selector identity); the
  agent turns it into the addresses its endpoints resolved;
- a port rule with L7 rules gives allow entries with ``l7_redirect=True``, the
  rules' kind (``l7_parser``) and, for DNS, the ``rules.dns`` items; when an
  L4-only allow and an L7 allow produce the same entry, L4 wins (no redirect);
  two L7 allows of one kind producing the same entry carry the union of their
  rules (a request matching either is allowed, as Cilium merges them); two
  kinds on one entry (Cilium refuses the policy) keep the first kind met;
- HTTP rules (``compiling.http_matches``, ingress and egress) give the entry its ``http`` rules,
  each naming its policy rule; entries merged from several HTTP items carry all
  their rules (OR); merged with an L4-only or non-HTTP item, ``http`` is None
  (no redirect: the port is open to that peer at L4, as in Cilium);
- with ``allow_host_ingress`` (Kubernetes' allow-localhost), an enforced ingress
  direction always allows the ``host`` identity (kubelet probes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from typing import Protocol as TypingProtocol

from ciliary.operator.intents import (
    ANY_IDENTITY,
    Direction,
    DirectionPolicy,
    DNSRule,
    HttpRule,
    L7Parser,
    PolicyEntry,
    Protocol,
    RuleRef,
    Verdict,
    sorted_entries,
)
from ciliary.operator.policy.compiling import CidrMatch, CompiledRule, HttpMatch, PeerRule, PortMatch
from ciliary.operator.policy.identities import Reserved
from ciliary.operator.policy.named_ports import NamedPorts, PortOwners
from ciliary.operator.policy.selection import Selector

NOT_ENFORCED = DirectionPolicy()
_ANY_EXPANSION = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)
_BY_NAME = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP}

_Key = tuple[int, Protocol, int, int, int | None, Verdict]
"""(peer identity, protocol, port low, port high, icmp type, verdict)."""
_L7 = tuple[L7Parser, tuple[DNSRule, ...]] | None
"""The L7 part of one port: (kind, DNS rules), or None for a plain L4 port."""
_Spec = tuple[Protocol, int, int, int | None, _L7, tuple[HttpMatch, ...] | None]
"""(protocol, port low, port high, icmp type, L7 part, ingress HTTP rules) of one item's port."""
_Acc = dict[_Key, tuple[set[RuleRef], _L7, list[HttpRule] | None]]


class PeerSource(TypingProtocol):
    """What the entries of one subject need to know about the rest of the cluster.

    ``user`` is the subject identity asking; implementations record it so a
    change of the answer invalidates exactly the subjects that used it.
    """

    def select(self, selector: Selector, user: int) -> Set[int]:
        """Identities matching a (scoped) endpoint selector."""
        ...

    def entity(self, name: str, user: int) -> Set[int] | None:
        """Identities of an entity; None for ``all`` (every peer)."""
        ...

    def cidr(self, match: CidrMatch, user: int) -> Set[int]:
        """Identities (CIDR and world) a CIDR match stands for."""
        ...

    def fqdn(self, selector: DNSRule, user: int) -> int:
        """The selector identity of one ``toFQDNs`` item."""
        ...

    def named_ports(self, peer: int, user: int) -> NamedPorts:
        """Named ports of the pods of identity ``peer`` (none for a non-pod identity)."""
        ...

    def port_owners(self, name: str, user: int) -> PortOwners:
        """Every identity whose pods declare a port called ``name``, with its numbers."""
        ...


def direction_policy(
    subject: int,
    rules: Sequence[CompiledRule],
    direction: Direction,
    *,
    own_ports: NamedPorts,
    source: PeerSource,
    allow_host_ingress: bool = True,
) -> DirectionPolicy:
    """The enforced entries of one endpoint (identity ``subject``) in ``direction``."""
    relevant = [r for r in rules if r.has(direction)]
    if not relevant:
        return NOT_ENFORCED
    default_deny = any(r.default_deny(direction) for r in relevant)
    requires = tuple(sorted({req for r in relevant for item in r.items(direction) for req in item.requires},
                            key=lambda s: s.requirements))
    acc: _Acc = {}
    for rule in relevant:
        for item in rule.items(direction):
            peers = _peers(subject, item, requires if item.verdict is Verdict.ALLOW else (), source)
            if peers:
                _add_item(acc, subject, item, peers, direction, own_ports, source)
    entries = [_entry(key, refs, l7, http) for key, (refs, l7, http) in acc.items()]
    if not default_deny:
        if not any(e.verdict is Verdict.DENY for e in entries):
            return NOT_ENFORCED
        entries.append(PolicyEntry(identity=ANY_IDENTITY, verdict=Verdict.ALLOW))
    elif direction is Direction.INGRESS and allow_host_ingress:
        entries.append(PolicyEntry(identity=int(Reserved.HOST), verdict=Verdict.ALLOW))
    return DirectionPolicy(enforced=True, entries=_dedupe(entries))


def _peers(subject: int, item: PeerRule, requires: Sequence[Selector], source: PeerSource) -> Set[int]:
    if item.any_peer:
        return {ANY_IDENTITY}
    out: set[int] = set()
    for selector in item.selectors:
        members = source.select(selector, subject)
        for requirement in requires:
            members = members & source.select(requirement, subject)
        out |= members
    for name in item.entities:
        ids = source.entity(name, subject)
        if ids is None:
            return {ANY_IDENTITY}
        out |= ids
    for match in item.cidrs:
        out |= source.cidr(match, subject)
    for fqdn in item.fqdns:
        out.add(source.fqdn(fqdn, subject))
    return out


def _l7(port: PortMatch) -> _L7:
    return (port.l7_parser, port.dns) if port.l7 and port.l7_parser is not None else None


def _add_item(
    acc: _Acc,
    subject: int,
    item: PeerRule,
    peers: Set[int],
    direction: Direction,
    own_ports: NamedPorts,
    source: PeerSource,
) -> None:
    fixed: list[_Spec] = []
    named: list[PortMatch] = []
    if item.l3_only:
        fixed.append((Protocol.ANY, 0, 0, None, None, None))
    for port in item.ports:
        if port.name is not None:
            named.append(port)
        else:
            fixed.extend((proto, port.low, port.high, None, _l7(port), _http_of(port, proto))
                         for proto in _protocols(port.protocol))
    fixed.extend((Protocol.ICMP, 0, 0, icmp_type, None, None) for icmp_type in item.icmp_types)
    for peer in peers:
        specs: Iterable[_Spec] = fixed
        if named and direction is Direction.INGRESS:
            specs = [*fixed, *_resolve_named(named, own_ports)]
        elif named and peer == ANY_IDENTITY:
            # any destination: the name stands for each declaring identity's own numbers
            for match in named:
                assert match.name is not None
                for owner, pairs in source.port_owners(match.name, subject).items():
                    _put(acc, item, owner, _resolve_named((match,), {match.name: pairs}))
        elif named:
            specs = [*fixed, *_resolve_named(named, source.named_ports(peer, subject))]
        _put(acc, item, peer, specs)


def _http_of(port: PortMatch, proto: Protocol) -> tuple[HttpMatch, ...] | None:
    """HTTP rules apply on TCP only (a port rule with protocol ANY expands to UDP and SCTP too)."""
    return port.http if proto is Protocol.TCP else None


def _put(acc: _Acc, item: PeerRule, peer: int, specs: Iterable[_Spec]) -> None:
    l7_allowed = item.verdict is Verdict.ALLOW
    for proto, low, high, icmp_type, l7, http in specs:
        key = (peer, proto, low, high, icmp_type, item.verdict)
        found = acc.get(key)
        redirect = l7 if l7_allowed else None
        rules = None if http is None or not l7_allowed else [
            HttpRule(method=h.method, path=h.path, host=h.host, headers=h.headers, header_matches=h.header_matches,
                     rule=item.ref, tls=h.tls) for h in http]
        if found is None:
            acc[key] = ({item.ref}, redirect, rules)
        else:
            found[0].add(item.ref)
            merged = None if found[2] is None or rules is None else found[2] + rules
            acc[key] = (found[0], _merge_l7(found[1], redirect), merged)


def _merge_l7(first: _L7, second: _L7) -> _L7:
    """L4 wins over L7; one kind: the union of the rules; two kinds: the first."""
    if first is None or second is None:
        return None
    if first[0] != second[0]:
        return first
    merged = tuple(sorted(set(first[1]) | set(second[1]), key=lambda r: (r.match_name or "", r.match_pattern or "")))
    return first[0], merged


def _protocols(protocol: Protocol) -> tuple[Protocol, ...]:
    return _ANY_EXPANSION if protocol is Protocol.ANY else (protocol,)


def _resolve_named(named: Iterable[PortMatch], ports: NamedPorts) -> Iterable[_Spec]:
    for match in named:
        assert match.name is not None
        for proto_name, number in ports.get(match.name, ()):
            proto = _BY_NAME.get(proto_name)
            if proto is None or (match.protocol is not Protocol.ANY and proto is not match.protocol):
                continue
            yield proto, number, number, None, _l7(match), _http_of(match, proto)


def _entry(key: _Key, refs: set[RuleRef], l7: _L7, http: list[HttpRule] | None) -> PolicyEntry:
    peer, proto, low, high, icmp_type, verdict = key
    unique = None if http is None or not l7 else tuple(dict.fromkeys(http))
    ordered = tuple(sorted(refs, key=lambda r: (r.kind, r.namespace, r.name, r.uid, r.rule_index, r.section)))
    return PolicyEntry(
        identity=peer,
        protocol=proto,
        port_low=low,
        port_high=high if low else 0,
        icmp_type=icmp_type,
        verdict=verdict,
        l7_redirect=l7 is not None,
        l7_parser=l7[0] if l7 is not None else None,
        dns=l7[1] if l7 is not None else (),
        http=unique,
        rules=ordered,
    )


def _dedupe(entries: list[PolicyEntry]) -> tuple[PolicyEntry, ...]:
    """Sort; an implicit (rule-less) allow that duplicates a rule's entry is dropped."""
    seen: dict[tuple[object, ...], PolicyEntry] = {}
    for entry in entries:
        key = (entry.verdict, entry.identity, entry.protocol, entry.port_low, entry.port_high, entry.icmp_type)
        current = seen.get(key)
        if current is None or (not current.rules and entry.rules):
            seen[key] = entry
    return sorted_entries(seen.values())
