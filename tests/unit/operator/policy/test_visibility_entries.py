"""proxy-visibility laid over policy entries: redirects for observation, verdicts and L7 rules unchanged."""

from __future__ import annotations

from dataclasses import replace

from test_policy_resolution import DB, PODS, WEB, cnp, state_of, verdict  # type: ignore[import-not-found]

from ciliary.operator.api.visibility import VisibilityTuple
from ciliary.operator.intents import (
    Direction,
    DirectionPolicy,
    DNSRule,
    EndpointIntent,
    HttpRule,
    PolicyEntry,
    Protocol,
    Verdict,
)
from ciliary.operator.kube.cluster_model import pod_from_body
from ciliary.operator.policy import tracing
from ciliary.operator.policy.identities import InMemoryIdentityAllocator
from ciliary.operator.policy.resolution import Resolver, resolve_cluster
from ciliary.operator.policy.visibility import apply_visibility

HTTP80 = VisibilityTuple("ingress", 80, "TCP", "http")
PG = VisibilityTuple("ingress", 5432, "TCP", "http")
DNS53 = VisibilityTuple("egress", 53, "UDP", "dns")


def annotated(name: str, ns: str, *tuples: VisibilityTuple) -> list:  # type: ignore[type-arg]
    return [replace(p, visibility=tuples) if (p.name, p.namespace) == (name, ns) else p for p in PODS]


def endpoint(state, name: str, ns: str = "a") -> EndpointIntent:  # type: ignore[no-untyped-def]
    intents = resolve_cluster(state)
    return next(e for i in intents.values() for e in i.endpoints if (e.pod, e.namespace) == (name, ns))


def test_a_direction_no_policy_enforces_stays_allow_all_with_a_redirect_on_the_port() -> None:
    db = endpoint(state_of(pods=annotated("db", "a", HTTP80, DNS53)), "db")
    assert db.ingress.enforced and db.egress.enforced
    plain = [(e.identity, e.protocol, e.port_low, e.verdict, e.l7_redirect) for e in db.ingress.entries
             if not e.visibility]
    assert plain == [(0, Protocol.ANY, 0, Verdict.ALLOW, False), (1, Protocol.ANY, 0, Verdict.ALLOW, False)]
    (seen,) = [e for e in db.ingress.entries if e.visibility]
    assert (seen.identity, seen.protocol, seen.port_low, seen.port_high) == (0, Protocol.TCP, 80, 80)
    assert (seen.l7_redirect, seen.l7_parser, seen.http, seen.rules) == (True, "http", (HttpRule(),), ())
    (dns,) = [e for e in db.egress.entries if e.visibility]
    assert (dns.protocol, dns.port_low, dns.l7_parser, dns.dns) == (
        Protocol.UDP, 53, "dns", (DNSRule(match_pattern="*"),))
    # the unannotated pods are untouched
    assert not endpoint(state_of(pods=annotated("db", "a", HTTP80)), "web").ingress.enforced


def test_allowed_peers_get_their_own_redirect_and_denied_ones_stay_denied() -> None:
    policy = cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB], "toPorts": [
        {"ports": [{"port": "5432", "protocol": "TCP"}]}]}]})
    before = endpoint(state_of(policy), "db")
    state = state_of(policy, pods=annotated("db", "a", PG, HTTP80))
    db = endpoint(state, "db")
    web_id = endpoint(state, "web").identity
    (seen,) = [e for e in db.ingress.entries if e.visibility]
    assert (seen.identity, seen.port_low, seen.verdict) == (web_id, 5432, Verdict.ALLOW)
    assert seen.rules and seen.rules[0].name == "p"  # flows still name the allowing policy, L7 flows too
    assert seen.http == tuple(HttpRule(rule=r) for r in seen.rules)
    assert [e for e in db.ingress.entries if not e.visibility] == [
        e for e in before.ingress.entries if (e.identity, e.port_low) != (web_id, 5432)]
    assert db.policies == before.policies
    assert verdict(state, "a/web", "a/db", 5432) and not verdict(state, "a/cli", "a/db", 5432)
    assert not verdict(state, "a/web", "a/db", 80)  # port 80 is not allowed: visibility opens nothing


def test_a_port_with_l7_rules_keeps_exactly_its_rules() -> None:
    policy = cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB], "toPorts": [
        {"ports": [{"port": "5432", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}}]}]})
    before = endpoint(state_of(policy), "db")
    after = endpoint(state_of(policy, pods=annotated("db", "a", PG)), "db")
    assert after.ingress == before.ingress


