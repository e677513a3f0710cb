"""IntentPublisher against the real etcd: one round trip per node, compare-and-swap, no blind overwrite."""

from __future__ import annotations

import asyncio

import pytest

from ciliary.operator.intents import NodeIntent, parse_node_intent
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdStore
from ciliary.operator.store.publishing import IntentPublisher

pytestmark = pytest.mark.integration

PREFIX_NODE = "pub-test-node-"


def _intents(n: int, revision: int) -> dict[str, NodeIntent]:
    return {f"{PREFIX_NODE}{i:03}": NodeIntent(node=f"{PREFIX_NODE}{i:03}", revision=revision) for i in range(n)}


async def _load_own(publisher: IntentPublisher) -> None:
    """``load``, keeping only this test's nodes: other suites share this etcd, and a publisher
    deletes the intents of every node it knows and is not given."""
    await publisher.load()
    publisher.published = {n: p for n, p in publisher.published.items() if n.startswith(PREFIX_NODE)}


async def _scenario(kube) -> None:
    store = kube.etcd_store()
    other_store = kube.etcd_store()
    try:
        mine, other = IntentPublisher(store, concurrency=8), IntentPublisher(other_store)
        await _load_own(mine)
        await _load_own(other)
        first = _intents(50, 1)
        assert len(await mine.publish(first)) == 50
        assert await mine.publish(first) == []  # unchanged: nothing written
        for node in first:  # what the publisher remembers is what etcd holds
            kv = await store.get(keyspace.node_intent_key(node).encode())
            assert kv is not None and mine.published[node].mod_revision == kv.mod_revision
        # another replica rewrites one key behind our back
        node = f"{PREFIX_NODE}007"
        await _load_own(other)
        theirs = NodeIntent(node=node, revision=9, identity_labels={9: ("k8s:app=theirs",)})
        assert await other.publish({**first, node: theirs}) == [node]
        # our next write of that node loses the compare, re-reads and retries: ours lands, not blindly
        ours = NodeIntent(node=node, revision=2, identity_labels={7: ("k8s:app=x",)})
        assert await mine.publish({**first, node: ours}) == [node]
        kv = await store.get(keyspace.node_intent_key(node).encode())
        assert kv is not None and parse_node_intent(node, kv.value).content_hash() == ours.content_hash()
        assert mine.published[node].mod_revision == kv.mod_revision
        # departed nodes are deleted
        assert await mine.publish({}) == []
        assert not [kv for kv in await store.get_prefix(keyspace.INTENTS_PREFIX.encode())
                    if kv.key.decode().rsplit("/", 1)[1].startswith(PREFIX_NODE)]
    finally:
        await store.close()
        await other_store.close()


def test_publisher_writes_each_changed_node_once_and_never_blindly(kube) -> None:
    asyncio.run(_scenario(kube))


async def _fenced_scenario(kube) -> None:
    from ciliary.operator.store.etcdclient import FenceLostError
    from ciliary.operator.store.leadership import Leadership

    key = f"/ciliary/operator/v1/test-leader-{PREFIX_NODE}"
    a_store, b_store = kube.etcd_store(), kube.etcd_store()
    stop = asyncio.Event()
    try:
        a = Leadership(a_store, key=key, identity="a", ttl=2)
        assert await a.acquire(stop)
        assert a_store.fence is not None
        publisher = IntentPublisher(a_store)
        await _load_own(publisher)
        node = f"{PREFIX_NODE}fenced"
        assert await publisher.publish({node: NodeIntent(node=node, revision=1)}) == [node]
        # a is paused past its lease: the key expires and b takes over
        assert a.lease is not None
        await a.lease.revoke()
        b = Leadership(b_store, key=key, identity="b", ttl=2)
        assert await asyncio.wait_for(b.acquire(stop), 10)
        # a wakes up and tries to write once more: refused, nothing changes in etcd
        before = await a_store.get(keyspace.node_intent_key(node).encode())
        changed = NodeIntent(node=node, revision=2, identity_labels={5: ("k8s:app=late",)})
        with pytest.raises(FenceLostError):
            await publisher.publish({node: changed})
        with pytest.raises(FenceLostError):
            await publisher.publish({})  # nor delete
        after = await a_store.get(keyspace.node_intent_key(node).encode())
        assert before is not None and after is not None and after.mod_revision == before.mod_revision
        # the new leader writes normally
        theirs = IntentPublisher(b_store)
        await _load_own(theirs)
        assert await theirs.publish({}) == []
        assert await b_store.get(keyspace.node_intent_key(node).encode()) is None
        await b.release()
    finally:
        await a_store.close()
        await b_store.close()


def test_a_deposed_leader_cannot_write_once_more(kube) -> None:
    asyncio.run(_fenced_scenario(kube))


def test_store_fails_over_to_the_next_endpoint(kube) -> None:
    async def scenario() -> None:
        dead = EtcdEndpoint.parse("https://127.0.0.1:1")  # nothing listens on port 1
        store = EtcdStore(dead, tls=kube.etcd_tls(), fallbacks=[EtcdEndpoint.parse(kube.etcd_endpoint)], timeout=2.0)
        try:
            await store.put(b"/ciliary/operator/v1/test-failover", b"ok")
            kv = await store.get(b"/ciliary/operator/v1/test-failover")
            assert kv is not None and kv.value == b"ok"
            assert store.endpoint != dead
            await store.delete(b"/ciliary/operator/v1/test-failover")
        finally:
            await store.close()

    asyncio.run(scenario())
