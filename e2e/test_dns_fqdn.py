"""rules.dns and toFQDNs with real traffic: the node's DNS proxy, learnt addresses and their expiry.

Pods (namespace ``fq``, both on node-1, both selected by the policy): ``client``
resolves names, ``peer`` never does. The world host serves HTTP on
192.0.2.100 and DNS on 192.0.2.53 (``ciliary.lab.worlddns``: ``api``, ``www``,
``short`` (TTL 3 s) ``.world.test`` and ``mirror.example.test`` all answer
192.0.2.100). The lab runs its agents with ``--fqdn-min-ttl 1``, so the server's
TTLs decide how long an address stays allowed.

The policy lets the pods ask 192.0.2.53:53 (UDP and TCP) for ``*.world.test``
only, and reach port 80 of whatever ``api.world.test`` or ``short.world.test``
resolve to. Every wait is bounded polling.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ciliary.lab.layout import WORLD_DNS_IP, WORLD_IP
from lab_harness import LabHandle

pytestmark = pytest.mark.e2e
#: on the real-node lab (kubelets, Ciliary installed by its chart, agents with --fqdn-min-ttl 1:
#: chartinstall.lab_values): the flows are read from node-1's agent, not through `ciliary observe`
REAL_NODES = True

NS = "fq"
POLICY = "dns-fqdn"
MANIFESTS = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}, labels: {{app: fq}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: peer, namespace: {NS}, labels: {{app: fq}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
"""
CNP = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {POLICY}, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: fq}}}}
  egress:
  - toCIDR: ["{WORLD_DNS_IP}/32"]
    toPorts:
    - ports: [{{port: "53", protocol: UDP}}, {{port: "53", protocol: TCP}}]
      rules:
        dns: [{{matchPattern: "*.world.test"}}]
  - toFQDNs: [{{matchName: api.world.test}}, {{matchPattern: "short.world.*"}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
"""


def until(check: Callable[[], bool], seconds: float, what: str, step: float = 0.3) -> float:
    """Poll ``check`` until it holds (bounded); the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        if check():
            return time.monotonic() - began
        time.sleep(step)
    pytest.fail(f"not within {seconds} s: {what}")


class Fq:
    def __init__(self, lab: LabHandle) -> None:
        self.lab = lab

    def netns(self, pod: str) -> Path:
        return self.lab.lab.pod_target(pod, NS)[0]

    def resolve(self, pod: str, name: str, *, tcp: bool = False) -> dict[str, object]:
        argv = ["nsenter", f"--net={self.netns(pod)}", sys.executable, "-m", "ciliary.lab.dnsprobe", name,
                WORLD_DNS_IP, "--timeout", "3", *(["--tcp"] if tcp else [])]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
        result["returncode"] = out.returncode
        return result

    def http(self, pod: str, timeout: float = 1.0) -> bool:
        argv = ["nsenter", f"--net={self.netns(pod)}", sys.executable, "-m", "ciliary.lab.probe", "http",
                WORLD_IP, "80", "--timeout", str(timeout)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).returncode == 0

    def flows(self) -> list[dict[str, object]]:
        """client's flows from node-1's agent (what ``ciliary observe -o json`` prints), read on either lab:
        on real nodes the CLI finds agents at their registered node-local address (test_policy_explained.py)."""
        body = self.lab.agent_get("node-1", f"/v1/flows?last=500&pod={NS}/client", timeout=10)
        assert not body.startswith("<"), body  # the agent did not answer
        return [json.loads(line) for line in body.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def fq(lab: LabHandle) -> Iterator[Fq]:
    lab.apply(MANIFESTS)
    handle = Fq(lab)
    try:
        for pod in ("client", "peer"):
            lab.wait_running(pod, NS)
        yield handle
    finally:
        lab.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_without_policy_the_world_is_reachable_and_names_resolve(fq: Fq) -> None:
    until(lambda: fq.http("client"), 30, "client reaches the world host before any policy")
    answer = fq.resolve("client", "mirror.example.test")
    assert answer["rcode"] == "NOERROR" and answer["ips"] == [WORLD_IP], answer


def test_dns_rules_and_fqdns_enforced(fq: Fq) -> None:
    fq.lab.apply(CNP)
    done = fq.lab.kubectl("wait", "--for=condition=Enforced", f"cnp/{POLICY}", "-n", NS, "--timeout=90s",
                          check=False)
    status = fq.lab.kubectl("get", "cnp", POLICY, "-n", NS, "-o", "json").stdout
    assert done.returncode == 0, f"{done.stderr}\n{status}"

    # toFQDNs: nothing resolved yet, so the world host's address is not allowed
    until(lambda: not fq.http("client"), 20, "client blocked from the world host before resolving")
    assert not fq.http("peer")

    # rules.dns: a name outside *.world.test is refused by the proxy, never forwarded
    refused = fq.resolve("client", "mirror.example.test")
    assert refused["rcode"] == "REFUSED" and refused["ips"] == [], refused
    refused_tcp = fq.resolve("client", "mirror.example.test", tcp=True)
    assert refused_tcp["rcode"] == "REFUSED", refused_tcp
    # an allowed name that no toFQDNs selector matches resolves but opens nothing
    www = fq.resolve("client", "www.world.test")
    assert www["rcode"] == "NOERROR" and www["ips"] == [WORLD_IP], www
    assert not fq.http("client")

    # short.world.test (TTL 3 s) matches the pattern: allowed right after the answer ...
    short = fq.resolve("client", "short.world.test")
    assert short["rcode"] == "NOERROR" and short["ips"] == [WORLD_IP] and short["ttl"] == 3, short
    assert fq.http("client", timeout=2.0), "the proxy released the answer before the address was allowed"
    # ... only for the pod that resolved it ...
    assert not fq.http("peer")
    # ... and no longer once the TTL has run out
    took = until(lambda: not fq.http("client"), 20, "client blocked again after the TTL expired", step=0.5)
    print(f"blocked again {took:.1f} s after the first check (TTL 3 s)")

    # over TCP as well, with a name (matchName) of TTL 30 s
    api = fq.resolve("client", "api.world.test", tcp=True)
    assert api["rcode"] == "NOERROR" and api["ips"] == [WORLD_IP], api
    assert fq.http("client", timeout=2.0)

    # the DNS flows are in the agent's flow ring
    def dns_flows() -> list[dict[str, object]]:
        return [f for f in fq.flows() if isinstance(f.get("l7"), dict)]

    until(lambda: any(f["l7"]["query"] == "mirror.example.test" for f in dns_flows()), 20, "DNS flows")  # type: ignore[index]
    seen = dns_flows()
    denied = [f for f in seen if f["l7"]["query"] == "mirror.example.test"]  # type: ignore[index]
    assert denied and all(f["verdict"] == "DROPPED" and f["l7"]["rcode"] == "REFUSED" for f in denied)  # type: ignore[index]
    allowed = [f for f in seen if f["l7"]["query"] == "short.world.test"]  # type: ignore[index]
    assert allowed and allowed[-1]["verdict"] == "FORWARDED" and allowed[-1]["l7"]["ips"] == [WORLD_IP]  # type: ignore[index]
    assert allowed[-1]["policy"] and allowed[-1]["policy"][0]["name"] == POLICY  # type: ignore[index]
    print(json.dumps(allowed[-1], sort_keys=True))


def test_policy_removed_restores_everything(fq: Fq) -> None:
    fq.lab.kubectl("delete", "cnp", POLICY, "-n", NS)
    until(lambda: fq.http("peer"), 30, "peer reaches the world host once the policy is gone")
    answer = fq.resolve("client", "mirror.example.test")
    assert answer["rcode"] == "NOERROR", answer
