"""LBReconciler.settle: a lone change waits only the short settle; a burst is let in for as long as the
last pass took, capped; the event loop stays free meanwhile. The burst is a flag set again at once after
every clear, so the lower bounds hold however slowly the machine runs."""

from __future__ import annotations

import asyncio
import time

from ciliary.operator.lb_reconciling import LBReconciler


class Burst:
    """The model's ``dirty`` flag while changes arrive all the time for ``seconds``, then none."""

    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds
        self.quiet = asyncio.Event()  # never set

    def clear(self) -> None:
        pass

    async def wait(self) -> bool:
        if time.monotonic() < self.until:
            await asyncio.sleep(0)  # a change came in
            return True
        await self.quiet.wait()
        return True


class Model:
    def __init__(self, burst_s: float) -> None:
        self.dirty = Burst(burst_s)


async def timed_settle(last_pass_s: float, burst_s: float, settle_max: float = 5.0) -> tuple[float, int]:
    """settle() (short settle 0.1 s) after a pass of ``last_pass_s``: (seconds it took, turns another task
    had meanwhile)."""
    rec = LBReconciler(Model(burst_s), dict, None, None, None,  # type: ignore[arg-type]
                       settle_seconds=0.1, settle_max=settle_max)
    rec.stats.last_duration_ms = last_pass_s * 1000
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    t0 = time.monotonic()
    await rec.settle()
    took = time.monotonic() - t0
    task.cancel()
    return took, turns


def test_a_lone_change_waits_only_the_short_settle_even_after_a_long_pass() -> None:
    took, _ = asyncio.run(timed_settle(last_pass_s=5.0, burst_s=0))
    assert 0.09 <= took < 2.0, took  # asyncio may fire a timer up to its clock resolution early


def test_a_burst_is_let_in_for_as_long_as_the_last_pass_took_and_the_loop_stays_free() -> None:
    took, turns = asyncio.run(timed_settle(last_pass_s=1.0, burst_s=60))
    assert 1.0 <= took < 4.0, took
    assert turns >= 10, turns


def test_the_wait_is_capped_and_a_burst_that_ends_ends_it() -> None:
    took, _ = asyncio.run(timed_settle(last_pass_s=100.0, burst_s=60, settle_max=0.6))
    assert 0.6 <= took < 4.0, took
    took, _ = asyncio.run(timed_settle(last_pass_s=100.0, burst_s=0.5))
    assert 0.55 <= took < 4.0, took  # the burst's 0.5 s, then 0.1 s without a change


def test_at_most_one_pass_per_settle_burst_and_a_change_after_a_quiet_spell_goes_at_once() -> None:
    """A change 0.2 s after a pass waits until 0.8 s after it (everything that came meanwhile goes in that
    next pass); a change after a quiet spell longer than that waits only the short settle."""
    async def one(since_pass: float) -> float:
        rec = LBReconciler(Model(0), dict, None, None, None,  # type: ignore[arg-type]
                           settle_seconds=0.1, settle_burst=0.8)
        rec.last_pass_end = time.monotonic() - since_pass
        t0 = time.monotonic()
        await rec.settle()
        return time.monotonic() - t0

    soon = asyncio.run(one(0.2))
    assert 0.55 <= soon < 3.0, soon  # 0.8 - 0.2, minus asyncio's timer resolution
    later = asyncio.run(one(5.0))
    assert later < 0.5, later
