"""toFQDNs on this node: the operator's intent plus what its pods resolved, as one intent to apply.

Pure. The operator's intent names each ``toFQDNs`` selector by a selector
identity (``NodeIntent.fqdn_selectors``); no address has it. :func:`expand`
turns the addresses the DNS proxy learnt (``FQDNCache.names_by_address``) into
datapath state the existing planner applies unchanged:

- every learnt address that is outside the cluster (its ipcache identity is
  world or a CIDR identity; a pod or node address is ignored, as in Cilium) and
  that matches a selector some local endpoint uses gets its own node-local
  identity ``3<<24 | n`` (:class:`LearntIdentities`, stable while the address is
  in use) and a /32 ipcache entry;
- that identity *inherits* every entry (allow and deny, ingress and egress, every
  endpoint) of the identity the address had before (the ipcache's longest
  prefix: world or a CIDR identity), so a ``toCIDR``, ``toEntities: world`` or
  deny rule covering the address decides exactly as before;
- and, for each endpoint that itself resolved a name matching a selector its
  egress entries use, it gets a copy of those entries. So a connection to the
  address is allowed only from a pod that resolved the name, and only until
  the cache entry expires. (Cilium shares the selector's addresses node-wide;
  Ciliary keeps them per endpoint, which never allows more.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ciliary.nodeagent.dns_policy import WORLD, ipcache_identity, rule_matches
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, IpcacheEntry, PolicyEntry, sorted_entries
from ciliary.operator.policy.identities import (  # the numbering plan lives there
    FIRST_CIDR_IDENTITY,
    FIRST_LEARNT_IDENTITY,
    MAX_CIDR_IDENTITY,
    MAX_LEARNT_IDENTITY,
)

__all__ = ["FIRST_LEARNT_IDENTITY", "MAX_LEARNT_IDENTITY", "LearntIdentities", "expand", "grants"]

Learnt = Mapping[str, Mapping[str, frozenset[str]]]
"""endpoint IPv4 -> learnt address -> the names it answered."""


class LearntIdentities:
    """Address -> node-local identity, stable while the address stays in use."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def assign(self, addresses: Iterable[str]) -> dict[str, int]:
        wanted = sorted(set(addresses))
        self._ids = {a: n for a, n in self._ids.items() if a in wanted}
        used = set(self._ids.values())
        candidate = FIRST_LEARNT_IDENTITY
        for address in wanted:
            if address in self._ids:
                continue
            while candidate in used:
                candidate += 1
            if candidate > MAX_LEARNT_IDENTITY:
                raise RuntimeError("no free node-local identity for learnt addresses")
            self._ids[address] = candidate
            used.add(candidate)
        return dict(self._ids)


def _outside_cluster(identity: int) -> bool:
    return identity == WORLD or FIRST_CIDR_IDENTITY <= identity <= MAX_CIDR_IDENTITY


def grants(intent: intents.NodeIntent, learnt: Learnt) -> dict[str, dict[str, frozenset[int]]]:
    """endpoint -> learnt address -> the selector identities of its egress entries the address's names match."""
    selectors = intent.fqdn_selectors
    out: dict[str, dict[str, frozenset[int]]] = {}
    if not selectors:
        return out
    for endpoint in intent.endpoints:
        answers = learnt.get(endpoint.ipv4)
        used = {e.identity for e in endpoint.egress.entries if e.identity in selectors}
        if not answers or not used:
            continue
        for address, names in answers.items():
            if not _outside_cluster(ipcache_identity(intent.ipcache, address)):
                continue
            matched = frozenset(s for s in used if any(rule_matches(selectors[s], n) for n in names))
            if matched:
                out.setdefault(endpoint.ipv4, {})[address] = matched
    return out


def expand(intent: intents.NodeIntent, learnt: Learnt, ids: LearntIdentities) -> intents.NodeIntent:
    """``intent`` with the learnt addresses' identities, ipcache entries and entries (see the module)."""
    granted = grants(intent, learnt)
    numbers = ids.assign(a for per in granted.values() for a in per)
    if not numbers:
        return intent
    shadow = {a: ipcache_identity(intent.ipcache, a) for a in numbers}
    inherit: dict[int, list[str]] = {}
    for address, old in shadow.items():
        inherit.setdefault(old, []).append(address)
    names = {a: sorted({n for per in learnt.values() for n in per.get(a, ())}) for a in numbers}
    endpoints = []
    for endpoint in intent.endpoints:
        own = granted.get(endpoint.ipv4, {})
        ingress = _direction(endpoint.ingress, inherit, numbers, {})
        egress = _direction(endpoint.egress, inherit, numbers, own)
        endpoints.append(endpoint.model_copy(update={"ingress": ingress, "egress": egress}))
    learnt_cidrs = {f"{a}/32" for a in numbers}
    ipcache = tuple(e for e in intent.ipcache if e.cidr not in learnt_cidrs) + tuple(
        IpcacheEntry(cidr=f"{a}/32", identity=n) for a, n in sorted(numbers.items()))
    labels = dict(intent.identity_labels)
    for address, number in numbers.items():
        labels[number] = (*(f"fqdn:{n}" for n in names[address]), *intent.identity_labels.get(
            shadow[address], ("reserved:world",) if shadow[address] == WORLD else ()))
    return intent.model_copy(update={"endpoints": tuple(endpoints), "ipcache": ipcache, "identity_labels": labels})


def _direction(policy: DirectionPolicy, inherit: Mapping[int, list[str]], numbers: Mapping[str, int],
               own: Mapping[str, frozenset[int]]) -> DirectionPolicy:
    if not policy.enforced:
        return policy
    added: list[PolicyEntry] = []
    for entry in policy.entries:
        for address in inherit.get(entry.identity, ()):
            added.append(entry.model_copy(update={"identity": numbers[address]}))
        for address, selectors in own.items():
            if entry.identity in selectors and entry.verdict is intents.Verdict.ALLOW:
                added.append(entry.model_copy(update={"identity": numbers[address]}))
    if not added:
        return policy
    return policy.model_copy(update={"entries": sorted_entries((*policy.entries, *added))})
