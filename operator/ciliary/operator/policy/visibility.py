"""L7 visibility: a pod's proxy-visibility tuples laid over its policy entries (pure).

Owns :func:`apply_visibility`: given one endpoint direction's :class:`DirectionPolicy` (from its
policies) and the pod's :class:`~ciliary.operator.api.visibility.VisibilityTuple` values, it returns
the entries the datapath enforces, where traffic on each annotated port goes through the node's
proxy to be observed. It reuses the redirect of L7 policy (``l7_redirect`` with an allow-all L7 rule:
an empty HTTP rule, or DNS ``matchPattern: "*"``) and never changes a verdict:

- a direction no policy enforces becomes enforced with an allow-all entry (identity 0, no rule), so
  everything stays allowed; on ingress the host identity gets its own allow-all entry, which the
  datapath finds before the any-peer port entry, so the node's own connections (kubelet probes) are
  never redirected;
- for each annotated protocol and port, every peer identity whose traffic there the datapath
  decides by a plain allow entry gets a redirecting allow entry for exactly that peer, protocol and
  port (it replaces an entry with that very key), carrying the rules of the entries it stands in
  for (flows still name them: its HTTP rules are one allow-all rule per such policy rule). The datapath's lookup (``lib/policy.h``) tries the peer's
  (protocol, then any-protocol) entries before the any-peer ones, longest port prefix first, so
  such an entry decides for that peer, port and protocol only, and allows what was allowed;
- where the deciding entries already carry L7 rules (or a mix of plain and L7 entries could decide),
  nothing is added: those rules stay exactly as the policies wrote them; nor where any entry of the
  peer or of any peer covering the port carries L7 rules (the node's Envoy joins a peer's entries with
  the any-peer ones into one chain: their header actions or TLS contexts would reach this peer);
- deny entries are untouched (the datapath probes them first); a peer with no allow entry stays
  denied, it gets no entry;
- the added entries carry ``visibility=True``: no policy's status depends on them, and a node
  without the proxy passes them at L4 (``ciliary.nodeagent.planning.entry_flags``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ciliary.operator.api.visibility import VisibilityTuple
from ciliary.operator.intents import (
    ANY_IDENTITY,
    Direction,
    DirectionPolicy,
    DNSRule,
    HttpRule,
    PolicyEntry,
    Protocol,
    Verdict,
    sorted_entries,
)
from ciliary.operator.policy.identities import Reserved

ALLOW_ALL_HTTP = (HttpRule(),)
ALLOW_ALL_DNS = (DNSRule(match_pattern="*"),)
_PROTOCOL = {"TCP": Protocol.TCP, "UDP": Protocol.UDP}


def apply_visibility(policy: DirectionPolicy, tuples: Iterable[VisibilityTuple],
                     direction: Direction) -> DirectionPolicy:
    """``policy`` with the redirects ``tuples`` ask for in ``direction`` (``policy`` itself when none)."""
    wanted = sorted(t for t in tuples if t.direction == direction.value)
    if not wanted:
        return policy
    entries = list(policy.entries)
    if not policy.enforced:
        entries = [PolicyEntry(identity=ANY_IDENTITY, verdict=Verdict.ALLOW)]
        if direction is Direction.INGRESS:
            entries.append(PolicyEntry(identity=int(Reserved.HOST), verdict=Verdict.ALLOW))
    for item in wanted:
        entries = _observe(entries, item, direction)
    return DirectionPolicy(enforced=True, entries=sorted_entries(entries))


def _observe(entries: list[PolicyEntry], item: VisibilityTuple, direction: Direction) -> list[PolicyEntry]:
    proto, port = _PROTOCOL[item.protocol], item.port
    allows = [e for e in entries if e.verdict is Verdict.ALLOW and e.icmp_type is None
              and e.covers(e.identity, int(proto), port)]
    out = list(entries)
    for peer in sorted({e.identity for e in allows}):
        if direction is Direction.INGRESS and peer == int(Reserved.HOST):
            continue
        deciding = deciding_entries(allows, peer, proto, port)
        if not deciding or any(e.l7_redirect or e.http is not None for e in deciding):
            continue
        # the node's Envoy builds a peer's chain from its own and the any-peer entries together: any-peer L7
        # rules (header actions, TLS contexts) would then apply to this peer, which the kernel never sent them
        if any(e.l7_redirect or e.http is not None for e in allows if e.identity in (peer, ANY_IDENTITY)):
            continue
        exact = [e for e in deciding if e.identity == peer and e.protocol is proto
                 and e.port_low == port and (e.port_high or port) == port]
        refs = tuple(sorted({r for e in deciding for r in e.rules},
                            key=lambda r: (r.kind, r.namespace, r.name, r.uid, r.rule_index, r.section)))
        # one allow-all HTTP rule per allowing policy rule, so the L7 flow names the rule that allowed it
        http = tuple(HttpRule(rule=r) for r in refs) or ALLOW_ALL_HTTP
        redirect = PolicyEntry(
            identity=peer, protocol=proto, port_low=port, port_high=port, verdict=Verdict.ALLOW,
            l7_redirect=True, l7_parser=item.parser,
            dns=ALLOW_ALL_DNS if item.parser == "dns" else (),
            http=http if item.parser == "http" else None, rules=refs, visibility=True,
        )
        out = [e for e in out if e not in exact]
        out.append(redirect)
    return out


def deciding_entries(entries: Sequence[PolicyEntry], peer: int, proto: int, port: int) -> list[PolicyEntry]:
    """The entries (all of one verdict) among which the datapath picks the one deciding for ``peer``, ``proto``,
    ``port`` (for ICMP the port is the type).

    The lookup tries (peer, protocol), (peer, any protocol), (any peer, protocol), (any peer, any
    protocol) in this order and stops at the first group with an entry covering the packet (within a
    group the longest port prefix wins): the entries of that first group."""
    peers = (peer, ANY_IDENTITY) if peer != ANY_IDENTITY else (ANY_IDENTITY,)
    protocols = (proto, int(Protocol.ANY)) if proto != int(Protocol.ANY) else (int(Protocol.ANY),)
    for who in peers:
        for what in protocols:
            group = [e for e in entries if e.identity == who and int(e.protocol) == what and e.covers(who, proto, port)]
            if group:
                return group
    return []
