"""Which HTTP rules with headerMatches mismatch actions can allow one request together, and what that costs the
node's proxy in routes (pure).

The node's Envoy takes the first route that matches, while a request allowed by several rules must get the
actions of every one of them. So the rules with actions get one group of routes per set of them that can allow
a request together (largest sets first), each group holding a route per combination of its action headers
matching or not (2**n). Two rules whose ``method``, ``path`` or ``host`` are different literal strings (no
regular-expression syntax) never allow the same request: sets holding both are left out. Everything else is
assumed to overlap.

The operator refuses a port rule whose rules alone need more than :data:`MAX_ROUTES`
(``api.validation``); the agent refuses a node configuration whose chain (rules of several policies on one
port and peer) needs more (``nodeagent.envoy_routes``): never a configuration cut short.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ROUTES = 512
_REGEX_SYNTAX = re.compile(r"[.^$*+?()\[\]{}|\\]")


@dataclass(frozen=True, slots=True)
class ActingRule:
    """What decides whether rules can overlap: their ``method``, ``path`` and ``host`` patterns ("" = any),
    and how many of their headerMatches carry a mismatch action."""

    method: str
    path: str
    host: str
    actions: int


def _literal(pattern: str) -> str | None:
    return pattern if pattern and not _REGEX_SYNTAX.search(pattern) else None


def _disjoint(a: ActingRule, b: ActingRule) -> bool:
    for x, y in ((a.method, b.method), (a.path, b.path), (a.host, b.host)):
        lx, ly = _literal(x), _literal(y)
        if lx is not None and ly is not None and lx != ly:
            return True
    return False


@dataclass(frozen=True, slots=True)
class ActionSets:
    sets: tuple[tuple[int, ...], ...]
    """Index sets (into the rules given) that may allow one request together, largest first, then in rule order."""
    routes: int
    """Routes they need; counting stops once past :data:`MAX_ROUTES` (then :attr:`over` is true)."""

    @property
    def over(self) -> bool:
        return self.routes > MAX_ROUTES


def action_sets(rules: Sequence[ActingRule]) -> ActionSets:
    """The sets of ``rules`` (those with actions) that can allow one request together, and their route count."""
    found: list[tuple[int, ...]] = []
    routes = 0

    def extend(current: tuple[int, ...], actions: int, start: int) -> bool:
        nonlocal routes
        for i in range(start, len(rules)):
            if any(_disjoint(rules[j], rules[i]) for j in current):
                continue
            chosen = (*current, i)
            found.append(chosen)
            routes += 2 ** (actions + rules[i].actions)
            if routes > MAX_ROUTES or not extend(chosen, actions + rules[i].actions, i + 1):
                return False
        return True

    extend((), 0, 0)
    return ActionSets(tuple(sorted(found, key=lambda s: (-len(s), s))), routes)
