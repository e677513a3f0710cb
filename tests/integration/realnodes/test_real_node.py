"""Real lab nodes: containerd + kubelet in node namespaces, pods through ciliary-cni.

A throwaway lab (its own prefix and state directory) brought up by ``ciliary.lab.reallab.up``: the
lab's control plane plus the flags real nodes need, the node gateway, the lab registry,
kube-scheduler and each node's Ciliary agent; two nodes whose kubelets register through the relay
in their namespaces. Pods on the two nodes reach each other. An agnhost pod is scheduled, runs with an
address from the node's pod CIDR (ciliary-cni's IPAM), answers ``kubectl exec``, shows its
output in ``kubectl logs`` and serves through ``kubectl port-forward`` (all three travel apiserver →
egress selector → gateway → kubelet); deleting it releases its address through CNI DEL. An image pushed to the lab registry (distribution,
on the root namespace's loopback) is pulled by the node's containerd through the gateway's relay. The
root namespace gains no lab address or route. Everything is torn down afterwards, also on failure.
"""

from __future__ import annotations

import ipaddress
import json
import select
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ciliary.lab import kubeletnode, nodehost, processes, realcluster, reallab, sessions, topology
from ciliary.lab.lab import Lab
from ciliary.lab.layout import Binaries, pod_cidr
from realnode_lab import ROOT, lab_images, node_binaries

pytestmark = pytest.mark.integration
NODE = "node-1"
NODES = ["node-1", "node-2"]


@dataclass
class RealLab:
    lab: Lab
    nodes: list[kubeletnode.RealNode]
    registry_port: int

    @property
    def node(self) -> kubeletnode.RealNode:
        return self.nodes[0]

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.lab.bins.kubectl), f"--kubeconfig={self.lab.layout.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=timeout)

    def log_tail(self, name: str) -> str:
        path = self.lab.layout.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def root_addresses() -> str:
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout + \
        subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout


def machine_wide_entries() -> set[str]:
    """Entries a node may add to machine-wide directories (shim sockets, libcni's result cache)."""
    found = set()
    for d in (kubeletnode.SHIM_SOCKETS, kubeletnode.CNI_RESULTS, kubeletnode.CONTAINER_LOGS):
        found |= {str(p) for p in d.iterdir()} if d.is_dir() else set()
    return found


@pytest.fixture(scope="module")
def real_lab() -> Iterator[RealLab]:
    node_binaries()
    lab_images()
    sessions.reap_stale(ROOT, "realnode", "r")
    layout = sessions.session_layout(ROOT, "realnode", "r")
    lab = Lab(layout, Binaries.discover())
    before = root_addresses()
    machine_wide = machine_wide_entries()
    nodes: list[kubeletnode.RealNode] = []
    try:
        nodes = reallab.up(lab, NODES, say=print)
        yield RealLab(lab, nodes, realcluster.registry_port(layout))
        assert root_addresses() == before, "the root namespace gained an address or route"
    finally:
        lab.down(log=False)
        for name in NODES:
            paths = kubeletnode.node_paths(layout, name)
            assert not paths.state.exists() and not paths.run.exists()
            assert not kubeletnode.mounts_under([paths.state, paths.run], Path("/proc/self/mountinfo").read_text())
            assert not nodehost.pids_under(nodehost.cgroup_layout(), paths.cgroup_root)
            assert not any((m / paths.cgroup_root.lstrip("/")).exists() for m in nodehost.cgroup_layout().hierarchies())
            assert not topology.netns_exists(layout.node_netns(name))
        assert machine_wide_entries() <= machine_wide, machine_wide_entries() - machine_wide


def wait_for(what: str, check, seconds: float, on_timeout) -> object:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached within {seconds:.0f} s\n{on_timeout()}")


POD = """
apiVersion: v1
kind: Pod
metadata: {name: agnhost, namespace: default}
spec:
  nodeSelector: {kubernetes.io/hostname: node-1}
  containers:
  - name: agnhost
    image: registry.k8s.io/e2e-test-images/agnhost:2.56
    imagePullPolicy: Never
    args: ["netexec", "--http-port=8080"]
    ports: [{containerPort: 8080}]
  terminationGracePeriodSeconds: 1
"""


