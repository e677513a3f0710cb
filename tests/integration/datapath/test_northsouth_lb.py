"""North-south load balancing (``datapath.lb_device``) on a real kernel: tc on a node's device, real traffic.

The test builds its own namespaces: an underlay bridge joining ``world`` (10.77.<t>.100), ``node``
(10.77.<t>.1, the node under test) and ``node2`` (10.77.<t>.2); a pod behind a veth on each node
(10.78.<t>.2 on node, 10.79.<t>.2 on node2, node routes the latter via node2). Every backend answers
with its name and the address:port it saw the client as, so the SNAT decision is visible. The node's
LB maps are filled by ``lb_engine.SocketLB`` (attached to a private cgroup) from a ``NodeLBIntent``;
``DeviceLB`` attaches to the node's ``eth0``. Every veth computes and verifies checksums in software (rx
and tx checksum offload off), so a wrong checksum after a rewrite loses the packet; one test turns the
world host's transmit offload on (partial checksums arriving at the node), and the lab e2e covers the
offloaded case throughout. Each test that counts ICMP answers sends from a world address of its own
(the node limits them per client). Everything is removed at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from northsouth_net import SOFTWARE_CHECKSUMS, Net, sh

from ciliary.lab import cgroups
from ciliary.nodeagent.datapath import icmp_limits, lb_device, lb_engine
from ciliary.operator.services.intent import BackendIntent, FrontendIntent, FrontendKind, NodeLBIntent

pytestmark = pytest.mark.integration

def fe(kind: FrontendKind, address: str, port: int, protocol: str, backends: list[BackendIntent],
       policy: str = "Cluster", source_ranges: tuple[str, ...] = (), affinity: int = 0) -> FrontendIntent:
    return FrontendIntent(service="default/web", kind=kind, address=address, port=port, protocol=protocol,
                          backends=tuple(backends), traffic_policy=policy, source_ranges=source_ranges,
                          affinity_timeout=affinity)


@pytest.fixture(scope="module")
def net(tool: Any) -> Iterator[tuple[Net, lb_device.DeviceLB]]:
    tool("ip")
    net = Net()
    node = f"cyt-ns-{net.tag}"
    cgroup = cgroups.ensure(cgroups.cgroup2_root() / f"ciliary-test-ns-{os.getpid()}")
    sock = lb_engine.SocketLB(node, cgroup=cgroup, netns=net.node)
    dev = lb_device.DeviceLB(node, devices=["eth0"], netns=net.node)
    try:
        net.up()
        sock.start()
        dev.start(sock.context)
        local = BackendIntent(address=net.pod1_ip, port=8080, node=node)
        remote = BackendIntent(address=net.pod2_ip, port=8080, node="other")
        local_udp = BackendIntent(address=net.pod1_ip, port=8053, node=node)
        remote_udp = BackendIntent(address=net.pod2_ip, port=8053, node="other")
        sock.apply(NodeLBIntent(node=node, frontends=(
            fe(FrontendKind.NODE_PORT, net.node_ip, 30080, "TCP", [local, remote]),
            fe(FrontendKind.NODE_PORT, net.node_ip, 30080, "UDP", [local_udp, remote_udp]),
            fe(FrontendKind.EXTERNAL_IP, "203.0.113.7", 80, "TCP", [local, remote]),
            fe(FrontendKind.NODE_PORT, net.node_ip, 30081, "TCP", []),
            fe(FrontendKind.NODE_PORT, net.node_ip, 30081, "UDP", []),
            fe(FrontendKind.CLUSTER_IP, net.node_ip, 30084, "TCP", [local, remote]),
            fe(FrontendKind.LOAD_BALANCER, "203.0.113.7", 82, "TCP", [local, remote], "Local"),
            fe(FrontendKind.NODE_PORT, net.node_ip, 30083, "TCP", [remote], "Local"),
            fe(FrontendKind.LOAD_BALANCER, "203.0.113.7", 83, "TCP", [local, remote],
               source_ranges=(f"{net.world_ip}/32",)),
            fe(FrontendKind.LOAD_BALANCER, "203.0.113.7", 84, "TCP", [local, remote],
               source_ranges=("198.51.100.0/24", "2001:db8::/32")),
            fe(FrontendKind.NODE_PORT, net.node_ip, 30085, "TCP", [local, remote], affinity=60),
            fe(FrontendKind.NODE_PORT, net.node_ip, 30086, "TCP", [local]),
            # backends on a port nothing listens on: their kernels answer with ICMP port unreachable
            fe(FrontendKind.NODE_PORT, net.node_ip, 30088, "UDP", [BackendIntent(address=net.pod2_ip, port=8054,
                                                                                node="other")]),
            fe(FrontendKind.NODE_PORT, net.node_ip, 30089, "UDP", [BackendIntent(address=net.pod1_ip, port=8054,
                                                                                node=node)]),
            fe(FrontendKind.NODE_PORT, net.node_ip, 30087, "TCP", [BackendIntent(address=net.pod1_ip, port=8081,
                                                                                node=node)]),
        )))
        yield net, dev
    finally:
        dev.teardown()
        sock.teardown()
        net.down()
        cgroups.kill_all(cgroup)
        cgroup.rmdir()


# Each new connection picks one of two backends at random: a test that needs both seen asks SPREAD
# connections, so all of them landing on one backend (a false failure) has odds of 2 ** -(SPREAD - 1).
SPREAD = 32


def bodies(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    assert all(r["ok"] for r in results), results
    return [tuple(r["body"].split(" ")[0:1] + [r["body"].split(" ")[1].split(":")[0]]) for r in results]


def test_nodeport_tcp_reaches_both_backends_snat_only_for_the_remote_one(net: tuple[Net, lb_device.DeviceLB]) -> None:
    n, dev = net
    before = dev.counters()
    results = n.probe("tcp", n.node_ip, 30080, count=SPREAD)
    seen = set(bodies(results))
    # the local pod sees the world host; the remote one sees the node (SNAT), so its reply comes back here
    assert seen == {("local", n.world_ip), ("remote", n.node_ip)}, results
    assert {r["peer"] for r in results} == {f"{n.node_ip}:30080"}  # the client only ever sees the frontend
    after = dev.counters()
    assert after["new"] - before["new"] == SPREAD and after["reply"] > before["reply"], (before, after)


def test_nodeport_udp_reaches_both_backends(net: tuple[Net, lb_device.DeviceLB]) -> None:
    n, _ = net
    results = n.probe("udp", n.node_ip, 30080, count=SPREAD)
    assert set(bodies(results)) == {("local", n.world_ip), ("remote", n.node_ip)}, results
    assert {r["peer"] for r in results} == {f"{n.node_ip}:30080"}


def test_external_ip_routed_to_the_node(net: tuple[Net, lb_device.DeviceLB]) -> None:
    n, _ = net
    results = n.probe("tcp", "203.0.113.7", 80, count=SPREAD)
    assert set(bodies(results)) == {("local", n.world_ip), ("remote", n.node_ip)}, results
    assert {r["peer"] for r in results} == {"203.0.113.7:80"}


def test_no_backends_tcp_is_refused_with_a_reset_udp_with_port_unreachable(
        net: tuple[Net, lb_device.DeviceLB]) -> None:
    n, dev = net
    before = dev.counters()
    results = n.probe("tcp", n.node_ip, 30081, count=3, timeout=3.0)
    assert results == [{"ok": False, "error": "ConnectionRefusedError"}] * 3, results  # a RST, not a timeout
    after = dev.counters()
    assert after["rst-sent"] - before["rst-sent"] == 3 and after["no-backend"] - before["no-backend"] == 3
    # kube-proxy's REJECT: an ICMP port unreachable, which a connected UDP socket reports as refused
    results = n.probe("udp-connected", n.node_ip, 30081, count=3, timeout=3.0)
    assert results == [{"ok": False, "error": "ConnectionRefusedError"}] * 3, (results, {k: v for k, v in dev.counters().items() if v})
    last = dev.counters()
    assert last["icmp-sent"] - after["icmp-sent"] == 3 and last["no-backend"] - after["no-backend"] == 3
    # the same socket kind still gets answers from a frontend with backends
    results = n.probe("udp-connected", n.node_ip, 30080, count=4)
    assert all(r["ok"] for r in results) and {r["peer"] for r in results} == {f"{n.node_ip}:30080"}, results


# In the world host: a connected UDP socket sends to ip:port, and a raw ICMP socket takes a copy of the
# destination unreachable it gets; prints the error as read (outer addresses, the quote, every checksum).
ICMP_ERROR = r"""
import json, socket, struct, sys
ip, port = sys.argv[1], int(sys.argv[2])

