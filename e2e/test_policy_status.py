"""Per-node policy status in the lab: status.nodes, Enforced, Valid, departed and dead nodes.

A lab of its own (3 nodes), because this file removes a node and kills an agent.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import aetcd
import pytest

from ciliary.lab import processes, sessions
from ciliary.lab.lab import Lab
from ciliary.lab.layout import Binaries
from ciliary.operator.store import access, keyspace
from ciliary.operator.store.etcdclient import EtcdEndpoint, make_client
from lab_harness import LabHandle

pytestmark = pytest.mark.e2e
#: process lab: a 3-node lab of its own (lab3) that removes a node and kills an agent process
REAL_NODES = False
ROOT = Path(__file__).resolve().parents[1]

PODS = """
apiVersion: v1
kind: Pod
metadata: {name: deathstar-1, labels: {org: empire, class: deathstar}}
spec: {nodeName: node-1, containers: [{name: c, image: lab, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: deathstar-2, labels: {org: empire, class: deathstar}}
spec: {nodeName: node-2, containers: [{name: c, image: lab, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: xwing, labels: {org: alliance, class: xwing}}
spec: {nodeName: node-3, containers: [{name: c, image: lab}]}
"""

RULE1 = (ROOT / "crds" / "examples" / "starwars-rule1.yaml").read_text()
INVALID = (ROOT / "crds" / "invalid" / "l7-on-udp.yaml").read_text()
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


@pytest.fixture(scope="module")
def lab3() -> Iterator[LabHandle]:
    sessions.reap_stale(ROOT, "status", "s")
    handle = LabHandle(Lab(sessions.session_layout(ROOT, "status", "s"), Binaries.discover()))
    try:
        handle.lab.up(3, log=False)
        handle.apply(PODS)
        for name in ("deathstar-1", "deathstar-2", "xwing"):
            handle.wait_running(name)
        yield handle
    finally:
        handle.lab.down(log=False)


def status(lab: LabHandle, name: str) -> dict:
    out = lab.kubectl("get", "cnp", name, "-o", "json", check=False)
    return json.loads(out.stdout).get("status", {}) if out.returncode == 0 else {}


def condition(st: dict, kind: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == kind), {})


def wait_status(lab: LabHandle, name: str, predicate, seconds: float, what: str) -> dict:
    deadline = time.monotonic() + seconds
    st: dict = {}
    while time.monotonic() < deadline:
        st = status(lab, name)
        if predicate(st):
            return st
        time.sleep(0.5)
    pytest.fail(f"{what} not reached within {seconds} s; status: {json.dumps(st, indent=1)}")


def test_rule1_is_enforced_on_each_node_hosting_a_deathstar(lab3):
    lab3.apply(RULE1)
    done = lab3.kubectl("wait", "--for=condition=Enforced", "--timeout=60s", "cnp/rule1", check=False)
    assert done.returncode == 0, done.stderr
    st = status(lab3, "rule1")
    assert set(st["nodes"]) == {"node-1", "node-2"}, "node-3 hosts no selected endpoint"
    for node, entry in st["nodes"].items():
        assert entry["ok"] and entry["enforcing"], (node, entry)
        assert entry["localPolicyRevision"] >= 1 and "error" not in entry
    assert st["enforcement"] == "2/2 nodes"
    assert condition(st, "Valid")["status"] == "True"
    assert condition(st, "Enforced")["observedGeneration"] == 1
    printed = lab3.kubectl("get", "cnp", "rule1").stdout
    assert "True" in printed and "2/2 nodes" in printed


def test_invalid_policy_shows_its_error(lab3):
    lab3.apply(INVALID)
    st = wait_status(lab3, "l7-on-udp", lambda s: condition(s, "Valid").get("status") == "False", 30, "Valid=False")
    assert "http rules need protocol TCP, not UDP" in condition(st, "Valid")["message"]
    assert condition(st, "Enforced").get("status") != "True"
    lab3.kubectl("delete", "cnp", "l7-on-udp")


def test_l7_policy_is_partially_enforced_never_true_and_says_so(lab3):
    """Kafka rules are not enforced (no Kafka proxy): they fail closed. Every node reports the policy not
    enforcing, naming the missing proxy; Enforced=False naming the field, a Warning Event, and a request on
    the port (which the Kafka rules would judge) is dropped, never passed at L3/L4."""
    ip = json.loads(lab3.kubectl("get", "pod", "deathstar-1", "-o", "json").stdout)["status"]["podIP"]
    assert lab3.probe("http", ip, 80, pod="deathstar-2", timeout=3).returncode == 0  # answered before the policy
    lab3.apply(KAFKA_L7)
    try:
        st = wait_status(lab3, "kafka-l7", lambda s: condition(s, "Enforced").get("reason") == "NodesNotEnforcing"
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
        events: list[dict] = []
        while time.monotonic() < deadline:
            events = [e for e in lab3.events("kafka-l7") if e.get("reason") == "PolicyPartiallyEnforced"]
            if events:
                break
            time.sleep(0.5)
        assert events, lab3.events("kafka-l7")
        assert events[0]["type"] == "Warning" and "rules.kafka" in events[0]["message"]
        assert events[0]["involvedObject"]["kind"] == "CiliumNetworkPolicy"
        # fail closed: nothing parses Kafka on the way out, so the port's connections are dropped
        assert lab3.probe("http", ip, 80, pod="deathstar-2", timeout=3).returncode != 0
    finally:
        lab3.kubectl("delete", "cnp", "kafka-l7")


def test_agent_killed_and_not_restarted_turns_its_entry_stale(lab3):
    layout = lab3.lab.layout
    pid = processes.running_pid(layout, "agent-node-2")
    assert pid is not None
    os.kill(pid, 9)
    ttl = 10
    t0 = time.monotonic()
    st = wait_status(lab3, "rule1", lambda s: "node-2" not in s.get("nodes", {}), ttl + 20,
                     "node-2's entry removed after its lease expired")
    assert time.monotonic() - t0 < ttl + 20
    assert condition(st, "Enforced")["status"] == "False"
    assert "node-2" in condition(st, "Enforced")["message"]
    assert st["enforcement"] == "1/2 nodes"


def test_removed_node_disappears_from_status(lab3):
    lab3.lab.remove_node("node-2", log=False)
    st = wait_status(lab3, "rule1", lambda s: condition(s, "Enforced").get("status") == "True", 60,
                     "Enforced again once node-2 left the cluster")
    assert set(st["nodes"]) == {"node-1"}
    assert st["enforcement"] == "1/1 nodes"
    # the removed node's etcd user is gone: its certificate opens nothing any more
    removed = lab3.lab.etcd_certs().client(access.node_user("node-2"))

    async def read_own_intent() -> None:
        client = make_client(EtcdEndpoint.parse(lab3.lab.ports().etcd_endpoint), removed, 5)
        try:
            await client.get(keyspace.node_intent_key("node-2").encode())
        finally:
            await client.close()

    with pytest.raises(aetcd.ClientError):
        asyncio.run(read_own_intent())


def test_direct_mode_agents_write_status_nodes(monkeypatch):
    """--no-enable-k8s-event-handover: each agent patches .status.nodes itself; Enforced still works."""
    monkeypatch.setenv("CILIARY_LAB_STATUS_MODE", "direct")
    sessions.reap_stale(ROOT, "direct", "r")
    handle = LabHandle(Lab(sessions.session_layout(ROOT, "direct", "r"), Binaries.discover()))
    try:
        handle.lab.up(2, log=False)
        handle.apply(PODS.split("---")[0] + "---" + PODS.split("---")[1])
        handle.wait_running("deathstar-1")
        handle.wait_running("deathstar-2")
        handle.apply(RULE1)
        st = wait_status(handle, "rule1", lambda s: set(s.get("nodes", {})) == {"node-1", "node-2"}
                         and condition(s, "Enforced").get("status") == "True", 60, "direct-mode status")
        assert all(e["enforcing"] for e in st["nodes"].values())
        ps = processes.running_pid(handle.lab.layout, "agent-node-1")
        assert ps is not None and b"--direct-status" in Path(f"/proc/{ps}/cmdline").read_bytes()
    finally:
        handle.lab.down(log=False)
