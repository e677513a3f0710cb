"""``ciliary lab up --real-nodes --kube-proxy``: the peer, where the real kube-proxy alone proxies Services.

A real-node lab of its own (two kubelets, Ciliary installed by its chart with its load balancer off,
kube-proxy in iptables mode in every node namespace): a ClusterIP answers from a pod on the other node and a
NodePort answers from the world host, both through kube-proxy's rules in the node namespace (its chains
name the Service), while Ciliary's load balancer is off: the agents run without the socket load balancer,
the operator without Service intents. A lab keeps the proxy it was brought up with. This is the peer
``bench/bench_kube_proxy.py`` compares against, and the bench's ``--smoke`` runs here, last, on this lab (its
peer side) and on the session's lab (Ciliary's side, when that runs without kube-proxy): the suite brings up
one peer lab, not two.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench_smoke import run
from ciliary.lab import chartinstall, kubeletnode, nodeservices, processes, reallab, sessions
from ciliary.lab.lab import Lab, LabError, mode_of
from ciliary.lab.layout import Binaries
from ciliary.operator.store import keyspace
from lab_harness import CLI_ETCDCTL, LabHandle
from realnode_lab import (
    KUBE_PROXY_REPLACEMENT,
    NODES,
    ChartLab,
    ensure_installed,
    lab_images,
    lab_mode,
    node_binaries,
)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
#: a real-node lab of its own: the session's lab runs Ciliary's load balancer (with or without kube-proxy)
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
    node_binaries()
    lab_images()
    sessions.reap_stale(ROOT, "kubeproxy", "y")
    handle = LabHandle(Lab(sessions.session_layout(ROOT, "kubeproxy", "y"), Binaries.discover()))
    try:
        reallab.up(handle.lab, NODES, chart=True, kube_proxy="iptables", ready_seconds=420)
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


def container_environ(lab: LabHandle, component: str, container: str) -> list[list[bytes]]:
    """Each running ``component`` pod's ``container`` environment, as read from its process."""
    pods = json.loads(lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, "-l",
                                  f"app.kubernetes.io/part-of=ciliary,app.kubernetes.io/component={component}",
                                  "-o", "json").stdout)["items"]
    assert pods, f"no {component} pod"
    return [Path(f"/proc/{kubeletnode.container_pid(lab.lab.layout, p, container)}/environ").read_bytes().split(b"\0")
            for p in pods]


def test_kube_proxy_serves_cluster_ip_and_node_port_and_ciliary_lb_is_off(kp_lab: LabHandle) -> None:
    layout = kp_lab.lab.layout
    assert mode_of(kp_lab.lab.config()) == "kube-proxy-iptables"
    for node in NODES:
        assert processes.running_pid(layout, nodeservices.kube_proxy_name(node)), f"no kube-proxy on {node}"
    cluster_ip = json.loads(kp_lab.kubectl("get", "svc", "web", "-o", "json").stdout)["spec"]["clusterIP"]
    assert answered(kp_lab, cluster_ip, 80, pod="client"), "ClusterIP not answered from a pod"
    assert answered(kp_lab, "192.0.2.11", 30280, world=True), "NodePort not answered from the world host"
    rules = subprocess.run(["ip", "netns", "exec", layout.node_netns("node-1"), "iptables-save", "-t", "nat"],
                           capture_output=True, text=True, check=True).stdout
    assert f"-d {cluster_ip}/32" in rules and "default/web" in rules, "kube-proxy's rules do not name the Service"
    # Ciliary's load balancer is off: agents without --lb-cgroup, the operator without Service intents
    for environ in container_environ(kp_lab, "agent", "agent"):
        assert not [v for v in environ if v.startswith(b"CILIARY_AGENT_LB_CGROUP=")], environ
        assert b"CILIARY_AGENT_NODE_NAME=node-1" in environ or b"CILIARY_AGENT_NODE_NAME=node-2" in environ
    for environ in container_environ(kp_lab, "operator", "operator"):
        assert b"CILIARY_OPERATOR_LOAD_BALANCING=false" in environ, environ
    # and it wrote none: the chart's etcd, read as the CLI reads it (`eval $(ciliary lab env)`)
    keys = kp_lab.user_shell(*(f"{CLI_ETCDCTL} get --prefix --keys-only {prefix}"
                               for prefix in (keyspace.NODES_PREFIX, keyspace.LB_INTENTS_PREFIX)))
    assert keys.returncode == 0, keys.stderr
    assert f"{keyspace.NODES_PREFIX}node-1" in keys.stdout, keys.stdout  # etcd was read
    assert keyspace.LB_INTENTS_PREFIX not in keys.stdout, "the operator wrote load-balancing intents"


def test_a_lab_keeps_the_proxy_it_was_brought_up_with(kp_lab: LabHandle) -> None:
    for switch in ({"kube_proxy_replacement": True}, {"kube_proxy": "nftables"}, {}):
        with pytest.raises(LabError, match="this lab runs with kube-proxy-iptables"):
            reallab.up(kp_lab.lab, NODES, chart=True, **switch)  # type: ignore[arg-type]
    assert answered(kp_lab, "192.0.2.12", 30280, world=True), "the lab broke after the refused switch"


def test_kube_proxy_bench_smoke(kp_lab: LabHandle, chart_lab: ChartLab) -> None:
    """The bench's peer side on this module's lab; Ciliary's on the session's lab when it runs without kube-proxy
    (else on a lab of the bench's own)."""
    ensure_installed(chart_lab)
    labs = {"iptables": kp_lab.lab.layout.state_dir}
    if lab_mode(chart_lab.lab) == KUBE_PROXY_REPLACEMENT:
        labs["ciliary"] = chart_lab.lab.layout.state_dir
    attach = [arg for mode, state_dir in labs.items() for arg in ("--lab", f"{mode}={state_dir}")]
    out = run("bench/bench_kube_proxy.py", *attach, timeout=900)  # each attached lab's prefix from its lab.json
    for state_dir in labs.values():
        assert f"lab: attached to {state_dir}" in out, out
    number = r"[0-9.,]+ ?(s|/s|MiB) \(load \d+\)"
    for what in ("program 50 Services, from first create", "one Service change at 50 (median of 3)", "  slowest of them",
                 "CRR ClusterIP from a pod, 10 Services", "RR NodePort from the world host, 50 Services",
                 "RSS at 50 Services x 3: agent vs kube-proxy", "  Ciliary's etcd: database size"):
        assert re.search(rf"^{re.escape(what)}\s+{number}\s+{number}\s+[0-9.]+x$", out, re.M), out
    assert not list(ROOT.glob(".lab-benchkp-*")), "the bench left its lab directory"
    assert kp_lab.kubectl("get", "namespace", "kpb", check=False).returncode != 0, "the bench left its namespace"
    assert chart_lab.kubectl("get", "namespace", "kpb").returncode != 0, "the bench left its namespace"
    assert answered(kp_lab, "192.0.2.11", 30280, world=True), "the peer lab stopped serving after the bench"
