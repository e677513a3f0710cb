"""A real agent process enforcing intents it reads from a real etcd, on a private netns topology.

Three pods on one node (dp_topology): a (identity 1001), b (1002, the server), c (1003).
The test puts NodeIntents into etcd and checks real TCP between the pods, the
reports the agent writes under its lease, the flow API, a bad intent, and a
``kill -9`` + restart that keeps enforcing throughout. Everything it creates
(etcd, netns, pins under its own bpffs dir, processes) is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration" / "datapath"))

from dp_packets import frame, frame6, icmp6, mac_of, send_raw  # noqa: E402
from dp_topology import Client, Topology  # noqa: E402

from ciliary.cni import agent_client  # noqa: E402
from ciliary.lab import etcdsecurity  # noqa: E402
from ciliary.operator import intents  # noqa: E402
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict  # noqa: E402
from ciliary.operator.store import access, keyspace  # noqa: E402
from ciliary.operator.store.etcdclient import EtcdEndpoint, make_client  # noqa: E402

PYTHONPATH = os.pathsep.join(str(REPO / d) for d in ("operator", "nodeagent", "e2e"))
ID_A, ID_B, ID_C = 1001, 1002, 1003
POLICY = intents.PolicyRef(kind="CiliumNetworkPolicy", namespace="t", name="allow-a", uid="uid-allow-a", generation=1)
RULE = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="t", name="allow-a", uid="uid-allow-a", rule_index=0,
                       section="ingress[0]")
LEASE_TTL = 4

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


class Etcd:
    """A TLS-only etcd with authentication on; the test talks to it as the operator's etcd user."""

    def __init__(self, binary: Path) -> None:
        self.server = etcdsecurity.StandaloneEtcd(binary, Path(tempfile.mkdtemp(prefix="cyt-agent-etcd-")))
        self.endpoint = self.server.endpoint
        try:
            self.server.start()
        except BaseException:
            self.server.close()
            raise

    def run(self, fn: Callable[[Any], Any]) -> Any:
        async def go() -> Any:
            client = make_client(EtcdEndpoint.parse(self.endpoint), self.server.certs.client(access.OPERATOR_USER), 5)
            try:
                return await fn(client)
            finally:
                await client.close()

        return asyncio.run(go())

    def put(self, key: str, value: bytes) -> None:
        self.run(lambda c: c.put(key.encode(), value))

    def get(self, key: str) -> tuple[dict[str, Any], int] | None:
        async def fn(c: Any) -> Any:
            got = await c.get(key.encode())
            return None if got is None else (json.loads(got.value), got.lease)

        return self.run(fn)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.server.close()


