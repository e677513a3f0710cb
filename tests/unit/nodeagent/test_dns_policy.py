"""dns_policy: Cilium's name and pattern semantics, and the rules a query falls under."""

from __future__ import annotations

import pytest

from ciliary.nodeagent import dns_policy
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, DNSRule, IpcacheEntry, PolicyEntry, Protocol, Verdict


def name(n: str) -> DNSRule:
    return DNSRule(match_name=n)


def pattern(p: str) -> DNSRule:
    return DNSRule(match_pattern=p)


@pytest.mark.parametrize(("rule", "query", "expected"), [
    (name("api.world.test"), "api.world.test", True),
    (name("api.world.test"), "API.World.Test.", True),       # case-blind, final dot optional
    (name("api.world.test."), "api.world.test", True),
    (name("api.world.test"), "x.api.world.test", False),
    (name("api.world.test"), "api.world.tes", False),
    (pattern("*.world.test"), "api.world.test", True),
    (pattern("*.world.test"), "world.test", False),          # * needs its dot: not the apex
    (pattern("*.world.test"), "a.b.world.test", False),      # * never crosses a dot
    (pattern("*.world.test"), ".world.test", True),          # zero characters
    (pattern("api-*.world.test"), "api-eu1.world.test", True),
    (pattern("api-*.world.test"), "api.world.test", False),
    (pattern("*"), "anything.at.all", True),                 # a lone * is every name
    (pattern("*"), "x", True),
    (pattern("sub.*.test"), "sub.world.test", True),
    (pattern("*.world.test"), "api.worldxtest", False),      # the dot is literal
    (pattern("a*b.test"), "a_-9b.test", True),
    (DNSRule(), "api.world.test", False),                    # neither set: matches nothing
])
def test_rule_matches(rule: DNSRule, query: str, expected: bool) -> None:
    assert dns_policy.rule_matches(rule, query) is expected


DNS53 = PolicyEntry(identity=0, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW, l7_redirect=True,
                    l7_parser="dns", dns=(pattern("*.world.test"),))
DNS53_SERVER = PolicyEntry(identity=16777217, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW,
                           l7_redirect=True, l7_parser="dns", dns=(name("mirror.example.test"),))


def intent(*entries: PolicyEntry) -> intents.NodeIntent:
    return intents.NodeIntent(
        node="n", revision=1,
        endpoints=(intents.EndpointIntent(namespace="ns", pod="p", ipv4="10.244.1.2", identity=300,
                                          egress=DirectionPolicy(enforced=True, entries=entries)),),
        ipcache=(IpcacheEntry(cidr="192.0.2.53/32", identity=16777217),
                 IpcacheEntry(cidr="10.244.1.2/32", identity=300)))


def test_rules_of_every_covering_dns_entry_add_up() -> None:
    v = dns_policy.query_verdict(intent(DNS53, DNS53_SERVER), "10.244.1.2", "192.0.2.53", 53, 17)
    assert v.peer == 16777217
    assert v.allows("api.world.test") and v.allows("mirror.example.test") and not v.allows("evil.test")
    other = dns_policy.query_verdict(intent(DNS53, DNS53_SERVER), "10.244.1.2", "198.51.100.7", 53, 17)
    assert other.peer == dns_policy.WORLD
    assert other.allows("api.world.test") and not other.allows("mirror.example.test")


def test_fail_closed_cases_refuse_everything() -> None:
    plain = PolicyEntry(identity=0, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW)
    deny = PolicyEntry(identity=16777217, verdict=Verdict.DENY)
    cases = [
        dns_policy.query_verdict(None, "10.244.1.2", "192.0.2.53", 53, 17),              # nothing applied
        dns_policy.query_verdict(intent(DNS53), "10.244.1.9", "192.0.2.53", 53, 17),     # unknown pod
        dns_policy.query_verdict(intent(DNS53), "10.244.1.2", "192.0.2.53", 53, 6),      # TCP not covered
        dns_policy.query_verdict(intent(plain), "10.244.1.2", "192.0.2.53", 53, 17),     # no DNS rules
        dns_policy.query_verdict(intent(DNS53, deny), "10.244.1.2", "192.0.2.53", 53, 17),  # deny beats
    ]
    for verdict in cases:
        assert not verdict.allows("api.world.test") and verdict.reason, verdict


def test_ipcache_longest_prefix() -> None:
    cache = (IpcacheEntry(cidr="192.0.2.0/24", identity=16777218), IpcacheEntry(cidr="192.0.2.53/32", identity=7))
    assert dns_policy.ipcache_identity(cache, "192.0.2.53") == 7
    assert dns_policy.ipcache_identity(cache, "192.0.2.54") == 16777218
    assert dns_policy.ipcache_identity(cache, "203.0.113.1") == dns_policy.WORLD
