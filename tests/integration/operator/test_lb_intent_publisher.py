"""LBIntentPublisher against the real etcd: 10,000 Services per node are stored (sharded) and read back whole.

One value of the whole intent (~5 MB here) would be refused by etcd (``--max-request-bytes``,
1.5 MiB): the shards are written in transactions under etcd's op and size limits, then the
manifest (compressed, 10,000 Services' shards fit one transaction: the publisher here is given 64 KiB
transactions, so the path of several is the one exercised). A one-Service change rewrites one shard and the manifest; an unchanged pass writes
nothing; a concurrent writer is not overwritten blindly; a departed node's prefix is deleted; an
operator without load balancing deletes them all (``withdraw_all``).
"""

from __future__ import annotations

import asyncio
from functools import cache

import pytest

from ciliary.operator.services import sharding
from ciliary.operator.services.inputs import ServiceInfo, ServicePort, SliceEndpoint, SliceInfo, SlicePort
from ciliary.operator.services.intent import NodeLBIntent
from ciliary.operator.services.resolution import ResolverConfig, resolve
from ciliary.operator.store import keyspace
from ciliary.operator.store.lb_publishing import TXN_MAX_BYTES, LBIntentPublisher

pytestmark = pytest.mark.integration

NODES = {"lbpub-node-1": "192.0.2.11", "lbpub-node-10": "192.0.2.12"}  # -1 is a string prefix of -10


@cache
def resolved(count: int, changed: int | None = None) -> dict[str, NodeLBIntent]:
    services, slices = {}, {}
    for i in range(count):
        svc = ServiceInfo("bench", f"svc-{i}", type="ClusterIP", cluster_ips=(f"10.96.{i // 256}.{i % 256}",),
                          ports=(ServicePort("http", "TCP", 80, 8080, None),))
        services[svc.key] = svc
        eps = tuple(SliceEndpoint((f"10.244.{(3 * i + j) // 256 % 256}.{(3 * i + j) % 256}",), True, True, False,
                                  f"lbpub-node-{1 if j % 2 else 10}", f"bench/pod-{i}-{j}")
                    for j in range(2 if i == changed else 3))
        sl = SliceInfo("bench", f"svc-{i}-x", f"svc-{i}", (SlicePort("http", "TCP", 8080),), eps)
        slices[f"bench/{sl.name}"] = sl
    return dict(resolve(services, slices, NODES, ResolverConfig(node_port_range=(30000, 32767))).intents)


async def read_back(store, node: str) -> tuple[NodeLBIntent | None, dict[str, int]]:
    rows = await store.get_prefix(keyspace.node_lb_intent_prefix(node).encode())
    values = {keyspace.lb_intent_part_from_key(bytes(kv.key))[1]: bytes(kv.value) for kv in rows}
    return sharding.assemble(node, values), {part: len(raw) for part, raw in values.items()}


async def own(publisher: LBIntentPublisher) -> None:
    """``load``, keeping only this test's nodes (a publisher deletes every node it knows and is not given)."""
    await publisher.load()
    publisher.seen = {n: v for n, v in publisher.seen.items() if n in NODES}


async def _scenario(kube) -> None:
    store, other_store = kube.etcd_store(), kube.etcd_store()
    try:
        mine, other = LBIntentPublisher(store, txn_max_bytes=64 * 1024), LBIntentPublisher(other_store)
        await own(mine)
        big = resolved(10_000)
        assert all(len(intent.to_wire()) > 1_500_000 * 2 for intent in big.values())  # one value: refused
        assert await mine.publish(big) == sorted(NODES)
        assert mine.transactions >= 2 * 4  # ~0.3 MB per node: several transactions of <= 64 KiB
        assert all(sum(map(len, sharding.split(i).shards.values())) < TXN_MAX_BYTES for i in big.values())
        for node, intent in big.items():
            got, sizes = await read_back(store, node)
            assert got == intent
            assert len(sizes) == sharding.SHARD_COUNT + 1 and max(sizes.values()) < 12 * 1024
        writes, txns = mine.writes, mine.transactions
        assert await mine.publish(big) == []  # unchanged: nothing written
        assert (mine.writes, mine.transactions) == (writes, txns)
        # a restarted operator learns what etcd holds and rewrites nothing
        fresh = LBIntentPublisher(store)
        await own(fresh)
        assert await fresh.publish(big) == [] and fresh.writes == 0
        # one Service loses a backend: one shard and the manifest per node, in one transaction
        one_less = resolved(10_000, changed=4321)
        assert await mine.publish(one_less) == sorted(NODES)
        assert (mine.writes - writes, mine.transactions - txns) == (2 * 2, 2 * 1)
        for node, intent in one_less.items():
            assert (await read_back(store, node))[0] == intent
        # another replica writes behind our back; our next write re-reads and is not blind
        await own(other)
        small = resolved(50)
        assert await other.publish(small) == sorted(NODES)  # 50 Services: the stale shards are deleted
        for node, intent in small.items():
            got, sizes = await read_back(store, node)
            assert got == intent and len(sizes) == len(sharding.split(intent).shards) + 1
        # ours differs: its first transaction loses the compare on the manifest, it re-reads what etcd
        # holds (50 Services' shards) and writes every shard that differs, not what it remembered
        txns = mine.transactions
        assert await mine.publish(big) == sorted(NODES)
        assert mine.transactions - txns >= 2 * (1 + 4)
        for node, intent in big.items():
            assert (await read_back(store, node))[0] == intent
        # departed nodes: their whole prefix goes, node-1's deletion leaves node-10's keys
        assert await mine.publish({"lbpub-node-10": big["lbpub-node-10"]}) == []
        assert (await read_back(store, "lbpub-node-1"))[1] == {}
        assert (await read_back(store, "lbpub-node-10"))[0] == big["lbpub-node-10"]
        # an operator restarted without load balancing deletes what an earlier run published
        await own(other)
        assert await other.withdraw_all() == ["lbpub-node-10"]
        assert (await read_back(store, "lbpub-node-10"))[1] == {} and other.seen == {}
        assert await other.withdraw_all() == []
    finally:
        for node in NODES:
            await store.call(lambda c, n=node: c.delete_prefix(keyspace.node_lb_intent_prefix(n).encode()))
        await store.close()
        await other_store.close()


def test_lb_publisher_stores_10000_services_per_node_in_shards(kube) -> None:
    asyncio.run(_scenario(kube))

