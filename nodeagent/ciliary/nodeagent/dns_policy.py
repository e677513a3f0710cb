"""What the DNS proxy may let through: name matching and the entry a query falls under.

Pure. Owns

- :func:`canonical` (lower case, no final dot) and :func:`rule_matches` with
  Cilium's semantics: ``matchName`` is the whole name, case-blind;
  ``matchPattern``'s ``*`` stands for zero or more characters other than ``.``
  (``*.world.test`` matches ``api.world.test``, not ``world.test`` nor
  ``a.b.world.test``), and a pattern that is ``*`` alone matches every name;
- :func:`query_verdict`: the DNS rules that apply to a query a pod sent to a
  server, found exactly as the datapath found the entry that redirected it:
  the pod's egress entries (``evaluate_entries``' covering rule) with the
  server's identity from the ipcache. Every covering allow entry with DNS rules
  contributes its rules (rules of several selectors on one port add up, as in
  Cilium); no such entry (the intent changed under the query, or an unknown
  pod) refuses the query: fail closed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from ciliary.operator import intents
from ciliary.operator.intents import DNSRule, Verdict

WORLD = 2
_DNS_CHARS = "[-a-z0-9_]"


def canonical(name: str) -> str:
    """``API.World.test.`` -> ``api.world.test``."""
    return name.strip().lower().rstrip(".")


@lru_cache(maxsize=4096)
def _pattern(pattern: str) -> re.Pattern[str]:
    text = canonical(pattern)
    if text == "*":
        return re.compile(r".*")
    return re.compile("".join(f"{_DNS_CHARS}*" if c == "*" else re.escape(c) for c in text))


def rule_matches(rule: DNSRule, name: str) -> bool:
    """Does one ``matchName``/``matchPattern`` (or toFQDNs selector) match ``name``?"""
    qname = canonical(name)
    if rule.match_name is not None:
        return canonical(rule.match_name) == qname
    if rule.match_pattern is not None:
        return _pattern(rule.match_pattern).fullmatch(qname) is not None
    return False


def any_matches(rules: Iterable[DNSRule], name: str) -> bool:
    return any(rule_matches(rule, name) for rule in rules)


@dataclass(frozen=True)
class QueryVerdict:
    """What the proxy does with one query: ``rules`` empty -> refuse (``reason`` says why)."""

    endpoint: intents.EndpointIntent | None
    rules: tuple[DNSRule, ...]
    entries: tuple[intents.PolicyEntry, ...] = ()
    reason: str = ""
    peer: int = 0
    """The server's identity."""

    def allows(self, name: str) -> bool:
        return any_matches(self.rules, name)


_Table = tuple[tuple[int, int, int], ...]
_tables: dict[int, tuple[Sequence[intents.IpcacheEntry], _Table]] = {}


def _table(ipcache: Sequence[intents.IpcacheEntry]) -> _Table:
    """(network, mask, identity), longest prefix first; kept for the last few ipcaches seen."""
    found = _tables.get(id(ipcache))
    if found is not None and found[0] is ipcache:
        return found[1]
    rows = []
    for entry in ipcache:
        network = ipaddress.IPv4Network(entry.cidr)
        rows.append((network.prefixlen, int(network.network_address), int(network.netmask), entry.identity))
    table = tuple((net, mask, ident) for _len, net, mask, ident in sorted(rows, key=lambda r: -r[0]))
    if len(_tables) >= 4:
        _tables.clear()
    _tables[id(ipcache)] = (ipcache, table)
    return table


def ipcache_identity(ipcache: Sequence[intents.IpcacheEntry], address: str) -> int:
    """The identity of ``address``: longest matching prefix, world when none matches."""
    ip = int(ipaddress.IPv4Address(address))
    for net, mask, ident in _table(ipcache):
        if ip & mask == net:
            return ident
    return WORLD


def query_verdict(intent: intents.NodeIntent | None, client: str, server: str, port: int,
                  protocol: int) -> QueryVerdict:
    """The DNS rules for a query from pod ``client`` to ``server``:``port`` over ``protocol`` (6 or 17)."""
    if intent is None:
        return QueryVerdict(None, (), reason="no intent applied")
    endpoint = next((e for e in intent.endpoints if e.ipv4 == client), None)
    if endpoint is None:
        return QueryVerdict(None, (), reason=f"{client} is no endpoint of this node")
    peer = ipcache_identity(intent.ipcache, server)
    covering = [e for e in endpoint.egress.entries if e.covers(peer, protocol, port)]
    if any(e.verdict is Verdict.DENY for e in covering):
        return QueryVerdict(endpoint, (), reason="a deny rule covers the server", peer=peer)
    dns = tuple(e for e in covering if e.l7_redirect and e.l7_parser == "dns")
    if not dns:
        return QueryVerdict(endpoint, (), reason="no DNS rule covers the server and port", peer=peer)
    rules = tuple(dict.fromkeys(rule for e in dns for rule in e.dns))
    return QueryVerdict(endpoint, rules, dns, peer=peer)
