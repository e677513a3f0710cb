"""Selection, identities and the repository: the building blocks of resolution."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.operator.api.errors import PolicyInvalidError
from ciliary.operator.api.policies import parse_policy
from ciliary.operator.api.selectors import LabelSelector
from ciliary.operator.policy import identities, selection
from ciliary.operator.policy.inputs import NamespaceInfo, PodInfo
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.selection import Label, LabelSet, SelectionIndex, Selector


def labels(**pairs: str) -> LabelSet:
    return LabelSet(Label("k8s", k.replace("_", "."), v) for k, v in pairs.items())


def api(data: dict[str, Any]) -> Selector:
    return selection.from_api(LabelSelector.model_validate(data))


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, True),
        ({"matchLabels": {"app": "web"}}, True),
        ({"matchLabels": {"k8s:app": "web"}}, True),
        ({"matchLabels": {"any:app": "web"}}, True),
        ({"matchLabels": {"reserved:app": "web"}}, False),
        ({"matchLabels": {"app": "db"}}, False),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db", "web"]}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, True),
        ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}, False),
    ],
)
def test_selector_matching(selector: dict[str, Any], expected: bool) -> None:
    assert api(selector).matches(labels(app="web", env="prod")) is expected


def test_keys_split_on_the_first_colon_only() -> None:
    assert selection.parse_key("k8s:app.kubernetes.io/name") == ("k8s", "app.kubernetes.io/name")
    assert selection.parse_key("app") == ("any", "app")
    assert selection.parse_key("cidr:10.0.0.0/8") == ("cidr", "10.0.0.0/8")


def test_namespace_scoping() -> None:
    empty = Selector()
    assert selection.scope_subject(empty, "a").matches(labels(io_kubernetes_pod_namespace="a"))
    assert not selection.scope_subject(empty, "a").matches(labels(io_kubernetes_pod_namespace="b"))
    other = api({"matchLabels": {"k8s:io.kubernetes.pod.namespace": "b"}})
    assert selection.scope_subject(other, "a") == selection.scope_subject(empty, "a")
    assert selection.scope_subject(empty, "") == empty
    assert selection.scope_peer(other, "a") == other
    host = api({"matchLabels": {"reserved:host": ""}})
    assert selection.scope_peer(host, "a") == host and selection.scope_peer(host, "") == host
    world = LabelSet([Label("reserved", "world", "")])
    assert not selection.scope_peer(empty, "").matches(world)
    assert selection.scope_peer(empty, "").matches(labels(io_kubernetes_pod_namespace="z"))


@settings(max_examples=200, deadline=None)
@given(
    sets=st.lists(st.dictionaries(st.sampled_from(["app", "env", "tier"]), st.sampled_from(["x", "y"])), max_size=8),
    reqs=st.lists(
        st.tuples(st.sampled_from(["app", "env", "k8s:tier", "reserved:app"]),
                  st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
                  st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=2, unique=True)),
        max_size=3,
    ),
)
def test_index_selection_equals_a_full_scan(sets: list[dict[str, str]], reqs: list[tuple[str, str, list[str]]]) -> None:
    index = SelectionIndex()
    for i, pairs in enumerate(sets):
        index.add(i, labels(**pairs))
    index.remove(0)
    selector = api({"matchExpressions": [
        {"key": k, "operator": op, **({"values": v} if op in ("In", "NotIn") else {})} for k, op, v in reqs
    ]})
    expected = {i for i, pairs in enumerate(sets) if i != 0 and selector.matches(labels(**pairs))}
    assert index.select(selector) == expected


def test_pod_identity_labels() -> None:
    pod = PodInfo("a", "web-1", "u1", labels={
        "app": "web", "pod-template-hash": "abc", "controller-revision-hash": "r",
        "statefulset.kubernetes.io/pod-name": "web-1", "app.kubernetes.io/name": "web",
    }, service_account="sa")
    got = identities.pod_labels(pod, NamespaceInfo("a", {"team": "red"}), "c1")
    assert got.strings() == (
        "k8s:app=web",
        "k8s:app.kubernetes.io/name=web",
        "k8s:io.cilium.k8s.namespace.labels.team=red",
        "k8s:io.cilium.k8s.policy.cluster=c1",
        "k8s:io.cilium.k8s.policy.serviceaccount=sa",
        "k8s:io.kubernetes.pod.namespace=a",
    )
    twin = PodInfo("a", "web-2", "u2", labels={"app": "web", "pod-template-hash": "zzz",
                                               "app.kubernetes.io/name": "web"}, service_account="sa")
    assert identities.digest(identities.pod_labels(twin, NamespaceInfo("a", {"team": "red"}), "c1")) == \
        identities.digest(got)
    assert identities.canonical(got).endswith("k8s:io.kubernetes.pod.namespace=a;")


def test_reserved_numbers_and_entities() -> None:
    assert [int(r) for r in identities.Reserved] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert identities.RESERVED_LABELS[6].strings() == ("reserved:remote-node=",)
    assert identities.entity_identities("all", pod_identities=[256], cidr_identities=[]) is None
    assert identities.entity_identities("world", pod_identities=[256], cidr_identities=[16777217]) == {2, 16777217}
    cluster = identities.entity_identities("cluster", pod_identities=[256], cidr_identities=[16777217])
    assert cluster == {1, 3, 4, 5, 6, 7, 8, 256}
    assert identities.entity_identities("none", pod_identities=[256], cidr_identities=[]) == set()


def test_in_memory_allocator() -> None:
    allocator = identities.InMemoryIdentityAllocator()
    web, db = labels(app="web"), labels(app="db")
    assert allocator.allocate(web) == identities.MIN_CLUSTER_IDENTITY == 256
    assert allocator.allocate(db) == 257 and allocator.allocate(web) == 256
    allocator.release(web)
    assert allocator.allocate(labels(app="x")) == 258
    small = identities.InMemoryIdentityAllocator(first=256, last=256)
    small.allocate(web)
    with pytest.raises(identities.IdentityExhaustedError):
        small.allocate(db)


def test_cidr_identities_are_local_and_stable() -> None:
    net = ipaddress.IPv4Network
    first = identities.assign_cidr_identities([net("10.0.0.0/8"), net("0.0.0.0/0")], {})
    assert identities.FIRST_CIDR_IDENTITY == 16777217
    assert first == {net("10.0.0.0/8"): 16777217}
    second = identities.assign_cidr_identities([net("1.0.0.0/8"), net("10.0.0.0/8")], first)
    assert second[net("10.0.0.0/8")] == 16777217 and second[net("1.0.0.0/8")] == 16777218
    assert identities.is_cidr_identity(16777218) and not identities.is_cidr_identity(65535)


def body(spec: dict[str, Any], name: str = "p", generation: int = 1) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "a", "uid": f"uid-{name}", "generation": generation},
            "spec": spec}


def test_repository_revisions_and_validity() -> None:
    repo = PolicyRepository()
    good: dict[str, Any] = {"endpointSelector": {}, "ingress": [{}]}
    assert repo.upsert(parse_policy(body(good))) == 1
    assert repo.upsert(parse_policy(body(good))) == 1
    assert repo.upsert(parse_policy(body(good, generation=2))) == 2
    snapshot = repo.snapshot()
    bad = {"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.0/8"], "toPorts": [
        {"ports": [{"port": "80", "endPort": 70, "protocol": "TCP"}]}]}]}
    with pytest.raises(PolicyInvalidError):
        repo.upsert(parse_policy(body(bad)))
    assert repo.revision == 2 and repo.snapshot() is snapshot and len(repo) == 1
    assert repo.upsert(parse_policy(body(good, name="q"))) == 3
    assert repo.delete("uid-p") == 4 and repo.delete("uid-p") == 4
    assert "uid-q" in repo and [r.policy.name for r in repo.snapshot().rules()] == ["q"]
    assert snapshot.revision == 2 and set(snapshot.policies) == {"uid-p"}
