"""North-south Services: the world host reaches NodePorts and an ExternalIP through the tc programs on each
node's eth0 (``--lb-devices``, auto), with real traffic in the lab.

Pods (namespace ``nsvc``): ``web-1`` on node-1 (also labelled ``which=one``), ``web-2`` on node-2 (app=web;
TCP 8080 ``http``, UDP 53 ``dns``). The world host (192.0.2.100, its own namespace) is not a node: no socket
load balancer runs there, so every answer proves the translation on the node's device. A backend on the
node the world host asked keeps the client's address; one on the other node sees the asked node's
address (SNAT), which the policy test makes visible. Direct server return: ``test_services_dsr.py``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ciliary.lab import topology
from ciliary.lab.layout import LB_IP_POOL
from northsouth_lab import backends, counters, services_doc, wait_for, world
from service_probe import PROBE, failed

pytestmark = pytest.mark.e2e
#: real nodes without kube-proxy (REAL_NODES_MODE): the chart's agents attach the tc programs on eth0 there
#: (`agent.loadBalancing.devices: auto`); with kube-proxy the chart runs `devices: off` and kube-proxy answers
REAL_NODES = True
REAL_NODES_MODE = "kube-proxy-replacement"

NS = "nsvc"
NODE_IPS = {"node-1": "192.0.2.11", "node-2": "192.0.2.12"}
EXTERNAL_IP = "203.0.113.20"
MANIFESTS = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: {NS}, labels: {{app: web, which: one}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 8080, name: http}},
                                            {{containerPort: 53, name: dns, protocol: UDP}}]}}]
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
metadata: {{name: web-np, namespace: {NS}}}
spec:
  type: NodePort
  selector: {{app: web}}
  externalIPs: [{EXTERNAL_IP}]
  ports:
  - {{name: http, port: 80, targetPort: http, nodePort: 30180}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: dns, nodePort: 30153}}
---
apiVersion: v1
kind: Service
metadata: {{name: one-local, namespace: {NS}}}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {{app: web, which: one}}
  ports: [{{name: http, port: 80, targetPort: http, nodePort: 30182}}]
---
apiVersion: v1
kind: Service
metadata: {{name: closed-np, namespace: {NS}}}
spec:
  type: NodePort
  selector: {{app: web, which: one}}
  ports: [{{name: closed, port: 9, protocol: UDP, targetPort: 5999, nodePort: 30183}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty-np, namespace: {NS}}}
spec:
  type: NodePort
  selector: {{app: nobody}}
  ports:
  - {{name: tcp, port: 80, nodePort: 30181}}
  - {{name: udp, port: 80, protocol: UDP, nodePort: 30181}}
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


def from_pod(lab: Any, pod: str, kind: str, ip: str, port: int, count: int = 1,
             timeout: float = 2.0) -> list[dict[str, Any]]:
    """Connections from ``pod``: its network namespace and cgroup (where its node's socket programs act)."""
    netns, cgroup = lab.lab.pod_target(pod, NS)
    assert cgroup is not None, "every pod has a cgroup v2 group (the socket programs' attach point)"

    def enter() -> None:  # between fork and exec: into the pod's cgroup
        with open(cgroup / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    out = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-c", PROBE, kind, ip, str(port), str(count),
                          str(timeout)], capture_output=True, text=True, timeout=60 + count * timeout,
                         preexec_fn=enter)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


@pytest.fixture(scope="module")
def svc(lab: Any) -> Iterator[dict[str, Any]]:
    lab.apply(MANIFESTS)
    pods = {name: lab.wait_running(name, NS) for name in ("web-1", "web-2")}
    ips = {name: pod["status"]["podIP"] for name, pod in pods.items()}
    want = sorted(f"{ips[w]}:8080" for w in ("web-1", "web-2"))
    for node in NODE_IPS:
        # each node's own NodePort (another node's is that node's to serve)
        wait_for(lambda n=node: backends(lab, n, NODE_IPS[n], 30180) == want, 240, f"NodePort on {node}")
        wait_for(lambda n=node: backends(lab, n, NODE_IPS[n], 30182) == [f"{ips['web-1']}:8080"], 60,
                 f"the Local NodePort on {node}")
        doc = wait_for(lambda n=node: (d := services_doc(lab, n)["north_south"])["devices"] and d, 240,
                       f"the north-south programs attached on {node}")
        assert [d["name"] for d in doc["devices"]] == ["eth0"], doc  # --lb-devices auto picked the node's eth0
        assert doc["devices"][0]["snat_address"] == NODE_IPS[node]
    try:
        yield {"ips": ips}
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_nodeport_from_the_world_host_reaches_both_backends_through_either_node(lab: Any, svc: Any) -> None:
    for node, address in NODE_IPS.items():
        before = counters(lab, node)
        results = world(lab, "tcp", address, 30180, count=32)
        assert not failed(results), (node, failed(results), len(results))
        assert {r["body"] for r in results} == {f"{NS}/web-1", f"{NS}/web-2"}, (node, results)
        assert {r["peer"] for r in results} == {f"{address}:30180"}  # the world host sees only the frontend
        after = counters(lab, node)
        assert after["new"] - before["new"] >= 16 and after["reply"] > before["reply"], (before, after)


