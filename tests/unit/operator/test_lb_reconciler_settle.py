"""LBReconciler.settle: a lone change waits only the short settle; a burst is let in for as long as the
last pass took, capped; the model's events are taken in meanwhile (the loop is free)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from ciliary.operator.lb_reconciling import LBReconciler


def reconciler(last_pass_s: float, settle_max: float = 5.0) -> Any:
    model = SimpleNamespace(dirty=asyncio.Event())
    rec = LBReconciler(model, dict, None, None, None, settle_seconds=0.1, settle_max=settle_max)  # type: ignore[arg-type]
    rec.stats.last_duration_ms = last_pass_s * 1000
    return rec


async def timed_settle(rec: Any, burst_s: float) -> tuple[float, int]:
    """settle() (short settle 0.1 s) while a change arrives every 5 ms for ``burst_s``: (seconds settle took, changes taken in)."""
    taken = 0

    async def burst() -> None:
        nonlocal taken
        end = time.monotonic() + burst_s
        while time.monotonic() < end:
            rec.model.dirty.set()
            taken += 1
            await asyncio.sleep(0.005)

    feeder = asyncio.create_task(burst())
    t0 = time.monotonic()
    await rec.settle()
    took = time.monotonic() - t0
    feeder.cancel()
    return took, taken


def test_a_lone_change_waits_only_the_short_settle_even_after_a_long_pass() -> None:
    took, _ = asyncio.run(timed_settle(reconciler(last_pass_s=2.0), burst_s=0))
    assert took < 0.6, took


def test_a_burst_is_let_in_for_as_long_as_the_last_pass_took() -> None:
    async def run() -> tuple[float, int]:
        return await timed_settle(reconciler(last_pass_s=1.0), burst_s=10)

    took, taken = asyncio.run(run())
    assert 0.95 <= took < 2.5, took
    assert taken >= 50, taken  # the loop was free: the burst's changes came in meanwhile


def test_the_wait_is_capped_and_a_burst_that_ends_ends_it() -> None:
    took, _ = asyncio.run(timed_settle(reconciler(last_pass_s=100.0, settle_max=0.6), burst_s=10))
    assert 0.55 <= took < 2.0, took
    took, _ = asyncio.run(timed_settle(reconciler(last_pass_s=100.0), burst_s=0.5))
    assert 0.5 <= took < 2.0, took  # returns once 0.1 s passed without a change after the burst
