"""Kubernetes NetworkPolicy through the shared pipeline: translation, combination with CNP/CCNP, trace.

Table tests name each construct; a hypothesis property compares resolution +
``tracing.trace`` with an independent reading of the Kubernetes documentation
(``netpol_oracle``) over random policy sets on a 3 x 3 pod model.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from ciliary.operator.api.errors import PolicyInvalidError, PolicyParseError
from ciliary.operator.api.networkpolicy import parse_network_policy
from ciliary.operator.intents import Direction
from ciliary.operator.policy import tracing
from ciliary.operator.policy.netpol_compiling import compile_network_policy
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import ClusterState
from netpol_cases import (
    ORACLE,
    ORACLE_PODS,
    POLICY_SETS,
    WORLD,
    ip_of,
    netpol,
    state_of,
)
from netpol_oracle import allowed


def ours(state: ClusterState, src: str, dst: str, port: int, proto: str) -> bool:
    return tracing.trace(state, ip_of(src), ip_of(dst), port, proto).allowed


POD_A = {"matchLabels": {"pod": "a"}}

# (description, policies, [(src, dst, port, proto, expected)])
CASES: list[tuple[str, list[dict[str, Any]], list[tuple[str, str, int, str, bool]]]] = [
    ("podSelector peers are pods of the policy's namespace",
     [netpol({"podSelector": POD_A, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})],
     [("x/b", "x/a", 80, "TCP", True), ("y/b", "x/a", 80, "TCP", False), ("x/c", "x/a", 80, "TCP", False),
      ("x/c", "x/b", 80, "TCP", True)]),
    ("namespaceSelector peers are every pod of the selected namespaces",
     [netpol({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})],
     [("y/b", "x/a", 80, "TCP", True), ("y/c", "x/a", 81, "UDP", True), ("x/b", "x/a", 80, "TCP", False),
      (WORLD, "x/a", 80, "TCP", False)]),
    ("podSelector and namespaceSelector in one peer are ANDed",
     [netpol({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                                           "podSelector": {"matchLabels": {"pod": "b"}}}]}]})],
     [("y/b", "x/a", 80, "TCP", True), ("y/c", "x/a", 80, "TCP", False), ("x/b", "x/a", 80, "TCP", False)]),
    ("namespaceSelector {} is every pod of every namespace, not the world",
     [netpol({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {}}]}]})],
     [("z/c", "x/a", 80, "TCP", True), ("x/a", "x/a", 80, "TCP", True), (WORLD, "x/a", 80, "TCP", False)]),
    ("ipBlock with except selects outside addresses",
     [netpol({"podSelector": POD_A, "ingress": [{"from": [{"ipBlock": {"cidr": "203.0.113.0/24",
                                                                        "except": ["203.0.113.0/29"]}}]}]})],
     [("203.0.113.9", "x/a", 80, "TCP", True), (WORLD, "x/a", 80, "TCP", False),
      ("198.51.100.1", "x/a", 80, "TCP", False), ("x/b", "x/a", 80, "TCP", False)]),
    ("ports with endPort, protocol default TCP",
     [netpol({"podSelector": POD_A, "ingress": [{"ports": [{"port": 80, "endPort": 81}]}]})],
     [("y/b", "x/a", 80, "TCP", True), ("y/b", "x/a", 81, "TCP", True), ("y/b", "x/a", 82, "TCP", False),
      ("y/b", "x/a", 80, "UDP", False), (WORLD, "x/a", 81, "TCP", True)]),
    ("a named port resolves against the subject on ingress",
     [netpol({"podSelector": POD_A, "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]})],
     [("y/b", "x/a", 81, "UDP", True), ("y/b", "x/a", 80, "UDP", False), ("y/b", "x/a", 81, "TCP", False)]),
    ("a named port resolves against the destination on egress",
     [netpol({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})],
     [("x/a", "y/b", 80, "TCP", True), ("x/a", "y/b", 81, "TCP", False), ("x/a", WORLD, 80, "TCP", False)]),
    ("UDP and SCTP ports",
     [netpol({"podSelector": POD_A, "ingress": [{"ports": [{"port": 80, "protocol": "UDP"},
                                                          {"protocol": "SCTP"}]}]})],
     [("y/b", "x/a", 80, "UDP", True), ("y/b", "x/a", 80, "TCP", False), ("y/b", "x/a", 82, "SCTP", True)]),
    ("policyTypes Egress only leaves ingress open",
     [netpol({"podSelector": POD_A, "policyTypes": ["Egress"],
              "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})],
     [("x/a", "x/b", 80, "TCP", True), ("x/a", "x/c", 80, "TCP", False), ("x/c", "x/a", 80, "TCP", True)]),
    ("empty ingress list denies all ingress",
     [netpol({"podSelector": {}, "ingress": []})],
     [("x/b", "x/a", 80, "TCP", False), ("x/a", "y/b", 80, "TCP", True), (WORLD, "x/a", 80, "TCP", False)]),
    ("no ingress field and no policyTypes denies all ingress",
     [netpol({"podSelector": POD_A})],
     [("x/b", "x/a", 80, "TCP", False), ("x/a", "x/b", 80, "TCP", True)]),
    ("egress: [] without policyTypes governs ingress only",
     [netpol({"podSelector": POD_A, "egress": []})],
     [("x/a", "x/b", 80, "TCP", True), ("x/b", "x/a", 80, "TCP", False)]),
    ("egress rules ignored when policyTypes names Ingress only",
     [netpol({"podSelector": POD_A, "policyTypes": ["Ingress"], "ingress": [{}],
              "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})],
     [("x/a", "x/c", 80, "TCP", True), ("y/c", "x/a", 80, "TCP", True)]),
    ("empty egress list with policyTypes Egress denies all egress",
     [netpol({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": []})],
     [("x/a", "x/b", 80, "TCP", False), ("x/a", WORLD, 80, "TCP", False), ("x/b", "x/a", 80, "TCP", True)]),
    ("an empty rule (no from, no ports) allows everything",
     [netpol({"podSelector": POD_A, "ingress": [{}]})],
     [("z/c", "x/a", 9, "UDP", True), (WORLD, "x/a", 1, "TCP", True)]),
    ("allows add up across NetworkPolicies of one namespace",
     [netpol({"podSelector": POD_A, "ingress": [{"ports": [{"port": 80}]}]}, name="one"),
      netpol({"podSelector": POD_A, "ingress": [{"ports": [{"port": 81}]}]}, name="two")],
     [("y/b", "x/a", 80, "TCP", True), ("y/b", "x/a", 81, "TCP", True), ("y/b", "x/a", 82, "TCP", False)]),
    ("a policy in another namespace does not select the pod",
     [netpol({"podSelector": POD_A, "ingress": []}, ns="y")],
     [("x/b", "x/a", 80, "TCP", True), ("x/b", "y/a", 80, "TCP", False)]),
]


@pytest.mark.parametrize(("description", "policies", "checks"), CASES, ids=[c[0] for c in CASES])
def test_netpol_construct(description: str, policies: list[dict[str, Any]],
                          checks: list[tuple[str, str, int, str, bool]]) -> None:
    state = state_of(*policies)
    for src, dst, port, proto, expected in checks:
        assert ours(state, src, dst, port, proto) is expected, (description, src, dst, port, proto)
        oracle = allowed(policies, ORACLE, ip_of(src), ip_of(dst), port, proto)
        assert oracle is expected, ("oracle", description, src, dst, port, proto)


def cnp(spec: dict[str, Any], *, name: str = "c", ns: str = "x") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-cnp-{ns}-{name}"}, "spec": spec}


def test_allows_add_up_across_netpol_and_cnp_and_either_makes_default_deny() -> None:
    np_ = netpol({"podSelector": POD_A, "ingress": [{"ports": [{"port": 80}]}]})
    c = cnp({"endpointSelector": {"matchLabels": {"pod": "a"}},
             "ingress": [{"toPorts": [{"ports": [{"port": "81", "protocol": "TCP"}]}]}]})
    both = state_of(np_, c)
    assert ours(both, "y/b", "x/a", 80, "TCP") and ours(both, "y/b", "x/a", 81, "TCP")
    assert not ours(both, "y/b", "x/a", 82, "TCP")
    only_cnp = state_of(c)
    assert not ours(only_cnp, "y/b", "x/a", 80, "TCP")
    # a CNP egress section selects x/a for egress; the NetworkPolicy does not widen it
    egress_cnp = cnp({"endpointSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"toEndpoints": [{}]}]})
    mixed = state_of(np_, egress_cnp)
    assert ours(mixed, "x/a", "x/b", 80, "TCP") and not ours(mixed, "x/a", "y/b", 80, "TCP")


def test_cnp_deny_beats_netpol_allow() -> None:
    np_ = netpol({"podSelector": POD_A, "ingress": [{}]})
    deny = cnp({"endpointSelector": {"matchLabels": {"pod": "a"}},
                "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}]})
    state = state_of(np_, deny)
    assert not ours(state, "x/b", "x/a", 80, "TCP") and ours(state, "x/c", "x/a", 80, "TCP")


def test_trace_names_the_networkpolicy_rule() -> None:
    state = state_of(netpol({"podSelector": POD_A, "ingress": [{"ports": [{"port": 81}]}, {"ports": [{"port": 80}]}]},
                            name="web"))
    result = tracing.trace(state, ip_of("y/b"), ip_of("x/a"), 80, "TCP")
    assert result.ingress is not None
    assert [r.describe() for r in result.ingress.rules] == ["NetworkPolicy x/web rule 0 ingress[1]"]
    assert "NetworkPolicy x/web rule 0 ingress[1]" in result.describe()
    denied = tracing.trace(state, ip_of("y/b"), ip_of("x/a"), 82, "TCP")
    assert denied.ingress is not None and denied.ingress.reason == "default-deny"


def test_compiled_rule_shape() -> None:
    policy = parse_network_policy(netpol({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": []}))
    (rule,) = compile_network_policy(policy)
    assert rule.has(Direction.INGRESS) and rule.has(Direction.EGRESS)
    assert rule.default_deny(Direction.INGRESS) and rule.default_deny(Direction.EGRESS)
    assert rule.ingress == () and rule.egress == ()
    assert rule.policy.kind == "NetworkPolicy" and rule.policy.namespace == "x"


def test_ipv6_ipblock_selects_nothing_never_everything() -> None:
    state = state_of(netpol({"podSelector": POD_A, "ingress": [{"from": [{"ipBlock": {"cidr": "2001:db8::/32"}}]}]}))
    assert not ours(state, WORLD, "x/a", 80, "TCP")
    assert not ours(state, "x/b", "x/a", 80, "TCP")


def test_ipblock_does_not_match_pods_in_range() -> None:
    """Ciliary (like Cilium) matches pods by labels only; upstream's e2e reads ipBlock as matching pod IPs."""
    body = netpol({"podSelector": POD_A, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]})
    state = state_of(body)
    assert not ours(state, "x/b", "x/a", 80, "TCP")
    assert allowed([body], ORACLE, ip_of("x/b"), ip_of("x/a"), 80, "TCP", ipblock_matches_pods=True)


