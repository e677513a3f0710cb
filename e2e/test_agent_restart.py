"""Enforcement across an agent crash: the Star Wars pods, rule1, and ``kill -9`` of deathstar's agent.

tiefighter (org=empire) lands on the deathstar, xwing (org=alliance) times out. Then,
while both keep connecting (2 connections per 100 ms for about 10 s), the agent of
deathstar's node is killed with SIGKILL: on real nodes the init process of the ``agent``
container of the chart's DaemonSet pod (from the host, as the kernel's OOM killer would),
which the kubelet restarts in the same pod. No allowed connection fails, no denied
connection succeeds, and the restarted agent adopts the pinned datapath (no program
attached again) and reports again. Before the kill, deathstar's record in the agent's endpoint state loses its
network-namespace cookie (as a CNI plugin older than the cookie registered it): the restarted agent reads it
again from the pod's namespace file, through the chart's mount of the node's namespace directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliary.lab import kubeletnode, processes
from ciliary.operator.store import keyspace
from ciliary.operator.store.etcdclient import EtcdEndpoint, EtcdTLS, make_client
from lab_harness import wait_for

pytestmark = pytest.mark.e2e
#: on the session's real-node lab: the agent is the chart's DaemonSet pod, killed from the host and restarted by
#: its kubelet (a deploy behaviour); Ciliary's etcd is the chart's, read through the lab's etcd forward
REAL_NODES = True

ROOT = Path(__file__).resolve().parents[1]
AGENT_SELECTOR = "app.kubernetes.io/part-of=ciliary,app.kubernetes.io/component=agent"
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


def enforcement(lab: Any, node: str) -> dict[str, Any] | None:
    try:
        return lab.agent_json(node, "/v1/enforcement", timeout=2)
    except (OSError, ValueError):
        return None


def reports_of(lab: Any, node: str) -> list[dict[str, Any]]:
    """``node``'s reports, read as ``ciliary-reader`` (``ciliary lab env``), through the lab's forward to the
    chart's etcd."""
    env = lab.lab.env()
    assert "CILIARY_ETCD_ENDPOINTS" in env, "no forward to the chart's etcd (ciliary lab env)"
    endpoint = env["CILIARY_ETCD_ENDPOINTS"]
    tls = EtcdTLS(Path(env["CILIARY_ETCD_CA_FILE"]), Path(env["CILIARY_ETCD_CERT_FILE"]),
                  Path(env["CILIARY_ETCD_KEY_FILE"]))

    async def get() -> list[dict[str, Any]]:
        client = make_client(EtcdEndpoint.parse(endpoint), tls, 5)
        try:
            rows = await client.get_prefix(keyspace.node_reports_prefix(node).encode())
            return [json.loads(kv.value) for kv in rows]
        finally:
            await client.close()

    return asyncio.run(get())


def agent_pod(lab: Any, node: str) -> dict[str, Any]:
    out = lab.kubectl("get", "pods", "-n", "kube-system", "-l", AGENT_SELECTOR, "-o", "json")
    found = [p for p in json.loads(out.stdout)["items"] if p["spec"].get("nodeName") == node]
    assert len(found) == 1, [p["metadata"]["name"] for p in found]
    return dict(found[0])


def restarts(pod: dict[str, Any]) -> int:
    return next(int(c.get("restartCount", 0)) for c in pod["status"].get("containerStatuses", [])
                if c["name"] == "agent")


def kill_agent(lab: Any, node: str) -> Callable[[], bool]:
    """SIGKILL ``node``'s agent (its container's init process); returns a check that its kubelet has
    started it again."""
    pod = agent_pod(lab, node)
    before = restarts(pod)
    os.kill(kubeletnode.container_pid(lab.lab.layout, pod, "agent"), signal.SIGKILL)
    return lambda: restarts(agent_pod(lab, node)) > before


#: the agent's endpoint state in the node's view (the chart's agent.stateDir)
ENDPOINTS_FILE = "/var/lib/ciliary/agent/endpoints.json"


