"""The incremental LB planner (``lb_incremental``): exactly the plan from scratch, planning only what changed."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st
from test_lb_planning import SIZES, applied  # type: ignore[import-not-found]

from ciliary.nodeagent import lb_incremental, lb_planning
from ciliary.nodeagent.lb_planning import LBState
from ciliary.operator.services.intent import BackendIntent, FrontendIntent, FrontendKind, NodeLBIntent

SIZES3 = {**SIZES, "source_ranges_size": 1000}


def assert_same_plan(step: lb_planning.LBPlan, scratch: lb_planning.LBPlan) -> None:
    assert step == scratch
    for ours, theirs in ((step.service_writes, scratch.service_writes),
                         (step.backend_upserts, scratch.backend_upserts),
                         (step.source_range_writes, scratch.source_range_writes)):
        assert list(ours.upserts.items()) == list(theirs.upserts.items())  # the same write order
        assert ours.deletes == theirs.deletes

frontend = st.builds(
    lambda a, port, proto, bes, aff, kind, policy, dsr, ranges: FrontendIntent(
        service="ns/s", kind=kind, address=f"10.96.0.{a}", port=port, protocol=proto, affinity_timeout=aff,
        traffic_policy=policy, dsr=dsr and kind != FrontendKind.CLUSTER_IP,
        source_ranges=ranges if kind == FrontendKind.LOAD_BALANCER else (),
        backends=tuple(BackendIntent(address=f"10.244.0.{b}", port=8080, node=node) for b, node in bes)),
    st.integers(1, 4), st.sampled_from([53, 80]), st.sampled_from(["TCP", "UDP"]),
    # the same backend address on different nodes: one place, several flag variants
    # (repeats too: a frontend may name one backend twice)
    st.lists(st.tuples(st.integers(1, 5), st.sampled_from(["n", "m", ""])), max_size=4),
    st.sampled_from([0, 30]), st.sampled_from(list(FrontendKind)), st.sampled_from(["Cluster", "Local"]),
    st.booleans(), st.sampled_from([(), ("192.0.2.0/24",), ("198.51.100.0/24", "2001:db8::/32")]))


@st.composite
def intents(draw: st.DrawFn) -> list[NodeLBIntent]:
    """A few intents in a row; later ones reuse earlier frontend objects (as the shard assembler hands on an
    unchanged shard's), equal copies of them, and new ones."""
    pool: list[FrontendIntent] = draw(st.lists(frontend, min_size=1, max_size=10))
    out = []
    for _ in range(draw(st.integers(2, 5))):
        chosen = draw(st.lists(st.sampled_from(pool), max_size=6, unique_by=lambda f: f.key))
        copies = draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
        fes = [fe.model_copy() if copy else fe for fe, copy in zip(chosen, copies, strict=True)]
        node = draw(st.sampled_from(["n", "n", "m"]))
        out.append(NodeLBIntent(node=node, frontends=tuple(sorted(fes, key=lambda f: f.key))))
        pool.extend(draw(st.lists(frontend, max_size=2)))
    return out


@settings(max_examples=300, deadline=None)
@given(intents(), st.sampled_from([True, False]))
def test_each_plan_is_the_plan_from_scratch_against_the_same_state(sequence: list[NodeLBIntent],
                                                                   from_empty: bool) -> None:
    start = LBState() if from_empty else lb_planning.plan(sequence[0], LBState(), **SIZES3).desired
    planner = lb_incremental.LBPlanner(start, **SIZES3)
    for intent in sequence:
        before = planner.state
        step = planner.plan(intent)
        scratch = lb_planning.plan(intent, before, **SIZES3)
        assert_same_plan(step, scratch)
        assert applied(before, step) == step.desired
        planner.commit(step)
        assert planner.state is step.desired
    assert planner.full_plans == 1 + sum(1 for a, b in zip(sequence, sequence[1:], strict=False) if a.node != b.node)


def test_an_intent_naming_a_frontend_twice_is_planned_from_scratch() -> None:
    one = FrontendIntent(service="ns/s", kind=FrontendKind.CLUSTER_IP, address="10.96.0.1", port=80, protocol="TCP",
                         backends=(BackendIntent(address="10.244.0.1", port=8080),))
    twice = NodeLBIntent(node="n", frontends=(one, one.model_copy(update={"backends": ()})))
    planner = lb_incremental.LBPlanner(LBState(), **SIZES3)
    for _ in range(2):
        step = planner.plan(twice)
        assert step == lb_planning.plan(twice, planner.state, **SIZES3)
        planner.commit(step)
    assert planner.full_plans == 2


def test_one_change_among_ten_thousand_frontends_plans_only_that_frontend(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def service(i: int, port: int = 80) -> FrontendIntent:
        return FrontendIntent(service=f"ns/s{i}", kind=FrontendKind.CLUSTER_IP,
                              address=f"10.96.{i // 256}.{i % 256}", port=port, protocol="TCP",
                              backends=tuple(BackendIntent(address=f"10.244.{(3 * i + j) // 256 % 256}.{(3 * i + j) % 256}",
                                                           port=8080, node="n") for j in range(3)))

    fes = [service(i) for i in range(10_000)]
    planner = lb_incremental.LBPlanner(LBState(), **{**SIZES3, "services_size": 65536, "backends_size": 65536})
    planner.commit(planner.plan(NodeLBIntent(node="n", frontends=tuple(fes))))
    planned = []
    real = lb_planning.frontend_part
    monkeypatch.setattr(lb_planning, "frontend_part", lambda fe, *a: planned.append(fe) or real(fe, *a))
    changed = list(fes)
    changed[5000] = service(5000, port=81)
    t0 = time.perf_counter()
    step = planner.plan(NodeLBIntent(node="n", frontends=tuple(sorted(changed, key=lambda f: f.key))))
    took = time.perf_counter() - t0
    assert planned == [changed[5000]]
    assert len(step.service_writes.upserts) == 4 and len(step.service_writes.deletes) == 4  # port 80 -> 81
    assert step.backend_upserts.upserts == {} and step.backend_deletes.deletes == ()  # same backends, same ids
    print(f"one change among 10,000 frontends planned in {took * 1000:.1f} ms")


def test_an_equal_new_frontend_object_is_compared_by_value_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A re-read shard hands on equal new objects: the part takes the new one, so the next plan of the same
    intent compares by identity only (by value, 10,000 frontends took an agent 120-170 ms per apply)."""
    fes = tuple(FrontendIntent(service="ns/s", kind=FrontendKind.CLUSTER_IP, address=f"10.96.0.{i}", port=80,
                               protocol="TCP") for i in range(1, 6))
    planner = lb_incremental.LBPlanner(LBState(), **SIZES3)
    planner.commit(planner.plan(NodeLBIntent(node="n", frontends=fes)))
    copies = NodeLBIntent(node="n", frontends=tuple(fe.model_copy() for fe in fes))
    compared = []
    real_eq = FrontendIntent.__eq__
    monkeypatch.setattr(FrontendIntent, "__eq__", lambda a, b: compared.append(a) or real_eq(a, b))
    step = planner.plan(copies)
    assert len(step) == 0 and len(compared) == 5
    planner.commit(step)
    compared.clear()
    assert len(planner.plan(copies)) == 0 and compared == []


@st.composite
def sharded_intents(draw: st.DrawFn) -> list[tuple[NodeLBIntent, dict[str, tuple[FrontendIntent, ...]]]]:
    """Intents as the shard assembler hands them on: the sorted union of a few shards, each shard either the
    very tuple of the intent before (unchanged) or a new one (new frontends, equal copies, a frontend that moved
    from another shard, or one an unchanged shard still holds: named twice)."""
    pool: list[FrontendIntent] = draw(st.lists(frontend, min_size=1, max_size=10))
    shards: dict[str, tuple[FrontendIntent, ...]] = {}
    out = []
    for _ in range(draw(st.integers(2, 6))):
        shards = dict(shards)
        for name in ("s0", "s1", "s2"):
            if shards and draw(st.booleans()):
                continue  # unchanged: the same tuple
            chosen = draw(st.lists(st.sampled_from(pool), max_size=4, unique_by=lambda f: f.key))
            copies = draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
            shards[name] = tuple(sorted((fe.model_copy() if copy else fe for fe, copy in zip(chosen, copies,
                                                                                              strict=True)),
                                        key=lambda f: f.key))
        if draw(st.booleans()):  # empty shards dropped, or kept as ()
            shards = {name: fes for name, fes in shards.items() if fes}
        node = draw(st.sampled_from(["n", "n", "n", "m"]))
        union = tuple(sorted((fe for fes in shards.values() for fe in fes), key=lambda f: f.key))
        out.append((NodeLBIntent(node=node, frontends=union), shards))
        pool.extend(draw(st.lists(frontend, max_size=2)))
    return out


@settings(max_examples=300, deadline=None)
@given(sharded_intents(), st.data())
def test_planning_by_shard_is_the_plan_from_scratch_against_the_same_state(
        sequence: list[tuple[NodeLBIntent, dict[str, tuple[FrontendIntent, ...]]]], data: st.DataObject) -> None:
    """Also: plans handed no shards between ones handed shards, and a new planner (what the engine makes after
    a failed write or a drift) in the middle, starting from what the maps hold."""
    start = LBState() if data.draw(st.booleans()) else lb_planning.plan(sequence[0][0], LBState(), **SIZES3).desired
    planner = lb_incremental.LBPlanner(start, **SIZES3)
    for intent, shards in sequence:
        if data.draw(st.integers(0, 5)) == 0:
            planner = lb_incremental.LBPlanner(planner.state, **SIZES3)
        before = planner.state
        step = planner.plan(intent, shards if data.draw(st.integers(0, 3)) else None)
        scratch = lb_planning.plan(intent, before, **SIZES3)
        assert_same_plan(step, scratch)
        planner.commit(step)


def test_one_change_in_one_shard_walks_only_that_shard(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fes = [FrontendIntent(service=f"ns/s{i}", kind=FrontendKind.CLUSTER_IP, address=f"10.96.{i // 256}.{i % 256}",
                          port=80, protocol="TCP", backends=(BackendIntent(address="10.244.0.1", port=8080),))
           for i in range(10_000)]
    shards = {f"s{n:02d}": tuple(fes[n::64]) for n in range(64)}

    def intent_of(shards: dict[str, tuple[FrontendIntent, ...]]) -> NodeLBIntent:
        return NodeLBIntent(node="n", frontends=tuple(sorted((fe for s in shards.values() for fe in s),
                                                             key=lambda f: f.key)))

    planner = lb_incremental.LBPlanner(LBState(), **{**SIZES3, "services_size": 65536, "backends_size": 65536})
    planner.commit(planner.plan(intent_of(shards), shards))
    changed = dict(shards)
    changed["s07"] = tuple(fe.model_copy(update={"port": 81}) if fe is fes[7] else fe for fe in shards["s07"])
    walked = []
    real_key = lb_incremental.frontend_key
    monkeypatch.setattr(lb_incremental, "frontend_key", lambda fe: walked.append(fe) or real_key(fe))
    intent = intent_of(changed)
    step = planner.plan(intent, changed)
    assert step == lb_planning.plan(intent, planner.state, **{**SIZES3, "services_size": 65536,
                                                               "backends_size": 65536})
    assert len(step.service_writes.upserts) == 2 and len(step.service_writes.deletes) == 2  # port 80 -> 81
    assert len(walked) <= 2 * len(shards["s07"]) + 2  # that shard's ~157 frontends, not 10,000
    assert planner.full_plans == 1


def test_shards_that_do_not_make_up_the_intent_are_not_trusted() -> None:
    fes = tuple(FrontendIntent(service="ns/s", kind=FrontendKind.CLUSTER_IP, address=f"10.96.0.{i}", port=80,
                               protocol="TCP", backends=(BackendIntent(address="10.244.0.1", port=8080),))
                for i in range(1, 5))
    planner = lb_incremental.LBPlanner(LBState(), **SIZES3)
    shards = {"s0": fes[:2], "s1": fes[2:]}
    planner.commit(planner.plan(NodeLBIntent(node="n", frontends=fes), shards))
    grown = NodeLBIntent(node="n", frontends=(*fes, fes[0].model_copy(update={"address": "10.96.0.9"})))
    step = planner.plan(grown, shards)  # stale shards handed with a newer intent
    assert step == lb_planning.plan(grown, planner.state, **SIZES3) and len(step.service_writes.upserts) == 2
    assert planner.full_plans == 2
