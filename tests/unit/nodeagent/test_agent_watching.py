"""IntentWatcher against a fake etcd: full get, resume after a lost connection, resync after compaction."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aetcd

from ciliary.nodeagent import watching
from ciliary.operator import intents
from ciliary.operator.store import keyspace

NODE = "n1"
KEY = keyspace.node_intent_key(NODE).encode()


def intent(revision: int) -> bytes:
    return intents.NodeIntent(node=NODE, revision=revision).to_wire()


class FakeWatch:
    def __init__(self, events, then_fail: bool) -> None:
        self.events = events
        self.then_fail = then_fail
        self.cancelled = False

    def __aiter__(self):
        async def gen():
            for ev in self.events:
                yield ev
            if self.then_fail:
                raise aetcd.ConnectionFailedError("etcd went away")

        return gen()

    async def cancel(self) -> None:
        self.cancelled = True


class FakeEtcd:
    """A key's history; watches replay from start_revision and then 'lose the connection'."""

    def __init__(self) -> None:
        self.history: list[tuple[int, str, bytes]] = []
        self.revision = 1
        self.compacted = 0
        self.gets = 0
        self.watch_starts: list[int] = []
        self.closed = 0

    def put(self, value: bytes) -> int:
        self.revision += 1
        self.history.append((self.revision, "PUT", value))
        return self.revision

    def delete(self) -> int:
        self.revision += 1
        self.history.append((self.revision, "DELETE", b""))
        return self.revision

    def client(self) -> FakeEtcd:
        return self

    async def get_range(self, range_start: bytes, range_end: bytes):
        # exactly the intent key: a wider range would need a permission the node's etcd user lacks
        assert (range_start, range_end) == (KEY, KEY + b"\x00")
        self.gets += 1
        kvs = []
        if self.history and self.history[-1][1] == "PUT":
            rev, _, value = self.history[-1]
            kvs = [SimpleNamespace(key=KEY, value=value, mod_revision=rev)]

        class Range(list):
            header = SimpleNamespace(revision=self.revision)

        return Range(kvs)

    async def watch(self, key: bytes, *, start_revision: int | None = None):
        assert start_revision is not None
        self.watch_starts.append(start_revision)
        if start_revision <= self.compacted:
            raise aetcd.RevisionCompactedError(self.compacted)
        events = [SimpleNamespace(kind=kind, kv=SimpleNamespace(key=KEY, value=value, mod_revision=rev))
                  for rev, kind, value in self.history if rev >= start_revision]
        return FakeWatch(events, then_fail=True)

    async def close(self) -> None:
        self.closed += 1


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, object, int]] = []

    async def on_intent(self, value: intents.NodeIntent, rev: int) -> None:
        self.got.append(("intent", value.revision, rev))

    async def on_invalid(self, message: str, rev: int) -> None:
        self.got.append(("invalid", message, rev))

    async def on_deleted(self, rev: int) -> None:
        self.got.append(("deleted", None, rev))


async def no_sleep(_s: float) -> None:
    await asyncio.sleep(0)


def make(etcd: FakeEtcd, sink: Sink) -> watching.IntentWatcher:
    return watching.IntentWatcher(node=NODE, client_factory=etcd.client, on_intent=sink.on_intent,
                                  on_invalid=sink.on_invalid, on_deleted=sink.on_deleted, sleep=no_sleep)


async def test_full_get_then_watch_then_resume_after_lost_connection() -> None:
    etcd, sink = FakeEtcd(), Sink()
    etcd.put(intent(1))
    r2 = etcd.put(intent(2))
    watcher = make(etcd, sink)
    await watcher.run(asyncio.Event(), max_rounds=1)
    # full get delivered the current value only; the watch started after the header revision
    assert sink.got == [("intent", 2, r2)]
    assert etcd.watch_starts == [etcd.revision + 1]
    assert watcher.reconnects == 1 and etcd.closed == 1  # the stream failed: client rebuilt

    r3 = etcd.put(intent(3))
    r4 = etcd.put(b'{"schema_version": 99, "node": "n1", "revision": 4}')
    await watcher.run(asyncio.Event(), max_rounds=1)
    assert sink.got[1] == ("intent", 3, r3)
    assert sink.got[2][0] == "invalid" and "unknown schema version 99" in str(sink.got[2][1])
    assert sink.got[2][2] == r4
    # resumed exactly after the last seen event, no second full get
    assert etcd.watch_starts[1] == r2 + 1 and etcd.gets == 1
    assert watcher.next_revision == r4 + 1

    r5 = etcd.delete()
    await watcher.run(asyncio.Event(), max_rounds=1)
    assert etcd.watch_starts[2] == r4 + 1
    assert sink.got[3] == ("deleted", None, r5)


async def test_compaction_forces_a_full_get_and_a_watch_from_its_header() -> None:
    etcd, sink = FakeEtcd(), Sink()
    etcd.put(intent(1))
    watcher = make(etcd, sink)
    await watcher.run(asyncio.Event(), max_rounds=1)
    for revision in range(2, 6):
        etcd.put(intent(revision))
    etcd.compacted = etcd.revision - 1  # history up to here is gone
    await watcher.run(asyncio.Event(), max_rounds=2)
    assert watcher.resyncs == 1 and etcd.gets == 2
    assert sink.got[-1] == ("intent", 5, etcd.revision)  # the newest value, via the full get
    assert etcd.watch_starts[-1] == etcd.revision + 1


async def test_malformed_and_foreign_values_are_refused() -> None:
    etcd, sink = FakeEtcd(), Sink()
    etcd.put(b"{not json")
    watcher = make(etcd, sink)
    await watcher.run(asyncio.Event(), max_rounds=1)
    etcd.put(intents.NodeIntent(node="other", revision=1).to_wire())
    await watcher.run(asyncio.Event(), max_rounds=1)
    assert [g[0] for g in sink.got] == ["invalid", "invalid"]
    assert "not JSON" in str(sink.got[0][1]) and "'other'" in str(sink.got[1][1])


async def test_backoff_is_bounded_and_stop_ends_the_loop() -> None:
    slept: list[float] = []

    class Down:
        async def get_range(self, range_start: bytes, range_end: bytes):
            raise aetcd.ConnectionFailedError("down")

        async def watch(self, key: bytes, *, start_revision: int | None = None):
            raise AssertionError("never reached")

        async def close(self) -> None:
            pass

    async def record(seconds: float) -> None:
        slept.append(seconds)

    sink = Sink()
    watcher = watching.IntentWatcher(node=NODE, client_factory=Down, on_intent=sink.on_intent,
                                     on_invalid=sink.on_invalid, on_deleted=sink.on_deleted, sleep=record)
    await watcher.run(asyncio.Event(), max_rounds=10)
    assert slept[0] == watching.BACKOFF_MIN_S and max(slept) == watching.BACKOFF_MAX_S
    assert all(b >= a for a, b in zip(slept, slept[1:], strict=False))
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(watcher.run(stop), 1)
