"""LBIntentWatcher against a fake etcd: one range read of the node's prefix, a prefix watch from its revision,
nothing handed over while an update is half-written, unknown versions refused, resume without a second read.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aetcd

from ciliary.nodeagent import lb_watching
from ciliary.operator.services import sharding
from ciliary.operator.services.intent import FrontendIntent, FrontendKind, NodeLBIntent
from ciliary.operator.store import keyspace
from ciliary.operator.store.access import prefix_range_end

NODE = "node-1"
PREFIX = keyspace.node_lb_intent_prefix(NODE).encode()
END = prefix_range_end(keyspace.node_lb_intent_prefix(NODE)).encode()


def intent(services: int, *, port: int = 80, node: str = NODE) -> NodeLBIntent:
    return NodeLBIntent(node=node, frontends=tuple(sorted((
        FrontendIntent(service=f"ns/s{i}", kind=FrontendKind.CLUSTER_IP, address=f"10.96.0.{i + 1}", port=port,
                       protocol="TCP") for i in range(services)), key=lambda fe: fe.key)))  # as resolution orders


class FakeWatch:
    def __init__(self, events: list[SimpleNamespace]) -> None:
        self.events = events

    def __aiter__(self):
        async def gen():
            for ev in self.events:
                yield ev
            raise aetcd.ConnectionFailedError("etcd went away")

        return gen()

    async def cancel(self) -> None:
        pass


class FakeEtcd:
    """Keys with history; a transaction's puts share one revision, as in etcd."""

    def __init__(self) -> None:
        self.history: list[tuple[int, str, bytes, bytes]] = []
        self.revision = 1
        self.gets = 0
        self.watch_starts: list[int] = []

    def txn(self, puts: dict[bytes, bytes], deletes: tuple[bytes, ...] = ()) -> int:
        self.revision += 1
        self.history += [(self.revision, "PUT", k, v) for k, v in puts.items()]
        self.history += [(self.revision, "DELETE", k, b"") for k in deletes]
        return self.revision

    def state(self) -> dict[bytes, tuple[int, bytes]]:
        out: dict[bytes, tuple[int, bytes]] = {}
        for rev, kind, key, value in self.history:
            if kind == "PUT":
                out[key] = (rev, value)
            else:
                out.pop(key, None)
        return out

    def client(self) -> FakeEtcd:
        return self

    async def get_range(self, range_start: bytes, range_end: bytes):
        assert (range_start, range_end) == (PREFIX, END)  # the only range the node's etcd user may read
        self.gets += 1

        class Range(list):
            header = SimpleNamespace(revision=self.revision)

        return Range(SimpleNamespace(key=k, value=v, mod_revision=r) for k, (r, v) in sorted(self.state().items())
                     if range_start <= k < range_end)

    async def watch(self, key: bytes, *, start_revision: int | None = None, range_end: bytes | None = None):
        assert (key, range_end) == (PREFIX, END) and start_revision is not None
        self.watch_starts.append(start_revision)
        return FakeWatch([SimpleNamespace(kind=kind, kv=SimpleNamespace(key=k, value=v, mod_revision=rev))
                          for rev, kind, k, v in self.history if rev >= start_revision and key <= k < range_end])

    async def close(self) -> None:
        pass


def publish(etcd: FakeEtcd, node: str, new: NodeLBIntent, old: NodeLBIntent | None = None) -> list[int]:
    """As the operator does: the changed shards (one transaction each here), then manifest + deletes."""
    prefix = keyspace.node_lb_intent_prefix(node)
    a = sharding.split(old) if old is not None else None
    b = sharding.split(new)
    revisions = [etcd.txn({(prefix + n).encode(): raw}) for n, raw in sorted(b.shards.items())
                 if a is None or a.shards.get(n) != raw]
    stale = tuple((prefix + n).encode() for n in (a.shards if a else {}) if n not in b.shards)
    revisions.append(etcd.txn({(prefix + sharding.MANIFEST).encode(): b.manifest}, stale))
    return revisions


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, object, int]] = []

    async def on_intent(self, value: NodeLBIntent, rev: int) -> None:
        self.got.append(("intent", value, rev))

    async def on_invalid(self, message: str, rev: int) -> None:
        self.got.append(("invalid", message, rev))

    async def on_deleted(self, rev: int) -> None:
        self.got.append(("deleted", None, rev))


async def no_sleep(_s: float) -> None:
    await asyncio.sleep(0)


def make(etcd: FakeEtcd, sink: Sink) -> lb_watching.LBIntentWatcher:
    return lb_watching.LBIntentWatcher(node=NODE, client_factory=etcd.client, on_intent=sink.on_intent,
                                       on_invalid=sink.on_invalid, on_deleted=sink.on_deleted, sleep=no_sleep)


