"""planning: port ranges as LPM prefix blocks, keys and cookies (the lookup model: test_lookup_model)."""

from __future__ import annotations

import pytest
from hypothesis import given
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


def test_any_port_keys_carry_the_any_port_flag_and_port_keys_do_not() -> None:
    """CY_POLICY_ANY_PORT marks a key whose port block is "any port": the datapath's match types need it
    (a protocol or nothing vs a port); an ICMP type 0 entry is a port, not "any"."""
    entries = (PolicyEntry(identity=7, protocol=Protocol.TCP, port_low=80, verdict=Verdict.ALLOW),
               PolicyEntry(identity=7, protocol=Protocol.UDP, verdict=Verdict.ALLOW),
               PolicyEntry(identity=0, protocol=Protocol.ANY, verdict=Verdict.ALLOW),
               PolicyEntry(identity=0, protocol=Protocol.ICMP, icmp_type=0, verdict=Verdict.ALLOW),
               PolicyEntry(identity=9, protocol=Protocol.ANY, verdict=Verdict.DENY))
    allow, deny = planning.direction_maps(3, MapDirection.INGRESS, intents.DirectionPolicy(enforced=True,
                                                                                           entries=entries))
    flagged = {(k.identity, k.protocol, k.port_bits): bool(v.flags & planning.POLICY_ANY_PORT)
               for k, v in {**allow, **deny}.items()}
    assert flagged == {(7, 6, 16): False, (7, 17, 0): True, (0, 0, 0): True, (0, 1, 16): False, (9, 0, 0): True}
    assert all(v.flags & planning.POLICY_DENY for v in deny.values())
