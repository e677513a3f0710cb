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

**Shards.** Given the intent's shards too (``shards``: shard name -> that shard's frontends, as the agent's
shard assembler hands them on; the intent is their union, sorted by ``frontend_key``), the planner walks only
the shards whose frontends tuple is not the one it planned last: one Service change at 10,000 Services looks
at one shard's ~160 frontends instead of all 10,000 (offline 3-4 ms instead of 11-16 ms per plan; what stays
linear is C-level: copies of the book's dicts). A frontend that appears in a changed shard while an unchanged
one still holds it is a frontend named twice, and shards that do not hold as many frontends as the intent do
not make it up: both are planned from scratch.

The first plan, one for another node and one for an intent naming a frontend twice are made from scratch
(after a failed write the engine reads the kernel again and starts a new planner). :meth:`LBPlanner.plan`
changes nothing; :meth:`LBPlanner.commit` adopts a plan once its writes are done.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping

from ciliary.nodeagent import lb_planning
from ciliary.nodeagent.lb_planning import Backend, FrontendPart, LBPlan, LBState, ServiceKey
from ciliary.nodeagent.planning import MapDiff, diff_map
from ciliary.operator.services.intent import FrontendIntent, FrontendKind, NodeLBIntent, frontend_key

FrontendId = tuple[str, int, str]
"""``FrontendIntent.key``: address, port, protocol."""
_IDENT = operator.attrgetter("ident")
Shards = Mapping[str, tuple[FrontendIntent, ...]]
"""Shard name -> the shard's frontends (the intent is their union)."""


@dataclasses.dataclass(frozen=True)
class _ShardBook:
    """Which frontends each shard held when last planned: its frontends tuple (identity says unchanged), its
    keys, and each key's shard."""

    frontends: dict[str, tuple[FrontendIntent, ...]]
    members: dict[str, tuple[FrontendId, ...]]
    home: dict[FrontendId, str]


def _shard_book(shards: Shards) -> _ShardBook:
    members = {name: tuple(frontend_key(fe) for fe in fes) for name, fes in shards.items()}
    return _ShardBook(dict(shards), members, {key: name for name, keys in members.items() for key in keys})


@dataclasses.dataclass(frozen=True)
class _Book:
    """The planner's bookkeeping after a plan: parts by frontend, how many parts name each backend id, and the
    id of each backend value named."""

    node: str
    parts: dict[FrontendId, FrontendPart]
    refs: dict[int, int]
    live: dict[Backend, int]
    top: int
    """The highest frontend id of the parts (0: none)."""
    shards: _ShardBook | None = None


def _book(node: str, parts: list[FrontendPart], shards: Shards | None) -> _Book | None:
    by_key = {part.fe.key: part for part in parts}
    if len(by_key) != len(parts):
        return None  # a frontend named twice: plan the next intent from scratch too
    refs: dict[int, int] = {}
    live: dict[Backend, int] = {}
    for part in parts:
        for bid, be in part.backends.items():
            refs[bid] = refs.get(bid, 0) + 1
            live[be] = bid
    top = max(map(_IDENT, parts), default=0)
    return _Book(node, by_key, refs, live, top, None if shards is None else _shard_book(shards))


