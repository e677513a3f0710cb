"""Egress HTTP policy enforced by the node's Envoy, proven with real traffic in the lab.

Pods (namespace ``l7g``): shuttle (class=shuttle, the client the policy selects) and near (app=api,
TCP 80) on node-1, far (app=api, TCP 80), guarded (app=guarded, TCP 80) and scout (class=scout,
the toFQDNs client) on node-2. The policy
lets shuttle send ``GET /v1/public…`` to app=api pods and ``GET /world…`` to the world host
(``toCIDR``), and anything at L7 to guarded. guarded's own ingress policy admits nobody, far's
admits only class=shuttle: what Envoy forwards leaves from shuttle's address, so the destination's
ingress policy judges shuttle (far: allowed; guarded: dropped in the kernel, never widened).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab_harness import LabHandle, wait_for

pytestmark = pytest.mark.e2e

#: on the real-node lab (kubelets, Ciliary installed by its chart): the agent image carries Envoy and iptables
#: (TPROXY, the socket match) and the chart mounts the node's /proc/sys/net, so egress HTTP rules are enforced
REAL_NODES = True

NS = "l7g"
WORLD = "192.0.2.100"
WORLD_DNS = "192.0.2.53"
MANIFEST = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: shuttle, namespace: {NS}, labels: {{class: shuttle}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: near, namespace: {NS}, labels: {{app: api}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: far, namespace: {NS}, labels: {{app: api}}}}
spec:
  nodeName: node-2
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: scout, namespace: {NS}, labels: {{class: scout}}}}
spec:
  nodeName: node-2
  containers: [{{name: c, image: lab}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: guarded, namespace: {NS}, labels: {{app: guarded}}}}
spec:
  nodeName: node-2
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
"""
POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: egress-http, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{class: shuttle}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: api}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - {{method: GET, path: '/v1/public(\\?.*)?'}}
  - toCIDR: ["{WORLD}/32"]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - {{method: GET, path: '/world(/.*)?'}}
  - toEndpoints: [{{matchLabels: {{app: guarded}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http: [{{}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: far-ingress, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{class: shuttle}}}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: guarded-ingress, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: guarded}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{class: nobody}}}}]
"""


FQDN_POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: fqdn-http, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{class: scout}}}}
  egress:
  - toCIDR: ["{WORLD_DNS}/32"]
    toPorts:
    - ports: [{{port: "53", protocol: UDP}}]
      rules:
        dns: [{{matchPattern: "*.world.test"}}]
  - toFQDNs: [{{matchName: api.world.test}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - {{method: GET, path: '/api(/.*)?'}}
"""


def request(lab: LabHandle, pod: str, ip: str, method: str, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """(returncode, output) of one HTTP request from ``pod``; the probe prints the status line and body."""
    netns, _ = lab.lab.pod_target(pod, NS)
    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", "http", ip, "80",
            "--method", method, "--path", path, "--timeout", str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, env=dict(os.environ))
    return proc.returncode, proc.stdout.strip()


def agent_json(lab: LabHandle, node: str, path: str) -> Any:
    body = lab.agent_get(node, path, timeout=10)
    assert not body.startswith("<"), body  # the agent did not answer
    return [json.loads(line) for line in body.splitlines() if line] if "flows" in path else json.loads(body)


@pytest.fixture(scope="module")
def scene(lab: LabHandle) -> Iterator[dict[str, str]]:
    lab.apply(MANIFEST)
    for pod in ("shuttle", "scout", "near", "far", "guarded"):
        lab.wait_running(pod, NS)
    ips = {pod: str(lab.pod(pod, NS)["status"]["podIP"]) for pod in ("shuttle", "near", "far", "guarded")}
    lab.apply(POLICY)
    for name in ("egress-http", "far-ingress", "guarded-ingress"):
        done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, f"cnp/{name}", check=False)
        assert done.returncode == 0, (name, done.stdout, done.stderr, lab.kubectl(
            "get", "cnp", "-n", NS, name, "-o", "jsonpath={.status}").stdout)
    try:
        yield ips
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


@pytest.mark.parametrize("server", ["near", "far"])
def test_allowed_requests_reach_the_pod_others_get_403(lab: LabHandle, scene: dict[str, str], server: str) -> None:
    code, out = request(lab, "shuttle", scene[server], "GET", "/v1/public?page=2")
    # far admits only shuttle: the request arrived from shuttle's own address (identity), not the node's
    assert code == 0 and out.startswith("HTTP/1.1 200") and f"{NS}/{server}" in out, out
    code, out = request(lab, "shuttle", scene[server], "PUT", "/v1/exhaust-port")
    assert out == "HTTP/1.1 403 Forbidden Access denied", out
    code, out = request(lab, "shuttle", scene[server], "GET", "/v1/private")
    assert out.startswith("HTTP/1.1 403"), out
    code, out = request(lab, "shuttle", scene[server], "GET", "/v1/public/../private")
    assert out.startswith("HTTP/1.1 403"), out  # normalised before matching


def test_world_host_through_to_cidr_rules(lab: LabHandle, scene: dict[str, str]) -> None:
    code, out = request(lab, "shuttle", WORLD, "GET", "/world/news")
    assert code == 0 and out.startswith("HTTP/1.1 200"), out
    code, out = request(lab, "shuttle", WORLD, "POST", "/world/news")
    assert out == "HTTP/1.1 403 Forbidden Access denied", out
    # the rules of one destination do not leak to another: /world is not allowed towards the api pods
    code, out = request(lab, "shuttle", scene["far"], "GET", "/world")
    assert out.startswith("HTTP/1.1 403"), out


