"""kernelview: the maps the planner writes, decoded back, mean exactly what the intent meant.

The maps always come from the planner (``planning.desired_maps``), so a decoding that
lost or widened a port block, an ICMP type or a deny entry fails here.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.nodeagent import kernelview, planning
from ciliary.nodeagent.planning import (
    DatapathState,
    HostVeth,
    IpcacheValue,
    MapDirection,
    PolicyKey,
    PolicyValue,
)
from ciliary.operator import intents
from ciliary.operator.intents import Direction, DirectionPolicy, PolicyEntry, Protocol, Verdict
from ciliary.operator.policy import divergence, tracing

A, B = IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3")
VETHS = {A: HostVeth("cy00000000001", 11), B: HostVeth("cy00000000002", 12)}
RULE = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="ns", name="r", rule_index=0, section="ingress[0]")


@st.composite
def entries(draw: st.DrawFn) -> PolicyEntry:
    identity = draw(st.sampled_from([0, 1001, 1002]))
    protocol = draw(st.sampled_from(list(Protocol)))
    verdict = draw(st.sampled_from(list(Verdict)))
    rules = draw(st.sampled_from([(), (RULE,)]))
    if protocol is Protocol.ICMP and draw(st.booleans()):
        return PolicyEntry(identity=identity, protocol=protocol, icmp_type=draw(st.sampled_from([0, 3, 8])),
                           verdict=verdict, rules=rules)
    low = draw(st.sampled_from([0, 0, 1, 53, 80, 1000, 65535]))
    high = 0 if low == 0 or draw(st.booleans()) else min(65535, low + draw(st.integers(0, 5000)))
    return PolicyEntry(identity=identity, protocol=protocol, port_low=low, port_high=high, verdict=verdict,
                       rules=rules)


directions = st.builds(DirectionPolicy, enforced=st.booleans(), entries=st.lists(entries(), max_size=6).map(tuple))


def observed(intent: intents.NodeIntent) -> DatapathState:
    ids = {IPv4Address(e.ipv4): i for i, e in enumerate(intent.endpoints, start=1)}
    ipcache, eps, allow, deny = planning.desired_maps(intent, ids, VETHS)
    return DatapathState(ipcache=ipcache, endpoints=eps, policy=allow, policy_deny=deny)


NOT_ENFORCED = DirectionPolicy()


def node(a_in: DirectionPolicy, a_out: DirectionPolicy, b_in: DirectionPolicy = NOT_ENFORCED,
         cidrs: tuple[str, ...] = ()) -> intents.NodeIntent:
    return intents.NodeIntent(
        node="n1", revision=4,
        endpoints=(intents.EndpointIntent(namespace="ns", pod="a", ipv4=str(A), identity=1001, ingress=a_in,
                                          egress=a_out),
                   intents.EndpointIntent(namespace="ns", pod="b", ipv4=str(B), identity=1002, ingress=b_in)),
        ipcache=tuple(intents.IpcacheEntry(cidr=c, identity=2000 + i) for i, c in enumerate(cidrs)))


NAMES = {A: kernelview.PodName("ns", "a"), B: kernelview.PodName("ns", "b")}


@settings(max_examples=300, deadline=None)
@given(directions, directions, directions, st.lists(st.sampled_from(["10.0.0.0/8", "10.0.0.0/24", "192.0.2.0/24",
                                                                     "0.0.0.0/0"]), unique=True).map(tuple),
       st.lists(st.tuples(st.sampled_from([0, 1001, 1002, 1003]), st.sampled_from([1, 6, 17]),
                          st.sampled_from([0, 1, 3, 8, 53, 80, 999, 1000, 6000, 65535])), min_size=10, max_size=10))
def test_decoded_maps_mean_what_the_intent_meant(a_in: DirectionPolicy, a_out: DirectionPolicy, b_in: DirectionPolicy,
                                                 cidrs: tuple[str, ...], packets: list[tuple[int, int, int]]) -> None:
    intent = node(a_in, a_out, b_in, cidrs)
    cookies = {planning.rule_cookie((RULE,)): (RULE,)}
    view = kernelview.kernel_intent("n1", observed(intent), revision=4, names=NAMES,
                                    rules_for=lambda c: cookies.get(c, ()))
    assert divergence.differences(intent, view.intent) == []
    assert view.inactive == () and view.orphaned == () and view.unrepresentable == ()
    for wanted, held in zip(intent.endpoints, view.intent.endpoints, strict=True):
        assert (held.namespace, held.pod, held.ipv4, held.identity) == (wanted.namespace, wanted.pod, wanted.ipv4,
                                                                        wanted.identity)
        for direction in Direction:
            for identity, protocol, port in packets:
                want = intents.evaluate_entries(wanted.direction(direction), identity=identity, protocol=protocol,
                                                port=port)
                got = intents.evaluate_entries(held.direction(direction), identity=identity, protocol=protocol,
                                               port=port)
                assert (got.allowed, got.reason) == (want.allowed, want.reason)
                for verdict in Verdict:  # and the same kind of entry matches (Hubble's match type)
                    held_v = [e for e in held.direction(direction).entries if e.verdict is verdict]
                    want_v = [e for e in wanted.direction(direction).entries if e.verdict is verdict]
                    assert tracing.match_kind(held_v, identity, protocol, port) == tracing.match_kind(
                        want_v, identity, protocol, port)
                if got.entry is not None:  # the cookie names the rules back (of one of the entries sharing a key)
                    assert got.entry.rules in ((), (RULE,))
    for ip in ("10.0.0.2", "10.0.0.9", "10.0.1.1", "192.0.2.5", "8.8.8.8"):
        assert tracing.lookup_identity(view.intent, IPv4Address(ip)) == (
            1001 if ip == "10.0.0.2" else tracing.lookup_identity(intent, IPv4Address(ip)))


def test_a_range_split_into_blocks_is_one_entry_again() -> None:
    entry = PolicyEntry(identity=1002, protocol=Protocol.TCP, port_low=8000, port_high=8100, verdict=Verdict.ALLOW,
                        rules=(RULE,))
    intent = node(DirectionPolicy(enforced=True, entries=(entry,)), DirectionPolicy())
    state = observed(intent)
    assert len(state.policy) > 1  # stored as several prefix blocks
    view = kernelview.kernel_intent("n1", state, names=NAMES,
                                    rules_for={planning.rule_cookie((RULE,)): (RULE,)}.get)
    assert view.intent.endpoints[0].ingress.entries == (entry,)
    doc = kernelview.kernel_document(view, applied_revision=4, wanted_revision=5, error="MapFull")
    assert doc["source"] == "datapath" and doc["appliedRevision"] == 4 and doc["error"] == "MapFull"
    assert doc["intent"]["endpoints"][0]["pod"] == "a" and doc["endpoints"][0]["epId"] == 1


def test_deny_entries_behind_a_clear_flag_are_not_shown_as_enforced() -> None:
    deny_b = PolicyEntry(identity=1002, verdict=Verdict.DENY)
    allow_all = PolicyEntry(identity=0, verdict=Verdict.ALLOW)
    intent = node(DirectionPolicy(enforced=True, entries=(deny_b, allow_all)), DirectionPolicy())
    state = observed(intent)
    flags_cleared = {ip: planning.EndpointValue(v.ep_id, v.identity, v.flags & ~planning.EP_DENY_FLAGS, v.ifindex)
                     for ip, v in state.endpoints.items()}
    view = kernelview.kernel_intent("n1", DatapathState(ipcache=state.ipcache, endpoints=flags_cleared,
                                                        policy=state.policy, policy_deny=state.policy_deny),
                                    names=NAMES)
    assert view.inactive and "ns/a ingress" in view.inactive[0]
    held = view.intent.endpoints[0].ingress
    assert intents.evaluate_entries(held, identity=1002, protocol=6, port=80).allowed  # what the kernel does
    assert any("deny identity 1002" in d for d in divergence.differences(intent, view.intent))


def test_orphaned_keys_unknown_protocols_and_unnamed_endpoints_are_listed() -> None:
    state = DatapathState(
        ipcache={IPv4Network("10.1.0.0/16"): IpcacheValue(3000)},
        endpoints={A: planning.EndpointValue(7, 1001, planning.EP_INGRESS_ENFORCED, 11)},
        policy={PolicyKey(9, MapDirection.INGRESS, 0, 6, 0, 0): PolicyValue(1),
                PolicyKey(7, MapDirection.INGRESS, 0, 47, 0, 0): PolicyValue(1),
                PolicyKey(7, MapDirection.INGRESS, 1002, 6, 0, 16): PolicyValue(1)})
    view = kernelview.kernel_intent("n1", state)
    assert len(view.orphaned) == 1 and "endpoint id 9" in view.orphaned[0]
    assert any("protocol 47" in u for u in view.unrepresentable)
    assert any("port 0" in u for u in view.unrepresentable)
    endpoint = view.intent.endpoints[0]
    assert endpoint.pod == str(A) and endpoint.ingress.enforced and not endpoint.egress.enforced
    assert {e.cidr: e.identity for e in view.intent.ipcache} == {"10.1.0.0/16": 3000, f"{A}/32": 1001}


def test_an_allow_without_its_proxy_is_shown_as_the_drop_the_kernel_makes() -> None:
    """A DNS entry on a node without a DNS proxy (POLICY_NO_PROXY) is not read back as an allow of port 53."""
    dns = PolicyEntry(identity=0, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW, l7_redirect=True,
                      l7_parser="dns", rules=(RULE,))
    plain = PolicyEntry(identity=1002, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW, rules=(RULE,))
    intent = node(DirectionPolicy(), DirectionPolicy(enforced=True, entries=(dns, plain)))
    view = kernelview.kernel_intent("n1", observed(intent), names=NAMES)  # no proxy ports: none runs
    held = view.intent.endpoints[0].egress
    assert not intents.evaluate_entries(held, identity=1002, protocol=17, port=53).allowed
    assert intents.evaluate_entries(held, identity=1002, protocol=6, port=80).allowed
    assert any("ns/a egress" in u and "PROXY_UNAVAILABLE" in u for u in view.unrepresentable)