def _compare(book: _Book, key: FrontendId, fe: FrontendIntent, removed: list[FrontendPart],
             added: list[FrontendIntent], refreshed: dict[FrontendId, FrontendIntent]) -> None:
    """Sort one wanted frontend against the planned one: new, unchanged (the same object), equal (the part
    takes the new object: identity decides next time) or changed."""
    part = book.parts.get(key)
    if part is None:
        added.append(fe)
    elif part.fe is fe:
        return
    elif part.fe == fe:
        refreshed[key] = fe
    else:
        removed.append(part)
        added.append(fe)


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

    def plan(self, intent: NodeLBIntent, shards: Shards | None = None) -> LBPlan:
        """The writes from what the maps hold to ``intent``; ``shards``: its shards, when it is their union."""
        book = self._book
        if book is None or book.node != intent.node:
            return self._plan_from_scratch(intent, shards)
        if shards is not None and book.shards is not None:
            return self._plan_shards(intent, book, book.shards, shards)
        fresh: dict[FrontendId, FrontendIntent] = {}
        removed: list[FrontendPart] = []
        added: list[FrontendIntent] = []
        refreshed: dict[FrontendId, FrontendIntent] = {}
        for fe in intent.frontends:
            key = frontend_key(fe)
            fresh[key] = fe
            _compare(book, key, fe, removed, added, refreshed)
        if len(fresh) != len(intent.frontends):
            return self._plan_from_scratch(intent, shards)
        if len(fresh) - len(added) + len(removed) != len(book.parts):
            removed += [part for key, part in book.parts.items() if key not in fresh]
        return self._plan_changes(intent, book, removed, added, refreshed,
                                  None if shards is None else _shard_book(shards))

    def _plan_shards(self, intent: NodeLBIntent, book: _Book, was: _ShardBook, shards: Shards) -> LBPlan:
        """:meth:`plan` walking only the shards whose frontends are not the tuple planned last."""
        changed = [name for name in sorted(shards.keys() | was.frontends.keys())
                   if shards.get(name) is not was.frontends.get(name)]
        fresh: dict[FrontendId, FrontendIntent] = {}
        removed: list[FrontendPart] = []
        added: list[FrontendIntent] = []
        refreshed: dict[FrontendId, FrontendIntent] = {}
        members = dict(was.members)
        home = dict(was.home)
        for name in changed:
            for key in members.pop(name, ()):
                del home[key]
        for name in changed:
            fes = shards.get(name, ())
            keys = tuple(frontend_key(fe) for fe in fes)
            for key, fe in zip(keys, fes, strict=True):
                if key in fresh or key in home:
                    return self._plan_from_scratch(intent, shards)  # named twice (in an unchanged shard too)
                fresh[key] = fe
                _compare(book, key, fe, removed, added, refreshed)
            if fes:
                members[name] = keys
                home.update(dict.fromkeys(keys, name))
        if len(home) != len(intent.frontends):
            return self._plan_from_scratch(intent, shards)  # these shards are not the intent's
        for name in changed:
            removed += [book.parts[key] for key in was.members.get(name, ()) if key not in fresh]
        added.sort(key=frontend_key)  # the intent's order: the union of the shards is sorted by it
        return self._plan_changes(intent, book, removed, added, refreshed,
                                  _ShardBook({n: fes for n, fes in shards.items() if fes}, members, home))

    def _sizes(self) -> dict[str, int]:
        return {"services_size": self.services_size, "backends_size": self.backends_size,
                "source_ranges_size": self.source_ranges_size}

    def commit(self, step: LBPlan) -> None:
        """The maps now hold ``step.desired`` (its writes are done)."""
        assert self._pending is not None and self._pending[0] is step, "commit the plan made last"
        self.state, self._book, self._pending = step.desired, self._pending[1], None

    def _plan_from_scratch(self, intent: NodeLBIntent, shards: Shards | None) -> LBPlan:
        self.full_plans += 1
        desired, parts = lb_planning.desired_parts(intent, self.state)
        step = lb_planning.plan_towards(desired, self.state, **self._sizes())
        self._pending = (step, _book(intent.node, parts, shards))
        return step

    def _plan_changes(self, intent: NodeLBIntent, book: _Book, removed: list[FrontendPart],
                      added: list[FrontendIntent], refreshed: dict[FrontendId, FrontendIntent],
                      shard_book: _ShardBook | None) -> LBPlan:
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
        next_id = max(book.top, max(old.backends, default=0)) + 1
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
        top = book.top
        if any(part.ident == top for part in removed):
            top = max(map(_IDENT, parts.values()), default=0)
        else:
            top = max([top, *(parts[frontend_key(fe)].ident for fe in added)])
        self._pending = (step, _Book(intent.node, parts, refs, live, top, shard_book))
        return step
