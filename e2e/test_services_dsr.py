"""Direct server return (``lib/lb_dsr.h``) on real nodes: the world host reaches web-2 on node-2 through node-1.

Namespace ``dsvc``: one pod, ``web-2`` on node-2 (TCP 8080 ``http``, UDP 53 ``dns``), behind ``two-dsr``
(annotated ``service.cilium.io/forwarding-mode: dsr``; NodePorts 30190/TCP and 30191/UDP) and ``two-snat``
(no annotation: the lab's operator runs ``--lb-mode snat``; NodePort 30192). The world host (192.0.2.100) is
not a node, so every answer proves what the nodes' device programs did: through node-1, ``two-dsr``'s
connections reach web-2 with the world host's own address and web-2's node answers them as node-1:30190;
``two-snat``'s reach it from node-1's address.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from northsouth_lab import backends, counters, services_doc, wait_for, world
from service_probe import failed

pytestmark = pytest.mark.e2e
#: real nodes without kube-proxy: the chart's agents attach the north-south programs on each node's eth0
REAL_NODES = True
REAL_NODES_MODE = "kube-proxy-replacement"

NS = "dsvc"
NODE_1, NODE_2 = "192.0.2.11", "192.0.2.12"
MANIFESTS = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-2, namespace: {NS}, labels: {{app: web}}}}
spec:
  nodeName: node-2
  containers: [{{name: c, image: lab, ports: [{{containerPort: 8080, name: http}},
                                            {{containerPort: 53, name: dns, protocol: UDP}}]}}]
---
apiVersion: v1
kind: Service
metadata:
  name: two-dsr
  namespace: {NS}
  annotations: {{service.cilium.io/forwarding-mode: dsr}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: http, nodePort: 30190}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: dns, nodePort: 30191}}
---
apiVersion: v1
kind: Service
metadata: {{name: two-snat, namespace: {NS}}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http, nodePort: 30192}}]
"""

DENY_WORLD_HOST = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: deny-world-host, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress: [{{fromEntities: [all]}}]
  ingressDeny: [{{fromCIDR: [192.0.2.100/32]}}]
"""


@pytest.fixture(scope="module")
def svc(lab: Any) -> Iterator[dict[str, Any]]:
    lab.apply(MANIFESTS)
    ip = lab.wait_running("web-2", NS)["status"]["podIP"]
    for node, address in (("node-1", NODE_1), ("node-2", NODE_2)):
        for port in (30190, 30192):
            wait_for(lambda n=node, a=address, p=port: backends(lab, n, a, p) == [f"{ip}:8080"], 240,
                     f"NodePort {port} on {node}")
        wait_for(lambda n=node: services_doc(lab, n)["north_south"]["devices"], 240,
                 f"the north-south programs attached on {node}")
    try:
        yield {"ip": ip}
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)
def _dsr_flagged(lab: Any, node: str, port: int, proto: str) -> bool:
    return any((fe["port"], fe["protocol"]) == (port, proto) and "dsr" in fe["flags"]
               for fe in services_doc(lab, node)["frontends"])


def test_dsr_the_backends_node_answers_the_world_host_itself(lab: Any, svc: Any) -> None:
    """``two-dsr`` through node-1, whose only backend web-2 runs on node-2: node-1 rewrites only the destination and
    tells node-2 the frontend in an IPv4 option; node-2 learns the connection and sends web-2's answers straight
    to the world host as node-1:30190. The world host sees only the frontend it asked."""
    assert _dsr_flagged(lab, "node-1", 30190, "TCP") and _dsr_flagged(lab, "node-1", 30191, "UDP")
    assert not _dsr_flagged(lab, "node-1", 30192, "TCP")
    entry, backend = counters(lab, "node-1"), counters(lab, "node-2")
    results = world(lab, "tcp", NODE_1, 30190, count=8)
    assert not failed(results), failed(results)
    assert {r["body"] for r in results} == {f"{NS}/web-2"} and {r["peer"] for r in results} == {
        f"{NODE_1}:30190"}, results
    results = world(lab, "udp", NODE_1, 30191, count=4)
    assert all(r["ok"] and r["body"] == "hello" for r in results), results
    assert {r["peer"] for r in results} == {f"{NODE_1}:30191"}, results
    entry2, backend2 = counters(lab, "node-1"), counters(lab, "node-2")
    assert entry2["new"] - entry["new"] >= 8 + 4, (entry, entry2)
    assert backend2["dsr-learnt"] - backend["dsr-learnt"] >= 8 + 4, (backend, backend2)
    listed = lab.ciliary("service", "list", "--node", "node-1")
    assert listed.returncode == 0, listed.stderr
    assert [line for line in listed.stdout.splitlines() if "[DSR from outside]" in line], listed.stdout


def test_dsr_backend_policy_sees_the_world_host_where_snat_shows_the_node(lab: Any, svc: Any) -> None:
    """A CNP denying 192.0.2.100 on web-2: through node-1, web-2 answers ``two-snat`` (SNAT: it sees node-1) and
    never ``two-dsr`` (DSR: it sees the world host itself, as the issue asks)."""
    lab.apply(DENY_WORLD_HOST)
    try:
        wait_for(lambda: world(lab, "tcp", svc["ip"], 8080, count=1, timeout=1.0)[0]["ok"] is False,
                 60, "the policy in force (the world host cannot reach web-2 directly)")
        results = world(lab, "tcp", NODE_1, 30190, count=4, timeout=1.0)
        assert not any(r["ok"] for r in results), results  # dropped by web-2's policy: the world host's address
        results = world(lab, "tcp", NODE_1, 30192, count=4, timeout=1.0)
        assert not failed(results) and {r["body"] for r in results} == {f"{NS}/web-2"}, results
    finally:
        lab.kubectl("delete", "cnp", "deny-world-host", "-n", NS, check=False)
    wait_for(lambda: all(r["ok"] for r in world(lab, "tcp", NODE_1, 30190, count=2)), 60,
             "the world host served through DSR again once the policy is gone")


def test_an_unknown_forwarding_mode_is_a_warning_event_and_the_default_applies(lab: Any, svc: Any) -> None:
    lab.apply(f"""
apiVersion: v1
kind: Service
metadata:
  name: bad-mode
  namespace: {NS}
  annotations: {{service.cilium.io/forwarding-mode: direct}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http, nodePort: 30193}}]
""")
    events = wait_for(lambda: [e for e in lab.events("bad-mode", NS) if e["reason"] == "ForwardingModeInvalid"],
                      30, "a ForwardingModeInvalid Event on the Service")
    assert events[0]["type"] == "Warning" and "'direct'" in events[0]["message"], events
    wait_for(lambda: backends(lab, "node-1", NODE_1, 30193) == [f"{svc['ip']}:8080"], 60,
             "bad-mode's NodePort served anyway")
    assert not _dsr_flagged(lab, "node-1", 30193, "TCP")  # the lab's --lb-mode: snat
    results = world(lab, "tcp", NODE_1, 30193, count=4)
    assert not failed(results) and {r["body"] for r in results} == {f"{NS}/web-2"}, results