def test_a_real_node_runs_a_pod_through_ciliary_cni_with_exec_and_logs(real_lab: RealLab) -> None:
    lab = real_lab

    applied = lab.kubectl("apply", "-f", "-", input=POD)
    assert applied.returncode == 0, applied.stderr

    def pod_running() -> dict[str, object] | None:
        out = lab.kubectl("get", "pod", "agnhost", "-o", "json")
        pod = json.loads(out.stdout) if out.returncode == 0 else {}
        return pod if pod.get("status", {}).get("phase") == "Running" else None

    pod = wait_for("agnhost pod Running", pod_running, 120, lambda: "\n".join([
        lab.kubectl("describe", "pod", "agnhost").stdout, lab.log_tail(f"kubelet-{NODE}")[-2000:],
        lab.log_tail(f"containerd-{NODE}")[-2000:]]))
    assert isinstance(pod, dict)
    assert pod["spec"]["nodeName"] == NODE  # bound by kube-scheduler
    pod_ip = ipaddress.ip_address(pod["status"]["podIP"])
    assert pod_ip in ipaddress.ip_network(pod_cidr(1))
    allocated = list((lab.node.paths.ipam_dir).rglob("*"))
    assert any(str(pod_ip) in p.name for p in allocated), allocated  # ciliary-cni's IPAM holds the address

    exec_out = lab.kubectl("exec", "agnhost", "--", "sh", "-c", "echo exec-$((40 + 2))")
    assert exec_out.returncode == 0 and exec_out.stdout.strip() == "exec-42", exec_out.stderr
    hostname = lab.kubectl("exec", "agnhost", "--", "cat", "/etc/hostname")
    assert hostname.returncode == 0 and hostname.stdout.strip() == "agnhost", hostname.stderr
    addr = lab.kubectl("exec", "agnhost", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert addr.returncode == 0 and str(pod_ip) in addr.stdout, addr.stdout + addr.stderr

    logs = wait_for("netexec start-up line in kubectl logs",
                    lambda: (lambda o: o.stdout if o.returncode == 0 and o.stdout.strip() else None)(
                        lab.kubectl("logs", "agnhost")), 30, lambda: lab.kubectl("logs", "agnhost").stderr)
    assert "8080" in str(logs)

    # port-forward: kubectl listens on the root namespace's loopback, the stream goes through the kubelet
    forward = subprocess.Popen([str(lab.lab.bins.kubectl), f"--kubeconfig={lab.lab.layout.kubeconfig}",
                                "port-forward", "pod/agnhost", ":8080"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert forward.stdout is not None
        ready, _, _ = select.select([forward.stdout], [], [], 30)
        assert ready, "kubectl port-forward printed nothing within 30 s"
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"
        assert "127.0.0.1:" in line, line + (forward.stderr.read() if forward.poll() is not None and forward.stderr else "")
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hostname", timeout=10) as resp:
            assert resp.read().decode().strip() == "agnhost"
    finally:
        forward.terminate()
        forward.wait(10)

    # deletion goes back through the runtime: CNI DEL releases the address
    deleted = lab.kubectl("delete", "pod", "agnhost", "--wait=true", "--timeout=60s")
    assert deleted.returncode == 0, deleted.stderr
    wait_for("address released by CNI DEL", lambda: not any(str(pod_ip) in p.name for p in
                                                            lab.node.paths.ipam_dir.rglob("*")),
             30, lambda: lab.log_tail(f"containerd-{NODE}")[-2000:])
    assert all(lab.node.alive().values()), lab.node.alive()
    assert processes.running_pid(lab.lab.layout, realcluster.GATEWAY)


def test_a_node_pulls_from_the_lab_registry_through_its_relay(real_lab: RealLab) -> None:
    """An image pushed to the lab registry from the root namespace runs on the node (pulled, not imported)."""
    lab = real_lab
    pushed = f"localhost:{lab.registry_port}/lab/agnhost:pushed"
    for args in (("images", "tag", "--force", "registry.k8s.io/e2e-test-images/agnhost:2.56", pushed),
                 ("images", "push", "--plain-http", pushed),
                 ("images", "rm", pushed)):
        done = lab.node.ctr(*args, check=False, timeout=300)
        assert done.returncode == 0, f"ctr {' '.join(args)}: {done.stderr}"
    assert pushed not in lab.node.ctr("images", "list", "-q").stdout.split()
    pod = POD.replace("name: agnhost, namespace", "name: pulled, namespace").replace(
        "registry.k8s.io/e2e-test-images/agnhost:2.56", pushed).replace("imagePullPolicy: Never",
                                                                          "imagePullPolicy: Always")
    applied = lab.kubectl("apply", "-f", "-", input=pod)
    assert applied.returncode == 0, applied.stderr

    def running() -> bool:
        out = lab.kubectl("get", "pod", "pulled", "-o", "jsonpath={.status.phase}")
        return out.stdout == "Running"

    wait_for("pod from the lab registry Running", running, 120,
             lambda: lab.kubectl("describe", "pod", "pulled").stdout + lab.log_tail(f"containerd-{NODE}")[-2000:])
    assert pushed in lab.node.ctr("images", "list", "-q").stdout.split()  # pulled by the kubelet's containerd
    assert lab.kubectl("delete", "pod", "pulled", "--wait=true", "--timeout=60s").returncode == 0


def test_pods_on_two_real_nodes_reach_each_other(real_lab: RealLab) -> None:
    """Pod to pod across nodes: ciliary-cni's veths, the agents' datapath and the underlay routes."""
    lab = real_lab
    for node in NODES:
        pod = POD.replace("name: agnhost, namespace", f"name: server-{node}, namespace").replace(
            "kubernetes.io/hostname: node-1", f"kubernetes.io/hostname: {node}")
        applied = lab.kubectl("apply", "-f", "-", input=pod)
        assert applied.returncode == 0, applied.stderr

    def ips() -> dict[str, str] | None:
        out = lab.kubectl("get", "pods", "-o", "json")
        pods = {p["metadata"]["name"]: p for p in json.loads(out.stdout)["items"]} if out.returncode == 0 else {}
        found = {n: pods.get(f"server-{n}", {}).get("status", {}) for n in NODES}
        if all(st.get("phase") == "Running" and st.get("podIP") for st in found.values()):
            return {n: str(st["podIP"]) for n, st in found.items()}
        return None

    addresses = wait_for("a server pod Running on each node", ips, 120,
                         lambda: lab.kubectl("get", "pods", "-o", "wide").stdout)
    assert isinstance(addresses, dict)
    for node, ip in addresses.items():
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(pod_cidr(NODES.index(node) + 1))
    for src, dst in (("node-1", "node-2"), ("node-2", "node-1")):
        out = lab.kubectl("exec", f"server-{src}", "--", "/agnhost", "connect", f"{addresses[dst]}:8080",
                          "--timeout=5s")
        assert out.returncode == 0, f"{src} → {dst}: {out.stdout} {out.stderr}"
        body = lab.kubectl("exec", f"server-{src}", "--", "curl", "-sS", "--max-time", "5",
                           f"http://{addresses[dst]}:8080/hostname")
        assert body.returncode == 0 and body.stdout.strip() == f"server-{dst}", body.stdout + body.stderr
