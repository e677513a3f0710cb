"""Named container ports of the cluster's pods, by security identity.

Owns :class:`NamedPortIndex`, which ``resolution`` keeps next to its
selection index: for every pod identity, which (name, protocol, number)
triples its pods declare (counted, so that two pods of one identity declaring
the same port are one fact, and removing one of them keeps it). It answers the
two questions ``entries`` asks about egress named ports:

- :meth:`NamedPortIndex.of`: the named ports of one peer identity (an item that
  selects its peers), and
- :meth:`NamedPortIndex.owners`: which identities declare a given name, with
  their numbers (an item that allows any peer: the name resolves per
  destination identity, never against the union of every pod's ports).

Answers are cached and dropped when the facts they were built from change.
Identities without pods (world, CIDRs, host, remote nodes) declare nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType

NamedPorts = Mapping[str, tuple[tuple[str, int], ...]]
"""Port name -> ((protocol, port), ...)."""

PortOwners = Mapping[int, tuple[tuple[str, int], ...]]
"""Identity -> ((protocol, port), ...) its pods declare under one port name."""

_NONE: NamedPorts = MappingProxyType({})


class NamedPortIndex:
    """Per-identity named ports with per-identity and per-name cached views."""

    def __init__(self) -> None:
        self._counts: dict[int, Counter[tuple[str, str, int]]] = {}
        self._by_name: dict[str, dict[int, Counter[tuple[str, int]]]] = {}
        self._of: dict[int, NamedPorts] = {}
        self._owners: dict[str, PortOwners] = {}

    def count(self, ident: int, named: NamedPorts, delta: int) -> bool:
        """Add (``delta`` +1) or remove (-1) one pod's named ports; True when the facts changed."""
        if not named:
            return False
        counts = self._counts.setdefault(ident, Counter())
        changed: set[str] = set()
        for name, pairs in named.items():
            for proto, number in pairs:
                key = (name, proto, number)
                counts[key] += delta
                if counts[key] <= 0:
                    del counts[key]
                    changed.add(name)
                elif counts[key] == delta:
                    changed.add(name)
                by_ident = self._by_name.setdefault(name, {})
                pair_counts = by_ident.setdefault(ident, Counter())
                pair_counts[(proto, number)] += delta
                if pair_counts[(proto, number)] <= 0:
                    del pair_counts[(proto, number)]
                    if not pair_counts:
                        del by_ident[ident]
                        if not by_ident:
                            del self._by_name[name]
        if not counts:
            del self._counts[ident]
        if changed:
            self._of.pop(ident, None)
            for name in changed:
                self._owners.pop(name, None)
        return bool(changed)

    def of(self, ident: int) -> NamedPorts:
        """The named ports the pods of ``ident`` declare (empty for a non-pod identity)."""
        found = self._of.get(ident)
        if found is None:
            counts = self._counts.get(ident)
            if not counts:
                return _NONE
            merged: dict[str, set[tuple[str, int]]] = {}
            for name, proto, number in counts:
                merged.setdefault(name, set()).add((proto, number))
            found = self._of[ident] = {k: tuple(sorted(v)) for k, v in merged.items()}
        return found

    def owners(self, name: str) -> PortOwners:
        """Every identity whose pods declare a port called ``name``, with its numbers."""
        found = self._owners.get(name)
        if found is None:
            by_ident = self._by_name.get(name, {})
            found = self._owners[name] = {ident: tuple(sorted(pairs)) for ident, pairs in by_ident.items()}
        return found
