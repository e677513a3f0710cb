"""EtcdIdentityAllocator against the real etcd: shared numbers across replicas, garbage collection."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from ciliary.operator.policy.identities import MIN_CLUSTER_IDENTITY
from ciliary.operator.policy.selection import Label, LabelSet
from ciliary.operator.store import keyspace
from ciliary.operator.store.identities import EtcdIdentityAllocator

pytestmark = pytest.mark.integration
GRACE = 2.0
"""Seconds; long enough that a stalled machine cannot make the "not yet" check collect."""


def labels(app: str) -> LabelSet:
    return LabelSet([Label("k8s", "app", app), Label("k8s", "io.kubernetes.pod.namespace", "idtest")])


async def _scenario(kube) -> None:
    run = uuid.uuid4().hex[:8]
    a_store, b_store = kube.etcd_store(), kube.etcd_store()
    try:
        # no load(): other suites share this etcd. An allocator still learns their identities when it
        # loses a race for a number they hold, so every mark_in_use below keeps all but ours in use.
        a, b = EtcdIdentityAllocator(a_store, grace_seconds=GRACE), EtcdIdentityAllocator(b_store, grace_seconds=GRACE)
        # identities of "other suites", taken before ours: the later allocators lose races for their
        # numbers and learn them, as in a CI run where earlier suites left identities behind
        seeder = EtcdIdentityAllocator(b_store, grace_seconds=0.0)
        n_seed = await seeder.ensure(labels(f"seed-{run}"))
        other = EtcdIdentityAllocator(b_store, grace_seconds=0.0)
        n_other = await other.ensure(labels(f"other-{run}"))
        assert n_seed in other.canonical_of  # other lost the race for n_seed
        web, db = labels(f"web-{run}"), labels(f"db-{run}")
        n_web, n_db = await a.ensure(web), await a.ensure(db)
        assert n_web != n_db and min(n_web, n_db) >= MIN_CLUSTER_IDENTITY
        # another replica (or a restart) that learned nothing yet gets the same numbers, allocating none
        assert (await b.ensure(web), await b.ensure(db)) == (n_web, n_db) and b.allocations == 0
        # db falls out of use; before the grace period nothing is collected, after it db's keys go
        a.mark_in_use(set(a.canonical_of) - {n_db})
        assert await a.collect_garbage() == []
        await asyncio.sleep(GRACE + 0.2)
        assert await a.collect_garbage() == [n_db]
        assert await a_store.get(keyspace.identity_id_key(n_db).encode()) is None
        assert not [kv for kv in await a_store.get_prefix(keyspace.IDENTITY_ID_PREFIX.encode())
                    if kv.value.decode().find(f"db-{run}") >= 0]
        assert await a_store.get(keyspace.identity_id_key(n_web).encode()) is not None
        assert a.allocate(web) == n_web
        # db comes back: allocated again (a fresh replica sees it too)
        again = await a.ensure(db)
        fresh = EtcdIdentityAllocator(b_store)
        await fresh.load()  # read-only use: it never collects
        assert fresh.allocate(db) == again
        a.mark_in_use(set(a.canonical_of) - {n_web, again})
        await asyncio.sleep(GRACE + 0.2)
        assert sorted(await a.collect_garbage()) == sorted({n_web, again})
        assert await a_store.get(keyspace.identity_id_key(n_other).encode()) is not None  # not ours: kept
        assert n_seed in a.canonical_of and n_other in a.canonical_of
        other.mark_in_use(set(other.canonical_of) - {n_other})
        assert await other.collect_garbage() == [n_other]
        seeder.mark_in_use(set(seeder.canonical_of) - {n_seed})
        assert await seeder.collect_garbage() == [n_seed]
    finally:
        await a_store.close()
        await b_store.close()


def test_replicas_share_numbers_and_unused_identities_are_collected(kube) -> None:
    asyncio.run(_scenario(kube))
