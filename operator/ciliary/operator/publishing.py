"""Publishing node intents into etcd: one key per node, written only when its content changed.

The publisher remembers, per node, the content hash and etcd mod revision of what
it last saw in etcd. A put happens only for a changed hash and is a
compare-and-swap on that mod revision, so two operator replicas cannot overwrite
each other blindly; after a lost race the publisher re-reads and retries.
Intents of nodes that left are deleted. ``writes`` counts every put and delete.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from ciliary.operator import keyspace
from ciliary.operator.etcdclient import EtcdStore
from ciliary.operator.intents import IntentSchemaError, NodeIntent, parse_node_intent

log = logging.getLogger(__name__)


@dataclass
class Published:
    content_hash: str
    mod_revision: int
    revision: int


class IntentPublisher:
    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.published: dict[str, Published] = {}
        self.writes = 0

    async def load(self) -> None:
        """Learn what is already in etcd (an operator restart rewrites nothing unchanged)."""
        rows = await self.store.get_prefix(keyspace.INTENTS_PREFIX.encode())
        for kv in rows:
            node = keyspace.node_from_key(keyspace.INTENTS_PREFIX, kv.key)
            try:
                intent = parse_node_intent(node, kv.value)
            except IntentSchemaError:
                self.published[node] = Published("", kv.mod_revision, -1)
                continue
            self.published[node] = Published(intent.content_hash(), kv.mod_revision, intent.revision)

    def current_revision(self, node: str) -> int | None:
        seen = self.published.get(node)
        return seen.revision if seen else None

    async def publish(self, intents: Mapping[str, NodeIntent]) -> list[str]:
        """Write the intents whose content changed; delete departed nodes. Returns nodes written."""
        written = []
        for node, intent in sorted(intents.items()):
            if await self._put_if_changed(node, intent):
                written.append(node)
        for node in sorted(set(self.published) - set(intents)):
            await self.store.delete(keyspace.node_intent_key(node).encode())
            self.published.pop(node, None)
            self.writes += 1
            log.info("deleted intent of departed node %s", node)
        return written

    async def _put_if_changed(self, node: str, intent: NodeIntent) -> bool:
        content = intent.content_hash()
        key = keyspace.node_intent_key(node).encode()
        for _ in range(10):  # bounded CAS retries
            seen = self.published.get(node)
            if seen and seen.content_hash == content:
                return False
            value = intent.to_wire()

            t = self.store.ops
            guard = t.mod(key) == seen.mod_revision if seen else t.version(key) == 0
            ok, _ = await self.store.transaction([guard], [t.put(key, value)])
            current = await self.store.get(key)
            if ok:
                self.writes += 1
                mod = current.mod_revision if current else 0
                self.published[node] = Published(content, mod, intent.revision)
                log.info("published intent for %s at revision %d", node, intent.revision)
                return True
            if current is None:
                self.published.pop(node, None)
            else:
                try:
                    theirs = parse_node_intent(node, current.value).content_hash()
                except IntentSchemaError:
                    theirs = ""
                self.published[node] = Published(theirs, current.mod_revision, -1)
        raise RuntimeError(f"could not publish the intent of {node}: too many concurrent writers")
