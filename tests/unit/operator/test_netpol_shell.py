"""NetworkPolicy in the operator shell: ingest, gaps, enforcement Events, and the CLI listing (pure parts)."""

from __future__ import annotations

from typing import Any

from ciliary.cli import policy_listing
from ciliary.operator.api.networkpolicy import parse_network_policy
from ciliary.operator.intents import NodeIntent, PolicyRef
from ciliary.operator.kube.cluster_model import ClusterModel
from ciliary.operator.kube.handlers import ingest_policy, valid_condition
from ciliary.operator.policy import netpol_support
from ciliary.operator.policy.inputs import NodeInfo
from ciliary.operator.status import enforcement, netpol_events
from ciliary.operator.status.enforcement import Expectation, PolicyView
from ciliary.operator.status.reports import PolicyReport


def body(spec: dict[str, Any], *, name: str = "np", generation: int = 1) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "x", "uid": f"uid-{name}", "generation": generation},
            "spec": spec}


def test_ingest_records_valid_networkpolicy_and_refuses_invalid_keeping_previous() -> None:
    model = ClusterModel()
    outcome = ingest_policy(model, body({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}))
    assert outcome.problems == [] and outcome.enforced_version == "current" and outcome.gaps == ()
    assert "uid-np" in model.repository
    revision = model.repository.revision
    bad = ingest_policy(model, body({"podSelector": {}, "ingress": [{"from": [{}]}]}, generation=2))
    assert bad.problems and bad.enforced_version == "previous"
    assert model.repository.revision == revision
    condition = valid_condition(body({"podSelector": {}}, generation=2), bad)
    assert condition["status"] == "False" and "last valid version stays enforced" in condition["message"]
    unparsable = ingest_policy(ClusterModel(), body({"podSelector": {}, "ingress": [{"from": [{"x": 1}]}]}))
    assert unparsable.problems and unparsable.enforced_version == "none"


