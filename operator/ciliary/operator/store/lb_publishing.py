"""Publishing the load-balancing intents into etcd as shards: only changed shards, the manifest last.

Each node's shards (``services.sharding.ShardBody``, as the operator's resolver keeps them, or a whole
:class:`~ciliary.operator.services.intent.NodeLBIntent` cut by ``sharding.bodies_of``) are encoded by
``services.sharding`` into values and a manifest under ``keyspace.node_lb_intent_prefix``.
The publisher remembers, per node, the digest of every value etcd holds under that prefix and the
manifest's mod revision. A pass writes, per node whose values differ:

1. the shards whose content changed, packed into as few transactions as the limits allow
   (``TXN_MAX_OPS`` below etcd's default ``--max-txn-ops`` of 128, ``TXN_MAX_BYTES`` below its
   1.5 MiB ``--max-request-bytes``);
2. then, in one last transaction, the manifest (naming every shard with its digest) and the
   deletes of the shards no longer needed; the last batch of step 1 goes into this transaction when
   both fit (one Service change is one transaction per node).

Every transaction compares the manifest's mod revision with the one last seen (or its absence),
so two operator replicas cannot interleave blindly (and the leader fence of ``EtcdStore`` applies
as to every write); after a lost compare the publisher re-reads the node's prefix and retries,
boundedly. Agents apply a node's intent only while the values match the manifest
(``sharding.ShardAssembler``), so the transactions of step 1 are never applied half. A node
that left has its whole prefix deleted. ``writes`` counts values put and deleted; ``transactions``
the etcd transactions. A node whose shards cannot be stored (one over the size limit) keeps its
previous intent and is named in ``errors``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ciliary.operator.services import sharding
from ciliary.operator.services.intent import NodeLBIntent
from ciliary.operator.store import keyspace
from ciliary.operator.store.access import prefix_range_end
from ciliary.operator.store.etcdclient import EtcdStore

log = logging.getLogger(__name__)

TXN_MAX_OPS = 100
TXN_MAX_BYTES = 1 << 20
CAS_ROUNDS = 10


@dataclass
class NodeValues:
    """What etcd holds under one node's prefix: part -> digest, and the manifest's mod revision (0: none)."""

    digests: dict[str, str] = field(default_factory=dict)
    manifest_mod: int = 0


def batches(puts: list[tuple[str, bytes]], *, max_ops: int = TXN_MAX_OPS,
            max_bytes: int = TXN_MAX_BYTES) -> list[list[tuple[str, bytes]]]:
    """Pack ``(part, value)`` puts into transactions of at most ``max_ops`` ops and ~``max_bytes``."""
    out: list[list[tuple[str, bytes]]] = []
    size = 0
    for part, raw in puts:
        if not out or len(out[-1]) >= max_ops or (out[-1] and size + len(raw) > max_bytes):
            out.append([])
            size = 0
        out[-1].append((part, raw))
        size += len(raw) + len(part) + 64
    return out


def _fits_with_manifest(batch: list[tuple[str, bytes]], manifest: bytes, max_bytes: int = TXN_MAX_BYTES) -> bool:
    """``batch``, the manifest's put and its get fit in one transaction (``batches`` packs the puts)."""
    return len(batches([*batch, (sharding.MANIFEST, manifest)], max_ops=TXN_MAX_OPS - 1, max_bytes=max_bytes)) == 1


