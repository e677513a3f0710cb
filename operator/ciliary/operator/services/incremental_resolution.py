"""Every node's load-balancing intent, as shards, kept up to date from the Services that changed (pure).

``resolution.resolve`` looks at every Service on every call: at 10,000 Services, offline on a quiet machine,
it took 86-91 ms, and cutting its intents into shards another 43-45 ms, when one Service had changed.
:class:`IncrementalResolver` keeps what a pass needs between passes:

* per Service, what it wants (``resolution.ServiceWants``) and its problems;
* per frontend (address, port, protocol), the Services claiming it; its owner is the first of them by
  namespace/name, as in ``resolve``;
* per node, the body of every shard (``sharding.ShardBody``; a Service lives in ``sharding.shard_of``).

A pass finds the Services whose inputs changed by identity (the service model keeps a value that did not
change as it was; a new but equal value only costs its Service a resolution). Told which Service and slice
keys the model touched since the last pass (:class:`Touched`), it looks only at those; otherwise it checks
every one, and copies the inputs (6 ms for a pass with nothing changed at 10,000). The first pass, and the
first after a reset, checks every one whatever it is told. It resolves those again, moves
the ownership of the frontends they claimed or gave up, and rebuilds the shards of the Services touched:
those that changed and the claimants of every frontend whose owner changed (they gain or lose it, and a
``FrontendConflict`` problem). A rebuilt body equal to the old one is handed on as the old object, so
``sharding.encode`` serialises only shards whose content changed. A change of the nodes (or their
addresses) starts from scratch.

The bodies are exactly ``sharding.bodies_of(resolve(...).intents[node])`` for the same input, and the problems
exactly ``resolve``'s (``tests/unit/operator/services/test_incremental_resolution.py``, hypothesis).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import NamedTuple

from ciliary.operator.services import errors
from ciliary.operator.services.inputs import ServiceInfo, SliceInfo
from ciliary.operator.services.intent import FrontendIntent, FrontendKey, HealthCheckIntent, ProblemIntent
from ciliary.operator.services.resolution import ResolverConfig, ServiceWants, conflict, served, wants_of
from ciliary.operator.services.sharding import SHARD_COUNT, ShardBody, shard_of


@dataclass(frozen=True)
class LBUpdate:
    """One pass's result: every node's shards (name -> non-empty body) and every Service's problems."""

    shards: Mapping[str, Mapping[str, ShardBody]]
    problems: Mapping[str, tuple[errors.ServiceProblem, ...]]
    """Service ``namespace/name`` -> its problems (each becomes a Warning Event), sorted by Service; a Service
    without problems is absent."""
    resolved: int
    """Services resolved again in this pass."""
    rebuilt: int
    """Shards rebuilt in this pass (per node)."""


class Touched(NamedTuple):
    """The Service and slice keys whose values were set or deleted since the last pass (a superset is fine)."""

    services: Set[str]
    slices: Set[str]


def _claimed(wants: ServiceWants | None) -> set[FrontendKey]:
    if wants is None:
        return set()
    return {fe.key for items in wants.frontends.values() for _, fe in items}


