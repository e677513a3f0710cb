"""The agent's socket load balancing: watch this node's LB intent, keep the kernel's LB maps equal to it.

Runs when the agent has ``--lb-cgroup``. :class:`LoadBalancing` starts the engine
(``datapath.lb_engine.SocketLB``: compile or adopt, attach to the cgroup) in its own worker
thread, follows the node's sharded intent (``/ciliary/lbintents/v2/<node>/``) with an
``lb_watching.LBIntentWatcher`` and applies the latest complete version (never a half-written one; the engine
plans only what changed since its last apply, and every ``RESYNC_INTERVAL_S`` reads its maps back: entries
someone else changed are put right by applying the intent again):
versions that arrive while one is being applied are not applied one by one, only the newest of them
afterwards (at 10,000 Services an apply takes about a second; during a bulk create the operator publishes
a version every few hundred milliseconds, and applying each in turn left the maps minutes behind). A failed start is retried with a bounded back-off; a failed apply (a map full,
a write refused) keeps the previous contents (the engine undoes partial writes) and is reported
in ``GET /v1/services`` and by ``ciliary service list``. :meth:`document` reads the kernel's maps.
The intent's health-check node ports and kube-proxy's health port are served by
``service_health.HealthPorts``; they report the load balancer healthy only while the kernel's
maps hold the latest intent (as the engine wrote it; a read-back that finds them changed makes it
unhealthy until the intent is applied again). With external devices (``--lb-devices``, default auto) the engine's
maps also serve clients outside the node: ``datapath.lb_device.DeviceLB`` attaches tc programs to
those devices once the socket programs are attached, in a worker of its own (a device that cannot
be chosen or attached is retried with a bounded back-off and shown as ``north_south.error``); the
health answers count the load balancer healthy only once they are attached.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ciliary.nodeagent import lb_incremental, lb_planning, lb_watching, service_health, watching
from ciliary.nodeagent.datapath import errors as dp_errors
from ciliary.nodeagent.datapath import lb_device, lb_engine
from ciliary.operator.services.intent import NodeLBIntent

log = logging.getLogger(__name__)

RESYNC_INTERVAL_S = 60.0
"""How often the kernel's LB maps are read back and compared with what the engine wrote (about 0.6 s of the
engine's thread at 10,000 Services); a difference is logged and the intent applied again from what the kernel
holds."""
L4_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
APPLY_ERRORS = (OSError, dp_errors.DatapathError, lb_planning.LBCapacityError, lb_device.DeviceSelectionError)


class LoadBalancing:
    def __init__(self, node: str, *, cgroup: Path, bpffs: Path,
                 client_factory: Callable[[], watching.WatchClient], netns: str | None = None,
                 devices: tuple[str, ...] | None = None, proxy_healthz: tuple[str, int] | None = None,
                 proxy_status: tuple[str, int] | None = None, resync_interval: float = RESYNC_INTERVAL_S) -> None:
        """``devices``: the external devices (None: auto; (): no north-south load balancing)."""
        self.node = node
        self.engine = lb_engine.SocketLB(node, cgroup=cgroup, bpffs=bpffs, netns=netns)
        self.devices = None if devices == () else lb_device.DeviceLB(node, devices=devices, bpffs=bpffs, netns=netns)
        self.devices_error = ""
        self._device_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-lb")
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="socket-lb")
        self.started = asyncio.Event()
        self.wanted: NodeLBIntent | None = None
        self._wanted_shards: lb_incremental.Shards | None = None
        """The shards ``wanted`` is the union of (the watcher's), for the planner."""
        self._wanted_changed = asyncio.Event()
        self._wanted_at = 0.0
        """When the newest intent was handed over (``time.monotonic``)."""
        self.resync_interval = resync_interval
        self._reapply = False
        """The maps drifted from what was written: apply the newest intent again even if it was tried."""
        self.refused = ""
        """Why the newest published intent was refused (until a valid one comes): an apply of an older one that
        finishes meanwhile must not clear it from ``error``."""
        self.applied: NodeLBIntent | None = None
        self._names: tuple[NodeLBIntent, dict[tuple[str, int, int], str]] | None = None
        """The applied intent's Services by frontend, built the first time a flow asks after an apply."""
        self.error = ""
        self.applies = 0
        self.last_applied: float | None = None
        self.ports = service_health.HealthPorts(node, netns=netns, health=self.health, clock=time.time,
                                                proxy_healthz=proxy_healthz, proxy_status=proxy_status)
        self.watcher = lb_watching.LBIntentWatcher(
            node=node, client_factory=client_factory, on_intent=self._on_intent, on_invalid=self._on_invalid,
            on_deleted=self._on_deleted)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def service_of(self, address: str, port: int, protocol: int) -> str:
        """The Service (``namespace/name``) of the frontend (address, port, L4 protocol number) in the intent the
        kernel's maps hold; "" when none. For the flows (``flowapi.IntentIndex.service_of``)."""
        intent = self.applied
        if intent is None:
            return ""
        if self._names is None or self._names[0] is not intent:
            self._names = (intent, {(f.address, f.port, L4_NUMBERS.get(f.protocol, 0)): f.service
                                    for f in intent.frontends})
        return self._names[1].get((address, port, protocol), "")

    def health(self) -> service_health.ProxyHealth:
        healthy = (self.started.is_set() and not self.error and self.applied is not None
                   and self.applied == self.wanted and (self.devices is None or self.devices.started))
        return service_health.ProxyHealth(healthy=healthy, last_updated=self.last_applied)

    async def run(self, stop: asyncio.Event) -> None:
        await self.ports.start()
        delay = 0.5
        while not stop.is_set():
            try:
                await self.call(self.engine.start)
                break
            except APPLY_ERRORS as exc:
                self.error = f"socket load balancer not started: {exc}"
                log.error("Socket load balancer failed to start", extra={"node": self.node, "error": str(exc)})
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    delay = min(delay * 2, 10.0)
        if stop.is_set():
            return
        self.error = ""
        self.started.set()
        applier = asyncio.create_task(self._apply_latest())
        resync = asyncio.create_task(self._resync_periodically(stop))
        devices = asyncio.create_task(self._start_devices(stop)) if self.devices is not None else None
        try:
            await self.watcher.run(stop)
        finally:
            for task in (applier, resync, devices):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _apply_latest(self) -> None:
        """Apply the newest intent whenever it changed: versions that came while an apply ran are coalesced.
        A refused one is not tried again until a newer one comes (the previous maps stay, the error shows)."""
        tried: NodeLBIntent | None = None
        while True:
            intent, shards = self.wanted, self._wanted_shards
            if intent is None or (intent is tried and not self._reapply):
                self._wanted_changed.clear()
                await self._wanted_changed.wait()
                continue
            tried, self._reapply = intent, False
            try:
                await self._apply(intent, shards)
            except Exception as exc:  # never let the applier die silently: say it, wait for the next intent
                self.error = f"load-balancing intent not applied: {type(exc).__name__}: {exc}"
                log.exception("Load-balancing intent not applied", extra={"node": self.node})

    async def _resync_periodically(self, stop: asyncio.Event) -> None:
        """Every ``resync_interval``: the kernel's maps still hold what was written, or the intent goes again."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.resync_interval)
                return
            except TimeoutError:
                pass
            try:
                drifted = await self.call(self.engine.resync)
            except Exception:  # never let the read-back die silently: say it, try again next time
                log.exception("Load-balancing maps not read back", extra={"node": self.node})
                continue
            if drifted:
                log.warning("Load-balancing maps differ from what was written; applying the intent again",
                            extra={"node": self.node})
                self.applied = None  # health and in_sync say so until the maps hold the intent again
                self._wanted_at = time.monotonic()
                self._reapply = True
                self._wanted_changed.set()

    async def _start_devices(self, stop: asyncio.Event) -> None:
        """Attach the north-south programs (own worker: compiling them does not hold up map updates)."""
        assert self.devices is not None
        delay = 0.5
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await loop.run_in_executor(self._device_executor, self.devices.start, self.engine.context)
                self.devices_error = ""
                return
            except APPLY_ERRORS as exc:
                self.devices_error = f"north-south load balancer not started: {exc}"
                log.error("North-south load balancer failed to start", extra={"node": self.node, "error": str(exc)})
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    delay = min(delay * 2, 10.0)

    async def _on_intent(self, intent: NodeLBIntent, mod_revision: int) -> None:
        self._wanted_at = time.monotonic()
        self.wanted, self._wanted_shards = intent, self.watcher.shards_of(intent)
        self.refused = ""
        self._wanted_changed.set()
        await self.ports.reconcile(intent.health_checks)

    async def _apply(self, intent: NodeLBIntent, shards: lb_incremental.Shards | None = None) -> None:
        handed = self._wanted_at
        try:
            result = await self.call(self.engine.apply, intent, shards)
        except APPLY_ERRORS as exc:
            self.error = f"load-balancing intent not applied: {exc}"
            log.error("Load-balancing intent not applied; the previous maps stay",
                      extra={"node": self.node, "error": str(exc)})
            return
        self.applied, self.error = intent, self.refused
        self.applies += 1
        self.last_applied = time.time()
        log.info("Load-balancing intent applied", extra={
            "node": self.node, "frontends": result.frontends, "backends": result.backends,
            "map_writes": result.map_writes, "plan_ms": result.plan_ms, "write_ms": result.write_ms,
            "ms_since_handed_over": round((time.monotonic() - handed) * 1000, 1)})

    async def _on_invalid(self, message: str, mod_revision: int) -> None:
        self.refused = self.error = f"load-balancing intent refused: {message}"

    async def _on_deleted(self, mod_revision: int) -> None:
        if mod_revision:
            log.warning("Load-balancing intent deleted; the maps in force stay", extra={"node": self.node})

    async def document(self) -> dict[str, Any]:
        if not self.started.is_set():
            raise RuntimeError(self.error or "the socket load balancer is not started")
        state = await self.call(self.engine.observe)
        doc = lb_engine.document(self.node, state, self.applied, self.error)
        doc["in_sync"] = self.applied is not None and self.applied == self.wanted
        doc["health_checks"] = self.ports.document()
        doc["north_south"] = None
        if self.devices is not None:
            doc["north_south"] = {"devices": [], "counters": {}, "nat_entries": 0, "error": self.devices_error or
                                  "not attached yet"}
            if self.devices.started:
                doc["north_south"] = {**await asyncio.get_running_loop().run_in_executor(
                    self._device_executor, self.devices.document), "error": ""}
        return doc

    async def close(self) -> None:
        await self.ports.close()
        await self.call(self.engine.close)
        if self.devices is not None:
            await asyncio.get_running_loop().run_in_executor(self._device_executor, self.devices.close)
        self._device_executor.shutdown(wait=True)
        self._executor.shutdown(wait=True)


def add_routes(node: str, lb: LoadBalancing | None) -> Callable[[web.Application], None]:
    """``GET /v1/services``: the frontends and backends the kernel's LB maps hold."""

    async def get_services(_request: web.Request) -> web.Response:
        if lb is None:
            return web.json_response({"node": node, "error": "this agent runs without socket load balancing "
                                                             "(no --lb-cgroup)"}, status=503)
        try:
            return web.json_response(await lb.document())
        except (OSError, RuntimeError) as exc:
            return web.json_response({"node": node, "error": str(exc)}, status=503)

    def register(app: web.Application) -> None:
        app.router.add_get("/v1/services", get_services)

    return register
