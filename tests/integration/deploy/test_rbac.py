"""Least privilege, proven against the real apiserver.

The real operator (``python -m ciliary.operator.main``) runs authenticated as the chart's
operator ServiceAccount (rendered ServiceAccount/ClusterRole/ClusterRoleBinding applied, a
token minted with ``kubectl create token``) through a policy lifecycle: a namespace, a Node,
a Pod, a valid CNP and CCNP (Valid=True, listed in the node's intent in etcd), an invalid CNP
(Valid=False and a PolicyInvalid Event), deletion (the intent published without them); its log
must show no refusal. Then, for every (resource, verb) the chart
grants, a ClusterRole without just
that one verb makes the same lifecycle fail (a 403 in
the log, the operator exiting, or a missing status/Event). ``OPERATOR_USES`` is derived
from the code independently of the chart and must equal what the chart grants.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    NAMESPACE,
    ROOT,
    Helm,
    documents,
    ensure_namespace,
    etcd_value,
    find,
    install_crds,
    kubectl_ok,
    service_account_kubeconfig,
)

from ciliary.lab import processes
from ciliary.operator.intents import parse_node_intent
from ciliary.operator.store.keyspace import node_intent_key

pytestmark = pytest.mark.integration

#: (apiGroup, resource, verb) the operator uses, read from the code:
#: handlers.register -> kopf.on.event on pods, namespaces, nodes, CNP, CCNP, NetworkPolicy: kopf lists, then watches;
#: handlers.initial_list -> list_namespace, list_node, list_pod_for_all_namespaces, list_cluster_custom_object,
#: list_network_policy_for_all_namespaces;
#: handover.StatusHandover._write -> patch_{namespaced,cluster}_custom_object_status (merge patch, Valid
#: and Enforced conditions, enforcement, nodes; no precondition, so never a 409 and no re-read);
#: kopf.warn -> kopf posting: POST core/v1 events (never patch/get);
#: kopf's resource observer (clusterwide, scanning enabled) -> list + watch CRDs;
#: service_handlers.register/initial_list -> kopf.on.event on services and endpointslices, list_service_for_all_
#: namespaces, list_endpoint_slice_for_all_namespaces; service_events -> POST core/v1 events (covered above);
#: handlers.register -> kopf.on.event on secrets (TLS contexts' rotation), reconciling -> read_namespaced_secret;
#: service_handlers.register -> kopf.on.event on ciliumloadbalancerippools, lb_ipam_reconciling.initial_list ->
#: list_cluster_custom_object; LBIPAMReconciler -> patch_namespaced_service_status,
#: patch_cluster_custom_object_status (merge patches).
OPERATOR_USES: frozenset[tuple[str, str, str]] = frozenset({
    ("", "namespaces", "list"), ("", "namespaces", "watch"),
    ("", "nodes", "list"), ("", "nodes", "watch"),
    ("", "pods", "list"), ("", "pods", "watch"),
    ("cilium.io", "ciliumnetworkpolicies", "list"), ("cilium.io", "ciliumnetworkpolicies", "watch"),
    ("cilium.io", "ciliumclusterwidenetworkpolicies", "list"),
    ("cilium.io", "ciliumclusterwidenetworkpolicies", "watch"),
    ("networking.k8s.io", "networkpolicies", "list"), ("networking.k8s.io", "networkpolicies", "watch"),
    ("cilium.io", "ciliumnetworkpolicies/status", "patch"),
    ("cilium.io", "ciliumclusterwidenetworkpolicies/status", "patch"),
    ("", "events", "create"),
    ("", "services", "list"), ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"), ("discovery.k8s.io", "endpointslices", "watch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "secrets", "get"), ("", "secrets", "list"), ("", "secrets", "watch"),
    ("cilium.io", "ciliumloadbalancerippools", "list"), ("cilium.io", "ciliumloadbalancerippools", "watch"),
    ("cilium.io", "ciliumloadbalancerippools/status", "patch"), ("", "services/status", "patch"),
})

TLS_SPEC = {"endpointSelector": {"matchLabels": {"app": "media"}}, "egress": [{
    "toCIDR": ["192.0.2.100/32"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}],
                                              "rules": {"http": [{"method": "GET"}]},
                                              "terminatingTLS": {"secret": {"name": "intercept"}},
                                              "originatingTLS": {"secret": {"name": "world-ca"}}}]}]}
REFUSAL = re.compile(r"Forbidden|forbidden|Not enough permissions|Code: 403|\(403\)|status 403")
VALID_SPEC = yaml.safe_load((ROOT / "crds" / "examples" / "l4-ports.yaml").read_text())["spec"]
INVALID_SPEC = yaml.safe_load((ROOT / "crds" / "invalid" / "cidr-except-outside.yaml").read_text())["spec"]
CCNP_SPEC = yaml.safe_load((ROOT / "crds" / "examples" / "ccnp-all-namespaces.yaml").read_text())["spec"]


def pairs(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def without(rules: list[dict[str, Any]], removed: tuple[str, str, str]) -> list[dict[str, Any]]:
    """The same grants minus one (apiGroup, resource, verb), one rule per remaining pair."""
    return [{"apiGroups": [g], "resources": [r], "verbs": [v]} for g, r, v in sorted(pairs(rules) - {removed})]


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> list[dict[str, Any]]:
    return documents(helm.template())


@pytest.fixture(scope="module")
def operator_rules(rendered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(find(rendered, "ClusterRole", "-operator")["rules"])


@pytest.fixture(scope="module")
def cluster(kube: Any, helm: Helm) -> Any:
    install_crds(kube, helm)
    ensure_namespace(kube, NAMESPACE)
    return kube


class OperatorRun:
    """The operator process, authenticated as one ServiceAccount, logging into a file."""

    def __init__(self, kube: Any, kubeconfig: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "CILIARY_OPERATOR_"))}
        env["PYTHONPATH"] = os.pathsep.join(str(ROOT / d) for d in ("operator", "nodeagent", "e2e"))
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ciliary.operator.main", "--kubeconfig", str(kubeconfig),
             *kube.etcd_flags(), "--log-level", "INFO"],
            stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def refused(self) -> bool:
        return bool(REFUSAL.search(self.text()))

    def stop(self) -> None:
        processes.terminate(self.proc, timeout=15)
        self._out.close()


def apply_role(kube: Any, name: str, rules: list[dict[str, Any]]) -> None:
    items = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]},
    ]
    kubectl_ok(kube, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def delete_role(kube: Any, name: str) -> None:
    kube.kubectl("delete", "clusterrolebinding,clusterrole", name, "--ignore-not-found", "--wait=false")
    kube.kubectl("delete", "serviceaccount", name, "-n", NAMESPACE, "--ignore-not-found", "--wait=false")


class Lifecycle:
    """One policy lifecycle in its own namespace (names unique per run, so no earlier status counts)."""

    def __init__(self, kube: Any) -> None:
        self.kube = kube
        self.suffix = uuid.uuid4().hex[:8]
        self.ns = f"rbac-{self.suffix}"
        self.node = f"rbac-node-{self.suffix}"
        self.ccnp = f"rbac-ccnp-{self.suffix}"
        self.pool = f"rbac-pool-{self.suffix}"

    def create(self) -> None:
        objects = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns, "labels": {"team": "rbac"}}},
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node, "labels": {"rbac": "yes"}},
             "spec": {"podCIDR": "10.251.3.0/24", "podCIDRs": ["10.251.3.0/24"]}},
        ]
        kubectl_ok(self.kube, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                    "items": objects}))
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "media", "namespace": self.ns,
                                                               "labels": {"app": "media"}},
               "spec": {"nodeName": self.node, "containers": [{"name": "c", "image": "example.invalid/none"}]}}
        policies = [
            {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
             "metadata": {"name": "valid", "namespace": self.ns}, "spec": VALID_SPEC},
            {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
             "metadata": {"name": "invalid", "namespace": self.ns}, "spec": INVALID_SPEC},
            {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
             "metadata": {"name": self.ccnp}, "spec": CCNP_SPEC},
            # TLS interception: the operator reads the Secrets its contexts name (get; they need not exist)
            {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
             "metadata": {"name": "tls", "namespace": self.ns}, "spec": TLS_SPEC},
            # LB IPAM: the pool's counts and the Service's IP go into their status subresources
            {"apiVersion": "cilium.io/v2", "kind": "CiliumLoadBalancerIPPool", "metadata": {"name": self.pool},
             "spec": {"blocks": [{"cidr": "198.51.100.0/30"}],
                      "serviceSelector": {"matchLabels": {"io.kubernetes.service.namespace": self.ns}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "media-lb", "namespace": self.ns},
             "spec": {"type": "LoadBalancer", "selector": {"app": "media"}, "ports": [{"port": 80}]}},
        ]
        kubectl_ok(self.kube, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                    "items": [pod, *policies]}))
        self.kube.kubectl("patch", "pod", "media", "-n", self.ns, "--subresource=status", "--type=merge", "-p",
                          json.dumps({"status": {"podIP": "10.251.3.5", "podIPs": [{"ip": "10.251.3.5"}]}}))

    def _valid(self, *target: str) -> str:
        done = self.kube.kubectl("get", *target, "-o", 'jsonpath={.status.conditions[?(@.type=="Valid")].status}')
        return str(done.stdout).strip() if done.returncode == 0 else ""

    def missing(self) -> list[str]:
        """What the operator has not done yet (empty: the lifecycle is complete)."""
        missing = []
        if self._valid("cnp", "valid", "-n", self.ns) != "True":
            missing.append("Valid=True on cnp/valid")
        if self._valid("ccnp", self.ccnp) != "True":
            missing.append(f"Valid=True on ccnp/{self.ccnp}")
        if self._valid("cnp", "invalid", "-n", self.ns) != "False":
            missing.append("Valid=False on cnp/invalid")
        events = self.kube.kubectl("get", "events", "-n", self.ns, "-o", "json",
                                   "--field-selector", "reason=PolicyInvalid,involvedObject.name=invalid")
        if events.returncode != 0 or not json.loads(events.stdout or "{}").get("items"):
            missing.append("PolicyInvalid Event for cnp/invalid")
        lb = self.kube.kubectl("get", "svc", "media-lb", "-n", self.ns, "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}")
        if lb.returncode != 0 or not str(lb.stdout).startswith("198.51.100."):
            missing.append("an LB IPAM address on svc/media-lb")
        used = self.kube.kubectl("get", "ippools", self.pool, "-o",
                                 'jsonpath={.status.conditions[?(@.type=="cilium.io/IPsUsed")].message}')
        if used.returncode != 0 or str(used.stdout).strip() != "1":
            missing.append(f"IPsUsed 1 on ippool/{self.pool}")
        return missing

    def delete_policies(self) -> None:
        self.kube.kubectl("delete", "cnp", "valid", "invalid", "tls", "-n", self.ns, "--wait=false")
        self.kube.kubectl("delete", "ccnp", self.ccnp, "--wait=false")

    def cleanup(self) -> None:
        self.delete_policies()
        self.kube.kubectl("delete", "ippools", self.pool, "--wait=false")
        self.kube.kubectl("delete", "namespace", self.ns, "--wait=false")
        self.kube.kubectl("delete", "node", self.node, "--wait=false")


@pytest.fixture
def run_as(cluster: Any, tmp_path: Path) -> Iterator[Any]:
    started: list[tuple[OperatorRun, Lifecycle, str]] = []

    def start(account: str, rules: list[dict[str, Any]]) -> tuple[OperatorRun, Lifecycle]:
        apply_role(cluster, account, rules)
        kubeconfig = service_account_kubeconfig(cluster, tmp_path / f"{account}.kubeconfig", account=account,
                                                namespace=NAMESPACE)
        operator = OperatorRun(cluster, kubeconfig, tmp_path / f"{account}.log")
        lifecycle = Lifecycle(cluster)
        started.append((operator, lifecycle, account))
        lifecycle.create()
        return operator, lifecycle

    yield start
    for operator, lifecycle, account in started:
        operator.stop()
        lifecycle.cleanup()
        delete_role(cluster, account)


def wait_intent(kube: Any, operator: OperatorRun, node: str, check: Callable[[set[str]], bool], what: str,
                seconds: float = 60.0) -> None:
    """Wait until the names of the policies in ``node``'s intent (read from etcd) pass ``check``."""
    deadline = time.monotonic() + seconds
    names: set[str] | None = None
    while time.monotonic() < deadline:
        assert operator.proc.poll() is None, f"operator exited:\n{operator.text()[-3000:]}"
        raw = etcd_value(kube, node_intent_key(node))
        names = None if raw is None else {p.name for p in parse_node_intent(node, raw).policies}
        if names is not None and check(names):
            return
        time.sleep(0.5)
    pytest.fail(f"{what}: {node}'s intent lists {names}\n{operator.text()[-3000:]}")


