"""Per-node policy status on real nodes: status.nodes, Enforced, Valid, a dead agent, a removed node.

On the session's real-node lab (kubelets, Ciliary installed by its chart). Pods: deathstar-1 and xwing on the
node that hosts the chart's etcd (the *keeper*), deathstar-2 on the other node (the *victim*). The last tests
break the victim as clusters break, and put it back afterwards, also on failure:

- the victim's kubelet stops and its agent container is killed (SIGKILL from the host, as the OOM killer
  would): nothing restarts it, its etcd lease expires and its status entry goes, Enforced turns False;
- the victim's Node object is deleted while its kubelet is down: the policy is Enforced again on the one node
  left;
- the chart with ``agent.directStatus=true`` (``--no-enable-k8s-event-handover``): each agent patches
  ``.status.nodes`` itself.

The victim comes back as a node comes back to a cluster: its Node object, its kubelet, a new agent pod from the
DaemonSet that enrols again with etcd.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliary.lab import chartinstall, kubeletnode, processes, reallab, tools
from lab_harness import LabHandle, wait_for
from realnode_lab import ChartLab, ensure_installed

pytestmark = pytest.mark.e2e
#: on the session's real-node lab: the dead agent and the removed node are a real kubelet's and Node's
REAL_NODES = True
ROOT = Path(__file__).resolve().parents[1]
NS = "policy-status"
LEASE_TTL = 10  # charts/ciliary/values.yaml agent.leaseTTL

RULE1 = (ROOT / "crds" / "examples" / "starwars-rule1.yaml").read_text()
INVALID = (ROOT / "crds" / "invalid" / "l7-on-udp.yaml").read_text()
XWING_ONLY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xwing-only}
spec:
  endpointSelector: {matchLabels: {class: xwing}}
  ingress: [{fromEndpoints: [{matchLabels: {org: alliance}}]}]
"""
KAFKA_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-l7}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  egress:
  - toEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {kafka: [{role: produce, topic: empire-announce}]}
"""
"""Kafka rules: not enforced (no Kafka proxy), the support table's partial row ``kafka``: fail closed, the
port's connections are dropped (HTTP rules, ingress and egress, are enforced by the node's Envoy:
e2e/test_l7_http.py, e2e/test_l7_http_egress.py)."""


def pods(keeper: str, victim: str) -> str:
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: deathstar-1, namespace: {NS}, labels: {{org: empire, class: deathstar}}}}
spec: {{nodeName: {keeper}, containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: deathstar-2, namespace: {NS}, labels: {{org: empire, class: deathstar}}}}
spec: {{nodeName: {victim}, containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: xwing, namespace: {NS}, labels: {{org: alliance, class: xwing}}}}
spec: {{nodeName: {keeper}, containers: [{{name: c, image: lab}}]}}
"""


