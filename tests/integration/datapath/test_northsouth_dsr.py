"""Direct server return (``lib/lb_dsr.h``) on a real kernel: two nodes with the device programs, real traffic.

The namespaces are ``northsouth_net.Net``'s: the world host, ``node`` (the entry node: the world host
reaches its NodePorts) and ``node2``, where the only backend runs (pod 10.79.<t>.2, which answers with the
address:port it saw the client as). Both nodes get ``lb_engine.SocketLB`` (private cgroups) and
``lb_device.DeviceLB`` on their ``eth0``. ``node`` serves NodePort 30090 (TCP and UDP) with DSR, 30091
with SNAT, 30092 with DSR although ``node2`` serves no such frontend, 30093 with DSR although ``node2``
serves it with SNAT, 30094 with DSR to a backend whose endpoint names no node (outside the cluster), and
30095 with DSR to the pod's port that holds a connection until the client ends it; ``node2`` serves
NodePorts 30090, 30091, 30093 and 30095 with its pod as a local backend. With DSR the pod sees the world host itself and its answers
leave ``node2`` straight for the world host, with the frontend ``node:30090`` as their source; ``node`` sees
none of them. Everything is removed at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from northsouth_net import Net, sh

from ciliary.lab import cgroups
from ciliary.nodeagent.datapath import lb_device, lb_engine
from ciliary.operator.services.intent import BackendIntent, FrontendIntent, FrontendKind, NodeLBIntent

pytestmark = pytest.mark.integration

BIG_DATAGRAM = r"""
import json, socket, sys
ip, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: never fragment it here
s.sendto(b"x" * size, (ip, port))
try:
    s.recvfrom(4096); print(json.dumps({"answered": True}))
except OSError as exc:
    print(json.dumps({"answered": False, "error": type(exc).__name__}))
"""
"""Send one UDP datagram of ``size`` bytes; say whether an answer came back."""

ONE_PORT_TWO_WAYS = r"""
import json, socket, struct, sys
entry, other, port, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def sock(timeout):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.settimeout(timeout); return s
first = sock(3); first.bind(("0.0.0.0", 0)); first.connect((entry, port))
out = {"greeting": first.recv(4096).decode()}
local = first.getsockname()[1]
if how == "reset":  # end the DSR connection with a RST from the client
    first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); first.close()
second = sock(1.5); second.bind(("0.0.0.0", local))
try:
    second.connect((other, port)); out["second"] = second.recv(4096).decode()
except OSError as exc:
    out["second"] = type(exc).__name__
second.close()
if how == "hold":  # the hold server closes after one byte: its FIN must still come back as the entry frontend
    first.sendall(b"x")
    try:
        out["first_ended_cleanly"] = first.recv(4096) == b""
    except OSError as exc:
        out["first_ended_cleanly"] = type(exc).__name__
