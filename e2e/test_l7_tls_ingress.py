"""Ingress TLS termination (``terminatingTLS``, optionally ``originatingTLS``) proven with real TLS traffic in the lab.

vault (app=vault, namespace ``l7i``, node-2) serves plain HTTP on port 80 (the lab image) and HTTPS on 8443 and
9443 (a server this module starts in the pod's network namespace, with a certificate for ``vault.l7i.test``
from the "pod CA"). client (class=client, node-1) trusts the "front CA", whose certificate for the same name
sits in the Secret ``front``. vault's ingress policy: on 8443 the node's Envoy terminates the client's TLS
with ``front``, applies the HTTP rules and re-encrypts to the pod verifying it with the pod CA (Secret
``pod-ca``); on 80 it terminates and forwards plain HTTP; on 9443 it names a Secret that does not exist.
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

#: on the real-node lab (kubelets, Ciliary installed by its chart): the agent image carries Envoy and iptables
#: (TPROXY); the HTTPS server runs in the server pod's own network namespace, found on either lab
REAL_NODES = True

NS = "l7i"
NAME = "vault.l7i.test"
SERVER = """
import http.server, ssl, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"pod-tls {self.path}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
servers = []
for port in sys.argv[1].split(","):
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", int(port)), H)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    servers.append(srv)
for srv in servers[1:]:
    threading.Thread(target=srv.serve_forever, daemon=True).start()
servers[0].serve_forever()
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
metadata: {{name: client, namespace: {NS}, labels: {{class: client}}}}
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
RULES = """      rules:
        http:
        - {method: GET, path: '/public(/.*)?'}"""
