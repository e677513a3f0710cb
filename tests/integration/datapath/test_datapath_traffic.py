"""The datapath with real traffic: three pods on one node, policies written as map contents.

Pods: a (identity 1001, the client), b (1002, the server), c (1003, another client).
Each test applies a NodeIntent and checks TCP/UDP/ICMP between the pods. No test
compiles: the module compiles both programs once, and every policy change must
leave compiling.compile_count() unchanged.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from dp_topology import Client, Topology

from ciliary.nodeagent import planning
from ciliary.nodeagent.datapath import compiling, engine, errors, maps
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

pytestmark = pytest.mark.integration

TCP_PORTS = [7000, 8080, 8081, 8443, 9090]
UDP_PORTS = [5353, 6000]
ID_A, ID_B, ID_C = 1001, 1002, 1003


class Lab:
    def __init__(self, topo: Topology, dp: engine.Datapath) -> None:
        self.topo = topo
        self.dp = dp
        self.a, self.b, self.c = topo.pods
        self.ca: Client = topo.client(self.a)
        self.cc: Client = topo.client(self.c)
        self.veths = {p.ip: planning.HostVeth(p.host_ifname, p.host_ifindex) for p in topo.pods}
        self.revision = 0
        self.compiles_after_start = compiling.compile_count()

    def apply(self, *, a_in: DirectionPolicy | None = None, a_out: DirectionPolicy | None = None,
              b_in: DirectionPolicy | None = None, b_out: DirectionPolicy | None = None) -> engine.ApplyResult:
        self.revision += 1

        def ep(pod: Any, identity: int, ingress: DirectionPolicy | None, egress: DirectionPolicy | None
               ) -> intents.EndpointIntent:
            return intents.EndpointIntent(namespace="t", pod=pod.name, ipv4=pod.ip, identity=identity,
                                          ingress=ingress or DirectionPolicy(), egress=egress or DirectionPolicy())

        intent = intents.NodeIntent(
            node=self.dp.node, revision=self.revision,
            endpoints=(ep(self.a, ID_A, a_in, a_out), ep(self.b, ID_B, b_in, b_out), ep(self.c, ID_C, None, None)),
            ipcache=tuple(intents.IpcacheEntry(cidr=f"{p.ip}/32", identity=i)
                          for p, i in ((self.a, ID_A), (self.b, ID_B), (self.c, ID_C))),
        )
        result = self.dp.apply(intent, self.veths)
        assert compiling.compile_count() == self.compiles_after_start, "a policy change compiled"
        assert result.compiled == ()
        return result


@pytest.fixture(scope="module")
def lab(topology: Topology) -> Iterator[Lab]:
    topology.serve(topology.pods[1], TCP_PORTS, UDP_PORTS)
    topology.serve(topology.pods[0], [8080], [])
    dp = engine.Datapath(f"cyt-{topology.tag}", netns=topology.node_ns)
    try:
        dp.start()
        the_lab = Lab(topology, dp)
        the_lab.apply()
        yield the_lab
    finally:
        dp.teardown()


def allow(identity: int = 0, protocol: Protocol = Protocol.ANY, low: int = 0, high: int = 0,
          icmp_type: int | None = None) -> PolicyEntry:
    return PolicyEntry(identity=identity, protocol=protocol, port_low=low, port_high=high, icmp_type=icmp_type,
                       verdict=Verdict.ALLOW)


def deny(identity: int = 0, protocol: Protocol = Protocol.ANY, low: int = 0, high: int = 0) -> PolicyEntry:
    return PolicyEntry(identity=identity, protocol=protocol, port_low=low, port_high=high, verdict=Verdict.DENY)


def enforced(*entries: PolicyEntry) -> DirectionPolicy:
    return DirectionPolicy(enforced=True, entries=entries)


def test_structs_mirror_types_h() -> None:
    for name, cls in [("ipcache_key", maps.IpcacheKeyC), ("ipcache_value", maps.IpcacheValueC),
                      ("endpoint_info", maps.EndpointInfoC), ("policy_key", maps.PolicyKeyC),
                      ("policy_value", maps.PolicyValueC), ("ct_key", maps.CtKeyC), ("ct_entry", maps.CtEntryC),
                      ("counter", maps.CounterC), ("flow_event", maps.FlowEventC)]:
        assert ct.sizeof(cls) == maps.STRUCT_SIZES[name], name


def test_policy_key_round_trip() -> None:
    for start, bits in planning.port_blocks(8000, 8100):
        key = planning.PolicyKey(9, planning.MapDirection.EGRESS, 1234567, 17, start, bits)
        raw = maps.PolicyKeyC.from_buffer_copy(bytes(maps.encode_policy_key(key)))
        assert maps.decode_policy_key(raw) == key
        assert bytes(raw)[14:16] == start.to_bytes(2, "big")  # the port is big-endian in the key


def test_no_policy_everything_passes(lab: Lab) -> None:
    lab.apply()
    assert lab.ca.tcp(lab.b.ip, 8080) == "ok"
    assert lab.ca.udp(lab.b.ip, 5353) == "ok"
    assert lab.ca.icmp(lab.b.ip) == "ok"


def test_ingress_allow_by_identity_and_port(lab: Lab) -> None:
    lab.apply(b_in=enforced(allow(ID_A, Protocol.TCP, 8080)))
    assert lab.ca.tcp(lab.b.ip, 8080) == "ok"
    assert lab.ca.tcp(lab.b.ip, 8081) == "timeout"
    assert lab.cc.tcp(lab.b.ip, 8080) == "timeout"
    assert lab.ca.udp(lab.b.ip, 5353) == "timeout"


def test_deny_beats_allow(lab: Lab) -> None:
    lab.apply(b_in=enforced(allow(), allow(ID_C, Protocol.TCP, 8080), deny(ID_C, Protocol.TCP, 8000, 8100)))
    assert lab.cc.tcp(lab.b.ip, 8080) == "timeout"  # a specific allow does not hide the range deny
    assert lab.cc.tcp(lab.b.ip, 9090) == "ok"
    assert lab.ca.tcp(lab.b.ip, 8080) == "ok"


def test_deny_added_to_and_removed_from_a_live_endpoint(lab: Lab) -> None:
    """The endpoint's deny flag follows its deny entries: set with the first, cleared after the last."""
    allow_c = allow(ID_C, Protocol.TCP, 8080)
    lab.apply(b_in=enforced(allow_c))
    assert lab.cc.tcp(lab.b.ip, 8080) == "ok"
    assert not lab.dp.observe().endpoints[IPv4Address(lab.b.ip)].flags & planning.EP_INGRESS_DENY
    lab.apply(b_in=enforced(allow_c, deny(ID_C, Protocol.TCP, 8080)))
    assert lab.dp.observe().endpoints[IPv4Address(lab.b.ip)].flags & planning.EP_INGRESS_DENY
    assert lab.cc.tcp(lab.b.ip, 8080) == "timeout"
    lab.apply(b_in=enforced(allow_c))
    assert not lab.dp.observe().endpoints[IPv4Address(lab.b.ip)].flags & planning.EP_INGRESS_DENY
    assert lab.cc.tcp(lab.b.ip, 8080) == "ok"


