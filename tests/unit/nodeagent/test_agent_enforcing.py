"""The Enforcer against a fake datapath: nothing before the first intent, serialised applies, failures kept."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

from ciliary.nodeagent import endpoints, enforcing
from ciliary.nodeagent.datapath import errors
from ciliary.operator import intents


class FakeDatapath:
    def __init__(self) -> None:
        self.applied: list[tuple[int, tuple[str, ...]]] = []
        self.fail: Exception | None = None
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        self.closed = False
        self.program_hashes = {"from_pod": "aa", "to_pod": "bb"}
        self.kernel: dict[str, int] = {}
        self.problems: list[str] = []

    def start(self) -> None:
        pass

    def apply(self, intent, veths):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            threading.Event().wait(0.01)
            if self.fail is not None:
                raise self.fail
            self.applied.append((intent.revision, tuple(sorted(str(ip) for ip in veths))))
            self.kernel = {str(ip): intent.revision for ip in veths}
            return SimpleNamespace(unplaced=(), program_hashes=self.program_hashes, compiled=(), map_writes=1)
        finally:
            with self.lock:
                self.active -= 1

    def close(self) -> None:
        self.closed = True

    def flows(self):
        raise NotImplementedError

    def rules_for(self, cookie):
        return ()

    def endpoint_revisions(self):
        return dict(self.kernel)

    def check(self):
        return list(self.problems)


def endpoint(n: int) -> endpoints.Endpoint:
    return endpoints.Endpoint(container_id=f"c{n}", netns="/run/netns/x", ifname="eth0", host_ifname=f"cy{n}",
                              host_ifindex=10 + n, mac="02:00:00:00:00:01", ipv4=f"10.0.0.{n}")


async def test_applies_only_after_an_intent_serialised_and_keeps_last_good(tmp_path: Path) -> None:
    registry = endpoints.EndpointRegistry(tmp_path)
    dp = FakeDatapath()
    enforcer = enforcing.Enforcer(node="n1", datapath=dp, registry=registry, retry=(0.01, 0.05))
    registry.subscribe(enforcer.on_endpoint_event)
    stop = asyncio.Event()
    task = asyncio.create_task(enforcer.run(stop))
    await asyncio.wait_for(enforcer.started.wait(), 5)
    await registry.upsert(endpoint(1))  # no intent yet: nothing applied (pins of a previous agent untouched)
    await asyncio.sleep(0.05)
    assert dp.applied == []

    for revision in range(1, 6):  # a burst of intents coalesces; applies never overlap
        request = enforcer.set_intent(intents.NodeIntent(node="n1", revision=revision))
    assert await enforcer.wait_applied(request, 5)
    assert dp.applied[-1] == (5, ("10.0.0.1",)) and dp.max_active == 1
    await registry.upsert(endpoint(2))  # the endpoint event waits for its apply
    assert dp.applied[-1] == (5, ("10.0.0.1", "10.0.0.2"))
    assert enforcer.outcome.applied is not None and enforcer.outcome.applied.revision == 5

    dp.fail = errors.MapFull("cy_policy", 70000, 65536)
    request = enforcer.set_intent(intents.NodeIntent(node="n1", revision=6))
    assert await enforcer.wait_applied(request, 5)
    assert enforcer.outcome.applied.revision == 5 and enforcer.outcome.wanted.revision == 6
    assert enforcer.outcome.error_kind == "MapFull" and "cy_policy" in enforcer.outcome.error
    dp.fail = None
    for _ in range(100):  # bounded retry applies it once the failure is gone
        if enforcer.outcome.applied.revision == 6:
            break
        await asyncio.sleep(0.05)
    assert enforcer.outcome.applied.revision == 6 and enforcer.outcome.error == ""

    enforcer.set_invalid("unknown schema version 2")
    assert enforcer.outcome.error_kind == "InvalidIntent" and enforcer.outcome.applied.revision == 6
    stop.set()
    await asyncio.wait_for(task, 5)
    await enforcer.close()
    assert dp.closed


async def test_the_kernel_endpoint_map_is_read_back_after_apply_and_while_idle(tmp_path: Path) -> None:
    registry = endpoints.EndpointRegistry(tmp_path)
    dp = FakeDatapath()
    enforcer = enforcing.Enforcer(node="n1", datapath=dp, registry=registry, retry=(0.01, 0.05), verify_every=0.05)
    registry.subscribe(enforcer.on_endpoint_event)
    stop = asyncio.Event()
    task = asyncio.create_task(enforcer.run(stop))
    await asyncio.wait_for(enforcer.started.wait(), 5)
    await registry.upsert(endpoint(1))
    assert await enforcer.wait_applied(enforcer.set_intent(intents.NodeIntent(node="n1", revision=3)), 5)
    assert enforcer.outcome.kernel_endpoints == {"10.0.0.1": 3}
    assert enforcer.outcome.local_endpoints == frozenset({"10.0.0.1"})
    dp.kernel.clear()  # the entry vanished from the kernel: the next read-back says so
    for _ in range(100):
        if enforcer.outcome.kernel_endpoints == {}:
            break
        await asyncio.sleep(0.02)
    assert enforcer.outcome.kernel_endpoints == {}
    stop.set()
    await asyncio.wait_for(task, 5)
    await enforcer.close()
