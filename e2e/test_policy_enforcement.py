"""Policies enforced in the kernel, proven with real traffic in the lab.

Each test applies one CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy to a
shared set of pods, waits (bounded polling, never a fixed sleep) until the first
expected drop is observed, then checks a matrix of paths: allowed ones land
(HTTP 200, UDP echo, ICMP echo reply, which also proves the replies pass) and
denied ones time out. A refused connection is never counted as a policy drop.
After each test the policy is deleted and the test waits until the path it
watched is allowed again, so the next test starts from "no policy".

Pods (module scope; ``pe-a`` has label team=a, ``pe-b`` team=b):

| pod         | labels                      | node   | ports                                   |
| ----------- | --------------------------- | ------ | --------------------------------------- |
| pe-a/client | app=client, role=frontend   | node-1 | 80/tcp, 53/udp                          |
| pe-a/other  | app=other, role=batch       | node-1 | 80/tcp                                  |
| pe-a/local  | app=local, tier=backend     | node-1 | 80/tcp, 53/udp                          |
| pe-a/server | app=server, tier=backend    | node-2 | 80, 8080, 8081, 9000/tcp; 53, 5353/udp  |
| pe-b/remote | app=client, role=frontend   | node-2 | 80/tcp, 53/udp                          |

So client->local is same-node, client->server cross-node, remote->server
same-node; the world host is 192.0.2.100 and node-i is 192.0.2.(10+i).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from ciliary.lab.layout import WORLD_IP

pytestmark = pytest.mark.e2e
#: on the session's real-node lab (kubelets, Ciliary installed by its chart): passes there (e2e/conftest.py);
#: on the session's real-node lab; the CLI's explanations of these verdicts: test_policy_explained.py
REAL_NODES = True

NS_A, NS_B = "pe-a", "pe-b"
NODE_IP = {"node-1": "192.0.2.11", "node-2": "192.0.2.12"}
ENFORCE_SECONDS = 20.0
DROP_TIMEOUT = 1.0    # a denied probe waits this long for an answer
ALLOW_TIMEOUT = 2.0   # an allowed probe must be answered within this
WORKERS = 6

MANIFESTS = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS_A}, labels: {{team: a}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: {NS_B}, labels: {{team: b}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS_A}, labels: {{app: client, role: frontend}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}, {{containerPort: 53, protocol: UDP}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: other, namespace: {NS_A}, labels: {{app: other, role: batch}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: local, namespace: {NS_A}, labels: {{app: local, tier: backend}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}, {{containerPort: 53, protocol: UDP}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {NS_A}, labels: {{app: server, tier: backend}}}}
spec:
  nodeName: node-2
  containers:
  - name: c
    image: lab
    ports:
    - {{containerPort: 80}}
    - {{containerPort: 8080}}
    - {{containerPort: 8081}}
    - {{containerPort: 9000}}
    - {{containerPort: 53, protocol: UDP}}
    - {{containerPort: 5353, protocol: UDP}}
---
apiVersion: v1
kind: Pod
metadata: {{name: remote, namespace: {NS_B}, labels: {{app: client, role: frontend}}}}
spec:
  nodeName: node-2
  containers: [{{name: c, image: lab, ports: [{{containerPort: 80}}, {{containerPort: 53, protocol: UDP}}]}}]
"""
PODS = ("pe-a/client", "pe-a/other", "pe-a/local", "pe-a/server", "pe-b/remote")


# --- paths and probes -----------------------------------------------------------------------

@dataclass(frozen=True)
class Path:
    """One probe: ``src`` is ``ns/pod``, ``world`` or ``node-N`` (the node's namespace);
    ``dst`` is ``ns/pod``, ``world`` or ``node-N`` (its address); kind http|udp|ping."""

    src: str
    kind: str
    dst: str
    port: int = 0

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        proto = {"http": "tcp", "udp": "udp", "ping": "icmp"}[self.kind]
        return f"{self.src} -> {self.dst}{port}/{proto}"


