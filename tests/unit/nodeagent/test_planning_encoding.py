"""planning: port ranges as LPM prefix blocks, and the lookup model vs evaluate_entries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.nodeagent import planning
from ciliary.nodeagent.planning import MapDirection
from ciliary.operator import intents
from ciliary.operator.intents import PolicyEntry, Protocol, Verdict

# ---------------------------------------------------------------- port blocks


@pytest.mark.parametrize(
    ("low", "high", "blocks"),
    [
        (0, 0, ((0, 0),)),
        (80, 80, ((80, 16),)),
        (80, 0, ((80, 16),)),
        (1024, 2047, ((1024, 6),)),
        (8000, 8100, ((8000, 10), (8064, 11), (8096, 14), (8100, 16))),
        (65535, 65535, ((65535, 16),)),
        (32768, 65535, ((32768, 1),)),
    ],
)
def test_port_blocks_table(low: int, high: int, blocks: tuple[tuple[int, int], ...]) -> None:
    assert planning.port_blocks(low, high) == blocks


def _covered(blocks: tuple[tuple[int, int], ...]) -> set[int]:
    out: set[int] = set()
    for start, bits in blocks:
        out.update(range(start, start + (1 << (16 - bits))))
    return out


@given(st.integers(1, 65535), st.integers(0, 65535))
def test_port_blocks_cover_exactly_the_range(low: int, span: int) -> None:
    high = min(65535, low + span % 4096)
    blocks = planning.port_blocks(low, high)
    assert _covered(blocks) == set(range(low, high + 1))
    assert len(blocks) <= 30
    for start, bits in blocks:  # aligned
        assert start % (1 << (16 - bits)) == 0


def test_full_range_is_16_blocks() -> None:
    assert len(planning.port_blocks(1, 65535)) == 16
    assert _covered(planning.port_blocks(1, 65535)) == set(range(1, 65536))


def test_entry_keys_encode_icmp_type_as_port() -> None:
    entry = PolicyEntry(identity=7, protocol=Protocol.ICMP, icmp_type=8, verdict=Verdict.ALLOW)
    (key,) = planning.entry_keys(3, MapDirection.INGRESS, entry)
    assert key == planning.PolicyKey(3, MapDirection.INGRESS, 7, 1, 8, 16)
    assert key.prefixlen == 96
    assert key.port_range() == (8, 8)


def test_any_port_is_prefix_80() -> None:
    (key,) = planning.entry_keys(1, MapDirection.EGRESS, PolicyEntry(identity=0, verdict=Verdict.DENY))
    assert key.prefixlen == 80 and key.port_range() == (0, 65535)


def test_rule_cookie_is_stable_and_order_free() -> None:
    r1 = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="a", name="x", rule_index=0, section="ingress[0]")
    r2 = intents.RuleRef(kind="CiliumNetworkPolicy", namespace="a", name="y", rule_index=1, section="ingress[1]")
    assert planning.rule_cookie([r1, r2]) == planning.rule_cookie([r2, r1]) != 0
    assert planning.rule_cookie([]) == 0


# ---------------------------------------------------------------- the model vs evaluate_entries

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


@settings(max_examples=400, deadline=None)
@given(st.lists(entries(), max_size=12), st.booleans(), st.sampled_from([1001, 1002, 1003, 2]),
       st.sampled_from([1, 6, 17, 132, 47]), PORTS)
def test_lookup_model_equals_evaluate_entries(entry_list: list[PolicyEntry], enforced: bool,
                                              identity: int, protocol: int, port: int) -> None:
    policy = intents.DirectionPolicy(enforced=enforced, entries=tuple(entry_list))
    allow, deny = planning.direction_maps(5, MapDirection.INGRESS, policy)
    got = planning.simulate_lookup(allow, deny, enforced=enforced, ep_id=5, direction=MapDirection.INGRESS,
                                   identity=identity, protocol=protocol, port=port)
    want = intents.evaluate_entries(policy, identity=identity, protocol=protocol, port=port)
    assert (got.allowed, got.reason) == (want.allowed, want.reason)


@settings(max_examples=200, deadline=None)
@given(st.lists(entries(), max_size=8), st.lists(entries(), max_size=8), st.sampled_from([1001, 1003]),
       st.sampled_from([6, 17]), PORTS)
def test_other_endpoints_and_directions_never_leak(mine: list[PolicyEntry], theirs: list[PolicyEntry],
                                                   identity: int, protocol: int, port: int) -> None:
    """Entries of another endpoint, or of the other direction, share the maps but not the answer."""
    policy = intents.DirectionPolicy(enforced=True, entries=tuple(mine))
    allow, deny = planning.direction_maps(1, MapDirection.EGRESS, policy)
    other = intents.DirectionPolicy(enforced=True, entries=tuple(theirs))
    for ep_id, direction in ((2, MapDirection.EGRESS), (1, MapDirection.INGRESS)):
        a, d = planning.direction_maps(ep_id, direction, other)
        allow.update(a)
        deny.update(d)
    got = planning.simulate_lookup(allow, deny, enforced=True, ep_id=1, direction=MapDirection.EGRESS,
                                   identity=identity, protocol=protocol, port=port)
    want = intents.evaluate_entries(policy, identity=identity, protocol=protocol, port=port)
    assert (got.allowed, got.reason) == (want.allowed, want.reason)


@settings(max_examples=200, deadline=None)
@given(st.lists(entries(), max_size=8), st.sampled_from([0, 3, 8, 11]), st.sampled_from([1001, 1002]))
def test_icmp_type_entries_match_by_type(entry_list: list[PolicyEntry], icmp_type: int, identity: int) -> None:
    """The datapath matches icmp_type; the reference is evaluate_entries with the type as port range."""
    typed = [PolicyEntry(identity=1001, protocol=Protocol.ICMP, icmp_type=8, verdict=Verdict.ALLOW)]
    policy = intents.DirectionPolicy(enforced=True, entries=tuple(entry_list + typed))
    allow, deny = planning.direction_maps(1, MapDirection.INGRESS, policy)
    got = planning.simulate_lookup(allow, deny, enforced=True, ep_id=1, direction=MapDirection.INGRESS,
                                   identity=identity, protocol=1, port=icmp_type)
    normalised = intents.DirectionPolicy(enforced=True, entries=tuple(
        e.model_copy(update={"port_low": planning.entry_port_range(e)[0],
                             "port_high": planning.entry_port_range(e)[1], "icmp_type": None})
        for e in policy.entries))
    want = intents.evaluate_entries(normalised, identity=identity, protocol=1, port=icmp_type)
    assert (got.allowed, got.reason) == (want.allowed, want.reason)


def test_specific_allow_does_not_hide_a_broad_deny() -> None:
    policy = intents.DirectionPolicy(enforced=True, entries=(
        PolicyEntry(identity=1001, protocol=Protocol.TCP, port_low=8080, verdict=Verdict.ALLOW),
        PolicyEntry(identity=0, protocol=Protocol.ANY, verdict=Verdict.DENY),
    ))
    allow, deny = planning.direction_maps(1, MapDirection.INGRESS, policy)
    got = planning.simulate_lookup(allow, deny, enforced=True, ep_id=1, direction=MapDirection.INGRESS,
                                   identity=1001, protocol=6, port=8080)
    assert (got.allowed, got.reason) == (False, "denied-by-rule")
