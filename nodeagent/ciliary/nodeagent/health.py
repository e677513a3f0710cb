"""Liveness and readiness over TCP (aiohttp).

- ``GET /healthz`` → 200 ``{"node", "status": "ok", "etcd": "connected"|"disconnected", "endpoints": N,
  "problems": []}``; 503 with ``"status": "failing"`` and the ``problems`` when the datapath is
  broken (it did not start, a pin is gone, a program is detached from a veth) or the intent watch
  has been broken for more than ``WATCH_GRACE_S``;
- ``GET /readyz`` → 200 ``{"node", "ready": true, "problems": []}`` only while the node is
  registered in etcd, the datapath is loaded and healthy, the intent watch works and has read the
  intent, the newest intent is applied without error (or there is none) and, with ``--lb-cgroup``,
  the socket load balancer is attached (a pod started before it would reach no Service); else 503 with
  ``"ready": false`` and the ``problems``. An agent with ``--datapath off`` is never ready;
- extra routes registered by the caller (the flow API of ``flowapi``).

:func:`liveness_problems` and :func:`readiness_problems` are pure (an
:class:`EnforcementView` in, reasons out); the agent builds the view.
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


WATCH_GRACE_S = 10.0
"""A broken intent watch fails /healthz after this long (a reconnect blip does not)."""


@dataclass(frozen=True)
class EnforcementView:
    """What health needs to know of enforcement, at one moment."""

    datapath: bool
    """The datapath is enabled (``--datapath on``)."""
    started: bool = False
    start_error: str = ""
    datapath_problems: tuple[str, ...] = ()
    watch_synced: bool = False
    watch_broken_for: float | None = None
    """Seconds since the intent watch broke; None while it works."""
    wanted_revision: int | None = None
    applied_revision: int | None = None
    apply_error: str = ""
    lb_not_started: str = ""
    """Why the socket load balancer (``--lb-cgroup``) is not attached yet; empty: attached or not configured."""


def liveness_problems(view: EnforcementView, *, grace: float = WATCH_GRACE_S) -> list[str]:
    """Why the agent is broken (a restart is the remedy); empty: alive."""
    if not view.datapath:
        return []
    problems = []
    if not view.started and view.start_error:
        problems.append(f"datapath did not start: {view.start_error}")
    problems += [f"datapath: {p}" for p in view.datapath_problems]
    if view.watch_broken_for is not None and view.watch_broken_for > grace:
        problems.append(f"intent watch broken for {view.watch_broken_for:.0f} s")
    return problems


def readiness_problems(view: EnforcementView) -> list[str]:
    """Why the agent does not (yet) enforce its newest intent; empty: ready."""
    if not view.datapath:
        return ["datapath off: this agent enforces nothing"]
    problems = []
    if not view.started:
        problems.append("datapath not loaded" + (f": {view.start_error}" if view.start_error else ""))
    problems += [f"datapath: {p}" for p in view.datapath_problems]
    if view.watch_broken_for is not None:
        problems.append("intent watch broken")
    elif not view.watch_synced:
        problems.append("intent not read yet")
    if view.wanted_revision is not None and view.applied_revision != view.wanted_revision:
        problems.append(f"intent revision {view.wanted_revision} not applied (applied: {view.applied_revision})")
    if view.apply_error:
        problems.append(f"newest intent not applied: {view.apply_error}")
    if view.lb_not_started:
        problems.append(f"socket load balancer: {view.lb_not_started}")
    return problems


@dataclass(frozen=True)
class HealthSources:
    node: str
    registration: RegistrationState
    endpoints: EndpointCount
    enforcement: Callable[[], EnforcementView] = lambda: EnforcementView(datapath=True, started=True,
                                                                          watch_synced=True)
    """The agent's enforcement state (the default, for tests of the other parts, is healthy and applied)."""


SOURCES_KEY = web.AppKey("sources", HealthSources)


async def healthz(request: web.Request) -> web.Response:
    sources = request.app[SOURCES_KEY]
    problems = liveness_problems(sources.enforcement())
    return web.json_response({
        "node": sources.node,
        "status": "failing" if problems else "ok",
        "etcd": "connected" if sources.registration.etcd_connected else "disconnected",
        "endpoints": len(sources.endpoints),
        "problems": problems,
    }, status=503 if problems else 200)


async def readyz(request: web.Request) -> web.Response:
    sources = request.app[SOURCES_KEY]
    problems = [] if sources.registration.registered else ["not registered in etcd"]
    problems += readiness_problems(sources.enforcement())
    ready = not problems
    return web.json_response({"node": sources.node, "ready": ready, "problems": problems},
                             status=200 if ready else 503)


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
