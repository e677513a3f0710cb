"""The real ``ciliary-cni`` executable against real netns, a real agent and a real etcd.

Topology per test: one "node" netns (the plugin runs inside it via ``ip netns exec``,
exactly as a kubelet on that node would run it) and pod netns next to it. etcd and the
agent run on loopback ports of the root netns; nothing is added to the root netns'
addresses or routes. Everything is removed in fixture teardown, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from ciliary.cni import agent_client, plumbing
from ciliary.lab import etcdsecurity
from ciliary.operator.store import access
from ciliary.operator.store.etcdclient import EtcdEndpoint, make_client

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
PYTHONPATH = os.pathsep.join(str(REPO / d) for d in ("operator", "nodeagent", "e2e"))

PING = r"""
import os, socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); sock.settimeout(2)
ident = os.getpid() & 0xFFFF
hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ciliary!"
pkt = struct.pack("!BBHHH", 8, 0, csum(hdr), ident, 1) + b"ciliary!"
sock.sendto(pkt, (sys.argv[1], 0)); deadline = time.time() + 2
while time.time() < deadline:
    data, addr = sock.recvfrom(2048); icmp = data[(data[0] & 0xF) * 4:]
    if addr[0] == sys.argv[1] and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
        print("pong"); sys.exit(0)
sys.exit(1)
"""

TCP_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(15); print("listening", flush=True)
c, peer = s.accept(); c.sendall(("hello " + peer[0]).encode()); c.close()
"""

TCP_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print(c.recv(100).decode())
"""


# -- helpers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def in_ns(ns: str, *argv: str, timeout: float = 15, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout, **kw)


def etcd_get(server: etcdsecurity.StandaloneEtcd, key: str):
    """``key`` read as the operator's etcd user: (value, lease, TTL) or None."""

    async def get():
        client = make_client(EtcdEndpoint.parse(server.endpoint), server.certs.client(access.OPERATOR_USER), 5)
        try:
            got = await client.get(key.encode())
            if got is None:
                return None
            ttl = None
            if got.lease:
                ttl = (await client.get_lease_info(got.lease, keys=False)).TTL
            return json.loads(got.value), got.lease, ttl
        finally:
            await client.close()

    return asyncio.run(get())


# -- fixtures ------------------------------------------------------------------------------


def etcd_server(binary: Path) -> etcdsecurity.StandaloneEtcd:
    """A single-member etcd (TLS only, authentication on) with data and certificates in a temporary directory."""
    return etcdsecurity.StandaloneEtcd(binary, Path(tempfile.mkdtemp(prefix="cyt-cni-etcd-")))


@pytest.fixture(scope="module")
def etcd(tool):
    tool("ip")  # the plugin runs in the node's netns through `ip netns exec`
    server = etcd_server(tool("etcd"))
    try:
        server.start()
        yield server
    finally:
        server.close()


NODE = f"cyt-node-{secrets.token_hex(3)}"
"""One node name for the module's agents: their pins (one compile) are adopted by the next agent."""
BPFFS = Path("/sys/fs/bpf/ciliary") / f"{NODE}-cni"


@pytest.fixture(scope="module", autouse=True)
def bpffs_dir():
    """The agents' pins live under a bpffs directory of this module only, removed at the end."""
    try:
        yield BPFFS
    finally:
        shutil.rmtree(BPFFS, ignore_errors=True)


class AgentProc:
    """A real agent with its datapath (``--datapath on``, the default) on the lab's node netns."""

    def __init__(self, etcd: etcdsecurity.StandaloneEtcd, workdir: Path, node_ns: str, *, datapath: str = "on") -> None:
        self.node = NODE
        self.socket = workdir / "agent.sock"
        self.health = f"127.0.0.1:{free_port()}"
        self.log_path = workdir / f"{self.node}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ciliary.nodeagent.main", "--node", self.node,
             "--etcd-endpoints", etcd.endpoint, *etcd.add_node(self.node), "--socket", str(self.socket),
             "--state-dir", str(workdir / "state"), "--health-addr", self.health, "--lease-ttl", "6",
             "--netns", node_ns, "--bpffs-dir", str(BPFFS), *(["--datapath", datapath] if datapath != "on" else [])],
            env={**os.environ, "PYTHONPATH": PYTHONPATH}, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            if datapath == "on":
                wait_until(lambda: http_status(f"http://{self.health}/readyz") == 200, 180, "agent readiness")
            else:
                wait_until(lambda: http_status(f"http://{self.health}/healthz") == 200 and self.socket.exists(),
                           30, "agent up")
        except BaseException:
            self.stop()
            sys.stderr.write(self.log_path.read_text(errors="replace")[-3000:])
            raise

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def endpoints(self) -> list[dict]:
        conn = agent_client.UnixHTTPConnection(str(self.socket), timeout=5)
        try:
            conn.request("GET", "/v1/endpoints")
            return json.loads(conn.getresponse().read())["endpoints"]
        finally:
            conn.close()

    def healthz(self) -> dict:
        with urllib.request.urlopen(f"http://{self.health}/healthz", timeout=2) as r:
            return json.loads(r.read())


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="cyt-cni-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(etcd, workdir, lab):
    proc = AgentProc(etcd, workdir, lab.node)
    try:
        yield proc
    finally:
        proc.stop()