def test_port_ranges(lab: Lab) -> None:
    lab.apply(b_in=enforced(allow(ID_A, Protocol.TCP, 8000, 8100), allow(0, Protocol.UDP, 5000, 5999)))
    assert [lab.ca.tcp(lab.b.ip, p) for p in TCP_PORTS] == ["timeout", "ok", "ok", "timeout", "timeout"]
    assert lab.cc.udp(lab.b.ip, 5353) == "ok"
    assert lab.cc.udp(lab.b.ip, 6000) == "timeout"


def test_default_deny_per_direction_and_replies_pass(lab: Lab) -> None:
    # a: egress only to b:8080, ingress enforced with nothing allowed; replies still come back.
    lab.apply(a_out=enforced(allow(ID_B, Protocol.TCP, 8080), allow(ID_B, Protocol.UDP, 5353),
                             allow(ID_B, Protocol.ICMP, icmp_type=8)),
              a_in=enforced())
    assert lab.ca.tcp(lab.b.ip, 8080) == "ok"
    assert lab.ca.udp(lab.b.ip, 5353) == "ok"
    assert lab.ca.icmp(lab.b.ip) == "ok"  # the echo reply passes through conntrack
    assert lab.ca.tcp(lab.b.ip, 8081) == "timeout"
    assert lab.ca.tcp(lab.c.ip, 8080) == "timeout"
    assert lab.cc.tcp(lab.a.ip, 8080) == "timeout"  # ingress of a is default-deny
    assert lab.cc.tcp(lab.b.ip, 8080) == "ok"  # b is not enforced at all


def test_icmp_type_matching(lab: Lab) -> None:
    lab.apply(b_in=enforced(allow(ID_A, Protocol.ICMP, icmp_type=8)))
    assert lab.ca.icmp(lab.b.ip) == "ok"
    assert lab.cc.icmp(lab.b.ip) == "timeout"
    lab.apply(b_in=enforced(allow(ID_A, Protocol.ICMP, icmp_type=13)))  # timestamp only
    assert lab.ca.icmp(lab.b.ip) == "timeout"


def test_policy_change_is_immediate_and_compiles_nothing(lab: Lab) -> None:
    lab.apply(b_in=enforced(allow(ID_A, Protocol.TCP, 8080)))
    opened = lab.ca.call(op="open", ip=lab.b.ip, port=8080, timeout=1.0)
    assert opened["result"] == "ok"
    conn = opened["id"]
    try:
        # An edit that still allows the connection leaves it alone.
        result = lab.apply(b_in=enforced(allow(ID_A, Protocol.TCP, 8080), allow(ID_C, Protocol.TCP, 9090)))
        # one policy entry, then the revision stamp of each of the three endpoints (written last)
        assert result.map_writes == 1 + 3 and result.attached == ()
        assert lab.ca.call(op="send", id=conn, timeout=1.0)["result"] == "ok"
        assert lab.cc.tcp(lab.b.ip, 9090) == "ok"
        # Revoking it cuts the established connection at its next packet (Cilium: CT passes replies only).
        lab.apply(b_in=enforced(allow(ID_C, Protocol.TCP, 9090)))
        assert lab.ca.call(op="send", id=conn, timeout=1.0)["result"] == "timeout"
        assert lab.ca.tcp(lab.b.ip, 8080) == "timeout"
        # Enforcing the reply direction does not break an allowed connection.
        lab.apply(b_in=enforced(allow(ID_A, Protocol.TCP, 8080)), a_in=enforced())
        assert lab.ca.tcp(lab.b.ip, 8080) == "ok"
    finally:
        lab.ca.call(op="close", id=conn)


