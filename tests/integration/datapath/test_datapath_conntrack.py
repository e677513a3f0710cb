"""Conntrack in the loaded programs: one entry per (pod, connection), found by both hooks of the pod.

Two pods (a 1001, b 1002) on one node; hand-built frames run through the loaded
programs with BPF_PROG_TEST_RUN (on the node's loopback: no veth, so no spoofing
check) and cy_ct is read back from the kernel. What is checked: a connection
between two pods of the node gives exactly one entry per pod, keyed from that
pod's side with the direction that opened it; replies pass an enforced direction
through it; further forward packets leave the entry untouched (no write per
packet) until one closes the connection; and a revoked allow cuts the known
connection at its next forward packet.
"""

from __future__ import annotations

import ctypes as ct
import socket
import struct
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from dp_packets import TC_ACT_OK, TC_ACT_SHOT, TCP, Runner, frame
from dp_topology import Topology

from ciliary.nodeagent import planning, rendering
from ciliary.nodeagent.datapath import engine, flows, libbpf, maps
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

pytestmark = pytest.mark.integration

ID_A, ID_B = 1001, 1002
DIR_INGRESS, DIR_EGRESS = 1, 2  # CY_DIR_* (datapath_c/include/consts.h)
SYN, ACK, FIN_ACK, SYN_ACK = 0x02, 0x10, 0x11, 0x12
SPORT, DPORT = 40000, 8080


class Env:
    def __init__(self, topo: Topology, dp: engine.Datapath) -> None:
        self.topo, self.dp = topo, dp
        self.a, self.b = (str(p.ip) for p in topo.pods[:2])
        self.runner = Runner(dp)
        self.revision = 0

    def apply(self, b_in: DirectionPolicy) -> None:
        """a unenforced; b's ingress as given; b's egress enforced with nothing allowed."""
        self.revision += 1
        a, b = self.topo.pods[:2]
        eps = (intents.EndpointIntent(namespace="t", pod="a", ipv4=a.ip, identity=ID_A),
               intents.EndpointIntent(namespace="t", pod="b", ipv4=b.ip, identity=ID_B, ingress=b_in,
                                      egress=DirectionPolicy(enforced=True)))
        intent = intents.NodeIntent(node=self.dp.node, revision=self.revision, endpoints=eps)
        self.dp.apply(intent, {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in self.topo.pods[:2]})

    def entries(self) -> dict[tuple[str, str, int, int, int], tuple[int, int]]:
        """cy_ct as {(pod, peer, pod port, peer port, protocol): (origin direction, expires)}."""
        out = {}
        key, nxt, value = maps.CtKeyC(), maps.CtKeyC(), maps.CtEntryC()
        for i in range(10_000):
            if libbpf.lib.bpf_map_get_next_key(self.runner.ct_fd, ct.byref(key) if i else None, ct.byref(nxt)) < 0:
                break
            assert libbpf.lib.bpf_map_lookup_elem(self.runner.ct_fd, ct.byref(nxt), ct.byref(value)) == 0
            out[(socket.inet_ntoa(struct.pack("=I", nxt.pod_addr)), socket.inet_ntoa(struct.pack("=I", nxt.peer_addr)),
                 socket.ntohs(nxt.pod_port), socket.ntohs(nxt.peer_port), nxt.protocol)] = (value.origin, value.expires)
            ct.memmove(ct.byref(key), ct.byref(nxt), ct.sizeof(key))
        return out

    def a_to_b(self, flags: int) -> tuple[int, int]:
        """A forward packet of the connection through a's egress hook, then b's ingress hook."""
        packet = frame(self.a, self.b, TCP, SPORT, DPORT, tcp_flags=flags)
        return self.runner.run("from_pod", packet), self.runner.run("to_pod", packet)

    def b_to_a(self, flags: int, sport: int = DPORT, dport: int = SPORT) -> tuple[int, int]:
        packet = frame(self.b, self.a, TCP, sport, dport, tcp_flags=flags)
        return self.runner.run("from_pod", packet), self.runner.run("to_pod", packet)


