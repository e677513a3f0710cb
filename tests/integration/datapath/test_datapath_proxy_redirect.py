"""Redirection to a node-local proxy (lib/redirect.h), on the real kernel, independent of any proxy code.

Pod a's egress entries to pod b carry ``l7_redirect`` for a parser the datapath has a
proxy port for. Pod b serves nothing on those ports, so an answer can only come from
the test's own transparent echo "proxy" in the node's namespace, which must see the
pod's address as its peer and b's address and port as the original destination, and
answer as b. Without a proxy socket the packets are dropped (fail closed), never
passed on to b. Everything is created in private namespaces and removed afterwards.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from dp_topology import Topology

from ciliary.nodeagent import planning, proxy_routing
from ciliary.nodeagent.datapath import engine
from ciliary.nodeagent.dns_wire import IP_RECVORIGDSTADDR, IP_TRANSPARENT, SOL_IP, orig_dst
from ciliary.nodeagent.netns_sockets import _enter
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

pytestmark = pytest.mark.integration

PROXY_PORT = 15053
UDP_PORT, TCP_PORT = 6053, 7053
ID_A, ID_B = 1001, 1002


class EchoProxy:
    """A transparent UDP + TCP echo on PROXY_PORT inside the node namespace; records (peer, original dst)."""

    def __init__(self, node_ns: str) -> None:
        self.node_ns = node_ns
        self.seen: list[tuple[str, tuple[str, int], tuple[str, int]]] = []
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EchoProxy:
        self.thread.start()
        assert self.ready.wait(10), f"proxy did not start: {self.error}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        try:
            _enter(self.node_ns)  # this thread only: sockets it creates live in the node namespace
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            udp.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
            udp.bind(("0.0.0.0", PROXY_PORT))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            tcp.bind(("0.0.0.0", PROXY_PORT))
            tcp.listen(16)
            udp.settimeout(0.1)
            tcp.settimeout(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__
            self.error = exc
            return
        self.ready.set()
        with udp, tcp:
            while not self.stop.is_set():
                self._udp_once(udp)
                self._tcp_once(tcp)

    def _udp_once(self, udp: socket.socket) -> None:
        try:
            data, anc, _flags, peer = udp.recvmsg(2048, socket.CMSG_SPACE(16))
        except TimeoutError:
            return
        orig = orig_dst(anc)
        assert orig is not None
        self.seen.append(("udp", peer[:2], orig))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as reply:  # answer as the original server
            reply.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reply.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            reply.bind(orig)
            reply.sendto(data, peer)

    def _tcp_once(self, tcp: socket.socket) -> None:
        try:
            conn, peer = tcp.accept()
        except TimeoutError:
            return
        with conn:
            self.seen.append(("tcp", peer[:2], conn.getsockname()[:2]))
            conn.settimeout(2)
            try:
                data = conn.recv(65536)
                if data:
                    conn.sendall(data)
            except OSError:
                pass


@pytest.fixture(scope="module")
def redirected(topology: Topology) -> Iterator[tuple[Topology, engine.Datapath]]:
    dp = engine.Datapath(f"cyt-{topology.tag}-px", netns=topology.node_ns)
    dp.proxy_ports = {"dns": PROXY_PORT}
    a, b = topology.pods[0], topology.pods[1]
    redirect = dict(identity=ID_B, verdict=Verdict.ALLOW, l7_redirect=True, l7_parser="dns")
    egress = DirectionPolicy(enforced=True, entries=(
        PolicyEntry(protocol=Protocol.UDP, port_low=UDP_PORT, **redirect),  # type: ignore[arg-type]
        PolicyEntry(protocol=Protocol.TCP, port_low=TCP_PORT, **redirect),  # type: ignore[arg-type]
    ))
    intent = intents.NodeIntent(
        node=dp.node, revision=1,
        endpoints=(intents.EndpointIntent(namespace="t", pod="a", ipv4=a.ip, identity=ID_A, egress=egress),
                   intents.EndpointIntent(namespace="t", pod="b", ipv4=b.ip, identity=ID_B)),
        ipcache=(intents.IpcacheEntry(cidr=f"{a.ip}/32", identity=ID_A),
                 intents.IpcacheEntry(cidr=f"{b.ip}/32", identity=ID_B)))
    try:
        dp.start()
        proxy_routing.ensure(topology.node_ns)
        dp.apply(intent, {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in (a, b)})
        yield topology, dp
    finally:
        dp.teardown()


def test_routing_is_in_the_node_namespace_only(redirected: tuple[Topology, engine.Datapath]) -> None:
    topology, _dp = redirected
    assert proxy_routing.check(topology.node_ns) == []
    consts = proxy_routing.datapath_constants()
    from pyroute2 import IPRoute

    with IPRoute() as root:  # the root namespace is untouched
        assert not [r for r in root.get_rules(family=2) if r.get_attr("FRA_TABLE") == consts.table]


def test_without_a_proxy_socket_redirected_traffic_is_dropped(redirected: tuple[Topology, engine.Datapath]) -> None:
    topology, _dp = redirected
    a, b = topology.pods[0], topology.pods[1]
    topology.serve(b, [TCP_PORT], [UDP_PORT])  # b would answer: a pass-through would be visible
    client = topology.client(a)
    assert client.udp(b.ip, UDP_PORT, timeout=1.0) == "timeout"
    assert client.tcp(b.ip, TCP_PORT, timeout=1.0) != "ok"


def test_redirected_to_the_proxy_which_answers_as_the_server(redirected: tuple[Topology, engine.Datapath]) -> None:
    topology, _dp = redirected
    a, b = topology.pods[0], topology.pods[1]
    client = topology.client(a)
    with EchoProxy(topology.node_ns) as proxy:
        assert client.udp(b.ip, UDP_PORT, timeout=2.0) == "ok"
        assert client.tcp(b.ip, TCP_PORT, timeout=2.0) == "ok"
        assert ("udp", (a.ip, proxy.seen[0][1][1]), (b.ip, UDP_PORT)) == proxy.seen[0]
        tcp_seen = [s for s in proxy.seen if s[0] == "tcp"]
        assert tcp_seen and tcp_seen[0][1][0] == a.ip and tcp_seen[0][2] == (b.ip, TCP_PORT)