def ok(data):  # the Internet checksum over data (its own field included) folds to 0xffff
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF

raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
raw.settimeout(3)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(3)
udp.connect((ip, port))
client = udp.getsockname()
udp.send(b"quote me " * 8)
try:
    udp.recv(100)
    refused = False
except ConnectionRefusedError:
    refused = True
except OSError:
    refused = False
while True:  # bounded: the raw socket's timeout ends it
    packet = raw.recv(2048)
    icmp = packet[(packet[0] & 0xF) * 4:]
    if icmp[0] == 3:
        break
quote = icmp[8:]
qudp = quote[(quote[0] & 0xF) * 4:]
length = struct.unpack("!H", qudp[4:6])[0]
pseudo = quote[12:20] + struct.pack("!BBH", 0, 17, length)
print(json.dumps({
    "refused": refused, "from": socket.inet_ntoa(packet[12:16]), "to": socket.inet_ntoa(packet[16:20]),
    "icmp_ok": ok(icmp), "quote_ip_ok": ok(quote[:(quote[0] & 0xF) * 4]),
    "quote_udp_ok": len(qudp) >= length and ok(pseudo + qudp[:length]),
    "quote": [f"{socket.inet_ntoa(quote[12:16])}:{struct.unpack('!H', qudp[0:2])[0]}",
              f"{socket.inet_ntoa(quote[16:20])}:{struct.unpack('!H', qudp[2:4])[0]}"],
    "client": f"{client[0]}:{client[1]}"}))
