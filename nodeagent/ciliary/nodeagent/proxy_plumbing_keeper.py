"""Keeps the L7 proxy's node plumbing in place while the agent runs (the async shell of ``proxy_plumbing``).

Owns :class:`PlumbingKeeper`: every ``CHECK_EVERY_S`` it runs ``proxy_plumbing.check`` in a
worker thread (pyroute2's sync API runs its own event loop); when something is missing,
wrong or stale (a flushed mangle table, a deleted device, a rule of an earlier port) it logs
what, runs ``proxy_plumbing.ensure`` with the device the programs were rendered with, and
checks again. :attr:`PlumbingKeeper.problems` is what is still wrong: every policy with
HTTP rules is reported not enforcing on this node while it is not empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess

from ciliary.nodeagent import proxy_plumbing

log = logging.getLogger(__name__)

CHECK_EVERY_S = 10.0


class PlumbingKeeper:
    """Re-checks and repairs the plumbing of ``port`` for the rendered ``device`` (None: none could be set up)."""

    def __init__(self, netns: str, port: int, device: proxy_plumbing.ProxyDevice | None, *,
                 every: float = CHECK_EVERY_S) -> None:
        self.netns = netns
        self.port = port
        self.device = device
        self.every = every
        self.problems: list[str] = ["proxy plumbing not checked yet"] if device is not None else [
            "no proxy device: it could not be set up when the agent started"]
        self.repairs = 0

    def check_once(self) -> list[str]:
        """Check, repair if needed, check again (blocking); the problems left."""
        if self.device is None:
            return self.problems
        try:
            problems = proxy_plumbing.check(self.netns, self.port, self.device)
            if problems:
                log.warning("Proxy plumbing broken; repairing", extra={"netns": self.netns, "problems": problems})
                proxy_plumbing.ensure(self.netns, self.port, self.device)
                self.repairs += 1
                problems = proxy_plumbing.check(self.netns, self.port, self.device)
        except (proxy_plumbing.PlumbingFailed, OSError, subprocess.SubprocessError) as exc:
            problems = [str(exc)]
        if problems:
            log.error("Proxy plumbing still broken", extra={"netns": self.netns, "problems": problems})
        return problems

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            self.problems = await loop.run_in_executor(None, self.check_once)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)
