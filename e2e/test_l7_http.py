"""Ingress HTTP policy enforced by the node's Envoy, proven with real traffic in the lab.

Pods (namespace ``l7e``): deathstar (org=empire, class=deathstar, TCP 80) and shuttle
(org=empire) and xwing (org=alliance) on node-1, tiefighter (org=empire) on node-2. The
policy allows org=empire ``POST /v1/request-landing`` and ``GET /v1/public`` (with or without
a query) on port 80. So shuttle->deathstar is same-node, tiefighter->deathstar cross-node;
xwing is not selected at L3 and is dropped in the kernel, never reaching the proxy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab_harness import LabHandle, wait_for

pytestmark = pytest.mark.e2e
#: on the real-node lab (kubelets, Ciliary installed by its chart): the agent image carries Envoy, iptables
#: and sysctl, and the chart mounts the node's /proc/sys/net writable, so HTTP rules are enforced there too
REAL_NODES = True

NS = "l7e"
MANIFEST = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: deathstar, namespace: {NS}, labels: {{org: empire, class: deathstar}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: tiefighter, namespace: {NS}, labels: {{org: empire, class: tiefighter}}}}
spec:
  nodeName: node-2
  containers: [{{name: c, image: lab}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: shuttle, namespace: {NS}, labels: {{org: empire, class: shuttle}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: xwing, namespace: {NS}, labels: {{org: alliance, class: xwing}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab}}]
"""
POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: l7-landing, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{org: empire, class: deathstar}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{org: empire}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - {{method: POST, path: /v1/request-landing}}
        - {{method: GET, path: '/v1/public(\\?.*)?'}}
"""


def request(lab: LabHandle, pod: str, ip: str, method: str, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """(returncode, output) of one HTTP request from ``pod``; the probe prints the status line and body."""
    netns, _ = lab.lab.pod_target(pod, NS)
    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", "http", ip, "80",
            "--method", method, "--path", path, "--timeout", str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    return proc.returncode, proc.stdout.strip()


def agent_json(lab: LabHandle, node: str, path: str) -> Any:
    body = lab.agent_get(node, path, timeout=10)
    assert not body.startswith("<"), body  # the agent did not answer
    return [json.loads(line) for line in body.splitlines() if line] if "flows" in path else json.loads(body)


def host_pid(lab: LabHandle, node: str, pid: int, command: str) -> int:
    """The lab host's pid of a process ``node``'s agent reports by ``pid`` (its container's pid)."""
    node_net = os.stat(lab.node_netns(node)).st_ino
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            cmdline = (status.parent / "cmdline").read_bytes()
            net = os.stat(status.parent / "ns" / "net").st_ino
        except OSError:
            continue  # gone meanwhile
        nspids = fields.get("NSpid", "").split()
        if len(nspids) > 1 and nspids[-1] == str(pid) and net == node_net \
                and command.encode() in cmdline.split(b"\0")[0]:
            found.append(int(status.parent.name))
    assert len(found) == 1, f"{command} with container pid {pid}: host pids {found}"
    return found[0]


@pytest.fixture(scope="module")
def scene(lab: LabHandle) -> Iterator[str]:
    lab.apply(MANIFEST)
    for pod in ("deathstar", "tiefighter", "shuttle", "xwing"):
        lab.wait_running(pod, NS)
    ip = str(lab.pod("deathstar", NS)["status"]["podIP"])
    lab.apply(POLICY)
    done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, "cnp/l7-landing", check=False)
    assert done.returncode == 0, (done.stdout, done.stderr, lab.kubectl("get", "cnp", "-n", NS, "l7-landing", "-o",
                                                                        "jsonpath={.status}").stdout)
    try:
        yield ip
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