def test_chart_grants_exactly_what_the_operator_uses(operator_rules: list[dict[str, Any]]) -> None:
    granted = pairs(operator_rules)
    assert granted - OPERATOR_USES == set(), "granted but unused"
    assert OPERATOR_USES - granted == set(), "used but not granted"


def test_operator_runs_a_policy_lifecycle_as_the_chart_service_account(
        cluster: Any, rendered: list[dict[str, Any]], run_as: Any, tmp_path: Path) -> None:
    # the chart's own objects, exactly as rendered (names, namespace, binding)
    chart_rbac = [d for d in rendered if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
                  and d["metadata"]["name"].endswith("-operator")]
    assert len(chart_rbac) == 3
    kubectl_ok(cluster, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                              "items": chart_rbac}))
    account = find(rendered, "ServiceAccount", "-operator")["metadata"]["name"]
    operator, lifecycle = run_as(account, find(rendered, "ClusterRole", "-operator")["rules"])
    deadline = time.monotonic() + 120
    while (missing := lifecycle.missing()) and time.monotonic() < deadline:
        assert operator.proc.poll() is None, f"operator exited:\n{operator.text()[-3000:]}"
        time.sleep(1)
    assert missing == [], f"lifecycle incomplete: {missing}\n{operator.text()[-3000:]}"
    # positive signals around "nothing went wrong": the node's intent in etcd lists the policies, and after
    # their deletion a reconcile pass has published it without them
    ours = {"valid", lifecycle.ccnp}
    wait_intent(cluster, operator, lifecycle.node, lambda names: ours <= names, "the policies in the intent")
    lifecycle.delete_policies()
    wait_intent(cluster, operator, lifecycle.node, lambda names: not ours & names, "the policies gone")
    assert operator.proc.poll() is None, f"operator exited:\n{operator.text()[-3000:]}"
    assert not operator.refused(), operator.text()[-3000:]


@pytest.mark.parametrize("removed", sorted(OPERATOR_USES), ids=lambda p: f"{p[1]}-{p[2]}")
def test_each_granted_verb_is_needed(operator_rules: list[dict[str, Any]], run_as: Any,
                                     removed: tuple[str, str, str]) -> None:
    rules = without(copy.deepcopy(operator_rules), removed)
    assert len(pairs(rules)) == len(pairs(operator_rules)) - 1
    account = f"op-minus-{removed[1].replace('/', '-')}-{removed[2]}"[:63]
    operator, lifecycle = run_as(account, rules)
    deadline = time.monotonic() + 90
    failed = ""
    while time.monotonic() < deadline:
        if operator.refused():
            failed = "refused (403) in the operator log"
            break
        if operator.proc.poll() is not None:
            failed = f"operator exited with {operator.proc.returncode}"
            break
        time.sleep(1)
    if not failed and lifecycle.missing():
        failed = f"lifecycle incomplete: {lifecycle.missing()}"
    assert failed, f"removing {removed} changed nothing: the verb is not needed\n{operator.text()[-3000:]}"