@pytest.mark.parametrize(("spec", "needle"), [
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "must specify a peer"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]},
     "is not a prefix within"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "may not be combined"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "endPort 80 must be in"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}, "needs a numeric port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}, "out of range"),
])
def test_invalid_networkpolicy_is_refused_and_repository_unchanged(spec: dict[str, Any], needle: str) -> None:
    repo = PolicyRepository()
    with pytest.raises(PolicyInvalidError, match=needle):
        repo.upsert(parse_network_policy(netpol(spec)))
    assert len(repo) == 0 and repo.revision == 0


@pytest.mark.parametrize("spec", [
    {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]},
    {"podSelector": {}, "ingress": [{"from": [{"serviceSelector": {}}]}]},
    {"ingress": []},
])
def test_unknown_or_unsupported_shapes_do_not_parse(spec: dict[str, Any]) -> None:
    with pytest.raises(PolicyParseError):
        parse_network_policy(netpol(spec))


# ------------------------------------------------------------------ property: oracle vs resolution + trace

ENDPOINTS = [f"{p.namespace}/{p.name}" for p in ORACLE_PODS]
PROBES = [(80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP"), (82, "SCTP")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(POLICY_SETS)
def test_resolution_agrees_with_kubernetes_reading(policies: tuple[dict[str, Any], ...]) -> None:
    from ciliary.operator.policy.resolution import resolve_cluster

    intents = resolve_cluster(state_of(*policies))
    sources = [*ENDPOINTS, WORLD, "203.0.113.3"]
    for src in sources:
        for dst in [*ENDPOINTS, WORLD]:
            if src == dst or ("/" not in src and "/" not in dst):
                continue
            for port, proto in PROBES:
                want = allowed(list(policies), ORACLE, ip_of(src), ip_of(dst), port, proto)
                got = tracing.trace(intents, ip_of(src), ip_of(dst), port, proto).allowed
                assert got is want, (src, dst, port, proto)
                # never wider than upstream's reading either (it also matches pod addresses by ipBlock)
                assert not got or allowed(list(policies), ORACLE, ip_of(src), ip_of(dst), port, proto,
                                          ipblock_matches_pods=True), (src, dst, port, proto)


@pytest.mark.parametrize("expression", [
    {"key": "statefulset.kubernetes.io/pod-name", "operator": "DoesNotExist"},
    {"key": "pod-template-hash", "operator": "NotIn", "values": ["x"]},
    {"key": "statefulset.kubernetes.io/pod-name", "operator": "In", "values": ["a"]},
])
def test_selectors_on_labels_identities_lack_match_no_pod_never_every_pod(expression: dict[str, Any]) -> None:
    peer = state_of(netpol({"podSelector": POD_A, "ingress": [{"from": [{"podSelector": {
        "matchExpressions": [expression]}}]}]}))
    assert not ours(peer, "x/b", "x/a", 80, "TCP") and not ours(peer, "x/c", "x/a", 80, "TCP")
    subject = state_of(netpol({"podSelector": {"matchExpressions": [expression]}, "ingress": []}))
    assert ours(subject, "x/b", "x/a", 80, "TCP")  # restricts no pod; netpol_support reports it


def test_a_status_from_the_server_is_accepted_and_ignored() -> None:
    body = netpol({"podSelector": {}, "ingress": []})
    body["status"] = {"conditions": [{"type": "PolicyAccepted", "status": "True"}], "future": 1}
    assert parse_network_policy(body).spec.effective_policy_types() == {"Ingress"}


def test_trace_names_the_kind_of_entry_that_matched() -> None:
    """Hubble's match type in the trace: a NetworkPolicy port for any peer is l4-only, a peer without ports
    l3-only (as e2e/test_netpol_explained.py expects of ``from-pod-b``), a peer and a port l3-l4."""
    cases = (({"ingress": [{"ports": [{"port": 80}]}]}, "l4-only"),
             ({"ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}, "l3-only"),
             ({"ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]},
              "l3-l4"))
    for spec, kind in cases:
        state = state_of(netpol({"podSelector": POD_A, **spec}, name="web"))
        result = tracing.trace(state, ip_of("x/b"), ip_of("x/a"), 80, "TCP")
        assert result.ingress is not None and result.ingress.match == kind, (spec, result.describe())
        assert f"; matched {kind})" in result.describe()
    denied = tracing.trace(state, ip_of("y/b"), ip_of("x/a"), 80, "TCP")
    assert denied.ingress is not None and denied.ingress.match == "" and "matched" not in denied.describe()