ALLOW_A = DirectionPolicy(enforced=True, entries=(
    PolicyEntry(identity=ID_A, protocol=Protocol.TCP, port_low=DPORT, verdict=Verdict.ALLOW),))


@pytest.fixture()
def env() -> Iterator[Env]:
    topo = Topology(pods=3)  # the third pod's veth stands for a new pod handed b's address
    dp: engine.Datapath | None = None
    the_env: Env | None = None
    try:
        topo.up()
        # a long monitor interval: these tests count the flag reports alone (the interval has its own test)
        dp = engine.Datapath(f"cyt-{topo.tag}", netns=topo.node_ns,
                             context=rendering.RenderContext(pin_dir=f"/sys/fs/bpf/ciliary/cyt-{topo.tag}",
                                                             trace_interval_s=3600))
        dp.start()
        the_env = Env(topo, dp)
        the_env.apply(ALLOW_A)
        yield the_env
    finally:
        if the_env is not None:
            the_env.runner.close()
        if dp is not None:
            dp.teardown()
        topo.down()


def test_a_connection_between_two_pods_is_one_entry_per_pod_keyed_from_its_side(env: Env) -> None:
    assert env.a_to_b(SYN) == (TC_ACT_OK, TC_ACT_OK)
    assert {k: origin for k, (origin, _) in env.entries().items()} == {
        (env.a, env.b, SPORT, DPORT, TCP): DIR_EGRESS,   # a opened it on its way out
        (env.b, env.a, DPORT, SPORT, TCP): DIR_INGRESS,  # b accepted it on its way in
    }
    # b's egress allows nothing, yet its replies pass (and a's ingress takes them as replies too)
    assert env.b_to_a(SYN_ACK) == (TC_ACT_OK, TC_ACT_OK)
    assert env.a_to_b(ACK) == (TC_ACT_OK, TC_ACT_OK)
    assert len(env.entries()) == 2, "replies and forward packets of a known connection add no entry"
    # the same ports the other way round are not a reply of anything on b's side: a new connection, dropped
    assert env.b_to_a(SYN, sport=DPORT + 1)[0] == TC_ACT_SHOT


def test_packets_of_a_known_connection_do_not_rewrite_its_entry_until_it_closes(env: Env) -> None:
    env.a_to_b(SYN)
    env.b_to_a(SYN_ACK)
    before = env.entries()
    for _ in range(20):
        assert env.a_to_b(ACK) == (TC_ACT_OK, TC_ACT_OK)
        assert env.b_to_a(ACK) == (TC_ACT_OK, TC_ACT_OK)
    assert env.entries() == before, "an entry was rewritten by packets that changed nothing"
    assert env.a_to_b(FIN_ACK) == (TC_ACT_OK, TC_ACT_OK)
    after = env.entries()
    for key, (origin, expires) in after.items():
        assert origin == before[key][0]
        assert expires < before[key][1], f"{key}: FIN did not shorten the entry's lifetime"


def test_a_revoked_allow_cuts_the_known_connection_at_its_next_forward_packet(env: Env) -> None:
    env.a_to_b(SYN)
    env.b_to_a(SYN_ACK)
    env.apply(DirectionPolicy(enforced=True))  # b's ingress now allows nothing
    assert env.a_to_b(ACK) == (TC_ACT_OK, TC_ACT_SHOT)
    assert env.b_to_a(ACK) == (TC_ACT_OK, TC_ACT_OK), "replies of the connection still pass b's egress"