def http(src: str, dst: str, port: int = 80) -> Path:
    return Path(src, "http", dst, port)


def udp(src: str, dst: str, port: int = 53) -> Path:
    return Path(src, "udp", dst, port)


def ping(src: str, dst: str) -> Path:
    return Path(src, "ping", dst)


@dataclass
class Pods:
    lab: object
    ips: dict[str, str]
    netns: dict[str, str]
    nodes: dict[str, str]

    def ip(self, name: str) -> str:
        if name == "world":
            return WORLD_IP
        if name in NODE_IP:
            return NODE_IP[name]
        return self.ips[name]

    def run(self, path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", f"--net={self.netns[path.src]}", sys.executable, "-m",
                "ciliary.lab.probe", path.kind, self.ip(path.dst)]
        if path.port:
            argv.append(str(path.port))
        return subprocess.run([*argv, "--timeout", str(timeout)], capture_output=True, text=True,
                              timeout=timeout + 30)

    def lands(self, path: Path) -> tuple[bool, str]:
        out = self.run(path, ALLOW_TIMEOUT)
        ok = out.returncode == 0 and (path.kind != "http" or " 200 " in out.stdout)
        return ok, (out.stdout + out.stderr).strip()

    def dropped(self, path: Path) -> tuple[bool, str]:
        out = self.run(path, DROP_TIMEOUT)
        ok = out.returncode == 1 and "timeout" in out.stdout
        return ok, (out.stdout + out.stderr).strip()


def check(pods: Pods, allowed: Sequence[Path] = (), denied: Sequence[Path] = (),
          diagnose: Callable[[], str] = lambda: "") -> None:
    """Probe every path in parallel; fail listing every path that did not behave."""
    jobs = [(p, True) for p in allowed] + [(p, False) for p in denied]
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda job: (job, (pods.lands if job[1] else pods.dropped)(job[0])), jobs))
    wrong = [f"  {'ALLOW' if want else 'DROP '} expected: {path}  -> got: {detail!r}"
             for (path, want), (ok, detail) in results if not ok]
    if wrong:
        pytest.fail("paths not as expected:\n" + "\n".join(wrong) + "\n" + diagnose())


def poll(probe: Callable[[], tuple[bool, str]], seconds: float = ENFORCE_SECONDS) -> tuple[bool, str]:
    deadline = time.monotonic() + seconds
    ok, detail = probe()
    while not ok and time.monotonic() < deadline:
        time.sleep(0.2)
        ok, detail = probe()
    return ok, detail


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pods(lab) -> Pods:
    lab.apply(MANIFESTS)
    ips, netns, nodes = {}, {}, {}
    for qualified in PODS:
        ns, name = qualified.split("/")
        pod = lab.wait_running(name, ns)
        ips[qualified] = pod["status"]["podIP"]
        nodes[qualified] = pod["spec"]["nodeName"]
        netns[qualified] = lab.netns(name, ns)
    netns["world"] = lab.world_netns()
    for node in NODE_IP:
        netns[node] = lab.node_netns(node)
    assert nodes == {"pe-a/client": "node-1", "pe-a/other": "node-1", "pe-a/local": "node-1",
                     "pe-a/server": "node-2", "pe-b/remote": "node-2"}
    return Pods(lab, ips, netns, nodes)


@dataclass
class Enforced:
    kind: str
    name: str
    namespace: str | None
    restore: Path


