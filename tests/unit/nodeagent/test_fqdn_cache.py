"""fqdn_cache: TTLs with a minimum, extension, expiry, the per-endpoint cap; fqdn_expansion: what it grants."""

from __future__ import annotations

from ciliary.nodeagent import fqdn_cache, fqdn_expansion
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, DNSRule, IpcacheEntry, PolicyEntry, Protocol, Verdict

POD, OTHER = "10.244.1.2", "10.244.1.3"


def test_ttl_with_minimum_and_expiry() -> None:
    cache = fqdn_cache.FQDNCache(min_ttl=10, max_ips=10)
    assert cache.record(POD, ["API.world.test."], [("192.0.2.100", 3)], now=100.0)
    assert cache.names_by_address() == {POD: {"192.0.2.100": frozenset({"api.world.test"})}}
    assert cache.next_expiry() == 110.0  # the 3 s TTL is raised to the 10 s minimum
    assert not cache.expire(109.9)
    assert cache.expire(110.0)
    assert cache.names_by_address() == {}


def test_answers_extend_never_shorten() -> None:
    cache = fqdn_cache.FQDNCache(min_ttl=0, max_ips=10)
    cache.record(POD, ["a.test"], [("192.0.2.1", 30)], now=0.0)
    assert not cache.record(POD, ["a.test"], [("192.0.2.1", 5)], now=1.0)  # same pair: nothing new
    assert cache.next_expiry() == 30.0
    cache.record(POD, ["a.test"], [("192.0.2.1", 60)], now=1.0)
    assert cache.next_expiry() == 61.0


def test_per_endpoint_and_cap_drops_the_soonest_expiring() -> None:
    cache = fqdn_cache.FQDNCache(min_ttl=0, max_ips=2)
    cache.record(POD, ["a.test"], [("192.0.2.1", 10)], now=0.0)
    cache.record(POD, ["b.test"], [("192.0.2.2", 50)], now=0.0)
    cache.record(OTHER, ["a.test"], [("192.0.2.1", 10)], now=0.0)
    cache.record(POD, ["c.test"], [("192.0.2.3", 20)], now=0.0)
    assert set(cache.names_by_address()[POD]) == {"192.0.2.2", "192.0.2.3"}
    assert set(cache.names_by_address()[OTHER]) == {"192.0.2.1"}  # another pod's cache is its own
    assert cache.evicted == 1
    assert cache.forget([OTHER]) and POD not in cache.names_by_address()


SELECTOR_API, SELECTOR_SHORT = (2 << 24) + 1, (2 << 24) + 2
CIDR_ID = (1 << 24) + 1


def node_intent() -> intents.NodeIntent:
    to_fqdn = PolicyEntry(identity=SELECTOR_API, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW)
    to_short = PolicyEntry(identity=SELECTOR_SHORT, protocol=Protocol.TCP, port_low=443, verdict=Verdict.ALLOW)
    cidr_deny = PolicyEntry(identity=CIDR_ID, protocol=Protocol.TCP, port_low=22, verdict=Verdict.DENY)
    world_in = PolicyEntry(identity=2, protocol=Protocol.TCP, port_low=8080, verdict=Verdict.ALLOW)
    return intents.NodeIntent(
        node="n", revision=1,
        endpoints=(
            intents.EndpointIntent(namespace="ns", pod="a", ipv4=POD, identity=300,
                                   ingress=DirectionPolicy(enforced=True, entries=(world_in,)),
                                   egress=DirectionPolicy(enforced=True, entries=(to_fqdn, to_short, cidr_deny))),
            intents.EndpointIntent(namespace="ns", pod="b", ipv4=OTHER, identity=300,
                                   egress=DirectionPolicy(enforced=True, entries=(to_fqdn,))),
        ),
        ipcache=(IpcacheEntry(cidr="198.51.100.0/24", identity=CIDR_ID),
                 IpcacheEntry(cidr="10.244.1.9/32", identity=301)),
        fqdn_selectors={SELECTOR_API: DNSRule(match_name="api.world.test"),
                        SELECTOR_SHORT: DNSRule(match_pattern="short.*.test")})


def entries_for(intent: intents.NodeIntent, pod: str, direction: str, identity: int) -> set[tuple[int, str]]:
    endpoint = next(e for e in intent.endpoints if e.ipv4 == pod)
    policy = endpoint.ingress if direction == "ingress" else endpoint.egress
    return {(e.port_low, e.verdict.value) for e in policy.entries if e.identity == identity}


def test_expansion_grants_per_endpoint_and_inherits_the_shadowed_identity() -> None:
    base = node_intent()
    learnt = {POD: {"192.0.2.100": frozenset({"api.world.test"}),
                    "198.51.100.7": frozenset({"short.world.test"}),
                    "10.244.1.9": frozenset({"api.world.test"}),       # a pod address: ignored
                    "203.0.113.5": frozenset({"www.world.test"})}}      # matches no selector: nothing
    ids = fqdn_expansion.LearntIdentities()
    out = fqdn_expansion.expand(base, learnt, ids)
    learnt_ids = {e.cidr: e.identity for e in out.ipcache if e.identity >= fqdn_expansion.FIRST_LEARNT_IDENTITY}
    assert set(learnt_ids) == {"192.0.2.100/32", "198.51.100.7/32"}
    api, short = learnt_ids["192.0.2.100/32"], learnt_ids["198.51.100.7/32"]
    assert entries_for(out, POD, "egress", api) == {(80, "allow")}
    # the CIDR address keeps its CIDR identity's deny and gains the selector's allow
    assert entries_for(out, POD, "egress", short) == {(443, "allow"), (22, "deny")}
    # inherited from world on ingress (the address was world before)
    assert entries_for(out, POD, "ingress", api) == {(8080, "allow")}
    # the other pod resolved nothing: no grant, although it uses the same selector
    assert entries_for(out, OTHER, "egress", api) == set()
    assert out.identity_labels[api][0] == "fqdn:api.world.test"
    # stable numbers while in use; an expired address gives its identity and entries back
    again = fqdn_expansion.expand(base, {POD: {"192.0.2.100": frozenset({"api.world.test"})}}, ids)
    assert {e.cidr: e.identity for e in again.ipcache if e.identity == api} == {"192.0.2.100/32": api}
    assert fqdn_expansion.expand(base, {}, ids) == base


def test_policy_get_does_not_count_learnt_addresses_as_divergence() -> None:
    from ciliary.operator.policy import divergence

    base = node_intent()
    out = fqdn_expansion.expand(base, {POD: {"192.0.2.100": frozenset({"api.world.test"})}},
                                fqdn_expansion.LearntIdentities())
    assert out != base
    assert divergence.differences(base, out) == []
    assert divergence.operator_part(out).ipcache == base.ipcache
