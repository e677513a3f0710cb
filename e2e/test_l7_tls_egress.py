"""Egress TLS interception (``terminatingTLS`` + ``originatingTLS``) proven with real TLS traffic in the lab.

The world host (192.0.2.100) gets an HTTPS server on port 8443 with a certificate for
``api.world.test`` from a test CA ("world CA"), started by this module in the world's network
namespace (the lab's own world servers speak plain TCP). Pods (namespace ``l7t``, node-1):
shuttle (class=shuttle) is intercepted: it trusts the interception CA, whose certificate for
``api.world.test`` sits in the Secret ``intercept``; the Secret ``world-ca`` holds the world CA
the proxy verifies the server with. scout (class=scout) has a policy naming a Secret that does
not exist: its connections are dropped, its policy says which Secret is missing.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliary.lab.testca import TestCA
from lab_harness import LabHandle, lab_logs, wait_for

pytestmark = pytest.mark.e2e

#: on the real-node lab (kubelets, Ciliary installed by its chart): the agent image carries Envoy and iptables;
#: the HTTPS server runs in the lab's world namespace, which the real-node lab has too
REAL_NODES = True

NS = "l7t"
WORLD = "192.0.2.100"
PORT = 8443
NAME = "api.world.test"
SERVER = """
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"world-tls {self.path}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
srv = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""
CLIENT = """
import socket, ssl, sys
ip, port, name, ca, path = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
try:
    with socket.create_connection((ip, int(port)), timeout=float(sys.argv[6])) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: {name}\\r\\nConnection: close\\r\\n\\r\\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
except Exception as exc:
    print("error", type(exc).__name__, exc)
    sys.exit(1)
head, _, body = data.partition(b"\\r\\n\\r\\n")
print(head.split(b"\\r\\n")[0].decode(), body.decode().strip())
"""
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
metadata: {{name: scout, namespace: {NS}, labels: {{class: scout}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab}}]
"""


def policy(name: str, selected: str, terminating: str) -> str:
    return f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{class: {selected}}}}}
  egress:
  - toCIDR: ["{WORLD}/32"]
    toPorts:
    - ports: [{{port: "{PORT}", protocol: TCP}}]
      terminatingTLS: {{secret: {{name: {terminating}}}}}
      originatingTLS: {{secret: {{name: world-ca}}}}
      serverNames: ["{NAME}"]
      rules:
        http:
        - {{method: GET, path: '/public(/.*)?'}}
"""


def secret(name: str, items: dict[str, str]) -> str:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in items.items()}
    return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
                       "data": data})


class Scene:
    def __init__(self, files: Path, intercept_ca: TestCA, world_ca: TestCA) -> None:
        self.files = files
        self.intercept_ca = intercept_ca
        self.world_ca = world_ca


def https(lab: LabHandle, pod: str, ca_file: Path, path: str, *, name: str = NAME,
          timeout: float = 4.0) -> str:
    """One HTTPS GET from ``pod`` to the world host, trusting ``ca_file``: status line and body, or ``error …``."""
    argv = ["nsenter", f"--net={lab.netns(pod, NS)}", sys.executable, "-c", CLIENT, WORLD, str(PORT), name,
            str(ca_file), path, str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, env=dict(os.environ))
    return (proc.stdout.strip() or proc.stderr.strip()[-300:])