class Nodes:
    """The keeper (hosts the chart's etcd, never broken) and the victim, and how the victim is put back."""

    def __init__(self, lab: LabHandle, chart: ChartLab) -> None:
        self.lab, self.chart = lab, chart
        self.keeper = lab.chart_etcd_node()
        self.victim = next(n for n in lab.lab.node_names() if n != self.keeper)
        self.broken_agents: set[str] = set()  # uids of the victim's agent pods when it was broken

    def real(self, node: str) -> kubeletnode.RealNode:
        return next(n for n in self.chart.nodes if n.node == node)

    def pods(self, component: str, node: str | None = None) -> list[dict[str, Any]]:
        """The chart's pods of ``component`` (on ``node``), leaving out those already being deleted."""
        where = ["--field-selector", f"spec.nodeName={node}"] if node else []
        out = self.lab.kubectl("get", "pods", "-n", chartinstall.NAMESPACE, "-l",
                               f"app.kubernetes.io/part-of=ciliary,app.kubernetes.io/component={component}",
                               *where, "-o", "json")
        return [p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]

    def break_victim(self) -> int:
        """Cordon the victim and move the operator (one replica, no election) off it, so its garbage-collected
        pods never leave two operators running; stop its kubelet. Returns its agent container's pid."""
        self.lab.kubectl("cordon", self.victim)
        self.broken_agents = {p["metadata"]["uid"] for p in self.pods("agent", self.victim)}
        moved = [p["metadata"]["name"] for p in self.pods("operator", self.victim)]
        if moved:
            self.lab.kubectl("delete", "pod", "-n", chartinstall.NAMESPACE, *moved, "--wait=true", "--timeout=90s")
            ensure_installed(self.chart, ready_seconds=180)
        pid = kubeletnode.container_pid(self.lab.lab.layout, self.pods("agent", self.victim)[0], "agent")
        assert processes.stop(self.lab.lab.layout, self.real(self.victim).proc_name("kubelet"))
        return pid

    def restore(self) -> None:
        """The victim back in the cluster: its Node object (the lab's labels and pod CIDR), its kubelet,
        uncordoned; a new agent pod there (enrolled with etcd again: the enroller may have removed the node's
        etcd user while its Node was gone); the lab's own chart values; every chart workload Ready."""
        if self.lab.kubectl("get", "node", self.victim, check=False).returncode != 0:
            self.lab.lab.create_nodes([self.victim])
        self.real(self.victim).start_kubelet()
        reallab.wait_ready(self.lab.lab, [self.real(self.victim)], 180)
        self.lab.kubectl("uncordon", self.victim)
        if self.broken_agents:
            stale = [p["metadata"]["name"] for p in self.pods("agent", self.victim)
                     if p["metadata"]["uid"] in self.broken_agents]
            if stale:
                self.lab.kubectl("delete", "pod", "-n", chartinstall.NAMESPACE, *stale, "--wait=true",
                                 "--timeout=90s", check=False)
            wait_for(f"a new agent pod Ready on {self.victim}", lambda: any(
                p["metadata"]["uid"] not in self.broken_agents and any(
                    c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
                for p in self.pods("agent", self.victim)), 180)
            self.broken_agents = set()
        reallab.install_chart(self.lab.lab, ROOT)  # the direct-mode test changes the values
        ensure_installed(self.chart, ready_seconds=240)


@pytest.fixture(scope="module")
def nodes(lab: LabHandle, chart_lab: ChartLab) -> Iterator[Nodes]:
    placed = Nodes(lab, chart_lab)
    lab.apply(pods(placed.keeper, placed.victim))
    for name in ("deathstar-1", "deathstar-2", "xwing"):
        lab.wait_running(name, NS)
    try:
        yield placed
    finally:
        placed.restore()
        lab.kubectl("delete", "namespace", NS, "--wait=true", "--timeout=120s", check=False)


def apply(lab: LabHandle, manifest: str) -> None:
    lab.kubectl("apply", "-n", NS, "-f", "-", input=manifest)


def status(lab: LabHandle, name: str) -> dict[str, Any]:
    out = lab.kubectl("get", "cnp", name, "-n", NS, "-o", "json", check=False)
    return dict(json.loads(out.stdout).get("status", {})) if out.returncode == 0 else {}


def condition(st: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions", []) if c["type"] == kind), {})


def wait_status(lab: LabHandle, name: str, predicate: Callable[[dict[str, Any]], bool], seconds: float,
                what: str) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = status(lab, name)
        if predicate(st):
            return st
        time.sleep(0.5)
    pytest.fail(f"{what} not reached within {seconds} s; status: {json.dumps(st, indent=1)}")


def enforced_on(nodes: set[str]) -> Callable[[dict[str, Any]], bool]:
    return lambda s: condition(s, "Enforced").get("status") == "True" and set(s.get("nodes") or {}) == nodes


def test_rule1_is_enforced_on_each_node_hosting_a_deathstar(lab: LabHandle, nodes: Nodes) -> None:
    apply(lab, RULE1)
    done = lab.kubectl("wait", "-n", NS, "--for=condition=Enforced", "--timeout=60s", "cnp/rule1", check=False)
    assert done.returncode == 0, done.stderr
    st = status(lab, "rule1")
    assert set(st["nodes"]) == {nodes.keeper, nodes.victim}
    for node, entry in st["nodes"].items():
        assert entry["ok"] and entry["enforcing"], (node, entry)
        assert entry["localPolicyRevision"] >= 1 and "error" not in entry
    assert st["enforcement"] == "2/2 nodes"
    assert condition(st, "Valid")["status"] == "True"
    assert condition(st, "Enforced")["observedGeneration"] == 1
    printed = lab.kubectl("get", "cnp", "rule1", "-n", NS).stdout
    assert "True" in printed and "2/2 nodes" in printed


def test_a_node_hosting_no_selected_endpoint_is_not_listed(lab: LabHandle, nodes: Nodes) -> None:
    apply(lab, XWING_ONLY)
    try:
        st = wait_status(lab, "xwing-only", enforced_on({nodes.keeper}), 60, f"Enforced on {nodes.keeper} alone")
        assert st["enforcement"] == "1/1 nodes", st
    finally:
        lab.kubectl("delete", "cnp", "xwing-only", "-n", NS, check=False)


def test_invalid_policy_shows_its_error(lab: LabHandle, nodes: Nodes) -> None:
    apply(lab, INVALID)
    try:
        st = wait_status(lab, "l7-on-udp", lambda s: condition(s, "Valid").get("status") == "False", 30,
                         "Valid=False")
        assert "http rules need protocol TCP, not UDP" in condition(st, "Valid")["message"]
        assert condition(st, "Enforced").get("status") != "True"
    finally:
        lab.kubectl("delete", "cnp", "l7-on-udp", "-n", NS, check=False)


def test_kafka_rules_are_never_enforced_true_and_fail_closed(lab: LabHandle, nodes: Nodes) -> None:
    """Kafka rules are not enforced (no Kafka proxy): they fail closed. Every node reports the policy not
    enforcing, naming the missing proxy; Enforced=False naming the field, a Warning Event, and a request on
    the port (which the Kafka rules would judge) is dropped, never passed at L3/L4."""
    ip = lab.pod("deathstar-1", NS)["status"]["podIP"]
    assert lab.probe("http", ip, 80, pod="deathstar-2", namespace=NS, timeout=3).returncode == 0  # before
    apply(lab, KAFKA_L7)
    try:
        st = wait_status(lab, "kafka-l7", lambda s: condition(s, "Enforced").get("reason") == "NodesNotEnforcing"
                         and s.get("enforcement") == "0/2 nodes" and len(s.get("nodes") or {}) == 2, 60,
                         "Enforced=False, NodesNotEnforcing on 0/2 nodes")
        enforced = condition(st, "Enforced")
        assert enforced["status"] == "False" and enforced["observedGeneration"] == 1
        assert "spec.egress[0].toPorts[0].rules.kafka" in enforced["message"], enforced
        assert "PROXY_UNAVAILABLE" in enforced["message"], enforced
        assert condition(st, "Valid")["status"] == "True"
        for entry in st["nodes"].values():  # applied (ok) but not enforcing, naming the missing proxy
            assert entry["ok"] and not entry["enforcing"], st["nodes"]
            assert "no egress kafka proxy" in entry.get("error", ""), st["nodes"]
        deadline = time.monotonic() + 30
        events: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            events = [e for e in lab.events("kafka-l7", NS) if e.get("reason") == "PolicyPartiallyEnforced"]
            if events:
                break
            time.sleep(0.5)
        assert events, lab.events("kafka-l7", NS)
        assert events[0]["type"] == "Warning" and "rules.kafka" in events[0]["message"]
        assert events[0]["involvedObject"]["kind"] == "CiliumNetworkPolicy"
        # fail closed: nothing parses Kafka on the way out, so the port's connections are dropped
        assert lab.probe("http", ip, 80, pod="deathstar-2", namespace=NS, timeout=3).returncode != 0
    finally:
        lab.kubectl("delete", "cnp", "kafka-l7", "-n", NS, check=False)


def test_direct_mode_agents_write_status_nodes(lab: LabHandle, nodes: Nodes) -> None:
    """``agent.directStatus=true`` (the operator's ``--no-enable-k8s-event-handover``): the agents patch
    ``.status.nodes`` themselves; Enforced still works. The lab's own values are put back afterwards."""
    try:
        done = chartinstall.helm(tools.built_path("helm"), lab.lab.layout.kubeconfig, "upgrade",
                                 chartinstall.RELEASE, str(ROOT / "charts" / "ciliary"), "-n", chartinstall.NAMESPACE,
                                 "--reuse-values", "--set", "agent.directStatus=true")
        assert done.returncode == 0, done.stderr
        ensure_installed(nodes.chart, ready_seconds=240)
        for agent in nodes.pods("agent"):  # the agents run in direct mode (the chart's switch reached the processes)
            pid = kubeletnode.container_pid(lab.lab.layout, agent, "agent")
            assert b"CILIARY_AGENT_DIRECT_STATUS=on" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        lab.kubectl("delete", "cnp", "rule1", "-n", NS, "--wait=true")
        apply(lab, RULE1)
        st = wait_status(lab, "rule1", enforced_on({nodes.keeper, nodes.victim}), 90, "direct-mode status")
        assert all(e["enforcing"] for e in st["nodes"].values()), st
    finally:
        reallab.install_chart(lab.lab, ROOT)
        ensure_installed(nodes.chart, ready_seconds=240)


def test_agent_killed_and_not_restarted_turns_its_entry_stale(lab: LabHandle, nodes: Nodes) -> None:
    wait_status(lab, "rule1", enforced_on({nodes.keeper, nodes.victim}), 60, "rule1 enforced on both nodes")
    pid = nodes.break_victim()  # its kubelet stopped: nothing restarts the agent now
    os.kill(pid, signal.SIGKILL)
    st = wait_status(lab, "rule1", lambda s: nodes.victim not in s.get("nodes", {}), LEASE_TTL + 15,
                     f"{nodes.victim}'s entry removed after its lease expired")
    assert condition(st, "Enforced")["status"] == "False"
    assert nodes.victim in condition(st, "Enforced")["message"]
    assert st["enforcement"] == "1/2 nodes"


def test_removed_node_disappears_from_status(lab: LabHandle, nodes: Nodes) -> None:
    """The victim's Node deleted (its kubelet still down): the node left the cluster, so its entry is no longer
    expected; the policy is Enforced again on the keeper, 1/1 nodes (the pod garbage collector deletes the
    victim's pods later)."""
    lab.kubectl("delete", "node", nodes.victim, "--wait=true", "--timeout=60s")
    st = wait_status(lab, "rule1", enforced_on({nodes.keeper}), 150,
                     f"Enforced again once {nodes.victim} left the cluster")
    assert st["enforcement"] == "1/1 nodes"
    assert lab.kubectl("get", "node", nodes.victim, check=False).returncode != 0
