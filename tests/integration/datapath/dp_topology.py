"""A throw-away node: one node netns, pod netns joined by veths, like the CNI plugs them.

Pod side: ``<ip>/32`` on eth0, route ``169.254.1.1 dev eth0 scope link``, default via
169.254.1.1. Node side: ``169.254.1.1/32`` on each host veth ``cy<11 hex>``, route
``<ip>/32 dev <veth>``, ip_forward=1. Nothing is added to the root netns. Used by the
datapath integration tests and by bench/bench_datapath.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import select
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute, netns

PEER = Path(__file__).with_name("dp_peer.py")
GATEWAY = "169.254.1.1"


@dataclasses.dataclass
class Pod:
    name: str
    netns: str
    ip: str
    host_ifname: str
    host_ifindex: int = 0


class Client:
    """A dp_peer client process in one pod netns; one JSON command per call."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, str(PEER), "client"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, wait: float = 30.0, **cmd: object) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], wait)
        if not ready:
            raise TimeoutError(f"peer in {self.pod.netns} did not answer {cmd}")
        return dict(json.loads(self.proc.stdout.readline()))

    def tcp(self, ip: str, port: int, timeout: float = 1.0) -> str:
        return str(self.call(op="tcp", ip=ip, port=port, timeout=timeout)["result"])

    def udp(self, ip: str, port: int, timeout: float = 1.0) -> str:
        return str(self.call(op="udp", ip=ip, port=port, timeout=timeout)["result"])

    def icmp(self, ip: str, timeout: float = 1.0) -> str:
        return str(self.call(op="icmp", ip=ip, timeout=timeout)["result"])

    def close(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, timeout=10)


class Topology:
    """``ipv6``: pods also get ``fd00:<third>::<n>/128`` routed via ``fe80::1`` on the host veth (the
    veth pair then needs Neighbor Discovery); ``mtu``: both ends of every veth."""

    def __init__(self, pods: int = 3, tag: str | None = None, *, ipv6: bool = False, mtu: int | None = None) -> None:
        self.ipv6 = ipv6
        self.mtu = mtu
        self.tag = tag or secrets.token_hex(3)
        self.node_ns = f"cyt-dp-{self.tag}-node"
        third = secrets.randbelow(200) + 20
        self.pods = [
            Pod(name=f"p{i}", netns=f"cyt-dp-{self.tag}-p{i}", ip=f"10.213.{third}.{i + 2}",
                host_ifname="cy" + secrets.token_hex(6)[:11])
            for i in range(pods)
        ]
        self._procs: list[subprocess.Popen[str]] = []
        self._clients: list[Client] = []

    def up(self) -> Topology:
        netns.create(self.node_ns)
        subprocess.run(["ip", "netns", "exec", self.node_ns, "sh", "-c",
                        "echo 1 > /proc/sys/net/ipv4/ip_forward"], check=True, timeout=10)
        with IPRoute(netns=self.node_ns, flags=0) as node:
            node.link("set", index=node.link_lookup(ifname="lo")[0], state="up")
            for pod in self.pods:
                netns.create(pod.netns)
                node.link("add", ifname=pod.host_ifname, kind="veth",
                          peer={"ifname": "eth0", "net_ns_fd": pod.netns})
                idx = node.link_lookup(ifname=pod.host_ifname)[0]
                pod.host_ifindex = idx
                node.addr("add", index=idx, address=GATEWAY, prefixlen=32)
                node.link("set", index=idx, state="up")
                with IPRoute(netns=pod.netns, flags=0) as inner:
                    inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
                    eth0 = inner.link_lookup(ifname="eth0")[0]
                    inner.addr("add", index=eth0, address=pod.ip, prefixlen=32)
                    inner.link("set", index=eth0, state="up")
                    inner.route("add", dst=f"{GATEWAY}/32", oif=eth0, scope=253)
                    inner.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=eth0)
                node.route("add", dst=f"{pod.ip}/32", oif=idx)
        for pod in self.pods:
            if self.mtu:
                _ip(self.node_ns, "link", "set", pod.host_ifname, "mtu", str(self.mtu))
                _ip(pod.netns, "link", "set", "eth0", "mtu", str(self.mtu))
            if self.ipv6:
                _ip(self.node_ns, "-6", "addr", "add", "fe80::1/64", "dev", pod.host_ifname, "nodad")
                _ip(self.node_ns, "-6", "route", "add", f"{self.ip6(pod)}/128", "dev", pod.host_ifname)
                _ip(pod.netns, "-6", "addr", "add", f"{self.ip6(pod)}/128", "dev", "eth0", "nodad")
                _ip(pod.netns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        if self.ipv6:
            subprocess.run(["ip", "netns", "exec", self.node_ns, "sysctl", "-q", "-w",
                            "net.ipv6.conf.all.forwarding=1"], check=True, timeout=10)
        return self

    def ip6(self, pod: Pod) -> str:
        """The pod's IPv6 address (``ipv6=True`` only)."""
        third = pod.ip.split(".")[2]
        return f"fd00:{third}::{pod.ip.split('.')[3]}"

    def serve(self, pod: Pod, tcp: list[int], udp: list[int]) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, str(PEER), "serve",
             "--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp))],
            stdout=subprocess.PIPE, text=True)
        self._procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        if not ready or proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"server in {pod.netns} did not start")

    def client(self, pod: Pod) -> Client:
        c = Client(pod)
        self._clients.append(c)
        return c

    def down(self) -> None:
        for c in self._clients:
            c.close()
        for p in self._procs:
            _stop(p)
        for name in [p.netns for p in self.pods] + [self.node_ns]:
            with contextlib.suppress(OSError, FileNotFoundError):
                netns.remove(name)

    @staticmethod
    def wait_until(predicate: object, timeout: float = 5.0, step: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(predicate) and predicate():
                return True
            time.sleep(step)
        return False
