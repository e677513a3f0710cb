"""The agent applies the newest load-balancing intent, coalescing versions that arrive while an apply runs."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from ciliary.nodeagent import load_balancing
from ciliary.nodeagent.datapath import errors as dp_errors
from ciliary.operator.services.intent import FrontendIntent, FrontendKind, NodeLBIntent


class SlowEngine:
    """Stands in for ``lb_engine.SocketLB``: each apply takes ``seconds``; intents named in ``refuse`` fail."""

    def __init__(self, seconds: float, refuse: tuple[int, ...] = ()) -> None:
        self.seconds, self.refuse = seconds, refuse
        self.applied: list[int] = []
        self.shards: list[tuple[NodeLBIntent, Any]] = []
        self.lock = threading.Lock()

    def apply(self, intent: NodeLBIntent, shards: Any = None) -> Any:
        self.shards.append((intent, shards))
        time.sleep(self.seconds)
        version = len(intent.frontends)
        if version in self.refuse:
            raise dp_errors.DatapathError(f"refused {version}")
        with self.lock:
            self.applied.append(version)
        return type("Result", (), {"frontends": version, "backends": 0, "map_writes": 1, "plan_ms": 0.0,
                                   "write_ms": 0.0})()


def intent(version: int) -> NodeLBIntent:
    """An intent told apart by its number of frontends."""
    return NodeLBIntent(node="n1", frontends=tuple(
        FrontendIntent(service="ns/s", kind=FrontendKind.CLUSTER_IP, address=f"10.96.0.{i + 1}", port=80,
                       protocol="TCP") for i in range(version)))


def make(engine: SlowEngine) -> load_balancing.LoadBalancing:
    lb = load_balancing.LoadBalancing("n1", cgroup=Path("/nonexistent"), bpffs=Path("/nonexistent"),
                                      client_factory=lambda: None, devices=())  # type: ignore[arg-type,return-value]
    lb.engine = engine  # type: ignore[assignment]
    return lb


def test_versions_that_arrive_during_an_apply_are_coalesced_into_the_newest() -> None:
    async def scenario() -> tuple[list[int], int]:
        engine = SlowEngine(0.5)
        lb = make(engine)
        task = asyncio.create_task(lb._apply_latest())
        try:
            await lb._on_intent(intent(1), 1)
            await asyncio.sleep(0.05)  # the first apply is running
            for version in range(2, 8):
                await lb._on_intent(intent(version), version)
            for _ in range(100):  # bounded: at most 10 s
                if lb.applied is not None and len(lb.applied.frontends) == 7:
                    break
                await asyncio.sleep(0.1)
            return list(engine.applied), lb.applies
        finally:
            task.cancel()
            lb._executor.shutdown(wait=True)

    applied, applies = asyncio.run(scenario())
    assert applied == [1, 7] and applies == 2  # not 1, 2, 3, ..., 7 in turn


def test_a_refused_intent_is_not_retried_until_a_newer_one_comes() -> None:
    async def scenario() -> tuple[list[int], str, str]:
        engine = SlowEngine(0.01, refuse=(2,))
        lb = make(engine)
        task = asyncio.create_task(lb._apply_latest())
        try:
            await lb._on_intent(intent(1), 1)
            await asyncio.sleep(0.3)
            await lb._on_intent(intent(2), 2)
            await asyncio.sleep(0.3)
            refused = lb.error
            await lb._on_intent(intent(3), 3)
            await asyncio.sleep(0.3)
            return list(engine.applied), refused, lb.error
        finally:
            task.cancel()
            lb._executor.shutdown(wait=True)

    applied, refused, error = asyncio.run(scenario())
    assert applied == [1, 3]
    assert "refused 2" in refused and error == ""


def test_a_refusal_of_the_newest_intent_survives_an_older_apply_that_finishes_meanwhile() -> None:
    async def scenario() -> tuple[str, bool]:
        engine = SlowEngine(0.3)
        lb = make(engine)
        lb.started.set()  # health() then depends on the error and on applied == wanted only
        task = asyncio.create_task(lb._apply_latest())
        try:
            await lb._on_intent(intent(1), 1)
            await asyncio.sleep(0.05)  # intent 1 is being applied
            await lb._on_invalid("shard s3: not JSON", 2)  # the next version published is malformed
            for _ in range(100):  # bounded: at most 10 s
                if lb.applied is not None:
                    break
                await asyncio.sleep(0.1)
            return lb.error, lb.health().healthy
        finally:
            task.cancel()
            lb._executor.shutdown(wait=True)

    error, healthy = asyncio.run(scenario())
    assert error == "load-balancing intent refused: shard s3: not JSON" and healthy is False


def test_maps_that_drifted_from_what_was_written_get_the_newest_intent_again() -> None:
    """The periodic read-back says the kernel's maps differ from what the engine wrote: the intent already
    applied is applied again (an unchanged intent is otherwise never re-applied)."""
    class DriftingEngine(SlowEngine):
        drifted = False

        def resync(self) -> bool:
            found, self.drifted = self.drifted, False
            return found

    async def scenario() -> list[int]:
        engine = DriftingEngine(0.01)
        lb = make(engine)
        lb.resync_interval = 0.05
        stop = asyncio.Event()
        tasks = [asyncio.create_task(lb._apply_latest()), asyncio.create_task(lb._resync_periodically(stop))]
        try:
            await lb._on_intent(intent(1), 1)
            await asyncio.sleep(0.3)
            first = list(engine.applied)
            engine.drifted = True
            for _ in range(100):  # bounded: at most 10 s
                if len(engine.applied) > len(first):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)  # no drift any more: no further apply
            return [len(first), *engine.applied]
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            lb._executor.shutdown(wait=True)

    assert asyncio.run(scenario()) == [1, 1, 1]


def test_the_engine_gets_the_shards_the_watcher_handed_over_with_that_very_intent() -> None:
    """The planner walks only the shards whose tuple is new: it must get the shards of the intent it plans,
    and none (compare every frontend) for an intent the watcher did not assemble."""
    assembled, other = intent(2), intent(3)
    shards = {"s01": assembled.frontends}

    async def scenario() -> list[tuple[NodeLBIntent, Any]]:
        engine = SlowEngine(0.0)
        lb = make(engine)
        lb.watcher._handed_shards = (assembled, shards)  # what the watcher records as it hands ``assembled`` over
        task = asyncio.create_task(lb._apply_latest())
        try:
            await lb._on_intent(assembled, 1)
            for _ in range(100):  # bounded: at most 5 s
                if engine.shards:
                    break
                await asyncio.sleep(0.05)
            await lb._on_intent(other, 2)
            for _ in range(100):
                if len(engine.shards) == 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
        return engine.shards

    got = asyncio.run(scenario())
    assert len(got) == 2
    assert got[0][0] is assembled and got[0][1] is shards
    assert got[1][0] is other and got[1][1] is None  # not the intent the watcher handed over with those shards


def test_flows_name_the_service_of_a_frontend_in_the_applied_intent_only() -> None:
    """``service_of`` answers from the intent the maps hold (not a newer one still waiting), by address, port and
    protocol number, and follows the next applied intent."""
    lb = make(SlowEngine(0.0))
    assert lb.service_of("10.96.0.1", 80, 6) == ""
    first = NodeLBIntent(node="n1", frontends=(
        FrontendIntent(service="default/web", kind=FrontendKind.CLUSTER_IP, address="10.96.0.1", port=80,
                       protocol="TCP"),
        FrontendIntent(service="kube-system/kube-dns", kind=FrontendKind.CLUSTER_IP, address="10.96.0.10",
                       port=53, protocol="UDP")))
    lb.applied = first
    lb.wanted = intent(3)
    assert lb.service_of("10.96.0.1", 80, 6) == "default/web"
    assert lb.service_of("10.96.0.10", 53, 17) == "kube-system/kube-dns"
    assert lb.service_of("10.96.0.10", 53, 6) == "" and lb.service_of("10.96.0.2", 80, 6) == ""
    lb.applied = intent(3)
    assert lb.service_of("10.96.0.1", 80, 6) == "ns/s" and lb.service_of("10.96.0.10", 53, 17) == ""
