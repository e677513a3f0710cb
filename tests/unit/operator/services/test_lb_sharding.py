"""Sharding a node's LB intent (``services.sharding``): the union is the intent, shards stay small and stable.

Also: the publisher's transaction packing, and a half-written update (some shards new, the manifest old, or the reverse) is never assembled,
and an unknown schema version is refused with a clear error.
"""

from __future__ import annotations

import json
import zlib
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliary.operator.services import sharding
from ciliary.operator.services.inputs import ServiceInfo, ServicePort, SliceEndpoint, SliceInfo, SlicePort
from ciliary.operator.services.intent import (
    MAX_BACKENDS_PER_FRONTEND,
    BackendIntent,
    FrontendIntent,
    FrontendKind,
    HealthCheckIntent,
    LBIntentSchemaError,
    NodeLBIntent,
    ProblemIntent,
)
from ciliary.operator.services.resolution import ResolverConfig, resolve
from ciliary.operator.store.lb_publishing import TXN_MAX_OPS, batches

NODE = "node-1"
NODES = {"node-1": "192.0.2.11", "node-2": "192.0.2.12"}


def cluster(count: int, backends: int = 3, *, node_port: bool = False) -> tuple[dict, dict]:
    services, slices = {}, {}
    for i in range(count):
        port = ServicePort("http", "TCP", 80, 8080, 30000 + i % 2700 if node_port else None)
        svc = ServiceInfo("bench", f"svc-{i}", type="NodePort" if node_port else "ClusterIP",
                          cluster_ips=(f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",), ports=(port,))
        services[svc.key] = svc
        eps = tuple(SliceEndpoint((f"10.244.{(i * backends + j) // 256 % 256}.{(i * backends + j) % 256}",),
                                  True, True, False, f"node-{1 + j % 2}", f"bench/pod-{i}-{j}")
                    for j in range(backends))
        sl = SliceInfo("bench", f"svc-{i}-abc", f"svc-{i}", (SlicePort("http", "TCP", 8080),), eps)
        slices[f"bench/{sl.name}"] = sl
    return services, slices


@cache
def big_intent() -> NodeLBIntent:
    services, slices = cluster(10_000)
    return resolve(services, slices, NODES, ResolverConfig(node_port_range=(30000, 32767))).intents[NODE]


def test_10000_services_fit_in_shards_far_below_the_etcd_limit() -> None:
    intent = big_intent()
    assert len(intent.frontends) == 10_000
    whole = len(intent.to_wire())
    assert whole > 1_500_000 * 2  # one value would be refused by etcd (the limit is 1.5 MiB)
    sharded = sharding.split(intent)
    sizes = [len(raw) for raw in sharded.shards.values()]
    assert len(sizes) == sharding.SHARD_COUNT
    assert max(sizes) < 12 * 1024, max(sizes)  # ~5 KB each (~58 KB of JSON): far below SHARD_LIMIT_BYTES
    # what a pass that touches every shard writes to etcd per node (a bulk create): compressed >= 8x
    inflated = sum(len(zlib.decompress(raw)) for raw in sharded.shards.values())
    assert sum(sizes) * 8 < inflated, (sum(sizes), inflated)
    assert len(sharded.manifest) < 8 * 1024
    print(f"\nwhole {whole} B; shards max {max(sizes)} B, total {sum(sizes)} B ({inflated} B of JSON); "
          f"manifest {len(sharded.manifest)} B")
    assert sharding.assemble(NODE, {**sharded.shards, sharding.MANIFEST: sharded.manifest}) == intent


def test_a_service_with_the_most_backends_a_frontend_holds_fits() -> None:
    services, slices = cluster(1, backends=MAX_BACKENDS_PER_FRONTEND, node_port=True)
    intent = resolve(services, slices, NODES, ResolverConfig(node_port_range=(30000, 32767))).intents[NODE]
    assert {fe.kind for fe in intent.frontends} == {FrontendKind.CLUSTER_IP, FrontendKind.NODE_PORT}
    assert all(len(fe.backends) == MAX_BACKENDS_PER_FRONTEND for fe in intent.frontends)
    sharded = sharding.split(intent)
    (raw,) = sharded.shards.values()
    print(f"\n{len(intent.frontends)} frontends x 256 backends: shard {len(raw)} B")
    assert len(raw) < 128 * 1024, len(raw)
    assert sharding.assemble(NODE, {**sharded.shards, sharding.MANIFEST: sharded.manifest}) == intent


def test_a_shard_over_the_limit_is_refused_naming_its_services() -> None:
    services, slices = cluster(3, backends=50)
    intent = resolve(services, slices, NODES, ResolverConfig(node_port_range=(30000, 32767))).intents[NODE]
    with pytest.raises(sharding.LBShardTooLargeError) as caught:
        sharding.split(intent, limit=200)
    assert caught.value.node == NODE and caught.value.size > 200
    assert set(caught.value.services) <= set(services)


@pytest.mark.parametrize(("value", "says"), [
    (b'{"schema_version":6,"node":"node-1","shard":"s00"}', "not zlib-compressed JSON"),
    (zlib.compress(b'{"schema_version":6,"node":"node-1","shard":"s00"}')[:-6], "truncated zlib data"),
    (zlib.compress(b" " * (sharding.SHARD_LIMIT_JSON_BYTES + 1), 9), "inflates beyond"),
    (zlib.compress(b'{"schema_version":5,"node":"node-1","shard":"s00"}'), "unknown schema version 5"),
    (zlib.compress(b"[1, 2]"), "not a JSON object"),
])
def test_a_shard_value_that_is_not_this_versions_zlib_json_is_refused_naming_the_shard(value: bytes,
                                                                                         says: str) -> None:
    with pytest.raises(LBIntentSchemaError) as caught:
        sharding.parse_shard(NODE, "s00", value)
    assert says in str(caught.value) and "s00" in str(caught.value)


def test_one_service_change_rewrites_one_shard() -> None:
    intent = big_intent()
    before = sharding.split(intent)
    changed = intent.frontends[1234]
    fe = changed.model_copy(update={"backends": changed.backends[:2]})
    after = sharding.split(intent.model_copy(update={"frontends": (*intent.frontends[:1234], fe,
                                                                   *intent.frontends[1235:])}))
    differ = {name for name in before.digests if before.digests[name] != after.digests.get(name)}
    assert differ == {sharding.shard_of(changed.service)}
    assert before.manifest != after.manifest


def test_shard_assignment_is_stable() -> None:
    # a fixed function of the Service key: pinned values, so a release that changes it is noticed
    assert sharding.shard_of("default/kubernetes") == sharding.shard_of("default/kubernetes")
    assert [sharding.shard_of(f"bench/svc-{i}") for i in range(3)] == [
        f"s{int.from_bytes(__import__('hashlib').sha256(f'bench/svc-{i}'.encode()).digest()[:8], 'big') % 64:02d}"
        for i in range(3)]
    counts: dict[str, int] = {}
    for i in range(10_000):
        name = sharding.shard_of(f"bench/svc-{i}")
        counts[name] = counts.get(name, 0) + 1
    assert len(counts) == 64 and max(counts.values()) < 2 * 10_000 / 64  # spread evenly


backends = st.lists(st.builds(BackendIntent, address=st.ip_addresses(v=4).map(str), port=st.integers(1, 65535),
                              node=st.sampled_from(["", "node-1", "node-2"])), max_size=4)


@st.composite
def intents(draw: st.DrawFn) -> NodeLBIntent:
    names = draw(st.lists(st.sampled_from([f"ns/s{i}" for i in range(30)]), unique=True, max_size=12))
    frontends: dict[tuple[str, int, str], FrontendIntent] = {}
    health, problems = [], []
    for number, name in enumerate(names):
        for port in draw(st.lists(st.integers(1, 5), unique=True, max_size=3)):
            fe = FrontendIntent(service=name, kind=draw(st.sampled_from(list(FrontendKind))),
                                address=f"10.96.0.{number + 1}", port=port,
                                protocol=draw(st.sampled_from(["TCP", "UDP"])), backends=tuple(draw(backends)),
                                affinity_timeout=draw(st.sampled_from([0, 10800])))
            frontends.setdefault(fe.key, fe)
        if draw(st.booleans()):
            health.append(HealthCheckIntent(service=name, port=31000 + number, local_endpoints=draw(st.integers(0, 3))))
        for reason in draw(st.lists(st.sampled_from(["A", "B"]), unique=True, max_size=2)):
            problems.append(ProblemIntent(service=name, reason=reason, message=f"{reason} of {name}"))
    return NodeLBIntent(node=NODE, frontends=tuple(v for _, v in sorted(frontends.items())),
                        health_checks=tuple(sorted(health, key=lambda h: (h.port, h.service))),
                        problems=tuple(sorted(problems, key=lambda p: p.service)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(intents(), st.sampled_from([1, 3, 64]))
def test_the_union_of_the_shards_is_the_intent(intent: NodeLBIntent, count: int) -> None:
    sharded = sharding.split(intent, count=count)
    assert len(sharded.shards) <= count
    got = sharding.assemble(NODE, {**sharded.shards, sharding.MANIFEST: sharded.manifest})
    assert got == intent
    assert got is not None and got.model_dump() == intent.model_dump()
    for name, raw in sharded.shards.items():  # each Service lives entirely in one shard
        shard = sharding.parse_shard(NODE, name, raw)
        assert all(sharding.shard_of(item.service, count) == name
                   for item in (*shard.frontends, *shard.health_checks, *shard.problems))


def test_an_empty_intent_is_a_manifest_without_shards() -> None:
    sharded = sharding.split(NodeLBIntent(node=NODE))
    assert sharded.shards == {}
    assert sharding.assemble(NODE, {sharding.MANIFEST: sharded.manifest}) == NodeLBIntent(node=NODE)
    assert sharding.assemble(NODE, {}) is None  # no manifest: nothing published (yet)


def test_a_half_written_update_is_never_assembled() -> None:
    services, slices = cluster(200)
    config = ResolverConfig(node_port_range=(30000, 32767))
    old = resolve(services, slices, NODES, config).intents[NODE]
    del services["bench/svc-7"]
    services["bench/svc-new"] = ServiceInfo("bench", "svc-new", type="ClusterIP", cluster_ips=("10.96.0.7",),
                                            ports=(ServicePort("http", "TCP", 80, 8080, None),))
    new = resolve(services, slices, NODES, config).intents[NODE]
    a, b = sharding.split(old), sharding.split(new)
    differ = sorted(n for n in set(a.shards) | set(b.shards) if a.shards.get(n) != b.shards.get(n))
    assert len(differ) == 2  # the deleted Service's shard and the new one's
    assembler = sharding.ShardAssembler(NODE)
    assembler.reset({**a.shards, sharding.MANIFEST: a.manifest})
    assert assembler.current() == old
    assembler.put(differ[0], b.shards[differ[0]])  # first transaction: one shard new, the manifest old
    assert assembler.current() is None
    assembler.put(sharding.MANIFEST, b.manifest)  # manifest new, the other shard still old
    assert assembler.current() is None
    assembler.put(differ[1], b.shards[differ[1]])
    assert assembler.current() == new
    assembler.put("s99", b"stale")  # a key the manifest does not name is ignored
    assert assembler.current() == new


def test_an_unknown_schema_version_or_another_nodes_intent_is_refused() -> None:
    sharded = sharding.split(big_intent_small())
    manifest = json.loads(sharded.manifest)
    values = {**sharded.shards, sharding.MANIFEST: json.dumps({**manifest, "schema_version": 99}).encode()}
    with pytest.raises(LBIntentSchemaError, match="unknown schema version 99"):
        sharding.assemble(NODE, values)
    with pytest.raises(LBIntentSchemaError, match="names node"):
        sharding.assemble("node-2", {**sharded.shards, sharding.MANIFEST: sharded.manifest})
    name, raw = next(iter(sharded.shards.items()))
    bad = zlib.compress(json.dumps({**json.loads(zlib.decompress(raw)), "schema_version": 99}).encode())
    forged = {**sharded.shards, name: bad,
              sharding.MANIFEST: json.dumps({**manifest, "shards": {**manifest["shards"],
                                                                    name: sharding.digest(bad)}}).encode()}
    with pytest.raises(LBIntentSchemaError, match=f"shard {name}: unknown schema version 99"):
        sharding.assemble(NODE, forged)


def big_intent_small() -> NodeLBIntent:
    services, slices = cluster(20)
    return resolve(services, slices, NODES, ResolverConfig(node_port_range=(30000, 32767))).intents[NODE]


def test_batches_respect_the_op_and_size_limits() -> None:
    puts = [(f"s{i:02d}", b"x" * 300_000) for i in range(10)] + [(f"t{i:03d}", b"y") for i in range(250)]
    out = batches(puts)
    assert [p for batch in out for p in batch] == puts  # every put, in order
    assert all(len(batch) <= TXN_MAX_OPS for batch in out)
    assert all(sum(len(raw) for _, raw in batch) <= 1 << 20 for batch in out)
    assert len(out) == 6  # 3 per MiB for the big ones (3+3+3+1), then 250 small ones: 100 per txn


_union_frontend = st.builds(
    lambda a, port, proto, svc: FrontendIntent(service=f"ns/s{svc}", kind=FrontendKind.CLUSTER_IP,
                                               address=f"10.96.0.{a}", port=port, protocol=proto),
    st.integers(1, 4), st.sampled_from([53, 80]), st.sampled_from(["TCP", "UDP"]), st.integers(0, 2))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({name: st.one_of(st.none(), st.lists(_union_frontend, max_size=5))
                                       for name in ("s0", "s1", "s2")}), min_size=1, max_size=6))
def test_the_kept_union_is_the_union_sorted_from_scratch(steps: list[dict]) -> None:
    """``FrontendUnion`` (the assembler's, kept between intents) equals ``union``'s sort of all frontends, for
    shards kept as the very same tuple (None below), replaced by new ones (keys that stay, go, come, move
    between shards) and keys named twice (within a shard or across shards)."""
    kept = sharding.FrontendUnion()
    shards: dict[str, tuple[FrontendIntent, ...]] = {}
    for step in steps:
        shards = {name: shards.get(name, ()) if fes is None else
                  tuple(sorted(fes, key=sharding.frontend_key)) for name, fes in step.items()}
        shards = {name: fes for name, fes in shards.items() if fes}
        got = kept.update(shards)
        want = sharding.union(NODE, [sharding.LBShard.model_construct(
            schema_version=1, node=NODE, shard=name, frontends=fes, health_checks=(), problems=())
            for name, fes in sorted(shards.items())]).frontends
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want, strict=True))