class Policies:
    """Apply policies, wait until they are enforced; delete them (and wait for the allow) after the test."""

    def __init__(self, lab, pods: Pods) -> None:
        self.lab, self.pods = lab, pods
        self.applied: list[Enforced] = []

    def enforce(self, policy: Policy, first_drop: Path) -> None:
        """Apply ``policy`` and wait until ``first_drop`` is dropped."""
        kind, name, namespace = policy.kind, policy.name, policy.namespace
        doc = policy.manifest
        self.lab.apply(doc)
        self.applied.append(Enforced(kind, name, namespace, first_drop))
        ok, detail = poll(lambda: self.pods.dropped(first_drop))
        if not ok:
            pytest.fail(f"{kind} {name}: {first_drop} still not dropped after {ENFORCE_SECONDS:g} s "
                        f"(last: {detail!r})\n{self.diagnose([first_drop])}")

    def cleanup(self) -> None:
        problems = []
        for item in reversed(self.applied):
            ns = ["-n", item.namespace] if item.namespace else []
            self.lab.kubectl("delete", item.kind, item.name, *ns, "--ignore-not-found", "--wait=true")
        for item in self.applied:
            ok, detail = poll(lambda item=item: self.pods.lands(item.restore))
            if not ok:
                problems.append(f"{item.restore} not allowed again {ENFORCE_SECONDS:g} s after deleting "
                                f"{item.kind} {item.name}: {detail!r}")
        self.applied.clear()
        if problems:
            pytest.fail("\n".join(problems) + "\n" + self.diagnose([]))

    # -- evidence for failure messages ---------------------------------------------------------

    def trace(self, path: Path) -> str:
        proto = {"http": "tcp", "udp": "udp", "ping": "icmp"}[path.kind]
        port = path.port if path.kind != "ping" else 8
        src = path.src if "/" in path.src else self.pods.ip(path.src)
        dst = path.dst if "/" in path.dst else self.pods.ip(path.dst)
        out = trace(self.lab, src, dst, f"{port}/{proto}")
        return (out.stdout + out.stderr).strip()

    def diagnose(self, paths: Sequence[Path]) -> str:
        lines = ["--- diagnostics"]
        for item in self.applied:
            ns = ["-n", item.namespace] if item.namespace else []
            out = self.lab.kubectl("get", item.kind, item.name, *ns, "-o", "jsonpath={.status}", check=False)
            lines.append(f"{item.kind} {item.name} status: {out.stdout.strip() or out.stderr.strip()}")
        for path in paths:
            lines.append(f"trace {path}:\n{self.trace(path)}")
        for node in NODE_IP:
            lines.append(f"{node} enforcement: {agent_get(self.lab, node, '/v1/enforcement')}")
        return "\n".join(lines)


def trace(lab, src: str, dst: str, dport: str, *more: str) -> subprocess.CompletedProcess[str]:
    """``ciliary policy trace`` against this lab's etcd, never an ETCDCTL_ENDPOINTS of the caller's shell."""
    return lab.ciliary("policy", "trace", "--etcd-endpoints", lab.etcd_endpoint,
                       "--src", src, "--dst", dst, "--dport", dport, *more)


def agent_get(lab, node: str, path: str) -> str:
    return str(lab.agent_get(node, path))


@pytest.fixture
def policies(lab, pods) -> Iterator[Policies]:
    p = Policies(lab, pods)
    try:
        yield p
    finally:
        p.cleanup()


@dataclass(frozen=True)
class Policy:
    kind: str  # cnp | ccnp
    name: str
    namespace: str | None
    manifest: str


def cnp(name: str, spec: str, namespace: str = NS_A) -> Policy:
    return Policy("cnp", name, namespace, f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                  f"metadata: {{name: {name}, namespace: {namespace}}}\n{spec.strip()}\n")


def ccnp(name: str, spec: str) -> Policy:
    return Policy("ccnp", name, None, f"apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\n"
                  f"metadata: {{name: {name}}}\n{spec.strip()}\n")


CLIENT, OTHER, LOCAL, SERVER, REMOTE = "pe-a/client", "pe-a/other", "pe-a/local", "pe-a/server", "pe-b/remote"


# --- baseline ---------------------------------------------------------------------------------

def test_without_policy_everything_lands(pods):
    """The baseline every other test starts from (and returns to)."""
    check(pods,
          allowed=[http(CLIENT, SERVER), http(OTHER, SERVER), http(CLIENT, LOCAL), http(REMOTE, SERVER),
                   http(SERVER, CLIENT), http("world", SERVER), http(CLIENT, "world"), http(SERVER, "world"),
                   udp(CLIENT, SERVER), udp(CLIENT, "world"), ping(CLIENT, SERVER), ping(CLIENT, "world")])


