"""Named ports: which container ports a port name stands for, per direction and peer kind.

On ingress a name resolves against the subject endpoint's own container ports;
on egress against the container ports of the destination, per destination
identity, whatever selected the destination (``toEndpoints``, ``toEntities:
[all|cluster]``, an L4-only item). Non-pod destinations (world, CIDRs, host,
remote nodes) have no named ports. A name mapping to different numbers on
different destinations gives one entry per destination identity, never the
cross product.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from ciliary.operator.api.policies import parse_policy
from ciliary.operator.intents import ANY_IDENTITY, EndpointIntent, NodeIntent, Protocol, Verdict
from ciliary.operator.policy import tracing
from ciliary.operator.policy.identities import InMemoryIdentityAllocator
from ciliary.operator.policy.inputs import ContainerPort, NamespaceInfo, NodeInfo, PodInfo
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import ClusterState, Resolver, resolve_cluster

NODES = {"n1": NodeInfo("n1", "192.168.0.1"), "n2": NodeInfo("n2", "192.168.0.2")}
NAMESPACES = {"a": NamespaceInfo("a"), "b": NamespaceInfo("b")}
PODS = [
    PodInfo("a", "web", "u-a-web", "n1", "10.0.1.1", {"app": "web"}, container_ports=(ContainerPort("http", 8080),)),
    PodInfo("b", "web", "u-b-web", "n2", "10.0.2.2", {"app": "web"}),
    PodInfo(
        "a", "db", "u-a-db", "n2", "10.0.2.1", {"app": "db"},
        container_ports=(ContainerPort("pg", 5432), ContainerPort("dns", 53, "UDP")),
    ),
    PodInfo("b", "db", "u-b-db", "n1", "10.0.1.3", {"app": "db"}, container_ports=(ContainerPort("pg", 6432),)),
]
WEB = {"matchLabels": {"app": "web"}}
DB = {"matchLabels": {"app": "db"}}
NAMED = [{"ports": [{"port": "dns", "protocol": "UDP"}, {"port": "pg", "protocol": "TCP"}]}]


def ccnp(spec: dict[str, Any], name: str = "c") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": name, "uid": f"uid-{name}"}, "spec": spec}


def state_of(*bodies: dict[str, Any], pods: list[PodInfo] | None = None) -> ClusterState:
    repo = PolicyRepository()
    for body in bodies:
        repo.upsert(parse_policy(body))
    return ClusterState(repo.snapshot(), {p.uid: p for p in pods or PODS}, NAMESPACES, NODES)


def endpoint(intents: dict[str, NodeIntent] | Any, ns: str, pod: str) -> EndpointIntent:
    return next(e for i in intents.values() for e in i.endpoints if e.namespace == ns and e.pod == pod)


# (description, policy spec, [(src, dst, port, proto, expected)])
CASES: list[tuple[str, dict[str, Any], list[tuple[str, str, int, str, bool]]]] = [
    (
        "toEntities all: each destination's own named ports, nothing to pods without them or to world",
        {"endpointSelector": WEB, "egress": [{"toEntities": ["all"], "toPorts": NAMED}]},
        [("a/web", "a/db", 53, "UDP", True), ("a/web", "a/db", 5432, "TCP", True),
         ("a/web", "b/db", 6432, "TCP", True), ("a/web", "b/web", 53, "UDP", False),
         ("a/web", "a/db", 6432, "TCP", False), ("a/web", "b/db", 5432, "TCP", False),
         ("a/web", "b/db", 53, "UDP", False), ("a/web", "8.8.8.8", 53, "UDP", False),
         ("a/web", "192.168.0.1", 53, "UDP", False)],
    ),
    (
        "L4-only egress item: the same, per destination",
        {"endpointSelector": WEB, "egress": [{"toPorts": NAMED}]},
        [("a/web", "a/db", 53, "UDP", True), ("a/web", "b/db", 6432, "TCP", True),
         ("a/web", "b/web", 53, "UDP", False), ("a/web", "a/db", 6432, "TCP", False),
         ("a/web", "8.8.8.8", 53, "UDP", False)],
    ),
    (
        "toEntities all keeps numeric ports for every peer next to per-destination named ports",
        {"endpointSelector": WEB, "egress": [
            {"toEntities": ["all"], "toPorts": [{"ports": [{"port": "dns", "protocol": "UDP"}, {"port": "443"}]}]}]},
        [("a/web", "8.8.8.8", 443, "TCP", True), ("a/web", "b/web", 443, "UDP", True),
         ("a/web", "a/db", 53, "UDP", True), ("a/web", "8.8.8.8", 53, "UDP", False)],
    ),
    (
        "toEntities cluster: pods' own named ports, none for the nodes",
        {"endpointSelector": WEB, "egress": [{"toEntities": ["cluster"], "toPorts": NAMED}]},
        [("a/web", "a/db", 53, "UDP", True), ("a/web", "b/web", 53, "UDP", False),
         ("a/web", "192.168.0.1", 53, "UDP", False), ("a/web", "192.168.0.2", 5432, "TCP", False)],
    ),
    (
        "toCIDR and toEntities world: non-pod peers have no named ports",
        {"endpointSelector": WEB, "egress": [{"toCIDR": ["0.0.0.0/0"], "toPorts": NAMED},
                                             {"toEntities": ["world"], "toPorts": NAMED}]},
        [("a/web", "8.8.8.8", 53, "UDP", False), ("a/web", "8.8.8.8", 5432, "TCP", False)],
    ),
    (
        "egressDeny with toEntities all and a named port denies it only where the destination declares it",
        {"endpointSelector": WEB, "egress": [{"toEntities": ["all"]}],
         "egressDeny": [{"toEntities": ["all"], "toPorts": NAMED}]},
        [("a/web", "a/db", 53, "UDP", False), ("a/web", "b/web", 53, "UDP", True),
         ("a/web", "b/db", 5432, "TCP", True), ("a/web", "b/db", 6432, "TCP", False),
         ("a/web", "8.8.8.8", 53, "UDP", True)],
    ),
    (
        "ingress from any peer: the subject's own named ports",
        {"endpointSelector": DB, "ingress": [{"fromEntities": ["all"], "toPorts": NAMED}]},
        [("8.8.8.8", "a/db", 5432, "TCP", True), ("a/web", "a/db", 53, "UDP", True),
         ("a/web", "b/db", 6432, "TCP", True), ("a/web", "b/db", 5432, "TCP", False),
         ("a/web", "b/db", 53, "UDP", False)],
    ),
]


@pytest.mark.parametrize(("description", "spec", "checks"), CASES, ids=[c[0] for c in CASES])
def test_named_port_semantics(
    description: str, spec: dict[str, Any], checks: list[tuple[str, str, int, str, bool]]
) -> None:
    state = state_of(ccnp(spec))
    for src, dst, port, proto, expected in checks:
        got = tracing.trace(state, src, dst, port, proto)
        assert got.allowed is expected, f"{description}: {src} -> {dst} {proto}/{port}\n{got.describe()}"


def test_any_peer_named_port_gives_per_destination_entries() -> None:
    """The datapath gets (destination identity, port) pairs: no identity-0 named entry, no cross product."""
    intents = resolve_cluster(state_of(ccnp({"endpointSelector": WEB, "egress": [
        {"toEntities": ["all"], "toPorts": [{"ports": [{"port": "pg", "protocol": "TCP"}, {"port": "80"}]}]}]})))
    a_db, b_db = endpoint(intents, "a", "db").identity, endpoint(intents, "b", "db").identity
    web = endpoint(intents, "a", "web")
    got = sorted((e.identity, e.protocol, e.port_low, e.port_high) for e in web.egress.entries)
    assert got == sorted([
        (ANY_IDENTITY, Protocol.TCP, 80, 80), (ANY_IDENTITY, Protocol.UDP, 80, 80),
        (ANY_IDENTITY, Protocol.SCTP, 80, 80), (a_db, Protocol.TCP, 5432, 5432), (b_db, Protocol.TCP, 6432, 6432),
    ])
    assert all(e.verdict is Verdict.ALLOW for e in web.egress.entries)


def test_any_peer_named_port_follows_pods_gaining_and_losing_the_port() -> None:
    allocator = InMemoryIdentityAllocator()
    resolver = Resolver(allocator)
    first = state_of(ccnp({"endpointSelector": WEB, "egress": [{"toEntities": ["all"], "toPorts": NAMED}]}))
    assert not tracing.trace(resolver.update(first), "a/web", "b/web", 53, "UDP").allowed
    gained = {**first.pods, "u-b-web": replace(first.pods["u-b-web"], container_ports=(ContainerPort("dns", 53, "UDP"),))}
    second = replace(first, pods=gained)
    result = resolver.update(second)
    assert tracing.trace(result, "a/web", "b/web", 53, "UDP").allowed
    assert {n: i.content_hash() for n, i in result.intents.items()} == {
        n: i.content_hash() for n, i in resolve_cluster(second, allocator).items()
    }
    lost = {uid: p for uid, p in first.pods.items() if uid != "u-a-db"}
    third = replace(first, pods=lost)
    result = resolver.update(third)
    assert not tracing.trace(result, "a/web", "b/web", 53, "UDP").allowed
    web = endpoint(result.intents, "a", "web")
    assert not any(e.port_low == 53 for e in web.egress.entries)
    assert {n: i.content_hash() for n, i in result.intents.items()} == {
        n: i.content_hash() for n, i in resolve_cluster(third, allocator).items()
    }
