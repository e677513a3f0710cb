"""The namespaces and processes of the north-south load-balancer tests (test_northsouth_lb.py).

:class:`Net` builds them: an underlay bridge joining ``world`` (10.77.<t>.100), ``node`` (10.77.<t>.1, the
node under test) and ``node2`` (10.77.<t>.2); a pod behind a veth on each node (10.78.<t>.2 on node,
10.79.<t>.2 on node2). Every backend (``SERVER``) answers with its name and the address:port it saw the
client as (on 8081 it keeps the connection until the client ends it); ``PROBE`` connects from the world
host, ``SAME_PORT`` reuses source ports in given steps, ``BURST`` fires datagrams and counts the ICMP errors
that come back; every veth checks checksums in software (``SOFTWARE_CHECKSUMS``). ``Net.down`` removes
everything.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from typing import Any

SERVER = r"""
import socket, sys, threading
name = sys.argv[1]
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen(128)
    while True:
        c, peer = s.accept()
        c.sendall(f"{name} {peer[0]}:{peer[1]}".encode()); c.close()
def hold():  # answers, then keeps the connection until the client ends it (a client that resets)
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8081)); s.listen(128)
    while True:
        c, peer = s.accept()
        c.settimeout(10)
        try:
            c.sendall(f"{name} {peer[0]}:{peer[1]}".encode()); c.recv(1)
        except OSError:
            pass
        c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 8053))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(f"{name} {peer[0]}:{peer[1]}".encode(), peer)
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=hold, daemon=True).start()
print("ready", flush=True)
tcp()
"""

PROBE = r"""
import json, socket, sys
kind, ip, port, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
source = (sys.argv[6], 0) if len(sys.argv) > 6 else None
out = []
for _ in range(count):
    try:
        if kind == "tcp":
            s = socket.create_connection((ip, port), timeout=timeout, source_address=source)
            peer, data = s.getpeername(), b""
            while chunk := s.recv(4096):
                data += chunk
        elif kind == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
            s.sendto(b"x" * 100, (ip, port))
            data, peer = s.recvfrom(4096)
        else:  # "udp-connected": an ICMP error for the datagram fails recv() (unconnected sockets ignore it)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
            if source:
                s.bind(source)
            s.connect((ip, port))
            s.send(b"x" * 100)
            data, peer = s.recv(4096), s.getpeername()
        s.close()
        out.append({"ok": True, "peer": f"{peer[0]}:{peer[1]}", "body": data.decode()})
    except OSError as exc:
        out.append({"ok": False, "error": type(exc).__name__})
print(json.dumps(out))
"""

BURST = r"""
import json, socket, struct, sys, time
source, ip, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
interval = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
raw.settimeout(0.1)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((source, 0))
started = time.monotonic()
for _ in range(count):
    udp.sendto(b"x" * 100, (ip, port))
    time.sleep(interval)
sending = time.monotonic() - started
answers, deadline = 0, time.monotonic() + 1.0
while time.monotonic() < deadline:
    try:
        data = raw.recv(2048)
    except TimeoutError:
        continue
    icmp = data[(data[0] & 15) * 4:]
    quoted = icmp[8:]
    l4 = quoted[(quoted[0] & 15) * 4:]
    if icmp[:2] == bytes([3, 3]) and quoted[9] == 17 and socket.inet_ntoa(quoted[12:16]) == source \
            and struct.unpack("!H", l4[2:4])[0] == port:
        answers += 1
print(json.dumps({"answers": answers, "sending_seconds": sending}))
"""
"""Send ``count`` UDP datagrams from ``source`` as fast as possible; count the ICMP port unreachables that come back."""

SAME_PORT = r"""
import json, socket, struct, sys
steps = json.loads(sys.argv[1])
def connect(local_port, ip, port, reset):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.settimeout(3)
    try:
        s.bind(("0.0.0.0", local_port)); s.connect((ip, port))
        data = s.recv(4096)
        if not reset:
            while chunk := s.recv(4096):
                data += chunk
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return {"ok": True, "body": data.decode()}
    except OSError as exc:
        return {"ok": False, "error": str(exc)}
    finally:
        s.close()
print(json.dumps([connect(*step) for step in steps]))
"""
"""Connect from the world host as each step ``[local port, ip, port, reset]`` says, in order: read the answer,
then close after the server did (``reset`` false) or reset at once (true). One result per step."""

SOFTWARE_CHECKSUMS = r"""
import sys
from pyroute2.ethtool import Ethtool
ethtool = Ethtool()
transmit_offload = sys.argv[1] == "tx-offload"
for name in sys.argv[2:]:
    features = ethtool.get_features(name)
    features.features["rx-checksum"].enable = False
    features.features["tx-checksum-ip-generic"].enable = transmit_offload
    ethtool.set_features(name, features)