def test_nodeport_udp_from_the_world_host(lab: Any, svc: Any) -> None:
    for address in NODE_IPS.values():
        results = world(lab, "udp", address, 30153, count=8)
        assert all(r["ok"] and r["body"] == "hello" for r in results), results
        assert {r["peer"] for r in results} == {f"{address}:30153"}  # the reply shows the frontend


def test_external_ip_routed_to_a_node(lab: Any, svc: Any) -> None:
    world_ns = lab.lab.layout.world_netns  # the route exists only inside the lab's world namespace
    topology.ip("route", "replace", f"{EXTERNAL_IP}/32", "via", NODE_IPS["node-1"], netns=world_ns)
    try:
        results = world(lab, "tcp", EXTERNAL_IP, 80, count=32)
        assert not failed(results), (failed(results), len(results))
        assert {r["body"] for r in results} == {f"{NS}/web-1", f"{NS}/web-2"}, results
        assert {r["peer"] for r in results} == {f"{EXTERNAL_IP}:80"}
    finally:
        topology.ip("route", "del", f"{EXTERNAL_IP}/32", netns=world_ns, check=False)


def test_nodeport_without_endpoints_is_refused(lab: Any, svc: Any) -> None:
    """kube-proxy REJECTs: the world host's connect() fails at once with ECONNREFUSED (a RST from the node);
    a UDP datagram gets an ICMP port unreachable."""
    wait_for(lambda: backends(lab, "node-1", NODE_IPS["node-1"], 30181) == [] and
             backends(lab, "node-1", NODE_IPS["node-1"], 30181, "UDP") == [], 30, "the empty NodePort")
    before = counters(lab, "node-1")["rst-sent"]
    began = time.monotonic()
    results = world(lab, "tcp", NODE_IPS["node-1"], 30181, count=3, timeout=5.0)
    took = time.monotonic() - began
    assert [(r["ok"], r.get("kind")) for r in results] == [(False, "ConnectionRefusedError")] * 3, results
    assert counters(lab, "node-1")["rst-sent"] - before == 3
    print(f"\nthree connects from the world host to a NodePort without endpoints refused in {took:.2f} s "
          f"(interpreter start included)")
    # UDP: an ICMP port unreachable from the node, which the world host's connected socket reports
    before = counters(lab, "node-1")["icmp-sent"]
    results = world(lab, "udp-connected", NODE_IPS["node-1"], 30181, count=3, timeout=5.0)
    assert [(r["ok"], r.get("kind")) for r in results] == [(False, "ConnectionRefusedError")] * 3, results
    assert counters(lab, "node-1")["icmp-sent"] - before == 3


def test_a_backends_port_unreachable_reaches_the_world_host_about_the_frontend(lab: Any, svc: Any) -> None:
    """web-1 has nothing on UDP 5999: its kernel answers with an ICMP port unreachable quoting the datagram as it
    got it. Through node-2 (SNAT, the error comes back to node-2's address) and through node-1 (web-1 is local,
    the error leaves for the world host) the world host's connected socket is refused at once, as with
    kube-proxy, only because the error arrives from the frontend quoting world host -> frontend."""
    wait_for(lambda: backends(lab, "node-1", NODE_IPS["node-1"], 30183, "UDP") == [f"{svc['ips']['web-1']}:5999"],
             60, "the closed NodePort")
    for node, address in NODE_IPS.items():
        before = counters(lab, node)["reply"]
        results = world(lab, "udp-connected", address, 30183, count=3, timeout=5.0)
        assert [(r["ok"], r.get("kind")) for r in results] == [(False, "ConnectionRefusedError")] * 3, (node, results)
        assert counters(lab, node)["reply"] - before >= 3, node