"""


def test_a_backends_icmp_error_reaches_the_client_as_the_frontends(net: tuple[Net, lb_device.DeviceLB]) -> None:
    """A backend with nothing on the port refuses with ICMP port unreachable, quoting the datagram as it got it:
    from this node's SNAT address (a remote backend) or from the client to the backend (a local one). The client
    gets it from the frontend, quoting client -> frontend, with the ICMP, the quoted IPv4 header's and the quoted
    UDP datagram's checksums right (read by a raw socket beside the client; the veths verify checksums in
    software), and its connected socket is refused (ECONNREFUSED, not a timeout)."""
    n, dev = net
    for port in (30088, 30089):  # remote backend (SNAT, the error arrives at the device), local one (it leaves)
        before = dev.counters()
        got = json.loads(sh(sys.executable, "-c", ICMP_ERROR, n.node_ip, str(port), netns=n.world).stdout)
        assert got["refused"], (port, got)
        assert (got["from"], got["to"]) == (n.node_ip, n.world_ip), (port, got)
        assert got["quote"] == [got["client"], f"{n.node_ip}:{port}"], (port, got)
        assert got["icmp_ok"] and got["quote_ip_ok"] and got["quote_udp_ok"], (port, got)
        after = dev.counters()
        assert after["new"] - before["new"] == 1 and after["reply"] - before["reply"] >= 1, (port, before, after)


def test_refusals_of_a_partial_checksum_survive_a_software_checksum_on_the_way_back(
        net: tuple[Net, lb_device.DeviceLB]) -> None:
    """The client's datagram arrives with its checksum still to be completed (the world host offloads it:
    CHECKSUM_PARTIAL), and the node's device completes checksums in software as it sends the refusal back:
    the RST and the ICMP port unreachable built from that datagram must still carry right checksums, or
    the client's stack drops them and its connect()/recv() waits instead of failing at once."""
    n, dev = net
    client = n.client_address(110)  # its own ICMP budget on the node
    sh(sys.executable, "-c", SOFTWARE_CHECKSUMS, "tx-offload", "eth0", netns=n.world)
    try:
        before = dev.counters()
        results = n.probe("tcp", n.node_ip, 30081, count=3, timeout=3.0, source=client)
        assert results == [{"ok": False, "error": "ConnectionRefusedError"}] * 3, results
        results = n.probe("udp-connected", n.node_ip, 30081, count=3, timeout=3.0, source=client)
        assert results == [{"ok": False, "error": "ConnectionRefusedError"}] * 3, results
        after = dev.counters()
        assert (after["rst-sent"] - before["rst-sent"], after["icmp-sent"] - before["icmp-sent"]) == (3, 3)
    finally:
        sh(sys.executable, "-c", SOFTWARE_CHECKSUMS, "software", "eth0", netns=n.world)