"""


def sh(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


class Net:
    """The namespaces, links and server processes of one test module."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        t = 20 + secrets.randbelow(200)
        self.under, self.world, self.node, self.node2 = (f"cyt-ns-{self.tag}-{n}" for n in ("u", "w", "n1", "n2"))
        self.pod1, self.pod2 = f"cyt-ns-{self.tag}-p1", f"cyt-ns-{self.tag}-p2"
        self.world_ip, self.node_ip, self.node2_ip = f"10.77.{t}.100", f"10.77.{t}.1", f"10.77.{t}.2"
        self.pod1_ip, self.pod2_ip = f"10.78.{t}.2", f"10.79.{t}.2"
        self.servers: list[subprocess.Popen[str]] = []

    def _ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _wire(self, netns: str, port: str, address: str) -> None:
        sh("ip", "-n", self.under, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "-n", self.under, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh(sys.executable, "-c", SOFTWARE_CHECKSUMS, "software", "eth0", netns=netns)

    def _pod(self, node: str, pod: str, ip: str, name: str) -> None:
        self._ns(pod)
        veth = "cy" + secrets.token_hex(5)
        sh("ip", "-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod)
        sh("ip", "-n", node, "addr", "add", "169.254.1.1/32", "dev", veth)
        sh("ip", "-n", node, "link", "set", veth, "up")
        sh("ip", "-n", node, "route", "add", f"{ip}/32", "dev", veth)
        sh("ip", "-n", pod, "addr", "add", f"{ip}/32", "dev", "eth0")
        sh("ip", "-n", pod, "link", "set", "eth0", "up")
        sh("ip", "-n", pod, "route", "add", "169.254.1.1/32", "dev", "eth0", "scope", "link")
        sh("ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        sh(sys.executable, "-c", SOFTWARE_CHECKSUMS, "software", "eth0", netns=pod)
        sh(sys.executable, "-c", SOFTWARE_CHECKSUMS, "software", veth, netns=node)
        proc = subprocess.Popen(["ip", "netns", "exec", pod, sys.executable, "-c", SERVER, name],
                                stdout=subprocess.PIPE, text=True)
        self.servers.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def up(self) -> Net:
        for name in (self.under, self.world, self.node, self.node2):
            self._ns(name)
        sh("ip", "-n", self.under, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.under, "link", "set", "br0", "up")
        for netns, port, address in ((self.world, "w0", self.world_ip), (self.node, "n1", self.node_ip),
                                     (self.node2, "n2", self.node2_ip)):
            self._wire(netns, port, address)
        for node in (self.node, self.node2):
            sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=node)
        self._pod(self.node, self.pod1, self.pod1_ip, "local")
        self._pod(self.node2, self.pod2, self.pod2_ip, "remote")
        sh("ip", "-n", self.node, "route", "add", f"{self.pod2_ip}/32", "via", self.node2_ip)
        sh("ip", "-n", self.world, "route", "add", f"{self.pod1_ip}/32", "via", self.node_ip)
        sh("ip", "-n", self.world, "route", "add", "203.0.113.7/32", "via", self.node_ip)
        return self

    def down(self) -> None:
        for proc in self.servers:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for name in (self.pod1, self.pod2, self.world, self.node, self.node2, self.under):
            sh("ip", "netns", "del", name, check=False)

    def probe(self, kind: str, ip: str, port: int, count: int = 1, timeout: float = 2.0,
              source: str | None = None) -> list[dict[str, Any]]:
        out = sh(sys.executable, "-c", PROBE, kind, ip, str(port), str(count), str(timeout), *([source] if source else []),
                 netns=self.world)
        return list(json.loads(out.stdout))

    def same_port(self, steps: list[tuple[int, str, int, bool]]) -> list[dict[str, Any]]:
        return list(json.loads(sh(sys.executable, "-c", SAME_PORT, json.dumps(steps), netns=self.world).stdout))

    def client_address(self, host: int) -> str:
        """One more address of the world host (10.77.<t>.<host>): a client the node has not answered yet."""
        address = self.world_ip.rsplit(".", 1)[0] + f".{host}"
        sh("ip", "-n", self.world, "addr", "add", f"{address}/24", "dev", "eth0")
        return address

    def burst(self, source: str, ip: str, port: int, count: int, interval: float = 0.0) -> dict[str, Any]:
        return dict(json.loads(sh(sys.executable, "-c", BURST, source, ip, str(port), str(count), str(interval),
                                  netns=self.world).stdout))
