"""The proxy-visibility pod annotation with real traffic: observed through Envoy, verdicts unchanged.

Pods (namespace ``l7v``): ``server`` (TCP 80) annotated ``<Ingress/80/TCP/HTTP>`` and ``typo``
annotated with a refused value (Kafka), both on node-1; ``client`` on node-2 and ``intruder`` on node-1.
(a) with no policy, the client's request is answered and is an L7 flow with method, path and status;
(b) an L3/L4 policy admitting only the client keeps the intruder dropped in the kernel and the client
observed, and the policy reads Enforced=True; (c) the refused annotation gives a Warning Event on its pod
and changes nothing: the request is answered and is no L7 flow; (d) ``watcher`` (node-1, annotated
``<Egress/53/UDP/DNS>,<Egress/80/TCP/HTTP>``, no policy) resolves a name at the world host's DNS server
and fetches from its HTTP server: both answered, both L7 flows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ciliary.lab.layout import WORLD_DNS_IP, WORLD_IP
from lab_harness import LabHandle, wait_for

pytestmark = pytest.mark.e2e
#: on the real-node lab (kubelets, Ciliary installed by its chart), like test_l7_http: the agent image carries
#: Envoy and the chart sets up its redirect there
REAL_NODES = True

NS = "l7v"
MANIFEST = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: {NS}
  labels: {{app: server}}
  annotations: {{policy.cilium.io/proxy-visibility: "<Ingress/80/TCP/HTTP>"}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: typo
  namespace: {NS}
  labels: {{app: typo}}
  annotations: {{io.cilium.proxy-visibility: "<Ingress/80/TCP/Kafka>"}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: watcher
  namespace: {NS}
  labels: {{app: watcher}}
  annotations: {{policy.cilium.io/proxy-visibility: "<Egress/53/UDP/DNS>,<Egress/80/TCP/HTTP>"}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}, labels: {{app: client}}}}
spec:
  nodeName: node-2
  containers: [{{name: c, image: lab}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: intruder, namespace: {NS}, labels: {{app: intruder}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab}}]
"""
POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: only-client, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
"""


def resolve(lab: LabHandle, pod: str, name: str) -> dict[str, Any]:
    netns, _ = lab.lab.pod_target(pod, NS)
    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.dnsprobe", name, WORLD_DNS_IP,
            "--timeout", "3"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    return json.loads(out.splitlines()[-1]) if out else {}


def request(lab: LabHandle, pod: str, ip: str, path: str, timeout: float = 3.0) -> tuple[int, str]:
    netns, _ = lab.lab.pod_target(pod, NS)
    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "ciliary.lab.probe", "http", ip, "80",
            "--method", "GET", "--path", path, "--timeout", str(timeout)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    return proc.returncode, proc.stdout.strip()


def l7_flows(lab: LabHandle, pod: str, path: str) -> list[dict[str, Any]]:
    """``pod``'s L7 flows on node-1: HTTP ones of request target ``path``, DNS ones of query ``path``."""
    body = lab.agent_get("node-1", f"/v1/flows?last=500&pod={NS}/{pod}", timeout=10)
    flows = [json.loads(line) for line in body.splitlines() if line.startswith("{")]
    return [f for f in flows if isinstance(f.get("l7"), dict)
            and (f["l7"].get("http", {}).get("url") == path or f["l7"].get("query") == path)]


