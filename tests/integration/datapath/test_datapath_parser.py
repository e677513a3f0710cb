"""The parser fails closed: what it cannot read is dropped with a reason, never passed.

Two pods (a 1001, b 1002) on one node, with IPv6 addresses and 9000-byte veths. Hand-built
frames run through the loaded programs with BPF_PROG_TEST_RUN (exact tc verdicts for every
kind of unreadable packet, on enforced and unenforced directions), and real traffic checks
the same on the veths: an IPv6 ping between the pods fails with UNSUPPORTED_L3 while
Neighbor Discovery works, a non-first fragment and an ``ihl < 5`` header sent from a pod
are dropped, and a frame whose IPv4 header lies beyond the linear area is still evaluated.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from ipaddress import IPv6Address

import pytest
from dp_packets import (
    ICMP,
    MF,
    TC_ACT_OK,
    TC_ACT_SHOT,
    TCP,
    UDP,
    Runner,
    frame,
    frame6,
    icmp6,
    l4_header,
    mac_of,
    send_raw,
)
from dp_topology import Topology

from ciliary.nodeagent import planning
from ciliary.nodeagent.datapath import engine, flows, maps
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

pytestmark = pytest.mark.integration

ID_A, ID_B = 1001, 1002
ALLOW_ALL = DirectionPolicy(enforced=True, entries=(PolicyEntry(identity=0, verdict=Verdict.ALLOW),))
R = maps.Reason


class Env:
    def __init__(self, topo: Topology, dp: engine.Datapath) -> None:
        self.topo, self.dp = topo, dp
        self.a, self.b = topo.pods
        self.runner = Runner(dp)
        self.revision = 0
        self.reader = dp.flows()

    def apply(self, a_out: DirectionPolicy | None = None, b_in: DirectionPolicy | None = None) -> None:
        self.revision += 1
        eps = (intents.EndpointIntent(namespace="t", pod="a", ipv4=self.a.ip, identity=ID_A,
                                      egress=a_out or DirectionPolicy()),
               intents.EndpointIntent(namespace="t", pod="b", ipv4=self.b.ip, identity=ID_B,
                                      ingress=b_in or DirectionPolicy()))
        intent = intents.NodeIntent(node=self.dp.node, revision=self.revision, endpoints=eps,
                                    ipcache=(intents.IpcacheEntry(cidr=f"{self.a.ip}/32", identity=ID_A),
                                             intents.IpcacheEntry(cidr=f"{self.b.ip}/32", identity=ID_B)))
        veths = {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in self.topo.pods}
        self.dp.apply(intent, veths)
        self.runner.clear_conntrack()

    def events(self, reason: maps.Reason, tries: int = 30) -> list[flows.FlowEvent]:
        got: list[flows.FlowEvent] = []
        for _ in range(tries):
            got += [e for e in self.reader.poll(100) if e.reason == reason]
            if got:
                break
        return got

    def drain(self) -> None:
        self.reader.poll(0)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    topo = Topology(pods=2, ipv6=True, mtu=9000)
    dp: engine.Datapath | None = None
    the_env: Env | None = None
    try:
        topo.up()
        dp = engine.Datapath(f"cyt-{topo.tag}", netns=topo.node_ns)
        dp.start()
        the_env = Env(topo, dp)
        the_env.apply()
        yield the_env
    finally:
        if the_env is not None:
            the_env.runner.close()
        if dp is not None:
            dp.teardown()
        topo.down()


def counters_of(env: Env, direction: str) -> dict[maps.Reason, int]:
    return {reason: packets for (d, reason), (packets, _b) in env.dp.counters().items() if d == direction}


# ---------------------------------------------------------------- BPF_PROG_TEST_RUN


def unreadable(a: str, b: str) -> dict[str, tuple[bytes, maps.Reason]]:
    """Frames the parser cannot fully read, from a to b, and the reason each is dropped for."""
    udp = l4_header(UDP, 40000, 5353)
    return {
        "ihl 4": (frame(a, b, TCP, dport=80, ihl=4), R.DROP_INVALID_L3),
        "ihl 0": (frame(a, b, TCP, dport=80, ihl=0), R.DROP_INVALID_L3),
        "non-first fragment": (frame(a, b, UDP, l4=b"", payload=b"x" * 64, frag=100), R.DROP_FRAGMENT),
        "non-first, last fragment": (frame(a, b, TCP, l4=b"", payload=b"x" * 64, frag=185 | 0), R.DROP_FRAGMENT),
        "first fragment without ports": (frame(a, b, TCP, l4=b"\x9c\x40", frag=MF), R.DROP_FRAGMENT),
        "first fragment, half a TCP header": (frame(a, b, TCP, l4=l4_header(TCP, 40000, 80)[:12], frag=MF),
                                              R.DROP_FRAGMENT),
        "truncated TCP header": (frame(a, b, TCP, l4=l4_header(TCP, 40000, 80)[:10]), R.DROP_INVALID),
        "truncated UDP header": (frame(a, b, UDP, l4=udp[:6]), R.DROP_INVALID),
        "truncated ICMP header": (frame(a, b, ICMP, l4=b"\x08\x00\x00"), R.DROP_INVALID),
    }


def test_unreadable_ipv4_is_dropped_on_an_enforced_direction(env: Env) -> None:
    env.apply(a_out=ALLOW_ALL, b_in=ALLOW_ALL)
    a, b = env.a.ip, env.b.ip
    assert env.runner.run("from_pod", frame(a, b, TCP, dport=80)) == TC_ACT_OK  # allowed when readable
    assert env.runner.run("to_pod", frame(a, b, TCP, dport=80)) == TC_ACT_OK
    for hook, direction in (("from_pod", "egress"), ("to_pod", "ingress")):
        for name, (packet, reason) in unreadable(a, b).items():
            before = counters_of(env, direction)[reason]
            assert env.runner.run(hook, packet) == TC_ACT_SHOT, f"{hook}: {name}"
            assert counters_of(env, direction)[reason] == before + 1, f"{hook}: {name} counted as {reason.name}"
    # a first fragment that holds its L4 header is evaluated like any packet (and never tracked)
    first = frame(a, b, UDP, sport=40000, dport=5353, payload=b"x" * 64, frag=MF)
    assert env.runner.run("from_pod", first) == TC_ACT_OK
    env.apply(a_out=DirectionPolicy(enforced=True, entries=(
        PolicyEntry(identity=ID_B, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW),)))
    assert env.runner.run("from_pod", first) == TC_ACT_SHOT
    assert env.runner.clear_conntrack() == 0


def test_fragments_and_truncated_l4_pass_an_unenforced_direction_malformed_l3_never(env: Env) -> None:
    env.apply()
    for name, (packet, reason) in unreadable(env.a.ip, env.b.ip).items():
        expected = TC_ACT_SHOT if reason is R.DROP_INVALID_L3 else TC_ACT_OK
        assert env.runner.run("from_pod", packet) == expected, name
        assert env.runner.run("to_pod", packet) == expected, name


def test_arp_passes(env: Env) -> None:
    env.apply(a_out=ALLOW_ALL, b_in=ALLOW_ALL)
    arp = b"\xff" * 6 + bytes(6) + b"\x08\x06" + bytes(28)
    assert env.runner.run("from_pod", arp) == TC_ACT_OK
    assert env.runner.run("to_pod", arp) == TC_ACT_OK


# ---------------------------------------------------------------- real traffic


def ping6(env: Env, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", env.a.netns, "ping", "-6", "-c", "2", "-i", "0.3", "-W", "1",
                           target], capture_output=True, text=True, timeout=30)


def test_ipv6_between_unenforced_pods_passes(env: Env) -> None:
    env.apply()  # no policy selects either pod: nothing is enforced, IPv6 included
    ping = ping6(env, env.topo.ip6(env.b))
    assert ping.returncode == 0, ping.stdout + ping.stderr


@pytest.mark.parametrize("enforced", ["ingress of the destination", "egress of the source"])
def test_ipv6_ping_to_or_from_an_enforced_pod_fails_with_unsupported_l3_while_nd_works(env: Env, enforced: str
                                                                                      ) -> None:
    if enforced.startswith("ingress"):
        env.apply(b_in=ALLOW_ALL)  # IPv4 from anyone is allowed; IPv6 has no policy and is dropped
    else:
        env.apply(a_out=ALLOW_ALL)
    subprocess.run(["ip", "-n", env.a.netns, "-6", "neigh", "flush", "dev", "eth0"], check=True, timeout=10)
    env.drain()
    a6, b6 = env.topo.ip6(env.a), env.topo.ip6(env.b)
    ping = ping6(env, b6)
    assert ping.returncode != 0, ping.stdout
    # ND to the gateway went through both programs: the pod resolved fe80::1's link-layer address
    neigh = subprocess.run(["ip", "-n", env.a.netns, "-6", "neigh", "show", "fe80::1", "dev", "eth0"],
                           capture_output=True, text=True, timeout=10).stdout
    assert "lladdr" in neigh, neigh
    drops = [e for e in env.events(R.DROP_UNSUPPORTED_L3) if e.src == IPv6Address(a6)]
    assert drops, "no UNSUPPORTED_L3 flow event"
    event = drops[0]
    assert event.dst == IPv6Address(b6) and event.verdict == "dropped"
    assert event.protocol == 58 and event.sport == 128  # ICMPv6 echo request
    if enforced.startswith("ingress"):
        assert event.direction == "ingress" and event.dst_identity == ID_B
    else:
        assert event.direction == "egress" and event.src_identity == ID_A


def test_only_neighbor_discovery_passes_an_enforced_pod(env: Env) -> None:
    env.apply(a_out=ALLOW_ALL)
    gateway = mac_of(env.topo.node_ns, env.a.host_ifname)
    pod_mac = mac_of(env.a.netns, "eth0")
    a6, b6 = env.topo.ip6(env.a), env.topo.ip6(env.b)

    def dropped_after(packet: bytes) -> int:
        before = counters_of(env, "egress")[R.DROP_UNSUPPORTED_L3]
        send_raw(env.a.netns, "eth0", packet)
        Topology.wait_until(lambda: counters_of(env, "egress")[R.DROP_UNSUPPORTED_L3] > before, 1.0)
        return counters_of(env, "egress")[R.DROP_UNSUPPORTED_L3] - before

    kw = {"dst_mac": gateway, "src_mac": pod_mac}
    dropped = {
        "echo request": frame6(a6, b6, 58, icmp6(128), **kw),
        "neighbor solicitation with hop limit 64": frame6(a6, b6, 58, icmp6(135), hop_limit=64, **kw),
        # ND-typed, hop limit 255, but neither side link-scoped: routable, not what the veth needs
        "neighbor solicitation between global addresses": frame6(a6, b6, 58, icmp6(135), hop_limit=255, **kw),
        "neighbor advertisement between global addresses": frame6(a6, b6, 58, icmp6(136), hop_limit=255, **kw),
        "router advertisement between global addresses": frame6(a6, b6, 58, icmp6(134), hop_limit=255, **kw),
        "neighbor solicitation from :: to a global address": frame6("::", b6, 58, icmp6(135), hop_limit=255,
                                                                    **kw),
        "MLD report behind a hop-by-hop header": frame6(a6, "ff02::16", 0, b"\x3a\x00" + b"\0" * 6 + icmp6(143),
                                                        hop_limit=1, **kw),
        "TCP": frame6(a6, b6, TCP, l4_header(TCP, 40000, 80), **kw),
        "UDP": frame6(a6, b6, UDP, l4_header(UDP, 40000, 53), **kw),
    }
    for name, packet in dropped.items():
        assert dropped_after(packet) == 1, name
    for nd in (133, 134, 135, 136, 137):
        assert dropped_after(frame6(a6, "ff02::1", 58, icmp6(nd), hop_limit=255, **kw)) == 0, nd
    link_scoped = {  # what ND on the veth is made of
        "solicitation to the solicited-node address": (a6, "ff02::1:ff00:1", 135),
        "duplicate address detection": ("::", "ff02::1:ff00:2", 135),
        "advertisement to the gateway": (a6, "fe80::1", 136),
        "unicast probe of the gateway": (a6, "fe80::1", 135),
        "router solicitation from a link-local address": ("fe80::2", "ff02::2", 133),
        "link-local source to a global address": ("fe80::2", b6, 136),
    }
    for name, (src, dst, nd) in link_scoped.items():
        assert dropped_after(frame6(src, dst, 58, icmp6(nd), hop_limit=255, **kw)) == 0, name


def test_fragment_and_bad_ihl_from_a_pod_are_dropped(env: Env) -> None:
    env.apply(a_out=ALLOW_ALL)
    env.drain()
    gateway = mac_of(env.topo.node_ns, env.a.host_ifname)
    pod_mac = mac_of(env.a.netns, "eth0")
    fragment = frame(env.a.ip, env.b.ip, UDP, l4=b"", payload=b"y" * 100, frag=50, dst_mac=gateway, src_mac=pod_mac)
    send_raw(env.a.netns, "eth0", fragment)
    dropped = env.events(R.DROP_FRAGMENT)
    assert any(str(e.src) == env.a.ip and str(e.dst) == env.b.ip for e in dropped), dropped
    bad = frame(env.a.ip, env.b.ip, TCP, dport=80, ihl=3, dst_mac=gateway, src_mac=pod_mac)
    send_raw(env.a.netns, "eth0", bad)
    dropped = env.events(R.DROP_INVALID_L3)
    assert any(str(e.src) == env.a.ip for e in dropped), dropped
    # a frame that ends inside its IPv4 header (BPF_PROG_TEST_RUN refuses to build one)
    before = counters_of(env, "egress")[R.DROP_INVALID_L3]
    send_raw(env.a.netns, "eth0", bad[:14 + 12])
    assert Topology.wait_until(lambda: counters_of(env, "egress")[R.DROP_INVALID_L3] == before + 1, 5)


def test_ipv4_header_beyond_the_linear_area_is_pulled_and_evaluated(env: Env) -> None:
    # AF_PACKET puts only the Ethernet header of a frame larger than a page in the skb's
    # linear area: the IPv4 header arrives in paged data and must still be read.
    env.apply(a_out=DirectionPolicy(enforced=True, entries=(
        PolicyEntry(identity=ID_B, protocol=Protocol.TCP, port_low=8080, verdict=Verdict.ALLOW),)))
    env.drain()
    gateway = mac_of(env.topo.node_ns, env.a.host_ifname)
    pod_mac = mac_of(env.a.netns, "eth0")
    big = frame(env.a.ip, env.b.ip, UDP, sport=41000, dport=5353, payload=b"z" * 6000, dst_mac=gateway,
                src_mac=pod_mac)
    big = big[:14 + 20 + 4] + struct.pack("!H", len(big) - 14 - 20) + big[14 + 20 + 6:]  # UDP length
    send_raw(env.a.netns, "eth0", big)
    dropped = [e for e in env.events(R.DROP_POLICY) if e.dport == 5353]
    assert dropped, "the paged frame was not evaluated"
    assert dropped[0].length == len(big) and str(dropped[0].src) == env.a.ip
