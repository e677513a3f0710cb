"""``ciliary lab up --kube-proxy``: the real kube-proxy proxies the lab's Services instead of Ciliary.

A lab of its own (two nodes, kube-proxy in iptables mode): a ClusterIP answers from a pod on the other
node and a NodePort answers from the world host, both through kube-proxy's rules in the node namespace
(its chains name the Service), while Ciliary's load balancer is off: the agents attach no socket
programs, the operator writes no load-balancing intent. A lab keeps the proxy it was brought up with.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliary.lab import processes, sessions
from ciliary.lab.lab import Lab, LabError
from ciliary.lab.layout import Binaries
from ciliary.operator.store import access
from lab_harness import LabHandle

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
#: process lab: `ciliary lab up --kube-proxy` is a switch of the process lab (the peer of bench_kube_proxy);
#: the real-node lab installs Ciliary by its chart with the load balancer on
REAL_NODES = False
MANIFESTS = """
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  nodeName: node-2
  containers: [{name: c, image: lab, ports: [{containerPort: 8080, name: http}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec: {nodeName: node-1, containers: [{name: c, image: lab}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: http, nodePort: 30280}]
"""


@pytest.fixture(scope="module")
def kp_lab() -> Iterator[LabHandle]:
    sessions.reap_stale(ROOT, "kubeproxy", "y")
    handle = LabHandle(Lab(sessions.session_layout(ROOT, "kubeproxy", "y"), Binaries.discover()))
    try:
        handle.lab.up(2, log=False, kube_proxy="iptables")
        handle.apply(MANIFESTS)
        handle.wait_running("web")
        handle.wait_running("client")
        yield handle
    finally:
        handle.lab.down(log=False)


def answered(lab: LabHandle, ip: str, port: int, *, pod: str | None = None, world: bool = False) -> bool:
    for _ in range(40):  # kube-proxy applies changes at most once a second
        if lab.probe("http", ip, port, pod=pod, world=world, timeout=1.0).returncode == 0:
            return True
    return False


def test_kube_proxy_serves_cluster_ip_and_node_port_and_ciliary_lb_is_off(kp_lab: LabHandle) -> None:
    layout = kp_lab.lab.layout
    assert kp_lab.lab.kube_proxy_mode() == "iptables"
    for node in ("node-1", "node-2"):
        assert processes.running_pid(layout, f"kube-proxy-{node}"), f"no kube-proxy on {node}"
    cluster_ip = json.loads(kp_lab.kubectl("get", "svc", "web", "-o", "json").stdout)["spec"]["clusterIP"]
    assert answered(kp_lab, cluster_ip, 80, pod="client"), "ClusterIP not answered from a pod"
    assert answered(kp_lab, "192.0.2.11", 30280, world=True), "NodePort not answered from the world host"
    rules = subprocess.run(["ip", "netns", "exec", layout.node_netns("node-1"), "iptables-save", "-t", "nat"],
                           capture_output=True, text=True, check=True).stdout
    assert f"-d {cluster_ip}/32" in rules and "default/web" in rules, "kube-proxy's rules do not name the Service"
    # Ciliary's load balancer is off: agents without --lb-cgroup, operator without Service intents
    for node in ("node-1", "node-2"):
        pid = processes.running_pid(layout, f"agent-{node}")
        assert pid and b"--lb-cgroup" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    operator = processes.running_pid(layout, "operator")
    assert operator and b"--no-load-balancing" in Path(f"/proc/{operator}/cmdline").read_bytes()
    root = kp_lab.lab.etcd_certs().client(access.ROOT_USER)
    keys = subprocess.run([str(kp_lab.lab.bins.etcdctl), "--endpoints", kp_lab.lab.ports().etcd_endpoint,
                           "--cacert", str(root.ca_file), "--cert", str(root.cert_file), "--key", str(root.key_file),
                           "get", "--prefix", "--keys-only", "/ciliary/"], capture_output=True, text=True, check=True)
    assert "/ciliary/intents/" in keys.stdout or "/ciliary/nodes/" in keys.stdout, keys.stdout  # etcd was read
    assert "/ciliary/lbintents/" not in keys.stdout, "the operator wrote load-balancing intents"


def test_a_lab_keeps_the_proxy_it_was_brought_up_with(kp_lab: LabHandle) -> None:
    with pytest.raises(LabError, match="kube-proxy iptables"):
        kp_lab.lab.up(2, log=False, kube_proxy="nftables")
    assert answered(kp_lab, "192.0.2.12", 30280, world=True), "the lab broke after the refused switch"
