"""Table tests: CNP/CCNP semantics, end to end through resolution and ``tracing.trace``."""

from __future__ import annotations

from typing import Any

import pytest

from ciliary.operator.api.policies import parse_policy
from ciliary.operator.intents import Protocol, Verdict
from ciliary.operator.policy import tracing
from ciliary.operator.policy.identities import InMemoryIdentityAllocator, Reserved
from ciliary.operator.policy.inputs import ContainerPort, NamespaceInfo, NodeInfo, PodInfo
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import ClusterState, Resolver, resolve_cluster

NODES = {"n1": NodeInfo("n1", "192.168.0.1", "10.0.1.0/24"), "n2": NodeInfo("n2", "192.168.0.2", "10.0.2.0/24")}
NAMESPACES = {"a": NamespaceInfo("a", {"team": "red"}), "b": NamespaceInfo("b", {"team": "blue"})}
PODS = [
    PodInfo("a", "web", "u-a-web", "n1", "10.0.1.1", {"app": "web", "env": "prod", "pod-template-hash": "x1"}),
    PodInfo(
        "a", "db", "u-a-db", "n2", "10.0.2.1", {"app": "db"},
        container_ports=(ContainerPort("pg", 5432), ContainerPort("dns", 53, "UDP")),
    ),
    PodInfo("b", "web", "u-b-web", "n2", "10.0.2.2", {"app": "web"}),
    PodInfo("a", "cli", "u-a-cli", "n1", "10.0.1.2", {"app": "cli"}, service_account="client"),
    PodInfo("b", "db", "u-b-db", "n1", "10.0.1.3", {"app": "db"}, container_ports=(ContainerPort("pg", 6432),)),
]


def cnp(spec: dict[str, Any] | None = None, *, name: str = "p", ns: str = "a", specs: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}"},
    }
    if spec is not None:
        body["spec"] = spec
    if specs is not None:
        body["specs"] = specs
    return body


def ccnp(spec: dict[str, Any], *, name: str = "c") -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": spec,
    }


def state_of(*bodies: dict[str, Any], pods: list[PodInfo] | None = None) -> ClusterState:
    repo = PolicyRepository()
    for body in bodies:
        repo.upsert(parse_policy(body))
    return ClusterState(repo.snapshot(), {p.uid: p for p in pods or PODS}, NAMESPACES, NODES)


def verdict(state: ClusterState, src: str, dst: str, port: int, proto: str = "TCP") -> bool:
    return tracing.trace(state, src, dst, port, proto).allowed