# --- L3 ---------------------------------------------------------------------------------------

def test_l3_by_labels_same_and_cross_node(pods, policies):
    policies.enforce(cnp("l3-labels", """
spec:
  endpointSelector: {matchLabels: {tier: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
"""), first_drop=http(OTHER, SERVER))
    check(pods,
          allowed=[http(CLIENT, SERVER), http(CLIENT, LOCAL), udp(CLIENT, SERVER), udp(CLIENT, LOCAL),
                   ping(CLIENT, SERVER), ping(CLIENT, LOCAL),
                   # egress of the selected pods and ingress of unselected pods stay open
                   http(SERVER, CLIENT), http(LOCAL, OTHER), http(SERVER, "world")],
          denied=[http(OTHER, LOCAL), udp(OTHER, SERVER), ping(OTHER, LOCAL), http(REMOTE, SERVER),
                  http("world", SERVER), http("world", LOCAL)],
          diagnose=lambda: policies.diagnose([http(OTHER, LOCAL)]))


def test_l3_by_match_expressions(pods, policies):
    policies.enforce(cnp("l3-expressions", """
spec:
  endpointSelector:
    matchExpressions: [{key: tier, operator: In, values: [backend, database]}]
  ingress:
  - fromEndpoints:
    - matchExpressions:
      - {key: role, operator: NotIn, values: [frontend]}
      - {key: app, operator: Exists}
"""), first_drop=http(CLIENT, SERVER))
    check(pods, allowed=[http(OTHER, SERVER), http(OTHER, LOCAL), udp(OTHER, LOCAL)],
          denied=[http(CLIENT, LOCAL), udp(CLIENT, SERVER), http(REMOTE, SERVER)],
          diagnose=lambda: policies.diagnose([http(CLIENT, LOCAL)]))


def test_l3_by_namespaces(pods, policies):
    policies.enforce(cnp("l3-namespaces", """
specs:
- endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: pe-b}}]
- endpointSelector: {matchLabels: {app: local}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.cilium.k8s.namespace.labels.team: b, role: frontend}}]
"""), first_drop=http(CLIENT, SERVER))
    # pe-a/client and pe-b/remote carry the same labels: only the namespace tells them apart
    check(pods, allowed=[http(REMOTE, SERVER), udp(REMOTE, SERVER), http(REMOTE, LOCAL), udp(REMOTE, LOCAL)],
          denied=[http(CLIENT, LOCAL), http(OTHER, SERVER), http(OTHER, LOCAL)],
          diagnose=lambda: policies.diagnose([http(CLIENT, LOCAL)]))


# --- L4 ---------------------------------------------------------------------------------------

def test_l4_by_port_and_protocol(pods, policies):
    policies.enforce(cnp("l4-ports", """
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports:
      - {port: "80", protocol: TCP}
      - {port: "5353", protocol: UDP}
      - {port: "53", protocol: TCP}
"""), first_drop=http(CLIENT, SERVER, 8080))
    check(pods, allowed=[http(CLIENT, SERVER, 80), udp(CLIENT, SERVER, 5353)],
          # 53/udp: right port, wrong protocol; ICMP: any L4 rule closes it; other: L3 still applies
          denied=[udp(CLIENT, SERVER, 53), http(CLIENT, SERVER, 9000), ping(CLIENT, SERVER),
                  http(OTHER, SERVER, 80), udp(OTHER, SERVER, 5353)],
          diagnose=lambda: policies.diagnose([udp(CLIENT, SERVER, 53), ping(CLIENT, SERVER)]))


