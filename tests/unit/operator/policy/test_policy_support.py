"""Every row of the feature -> enforcement table (``policy.support``), as the policy's status shows it.

Each row has at least one policy using its construct; the policy goes through the
operator's own path (``handlers.ingest_policy``: parse, validate, repository,
gaps) and the status core (``enforcement.enforced_condition`` with every node
reporting it enforced). ``enforced`` rows must read ``Enforced=True``;
``partial`` rows ``Enforced=False``/``PartiallyEnforced`` naming the field, with
a valid policy; ``refused`` rows ``Valid=False`` (or a parse error: the CRD
schema refuses them). A row without an example fails the completeness test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ciliary.operator.api import parse_policy
from ciliary.operator.kube.cluster_model import ClusterModel
from ciliary.operator.kube.handlers import ingest_policy, valid_condition
from ciliary.operator.policy import support
from ciliary.operator.policy.identities import Reserved
from ciliary.operator.policy.inputs import NamespaceInfo, NodeInfo, PodInfo
from ciliary.operator.policy.repository import PolicyRepository
from ciliary.operator.policy.resolution import ClusterState, resolve_cluster
from ciliary.operator.status import enforcement
from ciliary.operator.status.enforcement import Expectation, PolicyView
from ciliary.operator.status.reports import PolicyReport

ROOT = Path(__file__).resolve().parents[4]
CNP, CCNP = "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"
APP = {"matchLabels": {"app": "a"}}
PORT80 = {"ports": [{"port": "80", "protocol": "TCP"}]}


def body(spec: dict[str, Any], kind: str = CNP) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "uid": "uid-p", "generation": 3}
    if kind == CNP:
        meta["namespace"] = "ns"
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, "spec": spec}


def ingress(**item: Any) -> dict[str, Any]:
    return {"endpointSelector": APP, "ingress": [item]}


def egress(**item: Any) -> dict[str, Any]:
    return {"endpointSelector": APP, "egress": [item]}


def l7(rules: dict[str, Any], direction: str = "ingress", port: str = "80", proto: str = "TCP") -> dict[str, Any]:
    return {"endpointSelector": APP,
            direction: [{"toPorts": [{"ports": [{"port": port, "protocol": proto}], "rules": rules}]}]}


# (row key, example spec, kind, the field path the status must name for a partial row)
EXAMPLES: list[tuple[str, dict[str, Any], str, str]] = [
    ("endpointSelector", ingress(fromEndpoints=[{}]), CNP, ""),
    ("endpointSelector", {"endpointSelector": {}, "egress": [{"toEndpoints": [{}]}]}, CCNP, ""),
    ("directions", {"endpointSelector": APP, "ingress": [{}], "egress": [{}], "ingressDeny": [{}],
                    "egressDeny": [{}]}, CNP, ""),
    ("enableDefaultDeny", {**egress(toEntities=["world-ipv4"]), "enableDefaultDeny": {"egress": True}}, CNP, ""),
    ("endpoints", ingress(fromEndpoints=[{"matchExpressions": [{"key": "x", "operator": "Exists"}]}]), CNP, ""),
    ("endpoints", egress(toEndpoints=[{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "other"}}]), CNP, ""),
    ("requires", ingress(fromEndpoints=[{}], fromRequires=[{"matchLabels": {"env": "prod"}}]), CNP, ""),
    ("requires", egress(toEndpoints=[{}], toRequires=[{"matchLabels": {"env": "prod"}}]), CNP, ""),
    ("cidr", ingress(fromCIDR=["192.0.2.0/24"]), CNP, ""),
    ("cidr", egress(toCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}], toCIDR=["1.1.1.1"]), CNP, ""),
    ("entities", ingress(fromEntities=["world-ipv4", "cluster", "host", "remote-node",
                                       "health", "init", "ingress", "none"]), CNP, ""),
    ("entities", {"endpointSelector": APP, "ingressDeny": [{"fromEntities": ["all"]}],
                  "egressDeny": [{"toEntities": ["world"]}]}, CNP, ""),
    ("ipv6-allowed", egress(toEntities=["world"], toPorts=[PORT80]), CNP, "spec.egress[0].toEntities[0]"),
    ("ipv6-allowed", ingress(fromEntities=["cluster", "all"]), CNP, "spec.ingress[0].fromEntities[1]"),
    ("ipv6-allowed", {**egress(toEntities=["world-ipv4"]), "enableDefaultDeny": {"egress": False}}, CNP,
     "spec.enableDefaultDeny.egress"),
    ("ports", ingress(toPorts=[{"ports": [{"port": "80", "protocol": "TCP"}, {"port": "8000", "endPort": 8100},
                                          {"port": "http", "protocol": "TCP"}, {"port": "9", "protocol": "SCTP"},
                                          {"port": "53", "protocol": "UDP"}, {"port": "0", "protocol": "ANY"}]}]),
     CNP, ""),
    ("icmps", ingress(fromEndpoints=[{}], icmps=[{"fields": [{"type": 8}, {"type": "EchoReply", "family": "IPv4"}]}]),
     CNP, ""),
    ("metadata", {**ingress(fromEndpoints=[{}]), "description": "d", "labels": [{"key": "k", "value": "v"}]},
     CNP, ""),
    ("nodeSelector", {"nodeSelector": {"matchLabels": {"role": "worker"}}, "ingress": [{"fromCIDR": ["10.0.0.0/8"]}]},
     CCNP, "spec.nodeSelector"),
    ("toServices", egress(toServices=[{"k8sService": {"serviceName": "db", "namespace": "ns"}}]), CNP,
     "spec.egress[0].toServices"),
    ("toServices", {"endpointSelector": APP, "egressDeny": [
        {"toServices": [{"k8sServiceSelector": {"selector": {"matchLabels": {"t": "db"}}}}]}]}, CNP,
     "spec.egressDeny[0].toServices"),
    ("toFQDNs", egress(toFQDNs=[{"matchName": "example.com"}, {"matchPattern": "*.example.com"}],
                       toPorts=[PORT80]), CNP, ""),
    ("http", l7({"http": [{"method": "POST", "path": "/v1/request-landing"}]}), CNP, ""),
    ("http", l7({"http": [{}, {"host": "a[.]io", "headers": ["X-A", "X-B: 1"]}]}), CNP, ""),
    ("http-egress", l7({"http": [{}]}, direction="egress"), CNP, ""),
    ("http-tls-egress", egress(toPorts=[{"ports": [{"port": "443", "protocol": "TCP"}], "rules": {"http": [{}]},
                                         "terminatingTLS": {"secret": {"name": "s"}},
                                         "originatingTLS": {"secret": {"name": "ca"}},
                                         "serverNames": ["api.world.test"]}]), CNP, ""),
    ("http-egress", l7({"http": [{"method": "GET", "path": "/v1/.*", "headers": ["X-A"]}]}, direction="egress"),
     CNP, ""),
    ("http-tls-ingress", ingress(toPorts=[{**PORT80, "rules": {"http": [{}]},
                                           "terminatingTLS": {"secret": {"name": "s"}}}]), CNP, ""),
    ("http-tls-ingress", ingress(toPorts=[{**PORT80, "rules": {"http": [{}]}, "terminatingTLS": {"secret": {
        "name": "s"}}, "originatingTLS": {"secret": {"name": "ca"}}, "serverNames": ["a.io"]}]), CNP, ""),
    ("http-tls", ingress(toPorts=[{**PORT80, "rules": {"http": [{}]}, "originatingTLS": {"secret": {"name": "ca"}}}]),
     CNP, "spec.ingress[0].toPorts[0].rules.http"),
    ("http-tls", ingress(toPorts=[{**PORT80, "rules": {"http": [{}]}, "serverNames": ["a.io"]}]),
     CNP, "spec.ingress[0].toPorts[0].rules.http"),
    ("http-tls", egress(toPorts=[{**PORT80, "rules": {"http": [{}]}, "terminatingTLS": {"secret": {"name": "s"}}}]),
     CNP, "spec.egress[0].toPorts[0].rules.http"),
    ("http-tls", egress(toPorts=[{**PORT80, "rules": {"http": [{}]}, "serverNames": ["a.io"]}]),
     CNP, "spec.egress[0].toPorts[0].rules.http"),
    ("headerMatches", l7({"http": [{"headerMatches": [{"name": "x-token", "value": "s", "mismatch": "REPLACE"}]}]}),
     CNP, ""),
    ("headerMatches", l7({"http": [{"headerMatches": [{"name": "X-Mode", "value": "fast"}, {"name": "X-Trace"},
                                                      {"name": "x-a", "value": "1", "mismatch": "LOG"}]}]},
                         direction="egress"), CNP, ""),
    ("headerMatches-secret", l7({"http": [{"headerMatches": [{"name": "x-token", "secret": {"name": "s"}}]}]}),
     CNP, ""),
    ("headerMatches-secret", l7({"http": [{"headerMatches": [{"name": "x-a", "value": "1"}, {
        "name": "x-token", "value": "v", "secret": {"name": "s"}, "mismatch": "REPLACE"}]}]}, direction="egress"),
     CNP, ""),
    ("headerMatches-secret", l7({"http": [{"headerMatches": [{"name": "x-token", "secret": {
        "namespace": "vault", "name": "s"}, "mismatch": "REPLACE"}]}]}, direction="egress"), CCNP, ""),
    ("headerMatches-secret", l7({"http": [{"headerMatches": [{"name": "x-token", "secret": {
        "namespace": "ns", "name": "s"}}]}]}), CNP, ""),  # its own namespace, written out
    ("foreign-secret", l7({"http": [{"headerMatches": [{"name": "x-token", "secret": {
        "namespace": "kube-system", "name": "s"}, "mismatch": "REPLACE"}]}]}, direction="egress"), CNP,
     "spec.egress[0].toPorts[0]"),
    ("foreign-secret", ingress(toPorts=[{**PORT80, "rules": {"http": [{}]}, "terminatingTLS": {"secret": {
        "namespace": "other", "name": "s"}}}]), CNP, "spec.ingress[0].toPorts[0]"),  # TLS material too
    ("foreign-secret", egress(toPorts=[{"ports": [{"port": "443", "protocol": "TCP"}], "rules": {"http": [{}]},
                                        "terminatingTLS": {"secret": {"name": "s"}},
                                        "originatingTLS": {"secret": {"namespace": "kube-system", "name": "ca"}}}]),
     CNP, "spec.egress[0].toPorts[0]"),  # as Cilium's guide writes it: not here
    ("http-tls-ingress", ingress(toPorts=[{**PORT80, "rules": {"http": [{}]}, "terminatingTLS": {"secret": {
        "namespace": "other", "name": "s"}}}]), CCNP, ""),  # a cluster-wide policy may name any namespace
    ("kafka", l7({"kafka": [{"role": "produce", "topic": "t"}]}, port="9092"), CNP,
     "spec.ingress[0].toPorts[0].rules.kafka"),
    ("dns", l7({"dns": [{"matchPattern": "*"}, {"matchName": "api.world.test"}]}, direction="egress", port="53",
                proto="UDP"), CNP, ""),
    ("l7proto", l7({"l7proto": "cassandra", "l7": [{"query_action": "select"}]}), CNP,
     "spec.ingress[0].toPorts[0].rules.l7proto"),
    ("tls", egress(toPorts=[{"ports": [{"port": "443", "protocol": "TCP"}],
                             "terminatingTLS": {"secret": {"name": "s"}}}]), CNP,
     "spec.egress[0].toPorts[0].terminatingTLS"),
    ("tls", egress(toPorts=[{"ports": [{"port": "443", "protocol": "TCP"}],
                             "originatingTLS": {"secret": {"name": "ca"}}}]), CNP,
     "spec.egress[0].toPorts[0].originatingTLS"),
    ("serverNames", egress(toPorts=[{"ports": [{"port": "443", "protocol": "TCP"}], "serverNames": ["a.io"]}]),
     CNP, "spec.egress[0].toPorts[0].serverNames"),
    ("ipv6-cidr", ingress(fromCIDR=["2001:db8::/32"], toPorts=[PORT80]), CNP, "spec.ingress[0].fromCIDR[0]"),
    ("ipv6-cidr", {"endpointSelector": APP, "egressDeny": [{"toCIDRSet": [{"cidr": "2001:db8::/32"}]}]}, CNP,
     "spec.egressDeny[0].toCIDRSet[0]"),
    ("ipv6-icmp", ingress(fromEndpoints=[{}], icmps=[{"fields": [{"type": "EchoRequest", "family": "IPv6"}]}]),
     CNP, "spec.ingress[0].icmps[0].fields[0]"),
    ("ipv6-icmp", ingress(fromEndpoints=[{}], icmps=[{"fields": [{"type": "NeighborSolicitation"}]}]),
     CNP, "spec.ingress[0].icmps[0].fields[0]"),
    ("unresolved-entities", egress(toEntities=["kube-apiserver"]), CNP, "spec.egress[0].toEntities[0]"),
    ("unresolved-entities", ingress(fromEntities=["world-ipv4", "unmanaged"]), CNP,
     "spec.ingress[0].fromEntities[1]"),
    ("unresolved-entities", egress(toEntities=["world-ipv6"]), CNP, "spec.egress[0].toEntities[0]"),
    ("unrepresentable-label", {"endpointSelector": {"matchExpressions": [
        {"key": "k8s:statefulset.kubernetes.io/pod-name", "operator": "NotIn", "values": ["db-0"]}]},
        "ingress": [{"fromEndpoints": [{}]}]}, CNP, "spec.endpointSelector"),
    ("unrepresentable-label", ingress(fromEndpoints=[{}, {"matchLabels": {"pod-template-hash": "abc"}}]), CNP,
     "spec.ingress[0].fromEndpoints[1]"),
    ("unrepresentable-label", egress(toEndpoints=[APP], toRequires=[{"matchExpressions": [
        {"key": "any:kubernetes.io/hostname", "operator": "DoesNotExist"}]}]), CNP, "spec.egress[0].toRequires[0]"),
    ("nodeSelector-in-cnp", {"nodeSelector": {}, "ingress": [{}]}, CNP, ""),
    ("l7-in-deny", {"endpointSelector": APP, "ingressDeny": [{"toPorts": [{**PORT80, "rules": {"http": [{}]}}]}]},
     CNP, ""),
    ("l7-in-deny", {"endpointSelector": APP, "egressDeny": [{"toPorts": [{**PORT80, "serverNames": ["a"]}]}]},
     CNP, ""),
    ("l7-in-deny", {"endpointSelector": APP, "egressDeny": [{"toFQDNs": [{"matchName": "a.io"}]}]}, CNP, ""),
    ("l7-misuse", l7({"http": [{}]}, proto="UDP"), CNP, ""),
    ("l7-misuse", l7({"dns": [{"matchName": "a.io"}]}, port="53", proto="UDP"), CNP, ""),
    ("l7-misuse", l7({"http": [{}], "kafka": [{}]}), CNP, ""),
    ("l7-misuse", l7({"http": [{}]}, port="0"), CNP, ""),
    ("l7-misuse", l7({"l7": [{"a": "b"}]}), CNP, ""),
    ("unknown-fields", egress(toGroups=[{"aws": {"securityGroupsIds": ["sg-1"]}}]), CNP, ""),
    ("unknown-fields", ingress(fromGroups=[{"aws": {"securityGroupsIds": ["sg-1"]}}]), CNP, ""),
    ("unknown-fields", egress(toNodes=[{}]), CNP, ""),
    ("unknown-fields", ingress(fromNodes=[{}]), CNP, ""),
    ("unknown-fields", ingress(fromEndpoints=[{}], authentication={"mode": "required"}), CNP, ""),
    ("unknown-fields", egress(toPorts=[{**PORT80, "listener": {"name": "l", "envoyConfig": {"name": "c"}}}]),
     CNP, ""),
    ("unknown-fields", ingress(fromCIDRSet=[{"cidrGroupRef": "g"}]), CNP, ""),
    ("unknown-fields", egress(toCIDRSet=[{"cidrGroupSelector": {}}]), CNP, ""),
]


def status_of(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], tuple[support.Gap, ...]]:
    """(Valid, Enforced, gaps) with every expected node reporting the policy enforced."""
    outcome = ingest_policy(ClusterModel(), raw)
    valid = valid_condition(raw, outcome)
    view = PolicyView.from_body(raw)
    report = PolicyReport(node="n1", policy_uid="uid-p", kind=raw["kind"], name="p", generation=3, ok=True,
                          enforcing=True, last_updated="", local_policy_revision=5)
    cond, _ = enforcement.enforced_condition(view, {"n1": Expectation(3, 5)}, {"n1": report}, valid=valid,
                                             unenforced=outcome.unenforced if not outcome.problems else "")
    return valid, cond, outcome.gaps


@pytest.mark.parametrize(("key", "spec", "kind", "path"), EXAMPLES,
                         ids=[f"{k}-{i}" for i, (k, *_r) in enumerate(EXAMPLES)])
def test_every_row_gives_its_status(key: str, spec: dict[str, Any], kind: str, path: str) -> None:
    feature = support.BY_KEY[key]
    valid, enforced, gaps = status_of(body(spec, kind))
    if feature.support is support.Support.ENFORCED:
        assert (valid["status"], enforced["status"], enforced["reason"]) == ("True", "True", "Enforced"), enforced
        assert gaps == ()
    elif feature.support is support.Support.PARTIAL:
        assert valid["status"] == "True", valid
        assert (enforced["status"], enforced["reason"]) == ("False", "PartiallyEnforced"), enforced
        keys = {g.feature.key for g in gaps}
        assert keys == {key}, keys
        assert f"{path}: " in enforced["message"] or f"{path}, " in enforced["message"], enforced["message"]
        assert feature.what in enforced["message"]
    else:
        assert valid["status"] == "False", valid
        assert (enforced["status"], enforced["reason"]) == ("False", "InvalidPolicy"), enforced


def test_every_row_has_an_example_and_keys_are_unique() -> None:
    assert len(support.BY_KEY) == len(support.FEATURES)
    assert {key for key, *_ in EXAMPLES} == set(support.BY_KEY)


def test_partial_with_no_endpoint_selected_is_not_true() -> None:
    raw = body(l7({"kafka": [{"topic": "t"}]}))
    outcome = ingest_policy(ClusterModel(), raw)
    cond, summary = enforcement.enforced_condition(PolicyView.from_body(raw), {}, {},
                                                   unenforced=outcome.unenforced)
    assert (cond["status"], cond["reason"], summary) == ("False", "PartiallyEnforced", "0/0 nodes")
    assert "rules.kafka" in cond["message"]


def test_not_assessed_is_pending_and_nodes_not_enforcing_wins() -> None:
    raw = body(l7({"kafka": [{"topic": "t"}]}))
    view = PolicyView.from_body(raw)
    cond, _ = enforcement.enforced_condition(view, {}, {}, unenforced=None)
    assert (cond["status"], cond["reason"]) == ("False", "Pending")
    cond, _ = enforcement.enforced_condition(view, {"n1": Expectation(3)}, {}, unenforced="x: y")
    assert (cond["status"], cond["reason"]) == ("False", "NodesNotEnforcing")
    assert cond["message"].endswith("not enforced as written anywhere: x: y")  # still named


def test_readme_carries_the_table() -> None:
    assert support.render_table() in (ROOT / "README.md").read_text()


def test_examples_directory_says_what_is_not_enforced() -> None:
    """crds/examples: an example says PartiallyEnforced in its header comment exactly when it is partial (as
    ``kubectl apply`` puts it: a CiliumNetworkPolicy without a namespace lands in ``default``), and none
    promises a 403."""
    for path in sorted((ROOT / "crds/examples").glob("*.yaml")):
        text = path.read_text()
        assert "403" not in text and "Access denied" not in text, path.name
        raw = yaml.safe_load(text)
        if raw["kind"] not in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
            continue  # a pool (lb-ippool.yaml): not a policy
        if raw["kind"] == "CiliumNetworkPolicy":
            raw["metadata"].setdefault("namespace", "default")
        found = support.gaps(parse_policy(raw))
        head = text.split("apiVersion")[0]
        assert ("PartiallyEnforced" in head) == bool(found), (path.name, sorted({g.feature.key for g in found}))
        assert ("not enforce" in head or "no host firewall" in head or "is dropped" in head) == bool(found), \
            path.name


# --- resolution never widens what it cannot enforce ---------------------------------------------

NODES = {"n1": NodeInfo("n1", "192.168.0.1", "10.0.1.0/24")}
PODS = {"u-a": PodInfo("ns", "a", "u-a", "n1", "10.0.1.1", {"app": "a"}),
        "u-b": PodInfo("ns", "b", "u-b", "n1", "10.0.1.2", {"app": "b"})}


def entries_of(spec: dict[str, Any]) -> tuple[Any, ...]:
    repo = PolicyRepository()
    repo.upsert(parse_policy(body(spec)))
    intent = resolve_cluster(ClusterState(repo.snapshot(), PODS, {"ns": NamespaceInfo("ns", {})}, NODES))["n1"]
    ep = next(e for e in intent.endpoints if e.pod == "a")
    assert ep.ingress.enforced
    return tuple(e for e in ep.ingress.entries if e.identity != int(Reserved.HOST))


def test_ipv6_only_cidr_item_with_ports_allows_no_peer() -> None:
    """Skipping the IPv6 prefix must not turn the item into an L4-only (any peer) allow."""
    assert entries_of(ingress(fromCIDR=["2001:db8::/32"], toPorts=[PORT80])) == ()


def test_ipv6_only_icmp_item_allows_nothing() -> None:
    """Skipping the IPv6 ICMP type must not turn the item into an L3-only (every port) allow."""
    spec = ingress(fromEndpoints=[{"matchLabels": {"app": "b"}}],
                   icmps=[{"fields": [{"type": "EchoRequest", "family": "IPv6"}]}])
    assert entries_of(spec) == ()


def test_each_endpoint_lists_the_policies_selecting_it() -> None:
    """The agent needs them to say a policy is enforcing only where its pods are in the kernel's map."""
    repo = PolicyRepository()
    repo.upsert(parse_policy(body(ingress(fromEndpoints=[{}]))))
    intent = resolve_cluster(ClusterState(repo.snapshot(), PODS, {"ns": NamespaceInfo("ns", {})}, NODES))["n1"]
    assert {e.pod: e.policies for e in intent.endpoints} == {"a": ("uid-p",), "b": ()}


@pytest.mark.parametrize("key", ["k8s:io.kubernetes.pod.namespace", "io.cilium.k8s.policy.serviceaccount",
                                 "k8s:io.cilium.k8s.namespace.labels.team", "app.kubernetes.io/name", "app",
                                 "reserved:host", "cidr:10.0.0.0/8"])
def test_keys_identities_carry_are_no_gap(key: str) -> None:
    spec = ingress(fromEndpoints=[{"matchExpressions": [{"key": key, "operator": "Exists"}]}])
    _, enforced, gaps = status_of(body(spec))
    assert gaps == () and enforced["status"] == "True", (gaps, enforced)
