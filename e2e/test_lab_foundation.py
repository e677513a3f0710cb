"""The lab end to end: pods created with kubectl run on two nodes and talk over TCP and UDP.

Real traffic between network namespaces: same node, across nodes, to and from the
world host. Bad input (a port declared twice, a node that does not exist, exec
on a missing pod) gets a clear message and breaks nothing else. The last test
takes the lab down and proves nothing of it remains.
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from ciliary.lab import cgroups, processes, topology
from ciliary.lab.layout import WORLD_IP

pytestmark = pytest.mark.e2e
#: process lab: it tests the process lab's own pod runtime (veths, namespace names, cgroups, port conflicts,
#: `lab env`); real nodes have their counterparts in tests/integration/realnodes
REAL_NODES = False

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


def test_unscheduled_pod_is_bound_by_the_lab(pods):
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


def test_lab_exec_runs_in_the_pod(lab, pods):
    out = lab.ciliary("lab", "exec", "alpha", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert out.returncode == 0, out.stderr
    assert pods["alpha"]["status"]["podIP"] in out.stdout


def test_lab_exec_on_a_missing_pod_says_so(lab):
    out = lab.ciliary("lab", "exec", "no-such-pod", "--", "true")
    assert out.returncode != 0
    assert "pod default/no-such-pod not found" in out.stderr


def test_port_declared_twice_gets_an_event_and_stays_pending(lab, pods):
    lab.apply("""
apiVersion: v1
kind: Pod
metadata: {name: clash}
spec:
  nodeName: node-1
  containers:
  - {name: a, image: lab, ports: [{containerPort: 9000}]}
  - {name: b, image: lab, ports: [{containerPort: 9000}]}
""")
    reasons = _wait_event(lab, "clash", "PortConflict")
    assert "9000/TCP is declared twice" in reasons
    assert lab.pod("clash")["status"]["phase"] == "Pending"
    # the rest of the lab keeps working
    assert lab.probe("http", pods["beta"]["status"]["podIP"], 80, pod="alpha").returncode == 0
    lab.kubectl("delete", "pod", "clash", "--wait=false")


def test_pod_bound_to_a_missing_node_gets_an_event(lab):
    lab.apply("""
apiVersion: v1
kind: Pod
metadata: {name: lost}
spec:
  nodeName: node-9
  containers: [{name: a, image: lab}]
""")
    message = _wait_event(lab, "lost", "NodeNotFound")
    assert "node-9" in message
    assert lab.pod("lost")["status"].get("phase", "Pending") == "Pending"
    lab.kubectl("delete", "pod", "lost", "--wait=false", "--grace-period=0", "--force")


def _host_veths(lab, node: str) -> set[str]:
    out = topology.ip("-o", "link", "show", "type", "veth", netns=lab.lab.layout.node_netns(node)).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_deleting_a_pod_removes_its_namespace_and_workload(lab, pods):
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
    netns, cgroup = lab.lab.pod_target("shortlived", "default")
    assert netns.exists() and cgroup is not None and cgroups.pids(cgroup)
    lab.kubectl("delete", "pod", "shortlived", "--timeout=60s")
    assert not netns.exists()
    assert not cgroup.exists()
    # compare against the pod's own veth: an earlier test's pod deleted with --wait=false may
    # still be tearing down, so its veth can vanish from ``before`` meanwhile
    after = _host_veths(lab, "node-2")
    assert not added & after and after <= before


def test_lab_env_gives_etcdctl_the_locked_down_etcd(lab):
    """``eval $(ciliary lab env)`` points etcdctl at the TLS-only etcd as its root user; each agent
    registered with its own etcd user; without a client certificate etcd refuses."""
    script = "\n".join([*lab.lab.env_lines(), "etcdctl get --prefix --keys-only /ciliary/nodes/v1/",
                        "etcdctl user list"])
    env = lab.env()
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "/ciliary/nodes/v1/node-1" in done.stdout and "/ciliary/nodes/v1/node-2" in done.stdout
    for user in ("root", "ciliary-operator", "ciliary-node-node-1", "ciliary-node-node-2", "kube-apiserver"):
        assert user in done.stdout.split()
    assert all(line.startswith("export ETCDCTL_ENDPOINTS=https://") for line in lab.lab.env_lines()
               if line.startswith("export ETCDCTL_ENDPOINTS="))
    no_cert = subprocess.run(["bash", "-c", "\n".join([*lab.lab.env_lines(), "unset ETCDCTL_CERT ETCDCTL_KEY",
                                                          "etcdctl --dial-timeout=3s get /ciliary/"])],
                             capture_output=True, text=True, timeout=60, env=env)
    assert no_cert.returncode != 0


def test_lab_down_removes_everything(lab, pods):
    layout = lab.lab.layout
    node_ns = layout.node_netns("node-1")
    cg_root = cgroups.lab_root(layout.cgroup_name)
    pids = [processes.running_pid(layout, n) for n in processes.names(layout)]
    assert topology.netns_exists(node_ns) and cg_root.exists() and all(pids)
    out = lab.ciliary("lab", "down")
    assert out.returncode == 0, out.stderr
    assert [ns for ns in topology.list_netns() if layout.owns_netns(ns)] == []
    assert not cg_root.exists()
    assert not layout.state_dir.exists()
    for pid in pids:
        assert pid is not None and not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    leftovers = subprocess.run(["pgrep", "-f", str(layout.state_dir)], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_event(lab, name: str, reason: str, seconds: float = 60) -> str:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for event in lab.events(name):
            if event["reason"] == reason:
                return str(event["message"])
        time.sleep(0.5)
    pytest.fail(f"no {reason} event for pod {name} within {seconds} s: {lab.events(name)}")
