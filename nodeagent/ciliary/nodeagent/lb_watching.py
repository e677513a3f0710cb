"""Watching this node's sharded load-balancing intent (``keyspace.node_lb_intent_prefix``).

:class:`LBIntentWatcher` is an ``IntentWatcher`` (same resume, compaction and back-off
discipline) over the node's prefix instead of one key: one range read of the whole prefix (one
revision, the only range the node's etcd user may read), then a watch of the prefix from that
revision + 1. Every value goes into a ``sharding.ShardAssembler``; after each event the watcher
hands over the assembled intent only when it is complete (every shard the manifest names, with the
manifest's digest) and differs from the last one handed over. While an update is half-written (the
operator writes large changes in several transactions, the manifest last) nothing is handed over and
the previous intent stays applied. An unknown schema version or a malformed value goes to
``on_invalid``; an empty prefix (nothing published, or the node's intent deleted) to ``on_deleted``.
:meth:`LBIntentWatcher.shards_of` gives the shards of the intent handed over last (the agent's planner
walks only those that changed).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ciliary.nodeagent import watching
from ciliary.operator.services import sharding
from ciliary.operator.services.intent import FrontendIntent, LBIntentSchemaError, NodeLBIntent
from ciliary.operator.store import keyspace
from ciliary.operator.store.access import prefix_range_end

log = logging.getLogger(__name__)


class LBIntentWatcher(watching.IntentWatcher):
    def __init__(self, *, node: str, client_factory: Callable[[], watching.WatchClient],
                 on_intent: watching.IntentHandler, on_invalid: watching.InvalidHandler,
                 on_deleted: watching.DeletedHandler, backoff: tuple[float, float] = (watching.BACKOFF_MIN_S,
                                                                                       watching.BACKOFF_MAX_S),
                 sleep: Callable[[float], Awaitable[None]] | None = None) -> None:
        extra: dict[str, Any] = {} if sleep is None else {"sleep": sleep}
        prefix = keyspace.node_lb_intent_prefix(node)
        super().__init__(node=node, client_factory=client_factory, on_intent=on_intent, on_invalid=on_invalid,
                         on_deleted=on_deleted, backoff=backoff, key=prefix, **extra)
        self.range_end = prefix_range_end(prefix).encode()
        self.assembler = sharding.ShardAssembler(node)
        self.handed: str | None = None
        """Digest of the manifest last handed over (None: nothing; "": deleted; "!": refused)."""
        self.pending = False
        """The values do not match the manifest (an update is half-written)."""
        self._handed_shards: tuple[NodeLBIntent, dict[str, tuple[FrontendIntent, ...]]] | None = None
        """The intent handed over last and its shards (:meth:`shards_of`)."""

    def shards_of(self, intent: NodeLBIntent) -> dict[str, tuple[FrontendIntent, ...]] | None:
        """Shard name -> frontends of ``intent`` when it is the intent handed over last (it is their union), else
        None (``lb_incremental`` then compares every frontend)."""
        if self._handed_shards is None or self._handed_shards[0] is not intent:
            return None
        return self._handed_shards[1]

    async def _open_watch(self, client: watching.WatchClient, start_revision: int) -> Any:
        return await client.watch(self.key, range_end=self.range_end, start_revision=start_revision)

    def _part(self, key: bytes) -> str:
        return bytes(key)[len(self.key):].decode()

    async def _full_get(self, client: watching.WatchClient) -> None:
        response = await client.get_range(self.key, self.range_end)
        self.assembler.reset({self._part(kv.key): bytes(kv.value) for kv in response})
        self.handed = None  # after a resync, hand the intent over again
        revision = max((int(kv.mod_revision) for kv in response), default=0)
        await self._evaluate(revision)
        self.next_revision = int(response.header.revision) + 1
        self.synced = True

    async def _deliver(self, event: Any) -> None:
        revision = int(event.kv.mod_revision)
        part = self._part(event.kv.key)
        if str(getattr(event.kind, "value", event.kind)).upper() == "DELETE":
            self.assembler.delete(part)
        else:
            self.assembler.put(part, bytes(event.kv.value))
        await self._evaluate(revision)
        self.next_revision = revision + 1

    async def _evaluate(self, revision: int) -> None:
        if self.assembler.empty:
            self.pending = False
            if self.handed != "":
                self.handed = ""
                await self._on_deleted(revision)
            return
        manifest = self.assembler.manifest_digest()
        try:
            intent = self.assembler.current()
        except LBIntentSchemaError as exc:
            self.pending = False
            if self.handed != "!" + (manifest or ""):
                self.handed = "!" + (manifest or "")
                log.error("Refusing load-balancing intent", extra={"node": self.node, "mod_revision": revision,
                                                                     "error": exc.message})
                await self._on_invalid(exc.message, revision)
            return
        if intent is None:
            self.pending = True  # half-written (or no manifest yet): the applied intent stays
            return
        self.pending = False
        if manifest != self.handed:
            self.handed = manifest
            self._handed_shards = (intent, self.assembler.shards)
            await self._on_intent(intent, revision)
