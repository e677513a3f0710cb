"""lookup_model: the datapath's decision over planned maps, vs evaluate_entries and during writes.

The maps and endpoint flags always come from the planner (``desired_maps`` or a
``plan``), so a wrong deny flag fails these tests like a wrong key would.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.nodeagent import planning
from ciliary.nodeagent.lookup_model import simulate_lookup
from ciliary.nodeagent.planning import DatapathState, EndpointValue, HostVeth, MapDirection
from ciliary.operator import intents
from ciliary.operator.intents import DirectionPolicy, PolicyEntry, Protocol, Verdict

A, B = IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3")
VETHS = {A: HostVeth("cy00000000001", 11), B: HostVeth("cy00000000002", 12)}
PROGRAMS = {hook: "a" * 64 for hook in planning.HOOKS}

IDENTITIES = st.sampled_from([0, 0, 1001, 1002, 1003])
PROTOCOLS = st.sampled_from(list(Protocol))


@st.composite
def entries(draw: st.DrawFn) -> PolicyEntry:
    protocol = draw(PROTOCOLS)
    kind = draw(st.sampled_from(["any", "one", "range", "wide"]))
    low = high = 0
    if kind == "one":
        low = draw(st.sampled_from([1, 53, 79, 80, 81, 443, 8080, 65535]))
    elif kind == "range":
        low = draw(st.integers(1, 700))
        high = low + draw(st.integers(0, 300))
    elif kind == "wide":
        low = draw(st.integers(1, 65535))
        high = draw(st.integers(low, 65535))
    return PolicyEntry(identity=draw(IDENTITIES), protocol=protocol, port_low=low, port_high=high,
                       verdict=draw(st.sampled_from(list(Verdict))))


PORTS = st.one_of(st.sampled_from([0, 1, 53, 79, 80, 81, 443, 8080, 65535]), st.integers(0, 65535),
                  st.integers(0, 1100))


def endpoint(ip: IPv4Address, ingress: DirectionPolicy | None = None,
             egress: DirectionPolicy | None = None) -> intents.EndpointIntent:
    return intents.EndpointIntent(namespace="ns", pod=str(ip), ipv4=str(ip), identity=1000 + int(ip) % 256,
                                  ingress=ingress or DirectionPolicy(), egress=egress or DirectionPolicy())


def programmed(*endpoints: intents.EndpointIntent) -> DatapathState:
    """The maps the planner writes for ``endpoints`` on an empty node."""
    node = intents.NodeIntent(node="n1", revision=1, endpoints=endpoints)
    ids = {IPv4Address(e.ipv4): i for i, e in enumerate(endpoints, start=1)}
    _, eps, allow, deny = planning.desired_maps(node, ids, VETHS)
    return DatapathState(endpoints=eps, policy=allow, policy_deny=deny)


def lookup(state: DatapathState, ip: IPv4Address, direction: MapDirection, identity: int, protocol: int,
           port: int) -> tuple[bool, str]:
    """cy_enforce for a forward packet of the pod at ``ip``; not an endpoint -> passed untouched."""
    ep = state.endpoints.get(ip)
    if ep is None:
        return True, "not-an-endpoint"
    got = simulate_lookup(state.policy, state.policy_deny, flags=ep.flags, ep_id=ep.ep_id, direction=direction,
                          identity=identity, protocol=protocol, port=port)
    return got.allowed, got.reason


# ---------------------------------------------------------------- the model vs evaluate_entries


@settings(max_examples=400, deadline=None)
@given(st.lists(entries(), max_size=12), st.booleans(), st.sampled_from([1001, 1002, 1003, 2]),
       st.sampled_from([1, 6, 17, 132, 47]), PORTS)
def test_lookup_model_equals_evaluate_entries(entry_list: list[PolicyEntry], enforced: bool,
                                              identity: int, protocol: int, port: int) -> None:
    policy = DirectionPolicy(enforced=enforced, entries=tuple(entry_list))
    state = programmed(endpoint(A, ingress=policy))
    got = lookup(state, A, MapDirection.INGRESS, identity, protocol, port)
    want = intents.evaluate_entries(policy, identity=identity, protocol=protocol, port=port)
    assert got == (want.allowed, want.reason)


@settings(max_examples=200, deadline=None)
@given(st.lists(entries(), max_size=8), st.lists(entries(), max_size=8), st.sampled_from([1001, 1003]),
       st.sampled_from([6, 17]), PORTS)
def test_other_endpoints_and_directions_never_leak(mine: list[PolicyEntry], theirs: list[PolicyEntry],
                                                   identity: int, protocol: int, port: int) -> None:
    """Entries (and deny flags) of another endpoint, or of the other direction, share the maps, not the answer."""
    policy = DirectionPolicy(enforced=True, entries=tuple(mine))
    other = DirectionPolicy(enforced=True, entries=tuple(theirs))
    state = programmed(endpoint(A, egress=policy, ingress=other), endpoint(B, egress=other))
    got = lookup(state, A, MapDirection.EGRESS, identity, protocol, port)
    want = intents.evaluate_entries(policy, identity=identity, protocol=protocol, port=port)
    assert got == (want.allowed, want.reason)


@settings(max_examples=200, deadline=None)
@given(st.lists(entries(), max_size=8), st.sampled_from([0, 3, 8, 11]), st.sampled_from([1001, 1002]))
def test_icmp_type_entries_match_by_type(entry_list: list[PolicyEntry], icmp_type: int, identity: int) -> None:
    """The datapath matches icmp_type; the reference is evaluate_entries with the type as port range."""
    typed = [PolicyEntry(identity=1001, protocol=Protocol.ICMP, icmp_type=8, verdict=Verdict.ALLOW)]
    policy = DirectionPolicy(enforced=True, entries=tuple(entry_list + typed))
    state = programmed(endpoint(A, ingress=policy))
    got = lookup(state, A, MapDirection.INGRESS, identity, 1, icmp_type)
    normalised = DirectionPolicy(enforced=True, entries=tuple(
        e.model_copy(update={"port_low": planning.entry_port_range(e)[0],
                             "port_high": planning.entry_port_range(e)[1], "icmp_type": None})
        for e in policy.entries))
    want = intents.evaluate_entries(normalised, identity=identity, protocol=1, port=icmp_type)
    assert got == (want.allowed, want.reason)


def test_icmp_type_0_is_one_type_not_any() -> None:
    """Echo reply (type 0) must not become the "any port" (0, 0) of the port encoding."""
    reply_only = PolicyEntry(identity=0, protocol=Protocol.ICMP, icmp_type=0, verdict=Verdict.ALLOW)
    policy = DirectionPolicy(enforced=True, entries=(reply_only,))
    state = programmed(endpoint(A, ingress=policy))
    for icmp_type in (0, 1, 3, 8, 255):
        want = intents.evaluate_entries(policy, identity=1001, protocol=1, port=icmp_type)
        assert lookup(state, A, MapDirection.INGRESS, 1001, 1, icmp_type) == (want.allowed, want.reason)
    assert lookup(state, A, MapDirection.INGRESS, 1001, 1, 8) == (False, "default-deny")


SPECIFIC_ALLOW = PolicyEntry(identity=1001, protocol=Protocol.TCP, port_low=8080, verdict=Verdict.ALLOW)
BROAD_DENY = PolicyEntry(identity=0, protocol=Protocol.ANY, verdict=Verdict.DENY)


def test_specific_allow_does_not_hide_a_broad_deny() -> None:
    state = programmed(endpoint(A, ingress=DirectionPolicy(enforced=True, entries=(SPECIFIC_ALLOW, BROAD_DENY))))
    assert lookup(state, A, MapDirection.INGRESS, 1001, 6, 8080) == (False, "denied-by-rule")


def test_deny_flag_is_set_exactly_for_directions_with_deny_entries() -> None:
    state = programmed(endpoint(A, ingress=DirectionPolicy(enforced=True, entries=(SPECIFIC_ALLOW,)),
                                egress=DirectionPolicy(entries=(BROAD_DENY,))))
    assert state.endpoints[A].flags == planning.EP_INGRESS_ENFORCED | planning.EP_EGRESS_DENY


def test_a_clear_deny_flag_skips_the_deny_map() -> None:
    """The flag is not decoration: the same maps without it answer from the allow map alone."""
    state = programmed(endpoint(A, ingress=DirectionPolicy(enforced=True, entries=(SPECIFIC_ALLOW, BROAD_DENY))))
    ep = state.endpoints[A]
    cleared = DatapathState(endpoints={A: EndpointValue(ep.ep_id, ep.identity, planning.EP_INGRESS_ENFORCED,
                                                        ep.ifindex)},
                            policy=state.policy, policy_deny=state.policy_deny)
    assert lookup(cleared, A, MapDirection.INGRESS, 1001, 6, 8080) == (True, "allowed")


# ---------------------------------------------------------------- every intermediate state of a plan


def single_writes(state: DatapathState, plan: planning.Plan) -> Iterator[DatapathState]:
    """Each state the kernel holds while the engine writes ``plan`` in planning.write_order."""
    current = {name: dict(getattr(state, name))
               for name in ("ipcache", "endpoints", "policy", "policy_deny", "ep_ifindex")}
    for name, kind, diff in planning.write_order(plan):
        contents = current[name]
        for key in (diff.upserts if kind == "upserts" else diff.deletes):
            if kind == "upserts":
                contents[key] = diff.upserts[key]
            else:
                del contents[key]
            yield DatapathState(ipcache=dict(current["ipcache"]), endpoints=dict(current["endpoints"]),
                                policy=dict(current["policy"]), policy_deny=dict(current["policy_deny"]),
                                ep_ifindex=dict(current["ep_ifindex"]))


SMALL_ENTRIES = st.builds(
    lambda identity, protocol, ports, verdict: PolicyEntry(identity=identity, protocol=protocol, port_low=ports[0],
                                                           port_high=ports[1], verdict=verdict),
    st.sampled_from([0, 1001, 1003]), st.sampled_from([Protocol.ANY, Protocol.TCP, Protocol.UDP]),
    st.sampled_from([(0, 0), (80, 80), (79, 81), (1, 1024)]), st.sampled_from(list(Verdict)))
"""Entries from a small universe, so that old and new policies overlap and conflict."""


def policies() -> st.SearchStrategy[DirectionPolicy]:
    return st.builds(lambda enforced, es: DirectionPolicy(enforced=enforced, entries=tuple(es)),
                     st.booleans(), st.lists(SMALL_ENTRIES, max_size=5))


def endpoints_of(ingress_a: DirectionPolicy, egress_a: DirectionPolicy, b: DirectionPolicy | None,
                 ) -> tuple[intents.EndpointIntent, ...]:
    eps = (endpoint(A, ingress=ingress_a, egress=egress_a),)
    return eps if b is None else (*eps, endpoint(B, ingress=b))


Packet = tuple[IPv4Address, MapDirection, int, int, int]


def packets_hitting(*node_intents: intents.NodeIntent) -> set[Packet]:
    """For every entry: a packet at each end of its port range (any identity/protocol: 1001/TCP)."""
    out: set[Packet] = set()
    for node in node_intents:
        for ep in node.endpoints:
            for direction in intents.Direction:
                for e in ep.direction(direction).entries:
                    low, high = planning.entry_port_range(e)
                    for port in {low, high or low}:
                        out.add((IPv4Address(ep.ipv4), MapDirection.of(direction), e.identity or 1001,
                                 int(e.protocol) or 6, port))
    return out


PACKETS = st.lists(st.tuples(st.sampled_from([A, B]), st.sampled_from(list(MapDirection)),
                             st.sampled_from([1001, 1002, 1003]), st.sampled_from([6, 17]),
                             st.sampled_from([0, 79, 80, 81, 443, 1024, 1025])), max_size=4)


@settings(max_examples=300, deadline=None)
@given(policies(), policies(), st.none() | policies(), policies(), policies(), st.none() | policies(), PACKETS)
def test_no_write_lets_through_what_neither_old_nor_new_policy_allows(
        old_in: DirectionPolicy, old_eg: DirectionPolicy, old_b: DirectionPolicy | None, new_in: DirectionPolicy,
        new_eg: DirectionPolicy, new_b: DirectionPolicy | None,
        extra_packets: list[Packet]) -> None:
    """The deny flags are raised before deny entries appear and lowered after they are gone."""
    old_intent = intents.NodeIntent(node="n1", revision=1, endpoints=endpoints_of(old_in, old_eg, old_b))
    new_intent = intents.NodeIntent(node="n1", revision=2, endpoints=endpoints_of(new_in, new_eg, new_b))
    veths = {A: VETHS[A], B: VETHS[B]}
    old = list(single_writes(DatapathState(), planning.plan(old_intent, DatapathState(), programs=PROGRAMS,
                                                           veths=veths)))[-1]
    plan = planning.plan(new_intent, old, programs=PROGRAMS, veths=veths)
    states = list(single_writes(old, plan))
    new = states[-1] if states else old
    assert planning.plan(new_intent, new, programs=PROGRAMS, veths=veths).map_writes == 0
    packets = packets_hitting(old_intent, new_intent) | set(extra_packets)
    for state in states:
        for ep in state.endpoints.values():  # the flag is a superset of the deny map's contents
            for key in state.policy_deny:
                if key.ep_id == ep.ep_id:
                    assert ep.flags & planning.deny_flag(key.direction)
        for packet in packets:
            if lookup(state, *packet)[0]:
                assert lookup(old, *packet)[0] or lookup(new, *packet)[0], (packet, state)


def test_an_allow_needing_a_missing_proxy_drops() -> None:
    """POLICY_NO_PROXY: the hit allows at L3/L4 but its L7 rules have no proxy here -> dropped, never passed."""
    dns = PolicyEntry(identity=0, protocol=Protocol.UDP, port_low=53, verdict=Verdict.ALLOW, l7_redirect=True,
                      l7_parser="dns")
    policy = DirectionPolicy(enforced=True, entries=(dns,))
    flags = planning.EP_EGRESS_ENFORCED
    for ports, expected in (({}, (False, "proxy-unavailable")), ({"dns": 10053}, (True, "allowed"))):
        allow, deny = planning.direction_maps(1, MapDirection.EGRESS, policy, ports)
        got = simulate_lookup(allow, deny, flags=flags, ep_id=1, direction=MapDirection.EGRESS, identity=5,
                              protocol=17, port=53)
        assert (got.allowed, got.reason) == expected


@settings(max_examples=400, deadline=None)
@given(st.lists(entries(), max_size=12), st.sampled_from([1001, 1002, 1003]), st.sampled_from([6, 17, 132]), PORTS)
def test_the_match_type_names_an_entry_that_covers_the_packet(entry_list: list[PolicyEntry], identity: int,
                                                              protocol: int, port: int) -> None:
    """When an entry decides, its match type (CY_MATCH_*) describes an entry of that verdict covering the packet:
    l3 kinds name the peer's identity, l4 kinds a port, proto kinds a protocol with any port; the peer's own
    identity is preferred whenever one of its entries covers the packet (the probe order)."""
    from ciliary.nodeagent import lookup_model

    policy = DirectionPolicy(enforced=True, entries=tuple(entry_list))
    state = programmed(endpoint(A, ingress=policy))
    ep = state.endpoints[A]
    got = simulate_lookup(state.policy, state.policy_deny, flags=ep.flags, ep_id=ep.ep_id,
                          direction=MapDirection.INGRESS, identity=identity, protocol=protocol, port=port)
    if got.reason == "default-deny":
        assert got.match_type == 0
        return
    verdict = Verdict.DENY if got.reason == "denied-by-rule" else Verdict.ALLOW
    covering = [e for e in entry_list if e.verdict is verdict and e.identity in (0, identity)
                and e.protocol in (Protocol.ANY, protocol)
                and (e.port_low == 0 or e.port_low <= port <= (e.port_high or e.port_low))]
    by_identity = got.match_type in (lookup_model.MATCH_L3_ONLY, lookup_model.MATCH_L3_L4, lookup_model.MATCH_L3_PROTO)
    assert by_identity == any(e.identity == identity for e in covering), (got, covering)
    kinds = {
        lookup_model.MATCH_L3_L4: lambda e: e.identity == identity and e.port_low != 0,
        lookup_model.MATCH_L4_ONLY: lambda e: e.identity == 0 and e.port_low != 0,
        lookup_model.MATCH_L3_PROTO: lambda e: e.identity == identity and e.port_low == 0 and e.protocol == protocol,
        lookup_model.MATCH_PROTO_ONLY: lambda e: e.identity == 0 and e.port_low == 0 and e.protocol == protocol,
        lookup_model.MATCH_L3_ONLY: lambda e: e.identity == identity and e.port_low == 0 and e.protocol == 0,
        lookup_model.MATCH_ALL: lambda e: e.identity == 0 and e.port_low == 0 and e.protocol == 0,
    }
    assert any(kinds[got.match_type](e) for e in covering), (got, covering)


@settings(max_examples=400, deadline=None)
@given(st.lists(entries(), max_size=12), st.sampled_from([1001, 1002, 1003]), st.sampled_from([1, 6, 17, 132]),
       PORTS)
def test_policy_trace_names_the_match_type_the_datapath_records(entry_list: list[PolicyEntry], identity: int,
                                                                protocol: int, port: int) -> None:
    """``ciliary policy trace`` (tracing.match_kind, over the intent's entries) names the kind of entry the lookup
    over the planned maps finds (lookup_model, checked against the kernel in
    tests/integration/datapath/test_datapath_match_types.py)."""
    from ciliary.nodeagent import hubble_convert
    from ciliary.operator.policy import tracing

    policy = DirectionPolicy(enforced=True, entries=tuple(entry_list))
    state = programmed(endpoint(A, ingress=policy))
    ep = state.endpoints[A]
    got = simulate_lookup(state.policy, state.policy_deny, flags=ep.flags, ep_id=ep.ep_id,
                          direction=MapDirection.INGRESS, identity=identity, protocol=protocol, port=port)
    verdict = Verdict.DENY if got.reason == "denied-by-rule" else Verdict.ALLOW
    traced = tracing.match_kind([e for e in entry_list if e.verdict is verdict], identity, protocol, port)
    assert traced == (hubble_convert.MATCH_TYPES[got.match_type] if got.match_type else ""), (got, traced)
