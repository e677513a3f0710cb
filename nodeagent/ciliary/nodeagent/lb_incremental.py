"""Plan the socket load balancer's map writes from what changed since the last apply (pure).

``lb_planning.plan`` compares every entry the maps hold with every entry the intent wants: at 10,000
Services (40,000 entries, 30,000 backends) that is about 0.7 s, and reading the maps back from the kernel
another 0.6 s, for each version of the intent, when one Service change touches a handful of entries.

:class:`LBPlanner` remembers what the maps hold (``state``: what its last committed plan wrote, the kernel's
contents read once at the start) and each frontend's part of it (``lb_planning.FrontendPart``). A new intent
is compared frontend by frontend: the same object, or an equal one, is unchanged. The agent's shard assembler
hands unchanged shards' frontends on as they were, and a part takes the equal new object of a re-read shard,
so that identity decides next time (comparing 10,000 frontends by value took 120-170 ms of an agent's apply).
Only the parts of frontends that went or changed are taken out, only frontends that came or changed are
planned, and only their entries are compared. The result is exactly what ``lb_planning.plan`` gives from the
same state, ids and write order included (``tests/unit/nodeagent/test_lb_incremental.py`` checks it on
random intent sequences).

The first plan, one for another node and one for an intent naming a frontend twice are made from scratch
(after a failed write the engine reads the kernel again and starts a new planner). :meth:`LBPlanner.plan`
changes nothing; :meth:`LBPlanner.commit` adopts a plan once its writes are done.
"""

from __future__ import annotations

import dataclasses

from ciliary.nodeagent import lb_planning
from ciliary.nodeagent.lb_planning import Backend, FrontendPart, LBPlan, LBState, ServiceKey
from ciliary.nodeagent.planning import MapDiff, diff_map
from ciliary.operator.services.intent import FrontendIntent, FrontendKind, NodeLBIntent, frontend_key

FrontendId = tuple[str, int, str]
"""``FrontendIntent.key``: address, port, protocol."""


@dataclasses.dataclass(frozen=True)
class _Book:
    """The planner's bookkeeping after a plan: parts by frontend, how many parts name each backend id, and the
    id of each backend value named."""

    node: str
    parts: dict[FrontendId, FrontendPart]
    refs: dict[int, int]
    live: dict[Backend, int]


def _book(node: str, parts: list[FrontendPart]) -> _Book | None:
    by_key = {part.fe.key: part for part in parts}
    if len(by_key) != len(parts):
        return None  # a frontend named twice: plan the next intent from scratch too
    refs: dict[int, int] = {}
    live: dict[Backend, int] = {}
    for part in parts:
        for bid, be in part.backends.items():
            refs[bid] = refs.get(bid, 0) + 1
            live[be] = bid
    return _Book(node, by_key, refs, live)