@pytest.fixture(scope="module")
def scene(lab: LabHandle) -> Iterator[Scene]:
    world_ca, intercept_ca = TestCA("lab-world-ca"), TestCA("lab-interception-ca")
    with tempfile.TemporaryDirectory(prefix="cy-tls-") as tmp:
        files = Path(tmp)
        server_cert, server_key = world_ca.issue(NAME)
        (files / "server.crt").write_text(server_cert)
        (files / "server.key").write_text(server_key)
        (files / "intercept-ca.crt").write_text(intercept_ca.cert_pem)
        (files / "world-ca.crt").write_text(world_ca.cert_pem)
        server = subprocess.Popen(["nsenter", f"--net={lab.world_netns()}", sys.executable, "-c", SERVER, WORLD,
                                   str(PORT), str(files / "server.crt"), str(files / "server.key")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            lab.apply(MANIFEST)
            for pod in ("shuttle", "scout"):
                lab.wait_running(pod, NS)
            # without a policy the pod reaches the world server end to end (it trusts the world CA)
            out = wait_for("the world HTTPS server", lambda: (
                lambda o: o if o.startswith("HTTP/1.1 200") else None)(
                https(lab, "shuttle", files / "world-ca.crt", "/public/hello")))
            assert "world-tls /public/hello" in out, out
            cert, key = intercept_ca.issue(NAME)
            lab.kubectl("apply", "-f", "-", input=secret("intercept", {"tls.crt": cert, "tls.key": key}))
            lab.kubectl("apply", "-f", "-", input=secret("world-ca", {"ca.crt": world_ca.cert_pem}))
            lab.apply(policy("tls-intercept", "shuttle", "intercept"))
            lab.apply(policy("tls-missing", "scout", "absent"))
            done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, "cnp/tls-intercept",
                               check=False)
            assert done.returncode == 0, (done.stdout, done.stderr, lab.kubectl(
                "get", "cnp", "-n", NS, "tls-intercept", "-o", "jsonpath={.status}").stdout)
            yield Scene(files, intercept_ca, world_ca)
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
            lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_allowed_path_reaches_the_server_inside_tls_denied_path_gets_403(lab: LabHandle, scene: Scene) -> None:
    out = https(lab, "shuttle", scene.files / "intercept-ca.crt", "/public/news")
    assert out == "HTTP/1.1 200 OK world-tls /public/news", out
    out = https(lab, "shuttle", scene.files / "intercept-ca.crt", "/private")
    assert out == "HTTP/1.1 403 Forbidden Access denied", out
    # the pod now talks to the proxy: a client trusting only the world CA refuses the interception certificate
    out = https(lab, "shuttle", scene.files / "world-ca.crt", "/public/news")
    assert out.startswith("error SSLCertVerificationError"), out
    # serverNames: a pod asking for another name is disconnected, never forwarded
    out = https(lab, "shuttle", scene.files / "intercept-ca.crt", "/public/news", name="other.world.test")
    assert out.startswith("error"), out


def test_tls_requests_are_l7_flows_without_secrets(lab: LabHandle, scene: Scene) -> None:
    https(lab, "shuttle", scene.files / "intercept-ca.crt", "/public/flow")
    https(lab, "shuttle", scene.files / "intercept-ca.crt", "/secret-path")

    def both() -> list[dict[str, Any]] | None:
        raw = lab.agent_get("node-1", f"/v1/flows?last=500&pod={NS}/shuttle")
        flows = [json.loads(line) for line in raw.splitlines() if line.startswith("{")]
        l7 = [f for f in flows if f.get("l7", {}).get("http")]
        ok = [f for f in l7 if f["l7"]["http"]["url"] == "/public/flow" and f["l7"]["http"]["code"] == 200]
        denied = [f for f in l7 if f["l7"]["http"]["url"] == "/secret-path" and f["l7"]["http"]["code"] == 403]
        return [ok[-1], denied[-1]] if ok and denied else None

    ok, denied = wait_for("the intercepted requests' L7 flows", both)
    assert ok["verdict"] == "FORWARDED" and ok["direction"] == "egress" and ok["dst"]["ip"] == WORLD, ok
    assert [(p["name"], p["section"]) for p in ok["policy"]] == [("tls-intercept", "egress[0]")]
    assert (denied["verdict"], denied["drop_reason"]) == ("DROPPED", "L7_DENIED"), denied
    for flow in (ok, denied):
        assert "BEGIN" not in json.dumps(flow)


def test_a_missing_secret_fails_closed_and_says_so(lab: LabHandle, scene: Scene) -> None:
    def condition() -> dict[str, Any] | None:
        status = json.loads(lab.kubectl("get", "cnp", "-n", NS, "tls-missing", "-o", "json").stdout).get("status", {})
        found = next((c for c in status.get("conditions", []) if c["type"] == "Enforced"), None)
        return found if found and "absent" in found.get("message", "") else None

    enforced = wait_for("tls-missing's Enforced condition naming the Secret", condition)
    assert enforced["status"] == "False", enforced
    assert f"terminatingTLS Secret {NS}/absent: not found" in enforced["message"], enforced
    out = https(lab, "scout", scene.files / "intercept-ca.crt", "/public/x", timeout=2)
    assert out.startswith("error"), out  # dropped (PROXY_UNAVAILABLE), never passed to the world unfiltered
    out = https(lab, "scout", scene.files / "world-ca.crt", "/public/x", timeout=2)
    assert out.startswith("error"), out
    events = wait_for("the TLSSecretProblem Event", lambda: [
        e for e in lab.events("tls-missing", NS) if e["reason"] == "TLSSecretProblem"])
    assert events[0]["type"] == "Warning" and f"{NS}/absent" in events[0]["message"], events


def test_secrets_never_in_status_or_policy_get_and_rotation_republishes(lab: LabHandle, scene: Scene) -> None:
    for name in ("tls-intercept", "tls-missing"):
        raw = lab.kubectl("get", "cnp", "-n", NS, name, "-o", "json").stdout
        assert "BEGIN" not in raw
    intent = lab.ciliary("policy", "get", "--node", "node-1", "--intent", "-o", "json")
    assert intent.returncode == 0, intent.stderr
    assert "BEGIN" not in intent.stdout and f"{NS}/intercept" in intent.stdout
    # rotation: a new interception certificate from another CA; the pod trusting only the old CA now refuses
    other = TestCA("lab-rotated-ca")
    (scene.files / "rotated-ca.crt").write_text(other.cert_pem)
    cert, key = other.issue(NAME)
    lab.kubectl("apply", "-f", "-", input=secret("intercept", {"tls.crt": cert, "tls.key": key}))
    out = wait_for("the rotated interception certificate", lambda: (
        lambda o: o if o.startswith("HTTP/1.1 200") else None)(
        https(lab, "shuttle", scene.files / "rotated-ca.crt", "/public/rotated")))
    assert "world-tls /public/rotated" in out, out
    out = https(lab, "shuttle", scene.files / "intercept-ca.crt", "/public/rotated")
    assert out.startswith("error SSLCertVerificationError"), out


def test_no_log_of_the_lab_holds_key_material(lab: LabHandle, scene: Scene) -> None:
    """Every log file of the lab (operator, agents, Envoy's own and access logs, apiserver, etcd) after the
    Secrets were read, published, written for Envoy and rotated: no PEM block in any of them."""
    state = lab.lab.layout.state_dir
    # the kubelets' pod logs (nodes/<node>/pod-logs/kube-system_ciliary-operator-.../operator/0.log) and the
    # agents' state dirs
    logs = lab_logs(state)
    names = [str(p.relative_to(state)) for p in logs]
    assert any("operator" in n for n in names) and any("envoy" in n for n in names), names
    leaked = [str(p) for p, data in logs.items() if b"-----BEGIN " in data]
    assert leaked == [], leaked
