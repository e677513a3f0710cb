"""The lab end to end: pods created with kubectl on two real nodes talk over TCP and UDP.

Real traffic between network namespaces: same node, across nodes, to and from the world host; a pod without
a node is bound by kube-scheduler; a deleted pod's veth goes (CNI DEL). ``ciliary lab exec`` runs in a pod
and names a missing one; ``eval $(ciliary lab env)`` gives the CLI the chart's etcd as a reader that cannot
write, and that etcd refuses a client without a certificate. That the lab leaves nothing behind is checked by
the session lab's teardown (tests/realnode_lab.py).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from ciliary.lab import topology
from ciliary.lab.layout import WORLD_IP
from lab_harness import CLI_ETCDCTL

pytestmark = pytest.mark.e2e
#: on the session's real-node lab: kubelets and containerd run the pods, ciliary-cni wires them
REAL_NODES = True

PODS = """
apiVersion: v1
kind: Pod
metadata: {name: alpha, labels: {app: alpha}}
spec:
  nodeName: node-1
  containers: [{name: web, image: lab, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: beta, labels: {app: beta}}
spec:
  nodeName: node-2
  containers: [{name: web, image: lab, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: gamma, labels: {app: gamma}}
spec:
  containers: [{name: web, image: lab, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]
"""


@pytest.fixture(scope="module")
def pods(lab):
    lab.apply(PODS)
    return {name: lab.wait_running(name) for name in ("alpha", "beta", "gamma")}


def test_pods_get_addresses_from_their_nodes_cidr(lab, pods):
    for pod in pods.values():
        node = lab.kubectl("get", "node", pod["spec"]["nodeName"], "-o", "jsonpath={.spec.podCIDR}").stdout
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(node)
        assert pod["status"]["hostIP"].startswith("192.0.2.")
        assert pod["status"]["podIPs"] == [{"ip": pod["status"]["podIP"]}]


def test_unscheduled_pod_is_bound_by_the_scheduler(pods):
    assert pods["gamma"]["spec"]["nodeName"] in ("node-1", "node-2")


def test_tcp_and_udp_across_nodes(lab, pods):
    beta = pods["beta"]["status"]["podIP"]
    out = lab.probe("http", beta, 80, pod="alpha")
    assert out.returncode == 0, out.stdout
    assert "200 OK" in out.stdout and "default/beta" in out.stdout
    assert lab.probe("udp", beta, 53, pod="alpha").returncode == 0
    alpha = pods["alpha"]["status"]["podIP"]
    assert lab.probe("http", alpha, 80, pod="beta").returncode == 0


def test_tcp_and_udp_on_the_same_node(lab, pods):
    same = "alpha" if pods["gamma"]["spec"]["nodeName"] == "node-1" else "beta"
    gamma = pods["gamma"]["status"]["podIP"]
    out = lab.probe("http", gamma, 8080, pod=same)
    assert out.returncode == 0 and "default/gamma" in out.stdout, out.stdout
    assert lab.probe("udp", gamma, 5353, pod=same).returncode == 0


def test_pods_reach_the_world_and_the_world_reaches_pods(lab, pods):
    for port in (80, 443, 8080):
        out = lab.probe("http", WORLD_IP, port, pod="alpha")
        assert out.returncode == 0 and "world" in out.stdout, out.stdout
    assert lab.probe("udp", WORLD_IP, 53, pod="beta").returncode == 0
    out = lab.probe("http", pods["beta"]["status"]["podIP"], 80, world=True)
    assert out.returncode == 0 and "default/beta" in out.stdout, out.stdout


def test_closed_port_is_refused_not_hanging(lab, pods):
    out = lab.probe("http", pods["beta"]["status"]["podIP"], 81, pod="alpha")
    assert out.returncode == 1 and "refused" in out.stdout.lower(), out.stdout


def user_cli(lab, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, from this shell after ``eval $(ciliary lab env)``."""
    env = {**os.environ, **lab.lab.env(), "CILIARY_LAB_DIR": str(lab.lab.layout.state_dir),
           "CILIARY_LAB_PREFIX": lab.lab.layout.prefix}
    return subprocess.run([sys.executable, "-m", "ciliary.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_lab_exec_runs_in_the_pod(lab, pods):
    out = user_cli(lab, "lab", "exec", "alpha", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert out.returncode == 0, out.stderr
    assert pods["alpha"]["status"]["podIP"] in out.stdout


def test_lab_exec_on_a_missing_pod_says_so(lab):
    out = user_cli(lab, "lab", "exec", "no-such-pod", "--", "true")
    assert out.returncode != 0
    assert "pod default/no-such-pod not found" in out.stderr


def _host_veths(lab, node: str) -> set[str]:
    out = topology.ip("-o", "link", "show", "type", "veth", netns=lab.lab.layout.node_netns(node)).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_deleting_a_pod_removes_its_veth_and_container(lab, pods):
    before = _host_veths(lab, "node-2")
    lab.apply("""
apiVersion: v1
kind: Pod
metadata: {name: shortlived}
spec:
  nodeName: node-2
  containers: [{name: a, image: lab, ports: [{containerPort: 80}]}]
""")
    lab.wait_running("shortlived")
    added = _host_veths(lab, "node-2") - before
    assert len(added) == 1
    netns, _ = lab.lab.pod_target("shortlived", "default")  # /proc/<container pid>/ns/net
    assert netns.exists()
    lab.kubectl("delete", "pod", "shortlived", "--timeout=60s")
    assert not netns.exists(), "the container's process outlived its pod"
    # compare against the pod's own veth: an earlier test's pod deleted with --wait=false may
    # still be tearing down, so its veth can vanish from ``before`` meanwhile
    after = _host_veths(lab, "node-2")
    assert not added & after and after <= before


def test_lab_env_gives_the_cli_the_charts_etcd_as_a_reader(lab):
    """``eval $(ciliary lab env)``: the CLI's etcd is the chart's (mutual TLS through the lab's forward) as
    ``ciliary-reader``: it reads every node's registration, a write is refused, and without a client
    certificate etcd refuses the connection."""
    read = lab.user_shell(f"{CLI_ETCDCTL} get --prefix --keys-only /ciliary/nodes/v1/")
    assert read.returncode == 0, read.stderr
    assert "/ciliary/nodes/v1/node-1" in read.stdout and "/ciliary/nodes/v1/node-2" in read.stdout, read.stdout
    write = lab.user_shell(f"{CLI_ETCDCTL} put /ciliary/nodes/v1/node-9 forged")
    assert write.returncode != 0 and "permission denied" in write.stderr, (write.stdout, write.stderr)
    no_cert = lab.user_shell('etcdctl --dial-timeout=3s --endpoints="$CILIARY_ETCD_ENDPOINTS" '
                             '--cacert="$CILIARY_ETCD_CA_FILE" get /ciliary/')
    assert no_cert.returncode != 0, no_cert.stdout
