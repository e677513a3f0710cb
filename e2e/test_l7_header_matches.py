"""headerMatches (inline values) enforced by the nodes' Envoys, proven with real traffic in the lab.

courier (class=courier) on node-1 sends through its egress policy to vault (app=vault, TCP 80) on
node-2, whose ingress policy (its node's Envoy) admits only requests carrying the headers it names.
So what courier's egress Envoy did to a request shows at vault's ingress: a request courier sends
without the token arrives with it (REPLACE), an added header arrives (ADD), a wrong-valued header
is removed (DELETE) and refused by vault; a header condition without an action (no ``mismatch``)
refuses the request at courier's side; LOG lets it pass and names the mismatch in the L7 flow; a request
two rules allow gets the actions of both (vault admits ``/both`` only with both headers set).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab_harness import LabHandle

pytestmark = pytest.mark.e2e
#: on the real-node lab (kubelets, Ciliary installed by its chart): the agent image carries Envoy and iptables
#: (TPROXY, the socket match), so HTTP header rules are enforced there
REAL_NODES = True

NS = "l7h"
MANIFEST = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: courier, namespace: {NS}, labels: {{class: courier}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: vault, namespace: {NS}, labels: {{app: vault}}}}
spec:
  nodeName: node-2
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
"""
POLICIES = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: courier-out, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{class: courier}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: vault}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - path: /private
          headerMatches: [{{name: Access-Token, value: s3cret, mismatch: REPLACE}}]
        - path: /added
          headerMatches: [{{name: X-Add, value: v, mismatch: ADD}}]
        - path: /strip
          headerMatches: [{{name: X-Secret, value: ok, mismatch: DELETE}}]
        - path: /needs
          headerMatches: [{{name: X-Team, value: blue}}]
        - path: /log
          headerMatches: [{{name: X-Audit, value: "yes", mismatch: LOG}}]
        - path: /both
          headerMatches: [{{name: X-Both-Token, value: t1, mismatch: REPLACE}}]
        - path: "/bo.*"
          headerMatches: [{{name: X-Both-Add, value: a1, mismatch: ADD}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: vault-in, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: vault}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{class: courier}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - {{path: /private, headers: ["Access-Token: s3cret"]}}
        - {{path: /added, headers: ["X-Add: v"]}}
        - {{path: /strip, headers: ["X-Secret"]}}
        - {{path: /needs}}
        - {{path: /log}}
        - {{path: /both, headers: ["X-Both-Token: t1", "X-Both-Add: a1"]}}
        - {{path: /bolt}}
"""


def request(lab: LabHandle, ip: str, path: str, *headers: str) -> str:
    netns, _ = lab.lab.pod_target("courier", NS)
    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", "http", ip, "80",
            "--path", path, "--timeout", "3", *(f"--header={h}" for h in headers)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=40).stdout.strip()


def agent_flows(lab: LabHandle, node: str, query: str) -> list[dict[str, Any]]:
    body = lab.agent_get(node, f"/v1/flows?{query}", timeout=10)
    assert not body.startswith("<"), body  # the agent did not answer
    return [json.loads(line) for line in body.splitlines() if line]


@pytest.fixture(scope="module")
def vault(lab: LabHandle) -> Iterator[str]:
    lab.apply(MANIFEST)
    for pod in ("courier", "vault"):
        lab.wait_running(pod, NS)
    ip = str(lab.pod("vault", NS)["status"]["podIP"])
    lab.apply(POLICIES)
    for name in ("courier-out", "vault-in"):
        done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, f"cnp/{name}", check=False)
        assert done.returncode == 0, (name, done.stdout, done.stderr, lab.kubectl(
            "get", "cnp", "-n", NS, name, "-o", "jsonpath={.status}").stdout)
    try:
        yield ip
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_replace_sets_the_expected_value(lab: LabHandle, vault: str) -> None:
    assert request(lab, vault, "/private").startswith("HTTP/1.1 200"), "REPLACE added the missing token"
    assert request(lab, vault, "/private", "Access-Token: wrong").startswith("HTTP/1.1 200")
    assert request(lab, vault, "/private", "Access-Token: s3cret").startswith("HTTP/1.1 200")


def test_add_appends_the_missing_value(lab: LabHandle, vault: str) -> None:
    assert request(lab, vault, "/added").startswith("HTTP/1.1 200")


def test_delete_removes_a_wrong_value(lab: LabHandle, vault: str) -> None:
    assert request(lab, vault, "/strip", "X-Secret: ok").startswith("HTTP/1.1 200")
    out = request(lab, vault, "/strip", "X-Secret: wrong")
    assert out == "HTTP/1.1 403 Forbidden Access denied", out  # removed by courier's Envoy, refused by vault's


def test_without_action_the_header_is_a_condition(lab: LabHandle, vault: str) -> None:
    assert request(lab, vault, "/needs", "X-Team: blue").startswith("HTTP/1.1 200")
    out = request(lab, vault, "/needs", "X-Team: red")
    assert out == "HTTP/1.1 403 Forbidden Access denied", out
    deadline = time.monotonic() + 30  # Envoy's access log reaches the agent's flows shortly after
    denied: list[dict[str, Any]] = []
    while not denied and time.monotonic() < deadline:
        denied = [f for f in agent_flows(lab, "node-1", f"last=300&pod={NS}/courier")
                  if f.get("l7", {}).get("http", {}).get("url") == "/needs" and f["l7"]["http"]["code"] == 403]
        time.sleep(0.5)
    assert denied and denied[-1]["direction"] == "egress", "refused by courier's egress proxy, not vault's"


def test_log_passes_and_names_the_mismatch_in_the_flow(lab: LabHandle, vault: str) -> None:
    assert request(lab, vault, "/log").startswith("HTTP/1.1 200")
    deadline = time.monotonic() + 30
    logged: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not logged:
        logged = [f for f in agent_flows(lab, "node-1", f"last=300&pod={NS}/courier")
                  if f.get("l7", {}).get("http", {}).get("url") == "/log"]
        time.sleep(0.5)
    assert logged, "no L7 flow for /log"
    http = logged[-1]["l7"]["http"]
    assert http["code"] == 200 and http["header_mismatch"] == "X-Audit:LOG", logged[-1]


def test_two_allowing_rules_both_act(lab: LabHandle, vault: str) -> None:
    """``/both`` is allowed by the ``/both`` rule (REPLACE X-Both-Token) and the ``/bo.*`` rule (ADD X-Both-Add):
    courier's Envoy applies both actions, so vault, which requires both headers, answers 200. ``/bolt`` is
    allowed by the second rule alone: only its action, vault admits the path anyway."""
    out = request(lab, vault, "/both")
    assert out.startswith("HTTP/1.1 200"), out
    out = request(lab, vault, "/both", "X-Both-Token: wrong")
    assert out.startswith("HTTP/1.1 200"), out
    assert request(lab, vault, "/bolt").startswith("HTTP/1.1 200")
    deadline = time.monotonic() + 30
    both: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not both:
        both = [f for f in agent_flows(lab, "node-1", f"last=300&pod={NS}/courier")
                if f.get("l7", {}).get("http", {}).get("url") == "/both"]
        time.sleep(0.5)
    assert both and both[-1]["l7"]["http"]["header_mismatch"] == "X-Both-Token:REPLACE,X-Both-Add:ADD", both[-1:]
