"""This node's registration in etcd: a lease-bound record at ``/ciliary/nodes/v1/<node>``.

The record is JSON ``{name, pid, healthAddr, observerAddr, startedAt, version, endpoints}`` put with
a lease of ``lease_ttl`` seconds. :meth:`NodeRegistration.run` keeps it alive: one
``lease.refresh()`` (a single keep-alive) every ttl/3, a re-put when the endpoint count
changes, and a fresh lease + re-put when etcd says the lease is gone (for example after
etcd lost its data). :meth:`NodeRegistration.close` revokes the lease on shutdown so
the record disappears at once. Every etcd call is bounded by a timeout and retried a
few times on ``ConnectionFailedError`` (the first RPC after an etcd restart fails once).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd

from ciliary.nodeagent.settings import AgentSettings
from ciliary.operator.store import etcdclient, keyspace
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdTLS

log = logging.getLogger(__name__)

T = TypeVar("T")
CALL_TIMEOUT_S = 5.0
CONNECT_RETRIES = 3
ETCD_ERRORS: tuple[type[BaseException], ...] = (aetcd.ClientError, OSError, TimeoutError)


def agent_version() -> str:
    try:
        return importlib.metadata.version("ciliary")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def make_client(endpoint: EtcdEndpoint, timeout: float, tls: EtcdTLS | None = None) -> aetcd.Client:
    return etcdclient.make_client(endpoint, tls, timeout)


class NodeRegistration:
    """Owns the etcd client, the lease and the node record."""

    def __init__(
        self,
        *,
        settings: AgentSettings,
        endpoint_count: Callable[[], int],
        client_factory: Callable[[EtcdEndpoint, float], aetcd.Client] | None = None,
        call_timeout: float = CALL_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.key = keyspace.node_key(settings.node_name).encode()
        self._endpoint_count = endpoint_count
        self._client_factory = client_factory or (lambda ep, timeout: make_client(ep, timeout, settings.etcd_tls))
        self._call_timeout = call_timeout
        self._started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._endpoint_index = 0
        self._client: aetcd.Client | None = None
        self._lease: aetcd.Lease | None = None
        self._lease_client: aetcd.Client | None = None
        """The client the lease is refreshed (and revoked) through."""
        self._lease_deadline = 0.0
        self._dirty = asyncio.Event()
        self.etcd_connected = False
        self._warned = False

    # -- state read by health ------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """True while the record's lease is believed alive (last grant/keep-alive + its TTL)."""
        return self._lease is not None and time.monotonic() < self._lease_deadline

    @property
    def lease_id(self) -> int | None:
        return self._lease.id if self._lease is not None else None

    @property
    def lease(self) -> aetcd.Lease | None:
        """The lease the node record (and the reports) are bound to; None while unregistered."""
        return self._lease if self.registered else None

    @property
    def client(self) -> aetcd.Client | None:
        """The connected etcd client (shared with the reporter); None while disconnected."""
        return self._client if self.etcd_connected else None

    def request_update(self) -> None:
        """Re-put the record soon (the endpoint count changed)."""
        self._dirty.set()

    def record(self) -> dict[str, Any]:
        return {
            "name": self.settings.node_name,
            "pid": os.getpid(),
            "healthAddr": self.settings.health_addr,
            "observerAddr": self.settings.hubble_addr,
            "startedAt": self._started_at,
            "version": agent_version(),
            "endpoints": self._endpoint_count(),
        }

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Register, then keep the registration alive until ``stop`` is set."""
        interval = max(self.settings.lease_ttl / 3, 0.5)
        while not stop.is_set():
            try:
                await self._step()
                if not self.etcd_connected:
                    log.info("Connected to etcd", extra={"node": self.settings.node_name, "etcd": self._endpoint()})
                self.etcd_connected = True
                self._warned = False
            except ETCD_ERRORS as exc:
                if self.etcd_connected or not self._warned:
                    log.warning("etcd unreachable; retrying", extra={"etcd": self._endpoint(), "error": repr(exc)})
                    self._warned = True
                else:
                    log.debug("etcd still unreachable", extra={"etcd": self._endpoint(), "error": repr(exc)})
                self.etcd_connected = False
                if _lease_is_gone(exc):
                    self._lease = None
                await self._drop_client(rotate=True)
            if self.etcd_connected:
                await self._wait(interval, stop, wake_on_update=True)
            else:
                await self._wait(min(1.0, interval), stop, wake_on_update=False)

    async def _step(self) -> None:
        if self._lease is None:
            await self._register()
            return
        if self._dirty.is_set():
            self._dirty.clear()
            await self._put(self._lease)
            return
        lease = self._lease
        client = self._ensure_client()
        if self._lease_client is not client:
            # the client that granted the lease was dropped (a lost connection) while etcd kept the
            # lease (a restarted etcd extends its leases): refresh, and later revoke, through the new one
            lease = self._lease = aetcd.Lease(lease.id, self.settings.lease_ttl, client)
            self._lease_client = client
        reply = await self._call(lease.refresh)
        ttl = int(getattr(reply, "TTL", 0) or 0)
        if ttl <= 0:
            log.warning("Lease expired; registering again", extra={"node": self.settings.node_name, "lease": lease.id})
            self._lease = None
            await self._register()
            return
        self._lease_deadline = time.monotonic() + ttl

    async def _register(self) -> None:
        client = self._ensure_client()
        lease = await self._call(lambda: client.lease(self.settings.lease_ttl))
        self._dirty.clear()
        await self._put(lease)
        self._lease = lease
        self._lease_client = client
        self._lease_deadline = time.monotonic() + self.settings.lease_ttl
        log.info("Node registered", extra={"node": self.settings.node_name, "key": self.key.decode(),
                                           "lease": lease.id, "ttl": self.settings.lease_ttl})

    async def _put(self, lease: aetcd.Lease) -> None:
        client = self._ensure_client()
        value = json.dumps(self.record(), sort_keys=True).encode()
        await self._call(lambda: client.put(self.key, value, lease=lease))

    async def close(self) -> None:
        """Revoke the lease (the record goes with it) and close the client; bounded, never raises."""
        lease, self._lease = self._lease, None
        if lease is not None and self._client is not None:
            try:
                await asyncio.wait_for(lease.revoke(), self._call_timeout)
                log.info("Lease revoked", extra={"node": self.settings.node_name, "lease": lease.id})
            except ETCD_ERRORS as exc:
                log.warning("Could not revoke lease", extra={"lease": lease.id, "error": repr(exc)})
        await self._drop_client(rotate=False)
        self.etcd_connected = False

    # -- helpers -----------------------------------------------------------------------------

    def _endpoint(self) -> str:
        return str(self.settings.etcd_endpoints[self._endpoint_index])

    def _ensure_client(self) -> aetcd.Client:
        if self._client is None:
            self._client = self._client_factory(self.settings.etcd_endpoints[self._endpoint_index], self._call_timeout)
        return self._client

    async def _drop_client(self, *, rotate: bool) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*ETCD_ERRORS):
                await asyncio.wait_for(client.close(), self._call_timeout)
        if rotate:
            self._endpoint_index = (self._endpoint_index + 1) % len(self.settings.etcd_endpoints)

    async def _call(self, factory: Callable[[], Awaitable[T]]) -> T:
        """One bounded etcd call, retried briefly on ConnectionFailedError."""
        for attempt in range(CONNECT_RETRIES):
            try:
                return await asyncio.wait_for(factory(), self._call_timeout)
            except aetcd.ConnectionFailedError:
                if attempt == CONNECT_RETRIES - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _wait(self, seconds: float, stop: asyncio.Event, *, wake_on_update: bool) -> None:
        waiters = [asyncio.ensure_future(stop.wait())]
        if wake_on_update:
            waiters.append(asyncio.ensure_future(self._dirty.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)


def _lease_is_gone(exc: BaseException) -> bool:
    return "lease not found" in str(exc).lower()