def test_gaps_name_what_is_not_enforced_exactly() -> None:
    policy = parse_network_policy(body({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [
        {"from": [{"ipBlock": {"cidr": "2001:db8::/32"}}, {"ipBlock": {"cidr": "10.0.0.0/8"}},
                  {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/16"]}},
                  {"ipBlock": {"cidr": "203.0.113.0/24"}}]},
        {"ports": [{"port": 80}]}], "egress": [{"to": [{"namespaceSelector": {}}]}]}))
    found = {(g.path, g.feature.key) for g in netpol_support.netpol_gaps(policy, ["10.0.1.0/24", "10.1.0.0/24"])}
    assert found == {("spec.ingress[0].from[0].ipBlock", "np-ipBlock-ipv6"),
                     ("spec.ingress[0].from[1].ipBlock", "np-ipBlock-pods"),
                     ("spec.ingress[0].from[2].ipBlock", "np-ipBlock-pods"),  # 10.1.0.0/24 is not excepted
                     ("spec.ingress[1].from", "np-all-peers")}
    exact = parse_network_policy(body({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}))
    assert netpol_support.netpol_gaps(exact, ["10.0.1.0/24"]) == ()


def test_model_ingest_uses_node_pod_cidrs_for_gaps() -> None:
    model = ClusterModel()
    model.set_node("n1", NodeInfo("n1", "192.168.0.1", "10.0.1.0/24"))
    outcome = ingest_policy(model, body({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}))
    assert [g.feature.key for g in outcome.gaps] == ["np-ipBlock-pods"]
    assert "pods are matched by their labels only" in outcome.unenforced


def report(node: str, *, generation: int = 1, enforcing: bool = True, error: str = "") -> PolicyReport:
    return PolicyReport(node=node, policy_uid="uid-np", kind="NetworkPolicy", namespace="x", name="np",
                        generation=generation, ok=not error, enforcing=enforcing, error=error,
                        last_updated="2026-01-01T00:00:00Z", local_policy_revision=5)


def view(status: dict[str, Any] | None = None) -> PolicyView:
    return PolicyView(uid="uid-np", kind="NetworkPolicy", namespace="x", name="np", generation=1,
                      resource_version="7", status=status or {})


def test_enforcement_events_say_each_change_once() -> None:
    expected = {"n1": Expectation(1), "n2": Expectation(1)}
    half = enforcement.desired_status(view(), expected, {"n1": report("n1")})
    said = netpol_events.enforcement_event(view(), half)
    assert said is not None and said[:2] == ("Normal", "PolicyRollingOut") and said[2].startswith("1/2 nodes")
    done = enforcement.desired_status(view(), expected, {"n1": report("n1"), "n2": report("n2")})
    said = netpol_events.enforcement_event(view(), done)
    assert said is not None and said[:2] == ("Normal", "PolicyEnforced")
    patch = enforcement.status_patch(view(), done)
    assert patch is not None
    held = view(enforcement.apply_merge_patch({}, patch["status"]))
    assert netpol_events.enforcement_event(held, done) is None
    failed = enforcement.desired_status(held, expected, {"n1": report("n1"), "n2": report("n2", error="map full")})
    said = netpol_events.enforcement_event(held, failed)
    assert said is not None and said[:2] == ("Warning", "PolicyNotEnforced") and "n2 (error)" in said[2]
    partial = enforcement.desired_status(view(), expected, {"n1": report("n1"), "n2": report("n2")},
                                         unenforced="spec.ingress[0].from: IPv6 dropped")
    said = netpol_events.enforcement_event(view(), partial)
    assert said is not None and said[:2] == ("Warning", "PolicyNotEnforced") and "PartiallyEnforced" in said[2]
    event = netpol_events.event_body(view(), "NetworkPolicy", "networking.k8s.io/v1", *said)
    assert event["involvedObject"] == {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "name": "np",
                                       "namespace": "x", "uid": "uid-np"}
    assert event["metadata"]["namespace"] == "x" and event["type"] == "Warning"


def test_listing_summarises_enforcement_per_networkpolicy() -> None:
    ref = PolicyRef(kind="NetworkPolicy", namespace="x", name="np", uid="uid-np", generation=1)
    cnp = PolicyRef(kind="CiliumNetworkPolicy", namespace="x", name="c", uid="uid-c", generation=1)
    intents = {n: NodeIntent(node=n, revision=5, policies=(ref, cnp)) for n in ("n1", "n2", "n3")}
    reports = {("uid-np", "n1"): report("n1"), ("uid-np", "n2"): report("n2", generation=0),
               ("uid-np", "n3"): report("n3", error="verifier")}
    (row,) = policy_listing.summarise(intents, reports, "NetworkPolicy")
    assert row.enforcement == "1/3 nodes" and row.enforcing == ("n1",)
    assert dict(row.problems) == {"n2": "at generation 0", "n3": "error"}
    assert "NetworkPolicy" in policy_listing.render([row]) and "n3 (error)" in policy_listing.render([row])
    assert len(policy_listing.summarise(intents, reports)) == 2


def test_readme_carries_the_networkpolicy_table() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert netpol_support.render_table() in readme


def test_unrepresentable_label_keys_are_reported() -> None:
    policy = parse_network_policy(body({"podSelector": {"matchLabels": {"statefulset.kubernetes.io/pod-name": "w-0"}},
                                        "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                                            {"key": "pod-template-hash", "operator": "DoesNotExist"}]}},
                                            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]}))
    found = {(g.path, g.feature.key) for g in netpol_support.netpol_gaps(policy)}
    assert found == {("spec.podSelector", "np-unrepresentable-label"),
                     ("spec.ingress[0].from[0].podSelector", "np-unrepresentable-label")}


def test_policy_get_takes_exactly_one_of_node_and_kind(capsys: Any) -> None:
    from ciliary.cli import main

    assert main.main(["policy", "get"]) == 1
    assert "exactly one of --node NODE and --kind KIND" in capsys.readouterr().err
    assert main.main(["policy", "get", "--node", "n1", "--kind", "NetworkPolicy"]) == 1
    capsys.readouterr()
    assert main.main(["policy", "get", "--node", "n1", "-o", "table", "--etcd-endpoints", "https://127.0.0.1:1"]) == 1
    assert "-o table is for --kind listings" in capsys.readouterr().err