def events(lab: LabHandle, pod: str, reason: str) -> list[str]:
    out = lab.kubectl("get", "events", "-n", NS, "--field-selector", f"involvedObject.name={pod},reason={reason}",
                      "-o", "jsonpath={range .items[*]}{.type} {.message}{'\\n'}{end}", check=False)
    return [line for line in out.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def scene(lab: LabHandle) -> Iterator[dict[str, str]]:
    lab.apply(MANIFEST)
    for pod in ("server", "typo", "watcher", "client", "intruder"):
        lab.wait_running(pod, NS)
    try:
        yield {pod: str(lab.pod(pod, NS)["status"]["podIP"]) for pod in ("server", "typo")}
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_a_pod_without_policy_is_observed_and_still_answers(lab: LabHandle, scene: dict[str, str]) -> None:
    enabled = wait_for("the VisibilityEnabled Event", lambda: events(lab, "server", "VisibilityEnabled"))
    assert enabled[0].startswith("Normal ") and "ingress TCP/80 HTTP" in enabled[0], enabled

    def answered_and_seen() -> dict[str, Any] | None:  # the redirect follows the intent within a few seconds
        code, out = request(lab, "client", scene["server"], "/seen/a")
        assert code == 0 and out.startswith("HTTP/1.1 200"), out  # never blocked meanwhile
        found = l7_flows(lab, "server", "/seen/a")
        return found[-1] if found else None

    flow = wait_for("an L7 flow of the observed request", answered_and_seen)
    assert (flow["verdict"], flow["direction"]) == ("FORWARDED", "ingress"), flow
    assert (flow["l7"]["http"]["method"], flow["l7"]["http"]["code"]) == ("GET", 200), flow
    assert flow["src"]["namespace"] == NS  # the client's identity
    code, out = request(lab, "intruder", scene["server"], "/seen/b")  # no policy: everyone still gets in
    assert code == 0 and out.startswith("HTTP/1.1 200"), out


def test_a_denied_peer_stays_denied_and_the_policy_is_enforced(lab: LabHandle, scene: dict[str, str]) -> None:
    lab.apply(POLICY)
    done = lab.kubectl("wait", "--for=condition=Enforced", "--timeout=90s", "-n", NS, "cnp/only-client",
                       check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    code, out = request(lab, "intruder", scene["server"], "/denied", timeout=1.5)
    assert code == 1 and out.startswith("timeout"), out
    assert not l7_flows(lab, "server", "/denied")
    code, out = request(lab, "client", scene["server"], "/seen/c")
    assert code == 0 and out.startswith("HTTP/1.1 200"), out
    flow = wait_for("the allowed request's L7 flow", lambda: (l7_flows(lab, "server", "/seen/c") or [None])[-1])
    assert [p["name"] for p in flow["policy"]] == ["only-client"], flow  # it names the policy that allowed it


def test_a_refused_annotation_warns_and_changes_nothing(lab: LabHandle, scene: dict[str, str]) -> None:
    warned = wait_for("the VisibilityAnnotationInvalid Event",
                      lambda: events(lab, "typo", "VisibilityAnnotationInvalid"))
    assert warned[0].startswith("Warning ") and "Kafka visibility is not built" in warned[0], warned
    code, out = request(lab, "client", scene["typo"], "/plain")
    assert code == 0 and out.startswith("HTTP/1.1 200"), out
    kernel = lab.agent_get("node-1", f"/v1/flows?last=500&pod={NS}/typo", timeout=10)
    assert '"OK_PROXY"' not in kernel and not l7_flows(lab, "typo", "/plain")


def test_egress_dns_and_http_are_observed_and_answered(lab: LabHandle, scene: dict[str, str]) -> None:
    wait_for("the watcher's VisibilityEnabled Event", lambda: events(lab, "watcher", "VisibilityEnabled"))

    def seen() -> tuple[dict[str, Any], dict[str, Any]] | None:
        answer = resolve(lab, "watcher", "api.world.test")
        assert (answer.get("rcode"), answer.get("ips")) == ("NOERROR", [WORLD_IP]), answer  # never blocked
        code, out = request(lab, "watcher", WORLD_IP, "/egress-seen")
        assert code == 0 and out.startswith("HTTP/1.1 200"), out
        dns, http = l7_flows(lab, "watcher", "api.world.test"), l7_flows(lab, "watcher", "/egress-seen")
        return (dns[-1], http[-1]) if dns and http else None

    dns, http = wait_for("the watcher's DNS and HTTP L7 flows", seen)
    assert (dns["verdict"], dns["l7"]["rcode"], dns["l7"]["ips"]) == ("FORWARDED", "NOERROR", [WORLD_IP]), dns
    assert (http["verdict"], http["direction"], http["l7"]["http"]["code"]) == ("FORWARDED", "egress", 200), http
