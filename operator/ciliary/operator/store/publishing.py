"""Publishing node intents into etcd: one key per node, written only when its content changed.

The publisher remembers, per node, the content hash and etcd mod revision of what
it last saw in etcd. A put happens only for a changed hash and is a
compare-and-swap on that mod revision, so two operator replicas cannot overwrite
each other blindly; after a lost race the publisher re-reads and retries.
Intents of nodes that left are deleted. ``writes`` counts every put and delete.

One etcd round trip per written node: the transaction reads the key back after
its put (its new mod revision) or, when the compare fails, reads what is there.
Up to ``concurrency`` nodes are written at once (a policy that selects pods on
every node of a 1,000-node cluster rewrites 1,000 keys).

The load-balancing intents are sharded and written by ``lb_publishing`` instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ciliary.operator.intents import IntentSchemaError, parse_node_intent
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdStore

log = logging.getLogger(__name__)


@dataclass
class Published:
    content_hash: str
    mod_revision: int
    revision: int


class PublishableIntent(Protocol):
    """What the publisher needs of an intent (``NodeIntent``)."""

    def content_hash(self) -> str: ...

    def to_wire(self) -> bytes: ...


_SCHEMA_ERRORS = (IntentSchemaError,)


class IntentPublisher:
    def __init__(self, store: EtcdStore, *, concurrency: int = 32, prefix: str = keyspace.INTENTS_PREFIX,
                 key_of: Callable[[str], str] = keyspace.node_intent_key,
                 parse: Callable[[str, bytes], Any] = parse_node_intent) -> None:
        self.store = store
        self.published: dict[str, Published] = {}
        self.writes = 0
        self.concurrency = concurrency
        self.prefix = prefix
        self.key_of = key_of
        self.parse = parse

    async def load(self) -> None:
        """Learn what is already in etcd (an operator restart rewrites nothing unchanged)."""
        rows = await self.store.get_prefix(self.prefix.encode())
        for kv in rows:
            node = keyspace.node_from_key(self.prefix, kv.key)
            try:
                intent = self.parse(node, kv.value)
            except _SCHEMA_ERRORS:
                self.published[node] = Published("", kv.mod_revision, -1)
                continue
            self.published[node] = Published(intent.content_hash(), kv.mod_revision, getattr(intent, "revision", 0))

    def current_revision(self, node: str) -> int | None:
        seen = self.published.get(node)
        return seen.revision if seen else None

    def latest_mod_revision(self) -> int:
        """The etcd revision by which every intent published (or found) so far was in etcd."""
        return max((seen.mod_revision for seen in self.published.values()), default=0)

    async def publish(self, intents: Mapping[str, PublishableIntent]) -> list[str]:
        """Write the intents whose content changed; delete departed nodes. Returns nodes written."""
        limit = asyncio.Semaphore(self.concurrency)

        async def one(node: str, content: str) -> bool:
            async with limit:
                return await self._put_if_changed(node, intents[node], content)

        hashes = {node: intent.content_hash() for node, intent in intents.items()}  # once per node: not cheap
        changed = sorted(node for node, content in hashes.items()
                         if (seen := self.published.get(node)) is None or seen.content_hash != content)
        # a TaskGroup: when one write fails, the others are cancelled before the error propagates
        # (no write of this round still lands while the caller already retries)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(node, hashes[node])) for node in changed]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first error, as a plain loop would raise it
        written = [node for node, task in zip(changed, tasks, strict=True) if task.result()]
        if written:
            log.info("published %d intent(s)", len(written), extra={"nodes": written[:20]})
        for node in sorted(set(self.published) - set(intents)):
            await self.store.delete_fenced(self.key_of(node).encode())
            self.published.pop(node, None)
            self.writes += 1
            log.info("deleted intent of departed node %s", node)
        return written

    async def _put_if_changed(self, node: str, intent: PublishableIntent, content: str) -> bool:
        """CAS-write ``intent`` (whose content hash is ``content``) unless etcd already holds that content."""
        key = self.key_of(node).encode()
        value = intent.to_wire()
        for _ in range(10):  # bounded CAS retries
            seen = self.published.get(node)
            if seen and seen.content_hash == content:
                return False
            t = self.store.ops
            guard = t.mod(key) == seen.mod_revision if seen else t.version(key) == 0
            ok, responses = await self.store.transaction([guard], [t.put(key, value), t.get(key)], [t.get(key)])
            rows = responses[-1] if responses else []
            current = rows[0][1] if rows else None
            if ok:
                self.writes += 1
                mod = current.mod_revision if current else 0
                revision = getattr(intent, "revision", 0)
                self.published[node] = Published(content, mod, revision)
                log.debug("published intent for %s at revision %d", node, revision)
                return True
            if current is None:
                self.published.pop(node, None)
            else:
                try:
                    theirs = self.parse(node, current.value).content_hash()
                except _SCHEMA_ERRORS:
                    theirs = ""
                self.published[node] = Published(theirs, current.mod_revision, -1)
        raise RuntimeError(f"could not publish the intent of {node}: too many concurrent writers")
