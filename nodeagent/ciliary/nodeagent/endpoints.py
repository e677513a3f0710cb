"""The endpoint registry: the pods plumbed on this node, in memory and on disk.

Owns the ``Endpoint`` wire model the CNI plugin POSTs, the in-memory map keyed by
container ID, its persistence (``<state-dir>/endpoints.json``, written atomically via
a temporary file and ``rename``) and the subscriber list through which the datapath
learns about endpoints coming and going.

Listeners are ``async def listener(event: EndpointEvent) -> None``. An exception from
a listener on *add* rolls the endpoint back and surfaces as
:class:`EndpointHookError` (the CNI ADD then fails: no pod without enforcement);
exceptions on *remove* are logged, because a removal cannot be refused.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import enum
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pydantic
from pydantic.alias_generators import to_camel

log = logging.getLogger(__name__)

STATE_FILE = "endpoints.json"
STATE_VERSION = 1


class Endpoint(pydantic.BaseModel):
    """One pod interface plumbed by the CNI plugin (``POST /v1/endpoints`` body)."""

    model_config = pydantic.ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )

    container_id: str = pydantic.Field(min_length=1, max_length=256, pattern=r"^[^/\s]+$",
                                       description="The sandbox (infra) container ID; the registry key.")
    pod_namespace: str = pydantic.Field(default="", description="K8S_POD_NAMESPACE, empty outside Kubernetes.")
    pod_name: str = pydantic.Field(default="", description="K8S_POD_NAME.")
    pod_uid: str = pydantic.Field(default="", description="K8S_POD_UID.")
    netns: str = pydantic.Field(min_length=1, description="Path of the pod's network namespace.")
    ifname: str = pydantic.Field(min_length=1, max_length=15, description="Interface name inside the pod.")
    host_ifname: str = pydantic.Field(min_length=1, max_length=15, description="Node-side veth name.")
    host_ifindex: int = pydantic.Field(gt=0, description="Node-side veth ifindex (attach point for tc).")
    mac: str = pydantic.Field(pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", description="Pod interface MAC.")
    ipv4: IPv4Address = pydantic.Field(description="The pod's address (a /32).")
    netns_cookie: int = pydantic.Field(default=0, ge=0, lt=2**64,
                                       description="The pod's network namespace cookie (SO_NETNS_COOKIE); 0: unknown.")

    def wire(self) -> dict[str, object]:
        return self.model_dump(mode="json", by_alias=True)


def pod_netns_path(netns: str, directory: Path | None) -> str:
    """Where this agent opens a pod's network namespace: its CNI path, or (``directory``: the runtime's
    namespace directory as mounted into the agent's container) the file of that name there; a process's
    namespace (``/proc/PID/ns/net``, as some runtimes give) has no file of its own there: its path as given.
    Pure."""
    if directory is None or netns.startswith("/proc/"):
        return netns
    return str(directory / os.path.basename(netns))


class EventKind(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class EndpointEvent:
    kind: EventKind
    endpoint: Endpoint


EndpointListener = Callable[[EndpointEvent], Awaitable[None]]


class EndpointHookError(Exception):
    """A subscriber refused (failed on) a new endpoint; the add was rolled back."""


class EndpointRegistry:
    """Endpoints by container ID; every change is persisted before listeners hear of it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_path = state_dir / STATE_FILE
        self._endpoints: dict[str, Endpoint] = {}
        self._listeners: list[EndpointListener] = []
        self._lock = asyncio.Lock()

    # -- reading -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._endpoints)

    def get(self, container_id: str) -> Endpoint | None:
        return self._endpoints.get(container_id)

    def list(self) -> list[Endpoint]:
        return sorted(self._endpoints.values(), key=lambda e: e.container_id)

    # -- subscribing -------------------------------------------------------------------

    def subscribe(self, listener: EndpointListener) -> None:
        """Call ``listener`` after every add/remove (in subscription order)."""
        self._listeners.append(listener)

    # -- changing ------------------------------------------------------------------------

    async def upsert(self, endpoint: Endpoint) -> bool:
        """Add or replace; False (and no event) when an identical endpoint is already known."""
        async with self._lock:
            previous = self._endpoints.get(endpoint.container_id)
            if previous == endpoint:
                return False
            self._endpoints[endpoint.container_id] = endpoint
            self._save()
            try:
                await self._notify(EndpointEvent(EventKind.ADDED, endpoint), strict=True)
            except EndpointHookError:
                if previous is None:
                    del self._endpoints[endpoint.container_id]
                else:
                    self._endpoints[endpoint.container_id] = previous
                self._save()
                raise
            log.info("Endpoint added", extra={"container": endpoint.container_id, "ip": str(endpoint.ipv4),
                                              "pod": f"{endpoint.pod_namespace}/{endpoint.pod_name}"})
            return True

    async def remove(self, container_id: str) -> Endpoint | None:
        """Forget an endpoint; removing an unknown one is a no-op returning None."""
        async with self._lock:
            endpoint = self._endpoints.pop(container_id, None)
            if endpoint is None:
                return None
            self._save()
            await self._notify(EndpointEvent(EventKind.REMOVED, endpoint), strict=False)
            log.info("Endpoint removed", extra={"container": container_id, "ip": str(endpoint.ipv4)})
            return endpoint

    async def forget_missing(self, present: Callable[[Endpoint], bool]) -> builtins.list[Endpoint]:
        """Remove the endpoints whose host veth is gone (``present`` False): a pod deleted while the agent
        was down leaves its record behind, and attaching to a device that no longer exists would fail every
        later apply. No packet can cross a device that does not exist, so forgetting it widens nothing."""
        gone = [e for e in self.list() if not present(e)]
        for endpoint in gone:
            log.warning("Endpoint's host veth is gone; forgetting it", extra={
                "container": endpoint.container_id, "veth": endpoint.host_ifname, "ip": str(endpoint.ipv4)})
            await self.remove(endpoint.container_id)
        return gone

    def learn_cookies(self, read: Callable[[Endpoint], int]) -> builtins.list[Endpoint]:
        """Fill in the network-namespace cookie of endpoints registered without one (by a CNI plugin older than
        the cookie), ``read`` giving it (an OSError: left unknown, logged); persisted, no event. Called before the
        datapath's first apply, which reads the registry: a pod without its cookie is not told from a foreign
        namespace by the socket load balancer (refused by load balancer IPs with source ranges, its flows not
        named after the Service). Not under the registry's lock: for the agent's start, before the endpoint API
        serves (each unreadable namespace may take ``netns_sockets``' 10 s thread timeout)."""
        learnt = []
        for endpoint in self.list():
            if endpoint.netns_cookie:
                continue
            try:
                cookie = read(endpoint)
            except OSError as exc:
                log.warning("Endpoint's network namespace cookie unknown", extra={
                    "container": endpoint.container_id, "netns": endpoint.netns, "error": str(exc)})
                continue
            if cookie:
                learnt.append(endpoint.model_copy(update={"netns_cookie": cookie}))
        for endpoint in learnt:
            self._endpoints[endpoint.container_id] = endpoint
            log.info("Endpoint's network namespace cookie learnt", extra={
                "container": endpoint.container_id, "netns_cookie": endpoint.netns_cookie})
        if learnt:
            self._save()
        return learnt

    async def _notify(self, event: EndpointEvent, *, strict: bool) -> None:
        for listener in list(self._listeners):
            try:
                await listener(event)
            except Exception as exc:  # subscriber code is foreign; isolate it
                if strict:
                    raise EndpointHookError(f"{getattr(listener, '__qualname__', listener)}: {exc}") from exc
                log.exception("Endpoint listener failed", extra={"event": event.kind.value,
                                                                  "container": event.endpoint.container_id})

    # -- persistence ---------------------------------------------------------------------

    def load(self) -> None:
        """Read the persisted registry; an unreadable file is set aside and the registry starts empty."""
        try:
            raw = self.state_path.read_text()
        except FileNotFoundError:
            return
        try:
            document = json.loads(raw)
            items = document["endpoints"] if isinstance(document, dict) else None
            if not isinstance(items, list):
                raise ValueError("no 'endpoints' list")
            loaded = [Endpoint.model_validate(item) for item in items]
        except (ValueError, KeyError, pydantic.ValidationError) as exc:
            aside = self.state_path.with_suffix(".corrupt")
            os.replace(self.state_path, aside)
            log.error("Endpoint state unreadable; starting empty", extra={"path": str(self.state_path),
                                                                           "moved_to": str(aside), "error": str(exc)})
            return
        self._endpoints = {e.container_id: e for e in loaded}
        log.info("Endpoint state loaded", extra={"path": str(self.state_path), "endpoints": len(loaded)})

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        document = {"version": STATE_VERSION, "endpoints": [e.wire() for e in self.list()]}
        tmp = self.state_path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as handle:
                json.dump(document, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.state_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
