"""IncrementalResolver against ``resolve`` from scratch: pass after pass, the shards and problems are the same.

Random clusters whose Services fight over frontends (ClusterIPs, ExternalIPs and NodePorts drawn from small
pools), with headless and foreign-proxy Services, headless slices, slices that move between Services, and
nodes that come, go or change their address; each pass keeps, changes, adds and deletes some of them.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliary.operator.services import incremental_resolution, sharding
from ciliary.operator.services.incremental_resolution import IncrementalResolver, Touched
from ciliary.operator.services.inputs import ServiceInfo, ServicePort, SliceEndpoint, SliceInfo, SlicePort
from ciliary.operator.services.resolution import ResolverConfig, resolve

NODES = {"n1": "192.0.2.11", "n2": "192.0.2.12", "n3": "192.0.2.13"}
CONFIG = ResolverConfig(node_port_range=(30000, 30999), max_backends=4)
COUNT = 4  # shards: several Services share one

endpoints = st.builds(
    lambda host, node, ready, serving, terminating: SliceEndpoint(
        (f"10.244.0.{host}",), ready, serving or ready, terminating, node, f"default/p{host}"),
    st.integers(1, 12), st.sampled_from([*NODES, "gone"]), st.booleans(), st.booleans(), st.booleans())


@st.composite
def services(draw: st.DrawFn, name: str) -> ServiceInfo:
    protos = draw(st.lists(st.sampled_from(["TCP", "UDP"]), min_size=1, max_size=2, unique=True))
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    ports = tuple(ServicePort(f"p-{p.lower()}", p, draw(st.sampled_from([80, 443])), 8080,
                              draw(st.sampled_from([30001, 30002, 31500])) if kind != "ClusterIP" else None)
                  for p in protos)
    headless = draw(st.integers(0, 9)) == 0
    return ServiceInfo(
        "default", name, type=kind, headless=headless, ports=ports,
        cluster_ips=() if headless else (f"10.96.0.{draw(st.integers(1, 3))}",),
        external_ips=tuple(draw(st.lists(st.sampled_from(["198.51.100.1", "198.51.100.2"]), max_size=1))),
        load_balancer_ips=("203.0.113.1",) if kind == "LoadBalancer" and draw(st.booleans()) else (),
        internal_traffic_policy=draw(st.sampled_from(["Cluster", "Local"])),
        external_traffic_policy=draw(st.sampled_from(["Cluster", "Local"])),
        health_check_node_port=30900 if draw(st.booleans()) else None,
        proxy_name="other" if draw(st.integers(0, 9)) == 0 else None)


@st.composite
def slices(draw: st.DrawFn, name: str) -> SliceInfo:
    owner = f"s{draw(st.integers(0, 5))}"
    return SliceInfo("default", name, owner,
                     tuple(SlicePort(f"p-{p.lower()}", p, 8080) for p in ("TCP", "UDP")),
                     tuple(draw(st.lists(endpoints, max_size=4, unique_by=lambda e: e.addresses))),
                     headless=draw(st.integers(0, 9)) == 0)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[str, ServiceInfo], dict[str, SliceInfo], dict[str, str | None]]:
    svcs = {f"default/s{i}": draw(services(f"s{i}")) for i in range(6) if draw(st.booleans())}
    sls = {f"default/e{i}": draw(slices(f"e{i}")) for i in range(6) if draw(st.booleans())}
    nodes = dict(NODES) if draw(st.integers(0, 4)) else {"n1": NODES["n1"], "n2": draw(
        st.sampled_from(["192.0.2.22", None])), "n4": "192.0.2.14"}
    return svcs, sls, nodes


def _mix(rnd: random.Random, before: dict, after: dict) -> dict:  # type: ignore[type-arg]
    """Some values kept as the very objects they were, some replaced, some new, some deleted."""
    out = {k: rnd.choice([v, after.get(k, v)]) for k, v in before.items() if rnd.random() < 0.85}
    out.update({k: v for k, v in after.items() if k not in before and rnd.random() < 0.5})
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(clusters(), min_size=2, max_size=5), st.randoms(use_true_random=False))
def test_every_pass_equals_a_resolution_from_scratch(steps: list[tuple[dict[str, ServiceInfo], dict[str, SliceInfo],
                                                                      dict[str, str | None]]],
                                                     rnd: random.Random) -> None:
    resolver = IncrementalResolver(CONFIG, shard_count=COUNT)
    encoded: dict[str, sharding.ShardedIntent] = {}
    svcs, sls, nodes = steps[0]
    for i, step in enumerate(steps):
        touched = None
        if i:
            before_svcs, before_sls = svcs, sls
            svcs, sls = _mix(rnd, svcs, step[0]), _mix(rnd, sls, step[1])
            nodes = step[2] if rnd.random() < 0.3 else nodes
            if rnd.random() < 0.7:  # as the service model tells: the keys set or deleted, and some others
                touched = Touched(
                    {k for k in before_svcs.keys() | svcs.keys() if before_svcs.get(k) is not svcs.get(k)
                     or rnd.random() < 0.2},
                    {k for k in before_sls.keys() | sls.keys() if before_sls.get(k) is not sls.get(k)
                     or rnd.random() < 0.2})
        got = resolver.update(svcs, sls, nodes, touched)
        fresh = resolve(svcs, sls, nodes, CONFIG)
        assert list(got.problems.items()) == sorted(fresh.problems.items())  # Events go out in Service order
        assert {n: dict(b) for n, b in got.shards.items()} == {
            n: sharding.bodies_of(intent, COUNT) for n, intent in fresh.intents.items()}
        for node, bodies in got.shards.items():  # values kept from the last pass: the very bytes from scratch
            reused = sharding.encode(node, bodies, previous=encoded.get(node))
            scratch = sharding.encode(node, bodies)
            assert (reused.shards, reused.digests, reused.manifest) == (scratch.shards, scratch.digests,
                                                                        scratch.manifest)
            encoded[node] = reused
        # nothing changed (told so, or told nothing): the very same bodies
        again = resolver.update(dict(svcs), dict(sls), dict(nodes), rnd.choice([None, Touched(set(), set())]))
        assert again.resolved == 0 and again.rebuilt == 0
        assert all(again.shards[n][s] is b for n, bodies in got.shards.items() for s, b in bodies.items())


def _service(i: int, ip: str = "") -> ServiceInfo:
    return ServiceInfo("default", f"s{i:03d}", cluster_ips=(ip or f"10.96.{i // 250}.{i % 250 + 1}",),
                       ports=(ServicePort("http", "TCP", 80, 8080),))


def test_one_change_resolves_one_service_and_rebuilds_its_shard_on_each_node() -> None:
    svcs = {s.key: s for s in (_service(i) for i in range(500))}
    resolver = IncrementalResolver()
    first = resolver.update(svcs, {}, NODES)
    assert first.resolved == 500
    svcs["default/s007"] = dataclasses.replace(svcs["default/s007"], affinity_timeout=60)
    second = resolver.update(svcs, {}, NODES)
    assert (second.resolved, second.rebuilt) == (1, len(NODES))
    mine = sharding.shard_of("default/s007")
    assert {(n, s) for n, bodies in second.shards.items() for s, b in bodies.items()
            if first.shards[n][s] is not b} == {(n, mine) for n in NODES}
    assert resolver.update(svcs, {}, {**NODES, "n4": "192.0.2.14"}).resolved == 500  # a node joins: from scratch


def test_a_frontend_passes_to_the_next_claimant_when_its_owner_goes() -> None:
    """Two Services on one ClusterIP: the first by name has it, the other a FrontendConflict; once the first is
    deleted the other has it and its problem is gone, though the other itself did not change."""
    svcs = {s.key: s for s in (_service(1, "10.96.9.9"), _service(2, "10.96.9.9"))}
    resolver = IncrementalResolver()
    before = resolver.update(svcs, {}, NODES)
    assert [p.reason for p in before.problems["default/s002"]] == ["FrontendConflict"]
    assert [fe.service for b in before.shards["n1"].values() for fe in b.frontends] == ["default/s001"]
    del svcs["default/s001"]
    after = resolver.update(svcs, {}, NODES)
    assert after.problems == {} and after.resolved == 1
    assert [fe.service for b in after.shards["n1"].values() for fe in b.frontends] == ["default/s002"]


def test_a_pass_that_raises_leaves_the_next_one_to_start_from_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    svcs = {s.key: s for s in (_service(i) for i in range(20))}
    resolver = IncrementalResolver()
    resolver.update(svcs, {}, NODES)
    svcs["default/s003"] = dataclasses.replace(svcs["default/s003"], cluster_ips=("10.96.9.9",))
    real = incremental_resolution.wants_of

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("resolution failed")

    monkeypatch.setattr(incremental_resolution, "wants_of", broken)
    with pytest.raises(RuntimeError):
        resolver.update(svcs, {}, NODES, Touched({"default/s003"}, set()))
    monkeypatch.setattr(incremental_resolution, "wants_of", real)
    svcs["default/s004"] = dataclasses.replace(svcs["default/s004"], affinity_timeout=60)
    after = resolver.update(svcs, {}, NODES, Touched({"default/s004"}, set()))  # s003's touch went with the failure
    assert after.resolved == 20  # nothing the failed pass half-did is trusted: every key checked
    assert {n: dict(b) for n, b in after.shards.items()} == {
        n: sharding.bodies_of(i) for n, i in resolve(svcs, {}, NODES).intents.items()}