def test_icmp_refusals_keep_to_the_per_client_limit_as_the_kernels_own_do(
        net: tuple[Net, lb_device.DeviceLB]) -> None:
    """A burst of 20 datagrams to a frontend without backends: the node answers the client's first six and
    drops the rest unanswered (counted), as node2's kernel does for the same burst to a closed port of its
    own (net.ipv4.icmp_ratelimit 1000 ms, a burst of six: the kernel's defaults, read from the node)."""
    n, dev = net
    client = n.client_address(111)
    before = dev.counters()
    ours = n.burst(client, n.node_ip, 30081, 20)
    after = dev.counters()
    kernels = n.burst(client, n.node2_ip, 9, 20)
    refill = int(ours["sending_seconds"]) + 1  # one more credit per second the burst took (it takes ms)
    assert 6 <= ours["answers"] < 6 + refill and 6 <= kernels["answers"] < 6 + refill, (ours, kernels)
    assert after["icmp-sent"] - before["icmp-sent"] == ours["answers"], (before, after)
    assert after["icmp-rate-limited"] - before["icmp-rate-limited"] == 20 - ours["answers"], (before, after)
    assert after["no-backend"] - before["no-backend"] == 20


def test_icmp_refusals_keep_to_the_node_wide_limit(net: tuple[Net, lb_device.DeviceLB]) -> None:
    """With the node's net.ipv4.icmp_msgs_burst at 4 (per-client limit off, 1 message a second), a burst
    from a new client gets four answers: the programs are rendered with the node's own sysctls."""
    n, dev = net
    client = n.client_address(112)
    limits = {"net.ipv4.icmp_ratelimit": "0", "net.ipv4.icmp_msgs_burst": "4", "net.ipv4.icmp_msgs_per_sec": "1"}
    defaults = {name: sh("sysctl", "-n", name, netns=n.node).stdout.strip() for name in limits}
    try:
        sh("sysctl", "-qw", *(f"{k}={v}" for k, v in limits.items()), netns=n.node)
        dev.teardown()  # a fresh node-wide budget: a lower burst, like the kernel's, caps only the next refill
        dev.start()
        assert dev.context.icmp_limits == icmp_limits.IcmpLimits(peer_interval_ms=0, per_second=1, burst=4)
        before = dev.counters()
        ours = n.burst(client, n.node_ip, 30081, 20)
        after = dev.counters()
        assert 4 <= ours["answers"] < 4 + int(ours["sending_seconds"]) + 1, ours
        assert after["icmp-rate-limited"] - before["icmp-rate-limited"] == 20 - ours["answers"], (before, after)
        # then a steady stream, one datagram every 100 ms for 2.5 s: the one-a-second refill still comes
        # (a refill of less than a message must not restart the second it counts)
        steady = n.burst(client, n.node_ip, 30081, 25, interval=0.1)
        assert 2 <= steady["answers"] <= 3, steady
    finally:
        sh("sysctl", "-qw", *(f"{k}={v}" for k, v in defaults.items()), netns=n.node)
        dev.start()
    assert dev.context.icmp_limits == icmp_limits.IcmpLimits()


def test_a_cluster_ip_frontend_is_not_served_from_outside(net: tuple[Net, lb_device.DeviceLB]) -> None:
    n, dev = net
    before = dev.counters()["new"]
    results = n.probe("tcp", n.node_ip, 30084, count=1, timeout=1.0)
    assert results[0]["ok"] is False and results[0]["error"] == "ConnectionRefusedError", results  # node's stack
    assert dev.counters()["new"] == before


