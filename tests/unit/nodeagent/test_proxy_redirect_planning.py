"""Proxy redirection, the pure part: which entries carry a proxy port, and the constants shared with the C."""

from __future__ import annotations

import ctypes
import re
from ipaddress import IPv4Address

from ciliary.nodeagent import planning, proxy_routing, rendering
from ciliary.nodeagent.datapath import maps
from ciliary.nodeagent.planning import MapDirection
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, DNSRule, PolicyEntry, Protocol, Verdict

DNS = PolicyEntry(identity=0, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW, l7_redirect=True,
                  l7_parser="dns", dns=(DNSRule(match_name="api.world.test"),))
HTTP = PolicyEntry(identity=0, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW, l7_redirect=True,
                   l7_parser="http")
PLAIN = PolicyEntry(identity=0, protocol=Protocol.TCP, port_low=443, verdict=Verdict.ALLOW)


KAFKA = PolicyEntry(identity=0, protocol=Protocol.TCP, port_low=9092, verdict=Verdict.ALLOW, l7_redirect=True,
                    l7_parser="kafka")
INGRESS_HTTP = PolicyEntry(identity=0, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW, l7_redirect=True,
                           l7_parser="http", http=(intents.HttpRule(method="GET"),))


def test_only_egress_entries_of_a_running_proxy_redirect() -> None:
    ports = {"dns": 10053}
    assert planning.proxy_port_of(MapDirection.EGRESS, DNS, ports) == 10053
    assert planning.proxy_port_of(MapDirection.INGRESS, DNS, ports) == 0  # bpf_sk_assign: tc ingress only
    assert planning.proxy_port_of(MapDirection.EGRESS, HTTP, ports) == 0  # no HTTP proxy here
    assert planning.proxy_port_of(MapDirection.EGRESS, PLAIN, ports) == 0
    assert planning.proxy_port_of(MapDirection.EGRESS, DNS, {}) == 0


def test_the_kind_of_proxy_an_entry_needs() -> None:
    assert [planning.needed_proxy(e) for e in (DNS, HTTP, KAFKA, PLAIN)] == ["dns", "http", "kafka", None]
    assert planning.needed_proxy(PLAIN.model_copy(update={"verdict": Verdict.DENY})) is None


def test_an_entry_whose_proxy_the_node_lacks_drops_instead_of_passing_at_l4() -> None:
    """Fail closed: --dns-proxy-port 0, egress HTTP or Kafka with no proxy of that kind -> POLICY_NO_PROXY."""
    no = planning.POLICY_NO_PROXY
    egress = MapDirection.EGRESS
    assert planning.entry_flags(egress, DNS, {}) == no
    assert planning.entry_flags(egress, DNS, {"dns": 10053}) == 0
    assert planning.entry_flags(egress, HTTP, {"dns": 10053}) == no
    assert planning.entry_flags(egress, INGRESS_HTTP, {"http": 15001}) == 0  # an egress HTTP proxy wired up
    assert planning.entry_flags(egress, HTTP, {"http": 15001}) == no  # rules Envoy cannot read (HTTP inside TLS)
    assert planning.entry_flags(egress, KAFKA, {"dns": 10053, "http": 15001}) == no
    assert planning.entry_flags(egress, PLAIN, {}) == 0
    # ingress: only HTTP rules Envoy reads have a proxy (POLICY_HTTP; no Envoy device -> the datapath drops)
    assert planning.entry_flags(MapDirection.INGRESS, INGRESS_HTTP, {}) == planning.POLICY_HTTP
    assert planning.entry_flags(MapDirection.INGRESS, HTTP, {"http": 15001}) == no  # e.g. HTTP inside TLS
    assert planning.entry_flags(MapDirection.INGRESS, KAFKA, {}) == no
    assert planning.entry_flags(egress, PLAIN.model_copy(update={"verdict": Verdict.DENY}), {}) \
        == planning.POLICY_DENY
    policy = DirectionPolicy(enforced=True, entries=(DNS, HTTP, PLAIN))
    allow, _deny = planning.direction_maps(3, egress, policy, {})
    assert {k.port: (v.flags, v.proxy_port) for k, v in allow.items()} == {53: (no, 0), 80: (no, 0), 443: (0, 0)}


def test_an_l4_allow_of_the_same_key_wins_over_a_missing_proxy() -> None:
    """As the operator merges them: an L4-only allow of the same port opens it at L4 (no L7 rules to enforce)."""
    plain53 = PolicyEntry(identity=0, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW)
    for entries in ((DNS, plain53), (plain53, DNS)):
        allow, _ = planning.direction_maps(3, MapDirection.EGRESS, DirectionPolicy(enforced=True, entries=entries))
        assert [v.flags for v in allow.values()] == [0]


def test_map_values_carry_the_port() -> None:
    policy = DirectionPolicy(enforced=True, entries=(DNS, INGRESS_HTTP, PLAIN))
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
    consts = (rendering.DATAPATH_C_DIR / "include/consts.h").read_text()
    for name, value in (("HTTP", planning.POLICY_HTTP), ("NO_PROXY", planning.POLICY_NO_PROXY)):
        found = re.search(rf"#define CY_POLICY_{name} \(1U << (\d+)\)", consts)
        assert found and 1 << int(found.group(1)) == value, name


def test_plan_passes_proxy_ports_through() -> None:
    intent = intents.NodeIntent(node="n", revision=1, endpoints=(intents.EndpointIntent(
        namespace="ns", pod="p", ipv4="10.244.1.2", identity=300,
        egress=DirectionPolicy(enforced=True, entries=(DNS,))),))
    veths = {IPv4Address("10.244.1.2"): planning.HostVeth("cy0", 5)}
    plan = planning.plan(intent, planning.DatapathState(), programs={h: "x" for h in planning.HOOKS},
                         veths=veths, proxy_ports={"dns": 10053})
    values = [v for _k, v in plan.policy.upserts.items()]
    assert values and all(v.proxy_port == 10053 for v in values)


def test_entries_sharing_a_key_never_merge_into_a_plain_allow_that_skips_the_proxy() -> None:
    """Two entries of one peer whose port ranges share an LPM key: readable HTTP rules (redirect / POLICY_HTTP)
    and rules no proxy here reads (NO_PROXY). The key keeps the redirect, whatever the cookies' order."""
    readable = INGRESS_HTTP.model_copy(update={"port_low": 80, "port_high": 95})
    unreadable = HTTP.model_copy(update={"port_low": 80, "port_high": 127})  # http None: e.g. inside TLS
    ref = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="d", name="p", uid="u", rule_index=0,
                          section="s")
    for first, second in ((readable, unreadable), (unreadable, readable)):
        for cookie_order in ((0, 1), (1, 0)):
            entries = tuple(e.model_copy(update={"rules": (ref.model_copy(update={"rule_index": c}),)})
                            for e, c in zip((first, second), cookie_order, strict=True))
            policy = DirectionPolicy(enforced=True, entries=entries)
            egress, _ = planning.direction_maps(3, MapDirection.EGRESS, policy, {"http": 15001})
            ingress, _ = planning.direction_maps(3, MapDirection.INGRESS, policy, {"http": 15001})
            assert any(k.port == 80 and k.port_bits == 12 for k in egress)  # the block 80-95 both entries hold
            for key, value in egress.items():
                if key.port < 96:  # covered by both: redirected, never plain
                    assert value.proxy_port == 15001 and not value.flags & planning.POLICY_NO_PROXY, (key, value)
            for key, value in ingress.items():
                if key.port < 96:
                    assert value.flags & planning.POLICY_HTTP and not value.flags & planning.POLICY_NO_PROXY
