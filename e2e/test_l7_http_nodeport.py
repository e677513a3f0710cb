"""Ingress HTTP policy for the world host through a NodePort, enforced by the node's Envoy (real traffic).

Split from test_l7_http.py: this scene needs the real-node lab without kube-proxy (below).
deathstar (org=empire, class=deathstar) on node-1 behind a NodePort Service with
``externalTrafficPolicy: Local`` (the client address is kept); a policy allows the world host
``GET /v1/public`` and another allows org=empire ``POST /v1/request-landing``. The world host's requests
must meet the world rule only: 200 for its GET, 403 for the empire's POST and anything else.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from ciliary.lab import topology
from lab_harness import LabHandle, wait_for

pytestmark = pytest.mark.e2e
#: real nodes without kube-proxy (REAL_NODES_MODE), where the chart's tc programs on eth0 serve the NodePort:
#: passes there (2026-12-06); with kube-proxy serving it instead the world host's allowed request was not answered
REAL_NODES = True
REAL_NODES_MODE = "kube-proxy-replacement"

NS = "l7w"
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
"""
EMPIRE_POLICY = f"""
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
"""


@pytest.fixture(scope="module")
def scene(lab: LabHandle) -> Iterator[str]:
    lab.apply(MANIFEST)
    lab.wait_running("deathstar", NS)
    lab.apply(EMPIRE_POLICY)
    done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, "cnp/l7-landing", check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    try:
        yield str(lab.pod("deathstar", NS)["status"]["podIP"])
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


WORLD_NODEPORT = 30183
NODE_1 = "192.0.2.11"
WORLD_POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: l7-world, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{org: empire, class: deathstar}}}}
  ingress:
  - fromEntities: [world-ipv4]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules: {{http: [{{method: GET, path: /v1/public}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: deathstar-np, namespace: {NS}}}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {{org: empire, class: deathstar}}
  ports: [{{port: 80, targetPort: 80, nodePort: {WORLD_NODEPORT}}}]
"""


def world_request(lab: LabHandle, method: str, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """One HTTP request from the lab's world host to node-1's NodePort (Local: the client address is kept)."""
    netns = topology.NETNS_DIR / lab.lab.layout.world_netns
    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", "http", NODE_1,
            str(WORLD_NODEPORT), "--method", method, "--path", path, "--timeout", str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    return proc.returncode, proc.stdout.strip()


def test_world_through_a_nodeport_meets_its_own_http_rules(lab: LabHandle, scene: str) -> None:
    """World has no ipcache prefix: its requests reach the world chain (0.0.0.0/0) with the world rule, not a
    403 for everything; the rules of other peers (the empire's POST) never apply to it."""
    lab.apply(WORLD_POLICY)
    try:
        done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, "cnp/l7-world",
                           check=False)
        assert done.returncode == 0, (done.stdout, done.stderr)

        def public() -> str | None:
            _code, out = world_request(lab, "GET", "/v1/public")
            return out if out.startswith("HTTP/1.1 200") else None

        out = wait_for("the world host's allowed request answered 200", public, 90)
        assert f"{NS}/deathstar" in out, out
        _code, out = world_request(lab, "POST", "/v1/request-landing")  # the empire's rule, not the world's
        assert out == "HTTP/1.1 403 Forbidden Access denied", out
        _code, out = world_request(lab, "GET", "/v1/private")
        assert out.startswith("HTTP/1.1 403"), out
    finally:
        lab.kubectl("delete", "-n", NS, "cnp/l7-world", "service/deathstar-np", check=False)