def test_external_traffic_policy_local_keeps_the_client_and_drops_without_local_backend(
        net: tuple[Net, lb_device.DeviceLB]) -> None:
    n, dev = net
    results = n.probe("tcp", "203.0.113.7", 82, count=12)
    assert set(bodies(results)) == {("local", n.world_ip)}, results  # only the local backend, client IP kept
    before = dev.counters()["drop-no-local-backend"]
    results = n.probe("tcp", n.node_ip, 30083, count=1, timeout=1.0)
    assert results == [{"ok": False, "error": "TimeoutError"}], results
    assert dev.counters()["drop-no-local-backend"] > before


def test_other_traffic_through_the_device_passes_untouched(net: tuple[Net, lb_device.DeviceLB]) -> None:
    n, dev = net
    before = dev.counters()
    results = n.probe("tcp", n.pod1_ip, 8080, count=3)
    assert set(bodies(results)) == {("local", n.world_ip)} and {r["peer"] for r in results} == {
        f"{n.pod1_ip}:8080"}, results
    ping = sh("ping", "-c", "1", "-W", "2", n.node_ip, netns=n.world, check=False)
    assert ping.returncode == 0, ping.stdout
    assert dev.counters() == before


def test_load_balancer_source_ranges_admit_only_clients_inside_them(net: tuple[Net, lb_device.DeviceLB]) -> None:
    """loadBalancerSourceRanges: the world host inside the range is served; a frontend whose ranges leave
    it out drops its connection attempts (counted), as kube-proxy's firewall chain does."""
    n, dev = net
    results = n.probe("tcp", "203.0.113.7", 83, count=SPREAD)
    assert set(bodies(results)) == {("local", n.world_ip), ("remote", n.node_ip)}, results
    before = dev.counters()
    results = n.probe("tcp", "203.0.113.7", 84, count=2, timeout=1.0)
    assert [r["error"] for r in results] == ["TimeoutError"] * 2, results
    after = dev.counters()
    assert after["drop-source-range"] - before["drop-source-range"] >= 2 and after["new"] == before["new"]


def test_session_affinity_keeps_an_outside_client_on_one_backend(net: tuple[Net, lb_device.DeviceLB]) -> None:
    """sessionAffinity ClientIP from outside: every new connection of the world host goes to the backend its
    first one got (the frontend without affinity spreads the same client over both)."""
    n, _ = net
    results = n.probe("tcp", n.node_ip, 30085, count=16)
    assert len(set(bodies(results))) == 1, results
    spread = n.probe("tcp", n.node_ip, 30080, count=SPREAD)
    assert len(set(bodies(spread))) == 2, spread


def test_a_client_port_reused_straight_to_the_backend_and_back_through_the_nodeport(
        net: tuple[Net, lb_device.DeviceLB]) -> None:
    """The world host reaches the local backend through a NodePort, then from the same port straight at the
    backend (which sees the same four addresses and ports again), then through the NodePort once more: every
    step answered. Once after a connection the backend closed (its FIN ends the reply entry), once after one
    the client reset (only the forward entry sees the RST). Without the clean-up of an ended connection's
    entries the direct step's answer left as the NodePort's and the client refused it, or the last step
    reused the old forward entry with no reply entry left."""
    n, _ = net
    pod = n.pod1_ip
    closed = n.same_port([(42101, n.node_ip, 30086, False), (42101, pod, 8080, False), (42101, n.node_ip, 30086, False)])
    reset = n.same_port([(42102, n.node_ip, 30087, True), (42102, pod, 8081, True), (42102, n.node_ip, 30087, True)])
    for results in (closed, reset):
        assert all(r["ok"] for r in results), results
        assert [r["body"].split(" ")[0] for r in results] == ["local"] * 3, results
        # the backend saw the world host's own address and port every time (no SNAT for a local backend)
        assert len({r["body"].split(" ")[1] for r in results}) == 1, results
