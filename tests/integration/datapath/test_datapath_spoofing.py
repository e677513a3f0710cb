"""A pod cannot pick the source address it is judged by: cy_from_pod drops spoofed IPv4 sources.

Three pods on one node: a (identity 1001, egress enforced: TCP 7000 and UDP 6000 to b only),
b (1002, the server, nothing enforced) and c (1003, nothing enforced). Pod a sends raw frames
(AF_PACKET, as a pod with CAP_NET_RAW can) whose IPv4 source is an address no endpoint has,
or c's address (c's egress is not enforced: the packet would have been judged as c's). Both
are dropped with SPOOFED_SOURCE, counted, reported as flow events naming a's identity, and
never reach b's veth, while a's own raw frame and a's and c's ordinary traffic go on being
decided by policy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from dp_packets import UDP, frame, mac_of, send_raw
from dp_topology import Client, Topology

from ciliary.nodeagent import planning
from ciliary.nodeagent.datapath import engine, flows, maps
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

pytestmark = pytest.mark.integration

ID_A, ID_B, ID_C = 1001, 1002, 1003
FOREIGN = "10.99.0.7"
R = maps.Reason


class Lab:
    def __init__(self, topo: Topology, dp: engine.Datapath) -> None:
        self.topo, self.dp = topo, dp
        self.a, self.b, self.c = topo.pods
        self.ca: Client = topo.client(self.a)
        self.cc: Client = topo.client(self.c)
        self.reader = dp.flows()
        a_out = DirectionPolicy(enforced=True, entries=(
            PolicyEntry(identity=ID_B, protocol=Protocol.TCP, port_low=7000, verdict=Verdict.ALLOW),
            PolicyEntry(identity=ID_B, protocol=Protocol.UDP, port_low=6000, verdict=Verdict.ALLOW)))
        eps = tuple(intents.EndpointIntent(namespace="t", pod=p.name, ipv4=p.ip, identity=i,
                                           egress=a_out if p is self.a else DirectionPolicy())
                    for p, i in ((self.a, ID_A), (self.b, ID_B), (self.c, ID_C)))
        intent = intents.NodeIntent(node=dp.node, revision=1, endpoints=eps,
                                    ipcache=tuple(intents.IpcacheEntry(cidr=f"{e.ipv4}/32", identity=e.identity)
                                                  for e in eps))
        dp.apply(intent, {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in topo.pods})
        self.gateway = mac_of(topo.node_ns, self.a.host_ifname)
        self.pod_mac = mac_of(self.a.netns, "eth0")

    def counter(self, direction: str, reason: maps.Reason | None = None) -> int:
        """Packets counted in ``direction`` for ``reason`` (None: all reasons)."""
        return sum(packets for (d, r), (packets, _b) in self.dp.counters().items()
                   if d == direction and (reason is None or r == reason))

    def events(self, reason: maps.Reason) -> list[flows.FlowEvent]:
        """The flow events of ``reason`` that arrive within ~3 s (at least one, if any arrives)."""
        got: list[flows.FlowEvent] = []
        for _ in range(30):
            got += [e for e in self.reader.poll(100) if e.reason is reason]
            if got:
                break
        return got

    def send_from_a(self, src: str, dport: int) -> None:
        send_raw(self.a.netns, "eth0", frame(src, self.b.ip, UDP, sport=41000, dport=dport, payload=b"spoof",
                                             dst_mac=self.gateway, src_mac=self.pod_mac))


@pytest.fixture(scope="module")
def lab(topology: Topology) -> Iterator[Lab]:
    topology.serve(topology.pods[1], [7000], [6000])
    dp = engine.Datapath(f"cyt-{topology.tag}", netns=topology.node_ns)
    try:
        dp.start()
        yield Lab(topology, dp)
    finally:
        dp.teardown()


@pytest.mark.parametrize("source", ["an address no endpoint has", "another pod's address"])
def test_a_spoofed_source_is_dropped_before_policy(lab: Lab, source: str) -> None:
    src = FOREIGN if source.startswith("an address") else lab.c.ip
    lab.reader.poll(0)
    spoofed, delivered = lab.counter("egress", R.DROP_SPOOFED_SOURCE), lab.counter("ingress")
    lab.send_from_a(src, 6000)  # a port a's own policy would allow
    assert Topology.wait_until(lambda: lab.counter("egress", R.DROP_SPOOFED_SOURCE) == spoofed + 1, 5)
    time.sleep(0.3)
    assert lab.counter("ingress") == delivered, "the spoofed frame reached b's veth"
    events = lab.events(R.DROP_SPOOFED_SOURCE)
    assert events, "no SPOOFED_SOURCE flow event"
    event = events[0]
    assert event.src == IPv4Address(src) and event.dst == IPv4Address(lab.b.ip) and event.dport == 6000
    assert event.verdict == "dropped" and event.direction == "egress"
    assert event.src_identity == ID_A and event.ifindex == lab.a.host_ifindex  # the pod that sent it


def test_the_pods_own_traffic_is_decided_by_policy(lab: Lab) -> None:
    spoofed = lab.counter("egress", R.DROP_SPOOFED_SOURCE)
    # a raw frame with a's own source: evaluated, allowed port delivered, other port denied by policy
    delivered = lab.counter("ingress")
    lab.send_from_a(lab.a.ip, 6000)
    assert Topology.wait_until(lambda: lab.counter("ingress") > delivered, 5), "a's own frame did not reach b"
    lab.reader.poll(0)
    lab.send_from_a(lab.a.ip, 5353)
    denied = lab.events(R.DROP_POLICY)
    for _ in range(3):
        if any(e.dport == 5353 for e in denied):
            break
        denied += lab.events(R.DROP_POLICY)
    assert any(e.dport == 5353 and e.src == IPv4Address(lab.a.ip) and e.src_identity == ID_A for e in denied), denied
    # ordinary sockets (ARP included) in both pods
    assert lab.ca.tcp(lab.b.ip, 7000) == "ok"
    assert lab.ca.udp(lab.b.ip, 6000) == "ok"
    assert lab.ca.tcp(lab.b.ip, 7001) == "timeout"
    assert lab.cc.udp(lab.b.ip, 6000) == "ok"
    assert lab.cc.icmp(lab.b.ip) == "ok"
    assert lab.counter("egress", R.DROP_SPOOFED_SOURCE) == spoofed
