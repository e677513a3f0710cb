"""Proxy redirection, the pure part: which entries carry a proxy port, and the constants shared with the C."""

from __future__ import annotations

import ctypes
from ipaddress import IPv4Address

from ciliary.nodeagent import planning, proxy_routing
from ciliary.nodeagent.datapath import maps
from ciliary.nodeagent.planning import MapDirection
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, DNSRule, PolicyEntry, Protocol, Verdict

DNS = PolicyEntry(identity=0, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW, l7_redirect=True,
                  l7_parser="dns", dns=(DNSRule(match_name="api.world.test"),))
HTTP = PolicyEntry(identity=0, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW, l7_redirect=True,
                   l7_parser="http")
PLAIN = PolicyEntry(identity=0, protocol=Protocol.TCP, port_low=443, verdict=Verdict.ALLOW)


def test_only_egress_entries_of_a_running_proxy_redirect() -> None:
    ports = {"dns": 10053}
    assert planning.proxy_port_of(MapDirection.EGRESS, DNS, ports) == 10053
    assert planning.proxy_port_of(MapDirection.INGRESS, DNS, ports) == 0  # bpf_sk_assign: tc ingress only
    assert planning.proxy_port_of(MapDirection.EGRESS, HTTP, ports) == 0  # no HTTP proxy here: plain allow
    assert planning.proxy_port_of(MapDirection.EGRESS, PLAIN, ports) == 0
    assert planning.proxy_port_of(MapDirection.EGRESS, DNS, {}) == 0


def test_map_values_carry_the_port() -> None:
    policy = DirectionPolicy(enforced=True, entries=(DNS, HTTP, PLAIN))
    allow, deny = planning.direction_maps(3, MapDirection.EGRESS, policy, {"dns": 10053, "http": 15001})
    assert not deny
    by_port = {k.port: v.proxy_port for k, v in allow.items()}
    assert by_port == {53: 10053, 80: 15001, 443: 0}


def test_value_layout_keeps_the_deny_flag_bytes() -> None:
    """flags shrank to 16 bits; a value written as {cookie, flags=1} reads the same (little endian)."""
    assert ctypes.sizeof(maps.PolicyValueC) == maps.STRUCT_SIZES["policy_value"] == 8
    raw = bytes(maps.PolicyValueC(7, 1, 10053))
    assert raw[4:6] == (1).to_bytes(2, "little") and raw[6:8] == (10053).to_bytes(2, "little")


def test_constants_come_from_consts_h() -> None:
    c = proxy_routing.datapath_constants()
    assert (c.mark, c.mask, c.table) == (0x0A00, 0x0F00, 2005)
    assert c.mark & c.mask == c.mark


def test_plan_passes_proxy_ports_through() -> None:
    intent = intents.NodeIntent(node="n", revision=1, endpoints=(intents.EndpointIntent(
        namespace="ns", pod="p", ipv4="10.244.1.2", identity=300,
        egress=DirectionPolicy(enforced=True, entries=(DNS,))),))
    veths = {IPv4Address("10.244.1.2"): planning.HostVeth("cy0", 5)}
    plan = planning.plan(intent, planning.DatapathState(), programs={h: "x" for h in planning.HOOKS},
                         veths=veths, proxy_ports={"dns": 10053})
    values = [v for _k, v in plan.policy.upserts.items()]
    assert values and all(v.proxy_port == 10053 for v in values)
