"""The operator's load-balancing loop: Services + endpoints + node addresses -> LB intents in etcd.

Waits for the service model's ``dirty`` flag (or, every ``poll`` seconds, a change of the nodes'
addresses, the NodePort frontends), lets a burst settle (:meth:`LBReconciler.settle`), brings
the intents up to date (``services.incremental_resolution``, pure: only Services whose inputs changed
are resolved again, only their shards rebuilt), publishes the shards whose content changed
(``store.lb_publishing``, ``/ciliary/lbintents/v2/<node>/``) and posts a Warning Event per new Service
problem. ``stats`` counts passes and the last pass's writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ciliary.operator.kube.service_model import ServiceModel
from ciliary.operator.operator_metrics import LoopStats
from ciliary.operator.services.errors import ServiceProblem
from ciliary.operator.services.incremental_resolution import IncrementalResolver, LBUpdate
from ciliary.operator.services.resolution import ResolverConfig
from ciliary.operator.store.lb_publishing import LBIntentPublisher

log = logging.getLogger(__name__)


class ProblemSink(Protocol):
    async def post(self, problems: Mapping[str, tuple[ServiceProblem, ...]],
                   bodies: Mapping[str, Mapping[str, object]]) -> int: ...


@dataclass
class LBStats:
    passes: int = 0
    last_written: list[str] = field(default_factory=list)
    last_duration_ms: float = 0.0


class LBReconciler:
    def __init__(self, model: ServiceModel, nodes: Callable[[], Mapping[str, str | None]],
                 publisher: LBIntentPublisher, events: ProblemSink | None, config: ResolverConfig,
                 *, settle_seconds: float = 0.005, settle_burst: float = 1.0, settle_max: float = 5.0,
                 poll: float = 1.0) -> None:
        self.model = model
        self.nodes = nodes
        self.publisher = publisher
        self.events = events
        self.settle_seconds = settle_seconds
        self.settle_burst = settle_burst
        self.last_pass_end = -float("inf")
        """time.monotonic() when the last pass ended (``settle``'s rate limit)."""
        self.settle_max = settle_max
        self.poll = poll
        self.stats = LBStats()
        self.loop_stats = LoopStats()
        """Every pass since start (the Prometheus metrics' source)."""
        self.last: LBUpdate | None = None
        self.resolver = IncrementalResolver(config)
        """Every node's shards, kept between passes: a pass resolves again only what changed."""

    async def run_once(self) -> LBUpdate:
        t0 = time.perf_counter()
        result = self.resolver.update(self.model.services, self.model.slices, self.nodes(),
                                      self.model.take_touched())
        resolved_ms = (time.perf_counter() - t0) * 1000
        written = await self.publisher.publish_shards(result.shards)
        if self.events is not None and result.problems:
            await self.events.post(result.problems, self.model.bodies)
        self.stats.passes += 1
        self.stats.last_written = written
        self.stats.last_duration_ms = (time.perf_counter() - t0) * 1000
        self.loop_stats.record(self.stats.last_duration_ms / 1000, len(written))
        self.last = result
        self.last_pass_end = time.monotonic()
        log.info("lb pass %d: %d services (%d resolved again, %d shards rebuilt), %d LB intents written%s in %.1f ms "
                 "(resolution %.1f ms)", self.stats.passes, len(self.model.services), result.resolved, result.rebuilt,
                 len(written), f" ({','.join(written)})" if written else "", self.stats.last_duration_ms, resolved_ms)
        return result

    async def settle(self) -> None:
        """Let a burst of changes in before the next pass.

        At most one pass per ``settle_burst`` (1 s, as kube-proxy's iptables mode syncs at most once a
        second): a change that comes sooner after the last pass ended waits until then, and everything
        that came meanwhile goes in one pass. With incremental resolution a pass at 10,000 Services takes
        well under a second, and a bulk create, its events about 30 ms apart, was republished after almost
        every event (611 passes, each rewriting the shards they touched and each re-applied by the agents),
        taking CPU from the apiserver the creates came through.

        A change after a quiet second waits for none to come for ``settle_seconds``, or for as long as the
        last pass took (at most ``settle_max``), whichever is first: resolution is synchronous and holds
        the event loop, so while passes take under ``settle_max`` a burst's passes hold it at most about
        half the time. A lone change in a quiet cluster waits only ``settle_seconds`` (5 ms: events that
        arrive together still go into one pass; kube-proxy's first sync after a quiet second runs at once;
        20 ms was a fifth of one Service change's time at 10,000 Services)."""
        rest = self.settle_burst - (time.monotonic() - self.last_pass_end)
        if rest > 0:
            await asyncio.sleep(rest)
            return
        budget = min(max(self.settle_seconds, self.stats.last_duration_ms / 1000), self.settle_max)
        deadline = time.monotonic() + budget
        while (left := deadline - time.monotonic()) > 0:
            self.model.dirty.clear()
            try:
                await asyncio.wait_for(self.model.dirty.wait(), timeout=min(self.settle_seconds, left))
            except TimeoutError:
                return

    async def run(self, ready: asyncio.Event) -> None:
        await ready.wait()
        nodes = dict(self.nodes())
        while True:
            self.model.dirty.clear()
            await self.run_once()
            while True:
                try:
                    await asyncio.wait_for(self.model.dirty.wait(), timeout=self.poll)
                    await self.settle()
                    break
                except TimeoutError:
                    if dict(self.nodes()) != nodes:
                        break
            nodes = dict(self.nodes())
