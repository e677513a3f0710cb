"""Leader election for operator replicas, in etcd.

Every replica tries to create the election key (``--leader-election``; key
``/ciliary/operator/v1/leader`` by default) bound to its own lease, in a
transaction that succeeds only if the key does not exist. The winner runs the
operator; the others wait, watching for the key to disappear (the leader
stopped, or its lease expired because it went silent), and try again. A leader
that fails to refresh its lease stops at once (``lost`` is set), so two
replicas never act as leader for longer than the lease TTL overlaps. The
winner also fences its store (``EtcdStore.fence``): its intent and identity
transactions carry the election key's create revision, so even a leader paused
past its lease cannot write once more after another replica took over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket

import aetcd

from ciliary.operator.store.etcdclient import RETRYABLE, EtcdStore, Fence

log = logging.getLogger(__name__)
DEFAULT_KEY = "/ciliary/operator/v1/leader"


class LeadershipLostError(RuntimeError):
    """This replica stopped being the leader while running; it exits so it can rejoin as a standby."""

    def __init__(self, identity: str) -> None:
        super().__init__(f"operator {identity} lost the leader election; exiting")
        self.identity = identity


class Leadership:
    def __init__(self, store: EtcdStore, *, key: str = DEFAULT_KEY, identity: str = "", ttl: int = 15) -> None:
        self.store = store
        self.key = key.encode()
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}"
        self.ttl = max(2, ttl)
        self.lease: aetcd.Lease | None = None
        self.lost = asyncio.Event()

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica leads (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            lease = await self.store.call(lambda c: c.lease(self.ttl))
            record = json.dumps({"holder": self.identity, "leaseTTL": self.ttl}).encode()
            t = self.store.ops
            won, responses = await self.store.transaction([t.version(self.key) == 0],
                                                          [t.put(self.key, record, lease=lease), t.get(self.key)],
                                                          fenced=False)
            if won:
                self.lease = lease
                mine = responses[-1][0][1]  # the key as this transaction created it
                self.store.fence = Fence(self.key, mine.create_revision)
                log.info("became leader", extra={"holder": self.identity})
                return True
            await lease.revoke()  # lost: this lease holds nothing
            current = await self.store.get(self.key)
            if not announced and current is not None:
                log.info("waiting for leadership; held by %s", json.loads(current.value).get("holder"))
                announced = True
            await self._wait_for_release(stop)
        return False

    async def _wait_for_release(self, stop: asyncio.Event) -> None:
        """Return when the key is deleted (or after at most one TTL, to re-check)."""
        try:
            await asyncio.wait_for(self._watch_delete(), timeout=self.ttl)
        except TimeoutError:
            pass

    async def _watch_delete(self) -> None:
        watch = await self.store.client.watch(self.key, kind=aetcd.rtypes.EventKind.DELETE)
        try:
            async for _event in watch:
                return
        finally:
            await watch.cancel()

    async def keep(self, stop: asyncio.Event) -> None:
        """Refresh the lease every TTL/3; on failure set ``lost`` and return."""
        assert self.lease is not None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.ttl / 3)
                return
            except TimeoutError:
                pass
            try:
                remaining = await self.lease.refresh()
            except (*RETRYABLE, aetcd.ClientError) as exc:
                log.error("lost leadership: lease refresh failed: %s", exc)
                self.lost.set()
                return
            if int(getattr(remaining, "TTL", 1)) <= 0:
                log.error("lost leadership: lease expired")
                self.lost.set()
                return

    async def release(self) -> None:
        if self.lease is not None:
            try:
                await self.lease.revoke()
            except (*RETRYABLE, aetcd.ClientError) as exc:
                log.warning("could not release leadership: %s", exc)
            self.lease = None