class Lab:
    """A node netns plus pod netns, all removed at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.tag = secrets.token_hex(3)
        self.workdir = workdir
        self.namespaces: list[str] = []
        self.node = self.new_netns("node")
        self.subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}.0/24"

    def new_netns(self, role: str) -> str:
        name = f"cyt-cni-{self.tag}-{role}"
        netns.create(name)
        self.namespaces.append(name)
        return name

    def remove_netns(self, name: str) -> None:
        if name in netns.listnetns():
            netns.remove(name)

    def cleanup(self) -> None:
        for name in reversed(self.namespaces):
            with contextlib.suppress(OSError):
                self.remove_netns(name)

    def conf(self, *, socket_path: Path, subnet: str | None = None, version: str = "1.0.0", **extra) -> dict:
        return {"cniVersion": version, "name": "ciliary", "type": "ciliary-cni", "mtu": 1400,
                "ipam": {"type": "host-local-ciliary", "subnet": subnet or self.subnet,
                         "dataDir": str(self.workdir / "ipam")},
                "agentSocket": str(socket_path), **extra}

    def cni(self, command: str, container_id: str, pod_ns: str | None, conf: dict) -> tuple[int, dict | None, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": PYTHONPATH,
            "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/run/netns/{pod_ns}" if pod_ns else "", "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{container_id[:6]};"
                        f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{container_id[:6]}",
        }
        proc = subprocess.run(
            ["ip", "netns", "exec", self.node, sys.executable, "-m", "ciliary.cni.main"],
            input=json.dumps(conf), env=env, capture_output=True, text=True, timeout=60,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out, proc.stderr

    def node_links(self) -> set[str]:
        with IPRoute(netns=self.node, flags=0) as ipr:
            return {link.get("ifname") for link in ipr.get_links()}

    def pod_links(self, pod_ns: str) -> set[str]:
        with IPRoute(netns=pod_ns, flags=0) as ipr:
            return {link.get("ifname") for link in ipr.get_links()}

    def ipam_files(self) -> set[str]:
        d = self.workdir / "ipam"
        return {p.name for p in d.iterdir() if p.name[0].isdigit()} if d.exists() else set()


@pytest.fixture
def lab(workdir):
    lab = Lab(workdir)
    try:
        yield lab
    finally:
        lab.cleanup()


def new_container_id() -> str:
    return secrets.token_hex(32)


# -- tests ---------------------------------------------------------------------------------


def test_version_from_the_node_netns(lab):
    code, out, _ = lab.cni("VERSION", "x", None, {"cniVersion": "1.0.0"})
    assert code == 0
    assert "1.0.0" in out["supportedVersions"]


def test_two_pods_talk_agent_knows_them_and_del_removes_everything(lab, agent, etcd):
    conf = lab.conf(socket_path=agent.socket)
    pods = {}
    for role in ("a", "b"):
        ns, cid = lab.new_netns(f"pod{role}"), new_container_id()
        code, result, err = lab.cni("ADD", cid, ns, conf)
        assert code == 0, (result, err)
        pods[role] = (ns, cid, result)

    ns_a, cid_a, res_a = pods["a"]
    ns_b, cid_b, res_b = pods["b"]
    host_a = plumbing.host_ifname_for(cid_a)
    # result JSON contract
    assert res_a["cniVersion"] == "1.0.0"
    assert res_a["interfaces"][0]["name"] == host_a
    assert res_a["interfaces"][1]["name"] == "eth0"
    assert res_a["interfaces"][1]["sandbox"] == f"/run/netns/{ns_a}"
    ip_a, ip_b = (r["ips"][0]["address"].split("/")[0] for r in (res_a, res_b))
    assert res_a["ips"] == [{"address": f"{ip_a}/32", "gateway": "169.254.1.1", "interface": 1}]
    assert res_a["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert res_a["dns"] == {}
    assert ip_a != ip_b and not ip_a.endswith(".1")
    with IPRoute(netns=ns_a, flags=0) as ipr:
        eth0 = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0]
        assert eth0.get("address") == res_a["interfaces"][1]["mac"]
        assert eth0.get("mtu") == 1400
    with IPRoute(netns=lab.node, flags=0) as ipr:
        veth = ipr.get_links(ipr.link_lookup(ifname=host_a)[0])[0]
        assert veth.get("address") == res_a["interfaces"][0]["mac"]
    assert in_ns(lab.node, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    assert in_ns(lab.node, "cat", f"/proc/sys/net/ipv4/conf/{host_a}/rp_filter").stdout.strip() == "0"

    # real traffic: ICMP both ways, TCP a -> b, all through the host veths in the node netns
    for src, dst in ((ns_a, ip_b), (ns_b, ip_a)):
        pong = in_ns(src, sys.executable, "-c", PING, dst)
        assert pong.returncode == 0 and "pong" in pong.stdout, pong
    port = 18000 + secrets.randbelow(1000)
    server = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", TCP_SERVER, ip_b, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and "listening" in server.stdout.readline()
        client = in_ns(ns_a, sys.executable, "-c", TCP_CLIENT, ip_b, str(port))
        assert client.returncode == 0, client
        assert client.stdout.strip() == f"hello {ip_a}"
    finally:
        stop_process(server, signal.SIGKILL)
        if server.stdout:
            server.stdout.close()

    # CHECK passes on a healthy pod
    code, out, err = lab.cni("CHECK", cid_a, ns_a, {**conf, "prevResult": res_a})
    assert (code, out) == (0, None), err

    # the agent knows both endpoints, its etcd record is lease-bound and counts them
    listed = {e["containerId"]: e for e in agent.endpoints()}
    assert set(listed) == {cid_a, cid_b}
    assert listed[cid_a]["ipv4"] == ip_a
    assert listed[cid_a]["hostIfname"] == host_a
    assert listed[cid_a]["podName"] == f"pod-{cid_a[:6]}"
    assert listed[cid_a]["netns"] == f"/run/netns/{ns_a}"
    assert agent.healthz() == {"node": agent.node, "status": "ok", "etcd": "connected", "endpoints": 2,
                               "problems": []}
    def record_counts_two() -> bool:
        got = etcd_get(etcd, f"/ciliary/nodes/v1/{agent.node}")
        return got is not None and got[0].get("endpoints") == 2

    wait_until(record_counts_two, 10, "node record to count 2 endpoints")
    record, lease, ttl = etcd_get(etcd, f"/ciliary/nodes/v1/{agent.node}")
    assert lease != 0 and 0 < ttl <= 6
    assert record["name"] == agent.node and record["pid"] == agent.proc.pid
    assert record["healthAddr"] == agent.health

    # DEL removes veth, address and endpoint; DEL again (and with the netns gone) is fine
    assert len(lab.ipam_files()) == 2
    for ns, cid, _ in pods.values():
        code, out, err = lab.cni("DEL", cid, ns, conf)
        assert (code, out) == (0, None), err
        assert plumbing.host_ifname_for(cid) not in lab.node_links()
        assert "eth0" not in lab.pod_links(ns)
        code, _, err = lab.cni("DEL", cid, ns, conf)
        assert code == 0, err
    lab.remove_netns(ns_a)
    code, _, err = lab.cni("DEL", cid_a, ns_a, conf)
    assert code == 0, err
    code, _, err = lab.cni("DEL", cid_a, None, conf)
    assert code == 0, err
    assert lab.ipam_files() == set()
    assert agent.endpoints() == []

    # CHECK after DEL reports the missing reservation
    code, out, _ = lab.cni("CHECK", cid_b, ns_b, conf)
    assert code == 1 and out["code"] == 104


def test_exhausted_subnet_is_code_100_and_leaves_nothing(lab, agent):
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}.0/30"
    conf = lab.conf(socket_path=agent.socket, subnet=subnet)
    ns1, ns2 = lab.new_netns("p1"), lab.new_netns("p2")
    cid1, cid2 = new_container_id(), new_container_id()
    code, result, err = lab.cni("ADD", cid1, ns1, conf)
    assert code == 0, err
    assert result["ips"][0]["address"] == subnet.replace(".0/30", ".2/32")
    code, out, _ = lab.cni("ADD", cid2, ns2, conf)
    assert code == 1
    assert out["code"] == 100 and subnet in out["msg"]
    assert set(out) == {"cniVersion", "code", "msg", "details"}
    assert plumbing.host_ifname_for(cid2) not in lab.node_links()
    assert "eth0" not in lab.pod_links(ns2)
    assert {e["containerId"] for e in agent.endpoints()} == {cid1}
    code, _, err = lab.cni("DEL", cid1, ns1, conf)
    assert code == 0, err
    assert lab.ipam_files() == set()


def test_agent_down_is_code_101_and_leaves_nothing(lab, workdir):
    conf = lab.conf(socket_path=workdir / "no-agent.sock")
    ns, cid = lab.new_netns("orphan"), new_container_id()
    links_before = lab.node_links()
    code, out, err = lab.cni("ADD", cid, ns, conf)
    assert code == 1, err
    assert out["code"] == 101
    assert "unreachable" in out["msg"]
    assert lab.node_links() == links_before
    assert "eth0" not in lab.pod_links(ns)
    assert lab.ipam_files() == set()
    # DEL with the agent down still succeeds
    code, out, err = lab.cni("DEL", cid, ns, conf)
    assert (code, out) == (0, None), err


def test_agent_without_datapath_refuses_the_endpoint_code_105_and_leaves_nothing(lab, etcd, workdir):
    """--datapath off (tests only): the agent enforces nothing, so no pod may come up through it."""
    agent = AgentProc(etcd, workdir, lab.node, datapath="off")
    try:
        ready = urllib.request.Request(f"http://{agent.health}/readyz")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(ready, timeout=10)
        assert refused.value.code == 503
        problems = json.loads(refused.value.read())["problems"]  # may also say "not registered" yet
        assert any("datapath off" in p for p in problems), problems
        conf = lab.conf(socket_path=agent.socket)
        ns, cid = lab.new_netns("unenforced"), new_container_id()
        links_before = lab.node_links()
        code, out, err = lab.cni("ADD", cid, ns, conf)
        assert code == 1, err
        assert out["code"] == 105 and "enforces nothing" in out["msg"], out
        assert "datapath off" in out["details"]
        assert lab.node_links() == links_before
        assert "eth0" not in lab.pod_links(ns)
        assert lab.ipam_files() == set()
        assert agent.endpoints() == []
    finally:
        agent.stop()


def test_missing_netns_on_add_is_code_3(lab, agent):
    code, out, _ = lab.cni("ADD", new_container_id(), f"cyt-cni-{lab.tag}-nonexistent", lab.conf(socket_path=agent.socket))
    assert code == 1 and out["code"] == 3
    assert lab.ipam_files() == set()
    assert f"cyt-cni-{lab.tag}-nonexistent" not in netns.listnetns()


def test_agent_shutdown_revokes_its_lease_and_restart_keeps_endpoints(lab, etcd, workdir):
    first = AgentProc(etcd, workdir, lab.node)
    try:
        conf = lab.conf(socket_path=first.socket)
        ns, cid = lab.new_netns("persist"), new_container_id()
        code, _, err = lab.cni("ADD", cid, ns, conf)
        assert code == 0, err
        key = f"/ciliary/nodes/v1/{first.node}"
        assert etcd_get(etcd, key) is not None
    finally:
        first.stop()
    assert first.proc.returncode == 0
    assert etcd_get(etcd, key) is None  # revoked, not merely expired (TTL is 6s)
    assert not first.socket.exists()
    second = AgentProc(etcd, workdir, lab.node)
    try:
        assert [e["containerId"] for e in second.endpoints()] == [cid]
        code, _, err = lab.cni("DEL", cid, ns, conf)
        assert code == 0, err
        assert second.endpoints() == []
    finally:
        second.stop()


def test_agent_re_registers_after_etcd_lost_its_data(workdir, lab, tool):
    server = etcd_server(tool("etcd"))
    agent = None
    try:
        server.start()
        agent = AgentProc(server, workdir, lab.node)
        key = f"/ciliary/nodes/v1/{agent.node}"
        _, first_lease, _ = etcd_get(server, key)
        server.stop()
        server.wipe()
        wait_until(lambda: agent.healthz()["etcd"] == "disconnected", 15, "agent to notice etcd is gone")
        server.start()
        wait_until(lambda: etcd_get(server, key) is not None, 20, "node record to come back")
        _, second_lease, ttl = etcd_get(server, key)
        assert second_lease != 0 and 0 < ttl <= 6
        wait_until(lambda: agent.healthz()["etcd"] == "connected", 10, "agent to reconnect")
        wait_until(lambda: http_status(f"http://{agent.health}/readyz") == 200, 15, "ready again (watch back)")
    finally:
        if agent is not None:
            agent.stop()
        server.close()