class IncrementalResolver:
    def __init__(self, config: ResolverConfig | None = None, *, shard_count: int = SHARD_COUNT) -> None:
        self._config = config if config is not None else ResolverConfig()
        """Fixed for the resolver's life (what it keeps was resolved with it)."""
        self.shard_count = shard_count
        self._reset({})

    def _reset(self, nodes: dict[str, str | None]) -> None:
        self._nodes = nodes
        self._whole = True
        """The next pass checks every key (nothing kept to compare the touched ones with)."""
        self._services: dict[str, ServiceInfo] = {}
        """The inputs of the last pass, compared by identity with the next one's."""
        self._slices: dict[str, SliceInfo] = {}
        self._slices_of: dict[str, dict[str, SliceInfo]] = {}
        """Service key -> its slices (slice key -> slice), headless ones included."""
        self._wants: dict[str, ServiceWants] = {}
        """Served Services only."""
        self._claims: dict[FrontendKey, set[str]] = {}
        self._owner: dict[FrontendKey, str] = {}
        self._problems: dict[str, tuple[errors.ServiceProblem, ...]] = {}
        """Services with problems only."""
        self._members: dict[str, set[str]] = {}
        """Shard -> the served Services in it."""
        self._bodies: dict[str, dict[str, ShardBody]] = {node: {} for node in nodes}

    def update(self, services: Mapping[str, ServiceInfo], slices: Mapping[str, SliceInfo],
               nodes: Mapping[str, str | None], touched: Touched | None = None) -> LBUpdate:
        """Every node's shards for these inputs. ``nodes``: node name -> its InternalIP (None if unknown);
        ``touched``: the keys set or deleted since the last pass (None: check every key).
        A pass that raises leaves nothing half-kept: the next one starts from scratch."""
        try:
            ordered = dict(sorted(nodes.items()))
            if ordered != self._nodes:
                self._reset(ordered)
            return self._update(services, slices, None if self._whole else touched)
        except BaseException:
            self._reset({})
            raise

    def _update(self, services: Mapping[str, ServiceInfo], slices: Mapping[str, SliceInfo],
                touched_keys: Touched | None) -> LBUpdate:
        if touched_keys is None:
            changed = self._changed(services, slices)
        else:
            changed = self._changed_among(services, slices, touched_keys)
        self._whole = False
        touched = set(changed)
        moved: set[FrontendKey] = set()
        for key in changed:
            moved |= self._resolve_again(key, services.get(key))
        for fk in moved:
            claims = self._claims.get(fk, set())
            owner = min(claims, default=None)
            if owner == self._owner.get(fk):
                continue
            if owner is None:
                del self._owner[fk]
            else:
                self._owner[fk] = owner
            touched |= claims
        for key in touched:
            found = self._problems_of(key)
            if found:
                self._problems[key] = found
            else:
                self._problems.pop(key, None)
        dirty = {shard_of(key, self.shard_count) for key in touched}
        for name in dirty:
            for node, bodies in self._bodies.items():
                self._rebuild(node, name, bodies)
        shards = {node: dict(bodies) for node, bodies in self._bodies.items()}
        problems = {key: self._problems[key] for key in sorted(self._problems)}
        return LBUpdate(shards=shards, problems=problems, resolved=len(changed),
                        rebuilt=len(dirty) * len(self._bodies))

    def _changed(self, services: Mapping[str, ServiceInfo], slices: Mapping[str, SliceInfo]) -> set[str]:
        """Keys of the Services whose value or slices are not the very objects of the last pass (or are gone)."""
        changed = {key for key, svc in services.items() if self._services.get(key) is not svc}
        changed |= self._services.keys() - services.keys()
        for key, sl in slices.items():
            old = self._slices.get(key)
            if old is sl:
                continue
            if old is not None:
                changed.add(old.service_key)
                self._slices_of[old.service_key].pop(key, None)
            changed.add(sl.service_key)
            self._slices_of.setdefault(sl.service_key, {})[key] = sl
        for key in self._slices.keys() - slices.keys():
            old = self._slices[key]
            changed.add(old.service_key)
            self._slices_of[old.service_key].pop(key, None)
        self._services, self._slices = dict(services), dict(slices)
        return changed

    def _changed_among(self, services: Mapping[str, ServiceInfo], slices: Mapping[str, SliceInfo],
                       touched: Touched) -> set[str]:
        """:meth:`_changed` for the touched keys only (the kept inputs are updated in place)."""
        changed: set[str] = set()
        for key in touched.services:
            svc = services.get(key)
            if self._services.get(key) is svc:
                continue
            changed.add(key)
            if svc is None:
                del self._services[key]
            else:
                self._services[key] = svc
        for key in touched.slices:
            sl, old = slices.get(key), self._slices.get(key)
            if old is sl:
                continue
            if old is not None:
                changed.add(old.service_key)
                self._slices_of[old.service_key].pop(key, None)
                del self._slices[key]
            if sl is not None:
                changed.add(sl.service_key)
                self._slices_of.setdefault(sl.service_key, {})[key] = sl
                self._slices[key] = sl
        return changed

    def _resolve_again(self, key: str, service: ServiceInfo | None) -> set[FrontendKey]:
        """Resolve one Service again; returns the frontends it began or stopped claiming."""
        shard = shard_of(key, self.shard_count)
        before = _claimed(self._wants.pop(key, None))
        wants = None
        if service is not None and served(service, self._config):
            own = self._slices_of.get(key, {})
            wants = wants_of(service, [own[k] for k in sorted(own) if not own[k].headless], self._nodes, self._config)
            self._wants[key] = wants
            self._members.setdefault(shard, set()).add(key)
        else:
            self._members.get(shard, set()).discard(key)
        if not self._slices_of.get(key):
            self._slices_of.pop(key, None)
        after = _claimed(wants)
        for fk in before - after:
            claims = self._claims[fk]
            claims.discard(key)
            if not claims:
                del self._claims[fk]
        for fk in after - before:
            self._claims.setdefault(fk, set()).add(key)
        return before ^ after

    def _problems_of(self, key: str) -> tuple[errors.ServiceProblem, ...]:
        """The Service's own problems, then a conflict for each frontend another Service owns (once each)."""
        wants = self._wants.get(key)
        if wants is None:
            return ()
        service = self._services[key]
        mine = list(wants.problems)
        lost: set[FrontendKey] = set()
        for items in wants.frontends.values():
            for label, fe in items:
                owner = self._owner[fe.key]
                if owner != key and fe.key not in lost:
                    lost.add(fe.key)
                    mine.append(conflict(service, label, fe, owner))
        return tuple(mine)

    def _rebuild(self, node: str, name: str, bodies: dict[str, ShardBody]) -> None:
        members = sorted(self._members.get(name, ()))
        table: dict[FrontendKey, FrontendIntent] = {}
        health: list[HealthCheckIntent] = []
        problems: list[ProblemIntent] = []
        for key in members:
            wants = self._wants[key]
            for _, fe in wants.frontends.get(node, ()):
                if self._owner[fe.key] == key:
                    table.setdefault(fe.key, fe)
            hc = wants.health_checks.get(node)
            if hc is not None:
                health.append(hc)
            problems += [ProblemIntent(service=key, reason=p.reason, message=p.message)
                         for p in self._problems.get(key, ())]
        body = ShardBody(tuple(v for _, v in sorted(table.items())),
                         tuple(sorted(health, key=lambda h: (h.port, h.service))), tuple(problems))
        if body.empty:
            bodies.pop(name, None)
        elif bodies.get(name) != body:
            bodies[name] = body