def test_l4_by_port_range(pods, policies):
    policies.enforce(cnp("l4-range", """
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - toPorts:
    - ports:
      - {port: "8080", endPort: 8081, protocol: TCP}
"""), first_drop=http(CLIENT, SERVER, 80))
    # an L4-only rule admits any peer, the world included
    check(pods, allowed=[http(CLIENT, SERVER, 8080), http(CLIENT, SERVER, 8081), http(REMOTE, SERVER, 8081),
                         http("world", SERVER, 8080)],
          denied=[http(CLIENT, SERVER, 9000), udp(CLIENT, SERVER, 5353), http("world", SERVER, 80),
                  ping(CLIENT, SERVER)],
          diagnose=lambda: policies.diagnose([http(CLIENT, SERVER, 9000)]))


# --- CIDR and entities ------------------------------------------------------------------------

def test_cidr_with_except_to_the_world_host(pods, policies):
    policies.enforce(cnp("cidr-except", """
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDRSet:
    - cidr: 192.0.2.0/24
      except: [192.0.2.100/32]
  - toCIDR: [192.0.2.100/32]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
"""), first_drop=http(CLIENT, "world", 80))
    # the except carves the world host out of the /24 only; the /32 entry lets 443 through
    check(pods, allowed=[http(CLIENT, "world", 443), http(OTHER, "world", 80), http(OTHER, CLIENT)],
          denied=[http(CLIENT, "world", 8080), udp(CLIENT, "world", 53), ping(CLIENT, "world"),
                  http(CLIENT, SERVER), http(CLIENT, LOCAL)],
          diagnose=lambda: policies.diagnose([http(CLIENT, "world", 8080)]))


def test_entity_world(pods, policies):
    policies.enforce(cnp("entity-world", """
specs:
- endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
- endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [world]
"""), first_drop=http(CLIENT, SERVER))
    check(pods, allowed=[http(CLIENT, "world", 80), udp(CLIENT, "world", 53), ping(CLIENT, "world"),
                         http("world", SERVER), udp("world", SERVER, 5353), ping("world", SERVER)],
          denied=[http(CLIENT, LOCAL), udp(CLIENT, LOCAL), http(OTHER, SERVER), http(REMOTE, SERVER),
                  ping(REMOTE, SERVER)],
          diagnose=lambda: policies.diagnose([http(CLIENT, LOCAL), http(REMOTE, SERVER)]))


def test_entity_cluster(pods, policies):
    policies.enforce(cnp("entity-cluster", """
specs:
- endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [cluster]
- endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [cluster]
"""), first_drop=http(CLIENT, "world", 80))
    check(pods,
          allowed=[http(CLIENT, SERVER), udp(CLIENT, SERVER), ping(CLIENT, SERVER), http(CLIENT, LOCAL),
                   http(CLIENT, REMOTE), ping(CLIENT, "node-1"), http(OTHER, SERVER), http(REMOTE, SERVER)],
          denied=[udp(CLIENT, "world", 53), ping(CLIENT, "world"), http("world", SERVER),
                  ping("world", SERVER)],
          diagnose=lambda: policies.diagnose([http("world", SERVER)]))


HOST_POLICY = cnp("entity-host", """
specs:
- endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [host]
- endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [remote-node]
""")


def test_entity_host_and_remote_node(pods, policies):
    policies.enforce(HOST_POLICY, first_drop=http(CLIENT, SERVER))
    # client is on node-1: its host is 192.0.2.11; node-2 (192.0.2.12) is a remote node, not "host".
    # server is on node-2: traffic from node-1's namespace comes from 192.0.2.11, a remote node.
    check(pods, allowed=[ping(CLIENT, "node-1"), http("node-1", SERVER), ping("node-1", SERVER)],
          denied=[ping(CLIENT, "node-2"), ping(CLIENT, "world"), http(CLIENT, LOCAL), http(OTHER, SERVER),
                  http(REMOTE, SERVER), http("world", SERVER)],
          diagnose=lambda: policies.diagnose([ping(CLIENT, "node-2"), http(OTHER, SERVER)]))


def test_host_is_always_allowed_into_its_pods(pods, policies):
    policies.enforce(HOST_POLICY, first_drop=http(CLIENT, SERVER))
    # server (node-2) only admits remote nodes, but its own host is always allowed in (allow-localhost)
    check(pods, allowed=[http("node-2", SERVER), ping("node-2", SERVER)],
          diagnose=lambda: policies.diagnose([]))


