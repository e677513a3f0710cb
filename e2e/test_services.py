"""Services load-balanced in the kernel (socket level), proven with real traffic from pods in the lab.

Pods (namespace ``svc``): ``web-1`` on node-1 and ``web-2`` on node-2 (app=web; TCP 8080 named
``http``, UDP 53 named ``dns``), ``client`` on node-1. Service ``web``: 80/TCP -> targetPort
``http`` (named), 53/TCP -> 8080 and 53/UDP -> ``dns`` (the same port on two protocols). The
client runs inside its pod's network namespace *and cgroup* (where the socket load balancer is
attached), connecting to the ClusterIP; nobody routes ClusterIPs, so an answer proves the
translation at connect()/sendmsg().
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ciliary.lab import topology
from service_probe import PROBE, SAME_PORT_AGAIN, failed

pytestmark = pytest.mark.e2e
#: real nodes without kube-proxy (REAL_NODES_MODE): there only Ciliary's load balancer translates a ClusterIP or a
#: NodePort, so an answer proves it; with kube-proxy beside it an answer would not
REAL_NODES = True
REAL_NODES_MODE = "kube-proxy-replacement"

NS = "svc"
MANIFESTS = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: {NS}, labels: {{app: web}}}}
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
kind: Pod
metadata: {{name: client, namespace: {NS}, labels: {{app: client}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
  - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 8080}}
  - {{name: dns-udp, port: 53, protocol: UDP, targetPort: dns}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: {NS}}}
spec:
  selector: {{app: nobody}}
  ports: [{{port: 80}}]
"""



WEB_NODEPORT = f"""
apiVersion: v1
kind: Service
metadata: {{name: web-np, namespace: {NS}}}
spec:
  type: NodePort
  selector: {{app: web}}
  externalIPs: [203.0.113.10]
  ports: [{{name: http, port: 8000, targetPort: http, nodePort: 30080}}]
"""


class Client:
    def __init__(self, lab: Any, pod: str = "client") -> None:
        self.lab = lab
        self.netns, self.cgroup = lab.lab.pod_target(pod, NS)

    def probe(self, kind: str, ip: str, port: int, count: int = 1, timeout: float = 2.0) -> list[dict[str, Any]]:
        return list(self.run(PROBE, kind, ip, str(port), str(count), str(timeout), seconds=60 + count * timeout))

    def run(self, code: str, *args: str, seconds: float = 60) -> Any:
        """``python -c code args`` in the pod's network namespace and cgroup; its stdout read as JSON."""
        assert self.cgroup is not None, "every pod has a cgroup v2 group (the socket programs' attach point)"
        procs = str(self.cgroup / "cgroup.procs")

        def enter() -> None:  # between fork and exec: into the pod's cgroup, where the programs are attached
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        out = subprocess.run(["nsenter", f"--net={self.netns}", sys.executable, "-c", code, *args],
                             capture_output=True, text=True, timeout=seconds, preexec_fn=enter)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


def services_doc(lab: Any, node: str) -> dict[str, Any]:
    return dict(lab.agent_json(node, "/v1/services"))


LAST_ERROR: list[str] = []


def backends_of(lab: Any, node: str, ip: str, port: int, proto: str = "TCP") -> list[str] | None:
    try:
        doc = services_doc(lab, node)
    except OSError as exc:  # 503 while the load balancer starts (compiles)
        LAST_ERROR[:] = [str(exc)]
        return None
    for fe in doc["frontends"]:
        if (fe["address"], fe["port"], fe["protocol"]) == (ip, port, proto):
            return sorted(f"{b['address']}:{b['port']}" for b in fe["backends"])
    return None


