"""headerMatches values from Secrets, enforced by the nodes' Envoys, proven with real traffic in the lab.

courier (class=courier, node-1) sends through its egress policy to vault (app=vault, TCP 80, node-2),
whose ingress policy admits ``/direct`` and ``/private`` only with the token of the Secret ``token``
(a condition from a Secret, on ingress). courier's egress policy sets that token on ``/private``
(``REPLACE`` from the same Secret), so courier gets through without knowing it, and requires
``X-Team`` to have the value of the Secret ``team`` on ``/needs`` (a condition, on egress).
Rotating ``token`` changes what both Envoys use. scout (class=scout, node-1) has a policy whose
header value is in a Secret that does not exist: its connections are dropped and its policy says
which Secret is missing, until the Secret is created. A kept-alive connection of courier's is judged by
the rotated token, and then by vault's new rules, from its very next request (route discovery: the chains and
their connections stay).
"""

from __future__ import annotations

import base64
import json
import select
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from lab_harness import LabHandle, lab_logs, wait_for

pytestmark = pytest.mark.e2e
#: on the real-node lab (kubelets, Ciliary installed by its chart): the agent image carries Envoy and iptables
#: (TPROXY, the socket match), so header rules with values from Secrets are enforced there as well
REAL_NODES = True

NS = "l7s"
TOKEN_1, TOKEN_2, TEAM = "tok-7f3a91", "tok-2b8c44", "blue-c0ffee"
TOKEN_3, TOKEN_4 = "tok-5e6d02", "tok-90ab17"
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
metadata: {{name: scout, namespace: {NS}, labels: {{class: scout}}}}
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
          headerMatches: [{{name: Access-Token, secret: {{name: token}}, mismatch: REPLACE}}]
        - path: /needs
          headerMatches: [{{name: X-Team, secret: {{name: team}}}}]
        - path: /direct
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: vault-in, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: vault}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{class: courier}}}}, {{matchLabels: {{class: scout}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - path: /private
          headerMatches: [{{name: Access-Token, secret: {{namespace: {NS}, name: token}}}}]
        - path: /direct
          headerMatches: [{{name: Access-Token, secret: {{name: token}}}}]
        - path: /needs
        - path: /x
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: scout-out, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{class: scout}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: vault}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - path: /x
          headerMatches: [{{name: X-Key, secret: {{name: absent}}}}]
"""
OK = "HTTP/1.1 200"
DENIED = "HTTP/1.1 403 Forbidden Access denied"


def secret(name: str, items: dict[str, str]) -> str:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in items.items()}
    return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
                       "data": data})


def request(lab: LabHandle, pod: str, ip: str, path: str, *headers: str, timeout: float = 3) -> str:
    netns, _ = lab.lab.pod_target(pod, NS)
    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", "http", ip, "80",
            "--path", path, "--timeout", str(timeout), *(f"--header={h}" for h in headers)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=40).stdout.strip()


def flows(lab: LabHandle, node: str, pod: str) -> list[dict[str, Any]]:
    raw = lab.agent_get(node, f"/v1/flows?last=500&pod={NS}/{pod}")
    return [json.loads(line) for line in raw.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def vault(lab: LabHandle) -> Iterator[str]:
    lab.apply(MANIFEST)
    try:
        for pod in ("courier", "scout", "vault"):
            lab.wait_running(pod, NS)
        ip = str(lab.pod("vault", NS)["status"]["podIP"])
        lab.kubectl("apply", "-f", "-", input=secret("token", {"token": TOKEN_1}))
        lab.kubectl("apply", "-f", "-", input=secret("team", {"team": TEAM}))
        lab.apply(POLICIES)
        for name in ("courier-out", "vault-in"):
            done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, f"cnp/{name}",
                               check=False)
            assert done.returncode == 0, (name, done.stdout, done.stderr, lab.kubectl(
                "get", "cnp", "-n", NS, name, "-o", "jsonpath={.status}").stdout)
        yield ip
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_a_condition_from_a_secret_admits_only_its_value(lab: LabHandle, vault: str) -> None:
    # ingress (vault's node): /direct passes courier's egress untouched, vault's Envoy checks the token
    assert request(lab, "courier", vault, "/direct", f"Access-Token: {TOKEN_1}").startswith(OK)
    assert request(lab, "courier", vault, "/direct", "Access-Token: guess") == DENIED
    assert request(lab, "courier", vault, "/direct") == DENIED
    # egress (courier's node): X-Team must carry the Secret's value
    assert request(lab, "courier", vault, "/needs", f"X-Team: {TEAM}").startswith(OK)
    assert request(lab, "courier", vault, "/needs", "X-Team: red") == DENIED
    denied = wait_for("courier's 403 for /needs as an egress L7 flow", lambda: [
        f for f in flows(lab, "node-1", "courier") if f.get("l7", {}).get("http", {}).get("url") == "/needs"
        and f["l7"]["http"]["code"] == 403])
    assert denied[-1]["direction"] == "egress", denied[-1]
    ingress = wait_for("vault's 403 for /direct as an ingress L7 flow", lambda: [
        f for f in flows(lab, "node-2", "vault") if f.get("l7", {}).get("http", {}).get("url") == "/direct"
        and f["l7"]["http"]["code"] == 403])
    assert ingress[-1]["direction"] == "ingress", ingress[-1]


def test_replace_from_a_secret_gets_the_client_through(lab: LabHandle, vault: str) -> None:
    """courier never knows the token: its egress Envoy sets it from the Secret, vault's checks it against the
    same Secret."""
    assert request(lab, "courier", vault, "/private").startswith(OK)
    assert request(lab, "courier", vault, "/private", "Access-Token: guess").startswith(OK)
    logged = wait_for("the REPLACE named in courier's flow", lambda: [
        f for f in flows(lab, "node-1", "courier") if f.get("l7", {}).get("http", {}).get("url") == "/private"
        and f["l7"]["http"].get("header_mismatch") == "Access-Token:REPLACE"])
    assert TOKEN_1 not in json.dumps(logged)


def test_a_missing_secret_fails_closed_says_so_and_recovers(lab: LabHandle, vault: str) -> None:
    def condition() -> dict[str, Any] | None:
        status = json.loads(lab.kubectl("get", "cnp", "-n", NS, "scout-out", "-o", "json").stdout).get("status", {})
        found = next((c for c in status.get("conditions", []) if c["type"] == "Enforced"), None)
        return found if found and "absent" in found.get("message", "") else None

    enforced = wait_for("scout-out's Enforced condition naming the Secret", condition)
    assert enforced["status"] == "False", enforced
    assert f"headerMatches Secret {NS}/absent: not found" in enforced["message"], enforced
    for header in ("X-Key: anything", None):
        out = request(lab, "scout", vault, "/x", *([header] if header else []), timeout=2)
        assert out.startswith(("timeout", "error")), out  # dropped (PROXY_UNAVAILABLE), never passed unchecked
    events = wait_for("the HeaderSecretProblem Event", lambda: [
        e for e in lab.events("scout-out", NS) if e["reason"] == "HeaderSecretProblem"])
    assert events[0]["type"] == "Warning" and f"{NS}/absent" in events[0]["message"], events
    # the Secret appears: the policy is enforced as written
    lab.kubectl("apply", "-f", "-", input=secret("absent", {"key": "k-9d1e"}))
    wait_for("scout's request with the Secret's value", lambda: request(
        lab, "scout", vault, "/x", "X-Key: k-9d1e", timeout=2).startswith(OK))
    assert request(lab, "scout", vault, "/x", "X-Key: other") == DENIED
    done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=60s", "-n", NS, "cnp/scout-out", check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)


def test_rotation_reaches_both_envoys_and_no_value_leaks(lab: LabHandle, vault: str) -> None:
    lab.kubectl("apply", "-f", "-", input=secret("token", {"token": TOKEN_2}))
    wait_for("vault's Envoy admitting the rotated token", lambda: request(
        lab, "courier", vault, "/direct", f"Access-Token: {TOKEN_2}").startswith(OK))
    # at once (no drain to wait for): a connection courier's Envoy pooled to vault's before the rotation is
    # judged by vault's new route configuration from its next request on
    for _ in range(6):
        out = request(lab, "courier", vault, "/direct", f"Access-Token: {TOKEN_1}")
        if out.startswith("timeout"):  # no answer is no admission, but the 403 is the evidence: ask again
            out = request(lab, "courier", vault, "/direct", f"Access-Token: {TOKEN_1}")
        assert out == DENIED, out
    assert request(lab, "courier", vault, "/private").startswith(OK)  # both sides use the new token
    values = (TOKEN_1, TOKEN_2, TEAM, "k-9d1e")
    for name in ("courier-out", "vault-in", "scout-out"):
        raw = lab.kubectl("get", "cnp", "-n", NS, name, "-o", "json").stdout
        assert not any(v in raw for v in values), name
    for node in ("node-1", "node-2"):
        intent = lab.ciliary("policy", "get", "--node", node, "--intent", "-o", "json")
        assert intent.returncode == 0, intent.stderr
        assert f"{NS}/token" in intent.stdout and not any(v in intent.stdout for v in values), node
    for node, pod in (("node-1", "courier"), ("node-2", "vault")):
        raw = json.dumps(flows(lab, node, pod))
        assert not any(v in raw for v in (TOKEN_1, TOKEN_2)), node  # header values the clients sent are not
    state = lab.lab.layout.state_dir
    # the kubelets' pod logs (nodes/<node>/pod-logs/kube-system_ciliary-operator-.../operator/0.log) and the
    # agents' state dirs
    logs = lab_logs(state)
    names = [str(p.relative_to(state)) for p in logs]
    assert any("operator" in n for n in names) and any("envoy" in n for n in names), names
    leaked = [str(p) for p, data in logs.items() if any(v.encode() in data for v in values)]
    assert leaked == [], leaked


KEEPALIVE = r"""
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
for line in sys.stdin:
    path, _, header = line.strip().partition(" ")
    name, _, value = header.partition(":")
    try:
        conn.request("GET", path, headers={name.strip(): value.strip()} if name else {})
        port = conn.sock.getsockname()[1]  # before the answer: a "Connection: close" one closes the socket
        answer = conn.getresponse()
        body = answer.read().decode(errors="replace").strip()
        print(answer.status, answer.getheader("Connection") or "-", port, body[:40], flush=True)
    except Exception as exc:
        print("error", type(exc).__name__, exc, flush=True)
"""


class KeptAlive:
    """One HTTP/1.1 connection from a pod, asked line by line (http.client reconnects only when the server
    closed it: the local port tells)."""

    def __init__(self, lab: LabHandle, pod: str, ip: str) -> None:
        netns, _ = lab.lab.pod_target(pod, NS)
        self.proc = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-c", KEEPALIVE, ip],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def get(self, path: str, header: str) -> tuple[str, str, str]:
        """(status and body, the Connection header, the local port)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{path} {header}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        assert ready, "no answer in 15 s"
        status, connection, port, *body = self.proc.stdout.readline().split(" ", 3)
        return f"{status} {' '.join(body).strip()}", connection, port

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_a_kept_alive_connection_is_judged_by_the_rotated_token_and_the_new_rules_at_once(
        lab: LabHandle, vault: str) -> None:
    """Cilium applies a change to the next request of every connection; so does Ciliary since the Envoys get
    their routes by RDS: no request of a connection opened before a change is judged by the old rules (before,
    the chains were replaced and drained, and such a connection carried one more request by the old rules)."""
    lab.kubectl("apply", "-f", "-", input=secret("token", {"token": TOKEN_3}))
    wait_for("vault's Envoy admitting the third token", lambda: request(
        lab, "courier", vault, "/direct", f"Access-Token: {TOKEN_3}").startswith(OK))
    client = KeptAlive(lab, "courier", vault)
    try:
        status, _, port = client.get("/direct", f"Access-Token: {TOKEN_3}")
        assert status == f"200 {NS}/vault", status

        def same_connection(path: str, header: str) -> str:
            status, connection, used = client.get(path, header)
            # the same connection, which Envoy does not close: no replaced chain drains it
            assert (used, connection.lower()) == (port, "-"), (status, connection, used, port)
            return status

        lab.kubectl("apply", "-f", "-", input=secret("token", {"token": TOKEN_4}))
        wait_for("vault's Envoy admitting the fourth token (a new connection)", lambda: request(
            lab, "courier", vault, "/direct", f"Access-Token: {TOKEN_4}").startswith(OK))
        assert same_connection("/direct", f"Access-Token: {TOKEN_3}") == "403 Access denied"
        assert same_connection("/direct", f"Access-Token: {TOKEN_4}") == f"200 {NS}/vault"
        # the rules change: vault's policy no longer admits /direct at all
        narrowed = POLICIES.replace("        - path: /direct\n"
                                    "          headerMatches: [{name: Access-Token, secret: {name: token}}]\n", "")
        assert narrowed.count("/direct") == POLICIES.count("/direct") - 1
        lab.apply(narrowed)
        wait_for("vault's Envoy denying /direct (a new connection)", lambda: request(
            lab, "courier", vault, "/direct", f"Access-Token: {TOKEN_4}") == DENIED)
        assert same_connection("/direct", f"Access-Token: {TOKEN_4}") == "403 Access denied"
        assert same_connection("/needs", f"X-Team: {TEAM}") == f"200 {NS}/vault"
    finally:
        client.close()
        lab.apply(POLICIES)
