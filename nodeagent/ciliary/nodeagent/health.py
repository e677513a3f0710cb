"""Liveness and readiness over TCP (aiohttp).

- ``GET /healthz`` → 200 ``{"node", "status": "ok", "etcd": "connected"|"disconnected", "endpoints": N}``
  while the process serves requests;
- ``GET /readyz`` → 200 ``{"node", "ready": true}`` only while the node is registered in
  etcd (its lease is believed alive), else 503 with ``"ready": false``;
- extra routes registered by the caller (the flow API of ``flowapi``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

log = logging.getLogger(__name__)


class RegistrationState(Protocol):
    @property
    def etcd_connected(self) -> bool: ...

    @property
    def registered(self) -> bool: ...


class EndpointCount(Protocol):
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class HealthSources:
    node: str
    registration: RegistrationState
    endpoints: EndpointCount


SOURCES_KEY = web.AppKey("sources", HealthSources)


async def healthz(request: web.Request) -> web.Response:
    sources = request.app[SOURCES_KEY]
    return web.json_response({
        "node": sources.node,
        "status": "ok",
        "etcd": "connected" if sources.registration.etcd_connected else "disconnected",
        "endpoints": len(sources.endpoints),
    })


async def readyz(request: web.Request) -> web.Response:
    sources = request.app[SOURCES_KEY]
    ready = sources.registration.registered
    return web.json_response({"node": sources.node, "ready": ready}, status=200 if ready else 503)


def build_app(sources: HealthSources, routes: Sequence[Callable[[web.Application], None]] = ()) -> web.Application:
    app = web.Application()
    app[SOURCES_KEY] = sources
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for register in routes:
        register(app)
    return app


async def start(sources: HealthSources, host: str, port: int,
                routes: Sequence[Callable[[web.Application], None]] = ()) -> web.AppRunner:
    """Serve health (and the extra ``routes``, e.g. the flow API) on ``host:port``."""
    runner = web.AppRunner(build_app(sources, routes), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("Health endpoint listening", extra={"addr": f"{host}:{port}"})
    return runner