async def test_a_complete_intent_is_handed_over_once_and_a_half_written_one_never() -> None:
    etcd, sink = FakeEtcd(), Sink()
    first = intent(40)
    publish(etcd, "node-10", intent(3, node="node-10"))  # node-10's keys: outside node-1's range
    revisions = publish(etcd, NODE, first)
    watcher = make(etcd, sink)
    await watcher.run(asyncio.Event(), max_rounds=1)
    assert sink.got == [("intent", first, revisions[-1])]
    assert etcd.watch_starts == [etcd.revision + 1] and etcd.gets == 1

    second = intent(40, port=8080)  # every Service changes: every shard, several transactions
    revisions = publish(etcd, NODE, second, first)
    assert len(revisions) > 2
    seen: list[bool] = []
    original = watcher._evaluate

    async def spy(revision: int) -> None:
        await original(revision)
        seen.append(watcher.pending)

    watcher._evaluate = spy  # type: ignore[method-assign]
    await watcher.run(asyncio.Event(), max_rounds=1)
    # every shard event before the manifest left the update pending; the manifest completed it
    assert seen == [True] * (len(revisions) - 1) + [False]
    assert sink.got[1:] == [("intent", second, revisions[-1])]
    assert etcd.watch_starts[1] == etcd.watch_starts[0] and etcd.gets == 1  # resumed, no second read
    # manifest first, a shard after (another order of the same update): still only once complete
    third = intent(41, port=8080)
    b = sharding.split(third)
    a = sharding.split(second)
    changed = [n for n in b.shards if a.shards.get(n) != b.shards[n]]
    etcd.txn({PREFIX + b"manifest": b.manifest})
    await watcher.run(asyncio.Event(), max_rounds=1)
    assert len(sink.got) == 2 and watcher.pending
    last = etcd.txn({PREFIX + n.encode(): b.shards[n] for n in changed})
    await watcher.run(asyncio.Event(), max_rounds=1)
    assert sink.got[2:] == [("intent", third, last)] and not watcher.pending


async def test_an_unknown_version_is_refused_and_a_deleted_prefix_reported() -> None:
    etcd, sink = FakeEtcd(), Sink()
    publish(etcd, NODE, intent(5))
    manifest = json.loads(etcd.state()[PREFIX + b"manifest"][1])
    bad = etcd.txn({PREFIX + b"manifest": json.dumps({**manifest, "schema_version": 99}).encode()})
    watcher = make(etcd, sink)
    await watcher.run(asyncio.Event(), max_rounds=1)
    assert sink.got[0][0] == "invalid" and "unknown schema version 99" in str(sink.got[0][1])
    assert sink.got[0][2] == bad
    gone = etcd.txn({}, tuple(sorted(etcd.state())))
    await watcher.run(asyncio.Event(), max_rounds=1)
    assert sink.got[-1] == ("deleted", None, gone) and len(sink.got) == 2


async def test_a_compaction_resync_hands_the_intent_over_again() -> None:
    etcd, sink = FakeEtcd(), Sink()
    first = intent(8)
    publish(etcd, NODE, first)
    watcher = make(etcd, sink)
    await watcher.run(asyncio.Event(), max_rounds=1)
    watcher.next_revision = None  # what a RevisionCompactedError does
    await watcher.run(asyncio.Event(), max_rounds=1)
    assert [g[0] for g in sink.got] == ["intent", "intent"] and sink.got[1][1] == first and etcd.gets == 2


async def test_the_shards_of_the_intent_handed_over_make_it_up_and_unchanged_ones_stay_the_same_tuple() -> None:
    etcd, sink = FakeEtcd(), Sink()
    first = intent(200)
    publish(etcd, NODE, first)
    watcher = make(etcd, sink)
    await watcher.run(asyncio.Event(), max_rounds=1)
    handed = sink.got[-1][1]
    before = watcher.shards_of(handed)
    assert before is not None and watcher.shards_of(first) is None  # only for the very intent handed over
    one_changed = NodeLBIntent(node=NODE, frontends=tuple(
        fe.model_copy(update={"port": 81}) if fe.service == "ns/s7" else fe for fe in first.frontends))
    publish(etcd, NODE, one_changed, first)
    await watcher.run(asyncio.Event(), max_rounds=1)
    handed = sink.got[-1][1]
    after = watcher.shards_of(handed)
    assert handed == one_changed and after is not None
    assert sorted((fe for fes in after.values() for fe in fes), key=sharding.frontend_key) == list(handed.frontends)
    new = [name for name in after if after[name] is not before.get(name)]
    assert new == [sharding.shard_of("ns/s7")]  # every other shard's frontends: the very same tuple