class LBIntentPublisher:
    def __init__(self, store: EtcdStore, *, concurrency: int = 8, txn_max_bytes: int = TXN_MAX_BYTES) -> None:
        self.store = store
        self.txn_max_bytes = txn_max_bytes
        """Bytes of shards per transaction (compressed, 10,000 Services' shards are ~0.3 MB per node: one)."""
        self.seen: dict[str, NodeValues] = {}
        self.writes = 0
        self.transactions = 0
        self.errors: dict[str, str] = {}
        self.concurrency = concurrency
        self.last_split: dict[str, sharding.ShardedIntent] = {}
        """node -> its last encoding: unchanged shards are not serialised again (``sharding.encode``)."""

    async def load(self) -> None:
        """Learn what is already in etcd (an operator restart rewrites nothing unchanged)."""
        rows = await self.store.get_prefix(keyspace.LB_INTENTS_PREFIX.encode())
        self.seen = {}
        for kv in rows:
            self._learn(kv)

    def _learn(self, kv: Any) -> None:
        try:
            node, part = keyspace.lb_intent_part_from_key(bytes(kv.key))
        except ValueError:
            return
        values = self.seen.setdefault(node, NodeValues())
        values.digests[part] = sharding.digest(bytes(kv.value))
        if part == sharding.MANIFEST:
            values.manifest_mod = int(kv.mod_revision)

    async def _reload(self, node: str) -> None:
        self.seen.pop(node, None)
        for kv in await self.store.get_prefix(keyspace.node_lb_intent_prefix(node).encode()):
            self._learn(kv)

    async def publish(self, intents: Mapping[str, NodeLBIntent]) -> list[str]:
        """:meth:`publish_shards` of whole intents."""
        return await self.publish_shards({node: sharding.bodies_of(intent) for node, intent in intents.items()})

    async def publish_shards(self, shards: Mapping[str, Mapping[str, sharding.ShardBody]]) -> list[str]:
        """Write the nodes (node -> shard name -> body) whose values changed; delete departed nodes' prefixes.
        Returns the nodes written."""
        limit = asyncio.Semaphore(self.concurrency)

        async def one(node: str) -> bool:
            async with limit:
                return await self._publish_node(node, shards[node])

        nodes = sorted(shards)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(node)) for node in nodes]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first error, as a plain loop would raise it
        written = [node for node, task in zip(nodes, tasks, strict=True) if task.result()]
        if written:
            log.info("published %d load-balancing intent(s)", len(written), extra={"nodes": written[:20]})
        for node in sorted(set(self.seen) - set(shards)):
            prefix = keyspace.node_lb_intent_prefix(node)
            await self.store.transaction([], [self.store.ops.delete(prefix.encode(),
                                                                    prefix_range_end(prefix).encode())])
            self.writes += len(self.seen.pop(node).digests)
            self.last_split.pop(node, None)
            self.transactions += 1
            self.errors.pop(node, None)
            log.info("deleted load-balancing intent of departed node %s", node)
        return written

    async def withdraw_all(self) -> list[str]:
        """Delete every node's load-balancing intent (the operator runs without load balancing).

        Agents program whatever load-balancing intent etcd holds, so an intent left by an earlier run
        would go on translating Services beside the proxy that now owns them (kube-proxy, say).
        Returns the nodes whose intent was deleted.
        """
        withdrawn = sorted(self.seen)
        if withdrawn:
            await self.publish({})
            log.warning("Load balancing is off: deleted the load-balancing intents an earlier run published",
                        extra={"nodes": withdrawn[:20]})
        return withdrawn

    async def _publish_node(self, node: str, bodies: Mapping[str, sharding.ShardBody]) -> bool:
        try:
            sharded = sharding.encode(node, bodies, previous=self.last_split.get(node))
            self.last_split[node] = sharded
        except sharding.LBShardTooLargeError as exc:
            if self.errors.get(node) != str(exc):
                log.error("Load-balancing intent not published", extra={"node": node, "error": str(exc)})
            self.errors[node] = str(exc)
            return False
        self.errors.pop(node, None)
        wanted = {**sharded.digests, sharding.MANIFEST: sharding.digest(sharded.manifest)}
        for _ in range(CAS_ROUNDS):
            seen = self.seen.get(node, NodeValues())
            if seen.digests == wanted:
                return False
            if await self._write(node, sharded, seen):
                return True
            await self._reload(node)
        raise RuntimeError(f"could not publish the load-balancing intent of {node}: too many concurrent writers")

    async def _write(self, node: str, sharded: sharding.ShardedIntent, seen: NodeValues) -> bool:
        """One attempt: changed shards, then manifest + deletes. False when the manifest moved under us."""
        t = self.store.ops
        manifest_key = keyspace.node_lb_intent_key(node, sharding.MANIFEST).encode()
        guard = t.mod(manifest_key) == seen.manifest_mod if seen.manifest_mod else t.version(manifest_key) == 0
        puts = [(part, raw) for part, raw in sorted(sharded.shards.items())
                if seen.digests.get(part) != sharded.digests[part]]
        stale = sorted(part for part in seen.digests if part != sharding.MANIFEST and part not in sharded.shards)
        groups = batches(puts, max_bytes=self.txn_max_bytes)
        # the last batch goes with the manifest when both fit in one transaction: a change of a few Services
        # is then one etcd commit, not two
        last = groups.pop() if groups and _fits_with_manifest(groups[-1], sharded.manifest,
                                                                    self.txn_max_bytes) else []
        for batch in groups:
            ok, _ = await self.store.transaction(
                [guard], [t.put(keyspace.node_lb_intent_key(node, part).encode(), raw) for part, raw in batch])
            self.transactions += 1
            if not ok:
                return False
            self.writes += len(batch)
            for part, _raw in batch:
                seen.digests[part] = sharded.digests[part]
            self.seen[node] = seen
        deletes = [t.delete(keyspace.node_lb_intent_key(node, part).encode()) for part in stale]
        room = TXN_MAX_OPS - 2 - len(last)
        head, rest = deletes[:room], deletes[room:]
        ok, responses = await self.store.transaction(
            [guard], [*(t.put(keyspace.node_lb_intent_key(node, part).encode(), raw) for part, raw in last),
                      t.put(manifest_key, sharded.manifest), *head, t.get(manifest_key)])
        self.transactions += 1
        if not ok:
            return False
        for part, _raw in last:
            seen.digests[part] = sharded.digests[part]
        self.writes += len(last)
        rows = responses[-1] if responses else []
        current = rows[0][1] if rows else None
        seen.manifest_mod = int(current.mod_revision) if current is not None else 0
        seen.digests[sharding.MANIFEST] = sharding.digest(sharded.manifest)
        self.writes += 1 + len(head)
        for i in range(0, len(rest), TXN_MAX_OPS):  # over the limit (only with a larger SHARD_COUNT)
            await self.store.transaction([], rest[i:i + TXN_MAX_OPS])
            self.transactions += 1
            self.writes += len(rest[i:i + TXN_MAX_OPS])
        for part in stale:
            seen.digests.pop(part, None)
        self.seen[node] = seen
        log.debug("published load-balancing intent for %s: %d shard(s) written, %d deleted", node, len(puts),
                  len(stale))
        return True

