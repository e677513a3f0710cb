"""Kubernetes NetworkPolicies enforced in the kernel, proven with real traffic in the lab.

Same method as ``test_policy_enforcement`` (whose probes and policy lifecycle it
reuses): apply one ``networking.k8s.io/v1`` NetworkPolicy, wait (bounded) for
the first expected drop, check a matrix of paths (HTTP 200 / UDP echo land, denied
ones time out), delete it and wait until traffic flows again. One test per
construct; the first also checks the evidence a NetworkPolicy has instead of a
status: a ``PolicyEnforced`` Event and ``ciliary policy get --kind NetworkPolicy`` (``ciliary policy trace``
naming the NetworkPolicy's rule: test_netpol_explained.py). Runs on the session's
real-node lab (``REAL_NODES``, e2e/conftest.py).

Pods (module scope; namespace ``np-x`` has label ns=x, ``np-y`` ns=y); every pod
serves 80, 81, 8080 (named ``web``) on TCP and 53, 5353 (named ``echo``) on UDP:

| pod     | labels | node   |
| ------- | ------ | ------ |
| np-x/a  | pod=a  | node-1 |
| np-x/b  | pod=b  | node-2 |
| np-y/b  | pod=b  | node-1 |
| np-y/c  | pod=c  | node-2 |
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from test_policy_enforcement import (
    ENFORCE_SECONDS,
    NODE_IP,
    Pods,
    Policies,
    Policy,
    check,
    http,
    poll,
    udp,
)

pytestmark = pytest.mark.e2e
#: on the session's real-node lab (kubelets, Ciliary installed by its chart): passes there (e2e/conftest.py)
REAL_NODES = True

NS_X, NS_Y = "np-x", "np-y"
XA, XB, YB, YC = "np-x/a", "np-x/b", "np-y/b", "np-y/c"
PORTS = ("[{containerPort: 80}, {containerPort: 81}, {containerPort: 8080, name: web}, "
         "{containerPort: 53, protocol: UDP}, {containerPort: 5353, protocol: UDP, name: echo}]")
PLACEMENT = {XA: "node-1", XB: "node-2", YB: "node-1", YC: "node-2"}


def _pod(qualified: str) -> str:
    ns, name = qualified.split("/")
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}}}}}\n"
            f"spec:\n  nodeName: {PLACEMENT[qualified]}\n  containers: [{{name: c, image: lab, ports: {PORTS}}}]\n")


MANIFESTS = "---\n".join([
    f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS_X}, labels: {{ns: 'x'}}}}\n",
    f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS_Y}, labels: {{ns: 'y'}}}}\n",
    *(_pod(p) for p in PLACEMENT),
])


@pytest.fixture(scope="module")
def pods(lab) -> Pods:
    applied = lab.kubectl("apply", "-f", "-", input=MANIFESTS, check=False)
    assert applied.returncode == 0, applied.stderr
    ips, netns, nodes = {}, {}, {}
    for qualified in PLACEMENT:
        ns, name = qualified.split("/")
        pod = lab.wait_running(name, ns)
        ips[qualified] = pod["status"]["podIP"]
        nodes[qualified] = pod["spec"]["nodeName"]
        netns[qualified] = lab.netns(name, ns)
    netns["world"] = lab.world_netns()
    for node in NODE_IP:
        netns[node] = lab.node_netns(node)
    assert nodes == PLACEMENT
    return Pods(lab, ips, netns, nodes)


@pytest.fixture
def policies(lab, pods) -> Iterator[Policies]:
    p = Policies(lab, pods)
    try:
        yield p
    finally:
        p.cleanup()


def netpol(name: str, spec: str, namespace: str = NS_X) -> Policy:
    return Policy("networkpolicy", name, namespace, f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                  f"metadata: {{name: {name}, namespace: {namespace}}}\n{spec.strip()}\n")


def test_without_policy_everything_lands(pods):
    check(pods, allowed=[http(XB, XA), http(YB, XA), http(YC, XA, 8080), udp(YB, XA, 5353), http("world", XA),
                         http(XA, YB), http(XA, "world"), udp(XA, YC)])


FROM_POD_B = netpol("from-pod-b", """
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
""")


def enforce_from_pod_b(pods: Pods, policies: Policies) -> None:
    policies.enforce(FROM_POD_B, first_drop=http(YB, XA))
    check(pods, allowed=[http(XB, XA), udp(XB, XA), http(XB, XA, 8080),
                         http(XA, YB), http(YB, XB)],  # egress of x/a and ingress of others stay open
          denied=[http(YC, XA), udp(YB, XA), http("world", XA)],
          diagnose=lambda: policies.diagnose([http(YB, XA)]))


def test_pod_selector_peers_are_pods_of_the_policy_namespace(lab, pods, policies):
    enforce_from_pod_b(pods, policies)
    # the evidence a NetworkPolicy has instead of a status (``ciliary policy trace``: test_netpol_explained.py)
    events = poll_events(lab, "from-pod-b", "PolicyEnforced")
    assert any(e["type"] == "Normal" and e["message"].startswith("1/1 nodes") for e in events), events
    listed = lab.ciliary("policy", "get", "--kind", "NetworkPolicy", "-o", "json",
                         "--etcd-endpoints", lab.etcd_endpoint)
    rows = {(r["namespace"], r["name"]): r for r in json.loads(listed.stdout or "[]")}
    assert rows.get((NS_X, "from-pod-b"), {}).get("enforcement") == "1/1 nodes", listed.stdout + listed.stderr


def poll_events(lab, name: str, reason: str, namespace: str = NS_X) -> list[dict[str, object]]:
    deadline = time.monotonic() + ENFORCE_SECONDS
    while True:
        events = [e for e in lab.events(name, namespace) if e["involvedObject"].get("kind") == "NetworkPolicy"]
        if any(e["reason"] == reason for e in events) or time.monotonic() > deadline:
            return [e for e in events if e["reason"] == reason] or events
        time.sleep(0.5)


def test_namespace_selector_peers_are_pods_of_the_selected_namespaces(pods, policies):
    policies.enforce(netpol("from-ns-y", """
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: "y"}}}]
"""), first_drop=http(XB, XA))
    check(pods, allowed=[http(YB, XA), http(YC, XA), udp(YC, XA, 5353)],
          denied=[udp(XB, XA), http("world", XA)],
          diagnose=lambda: policies.diagnose([http(XB, XA)]))


def test_namespace_and_pod_selector_together_are_anded(pods, policies):
    policies.enforce(netpol("from-y-b", """
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: "y"}}, podSelector: {matchLabels: {pod: b}}}]
"""), first_drop=http(YC, XA))
    check(pods, allowed=[http(YB, XA), udp(YB, XA)], denied=[http(XB, XA), http("world", XA)],
          diagnose=lambda: policies.diagnose([http(YC, XA), http(XB, XA)]))


def test_ip_block_with_except(pods, policies):
    policies.enforce(netpol("to-world", """
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.100/32]}}]
    ports: [{port: 80}]
  - to: [{ipBlock: {cidr: 192.0.2.96/28}}]
    ports: [{port: 443}]
