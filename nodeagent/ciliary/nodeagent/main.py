"""``ciliary-agent``: the node agent process.

Start-up order: settings → logging → endpoint registry (loaded from the state dir) →
endpoint API on the unix socket → health on TCP → etcd registration loop. SIGTERM or
SIGINT stops it: the lease is revoked (the node record disappears), the servers close
and the socket file is removed. The datapath subscribes to the registry through
:meth:`Agent.registry` (``registry.subscribe(listener)``) before :meth:`Agent.serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from ciliary.nodeagent import endpoint_api, endpoints, health, logs, registration, settings

log = logging.getLogger("ciliary.nodeagent.main")  # not __name__: "__main__" under python -m


class Agent:
    """The wired-together agent; ``serve`` runs until ``stop`` is set."""

    def __init__(self, config: settings.AgentSettings) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self.registry = endpoints.EndpointRegistry(config.state_dir)
        self.registration = registration.NodeRegistration(settings=config, endpoint_count=lambda: len(self.registry))
        self.registry.subscribe(self._on_endpoint_change)

    async def _on_endpoint_change(self, event: endpoints.EndpointEvent) -> None:
        self.registration.request_update()

    async def serve(self) -> None:
        self.registry.load()
        runners: list[web.AppRunner] = []
        reg_task: asyncio.Task[None] | None = None
        try:
            runners.append(await endpoint_api.start(self.registry, self.config.socket_path))
            runners.append(await health.start(
                health.HealthSources(self.config.node_name, self.registration, self.registry),
                self.config.health_host, self.config.health_port,
            ))
            reg_task = asyncio.create_task(self.registration.run(self.stop), name="registration")
            log.info("Agent started", extra={"node": self.config.node_name, "pid": os.getpid()})
            stop_task = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait([stop_task, reg_task], return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            if reg_task.done() and not self.stop.is_set():
                reg_task.result()  # re-raise an unexpected crash of the loop
        finally:
            log.info("Agent stopping", extra={"node": self.config.node_name})
            self.stop.set()
            if reg_task is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reg_task), 5)
                reg_task.cancel()
                await asyncio.gather(reg_task, return_exceptions=True)
            await self.registration.close()
            for runner in reversed(runners):
                await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                endpoint_api.remove_stale_socket(self.config.socket_path)
            log.info("Agent stopped", extra={"node": self.config.node_name})


async def run_agent(config: settings.AgentSettings) -> None:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stop.set)
    await agent.serve()


def main(argv: Sequence[str] | None = None) -> None:
    config = settings.load_settings(argv, os.environ)
    logs.configure_logging(config.log_level)
    log.info("Settings", extra={
        "node": config.node_name, "etcd": ",".join(map(str, config.etcd_endpoints)),
        "socket": str(config.socket_path), "state_dir": str(config.state_dir),
        "health": config.health_addr, "lease_ttl": config.lease_ttl,
    })
    try:
        asyncio.run(run_agent(config))
    except OSError as exc:
        log.error("Agent failed", extra={"error": str(exc)})
        sys.exit(1)


if __name__ == "__main__":
    main()
