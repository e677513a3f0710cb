"""What kube-proxy answers over HTTP, answered by the agent when it replaces kube-proxy.

Three kinds of listener, all opened in the node's network namespace (``netns_sockets``):

* one per ``healthCheckNodePort`` of this node's load-balancing intent (Services with
  ``externalTrafficPolicy: Local``): any path gets ``{"service": {"namespace", "name"},
  "localEndpoints": N, "serviceProxyHealthy": bool}``, status 200 when the node has a ready
  endpoint of the Service and the load balancer is healthy, 503 otherwise, so an external
  load balancer sends traffic only to nodes that can serve it locally;
* kube-proxy's own health port (``--proxy-healthz-addr``, ``0.0.0.0:10256`` by default; ``off``, for
  nodes where kube-proxy still runs and answers both kinds itself, serves neither kind):
  ``/healthz`` and ``/livez`` give ``{"lastUpdated", "currentTime", "nodeEligible"}`` with 200
  while the kernel's LB maps hold the intent the agent was last given, 503 before the first
  apply and while an apply is failing;
* kube-proxy's status port (``--proxy-status-addr``, ``127.0.0.1:10249`` by default, kube-proxy's
  metrics address; ``off`` where kube-proxy runs): ``/proxyMode`` answers the mode that serves the
  node's Services, ``ebpf`` (kube-proxy says ``iptables``, ``ipvs`` or ``nftables``: tools and the
  upstream e2e ask it to learn which proxy they face, and a name of kube-proxy's would be a lie).

The replies are pure (:func:`health_check_reply`, :func:`proxy_health_reply`); the listeners
are a thin aiohttp shell: kube-proxy's two ports opened once at start, the health-check node
ports reconciled from each applied intent.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from ciliary.nodeagent import netns_sockets
from ciliary.operator.services.intent import HealthCheckIntent

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProxyHealth:
    """The load balancer's health as the health ports report it."""

    healthy: bool
    """The socket load balancer is started and its maps hold the latest intent."""
    last_updated: float | None
    """Unix time of the last successful apply (None: never)."""


def health_check_reply(check: HealthCheckIntent, health: ProxyHealth) -> tuple[int, dict[str, Any]]:
    namespace, _, name = check.service.partition("/")
    body = {"service": {"namespace": namespace, "name": name}, "localEndpoints": check.local_endpoints,
            "serviceProxyHealthy": health.healthy}
    return (200 if check.local_endpoints > 0 and health.healthy else 503), body


#: what ``/proxyMode`` answers: Services are served by the agent's eBPF programs, none of kube-proxy's modes
PROXY_MODE = "ebpf"


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def proxy_health_reply(health: ProxyHealth, now: float) -> tuple[int, dict[str, Any]]:
    body = {"lastUpdated": _iso(health.last_updated) if health.last_updated else "",
            "currentTime": _iso(now), "nodeEligible": health.healthy}
    return (200 if health.healthy else 503), body


class _Listener:
    """One aiohttp site on a socket bound in the node's namespace."""

    def __init__(self, app: web.Application, netns: str | None, host: str, port: int) -> None:
        self.app, self.netns, self.host, self.port = app, netns, host, port
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        sock = netns_sockets.listen_tcp(self.netns, self.host, self.port)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class HealthPorts:
    """The health-check node ports of this node, kept equal to the intent, and kube-proxy's health and
    status ports."""

    def __init__(self, node: str, *, netns: str | None, health: Callable[[], ProxyHealth],
                 clock: Callable[[], float], proxy_healthz: tuple[str, int] | None,
                 proxy_status: tuple[str, int] | None = None) -> None:
        self.node, self.netns, self.health, self.clock = node, netns, health, clock
        self.proxy_healthz = proxy_healthz
        self.proxy_status = proxy_status
        self.checks: dict[int, HealthCheckIntent] = {}
        self.listeners: dict[int, _Listener] = {}
        self.errors: dict[int, str] = {}
        self._proxy: _Listener | None = None
        self._status: _Listener | None = None

    async def start(self) -> None:
        if self.proxy_status is not None:
            app = web.Application()
            app.router.add_get("/proxyMode", self._mode_reply)
            self._status = await self._serve(app, self.proxy_status, "kube-proxy status port")
        if self.proxy_healthz is None:
            return
        app = web.Application()
        app.router.add_get("/healthz", self._proxy_reply)
        app.router.add_get("/livez", self._proxy_reply)
        self._proxy = await self._serve(app, self.proxy_healthz, "kube-proxy health port")

    async def _serve(self, app: web.Application, address: tuple[str, int], what: str) -> _Listener | None:
        listener = _Listener(app, self.netns, *address)
        try:
            await listener.start()
        except OSError as exc:
            log.error("kube-proxy port not served", extra={
                "node": self.node, "port": what, "address": f"{address[0]}:{address[1]}", "error": str(exc)})
            return None
        return listener

    async def _mode_reply(self, _request: web.Request) -> web.Response:
        return web.Response(text=PROXY_MODE)

    async def _proxy_reply(self, _request: web.Request) -> web.Response:
        status, body = proxy_health_reply(self.health(), self.clock())
        return web.json_response(body, status=status)

    async def reconcile(self, checks: Iterable[HealthCheckIntent]) -> None:
        """Serve exactly ``checks``: new ports opened, gone ones closed, counts updated in place. Without a
        kube-proxy health address (kube-proxy still runs on the node and answers them) none is served."""
        self.checks = {c.port: c for c in checks} if self.proxy_healthz is not None else {}
        for port in sorted(set(self.listeners) - set(self.checks)):
            await self.listeners.pop(port).stop()
        self.errors = {p: e for p, e in self.errors.items() if p in self.checks}
        for port in sorted(set(self.checks) - set(self.listeners)):
            app = web.Application()
            app.router.add_route("GET", "/{tail:.*}", self._check_reply_for(port))
            listener = _Listener(app, self.netns, "0.0.0.0", port)
            try:
                await listener.start()
            except OSError as exc:
                self.errors[port] = str(exc)
                log.error("Health-check node port not served", extra={
                    "node": self.node, "port": port, "service": self.checks[port].service, "error": str(exc)})
                continue
            self.errors.pop(port, None)
            self.listeners[port] = listener

    def _check_reply_for(self, port: int) -> Callable[[web.Request], Any]:
        async def reply(_request: web.Request) -> web.Response:
            check = self.checks.get(port)
            if check is None:
                return web.json_response({"error": "no Service uses this health-check port"}, status=503)
            status, body = health_check_reply(check, self.health())
            return web.json_response(body, status=status)
        return reply

    def document(self) -> list[dict[str, Any]]:
        """For ``GET /v1/services``: each health-check port, what it answers now, or why it is not served."""
        health = self.health()
        out = []
        for port, check in sorted(self.checks.items()):
            status, _ = health_check_reply(check, health)
            out.append({"service": check.service, "port": port, "local_endpoints": check.local_endpoints,
                        "serving": port in self.listeners, "status": status if port in self.listeners else None,
                        "error": self.errors.get(port, "")})
        return out

    async def close(self) -> None:
        for listener in self.listeners.values():
            await listener.stop()
        self.listeners.clear()
        for own in (self._proxy, self._status):
            if own is not None:
                await own.stop()
        self._proxy = self._status = None