def test_flow_events_carry_verdicts(lab: Lab) -> None:
    entry = allow(ID_A, Protocol.TCP, 8080).model_copy(update={"rules": (intents.RuleRef(
        kind="CiliumNetworkPolicy", namespace="t", name="web", rule_index=0, section="ingress[0]"),)})
    lab.apply(b_in=enforced(entry, deny(ID_C)))
    reader = lab.dp.flows()
    reader.poll(0)
    reader.drain()
    assert lab.ca.tcp(lab.b.ip, 8080) == "ok"
    assert lab.ca.tcp(lab.b.ip, 8081) == "timeout"
    assert lab.cc.tcp(lab.b.ip, 8080) == "timeout"
    events = []
    for _ in range(20):
        events += reader.poll(50)
        if len([e for e in events if e.direction == "ingress"]) >= 3:
            break
    ingress = [e for e in events if e.direction == "ingress" and e.dst == IPv4Address(lab.b.ip)]
    by_port = {(e.src, e.dport, e.verdict, e.reason) for e in ingress}
    a, c = IPv4Address(lab.a.ip), IPv4Address(lab.c.ip)
    assert (a, 8080, "forwarded", maps.Reason.OK_POLICY) in by_port
    assert (a, 8081, "dropped", maps.Reason.DROP_POLICY) in by_port
    assert (c, 8080, "dropped", maps.Reason.DROP_POLICY_DENY) in by_port
    allowed = next(e for e in ingress if e.verdict == "forwarded")
    assert allowed.src_identity == ID_A and allowed.dst_identity == ID_B and allowed.protocol == 6
    assert lab.dp.rules_for(allowed.cookie)[0].name == "web"
    assert reader.lost() == 0
    counters = lab.dp.counters()
    assert counters[("ingress", maps.Reason.DROP_POLICY_DENY)][0] >= 1


def test_adoption_by_a_second_engine_plans_nothing(lab: Lab) -> None:
    lab.apply(b_in=enforced(allow(ID_A, Protocol.TCP, 8080)))
    observed = lab.dp.observe()
    assert observed.policy == lab.dp.state.policy
    assert observed.endpoints == lab.dp.state.endpoints
    assert {a.sha256 for a in observed.attachments} == set(lab.dp.program_hashes.values())


def test_map_full_leaves_the_last_good_state(lab: Lab) -> None:
    lab.apply(b_in=enforced(allow(ID_A, Protocol.TCP, 8080)))
    before = compiling.compile_count()
    # 4200 identities x 16 blocks (ports 1-65535) > 65536 entries of cy_policy.
    huge = enforced(*(allow(5000 + i, Protocol.TCP, 1, 65535) for i in range(4200)))
    with pytest.raises(errors.MapFull) as info:
        lab.apply(b_in=huge)
    assert info.value.map_name == "cy_policy" and info.value.capacity == lab.dp.context.policy_size
    assert compiling.compile_count() == before
    assert lab.ca.tcp(lab.b.ip, 8080) == "ok"
    assert lab.ca.tcp(lab.b.ip, 8081) == "timeout"
    assert lab.dp.observe().policy == lab.dp.state.policy


def test_failed_write_is_rolled_back(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab.apply(b_in=enforced(allow(ID_A, Protocol.TCP, 8080)))
    real = maps._update
    calls = {"n": 0}

    def flaky(fd: int, codec: Any, key: Any, value: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise errors.MapWriteFailed(codec.name, key, 5, "injected")
        real(fd, codec, key, value)

    monkeypatch.setattr(maps, "_update", flaky)
    with pytest.raises(errors.MapWriteFailed):
        lab.apply(b_in=enforced(allow(ID_A, Protocol.TCP, 8000, 8100), deny(ID_C)))
    monkeypatch.setattr(maps, "_update", real)
    assert lab.ca.tcp(lab.b.ip, 8080) == "ok"
    assert lab.ca.tcp(lab.b.ip, 8081) == "timeout"
    assert lab.dp.observe().policy == lab.dp.state.policy
    assert lab.dp.observe().policy_deny == {}
    assert lab.dp.observe().endpoints == lab.dp.state.endpoints  # the raised deny flag was lowered again
    assert not any(e.flags & planning.EP_DENY_FLAGS for e in lab.dp.state.endpoints.values())
