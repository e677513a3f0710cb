"""proxy-visibility entries through the planner and the datapath's lookup model.

For any policy (plain, L7 and deny entries, enforced or not) and any visibility tuples: every verdict
is the one before, a hit that carried L7 rules carries the same ones, and with no L7 entry every allowed
peer on an annotated port is redirected (except the host on ingress). A node without the proxy passes
visibility entries at L4 (never PROXY_UNAVAILABLE); no policy's status needs a proxy for them.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.nodeagent import lookup_model, planning, reporting
from ciliary.nodeagent.planning import DatapathState, HostVeth, MapDirection
from ciliary.operator import intents
from ciliary.operator.api.visibility import VisibilityTuple
from ciliary.operator.intents import (
    Direction,
    DirectionPolicy,
    HttpRule,
    PolicyEntry,
    Protocol,
    RuleRef,
    Verdict,
)
from ciliary.operator.policy.visibility import apply_visibility

A = IPv4Address("10.0.0.2")
VETHS = {A: HostVeth("cy00000000001", 11)}
PROXIES = {"http": 15002, "dns": 10053}
PEERS = (1, 2, 1001, 1002, 1003)
PORTS = (53, 79, 80, 81, 443)
REF = RuleRef(kind="CiliumNetworkPolicy", namespace="ns", name="p", uid="u1", rule_index=0, section="ingress[0]")


@st.composite
def entries(draw: st.DrawFn) -> PolicyEntry:
    verdict = draw(st.sampled_from([Verdict.ALLOW, Verdict.ALLOW, Verdict.DENY]))
    protocol = draw(st.sampled_from([Protocol.ANY, Protocol.TCP, Protocol.UDP]))
    kind = draw(st.sampled_from(["any", "one", "range"]))
    low = high = 0
    if kind == "one":
        low = draw(st.sampled_from(PORTS))
    elif kind == "range":
        low = draw(st.integers(1, 100))
        high = low + draw(st.integers(0, 400))
    l7 = verdict is Verdict.ALLOW and protocol is Protocol.TCP and low != 0 and draw(st.booleans())
    return PolicyEntry(identity=draw(st.sampled_from([0, 1001, 1002, 2])), protocol=protocol, port_low=low,
                       port_high=high, verdict=verdict, rules=(REF,), l7_redirect=l7,
                       l7_parser="http" if l7 else None, http=(HttpRule(method="GET", rule=REF),) if l7 else None)


TUPLES = st.lists(st.sampled_from([VisibilityTuple("ingress", 80, "TCP", "http"),
                                   VisibilityTuple("ingress", 443, "TCP", "http"),
                                   VisibilityTuple("egress", 80, "TCP", "http"),
                                   VisibilityTuple("egress", 53, "UDP", "dns"),
                                   VisibilityTuple("egress", 53, "TCP", "dns")]), max_size=3)


def programmed(direction: Direction, policy: DirectionPolicy, proxies: planning.ProxyPorts) -> DatapathState:
    ep = intents.EndpointIntent(namespace="ns", pod="a", ipv4=str(A), identity=1000,
                                **{direction.value: policy})  # type: ignore[arg-type]
    node = intents.NodeIntent(node="n1", revision=1, endpoints=(ep,))
    _, eps, allow, deny = planning.desired_maps(node, {A: 1}, VETHS, proxies)
    return DatapathState(endpoints=eps, policy=allow, policy_deny=deny)


def decide(state: DatapathState, direction: MapDirection, peer: int, proto: int, port: int
           ) -> tuple[lookup_model.LookupResult, planning.PolicyValue | None]:
    ep = state.endpoints[A]
    got = lookup_model.simulate_lookup(state.policy, state.policy_deny, flags=ep.flags, ep_id=ep.ep_id,
                                       direction=direction, identity=peer, protocol=proto, port=port)
    hit, _ = lookup_model._probe(state.policy, ep.ep_id, direction, peer, proto, port)
    return got, hit


def redirected(direction: MapDirection, hit: planning.PolicyValue | None) -> bool:
    return hit is not None and bool(hit.flags & planning.POLICY_HTTP or hit.proxy_port)


@settings(max_examples=300, deadline=None)
@given(st.lists(entries(), max_size=8), st.booleans(), TUPLES, st.sampled_from(list(Direction)))
def test_visibility_never_changes_a_verdict_nor_l7_rules(found: list[PolicyEntry], enforced: bool,
                                                         tuples: list[VisibilityTuple], direction: Direction) -> None:
    before = DirectionPolicy(enforced=enforced, entries=tuple(found))
    after = apply_visibility(before, tuples, direction)
    mdir = MapDirection.of(direction)
    old, new = programmed(direction, before, PROXIES), programmed(direction, after, PROXIES)
    any_l7 = enforced and any(e.l7_redirect for e in found)
    for peer in PEERS:
        for proto in (1, 6, 17):
            for port in PORTS:
                (was, hit_was), (now, hit_now) = decide(old, mdir, peer, proto, port), decide(new, mdir, peer, proto,
                                                                                            port)
                assert (was.allowed, was.reason == "denied-by-rule") == (now.allowed, now.reason == "denied-by-rule")
                # entries of an unenforced direction are never looked up
                hit_was, hit_now = (hit_was if enforced else None), (hit_now if after.enforced else None)
                if redirected(mdir, hit_was):
                    assert hit_now == hit_was  # L7 rules decided: exactly those
                annotated = any(t.direction == direction.value and t.port == port and
                                {"TCP": 6, "UDP": 17}[t.protocol] == proto for t in tuples)
                observed = redirected(mdir, hit_now)
                if not annotated:
                    assert observed == redirected(mdir, hit_was)
                elif now.allowed and not any_l7 and not (direction is Direction.INGRESS and peer == 1):
                    assert observed, (peer, proto, port)


def test_a_node_without_the_proxy_passes_visibility_at_l4_and_status_needs_no_proxy() -> None:
    http = VisibilityTuple("ingress", 80, "TCP", "http")
    policy = apply_visibility(DirectionPolicy(enforced=True, entries=(
        PolicyEntry(identity=1001, verdict=Verdict.ALLOW, rules=(REF,)),)), [http], Direction.INGRESS)
    (seen,) = [e for e in policy.entries if e.visibility]
    assert seen.rules == (REF,)
    assert planning.entry_flags(MapDirection.INGRESS, seen, PROXIES) == planning.POLICY_HTTP
    assert planning.entry_flags(MapDirection.INGRESS, seen, {}) == 0
    dns = apply_visibility(DirectionPolicy(), [VisibilityTuple("egress", 53, "UDP", "dns")], Direction.EGRESS)
    (seen_dns,) = [e for e in dns.entries if e.visibility]
    assert planning.proxy_port_of(MapDirection.EGRESS, seen_dns, PROXIES) == 10053
    assert planning.entry_flags(MapDirection.EGRESS, seen_dns, {"http": 15002}) == 0
    # the same entry written by a policy fails closed without its proxy
    assert planning.entry_flags(MapDirection.EGRESS, seen_dns.model_copy(update={"visibility": False}),
                                {"http": 15002}) == planning.POLICY_NO_PROXY
    ep = intents.EndpointIntent(namespace="ns", pod="a", ipv4=str(A), identity=1000, ingress=policy,
                                policies=("u1",))
    node = intents.NodeIntent(node="n1", revision=1, endpoints=(ep,))
    assert reporting.proxy_needs(node, "u1") == (set(), set())
    ep_policy = ep.model_copy(update={"ingress": policy.model_copy(update={"entries": tuple(
        e.model_copy(update={"visibility": False}) for e in policy.entries)})})
    assert reporting.proxy_needs(node.model_copy(update={"endpoints": (ep_policy,)}), "u1") == ({"http"}, set())