POLICIES = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: vault-tls, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: vault}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{class: client}}}}]
    toPorts:
    - ports: [{{port: "8443", protocol: TCP}}]
      terminatingTLS: {{secret: {{name: front}}}}
      originatingTLS: {{secret: {{name: pod-ca}}}}
      serverNames: ["{NAME}"]
{RULES}
    - ports: [{{port: "80", protocol: TCP}}]
      terminatingTLS: {{secret: {{name: front}}}}
{RULES}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: vault-missing, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: vault}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{class: client}}}}]
    toPorts:
    - ports: [{{port: "9443", protocol: TCP}}]
      terminatingTLS: {{secret: {{name: absent}}}}
{RULES}
"""
DENIED = "HTTP/1.1 403 Forbidden Access denied"


def secret(name: str, items: dict[str, str]) -> str:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in items.items()}
    return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
                       "data": data})


class Scene:
    def __init__(self, files: Path, ip: str) -> None:
        self.files = files
        self.ip = ip


def https(lab: LabHandle, scene: Scene, port: int, ca: str, path: str, *, name: str = NAME,
          timeout: float = 4.0) -> str:
    """One HTTPS GET from client to vault trusting ``ca`` (a file in the scene): status line and body, or ``error``."""
    argv = ["nsenter", f"--net={lab.netns('client', NS)}", sys.executable, "-c", CLIENT, scene.ip, str(port), name,
            str(scene.files / ca), path, str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, env=dict(os.environ))
    return proc.stdout.strip() or proc.stderr.strip()[-300:]


@pytest.fixture(scope="module")
def scene(lab: LabHandle) -> Iterator[Scene]:
    front_ca, pod_ca = TestCA("lab-front-ca"), TestCA("lab-pod-ca")
    with tempfile.TemporaryDirectory(prefix="cy-tlsin-") as tmp:
        files = Path(tmp)
        cert, key = pod_ca.issue(NAME)
        (files / "pod.crt").write_text(cert)
        (files / "pod.key").write_text(key)
        (files / "front-ca.crt").write_text(front_ca.cert_pem)
        (files / "pod-ca.crt").write_text(pod_ca.cert_pem)
        server: subprocess.Popen[bytes] | None = None
        try:
            lab.apply(MANIFEST)
            for pod in ("client", "vault"):
                lab.wait_running(pod, NS)
            ip = str(lab.pod("vault", NS)["status"]["podIP"])
            server = subprocess.Popen(["nsenter", f"--net={lab.netns('vault', NS)}", sys.executable, "-c", SERVER,
                                       "8443,9443", str(files / "pod.crt"), str(files / "pod.key")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            scene = Scene(files, ip)
            # without a policy the client reaches the pod's HTTPS server end to end (trusting the pod CA)
            out = wait_for("the pod's HTTPS server", lambda: (
                lambda o: o if o.startswith("HTTP/1.1 200") else None)(https(lab, scene, 8443, "pod-ca.crt", "/")))
            assert "pod-tls /" in out, out
            front_cert, front_key = front_ca.issue(NAME)
            lab.kubectl("apply", "-f", "-", input=secret("front", {"tls.crt": front_cert, "tls.key": front_key}))
            lab.kubectl("apply", "-f", "-", input=secret("pod-ca", {"ca.crt": pod_ca.cert_pem}))
            lab.apply(POLICIES)
            done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, "cnp/vault-tls",
                               check=False)
            assert done.returncode == 0, (done.stdout, done.stderr, lab.kubectl(
                "get", "cnp", "-n", NS, "vault-tls", "-o", "jsonpath={.status}").stdout)
            yield scene
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
            lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_terminated_reencrypted_allowed_path_passes_denied_gets_403(lab: LabHandle, scene: Scene) -> None:
    out = https(lab, scene, 8443, "front-ca.crt", "/public/news")
    assert out == "HTTP/1.1 200 OK pod-tls /public/news", out  # through Envoy, re-encrypted, the pod verified
    assert https(lab, scene, 8443, "front-ca.crt", "/private") == DENIED
    # the client now talks to the node's Envoy: trusting only the pod's CA it refuses the front certificate
    out = https(lab, scene, 8443, "pod-ca.crt", "/public/news")
    assert out.startswith("error SSLCertVerificationError"), out
    # serverNames: another name is disconnected, never forwarded
    out = https(lab, scene, 8443, "front-ca.crt", "/public/news", name="other.l7i.test")
    assert out.startswith("error"), out


def test_terminated_without_originating_reaches_the_pod_as_plain_http(lab: LabHandle, scene: Scene) -> None:
    out = https(lab, scene, 80, "front-ca.crt", "/public/x")
    assert out == f"HTTP/1.1 200 OK {NS}/vault", out  # the lab's plain HTTP server answered
    assert https(lab, scene, 80, "front-ca.crt", "/private") == DENIED
    # plain text to a port whose rules terminate TLS: the client meets its own (TLS) chain, whose handshake
    # fails: closed, never another peer's chain (a CIDR or world rule that contains its address)
    netns = lab.netns("client", NS)
    probe = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", "http",
                            scene.ip, "80", "--path", "/public/x", "--timeout", "3"],
                           capture_output=True, text=True, timeout=40)
    assert probe.returncode != 0 and f"{NS}/vault" not in probe.stdout, probe.stdout  # the pod never answered


def test_tls_requests_are_ingress_l7_flows_without_key_material(lab: LabHandle, scene: Scene) -> None:
    https(lab, scene, 8443, "front-ca.crt", "/public/flow")
    https(lab, scene, 8443, "front-ca.crt", "/private-flow")

    def both() -> list[dict[str, Any]] | None:
        raw = lab.agent_get("node-2", f"/v1/flows?last=500&pod={NS}/vault")
        flows = [json.loads(line) for line in raw.splitlines() if line.startswith("{")]
        l7 = [f for f in flows if f.get("l7", {}).get("http")]
        ok = [f for f in l7 if f["l7"]["http"]["url"] == "/public/flow" and f["l7"]["http"]["code"] == 200]
        denied = [f for f in l7 if f["l7"]["http"]["url"] == "/private-flow" and f["l7"]["http"]["code"] == 403]
        return [ok[-1], denied[-1]] if ok and denied else None

    ok, denied = wait_for("the terminated requests' L7 flows", both)
    assert ok["verdict"] == "FORWARDED" and ok["direction"] == "ingress", ok
    assert [(p["name"], p["section"]) for p in ok["policy"]] == [("vault-tls", "ingress[0]")]
    assert (denied["verdict"], denied["drop_reason"]) == ("DROPPED", "L7_DENIED"), denied
    for flow in (ok, denied):
        assert "BEGIN" not in json.dumps(flow)


def test_a_missing_secret_fails_closed_and_says_so(lab: LabHandle, scene: Scene) -> None:
    def condition() -> dict[str, Any] | None:
        status = json.loads(lab.kubectl("get", "cnp", "-n", NS, "vault-missing", "-o", "json").stdout).get(
            "status", {})
        found = next((c for c in status.get("conditions", []) if c["type"] == "Enforced"), None)
        return found if found and "absent" in found.get("message", "") else None

    enforced = wait_for("vault-missing's Enforced condition naming the Secret", condition)
    assert enforced["status"] == "False", enforced
    assert f"terminatingTLS Secret {NS}/absent: not found" in enforced["message"], enforced
    for ca in ("front-ca.crt", "pod-ca.crt"):  # the pod's own server answers 9443 without the policy
        out = https(lab, scene, 9443, ca, "/public/x", timeout=2)
        assert out.startswith("error"), out  # dropped (PROXY_UNAVAILABLE), never passed unfiltered
    events = wait_for("the TLSSecretProblem Event", lambda: [
        e for e in lab.events("vault-missing", NS) if e["reason"] == "TLSSecretProblem"])
    assert events[0]["type"] == "Warning" and f"{NS}/absent" in events[0]["message"], events


def test_no_key_material_in_status_policy_get_or_logs(lab: LabHandle, scene: Scene) -> None:
    for name in ("vault-tls", "vault-missing"):
        raw = lab.kubectl("get", "cnp", "-n", NS, name, "-o", "json").stdout
        assert "BEGIN" not in raw
    intent = lab.ciliary("policy", "get", "--node", "node-2", "--intent", "-o", "json")
    assert intent.returncode == 0, intent.stderr
    assert "BEGIN" not in intent.stdout and f"{NS}/front" in intent.stdout
    logs = lab_logs(lab.lab.layout.state_dir)
    leaked = [str(p) for p, data in logs.items() if b"-----BEGIN " in data]
    assert leaked == [], leaked