def in_node_mounts(lab: Any, node: str, *argv: str, input: str | None = None) -> str:
    """``argv`` in ``node``'s mount namespace (its containerd's), where the agent's state directory is."""
    pid = processes.running_pid(lab.lab.layout, f"containerd-{node}")
    assert pid, f"{node}: no containerd"
    out = subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", *argv], input=input, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def cookie_of(lab: Any, node: str, pod: str) -> int:
    records = json.loads(in_node_mounts(lab, node, "cat", ENDPOINTS_FILE))["endpoints"]
    return int(next(e for e in records if e["podName"] == pod).get("netnsCookie", 0))


def forget_cookie(lab: Any, node: str, pod: str) -> None:
    """The pod's record as a CNI plugin older than the cookie wrote it (replaced atomically)."""
    document = json.loads(in_node_mounts(lab, node, "cat", ENDPOINTS_FILE))
    for record in document["endpoints"]:
        if record["podName"] == pod:
            record.pop("netnsCookie", None)
    in_node_mounts(lab, node, "sh", "-c", f"cat > {ENDPOINTS_FILE}.e2e && mv {ENDPOINTS_FILE}.e2e {ENDPOINTS_FILE}",
                   input=json.dumps(document))


@pytest.fixture
def starwars(lab: Any) -> Iterator[None]:
    """The scene's pods and rule1, removed afterwards (the lab is shared with later modules)."""
    try:
        yield
    finally:
        lab.kubectl("delete", "cnp", "rule1", "--ignore-not-found", check=False)
        lab.kubectl("delete", "pod", "deathstar", "tiefighter", "xwing", "--ignore-not-found", "--wait=false",
                    check=False)


def test_kill_9_of_the_agent_keeps_enforcing_and_the_restart_adopts(lab: Any, starwars: None) -> None:
    lab.apply(PODS)
    deathstar = lab.wait_running("deathstar")["status"]["podIP"]
    lab.wait_running("tiefighter")
    lab.wait_running("xwing")
    lab.kubectl("apply", "-f", str(ROOT / "crds" / "examples" / "starwars-rule1.yaml"))
    wait_for("rule1 enforced (xwing dropped)", lambda: not landed(lab, "xwing", deathstar), 60)
    assert landed(lab, "tiefighter", deathstar)
    wait_for("rule1 reported ok by node-2",
             lambda: any(r["name"] == "rule1" and r["ok"] for r in reports_of(lab, "node-2")), 30)

    node = "node-2"
    before = wait_for("the agent's enforcement status", lambda: enforcement(lab, node), 10)
    cookie = cookie_of(lab, node, "deathstar")
    assert cookie, "the CNI plugin registered deathstar without its namespace cookie"
    forget_cookie(lab, node, "deathstar")
    assert cookie_of(lab, node, "deathstar") == 0
    allowed = traffic(lab, "tiefighter", deathstar, rounds=100)
    denied = traffic(lab, "xwing", deathstar, rounds=20)  # each denied connect waits its 0.5 s timeout
    try:
        time.sleep(2)
        restarted = kill_agent(lab, node)
        wait_for("the agent started again", restarted, 60)
        after = wait_for("the restarted agent to apply",
                         lambda: (e := enforcement(lab, node)) and e.get("applied_revision") is not None and e, 90)
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
    assert cookie_of(lab, node, "deathstar") == cookie, "the restarted agent did not read the pod's cookie again"
    # read by the restarted agent itself, not put back by the killed one saving its state before it died
    log = lab.kubectl("logs", "-n", "kube-system", agent_pod(lab, node)["metadata"]["name"], "-c", "agent").stdout
    assert re.search(rf"Endpoint's network namespace cookie learnt.* netns_cookie={cookie}\b", log), log[-3000:]
    wait_for("rule1 reported again after the restart",
             lambda: any(r["name"] == "rule1" and r["ok"] and r["enforcing"] for r in reports_of(lab, node)), 30)
    assert landed(lab, "tiefighter", deathstar) and not landed(lab, "xwing", deathstar)