"""), first_drop=http(XA, "world", 80))
    # 80 is allowed to 192.0.2.0/24 but the world host is excepted; 443 comes through the second block;
    # pods are not in either block
    check(pods, allowed=[http(XA, "world", 443), http(YB, XA)],
          denied=[http(XA, "world", 8080), http(XA, XB), udp(XA, "world")],
          diagnose=lambda: policies.diagnose([http(XA, "world", 80)]))


def test_ports_with_end_port(pods, policies):
    policies.enforce(netpol("ports-range", """
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: 80, endPort: 81}]
"""), first_drop=http(XB, XA, 8080))
    check(pods, allowed=[http(XB, XA, 80), http(YC, XA, 81), http("world", XA, 80)],
          denied=[udp(XB, XA, 53), http(YB, XA, 8080)],
          diagnose=lambda: policies.diagnose([http(XB, XA, 8080)]))


def test_named_ports_resolve_against_the_pod_that_owns_them(pods, policies):
    policies.enforce(netpol("named", """
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - ports: [{port: web}]
  egress:
  - ports: [{port: echo, protocol: UDP}]
"""), first_drop=http(XB, XA, 80))
    check(pods, allowed=[http(XB, XA, 8080), udp(XA, YB, 5353), udp(XA, XB, 5353)],
          denied=[http(YB, XA, 81), udp(XA, YB, 53), http(XA, YB, 8080), udp(XA, "world", 53)],
          diagnose=lambda: policies.diagnose([http(XB, XA, 80), udp(XA, YB, 53)]))


def test_udp_ports(pods, policies):
    policies.enforce(netpol("udp-53", """
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: 53, protocol: UDP}]
"""), first_drop=udp(XB, XA, 5353))
    check(pods, allowed=[udp(XB, XA, 53), udp(YC, XA, 53)], denied=[http(XB, XA, 80), http(XB, XA, 81)],
          diagnose=lambda: policies.diagnose([udp(XB, XA, 5353)]))


def test_policy_types_egress_only(pods, policies):
    policies.enforce(netpol("egress-only", """
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {pod: b}}}]
"""), first_drop=http(XA, YB))
    check(pods, allowed=[http(XA, XB), udp(XA, XB), http(YC, XA), http("world", XA)],
          denied=[http(XA, YC), http(XA, "world"), udp(XA, YB)],
          diagnose=lambda: policies.diagnose([http(XA, YB)]))


def test_empty_lists_deny_the_direction(pods, policies):
    policies.enforce(netpol("deny-all", """
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: []
  egress: []