class Agent:
    def __init__(self, etcd: Etcd, topo: Topology, workdir: Path) -> None:
        self.node = f"cyt-ag-{topo.tag}"
        self.topo = topo
        self.socket = workdir / "agent.sock"
        self.health = f"127.0.0.1:{free_port()}"
        self.bpffs = Path("/sys/fs/bpf/ciliary") / f"cyt-ag-{topo.tag}"
        self.argv = [sys.executable, "-m", "ciliary.nodeagent.main", "--node", self.node,
                     "--etcd-endpoints", etcd.endpoint, *etcd.server.add_node(self.node), "--socket", str(self.socket),
                     "--state-dir", str(workdir / "state"), "--health-addr", self.health,
                     "--lease-ttl", str(LEASE_TTL), "--netns", topo.node_ns, "--bpffs-dir", str(self.bpffs)]
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env={**os.environ, "PYTHONPATH": PYTHONPATH},
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: (self.enforcement() or {}).get("started"), 120, "datapath started")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def enforcement(self) -> dict[str, Any] | None:
        return http_json(f"http://{self.health}/v1/enforcement")  # type: ignore[no-any-return]

    def flows(self, query: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://{self.health}/v1/flows?{query}", timeout=10) as r:
            return [json.loads(line) for line in r.read().splitlines()]

    def register(self) -> None:
        client = agent_client.AgentClient(str(self.socket))
        for pod in self.topo.pods:
            client.add_endpoint({"containerId": f"ctr-{pod.name}", "podNamespace": "t", "podName": pod.name,
                                 "podUid": "", "netns": f"/run/netns/{pod.netns}", "ifname": "eth0",
                                 "hostIfname": pod.host_ifname, "hostIfindex": pod.host_ifindex,
                                 "mac": "02:00:00:00:00:01", "ipv4": pod.ip})


class Env:
    def __init__(self, etcd: Etcd, topo: Topology, agent: Agent) -> None:
        self.etcd, self.topo, self.agent = etcd, topo, agent
        self.a, self.b, self.c = topo.pods
        self.ca: Client = topo.client(self.a)
        self.cc: Client = topo.client(self.c)
        self.revision = 0

    def intent(self, b_in: DirectionPolicy, policies: tuple[intents.PolicyRef, ...] = (POLICY,),
               c_out: DirectionPolicy | None = None) -> int:
        self.revision += 1

        def ep(pod: Any, identity: int, ingress: DirectionPolicy,
               egress: DirectionPolicy | None = None) -> intents.EndpointIntent:
            return intents.EndpointIntent(namespace="t", pod=pod.name, ipv4=pod.ip, identity=identity,
                                          ingress=ingress, egress=egress or DirectionPolicy())

        intent = intents.NodeIntent(
            node=self.agent.node, revision=self.revision,
            endpoints=(ep(self.a, ID_A, DirectionPolicy()), ep(self.b, ID_B, b_in),
                       ep(self.c, ID_C, DirectionPolicy(), c_out)),
            ipcache=tuple(intents.IpcacheEntry(cidr=f"{p.ip}/32", identity=i)
                          for p, i in ((self.a, ID_A), (self.b, ID_B), (self.c, ID_C))),
            identity_labels={ID_A: ("k8s:app=a", "k8s:io.kubernetes.pod.namespace=t"),
                             ID_C: ("k8s:app=c", "k8s:io.kubernetes.pod.namespace=t")},
            policies=policies)
        self.etcd.put(keyspace.node_intent_key(self.agent.node), intent.to_wire())
        return self.revision

    def wait_applied(self, revision: int) -> dict[str, Any]:
        return wait_until(lambda: (e := self.agent.enforcement()) and e["applied_revision"] == revision and e,
                          30, f"revision {revision} applied")

    def report(self) -> tuple[dict[str, Any], int] | None:
        return self.etcd.get(keyspace.report_key(POLICY.uid, self.agent.node))

    def status(self) -> tuple[dict[str, Any], int] | None:
        return self.etcd.get(keyspace.node_status_key(self.agent.node))


def allow_from(*identities: int) -> DirectionPolicy:
    return DirectionPolicy(enforced=True, entries=tuple(
        PolicyEntry(identity=i, protocol=Protocol.TCP, port_low=8080, verdict=Verdict.ALLOW, rules=(RULE,))
        for i in identities))


@pytest.fixture(scope="module")
def env(tool: Callable[[str], Path]) -> Iterator[Env]:
    tool("ip")  # the pods' topology is built with iproute2
    etcd = Etcd(tool("etcd"))
    workdir = Path(tempfile.mkdtemp(prefix="cyt-agent-"))
    topo = Topology(pods=3)
    agent: Agent | None = None
    try:
        topo.up()
        topo.serve(topo.pods[1], [8080], [])
        agent = Agent(etcd, topo, workdir)
        agent.start()
        agent.register()
        yield Env(etcd, topo, agent)
    finally:
        if agent is not None:
            agent.kill()
            with contextlib.suppress(OSError):
                sys.stderr.write(agent.log_path.read_text()[-3000:])
            shutil.rmtree(agent.bpffs, ignore_errors=True)
        topo.down()
        etcd.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_intent_in_etcd_is_enforced_and_reported(env: Env) -> None:
    revision = env.intent(allow_from(ID_A))
    state = env.wait_applied(revision)
    assert state["error"] == "" and state["unplaced"] == []
    assert env.ca.tcp(env.b.ip, 8080) == "ok"
    assert env.cc.tcp(env.b.ip, 8080) == "timeout"
    report, lease = wait_until(env.report, 15, "policy report")
    assert report["ok"] and report["enforcing"] and report["localPolicyRevision"] == revision
    assert report["generation"] == 1 and lease != 0
    status, status_lease = wait_until(env.status, 15, "node status")
    assert status["appliedRevision"] == revision and status["enforcing"] and status_lease == lease
    node_record = env.etcd.get(keyspace.node_key(env.agent.node))
    assert node_record is not None and node_record[1] == lease  # the registration's lease


def test_the_agent_process_maps_no_compiler(env: Env) -> None:
    # programs are compiled and verified in a short-lived child (datapath.compiler): clang and
    # LLVM never enter the agent, whose memory budget they alone would break
    assert env.agent.proc is not None and env.agent.enforcement()
    mapped = Path(f"/proc/{env.agent.proc.pid}/maps").read_text()
    assert "libLLVM" not in mapped and "libclang" not in mapped


def test_flow_api_shows_enriched_verdicts(env: Env) -> None:
    dropped = wait_until(lambda: env.agent.flows(f"last=50&verdict=DROPPED&ip={env.c.ip}"), 10, "a dropped flow")
    flow = dropped[-1]
    assert flow["node"] == env.agent.node and flow["direction"] == "ingress" and flow["protocol"] == "TCP"
    assert flow["src"]["identity"] == ID_C and flow["src"]["pod"] == "p2" and flow["src"]["namespace"] == "t"
    assert flow["dst"]["pod"] == "p1" and flow["dst"]["port"] == 8080 and "SYN" in flow["tcp_flags"]
    assert flow["drop_reason"] == "POLICY_DENIED"
    allowed = env.agent.flows(f"last=50&verdict=FORWARDED&ip={env.a.ip}&port=8080")
    # the connection's forward flows name the allowing rule; its replies (the answer, the server's FIN: medium
    # monitor aggregation) were allowed by conntrack, not by a rule, and name none
    opened = [f for f in allowed if not f["is_reply"]]
    assert opened and opened[-1]["policy"] == [RULE.model_dump(mode="json")], allowed
    assert all(f["policy"] == [] for f in allowed if f["is_reply"]), allowed
    stats = http_json(f"http://{env.agent.health}/v1/flows/stats")
    assert stats["seen"] >= 2 and stats["lost"] == 0


def test_policy_change_is_map_writes_only(env: Env) -> None:
    before = env.agent.enforcement()
    assert before is not None
    revision = env.intent(allow_from(ID_A, ID_C))
    state = env.wait_applied(revision)
    assert state["last_compiled"] == [] and state["last_attached"] == 0 and state["last_map_writes"] > 0
    assert state["program_hashes"] == before["program_hashes"]
    assert env.cc.tcp(env.b.ip, 8080) == "ok"


def test_bad_schema_is_reported_and_the_old_state_keeps_enforcing(env: Env) -> None:
    revision = env.intent(allow_from(ID_A))
    env.wait_applied(revision)
    env.etcd.put(keyspace.node_intent_key(env.agent.node),
                 json.dumps({"schema_version": 99, "node": env.agent.node, "revision": 99}).encode())
    status, _ = wait_until(lambda: (s := env.status()) and s[0]["error"] and s, 15, "error in node status")
    assert "unknown schema version 99" in status["error"] and status["appliedRevision"] == revision
    report, _ = wait_until(lambda: (r := env.report()) and not r[0]["ok"] and r, 15, "policy report not ok")
    assert report["enforcing"] and "unknown schema version 99" in report["error"]
    assert env.ca.tcp(env.b.ip, 8080) == "ok"
    assert env.cc.tcp(env.b.ip, 8080) == "timeout"


def ciliary(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``ciliary`` CLI against this test's etcd (and, through the registrations, its agent)."""
    return subprocess.run([sys.executable, "-m", "ciliary.cli.main", *args, "--etcd-endpoints",
                           env.etcd.endpoint, *env.etcd.server.flags(access.OPERATOR_USER)], env={**os.environ, "PYTHONPATH": PYTHONPATH},
                          capture_output=True, text=True, timeout=60)


def test_policy_get_and_trace_read_the_datapath_and_say_when_it_differs_from_the_intent(env: Env) -> None:
    revision = env.intent(allow_from(ID_A))
    env.wait_applied(revision)
    held = http_json(f"http://{env.agent.health}/v1/datapath")
    assert held["source"] == "datapath" and held["appliedRevision"] == revision
    server = next(e for e in held["intent"]["endpoints"] if e["ipv4"] == env.b.ip)
    assert server["pod"] == "p1" and server["namespace"] == "t" and server["ingress"]["enforced"]
    assert [(e["identity"], e["port_low"], e["rules"]) for e in server["ingress"]["entries"]] == [
        (ID_A, 8080, [RULE.model_dump(mode="json")])]
    got = ciliary(env, "policy", "get", "--node", env.agent.node, "-o", "json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["differences"] == [] and "WARNING" not in got.stderr
    allowed = ciliary(env, "policy", "trace", "--src", "t/p0", "--dst", "t/p1", "--dport", "8080/tcp", "-o", "json")
    assert allowed.returncode == 0, allowed.stderr
    result = json.loads(allowed.stdout)
    assert result["verdict"] == "ALLOWED" and result["source"] == "datapath" and result["differences"] == []
    assert result["directions"][-1]["rules"] == [RULE.model_dump(mode="json")]

    # an intent the node cannot apply (cy_policy would overflow): the kernel keeps the old entries
    filler = tuple(PolicyEntry(identity=5000 + i, protocol=Protocol.TCP, port_low=1, port_high=65535,
                               verdict=Verdict.ALLOW) for i in range(4200))
    wanted = DirectionPolicy(enforced=True, entries=(*allow_from(ID_A, ID_C).entries, *filler))
    failing = env.intent(wanted)
    wait_until(lambda: (e := env.agent.enforcement()) and e["wanted_revision"] == failing
               and e["error_kind"] == "MapFull", 60, "the apply to fail with MapFull")
    assert env.cc.tcp(env.b.ip, 8080) == "timeout"  # what the kernel does
    traced = ciliary(env, "policy", "trace", "--src", "t/p2", "--dst", "t/p1", "--dport", "8080/tcp", "-o", "json")
    assert traced.returncode == 0, traced.stderr
    result = json.loads(traced.stdout)
    assert result["verdict"] == "DENIED" and result["intentVerdict"] == "ALLOWED", result
    assert any(f"allow identity {ID_C} TCP port 8080" in d for d in result["differences"]), result
    text = ciliary(env, "policy", "trace", "--src", "t/p2", "--dst", "t/p1", "--dport", "8080/tcp").stdout
    assert text.startswith("DENIED (from the datapath of ") and "WARNING: the datapath differs" in text, text
    got = ciliary(env, "policy", "get", "--node", env.agent.node, "-o", "json")
    doc = json.loads(got.stdout)
    assert doc["appliedRevision"] == revision and doc["publishedRevision"] == failing
    assert "MapFull" in doc["agentError"] or "cy_policy" in doc["agentError"]
    assert doc["differences"] and "WARNING: the datapath of" in got.stderr
    published = ciliary(env, "policy", "get", "--node", env.agent.node, "--intent", "-o", "json")
    assert json.loads(published.stdout)["source"].startswith("operator intent")
    env.wait_applied(env.intent(allow_from(ID_A)))


def test_parser_drops_show_in_the_flow_api_and_ciliary_observe(env: Env) -> None:
    """A non-first fragment into an enforced pod and IPv6 from one are dropped with their reasons."""
    allow_all = DirectionPolicy(enforced=True, entries=(PolicyEntry(identity=0, verdict=Verdict.ALLOW),))
    env.wait_applied(env.intent(allow_from(ID_A), c_out=allow_all))
    gateway = mac_of(env.topo.node_ns, env.c.host_ifname)
    pod_mac = mac_of(env.c.netns, "eth0")
    send_raw(env.c.netns, "eth0", frame(env.c.ip, env.b.ip, 17, l4=b"", payload=b"f" * 80, frag=64,
                                        dst_mac=gateway, src_mac=pod_mac))
    send_raw(env.c.netns, "eth0", frame6("fd00::c", "fd00::b", 58, icmp6(128), dst_mac=gateway, src_mac=pod_mac))

    def reasons() -> set[str]:
        out = ciliary(env, "observe", "--node", env.agent.node, "--verdict", "DROPPED", "--last", "200", "-o", "json")
        flows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        return {f["drop_reason"] for f in flows if f["src"]["ip"] in (env.c.ip, "fd00::c")}

    seen = wait_until(lambda: (r := reasons()) >= {"FRAGMENT_NO_L4", "UNSUPPORTED_L3"} and r, 15,
                      "fragment and IPv6 drops in ciliary observe")
    assert "FRAGMENT_NO_L4" in seen
    v6 = env.agent.flows("last=200&verdict=DROPPED&protocol=ICMPv6")
    assert any(f["src"]["ip"] == "fd00::c" and f["dst"]["ip"] == "fd00::b" and f["drop_reason"] == "UNSUPPORTED_L3"
               for f in v6), v6
    env.wait_applied(env.intent(allow_from(ID_A)))


def test_kill_9_keeps_enforcing_reports_expire_and_restart_adopts(env: Env) -> None:
    revision = env.intent(allow_from(ID_A))
    env.wait_applied(revision)
    wait_until(lambda: (r := env.report()) and r[0]["ok"], 15, "report ok again")
    env.agent.kill()
    # the datapath still enforces, but nobody can read it: trace must not pretend
    unknown = ciliary(env, "policy", "trace", "--src", "t/p2", "--dst", "t/p1", "--dport", "8080/tcp")
    assert unknown.returncode == 2 and unknown.stdout.startswith("UNKNOWN"), unknown.stdout + unknown.stderr
    assert ciliary(env, "policy", "get", "--node", env.agent.node).returncode == 1
    assert env.ca.tcp(env.b.ip, 8080) == "ok"
    assert env.cc.tcp(env.b.ip, 8080) == "timeout"
    wait_until(lambda: env.report() is None and env.status() is None, LEASE_TTL * 4, "reports gone with the lease")
    env.agent.start()
    state = env.wait_applied(revision)
    # adopted: the pinned programs of the same hash keep running, nothing re-attached, no map churn
    assert state["last_compiled"] == [] and state["last_attached"] == 0 and state["last_map_writes"] == 0
    report, _ = wait_until(env.report, 15, "reports back")
    assert report["ok"] and report["localPolicyRevision"] == revision
    assert env.ca.tcp(env.b.ip, 8080) == "ok"
    assert env.cc.tcp(env.b.ip, 8080) == "timeout"