@pytest.mark.parametrize("ship", ["tiefighter", "shuttle"])
def test_allowed_requests_land_and_others_get_403(lab: LabHandle, scene: str, ship: str) -> None:
    code, out = request(lab, ship, scene, "POST", "/v1/request-landing")
    assert code == 0 and out.startswith("HTTP/1.1 200") and f"{NS}/deathstar" in out, out
    code, out = request(lab, ship, scene, "GET", "/v1/public?page=2")
    assert code == 0 and out.startswith("HTTP/1.1 200"), out
    code, out = request(lab, ship, scene, "PUT", "/v1/exhaust-port")
    assert out == "HTTP/1.1 403 Forbidden Access denied", out
    code, out = request(lab, ship, scene, "GET", "/v1/request-landing")  # right path, wrong method
    assert out.startswith("HTTP/1.1 403"), out
    code, out = request(lab, ship, scene, "POST", "/v1/request-landing/../../v1/exhaust-port")
    assert out.startswith("HTTP/1.1 403"), out  # normalised before matching


def test_l4_denied_peer_is_dropped_in_the_kernel(lab: LabHandle, scene: str) -> None:
    code, out = request(lab, "xwing", scene, "POST", "/v1/request-landing", timeout=1.5)
    assert code == 1 and out.startswith("timeout"), out
    flows = wait_for("xwing's drop", lambda: [
        f for f in agent_json(lab, "node-1", f"/v1/flows?last=200&pod={NS}/xwing&verdict=DROPPED")
        if f["dst"]["pod"] == "deathstar" and f["drop_reason"] == "POLICY_DENIED"])
    assert "l7" not in flows[-1]


def test_each_request_is_an_l7_flow_naming_the_rule(lab: LabHandle, scene: str) -> None:
    request(lab, "tiefighter", scene, "POST", "/v1/request-landing")
    request(lab, "tiefighter", scene, "PUT", "/v1/exhaust-port")

    def l7_flows() -> list[dict[str, Any]]:
        return [f for f in agent_json(lab, "node-1", f"/v1/flows?last=500&pod={NS}/deathstar") if f.get("l7")]

    def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
        flows = l7_flows()
        landed = [f for f in flows if f["l7"]["http"]["method"] == "POST" and f["src"]["pod"] == ""
                  and f["l7"]["http"]["code"] == 200]
        denied = [f for f in flows if f["l7"]["http"]["url"] == "/v1/exhaust-port"]
        return (landed[-1], denied[-1]) if landed and denied else None

    landed, denied = wait_for("the L7 flows", both)
    assert landed["verdict"] == "FORWARDED" and landed["direction"] == "ingress"
    assert [(p["name"], p["namespace"], p["section"]) for p in landed["policy"]] == [("l7-landing", NS, "ingress[0]")]
    assert landed["src"]["namespace"] == NS and landed["src"]["labels"]  # the tiefighter's identity
    assert (denied["verdict"], denied["drop_reason"], denied["l7"]["http"]["code"]) == ("DROPPED", "L7_DENIED", 403)
    assert denied["policy"] == []
    # the kernel's flow for the redirected connection says where it went
    kernel = agent_json(lab, "node-1", f"/v1/flows?last=500&pod={NS}/deathstar")
    assert any(f["reason"] == "OK_PROXY" for f in kernel if "l7" not in f)


def test_envoy_is_restarted_and_the_policy_keeps_working(lab: LabHandle, scene: str) -> None:
    before = agent_json(lab, "node-1", "/v1/enforcement")["l7_proxy"]
    assert before["running"] and before["accepted_version"] == before["wanted_version"], before
    subprocess.run(["kill", "-9", str(host_pid(lab, "node-1", int(before["pid"]), "envoy"))], check=True)
    after = wait_for("Envoy restarted with its configuration", lambda: (
        lambda s: s if s["starts"] > before["starts"] and s["running"]
        and s["accepted_version"] == s["wanted_version"] else None)(
        agent_json(lab, "node-1", "/v1/enforcement")["l7_proxy"]))
    assert "exit status" in after["last_exit"] or "signal" in after["last_exit"] or after["last_exit"], after
    code, out = request(lab, "tiefighter", scene, "POST", "/v1/request-landing")
    assert code == 0 and out.startswith("HTTP/1.1 200"), out
    code, out = request(lab, "tiefighter", scene, "PUT", "/v1/exhaust-port")
    assert out == "HTTP/1.1 403 Forbidden Access denied", out
    status = json.loads(lab.kubectl("get", "cnp", "-n", NS, "l7-landing", "-o", "json").stdout)["status"]
    assert status["nodes"]["node-1"]["enforcing"] is True, status