def test_deny_entries_and_the_host_are_left_alone() -> None:
    deny = PolicyEntry(identity=2000, verdict=Verdict.DENY)
    host = PolicyEntry(identity=1, verdict=Verdict.ALLOW)
    wide = PolicyEntry(identity=2000, protocol=Protocol.TCP, port_low=1, port_high=1000, verdict=Verdict.ALLOW)
    policy = DirectionPolicy(enforced=True, entries=(deny, host, wide))
    out = apply_visibility(policy, [HTTP80], Direction.INGRESS)
    assert deny in out.entries and host in out.entries and wide in out.entries
    (seen,) = [e for e in out.entries if e.visibility]
    assert (seen.identity, seen.port_low, seen.port_high) == (2000, 80, 80)
    # nothing for the other direction, and nothing at all without tuples
    assert apply_visibility(policy, [HTTP80], Direction.EGRESS) is policy
    assert apply_visibility(DirectionPolicy(), [], Direction.INGRESS) == DirectionPolicy()


def test_an_entry_with_the_very_key_is_replaced_and_a_mixed_decision_is_skipped() -> None:
    exact = PolicyEntry(identity=2000, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW)
    out = apply_visibility(DirectionPolicy(enforced=True, entries=(exact,)), [HTTP80], Direction.INGRESS)
    assert [(e.identity, e.port_low, e.visibility) for e in out.entries] == [(2000, 80, True)]
    l7 = PolicyEntry(identity=2000, protocol=Protocol.TCP, port_low=1, port_high=100, verdict=Verdict.ALLOW,
                     l7_redirect=True, l7_parser="http", http=(HttpRule(method="GET"),))
    mixed = DirectionPolicy(enforced=True, entries=(l7, exact.model_copy(update={"port_low": 70,
                                                                                 "port_high": 90})))
    assert apply_visibility(mixed, [HTTP80], Direction.INGRESS).entries == mixed.entries


def test_a_peer_joined_with_any_peer_l7_rules_in_envoys_chain_gets_no_redirect() -> None:
    """The node's Envoy builds a peer's chain from its entries and the any-peer ones together: a redirect for a
    peer the policy exempted from any-peer L7 rules (here a header ADD) would apply them to it. Nothing added."""
    header_add = PolicyEntry(identity=0, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW,
                             l7_redirect=True, l7_parser="http", http=(HttpRule(method="GET"),))
    exempt = PolicyEntry(identity=2000, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW)
    policy = DirectionPolicy(enforced=True, entries=(header_add, exempt))
    assert apply_visibility(policy, [HTTP80], Direction.INGRESS).entries == policy.entries


def test_the_annotation_reaches_resolution_through_the_pod_body() -> None:
    body = {"metadata": {"namespace": "a", "name": "db", "uid": "u-a-db", "labels": {"app": "db"},
                         "annotations": {"io.cilium.proxy-visibility": "<Ingress/80/TCP/HTTP>"}},
            "spec": {"nodeName": "n2"}, "status": {"podIP": "10.0.2.1", "phase": "Running"}}
    assert pod_from_body(body).visibility == (HTTP80,)
    body["metadata"]["annotations"] = {"policy.cilium.io/proxy-visibility": "<Ingress/80/TCP/Kafka>"}
    refused = pod_from_body(body)
    assert refused.visibility == ()
    state = state_of(pods=[refused if p.uid == "u-a-db" else p for p in PODS])
    assert not endpoint(state, "db").ingress.enforced  # a refused annotation changes nothing


def test_the_marker_survives_the_wire() -> None:
    seen = PolicyEntry(identity=0, verdict=Verdict.ALLOW, visibility=True)
    assert PolicyEntry.model_validate(seen.model_dump(mode="json")) == seen
    assert PolicyEntry.model_validate({"identity": 0, "verdict": "allow"}).visibility is False


def test_incremental_resolution_follows_the_annotation_both_ways() -> None:
    allocator = InMemoryIdentityAllocator()
    resolver = Resolver(allocator)
    bare, seen = state_of(), state_of(pods=annotated("db", "a", HTTP80))
    for state in (bare, seen, bare, seen):
        got = resolver.update(state).intents
        assert {n: i.content_hash() for n, i in got.items()} == {
            n: i.content_hash() for n, i in resolve_cluster(state, allocator).items()}
    assert "n2" in resolver.update(bare).changed  # db's node
    assert not endpoint(bare, "db").ingress.enforced


def test_trace_says_the_connection_is_observed() -> None:
    policy = cnp({"endpointSelector": DB, "ingress": [{"fromEndpoints": [WEB], "toPorts": [
        {"ports": [{"port": "5432", "protocol": "TCP"}]}]}]})
    ingress = tracing.trace(state_of(policy, pods=annotated("db", "a", PG)), "a/web", "a/db", 5432).ingress
    assert ingress is not None and ingress.visibility and not ingress.http
    assert "observed at L7" in ingress.describe() and "p rule 0 ingress[0]" in ingress.describe()
    bare = tracing.trace(state_of(pods=annotated("db", "a", HTTP80)), "a/web", "a/db", 80).ingress
    assert bare is not None and bare.visibility and "no rule denies it" in bare.describe()
    other = tracing.trace(state_of(pods=annotated("db", "a", HTTP80)), "a/web", "a/db", 81).ingress
    assert other is not None and other.verdict == "ALLOWED" and not other.visibility