def test_destination_ingress_policy_still_judges_the_pod(lab: LabHandle, scene: dict[str, str]) -> None:
    """guarded admits nobody: Envoy allows the request at L7, the kernel of node-2 drops the upstream
    connection (from shuttle's identity), so no request reaches guarded (Envoy answers 503)."""
    code, out = request(lab, "shuttle", scene["guarded"], "GET", "/", timeout=8)
    assert code == 1 and not out.startswith("HTTP/1.1 200"), out
    assert out.startswith("HTTP/1.1 503") or out.startswith("timeout"), out
    drops = wait_for("guarded's kernel drop of shuttle", lambda: [
        f for f in agent_json(lab, "node-2", f"/v1/flows?last=300&pod={NS}/guarded&verdict=DROPPED")
        if f["src"]["ip"] == scene["shuttle"] and f["drop_reason"] == "POLICY_DENIED"])
    assert drops[-1]["dst"]["pod"] == "guarded", drops[-1]
    assert any(label.endswith("class=shuttle") for label in drops[-1]["src"]["labels"]), drops[-1]


def test_each_request_is_an_egress_l7_flow_naming_the_rule(lab: LabHandle, scene: dict[str, str]) -> None:
    request(lab, "shuttle", scene["far"], "GET", "/v1/public")
    request(lab, "shuttle", scene["far"], "DELETE", "/v1/public")

    def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
        flows = [f for f in agent_json(lab, "node-1", f"/v1/flows?last=500&pod={NS}/shuttle") if f.get("l7")]
        ok = [f for f in flows if f["l7"]["http"]["method"] == "GET" and f["l7"]["http"]["code"] == 200
              and f["dst"]["ip"] == scene["far"]]
        denied = [f for f in flows if f["l7"]["http"]["method"] == "DELETE"]
        return (ok[-1], denied[-1]) if ok and denied else None

    ok, denied = wait_for("the egress L7 flows", both)
    assert ok["verdict"] == "FORWARDED" and ok["direction"] == "egress" and ok["src"]["pod"] == "shuttle"
    assert ok["l7"]["http"]["url"] == "/v1/public"
    assert [(p["name"], p["namespace"], p["section"]) for p in ok["policy"]] == [("egress-http", NS, "egress[0]")]
    assert (denied["verdict"], denied["drop_reason"], denied["l7"]["http"]["code"]) == ("DROPPED", "L7_DENIED", 403)
    assert denied["direction"] == "egress"
    kernel = agent_json(lab, "node-1", f"/v1/flows?last=500&pod={NS}/shuttle")
    assert any(f["reason"] == "OK_PROXY" and f["direction"] == "egress" for f in kernel if "l7" not in f)


def test_policy_reads_enforced_with_envoy_and_removal_restores_plain_traffic(lab: LabHandle,
                                                                            scene: dict[str, str]) -> None:
    status = json.loads(lab.kubectl("get", "cnp", "-n", NS, "egress-http", "-o", "json").stdout)["status"]
    enforced = next(c for c in status["conditions"] if c["type"] == "Enforced")
    assert enforced["status"] == "True" and status["nodes"]["node-1"]["enforcing"] is True, status
    lab.kubectl("delete", "cnp", "-n", NS, "egress-http")
    out = wait_for("shuttle's egress unfiltered again", lambda: (
        lambda r: r[1] if r[1].startswith("HTTP/1.1 200") else None)(
        request(lab, "shuttle", WORLD, "POST", "/anything")))
    assert "world" in out, out


def resolve(lab: LabHandle, pod: str, name: str) -> dict[str, Any]:
    netns, _ = lab.lab.pod_target(pod, NS)
    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.dnsprobe", name, WORLD_DNS,
            "--timeout", "3"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    result["returncode"] = out.returncode
    return result


def test_http_rules_on_to_fqdns_peers(lab: LabHandle, scene: dict[str, str]) -> None:
    """scout may send GET /api… to what api.world.test resolves to, only after resolving it itself."""
    lab.apply(FQDN_POLICY)
    done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, "cnp/fqdn-http", check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    code, out = request(lab, "scout", WORLD, "GET", "/api/v1", timeout=1.5)
    assert code == 1 and out.startswith("timeout"), out  # not resolved yet: dropped in the kernel
    answer = resolve(lab, "scout", "api.world.test")
    assert answer["returncode"] == 0, answer
    began = time.monotonic()
    code, out = request(lab, "scout", WORLD, "GET", "/api/v1")
    assert code == 0 and out.startswith("HTTP/1.1 200"), (out, time.monotonic() - began)
    code, out = request(lab, "scout", WORLD, "DELETE", "/api/v1")
    assert out == "HTTP/1.1 403 Forbidden Access denied", out

    def seen() -> set[tuple[str, int, str]]:
        flows = agent_json(lab, "node-2", f"/v1/flows?last=500&pod={NS}/scout")
        found = {(f["l7"]["http"]["method"], f["l7"]["http"]["code"], f["direction"]) for f in flows
                 if f.get("l7", {}).get("http")}
        return found if {("GET", 200, "egress"), ("DELETE", 403, "egress")} <= found else set()

    wait_for("scout's egress L7 flows (GET 200, DELETE 403)", seen)