def test_external_traffic_policy_local_serves_only_where_a_backend_runs(lab: Any, svc: Any) -> None:
    results = world(lab, "tcp", NODE_IPS["node-1"], 30182, count=8)
    assert all(r["ok"] for r in results) and {r["body"] for r in results} == {f"{NS}/web-1"}, results
    before = counters(lab, "node-2")["drop-no-local-backend"]
    results = world(lab, "tcp", NODE_IPS["node-2"], 30182, count=1, timeout=1.0)
    assert [(r["ok"], r.get("kind")) for r in results] == [(False, "TimeoutError")], results
    assert counters(lab, "node-2")["drop-no-local-backend"] > before


def test_a_pod_asking_another_nodes_local_nodeport_is_that_nodes_to_serve(lab: Any, svc: Any) -> None:
    """``externalTrafficPolicy: Local``, the only endpoint web-1 on node-1: web-1 asking node-2's NodePort is not
    translated on node-1 (node-2's NodePort is node-2's to serve) and node-2, without a local endpoint, drops it,
    as kube-proxy does (the upstream spec "should fallback to local terminating endpoints when there are no ready
    endpoints with externalTrafficPolicy=Local" asks this of a terminating endpoint); node-1's own NodePort
    answers the pod from the cluster-wide set."""
    assert backends(lab, "node-1", NODE_IPS["node-2"], 30182) is None
    before = counters(lab, "node-2")["drop-no-local-backend"]
    results = from_pod(lab, "web-1", "tcp", NODE_IPS["node-2"], 30182, timeout=1.0)
    assert [(r["ok"], r.get("kind")) for r in results] == [(False, "TimeoutError")], results
    assert counters(lab, "node-2")["drop-no-local-backend"] > before
    results = from_pod(lab, "web-2", "tcp", NODE_IPS["node-1"], 30182, count=3)
    assert all(r["ok"] for r in results) and {r["body"] for r in results} == {f"{NS}/web-1"}, results


def test_the_backends_policy_sees_the_world_host_locally_and_the_node_through_snat(lab: Any, svc: Any) -> None:
    """A CNP denying 192.0.2.100 on the web pods: a backend on the node asked sees the world host and drops
    it; the backend on the other node sees the asked node's address (remote-node) and answers."""
    lab.apply(DENY_WORLD_HOST)
    try:
        wait_for(lambda: world(lab, "tcp", svc["ips"]["web-1"], 8080, count=1, timeout=1.0)[0]["ok"] is False,
                 60, "the policy in force (the world host cannot reach web-1 directly)")
        for node, address in NODE_IPS.items():
            results = world(lab, "tcp", address, 30180, count=16, timeout=1.0)
            other = f"{NS}/web-2" if node == "node-1" else f"{NS}/web-1"
            assert {r["body"] for r in results if r["ok"]} == {other}, (node, results)
            assert any(not r["ok"] for r in results), (node, results)  # the local backend's share is dropped
        # externalTrafficPolicy Local keeps the client's address: always denied
        results = world(lab, "tcp", NODE_IPS["node-1"], 30182, count=3, timeout=1.0)
        assert not any(r["ok"] for r in results), results
    finally:
        lab.kubectl("delete", "cnp", "deny-world-host", "-n", NS, check=False)
    wait_for(lambda: all(r["ok"] for r in world(lab, "tcp", NODE_IPS["node-1"], 30182, count=2)), 60,
             "the world host served again once the policy is gone")


LB_POOL = ipaddress.ip_network(LB_IP_POOL)


def _lb_source_ranges(lab: Any, node: str, address: str) -> list[str] | None:
    for fe in services_doc(lab, node)["frontends"]:
        if (fe["address"], fe["port"], fe["protocol"]) == (address, 8090, "TCP"):
            return list(fe.get("source_ranges", []))
    return None


def _lb_status(lab: Any, name: str) -> tuple[list[str], dict[str, Any]]:
    """The Service's ingress IPs and its LB IPAM condition."""
    status = json.loads(lab.kubectl("get", "svc", name, "-n", NS, "-o", "json").stdout).get("status", {})
    ips = [i["ip"] for i in status.get("loadBalancer", {}).get("ingress", [])]
    condition = next((c for c in status.get("conditions", []) if c["type"] == "io.cilium/lb-ipam-request-satisfied"),
                     {})
    return ips, condition