""", namespace=NS_Y), first_drop=http(XA, YB))
    check(pods, allowed=[http(XA, XB), http(XB, XA)],
          denied=[http(XB, YC), udp(XA, YB), http("world", YB), http(YB, XA), udp(YC, "world")],
          diagnose=lambda: policies.diagnose([http(XA, YB)]))


def test_allows_add_up_with_a_cnp(pods, policies):
    policies.enforce(netpol("np-80", """
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: 80}]
"""), first_drop=http(XB, XA, 81))
    policies.enforce(Policy("cnp", "cnp-81", NS_X, """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cnp-81, namespace: np-x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - toPorts: [{ports: [{port: "81", protocol: TCP}]}]
"""), first_drop=http(XB, XA, 8080))
    ok, detail = poll(lambda: pods.lands(http(XB, XA, 81)))  # the NetworkPolicy already drops 8080
    assert ok, f"81 not allowed by the CNP added to the NetworkPolicy: {detail}\n{policies.diagnose([])}"
    check(pods, allowed=[http(XB, XA, 80), http(XB, XA, 81)], denied=[udp(XB, XA, 53), http(XB, XA, 8080)],
          diagnose=lambda: policies.diagnose([http(XB, XA, 8080)]))


def test_what_cannot_be_enforced_exactly_is_said_and_never_widened(lab, pods, policies):
    policies.enforce(netpol("v6-block", """
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{ipBlock: {cidr: "2001:db8::/32"}}, {podSelector: {matchLabels: {pod: b}}}]
"""), first_drop=http(YB, XA))
    # the IPv6 block selects nothing (IPv4-only datapath): nothing beyond x/b is allowed
    check(pods, allowed=[http(XB, XA)], denied=[http("world", XA), http(YC, XA), udp(YB, XA)],
          diagnose=lambda: policies.diagnose([http(YB, XA)]))
    partial = poll_events(lab, "v6-block", "PolicyPartiallyEnforced")
    assert any(e["type"] == "Warning" and "spec.ingress[0].from[0].ipBlock" in e["message"] for e in partial), \
        partial
    summary = poll_events(lab, "v6-block", "PolicyNotEnforced")
    assert any(e["type"] == "Warning" and "PartiallyEnforced" in e["message"] for e in summary), summary