def wait_for(check: Any, seconds: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s: {what} (last agent error: {LAST_ERROR})")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def svc(lab: Any) -> Iterator[dict[str, Any]]:
    lab.apply(MANIFESTS)
    pods = {name: lab.wait_running(name, NS) for name in ("web-1", "web-2", "client")}
    ips = {name: pod["status"]["podIP"] for name, pod in pods.items()}
    vip = json.loads(lab.kubectl("get", "svc", "web", "-n", NS, "-o", "json").stdout)["spec"]["clusterIP"]
    empty = json.loads(lab.kubectl("get", "svc", "empty", "-n", NS, "-o", "json").stdout)["spec"]["clusterIP"]
    want = sorted(f"{ips[w]}:8080" for w in ("web-1", "web-2"))
    wait_for(lambda: backends_of(lab, "node-1", vip, 80) == want, 240, "both web pods behind the ClusterIP")
    for node in ("node-1", "node-2"):  # each node compiles its own programs: wait for both
        def lb_status(node: str = node) -> dict[str, Any]:
            return dict(lab.agent_json(node, "/v1/enforcement")["load_balancing"])

        status = wait_for(lambda: (s := lb_status())["started"] and s, 240, f"{node}'s load balancer started")
        assert status["error"] == "", status
    try:
        yield {"vip": vip, "empty": empty, "ips": ips, "client": Client(lab)}
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_clusterip_from_a_pod_uses_both_backends(svc: dict[str, Any]) -> None:
    results = svc["client"].probe("tcp", svc["vip"], 80, count=30)
    assert not failed(results), (failed(results), len(results))
    assert {r["body"] for r in results} == {f"{NS}/web-1", f"{NS}/web-2"}, results
    assert {r["peer"] for r in results} == {f"{svc['vip']}:80"}  # getpeername shows the Service


def test_same_port_on_tcp_and_udp(svc: dict[str, Any]) -> None:
    tcp = svc["client"].probe("tcp", svc["vip"], 53, count=4)
    assert all(r["ok"] and r["body"].startswith(f"{NS}/web-") for r in tcp), tcp
    udp = svc["client"].probe("udp", svc["vip"], 53, count=4)
    assert all(r["ok"] and r["body"] == "hello" for r in udp), udp
    assert {r["peer"] for r in udp} == {f"{svc['vip']}:53"}  # the reply shows the Service, not the pod


def test_no_endpoints_is_refused_quickly(svc: dict[str, Any]) -> None:
    results = svc["client"].probe("tcp", svc["empty"], 80, count=3, timeout=5)
    # ECONNREFUSED from connect() itself (a drop would be a timeout after 5 s)
    assert all(not r["ok"] and r["errno"] == 111 for r in results), results
    print(f"\nconnect() to a Service without endpoints refused after {max(r['seconds'] for r in results):.4f} s")


def test_endpointslice_update_reaches_the_kernel_and_traffic(lab: Any, svc: dict[str, Any]) -> None:
    vip, ips = svc["vip"], svc["ips"]
    labelled = time.monotonic()
    lab.kubectl("label", "pod", "web-2", "-n", NS, "app=off", "--overwrite")
    try:
        seen_slice = wait_for(lambda: ips["web-2"] not in lab.kubectl(
            "get", "endpointslices", "-n", NS, "-l", "kubernetes.io/service-name=web", "-o", "json").stdout and
            time.monotonic(), 30, "the EndpointSlice without web-2")
        in_kernel = wait_for(lambda: backends_of(lab, "node-1", vip, 80) == [f"{ips['web-1']}:8080"] and
                             time.monotonic(), 10, "node-1's maps without web-2")
        print(f"\nEndpointSlice update seen by kubectl -> node-1's LB map: {in_kernel - seen_slice:.3f} s "
              f"(kubectl polling included); pod relabelled -> map: {in_kernel - labelled:.3f} s")
        results = svc["client"].probe("tcp", vip, 80, count=10)
        assert {r.get("body") for r in results} == {f"{NS}/web-1"}, results
    finally:
        lab.kubectl("label", "pod", "web-2", "-n", NS, "app=web", "--overwrite")
        wait_for(lambda: backends_of(lab, "node-1", vip, 80) == sorted(f"{ips[w]}:8080" for w in ("web-1", "web-2")),
                 30, "web-2 back")


def test_session_affinity_client_ip(lab: Any, svc: dict[str, Any]) -> None:
    patch = {"spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}}
    lab.kubectl("patch", "svc", "web", "-n", NS, "--type=merge", "-p", json.dumps(patch))
    try:
        def affine() -> bool:
            fe = next(f for f in services_doc(lab, "node-1")["frontends"]
                      if (f["address"], f["port"], f["protocol"]) == (svc["vip"], 80, "TCP"))
            return "affinity" in fe["flags"]

        wait_for(affine, 30, "affinity in node-1's maps")
        results = svc["client"].probe("tcp", svc["vip"], 80, count=15)
        assert len({r["body"] for r in results}) == 1 and all(r["ok"] for r in results), results
    finally:
        lab.kubectl("patch", "svc", "web", "-n", NS, "--type=json",
                    "-p", json.dumps([{"op": "replace", "path": "/spec/sessionAffinity", "value": "None"}]))
        # the next tests count backends: affinity left in the maps would send each client to one
        wait_for(lambda: not affine(), 30, "affinity gone from node-1's maps")


def test_hairpin_a_backend_reaches_itself_through_its_service(lab: Any, svc: dict[str, Any]) -> None:
    """web-1 asks its own Service: some connections land on web-1 itself (kube-proxy's hairpin case)."""
    results = Client(lab, "web-1").probe("tcp", svc["vip"], 80, count=30)
    assert not failed(results), (failed(results), len(results))
    assert {r["body"] for r in results} == {f"{NS}/web-1", f"{NS}/web-2"}, results


ONLY_FROM_CLIENT = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: web-only-from-client, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]
"""


def test_the_backend_sees_the_client_pods_address(lab: Any, svc: dict[str, Any]) -> None:
    """Through the ClusterIP the client pod's own address arrives (nothing is masqueraded): a policy on
    the backends that admits only app=client lets every request through, on both nodes."""
    web2 = Client(lab, "web-2")
    lab.apply(ONLY_FROM_CLIENT)
    try:
        wait_for(lambda: not web2.probe("tcp", svc["ips"]["web-1"], 8080, timeout=1.0)[0]["ok"], 60,
                 "the policy in force (web-2 cannot reach web-1)")
        results = svc["client"].probe("tcp", svc["vip"], 80, count=32)
        assert not failed(results), (failed(results), len(results))
        assert {r["body"] for r in results} == {f"{NS}/web-1", f"{NS}/web-2"}, results
    finally:
        lab.kubectl("delete", "cnp", "web-only-from-client", "-n", NS, check=False)
    wait_for(lambda: web2.probe("tcp", svc["ips"]["web-1"], 8080, timeout=1.0)[0]["ok"], 60,
             "web-2 reaches web-1 again once the policy is gone")


def test_bad_target_port_is_an_event_and_listed_while_others_keep_working(lab: Any, svc: dict[str, Any]) -> None:
    lab.apply(f"""
apiVersion: v1
kind: Service
metadata: {{name: badport, namespace: {NS}}}
spec:
  selector: {{app: web}}
  ports: [{{name: x, port: 80, targetPort: no-such-port}}]
""")
    events = wait_for(lambda: [e for e in lab.events("badport", NS) if e["reason"] == "TargetPortUnresolved"],
                      30, "a TargetPortUnresolved Event on the Service")
    assert events[0]["type"] == "Warning" and "no-such-port" in events[0]["message"]
    listed = lab.ciliary("service", "list", "--node", "node-1")
    assert listed.returncode == 0, listed.stderr
    print("\n" + listed.stdout)
    assert f"{NS}/badport: TargetPortUnresolved" in listed.stdout, listed.stdout
    assert f"{svc['vip']}:80/TCP" in listed.stdout
    as_json = json.loads(lab.ciliary("service", "list", "--node", "node-1", "-o", "json").stdout)
    rows = {(f["address"], f["port"], f["protocol"]): f for f in as_json["node-1"]["frontends"]}
    assert len(rows[(svc["vip"], 80, "TCP")]["backends"]) == 2
    results = svc["client"].probe("tcp", svc["vip"], 80, count=4)
    assert not failed(results), (failed(results), len(results))


def test_nodeport_on_every_node_address_and_an_external_ip_from_a_pod(lab: Any, svc: dict[str, Any]) -> None:
    """The client pod (node-1) reaches the NodePort on both nodes' addresses and the ExternalIP, each spreading
    over both backends. Each node translates its own NodePort only: node-2's address leaves node-1
    untranslated and node-2's programs serve it (as kube-proxy does; an externalTrafficPolicy Local there
    is node-2's to apply)."""
    lab.apply(WEB_NODEPORT)
    want = sorted(f"{svc['ips'][w]}:8080" for w in ("web-1", "web-2"))
    for node, address, port in (("node-1", "192.0.2.11", 30080), ("node-2", "192.0.2.12", 30080),
                                ("node-1", "203.0.113.10", 8000)):
        wait_for(lambda n=node, a=address, p=port: backends_of(lab, n, a, p) == want, 30, f"{address}:{port}")
        results = svc["client"].probe("tcp", address, port, count=32)
        assert not failed(results), (address, failed(results), len(results))
        assert {r["body"] for r in results} == {f"{NS}/web-1", f"{NS}/web-2"}, (address, results)
    assert backends_of(lab, "node-1", "192.0.2.12", 30080) is None  # not node-1's to translate


def test_a_port_reused_after_a_nodeport_connection_reaches_the_backend_directly(lab: Any, svc: dict[str, Any]) -> None:
    """A closed NodePort connection's translation does not outlive its tuple's reuse: the client pod (node-1)
    reaches web-2 through node-2's NodePort (node-2 translates; web-2 is local there, so it sees the client's
    own address and port), then at once connects straight to web-2 from the same port. web-2 sees the same
    four addresses and ports again; its answer must not be rewritten as the NodePort's (the client would
    refuse it and the connection would time out). The probe prints how long the direct connection took."""
    lab.apply(WEB_NODEPORT)
    want = sorted(f"{svc['ips'][w]}:8080" for w in ("web-1", "web-2"))
    wait_for(lambda: backends_of(lab, "node-2", "192.0.2.12", 30080) == want, 30, "192.0.2.12:30080 on node-2")
    out = svc["client"].run(SAME_PORT_AGAIN, "192.0.2.12", "30080", svc["ips"]["web-2"], f"{NS}/web-2",
                            seconds=200)
    print(out)
    assert out, "40 connections through node-2's NodePort, none answered by web-2"
    assert out["direct"]["ok"] and out["direct"]["body"] == f"{NS}/web-2", out


def on_node_host(lab: Any, node: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` as a process of ``node`` itself: its network namespace, a cgroup below the
    node's (where the socket programs are attached); the cgroup is removed afterwards."""
    from ciliary.lab import cgroups

    host_cgroup = cgroups.ensure(lab.node_host_cgroup(node) / f"host-e2e-{os.getpid()}")
    procs = str(host_cgroup / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    try:
        return subprocess.run(["nsenter", f"--net={topology.NETNS_DIR / lab.lab.layout.node_netns(node)}",
                               sys.executable, "-c", code, *args],
                              capture_output=True, text=True, timeout=90, preexec_fn=enter)
    finally:
        cgroups.kill_all(host_cgroup)
        host_cgroup.rmdir()


def test_clusterip_from_the_node_host(lab: Any, svc: dict[str, Any]) -> None:
    """A process of node-1 itself reaches the Service."""
    out = on_node_host(lab, "node-1", PROBE, "tcp", svc["vip"], "80", "12", "2")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert not failed(results), (failed(results), len(results))
    assert {r["body"] for r in results} == {f"{NS}/web-1", f"{NS}/web-2"}, results


def _http_from_world(lab: Any, url: str) -> tuple[int, dict[str, Any]]:
    """GET ``url`` from the world host's namespace: (status, JSON body); (0, {}) when nothing answers."""
    code = ("import json, sys, urllib.request, urllib.error\n"
            "try:\n"
            "    r = urllib.request.urlopen(sys.argv[1], timeout=3); print(r.status, r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code, e.read().decode())\n"
            "except OSError:\n"
            "    print(0, '{}')\n")
    out = subprocess.run(["nsenter", f"--net={topology.NETNS_DIR / lab.lab.layout.world_netns}",
                          sys.executable, "-c", code, url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status, _, body = out.stdout.strip().partition(" ")
    return int(status), json.loads(body)


def test_health_check_node_port_answers_200_only_where_a_backend_runs(lab: Any, svc: dict[str, Any]) -> None:
    """eTP=Local: an external load balancer asks each node's healthCheckNodePort (kube-proxy's JSON)."""
    lab.apply(f"""
apiVersion: v1
kind: Service
metadata: {{name: web-local, namespace: {NS}}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {{app: web, pod: one}}
  ports: [{{name: http, port: 8001, targetPort: http}}]
""")
    lab.kubectl("label", "pod", "web-1", "-n", NS, "pod=one", "--overwrite")
    spec = json.loads(lab.kubectl("get", "svc", "web-local", "-n", NS, "-o", "json").stdout)["spec"]
    hc = int(spec["healthCheckNodePort"])
    try:
        one = wait_for(lambda: (r := _http_from_world(lab, f"http://192.0.2.11:{hc}/healthz"))[0] == 200 and r,
                       30, "node-1 (web-1 runs there) answers 200")
        assert one[1] == {"service": {"namespace": NS, "name": "web-local"}, "localEndpoints": 1,
                          "serviceProxyHealthy": True}, one
        two = _http_from_world(lab, f"http://192.0.2.12:{hc}/")
        assert two == (503, {"service": {"namespace": NS, "name": "web-local"}, "localEndpoints": 0,
                             "serviceProxyHealthy": True}), two
        # the endpoint leaves node-1: its node turns 503 as well
        lab.kubectl("label", "pod", "web-1", "-n", NS, "pod-")
        wait_for(lambda: _http_from_world(lab, f"http://192.0.2.11:{hc}/")[0] == 503, 30,
                 "node-1 answers 503 once its endpoint is gone")
        # kube-proxy's own health port, answered by the agent that replaces it
        status, body = _http_from_world(lab, "http://192.0.2.12:10256/healthz")
        assert status == 200 and body["nodeEligible"] is True and body["lastUpdated"], (status, body)
        # and its status port, on the node's loopback as kube-proxy's: the mode that serves the node's Services
        mode = on_node_host(lab, "node-2", "import urllib.request as u; r = u.urlopen("
                            "'http://127.0.0.1:10249/proxyMode', timeout=3); print(r.status, r.read().decode())")
        assert mode.stdout.split() == ["200", "ebpf"], (mode.stdout, mode.stderr)
    finally:
        lab.kubectl("delete", "svc", "web-local", "-n", NS, check=False)
    wait_for(lambda: _http_from_world(lab, f"http://192.0.2.11:{hc}/")[0] == 0, 30,
             "the health-check port is closed once the Service is gone")


def test_a_node_process_cannot_take_a_nodeport(lab: Any, svc: dict[str, Any]) -> None:
    """The bind guard: NodePort 30080 (web-np, made by the NodePort test or here) is the load balancer's."""
    lab.apply(WEB_NODEPORT)
    wait_for(lambda: backends_of(lab, "node-1", "192.0.2.11", 30080), 30, "NodePort 30080 on node-1")
    code = ("import socket, sys\n"
            "for port in (30080, 30079):\n"
            "    s = socket.socket()\n"
            "    try:\n"
            "        s.bind(('0.0.0.0', port)); print(port, 'bound')\n"
            "    except OSError as e:\n"
            "        print(port, e.errno)\n"
            "    s.close()\n")
    out = on_node_host(lab, "node-1", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["30080 98", "30079 bound"], out.stdout  # 98: EADDRINUSE