def _drops(lab: Any) -> int:
    return sum(counters(lab, node)["drop-source-range"] for node in NODE_IPS)


def test_load_balancer_ip_from_the_pool_with_source_ranges(lab: Any, svc: Any) -> None:
    """LB IPAM gives a LoadBalancer Service an IP from the lab's CiliumLoadBalancerIPPool (the world host
    routes the pool to the nodes, as MetalLB's peers would); it serves the world host while the Service's
    loadBalancerSourceRanges admit it, and drops it once they do not (kube-proxy's firewall chain), counted.
    A Service asking for an address outside every pool gets none, and a condition saying why."""
    lab.apply(f"""
apiVersion: v1
kind: Service
metadata: {{name: web-lb, namespace: {NS}}}
spec:
  type: LoadBalancer
  selector: {{app: web}}
  loadBalancerSourceRanges: [192.0.2.100/32]
  ports: [{{name: http, port: 8090, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata:
  name: web-lb-asks
  namespace: {NS}
  annotations: {{lbipam.cilium.io/ips: 198.51.100.77}}
spec:
  type: LoadBalancer
  selector: {{app: web}}
  ports: [{{name: http, port: 8091, targetPort: http}}]
""")
    try:
        ips, condition = wait_for(lambda: (got := _lb_status(lab, "web-lb"))[0] and got, 60,
                                  "an IP from the lab's pool in the Service's status")
        assert len(ips) == 1 and ipaddress.ip_address(ips[0]) in LB_POOL, ips
        assert (condition["status"], condition["reason"]) == ("True", "satisfied"), condition
        asks = wait_for(lambda: (got := _lb_status(lab, "web-lb-asks"))[1] and got, 60, "the refused request's condition")
        assert asks[0] == [] and (asks[1]["status"], asks[1]["reason"]) == ("False", "no_pool"), asks
        assert "198.51.100.77" in asks[1]["message"], asks
        pool = json.loads(lab.kubectl("get", "ippools", "lab-pool", "-o", "json").stdout)
        used = {c["type"]: c for c in pool["status"]["conditions"]}["cilium.io/IPsUsed"]["message"]
        assert int(used) >= 1, pool["status"]
        address = ips[0]
        for node in NODE_IPS:
            wait_for(lambda n=node: _lb_source_ranges(lab, n, address) == ["192.0.2.100/32"], 60,
                     f"the load balancer IP with its range in {node}'s maps")
        new = {node: counters(lab, node)["new"] for node in NODE_IPS}
        results = world(lab, "tcp", address, 8090, count=32)
        assert not failed(results), (failed(results), len(results))
        assert {r["body"] for r in results} == {f"{NS}/web-1", f"{NS}/web-2"}, results
        # the world host's route spreads connections over both nodes, and each serves the pool's address
        assert all(counters(lab, node)["new"] > new[node] for node in NODE_IPS), new
        # a pod outside the ranges is refused at its socket (kube-proxy's firewall chain drops it)
        results = from_pod(lab, "web-1", "tcp", address, 8090, timeout=1.0)
        assert [(r["ok"], r.get("kind")) for r in results] == [(False, "PermissionError")], results
        lab.kubectl("patch", "svc", "web-lb", "-n", NS, "--type=merge", "-p", json.dumps(
            {"spec": {"loadBalancerSourceRanges": ["198.51.100.0/24", "10.244.0.0/16"]}}))
        for node in NODE_IPS:
            wait_for(lambda n=node: sorted(_lb_source_ranges(lab, n, address) or []) == ["10.244.0.0/16",
                                                                                         "198.51.100.0/24"],
                     60, f"the new ranges on {node}")
        before = _drops(lab)
        results = world(lab, "tcp", address, 8090, count=2, timeout=1.0)
        assert [r.get("kind") for r in results] == ["TimeoutError"] * 2, results
        assert _drops(lab) - before >= 2
        results = from_pod(lab, "web-2", "tcp", address, 8090, count=4)  # the pods' range now admits them
        assert all(r["ok"] for r in results), results
        assert _lb_status(lab, "web-lb")[0] == ips  # the address stays with the Service
    finally:
        lab.kubectl("delete", "svc", "web-lb", "web-lb-asks", "-n", NS, check=False)