# --- deny, default deny, replies --------------------------------------------------------------

DENY_WINS = cnp("deny-wins", """
spec:
  endpointSelector: {matchLabels: {tier: backend}}
  ingress:
  - fromEndpoints: [{}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: other}}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
""")


def enforce_deny_wins(pods: Pods, policies: Policies) -> None:
    policies.enforce(DENY_WINS, first_drop=http(OTHER, SERVER))
    check(pods,
          allowed=[http(CLIENT, SERVER), http(CLIENT, SERVER, 8081), udp(CLIENT, SERVER),
                   ping(CLIENT, SERVER), http(CLIENT, LOCAL)],
          denied=[http(CLIENT, SERVER, 8080), http(OTHER, LOCAL), ping(OTHER, SERVER), udp(OTHER, LOCAL),
                  http(REMOTE, SERVER)],
          diagnose=lambda: policies.diagnose([http(CLIENT, SERVER, 8080), http(OTHER, LOCAL)]))


def test_deny_beats_allow(pods, policies):
    """The explanation of the same policy (trace, policy get, flows): test_policy_explained.py."""
    enforce_deny_wins(pods, policies)


def test_default_deny_egress_only_lets_replies_out(pods, policies):
    policies.enforce(cnp("egress-default-deny", """
spec:
  endpointSelector: {matchLabels: {app: server}}
  egress:
  - {}
"""), first_drop=http(SERVER, CLIENT))
    # connections into server are untouched, and their replies leave despite egress default-deny
    check(pods,
          allowed=[http(CLIENT, SERVER), udp(CLIENT, SERVER), udp(CLIENT, SERVER, 5353), ping(CLIENT, SERVER),
                   http(REMOTE, SERVER), http("world", SERVER), ping("world", SERVER)],
          denied=[http(SERVER, REMOTE), udp(SERVER, LOCAL), ping(SERVER, CLIENT), http(SERVER, "world"),
                  udp(SERVER, "world", 53)],
          diagnose=lambda: policies.diagnose([http(SERVER, REMOTE), http(SERVER, "world")]))


def test_default_deny_ingress_only_lets_replies_in(pods, policies):
    policies.enforce(cnp("ingress-default-deny", """
spec:
  endpointSelector: {matchLabels: {app: client}}
  ingress:
  - {}
"""), first_drop=http(SERVER, CLIENT))
    # connections out of client keep working, and their replies come in despite ingress default-deny
    check(pods,
          allowed=[http(CLIENT, "world"), udp(CLIENT, "world", 53), ping(CLIENT, "world"),
                   http(CLIENT, SERVER), udp(CLIENT, LOCAL), ping(CLIENT, LOCAL)],
          denied=[http(OTHER, CLIENT), udp(SERVER, CLIENT), ping(OTHER, CLIENT), http("world", CLIENT),
                  udp("world", CLIENT, 53)],
          diagnose=lambda: policies.diagnose([http(OTHER, CLIENT)]))


# --- clusterwide --------------------------------------------------------------------------------

def test_ccnp_all_pods_of_all_namespaces_but_never_world(pods, policies):
    policies.enforce(ccnp("pe-all-pods", """
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
"""), first_drop=http("world", SERVER))
    # every pod of every namespace (pe-a <-> pe-b, same node and across) but not the world host
    check(pods,
          allowed=[http(CLIENT, REMOTE), udp(CLIENT, REMOTE), ping(CLIENT, REMOTE), http(REMOTE, SERVER),
                   http(REMOTE, LOCAL), http(OTHER, CLIENT), udp(OTHER, LOCAL), http(CLIENT, "world")],
          denied=[http("world", REMOTE), http("world", CLIENT), udp("world", LOCAL, 53),
                  ping("world", SERVER)],
          diagnose=lambda: policies.diagnose([http("world", CLIENT)]))
