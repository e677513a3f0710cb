"""Enforcement across an agent crash: the Star Wars pods, rule1, and ``kill -9`` of deathstar's agent.

tiefighter (org=empire) lands on the deathstar, xwing (org=alliance) times out. Then,
while both keep connecting (2 connections per 100 ms for about 10 s), the agent of
deathstar's node is killed with SIGKILL and restarted the way the lab starts it: no
allowed connection fails, no denied connection succeeds, and the restarted agent
adopts the pinned datapath (no program attached again) and reports again.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ciliary.lab import processes
from ciliary.operator.store import access, keyspace
from ciliary.operator.store.etcdclient import EtcdEndpoint, make_client
from lab_harness import wait_for

pytestmark = pytest.mark.e2e
#: process lab: it stops and restarts the agent *process* (ciliary.lab.processes) and reads the control plane's
#: etcd as the node's user; on real nodes the agent is a DaemonSet pod and Ciliary's etcd the chart's (not ported)
REAL_NODES = False

ROOT = Path(__file__).resolve().parents[1]
PODS = """
apiVersion: v1
kind: Pod
metadata: {name: deathstar, labels: {org: empire, class: deathstar}}
spec:
  nodeName: node-2
  containers: [{name: web, image: lab, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: tiefighter, labels: {org: empire, class: tiefighter}}
spec:
  nodeName: node-1
  containers: [{name: c, image: lab}]
---
apiVersion: v1
kind: Pod
metadata: {name: xwing, labels: {org: alliance, class: xwing}}
spec:
  nodeName: node-1
  containers: [{name: c, image: lab}]
"""

# Runs inside a pod's netns: `rounds` rounds, each `per_round` connects, one round per 100 ms.
LOOP = """
import json, socket, sys, time
ip, port, rounds, per_round = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ok = fail = 0
for _ in range(rounds):
    began = time.monotonic()
    for _ in range(per_round):
        try:
            with socket.create_connection((ip, port), timeout=0.5):
                ok += 1
        except OSError:
            fail += 1
    time.sleep(max(0.0, 0.1 - (time.monotonic() - began)))
print(json.dumps({"ok": ok, "fail": fail}))
"""


def landed(lab: Any, pod: str, ip: str) -> bool:
    return lab.probe("http", ip, 80, pod=pod, timeout=1.5).returncode == 0


def traffic(lab: Any, pod: str, ip: str, rounds: int) -> subprocess.Popen[str]:
    netns, _ = lab.lab.pod_target(pod, "default")  # the pod's namespace file
    return subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-c", LOOP, ip, "80",
                             str(rounds), "2"], stdout=subprocess.PIPE, text=True)


def enforcement(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/enforcement", timeout=2) as r:
            return dict(json.loads(r.read()))
    except OSError:
        return None


def reports_of(lab: Any, node: str) -> list[dict[str, Any]]:
    """``node``'s reports, read with its own agent's etcd credentials (its prefix is all it may list)."""

    async def get() -> list[dict[str, Any]]:
        tls = lab.lab.etcd_certs().client(access.node_user(node))
        client = make_client(EtcdEndpoint.parse(lab.lab.ports().etcd_endpoint), tls, 5)
        try:
            rows = await client.get_prefix(keyspace.node_reports_prefix(node).encode())
            return [json.loads(kv.value) for kv in rows]
        finally:
            await client.close()

    return asyncio.run(get())


def test_kill_9_of_the_agent_keeps_enforcing_and_the_restart_adopts(lab: Any) -> None:
    lab.apply(PODS)
    deathstar = lab.wait_running("deathstar")["status"]["podIP"]
    lab.wait_running("tiefighter")
    lab.wait_running("xwing")
    lab.kubectl("apply", "-f", str(ROOT / "crds" / "examples" / "starwars-rule1.yaml"))
    wait_for("rule1 enforced (xwing dropped)", lambda: not landed(lab, "xwing", deathstar), 60)
    assert landed(lab, "tiefighter", deathstar)
    wait_for("rule1 reported ok by node-2",
             lambda: any(r["name"] == "rule1" and r["ok"] for r in reports_of(lab, "node-2")), 30)

    layout, node = lab.lab.layout, "node-2"
    port = lab.lab.health_port(node)
    before = wait_for("the agent's enforcement status", lambda: enforcement(port), 10)
    allowed = traffic(lab, "tiefighter", deathstar, rounds=100)
    denied = traffic(lab, "xwing", deathstar, rounds=20)  # each denied connect waits its 0.5 s timeout
    try:
        time.sleep(2)
        pid = processes.running_pid(layout, f"agent-{node}")
        assert pid is not None
        import os

        os.kill(pid, signal.SIGKILL)
        wait_for("the agent gone", lambda: processes.running_pid(layout, f"agent-{node}") is None, 10)
        time.sleep(1)
        lab.lab.start_node_processes(node, lab.lab.ports())
        after = wait_for("the restarted agent to apply",
                         lambda: (e := enforcement(port)) and e.get("applied_revision") is not None and e, 90)
        out_allowed, _ = allowed.communicate(timeout=60)
        out_denied, _ = denied.communicate(timeout=60)
    finally:
        for proc in (allowed, denied):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    ok_allowed, ok_denied = json.loads(out_allowed), json.loads(out_denied)
    assert ok_allowed["fail"] == 0 and ok_allowed["ok"] == 200, ok_allowed
    assert ok_denied["ok"] == 0 and ok_denied["fail"] > 0, ok_denied
    # adopted: same programs, nothing attached again, nothing to write (the pins held the state)
    assert after["program_hashes"] == before["program_hashes"]
    assert after["last_compiled"] == [] and after["last_attached"] == 0 and after["last_map_writes"] == 0
    assert after["error"] == ""
    wait_for("rule1 reported again after the restart",
             lambda: any(r["name"] == "rule1" and r["ok"] and r["enforcing"] for r in reports_of(lab, node)), 30)
    assert landed(lab, "tiefighter", deathstar) and not landed(lab, "xwing", deathstar)