print(json.dumps(out))
"""
"""From one local port: connect to ``entry:port`` (DSR to the hold server) and read its greeting; then,
with the first connection held (``hold``) or reset (``reset``), connect from the same port to
``other:port`` (the backend node's own NodePort, the same pod). One JSON object of what happened."""


def fe(node_ip: str, port: int, protocol: str, backends: list[BackendIntent], dsr: bool) -> FrontendIntent:
    return FrontendIntent(service="default/web", kind=FrontendKind.NODE_PORT, address=node_ip, port=port,
                          protocol=protocol, backends=tuple(backends), dsr=dsr)


class Nodes:
    def __init__(self, net: Net, entry: lb_device.DeviceLB, backend: lb_device.DeviceLB) -> None:
        self.net, self.entry, self.backend = net, entry, backend


@pytest.fixture(scope="module")
def nodes(tool: Any) -> Iterator[Nodes]:
    tool("ip")
    net = Net()
    names = (f"cyt-dsr-{net.tag}-1", f"cyt-dsr-{net.tag}-2")
    groups = [cgroups.ensure(cgroups.cgroup2_root() / f"ciliary-test-dsr-{os.getpid()}-{i}") for i in (1, 2)]
    socks = [lb_engine.SocketLB(names[0], cgroup=groups[0], netns=net.node),
             lb_engine.SocketLB(names[1], cgroup=groups[1], netns=net.node2)]
    devs = [lb_device.DeviceLB(names[0], devices=["eth0"], netns=net.node),
            lb_device.DeviceLB(names[1], devices=["eth0"], netns=net.node2)]
    try:
        net.up()
        for sock, dev in zip(socks, devs, strict=True):
            sock.start()
            dev.start(sock.context)
        pod = {proto: BackendIntent(address=net.pod2_ip, port=port, node=names[1])
               for proto, port in (("TCP", 8080), ("UDP", 8053))}
        hold = BackendIntent(address=net.pod2_ip, port=8081, node=names[1])  # answers, then waits for the client
        socks[0].apply(NodeLBIntent(node=names[0], frontends=(
            fe(net.node_ip, 30090, "TCP", [pod["TCP"]], dsr=True),
            fe(net.node_ip, 30090, "UDP", [pod["UDP"]], dsr=True),
            fe(net.node_ip, 30091, "TCP", [pod["TCP"]], dsr=False),
            fe(net.node_ip, 30092, "TCP", [pod["TCP"]], dsr=True),
            fe(net.node_ip, 30093, "TCP", [pod["TCP"]], dsr=True),
            fe(net.node_ip, 30094, "TCP", [BackendIntent(address=net.pod2_ip, port=8080, node="")], dsr=True),
            fe(net.node_ip, 30095, "TCP", [hold], dsr=True),
        )))
        socks[1].apply(NodeLBIntent(node=names[1], frontends=(
            fe(net.node2_ip, 30090, "TCP", [pod["TCP"]], dsr=True),
            fe(net.node2_ip, 30090, "UDP", [pod["UDP"]], dsr=True),
            fe(net.node2_ip, 30091, "TCP", [pod["TCP"]], dsr=False),
            fe(net.node2_ip, 30093, "TCP", [pod["TCP"]], dsr=False),
            fe(net.node2_ip, 30095, "TCP", [hold], dsr=True),
        )))
        yield Nodes(net, devs[0], devs[1])
    finally:
        for dev in devs:
            dev.teardown()
        for sock in socks:
            sock.teardown()
        net.down()
        for group in groups:
            cgroups.kill_all(group)
            group.rmdir()


def test_dsr_tcp_the_backend_sees_the_client_and_its_node_answers_it(nodes: Nodes) -> None:
    n = nodes.net
    entry, backend = nodes.entry.counters(), nodes.backend.counters()
    results = n.probe("tcp", n.node_ip, 30090, count=8)
    assert all(r["ok"] for r in results), results
    # the pod saw the world host itself (no SNAT), and the client only ever saw the frontend it dialled
    assert {r["body"].split(" ")[1].split(":")[0] for r in results} == {n.world_ip}, results
    assert {r["peer"] for r in results} == {f"{n.node_ip}:30090"}, results
    entry2, backend2 = nodes.entry.counters(), nodes.backend.counters()
    assert entry2["new"] - entry["new"] == 8, (entry, entry2)
    # the answers never crossed the entry node: it translated no reply; the pod's node learnt each connection
    # from its SYN's option and translated every answer itself
    assert entry2["reply"] == entry["reply"], (entry, entry2)
    assert backend2["dsr-learnt"] - backend["dsr-learnt"] >= 8, (backend, backend2)  # more if a SYN is resent
    assert backend2["reply"] - backend["reply"] >= 8 * 2, (backend, backend2)  # SYN-ACK, data, FIN at least


def test_dsr_udp_every_datagram_carries_the_frontend(nodes: Nodes) -> None:
    n = nodes.net
    backend = nodes.backend.counters()
    results = n.probe("udp", n.node_ip, 30090, count=8)
    assert all(r["ok"] for r in results), results
    assert {r["body"].split(" ")[1].split(":")[0] for r in results} == {n.world_ip}, results
    assert {r["peer"] for r in results} == {f"{n.node_ip}:30090"}, results
    assert nodes.backend.counters()["dsr-learnt"] - backend["dsr-learnt"] >= 8


def test_snat_frontend_next_to_it_still_hides_the_client(nodes: Nodes) -> None:
    n = nodes.net
    results = n.probe("tcp", n.node_ip, 30091, count=4)
    assert all(r["ok"] for r in results), results
    assert {r["body"].split(" ")[1].split(":")[0] for r in results} == {n.node_ip}, results


@pytest.mark.parametrize("port", [30092, 30093], ids=["not-served-there", "served-there-by-snat"])
def test_the_backend_node_believes_no_option_for_a_frontend_it_does_not_serve_by_dsr(nodes: Nodes, port: int) -> None:
    """node2 serves no NodePort 30092, and 30093 only with SNAT: it must not rewrite its pod's answers into
    either. The SYN-ACK leaves with the pod's own address, which the world host never dialled, so the
    connection fails."""
    n = nodes.net
    backend = nodes.backend.counters()
    results = n.probe("tcp", n.node_ip, port, count=2, timeout=1.5)
    assert not any(r["ok"] for r in results), results
    assert nodes.backend.counters()["dsr-learnt"] == backend["dsr-learnt"]


def test_a_backend_outside_the_cluster_gets_snat(nodes: Nodes) -> None:
    """Its endpoint names no node, so no Ciliary program would answer by DSR there: SNAT, the pod sees node."""
    n = nodes.net
    backend = nodes.backend.counters()
    results = n.probe("tcp", n.node_ip, 30094, count=4)
    assert all(r["ok"] for r in results), results
    assert {r["body"].split(" ")[1].split(":")[0] for r in results} == {n.node_ip}, results
    assert nodes.backend.counters()["dsr-learnt"] == backend["dsr-learnt"]


def test_a_datagram_the_option_makes_too_big_is_dropped_and_counted(nodes: Nodes) -> None:
    n = nodes.net
    entry = nodes.entry.counters()
    # 28: the IPv4 and UDP headers; 8: the option. The route's MTU (1500) is checked exactly.
    fits = json.loads(sh(sys.executable, "-c", BIG_DATAGRAM, n.node_ip, "30090", str(1500 - 28 - 8),
                         netns=n.world).stdout)
    assert fits == {"answered": True}, fits
    too_big = json.loads(sh(sys.executable, "-c", BIG_DATAGRAM, n.node_ip, "30090", str(1500 - 28 - 7),
                            netns=n.world).stdout)
    assert too_big["answered"] is False, too_big
    assert nodes.entry.counters()["drop-dsr"] - entry["drop-dsr"] == 1


def test_a_live_dsr_connection_keeps_its_four_addresses_and_ports(nodes: Nodes) -> None:
    """While a DSR connection through node is open, a SYN from the same client port to node2's own NodePort
    (the same pod, so the same four addresses and ports at the pod) is dropped on node2: letting it in would
    turn the live connection's answers into node2's and reset it (the pod answers that SYN with an ACK of the
    live connection, which the client's second socket resets). The held connection ends cleanly."""
    n = nodes.net
    backend = nodes.backend.counters()
    out = json.loads(sh(sys.executable, "-c", ONE_PORT_TWO_WAYS, n.node_ip, n.node2_ip, "30095", "hold",
                        netns=n.world).stdout)
    assert out["greeting"].startswith("remote ") and out["second"] == "TimeoutError", out
    assert out["first_ended_cleanly"] is True, out
    assert nodes.backend.counters()["drop-dsr"] > backend["drop-dsr"]


def test_a_client_reset_ends_the_dsr_connection_on_the_backends_node(nodes: Nodes) -> None:
    """The client resets its DSR connection (the pod sends nothing back): node2 sees the RST and ends the
    learnt entry, so the same client port may reach the pod again at once through node2's own NodePort."""
    n = nodes.net
    out = json.loads(sh(sys.executable, "-c", ONE_PORT_TWO_WAYS, n.node_ip, n.node2_ip, "30095", "reset",
                        netns=n.world).stdout)
    assert out["greeting"].startswith("remote ") and out["second"].startswith("remote "), out