@dataclasses.dataclass
class LBPlanner:
    state: LBState
    """What the maps hold (the kernel's contents when created; each committed plan's ``desired`` after)."""
    services_size: int
    backends_size: int
    source_ranges_size: int
    _book: _Book | None = None
    _pending: tuple[LBPlan, _Book | None] | None = None
    full_plans: int = 0
    """Plans made from scratch (the first, one for another node, one for an intent naming a frontend twice)."""

    def plan(self, intent: NodeLBIntent) -> LBPlan:
        book = self._book
        if book is None or book.node != intent.node:
            return self._plan_from_scratch(intent)
        fresh: dict[FrontendId, FrontendIntent] = {}
        removed: list[FrontendPart] = []
        added: list[FrontendIntent] = []
        refreshed: dict[FrontendId, FrontendIntent] = {}
        for fe in intent.frontends:
            key = frontend_key(fe)
            fresh[key] = fe
            part = book.parts.get(key)
            if part is None:
                added.append(fe)
            elif part.fe is fe:
                continue
            elif part.fe == fe:
                refreshed[key] = fe  # the part holds the new object: identity decides next time
            else:
                removed.append(part)
                added.append(fe)
        if len(fresh) != len(intent.frontends):
            return self._plan_from_scratch(intent)
        if len(fresh) - len(added) + len(removed) != len(book.parts):
            removed += [part for key, part in book.parts.items() if key not in fresh]
        return self._plan_changes(intent, book, removed, added, refreshed)

    def _sizes(self) -> dict[str, int]:
        return {"services_size": self.services_size, "backends_size": self.backends_size,
                "source_ranges_size": self.source_ranges_size}

    def commit(self, step: LBPlan) -> None:
        """The maps now hold ``step.desired`` (its writes are done)."""
        assert self._pending is not None and self._pending[0] is step, "commit the plan made last"
        self.state, self._book, self._pending = step.desired, self._pending[1], None

    def _plan_from_scratch(self, intent: NodeLBIntent) -> LBPlan:
        self.full_plans += 1
        desired, parts = lb_planning.desired_parts(intent, self.state)
        step = lb_planning.plan_towards(desired, self.state, **self._sizes())
        self._pending = (step, _book(intent.node, parts))
        return step

    def _plan_changes(self, intent: NodeLBIntent, book: _Book, removed: list[FrontendPart],
                      added: list[FrontendIntent], refreshed: dict[FrontendId, FrontendIntent]) -> LBPlan:
        old = self.state
        services, backends, ranges = dict(old.services), dict(old.backends), dict(old.source_ranges)
        parts, refs, live = dict(book.parts), dict(book.refs), dict(book.live)
        for key, fe in refreshed.items():
            parts[key] = dataclasses.replace(parts[key], fe=fe)
        orphans: dict[Backend, int] = {}
        touched: set[ServiceKey] = set()
        touched_backends: set[int] = set()
        touched_ranges: set[lb_planning.SourceRangeKey] = set()
        for part in removed:
            del parts[part.fe.key]
            for entry_key in part.services:
                del services[entry_key]
            touched.update(part.services)
            for rng in part.ranges:
                del ranges[rng]
            touched_ranges.update(part.ranges)
            for bid, be in part.backends.items():
                refs[bid] -= 1
                if not refs[bid]:
                    del refs[bid], live[be]
                    orphans[be] = bid
            touched_backends.update(part.backends)
        # ids as a plan from scratch against ``old`` gives them: every frontend's own entry and every backend
        # of ``old`` counts for the next new id; a backend value any part still names keeps its id
        next_id = max([0, *(part.ident for part in book.parts.values()), *old.backends]) + 1
        chosen = [lb_planning.frontend_backends(fe, intent.node) for fe in added]
        be_ids, next_id = lb_planning.assign_backend_ids(
            list(dict.fromkeys(be for items in chosen for be in items)),
            lambda be: live[be] if be in live else orphans.get(be),
            lb_planning.places({bid: be for be, bid in orphans.items()}), next_id)
        for fe, wanted in zip(added, chosen, strict=True):  # each key once: a frontend named twice went from scratch
            entry = old.services.get(lb_planning.frontend_key(fe))
            if entry is not None:
                ident = entry.backend_id
            else:
                ident, next_id = next_id, next_id + 1
            part = lb_planning.frontend_part(fe, ident, wanted, be_ids)
            parts[fe.key] = part
            services.update(part.services)
            touched.update(part.services)
            ranges.update(part.ranges)
            touched_ranges.update(part.ranges)
            for bid, be in part.backends.items():
                refs[bid] = refs.get(bid, 0) + 1
                live[be] = bid
                backends[bid] = be
            touched_backends.update(part.backends)
        for bid in orphans.values():
            if bid not in refs:
                backends.pop(bid, None)
        # the NodePort map comes from the NODE_PORT frontends alone: when none of them went, came or changed,
        # it stays as it is
        if any(fe.kind == FrontendKind.NODE_PORT for fe in (*added, *(part.fe for part in removed))):
            nodeports = lb_planning.nodeports_of(intent)
        else:
            nodeports = dict(old.nodeports)
        desired = LBState(services, backends, nodeports, ranges)
        be_up = {k: backends[k] for k in sorted(touched_backends)
                 if k in backends and old.backends.get(k) != backends[k]}
        be_del = tuple(sorted(k for k in touched_backends if k in old.backends and k not in backends))
        changed = {k: services[k] for k in touched if k in services and old.services.get(k) != services[k]}
        gone = [k for k in touched if k in old.services and k not in services]
        range_diff = lb_planning.sorted_diff(MapDiff(
            {k: 1 for k in touched_ranges if k in ranges and old.source_ranges.get(k) != 1},
            tuple(k for k in touched_ranges if k in old.source_ranges and k not in ranges)))
        lb_planning.check_capacity(desired, backend_peak=len(backends) + len(be_del),
                                   range_peak=len(ranges) + len(range_diff.deletes), **self._sizes())
        step = LBPlan(desired, MapDiff(be_up, ()), lb_planning.ordered_service_writes(changed, gone),
                      MapDiff({}, be_del), diff_map(old.nodeports, nodeports), range_diff)
        self._pending = (step, _Book(intent.node, parts, refs, live))
        return step