def test_a_gone_endpoints_entries_are_removed_and_its_address_reused_passes_nothing_as_a_reply(env: Env) -> None:
    env.a_to_b(SYN)
    env.b_to_a(SYN_ACK)
    assert len(env.entries()) == 2
    a, b, _c = env.topo.pods
    # b goes away: its entry goes with it; a's (an endpoint still) stays
    env.revision += 1
    only_a = intents.NodeIntent(node=env.dp.node, revision=env.revision, endpoints=(
        intents.EndpointIntent(namespace="t", pod="a", ipv4=a.ip, identity=ID_A),))
    env.dp.apply(only_a, {a.ip: planning.HostVeth(a.host_ifname, a.host_ifindex)})
    assert list(env.entries()) == [(env.a, env.b, SPORT, DPORT, TCP)]
    # a new pod gets b's address (another endpoint, egress enforced, nothing allowed): the old
    # connection's "reply" from it is a new connection now, judged by its policy and dropped
    env.revision += 1
    newcomer = intents.NodeIntent(node=env.dp.node, revision=env.revision, endpoints=(
        intents.EndpointIntent(namespace="t", pod="a", ipv4=a.ip, identity=ID_A),
        intents.EndpointIntent(namespace="t", pod="b2", ipv4=b.ip, identity=ID_B,
                               egress=DirectionPolicy(enforced=True))))
    env.dp.apply(newcomer, {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in env.topo.pods[:2]})
    assert env.b_to_a(SYN_ACK)[0] == TC_ACT_SHOT


def test_an_address_handed_to_a_new_pod_before_the_old_ones_removal_is_applied_is_a_new_endpoint(
        env: Env) -> None:
    """b's address moves to another veth in one apply (the old pod's removal and the new pod's add coalesced):
    a new endpoint id, so b's connection entry is purged and nothing from the new pod passes as its reply."""
    env.a_to_b(SYN)
    env.b_to_a(SYN_ACK)
    assert len(env.entries()) == 2
    a, b, c = env.topo.pods
    old_id = env.dp.observe().endpoints[IPv4Address(b.ip)].ep_id
    env.revision += 1
    newcomer = intents.NodeIntent(node=env.dp.node, revision=env.revision, endpoints=(
        intents.EndpointIntent(namespace="t", pod="a", ipv4=a.ip, identity=ID_A),
        intents.EndpointIntent(namespace="t", pod="b2", ipv4=b.ip, identity=ID_B,
                               egress=DirectionPolicy(enforced=True))))
    env.dp.apply(newcomer, {a.ip: planning.HostVeth(a.host_ifname, a.host_ifindex),
                            b.ip: planning.HostVeth(c.host_ifname, c.host_ifindex)})  # b's address, c's veth
    held = env.dp.observe().endpoints[IPv4Address(b.ip)]
    assert held.ifindex == c.host_ifindex and held.ep_id != old_id
    assert list(env.entries()) == [(env.a, env.b, SPORT, DPORT, TCP)]  # b's side purged, a's kept
    assert env.b_to_a(SYN_ACK)[0] == TC_ACT_SHOT


def test_medium_aggregation_reports_a_connections_first_packet_and_each_new_flag(env: Env) -> None:
    """The programs of the agent's default (``--monitor-aggregation medium``): a connection shows its SYN, the
    answer, and the FIN of each side, each once per direction and hook; the handshake's ACK, data packets and
    repeated flags show nothing. Drops are every packet."""
    reader = env.dp.flows()
    reader.drain()

    def seen() -> list[tuple[str, int, bool]]:
        got: list[flows.FlowEvent] = []
        for _ in range(5):
            got += reader.poll(50)
        return [(e.direction, e.tcp_flags, e.is_reply) for e in got if e.protocol == TCP and SPORT in (e.sport, e.dport)]

    env.a_to_b(SYN)
    assert sorted(seen()) == [("egress", SYN, False), ("ingress", SYN, False)]  # a's egress, b's ingress
    env.b_to_a(SYN_ACK)
    assert sorted(seen()) == [("egress", SYN_ACK, True), ("ingress", SYN_ACK, True)]  # b's egress, a's ingress
    env.a_to_b(ACK)
    for _ in range(10):  # data: nothing new
        env.a_to_b(ACK | 0x08)
        env.b_to_a(ACK | 0x08)
    assert seen() == []
    env.b_to_a(FIN_ACK)
    assert sorted(seen()) == [("egress", FIN_ACK, True), ("ingress", FIN_ACK, True)]
    env.a_to_b(FIN_ACK)
    assert sorted(seen()) == [("egress", FIN_ACK, False), ("ingress", FIN_ACK, False)]
    env.a_to_b(FIN_ACK)  # a retransmitted FIN: already reported
    assert seen() == []
    env.a_to_b(SYN)  # a new connection on the closed one's tuple (its entry still lives): reported again
    assert sorted(seen()) == [("egress", SYN, False), ("ingress", SYN, False)]
    env.b_to_a(SYN_ACK)
    assert sorted(seen()) == [("egress", SYN_ACK, True), ("ingress", SYN_ACK, True)]
    for _ in range(3):  # a new connection b's egress does not allow: every packet is a drop event
        env.b_to_a(SYN, sport=DPORT + 1)
    # only these SYNs count: any other packet the programs drop meanwhile (a veth's own traffic) would race into
    # the count (CI once saw 4)
    drops = [e for _ in range(5) for e in reader.poll(50)
             if e.verdict == "dropped" and e.protocol == TCP and e.sport == DPORT + 1]
    assert len(drops) == 3, drops