def sel(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


DB = sel(app="db")
WEB = sel(app="web")


# (description, policies, [(src, dst, port, proto, expected)])
CASES: list[tuple[str, list[dict[str, Any]], list[tuple[str, str, int, str, bool]]]] = [
    (
        "CNP selectors are scoped to the policy namespace",
        [cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB]}]})],
        [("a/web", "a/db", 5432, "TCP", True), ("b/web", "a/db", 5432, "TCP", False),
         ("b/web", "b/db", 5432, "TCP", True), ("a/cli", "a/db", 5432, "TCP", False)],
    ),
    (
        "CNP endpointSelector naming another namespace is overridden",
        [cnp({"endpointSelector": {"matchLabels": {"app": "db", "k8s:io.kubernetes.pod.namespace": "b"}},
              "ingress": [{"fromEndpoints": [WEB]}]})],
        [("b/web", "b/db", 5432, "TCP", True), ("a/cli", "a/db", 1, "TCP", False)],
    ),
    (
        "CNP peer naming a namespace crosses namespaces",
        [cnp({"endpointSelector": DB,
              "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web", "io.kubernetes.pod.namespace": "b"}}]}]})],
        [("b/web", "a/db", 5432, "TCP", True), ("a/web", "a/db", 5432, "TCP", False)],
    ),
    (
        "CNP fromEndpoints [{}] is every pod of the namespace, not world nor other namespaces",
        [cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [{}]}]})],
        [("a/web", "a/db", 1, "UDP", True), ("a/cli", "a/db", 80, "TCP", True),
         ("b/web", "a/db", 80, "TCP", False), ("8.8.8.8", "a/db", 80, "TCP", False)],
    ),
    (
        "CCNP fromEndpoints [{}] is every pod of every namespace, never world",
        [ccnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [{}]}]})],
        [("a/web", "a/db", 80, "TCP", True), ("b/web", "a/db", 80, "TCP", True),
         ("b/web", "b/db", 80, "TCP", True), ("8.8.8.8", "a/db", 80, "TCP", False),
         ("192.168.0.1", "a/db", 80, "TCP", False)],
    ),
    (
        "CCNP endpointSelector {} selects pods of every namespace",
        [ccnp({"endpointSelector": {}, "egress": [{"toEndpoints": [DB]}]})],
        [("a/web", "a/db", 5432, "TCP", True), ("b/web", "a/cli", 80, "TCP", False),
         ("a/cli", "b/db", 80, "TCP", True)],
    ),
    (
        "namespace labels and service accounts select peers",
        [cnp({"endpointSelector": DB, "ingress": [
            {"fromEndpoints": [{"matchLabels": {"io.cilium.k8s.namespace.labels.team": "blue"}}]},
            {"fromEndpoints": [{"matchLabels": {"io.cilium.k8s.policy.serviceaccount": "client"}}]},
        ]})],
        [("b/web", "a/db", 80, "TCP", True), ("a/cli", "a/db", 80, "TCP", True), ("a/web", "a/db", 80, "TCP", False)],
    ),
    (
        "matchExpressions with source prefixes",
        [cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [{"matchExpressions": [
            {"key": "k8s:app", "operator": "In", "values": ["web", "cli"]},
            {"key": "any:env", "operator": "DoesNotExist"}]}]}]})],
        [("a/cli", "a/db", 80, "TCP", True), ("a/web", "a/db", 80, "TCP", False)],
    ),
    (
        "deny beats allow, across policies",
        [ccnp({"endpointSelector": DB, "ingress": [{"fromEntities": ["cluster"]}]}),
         cnp({"endpointSelector": DB, "ingressDeny": [{"fromEndpoints": [WEB]}]})],
        [("a/web", "a/db", 5432, "TCP", False), ("a/cli", "a/db", 5432, "TCP", True),
         ("b/web", "a/db", 5432, "TCP", True)],
    ),
    (
        "L4 deny beats L3 allow on that port only",
        [cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB]}],
              "ingressDeny": [{"toPorts": [{"ports": [{"port": "22", "protocol": "TCP"}]}]}]})],
        [("a/web", "a/db", 22, "TCP", False), ("a/web", "a/db", 23, "TCP", True), ("a/web", "a/db", 22, "UDP", True)],
    ),
    (
        "default deny is per direction",
        [cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB]}]})],
        [("a/db", "b/web", 80, "TCP", True), ("a/db", "8.8.8.8", 443, "TCP", True)],
    ),
    (
        "ingress [{}] denies all ingress",
        [cnp({"endpointSelector": DB, "ingress": [{}]})],
        [("a/web", "a/db", 5432, "TCP", False), ("8.8.8.8", "a/db", 5432, "TCP", False),
         ("a/db", "a/web", 80, "TCP", True)],
    ),
    (
        "a deny rule alone puts the endpoint into default deny",
        [cnp({"endpointSelector": DB, "ingressDeny": [{"fromEndpoints": [WEB]}]})],
        [("a/cli", "a/db", 80, "TCP", False)],
    ),
    (
        "enableDefaultDeny false keeps other traffic allowed but denies still bite",
        [cnp({"endpointSelector": DB, "enableDefaultDeny": {"ingress": False},
              "ingressDeny": [{"fromEndpoints": [WEB]}]})],
        [("a/cli", "a/db", 80, "TCP", True), ("a/web", "a/db", 80, "TCP", False)],
    ),
    (
        "enableDefaultDeny false with only allows does not enforce",
        [cnp({"endpointSelector": DB, "enableDefaultDeny": {"ingress": False},
              "ingress": [{"fromEndpoints": [WEB]}]})],
        [("a/cli", "a/db", 80, "TCP", True)],
    ),
    (
        "L3-only allows every port and protocol, ICMP included",
        [cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB]}]})],
        [("a/web", "a/db", 1, "TCP", True), ("a/web", "a/db", 65535, "UDP", True),
         ("a/web", "a/db", 8, "ICMP", True), ("a/web", "a/db", 9, "SCTP", True)],
    ),
    (
        "L4-only allows that port from any peer, world included",
        [cnp({"endpointSelector": DB, "ingress": [{"toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]})],
        [("8.8.8.8", "a/db", 5432, "TCP", True), ("b/web", "a/db", 5432, "TCP", True),
         ("a/web", "a/db", 5433, "TCP", False), ("a/web", "a/db", 5432, "UDP", False)],
    ),
    (
        "L3+L4 needs both",
        [cnp({"endpointSelector": DB, "ingress": [
            {"fromEndpoints": [WEB], "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]})],
        [("a/web", "a/db", 5432, "TCP", True), ("a/web", "a/db", 80, "TCP", False),
         ("a/cli", "a/db", 5432, "TCP", False)],
    ),
    (
        "endPort gives an inclusive range",
        [cnp({"endpointSelector": DB, "ingress": [
            {"toPorts": [{"ports": [{"port": "8000", "endPort": 8010, "protocol": "TCP"}]}]}]})],
        [("a/web", "a/db", 8000, "TCP", True), ("a/web", "a/db", 8010, "TCP", True),
         ("a/web", "a/db", 8011, "TCP", False), ("a/web", "a/db", 7999, "TCP", False)],
    ),
    (
        "protocol ANY is TCP, UDP and SCTP, not ICMP",
        [cnp({"endpointSelector": DB, "ingress": [{"toPorts": [{"ports": [{"port": "53"}]}]}]})],
        [("a/web", "a/db", 53, "TCP", True), ("a/web", "a/db", 53, "UDP", True),
         ("a/web", "a/db", 53, "SCTP", True), ("a/web", "a/db", 53, "ICMP", False)],
    ),
    (
        "named ports resolve against the destination pod on ingress",
        [ccnp({"endpointSelector": DB, "ingress": [{"toPorts": [{"ports": [{"port": "pg"}]}]}]})],
        [("a/web", "a/db", 5432, "TCP", True), ("a/web", "b/db", 6432, "TCP", True),
         ("a/web", "b/db", 5432, "TCP", False), ("a/web", "a/db", 5432, "UDP", False)],
    ),
    (
        "named ports resolve against each peer on egress; unknown names give nothing",
        [ccnp({"endpointSelector": WEB, "egress": [
            {"toEndpoints": [DB], "toPorts": [{"ports": [{"port": "pg", "protocol": "TCP"},
                                                         {"port": "nope", "protocol": "TCP"}]}]}]})],
        [("a/web", "a/db", 5432, "TCP", True), ("a/web", "b/db", 6432, "TCP", True),
         ("a/web", "b/db", 5432, "TCP", False), ("b/web", "a/db", 6432, "TCP", False)],
    ),
    (
        "entities world, host, remote-node",
        [cnp({"endpointSelector": DB, "egress": [{"toEntities": ["world"]}],
              "ingress": [{"fromEntities": ["remote-node"]}]})],
        [("a/db", "8.8.8.8", 443, "TCP", True), ("a/db", "a/web", 80, "TCP", False),
         ("192.168.0.1", "a/db", 22, "TCP", True), ("192.168.0.2", "a/db", 22, "TCP", True)],
    ),
    (
        "entity cluster is every pod and the nodes, not world",
        [cnp({"endpointSelector": DB, "egress": [{"toEntities": ["cluster"]}]})],
        [("a/db", "b/web", 80, "TCP", True), ("a/db", "192.168.0.1", 10250, "TCP", True),
         ("a/db", "8.8.8.8", 443, "TCP", False)],
    ),
    (
        "entity all is everything",
        [cnp({"endpointSelector": DB, "egress": [{"toEntities": ["all"]}]})],
        [("a/db", "8.8.8.8", 443, "TCP", True), ("a/db", "b/web", 1, "UDP", True)],
    ),
    (
        "CIDR with except: longest prefix wins",
        [cnp({"endpointSelector": DB, "egress": [
            {"toCIDRSet": [{"cidr": "172.16.0.0/12", "except": ["172.20.0.0/16"]}]},
            {"toCIDR": ["172.20.5.0/24"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]})],
        [("a/db", "172.16.0.1", 80, "TCP", True), ("a/db", "172.20.1.1", 80, "TCP", False),
         ("a/db", "172.20.5.9", 443, "TCP", True), ("a/db", "172.20.5.9", 80, "TCP", False),
         ("a/db", "8.8.8.8", 80, "TCP", False)],
    ),
    (
        "CIDR rules never match pods or nodes inside the prefix",
        [cnp({"endpointSelector": DB, "egress": [{"toCIDR": ["10.0.0.0/8", "192.168.0.0/16"]}]})],
        [("a/db", "10.0.1.1", 80, "TCP", False), ("a/db", "10.9.9.9", 80, "TCP", True),
         ("a/db", "192.168.0.1", 80, "TCP", False)],
    ),
    (
        "world entity covers CIDR identities",
        [cnp({"endpointSelector": DB, "egress": [{"toEntities": ["world"]}]}),
         cnp({"endpointSelector": WEB, "egress": [{"toCIDR": ["1.2.3.0/24"]}]}, name="q")],
        [("a/db", "1.2.3.4", 80, "TCP", True), ("a/web", "1.2.3.4", 80, "TCP", True),
         ("a/web", "1.2.4.4", 80, "TCP", False)],
    ),
    (
        "fromRequires constrains fromEndpoints of every rule selecting the endpoint",
        [ccnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [{}]}]}),
         cnp({"endpointSelector": DB, "ingress": [{"fromRequires": [{"matchLabels": {"env": "prod"}}]}]}, name="r")],
        [("a/web", "a/db", 80, "TCP", True), ("a/cli", "a/db", 80, "TCP", False),
         ("b/web", "a/db", 80, "TCP", False), ("b/web", "b/db", 80, "TCP", True)],
    ),
    (
        "fromRequires does not constrain entities",
        [cnp({"endpointSelector": DB, "ingress": [
            {"fromRequires": [{"matchLabels": {"env": "prod"}}]}, {"fromEntities": ["world"]}]})],
        [("8.8.8.8", "a/db", 80, "TCP", True), ("a/cli", "a/db", 80, "TCP", False)],
    ),
    (
        "ICMP rules allow only their types",
        [cnp({"endpointSelector": DB, "ingress": [
            {"fromEndpoints": [WEB], "icmps": [{"fields": [{"type": 8, "family": "IPv4"}]}]},
            {"fromEndpoints": [sel(app="cli")], "icmps": [{"fields": [{"type": "EchoReply"}]}]}]})],
        [("a/web", "a/db", 8, "ICMP", True), ("a/web", "a/db", 0, "ICMP", False),
         ("a/web", "a/db", 8, "TCP", False), ("a/cli", "a/db", 0, "ICMP", True)],
    ),
    (
        "the local host may always reach an enforced endpoint",
        [cnp({"endpointSelector": DB, "ingress": [{}]})],
        [("192.168.0.2", "a/db", 8080, "TCP", True), ("192.168.0.1", "a/db", 8080, "TCP", False)],
    ),
    (
        "toServices and toFQDNs are not enforced yet: they allow nothing but enforce",
        [cnp({"endpointSelector": DB, "egress": [{"toFQDNs": [{"matchName": "example.com"}]}]})],
        [("a/db", "8.8.8.8", 443, "TCP", False)],
    ),
]


@pytest.mark.parametrize(("policies", "probes"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_semantics(policies: list[dict[str, Any]], probes: list[tuple[str, str, int, str, bool]]) -> None:
    state = state_of(*policies)
    intents = resolve_cluster(state)
    for src, dst, port, proto, expected in probes:
        result = tracing.trace(intents, src, dst, port, proto)
        assert result.allowed is expected, f"{src} -> {dst} {port}/{proto}:\n{result.describe()}"


def test_l7_rule_gives_a_redirect_entry_on_its_port() -> None:
    state = state_of(cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB], "toPorts": [
        {"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}}]}]}))
    intents = resolve_cluster(state)
    db = next(e for e in intents["n2"].endpoints if e.pod == "db" and e.namespace == "a")
    entries = [e for e in db.ingress.entries if e.port_low == 80]
    assert [(e.protocol, e.l7_redirect, e.verdict) for e in entries] == [(Protocol.TCP, True, Verdict.ALLOW)]
    assert verdict(state, "a/web", "a/db", 80) and not verdict(state, "a/web", "a/db", 81)


def test_l4_allow_wins_over_l7_on_the_same_entry() -> None:
    port = {"ports": [{"port": "80", "protocol": "TCP"}]}
    state = state_of(cnp({"endpointSelector": DB, "ingress": [
        {"toPorts": [{**port, "rules": {"http": [{}]}}]}, {"toPorts": [port]}]}))
    db = next(e for e in resolve_cluster(state)["n2"].endpoints if e.pod == "db")
    assert [e.l7_redirect for e in db.ingress.entries if e.port_low == 80] == [False]


def test_trace_names_the_deciding_rule() -> None:
    state = state_of(
        cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB]}]}, name="allow"),
        cnp({"endpointSelector": DB, "ingressDeny": [{"toPorts": [{"ports": [{"port": "22"}]}]}]}, name="deny"),
    )
    allowed = tracing.trace(state, "a/web", "a/db", 80, "TCP")
    assert allowed.ingress is not None and allowed.egress is not None
    assert allowed.egress.reason == "not-enforced"
    assert [(r.name, r.rule_index, r.section) for r in allowed.ingress.rules] == [("allow", 0, "ingress[0]")]
    denied = tracing.trace(state, "a/web", "a/db", 22, "TCP")
    assert denied.ingress is not None and denied.ingress.reason == "denied-by-rule"
    assert [(r.name, r.section) for r in denied.ingress.rules] == [("deny", "ingressDeny[0]")]
    default = tracing.trace(state, "a/cli", "a/db", 80, "TCP")
    assert default.ingress is not None and default.ingress.reason == "default-deny"
    assert "default deny" in default.describe()
    with pytest.raises(tracing.TraceError):
        tracing.trace(state, "a/nope", "a/db", 80, "TCP")


def test_specs_rule_index_and_union() -> None:
    state = state_of(cnp(
        {"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB]}]},
        specs=[{"endpointSelector": DB, "ingress": [{"fromEndpoints": [sel(app="cli")]}]}],
    ))
    result = tracing.trace(state, "a/cli", "a/db", 80, "TCP")
    assert result.allowed and result.ingress is not None
    assert [r.rule_index for r in result.ingress.rules] == [1]


def test_ipcache_maps_pods_nodes_and_cidrs() -> None:
    state = state_of(cnp({"endpointSelector": DB, "egress": [
        {"toCIDRSet": [{"cidr": "172.16.0.0/12", "except": ["172.20.0.0/16"]}]}]}))
    intents = resolve_cluster(state)
    table = {e.cidr: e.identity for e in intents["n1"].ipcache}
    assert table["192.168.0.1/32"] == Reserved.HOST and table["192.168.0.2/32"] == Reserved.REMOTE_NODE
    other = {e.cidr: e.identity for e in intents["n2"].ipcache}
    assert other["192.168.0.1/32"] == Reserved.REMOTE_NODE and other["192.168.0.2/32"] == Reserved.HOST
    assert table["172.16.0.0/12"] >= 16777217 and table["172.20.0.0/16"] >= 16777217
    assert table["172.16.0.0/12"] != table["172.20.0.0/16"]
    assert table["10.0.1.1/32"] == next(e.identity for e in intents["n1"].endpoints if e.uid == "u-a-web")
    assert intents["n1"].identity_labels[table["172.16.0.0/12"]] == ("cidr:172.16.0.0/12=", "reserved:world=")


def test_policies_refs_list_only_local_selecting_policies() -> None:
    state = state_of(cnp({"endpointSelector": sel(app="cli"), "ingress": [{}]}))
    intents = resolve_cluster(state)
    assert [p.name for p in intents["n1"].policies] == ["p"]
    assert intents["n2"].policies == ()


def test_incremental_matches_full_after_relabel_and_policy_edit() -> None:
    allocator = InMemoryIdentityAllocator()
    resolver = Resolver(allocator)
    first = state_of(cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB]}]}))
    resolver.update(first)
    relabelled = [
        PodInfo(p.namespace, p.name, p.uid, p.node, p.ipv4, {"app": "cli"}, p.service_account, p.container_ports)
        if p.uid == "u-a-web" else p
        for p in PODS
    ]
    second = ClusterState(first.policies, {p.uid: p for p in relabelled}, NAMESPACES, NODES)
    result = resolver.update(second)
    full = resolve_cluster(second, allocator)
    assert {n: i.content_hash() for n, i in result.intents.items()} == {n: i.content_hash() for n, i in full.items()}
    assert not verdict(second, "a/web", "a/db", 80)
    repo = PolicyRepository()
    repo.upsert(parse_policy(cnp({"endpointSelector": sel(app="cli"), "ingress": [{}]})))
    third = ClusterState(repo.snapshot(), second.pods, NAMESPACES, NODES)
    result = resolver.update(third)
    assert result.revision == 1
    assert {n: i.content_hash() for n, i in result.intents.items()} == {
        n: i.content_hash() for n, i in resolve_cluster(third, allocator).items()
    }


def test_namespace_relabel_changes_identities() -> None:
    resolver = Resolver()
    policy = cnp({"endpointSelector": DB, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"io.cilium.k8s.namespace.labels.team": "green"}}]}]})
    first = state_of(policy)
    resolver.update(first)
    assert not verdict(first, "b/web", "a/db", 80)
    namespaces = {**NAMESPACES, "b": NamespaceInfo("b", {"team": "green"})}
    second = ClusterState(first.policies, first.pods, namespaces, NODES)
    result = resolver.update(second)
    assert tracing.trace(result, "b/web", "a/db", 80).allowed
    assert tracing.trace(result, "b/web", "a/db", 80).allowed == verdict(second, "b/web", "a/db", 80)


def test_unchanged_state_changes_nothing() -> None:
    resolver = Resolver()
    state = state_of(cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB]}]}))
    first = resolver.update(state)
    assert first.changed == {"n1", "n2"}
    again = resolver.update(state)
    assert again.changed == frozenset() and again.removed == frozenset()
    fewer = ClusterState(state.policies, state.pods, NAMESPACES, {"n1": NODES["n1"]})
    gone = resolver.update(fewer)
    assert gone.removed == {"n2"} and set(gone.intents) == {"n1"}
