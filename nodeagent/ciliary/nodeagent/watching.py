"""Watching this node's intent key in etcd (``keyspace.node_intent_key``).

:class:`IntentWatcher` reads the key once (a full get, which also gives the
store's header revision), then watches it from ``header.revision + 1``. Each
event moves the resume point to ``mod_revision + 1``, so after a lost
connection the watch resumes exactly where it stopped (etcd's ``start_revision``
is inclusive). A ``RevisionCompactedError`` means that history is gone: the
watcher does a full get again and watches from its header revision + 1.
Errors back off boundedly (0.2 s doubling to 5 s) and rebuild the client.

Values are parsed with ``intents.parse_node_intent``; an unknown schema version
or a malformed value is handed to ``on_invalid`` and never to ``on_intent``, so
the last good state keeps enforcing. A deleted key goes to ``on_deleted``.

For health: ``synced`` is set once the key was first read (and handed over);
``broken_since`` is the monotonic time of the first failure since the watch last
worked (None while it works), so ``/healthz`` can fail a watch that stays broken.
Called by ``main.Agent``; the etcd client is injected (a fake in unit tests). ``lb_watching``
extends it to the node's sharded load-balancing intent (a prefix instead of one key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aetcd

from ciliary.operator import intents
from ciliary.operator.services.intent import LBIntentSchemaError
from ciliary.operator.store import keyspace

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
WATCH_ERRORS: tuple[type[BaseException], ...] = (aetcd.ClientError, OSError, TimeoutError)


class WatchHandle(Protocol):
    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def cancel(self) -> None: ...


class WatchClient(Protocol):
    """The part of ``aetcd.Client`` the watcher uses."""

    async def get_range(self, range_start: bytes, range_end: bytes) -> Any: ...

    async def watch(self, key: bytes, *, start_revision: int | None = None, range_end: bytes | None = None) -> Any:
        """``range_end``: only the sharded LB intent's watch (a prefix) passes it."""

    async def close(self) -> None: ...


IntentHandler = Callable[[Any, int], Awaitable[None]]
"""(intent, etcd mod revision) -> None."""
InvalidHandler = Callable[[str, int], Awaitable[None]]
"""(message, etcd mod revision) -> None."""
DeletedHandler = Callable[[int], Awaitable[None]]


class IntentWatcher:
    """Delivers every version of this node's intent, in order, across reconnects and compactions."""

    def __init__(self, *, node: str, client_factory: Callable[[], WatchClient],
                 on_intent: IntentHandler, on_invalid: InvalidHandler, on_deleted: DeletedHandler,
                 backoff: tuple[float, float] = (BACKOFF_MIN_S, BACKOFF_MAX_S),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, key: str | None = None,
                 parse: Callable[[str, bytes], Any] = intents.parse_node_intent) -> None:
        self.node = node
        self.key = (key or keyspace.node_intent_key(node)).encode()
        self._parse = parse
        self._client_factory = client_factory
        self._client: WatchClient | None = None
        self._on_intent = on_intent
        self._on_invalid = on_invalid
        self._on_deleted = on_deleted
        self._backoff = backoff
        self._sleep = sleep
        self.next_revision: int | None = None
        """Where the next watch starts; None: a full get is needed first."""
        self.resyncs = 0
        self.reconnects = 0
        self.connected = False
        self.synced = False
        """The key was read at least once and its value handed over (on_intent/on_invalid/on_deleted)."""
        self.broken_since: float | None = None
        """time.monotonic() of the first failure since the watch last worked; None while it works."""

    async def run(self, stop: asyncio.Event, *, max_rounds: int | None = None) -> None:
        """Watch until ``stop`` is set (or ``max_rounds`` watch rounds ended, for tests)."""
        delay = self._backoff[0]
        rounds = 0
        while not stop.is_set() and (max_rounds is None or rounds < max_rounds):
            rounds += 1
            try:
                delivered = await self._round(stop)
                self.connected = True
                if delivered:
                    delay = self._backoff[0]
                else:  # the stream ended without events: do not spin
                    await self._sleep(delay)
                    delay = min(delay * 2, self._backoff[1])
            except aetcd.RevisionCompactedError as exc:
                log.warning("Intent watch fell behind a compaction; reading the key again",
                            extra={"node": self.node, "compacted": exc.compacted_revision})
                self.next_revision = None
                self.resyncs += 1
            except WATCH_ERRORS as exc:
                self.connected = False
                if self.broken_since is None:
                    self.broken_since = time.monotonic()
                self.reconnects += 1
                log.warning("Intent watch interrupted; resuming", extra={
                    "node": self.node, "error": repr(exc), "resume_revision": self.next_revision,
                    "delay": round(delay, 2)})
                await self._drop_client()
                await self._sleep(delay)
                delay = min(delay * 2, self._backoff[1])
        await self._drop_client()

    async def _round(self, stop: asyncio.Event) -> bool:
        client = self._ensure_client()
        delivered = False
        if self.next_revision is None:
            await self._full_get(client)
            delivered = True
        assert self.next_revision is not None
        watch = await self._open_watch(client, self.next_revision)
        self.connected = True
        self.broken_since = None
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda _: asyncio.ensure_future(_cancel_quietly(watch)))
        try:
            async for event in watch:
                if stop.is_set():
                    break
                await self._deliver(event)
                delivered = True
        finally:
            stopper.cancel()
        return delivered

    async def _open_watch(self, client: WatchClient, start_revision: int) -> Any:
        return await client.watch(self.key, start_revision=start_revision)

    async def _full_get(self, client: WatchClient) -> None:
        # [key, key + NUL) holds exactly this key, and, unlike a plain get, always answers with the
        # store's revision; etcd lets a node's user read this range (its own intent) and no wider one
        response = await client.get_range(self.key, self.key + b"\x00")
        current = next((kv for kv in response if bytes(kv.key) == self.key), None)
        if current is None:
            await self._on_deleted(0)
        else:
            await self._handle_value(bytes(current.value), int(current.mod_revision))
        self.next_revision = int(response.header.revision) + 1
        self.synced = True

    async def _deliver(self, event: Any) -> None:
        revision = int(event.kv.mod_revision)
        if str(getattr(event.kind, "value", event.kind)).upper() == "DELETE":
            await self._on_deleted(revision)
        else:
            await self._handle_value(bytes(event.kv.value), revision)
        self.next_revision = revision + 1

    async def _handle_value(self, raw: bytes, revision: int) -> None:
        try:
            intent = self._parse(self.node, raw)
        except (intents.IntentSchemaError, LBIntentSchemaError) as exc:
            log.error("Refusing node intent", extra={"node": self.node, "mod_revision": revision,
                                                     "error": exc.message})
            await self._on_invalid(exc.message, revision)
            return
        if intent.node != self.node:
            message = f"intent names node {intent.node!r}, not {self.node!r}"
            await self._on_invalid(message, revision)
            return
        await self._on_intent(intent, revision)

    def _ensure_client(self) -> WatchClient:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*WATCH_ERRORS, asyncio.TimeoutError):
                await asyncio.wait_for(client.close(), 5)


async def _cancel_quietly(watch: WatchHandle) -> None:
    with contextlib.suppress(Exception):
        await watch.cancel()