def test_medium_aggregation_reports_a_quiet_direction_again_after_the_interval() -> None:
    """``--monitor-aggregation-interval 2``: a long connection's data shows once per direction and hook after two
    seconds without a report on that side, then not again within them."""
    topo = Topology(pods=2)
    dp: engine.Datapath | None = None
    the_env: Env | None = None
    try:
        topo.up()
        dp = engine.Datapath(f"cyt-{topo.tag}", netns=topo.node_ns,
                             context=rendering.RenderContext(pin_dir=f"/sys/fs/bpf/ciliary/cyt-{topo.tag}",
                                                             trace_interval_s=2))
        dp.start()
        the_env = Env(topo, dp)
        the_env.apply(ALLOW_A)
        reader = dp.flows()
        reader.drain()

        def seen() -> list[tuple[str, int, bool, bool]]:
            got = [e for _ in range(5) for e in reader.poll(50)]
            return sorted((e.direction, e.tcp_flags, e.is_reply, e.established) for e in got
                          if e.protocol == TCP and SPORT in (e.sport, e.dport))

        the_env.a_to_b(SYN)
        the_env.b_to_a(SYN_ACK)
        the_env.a_to_b(ACK)
        # the SYN and its answer, each at two hooks; only the SYN opens (replies are never "established")
        assert seen() == [("egress", SYN, False, False), ("egress", SYN_ACK, True, False),
                          ("ingress", SYN, False, False), ("ingress", SYN_ACK, True, False)]
        time.sleep(3.1)  # 3 or more seconds on the coarse clock's count, whichever second the reports fell in
        data = ACK | 0x08
        for _ in range(3):
            the_env.a_to_b(data)
            the_env.b_to_a(data)
        assert seen() == [("egress", data, False, True), ("egress", data, True, False),
                          ("ingress", data, False, True), ("ingress", data, True, False)]
    finally:
        if the_env is not None:
            the_env.runner.close()
        if dp is not None:
            dp.teardown()
        topo.down()


def test_maximum_aggregation_reports_the_first_packet_only() -> None:
    topo = Topology(pods=2)
    dp: engine.Datapath | None = None
    the_env: Env | None = None
    try:
        topo.up()
        dp = engine.Datapath(f"cyt-{topo.tag}", netns=topo.node_ns,
                             context=rendering.RenderContext(pin_dir=f"/sys/fs/bpf/ciliary/cyt-{topo.tag}",
                                                             trace_flags=False))
        dp.start()
        the_env = Env(topo, dp)
        the_env.apply(ALLOW_A)
        reader = dp.flows()
        reader.drain()
        the_env.a_to_b(SYN)
        the_env.b_to_a(SYN_ACK)
        the_env.a_to_b(ACK)
        the_env.b_to_a(FIN_ACK)
        the_env.a_to_b(FIN_ACK)
        got = [e for _ in range(5) for e in reader.poll(50) if e.protocol == TCP and SPORT in (e.sport, e.dport)]
        assert sorted((e.direction, e.tcp_flags) for e in got) == [("egress", SYN), ("ingress", SYN)], got
    finally:
        if the_env is not None:
            the_env.runner.close()
        if dp is not None:
            dp.teardown()
        topo.down()
